"""Progress POSTs: in order, each finished before the work goes on, and never fatal."""

from __future__ import annotations

import time
from typing import Any

from conftest import JOB_ID, VIDEO_KEY, Bucket, Recorder, dead_url, job_input

from worker.handler import Worker

STAGES = [
    {"progress": 0.0, "stage": "started"},
    {"progress": 0.1, "stage": "generating"},
    {"progress": 0.8, "stage": "uploading"},
]


def run(worker: Worker, payload: Any) -> dict[str, Any]:
    return worker.handle({"id": "rp-job-1", "input": payload})


class TestProgressPosts:
    def test_arrive_in_order_before_the_upload(self, worker: Worker, recorder: Recorder) -> None:
        # One recorder takes both the progress POSTs and the upload, so the order is theirs.
        payload: dict[str, Any] = {
            "contractVersion": 1,
            "jobId": JOB_ID,
            "prompt": "p",
            "imageUrl": None,
            "durationSec": 1,
            "seed": 7,
            "progressUrl": f"{recorder.url}/progress?token=t",
            "output": {"uploadUrl": f"{recorder.url}/upload", "objectKey": VIDEO_KEY},
        }

        answer = run(worker, payload)

        assert answer["jobId"] == JOB_ID
        calls = [(r.method, r.path.split("?")[0]) for r in recorder.received]
        assert calls == [("POST", "/progress")] * 3 + [("PUT", "/upload")]
        assert [r.json() for r in recorder.received[:3]] == STAGES
        assert recorder.received[0].headers["Content-Type"] == "application/json"

    def test_a_dead_progress_url_does_not_fail_the_job(
        self, worker: Worker, bucket: Bucket
    ) -> None:
        answer = run(worker, job_input(bucket, progressUrl=dead_url()))

        assert answer["jobId"] == JOB_ID and bucket.keys() != []

    def test_a_refusing_progress_url_does_not_fail_the_job(
        self, worker: Worker, bucket: Bucket, recorder: Recorder
    ) -> None:
        recorder.default = 500
        answer = run(worker, job_input(bucket, progressUrl=f"{recorder.url}/progress"))

        assert answer["jobId"] == JOB_ID and len(recorder.received) == 3

    def test_a_hanging_progress_url_costs_only_its_timeout(
        self, worker: Worker, bucket: Bucket, recorder: Recorder
    ) -> None:
        recorder.delay = 1.0
        worker.progress_timeout = 0.2
        started = time.monotonic()

        answer = run(worker, job_input(bucket, progressUrl=f"{recorder.url}/progress"))

        assert answer["jobId"] == JOB_ID
        # Three POSTs cut at 0.2 s each, plus the render and upload: well under three delays.
        assert time.monotonic() - started < 2.5


class TestRunPodProgress:
    def test_each_stage_is_also_given_to_the_sdk(self, worker: Worker, bucket: Bucket) -> None:
        given: list[tuple[str, dict[str, Any]]] = []
        worker.runpod_progress = lambda job: lambda body: given.append((job["id"], body))

        run(worker, job_input(bucket))

        assert given == [("rp-job-1", stage) for stage in STAGES]

    def test_off_runpod_the_sdk_is_not_called(self, worker: Worker, bucket: Bucket) -> None:
        from worker.handler import runpod_progress_for

        assert runpod_progress_for({"id": "rp-job-1"}) is None
