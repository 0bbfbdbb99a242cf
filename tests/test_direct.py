"""Calls the HTTP protocol answers itself (`DirectCalls`, `api/connections.py`), byte for byte on
a raw socket: the same headers as the ASGI path, pipelined requests in order, HTTP/1.0, a wait
that ends before the job, a client gone before its answer, and a graceful stop that waits."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server
from ember.testing import wait_for

SOURCE = """
import time

import ember

app = ember.App("direct")


@app.function(concurrency=4)
def square(x: int) -> int:
    return x * x


@app.function(concurrency=4)
def slow(s: float) -> str:
    time.sleep(s)  # sleep-ok: the deployed function is meant to take this long
    return "slept"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("direct") / "data").start()
    s.deploy(SOURCE, filename="direct_app.py")
    yield s
    s.shutdown(timeout=15)
    assert "unhandled error" not in s.log()


def request(server: Server, path: str, body: dict[str, object], version: str = "1.1") -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode() + raw


class Reader:
    """HTTP/1.1 responses read one by one off a raw socket (by Content-Length)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers["content-length"])
        while len(self.buf) < size:
            self._more()
        body, self.buf = self.buf[:size], self.buf[size:]
        return status, headers, body

    def closed(self) -> bool:
        """The server closed the connection (nothing more to read)."""
        self.sock.settimeout(10)
        return self.sock.recv(1) == b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.buf += chunk


def connect(server: Server) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock, Reader(sock)


def test_a_direct_answer_has_the_headers_of_the_asgi_path(server: Server) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(request(server, "/v1/apps/direct/square/runsync", {"input": {"x": 3}}))
        status, direct, body = reader.response()
        assert status == 200 and json.loads(body)["output"] == 9
        # one parameter more: FastAPI's route answers it
        sock.sendall(
            request(server, "/v1/apps/direct/square/runsync?via=asgi", {"input": {"x": 3}})
        )
        status, routed, body = reader.response()
        assert status == 200 and json.loads(body)["output"] == 9
    assert list(direct) == list(routed)
    assert {k: v for k, v in direct.items() if k not in ("date", "content-length")} == {
        k: v for k, v in routed.items() if k not in ("date", "content-length")
    }


def test_pipelined_calls_are_answered_in_order(server: Server) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(
            request(server, "/v1/apps/direct/slow/runsync", {"input": {"s": 0.2}})
            + request(server, "/v1/apps/direct/square/runsync", {"input": {"x": 5}})
            + request(server, "/v1/apps/direct/square/run", {"input": {"x": 6}})
            + request(server, "/v1/apps/direct/square/runsync", {"input": {"x": 7}})
        )
        answers = [reader.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 202, 200]
    outputs = [json.loads(body).get("output") for _, _, body in answers]
    assert outputs == ["slept", 25, None, 49]


def test_an_http_1_0_call_is_answered_then_closed(server: Server) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(
            request(server, "/v1/apps/direct/square/runsync", {"input": {"x": 2}}, version="1.0")
        )
        status, headers, body = reader.response()
        assert status == 200 and json.loads(body)["output"] == 4
        assert headers["connection"] == "close"
        assert reader.closed()


def test_a_wait_that_ends_first_answers_202_with_a_durable_job(server: Server) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(request(server, "/v1/apps/direct/slow/runsync?wait=0.1", {"input": {"s": 1}}))
        status, _, body = reader.response()
        job = json.loads(body)
        assert status == 202 and job["status"] in ("IN_QUEUE", "IN_PROGRESS")
        # the connection serves the next call as usual
        sock.sendall(request(server, "/v1/apps/direct/square/runsync", {"input": {"x": 8}}))
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["output"] == 64
    done = wait_for(
        lambda: (
            r.json()
            if (r := server.http("GET", f"/v1/jobs/{job['id']}")).json()["status"] == "COMPLETED"
            else None
        ),
        timeout=30,
        what="the job answered 202 to end",
    )
    assert done["output"] == "slept"


def test_a_caller_gone_before_its_answer_leaves_the_job_running_and_the_server_well(
    server: Server,
) -> None:
    before = server.http("GET", "/v1/apps/direct/slow/health").json()
    sock, _ = connect(server)
    sock.sendall(request(server, "/v1/apps/direct/slow/runsync", {"input": {"s": 0.3}}))
    time.sleep(0.05)  # sleep-ok: the request must have reached the server before the close
    sock.close()
    wait_for(
        lambda: (
            server.http("GET", "/v1/apps/direct/slow/health").json()["jobs"]["completed"]
            > before["jobs"]["completed"]
        ),
        timeout=30,
        what="the abandoned call's job to complete",
    )
    resp = server.http("POST", "/v1/apps/direct/square/runsync", json={"input": {"x": 9}})
    assert resp.status_code == 200 and resp.json()["output"] == 81


def test_a_graceful_stop_answers_a_call_in_flight_first(tmp_path: Path) -> None:
    s = Server(tmp_path / "data").start()
    try:
        s.deploy(SOURCE, filename="direct_app.py")
        sock, reader = connect(s)
        with sock:
            sock.sendall(request(s, "/v1/apps/direct/slow/runsync", {"input": {"s": 1}}))
            wait_for(
                lambda: s.http("GET", "/v1/apps/direct/slow/health").json()["jobs"]["in_progress"],
                timeout=30,
                what="the call's job to start",
            )
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
            status, headers, body = reader.response()
            assert status == 200 and json.loads(body)["output"] == "slept"
            assert headers["connection"] == "close"
        assert s.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        s.shutdown(timeout=15)
