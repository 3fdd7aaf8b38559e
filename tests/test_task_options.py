"""Task options, fire times in the task's zone, the new report fields and the schema upgrade.

The API tests run against the real bottle app on a fresh SQLite file and on a fresh
PostgreSQL schema (conftest.py). The upgrade tests first create the tables of the
previous version by hand, then open them with `models.open_database`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
import uuid

import pytest
import waitress
import webtest
from playhouse.db_url import connect

import agent
import auth
import executions
import models
import server
from agent import UTC, parse_frequency, parse_time
from conftest import RecordingPusher

OPTIONS = {"timezone": "Europe/Berlin", "catchup": 300, "overlap": "replace", "jitter": 2.5,
           "timeout": 90}
DEFAULT_OPTIONS = {"timezone": "UTC", "catchup": 0, "overlap": "skip", "jitter": 0, "timeout": None,
                   "environment": {}}
TASK_FIELDS = ["task_id", "command", "frequency", "timezone", "catchup", "overlap", "jitter", "timeout",
               "environment"]
ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
SLOT = "2026-01-05T10:00:00Z"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def create_task(app, frequency="@hourly", **options):
    body = {"command": "uptime", "frequency": frequency, **options}
    response = app.post_json("/api/v1/tasks/create", body)
    assert response.status_int == 201
    return response.json


def post_raw(app, path, raw_body):
    return app.post(path, params=raw_body, content_type="application/json", expect_errors=True)


def assert_json_error(response, status, field, fragment):
    """Check the API's one error shape: {"error": MESSAGE, "field": NAME}."""
    assert response.status_int == status
    assert response.content_type == "application/json"
    assert response.json.get("field") == field
    assert fragment in response.json["error"]


def stored_task_count(app):
    return len(app.get("/api/v1/tasks").json["tasks"])


def report(app, task_id, body, **kwargs):
    return app.post_json(f"/api/v1/tasks/{task_id}/complete", body, **kwargs)


def only_output(app, task_id):
    outputs = app.get(f"/api/v1/tasks/{task_id}/latest_output").json["outputs"]
    assert len(outputs) == 1
    return outputs[0]


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---------------------------------------------------------------------------
# Creating tasks with options
# ---------------------------------------------------------------------------


def test_create_returns_options(app):
    created = create_task(app, **OPTIONS)

    for field, value in OPTIONS.items():
        assert created[field] == value, field


@pytest.mark.parametrize("path", ["/api/v1/tasks/{task_id}", "/api/v1/tasks",
                                  "/api/v1/agents/web-1/tasks"],
                         ids=["show", "list", "agent-list"])
def test_endpoints_return_options(app, path):
    app.put_json("/api/v1/agents/web-1", {})
    created = create_task(app, **OPTIONS)

    body = app.get(path.format(task_id=created["task_id"])).json
    task = body["tasks"][0] if "tasks" in body else body

    assert task["task_id"] == created["task_id"]
    for field, value in OPTIONS.items():
        assert task[field] == value, field


def test_null_options_get_defaults(app):
    created = create_task(app, **{field: None for field in DEFAULT_OPTIONS})

    task_detail = app.get(f"/api/v1/tasks/{created['task_id']}").json

    for field, value in DEFAULT_OPTIONS.items():
        assert created[field] == value, field
        assert task_detail[field] == value, field


@pytest.mark.parametrize("sent, returned", [(30, 30), (30.0, 30), (2.5, 2.5), (0.1, 0.1)])
def test_seconds_keep_their_value(app, sent, returned):
    created = create_task(app, catchup=sent)

    task_detail = app.get(f"/api/v1/tasks/{created['task_id']}").json

    assert created["catchup"] == returned
    assert task_detail["catchup"] == returned
    assert type(task_detail["catchup"]) is type(returned)


def test_agent_list_accepted_by_agent(app):
    app.put_json("/api/v1/agents/web-1", {})
    create_task(app, **OPTIONS)
    create_task(app, frequency="every 30 seconds")

    items = app.get("/api/v1/agents/web-1/tasks").json["tasks"]

    for item in items:
        assert list(item) == TASK_FIELDS
        assert agent.Task.from_json(item).to_json() == item


def test_sync_prunes_runs_at_interval(db, config, tmp_path, monkeypatch):
    http_server = waitress.create_server(server.create_app(config, pusher=RecordingPusher()),
                                         host="127.0.0.1", port=0, threads=2)
    threading.Thread(target=http_server.run, daemon=True).start()
    syncing_agent = agent.Agent(server_url=f"http://127.0.0.1:{http_server.effective_port}",
                                state_dir=str(tmp_path / "agent"), agent_id="prune-1")
    pruned: list[float] = []
    prune_runs = syncing_agent.store.prune_runs
    monkeypatch.setattr(syncing_agent.store, "prune_runs", lambda: (pruned.append(1), prune_runs()))
    try:
        for _ in range(3):
            assert syncing_agent.sync_once()
        # Pruning holds the store's lock, so it runs once per interval, not at every sync.
        assert len(pruned) == 1
        monkeypatch.setattr(syncing_agent, "PRUNE_INTERVAL_SECONDS", 0.0)
        assert syncing_agent.sync_once()
        assert len(pruned) == 2
    finally:
        http_server.close()
        syncing_agent.wait_for_runs()
        syncing_agent.store.close()


def test_push_reaches_real_agent(db, config, tmp_path):
    """The real TaskPusher wakes a real agent, whose sync then fetches the task with its options."""
    pusher = server.TaskPusher(timeout=5.0)
    http_server = waitress.create_server(server.create_app(config, pusher=pusher), host="127.0.0.1",
                                         port=0, threads=2)
    threading.Thread(target=http_server.run, daemon=True).start()
    server_url = f"http://127.0.0.1:{http_server.effective_port}"
    listening_agent = agent.Agent(server_url=server_url, state_dir=str(tmp_path / "agent"),
                                  agent_id="push-1")
    listener = agent.start_push_listener(listening_agent, "127.0.0.1", 0)
    try:
        listening_agent.push_url = f"http://127.0.0.1:{listener.server_address[1]}"
        assert listening_agent.sync_once()
        created = create_task(webtest.TestApp(server.create_app(config, pusher=pusher)), **OPTIONS)

        woken = listening_agent._sync_requested.wait(10.0)
        assert listening_agent.sync_once()
        stored = listening_agent.store.tasks()
    finally:
        pusher.shutdown()
        listener.shutdown()
        listener.server_close()
        http_server.close()
        listening_agent.wait_for_runs()
        listening_agent.store.close()

    assert woken
    assert stored == [agent.Task.from_json({key: created[key] for key in TASK_FIELDS})]
    assert stored[0].timezone == "Europe/Berlin"
    assert stored[0].overlap == "replace"


OPTION_REJECTS = [
    # (case id, options, field, fragment of the message)
    ("timezone-unknown", {"timezone": "Mars/Olympus_Mons"}, "timezone", "unknown time zone"),
    ("timezone-lowercase", {"timezone": "europe/berlin"}, "timezone", "unknown time zone"),
    ("timezone-padded", {"timezone": " UTC"}, "timezone", "unknown time zone"),
    ("timezone-path", {"timezone": "../etc/passwd"}, "timezone", "unknown time zone"),
    ("timezone-empty", {"timezone": ""}, "timezone", "IANA"),
    ("timezone-number", {"timezone": 2}, "timezone", "IANA"),
    ("timezone-too-long", {"timezone": "Europe/" + "X" * 60}, "timezone", "64"),
    ("overlap-unknown", {"overlap": "queue"}, "overlap", "skip, allow, replace"),
    ("overlap-number", {"overlap": 1}, "overlap", "skip, allow, replace"),
    ("catchup-negative", {"catchup": -1}, "catchup", "between 0"),
    ("catchup-too-long", {"catchup": 366 * 86400 + 1}, "catchup", "between 0"),
    ("catchup-string", {"catchup": "30"}, "catchup", "number of seconds"),
    ("catchup-bool", {"catchup": True}, "catchup", "number of seconds"),
    ("jitter-too-long", {"jitter": 3601}, "jitter", "between 0 and 3600"),
    ("jitter-list", {"jitter": [1]}, "jitter", "number of seconds"),
    ("timeout-zero", {"timeout": 0}, "timeout", "between 1"),
    ("timeout-half-second", {"timeout": 0.5}, "timeout", "between 1"),
    ("timeout-too-long", {"timeout": 86401}, "timeout", "86400"),
    ("timeout-words", {"timeout": "1h"}, "timeout", "number of seconds"),
]


@pytest.mark.parametrize("options, field, fragment", [case[1:] for case in OPTION_REJECTS],
                         ids=[case[0] for case in OPTION_REJECTS])
def test_create_rejects_bad_option(app, pusher, options, field, fragment):
    response = app.post_json("/api/v1/tasks/create",
                             {"command": "true", "frequency": "@hourly", **options}, expect_errors=True)

    assert_json_error(response, 400, field, fragment)
    assert stored_task_count(app) == 0
    assert pusher.pushes == []


@pytest.mark.parametrize("literal, field", [("NaN", "jitter"), ("Infinity", "catchup"),
                                            ("-Infinity", "timeout")])
def test_create_rejects_non_finite_seconds(app, literal, field):
    raw_body = f'{{"command": "true", "frequency": "@hourly", "{field}": {literal}}}'.encode()

    response = post_raw(app, "/api/v1/tasks/create", raw_body)

    assert_json_error(response, 400, field, "seconds")
    assert stored_task_count(app) == 0


def test_bad_zone_named_before_frequency(app):
    response = app.post_json("/api/v1/tasks/create",
                             {"command": "true", "frequency": "sometimes", "timezone": "Nowhere/City"},
                             expect_errors=True)

    assert_json_error(response, 400, "timezone", "unknown time zone")


def test_bad_frequency_in_zone_rejected(app):
    response = app.post_json("/api/v1/tasks/create",
                             {"command": "true", "frequency": "0 0 30 2 *", "timezone": "Asia/Tokyo"},
                             expect_errors=True)

    assert_json_error(response, 400, "frequency", "never fires")
    assert stored_task_count(app) == 0


# ---------------------------------------------------------------------------
# Fire times in UTC and in the task's zone
# ---------------------------------------------------------------------------


FIRE_TIME_CASES = [
    # (case id, frequency, zone, now, UTC fire times, local fire times)
    ("new-york-spring-forward", "30 2 * * *", "America/New_York", "2026-03-07T00:00:00Z",
     ["2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z",
      "2026-03-10T06:30:00Z", "2026-03-11T06:30:00Z"],
     ["2026-03-07T02:30:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00",
      "2026-03-10T02:30:00-04:00", "2026-03-11T02:30:00-04:00"]),
    ("berlin-spring-forward", "30 2 * * *", "Europe/Berlin", "2026-03-28T00:00:00Z",
     ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z",
      "2026-03-31T00:30:00Z", "2026-04-01T00:30:00Z"],
     ["2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00",
      "2026-03-31T02:30:00+02:00", "2026-04-01T02:30:00+02:00"]),
    ("new-york-fall-back", "30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z",
     ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z", "2026-11-03T06:30:00Z",
      "2026-11-04T06:30:00Z", "2026-11-05T06:30:00Z"],
     ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00", "2026-11-03T01:30:00-05:00",
      "2026-11-04T01:30:00-05:00", "2026-11-05T01:30:00-05:00"]),
    ("utc-interval", "every 90 minutes", "UTC", "2026-01-01T00:10:00Z",
     ["2026-01-01T01:30:00Z", "2026-01-01T03:00:00Z", "2026-01-01T04:30:00Z",
      "2026-01-01T06:00:00Z", "2026-01-01T07:30:00Z"],
     ["2026-01-01T01:30:00+00:00", "2026-01-01T03:00:00+00:00", "2026-01-01T04:30:00+00:00",
      "2026-01-01T06:00:00+00:00", "2026-01-01T07:30:00+00:00"]),
    ("tokyo-interval", "every 90 minutes", "Asia/Tokyo", "2026-01-01T00:10:00Z",
     ["2026-01-01T01:30:00Z", "2026-01-01T03:00:00Z", "2026-01-01T04:30:00Z",
      "2026-01-01T06:00:00Z", "2026-01-01T07:30:00Z"],
     ["2026-01-01T10:30:00+09:00", "2026-01-01T12:00:00+09:00", "2026-01-01T13:30:00+09:00",
      "2026-01-01T15:00:00+09:00", "2026-01-01T16:30:00+09:00"]),
]


@pytest.mark.parametrize("frequency, zone, now, utc_times, local_times",
                         [case[1:] for case in FIRE_TIME_CASES],
                         ids=[case[0] for case in FIRE_TIME_CASES])
def test_fire_times_in_zone(frequency, zone, now, utc_times, local_times):
    task = models.Task(frequency=frequency, timezone=zone)

    fire_times = server.next_fire_times(task, parse_time(now))

    assert fire_times["next_fire_times"] == utc_times
    assert fire_times["next_fire_times_local"] == local_times


def test_show_task_fire_times_shape(app):
    created = create_task(app, frequency="30 2 * * *", timezone="America/New_York")

    task_detail = app.get(f"/api/v1/tasks/{created['task_id']}").json

    assert task_detail["timezone"] == "America/New_York"
    assert len(task_detail["next_fire_times"]) == 5
    assert len(task_detail["next_fire_times_local"]) == 5
    for utc_text, local_text in zip(task_detail["next_fire_times"], task_detail["next_fire_times_local"]):
        assert ISO_WITH_OFFSET.match(local_text), local_text
        assert dt.datetime.fromisoformat(local_text) == parse_time(utc_text)
        assert dt.datetime.fromisoformat(local_text).strftime("%H:%M") in {"02:30", "03:00"}


# ---------------------------------------------------------------------------
# The task's zone in report slots and execution deadlines
# ---------------------------------------------------------------------------


def test_report_without_slot_uses_zone(app):
    frequency, zone = "0 9 * * *", "Asia/Tokyo"
    created = create_task(app, frequency=frequency, timezone=zone)
    before = parse_frequency(frequency, zone).latest_at_or_before(dt.datetime.now(UTC))

    response = report(app, created["task_id"], {"server_id": "web-1", "exit_code": 0})

    after = parse_frequency(frequency, zone).latest_at_or_before(dt.datetime.now(UTC))
    assert response.status_int == 201
    assert parse_time(response.json["scheduled_for"]) in {before, after}
    assert parse_time(response.json["scheduled_for"]).hour == 0


def test_deadline_uses_task_zone():
    # 09:00 in Tokyo is 00:00 UTC. The Friday slot's period runs to Monday 09:00 in
    # Tokyo; read in UTC, the next slot would be Friday 09:00 UTC.
    task = models.Task(frequency="0 9 * * MON-FRI", timezone="Asia/Tokyo")
    friday = dt.datetime(2026, 3, 6, 0, 0)

    deadline = executions.execution_deadline(task, friday, report_grace=30)

    assert deadline == dt.datetime(2026, 3, 9, 0, 0, 30)


def test_deadline_across_spring_forward():
    # The 02:30 slot on the day before the change is followed by 03:00 right after the
    # jump, 23.5 hours later.
    task = models.Task(frequency="30 2 * * *", timezone="America/New_York")
    slot = dt.datetime(2026, 3, 7, 7, 30)

    deadline = executions.execution_deadline(task, slot, report_grace=0)

    assert deadline == dt.datetime(2026, 3, 8, 7, 0)


def test_latest_execution_waits_in_task_zone(db):
    task = models.Task.create(id=str(uuid.uuid4()), command="uptime", frequency="0 9 * * MON-FRI",
                              timezone="Asia/Tokyo")
    thursday, friday = dt.datetime(2026, 3, 5, 0, 0), dt.datetime(2026, 3, 6, 0, 0)
    saturday = dt.datetime(2026, 3, 7, 12, 0)
    models.Agent.create(id="web-a", registered_at=thursday - dt.timedelta(days=1), last_seen_at=saturday)
    models.Agent.create(id="web-b", registered_at=thursday - dt.timedelta(days=1), last_seen_at=saturday)
    for agent_id, slot in [("web-a", thursday), ("web-b", thursday), ("web-a", friday)]:
        models.Result.create(task=task, agent_id=agent_id, scheduled_for=slot, finished_at=slot,
                             status="succeeded")

    execution = executions.latest_complete_execution(task, saturday, agent_timeout=30, report_grace=30)

    assert execution is not None
    assert execution.scheduled_for == thursday


# ---------------------------------------------------------------------------
# Reports: skipped, missed, cancelled, late and reason
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["skipped", "missed", "cancelled"])
def test_report_accepts_new_status(app, status):
    created = create_task(app)

    response = report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT,
                                                "status": status})

    assert response.status_int == 201
    assert models.Result.get().status == status
    assert only_output(app, created["task_id"])["status"] == status


def test_missed_report_shows_range(app):
    created = create_task(app)

    report(app, created["task_id"], {
        "server_id": "web-1", "status": "missed", "scheduled_for": SLOT, "missed_slots": 3,
        "first_missed": "2026-01-05T08:00:00Z", "reason": "the agent was stopped"})

    output = only_output(app, created["task_id"])
    assert output["missed_slots"] == 3
    assert output["first_missed"] == "2026-01-05T08:00:00Z"
    assert output["scheduled_for"] == SLOT
    assert output["reason"] == "the agent was stopped"
    assert "late" not in output


def test_missed_report_defaults_one_slot(app):
    created = create_task(app)

    report(app, created["task_id"], {"server_id": "web-1", "status": "missed", "scheduled_for": SLOT})

    output = only_output(app, created["task_id"])
    assert output["missed_slots"] == 1
    assert output["first_missed"] == SLOT


def test_missed_slots_without_first_is_null(app):
    created = create_task(app)

    report(app, created["task_id"], {"server_id": "web-1", "status": "missed", "scheduled_for": SLOT,
                                     "missed_slots": 4})

    output = only_output(app, created["task_id"])
    assert output["missed_slots"] == 4
    assert output["first_missed"] is None


def test_late_run_shows_late(app):
    created = create_task(app)

    report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT, "exit_code": 0,
                                     "late": True})

    output = only_output(app, created["task_id"])
    assert output["late"] is True
    assert output["status"] == "succeeded"


def test_cancelled_run_shows_reason(app):
    created = create_task(app)

    report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT, "status": "cancelled",
                                     "exit_code": -15, "reason": "the next slot replaced this run"})

    output = only_output(app, created["task_id"])
    assert output["reason"] == "the next slot replaced this run"
    assert output["exit_code"] == -15


@pytest.mark.parametrize("extra", [{}, {"late": False, "reason": ""}, {"late": None, "reason": None}],
                         ids=["absent", "false-and-empty", "null"])
def test_plain_report_omits_new_fields(app, extra):
    created = create_task(app)

    report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT, "exit_code": 0, **extra})

    output = only_output(app, created["task_id"])
    for field in ("late", "missed_slots", "first_missed", "reason"):
        assert field not in output, field


def test_reason_of_500_characters_stored(app):
    created = create_task(app)
    reason = "\u00e9" * 500

    response = report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT,
                                                "status": "skipped", "reason": reason})

    assert response.status_int == 201
    assert only_output(app, created["task_id"])["reason"] == reason


REPORT_REJECTS = [
    # (case id, fields added to a report of SLOT, field, fragment of the message)
    ("missed-slots-zero", {"status": "missed", "missed_slots": 0}, "missed_slots", "1 or more"),
    ("missed-slots-negative", {"status": "missed", "missed_slots": -2}, "missed_slots", "1 or more"),
    ("missed-slots-string", {"status": "missed", "missed_slots": "3"}, "missed_slots", "integer"),
    ("missed-slots-bool", {"status": "missed", "missed_slots": True}, "missed_slots", "integer"),
    ("missed-slots-float", {"status": "missed", "missed_slots": 1.5}, "missed_slots", "integer"),
    ("missed-slots-too-large", {"status": "missed", "missed_slots": 2 ** 31}, "missed_slots", "integer"),
    ("missed-slots-with-succeeded", {"status": "succeeded", "missed_slots": 2}, "missed_slots",
     "only allowed with status missed"),
    ("missed-slots-without-status", {"missed_slots": 2}, "missed_slots",
     "only allowed with status missed"),
    ("first-missed-with-skipped", {"status": "skipped", "first_missed": "2026-01-05T09:00:00Z"},
     "first_missed", "only allowed with status missed"),
    ("first-missed-words", {"status": "missed", "missed_slots": 2, "first_missed": "earlier"},
     "first_missed", "RFC 3339"),
    ("first-missed-after-slot", {"status": "missed", "missed_slots": 2,
                                 "first_missed": "2026-01-05T11:00:00Z"}, "first_missed", "earlier than"),
    ("first-missed-equals-slot", {"status": "missed", "missed_slots": 2, "first_missed": SLOT},
     "first_missed", "earlier than"),
    ("first-missed-one-slot", {"status": "missed", "missed_slots": 1,
                               "first_missed": "2026-01-05T09:00:00Z"}, "first_missed", "equal"),
    ("first-missed-default-one-slot", {"status": "missed", "first_missed": "2026-01-05T09:00:00Z"},
     "first_missed", "equal"),
    ("late-string", {"late": "yes"}, "late", "true or false"),
    ("late-number", {"late": 1}, "late", "true or false"),
    ("late-with-skipped", {"status": "skipped", "late": True}, "late", "did not run"),
    ("late-with-missed", {"status": "missed", "late": True}, "late", "did not run"),
    ("reason-number", {"reason": 5}, "reason", "must be a string"),
    ("reason-too-long", {"reason": "x" * 501}, "reason", "500"),
    ("reason-nul", {"reason": "a\x00b"}, "reason", "NUL"),
    ("status-paused", {"status": "paused"}, "status", "skipped, missed, cancelled"),
]


@pytest.mark.parametrize("fields, field, fragment", [case[1:] for case in REPORT_REJECTS],
                         ids=[case[0] for case in REPORT_REJECTS])
def test_report_rejects_bad_field(app, fields, field, fragment):
    created = create_task(app)

    response = report(app, created["task_id"], {"server_id": "web-1", "scheduled_for": SLOT, **fields},
                      expect_errors=True)

    assert_json_error(response, 400, field, fragment)
    assert models.Result.select().count() == 0


# ---------------------------------------------------------------------------
# Upgrading tables created by the previous version
# ---------------------------------------------------------------------------


# The DDL that the previous version's `create_tables` ran, without the task options and
# the report fields added since.
OLD_SCHEMA = {
    "sqlite": [
        'CREATE TABLE "task" ("id" VARCHAR(36) NOT NULL PRIMARY KEY, "command" TEXT NOT NULL, '
        '"frequency" VARCHAR(200) NOT NULL, "created_at" DATETIME NOT NULL, '
        '"updated_at" DATETIME NOT NULL)',
        'CREATE TABLE "agent" ("id" VARCHAR(64) NOT NULL PRIMARY KEY, "hostname" VARCHAR(255) NOT NULL, '
        '"platform" VARCHAR(255) NOT NULL, "version" VARCHAR(64) NOT NULL, "push_url" VARCHAR(2048), '
        '"registered_at" DATETIME NOT NULL, "last_seen_at" DATETIME NOT NULL)',
        'CREATE INDEX "agent_last_seen_at" ON "agent" ("last_seen_at")',
        'CREATE TABLE "result" ("id" INTEGER NOT NULL PRIMARY KEY, "task_id" VARCHAR(36) NOT NULL, '
        '"agent_id" VARCHAR(64) NOT NULL, "scheduled_for" DATETIME NOT NULL, "started_at" DATETIME, '
        '"finished_at" DATETIME NOT NULL, "received_at" DATETIME NOT NULL, '
        '"status" VARCHAR(32) NOT NULL, "exit_code" INTEGER, "stdout" TEXT NOT NULL, '
        '"stderr" TEXT NOT NULL, "stdout_bytes" INTEGER NOT NULL, "stderr_bytes" INTEGER NOT NULL, '
        '"truncated" INTEGER NOT NULL, '
        'FOREIGN KEY ("task_id") REFERENCES "task" ("id") ON DELETE CASCADE)',
        'CREATE INDEX "result_task_id" ON "result" ("task_id")',
        'CREATE UNIQUE INDEX "result_task_id_agent_id_scheduled_for" '
        'ON "result" ("task_id", "agent_id", "scheduled_for")',
        'CREATE INDEX "result_task_id_scheduled_for" ON "result" ("task_id", "scheduled_for")',
    ],
    "postgresql": [
        'CREATE TABLE "task" ("id" VARCHAR(36) NOT NULL PRIMARY KEY, "command" TEXT NOT NULL, '
        '"frequency" VARCHAR(200) NOT NULL, "created_at" TIMESTAMP NOT NULL, '
        '"updated_at" TIMESTAMP NOT NULL)',
        'CREATE TABLE "agent" ("id" VARCHAR(64) NOT NULL PRIMARY KEY, "hostname" VARCHAR(255) NOT NULL, '
        '"platform" VARCHAR(255) NOT NULL, "version" VARCHAR(64) NOT NULL, "push_url" VARCHAR(2048), '
        '"registered_at" TIMESTAMP NOT NULL, "last_seen_at" TIMESTAMP NOT NULL)',
        'CREATE INDEX "agent_last_seen_at" ON "agent" ("last_seen_at")',
        'CREATE TABLE "result" ("id" SERIAL NOT NULL PRIMARY KEY, "task_id" VARCHAR(36) NOT NULL, '
        '"agent_id" VARCHAR(64) NOT NULL, "scheduled_for" TIMESTAMP NOT NULL, "started_at" TIMESTAMP, '
        '"finished_at" TIMESTAMP NOT NULL, "received_at" TIMESTAMP NOT NULL, '
        '"status" VARCHAR(32) NOT NULL, "exit_code" INTEGER, "stdout" TEXT NOT NULL, '
        '"stderr" TEXT NOT NULL, "stdout_bytes" BIGINT NOT NULL, "stderr_bytes" BIGINT NOT NULL, '
        '"truncated" BOOLEAN NOT NULL, '
        'FOREIGN KEY ("task_id") REFERENCES "task" ("id") ON DELETE CASCADE)',
        'CREATE INDEX "result_task_id" ON "result" ("task_id")',
        'CREATE UNIQUE INDEX "result_task_id_agent_id_scheduled_for" '
        'ON "result" ("task_id", "agent_id", "scheduled_for")',
        'CREATE INDEX "result_task_id_scheduled_for" ON "result" ("task_id", "scheduled_for")',
    ],
}
NEW_COLUMNS = {
    "task": ["timezone", "catchup", "overlap", "jitter", "timeout"],
    "result": ["missed_slots", "first_missed", "late", "reason"],
    "agent": ["token_hash", "push_secret", "enrolled_at", "token_expires_at"],
}
OLD_TASK_ID = "6f1c1f0e-5b7a-4c52-9a3e-0d2a7b6c1e11"


def execute_each(url, statements):
    """Run SQL statements on a connection of their own, outside the models' database."""
    raw = connect(url)
    try:
        with raw.atomic():
            for statement, params in statements:
                raw.execute_sql(statement.replace("?", raw.param), params)
    finally:
        raw.close()


def old_task_insert(task_id, frequency="@hourly"):
    return ('INSERT INTO "task" ("id", "command", "frequency", "created_at", "updated_at") '
            "VALUES (?, ?, ?, ?, ?)",
            (task_id, "uptime", frequency, "2026-01-01 00:00:00", "2026-01-01 00:00:00"))


@pytest.fixture
def old_database_url(database_url):
    """A database with the previous version's tables, an old task and one report of it."""
    dialect = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    statements = [(statement, ()) for statement in OLD_SCHEMA[dialect]]
    statements.append(old_task_insert(OLD_TASK_ID))
    statements.append((
        'INSERT INTO "result" ("task_id", "agent_id", "scheduled_for", "started_at", "finished_at", '
        '"received_at", "status", "exit_code", "stdout", "stderr", "stdout_bytes", "stderr_bytes", '
        '"truncated") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
        (OLD_TASK_ID, "web-1", "2026-01-05 10:00:00", "2026-01-05 10:00:01", "2026-01-05 10:00:02",
         "2026-01-05 10:00:02", "succeeded", 0, "old output\n", "", 11, 0, False)))
    execute_each(database_url, statements)
    return database_url


@pytest.fixture
def upgraded_app(old_database_url, config, pusher):
    database = models.open_database(old_database_url)
    yield webtest.TestApp(server.create_app(config, pusher=pusher))
    database.close()


def test_new_data_dir_is_private(tmp_path):
    data_dir = tmp_path / "new" / "data"

    models.open_database(f"sqlite:///{data_dir}/taskscheduler.db").close()

    assert data_dir.stat().st_mode & 0o777 == 0o700


def test_upgrade_adds_columns(old_database_url):
    database = models.open_database(old_database_url)
    try:
        with database.connection_context():
            columns = {table: {column.name: column for column in database.get_columns(table)}
                       for table in NEW_COLUMNS}
    finally:
        database.close()

    for table, names in NEW_COLUMNS.items():
        model = {"task": models.Task, "result": models.Result, "agent": models.Agent}[table]
        for name in names:
            assert name in columns[table], (table, name)
            assert columns[table][name].null == model._meta.columns[name].null, (table, name)


def test_upgrade_twice_adds_nothing(old_database_url):
    models.open_database(old_database_url).close()
    database = models.open_database(old_database_url)
    try:
        with database.connection_context():
            added = models.add_missing_columns(database)
    finally:
        database.close()

    assert added == []


def test_upgraded_old_task_has_defaults(upgraded_app):
    task_detail = upgraded_app.get(f"/api/v1/tasks/{OLD_TASK_ID}").json

    for field, value in DEFAULT_OPTIONS.items():
        assert task_detail[field] == value, field
    assert len(task_detail["next_fire_times_local"]) == 5


def test_upgraded_old_report_readable(upgraded_app):
    output = only_output(upgraded_app, OLD_TASK_ID)

    assert output["stdout"] == "old output\n"
    for field in ("late", "missed_slots", "first_missed", "reason"):
        assert field not in output, field


def test_upgraded_create_and_read(upgraded_app):
    created = create_task(upgraded_app, frequency="30 2 * * *", **OPTIONS)

    task_detail = upgraded_app.get(f"/api/v1/tasks/{created['task_id']}").json
    listed = upgraded_app.get("/api/v1/tasks").json["tasks"]

    for field, value in OPTIONS.items():
        assert task_detail[field] == value, field
    assert [task["task_id"] for task in listed] == [OLD_TASK_ID, created["task_id"]]


def test_upgraded_stores_new_report_fields(upgraded_app):
    created = create_task(upgraded_app)

    response = report(upgraded_app, created["task_id"], {
        "server_id": "web-1", "status": "missed", "scheduled_for": SLOT, "missed_slots": 2,
        "first_missed": "2026-01-05T09:00:00Z", "reason": "agent stopped"})

    output = only_output(upgraded_app, created["task_id"])
    assert response.status_int == 201
    assert output["missed_slots"] == 2
    assert output["first_missed"] == "2026-01-05T09:00:00Z"
    assert output["reason"] == "agent stopped"


def test_upgraded_enrolled_agent_keeps_token(old_database_url, pusher):
    """An agent enrolled by the version before token lifetimes keeps its token, which never expires."""
    old_token = "agent-token-of-the-previous-version-0123"
    execute_each(old_database_url, [
        ('ALTER TABLE "agent" ADD COLUMN "token_hash" VARCHAR(64)', ()),
        ('ALTER TABLE "agent" ADD COLUMN "push_secret" VARCHAR(128)', ()),
        ('ALTER TABLE "agent" ADD COLUMN "enrolled_at" TIMESTAMP', ()),
        ('INSERT INTO "agent" ("id", "hostname", "platform", "version", "registered_at", '
         '"last_seen_at", "token_hash", "push_secret", "enrolled_at") '
         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
         ("old-1", "", "", "", "2026-01-01 00:00:00", "2026-01-01 00:00:00",
          auth.token_digest(old_token).hex(), "old-push-secret", "2026-01-01 00:00:00")),
    ])
    enrollment = "enrollment-token-0123456789abcdef"
    config = server.ServerConfig(tokens=auth.TokenConfig.from_tokens(enrollment=[enrollment]),
                                 agent_token_lifetime=dt.timedelta(days=1))
    database = models.open_database(old_database_url)
    try:
        app = webtest.TestApp(server.create_app(config, pusher=pusher))
        old_agent_tasks = app.get("/api/v1/agents/old-1/tasks",
                                  headers={"Authorization": f"Bearer {old_token}"})
        enrolled = app.post("/api/v1/agents/new-1/enroll", headers={"Authorization": f"Bearer {enrollment}"})
        with database.connection_context():
            old_row = models.Agent.get_by_id("old-1")
            new_row = models.Agent.get_by_id("new-1")
    finally:
        database.close()

    assert old_agent_tasks.status_int == 200
    assert old_row.token_expires_at is None
    assert new_row.token_expires_at == new_row.enrolled_at + dt.timedelta(days=1)
    assert enrolled.json["expires_at"] is not None


@pytest.mark.parametrize("schema", ["fresh", "upgraded"])
def test_old_insert_gets_defaults(request, database_url, schema):
    """A server of the previous version can still insert tasks and reports."""
    url = request.getfixturevalue("old_database_url") if schema == "upgraded" else database_url
    models.open_database(url).close()
    task_id = str(uuid.uuid4())
    execute_each(url, [old_task_insert(task_id), (
        'INSERT INTO "result" ("task_id", "agent_id", "scheduled_for", "finished_at", "received_at", '
        '"status", "stdout", "stderr", "stdout_bytes", "stderr_bytes", "truncated") '
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (task_id, "web-2", "2026-01-05 10:00:00", "2026-01-05 10:00:02", "2026-01-05 10:00:02",
         "succeeded", "", "", 0, 0, False))])

    database = models.open_database(url)
    try:
        with database.connection_context():
            task = models.Task.get_by_id(task_id)
            result = models.Result.get(models.Result.task == task_id)
    finally:
        database.close()

    assert server.task_json(task) == {"task_id": task_id, "command": "uptime", "frequency": "@hourly",
                                      **DEFAULT_OPTIONS}
    assert result.late is False
    assert result.reason == ""
    assert result.missed_slots is None


def test_bad_option_error_body(app):
    response = app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "@hourly",
                                                      "overlap": "sometimes"}, expect_errors=True)

    assert json.loads(response.body) == {"error": "overlap must be one of skip, allow, replace",
                                         "field": "overlap"}


# ---------------------------------------------------------------------------
# Per-task environment
# ---------------------------------------------------------------------------


def test_environment_stored_and_listed(app):
    created = create_task(app, environment={"LANG": "C.UTF-8", "BACKUP_DIR": "/srv/backup"})

    task_detail = app.get(f"/api/v1/tasks/{created['task_id']}").json

    assert created["environment"] == {"BACKUP_DIR": "/srv/backup", "LANG": "C.UTF-8"}
    assert task_detail["environment"] == {"BACKUP_DIR": "/srv/backup", "LANG": "C.UTF-8"}


@pytest.mark.parametrize("environment, fragment", [
    (["LANG=C"], "must be an object"),
    ({"1ABC": "x"}, "invalid"),
    ({"A-B": "x"}, "invalid"),
    ({"TASKSCHEDULER_TASK_ID": "x"}, "cannot be overridden"),
    ({"LANG": 5}, "must be a string"),
    ({"LANG": "a\x00b"}, "without NUL"),
    ({f"V{index}": "x" for index in range(65)}, "more than 64"),
], ids=["list", "leading-digit", "dash", "reserved-name", "number-value", "nul-value", "too-many"])
def test_environment_rejects_bad_value(app, environment, fragment):
    response = app.post_json("/api/v1/tasks/create",
                             {"command": "env", "frequency": "1m", "environment": environment},
                             status=400)

    assert response.json["field"] == "environment"
    assert fragment in response.json["error"]
    assert app.get("/api/v1/tasks").json["tasks"] == []


def test_environment_reaches_command(tmp_path):
    runner = agent.Runner("web-1", str(tmp_path / "work"))
    task = agent.Task.from_json({"task_id": "t", "command": 'echo "$LANG $GREETING"',
                                 "frequency": "1m",
                                 "environment": {"LANG": "C.UTF-8", "GREETING": "hello"}})

    result = runner.run(task, dt.datetime(2026, 1, 1, tzinfo=agent.UTC))

    assert result.stdout == "C.UTF-8 hello\n"


def test_environment_change_replaces_task(tmp_path):
    store = agent.StateStore(str(tmp_path / "state"))
    first = agent.Task.from_json({"task_id": "t", "command": "env", "frequency": "1m",
                                  "environment": {"LANG": "C"}})
    second = agent.Task.from_json({"task_id": "t", "command": "env", "frequency": "1m",
                                   "environment": {"LANG": "C.UTF-8"}})

    outcomes = [store.upsert_task(first), store.upsert_task(first), store.upsert_task(second)]
    stored = store.tasks()
    store.close()

    assert outcomes == ["added", "unchanged", "replaced"]
    assert stored == [second]
