"""`make fuzz`: schemathesis against a real gateway, with valid auth and a fixed seed.

Starts the gateway in local mode on a free loopback port, mints a token, tops up the user's
credits, seeds jobs that stay queued, and runs `st run` over the OpenAPI schema with the hooks in
`tests/fuzz_hooks.py`: path parameters draw from the seeded jobs and every webhook is validly
signed, so the handlers behind the token, the id and the signature are fuzzed, not only their
refusals. It fails on any 5xx, on any response that does not match the schema (status, content
type, body, headers), on a warning that an operation never got past its 401/403 or its 404, and
if fewer than MIN_REQUESTS requests were generated, so a schema that tests nothing cannot pass.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fuzz_hooks import JOBS_ENV, SECRET_ENV
from tests.servers import ROOT, GatewayProcess, manage

SEED = 20261125
MIN_REQUESTS = 1000
# What "correct" means here. positive_data_acceptance is left out on purpose: some valid-looking
# inputs are refused by rules a schema cannot state (an image URL whose host is an IP address,
# an opaque cursor the gateway never issued), and those refusals are the point.
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
        "unsupported_method",
        # Every operation that declares a session must refuse a call without one.
        "ignored_auth",
    ]
)


# Seeded jobs for path parameters and webhook bodies; each cancel or terminal webhook uses one
# up, so there are plenty.
SEEDED_JOBS = 40
WEBHOOK_SECRET = "fuzz-webhook-secret-0123456789abcdef"
# Warnings that mean an operation was fuzzed only at its front door.
FRONT_DOOR_WARNINGS = ("returned only 401/403", "repeatedly returned 404")


def run(max_examples: int, max_time: int) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        gateway = GatewayProcess(
            data,
            # Jobs stay queued for the whole run, so a cancel can succeed and webhooks matter.
            LOCAL_RENDER_SECONDS="3600",
            RECONCILER_ENABLED="false",
            MAX_CONCURRENT_JOBS="100000",
            RUNPOD_WEBHOOK_SECRET=WEBHOOK_SECRET,
            # An event stream of a queued job would stay open for the whole run: end each in 1 s.
            STREAM_MAX_SECONDS="1",
        )
        gateway.start()
        try:
            token = manage(gateway.env, "mint-token", "user_fuzz", "--ttl", "7200")
            manage(gateway.env, "grant", "user_fuzz", "100000")
            jobs = seed_jobs(gateway.base_url, token, data / "gateway.db")
            failed = _schemathesis(gateway.base_url, token, jobs, max_examples, max_time)
            return failed or _check_reached_handlers(gateway.base_url)
        finally:
            gateway.stop()


# Proof that the run got past each door: these routes must have answered 200 at least once.
MUST_SUCCEED = ("/webhooks/runpod", "/jobs/{job_id}/cancel", "/jobs/{job_id}")


def _check_reached_handlers(base: str) -> int:
    """The gateway's own metrics: answers per route and status, printed, then checked."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_http_request_duration_seconds_count" and sample.value:
                key = (sample.labels["route"], sample.labels["status"])
                counts[key] = counts.get(key, 0) + sample.value
    for (route, status), count in sorted(counts.items()):
        print(f"fuzz: {route} {status}: {int(count)}")
    missing = [route for route in MUST_SUCCEED if not counts.get((route, "200"))]
    if missing:
        print(f"fuzz: never answered 200, so never fuzzed past the front door: {missing}")
    return 1 if missing else 0


def seed_jobs(base: str, token: str, database: Path) -> list[tuple[str, str]]:
    """Jobs that exist, with the RunPod id the stand-in gave each (read from the store)."""
    headers = {"Authorization": f"Bearer {token}"}
    body = {"prompt": "a paper boat in the rain", "durationSec": 1}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        for _ in range(SEEDED_JOBS):
            client.post("/jobs/create", json=body).raise_for_status()
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT job_id, runpod_id FROM jobs WHERE runpod_id IS NOT NULL")
        return [(job_id, runpod_id) for job_id, runpod_id in rows]


def _schemathesis(
    base: str, token: str, jobs: list[tuple[str, str]], examples: int, max_time: int
) -> int:
    command = [
        str(Path(sys.executable).parent / "st"), "run", f"{base}/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", CHECKS,
        "--max-examples", str(examples),
        "--seed", str(SEED),
        "--max-time", str(max_time),
        "--workers", "1",
        "--no-color",
    ]  # fmt: skip
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(ROOT / "tests" / "fuzz_hooks.py"),
        JOBS_ENV: json.dumps(jobs),
        SECRET_ENV: WEBHOOK_SECRET,
    }
    done = subprocess.run(command, cwd=ROOT, env=env, check=False, capture_output=True, text=True)
    print(done.stdout[-20000:], done.stderr[-5000:], sep="\n")
    match = re.search(r"(\d+) generated", done.stdout)
    generated = int(match.group(1)) if match else 0
    print(f"fuzz: {generated} requests generated (minimum {MIN_REQUESTS})")
    stuck = [warning for warning in FRONT_DOOR_WARNINGS if warning in done.stdout]
    if stuck:
        print(f"fuzz: operations never got past the front door: {stuck}")
    if done.returncode:
        return done.returncode
    return 0 if generated >= MIN_REQUESTS and not stuck else 1


if __name__ == "__main__":
    sys.exit(run(max_examples=int(sys.argv[1]) if len(sys.argv) > 1 else 60, max_time=90))
