"""The production store: Convex, called over its HTTP API with the deploy key.

Each `Store` method is one Convex function in `convex/gateway.ts` (`get_or_create_user` reads
first and creates only when the read finds nobody); every rule about money or limits is one
mutation, so Convex's serializable transactions keep many gateway instances honest.

Why HTTP and not the `convex` package's `ConvexClient`: that client wraps a Rust WebSocket client
whose calls block the calling thread (holding the GIL) and retry forever on network errors. On
an event loop that would stall every request; in a thread pool it would pin threads with no
deadline. The HTTP API gives us the shared `httpx.AsyncClient`, explicit timeouts, and a clear
rule for what is safe to retry. Values are still encoded with the package's own codec.

Errors:
    ConvexError codes in `errorData`  -> the gateway's own errors (402, 429, 404, 409, 400).
    A timeout, 5xx or connect failure -> 503 UPSTREAM_UNAVAILABLE.
    Any other refusal (bad key, unknown function, a function's own bug) -> 502 UPSTREAM_ERROR.
Queries are retried on transient failures; mutations only when the request surely never left.
"""

from __future__ import annotations

import asyncio
import json
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
    NotFound,
    TooManyActiveJobs,
    UpstreamError,
    UpstreamUnavailable,
)
from models import IdempotencyClaim, Job, JobPage, JobStatus, NewJob, StatusUpdate, User

FUNCTION_ERROR_STATUS = 560  # Convex's status for "your function threw"
QUERY_ATTEMPTS = 3
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class ConvexConflict(GatewayError):
    status_code = 409
    code = "CONFLICT"
    detail = "The record already exists"


_BUSINESS_ERRORS: dict[str, type[GatewayError]] = {
    "INSUFFICIENT_CREDITS": InsufficientCredits,
    "TOO_MANY_ACTIVE_JOBS": TooManyActiveJobs,
    "NOT_FOUND": NotFound,
    "JOB_NOT_CANCELABLE": JobNotCancelable,
    "INVALID_CURSOR": InvalidCursor,
    "INVALID_REQUEST": InvalidRequest,
    "CONFLICT": ConvexConflict,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
}


def error_from_response(response: httpx.Response) -> GatewayError:
    """The gateway error a non-success Convex answer stands for."""
    body = _json(response)
    if response.status_code == FUNCTION_ERROR_STATUS:
        data = body.get("errorData")
        code = data.get("code") if isinstance(data, dict) else None
        # isinstance first: a list is unhashable, and `in` a dict would raise TypeError.
        if isinstance(code, str) and code in _BUSINESS_ERRORS:
            message = data.get("message")
            return _BUSINESS_ERRORS[code](message if isinstance(message, str) else None)
        return UpstreamError("The store rejected the call")
    if response.status_code >= 500 or response.status_code == 429:
        return UpstreamUnavailable("The store is unavailable")
    return UpstreamError(f"The store refused the call (HTTP {response.status_code})")


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return {}
    return body if isinstance(body, dict) else {}


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


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


class ConvexStore:
    def __init__(self, http: httpx.AsyncClient, signup_credits: int, default_plan: str) -> None:
        self._http = http
        self._new_user = {"signupCredits": signup_credits, "plan": default_plan}

    @classmethod
    def from_settings(cls, settings: Settings) -> ConvexStore:
        assert settings.convex_url and settings.convex_deploy_key
        http = httpx.AsyncClient(
            base_url=settings.convex_url.rstrip("/"),
            headers={"Authorization": f"Convex {settings.convex_deploy_key}"},
            # A mutation's user code may run 1 s; the rest is queueing and the network.
            timeout=httpx.Timeout(10.0, connect=3.0),
        )
        return cls(http, settings.effective_signup_credits, settings.default_plan)

    # --- transport --------------------------------------------------------------------------

    async def _call(self, kind: str, path: str, args: dict[str, Any]) -> Any:
        body = {"path": path, "args": convex_to_json(args), "format": "json"}
        attempts = QUERY_ATTEMPTS if kind == "query" else 1
        for attempt in range(1, attempts + 1):
            try:
                response = await self._post(kind, body)
            except UpstreamUnavailable:
                if attempt == attempts:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            if response.status_code == 200:
                return self._value(response)
            error = error_from_response(response)
            if attempt == attempts or not isinstance(error, UpstreamUnavailable):
                raise error
            await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, kind: str, body: dict[str, Any]) -> httpx.Response:
        # A mutation whose request may have reached Convex is never repeated: it may have
        # committed. Only a connection that never opened is safe to try again.
        for attempt in range(2):
            try:
                return await self._http.post(f"/api/{kind}", json=body)
            except _NEVER_SENT as exc:
                if attempt == 1:
                    raise UpstreamUnavailable("The store could not be reached") from exc
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable("The store did not answer in time") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _value(response: httpx.Response) -> Any:
        unknown = UpstreamError("The store answered in an unknown shape")
        try:
            # Convex numbers are float64; the codec wants them as floats, as Convex's own
            # clients parse them, and refuses Python ints.
            body = json.loads(response.content, parse_int=float)
            if not isinstance(body, dict) or body.get("status") != "success":
                raise unknown
            return json_to_convex(body.get("value"))
        # RecursionError: nested deeper than the parser or the (recursive) codec can follow.
        except (ValueError, TypeError, RecursionError):
            raise unknown from None

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
        )
        return _job(value["job"]), bool(value["changed"])

    async def cancel_job(self, user_id: str, job_id: str) -> Job:
        return _job(await self._mutation("cancelJob", userId=user_id, jobId=job_id))

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

    async def save_download_url(self, job_id: str, url: str, expires_at: int) -> None:
        await self._mutation("saveDownloadUrl", jobId=job_id, url=url, expiresAt=expires_at)

    async def ledger_totals(self) -> dict[str, dict[str, int]]:
        rows = await self._query("ledgerTotals")
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
        return list(await self._query("audit"))

    async def ping(self) -> None:
        await self._query("ping")

    async def close(self) -> None:
        await self._http.aclose()
