"""What only the SQLite store promises: reads that never wait for a writer, and durable grants.

The rules both stores share are in `test_store_contract.py`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from errors import NotFound, StoreUnavailable
from models import JobStatus, StatusUpdate
from sqlite_store import SQLiteStore
from tests.factories import new_job


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    sqlite = SQLiteStore(tmp_path / "gateway.db", 100, "starter", busy_timeout_ms=50)
    yield sqlite
    await sqlite.close()


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process (an operator command, a second instance) in a long write transaction."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        other.execute("ROLLBACK")
        other.close()


class TestReadsDuringAWrite:
    async def test_reads_answer_while_another_writer_holds_the_lock(
        self, store: SQLiteStore
    ) -> None:
        job = await store.charge_and_create_job(new_job("user_a", cost=10), 5)
        with write_lock_held(store.path) as other:
            other.execute("UPDATE users SET credits = 0 WHERE user_id = 'user_a'")
            # The uncommitted write is invisible; the read neither waits nor fails.
            assert (await store.get_or_create_user("user_a")).credits == 90
            assert (await store.get_job("user_a", job.job_id)).status == job.status
            assert [j.job_id for j in (await store.list_jobs("user_a", 10, None)).jobs] == [
                job.job_id
            ]
        assert (await store.get_or_create_user("user_a")).credits == 90

    async def test_a_new_user_needs_the_write_lock(self, store: SQLiteStore) -> None:
        with write_lock_held(store.path):
            with pytest.raises(StoreUnavailable):
                await store.get_or_create_user("user_new")
        assert (await store.get_or_create_user("user_new")).credits == 100
        assert await store.audit() == []

    async def test_reads_see_another_process_commit_at_once(
        self, store: SQLiteStore, tmp_path: Path
    ) -> None:
        await store.get_or_create_user("user_a")
        other = SQLiteStore(tmp_path / "gateway.db", 100, "starter")
        try:
            await other.grant_credits("user_a", 25, "support")
        finally:
            await other.close()
        assert (await store.get_or_create_user("user_a")).credits == 125


class TestDurability:
    """A commit normally waits for no fsync; a grant's commit does, and so every one before it."""

    @staticmethod
    def trace(store: SQLiteStore) -> list[str]:
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        return statements

    async def test_a_grant_commits_with_a_full_sync(self, store: SQLiteStore) -> None:
        await store.get_or_create_user("user_a")
        statements = self.trace(store)
        await store.grant_credits("user_a", 50, "purchase")
        pragmas = [s for s in statements if s.startswith(("PRAGMA", "BEGIN", "COMMIT"))]
        assert pragmas == [
            "PRAGMA synchronous=FULL",
            "BEGIN IMMEDIATE",
            "COMMIT",
            "PRAGMA synchronous=NORMAL",
        ]

    async def test_job_traffic_commits_without_waiting_for_the_disk(
        self, store: SQLiteStore
    ) -> None:
        statements = self.trace(store)
        await store.charge_and_create_job(new_job("user_a", cost=10), 5)
        assert "COMMIT" in statements
        assert not any(s.startswith("PRAGMA synchronous") for s in statements)
        mode = store._db.execute("PRAGMA synchronous").fetchone()[0]
        assert mode == 1  # NORMAL

    async def test_a_failed_grant_restores_the_normal_mode(self, store: SQLiteStore) -> None:
        with write_lock_held(store.path):
            with pytest.raises(StoreUnavailable):
                await store.grant_credits("user_a", 50, "purchase")
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert (await store.grant_credits("user_a", 50, "purchase")).credits == 150


class TestReadFallback:
    async def test_a_read_the_file_refuses_is_a_503_not_a_crash(self, store: SQLiteStore) -> None:
        """A read that fails on the loop is tried on the store's thread, then answered as a 503."""
        job = await store.charge_and_create_job(new_job("user_a", cost=10), 5)
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("ALTER TABLE jobs RENAME TO jobs_moved")  # an operator's botched migration
        try:
            with pytest.raises(StoreUnavailable):
                await store.get_job("user_a", job.job_id)
            with pytest.raises(StoreUnavailable):
                await store.list_jobs("user_a", 10, None)
        finally:
            other.execute("ALTER TABLE jobs_moved RENAME TO jobs")
            other.close()
        assert (await store.get_job("user_a", job.job_id)).job_id == job.job_id


class TestDeletionSchema:
    """`deleted_at` is added to a file made before it, once, whoever opens the file first."""

    async def test_a_file_from_before_deletion_gains_the_column_and_keeps_its_jobs(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "gateway.db"
        old = SQLiteStore(path, 100, "starter")
        job = await old.charge_and_create_job(new_job("user_a", cost=10), 5)
        await old.close()
        with sqlite3.connect(path) as db:  # as the file was before this column existed
            db.execute("DROP INDEX jobs_live_by_user_created")
            db.execute("ALTER TABLE jobs DROP COLUMN deleted_at")

        reopened = SQLiteStore(path, 100, "starter")
        again = SQLiteStore(path, 100, "starter")  # a second process on the same file
        try:
            assert [j.job_id for j in (await reopened.list_jobs("user_a", 10, None)).jobs] == [
                job.job_id
            ]
            await reopened.apply_status(job.job_id, StatusUpdate(JobStatus.DONE))
            await reopened.delete_job("user_a", job.job_id)
            assert (await again.list_jobs("user_a", 10, None)).jobs == []
            with pytest.raises(NotFound):
                await again.get_job("user_a", job.job_id)
            assert await again.audit() == []
        finally:
            await reopened.close()
            await again.close()
