"""The agent's start path: batched start records, and background work giving way to starts.

The runs go through a real Agent (never connected to a server), its real state store
and real /bin/sh commands. The agent's clock is fixed; the start gate's waits are real.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sqlite3
import sys
import threading
import time

import pytest

import agent
from agent import ProcessGroup, ResultWriter, RunResult, StartGate, Task, format_time

UTC = dt.timezone.utc
SLOT = dt.datetime(2026, 1, 5, 12, tzinfo=UTC)
UNUSED_SERVER_URL = "http://127.0.0.1:9"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runs /bin/sh commands")


class FixedClock(agent.Clock):
    """A wall clock that stays at one instant, so every run belongs to SLOT."""

    def __init__(self, instant: dt.datetime):
        self.instant = instant

    def now(self) -> dt.datetime:
        return self.instant


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "state")


@pytest.fixture
def make_agent(state_dir):
    agents: list[agent.Agent] = []

    def build() -> agent.Agent:
        built = agent.Agent(server_url=UNUSED_SERVER_URL, state_dir=state_dir, clock=FixedClock(SLOT))
        agents.append(built)
        return built

    yield build
    for built in agents:
        built.wait_for_runs()
        built.store.close()


def finished_reports(tested_agent: agent.Agent) -> dict[str, dict]:
    tested_agent.wait_for_runs()
    return {task_id: payload for task_id, _slot_key, payload in tested_agent.store.unreported()}


def finished_run(task_id: str) -> RunResult:
    return RunResult(task_id=task_id, scheduled_for=SLOT, started_at=SLOT,
                     finished_at=SLOT + dt.timedelta(seconds=1), exit_code=0, status="succeeded",
                     stdout="out\n", stderr="")


# ---------------------------------------------------------------------------
# StartGate
# ---------------------------------------------------------------------------


def test_gate_is_busy_while_a_run_starts():
    gate = StartGate()
    gate.enter()

    assert gate.starting == 1
    assert gate.wait_until_idle(0.05) is False

    threading.Timer(0.1, gate.leave).start()
    assert gate.wait_until_idle(10.0) is True
    assert gate.starting == 0


def test_gate_busy_for_quiet_time():
    gate = StartGate()
    gate.enter()
    gate.leave()

    assert gate.wait_until_idle(0.0) is False
    assert gate.wait_until_idle(10.0) is True


def test_gate_is_busy_just_before_a_planned_start():
    gate = StartGate()
    gate.expect(time.monotonic() + StartGate.SLOT_MARGIN_SECONDS / 2)

    assert gate.wait_until_idle(0.0) is False

    gate.expect(math.inf)
    assert gate.wait_until_idle(0.0) is True


def test_gate_idle_when_next_start_far():
    gate = StartGate()
    gate.expect(time.monotonic() + 60.0)

    assert gate.wait_until_idle(0.0) is True


# ---------------------------------------------------------------------------
# ResultWriter and the gate
# ---------------------------------------------------------------------------


def test_result_writer_holds_results_while_a_run_starts(state_dir):
    store = agent.StateStore(state_dir)
    store.record_start("t1", SLOT)
    gate = StartGate()
    written = threading.Event()
    writer = ResultWriter(store, written.set, gate)
    writer.MAX_START_WAIT_SECONDS = 60.0

    gate.enter()
    writer.submit(finished_run("t1"))

    assert not written.wait(0.3)
    assert store.unreported() == []

    gate.leave()
    assert written.wait(10.0)
    writer.close()
    assert [task_id for task_id, _slot, _body in store.unreported()] == ["t1"]
    store.close()


def test_result_writer_gate_wait_bounded(state_dir):
    store = agent.StateStore(state_dir)
    store.record_start("t1", SLOT)
    gate = StartGate()
    gate.enter()  # never left, as for runs queued behind long ones
    written = threading.Event()
    writer = ResultWriter(store, written.set, gate)

    writer.submit(finished_run("t1"))

    assert written.wait(ResultWriter.MAX_START_WAIT_SECONDS + 10.0)
    writer.close()
    assert [task_id for task_id, _slot, _body in store.unreported()] == ["t1"]
    store.close()


def test_result_writer_stores_process_groups(state_dir):
    store = agent.StateStore(state_dir)
    store.record_start("t1", SLOT)
    writer = ResultWriter(store, lambda: None)

    writer.submit(ProcessGroup("t1", SLOT, 4242))
    writer.close()

    assert store.mark_lost_runs(SLOT) == [("t1", SLOT, 4242)]
    store.close()


# ---------------------------------------------------------------------------
# Batched starts through a real Agent
# ---------------------------------------------------------------------------


@linux_only
def test_batch_records_starts_in_one_transaction(make_agent):
    tested_agent = make_agent()
    statements: list[str] = []
    tested_agent.store._fast.set_trace_callback(statements.append)
    tasks = [Task(f"t{index}", f"echo {index}", "every 1 seconds", timeout=30) for index in range(5)]

    with tested_agent.start_batch():
        for task in tasks:
            tested_agent.start_run(task, SLOT)
        # Held back until the batch ends.
        assert tested_agent.start_gate.starting == 5
        assert all(handle.future is None for handles in tested_agent._running.values() for handle in handles)
    reports = finished_reports(tested_agent)

    inserts = [index for index, statement in enumerate(statements) if statement.startswith("INSERT OR IGNORE")]
    assert len(inserts) == 5
    assert "COMMIT" not in statements[inserts[0]:inserts[-1]]
    assert {task_id: (payload["status"], payload["stdout"]) for task_id, payload in reports.items()} == \
        {f"t{index}": ("succeeded", f"{index}\n") for index in range(5)}
    assert tested_agent.start_gate.starting == 0
    assert tested_agent._active_runs == 0


@linux_only
def test_batch_skips_recorded_slot(make_agent):
    tested_agent = make_agent()
    task = Task("t1", "echo ran >> ran.txt", "every 1 seconds", timeout=30)
    # The slot is in the store, but not in the agent's memory, as after a second writer.
    assert tested_agent.store.last_slot("t1") is None
    with sqlite3.connect(tested_agent.store.path) as other:
        other.execute("INSERT INTO runs (task_id, scheduled_for, status) VALUES (?, ?, 'running')",
                      ("t1", agent._slot_key(SLOT)))

    with tested_agent.start_batch():
        tested_agent.start_run(task, SLOT)
    tested_agent.wait_for_runs()

    assert not os.path.exists(os.path.join(tested_agent.runner.work_dir, "ran.txt"))
    assert tested_agent.start_gate.starting == 0
    assert tested_agent._active_runs == 0
    assert tested_agent._running == {}


@linux_only
def test_batch_record_failure_runs_nothing(make_agent, monkeypatch, caplog):
    tested_agent = make_agent()
    task = Task("t1", "echo ran >> ran.txt", "every 1 seconds", timeout=30)

    def fail(runs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(tested_agent.store, "record_starts", fail)
    with tested_agent.start_batch():
        tested_agent.start_run(task, SLOT)
    tested_agent.wait_for_runs()

    assert not os.path.exists(os.path.join(tested_agent.runner.work_dir, "ran.txt"))
    assert f"task t1 slot {format_time(SLOT)}" in caplog.text
    assert "could not record the start of 1 runs" in caplog.text
    assert tested_agent.start_gate.starting == 0
    assert tested_agent._active_runs == 0
    assert tested_agent._running == {}


@linux_only
def test_started_run_stores_its_process_group(make_agent):
    tested_agent = make_agent()
    task = Task("t1", "echo $$", "every 1 seconds", timeout=30)

    with tested_agent.start_batch():
        tested_agent.start_run(task, SLOT)
    reports = finished_reports(tested_agent)

    shell_pid = int(reports["t1"]["stdout"])
    (stored,) = tested_agent.store._connection.execute(
        "SELECT process_group FROM runs WHERE task_id = 't1'").fetchone()
    # The shell leads the run's own session, so its pid is the process group id.
    assert stored == shell_pid


# ---------------------------------------------------------------------------
# The loop's wait for a due job
# ---------------------------------------------------------------------------


def test_spin_ends_at_wakeup(state_dir):
    store = agent.StateStore(state_dir)
    scheduler = agent.TaskScheduler(store, lambda task, slot, late: None)
    spinner = threading.Thread(target=scheduler._spin, args=(60.0,))

    spinner.start()
    time.sleep(0.05)
    scheduler.wake()
    spinner.join(10.0)

    assert not spinner.is_alive()
    store.close()


def test_spin_ends_at_deadline(state_dir):
    store = agent.StateStore(state_dir)
    scheduler = agent.TaskScheduler(store, lambda task, slot, late: None)
    spinner = threading.Thread(target=scheduler._spin, args=(0.05,))

    spinner.start()
    spinner.join(10.0)

    assert not spinner.is_alive()
    store.close()


@linux_only
def test_loop_fires_job_due_within_spin(state_dir):
    store = agent.StateStore(state_dir)
    fired = threading.Event()
    scheduler = agent.TaskScheduler(store, lambda task, slot, late: fired.set())
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.run_forever, args=(stop,))
    task = Task("t1", "true", "every 1 seconds")
    scheduler.request_reconcile([task])

    loop.start()
    fired_in_time = fired.wait(10.0)
    stop.set()
    scheduler.wake()
    loop.join(10.0)

    assert fired_in_time
    assert not loop.is_alive()
    store.close()


# ---------------------------------------------------------------------------
# The gate after the loop stops, and process groups of started runs
# ---------------------------------------------------------------------------


@linux_only
def test_stopped_loop_leaves_gate_idle(make_agent):
    tested_agent = make_agent()
    # A task due about 1 s after the loop plans it, so the loop expects a start then.
    tested_agent.scheduler.request_reconcile([Task("t1", "true", "every 1 seconds")])
    loop = threading.Thread(target=tested_agent.scheduler.run_forever, args=(tested_agent.stop_event,))

    loop.start()
    time.sleep(0.2)
    tested_agent.stop()
    loop.join(10.0)
    # Past the start that the stopped loop last expected.
    time.sleep(1.2)

    assert not loop.is_alive()
    assert tested_agent.start_gate.wait_until_idle(0.0) is True


@linux_only
def test_process_group_stored_while_gate_busy(make_agent):
    tested_agent = make_agent()
    tested_agent.results.MAX_START_WAIT_SECONDS = 60.0
    # Another run still starting keeps the gate busy; results would wait a minute for it.
    tested_agent.start_gate.enter()
    marker = os.path.join(tested_agent.runner.work_dir, "started.txt")
    task = Task("t1", "echo $$ > started.txt; exec sleep 30", "every 1 seconds", timeout=60)

    with tested_agent.start_batch():
        tested_agent.start_run(task, SLOT)
    stored = None
    deadline = time.monotonic() + 10.0
    while stored is None and time.monotonic() < deadline:
        time.sleep(0.01)
        with sqlite3.connect(tested_agent.store.path) as other:
            (stored,) = other.execute("SELECT process_group FROM runs WHERE task_id = 't1'").fetchone()

    for handles in tested_agent._running.values():
        for handle in handles:
            handle.cancel()
    tested_agent.start_gate.leave()
    tested_agent.wait_for_runs()

    with open(marker) as marker_file:
        shell_pid = int(marker_file.read())
    # A restarted agent needs the group to kill the run's processes after a kill of the agent.
    assert stored == shell_pid
