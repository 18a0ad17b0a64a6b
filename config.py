"""Settings: one `Settings` object read from the environment (and `.env`).

In `local` mode every backend whose settings are present is used for real and the rest fall back
to the embedded defaults (SQLite, a local directory, the RunPod stand-in, a dev issuer). In
`production` every backend must be real, and a missing or placeholder setting stops start-up.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Values `.env.example` ships with; a production deploy that still has one is misconfigured.
PLACEHOLDER_MARKERS = ("change-me", "changeme", "your-", "<", "xxx", "example.com/placeholder")


class Environment(StrEnum):
    LOCAL = "local"
    PRODUCTION = "production"


class AccessLog(StrEnum):
    ALL = "all"
    ERRORS = "errors"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class Settings(BaseSettings):
    # Empty values in .env mean "not set", so an untouched copy of .env.example is valid locally.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, env_ignore_empty=True
    )

    gateway_env: Environment = Environment.LOCAL

    # Clerk
    clerk_issuer: str | None = None
    clerk_jwks_url: str | None = None
    clerk_jwt_key: str | None = None
    clerk_authorized_parties: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # RunPod
    runpod_api_key: SecretStr | None = None
    runpod_endpoint_id: str | None = None
    runpod_api_base: str = "https://api.runpod.ai/v2"
    runpod_webhook_secret: SecretStr | None = None
    public_base_url: str | None = None

    # Cloudflare R2
    r2_account_id: str | None = None
    r2_access_key_id: SecretStr | None = None
    r2_secret_access_key: SecretStr | None = None
    r2_bucket: str | None = None
    r2_endpoint_url: str | None = None

    # Convex
    convex_url: str | None = None
    convex_deploy_key: SecretStr | None = None

    # Limits
    max_concurrent_jobs: int = Field(default=5, ge=1)
    credits_per_second: int = Field(default=1, ge=0)
    min_duration_sec: int = Field(default=1, ge=1)
    max_duration_sec: int = Field(default=10, ge=1)
    # A day: the lifetime the web app promises for a download link. R2 allows up to 7 days.
    signed_url_ttl_seconds: int = Field(default=86_400, ge=60, le=7 * 86_400)
    signup_credits: int | None = Field(default=None, ge=0)
    default_plan: str = "starter"
    image_url_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Direct uploads (uploads.py). 10 MiB holds any photo a phone takes; the worker fetches a
    # start image of at most 20 MiB (worker/transfer.py), so no larger limit could ever be used.
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1, le=20 * 1024 * 1024)
    # Uploads whose 15-minute URL is still live, per user: enough for a few tries at once,
    # few enough that one user cannot mint URLs (and R2 objects) without bound.
    max_pending_uploads: int = Field(default=10, ge=1)
    # Width and height, each, read from the image's header: 4096 is past any video model's
    # input, and keeps a decompression bomb (a tiny file declaring 60000x60000) from the worker.
    max_image_dimension_px: int = Field(default=4096, ge=1)
    # RunPod forgets a job `ttl` after submission, whatever its state. An hour, not RunPod's day:
    # a job whose submission outcome is unknown is refunded only once it can no longer run.
    runpod_job_ttl_seconds: int = Field(default=3_600, ge=10)
    runpod_execution_timeout_seconds: int = Field(default=600, ge=5)

    # Reconciler: a job with no news for this long is checked with RunPod (lost webhooks), by
    # the reconciler or by a poll. Unset: see `effective_reconcile_after_seconds`.
    reconcile_after_seconds: float | None = Field(default=None, gt=0)
    reconcile_interval_seconds: float = Field(default=30, gt=0)
    reconciler_enabled: bool = True

    # Event streams (events.py)
    # A comment this often keeps proxies from closing a quiet stream (many cut at 30-60 s idle).
    stream_keepalive_seconds: float = Field(default=15, gt=0)
    # A stream ends with a `reconnect` event after this long: below Cloud Run's request timeout
    # (300 s by default; deploy with --timeout=3600 and set 3540), so no client sees a cut.
    stream_max_seconds: float = Field(default=270, gt=0)
    # Each instance reads the jobs changed since its last look this often, once for all of its
    # streams: a change anywhere reaches every stream within about this, plus the store's read.
    stream_poll_interval_seconds: float = Field(default=0.5, gt=0)
    # Open streams a user may hold (a page per tab, each with one per-user stream, say) and an
    # instance may hold (each costs memory; keep it under Cloud Run's --concurrency).
    streams_per_user: int = Field(default=10, ge=10)
    streams_per_instance: int = Field(default=900, ge=1)

    # Operations
    # Required as `Authorization: Bearer <token>` on /metrics; without it, production serves no
    # /metrics at all (the service is public) and local mode serves it openly.
    metrics_token: SecretStr | None = None
    # Names the Cloud Trace project in log lines; Cloud Run does not set it by itself.
    google_cloud_project: str | None = None
    # Unset: JSON for Cloud Logging in production, text for a terminal locally. Set `json` to
    # see locally exactly the lines production writes.
    log_format: LogFormat | None = None
    # `all`: one access line per request (what the gateway adds to Cloud Run's own request log is
    # the request id and the route). `errors`: only answers of 400 and up, for operators who rely
    # on Cloud Run's request log for the rest; it saves ~45 µs of CPU a request (bench/PROFILE.md).
    access_log: AccessLog = AccessLog.ALL
    # Browser origins (scheme://host[:port]) the web app calls from. Empty sends no CORS headers,
    # so only same-origin pages and non-browser clients can read answers.
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Local mode
    local_data_dir: Path = Path("./.data")
    # How long the RunPod stand-in "renders" a job before it completes.
    local_render_seconds: float = Field(default=3.0, ge=0)

    @field_validator(
        "clerk_authorized_parties", "image_url_allowed_hosts", "cors_allow_origins", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("clerk_jwt_key")
    @classmethod
    def _unescape_pem(cls, value: str | None) -> str | None:
        # Env files and secret managers often hold a PEM on one line with literal "\n"s.
        return value.replace("\\n", "\n") if value else value

    @field_validator("image_url_allowed_hosts")
    @classmethod
    def _lower_hosts(cls, value: list[str]) -> list[str]:
        return [host.lower().rstrip(".") for host in value]

    @field_validator("cors_allow_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        return [cors_origin(origin) for origin in value]

    @model_validator(mode="after")
    def _check_complete(self) -> Settings:
        if self.min_duration_sec > self.max_duration_sec:
            raise ValueError("MIN_DURATION_SEC must not exceed MAX_DURATION_SEC")
        if self.gateway_env is Environment.PRODUCTION:
            problems = production_problems(self)
            if problems:
                raise IncompleteProductionConfig(problems)
        return self

    @property
    def secret_values(self) -> tuple[str, ...]:
        """Every secret that is set, for the log redactor; a repr shows them as `**********`."""
        secrets = (getattr(self, name) for name in SECRET_FIELDS)
        return tuple(secret.get_secret_value() for secret in secrets if secret)

    @property
    def is_production(self) -> bool:
        return self.gateway_env is Environment.PRODUCTION

    @property
    def json_logs(self) -> bool:
        if self.log_format is not None:
            return self.log_format is LogFormat.JSON
        return self.is_production

    @property
    def effective_signup_credits(self) -> int:
        # Free credits are a local convenience; production grants nothing unless told to.
        if self.signup_credits is not None:
            return self.signup_credits
        return 0 if self.is_production else 100

    @property
    def effective_reconcile_after_seconds(self) -> float:
        """RunPod's `/status` is rate-limited and a webhook usually comes: ask after 2 minutes.
        The in-process stand-in costs nothing to ask: after 1 s, so that a poll shows a job
        `running` while it renders (RunPod's webhook comes only when a job ends)."""
        if self.reconcile_after_seconds is not None:
            return self.reconcile_after_seconds
        return 120 if self.uses_real_runpod else 1

    @property
    def uses_real_clerk(self) -> bool:
        return bool(self.clerk_jwt_key or self.clerk_jwks_url or self.clerk_issuer)

    @property
    def uses_real_runpod(self) -> bool:
        return bool(self.runpod_api_key and self.runpod_endpoint_id)

    @property
    def uses_real_r2(self) -> bool:
        return bool(self.r2_access_key_id and self.r2_secret_access_key and self.r2_bucket)

    @property
    def uses_convex(self) -> bool:
        return bool(self.convex_url and self.convex_deploy_key)

    @property
    def jwks_url(self) -> str | None:
        if self.clerk_jwks_url:
            return self.clerk_jwks_url
        if self.clerk_issuer:
            return self.clerk_issuer.rstrip("/") + "/.well-known/jwks.json"
        return None

    @property
    def r2_endpoint(self) -> str | None:
        if self.r2_endpoint_url:
            return self.r2_endpoint_url
        if self.r2_account_id:
            return f"https://{self.r2_account_id}.r2.cloudflarestorage.com"
        return None


class IncompleteProductionConfig(ValueError):
    """Production settings that cannot serve: each problem names its environment variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("production configuration is incomplete: " + "; ".join(problems))


# Each is a `SecretStr`: read it with `.get_secret_value()` where it is sent, nowhere else.
SECRET_FIELDS = (
    "runpod_api_key",
    "runpod_webhook_secret",
    "r2_access_key_id",
    "r2_secret_access_key",
    "convex_deploy_key",
    "metrics_token",
)

REQUIRED_IN_PRODUCTION = (
    "runpod_api_key",
    "runpod_endpoint_id",
    "runpod_webhook_secret",
    "public_base_url",
    "r2_access_key_id",
    "r2_secret_access_key",
    "r2_bucket",
    "convex_url",
    "convex_deploy_key",
)


def revealed(secret: SecretStr | None) -> str | None:
    """The value of a secret setting that may be unset, for the one place that sends it."""
    return secret.get_secret_value() if secret else None


def cors_origin(value: str) -> str:
    """`value` as a browser sends it in `Origin` (lowercase, no trailing slash), or `*`."""
    if value == "*":
        return value
    parts = urlsplit(value)
    path = parts.path.rstrip("/")  # a pasted "https://app.example/" still names an origin
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"CORS_ALLOW_ORIGINS entry {value!r} is not an http(s) origin")
    if path or parts.query or parts.fragment or "@" in parts.netloc or not _has_valid_port(value):
        raise ValueError(f"CORS_ALLOW_ORIGINS entry {value!r} must be scheme://host[:port] only")
    return f"{parts.scheme}://{parts.netloc}".lower()


def _has_valid_port(url: str) -> bool:
    try:
        port = urlsplit(url).port  # raises on a port that is not a number from 0 to 65535
    except ValueError:
        return False
    return port != 0


def _is_placeholder(value: str) -> bool:
    lowered = value.lower()
    return any(marker in lowered for marker in PLACEHOLDER_MARKERS)


def production_problems(settings: Settings) -> list[str]:
    """Every reason `settings` cannot serve production, so one start-up names them all."""
    problems: list[str] = []
    for name in REQUIRED_IN_PRODUCTION:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not value:
            problems.append(f"{name.upper()} is missing")
        elif _is_placeholder(value):
            problems.append(f"{name.upper()} is still the .env.example placeholder")
    if not (settings.clerk_jwt_key or settings.jwks_url):
        problems.append("CLERK_JWT_KEY or CLERK_ISSUER (or CLERK_JWKS_URL) is missing")
    if not (settings.r2_account_id or settings.r2_endpoint_url):
        problems.append("R2_ACCOUNT_ID (or R2_ENDPOINT_URL) is missing")
    key = settings.clerk_jwt_key
    if key and "-----BEGIN PUBLIC KEY-----" not in key:
        problems.append("CLERK_JWT_KEY is not a PEM public key")
    base = settings.public_base_url
    if base and urlsplit(base).scheme != "https":
        problems.append("PUBLIC_BASE_URL must be an https URL")
    if "*" in settings.cors_allow_origins:
        # Any site could then read answers to requests carrying a user's Authorization header.
        problems.append("CORS_ALLOW_ORIGINS must name the web app's origins, not *")
    return problems


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_or_exit() -> Settings:
    """The settings, or exit 1 with one message that names every problem (no traceback)."""
    try:
        return get_settings()
    except ValidationError as exc:
        raise SystemExit(describe_invalid_settings(exc)) from None


# pydantic's error kinds, said of an environment variable.
_SETTING_MESSAGES = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "enum": "must be one of {expected}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
}


def describe_invalid_settings(exc: ValidationError) -> str:
    """What is wrong, one line per problem, by environment names; never a value (secrets)."""
    invalid, incomplete = _sorted_problems(exc)
    if invalid and not incomplete:  # pydantic stopped before the completeness check
        incomplete = _unreached_problems(exc)
    headings = {
        (True, False): "Cannot start: the configuration is invalid.",
        (False, True): "Cannot start: production configuration is incomplete.",
        (True, True): "Cannot start: the configuration is invalid, and production configuration "
        "is incomplete.",
    }
    lines = [headings[bool(invalid), bool(incomplete)]]
    lines += [f"  - {problem}" for problem in invalid + incomplete]
    lines.append("Set these in the environment or in .env; .env.example describes each one.")
    return "\n".join(lines)


def _sorted_problems(exc: ValidationError) -> tuple[list[str], list[str]]:
    """Bad values, and what production lacks."""
    invalid: list[str] = []
    incomplete: list[str] = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, IncompleteProductionConfig):
            incomplete += cause.problems
        elif isinstance(cause, ValueError):  # our validators already name the variable
            invalid.append(str(cause))
        else:
            invalid.append(_setting_problem(error))
    return invalid, incomplete


def _unreached_problems(exc: ValidationError) -> list[str]:
    """What production lacks besides the bad values, which pydantic checks only once every value
    parsed: the settings are built again with each bad value at its default."""
    bad = {str(error["loc"][0]) for error in exc.errors() if error.get("loc")}
    fields = Settings.model_fields
    defaults = {name: fields[name].get_default(call_default_factory=True) for name in bad}
    try:
        Settings(**defaults)
    except ValidationError as again:
        _, incomplete = _sorted_problems(again)
        # A bad required value is named once, for its value, not again as missing.
        return [problem for problem in incomplete if problem.split()[0].lower() not in bad]
    return []


def _setting_problem(error: Any) -> str:
    name = ".".join(str(part) for part in error.get("loc", ())).upper() or "A setting"
    template = _SETTING_MESSAGES.get(error.get("type", ""))
    if template is None:
        return f"{name}: {error.get('msg', 'is not valid')}"
    # A bound of 0.0 reads as 0 to a person.
    ctx = {
        key: int(value) if isinstance(value, float) and value.is_integer() else value
        for key, value in (error.get("ctx") or {}).items()
    }
    return f"{name} {template.format(**ctx)}"
