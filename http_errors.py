"""Every error rendered as `{"detail", "code"}`, and the OpenAPI examples that show them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from errors import (
    AuthUnavailable,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    StoreUnavailable,
    Unauthorized,
    UpstreamError,
    UpstreamUnavailable,
)
from logs import current_request_id

log = logging.getLogger("gateway")


def error_body(
    code: str, detail: str, errors: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    return body


async def render_gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    errors = getattr(exc, "errors", None)
    return JSONResponse(
        error_body(exc.code, exc.detail, errors), status_code=exc.status_code, headers=exc.headers
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


# What each kind of pydantic error means, in words for the person who sent the request.
_FIELD_MESSAGES = {
    "missing": "{field} is required",
    "extra_forbidden": "{field} is not a field of this request",
    "string_type": "{field} must be a string",
    "int_type": "{field} must be a whole number",
    "int_parsing": "{field} must be a whole number",
    "int_from_float": "{field} must be a whole number",
    "float_type": "{field} must be a number",
    "finite_number": "{field} must be a finite number",
    "literal_error": "{field} must be one of {expected}",
    "bool_type": "{field} must be true or false",
    "bool_parsing": "{field} must be true or false",
    "model_type": "{field} must be a JSON object",
    "model_attributes_type": "{field} must be a JSON object",
    "dict_type": "{field} must be a JSON object",
    "greater_than_equal": "{field} must be at least {ge}",
    "less_than_equal": "{field} must be at most {le}",
    "string_too_short": "{field} must be at least {min_length} characters",
    "string_too_long": "{field} must be at most {max_length} characters",
    # RequestModel's own check (models.py), worded like the rest: the field, then the rule.
    "lone_surrogate": "{field} must be valid Unicode text: it holds a lone surrogate (an escape"
    " from \\ud800 to \\udfff without its pair)",
}
# Headers whose pattern a person cannot read: say what the pattern means.
_PATTERN_MESSAGES = {
    "Idempotency-Key": "Idempotency-Key must be 1 to 255 printable ASCII characters",
}


def field_error(error: Mapping[str, Any], body: Any) -> dict[str, str]:
    """One pydantic error as `{"field", "message"}`, the message naming the field."""
    loc = tuple(error.get("loc", ()))
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind == "json_invalid":
        return {"field": "body", "message": _json_syntax_message(body, loc, ctx)}
    field = _field_name(loc)
    if kind == "value_error":  # our own validators: their words follow the field's name
        return {"field": field, "message": f"{field} {ctx.get('error', 'is not valid')}"}
    if kind == "string_pattern_mismatch" and field in _PATTERN_MESSAGES:
        return {"field": field, "message": _PATTERN_MESSAGES[field]}
    template = _FIELD_MESSAGES.get(kind)
    if template is None:
        return {"field": field, "message": f"{field}: {error.get('msg', 'is not valid')}"}
    return {"field": field, "message": template.format(field=field, **ctx)}


def _json_syntax_message(body: Any, loc: tuple[Any, ...], ctx: Mapping[str, Any]) -> str:
    """Where the JSON broke, as an editor counts: line and column, from 1."""
    position = loc[-1] if loc and isinstance(loc[-1], int) else 0
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    reason = str(ctx.get("error", "invalid JSON"))
    return (
        f"body is not valid JSON (line {line}, column {column}): {reason[:1].lower()}{reason[1:]}"
    )


async def render_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [field_error(err, exc.body) for err in exc.errors()]
    return JSONResponse(invalid_request_body(errors), status_code=400)


def invalid_request_body(errors: list[dict[str, str]]) -> dict[str, Any]:
    """A 400 whose `detail` alone says what to fix, for clients that show only `detail`."""
    detail = "Invalid request: " + "; ".join(error["message"] for error in errors)
    return error_body(InvalidRequest.code, detail, errors)


_FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


async def render_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        # RFC 9110: a 405 names the methods the resource does support.
        allow = (exc.headers or {}).get("Allow")
        if allow and "GET" in allow.split(", "):
            allow += ", HEAD"  # EntryMiddleware answers HEAD wherever GET is allowed
        return await render_gateway_error(request, MethodNotAllowed(headers_allow=allow))
    if exc.status_code == 404:
        return await render_gateway_error(request, NotFound("No such route"))
    if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_PARSE_ERROR:
        # FastAPI says this when the body is not UTF-8, before any JSON parsing.
        errors = [{"field": "body", "message": "body must be JSON in UTF-8"}]
        return JSONResponse(invalid_request_body(errors), status_code=400)
    if exc.status_code == 400:
        return await render_gateway_error(request, InvalidRequest(str(exc.detail)))
    code = "HTTP_ERROR"
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)


async def render_internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = error_body("INTERNAL_ERROR", "Internal server error")
    # This handler runs outside the telemetry middleware, so it adds the request id itself.
    request_id = current_request_id()
    headers = {"X-Request-ID": request_id} if request_id else None
    return JSONResponse(body, status_code=500, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, render_gateway_error)
    app.add_exception_handler(RequestValidationError, render_validation_error)
    app.add_exception_handler(StarletteHTTPException, render_http_error)
    app.add_exception_handler(Exception, render_internal_error)


# The field errors in the docs' example of a 400, as a client would see them.
_EXAMPLE_FIELD_ERRORS = [{"field": "durationSec", "message": "durationSec must be from 1 to 10"}]


def error_example(error: type[GatewayError]) -> dict[str, Any]:
    """An OpenAPI example of `error`'s body, exactly as the gateway writes it."""
    if error is InvalidRequest:
        return {"summary": error.detail, "value": invalid_request_body(_EXAMPLE_FIELD_ERRORS)}
    return {"summary": error.detail, "value": error_body(error.code, error.detail)}


# `ErrorResponse` in the schema's components: openapi.py puts it there (`add_error_schemas`).
ERROR_SCHEMA_REF = "#/components/schemas/ErrorResponse"


def error_responses(*errors: type[GatewayError]) -> dict[int | str, dict[str, Any]]:
    """The statuses a route answers with these errors: the error schema, an example per code.

    Built from the error classes the code raises, so the docs name the real codes.

    The schema is named by reference, where FastAPI would write it for `"model": ErrorResponse`
    (after the examples): a `model` makes FastAPI build a serializer per status per route when
    the route is added, 60 of them, ~14 ms of every cold start (issue 13), which the app never
    uses (these answers are written by the error handlers, not validated against a model).
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        content: dict[str, Any] = {"application/json": {"examples": {}}}
        response = responses.setdefault(error.status_code, {"content": content})
        response["content"]["application/json"]["examples"][error.code] = error_example(error)
    for response in responses.values():
        media = response["content"]["application/json"]
        media["schema"] = {"$ref": ERROR_SCHEMA_REF}
        codes = media["examples"]
        response["description"] = "\n".join(
            f"- `{code}`: {ex['summary']}" for code, ex in codes.items()
        )
    return responses


# Every user route checks the session token (401), with keys that may be unavailable (503).
AUTH_ERRORS = (Unauthorized, AuthUnavailable)
# Any route that touches the store: SQLite's 503, or Convex's 502 and 503. RunPod's failures
# are these same two upstream classes.
STORE_ERRORS = (StoreUnavailable, UpstreamError, UpstreamUnavailable)
