"""A local stand-in for RunPod Serverless: RunPod's HTTP API, its jobs run by the real worker.

With no RunPod configured (`make run`), the gateway builds it in-process and reaches it through
httpx's ASGI transport (wiring.py, `build_runpod_http`): no port and no route of the gateway's
serve it, yet runpod_client.py speaks real RunPod HTTP to it. It also runs on its own:

    python local_runpod.py --host 127.0.0.1 --port 8765 --render-seconds 3

Routes, for any endpoint id, each requiring `Authorization: Bearer <anything>` (401 otherwise):
`POST /v2/{endpoint}/run`, `GET /v2/{endpoint}/status/{id}`, `POST /v2/{endpoint}/cancel/{id}`,
`GET /v2/{endpoint}/health`, with RunPod's JSON shapes; an unknown id answers 404.

Each job runs the real worker's handler (`worker/handler.py`, the code a RunPod endpoint runs),
with the test pattern as its generator: it reads the input through the worker contract's schema
(`worker/contract.py`), renders the video, PUTs it (and a poster, when the input asks) to the
presigned URLs, and answers with the contract's output or its `{"error": ...}` echo.

A job waits IN_QUEUE for a quarter of `render_seconds`, then is IN_PROGRESS (as `/status` shows,
its `output` holding the worker's latest progress, as `runpod.serverless.progress_update` makes
RunPod show it) while the handler runs in a thread, and ends about `render_seconds` after
submission. The handler's answer passes through a copy of runpod-python's `run_job`
(`sdk_result`), so the status holds exactly what the real SDK would report:

- success: COMPLETED, output `{"contractVersion", "jobId", "objectKey", "sizeBytes",
  "durationSec", "posterUploaded"}`;
- a failure the handler caught: it returns `{"error": json.dumps({"jobId", "error_type",
  "error_message"})}`, so FAILED with that JSON string as `error`;
- an exception that escapes the handler: FAILED with the SDK's own JSON string (`error_type`,
  `error_message`, `error_traceback`, `hostname`, `worker_id`, `runpod_version`), no `jobId`.

Then, like RunPod, it POSTs the unsigned webhook (the status payload plus `input` and `webhook`),
trying twice more on any answer but 200, `webhook_retry_delay` seconds apart. `/cancel` marks a
job CANCELLED; no webhook follows.

Failure injection, for tests and demos:
    a prompt containing `[[fail]]` makes the generator fail: the handler reports it, with jobId;
    a prompt containing `[[crash]]` makes the handler itself raise: the SDK reports it, no jobId.

Unlike RunPod, jobs live in this process's memory until it exits, and `policy` is ignored.

Sources for the HTTP answers (RunPod's docs, `runpod/docs` `serverless/endpoints/send-requests.mdx`,
read at commit 09144f63): `/run` answers `{"id", "status": "IN_QUEUE"}`; `/cancel` answers
`{"id", "status": "CANCELLED"}`; `/health` answers `{"jobs": {"completed", "failed",
"inProgress", "inQueue", "retried"}, "workers": {"idle", "running"}}`; a webhook must answer 200,
and "If the call fails, Runpod will retry up to 2 more times with a 10-second delay between
attempts" (section "Webhook notifications"). The statuses of refusals are the docs' table
("Error handling and troubleshooting": 400 bad request, 401 bad API key, 404 not found), but no
source shows their bodies: `{"error": ...}` below is this stand-in's own choice. The gateway reads
only the status, and the first of `error`, `message` or `detail` for its log (runpod_client.py),
as runpod-python reads only the 401 status (`runpod/endpoint/runner.py`).

Over 400 lines because it imitates one service: queueing, the SDK's result shaping and webhook
delivery are RunPod's behaviour, checked together against REFERENCE.md; apart, no piece runs alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from outbound_http import default_ssl_context
from worker.generator import TestPattern
from worker.handler import Worker
from worker.progress import RunPodProgress

logger = logging.getLogger(__name__)

FAIL_MARKER = "[[fail]]"
CRASH_MARKER = "[[crash]]"
# What the real SDK puts in its error report when the pod's environment does not say.
SDK_VERSION = "1.12.0"
# Share of `render_seconds` a job spends IN_QUEUE, so a poller sees every state.
QUEUE_SHARE = 0.25
# RunPod tries a webhook once, then "up to 2 more times with a 10-second delay" when it gets no
# 200 (send-requests.mdx, "Webhook notifications"; the delay is `webhook_retry_delay`).
WEBHOOK_ATTEMPTS = 3
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})


class WorkerFailure(Exception):
    """The generator failed, as a real model can: the handler reports it."""


class HandlerCrash(Exception):
    """A bug in the handler itself: it escapes, and the SDK reports it."""


class FailOnMarker(TestPattern):
    """The worker's test pattern, failing on demand so the refund path can be tried by hand."""

    def generate(self, prompt: str, image: bytes | None, duration_sec: int, seed: int) -> Path:
        if FAIL_MARKER in prompt:
            raise WorkerFailure(f"Simulated worker failure: the prompt contains {FAIL_MARKER}")
        return super().generate(prompt, image, duration_sec, seed)


# --- Jobs -------------------------------------------------------------------------------------


@dataclass(slots=True)
class LocalJob:
    id: str
    input: dict[str, Any]
    webhook: str | None
    status: str = "IN_QUEUE"
    output: Any = None
    error: Any = None
    submitted_at: float = field(default_factory=time.monotonic)
    # The event loop that runs the job: the worker's thread reports progress through it.
    loop: asyncio.AbstractEventLoop | None = None
    started_at: float | None = None
    ended_at: float | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def start(self) -> None:
        self.status, self.started_at = "IN_PROGRESS", time.monotonic()

    def report_progress(self, progress: dict[str, Any]) -> None:
        """What `progress_update` does on RunPod: `/status` shows it as the running job's output."""
        if self.status == "IN_PROGRESS":
            self.output = progress

    def end(self, status: str, *, output: Any = None, error: Any = None) -> None:
        self.status, self.output, self.error = status, output, error
        self.ended_at = time.monotonic()

    def payload(self) -> dict[str, Any]:
        """The job as RunPod's `/status` shows it; times in ms."""
        now = time.monotonic()
        started = self.started_at or self.ended_at or now
        running = (self.ended_at or now) - self.started_at if self.started_at else 0.0
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "delayTime": round((started - self.submitted_at) * 1000),
            "executionTime": round(running * 1000),
        }
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


def sdk_error(exc: BaseException) -> str:
    """An exception that escaped the handler, exactly as runpod-python reports it.

    runpod-python, runpod/serverless/modules/rp_job.py, `run_job`'s `except` branch.
    """
    return json.dumps(
        {
            "error_type": str(type(exc)),
            "error_message": str(exc),
            "error_traceback": "".join(traceback.format_exception(exc)),
            "hostname": "unknown",  # RUNPOD_POD_HOSTNAME, unset outside a pod
            "worker_id": "unknown",  # RUNPOD_POD_ID
            "runpod_version": SDK_VERSION,
        }
    )


def sdk_result(handler_return: Any) -> dict[str, Any]:
    """A handler's return value turned into the job's result, as runpod-python does it.

    runpod-python, runpod/serverless/modules/rp_job.py, `run_job`: a dict's "error" is popped
    into the result's `error` as is, the rest is the `output`, and an empty output is dropped.
    """
    result: dict[str, Any]
    if isinstance(handler_return, dict):
        output = dict(handler_return)
        error = output.pop("error", None)
        output.pop("refresh_worker", None)
        result = {"output": output}
        if error:
            result["error"] = error
    else:
        result = {"output": handler_return}
    if result.get("output") == {}:
        result.pop("output")
    return result


class LocalRunPod:
    """Runs the stand-in's jobs as asyncio tasks and delivers their webhooks."""

    def __init__(
        self,
        *,
        render_seconds: float,
        webhook_retry_delay: float,
        http: httpx.AsyncClient | None = None,
        worker_client: httpx.Client | None = None,
        hold_jobs: bool = False,
    ) -> None:
        self.render_seconds = render_seconds
        self.webhook_retry_delay = webhook_retry_delay
        # A test gate, not RunPod behaviour: held jobs wait in the queue until `release()`, so a
        # crash test can restart the gateway before the worker needs it, however slow the
        # machine is, instead of betting on a render outlasting the restart.
        self._gate = asyncio.Event()
        if not hold_jobs:
            self._gate.set()
        self.jobs: dict[str, LocalJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._owns_http = http is None
        # Webhooks go to the gateway: none should take 30 s.
        timeout = httpx.Timeout(30.0, connect=3.0)
        self._http = http or httpx.AsyncClient(timeout=timeout, verify=default_ssl_context())
        self._owns_worker_client = worker_client is None
        # The worker's uploads and progress POSTs, made from its thread (it is synchronous, as
        # on RunPod). Its own TLS context, not the shared one: httpcore sets ALPN on the context
        # for each new connection, and OpenSSL forbids changing a context another thread is
        # using to open one.
        client = worker_client or httpx.Client(timeout=timeout, verify=httpx.create_ssl_context())
        self.worker = Worker(
            generator=FailOnMarker(), client=client, runpod_progress=self._progress_for
        )

    def submit(self, job_input: dict[str, Any], webhook: str | None) -> LocalJob:
        job = LocalJob(id=f"{uuid.uuid4()}-local", input=job_input, webhook=webhook)
        job.loop = asyncio.get_running_loop()
        self.jobs[job.id] = job
        task = asyncio.create_task(self._run(job), name=f"local-runpod-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return job

    def cancel(self, job_id: str) -> LocalJob | None:
        job = self.jobs.get(job_id)
        if job is not None and not job.is_terminal:
            job.end("CANCELLED")
            if task := self._tasks.get(job_id):
                task.cancel()
        return job

    def release(self) -> None:
        """Let held jobs run (see `hold_jobs`)."""
        self._gate.set()

    async def aclose(self) -> None:
        """Stop every running job, and close the HTTP client if this runner made it."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_http:
            await self._http.aclose()
        if self._owns_worker_client:
            self.worker.client.close()

    async def _run(self, job: LocalJob) -> None:
        await self._gate.wait()
        deadline = time.monotonic() + self.render_seconds
        await asyncio.sleep(self.render_seconds * QUEUE_SHARE)
        job.start()
        try:
            result = sdk_result(await self._handler(job))
        except Exception as exc:  # escaped the handler: the SDK reports it (rp_job.run_job)
            result = {"error": sdk_error(exc)}
        # Rendering is quick here: the job stays IN_PROGRESS until its time is up, so a poll
        # sees every state a real render goes through.
        await _sleep_until(deadline)
        # RunPod marks a job whose result carries an error FAILED, else COMPLETED (RunPod's docs,
        # serverless/development/error-handling: return {"error": ...} to fail a job).
        status = "FAILED" if "error" in result else "COMPLETED"
        job.end(status, output=result.get("output"), error=result.get("error"))
        await self._deliver_webhook(job)

    async def _handler(self, job: LocalJob) -> Any:
        """The worker's own handler, on the job as RunPod hands it over (`id` and `input`)."""
        if CRASH_MARKER in str(job.input.get("prompt", "")):
            raise HandlerCrash(f"Simulated handler bug: the prompt contains {CRASH_MARKER}")
        # It renders and uploads, blocking: keep it off the event loop.
        return await asyncio.to_thread(self.worker.handle, {"id": job.id, "input": job.input})

    def _progress_for(self, job: dict[str, Any]) -> RunPodProgress:
        """The worker's `progress_update`: it calls from its thread, the job lives on the loop."""
        local_job = self.jobs[job["id"]]
        loop = local_job.loop
        assert loop is not None, "a job's handler runs only after it was submitted on the loop"

        def report(body: dict[str, object]) -> None:
            loop.call_soon_threadsafe(local_job.report_progress, body)

        return report

    async def _deliver_webhook(self, job: LocalJob) -> None:
        if not job.webhook:
            return
        body = job.payload() | {"input": job.input, "webhook": job.webhook}
        for attempt in range(WEBHOOK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(self.webhook_retry_delay)
            if await self._post_webhook(job.webhook, body):
                return
        logger.warning("Gave up on the webhook for job %s after %d tries", job.id, WEBHOOK_ATTEMPTS)

    async def _post_webhook(self, url: str, body: dict[str, Any]) -> bool:
        try:
            response = await self._http.post(url, json=body)
        except httpx.HTTPError as exc:
            # Not the URL: its query string carries the gateway's per-job token.
            logger.warning("Webhook for job %s failed: %r", body["id"], exc)
            return False
        return response.status_code == 200


async def _sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


# --- The HTTP API -----------------------------------------------------------------------------


class RequireBearer:
    """Answers 401 unless the request carries `Authorization: Bearer <something>`, like RunPod."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _has_bearer_token(Headers(scope=scope)):
            # 401 is RunPod's status for a bad key (docs, above); the body is our own.
            response = JSONResponse({"error": "Unauthorized"}, status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _has_bearer_token(headers: Headers) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def _runner(request: Request) -> LocalRunPod:
    runner: LocalRunPod = request.app.state.runner
    return runner


def _no_such_job() -> JSONResponse:
    # 404 as RunPod's docs list it (and as /status answers once a job's result expired,
    # REFERENCE.md); no source shows the body, so this one is our own.
    return JSONResponse({"error": "request does not exist"}, status_code=404)


async def run_job(request: Request) -> JSONResponse:
    """Queue a job: `{"input": {...}, "webhook"?: url, "policy"?: {...}}`."""
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "The body is not JSON"}, status_code=400)
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return JSONResponse({"error": "The body needs an `input` object"}, status_code=400)
    webhook = body.get("webhook") if isinstance(body.get("webhook"), str) else None
    job = _runner(request).submit(body["input"], webhook)
    return JSONResponse({"id": job.id, "status": job.status})


async def job_status(request: Request) -> JSONResponse:
    """A job's status, output and error."""
    job = _runner(request).jobs.get(request.path_params["job_id"])
    return JSONResponse(job.payload()) if job else _no_such_job()


async def cancel_job(request: Request) -> JSONResponse:
    """Cancel a job that has not ended yet."""
    job = _runner(request).cancel(request.path_params["job_id"])
    return JSONResponse({"id": job.id, "status": job.status}) if job else _no_such_job()


async def health(request: Request) -> JSONResponse:
    """Job counts by state, and one make-believe worker."""
    counts = {status: 0 for status in ("COMPLETED", "FAILED", "IN_PROGRESS", "IN_QUEUE")}
    for job in _runner(request).jobs.values():
        counts[job.status] = counts.get(job.status, 0) + 1
    busy = counts["IN_PROGRESS"]
    jobs = {
        "completed": counts["COMPLETED"],
        "failed": counts["FAILED"],
        "inProgress": busy,
        "inQueue": counts["IN_QUEUE"],
        "retried": 0,
    }
    return JSONResponse({"jobs": jobs, "workers": {"idle": 0 if busy else 1, "running": busy}})


async def list_jobs(request: Request) -> JSONResponse:
    """Test hook (RunPod has no such call): every job this stand-in was ever given."""
    jobs = _runner(request).jobs.values()
    listed = [{"id": job.id, "status": job.status, "jobId": job.input.get("jobId")} for job in jobs]
    return JSONResponse(listed)


async def release_jobs(request: Request) -> JSONResponse:
    """Test hook (RunPod has no such call): let the jobs held by `--hold-jobs` run."""
    _runner(request).release()
    return JSONResponse({"released": True})


def create_local_runpod_app(
    *,
    render_seconds: float = 3.0,
    webhook_retry_delay: float = 10.0,
    http: httpx.AsyncClient | None = None,
    worker_client: httpx.Client | None = None,
    hold_jobs: bool = False,
) -> Starlette:
    """The stand-in as an ASGI app, its jobs run by `app.state.runner`.

    Its lifespan stops the runner, but a parent app does not run the lifespan of an app it
    mounts: a gateway that mounts it must `await app.state.runner.aclose()` on shutdown.
    """
    runner = LocalRunPod(
        render_seconds=render_seconds,
        webhook_retry_delay=webhook_retry_delay,
        http=http,
        worker_client=worker_client,
        hold_jobs=hold_jobs,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await runner.aclose()

    app = Starlette(
        routes=[
            Route("/v2/{endpoint_id}/run", run_job, methods=["POST"]),
            Route("/v2/{endpoint_id}/status/{job_id}", job_status, methods=["GET"]),
            Route("/v2/{endpoint_id}/cancel/{job_id}", cancel_job, methods=["POST"]),
            Route("/v2/{endpoint_id}/health", health, methods=["GET"]),
            Route("/v2/{endpoint_id}/_test/jobs", list_jobs, methods=["GET"]),
            Route("/v2/{endpoint_id}/_test/release", release_jobs, methods=["POST"]),
        ],
        middleware=[Middleware(RequireBearer)],
        lifespan=lifespan,
    )
    app.state.runner = runner
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local stand-in for RunPod Serverless.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--render-seconds", type=float, default=3.0, help="how long each job takes (default 3)"
    )
    parser.add_argument(
        "--webhook-retry-delay",
        type=float,
        default=10.0,
        help="seconds between webhook tries (default 10, as on RunPod)",
    )
    parser.add_argument(
        "--hold-jobs",
        action="store_true",
        help="for tests: jobs wait in the queue until POST /v2/<endpoint>/_test/release",
    )
    args = parser.parse_args(argv)
    import uvicorn  # only the command line needs a server

    app = create_local_runpod_app(
        render_seconds=args.render_seconds,
        webhook_retry_delay=args.webhook_retry_delay,
        hold_jobs=args.hold_jobs,
    )
    print(f"RUNPOD_API_BASE=http://{args.host}:{args.port}/v2")
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
