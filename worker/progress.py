"""Progress, told twice: POSTed to the gateway's `progressUrl`, and to RunPod's `/status`.

Each POST finishes (or gives up after `PROGRESS_TIMEOUT_SECONDS`) before the work goes on, so
none is still in flight when the handler returns and the process moves on. A failed POST is
logged and forgotten: progress is news, and the job must not fail over it. RunPod's copy
(`runpod.serverless.progress_update`) lets the gateway's reconciler see progress from `/status`
even when every POST was lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from worker.contract import ProgressReport, ProgressStage

log = logging.getLogger("worker.progress")

# Short: a slow gateway must not hold up a GPU job; three reports cost at most 6 s.
PROGRESS_TIMEOUT_SECONDS = 2.0

RunPodProgress = Callable[[dict[str, object]], None]


@dataclass
class ProgressReporter:
    client: httpx.Client
    url: str | None
    runpod_progress: RunPodProgress | None = None
    timeout: float = PROGRESS_TIMEOUT_SECONDS

    def report(self, stage: ProgressStage, progress: float) -> None:
        body = ProgressReport(stage=stage, progress=progress).to_wire()
        if self.runpod_progress is not None:
            self.runpod_progress(body)
        if self.url is not None:
            self._post(body)

    def _post(self, body: dict[str, object]) -> None:
        assert self.url is not None
        try:
            response = self.client.post(self.url, json=body, timeout=self.timeout)
        except httpx.HTTPError as exc:
            # The exception's type only: the URL carries the job's token.
            log.warning("progress %s not delivered (%s)", body["stage"], type(exc).__name__)
            return
        if not response.is_success:
            log.warning("progress %s refused: HTTP %d", body["stage"], response.status_code)
