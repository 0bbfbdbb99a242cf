"""Code bundles and Envs end to end: what `ember deploy` ships, builds, and promises.

A function brings its own code (the package or directory its file lives in, less what the ignore
rules leave out) and, optionally, its own Python environment, built by the server with uv. These
tests deploy through `ember.sdk.deploy.deploy_file` to one real server (sandboxed where
bubblewrap works) and check what the function sees when it runs there: its relative imports, the
files that travelled and those that did not, the package versions it pinned rather than the
server's, and its variables. They also check the promises around a deploy: an Env is built once
per content however many deploys ask for it, a deploy that cannot build or import its code fails
with a message naming the cause while the version before keeps serving, a lock rebuilds the
same packages, and pruning removes only what no current version runs in.

The functions import their Env's packages inside their bodies: the deploy imports the file in
this process too (as the worker will), and this process has no `six`.
"""

from __future__ import annotations

import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import idna
import pytest

from conftest import NO_SANDBOX, Server, wait_for
from ember.envs.bundle import collect
from ember.errors import ApiError, InvalidSpec
from ember.sdk.deploy import (
    EnvBuildFailed,
    Plan,
    build_envs,
    deploy_file,
    deploy_plan,
    plan,
    upload,
)

SERVER_IDNA = idna.__version__
"""The server's own idna: an Env that pins another one must get its pin."""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: each test deploys apps of its own names."""
    args = ["--no-tenant-isolation"] if NO_SANDBOX else []
    server = Server(tmp_path_factory.mktemp("envs") / "data", args).start()
    yield server
    server.shutdown(timeout=15)  # fails the module if a worker outlives the server
    log = server.log()
    assert "unhandled error" not in log, f"the server hit an unhandled error:\n{log}"


def write(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))


def deploy(server: Server, path: Path, **kw: Any) -> dict[str, Any]:
    return deploy_file(path, client=server.client, **kw)[0]


def call(server: Server, app: str, fn: str, **kw: Any) -> Any:
    return server.function(app, fn).remote(**kw)


def version_of(server: Server, app: str) -> int:
    return int(server.client.get_app(app)["version"])


# --- the code bundle ---------------------------------------------------------------------------


PKG_MAIN = """
from pathlib import Path

import ember

from . import helper
from .sub import deep

app = ember.App("bundle-pkg", include=[{config!r}])


@app.function()
def compute(x: int, probes: list) -> dict:
    root = Path(__file__).resolve().parents[1]  # the bundle's root: pkg/main.py's grandparent
    return {{
        "double": helper.double(x),
        "deep": deep.shout("deep"),
        "config": (Path(__file__).parent / "config.txt").read_text(),
        "exists": {{p: (root / p).exists() for p in probes}},
    }}
"""

FLAT_APP = """
from pathlib import Path

import ember
import sibling

env = ember.Env.standard().add_local_dir({assets!r}, remote="assets")
app = ember.App("bundle-flat", env=env)


@app.function()
def greet(name: str) -> dict:
    here = Path(__file__).resolve().parent
    return {{
        "greeting": sibling.greet(name),
        "asset": (here / "assets" / "motd.txt").read_text(),
        "notes_shipped": (here / "assets" / "notes.log").exists(),
    }}
"""

IGNORED = ["data/secret.txt", ".venv/lib/site.py", "pkg/__pycache__/helper.cpython-311.pyc"]


def test_a_package_ships_with_its_relative_imports_and_without_what_is_ignored(
    srv: Server, tmp_path: Path
) -> None:
    config = tmp_path / "outside" / "config.txt"
    write(tmp_path / "outside", {"config.txt": "mode=fast"})
    proj = tmp_path / "proj"
    write(
        proj,
        {
            "pkg/__init__.py": "",
            "pkg/helper.py": "def double(x):\n    return 2 * x\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/deep.py": "def shout(word):\n    return word.upper() + '!'\n",
            "pkg/main.py": PKG_MAIN.format(config=str(config)),
            ".emberignore": "data/\n",
            "data/secret.txt": "not for the bundle",
            ".venv/lib/site.py": "x = 1",
            "pkg/__pycache__/helper.cpython-311.pyc": "junk",
        },
    )
    main = proj / "pkg" / "main.py"
    bundle = collect(main, [(config, "pkg/config.txt")])
    assert [f.path for f in bundle.files] == [
        ".emberignore",
        "pkg/__init__.py",
        "pkg/config.txt",
        "pkg/helper.py",
        "pkg/main.py",
        "pkg/sub/__init__.py",
        "pkg/sub/deep.py",
    ]
    assert bundle.module == "pkg.main"

    out = deploy(srv, main)
    assert out["bundle"] == bundle.digest  # exactly these files went to the server
    got = call(srv, "bundle-pkg", "compute", x=21, probes=[*IGNORED, "pkg/sub/deep.py"])
    assert got["double"] == 42 and got["deep"] == "DEEP!"
    assert got["config"] == "mode=fast"  # App(include=[...]) put it next to the app's file
    # what the ignore rules left out is not on the worker's disk; what they kept is
    assert got["exists"] == {**dict.fromkeys(IGNORED, False), "pkg/sub/deep.py": True}

    # a directory app imports its sibling module absolutely; an Env's local dir travels with it
    assets = tmp_path / "assets-src"
    write(assets, {"motd.txt": "welcome", "notes.log": "x", ".emberignore": "*.log\n"})
    flat = tmp_path / "flat"
    write(
        flat,
        {
            "app.py": FLAT_APP.format(assets=str(assets)),
            "sibling.py": "def greet(name):\n    return f'hello {name}'\n",
        },
    )
    out = deploy(srv, flat / "app.py")
    assert set(out["envs"]) == {"greet"}
    got = call(srv, "bundle-flat", "greet", name="ada")
    assert got == {"greeting": "hello ada", "asset": "welcome", "notes_shipped": False}


# --- isolation: each function its own packages ---------------------------------------------------


ISO_APP = """
import os

import ember

app = ember.App("iso")
old = ember.Env.standard().pip_install("six==1.16.0")
new = ember.Env.standard().pip_install("six==1.17.0")


@app.function(env=old)
def six_old() -> str:
    import six

    return six.__version__


@app.function(env=new)
def six_new() -> str:
    import six

    return six.__version__


@app.function(env=ember.Env.standard().env({"GREETING": "hi"}))
def in_env() -> dict:
    try:
        import httpx  # noqa: F401  (the server's dependency, not this Env's)
    except ImportError as exc:
        httpx_error = type(exc).__name__
    else:
        httpx_error = None
    return {"greeting": os.environ.get("GREETING"), "httpx_error": httpx_error}


@app.function()
def on_server_python() -> dict:
    import httpx

    return {"greeting": os.environ.get("GREETING"), "httpx": httpx.__version__}


@app.function(env=ember.Env.standard().pip_install("idna==3.6"))
def idna_version() -> str:
    import idna

    return idna.__version__
"""


@pytest.fixture(scope="module")
def iso(srv: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The `iso` app, deployed once: its answer (`envs`: unit -> Env id) and its file."""
    path = tmp_path_factory.mktemp("iso") / "iso_app.py"
    path.write_text(textwrap.dedent(ISO_APP))
    return {**deploy(srv, path), "path": path}


def test_each_function_runs_in_its_own_env(srv: Server, iso: dict[str, Any]) -> None:
    envs = iso["envs"]
    assert set(envs) == {"six_old", "six_new", "in_env", "idna_version"}  # not on_server_python
    assert len(set(envs.values())) == 4
    assert call(srv, "iso", "six_old") == "1.16.0"
    assert call(srv, "iso", "six_new") == "1.17.0"
    # an Env holds its packages and ember's runtime, not the server's dependencies
    assert call(srv, "iso", "in_env") == {"greeting": "hi", "httpx_error": "ModuleNotFoundError"}
    # a function without an Env runs on the server's Python, as before Envs; no Env's variables
    plain = call(srv, "iso", "on_server_python")
    assert plain["greeting"] is None and plain["httpx"]
    # a package the server has too: the function's pin wins
    assert SERVER_IDNA != "3.6"
    assert call(srv, "iso", "idna_version") == "3.6"
    # the app and each function's spec name their Env
    app = srv.client.get_app("iso")
    assert app["envs"] == envs
    specs = {f["name"]: f["spec"] for f in app["functions"]}
    assert specs["six_old"]["env"] == envs["six_old"]
    assert specs["on_server_python"].get("env") is None
    view = srv.client.get_env(envs["six_old"])
    assert "six==1.16.0" in view["packages"]
    assert view["used_by"] == [f"iso v{app['version']}: six_old"]


# --- reuse and dedup -----------------------------------------------------------------------------


def test_an_env_built_once_is_found_again_at_once(srv: Server, iso: dict[str, Any]) -> None:
    spec = srv.client.get_env(iso["envs"]["six_old"])["spec"]
    resp = srv.http("POST", "/v1/envs", json={"spec": spec})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "ready" and resp.json()["id"] == iso["envs"]["six_old"]

    # a redeploy of the same file builds nothing: its Envs' step is a few quick requests
    (p,) = plan(iso["path"])
    t0 = time.perf_counter()
    ids = build_envs(srv.client, p.envs)
    assert time.perf_counter() - t0 < 1.0
    assert ids == iso["envs"]
    before = version_of(srv, "iso")
    assert deploy(srv, iso["path"])["envs"] == iso["envs"]
    assert version_of(srv, "iso") == before + 1
    assert call(srv, "iso", "six_old") == "1.16.0"


SHARED_APP = """
import ember

env = ember.Env.standard().pip_install("six==1.16.0").env({{"RUN": "{run}"}})
app = ember.App("{name}", env=env)


@app.function()
def which() -> str:
    import os

    import six

    return f"{{six.__version__}} {{os.environ['RUN']}}"
"""


def test_an_env_asked_for_while_it_builds_joins_that_build(srv: Server) -> None:
    spec = {"base": "standard", "packages": ["six==1.16.0"], "variables": {"RUN": uuid.uuid4().hex}}
    first = srv.http("POST", "/v1/envs", json={"spec": spec})
    assert first.status_code == 202 and first.json()["status"] == "building", first.text
    time.sleep(0.3)  # sleep-ok: the second ask must come while the first build runs
    second = srv.http("POST", "/v1/envs", json={"spec": spec})
    assert second.json()["id"] == first.json()["id"]
    if second.status_code == 202:  # still building: the same build, running since the first ask
        assert second.json()["elapsed_s"] >= 0.3, second.json()
    else:  # already done: found built, not built again
        assert second.status_code == 200 and second.json()["status"] == "ready"
    env_id = first.json()["id"]

    def built() -> dict[str, Any] | None:
        view = srv.client.get_env(env_id, build=True)
        assert view["status"] != "failed", view
        return view if view["status"] == "ready" else None

    wait_for(built, timeout=60, what=f"{env_id} to be built")
    assert [e["id"] for e in srv.client.list_envs()].count(env_id) == 1


def test_concurrent_deploys_of_one_new_env_build_it_once(srv: Server, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:12]  # a spec no deploy asked for before: its Env is new
    paths = []
    for name in ("shared-a", "shared-b"):
        write(tmp_path / name, {"app.py": SHARED_APP.format(run=run, name=name)})
        paths.append(tmp_path / name / "app.py")
    # the imports happen first, one at a time: importing user code is this process's global state
    plans = [plan(path)[0] for path in paths]
    results: dict[str, Any] = {}
    barrier = threading.Barrier(len(plans))

    def go(p: Plan) -> None:
        barrier.wait()
        try:
            upload(srv.client, p.bundle)
            ids = build_envs(srv.client, p.envs)
            results[p.app.name] = deploy_plan(srv.client, p, ids, wait=True)
        except Exception as exc:  # reported below, with the other thread's outcome
            results[p.app.name] = exc

    threads = [threading.Thread(target=go, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and all(isinstance(r, dict) for r in results.values()), results
    (env_id,) = {r["envs"]["which"] for r in results.values()}
    listed = [e["id"] for e in srv.client.list_envs()]
    assert listed.count(env_id) == 1
    assert sorted(srv.client.get_env(env_id)["used_by"]) == [
        "shared-a v1: which",
        "shared-b v1: which",
    ]
    assert call(srv, "shared-a", "which") == f"1.16.0 {run}"
    assert call(srv, "shared-b", "which") == f"1.16.0 {run}"


# --- bad input changes nothing ------------------------------------------------------------------


BAD_APP = """
import ember

env = ember.Env.standard(){layer}
app = ember.App("bad", env=env)


@app.function()
def ping() -> str:
    import six

    return "pong " + six.__version__
"""


@pytest.mark.parametrize(
    ("layer", "files", "names"),
    [
        ('.pip_install("ember-no-such-package-xyz==1.0")', {}, ["ember-no-such-package-xyz"]),
        ('.pip_install("six==9.9.9")', {}, ["six", "9.9.9"]),
        ('.pip_install("six==1.16.0", "six==1.17.0")', {}, ["six"]),
        # a requirements file's mistake is named by its line, and by the file it is in
        (
            '.pip_install_from_requirements("reqs.txt")',
            {"reqs.txt": "six===\n"},
            ["six===", "reqs.txt:1"],
        ),
        (
            '.pip_install_from_requirements("reqs.txt")',
            {"reqs.txt": "idna\nnot a requirement!!\n"},
            ["not a requirement!!", "reqs.txt:2"],
        ),
    ],
    ids=["unknown-package", "unknown-version", "conflicting-pins", "bad-specifier", "not-a-line"],
)
def test_an_env_that_cannot_be_built_fails_the_deploy_and_changes_nothing(
    srv: Server, tmp_path: Path, layer: str, files: dict[str, str], names: list[str]
) -> None:
    good = tmp_path / "good"
    write(good, {"app.py": BAD_APP.format(layer='.pip_install("six==1.17.0")')})
    try:
        before = version_of(srv, "bad")
    except ApiError:  # the first case deploys the good version
        deploy(srv, good / "app.py")
        before = version_of(srv, "bad")
    assert call(srv, "bad", "ping") == "pong 1.17.0"

    broken = tmp_path / "broken"
    write(broken, {"app.py": BAD_APP.format(layer=layer), **files})
    with pytest.raises(InvalidSpec) as caught:
        deploy(srv, broken / "app.py")
    message = str(caught.value)
    for name in names:
        # (a requirements file's line is checked after the files' lines are merged, so today its
        # message names neither the file nor the line, though Env.resolve promises both)
        assert name in message, f"the message does not name {name!r}: {message}"
    if isinstance(caught.value, EnvBuildFailed):  # the server's builder failed: its log comes too
        assert caught.value.log
    assert version_of(srv, "bad") == before
    assert call(srv, "bad", "ping") == "pong 1.17.0"


# --- a deploy tells the truth about its code -----------------------------------------------------


TRUTH_APP = """
import os

import ember
{top}

app = ember.App("truth")
ON_SERVER = bool(os.environ.get("EMBER_APP"))  # set in templates and workers, not in a deploy
{on_server}


@app.function({options})
def ping() -> str:
    return "pong v1"


@app.cls()
class Model:
    @ember.enter(snap=True)
    def load(self) -> None:
        {load}

    @ember.method()
    def ready(self) -> bool:
        return True
"""


def truth(
    root: Path, top: str = "", on_server: str = "", options: str = "", load: str = "pass"
) -> Path:
    src = TRUTH_APP.format(top=top, on_server=on_server, options=options, load=load)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "truth_app.py"
    path.write_text(textwrap.dedent(src))
    return path


def test_a_deploy_whose_code_fails_on_the_server_is_refused_with_its_traceback(
    srv: Server, tmp_path: Path
) -> None:
    deploy(srv, truth(tmp_path / "v1"))
    before = version_of(srv, "truth")
    assert call(srv, "truth", "ping") == "pong v1"

    def refused(path: Path, *needles: str) -> None:
        with pytest.raises(ApiError) as caught:
            deploy(srv, path)
        assert caught.value.status == 422 and caught.value.code == "invalid_deploy"
        for needle in needles:
            assert needle in caught.value.message, caught.value.message
        assert version_of(srv, "truth") == before
        assert call(srv, "truth", "ping") == "pong v1"

    # the module raises at import where it runs, not where it was deployed from
    boom = 'if ON_SERVER:\n    raise RuntimeError("boom at import")'
    refused(truth(tmp_path / "boom", on_server=boom), "Traceback", "RuntimeError: boom at import")
    # a snap hook that raises fails the deploy too: it runs before any worker would
    hook = 'raise ValueError("the weights are missing")'
    refused(truth(tmp_path / "hook", load=hook), "Model", "ValueError: the weights are missing")
    # a function in an Env cannot import what only the server has
    env = "env=ember.Env.standard()"
    refused(
        truth(tmp_path / "httpx", top="import httpx", options=env),
        "ping",
        "ModuleNotFoundError",
        "httpx",
    )

    # without waiting, the server answers at once, before the code is imported
    # sleep-ok: the deployed code's slow import, which a deploy without waiting must not wait for
    slow = 'if ON_SERVER:\n    import time\n    time.sleep(5)\n    raise RuntimeError("boom later")'
    (p,) = plan(truth(tmp_path / "nowait", on_server=slow))
    srv.client.put_bundle(p.bundle.digest, p.bundle.data)
    body = {
        "name": "truth",
        "tags": {},
        "filename": p.bundle.filename,
        "bundle": p.bundle.digest,
        "module": p.bundle.module,
        "functions": p.app.manifest(),
        "wait": False,
    }
    t0 = time.perf_counter()
    resp = srv.http("POST", "/v1/apps", json=body)
    assert resp.status_code == 201, resp.text
    assert time.perf_counter() - t0 < 3.0
    assert version_of(srv, "truth") == before + 1


def test_without_templates_a_check_only_import_still_catches_it(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server("--no-templates")
    deploy(server, truth(tmp_path / "v1"))
    boom = 'if ON_SERVER:\n    raise RuntimeError("boom at import")'
    with pytest.raises(ApiError) as caught:
        deploy(server, truth(tmp_path / "boom", on_server=boom))
    assert caught.value.status == 422 and caught.value.code == "invalid_deploy"
    assert "Traceback" in caught.value.message
    assert "RuntimeError: boom at import" in caught.value.message
    assert version_of(server, "truth") == 1
    assert call(server, "truth", "ping") == "pong v1"


# --- locks and pruning ---------------------------------------------------------------------------


LOCKED_APP = """
import ember

app = ember.App("locked")


@app.function({options})
def six_version() -> str:
    import six

    return six.__version__
"""


def test_a_lock_rebuilds_the_same_env_and_prune_removes_only_unused_ones(
    srv: Server, iso: dict[str, Any], tmp_path: Path
) -> None:
    original = iso["envs"]["six_old"]
    lock = srv.client.export_env(original)
    assert "six==1.16.0" in lock and "--hash=sha256:" in lock
    (tmp_path / "six.lock").write_text(lock)
    path = tmp_path / "locked_app.py"
    path.write_text(
        textwrap.dedent(LOCKED_APP.format(options='env=ember.Env.from_lock("six.lock")'))
    )
    out = deploy(srv, path)
    locked = out["envs"]["six_version"]
    assert locked != original  # a lock is a spec of its own...
    view = srv.client.get_env(locked)
    assert view["packages"] == srv.client.get_env(original)["packages"]  # ...of the same packages
    assert view["spec"]["lock"]
    assert call(srv, "locked", "six_version") == "1.16.0"
    app = srv.client.get_app("locked")
    assert app["envs"] == {"six_version": locked}
    assert [f["spec"]["env"] for f in app["functions"]] == [locked]

    # the app moves to the server's Python: its Env is used by nothing current any more
    path.write_text(textwrap.dedent(LOCKED_APP.format(options="")))
    assert deploy(srv, path)["envs"] == {}
    assert srv.client.get_env(locked)["used_by"] == []
    dry = srv.client.prune_envs(dry_run=True)
    assert dry["dry_run"] is True and locked in dry["removed"]
    assert locked in [e["id"] for e in srv.client.list_envs()]  # a dry run removes nothing
    pruned = srv.client.prune_envs()
    assert pruned["removed"] == dry["removed"]
    left = [e["id"] for e in srv.client.list_envs()]
    assert locked not in left
    assert set(iso["envs"].values()) <= set(left)  # the current `iso` version still runs in them
    assert srv.client.get_env(iso["envs"]["six_old"])["used_by"]
    assert call(srv, "iso", "six_old") == "1.16.0"
    resp = srv.http("GET", f"/v1/envs/{locked}")
    assert resp.status_code == 404
