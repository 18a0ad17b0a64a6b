"""Idempotency keys: a retry with the same key and body gets the first answer, run once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse, Response

from errors import GatewayError, IdempotencyKeyInUse
from models import IdempotencyClaim, now_ms
from store import Store

IDEMPOTENCY_TTL_MS = 24 * 3_600_000  # keys are kept a day, like Stripe's
# A request that has held its key this long has died (a crash, a kill): others may take over.
IN_FLIGHT_STALE_MS = 60_000
# A concurrent retry waits this long for the first request's answer before a 409.
IN_FLIGHT_WAIT_SECONDS = 3.0

Answer = tuple[int, dict[str, Any]]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[\x20-\x7e]{1,255}$",
        description="Up to 255 printable ASCII characters; a retry with the same key and body "
        "returns the first answer for 24 h.",
    ),
]


def request_fingerprint(operation: str, payload: Any) -> str:
    canonical = json.dumps([operation, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _claim(store: Store, user_id: str, key: str, fingerprint: str) -> IdempotencyClaim:
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while True:
        claim = await store.claim_idempotency_key(
            user_id, key, fingerprint, now_ms(), IDEMPOTENCY_TTL_MS, IN_FLIGHT_STALE_MS
        )
        if claim.outcome != "in_flight":
            return claim
        if time.monotonic() >= deadline:
            raise IdempotencyKeyInUse()
        await asyncio.sleep(0.1)


async def answer_once(
    store: Store,
    user_id: str,
    key: str,
    fingerprint: str,
    action: Callable[[str | None], Awaitable[Answer]],
) -> Response:
    """Run `action` once per key; later requests with the key get its stored answer."""
    claim = await _claim(store, user_id, key, fingerprint)
    if claim.outcome == "replay":
        body = json.loads(claim.body or "{}")
        headers = {"Idempotent-Replayed": "true"}
        return answer_response(claim.status_code or 200, body, headers)
    try:
        status, body = await action(claim.job_id)
    except BaseException:
        # Nothing was executed (or it cannot be told): let the client retry with the same key.
        with contextlib.suppress(GatewayError):
            await store.release_idempotency_key(user_id, key)
        raise
    await store.complete_idempotency_key(user_id, key, status, json.dumps(body))
    return answer_response(status, body)


def answer_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    """The answer as sent: a 204 has no body at all (RFC 9110 §15.3.5), so no JSON either."""
    if status == 204:
        return Response(status_code=204, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)
