"""The store interface, and the embedded SQLite store that backs it on one machine.

Every rule about money or limits is one `Store` call and one transaction, because in production
each call is one Convex mutation (`convex_client.py`). No rule may be split across two calls, or
held in an instance's memory: many gateway instances share one store.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from errors import (
    InsufficientCredits,
    InvalidCursor,
    JobNotCancelable,
    NotFound,
    StoreUnavailable,
    TooManyActiveJobs,
)
from models import (
    ACTIVE_STATUSES,
    REFUNDED_STATUSES,
    Job,
    JobPage,
    JobStatus,
    NewJob,
    StatusUpdate,
    User,
    now_ms,
)

T = TypeVar("T")


class Store(Protocol):
    """What the gateway needs from a store. Each method is atomic."""

    async def get_or_create_user(self, user_id: str) -> User: ...

    async def grant_credits(self, user_id: str, amount: int, reason: str) -> User: ...

    async def charge_and_create_job(self, new: NewJob, max_active: int) -> Job:
        """Check the balance (402), then the active jobs (429), insert, charge: all or nothing."""
        ...

    async def record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        """Remember RunPod's id and move a submitting job to queued."""
        ...

    async def apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        """Move a job forward only; a move to failed/canceled refunds exactly once.

        Returns the job afterwards and whether anything changed.
        """
        ...

    async def cancel_job(self, user_id: str, job_id: str) -> Job: ...

    async def get_job(self, user_id: str, job_id: str) -> Job:
        """The user's job, or `NotFound` (also for another user's job)."""
        ...

    async def find_job(self, job_id: str) -> Job | None: ...

    async def find_job_by_runpod_id(self, runpod_id: str) -> Job | None: ...

    async def list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage: ...

    async def save_download_url(self, job_id: str, url: str, expires_at: int) -> None: ...

    async def ledger_totals(self) -> dict[str, dict[str, int]]:
        """Per user: `credits`, and the sums of `grants`, `charges` and `refunds`."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    credits INTEGER NOT NULL CHECK (credits >= 0),
    plan TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(user_id),
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    image_url TEXT,
    duration_sec INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    cost INTEGER NOT NULL CHECK (cost >= 0),
    object_key TEXT NOT NULL,
    runpod_id TEXT,
    error_code TEXT,
    error_detail TEXT,
    download_url TEXT,
    download_expires_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_user_created ON jobs (user_id, created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_by_user_status ON jobs (user_id, status);
CREATE INDEX IF NOT EXISTS jobs_by_runpod_id ON jobs (runpod_id);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL REFERENCES users(user_id),
    job_id TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'charge', 'refund')),
    amount INTEGER NOT NULL CHECK (amount >= 0),
    reason TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
-- A job is charged once and refunded at most once, whatever the code above does.
CREATE UNIQUE INDEX IF NOT EXISTS ledger_once_per_job ON ledger (job_id, kind)
    WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS ledger_by_user ON ledger (user_id);
"""

_JOB_COLUMNS = (
    "job_id, user_id, status, prompt, image_url, duration_sec, seed, cost, object_key, created_at,"
    " updated_at, runpod_id, error_code, error_detail, download_url, download_expires_at"
)


def _job_from_row(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["status"] = JobStatus(values["status"])
    return Job(**values)


def _user_from_row(row: sqlite3.Row) -> User:
    return User(**dict(row))


def encode_cursor(created_at: int, job_id: str) -> str:
    raw = json.dumps([created_at, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidCursor() from None
    if not isinstance(created_at, int) or not isinstance(job_id, str):
        raise InvalidCursor()
    return created_at, job_id


class SQLiteStore:
    """The embedded store: one SQLite file in WAL mode, one connection on one thread.

    Writes take the database lock up front (`BEGIN IMMEDIATE`), so a check and the write that
    depends on it can never interleave with another writer, even from another process.
    """

    def __init__(self, path: Path, signup_credits: int, default_plan: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.signup_credits = signup_credits
        self.default_plan = default_plan
        # One thread owns the connection: sqlite3 connections are not safe to share across threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db = self._executor.submit(self._connect).result()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # Other processes (a second local instance, an operator command) may hold the write lock.
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        return db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"The job store is unavailable: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- helpers that run inside a transaction --------------------------------------------

    def _user_row(self, db: sqlite3.Connection, user_id: str) -> User:
        row = db.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is not None:
            return _user_from_row(row)
        now = now_ms()
        db.execute(
            "INSERT INTO users (user_id, credits, plan, created_at, updated_at) VALUES (?,?,?,?,?)",
            (user_id, self.signup_credits, self.default_plan, now, now),
        )
        if self.signup_credits:
            self._ledger(db, user_id, None, "grant", self.signup_credits, "signup")
        return User(user_id, self.signup_credits, self.default_plan, now, now)

    @staticmethod
    def _ledger(
        db: sqlite3.Connection,
        user_id: str,
        job_id: str | None,
        kind: str,
        amount: int,
        reason: str,
    ) -> None:
        db.execute(
            "INSERT INTO ledger (user_id, job_id, kind, amount, reason, created_at)"
            " VALUES (?,?,?,?,?,?)",
            (user_id, job_id, kind, amount, reason, now_ms()),
        )

    @staticmethod
    def _add_credits(db: sqlite3.Connection, user_id: str, delta: int) -> None:
        db.execute(
            "UPDATE users SET credits = credits + ?, updated_at = ? WHERE user_id = ?",
            (delta, now_ms(), user_id),
        )

    @staticmethod
    def _job_row(db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    def _refund(self, db: sqlite3.Connection, job: Job, reason: str) -> None:
        # A zero-cost job still gets its refund row: the audit expects one per failed job.
        self._add_credits(db, job.user_id, job.cost)
        self._ledger(db, job.user_id, job.job_id, "refund", job.cost, reason)

    # --- the rules ------------------------------------------------------------------------

    def _get_or_create_user(self, user_id: str) -> User:
        with self._transaction() as db:
            return self._user_row(db, user_id)

    def _grant_credits(self, user_id: str, amount: int, reason: str) -> User:
        with self._transaction() as db:
            self._user_row(db, user_id)
            self._add_credits(db, user_id, amount)
            self._ledger(db, user_id, None, "grant", amount, reason)
            return self._user_row(db, user_id)

    def _charge_and_create_job(self, new: NewJob, max_active: int) -> Job:
        with self._transaction() as db:
            user = self._user_row(db, new.user_id)
            if user.credits < new.cost:
                raise InsufficientCredits(
                    f"This job costs {new.cost} credits; you have {user.credits}"
                )
            placeholders = ",".join("?" * len(ACTIVE_STATUSES))
            (active,) = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE user_id = ? AND status IN ({placeholders})",
                (new.user_id, *ACTIVE_STATUSES),
            ).fetchone()
            if active >= max_active:
                raise TooManyActiveJobs(f"You already have {active} jobs queued or running")
            now = now_ms()
            db.execute(
                "INSERT INTO jobs (job_id, user_id, status, prompt, image_url, duration_sec, seed,"
                " cost, object_key, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    new.job_id,
                    new.user_id,
                    JobStatus.SUBMITTING,
                    new.prompt,
                    new.image_url,
                    new.duration_sec,
                    new.seed,
                    new.cost,
                    new.object_key,
                    now,
                    now,
                ),
            )
            self._add_credits(db, new.user_id, -new.cost)
            self._ledger(db, new.user_id, new.job_id, "charge", new.cost, "job")
            job = self._job_row(db, new.job_id)
            assert job is not None
            return job

    def _record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        with self._transaction() as db:
            now = now_ms()
            db.execute(
                "UPDATE jobs SET runpod_id = COALESCE(runpod_id, ?), updated_at = ?,"
                " status = CASE status WHEN ? THEN ? ELSE status END WHERE job_id = ?",
                (runpod_id, now, JobStatus.SUBMITTING, JobStatus.QUEUED, job_id),
            )
            job = self._job_row(db, job_id)
            if job is None:
                raise NotFound("Job not found")
            return job

    def _apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        with self._transaction() as db:
            job = self._job_row(db, job_id)
            if job is None:
                raise NotFound("Job not found")
            if update.status.rank <= job.status.rank:
                return job, False
            db.execute(
                "UPDATE jobs SET status = ?, error_code = ?, error_detail = ?,"
                " runpod_id = COALESCE(runpod_id, ?), updated_at = ? WHERE job_id = ?",
                (
                    update.status,
                    update.error_code,
                    update.error_detail,
                    update.runpod_id,
                    now_ms(),
                    job_id,
                ),
            )
            if update.status in REFUNDED_STATUSES:
                self._refund(db, job, update.status.value)
            changed = self._job_row(db, job_id)
            assert changed is not None
            return changed, True

    def _cancel_job(self, user_id: str, job_id: str) -> Job:
        with self._transaction() as db:
            job = self._job_row(db, job_id)
            if job is None or job.user_id != user_id:
                raise NotFound("Job not found")
            if job.status.is_terminal:
                raise JobNotCancelable(f"The job is already {job.status.public.value}")
            db.execute(
                "UPDATE jobs SET status = ?, error_code = ?, error_detail = ?, updated_at = ?"
                " WHERE job_id = ?",
                (JobStatus.CANCELED, "CANCELED", "Canceled by the user", now_ms(), job_id),
            )
            self._refund(db, job, "canceled")
            canceled = self._job_row(db, job_id)
            assert canceled is not None
            return canceled

    def _find_job(self, job_id: str) -> Job | None:
        return self._job_row(self._db, job_id)

    def _find_job_by_runpod_id(self, runpod_id: str) -> Job | None:
        row = self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE runpod_id = ?", (runpod_id,)
        ).fetchone()
        return None if row is None else _job_from_row(row)

    def _list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage:
        query = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = ?"
        params: list[Any] = [user_id]
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query += " AND (created_at, job_id) < (?, ?)"
            params += [created_at, job_id]
        query += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
        rows = self._db.execute(query, (*params, limit + 1)).fetchall()
        jobs = [_job_from_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        next_cursor = encode_cursor(jobs[-1].created_at, jobs[-1].job_id) if more else None
        return JobPage(jobs=jobs, next_cursor=next_cursor)

    def _save_download_url(self, job_id: str, url: str, expires_at: int) -> None:
        self._db.execute(
            "UPDATE jobs SET download_url = ?, download_expires_at = ? WHERE job_id = ?",
            (url, expires_at, job_id),
        )

    # --- the async interface --------------------------------------------------------------

    async def get_or_create_user(self, user_id: str) -> User:
        return await self._run(self._get_or_create_user, user_id)

    async def grant_credits(self, user_id: str, amount: int, reason: str) -> User:
        return await self._run(self._grant_credits, user_id, amount, reason)

    async def charge_and_create_job(self, new: NewJob, max_active: int) -> Job:
        return await self._run(self._charge_and_create_job, new, max_active)

    async def record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        return await self._run(self._record_runpod_id, job_id, runpod_id)

    async def apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        return await self._run(self._apply_status, job_id, update)

    async def cancel_job(self, user_id: str, job_id: str) -> Job:
        return await self._run(self._cancel_job, user_id, job_id)

    async def get_job(self, user_id: str, job_id: str) -> Job:
        job = await self._run(self._find_job, job_id)
        if job is None or job.user_id != user_id:
            raise NotFound("Job not found")
        return job

    async def find_job(self, job_id: str) -> Job | None:
        return await self._run(self._find_job, job_id)

    async def find_job_by_runpod_id(self, runpod_id: str) -> Job | None:
        return await self._run(self._find_job_by_runpod_id, runpod_id)

    async def list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage:
        return await self._run(self._list_jobs, user_id, limit, cursor)

    async def save_download_url(self, job_id: str, url: str, expires_at: int) -> None:
        await self._run(self._save_download_url, job_id, url, expires_at)

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    # --- operator views (used by manage.py, not by the request path) ----------------------

    def _ledger_totals(self) -> dict[str, dict[str, int]]:
        rows = self._db.execute(
            "SELECT u.user_id, u.credits,"
            " COALESCE(SUM(CASE l.kind WHEN 'grant' THEN l.amount END), 0) AS grants,"
            " COALESCE(SUM(CASE l.kind WHEN 'charge' THEN l.amount END), 0) AS charges,"
            " COALESCE(SUM(CASE l.kind WHEN 'refund' THEN l.amount END), 0) AS refunds"
            " FROM users u LEFT JOIN ledger l ON l.user_id = u.user_id GROUP BY u.user_id"
        ).fetchall()
        return {
            row["user_id"]: {k: row[k] for k in ("credits", "grants", "charges", "refunds")}
            for row in rows
        }

    async def ledger_totals(self) -> dict[str, dict[str, int]]:
        """Per user: the balance and the sums of grants, charges and refunds."""
        return await self._run(self._ledger_totals)
