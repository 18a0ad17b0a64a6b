"""The job lifecycle across the store, RunPod and storage: create, submit, apply outcomes, cancel.

The store owns every rule about money (charge, refund once, forward-only status); this module
decides *which* rule to invoke when RunPod or a user says something (webhooks.py proves a
webhook genuine first).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from config import Settings
from crash_points import crash_point
from errors import (
    GatewayError,
    InvalidRequest,
    InvalidSignature,
    StoreUnavailable,
    UpstreamError,
    UpstreamUnavailable,
)
from models import (
    MAX_SEED,
    CreateJobRequest,
    Job,
    JobResponse,
    JobStatus,
    NewJob,
    ProgressUpdate,
    StatusUpdate,
    new_job_id,
    now_ms,
    object_key_for,
    poster_key_for,
)
from r2_client import VIDEO_CONTENT_TYPE, ObjectStorage, expiry_ms
from runpod_client import (
    RunPodClient,
    RunPodError,
    RunPodNotFound,
    RunPodStatus,
    RunPodSubmitUncertain,
)
from store import Store
from webhooks import progress_token, webhook_token
from worker.contract import (
    CONTRACT_VERSION,
    POSTER_CONTENT_TYPE,
    OutputTarget,
    ProgressReport,
    WorkerInput,
    WorkerOutput,
)

log = logging.getLogger("gateway.jobs")

# RunPod counts ttl from when it received the job, a moment after we recorded it.
DEADLINE_GRACE_SECONDS = 10
# How each store says it failed: SQLite locked or gone, Convex unreachable or answering nonsense.
STORE_FAILURES = (StoreUnavailable, UpstreamUnavailable, UpstreamError)
STALE_POLL_TIMEOUT_SECONDS = 2.5  # a polling client waits at most this for a fresh answer
# Reuse a download URL while more than an hour of it remains, so a browser that starts playing
# it just before expiry can still finish the video.
URL_REUSE_MARGIN_MS = 3_600_000


# --- The worker contract: proof that a RunPod job is ours -------------------------------------
#
# RunPod does not sign webhooks, and a per-job URL token can leak: whoever holds it could name
# *another* RunPod job in the body. So a RunPod id is bound to a job only when RunPod's own
# `/status` answer carries our job id, which only the worker can have put there (README, "The
# worker contract"). A handler that succeeds returns `{"jobId": input["jobId"], ...}`: that dict
# becomes the status's `output`. One that fails returns
# `{"error": json.dumps({"jobId": ..., "error_type": ..., "error_message": ...})}`: runpod-python
# pops a returned dict's "error" into the status's `error` unchanged (serverless/modules/
# rp_job.py, `run_job`). An exception that escapes the handler cannot echo: the SDK reports it
# as `json.dumps({"error_type", "error_message", "error_traceback", "hostname", "worker_id",
# "runpod_version"})`, with no room for a field of ours (same function, `except` branch).


def echoed_job_id(status: RunPodStatus) -> str | None:
    """The gateway job id the worker echoed in its output or its error, if any."""
    output = status.output
    if isinstance(output, dict) and isinstance(job_id := output.get("jobId"), str):
        return job_id
    error = status.raw_error
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except (ValueError, RecursionError):
            return None  # plain text, or JSON too deep to be the contract's small object
    if isinstance(error, dict) and isinstance(job_id := error.get("jobId"), str):
        return job_id
    return None


# --- RunPod outcomes --------------------------------------------------------------------------


def uploaded_poster(status: RunPodStatus) -> bool:
    """Whether the worker's output says it uploaded the poster (`WorkerOutput.poster_uploaded`).

    Best effort, like the poster itself: an output that does not parse has no poster, and the
    video alone decides whether the job is done.
    """
    try:
        return WorkerOutput.model_validate(status.output).poster_uploaded
    except ValueError:  # pydantic's ValidationError is a ValueError
        return False


def progress_in_status(status: RunPodStatus) -> ProgressReport | None:
    """The worker's latest `progress_update`, which RunPod's `/status` shows as the output of an
    IN_PROGRESS job: the SDK sends `{"status": "IN_PROGRESS", "output": progress}` to the job's
    result URL (runpod-python `serverless/modules/rp_progress.py`, `_async_progress_update`)."""
    if status.status not in ("IN_PROGRESS", "RUNNING") or not isinstance(status.output, dict):
        return None
    try:
        return ProgressReport.model_validate(status.output)
    except ValueError:
        return None  # another worker's progress shape: the status alone still says running


def update_from_runpod(
    status: RunPodStatus, output_exists: bool | None, poster_key: str | None = None
) -> StatusUpdate | None:
    """What a RunPod status means for our job; None when it means nothing (unknown status).

    `poster_key` is the job's poster, recorded with DONE only if the worker says it uploaded it.
    """
    mapping = {
        "IN_QUEUE": StatusUpdate(JobStatus.QUEUED),
        "IN_PROGRESS": StatusUpdate(JobStatus.RUNNING),
        "RUNNING": StatusUpdate(JobStatus.RUNNING),
        "FAILED": StatusUpdate(
            JobStatus.FAILED, "WORKER_FAILED", status.error or "The video worker failed"
        ),
        "TIMED_OUT": StatusUpdate(
            JobStatus.FAILED, "TIMED_OUT", "The video took too long to render"
        ),
        "CANCELLED": StatusUpdate(JobStatus.CANCELED, "CANCELED", "The job was canceled upstream"),
    }
    if status.status == "COMPLETED":
        if output_exists:
            poster = poster_key if uploaded_poster(status) else None
            return StatusUpdate(JobStatus.DONE, runpod_id=status.id, poster_key=poster)
        return StatusUpdate(
            JobStatus.FAILED, "OUTPUT_MISSING", "The worker finished but no video was stored"
        )
    update = mapping.get(status.status)
    if update is None:
        return None
    return StatusUpdate(update.status, update.error_code, update.error_detail, status.id)


# Jobs whose rendered answer is kept: a job is read (polled) far more often than it changes.
ANSWER_CACHE_SIZE = 512


@functools.lru_cache(maxsize=ANSWER_CACHE_SIZE)
def rendered_answer(job: Job) -> bytes:
    """`JobResponse.from_job(job)` as JSON, by pydantic-core. Kept per `Job` value (every field:
    a frozen dataclass's equality), since the answer is a function of the job alone: building
    and dumping the model was 7 µs of a poll's ~100 (issue 13). Any change to the job, a new
    URL included, is another key."""
    return JobResponse.from_job(job).model_dump_json(by_alias=True).encode()


@dataclass
class JobService:
    settings: Settings
    store: Store
    runpod: RunPodClient
    storage: ObjectStorage
    webhook_secret: str
    public_base_url: str
    # Now, in epoch milliseconds: every time read below goes through it, so a test can move it.
    clock: Callable[[], int] = now_ms

    # --- create -----------------------------------------------------------------------

    async def create(
        self, user_id: str, request: CreateJobRequest, idempotency_key: str | None = None
    ) -> Job:
        """Charge and record the job, then submit it; a refused submission is refunded."""
        job_id = new_job_id()
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        new = NewJob(
            job_id=job_id,
            user_id=user_id,
            prompt=request.prompt,
            image_url=request.image_url,
            duration_sec=request.duration_sec,
            seed=seed,
            cost=request.duration_sec * self.settings.credits_per_second,
            object_key=object_key_for(user_id, job_id),
        )
        job = await self.store.charge_and_create_job(
            new, self.settings.max_concurrent_jobs, idempotency_key
        )
        crash_point("after_charge")
        return await self._submit(job)

    async def _submit(self, job: Job) -> Job:
        try:
            runpod_id = await self.runpod.submit(
                self._worker_input(job),
                self.webhook_url(job.job_id),
                execution_timeout_ms=self.settings.runpod_execution_timeout_seconds * 1000,
                ttl_ms=self.settings.runpod_job_ttl_seconds * 1000,
            )
        except RunPodSubmitUncertain:
            # RunPod may have started it: a resubmit could bill twice. The webhook URL names our
            # job, and the reconciler settles it if no word ever comes.
            log.warning("runpod submit outcome unknown; job %s left submitting", job.job_id)
            return job
        except RunPodError as exc:
            await self.store.apply_status(
                job.job_id, StatusUpdate(JobStatus.FAILED, "SUBMIT_FAILED", exc.detail)
            )
            raise
        crash_point("after_submit")
        try:
            return await self.store.record_runpod_id(job.job_id, runpod_id)
        except STORE_FAILURES:
            # RunPod has the job and will run it, charged: the answer is its id. An error here
            # would invite a retry, and so a second job. The webhook names our job and records
            # the id then, as after a crash at this point.
            log.warning("runpod accepted job %s but its id was not recorded", job.job_id)
            return job

    def _worker_input(self, job: Job) -> dict[str, object]:
        """The RunPod job's input, built through the contract's schema the worker parses with."""
        upload_ttl = (
            self.settings.runpod_job_ttl_seconds + self.settings.runpod_execution_timeout_seconds
        )
        poster_key = poster_key_for(job.object_key)
        return WorkerInput(
            contract_version=CONTRACT_VERSION,
            job_id=job.job_id,
            prompt=job.prompt,
            image_url=job.image_url,
            duration_sec=job.duration_sec,
            seed=job.seed,
            progress_url=self.progress_url(job.job_id),
            output=OutputTarget(
                upload_url=self.storage.presign_put(job.object_key, upload_ttl, VIDEO_CONTENT_TYPE),
                object_key=job.object_key,
                content_type=VIDEO_CONTENT_TYPE,
                poster_upload_url=self.storage.presign_put(
                    poster_key, upload_ttl, POSTER_CONTENT_TYPE
                ),
                poster_content_type=POSTER_CONTENT_TYPE,
            ),
        ).to_wire()

    def webhook_url(self, job_id: str) -> str:
        token = webhook_token(self.webhook_secret, job_id)
        return f"{self.public_base_url}/webhooks/runpod?jobId={job_id}&token={token}"

    def progress_url(self, job_id: str) -> str:
        # Its own token: the job's input (which holds this URL) is shown in RunPod's console and
        # echoed in the webhook body, and must not carry the webhook's proof (webhooks.py).
        token = progress_token(self.webhook_secret, job_id)
        return f"{self.public_base_url}/webhooks/runpod/progress?jobId={job_id}&token={token}"

    # --- read -------------------------------------------------------------------------

    async def answer_json(self, job: Job) -> bytes:
        """`answer` as the JSON bytes `GET /jobs/{id}` sends."""
        return rendered_answer(await self.with_download_url(job))

    async def with_download_url(self, job: Job) -> Job:
        """A done job with a presigned URL that has more than an hour left in it."""
        if job.status is not JobStatus.DONE:
            return job
        if self._urls_still_good(job):
            return job
        # The poster's URL is made with the video's, and expires with it: one store write.
        ttl = self.settings.signed_url_ttl_seconds
        url = self.storage.presign_get(job.object_key, ttl)
        poster = self.storage.presign_get(job.poster_key, ttl) if job.poster_key else None
        expires_at = expiry_ms(ttl, self.clock() / 1000)
        await self.store.save_download_url(job.job_id, url, expires_at, poster)
        return replace(job, download_url=url, download_expires_at=expires_at, poster_url=poster)

    def _urls_still_good(self, job: Job) -> bool:
        poster_missing = job.poster_key is not None and job.poster_url is None
        expires = job.download_expires_at or 0
        fresh = expires - self.clock() > URL_REUSE_MARGIN_MS
        return bool(job.download_url) and fresh and not poster_missing

    # --- the worker said how far it got ---------------------------------------------------

    async def record_progress(self, job: Job, report: ProgressReport) -> Job:
        """Record a worker's report under the store's rules (forward only, throttled)."""
        update = ProgressUpdate(report.progress, report.stage, self.clock())
        recorded, written = await self.store.record_progress(job.job_id, update)
        if written and recorded.status is not job.status:
            log.info("job %s moved to %s", job.job_id, recorded.status.value)
        return recorded

    async def remove_late_media(self, job: Job) -> None:
        """RunPod reports on a job the user deleted: its worker may have uploaded since the
        delete (a job canceled while it uploaded), so the objects go again. No proof is needed:
        the keys are the job's own, and deleting is safe to repeat."""
        for key in media_keys(job):
            await self.storage.delete(key)

    async def answer(self, job: Job) -> JobResponse:
        """The job as the API shows it: `GET /jobs/{id}`, the list and every stream event."""
        return JobResponse.from_job(await self.with_download_url(job))

    # --- RunPod said something --------------------------------------------------------

    async def apply_runpod_status(self, job: Job, status: RunPodStatus) -> Job:
        if job.deleted_at is not None:
            await self.remove_late_media(job)
            return job
        if job.status.is_terminal:
            return job
        report = progress_in_status(status)
        if report is not None:
            # RunPod's copy of the worker's progress: recorded as a POSTed report would be, so
            # progress survives a lost POST. It also moves a queued job to running.
            return await self.record_progress(job, report)
        exists = None
        if status.status == "COMPLETED":
            exists = await self.storage.exists(job.object_key)
        update = update_from_runpod(status, exists, poster_key_for(job.object_key))
        if update is None:
            log.warning("ignoring unknown RunPod status %r for %s", status.status, job.job_id)
            return job
        applied, changed = await self.store.apply_status(job.job_id, update)
        if changed:
            log.info("job %s moved to %s", job.job_id, applied.status.value)
        return applied

    async def apply_tokened_webhook(self, job: Job, runpod_id: str) -> Job:
        """A webhook proven only by the job's URL token, whose body names `runpod_id`.

        The body is not trusted: RunPod's own `/status` answer decides, and an id is bound
        only with the worker's echo as proof. Without proof nothing changes (the answer is still
        a 200, so RunPod does not retry): the job waits for a genuine webhook or its deadline.
        """
        if job.deleted_at is not None:
            await self.remove_late_media(job)
            return job
        if job.status.is_terminal:
            return job  # A repeat: nothing to learn, and no need to ask RunPod again.
        if job.runpod_id is None:
            return await self.adopt_if_proven(job, runpod_id)
        if runpod_id != job.runpod_id:
            # RunPod sends a job's webhook only to the URL it was submitted with.
            raise InvalidRequest("The webhook names another RunPod job than this job's")
        return await self.refresh_from_runpod(job, job.runpod_id)

    async def adopt_if_proven(self, job: Job, runpod_id: str) -> Job:
        """Bind `runpod_id` and apply its status, if RunPod's answer echoes this job's id."""
        try:
            status = await self.runpod.status(runpod_id)
        except RunPodNotFound:
            status = None  # an id RunPod does not know proves nothing, least of all a loss
        if status is None or status.id != runpod_id or echoed_job_id(status) != job.job_id:
            log.warning(
                "webhook for %s names RunPod job %r without proof it is this job's: ignored",
                job.job_id,
                runpod_id,
            )
            return job
        return await self.apply_runpod_status(job, status)

    async def refresh_from_runpod(self, job: Job, runpod_id: str) -> Job:
        """Ask RunPod about the job's recorded id and apply its answer."""
        try:
            status = await self.runpod.status(runpod_id)
        except RunPodNotFound:
            update = StatusUpdate(
                JobStatus.FAILED, "UPSTREAM_LOST", "RunPod no longer knows this job"
            )
            applied, _ = await self.store.apply_status(job.job_id, update)
            return applied
        if status.id != runpod_id:
            raise InvalidSignature("RunPod's answer names another job")
        return await self.apply_runpod_status(job, status)

    # --- cancel -----------------------------------------------------------------------

    def deadline_ms(self, job: Job) -> int:
        """When RunPod has surely forgotten the job: past this it can never finish."""
        ttl = self.settings.runpod_job_ttl_seconds + DEADLINE_GRACE_SECONDS
        return job.created_at + ttl * 1000

    async def settle(self, job: Job) -> str:
        """One reconciler look at a quiet job; returns what was done, for logs and metrics."""
        if self.clock() > self.deadline_ms(job):
            await self._expire(job)
            return "expired"
        if not job.runpod_id:
            # The submission's outcome is unknown: RunPod may be running it, and a resubmit
            # could bill twice. Nothing here can name its RunPod id with proof: its webhook
            # (with the worker's echo) or its deadline will settle it.
            return "waiting"
        settled = await self.refresh_from_runpod(job, job.runpod_id)
        return "updated" if settled.status is not job.status else "unchanged"

    async def _expire(self, job: Job) -> None:
        if job.runpod_id:
            try:
                await self.runpod.cancel(job.runpod_id)
            except RunPodError as exc:
                log.warning("could not cancel expired job %s at RunPod: %s", job.job_id, exc)
        update = StatusUpdate(JobStatus.FAILED, "DEADLINE_EXCEEDED", "The job never finished")
        await self.store.apply_status(job.job_id, update)

    async def check_if_stale(self, job: Job) -> Job:
        """On a poll: one bounded status check for a job that has gone quiet, then the result."""
        if job.status.is_terminal:
            return job
        now = self.clock()
        stale_before = now - int(self.settings.effective_reconcile_after_seconds * 1000)
        if (job.checked_at or now) >= stale_before:
            return job  # the common case, decided without a store call
        claimed = await self.store.claim_job_check(job.job_id, stale_before, now)
        if claimed is None:
            return job  # fresh, or another instance is looking at it right now
        try:
            action = await asyncio.wait_for(self.settle(claimed), STALE_POLL_TIMEOUT_SECONDS)
            log.info("stale poll of %s: %s", job.job_id, action)
        except (GatewayError, TimeoutError) as exc:
            log.warning("stale poll of %s could not reach RunPod: %s", job.job_id, exc)
        return await self.store.get_job(job.user_id, job.job_id)

    async def cancel(self, user_id: str, job_id: str) -> Job:
        job = await self.store.get_job(user_id, job_id)
        if not job.status.is_terminal and job.runpod_id:
            try:
                await self.runpod.cancel(job.runpod_id)
            except RunPodNotFound:
                pass  # RunPod already forgot it: nothing left running to stop.
        return await self.store.cancel_job(user_id, job_id)


# --- delete ---------------------------------------------------------------------------------


def media_keys(job: Job) -> list[str]:
    """Every storage object a job owns: what deleting the job must remove.

    The one list: anything the gateway stores for a job is added here. The poster's key is in it
    whether or not the job recorded one: a worker may have uploaded a poster for a job that then
    failed or was canceled, and deleting a missing key is no error.
    """
    return [job.object_key, poster_key_for(job.object_key)]


async def delete_job_and_media(
    store: Store, storage: ObjectStorage, user_id: str, job_id: str
) -> None:
    """Hide the job in the store first, then remove its objects.

    In that order, a failure in between leaves a job the user no longer sees with objects still
    stored, never a visible job without its video. A failed object delete raises (503): the job
    is gone already, and the client's retry, which finds the tombstone, deletes the objects.
    """
    job = await store.delete_job(user_id, job_id)
    for key in media_keys(job):
        await storage.delete(key)


class Reconciler:
    """A background loop that closes every gap a lost webhook or a crash leaves.

    Safe with many instances: each claims its jobs through the store (moving their `checked_at`
    forward), so no two instances act on one job in the same window.
    """

    BATCH = 50

    def __init__(
        self,
        jobs: JobService,
        on_action: Callable[[str], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.jobs = jobs
        self.on_action = on_action or (lambda action: None)
        self._sleep = sleep

    async def run_forever(self) -> None:
        interval = self.jobs.settings.reconcile_interval_seconds
        while True:
            # Jitter spreads instances that started together.
            await self._sleep(interval * random.uniform(0.5, 1.5))
            try:
                await self.reconcile_once()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("reconciler pass failed")

    async def reconcile_once(self) -> dict[str, int]:
        now = self.jobs.clock()
        stale_before = now - int(self.jobs.settings.effective_reconcile_after_seconds * 1000)
        claimed = await self.jobs.store.claim_stale_jobs(stale_before, now, self.BATCH)
        actions: dict[str, int] = {}
        for job in claimed:
            action = await self._settle(job)
            actions[action] = actions.get(action, 0) + 1
        await self.jobs.store.purge_idempotency_keys(now, 500)
        return actions

    async def _settle(self, job: Job) -> str:
        try:
            action = await self.jobs.settle(job)
        except GatewayError as exc:
            log.warning("reconciler could not settle %s: %s", job.job_id, exc.detail)
            action = "error"
        log.info("reconciler: job %s (%s) -> %s", job.job_id, job.status.value, action)
        self.on_action(action)
        return action
