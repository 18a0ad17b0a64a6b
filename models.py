"""Domain records shared by the stores, and the JSON shapes of the HTTP contract (camelCase).

Over 400 lines, and one module, because each API shape is the view of a record (`JobResponse`
from `Job`) under the same limits (`MAX_PROMPT_CHARS`, `JOB_ID_PATTERN`), and both halves change
together when a field is added; nearly every module imports from both halves at once.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
import socket
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi.openapi.models import Example
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from worker.contract import PROGRESS_STAGES, ProgressStage

MAX_PROMPT_CHARS = 2000
MAX_IMAGE_URL_CHARS = 2048
MAX_SEED = 2**32 - 1
# Suffixes that only ever name machines inside someone's network: never fetchable by a worker.
PRIVATE_HOST_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa")


class JobStatus(StrEnum):
    """A job's lifecycle. `submitting` is internal: the public API shows it as `queued`."""

    SUBMITTING = "submitting"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def rank(self) -> int:
        """Order of the lifecycle: a status may only move to a higher rank."""
        return _RANK[self]

    @property
    def public(self) -> JobStatus:
        return JobStatus.QUEUED if self is JobStatus.SUBMITTING else self


TERMINAL_STATUSES = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELED})
ACTIVE_STATUSES = frozenset({JobStatus.SUBMITTING, JobStatus.QUEUED, JobStatus.RUNNING})
REFUNDED_STATUSES = frozenset({JobStatus.FAILED, JobStatus.CANCELED})
_RANK = {
    JobStatus.SUBMITTING: 0,
    JobStatus.QUEUED: 1,
    JobStatus.RUNNING: 2,
    JobStatus.DONE: 3,
    JobStatus.FAILED: 3,
    JobStatus.CANCELED: 3,
}


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


# A job's timestamps are rendered again on every poll of it: remember the recent ones.
@functools.lru_cache(maxsize=4096)
def iso_from_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# What `new_job_id` makes, with room to spare: anything else names no job of ours.
JOB_ID_PATTERN = re.compile(r"job_[A-Za-z0-9_\-]{12,64}")


def new_job_id() -> str:
    # 12 random bytes -> 16 url-safe characters: unguessable, and short enough for a URL.
    return "job_" + secrets.token_urlsafe(12)


def object_key_for(user_id: str, job_id: str) -> str:
    return f"videos/{user_id}/{job_id}.mp4"


# What `new_upload_id` makes, with room to spare, as for jobs.
UPLOAD_ID_PATTERN = re.compile(r"upl_[A-Za-z0-9_\-]{12,64}")


def new_upload_id() -> str:
    return "upl_" + secrets.token_urlsafe(12)


def upload_key_for(user_id: str, upload_id: str) -> str:
    # Under the user, so one R2 lifecycle rule on `uploads/` expires them all (README).
    return f"uploads/{user_id}/{upload_id}"


def poster_key_for(object_key: str) -> str:
    """The poster's key, beside its video's: one prefix per user holds both."""
    return object_key.removesuffix(".mp4") + ".jpg"


# The worker's stages (worker/contract.py), in the order it goes through them.
PROGRESS_STAGE_RANK: dict[str, int] = {stage: rank for rank, stage in enumerate(PROGRESS_STAGES)}
# At most one progress write per job per this long, whatever the worker sends: a stage change
# and a job's first report are written at once (issue 14).
PROGRESS_WRITE_INTERVAL_MS = 1000


# --- Records the stores hand back -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    credits: int
    plan: str
    created_at: int
    updated_at: int
    # Not stored: the signup credits this very call granted, because it created the user. Only
    # that one answer carries them, so telemetry counts each signup once. Not part of `==`:
    # the same user read back later is still equal.
    signup_grant: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class NewJob:
    """Everything a job needs before it is charged and created, in one store call."""

    job_id: str
    user_id: str
    prompt: str
    image_url: str | None
    duration_sec: int
    seed: int
    cost: int
    object_key: str


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    user_id: str
    status: JobStatus
    prompt: str
    image_url: str | None
    duration_sec: int
    seed: int
    cost: int
    object_key: str
    created_at: int
    updated_at: int
    runpod_id: str | None = None
    error_code: str | None = None
    error_detail: str | None = None
    download_url: str | None = None
    download_expires_at: int | None = None
    checked_at: int | None = None
    idempotency_key: str | None = None
    # The worker's latest report (0..1 and its stage), and when it was written: the throttle.
    progress: float | None = None
    stage: str | None = None
    progress_written_at: int | None = None
    # Set only when the worker said it uploaded the poster; its URL is presigned with the video's.
    poster_key: str | None = None
    poster_url: str | None = None
    # A deleted job's tombstone: only the event streams' poll (`jobs_updated_since`) sees one.
    deleted_at: int | None = None
    # Not stored, like `User.signup_grant`: set on the answer of the charge that created its user.
    signup_grant: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Upload:
    """An image a user uploads straight to storage, for jobs to start from (uploads.py)."""

    upload_id: str
    user_id: str
    content_type: str
    size_bytes: int  # declared, and signed into the upload URL
    object_key: str
    created_at: int
    expires_at: int  # the upload URL stops working; until then the upload is pending
    usable_until: int  # jobs may use it until then


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A status to move a job to. Ignored when it would move the job backwards."""

    status: JobStatus
    error_code: str | None = None
    error_detail: str | None = None
    runpod_id: str | None = None
    # With DONE: the poster's key, when the worker's output says it uploaded one.
    poster_key: str | None = None


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    """A worker's report: recorded by the store's rules (forward only, throttled)."""

    progress: float
    stage: str
    now: int  # ms: the caller's clock, so the throttle can be tested without waiting


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """What a store says about an Idempotency-Key: yours now, answered already, or busy."""

    outcome: str  # "claimed" | "replay" | "in_flight"
    status_code: int | None = None
    body: str | None = None
    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[Job] = field(default_factory=list)
    next_cursor: str | None = None


# --- The HTTP contract ------------------------------------------------------------------------


class ApiModel(BaseModel):
    """A shape on the wire: camelCase names there (`job_id` is `jobId`), snake_case in Python."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)


# JSON's "\ud800" escape decodes to a lone UTF-16 surrogate: a Python str, but not Unicode text.
# UTF-8 cannot encode it, so SQLite, httpx (Convex, RunPod) and the log writer would all fail.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def holds_lone_surrogate(value: object) -> bool:
    """Whether any string in `value` (a JSON value: keys too) holds a lone surrogate.

    A loop, not recursion: a body may nest as deep as the JSON parser allows.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


class RequestModel(ApiModel):
    """A body a client sends: every field, of every subclass, is checked before its own rules."""

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, value: Any) -> Any:
        if holds_lone_surrogate(value):
            raise PydanticCustomError(
                "lone_surrogate",
                "must be valid Unicode text: it holds a lone surrogate (an escape from "
                "\\ud800 to \\udfff without its pair)",
            )
        return value


def _check_prompt(value: str) -> str:
    text = value.strip()
    if not text:
        raise ValueError("must not be empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"must be at most {MAX_PROMPT_CHARS} characters")
    for char in text:
        if char not in "\n\t" and unicodedata.category(char) == "Cc":
            raise ValueError("must not contain control characters")
    return text


def _is_ip_literal(host: str) -> bool:
    """True for an IP in any notation a URL parser or libc accepts (127.1, 0x7f.1, 2130706433)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        pass
    # WHATWG URL parsing treats a host whose last label is numeric as IPv4, even if inet_aton
    # would not (e.g. "1.2.3.4.5"), so such a host is never a name.
    last = host.rsplit(".", 1)[-1]
    return last.isdigit() or last.lower().startswith("0x")


def _check_image_url(value: str) -> str:
    if len(value) > MAX_IMAGE_URL_CHARS:
        raise ValueError(f"must be at most {MAX_IMAGE_URL_CHARS} characters")
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme.lower() != "https":
        raise ValueError("must be an https URL")
    if "@" in parts.netloc or parts.username or parts.password:
        raise ValueError("must not contain credentials")
    host = image_url_host(value)
    if not host or "%" in host or "[" in parts.netloc:
        raise ValueError("must name a host")
    if _is_ip_literal(host):
        raise ValueError("must name a host, not an IP address")
    if "." not in host or host == "localhost" or host.endswith(PRIVATE_HOST_SUFFIXES):
        raise ValueError("must name a public host")
    return value


def image_url_host(url: str) -> str:
    """The URL's host, lower-cased, IDNA-encoded and without a trailing dot."""
    host = (urlsplit(url).hostname or "").rstrip(".")
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError("must name a valid host") from None


# --- Examples for the API docs (/docs, /redoc): what a client really sends and gets ---------

DONE_JOB_EXAMPLE: dict[str, Any] = {
    "jobId": "job_Xk3v9QyL0aPz7wRt",
    "status": "done",
    "progress": 1.0,
    "stage": None,
    "r2Url": "https://acct.r2.cloudflarestorage.com/cineweave-videos/videos/user_alice/"
    "job_Xk3v9QyL0aPz7wRt.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=86400"
    "&X-Amz-Signature=5d41402abc4b2a76b9719d911017c592",
    "expiresAt": "2026-11-26T12:30:00.000Z",
    "posterUrl": "https://acct.r2.cloudflarestorage.com/cineweave-videos/videos/user_alice/"
    "job_Xk3v9QyL0aPz7wRt.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=86400"
    "&X-Amz-Signature=7d793037a0760186574b0282f2f435e7",
    "posterExpiresAt": "2026-11-26T12:30:00.000Z",
    "durationSec": 5,
    "prompt": "A silver drone flies through neon skyline",
    "imageUrl": None,
    "seed": 42,
    "cost": 5,
    "createdAt": "2026-11-25T12:29:50.120Z",
    "updatedAt": "2026-11-25T12:29:58.402Z",
    "error": None,
}
RUNNING_JOB_EXAMPLE: dict[str, Any] = DONE_JOB_EXAMPLE | {
    "jobId": "job_Rt5u7VwX9yZa1bCd",
    "status": "running",
    "progress": 0.1,
    "stage": "generating",
    "r2Url": None,
    "expiresAt": None,
    "posterUrl": None,
    "posterExpiresAt": None,
}
FAILED_JOB_EXAMPLE: dict[str, Any] = DONE_JOB_EXAMPLE | {
    "jobId": "job_Pq8s2LmN4bWc6dYe",
    "status": "failed",
    "progress": None,
    "r2Url": None,
    "expiresAt": None,
    "posterUrl": None,
    "posterExpiresAt": None,
    "error": {"code": "WORKER_FAILED", "detail": "CUDA out of memory"},
}
# `openapi_examples` of POST /jobs/create: Swagger UI offers each in a drop-down.
CREATE_JOB_EXAMPLES: dict[str, Example] = {
    "prompt only": {
        "summary": "A 5-second video from a prompt",
        "value": {
            "prompt": "A silver drone flies through neon skyline",
            "imageUrl": None,
            "durationSec": 5,
            "seed": 42,
        },
    },
    "from a start image": {
        "summary": "Animate a public image; the gateway picks the seed",
        "value": {
            "prompt": "The paper boat drifts down the rainy street",
            "imageUrl": "https://images.example.com/boat.png",
            "durationSec": 3,
        },
    },
}
CREATE_JOB_EXAMPLES["from an uploaded image"] = {
    "summary": "Animate an image uploaded with POST /uploads",
    "value": {
        "prompt": "The paper boat drifts down the rainy street",
        "imageUploadId": "upl_Qm7c2VbX9kLp4sTe",
        "durationSec": 3,
    },
}
# RunPod's webhook body: its status payload plus the job's `input` (with our `jobId`).
WEBHOOK_EXAMPLES: dict[str, Example] = {
    "completed": {
        "summary": "The worker finished and uploaded the video",
        "value": {
            "id": "3e1a7c52-9d4b-4f0e-8a61-2b7d9c0e5f13-u1",
            "status": "COMPLETED",
            "delayTime": 812,
            "executionTime": 41230,
            "input": {"jobId": "job_Xk3v9QyL0aPz7wRt"},
            # The worker echoes `jobId` (README, "The worker contract"): RunPod's proof.
            "output": {
                "jobId": "job_Xk3v9QyL0aPz7wRt",
                "objectKey": "videos/user_alice/job_Xk3v9QyL0aPz7wRt.mp4",
            },
        },
    },
    "failed": {
        "summary": "The worker failed: the job fails and is refunded",
        "value": {
            "id": "3e1a7c52-9d4b-4f0e-8a61-2b7d9c0e5f13-u1",
            "status": "FAILED",
            "input": {"jobId": "job_Xk3v9QyL0aPz7wRt"},
            "error": '{"jobId": "job_Xk3v9QyL0aPz7wRt", "error_type": "OutOfMemoryError", '
            '"error_message": "CUDA out of memory"}',
        },
    },
}
WEBHOOK_ANSWER_EXAMPLE = {"jobId": "job_Xk3v9QyL0aPz7wRt", "status": "done"}
PROGRESS_ANSWER_EXAMPLE: dict[str, Any] = {
    "jobId": "job_Xk3v9QyL0aPz7wRt",
    "status": "running",
    "progress": 0.1,
    "stage": "generating",
}


class ProgressRequest(RequestModel):
    """A worker's progress POST: `ProgressReport` of worker/contract.py, checked at the door."""

    progress: StrictFloat = Field(ge=0.0, le=1.0, allow_inf_nan=False, description="From 0 to 1.")
    stage: ProgressStage = Field(description="Where the worker is: " + ", ".join(PROGRESS_STAGES))

    # A tolerant reader, as the worker contract is (worker/contract.py): a newer worker may
    # add a field, and refusing it would lose its progress.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"progress": 0.1, "stage": "generating"}]},
    )


class ProgressAnswer(ApiModel):
    job_id: str
    status: JobStatus
    progress: float | None
    stage: str | None

    model_config = ConfigDict(json_schema_extra={"examples": [PROGRESS_ANSWER_EXAMPLE]})


class CreateJobRequest(RequestModel):
    prompt: StrictStr = Field(description="What to render, 1-2000 characters after trimming.")
    image_url: StrictStr | None = Field(
        default=None, description="Optional https URL of a start image."
    )
    image_upload_id: StrictStr | None = Field(
        default=None,
        description="Optional start image uploaded with POST /uploads; not with imageUrl.",
    )
    duration_sec: StrictInt = Field(description="Video length in seconds.")
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = Field(
        default=None, description="Random seed; the gateway picks and records one when omitted."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt": "A silver drone flies through neon skyline",
                    "imageUrl": None,
                    "durationSec": 5,
                    "seed": 42,
                }
            ]
        },
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _check_prompt(value)

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_image_url(value)

    @field_validator("image_upload_id")
    @classmethod
    def _one_start_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Declared after image_url, so its value (when valid) is already in `info.data`.
        if value is not None and info.data.get("image_url") is not None:
            raise ValueError("must not be given together with imageUrl: send one of them")
        return value


def create_job_request_model(
    min_duration: int, max_duration: int, allowed_hosts: Sequence[str]
) -> type[CreateJobRequest]:
    """`CreateJobRequest` plus the configured limits, checked in the same validation pass."""

    def duration_in_limits(cls: type, value: int) -> int:
        if not min_duration <= value <= max_duration:
            raise ValueError(f"must be from {min_duration} to {max_duration}")
        return value

    def host_allowed(cls: type, value: str | None) -> str | None:
        if value and allowed_hosts and image_url_host(value) not in allowed_hosts:
            raise ValueError("must name an allowed host")
        return value

    return create_model(
        "CreateJobRequest",  # the name the schema and the docs show
        __base__=CreateJobRequest,
        __validators__={
            "duration_in_limits": field_validator("duration_sec")(duration_in_limits),
            "host_allowed": field_validator("image_url")(host_allowed),
        },
    )


class CreateJobResponse(ApiModel):
    job_id: str = Field(examples=["job_Xk3v9QyL0aPz7wRt"])

    model_config = ConfigDict(json_schema_extra={"examples": [{"jobId": "job_Xk3v9QyL0aPz7wRt"}]})


class JobError(ApiModel):
    code: str
    detail: str


class JobResponse(ApiModel):
    job_id: str
    status: JobStatus
    progress: float | None = Field(
        description="0 to 1 while running, once the worker reports; 1 when done, else null."
    )
    stage: str | None = Field(
        description="The worker's stage while running (started, generating, uploading); "
        "null otherwise."
    )
    r2_url: str | None
    expires_at: str | None
    poster_url: str | None = Field(
        description="A JPEG frame of the video, when the worker made one; presigned like r2Url."
    )
    poster_expires_at: str | None
    duration_sec: int
    prompt: str
    image_url: str | None
    seed: int
    cost: int
    created_at: str
    updated_at: str
    error: JobError | None

    model_config = ConfigDict(
        json_schema_extra={"examples": [DONE_JOB_EXAMPLE, RUNNING_JOB_EXAMPLE, FAILED_JOB_EXAMPLE]}
    )

    @classmethod
    def from_job(cls, job: Job) -> JobResponse:
        """The one answer for a job: every route (and any fast twin) renders it through here."""
        done = job.status is JobStatus.DONE
        error = None
        if job.error_code:
            error = JobError(code=job.error_code, detail=job.error_detail or "")
        poster = job.poster_url if done and job.poster_key else None
        progress, stage = job_progress(job)
        return cls(
            job_id=job.job_id,
            status=job.status.public,
            progress=progress,
            stage=stage,
            r2_url=job.download_url if done else None,
            expires_at=iso_from_ms(job.download_expires_at) if done else None,
            poster_url=poster,
            poster_expires_at=iso_from_ms(job.download_expires_at) if poster else None,
            duration_sec=job.duration_sec,
            prompt=job.prompt,
            image_url=job.image_url,
            seed=job.seed,
            cost=job.cost,
            created_at=iso_from_ms(job.created_at) or "",
            updated_at=iso_from_ms(job.updated_at) or "",
            error=error,
        )


def job_progress(job: Job) -> tuple[float | None, str | None]:
    """What a job shows of its progress: the worker's latest report while it is active, 1 once
    done, nothing once failed or canceled (the error says why)."""
    if job.status is JobStatus.DONE:
        return 1.0, None
    if job.status.is_terminal:
        return None, None
    return job.progress, job.stage


class JobListResponse(ApiModel):
    jobs: list[JobResponse]
    next_cursor: str | None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "jobs": [DONE_JOB_EXAMPLE],
                    "nextCursor": "WzE3NjQwNzM3OTAxMjAsImpvYl9QcThzMkxtTjRiV2M2ZFllIl0",
                }
            ]
        }
    )


class CreditsResponse(ApiModel):
    credits: int
    plan: str

    model_config = ConfigDict(json_schema_extra={"examples": [{"credits": 75, "plan": "starter"}]})


class FieldError(ApiModel):
    field: str
    message: str


class ErrorResponse(ApiModel):
    detail: str
    code: str
    errors: list[FieldError] | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"detail": "Insufficient credits", "code": "INSUFFICIENT_CREDITS"}]
        }
    )


def json_dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)
