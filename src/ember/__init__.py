"""ember: deploy a Python function, call it over HTTP, scale to zero, on your own machines.

import ember
app = ember.App("demo")

@app.function(max_workers=4)
def square(x: int) -> int:
    return x * x

square.remote(3)
"""

from ember.errors import (
    ApiError,
    AuthError,
    EmberError,
    InvalidInput,
    InvalidSpec,
    JobCancelled,
    JobTimeout,
    NotFound,
    RateLimited,
    RemoteError,
    ResultTimeout,
    ServerUnavailable,
)
from ember.sdk.app import App
from ember.sdk.cls import Cls
from ember.sdk.env import Env
from ember.sdk.function import Function
from ember.sdk.hooks import enter, exit, method
from ember.sdk.job import Job

__version__ = "0.1.0"


def configure(url: str | None = None, token: str | None = None) -> None:
    """Point the SDK at a server other than EMBER_URL / EMBER_TOKEN."""
    from ember.sdk.client import configure as _configure

    _configure(url=url, token=token)


__all__ = [
    "ApiError",
    "App",
    "AuthError",
    "Cls",
    "EmberError",
    "Env",
    "Function",
    "InvalidInput",
    "InvalidSpec",
    "Job",
    "JobCancelled",
    "JobTimeout",
    "NotFound",
    "RateLimited",
    "RemoteError",
    "ResultTimeout",
    "ServerUnavailable",
    "configure",
    "enter",
    "exit",
    "method",
]
