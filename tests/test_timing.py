"""Timing rules of the task scheduler and the agent: missed slots, catch-up, restarts,
steps of the wall clock, overlap, --when-busy, jitter and timeouts.

The state store is a real SQLite file and commands run as real /bin/sh subprocesses.
Only the clock is faked: a wall-clock step moves `now()` and leaves `monotonic()`.
`schedule`'s jobs follow the real clock and the nearest is seconds away, so none falls due
while a test runs, and the tests drive slots by calling the scheduler directly.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Optional

import pytest

import agent
from agent import StateStore, Task, TaskScheduler, format_time, jitter_offset

UTC = dt.timezone.utc
# The Agent constructor needs a server URL, but no test sends anything to it.
UNUSED_SERVER_URL = "http://127.0.0.1:9"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runs /bin/sh commands")


def utc(*fields: int) -> dt.datetime:
    return dt.datetime(*fields, tzinfo=UTC)


class FakeClock(agent.Clock):
    """A clock that stays where a test puts it: wall time, monotonic time and host UTC offset."""

    def __init__(self, instant: dt.datetime, monotonic: float = 1000.0,
                 offset: Optional[dt.timedelta] = dt.timedelta(0)):
        self.instant = instant
        self.monotonic_seconds = monotonic
        self.offset = offset

    def now(self) -> dt.datetime:
        return self.instant

    def monotonic(self) -> float:
        return self.monotonic_seconds

    def local_offset(self) -> Optional[dt.timedelta]:
        return self.offset


class SlotRecorder:
    """Fire and missed callbacks that record their calls.

    `fire` also records the slot's start in the store, as `Agent.start_run` does, so
    the scheduler treats the slot as handled.
    """

    def __init__(self, store: StateStore):
        self.store = store
        self.fired: list[tuple[str, dt.datetime, bool]] = []
        self.missed: list[tuple[str, dt.datetime, dt.datetime, int]] = []

    def fire(self, task: Task, slot: dt.datetime, late: bool = False) -> None:
        self.fired.append((task.task_id, slot, late))
        self.store.record_start(task.task_id, slot)

    def miss(self, task: Task, first: dt.datetime, last: dt.datetime, count: int) -> None:
        self.missed.append((task.task_id, first, last, count))


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "state")


@pytest.fixture
def store(state_dir):
    opened = StateStore(state_dir)
    yield opened
    opened.close()


def restart_scheduler(state_dir: str, clock: FakeClock, stores: list[StateStore],
                      agent_id: str = "") -> tuple[TaskScheduler, SlotRecorder]:
    """Open the state directory again and build a fresh scheduler on it, as a restarted agent does."""
    reopened = StateStore(state_dir)
    stores.append(reopened)
    recorder = SlotRecorder(reopened)
    scheduler = TaskScheduler(reopened, recorder.fire, missed=recorder.miss, clock=clock,
                              agent_id=agent_id)
    return scheduler, recorder


@pytest.fixture
def restart(state_dir):
    """Build restarted schedulers on the test's state directory and close their stores at the end."""
    stores: list[StateStore] = []

    def build(clock: FakeClock, agent_id: str = "") -> tuple[TaskScheduler, SlotRecorder]:
        return restart_scheduler(state_dir, clock, stores, agent_id)

    yield build
    for opened in stores:
        opened.close()


def store_previous_state(state_dir: str, task: Task, known_since: dt.datetime,
             handled: Optional[dt.datetime]) -> None:
    """Store a task and, if given, the newest slot an earlier agent process handled."""
    earlier = StateStore(state_dir)
    earlier.upsert_task(task, now=known_since)
    if handled is not None:
        earlier.record_start(task.task_id, handled)
    earlier.close()


# ---------------------------------------------------------------------------
# Coming back after downtime
# ---------------------------------------------------------------------------


EVERY_MINUTE = Task("minutely", "true", "every 1 minutes")
CRON_MINUTE = Task("minutely", "true", "* * * * *")


@pytest.mark.parametrize("task", [EVERY_MINUTE, CRON_MINUTE], ids=["interval", "cron"])
def test_downtime_reports_missed_slots(state_dir, restart, task):
    store_previous_state(state_dir, task, known_since=utc(2026, 1, 5, 8),
                         handled=utc(2026, 1, 5, 9))
    scheduler, recorder = restart(FakeClock(utc(2026, 1, 5, 10, 45, 30)))

    scheduler.reconcile([task])

    assert recorder.missed == [("minutely", utc(2026, 1, 5, 9, 1), utc(2026, 1, 5, 10, 45), 105)]
    assert recorder.fired == []
    assert scheduler.planned() == {"minutely": utc(2026, 1, 5, 10, 46)}


@pytest.mark.parametrize("task", [EVERY_MINUTE, CRON_MINUTE], ids=["interval", "cron"])
def test_downtime_catchup_runs_newest_late(state_dir, restart, task):
    task = Task(task.task_id, task.command, task.frequency, catchup=60)
    store_previous_state(state_dir, task, known_since=utc(2026, 1, 5, 8),
                         handled=utc(2026, 1, 5, 9))
    scheduler, recorder = restart(FakeClock(utc(2026, 1, 5, 10, 45, 30)))

    scheduler.reconcile([task])

    assert recorder.fired == [("minutely", utc(2026, 1, 5, 10, 45), True)]
    assert recorder.missed == [("minutely", utc(2026, 1, 5, 9, 1), utc(2026, 1, 5, 10, 44), 104)]
    assert scheduler.planned() == {"minutely": utc(2026, 1, 5, 10, 46)}


def test_downtime_missed_row_in_store(state_dir):
    store_previous_state(state_dir, EVERY_MINUTE, known_since=utc(2026, 1, 5, 8),
                         handled=utc(2026, 1, 5, 9))
    restarted = agent.Agent(server_url=UNUSED_SERVER_URL, state_dir=state_dir,
                            clock=FakeClock(utc(2026, 1, 5, 10, 45, 30)))
    try:
        restarted.scheduler.reconcile(restarted.store.tasks())
        reports = restarted.store.unreported()
    finally:
        restarted.wait_for_runs()
        restarted.store.close()

    assert len(reports) == 1
    task_id, _slot_key, payload = reports[0]
    assert task_id == "minutely"
    assert payload["status"] == "missed"
    assert payload["missed_slots"] == 105
    assert payload["first_missed"] == "2026-01-05T09:01:00Z"
    assert payload["scheduled_for"] == "2026-01-05T10:45:00Z"


DAILY = Task("daily", "true", "0 8 * * *")


def stop_daily_agent_before_slot(state_dir: str, restart, task: Task) -> None:
    """Run an agent that handled yesterday's 08:00 slot and plans today's at 07:55, then stop it."""
    store_previous_state(state_dir, task, known_since=utc(2026, 1, 1), handled=utc(2026, 1, 4, 8))
    scheduler, recorder = restart(FakeClock(utc(2026, 1, 5, 7, 55)))
    scheduler.reconcile([task])
    assert scheduler.planned() == {"daily": utc(2026, 1, 5, 8)}
    assert recorder.fired == []
    assert recorder.missed == []


def test_daily_downtime_misses_slot(state_dir, restart):
    stop_daily_agent_before_slot(state_dir, restart, DAILY)
    scheduler, recorder = restart(FakeClock(utc(2026, 1, 5, 9, 35)))

    scheduler.reconcile([DAILY])

    assert recorder.missed == [("daily", utc(2026, 1, 5, 8), utc(2026, 1, 5, 8), 1)]
    assert recorder.fired == []
    assert scheduler.planned() == {"daily": utc(2026, 1, 6, 8)}


def test_daily_downtime_catchup_runs_late(state_dir, restart):
    task = Task("daily", "true", "0 8 * * *", catchup=7200)
    stop_daily_agent_before_slot(state_dir, restart, task)
    scheduler, recorder = restart(FakeClock(utc(2026, 1, 5, 9, 35)))

    scheduler.reconcile([task])

    assert recorder.fired == [("daily", utc(2026, 1, 5, 8), True)]
    assert recorder.missed == []
    assert scheduler.planned() == {"daily": utc(2026, 1, 6, 8)}


def test_restart_within_grace_runs_slot(state_dir, restart):
    store_previous_state(state_dir, CRON_MINUTE, known_since=utc(2026, 1, 5, 8),
                         handled=utc(2026, 1, 5, 11, 59))
    scheduler, recorder = restart(FakeClock(utc(2026, 1, 5, 12, 0, 2)))

    scheduler.reconcile([CRON_MINUTE])

    assert recorder.fired == [("minutely", utc(2026, 1, 5, 12), False)]
    assert recorder.missed == []
    assert scheduler.planned() == {"minutely": utc(2026, 1, 5, 12, 1)}


def test_restart_never_repeats_handled_slot(state_dir, restart):
    store_previous_state(state_dir, CRON_MINUTE, known_since=utc(2026, 1, 5, 8),
                         handled=utc(2026, 1, 5, 12))
    scheduler, recorder = restart(FakeClock(utc(2026, 1, 5, 12, 0, 2)))

    scheduler.reconcile([CRON_MINUTE])

    assert recorder.fired == []
    assert recorder.missed == []
    assert scheduler.planned() == {"minutely": utc(2026, 1, 5, 12, 1)}


# ---------------------------------------------------------------------------
# Steps of the wall clock and changes of the host's UTC offset
# ---------------------------------------------------------------------------


FIVE_SECONDS = Task("five-seconds", "true", "every 5 seconds")
FIVE_MINUTES = Task("five-minutes", "true", "*/5 * * * *")
NOON = utc(2026, 1, 5, 12)


@pytest.fixture
def stepped(store):
    """A scheduler that planned both tasks at 12:00:00Z and whose loop took its first clock reading."""
    clock = FakeClock(NOON)
    recorder = SlotRecorder(store)
    scheduler = TaskScheduler(store, recorder.fire, missed=recorder.miss, clock=clock)
    for task in (FIVE_SECONDS, FIVE_MINUTES):
        store.upsert_task(task, now=NOON)
    scheduler.reconcile([FIVE_SECONDS, FIVE_MINUTES])
    scheduler.run_pending()
    assert scheduler.planned() == {"five-seconds": utc(2026, 1, 5, 12, 0, 5),
                                   "five-minutes": utc(2026, 1, 5, 12, 5)}
    return scheduler, recorder, clock


def fired_per_task(recorder: SlotRecorder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task_id, _slot, _late in recorder.fired:
        counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def test_step_forward_runs_no_burst(stepped):
    scheduler, recorder, clock = stepped

    clock.instant = NOON + dt.timedelta(hours=1)
    scheduler.run_pending()

    for task_id, count in fired_per_task(recorder).items():
        assert count <= 1, (task_id, recorder.fired)
    assert sorted(recorder.fired) == [("five-minutes", utc(2026, 1, 5, 13), False),
                                      ("five-seconds", utc(2026, 1, 5, 13), False)]


def test_step_forward_replans_from_new_time(stepped):
    scheduler, _recorder, clock = stepped

    clock.instant = NOON + dt.timedelta(hours=1)
    scheduler.run_pending()

    assert scheduler.planned() == {"five-seconds": utc(2026, 1, 5, 13, 0, 5),
                                   "five-minutes": utc(2026, 1, 5, 13, 5)}


def test_step_forward_reports_skipped_over_slots(stepped):
    scheduler, recorder, clock = stepped

    clock.instant = NOON + dt.timedelta(hours=1)
    scheduler.run_pending()
    missed = {task_id: (first, last, count) for task_id, first, last, count in recorder.missed}

    assert len(recorder.missed) == 2
    assert missed["five-seconds"] == (utc(2026, 1, 5, 12, 0, 5), utc(2026, 1, 5, 12, 59, 55), 719)
    assert missed["five-minutes"] == (utc(2026, 1, 5, 12, 5), utc(2026, 1, 5, 12, 55), 11)


def test_step_forward_off_slot_replans(stepped):
    scheduler, recorder, clock = stepped

    clock.instant = NOON + dt.timedelta(hours=1, seconds=2)
    scheduler.run_pending()

    assert sorted(recorder.fired) == [("five-minutes", utc(2026, 1, 5, 13), False),
                                      ("five-seconds", utc(2026, 1, 5, 13), False)]
    assert scheduler.planned() == {"five-seconds": utc(2026, 1, 5, 13, 0, 5),
                                   "five-minutes": utc(2026, 1, 5, 13, 5)}


def test_step_back_repeats_no_slot(stepped):
    scheduler, recorder, clock = stepped
    clock.instant = NOON + dt.timedelta(hours=1)
    scheduler.run_pending()
    fired_before = list(recorder.fired)
    missed_before = list(recorder.missed)

    clock.instant = NOON
    scheduler.run_pending()

    assert recorder.fired == fired_before
    assert recorder.missed == missed_before
    assert scheduler.planned() == {"five-seconds": utc(2026, 1, 5, 13, 0, 5),
                                   "five-minutes": utc(2026, 1, 5, 13, 5)}


def test_step_back_before_first_slot_runs(stepped):
    scheduler, recorder, clock = stepped

    clock.instant = NOON - dt.timedelta(hours=1)
    scheduler.run_pending()
    planned = scheduler.planned()["five-seconds"]
    clock.instant = planned
    scheduler._fire("five-seconds", planned)
    scheduler._plan_fired()

    assert planned == utc(2026, 1, 5, 11, 0, 5)
    assert recorder.fired == [("five-seconds", planned, False)]
    assert recorder.missed == []


def test_steady_clock_keeps_jobs(stepped):
    scheduler, recorder, clock = stepped
    jobs_before = scheduler.jobs()

    clock.instant = NOON + dt.timedelta(milliseconds=500)
    clock.monotonic_seconds += 0.5
    scheduler.run_pending()

    jobs_after = scheduler.jobs()

    assert len(jobs_after) == 2
    for job in jobs_after:
        assert any(job is old for old in jobs_before), job
    assert recorder.fired == []


def test_offset_change_replans_jobs(stepped):
    scheduler, recorder, clock = stepped
    planned_before = scheduler.planned()
    jobs_before = scheduler.jobs()

    clock.offset = dt.timedelta(hours=1)
    scheduler.run_pending()
    jobs_after = scheduler.jobs()

    assert scheduler.planned() == planned_before
    assert len(jobs_after) == 2
    for job in jobs_after:
        assert not any(job is old for old in jobs_before), job
    assert recorder.fired == []
    assert recorder.missed == []


# ---------------------------------------------------------------------------
# Overlap and --when-busy, through a real Agent and real subprocesses
# ---------------------------------------------------------------------------


SLOT = utc(2026, 1, 5, 12)
NEXT_SLOT = SLOT + dt.timedelta(seconds=1)


@pytest.fixture
def make_agent(state_dir):
    """Build Agents (never run) on the test's state directory and close each one at the end."""
    agents: list[agent.Agent] = []

    def build(**options) -> agent.Agent:
        options.setdefault("clock", FakeClock(SLOT))
        built = agent.Agent(server_url=UNUSED_SERVER_URL, state_dir=state_dir, **options)
        agents.append(built)
        return built

    yield build
    for built in agents:
        built.wait_for_runs()
        built.store.close()


def finished_reports(tested_agent: agent.Agent) -> dict[tuple[str, str], dict]:
    """Wait for every run, then return the outbox keyed by (task id, scheduled_for)."""
    tested_agent.wait_for_runs()
    return {(task_id, payload["scheduled_for"]): payload
            for task_id, _slot_key, payload in tested_agent.store.unreported()}


def slow_task(overlap: str) -> Task:
    # The explicit timeout keeps the default (the 1 s period) from ending the run.
    return Task("slow", "sleep 1.5", "every 1 seconds", overlap=overlap, timeout=30)


@linux_only
def test_overlap_skip_skips_next_slot(make_agent):
    tested_agent = make_agent()
    task = slow_task("skip")

    tested_agent.start_run(task, SLOT)
    tested_agent.start_run(task, NEXT_SLOT)
    reports = finished_reports(tested_agent)

    assert reports[("slow", format_time(SLOT))]["status"] == "succeeded"
    assert reports[("slow", format_time(NEXT_SLOT))]["status"] == "skipped"
    assert "previous run" in reports[("slow", format_time(NEXT_SLOT))]["reason"]


@linux_only
def test_overlap_allow_runs_both(make_agent):
    tested_agent = make_agent()
    task = Task("slow", "echo start >> runs.txt; sleep 1.5; echo end >> runs.txt",
                "every 1 seconds", overlap="allow", timeout=30)

    tested_agent.start_run(task, SLOT)
    tested_agent.start_run(task, NEXT_SLOT)
    reports = finished_reports(tested_agent)
    with open(f"{tested_agent.runner.work_dir}/runs.txt") as runs_file:
        events = runs_file.read().split()

    assert reports[("slow", format_time(SLOT))]["status"] == "succeeded"
    assert reports[("slow", format_time(NEXT_SLOT))]["status"] == "succeeded"
    assert events == ["start", "start", "end", "end"]


@linux_only
def test_overlap_replace_cancels_first(make_agent):
    tested_agent = make_agent()
    task = slow_task("replace")

    tested_agent.start_run(task, SLOT)
    tested_agent.start_run(task, NEXT_SLOT)
    reports = finished_reports(tested_agent)

    assert reports[("slow", format_time(SLOT))]["status"] == "cancelled"
    assert "replaced" in reports[("slow", format_time(SLOT))]["reason"]
    assert reports[("slow", format_time(NEXT_SLOT))]["status"] == "succeeded"


@linux_only
def test_when_busy_skip_skips_slot(make_agent):
    tested_agent = make_agent(max_concurrent_runs=1, when_busy="skip")
    first = Task("first", "sleep 1.5", "@hourly")
    second = Task("second", "true", "@hourly")

    tested_agent.start_run(first, SLOT)
    tested_agent.start_run(second, SLOT)
    reports = finished_reports(tested_agent)

    assert reports[("first", format_time(SLOT))]["status"] == "succeeded"
    assert reports[("second", format_time(SLOT))]["status"] == "skipped"
    assert "busy" in reports[("second", format_time(SLOT))]["reason"]


@linux_only
def test_when_busy_queue_runs_after(make_agent):
    tested_agent = make_agent(max_concurrent_runs=1, when_busy="queue")
    first = Task("first", "sleep 1; echo first >> order.txt", "@hourly")
    second = Task("second", "echo second >> order.txt", "@hourly")

    tested_agent.start_run(first, SLOT)
    tested_agent.start_run(second, SLOT)
    reports = finished_reports(tested_agent)
    with open(f"{tested_agent.runner.work_dir}/order.txt") as order_file:
        order = order_file.read().split()

    assert reports[("first", format_time(SLOT))]["status"] == "succeeded"
    assert reports[("second", format_time(SLOT))]["status"] == "succeeded"
    assert order == ["first", "second"]


# ---------------------------------------------------------------------------
# Jitter
# ---------------------------------------------------------------------------


JITTERED = Task("jittered", "true", "every 1 minutes", jitter=30)
MINUTE_SLOTS = [SLOT + dt.timedelta(minutes=minute) for minute in range(200)]


def test_jitter_offset_within_range():
    for agent_id in ("agent-a", "agent-b", "agent-c"):
        for slot in MINUTE_SLOTS:
            offset = jitter_offset(agent_id, JITTERED, slot)
            assert 0 <= offset < 30, (agent_id, slot, offset)


def test_jitter_offset_is_stable():
    for slot in MINUTE_SLOTS:
        assert jitter_offset("agent-a", JITTERED, slot) == jitter_offset("agent-a", JITTERED, slot)


def test_jitter_offset_differs_per_agent():
    differing = [slot for slot in MINUTE_SLOTS
                 if jitter_offset("agent-a", JITTERED, slot) != jitter_offset("agent-b", JITTERED, slot)]

    assert len(differing) >= 0.9 * len(MINUTE_SLOTS)


def test_jitter_offset_zero_without_jitter():
    task = Task("plain", "true", "every 1 minutes")

    assert jitter_offset("agent-a", task, SLOT) == 0.0


def test_jitter_delays_job_not_slot(store):
    now = SLOT - dt.timedelta(seconds=20)
    recorder = SlotRecorder(store)
    scheduler = TaskScheduler(store, recorder.fire, clock=FakeClock(now), agent_id="agent-a")
    offset = jitter_offset("agent-a", JITTERED, SLOT)

    scheduler.reconcile([JITTERED])
    [job] = scheduler.jobs()

    assert offset > 1.0
    assert scheduler.planned() == {"jittered": SLOT}
    assert job.interval == pytest.approx(20 + offset)


@linux_only
def test_jittered_run_reports_slot(make_agent):
    clock = FakeClock(SLOT - dt.timedelta(seconds=20))
    tested_agent = make_agent(agent_id="agent-a", clock=clock)
    tested_agent.store.upsert_task(JITTERED, now=clock.instant)
    tested_agent.scheduler.reconcile([JITTERED])
    [job] = tested_agent.scheduler.jobs()
    started = SLOT + dt.timedelta(seconds=jitter_offset("agent-a", JITTERED, SLOT) + 0.2)

    clock.instant = started
    job.job_func()
    reports = finished_reports(tested_agent)

    assert list(reports) == [("jittered", format_time(SLOT))]
    payload = reports[("jittered", format_time(SLOT))]
    assert payload["status"] == "succeeded"
    assert payload["started_at"] == format_time(started)
    assert "late" not in payload


# ---------------------------------------------------------------------------
# Timeout option
# ---------------------------------------------------------------------------


@linux_only
def test_timeout_option_ends_run(tmp_path):
    runner = agent.Runner("agent-t", str(tmp_path / "work"))
    task = Task("sleepy", "sleep 5", "@hourly", timeout=1)

    result = runner.run(task, SLOT)

    assert result.status == "timed_out"
    assert "timeout of 1 s" in result.reason
    assert result.exit_code != 0
