"""R2 through boto3, against moto's S3 server over real HTTP on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local_storage import LocalStorage
from r2_client import (
    ObjectChanged,
    PendingS3Client,
    R2Storage,
    StorageUnavailable,
    expiry_ms,
    make_s3_client,
)
from tests.conftest import moto_bucket

BUCKET = "cineweave-videos"
KEY = "videos/user_alice/job_abcdefghijklmnop.mp4"
UPLOAD_KEY = "uploads/user_alice/upl_abcdefghijklmnop"


@pytest.fixture
def storage(moto_endpoint: str) -> Iterator[R2Storage]:
    with moto_bucket(moto_endpoint, BUCKET) as client:
        yield R2Storage(client, BUCKET)


class TestPresign:
    def test_put_then_get_over_real_http(self, storage: R2Storage) -> None:
        upload = storage.presign_put(KEY, 600, "video/mp4")
        put = httpx.put(upload, content=b"fake mp4 bytes", headers={"Content-Type": "video/mp4"})
        assert put.status_code == 200
        download = storage.presign_get(KEY, 600)
        got = httpx.get(download)
        assert got.status_code == 200 and got.content == b"fake mp4 bytes"

    def test_urls_carry_expiry_and_signature(self, storage: R2Storage) -> None:
        url = storage.presign_get(KEY, 86_400)
        assert "X-Amz-Expires=86400" in url and "X-Amz-Signature=" in url

    def test_tampered_url_is_refused(self, storage: R2Storage) -> None:
        storage.presign_put(KEY, 600, "video/mp4")
        url = storage.presign_get(KEY, 600).replace(KEY, KEY.replace("alice", "mallory"))
        assert httpx.get(url).status_code in (403, 404)

    def test_expiry_ms(self) -> None:
        assert expiry_ms(60, clock=1000.0) == 1_060_000


class TestExists:
    async def test_missing_object(self, storage: R2Storage) -> None:
        assert await storage.exists(KEY) is False

    async def test_present_object(self, storage: R2Storage) -> None:
        url = storage.presign_put(KEY, 600, "video/mp4")
        httpx.put(url, content=b"x", headers={"Content-Type": "video/mp4"})
        assert await storage.exists(KEY) is True

    async def test_unreachable_endpoint_is_unavailable(self) -> None:
        client = make_s3_client("http://127.0.0.1:9", "k", "s", connect_timeout=0.5)
        with pytest.raises(StorageUnavailable):
            await R2Storage(client, BUCKET).exists(KEY)


class TestPendingClient:
    """The client the gateway builds a moment after start-up, so boto3 stays off the cold start."""

    async def test_first_use_builds_it_at_once(
        self, storage: R2Storage, moto_endpoint: str
    ) -> None:
        # An hour's delay: the call must start the build itself rather than wait for the timer.
        pending = PendingS3Client(moto_endpoint, "test-key", "test-secret", delay=3600)
        later = R2Storage(pending, BUCKET)
        url = later.presign_put(KEY, 600, "video/mp4")
        httpx.put(url, content=b"x", headers={"Content-Type": "video/mp4"})
        assert await later.exists(KEY) is True
        await later.close()

    async def test_built_in_the_background_without_a_call(self, moto_endpoint: str) -> None:
        pending = PendingS3Client(moto_endpoint, "test-key", "test-secret", delay=0)
        assert "X-Amz-Signature=" in R2Storage(pending, BUCKET).presign_get(KEY, 60)

    async def test_a_client_that_cannot_be_built_fails_each_call(self) -> None:
        storage = R2Storage(PendingS3Client("not a url", "k", "s", delay=0), BUCKET)
        with pytest.raises(ValueError):
            storage.presign_get(KEY, 60)
        await storage.close()  # nothing was built, so nothing to close


class TestVersionConditions:
    """What keeps a checked upload the one the worker reads: a stale ETag is `ObjectChanged`."""

    async def test_a_ranged_get_of_a_replaced_object_is_refused(self, storage: R2Storage) -> None:
        url = storage.presign_upload(UPLOAD_KEY, 600, "image/png", 3)
        httpx.put(url, content=b"one", headers={"Content-Type": "image/png"})
        first = await storage.stat(UPLOAD_KEY)
        assert first is not None and first.size == 3
        assert await storage.read_prefix(UPLOAD_KEY, 2, first.etag) == b"on"
        httpx.put(url, content=b"two", headers={"Content-Type": "image/png"})
        with pytest.raises(ObjectChanged):
            await storage.read_prefix(UPLOAD_KEY, 2, first.etag)

    async def test_a_copy_of_the_checked_version(self, storage: R2Storage) -> None:
        url = storage.presign_upload(UPLOAD_KEY, 600, "image/png", 3)
        httpx.put(url, content=b"one", headers={"Content-Type": "image/png"})
        first = await storage.stat(UPLOAD_KEY)
        assert first is not None
        await storage.copy_if_unchanged(UPLOAD_KEY, UPLOAD_KEY + ".0123456789abcdef", first.etag)
        copy = storage.presign_get(UPLOAD_KEY + ".0123456789abcdef", 600)
        assert httpx.get(copy).content == b"one"

    async def test_a_missing_object_has_no_stat(self, storage: R2Storage) -> None:
        assert await storage.stat(UPLOAD_KEY) is None


class TestLocalVersionConditions:
    def storage(self, tmp_path: Path) -> LocalStorage:
        return LocalStorage(tmp_path, b"secret", "http://127.0.0.1:8000")

    async def test_a_get_or_copy_of_a_replaced_object_is_refused(self, tmp_path: Path) -> None:
        storage = self.storage(tmp_path)
        storage.write(UPLOAD_KEY, b"one")
        first = await storage.stat(UPLOAD_KEY)
        assert first is not None
        storage.write(UPLOAD_KEY, b"two")
        with pytest.raises(ObjectChanged):
            await storage.read_prefix(UPLOAD_KEY, 2, first.etag)
        with pytest.raises(ObjectChanged):
            await storage.copy_if_unchanged(
                UPLOAD_KEY, UPLOAD_KEY + ".0123456789abcdef", first.etag
            )
