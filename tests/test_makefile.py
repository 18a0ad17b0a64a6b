"""`make convex-deploy`: it refuses without its settings, and sets the issuer before the push.

No Convex deployment can be reached from here, so `npx` is replaced on PATH by a script that
only records its arguments and the deploy key it was given. The commands themselves (flags,
which deployment a deploy key selects) were checked against the `convex` package's CLI source,
as the Makefile's comment says; the README lists what was never run against a real deployment.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.servers import ROOT, clean_env

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
