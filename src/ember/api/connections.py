"""HTTP connections that cannot starve the API: a deadline for each request head, and a cap.

uvicorn, left alone, gives a connection that connects and sends nothing, or trickles a request
head one byte at a time, all the time it wants: each holds a file descriptor, and past the
process's fd limit `accept()` fails for everyone, health checks and calls included. This module
is uvicorn's httptools protocol with two additions:

- a **head deadline**: a connection must send a complete request head within `header_timeout`
  seconds of opening, or of its previous response ending, or it is closed (over TLS the
  handshake counts against the same deadline);
- a **cap**: at most `max_connections` open at once, derived from the fd soft limit
  (`core.connections.connection_cap`); a newcomer at the cap closes the connections idle
  longest (`core.connections.admit` decides), so idle sockets give way to a health check. A
  request in flight, or a response still being delivered, is never cut; when every connection
  has one, the newcomer gets a 503 and is closed.

It also answers the requests a **direct handler** takes (`api/invoke.py`: plain calls) without
uvicorn's ASGI cycle: no task, no ASGI messages, no middleware per call, and the response written
in one piece. Whatever the handler does not take, or gives back once it has the body, goes to the
ASGI app as usual; pipelining, keep-alive, shutdown and disconnects behave as for the ASGI path.

Deadlines are kept by one sweep over the open connections every quarter deadline (at most a
second), not by a timer per request. Idle keep-alive connections are also closed by uvicorn
itself after `keep_alive` seconds.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import itertools
import logging
import resource
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from ember.core.connections import (
    ConnectionState,
    admit,
    connection_cap,
    expired,
    sweep_interval,
)

log = logging.getLogger("ember.connections")

HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send a complete request head (`--header-timeout`)."""

KEEP_ALIVE = 5
"""Seconds an idle keep-alive connection stays open between requests (uvicorn's default)."""

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_REFUSED_BODY = (
    b'{"error":{"code":"too_many_connections","message":"every connection the server can hold '
    b'has a request in flight; retry in a moment"}}'
)


Reply = Callable[[Response], None]
"""Writes a direct request's response (a plain Response: status, raw headers, body)."""


class DirectHandler(Protocol):
    """Requests answered straight from the protocol, without the ASGI app."""

    def take(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Any | None:
        """What the request asks, when this handler may answer it; None: the ASGI app does."""

    def answer(self, taken: Any, body: bytes, reply: Reply) -> bool:
        """Answer the request, now or later, through `reply` (exactly once); False, having done
        nothing, to hand the request to the ASGI app after all."""


class _Event:
    """What uvicorn sets on a cycle when the connection drops; a direct request needs no event."""

    def set(self) -> None:
        pass


class DirectCycle:
    """A request the direct handler took: its body, then its answer. It has what uvicorn's
    protocol reads of a cycle (`response_complete`, `keep_alive`, `disconnected`,
    `message_event`), so pipelining, shutdown and a lost connection work as for a
    RequestResponseCycle."""

    __slots__ = ("body", "disconnected", "keep_alive", "pending", "response_complete", "taken")
    message_event = _Event()

    def __init__(self, taken: Any, keep_alive: bool) -> None:
        self.taken = taken
        self.body = bytearray()
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.pending: Pending | None = None


class Pending:
    """A direct request waiting for its answer, in uvicorn's set of tasks meanwhile: a graceful
    shutdown waits for it as for a task, and past its timeout cancels it, answered as uvicorn
    answers a cancelled task (a plain 500, the connection closed)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: HttpToolsProtocol) -> None:
        self.protocol = protocol

    def cancel(self, msg: Any = None) -> bool:
        p = self.protocol
        cycle = p.cycle
        if isinstance(cycle, DirectCycle) and not cycle.response_complete:
            cycle.keep_alive = False
            write_response(p, cycle, _plain_500())
        return True


def _plain_500() -> Response:
    return Response(
        b"Internal Server Error",
        500,
        headers={"connection": "close"},
        media_type="text/plain; charset=utf-8",
    )


def write_response(p: HttpToolsProtocol, cycle: DirectCycle, response: Response) -> None:
    """Write `response` as uvicorn writes an ASGI app's (its default headers first, then the
    response's, `connection: close` when the connection ends), in one write; then end the
    request as uvicorn does."""
    if cycle.response_complete:
        return
    cycle.response_complete = True
    if cycle.pending is not None:
        p.tasks.discard(cycle.pending)
        cycle.pending = None
    if cycle.disconnected or p.transport.is_closing():
        return
    content: list[bytes | memoryview] = [STATUS_LINE[response.status_code]]
    for name, value in p.server_state.default_headers:
        content.extend((name, b": ", value, b"\r\n"))
    keep_alive, has_close = cycle.keep_alive, False
    for name, value in response.raw_headers:
        name = name.lower()
        if name == b"connection" and b"close" in value.lower():
            keep_alive, has_close = False, True
        content.extend((name, b": ", value, b"\r\n"))
    if not keep_alive and not has_close:
        content.append(b"connection: close\r\n")
    content.append(b"\r\n")
    content.append(response.body)
    p.transport.write(b"".join(content))
    if not keep_alive:
        p.transport.close()
    p.on_response_complete()


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits of the HTTP port, as `ember server` prints them at start."""

    max_connections: int
    header_timeout: float = HEADER_TIMEOUT
    keep_alive: int = KEEP_ALIVE
    fd_limit: int = 0
    """The fd soft limit the cap was derived from (0: given explicitly)."""

    def describe(self) -> str:
        source = f" (fd limit {self.fd_limit})" if self.fd_limit else ""
        return (
            f"connections: at most {self.max_connections} open{source}, a request head within "
            f"{self.header_timeout:g} s, idle keep-alive closed after {self.keep_alive} s"
        )


def limits(
    max_connections: int | None = None, header_timeout: float = HEADER_TIMEOUT
) -> ConnectionLimits:
    """The limits for this process: `max_connections` if given (and above 0), else derived from
    the fd soft limit, which is read here (the one piece of I/O)."""
    if header_timeout <= 0:
        raise ValueError(f"--header-timeout must be above 0 seconds, not {header_timeout:g}")
    if max_connections is not None and max_connections > 0:
        return ConnectionLimits(max_connections, header_timeout)
    if max_connections is not None and max_connections < 0:
        raise ValueError(f"--max-connections must be 0 (derive it) or above, not {max_connections}")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return ConnectionLimits(connection_cap(soft), header_timeout, fd_limit=soft)


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol of `loop`'s own kind: uvloop's for uvloop, asyncio's otherwise."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        return getattr(uvloop.loop, "SSLProtocol")  # noqa: B009 (not in uvloop's stubs)
    return getattr(asyncio.sslproto, "SSLProtocol")  # noqa: B009 (not in typeshed's)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side TLS context, as uvicorn would build it from --tls-cert and --tls-key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def http_protocol(
    lim: ConnectionLimits,
    tls: ssl.SSLContext | None = None,
    direct: DirectHandler | None = None,
) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` that enforces `lim`. With `tls`, give
    uvicorn no certificate: this protocol does the handshake itself, under the head deadline
    and inside the cap (uvicorn's own TLS would hide a handshaking socket from both). With
    `direct`, the requests it takes are answered without the ASGI app."""
    registry: dict[int, GuardedProtocol] = {}
    ids = itertools.count()
    refusals = itertools.count(1)
    sweeping: list[asyncio.TimerHandle] = []  # the pending sweep, if one is

    def sweep() -> None:
        """Close the connections past their head deadline; again while any is open."""
        sweeping.clear()
        if not registry:
            return
        loop = next(iter(registry.values())).loop
        for late in expired(
            [c.state() for c in registry.values()], loop.time(), lim.header_timeout
        ):
            registry[late].evict()
        if registry:
            sweeping.append(loop.call_later(sweep_interval(lim.header_timeout), sweep))

    def refused(open_now: int) -> None:
        n = next(refusals)
        if n == 1 or n % 100 == 0:  # a flood of refusals must not become a flood of log lines
            log.warning(
                "HTTP connections refused so far: %d (all %d open have a request in flight)",
                n,
                open_now,
            )

    class GuardedProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._id = next(ids)
            self._busy = False
            self._idle_since = 0.0
            self._raw: asyncio.Transport | None = None
            self._live = False  # registered, not yet lost

        # ------------------------------------------------------------- open and close
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if self._raw is not None:  # the second call: the TLS handshake is done
                if self._live:
                    super().connection_made(transport)
                else:
                    transport.close()
                return
            self._raw = transport
            if len(registry) >= lim.max_connections:  # below the cap there is nothing to decide
                verdict = admit([c.state() for c in registry.values()], lim.max_connections)
                for victim in verdict.evict:
                    registry[victim].evict()
                if verdict.refuse:
                    refused(len(registry))
                    if tls is None:
                        transport.write(_REFUSED % (len(_REFUSED_BODY), _REFUSED_BODY))
                    transport.close()
                    return
            registry[self._id] = self
            self._live = True
            self._became_idle()
            if not sweeping:
                sweeping.append(self.loop.call_later(sweep_interval(lim.header_timeout), sweep))
            if tls is None:
                super().connection_made(transport)
            else:
                self._start_tls(transport, tls)

        def _start_tls(self, raw: asyncio.Transport, ctx: ssl.SSLContext) -> None:
            """Put a TLS layer between `raw` and this protocol now, before the loop reads from
            it (`loop.start_tls` would do it a loop turn later, after the first bytes came in);
            it calls `connection_made` again once the handshake is done."""
            waiter = self.loop.create_future()
            waiter.add_done_callback(self._handshake_done)
            layer = _ssl_protocol(self.loop)(
                self.loop,
                self,
                ctx,
                waiter,
                server_side=True,
                call_connection_made=True,
                ssl_handshake_timeout=lim.header_timeout,
            )
            raw.set_protocol(layer)
            layer.connection_made(raw)

        def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
            if waiter.cancelled() or waiter.exception() is not None:  # the client went, or no TLS
                self._forget()
                self._close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._forget()
            if self.transport is not None:  # the HTTP side was set up
                super().connection_lost(exc)

        def _forget(self) -> None:
            self._live = False
            registry.pop(self._id, None)

        def evict(self) -> None:
            """Close now: it has no request in flight, and is past its deadline or makes room."""
            self._forget()
            self._close()

        def _close(self) -> None:
            if self._raw is None or self._raw.is_closing():
                return
            if tls is None:
                self._raw.close()  # nothing unsent (or it would be in flight): closes at once
            else:
                self._raw.abort()  # no TLS goodbye to wait up to 30 s for, holding the fd

        # ------------------------------------------------------------- the request cycle
        def state(self) -> ConnectionState:
            # a response still being delivered (bytes not yet sent) is in flight too
            unsent = self._raw is not None and self._raw.get_write_buffer_size() > 0
            return ConnectionState(self._id, self._busy or unsent, self._idle_since)

        def _should_upgrade_to_ws(self) -> bool:
            # ember serves no WebSockets: an upgrade is answered as plain HTTP, on this
            # connection, under its cap and deadlines (a WebSocket protocol taking the socket
            # over would leave it counted as in flight here for good)
            return False

        def _unsupported_upgrade_warning(self) -> None:
            pass  # a log line per request that asks for an upgrade would be a flood of its own

        def on_headers_complete(self) -> None:
            self._busy = True
            if direct is None or not self._take_direct(direct):
                super().on_headers_complete()

        def _take_direct(self, handler: DirectHandler) -> bool:
            """Fill in the scope as uvicorn does and, when `handler` takes the request, make it
            a DirectCycle. Never for a pipelined request, an upgrade, or `Expect: 100-continue`."""
            existing = self.cycle
            if (existing is not None and not existing.response_complete) or (
                self.expect_100_continue or self.limit_concurrency is not None
            ):
                return False
            parser = self.parser
            if parser.should_upgrade():
                return False
            http_version = parser.get_http_version()
            method = parser.get_method().decode("ascii")
            parsed = httptools.parse_url(self.url)
            raw_path = parsed.path
            path = raw_path.decode("ascii")
            if "%" in path:
                path = urllib.parse.unquote(path)
            query = parsed.query or b""
            taken = handler.take(method, self.root_path + path, query, self.headers)
            if taken is None:
                return False
            scope = self.scope
            scope["method"] = method
            if http_version != "1.1":
                scope["http_version"] = http_version
            scope["path"] = self.root_path + path
            scope["raw_path"] = self.root_path.encode("ascii") + raw_path
            scope["query_string"] = query
            keep_alive = http_version != "1.0" and parser.should_keep_alive()
            self.cycle = DirectCycle(taken, keep_alive)  # type: ignore[assignment]
            return True

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if isinstance(cycle, DirectCycle):
                cycle.body += body
            else:
                super().on_body(body)

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if not isinstance(cycle, DirectCycle):
                super().on_message_complete()
                return
            assert direct is not None
            body = bytes(cycle.body)
            cycle.pending = Pending(self)
            self.tasks.add(cycle.pending)
            if not direct.answer(cycle.taken, body, lambda r: write_response(self, cycle, r)):
                self.tasks.discard(cycle.pending)
                self._to_asgi(cycle, body)

        def _to_asgi(self, direct_cycle: DirectCycle, body: bytes) -> None:
            """Hand a direct request, its body read, to the ASGI app, as uvicorn would have."""
            cycle = RequestResponseCycle(
                scope=self.scope,
                transport=self.transport,
                flow=self.flow,
                logger=self.logger,
                access_logger=self.access_logger,
                access_log=self.access_log,
                default_headers=self.server_state.default_headers,
                message_event=asyncio.Event(),
                expect_100_continue=False,
                keep_alive=direct_cycle.keep_alive,
                on_response=self.on_response_complete,
            )
            cycle.body = bytearray(body)
            cycle.more_body = False
            cycle.message_event.set()
            self.cycle = cycle
            self._start_asgi_task(cycle, self.app)

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)
            super().on_response_complete()
            if pipelined:
                return  # the next pipelined request is already running
            if self._live and not self.transport.is_closing():
                self._became_idle()

        def _became_idle(self) -> None:
            self._busy = False
            self._idle_since = self.loop.time()

    return GuardedProtocol
