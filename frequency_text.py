"""Describe a task's frequency in English words, for the dashboard.

`describe_frequency("0 9 * * MON-FRI", "Europe/Berlin")` returns
"at 09:00 on weekdays (Europe/Berlin)". The words follow the frequency as `agent.py`
parses it, so they cover every frequency the server stores. Cron fields that the
rules below do not put in words are shown as the field itself, such as
"at minutes 0,7,13,29,31,47,59 past every hour".
"""

from __future__ import annotations

from typing import Optional

from agent import CronFrequency, IntervalFrequency, parse_frequency

WEEKDAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
# Lists of at most this many values are written out; longer ones show the field.
MAX_LISTED_VALUES = 6
# Combinations of hours and minutes written as clock times ("at 09:00 and 17:30").
MAX_CLOCK_TIMES = 4
UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


def describe_frequency(text: str, timezone: str = "UTC") -> str:
    """Return the frequency `text` of a task in time zone `timezone` in words.

    Raises agent.FrequencyError for a frequency that the server would reject.
    """
    frequency = parse_frequency(text, timezone)
    if isinstance(frequency, IntervalFrequency):
        return describe_interval(frequency.seconds)
    assert isinstance(frequency, CronFrequency)
    return describe_cron(frequency.expression, timezone)


def describe_interval(seconds: int) -> str:
    """Return "every N UNITs" in the largest unit that divides `seconds`."""
    for unit_seconds, unit in UNITS:
        if seconds % unit_seconds == 0:
            count = seconds // unit_seconds
            return f"every {unit}" if count == 1 else f"every {count} {unit}s"
    raise AssertionError("every whole number of seconds is divisible by 1")


def join_words(words: list[str]) -> str:
    """Join ["a", "b", "c"] as "a, b and c"."""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def field_values(field: str) -> Optional[list[int]]:
    """Return the values of a normalized cron field that lists numbers, or None for `*` forms.

    `agent.parse_frequency` rewrites ranges and steps on values as explicit lists, so a
    field is `*`, `*/N`, or numbers separated by commas.
    """
    if field.startswith("*"):
        return None
    return sorted({int(value) for value in field.split(",")})


def star_step(field: str) -> Optional[int]:
    """Return N of a `*/N` field, 1 for `*`, or None for any other field."""
    if field == "*":
        return 1
    if field.startswith("*/") and field[2:].isdigit():
        return int(field[2:])
    return None


def describe_time(minute: str, hour: str) -> tuple[str, str]:
    """Return the time-of-day words of a cron expression and their kind.

    The kind is "times" for a list of clock times, "hours" for words that name hours,
    and "minutes" for a pattern that repeats every hour.
    """
    minutes = field_values(minute)
    hours = field_values(hour)
    minute_step = star_step(minute)
    hour_step = star_step(hour)

    if minutes is not None and hours is not None and len(minutes) * len(hours) <= MAX_CLOCK_TIMES:
        times = [f"{h:02d}:{m:02d}" for h in hours for m in minutes]
        return f"at {join_words(times)}", "times"
    if hour_step == 1:
        if minute_step == 1:
            return "every minute", "minutes"
        if minute_step is not None:
            return f"every {minute_step} minutes", "minutes"
        if minutes == [0]:
            return "every hour", "minutes"
        return f"at {past_hour(minutes, minute)} past every hour", "minutes"
    if hours is not None and hours == list(range(hours[0], hours[-1] + 1)):
        first, last = hours[0], hours[-1]
        if minute_step is not None:
            every = "every minute" if minute_step == 1 else f"every {minute_step} minutes"
            return f"{every} from {first:02d}:00 to {last:02d}:59", "hours"
        if minutes is not None and len(minutes) == 1 and len(hours) > 1:
            return f"every hour from {first:02d}:{minutes[0]:02d} to {last:02d}:{minutes[0]:02d}", "hours"
    if minutes is not None and len(minutes) == 1 and hour_step is not None:
        at_minute = "" if minutes[0] == 0 else f" at minute {minutes[0]}"
        return f"every {hour_step} hours{at_minute}", "hours"
    minute_words = ("every minute" if minute_step == 1
                    else f"every {minute_step} minutes" if minute_step is not None
                    else "at " + past_hour(minutes, minute))
    hour_words = f"every {hour_step} hours" if hour_step is not None else hour_list(hours, hour)
    return f"{minute_words} past {hour_words}", "hours"


def past_hour(minutes: Optional[list[int]], field: str) -> str:
    if minutes is not None and len(minutes) == 1:
        return f"minute {minutes[0]}"
    if minutes is not None and len(minutes) <= MAX_LISTED_VALUES:
        return "minutes " + join_words([str(value) for value in minutes])
    return f"minutes {field}"


def hour_list(hours: Optional[list[int]], field: str) -> str:
    if hours is not None and len(hours) <= MAX_LISTED_VALUES:
        return ("hour " if len(hours) == 1 else "hours ") + join_words([f"{h:02d}" for h in hours])
    return f"hours {field}"


def describe_weekdays(days: list[int]) -> str:
    days = sorted({day % 7 for day in days})  # 7 is Sunday, like 0
    if days == [1, 2, 3, 4, 5]:
        return "on weekdays"
    if days == [0, 6]:
        return "on weekends"
    if len(days) >= 3 and days == list(range(days[0], days[-1] + 1)):
        return f"on {WEEKDAYS[days[0]]} to {WEEKDAYS[days[-1]]}"
    return "on " + join_words([WEEKDAYS[day] for day in days])


def describe_days(day_of_month: str, month: str, day_of_week: str) -> str:
    """Return the calendar words of a cron expression, empty for every day of every month.

    When both day fields are restricted, a day matches if either does (Vixie cron), so the
    words join them with "or".
    """
    month_days = field_values(day_of_month)
    months = field_values(month)
    weekdays = field_values(day_of_week)
    month_step = star_step(month)
    parts = []

    if month_days is not None and months is not None and len(month_days) == 1 and len(months) == 1:
        date = f"on {month_days[0]} {MONTHS[months[0] - 1]}"
        return f"{date} or {describe_weekdays(weekdays)} in {MONTHS[months[0] - 1]}" if weekdays else date
    if month_days is not None:
        if len(month_days) <= MAX_LISTED_VALUES:
            label = "day" if len(month_days) == 1 else "days"
            parts.append(f"on {label} {join_words([str(day) for day in month_days])} of the month")
        else:
            parts.append(f"on days {day_of_month} of the month")
    elif star_step(day_of_month) not in (1, None):
        parts.append(f"on days {day_of_month} of the month")
    if weekdays is not None:
        parts.append(describe_weekdays(weekdays))
    elif star_step(day_of_week) not in (1, None):
        parts.append(f"on days of the week {day_of_week}")
    days = " or ".join(parts)

    if months is not None:
        in_months = "in " + join_words([MONTHS[value - 1] for value in months])
        days = f"{days} {in_months}" if days else in_months
    elif month_step not in (1, None):
        in_months = f"every {month_step} months"
        days = f"{days} {in_months}" if days else in_months
    return days


def describe_cron(expression: str, timezone: str) -> str:
    """Return the words of a normalized 5-field cron expression read in `timezone`."""
    minute, hour, day_of_month, month, day_of_week = expression.split()
    time_words, kind = describe_time(minute, hour)
    day_words = describe_days(day_of_month, month, day_of_week)
    if day_words:
        words = f"{time_words} {day_words}"
    elif kind == "times":
        words = f"{time_words} every day"
    else:
        words = time_words
    # Cron fields are read in the task's zone. A pure minute pattern in UTC fires at the
    # same minutes in every zone whose offset is whole hours, so only then the zone is left out.
    if kind != "minutes" or day_words or timezone != "UTC":
        words += f" ({timezone})"
    return words
