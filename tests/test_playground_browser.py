"""`make test-browser`: the playground page of a real gateway, used in headless Chromium.

A user signs in, creates a job from the page and watches it over the page's fetch-based SSE
until the `<video>` plays; the credits shown drop by the cost; no request leaves for another
host. A screenshot of the run goes to bench/out/ (not committed; CI keeps it as an artifact).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.servers import ROOT, GatewayProcess
from tests.test_browser import RecordedPage, browser  # noqa: F401 (the fixture)

pytestmark = pytest.mark.browser

SCREENSHOT = ROOT / "bench" / "out" / "playground.png"
DURATION_SEC = 2


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("playground") / "data"
    # Jobs up to 200 s, so that one can cost more than a new user's 100 credits (a 402).
    process = GatewayProcess(data_dir, LOCAL_RENDER_SECONDS="1", MAX_DURATION_SEC="200")
    process.start()
    try:
        yield process.base_url
    finally:
        process.stop()


def signed_in(recorded: RecordedPage, gateway: str, user_id: str) -> None:
    page = recorded.page
    page.goto(f"{gateway}/")
    page.fill("#user", user_id)
    page.click("#signin-form button")
    expect(page.locator("#credits")).to_have_text("100")
    expect(page.locator("#live")).to_have_text("live")


class TestPlayground:
    def test_create_watch_and_play_a_video(self, gateway: str, browser) -> None:  # noqa: F811
        recorded = RecordedPage(browser)
        page = recorded.page
        signed_in(recorded, gateway, "user_playground")
        page.fill("#duration", str(DURATION_SEC))
        page.fill("#seed", "42")
        page.click("#create")
        # Done arrives over the stream: the page never polls the job.
        video = page.locator(".job video")
        video.wait_for()
        page.wait_for_function(
            "() => document.querySelector('.job video').readyState >= 1", timeout=30_000
        )
        seconds = video.evaluate("v => v.duration")
        assert abs(seconds - DURATION_SEC) <= 0.2
        expect(page.locator("#credits")).to_have_text(str(100 - DURATION_SEC))
        expect(page.locator(".job .status")).to_have_text("done")
        assert page.locator("#error").inner_text() == ""
        # At most the one read right after the create: every later state came over the stream.
        assert len([url for url in recorded.requests if re.search(r"/jobs/job_[^/]+$", url)]) <= 1
        assert recorded.remote_requests() == []
        assert recorded.errors == []
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        # Deleted elsewhere (another tab, here the API with the page's own session): the
        # stream's `deleted` event takes the row off the page.
        job_id = page.locator(".job").first.get_attribute("data-job")
        session = {"Authorization": f"Bearer {page.evaluate('() => state.token')}"}
        assert httpx.delete(f"{gateway}/jobs/{job_id}", headers=session).status_code == 204
        expect(page.locator(f'[data-job="{job_id}"]')).to_have_count(0)

    def test_errors_show_their_detail(self, gateway: str, browser) -> None:  # noqa: F811
        recorded = RecordedPage(browser)
        page = recorded.page
        signed_in(recorded, gateway, "user_errors")
        error = page.locator("#error")
        page.fill("#duration", "999")  # over MAX_DURATION_SEC
        page.click("#create")
        expect(error).to_contain_text("durationSec")  # 400
        page.fill("#duration", "150")
        page.click("#create")
        expect(error).to_have_text("This job costs 150 credits; you have 100")  # 402
        assert recorded.remote_requests() == []

    def test_cancel_a_running_job_and_meet_the_job_limit(
        self, tmp_path: Path, browser  # noqa: F811
    ) -> None:
        slow = GatewayProcess(tmp_path / "data", LOCAL_RENDER_SECONDS="60", MAX_CONCURRENT_JOBS="1")
        slow.start()
        try:
            recorded = RecordedPage(browser)
            page = recorded.page
            signed_in(recorded, slow.base_url, "user_cancel")
            page.fill("#duration", "3")
            page.click("#create")
            expect(page.locator("#credits")).to_have_text("97")
            page.click("#create")  # the first still renders: MAX_CONCURRENT_JOBS is 1
            expect(page.locator("#error")).to_have_text("You already have 1 jobs queued or running")
            page.click(".job button")  # Cancel
            expect(page.locator(".job .status")).to_have_text("canceled")
            expect(page.locator("#credits")).to_have_text("100")  # refunded
            assert recorded.remote_requests() == []
        finally:
            slow.stop()
