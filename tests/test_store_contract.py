"""One contract, every store: the rules about money and limits, run against each implementation."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable

import pytest

from errors import (
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidCursor,
    JobNotCancelable,
    JobNotDeletable,
    NotFound,
    TooManyActiveJobs,
)
from models import Job, JobStatus, ProgressUpdate, StatusUpdate, User, now_ms
from store import Store
from tests.factories import new_job
from tests.stores import STORE_KINDS, open_store

SIGNUP = 100


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Store]:
    async with open_store(request, request.param, tmp_path, signup_credits=SIGNUP) as opened:
        yield opened
        # Whatever the scenario did, the books must balance afterwards.
        assert await opened.audit() == []


async def credits(store: Store, user_id: str) -> int:
    return (await store.get_or_create_user(user_id)).credits


class TestUsers:
    async def test_new_user_gets_signup_credits(self, store: Store) -> None:
        user = await store.get_or_create_user("user_new")
        assert (user.user_id, user.credits, user.plan) == ("user_new", SIGNUP, "starter")

    async def test_get_or_create_is_stable(self, store: Store) -> None:
        await store.get_or_create_user("user_a")
        await store.grant_credits("user_a", 10, "test")
        assert await credits(store, "user_a") == SIGNUP + 10

    async def test_grant_creates_user(self, store: Store) -> None:
        user = await store.grant_credits("user_fresh", 25, "promo")
        assert user.credits == SIGNUP + 25

    async def test_find_user_creates_nothing(self, store: Store) -> None:
        assert await store.find_user("user_ghost") is None
        assert await store.find_user("user_ghost") is None  # still not created
        assert "user_ghost" not in await store.ledger_totals()
        created = await store.get_or_create_user("user_ghost")
        assert await store.find_user("user_ghost") == created


class TestSignupGrant:
    """Each store says, on the answer of the one call that created a user, what it granted."""

    async def test_get_or_create_reports_it_once(self, store: Store) -> None:
        first = await store.get_or_create_user("user_new")
        again = await store.get_or_create_user("user_new")
        assert (first.signup_grant, again.signup_grant) == (SIGNUP, 0)

    async def test_first_charge_reports_it(self, store: Store) -> None:
        first = await store.charge_and_create_job(new_job("user_new"), max_active=5)
        second = await store.charge_and_create_job(new_job("user_new"), max_active=5)
        user = await store.get_or_create_user("user_new")
        assert (first.signup_grant, second.signup_grant, user.signup_grant) == (SIGNUP, 0, 0)

    async def test_charge_of_a_known_user_reports_none(self, store: Store) -> None:
        assert (await store.get_or_create_user("user_a")).signup_grant == SIGNUP
        job = await store.charge_and_create_job(new_job("user_a"), max_active=5)
        assert job.signup_grant == 0

    async def test_grant_to_a_new_user_reports_it(self, store: Store) -> None:
        first = await store.grant_credits("user_new", 25, "promo")
        again = await store.grant_credits("user_new", 25, "promo")
        assert (first.signup_grant, again.signup_grant) == (SIGNUP, 0)

    async def test_read_back_records_report_none(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_new"), max_active=5)
        assert (await store.get_job("user_new", job.job_id)).signup_grant == 0
        [listed] = (await store.list_jobs("user_new", 10, None)).jobs
        assert listed.signup_grant == 0
        assert listed == job  # not part of equality: the same job, whichever answer

    @pytest.mark.parametrize(
        ("cost", "max_active", "refusal"),
        [(SIGNUP + 1, 5, InsufficientCredits), (1, 0, TooManyActiveJobs)],
    )
    async def test_refused_first_charge_creates_no_user(
        self, store: Store, cost: int, max_active: int, refusal: type[Exception]
    ) -> None:
        """A refusal rolls the user's creation back with it: nothing granted, nothing to report."""
        with pytest.raises(refusal):
            await store.charge_and_create_job(new_job("user_new", cost=cost), max_active)
        assert "user_new" not in await store.ledger_totals()
        # The grant is still to come, and the call that makes it reports it.
        assert (await store.get_or_create_user("user_new")).signup_grant == SIGNUP

    async def test_concurrent_first_calls_report_it_once(self, store: Store) -> None:
        calls: list[Awaitable[User | Job]] = [
            store.get_or_create_user("user_new") for _ in range(5)
        ]
        calls += [store.charge_and_create_job(new_job("user_new", cost=1), 10) for _ in range(5)]
        answers = await asyncio.gather(*calls)
        assert sum(answer.signup_grant for answer in answers) == SIGNUP
        assert (await store.ledger_totals())["user_new"]["grants"] == SIGNUP


class TestCharge:
    async def test_charge_creates_submitting_job_and_deducts(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=30), max_active=5)
        assert job.status is JobStatus.SUBMITTING
        assert job.cost == 30 and job.runpod_id is None
        assert await credits(store, "user_a") == SIGNUP - 30

    async def test_insufficient_credits_changes_nothing(self, store: Store) -> None:
        with pytest.raises(InsufficientCredits):
            await store.charge_and_create_job(new_job("user_a", cost=SIGNUP + 1), max_active=5)
        assert await credits(store, "user_a") == SIGNUP
        assert (await store.list_jobs("user_a", 10, None)).jobs == []

    async def test_exact_balance_is_enough(self, store: Store) -> None:
        await store.charge_and_create_job(new_job("user_a", cost=SIGNUP), max_active=5)
        assert await credits(store, "user_a") == 0

    async def test_active_limit(self, store: Store) -> None:
        for _ in range(2):
            await store.charge_and_create_job(new_job("user_a", cost=1), max_active=2)
        with pytest.raises(TooManyActiveJobs):
            await store.charge_and_create_job(new_job("user_a", cost=1), max_active=2)
        assert await credits(store, "user_a") == SIGNUP - 2

    async def test_finished_jobs_free_a_slot(self, store: Store) -> None:
        first = await store.charge_and_create_job(new_job("user_a", cost=1), max_active=1)
        await store.apply_status(first.job_id, StatusUpdate(JobStatus.DONE))
        await store.charge_and_create_job(new_job("user_a", cost=1), max_active=1)

    async def test_limit_is_per_user(self, store: Store) -> None:
        await store.charge_and_create_job(new_job("user_a", cost=1), max_active=1)
        await store.charge_and_create_job(new_job("user_b", cost=1), max_active=1)

    async def test_balance_is_checked_before_the_limit(self, store: Store) -> None:
        await store.charge_and_create_job(new_job("user_a", cost=SIGNUP), max_active=1)
        with pytest.raises(InsufficientCredits):
            await store.charge_and_create_job(new_job("user_a", cost=1), max_active=1)

    async def test_fifty_parallel_charges(self, store: Store) -> None:
        """The race: 50 at once, never more than the limit active, never below zero."""
        results = await asyncio.gather(
            *(store.charge_and_create_job(new_job("user_r", cost=7), 5) for _ in range(50)),
            return_exceptions=True,
        )
        accepted = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(accepted) == 5
        assert all(isinstance(r, TooManyActiveJobs | InsufficientCredits) for r in refused)
        assert await credits(store, "user_r") == SIGNUP - 5 * 7


class TestRunpodId:
    async def test_record_moves_submitting_to_queued(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        recorded = await store.record_runpod_id(job.job_id, "rp-1")
        assert (recorded.status, recorded.runpod_id) == (JobStatus.QUEUED, "rp-1")
        found = await store.find_job_by_runpod_id("rp-1")
        assert found is not None and found.job_id == job.job_id

    async def test_record_keeps_the_first_id_and_later_status(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await store.apply_status(job.job_id, StatusUpdate(JobStatus.RUNNING, runpod_id="rp-1"))
        recorded = await store.record_runpod_id(job.job_id, "rp-2")
        assert (recorded.status, recorded.runpod_id) == (JobStatus.RUNNING, "rp-1")

    async def test_unknown_job(self, store: Store) -> None:
        with pytest.raises(NotFound):
            await store.record_runpod_id("job_doesnotexist00", "rp-1")


class TestApplyStatus:
    async def test_forward_only(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        _, changed = await store.apply_status(job.job_id, StatusUpdate(JobStatus.RUNNING))
        assert changed
        done, changed = await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
        assert changed and done.status is JobStatus.DONE
        late, changed = await store.apply_status(job.job_id, StatusUpdate(JobStatus.RUNNING))
        assert not changed and late.status is JobStatus.DONE

    async def test_done_never_becomes_failed(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=5), 5)
        await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
        after, changed = await store.apply_status(
            job.job_id, StatusUpdate(JobStatus.FAILED, "X", "y")
        )
        assert not changed and after.status is JobStatus.DONE
        assert await credits(store, "user_a") == SIGNUP - 5

    async def test_failure_refunds_exactly_once(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=9), 5)
        update = StatusUpdate(JobStatus.FAILED, "WORKER_FAILED", "out of memory")
        failed, changed = await store.apply_status(job.job_id, update)
        assert changed
        assert (failed.error_code, failed.error_detail) == ("WORKER_FAILED", "out of memory")
        for _ in range(3):
            _, again = await store.apply_status(job.job_id, update)
            assert not again
        _, canceled = await store.apply_status(job.job_id, StatusUpdate(JobStatus.CANCELED))
        assert not canceled
        assert await credits(store, "user_a") == SIGNUP

    async def test_parallel_failures_refund_once(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=9), 5)
        update = StatusUpdate(JobStatus.FAILED, "WORKER_FAILED", "boom")
        results = await asyncio.gather(*(store.apply_status(job.job_id, update) for _ in range(10)))
        assert sum(changed for _, changed in results) == 1
        assert await credits(store, "user_a") == SIGNUP

    async def test_unknown_job(self, store: Store) -> None:
        with pytest.raises(NotFound):
            await store.apply_status("job_doesnotexist00", StatusUpdate(JobStatus.DONE))


T0 = 1_800_000_000_000  # an injected clock, in ms: the throttle is tested without waiting


class TestProgress:
    """A worker's reports: forward only, terminal jobs untouched, one write a second per stage."""

    async def report(
        self, store: Store, job_id: str, progress: float, stage: str, now: int
    ) -> tuple[bool, tuple[JobStatus, float | None, str | None]]:
        job, written = await store.record_progress(job_id, ProgressUpdate(progress, stage, now))
        return written, (job.status, job.progress, job.stage)

    async def test_first_report_moves_queued_to_running(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        job = await store.record_runpod_id(job.job_id, "rp-1")
        before = now_ms()
        written, seen = await self.report(store, job.job_id, 0.0, "started", T0)
        assert written and seen == (JobStatus.RUNNING, 0.0, "started")
        stored = await store.get_job("user_a", job.job_id)
        # The throttle's clock is the caller's; the change's time is the store's own; and the
        # reconciler's mark is left alone, so that the job's deadline still applies.
        assert stored.progress_written_at == T0 and stored.updated_at >= before
        assert stored.checked_at == job.checked_at

    async def test_a_reporting_job_is_still_checked_so_its_deadline_holds(
        self, store: Store
    ) -> None:
        # Reports must not hide a job from the reconciler: only its checks can fail a job past
        # its deadline and refund it, and anyone with the job's input holds its progress token.
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        job = await store.record_runpod_id(job.job_id, "rp-1")
        assert job.checked_at is not None
        minute = 60_000
        for step in range(1, 4):
            await self.report(
                store, job.job_id, step / 10, "generating", job.checked_at + step * 10 * minute
            )
        stale = await store.claim_stale_jobs(job.checked_at + minute, job.checked_at + minute, 10)
        assert [claimed.job_id for claimed in stale] == [job.job_id]

    async def test_a_submitting_job_runs_too(self, store: Store) -> None:
        # The worker can start before the gateway has recorded RunPod's id.
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        _, seen = await self.report(store, job.job_id, 0.0, "started", T0)
        recorded = await store.record_runpod_id(job.job_id, "rp-1")
        assert seen[0] is JobStatus.RUNNING and recorded.status is JobStatus.RUNNING

    async def test_throttled_within_a_stage(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await self.report(store, job.job_id, 0.1, "generating", T0)
        written, seen = await self.report(store, job.job_id, 0.3, "generating", T0 + 999)
        assert not written and seen == (JobStatus.RUNNING, 0.1, "generating")
        written, seen = await self.report(store, job.job_id, 0.4, "generating", T0 + 1000)
        assert written and seen == (JobStatus.RUNNING, 0.4, "generating")

    async def test_a_new_stage_is_written_at_once(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await self.report(store, job.job_id, 0.0, "started", T0)
        written, seen = await self.report(store, job.job_id, 0.1, "generating", T0 + 1)
        assert written and seen == (JobStatus.RUNNING, 0.1, "generating")
        written, seen = await self.report(store, job.job_id, 0.8, "uploading", T0 + 2)
        assert written and seen == (JobStatus.RUNNING, 0.8, "uploading")

    async def test_never_backwards(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await self.report(store, job.job_id, 0.8, "uploading", T0)
        late_stage = await self.report(store, job.job_id, 0.1, "generating", T0 + 5000)
        lower = await self.report(store, job.job_id, 0.5, "uploading", T0 + 10_000)
        expected = (JobStatus.RUNNING, 0.8, "uploading")
        assert late_stage == (False, expected) and lower == (False, expected)

    async def test_a_later_stage_keeps_the_higher_progress(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await self.report(store, job.job_id, 0.7, "generating", T0)
        written, seen = await self.report(store, job.job_id, 0.5, "uploading", T0 + 1)
        assert written and seen == (JobStatus.RUNNING, 0.7, "uploading")

    @pytest.mark.parametrize("final", [JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELED])
    async def test_a_finished_job_is_never_changed(self, store: Store, final: JobStatus) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=5), 5)
        await store.apply_status(job.job_id, StatusUpdate(final, "X" if final != "done" else None))
        before = await store.get_job("user_a", job.job_id)
        written, _ = await self.report(store, job.job_id, 0.5, "uploading", T0)
        assert not written and await store.get_job("user_a", job.job_id) == before
        refunded = final is not JobStatus.DONE
        assert await credits(store, "user_a") == SIGNUP - (0 if refunded else 5)

    async def test_parallel_first_reports_write_once(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        update = ProgressUpdate(0.1, "generating", T0)
        results = await asyncio.gather(
            *(store.record_progress(job.job_id, update) for _ in range(10))
        )
        assert sum(written for _, written in results) == 1

    async def test_unknown_job(self, store: Store) -> None:
        with pytest.raises(NotFound):
            await store.record_progress("job_doesnotexist00", ProgressUpdate(0.1, "started", T0))


class TestPoster:
    async def test_done_records_the_poster_and_its_url(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        update = StatusUpdate(JobStatus.DONE, poster_key="videos/user_a/x.jpg")
        done, _ = await store.apply_status(job.job_id, update)
        await store.save_download_url(job.job_id, "https://v.test/x.mp4", 123, "https://p/x.jpg")
        stored = await store.get_job("user_a", job.job_id)
        assert done.poster_key == stored.poster_key == "videos/user_a/x.jpg"
        assert (stored.download_url, stored.poster_url) == (
            "https://v.test/x.mp4",
            "https://p/x.jpg",
        )

    async def test_done_without_a_poster_has_none(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        done, _ = await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
        await store.save_download_url(job.job_id, "https://v.test/x.mp4", 123)
        stored = await store.get_job("user_a", job.job_id)
        assert (done.poster_key, stored.poster_key, stored.poster_url) == (None, None, None)


class TestCancel:
    async def test_cancel_refunds(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=8), 5)
        canceled = await store.cancel_job("user_a", job.job_id)
        assert canceled.status is JobStatus.CANCELED
        assert await credits(store, "user_a") == SIGNUP

    async def test_finished_job_is_not_cancelable(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=8), 5)
        await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
        with pytest.raises(JobNotCancelable):
            await store.cancel_job("user_a", job.job_id)
        assert await credits(store, "user_a") == SIGNUP - 8

    async def test_cancel_twice_refunds_once(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=8), 5)
        await store.cancel_job("user_a", job.job_id)
        with pytest.raises(JobNotCancelable):
            await store.cancel_job("user_a", job.job_id)
        assert await credits(store, "user_a") == SIGNUP

    async def test_another_users_job_is_invisible(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=8), 5)
        with pytest.raises(NotFound):
            await store.cancel_job("user_b", job.job_id)
        assert (await store.get_job("user_a", job.job_id)).status is JobStatus.SUBMITTING


class TestRead:
    async def test_get_job(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        fetched = await store.get_job("user_a", job.job_id)
        assert fetched == job

    async def test_another_users_job_is_not_found(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        with pytest.raises(NotFound):
            await store.get_job("user_b", job.job_id)
        assert (await store.list_jobs("user_b", 10, None)).jobs == []

    async def test_find_unknown(self, store: Store) -> None:
        assert await store.find_job("job_doesnotexist00") is None
        assert await store.find_job_by_runpod_id("nope") is None

    async def test_download_url_is_saved(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        await store.save_download_url(job.job_id, "https://x/y", 123_456)
        fetched = await store.get_job("user_a", job.job_id)
        assert (fetched.download_url, fetched.download_expires_at) == ("https://x/y", 123_456)

    async def test_ping(self, store: Store) -> None:
        await store.ping()


class TestDelete:
    """A finished job can be deleted: gone for its owner, its money records kept."""

    async def finished(self, store: Store, status: JobStatus, user: str = "user_a") -> str:
        job = await store.charge_and_create_job(new_job(user, cost=8), 5)
        await store.apply_status(job.job_id, StatusUpdate(status, "X", "the worker said so"))
        await store.save_download_url(job.job_id, "https://x/y", 123_456)
        return job.job_id

    async def test_a_url_saved_after_the_delete_is_not_kept(self, store: Store) -> None:
        # A read that presigned before the delete committed saves its URLs after it.
        job_id = await self.finished(store, JobStatus.DONE)
        await store.delete_job("user_a", job_id)
        await store.save_download_url(job_id, "https://x/late", 999_999, "https://x/late.jpg")
        tombstone = await store.find_job(job_id)
        assert tombstone is not None and tombstone.deleted_at is not None
        assert (tombstone.download_url, tombstone.poster_url) == (None, None)

    @pytest.mark.parametrize("status", [JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELED])
    async def test_a_finished_job_is_gone_for_its_owner(
        self, store: Store, status: JobStatus
    ) -> None:
        job_id = await self.finished(store, status)
        before = await store.ledger_totals()
        deleted = await store.delete_job("user_a", job_id)
        assert (deleted.job_id, deleted.object_key) == (job_id, f"videos/user_a/{job_id}.mp4")
        with pytest.raises(NotFound):
            await store.get_job("user_a", job_id)
        with pytest.raises(NotFound):
            await store.cancel_job("user_a", job_id)
        assert (await store.list_jobs("user_a", 10, None)).jobs == []
        # The ledger keeps every row (the fixture's audit checks them against the status).
        assert await store.ledger_totals() == before

    async def test_the_users_content_is_cleared(self, store: Store) -> None:
        job_id = await self.finished(store, JobStatus.FAILED)
        deleted = await store.delete_job("user_a", job_id)
        assert (deleted.prompt, deleted.image_url, deleted.error_detail) == ("", None, None)
        assert (deleted.download_url, deleted.download_expires_at) == (None, None)
        # What the money records need stays: status, cost, error code, creation time.
        kept = await store.find_job(job_id)
        assert kept is not None and (kept.status, kept.cost, kept.error_code) == (
            JobStatus.FAILED,
            8,
            "X",
        )

    @pytest.mark.parametrize("status", [JobStatus.SUBMITTING, JobStatus.QUEUED, JobStatus.RUNNING])
    async def test_a_live_job_is_refused_and_unchanged(
        self, store: Store, status: JobStatus
    ) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=8), 5)
        if status is not JobStatus.SUBMITTING:
            await store.apply_status(job.job_id, StatusUpdate(status))
        before = await store.get_job("user_a", job.job_id)
        with pytest.raises(JobNotDeletable):
            await store.delete_job("user_a", job.job_id)
        assert await store.get_job("user_a", job.job_id) == before
        assert [j.job_id for j in (await store.list_jobs("user_a", 10, None)).jobs] == [job.job_id]
        assert await credits(store, "user_a") == SIGNUP - 8

    async def test_another_users_job_is_not_found_and_kept(self, store: Store) -> None:
        job_id = await self.finished(store, JobStatus.DONE)
        with pytest.raises(NotFound):
            await store.delete_job("user_b", job_id)
        with pytest.raises(NotFound):
            await store.delete_job("user_a", "job_doesnotexist00")
        assert (await store.get_job("user_a", job_id)).prompt == "a drone over a neon city"

    async def test_a_repeat_returns_the_tombstone_and_changes_nothing(self, store: Store) -> None:
        job_id = await self.finished(store, JobStatus.DONE)
        first = await store.delete_job("user_a", job_id)
        again = await store.delete_job("user_a", job_id)
        assert again == first
        with pytest.raises(NotFound):  # still another user's
            await store.delete_job("user_b", job_id)

    async def test_parallel_deletes_agree(self, store: Store) -> None:
        job_id = await self.finished(store, JobStatus.CANCELED)
        answers = await asyncio.gather(*[store.delete_job("user_a", job_id) for _ in range(5)])
        assert {answer.updated_at for answer in answers} == {answers[0].updated_at}
        assert await credits(store, "user_a") == SIGNUP

    async def test_pages_skip_deleted_jobs(self, store: Store) -> None:
        ids = []
        for _ in range(6):
            job = await store.charge_and_create_job(new_job("user_p", cost=1), 100)
            await store.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
            ids.append(job.job_id)
            await asyncio.sleep(0.002)  # distinct creation times, like real requests
        for job_id in ids[1:5]:  # the middle four: pages must step over them
            await store.delete_job("user_p", job_id)
        first = await store.list_jobs("user_p", 1, None)
        assert [j.job_id for j in first.jobs] == [ids[5]] and first.next_cursor is not None
        second = await store.list_jobs("user_p", 1, first.next_cursor)
        assert [j.job_id for j in second.jobs] == [ids[0]]
        assert second.next_cursor is None  # nothing live is older


class TestPagination:
    async def _make(self, store: Store, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            job = await store.charge_and_create_job(new_job("user_p", cost=1), 100)
            ids.append(job.job_id)
            await asyncio.sleep(0.002)  # distinct creation times, like real requests
        return ids

    async def test_pages_walk_newest_first(self, store: Store) -> None:
        ids = await self._make(store, 7)
        seen: list[str] = []
        cursor = None
        while True:
            page = await store.list_jobs("user_p", 3, cursor)
            seen += [job.job_id for job in page.jobs]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == list(reversed(ids))

    async def test_exact_fit_has_no_next_cursor(self, store: Store) -> None:
        await self._make(store, 3)
        page = await store.list_jobs("user_p", 3, None)
        assert len(page.jobs) == 3 and page.next_cursor is None

    @pytest.mark.parametrize("cursor", ["!!!", "bm90IGpzb24", "WzEsMl0", "e30"])
    async def test_malformed_cursor(self, store: Store, cursor: str) -> None:
        with pytest.raises(InvalidCursor):
            await store.list_jobs("user_p", 3, cursor)

    @pytest.mark.parametrize(
        "decoded",
        [
            '[1000000000000000000000000000000, "job_x"]',  # past SQLite's 64-bit INTEGER
            '[-1, "job_aaaaaaaaaaaa"]',
            '[true, "job_aaaaaaaaaaaa"]',  # JSON true is an int to Python
            '[1e400, "job_aaaaaaaaaaaa"]',
            '[1, "\\ud800"]',  # a lone surrogate: UTF-8, and so SQLite, cannot hold it
            '[1, "job_x\' OR 1=1 --"]',
            "[" * 400,
        ],
    )
    async def test_tampered_cursor(self, store: Store, decoded: str) -> None:
        cursor = base64.urlsafe_b64encode(decoded.encode()).decode().rstrip("=")
        await store.charge_and_create_job(new_job("user_p", cost=1), 100)
        with pytest.raises(InvalidCursor):
            await store.list_jobs("user_p", 3, cursor)

    @pytest.mark.parametrize("cursor", ["", "\ud800", "abc\ndef", "\x00", "é" * 10])
    async def test_cursor_that_is_not_text(self, store: Store, cursor: str) -> None:
        with pytest.raises(InvalidCursor):
            await store.list_jobs("user_p", 3, cursor)


DAY_MS = 86_400_000
STALE_MS = 30_000


class TestIdempotencyKeys:
    async def claim(self, store: Store, key: str = "k1", fingerprint: str = "f1", now: int = 0):
        now = now or now_ms()
        return await store.claim_idempotency_key("user_a", key, fingerprint, now, DAY_MS, STALE_MS)

    async def test_first_claim_then_in_flight(self, store: Store) -> None:
        assert (await self.claim(store)).outcome == "claimed"
        assert (await self.claim(store)).outcome == "in_flight"

    async def test_replay_after_complete(self, store: Store) -> None:
        await self.claim(store)
        await store.complete_idempotency_key("user_a", "k1", 200, '{"jobId": "job_x"}')
        claim = await self.claim(store)
        assert (claim.outcome, claim.status_code, claim.body) == (
            "replay",
            200,
            '{"jobId": "job_x"}',
        )

    async def test_other_fingerprint_is_refused(self, store: Store) -> None:
        await self.claim(store)
        with pytest.raises(IdempotencyKeyReused):
            await self.claim(store, fingerprint="f2")

    async def test_keys_are_per_user(self, store: Store) -> None:
        await self.claim(store)
        other = await store.claim_idempotency_key("user_b", "k1", "f2", now_ms(), DAY_MS, 1)
        assert other.outcome == "claimed"

    async def test_release_allows_a_retry(self, store: Store) -> None:
        await self.claim(store)
        await store.release_idempotency_key("user_a", "k1")
        assert (await self.claim(store, fingerprint="f2")).outcome == "claimed"

    async def test_release_keeps_a_finished_answer(self, store: Store) -> None:
        await self.claim(store)
        await store.complete_idempotency_key("user_a", "k1", 402, "{}")
        await store.release_idempotency_key("user_a", "k1")
        assert (await self.claim(store)).outcome == "replay"

    async def test_expired_key_is_fresh(self, store: Store) -> None:
        start = now_ms()
        await self.claim(store, now=start)
        await store.complete_idempotency_key("user_a", "k1", 200, "{}")
        later = await self.claim(store, fingerprint="f2", now=start + DAY_MS + 1)
        assert later.outcome == "claimed"

    async def test_stale_claim_is_taken_over_with_its_job(self, store: Store) -> None:
        start = now_ms()
        await self.claim(store, now=start)
        job = await store.charge_and_create_job(new_job("user_a"), 5, idempotency_key="k1")
        assert job.idempotency_key == "k1"
        taken = await self.claim(store, now=start + STALE_MS + 1)
        assert (taken.outcome, taken.job_id) == ("claimed", job.job_id)

    async def test_parallel_claims_one_winner(self, store: Store) -> None:
        claims = await asyncio.gather(*(self.claim(store) for _ in range(20)))
        assert sorted(c.outcome for c in claims) == ["claimed"] + ["in_flight"] * 19

    async def test_purge_removes_only_expired(self, store: Store) -> None:
        start = now_ms()
        await self.claim(store, key="old", now=start - 2 * DAY_MS)
        await self.claim(store, key="new", now=start)
        assert await store.purge_idempotency_keys(start, 100) == 1
        assert (await self.claim(store, key="new")).outcome == "in_flight"


class TestReconcilerClaims:
    async def test_only_quiet_active_jobs_are_claimed_once(self, store: Store) -> None:
        quiet = await store.charge_and_create_job(new_job("user_a"), 5)
        done = await store.charge_and_create_job(new_job("user_a"), 5)
        await store.apply_status(done.job_id, StatusUpdate(JobStatus.DONE))
        later = now_ms() + 60_000
        claimed = await store.claim_stale_jobs(later, later, 10)
        assert [job.job_id for job in claimed] == [quiet.job_id]
        assert claimed[0].checked_at == later
        assert await store.claim_stale_jobs(later, later, 10) == []

    async def test_oldest_first_and_limit(self, store: Store) -> None:
        first = await store.charge_and_create_job(new_job("user_a"), 5)
        await asyncio.sleep(0.002)
        await store.charge_and_create_job(new_job("user_a"), 5)
        later = now_ms() + 60_000
        claimed = await store.claim_stale_jobs(later, later, 1)
        assert [job.job_id for job in claimed] == [first.job_id]

    async def test_news_makes_a_job_fresh(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        checkpoint = now_ms() + 1
        await asyncio.sleep(0.005)
        await store.record_runpod_id(job.job_id, "rp-1")
        assert await store.claim_stale_jobs(checkpoint, now_ms(), 10) == []

    async def test_single_job_check(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        later = now_ms() + 60_000
        assert await store.claim_job_check(job.job_id, job.created_at, later) is None
        claimed = await store.claim_job_check(job.job_id, later, later)
        assert claimed is not None and claimed.job_id == job.job_id
        assert await store.claim_job_check(job.job_id, later, later) is None
        assert await store.claim_job_check("job_doesnotexist00", later, later) is None

    async def test_parallel_claims_never_share_a_job(self, store: Store) -> None:
        for _ in range(5):
            await store.charge_and_create_job(new_job("user_a"), 10)
        later = now_ms() + 60_000
        batches = await asyncio.gather(*(store.claim_stale_jobs(later, later, 3) for _ in range(4)))
        ids = [job.job_id for batch in batches for job in batch]
        assert len(ids) == len(set(ids)) == 5


class TestAudit:
    async def test_a_busy_day_balances(self, store: Store) -> None:
        a = await store.charge_and_create_job(new_job("user_a", cost=3), 5)
        b = await store.charge_and_create_job(new_job("user_a", cost=4), 5)
        c = await store.charge_and_create_job(new_job("user_b", cost=5), 5)
        await store.apply_status(a.job_id, StatusUpdate(JobStatus.DONE))
        await store.apply_status(b.job_id, StatusUpdate(JobStatus.FAILED, "X", "y"))
        await store.cancel_job("user_b", c.job_id)
        await store.grant_credits("user_c", 9, "promo")
        assert await store.audit() == []
        totals = await store.ledger_totals()
        assert totals["user_a"] == {"credits": 97, "grants": 100, "charges": 7, "refunds": 4}


class TestJobsUpdatedSince:
    """The event streams' one poll (events.py): every user's changes, oldest first, paged."""

    async def test_every_users_changes_since_a_moment(self, store: Store) -> None:
        before = now_ms() - 1
        a = await store.charge_and_create_job(new_job("user_a"), 5)
        b = await store.charge_and_create_job(new_job("user_b"), 5)
        changed = await store.jobs_updated_since(before, "", 100)
        assert {job.job_id for job in changed} == {a.job_id, b.job_id}
        assert [job.updated_at for job in changed] == sorted(job.updated_at for job in changed)
        assert await store.jobs_updated_since(max(a.updated_at, b.updated_at) + 1, "", 100) == []

    async def test_a_status_change_is_seen_with_its_new_state(self, store: Store) -> None:
        job = await store.charge_and_create_job(new_job("user_a"), 5)
        running, _ = await store.apply_status(job.job_id, StatusUpdate(JobStatus.RUNNING))
        changed = await store.jobs_updated_since(running.updated_at, "", 100)
        assert [(j.job_id, j.status) for j in changed] == [(job.job_id, JobStatus.RUNNING)]

    async def test_pages_walk_every_change_once(self, store: Store) -> None:
        before = now_ms() - 1
        created = [await store.charge_and_create_job(new_job("user_a"), 10) for _ in range(7)]
        seen: list[str] = []
        since, after = before, ""
        while page := await store.jobs_updated_since(since, after, 3):
            seen += [job.job_id for job in page]
            since, after = page[-1].updated_at, page[-1].job_id
        assert sorted(seen) == sorted(job.job_id for job in created)
        assert len(seen) == len(set(seen))
