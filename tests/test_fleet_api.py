"""Fleet views over the REST API: targeting, the agent list, run history and the
completeness of latest_output.

Every test runs against the real bottle app on SQLite and on PostgreSQL (the `app`
fixture), with the recording pusher of conftest.py.
"""

from __future__ import annotations

import datetime as dt

import pytest
import webtest

import models
import server
from agent import UTC, format_time, parse_frequency
from auth import TokenConfig

PUSH_URL = "http://127.0.0.1:9/"


def create_task(app, command="echo hello", frequency="every 5 minutes", **options):
    response = app.post_json("/api/v1/tasks/create", dict(options, command=command, frequency=frequency))
    assert response.status_int == 201
    return response.json


def register(app, agent_id, **fields):
    return app.put_json(f"/api/v1/agents/{agent_id}", fields)


def report(app, task_id, agent_id, expect_errors=False, **fields):
    return app.post_json(f"/api/v1/tasks/{task_id}/complete", dict(fields, server_id=agent_id),
                         expect_errors=expect_errors)


def agent_task_ids(app, agent_id):
    return [task["task_id"] for task in app.get(f"/api/v1/agents/{agent_id}/tasks").json["tasks"]]


def past_slot(frequency="every 5 minutes", back=dt.timedelta(minutes=10)):
    """Return a slot of `frequency` at least `back` ago, as RFC 3339."""
    return format_time(parse_frequency(frequency).latest_at_or_before(dt.datetime.now(UTC) - back))


def make_offline(agent_id):
    models.Agent.update(last_seen_at=models.utc_now() - dt.timedelta(hours=1)).where(
        models.Agent.id == agent_id).execute()


def register_fleet(app):
    register(app, "web-1", labels={"role": "web", "region": "eu"})
    register(app, "web-2", labels={"role": "web", "region": "us"})
    register(app, "db-1", labels={"role": "db", "region": "eu"})


# ---------------------------------------------------------------------------
# Targeting
# ---------------------------------------------------------------------------


def test_labels_select_task_lists(app):
    register_fleet(app)
    web_eu = create_task(app, labels={"role": "web", "region": "eu"})["task_id"]
    web = create_task(app, labels={"role": "web"})["task_id"]
    every = create_task(app)["task_id"]

    assert agent_task_ids(app, "web-1") == [web_eu, web, every]
    assert agent_task_ids(app, "web-2") == [web, every]
    assert agent_task_ids(app, "db-1") == [every]


def test_agent_ids_select_task_lists(app):
    register_fleet(app)
    task_id = create_task(app, agents=["db-1", "web-2"])["task_id"]

    assert agent_task_ids(app, "db-1") == [task_id]
    assert agent_task_ids(app, "web-2") == [task_id]
    assert agent_task_ids(app, "web-1") == []


def test_task_shows_matching_agents(app):
    register_fleet(app)
    created = create_task(app, labels={"region": "eu"})

    shown = app.get(f"/api/v1/tasks/{created['task_id']}").json

    assert created["labels"] == {"region": "eu"}
    assert created["agents"] is None
    assert shown["matching_agents"] == ["db-1", "web-1"]


def test_selector_matching_none_stays_empty(app):
    register_fleet(app)
    task_id = create_task(app, labels={"role": "cache"})["task_id"]

    shown = app.get(f"/api/v1/tasks/{task_id}").json

    assert shown["labels"] == {"role": "cache"}
    assert shown["matching_agents"] == []
    for agent_id in ("web-1", "web-2", "db-1"):
        assert agent_task_ids(app, agent_id) == []


def test_new_agent_with_labels_gets_task(app):
    task_id = create_task(app, labels={"role": "cache"})["task_id"]

    register(app, "cache-1", labels={"role": "cache"})

    assert agent_task_ids(app, "cache-1") == [task_id]


def test_patch_retargets_task(app, pusher):
    register(app, "web-1", labels={"role": "web"}, push_url=PUSH_URL)
    register(app, "db-1", labels={"role": "db"}, push_url=PUSH_URL)
    task_id = create_task(app, labels={"role": "web"})["task_id"]
    pusher.pushes.clear()

    response = app.patch_json(f"/api/v1/tasks/{task_id}", {"agents": ["db-1"]})

    assert response.json["agents"] == ["db-1"]
    assert response.json["labels"] is None
    assert agent_task_ids(app, "web-1") == []
    assert agent_task_ids(app, "db-1") == [task_id]
    # Both the agent that loses the task and the one that gains it are woken up.
    assert sorted(target.agent_id for _, targets in pusher.pushes for target in targets) == ["db-1", "web-1"]


def test_patch_null_targets_every_agent(app):
    register_fleet(app)
    task_id = create_task(app, agents=["web-1"])["task_id"]

    app.patch_json(f"/api/v1/tasks/{task_id}", {"agents": None})

    assert app.get(f"/api/v1/tasks/{task_id}").json["matching_agents"] == ["db-1", "web-1", "web-2"]


def test_create_pushes_only_to_targets(app, pusher):
    register(app, "web-1", labels={"role": "web"}, push_url=PUSH_URL)
    register(app, "db-1", labels={"role": "db"}, push_url=PUSH_URL)

    create_task(app, labels={"role": "web"})

    assert [target.agent_id for _, targets in pusher.pushes for target in targets] == ["web-1"]


@pytest.mark.parametrize("fields, field, fragment", [
    ({"agents": []}, "agents", "non-empty list"),
    ({"agents": "web-1"}, "agents", "non-empty list"),
    ({"agents": ["web 1"]}, "agents", "is invalid"),
    ({"agents": [1]}, "agents", "is invalid"),
    ({"labels": {}}, "labels", "at least one label"),
    ({"labels": "role=web"}, "labels", "must be an object"),
    ({"labels": {"role": 1}}, "labels", "invalid value"),
    ({"labels": {"-role": "web"}}, "labels", "is invalid"),
    ({"labels": {"role": "web"}, "agents": ["web-1"]}, "labels", "not both"),
])
def test_create_rejects_bad_targets(app, fields, field, fragment):
    response = app.post_json("/api/v1/tasks/create", dict(fields, command="true", frequency="1m"),
                             expect_errors=True)

    assert response.status_int == 400
    assert response.json["field"] == field
    assert fragment in response.json["error"]
    assert app.get("/api/v1/tasks").json["tasks"] == []


def test_report_from_untargeted_agent_403(app):
    register_fleet(app)
    task_id = create_task(app, labels={"role": "web"})["task_id"]

    rejected = report(app, task_id, "db-1", expect_errors=True, stdout="x")
    unknown = report(app, task_id, "web-9", expect_errors=True, stdout="x")
    accepted = report(app, task_id, "web-1", stdout="x")

    assert rejected.status_int == 403
    assert "does not target agent db-1" in rejected.json["error"]
    assert unknown.status_int == 403
    assert accepted.status_int == 201


def test_report_untargeted_agent_token_403(db, pusher):
    enrollment = "enrollment-token-0123456789"
    config = server.ServerConfig(tokens=TokenConfig.from_tokens(admin=["admin-token-0123456789"],
                                                                enrollment=[enrollment]))
    client = webtest.TestApp(server.create_app(config, pusher=pusher))
    admin = {"Authorization": "Bearer admin-token-0123456789"}
    token = client.post("/api/v1/agents/db-1/enroll",
                        headers={"Authorization": f"Bearer {enrollment}"}).json["agent_token"]
    agent_headers = {"Authorization": f"Bearer {token}"}
    client.put_json("/api/v1/agents/db-1", {"labels": {"role": "db"}}, headers=agent_headers)
    task_id = client.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "1m",
                                                         "agents": ["web-1"]}, headers=admin).json["task_id"]

    response = client.post_json(f"/api/v1/tasks/{task_id}/complete", {"server_id": "db-1"},
                                headers=agent_headers, expect_errors=True)

    assert response.status_int == 403
    assert client.get("/api/v1/agents/db-1/tasks", headers=agent_headers).json["tasks"] == []


# ---------------------------------------------------------------------------
# The agent list
# ---------------------------------------------------------------------------


def test_agent_list_shows_host_matrix(app):
    clock = format_time(dt.datetime.now(UTC) + dt.timedelta(seconds=120))
    register(app, "web-1", labels={"role": "web"}, version="0.2.0", platform="Linux 6.1 x86_64",
             clock=clock)
    register(app, "web-2")
    make_offline("web-2")

    agents = {agent["agent_id"]: agent for agent in app.get("/api/v1/agents").json["agents"]}

    assert agents["web-1"]["labels"] == {"role": "web"}
    assert agents["web-1"]["version"] == "0.2.0"
    assert agents["web-1"]["platform"] == "Linux 6.1 x86_64"
    assert agents["web-1"]["state"] == "online"
    assert 119 < agents["web-1"]["clock_offset"] <= 120
    assert agents["web-2"]["clock_offset"] is None
    assert agents["web-2"]["labels"] == {}
    assert agents["web-2"]["state"] == "offline"


def test_agent_timeout_sets_offline(db, pusher):
    client = webtest.TestApp(server.create_app(server.ServerConfig(agent_timeout=7200), pusher=pusher))
    register(client, "web-1")
    make_offline("web-1")

    assert client.get("/api/v1/agents").json["agents"][0]["state"] == "online"


def test_heartbeat_without_labels_keeps_them(app):
    register(app, "web-1", labels={"role": "web"})

    register(app, "web-1")

    assert app.get("/api/v1/agents").json["agents"][0]["labels"] == {"role": "web"}


@pytest.mark.parametrize("fields, field", [
    ({"labels": {"role": "we b"}}, "labels"),
    ({"labels": ["role=web"]}, "labels"),
    ({"clock": "yesterday"}, "clock"),
])
def test_register_rejects_bad_fields(app, fields, field):
    response = app.put_json("/api/v1/agents/web-1", fields, expect_errors=True)

    assert response.status_int == 400
    assert response.json["field"] == field


# ---------------------------------------------------------------------------
# Run history
# ---------------------------------------------------------------------------


def fill_history(app, task_id, agents=("web-1", "web-2"), slots=3):
    """Report `slots` past slots from each agent, web-2 failing; return the slots newest first."""
    frequency = parse_frequency("every 5 minutes")
    newest = frequency.latest_at_or_before(dt.datetime.now(UTC) - dt.timedelta(minutes=5))
    slots_sent = [newest - dt.timedelta(minutes=5 * number) for number in range(slots)]
    for slot in reversed(slots_sent):
        for agent_id in agents:
            report(app, task_id, agent_id, scheduled_for=format_time(slot),
                   stdout=f"{agent_id} {slot:%H:%M}\n", exit_code=1 if agent_id == "web-2" else 0)
    return [format_time(slot) for slot in slots_sent]


def test_runs_newest_first_without_output(app):
    register(app, "web-1")
    register(app, "web-2")
    task_id = create_task(app)["task_id"]
    slots = fill_history(app, task_id)

    runs = app.get(f"/api/v1/tasks/{task_id}/runs").json["runs"]

    assert [run["scheduled_for"] for run in runs] == [slot for slot in slots for _ in range(2)]
    assert all("stdout" not in run and "stderr" not in run for run in runs)
    assert {run["status"] for run in runs if run["agent_id"] == "web-2"} == {"failed"}
    assert all(run["trigger"] == "scheduled" for run in runs)


def test_runs_filter_by_agent_and_status(app):
    register(app, "web-1")
    register(app, "web-2")
    task_id = create_task(app)["task_id"]
    fill_history(app, task_id)

    by_agent = app.get(f"/api/v1/tasks/{task_id}/runs?agent=web-1").json["runs"]
    by_status = app.get(f"/api/v1/tasks/{task_id}/runs?status=failed").json["runs"]
    none = app.get(f"/api/v1/tasks/{task_id}/runs?agent=web-1&status=failed").json["runs"]

    assert len(by_agent) == 3
    assert {run["agent_id"] for run in by_agent} == {"web-1"}
    assert len(by_status) == 3
    assert {run["agent_id"] for run in by_status} == {"web-2"}
    assert none == []


def test_runs_pages_follow_cursor(app):
    register(app, "web-1")
    register(app, "web-2")
    task_id = create_task(app)["task_id"]
    fill_history(app, task_id, slots=4)
    everything = [run["run_id"] for run in app.get(f"/api/v1/tasks/{task_id}/runs").json["runs"]]

    paged = []
    cursor = None
    while True:
        body = app.get(f"/api/v1/tasks/{task_id}/runs?limit=3" + (f"&cursor={cursor}" if cursor else "")).json
        paged += [run["run_id"] for run in body["runs"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert len(everything) == 8
    assert paged == everything


def test_run_detail_has_output(app):
    register(app, "web-1")
    task_id = create_task(app)["task_id"]
    report(app, task_id, "web-1", stdout="out\n", stderr="err\n", exit_code=3)
    run_id = app.get(f"/api/v1/tasks/{task_id}/runs").json["runs"][0]["run_id"]

    run = app.get(f"/api/v1/tasks/{task_id}/runs/{run_id}").json

    assert run["stdout"] == "out\n"
    assert run["stderr"] == "err\n"
    assert run["exit_code"] == 3
    assert run["status"] == "failed"
    assert run["task_id"] == task_id


@pytest.mark.parametrize("run_id", ["999999", "0", "abc", "-1"])
def test_unknown_run_404(app, run_id):
    task_id = create_task(app)["task_id"]

    response = app.get(f"/api/v1/tasks/{task_id}/runs/{run_id}", expect_errors=True)

    assert response.status_int == 404
    assert response.json["field"] == "run_id"


def test_run_of_other_task_404(app):
    register(app, "web-1")
    first = create_task(app)["task_id"]
    second = create_task(app)["task_id"]
    report(app, first, "web-1", stdout="x")
    run_id = app.get(f"/api/v1/tasks/{first}/runs").json["runs"][0]["run_id"]

    assert app.get(f"/api/v1/tasks/{second}/runs/{run_id}", expect_errors=True).status_int == 404


@pytest.mark.parametrize("query, field", [
    ("status=done", "status"), ("agent=web%201", "agent"), ("limit=0", "limit"), ("cursor=xyz", "cursor"),
])
def test_runs_reject_bad_query(app, query, field):
    task_id = create_task(app)["task_id"]

    response = app.get(f"/api/v1/tasks/{task_id}/runs?{query}", expect_errors=True)

    assert response.status_int == 400
    assert response.json["field"] == field


# ---------------------------------------------------------------------------
# latest_output completeness
# ---------------------------------------------------------------------------


def test_latest_output_lists_not_reported(app):
    for agent_id in ("web-1", "web-2", "web-3", "web-4"):
        register(app, agent_id)
    models.Agent.update(registered_at=models.utc_now() - dt.timedelta(hours=1)).execute()
    task_id = create_task(app)["task_id"]
    slot = past_slot()
    report(app, task_id, "web-1", scheduled_for=slot, stdout="ok\n")
    make_offline("web-2")
    report(app, task_id, "web-3", scheduled_for=slot, status="missed")

    latest = app.get(f"/api/v1/tasks/{task_id}/latest_output").json

    assert latest["complete_reason"] == "deadline_passed"
    assert [output["agent_id"] for output in latest["outputs"]] == ["web-1", "web-3"]
    assert latest["outputs"][1]["status"] == "missed"
    assert latest["not_reported"] == [{"agent_id": "web-2", "reason": "offline"},
                                      {"agent_id": "web-4", "reason": "no_report"}]


def test_latest_output_shows_running_agent(app):
    register(app, "web-1")
    register(app, "web-2")
    models.Agent.update(registered_at=models.utc_now() - dt.timedelta(hours=1)).execute()
    task_id = create_task(app, frequency="every 1 seconds", timeout=3600)["task_id"]
    slot = format_time(parse_frequency("every 1 seconds").latest_at_or_before(
        dt.datetime.now(UTC) - dt.timedelta(seconds=60)))
    report(app, task_id, "web-1", scheduled_for=slot, stdout="quick\n")

    latest = app.get(f"/api/v1/tasks/{task_id}/latest_output").json

    assert latest["scheduled_for"] == slot
    assert latest["not_reported"] == [{"agent_id": "web-2", "reason": "running"}]


def test_latest_output_ignores_untargeted_agents(app):
    register_fleet(app)
    models.Agent.update(registered_at=models.utc_now() - dt.timedelta(hours=1)).execute()
    task_id = create_task(app, labels={"role": "web"})["task_id"]
    slot = past_slot(back=dt.timedelta(seconds=1))
    report(app, task_id, "web-1", scheduled_for=slot, stdout="a\n")
    report(app, task_id, "web-2", scheduled_for=slot, stdout="a\n")

    latest = app.get(f"/api/v1/tasks/{task_id}/latest_output").json

    # db-1 is online but not targeted, so it neither delays the execution nor counts as missing.
    assert latest["complete_reason"] == "all_reported"
    assert latest["not_reported"] == []


def test_latest_output_groups_by_output(app):
    agent_ids = [f"web-{number}" for number in range(1, 7)]
    for agent_id in agent_ids:
        register(app, agent_id)
    models.Agent.update(registered_at=models.utc_now() - dt.timedelta(hours=1)).execute()
    task_id = create_task(app)["task_id"]
    slot = past_slot(back=dt.timedelta(seconds=1))
    for agent_id in agent_ids[:4]:
        report(app, task_id, agent_id, scheduled_for=slot, stdout="v1.2\n", exit_code=0)
    report(app, task_id, "web-5", scheduled_for=slot, stdout="v1.1\n", exit_code=0)
    report(app, task_id, "web-6", scheduled_for=slot, stdout="v1.2\n", exit_code=1)

    latest = app.get(f"/api/v1/tasks/{task_id}/latest_output?group_by=output").json

    assert "outputs" not in latest
    assert latest["groups"] == [
        {"stdout": "v1.2\n", "exit_code": 0, "agent_ids": agent_ids[:4], "count": 4},
        {"stdout": "v1.1\n", "exit_code": 0, "agent_ids": ["web-5"], "count": 1},
        {"stdout": "v1.2\n", "exit_code": 1, "agent_ids": ["web-6"], "count": 1},
    ]


def test_latest_output_rejects_bad_group_by(app):
    task_id = create_task(app)["task_id"]

    response = app.get(f"/api/v1/tasks/{task_id}/latest_output?group_by=agent", expect_errors=True)

    assert response.status_int == 400
    assert response.json["field"] == "group_by"
