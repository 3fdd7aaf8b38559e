"""The OpenAPI document at /api/v1/openapi.json, and the input rules it states.

Every route must be described, and every described operation must have a route. The
body rules that the document states must hold on every endpoint: unknown fields
ignored, 405 with Allow, 404, 415 and JSON errors.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

import dashboard
import jsonapi
import openapi
import server

BODY_OPERATIONS = [
    ("POST", "/api/v1/tasks/create"),
    ("POST", "/api/v1/tasks/{task_id}/complete"),
    ("PUT", "/api/v1/agents/{agent_id}"),
]
# Routes that exist only to return 405 for a path that another route would shadow.
WRONG_METHOD_ROUTES = {("GET", "/api/v1/tasks/create"), ("PATCH", "/api/v1/tasks/create"),
                       ("DELETE", "/api/v1/tasks/create"), ("ANY", "/api/v1/tasks/create")}


@pytest.fixture
def spec(app):
    return app.get(openapi.OPENAPI_PATH).json


@pytest.fixture
def task_id(app):
    return app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "1m"}).json["task_id"]


def fill(path: str, task_id: str) -> str:
    return path.replace("{task_id}", task_id).replace("{agent_id}", "web-1")


def test_openapi_is_json_document(app):
    response = app.get(openapi.OPENAPI_PATH)

    assert response.content_type == "application/json"
    assert response.json["openapi"] == "3.1.0"
    assert response.json["info"]["version"] == server.__version__


def test_openapi_describes_every_route(app, spec):
    # The dashboard's HTML pages are not API operations.
    routes = {(route.method, route.rule) for route in app.app.routes} - WRONG_METHOD_ROUTES - dashboard.PAGE_ROUTES
    described = {(method.upper(), openapi.bottle_rule(path))
                 for path, operations in spec["paths"].items() for method in operations}

    assert described == routes


def test_openapi_describes_enrollment(spec):
    enroll = spec["paths"]["/api/v1/agents/{agent_id}/enroll"]["post"]
    revoke = spec["paths"]["/api/v1/agents/{agent_id}/token"]["delete"]

    assert enroll["security"] == [{"enrollmentToken": []}]
    assert set(enroll["responses"]) >= {"201", "401", "403", "404", "409"}
    assert revoke["security"] == [{"operatorToken": ["admin"]}]
    assert set(revoke["responses"]) >= {"200", "401", "403", "404"}


def test_openapi_declares_bearer_security(spec):
    schemes = spec["components"]["securitySchemes"]

    assert {scheme["scheme"] for scheme in schemes.values()} == {"bearer"}
    assert spec["paths"]["/api/v1/tasks/create"]["post"]["security"] == [{"operatorToken": ["admin"]}]
    assert spec["paths"]["/api/v1/tasks"]["get"]["security"] == [{"operatorToken": ["read"]}]
    for path, method in [("/api/v1/agents/{agent_id}", "put"), ("/api/v1/agents/{agent_id}/tasks", "get"),
                         ("/api/v1/tasks/{task_id}/complete", "post")]:
        assert spec["paths"][path][method]["security"] == [{"agentToken": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_openapi_secured_operations_document_401_and_403(spec):
    for path, operations in spec["paths"].items():
        for method, described in operations.items():
            if described["security"]:
                assert {"401", "403"} <= set(described["responses"]), f"{method} {path}"


def test_openapi_errors_use_error_schema(spec):
    for path, operations in spec["paths"].items():
        for method, described in operations.items():
            for status, response in described["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, f"{method} {path} {status}"


def test_openapi_states_server_limits(spec):
    schemas = spec["components"]["schemas"]

    assert schemas["CreateTaskRequest"]["properties"]["command"]["maxLength"] == jsonapi.MAX_COMMAND_LENGTH
    assert schemas["ReportRequest"]["properties"]["stdout"]["maxLength"] == jsonapi.MAX_OUTPUT_LENGTH
    assert schemas["ReportRequest"]["required"] == ["server_id"]
    assert schemas["CreateTaskRequest"]["required"] == ["command", "frequency"]


def test_openapi_request_bodies_allow_unknown_fields(spec):
    for name in ("CreateTaskRequest", "ReportRequest", "RegisterAgentRequest"):
        assert spec["components"]["schemas"][name]["additionalProperties"] is True


def test_whitespace_class_matches_str_isspace():
    whitespace = re.compile(f"[{jsonapi.WHITESPACE_CLASS}]")

    mismatches = [hex(code) for code in range(sys.maxunicode + 1)
                  if bool(whitespace.fullmatch(chr(code))) != chr(code).isspace()]

    assert mismatches == []


# ---------------------------------------------------------------------------
# The same input rules on every endpoint with a body
# ---------------------------------------------------------------------------


VALID_BODIES = {
    "/api/v1/tasks/create": {"command": "true", "frequency": "1m"},
    "/api/v1/tasks/{task_id}/complete": {"server_id": "web-1", "stdout": "ok"},
    "/api/v1/agents/{agent_id}": {"hostname": "web-1.example.net"},
}


@pytest.mark.parametrize("method, path", BODY_OPERATIONS)
def test_body_endpoint_ignores_unknown_fields(app, task_id, method, path):
    body = dict(VALID_BODIES[path], unknown_field={"nested": [1, 2]}, another=None)

    response = app.request(fill(path, task_id), method=method, body=json.dumps(body).encode(),
                           content_type="application/json", expect_errors=True)

    assert response.status_int in (200, 201), response.text


@pytest.mark.parametrize("method, path", BODY_OPERATIONS)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_body_endpoint_rejects_wrong_content_type(app, task_id, method, path, content_type):
    response = app.request(fill(path, task_id), method=method, body=b'{"command": "true"}',
                           headers={"Content-Type": content_type}, expect_errors=True)

    assert response.status_int == 415
    assert response.content_type == "application/json"
    assert "Content-Type: application/json" in response.json["error"]


@pytest.mark.parametrize("method, path", BODY_OPERATIONS)
@pytest.mark.parametrize("raw, fragment", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"a": ', "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_body_endpoint_rejects_broken_json(app, task_id, method, path, raw, fragment):
    response = app.request(fill(path, task_id), method=method, body=raw,
                           content_type="application/json", expect_errors=True)

    assert response.status_int == 400
    assert fragment in response.json["error"]


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/api/v1/tasks/create", "POST"),
    ("OPTIONS", "/api/v1/tasks/create", "POST"),
    ("PROPFIND", "/api/v1/tasks/create", "POST"),
    ("GET", "/api/v1/tasks/create", "POST"),
    ("PUT", "/api/v1/tasks", "GET"),
    ("PUT", "/api/v1/tasks/{task_id}", "DELETE,GET,PATCH"),
    ("GET", "/api/v1/tasks/{task_id}/run", "POST"),
    ("GET", "/api/v1/tasks/{task_id}/complete", "POST"),
    ("POST", "/api/v1/agents/{agent_id}", "PUT"),
    ("POST", "/healthz", "GET"),
    ("POST", openapi.OPENAPI_PATH, "GET"),
])
def test_wrong_method_lists_allowed_methods(app, task_id, method, path, allowed):
    response = app.request(fill(path, task_id), method=method, expect_errors=True)

    assert response.status_int == 405
    assert response.headers["Allow"] == allowed
    assert response.content_type == "application/json"
    assert f"allowed: {allowed}" in response.json["error"]


@pytest.mark.parametrize("path", ["/api", "/api/v1", "/api/v1/tasks/x/y/z", "/api/v2/tasks"])
def test_unknown_path_is_json_404(app, path):
    response = app.get(path, expect_errors=True)

    assert response.status_int == 404
    assert response.content_type == "application/json"
    assert set(response.json) == {"error"}
