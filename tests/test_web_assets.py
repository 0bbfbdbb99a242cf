"""The web files `ember server` ships: the vendored scripts match their manifest, the package
carries them, and the pages (/ui, /docs, /redoc) load nothing from another host.

The browser tests drive Debian's chromium through Playwright; they skip where either is missing,
unless EMBER_REQUIRE_BROWSER=1 (CI), where they fail instead.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import Server
from ember.web import ui

STATIC = Path(__file__).resolve().parent.parent / "src" / "ember" / "web" / "static"
VENDOR = STATIC / "vendor"
OURS = STATIC / "ui"

TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}

CDN = re.compile(r"cdn\.|unpkg|jsdelivr|googleapis|cdnjs|gstatic", re.IGNORECASE)
ABSOLUTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
"""A URL that names a scheme or a host (data: included: the pages have no need of one)."""


def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((VENDOR / "MANIFEST.json").read_text())
    return entries


# ----------------------------------------------------------------------------- the files


def test_the_manifest_names_every_vendored_file_with_its_hash_and_license() -> None:
    entries = manifest()
    for entry in entries:
        assert set(entry) >= {"name", "package", "version", "sha256", "license"}, entry
        body = (VENDOR / entry["name"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"], entry["name"]
        assert (VENDOR / entry["license_file"]).is_file(), entry
    on_disk = {
        p.relative_to(VENDOR).as_posix()
        for p in VENDOR.rglob("*")
        if p.is_file() and p.name != "MANIFEST.json" and "licenses" not in p.parts
    }
    assert on_disk == {e["name"] for e in entries}
    versions = {e["package"]: e["version"] for e in entries}
    assert versions["chart.js"].startswith("4.")
    assert versions["swagger-ui-dist"].startswith("5.")
    assert versions["redoc"].startswith("2.")


def test_the_package_carries_the_web_files() -> None:
    root = resources.files("ember.web") / "static"
    for name in [*(f"vendor/{e['name']}" for e in manifest()), "ui/index.html"]:
        assert (root / name).is_file(), name
    assert {f"vendor/{e['name']}" for e in manifest()} <= ui.assets.names()
    # the wheel takes every file of the package that git does not ignore
    if shutil.which("git") is None or not (STATIC.parents[3] / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p) for p in STATIC.rglob("*") if p.is_file()]
    ignored = subprocess.run(
        ["git", "check-ignore", *files], cwd=STATIC, capture_output=True, text=True
    )
    assert ignored.stdout == "", f"git ignores, so the wheel would leave out: {ignored.stdout}"


def test_our_own_pages_load_nothing_from_another_host() -> None:
    """The pages' CSP allows their own origin only; this names the file and line before a
    browser refuses it."""
    for path in sorted(OURS.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            assert not CDN.search(line), f"{path.name}:{n}: {line.strip()}"
        urls: list[str] = []
        if path.suffix == ".html":
            urls += re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", text)
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), (
                f"{path.name}: an inline script, which the CSP refuses (script-src 'self')"
            )
            assert not re.search(r"""\son[a-z]+\s*=\s*["']""", text), (
                f"{path.name}: an inline event handler, which the CSP refuses"
            )
        if path.suffix in (".js", ".mjs"):
            urls += re.findall(
                r"""\bimport\s*(?:[^"'()]*?\bfrom\s*)?\(?\s*["']([^"']+)["']""", text
            )
        if path.suffix == ".css":
            urls += re.findall(r"""url\(\s*["']?([^"')]+)""", text)
            urls += re.findall(r"""@import\s+["']([^"']+)["']""", text)
        for url in urls:
            assert not ABSOLUTE.match(url), f"{path.name} loads {url} from another host"


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("web") / "data").start()
    yield server
    server.shutdown(timeout=15)


def raw_get(srv: Server, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written: an HTTP client would remove the dot segments first."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_local_assets(srv: Server, html: str) -> list[str]:
    """Every src/href of the page is a path on this server that answers with its type."""
    urls = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        resp = srv.http("GET", url, token=None)
        assert resp.status_code == 200, url
        expected = TYPES[Path(urlsplit(url).path).suffix]
        assert resp.headers["content-type"].startswith(expected), (url, resp.headers)
        assert resp.headers["x-content-type-options"] == "nosniff"
    return urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_reference_loads_from_this_server_alone(srv: Server, page: str) -> None:
    resp = srv.http("GET", page, token=None)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "http://" not in resp.text and "https://" not in resp.text, resp.text
    urls = assert_local_assets(srv, resp.text)
    assert any(u.startswith("/ui/static/vendor/") and u.endswith(".js") for u in urls), urls
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http" not in csp and "*" not in csp, csp
    assert resp.headers["referrer-policy"] == "no-referrer"


def test_the_openapi_document_stays_public_and_leaves_out_the_pages(srv: Server) -> None:
    resp = srv.http("GET", "/openapi.json", token=None)
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    assert "/v1/apps" in paths
    assert not [p for p in paths if p.startswith(("/ui", "/docs", "/redoc"))]


@pytest.mark.parametrize("path", ["/ui", "/ui/"])
def test_the_dashboard_page_comes_with_a_strict_policy(srv: Server, path: str) -> None:
    resp = srv.http("GET", path, token=None)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["content-security-policy"] == ui.CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["cache-control"] == "no-cache"
    again = srv.http("GET", path, token=None, headers={"If-None-Match": resp.headers["etag"]})
    assert again.status_code == 304


def test_vendored_files_have_their_types_and_are_cached(srv: Server) -> None:
    for entry in manifest():
        resp = srv.http("GET", f"/ui/static/vendor/{entry['name']}", token=None)
        assert resp.status_code == 200, entry["name"]
        assert resp.headers["content-type"].startswith(TYPES[Path(entry["name"]).suffix])
        assert hashlib.sha256(resp.content).hexdigest() == entry["sha256"]
        assert "max-age=" in resp.headers["cache-control"]
        assert resp.headers["content-security-policy"] == ui.CSP


def test_static_files_need_no_token_but_the_api_still_does(srv: Server) -> None:
    assert srv.http("GET", "/ui/static/vendor/chart.umd.min.js", token=None).status_code == 200
    assert srv.http("GET", "/ui/static/ui/index.html", token=None).status_code == 200
    assert srv.http("GET", "/v1/apps", token=None).status_code == 401
    assert srv.http("GET", "/v1/apps").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/ui/static/../../api/app.py",
        "/ui/static/ui/../../../api/app.py",
        "/ui/static/%2e%2e/%2e%2e/api/app.py",
        "/ui/static/..%2f..%2fapi%2fapp.py",
        "/ui/static/%2e%2e%2f%2e%2e%2fapi%2fapp.py",
        "/ui/static/..%5c..%5capi%5capp.py",
        "/ui/static/%252e%252e/%252e%252e/api/app.py",
        "/ui/static//etc/passwd",
        "/ui/static/%2fetc%2fpasswd",
        "/ui/static/vendor/../vendor/MANIFEST.json",
        "/ui/static/./vendor/MANIFEST.json",
        "/ui/static/vendor",
        "/ui/static/",
        "/ui/static/ui.py",
    ],
)
def test_a_path_out_of_the_static_folder_is_not_found(srv: Server, path: str) -> None:
    status, body = raw_get(srv, path)
    assert status == 404, (path, body[:200])
    assert b"create_app" not in body and b"root:" not in body


# ----------------------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Playwright's chromium, the system's build (Playwright's own download is not needed)."""
    required = os.environ.get("EMBER_REQUIRE_BROWSER") == "1"
    executable = os.environ.get("EMBER_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    if executable is None:
        if required:
            pytest.fail("EMBER_REQUIRE_BROWSER=1, but no chromium on PATH")
        pytest.skip("no chromium on PATH")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def visit(browser: Any, srv: Server, page: str, ready: str) -> tuple[int, list[str], list[str]]:
    """Open `page`, wait for `ready`; the number of `ready` elements, the URLs of other hosts
    the page asked for (refused here), and the console's errors."""
    context = browser.new_context()
    elsewhere: list[str] = []
    errors: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith(srv.url + "/"):
            r.continue_()
        else:
            elsewhere.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    tab = context.new_page()
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    try:
        tab.goto(srv.url + page)
        # ReDoc shows its own error page where it cannot read the document
        tab.wait_for_selector(f"{ready}, h1:text('Something went wrong')", timeout=20_000)
        tab.wait_for_load_state("networkidle")
        return tab.locator(ready).count(), elsewhere, errors
    finally:
        context.close()


def test_swagger_ui_renders_every_operation_offline(browser: Any, srv: Server) -> None:
    count, elsewhere, errors = visit(browser, srv, "/docs", ".opblock")
    assert count > 20, errors
    assert elsewhere == [] and errors == []


def test_redoc_renders_the_reference_offline(browser: Any, srv: Server) -> None:
    count, elsewhere, errors = visit(browser, srv, "/redoc", "li[data-item-id]")
    assert count > 20, errors
    assert elsewhere == []
    # ReDoc's side menu shows Redocly's logo from their CDN: the policy stops it in the browser
    assert [e for e in errors if "cdn.redoc.ly" not in e] == []
