"""The CineWeave API gateway: create_app, its lifespan, and the routes."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from auth import dev_jwks
from config import AccessLog, Settings, get_settings, revealed, settings_or_exit
from deps import Caller, CurrentUser, SettingsDep, current_user
from errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidCursor,
    InvalidRequest,
    InvalidSignature,
    JobNotCancelable,
    JobNotDeletable,
    NotFound,
    PayloadTooLarge,
    TooManyActiveJobs,
)
from events import StreamHub, events_router
from http_errors import (
    AUTH_ERRORS,
    STORE_ERRORS,
    error_body,
    error_responses,
    install_error_handlers,
)
from idempotency import Answer, IdempotencyKeyHeader, answer_once, request_fingerprint
from jobs import Reconciler, delete_job_and_media
from local_storage import storage_router
from logs import flush_logs
from metrics import Metrics, RequestTelemetryMiddleware, metrics_route
from middleware import EntryMiddleware, install_cors
from models import (
    CREATE_JOB_EXAMPLES,
    JOB_ID_PATTERN,
    PROGRESS_ANSWER_EXAMPLE,
    WEBHOOK_ANSWER_EXAMPLE,
    WEBHOOK_EXAMPLES,
    ApiModel,
    CreateJobRequest,
    CreateJobResponse,
    CreditsResponse,
    JobListResponse,
    JobResponse,
    ProgressAnswer,
    ProgressRequest,
    create_job_request_model,
    job_progress,
    json_dump,
)
from openapi import CREDITS, JOBS, OPENAPI_TAGS, WEBHOOKS, install_docs, install_openapi
from playground import install_playground
from r2_client import StorageUnavailable
from readiness import failed_parts
from runpod_client import RunPodError
from uploads import UPLOAD_REFUSALS, UploadsDep, UploadService
from uploads import router as uploads_router
from webhooks import receive_progress, receive_webhook
from wiring import State, build_state, configure_logging_for

log = logging.getLogger("gateway")


def make_lifespan(settings: Settings) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with AsyncExitStack() as stack:
            metrics: Metrics = app.state.metrics
            state = await build_state(settings, stack, metrics)
            if settings.reconciler_enabled:
                reconciler = Reconciler(state["jobs"], on_action=metrics.count_reconciler_action)
                task = asyncio.create_task(reconciler.run_forever())
                stack.callback(task.cancel)
                # Forgets uploads no job may use (and, locally, deletes their files).
                interval = settings.reconcile_interval_seconds
                sweep = asyncio.create_task(state["uploads"].sweep_forever(interval))
                stack.callback(sweep.cancel)
            watch_streams(state["streams"], stack)
            yield state
        # uvicorn runs this after the requests in flight finished (or its graceful timeout).
        log.info("shutdown complete: requests drained, clients closed")
        flush_logs()  # the info lines batched on the loop, before it closes

    return lifespan


def watch_streams(streams: StreamHub, stack: AsyncExitStack) -> None:
    """The event streams' poll, and their end when the server stops (see events.py)."""
    for work in (streams.run_forever(), streams.close_on_shutdown()):
        stack.callback(asyncio.create_task(work).cancel)
    stack.callback(streams.close_all)


# --- Routes -----------------------------------------------------------------------------------

# Every route the schema shows, but /jobs/create (its body depends on the settings: see
# `create_job_route`); create_app adds that one first, then these, in the schema's order.
router = APIRouter()
# Routes for the local dev issuer only: with real Clerk there are no local keys to publish.
local_dev_router = APIRouter()


def checked_job_id(job_id: str) -> str:
    if not JOB_ID_PATTERN.fullmatch(job_id):
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


async def create_job(
    body: CreateJobRequest,
    user: CurrentUser,
    uploads: UploadsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Charge `durationSec × CREDITS_PER_SECOND` credits and submit the job to RunPod.

    The start image is an `imageUrl`, or an `imageUploadId` from `POST /uploads`, checked
    before anything is charged. With an `Idempotency-Key`, a retry of the same request returns
    the first answer (the same `jobId`) and is never charged or submitted twice.
    """
    jobs, key = user.jobs, idempotency_key
    if key is None:
        job = await jobs.create(user.user_id, await with_uploaded_image(body, user, uploads))
        return CreateJobResponse(job_id=job.job_id)

    async def create_once(existing_job_id: str | None) -> Answer:
        if existing_job_id:  # a crashed attempt had already charged: that is the answer
            return 200, {"jobId": existing_job_id}
        request = await with_uploaded_image(body, user, uploads)  # a refusal frees the key
        try:
            job = await jobs.create(user.user_id, request, key)
        except RunPodError as exc:  # charged, then refunded: the request did execute
            return exc.status_code, error_body(exc.code, exc.detail)
        return 200, {"jobId": job.job_id}

    fingerprint = request_fingerprint("create", body.model_dump(mode="json"))
    return await answer_once(jobs.store, user.user_id, key, fingerprint, create_once)


async def with_uploaded_image(
    body: CreateJobRequest, user: Caller, uploads: UploadService
) -> CreateJobRequest:
    """The request with an upload's checked, presigned GET URL as its `imageUrl`, if it names one.

    The job keeps that URL as its `imageUrl`: the worker contract is unchanged, and the owner
    sees the image the job started from while the URL lasts (the job's own time).
    """
    if body.image_upload_id is None:
        return body
    url = await uploads.image_url_for_job(user.user_id, body.image_upload_id)
    return body.model_copy(update={"image_url": url, "image_upload_id": None})


def create_job_route(settings: Settings) -> APIRouter:
    """/jobs/create for one app: `create_job` with the body model this app's settings allow.

    FastAPI validates a body against the endpoint's annotation, read once when the route is
    added; the settings are known only then. A copy of the function carries that annotation,
    so two apps with different limits never share one.
    """
    endpoint = types.FunctionType(
        create_job.__code__, create_job.__globals__, create_job.__name__, create_job.__defaults__
    )
    endpoint.__doc__ = create_job.__doc__
    endpoint.__annotations__ = {**create_job.__annotations__, "body": create_job_body(settings)}
    route = APIRouter()
    route.post(
        "/jobs/create",
        tags=[JOBS],
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
            *UPLOAD_REFUSALS,
            *STORE_ERRORS,
        ),
    )(endpoint)
    return route


@router.get(
    "/jobs",
    tags=[JOBS],
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
    listed = [await user.jobs.answer(job) for job in page.jobs]
    return JobListResponse(jobs=listed, next_cursor=page.next_cursor)


@router.get(
    "/jobs/{job_id}",
    tags=[JOBS],
    response_model=JobResponse,
    summary="Get a job",
    responses=error_responses(*AUTH_ERRORS, NotFound, *STORE_ERRORS),
)
async def get_job(job_id: str, user: CurrentUser) -> Response:
    """The job's status; a done job carries a presigned download URL and its expiry."""
    return await job_answer(user, job_id)


async def job_answer(user: Caller, job_id: str) -> Response:
    """GET /jobs/{id}'s answer: the one source for this route and its fast twin."""
    job = await user.store.get_job(user.user_id, checked_job_id(job_id))
    job = await user.jobs.check_if_stale(job)
    return Response(await user.jobs.answer_json(job), media_type="application/json")


def model_response(model: ApiModel) -> Response:
    """`model` as JSON, by pydantic-core's serializer: the bytes FastAPI would write, without
    its second validation against the response model (15-17 µs a read, bench/PROFILE.md)."""
    return Response(model.model_dump_json(by_alias=True), media_type="application/json")


@router.post(
    "/jobs/{job_id}/cancel",
    tags=[JOBS],
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


@router.delete(
    "/jobs/{job_id}",
    tags=[JOBS],
    status_code=204,
    response_class=Response,
    summary="Delete a job",
    responses=error_responses(
        InvalidRequest,
        *AUTH_ERRORS,
        NotFound,
        JobNotDeletable,
        IdempotencyKeyReused,
        IdempotencyKeyInUse,
        StorageUnavailable,
        *STORE_ERRORS,
    ),
)
async def delete_job(
    job_id: str,
    user: CurrentUser,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Delete a finished job and its video. A queued or running job must be canceled first.

    Answers 204, and 204 again for a job already deleted (its video is deleted again, so a
    retry after a storage failure finishes the job). Afterwards the job is `404` on every other
    route and gone from the list; its ledger rows stay.
    """
    job_id = checked_job_id(job_id)
    store, storage = user.store, user.jobs.storage
    if idempotency_key is None:
        await delete_job_and_media(store, storage, user.user_id, job_id)
        return Response(status_code=204)

    async def delete_once(_: str | None) -> Answer:
        try:
            await delete_job_and_media(store, storage, user.user_id, job_id)
        except (JobNotDeletable, NotFound) as exc:  # final answers, worth replaying
            return exc.status_code, error_body(exc.code, exc.detail)
        return 204, {}

    fingerprint = request_fingerprint("delete", job_id)
    return await answer_once(store, user.user_id, idempotency_key, fingerprint, delete_once)


@router.get(
    "/credits",
    tags=[CREDITS],
    response_model=CreditsResponse,
    summary="Your credits",
    responses=error_responses(*AUTH_ERRORS, *STORE_ERRORS),
)
async def get_credits(user: CurrentUser) -> Response:
    """The caller's credit balance and plan."""
    return await credits_answer(user)


async def credits_answer(user: Caller) -> Response:
    """GET /credits' answer: the one source for this route and its fast twin."""
    account = await user.store.get_or_create_user(user.user_id)
    return model_response(CreditsResponse(credits=account.credits, plan=account.plan))


@router.post(
    "/webhooks/runpod",
    tags=[WEBHOOKS],
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
    return await webhook_answer(request)


async def webhook_answer(request: Request) -> dict[str, str]:
    """POST /webhooks/runpod's answer: the one source for this route and its fast twin."""
    # The service straight from the state, not a dependency: see `deps.Caller`.
    job = await receive_webhook(request, request.state.jobs)
    return {"jobId": job.job_id, "status": job.status.public.value}


@router.post(
    "/webhooks/runpod/progress",
    tags=[WEBHOOKS],
    response_model=ProgressAnswer,
    summary="Worker progress report",
    responses={
        200: {"content": {"application/json": {"example": PROGRESS_ANSWER_EXAMPLE}}},
        **error_responses(
            InvalidRequest, InvalidSignature, NotFound, PayloadTooLarge, *STORE_ERRORS
        ),
    },
)
async def worker_progress(
    request: Request,
    body: ProgressRequest,
    job_id: Annotated[str, Query(alias="jobId", description="The job the report is about.")] = "",
    token: Annotated[
        str, Query(description="The job's progress token, as the gateway put it in progressUrl.")
    ] = "",
) -> ProgressAnswer:
    """The worker's `progressUrl` (its job's input): proof is the per-job token in the URL.

    The first report moves a queued job to running. Reports never move a job backwards, and a
    finished job is answered as it is (200), unchanged. At most one is written per job per second
    within a stage; a new stage is written at once.
    """
    job = await receive_progress(request, request.state.jobs, job_id, token, body)
    progress, stage = job_progress(job)
    return ProgressAnswer(
        job_id=job.job_id, status=job.status.public, progress=progress, stage=stage
    )


@router.get("/healthz", summary="Liveness", include_in_schema=False)
async def healthz() -> dict[str, str]:
    """Answers while the process is alive."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    """200 when the store, the Clerk keys and RunPod answer; else 503 naming what failed."""
    return readiness_response(await request.state.readiness.check())


def readiness_response(checks: dict[str, str]) -> JSONResponse:
    failed = failed_parts(checks)
    if not failed:
        return JSONResponse({"status": "ready", "checks": checks})
    detail = "Not ready: " + "; ".join(f"{name}: {why}" for name, why in failed.items())
    return JSONResponse({**error_body("NOT_READY", detail), "checks": checks}, status_code=503)


@local_dev_router.get("/.well-known/jwks.json", include_in_schema=False)
async def local_jwks(settings: SettingsDep) -> dict[str, Any]:
    """The local dev issuer's public keys."""
    return dev_jwks(settings.local_data_dir)


# --- The hot reads, again as plain Starlette routes --------------------------------------------


class FastRead(Route):
    """A hot route answered without FastAPI's route handling (dependency solving, parameter
    parsing, the response model): 33-40 µs of the 180-260 µs a read cost (issue 13,
    bench/PROFILE.md), and over half of the signed webhook's CPU in-app. The entry middleware
    answers it before the app's own layers (`EntryMiddleware`'s shortcuts).

    Its FastAPI twin stays registered for the schema, the docs and whatever this route does not
    fully match (a 405, a trailing slash); both build their answer through one function
    (`credits_answer`, `job_answer`, `webhook_answer`). tests/test_fast_reads.py and
    tests/test_fast_webhook.py prove the two answer alike for every status. HEAD arrives here
    as GET, so `methods` is the one method (Starlette would add HEAD to a GET route's).
    """

    def __init__(self, path: str, endpoint: Endpoint, method: str = "GET") -> None:
        super().__init__(path, endpoint, methods=[method])
        self.methods = {method}

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        job_id = child_scope.get("path_params", {}).get("job_id")
        if job_id is not None and not JOB_ID_PATTERN.fullmatch(job_id):
            # Not a job id: a sibling such as /jobs/events, or a 404 its FastAPI twin answers.
            return Match.NONE, {}
        if match is not Match.NONE:
            child_scope["route"] = self  # the route template metrics label it with, as FastAPI's
        return match, child_scope


Endpoint = Callable[[Request], Awaitable[Response]]


async def fast_credits(request: Request) -> Response:
    return await credits_answer(await current_user(request))


async def fast_job(request: Request) -> Response:
    return await job_answer(await current_user(request), request.path_params["job_id"])


async def fast_webhook(request: Request) -> Response:
    # The bytes FastAPI's route writes for the same dict (its JSONResponse: compact, UTF-8), by
    # orjson, a third of the stdlib encoder's cost; both values are ids and enum words, which
    # the two encoders write alike. The twin test compares the bytes.
    return Response(orjson.dumps(await webhook_answer(request)), media_type="application/json")


def fast_reads() -> list[Route]:
    return [
        FastRead("/credits", fast_credits),
        FastRead("/jobs/{job_id}", fast_job),
        FastRead("/webhooks/runpod", fast_webhook, method="POST"),
    ]


# --- The app ----------------------------------------------------------------------------------


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """`router`'s routes, added to the app as they were built, in their order.

    `include_router` would keep the router and build each of its routes again for the app:
    FastAPI 0.163 does that on the first request matched past them, and the first is the first
    /healthz, ~15 ms of every cold start (issue 13). These routers set no prefix, tags,
    dependencies or other options for an include to apply, and the gateway sets no dependency
    overrides, so the routes built once at import serve every app alike.
    """
    assert (router.prefix, router.tags, router.dependencies, router.responses) == ("", [], [], {})
    assert router.include_in_schema and not router.callbacks
    app.router.routes.extend(router.routes)


def create_app(settings: Settings | None = None, *, fast_reads_first: bool = True) -> FastAPI:
    """The gateway; `fast_reads_first=False` leaves the hot reads to their FastAPI routes alone,
    so tests can compare the twins."""
    settings = settings or get_settings()
    app = FastAPI(
        title="CineWeave API gateway",
        version="1.0.0",
        description="Turns prompts into videos on RunPod, paid for with credits.",
        openapi_tags=OPENAPI_TAGS,
        lifespan=make_lifespan(settings),
        # FastAPI's built-in OpenTelemetry asks the global providers on every request whether
        # anyone listens (7-9 µs a request, issue 13); we export none, so it is off.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN: install_docs serves them.
        docs_url=None,
        redoc_url=None,
    )
    # Made here, not in the lifespan: the middleware needs them when the app is built.
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    install_error_handlers(app)
    add_routes(app, create_job_route(settings))
    # Before `router`: its /jobs/{job_id} would take /jobs/events.
    add_routes(app, events_router)
    add_routes(app, router)
    add_routes(app, uploads_router)
    if not settings.uses_real_clerk:
        add_routes(app, local_dev_router)
    install_openapi(app, settings)
    install_docs(app)
    install_playground(app, settings)
    if settings.metrics_token or not settings.is_production:
        endpoint = metrics_route(metrics.registry, revealed(settings.metrics_token))
        app.add_api_route("/metrics", endpoint, methods=["GET"], include_in_schema=False)
    if not settings.uses_real_r2:
        app.include_router(storage_router())
    shortcuts = fast_reads() if fast_reads_first else []
    app.add_middleware(EntryMiddleware, shortcuts=shortcuts, handlers=app.exception_handlers)
    install_cors(app, settings)
    # Added last, so it runs first: it also times and logs the 413s above.
    quiet = settings.access_log is AccessLog.ERRORS
    app.add_middleware(
        RequestTelemetryMiddleware, metrics=metrics, min_logged_status=400 if quiet else 0
    )
    return app


# Settings that cannot serve stop the import here, with one message and exit status 1:
# uvicorn would otherwise print the message at the bottom of a long traceback.
configure_logging_for(settings_or_exit())
app = create_app()
