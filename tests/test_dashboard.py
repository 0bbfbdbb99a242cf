"""The dashboard at /ui in a real browser: Playwright driving Debian's Chromium.

No browser is downloaded: Playwright is given the system Chromium's path. Without Playwright or
Chromium these tests skip, but not under EMBER_REQUIRE_BROWSER=1 (CI sets it), where they fail.

Each page is screenshotted into EMBER_SCREENSHOTS (default: the test's tmp dir); docs/dashboard.md
shows the ones written with `EMBER_SCREENSHOTS=docs/img/dashboard`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, result, spawn
from test_workspaces import create_workspace

CHROMIUM = os.environ.get("EMBER_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("EMBER_REQUIRE_BROWSER") == "1"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra has it
    sync_playwright = None

_missing = (
    "playwright is not installed (pip install -e '.[dev]')"
    if sync_playwright is None
    else None
    if shutil.which(CHROMIUM) or Path(CHROMIUM).exists()
    else f"no Chromium at {CHROMIUM} (apt-get install chromium, or set EMBER_CHROMIUM)"
)
if _missing and REQUIRED:
    raise RuntimeError(f"EMBER_REQUIRE_BROWSER=1 but {_missing}")
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

APP_SOURCE = """
import ember

app = ember.App("{app}", tags={{"team": "{team}"}})


@app.function(idle_timeout=300)
def {fn}(x: int) -> int:
    print(f"squaring {{x}} in {fn}")
    return x * x


@app.function(idle_timeout=300)
def broken(x: int) -> int:
    raise ValueError(f"no luck with {{x}}")
"""


def source(app: str, fn: str, team: str = "ml") -> str:
    return textwrap.dedent(APP_SOURCE.format(app=app, fn=fn, team=team))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert sync_playwright is not None
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("EMBER_SCREENSHOTS") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


class Tab:
    """One browser page on one server, failing the test on any script error it logs."""

    def __init__(self, browser: Browser, srv: Server, viewport: dict[str, int] = DESKTOP) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.page: Page = self.context.new_page()
        self.srv = srv
        self.errors: list[str] = []
        self.bodies: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("response", self._keep)

    def _keep(self, response: Any) -> None:
        if "/v1/" in response.url:
            with contextlib.suppress(Exception):
                self.bodies.append(response.text())

    def sign_in(self, token: str) -> None:
        self.page.goto(f"{self.srv.url}/ui/")
        self.page.fill("#token", token)
        self.page.click("#signin")
        self.page.wait_for_selector("#workspace:not(:empty)")

    def go(self, route: str) -> Page:
        self.page.evaluate("r => { location.hash = r }", route)
        self.page.wait_for_load_state("networkidle")
        return self.page

    def shot(self, where: Path, name: str) -> None:
        path = where / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5000, f"{name}.png looks blank"

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"the page logged errors: {self.errors}"


@pytest.fixture
def tab(browser: Browser) -> Iterator[Callable[..., Tab]]:
    tabs: list[Tab] = []

    def make(srv: Server, viewport: dict[str, int] = DESKTOP) -> Tab:
        t = Tab(browser, srv, viewport)
        tabs.append(t)
        return t

    yield make
    for t in tabs:
        t.close()


def calls_total(page: Page) -> int:
    return int(page.get_attribute("#calls-total", "data-total") or 0)


def test_sign_in_then_the_overview_follows_calls_live(
    make_server: Callable[..., Server], tab: Callable[..., Tab], shots: Path
) -> None:
    srv = make_server()
    srv.deploy(source("shapes", "square"))
    t = tab(srv)
    t.page.goto(f"{srv.url}/ui/")
    t.page.fill("#token", "not-a-token")
    t.page.click("#signin")
    t.page.wait_for_selector("text=/token/i")
    t.errors.clear()  # the refused sign-in logs its 401 in the console: that is the point
    t.sign_in(srv.token)
    assert t.page.text_content("#workspace") == "default"
    page = t.go("#/overview")
    page.wait_for_selector("#chart-latency")
    before = calls_total(page)
    for x in range(6):
        srv.function("shapes", "square").remote(x=x)
    # Live: the page polls; no reload, and the count follows within two seconds.
    page.wait_for_function(
        "n => Number(document.querySelector('#calls-total').dataset.total) >= n",
        arg=before + 6,
        timeout=2500,
    )
    for chart in ("#chart-calls", "#chart-latency", "#chart-cold", "#chart-workers"):
        assert page.is_visible(chart), chart
    t.shot(shots, "overview")

    page = t.go("#/apps")
    page.wait_for_selector("text=shapes")
    t.shot(shots, "apps")
    page.click("a[href='#/apps/shapes/square']")
    page.wait_for_selector("text=Idle timeout")
    page.wait_for_selector("#chart-latency")
    t.shot(shots, "function")


def test_jobs_table_filters_and_a_job_page(
    make_server: Callable[..., Server], tab: Callable[..., Tab], shots: Path
) -> None:
    srv = make_server()
    srv.deploy(source("shapes", "square"))
    ok = [spawn(srv, "shapes", "square", x=x) for x in range(3)]
    bad = spawn(srv, "shapes", "broken", x=9)
    for job in (*ok, bad):
        result(srv, job)
    t = tab(srv)
    t.sign_in(srv.token)
    page = t.go("#/jobs")
    for job in (*ok, bad):
        page.wait_for_selector(f"#jobs-table a[href='#/jobs/{job}']")
    t.shot(shots, "jobs")

    page.select_option("#filter-status", "FAILED")
    page.wait_for_selector(f"#jobs-table a[href='#/jobs/{ok[0]}']", state="detached")
    assert page.is_visible(f"#jobs-table a[href='#/jobs/{bad}']")
    page.select_option("#filter-status", "")
    page.select_option("#filter-function", "shapes/square")
    page.wait_for_selector(f"#jobs-table a[href='#/jobs/{bad}']", state="detached")
    page.wait_for_selector(f"#jobs-table a[href='#/jobs/{ok[1]}']")
    page.select_option("#filter-function", "")
    page.fill("#filter-id", ok[2][:10])
    page.wait_for_selector(f"#jobs-table a[href='#/jobs/{ok[1]}']", state="detached")
    assert page.is_visible(f"#jobs-table a[href='#/jobs/{ok[2]}']")

    page.click(f"#jobs-table a[href='#/jobs/{ok[2]}']")
    page.wait_for_selector("#timing-bar")
    page.wait_for_selector("#job-logs >> text=squaring 2 in square")
    assert '"x": 2' in (page.text_content("#job-input") or "")
    assert "4" in (page.text_content("#job-output") or "")
    t.shot(shots, "job")

    t.go(f"#/jobs/{bad}")
    page.wait_for_selector("text=no luck with 9")


def test_every_page_at_desktop_and_phone_size(
    make_server: Callable[..., Server], tab: Callable[..., Tab], shots: Path
) -> None:
    srv = make_server()
    srv.deploy(source("shapes", "square"))
    srv.http("POST", "/v1/policies", json={"name": "ml", "tags": {"team": "ml"}, "budget_usd": 5})
    for x in range(3):
        srv.function("shapes", "square").remote(x=x)
    for size, viewport in (("", DESKTOP), ("phone-", PHONE)):
        t = tab(srv, viewport)
        t.sign_in(srv.token)
        for route, name, marker in (
            ("#/overview", "overview", "#chart-workers"),
            ("#/usage", "usage", "text=ml"),
            ("#/gpus", "gpus", "text=/simulated|no GPU/i"),
            ("#/audit", "audit", "text=deploy"),
        ):
            page = t.go(route)
            page.wait_for_selector(marker)
            # Nothing wider than the viewport: tables scroll inside their own box.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"] + 1, f"{route} is {width}px wide at {viewport}"
            if (name == "overview") == bool(size):  # the desktop overview is the first test's
                t.shot(shots, f"{size}{name}")


def test_a_token_of_one_workspace_sees_nothing_of_another(
    make_server: Callable[..., Server], tab: Callable[..., Tab], shots: Path
) -> None:
    srv = make_server()
    srv.deploy(source("zebrasecretapp", "quokkafn", team="stripes"))
    theirs = [spawn(srv, "zebrasecretapp", "quokkafn", x=x) for x in range(3)]
    for job in theirs:
        result(srv, job)
    other = create_workspace(srv, "blue")
    t = tab(srv)
    t.sign_in(other)
    assert t.page.text_content("#workspace") == "blue"
    for route in ("#/overview", "#/apps", "#/jobs", "#/usage", "#/gpus", "#/audit"):
        page = t.go(route)
        page.wait_for_timeout(300)
        text = page.inner_text("body")
        for secret in ("zebrasecretapp", "quokkafn", "stripes", theirs[0]):
            assert secret not in text, f"{secret} shown to another workspace on {route}"
    t.go(f"#/jobs/{theirs[0]}")
    t.page.wait_for_selector("text=/not found|no job/i")
    t.errors.clear()  # the 404 shows in the console
    for body in t.bodies:
        for secret in ("zebrasecretapp", "quokkafn", "stripes"):
            assert secret not in body, f"an API answer to another workspace holds {secret}"
