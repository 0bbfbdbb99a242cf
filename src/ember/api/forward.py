"""On a standby, what only the scheduler can do goes to it: a small reverse proxy.

Several servers on one PostgreSQL store share the work this way (docs/architecture.md, "Several
servers"): each accepts calls into the store and answers for any job from it, and the one that
holds the scheduler lease does the rest (deploys, secrets, policies, tokens, cancels, logs,
workers). A standby forwards those requests as they came, its caller's token included, to the
address the scheduler published with its lease, and streams the answer back; the scheduler
checks the token, as it would for a caller of its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.api.errors import error_response
from ember.api.invoke import call_of

log = logging.getLogger("ember.server")

_JOB = re.compile(r"/v1/jobs/[^/]+")

_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade host content-length".split()
)
"""Headers of one connection, not of the request: the proxy's own connection sets them."""

RETRY_AFTER_S = 1


_PAGES = ("/ui", "/docs", "/redoc", "/openapi.json")


def served_here(method: str, path: str) -> bool:
    """What a standby answers itself: calls (into the store), a job's state, its health, and
    the pages and assets that hold no data (the dashboard's own calls go to the scheduler)."""
    return (
        path == "/v1/health"
        or (method in ("GET", "HEAD") and (path in _PAGES or path.startswith("/ui/")))
        or call_of(method, path, b"") is not None
        or (method == "GET" and _JOB.fullmatch(path) is not None)
    )


class Forward:
    """ASGI middleware: on a standby (`leader()` gives an address), forward what the scheduler
    serves; on the scheduler (`leader()` is None), pass everything through."""

    def __init__(self, app: ASGIApp, leader: Callable[[], str | bool | None]) -> None:
        self.app = app
        self.leader = leader
        """None: this server schedules; an address: the scheduler's; False: nobody leads now."""
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (address := self.leader()) is None:
            await self.app(scope, receive, send)
            return
        if served_here(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        if address is False:
            await _no_leader("no server holds the scheduler lease right now")(scope, receive, send)
            return
        await self._forward(str(address), scope, receive, send)

    async def _forward(self, address: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        while True:  # the payload limit outside bounds it
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", client[0].encode()))
        url = address.rstrip("/") + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(30.0, connect=3.0, read=None), trust_env=False
            )
        request = self._client.build_request(
            scope["method"], url, headers=headers, content=bytes(body)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("forwarding %s %s to %s failed: %s", scope["method"], url, address, exc)
            why = f"the scheduling server ({address}) did not answer; it may be changing"
            await _no_leader(why)(scope, receive, send)
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
            length = response.headers.get("content-length")  # of the raw bytes passed on
            if length is not None:
                out.append((b"content-length", length.encode()))
            start: Message = {"type": "http.response.start", "status": response.status_code}
            await send({**start, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _no_leader(why: str) -> ASGIApp:
    response = error_response(
        503,
        "no_scheduler",
        f"{why}: a standby server cannot do this alone; retry in a few seconds",
    )
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response
