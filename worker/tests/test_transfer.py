"""Uploads against the job's clock: the retry loop, with time passed in rather than waited."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import Recorder

from worker.transfer import RetryPolicy, TransferFailed, Uploader


class FakeClock:
    """Monotonic time that moves only when the uploader sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def uploader(client: httpx.Client, clock: FakeClock, budget: float, rng: float = 1.0) -> Uploader:
    return Uploader(client, clock() + budget, RetryPolicy(), clock, clock.sleep, rng=lambda: rng)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as opened:
        yield opened


class TestBackoff:
    def test_ceilings_double_up_to_the_maximum(self) -> None:
        policy = RetryPolicy(base_delay=0.5, max_delay=10.0)
        assert [policy.delay(retry, lambda: 1.0) for retry in range(7)] == [
            0.5,
            1.0,
            2.0,
            4.0,
            8.0,
            10.0,
            10.0,
        ]

    def test_jitter_spreads_each_wait_below_its_ceiling(self) -> None:
        assert RetryPolicy().delay(3, lambda: 0.25) == 1.0


class TestDeadline:
    def test_no_retry_starts_that_would_end_past_the_job_s_time(
        self, client: httpx.Client, recorder: Recorder
    ) -> None:
        clock = FakeClock()
        recorder.default = 503

        with pytest.raises(TransferFailed, match="ran out of time: HTTP 503"):
            # 0.5 + 1 + 2 s of backoff fit in 5 s; the next wait (4 s) would not.
            uploader(client, clock, budget=5.0).put("the video", recorder.url, b"mp4", "video/mp4")

        assert clock.slept == [0.5, 1.0, 2.0]
        assert len(recorder.received) == 4

    def test_a_429_is_retried_like_a_5xx(self, client: httpx.Client, recorder: Recorder) -> None:
        clock = FakeClock()
        recorder.script = [429]

        uploader(client, clock, budget=60.0).put("the video", recorder.url, b"mp4", "video/mp4")

        assert len(recorder.received) == 2

    def test_no_answer_is_retried_and_named_without_the_url(self, client: httpx.Client) -> None:
        from conftest import dead_url

        clock = FakeClock()
        url = dead_url()

        with pytest.raises(TransferFailed) as failed:
            uploader(client, clock, budget=60.0).put("the video", url, b"mp4", "video/mp4")

        assert str(failed.value) == (
            "Uploading the video failed after 6 attempts: no answer (ConnectError)"
        )
        assert len(clock.slept) == 5
