"""The embedded stand-in for R2: a local directory served at HMAC-signed, expiring URLs.

URLs carry `expires` (unix seconds) and `sig` = HMAC-SHA256(secret, method, key, expires, type),
so they mean what a presigned R2 URL means: anyone holding one may GET (or PUT) that one object
until it expires, and an expired or tampered URL is a 403. An upload URL also signs `length`,
as R2's signs Content-Length: a PUT of another type or size is refused, as R2 refuses it.

Sources for what it imitates: Cloudflare's "Presigned URLs" page
(developers.cloudflare.com/r2/api/s3/presigned-urls/): a URL is bound to one object and one
operation, has an expiry (X-Amz-Expires) that is signed, and changing the resource or tampering
with a signed parameter "will return a 403 with an error code of SignatureDoesNotMatch"; a
signed header (Content-Type, Content-Length) that differs breaks the SigV4 signature the same way.
The status is R2's; the body is the gateway's error shape (`INVALID_SIGNATURE`, `URL_EXPIRED`)
rather than S3's XML, since only the status is read by the clients here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from errors import Forbidden, InvalidRequest, NotFound
from r2_client import ObjectChanged, ObjectInfo

ROUTE_PREFIX = "/_local/storage"
# Keys are made by the gateway (`videos/<user>/<job>.mp4` and its poster, `.jpg`); anything
# else is refused outright.
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*\.(mp4|jpg)$")
# What R2 would answer: the type the object was PUT with, which the presigned PUT fixed.
_MEDIA_TYPES = {".mp4": "video/mp4", ".jpg": "image/jpeg"}
# An image a user uploads (uploads.py): `uploads/<user>/<upload id>`, and the gateway's copy of a
# checked version of it, `<that>.<16 hex digits>`.
_UPLOAD_KEY = re.compile(
    r"^uploads/[A-Za-z0-9_\-]{1,128}/upl_[A-Za-z0-9_\-]{12,64}(\.[0-9a-f]{16})?$"
)
_LENGTH = re.compile(r"[0-9]{1,12}")
_EXPIRES = re.compile(r"[0-9]{1,12}")  # a unix time in seconds


class LocalStorage:
    def __init__(
        self,
        root: Path,
        secret: bytes,
        public_base_url: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self._secret = secret
        self._base = public_base_url.rstrip("/")
        self.clock = clock  # unix seconds; tests move it to expire a URL
        root.mkdir(parents=True, exist_ok=True)

    def _signature(
        self, method: str, key: str, expires: int, content_type: str, length: str = ""
    ) -> str:
        message = f"{method}\n{key}\n{expires}\n{content_type}"
        if length:  # only upload URLs sign a length; video URLs keep their signatures
            message += f"\n{length}"
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def _signed_url(
        self, method: str, key: str, ttl_seconds: int, content_type: str = "", length: str = ""
    ) -> str:
        expires = int(self.clock()) + ttl_seconds
        sig = self._signature(method, key, expires, content_type, length)
        sized = f"&length={length}" if length else ""
        return f"{self._base}{ROUTE_PREFIX}/{quote(key)}?expires={expires}{sized}&sig={sig}"

    def presign_get(self, key: str, ttl_seconds: int) -> str:
        return self._signed_url("GET", key, ttl_seconds)

    def presign_put(self, key: str, ttl_seconds: int, content_type: str) -> str:
        return self._signed_url("PUT", key, ttl_seconds, content_type)

    def presign_upload(
        self, key: str, ttl_seconds: int, content_type: str, content_length: int
    ) -> str:
        return self._signed_url("PUT", key, ttl_seconds, content_type, str(content_length))

    def path_for(self, key: str) -> Path:
        if not (_SAFE_KEY.fullmatch(key) or _UPLOAD_KEY.fullmatch(key)):
            raise NotFound("No such object")
        return self.root / key

    def check(
        self,
        method: str,
        key: str,
        expires: str,
        sig: str,
        content_type: str = "",
        length: str = "",
    ) -> None:
        """Refuse (403) a URL that is expired, malformed or not signed by us."""
        # ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
        if not _EXPIRES.fullmatch(expires) or int(expires) < self.clock():
            raise Forbidden("The URL has expired", code="URL_EXPIRED")
        if length and not _LENGTH.fullmatch(length):
            raise Forbidden("The URL signature is invalid", code="INVALID_SIGNATURE")
        expected = self._signature(method, key, int(expires), content_type, length)
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError).
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogateescape")):
            raise Forbidden("The URL signature is invalid", code="INVALID_SIGNATURE")

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_for(key).is_file)

    async def delete(self, key: str) -> None:
        # Like S3's DeleteObject, which R2 implements (developers.cloudflare.com/r2/api/s3/api/):
        # a key that is already gone is no error (AWS S3 API reference, DeleteObject: 204).
        await asyncio.to_thread(self.path_for(key).unlink, missing_ok=True)

    async def stat(self, key: str) -> ObjectInfo | None:
        return await asyncio.to_thread(self._stat, key)

    def _stat(self, key: str) -> ObjectInfo | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        # A PUT writes a new file and renames it in place: a new inode and mtime, a new ETag.
        status = path.stat()
        version = f"{status.st_ino:x}-{status.st_mtime_ns:x}-{status.st_size:x}"
        return ObjectInfo(status.st_size, f'"{version}"')

    async def read_prefix(self, key: str, length: int, etag: str) -> bytes:
        return await asyncio.to_thread(self._read_prefix, key, length, etag)

    def _read_prefix(self, key: str, length: int, etag: str) -> bytes:
        self._require_version(key, etag)
        with self.path_for(key).open("rb") as file:
            return file.read(length)

    async def copy_if_unchanged(self, source: str, target: str, etag: str) -> None:
        await asyncio.to_thread(self._copy_if_unchanged, source, target, etag)

    def _copy_if_unchanged(self, source: str, target: str, etag: str) -> None:
        self._require_version(source, etag)
        self.write(target, self.path_for(source).read_bytes())

    def _require_version(self, key: str, etag: str) -> None:
        """What R2 answers 412 for: the object is gone, or is another version than `etag`
        (If-Match on GetObject and x-amz-copy-source-if-match on CopyObject, both in R2's S3 API
        list at developers.cloudflare.com/r2/api/s3/api/; AWS S3 API reference: 412 Precondition
        Failed)."""
        info = self._stat(key)
        if info is None or info.etag != etag:
            raise ObjectChanged()

    def sweep_uploads(self, before: float) -> int:
        """Delete uploaded images last written before `before` (unix seconds); how many went.

        What the R2 lifecycle rule on `uploads/` does in production (README): by the object's
        age, whatever the store says, so a file whose row is gone cannot linger.
        """
        swept = 0
        for path in (self.root / "uploads").glob("*/upl_*"):
            if path.is_file() and path.stat().st_mtime < before:
                path.unlink(missing_ok=True)
                swept += 1
        return swept

    async def close(self) -> None:
        return None

    def write(self, key: str, data: bytes) -> None:
        # Write then rename, so a reader never sees half a video.
        target = self.path_for(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # the name kept whole
        partial.write_bytes(data)
        partial.replace(target)


def local_storage(request: Request) -> LocalStorage:
    storage = request.state.storage
    if not isinstance(storage, LocalStorage):
        raise NotFound("No such route")
    return storage


LocalStorageDep = Annotated[LocalStorage, Depends(local_storage)]


def storage_router() -> APIRouter:
    """Serves the stand-in's signed URLs; the storage itself comes from the app's state."""
    router = APIRouter(prefix=ROUTE_PREFIX, include_in_schema=False)

    @router.get("/{key:path}")
    async def download(
        key: str, storage: LocalStorageDep, expires: str = "", sig: str = ""
    ) -> Response:
        storage.check("GET", key, expires, sig)
        path = storage.path_for(key)
        if not await asyncio.to_thread(path.is_file):
            raise NotFound("No such object")
        # Signed URLs are per-object credentials: browsers may cache the bytes, not share them.
        # R2 answers the type an object was PUT with; the stand-in keeps none beside an upload's
        # bytes, and the worker reads the image's format from its bytes.
        media_type = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private"})

    @router.put("/{key:path}")
    async def upload(
        key: str,
        request: Request,
        storage: LocalStorageDep,
        expires: str = "",
        sig: str = "",
        length: str = "",
    ) -> Response:
        content_type = request.headers.get("content-type", "")
        storage.check("PUT", key, expires, sig, content_type, length)
        body = await request.body()
        if not body:
            raise InvalidRequest("The upload is empty")
        sent = request.headers.get("content-length", "")
        if length and (sent != length or len(body) != int(length)):
            # R2 signs Content-Length into an upload URL: another size breaks the signature.
            raise Forbidden("The URL signature is invalid", code="INVALID_SIGNATURE")
        await asyncio.to_thread(storage.write, key, body)
        return Response(status_code=200)

    return router
