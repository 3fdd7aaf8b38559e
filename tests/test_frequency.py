"""Tests of agent.parse_frequency and the interval and cron Frequency classes.

Every instant here is UTC, and "next N after S" means the fire times strictly after S.
"""

from __future__ import annotations

import datetime as dt

import pytest

import agent
from agent import CronFrequency, FrequencyError, IntervalFrequency, parse_frequency

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def utc(*fields: int) -> dt.datetime:
    return dt.datetime(*fields, tzinfo=UTC)


# ---------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("every 30 seconds", 30),
        ("every 5 minutes", 300),
        ("every minute", 60),
        ("every 2 hours", 7200),
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("@every 10s", 10),
        ("@every 1h30m", 5400),
        ("  Every 30 Seconds  ", 30),
        ("2d", 172800),
    ],
)
def test_interval_forms_give_seconds(text, seconds):
    frequency = parse_frequency(text)

    assert isinstance(frequency, IntervalFrequency)
    assert frequency.seconds == seconds


def test_interval_keeps_original_text():
    frequency = parse_frequency("  Every 30 Seconds  ")

    assert frequency.text == "  Every 30 Seconds  "


def test_interval_slots_align_to_epoch():
    frequency = parse_frequency("every 5 minutes")

    slots = frequency.next_slots(utc(2024, 3, 10, 12, 3, 17), 3)

    assert slots == [utc(2024, 3, 10, 12, 5), utc(2024, 3, 10, 12, 10), utc(2024, 3, 10, 12, 15)]


def test_interval_slots_are_epoch_multiples():
    frequency = parse_frequency("every 7 minutes")

    slots = frequency.next_slots(utc(2024, 3, 10, 12, 3, 17), 20)

    for slot in slots:
        assert (slot - EPOCH).total_seconds() % 420 == 0, slot


def test_interval_next_after_is_strict():
    frequency = parse_frequency("every 5 minutes")

    assert frequency.next_after(utc(2024, 1, 1, 0, 5)) == utc(2024, 1, 1, 0, 10)


def test_interval_next_after_just_before_slot():
    frequency = parse_frequency("every 5 minutes")
    just_before = utc(2024, 1, 1, 0, 4, 59) + dt.timedelta(microseconds=999999)

    assert frequency.next_after(just_before) == utc(2024, 1, 1, 0, 5)


def test_interval_latest_includes_exact_slot():
    frequency = parse_frequency("every 5 minutes")

    assert frequency.latest_at_or_before(utc(2024, 1, 1, 0, 5)) == utc(2024, 1, 1, 0, 5)


def test_interval_latest_between_slots():
    frequency = parse_frequency("every 5 minutes")

    assert frequency.latest_at_or_before(utc(2024, 1, 1, 0, 9, 59)) == utc(2024, 1, 1, 0, 5)


def test_interval_accepts_other_offsets():
    frequency = parse_frequency("every 2 hours")
    plus_two = dt.timezone(dt.timedelta(hours=2))

    slot = frequency.next_after(dt.datetime(2024, 1, 1, 3, 30, tzinfo=plus_two))

    assert slot == utc(2024, 1, 1, 2)
    assert slot.utcoffset() == dt.timedelta(0)


# ---------------------------------------------------------------------------
# Rejected forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("sometimes", agent.ACCEPTED_FORMS),
        ("every 0 seconds", "shorter than 1 second"),
        ("0s", "shorter than 1 second"),
        ("every 5 fortnights", "'every 5 fortnights'"),
        ("every -1 seconds", "'every -1 seconds'"),
        ("@reboot", "'@reboot'"),
        ("@every", "'@every'"),
        ("* * * * * *", "6 fields"),
        ("* * * *", "4 fields"),
        ("L * * * *", "minute"),
        ("0 0 L * *", "day of month"),
        ("0 0 1W * *", "day of month"),
        ("0 0 * * 1#2", "day of week"),
        ("61 * * * *", "minute value 61"),
        ("0 24 * * *", "hour value 24"),
        ("0 0 0 * *", "day of month value 0"),
        ("0 0 * 13 *", "month value 13"),
        ("0 0 * * 8", "day of week value 8"),
        ("5-1 * * * *", "backwards"),
        ("*/0 * * * *", "step"),
        ("*/90 * * * *", "step 90"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 31 4,6,9,11 *", "never fires"),
        pytest.param("\u00b2 * * * *", "\u00b2", id="superscript-digit-value"),
        pytest.param("*/\u00b2 * * * *", "\u00b2", id="superscript-digit-step"),
    ],
)
def test_invalid_frequency_rejected(text, fragment):
    with pytest.raises(FrequencyError) as raised:
        parse_frequency(text)

    assert fragment in str(raised.value)


@pytest.mark.parametrize("value", [None, 5, b"5m", ["5m"]])
def test_non_string_frequency_rejected(value):
    with pytest.raises(FrequencyError) as raised:
        parse_frequency(value)

    assert agent.ACCEPTED_FORMS in str(raised.value)


# ---------------------------------------------------------------------------
# Cron expressions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "start", "expected"),
    [
        pytest.param(
            "0 9 1-7,15-21 * 1", utc(2021, 12, 12, 12),
            [utc(2021, 12, 13, 9), utc(2021, 12, 15, 9), utc(2021, 12, 16, 9),
             utc(2021, 12, 17, 9), utc(2021, 12, 18, 9)],
            id="day-of-month-or-day-of-week",
        ),
        pytest.param(
            "0 2 29 2 0", utc(2019, 1, 1),
            [utc(2019, 2, 3, 2), utc(2019, 2, 10, 2), utc(2019, 2, 17, 2),
             utc(2019, 2, 24, 2), utc(2020, 2, 2, 2)],
            id="leap-day-or-sunday",
        ),
        pytest.param(
            "0 0 1-7 * */7", utc(2024, 1, 1, 0, 0, 1),
            [utc(2024, 1, 7), utc(2024, 2, 4), utc(2024, 3, 3), utc(2024, 4, 7), utc(2024, 5, 5)],
            id="star-day-of-week-and",
        ),
        pytest.param(
            "0 9 1-31 * 1", utc(2026, 5, 1),
            [utc(2026, 5, 1, 9), utc(2026, 5, 2, 9), utc(2026, 5, 3, 9),
             utc(2026, 5, 4, 9), utc(2026, 5, 5, 9)],
            id="full-day-of-month-range-or-monday",
        ),
        pytest.param(
            "*/7 * * * *", utc(2024, 1, 1, 0, 50),
            [utc(2024, 1, 1, 0, 56), utc(2024, 1, 1, 1, 0), utc(2024, 1, 1, 1, 7),
             utc(2024, 1, 1, 1, 14), utc(2024, 1, 1, 1, 21)],
            id="minute-step-restarts-each-hour",
        ),
        pytest.param(
            "*/59 * * * *", utc(2023, 3, 11, 13, 0, 30),
            [utc(2023, 3, 11, 13, 59), utc(2023, 3, 11, 14, 0), utc(2023, 3, 11, 14, 59),
             utc(2023, 3, 11, 15, 0), utc(2023, 3, 11, 15, 59)],
            id="minute-step-59",
        ),
        pytest.param(
            "0 6 */2 * *", utc(2024, 1, 30, 7),
            [utc(2024, 1, 31, 6), utc(2024, 2, 1, 6), utc(2024, 2, 3, 6),
             utc(2024, 2, 5, 6), utc(2024, 2, 7, 6)],
            id="day-step-restarts-each-month",
        ),
        pytest.param(
            "5/15 * * * *", utc(2024, 1, 1),
            [utc(2024, 1, 1, 0, 5), utc(2024, 1, 1, 0, 20), utc(2024, 1, 1, 0, 35),
             utc(2024, 1, 1, 0, 50), utc(2024, 1, 1, 1, 5)],
            id="start-with-step",
        ),
        pytest.param(
            "59/15 * * * *", utc(2024, 1, 1),
            [utc(2024, 1, 1, 0, 59), utc(2024, 1, 1, 1, 59), utc(2024, 1, 1, 2, 59)],
            id="minute-maximum-with-step",
        ),
        pytest.param(
            "0 23/5 * * *", utc(2024, 1, 1),
            [utc(2024, 1, 1, 23), utc(2024, 1, 2, 23), utc(2024, 1, 3, 23)],
            id="hour-maximum-with-step",
        ),
        pytest.param(
            "0 0 31/5 * *", utc(2024, 1, 1),
            [utc(2024, 1, 31), utc(2024, 3, 31), utc(2024, 5, 31)],
            id="day-maximum-with-step",
        ),
        pytest.param(
            "0 0 1 12/5 *", utc(2024, 1, 1),
            [utc(2024, 12, 1), utc(2025, 12, 1), utc(2026, 12, 1)],
            id="month-maximum-with-step",
        ),
        pytest.param(
            "0 0 * * 7/3", utc(2024, 1, 1),
            [utc(2024, 1, 7), utc(2024, 1, 14), utc(2024, 1, 21)],
            id="weekday-maximum-with-step",
        ),
        pytest.param(
            "0 9 29 2 *", utc(2016, 2, 29, 9),
            [utc(2020, 2, 29, 9), utc(2024, 2, 29, 9), utc(2028, 2, 29, 9),
             utc(2032, 2, 29, 9), utc(2036, 2, 29, 9)],
            id="leap-day",
        ),
        pytest.param(
            "0 9 29 2 *", utc(2096, 3, 1),
            [utc(2104, 2, 29, 9)],
            id="leap-day-across-2100",
        ),
        pytest.param(
            "0 0 31 * *", utc(2024, 1, 1),
            [utc(2024, 1, 31), utc(2024, 3, 31), utc(2024, 5, 31), utc(2024, 7, 31),
             utc(2024, 8, 31)],
            id="thirty-first",
        ),
        pytest.param(
            "0 0 * * SUN", utc(2024, 1, 1),
            [utc(2024, 1, 7), utc(2024, 1, 14), utc(2024, 1, 21)],
            id="weekday-name",
        ),
        pytest.param(
            "0 9 * * MON-FRI", utc(2024, 1, 5, 9),
            [utc(2024, 1, 8, 9), utc(2024, 1, 9, 9), utc(2024, 1, 10, 9),
             utc(2024, 1, 11, 9), utc(2024, 1, 12, 9)],
            id="weekday-name-range",
        ),
        pytest.param(
            "0 0 1 JAN *", utc(2024, 1, 1),
            [utc(2025, 1, 1), utc(2026, 1, 1)],
            id="month-name",
        ),
    ],
)
def test_cron_next_slots(expression, start, expected):
    frequency = parse_frequency(expression)

    assert frequency.next_slots(start, len(expected)) == expected


def test_cron_day_or_fires_on_leap_day():
    frequency = parse_frequency("0 2 29 2 0")

    assert frequency.next_after(utc(2020, 2, 23, 2)) == utc(2020, 2, 29, 2)


def test_cron_start_with_step_minutes():
    frequency = parse_frequency("5/15 * * * *")

    minutes = {slot.minute for slot in frequency.next_slots(utc(2024, 1, 1), 12)}

    assert minutes == {5, 20, 35, 50}


def test_cron_sunday_as_seven_and_zero():
    seven = parse_frequency("0 0 * * 7").next_slots(utc(2024, 1, 1), 4)
    zero = parse_frequency("0 0 * * 0").next_slots(utc(2024, 1, 1), 4)

    assert seven == zero
    assert seven == [utc(2024, 1, 7), utc(2024, 1, 14), utc(2024, 1, 21), utc(2024, 1, 28)]


@pytest.mark.parametrize(
    ("macro", "expected"),
    [
        ("@hourly", [utc(2024, 1, 1, 1), utc(2024, 1, 1, 2)]),
        ("@daily", [utc(2024, 1, 2), utc(2024, 1, 3)]),
        ("@midnight", [utc(2024, 1, 2), utc(2024, 1, 3)]),
        ("@weekly", [utc(2024, 1, 7), utc(2024, 1, 14)]),
        ("@monthly", [utc(2024, 2, 1), utc(2024, 3, 1)]),
        ("@yearly", [utc(2025, 1, 1), utc(2026, 1, 1)]),
        ("@annually", [utc(2025, 1, 1), utc(2026, 1, 1)]),
    ],
)
def test_cron_macro_slots(macro, expected):
    frequency = parse_frequency(macro)

    assert isinstance(frequency, CronFrequency)
    assert frequency.next_slots(utc(2024, 1, 1, 0, 0, 1), 2) == expected


def test_cron_next_after_is_strict():
    frequency = parse_frequency("0 9 * * *")

    assert frequency.next_after(utc(2024, 1, 1, 9)) == utc(2024, 1, 2, 9)


def test_cron_next_after_within_tick_minute():
    frequency = parse_frequency("0 9 * * *")
    inside_tick = utc(2024, 1, 1, 9) + dt.timedelta(microseconds=500000)

    assert frequency.next_after(inside_tick) == utc(2024, 1, 2, 9)


def test_cron_reads_fields_in_utc():
    frequency = parse_frequency("0 9 * * *")
    plus_two = dt.timezone(dt.timedelta(hours=2))

    slot = frequency.next_after(dt.datetime(2024, 1, 1, 10, 0, tzinfo=plus_two))

    assert slot == utc(2024, 1, 1, 9)
    assert slot.utcoffset() == dt.timedelta(0)


def test_cron_latest_includes_exact_tick():
    frequency = parse_frequency("*/15 * * * *")

    assert frequency.latest_at_or_before(utc(2024, 1, 1, 10, 30)) == utc(2024, 1, 1, 10, 30)


def test_cron_latest_between_ticks():
    frequency = parse_frequency("*/15 * * * *")
    just_before = utc(2024, 1, 1, 10, 44, 59) + dt.timedelta(microseconds=900000)

    assert frequency.latest_at_or_before(just_before) == utc(2024, 1, 1, 10, 30)


def test_cron_latest_skips_weekend():
    frequency = parse_frequency("0 9 * * MON-FRI")

    latest = frequency.latest_at_or_before(utc(2024, 1, 8, 8))

    assert latest == utc(2024, 1, 5, 9)


def test_cron_rare_leap_sunday_found():
    # Both day fields must match because day-of-week starts with '*', so this fires
    # only on a 29 February that is a Sunday: 2004, 2032, 2060, 2088 and then 2128.
    frequency = parse_frequency("0 0 29 2 */7")

    assert frequency.next_after(utc(2005, 1, 1)) == utc(2032, 2, 29)
