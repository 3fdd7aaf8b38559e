"""Task lifecycle over the REST API: list pages, PATCH, DELETE, pause, resume and manual runs.

Every test runs against the real bottle app on SQLite and on PostgreSQL (the `app`
fixture), with the recording pusher of conftest.py.
"""

from __future__ import annotations

import datetime as dt

import pytest

import models
import server
from agent import UTC, parse_frequency, parse_time

PUSH_URL = "http://127.0.0.1:9/"


def create_task(app, command="echo hello", frequency="every 5 minutes", **options):
    response = app.post_json("/api/v1/tasks/create", dict(options, command=command, frequency=frequency))
    assert response.status_int == 201
    return response.json


def agent_task_ids(app, agent_id="web-1"):
    return [task["task_id"] for task in app.get(f"/api/v1/agents/{agent_id}/tasks").json["tasks"]]


def assert_error(response, status, field, fragment):
    assert response.status_int == status
    assert response.json.get("field") == field
    assert fragment in response.json["error"]


# ---------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------


def test_list_pages_follow_cursor(app):
    created = [create_task(app, command=f"echo {number}")["task_id"] for number in range(5)]

    pages = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = app.get(f"/api/v1/tasks?{query}").json
        pages.append([task["task_id"] for task in body["tasks"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert pages == [created[0:2], created[2:4], created[4:5]]


def test_list_default_limit_is_100(app):
    for number in range(101):
        models.Task.create(id=f"00000000-0000-4000-8000-{number:012d}", command="true", frequency="1m")

    body = app.get("/api/v1/tasks").json

    assert len(body["tasks"]) == 100
    assert body["next_cursor"] is not None
    rest = app.get(f"/api/v1/tasks?cursor={body['next_cursor']}").json
    assert len(rest["tasks"]) == 1
    assert rest["next_cursor"] is None


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"), ("limit=-1", "limit"),
    ("cursor=not-a-cursor", "cursor"), ("cursor=WyJ4IiwgMV0", "cursor"), ("state=running", "state"),
])
def test_list_rejects_bad_query(app, query, field):
    response = app.get(f"/api/v1/tasks?{query}", expect_errors=True)

    assert response.status_int == 400
    assert response.json["field"] == field


def test_list_filters_by_state(app):
    active = create_task(app)["task_id"]
    paused = create_task(app)["task_id"]
    deleted = create_task(app)["task_id"]
    app.post(f"/api/v1/tasks/{paused}/pause")
    app.delete(f"/api/v1/tasks/{deleted}")

    def listed(query):
        return [task["task_id"] for task in app.get(f"/api/v1/tasks{query}").json["tasks"]]

    assert listed("") == [active, paused]
    assert listed("?state=active") == [active]
    assert listed("?state=paused") == [paused]
    assert listed("?state=deleted") == [deleted]


# ---------------------------------------------------------------------------
# PATCH
# ---------------------------------------------------------------------------


def test_patch_changes_fields(app):
    task_id = create_task(app, timeout=60)["task_id"]

    response = app.patch_json(f"/api/v1/tasks/{task_id}", {
        "command": "uptime", "frequency": "0 9 * * *", "timezone": "Europe/Berlin", "timeout": None,
        "overlap": "allow", "environment": {"LANG": "C"}, "unknown_field": 1})

    assert response.status_int == 200
    shown = app.get(f"/api/v1/tasks/{task_id}").json
    for body in (response.json, shown):
        assert body["command"] == "uptime"
        assert body["frequency"] == "0 9 * * *"
        assert body["timezone"] == "Europe/Berlin"
        assert body["timeout"] is None
        assert body["overlap"] == "allow"
        assert body["environment"] == {"LANG": "C"}
    assert shown["next_fire_times_local"][0].endswith(("T09:00:00+01:00", "T09:00:00+02:00"))
    assert shown["updated_at"] > shown["created_at"]


def test_patch_keeps_fields_left_out(app):
    task_id = create_task(app, command="df -h", jitter=10, catchup=60)["task_id"]

    app.patch_json(f"/api/v1/tasks/{task_id}", {"timeout": 30})

    shown = app.get(f"/api/v1/tasks/{task_id}").json
    assert shown["command"] == "df -h"
    assert shown["jitter"] == 10
    assert shown["catchup"] == 60
    assert shown["timeout"] == 30


@pytest.mark.parametrize("change, field, fragment", [
    ({"frequency": "*/90 * * * *"}, "frequency", "frequency is invalid"),
    ({"timezone": "Mars/Base"}, "timezone", "unknown time zone"),
    ({"command": ""}, "command", "command is empty"),
    ({"command": None}, "command", "command is missing"),
    ({"jitter": 400}, "jitter", "jitter must be shorter"),
    ({"timeout": 0}, "timeout", "timeout"),
    ({"overlap": "sometimes"}, "overlap", "overlap must be one of"),
    ({"agents": ["web-1"], "labels": {"role": "web"}}, "labels", "not both"),
])
def test_patch_invalid_stores_nothing(app, change, field, fragment):
    task_id = create_task(app, frequency="every 5 minutes")["task_id"]
    before = app.get(f"/api/v1/tasks/{task_id}").json

    response = app.patch_json(f"/api/v1/tasks/{task_id}", dict(change, command_extra="x"),
                              expect_errors=True)

    assert_error(response, 400, field, fragment)
    assert app.get(f"/api/v1/tasks/{task_id}").json == before


def test_patch_checks_jitter_against_new_frequency(app):
    task_id = create_task(app, frequency="every 5 minutes", jitter=100)["task_id"]

    response = app.patch_json(f"/api/v1/tasks/{task_id}", {"frequency": "every 1 minute"},
                              expect_errors=True)

    assert_error(response, 400, "jitter", "jitter must be shorter")


def test_patch_reaches_agent_task_list(app):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app)["task_id"]

    app.patch_json(f"/api/v1/tasks/{task_id}", {"command": "echo changed"})

    tasks = app.get("/api/v1/agents/web-1/tasks").json["tasks"]
    assert [task["command"] for task in tasks] == ["echo changed"]


def test_patch_unknown_task_404(app):
    response = app.patch_json("/api/v1/tasks/00000000-0000-0000-0000-000000000000", {"command": "x"},
                              expect_errors=True)

    assert_error(response, 404, "task_id", "not found")


def test_patch_wakes_agents(app, pusher):
    app.put_json("/api/v1/agents/web-1", {"push_url": PUSH_URL})
    task_id = create_task(app)["task_id"]
    pusher.pushes.clear()

    app.patch_json(f"/api/v1/tasks/{task_id}", {"command": "echo changed"})

    assert [(pushed_id, [target.agent_id for target in targets])
            for pushed_id, targets in pusher.pushes] == [(task_id, ["web-1"])]


# ---------------------------------------------------------------------------
# DELETE
# ---------------------------------------------------------------------------


def test_delete_removes_from_agent_list(app):
    app.put_json("/api/v1/agents/web-1", {})
    kept = create_task(app)["task_id"]
    deleted = create_task(app)["task_id"]

    response = app.delete(f"/api/v1/tasks/{deleted}")

    assert response.status_int == 200
    assert response.json["state"] == "deleted"
    assert parse_time(response.json["deleted_at"])
    assert agent_task_ids(app) == [kept]


def test_deleted_task_stays_readable(app):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app)["task_id"]
    app.post_json(f"/api/v1/tasks/{task_id}/complete", {"server_id": "web-1", "stdout": "kept\n"})

    app.delete(f"/api/v1/tasks/{task_id}")

    shown = app.get(f"/api/v1/tasks/{task_id}").json
    assert shown["state"] == "deleted"
    assert shown["next_fire_times"] == []
    runs = app.get(f"/api/v1/tasks/{task_id}/runs").json["runs"]
    assert [run["agent_id"] for run in runs] == ["web-1"]
    assert app.get(f"/api/v1/tasks/{task_id}/latest_output").json["outputs"][0]["stdout"] == "kept\n"


def test_delete_twice_is_idempotent(app):
    task_id = create_task(app)["task_id"]
    first = app.delete(f"/api/v1/tasks/{task_id}").json

    second = app.delete(f"/api/v1/tasks/{task_id}")

    assert second.status_int == 200
    assert second.json["deleted_at"] == first["deleted_at"]


@pytest.mark.parametrize("method, path", [
    ("PATCH", ""), ("POST", "/pause"), ("POST", "/resume"), ("POST", "/run"),
])
def test_deleted_task_rejects_changes(app, method, path):
    task_id = create_task(app)["task_id"]
    app.delete(f"/api/v1/tasks/{task_id}")

    response = app.request(f"/api/v1/tasks/{task_id}{path}", method=method, body=b"{}",
                           content_type="application/json", expect_errors=True)

    assert_error(response, 409, "task_id", "was deleted")


def test_report_after_deletion_rejected(app):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app, frequency="every 1 seconds")["task_id"]
    deleted_at = parse_time(app.delete(f"/api/v1/tasks/{task_id}").json["deleted_at"])
    before = parse_frequency("every 1 seconds").latest_at_or_before(deleted_at - dt.timedelta(seconds=1))
    after = before + dt.timedelta(seconds=3)
    models.Task.update(deleted_at=(after - dt.timedelta(seconds=1)).replace(tzinfo=None)).execute()

    early = app.post_json(f"/api/v1/tasks/{task_id}/complete",
                          {"server_id": "web-1", "scheduled_for": before.isoformat()})
    late = app.post_json(f"/api/v1/tasks/{task_id}/complete",
                         {"server_id": "web-1", "scheduled_for": after.isoformat()}, expect_errors=True)

    assert early.status_int == 201
    assert_error(late, 409, "task_id", "was deleted")


# ---------------------------------------------------------------------------
# Pause and resume
# ---------------------------------------------------------------------------


def test_pause_leaves_agent_list(app):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app)["task_id"]

    paused = app.post(f"/api/v1/tasks/{task_id}/pause")

    assert paused.json["state"] == "paused"
    assert agent_task_ids(app) == []
    assert app.get(f"/api/v1/tasks/{task_id}").json["next_fire_times"] == []


def test_resume_returns_to_agent_list(app, pusher):
    app.put_json("/api/v1/agents/web-1", {"push_url": PUSH_URL})
    task_id = create_task(app)["task_id"]
    app.post(f"/api/v1/tasks/{task_id}/pause")
    pusher.pushes.clear()

    resumed = app.post(f"/api/v1/tasks/{task_id}/resume")

    assert resumed.json["state"] == "active"
    assert agent_task_ids(app) == [task_id]
    assert [pushed_id for pushed_id, _ in pusher.pushes] == [task_id]


def test_pause_twice_is_idempotent(app):
    task_id = create_task(app)["task_id"]
    app.post(f"/api/v1/tasks/{task_id}/pause")

    again = app.post(f"/api/v1/tasks/{task_id}/pause")

    assert again.status_int == 200
    assert again.json["state"] == "paused"


def test_lifecycle_needs_admin_token(db, pusher):
    import webtest

    from auth import TokenConfig

    admin, read = "admin-token-0123456789", "read-token-0123456789"
    config = server.ServerConfig(tokens=TokenConfig.from_tokens(admin=[admin], read=[read]))
    client = webtest.TestApp(server.create_app(config, pusher=pusher))
    task_id = client.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "1m"},
                               headers={"Authorization": f"Bearer {admin}"}).json["task_id"]
    reader = {"Authorization": f"Bearer {read}"}

    for method, path in [("PATCH", ""), ("DELETE", ""), ("POST", "/pause"), ("POST", "/resume"),
                         ("POST", "/run")]:
        response = client.request(f"/api/v1/tasks/{task_id}{path}", method=method, body=b"{}",
                                  content_type="application/json", headers=reader, expect_errors=True)
        assert response.status_int == 403, (method, path)
    assert client.get(f"/api/v1/tasks/{task_id}/runs", headers=reader).status_int == 200
    assert client.get("/api/v1/tasks", headers=reader).status_int == 200


# ---------------------------------------------------------------------------
# Manual runs
# ---------------------------------------------------------------------------


def test_run_lists_manual_run_for_agent(app, pusher):
    app.put_json("/api/v1/agents/web-1", {"push_url": PUSH_URL})
    task_id = create_task(app)["task_id"]
    pusher.pushes.clear()

    response = app.post(f"/api/v1/tasks/{task_id}/run")

    assert response.status_int == 202
    assert response.json["agents"] == ["web-1"]
    listed = app.get("/api/v1/agents/web-1/tasks").json["tasks"][0]
    assert listed["manual_runs"] == [{"run_id": response.json["run_id"],
                                      "requested_at": response.json["requested_at"]}]
    assert [pushed_id for pushed_id, _ in pusher.pushes] == [task_id]


def test_manual_instant_is_not_a_slot(app):
    task_id = create_task(app, frequency="every 1 seconds")["task_id"]
    task = models.Task.get_by_id(task_id)
    whole_second = dt.datetime(2026, 1, 1, 12, 0, 0)

    instant = server.manual_run_instant(task, whole_second)

    assert instant == whole_second + dt.timedelta(microseconds=1)


def test_manual_report_accepted_and_listed(app):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app)["task_id"]
    manual = app.post(f"/api/v1/tasks/{task_id}/run").json

    response = app.post_json(f"/api/v1/tasks/{task_id}/complete", {
        "server_id": "web-1", "stdout": "by hand\n", "exit_code": 0, "trigger": "manual",
        "manual_run_id": manual["run_id"], "scheduled_for": manual["requested_at"]})

    assert response.status_int == 201
    assert response.json["trigger"] == "manual"
    assert response.json["scheduled_for"] == manual["requested_at"]
    assert "manual_runs" not in app.get("/api/v1/agents/web-1/tasks").json["tasks"][0]
    runs = app.get(f"/api/v1/tasks/{task_id}/runs").json["runs"]
    assert [(run["trigger"], run.get("manual_run_id")) for run in runs] == [("manual", manual["run_id"])]


def test_manual_run_not_in_latest_output(app):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app)["task_id"]
    app.post_json(f"/api/v1/tasks/{task_id}/complete", {"server_id": "web-1", "stdout": "scheduled\n"})
    manual = app.post(f"/api/v1/tasks/{task_id}/run").json

    app.post_json(f"/api/v1/tasks/{task_id}/complete", {
        "server_id": "web-1", "stdout": "manual\n", "trigger": "manual", "manual_run_id": manual["run_id"]})

    latest = app.get(f"/api/v1/tasks/{task_id}/latest_output").json
    assert [output["stdout"] for output in latest["outputs"]] == ["scheduled\n"]


def test_manual_run_only_latest_output_empty(app):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app)["task_id"]
    manual = app.post(f"/api/v1/tasks/{task_id}/run").json

    app.post_json(f"/api/v1/tasks/{task_id}/complete", {
        "server_id": "web-1", "stdout": "manual\n", "trigger": "manual", "manual_run_id": manual["run_id"]})

    latest = app.get(f"/api/v1/tasks/{task_id}/latest_output").json
    assert latest["completion_time"] is None
    assert latest["outputs"] == []


@pytest.mark.parametrize("body, field, fragment", [
    ({"trigger": "manual"}, "manual_run_id", "manual_run_id is missing"),
    ({"trigger": "manual", "manual_run_id": "00000000-0000-0000-0000-000000000000"}, "manual_run_id",
     "is not a manual run"),
    ({"trigger": "cron"}, "trigger", "trigger must be one of"),
    ({"manual_run_id": "00000000-0000-0000-0000-000000000000"}, "manual_run_id", "only allowed with"),
])
def test_manual_report_invalid(app, body, field, fragment):
    app.put_json("/api/v1/agents/web-1", {})
    task_id = create_task(app)["task_id"]

    response = app.post_json(f"/api/v1/tasks/{task_id}/complete", dict(body, server_id="web-1"),
                             expect_errors=True)

    assert_error(response, 400, field, fragment)


def test_manual_run_of_other_task_rejected(app):
    app.put_json("/api/v1/agents/web-1", {})
    first = create_task(app)["task_id"]
    second = create_task(app)["task_id"]
    manual = app.post(f"/api/v1/tasks/{first}/run").json

    response = app.post_json(f"/api/v1/tasks/{second}/complete", {
        "server_id": "web-1", "trigger": "manual", "manual_run_id": manual["run_id"]}, expect_errors=True)

    assert_error(response, 400, "manual_run_id", "is not a manual run")


def test_run_of_paused_task_409(app):
    task_id = create_task(app)["task_id"]
    app.post(f"/api/v1/tasks/{task_id}/pause")

    response = app.post(f"/api/v1/tasks/{task_id}/run", expect_errors=True)

    assert_error(response, 409, "task_id", "resume it first")


def test_manual_run_skips_later_agents(app):
    task_id = create_task(app)["task_id"]
    app.put_json("/api/v1/agents/web-1", {})
    manual = app.post(f"/api/v1/tasks/{task_id}/run").json
    app.put_json("/api/v1/agents/web-2", {})

    assert manual["agents"] == ["web-1"]
    assert "manual_runs" not in app.get("/api/v1/agents/web-2/tasks").json["tasks"][0]


def test_manual_run_expires_after_window(app):
    app.put_json("/api/v1/agents/web-1", {})
    models.Agent.update(registered_at=models.utc_now() - dt.timedelta(hours=3)).execute()
    task_id = create_task(app)["task_id"]
    run_id = app.post(f"/api/v1/tasks/{task_id}/run").json["run_id"]
    old = models.utc_now() - server.MANUAL_RUN_WINDOW - dt.timedelta(seconds=1)
    models.ManualRun.update(requested_at=old).where(models.ManualRun.id == run_id).execute()

    assert "manual_runs" not in app.get("/api/v1/agents/web-1/tasks").json["tasks"][0]


def test_task_list_keeps_agent_shape(app):
    # Agents of the previous version read every field of a task; manual_runs is the only
    # one added, and only while a manual run is pending.
    app.put_json("/api/v1/agents/web-1", {})
    create_task(app)

    item = app.get("/api/v1/agents/web-1/tasks").json["tasks"][0]

    assert "manual_runs" not in item
    assert set(item) == set(server.task_json(models.Task.get()))
