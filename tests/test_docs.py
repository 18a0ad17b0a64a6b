"""The API docs: every operation documented with examples, and pages that load nothing remote."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from config import Settings
from main import create_app
from models import CreateJobRequest

ERROR_SCHEMA = "#/components/schemas/ErrorResponse"
# Every URL a docs page names: src, href, ReDoc's spec-url, and Swagger UI's `url: '...'`.
_PAGE_URL = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""")
_ANY_ABSOLUTE_URL = re.compile(r"\b(?:https?:)?//[^\s\"'<>]+")
_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}

Operation = tuple[str, str, dict[str, Any]]


@pytest.fixture
def schema(settings: Settings) -> dict[str, Any]:
    return create_app(settings).openapi()


def operations(schema: dict[str, Any]) -> Iterator[Operation]:
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def body_examples(schema: dict[str, Any], media: dict[str, Any]) -> list[Any]:
    """The examples a docs page shows for one body: on the media type, else on its schema."""
    if "example" in media:
        return [media["example"]]
    if media.get("examples"):
        return [example["value"] for example in media["examples"].values()]
    ref = media.get("schema", {}).get("$ref", "")
    component = schema["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
    return list(component.get("examples", []))


def validator(schema: dict[str, Any], media: dict[str, Any]) -> Draft202012Validator:
    """Checks a body against the media type's schema, with the document's $refs resolvable."""
    return Draft202012Validator({"allOf": [media["schema"]], "components": schema["components"]})


def json_media(operation: dict[str, Any], status: str) -> dict[str, Any]:
    return operation["responses"][status]["content"]["application/json"]


def error_codes(schema: dict[str, Any], path: str, status: str) -> set[str]:
    """The codes the docs list under one status of the path's only operation."""
    (operation,) = schema["paths"][path].values()
    return set(json_media(operation, status)["examples"])


class TestOperations:
    def test_the_schema_lists_every_public_route(self, schema) -> None:
        listed = {(path, method) for path, method, _ in operations(schema)}
        assert listed == {
            ("/jobs/create", "post"),
            ("/jobs", "get"),
            ("/jobs/events", "get"),
            ("/jobs/{job_id}", "get"),
            ("/jobs/{job_id}/cancel", "post"),
            ("/jobs/{job_id}", "delete"),
            ("/jobs/{job_id}/events", "get"),
            ("/credits", "get"),
            ("/webhooks/runpod", "post"),
            ("/uploads", "post"),
            ("/webhooks/runpod/progress", "post"),
        }

    def test_user_routes_declare_the_session_and_the_webhook_does_not(self, schema) -> None:
        schemes = schema["components"]["securitySchemes"]
        assert schemes["clerkBearer"] == schemes["clerkBearer"] | {
            "type": "http",
            "scheme": "bearer",
        }
        assert schemes["clerkSessionCookie"]["in"] == "cookie"
        assert schemes["clerkSessionCookie"]["name"] == "__session"
        secured = {
            (path, method)
            for path, method, operation in operations(schema)
            if operation.get("security") == [{"clerkBearer": []}, {"clerkSessionCookie": []}]
        }
        assert secured == {
            ("/jobs/create", "post"),
            ("/jobs", "get"),
            ("/jobs/events", "get"),
            ("/jobs/{job_id}", "get"),
            ("/jobs/{job_id}/cancel", "post"),
            ("/jobs/{job_id}", "delete"),
            ("/jobs/{job_id}/events", "get"),
            ("/credits", "get"),
            ("/uploads", "post"),
        }
        (webhook,) = schema["paths"]["/webhooks/runpod"].values()
        assert "security" not in webhook  # its proof is a signature or a URL token, not a session

    async def test_a_declared_route_refuses_a_call_without_a_session(self, client, schema) -> None:
        """What the declaration promises: no session, 401 in the error shape."""
        for path, method, operation in operations(schema):
            if "security" not in operation:
                continue
            concrete = path.replace("{job_id}", "job_abcdefghijklmnop")
            response = await client.request(method.upper(), concrete, json={})
            assert response.status_code == 401, (method, path)
            assert response.json()["code"] == "UNAUTHORIZED"

    def test_every_operation_has_a_summary_and_a_description(self, schema) -> None:
        for path, method, operation in operations(schema):
            assert operation.get("summary"), (method, path)
            assert len(operation.get("description", "")) > 20, (method, path)

    def test_every_success_body_has_a_valid_example(self, schema) -> None:
        for path, method, operation in operations(schema):
            if "204" in operation["responses"]:  # a success without a body: nothing to show
                assert "content" not in operation["responses"]["204"], (method, path)
                continue
            if path.endswith("/events"):  # a text/event-stream: see the test below
                continue
            media = json_media(operation, "200")
            examples = body_examples(schema, media)
            assert examples, (method, path)
            for example in examples:
                validator(schema, media).validate(example)

    def test_event_streams_show_an_example_stream(self, schema) -> None:
        for path in ("/jobs/events", "/jobs/{job_id}/events"):
            content = schema["paths"][path]["get"]["responses"]["200"]["content"]
            assert list(content) == ["text/event-stream"]
            assert content["text/event-stream"]["example"].startswith("event: job\n")

    def test_every_error_uses_the_error_schema_with_an_example_per_code(self, schema) -> None:
        for path, method, operation in operations(schema):
            errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
            assert errors, (method, path)
            for status, response in errors.items():
                media = json_media(operation, status)
                assert media["schema"] == {"$ref": ERROR_SCHEMA}, (method, path, status)
                assert response["description"], (method, path, status)
                for code, example in media["examples"].items():
                    assert example["value"]["code"] == code
                    validator(schema, media).validate(example["value"])

    def test_routes_name_the_codes_they_really_answer(self, schema) -> None:
        assert error_codes(schema, "/jobs/create", "402") == {"INSUFFICIENT_CREDITS"}
        assert error_codes(schema, "/jobs/create", "409") == {
            "IDEMPOTENCY_KEY_REUSED",
            "IDEMPOTENCY_KEY_IN_USE",
            "UPLOAD_CHANGED",
        }
        assert error_codes(schema, "/jobs/create", "404") == {"UPLOAD_NOT_FOUND"}
        assert error_codes(schema, "/uploads", "429") == {"TOO_MANY_PENDING_UPLOADS"}
        assert error_codes(schema, "/jobs/{job_id}/cancel", "409") >= {"JOB_NOT_CANCELABLE"}
        assert error_codes(schema, "/jobs/{job_id}/cancel", "404") == {"NOT_FOUND"}
        delete = schema["paths"]["/jobs/{job_id}"]["delete"]
        assert set(json_media(delete, "409")["examples"]) == {
            "JOB_NOT_DELETABLE",
            "IDEMPOTENCY_KEY_REUSED",
            "IDEMPOTENCY_KEY_IN_USE",
        }
        assert "STORAGE_UNAVAILABLE" in json_media(delete, "503")["examples"]
        assert list(delete["responses"])[0] == "204" and "200" not in delete["responses"]
        assert error_codes(schema, "/webhooks/runpod", "401") == {"INVALID_SIGNATURE"}

    def test_a_path_id_alone_cannot_be_a_400(self, schema) -> None:
        operation = schema["paths"]["/jobs/{job_id}"]["get"]
        assert "400" not in operation["responses"]
        delete = schema["paths"]["/jobs/{job_id}"]["delete"]
        assert "400" in delete["responses"]  # its Idempotency-Key header can be refused
        (cancel,) = schema["paths"]["/jobs/{job_id}/cancel"].values()
        assert "400" in cancel["responses"]  # its Idempotency-Key header can be refused

    def test_validation_errors_are_400_not_422(self, schema) -> None:
        for path, method, operation in operations(schema):
            assert "422" not in operation["responses"], (method, path)
        assert "HTTPValidationError" not in schema["components"]["schemas"]

    def test_request_examples_are_accepted(self, schema) -> None:
        body = schema["paths"]["/jobs/create"]["post"]["requestBody"]["content"]
        examples = body_examples(schema, body["application/json"])
        assert len(examples) >= 2
        for example in examples:
            CreateJobRequest.model_validate(example)

    def test_the_webhook_body_is_shown_with_examples(self, schema) -> None:
        body = schema["paths"]["/webhooks/runpod"]["post"]["requestBody"]["content"]
        statuses = {
            example["status"] for example in body_examples(schema, body["application/json"])
        }
        assert statuses == {"COMPLETED", "FAILED"}


def page_urls(html: str) -> list[str]:
    return [attribute or script for attribute, script in _PAGE_URL.findall(html)]


class TestDocsPages:
    @pytest.mark.parametrize("page", ["/docs", "/redoc"])
    async def test_page_names_only_local_urls(self, client, page) -> None:
        response = await client.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        urls = page_urls(response.text)
        assert "/openapi.json" in urls
        assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls
        assert _ANY_ABSOLUTE_URL.findall(response.text) == []

    @pytest.mark.parametrize("page", ["/docs", "/redoc"])
    async def test_page_forbids_the_browser_other_hosts(self, client, page) -> None:
        # ReDoc's bundle always asks cdn.redoc.ly for its logo: only this policy stops it.
        policy = (await client.get(page)).headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["img-src"] == "'self' data:"
        assert all("http" not in sources and "*" not in sources for sources in directives.values())

    async def test_swagger_ui_asks_no_validator(self, client) -> None:
        # Left on, Swagger UI sends the schema's URL to validator.swagger.io for a badge.
        response = await client.get("/docs")
        assert '"validatorUrl": null' in response.text

    @pytest.mark.parametrize("page", ["/docs", "/redoc"])
    async def test_every_asset_is_served_with_its_type(self, client, page) -> None:
        html = (await client.get(page)).text
        assets = [url for url in page_urls(html) if url != "/openapi.json"]
        assert len(assets) >= 2
        for url in assets:
            response = await client.get(url)
            assert response.status_code == 200, url
            expected = _ASSET_TYPES[url[url.rindex(".") :]]
            assert response.headers["content-type"].startswith(expected), url
            assert len(response.content) > 1000, url

    async def test_the_bundle_is_swagger_ui(self, client) -> None:
        response = await client.get("/docs-assets/swagger-ui-bundle.js")
        assert "SwaggerUIBundle" in response.text

    async def test_unknown_asset_is_404_in_the_error_shape(self, client) -> None:
        response = await client.get("/docs-assets/nope.js")
        assert response.status_code == 404
        assert response.json()["code"] == "NOT_FOUND"

    async def test_schema_is_served(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/openapi.json")
        assert response.status_code == 200
        assert "/jobs/create" in response.json()["paths"]
