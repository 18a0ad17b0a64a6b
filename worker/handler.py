"""The RunPod Serverless handler: one job in, one video (and a poster) uploaded, one answer out.

Run by the RunPod SDK (`python worker/handler.py`, as the image's CMD does); locally, the SDK's
test mode runs one job and exits:

    python worker/handler.py --test_input '{"input": {...}}'

The handler never raises. On failure it *returns* `{"error": <WorkerError as a JSON string>}`:
runpod-python pops a returned dict's "error" into the job's `error` unchanged and marks the job
FAILED (runpod/serverless/modules/rp_job.py, `run_job`). That string carries the input's `jobId`,
which an exception escaping the handler could not (the SDK would report its own JSON without
it), and the gateway binds a RunPod job to its own only through that echo.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: put the repository root first on the path instead of worker/, so that
    # `worker.*` imports work and no module in worker/ shadows a library of the same name.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import functools  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from worker.contract import (  # noqa: E402
    CONTRACT_VERSION,
    POSTER_CONTENT_TYPE,
    WorkerError,
    WorkerInput,
    WorkerOutput,
    describe_validation_error,
)
from worker.generator import Generator, TestPattern  # noqa: E402
from worker.poster import poster_jpeg  # noqa: E402
from worker.progress import PROGRESS_TIMEOUT_SECONDS, ProgressReporter, RunPodProgress  # noqa: E402
from worker.transfer import RetryPolicy, TransferFailed, Uploader, fetch_image  # noqa: E402

log = logging.getLogger("worker")

# The gateway's default RUNPOD_EXECUTION_TIMEOUT_SECONDS: RunPod stops a job after it anyway, so
# upload retries past it would be wasted. Set it to the endpoint's execution timeout.
DEFAULT_JOB_TIMEOUT_SECONDS = 600.0
# A poster is best effort: fewer tries, so a broken poster URL costs seconds, not minutes.
POSTER_RETRY = RetryPolicy(attempts=3)
# How far along each stage starts. Rendering is most of the work on a real model.
STAGE_PROGRESS = {"started": 0.0, "generating": 0.1, "uploading": 0.8}


def runpod_progress_for(job: dict[str, Any]) -> RunPodProgress | None:
    """`progress_update` for this job when running on RunPod, else None.

    The SDK posts progress to the URL RunPod gives each worker in RUNPOD_WEBHOOK_POST_OUTPUT
    (runpod/serverless/modules/rp_http.py). Without it (the SDK's local test mode, the gateway's
    local stand-in) a call could only log a failed POST, so none is made.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return None
    from runpod.serverless import progress_update  # the SDK is needed only on RunPod

    return functools.partial(progress_update, job)


class Refused(Exception):
    """The input asks for something this worker cannot honour."""


# What the gateway's operators read in RunPod's console; anything else is the exception's name.
ERROR_TYPES: dict[type[Exception], str] = {Refused: "InvalidInput", TransferFailed: "UploadFailed"}


@dataclass
class Worker:
    """Everything a job needs, made once per process; tests swap the clock, sleep and generator."""

    generator: Generator
    client: httpx.Client
    job_timeout: float = DEFAULT_JOB_TIMEOUT_SECONDS
    retry: RetryPolicy = RetryPolicy()
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rng: Callable[[], float] = random.random
    progress_timeout: float = PROGRESS_TIMEOUT_SECONDS
    runpod_progress: Callable[[dict[str, Any]], RunPodProgress | None] = runpod_progress_for

    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """The RunPod handler: the contract's output, or `{"error": ...}` echoing the jobId."""
        job_input = job.get("input")
        job_id = _echoed_id(job_input)
        try:
            return self._run(job, job_input)
        except Exception as exc:  # every failure is reported with the echo, never raised
            report = _failure(job_id, exc, job_input)
            # A refusal or a failed transfer says all in its message; anything else is a bug or
            # the model's failure, and its traceback is what the operator needs.
            expected = type(exc) in ERROR_TYPES
            log.warning(
                "job %s failed: %s: %s",
                job_id,
                report.error_type,
                report.error_message,
                exc_info=None if expected else exc,
            )
            return {"error": report.to_error_string()}

    def _run(self, job: dict[str, Any], job_input: object) -> dict[str, Any]:
        request = self._accept(job_input)
        deadline = self.clock() + self.job_timeout
        progress = ProgressReporter(
            self.client, request.progress_url, self.runpod_progress(job), self.progress_timeout
        )
        progress.report("started", STAGE_PROGRESS["started"])
        image = self._start_image(request)
        progress.report("generating", STAGE_PROGRESS["generating"])
        video = self.generator.generate(request.prompt, image, request.duration_sec, request.seed)
        try:
            progress.report("uploading", STAGE_PROGRESS["uploading"])
            return self._deliver(request, video, deadline)
        finally:
            video.unlink(missing_ok=True)

    def _accept(self, job_input: object) -> WorkerInput:
        try:
            request = WorkerInput.model_validate(job_input)
        except ValidationError as exc:
            problems = describe_validation_error(exc)
            # `from None`: pydantic's own message quotes the values, and so the signed URLs.
            raise Refused(f"The input does not follow the contract: {problems}") from None
        if request.contract_version != CONTRACT_VERSION:
            raise Refused(
                f"contractVersion {request.contract_version} is not supported:"
                f" this worker speaks version {CONTRACT_VERSION}"
            )
        limit = self.generator.max_duration_sec
        if request.duration_sec > limit:
            raise Refused(
                f"durationSec {request.duration_sec} is out of range:"
                f" this worker makes videos of 1 to {limit} seconds"
            )
        return request

    def _start_image(self, request: WorkerInput) -> bytes | None:
        if request.image_url is None:
            return None
        try:
            return fetch_image(self.client, request.image_url)
        except TransferFailed as exc:
            raise Refused(str(exc)) from None

    def _deliver(self, request: WorkerInput, video: Path, deadline: float) -> dict[str, Any]:
        body = video.read_bytes()
        target = request.output
        self._uploader(deadline, self.retry).put(
            "the video", target.upload_url, body, target.content_type
        )
        log.info("job %s: video uploaded (%d bytes)", request.job_id, len(body))
        output = WorkerOutput(
            contract_version=CONTRACT_VERSION,
            job_id=request.job_id,
            object_key=target.object_key,
            size_bytes=len(body),
            duration_sec=request.duration_sec,
            poster_uploaded=self._poster(request, video, deadline),
        )
        return output.to_wire()

    def _poster(self, request: WorkerInput, video: Path, deadline: float) -> bool:
        """Best effort: True when the poster arrived; a failure is logged, never raised."""
        url = request.output.poster_upload_url
        if url is None:
            return False
        try:
            jpeg = poster_jpeg(video)
            content_type = request.output.poster_content_type or POSTER_CONTENT_TYPE
            self._uploader(deadline, POSTER_RETRY).put("the poster", url, jpeg, content_type)
        except Exception as exc:  # a poster never fails the job, whatever went wrong
            message = _scrub(str(exc), request.model_dump(mode="json"))
            log.warning("job %s: no poster: %s: %s", request.job_id, type(exc).__name__, message)
            return False
        return True

    def _uploader(self, deadline: float, policy: RetryPolicy) -> Uploader:
        return Uploader(self.client, deadline, policy, self.clock, self.sleep, self.rng)


def _echoed_id(job_input: object) -> str | None:
    """The input's jobId, echoed even when the rest of the input is unusable."""
    if isinstance(job_input, dict) and isinstance(job_id := job_input.get("jobId"), str):
        return job_id
    return None


def _failure(job_id: str | None, exc: Exception, job_input: object) -> WorkerError:
    error_type = ERROR_TYPES.get(type(exc), type(exc).__name__)
    # A generator's message is shown to the user: make sure no URL of the job rides along.
    return WorkerError(
        jobId=job_id, error_type=error_type, error_message=_scrub(str(exc), job_input)
    )


def _scrub(message: str, job_input: object) -> str:
    """`message` with every URL of the job's input replaced: they are credentials."""
    for url in _urls_in(job_input):
        message = message.replace(url, "<url>")
    return message or "The worker failed without a message"


def _urls_in(value: object) -> list[str]:
    if isinstance(value, dict):
        return [url for item in value.values() for url in _urls_in(item)]
    if isinstance(value, str) and "://" in value:
        return [value]
    return []


def load_generator(spec: str | None) -> Generator:
    """The generator named `module:Class` (WORKER_GENERATOR), built once; the test pattern
    when unset. A model loads its weights in its constructor, so once per worker process."""
    if not spec:
        return TestPattern()
    module_name, _, class_name = spec.partition(":")
    if not (module_name and class_name):
        raise ValueError(f"WORKER_GENERATOR must read module:Class, not {spec!r}")
    generator_class = getattr(importlib.import_module(module_name), class_name)
    generator: Generator = generator_class()
    return generator


@functools.cache
def default_worker() -> Worker:
    """The process's worker, made on the first job from the environment."""
    timeout = float(os.environ.get("WORKER_JOB_TIMEOUT_SECONDS", DEFAULT_JOB_TIMEOUT_SECONDS))
    generator = load_generator(os.environ.get("WORKER_GENERATOR"))
    # Uploads of a few MB take seconds; the per-try timeout is cut to the job's time left.
    client = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))
    return Worker(generator=generator, client=client, job_timeout=timeout)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """What `runpod.serverless.start` calls for every job."""
    return default_worker().handle(job)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s| %(name)s | %(message)s")
    # httpx logs every request's full URL at INFO, and presigned URLs are credentials.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def main() -> None:
    # The SDK logs at DEBUG unless told otherwise, and at DEBUG its local test mode prints the
    # whole job, presigned URLs included (rp_local.py, "Retrieved local job"). It reads the level
    # when it is imported (rp_logger.py), so this comes first.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    configure_logging()
    import runpod

    # Built before the first job: a model's weights load now, and a bad WORKER_GENERATOR
    # stops the worker at start rather than failing every job.
    default_worker()
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
