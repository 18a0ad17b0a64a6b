"""Configuration rules: local mode falls back, production fails closed naming every problem."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from config import Settings, production_problems

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


def build(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


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


class TestEnvExample:
    def test_every_setting_is_in_env_example_and_nothing_else(self) -> None:
        """`.env.example` is the list of settings an operator reads: it must stay complete."""
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
        listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
        assert listed == {name.upper() for name in Settings.model_fields}
