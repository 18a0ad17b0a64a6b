"""The worker as RunPod's SDK runs it: `python worker/handler.py --test_input '...'` in a real
subprocess, fed the README's example input, against moto's S3 server.

The SDK's local test mode (runpod/serverless/modules/rp_local.py) runs the handler once through
its own `run_job`, prints the result, and exits 1 when the result has an `error`.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from typing import Any

import av
from conftest import JOB_ID, POSTER_KEY, ROOT, VIDEO_KEY, Bucket, Recorder, fill_in, readme_example

from worker.contract import POSTER_CONTENT_TYPE, VIDEO_CONTENT_TYPE, WorkerInput
from worker.poster import MAX_POSTER_WIDTH

HANDLER = ROOT / "worker" / "handler.py"


def run_local_mode(job_input: Any, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "WORKER_"))}
    return subprocess.run(
        [sys.executable, str(HANDLER), "--test_input", json.dumps({"input": job_input})],
        cwd=ROOT / "worker",  # not the repository root: the script must find `worker` itself
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def printed(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


class TestReadmeExample:
    def test_is_a_complete_input(self) -> None:
        example = readme_example()
        parsed = WorkerInput.model_validate(example)
        # Every field in it is one the schema declares, and it declares nothing more.
        assert parsed.to_wire() == example
        assert set(WorkerInput.model_fields) == {
            name for name, info in WorkerInput.model_fields.items() if info.alias in example
        }

    def test_runs_in_the_sdk_local_mode(self, bucket: Bucket, recorder: Recorder) -> None:
        example = readme_example()
        result = run_local_mode(fill_in(example, bucket, recorder.url))

        assert result.returncode == 0, printed(result)
        assert "completed successfully" in result.stdout
        video, video_type = bucket.read(VIDEO_KEY)
        assert video_type == VIDEO_CONTENT_TYPE
        with av.open(io.BytesIO(video), "r") as container:
            stream = container.streams.video[0]
            assert stream.average_rate is not None
            assert float(stream.frames / stream.average_rate) == example["durationSec"]
        poster, poster_type = bucket.read(POSTER_KEY)
        assert poster_type == POSTER_CONTENT_TYPE
        with av.open(io.BytesIO(poster), "r") as image:
            assert image.format.name in {"jpeg_pipe", "image2"}
            frame = next(image.decode(video=0))
            assert 0 < frame.width <= MAX_POSTER_WIDTH
        stages = [r.json() for r in recorder.received if r.path.startswith("/progress")]
        assert stages == [
            {"progress": 0.0, "stage": "started"},
            {"progress": 0.1, "stage": "generating"},
            {"progress": 0.8, "stage": "uploading"},
        ]

    def test_prints_no_presigned_url_or_token(self, bucket: Bucket, recorder: Recorder) -> None:
        result = run_local_mode(fill_in(readme_example(), bucket, recorder.url))

        assert result.returncode == 0, printed(result)
        for leak in ("X-Amz-Signature", "X-Amz-Credential", "secret-token", recorder.url):
            assert leak not in printed(result)


class TestLocalModeFailures:
    def test_a_refusal_exits_1_with_the_echo(self, bucket: Bucket, recorder: Recorder) -> None:
        job_input = fill_in(readme_example(), bucket, recorder.url)
        job_input["durationSec"] = 61

        result = run_local_mode(job_input)

        assert result.returncode == 1
        error = re.search(r"failed with error: (\{.*\})$", result.stdout, re.MULTILINE)
        assert error, printed(result)
        assert json.loads(error.group(1))["jobId"] == JOB_ID
        assert bucket.keys() == []
        assert "X-Amz-Signature" not in printed(result)


class TestRunPodProgress:
    def test_progress_update_reaches_runpods_result_url(
        self, bucket: Bucket, recorder: Recorder
    ) -> None:
        """On RunPod the SDK posts progress to RUNPOD_WEBHOOK_POST_OUTPUT (rp_http.py)."""
        # A longer video gives the SDK's progress threads time to send before the process ends.
        job_input = fill_in(readme_example(), bucket, recorder.url) | {"durationSec": 10}
        del job_input["progressUrl"]

        result = run_local_mode(
            job_input, RUNPOD_WEBHOOK_POST_OUTPUT=f"{recorder.url}/job-done?id=$ID"
        )

        assert result.returncode == 0, printed(result)
        sent = [r for r in recorder.received if r.path.startswith("/job-done")]
        # progress_update sends from a daemon thread per call, so the last may be cut off when
        # the local test mode exits; the first has had the whole render to arrive.
        assert sent, printed(result)
        first = json.loads(sent[0].body)
        assert first["status"] == "IN_PROGRESS"
        assert first["output"] in [
            {"progress": 0.0, "stage": "started"},
            {"progress": 0.1, "stage": "generating"},
            {"progress": 0.8, "stage": "uploading"},
        ]
        assert "id=local_test" in sent[0].path  # the SDK's id for a local job
