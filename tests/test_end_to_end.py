"""End-to-end tests: a real server and real agents as processes on 127.0.0.1.

Agents sync every second unless a test sets another interval. Tasks fire every second, so
most cases finish in a few seconds. The server keeps its default agent timeout and
report grace (30 s) because every case here waits for executions that all expected
agents reported, and none waits for a deadline to pass.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Optional

import peewee
import pytest

import models
from agent import parse_time
from conftest import reset_postgres_tables
from processes import Api, Cluster, wait_until

pytestmark = pytest.mark.e2e

EVERY_SECOND = "every 1 seconds"
HELLO_COMMAND = 'echo "hello from $TASKSCHEDULER_AGENT_ID"'


@pytest.fixture
def cluster(tmp_path):
    processes = Cluster(tmp_path)
    yield processes
    processes.stop_all()
    # pytest shows this output only for a test that failed, including one that failed
    # on an exception such as a refused connection, which carries no log tail itself.
    print(processes.log_tails())


def api_for(server) -> Api:
    return Api(server.url)


def wait_for_agents(api: Api, cluster: Cluster, agent_ids: list[str], timeout: float = 10.0) -> None:
    """Wait until the server lists exactly `agent_ids` as registered."""
    wait_until(lambda: api.agent_ids() == sorted(agent_ids), timeout,
               lambda: f"agents {sorted(agent_ids)} did not all register: the server lists "
                       f"{api.agent_ids()}\n{cluster.log_tails()}")


def wait_for_output(api: Api, cluster: Cluster, task_id: str, timeout: float,
                    condition=lambda body: bool(body["outputs"]), what: str = "an output") -> dict:
    """Poll latest_output until `condition` is true and return that body."""
    bodies = []

    def check():
        body = api.latest_output(task_id)
        bodies.append(body)
        return body if condition(body) else None

    return wait_until(check, timeout,
                      lambda: f"latest_output of task {task_id} never showed {what}; last body: "
                              f"{bodies[-1] if bodies else None}\n{cluster.log_tails()}")


def output_agent_ids(body: dict) -> list[str]:
    return [output["agent_id"] for output in body["outputs"]]


def log_after_last_start(process) -> str:
    """Return the part of a process log written since its latest start."""
    return process.log_text().rpartition("--- start ")[2]


def listener_url(log: str) -> Optional[str]:
    """Return the push listener's base URL from an agent log, as the listener bound it."""
    match = re.search(r"push listener on (http://127\.0\.0\.1:\d+)/api/v1/sync", log)
    return match.group(1) if match else None


def epoch_seconds(text: str) -> float:
    return parse_time(text).timestamp()


def results_by_slot(database_url: str, task_id: str) -> list[tuple[str, dt.datetime, int]]:
    """Return (agent_id, scheduled_for, row count) of a task's stored reports."""
    database = models.open_database(database_url)
    try:
        with database.connection_context():
            query = (models.Result
                     .select(models.Result.agent_id, models.Result.scheduled_for,
                             peewee.fn.COUNT(models.Result.id).alias("count"))
                     .where(models.Result.task == task_id)
                     .group_by(models.Result.agent_id, models.Result.scheduled_for)
                     .order_by(models.Result.agent_id, models.Result.scheduled_for))
            return [(row.agent_id, row.scheduled_for, row.count) for row in query]
    finally:
        database.close()


def sqlite_url_of(server) -> str:
    return "sqlite:///" + str(server.data_dir / "taskscheduler.db")


def check_three_agent_output(body: dict, agent_ids: list[str], message: str) -> None:
    assert output_agent_ids(body) == sorted(agent_ids), message
    for output in body["outputs"]:
        agent_id = output["agent_id"]
        assert output.get("stdout") == f"hello from {agent_id}\n", f"{agent_id}: {output}\n{message}"
        assert "stderr" not in output, f"{agent_id}: {output}\n{message}"
        assert output["exit_code"] == 0, f"{agent_id}: {output}\n{message}"
        assert output["status"] == "succeeded", f"{agent_id}: {output}\n{message}"
        assert output["scheduled_for"] == body["scheduled_for"], f"{agent_id}: {output}\n{message}"


def start_three_agents(cluster: Cluster, server) -> list[str]:
    """Start two agents with push listeners on port 0 and one that only pulls."""
    cluster.agent(server, "charlie", listen="127.0.0.1:0")
    cluster.agent(server, "alpha")
    cluster.agent(server, "bravo", listen="127.0.0.1:0")
    return ["charlie", "alpha", "bravo"]


def test_task_reaches_three_agents(cluster):
    server = cluster.server()
    api = api_for(server)
    agent_ids = start_three_agents(cluster, server)
    wait_for_agents(api, cluster, agent_ids)

    task_id = api.create_task(HELLO_COMMAND, EVERY_SECOND)
    body = wait_for_output(api, cluster, task_id, timeout=10.0)

    check_three_agent_output(body, agent_ids, cluster.log_tails())


def test_push_url_has_bound_port(cluster):
    server = cluster.server()
    api = api_for(server)
    agent = cluster.agent(server, "pushed", listen="127.0.0.1:0")
    wait_for_agents(api, cluster, ["pushed"])

    url = listener_url(agent.log_text())
    assert url is not None, agent.log_tail()
    assert not url.endswith(":0"), agent.log_tail()
    assert api.agents()[0]["push_url"] == url, f"{api.agents()}\n{agent.log_tail()}"


def test_stderr_only_output(cluster):
    server = cluster.server()
    api = api_for(server)
    cluster.agent(server, "solo")
    wait_for_agents(api, cluster, ["solo"])

    task_id = api.create_task("echo oops >&2", EVERY_SECOND)
    body = wait_for_output(api, cluster, task_id, timeout=10.0)
    output = body["outputs"][0]

    assert output.get("stderr") == "oops\n", f"{body}\n{cluster.log_tails()}"
    assert "stdout" not in output, f"{body}\n{cluster.log_tails()}"
    assert output["exit_code"] == 0, f"{body}\n{cluster.log_tails()}"


def test_late_agent_runs_existing_task(cluster):
    server = cluster.server()
    api = api_for(server)
    cluster.agent(server, "early", listen="127.0.0.1:0")
    wait_for_agents(api, cluster, ["early"])
    task_id = api.create_task(HELLO_COMMAND, EVERY_SECOND)
    wait_for_output(api, cluster, task_id, timeout=10.0)

    cluster.agent(server, "late")
    body = wait_for_output(api, cluster, task_id, timeout=10.0,
                           condition=lambda body: "late" in output_agent_ids(body),
                           what="an output of agent late")

    assert output_agent_ids(body) == ["early", "late"], f"{body}\n{cluster.log_tails()}"
    assert body["outputs"][1].get("stdout") == "hello from late\n", f"{body}\n{cluster.log_tails()}"


def test_agent_without_listener_pulls_task(cluster):
    server = cluster.server()
    api = api_for(server)
    agent = cluster.agent(server, "puller", sync_interval=2.0, log_level="DEBUG")
    wait_until(lambda: "sync: 0 tasks" in agent.log_text(), 10.0,
               lambda: f"agent puller did not finish its first sync\n{cluster.log_tails()}")

    assert api.agents()[0]["push_url"] is None, f"{api.agents()}\n{cluster.log_tails()}"

    task_id = api.create_task(HELLO_COMMAND, EVERY_SECOND)
    # One sync interval (2 s), one slot (1 s) and the report, with room for a slow host.
    body = wait_for_output(api, cluster, task_id, timeout=8.0)

    assert output_agent_ids(body) == ["puller"], f"{body}\n{cluster.log_tails()}"
    assert "wake-up" not in agent.log_text(), agent.log_tail()


def test_pushed_task_starts_before_pull(cluster):
    server = cluster.server()
    api = api_for(server)
    agent = cluster.agent(server, "listener", listen="127.0.0.1:0", sync_interval=30.0,
                          log_level="DEBUG")
    # After its first sync the agent pulls again only in 30 s, so a task it runs sooner
    # came from the sync that the server's wake-up started.
    wait_until(lambda: "sync: 0 tasks" in agent.log_text(), 10.0,
               lambda: f"agent listener did not finish its first sync\n{cluster.log_tails()}")

    task_id = api.create_task(HELLO_COMMAND, EVERY_SECOND)
    body = wait_for_output(api, cluster, task_id, timeout=6.0)

    assert output_agent_ids(body) == ["listener"], f"{body}\n{cluster.log_tails()}"
    assert "wake-up from the server (unsigned), syncing now" in agent.log_text(), agent.log_tail()
    assert agent.log_text().count("sync: ") == 2, agent.log_tail()


def test_push_reaches_restarted_agent(cluster):
    server = cluster.server()
    api = api_for(server)
    agent = cluster.agent(server, "mover", listen="127.0.0.1:0", sync_interval=30.0,
                          log_level="DEBUG")
    wait_until(lambda: "sync: 0 tasks" in agent.log_text(), 10.0,
               lambda: f"agent mover did not finish its first sync\n{cluster.log_tails()}")

    # The restarted listener binds a new free port, which the agent must register anew.
    agent.restart()
    wait_until(lambda: "sync: 0 tasks" in log_after_last_start(agent), 10.0,
               lambda: f"restarted agent mover did not finish its first sync\n{cluster.log_tails()}")
    task_id = api.create_task(HELLO_COMMAND, EVERY_SECOND)
    body = wait_for_output(api, cluster, task_id, timeout=6.0)

    assert api.agents()[0]["push_url"] == listener_url(log_after_last_start(agent)), \
        f"{api.agents()}\n{cluster.log_tails()}"
    assert output_agent_ids(body) == ["mover"], f"{body}\n{cluster.log_tails()}"
    assert "wake-up from the server" in log_after_last_start(agent), agent.log_tail()


def test_restarted_agent_keeps_id_and_tasks(cluster):
    server = cluster.server()
    api = api_for(server)
    agent = cluster.agent(server, "keeper")
    wait_for_agents(api, cluster, ["keeper"])
    task_id = api.create_task("date +%s >> ticks.log", EVERY_SECOND)
    wait_for_output(api, cluster, task_id, timeout=10.0)

    assert agent.stop() == 0, agent.log_tail()
    assert server.stop() == 0, server.log_tail()

    ticks = agent.work_dir / "ticks.log"
    ticks_before = len(ticks.read_text().splitlines())
    agent_restarted = time.time()
    # Without --id the agent must take its id from its state directory.
    agent.restart(pass_id=False)
    wait_until(lambda: len(ticks.read_text().splitlines()) >= ticks_before + 2, 6.0,
               lambda: f"agent did not run its stored task while the server was down: "
                       f"{ticks.read_text()!r}\n{agent.log_tail()}")

    restarted_log = log_after_last_start(agent)
    assert "agent keeper starting with 1 stored tasks" in restarted_log, agent.log_tail()
    assert "running the stored task list" in restarted_log, agent.log_tail()

    server_restarted = time.time()
    server.start()
    body = wait_for_output(
        api, cluster, task_id, timeout=20.0,
        condition=lambda body: bool(body["outputs"])
        and epoch_seconds(body["scheduled_for"]) > server_restarted,
        what="an output for a slot after the server restart")

    assert output_agent_ids(body) == ["keeper"], f"{body}\n{cluster.log_tails()}"
    assert api.agent_ids() == ["keeper"], cluster.log_tails()

    # Runs made while the server was down wait in the agent's outbox until it returns.
    wait_until(
        lambda: [slot for agent_id, slot, _count in results_by_slot(sqlite_url_of(server), task_id)
                 if agent_restarted <= slot.replace(tzinfo=dt.timezone.utc).timestamp()
                 < server_restarted],
        20.0, lambda: f"no report of a run made while the server was down\n{cluster.log_tails()}")


def test_outputs_survive_server_restart(cluster):
    server = cluster.server()
    api = api_for(server)
    agent = cluster.agent(server, "survivor")
    wait_for_agents(api, cluster, ["survivor"])
    task_id = api.create_task(HELLO_COMMAND, EVERY_SECOND)
    wait_for_output(api, cluster, task_id, timeout=10.0)

    agent.stop()
    before = api.latest_output(task_id)
    server.restart()
    after = api.latest_output(task_id)

    assert before["outputs"], f"{before}\n{cluster.log_tails()}"
    assert after == before, cluster.log_tails()


def test_three_agents_on_postgresql(cluster, postgres_base_url):
    reset_postgres_tables(postgres_base_url)
    server = cluster.server(database_url=postgres_base_url)
    api = api_for(server)
    agent_ids = start_three_agents(cluster, server)
    wait_for_agents(api, cluster, agent_ids)

    task_id = api.create_task(HELLO_COMMAND, EVERY_SECOND)
    body = wait_for_output(api, cluster, task_id, timeout=10.0)

    check_three_agent_output(body, agent_ids, cluster.log_tails())


def test_reports_stored_once_per_slot(cluster):
    server = cluster.server()
    api = api_for(server)
    agents = [cluster.agent(server, agent_id) for agent_id in ("one", "two", "three")]
    wait_for_agents(api, cluster, ["one", "two", "three"])
    task_id = api.create_task('echo "$TASKSCHEDULER_SCHEDULED_FOR" >> slots.log', EVERY_SECOND)
    wait_for_output(api, cluster, task_id, timeout=10.0)

    # A restart in the middle makes agent two reopen its outbox and its run records.
    agents[1].restart()
    url = sqlite_url_of(server)

    def each_agent_has_reports(minimum: int) -> bool:
        counts = {}
        for agent_id, _slot, _count in results_by_slot(url, task_id):
            counts[agent_id] = counts.get(agent_id, 0) + 1
        return all(counts.get(agent_id, 0) >= minimum for agent_id in ("one", "two", "three"))

    wait_until(lambda: each_agent_has_reports(5), 15.0,
               lambda: f"not every agent reported 5 slots: {results_by_slot(url, task_id)}\n"
                       f"{cluster.log_tails()}")
    for agent in agents:
        agent.stop()

    # An agent whose acknowledgement got lost sends the same report again.
    stored = api.latest_output(task_id)["outputs"][0]
    resent = {field: stored[field] for field in
              ("scheduled_for", "started_at", "finished_at", "exit_code", "status")}
    status, body = api.report(task_id, stored["agent_id"], dict(resent, stdout="resent\n"))
    assert status == 200, f"{body}\n{cluster.log_tails()}"
    assert body["duplicate"] is True, f"{body}\n{cluster.log_tails()}"
    assert api.latest_output(task_id)["outputs"][0] == stored, cluster.log_tails()

    rows = results_by_slot(url, task_id)
    repeated = [row for row in rows if row[2] > 1]
    assert repeated == [], cluster.log_tails()
    for agent in agents:
        slots = (agent.work_dir / "slots.log").read_text().splitlines()
        repeated_runs = sorted({slot for slot in slots if slots.count(slot) > 1})
        assert repeated_runs == [], f"{agent.name} ran slots twice\n{agent.log_tail()}"
