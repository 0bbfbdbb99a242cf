"""Handles on deployed functions: `.remote`, `.spawn`, `.map`, `.stream`, and local calls."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from ember.errors import InvalidInput
from ember.sdk.job import Job, outcome, sync_client
from ember.sdk.signature import bind, describe

if TYPE_CHECKING:
    from ember.core.spec import FunctionSpec
    from ember.sdk.client import AsyncClient, Client

P = ParamSpec("P")
R = TypeVar("R")

NOT_JSON = (TypeError, ValueError, RecursionError)
"""What encoding a request body raises for an argument JSON cannot carry."""
_HINTS = {
    "bytes": "decode it to str, or base64-encode it",
    "bytearray": "decode it to str, or base64-encode it",
    "memoryview": "decode it to str, or base64-encode it",
    "set": "pass a list",
    "frozenset": "pass a list",
    "tuple": "pass a list",
    "complex": "pass its real and imaginary parts",
}


def not_json(fn: str, input: dict[str, Any]) -> InvalidInput | None:
    """The error naming the first argument of `input` that JSON cannot carry, or None.

    Asked only once encoding the request has failed: a call that encodes pays nothing for it."""
    for name, value in input.items():
        try:
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except NOT_JSON as exc:
            kind = type(value).__name__
            if isinstance(exc, RecursionError):
                why = "it is nested too deeply for JSON"
            elif isinstance(value, float) and not math.isfinite(value):
                why = f"{value} is not a JSON number"
            elif isinstance(exc, UnicodeError):
                why = "it holds a lone surrogate, which is not UTF-8 text"
            else:
                why = f"JSON cannot carry it ({exc})"
            hint = _HINTS.get(kind, "pass JSON values: dict, list, str, int, float, bool or None")
            return InvalidInput.before_sending(
                f"argument {name!r} of {fn}() is a {kind}: {why}; {hint}"
            )
    return None


def _refuse(fn: str, input: dict[str, Any]) -> None:
    """Raise `not_json`'s error if an argument is the reason the request could not be encoded."""
    error = not_json(fn, input)
    if error is not None:
        raise error from None


class _Invoker(Generic[P, R]):
    """A call with a sync form, `f(...)`, and an awaitable one, `await f.aio(...)`."""

    def __init__(self, sync: Callable[P, R], aio: Callable[P, Any]) -> None:
        self._sync, self.aio = sync, aio

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._sync(*args, **kwargs)


class Function:
    """A function of a deployed app, addressed as `app/name` (`name` is `Class.method` for methods)."""

    def __init__(
        self,
        app: str,
        name: str,
        *,
        kind: str,
        params: dict[str, Any] | None = None,
        local: Callable[..., Any] | None = None,
        skip_self: bool = False,
        spec: FunctionSpec | None = None,
        client: Client | None = None,
    ) -> None:
        self.app_name, self.name, self.kind = app, name, kind
        self._params = params
        self._skip_self = skip_self
        self.spec = spec
        self._local = local
        self._raw: Callable[..., Any] | None = None
        """The user's own function, when `local` wraps it (methods): its signature is described."""
        self._client = client
        self.remote = _Invoker(self._remote, self._remote_aio)
        self.spawn = _Invoker(self._spawn, self._spawn_aio)

    def __repr__(self) -> str:
        return f"<ember.Function {self.app_name}/{self.name}>"

    @property
    def params(self) -> dict[str, Any]:
        """Parameter names and JSON Schema; computed on first use, so workers never pay for it."""
        if self._params is None:
            assert self._local is not None
            self._params = describe(self._raw or self._local, skip_self=self._skip_self)
        return self._params

    @classmethod
    def lookup(cls, app: str, name: str, *, client: Client | None = None) -> Function:
        """A handle on a deployed function from any process, without its source."""
        http = sync_client(client)
        info = http.get_app(app)
        for fn in info["functions"]:
            if fn["name"] == name:
                return cls(app, name, kind=fn["kind"], params=fn["params"], client=client)
        from ember.errors import NotFound

        names = ", ".join(f["name"] for f in info["functions"]) or "none"
        raise NotFound(
            404, "function_not_found", f"app {app!r} has no function {name!r} (it has: {names})"
        )

    @property
    def client(self) -> Client:
        return sync_client(self._client)

    @property
    def is_generator(self) -> bool:
        return self.kind in ("generator", "async_generator")

    def _input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        return bind(self.params["names"], args, kwargs, self.name)

    # local
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.local(*args, **kwargs)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function in this process, as plain Python."""
        if self._local is None:
            raise TypeError(f"{self!r} was looked up, so its code is not here: use .remote()")
        return self._local(*args, **kwargs)

    # remote
    def _remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call remotely and return the output (a list of yielded values for generators)."""
        input = self._input(args, kwargs)
        try:
            body = self.client.runsync(self.app_name, self.name, input)
        except NOT_JSON:
            _refuse(self.name, input)
            raise
        if body["status"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
            return Job(body["id"], client=self._client).result()
        return outcome(body)

    async def _remote_aio(self, *args: Any, **kwargs: Any) -> Any:
        http = _aclient(self._client)
        input = self._input(args, kwargs)
        try:
            body = await http.runsync(self.app_name, self.name, input)
        except NOT_JSON:
            _refuse(self.name, input)
            raise
        if body["status"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
            return await Job(body["id"]).result_aio(client=http)
        return outcome(body)

    def _spawn(self, *args: Any, **kwargs: Any) -> Job:
        """Queue a call and return its Job at once; the job is durable on the server."""
        input = self._input(args, kwargs)
        try:
            body = self.client.run(self.app_name, self.name, input)
        except NOT_JSON:
            _refuse(self.name, input)
            raise
        return Job(body["id"], client=self._client)

    async def _spawn_aio(self, *args: Any, **kwargs: Any) -> Job:
        input = self._input(args, kwargs)
        try:
            body = await _aclient(self._client).run(self.app_name, self.name, input)
        except NOT_JSON:
            _refuse(self.name, input)
            raise
        return Job(body["id"], client=self._client)

    def map(self, *iterables: Iterable[Any], return_exceptions: bool = False) -> Iterator[Any]:
        """Call once per item (zipping several iterables into positional arguments), all queued at
        once so the pool scales out; yield outputs in input order."""
        jobs = [self._spawn(*args) for args in zip(*iterables, strict=False)]
        for job in jobs:
            try:
                yield job.result()
            except Exception as exc:
                if not return_exceptions:
                    raise
                yield exc

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Iterate a generator function's outputs as the worker yields them."""
        return self._spawn(*args, **kwargs).stream()

    async def stream_aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        job = await self._spawn_aio(*args, **kwargs)
        async for value in job.stream_aio(client=_aclient(self._client)):
            yield value


def _aclient(client: Client | None) -> AsyncClient:
    from ember.sdk.client import async_client_for, default_async_client

    if client is None:
        return default_async_client()
    return async_client_for(client.url, client.token)
