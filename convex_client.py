"""The production store: Convex, called over its HTTP API with the deploy key.

Each `Store` method is one Convex function in `convex/gateway.ts` (`get_or_create_user` reads
first and creates only when the read finds nobody); every rule about money or limits is one
mutation, so Convex's serializable transactions keep many gateway instances honest.

Why HTTP and not the `convex` package's `ConvexClient`: that client wraps a Rust WebSocket client
whose calls block the calling thread (holding the GIL) and retry forever on network errors. On
an event loop that would stall every request; in a thread pool it would pin threads with no
deadline. The HTTP API gives us the shared `httpx.AsyncClient`, explicit timeouts, and a clear
rule for what is safe to retry. Values travel as `convex_encoded_json`, as convex-py and
convex-js send them, and are decoded with the package's own codec (`convex.values`).

How a deployment answers (get-convex/convex-backend, `crates/local_backend/src/public_api.rs`;
the shapes, each with its source, are in `tests/convex_fixtures.py`):
    200 {"status": "success", "value"}        -> the value.
    200 {"status": "error", "errorData"}      -> a ConvexError: its `code` is the gateway's own
                                                 error (402, 429, 404, 409, 400), as on SQLite.
    200 {"status": "error"}, no errorData     -> a plain Error, 502 UPSTREAM_ERROR. Production
                                                 redacts its message to "[Request ID: …] Server
                                                 Error"; a dev deployment adds the cause, which
                                                 tells a missing function, a wrong kind or bad
                                                 arguments (functions not deployed, or out of
                                                 date) from a bug.
    560 with the same body                    -> the same (the status convex-js still accepts).
    401/403 {"code", "message"}               -> the deploy key was refused: 502, and /readyz fails.
    503 {"code": OCC}                         -> nothing committed: retried, then 503.
    other 5xx, 429, timeouts                  -> 503 STORE_UNAVAILABLE, as on SQLite.
Queries are retried on transient failures. A mutation is retried only when it surely did not
commit: its connection never opened, or Convex answered the OCC 503.

Over 400 lines because the table above is one protocol: the error mapping, the retry rule and
the value codec serve this client alone, and each `Store` method is a few lines on top of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from convex.values import convex_to_json, json_to_convex

from config import Settings
from errors import (
    GatewayError,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidCursor,
    InvalidRequest,
    JobNotCancelable,
    JobNotDeletable,
    NotFound,
    StoreUnavailable,
    TooManyActiveJobs,
    TooManyPendingUploads,
    UploadNotFound,
    UpstreamError,
)
from models import (
    IdempotencyClaim,
    Job,
    JobPage,
    JobStatus,
    NewJob,
    ProgressUpdate,
    StatusUpdate,
    Upload,
    User,
)
from outbound_http import AsyncioTransport

log = logging.getLogger("gateway.convex")

# convex-js's `STATUS_CODE_UDF_FAILED` (npm-packages/convex/src/browser/http_client.ts): an
# older backend's status for "the function threw". Today's answers 200; both carry the same body.
LEGACY_FUNCTION_ERROR_STATUS = 560
# `OCC_ERROR` in crates/errors/src/lib.rs: a mutation's commit kept conflicting after the
# backend's own retries (UDF_EXECUTOR_OCC_MAX_RETRIES = 4, application_function_runner/mod.rs),
# answered 503 and committed nothing, so sending it again cannot charge twice.
OCC_CODE = "OptimisticConcurrencyControlFailure"
# The codes `UDF_404_ON_BAD_PATH` turns a missing function or a wrong kind into (an emergency
# knob, off by default: crates/common/src/knobs.rs, crates/udf/src/validation.rs).
MISSING_FUNCTION_CODES = frozenset({"FunctionPathNotFound", "FunctionPathWrongType"})
# What the backend says when this gateway and the deployed functions disagree. Visible only when
# the deployment does not redact errors (dev deployments); production reads "Server Error".
_OUT_OF_DATE = re.compile(
    r"Could not find (?:public )?function for"  # crates/udf/src/validation.rs, application/lib.rs
    r"|Trying to execute \S+ as \w+, but it is defined as"  # validation.rs: wrong kind
    r"|ArgumentValidationError: "  # validation.rs: args refused by the function's validator
    r"|ReturnsValidationError: "  # model/src/modules/function_validators.rs
    r"|Expected to receive (?:a single object|an object) as the function's argument"
    r"|Convex functions at or below version"  # validation.rs: `udf_version`
)
_REQUEST_ID = re.compile(r"\[Request ID: (\w+)\]")
# RedactedJsError's Display (crates/application/src/redaction.rs): this prefix always, then the
# error on the next line unless the deployment redacts it.
_REDACTED = re.compile(r"^(?:\[Request ID: \w+\] )?Server Error")
_SAFE_CODE = re.compile(r"[A-Za-z]{1,64}")

# The one bound on how often a call is POSTed. A query runs again on any failure to answer; a
# mutation only on the OCC 503 below, which says it committed nothing. A connection that never
# opened is retried once more by the transport (CONNECT_RETRIES), not by a loop here.
QUERY_ATTEMPTS = 3
# One try plus two more after an OCC 503: the backend already retried four times with backoff
# (100 ms doubling to 2 s), so a conflict that outlives two more tries is contention to report.
MUTATION_ATTEMPTS = 3
BACKOFF_SECONDS = 0.05  # doubled each attempt, with full jitter so instances do not retry in step
# A mismatch seen on a call keeps /readyz failing this long, unless that function then works.
OUT_OF_DATE_MEMORY_SECONDS = 300.0
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# httpx's transport retries only ConnectError and ConnectTimeout (httpcore
# `_async/connection.py`), at once: the request was never sent, so even a mutation is safe.
CONNECT_RETRIES = 1
# Every request may hold one Convex call (Cloud Run sends an instance up to 80 at once): keep a
# connection for each, as re-opening one past httpx's default of 20 is a TLS handshake. The pool
# (outbound_http.py) costs nothing per idle connection kept.
CONVEX_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


class ConvexConflict(GatewayError):
    status_code = 409
    code = "CONFLICT"
    detail = "The record already exists"


class ConvexFunctionFailed(UpstreamError):
    """A function threw a plain Error (no errorData): a bug, a read/write limit, or a mismatch."""

    detail = "The store rejected the call"


class ConvexFunctionsOutOfDate(UpstreamError):
    """The deployment lacks a function, or it has another kind or other arguments."""

    detail = "The store's functions are not deployed or out of date"


class ConvexKeyRefused(UpstreamError):
    """Convex refused the deploy key (401/403): a configuration error, not an outage."""

    detail = "Convex refused the deploy key"


class ConvexUnavailable(StoreUnavailable):
    """Convex timed out, failed or rate-limited us: as on SQLite, the store is unavailable.

    The code is SQLite's `STORE_UNAVAILABLE`, so a client sees one answer for "the store is
    down" whichever store the deployment runs on (RunPod's outages stay UPSTREAM_UNAVAILABLE).
    """

    detail = "The store is unavailable"


class ConvexCommitConflict(ConvexUnavailable):
    """OCC retries exhausted: the mutation committed nothing and may be sent again."""

    detail = "The store is too busy to commit the change; nothing was changed"


_BUSINESS_ERRORS: dict[str, type[GatewayError]] = {
    "INSUFFICIENT_CREDITS": InsufficientCredits,
    "TOO_MANY_ACTIVE_JOBS": TooManyActiveJobs,
    "NOT_FOUND": NotFound,
    "JOB_NOT_CANCELABLE": JobNotCancelable,
    "JOB_NOT_DELETABLE": JobNotDeletable,
    "INVALID_CURSOR": InvalidCursor,
    "INVALID_REQUEST": InvalidRequest,
    "CONFLICT": ConvexConflict,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
    "TOO_MANY_PENDING_UPLOADS": TooManyPendingUploads,
    "UPLOAD_NOT_FOUND": UploadNotFound,
}


def error_from_response(response: httpx.Response, path: str = "?") -> GatewayError:
    """The gateway error a non-success Convex answer stands for; logs what the operator needs."""
    body = _json(response)
    if response.status_code not in (200, LEGACY_FUNCTION_ERROR_STATUS):
        return _http_error(path, response.status_code, body)
    if body.get("status") == "error":
        return function_error(path, body)
    log.error("Convex answered %s in an unknown shape (HTTP %s)", path, response.status_code)
    return UpstreamError("The store answered in an unknown shape")


def function_error(path: str, body: dict[str, Any]) -> GatewayError:
    """A `status: "error"` body: what the function threw, as the gateway's error."""
    message = body.get("errorMessage")
    message = message if isinstance(message, str) else ""
    if "errorData" in body:
        return _convex_error(path, _decode(body["errorData"]))
    if _OUT_OF_DATE.search(message):
        log.error(
            "Convex cannot run %s as this gateway calls it: the functions in convex/ are not"
            " deployed or out of date (run `npx convex deploy`). Convex said: %s",
            path,
            _cause(message),
        )
        return ConvexFunctionsOutOfDate()
    log.error(
        "Convex %s threw a plain Error (request %s): %s. A bug, a read or write limit, or"
        " functions not deployed; the deployment's logs have the cause",
        path,
        _request_id(message),
        _cause(message) or "its message is redacted",
    )
    return ConvexFunctionFailed()


def _convex_error(path: str, data: Any) -> GatewayError:
    code = data.get("code") if isinstance(data, dict) else None
    if isinstance(code, str) and code in _BUSINESS_ERRORS:
        detail = data.get("message")
        error = _BUSINESS_ERRORS[code](detail if isinstance(detail, str) else None)
        retry_after = data.get("retryAfter")
        if isinstance(retry_after, int | float) and retry_after >= 1:
            # When the function knows when a retry can succeed (convex/model.ts `fail`).
            error.headers["Retry-After"] = str(int(retry_after))
        return error
    log.error("Convex %s threw a ConvexError the gateway does not know: %r", path, data)
    return ConvexFunctionFailed()


def _http_error(path: str, status: int, body: dict[str, Any]) -> GatewayError:
    # Errors outside a function's run are `{code, message}` (HttpError::into_response in
    # crates/common/src/http/mod.rs), with the status of the code's ErrorMetadata.
    code = raw if isinstance(raw := body.get("code"), str) else ""
    shown = code if _SAFE_CODE.fullmatch(code) else "no code"
    if status in (401, 403):
        log.error("Convex refused the deploy key calling %s: HTTP %s %s", path, status, body)
        return ConvexKeyRefused(f"Convex refused the deploy key (HTTP {status} {shown})")
    if status == 404 and code in MISSING_FUNCTION_CODES:
        log.error("Convex cannot run %s: %s (run `npx convex deploy`)", path, body)
        return ConvexFunctionsOutOfDate()
    if status == 503 and code == OCC_CODE:
        log.warning("Convex %s kept conflicting and committed nothing: %s", path, body)
        return ConvexCommitConflict()
    if status >= 500 or status == 429:
        log.warning("Convex is unavailable calling %s: HTTP %s %s", path, status, shown)
        return ConvexUnavailable()
    log.error("Convex refused %s: HTTP %s %s", path, status, body)
    return UpstreamError(f"The store refused the call (HTTP {status})")


def _may_retry(kind: str, error: GatewayError) -> bool:
    """A query may always run again; a mutation only when it surely committed nothing."""
    if kind == "query":
        return isinstance(error, ConvexUnavailable)
    return isinstance(error, ConvexCommitConflict)


def _decode(value: Any) -> Any:
    try:
        return json_to_convex(value)
    except (ValueError, TypeError, RecursionError):
        return value


def _cause(message: str) -> str:
    """The part of `errorMessage` after "[Request ID: …] Server Error", if not redacted."""
    cause = _REDACTED.sub("", message, count=1).strip()
    return cause.splitlines()[0] if cause else ""


def _request_id(message: str) -> str:
    found = _REQUEST_ID.search(message)
    return found.group(1) if found else "without an id"


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        # Convex numbers are float64; the codec wants them as floats, as Convex's own clients
        # parse them, and refuses Python ints.
        body = json.loads(response.content, parse_int=float)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return {}
    return body if isinstance(body, dict) else {}


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _signup_grant(value: dict[str, Any]) -> int:
    # Only the functions that may create the user answer with it (`getOrCreateUser`,
    # `grantCredits`, `chargeAndCreateJob`). Absent means none granted: other answers (such as
    # `getUser`'s), and functions deployed before the field, which must not break a gateway
    # deployed first.
    return int(value.get("signupGrant", 0))


def _job(value: dict[str, Any]) -> Job:
    return Job(
        job_id=value["jobId"],
        user_id=value["userId"],
        status=JobStatus(value["status"]),
        prompt=value["prompt"],
        image_url=value.get("imageUrl"),
        duration_sec=int(value["durationSec"]),
        seed=int(value["seed"]),
        cost=int(value["cost"]),
        object_key=value["objectKey"],
        created_at=int(value["createdAt"]),
        updated_at=int(value["updatedAt"]),
        runpod_id=value.get("runpodId"),
        error_code=value.get("errorCode"),
        error_detail=value.get("errorDetail"),
        download_url=value.get("downloadUrl"),
        download_expires_at=_int_or_none(value.get("downloadExpiresAt")),
        checked_at=_int_or_none(value.get("checkedAt")),
        idempotency_key=value.get("idempotencyKey"),
        # `.get`: functions deployed before these fields must not break a newer gateway.
        progress=_float_or_none(value.get("progress")),
        stage=value.get("stage"),
        progress_written_at=_int_or_none(value.get("progressWrittenAt")),
        poster_key=value.get("posterKey"),
        poster_url=value.get("posterUrl"),
        deleted_at=_int_or_none(value.get("deletedAt")),
        signup_grant=_signup_grant(value),
    )


def _user(value: dict[str, Any]) -> User:
    return User(
        user_id=value["userId"],
        credits=int(value["credits"]),
        plan=value["plan"],
        created_at=int(value["createdAt"]),
        updated_at=int(value["updatedAt"]),
        signup_grant=_signup_grant(value),
    )


def _upload_args(upload: Upload) -> dict[str, Any]:
    return {
        "uploadId": upload.upload_id,
        "userId": upload.user_id,
        "contentType": upload.content_type,
        "sizeBytes": upload.size_bytes,
        "objectKey": upload.object_key,
        "createdAt": upload.created_at,
        "expiresAt": upload.expires_at,
        "usableUntil": upload.usable_until,
    }


def _upload(value: dict[str, Any]) -> Upload:
    return Upload(
        upload_id=value["uploadId"],
        user_id=value["userId"],
        content_type=value["contentType"],
        size_bytes=int(value["sizeBytes"]),
        object_key=value["objectKey"],
        created_at=int(value["createdAt"]),
        expires_at=int(value["expiresAt"]),
        usable_until=int(value["usableUntil"]),
    )


class ConvexStore:
    def __init__(
        self,
        http: httpx.AsyncClient,
        signup_credits: int,
        default_plan: str,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self._http = http
        self._new_user = {"signupCredits": signup_credits, "plan": default_plan}
        self._sleep, self._clock = sleep, clock
        # Function path -> (why it cannot run as we call it, when seen): `ping` reports these.
        self._out_of_date: dict[str, tuple[str, float]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ConvexStore:
        assert settings.convex_url and settings.convex_deploy_key
        http = httpx.AsyncClient(
            base_url=settings.convex_url.rstrip("/"),
            headers={"Authorization": f"Convex {settings.convex_deploy_key.get_secret_value()}"},
            # A mutation's user code may run 1 s, and the backend retries an OCC conflict four
            # times (100 ms doubling); the rest is queueing and the network.
            timeout=httpx.Timeout(10.0, connect=3.0),
            transport=AsyncioTransport(retries=CONNECT_RETRIES, limits=CONVEX_LIMITS),
        )
        return cls(http, settings.effective_signup_credits, settings.default_plan)

    # --- transport --------------------------------------------------------------------------

    async def _call(self, kind: str, path: str, args: dict[str, Any]) -> Any:
        # `convex_encoded_json` is what convex-py and convex-js send: the answer's `value` and
        # `errorData` then round-trip every Convex value (`export_value` in public_api.rs);
        # "json" would turn an int64 into a string. Arguments are read as this encoding
        # whatever `format` says (`UdfArgsJson` in crates/udf/src/helpers.rs).
        body = {"path": path, "args": convex_to_json(args), "format": "convex_encoded_json"}
        attempts = QUERY_ATTEMPTS if kind == "query" else MUTATION_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                value = self._outcome(path, await self._post(kind, body))
            except GatewayError as error:
                if attempt == attempts or not _may_retry(kind, error):
                    self._remember(path, error)
                    raise
                await self._sleep(random.uniform(0, BACKOFF_SECONDS * 2**attempt))
                continue
            self._out_of_date.pop(path, None)
            return value
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, kind: str, body: dict[str, Any]) -> httpx.Response:
        # One POST: the transport already retried a connection that never opened. A mutation
        # whose request may have reached Convex is never repeated: it may have committed.
        try:
            return await self._http.post(f"/api/{kind}", json=body)
        except _NEVER_SENT as exc:
            raise ConvexUnavailable("The store could not be reached") from exc
        except httpx.HTTPError as exc:
            raise ConvexUnavailable("The store did not answer in time") from exc

    @staticmethod
    def _outcome(path: str, response: httpx.Response) -> Any:
        body = _json(response)
        if response.status_code == 200 and body.get("status") == "success" and "value" in body:
            try:
                return json_to_convex(body["value"])
            # RecursionError: nested deeper than the (recursive) codec can follow.
            except (ValueError, TypeError, RecursionError):
                log.error("Convex answered %s with a value the codec cannot read", path)
                raise UpstreamError("The store answered in an unknown shape") from None
        raise error_from_response(response, path)

    def _remember(self, path: str, error: GatewayError) -> None:
        # A refused key needs no memory: `ping` itself meets it.
        if isinstance(error, ConvexFunctionsOutOfDate):
            self._out_of_date[path] = (error.detail, self._clock())

    async def _query(self, path: str, **args: Any) -> Any:
        return await self._call("query", f"gateway:{path}", args)

    async def _mutation(self, path: str, **args: Any) -> Any:
        return await self._call("mutation", f"gateway:{path}", args)

    # --- the rules ----------------------------------------------------------------------------

    async def find_user(self, user_id: str) -> User | None:
        found = await self._query("getUser", userId=user_id)
        return None if found is None else _user(found)

    async def get_or_create_user(self, user_id: str) -> User:
        # Nearly always a read: a query is cheaper than a mutation for Convex and safe to retry.
        # Only a user's first call needs the mutation, which creates the user and grants the
        # signup credits atomically (and finds the user if a concurrent call just created it).
        found = await self.find_user(user_id)
        if found is not None:
            return found
        return _user(await self._mutation("getOrCreateUser", userId=user_id, **self._new_user))

    async def grant_credits(self, user_id: str, amount: int, reason: str) -> User:
        value = await self._mutation(
            "grantCredits", userId=user_id, amount=amount, reason=reason, **self._new_user
        )
        return _user(value)

    async def charge_and_create_job(
        self, new: NewJob, max_active: int, idempotency_key: str | None = None
    ) -> Job:
        job = {
            "jobId": new.job_id,
            "userId": new.user_id,
            "prompt": new.prompt,
            "imageUrl": new.image_url,
            "durationSec": new.duration_sec,
            "seed": new.seed,
            "cost": new.cost,
            "objectKey": new.object_key,
        }
        value = await self._mutation(
            "chargeAndCreateJob",
            job=job,
            maxActive=max_active,
            idempotencyKey=idempotency_key,
            **self._new_user,
        )
        return _job(value)

    async def record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        return _job(await self._mutation("recordRunpodId", jobId=job_id, runpodId=runpod_id))

    async def apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        value = await self._mutation(
            "applyStatus",
            jobId=job_id,
            status=update.status.value,
            errorCode=update.error_code,
            errorDetail=update.error_detail,
            runpodId=update.runpod_id,
            posterKey=update.poster_key,
        )
        return _job(value["job"]), bool(value["changed"])

    async def record_progress(self, job_id: str, update: ProgressUpdate) -> tuple[Job, bool]:
        value = await self._mutation(
            "recordProgress",
            jobId=job_id,
            progress=update.progress,
            stage=update.stage,
            now=update.now,
        )
        return _job(value["job"]), bool(value["written"])

    async def cancel_job(self, user_id: str, job_id: str) -> Job:
        return _job(await self._mutation("cancelJob", userId=user_id, jobId=job_id))

    async def delete_job(self, user_id: str, job_id: str) -> Job:
        return _job(await self._mutation("deleteJob", userId=user_id, jobId=job_id))

    async def get_job(self, user_id: str, job_id: str) -> Job:
        return _job(await self._query("getJob", userId=user_id, jobId=job_id))

    async def find_job(self, job_id: str) -> Job | None:
        value = await self._query("findJob", jobId=job_id)
        return None if value is None else _job(value)

    async def find_job_by_runpod_id(self, runpod_id: str) -> Job | None:
        value = await self._query("findJobByRunpodId", runpodId=runpod_id)
        return None if value is None else _job(value)

    async def list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage:
        # Convex's cursors are printable text; anything else (control characters, a lone
        # surrogate httpx cannot encode) was never one, so it need not cost a call. Convex
        # would read "" as the first page; SQLite refuses it, and so does this.
        if cursor is not None and (not cursor or not cursor.isprintable()):
            raise InvalidCursor()
        value = await self._query("listJobs", userId=user_id, limit=limit, cursor=cursor)
        return JobPage(jobs=[_job(job) for job in value["jobs"]], next_cursor=value["nextCursor"])

    async def jobs_updated_since(self, since: int, after_job_id: str, limit: int) -> list[Job]:
        value = await self._query(
            "jobsUpdatedSince", since=since, afterJobId=after_job_id, limit=limit
        )
        return [_job(job) for job in value]

    async def save_download_url(
        self, job_id: str, url: str, expires_at: int, poster_url: str | None = None
    ) -> None:
        await self._mutation(
            "saveDownloadUrl", jobId=job_id, url=url, expiresAt=expires_at, posterUrl=poster_url
        )

    async def _walk(self, path: str, field: str) -> list[Any]:
        # An operator view of the whole deployment comes in pages, each within one function's
        # read limits (`convex/gateway.ts`); the last page's cursor is null.
        items: list[Any] = []
        cursor: str | None = None
        while True:
            page = await self._query(path, cursor=cursor)
            items.extend(page[field])
            cursor = page["cursor"]
            if cursor is None:
                return items

    async def ledger_totals(self) -> dict[str, dict[str, int]]:
        rows = await self._walk("ledgerTotals", "totals")
        return {row["userId"]: {k: int(v) for k, v in row.items() if k != "userId"} for row in rows}

    async def claim_idempotency_key(
        self, user_id: str, key: str, fingerprint: str, now: int, ttl_ms: int, stale_ms: int
    ) -> IdempotencyClaim:
        value = await self._mutation(
            "claimIdempotencyKey",
            userId=user_id,
            key=key,
            fingerprint=fingerprint,
            now=now,
            ttlMs=ttl_ms,
            staleMs=stale_ms,
        )
        return IdempotencyClaim(
            value["outcome"], _int_or_none(value["statusCode"]), value["body"], value["jobId"]
        )

    async def complete_idempotency_key(
        self, user_id: str, key: str, status_code: int, body: str
    ) -> None:
        await self._mutation(
            "completeIdempotencyKey", userId=user_id, key=key, statusCode=status_code, body=body
        )

    async def release_idempotency_key(self, user_id: str, key: str) -> None:
        await self._mutation("releaseIdempotencyKey", userId=user_id, key=key)

    async def purge_idempotency_keys(self, before: int, limit: int) -> int:
        return int(await self._mutation("purgeIdempotencyKeys", before=before, limit=limit))

    async def claim_stale_jobs(self, stale_before: int, now: int, limit: int) -> list[Job]:
        value = await self._mutation(
            "claimStaleJobs", staleBefore=stale_before, now=now, limit=limit
        )
        return [_job(job) for job in value]

    async def claim_job_check(self, job_id: str, stale_before: int, now: int) -> Job | None:
        value = await self._mutation(
            "claimJobCheck", jobId=job_id, staleBefore=stale_before, now=now
        )
        return None if value is None else _job(value)

    async def audit(self) -> list[str]:
        return [str(problem) for problem in await self._walk("audit", "problems")]

    # --- uploads ---

    async def create_upload(self, upload: Upload, max_pending: int) -> Upload:
        value = await self._mutation(
            "createUpload", upload=_upload_args(upload), maxPending=max_pending
        )
        return _upload(value)

    async def get_upload(self, user_id: str, upload_id: str) -> Upload:
        return _upload(await self._query("getUpload", userId=user_id, uploadId=upload_id))

    async def purge_expired_uploads(self, before: int, limit: int) -> int:
        return int(await self._mutation("purgeExpiredUploads", before=before, limit=limit))

    async def ping(self) -> None:
        """Calls `gateway:ping`, which cannot fail by itself: any function error means the
        functions are not deployed (production redacts the message, so this is how we know)."""
        try:
            await self._query("ping")
        except (ConvexFunctionFailed, ConvexFunctionsOutOfDate) as exc:
            raise ConvexFunctionsOutOfDate(
                "Convex could not run gateway:ping: the functions in convex/ are not deployed"
                " or out of date"
            ) from exc
        self._raise_remembered()

    def _raise_remembered(self) -> None:
        horizon = self._clock() - OUT_OF_DATE_MEMORY_SECONDS
        self._out_of_date = {p: seen for p, seen in self._out_of_date.items() if seen[1] > horizon}
        if self._out_of_date:
            path, (why, _) = next(iter(self._out_of_date.items()))
            raise ConvexFunctionsOutOfDate(f"{path}: {why}")

    async def close(self) -> None:
        await self._http.aclose()
