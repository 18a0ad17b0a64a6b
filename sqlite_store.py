"""The embedded store: the `Store` interface on one SQLite file, for one machine.

Over 400 lines because it is one class whose every method is one transaction, next to the
schema those transactions share; split, a reader would have to hold both files to check a rule.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

from errors import (
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidCursor,
    JobNotCancelable,
    JobNotDeletable,
    NotFound,
    StoreUnavailable,
    TooManyActiveJobs,
    TooManyPendingUploads,
    UploadNotFound,
)
from models import (
    ACTIVE_STATUSES,
    JOB_ID_PATTERN,
    PROGRESS_STAGE_RANK,
    PROGRESS_WRITE_INTERVAL_MS,
    REFUNDED_STATUSES,
    IdempotencyClaim,
    Job,
    JobPage,
    JobStatus,
    NewJob,
    ProgressUpdate,
    StatusUpdate,
    Upload,
    User,
    now_ms,
)

T = TypeVar("T")


def hmac_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def job_problems(job_id: str, status: JobStatus, charges: int, refunds: int) -> list[str]:
    """What is wrong with one job's ledger rows: one charge, and a refund exactly when failed."""
    problems = []
    if charges != 1:
        problems.append(f"{job_id}: {charges} charges")
    expected = 1 if status in REFUNDED_STATUSES else 0
    if refunds != expected:
        problems.append(f"{job_id} ({status.value}): {refunds} refunds")
    return problems


def progress_to_write(job: Job, update: ProgressUpdate) -> tuple[JobStatus, float, str] | None:
    """The status, progress and stage to write for a report, or None to write nothing.

    The same rules as `recordProgress` in convex/gateway.ts; the contract suite runs both.
    """
    if job.status.is_terminal:
        return None
    if PROGRESS_STAGE_RANK[update.stage] < PROGRESS_STAGE_RANK.get(job.stage or "", -1):
        return None  # a late report of an earlier stage: the job is past it
    first = job.progress_written_at is None
    new_stage = update.stage != job.stage
    if not (first or new_stage):
        if update.now - (job.progress_written_at or 0) < PROGRESS_WRITE_INTERVAL_MS:
            return None  # the throttle: at most one write a second within a stage
        if update.progress <= (job.progress or 0.0):
            return None  # nothing new to say
    progress = max(update.progress, job.progress or 0.0)
    status = JobStatus.RUNNING if job.status.rank < JobStatus.RUNNING.rank else job.status
    return status, progress, update.stage


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
    idempotency_key TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- The last evidence about the job: the reconciler checks jobs that have gone quiet.
    checked_at INTEGER NOT NULL,
    progress REAL,
    stage TEXT,
    progress_written_at INTEGER,
    poster_key TEXT,
    poster_url TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_user_created ON jobs (user_id, created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_by_user_status ON jobs (user_id, status);
CREATE INDEX IF NOT EXISTS jobs_by_runpod_id ON jobs (runpod_id);
CREATE INDEX IF NOT EXISTS jobs_by_status_checked ON jobs (status, checked_at);
-- The event streams' poll: every job changed since a moment (events.py).
CREATE INDEX IF NOT EXISTS jobs_by_updated ON jobs (updated_at, job_id);
CREATE TABLE IF NOT EXISTS idempotency (
    user_id TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    status_code INTEGER,
    body TEXT,
    job_id TEXT,
    claimed_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires_at);
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


# Uploads (uploads.py): no foreign key to users, since an upload costs nothing and creates no user.
UPLOAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
    object_key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    usable_until INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_user_expiry ON uploads (user_id, expires_at);
CREATE INDEX IF NOT EXISTS uploads_by_usable_until ON uploads (usable_until);
"""
_UPLOAD_COLUMNS = (
    "upload_id, user_id, content_type, size_bytes, object_key, created_at, expires_at,"
    " usable_until"
)


def retry_after_seconds(oldest_expiry_ms: int, now_ms: int) -> int:
    """Until the oldest pending upload URL expires and frees a place: at least 1 s."""
    return max(1, -(-(oldest_expiry_ms - now_ms) // 1000))


# Rows build their dataclass by position, so each query names the columns in the dataclass's
# field order: by name, sqlite3.Row finds each column by a case-insensitive scan of all 24, a
# quarter of a job read (issue 13). `signup_grant` is not stored.
_NOT_STORED = frozenset({"signup_grant"})
_JOB_COLUMNS = ", ".join(f.name for f in fields(Job) if f.name not in _NOT_STORED)
_USER_COLUMNS = ", ".join(f.name for f in fields(User) if f.name not in _NOT_STORED)
# Columns added after the first release: a file made before them gets them on open.
_ADDED_JOB_COLUMNS = {
    "progress": "REAL",
    "stage": "TEXT",
    "progress_written_at": "INTEGER",
    "poster_key": "TEXT",
    "poster_url": "TEXT",
}


@contextmanager
def schema_change(db: sqlite3.Connection) -> Iterator[None]:
    """One step for every process: two opening one old file at once must not both add a column
    (the second would fail with "duplicate column name"); the second sees the first's work."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def add_missing_columns(db: sqlite3.Connection) -> None:
    """`CREATE TABLE IF NOT EXISTS` leaves an older file's table as it was: add what it lacks."""
    with schema_change(db):
        present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        for name, kind in _ADDED_JOB_COLUMNS.items():
            if name not in present:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


def _job_from_row(row: sqlite3.Row) -> Job:
    job_id, user_id, status, *rest = row  # _JOB_COLUMNS: Job's fields, in order
    return Job(job_id, user_id, JobStatus(status), *rest)


def _user_from_row(row: sqlite3.Row) -> User:
    return User(*row)  # _USER_COLUMNS: User's fields, in order


def encode_cursor(created_at: int, job_id: str) -> str:
    raw = json.dumps([created_at, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# SQLite's INTEGER is 64-bit signed: a larger number in a cursor would be an OverflowError.
_MAX_SQLITE_INTEGER = 2**63 - 1


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The position a cursor from `encode_cursor` names; anything else is INVALID_CURSOR.

    A cursor is the client's to tamper with: every value is checked before it reaches SQL.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
    # RecursionError: "[[[[..." nests deeper than the parser will go.
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise InvalidCursor() from None
    # `type`, not isinstance: JSON's true is a bool, which is an int to Python.
    if type(created_at) is not int or not 0 <= created_at <= _MAX_SQLITE_INTEGER:
        raise InvalidCursor()
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidCursor()
    return created_at, job_id


# --- deletion: a tombstone on the job row -----------------------------------------------------
#
# A deleted job keeps its row (the ledger's charge and refund rows name it, and the audit checks
# them against its status), marked by `deleted_at`. The user's views skip such rows; the list
# reads them through a partial index that holds only the live ones, so however many jobs a user
# deleted, a page reads no more rows than it returns.


def add_deletion_schema(db: sqlite3.Connection) -> None:
    """Add `jobs.deleted_at` to a file made before it, and the index of the live jobs."""
    with schema_change(db):
        columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        if "deleted_at" not in columns:
            db.execute("ALTER TABLE jobs ADD COLUMN deleted_at INTEGER")
        db.execute(
            "CREATE INDEX IF NOT EXISTS jobs_live_by_user_created"
            " ON jobs (user_id, created_at DESC, job_id DESC) WHERE deleted_at IS NULL"
        )


def _live_job_row(db: sqlite3.Connection, job_id: str) -> Job | None:
    """The job unless it was deleted: what a user may see of it."""
    row = db.execute(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ? AND deleted_at IS NULL", (job_id,)
    ).fetchone()
    return None if row is None else _job_from_row(row)


class SQLiteStore:
    """The embedded store: one SQLite file in WAL mode, one connection on one thread.

    Writes take the database lock up front (`BEGIN IMMEDIATE`), so a check and the write that
    depends on it can never interleave with another writer, even from another process.
    """

    def __init__(
        self, path: Path, signup_credits: int, default_plan: str, busy_timeout_ms: int = 5000
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.signup_credits = signup_credits
        self.default_plan = default_plan
        self.busy_timeout_ms = busy_timeout_ms
        # One thread owns the connection: sqlite3 connections are not safe to share across threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db = self._executor.submit(self._connect).result()
        self._reader = self._connect_reader()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit is on disk when the process dies (kill -9 loses nothing), and is
        # fsynced at the next checkpoint rather than at once. FULL costs ~400 µs a commit here, two
        # per create. A power loss can roll back the last moments of job traffic to a consistent
        # point (a charge with its job, a refund with its status), which the reconciler settles
        # again from RunPod. Money paid in is fsynced at once: see `_durable_transaction`.
        db.execute("PRAGMA synchronous=NORMAL")
        # Other processes (a second local instance, an operator command) may hold the write lock.
        db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        add_deletion_schema(db)
        add_missing_columns(db)
        db.executescript(UPLOAD_SCHEMA)
        return db

    def _connect_reader(self) -> sqlite3.Connection:
        # Plain reads run on the event loop itself, on this second connection. In WAL mode a
        # reader never waits for the writer, and an indexed lookup takes a few µs, while a hop
        # to the store's thread and back costs 25-75 µs. It never waits for a lock either
        # (busy_timeout 0): a read that finds the file busy goes to the store's thread instead.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=0")
        db.execute("PRAGMA query_only=ON")
        return db

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)`, a read: on the loop if the file lets it, else on the thread."""
        try:
            return fn(self._reader, *args)
        except sqlite3.OperationalError:
            return await self._run(fn, self._db, *args)

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

    @contextmanager
    def _durable_transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction fsynced at its commit, for what nothing else could restore (grants).

        Syncing the log at this commit also makes every earlier commit durable.
        """
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction() as db:
                yield db
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    # --- helpers that run inside a transaction --------------------------------------------

    def _user_row(self, db: sqlite3.Connection, user_id: str) -> User:
        found = self._find_user(db, user_id)
        if found is not None:
            return found
        now = now_ms()
        db.execute(
            "INSERT INTO users (user_id, credits, plan, created_at, updated_at) VALUES (?,?,?,?,?)",
            (user_id, self.signup_credits, self.default_plan, now, now),
        )
        if self.signup_credits:
            self._ledger(db, user_id, None, "grant", self.signup_credits, "signup")
        plan = self.default_plan
        return User(user_id, self.signup_credits, plan, now, now, signup_grant=self.signup_credits)

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

    @staticmethod
    def _find_user(db: sqlite3.Connection, user_id: str) -> User | None:
        row = db.execute(
            f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = ?", (user_id,)
        ).fetchone()
        return None if row is None else _user_from_row(row)

    def _get_or_create_user(self, user_id: str) -> User:
        with self._transaction() as db:
            return self._user_row(db, user_id)

    def _grant_credits(self, user_id: str, amount: int, reason: str) -> User:
        with self._durable_transaction() as db:
            before = self._user_row(db, user_id)
            self._add_credits(db, user_id, amount)
            self._ledger(db, user_id, None, "grant", amount, reason)
            after = self._user_row(db, user_id)
            return replace(after, signup_grant=before.signup_grant)

    def _charge_and_create_job(
        self, new: NewJob, max_active: int, idempotency_key: str | None
    ) -> Job:
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
                " cost, object_key, created_at, updated_at, checked_at, idempotency_key)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                    now,
                    idempotency_key,
                ),
            )
            if idempotency_key is not None:
                db.execute(
                    "UPDATE idempotency SET job_id = ? WHERE user_id = ? AND key = ?",
                    (new.job_id, new.user_id, idempotency_key),
                )
            self._add_credits(db, new.user_id, -new.cost)
            self._ledger(db, new.user_id, new.job_id, "charge", new.cost, "job")
            job = self._job_row(db, new.job_id)
            assert job is not None
            return replace(job, signup_grant=user.signup_grant)

    def _record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        with self._transaction() as db:
            now = now_ms()
            db.execute(
                "UPDATE jobs SET runpod_id = COALESCE(runpod_id, ?), updated_at = ?,"
                " checked_at = ?, status = CASE status WHEN ? THEN ? ELSE status END"
                " WHERE job_id = ?",
                (runpod_id, now, now, JobStatus.SUBMITTING, JobStatus.QUEUED, job_id),
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
            now = now_ms()
            db.execute(
                "UPDATE jobs SET status = ?, error_code = ?, error_detail = ?,"
                " runpod_id = COALESCE(runpod_id, ?), poster_key = COALESCE(?, poster_key),"
                " updated_at = ?, checked_at = ? WHERE job_id = ?",
                (
                    update.status,
                    update.error_code,
                    update.error_detail,
                    update.runpod_id,
                    update.poster_key,
                    now,
                    now,
                    job_id,
                ),
            )
            if update.status in REFUNDED_STATUSES:
                self._refund(db, job, update.status.value)
            changed = self._job_row(db, job_id)
            assert changed is not None
            return changed, True

    def _record_progress(self, job_id: str, update: ProgressUpdate) -> tuple[Job, bool]:
        # BEGIN IMMEDIATE: the check and the write are one step for every process on the file.
        with self._transaction() as db:
            job = self._job_row(db, job_id)
            if job is None:
                raise NotFound("Job not found")
            write = progress_to_write(job, update)
            if write is None:
                return job, False
            status, progress, stage = write
            # `checked_at` stays: progress is no proof the job will end, and a job the reconciler
            # never picks would never meet its deadline (a leaked token could hold back a refund
            # for ever). `updated_at` is the store's clock, as for every other write, so that an
            # event stream orders this write among them; `progress_written_at` is the caller's,
            # the clock the throttle compares it with.
            db.execute(
                "UPDATE jobs SET status = ?, progress = ?, stage = ?, progress_written_at = ?,"
                " updated_at = ? WHERE job_id = ?",
                (status, progress, stage, update.now, now_ms(), job_id),
            )
            written = self._job_row(db, job_id)
            assert written is not None
            return written, True

    def _cancel_job(self, user_id: str, job_id: str) -> Job:
        with self._transaction() as db:
            job = _live_job_row(db, job_id)
            if job is None or job.user_id != user_id:
                raise NotFound("Job not found")
            if job.status.is_terminal:
                raise JobNotCancelable(f"The job is already {job.status.public.value}")
            now = now_ms()
            db.execute(
                "UPDATE jobs SET status = ?, error_code = ?, error_detail = ?, updated_at = ?,"
                " checked_at = ? WHERE job_id = ?",
                (JobStatus.CANCELED, "CANCELED", "Canceled by the user", now, now, job_id),
            )
            self._refund(db, job, "canceled")
            canceled = self._job_row(db, job_id)
            assert canceled is not None
            return canceled

    @staticmethod
    def _find_job_by_runpod_id(db: sqlite3.Connection, runpod_id: str) -> Job | None:
        row = db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE runpod_id = ?", (runpod_id,)
        ).fetchone()
        return None if row is None else _job_from_row(row)

    @staticmethod
    def _list_jobs(db: sqlite3.Connection, user_id: str, limit: int, cursor: str | None) -> JobPage:
        query = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = ? AND deleted_at IS NULL"
        params: list[Any] = [user_id]
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query += " AND (created_at, job_id) < (?, ?)"
            params += [created_at, job_id]
        query += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
        rows = db.execute(query, (*params, limit + 1)).fetchall()
        jobs = [_job_from_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        next_cursor = encode_cursor(jobs[-1].created_at, jobs[-1].job_id) if more else None
        return JobPage(jobs=jobs, next_cursor=next_cursor)

    @staticmethod
    def _jobs_updated_since(
        db: sqlite3.Connection, since: int, after_job_id: str, limit: int
    ) -> list[Job]:
        rows = db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE (updated_at, job_id) > (?, ?)"
            " ORDER BY updated_at, job_id LIMIT ?",
            (since, after_job_id, limit),
        ).fetchall()
        return [_job_from_row(row) for row in rows]

    def _save_download_url(
        self, job_id: str, url: str, expires_at: int, poster_url: str | None
    ) -> None:
        self._db.execute(
            # Not onto a tombstone: a read that began before a delete must not bring URLs back.
            "UPDATE jobs SET download_url = ?, download_expires_at = ?, poster_url = ?"
            " WHERE job_id = ? AND deleted_at IS NULL",
            (url, expires_at, poster_url, job_id),
        )

    def _delete_job(self, user_id: str, job_id: str) -> Job:
        with self._transaction() as db:
            job = self._job_row(db, job_id)
            if job is None or job.user_id != user_id:
                raise NotFound("Job not found")
            if _live_job_row(db, job_id) is None:
                return job  # deleted already: a repeat changes nothing
            if not job.status.is_terminal:
                raise JobNotDeletable(
                    f"The job is still {job.status.public.value}: cancel it first"
                )
            now = now_ms()
            # The prompt and image URL are the user's content: gone with the video. What stays
            # is what the money records need (id, user, status, cost, times).
            db.execute(
                "UPDATE jobs SET deleted_at = ?, updated_at = ?, prompt = '', image_url = NULL,"
                " error_detail = NULL, download_url = NULL, download_expires_at = NULL,"
                " poster_url = NULL"
                " WHERE job_id = ?",
                (now, now, job_id),
            )
            deleted = self._job_row(db, job_id)
            assert deleted is not None
            return deleted

    # --- idempotency keys -------------------------------------------------------------------

    def _claim_idempotency_key(
        self, user_id: str, key: str, fingerprint: str, now: int, ttl_ms: int, stale_ms: int
    ) -> IdempotencyClaim:
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM idempotency WHERE user_id = ? AND key = ?", (user_id, key)
            ).fetchone()
            if row is None or row["expires_at"] <= now:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency (user_id, key, fingerprint, state,"
                    " claimed_at, expires_at) VALUES (?,?,?,'in_flight',?,?)",
                    (user_id, key, fingerprint, now, now + ttl_ms),
                )
                return IdempotencyClaim("claimed")
            return self._existing_claim(db, row, fingerprint, now, stale_ms)

    @staticmethod
    def _existing_claim(
        db: sqlite3.Connection, row: sqlite3.Row, fingerprint: str, now: int, stale_ms: int
    ) -> IdempotencyClaim:
        if not hmac_equal(row["fingerprint"], fingerprint):
            raise IdempotencyKeyReused()
        if row["state"] == "done":
            return IdempotencyClaim("replay", row["status_code"], row["body"], row["job_id"])
        if now - row["claimed_at"] < stale_ms:
            return IdempotencyClaim("in_flight", job_id=row["job_id"])
        # The request that claimed it died: take over, keeping any job it had already charged.
        db.execute(
            "UPDATE idempotency SET claimed_at = ? WHERE user_id = ? AND key = ?",
            (now, row["user_id"], row["key"]),
        )
        return IdempotencyClaim("claimed", job_id=row["job_id"])

    def _complete_idempotency_key(self, user_id: str, key: str, status: int, body: str) -> None:
        self._db.execute(
            "UPDATE idempotency SET state = 'done', status_code = ?, body = ?"
            " WHERE user_id = ? AND key = ?",
            (status, body, user_id, key),
        )

    def _release_idempotency_key(self, user_id: str, key: str) -> None:
        self._db.execute(
            "DELETE FROM idempotency WHERE user_id = ? AND key = ? AND state = 'in_flight'",
            (user_id, key),
        )

    def _purge_idempotency_keys(self, before: int, limit: int) -> int:
        cursor = self._db.execute(
            "DELETE FROM idempotency WHERE rowid IN"
            " (SELECT rowid FROM idempotency WHERE expires_at < ? LIMIT ?)",
            (before, limit),
        )
        return cursor.rowcount

    # --- the reconciler's claims ------------------------------------------------------------

    def _claim_stale_jobs(self, stale_before: int, now: int, limit: int) -> list[Job]:
        with self._transaction() as db:
            placeholders = ",".join("?" * len(ACTIVE_STATUSES))
            rows = db.execute(
                f"SELECT job_id FROM jobs WHERE status IN ({placeholders}) AND checked_at < ?"
                " ORDER BY checked_at LIMIT ?",
                (*ACTIVE_STATUSES, stale_before, limit),
            ).fetchall()
            return [self._claim(db, row["job_id"], now) for row in rows]

    def _claim_job_check(self, job_id: str, stale_before: int, now: int) -> Job | None:
        with self._transaction() as db:
            job = self._job_row(db, job_id)
            if job is None or job.status.is_terminal or (job.checked_at or 0) >= stale_before:
                return None
            return self._claim(db, job_id, now)

    def _claim(self, db: sqlite3.Connection, job_id: str, now: int) -> Job:
        # Moving checked_at forward is the claim: other instances now see the job as fresh.
        db.execute("UPDATE jobs SET checked_at = ? WHERE job_id = ?", (now, job_id))
        job = self._job_row(db, job_id)
        assert job is not None
        return job

    # --- the audit ----------------------------------------------------------------------------

    def _audit(self) -> list[str]:
        problems = [
            f"{user}: balance {t['credits']} != grants {t['grants']} - charges {t['charges']}"
            f" + refunds {t['refunds']}"
            for user, t in self._ledger_totals().items()
            if t["credits"] != t["grants"] - t["charges"] + t["refunds"]
        ]
        rows = self._db.execute(
            "SELECT j.job_id, j.status,"
            " (SELECT COUNT(*) FROM ledger l WHERE l.job_id = j.job_id AND kind = 'charge') AS c,"
            " (SELECT COUNT(*) FROM ledger l WHERE l.job_id = j.job_id AND kind = 'refund') AS r"
            " FROM jobs j"
        ).fetchall()
        for row in rows:
            problems += job_problems(row["job_id"], JobStatus(row["status"]), row["c"], row["r"])
        return problems

    # --- uploads --------------------------------------------------------------------------

    def _create_upload(self, upload: Upload, max_pending: int) -> Upload:
        with self._transaction() as db:
            pending = db.execute(
                "SELECT COUNT(*) AS n, MIN(expires_at) AS oldest FROM uploads"
                " WHERE user_id = ? AND expires_at > ?",
                (upload.user_id, upload.created_at),
            ).fetchone()
            if pending["n"] >= max_pending:
                raise TooManyPendingUploads(
                    f"You have {pending['n']} uploads pending; the limit is {max_pending}",
                    retry_after=retry_after_seconds(pending["oldest"], upload.created_at),
                )
            db.execute(
                f"INSERT INTO uploads ({_UPLOAD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                (
                    upload.upload_id,
                    upload.user_id,
                    upload.content_type,
                    upload.size_bytes,
                    upload.object_key,
                    upload.created_at,
                    upload.expires_at,
                    upload.usable_until,
                ),
            )
            return upload

    @staticmethod
    def _upload_row(db: sqlite3.Connection, upload_id: str) -> Upload | None:
        row = db.execute(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE upload_id = ?", (upload_id,)
        ).fetchone()
        return None if row is None else Upload(**dict(row))

    def _purge_expired_uploads(self, before: int, limit: int) -> int:
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM uploads WHERE upload_id IN (SELECT upload_id FROM uploads"
                " WHERE usable_until <= ? ORDER BY usable_until LIMIT ?)",
                (before, limit),
            ).rowcount

    async def create_upload(self, upload: Upload, max_pending: int) -> Upload:
        return await self._run(self._create_upload, upload, max_pending)

    async def get_upload(self, user_id: str, upload_id: str) -> Upload:
        upload = await self._read(self._upload_row, upload_id)
        if upload is None or upload.user_id != user_id:
            raise UploadNotFound()
        return upload

    async def purge_expired_uploads(self, before: int, limit: int) -> int:
        return await self._run(self._purge_expired_uploads, before, limit)

    # --- the async interface --------------------------------------------------------------

    async def find_user(self, user_id: str) -> User | None:
        return await self._read(self._find_user, user_id)

    async def get_or_create_user(self, user_id: str) -> User:
        # Nearly always a read: only a user's first request takes the write lock.
        user = await self.find_user(user_id)
        if user is not None:
            return user
        return await self._run(self._get_or_create_user, user_id)

    async def grant_credits(self, user_id: str, amount: int, reason: str) -> User:
        return await self._run(self._grant_credits, user_id, amount, reason)

    async def charge_and_create_job(
        self, new: NewJob, max_active: int, idempotency_key: str | None = None
    ) -> Job:
        return await self._run(self._charge_and_create_job, new, max_active, idempotency_key)

    async def record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        return await self._run(self._record_runpod_id, job_id, runpod_id)

    async def apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        return await self._run(self._apply_status, job_id, update)

    async def record_progress(self, job_id: str, update: ProgressUpdate) -> tuple[Job, bool]:
        # A read first, on the loop: a report it refuses would be refused in the transaction
        # too (every field the rules read only moves forward), so most throttled reports never
        # take the write lock that charges and refunds wait on.
        seen = await self._read(self._job_row, job_id)
        if seen is not None and progress_to_write(seen, update) is None:
            return seen, False
        return await self._run(self._record_progress, job_id, update)

    async def cancel_job(self, user_id: str, job_id: str) -> Job:
        return await self._run(self._cancel_job, user_id, job_id)

    async def delete_job(self, user_id: str, job_id: str) -> Job:
        return await self._run(self._delete_job, user_id, job_id)

    async def get_job(self, user_id: str, job_id: str) -> Job:
        job = await self._read(_live_job_row, job_id)
        if job is None or job.user_id != user_id:
            raise NotFound("Job not found")
        return job

    async def find_job(self, job_id: str) -> Job | None:
        return await self._read(self._job_row, job_id)

    async def find_job_by_runpod_id(self, runpod_id: str) -> Job | None:
        return await self._read(self._find_job_by_runpod_id, runpod_id)

    async def list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage:
        return await self._read(self._list_jobs, user_id, limit, cursor)

    async def jobs_updated_since(self, since: int, after_job_id: str, limit: int) -> list[Job]:
        return await self._read(self._jobs_updated_since, since, after_job_id, limit)

    async def save_download_url(
        self, job_id: str, url: str, expires_at: int, poster_url: str | None = None
    ) -> None:
        await self._run(self._save_download_url, job_id, url, expires_at, poster_url)

    async def claim_idempotency_key(
        self, user_id: str, key: str, fingerprint: str, now: int, ttl_ms: int, stale_ms: int
    ) -> IdempotencyClaim:
        return await self._run(
            self._claim_idempotency_key, user_id, key, fingerprint, now, ttl_ms, stale_ms
        )

    async def complete_idempotency_key(
        self, user_id: str, key: str, status_code: int, body: str
    ) -> None:
        await self._run(self._complete_idempotency_key, user_id, key, status_code, body)

    async def release_idempotency_key(self, user_id: str, key: str) -> None:
        await self._run(self._release_idempotency_key, user_id, key)

    async def purge_idempotency_keys(self, before: int, limit: int) -> int:
        return await self._run(self._purge_idempotency_keys, before, limit)

    async def claim_stale_jobs(self, stale_before: int, now: int, limit: int) -> list[Job]:
        return await self._run(self._claim_stale_jobs, stale_before, now, limit)

    async def claim_job_check(self, job_id: str, stale_before: int, now: int) -> Job | None:
        return await self._run(self._claim_job_check, job_id, stale_before, now)

    async def audit(self) -> list[str]:
        return await self._run(self._audit)

    async def ping(self) -> None:
        # A read of a real table: `SELECT 1` never touches the file, so it would pass with the
        # file gone or unreadable. On the store's thread, so a stuck writer shows too.
        await self._run(lambda: self._db.execute("SELECT 1 FROM users LIMIT 1").fetchone())

    async def close(self) -> None:
        self._reader.close()
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
