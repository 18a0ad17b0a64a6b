"""Readiness: whether this instance may take traffic, checked part by part for `/readyz`.

The store must answer, Clerk signing keys must be loaded, and RunPod must be reachable.
`/healthz` says the process is alive; `/readyz` runs these checks. They run concurrently, each
within `CHECK_TIMEOUT_SECONDS`, so a hung upstream makes the probe fail instead of hang. RunPod's
`/health` is asked at most once per `RUNPOD_HEALTH_TTL_SECONDS` per instance: probes from every
instance must not add up to load on RunPod's API. The cache is per instance on purpose: it holds
no shared truth, only this instance's last view of RunPod.

On Convex the store check calls `gateway:ping`, a real function, so it fails with a reason when
the deployment refuses the deploy key, or lacks the functions this gateway calls (not deployed,
or out of date: `ConvexStore.ping` also reports a mismatch another call met). The reason is the
error's `detail`, written to be safe on this public endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from auth import ClerkAuth
from errors import AuthUnavailable, GatewayError
from runpod_client import RunPodClient
from store import Store

log = logging.getLogger(__name__)

# Cloud Run's probe waits `timeoutSeconds` (3 s in the README's service): answer before that.
CHECK_TIMEOUT_SECONDS = 2.0
RUNPOD_HEALTH_TTL_SECONDS = 10.0
# `/readyz` answers anyone: without this, every unauthenticated hit would cost a store call
# (a billed Convex query in production). A good answer is reused for a second; a failure is
# checked again at once, so an instance is back in rotation as soon as its store is.
STORE_OK_TTL_SECONDS = 1.0
OK = "ok"

Probe = Callable[[], Awaitable[object]]
Clock = Callable[[], float]


async def outcome(probe: Probe, timeout: float) -> str:
    """`OK`, or why the probe failed, in words safe to show on a public endpoint."""
    try:
        async with asyncio.timeout(timeout):
            await probe()
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except GatewayError as exc:  # our own errors carry a detail written for clients
        return exc.detail
    except Exception as exc:  # anything else may hold hosts or paths: log it, show its type
        log.warning("readiness probe failed", exc_info=True)
        return f"failed ({type(exc).__name__})"
    return OK


class CachedOutcome:
    """A probe's outcome, kept for `ttl` seconds; concurrent callers share one probe in flight."""

    def __init__(
        self,
        probe: Probe,
        ttl: float,
        timeout: float,
        clock: Clock,
        *,
        failure_ttl: float | None = None,
    ) -> None:
        self._probe, self._ttl, self._timeout, self._clock = probe, ttl, timeout, clock
        self._failure_ttl = ttl if failure_ttl is None else failure_ttl
        self._value: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        async with self._lock:
            if self._value is None or self._clock() >= self._expires_at:
                self._value = await outcome(self._probe, self._timeout)
                ttl = self._ttl if self._value == OK else self._failure_ttl
                self._expires_at = self._clock() + ttl
            return self._value


class Readiness:
    """The checks behind `/readyz`, for one instance."""

    def __init__(
        self,
        store: Store,
        auth: ClerkAuth,
        runpod: RunPodClient,
        *,
        timeout: float = CHECK_TIMEOUT_SECONDS,
        runpod_ttl: float = RUNPOD_HEALTH_TTL_SECONDS,
        store_ttl: float = STORE_OK_TTL_SECONDS,
        clock: Clock = time.monotonic,
    ) -> None:
        self._auth, self._timeout = auth, timeout
        self._store = CachedOutcome(store.ping, store_ttl, timeout, clock, failure_ttl=0.0)
        # One attempt: the probe is retried by Cloud Run, and the client's backoff would outlast it.
        # Failures are cached too: a RunPod outage must not turn probes into retries.
        self._runpod = CachedOutcome(lambda: runpod.health(attempts=1), runpod_ttl, timeout, clock)

    async def check(self) -> dict[str, str]:
        """Each part's outcome by name: `"ok"`, or what is wrong with it."""
        store, auth, runpod = await asyncio.gather(
            self._store.get(),
            outcome(self._signing_keys, self._timeout),
            self._runpod.get(),
        )
        return {"store": store, "auth": auth, "runpod": runpod}

    async def _signing_keys(self) -> None:
        if not await self._auth.ensure_keys():
            raise AuthUnavailable("no Clerk signing keys are loaded")


def failed_parts(checks: dict[str, str]) -> dict[str, str]:
    return {name: result for name, result in checks.items() if result != OK}
