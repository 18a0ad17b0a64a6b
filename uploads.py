"""Direct uploads: a user PUTs a start image straight to storage, and jobs start from it.

`POST /uploads` records the upload (the per-user limit is one store transaction) and hands out a
presigned PUT with the Content-Type and Content-Length signed in; the bytes never pass through
the gateway. A job naming the upload is checked here before anything is charged: the object
exists and is the caller's, is not expired, has the declared size, and its first bytes are the
declared image format with a header size within the limits. The worker then gets a presigned GET.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request
from fastapi.openapi.models import Example
from pydantic import ConfigDict, Field, StrictInt

from config import Settings
from deps import CurrentUser
from errors import (
    GatewayError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    ImageTooLarge,
    ImageTypeMismatch,
    InvalidRequest,
    PayloadTooLarge,
    TooManyPendingUploads,
    UploadExpired,
    UploadIncomplete,
    UploadNotFound,
    UploadRefused,
    UploadSizeMismatch,
)
from http_errors import AUTH_ERRORS, STORE_ERRORS, error_responses, invalid_request_body
from idempotency import Answer, IdempotencyKeyHeader, answer_once, request_fingerprint
from images import HEADER_BYTES, InvalidImage, read_header
from local_storage import LocalStorage
from models import (
    UPLOAD_ID_PATTERN,
    ApiModel,
    RequestModel,
    Upload,
    iso_from_ms,
    json_dump,
    new_upload_id,
    now_ms,
    upload_key_for,
)
from openapi import UPLOADS
from r2_client import ObjectChanged, ObjectInfo, ObjectStorage
from store import Store

log = logging.getLogger("gateway.uploads")

# The upload URL's life: long enough for a phone on a slow link to send 10 MiB, short enough
# that a leaked URL is soon useless.
UPLOAD_URL_TTL_SECONDS = 15 * 60
# How long jobs may use an upload; the R2 lifecycle rule on `uploads/` deletes it after a day.
UPLOAD_USABLE_SECONDS = 24 * 3600
SWEEP_BATCH = 500


class UploadChanged(UploadRefused):
    """A PUT replaced the object while it was being checked: a retry checks the new one."""

    status_code = 409
    code = "UPLOAD_CHANGED"
    detail = "The upload changed while it was being checked: try again"


class UploadTooLarge(UploadRefused):
    code = "UPLOAD_TOO_LARGE"
    detail = "The uploaded file is larger than MAX_UPLOAD_BYTES"


class FieldRefused(InvalidRequest):
    """A field the settings refuse, worded and shaped like the body validator's 400s."""

    def __init__(self, field: str, rule: str) -> None:
        message = f"{field} {rule}"
        super().__init__(f"Invalid request: {message}")
        self.errors = [{"field": field, "message": message}]


# --- The HTTP contract ------------------------------------------------------------------------


class CreateUploadRequest(RequestModel):
    content_type: Literal["image/png", "image/jpeg", "image/webp"] = Field(
        description="The image's type; the PUT must send exactly this Content-Type."
    )
    size_bytes: StrictInt = Field(
        ge=1, description="The file's exact size; at most MAX_UPLOAD_BYTES (10 MiB by default)."
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"contentType": "image/png", "sizeBytes": 48213}]}
    )


UPLOAD_EXAMPLE: dict[str, Any] = {
    "uploadId": "upl_Qm7c2VbX9kLp4sTe",
    "uploadUrl": "https://acct.r2.cloudflarestorage.com/cineweave-videos/uploads/user_alice/"
    "upl_Qm7c2VbX9kLp4sTe?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=900"
    "&X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost"
    "&X-Amz-Signature=5d41402abc4b2a76b9719d911017c592",
    "headers": {"Content-Type": "image/png", "Content-Length": "48213"},
    "expiresAt": "2026-11-25T12:44:50.120Z",
    "usableUntil": "2026-11-26T12:29:50.120Z",
}
CREATE_UPLOAD_EXAMPLES: dict[str, Example] = {
    "png": {
        "summary": "A 48 KB PNG start image",
        "value": {"contentType": "image/png", "sizeBytes": 48213},
    },
}


class CreateUploadResponse(ApiModel):
    upload_id: str
    upload_url: str = Field(description="PUT the bytes here, with exactly `headers`.")
    headers: dict[str, str]
    expires_at: str = Field(description="When `uploadUrl` stops working (15 minutes).")
    usable_until: str = Field(description="Until when jobs may start from the upload (24 h).")

    model_config = ConfigDict(json_schema_extra={"examples": [UPLOAD_EXAMPLE]})

    @classmethod
    def from_upload(cls, upload: Upload, url: str) -> CreateUploadResponse:
        return cls(
            upload_id=upload.upload_id,
            upload_url=url,
            headers={"Content-Type": upload.content_type, "Content-Length": str(upload.size_bytes)},
            expires_at=iso_from_ms(upload.expires_at) or "",
            usable_until=iso_from_ms(upload.usable_until) or "",
        )


# --- The rules --------------------------------------------------------------------------------


@dataclass
class UploadService:
    settings: Settings
    store: Store
    storage: ObjectStorage
    # The stand-in for R2 in local mode, whose files the sweep deletes (R2's rule does it there).
    local_files: LocalStorage | None = None
    # Now, in epoch milliseconds, as `JobService.clock`: tests move it to expire an upload.
    clock: Callable[[], int] = now_ms

    async def create(self, user_id: str, request: CreateUploadRequest) -> CreateUploadResponse:
        """Record the upload (429 past the pending limit), then sign its PUT URL."""
        self._check_size(request.size_bytes)
        now, upload_id = self.clock(), new_upload_id()
        upload = Upload(
            upload_id=upload_id,
            user_id=user_id,
            content_type=request.content_type,
            size_bytes=request.size_bytes,
            object_key=upload_key_for(user_id, upload_id),
            created_at=now,
            expires_at=now + UPLOAD_URL_TTL_SECONDS * 1000,
            usable_until=now + UPLOAD_USABLE_SECONDS * 1000,
        )
        await self.store.create_upload(upload, self.settings.max_pending_uploads)
        url = self.storage.presign_upload(
            upload.object_key, UPLOAD_URL_TTL_SECONDS, upload.content_type, upload.size_bytes
        )
        return CreateUploadResponse.from_upload(upload, url)

    def _check_size(self, size_bytes: int) -> None:
        limit = self.settings.max_upload_bytes
        if size_bytes > limit:
            raise FieldRefused("sizeBytes", f"must be at most {limit} (MAX_UPLOAD_BYTES)")

    async def image_url_for_job(self, user_id: str, upload_id: str) -> str:
        """A GET URL for the worker, once the upload has passed every check; else a 4xx."""
        if not UPLOAD_ID_PATTERN.fullmatch(upload_id):
            raise UploadNotFound()  # never one of ours: the same answer as an unknown id
        upload = await self.store.get_upload(user_id, upload_id)
        if self.clock() >= upload.usable_until:
            raise UploadExpired()
        checked = await self._check_object(upload)
        # The upload URL may still be live: a later PUT must not reach the worker unchecked, so
        # the worker reads a copy of the checked version, which only the gateway writes.
        copy_key = f"{upload.object_key}.{hashlib.sha256(checked.etag.encode()).hexdigest()[:16]}"
        try:
            await self.storage.copy_if_unchanged(upload.object_key, copy_key, checked.etag)
        except ObjectChanged:
            raise UploadChanged() from None
        # Valid for as long as the job may wait and run, as the worker's own upload URL is.
        settings = self.settings
        ttl = settings.runpod_job_ttl_seconds + settings.runpod_execution_timeout_seconds
        return self.storage.presign_get(copy_key, ttl)

    async def _check_object(self, upload: Upload) -> ObjectInfo:
        info = await self.storage.stat(upload.object_key)
        if info is None:
            raise UploadIncomplete()
        size = info.size
        if size > self.settings.max_upload_bytes:
            raise UploadTooLarge(
                f"The file has {size} bytes; at most {self.settings.max_upload_bytes}"
            )
        if size != upload.size_bytes:
            raise UploadSizeMismatch(
                f"The file has {size} bytes; {upload.size_bytes} were declared"
            )
        try:
            prefix = await self.storage.read_prefix(upload.object_key, HEADER_BYTES, info.etag)
        except ObjectChanged:
            raise UploadChanged() from None
        header = read_header(prefix)
        if header.content_type != upload.content_type:
            raise ImageTypeMismatch(
                f"The bytes are {header.content_type}; {upload.content_type} was declared"
            )
        limit = self.settings.max_image_dimension_px
        if header.width > limit or header.height > limit:
            raise ImageTooLarge(
                f"The image is {header.width}x{header.height} pixels; each side may be at most"
                f" {limit}"
            )
        return info

    async def sweep_once(self) -> int:
        """Forget uploads no job may use; locally, delete their files too (R2's rule does it)."""
        now = self.clock()
        forgotten = await self.store.purge_expired_uploads(now, SWEEP_BATCH)
        if self.local_files is not None:
            cutoff = now / 1000 - UPLOAD_USABLE_SECONDS
            await asyncio.to_thread(self.local_files.sweep_uploads, cutoff)
        return forgotten

    async def sweep_forever(
        self, interval: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        while True:
            await sleep(interval * random.uniform(0.5, 1.5))  # jitter, as the reconciler's
            try:
                await self.sweep_once()
            except Exception:  # the loop must outlive any one bad pass, as the reconciler's
                log.exception("upload sweep failed")


# --- Routes -----------------------------------------------------------------------------------


async def upload_service(request: Request) -> UploadService:
    service: UploadService = request.state.uploads
    return service


UploadsDep = Annotated[UploadService, Depends(upload_service)]
router = APIRouter()

# What a job naming an upload may be refused with, before anything is charged.
UPLOAD_REFUSALS: tuple[type[GatewayError], ...] = (
    UploadNotFound,
    UploadExpired,
    UploadIncomplete,
    UploadTooLarge,
    UploadSizeMismatch,
    InvalidImage,
    ImageTypeMismatch,
    ImageTooLarge,
    UploadChanged,
)


def create_upload_responses() -> dict[int | str, dict[str, Any]]:
    """The route's errors, its 400 example naming this body's field (not create's durationSec)."""
    responses = error_responses(
        InvalidRequest,
        *AUTH_ERRORS,
        IdempotencyKeyReused,
        IdempotencyKeyInUse,
        PayloadTooLarge,
        TooManyPendingUploads,
        *STORE_ERRORS,
    )
    field = FieldRefused("sizeBytes", "must be at most 10485760 (MAX_UPLOAD_BYTES)")
    example = responses[400]["content"]["application/json"]["examples"][InvalidRequest.code]
    example["value"] = invalid_request_body(field.errors or [])
    return responses


@router.post(
    "/uploads",
    tags=[UPLOADS],
    response_model=CreateUploadResponse,
    summary="Upload a start image",
    responses=create_upload_responses(),
)
async def create_upload(
    body: Annotated[CreateUploadRequest, Body(openapi_examples=CREATE_UPLOAD_EXAMPLES)],
    user: CurrentUser,
    uploads: UploadsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """A presigned PUT URL for one PNG, JPEG or WebP image; free of charge.

    PUT the bytes to `uploadUrl` with exactly `headers` within 15 minutes, then start jobs from
    it with `imageUploadId` for 24 hours. With an `Idempotency-Key`, a retry gets the same upload.
    """
    if idempotency_key is None:
        return await uploads.create(user.user_id, body)

    async def create_once(_: str | None) -> Answer:
        return 200, json_dump(await uploads.create(user.user_id, body))

    fingerprint = request_fingerprint("upload", body.model_dump(mode="json"))
    return await answer_once(user.store, user.user_id, idempotency_key, fingerprint, create_once)
