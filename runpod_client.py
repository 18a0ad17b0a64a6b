"""The RunPod Serverless client, and the errors it raises.

Every failure is a `RunPodError`, and also one of the gateway's own errors, so the one handler in
`http_errors.py` renders it without knowing about RunPod:

* RunPodError
  + RunPodUnavailable      - 503: connect errors, timeouts, 5xx, or 429 after backing off.
                             Transient: the caller may try again later.
  + RunPodSubmitUncertain  - 503: `/run` was sent but no answer came back (read timeout, dropped
                             connection). The job MAY exist at RunPod and may run and bill: do not
                             submit again, and do not refund until RunPod's webhook or `/status`
                             says how it ended. Deliberately not a `RunPodUnavailable`, so code that
                             treats "unavailable" as "nothing happened" cannot catch it by mistake.
  + RunPodRejected         - 502: any other 4xx, or a 2xx whose body is not what RunPod sends.
                             Permanent: retrying will not help.
    + RunPodNotFound       - 502: `/status` or `/cancel` answered 404 (the job's ttl expired, or
                             RunPod purged it 30 min after it ended).

`/run` is not idempotent: `submit` retries only when the request surely never left this process
(connect errors, pool timeouts) or RunPod refused it with 429. `/status`, `/cancel` and `/health`
are safe to repeat and retry on any transient failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Self

import httpx

from errors import GatewayError, UpstreamError, UpstreamUnavailable
from outbound_http import default_ssl_context

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# RunPod ids are UUIDs with a short suffix, sometimes a prefix too: "4b21f0f4-...-e1",
# "sync-d050a3f6-791a-4aff-857a-66c759db4a06-u1" (RunPod's docs, runpod/docs
# docs/sdks/javascript/endpoints.md). Letters, digits, '-' and '_' cover them with room to
# spare; '/', '.', '%' and '?' can never reach a URL path.
RUNPOD_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
# A caller is waiting on `submit`: never sleep longer than this, whatever Retry-After says.
MAX_BACKOFF_SECONDS = 5.0
# `/status`, `/cancel` and `/health` are cheap and safe to repeat: a couple of tries is enough.
SAFE_ATTEMPTS = 3
# httpx's transport tries a connection that failed to open once more, at once. It retries only
# ConnectError and ConnectTimeout (httpcore `_async/connection.py`): the request was never sent,
# so this is safe even for `/run`, and no loop of ours repeats it.
CONNECT_RETRIES = 1
# Upstream text ends up in a user-facing error: keep it short.
MAX_DETAIL_CHARS = 200
MAX_ERROR_MESSAGE_CHARS = 1000

Sleep = Callable[[float], Awaitable[None]]


class RunPodError(GatewayError):
    """Base class of every error this module raises."""

    @classmethod
    def from_response(cls, response: httpx.Response) -> Self:
        """A refusal as RunPod answered it: the status, and RunPod's reason, shortened."""
        reason = _short_reason(response)
        detail = f"RunPod answered HTTP {response.status_code}"
        return cls(f"{detail}: {reason}" if reason else detail)


class RunPodUnavailable(RunPodError, UpstreamUnavailable):
    detail = "RunPod is unavailable"

    @classmethod
    def from_response(cls, response: httpx.Response) -> Self:
        """Transient: no reason to show, but when to try again (RunPod's Retry-After, else 5 s)."""
        retry_after = _retry_after_seconds(response)
        detail = f"RunPod answered HTTP {response.status_code}"
        return cls(detail, retry_after=math.ceil(retry_after) if retry_after else 5)


class RunPodSubmitUncertain(RunPodError, UpstreamUnavailable):
    detail = "RunPod did not confirm the job submission; the job may still run"


class RunPodRejected(RunPodError, UpstreamError):
    detail = "RunPod refused the request"


class RunPodNotFound(RunPodRejected):
    detail = "RunPod has no such job (its ttl expired or it was purged)"

    @classmethod
    def from_response(cls, response: httpx.Response) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class RunPodStatus:
    """One job as RunPod's `/status` (or its webhook) describes it."""

    id: str
    status: str
    output: Any
    error: str | None
    input: dict[str, Any] | None
    # `error` as RunPod sent it, before `error_message` made it readable: the worker contract
    # puts the echoed `jobId` there (jobs.py reads it as proof).
    raw_error: Any = field(default=None, compare=False, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_payload(cls, payload: object) -> RunPodStatus:
        if not isinstance(payload, dict):
            raise RunPodRejected("RunPod sent a status that is not a JSON object")
        job_id, status = payload.get("id"), payload.get("status")
        if not (isinstance(job_id, str) and job_id and isinstance(status, str) and status):
            raise RunPodRejected("RunPod sent a status without an id or a status")
        if not RUNPOD_ID_PATTERN.fullmatch(job_id):
            raise RunPodRejected("RunPod sent a job id of an unknown shape")
        job_input = payload.get("input")
        return cls(
            id=job_id,
            status=status,
            output=payload.get("output"),
            error=error_message(payload.get("error")),
            input=job_input if isinstance(job_input, dict) else None,
            raw_error=payload.get("error"),
        )


def error_message(error: object) -> str | None:
    """A failed job's `error` as one readable line, never with the worker's traceback."""
    if error is None or error == "":
        return None
    if isinstance(error, str):
        try:
            decoded = json.loads(error)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than json goes
            decoded = None
        # A handler that raised is reported as a JSON string; one that returned {"error": ...}
        # as plain text.
        error = decoded if isinstance(decoded, dict) else error
    if isinstance(error, dict):
        message = error.get("error_message") or error.get("message") or error.get("error_type")
        error = message if isinstance(message, str) and message else "The worker failed"
    text = _scalar_text(error, "The worker failed")
    return _without_lone_surrogates(text[:MAX_ERROR_MESSAGE_CHARS])


def _scalar_text(value: object, otherwise: str) -> str:
    """`value` as text when it is text or a number; a list or an object is not a message, and
    one nested deep enough (a parsed `[[[[...`) could not even be printed: RecursionError."""
    if isinstance(value, str | int | float):
        return str(value)
    return otherwise


# A lone UTF-16 surrogate (JSON's "\ud800") is not Unicode text: UTF-8, and so the store, cannot
# hold it. The worker's words are kept, with U+FFFD where such a character stood.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(text: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", text)


class RunPodClient:
    """Calls one RunPod endpoint through an `httpx.AsyncClient` the app owns."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        max_submit_attempts: int = 4,
        backoff_base: float = 0.5,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._http = http
        self._max_submit_attempts = max(1, max_submit_attempts)
        self._backoff_base = backoff_base
        self._sleep, self._jitter = sleep, jitter

    async def submit(
        self, job_input: dict[str, Any], webhook_url: str, *, execution_timeout_ms: int, ttl_ms: int
    ) -> str:
        """Start a job and return RunPod's id for it."""
        body = {
            "input": job_input,
            "webhook": webhook_url,
            "policy": {"executionTimeout": execution_timeout_ms, "ttl": ttl_ms},
        }
        for attempt in range(self._max_submit_attempts):
            response = await self._post_run(body)
            if response.status_code != 429 or attempt == self._max_submit_attempts - 1:
                return _submitted_id(response)
            await self._sleep(self._backoff(attempt, response))
        raise AssertionError("unreachable: the last attempt always returns or raises")

    async def status(self, runpod_id: str) -> RunPodStatus:
        response = await self._safe_request("GET", f"/status/{_checked_id(runpod_id)}")
        return RunPodStatus.from_payload(_json_body(response))

    async def cancel(self, runpod_id: str) -> None:
        await self._safe_request("POST", f"/cancel/{_checked_id(runpod_id)}")

    async def health(self, *, attempts: int = SAFE_ATTEMPTS) -> dict[str, Any]:
        """The endpoint's job and worker counts. A probe, retried by its caller, passes 1."""
        body = _json_body(await self._safe_request("GET", "/health", attempts))
        if not isinstance(body, dict):
            raise RunPodRejected("RunPod sent a health report that is not a JSON object")
        return body

    async def _post_run(self, body: dict[str, Any]) -> httpx.Response:
        """One `/run` request; its connection was already retried by the transport."""
        try:
            return await self._http.post("/run", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # No connection, or none free in the pool: RunPod never saw this request.
            raise RunPodUnavailable("Could not connect to RunPod") from exc
        except httpx.RequestError as exc:
            # The request may have reached RunPod: sending it again could start a second job.
            raise RunPodSubmitUncertain() from exc

    async def _safe_request(
        self, method: str, path: str, attempts: int = SAFE_ATTEMPTS
    ) -> httpx.Response:
        """A request that may be repeated: retried on transient failures, then checked."""
        for attempt in range(max(1, attempts)):
            last = attempt == max(1, attempts) - 1
            try:
                response = await self._http.request(method, path)
            except httpx.RequestError as exc:
                if last:
                    raise RunPodUnavailable("Could not reach RunPod") from exc
                await self._sleep(self._backoff(attempt))
                continue
            if not _is_transient(response) or last:
                return _checked(response)
            await self._sleep(self._backoff(attempt, response))
        raise AssertionError("unreachable: the last attempt always returns or raises")

    def _backoff(self, attempt: int, response: httpx.Response | None = None) -> float:
        """RunPod's Retry-After when it sent one, else a full-jitter exponential backoff, so
        that instances refused together do not all come back together."""
        retry_after = _retry_after_seconds(response) if response is not None else None
        if retry_after is not None:
            return min(retry_after, MAX_BACKOFF_SECONDS)
        return self._jitter(0, min(self._backoff_base * 2**attempt, MAX_BACKOFF_SECONDS))


def build_http_client(
    api_base: str,
    endpoint_id: str,
    api_key: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The one HTTP client the app keeps for RunPod; the caller closes it."""
    if not RUNPOD_ID_PATTERN.fullmatch(endpoint_id):
        raise ValueError("RUNPOD_ENDPOINT_ID must be letters, digits, '-' or '_'")
    return httpx.AsyncClient(
        base_url=f"{api_base.rstrip('/')}/{endpoint_id}",
        headers={"Authorization": f"Bearer {api_key}"},
        # RunPod answers these calls in well under a second; 10 s means it is in trouble.
        timeout=httpx.Timeout(10.0, connect=3.0),
        transport=transport
        or httpx.AsyncHTTPTransport(retries=CONNECT_RETRIES, verify=default_ssl_context()),
    )


def _checked_id(runpod_id: str) -> str:
    if not isinstance(runpod_id, str) or not RUNPOD_ID_PATTERN.fullmatch(runpod_id):
        raise RunPodRejected("Not a valid RunPod job id")
    return runpod_id


def _is_transient(response: httpx.Response) -> bool:
    return response.status_code == 429 or response.status_code >= 500


def _checked(response: httpx.Response) -> httpx.Response:
    """The response itself when it succeeded, else the error it stands for."""
    if response.is_success:
        return response
    if _is_transient(response):
        raise RunPodUnavailable.from_response(response)
    if response.status_code == 404:
        raise RunPodNotFound.from_response(response)
    raise RunPodRejected.from_response(response)


def _submitted_id(response: httpx.Response) -> str:
    body = _json_body(_checked(response))
    runpod_id = body.get("id") if isinstance(body, dict) else None
    if not isinstance(runpod_id, str) or not runpod_id:
        raise RunPodRejected("RunPod accepted the job but sent no id for it")
    return runpod_id


def _json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can follow
        raise RunPodRejected("RunPod sent a body that is not JSON") from None


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _short_reason(response: httpx.Response) -> str:
    """RunPod's own words for a refusal, short, on one line, and without our API key."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        body = response.text
    if isinstance(body, dict):
        body = body.get("error") or body.get("message") or body.get("detail") or ""
    text = _without_lone_surrogates(" ".join(_scalar_text(body, "").split()))
    api_key = _api_key_of(response)
    if api_key:
        text = text.replace(api_key, "[redacted]")
    return text[:MAX_DETAIL_CHARS]


def _api_key_of(response: httpx.Response) -> str | None:
    try:
        authorization = response.request.headers.get("Authorization", "")
    except RuntimeError:  # a Response built by hand has no request
        return None
    return authorization.removeprefix("Bearer ").strip() or None
