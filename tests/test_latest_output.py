"""Rules of the latest complete execution (executions.py), on SQLite and PostgreSQL.

Most tests write agents and reports with explicit naive UTC times and call
`latest_complete_execution` with an explicit `now`. The endpoint tests at the end use
the real clock, so their rows are placed relative to `models.utc_now()`.
"""

from __future__ import annotations

import datetime as dt
import uuid

import executions
import models
from agent import UTC, parse_frequency

AGENT_TIMEOUT = 30.0
REPORT_GRACE = 30.0
GRACE = dt.timedelta(seconds=REPORT_GRACE)
PERIOD = dt.timedelta(minutes=10)
# Monday 2026-03-02 12:00 UTC. It is a slot of "every 10 minutes" because it is a multiple
# of 600 s since the epoch.
FIRST_SLOT = dt.datetime(2026, 3, 2, 12, 0)
SECOND_SLOT = FIRST_SLOT + PERIOD
LONG_AGO = FIRST_SLOT - dt.timedelta(days=1)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def make_task(frequency="every 10 minutes"):
    return models.Task.create(id=str(uuid.uuid4()), command="uptime", frequency=frequency,
                              created_at=LONG_AGO, updated_at=LONG_AGO)


def add_agent(agent_id, last_seen_at, registered_at=LONG_AGO):
    return models.Agent.create(id=agent_id, registered_at=registered_at, last_seen_at=last_seen_at)


def mark_all_seen(instant):
    models.Agent.update(last_seen_at=instant).execute()


def add_result(task, agent_id, slot, finished_at=None):
    finished_at = finished_at or slot + dt.timedelta(seconds=5)
    return models.Result.create(
        task=task, agent_id=agent_id, scheduled_for=slot, started_at=slot + dt.timedelta(seconds=1),
        finished_at=finished_at, received_at=finished_at, status="succeeded", exit_code=0,
        stdout=f"{agent_id} ran slot {slot.isoformat()}\n",
    )


def latest(task, now):
    return executions.latest_complete_execution(task, now, AGENT_TIMEOUT, REPORT_GRACE)


def reporting_agents(execution):
    return [result.agent_id for result in execution.results]


def current_slot(frequency, now):
    """Return the newest slot of `frequency` at or before `now`, both as naive UTC."""
    aware = parse_frequency(frequency).latest_at_or_before(now.replace(tzinfo=UTC))
    return aware.replace(tzinfo=None)


def time_text(naive):
    return naive.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# Complete when every expected agent reported, or at the deadline
# ---------------------------------------------------------------------------


def test_all_reported_is_complete_at_once(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(seconds=20)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-b", last_seen_at=now)
    add_result(task, "web-b", FIRST_SLOT)
    add_result(task, "web-a", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == FIRST_SLOT
    assert execution.complete_reason == "all_reported"
    assert execution.expected_agents == ["web-a", "web-b"]
    assert reporting_agents(execution) == ["web-a", "web-b"]


def test_partial_execution_is_not_served(db):
    task = make_task()
    now = SECOND_SLOT + dt.timedelta(seconds=20)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-b", last_seen_at=now)
    add_result(task, "web-a", SECOND_SLOT)

    execution = latest(task, now)

    assert execution is None


def test_partial_newer_execution_falls_back(db):
    task = make_task()
    now = SECOND_SLOT + dt.timedelta(seconds=20)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-b", last_seen_at=now)
    add_result(task, "web-a", FIRST_SLOT)
    add_result(task, "web-b", FIRST_SLOT)
    add_result(task, "web-a", SECOND_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == FIRST_SLOT
    assert execution.complete_reason == "all_reported"


def test_partial_execution_waits_until_deadline(db):
    task = make_task()
    now = SECOND_SLOT + PERIOD + GRACE - dt.timedelta(seconds=1)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-b", last_seen_at=now)
    add_result(task, "web-a", FIRST_SLOT)
    add_result(task, "web-b", FIRST_SLOT)
    add_result(task, "web-a", SECOND_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == FIRST_SLOT


def test_partial_execution_served_after_deadline(db):
    task = make_task()
    now = SECOND_SLOT + PERIOD + GRACE + dt.timedelta(seconds=1)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-b", last_seen_at=now)
    add_result(task, "web-a", FIRST_SLOT)
    add_result(task, "web-b", FIRST_SLOT)
    add_result(task, "web-a", SECOND_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == SECOND_SLOT
    assert execution.complete_reason == "deadline_passed"
    assert execution.expected_agents == ["web-a", "web-b"]
    assert reporting_agents(execution) == ["web-a"]


def test_deadline_uses_gap_to_next_slot(db):
    # The period of a Friday 09:00 slot runs to Monday 09:00, so it is three days long.
    task = make_task("0 9 * * MON-FRI")
    thursday = dt.datetime(2026, 3, 5, 9, 0)
    friday = dt.datetime(2026, 3, 6, 9, 0)
    monday = dt.datetime(2026, 3, 9, 9, 0)
    add_agent("web-a", last_seen_at=LONG_AGO)
    add_agent("web-b", last_seen_at=LONG_AGO)
    add_result(task, "web-a", thursday)
    add_result(task, "web-b", thursday)
    add_result(task, "web-a", friday)

    saturday_after_grace = friday + dt.timedelta(days=1) + GRACE + dt.timedelta(seconds=1)
    mark_all_seen(saturday_after_grace)
    on_saturday = latest(task, saturday_after_grace)
    monday_after_grace = monday + GRACE + dt.timedelta(seconds=1)
    mark_all_seen(monday_after_grace)
    on_monday = latest(task, monday_after_grace)

    assert on_saturday is not None
    assert on_saturday.scheduled_for == thursday
    assert on_monday is not None
    assert on_monday.scheduled_for == friday
    assert on_monday.complete_reason == "deadline_passed"


# ---------------------------------------------------------------------------
# Which agents are expected
# ---------------------------------------------------------------------------


def test_agent_registered_after_slot_not_expected(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(minutes=2)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-late", last_seen_at=now, registered_at=FIRST_SLOT + dt.timedelta(minutes=1))
    add_result(task, "web-a", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == FIRST_SLOT
    assert execution.complete_reason == "all_reported"
    assert execution.expected_agents == ["web-a"]


def test_agent_registered_at_slot_is_expected(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(minutes=2)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-new", last_seen_at=now, registered_at=FIRST_SLOT)
    add_result(task, "web-a", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is None


def test_silent_agent_not_expected(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(minutes=2)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-silent", last_seen_at=now - dt.timedelta(seconds=AGENT_TIMEOUT + 1))
    add_result(task, "web-a", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.complete_reason == "all_reported"
    assert execution.expected_agents == ["web-a"]


def test_recently_seen_agent_is_expected(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(minutes=2)
    add_agent("web-a", last_seen_at=now)
    add_agent("web-quiet", last_seen_at=now - dt.timedelta(seconds=AGENT_TIMEOUT - 1))
    add_result(task, "web-a", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is None


def test_unregistered_reporter_does_not_replace_expected(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(minutes=2)
    add_agent("web-a", last_seen_at=now)
    add_result(task, "manual-run", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is None


def test_reports_without_registered_agents_complete(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(minutes=2)
    add_result(task, "manual-run", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.complete_reason == "all_reported"
    assert execution.expected_agents == []


# ---------------------------------------------------------------------------
# Executions without reports
# ---------------------------------------------------------------------------


def test_unreported_execution_never_served(db):
    task = make_task()
    now = FIRST_SLOT + dt.timedelta(days=365)
    add_agent("web-a", last_seen_at=now)

    execution = latest(task, now)

    assert execution is None


def test_unreported_newer_executions_skipped(db):
    task = make_task()
    now = FIRST_SLOT + 5 * PERIOD
    add_agent("web-a", last_seen_at=now)
    add_result(task, "web-a", FIRST_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == FIRST_SLOT


def test_other_task_reports_not_mixed_in(db):
    task = make_task()
    other = make_task()
    now = SECOND_SLOT + dt.timedelta(seconds=20)
    add_agent("web-a", last_seen_at=now)
    add_result(task, "web-a", FIRST_SLOT)
    add_result(other, "web-a", SECOND_SLOT)

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == FIRST_SLOT
    assert all(result.task_id == task.id for result in execution.results)


def test_complete_execution_found_behind_pending_ones(db):
    # A 1-second task whose second agent lags 22 s behind but is still online. The 21
    # newest executions wait for that agent, and the execution before them is complete.
    task = make_task("every 1 seconds")
    now = FIRST_SLOT
    add_agent("web-a", last_seen_at=now)
    add_agent("web-lagging", last_seen_at=now)
    for seconds_before in range(1, 31):
        add_result(task, "web-a", now - dt.timedelta(seconds=seconds_before))
    for seconds_before in range(22, 31):
        add_result(task, "web-lagging", now - dt.timedelta(seconds=seconds_before))

    execution = latest(task, now)

    assert execution is not None
    assert execution.scheduled_for == now - dt.timedelta(seconds=22)
    assert execution.complete_reason == "all_reported"


# ---------------------------------------------------------------------------
# Through GET /api/v1/tasks/{id}/latest_output
# ---------------------------------------------------------------------------


def endpoint_setup(app, frequency="every 10 minutes"):
    """Create a task through the API and two online agents registered a day ago."""
    task_id = app.post_json("/api/v1/tasks/create", {"command": "uptime", "frequency": frequency}).json["task_id"]
    now = models.utc_now()
    add_agent("web-a", last_seen_at=now, registered_at=now - dt.timedelta(days=1))
    add_agent("web-b", last_seen_at=now, registered_at=now - dt.timedelta(days=1))
    return models.Task.get_by_id(task_id), current_slot(frequency, now)


def test_endpoint_skips_pending_execution(app):
    task, slot = endpoint_setup(app)
    older = slot - 3 * PERIOD
    add_result(task, "web-a", older)
    add_result(task, "web-b", older)
    add_result(task, "web-a", slot)

    body = app.get(f"/api/v1/tasks/{task.id}/latest_output").json

    assert body["scheduled_for"] == time_text(older)
    assert body["complete_reason"] == "all_reported"
    assert [output["agent_id"] for output in body["outputs"]] == ["web-a", "web-b"]


def test_endpoint_serves_overdue_execution(app):
    task, slot = endpoint_setup(app)
    overdue = slot - 3 * PERIOD
    add_result(task, "web-a", overdue - PERIOD)
    add_result(task, "web-b", overdue - PERIOD)
    add_result(task, "web-a", overdue)

    body = app.get(f"/api/v1/tasks/{task.id}/latest_output").json

    assert body["scheduled_for"] == time_text(overdue)
    assert body["complete_reason"] == "deadline_passed"
    assert [output["agent_id"] for output in body["outputs"]] == ["web-a"]


def test_endpoint_uses_configured_report_grace(app, config):
    task, slot = endpoint_setup(app)
    overdue = slot - 3 * PERIOD
    add_result(task, "web-a", overdue - PERIOD)
    add_result(task, "web-b", overdue - PERIOD)
    add_result(task, "web-a", overdue)
    config.report_grace = 24 * 3600.0

    body = app.get(f"/api/v1/tasks/{task.id}/latest_output").json

    assert body["scheduled_for"] == time_text(overdue - PERIOD)
    assert body["complete_reason"] == "all_reported"


def test_endpoint_completion_time_is_latest_finish(app):
    task, slot = endpoint_setup(app)
    older = slot - 3 * PERIOD
    latest_finish = older + dt.timedelta(seconds=42, microseconds=500000)
    add_result(task, "web-a", older, finished_at=latest_finish)
    add_result(task, "web-b", older, finished_at=older + dt.timedelta(seconds=7))

    body = app.get(f"/api/v1/tasks/{task.id}/latest_output").json

    assert body["completion_time"] == latest_finish.strftime("%Y-%m-%dT%H:%M:%S.500000Z")
    assert body["scheduled_for"] == time_text(older)


def test_endpoint_ignores_unreported_newest_slot(app):
    task, slot = endpoint_setup(app)
    older = slot - 3 * PERIOD
    add_result(task, "web-a", older)
    add_result(task, "web-b", older)

    body = app.get(f"/api/v1/tasks/{task.id}/latest_output").json

    assert body["scheduled_for"] == time_text(older)
    assert body["complete_reason"] == "all_reported"
