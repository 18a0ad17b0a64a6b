"""POST /webhooks/runpod is served twice, like the hot reads (tests/test_fast_reads.py): by a
fast Starlette route that the entry layer answers first (middleware.py) and by its FastAPI
route (the schema's). Both must answer alike, byte for byte, access line included, for every
status.
"""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import WEBHOOK_SECRET
from tests.factories import completed, create, store_object
from tests.test_fast_reads import (
    REQUEST_ID,
    Call,
    assert_twins_agree,
    log_lines,
    twins,
)
from webhooks import sign_body

__all__ = ["log_lines"]  # the fixture, shared with test_fast_reads.py

PATH = "/webhooks/runpod"


def post(
    payload: Any, *, secret: str = WEBHOOK_SECRET, signed: bool = True, query: str = ""
) -> Call:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {**REQUEST_ID, "content-type": "application/json"}
    if signed:
        headers["x-runpod-signature"] = sign_body(secret, raw)
    return lambda client: client.post(PATH + query, content=raw, headers=headers)


async def running_job(client: Any, alice: dict[str, str]) -> str:
    """A job RunPod runs, its video in storage. `client` is a twin: an AppClient in all but type."""
    job_id = str((await create(client, alice)).json()["jobId"])
    user = (await client.app_state["jobs"].store.find_job(job_id)).user_id
    store_object(client, f"videos/{user}/{job_id}.mp4")
    return job_id


class TestWebhookTwins:
    async def test_a_job_finished_by_each_twin(self, settings, runpod, alice, log_lines) -> None:
        """The first COMPLETED changes the job, so each twin finishes a job of its own (RunPod's
        stand-in names both rp-1): the answers and log lines are the same but for the job id."""
        async with twins(settings) as (fast, framework):
            ours_id, theirs_id = await running_job(fast, alice), await running_job(fast, alice)
            log_lines.take()
            ours = await post(completed(ours_id))(fast)
            our_lines = log_lines.take()
            theirs = await post(completed(theirs_id))(framework)
            their_lines = [line.replace(theirs_id, ours_id) for line in log_lines.take()]
        assert (ours.status_code, ours.json()) == (200, {"jobId": ours_id, "status": "done"})
        assert (ours.headers.multi_items(), ours.content) == (
            theirs.headers.multi_items(),
            theirs.content.replace(theirs_id.encode(), ours_id.encode()),
        )
        assert our_lines == their_lines and our_lines

    async def test_replays_and_refusals(self, settings, runpod, alice, log_lines) -> None:
        async with twins(settings) as (fast, framework):
            job_id = await running_job(fast, alice)
            assert (await post(completed(job_id))(fast)).status_code == 200
            cases: list[tuple[Call, int]] = [
                (post(completed(job_id)), 200),  # a replay: the job is left as it is
                (post(completed(job_id), secret="not-the-secret"), 401),
                (post(completed(job_id), signed=False), 401),  # no proof at all
                (post(completed(job_id), signed=False, query=f"?jobId={job_id}&token=x"), 401),
                (post(b"{not json"), 400),
                (post({"id": "rp-9", "status": "COMPLETED"}), 404),  # no job has that id
                (post(completed("job_abcdefghijklmnop", "rp-9")), 404),
                (post({"id": "rp-1", "status": "COMPLETED", "pad": "x" * 2_000_000}), 413),
                (lambda client: client.get(PATH, headers=REQUEST_ID), 405),
            ]
            for call, status in cases:
                response = await assert_twins_agree(fast, framework, call, log_lines)
                assert response.status_code == status, (status, response.text)
                assert status == 200 or set(response.json()) == {"detail", "code"}
