"""GET /docs (Swagger UI) and /redoc (ReDoc): the API's reference, from the vendored files.

FastAPI's own pages load their scripts from a CDN; these load the same tools from
/ui/static/vendor, so the reference works on a machine with no internet, and the browser contacts
no other host. The Content-Security-Policy makes sure of the latter: Swagger UI's page runs one
inline script (allowed by its hash), and ReDoc's side menu asks a CDN for a logo, which the policy
blocks (the image hides itself when it fails to load).
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

from ember.web.ui import SECURITY_HEADERS

VENDOR = "/ui/static/vendor"
FAVICON = f"{VENDOR}/favicon-32x32.png"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)


def policy(html: str) -> str:
    """The CSP for a reference page: its own origin only, and the inline scripts it has."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html)
    )
    return (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        f"script-src 'self' {hashes}".rstrip()
        + "; connect-src 'self'; worker-src 'self' blob:; font-src 'self' data:; "
        "frame-ancestors 'none'"
    )


def _page(page: Response) -> Response:
    html = bytes(page.body).decode()
    headers = {
        "Content-Security-Policy": policy(html),
        **SECURITY_HEADERS,
        "Cache-Control": "no-cache",
    }
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


def _openapi_url(request: Request) -> str:
    return request.scope.get("root_path", "") + (request.app.openapi_url or "/openapi.json")


@router.get("/docs")
async def swagger(request: Request) -> Response:
    return _page(
        get_swagger_ui_html(
            openapi_url=_openapi_url(request),
            title=f"{request.app.title} API",
            swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui.css",
            swagger_favicon_url=FAVICON,
            # the default sends the document to validator.swagger.io for a badge
            swagger_ui_parameters={"validatorUrl": None},
        )
    )


@router.get("/redoc")
async def redoc(request: Request) -> Response:
    return _page(
        get_redoc_html(
            openapi_url=_openapi_url(request),
            title=f"{request.app.title} API",
            redoc_js_url=f"{VENDOR}/redoc.standalone.js",
            redoc_favicon_url=FAVICON,
            with_google_fonts=False,
        )
    )
