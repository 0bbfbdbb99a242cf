"""The Python SDK: decorator validation, local calls, remote calls, jobs, map, stream, lookup."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

import ember
from conftest import Server
from ember.sdk.client import AsyncClient

SOURCE = """
import os
import time

import ember

app = ember.App("sdk")


@app.function()
def add(a: int, b: int = 10) -> int:
    return a + b


@app.function(max_workers=4)
def slow_pid(i: int, s: float = 0.5) -> list:
    start = time.time()
    time.sleep(s)
    return [i, os.getpid(), start, time.time()]


@app.function()
def sleepy(s: float) -> float:
    deadline = time.monotonic() + s
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return s


@app.function()
def count(n: int):
    for i in range(n):
        yield i * 10


@app.function()
async def async_double(x: int) -> int:
    return 2 * x


@app.function()
def explode(msg: str) -> None:
    raise KeyError(msg)


@app.cls()
class Model:
    @ember.enter()
    def load(self) -> None:
        self.weights = 3
        self.loads = getattr(self, "loads", 0) + 1

    @ember.method()
    def predict(self, x: int) -> int:
        return self.weights * x

    @ember.method()
    def loads_so_far(self) -> int:
        return self.loads
"""


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("sdk") / "data").start()
    server.deploy(SOURCE, filename="sdk_app.py")
    yield server
    server.shutdown(timeout=15)  # fails the module if a worker outlives the server


# ----------------------------------------------------------------------------- decoration


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_workers": 0}, ["max_workers", ">= 1"]),
        ({"max_workers": -3}, ["max_workers"]),
        ({"max_workers": 2.5}, ["max_workers", "integer"]),
        ({"max_workers": "4"}, ["max_workers", "integer"]),
        ({"max_workers": True}, ["max_workers", "integer"]),
        ({"min_workers": -1}, ["min_workers"]),
        ({"min_workers": 5, "max_workers": 2}, ["min_workers (5)", "max_workers (2)"]),
        ({"buffer_workers": -1}, ["buffer_workers"]),
        ({"idle_timeout": -1}, ["idle_timeout"]),
        ({"idle_timeout": "60s"}, ["idle_timeout"]),
        ({"idle_timeout": float("nan")}, ["idle_timeout"]),
        ({"concurrency": 0}, ["concurrency"]),
        ({"timeout": 0}, ["timeout"]),
        ({"timeout": -10}, ["timeout"]),
        ({"timeout": float("inf")}, ["timeout"]),
        ({"retries": -1}, ["retries"]),
        ({"retries": 1.5}, ["retries"]),
        ({"gpu": "H100:0"}, ["gpu", "H100:0"]),
        ({"gpu": "H100:two"}, ["gpu", "TYPE:COUNT"]),
        ({"gpu": ""}, ["gpu"]),
        ({"gpu": 1}, ["gpu"]),
        ({"gpu": []}, ["gpu"]),
        ({"gpu": ["H100", 3]}, ["gpu"]),
        ({"cpu": 0}, ["cpu"]),
        ({"cpu": "two"}, ["cpu"]),
        ({"memory": "lots"}, ["memory"]),
        ({"memory": -512}, ["memory"]),
        ({"memory": float("inf")}, ["memory"]),
        ({"tags": {"team": 1}}, ["tags"]),
        ({"tags": ["team"]}, ["tags"]),
        ({"tags": {"bad key!": "x"}}, ["tags"]),
        ({"env": ""}, ["env"]),
        ({"env": 3}, ["env"]),
    ],
)
def test_bad_function_options_fail_at_decoration(options: dict[str, Any], words: list[str]) -> None:
    app = ember.App("decor")
    with pytest.raises(ember.InvalidSpec) as info:

        @app.function(**options)
        def f(x: int) -> int:
            return x

    message = str(info.value)
    assert "f" in message
    for word in words:
        assert word in message
    # and the same options on a class
    with pytest.raises(ember.InvalidSpec):

        @app.cls(**options)
        class C:
            @ember.method()
            def m(self) -> None: ...


def test_unknown_options_are_a_type_error() -> None:
    app = ember.App("decor")
    with pytest.raises(TypeError, match="gpus"):
        app.function(gpus="H100")
    with pytest.raises(ember.InvalidSpec, match="unknown option 'gpus'; the options are gpu, "):
        app.function(gpus="H100")
    with pytest.raises(TypeError, match="workers"):
        app.cls(workers=2)


def test_good_options_are_kept() -> None:
    app = ember.App("decor", tags={"team": "search"})

    @app.function(
        gpu=["H100", "a100-80gb:2"],
        cpu=2,
        memory="8GiB",
        min_workers=1,
        max_workers=3,
        buffer_workers=1,
        idle_timeout=5,
        concurrency=4,
        timeout=30,
        retries=2,
        tags={"project": "rag"},
    )
    def f(x: int) -> int:
        return x

    assert f.spec is not None
    spec = f.spec.to_dict()
    assert spec["gpu"] == ["H100", "A100-80GB:2"]
    assert spec["memory_mib"] == 8192
    assert spec["scaling"]["max_workers"] == 3
    assert spec["scaling"]["concurrency"] == 4
    assert spec["retries"] == 2
    assert spec["tags"] == {"project": "rag"}
    assert app.tags == {"team": "search"}


def test_bad_apps_and_decorations() -> None:
    for name in ("", "has space", "a/b", "x" * 65, 3):
        with pytest.raises(ember.InvalidSpec, match="app name"):
            ember.App(name)
    with pytest.raises(ember.InvalidSpec, match="tags"):
        ember.App("ok", tags={"team": 1})
    app = ember.App("decor")
    with pytest.raises(ember.InvalidSpec, match=r"@app\.cls"):

        @app.function
        class NotAFunction:
            pass

    with pytest.raises(ember.InvalidSpec, match=r"@ember\.method"):

        @app.cls()
        class NoMethods:
            def m(self) -> None: ...

    @app.function
    def twice() -> None: ...

    with pytest.raises(ember.InvalidSpec, match="twice"):

        @app.function
        def twice() -> None: ...


# ----------------------------------------------------------------------------- local


def test_calling_the_decorated_function_runs_it_locally() -> None:
    app = ember.App("local")
    pid = os.getpid()

    @app.function(max_workers=2)
    def where(x: int) -> tuple[int, int]:
        return x * 2, os.getpid()

    @app.function
    def gen(n: int) -> Iterator[int]:
        yield from range(n)

    @app.function
    async def coro(x: int) -> int:
        return x + 1

    assert where(4) == (8, pid)
    assert where.local(x=5) == (10, pid)
    assert list(gen(3)) == [0, 1, 2]
    assert asyncio.run(coro(1)) == 2

    @app.cls()
    class Model:
        @ember.enter()
        def load(self) -> None:
            self.k = 7

        @ember.method()
        def mul(self, x: int) -> int:
            return self.k * x

    assert Model().mul(3) == 21


# ----------------------------------------------------------------------------- remote


def test_remote_with_positional_and_keyword_arguments(sdk: Server) -> None:
    add = sdk.function("sdk", "add")
    assert add.remote(1, 2) == 3
    assert add.remote(1) == 11
    assert add.remote(a=5, b=6) == 11
    assert add.remote(4, b=1) == 5
    with pytest.raises(TypeError, match="positional"):
        add.remote(1, 2, 3)
    with pytest.raises(TypeError, match="multiple values"):
        add.remote(1, a=2)
    with pytest.raises(ember.InvalidInput, match="'a'") as info:
        add.remote(b=1)
    assert info.value.status == 422
    with pytest.raises(ember.InvalidInput, match="'a'"):
        add.remote("one")


def test_a_looked_up_function_cannot_run_locally(sdk: Server) -> None:
    add = sdk.function("sdk", "add")
    with pytest.raises(TypeError, match="remote"):
        add(1, 2)


def test_spawn_returns_a_job(sdk: Server) -> None:
    add = sdk.function("sdk", "add")
    job = add.spawn(2, b=3)
    assert isinstance(job, ember.Job)
    assert job.id.startswith("job-")
    assert job.status() in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert job.result(timeout=30) == 5
    assert job.status() == "COMPLETED"
    # a Job made from its id alone works as well
    again = ember.Job(job.id, client=sdk.client)
    assert again.result(timeout=5) == 5
    assert again.info()["timings"]["exec_ms"] >= 0


def test_job_result_timeout_and_cancel(sdk: Server) -> None:
    sleepy = sdk.function("sdk", "sleepy")
    job = sleepy.spawn(60)
    with pytest.raises(ember.ResultTimeout):
        job.result(timeout=0.2)
    with pytest.raises(TimeoutError):  # ResultTimeout is a TimeoutError
        job.result(timeout=0.05)
    body = job.cancel()
    assert body["status"] == "CANCELLED"
    assert job.status() == "CANCELLED"
    with pytest.raises(ember.JobCancelled):
        job.result(timeout=5)


def test_map_is_ordered_and_runs_on_several_workers_at_once(sdk: Server) -> None:
    slow_pid = sdk.function("sdk", "slow_pid")
    out = list(slow_pid.map(range(6), [0.6] * 6))
    assert [row[0] for row in out] == list(range(6))
    pids = {row[1] for row in out}
    assert len(pids) >= 2, out
    # some calls overlapped in time
    spans = sorted((row[2], row[3]) for row in out)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans
    assert list(slow_pid.map([])) == []


def test_map_raises_or_returns_exceptions(sdk: Server) -> None:
    explode = sdk.function("sdk", "explode")
    with pytest.raises(ember.RemoteError):
        list(explode.map(["a", "b"]))
    add = sdk.function("sdk", "add")
    assert list(add.map([1, 2], [3, 4])) == [4, 6]
    results = list(explode.map(["a"], return_exceptions=True))
    assert isinstance(results[0], ember.RemoteError)


def test_stream_yields_values_as_they_come(sdk: Server) -> None:
    count = sdk.function("sdk", "count")
    assert list(count.stream(4)) == [0, 10, 20, 30]
    assert list(count.stream(n=0)) == []
    assert count.remote(3) == [0, 10, 20]  # .remote of a generator gives the whole list


def test_async_functions_run_remotely(sdk: Server) -> None:
    assert sdk.function("sdk", "async_double").remote(21) == 42


def test_remote_exceptions_raise_remote_error(sdk: Server) -> None:
    explode = sdk.function("sdk", "explode")
    with pytest.raises(ember.RemoteError) as info:
        explode.remote("kaboom")
    err = info.value
    assert err.type == "KeyError"
    assert "kaboom" in err.message
    assert err.remote_traceback is not None
    assert "raise KeyError(msg)" in err.remote_traceback
    assert err.job_id.startswith("job-")
    assert "KeyError" in str(err)
    job = explode.spawn("later")
    with pytest.raises(ember.RemoteError, match="later"):
        job.result(timeout=30)


def test_unknown_names_raise_not_found(sdk: Server) -> None:
    with pytest.raises(ember.NotFound, match="add"):
        sdk.function("sdk", "nope")
    with pytest.raises(ember.NotFound, match="sdk"):
        sdk.function("nope", "add")
    with pytest.raises(ember.NotFound, match="job-nope"):
        ember.Job("job-nope", client=sdk.client).status()


def test_a_bad_token_raises_auth_error(sdk: Server) -> None:
    from ember.sdk.client import Client

    client = Client(url=sdk.url, token="wrong")
    try:
        with pytest.raises(ember.AuthError) as info:
            ember.Function.lookup("sdk", "add", client=client)
        assert info.value.status == 401
    finally:
        client.close()


# ----------------------------------------------------------------------------- async


def test_awaitable_variants(sdk: Server) -> None:
    add = sdk.function("sdk", "add")
    count = sdk.function("sdk", "count")

    async def main() -> tuple[Any, ...]:
        a = await add.remote.aio(1, b=2)
        job = await add.spawn.aio(3, 4)
        b = await job.result_aio(timeout=30)
        many = await asyncio.gather(*(add.remote.aio(i, 0) for i in range(5)))
        streamed = [v async for v in count.stream_aio(3)]
        return a, job, b, many, streamed

    a, job, b, many, streamed = asyncio.run(main())
    assert a == 3
    assert isinstance(job, ember.Job)
    assert b == 7
    assert many == [0, 1, 2, 3, 4]
    assert streamed == [0, 10, 20]

    explode = sdk.function("sdk", "explode")

    async def failing() -> None:
        await explode.remote.aio("async boom")

    with pytest.raises(ember.RemoteError, match="async boom"):
        asyncio.run(failing())


def test_result_aio_with_an_explicit_async_client(sdk: Server) -> None:
    add = sdk.function("sdk", "add")
    job = add.spawn(10, 5)

    async def main() -> Any:
        client = AsyncClient(url=sdk.url, token=sdk.token)
        try:
            return await ember.Job(job.id).result_aio(timeout=30, client=client)
        finally:
            await client.aclose()

    assert asyncio.run(main()) == 15


# ----------------------------------------------------------------------------- classes


def test_classes_lookup_and_call_methods(sdk: Server) -> None:
    Model = ember.Cls.lookup("sdk", "Model", client=sdk.client)
    obj = Model()
    assert obj.predict.remote(5) == 15  # weights come from the enter hook
    assert obj.predict.remote(x=2) == 6
    assert obj.loads_so_far.remote() == 1  # enter ran once for this worker
    assert obj.predict.spawn(7).result(timeout=30) == 21
    with pytest.raises(AttributeError, match="predict"):
        obj.nope  # noqa: B018
    with pytest.raises(ember.NotFound, match="Nope"):
        ember.Cls.lookup("sdk", "Nope", client=sdk.client)
    # a method is also a function, addressed as Class.method
    assert sdk.function("sdk", "Model.predict").remote(1) == 3


# ----------------------------------------------------------------------------- other processes


LOOKUP_SCRIPT = """
import asyncio
import itertools
import ember

add = ember.Function.lookup("sdk", "add")
print("remote", add.remote(20, b=22))
print("spawn", add.spawn(1, 1).result(timeout=30))
print("aio", asyncio.run(add.remote.aio(2, 3)))
model = ember.Cls.lookup("sdk", "Model")
print("cls", model().predict.remote(4))
"""


def _run_script(
    env_changes: dict[str, str | None], script: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    for key, value in env_changes.items():
        if value is not None:
            env[key] = value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_lookup_from_another_process_with_url_and_token(sdk: Server) -> None:
    proc = _run_script({"EMBER_URL": sdk.url, "EMBER_TOKEN": sdk.token}, LOOKUP_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:4] == ["remote 42", "spawn 2", "aio 5", "cls 12"]


def test_lookup_from_another_process_reads_the_token_file(sdk: Server) -> None:
    proc = _run_script({"EMBER_URL": sdk.url, "EMBER_DATA_DIR": str(sdk.data_dir)}, LOOKUP_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert "remote 42" in proc.stdout


def test_lookup_without_a_token_or_server_says_what_to_do(sdk: Server) -> None:
    script = """
    import ember
    try:
        ember.Function.lookup("sdk", "add")
    except ember.EmberError as exc:
        print(type(exc).__name__, exc)
    """
    proc = _run_script({"EMBER_URL": sdk.url, "EMBER_DATA_DIR": "/nonexistent"}, script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("AuthError")
    assert "token" in proc.stdout

    from conftest import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    proc = _run_script({"EMBER_URL": nowhere, "EMBER_TOKEN": "x"}, script)
    assert proc.stdout.startswith("ServerUnavailable")
    assert nowhere in proc.stdout and "ember server" in proc.stdout


def test_configure_points_the_default_client(sdk: Server) -> None:
    script = f"""
    import ember
    ember.configure(url={sdk.url!r}, token={sdk.token!r})
    print(ember.Function.lookup("sdk", "add").remote(1, 1))
    """
    proc = _run_script({}, script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"


def test_a_job_is_durable_before_spawn_returns(sdk: Server) -> None:
    """A spawned job can be read back at once, even from another client."""
    sleepy = sdk.function("sdk", "sleepy")
    job = sleepy.spawn(0.2)
    from ember.sdk.client import Client

    other = Client(url=sdk.url, token=sdk.token)
    try:
        assert ember.Job(job.id, client=other).status() in {"IN_QUEUE", "IN_PROGRESS"}
        started = time.monotonic()
        assert ember.Job(job.id, client=other).result(timeout=30) == 0.2
        assert time.monotonic() - started < 30
    finally:
        other.close()
