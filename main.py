"""The CineWeave API gateway: the FastAPI app, its lifespan, and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

import httpx
from fastapi import Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth import ClerkAuth, dev_jwks, ensure_dev_key
from config import AccessLog, Settings, get_settings, revealed, settings_or_exit
from errors import (
    AuthUnavailable,
    GatewayError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidCursor,
    InvalidRequest,
    InvalidSignature,
    JobNotCancelable,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    TooManyActiveJobs,
    Unauthorized,
    UpstreamError,
    UpstreamUnavailable,
)
from jobs import JobService, Reconciler, crash_point, signature_is_valid, token_is_valid
from local_storage import LocalStorage, storage_router
from models import (
    CREATE_JOB_EXAMPLES,
    JOB_ID_PATTERN,
    WEBHOOK_ANSWER_EXAMPLE,
    WEBHOOK_EXAMPLES,
    CreateJobRequest,
    CreateJobResponse,
    CreditsResponse,
    ErrorResponse,
    IdempotencyClaim,
    Job,
    JobListResponse,
    JobResponse,
    create_job_request_model,
    json_dump,
    now_ms,
)
from r2_client import ObjectStorage, PendingS3Client, R2Storage
from readiness import Readiness, failed_parts
from runpod_client import (
    CONNECT_RETRIES,
    RUNPOD_ID_PATTERN,
    RunPodClient,
    RunPodError,
    RunPodStatus,
    build_http_client,
)
from store import SQLiteStore, Store
from telemetry import (
    InstrumentedStorage,
    InstrumentedStore,
    InstrumentedTransport,
    Metrics,
    RequestTelemetryMiddleware,
    configure_logging,
    current_request_id,
    metrics_route,
)

log = logging.getLogger("gateway")

MAX_BODY_BYTES = 64 * 1024
MAX_WEBHOOK_BODY_BYTES = 1024 * 1024
# A worker's upload to the local storage stand-in: a 10 s 320x180 clip is well under 5 MiB.
MAX_LOCAL_UPLOAD_BYTES = 512 * 1024 * 1024
_JOB_ID = JOB_ID_PATTERN  # what `new_job_id` makes: one definition, in models.py
# Clerk user ids are `user_<base62>`; the id becomes part of an object key, so allow no more.
_USER_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


# --- Services and the lifespan ----------------------------------------------------------------


class State(TypedDict):
    store: Store
    storage: ObjectStorage
    auth: ClerkAuth
    jobs: JobService
    settings: Settings
    readiness: Readiness


@dataclass
class Backends:
    """Which backends are real and which are the embedded stand-ins, for the start-up log."""

    store: str
    auth: str
    runpod: str
    storage: str

    def __str__(self) -> str:
        parts = ("store", self.store), ("storage", self.storage), ("RunPod", self.runpod)
        return "; ".join(f"{name}: {value}" for name, value in (*parts, ("auth", self.auth)))


def _local_secret(data_dir: Path, name: str) -> str:
    """A random secret kept in the data dir, so local restarts keep URLs and tokens valid."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _public_base_url(settings: Settings) -> str:
    return (settings.public_base_url or "http://127.0.0.1:8000").rstrip("/")


def build_store(settings: Settings) -> tuple[Store, str]:
    if settings.uses_convex:
        from convex_client import ConvexStore

        return ConvexStore.from_settings(settings), f"Convex at {settings.convex_url}"
    path = settings.local_data_dir / "gateway.db"
    store = SQLiteStore(path, settings.effective_signup_credits, settings.default_plan)
    return store, f"SQLite at {path}"


def build_storage(settings: Settings, secret: str) -> tuple[ObjectStorage, str]:
    if settings.uses_real_r2:
        endpoint = settings.r2_endpoint
        assert endpoint and settings.r2_access_key_id and settings.r2_secret_access_key
        assert settings.r2_bucket
        key_id, key = settings.r2_access_key_id, settings.r2_secret_access_key
        client = PendingS3Client(endpoint, key_id.get_secret_value(), key.get_secret_value())
        return R2Storage(client, settings.r2_bucket), f"R2 at {endpoint}"
    root = settings.local_data_dir / "objects"
    storage = LocalStorage(root, secret.encode(), _public_base_url(settings))
    return storage, f"local files in {root}"


def build_runpod_http(
    settings: Settings, stack: AsyncExitStack, metrics: Metrics
) -> tuple[httpx.AsyncClient, str]:
    if settings.uses_real_runpod:
        assert settings.runpod_endpoint_id and settings.runpod_api_key
        http = build_http_client(
            settings.runpod_api_base,
            settings.runpod_endpoint_id,
            settings.runpod_api_key.get_secret_value(),
            transport=InstrumentedTransport(
                httpx.AsyncHTTPTransport(retries=CONNECT_RETRIES), metrics
            ),
        )
        return http, f"endpoint {settings.runpod_endpoint_id} at {settings.runpod_api_base}"
    # The stand-in runs in this process and is reached through httpx's ASGI transport, so
    # runpod_client.py speaks real RunPod HTTP to it; its uploads and webhooks use real sockets.
    from local_runpod import create_local_runpod_app

    standin = create_local_runpod_app(render_seconds=settings.local_render_seconds)
    stack.push_async_callback(standin.state.runner.aclose)
    transport = InstrumentedTransport(httpx.ASGITransport(app=standin), metrics)
    http = build_http_client("http://local-runpod/v2", "local", "local", transport=transport)
    return http, "local stand-in"


async def _build_state(settings: Settings, stack: AsyncExitStack, metrics: Metrics) -> State:
    data_dir = settings.local_data_dir
    secret = revealed(settings.runpod_webhook_secret) or _local_secret(data_dir, "webhook_secret")
    bare_store, store_name = build_store(settings)
    store = InstrumentedStore(bare_store, metrics)
    stack.push_async_callback(store.close)
    storage, storage_name = build_storage(settings, secret)
    stack.push_async_callback(storage.close)
    runpod_http, runpod_name = build_runpod_http(settings, stack, metrics)
    stack.push_async_callback(runpod_http.aclose)
    auth_http = await stack.enter_async_context(
        httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))
    )
    auth, auth_name = _build_auth(settings, auth_http)
    await auth.load_keys()
    jobs = JobService(
        settings=settings,
        store=store,
        runpod=RunPodClient(runpod_http),
        # The state keeps the bare storage: local_storage.py's routes check its type.
        storage=InstrumentedStorage(storage, metrics),
        webhook_secret=secret,
        public_base_url=_public_base_url(settings),
    )
    backends = Backends(store_name, auth_name, runpod_name, storage_name)
    log.info("gateway starting in %s mode: %s", settings.gateway_env.value, backends)
    readiness = Readiness(store, auth, jobs.runpod)
    return State(
        store=store, storage=storage, auth=auth, jobs=jobs, settings=settings, readiness=readiness
    )


def _build_auth(settings: Settings, http: httpx.AsyncClient) -> tuple[ClerkAuth, str]:
    if settings.uses_real_clerk:
        source = "a PEM key" if settings.clerk_jwt_key else f"keys from {settings.jwks_url}"
        return ClerkAuth(settings, http), f"Clerk, {source}"
    _, public_pem = ensure_dev_key(settings.local_data_dir)
    return ClerkAuth(settings, http, public_key_pem=public_pem), "dev issuer"


def make_lifespan(settings: Settings) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with AsyncExitStack() as stack:
            metrics: Metrics = app.state.metrics
            state = await _build_state(settings, stack, metrics)
            if settings.reconciler_enabled:
                reconciler = Reconciler(state["jobs"], on_action=metrics.count_reconciler_action)
                task = asyncio.create_task(reconciler.run_forever())
                stack.callback(task.cancel)
            yield state
        # uvicorn runs this after the requests in flight finished (or its graceful timeout).
        log.info("shutdown complete: requests drained, clients closed")

    return lifespan


# --- Dependencies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified user and the services their routes use.

    One dependency per route rather than one per service: FastAPI solves each dependency
    separately on every request (a sub-solve that also parses the query, headers and cookies),
    about 20 µs each on our machines.
    """

    user_id: str
    store: Store
    jobs: JobService


# `async def`: FastAPI runs a plain `def` dependency in a worker thread, ~100 µs each.
async def current_user(request: Request) -> Caller:
    state = request.state
    principal = await state.auth.authenticate(request)
    if not _USER_ID.fullmatch(principal.user_id):
        raise Unauthorized("The token's subject is not a valid user id")
    return Caller(principal.user_id, state.store, state.jobs)


CurrentUser = Annotated[Caller, Depends(current_user)]


# --- Errors -----------------------------------------------------------------------------------


def error_body(code: str, detail: str, errors: list[dict[str, str]] | None = None) -> dict:
    body: dict[str, Any] = {"detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    return body


async def render_gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    errors = getattr(exc, "errors", None)
    return JSONResponse(
        error_body(exc.code, exc.detail, errors), status_code=exc.status_code, headers=exc.headers
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


# What each kind of pydantic error means, in words for the person who sent the request.
_FIELD_MESSAGES = {
    "missing": "{field} is required",
    "extra_forbidden": "{field} is not a field of this request",
    "string_type": "{field} must be a string",
    "int_type": "{field} must be a whole number",
    "int_parsing": "{field} must be a whole number",
    "int_from_float": "{field} must be a whole number",
    "bool_type": "{field} must be true or false",
    "bool_parsing": "{field} must be true or false",
    "model_type": "{field} must be a JSON object",
    "model_attributes_type": "{field} must be a JSON object",
    "dict_type": "{field} must be a JSON object",
    "greater_than_equal": "{field} must be at least {ge}",
    "less_than_equal": "{field} must be at most {le}",
    "string_too_short": "{field} must be at least {min_length} characters",
    "string_too_long": "{field} must be at most {max_length} characters",
}
# Headers whose pattern a person cannot read: say what the pattern means.
_PATTERN_MESSAGES = {
    "Idempotency-Key": "Idempotency-Key must be 1 to 255 printable ASCII characters",
}


def field_error(error: Mapping[str, Any], body: Any) -> dict[str, str]:
    """One pydantic error as `{"field", "message"}`, the message naming the field."""
    loc = tuple(error.get("loc", ()))
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind == "json_invalid":
        return {"field": "body", "message": _json_syntax_message(body, loc, ctx)}
    field = _field_name(loc)
    if kind == "value_error":  # our own validators: their words follow the field's name
        return {"field": field, "message": f"{field} {ctx.get('error', 'is not valid')}"}
    if kind == "string_pattern_mismatch" and field in _PATTERN_MESSAGES:
        return {"field": field, "message": _PATTERN_MESSAGES[field]}
    template = _FIELD_MESSAGES.get(kind)
    if template is None:
        return {"field": field, "message": f"{field}: {error.get('msg', 'is not valid')}"}
    return {"field": field, "message": template.format(field=field, **ctx)}


def _json_syntax_message(body: Any, loc: tuple[Any, ...], ctx: Mapping[str, Any]) -> str:
    """Where the JSON broke, as an editor counts: line and column, from 1."""
    position = loc[-1] if loc and isinstance(loc[-1], int) else 0
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    reason = str(ctx.get("error", "invalid JSON"))
    return (
        f"body is not valid JSON (line {line}, column {column}): {reason[:1].lower()}{reason[1:]}"
    )


async def render_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [field_error(err, exc.body) for err in exc.errors()]
    return JSONResponse(invalid_request_body(errors), status_code=400)


def invalid_request_body(errors: list[dict[str, str]]) -> dict[str, Any]:
    """A 400 whose `detail` alone says what to fix, for clients that show only `detail`."""
    detail = "Invalid request: " + "; ".join(error["message"] for error in errors)
    return error_body(InvalidRequest.code, detail, errors)


_FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


async def render_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        # RFC 9110: a 405 names the methods the resource does support.
        allow = (exc.headers or {}).get("Allow")
        if allow and "GET" in allow.split(", "):
            allow += ", HEAD"  # HeadAsGetMiddleware answers HEAD wherever GET is allowed
        return await render_gateway_error(request, MethodNotAllowed(headers_allow=allow))
    if exc.status_code == 404:
        return await render_gateway_error(request, NotFound("No such route"))
    if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_PARSE_ERROR:
        # FastAPI says this when the body is not UTF-8, before any JSON parsing.
        errors = [{"field": "body", "message": "body must be JSON in UTF-8"}]
        return JSONResponse(invalid_request_body(errors), status_code=400)
    if exc.status_code == 400:
        return await render_gateway_error(request, InvalidRequest(str(exc.detail)))
    code = "HTTP_ERROR"
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)


async def render_internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = error_body("INTERNAL_ERROR", "Internal server error")
    # This handler runs outside the telemetry middleware, so it adds the request id itself.
    request_id = current_request_id()
    headers = {"X-Request-ID": request_id} if request_id else None
    return JSONResponse(body, status_code=500, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, render_gateway_error)
    app.add_exception_handler(RequestValidationError, render_validation_error)
    app.add_exception_handler(StarletteHTTPException, render_http_error)
    app.add_exception_handler(Exception, render_internal_error)


def readiness_response(checks: dict[str, str]) -> JSONResponse:
    failed = failed_parts(checks)
    if not failed:
        return JSONResponse({"status": "ready", "checks": checks})
    detail = "Not ready: " + "; ".join(f"{name}: {why}" for name, why in failed.items())
    return JSONResponse({**error_body("NOT_READY", detail), "checks": checks}, status_code=503)


# The field errors in the docs' example of a 400, as a client would see them.
_EXAMPLE_FIELD_ERRORS = [{"field": "durationSec", "message": "durationSec must be from 1 to 10"}]


def error_example(error: type[GatewayError]) -> dict[str, Any]:
    """An OpenAPI example of `error`'s body, exactly as the gateway writes it."""
    if error is InvalidRequest:
        return {"summary": error.detail, "value": invalid_request_body(_EXAMPLE_FIELD_ERRORS)}
    return {"summary": error.detail, "value": error_body(error.code, error.detail)}


def error_responses(*errors: type[GatewayError]) -> dict[int | str, dict[str, Any]]:
    """The statuses a route answers with these errors: the error schema, an example per code.

    Built from the error classes the code raises, so the docs name the real codes.
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        content = {"application/json": {"examples": {}}}
        response = responses.setdefault(
            error.status_code, {"model": ErrorResponse, "content": content}
        )
        response["content"]["application/json"]["examples"][error.code] = error_example(error)
    for response in responses.values():
        codes = response["content"]["application/json"]["examples"]
        response["description"] = "\n".join(
            f"- `{code}`: {ex['summary']}" for code, ex in codes.items()
        )
    return responses


# Every user route checks the session token (401), with keys that may be unavailable (503).
AUTH_ERRORS = (Unauthorized, AuthUnavailable)
# Any route that touches the store: SQLite's 503, or Convex's 502 and 503. RunPod's failures
# are these same two upstream classes.
STORE_ERRORS = (StoreUnavailable, UpstreamError, UpstreamUnavailable)


# --- Body limits ------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Refuses bodies over the route's limit (413) before they are read into memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def limit_for(path: str) -> int:
        if path == "/webhooks/runpod":
            return MAX_WEBHOOK_BODY_BYTES
        if path.startswith("/_local/storage/"):
            return MAX_LOCAL_UPLOAD_BYTES
        return MAX_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_too_large(send, limit)
            return
        guard = _BodyGuard(receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.overflowed:
                raise
        if guard.overflowed:
            await _send_too_large(send, limit)


class _BodyGuard:
    """Counts a streamed body; past the limit it ends the body and silences the app's answer.

    Raising from `receive` would not do: the framework turns any error while parsing a body into
    its own 400, so the 413 is sent from here once the app has given up.
    """

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self._limit = receive, send, limit
        self._received = 0
        self.overflowed = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                self.overflowed = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if not self.overflowed:
            await self._send(message)


async def _send_too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body("PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- HEAD -------------------------------------------------------------------------------------


class HeadAsGetMiddleware:
    """HEAD answers as GET would, headers and all, without the body (RFC 9110 §9.3.2).

    FastAPI's routes answer only the methods they name, and naming HEAD on each would list a
    HEAD operation per route in the OpenAPI schema. Routes that have no GET still refuse it
    (405, with their `Allow`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                # Content-Length stays as GET's: it says what a GET would send (§8.6).
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


# --- Routes -----------------------------------------------------------------------------------


def checked_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise NotFound("Job not found")
    return job_id


def create_job_body(settings: Settings) -> Any:
    """The create body's annotation: the model with this app's limits, and the docs' examples
    (on the parameter, where Swagger UI offers them in a drop-down).

    The limits are checked in the same validation pass as every other rule, so one answer
    names every bad field (a check in the route would run only once the rest passed).
    """
    model = create_job_request_model(
        settings.min_duration_sec, settings.max_duration_sec, settings.image_url_allowed_hosts
    )
    return Annotated[model, Body(openapi_examples=CREATE_JOB_EXAMPLES)]


def register_routes(app: FastAPI, settings: Settings) -> None:
    async def create_job(
        body: CreateJobRequest,
        user: CurrentUser,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Any:
        """Charge `durationSec × CREDITS_PER_SECOND` credits and submit the job to RunPod.

        With an `Idempotency-Key`, a retry of the same request returns the first answer
        (the same `jobId`) and is never charged or submitted twice.
        """
        jobs, key = user.jobs, idempotency_key
        if key is None:
            job = await jobs.create(user.user_id, body)
            return CreateJobResponse(job_id=job.job_id)

        async def create_once(existing_job_id: str | None) -> Answer:
            if existing_job_id:  # a crashed attempt had already charged: that is the answer
                return 200, {"jobId": existing_job_id}
            try:
                job = await jobs.create(user.user_id, body, key)
            except RunPodError as exc:  # charged, then refunded: the request did execute
                return exc.status_code, error_body(exc.code, exc.detail)
            return 200, {"jobId": job.job_id}

        fingerprint = request_fingerprint("create", body.model_dump(mode="json"))
        return await answer_once(jobs.store, user.user_id, key, fingerprint, create_once)

    # FastAPI validates the body against this annotation, which depends on the settings.
    create_job.__annotations__["body"] = create_job_body(settings)
    app.post(
        "/jobs/create",
        response_model=CreateJobResponse,
        summary="Create a video job",
        responses=error_responses(
            InvalidRequest,
            *AUTH_ERRORS,
            InsufficientCredits,
            IdempotencyKeyReused,
            IdempotencyKeyInUse,
            PayloadTooLarge,
            TooManyActiveJobs,
            *STORE_ERRORS,
        ),
    )(create_job)

    @app.get(
        "/jobs",
        response_model=JobListResponse,
        summary="List your jobs",
        responses=error_responses(InvalidRequest, InvalidCursor, *AUTH_ERRORS, *STORE_ERRORS),
    )
    async def list_jobs(
        user: CurrentUser,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
    ) -> JobListResponse:
        """The caller's jobs, newest first; pass `nextCursor` back as `cursor` for more."""
        page = await user.store.list_jobs(user.user_id, limit, cursor)
        with_url = user.jobs.with_download_url
        listed = [JobResponse.from_job(await with_url(job)) for job in page.jobs]
        return JobListResponse(jobs=listed, next_cursor=page.next_cursor)

    @app.get(
        "/jobs/{job_id}",
        response_model=JobResponse,
        summary="Get a job",
        responses=error_responses(*AUTH_ERRORS, NotFound, *STORE_ERRORS),
    )
    async def get_job(job_id: str, user: CurrentUser) -> JobResponse:
        """The job's status; a done job carries a presigned download URL and its expiry."""
        job = await user.store.get_job(user.user_id, checked_job_id(job_id))
        job = await user.jobs.check_if_stale(job)
        return JobResponse.from_job(await user.jobs.with_download_url(job))

    @app.post(
        "/jobs/{job_id}/cancel",
        response_model=JobResponse,
        summary="Cancel a job",
        responses=error_responses(
            InvalidRequest,
            *AUTH_ERRORS,
            NotFound,
            JobNotCancelable,
            IdempotencyKeyReused,
            IdempotencyKeyInUse,
            *STORE_ERRORS,
        ),
    )
    async def cancel_job(
        job_id: str,
        user: CurrentUser,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Any:
        """Cancel a queued or running job at RunPod and refund its credits."""
        job_id = checked_job_id(job_id)
        jobs, key = user.jobs, idempotency_key
        if key is None:
            return JobResponse.from_job(await jobs.cancel(user.user_id, job_id))

        async def cancel_once(_: str | None) -> Answer:
            try:
                job = await jobs.cancel(user.user_id, job_id)
            except (JobNotCancelable, NotFound) as exc:  # final answers, worth replaying
                return exc.status_code, error_body(exc.code, exc.detail)
            return 200, json_dump(JobResponse.from_job(job))

        fingerprint = request_fingerprint("cancel", job_id)
        return await answer_once(jobs.store, user.user_id, key, fingerprint, cancel_once)

    @app.get(
        "/credits",
        response_model=CreditsResponse,
        summary="Your credits",
        responses=error_responses(*AUTH_ERRORS, *STORE_ERRORS),
    )
    async def get_credits(user: CurrentUser) -> CreditsResponse:
        """The caller's credit balance and plan."""
        account = await user.store.get_or_create_user(user.user_id)
        return CreditsResponse(credits=account.credits, plan=account.plan)

    @app.post(
        "/webhooks/runpod",
        summary="RunPod completion webhook",
        responses={
            200: {"content": {"application/json": {"example": WEBHOOK_ANSWER_EXAMPLE}}},
            **error_responses(
                InvalidRequest, InvalidSignature, NotFound, PayloadTooLarge, *STORE_ERRORS
            ),
        },
        # The route reads the raw body (its signature covers the bytes), so FastAPI cannot
        # describe it: the docs show RunPod's payload here instead.
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {"schema": {"type": "object"}, "examples": WEBHOOK_EXAMPLES}
                },
            }
        },
    )
    async def runpod_webhook(request: Request) -> dict[str, str]:
        """RunPod's job-finished call. Proof: `X-RunPod-Signature`, or the per-job URL token."""
        # The service straight from the state, not a dependency: see `Caller`.
        job = await receive_webhook(request, request.state.jobs)
        return {"jobId": job.job_id, "status": job.status.public.value}

    @app.get("/healthz", summary="Liveness", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Answers while the process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """200 when the store, the Clerk keys and RunPod answer; else 503 naming what failed."""
        return readiness_response(await request.state.readiness.check())

    if not settings.uses_real_clerk:

        @app.get("/.well-known/jwks.json", include_in_schema=False)
        async def local_jwks() -> dict[str, Any]:
            """The local dev issuer's public keys."""
            return dev_jwks(settings.local_data_dir)


# --- Idempotency keys -------------------------------------------------------------------------

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
) -> JSONResponse:
    """Run `action` once per key; later requests with the key get its stored answer."""
    claim = await _claim(store, user_id, key, fingerprint)
    if claim.outcome == "replay":
        body = json.loads(claim.body or "{}")
        headers = {"Idempotent-Replayed": "true"}
        return JSONResponse(body, status_code=claim.status_code or 200, headers=headers)
    try:
        status, body = await action(claim.job_id)
    except BaseException:
        # Nothing was executed (or it cannot be told): let the client retry with the same key.
        with contextlib.suppress(GatewayError):
            await store.release_idempotency_key(user_id, key)
        raise
    await store.complete_idempotency_key(user_id, key, status, json.dumps(body))
    return JSONResponse(body, status_code=status)


# --- The webhook ------------------------------------------------------------------------------


def _parse_json(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    # RecursionError: a body nested deeper than the parser goes (`[[[[...`, 10,000 deep).
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


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
        exc.errors = errors  # type: ignore[attr-defined]
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


async def receive_webhook(request: Request, jobs: JobService) -> Job:
    metrics: Metrics = request.app.state.metrics
    body = await request.body()
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


# --- API docs ---------------------------------------------------------------------------------

DOCS_ASSETS_URL = "/docs-assets"
# Swagger UI would send the schema's URL to validator.swagger.io for a badge: null turns it off.
SWAGGER_UI_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
# The browser may load nothing from another host. ReDoc always fetches its logo from a CDN;
# this makes the browser refuse that (it then hides the logo), and whatever a newer bundle
# might add. Swagger UI's start-up is an inline script; both pages inline styles, and
# ReDoc's search runs in a worker made from a blob.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'"
)


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, from files the gateway serves itself.

    FastAPI's own pages load them from a CDN, which fails behind a strict firewall; the
    fastapi-offline package ships the same bundles, so nothing is fetched from another host.
    """
    assets = StaticFiles(packages=[("fastapi_offline", "static")])
    app.mount(DOCS_ASSETS_URL, assets, name="docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(
            get_swagger_ui_html(
                openapi_url=f"{root}{app.openapi_url}",
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
                swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
            )
        )

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(
            get_redoc_html(
                openapi_url=f"{root}{app.openapi_url}",
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )

    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)


# --- The app ----------------------------------------------------------------------------------


_ERROR_RESPONSE = {
    "description": "Invalid request",
    "content": {
        "application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorResponse"},
            "examples": {"INVALID_REQUEST": error_example(InvalidRequest)},
        }
    },
}


# The models whose examples /docs shows as request and answer bodies.
EXAMPLE_MODELS = (
    CreateJobRequest,
    CreateJobResponse,
    JobResponse,
    JobListResponse,
    CreditsResponse,
    ErrorResponse,
)


def restore_examples(components: dict[str, Any]) -> None:
    """Put the models' examples back whole: get_openapi drops every null, even inside them."""
    for model in EXAMPLE_MODELS:
        components[model.__name__]["examples"] = model.model_json_schema()["examples"]


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """The schema as the gateway really answers: 400 not 422, and the configured limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and _validates_input(operation):
                    responses.setdefault("400", _ERROR_RESPONSE)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        duration = components["CreateJobRequest"]["properties"]["durationSec"]
        duration.update(minimum=settings.min_duration_sec, maximum=settings.max_duration_sec)
        restore_examples(components)
        declare_security(schema, app)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _validates_input(operation: dict[str, Any]) -> bool:
    """Whether FastAPI can refuse this operation's input (a body, a query or a header).

    FastAPI lists a 422 wherever there are parameters, but a path id is any string: an unknown
    or malformed one is a 404, never a 400.
    """
    parameters = operation.get("parameters", [])
    return "requestBody" in operation or any(p["in"] != "path" for p in parameters)


# How `current_user` reads a session, for the docs: Swagger UI then offers "Authorize", and
# clients generated from the schema send the token. Declared here rather than as a FastAPI
# security dependency, which would add a dependency solve to every request.
SECURITY_SCHEMES = {
    "clerkBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A Clerk session token: `Authorization: Bearer <token>`.",
    },
    "clerkSessionCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "__session",
        "description": "Clerk's session cookie, for same-site browser calls.",
    },
}


def declare_security(schema: dict[str, Any], app: FastAPI) -> None:
    """Mark each operation that depends on `current_user` as needing a session (either form)."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        if not any(dep.call is current_user for dep in route.dependant.dependencies):
            continue
        for method in route.methods:
            operation = schema["paths"][route.path_format][method.lower()]
            operation["security"] = [{"clerkBearer": []}, {"clerkSessionCookie": []}]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="CineWeave API gateway",
        version="1.0.0",
        description="Turns prompts into videos on RunPod, paid for with credits.",
        lifespan=make_lifespan(settings),
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN: install_docs serves them.
        docs_url=None,
        redoc_url=None,
    )
    # Made here, not in the lifespan: the middleware needs it when the app is built.
    app.state.metrics = metrics = Metrics()
    install_error_handlers(app)
    register_routes(app, settings)
    install_openapi(app, settings)
    install_docs(app)
    if settings.metrics_token or not settings.is_production:
        endpoint = metrics_route(metrics.registry, revealed(settings.metrics_token))
        app.add_api_route("/metrics", endpoint, methods=["GET"], include_in_schema=False)
    if not settings.uses_real_r2:
        app.include_router(storage_router())
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(BodyLimitMiddleware)
    install_cors(app, settings)
    # Added last, so it runs first: it also times and logs the 413s above.
    quiet = settings.access_log is AccessLog.ERRORS
    app.add_middleware(
        RequestTelemetryMiddleware, metrics=metrics, min_logged_status=400 if quiet else 0
    )
    return app


class GatewayCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight in the gateway's error shape, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        detail = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        kept = {k: v for k, v in response.headers.items() if k not in _BODY_HEADERS}
        return JSONResponse(error_body("CORS_REFUSED", detail), 400, headers=kept)


_BODY_HEADERS = ("content-length", "content-type")


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Lets the listed browser origins call the API; outside the body limit, so 413s carry it."""
    if not settings.cors_allow_origins:
        return  # no CORS headers at all: only same-origin pages may read answers
    app.add_middleware(
        GatewayCORSMiddleware,
        allow_origins=settings.cors_allow_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
        # Without these a page cannot read a request id to report, or when to retry.
        expose_headers=["X-Request-ID", "Retry-After", "Idempotent-Replayed"],
        max_age=600,  # 10 min: few preflights, yet a removed origin stops working soon
    )


def _configure_logging(settings: Settings) -> None:
    configure_logging(
        json_logs=settings.json_logs,
        project_id=settings.google_cloud_project,
        known_secrets=settings.secret_values,
    )


# Settings that cannot serve stop the import here, with one message and exit status 1:
# uvicorn would otherwise print the message at the bottom of a long traceback.
_configure_logging(settings_or_exit())
app = create_app()
