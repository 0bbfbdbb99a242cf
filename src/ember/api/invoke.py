"""Calls (`POST /v1/apps/{app}/{fn}/run` and `/runsync`) served straight from ASGI.

A call is the request ember serves most, and the one whose overhead users measure. FastAPI's
routing, parameter parsing, dependency solving and middleware stack cost more CPU than the rest
of a warm call, so this app, in front of the FastAPI app (only the payload limit is outside it),
answers the plain form of a call itself: the same auth, the same handlers (`routes.queue_job`,
`routes.run_job`) and the same error bodies, an unexpected error included. Anything else, an
unusual query string included, goes on to the FastAPI app, which also documents these endpoints
in OpenAPI; so a request this cannot take whole is answered exactly as before.

`DirectCalls` goes one step further for the commonest call of all: a plain call with a bearer
token that may invoke, whose job is accepted. The HTTP protocol (`api/connections.py`) hands it
the request without an ASGI cycle, and it answers through callbacks (the job's end, the `wait`
timer, the row's commit) instead of a task. Anything else it hands back, having done nothing,
to the ASGI app (and so to `Invoke`): a refused token, a bad body, an unknown function, a full
queue, a spent budget are all answered, and audited, exactly as before.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ember.api import bodies, routes
from ember.api.auth import Auth
from ember.api.auth import Scope as TokenScope
from ember.api.connections import Reply
from ember.api.errors import ApiException, internal_error, render
from ember.control.plane import ControlPlane
from ember.control.records import Job

_CALL = re.compile(r"/v1/apps/([^/]+)/([^/]+)/(run|runsync)")
_WAIT = re.compile(rb"wait=(\d{1,4}(?:\.\d{1,6})?)")


def wait_of(query: bytes) -> float | None:
    """`wait` of a runsync query string, or None when it is anything but absent or a plain
    number in range (FastAPI then parses it, and explains what is wrong)."""
    if not query:
        return routes.RUNSYNC_WAIT
    m = _WAIT.fullmatch(query)
    if m is None:
        return None
    wait = float(m.group(1))
    return wait if wait <= routes.RUNSYNC_MAX_WAIT else None


@dataclass(frozen=True, slots=True)
class Call:
    app: str
    fn: str
    wait: float | None
    """How long a runsync waits for the job; None for a run (answered once the job is queued)."""


def call_of(method: str, path: str, query: bytes) -> Call | None:
    """The call a request makes, when it is one this middleware answers itself."""
    if method != "POST":
        return None
    m = _CALL.fullmatch(path)
    if m is None:
        return None
    app, fn, verb = m.groups()
    if verb == "run":
        return None if query else Call(app, fn, None)
    wait = wait_of(query)
    return None if wait is None else Call(app, fn, wait)


class Invoke:
    """The ASGI app in front of `app` (the FastAPI app): calls here, the rest there."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = (
            call_of(scope["method"], scope["path"], scope["query_string"])
            if scope["type"] == "http"
            else None
        )
        if call is None:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app  # what FastAPI sets: the handlers find the plane through it
        request = Request(scope, receive)
        auth: Auth = self.app.state.auth
        response: Response
        try:
            who = auth.require(request, TokenScope.INVOKE)
            if call.wait is None:
                response = await routes.queue_job(request, who, call.app, call.fn)
            else:
                response = await routes.run_job(request, who, call.app, call.fn, call.wait)
        except ApiException as exc:
            response = render(exc)
        except Exception:  # as FastAPI's handler for Exception (`errors.install`) answers
            response = internal_error()
        await response(scope, receive, send)


_REFUSED = (ApiException, *routes.REFUSALS)
"""What a call can be refused with before its job exists: the ASGI path answers those."""


@dataclass(frozen=True, slots=True)
class Taken:
    call: Call
    authorization: bytes


class DirectCalls:
    """The plain calls the HTTP protocol answers without the ASGI app (`DirectHandler`)."""

    def __init__(self, app: FastAPI, max_payload: int) -> None:
        self.app = app
        self.max_payload = max_payload

    def take(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Taken | None:
        call = call_of(method, path, query)
        if call is None:
            return None
        authorization = length = None
        for name, value in headers:
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding" or name == b"idempotency-key":
                return None  # the ASGI path takes it
        if authorization is None or length is None or not length.isdigit():
            return None
        if int(length) > self.max_payload:
            return None  # the payload limit answers it
        return Taken(call, authorization)

    def answer(self, taken: Taken, body: bytes, reply: Reply) -> bool:
        auth: Auth = self.app.state.auth
        cp: ControlPlane = self.app.state.plane
        call = taken.call
        try:
            who = auth.check(taken.authorization.decode("latin-1"), time.time())
            if who.scope < TokenScope.INVOKE:
                return False
            input = bodies.input_of(body)
            job = cp.submit(
                who.workspace, call.app, call.fn, input, policy=who.policy, token=who.token
            )
        except _REFUSED:
            return False
        except Exception:
            reply(internal_error())
            return True
        if call.wait is None:
            _when_stored(
                cp,
                job,
                reply,
                lambda: routes.CallResponse({"id": job.id, "status": "IN_QUEUE"}, status_code=202),
            )
        else:
            _Waiter(cp, job, reply, call.wait)
        return True


def _when_stored(cp: ControlPlane, job: Job, reply: Reply, answer: Callable[[], Response]) -> None:
    """Reply with `answer()` once the job's row is committed (a 500 if it could not be)."""

    def stored(fut: asyncio.Future[None]) -> None:
        error = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if error is None:
            reply(answer())
            return
        try:  # internal_error logs the exception being handled, as the ASGI path's handler does
            raise error
        except BaseException:
            reply(internal_error())

    cp.stored(job).add_done_callback(stored)


class _Waiter:
    """A runsync's wait: the job's body when it ends, or after `wait` seconds a 202 once the job
    is durable (as `routes.run_job` does, without a task)."""

    __slots__ = ("cp", "job", "reply", "timer")

    def __init__(self, cp: ControlPlane, job: Job, reply: Reply, wait: float) -> None:
        self.cp, self.job, self.reply = cp, job, reply
        self.timer = asyncio.get_running_loop().call_later(wait, self.expired)
        job.done.add_callback(self.ended)

    def ended(self) -> None:
        self.timer.cancel()
        response: Response
        try:
            response = routes.CallResponse(self.job.body())
        except Exception:
            response = internal_error()
        self.reply(response)

    def expired(self) -> None:
        self.job.done.remove_callback(self.ended)
        job = self.job
        _when_stored(self.cp, job, self.reply, lambda: routes.CallResponse(job.body(), 202))
