"""A worker whose function has secrets sends none of their values to the server.

Real worker and template processes (`python -m ember.worker`, `python -m ember.worker.template`)
against a minimal control socket in the test, which speaks the worker protocol: the server side
that hands secrets to workers is tested elsewhere; here, only what leaves the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import pid_alive
from ember.worker import protocol

TOKEN = "hf_s3cr3tTOKENvalue"
PEM = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\n-----END KEY-----"

SOURCE = """
import os
import ember

app = ember.App("sec")
# user code may take a secret out of the environment once read: it is still hidden
TOKEN = os.environ.pop("HF_TOKEN")
PEM = os.environ["PEM"]
if os.environ.get("FAIL_AT_IMPORT"):
    raise RuntimeError(f"cannot log in with {TOKEN!r}")


@app.function()
def leak(mode: str = "return"):
    print(f"logging in with {TOKEN}")
    print(PEM)
    if mode == "raise":
        raise ValueError(f"rejected token {TOKEN}")
    if mode == "unserialisable":
        return {TOKEN}
    return {"token": TOKEN, TOKEN: [f"Bearer {TOKEN}", 1, None], "public": "hello"}


@app.function()
def stream():
    yield f"first {TOKEN}"
    yield {"k": [TOKEN]}
    yield {TOKEN}  # not JSON: sent as its repr
"""


def secret_env() -> dict[str, str]:
    return {"HF_TOKEN": TOKEN, "PEM": PEM, "EMBER_SECRET_KEYS": "HF_TOKEN,PEM"}


def leaks(msgs: list[dict[str, Any]]) -> list[str]:
    """Every secret value or fragment of one found anywhere in what the worker sent."""
    text = json.dumps(msgs, ensure_ascii=False)
    return [s for s in (TOKEN, *PEM.splitlines()) if s in text]


class Control:
    """Just enough of a control plane: accepts worker connections, reads and writes frames."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def start(self) -> str:
        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self.conns.put((r, w))

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.conns.get(), 30)


async def read_until(
    reader: asyncio.StreamReader, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    while True:
        msg = await asyncio.wait_for(protocol.read(reader), 30)
        assert msg is not None, f"the worker hung up after {msgs}"
        msgs.append(msg)
        if done(msg):
            return msgs


def worker_env(tmp_path: Path, control: str, unit: str) -> dict[str, str]:
    return {
        "EMBER_WORKER_ID": f"w-{unit}",
        "EMBER_WORKER_SECRET": "worker-secret",
        "EMBER_CONTROL": control,
        "EMBER_BUNDLE": str(tmp_path / "sec_app.py"),
        "EMBER_APP": "sec",
        "EMBER_UNIT": unit,
        "EMBER_SERVER_PID": str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
    }


async def start_worker(
    tmp_path: Path, control: str, unit: str, extra: dict[str, str]
) -> asyncio.subprocess.Process:
    (tmp_path / "sec_app.py").write_text(textwrap.dedent(SOURCE))
    log = open(tmp_path / f"{unit}.log", "ab")  # noqa: SIM115
    env = {**os.environ, **worker_env(tmp_path, control, unit), **extra}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ember.worker", env=env, cwd=tmp_path, stdout=log, stderr=log
    )
    log.close()
    return proc


async def run_jobs(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fn: str, modes: list[str | None]
) -> list[dict[str, Any]]:
    msgs = await read_until(reader, lambda m: m["t"] in ("ready", "fatal"))
    assert msgs[-1]["t"] == "ready", msgs
    for i, mode in enumerate(modes):
        job = {
            "t": "run",
            "job": f"j{i}",
            "fn": fn,
            "input": {} if mode is None else {"mode": mode},
        }
        writer.write(protocol.encode(job))
        msgs += await read_until(reader, lambda m, i=i: m["t"] == "result" and m["job"] == f"j{i}")
    return msgs


async def stop(proc: asyncio.subprocess.Process, writer: asyncio.StreamWriter) -> None:
    writer.close()  # the server is gone: the worker exits at once
    await asyncio.wait_for(proc.wait(), 30)


def log_lines(msgs: list[dict[str, Any]]) -> list[str]:
    return [line[2] for m in msgs if m["t"] == "log" for line in m["lines"]]


def test_logs_results_and_errors_of_a_function_with_secrets_are_redacted(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        control = Control()
        proc = await start_worker(tmp_path, await control.start(), "leak", secret_env())
        reader, writer = await control.accept()
        try:
            return await run_jobs(reader, writer, "leak", ["return", "raise", "unserialisable"])
        finally:
            await stop(proc, writer)

    msgs = asyncio.run(main())
    assert leaks(msgs) == []
    results = {m["job"]: m for m in msgs if m["t"] == "result"}
    assert results["j0"]["ok"] and results["j0"]["output"] == {
        "token": "[secret]",
        "[secret]": ["Bearer [secret]", 1, None],
        "public": "hello",
    }
    error = results["j1"]["error"]
    assert error["type"] == "ValueError" and error["message"] == "rejected token [secret]"
    assert 'raise ValueError(f"rejected token {TOKEN}")' in error["traceback"]
    assert "ValueError: rejected token [secret]" in error["traceback"]
    assert not results["j2"]["ok"] and results["j2"]["error"]["type"] == "TypeError"
    lines = log_lines(msgs)
    assert lines.count("logging in with [secret]") == 3
    assert lines.count("[secret]") == 3 * 3  # the PEM, line by line
    # the server's own secret for the worker is not a user secret: it is not touched
    assert msgs[0]["t"] == "hello" and msgs[0]["secret"] == "worker-secret"


def test_streamed_outputs_are_redacted(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        control = Control()
        proc = await start_worker(tmp_path, await control.start(), "stream", secret_env())
        reader, writer = await control.accept()
        try:
            return await run_jobs(reader, writer, "stream", [None])
        finally:
            await stop(proc, writer)

    msgs = asyncio.run(main())
    assert leaks(msgs) == []
    outputs = [m["value"] for m in msgs if m["t"] == "output"]
    assert outputs == ["first [secret]", {"k": ["[secret]"]}, "{'[secret]'}"]


def test_a_startup_failure_is_redacted(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        control = Control()
        env = {**secret_env(), "FAIL_AT_IMPORT": "1"}
        proc = await start_worker(tmp_path, await control.start(), "leak", env)
        reader, writer = await control.accept()
        try:
            return await read_until(reader, lambda m: m["t"] in ("ready", "fatal"))
        finally:
            await stop(proc, writer)

    msgs = asyncio.run(main())
    assert msgs[-1]["t"] == "fatal"
    assert msgs[-1]["error"]["message"] == "cannot log in with '[secret]'"
    assert leaks(msgs) == []


def test_without_secrets_nothing_is_redacted(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        control = Control()
        env = {"HF_TOKEN": TOKEN, "PEM": PEM}  # in the env, but not named as secrets
        proc = await start_worker(tmp_path, await control.start(), "leak", env)
        reader, writer = await control.accept()
        try:
            return await run_jobs(reader, writer, "leak", ["return"])
        finally:
            await stop(proc, writer)

    msgs = asyncio.run(main())
    result = next(m for m in msgs if m["t"] == "result")
    assert result["output"]["token"] == TOKEN
    assert f"logging in with {TOKEN}" in log_lines(msgs)


async def stop_fork(pid: int, writer: asyncio.StreamWriter) -> None:
    writer.close()  # the server is gone: the forked worker exits at once
    for _ in range(300):
        if not pid_alive(pid):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the forked worker {pid} did not exit")


def template_env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    (tmp_path / "sec_app.py").write_text(textwrap.dedent(SOURCE))
    return {
        **os.environ,
        "EMBER_BUNDLE": str(tmp_path / "sec_app.py"),
        "EMBER_APP": "sec",
        "EMBER_UNIT": "leak",
        "EMBER_TEMPLATE": "1",
        "EMBER_SERVER_PID": str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


async def start_template(tmp_path: Path, extra: dict[str, str]) -> Template:
    """A template process as the server starts one: fork requests on a Unix socket as its
    stdin, its messages on stdout, its raw log as stderr."""
    ours, theirs = socket.socketpair()
    with open(tmp_path / "template.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ember.worker.template",
            stdin=theirs.fileno(),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=template_env(tmp_path, extra),
            cwd=tmp_path,
        )
    theirs.close()
    return Template(proc, ours)


@dataclass
class Template:
    proc: asyncio.subprocess.Process
    requests: socket.socket

    async def message(self, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The next message of `kind`, and the `log` messages before it."""
        assert self.proc.stdout is not None
        logs = []
        while True:
            msg = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 30))
            if msg["t"] == kind:
                return msg, logs
            assert msg["t"] == "log", msg
            logs.append(msg)


def test_a_template_that_fails_reports_and_logs_no_secret(tmp_path: Path) -> None:
    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        template = await start_template(tmp_path, {**secret_env(), "FAIL_AT_IMPORT": "1"})
        got = await template.message("failed")
        await asyncio.wait_for(template.proc.wait(), 30)
        return got

    msg, logs = asyncio.run(main())
    traceback = msg.pop("traceback")  # what a waiting deploy shows: redacted as well
    assert msg == {"t": "failed", "error": "RuntimeError: cannot log in with '[secret]'"}
    assert "RuntimeError: cannot log in with '[secret]'" in traceback
    assert TOKEN not in traceback
    log = (tmp_path / "template.log").read_text()
    assert "RuntimeError: cannot log in with '[secret]'" in log
    assert TOKEN not in log
    served = [line[2] for m in logs for line in m["lines"]]  # what `ember logs` shows
    assert "RuntimeError: cannot log in with '[secret]'" in served
    assert TOKEN not in json.dumps(logs)


def test_a_worker_forked_from_a_template_redacts_too(tmp_path: Path) -> None:
    """The template popped HF_TOKEN at import; its fork still hides it."""

    async def main() -> list[dict[str, Any]]:
        control = Control()
        address = await control.start()
        template = await start_template(tmp_path, secret_env())
        proc = template.proc
        try:
            await template.message("ready")
            env = worker_env(tmp_path, address, "leak")
            secret = env.pop("EMBER_WORKER_SECRET")
            request = {"worker": "w-leak", "secret": secret, "env": env}
            fd = os.open(tmp_path / "fork.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            socket.send_fds(template.requests, [json.dumps(request).encode() + b"\n"], [fd])
            os.close(fd)
            forked, _ = await template.message("forked")
            reader, writer = await control.accept()
            msgs = await run_jobs(reader, writer, "leak", ["return", "raise"])
            await stop_fork(forked["pid"], writer)
            return msgs
        finally:
            template.requests.close()  # the server is gone: the template exits
            await asyncio.wait_for(proc.wait(), 30)

    msgs = asyncio.run(main())
    assert leaks(msgs) == []
    results = {m["job"]: m for m in msgs if m["t"] == "result"}
    assert results["j0"]["output"]["token"] == "[secret]"
    assert results["j1"]["error"]["message"] == "rejected token [secret]"
    assert "logging in with [secret]" in log_lines(msgs)
