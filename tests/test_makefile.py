"""The Makefile as a new user meets it: `make help`, `make token`, `make run`, the README's
walk-through run as written against `make run` on loopback, and `make convex-deploy`."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import jwt
import pytest

from tests.factories import jpeg_size
from tests.servers import ROOT, clean_env, free_port, wait_until_healthy

pytestmark = pytest.mark.e2e


def make_env(**settings: str) -> dict[str, str]:
    """A user's shell: none of the outer `make test`'s flags leak into the `make` under test."""
    env = clean_env(**settings)
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)
    return env


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env=env or make_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextmanager
def make_run(port: int, env: dict[str, str]) -> Iterator[str]:
    """`make run PORT=port` in its own process group, so uvicorn stops with it."""
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"PORT={port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def walkthrough() -> str:
    """The README's walk-through: the first bash block after its introduction."""
    text = (ROOT / "README.md").read_text()
    start = text.index("In a second terminal, walk through a job:")
    match = re.search(r"```bash\n(.*?)```", text[start:], re.DOTALL)
    assert match, "the README has no walk-through"
    return match.group(1)


def shown_outputs(script: str) -> list[re.Pattern[str]]:
    """The walk-through's `# {...}` and `# 204` lines, each what a command prints, `…` standing
    for anything."""
    shown = re.findall(r"^# (\{.*\}|[0-9]{3})$", script, re.MULTILINE)
    return [re.compile(".*?".join(re.escape(part) for part in line.split("…"))) for line in shown]


def as_printed(value: Any) -> str:
    """A JSON body as the gateway writes it (Starlette's JSONResponse): compact, UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_values(output: str) -> list[Any]:
    """The JSON bodies curl printed one after another, with no newline between them."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while position < len(output):
        if output[position].isspace():
            position += 1
            continue
        value, position = decoder.raw_decode(output, position)
        values.append(value)
    return values


class TestHelp:
    def test_lists_the_commands_and_how_to_pass_them(self) -> None:
        done = make("help")
        assert done.returncode == 0
        assert "make run PORT=8001" in done.stdout
        assert "make token USER_ID=user_alice" in done.stdout
        assert "USER=" not in done.stdout.replace("USER_ID=", "")


class TestToken:
    def test_user_id_names_the_user(self, tmp_path: Path) -> None:
        done = make("token", "USER_ID=user_bob", env=make_env(LOCAL_DATA_DIR=str(tmp_path)))
        assert done.returncode == 0, done.stderr
        claims = jwt.decode(done.stdout.strip(), options={"verify_signature": False})
        assert claims["sub"] == "user_bob"

    def test_user_is_refused_naming_what_works(self, tmp_path: Path) -> None:
        """USER is the shell's login name: taking it silently would mint for someone else."""
        done = make("token", "USER=user_bob", env=make_env(LOCAL_DATA_DIR=str(tmp_path)))
        assert done.returncode != 0 and done.stdout == ""
        assert "make token USER_ID=user_bob" in done.stderr


class TestRun:
    def test_a_taken_port_is_one_line_saying_what_to_do(self, tmp_path: Path) -> None:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            done = make("run", f"PORT={port}", env=make_env(LOCAL_DATA_DIR=str(tmp_path)))
        assert done.returncode != 0 and done.stdout == ""
        first = done.stderr.splitlines()[0]
        assert first == (
            f"Port {port} is in use: stop what holds it, "
            f"or run on another with make run PORT={port + 1}"
        )
        assert "startup" not in done.stderr and "Errno" not in done.stderr

    @pytest.mark.parametrize("port", ["abc", "", "70000"])
    def test_a_port_that_is_no_port_is_one_line(self, tmp_path: Path, port: str) -> None:
        done = make("run", f"PORT={port}", env=make_env(LOCAL_DATA_DIR=str(tmp_path)))
        assert done.returncode != 0
        assert done.stderr.splitlines()[0] == (
            f"PORT must be a number from 1 to 65535, not {port!r}: make run PORT=8001"
        )

    def test_the_readme_walkthrough_works_as_written(self, tmp_path: Path) -> None:
        port = free_port()
        env = make_env(LOCAL_DATA_DIR=str(tmp_path / "data"), TMPDIR=str(tmp_path))
        script = walkthrough().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        with make_run(port, env):
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert done.returncode == 0, done.stderr
        printed = json_values(done.stdout)
        before, first_poll, second_poll, after, from_image, deleted, gone, url = printed
        assert before == {"credits": 100, "plan": "starter"}
        assert first_poll["status"] == "running"
        assert first_poll["stage"] in ("started", "generating", "uploading")
        assert 0 <= first_poll["progress"] < 1
        assert second_poll["status"] == "done" and second_poll["posterUrl"]
        assert after == {"credits": 95, "plan": "starter"}
        # The upload's PUT answers no body; the job from the uploaded PNG rendered.
        assert (from_image["status"], from_image["cost"]) == ("done", 2), from_image
        assert "/_local/storage/uploads/user_alice/upl_" in from_image["imageUrl"]
        # Step 10: deleted, then a 404 for the job and for its video's URL.
        assert (deleted, url) == (204, 404)
        assert gone == {"detail": "Job not found", "code": "NOT_FOUND"}
        # What the README shows each command printing is what it printed.
        shown = shown_outputs(script)
        assert len(shown) == len(printed)
        for pattern, value in zip(shown, printed, strict=True):
            assert pattern.fullmatch(as_printed(value)), (pattern.pattern, as_printed(value))
        # The poster: a real JPEG of the video's size.
        assert jpeg_size((tmp_path / "poster.jpg").read_bytes()) == (320, 180)
        # The video lands outside the checkout, and plays for the asked 5 seconds.
        assert not (ROOT / "video.mp4").exists()
        with av.open(io.BytesIO((tmp_path / "video.mp4").read_bytes()), "r") as video:
            assert video.duration is not None
            assert abs(video.duration / av.time_base - 5) < 0.3


# --- make convex-deploy -------------------------------------------------------------------
# No Convex deployment can be reached from here, so `npx` is replaced on PATH by a script that
# only records its arguments and the deploy key it was given. The commands themselves (flags,
# which deployment a deploy key selects) were checked against the `convex` package's CLI source.


KEY = "prod:happy-animal-123|0123456789abcdef"
ISSUER = "https://clerk.cineweave.ai"

RECORDING_NPX = """#!/bin/sh
printf '%s|%s\\n' "$*" "$CONVEX_DEPLOY_KEY" >> "$NPX_LOG"
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npx = bin_dir / "npx"
    npx.write_text(RECORDING_NPX)
    npx.chmod(0o755)
    return bin_dir


def make_deploy(fake_bin: Path, **settings: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    log = fake_bin.parent / "npx.log"
    env = clean_env(NPX_LOG=str(log), **settings)  # no CONVEX_* or CLERK_* but these
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    # `-o`: never (re)install node_modules from here; the target's own steps are under test.
    command = ["make", "-s", "-o", "node_modules/.installed", "convex-deploy"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return done, log


class TestConvexDeploy:
    def test_refuses_without_settings_naming_both_and_runs_nothing(self, fake_bin: Path) -> None:
        done, log = make_deploy(fake_bin)
        assert done.returncode != 0
        assert "CONVEX_DEPLOY_KEY" in done.stderr
        assert "CLERK_ISSUER" in done.stderr
        assert not log.exists()

    @pytest.mark.parametrize(
        ("settings", "named"),
        [
            ({"CONVEX_DEPLOY_KEY": KEY}, "CLERK_ISSUER"),
            ({"CLERK_ISSUER": ISSUER}, "CONVEX_DEPLOY_KEY"),
            # A dev key would push to the dev deployment; a bare secret selects nothing.
            ({"CONVEX_DEPLOY_KEY": "dev:happy-animal-123|x", "CLERK_ISSUER": ISSUER}, "prod:"),
            ({"CONVEX_DEPLOY_KEY": KEY, "CLERK_ISSUER": "http://clerk.local"}, "https"),
        ],
    )
    def test_refuses_an_incomplete_or_wrong_setting(
        self, fake_bin: Path, settings: dict[str, str], named: str
    ) -> None:
        done, log = make_deploy(fake_bin, **settings)
        assert done.returncode != 0
        assert named in done.stderr
        assert not log.exists()

    def test_sets_the_issuer_then_deploys_with_the_key(self, fake_bin: Path) -> None:
        done, log = make_deploy(fake_bin, CONVEX_DEPLOY_KEY=KEY, CLERK_ISSUER=ISSUER)
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines() == [
            f"convex env set CLERK_JWT_ISSUER_DOMAIN {ISSUER}|{KEY}",
            f"convex deploy|{KEY}",
        ]


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements file, by lower-cased name without extras."""
    found = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            found[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return found


class TestRunRequirements:
    """`make run` installs requirements-local.txt: requirements.txt's pins, less the clients of
    the real backends, plus the stand-in's encoder."""

    def test_every_shared_package_is_pinned_as_in_production(self) -> None:
        local, production = pins(ROOT / "requirements-local.txt"), pins(ROOT / "requirements.txt")
        assert {name: local[name] for name in production.keys() & local.keys()} == {
            name: production[name] for name in production.keys() & local.keys()
        }

    def test_only_the_real_backends_clients_are_left_out(self) -> None:
        local, production = pins(ROOT / "requirements-local.txt"), pins(ROOT / "requirements.txt")
        assert production.keys() - local.keys() == {"boto3", "convex"}
        assert local.keys() - production.keys() == {"av"}
