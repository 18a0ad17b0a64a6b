"""Live job events: server-sent events for one job, or for all of a user's jobs.

A webhook or a progress report may reach any instance, so a stream cannot wait for the writes
of its own instance. Each instance has one `StreamHub`, which asks the store for every job
changed since its last look, once per `STREAM_POLL_INTERVAL_SECONDS` for all of its open
streams together (none while it has none), renders each change once, and hands it to the
streams that watch that job or its owner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from config import Settings
from deps import Caller, CurrentUser
from errors import NotFound, TooManyStreams
from http_errors import AUTH_ERRORS, STORE_ERRORS, error_responses
from jobs import JobService
from models import JOB_ID_PATTERN, Job, now_ms
from openapi import JOBS
from store import Store

log = logging.getLogger("gateway.events")

# A poll reads the changes of the last few seconds again: a write's `updated_at` is its writer's
# clock when the transaction began (each instance's own clock with SQLite, the mutation's start in
# Convex), so a change may become visible after a later-stamped one was read. Up to 2 s of skew
# or commit delay is caught; the repeats are dropped by version.
OVERLAP_MS = 2_000
# One poll reads at most this many changes (`MAX_UPDATED_JOBS` in convex/model.ts too); a busier
# interval is read on in the next polls, from where this one stopped.
POLL_PAGE = 500
# What a client waits before it reconnects after a `reconnect` event (the SSE `retry:` field).
RECONNECT_RETRY_MS = 1_000
# After SIGTERM, how long streams get to send their `reconnect` event before they are cut.
SHUTDOWN_GRACE_SECONDS = 1.0
# What a per-user stream sends first: the newest jobs, as the first page of `GET /jobs` would.
SNAPSHOT_JOBS = 20

Render = Callable[[Job], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Change:
    """One state of one job, with its data exactly as `GET /jobs/{id}` answers it."""

    job: Job
    data: str


def version(job: Job) -> Job:
    """What a stream must see again when it differs: the job minus what changes unseen.

    A saved download URL and a reconciler's claim rewrite a row without moving `updated_at`.
    """
    return replace(job, download_url=None, download_expires_at=None, checked_at=None)


class Subscription:
    """One open stream's mailbox: the latest change of each job it watches, not a queue.

    Only the latest state of a job matters, so a slow client costs one entry per job, however
    many changes it missed.
    """

    __slots__ = ("user_id", "job_id", "pending", "wake", "closed")

    def __init__(self, user_id: str, job_id: str | None) -> None:
        self.user_id = user_id
        self.job_id = job_id
        self.pending: dict[str, Change] = {}
        self.wake = asyncio.Event()
        self.closed = False

    def offer(self, change: Change) -> None:
        self.pending[change.job.job_id] = change
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    async def next(self, timeout: float) -> list[Change] | None:
        """The changes since the last call; None once closed or after `timeout` seconds."""
        if not self.pending and not self.closed:
            try:
                await asyncio.wait_for(self.wake.wait(), max(timeout, 0))
            except TimeoutError:
                return None
        self.wake.clear()
        if self.closed:
            return None
        changes, self.pending = list(self.pending.values()), {}
        return changes


@dataclass
class StreamLimits:
    per_user: int
    per_instance: int


@dataclass
class StreamHub:
    """An instance's open streams and the one poll that feeds them all."""

    store: Store
    render: Render
    limits: StreamLimits
    interval: float
    page: int = POLL_PAGE
    clock: Callable[[], int] = now_ms
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    # See `shutdown`; set by the first stream, which also makes that event.
    _streams_opened: asyncio.Event = field(default_factory=asyncio.Event)
    _shutdown: anyio.Event | None = None
    _by_job: dict[str, set[Subscription]] = field(default_factory=dict)
    _by_user: dict[str, set[Subscription]] = field(default_factory=dict)
    _per_user: dict[str, int] = field(default_factory=dict)
    _count: int = 0
    # Where the next poll starts, the newest change seen, and the versions already handed out.
    _cursor: tuple[int, str] = (0, "")
    _newest: int = 0
    _seen: dict[str, Job] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, store: Store, render: Render) -> StreamHub:
        limits = StreamLimits(settings.streams_per_user, settings.streams_per_instance)
        return cls(store, render, limits, settings.stream_poll_interval_seconds)

    @property
    def open_streams(self) -> int:
        return self._count

    @property
    def shutdown(self) -> anyio.Event:
        """Set by sse-starlette when the server is told to stop: every stream is then closed.

        Made when first asked for (by the first stream): an `anyio.Event` loads anyio's asyncio
        backend, 20-25 ms of every cold start (issue 13), which nothing else needs before a
        stream opens; sse-starlette's task group would load it for that first stream anyway.
        """
        if self._shutdown is None:
            self._shutdown = anyio.Event()
        return self._shutdown

    # --- streams come and go ---------------------------------------------------------------

    def subscribe(self, user_id: str, job_id: str | None = None) -> Subscription:
        """A place for one more stream, or `TooManyStreams` (429)."""
        if self._per_user.get(user_id, 0) >= self.limits.per_user:
            raise TooManyStreams(f"You already have {self.limits.per_user} open event streams")
        if self._count >= self.limits.per_instance:
            raise TooManyStreams("This server holds all the event streams it can; retry")
        if self._count == 0:
            self._start_watching()
        self._streams_opened.set()
        sub = Subscription(user_id, job_id)
        index = self._by_user if job_id is None else self._by_job
        index.setdefault(job_id or user_id, set()).add(sub)
        self._per_user[user_id] = self._per_user.get(user_id, 0) + 1
        self._count += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        index = self._by_user if sub.job_id is None else self._by_job
        key = sub.job_id or sub.user_id
        watchers = index.get(key)
        if watchers is None or sub not in watchers:
            return  # already gone
        watchers.discard(sub)
        if not watchers:
            del index[key]
        self._per_user[sub.user_id] -= 1
        if not self._per_user[sub.user_id]:
            del self._per_user[sub.user_id]
        self._count -= 1

    def close_all(self) -> None:
        for index in (self._by_job, self._by_user):
            for watchers in index.values():
                for sub in watchers:
                    sub.close()

    def _start_watching(self) -> None:
        # Nothing was watched until now: changes before this moment are in each new stream's
        # first event, which it reads after subscribing.
        self._newest = self.clock()
        self._cursor = (self._newest - OVERLAP_MS, "")
        self._seen.clear()

    # --- the poll --------------------------------------------------------------------------

    async def change_for(self, job: Job) -> Change:
        if job.deleted_at is not None:  # nothing left to show, and no URL to presign
            return Change(job, json.dumps({"jobId": job.job_id}, separators=(",", ":")))
        return Change(job, await self.render(job))

    async def poll_once(self) -> None:
        """One store read for every open stream; nothing at all while there are none."""
        if not self._count:
            return
        since, after = self._cursor
        page = await self.store.jobs_updated_since(since, after, self.page)
        for job in page:
            await self._dispatch(job)
        self._advance(page)

    def _advance(self, page: list[Job]) -> None:
        if page:
            self._newest = max(self._newest, page[-1].updated_at)
        if len(page) == self.page:  # more is waiting: read on from exactly here
            self._cursor = (page[-1].updated_at, page[-1].job_id)
            return
        self._cursor = (self._newest - OVERLAP_MS, "")
        oldest = self._cursor[0]
        self._seen = {key: job for key, job in self._seen.items() if job.updated_at >= oldest}

    async def _dispatch(self, job: Job) -> None:
        current = version(job)
        if self._seen.get(job.job_id) == current:
            return
        watchers = self._by_job.get(job.job_id, set()) | self._by_user.get(job.user_id, set())
        if watchers:
            change = await self.change_for(job)
            for sub in watchers:
                sub.offer(change)
        self._seen[job.job_id] = current

    async def run_forever(self) -> None:
        """Poll every interval; a failed poll is logged and tried again at the next one."""
        while True:
            try:
                await self.poll_once()
            except Exception:  # the streams must outlive a store that is down for a while
                log.exception("event streams could not read the store's changes")
            await self.sleep(self.interval)

    async def close_on_shutdown(self) -> None:
        # Only an open stream sets `shutdown` (sse-starlette sets it from a stream), so there is
        # nothing to wait for, nor an event to make, before the first one.
        await self._streams_opened.wait()
        await self.shutdown.wait()
        log.info("closing %d event streams for shutdown", self._count)
        self.close_all()


# --- what a stream sends ---------------------------------------------------------------------


def job_event(change: Change) -> ServerSentEvent:
    """`job` with the job's answer, or `deleted` with its id once the user deleted it."""
    name = "job" if change.job.deleted_at is None else "deleted"
    return ServerSentEvent(data=change.data, event=name, id=str(change.job.updated_at))


def ends_stream(sub: Subscription, change: Change) -> bool:
    """A job's stream ends after its terminal event, or once the job is deleted."""
    job = change.job
    return sub.job_id is not None and (job.status.is_terminal or job.deleted_at is not None)


def reconnect_event(reason: str) -> ServerSentEvent:
    return ServerSentEvent(
        data=f'{{"reason":"{reason}"}}', event="reconnect", retry=RECONNECT_RETRY_MS
    )


def is_news(sent: dict[str, Change], change: Change) -> bool:
    """Whether a stream has not yet sent this state of the job (or a later one)."""
    before = sent.get(change.job.job_id)
    if before is None:
        return True
    if change.data == before.data:
        return False
    # A job's end is news whatever its time says: writes are stamped by more than one clock.
    return change.job.status.is_terminal or change.job.updated_at >= before.job.updated_at


async def event_stream(
    sub: Subscription,
    first: list[Change],
    max_seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[ServerSentEvent]:
    """The events of one stream: the current state, then each change, then `reconnect`.

    A job stream (`sub.job_id` set) ends after its job's terminal event.
    """
    deadline = clock() + max_seconds
    sent: dict[str, Change] = {}
    changes: list[Change] | None = first
    while changes is not None:
        for change in changes:
            if not is_news(sent, change):
                continue
            sent[change.job.job_id] = change
            yield job_event(change)
            if ends_stream(sub, change):
                return
        changes = await sub.next(deadline - clock())
    yield reconnect_event("shutdown" if sub.closed else "timeout")


class HubStream(EventSourceResponse):
    """An SSE response that gives its place back to the hub however the stream ends."""

    def __init__(
        self, hub: StreamHub, sub: Subscription, events: AsyncIterator[ServerSentEvent], **kw: Any
    ) -> None:
        super().__init__(
            events,
            shutdown_event=hub.shutdown,
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
            **kw,
        )
        self.hub, self.sub = hub, sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope.get("gateway.head"):  # HEAD, which the middleware hands on as GET
                scope = {**scope, "method": "HEAD"}
            await super().__call__(scope, receive, send)
        finally:
            self.hub.unsubscribe(self.sub)


def stream_response(
    hub: StreamHub, sub: Subscription, first: list[Change], settings: Settings
) -> HubStream:
    events = event_stream(sub, first, settings.stream_max_seconds)
    return HubStream(
        hub,
        sub,
        events,
        ping=settings.stream_keepalive_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive"),
    )


def renderer(jobs: JobService) -> Render:
    """Each event's data: the very answer of `GET /jobs/{id}`, as JSON text."""

    async def render(job: Job) -> str:
        return (await jobs.answer(job)).model_dump_json(by_alias=True)

    return render


# --- the routes ------------------------------------------------------------------------------

events_router = APIRouter()

_EXAMPLE_STREAM = (
    'event: job\nid: 1764073790120\ndata: {"jobId":"job_Xk3v9QyL0aPz7wRt","status":"running",...}'
    '\n\n: keepalive\n\nevent: reconnect\ndata: {"reason":"timeout"}\nretry: 1000\n\n'
)
# Before Open API 3.2 (`itemSchema`), a `text/event-stream`'s schema describes each event.
_EVENT_SCHEMA = {
    "oneOf": [
        {
            "title": "job",
            "type": "object",
            "properties": {
                "event": {"const": "job"},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/JobResponse"},
                },
            },
            "required": ["event", "id", "data"],
        },
        {
            "title": "deleted",
            "type": "object",
            "properties": {
                "event": {"const": "deleted"},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "type": "object",
                        "properties": {"jobId": {"type": "string"}},
                        "required": ["jobId"],
                    },
                },
            },
            "required": ["event", "id", "data"],
        },
        {
            "title": "reconnect",
            "type": "object",
            "properties": {
                "event": {"const": "reconnect"},
                "data": {"type": "string", "contentMediaType": "application/json"},
                "retry": {"type": "integer", "minimum": 0},
            },
            "required": ["event", "data", "retry"],
        },
    ]
}
_STREAM_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A `text/event-stream`: events `job` (data: the job as `GET /jobs/{id}`"
        ' answers it; id: its `updatedAt` in ms), `deleted` (data: `{"jobId"}`) once a job is'
        " deleted, `: keepalive` comments, and a last `reconnect` event before the server ends"
        " the stream.",
        "content": {"text/event-stream": {"schema": _EVENT_SCHEMA, "example": _EXAMPLE_STREAM}},
    }
}


async def _opened(
    request: Request, user: Caller, job_id: str | None, first: Callable[[], Awaitable[list[Job]]]
) -> HubStream:
    """Take a place (429 if none), then read the current state (404...), then stream.

    Subscribing first means no change falls between the first event and the next ones.
    """
    hub: StreamHub = request.state.streams
    sub = hub.subscribe(user.user_id, job_id)
    try:
        changes = [await hub.change_for(job) for job in await first()]
    except BaseException:
        hub.unsubscribe(sub)
        raise
    return stream_response(hub, sub, changes, request.state.settings)


@events_router.get(
    "/jobs/events",
    tags=[JOBS],
    summary="Watch all your jobs",
    response_class=EventSourceResponse,
    responses={**_STREAM_ANSWER, **error_responses(*AUTH_ERRORS, TooManyStreams, *STORE_ERRORS)},
)
async def watch_jobs(request: Request, user: CurrentUser) -> HubStream:
    """Server-sent events for all your jobs: first your newest 20, then every change of any
    job of yours (new ones too). Reconnect after `reconnect`: you get the current state again.
    """

    async def newest() -> list[Job]:
        page = await user.store.list_jobs(user.user_id, SNAPSHOT_JOBS, None)
        return page.jobs[::-1]  # oldest first, as changes come

    return await _opened(request, user, None, newest)


@events_router.get(
    "/jobs/{job_id}/events",
    tags=[JOBS],
    summary="Watch a job",
    response_class=EventSourceResponse,
    responses={
        **_STREAM_ANSWER,
        **error_responses(*AUTH_ERRORS, NotFound, TooManyStreams, *STORE_ERRORS),
    },
)
async def watch_job(job_id: str, request: Request, user: CurrentUser) -> HubStream:
    """Server-sent events for one job: its current state, then each change; the stream ends
    after the job is done, failed or canceled. Browsers' `EventSource` sends the `__session`
    cookie; other clients send `Authorization: Bearer` (see the README).
    """
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise NotFound("Job not found")

    async def current() -> list[Job]:
        job = await user.store.get_job(user.user_id, job_id)
        return [await user.jobs.check_if_stale(job)]

    return await _opened(request, user, job_id, current)
