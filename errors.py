"""The gateway's error family: every expected failure is a `GatewayError` with a code and status.

One handler in `http_errors.py` renders them all as `{"detail": ..., "code": ...}`; anything
else that escapes a route is a bug and becomes a bare 500 `INTERNAL_ERROR`.
"""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    status_code = 500
    code = "INTERNAL_ERROR"
    detail = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.detail = detail or self.detail
        self.code = code or self.code
        self.status_code = status_code or self.status_code
        self.headers = dict(headers or {})
        super().__init__(self.detail)


class InvalidRequest(GatewayError):
    status_code = 400
    code = "INVALID_REQUEST"
    detail = "Invalid request"
    # One {"field", "message"} per bad field, when there are any: the body's `errors` list.
    errors: list[dict[str, str]] | None = None


class Unauthorized(GatewayError):
    status_code = 401
    code = "UNAUTHORIZED"
    detail = "Missing or invalid session token"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class InvalidSignature(GatewayError):
    status_code = 401
    code = "INVALID_SIGNATURE"
    detail = "Webhook proof is missing or invalid"


class InsufficientCredits(GatewayError):
    status_code = 402
    code = "INSUFFICIENT_CREDITS"
    detail = "Insufficient credits"


class Forbidden(GatewayError):
    status_code = 403
    code = "FORBIDDEN"
    detail = "Forbidden"


class NotFound(GatewayError):
    status_code = 404
    code = "NOT_FOUND"
    detail = "Not found"


class MethodNotAllowed(GatewayError):
    status_code = 405
    code = "METHOD_NOT_ALLOWED"
    detail = "Method not allowed"

    def __init__(self, detail: str | None = None, headers_allow: str | None = None) -> None:
        super().__init__(detail, headers={"Allow": headers_allow} if headers_allow else None)


class JobNotCancelable(GatewayError):
    status_code = 409
    code = "JOB_NOT_CANCELABLE"
    detail = "The job has already finished"


class JobNotDeletable(GatewayError):
    status_code = 409
    code = "JOB_NOT_DELETABLE"
    detail = "The job is still queued or running: cancel it first"


class IdempotencyKeyReused(GatewayError):
    status_code = 409
    code = "IDEMPOTENCY_KEY_REUSED"
    detail = "This Idempotency-Key was used with a different request"


class IdempotencyKeyInUse(GatewayError):
    status_code = 409
    code = "IDEMPOTENCY_KEY_IN_USE"
    detail = "A request with this Idempotency-Key is still in progress"

    def __init__(self, detail: str | None = None, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class PayloadTooLarge(GatewayError):
    status_code = 413
    code = "PAYLOAD_TOO_LARGE"
    detail = "Request body is too large"


class TooManyActiveJobs(GatewayError):
    status_code = 429
    code = "TOO_MANY_ACTIVE_JOBS"
    detail = "Too many active jobs"

    def __init__(self, detail: str | None = None, retry_after: int = 10) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class TooManyStreams(GatewayError):
    status_code = 429
    code = "TOO_MANY_STREAMS"
    detail = "Too many open event streams"

    # A stream frees its place when its client goes: a second is enough to try again.
    def __init__(self, detail: str | None = None, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class UpstreamError(GatewayError):
    """An upstream refused the request for a reason retrying will not fix."""

    status_code = 502
    code = "UPSTREAM_ERROR"
    detail = "An upstream service refused the request"


class UpstreamUnavailable(GatewayError):
    """An upstream timed out, failed, or rate-limited us: the client may retry later."""

    status_code = 503
    code = "UPSTREAM_UNAVAILABLE"
    detail = "An upstream service is unavailable"

    def __init__(self, detail: str | None = None, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class AuthUnavailable(GatewayError):
    status_code = 503
    code = "AUTH_UNAVAILABLE"
    detail = "Signing keys are unavailable"

    def __init__(self, detail: str | None = None, retry_after: int = 30) -> None:
        # The JWKS is refetched at most every 30 s, so sooner retries cannot succeed.
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class StoreUnavailable(GatewayError):
    status_code = 503
    code = "STORE_UNAVAILABLE"
    detail = "The job store is unavailable"

    def __init__(self, detail: str | None = None, retry_after: int = 2) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class InvalidCursor(GatewayError):
    status_code = 400
    code = "INVALID_CURSOR"
    detail = "The cursor is malformed"


# --- Uploads (uploads.py) ---------------------------------------------------------------------


class UploadNotFound(NotFound):
    """An unknown upload id, or another user's: the same answer, so ids cannot be probed."""

    code = "UPLOAD_NOT_FOUND"
    detail = "Upload not found"


class TooManyPendingUploads(GatewayError):
    status_code = 429
    code = "TOO_MANY_PENDING_UPLOADS"
    detail = "Too many uploads are pending"

    def __init__(self, detail: str | None = None, retry_after: int = 60) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class UploadRefused(GatewayError):
    """An upload a job cannot use; each reason has its own code, and nothing is charged."""

    status_code = 400
    code = "UPLOAD_INVALID"
    detail = "The upload cannot be used"


class UploadExpired(UploadRefused):
    code = "UPLOAD_EXPIRED"
    detail = "The upload has expired: upload the image again"


class UploadIncomplete(UploadRefused):
    code = "UPLOAD_INCOMPLETE"
    detail = "Nothing has been uploaded to this upload's URL yet"


class UploadSizeMismatch(UploadRefused):
    code = "UPLOAD_SIZE_MISMATCH"
    detail = "The uploaded file's size is not the declared sizeBytes"


class ImageTypeMismatch(UploadRefused):
    code = "IMAGE_TYPE_MISMATCH"
    detail = "The uploaded bytes are not the declared contentType"


class ImageTooLarge(UploadRefused):
    code = "IMAGE_TOO_LARGE"
    detail = "The image's pixel dimensions are over the limit"
