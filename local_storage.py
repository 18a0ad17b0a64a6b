"""The embedded stand-in for R2: a local directory served at HMAC-signed, expiring URLs.

URLs carry `expires` (unix seconds) and `sig` = HMAC-SHA256(secret, method, key, expires, type),
so they mean what a presigned R2 URL means: anyone holding one may GET (or PUT) that one object
until it expires, and an expired or tampered URL is a 403.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from errors import Forbidden, InvalidRequest, NotFound

ROUTE_PREFIX = "/_local/storage"
# Keys are made by the gateway (`videos/<user>/<job>.mp4` and its poster, `.jpg`); anything
# else is refused outright.
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*\.(mp4|jpg)$")
# What R2 would answer: the type the object was PUT with, which the presigned PUT fixed.
_MEDIA_TYPES = {".mp4": "video/mp4", ".jpg": "image/jpeg"}
_EXPIRES = re.compile(r"[0-9]{1,12}")  # a unix time in seconds


class LocalStorage:
    def __init__(self, root: Path, secret: bytes, public_base_url: str) -> None:
        self.root = root
        self._secret = secret
        self._base = public_base_url.rstrip("/")
        root.mkdir(parents=True, exist_ok=True)

    def _signature(self, method: str, key: str, expires: int, content_type: str) -> str:
        message = f"{method}\n{key}\n{expires}\n{content_type}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _signed_url(self, method: str, key: str, ttl_seconds: int, content_type: str = "") -> str:
        expires = int(time.time()) + ttl_seconds
        sig = self._signature(method, key, expires, content_type)
        return f"{self._base}{ROUTE_PREFIX}/{quote(key)}?expires={expires}&sig={sig}"

    def presign_get(self, key: str, ttl_seconds: int) -> str:
        return self._signed_url("GET", key, ttl_seconds)

    def presign_put(self, key: str, ttl_seconds: int, content_type: str) -> str:
        return self._signed_url("PUT", key, ttl_seconds, content_type)

    def path_for(self, key: str) -> Path:
        if not _SAFE_KEY.fullmatch(key):
            raise NotFound("No such object")
        return self.root / key

    def check(self, method: str, key: str, expires: str, sig: str, content_type: str = "") -> None:
        """Refuse (403) a URL that is expired, malformed or not signed by us."""
        # ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
        if not _EXPIRES.fullmatch(expires) or int(expires) < time.time():
            raise Forbidden("The URL has expired", code="URL_EXPIRED")
        expected = self._signature(method, key, int(expires), content_type)
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError).
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogateescape")):
            raise Forbidden("The URL signature is invalid", code="INVALID_SIGNATURE")

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_for(key).is_file)

    async def close(self) -> None:
        return None

    def write(self, key: str, data: bytes) -> None:
        # Write then rename, so a reader never sees half a video.
        target = self.path_for(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
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
        media_type = _MEDIA_TYPES[path.suffix]
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private"})

    @router.put("/{key:path}")
    async def upload(
        key: str, request: Request, storage: LocalStorageDep, expires: str = "", sig: str = ""
    ) -> Response:
        content_type = request.headers.get("content-type", "")
        storage.check("PUT", key, expires, sig, content_type)
        body = await request.body()
        if not body:
            raise InvalidRequest("The upload is empty")
        await asyncio.to_thread(storage.write, key, body)
        return Response(status_code=200)

    return router
