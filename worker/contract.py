"""The worker contract: what the gateway puts in a RunPod job's `input`, and what the worker
returns. Both sides build and read these shapes through the models below, so a field renamed on
one side fails the contract tests instead of a production job.

This module depends on pydantic only: the gateway's image ships it (as `worker/contract.py`)
without the worker's video libraries or the RunPod SDK.

Versioning: `contractVersion` changes when a field changes meaning or a required field is
added. New *optional* fields keep the version; every model ignores fields it does not know, so a
gateway may learn a field before the workers do (a tolerant reader, as RunPod adds keys too).
"""

from __future__ import annotations

import json
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from pydantic.alias_generators import to_camel

CONTRACT_VERSION = 1
# Final: their types are the literals, as the fields below that take them.
VIDEO_CONTENT_TYPE: Final = "video/mp4"
POSTER_CONTENT_TYPE: Final = "image/jpeg"
# The largest seed the gateway hands out (2^32 - 1, models.MAX_SEED).
MAX_SEED = 2**32 - 1

ProgressStage = Literal["started", "generating", "uploading"]
# The order a worker goes through them: progress never moves backwards.
PROGRESS_STAGES: tuple[ProgressStage, ...] = ("started", "generating", "uploading")


class _Shape(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are ignored (see above)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    def to_wire(self) -> dict[str, object]:
        """The JSON object as it travels: camelCase, optional fields left out when unset."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


NonEmpty = Annotated[StrictStr, Field(min_length=1)]


class OutputTarget(_Shape):
    """Where the worker puts what it made: presigned PUT URLs, signed for exactly one type."""

    upload_url: NonEmpty
    object_key: NonEmpty
    content_type: Literal["video/mp4"] = VIDEO_CONTENT_TYPE
    # Optional: a JPEG frame of the video, best effort (a failed poster never fails the job).
    poster_upload_url: NonEmpty | None = None
    poster_content_type: Literal["image/jpeg"] | None = None


class WorkerInput(_Shape):
    """A RunPod job's `input`, as the gateway submits it."""

    contract_version: StrictInt
    job_id: NonEmpty
    prompt: NonEmpty
    image_url: NonEmpty | None
    duration_sec: StrictInt = Field(ge=1)
    seed: StrictInt = Field(ge=0, le=MAX_SEED)
    # Optional: the gateway's URL (carrying the job's token) for progress POSTs.
    progress_url: NonEmpty | None = None
    output: OutputTarget

    def to_wire(self) -> dict[str, object]:
        # `imageUrl: null` is part of the contract's example: sent even when there is none.
        return super().to_wire() | {"imageUrl": self.image_url}


class ProgressReport(_Shape):
    """The body of each progress POST, and of `runpod.serverless.progress_update`."""

    progress: float = Field(ge=0.0, le=1.0)
    stage: ProgressStage


class WorkerOutput(_Shape):
    """What a handler returns on success: RunPod's status `output` (status COMPLETED)."""

    contract_version: StrictInt
    job_id: NonEmpty
    object_key: NonEmpty
    size_bytes: StrictInt = Field(ge=1)
    duration_sec: StrictInt = Field(ge=1)
    poster_uploaded: bool


class WorkerError(BaseModel):
    """A failure, JSON-encoded into the string a handler returns as `{"error": ...}`.

    runpod-python pops a returned dict's "error" into the job's `error` unchanged (rp_job.py,
    `run_job`), so the gateway reads this back from RunPod's status: `jobId` binds the RunPod job
    to ours, `errorMessage` is what the user is shown. snake_case keys, as the SDK writes its own
    report of a handler that raised (`error_type`, `error_message`).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: StrictStr | None = Field(alias="jobId")
    error_type: StrictStr
    error_message: StrictStr
    # Optional, for RunPod's console only: the gateway never shows it. This worker logs its
    # tracebacks instead.
    error_traceback: StrictStr | None = None

    def to_error_string(self) -> str:
        unset = {"error_traceback"} if self.error_traceback is None else None
        return json.dumps(self.model_dump(by_alias=True, exclude=unset))

    @classmethod
    def from_error_string(cls, error: str) -> WorkerError:
        return cls.model_validate_json(error)


def describe_validation_error(exc: ValidationError) -> str:
    """A refusal's message naming each bad field, never its value (values hold signed URLs)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"]) or "input"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)
