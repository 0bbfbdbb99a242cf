"""The HTTP client behind every SDK handle and CLI command (httpx, sync and async)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from ember import config
from ember.errors import (
    ApiError,
    AuthError,
    InvalidInput,
    NotFound,
    RateLimited,
    ServerUnavailable,
)

_ERRORS: dict[int, type[ApiError]] = {
    401: AuthError,
    403: AuthError,
    404: NotFound,
    422: InvalidInput,
    429: RateLimited,
}


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    code, message = "error", resp.text[:500]
    try:
        err = resp.json()["error"]
        code, message = err["code"], err["message"]
    except Exception:
        pass
    error = _ERRORS.get(resp.status_code, ApiError)(resp.status_code, code, message)
    if isinstance(error, RateLimited):
        with contextlib.suppress(ValueError):
            error.retry_after = float(resp.headers.get("retry-after", ""))
    raise error


def _unavailable(url: str, exc: Exception) -> ServerUnavailable:
    return ServerUnavailable(
        f"no ember server answered at {url} ({exc.__class__.__name__}); start one with "
        "`ember server`, or point EMBER_URL at yours"
    )


RETRY_DELAYS = (0.1, 0.3, 0.8, 1.6)
"""Pauses between the tries of a submit that got no answer (a dropped connection, a server
restarting, a proxy's 502-504): under 3 s in all. Each try carries the call's Idempotency-Key,
so a try that reached the server before its answer was lost still makes one job."""
_RETRY_STATUS = frozenset({502, 503, 504})


def _key_header(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key or uuid.uuid4().hex}


def _token_or_hint(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    """Synchronous client; one keep-alive connection pool per process."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 330.0):
        self.url = (url or config.server_url()).rstrip("/")
        self.token = token if token is not None else config.client_token()
        self._http = httpx.Client(
            base_url=self.url + "/v1",
            headers=_token_or_hint(self.token),
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        _raise_for(resp)
        return resp

    def submit(self, path: str, body: Any, key: str | None, **kw: Any) -> httpx.Response:
        """POST a submit, tried again (after `RETRY_DELAYS`) under one Idempotency-Key while
        no answer comes back."""
        headers = _key_header(key)
        for delay in (*RETRY_DELAYS, None):
            try:
                resp = self._http.post(path, json=body, headers=headers, **kw)
            except httpx.TransportError as exc:
                if delay is None:
                    raise _unavailable(self.url, exc) from exc
            else:
                if delay is None or resp.status_code not in _RETRY_STATUS:
                    _raise_for(resp)
                    return resp
            time.sleep(delay)
        raise AssertionError("unreachable")

    # jobs
    def run(
        self, app: str, fn: str, input: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Queue a job: {"id", "status"}. A repeat with the same `idempotency_key` gets the
        same job (one is made up per call when it is None)."""
        body = {"input": input}
        return self.submit(f"/apps/{app}/{fn}/run", body, idempotency_key).json()

    def runsync(
        self,
        app: str,
        fn: str,
        input: dict[str, Any],
        wait: float = 60,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        path, body = f"/apps/{app}/{fn}/runsync", {"input": input}
        return self.submit(path, body, idempotency_key, params={"wait": wait}).json()

    def get_job(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        return self.request("GET", f"/jobs/{job_id}", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def stream(self, job_id: str) -> Iterator[tuple[str, Any]]:
        """Server-sent events of a job: ('output', value)... then ('done', job body)."""
        try:
            with self._http.stream("GET", f"/jobs/{job_id}/stream", timeout=None) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp)
                yield from _parse_sse(resp.iter_lines())
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc

    # apps
    def deploy(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/apps", json=manifest).json()

    # code and environments
    def has_bundle(self, digest: str) -> bool:
        try:
            self.request("HEAD", f"/bundles/{digest}")
        except NotFound:
            return False
        return True

    def put_bundle(self, digest: str, data: bytes) -> dict[str, Any]:
        headers = {"content-type": "application/zip"}
        return self.request("PUT", f"/bundles/{digest}", content=data, headers=headers).json()

    def build_env(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start building an Env (or find it built): its view, `status` building/ready/failed."""
        return self.request("POST", "/envs", json={"spec": spec}).json()

    def get_env(self, env_id: str, *, build: bool = False) -> dict[str, Any]:
        """An Env built here, or (`build`) also one still building or failed."""
        params = {"build": "1"} if build else None
        return self.request("GET", f"/envs/{env_id}", params=params).json()

    def list_envs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/envs").json()["envs"]

    def export_env(self, env_id: str) -> str:
        return self.request("GET", f"/envs/{env_id}/lock").text

    def prune_envs(self, dry_run: bool = False) -> dict[str, Any]:
        return self.request("DELETE", "/envs", params={"dry_run": dry_run}).json()

    def list_apps(self) -> list[dict[str, Any]]:
        return self.request("GET", "/apps").json()["apps"]

    def get_app(self, app: str) -> dict[str, Any]:
        return self.request("GET", f"/apps/{app}").json()

    def health(self, app: str, fn: str) -> dict[str, Any]:
        return self.request("GET", f"/apps/{app}/{fn}/health").json()

    def logs(self, app: str, fn: str, tail: int = 100, since: float = 0.0) -> list[dict[str, Any]]:
        """Worker output lines of a function, newest last; `since` is an epoch timestamp."""
        params = {"tail": tail, "since": since}
        return self.request("GET", f"/apps/{app}/{fn}/logs", params=params).json()["lines"]


class AsyncClient:
    """The awaitable twin of Client, for callers inside an event loop."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 330.0):
        self.url = (url or config.server_url()).rstrip("/")
        self.token = token if token is not None else config.client_token()
        self._http = httpx.AsyncClient(
            base_url=self.url + "/v1",
            headers=_token_or_hint(self.token),
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        _raise_for(resp)
        return resp

    async def submit(self, path: str, body: Any, key: str | None, **kw: Any) -> httpx.Response:
        """`Client.submit`, awaitable."""
        headers = _key_header(key)
        for delay in (*RETRY_DELAYS, None):
            try:
                resp = await self._http.post(path, json=body, headers=headers, **kw)
            except httpx.TransportError as exc:
                if delay is None:
                    raise _unavailable(self.url, exc) from exc
            else:
                if delay is None or resp.status_code not in _RETRY_STATUS:
                    _raise_for(resp)
                    return resp
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def run(
        self, app: str, fn: str, input: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        body = {"input": input}
        return (await self.submit(f"/apps/{app}/{fn}/run", body, idempotency_key)).json()

    async def runsync(
        self,
        app: str,
        fn: str,
        input: dict[str, Any],
        wait: float = 60,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        path, body = f"/apps/{app}/{fn}/runsync", {"input": input}
        resp = await self.submit(path, body, idempotency_key, params={"wait": wait})
        return resp.json()

    async def get_job(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        return (await self.request("GET", f"/jobs/{job_id}", params=params)).json()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return (await self.request("POST", f"/jobs/{job_id}/cancel")).json()

    async def stream(self, job_id: str) -> AsyncIterator[tuple[str, Any]]:
        try:
            async with self._http.stream("GET", f"/jobs/{job_id}/stream", timeout=None) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _raise_for(resp)
                decoder = _SSEDecoder()
                async for line in resp.aiter_lines():
                    if (item := decoder.feed(line)) is not None:
                        yield item
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc

    async def get_app(self, app: str) -> dict[str, Any]:
        return (await self.request("GET", f"/apps/{app}")).json()


class _SSEDecoder:
    """Turns server-sent-event lines into (event, decoded JSON data) pairs."""

    def __init__(self) -> None:
        self.event: str = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, Any] | None:
        if line == "":
            if not self.data:
                return None
            out = (self.event, json.loads("\n".join(self.data)))
            self.event, self.data = "message", []
            return out
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        return None


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    decoder = _SSEDecoder()
    for line in lines:
        if (item := decoder.feed(line)) is not None:
            yield item


_default: Client | None = None
_settings: tuple[str | None, str | None] = (None, None)
_async: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str | None, str | None], AsyncClient]
] = weakref.WeakKeyDictionary()


def default_client() -> Client:
    global _default
    if _default is None:
        _default = Client(*_settings)
    return _default


def async_client_for(url: str | None = None, token: str | None = None) -> AsyncClient:
    """One AsyncClient per event loop and server: httpx binds connections to the loop that made them."""
    per_loop = _async.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get((url, token))
    if client is None:
        client = per_loop[(url, token)] = AsyncClient(url=url, token=token)
    return client


def default_async_client() -> AsyncClient:
    return async_client_for(*_settings)


def configure(url: str | None = None, token: str | None = None) -> None:
    """Point the SDK at a server other than EMBER_URL / EMBER_TOKEN."""
    global _default, _settings
    _settings = (url, token)
    _default = Client(url=url, token=token)
