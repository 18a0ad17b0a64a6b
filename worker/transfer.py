"""Bytes in and out of the worker: PUTs to presigned URLs (retried), and the start image's GET.

Presigned URLs are credentials until they expire: no message or log line here ever holds one.
Errors name the HTTP status or the exception's type, never the URL (httpx puts the URL in some
of its own messages, so those are not passed on either).

The error family, once (as httpx's `_exceptions.py` writes its own):
- transient: a 5xx or 429 answer, or no answer at all (`httpx.TransportError`: connect, read or
  write failed, or timed out). Retried with jittered backoff while the job has time.
- permanent: any other non-2xx answer (an expired or mis-signed URL is a 403). Not retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

# A start image is a picture, not a video: anything bigger is a mistake or an attack.
MAX_IMAGE_BYTES = 20 * 1024 * 1024


class TransferFailed(Exception):
    """Moving bytes failed; the message is safe to show the user and to log."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Full-jitter exponential backoff (AWS's "Exponential Backoff and Jitter")."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, retry: int, rng: Callable[[], float]) -> float:
        return rng() * min(self.max_delay, self.base_delay * 2.0**retry)


@dataclass
class Uploader:
    """PUTs bytes to presigned URLs, retrying transient failures until `deadline` (monotonic)."""

    client: httpx.Client
    deadline: float
    policy: RetryPolicy = RetryPolicy()
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rng: Callable[[], float] = random.random

    def put(self, what: str, url: str, body: bytes, content_type: str) -> None:
        """Upload `body`; raise `TransferFailed` naming `what` ("the video") when it cannot."""
        problem: str | None = "it was not tried"
        for attempt in range(self.policy.attempts):
            if attempt and not self._wait_before_retry(attempt - 1):
                raise TransferFailed(f"Uploading {what} ran out of time: {problem}")
            problem, transient = self._try_put(url, body, content_type)
            if problem is None:
                return
            if not transient:
                raise TransferFailed(f"Uploading {what} was refused: {problem}")
        raise TransferFailed(
            f"Uploading {what} failed after {self.policy.attempts} attempts: {problem}"
        )

    def _try_put(self, url: str, body: bytes, content_type: str) -> tuple[str | None, bool]:
        """One attempt: (None, _) on success, else (what went wrong, whether to retry)."""
        remaining = self.deadline - self.clock()
        try:
            response = self.client.put(
                url,
                content=body,
                headers={"Content-Type": content_type},
                timeout=httpx.Timeout(max(remaining, 0.1), connect=min(5.0, max(remaining, 0.1))),
            )
        except httpx.TransportError as exc:
            return f"no answer ({type(exc).__name__})", True
        if response.is_success:
            return None, False
        status = response.status_code
        return f"HTTP {status}", status >= 500 or status == 429

    def _wait_before_retry(self, retry: int) -> bool:
        """Sleep the backoff, or say False when the next try could not finish in time."""
        delay = self.policy.delay(retry, self.rng)
        if self.clock() + delay >= self.deadline:
            return False
        self.sleep(delay)
        return True


def fetch_image(client: httpx.Client, url: str) -> bytes:
    """The start image's bytes; `TransferFailed` when it cannot be had.

    Redirects are not followed: the gateway checked that `url` names a public host, and a
    redirect could point the worker at its own network (a cloud metadata address).
    """
    try:
        with client.stream("GET", url, follow_redirects=False) as response:
            if response.status_code != 200:
                status = response.status_code
                raise TransferFailed(f"The image at imageUrl could not be fetched: HTTP {status}")
            return _read_limited(response)
    except httpx.TransportError as exc:
        raise TransferFailed(
            f"The image at imageUrl could not be fetched: no answer ({type(exc).__name__})"
        ) from None


def _read_limited(response: httpx.Response) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_IMAGE_BYTES:
            raise TransferFailed(
                f"The image at imageUrl is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB"
            )
    if not body:
        raise TransferFailed("The image at imageUrl is empty")
    return bytes(body)
