"""The dashboard's files: GET /ui and /ui/static/..., straight from the installed package.

Nothing here holds data (the pages ask the API for it, with the token the user signs in with), so
no token is needed. Only files found under the package's `static` folder are served, looked up by
their exact relative name: a path with `..`, an absolute path or an encoded variant of either
names no such file, and is a 404 like any unknown name.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

from fastapi import APIRouter, Request, Response

from ember.api.errors import ApiException

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)
"""The pages load nothing from another host and run no inline script."""

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}
"""Explicit types: the platform's mimetypes table varies, and browsers refuse an ES module that is
not served as JavaScript (with nosniff, any script or style sheet of the wrong type)."""

VENDOR_MAX_AGE = 86400
"""Third-party files change only with an upgrade of ember; the pages' own files are revalidated
on every load (`no-cache` with an ETag), so a new version shows at once."""


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str
    cache_control: str


def static_root() -> Traversable:
    """The `static` folder of the package, wherever and however it is installed."""
    return resources.files("ember.web") / "static"


def _walk(folder: Traversable, prefix: str) -> dict[str, Traversable]:
    found: dict[str, Traversable] = {}
    for entry in folder.iterdir():
        name = f"{prefix}{entry.name}"
        if entry.is_dir():
            found.update(_walk(entry, name + "/"))
        elif entry.is_file():
            found[name] = entry
    return found


class Assets:
    """Every file under `static`, by its relative name; each read once, on first use."""

    def __init__(self, root: Traversable) -> None:
        self._root = root
        self._files: dict[str, Traversable] | None = None
        self._cache: dict[str, Asset] = {}
        self._lock = threading.Lock()

    def names(self) -> set[str]:
        return set(self._index())

    def get(self, name: str) -> Asset | None:
        if (asset := self._cache.get(name)) is not None:
            return asset
        entry = self._index().get(name)
        if entry is None:
            return None
        body = entry.read_bytes()
        suffix = "." + name.rpartition(".")[2] if "." in name else ""
        vendor = name.startswith("vendor/")
        asset = Asset(
            body=body,
            content_type=TYPES.get(suffix.lower(), "application/octet-stream"),
            etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
            cache_control=f"public, max-age={VENDOR_MAX_AGE}" if vendor else "no-cache",
        )
        self._cache[name] = asset
        return asset

    def _index(self) -> dict[str, Traversable]:
        if self._files is None:
            with self._lock:
                if self._files is None:
                    root = self._root
                    self._files = _walk(root, "") if root.is_dir() else {}
        return self._files


assets = Assets(static_root())

router = APIRouter(include_in_schema=False)


def respond(request: Request, name: str) -> Response:
    asset = assets.get(name)
    if asset is None:
        raise ApiException(404, "not_found", f"no such file: {name}")
    headers = {
        "Content-Security-Policy": CSP,
        **SECURITY_HEADERS,
        "Cache-Control": asset.cache_control,
        "ETag": asset.etag,
    }
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


@router.api_route("/ui", methods=["GET", "HEAD"])
@router.api_route("/ui/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    return respond(request, "ui/index.html")


@router.api_route("/ui/static/{path:path}", methods=["GET", "HEAD"])
async def static(request: Request, path: str) -> Response:
    return respond(request, path)
