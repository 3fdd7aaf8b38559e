"""The OpenAPI 3.1 description of the server's REST API, served at GET /api/v1/openapi.json.

The document is written by hand. Request schemas state the checks that `server.py` and
`jsonapi.py` enforce: types, required fields, lengths and enums. Rules that JSON Schema
cannot state, such as `missed_slots` being allowed only with status `missed`, are in
descriptions.
`tests/test_openapi.py` checks that every route is described and every described
operation has a route, and `tests/test_schemathesis.py` checks the live server against
this document.

Unknown body fields are ignored by every endpoint, so every request body schema allows
additional properties. A newer agent can then talk to an older server.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

from agent import (ENVIRONMENT_NAME, LABEL_NAME, LABEL_VALUE, MAX_CATCHUP_SECONDS,
                   MAX_ENVIRONMENT_ENTRIES, MAX_ENVIRONMENT_VALUE_LENGTH, MAX_JITTER_SECONDS,
                   MAX_LABELS, MAX_TIMEOUT_SECONDS, OVERLAP_POLICIES)
from jsonapi import (MAX_BODY_BYTES, MAX_BYTE_COUNT, MAX_COMMAND_LENGTH, MAX_FREQUENCY_LENGTH,
                     MAX_HOSTNAME_LENGTH, MAX_OUTPUT_LENGTH, MAX_PLATFORM_LENGTH, MAX_PUSH_URL_LENGTH,
                     MAX_REASON_LENGTH, MAX_TIMEZONE_LENGTH, MAX_VERSION_LENGTH, PUSH_URL_REGEX,
                     RESULT_STATUSES, WHITESPACE_CLASS)
from pagination import MAX_CURSOR_LENGTH, MAX_LIMIT
from targeting import MAX_TARGET_AGENTS

OPENAPI_PATH = "/api/v1/openapi.json"

# JSON Schema patterns are ECMA-262 expressions that match anywhere in the string.
AGENT_ID_REGEX = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TASK_ID_REGEX = "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"
# A string with at least one character that str.strip() keeps, and no NUL.
TEXT_REGEX = f"^[^\\u0000]*[^{WHITESPACE_CLASS}\\u0000][^\\u0000]*$"
NO_NUL_REGEX = "^[^\\u0000]*$"
BASE64_REGEX = "^[A-Za-z0-9+/]*={0,2}$"
# RFC 3339 with an offset, as `agent.parse_time` accepts it: white space around it is
# stripped first.
TIMESTAMP_REGEX = (f"^[{WHITESPACE_CLASS}]*[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}[Tt ][0-9]{{2}}:[0-9]{{2}}:"
                   f"[0-9]{{2}}(\\.[0-9]{{1,9}})?([Zz]|[+-][0-9]{{2}}:[0-9]{{2}})[{WHITESPACE_CLASS}]*$")

ERROR_REF = {"$ref": "#/components/schemas/Error"}


def nullable(schema: dict) -> dict:
    """Return `schema` widened to also accept JSON null."""
    widened = copy.deepcopy(schema)
    kind = widened.get("type")
    if isinstance(kind, str):
        widened["type"] = [kind, "null"]
    elif "enum" in widened:
        widened["enum"] = [*widened["enum"], None]
    return widened


def error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def json_response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def json_body(schema_name: str) -> dict:
    return {"required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}


def closed_object(properties: dict, required: Iterable[str] = ()) -> dict:
    """Return the schema of a response object: exactly the listed properties may appear."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def open_object(properties: dict, required: Iterable[str] = ()) -> dict:
    """Return the schema of a request body: unknown properties are allowed and ignored."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": True}
    if required:
        schema["required"] = list(required)
    return schema


# ---------------------------------------------------------------------------
# Shared responses and parameters
# ---------------------------------------------------------------------------

BAD_REQUEST = error_response("The body or a parameter is invalid; `field` names the field at fault. "
                             "Nothing is stored.")
BAD_PATH = error_response("The request path is not valid UTF-8.")
UNAUTHENTICATED = error_response("The `Authorization: Bearer TOKEN` header is missing, or the token "
                                 "is unknown, revoked or expired. An expired token's error names "
                                 "the instant it expired.")
FORBIDDEN = error_response("The token is valid but does not grant this operation (a read token on "
                           "a write, or an agent token of another agent).")
TOO_LARGE = error_response(f"The body is larger than {MAX_BODY_BYTES} bytes, rejected before it is "
                           "read in full, or an output field is longer than its limit.")
UNSUPPORTED_TYPE = error_response("The body is not sent as `Content-Type: application/json`.")
UNAVAILABLE = error_response("The database is unavailable; retry later.")
TASK_NOT_FOUND = error_response("No task has this id, or the path matches no endpoint.")
BAD_QUERY = error_response("A query parameter is invalid; `field` names it.")
TASK_DELETED = error_response("The task was deleted (or, for a manual run, is paused); "
                              "`field` is task_id.")

TASK_ID_PARAMETER = {
    "name": "task_id", "in": "path", "required": True,
    "description": "the task's UUID, in any letter case",
    "schema": {"type": "string", "pattern": TASK_ID_REGEX},
}
AGENT_ID_PARAMETER = {
    "name": "agent_id", "in": "path", "required": True,
    "description": "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    "schema": {"type": "string", "pattern": AGENT_ID_REGEX},
}

RUN_ID_PARAMETER = {
    "name": "run_id", "in": "path", "required": True,
    "description": "the run's id, from the run history",
    "schema": {"type": "integer", "minimum": 1, "maximum": 2 ** 63 - 1},
}
LIMIT_PARAMETER = {
    "name": "limit", "in": "query", "required": False,
    "description": "items per page (default 100)",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
}
CURSOR_PARAMETER = {
    "name": "cursor", "in": "query", "required": False,
    "description": "the `next_cursor` of the previous page, unchanged; leave it out for the first page",
    "schema": {"type": "string", "maxLength": MAX_CURSOR_LENGTH},
}

# OpenAPI 3.1 allows role names in the requirement of a bearer scheme: "read" operations
# take a read or an admin token, "admin" operations an admin token only.
OPERATOR_READ = [{"operatorToken": ["read"]}]
OPERATOR_ADMIN = [{"operatorToken": ["admin"]}]
AGENT_ONLY = [{"agentToken": []}]
ENROLLMENT = [{"enrollmentToken": []}]
PUBLIC: list = []


def common_errors(security: list, body: bool, path_parameters: bool) -> dict:
    """Return the error responses an operation shares with others of its kind."""
    responses: dict[str, Any] = {}
    if body or path_parameters:
        responses["400"] = BAD_REQUEST if body else BAD_PATH
    if security:
        responses["401"] = UNAUTHENTICATED
        responses["403"] = FORBIDDEN
    if path_parameters:
        responses["404"] = TASK_NOT_FOUND
    if body:
        responses["413"] = TOO_LARGE
        responses["415"] = UNSUPPORTED_TYPE
    responses["503"] = UNAVAILABLE
    return responses


def operation(operation_id: str, summary: str, security: list, responses: dict,
              body_schema: str = "", parameters: tuple = (), tag: str = "") -> dict:
    described: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag],
                                 "security": security}
    if parameters:
        described["parameters"] = list(parameters)
    if body_schema:
        described["requestBody"] = json_body(body_schema)
    path_parameters = any(parameter["in"] == "path" for parameter in parameters)
    common = common_errors(security, bool(body_schema), path_parameters)
    if any(parameter["in"] == "query" for parameter in parameters) and "400" not in common:
        common["400"] = BAD_QUERY
    described["responses"] = dict(common, **responses)
    return described


# ---------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------

SECONDS = {"type": "number"}
TIMESTAMP = {"type": "string", "pattern": TIMESTAMP_REGEX,
             "description": "RFC 3339 with an offset, such as 2026-01-01T12:00:00Z"}
ENVIRONMENT = {
    "type": "object",
    "maxProperties": MAX_ENVIRONMENT_ENTRIES,
    "propertyNames": {"pattern": f"^{ENVIRONMENT_NAME.pattern}$",
                      "not": {"pattern": "^[Tt][Aa][Ss][Kk][Ss][Cc][Hh][Ee][Dd][Uu][Ll][Ee][Rr]_"}},
    "additionalProperties": {"type": "string", "maxLength": MAX_ENVIRONMENT_VALUE_LENGTH,
                             "pattern": NO_NUL_REGEX},
    "description": "variables added to the agent's environment for the command; names starting "
                   "with TASKSCHEDULER_ are reserved",
}

TASK_OPTIONS = {
    "timezone": nullable({"type": "string", "minLength": 1, "maxLength": MAX_TIMEZONE_LENGTH,
                          "description": "IANA zone name such as Europe/Berlin (default UTC); an "
                                         "unknown name is a 400"}),
    "catchup": nullable(dict(SECONDS, minimum=0, maximum=MAX_CATCHUP_SECONDS,
                             description="seconds after a missed slot within which it still runs "
                                         "once, marked late (default 0)")),
    "overlap": nullable({"type": "string", "enum": list(OVERLAP_POLICIES),
                         "description": "what a slot does while the previous run goes (default skip)"}),
    "jitter": nullable(dict(SECONDS, minimum=0, maximum=MAX_JITTER_SECONDS,
                            description="start delay below this many seconds, fixed per agent "
                                        "(default 0); must be shorter than the time between slots")),
    "timeout": nullable(dict(SECONDS, minimum=1, maximum=MAX_TIMEOUT_SECONDS,
                             description="seconds a run may last (default: until the next slot, "
                                         "at most 1 hour)")),
    "environment": nullable(ENVIRONMENT),
}

LABELS = {
    "type": "object",
    "maxProperties": MAX_LABELS,
    "propertyNames": {"pattern": f"^{LABEL_NAME.pattern}$"},
    "additionalProperties": {"type": "string", "pattern": f"^{LABEL_VALUE.pattern}$"},
}
TARGETS = {
    "agents": nullable({"type": "array", "minItems": 1, "maxItems": MAX_TARGET_AGENTS,
                        "items": {"type": "string", "pattern": AGENT_ID_REGEX},
                        "description": "run only on these agent ids; not together with labels"}),
    "labels": nullable(dict(LABELS, minProperties=1,
                            description="run only on agents that carry all these labels; not "
                                        "together with agents")),
}

TASK_FIELDS = {
    "task_id": {"type": "string", "format": "uuid"},
    "command": {"type": "string"},
    "frequency": {"type": "string"},
    "timezone": {"type": "string"},
    "catchup": {"type": "number", "minimum": 0},
    "overlap": {"type": "string", "enum": list(OVERLAP_POLICIES)},
    "jitter": {"type": "number", "minimum": 0},
    "timeout": {"type": ["number", "null"]},
    "environment": {"type": "object", "additionalProperties": {"type": "string"}},
}
OUTPUT_FIELDS = {
    "agent_id": {"type": "string"},
    "stdout": {"type": "string"},
    "stderr": {"type": "string"},
    "stdout_base64": {"type": "string"},
    "stderr_base64": {"type": "string"},
    "exit_code": {"type": ["integer", "null"]},
    "status": {"type": "string", "enum": list(RESULT_STATUSES)},
    "scheduled_for": {"type": "string"},
    "started_at": {"type": ["string", "null"]},
    "finished_at": {"type": "string"},
    "late": {"type": "boolean", "const": True},
    "missed_slots": {"type": "integer", "minimum": 1},
    "first_missed": {"type": ["string", "null"]},
    "reason": {"type": "string"},
    "truncated": {"type": "boolean", "const": True},
    "stdout_bytes": {"type": "integer", "minimum": 0},
    "stderr_bytes": {"type": "integer", "minimum": 0},
}

TASK_VIEW_FIELDS = dict(
    TASK_FIELDS,
    state={"type": "string", "enum": ["active", "paused", "deleted"]},
    agents={"type": ["array", "null"], "items": {"type": "string"}},
    labels={"type": ["object", "null"], "additionalProperties": {"type": "string"}},
    created_at={"type": "string"},
    updated_at={"type": "string"},
    deleted_at={"type": ["string", "null"]},
)
RUN_FIELDS = {
    "run_id": {"type": "integer", "minimum": 1},
    "agent_id": {"type": "string"},
    "trigger": {"type": "string", "enum": ["scheduled", "manual"]},
    "manual_run_id": {"type": "string"},
    "scheduled_for": {"type": "string"},
    "started_at": {"type": ["string", "null"]},
    "finished_at": {"type": "string"},
    "received_at": {"type": "string"},
    "status": {"type": "string", "enum": list(RESULT_STATUSES)},
    "exit_code": {"type": ["integer", "null"]},
    "stdout_bytes": {"type": "integer", "minimum": 0},
    "stderr_bytes": {"type": "integer", "minimum": 0},
    "late": {"type": "boolean", "const": True},
    "truncated": {"type": "boolean", "const": True},
    "missed_slots": {"type": "integer", "minimum": 1},
    "first_missed": {"type": ["string", "null"]},
    "reason": {"type": "string"},
}
RUN_REQUIRED = ["run_id", "agent_id", "trigger", "scheduled_for", "started_at", "finished_at",
                "received_at", "status", "exit_code", "stdout_bytes", "stderr_bytes"]

SCHEMAS: dict[str, Any] = {
    "Error": closed_object({
        "error": {"type": "string", "description": "what is wrong, and how to fix it"},
        "field": {"type": "string", "description": "the body field or path parameter at fault"},
    }, required=["error"]),
    "CreateTaskRequest": open_object(dict({
        "command": {"type": "string", "minLength": 1, "maxLength": MAX_COMMAND_LENGTH,
                    "pattern": TEXT_REGEX,
                    "description": "run as one argument of `/bin/sh -c` (`cmd.exe /c` on Windows)"},
        "frequency": {"type": "string", "minLength": 1, "maxLength": MAX_FREQUENCY_LENGTH,
                      "pattern": TEXT_REGEX,
                      "description": "5-field cron expression, cron macro or interval; an invalid "
                                     "one is a 400 that says why"},
    }, **TASK_OPTIONS, **TARGETS), required=["command", "frequency"]),
    "UpdateTaskRequest": open_object(dict({
        "command": {"type": "string", "minLength": 1, "maxLength": MAX_COMMAND_LENGTH,
                    "pattern": TEXT_REGEX},
        "frequency": {"type": "string", "minLength": 1, "maxLength": MAX_FREQUENCY_LENGTH,
                      "pattern": TEXT_REGEX},
    }, **TASK_OPTIONS, **TARGETS)),
    "AgentTask": closed_object(dict(TASK_FIELDS, manual_runs={
        "type": "array", "description": "manual runs this agent has yet to run once",
        "items": closed_object({"run_id": {"type": "string", "format": "uuid"},
                                "requested_at": {"type": "string"}},
                               required=["run_id", "requested_at"])}),
        required=list(TASK_FIELDS)),
    "TaskView": closed_object(TASK_VIEW_FIELDS, required=list(TASK_VIEW_FIELDS)),
    "CreatedTask": closed_object(dict(TASK_VIEW_FIELDS, command_id={"type": "string", "format": "uuid"}),
                                 required=[*TASK_VIEW_FIELDS, "command_id"]),
    "TaskDetail": closed_object(dict(TASK_VIEW_FIELDS,
                                     matching_agents={"type": "array", "items": {"type": "string"}},
                                     next_fire_times={"type": "array", "items": {"type": "string"}},
                                     next_fire_times_local={"type": "array", "items": {"type": "string"}}),
                                required=[*TASK_VIEW_FIELDS, "matching_agents", "next_fire_times",
                                          "next_fire_times_local"]),
    "TaskList": closed_object({"tasks": {"type": "array", "items": {"$ref": "#/components/schemas/TaskView"}},
                               "next_cursor": {"type": ["string", "null"]}},
                              required=["tasks", "next_cursor"]),
    "ManualRunAccepted": closed_object({
        "task_id": {"type": "string", "format": "uuid"},
        "run_id": {"type": "string", "format": "uuid"},
        "requested_at": {"type": "string"},
        "agents": {"type": "array", "items": {"type": "string"},
                   "description": "the targeted agents that registered by the request"},
    }, required=["task_id", "run_id", "requested_at", "agents"]),
    "RunSummary": closed_object(RUN_FIELDS, required=RUN_REQUIRED),
    "Run": closed_object(dict(RUN_FIELDS, task_id={"type": "string", "format": "uuid"},
                              stdout={"type": "string"}, stderr={"type": "string"},
                              stdout_base64={"type": "string"}, stderr_base64={"type": "string"}),
                         required=[*RUN_REQUIRED, "task_id"]),
    "RunList": closed_object({
        "task_id": {"type": "string", "format": "uuid"},
        "runs": {"type": "array", "items": {"$ref": "#/components/schemas/RunSummary"}},
        "next_cursor": {"type": ["string", "null"]},
    }, required=["task_id", "runs", "next_cursor"]),
    "Output": closed_object(OUTPUT_FIELDS, required=["agent_id", "exit_code", "status", "scheduled_for",
                                                     "started_at", "finished_at"]),
    "LatestOutput": closed_object({
        "task_id": {"type": "string", "format": "uuid"},
        "scheduled_for": {"type": "string"},
        "completion_time": {"type": ["string", "null"]},
        "complete_reason": {"type": "string", "enum": ["all_reported", "deadline_passed"]},
        "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Output"}},
        "not_reported": {"type": "array", "items": closed_object({
            "agent_id": {"type": "string"},
            "reason": {"type": "string", "enum": ["offline", "running", "no_report"]},
        }, required=["agent_id", "reason"])},
        "groups": {"type": "array", "items": closed_object({
            "agent_ids": {"type": "array", "items": {"type": "string"}},
            "count": {"type": "integer", "minimum": 1},
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "stdout_base64": {"type": "string"},
            "stderr_base64": {"type": "string"},
            "exit_code": {"type": ["integer", "null"]},
        }, required=["agent_ids", "count", "exit_code"])},
    }, required=["task_id", "completion_time"]),
    "ReportRequest": open_object({
        "server_id": {"type": "string", "pattern": AGENT_ID_REGEX, "description": "the reporting agent's id"},
        "stdout": nullable({"type": "string", "maxLength": MAX_OUTPUT_LENGTH,
                            "description": "longer is a 413; NUL is stored as U+FFFD"}),
        "stderr": nullable({"type": "string", "maxLength": MAX_OUTPUT_LENGTH,
                            "description": "longer is a 413; NUL is stored as U+FFFD"}),
        "exit_code": nullable({"type": "integer", "minimum": -(2 ** 31), "maximum": 2 ** 31 - 1}),
        "status": nullable({"type": "string", "enum": list(RESULT_STATUSES)}),
        "scheduled_for": nullable(dict(TIMESTAMP, description="one of the task's slots, not in the "
                                                              "future; default: the slot due now")),
        "started_at": nullable(TIMESTAMP),
        "finished_at": nullable(TIMESTAMP),
        "missed_slots": nullable({"type": "integer", "minimum": 1, "maximum": 2 ** 31 - 1,
                                  "description": "only with status missed"}),
        "first_missed": nullable(dict(TIMESTAMP, description="only with status missed")),
        "late": nullable({"type": "boolean", "description": "not true with status skipped or missed"}),
        "reason": nullable({"type": "string", "maxLength": MAX_REASON_LENGTH, "pattern": NO_NUL_REGEX}),
        "stdout_bytes": nullable({"type": "integer", "minimum": 0, "maximum": MAX_BYTE_COUNT}),
        "stderr_bytes": nullable({"type": "integer", "minimum": 0, "maximum": MAX_BYTE_COUNT}),
        "truncated": nullable({"type": "boolean"}),
        "stdout_base64": nullable({"type": "string", "pattern": BASE64_REGEX,
                                   "maxLength": (MAX_OUTPUT_LENGTH + 2) // 3 * 4}),
        "stderr_base64": nullable({"type": "string", "pattern": BASE64_REGEX,
                                   "maxLength": (MAX_OUTPUT_LENGTH + 2) // 3 * 4}),
        "trigger": nullable({"type": "string", "enum": ["scheduled", "manual"],
                             "description": "manual for a run requested with POST .../run (default "
                                            "scheduled); it then needs manual_run_id"}),
        "manual_run_id": nullable({"type": "string", "description": "only with trigger manual"}),
    }, required=["server_id"]),
    "ReportAccepted": closed_object({
        "task_id": {"type": "string", "format": "uuid"},
        "agent_id": {"type": "string"},
        "scheduled_for": {"type": "string"},
        "trigger": {"type": "string", "enum": ["scheduled", "manual"]},
        "duplicate": {"type": "boolean"},
    }, required=["task_id", "agent_id", "scheduled_for", "trigger", "duplicate"]),
    "RegisterAgentRequest": open_object({
        "hostname": nullable({"type": "string", "maxLength": MAX_HOSTNAME_LENGTH, "pattern": NO_NUL_REGEX}),
        "platform": nullable({"type": "string", "maxLength": MAX_PLATFORM_LENGTH, "pattern": NO_NUL_REGEX}),
        "version": nullable({"type": "string", "maxLength": MAX_VERSION_LENGTH, "pattern": NO_NUL_REGEX}),
        "push_url": nullable({"type": "string", "maxLength": MAX_PUSH_URL_LENGTH, "pattern": PUSH_URL_REGEX,
                              "description": "where the server pushes new tasks; null for none"}),
        "outbox_depth": nullable({"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1}),
        "outbox_dropped": nullable({"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1}),
        "labels": nullable(dict(LABELS, description="the agent's labels; left out or null keeps "
                                                    "the stored ones")),
        "clock": nullable(dict(TIMESTAMP, description="the agent's clock when it sent the request, "
                                                      "for the clock offset")),
    }),
    "RegisteredAgent": closed_object({
        "agent_id": {"type": "string"},
        "registered_at": {"type": "string"},
    }, required=["agent_id", "registered_at"]),
    "AgentTaskList": closed_object({
        "agent_id": {"type": "string"},
        "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/AgentTask"}},
    }, required=["agent_id", "tasks"]),
    "AgentList": closed_object({"agents": {"type": "array", "items": closed_object({
        "agent_id": {"type": "string"},
        "hostname": {"type": "string"},
        "platform": {"type": "string"},
        "version": {"type": "string"},
        "push_url": {"type": ["string", "null"]},
        "registered_at": {"type": "string"},
        "last_seen_at": {"type": "string"},
        "state": {"type": "string", "enum": ["online", "offline"]},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "clock_offset": {"type": ["number", "null"],
                         "description": "seconds the agent's clock was ahead of the server's at "
                                        "its last heartbeat (negative: behind)"},
        "outbox_depth": {"type": "integer", "minimum": 0},
        "outbox_dropped": {"type": "integer", "minimum": 0},
    }, required=["agent_id", "hostname", "platform", "version", "push_url", "registered_at",
                 "last_seen_at", "state", "labels", "clock_offset", "outbox_depth",
                 "outbox_dropped"])}}, required=["agents"]),
    "EnrollRequest": open_object({
        "previous_token": {"type": "string", "pattern": "^[A-Za-z0-9._~+/-]+=*$",
                           "description": "the agent's expired token, to enroll its id again"},
    }),
    "RevokedToken": closed_object({
        "agent_id": {"type": "string", "pattern": AGENT_ID_REGEX},
        "revoked": {"const": True},
    }, required=["agent_id", "revoked"]),
    "Enrollment": closed_object({
        "agent_id": {"type": "string"},
        "agent_token": {"type": "string", "description": "the agent's own token for its later calls"},
        "push_secret": {"type": "string", "description": "the secret the server signs pushes to this "
                                                         "agent with"},
        "expires_at": {"type": ["string", "null"], "format": "date-time",
                       "description": "when the agent token expires (RFC 3339, UTC), or null when "
                                      "the server sets no agent token lifetime; the agent then "
                                      "enrolls again with the enrollment token"},
    }, required=["agent_id", "agent_token", "push_secret", "expires_at"]),
    "Health": closed_object({"status": {"type": "string", "const": "ok"}}, required=["status"]),
    "Ready": closed_object({"status": {"type": "string", "const": "ready"}}, required=["status"]),
}

SECURITY_SCHEMES = {
    "operatorToken": {
        "type": "http", "scheme": "bearer",
        "description": "An operator token in `Authorization: Bearer TOKEN`. An admin token may "
                       "call every operator operation; a read token only the GET operations.",
    },
    "agentToken": {
        "type": "http", "scheme": "bearer",
        "description": "The token an agent receives at enrollment. It is valid only on its own "
                       "agent id: registration, its task list and its reports.",
    },
    "enrollmentToken": {
        "type": "http", "scheme": "bearer",
        "description": "A token an operator issues so that one new agent can enroll.",
    },
}

# ---------------------------------------------------------------------------
# Operations, keyed by path and lower-case method as bottle routes them
# ---------------------------------------------------------------------------

PATHS: dict[str, dict[str, dict]] = {
    "/healthz": {"get": operation(
        "health", "Return 200 while the process is up, even when the database is down.", PUBLIC,
        {"200": json_response("The process is up.", {"$ref": "#/components/schemas/Health"})},
        tag="service")},
    "/readyz": {"get": operation(
        "ready", "Return 200 while the database answers a trivial query, and 503 otherwise.", PUBLIC,
        {"200": json_response("The database answered.", {"$ref": "#/components/schemas/Ready"}),
         "503": error_response("The database did not answer; the server log has the error.")},
        tag="service")},
    "/metrics": {"get": operation(
        "metrics", "Return the server's Prometheus metrics in the text format 0.0.4. HTTP Basic "
        "authentication with the token as the password is accepted too.", OPERATOR_READ,
        {"200": {"description": "The metrics.",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}},
        tag="service")},
    OPENAPI_PATH: {"get": operation(
        "openapi", "Return this OpenAPI document.", PUBLIC,
        {"200": json_response("The OpenAPI document.", {"type": "object"})}, tag="service")},
    "/api/v1/tasks/create": {"post": operation(
        "createTask", "Create a task that every agent runs at each slot of its frequency.",
        OPERATOR_ADMIN,
        {"201": json_response("The task was stored; `command_id` equals `task_id`.",
                              {"$ref": "#/components/schemas/CreatedTask"})},
        body_schema="CreateTaskRequest", tag="tasks")},
    "/api/v1/tasks": {"get": operation(
        "listTasks", "List tasks with their options, oldest first, a page at a time.", OPERATOR_READ,
        {"200": json_response("One page of tasks; `next_cursor` is null on the last page.",
                              {"$ref": "#/components/schemas/TaskList"})},
        parameters=(LIMIT_PARAMETER, CURSOR_PARAMETER, {
            "name": "state", "in": "query", "required": False,
            "description": "only tasks in this state (default: active and paused)",
            "schema": {"type": "string", "enum": ["active", "paused", "deleted"]},
        }), tag="tasks")},
    "/api/v1/tasks/{task_id}": {
        "get": operation(
            "showTask", "Return one task with the agents it targets and its next five fire times "
            "in UTC and in its time zone (none unless active).", OPERATOR_READ,
            {"200": json_response("The task, also when deleted (`state: deleted`).",
                                  {"$ref": "#/components/schemas/TaskDetail"})},
            parameters=(TASK_ID_PARAMETER,), tag="tasks"),
        "patch": operation(
            "updateTask", "Change a task's command, frequency, options or targets; fields left "
            "out keep their value, and null resets an option to its default.", OPERATOR_ADMIN,
            {"200": json_response("The changed task.", {"$ref": "#/components/schemas/TaskView"}),
             "409": TASK_DELETED},
            body_schema="UpdateTaskRequest", parameters=(TASK_ID_PARAMETER,), tag="tasks"),
        "delete": operation(
            "deleteTask", "Delete a task: it leaves every agent's task list, and its history stays "
            "readable until retention removes it. Deleting it again changes nothing.",
            OPERATOR_ADMIN,
            {"200": json_response("The task, with `state: deleted`.",
                                  {"$ref": "#/components/schemas/TaskView"})},
            parameters=(TASK_ID_PARAMETER,), tag="tasks"),
    },
    "/api/v1/tasks/{task_id}/pause": {"post": operation(
        "pauseTask", "Pause a task: it leaves every agent's task list until resumed. The body, if "
        "any, is ignored.", OPERATOR_ADMIN,
        {"200": json_response("The task, with `state: paused`.", {"$ref": "#/components/schemas/TaskView"}),
         "409": TASK_DELETED},
        parameters=(TASK_ID_PARAMETER,), tag="tasks")},
    "/api/v1/tasks/{task_id}/resume": {"post": operation(
        "resumeTask", "Resume a paused task from its next slot; slots of the pause do not run. "
        "The body, if any, is ignored.", OPERATOR_ADMIN,
        {"200": json_response("The task, with `state: active`.", {"$ref": "#/components/schemas/TaskView"}),
         "409": TASK_DELETED},
        parameters=(TASK_ID_PARAMETER,), tag="tasks")},
    "/api/v1/tasks/{task_id}/run": {"post": operation(
        "runTask", "Run an active task once now on every agent it targets, outside its schedule. "
        "The body, if any, is ignored.", OPERATOR_ADMIN,
        {"202": json_response("The manual run is recorded; agents start it at their next sync.",
                              {"$ref": "#/components/schemas/ManualRunAccepted"}),
         "409": TASK_DELETED},
        parameters=(TASK_ID_PARAMETER,), tag="tasks")},
    "/api/v1/tasks/{task_id}/runs": {"get": operation(
        "listRuns", "List a task's runs, newest first, without their output.", OPERATOR_READ,
        {"200": json_response("One page of runs; `next_cursor` is null on the last page.",
                              {"$ref": "#/components/schemas/RunList"})},
        parameters=(TASK_ID_PARAMETER, LIMIT_PARAMETER, CURSOR_PARAMETER, {
            "name": "agent", "in": "query", "required": False, "description": "only this agent's runs",
            "schema": {"type": "string", "pattern": AGENT_ID_REGEX},
        }, {
            "name": "status", "in": "query", "required": False, "description": "only runs with this status",
            "schema": {"type": "string", "enum": list(RESULT_STATUSES)},
        }), tag="tasks")},
    "/api/v1/tasks/{task_id}/runs/{run_id}": {"get": operation(
        "showRun", "Return one run of a task with its full output.", OPERATOR_READ,
        {"200": json_response("The run.", {"$ref": "#/components/schemas/Run"}),
         "404": error_response("No task has this id, or the task has no run with this id.")},
        parameters=(TASK_ID_PARAMETER, RUN_ID_PARAMETER), tag="tasks")},
    "/api/v1/tasks/{task_id}/latest_output": {"get": operation(
        "latestOutput", "Return the outputs of the task's newest complete scheduled execution, "
        "and the targeted agents that did not report it.", OPERATOR_READ,
        {"200": json_response("The newest complete execution, or `completion_time: null` and no "
                              "outputs while none is complete. With `group_by=output`, `groups` "
                              "replaces `outputs`.",
                              {"$ref": "#/components/schemas/LatestOutput"})},
        parameters=(TASK_ID_PARAMETER, {
            "name": "group_by", "in": "query", "required": False,
            "description": "output: group agents whose stdout, stderr and exit code are equal",
            "schema": {"type": "string", "enum": ["output"]},
        }), tag="tasks")},
    "/api/v1/tasks/{task_id}/complete": {"post": operation(
        "completeTask", "Record one agent's report of one slot of the task.", AGENT_ONLY,
        {"201": json_response("The report was stored.", {"$ref": "#/components/schemas/ReportAccepted"}),
         "200": json_response("The same agent already reported this slot; nothing was stored.",
                              {"$ref": "#/components/schemas/ReportAccepted"}),
         "409": error_response("The task was deleted before this slot.")},
        body_schema="ReportRequest", parameters=(TASK_ID_PARAMETER,), tag="agents")},
    "/api/v1/agents": {"get": operation(
        "listAgents", "List every agent, with its state online or offline.", OPERATOR_READ,
        {"200": json_response("All agents, by id.", {"$ref": "#/components/schemas/AgentList"})},
        tag="agents")},
    "/api/v1/agents/{agent_id}": {"put": operation(
        "registerAgent", "Register an agent, or record its heartbeat.", AGENT_ONLY,
        {"201": json_response("The agent was registered.", {"$ref": "#/components/schemas/RegisteredAgent"}),
         "200": json_response("The agent was known; its details were updated.",
                              {"$ref": "#/components/schemas/RegisteredAgent"})},
        body_schema="RegisterAgentRequest", parameters=(AGENT_ID_PARAMETER,), tag="agents")},
    "/api/v1/agents/{agent_id}/tasks": {"get": operation(
        "agentTasks", "Return the agent's full task list; also a heartbeat.", AGENT_ONLY,
        {"200": json_response("The active tasks that target this agent, oldest first.",
                              {"$ref": "#/components/schemas/AgentTaskList"})},
        parameters=(AGENT_ID_PARAMETER,), tag="agents")},
    "/api/v1/agents/{agent_id}/enroll": {"post": operation(
        "enrollAgent", "Exchange an enrollment token for the agent's own token and push secret. "
        "The body is optional. An id whose token expired enrolls again only with that token "
        "as `previous_token`.",
        ENROLLMENT,
        {"201": json_response("The agent is enrolled. The token and secret are shown only here.",
                              {"$ref": "#/components/schemas/Enrollment"}),
         "404": error_response("The server runs without tokens, so agents need no enrollment."),
         "409": error_response("The agent id is enrolled, and its token has not expired or "
                               "`previous_token` is not that token; an admin must revoke its "
                               "token first with DELETE /api/v1/agents/{agent_id}/token."),
         "400": BAD_REQUEST, "413": TOO_LARGE, "415": UNSUPPORTED_TYPE},
        parameters=(AGENT_ID_PARAMETER,), tag="agents")},
    "/api/v1/agents/{agent_id}/token": {"delete": operation(
        "revokeAgentToken", "Revoke an agent's token and push secret, so that it may enroll again.",
        OPERATOR_ADMIN,
        {"200": json_response("The token is revoked.", {"$ref": "#/components/schemas/RevokedToken"}),
         "404": error_response("No agent has this id.")},
        parameters=(AGENT_ID_PARAMETER,), tag="agents")},
}


PATHS["/api/v1/agents/{agent_id}/enroll"]["post"]["requestBody"] = {
    "required": False,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EnrollRequest"}}},
}

# OpenAPI links: which later operations take an id from a response. They document the
# API's flow, and schemathesis follows them to test operations on ids that exist.
TASK_LINKS = {
    "showTask": {"operationId": "showTask", "parameters": {"task_id": "$response.body#/task_id"}},
    "latestOutput": {"operationId": "latestOutput", "parameters": {"task_id": "$response.body#/task_id"}},
    "completeTask": {"operationId": "completeTask", "parameters": {"task_id": "$response.body#/task_id"}},
    "updateTask": {"operationId": "updateTask", "parameters": {"task_id": "$response.body#/task_id"}},
    "pauseTask": {"operationId": "pauseTask", "parameters": {"task_id": "$response.body#/task_id"}},
    "resumeTask": {"operationId": "resumeTask", "parameters": {"task_id": "$response.body#/task_id"}},
    "runTask": {"operationId": "runTask", "parameters": {"task_id": "$response.body#/task_id"}},
    "listRuns": {"operationId": "listRuns", "parameters": {"task_id": "$response.body#/task_id"}},
    "deleteTask": {"operationId": "deleteTask", "parameters": {"task_id": "$response.body#/task_id"}},
}
AGENT_LINKS = {
    "agentTasks": {"operationId": "agentTasks", "parameters": {"agent_id": "$response.body#/agent_id"}},
}
PATHS["/api/v1/tasks/create"]["post"]["responses"]["201"]["links"] = TASK_LINKS
for status in ("200", "201"):
    PATHS["/api/v1/agents/{agent_id}"]["put"]["responses"][status]["links"] = AGENT_LINKS


def bottle_rule(path: str) -> str:
    """Return the bottle route rule of an OpenAPI path: /tasks/{task_id} -> /tasks/<task_id>."""
    return path.replace("{", "<").replace("}", ">")


def build_spec(routes: Iterable[tuple[str, str]], server_version: str) -> dict:
    """Build the OpenAPI document for an application with these (METHOD, rule) routes.

    Only operations with a route are described, so the document never promises an
    endpoint that this server lacks.
    """
    routed = {(method.lower(), rule) for method, rule in routes}
    paths: dict[str, dict] = {}
    for path, operations in PATHS.items():
        for method, described in operations.items():
            if (method, bottle_rule(path)) in routed:
                paths.setdefault(path, {})[method] = copy.deepcopy(described)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskscheduler",
            "version": server_version,
            "description": (
                "Create periodic shell commands that run on every registered agent, and read "
                "each host's output. Every error has the shape "
                '{"error": MESSAGE, "field": NAME}, with `field` present when one field is at '
                "fault. Unknown body fields are ignored. Wrong methods are a 405 with an `Allow` "
                "header, unknown paths a 404. Bodies over "
                f"{MAX_BODY_BYTES} bytes are a 413, sent before the body is read in full."
            ),
        },
        "paths": paths,
        "components": {"schemas": copy.deepcopy(SCHEMAS), "securitySchemes": copy.deepcopy(SECURITY_SCHEMES)},
    }
