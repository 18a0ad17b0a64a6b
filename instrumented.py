"""Timed stand-ins for the store, the object storage and RunPod's transport, counting as they go.

Delegation is written out, method by method, rather than generated: each wrapper says which calls
count credits or outcomes, and a type checker sees every signature.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from metrics import Metrics, upstream_failed
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
from r2_client import ObjectInfo, ObjectStorage
from store import Store

T = TypeVar("T")


class InstrumentedStore:
    """A `Store` that times every call and counts the credits and outcomes the store reports.

    Counting follows the store's answers, not our intentions: a refund is counted when
    `apply_status` says the job changed, so a webhook delivered three times counts once.
    """

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks: the wrapped store's extras pass through.
        if name in ("_store", "_metrics"):
            raise AttributeError(name)
        return getattr(self._store, name)

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        with self._metrics.time_upstream("store", operation):
            return await call

    async def _timed_read(self, operation: str, call: Awaitable[T]) -> T:
        """`_timed` written out, for the reads every GET and webhook makes: no timer object, no
        `with`."""
        start = time.perf_counter()
        try:
            result = await call
        except BaseException as exc:
            self._observe(operation, not upstream_failed(exc), start)
            raise
        self._observe(operation, True, start)
        return result

    def _observe(self, operation: str, ok: bool, start: float) -> None:
        self._metrics.observe_upstream("store", operation, ok, time.perf_counter() - start)

    async def find_user(self, user_id: str) -> User | None:
        return await self._timed("find_user", self._store.find_user(user_id))

    async def get_or_create_user(self, user_id: str) -> User:
        call = self._store.get_or_create_user(user_id)
        user = await self._timed_read("get_or_create_user", call)
        # Non-zero only on the one answer that created the user: each signup counts once.
        self._metrics.count_credits("granted", user.signup_grant)
        return user

    async def grant_credits(self, user_id: str, amount: int, reason: str) -> User:
        call = self._store.grant_credits(user_id, amount, reason)
        user = await self._timed("grant_credits", call)
        self._metrics.count_credits("granted", amount + user.signup_grant)
        return user

    async def charge_and_create_job(
        self, new: NewJob, max_active: int, idempotency_key: str | None = None
    ) -> Job:
        call = self._store.charge_and_create_job(new, max_active, idempotency_key)
        job = await self._timed("charge_and_create_job", call)
        self._metrics.count_credits("granted", job.signup_grant)
        self._metrics.count_credits("charged", job.cost)
        return job

    async def record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        call = self._store.record_runpod_id(job_id, runpod_id)
        return await self._timed("record_runpod_id", call)

    async def apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        job, changed = await self._timed("apply_status", self._store.apply_status(job_id, update))
        if changed:
            self._metrics.count_job_settled(job)
        return job, changed

    async def record_progress(self, job_id: str, update: ProgressUpdate) -> tuple[Job, bool]:
        return await self._timed("record_progress", self._store.record_progress(job_id, update))

    async def cancel_job(self, user_id: str, job_id: str) -> Job:
        job = await self._timed("cancel_job", self._store.cancel_job(user_id, job_id))
        self._metrics.count_job_settled(job)
        return job

    async def delete_job(self, user_id: str, job_id: str) -> Job:
        return await self._timed("delete_job", self._store.delete_job(user_id, job_id))

    async def get_job(self, user_id: str, job_id: str) -> Job:
        return await self._timed_read("get_job", self._store.get_job(user_id, job_id))

    async def find_job(self, job_id: str) -> Job | None:
        return await self._timed_read("find_job", self._store.find_job(job_id))

    async def find_job_by_runpod_id(self, runpod_id: str) -> Job | None:
        call = self._store.find_job_by_runpod_id(runpod_id)
        return await self._timed_read("find_job_by_runpod_id", call)

    async def list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage:
        return await self._timed("list_jobs", self._store.list_jobs(user_id, limit, cursor))

    async def jobs_updated_since(self, since: int, after_job_id: str, limit: int) -> list[Job]:
        # Timed like every call: its count per second is the event streams' whole store cost.
        call = self._store.jobs_updated_since(since, after_job_id, limit)
        return await self._timed("jobs_updated_since", call)

    async def save_download_url(
        self, job_id: str, url: str, expires_at: int, poster_url: str | None = None
    ) -> None:
        call = self._store.save_download_url(job_id, url, expires_at, poster_url)
        await self._timed("save_download_url", call)

    async def ledger_totals(self) -> dict[str, dict[str, int]]:
        return await self._timed("ledger_totals", self._store.ledger_totals())

    async def claim_idempotency_key(
        self, user_id: str, key: str, fingerprint: str, now: int, ttl_ms: int, stale_ms: int
    ) -> IdempotencyClaim:
        call = self._store.claim_idempotency_key(user_id, key, fingerprint, now, ttl_ms, stale_ms)
        return await self._timed("claim_idempotency_key", call)

    async def complete_idempotency_key(
        self, user_id: str, key: str, status_code: int, body: str
    ) -> None:
        call = self._store.complete_idempotency_key(user_id, key, status_code, body)
        await self._timed("complete_idempotency_key", call)

    async def release_idempotency_key(self, user_id: str, key: str) -> None:
        call = self._store.release_idempotency_key(user_id, key)
        await self._timed("release_idempotency_key", call)

    async def purge_idempotency_keys(self, before: int, limit: int) -> int:
        call = self._store.purge_idempotency_keys(before, limit)
        return await self._timed("purge_idempotency_keys", call)

    async def claim_stale_jobs(self, stale_before: int, now: int, limit: int) -> list[Job]:
        call = self._store.claim_stale_jobs(stale_before, now, limit)
        return await self._timed("claim_stale_jobs", call)

    async def claim_job_check(self, job_id: str, stale_before: int, now: int) -> Job | None:
        call = self._store.claim_job_check(job_id, stale_before, now)
        return await self._timed("claim_job_check", call)

    async def audit(self) -> list[str]:
        return await self._timed("audit", self._store.audit())

    async def ping(self) -> None:
        await self._timed("ping", self._store.ping())

    async def create_upload(self, upload: Upload, max_pending: int) -> Upload:
        return await self._timed("create_upload", self._store.create_upload(upload, max_pending))

    async def get_upload(self, user_id: str, upload_id: str) -> Upload:
        return await self._timed("get_upload", self._store.get_upload(user_id, upload_id))

    async def purge_expired_uploads(self, before: int, limit: int) -> int:
        call = self._store.purge_expired_uploads(before, limit)
        return await self._timed("purge_expired_uploads", call)

    async def close(self) -> None:
        await self._store.close()


class InstrumentedStorage:
    """An `ObjectStorage` whose HEADs and presigns are timed as upstream `r2`."""

    def __init__(self, storage: ObjectStorage, metrics: Metrics, upstream: str = "r2") -> None:
        self._storage = storage
        self._metrics = metrics
        self._upstream = upstream

    def __getattr__(self, name: str) -> Any:
        if name in ("_storage", "_metrics", "_upstream"):
            raise AttributeError(name)
        return getattr(self._storage, name)

    def presign_get(self, key: str, ttl_seconds: int) -> str:
        with self._metrics.time_upstream(self._upstream, "presign_get"):
            return self._storage.presign_get(key, ttl_seconds)

    def presign_put(self, key: str, ttl_seconds: int, content_type: str) -> str:
        with self._metrics.time_upstream(self._upstream, "presign_put"):
            return self._storage.presign_put(key, ttl_seconds, content_type)

    async def exists(self, key: str) -> bool:
        with self._metrics.time_upstream(self._upstream, "head"):
            return await self._storage.exists(key)

    async def delete(self, key: str) -> None:
        with self._metrics.time_upstream(self._upstream, "delete"):
            await self._storage.delete(key)

    def presign_upload(
        self, key: str, ttl_seconds: int, content_type: str, content_length: int
    ) -> str:
        with self._metrics.time_upstream(self._upstream, "presign_put"):
            return self._storage.presign_upload(key, ttl_seconds, content_type, content_length)

    async def stat(self, key: str) -> ObjectInfo | None:
        with self._metrics.time_upstream(self._upstream, "head"):
            return await self._storage.stat(key)

    async def read_prefix(self, key: str, length: int, etag: str) -> bytes:
        with self._metrics.time_upstream(self._upstream, "get_range"):
            return await self._storage.read_prefix(key, length, etag)

    async def copy_if_unchanged(self, source: str, target: str, etag: str) -> None:
        with self._metrics.time_upstream(self._upstream, "copy"):
            await self._storage.copy_if_unchanged(source, target, etag)

    async def close(self) -> None:
        await self._storage.close()


RUNPOD_OPERATIONS = frozenset(
    {"run", "runsync", "status", "cancel", "health", "stream", "retry", "purge-queue"}
)


def runpod_operation(path: str) -> str:
    """`/v2/<endpoint>/status/<runpod id>` -> `status`: the verb, never the id."""
    for segment in reversed(path.rstrip("/").rsplit("/", 2)[-2:]):
        if segment in RUNPOD_OPERATIONS:
            return segment
    return "other"


class InstrumentedTransport(httpx.AsyncBaseTransport):
    """Times each HTTP exchange until the response headers arrive (RunPod's bodies are small).

    `error` means no answer, or an HTTP status of 400 or more.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        metrics: Metrics,
        upstream: str = "runpod",
        operation_of: Callable[[str], str] = runpod_operation,
    ) -> None:
        self._inner = inner
        self._metrics = metrics
        self._upstream = upstream
        self._operation_of = operation_of

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        operation = self._operation_of(request.url.path)
        start = time.perf_counter()
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            self._observe(operation, False, start)
            raise
        self._observe(operation, response.status_code < 400, start)
        return response

    def _observe(self, operation: str, ok: bool, start: float) -> None:
        elapsed = time.perf_counter() - start
        self._metrics.observe_upstream(self._upstream, operation, ok, elapsed)

    async def aclose(self) -> None:
        await self._inner.aclose()
