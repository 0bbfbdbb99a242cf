"""The relay floor: the least any server-plus-worker design costs per call on this machine.

A bare ASGI app under uvicorn, with the settings ember's server uses (loop and http "auto", so
uvloop and httptools where installed; access log off), that hands each request body to a second
process over one persistent TCP connection, framed as ember frames its worker messages (a 4-byte
length, then JSON), and answers with that process's reply, as JSON. The second process (a plain
blocking socket loop) answers each frame with a small result shaped like ember's. Nothing else:
no routing, no auth, no job record, no store. Both hops are real: HTTP in, a socket to another
process and back, HTTP out.

    .venv/bin/python bench/relay.py --port 8123      # POST anything to any path

`bench/core.py` starts it beside ember's server and measures both with the same clients in the
same run. Standard library, uvicorn and (where installed) uvloop only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
from typing import Any

_HEADER = struct.Struct("!I")
READY = "relay ready"


def backend(port: int) -> None:
    """The second process: connect to the relay and answer each frame, one at a time."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = sock.makefile("rb")
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    while True:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            os._exit(0)  # the relay is gone
        (size,) = _HEADER.unpack(header)
        msg = json.loads(stream.read(size))
        result = {"t": "result", "job": msg["job"], "exec_ms": 0.001, "ok": True, "output": None}
        reply = dumps(result).encode()
        sock.sendall(_HEADER.pack(len(reply)) + reply)


class Relay:
    """The ASGI app: one connection to the backend, replies matched to requests by a number."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0
        self.writer: asyncio.StreamWriter | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writer = writer
            connected.set_result(None)
            while True:
                try:
                    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                    msg = json.loads(await reader.readexactly(size))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                fut = self.waiting.pop(msg["job"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, __file__, "--backend", str(port)])
        await connected

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await self.start()
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if self.proc is not None:
                        self.proc.kill()
                        self.proc.wait()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        job = self.next_id = self.next_id + 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[job] = fut
        frame = b'{"t":"run","job":%d,"input":%s}' % (job, body or b"{}")
        assert self.writer is not None
        self.writer.write(_HEADER.pack(len(frame)) + frame)
        result = await fut
        answer = json.dumps(
            {"id": job, "status": "COMPLETED", "output": result["output"]}, separators=(",", ":")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend is not None:
        backend(args.backend)
        return
    import uvicorn

    config = uvicorn.Config(
        Relay(),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    print(READY, flush=True)  # the port is bound once uvicorn answers; core.py polls it
    server.run()


if __name__ == "__main__":
    main()
