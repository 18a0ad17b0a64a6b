"""Operator commands, run as the README shows them, against a real SQLite store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT, clean_env, manage


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return clean_env(GATEWAY_ENV="local", LOCAL_DATA_DIR=str(tmp_path / "data"))


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "manage.py", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


class TestShow:
    def test_an_unknown_user_is_reported_and_not_created(self, env: dict[str, str]) -> None:
        shown = run(env, "show", "user_nobody")
        assert shown.returncode == 1
        assert "user_nobody: no such user" in shown.stderr
        # Looking created nobody: no signup credits were granted behind the operator's back.
        assert manage(env, "audit") == "audit: 0 users, 0 problems"
        again = run(env, "show", "user_nobody")
        assert again.returncode == 1

    def test_a_known_user_shows_the_balance(self, env: dict[str, str]) -> None:
        manage(env, "grant", "user_known", "7", "--reason", "test")
        shown = manage(env, "show", "user_known")
        assert shown.startswith("user_known: 107 credits (starter)")


class TestAudit:
    def test_counts_users_and_exits_0_on_each_store(
        self, env: dict[str, str], store_env: dict[str, str]
    ) -> None:
        # On Convex the audit walks its pages across calls (`convex_client.py`); the output and
        # the exit code are the same as on SQLite.
        env = {**env, **store_env}
        manage(env, "grant", "user_a", "7", "--reason", "test")
        manage(env, "grant", "user_b", "3", "--reason", "test")
        done = run(env, "audit")
        assert (done.returncode, done.stdout) == (0, "audit: 2 users, 0 problems\n")

    def test_exits_1_and_names_each_problem(self, env: dict[str, str]) -> None:
        manage(env, "grant", "user_a", "7", "--reason", "test")
        database = Path(env["LOCAL_DATA_DIR"]) / "gateway.db"
        with sqlite3.connect(database) as db:
            db.execute("UPDATE users SET credits = 1 WHERE user_id = 'user_a'")
        done = run(env, "audit")
        assert done.returncode == 1
        assert done.stdout.splitlines()[-1] == "audit: 1 users, 1 problems"
        assert done.stdout.startswith("user_a: balance 1 != grants 107")
