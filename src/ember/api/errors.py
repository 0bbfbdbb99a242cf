"""Every error leaves as JSON `{"error": {"code", "message"}}` with the right status."""

from __future__ import annotations

import logging
import re
import sys
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

log = logging.getLogger("ember.api")


class ApiException(StarletteHTTPException):
    def __init__(
        self, status: int, code: str, message: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code
        self.message = message
        self.extra = extra or {}
        """More fields of the error object, e.g. a budget's figures on a 402."""


def error_response(
    status: int, code: str, message: str, extra: dict[str, Any] | None = None
) -> JSONResponse:
    body = {"code": code, "message": message, **(extra or {})}
    return JSONResponse({"error": body}, status_code=status)


def render(exc: StarletteHTTPException) -> JSONResponse:
    """The JSON answer for an HTTP error: an ApiException's code and fields, or one made from
    the status."""
    code = getattr(exc, "code", None) or _code_for(exc.status_code)
    response = error_response(exc.status_code, code, str(exc.detail), getattr(exc, "extra", None))
    response.headers.update(exc.headers or {})
    return response


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


def _allowed(request: Request) -> list[str]:
    """Every method the API serves at this path, from the OpenAPI document: Starlette's own Allow
    names only the first route that matched the path, and GET and POST /v1/apps are two routes."""
    app = request.app
    table: list[tuple[re.Pattern[str], list[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = [
            (compile_path(path)[0], sorted(m.upper() for m in ops))
            for path, ops in app.openapi().get("paths", {}).items()
        ]
        app.state.allow_table = table
    path = request.scope.get("path", "")
    return sorted({m for pattern, ms in table if pattern.match(path) for m in ms})


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = render(exc)
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_allowed(request))
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            where = f"{loc[0]} parameter '{'.'.join(loc[1:])}'" if len(loc) > 1 else ".".join(loc)
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unhandled(_: Request, exc: Exception) -> JSONResponse:
        return internal_error()


def internal_error() -> JSONResponse:
    """The answer to an error nobody foresaw (logged with its traceback): never a bare 500."""
    _, exc, _ = sys.exc_info()
    log.exception("unhandled error")
    return error_response(
        500, "internal", f"internal error ({type(exc).__name__}); see the server log"
    )
