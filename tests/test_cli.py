"""The `ember` command line, run as a subprocess against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, free_port, wait_for

SOURCE = """
import time

import ember

app = ember.App("cli", tags={"team": "tools"})


@app.function()
def square(x: int) -> int:
    print(f"squaring {x}")
    return x * x


@app.function()
def info(name: str, tags: list[str] | None = None) -> dict:
    return {"name": name, "tags": tags or []}


@app.function()
def sleepy(s: float) -> float:
    deadline = time.monotonic() + s
    while time.monotonic() < deadline:
        time.sleep(0.01)  # sleep-ok: the deployed function's simulated work
    return s


@app.function()
def count(n: int):
    for i in range(n):
        yield i


@app.function()
def fail() -> None:
    raise RuntimeError("it broke")


@app.cls()
class Greeter:
    @ember.method()
    def hello(self, who: str) -> str:
        return f"hello {who}"
"""

COMMANDS = ["server", "deploy", "call", "job", "cancel", "apps", "logs"]


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("cli") / "data").start()
    yield server
    server.shutdown(timeout=15)  # fails the module if a worker outlives the server


@pytest.fixture(scope="module")
def deployed(cli_server: Server) -> Server:
    path = cli_server.data_dir.parent / "cli_app.py"
    path.write_text(textwrap.dedent(SOURCE))
    proc = ember(cli_server, "deploy", str(path))
    assert proc.returncode == 0, proc.stderr
    return cli_server


def ember(
    server: Server | None,
    *args: str,
    env: dict[str, str] | None = None,
    token: str | None = "env",
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `ember ARGS...` with EMBER_URL and EMBER_TOKEN (or EMBER_DATA_DIR) pointing at `server`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    full["COLUMNS"] = "200"  # no wrapping of long lines by Rich
    if server is not None:
        full["EMBER_URL"] = server.url
        if token == "env":
            full["EMBER_TOKEN"] = server.token
        elif token == "file":
            full["EMBER_DATA_DIR"] = str(server.data_dir)
        elif token is not None:
            full["EMBER_TOKEN"] = token
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parent,
    )


def plain(text: str) -> str:
    """Output without Rich's box drawing and repeated spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


# ----------------------------------------------------------------------------- help


def test_help() -> None:
    proc = ember(None, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout
    assert "EMBER_URL" in plain(proc.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    proc = ember(None, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert command in proc.stdout


def test_no_arguments_shows_help() -> None:
    proc = ember(None)
    assert "Usage" in proc.stdout + proc.stderr
    assert "deploy" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- deploy


def test_deploy_prints_app_functions_and_version(cli_server: Server, tmp_path: Path) -> None:
    path = tmp_path / "versions_app.py"
    path.write_text(
        textwrap.dedent(
            """
            import ember
            app = ember.App("versions")

            @app.function()
            def one() -> int:
                return 1

            @app.function()
            def two() -> int:
                return 2
            """
        )
    )
    proc = ember(cli_server, "deploy", str(path))
    assert proc.returncode == 0, proc.stderr
    out = plain(proc.stdout)
    assert "versions" in out and "version 1" in out
    assert "one" in out and "two" in out
    assert "ember call versions/one" in out
    proc = ember(cli_server, "deploy", str(path))
    assert "version 2" in plain(proc.stdout)


def test_deploy_errors_say_what_is_wrong(cli_server: Server, tmp_path: Path) -> None:
    proc = ember(cli_server, "deploy", str(tmp_path / "missing.py"))
    assert proc.returncode != 0
    assert "not a Python file" in plain(proc.stderr)

    no_app = tmp_path / "no_app.py"
    no_app.write_text("x = 1\n")
    proc = ember(cli_server, "deploy", str(no_app))
    assert proc.returncode != 0
    assert "ember.App" in plain(proc.stderr)

    broken = tmp_path / "broken.py"
    broken.write_text("import ember\n\nraise ImportError('no such model')\n")
    proc = ember(cli_server, "deploy", str(broken))
    assert proc.returncode != 0
    err = plain(proc.stderr)
    assert "no such model" in err and "line 3" in err
    assert "Traceback" not in err

    bad_spec = tmp_path / "bad_spec.py"
    bad_spec.write_text(
        "import ember\napp = ember.App('bad')\n\n@app.function(max_workers=0)\ndef f(): ...\n"
    )
    proc = ember(cli_server, "deploy", str(bad_spec))
    assert proc.returncode != 0
    assert "max_workers" in plain(proc.stderr)


# ----------------------------------------------------------------------------- call


def test_call_prints_the_output(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/square", "--data", '{"x": 3}')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "9"
    assert "job-" in proc.stderr and "total" in proc.stderr  # timings on stderr

    proc = ember(deployed, "call", "cli/info", "-d", '{"name": "ümlaut", "tags": ["a", "b"]}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"name": "ümlaut", "tags": ["a", "b"]}

    proc = ember(deployed, "call", "cli/Greeter.hello", "--data", '{"who": "cli"}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "hello cli"


def test_call_reads_the_token_file_without_ember_token(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/square", "--data", '{"x": 5}', token="file")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "25"


def test_call_stream_prints_each_value(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/count", "--data", '{"n": 3}', "--stream")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "2"]


def test_call_async_prints_a_job_id_then_job_shows_it(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/square", "--data", '{"x": 4}', "--async")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"job-[0-9a-f]+", job_id), proc.stdout

    proc = ember(deployed, "job", job_id, "--wait")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["id"] == job_id
    assert body["status"] == "COMPLETED"
    assert body["output"] == 16
    assert set(body["timings"]) >= {"queue_ms", "exec_ms", "total_ms"}


def test_cancel(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/sleepy", "--data", '{"s": 60}', "--async")
    job_id = proc.stdout.strip()
    proc = ember(deployed, "cancel", job_id)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{job_id}: CANCELLED"
    body = json.loads(ember(deployed, "job", job_id).stdout)
    assert body["status"] == "CANCELLED"


def test_a_failed_call_exits_non_zero_with_the_error(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/fail")
    assert proc.returncode == 1
    body = json.loads(proc.stdout)
    assert body["status"] == "FAILED"
    assert body["error"]["type"] == "RuntimeError"
    assert body["error"]["message"] == "it broke"


# ----------------------------------------------------------------------------- apps, logs


def test_apps_lists_the_deployed_apps(deployed: Server) -> None:
    proc = ember(deployed, "apps")
    assert proc.returncode == 0, proc.stderr
    out = plain(proc.stdout)
    assert "cli" in out
    assert "square" in out and "Greeter.hello" in out
    assert "team=tools" in out


def test_apps_on_an_empty_server_says_how_to_deploy(make_server: Any) -> None:
    server = make_server()
    proc = ember(server, "apps")
    assert proc.returncode == 0, proc.stderr
    assert "ember deploy" in proc.stdout


def test_logs_show_printed_lines_with_their_job_id(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/square", "--data", '{"x": 12}', "--async")
    job_id = proc.stdout.strip()
    assert json.loads(ember(deployed, "job", job_id, "--wait").stdout)["output"] == 144

    def line() -> str | None:
        out = ember(deployed, "logs", "cli/square").stdout
        return next((ln for ln in out.splitlines() if "squaring 12" in ln), None)

    found = wait_for(line, timeout=20, what="the printed line in `ember logs`")
    assert job_id in found
    proc = ember(deployed, "logs", "cli/square", "--tail", "1")
    assert len(proc.stdout.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("target", ["square", "cli/", "/square", ""])
def test_bad_targets(deployed: Server, target: str) -> None:
    for command in ("call", "logs"):
        proc = ember(deployed, command, target)
        assert proc.returncode != 0
        assert "APP/FUNCTION" in plain(proc.stderr)


def test_unknown_names_list_what_exists(deployed: Server) -> None:
    proc = ember(deployed, "call", "nope/square")
    assert proc.returncode == 1
    err = plain(proc.stderr)
    assert "nope" in err and "cli" in err
    proc = ember(deployed, "call", "cli/nope")
    assert proc.returncode == 1
    assert "square" in plain(proc.stderr)
    proc = ember(deployed, "job", "job-nope")
    assert proc.returncode == 1
    assert "job-nope" in plain(proc.stderr)
    proc = ember(deployed, "cancel", "job-nope")
    assert proc.returncode == 1
    assert "job-nope" in plain(proc.stderr)
    proc = ember(deployed, "logs", "cli/nope")
    assert proc.returncode == 1


@pytest.mark.parametrize("data", ["{x: 1}", "{", "not json", "'{\"x\": 1}'"])
def test_bad_json_data(deployed: Server, data: str) -> None:
    proc = ember(deployed, "call", "cli/square", "--data", data)
    assert proc.returncode != 0
    assert "--data is not valid JSON" in plain(proc.stderr)


def test_input_that_does_not_fit(deployed: Server) -> None:
    proc = ember(deployed, "call", "cli/square", "--data", '{"x": "three"}')
    assert proc.returncode == 1
    assert "'x'" in plain(proc.stderr)
    proc = ember(deployed, "call", "cli/square", "--data", "[1, 2]")
    assert proc.returncode == 1
    assert "object" in plain(proc.stderr)


def test_no_server_running_says_to_start_one() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ["call", "a/b", "--data", "{}"],
        ["apps"],
        ["job", "job-1"],
        ["cancel", "job-1"],
        ["logs", "a/b"],
    ):
        proc = ember(None, *args, env={"EMBER_URL": url, "EMBER_TOKEN": "x"})
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        err = plain(proc.stderr)
        assert url in err and "ember server" in err and "EMBER_URL" in err, err
        assert "Traceback" not in proc.stderr


def test_no_or_wrong_token_says_where_the_token_is(deployed: Server, tmp_path: Path) -> None:
    proc = ember(deployed, "apps", token=None, env={"EMBER_DATA_DIR": str(tmp_path)})
    assert proc.returncode == 1
    err = plain(proc.stderr)
    assert "token" in err and "401" in err
    proc = ember(deployed, "apps", token="wrong")
    assert proc.returncode == 1
    assert "invalid or revoked token" in plain(proc.stderr)
