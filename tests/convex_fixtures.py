"""Every answer shape a Convex deployment gives to `POST /api/query` and `/api/mutation`.

Each is taken from get-convex/convex-backend (mirror at commit 94a42c3d, 2026-08-22), with the
file that produces it. `tests/test_convex_client.py` feeds each to `ConvexStore` and checks the
gateway error that comes out; `tests/convex_server/server.mjs` answers in these same shapes.

How the router answers (crates/local_backend/src/public_api.rs): a function's outcome, success or
throw, is always `Ok(Json(UdfResponse))`, HTTP 200. `UdfResponse` is `#[serde(tag = "status")]`
with `value`/`logLines` or `errorMessage`/`errorData`/`logLines`; `logLines` is left out when
empty, `errorData` when the function threw no ConvexError. Anything that fails outside the
function's run (auth, OCC retries exhausted, a bad body) is an `HttpResponseError`:
`{"code", "message"}` with the status of its `ErrorMetadata` (crates/common/src/http/mod.rs,
`HttpError::into_response`; statuses in crates/errors/src/lib.rs, `http_status_code`).

`errorMessage` is `RedactedJsError`'s Display (crates/application/src/redaction.rs):
`[Request ID: <16 hex>] Server Error`, and, unless the deployment redacts errors for this caller,
a newline and the JsError (its message, a newline, and any stack frames; crates/common/src/
errors.rs). Production deployments redact: "Server Error" only, errorData kept (docs:
functions/error-handling/error-handling.mdx, "Differences in error reporting between dev and
prod").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

REQUEST_ID = (
    "8f2c1d7e4b9a0c35"  # RequestId::new(): 8 random bytes, hex (common/execution_context.rs)
)
REDACTED = f"[Request ID: {REQUEST_ID}] Server Error"


@dataclass(frozen=True)
class Answer:
    name: str
    status: int
    body: dict[str, Any]
    source: str

    def content(self) -> bytes:
        return json.dumps(self.body).encode()


def convex_error(
    code: str, message: str, *, redacted: bool = True, status: int = 200, **extra: object
) -> Answer:
    """A function threw `new ConvexError({code, message})` (convex/model.ts `fail`)."""
    data = {"code": code, "message": message, **extra}
    # ConvexError's message is its data, stringified (npm-packages/convex/src/values/errors.ts);
    # the isolate prefixes "Uncaught <name>: " (crates/isolate/src/helpers.rs,
    # format_uncaught_error).
    shown = REDACTED
    if not redacted:
        shown += f"\nUncaught ConvexError: {json.dumps(data, separators=(',', ':'))}\n"
        shown += "    at handler (../convex/gateway.ts:104:10)\n"
    body = {"status": "error", "errorMessage": shown, "errorData": data}
    source = "public_api.rs UdfResponse::error; errorData = custom_data_if_any (redaction.rs)"
    if status == 560:
        source = "convex-js http_client.ts STATUS_CODE_UDF_FAILED = 560 (older backends)"
    return Answer(
        f"ConvexError {code} ({'prod' if redacted else 'dev'}, {status})", status, body, source
    )


def plain_error(cause: str | None, name: str, source: str) -> Answer:
    """A JsError without custom data: redacted (`cause=None`) or with its message shown."""
    message = REDACTED if cause is None else f"{REDACTED}\n{cause}\n"
    return Answer(name, 200, {"status": "error", "errorMessage": message}, source)


def http_error(status: int, code: str, message: str, name: str, source: str) -> Answer:
    return Answer(name, status, {"code": code, "message": message}, source)


SUCCESS = Answer(
    "success",
    200,
    {"status": "success", "value": None},
    "public_api.rs UdfResponse::Success; logLines skipped when empty",
)
SUCCESS_WITH_LOGS = Answer(
    "success with log lines (dev)",
    200,
    {"status": "success", "value": None, "logLines": ["[LOG] 'hello'"]},
    "public_api.rs UdfResponse::Success; RedactedLogLines::from_log_lines (redaction.rs)",
)

# The business errors convex/gateway.ts and convex/webapp.ts throw (`fail(...)` in model.ts),
# with the status and code SQLiteStore raises for each (sqlite_store.py, errors.py).
BUSINESS_ERRORS: dict[str, tuple[int, str]] = {
    "INSUFFICIENT_CREDITS": (402, "This job costs 5 credits; you have 3"),
    "TOO_MANY_ACTIVE_JOBS": (429, "You already have 5 jobs queued or running"),
    "NOT_FOUND": (404, "Job not found"),
    "JOB_NOT_CANCELABLE": (409, "The job is already done"),
    "JOB_NOT_DELETABLE": (409, "The job is still running: cancel it first"),
    "IDEMPOTENCY_KEY_REUSED": (409, "This Idempotency-Key was used with a different request"),
    "INVALID_CURSOR": (400, "The cursor is malformed"),
    "INVALID_REQUEST": (400, "cost must be an integer >= 0"),
    "CONFLICT": (409, "Job job_x already exists"),
    "TOO_MANY_PENDING_UPLOADS": (429, "You have 10 uploads pending; the limit is 10"),
    "UPLOAD_NOT_FOUND": (404, "Upload not found"),
}

PLAIN_ERROR_PROD = plain_error(
    None,
    "plain Error (prod: redacted)",
    "redaction.rs: Display writes only '[Request ID: ..] Server Error' when block_logging",
)
PLAIN_ERROR_DEV = plain_error(
    "Uncaught Error: invariant broken\n    at handler (../convex/gateway.ts:12:9)",
    "plain Error (dev)",
    "redaction.rs Display + isolate/src/helpers.rs format_uncaught_error",
)
LIMIT_ERROR_DEV = plain_error(
    "Uncaught Error: Too many reads in a single function execution (limit: 4096).",
    "read limit (dev)",
    "database/src/reads.rs TooManyReads, a pagination_limit error: deterministic, so a JsError",
)
UNKNOWN_CONVEX_ERROR = Answer(
    "ConvexError with a code the gateway does not know",
    200,
    {"status": "error", "errorMessage": REDACTED, "errorData": {"code": "SOMETHING_NEW"}},
    "public_api.rs UdfResponse::error (errorData is whatever the function threw)",
)

# The deployment and this gateway disagree: the functions are not deployed, or out of date.
# Each is a JsError (`Ok(Err(..))`), so 200 status:error like a throw (crates/udf/validation.rs).
MISSING_FUNCTION_DEV = plain_error(
    "Could not find public function for 'gateway:ping'.",
    "missing function (dev)",
    "udf/src/validation.rs missing_or_internal_error (also what an internal function is to a"
    " caller without the deploy key)",
)
MISSING_FUNCTION_PROD = plain_error(
    None,
    "missing function (prod: redacted)",
    "udf/src/validation.rs missing_or_internal_error, redacted by redaction.rs",
)
WRONG_KIND_DEV = plain_error(
    "Trying to execute gateway.js:ping as Mutation, but it is defined as Query.",
    "wrong function kind (dev)",
    "udf/src/validation.rs new_inner; UdfType Display in common/src/types/functions.rs",
)
BAD_ARGS_DEV = plain_error(
    "ArgumentValidationError: Object is missing the required field `userId`. Consider wrapping"
    " the field validator in `v.optional(...)` if this is expected.\n\nObject: {}\n"
    "Validator: v.object({userId: v.string()})",
    "bad arguments (dev)",
    "udf/src/validation.rs new_inner; common/src/schemas/validator.rs MissingRequiredField",
)
EXTRA_ARG_DEV = plain_error(
    "ArgumentValidationError: Object contains extra field `signupCredits` that is not in the"
    ' validator.\n\nObject: {signupCredits: 100.0, userId: "user_a"}\n'
    "Validator: v.object({userId: v.string()})",
    "extra argument (dev)",
    "common/src/schemas/validator.rs ExtraField",
)
# The same two with the emergency knob UDF_404_ON_BAD_PATH on (common/src/knobs.rs, off by default).
MISSING_FUNCTION_404 = http_error(
    404,
    "FunctionPathNotFound",
    "Could not find public function for 'gateway:ping'.",
    "missing function (UDF_404_ON_BAD_PATH)",
    "udf/src/validation.rs missing_or_internal_error: ErrorMetadata::not_found",
)
WRONG_KIND_404 = http_error(
    404,
    "FunctionPathWrongType",
    "Trying to execute gateway.js:ping as Mutation, but it is defined as Query.",
    "wrong kind (UDF_404_ON_BAD_PATH)",
    "udf/src/validation.rs new_inner: ErrorMetadata::not_found",
)

OCC = http_error(
    503,
    "OptimisticConcurrencyControlFailure",
    'Documents read from or written to the "users" table changed while this mutation was being'
    " run and on every subsequent retry. See https://docs.convex.dev/error#1",
    "OCC retries exhausted",
    "errors/src/lib.rs user_occ (OCC_ERROR) -> 503; application_function_runner/mod.rs"
    " _retry_mutation returns Err after UDF_EXECUTOR_OCC_MAX_RETRIES; not a user error, so"
    " mutation_udf bails and the router answers HttpResponseError",
)
BAD_ADMIN_KEY = http_error(
    401,
    "BadAdminKey",
    "The provided admin key was invalid for this instance",
    "deploy key refused (401)",
    "authentication/src/application_auth.rs check_key, access_token_auth.rs: unauthenticated",
)
BAD_DEPLOY_KEY = http_error(
    403,
    "BadDeployKey",
    "The provided deploy key was invalid for deployment 'happy-animal-123'. Double check that"
    " the environment this key was generated for matches the desired deployment.",
    "deploy key refused (403)",
    "keybroker/src/operations.rs bad_admin_key_error: ErrorMetadata::forbidden",
)
OPERATION_NOT_PERMITTED = http_error(
    403,
    "OperationNotPermitted",
    "You do not have permission to perform this operation (run internal queries).",
    "key lacks the operation (403)",
    "roles/src/eval.rs require_operation: ErrorMetadata::forbidden",
)
BAD_FORMAT = http_error(
    400,
    "BadFormat",
    "format param must be one of [`json`]. Got yaml",
    "unknown format (400, after the function ran)",
    "value/src/export.rs ValueFormat::from_str, parsed in public_api.rs after execution",
)
BAD_JSON_BODY = http_error(
    400,
    "BadJsonBody",
    "Failed to deserialize the JSON body into the target type: missing field `path`",
    "malformed body (400)",
    'common/src/http/extract.rs Json extractor: bad_request("BadJsonBody", e.body_text())',
)
OVERLOADED = http_error(
    503,
    "CommitterFullError",
    "Too many concurrent commits in a short period of time. Spread your writes out over time or"
    " throttle them to avoid errors.",
    "overloaded (503, outcome unknown)",
    "database/src/metrics.rs committer_full_error: ErrorMetadata::overloaded -> 503",
)
INTERNAL = http_error(
    500,
    "InternalServerError",
    "Your request couldn't be completed. Try again later.",
    "internal error (500)",
    "errors/src/lib.rs INTERNAL_SERVER_ERROR / INTERNAL_SERVER_ERROR_MSG",
)
