"""RunPod's webhook and the worker's progress POST: their proofs (HMAC signature, per-job
tokens), the webhook body's shape, applying them."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from crash_points import crash_point
from errors import InvalidRequest, InvalidSignature, NotFound
from metrics import Metrics
from models import JOB_ID_PATTERN, Job, ProgressRequest
from runpod_client import RUNPOD_ID_PATTERN, RunPodStatus
from worker.contract import ProgressReport

if TYPE_CHECKING:  # for the type only: jobs.py imports this module for `webhook_token`
    from jobs import JobService

_JOB_ID = JOB_ID_PATTERN  # what `new_job_id` makes: one definition, in models.py
SIGNATURE_TOLERANCE_SECONDS = 300  # Stripe's convention: 5 minutes of clock drift and delay.


# --- Proofs -----------------------------------------------------------------------------------


def _job_token(secret: str, purpose: str, job_id: str) -> str:
    message = f"{purpose}:{job_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def webhook_token(secret: str, job_id: str) -> str:
    """The per-job token in the webhook URL we hand RunPod: only we can mint it."""
    return _job_token(secret, "runpod-webhook", job_id)


def progress_token(secret: str, job_id: str) -> str:
    """The per-job token in the worker's `progressUrl`.

    Another purpose, so another token: the URL travels in the job's input, which RunPod's
    console shows and the webhook body echoes, and holding it must not prove a webhook.
    Progress moves no money, so this token alone is proof enough for it.
    """
    return _job_token(secret, "runpod-progress", job_id)


def token_is_valid(
    secret: str, job_id: str, token: str, mint: Callable[[str, str], str] = webhook_token
) -> bool:
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, so a 500).
    expected = mint(secret, job_id).encode()
    return hmac.compare_digest(expected, token.encode("utf-8", "surrogateescape"))


def sign_body(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """An `X-RunPod-Signature` header value for `body` (what a relay or our worker sends)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, body, t)}"


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    """HMAC-SHA256 of `{timestamp}.{body}` in hex: what `v1=` carries (Stripe's scheme)."""
    mac = _keyed(secret).copy()  # a copy of the keyed state: the key is not hashed again
    mac.update(b"%d." % timestamp)
    mac.update(body)
    return mac.hexdigest()


@functools.lru_cache(maxsize=4)
def _keyed(secret: str) -> hmac.HMAC:
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def signature_is_valid(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    timestamp, candidates = _parse_signature_header(header)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > SIGNATURE_TOLERANCE_SECONDS:
        return False
    expected = _digest(secret, body, timestamp).encode()
    # Check every candidate, so timing never reveals which one matched.
    matches = [hmac.compare_digest(expected, candidate) for candidate in candidates]
    return any(matches)


# ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def _parse_signature_header(header: str) -> tuple[int | None, list[bytes]]:
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and _TIMESTAMP.fullmatch(value):
            timestamp = int(value)
        elif name == "v1" and value:
            # Bytes, so a non-ASCII guess is just wrong, never a TypeError in compare_digest.
            candidates.append(value.encode("utf-8", "surrogateescape"))
    return timestamp, candidates


# --- The body and applying it -----------------------------------------------------------------


def _parse_json(body: bytes) -> dict[str, Any] | None:
    try:
        # orjson first, a sixth of the stdlib's cost. What it refuses and the stdlib takes
        # (NaN, Infinity, a BOM, lone surrogates) goes to the stdlib. Two edges differ, none
        # in a field the gateway acts on (ids and statuses are strings, progress a fraction):
        # orjson reads an integer past 64 bits as a float, where the stdlib keeps it exact,
        # and it takes nesting up to 1,024 deep, where the stdlib stops near 1,000.
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = _parse_json_stdlib(body)
    return payload if isinstance(payload, dict) else None


def _parse_json_stdlib(body: bytes) -> Any:
    try:
        return json.loads(body)
    # RecursionError: a body nested deeper than the parser goes (`[[[[...`, 10,000 deep).
    except (ValueError, RecursionError):
        return None


# RunPod's statuses are upper-case words (IN_QUEUE, COMPLETED): room for new ones, no more.
_RUNPOD_STATUS = re.compile(r"[A-Za-z_]{1,64}")


def webhook_payload(body: bytes, *, signed: bool) -> dict[str, Any]:
    """The proven webhook's body, refused (400) unless it has the shape RunPod sends.

    Checked before any of it reaches the store or a RunPod URL. A signed body must name
    RunPod's job (`id`) and its `status`; a tokened one only hints at the id, since RunPod's
    own `/status` decides, so either may be missing, but never malformed.
    """
    payload = _parse_json(body)
    if payload is None:
        raise InvalidRequest("The webhook body is not a JSON object")
    errors = _webhook_field_errors(payload, required=signed)
    if errors:
        exc = InvalidRequest("The webhook body is not what RunPod sends")
        exc.errors = errors
        raise exc
    return payload


def _webhook_field_errors(payload: dict[str, Any], *, required: bool) -> list[dict[str, str]]:
    runpod_id, status, job_input = payload.get("id"), payload.get("status"), payload.get("input")
    errors = []
    if (runpod_id is not None or required) and not _matches(RUNPOD_ID_PATTERN, runpod_id):
        message = "must be RunPod's job id: 1 to 128 letters, digits, '-' or '_'"
        errors.append({"field": "id", "message": message})
    if (status is not None or required) and not _matches(_RUNPOD_STATUS, status):
        errors.append({"field": "status", "message": "must be a RunPod status, such as COMPLETED"})
    if job_input is not None and not isinstance(job_input, dict):
        errors.append({"field": "input", "message": "must be an object"})
    job_id = job_input.get("jobId") if isinstance(job_input, dict) else None
    if job_id is not None and not _matches(_JOB_ID, job_id):
        errors.append({"field": "input.jobId", "message": "must be a job id from this gateway"})
    return errors


def _matches(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


async def read_body(receive: Receive) -> bytes:
    """The request's whole body, as Starlette's `Request.body` reads it (requests.py `stream`),
    without its async generator: one message almost always carries a webhook's whole body, and
    the generator and its `aclosing` cost as much as the rest of the read (issue 13). It
    consumes the body: the request's own `body()` would then wait for more. ASGI sends only
    `http.request` and `http.disconnect` messages here."""
    message = await receive()
    chunks = []
    while message["type"] == "http.request":
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        message = await receive()
    raise ClientDisconnect()  # as Starlette's: the client left, or the body guard ended it


async def receive_webhook(request: Request, jobs: JobService) -> Job:
    metrics: Metrics = request.app.state.metrics
    body = await read_body(request.receive)
    header = request.headers.get("x-runpod-signature")
    if header is not None:
        if not signature_is_valid(jobs.webhook_secret, header, body):
            metrics.count_webhook_failure("bad_signature")
            raise InvalidSignature()
        return await _apply_signed(jobs, webhook_payload(body, signed=True))
    job_id = request.query_params.get("jobId", "")
    token = request.query_params.get("token", "")
    if not (job_id and token):
        metrics.count_webhook_failure("missing")
        raise InvalidSignature()
    if not token_is_valid(jobs.webhook_secret, job_id, token):
        metrics.count_webhook_failure("bad_token")
        raise InvalidSignature()
    crash_point("during_webhook")
    return await _apply_tokened(jobs, job_id, webhook_payload(body, signed=False))


async def _apply_signed(jobs: JobService, payload: dict[str, Any]) -> Job:
    """A body signed with RUNPOD_WEBHOOK_SECRET is trusted, and may bind a RunPod id as is.

    Only our own code holds the secret (a relay, our worker), so the signature vouches for the
    body as the worker's echo vouches for a tokened one. A relay must therefore sign only what
    RunPod itself told it. A recorded RunPod id still cannot be replaced.
    """
    status = RunPodStatus.from_payload(payload)
    job_input = payload.get("input")
    job_id = job_input.get("jobId") if isinstance(job_input, dict) else None
    job = await jobs.store.find_job(job_id) if isinstance(job_id, str) else None
    if job is None:
        job = await jobs.store.find_job_by_runpod_id(status.id)
    if job is None or (job.runpod_id and job.runpod_id != status.id):
        raise NotFound("Job not found")
    return await jobs.apply_runpod_status(job, status)


async def _apply_tokened(jobs: JobService, job_id: str, payload: dict[str, Any] | None) -> Job:
    job = await jobs.store.find_job(job_id)
    if job is None:
        raise NotFound("Job not found")
    # The body is untrusted: it names a RunPod job, which RunPod's own answer must confirm.
    runpod_id = (payload or {}).get("id")
    if not isinstance(runpod_id, str) or not runpod_id:
        raise InvalidRequest("The webhook names no RunPod job")
    return await jobs.apply_tokened_webhook(job, runpod_id)


# --- The worker's progress --------------------------------------------------------------------


async def receive_progress(
    request: Request, jobs: JobService, job_id: str, token: str, body: ProgressRequest
) -> Job:
    """A worker's report, proven by the job's progress token. A finished job is left as it is,
    and answered like any other (200): the worker must not take it for a failure."""
    if not (job_id and token) or not token_is_valid(
        jobs.webhook_secret, job_id, token, progress_token
    ):
        # Counted with the webhook's refusals: after a secret rotation both climb together.
        metrics: Metrics = request.app.state.metrics
        metrics.count_webhook_failure("bad_progress_token")
        raise InvalidSignature("Progress proof is missing or invalid")
    job = await jobs.store.find_job(job_id)
    if job is None:
        raise NotFound("Job not found")
    return await jobs.record_progress(job, ProgressReport(progress=body.progress, stage=body.stage))
