"""The store interface: what the gateway needs from a store, each rule one atomic call.

Every rule about money or limits is one `Store` call and one transaction, because in production
each call is one Convex mutation (`convex_client.py`). No rule may be split across two calls, or
held in an instance's memory: many gateway instances share one store. sqlite_store.py is the
embedded implementation.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from models import (
    IdempotencyClaim,
    Job,
    JobPage,
    NewJob,
    ProgressUpdate,
    StatusUpdate,
    Upload,
    User,
)

T = TypeVar("T")


class Store(Protocol):
    """What the gateway needs from a store. Each method is atomic."""

    async def find_user(self, user_id: str) -> User | None:
        """The user if the store has seen them; creates nothing (for reads and operators)."""
        ...

    async def get_or_create_user(self, user_id: str) -> User:
        """The user, created with the signup credits if new.

        The answer's `signup_grant` is what this call granted: the signup credits if it created
        the user, else 0. `grant_credits` and `charge_and_create_job` also create a new user,
        and report it the same way, so telemetry can count every signup grant once.
        """
        ...

    async def grant_credits(self, user_id: str, amount: int, reason: str) -> User: ...

    async def charge_and_create_job(
        self, new: NewJob, max_active: int, idempotency_key: str | None = None
    ) -> Job:
        """Check the balance (402), then the active jobs (429), insert, charge: all or nothing.

        With an idempotency key, the key's record is linked to the new job in the same step.
        A refusal creates no user either, so only an accepted job can carry a `signup_grant`.
        """
        ...

    async def record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        """Remember RunPod's id and move a submitting job to queued."""
        ...

    async def apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        """Move a job forward only; a move to failed/canceled refunds exactly once.

        Returns the job afterwards and whether anything changed.
        """
        ...

    async def record_progress(self, job_id: str, update: ProgressUpdate) -> tuple[Job, bool]:
        """Record a worker's report; returns the job afterwards and whether it was written.

        The first report moves a queued (or submitting) job to running. A terminal job is never
        changed; progress never decreases and the stage never goes back. The throttle lives in
        this one conditional write, so it holds across instances: a report is written when it is
        the job's first, names a new stage, or comes `PROGRESS_WRITE_INTERVAL_MS` after the last
        write; any other is dropped without a write.
        """
        ...

    async def cancel_job(self, user_id: str, job_id: str) -> Job: ...

    async def delete_job(self, user_id: str, job_id: str) -> Job:
        """Hide a finished job for good: a tombstone, its prompt and image URL cleared.

        Unknown, another user's: `NotFound`. Still queued or running: `JobNotDeletable`,
        decided in the same transaction. Deleted already: the tombstone again, changing nothing.
        The ledger keeps its rows. The answer names the objects to delete (`object_key`).
        From then on `get_job`, `cancel_job` and `list_jobs` no longer see the job.
        """
        ...

    async def get_job(self, user_id: str, job_id: str) -> Job:
        """The user's job, or `NotFound` (also for another user's job)."""
        ...

    async def find_job(self, job_id: str) -> Job | None: ...

    async def find_job_by_runpod_id(self, runpod_id: str) -> Job | None: ...

    async def list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage: ...

    async def jobs_updated_since(self, since: int, after_job_id: str, limit: int) -> list[Job]:
        """Every user's jobs whose `(updated_at, job_id)` comes after `(since, after_job_id)`.

        Oldest change first, at most `limit` (a store may return fewer, never more). One call
        per poll serves all of an instance's event streams (events.py); `after_job_id=""`
        includes every job updated at `since` itself.
        """
        ...

    async def save_download_url(
        self, job_id: str, url: str, expires_at: int, poster_url: str | None = None
    ) -> None:
        """Remember a done job's presigned URLs; the poster's expires with the video's."""
        ...

    async def ledger_totals(self) -> dict[str, dict[str, int]]:
        """Per user: `credits`, and the sums of `grants`, `charges` and `refunds`."""
        ...

    async def claim_idempotency_key(
        self, user_id: str, key: str, fingerprint: str, now: int, ttl_ms: int, stale_ms: int
    ) -> IdempotencyClaim:
        """Claim a key for one request, or learn what became of the request that holds it.

        A different fingerprint under a live key is `IdempotencyKeyReused` (409).
        """
        ...

    async def complete_idempotency_key(
        self, user_id: str, key: str, status_code: int, body: str
    ) -> None: ...

    async def release_idempotency_key(self, user_id: str, key: str) -> None:
        """Forget an in-flight key whose request executed nothing, so it may be retried."""
        ...

    async def purge_idempotency_keys(self, before: int, limit: int) -> int: ...

    async def claim_stale_jobs(self, stale_before: int, now: int, limit: int) -> list[Job]:
        """Active jobs quiet since `stale_before`, marked checked so no one else takes them."""
        ...

    async def claim_job_check(self, job_id: str, stale_before: int, now: int) -> Job | None: ...

    async def audit(self) -> list[str]:
        """Every broken money invariant, as a sentence; empty when the books balance."""
        ...

    # --- uploads (uploads.py) ---

    async def create_upload(self, upload: Upload, max_pending: int) -> Upload:
        """Record an upload, unless the user has `max_pending` whose URL is still live (429).

        Pending means `expires_at` is after this upload's `created_at` (the caller's clock).
        """
        ...

    async def get_upload(self, user_id: str, upload_id: str) -> Upload:
        """The user's upload, or `UploadNotFound` (also for another user's)."""
        ...

    async def purge_expired_uploads(self, before: int, limit: int) -> int:
        """Forget up to `limit` uploads no longer usable at `before`; how many went."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
