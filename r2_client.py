"""Cloudflare R2 through boto3: presigned URLs for the worker's upload and the user's download.

Presigning is local arithmetic (about 0.2 ms), so it runs inline; `head_object` is a blocking
network call, so it runs in a worker thread and never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from errors import GatewayError, UpstreamUnavailable

if TYPE_CHECKING:
    # boto3's client class is generated at run time; boto3-stubs' S3 package (a dev tool, not
    # installed in the image) describes it for mypy.
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("gateway.r2")

# Final: its type is the literal that worker.contract.OutputTarget takes.
VIDEO_CONTENT_TYPE: Final = "video/mp4"


class StorageUnavailable(UpstreamUnavailable):
    code = "STORAGE_UNAVAILABLE"
    detail = "Video storage is unavailable"


class ObjectChanged(GatewayError):
    """The object is no longer the version a condition named (HTTP 412 on If-Match)."""

    status_code = 409
    code = "OBJECT_CHANGED"
    detail = "The object changed while it was being read"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    etag: str  # names this version of the object: a later PUT makes another


class ObjectStorage(Protocol):
    """What the gateway needs from object storage: R2 in production, a directory locally."""

    def presign_get(self, key: str, ttl_seconds: int) -> str: ...

    def presign_put(self, key: str, ttl_seconds: int, content_type: str) -> str: ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the object; a key that is already gone is not an error."""
        ...

    def presign_upload(
        self, key: str, ttl_seconds: int, content_type: str, content_length: int
    ) -> str:
        """A PUT URL that takes exactly this Content-Type and Content-Length, or nothing."""
        ...

    async def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag (a HEAD), or None when there is no such object."""
        ...

    async def read_prefix(self, key: str, length: int, etag: str) -> bytes:
        """The first `length` bytes at most of version `etag` (a ranged GET); `ObjectChanged`."""
        ...

    async def copy_if_unchanged(self, source: str, target: str, etag: str) -> None:
        """Copy version `etag` of `source` to `target`, or `ObjectChanged` if it is not that."""
        ...

    async def close(self) -> None: ...


def make_s3_client(
    endpoint_url: str, access_key_id: str, secret_access_key: str, *, connect_timeout: float = 3.0
) -> S3Client:
    # boto3 is imported here, not at module load: it costs ~0.3 s of cold start, and local mode
    # without R2 never needs it.
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        # botocore >= 1.36 adds CRC32 checksum headers that R2 has rejected.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=connect_timeout,
        read_timeout=10,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="auto",
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


# How long after the lifespan asks for it the R2 client starts building. Built at once, in a
# thread, it bought nothing: its import and the rest of the start-up take turns on the GIL, so
# the port opened no sooner (bench/PROFILE.md). Half a second is ample for the port to open.
R2_BUILD_DELAY_SECONDS = 0.5


class PendingS3Client:
    """An S3 client built in a background thread a moment after start-up, or at first need.

    Importing boto3 and building its client takes 250-340 ms, a third of a production cold
    start (bench/PROFILE.md), and R2 is not a readiness check: nothing needs it before the
    first create, the first poll of a done job or the first COMPLETED webhook. Whichever comes
    first, the build starts then, and that one call waits for it.
    """

    def __init__(
        self,
        endpoint_url: str,
        access_key_id: str,
        secret_access_key: str,
        *,
        delay: float = R2_BUILD_DELAY_SECONDS,
    ) -> None:
        self._args = (endpoint_url, access_key_id, secret_access_key)
        self._future: Future[S3Client] = Future()
        self._needed = threading.Event()
        threading.Thread(target=self._build, args=(delay,), name="r2-client", daemon=True).start()

    def _build(self, delay: float) -> None:
        self._needed.wait(delay)
        try:
            self._future.set_result(make_s3_client(*self._args))
        except BaseException as exc:  # a bad endpoint URL: every R2 call will say so
            log.error("could not build the R2 client for %s", self._args[0], exc_info=True)
            self._future.set_exception(exc)

    def result(self) -> S3Client:
        """The client, waiting for its build (and starting it now if it has not started)."""
        self._needed.set()
        return self._future.result()


class R2Storage:
    def __init__(self, client: S3Client | PendingS3Client, bucket: str) -> None:
        self._pending = client if isinstance(client, PendingS3Client) else None
        self._built = None if isinstance(client, PendingS3Client) else client
        self._bucket = bucket

    @property
    def _client(self) -> S3Client:
        # A pending client may still be building in the first second after start: the first
        # call then waits for it (on the event loop for a presign), once per instance.
        if self._built is None:
            assert self._pending is not None
            self._built = self._pending.result()
        return self._built

    def presign_get(self, key: str, ttl_seconds: int) -> str:
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": key},
            ExpiresIn=ttl_seconds,
        )

    def presign_put(self, key: str, ttl_seconds: int, content_type: str) -> str:
        # R2 requires the upload to carry exactly the Content-Type that was signed.
        return self._client.generate_presigned_url(
            "put_object",
            Params={"Bucket": self._bucket, "Key": key, "ContentType": content_type},
            ExpiresIn=ttl_seconds,
        )

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._head, key)

    def _head(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return False
            raise StorageUnavailable(f"R2 HEAD failed with HTTP {status}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable("R2 could not be reached") from exc
        return True

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    def _delete(self, key: str) -> None:
        # S3's DeleteObject answers 204 whether or not the key exists, so a repeat is no error.
        # R2 implements DeleteObject (developers.cloudflare.com/r2/api/s3/api/) and documents
        # boto3's `delete_object` for it (/r2/objects/delete-objects/).
        # So any 404 here is the bucket's (NoSuchBucket), a failure, unlike `_unless_missing`'s.
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StorageUnavailable(f"R2 DELETE failed with HTTP {status}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable("R2 could not be reached") from exc

    def presign_upload(
        self, key: str, ttl_seconds: int, content_type: str, content_length: int
    ) -> str:
        # A presigned PUT, not a POST policy: R2's presigned URLs allow GET, PUT, HEAD or DELETE
        # (developers.cloudflare.com/r2/api/s3/presigned-urls/), and R2 does not support POST
        # policy uploads. botocore signs both headers (X-Amz-SignedHeaders=content-length;
        # content-type;host), so a PUT with another type or size no longer matches the signature
        # and R2 refuses it (403 SignatureDoesNotMatch, as S3 does for a SigV4 mismatch).
        params = {
            "Bucket": self._bucket,
            "Key": key,
            "ContentType": content_type,
            "ContentLength": content_length,
        }
        return self._client.generate_presigned_url(
            "put_object", Params=params, ExpiresIn=ttl_seconds
        )

    async def stat(self, key: str) -> ObjectInfo | None:
        return await asyncio.to_thread(self._stat, key)

    def _stat(self, key: str) -> ObjectInfo | None:
        answer = self._unless_missing(
            "HEAD", self._client.head_object, Bucket=self._bucket, Key=key
        )
        if answer is None:
            return None
        return ObjectInfo(int(answer["ContentLength"]), answer["ETag"])

    async def read_prefix(self, key: str, length: int, etag: str) -> bytes:
        return await asyncio.to_thread(self._read_prefix, key, length, etag)

    def _read_prefix(self, key: str, length: int, etag: str) -> bytes:
        # If-Match: the bytes of the version the HEAD saw, or a 412 (R2's GetObject honours it,
        # developers.cloudflare.com/r2/api/s3/api/).
        answer = self._unless_missing(
            "GET",
            self._client.get_object,
            Bucket=self._bucket,
            Key=key,
            Range=f"bytes=0-{length - 1}",
            IfMatch=etag,
        )
        return b"" if answer is None else answer["Body"].read(length)

    async def copy_if_unchanged(self, source: str, target: str, etag: str) -> None:
        await asyncio.to_thread(self._copy_if_unchanged, source, target, etag)

    def _copy_if_unchanged(self, source: str, target: str, etag: str) -> None:
        # A server-side copy, conditional on the checked version (x-amz-copy-source-if-match,
        # which R2's CopyObject supports: developers.cloudflare.com/r2/api/s3/api/).
        answer = self._unless_missing(
            "COPY",
            self._client.copy_object,
            Bucket=self._bucket,
            Key=target,
            CopySource={"Bucket": self._bucket, "Key": source},
            CopySourceIfMatch=etag,
        )
        if answer is None:
            raise ObjectChanged("The object was deleted while it was being copied")

    @staticmethod
    def _unless_missing(operation: str, call: Any, **params: Any) -> dict[str, Any] | None:
        """boto3's answer, None for a missing object, `StorageUnavailable` for the rest."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer: dict[str, Any] = call(**params)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return None
            if status == 412:
                raise ObjectChanged() from exc
            raise StorageUnavailable(f"R2 {operation} failed with HTTP {status}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable("R2 could not be reached") from exc
        return answer

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        try:
            client = self._client  # waits for a client still building
        except Exception:
            return  # it was never built: nothing to close
        client.close()


def expiry_ms(ttl_seconds: int, clock: float | None = None) -> int:
    """When a URL presigned now for `ttl_seconds` stops working, in epoch milliseconds."""
    now = time.time() if clock is None else clock
    return int((now + ttl_seconds) * 1000)
