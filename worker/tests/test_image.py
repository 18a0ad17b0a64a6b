"""The worker's image as RunPod runs it, checked without a Docker engine: a clean Dockerfile,
and its CMD run on exactly the files the Dockerfile copies, from a venv of requirements.txt.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import JOB_ID, VIDEO_KEY, WORKER_DIR, Bucket, Recorder, fill_in, readme_example

DOCKERFILE = WORKER_DIR / "Dockerfile"


def dockerfile_lines() -> list[str]:
    return DOCKERFILE.read_text().replace("\\\n", " ").splitlines()


def image_command() -> list[str]:
    cmds = [line[len("CMD") :].strip() for line in dockerfile_lines() if line.startswith("CMD")]
    command = json.loads(cmds[-1])  # shell form is not JSON: it would fail here
    assert isinstance(command, list)
    return command


def image_app(tmp_path: Path) -> Path:
    """A copy of the image's /app: what `COPY *.py ./worker/` takes, past .dockerignore."""
    ignored = (WORKER_DIR / ".dockerignore").read_text().split()
    app = tmp_path / "app"
    (app / "worker").mkdir(parents=True)
    for path in WORKER_DIR.glob("*.py"):
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in ignored):
            shutil.copy2(path, app / "worker" / path.name)
    return app


class TestDockerfile:
    def test_hadolint_reports_nothing(self) -> None:
        hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
        assert hadolint, "hadolint is missing: it is pinned in worker/requirements-test.txt"
        result = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_runs_as_a_numeric_non_root_user(self) -> None:
        users = [line.split()[1] for line in dockerfile_lines() if line.startswith("USER")]
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0

    def test_installs_requirements_txt_only_and_no_weights(self) -> None:
        copies = [line for line in dockerfile_lines() if line.startswith("COPY")]
        assert copies == [
            "COPY requirements.txt .",
            "COPY --from=build /venv /venv",
            "COPY *.py ./worker/",
        ]


class TestImageCommand:
    def test_runs_a_job_from_the_copied_files_alone(
        self, tmp_path: Path, bucket: Bucket, recorder: Recorder
    ) -> None:
        app = image_app(tmp_path)
        assert not (app / "worker" / "tests").exists()
        job = {"input": fill_in(readme_example(), bucket, recorder.url)}
        python, *args = image_command()
        assert python == "python"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "WORKER_"))}

        result = subprocess.run(
            [sys.executable, *args, "--test_input", json.dumps(job)],
            cwd=app,
            env=env | {"PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )

        assert result.returncode == 0, result.stdout + result.stderr
        assert VIDEO_KEY in bucket.keys()
        assert JOB_ID in result.stdout
