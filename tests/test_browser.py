"""`make test-browser`: /docs and /redoc of a real gateway, rendered by headless Chromium.

Debian's chromium, driven by Playwright (never `playwright install`: it downloads a browser).
Every request the pages make is recorded: each must go to the gateway on loopback, unless the
page's Content-Security-Policy stopped it in the browser (ReDoc always asks a CDN for its logo).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Request, sync_playwright

from tests.servers import GatewayProcess

pytestmark = pytest.mark.browser

# As CI runs it (root, no network but the registries): no sandbox, and no background calls
# to Google's hosts, which this machine refuses many at a time.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous for a 2-core machine shared with other jobs: Swagger UI's bundle is 1.5 MB.
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("browser") / "data"
    process = GatewayProcess(data_dir, RECONCILER_ENABLED="false")
    process.start()
    try:
        yield process.base_url
    finally:
        process.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test-browser` installs Debian's package")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",  # a new, empty --user-data-dir
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


class RecordedPage:
    """A page with every request it starts, those its CSP blocked, and every script error."""

    def __init__(self, context: BrowserContext) -> None:
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.errors: list[str] = []
        context.on("request", lambda request: self.requests.append(request.url))
        context.on("requestfailed", self._failed)
        self.page: Page = context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _failed(self, request: Request) -> None:
        if request.failure == "csp":
            self.blocked.append(request.url)

    def remote_requests(self) -> list[str]:
        """Requests that left the browser for another host: http(s) or ws(s), not 127.0.0.1."""
        remote = []
        for url in self.requests:
            parts = urlsplit(url)
            network = parts.scheme in ("http", "https", "ws", "wss")
            if network and parts.hostname != "127.0.0.1" and url not in self.blocked:
                remote.append(url)
        return remote


def public_operations(base_url: str) -> dict[str, str]:
    """Each operation's summary by its path, as the gateway publishes them."""
    schema = httpx.get(f"{base_url}/openapi.json").json()
    return {
        operation["summary"]: path
        for path, methods in schema["paths"].items()
        for operation in methods.values()
    }


class TestSwaggerUI:
    def test_renders_every_operation_from_local_files(self, gateway, browser) -> None:
        recorded = RecordedPage(browser)
        page = recorded.page
        page.goto(f"{gateway}/docs")
        page.wait_for_selector(".opblock")
        expected = public_operations(gateway)
        paths = page.locator(".opblock .opblock-summary-path").all_inner_texts()
        summaries = page.locator(".opblock .opblock-summary-description").all_inner_texts()
        # Swagger UI puts zero-width spaces into paths, so that long ones can wrap.
        assert sorted(p.replace("\u200b", "") for p in paths) == sorted(expected.values())
        assert sorted(summaries) == sorted(expected)
        assert f"{gateway}/docs-assets/swagger-ui-bundle.js" in recorded.requests
        assert recorded.remote_requests() == []
        assert recorded.blocked == []  # Swagger UI needs nothing its CSP refuses
        assert recorded.errors == []
        # The session schemes are declared: "Authorize" takes a token for "Try it out".
        page.locator(".auth-wrapper .authorize").click()
        dialog = page.locator(".dialog-ux .modal-ux")
        dialog.wait_for()
        assert "clerkBearer" in dialog.inner_text()

    def test_an_operation_shows_its_example_and_error_codes(self, gateway, browser) -> None:
        recorded = RecordedPage(browser)
        page = recorded.page
        page.goto(f"{gateway}/docs#/Jobs/create_job_jobs_create_post")
        operation = page.locator("#operations-Jobs-create_job_jobs_create_post")
        operation.locator(".opblock-body").wait_for()
        body = operation.inner_text()
        assert "A silver drone flies through neon skyline" in body
        assert "INSUFFICIENT_CREDITS" in body
        assert "job_Xk3v9QyL0aPz7wRt" in body
        assert recorded.remote_requests() == []


class TestReDoc:
    def test_renders_every_operation_from_local_files(self, gateway, browser) -> None:
        recorded = RecordedPage(browser)
        page = recorded.page
        page.goto(f"{gateway}/redoc")
        page.wait_for_selector("h2")
        headings = page.locator("h2").all_inner_texts()
        assert set(public_operations(gateway)) <= set(headings)
        assert f"{gateway}/docs-assets/redoc.standalone.js" in recorded.requests
        assert recorded.remote_requests() == []
        assert recorded.errors == []
