"""Configuration rules: local mode falls back, production fails closed naming every problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from config import Settings, describe_invalid_settings, production_problems
from tests.servers import ROOT, clean_env, free_port
from tests.test_container import dockerfile_command

PEM = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"
COMPLETE = {
    "gateway_env": "production",
    "clerk_jwt_key": PEM,
    "runpod_api_key": "rp_live_key",
    "runpod_endpoint_id": "abc123",
    "runpod_webhook_secret": "s3cr3t-webhook-secret-value",
    "public_base_url": "https://api.cineweave.ai",
    "r2_account_id": "acct",
    "r2_access_key_id": "AKIA",
    "r2_secret_access_key": "secret",
    "r2_bucket": "videos",
    "convex_url": "https://happy-animal-123.convex.cloud",
    "convex_deploy_key": "prod:key",
}


def build(**values: Any) -> Settings:
    """Settings from strings, as the environment gives them: the validators parse them."""
    return Settings(_env_file=None, **values)


class TestLocal:
    def test_defaults_use_every_stand_in(self) -> None:
        settings = build()
        assert not (settings.uses_real_clerk or settings.uses_real_runpod)
        assert not (settings.uses_real_r2 or settings.uses_convex)
        assert settings.effective_signup_credits == 100

    def test_lists_are_comma_separated(self) -> None:
        settings = build(clerk_authorized_parties="https://a.io, https://b.io,")
        assert settings.clerk_authorized_parties == ["https://a.io", "https://b.io"]

    def test_one_line_pem_is_unescaped(self) -> None:
        assert build(clerk_jwt_key=PEM.replace("\n", "\\n")).clerk_jwt_key == PEM

    def test_jwks_url_defaults_to_the_issuer(self) -> None:
        settings = build(clerk_issuer="https://x.clerk.accounts.dev/")
        assert settings.jwks_url == "https://x.clerk.accounts.dev/.well-known/jwks.json"

    def test_polls_ask_the_stand_in_after_a_second_and_runpod_after_two_minutes(self) -> None:
        assert build().effective_reconcile_after_seconds == 1
        runpod = {"runpod_api_key": "rp", "runpod_endpoint_id": "ep"}
        assert build(**runpod).effective_reconcile_after_seconds == 120
        assert build(reconcile_after_seconds=7).effective_reconcile_after_seconds == 7

    def test_min_above_max_is_refused(self) -> None:
        with pytest.raises(ValidationError):
            build(min_duration_sec=5, max_duration_sec=4)


class TestProduction:
    def test_complete_config_starts_with_no_free_credits(self) -> None:
        settings = build(**COMPLETE)
        assert settings.is_production and settings.effective_signup_credits == 0

    def test_every_missing_setting_is_named_at_once(self) -> None:
        with pytest.raises(ValidationError) as raised:
            build(gateway_env="production")
        message = str(raised.value)
        names = ["RUNPOD_API_KEY", "RUNPOD_WEBHOOK_SECRET", "PUBLIC_BASE_URL", "R2_BUCKET"]
        names += ["CONVEX_URL", "CONVEX_DEPLOY_KEY", "CLERK_JWT_KEY or CLERK_ISSUER"]
        for name in names:
            assert name in message

    @pytest.mark.parametrize(
        ("field", "value", "problem"),
        [
            ("public_base_url", "http://api.cineweave.ai", "PUBLIC_BASE_URL must be an https URL"),
            ("clerk_jwt_key", "not a pem", "CLERK_JWT_KEY is not a PEM public key"),
            ("runpod_api_key", "change-me", "RUNPOD_API_KEY is still the .env.example placeholder"),
        ],
    )
    def test_malformed_values(self, field: str, value: str, problem: str) -> None:
        settings = build(**COMPLETE)
        bad = settings.model_copy(update={field: value})
        assert problem in production_problems(bad)
        with pytest.raises(ValidationError):
            build(**{**COMPLETE, field: value})


class TestSecrets:
    SECRETS = {
        "runpod_api_key": "rp_live_0123456789abcdef",
        "runpod_webhook_secret": "whsec-0123456789abcdef0123456789",
        "r2_access_key_id": "AKIA0123456789ABCDEF",
        "r2_secret_access_key": "r2-secret-0123456789abcdef",
        "convex_deploy_key": "prod:happy-animal-123|0123456789abcdef",
        "metrics_token": "metrics-0123456789abcdef",
    }

    def test_no_rendering_of_the_settings_shows_a_secret(self) -> None:
        settings = build(**{**COMPLETE, **self.SECRETS})
        for rendered in (repr(settings), str(settings), settings.model_dump_json()):
            for value in self.SECRETS.values():
                assert value not in rendered

    def test_the_log_redactor_gets_every_secret_value(self) -> None:
        settings = build(**{**COMPLETE, **self.SECRETS})
        assert sorted(settings.secret_values) == sorted(self.SECRETS.values())

    def test_a_placeholder_secret_is_still_refused_in_production(self) -> None:
        with pytest.raises(ValidationError, match="CONVEX_DEPLOY_KEY is still the .env.example"):
            build(**{**COMPLETE, "convex_deploy_key": "prod:change-me"})


class TestEnvExample:
    def test_every_setting_is_in_env_example_and_nothing_else(self) -> None:
        """`.env.example` is the list of settings an operator reads: it must stay complete."""
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
        listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
        assert listed == {name.upper() for name in Settings.model_fields}


def problems_of(**values: object) -> str:
    with pytest.raises(ValidationError) as raised:
        build(**values)
    return describe_invalid_settings(raised.value)


class TestMisconfigurationMessage:
    def test_production_lists_each_problem_on_its_own_line(self) -> None:
        lines = problems_of(gateway_env="production").splitlines()
        assert lines[0] == "Cannot start: production configuration is incomplete."
        assert "  - RUNPOD_API_KEY is missing" in lines and "  - R2_BUCKET is missing" in lines
        assert lines[-1].startswith("Set these in the environment or in .env")

    def test_a_bad_required_value_is_named_once(self) -> None:
        lines = problems_of(gateway_env="production", r2_bucket=["not", "a", "string"])
        assert [line for line in lines.splitlines() if "R2_BUCKET" in line] == [
            "  - R2_BUCKET must be a string"
        ]

    @pytest.mark.parametrize(
        ("values", "line"),
        [
            ({"max_duration_sec": "abc"}, "  - MAX_DURATION_SEC must be a whole number"),
            ({"max_duration_sec": 0}, "  - MAX_DURATION_SEC must be at least 1"),
            ({"reconciler_enabled": "maybe"}, "  - RECONCILER_ENABLED must be true or false"),
            ({"reconcile_after_seconds": 0}, "  - RECONCILE_AFTER_SECONDS must be more than 0"),
            ({"access_log": "s3cr3t"}, "  - ACCESS_LOG must be one of 'all' or 'errors'"),
            (
                {"min_duration_sec": 5, "max_duration_sec": 4},
                "  - MIN_DURATION_SEC must not exceed MAX_DURATION_SEC",
            ),
        ],
    )
    def test_names_settings_as_the_environment_does(self, values, line) -> None:
        message = problems_of(**values)
        assert line in message.splitlines()
        assert not any(name in message for name in values)  # no snake_case names
        assert "s3cr3t" not in message  # values are never repeated: they may be secrets


class TestMisconfiguredStart:
    """The Dockerfile's own command, started with settings that cannot serve."""

    def start(self, **settings: str) -> subprocess.CompletedProcess[str]:
        venv_bin = str(Path(sys.executable).parent)
        env = clean_env(PORT=str(free_port()), **settings)
        env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
        return subprocess.run(
            dockerfile_command(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    def test_production_without_settings_prints_one_message_and_exits_1(self) -> None:
        done = self.start(GATEWAY_ENV="production")
        assert done.returncode == 1
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert lines[0] == "Cannot start: production configuration is incomplete."
        assert "  - CONVEX_DEPLOY_KEY is missing" in lines
        assert "Traceback" not in done.stderr and len(lines) < 16

    def test_a_malformed_value_is_named_with_everything_else_missing(self) -> None:
        done = self.start(GATEWAY_ENV="production", MAX_DURATION_SEC="ten")
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        assert lines[:2] == [
            "Cannot start: the configuration is invalid, and production configuration is "
            "incomplete.",
            "  - MAX_DURATION_SEC must be a whole number",
        ]
        assert "  - RUNPOD_API_KEY is missing" in lines and "Traceback" not in done.stderr
