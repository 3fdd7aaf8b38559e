"""The agent's manual-run path: each manual run runs once, also across restarts, and its
report goes to its task with trigger manual."""

from __future__ import annotations

import datetime as dt

import agent as agent_module
from agent import UTC, Agent, ReportSender, Task


class RecordingClient:
    def __init__(self):
        self.reports = []

    def complete(self, task_id, payload):
        self.reports.append((task_id, payload))
        return {}


TASK = Task(task_id="0b0d8f4e-1111-4c3a-9d55-000000000001", command="echo manual", frequency="@yearly")
RUN_ID = "6f1c2a8e-2222-4b7a-8c11-000000000002"
REQUESTED_AT = dt.datetime(2026, 12, 4, 20, 0, 0, 123456, tzinfo=UTC)


def run_manual_runs(state_dir) -> list:
    """Start the manual run twice on an agent over `state_dir`, and return its reports."""
    agent = Agent("http://127.0.0.1:9", str(state_dir), agent_id="web-1")
    agent.start_manual_runs([TASK], [(TASK.task_id, RUN_ID, REQUESTED_AT)])
    agent.start_manual_runs([TASK], [(TASK.task_id, RUN_ID, REQUESTED_AT)])
    agent.wait_for_runs()
    client = RecordingClient()
    ReportSender(agent.store, client).send_pending()
    agent.store.close()
    return client.reports


def test_manual_run_runs_once(tmp_path):
    reports = run_manual_runs(tmp_path)

    assert len(reports) == 1
    task_id, payload = reports[0]
    assert task_id == TASK.task_id
    assert payload["trigger"] == "manual"
    assert payload["manual_run_id"] == RUN_ID
    assert payload["stdout"] == "manual\n"
    assert payload["scheduled_for"] == "2026-12-04T20:00:00.123456Z"


def test_manual_run_not_repeated_after_restart(tmp_path):
    run_manual_runs(tmp_path)

    assert run_manual_runs(tmp_path) == []


def test_manual_run_leaves_slots_alone(tmp_path):
    run_manual_runs(tmp_path)
    agent = Agent("http://127.0.0.1:9", str(tmp_path), agent_id="web-1")
    try:
        assert agent.store.last_slot(TASK.task_id) is None
    finally:
        agent.store.close()


def test_manual_run_of_unknown_task_ignored(tmp_path):
    agent = Agent("http://127.0.0.1:9", str(tmp_path), agent_id="web-1")
    agent.start_manual_runs([], [(TASK.task_id, RUN_ID, REQUESTED_AT)])
    agent.wait_for_runs()

    assert agent.store.unreported() == []
    agent.store.close()


def test_task_list_manual_runs_parsed():
    runs = agent_module._manual_runs_of(TASK.task_id, [
        {"run_id": RUN_ID, "requested_at": "2026-12-04T20:00:00.123456Z"},
        {"run_id": "bad id", "requested_at": "2026-12-04T20:00:00Z"},
        {"run_id": RUN_ID, "requested_at": "yesterday"},
        "not an object",
    ])

    assert runs == [(TASK.task_id, RUN_ID, REQUESTED_AT)]
