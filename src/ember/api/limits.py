"""Request bodies over the payload limit get 413 before they are buffered whole."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.api.errors import ApiException

MAX_PAYLOAD_HINT = "ember server --max-payload"


def _too_large(limit: int, hint: str) -> ApiException:
    return ApiException(
        413,
        "payload_too_large",
        f"request body is over the {limit} byte limit (set by `{hint}`)",
    )


class PayloadLimit:
    def __init__(
        self, app: ASGIApp, max_bytes: int, overrides: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.app, self.default = app, max_bytes
        self.overrides = overrides or {}
        """Path prefix -> its own limit and what sets it (a bundle upload's: the bundle limit)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, hint = self.default, MAX_PAYLOAD_HINT
        for prefix, (limit, set_by) in self.overrides.items():
            if scope["path"].startswith(prefix):
                max_bytes, hint = limit, set_by
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                body = (
                    b'{"error":{"code":"payload_too_large","message":"request body of '
                    + value
                    + b" bytes is over the "
                    + str(max_bytes).encode()
                    + b" byte limit (set by "
                    + hint.encode()
                    + b')"}}'
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > max_bytes:
                    raise _too_large(max_bytes, hint)
            return msg

        await self.app(scope, limited, send)
