"""End-to-end tests of operating a fleet: real server and agent processes on 127.0.0.1.

They show that agents follow a task's lifecycle at their next sync (PATCH, pause,
resume, delete), run a manual run once, and run only the tasks that target them.
Agents sync every second.
"""

from __future__ import annotations

import time

import pytest
import requests

from agent import parse_time
from processes import HTTP_TIMEOUT_SECONDS, Cluster, wait_until

pytestmark = pytest.mark.e2e

EVERY_SECOND = "every 1 seconds"


@pytest.fixture
def cluster(tmp_path):
    processes = Cluster(tmp_path)
    yield processes
    processes.stop_all()
    print(processes.log_tails())


class Operator:
    """The operator's calls used here, raising on an unexpected status."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.session = requests.Session()

    def call(self, method: str, path: str, expected: int, body=None) -> dict:
        response = self.session.request(method, self.base_url + path, json=body,
                                        timeout=HTTP_TIMEOUT_SECONDS)
        assert response.status_code == expected, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def create(self, command: str, frequency: str, **options) -> str:
        return self.call("POST", "/api/v1/tasks/create", 201,
                         dict(options, command=command, frequency=frequency))["task_id"]

    def runs(self, task_id: str) -> list[dict]:
        return self.call("GET", f"/api/v1/tasks/{task_id}/runs?limit=1000", 200)["runs"]

    def run(self, task_id: str, run_id: int) -> dict:
        return self.call("GET", f"/api/v1/tasks/{task_id}/runs/{run_id}", 200)


def wait_for_runs(operator, cluster, task_id, condition, what, timeout=15.0):
    seen = []

    def check():
        runs = operator.runs(task_id)
        seen[:] = runs
        return runs if condition(runs) else None

    return wait_until(check, timeout, lambda: f"task {task_id}: never {what}; runs: {seen[:5]}\n"
                                              f"{cluster.log_tails()}")


def test_manual_run_once_per_agent(cluster):
    server = cluster.server()
    agents = [cluster.agent(server, agent_id) for agent_id in ("web-1", "web-2")]
    operator = Operator(server.url)
    task_id = operator.create('echo "manual on $TASKSCHEDULER_AGENT_ID"', "@yearly")
    wait_until(lambda: len(operator.call("GET", f"/api/v1/tasks/{task_id}", 200)["matching_agents"]) == 2,
               10, "agents did not register")

    manual = operator.call("POST", f"/api/v1/tasks/{task_id}/run", 202)

    runs = wait_for_runs(operator, cluster, task_id, lambda runs: len(runs) == 2, "ran on both agents")
    assert sorted(run["agent_id"] for run in runs) == ["web-1", "web-2"]
    for run in runs:
        assert run["trigger"] == "manual"
        assert run["manual_run_id"] == manual["run_id"]
        assert run["scheduled_for"] == manual["requested_at"]
        assert run["status"] == "succeeded"
        assert operator.run(task_id, run["run_id"])["stdout"] == f"manual on {run['agent_id']}\n"
    agents[0].restart()
    time.sleep(3)
    assert len(operator.runs(task_id)) == 2
    for agent in agents:
        assert agent.log_text().count(f"manual run {manual['run_id']} requested") == 1, agent.name
    latest = operator.call("GET", f"/api/v1/tasks/{task_id}/latest_output", 200)
    assert latest["completion_time"] is None


def test_agent_follows_lifecycle(cluster):
    server = cluster.server()
    cluster.agent(server, "web-1")
    operator = Operator(server.url)
    task_id = operator.create("echo first", EVERY_SECOND)
    wait_for_runs(operator, cluster, task_id, lambda runs: len(runs) >= 2, "ran twice")

    # PATCH: the next runs use the new command.
    operator.call("PATCH", f"/api/v1/tasks/{task_id}", 200, {"command": "echo second"})
    runs = wait_for_runs(operator, cluster, task_id,
                         lambda runs: runs and runs[0]["stdout_bytes"] == len("second\n"),
                         "ran the changed command")
    assert operator.run(task_id, runs[0]["run_id"])["stdout"] == "second\n"

    # Pause: no slot more than a sync interval after the pause runs.
    paused_at = parse_time(operator.call("POST", f"/api/v1/tasks/{task_id}/pause", 200)["updated_at"])
    time.sleep(4)
    late_runs = [run for run in operator.runs(task_id)
                 if (parse_time(run["scheduled_for"]) - paused_at).total_seconds() > 2]
    assert late_runs == []

    # Resume: runs come back, and the slots of the pause are neither run nor reported missed.
    resumed_at = parse_time(operator.call("POST", f"/api/v1/tasks/{task_id}/resume", 200)["updated_at"])
    wait_for_runs(operator, cluster, task_id,
                  lambda runs: parse_time(runs[0]["scheduled_for"]) > resumed_at, "ran after resume")
    during_pause = [run for run in operator.runs(task_id)
                    if paused_at.timestamp() + 2 < parse_time(run["scheduled_for"]).timestamp()
                    < resumed_at.timestamp()]
    assert during_pause == []
    assert [run for run in operator.runs(task_id) if run["status"] == "missed"] == []

    # Delete: the agent drops the task, and its history stays readable.
    deleted_at = parse_time(operator.call("DELETE", f"/api/v1/tasks/{task_id}", 200)["deleted_at"])
    time.sleep(4)
    runs = operator.runs(task_id)
    assert runs
    assert [run for run in runs if (parse_time(run["scheduled_for"]) - deleted_at).total_seconds() > 2] == []


def test_restarted_agent_skips_removed_tasks(cluster):
    server = cluster.server()
    agent = cluster.agent(server, "web-1")
    operator = Operator(server.url)
    paused_id = operator.create("echo paused >> ran.log", EVERY_SECOND)
    deleted_id = operator.create("echo deleted >> ran.log", EVERY_SECOND)
    for task_id in (paused_id, deleted_id):
        wait_for_runs(operator, cluster, task_id, lambda runs: len(runs) >= 1, "ran once")

    assert agent.stop() == 0, agent.log_tail()
    operator.call("POST", f"/api/v1/tasks/{paused_id}/pause", 200)
    operator.call("DELETE", f"/api/v1/tasks/{deleted_id}", 200)
    ran_log = agent.work_dir / "ran.log"
    lines_before = len(ran_log.read_text().splitlines())
    # Slots pass while the agent is down. Within 5 s of its slot, a stored task would run
    # its newest missed slot at once on the restart, before the first sync.
    time.sleep(2.5)
    agent.restart()
    wait_until(lambda: agent.log_text().count("registered with") == 2, 10.0,
               lambda: f"the agent did not sync after its restart\n{agent.log_tail()}")
    time.sleep(3)

    # The agent fetched the server's list before it planned its stored one, so neither task
    # ran again and no slot of theirs was reported after the restart.
    assert ran_log.read_text().splitlines()[lines_before:] == [], agent.log_tail()
    assert "running the 2 stored tasks" not in agent.log_text(), agent.log_tail()


def test_labels_select_agents(cluster):
    server = cluster.server()
    cluster.agent(server, "web-1", extra_arguments=("--labels", "role=web,region=eu"))
    cluster.agent(server, "db-1", environment={"TASKSCHEDULER_AGENT_LABELS": "role=db,region=eu"})
    operator = Operator(server.url)
    wait_until(lambda: len(operator.call("GET", "/api/v1/agents", 200)["agents"]) == 2, 10,
               "agents did not register")
    web_task = operator.create('echo "$TASKSCHEDULER_AGENT_ID"', EVERY_SECOND, labels={"role": "web"})
    id_task = operator.create('echo "$TASKSCHEDULER_AGENT_ID"', EVERY_SECOND, agents=["db-1"])
    nobody_task = operator.create("echo nobody", EVERY_SECOND, labels={"role": "cache"})

    wait_for_runs(operator, cluster, web_task, lambda runs: len(runs) >= 3, "ran three times")
    wait_for_runs(operator, cluster, id_task, lambda runs: len(runs) >= 3, "ran three times")

    assert {run["agent_id"] for run in operator.runs(web_task)} == {"web-1"}
    assert {run["agent_id"] for run in operator.runs(id_task)} == {"db-1"}
    assert operator.runs(nobody_task) == []
    agents = {agent["agent_id"]: agent for agent in operator.call("GET", "/api/v1/agents", 200)["agents"]}
    assert agents["web-1"]["labels"] == {"role": "web", "region": "eu"}
    assert agents["db-1"]["labels"] == {"role": "db", "region": "eu"}
    assert abs(agents["web-1"]["clock_offset"]) < 1.0
    assert operator.call("GET", f"/api/v1/tasks/{nobody_task}", 200)["matching_agents"] == []
