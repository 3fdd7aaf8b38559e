"""Tests of the agent's parts: the state store, the agent id, the task scheduler, the
runner and the state directory lock. tests/test_push_listener.py tests the push listener.

They use real SQLite files, real /bin/sh subprocesses and real HTTP on 127.0.0.1. Only
the clock is faked, and only in the tests that pass a FakeClock.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import schedule

import agent
from agent import RunResult, StateStore, Task, TaskScheduler, parse_frequency

UTC = dt.timezone.utc
# The Agent constructor needs a server URL, but no test sends anything to it.
UNUSED_SERVER_URL = "http://127.0.0.1:9"
VALID_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="runs /bin/sh commands and reads /proc"
)


def utc(*fields: int) -> dt.datetime:
    return dt.datetime(*fields, tzinfo=UTC)


class FakeClock(agent.Clock):
    """A clock that stays at `instant` until a test moves it."""

    def __init__(self, instant: dt.datetime):
        self.instant = instant

    def now(self) -> dt.datetime:
        return self.instant


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "state")


@pytest.fixture
def store(state_dir):
    opened = StateStore(state_dir)
    yield opened
    opened.close()


@pytest.fixture
def make_agent(state_dir):
    """Build Agents on the test's state directory and close each one at the end."""
    agents = []

    def build(**options) -> agent.Agent:
        built = agent.Agent(server_url=UNUSED_SERVER_URL, state_dir=state_dir, **options)
        agents.append(built)
        return built

    yield build
    for built in agents:
        built.wait_for_runs()
        built.store.close()


# ---------------------------------------------------------------------------
# State store
# ---------------------------------------------------------------------------


def finished_run(task_id: str, slot: dt.datetime, status: str = "succeeded") -> RunResult:
    return RunResult(
        task_id=task_id, scheduled_for=slot, started_at=slot,
        finished_at=slot + dt.timedelta(seconds=1), exit_code=0, status=status,
        stdout="out\n", stderr="", stdout_bytes=4, stderr_bytes=0,
    )


def test_tasks_survive_reopening(state_dir):
    first = StateStore(state_dir)
    first.upsert_task(Task("b", "echo b", "every 5 minutes"))
    first.upsert_task(Task("a", "echo a", "@hourly"))
    first.close()

    reopened = StateStore(state_dir)
    tasks = reopened.tasks()
    reopened.close()

    assert tasks == [Task("a", "echo a", "@hourly"), Task("b", "echo b", "every 5 minutes")]


def test_upsert_task_outcomes(store):
    task = Task("t1", "echo hi", "every 5 minutes")

    assert store.upsert_task(task) == "added"
    assert store.upsert_task(task) == "unchanged"
    assert store.upsert_task(Task("t1", "echo bye", "every 5 minutes")) == "replaced"
    assert store.tasks() == [Task("t1", "echo bye", "every 5 minutes")]


def test_replace_tasks_reports_change(store):
    first = Task("a", "echo a", "@hourly")
    second = Task("b", "echo b", "30s")

    assert store.replace_tasks([first, second]) is True
    assert store.replace_tasks([first, second]) is False
    assert store.replace_tasks([second, first]) is False
    assert store.replace_tasks([second]) is True
    assert store.tasks() == [second]
    assert store.replace_tasks([]) is True
    assert store.tasks() == []


def test_new_state_dir_is_private(tmp_path):
    state_dir = tmp_path / "new" / "state"

    StateStore(str(state_dir)).close()

    assert state_dir.stat().st_mode & 0o777 == 0o700


def test_record_start_rejects_started_slot(state_dir):
    slot = utc(2026, 1, 1, 12, 5)
    first = StateStore(state_dir)

    assert first.record_start("t1", slot) is True
    assert first.record_start("t1", slot) is False
    first.close()

    reopened = StateStore(state_dir)
    assert reopened.record_start("t1", slot) is False
    assert reopened.record_start("t1", slot + dt.timedelta(minutes=5)) is True
    assert reopened.record_start("t2", slot) is True
    reopened.close()


def test_record_start_sets_last_slot(store):
    store.record_start("t1", utc(2026, 1, 1, 12, 5))
    store.record_start("t1", utc(2026, 1, 1, 12, 0))

    assert store.last_slot("t1") == utc(2026, 1, 1, 12, 5)
    assert store.last_slot("t2") is None


def test_cached_last_slot_skips_store_lock(store):
    slot = utc(2026, 1, 1, 12, 5)
    store.record_start("t1", slot)
    answers: list[object] = []

    def read_while_locked() -> None:
        answers.append(store.last_slot("t1"))
        answers.append(store.claim_slot("t1", slot + dt.timedelta(minutes=5)))

    # A worker holds the store's lock during each write and its fsync. The loop thread
    # reads and claims cached slots without waiting for it.
    with store._lock:
        reader = threading.Thread(target=read_while_locked)
        reader.start()
        reader.join(2.0)
        finished = not reader.is_alive()

    reader.join()
    assert finished
    assert answers == [slot, True]
    assert store.last_slot("t1") == slot + dt.timedelta(minutes=5)


def test_record_start_group_commit(store):
    slot = utc(2026, 1, 1, 12, 5)
    statements: list[str] = []
    store._fast.set_trace_callback(statements.append)
    task_ids = [f"t{index}" for index in range(20)] + ["t0"]
    outcomes: dict[int, bool] = {}

    def start(index: int) -> None:
        outcomes[index] = store.record_start(task_ids[index], slot)

    # The starts queue up while another write has the store's lock, then share a commit.
    with store._lock:
        threads = [threading.Thread(target=start, args=(index,)) for index in range(len(task_ids))]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
    for thread in threads:
        thread.join()

    commits = [statement for statement in statements if statement == "COMMIT"]
    assert sorted(outcomes.values()) == [False] + [True] * 20
    assert 1 <= len(commits) <= 2
    for task_id in task_ids:
        assert store.last_slot(task_id) == slot


class CountingStore(StateStore):
    """A real state store that counts its transactions of finished runs."""

    def __init__(self, state_dir: str):
        super().__init__(state_dir)
        self.batches: list[int] = []

    def record_finishes(self, results: list[RunResult]) -> None:
        self.batches.append(len(results))
        super().record_finishes(results)


def test_result_writer_batches_burst(state_dir):
    store = CountingStore(state_dir)
    slots = [utc(2026, 1, 1, 12) + dt.timedelta(minutes=minute) for minute in range(30)]
    for slot in slots:
        store.record_start("t1", slot)
    written = threading.Event()
    writer = agent.ResultWriter(store, written.set)

    # The writer blocks on the store's lock with the first result while the rest queue up.
    with store._lock:
        for slot in slots:
            writer.submit(finished_run("t1", slot))
        time.sleep(0.2)
    writer.close()

    assert sum(store.batches) == 30
    assert len(store.batches) <= 2
    assert written.is_set()
    assert [slot for _task_id, slot, _body in store.unreported(limit=100)] == \
        [agent._slot_key(slot) for slot in slots]
    store.close()


def test_unreported_lists_finished_runs(store):
    early, late, running = utc(2026, 1, 1, 12, 0), utc(2026, 1, 1, 12, 5), utc(2026, 1, 1, 12, 10)
    for slot in (late, early, running):
        store.record_start("t1", slot)
    store.record_finish(finished_run("t1", late, status="failed"))
    store.record_finish(finished_run("t1", early))

    pending = store.unreported()

    assert [payload["scheduled_for"] for _task_id, _slot_key, payload in pending] == [
        "2026-01-01T12:00:00Z", "2026-01-01T12:05:00Z",
    ]
    assert pending[0][0] == "t1"
    assert pending[0][2]["status"] == "succeeded"
    assert pending[1][2]["status"] == "failed"
    assert pending[0][2]["stdout"] == "out\n"


def test_mark_reported_removes_from_outbox(state_dir):
    slot = utc(2026, 1, 1, 12, 0)
    first = StateStore(state_dir)
    first.record_start("t1", slot)
    first.record_finish(finished_run("t1", slot))
    [(task_id, slot_key, _payload)] = first.unreported()

    first.mark_reported(task_id, slot_key)
    first.close()

    reopened = StateStore(state_dir)
    assert reopened.unreported() == []
    assert reopened.record_start("t1", slot) is False
    reopened.close()


def test_report_dropped_while_sent_not_counted(state_dir):
    store = StateStore(state_dir, outbox_size=2)
    slots = [utc(2026, 1, 1, 12, minute) for minute in range(3)]
    for slot in slots[:2]:
        store.record_start("t1", slot)
        store.record_finish(finished_run("t1", slot))
    oldest_task_id, oldest_slot_key, _payload = store.unreported()[0]

    # A third result arrives while the oldest report is on its way to the server, which
    # then accepts it.
    store.record_start("t1", slots[2])
    store.record_finish(finished_run("t1", slots[2]))
    dropped_during_send = store.outbox_stats()["outbox_dropped"]
    store.mark_reported(oldest_task_id, oldest_slot_key, delivered=True)

    assert dropped_during_send == 1
    assert store.outbox_stats()["outbox_dropped"] == 0
    assert [slot_key for _task_id, slot_key, _payload in store.unreported()] == \
        [agent._slot_key(slot) for slot in slots[1:]]
    store.close()


def test_rejected_dropped_report_stays_counted(state_dir):
    store = StateStore(state_dir, outbox_size=1)
    slots = [utc(2026, 1, 1, 12, minute) for minute in range(2)]
    for slot in slots:
        store.record_start("t1", slot)
        store.record_finish(finished_run("t1", slot))

    store.mark_reported("t1", agent._slot_key(slots[0]))

    assert store.outbox_stats()["outbox_dropped"] == 1
    store.close()


def test_is_unsent_false_for_dropped_report(state_dir):
    store = StateStore(state_dir, outbox_size=1)
    slots = [utc(2026, 1, 1, 12, minute) for minute in range(2)]
    for slot in slots:
        store.record_start("t1", slot)
        store.record_finish(finished_run("t1", slot))

    assert store.is_unsent("t1", agent._slot_key(slots[0])) is False
    assert store.is_unsent("t1", agent._slot_key(slots[1])) is True
    store.close()


# ---------------------------------------------------------------------------
# Agent id
# ---------------------------------------------------------------------------


def test_agent_generates_valid_id(make_agent):
    generated = make_agent().agent_id

    assert VALID_AGENT_ID.fullmatch(generated), generated


def test_agent_keeps_generated_id(make_agent):
    generated = make_agent().agent_id

    assert make_agent().agent_id == generated


def test_agent_id_option_overrides(make_agent):
    generated = make_agent().agent_id

    assert make_agent(agent_id="web-1").agent_id == "web-1"
    assert make_agent().agent_id == "web-1"
    assert generated != "web-1"


@pytest.mark.parametrize(
    "agent_id",
    ["-web", ".web", "web 1", "web/1", "w\u00e9b", "x" * 65, "web-1\n"],
    ids=["leading-dash", "leading-dot", "space", "slash", "non-ascii", "too-long", "trailing-newline"],
)
def test_agent_rejects_invalid_id(make_agent, agent_id):
    with pytest.raises(ValueError, match="invalid agent id"):
        make_agent(agent_id=agent_id)


# ---------------------------------------------------------------------------
# Task scheduler with a fake clock
# ---------------------------------------------------------------------------


NOW = utc(2026, 3, 4, 8, 58, 30)
FIVE_MINUTES = Task("five", "echo five", "every 5 minutes")
WEEKDAYS = Task("weekdays", "echo weekdays", "0 9 * * MON-FRI")
TEN_SECONDS = Task("ten", "echo ten", "@every 10s")


class FireRecorder:
    """A fire callback that records each (task, slot) it gets."""

    def __init__(self, error: Exception | None = None):
        self.calls: list[tuple[Task, dt.datetime]] = []
        self.late_flags: list[bool] = []
        self.error = error

    def __call__(self, task: Task, slot: dt.datetime, late: bool = False) -> None:
        self.calls.append((task, slot))
        self.late_flags.append(late)
        if self.error is not None:
            raise self.error


def jobs_of(scheduler: TaskScheduler) -> list[schedule.Job]:
    return list(scheduler._scheduler.jobs)


def contains_job(jobs: list[schedule.Job], job: schedule.Job) -> bool:
    return any(candidate is job for candidate in jobs)


def test_reconcile_plans_next_slots(store):
    scheduler = TaskScheduler(store, FireRecorder(), clock=FakeClock(NOW))

    changes = scheduler.reconcile([FIVE_MINUTES, WEEKDAYS, TEN_SECONDS])

    assert scheduler.planned() == {
        "five": parse_frequency("every 5 minutes").next_after(NOW),
        "weekdays": parse_frequency("0 9 * * MON-FRI").next_after(NOW),
        "ten": parse_frequency("@every 10s").next_after(NOW),
    }
    assert scheduler.planned()["weekdays"] == utc(2026, 3, 4, 9)
    assert sorted(changes["added"]) == ["five", "ten", "weekdays"]
    assert len(jobs_of(scheduler)) == 3


def test_reconcile_same_tasks_keeps_jobs(store):
    scheduler = TaskScheduler(store, FireRecorder(), clock=FakeClock(NOW))
    scheduler.reconcile([FIVE_MINUTES, WEEKDAYS])
    jobs_before = jobs_of(scheduler)

    changes = scheduler.reconcile([WEEKDAYS, FIVE_MINUTES])
    jobs_after = jobs_of(scheduler)

    assert changes == {"added": [], "replaced": [], "removed": []}
    assert len(jobs_after) == 2
    for job in jobs_before:
        assert contains_job(jobs_after, job), job


def test_reconcile_changed_command_replaces_job(store):
    scheduler = TaskScheduler(store, FireRecorder(), clock=FakeClock(NOW))
    scheduler.reconcile([FIVE_MINUTES])
    [old_job] = jobs_of(scheduler)

    changes = scheduler.reconcile([Task("five", "echo changed", "every 5 minutes")])

    assert changes["replaced"] == ["five"]
    assert len(jobs_of(scheduler)) == 1
    assert not contains_job(jobs_of(scheduler), old_job)


def test_reconcile_changed_frequency_replans(store):
    scheduler = TaskScheduler(store, FireRecorder(), clock=FakeClock(NOW))
    scheduler.reconcile([FIVE_MINUTES])
    [old_job] = jobs_of(scheduler)

    changes = scheduler.reconcile([Task("five", "echo five", "@hourly")])

    assert changes["replaced"] == ["five"]
    assert len(jobs_of(scheduler)) == 1
    assert not contains_job(jobs_of(scheduler), old_job)
    assert scheduler.planned() == {"five": utc(2026, 3, 4, 9)}


def test_reconcile_removed_task_cancels_job(store):
    scheduler = TaskScheduler(store, FireRecorder(), clock=FakeClock(NOW))
    scheduler.reconcile([FIVE_MINUTES, WEEKDAYS])
    five_job = next(job for job in jobs_of(scheduler) if job.job_func.args[0] == "five")

    changes = scheduler.reconcile([WEEKDAYS])

    assert changes["removed"] == ["five"]
    assert not contains_job(jobs_of(scheduler), five_job)
    assert len(jobs_of(scheduler)) == 1
    assert list(scheduler.planned()) == ["weekdays"]


def test_reconcile_skips_invalid_frequency(store):
    scheduler = TaskScheduler(store, FireRecorder(), clock=FakeClock(NOW))

    changes = scheduler.reconcile([Task("bad", "echo bad", "sometimes"), FIVE_MINUTES])

    assert changes["added"] == ["five"]
    assert list(scheduler.planned()) == ["five"]


def test_reconcile_survives_far_off_cron_slot(store):
    # Fires only on a 29 February that is a Sunday, so from 2005 the next is 2032.
    rare = Task("rare", "echo rare", "0 0 29 2 */7")
    scheduler = TaskScheduler(store, FireRecorder(), clock=FakeClock(utc(2005, 1, 1)))

    scheduler.reconcile([rare, FIVE_MINUTES])

    assert scheduler.planned()["five"] == utc(2005, 1, 1, 0, 5)


def test_restart_skips_recorded_slot(state_dir):
    clock = FakeClock(NOW)
    first_store = StateStore(state_dir)
    first = TaskScheduler(first_store, FireRecorder(), clock=clock)
    first.reconcile([FIVE_MINUTES])
    slot = first.planned()["five"]
    first_store.record_start("five", slot)
    first_store.close()

    clock.instant = slot - dt.timedelta(seconds=10)
    reopened = StateStore(state_dir)
    restarted = TaskScheduler(reopened, FireRecorder(), clock=clock)
    restarted.reconcile([FIVE_MINUTES])
    planned = restarted.planned()["five"]
    reopened.close()

    assert slot == utc(2026, 3, 4, 9, 0)
    assert planned == slot + dt.timedelta(minutes=5)


def test_fire_hands_slot_once(store):
    clock = FakeClock(NOW)
    recorder = FireRecorder()
    scheduler = TaskScheduler(store, recorder, clock=clock)
    scheduler.reconcile([FIVE_MINUTES])
    slot = scheduler.planned()["five"]
    clock.instant = slot + dt.timedelta(milliseconds=3)

    outcome = scheduler._fire("five", slot)
    scheduler._plan_fired()

    assert recorder.calls == [(FIVE_MINUTES, slot)]
    assert outcome is schedule.CancelJob
    assert scheduler.planned() == {"five": slot + dt.timedelta(minutes=5)}


def test_fire_unknown_task_ignored(store):
    recorder = FireRecorder()
    scheduler = TaskScheduler(store, recorder, clock=FakeClock(NOW))

    outcome = scheduler._fire("missing", utc(2026, 3, 4, 9))

    assert outcome is schedule.CancelJob
    assert recorder.calls == []


def test_fire_contains_callback_error(store):
    clock = FakeClock(NOW)
    recorder = FireRecorder(error=RuntimeError("callback failed"))
    scheduler = TaskScheduler(store, recorder, clock=clock)
    scheduler.reconcile([FIVE_MINUTES])
    slot = scheduler.planned()["five"]
    clock.instant = slot

    outcome = scheduler._fire("five", slot)
    scheduler._plan_fired()

    assert outcome is schedule.CancelJob
    assert len(recorder.calls) == 1
    assert scheduler.planned() == {"five": slot + dt.timedelta(minutes=5)}


def test_burst_starts_before_planning(store):
    tasks = [Task(f"burst-{index}", "true", "every 1 seconds") for index in range(3)]
    fired: list[str] = []
    replanned_during_fires: list[set[str]] = []

    def record(task: Task, slot: dt.datetime, late: bool = False) -> None:
        replanned_during_fires.append(set(fired) & set(scheduler.planned()))
        fired.append(task.task_id)
        store.claim_slot(task.task_id, slot)

    scheduler = TaskScheduler(store, record)
    scheduler.reconcile(tasks)
    first_slots = scheduler.planned()
    time.sleep(max((min(first_slots.values()) - agent.Clock().now()).total_seconds(), 0) + 0.05)
    scheduler.run_pending()

    # Each task of the shared slot starts before any of them is planned again.
    assert sorted(fired) == ["burst-0", "burst-1", "burst-2"]
    assert replanned_during_fires == [set(), set(), set()]
    assert scheduler.planned() == {task_id: slot + dt.timedelta(seconds=1)
                                   for task_id, slot in first_slots.items()}


# ---------------------------------------------------------------------------
# Task scheduler with the real clock
# ---------------------------------------------------------------------------


def test_interval_task_fires_each_second(store):
    fired: list[tuple[dt.datetime, dt.datetime]] = []

    def record(task: Task, slot: dt.datetime, late: bool = False) -> None:
        fired.append((slot, agent.Clock().now()))
        store.record_start(task.task_id, slot)

    scheduler = TaskScheduler(store, record)
    scheduler.reconcile([Task("tick", "true", "every 1 seconds")])
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        idle = scheduler.run_pending()
        time.sleep(min(max(idle or 0.0, 0.0), 0.02))

    slots = [slot for slot, _fired_at in fired]
    assert len(slots) >= 2, fired
    assert len(set(slots)) == len(slots), slots
    for slot in slots:
        assert slot.microsecond == 0, slot
    for earlier, later in zip(slots, slots[1:]):
        assert later - earlier == dt.timedelta(seconds=1), slots
    for slot, fired_at in fired:
        assert fired_at >= slot, (slot, fired_at)


# ---------------------------------------------------------------------------
# Runner with real subprocesses
# ---------------------------------------------------------------------------


SLOT = utc(2026, 1, 2, 3, 0)


class QuickKillRunner(agent.Runner):
    """A Runner whose commands time out after half a second, with a short kill grace."""

    KILL_GRACE_SECONDS = 0.5

    def timeout_for(self, task: Task, slot: dt.datetime, started_at: dt.datetime | None = None) -> float:
        return 0.5


@pytest.fixture
def work_dir(tmp_path):
    return str(tmp_path / "work")


@pytest.fixture
def runner(work_dir):
    return agent.Runner("agent-7", work_dir)


def live_group_members(pgid: int) -> list[int]:
    """Return the pids in process group `pgid` that are not zombies, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        # The fields after the parenthesized command name are: state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


def wait_for_empty_group(pgid: int, timeout: float = 1.0) -> list[int]:
    """Wait up to `timeout` seconds for group `pgid` to empty, and return the pids left."""
    deadline = time.monotonic() + timeout
    members = live_group_members(pgid)
    while members and time.monotonic() < deadline:
        time.sleep(0.05)
        members = live_group_members(pgid)
    return members


def pids_with_environment(name: str, value: str) -> list[int]:
    """Return the pids whose environment sets `name` to `value`, read from /proc."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ_file:
                variables = environ_file.read().split(b"\0")
        except OSError:
            continue
        if needle in variables:
            pids.append(int(entry))
    return pids


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@linux_only
def test_runner_separates_stdout_and_stderr(runner):
    result = runner.run(Task("t1", "echo out; echo err >&2", "@hourly"), SLOT)

    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 0
    assert result.status == "succeeded"
    assert result.stdout_bytes == 4
    assert result.stderr_bytes == 4
    assert result.truncated is False


@linux_only
def test_runner_reports_exit_code(runner):
    result = runner.run(Task("t1", "exit 3", "@hourly"), SLOT)

    assert result.exit_code == 3
    assert result.status == "failed"


@linux_only
def test_runner_sets_task_environment(runner):
    command = (
        'printf "%s\\n" "$TASKSCHEDULER_TASK_ID" "$TASKSCHEDULER_AGENT_ID" '
        '"$TASKSCHEDULER_SCHEDULED_FOR"'
    )

    result = runner.run(Task("env-task", command, "@hourly"), SLOT)

    assert result.stdout.splitlines() == ["env-task", "agent-7", "2026-01-02T03:00:00Z"]


@linux_only
def test_runner_starts_in_work_dir(runner, work_dir):
    result = runner.run(Task("t1", "pwd -P", "@hourly"), SLOT)

    assert result.stdout == os.path.realpath(work_dir) + "\n"


@linux_only
def test_runner_returns_despite_background_child(runner):
    task_id = f"background-{os.getpid()}-{time.monotonic_ns()}"
    started = time.monotonic()
    try:
        result = runner.run(Task(task_id, "echo started; sleep 30 &", "@hourly"), SLOT)
        elapsed = time.monotonic() - started
    finally:
        for pid in pids_with_environment("TASKSCHEDULER_TASK_ID", task_id):
            kill_group(os.getpgid(pid))

    assert elapsed < 5.0
    assert result.stdout == "started\n"
    assert result.status == "succeeded"


@linux_only
def test_runner_truncates_long_output(work_dir):
    runner = agent.Runner("agent-7", work_dir, output_limit=1000)
    expected = ("0123456789\n" * 455)[:5000]

    result = runner.run(Task("t1", "yes 0123456789 | head -c 5000", "@hourly"), SLOT)

    assert result.truncated is True
    assert result.stdout_bytes == 5000
    assert "[... 4000 bytes truncated by taskscheduler ...]" in result.stdout
    assert result.stdout.startswith(expected[:500])
    assert result.stdout.endswith(expected[-500:])
    assert len(result.stdout) < 1100
    assert result.status == "succeeded"


@linux_only
def test_runner_keeps_short_output_whole(work_dir):
    runner = agent.Runner("agent-7", work_dir, output_limit=1000)

    result = runner.run(Task("t1", "yes 0123456789 | head -c 1000", "@hourly"), SLOT)

    assert result.truncated is False
    assert result.stdout == ("0123456789\n" * 91)[:1000]


@linux_only
def test_runner_replaces_invalid_utf8(runner):
    result = runner.run(Task("t1", "printf '\\377ok\\n'; printf '\\376' >&2", "@hourly"), SLOT)

    assert result.stdout == "\ufffdok\n"
    assert result.stderr == "\ufffd"
    assert result.stdout_bytes == 4


@linux_only
def test_runner_timeout_uses_interval(runner):
    started = time.monotonic()

    result = runner.run(Task("t1", "echo $$; sleep 10", "every 1 seconds"), SLOT)
    elapsed = time.monotonic() - started
    pgid = int(result.stdout.split()[0])
    leftover = wait_for_empty_group(pgid)
    kill_group(pgid)

    assert result.status == "timed_out"
    assert elapsed < 5.0
    assert leftover == []


@linux_only
def test_runner_kills_term_ignoring_shell(work_dir):
    runner = QuickKillRunner("agent-7", work_dir)

    result = runner.run(Task("t1", "echo $$; trap '' TERM; sleep 10", "@hourly"), SLOT)
    pgid = int(result.stdout.split()[0])
    leftover = wait_for_empty_group(pgid)
    kill_group(pgid)

    assert result.status == "timed_out"
    assert leftover == []


@linux_only
def test_runner_kills_term_ignoring_child(work_dir):
    runner = QuickKillRunner("agent-7", work_dir)
    command = "echo $$; (trap '' TERM; exec sleep 30) & wait"

    result = runner.run(Task("t1", command, "@hourly"), SLOT)
    pgid = int(result.stdout.split()[0])
    leftover = wait_for_empty_group(pgid)
    kill_group(pgid)

    assert result.status == "timed_out"
    assert leftover == []


@linux_only
def test_runner_uses_calling_thread_only(runner):
    baseline = threading.active_count()
    counts: list[int] = []
    results: list[RunResult] = []
    worker = threading.Thread(target=lambda: results.append(
        runner.run(Task("t1", "echo out; sleep 0.5; echo err >&2", "@hourly"), SLOT)))

    worker.start()
    while worker.is_alive():
        counts.append(threading.active_count())
        time.sleep(0.02)
    worker.join()

    # The worker reads both pipes itself: no reader thread runs beside it.
    assert max(counts) == baseline + 1
    assert results[0].stdout == "out\n"
    assert results[0].stderr == "err\n"


@linux_only
def test_runner_times_out_with_closed_pipes(work_dir):
    runner = QuickKillRunner("agent-7", work_dir)
    started = time.monotonic()

    result = runner.run(Task("t1", "echo $$; exec >&- 2>&-; sleep 10", "@hourly"), SLOT)
    elapsed = time.monotonic() - started
    pgid = int(result.stdout.split()[0])
    leftover = wait_for_empty_group(pgid)
    kill_group(pgid)

    assert result.status == "timed_out"
    assert elapsed < 3.0
    assert leftover == []


@linux_only
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_runner_times_exit_despite_background_child(runner, monkeypatch, pidfd):
    if not pidfd:
        monkeypatch.setattr(agent, "_open_pidfd", lambda pid: None)
    task_id = f"exit-time-{os.getpid()}-{time.monotonic_ns()}"
    try:
        result = runner.run(Task(task_id, "echo started; sleep 30 &", "@hourly"), SLOT)
    finally:
        for pid in pids_with_environment("TASKSCHEDULER_TASK_ID", task_id):
            kill_group(os.getpgid(pid))

    # The shell exits at once. Its exit time does not wait for the background child,
    # whose pipe the runner stops reading after PIPE_GRACE_SECONDS.
    assert (result.finished_at - result.started_at).total_seconds() < 1.0
    assert result.stdout == "started\n"
    assert result.status == "succeeded"


# ---------------------------------------------------------------------------
# State directory lock
# ---------------------------------------------------------------------------


def test_second_agent_on_state_dir_rejected(tmp_path):
    state_dir = str(tmp_path / "state")
    first = agent.lock_state_dir(state_dir)

    completed = subprocess.run(
        [sys.executable, os.path.join(agent_dir(), "agent.py"), "--server", "http://127.0.0.1:9",
         "--state-dir", state_dir],
        capture_output=True, text=True, timeout=30)
    first.close()

    assert completed.returncode == 2
    assert "in use by another agent" in completed.stderr
    assert f"pid {os.getpid()}" in completed.stderr


def test_state_dir_lock_released_on_close(tmp_path):
    state_dir = str(tmp_path / "state")

    agent.lock_state_dir(state_dir).close()
    second = agent.lock_state_dir(state_dir)
    second.close()

    assert os.path.exists(os.path.join(state_dir, "agent.lock"))


def agent_dir() -> str:
    return os.path.dirname(os.path.abspath(agent.__file__))


@pytest.mark.parametrize("use_proc", [True, False], ids=["proc", "ps"])
def test_orphaned_run_killed(tmp_path, use_proc):
    slot = utc(2026, 1, 2, 3, 4)
    environment = dict(os.environ, TASKSCHEDULER_TASK_ID="orphan-task",
                       TASKSCHEDULER_SCHEDULED_FOR=agent.format_time(slot))
    leftover = subprocess.Popen(["sleep", "60"], env=environment, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        killed = agent.kill_orphaned_run(leftover.pid, "orphan-task", slot, use_proc=use_proc)
        untouched = agent.kill_orphaned_run(bystander.pid, "orphan-task", slot, use_proc=use_proc)
        leftover_code = leftover.wait(timeout=5)
    finally:
        bystander.kill()
        bystander.wait()

    assert killed == 1
    assert leftover_code == -signal.SIGKILL
    assert untouched == 0
