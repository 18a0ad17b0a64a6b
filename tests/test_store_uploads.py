"""The upload rules, on every store: the pending limit is one transaction, uploads are private."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from errors import TooManyPendingUploads, UploadNotFound
from models import Upload, new_upload_id, upload_key_for
from store import Store
from tests.stores import STORE_KINDS, open_store

NOW = 1_764_000_000_000
URL_MS, USABLE_MS = 900_000, 86_400_000


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Store]:
    async with open_store(request, request.param, tmp_path, signup_credits=100) as opened:
        yield opened
        assert await opened.audit() == []


def upload(user_id: str = "user_a", at: int = NOW, size: int = 1234) -> Upload:
    upload_id = new_upload_id()
    return Upload(
        upload_id=upload_id,
        user_id=user_id,
        content_type="image/png",
        size_bytes=size,
        object_key=upload_key_for(user_id, upload_id),
        created_at=at,
        expires_at=at + URL_MS,
        usable_until=at + USABLE_MS,
    )


class TestCreateUpload:
    async def test_recorded_and_read_back_by_its_owner(self, store: Store) -> None:
        made = await store.create_upload(upload(), max_pending=3)
        assert await store.get_upload("user_a", made.upload_id) == made

    async def test_costs_nothing_and_creates_no_user(self, store: Store) -> None:
        await store.create_upload(upload("user_new"), max_pending=3)
        assert await store.find_user("user_new") is None
        assert "user_new" not in await store.ledger_totals()

    async def test_the_pending_limit_is_a_429_with_retry_after(self, store: Store) -> None:
        await store.create_upload(upload(at=NOW), max_pending=2)
        await store.create_upload(upload(at=NOW + 60_000), max_pending=2)
        with pytest.raises(TooManyPendingUploads) as refused:
            await store.create_upload(upload(at=NOW + 300_000), max_pending=2)
        # The oldest URL expires at NOW + 900 s: 600 s after this attempt.
        assert refused.value.status_code == 429
        assert refused.value.headers["Retry-After"] == "600"

    async def test_an_expired_url_frees_its_place(self, store: Store) -> None:
        await store.create_upload(upload(at=NOW), max_pending=1)
        later = await store.create_upload(upload(at=NOW + URL_MS), max_pending=1)
        assert later.created_at == NOW + URL_MS

    async def test_the_limit_is_per_user(self, store: Store) -> None:
        await store.create_upload(upload("user_a"), max_pending=1)
        await store.create_upload(upload("user_b"), max_pending=1)
        with pytest.raises(TooManyPendingUploads):
            await store.create_upload(upload("user_a"), max_pending=1)

    async def test_concurrent_creates_never_pass_the_limit(self, store: Store) -> None:
        attempts = [store.create_upload(upload(), max_pending=3) for _ in range(8)]
        answers = await asyncio.gather(*attempts, return_exceptions=True)
        made = [a for a in answers if isinstance(a, Upload)]
        refused = [a for a in answers if isinstance(a, TooManyPendingUploads)]
        assert (len(made), len(refused)) == (3, 5)


class TestGetUpload:
    async def test_another_users_upload_is_not_found(self, store: Store) -> None:
        made = await store.create_upload(upload("user_a"), max_pending=3)
        with pytest.raises(UploadNotFound) as refused:
            await store.get_upload("user_b", made.upload_id)
        assert (refused.value.status_code, refused.value.code) == (404, "UPLOAD_NOT_FOUND")

    async def test_an_unknown_id_is_the_same_not_found(self, store: Store) -> None:
        with pytest.raises(UploadNotFound) as refused:
            await store.get_upload("user_a", new_upload_id())
        assert (refused.value.status_code, refused.value.code) == (404, "UPLOAD_NOT_FOUND")


class TestPurgeExpiredUploads:
    async def test_forgets_only_uploads_past_their_usable_time(self, store: Store) -> None:
        old = await store.create_upload(upload(at=NOW), max_pending=5)
        fresh = await store.create_upload(upload(at=NOW + 3_600_000), max_pending=5)
        assert await store.purge_expired_uploads(NOW + USABLE_MS, limit=100) == 1
        with pytest.raises(UploadNotFound):
            await store.get_upload("user_a", old.upload_id)
        assert await store.get_upload("user_a", fresh.upload_id) == fresh

    async def test_bounded_by_its_limit(self, store: Store) -> None:
        for minute in range(3):
            await store.create_upload(upload(at=NOW + minute * 60_000), max_pending=5)
        after = NOW + 2 * USABLE_MS
        assert await store.purge_expired_uploads(after, limit=2) == 2
        assert await store.purge_expired_uploads(after, limit=2) == 1
