"""The stream hub (events.py) on a real SQLite file: what one poll costs and what it delivers.

The hub is driven by hand (`poll_once`), with a clock the test sets, so nothing waits on time.
The streams over HTTP are in tests/test_events_e2e.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from errors import TooManyStreams
from events import OVERLAP_MS, Change, StreamHub, StreamLimits, Subscription, event_stream
from instrumented import InstrumentedStore
from metrics import Metrics
from models import Job, JobStatus, StatusUpdate, now_ms
from sqlite_store import SQLiteStore
from tests.factories import new_job


async def status_of(job: Job) -> str:
    return f"{job.job_id}:{job.status.value}:{job.updated_at}"


class Clock:
    def __init__(self) -> None:
        self.now = now_ms()

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "gateway.db", 100, "starter")
    yield opened
    await opened.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def make_hub(store: SQLiteStore, metrics: Metrics, per_user: int = 10, per_instance: int = 100):
    instrumented = InstrumentedStore(store, metrics)
    limits = StreamLimits(per_user, per_instance)
    return StreamHub(instrumented, status_of, limits, interval=0.5, clock=Clock())


def store_reads(metrics: Metrics) -> float:
    labels = {"upstream": "store", "operation": "jobs_updated_since", "outcome": "ok"}
    name = "gateway_upstream_request_duration_seconds_count"
    return metrics.registry.get_sample_value(name, labels) or 0.0


def taken(sub: Subscription) -> list[str]:
    changes, sub.pending = list(sub.pending.values()), {}
    return [change.data for change in changes]


class TestCost:
    async def test_one_read_per_poll_for_all_streams(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        jobs = [await store.charge_and_create_job(new_job(f"user_{i}"), 5) for i in range(5)]
        subs = [hub.subscribe(job.user_id, job.job_id) for job in jobs for _ in range(6)]
        subs += [hub.subscribe("user_0") for _ in range(4)]
        for _ in range(3):
            await hub.poll_once()
        assert store_reads(metrics) == 3
        assert len(subs) == hub.open_streams == 34

    async def test_no_read_without_a_stream(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        sub = hub.subscribe("user_a")
        hub.unsubscribe(sub)
        await hub.poll_once()
        assert store_reads(metrics) == 0 and hub.open_streams == 0


class TestDelivery:
    async def test_a_change_reaches_the_jobs_and_the_owners_streams(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        on_job, on_user = hub.subscribe("user_a", job.job_id), hub.subscribe("user_a")
        on_other = hub.subscribe("user_b")
        running, _ = await store.apply_status(job.job_id, StatusUpdate(JobStatus.RUNNING))
        await hub.poll_once()
        expected = [await status_of(running)]
        assert taken(on_job)[-1:] == taken(on_user)[-1:] == expected
        assert taken(on_other) == []

    async def test_a_deleted_job_is_sent_as_deleted_with_its_id_alone(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
        sub = hub.subscribe("user_a")
        await hub.poll_once()
        taken(sub)  # the done state
        await store.delete_job("user_a", job.job_id)
        await hub.poll_once()
        (change,) = sub.pending.values()
        events = event_stream(hub.subscribe("user_a", job.job_id), [change], max_seconds=60)
        event = await anext(events)
        # The tombstone's prompt is gone, and it is never rendered as a job.
        assert (event.event, event.data) == ("deleted", f'{{"jobId":"{job.job_id}"}}')
        with pytest.raises(StopAsyncIteration):  # a job's own stream ends with it
            await anext(events)

    async def test_a_new_job_reaches_its_owners_stream(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        sub = hub.subscribe("user_a")
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await hub.poll_once()
        assert taken(sub) == [await status_of(job)]

    async def test_overlapping_polls_hand_out_each_state_once(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        sub = hub.subscribe("user_a")
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await hub.poll_once()
        await hub.poll_once()  # reads the same change again: it is inside the overlap
        assert taken(sub) == [await status_of(job)]
        await hub.poll_once()
        assert taken(sub) == []

    async def test_a_write_from_another_process_is_seen(self, store, metrics, tmp_path) -> None:
        hub = make_hub(store, metrics)
        sub = hub.subscribe("user_a")
        other = SQLiteStore(tmp_path / "gateway.db", 100, "starter")  # another instance
        try:
            job = await other.charge_and_create_job(new_job("user_a"), 5)
        finally:
            await other.close()
        await hub.poll_once()
        assert taken(sub) == [await status_of(job)]

    async def test_a_late_commit_within_the_overlap_is_not_lost(
        self, store, metrics, tmp_path
    ) -> None:
        hub = make_hub(store, metrics)
        sub = hub.subscribe("user_a")
        start = hub.clock()
        early = await store.charge_and_create_job(new_job("user_a"), 5)
        late = await store.charge_and_create_job(new_job("user_a"), 5)

        def stamp(job: Job, updated_at: int) -> None:  # what a writer's own clock wrote
            with sqlite3.connect(tmp_path / "gateway.db") as db:
                db.execute(
                    "UPDATE jobs SET updated_at = ? WHERE job_id = ?", (updated_at, job.job_id)
                )

        stamp(early, start + 5_000)
        stamp(late, 0)  # not committed yet, as far as any reader can tell
        await hub.poll_once()
        assert taken(sub) == [await status_of(await store.get_job("user_a", early.job_id))]
        # It commits now, stamped by a writer whose clock ran 1.5 s behind the first one's.
        stamp(late, start + 5_000 - (OVERLAP_MS - 500))
        await hub.poll_once()
        assert taken(sub) == [await status_of(await store.get_job("user_a", late.job_id))]

    async def test_a_burst_larger_than_a_page_is_read_on(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        hub.page = 3
        sub = hub.subscribe("user_a")
        created = [await store.charge_and_create_job(new_job("user_a"), 10) for _ in range(8)]
        for _ in range(4):
            await hub.poll_once()
        assert sorted(taken(sub)) == sorted([await status_of(job) for job in created])
        assert store_reads(metrics) == 4

    async def test_the_poll_outlives_a_store_that_is_down(self, tmp_path) -> None:
        down = SQLiteStore(tmp_path / "down.db", 0, "starter")
        await down.close()  # every read now raises
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == 3:
                raise asyncio.CancelledError

        hub = StreamHub(down, status_of, StreamLimits(10, 10), 0.25, sleep=sleep)
        hub.subscribe("user_a")
        with pytest.raises(asyncio.CancelledError):
            await hub.run_forever()
        assert sleeps == [0.25, 0.25, 0.25]


class TestLimits:
    async def test_per_user(self, store, metrics) -> None:
        hub = make_hub(store, metrics, per_user=10)
        subs = [hub.subscribe("user_a") for _ in range(10)]
        with pytest.raises(TooManyStreams) as refused:
            hub.subscribe("user_a", "job_aaaaaaaaaaaaaaaa")
        assert (refused.value.status_code, refused.value.code) == (429, "TOO_MANY_STREAMS")
        hub.subscribe("user_b")  # another user still may
        hub.unsubscribe(subs[0])
        hub.subscribe("user_a")  # a closed stream frees its place

    async def test_per_instance(self, store, metrics) -> None:
        hub = make_hub(store, metrics, per_instance=3)
        for user in ("user_a", "user_b", "user_c"):
            hub.subscribe(user)
        with pytest.raises(TooManyStreams) as refused:
            hub.subscribe("user_d")
        assert refused.value.headers == {"Retry-After": "1"}


class TestStream:
    """What one stream yields from its mailbox, with a clock the test moves."""

    async def test_ends_after_the_terminal_event_of_its_job(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        sub = hub.subscribe("user_a", job.job_id)
        events = event_stream(sub, [Change(job, "queued")], max_seconds=60)
        assert (await anext(events)).data == "queued"
        done, _ = await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
        sub.offer(Change(done, "done"))
        assert (await anext(events)).data == "done"
        with pytest.raises(StopAsyncIteration):
            await anext(events)

    async def test_sends_reconnect_when_its_time_is_up(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        sub = hub.subscribe("user_a")
        now = [0.0]
        events = event_stream(sub, [], max_seconds=5, clock=lambda: now[0])
        now[0] = 5.0  # the deadline has passed: the wait returns at once
        last = await anext(events)
        assert (last.event, last.retry, last.data) == ("reconnect", 1000, '{"reason":"timeout"}')

    async def test_shutdown_closes_every_stream(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        subs = [hub.subscribe("user_a"), hub.subscribe("user_b", "job_bbbbbbbbbbbbbbbb")]
        streams = [event_stream(sub, [], max_seconds=3600) for sub in subs]
        waiting = [asyncio.ensure_future(anext(stream)) for stream in streams]
        hub.shutdown.set()
        await hub.close_on_shutdown()
        finals = await asyncio.gather(*waiting)
        assert [(e.event, e.data) for e in finals] == [("reconnect", '{"reason":"shutdown"}')] * 2

    async def test_shutdown_waits_for_a_stream_before_making_its_event(
        self, store, metrics
    ) -> None:
        # The event loads anyio's backend (20-25 ms of start-up, issue 13): none before a stream.
        hub = make_hub(store, metrics)
        watcher = asyncio.ensure_future(hub.close_on_shutdown())
        await asyncio.sleep(0.01)
        assert hub._shutdown is None and not watcher.done()
        sub = hub.subscribe("user_a")
        waiting = asyncio.ensure_future(anext(event_stream(sub, [], max_seconds=3600)))
        await asyncio.sleep(0.01)
        assert not watcher.done()
        hub.shutdown.set()
        await watcher
        assert (await waiting).data == '{"reason":"shutdown"}'

    async def test_the_end_is_sent_even_when_stamped_earlier(self, store, metrics) -> None:
        # Progress can be stamped by the caller's clock and the end by the store's: a clock a
        # little ahead must not cost the stream its last event (it would then wait for ever).
        hub = make_hub(store, metrics)
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        running, _ = await store.apply_status(job.job_id, StatusUpdate(JobStatus.RUNNING))
        done, _ = await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
        sub = hub.subscribe("user_a", job.job_id)
        events = event_stream(sub, [Change(running, "running")], max_seconds=5)
        assert (await anext(events)).data == "running"
        sub.offer(Change(replace(done, updated_at=running.updated_at - 300), "done"))
        assert (await anext(events)).data == "done"
        with pytest.raises(StopAsyncIteration):
            await anext(events)

    async def test_an_older_state_after_a_newer_one_is_not_sent(self, store, metrics) -> None:
        hub = make_hub(store, metrics)
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        running, _ = await store.apply_status(job.job_id, StatusUpdate(JobStatus.RUNNING))
        sub = hub.subscribe("user_a")
        events = event_stream(sub, [Change(running, "running")], max_seconds=5)
        assert (await anext(events)).data == "running"
        sub.offer(Change(replace(job, updated_at=running.updated_at - 1), "queued"))
        sub.close()
        assert (await anext(events)).event == "reconnect"
