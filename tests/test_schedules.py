"""Exact fire times of cron tasks read in a time zone, across daylight-saving changes.

Every instant here is UTC, and "next N after S" means the fire times strictly after S,
each computed from the previous one. Daylight saving follows cronie. A repeated local
time fires once for a fixed-time job and twice for a wildcard job. A skipped local time
fires right after the jump for a fixed-time job and not at all for a wildcard job.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

import agent
from agent import FrequencyError, StateStore, Task, TaskError, TaskScheduler, parse_frequency

UTC = dt.timezone.utc


def utc(*fields: int) -> dt.datetime:
    return dt.datetime(*fields, tzinfo=UTC)


class FakeClock(agent.Clock):
    """A clock that stays where a test puts it, with a fixed host UTC offset."""

    def __init__(self, instant: dt.datetime):
        self.instant = instant
        self.monotonic_seconds = 1000.0
        self.offset = dt.timedelta(0)

    def now(self) -> dt.datetime:
        return self.instant

    def monotonic(self) -> float:
        return self.monotonic_seconds

    def local_offset(self) -> dt.timedelta:
        return self.offset


class StartRecorder:
    """A fire callback that records each slot and marks it started, as the agent does."""

    def __init__(self, store: StateStore):
        self.store = store
        self.slots: list[dt.datetime] = []

    def __call__(self, task: Task, slot: dt.datetime, late: bool = False) -> None:
        self.slots.append(slot)
        self.store.record_start(task.task_id, slot)


# ---------------------------------------------------------------------------
# Next fire times in a zone
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "timezone", "start", "expected"),
    [
        pytest.param(
            "0 12 * * 0", "Europe/Berlin", utc(2022, 3, 24, 11),
            [utc(2022, 3, 27, 10), utc(2022, 4, 3, 10), utc(2022, 4, 10, 10),
             utc(2022, 4, 17, 10), utc(2022, 4, 24, 10)],
            id="berlin-sunday-noon-spring",
        ),
        pytest.param(
            "0 0 * * 0-4", "America/Chicago", utc(2021, 3, 12, 6, 0, 0, 1000),
            [utc(2021, 3, 14, 6), utc(2021, 3, 15, 5), utc(2021, 3, 16, 5),
             utc(2021, 3, 17, 5), utc(2021, 3, 18, 5)],
            id="chicago-midnight-spring",
        ),
        pytest.param(
            "0 0 * * *", "Europe/Prague", utc(2026, 3, 28, 23, 30),
            [utc(2026, 3, 29, 22), utc(2026, 3, 30, 22), utc(2026, 3, 31, 22)],
            id="prague-midnight-spring",
        ),
        pytest.param(
            "30 2 * * *", "America/New_York", utc(2026, 3, 8, 6, 30),
            [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30), utc(2026, 3, 10, 6, 30),
             utc(2026, 3, 11, 6, 30), utc(2026, 3, 12, 6, 30)],
            id="new-york-skipped-time",
        ),
        pytest.param(
            "0 2 * * *", "Europe/Berlin", utc(2023, 10, 27, 12),
            [utc(2023, 10, 28, 0), utc(2023, 10, 29, 0), utc(2023, 10, 30, 1),
             utc(2023, 10, 31, 1), utc(2023, 11, 1, 1)],
            id="berlin-repeated-time",
        ),
        pytest.param(
            "30 1 * * *", "America/Los_Angeles", utc(2024, 11, 2, 12),
            [utc(2024, 11, 3, 8, 30), utc(2024, 11, 4, 9, 30), utc(2024, 11, 5, 9, 30),
             utc(2024, 11, 6, 9, 30), utc(2024, 11, 7, 9, 30)],
            id="los-angeles-repeated-time",
        ),
        pytest.param(
            "0 * * * *", "America/Los_Angeles", utc(2024, 11, 3, 7, 30),
            [utc(2024, 11, 3, 8), utc(2024, 11, 3, 9), utc(2024, 11, 3, 10),
             utc(2024, 11, 3, 11), utc(2024, 11, 3, 12)],
            id="los-angeles-hourly-fall-back",
        ),
        pytest.param(
            "0 17 * * *", "America/New_York", utc(2015, 10, 31, 12),
            [utc(2015, 10, 31, 21), utc(2015, 11, 1, 22), utc(2015, 11, 2, 22),
             utc(2015, 11, 3, 22), utc(2015, 11, 4, 22)],
            id="new-york-evening-fall-back",
        ),
        pytest.param(
            "0 12 * * 5", "America/Los_Angeles", utc(2019, 6, 7),
            [utc(2019, 6, 7, 19), utc(2019, 6, 14, 19), utc(2019, 6, 21, 19),
             utc(2019, 6, 28, 19), utc(2019, 7, 5, 19)],
            id="los-angeles-friday-noon",
        ),
    ],
)
def test_zoned_cron_next_slots(expression, timezone, start, expected):
    frequency = parse_frequency(expression, timezone)

    assert frequency.next_slots(start, len(expected)) == expected


def test_fixed_time_repeated_fires_once():
    slots = parse_frequency("0 2 * * *", "Europe/Berlin").next_slots(utc(2023, 10, 27, 12), 5)

    assert utc(2023, 10, 29, 1) not in slots


def test_fixed_time_repeated_fires_first():
    slots = parse_frequency("30 1 * * *", "America/Los_Angeles").next_slots(utc(2024, 11, 2, 12), 5)

    assert utc(2024, 11, 3, 9, 30) not in slots


def test_wildcard_fires_each_minute_in_repeat():
    frequency = parse_frequency("* * * * *", "Europe/Berlin")
    start, end = utc(2023, 10, 29, 0), utc(2023, 10, 29, 2)

    slots = []
    slot = frequency.next_after(start - dt.timedelta(microseconds=1))
    while slot < end:
        slots.append(slot)
        slot = frequency.next_after(slot)

    assert len(slots) == 120
    assert slots == [start + dt.timedelta(minutes=minute) for minute in range(120)]


def test_cron_without_zone_is_utc():
    frequency = parse_frequency("0 12 * * 5")

    assert frequency.next_slots(utc(2019, 6, 7), 5) == [
        utc(2019, 6, 7, 12), utc(2019, 6, 14, 12), utc(2019, 6, 21, 12),
        utc(2019, 6, 28, 12), utc(2019, 7, 5, 12),
    ]


def test_interval_ignores_zone_change():
    frequency = parse_frequency("2h", "Europe/Berlin")

    slots = frequency.next_slots(utc(2024, 3, 30, 23), 3)

    assert slots == [utc(2024, 3, 31, 0), utc(2024, 3, 31, 2), utc(2024, 3, 31, 4)]
    for earlier, later in zip(slots, slots[1:]):
        assert (later - earlier).total_seconds() == 7200, (earlier, later)


# ---------------------------------------------------------------------------
# Fire times through a restarted scheduler
# ---------------------------------------------------------------------------


def test_restarted_scheduler_fires_zoned_slots(tmp_path):
    state_dir = str(tmp_path / "state")
    task = Task("evening", "true", "0 17 * * *", timezone="America/New_York")
    first_store = StateStore(state_dir)
    first_store.upsert_task(task, now=utc(2015, 10, 31, 11))
    first_store.close()

    store = StateStore(state_dir)
    clock = FakeClock(utc(2015, 10, 31, 12))
    recorder = StartRecorder(store)
    scheduler = TaskScheduler(store, recorder, clock=clock)
    scheduler.reconcile(store.tasks())
    planned = [scheduler.planned()["evening"]]
    for _ in range(4):
        clock.instant = planned[-1]
        scheduler._fire("evening", planned[-1])
        scheduler._plan_fired()
        planned.append(scheduler.planned()["evening"])
    store.close()

    expected = [utc(2015, 10, 31, 21), utc(2015, 11, 1, 22), utc(2015, 11, 2, 22),
                utc(2015, 11, 3, 22), utc(2015, 11, 4, 22)]
    assert planned == expected
    assert recorder.slots == expected[:4]


# ---------------------------------------------------------------------------
# A host in Europe/London, with UTC tasks
# ---------------------------------------------------------------------------


@pytest.fixture
def london_host(monkeypatch):
    """Set the process's local time zone to Europe/London for one test."""
    monkeypatch.setenv("TZ", "Europe/London")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


LONDON_FALL_BACK_TASKS = [
    ("59 0 * * *", utc(2022, 10, 30, 0, 59)),
    ("0 1 * * *", utc(2022, 10, 30, 1, 0)),
    ("1 1 * * *", utc(2022, 10, 30, 1, 1)),
    ("30 1 * * *", utc(2022, 10, 30, 1, 30)),
    ("59 1 * * *", utc(2022, 10, 30, 1, 59)),
    ("0 2 * * *", utc(2022, 10, 30, 2, 0)),
]


@pytest.mark.parametrize(("expression", "expected"), LONDON_FALL_BACK_TASKS)
def test_utc_cron_on_london_host(london_host, expression, expected):
    local_summer_offset = dt.datetime(2022, 10, 30, 0, 30, tzinfo=UTC).astimezone().utcoffset()
    frequency = parse_frequency(expression, "UTC")

    assert local_summer_offset == dt.timedelta(hours=1)
    assert frequency.next_after(utc(2022, 10, 30)) == expected


def test_london_host_job_delays(london_host, tmp_path):
    now = utc(2022, 10, 30)
    tasks = [Task(f"utc-{index}", "true", expression)
             for index, (expression, _slot) in enumerate(LONDON_FALL_BACK_TASKS)]
    store = StateStore(str(tmp_path / "state"))
    scheduler = TaskScheduler(store, StartRecorder(store), clock=FakeClock(now))

    scheduler.reconcile(tasks)
    planned = scheduler.planned()
    delays = {job.job_func.args[0]: job.interval for job in scheduler.jobs()}
    store.close()

    for index, (_expression, slot) in enumerate(LONDON_FALL_BACK_TASKS):
        assert planned[f"utc-{index}"] == slot
        assert delays[f"utc-{index}"] == (slot - now).total_seconds()


# ---------------------------------------------------------------------------
# Newest slot at or before an instant
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "timezone", "instant", "expected"),
    [
        pytest.param("30 2 * * *", "America/New_York", utc(2026, 3, 8, 7),
                     utc(2026, 3, 8, 7), id="skipped-time-own-slot"),
        pytest.param("30 2 * * *", "America/New_York", utc(2026, 3, 8, 7, 29),
                     utc(2026, 3, 8, 7), id="after-skipped-time"),
        pytest.param("30 2 * * *", "America/New_York", utc(2026, 3, 8, 6, 59),
                     utc(2026, 3, 7, 7, 30), id="before-skipped-time"),
        pytest.param("30 2 * * *", "America/New_York", utc(2026, 3, 9, 6, 29, 59),
                     utc(2026, 3, 8, 7), id="day-after-skipped-time"),
        pytest.param("30 2 * * *", "America/New_York", utc(2026, 3, 9, 6, 30),
                     utc(2026, 3, 9, 6, 30), id="first-daylight-slot"),
        pytest.param("0 2 * * *", "Europe/Berlin", utc(2023, 10, 29, 0, 59, 59),
                     utc(2023, 10, 29, 0), id="fixed-first-occurrence"),
        pytest.param("0 2 * * *", "Europe/Berlin", utc(2023, 10, 29, 1),
                     utc(2023, 10, 29, 0), id="fixed-second-occurrence"),
        pytest.param("0 2 * * *", "Europe/Berlin", utc(2023, 10, 30, 1),
                     utc(2023, 10, 30, 1), id="fixed-day-after-repeat"),
        pytest.param("30 1 * * *", "America/Los_Angeles", utc(2024, 11, 3, 9, 30),
                     utc(2024, 11, 3, 8, 30), id="fixed-second-occurrence-la"),
        pytest.param("* * * * *", "Europe/Berlin", utc(2023, 10, 29, 1, 30, 30),
                     utc(2023, 10, 29, 1, 30), id="wildcard-second-occurrence"),
        pytest.param("0 * * * *", "America/Los_Angeles", utc(2024, 11, 3, 9),
                     utc(2024, 11, 3, 9), id="hourly-second-occurrence"),
        pytest.param("0 * * * *", "America/Los_Angeles", utc(2024, 11, 3, 8, 59, 59),
                     utc(2024, 11, 3, 8), id="hourly-first-occurrence"),
        pytest.param("0 17 * * *", "America/New_York", utc(2015, 11, 1, 21, 59),
                     utc(2015, 10, 31, 21), id="evening-after-fall-back"),
    ],
)
def test_zoned_cron_latest_slot(expression, timezone, instant, expected):
    frequency = parse_frequency(expression, timezone)

    assert frequency.latest_at_or_before(instant) == expected


# ---------------------------------------------------------------------------
# Local wall-clock time to UTC
# ---------------------------------------------------------------------------


BERLIN = agent.zone_for("Europe/Berlin")
NEW_YORK = agent.zone_for("America/New_York")


@pytest.mark.parametrize("fixed_time", [True, False], ids=["fixed", "wildcard"])
def test_local_ordinary_time_fires_once(fixed_time):
    instants = agent.local_to_utc(dt.datetime(2026, 1, 15, 12), BERLIN, fixed_time)

    assert instants == [utc(2026, 1, 15, 11)]


def test_local_repeated_time_fixed_fires_first():
    instants = agent.local_to_utc(dt.datetime(2023, 10, 29, 2, 30), BERLIN, True)

    assert instants == [utc(2023, 10, 29, 0, 30)]


def test_local_repeated_time_wildcard_fires_twice():
    instants = agent.local_to_utc(dt.datetime(2023, 10, 29, 2, 30), BERLIN, False)

    assert instants == [utc(2023, 10, 29, 0, 30), utc(2023, 10, 29, 1, 30)]


def test_local_skipped_time_fixed_fires_at_jump():
    instants = agent.local_to_utc(dt.datetime(2026, 3, 8, 2, 30), NEW_YORK, True)

    assert instants == [utc(2026, 3, 8, 7)]


def test_local_skipped_time_wildcard_never_fires():
    instants = agent.local_to_utc(dt.datetime(2026, 3, 8, 2, 30), NEW_YORK, False)

    assert instants == []


# ---------------------------------------------------------------------------
# Invalid zones
# ---------------------------------------------------------------------------


def test_unknown_zone_raises_frequency_error():
    with pytest.raises(FrequencyError, match="Mars/Olympus_Mons"):
        parse_frequency("0 9 * * *", "Mars/Olympus_Mons")


def test_task_unknown_zone_names_field():
    data = {"task_id": "t1", "command": "true", "frequency": "0 9 * * *",
            "timezone": "Mars/Olympus_Mons"}

    with pytest.raises(TaskError) as raised:
        Task.from_json(data)

    assert raised.value.field == "timezone"
    assert "Mars/Olympus_Mons" in str(raised.value)
