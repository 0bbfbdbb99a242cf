"""Calls (`POST /v1/apps/{app}/{fn}/run` and `/runsync`) served straight from ASGI.

A call is the request ember serves most, and the one whose overhead users measure. FastAPI's
routing, parameter parsing, dependency solving and middleware stack cost more CPU than the rest
of a warm call, so this app, in front of the FastAPI app (only the payload limit is outside it),
answers the plain form of a call itself: the same auth, the same handlers (`routes.queue_job`,
`routes.run_job`) and the same error bodies, an unexpected error included. Anything else, an
unusual query string included, goes on to the FastAPI app, which also documents these endpoints
in OpenAPI; so a request this cannot take whole is answered exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ember.api import routes
from ember.api.auth import Auth
from ember.api.auth import Scope as TokenScope
from ember.api.errors import ApiException, internal_error, render

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
