"""schemathesis hooks for `make fuzz`, so the run gets past the gateway's front door.

Loaded by `st run` through `SCHEMATHESIS_HOOKS` (see `tests/fuzz_api.py`, which seeds the jobs and
passes them here in the environment):

* path parameters draw from jobs that exist, so `GET /jobs/{job_id}` and the cancel reach the
  store and RunPod, not only the 404 of an unknown id;
* webhook bodies sometimes carry a real job's ids, so a body reaches the status rules;
* every webhook is signed over the exact bytes sent (`X-RunPod-Signature`), so the handler
  behind the proof is fuzzed rather than its 401;
* a progress report carries a real job's id and progress token half the time, so its body
  reaches the progress rules.

Hook names and arguments are schemathesis's own (`schemathesis/hook_specs.py` in 4.32).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from webhooks import (  # noqa: E402  (the gateway's own signer: one definition of the scheme)
    progress_token,
    sign_body,
)

JOBS_ENV = "FUZZ_JOBS"  # JSON: [[jobId, runpodId], ...]
SECRET_ENV = "FUZZ_WEBHOOK_SECRET"
WEBHOOK_PATH = "/webhooks/runpod"
PROGRESS_PATH = "/webhooks/runpod/progress"
# Every status RunPod sends (REFERENCE.md), and one it does not.
RUNPOD_STATUSES = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT", "X"]


def _seeded() -> list[tuple[str, str]]:
    return [(job_id, runpod_id) for job_id, runpod_id in json.loads(os.environ[JOBS_ENV])]


class SignBody(requests.auth.AuthBase):
    """Signs the prepared request: requests calls this after the body has its final bytes."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        raw = body.encode() if isinstance(body, str) else body
        assert isinstance(raw, bytes), "schemathesis sends each body whole, never streamed"
        request.headers["X-RunPod-Signature"] = sign_body(self.secret, raw)
        return request


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """About half the time a job that exists; else the generated value, still probing the 404."""
    if not path_parameters or "job_id" not in path_parameters:
        return st.just(path_parameters)
    known = st.sampled_from([job_id for job_id, _ in _seeded()])
    choices = st.one_of(known, st.just(path_parameters["job_id"]))
    return choices.map(lambda job_id: {**path_parameters, "job_id": job_id})


@schemathesis.hook
def flatmap_body(context: Any, body: Any) -> Any:
    """A webhook body over a real job's ids half the time; which side wins is drawn too."""
    if context.operation is None or context.operation.path != WEBHOOK_PATH:
        return st.just(body)
    if not isinstance(body, dict):
        return st.just(body)
    skeletons = st.builds(
        lambda pair, status: {"id": pair[1], "status": status, "input": {"jobId": pair[0]}},
        st.sampled_from(_seeded()),
        st.sampled_from(RUNPOD_STATUSES),
    )
    return st.one_of(
        st.just(body),
        skeletons.map(lambda skeleton: {**body, **skeleton}),
        skeletons.map(lambda skeleton: {**skeleton, **body}),
    )


@schemathesis.hook
def flatmap_query(context: Any, query: dict[str, Any] | None) -> Any:
    """A progress report's proof for a real job half the time; else the generated query."""
    if context.operation is None or context.operation.path != PROGRESS_PATH:
        return st.just(query)
    secret = os.environ[SECRET_ENV]
    proven = st.sampled_from([job_id for job_id, _ in _seeded()]).map(
        lambda job_id: {"jobId": job_id, "token": progress_token(secret, job_id)}
    )
    return st.one_of(st.just(query), proven)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path == WEBHOOK_PATH:
        kwargs["auth"] = SignBody(os.environ[SECRET_ENV])
