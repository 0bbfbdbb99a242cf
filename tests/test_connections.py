"""Idle and slow connections cannot starve the API: a real server under `ulimit -n 1024`, flooded
with idle sockets on its HTTP port and its control port, still answers health checks and calls;
a silent or trickling connection is closed at its deadline; a request in flight is never cut."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server
from test_audit import TlsServer, self_signed

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fd limits and /proc: Linux")

FD_LIMIT = 1024
FLOOD = 1010

SLOW = """
import time
import ember

app = ember.App("conn")

@app.function()
def square(x: int) -> int:
    return x * x

@app.function(max_workers=4)
def slow(seconds: float) -> str:
    time.sleep(seconds)  # sleep-ok: the function's own work
    return "done"

@app.function()
def big(mib: int) -> str:
    return "x" * (mib << 20)
"""


class LimitedServer(Server):
    """A server whose fd limit (soft and hard) is FD_LIMIT, as under `ulimit -n 1024`."""

    def command(self) -> list[str]:
        lower = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        return [sys.executable, "-c", lower, *super().command()[1:]]


@pytest.fixture(scope="module", autouse=True)
def many_fds() -> None:
    """The attacker (this test) needs more descriptors than the server it floods."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * FLOOD + 200
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the fd hard limit ({hard}) is under the {want} this test needs")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(*args: str, kind: type[Server] = LimitedServer, **kw: Any) -> Server:
        server = kind(tmp_path / f"data{len(servers)}", list(args), **kw)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.shutdown(timeout=15)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for s in held:
        s.close()


def open_idle(port: int, n: int, held: list[socket.socket]) -> None:
    """Connect `n` sockets that send nothing; kept in `held`."""
    for _ in range(n):
        held.append(socket.create_connection(("127.0.0.1", port)))


def closed_by_peer(s: socket.socket) -> bool:
    """True once the other side has closed `s` (EOF or a reset), without waiting: a socket with
    a timeout would wait in recv() for that long, whatever the flags."""
    poll = select.poll()  # not select(): these fds are past 1024
    poll.register(s, select.POLLIN)
    if not poll.poll(0):
        return False
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except ConnectionError:
        return True


def wait_closed(s: socket.socket, timeout: float) -> float:
    """Seconds until the server closes `s` (fails after `timeout`)."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"the server kept a connection open for over {timeout} s")
    except ConnectionError:
        pass
    return time.monotonic() - t0


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = fd.readlink().name
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on, from /proc (its socket inodes, /proc/net/tcp)."""
    inodes, ports = socket_inodes(pid), set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_unix(pid: int) -> set[str]:
    """Paths of the Unix sockets process `pid` listens on (/proc/net/unix)."""
    inodes, paths = socket_inodes(pid), set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
            paths.add(fields[7])  # flag __SO_ACCEPTCON: a listening socket
    return paths


def open_idle_unix(path: str, n: int, held: list[socket.socket]) -> None:
    """As `open_idle`, on a Unix socket (whose connect fails at once while its backlog is full,
    where TCP's waits: so wait here)."""
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(s)
        deadline = time.monotonic() + 10
        while True:
            try:
                s.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)  # sleep-ok: polling a non-blocking connect, with a deadline


def timed(fn: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = fn()
    return r, time.monotonic() - t0


def test_a_flood_of_idle_http_connections_leaves_health_and_calls_answering(
    start: Callable[..., Server], sockets: list[socket.socket]
) -> None:
    server = start()
    server.deploy(SLOW)
    assert "connections: at most 768 open (fd limit 1024)" in server.log()
    open_idle(server.port, FLOOD, sockets)
    answers_under_flood(server)
    # the idle connections made room: the oldest were closed, the newest are still open
    assert wait_for_count(lambda: sum(map(closed_by_peer, sockets)) >= FLOOD - 768)
    assert not closed_by_peer(sockets[-1])
    assert "Too many open files" not in server.log()


def test_a_flood_on_the_control_channel_too_leaves_health_and_calls_answering(
    start: Callable[..., Server], sockets: list[socket.socket]
) -> None:
    server = start()
    server.deploy(SLOW)
    assert server.function("conn", "square").remote(3) == 9  # a worker connected: control is up
    assert server.proc is not None
    control = listening_ports(server.proc.pid) - {server.port}
    assert len(control) == 1, f"expected one control port beside {server.port}: {control}"
    open_idle(control.pop(), FLOOD, sockets)
    for path in listening_unix(server.proc.pid):  # the control channel's Unix socket, if any
        open_idle_unix(path, FLOOD, sockets)
    open_idle(server.port, FLOOD, sockets)
    answers_under_flood(server)
    assert "Too many open files" not in server.log()


def answers_under_flood(server: Server) -> None:
    """/v1/health and a call (a cold start: a new worker connects to the control channel)."""
    health, took = timed(lambda: server.http("GET", "/v1/health"))
    assert health.status_code == 200 and took < 5, (health.status_code, took)
    call, took = timed(
        lambda: server.http("POST", "/v1/apps/conn/square/runsync", json={"input": {"x": 7}})
    )
    assert call.status_code == 200 and call.json()["output"] == 49, call.text
    assert took < 10, took


def wait_for_count(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # sleep-ok: polling with a deadline
    return True


def test_a_connection_that_sends_nothing_or_trickles_is_closed_at_its_deadline(
    start: Callable[..., Server],
) -> None:
    server = start("--header-timeout", "1")
    assert "a request head within 1 s" in server.log()
    silent = socket.create_connection(("127.0.0.1", server.port))
    assert 0.8 < wait_closed(silent, timeout=5) < 3

    # slowloris: a head one byte at a time, well inside any per-read timeout, never complete
    trickle = socket.create_connection(("127.0.0.1", server.port))
    t0 = time.monotonic()
    with contextlib.suppress(OSError):
        for byte in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            trickle.send(bytes([byte]))
            time.sleep(0.1)  # sleep-ok: the slowloris's pace
    assert time.monotonic() - t0 < 3, "a trickled head outlived its deadline"
    assert wait_closed(trickle, timeout=3) < 3

    # after a response, the next head has the same deadline (keep-alive does not reset it)
    kept = socket.create_connection(("127.0.0.1", server.port))
    kept.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    with contextlib.suppress(OSError):
        for byte in b"GET /v1/health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            kept.send(bytes([byte]))
            time.sleep(0.1)  # sleep-ok: the slowloris's pace
    assert time.monotonic() - t0 < 3, "a trickled second head outlived its deadline"
    # a complete request is served as always
    assert server.http("GET", "/v1/health").status_code == 200


def test_a_request_in_flight_is_never_cut_and_a_full_house_gets_503(
    start: Callable[..., Server], sockets: list[socket.socket]
) -> None:
    server = start("--max-connections", "3", "--header-timeout", "1")
    server.deploy(SLOW)
    assert server.function("conn", "slow").remote(0) == "done"  # warm one worker
    answers: list[httpx.Response] = []

    def call() -> None:
        answers.append(
            server.http("POST", "/v1/apps/conn/slow/runsync", json={"input": {"seconds": 3}})
        )

    calls = [threading.Thread(target=call) for _ in range(3)]
    for t in calls:
        t.start()
    time.sleep(1.0)  # all three are in flight, each on its own connection
    # every connection has a request in flight: a newcomer is turned away, with a reason
    refused = server.http("GET", "/v1/health")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "too_many_connections"
    assert refused.headers["retry-after"] == "1"
    # idle newcomers come and go; the calls in flight outlive the header deadline untouched
    open_idle(server.port, 20, sockets)
    for t in calls:
        t.join(30)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert all(a.json()["output"] == "done" for a in answers)
    # and once they are done, the server is open again
    assert server.http("GET", "/v1/health").status_code == 200


def test_a_response_still_being_read_is_not_cut_by_the_deadline(
    start: Callable[..., Server],
) -> None:
    server = start("--header-timeout", "1")
    server.deploy(SLOW)
    body = b'{"input": {"mib": 16}}'
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: a small window
    s.connect(("127.0.0.1", server.port))
    s.sendall(
        b"POST /v1/apps/conn/big/runsync HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {server.token}\r\n".encode()
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    time.sleep(3)  # three deadlines pass while the 16 MiB answer waits to be read
    received = bytearray()
    s.settimeout(30)
    while b"\r\n\r\n" not in received:
        received += s.recv(65536)
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(
        next(
            v
            for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        )
    )
    received = bytearray(rest)
    while len(received) < length:
        chunk = s.recv(1 << 20)
        assert chunk, f"cut after {len(received)} of {length} bytes"
        received += chunk
    assert len(received) == length > 16 << 20
    # (the next request's head deadline runs from the response's last write, which can be
    # while its last bytes still wait in the kernel's buffers: not asserted here)
    s.close()


def test_a_websocket_upgrade_is_answered_as_plain_http_and_holds_no_slot(
    start: Callable[..., Server], sockets: list[socket.socket]
) -> None:
    server = start("--max-connections", "4")
    for _ in range(8):  # each asks to upgrade, gets its answer, and stays open
        s = socket.create_connection(("127.0.0.1", server.port))
        sockets.append(s)
        s.sendall(
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    # they are idle, so they gave way: a newcomer is served, not turned away
    assert server.http("GET", "/v1/health").status_code == 200
    assert "Unsupported upgrade" not in server.log()


class LimitedTlsServer(LimitedServer, TlsServer):
    """Over TLS, under the same fd limit."""


def test_over_tls_a_socket_that_never_handshakes_counts_and_is_closed(
    start: Callable[..., Server], sockets: list[socket.socket], tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    server = start(
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--header-timeout",
        "1",
        kind=LimitedTlsServer,
    )
    silent = socket.create_connection(("127.0.0.1", server.port))
    assert wait_closed(silent, timeout=5) < 3
    open_idle(server.port, FLOOD, sockets)  # TCP only: not one handshake
    health, took = timed(lambda: server.http("GET", "/v1/health"))
    assert health.status_code == 200 and took < 5, (health.status_code, took)
    # TLS itself still works end to end, and the server speaks TLS only
    ctx = ssl.create_default_context(cafile=str(cert))
    raw = socket.create_connection(("127.0.0.1", server.port))
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/v1/health", timeout=5)


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--header-timeout", "0", "--header-timeout must be above 0 seconds"),
        ("--max-connections", "-1", "--max-connections must be 0 (derive it) or above"),
    ],
)
def test_a_limit_that_cannot_work_is_refused_with_what_to_fix(
    tmp_path: Path, flag: str, value: str, says: str
) -> None:
    command = Server(tmp_path / "data").command()
    proc = subprocess.run(
        [*command, flag, value], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    assert says in proc.stdout + proc.stderr, proc.stdout + proc.stderr
