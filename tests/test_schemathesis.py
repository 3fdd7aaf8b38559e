"""schemathesis against a live server process, over every operation in its OpenAPI document.

The server runs on 127.0.0.1 with a fresh SQLite database and publishes the document
at /api/v1/openapi.json. schemathesis sends valid and invalid requests to every
operation (its examples, coverage, fuzzing and stateful phases), and every response must
be a non-5xx that the document describes: status code, content type, headers and JSON
schema. Invalid requests must be rejected, and methods the document does not list must
get a 405 with an Allow header.

The test runs the schemathesis command line. Its pytest integration for schemas that
come from a fixture (`schemathesis.pytest.from_fixture`) fails on pytest 9.2 with
"AttributeError: 'Function' object has no attribute '_nodeid'" (schemathesis 4.32.5),
and a schema loaded at import time would need the server before collection.

Select these tests with `-m schema`. Set TASKSCHEDULER_SCHEMATHESIS_SEED to try other
inputs than the fixed default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from openapi import OPENAPI_PATH
from processes import HTTP_TIMEOUT_SECONDS, ServerProcess

pytestmark = pytest.mark.schema

# Cases per operation and phase. With one worker the whole run takes about 20 seconds
# on a 2-core machine.
MAX_EXAMPLES = 25
TIME_LIMIT_SECONDS = 110
SEED = os.environ.get("TASKSCHEDULER_SCHEMATHESIS_SEED", "20261204")
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "unsupported_method",
])

# schemathesis registers agents with push URLs it makes up, which may name any host, and
# the server would send a wake-up to each at the next task it creates.
SERVER_ARGUMENTS = ("--no-push",)

# The tokens of the server that enforces them. schemathesis sends the admin token with
# every request. The ignored_auth check also sends requests without it or with a wrong one,
# which must be rejected with 401.
ADMIN_TOKEN = "schemathesis-admin-token-0123456789"
TOKEN_ENVIRONMENT = {
    "TASKSCHEDULER_ADMIN_TOKENS": ADMIN_TOKEN,
    "TASKSCHEDULER_READ_TOKENS": "schemathesis-read-token-0123456789",
    "TASKSCHEDULER_ENROLLMENT_TOKEN": "schemathesis-enrollment-token-0123456789",
}


def write_config(path: Path, task_id: str, agent_id: str) -> None:
    """Write a schemathesis.toml that sends a known task id, agent id and frequency half the time.

    Random UUIDs and agent ids name nothing, and random frequencies are invalid, so
    without these the operations on a task would only ever return 404 or 400.
    """
    path.write_text(f"""
[dictionaries.task_ids]
values = [{json.dumps(task_id)}]

[dictionaries.agent_ids]
values = [{json.dumps(agent_id)}]

[dictionaries.frequencies]
values = ["every 5 minutes", "*/15 * * * *", "@daily", "30s"]

[parameters]
"path.task_id" = {{ dictionary = "task_ids", probability = 0.5 }}
"path.agent_id" = {{ dictionary = "agent_ids", probability = 0.5 }}
"body.server_id" = {{ dictionary = "agent_ids", probability = 0.5 }}
"body.frequency" = {{ dictionary = "frequencies", probability = 0.5 }}
""")


def run_schemathesis(server: ServerProcess, directory: Path, checks: str,
                     authorization: str | None, agent_token: str | None) -> None:
    """Create a task and an agent on the server, run schemathesis on it and check its verdict."""
    session = requests.Session()
    operator = {"Authorization": authorization} if authorization else {}
    agent_headers = {"Authorization": f"Bearer {agent_token}"} if agent_token else {}
    created = session.post(server.url + "/api/v1/tasks/create", headers=operator,
                           json={"command": "true", "frequency": "every 5 minutes"},
                           timeout=HTTP_TIMEOUT_SECONDS)
    assert created.status_code == 201, created.text
    registered = session.put(server.url + "/api/v1/agents/web-1", json={}, headers=agent_headers,
                             timeout=HTTP_TIMEOUT_SECONDS)
    assert registered.status_code in (200, 201), registered.text
    config = directory / "schemathesis.toml"
    write_config(config, created.json()["task_id"], "web-1")

    command = [str(SCHEMATHESIS), "--no-color", "--config-file", str(config), "run",
               server.url + OPENAPI_PATH, "--checks", checks, "--max-examples", str(MAX_EXAMPLES),
               "--seed", SEED, "--workers", "1", "--report-dir", str(directory / "report")]
    if authorization:
        command += ["--header", f"Authorization: {authorization}"]
    finished = subprocess.run(command, cwd=directory, capture_output=True, text=True,
                              timeout=TIME_LIMIT_SECONDS)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, f"schemathesis failed:\n{output}\n{server.log_tail(60)}"
    operations = sum(len(methods) for methods in requests.get(
        server.url + OPENAPI_PATH, timeout=HTTP_TIMEOUT_SECONDS).json()["paths"].values())
    # schemathesis leaves out the operation that serves the document it tests.
    assert f"Tested: {operations - 1}" in output, output


def test_open_server_conforms_to_openapi(tmp_path):
    server = ServerProcess(tmp_path / "server.log", data_dir=tmp_path / "data",
                           extra_arguments=SERVER_ARGUMENTS).start()
    try:
        # Without tokens every operation runs its full validation, so this run reaches the
        # deepest code paths. The server ignores the Authorization header, which keeps
        # schemathesis from expecting a 401 for requests without it.
        run_schemathesis(server, tmp_path, CHECKS, authorization="Bearer ignored-by-an-open-server",
                         agent_token=None)
    finally:
        server.stop()


def test_server_with_tokens_conforms_to_openapi(tmp_path):
    server = ServerProcess(tmp_path / "server.log", data_dir=tmp_path / "data",
                           extra_arguments=SERVER_ARGUMENTS, environment=TOKEN_ENVIRONMENT).start()
    try:
        enrolled = requests.post(
            server.url + "/api/v1/agents/web-1/enroll", timeout=HTTP_TIMEOUT_SECONDS,
            headers={"Authorization": f"Bearer {TOKEN_ENVIRONMENT['TASKSCHEDULER_ENROLLMENT_TOKEN']}"})
        assert enrolled.status_code == 201, enrolled.text
        run_schemathesis(server, tmp_path, CHECKS + ",ignored_auth,missing_required_header",
                         authorization=f"Bearer {ADMIN_TOKEN}", agent_token=enrolled.json()["agent_token"])
    finally:
        server.stop()
