"""models.py: the job shape the gateway shows is the one the web app reads from Convex.

`tests/fixtures/public_jobs.json` holds stored job records (as `convex/gateway.ts` returns them)
and how each must look to a user. This file checks the gateway's `GET /jobs/{id}` shape
against it; `convex/webapp.test.ts` checks `webapp:myJob`/`myJobs` against the same cases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from convex_client import _job
from models import JobResponse, json_dump

FIXTURE = Path(__file__).parent / "fixtures" / "public_jobs.json"
CASES: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["cases"]


class TestJobResponse:
    @pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
    def test_shows_each_stored_job_as_the_web_app_does(self, case: dict[str, Any]) -> None:
        # `_job` is how the gateway reads a record from Convex; the route renders `from_job`.
        shown = json_dump(JobResponse.from_job(_job(case["stored"])))
        assert list(shown) == list(case["public"])  # the same fields, in the same order
        for field, expected in case["public"].items():
            assert shown[field] == expected, field

    def test_the_cases_cover_every_public_status(self) -> None:
        statuses = {case["public"]["status"] for case in CASES}
        assert statuses == {"queued", "running", "done", "failed", "canceled"}
