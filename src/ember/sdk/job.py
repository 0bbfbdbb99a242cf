"""A handle on one call: poll it, wait for it, stream it, cancel it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ember.errors import JobCancelled, JobTimeout, RemoteError, ResultTimeout

if TYPE_CHECKING:  # httpx is imported on first use, so workers start fast
    from ember.sdk.client import AsyncClient, Client

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
_POLL_S = 30.0


def sync_client(client: Client | None) -> Client:
    from ember.sdk.client import default_client

    return client or default_client()


def async_client(client: AsyncClient | None, sync: Client | None = None) -> AsyncClient:
    """`client`, else the async twin of `sync` (same server and token), else the default."""
    from ember.sdk.client import async_client_for, default_async_client

    if client is not None:
        return client
    if sync is not None:
        return async_client_for(sync.url, sync.token)
    return default_async_client()


def outcome(body: dict[str, Any]) -> Any:
    """The output of a finished job body, or the exception its status stands for."""
    status, job_id = body["status"], body["id"]
    if status == "COMPLETED":
        return body["output"]
    err = body.get("error") or {}
    if status == "FAILED":
        raise RemoteError(
            job_id, err.get("type", "Error"), err.get("message", ""), err.get("traceback")
        )
    if status == "TIMED_OUT":
        raise JobTimeout(job_id, err.get("message", "job timed out"))
    if status == "CANCELLED":
        raise JobCancelled(job_id)
    raise ValueError(f"job {job_id} has not finished (status {status})")


class Job:
    """`ember.Job(id)` works from any process that can reach the server."""

    def __init__(self, id: str, *, client: Client | None = None) -> None:
        self.id = id
        self._client = client

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def client(self) -> Client:
        return sync_client(self._client)

    def info(self) -> dict[str, Any]:
        """The job body: status, output, error, timings."""
        return self.client.get_job(self.id)

    def status(self) -> str:
        return str(self.info()["status"])

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends (or `timeout` seconds pass) and return its body."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            body = self.client.get_job(self.id, wait=max(left, 0.001))
            if body["status"] in TERMINAL:
                return body
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"job {self.id} still {body['status']} after {timeout} s")

    def result(self, timeout: float | None = None) -> Any:
        """The output; raises RemoteError / JobTimeout / JobCancelled as the job ended."""
        return outcome(self.wait(timeout))

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.id)

    def stream(self) -> Iterator[Any]:
        """Each value the generator yields, as it arrives; raises if the job did not complete."""
        for event, data in self.client.stream(self.id):
            if event == "output":
                yield data
            elif event == "done":
                if data["status"] != "COMPLETED":
                    outcome(data)
                return

    # awaitable variants
    async def result_aio(
        self, timeout: float | None = None, client: AsyncClient | None = None
    ) -> Any:
        http = async_client(client, self._client)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            body = await http.get_job(self.id, wait=max(left, 0.001))
            if body["status"] in TERMINAL:
                return outcome(body)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"job {self.id} still {body['status']} after {timeout} s")

    async def stream_aio(self, client: AsyncClient | None = None) -> AsyncIterator[Any]:
        http = async_client(client, self._client)
        async for event, data in http.stream(self.id):
            if event == "output":
                yield data
            elif event == "done":
                if data["status"] != "COMPLETED":
                    outcome(data)
                return
