"""The API's docs: offline Swagger UI and ReDoc pages, and the schema as the gateway answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.constants import REF_TEMPLATE
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.models import Schema
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.staticfiles import StaticFiles

from config import Settings
from deps import current_user
from errors import InvalidRequest
from http_errors import ERROR_SCHEMA_REF, error_example
from models import (
    CreateJobRequest,
    CreateJobResponse,
    CreditsResponse,
    ErrorResponse,
    JobListResponse,
    JobResponse,
)

# --- Docs pages -------------------------------------------------------------------------------

DOCS_ASSETS_URL = "/docs-assets"
# Swagger UI would send the schema's URL to validator.swagger.io for a badge: null turns it off.
SWAGGER_UI_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
# The browser may load nothing from another host. ReDoc always fetches its logo from a CDN;
# this makes the browser refuse that (it then hides the logo), and whatever a newer bundle
# might add. Swagger UI's start-up is an inline script; both pages inline styles, and
# ReDoc's search runs in a worker made from a blob.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'"
)


# /docs and /redoc: create_app mounts the assets, then includes these (see `install_docs`).
docs_router = APIRouter(include_in_schema=False)


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, from files the gateway serves itself.

    FastAPI's own pages load them from a CDN, which fails behind a strict firewall; the
    fastapi-offline package ships the same bundles, so nothing is fetched from another host.
    """
    assets = StaticFiles(packages=[("fastapi_offline", "static")])
    app.mount(DOCS_ASSETS_URL, assets, name="docs-assets")
    app.include_router(docs_router)


def _docs_page(
    request: Request,
    build: Callable[..., HTMLResponse],
    name: str,
    assets: dict[str, str],
    **options: Any,
) -> HTMLResponse:
    """One docs page from FastAPI's builder: `assets` maps its URL arguments to bundled files.

    URLs carry the proxy's root path, if any, so the page works behind a path prefix.
    """
    root = request.scope.get("root_path", "")
    urls = {arg: f"{root}{DOCS_ASSETS_URL}/{file}" for arg, file in assets.items()}
    openapi_url = f"{root}{request.app.openapi_url}"
    page = build(openapi_url=openapi_url, title=f"{request.app.title} - {name}", **urls, **options)
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@docs_router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    files = {"swagger_js_url": "swagger-ui-bundle.js", "swagger_css_url": "swagger-ui.css"}
    files["swagger_favicon_url"] = "favicon.png"
    options = {"swagger_ui_parameters": SWAGGER_UI_PARAMETERS}
    return _docs_page(request, get_swagger_ui_html, "Swagger UI", files, **options)


@docs_router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    files = {"redoc_js_url": "redoc.standalone.js", "redoc_favicon_url": "favicon.png"}
    return _docs_page(request, get_redoc_html, "ReDoc", files, with_google_fonts=False)


# --- The schema -------------------------------------------------------------------------------

# The groups /docs shows the operations in, in this order.
JOBS, UPLOADS, CREDITS, WEBHOOKS = "Jobs", "Uploads", "Credits", "Webhooks"
OPENAPI_TAGS = [
    {"name": JOBS, "description": "Create video jobs, follow them, cancel them."},
    {"name": UPLOADS, "description": "Upload a start image straight to storage, for jobs."},
    {"name": CREDITS, "description": "What a caller can still spend."},
    {"name": WEBHOOKS, "description": "Calls RunPod makes when a job finishes."},
]

_ERROR_RESPONSE = {
    "description": "Invalid request",
    "content": {
        "application/json": {
            "schema": {"$ref": ERROR_SCHEMA_REF},
            "examples": {"INVALID_REQUEST": error_example(InvalidRequest)},
        }
    },
}


# The models whose examples /docs shows as request and answer bodies.
EXAMPLE_MODELS = (
    CreateJobRequest,
    CreateJobResponse,
    JobResponse,
    JobListResponse,
    CreditsResponse,
    ErrorResponse,
)


def restore_examples(components: dict[str, Any]) -> None:
    """Put the models' examples back whole: get_openapi drops every null, even inside them."""
    for model in EXAMPLE_MODELS:
        components[model.__name__]["examples"] = model.model_json_schema()["examples"]


def add_error_schemas(components: dict[str, Any]) -> None:
    """`ErrorResponse`, and the models within it, among the components, in name order: as
    get_openapi writes a route's `model`, which `http_errors.error_responses` names by reference
    instead (see there why)."""
    schema = ErrorResponse.model_json_schema(ref_template=REF_TEMPLATE, mode="serialization")
    found = {ErrorResponse.__name__: schema, **schema.pop("$defs", {})}
    for name, found_schema in found.items():
        # Through FastAPI's own model of a schema, as get_openapi writes every component.
        encoded = jsonable_encoder(Schema(**found_schema), by_alias=True, exclude_none=True)
        components.setdefault(name, encoded)
    ordered = sorted(components.items())
    components.clear()
    components.update(ordered)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """The schema as the gateway really answers: 400 not 422, and the configured limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and _validates_input(operation):
                    responses.setdefault("400", _ERROR_RESPONSE)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        duration = components["CreateJobRequest"]["properties"]["durationSec"]
        duration.update(minimum=settings.min_duration_sec, maximum=settings.max_duration_sec)
        size = components["CreateUploadRequest"]["properties"]["sizeBytes"]
        size["maximum"] = settings.max_upload_bytes
        add_error_schemas(components)
        restore_examples(components)
        declare_security(schema, app)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI documents replacing it so


def _validates_input(operation: dict[str, Any]) -> bool:
    """Whether FastAPI can refuse this operation's input (a body, a query or a header).

    FastAPI lists a 422 wherever there are parameters, but a path id is any string: an unknown
    or malformed one is a 404, never a 400.
    """
    parameters = operation.get("parameters", [])
    return "requestBody" in operation or any(p["in"] != "path" for p in parameters)


# How `current_user` reads a session, for the docs: Swagger UI then offers "Authorize", and
# clients generated from the schema send the token. Declared here rather than as a FastAPI
# security dependency, which would add a dependency solve to every request.
SECURITY_SCHEMES = {
    "clerkBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A Clerk session token: `Authorization: Bearer <token>`.",
    },
    "clerkSessionCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "__session",
        "description": "Clerk's session cookie, for same-site browser calls.",
    },
}


def declare_security(schema: dict[str, Any], app: FastAPI) -> None:
    """Mark each operation that depends on `current_user` as needing a session (either form)."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    # Through iter_route_contexts: an included router's routes are not in `app.routes` itself.
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        if not any(dep.call is current_user for dep in route.dependant.dependencies):
            continue
        for method in route.methods or ():
            operation = schema["paths"][context.path_format][method.lower()]
            operation["security"] = [{"clerkBearer": []}, {"clerkSessionCookie": []}]
