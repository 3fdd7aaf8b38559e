"""REST contract of the server: tasks, reports, agents and error responses.

Every test runs against the real bottle app on a fresh SQLite file and on a fresh
PostgreSQL schema (the `app` fixture), with the recording pusher of conftest.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid

import pytest

import models
import server
from agent import UTC, parse_frequency, parse_time

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
PUSH_URL = "http://127.0.0.1:9/"
# The task options of a task created without any.
DEFAULT_OPTIONS = {"timezone": "UTC", "catchup": 0, "overlap": "skip", "jitter": 0, "timeout": None,
                   "environment": {}}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def create_task(app, command="echo hello", frequency="every 5 minutes"):
    response = app.post_json("/api/v1/tasks/create", {"command": command, "frequency": frequency})
    assert response.status_int == 201
    return response.json


def stored_task_count(app):
    return len(app.get("/api/v1/tasks").json["tasks"])


def stored_agent_count(app):
    return len(app.get("/api/v1/agents").json["agents"])


def register_agent(app, agent_id, **fields):
    return app.put_json(f"/api/v1/agents/{agent_id}", fields)


def report(app, task_id, body, **kwargs):
    return app.post_json(f"/api/v1/tasks/{task_id}/complete", body, **kwargs)


def make_offline(agent_id):
    """Set an agent's last_seen_at one hour back, past the default 30 s agent timeout."""
    past = models.utc_now() - dt.timedelta(hours=1)
    models.Agent.update(last_seen_at=past).where(models.Agent.id == agent_id).execute()


def post_raw(app, path, body, content_type="application/json"):
    return app.post(path, params=body, content_type=content_type, expect_errors=True)


def assert_json_error(response, status, field, fragment):
    """Check the API's one error shape: {"error": MESSAGE, "field": NAME}."""
    assert response.status_int == status
    assert response.content_type == "application/json"
    assert isinstance(response.json.get("error"), str)
    assert response.json.get("field") == field
    if fragment is not None:
        assert fragment in response.json["error"]


def is_uuid(text):
    try:
        return str(uuid.UUID(text)) == text
    except (TypeError, ValueError):
        return False


def slot_text(frequency, instant):
    """Format the newest slot of `frequency` at or before the aware `instant`."""
    slot = parse_frequency(frequency).latest_at_or_before(instant)
    return slot.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# Creating and reading tasks
# ---------------------------------------------------------------------------


def test_create_returns_task_and_command_ids(app):
    response = app.post_json("/api/v1/tasks/create", {"command": "uptime", "frequency": "every 5 minutes"})

    assert response.status_int == 201
    assert response.content_type == "application/json"
    assert response.json["command_id"] == response.json["task_id"]
    assert is_uuid(response.json["task_id"])
    assert response.json["command"] == "uptime"
    assert response.json["frequency"] == "every 5 minutes"
    assert RFC3339_UTC.match(response.json["created_at"])


def test_create_stores_task(app):
    created = create_task(app, command="df -h", frequency="every 5 minutes")

    task_detail = app.get(f"/api/v1/tasks/{created['task_id']}").json
    listed = app.get("/api/v1/tasks").json["tasks"]

    assert task_detail["task_id"] == created["task_id"]
    assert task_detail["command"] == "df -h"
    assert task_detail["frequency"] == "every 5 minutes"
    assert task_detail["created_at"] == created["created_at"]
    assert listed == [{"task_id": created["task_id"], "command": "df -h", "frequency": "every 5 minutes",
                       **DEFAULT_OPTIONS, "state": "active", "agents": None, "labels": None,
                       "created_at": created["created_at"], "updated_at": created["created_at"],
                       "deleted_at": None}]


def test_show_task_lists_next_fire_times(app):
    created = create_task(app, frequency="every 5 minutes")
    before = dt.datetime.now(UTC)

    fire_texts = app.get(f"/api/v1/tasks/{created['task_id']}").json["next_fire_times"]

    assert len(fire_texts) == 5
    for text in fire_texts:
        assert RFC3339_UTC.match(text), text
    fire_times = [parse_time(text) for text in fire_texts]
    assert fire_times[0] > before
    assert fire_times[0] <= before + dt.timedelta(minutes=5)
    for earlier, later in zip(fire_times, fire_times[1:]):
        assert later - earlier == dt.timedelta(minutes=5)
    for instant in fire_times:
        assert instant.timestamp() % 300 == 0, instant


@pytest.mark.parametrize("frequency, part, allowed", [
    ("5/15 * * * *", "minute", {5, 20, 35, 50}),
    ("10-50/20 * * * *", "minute", {10, 30, 50}),
    ("0 9 * * MON-FRI", "weekday", {0, 1, 2, 3, 4}),
    ("0 9 * * MON-FRI", "hour", {9}),
    ("0 0 1 JAN *", "month", {1}),
    ("0 0 1 JAN *", "day", {1}),
])
def test_show_task_fire_times_follow_cron(app, frequency, part, allowed):
    created = create_task(app, frequency=frequency)

    fire_texts = app.get(f"/api/v1/tasks/{created['task_id']}").json["next_fire_times"]

    for instant in (parse_time(text) for text in fire_texts):
        value = instant.weekday() if part == "weekday" else getattr(instant, part)
        assert value in allowed, instant


def test_create_pushes_to_online_agents(app, pusher):
    register_agent(app, "push-online", push_url=PUSH_URL)
    register_agent(app, "no-push-url")
    register_agent(app, "push-offline", push_url="http://127.0.0.1:10/")
    make_offline("push-offline")

    created = create_task(app, command="hostname", frequency="@hourly")

    assert len(pusher.pushes) == 1
    pushed_task_id, pushed_targets = pusher.pushes[0]
    assert pushed_task_id == created["task_id"]
    # Without tokens the agents have no push secret, so their wake-ups go unsigned.
    assert pushed_targets == [("push-online", PUSH_URL, None)]


def test_create_without_agents_pushes_to_nobody(app, pusher):
    create_task(app)

    pushed_agents = [agent for _task, agents in pusher.pushes for agent in agents]

    assert pushed_agents == []


@pytest.mark.parametrize("config", [server.ServerConfig(push=False)], ids=["no-push"])
def test_server_without_push_sends_nothing(app, pusher):
    register_agent(app, "push-online", push_url=PUSH_URL)

    created = create_task(app, command="hostname", frequency="@hourly")

    assert created["command"] == "hostname"
    assert pusher.pushes == []


def test_no_push_option_read_from_environment(monkeypatch):
    assert server.build_parser().parse_args([]).push is True
    assert server.build_parser().parse_args(["--no-push"]).push is False
    monkeypatch.setenv("TASKSCHEDULER_NO_PUSH", "1")
    assert server.build_parser().parse_args([]).push is False


def json_body(data):
    return json.dumps(data).encode("utf-8")


VALID_FREQUENCY = "every 5 minutes"

CREATE_REJECTS = [
    # (case id, body, content type, status, field, fragment of the message)
    ("command-missing", json_body({"frequency": VALID_FREQUENCY}), "application/json",
     400, "command", "missing"),
    ("command-empty", json_body({"command": "", "frequency": VALID_FREQUENCY}), "application/json",
     400, "command", "empty"),
    ("command-whitespace", json_body({"command": " \t\n ", "frequency": VALID_FREQUENCY}),
     "application/json", 400, "command", "empty"),
    ("command-number", json_body({"command": 42, "frequency": VALID_FREQUENCY}), "application/json",
     400, "command", "must be a string"),
    ("command-list", json_body({"command": ["echo", "hi"], "frequency": VALID_FREQUENCY}),
     "application/json", 400, "command", "must be a string"),
    ("command-null", json_body({"command": None, "frequency": VALID_FREQUENCY}), "application/json",
     400, "command", "missing"),
    ("command-too-long", json_body({"command": "x" * 8193, "frequency": VALID_FREQUENCY}),
     "application/json", 400, "command", "8192"),
    ("command-nul", json_body({"command": "echo a\x00b", "frequency": VALID_FREQUENCY}),
     "application/json", 400, "command", "NUL"),
    ("command-lone-surrogate", b'{"command": "echo \\ud800", "frequency": "every 5 minutes"}',
     "application/json", 400, "command", None),
    ("frequency-missing", json_body({"command": "true"}), "application/json",
     400, "frequency", "missing"),
    ("frequency-empty", json_body({"command": "true", "frequency": ""}), "application/json",
     400, "frequency", "empty"),
    ("frequency-number", json_body({"command": "true", "frequency": 5}), "application/json",
     400, "frequency", "must be a string"),
    ("frequency-too-long", json_body({"command": "true", "frequency": "* " * 100 + "*"}),
     "application/json", 400, "frequency", "200"),
    ("sometimes", json_body({"command": "true", "frequency": "sometimes"}), "application/json",
     400, "frequency", "invalid frequency 'sometimes'"),
    ("every-0-seconds", json_body({"command": "true", "frequency": "every 0 seconds"}),
     "application/json", 400, "frequency", "shorter than 1 second"),
    ("0s", json_body({"command": "true", "frequency": "0s"}), "application/json",
     400, "frequency", "shorter than 1 second"),
    ("step-90", json_body({"command": "true", "frequency": "*/90 * * * *"}), "application/json",
     400, "frequency", "larger than the field's range"),
    ("six-fields", json_body({"command": "true", "frequency": "* * * * * *"}), "application/json",
     400, "frequency", "6 fields"),
    ("reboot", json_body({"command": "true", "frequency": "@reboot"}), "application/json",
     400, "frequency", "unknown macro"),
    ("february-30", json_body({"command": "true", "frequency": "0 0 30 2 *"}), "application/json",
     400, "frequency", "never fires"),
    ("minute-L", json_body({"command": "true", "frequency": "L * * * *"}), "application/json",
     400, "frequency", "invalid minute value"),
    ("minute-61", json_body({"command": "true", "frequency": "61 * * * *"}), "application/json",
     400, "frequency", "out of range"),
    ("backwards-range", json_body({"command": "true", "frequency": "5-1 * * * *"}),
     "application/json", 400, "frequency", "backwards"),
    ("superscript-digit", json_body({"command": "true", "frequency": "\u00b2 * * * *"}),
     "application/json", 400, "frequency", "minute"),
    ("not-json", b'{"command": "true", "frequency":', "application/json",
     400, None, "not valid JSON"),
    ("json-list", json_body(["true", VALID_FREQUENCY]), "application/json",
     400, None, "JSON object"),
    ("json-null", b"null", "application/json", 400, None, "JSON object"),
    ("empty-body", b"", "application/json", 400, None, "not valid JSON"),
    ("text-plain", json_body({"command": "true", "frequency": VALID_FREQUENCY}), "text/plain",
     415, None, "Content-Type: application/json"),
    ("not-utf-8", b'{"command": "echo \xff", "frequency": "every 5 minutes"}', "application/json",
     400, None, "UTF-8"),
]


@pytest.mark.parametrize("body, content_type, status, field, fragment",
                         [case[1:] for case in CREATE_REJECTS],
                         ids=[case[0] for case in CREATE_REJECTS])
def test_create_rejects_bad_input(app, pusher, body, content_type, status, field, fragment):
    response = post_raw(app, "/api/v1/tasks/create", body, content_type)

    assert_json_error(response, status, field, fragment)
    assert stored_task_count(app) == 0
    assert pusher.pushes == []


@pytest.mark.parametrize("frequency", [
    "every 30 seconds", "every 5 minutes", "every minute", "30s", "5m", "1h30m", "@every 10s",
    "@hourly", "@daily", "@weekly", "@monthly", "@yearly",
    "0 9 * * MON-FRI", "0 0 1 JAN *", "10-50/20 * * * *", "5/15 * * * *",
])
def test_create_accepts_frequency(app, frequency):
    response = app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": frequency})

    assert response.status_int == 201
    assert response.json["frequency"] == frequency
    task_detail = app.get(f"/api/v1/tasks/{response.json['task_id']}").json
    assert len(task_detail["next_fire_times"]) == 5


def test_show_unknown_task_is_404(app):
    response = app.get(f"/api/v1/tasks/{uuid.uuid4()}", expect_errors=True)

    assert_json_error(response, 404, "task_id", "not found")


# ---------------------------------------------------------------------------
# latest_output
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-task", "DROP TABLE task"])
def test_latest_output_unknown_task_is_404(app, task_id):
    response = app.get(f"/api/v1/tasks/{task_id}/latest_output", expect_errors=True)

    assert_json_error(response, 404, "task_id", "not found")


def test_latest_output_of_new_task_is_empty(app):
    created = create_task(app)

    response = app.get(f"/api/v1/tasks/{created['task_id']}/latest_output")

    assert response.status_int == 200
    assert response.json["task_id"] == created["task_id"]
    assert response.json["completion_time"] is None
    assert response.json["outputs"] == []


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


SLOT = "2026-01-05T10:00:00Z"


def test_complete_stores_report(app):
    created = create_task(app, frequency="@hourly")

    response = report(app, created["task_id"], {
        "server_id": "web-1", "scheduled_for": SLOT, "exit_code": 0, "stdout": "ok\n"})

    assert response.status_int == 201
    assert response.json["task_id"] == created["task_id"]
    assert response.json["agent_id"] == "web-1"
    assert response.json["scheduled_for"] == SLOT
    assert response.json["duplicate"] is False
    assert models.Result.select().count() == 1


def test_complete_repeated_report_is_duplicate(app):
    created = create_task(app, frequency="@hourly")
    body = {"server_id": "web-1", "scheduled_for": SLOT, "exit_code": 0, "stdout": "first\n"}
    first = report(app, created["task_id"], body)

    second = report(app, created["task_id"], dict(body, stdout="second\n"))

    assert first.status_int == 201
    assert second.status_int == 200
    assert second.json["duplicate"] is True
    assert models.Result.select().count() == 1
    assert models.Result.get().stdout == "first\n"


def test_complete_same_slot_with_offset_is_duplicate(app):
    created = create_task(app, frequency="@hourly")
    report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT})

    second = report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": "2026-01-05T12:00:00+02:00"})

    assert second.status_int == 200
    assert second.json["duplicate"] is True
    assert models.Result.select().count() == 1


def test_complete_without_slot_uses_current_one(app):
    frequency = "every 30 seconds"
    created = create_task(app, frequency=frequency)
    before = slot_text(frequency, dt.datetime.now(UTC))

    response = report(app, created["task_id"], {"server_id": "web-1", "exit_code": 0})

    after = slot_text(frequency, dt.datetime.now(UTC))
    assert response.status_int == 201
    assert response.json["scheduled_for"] in {before, after}
    stored = models.Result.get()
    assert stored.scheduled_for.strftime("%Y-%m-%dT%H:%M:%SZ") == response.json["scheduled_for"]


def test_latest_output_lists_agents_in_order(app):
    created = create_task(app, frequency="@hourly")
    reports = [
        {"server_id": "web-3", "stdout": "web out\n", "stderr": "web err\n", "exit_code": 0},
        {"server_id": "db-1", "stdout": "", "stderr": "disk warning\n", "exit_code": 1},
        {"server_id": "cache-2", "stdout": "cache out\n", "stderr": "", "exit_code": -9,
         "status": "timed_out"},
    ]
    for body in reports:
        body.update(scheduled_for=SLOT, started_at="2026-01-05T10:00:01Z",
                    finished_at="2026-01-05T10:00:02.250000Z")
        assert report(app, created["task_id"], body).status_int == 201

    outputs = app.get(f"/api/v1/tasks/{created['task_id']}/latest_output").json["outputs"]

    assert [output["agent_id"] for output in outputs] == ["cache-2", "db-1", "web-3"]
    cache, db, web = outputs
    assert "stderr" not in cache
    assert "stdout" not in db
    assert web["stdout"] == "web out\n"
    assert web["stderr"] == "web err\n"
    assert db["stderr"] == "disk warning\n"
    assert [output["exit_code"] for output in outputs] == [-9, 1, 0]
    assert [output["status"] for output in outputs] == ["timed_out", "failed", "succeeded"]
    for output in outputs:
        for field in ("scheduled_for", "started_at", "finished_at"):
            assert RFC3339_UTC.match(output[field] or ""), (output["agent_id"], field, output[field])
    assert cache["scheduled_for"] == SLOT
    assert cache["finished_at"] == "2026-01-05T10:00:02.250000Z"


def test_latest_output_reports_completion_time(app):
    created = create_task(app, frequency="@hourly")
    for agent_id, finished_at in [("a-1", "2026-01-05T10:00:09Z"), ("b-1", "2026-01-05T10:00:04Z")]:
        report(app, created["task_id"], {"server_id": agent_id, "scheduled_for": SLOT,
                                         "finished_at": finished_at})

    body = app.get(f"/api/v1/tasks/{created['task_id']}/latest_output").json

    assert body["completion_time"] == "2026-01-05T10:00:09Z"
    assert body["scheduled_for"] == SLOT
    assert body["complete_reason"] == "all_reported"


COMPLETE_REJECTS = [
    # (case id, body, status, field, fragment of the message)
    ("server-id-missing", {"stdout": "x"}, 400, "server_id", "missing"),
    ("server-id-space", {"server_id": "web 1"}, 400, "server_id", "letters, digits"),
    ("server-id-leading-dash", {"server_id": "-web"}, 400, "server_id", "letters, digits"),
    ("server-id-slash", {"server_id": "web/1"}, 400, "server_id", "letters, digits"),
    ("server-id-trailing-newline", {"server_id": "web-1\n"}, 400, "server_id", "letters, digits"),
    ("server-id-too-long", {"server_id": "w" * 65}, 400, "server_id", "64"),
    ("stdout-number", {"server_id": "web-1", "stdout": 7}, 400, "stdout", "must be a string"),
    ("stderr-list", {"server_id": "web-1", "stderr": ["x"]}, 400, "stderr", "must be a string"),
    ("exit-code-string", {"server_id": "web-1", "exit_code": "0"}, 400, "exit_code", "integer"),
    ("exit-code-bool", {"server_id": "web-1", "exit_code": True}, 400, "exit_code", "integer"),
    ("exit-code-float", {"server_id": "web-1", "exit_code": 1.5}, 400, "exit_code", "integer"),
    ("exit-code-too-large", {"server_id": "web-1", "exit_code": 2 ** 31}, 400, "exit_code", "integer"),
    ("slot-words", {"server_id": "web-1", "scheduled_for": "yesterday"}, 400, "scheduled_for",
     "RFC 3339"),
    ("slot-number", {"server_id": "web-1", "scheduled_for": 1767607200}, 400, "scheduled_for",
     "RFC 3339"),
    ("slot-no-offset", {"server_id": "web-1", "scheduled_for": "2026-01-05T10:00:00"}, 400,
     "scheduled_for", "offset"),
    ("slot-basic-format", {"server_id": "web-1", "scheduled_for": "20260105T100000Z"}, 400,
     "scheduled_for", "RFC 3339"),
    ("slot-week-date", {"server_id": "web-1", "scheduled_for": "2026-W02-1T10:00:00Z"}, 400,
     "scheduled_for", "RFC 3339"),
    ("finished-at-words", {"server_id": "web-1", "finished_at": "now"}, 400, "finished_at",
     "RFC 3339"),
    ("status-unknown", {"server_id": "web-1", "status": "done"}, 400, "status", "must be one of"),
]


@pytest.mark.parametrize("body, status, field, fragment",
                         [case[1:] for case in COMPLETE_REJECTS],
                         ids=[case[0] for case in COMPLETE_REJECTS])
def test_complete_rejects_bad_report(app, body, status, field, fragment):
    created = create_task(app, frequency="@hourly")

    response = report(app, created["task_id"], body, expect_errors=True)

    assert_json_error(response, status, field, fragment)
    assert models.Result.select().count() == 0


@pytest.mark.parametrize("body, content_type, status, fragment", [
    (b"[]", "application/json", 400, "JSON object"),
    (b"{", "application/json", 400, "not valid JSON"),
    (b'{"server_id": "web-1"}', "text/plain", 415, "Content-Type"),
], ids=["json-list", "not-json", "text-plain"])
def test_complete_rejects_bad_body(app, body, content_type, status, fragment):
    created = create_task(app, frequency="@hourly")

    response = post_raw(app, f"/api/v1/tasks/{created['task_id']}/complete", body, content_type)

    assert_json_error(response, status, None, fragment)
    assert models.Result.select().count() == 0


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-task"])
def test_complete_unknown_task_is_404(app, task_id):
    create_task(app)

    response = report(app, task_id, {"server_id": "web-1", "scheduled_for": SLOT}, expect_errors=True)

    assert_json_error(response, 404, "task_id", "not found")
    assert models.Result.select().count() == 0


def test_complete_stores_output_with_nul(app):
    created = create_task(app, frequency="@hourly")

    response = report(app, created["task_id"], {
        "server_id": "web-1", "scheduled_for": SLOT, "stdout": "before\x00after", "stderr": "\x00"})

    assert response.status_int == 201
    output = app.get(f"/api/v1/tasks/{created['task_id']}/latest_output").json["outputs"][0]
    assert output["stdout"] == "before\ufffdafter"
    assert output["stderr"] == "\ufffd"


def test_complete_surrogate_output_not_500(app):
    created = create_task(app, frequency="@hourly")
    body = b'{"server_id": "web-1", "scheduled_for": "2026-01-05T10:00:00Z", "stdout": "x\\ud800y"}'

    response = post_raw(app, f"/api/v1/tasks/{created['task_id']}/complete", body)

    assert response.status_int in (201, 400)


def test_complete_marks_agent_seen(app):
    register_agent(app, "web-1")
    make_offline("web-1")
    created = create_task(app, frequency="@hourly")

    report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT})

    states = {agent["agent_id"]: agent["state"] for agent in app.get("/api/v1/agents").json["agents"]}
    assert states == {"web-1": "online"}


# ---------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------


def test_register_then_heartbeat_keeps_registered_at(app):
    first = register_agent(app, "web-1", hostname="web-1.example", platform="Linux", version="0.1.0")
    registered = models.Agent.get_by_id("web-1")
    make_offline("web-1")

    second = register_agent(app, "web-1", hostname="web-1.example", platform="Linux", version="0.1.1")

    stored = models.Agent.get_by_id("web-1")
    assert first.status_int == 201
    assert second.status_int == 200
    assert RFC3339_UTC.match(first.json["registered_at"])
    assert second.json["registered_at"] == first.json["registered_at"]
    assert stored.registered_at == registered.registered_at
    assert stored.last_seen_at >= registered.last_seen_at
    assert stored.version == "0.1.1"


def test_register_stores_details(app):
    register_agent(app, "web-1", hostname="web-1.example", platform="Linux x86_64", version="0.1.0",
                   push_url=PUSH_URL)

    agents = app.get("/api/v1/agents").json["agents"]

    assert len(agents) == 1
    agent = agents[0]
    assert agent["agent_id"] == "web-1"
    assert agent["hostname"] == "web-1.example"
    assert agent["platform"] == "Linux x86_64"
    assert agent["version"] == "0.1.0"
    assert agent["push_url"] == PUSH_URL
    assert agent["state"] == "online"
    assert RFC3339_UTC.match(agent["registered_at"])
    assert RFC3339_UTC.match(agent["last_seen_at"])


@pytest.mark.parametrize("agent_id", ["-web", "web%201", "web!", "w" * 65, "web-1%0A", "%C3%BCber"],
                         ids=["leading-dash", "space", "bang", "too-long", "trailing-newline",
                              "non-ascii"])
def test_register_rejects_bad_agent_id(app, agent_id):
    response = app.put_json(f"/api/v1/agents/{agent_id}", {}, expect_errors=True)

    assert_json_error(response, 400, "agent_id", "letters, digits")
    assert stored_agent_count(app) == 0


@pytest.mark.parametrize("push_url", [
    "ftp://127.0.0.1/", "127.0.0.1:9000", "http://", 42, ["http://127.0.0.1:9/"],
    "http://127.0.0.1:9/" + "a" * 2048, "http://127.0.0.1:9/\nX-Injected: 1",
], ids=["ftp", "no-scheme", "no-host", "number", "list", "too-long", "newline"])
def test_register_rejects_bad_push_url(app, push_url):
    response = app.put_json("/api/v1/agents/web-1", {"push_url": push_url}, expect_errors=True)

    assert_json_error(response, 400, "push_url", "http://")
    assert stored_agent_count(app) == 0


@pytest.mark.parametrize("field", ["hostname", "platform", "version"])
def test_register_rejects_non_string_detail(app, field):
    response = app.put_json("/api/v1/agents/web-1", {field: 7}, expect_errors=True)

    assert_json_error(response, 400, field, "must be a string")
    assert stored_agent_count(app) == 0


def test_register_hostname_nul_not_500(app):
    response = app.put_json("/api/v1/agents/web-1", {"hostname": "web\x00one"}, expect_errors=True)

    assert response.status_int in (201, 400)


def test_register_push_url_nul_not_500(app):
    response = app.put_json("/api/v1/agents/web-1", {"push_url": "http://127.0.0.1:9/\x00"},
                            expect_errors=True)

    assert response.status_int in (201, 400)


def test_agent_tasks_of_unregistered_agent_is_404(app):
    create_task(app)

    response = app.get("/api/v1/agents/ghost-1/tasks", expect_errors=True)

    assert_json_error(response, 404, "agent_id", "not registered")


def test_agent_tasks_lists_every_task(app):
    register_agent(app, "web-1")
    created = [create_task(app, command=f"echo {number}", frequency=frequency)
               for number, frequency in enumerate(["@hourly", "every 30 seconds", "0 9 * * MON-FRI"])]

    response = app.get("/api/v1/agents/web-1/tasks")

    assert response.status_int == 200
    assert response.json["agent_id"] == "web-1"
    expected = [{"task_id": task["task_id"], "command": task["command"], "frequency": task["frequency"],
                 **DEFAULT_OPTIONS} for task in created]
    assert sorted(response.json["tasks"], key=lambda task: task["task_id"]) == \
        sorted(expected, key=lambda task: task["task_id"])


def test_agent_tasks_marks_agent_seen(app):
    register_agent(app, "web-1")
    make_offline("web-1")

    app.get("/api/v1/agents/web-1/tasks")

    states = {agent["agent_id"]: agent["state"] for agent in app.get("/api/v1/agents").json["agents"]}
    assert states == {"web-1": "online"}


def test_list_agents_shows_online_and_offline(app):
    register_agent(app, "web-2")
    register_agent(app, "web-1")
    make_offline("web-2")

    agents = app.get("/api/v1/agents").json["agents"]

    assert [agent["agent_id"] for agent in agents] == ["web-1", "web-2"]
    assert [agent["state"] for agent in agents] == ["online", "offline"]


# ---------------------------------------------------------------------------
# Routing errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nowhere", "/api/v1/nothing", "/api/v2/tasks"])
def test_unknown_path_is_404_json(app, path):
    response = app.get(path, expect_errors=True)

    assert_json_error(response, 404, None, path)


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/api/v1/tasks", "GET"),
    ("POST", "/api/v1/tasks", "GET"),
    ("PATCH", "/api/v1/agents/web-1", "PUT"),
    ("DELETE", "/api/v1/tasks/create", "POST"),
], ids=["delete-tasks", "post-tasks", "patch-agent", "delete-create"])
def test_wrong_method_is_405_json(app, method, path, allowed):
    response = app.request(path, method=method, expect_errors=True)

    assert_json_error(response, 405, None, method)
    assert allowed in response.headers.get("Allow", "")


# ---------------------------------------------------------------------------
# Report slots, task id case and jitter
# ---------------------------------------------------------------------------


def test_complete_rejects_slot_off_schedule(app):
    task = create_task(app, frequency="every 1 hours")

    response = app.post_json(f"/api/v1/tasks/{task['task_id']}/complete",
                             {"server_id": "web-1", "scheduled_for": "2026-01-01T00:17:00Z"},
                             status=400)

    assert response.json["field"] == "scheduled_for"
    assert "not a slot" in response.json["error"]
    assert models.Result.select().count() == 0


def test_complete_rejects_future_slot(app):
    task = create_task(app, frequency="every 1 hours")

    response = app.post_json(f"/api/v1/tasks/{task['task_id']}/complete",
                             {"server_id": "web-1", "scheduled_for": "2030-01-01T00:00:00Z"},
                             status=400)

    assert response.json["field"] == "scheduled_for"
    assert "future" in response.json["error"]
    assert models.Result.select().count() == 0


def test_uppercase_task_id_found(app):
    task = create_task(app)

    response = app.get(f"/api/v1/tasks/{task['task_id'].upper()}")

    assert response.json["task_id"] == task["task_id"]


@pytest.mark.parametrize("frequency, jitter", [
    ("every 1 minutes", 60),
    ("every 1 minutes", 120),
    ("*/5 * * * *", 300),
], ids=["equal-interval", "above-interval", "equal-cron-gap"])
def test_create_rejects_jitter_beyond_period(app, frequency, jitter):
    response = app.post_json("/api/v1/tasks/create",
                             {"command": "true", "frequency": frequency, "jitter": jitter}, status=400)

    assert response.json["field"] == "jitter"
    assert stored_task_count(app) == 0


def test_create_accepts_jitter_below_period(app):
    response = app.post_json("/api/v1/tasks/create",
                             {"command": "true", "frequency": "*/5 * * * *", "jitter": 299})

    assert response.json["jitter"] == 299
