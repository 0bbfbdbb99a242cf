"""A light HTTP/1.1 load generator: keep-alive connections on asyncio, requests encoded once.

On 2 cores the load generator shares the CPU with the server it measures. A general client
(httpx) spends about as much CPU per call as the server does, so it caps the figure it reports;
this one spends a few tens of microseconds. It speaks just enough HTTP/1.1 for a JSON API
(Content-Length or chunked bodies, keep-alive) and is used the same way for ember and Ray Serve.
Standard library only (uvloop when it is installed), since bench/ray_serve.py runs in a virtualenv
without ember.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

Check = Callable[[int, bytes], None]
"""Raises when an answer (status, body) is not the expected one."""


def request_bytes(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> bytes:
    """One request, encoded; sent as it is on every call."""
    parts = urlsplit(url)
    payload = b"" if body is None else json.dumps(body).encode()
    lines = [
        f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Connection: keep-alive",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        return cls(reader, writer)

    async def call(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked = -1, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if length >= 0:
            return status, await self.reader.readexactly(length)
        if not chunked:
            raise ValueError("an answer with neither Content-Length nor chunked encoding")
        body = bytearray()
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, bytes(body)
            body += chunk[:-2]

    def close(self) -> None:
        self.writer.close()


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run with uvloop where it is installed (as both servers use it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def sequential(url: str, request: bytes, check: Check, n: int, warmup: int) -> list[float]:
    """`n` calls back to back on one connection, after `warmup` untimed ones: latencies (ms)."""

    async def main() -> list[float]:
        conn = await Connection.open(url)
        try:
            for _ in range(warmup):
                check(*await conn.call(request))
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, body = await conn.call(request)
                out.append((time.perf_counter() - t0) * 1000)
                check(status, body)
            return out
        finally:
            conn.close()

    result: list[float] = run(main())
    return result


def closed_loop(
    url: str, request: bytes, check: Check, clients: int, duration: float
) -> tuple[list[float], int, float]:
    """`clients` connections, each calling back to back for `duration` seconds once all are
    open and have made a first call. Latencies (ms), errors, seconds elapsed."""

    async def main() -> tuple[list[float], int, float]:
        conns = [await Connection.open(url) for _ in range(clients)]
        latencies: list[float] = []
        errors = 0
        try:
            for conn in conns:
                check(*await conn.call(request))
            t_start = time.perf_counter()
            stop_at = t_start + duration

            async def loop(conn: Connection) -> None:
                nonlocal errors
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    try:
                        check(*await conn.call(request))
                    except (ValueError, RuntimeError, KeyError):
                        errors += 1
                        continue
                    latencies.append((time.perf_counter() - t0) * 1000)

            await asyncio.gather(*(loop(c) for c in conns))
            return latencies, errors, time.perf_counter() - t_start
        finally:
            for conn in conns:
                conn.close()

    result: tuple[list[float], int, float] = run(main())
    return result


def burst(url: str, requests: list[bytes]) -> tuple[list[tuple[int, bytes]], float]:
    """Each request on a connection of its own, all opened beforehand, then sent at once: the
    answers (status, body) in order, and seconds from the send to the last answer."""

    async def main() -> tuple[list[tuple[int, bytes]], float]:
        conns = await asyncio.gather(*(Connection.open(url) for _ in requests))
        try:
            t0 = time.perf_counter()
            answers = await asyncio.gather(
                *(c.call(r) for c, r in zip(conns, requests, strict=True))
            )
            return list(answers), time.perf_counter() - t0
        finally:
            for conn in conns:
                conn.close()

    result: tuple[list[tuple[int, bytes]], float] = run(main())
    return result
