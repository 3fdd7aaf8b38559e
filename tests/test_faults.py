"""Fault tests: real server, agent and database processes on 127.0.0.1, killed and starved.

Each test breaks one thing (a SIGKILL, a stopped database, a dropping network, a
command that misbehaves) and checks what taskscheduler promises afterwards, mostly
that every slot an agent ran reaches the server exactly once. Tasks fire every one
or two seconds and agents sync every second, so outages of a few seconds span several
slots. docs/reliability.md lists the guarantees next to these tests.

The checks read the server's database directly (SQLite read-only, or PostgreSQL), the
agent's state store read-only, and /proc, so they run on Linux only.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import signal
import threading
import time
import uuid
from typing import Optional

import pytest
import requests

from agent import UTC, Runner, format_time, parse_time
from conftest import reset_postgres_tables
from faults_support import (FaultAgent, PrivatePostgres, TcpProxy, command_line,
                            environment_value, kill_run_processes, outbox_depth, outbox_dropped,
                            peak_rss_kib, postgres_bin_dir, run_processes, running_process_groups,
                            stored_reports)
from processes import Api, Cluster, ServerProcess, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

EVERY_SECOND = "every 1 seconds"
EVERY_TWO_SECONDS = "every 2 seconds"
# Each run appends its slot to slots.log in the agent's work directory.
SLOT_COMMAND = 'echo "$TASKSCHEDULER_SCHEDULED_FOR" >> slots.log'
HTTP_TIMEOUT_SECONDS = 10.0
# Covers the agent's capped backoff after an outage of a few seconds (up to 8 s
# between retries) and a slow host.
CATCH_UP_SECONDS = 30.0
KILL_GRACE_SECONDS = Runner.KILL_GRACE_SECONDS
PIPE_GRACE_SECONDS = Runner.PIPE_GRACE_SECONDS


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path):
    processes = Cluster(tmp_path)
    yield processes
    # Agents get SIGKILL, because after SIGTERM an agent waits for its running commands
    # and several tests leave commands that run for minutes. Their commands are killed next.
    agents = [process for process in processes.processes if isinstance(process, FaultAgent)]
    for agent in agents:
        agent.stop(signal.SIGKILL)
    for agent in agents:
        kill_run_processes(agent.agent_id)
    processes.stop_all()
    # pytest shows this output only for a failed test.
    print(processes.log_tails())


@pytest.fixture
def private_postgres():
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) under "
                    "/usr/lib/postgresql/*/bin to run a private instance")
    instance = PrivatePostgres(bin_dir)
    try:
        instance.initialize()
        instance.start()
        yield instance
    finally:
        instance.remove()


def start_agent(cluster: Cluster, server_url: str, name: str,
                extra_arguments: tuple[str, ...] = ()) -> FaultAgent:
    """Start an agent with a unique id, so that teardown kills only this test's commands."""
    agent_id = f"{name}-{uuid.uuid4().hex[:8]}"
    agent = FaultAgent(cluster.directory / f"agent-{name}.log", server_url,
                       cluster.directory / f"state-{name}", agent_id, extra_arguments)
    cluster.processes.append(agent)
    return agent.start()


def start_server(cluster: Cluster, request, backend: str) -> tuple[ServerProcess, str]:
    """Start a server on a fresh SQLite file or PostgreSQL schema, and return it and its database URL."""
    if backend == "sqlite":
        server = cluster.server()
        return server, sqlite_url_of(server)
    database_url = request.getfixturevalue("postgres_base_url")
    reset_postgres_tables(database_url)
    return cluster.server(database_url=database_url), database_url


def sqlite_url_of(server) -> str:
    return "sqlite:///" + str(server.data_dir / "taskscheduler.db")


def create_task(server, command: str, frequency: str, **options) -> str:
    response = requests.post(server.url + "/api/v1/tasks/create",
                             json=dict(options, command=command, frequency=frequency),
                             timeout=HTTP_TIMEOUT_SECONDS)
    assert response.status_code == 201, response.text
    return response.json()["task_id"]


def wait_for_registration(api: Api, cluster: Cluster, agent_id: str, timeout: float = 15.0) -> None:
    wait_until(lambda: agent_id in api.agent_ids(), timeout,
               lambda: f"agent {agent_id} did not register\n{cluster.log_tails()}")


def file_slots(agent) -> list[str]:
    """Return the slots that the agent's runs of SLOT_COMMAND appended, in order."""
    try:
        return (agent.work_dir / "slots.log").read_text().split()
    except FileNotFoundError:
        return []


def wait_for_runs(cluster: Cluster, agent, count: int, timeout: float) -> list[str]:
    """Wait until slots.log has at least `count` slots and return them."""
    return wait_until(lambda: len(file_slots(agent)) >= count and file_slots(agent), timeout,
                      lambda: f"{agent.name} ran {len(file_slots(agent))} slots, expected "
                              f"{count}\n{cluster.log_tails()}")


def wait_for_outbox(cluster: Cluster, agent, minimum: int, timeout: float) -> int:
    """Wait until the agent's outbox contains at least `minimum` unsent results, and return its depth."""
    def depth() -> int:
        current = outbox_depth(agent.state_dir)
        return current if current >= minimum else 0

    return wait_until(depth, timeout,
                      lambda: f"the outbox has {outbox_depth(agent.state_dir)} unsent results, "
                              f"expected {minimum}\n{cluster.log_tails()}")


def wait_for_output(api: Api, cluster: Cluster, task_id: str, timeout: float) -> dict:
    """Poll latest_output until it has an output, and return that output."""
    def output() -> Optional[dict]:
        outputs = api.latest_output(task_id)["outputs"]
        return outputs[0] if outputs else None

    return wait_until(output, timeout,
                      lambda: f"no output of task {task_id}\n{cluster.log_tails()}")


def slot_time(slot: str) -> dt.datetime:
    return parse_time(slot)


def report_counts(database_url: str, task_id: str, agent_id: str) -> collections.Counter:
    """Count the server's stored reports of one agent per slot."""
    return collections.Counter(report.slot for report in stored_reports(database_url, task_id)
                               if report.agent_id == agent_id)


def wait_for_reports(cluster: Cluster, database_url: str, task_id: str, agent_id: str,
                     slots: list[str], timeout: float = CATCH_UP_SECONDS,
                     extra_logs=lambda: "") -> collections.Counter:
    """Wait until the server stored a report of `agent_id` for every slot in `slots`.

    Returns the number of stored reports per slot.
    """
    assert slots, f"no slots to wait for\n{cluster.log_tails()}"

    def all_stored() -> Optional[collections.Counter]:
        counts = report_counts(database_url, task_id, agent_id)
        return counts if all(counts[slot] for slot in slots) else None

    def failure() -> str:
        counts = report_counts(database_url, task_id, agent_id)
        missing = sorted(slot for slot in slots if not counts[slot])
        return (f"the server has no report of agent {agent_id} for slots {missing}\n"
                f"{cluster.log_tails()}\n{extra_logs()}")

    return wait_until(all_stored, timeout, failure)


def check_each_run_reported_once(cluster: Cluster, database_url: str, task_id: str, agent,
                                 extra_logs=lambda: "") -> list[str]:
    """Check that every slot in the agent's slots.log is stored exactly once, and return the slots."""
    slots = file_slots(agent)
    counts = wait_for_reports(cluster, database_url, task_id, agent.agent_id, slots,
                              extra_logs=extra_logs)

    repeated_runs = sorted({slot for slot in slots if slots.count(slot) > 1})
    missing = sorted(slot for slot in slots if counts[slot] == 0)
    doubled = sorted(slot for slot, count in counts.items() if count > 1)
    assert repeated_runs == [], f"the agent ran slots twice\n{cluster.log_tails()}"
    assert missing == [], f"runs never reported\n{cluster.log_tails()}\n{extra_logs()}"
    assert doubled == [], f"runs stored more than once\n{cluster.log_tails()}"
    return slots


def slots_between(slots: list[str], start: dt.datetime, end: dt.datetime) -> list[str]:
    return [slot for slot in slots if start < slot_time(slot) < end]


def first_report(cluster: Cluster, database_url: str, task_id: str, condition,
                 description: str, timeout: float = 20.0):
    """Wait for the first stored report of a task that meets `condition`, and return it."""
    def find():
        return next((report for report in stored_reports(database_url, task_id)
                     if condition(report)), None)

    return wait_until(find, timeout,
                      lambda: f"no report of task {task_id} is {description}: "
                              f"{stored_reports(database_url, task_id)}\n{cluster.log_tails()}")


def seconds_between(start: dt.datetime, end: dt.datetime) -> float:
    return (end - start).total_seconds()


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


# ---------------------------------------------------------------------------
# Server and agent kills
# ---------------------------------------------------------------------------


def test_server_kill_loses_no_report(cluster):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    agent = start_agent(cluster, server.url, "server-kill")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, SLOT_COMMAND, EVERY_SECOND)
    first_slots = wait_for_runs(cluster, agent, 1, 10.0)
    wait_for_reports(cluster, database_url, task_id, agent.agent_id, first_slots)

    server.stop(signal.SIGKILL)
    killed_at = now()
    # About 5 s of outage: five more runs at one per second.
    wait_for_runs(cluster, agent, len(file_slots(agent)) + 5, 15.0)
    server.start()
    restarted_at = now()

    slots = check_each_run_reported_once(cluster, database_url, task_id, agent)
    assert len(slots_between(slots, killed_at, restarted_at)) >= 4, cluster.log_tails()


def test_agent_kill_before_report(cluster):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    agent = start_agent(cluster, server.url, "report-kill")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, SLOT_COMMAND, EVERY_SECOND)
    first_slots = wait_for_runs(cluster, agent, 1, 10.0)
    wait_for_reports(cluster, database_url, task_id, agent.agent_id, first_slots)

    server.stop()
    wait_for_runs(cluster, agent, len(file_slots(agent)) + 3, 10.0)
    unsent = wait_for_outbox(cluster, agent, 2, 5.0)
    agent.stop(signal.SIGKILL)
    killed_slots = file_slots(agent)

    agent.start()
    # The restarted agent runs its stored task while the server is still down.
    wait_for_runs(cluster, agent, len(killed_slots) + 2, 10.0)
    server.start()

    check_each_run_reported_once(cluster, database_url, task_id, agent)
    assert unsent >= 2, cluster.log_tails()


def test_agent_kill_mid_run(cluster):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    agent = start_agent(cluster, server.url, "run-kill")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, "sleep 30", EVERY_TWO_SECONDS, timeout=60)

    task_marker = {"TASKSCHEDULER_TASK_ID": task_id}

    def started_run_processes() -> list[int]:
        """Return the run's pids once its process group is stored, so that a restart finds it."""
        stored_groups = [group for _slot, group in running_process_groups(agent.state_dir) if group]
        return run_processes(task_marker) if stored_groups else []

    pids = wait_until(started_run_processes, 15.0,
                      lambda: f"no process of task {task_id} started\n{cluster.log_tails()}")
    slot = environment_value(pids[0], "TASKSCHEDULER_SCHEDULED_FOR")
    run_marker = dict(task_marker, TASKSCHEDULER_SCHEDULED_FOR=slot)
    agent.stop(signal.SIGKILL)
    orphans = run_processes(run_marker)

    agent.start()
    lost = first_report(cluster, database_url, task_id, lambda report: report.slot == slot,
                        f"for slot {slot}")
    wait_until(lambda: not run_processes(run_marker), 10.0,
               lambda: f"processes of the run of slot {slot} are still alive: "
                       f"{[command_line(pid) for pid in run_processes(run_marker)]}\n"
                       f"{cluster.log_tails()}")

    assert orphans, f"the run's processes died with the agent, so nothing was left to clean up\n" \
                    f"{cluster.log_tails()}"
    assert lost.status == "lost", f"{lost}\n{cluster.log_tails()}"
    assert lost.exit_code is None, f"{lost}\n{cluster.log_tails()}"
    assert run_processes(run_marker) == [], cluster.log_tails()


# ---------------------------------------------------------------------------
# Duplicate reports
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_duplicate_reports(cluster, request, backend):
    server, database_url = start_server(cluster, request, backend)
    task_id = create_task(server, "true", "every 1 hours")
    report = {"server_id": "twin", "scheduled_for": "2026-01-01T00:00:00Z",
              "started_at": "2026-01-01T00:00:00.1Z", "finished_at": "2026-01-01T00:00:00.2Z",
              "exit_code": 0, "status": "succeeded", "stdout": "once\n"}
    barrier = threading.Barrier(5)
    responses: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def post() -> None:
        with requests.Session() as session:
            barrier.wait(timeout=10.0)
            response = session.post(f"{server.url}/api/v1/tasks/{task_id}/complete", json=report,
                                    timeout=HTTP_TIMEOUT_SECONDS)
        with lock:
            responses.append((response.status_code, response.json()))

    threads = [threading.Thread(target=post) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20.0)

    statuses = sorted(status for status, _body in responses)
    duplicate_flags = collections.Counter(body.get("duplicate") for _status, body in responses)
    reports = stored_reports(database_url, task_id)
    assert statuses == [200, 200, 200, 200, 201], f"{responses}\n{cluster.log_tails()}"
    assert duplicate_flags == {True: 4, False: 1}, f"{responses}\n{cluster.log_tails()}"
    assert len(reports) == 1, f"{reports}\n{cluster.log_tails()}"


# ---------------------------------------------------------------------------
# Database outage
# ---------------------------------------------------------------------------


def timed_request(method: str, url: str, **kwargs) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.request(method, url, timeout=HTTP_TIMEOUT_SECONDS, **kwargs)
    return response, time.monotonic() - started


def test_postgres_outage_catches_up(cluster, private_postgres):
    server = cluster.server(database_url=private_postgres.url)
    api = Api(server.url)
    agent = start_agent(cluster, server.url, "pg-outage")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, SLOT_COMMAND, EVERY_SECOND)
    first_slots = wait_for_runs(cluster, agent, 1, 10.0)
    wait_for_reports(cluster, private_postgres.url, task_id, agent.agent_id, first_slots)

    private_postgres.stop("fast")
    stopped_at = now()
    latest, latest_seconds = timed_request("GET", f"{server.url}/api/v1/tasks/{task_id}/latest_output")
    complete, complete_seconds = timed_request(
        "POST", f"{server.url}/api/v1/tasks/{task_id}/complete",
        json={"server_id": "manual", "stdout": "during the outage\n"})
    wait_for_runs(cluster, agent, len(file_slots(agent)) + 4, 10.0)
    depth = wait_for_outbox(cluster, agent, 2, 5.0)
    private_postgres.start()
    started_at = now()

    logs = f"{cluster.log_tails()}\n{private_postgres.log_tail()}"
    slots = check_each_run_reported_once(cluster, private_postgres.url, task_id, agent,
                                         extra_logs=private_postgres.log_tail)
    assert latest.status_code == 503, f"{latest.text}\n{logs}"
    assert latest.headers["Content-Type"] == "application/json", f"{latest.headers}\n{logs}"
    assert "error" in latest.json(), f"{latest.text}\n{logs}"
    assert latest_seconds < 3.0, logs
    assert complete.status_code == 503, f"{complete.text}\n{logs}"
    assert "error" in complete.json(), f"{complete.text}\n{logs}"
    assert complete_seconds < 3.0, logs
    assert depth >= 2, logs
    assert len(slots_between(slots, stopped_at, started_at)) >= 3, logs


def test_healthz_up_while_database_down(cluster, private_postgres):
    server = cluster.server(database_url=private_postgres.url)

    private_postgres.stop("fast")
    health, seconds = timed_request("GET", f"{server.url}/healthz")

    # The README documents GET /healthz as "the process is up", which it still is.
    assert health.status_code == 200, f"{health.text}\n{cluster.log_tails()}"
    assert seconds < 3.0, cluster.log_tails()


# ---------------------------------------------------------------------------
# Commands that misbehave
# ---------------------------------------------------------------------------


def test_huge_output_stays_bounded(cluster):
    server = cluster.server()
    api = Api(server.url)
    agent = start_agent(cluster, server.url, "huge")
    wait_for_registration(api, cluster, agent.agent_id)
    baseline_kib = peak_rss_kib(agent.process.pid)

    task_id = create_task(server, r"head -c 200000000 /dev/zero | tr '\0' x", "every 3 seconds",
                          timeout=60)
    output = wait_for_output(api, cluster, task_id, 30.0)
    growth_kib = peak_rss_kib(agent.process.pid) - baseline_kib

    summary = {field: value for field, value in output.items() if field != "stdout"}
    assert output["exit_code"] == 0, f"{summary}\n{cluster.log_tails()}"
    assert output.get("truncated") is True, f"{summary}\n{cluster.log_tails()}"
    assert output.get("stdout_bytes") == 200_000_000, f"{summary}\n{cluster.log_tails()}"
    assert len(output["stdout"]) < 1.1 * 2 ** 20, cluster.log_tails()
    assert output["stdout"].startswith("x" * 1000), cluster.log_tails()
    assert growth_kib < 60 * 1024, f"peak RSS grew by {growth_kib} KiB from {baseline_kib} KiB\n" \
                                   f"{cluster.log_tails()}"


def test_lingering_child_reported(cluster):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    agent = start_agent(cluster, server.url, "linger")
    wait_for_registration(api, cluster, agent.agent_id)
    lingering_id = create_task(server, "echo started; sleep 300 &", EVERY_TWO_SECONDS)
    detached_id = create_task(server, "echo started; sleep 300 >/dev/null 2>&1 &", EVERY_TWO_SECONDS)

    lingering = first_report(cluster, database_url, lingering_id, lambda report: True, "stored")
    detached = first_report(cluster, database_url, detached_id, lambda report: True, "stored")
    child = run_processes({"TASKSCHEDULER_TASK_ID": lingering_id,
                           "TASKSCHEDULER_SCHEDULED_FOR": lingering.slot})

    assert lingering.stdout == "started\n", f"{lingering}\n{cluster.log_tails()}"
    assert lingering.exit_code == 0, f"{lingering}\n{cluster.log_tails()}"
    assert seconds_between(lingering.finished_at, lingering.received_at) <= PIPE_GRACE_SECONDS + 1.0, \
        f"{lingering}\n{cluster.log_tails()}"
    # The README states that a background child that keeps the pipe open is left running.
    assert child, f"the background sleep of slot {lingering.slot} is gone\n{cluster.log_tails()}"
    assert detached.stdout == "started\n", f"{detached}\n{cluster.log_tails()}"
    assert seconds_between(detached.finished_at, detached.received_at) < 1.0, \
        f"{detached}\n{cluster.log_tails()}"


@pytest.mark.parametrize("timeout", [None, 60], ids=["default-timeout", "timeout-60"])
def test_lingering_child_next_slot(cluster, timeout):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    agent = start_agent(cluster, server.url, "linger-next")
    wait_for_registration(api, cluster, agent.agent_id)
    # The period (2 s) equals the time the agent keeps reading after the shell exits.
    task_id = create_task(server, "echo started; sleep 300 &", EVERY_TWO_SECONDS, timeout=timeout)

    first = first_report(cluster, database_url, task_id, lambda report: True, "stored")
    next_slot = format_time(slot_time(first.slot) + dt.timedelta(seconds=2))
    following = first_report(cluster, database_url, task_id,
                             lambda report: report.slot == next_slot, f"for slot {next_slot}")

    assert first.status == "succeeded", f"{first}\n{cluster.log_tails()}"
    assert following.status == "succeeded", f"{following}\n{cluster.log_tails()}"
    assert seconds_between(slot_time(following.slot), following.started_at) < 1.0, \
        f"{following}\n{cluster.log_tails()}"


def test_term_ignoring_run_killed(cluster):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    agent = start_agent(cluster, server.url, "stubborn")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, "echo before; trap '' TERM; sleep 600 & sleep 600; echo never",
                          EVERY_TWO_SECONDS, timeout=2)

    report = first_report(cluster, database_url, task_id,
                          lambda report: report.status not in ("skipped", "missed"), "a run",
                          timeout=25.0)
    run_marker = {"TASKSCHEDULER_TASK_ID": task_id, "TASKSCHEDULER_SCHEDULED_FOR": report.slot}
    wait_until(lambda: not run_processes(run_marker), 3.0,
               lambda: f"processes of the run of slot {report.slot} are still alive: "
                       f"{[command_line(pid) for pid in run_processes(run_marker)]}\n"
                       f"{cluster.log_tails()}")

    assert report.status == "timed_out", f"{report}\n{cluster.log_tails()}"
    assert report.exit_code is not None, f"{report}\n{cluster.log_tails()}"
    assert report.exit_code != 0, f"{report}\n{cluster.log_tails()}"
    assert report.stdout == "before\n", f"{report}\n{cluster.log_tails()}"
    assert seconds_between(report.started_at, report.received_at) <= 2 + KILL_GRACE_SECONDS + 2.0, \
        f"{report}\n{cluster.log_tails()}"
    assert run_processes(run_marker) == [], cluster.log_tails()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_raw_bytes_end_to_end(cluster, request, backend):
    server, _database_url = start_server(cluster, request, backend)
    api = Api(server.url)
    agent = start_agent(cluster, server.url, "bytes")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, r"printf 'caf\351\n'; printf 'a\000b\n' >&2", EVERY_SECOND)

    output = wait_for_output(api, cluster, task_id, 15.0)

    assert base64.b64decode(output.get("stdout_base64", "")).hex(" ") == "63 61 66 e9 0a", \
        f"{output}\n{cluster.log_tails()}"
    assert base64.b64decode(output.get("stderr_base64", "")).hex(" ") == "61 00 62 0a", \
        f"{output}\n{cluster.log_tails()}"
    assert output["exit_code"] == 0, f"{output}\n{cluster.log_tails()}"


def test_signal_exit_code_negative(cluster):
    server = cluster.server()
    api = Api(server.url)
    agent = start_agent(cluster, server.url, "signalled")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, "kill -9 $$", EVERY_SECOND)

    output = wait_for_output(api, cluster, task_id, 15.0)

    assert output["exit_code"] == -9, f"{output}\n{cluster.log_tails()}"
    assert output["status"] == "failed", f"{output}\n{cluster.log_tails()}"


# ---------------------------------------------------------------------------
# Network faults and failover
# ---------------------------------------------------------------------------


@pytest.fixture
def proxy_factory():
    proxies: list[TcpProxy] = []

    def create(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        proxies.append(proxy)
        return proxy

    yield create
    for proxy in proxies:
        proxy.close()


def test_slow_and_dropping_network(cluster, proxy_factory):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    proxy = proxy_factory(server.port)
    agent = start_agent(cluster, proxy.url, "network")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, SLOT_COMMAND, EVERY_SECOND)
    first_slots = wait_for_runs(cluster, agent, 1, 10.0)
    wait_for_reports(cluster, database_url, task_id, agent.agent_id, first_slots)

    # First the network is slow: every request waits 2 s in the proxy, yet reports arrive.
    proxy.delay_requests(2.0)
    delayed_at = now()
    first_slow = first_report(cluster, database_url, task_id,
                              lambda report: slot_time(report.slot) > delayed_at,
                              "for a slot after the delay started", timeout=15.0)

    # Then the network is down: every connection is closed, and the agent runs its stored
    # task list.
    proxy.drop()
    dropped_at = now()
    wait_for_runs(cluster, agent, len(file_slots(agent)) + 4, 10.0)
    depth = wait_for_outbox(cluster, agent, 3, 10.0)
    proxy.pass_through()
    healed_at = now()

    slots = check_each_run_reported_once(cluster, database_url, task_id, agent)
    slot_seconds = [slot_time(slot).timestamp() for slot in slots]
    gaps = [slot for slot, previous, current in zip(slots[1:], slot_seconds, slot_seconds[1:])
            if current - previous != 1.0]
    assert first_slow.status == "succeeded", f"{first_slow}\n{cluster.log_tails()}"
    assert proxy.dropped_connections > 0, cluster.log_tails()
    assert depth >= 3, cluster.log_tails()
    assert len(slots_between(slots, dropped_at, healed_at)) >= 3, cluster.log_tails()
    assert gaps == [], f"these slots follow a gap in the runs\n{cluster.log_tails()}"


def test_failover_to_second_server(cluster):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    dead_url = f"http://127.0.0.1:{free_port()}"
    agent = start_agent(cluster, f"{dead_url},{server.url}", "failover")
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, SLOT_COMMAND, EVERY_SECOND)

    first_slots = wait_for_runs(cluster, agent, 2, 10.0)
    counts = wait_for_reports(cluster, database_url, task_id, agent.agent_id, first_slots)

    assert sum(counts.values()) >= 2, cluster.log_tails()
    assert f"switched to server {server.url}" in agent.log_text(), agent.log_tail()


# ---------------------------------------------------------------------------
# Outbox bound
# ---------------------------------------------------------------------------


def test_full_outbox_drops_oldest(cluster):
    server = cluster.server()
    api = Api(server.url)
    database_url = sqlite_url_of(server)
    agent = start_agent(cluster, server.url, "bounded", extra_arguments=("--outbox-size", "3"))
    wait_for_registration(api, cluster, agent.agent_id)
    task_id = create_task(server, SLOT_COMMAND, EVERY_SECOND)
    first_slots = wait_for_runs(cluster, agent, 1, 10.0)
    wait_for_reports(cluster, database_url, task_id, agent.agent_id, first_slots)

    server.stop()
    stopped_at = now()
    wait_for_runs(cluster, agent, len(file_slots(agent)) + 6, 12.0)
    server.start()
    # The outbox stays full until the first report gets through, so an empty outbox
    # means that the agent caught up and drops no more.
    wait_until(lambda: outbox_depth(agent.state_dir) == 0, CATCH_UP_SECONDS,
               lambda: f"the agent did not catch up\n{cluster.log_tails()}")
    dropped = outbox_dropped(agent.state_dir)

    def server_dropped_count() -> int:
        return next(entry["outbox_dropped"] for entry in api.agents()
                    if entry["agent_id"] == agent.agent_id)

    server_dropped = wait_until(lambda: server_dropped_count() == dropped and dropped, 10.0,
                                lambda: f"the server shows {server_dropped_count()} dropped reports, "
                                        f"the agent stores {dropped}\n{cluster.log_tails()}")
    # After SIGTERM the agent finishes its run, sends what is left and exits.
    exit_code = agent.stop()
    slots = file_slots(agent)
    counts = report_counts(database_url, task_id, agent.agent_id)
    unreported = [slot for slot in slots if not counts[slot]]
    first_unreported = slots.index(unreported[0]) if unreported else 0
    # Reports older than the dropped ones must have reached the server before the outage.
    redelivered_older = [report.slot for report in stored_reports(database_url, task_id)
                         if unreported and slot_time(report.slot) < slot_time(unreported[0])
                         and report.received_at > stopped_at]

    assert exit_code == 0, agent.log_tail()
    assert dropped >= 3, cluster.log_tails()
    assert server_dropped == dropped, cluster.log_tails()
    assert len(unreported) == dropped, f"unreported slots {unreported}\n{cluster.log_tails()}"
    # Dropping the oldest unsent reports leaves one gap in the reported slots.
    assert unreported == slots[first_unreported:first_unreported + len(unreported)], \
        f"unreported slots {unreported}\n{cluster.log_tails()}"
    assert redelivered_older == [], f"unreported slots {unreported}\n{cluster.log_tails()}"
    assert "outbox is full" in agent.log_text(), agent.log_tail()
