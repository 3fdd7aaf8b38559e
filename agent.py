"""taskscheduler agent: runs the server's periodic shell commands on this host.

The agent is one file on purpose, so that it can be copied to a host alone. It needs
only requests, schedule and croniter, and never imports the server's modules. Its parts,
in reading order:

- frequency parsing (also used by the server to validate tasks),
- the state store (agent id, task list, run records, the report outbox),
- the task scheduler (turns task slots into one-shot `schedule` jobs),
- the runner (runs one command through the host's shell),
- the server client, the report sender and the sync loop,
- the push listener (an optional HTTP endpoint where the server wakes the agent up to sync),
- the command line.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import platform
import queue
import random
import re
import secrets
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zoneinfo
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Optional

import requests
import schedule
import urllib3
from croniter import croniter

__version__ = "0.1.0"

log = logging.getLogger("taskscheduler.agent")

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ON_WINDOWS = os.name == "nt"


# ---------------------------------------------------------------------------
# Time helpers
# ---------------------------------------------------------------------------


class Clock:
    """The clocks the agent reads, through one object so that tests can replace it."""

    def now(self) -> dt.datetime:
        """Return the wall-clock time as an aware UTC datetime."""
        return dt.datetime.now(UTC)

    def monotonic(self) -> float:
        """Return seconds of a clock that never steps, for measuring elapsed time."""
        return time.monotonic()

    def local_offset(self) -> Optional[dt.timedelta]:
        """Return the host's current UTC offset, which `schedule`'s naive times follow."""
        return dt.datetime.now().astimezone().utcoffset()


def format_time(instant: Optional[dt.datetime]) -> Optional[str]:
    """Format an aware datetime as RFC 3339 in UTC, with a trailing Z."""
    if instant is None:
        return None
    instant = instant.astimezone(UTC)
    timespec = "seconds" if instant.microsecond == 0 else "microseconds"
    return instant.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


RFC3339_PATTERN = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_time(text: object) -> dt.datetime:
    """Parse an RFC 3339 timestamp with an offset (or Z) into an aware UTC datetime.

    Raises ValueError for anything else, including a timestamp without an offset.
    Fractions beyond microseconds are cut off.
    """
    example = "2026-01-01T12:00:00Z"
    if not isinstance(text, str):
        raise ValueError(f"expected an RFC 3339 string such as {example}")
    match = RFC3339_PATTERN.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp with an offset, such as {example}")
    year, month, day, hour, minute, second = (int(group) for group in match.groups()[:6])
    fraction, zulu, sign, offset_hours, offset_minutes = match.groups()[6:]
    microsecond = int((fraction or "0")[:6].ljust(6, "0"))
    if zulu:
        offset = dt.timedelta(0)
    else:
        offset = dt.timedelta(hours=int(offset_hours), minutes=int(offset_minutes))
        offset = -offset if sign == "-" else offset
    try:
        zone = dt.timezone(offset)
        instant = dt.datetime(year, month, day, hour, minute, second, microsecond, tzinfo=zone)
        return instant.astimezone(UTC)
    except (ValueError, OverflowError) as error:
        raise ValueError(f"{text!r} is not a valid timestamp: {error}") from None


# ---------------------------------------------------------------------------
# Frequencies
# ---------------------------------------------------------------------------


class FrequencyError(ValueError):
    """A frequency string that is not one of the accepted forms."""


ACCEPTED_FORMS = (
    "a 5-field cron expression such as '*/5 * * * *' or '0 9 * * MON-FRI', "
    "a macro (@hourly, @daily, @weekly, @monthly, @yearly), "
    "or an interval such as 'every 30 seconds', 'every 5 minutes', '30s', '1h30m' or '@every 10s'"
)

CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# (name, lowest value, highest value, names allowed) for the five cron fields.
CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun",
                      "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)

UNIT_SECONDS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
ASCII_DIGITS = re.compile(r"[0-9]+")
COMPACT_INTERVAL = re.compile(r"(?:[0-9]+(?:s|m|h|d))+")
COMPACT_PART = re.compile(r"([0-9]+)(s|m|h|d)")
WORDY_INTERVAL = re.compile(r"every (?:([0-9]+) )?([a-z]+)")
MAX_INTERVAL_SECONDS = 366 * 86400
# How far ahead to search for a cron expression's next fire time. The rarest schedules
# are leap days on one weekday (`0 0 29 2 0`): 28 years apart, 40 across 2100.
CRON_SEARCH_YEARS = 50


class Frequency:
    """How often a task fires. Slots are the instants a task is due, in UTC."""

    text: str

    def next_after(self, instant: dt.datetime) -> dt.datetime:
        """Return the first slot strictly after `instant`."""
        raise NotImplementedError

    def latest_at_or_before(self, instant: dt.datetime) -> dt.datetime:
        """Return the newest slot at or before `instant`."""
        raise NotImplementedError

    def next_slots(self, instant: dt.datetime, count: int) -> list[dt.datetime]:
        slots = []
        for _ in range(count):
            instant = self.next_after(instant)
            slots.append(instant)
        return slots


@dataclasses.dataclass(frozen=True)
class IntervalFrequency(Frequency):
    """Fires every `seconds`, on multiples of the interval counted from the Unix epoch."""

    text: str
    seconds: int

    def next_after(self, instant: dt.datetime) -> dt.datetime:
        elapsed = (instant - EPOCH) // dt.timedelta(seconds=self.seconds)
        return EPOCH + dt.timedelta(seconds=(elapsed + 1) * self.seconds)

    def latest_at_or_before(self, instant: dt.datetime) -> dt.datetime:
        elapsed = (instant - EPOCH) // dt.timedelta(seconds=self.seconds)
        return EPOCH + dt.timedelta(seconds=elapsed * self.seconds)


# The largest change of a zone's UTC offset at one transition, with room to spare: real
# ones are 30 minutes to 2 hours.
MAX_OFFSET_CHANGE = dt.timedelta(hours=3)


@functools.lru_cache(maxsize=512)
def zone_for(name: str) -> dt.tzinfo:
    """Return the tzinfo of an IANA zone name, or raise FrequencyError."""
    if name == "UTC":
        return UTC
    # Only names of the IANA list: files such as `localtime` or `posixrules` in the zone
    # folder mean a different zone on each host.
    if name not in _available_zones():
        raise FrequencyError(
            f"unknown time zone {name!r}: use an IANA name such as UTC, Europe/Berlin "
            "or America/New_York"
        )
    return zoneinfo.ZoneInfo(name)


@functools.lru_cache(maxsize=1)
def _available_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - {"localtime", "Factory"}


def _near_transition(instant: dt.datetime, zone: dt.tzinfo) -> bool:
    return ((instant - MAX_OFFSET_CHANGE).astimezone(zone).utcoffset()
            != (instant + MAX_OFFSET_CHANGE).astimezone(zone).utcoffset())


def _first_instant_with_new_offset(zone: dt.tzinfo, low: dt.datetime, high: dt.datetime) -> dt.datetime:
    """Return the first whole second in (low, high] whose UTC offset differs from low's."""
    before = low.astimezone(zone).utcoffset()
    while high - low > dt.timedelta(seconds=1):
        middle = (low + (high - low) / 2).replace(microsecond=0)
        if middle <= low:
            break
        if middle.astimezone(zone).utcoffset() == before:
            low = middle
        else:
            high = middle
    return high


def local_to_utc(wall_time: dt.datetime, zone: dt.tzinfo, fixed_time: bool) -> list[dt.datetime]:
    """Map a cron tick's wall-clock time in `zone` to the UTC instants it fires at.

    These are cronie's daylight-saving rules:

    1. An ordinary time fires once.
    2. A repeated time (fall back) fires at its first occurrence for a fixed-time job, and
       at both occurrences for a wildcard job, which follows real time.
    3. A skipped time (spring forward) fires right after the jump for a fixed-time job,
       and not at all for a wildcard job.
    """
    first = wall_time.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall_time.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    exists = first.astimezone(zone).replace(tzinfo=None) == wall_time
    if exists:
        return [first] if fixed_time else sorted([first, second])
    if not fixed_time:
        return []
    # In a gap, fold=1 applies the offset after the jump and lands before it, while
    # fold=0 applies the offset before and lands after it: the jump lies between.
    low, high = sorted([first, second])
    return [_first_instant_with_new_offset(zone, low, high)]


@dataclasses.dataclass(frozen=True)
class CronFrequency(Frequency):
    """Fires on the ticks of a 5-field cron expression, read in the task's time zone.

    Day-of-month and day-of-week follow Vixie cron: when both are restricted (neither
    starts with `*`) a day matches if either field matches, otherwise both must match.
    Daylight saving follows cronie (see `local_to_utc`): a job is fixed-time when
    neither its minute nor its hour field starts with `*`, and a wildcard job otherwise.
    """

    text: str
    expression: str
    timezone: str = "UTC"

    @property
    def fixed_time(self) -> bool:
        minute, hour = self.expression.split()[:2]
        return not (minute.startswith("*") or hour.startswith("*"))

    def _ticks(self, start: dt.datetime, is_prev: bool = False) -> croniter:
        """Iterate over wall-clock ticks (naive datetimes) from `start`."""
        fields = self.expression.split()
        day_or = not (fields[2].startswith("*") or fields[4].startswith("*"))
        return croniter(
            self.expression,
            start,
            ret_type=dt.datetime,
            day_or=day_or,
            is_prev=is_prev,
            max_years_between_matches=CRON_SEARCH_YEARS,
        )

    def next_after(self, instant: dt.datetime) -> dt.datetime:
        instant = instant.astimezone(UTC)
        zone = zone_for(self.timezone)
        local = instant.astimezone(zone).replace(tzinfo=None)
        if zone is UTC:
            return self._ticks(local).get_next(dt.datetime).replace(tzinfo=UTC)

        # Fast path: with no transition near either end, ticks map to UTC in order.
        if not _near_transition(instant, zone):
            tick = self._ticks(local).get_next(dt.datetime)
            candidates = local_to_utc(tick, zone, self.fixed_time)
            if candidates and not _near_transition(candidates[0], zone):
                return candidates[0]

        # Near a transition a tick before the local time can map to an instant after it,
        # and ticks stop being in UTC order. So walk from a little earlier, and keep the
        # earliest instant after `instant` until the ticks are past any transition.
        ticks = self._ticks(local - MAX_OFFSET_CHANGE)
        best: Optional[dt.datetime] = None
        best_tick: Optional[dt.datetime] = None
        while True:
            tick = ticks.get_next(dt.datetime)
            if best_tick is not None and tick > best_tick + MAX_OFFSET_CHANGE:
                return best
            for candidate in local_to_utc(tick, zone, self.fixed_time):
                if candidate > instant and (best is None or candidate < best):
                    best, best_tick = candidate, tick
            if best is not None and not _near_transition(best, zone):
                return best

    def latest_at_or_before(self, instant: dt.datetime) -> dt.datetime:
        instant = instant.astimezone(UTC)
        zone = zone_for(self.timezone)
        # croniter's get_prev is strictly before its start, so start one second later;
        # cron ticks are whole minutes, so no tick lies between.
        local = instant.astimezone(zone).replace(tzinfo=None, microsecond=0) + dt.timedelta(seconds=1)
        if zone is UTC:
            return self._ticks(local, is_prev=True).get_prev(dt.datetime).replace(tzinfo=UTC)

        ticks = self._ticks(local + MAX_OFFSET_CHANGE, is_prev=True)
        best: Optional[dt.datetime] = None
        best_tick: Optional[dt.datetime] = None
        while True:
            tick = ticks.get_prev(dt.datetime)
            if best_tick is not None and tick < best_tick - MAX_OFFSET_CHANGE:
                return best
            for candidate in local_to_utc(tick, zone, self.fixed_time):
                if candidate <= instant and (best is None or candidate > best):
                    best, best_tick = candidate, tick
            if best is not None and not _near_transition(best, zone):
                return best


def parse_frequency(text: object, timezone: str = "UTC") -> Frequency:
    """Parse a frequency string into a Frequency, or raise FrequencyError.

    Accepted: 5-field cron expressions with Vixie semantics and month and weekday names,
    the macros @hourly, @daily (@midnight), @weekly, @monthly and @yearly (@annually),
    and intervals ('every 30 seconds', 'every minute', '30s', '1h30m', '@every 10s').
    Cron expressions and macros are read in `timezone` (an IANA name); intervals count
    real seconds and ignore it.
    """
    zone_for(timezone)
    if not isinstance(text, str):
        raise FrequencyError(f"frequency must be a string: {ACCEPTED_FORMS}")
    normalized = " ".join(text.strip().lower().split())
    if not normalized:
        raise FrequencyError(f"frequency is empty: use {ACCEPTED_FORMS}")

    if normalized.startswith("@every "):
        seconds = _parse_compact_interval(normalized[len("@every "):].replace(" ", ""), text)
        return IntervalFrequency(text=text, seconds=seconds)
    if normalized.startswith("every"):
        return IntervalFrequency(text=text, seconds=_parse_wordy_interval(normalized, text))
    if COMPACT_INTERVAL.fullmatch(normalized):
        return IntervalFrequency(text=text, seconds=_parse_compact_interval(normalized, text))
    if normalized.startswith("@"):
        if normalized not in CRON_MACROS:
            raise FrequencyError(
                f"unknown macro {text.strip()!r}: use {ACCEPTED_FORMS}"
            )
        return CronFrequency(text=text, expression=CRON_MACROS[normalized], timezone=timezone)
    return CronFrequency(text=text, expression=_validate_cron(normalized, text), timezone=timezone)


def _check_interval(seconds: int, text: str) -> int:
    if seconds < 1:
        raise FrequencyError(f"interval {text!r} is shorter than 1 second")
    if seconds > MAX_INTERVAL_SECONDS:
        raise FrequencyError(
            f"interval {text!r} is longer than 366 days; use a cron expression instead"
        )
    return seconds


def _parse_compact_interval(compact: str, text: str) -> int:
    if not COMPACT_INTERVAL.fullmatch(compact):
        raise FrequencyError(
            f"invalid interval {text!r}: write it as 30s, 5m, 1h30m or 2d"
        )
    seconds = sum(int(number) * UNIT_SECONDS[unit] for number, unit in COMPACT_PART.findall(compact))
    return _check_interval(seconds, text)


def _parse_wordy_interval(normalized: str, text: str) -> int:
    match = WORDY_INTERVAL.fullmatch(normalized)
    if not match or match.group(2) not in UNIT_SECONDS:
        raise FrequencyError(
            f"invalid interval {text!r}: write it as 'every N seconds|minutes|hours|days' "
            "or 'every minute'"
        )
    count = int(match.group(1)) if match.group(1) is not None else 1
    return _check_interval(count * UNIT_SECONDS[match.group(2)], text)


def _validate_cron(normalized: str, text: str) -> str:
    """Check a cron expression field by field and return it in the form croniter reads.

    A step on a single start value (`5/15`) means start-to-maximum (`5-59/15`), as in
    cronie; croniter 7 alone would read `59/15` as minute 59 only.
    """
    fields = normalized.split(" ")
    if len(fields) == 1:
        hint = ("intervals are whole numbers with a unit (30s, 5m, 1h30m); "
                if any(character.isdigit() for character in normalized) else "")
        raise FrequencyError(f"invalid frequency {text.strip()!r}: {hint}use {ACCEPTED_FORMS}")
    if len(fields) != 5:
        raise FrequencyError(
            f"cron expression {text.strip()!r} has {len(fields)} fields, expected 5 "
            f"(minute hour day-of-month month day-of-week; seconds are not supported): "
            f"{ACCEPTED_FORMS}"
        )
    rewritten = [
        _validate_cron_field(field, spec, text) for field, spec in zip(fields, CRON_FIELDS)
    ]
    expression = " ".join(rewritten)

    frequency = CronFrequency(text=text, expression=expression)
    try:
        frequency.next_after(dt.datetime(2000, 1, 1, tzinfo=UTC))
    except Exception:  # croniter raises several types for impossible dates
        raise FrequencyError(
            f"cron expression {text.strip()!r} never fires: no date matches it within "
            f"{CRON_SEARCH_YEARS} years"
        ) from None
    return expression


def _cron_value(token: str, spec: tuple, text: str) -> int:
    name, lowest, highest, names = spec
    if ASCII_DIGITS.fullmatch(token):
        value = int(token)
    elif token in names:
        value = names.index(token) + (1 if name == "month" else 0)
    else:
        raise FrequencyError(
            f"invalid {name} value {token.upper()!r} in cron expression {text.strip()!r}: "
            f"use numbers {lowest}-{highest}"
            + (f" or names such as {names[0].upper()}" if names else "")
        )
    if not lowest <= value <= highest:
        raise FrequencyError(
            f"{name} value {value} in cron expression {text.strip()!r} is out of range "
            f"{lowest}-{highest}"
        )
    return value


def _validate_cron_field(field: str, spec: tuple, text: str) -> str:
    name, lowest, highest, _names = spec
    parts = []
    for part in field.split(","):
        base, slash, step_text = part.partition("/")
        if slash:
            if not ASCII_DIGITS.fullmatch(step_text) or int(step_text) == 0:
                raise FrequencyError(
                    f"invalid step {step_text!r} in {name} field {field!r} of "
                    f"{text.strip()!r}: a step is a whole number of 1 or more"
                )
            step = int(step_text)
            if step > highest - lowest + 1:
                raise FrequencyError(
                    f"step {step} in {name} field {field!r} of {text.strip()!r} is larger "
                    f"than the field's range {lowest}-{highest}"
                )
        if base == "*":
            parts.append(part)
            continue
        start_text, dash, end_text = base.partition("-")
        start = _cron_value(start_text, spec, text)
        end = start
        if dash:
            end = _cron_value(end_text, spec, text)
            if end < start:
                raise FrequencyError(
                    f"range {base!r} in {name} field of {text.strip()!r} runs backwards"
                )
        elif slash:
            # `5/15` means 5-59/15, as in cronie.
            end = highest
        if slash or dash:
            # croniter 7 misreads some stepped ranges (`59-59/15` gives 0,15,30,45), so
            # ranges are handed to it as explicit lists.
            parts.append(",".join(str(value) for value in range(start, end + 1, int(step_text or 1))))
        else:
            parts.append(str(start))
    return ",".join(parts)


# ---------------------------------------------------------------------------
# Tasks and the state store
# ---------------------------------------------------------------------------


class TaskError(ValueError):
    """A task definition with an invalid field; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


OVERLAP_POLICIES = ("skip", "allow", "replace")
MAX_CATCHUP_SECONDS = 366 * 86400
MAX_JITTER_SECONDS = 3600
MAX_TIMEOUT_SECONDS = 86400
# A slot may start this late and still run; later it counts as missed, unless the
# task's catch-up window is longer.
MISFIRE_GRACE_SECONDS = 5.0


def _number_option(data: dict, field: str, default, maximum: float, minimum: float = 0.0,
                   allow_none: bool = False):
    value = data.get(field, default)
    if value is None and (allow_none or default is None):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TaskError(field, f"{field} must be a number of seconds")
    if not minimum <= value <= maximum:
        shown = _format_number(value) if abs(value) < 1e15 else "a larger number"
        raise TaskError(field, f"{field} must be between {_format_number(minimum)} and "
                               f"{_format_number(maximum)} seconds, not {shown}")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _format_number(value: float) -> str:
    """Format a number of seconds in full: 31622400, not 3.16224e+07."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclasses.dataclass(frozen=True)
class Task:
    """A task as the agent runs it. Two tasks are the same schedule when they are equal.

    Options beyond command and frequency:

    - timezone: IANA zone that cron expressions are read in (intervals ignore it);
    - catchup: seconds after a missed slot within which the agent still runs it once
      when it comes back (0: missed slots are only reported);
    - overlap: what happens at a slot while the previous run still goes: `skip` it
      (reported as skipped), `allow` a second run, or `replace` (stop the old run);
    - jitter: the start is delayed by a fixed per-agent amount below this many
      seconds, while the run still belongs to its slot;
    - timeout: seconds a run may last; None means until the next slot, at most 1 hour;
    - environment: variables added to (or replacing those of) the agent's environment
      for the command, as sorted (name, value) pairs.
    """

    task_id: str
    command: str
    frequency: str
    timezone: str = "UTC"
    catchup: float = 0
    overlap: str = "skip"
    jitter: float = 0
    timeout: Optional[float] = None
    environment: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, data: object) -> "Task":
        """Build a Task from a JSON object, or raise TaskError naming the bad field."""
        if not isinstance(data, dict):
            raise TaskError("task", "a task must be a JSON object with task_id, command and frequency")
        for field in ("task_id", "command", "frequency"):
            value = data.get(field)
            if not isinstance(value, str) or not value.strip():
                raise TaskError(field, f"{field} is missing or not a non-empty string")
            if "\x00" in value or not _encodable(value):
                raise TaskError(field, f"{field} contains a NUL character or a lone surrogate")
        if not TASK_ID_PATTERN.fullmatch(data["task_id"]):
            raise TaskError("task_id", "task_id must be 1-64 letters, digits, '.', '_' or '-', "
                                       "such as the UUID the server gives")
        options = validate_task_options(data)
        task = cls(task_id=data["task_id"], command=data["command"], frequency=data["frequency"],
                   **options)
        try:
            task.parsed_frequency()
        except FrequencyError as error:
            raise TaskError("frequency", str(error)) from None
        return task

    def to_json(self) -> dict:
        body = dataclasses.asdict(self)
        body["environment"] = dict(self.environment)
        return body

    def parsed_frequency(self) -> Frequency:
        return _parse_frequency_cached(self.frequency, self.timezone)


@functools.lru_cache(maxsize=4096)
def _parse_frequency_cached(text: str, timezone: str) -> Frequency:
    return parse_frequency(text, timezone)


def validate_task_options(data: dict) -> dict:
    """Return the task options found in `data` with defaults, or raise TaskError."""
    timezone = data.get("timezone")
    if timezone is None:
        timezone = "UTC"
    if not isinstance(timezone, str) or not timezone.strip():
        raise TaskError("timezone", "timezone must be an IANA zone name such as Europe/Berlin")
    try:
        zone_for(timezone)
    except FrequencyError as error:
        raise TaskError("timezone", str(error)) from None

    overlap = data.get("overlap")
    if overlap is None:
        overlap = "skip"
    if overlap not in OVERLAP_POLICIES:
        raise TaskError("overlap", f"overlap must be one of {', '.join(OVERLAP_POLICIES)}")

    return {
        "timezone": timezone,
        "catchup": _number_option(data, "catchup", 0, MAX_CATCHUP_SECONDS, allow_none=True) or 0,
        "overlap": overlap,
        "jitter": _number_option(data, "jitter", 0, MAX_JITTER_SECONDS, allow_none=True) or 0,
        "timeout": _number_option(data, "timeout", None, MAX_TIMEOUT_SECONDS, minimum=1.0),
        "environment": _environment_option(data.get("environment")),
    }


def check_jitter(frequency: Frequency, jitter: float, now: Optional[dt.datetime] = None) -> None:
    """Raise TaskError unless `jitter` is shorter than the gap between the task's slots.

    A longer jitter would start a run after the next slot. For cron expressions the gap
    is the shortest among the next 50 slots.
    """
    if not jitter:
        return
    if isinstance(frequency, IntervalFrequency):
        shortest = float(frequency.seconds)
    else:
        slots = frequency.next_slots(now or dt.datetime.now(UTC), 50)
        shortest = min((later - earlier).total_seconds() for earlier, later in zip(slots, slots[1:]))
    if jitter >= shortest:
        raise TaskError("jitter", f"jitter must be shorter than the time between the task's slots "
                                  f"({_format_number(shortest)} s), not {_format_number(jitter)}")


ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ENVIRONMENT_ENTRIES = 64
MAX_ENVIRONMENT_VALUE_LENGTH = 4096


def _environment_option(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise TaskError("environment", "environment must be an object of variable names to "
                                       'string values, such as {"LANG": "C.UTF-8"}')
    if len(value) > MAX_ENVIRONMENT_ENTRIES:
        raise TaskError("environment", f"environment has more than {MAX_ENVIRONMENT_ENTRIES} variables")
    for name, text in value.items():
        if not ENVIRONMENT_NAME.fullmatch(name):
            raise TaskError("environment", f"environment variable name {name!r} is invalid: use "
                                           "letters, digits and _, not starting with a digit")
        if name.upper().startswith("TASKSCHEDULER_"):
            raise TaskError("environment", f"environment variable {name} is set by taskscheduler "
                                           "itself and cannot be overridden")
        if (not isinstance(text, str) or "\x00" in text or len(text) > MAX_ENVIRONMENT_VALUE_LENGTH
                or not _encodable(text)):
            raise TaskError("environment", f"environment variable {name} must be a string of at "
                                           f"most {MAX_ENVIRONMENT_VALUE_LENGTH} characters without "
                                           "NUL or lone surrogates")
    return tuple(sorted(value.items()))


LABEL_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
MAX_LABELS = 32


def check_labels(value: object, field: str = "labels") -> dict[str, str]:
    """Return a JSON object of labels as a dict, or raise TaskError naming `field`.

    Names are 1-63 letters, digits, '.', '_', '-' or '/', and values at most 63 letters,
    digits, '.', '_' or '-', both starting and ending with a letter or digit, as in
    Kubernetes labels.
    """
    if not isinstance(value, dict):
        raise TaskError(field, f'{field} must be an object of label names to values, such as '
                               '{"role": "web", "region": "eu"}')
    if len(value) > MAX_LABELS:
        raise TaskError(field, f"{field} has more than {MAX_LABELS} labels")
    for name, text in value.items():
        if not LABEL_NAME.fullmatch(name):
            raise TaskError(field, f"label name {name!r} is invalid: use 1-63 letters, digits, "
                                   "'.', '_', '-' or '/', starting and ending with a letter or digit")
        if not isinstance(text, str) or not LABEL_VALUE.fullmatch(text):
            raise TaskError(field, f"label {name} has an invalid value: use a string of at most 63 "
                                   "letters, digits, '.', '_' or '-', starting and ending with a "
                                   "letter or digit")
    return dict(value)


def parse_labels(text: str) -> dict[str, str]:
    """Parse `role=web,region=eu` into a dict of labels, or raise TaskError."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, equals, value = item.partition("=")
        if not equals:
            raise TaskError("labels", f"label {item!r} has no '=': write NAME=VALUE pairs separated "
                                      "by commas, such as role=web,region=eu")
        labels[name.strip()] = value.strip()
    return check_labels(labels)


@dataclasses.dataclass
class RunResult:
    """One run (or skipped or missed slot) of a task on this host, as reported to the server."""

    task_id: str
    scheduled_for: dt.datetime
    started_at: Optional[dt.datetime]
    finished_at: dt.datetime
    exit_code: Optional[int]
    status: str
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    late: bool = False
    reason: str = ""
    missed_slots: int = 0
    first_missed: Optional[dt.datetime] = None
    stdout_base64: Optional[str] = None
    stderr_base64: Optional[str] = None


class StateStore:
    """The agent's durable state: its id, its task list, its runs and the report outbox.

    It is one SQLite file (stdlib sqlite3) in the state directory. Every method takes
    the store's lock, so any thread may call it.
    """

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        # known_since: when this agent got the task or its last change. Slots before it
        # were never this agent's to run, so they never count as missed.
        "CREATE TABLE IF NOT EXISTS tasks ("
        " task_id TEXT PRIMARY KEY, body TEXT NOT NULL, known_since TEXT)",
        # One row per slot the agent handled: written with status 'running' before the
        # command starts, or as skipped or missed, so a restarted agent can tell which slots
        # it already handled. Unreported rows are the outbox.
        "CREATE TABLE IF NOT EXISTS runs ("
        " task_id TEXT NOT NULL, scheduled_for TEXT NOT NULL, status TEXT NOT NULL,"
        " body TEXT, reported INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (task_id, scheduled_for))",
        "CREATE INDEX IF NOT EXISTS runs_unreported ON runs (reported, status)",
    )

    def __init__(self, state_dir: str, outbox_size: int = 10000):
        # Only the agent's user may enter a new state directory: it keeps outputs, the
        # outbox and the push secret.
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "agent.db")
        self.outbox_size = outbox_size
        self._drop_logged_at = -math.inf
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        # FULL makes every commit durable through a power cut, at a few ms per write.
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.execute("PRAGMA busy_timeout=5000")
        for statement in self.SCHEMA:
            self._connection.execute(statement)
        columns = {row[1] for row in self._connection.execute("PRAGMA table_info(tasks)")}
        if "known_since" not in columns:
            self._connection.execute("ALTER TABLE tasks ADD COLUMN known_since TEXT")
        columns = {row[1] for row in self._connection.execute("PRAGMA table_info(runs)")}
        if "process_group" not in columns:
            # The run's process group id, so that a restarted agent can clean up after a kill.
            self._connection.execute("ALTER TABLE runs ADD COLUMN process_group INTEGER")
        # A second connection without an fsync per commit, for writes whose loss in a power
        # cut costs only a repeat. Losing a start record lets the slot run again after the
        # reboot, and losing a report's acknowledgement resends a report the server drops.
        self._fast = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._fast.execute("PRAGMA synchronous=NORMAL")
        self._fast.execute("PRAGMA busy_timeout=5000")
        # The newest handled slot and the known_since of each task, read on every firing.
        # They have a lock of their own, so the loop thread reads them without waiting for
        # a worker's fsync. A thread that needs both takes `_lock` first.
        self._cache_lock = threading.Lock()
        # Writes waiting for the next group commit on `_fast` (see `_write_fast`).
        self._pending_lock = threading.Lock()
        self._pending_writes: list[_PendingWrite] = []
        self._last_slots: dict[str, Optional[dt.datetime]] = {}
        self._known_since: dict[str, Optional[dt.datetime]] = {}

    def close(self) -> None:
        with self._lock:
            self._fast.close()
            self._connection.close()

    def get_meta(self, key: str) -> Optional[str]:
        with self._lock:
            row = self._connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._connection.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def tasks(self) -> list[Task]:
        with self._lock:
            rows = self._connection.execute("SELECT body FROM tasks ORDER BY task_id").fetchall()
        tasks = []
        for (body,) in rows:
            try:
                tasks.append(Task.from_json(json.loads(body)))
            except (ValueError, TypeError) as error:
                log.error("stored task is not valid and is ignored: %s", error)
        return tasks

    def known_since(self, task_id: str) -> Optional[dt.datetime]:
        with self._cache_lock:
            if task_id in self._known_since:
                return self._known_since[task_id]
        with self._lock:
            row = self._connection.execute(
                "SELECT known_since FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            value = parse_time(row[0]) if row and row[0] else None
            with self._cache_lock:
                self._known_since[task_id] = value
        return value

    def limit_known_since(self, task_id: str, now: dt.datetime) -> None:
        """Move a task's known_since back to `now` if it lies later."""
        with self._lock:
            with self._cache_lock:
                self._known_since.pop(task_id, None)
            self._connection.execute(
                "UPDATE tasks SET known_since = ? WHERE task_id = ? AND known_since > ?",
                (_slot_key(now), task_id, _slot_key(now)),
            )

    def upsert_task(self, task: Task, now: Optional[dt.datetime] = None) -> str:
        """Store one task and return 'added', 'replaced' or 'unchanged'."""
        body = _task_body(task)
        known_since = _slot_key(now or dt.datetime.now(UTC))
        with self._lock, self._connection:
            with self._cache_lock:
                self._known_since.pop(task.task_id, None)
            row = self._connection.execute(
                "SELECT body FROM tasks WHERE task_id = ?", (task.task_id,)
            ).fetchone()
            if row and row[0] == body:
                return "unchanged"
            self._connection.execute(
                "INSERT OR REPLACE INTO tasks (task_id, body, known_since) VALUES (?, ?, ?)",
                (task.task_id, body, known_since),
            )
        return "replaced" if row else "added"

    def replace_tasks(self, tasks: Iterable[Task], now: Optional[dt.datetime] = None) -> bool:
        """Make the stored task list exactly `tasks`; return whether anything changed."""
        wanted = {task.task_id: _task_body(task) for task in tasks}
        known_since = _slot_key(now or dt.datetime.now(UTC))
        with self._lock, self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            current = dict(self._connection.execute("SELECT task_id, body FROM tasks").fetchall())
            if current == wanted:
                return False
            with self._cache_lock:
                self._known_since.clear()
            removed = [(task_id,) for task_id in current if task_id not in wanted]
            self._connection.executemany("DELETE FROM tasks WHERE task_id = ?", removed)
            changed = [(task_id, body, known_since) for task_id, body in wanted.items()
                       if current.get(task_id) != body]
            self._connection.executemany(
                "INSERT OR REPLACE INTO tasks (task_id, body, known_since) VALUES (?, ?, ?)", changed
            )
        return True

    def last_slot(self, task_id: str) -> Optional[dt.datetime]:
        """Return the newest slot this agent ran, claimed, skipped or reported missed for the task."""
        with self._cache_lock:
            if task_id in self._last_slots:
                return self._last_slots[task_id]
        with self._lock:
            return self._last_slot_locked(task_id)

    def _last_slot_locked(self, task_id: str) -> Optional[dt.datetime]:
        """Return the newest handled slot, reading the runs table on a cache miss.

        The caller has `_lock`, so no write of a run row falls between the read and
        the cache update.
        """
        with self._cache_lock:
            if task_id in self._last_slots:
                return self._last_slots[task_id]
        row = self._connection.execute(
            "SELECT MAX(scheduled_for) FROM runs WHERE task_id = ?", (task_id,)
        ).fetchone()
        value = parse_time(row[0]) if row and row[0] else None
        with self._cache_lock:
            return self._last_slots.setdefault(task_id, value)

    def _note_slot_locked(self, task_id: str, slot: dt.datetime) -> None:
        self._last_slot_locked(task_id)
        with self._cache_lock:
            last = self._last_slots[task_id]
            if last is None or slot > last:
                self._last_slots[task_id] = slot

    def claim_slot(self, task_id: str, slot: dt.datetime) -> bool:
        """Mark a slot as handled in memory; return False if it or a later one already was.

        The loop thread claims a slot before a worker records its start on disk, so the
        next planning already counts it as handled.
        """
        self.last_slot(task_id)
        with self._cache_lock:
            last = self._last_slots.get(task_id)
            if last is not None and slot <= last:
                return False
            self._last_slots[task_id] = slot
        return True

    def _write_fast(self, sql: str, parameters: tuple, on_done: Optional[Callable[[int], None]] = None) -> int:
        """Run one write on the connection without fsync, in a group commit; return its row count.

        Writes that other threads queue while one commit is going share the next
        transaction, so a burst of runs starting together pays for one commit, not one
        each. `on_done` runs with the row count while the caller has the store's lock.
        """
        write = _PendingWrite(sql, parameters)
        with self._pending_lock:
            self._pending_writes.append(write)
        with self._lock:
            if not write.done:
                with self._pending_lock:
                    batch, self._pending_writes = self._pending_writes, []
                self._commit_fast(batch)
            if write.error is not None:
                raise write.error
            if on_done is not None:
                on_done(write.rowcount)
        return write.rowcount

    def _commit_fast(self, batch: list["_PendingWrite"]) -> None:
        try:
            self._fast.execute("BEGIN")
            for write in batch:
                write.rowcount = self._fast.execute(write.sql, write.parameters).rowcount
            self._fast.execute("COMMIT")
        except sqlite3.Error as error:
            if self._fast.in_transaction:
                self._fast.execute("ROLLBACK")
            for write in batch:
                write.error = error
        finally:
            for write in batch:
                write.done = True

    def record_start(self, task_id: str, slot: dt.datetime) -> bool:
        """Record that the run of `slot` starts; return False if that slot was already recorded."""
        def note_slot(rowcount: int) -> None:
            if rowcount == 1:
                self._note_slot_locked(task_id, slot)

        inserted = self._write_fast(
            "INSERT OR IGNORE INTO runs (task_id, scheduled_for, status) VALUES (?, ?, 'running')",
            (task_id, _slot_key(slot)), note_slot,
        )
        return inserted == 1

    def record_starts(self, runs: list[tuple[str, dt.datetime]]) -> list[bool]:
        """Record the start of several (task id, slot) runs in one transaction without an fsync.

        Returns, for each run, False if its slot was already recorded.
        """
        inserted = []
        with self._lock:
            self._fast.execute("BEGIN")
            try:
                for task_id, slot in runs:
                    rowcount = self._fast.execute(
                        "INSERT OR IGNORE INTO runs (task_id, scheduled_for, status) VALUES (?, ?, 'running')",
                        (task_id, _slot_key(slot)),
                    ).rowcount
                    inserted.append(rowcount == 1)
            except sqlite3.Error:
                self._fast.execute("ROLLBACK")
                raise
            self._fast.execute("COMMIT")
            for (task_id, slot), fresh in zip(runs, inserted):
                if fresh:
                    self._note_slot_locked(task_id, slot)
        return inserted

    def record_outcome(self, result: RunResult) -> bool:
        """Record a slot that did not run (skipped or missed); return False if already handled."""
        with self._lock:
            cursor = self._connection.execute(
                "INSERT OR IGNORE INTO runs (task_id, scheduled_for, status, body) VALUES (?, ?, ?, ?)",
                (result.task_id, _slot_key(result.scheduled_for), result.status,
                 json.dumps(_result_payload(result))),
            )
            if cursor.rowcount == 1:
                self._note_slot_locked(result.task_id, result.scheduled_for)
        if cursor.rowcount == 1:
            self._enforce_outbox_size()
        return cursor.rowcount == 1

    def record_finish(self, result: RunResult) -> None:
        self.record_finishes([result])

    def record_finishes(self, results: list[RunResult]) -> None:
        """Store finished runs in one transaction, so a burst of them costs one fsync."""
        rows = [(result.status, json.dumps(_result_payload(result)), result.task_id,
                 _slot_key(result.scheduled_for)) for result in results]
        with self._lock, self._connection:
            self._connection.execute("BEGIN")
            self._connection.executemany(
                "UPDATE runs SET status = ?, body = ? WHERE task_id = ? AND scheduled_for = ?", rows
            )
        self._enforce_outbox_size()

    def _enforce_outbox_size(self) -> None:
        """Drop the oldest unsent reports beyond the outbox size, and count them."""
        with self._lock, self._connection:
            (depth,) = self._connection.execute(
                "SELECT COUNT(*) FROM runs WHERE reported = 0 AND status != 'running'"
            ).fetchone()
            excess = depth - self.outbox_size
            if excess <= 0:
                return
            # The rows stay, marked reported, so their slots still count as handled.
            self._connection.execute(
                "UPDATE runs SET reported = 1, body = NULL WHERE rowid IN ("
                " SELECT rowid FROM runs WHERE reported = 0 AND status != 'running'"
                " ORDER BY scheduled_for LIMIT ?)",
                (excess,),
            )
            dropped = int(self._get_meta_locked("outbox_dropped") or 0) + excess
            self._connection.execute(
                "INSERT INTO meta (key, value) VALUES ('outbox_dropped', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(dropped),),
            )
        monotonic = time.monotonic()
        if monotonic - self._drop_logged_at >= 60.0:
            self._drop_logged_at = monotonic
            log.warning("outbox is full (%d reports): dropped the oldest unsent reports, %d so far",
                        self.outbox_size, dropped)

    def _get_meta_locked(self, key: str) -> Optional[str]:
        row = self._connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def outbox_stats(self) -> dict:
        """Return the outbox depth (unsent reports) and how many were dropped since the start."""
        with self._lock:
            (depth,) = self._connection.execute(
                "SELECT COUNT(*) FROM runs WHERE reported = 0 AND status != 'running'"
            ).fetchone()
            dropped = int(self._get_meta_locked("outbox_dropped") or 0)
        return {"outbox_depth": depth, "outbox_dropped": dropped}

    def record_process_groups(self, groups: list["ProcessGroup"]) -> None:
        """Store the process group of started runs, in one transaction without an fsync."""
        rows = [(group.process_group, group.task_id, _slot_key(group.slot)) for group in groups]
        with self._lock:
            self._fast.execute("BEGIN")
            try:
                self._fast.executemany(
                    "UPDATE runs SET process_group = ? WHERE task_id = ? AND scheduled_for = ?", rows
                )
            except sqlite3.Error:
                self._fast.execute("ROLLBACK")
                raise
            self._fast.execute("COMMIT")

    def mark_lost_runs(self, now: dt.datetime) -> list[tuple[str, dt.datetime, Optional[int]]]:
        """Mark runs still 'running' from an earlier agent process as lost.

        Returns each lost run's task id, slot and process group.
        """
        with self._lock:
            rows = self._connection.execute(
                "SELECT task_id, scheduled_for, process_group FROM runs WHERE status = 'running'"
            ).fetchall()
        lost = []
        for task_id, slot_key, process_group in rows:
            slot = parse_time(slot_key)
            self.record_finish(RunResult(
                task_id=task_id, scheduled_for=slot, started_at=None,
                finished_at=now, exit_code=None, status="lost",
                reason="the agent stopped while this run was going; its output and exit code are unknown",
            ))
            lost.append((task_id, slot, process_group))
        return lost

    def unreported(self, limit: int = 50) -> list[tuple[str, str, dict]]:
        """Return finished runs not yet acknowledged by the server, oldest slot first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT task_id, scheduled_for, body FROM runs "
                "WHERE reported = 0 AND status != 'running' ORDER BY scheduled_for LIMIT ?",
                (limit,),
            ).fetchall()
        reports = []
        for task_id, slot, body in rows:
            try:
                reports.append((task_id, slot, json.loads(body)))
            except (TypeError, ValueError):
                log.error("outbox entry of task %s slot %s is unreadable and is dropped", task_id, slot)
                self.mark_reported(task_id, slot)
        return reports

    def is_unsent(self, task_id: str, slot_key: str) -> bool:
        """Return whether a report is still waiting in the outbox (not sent, not dropped)."""
        with self._lock:
            return self._is_unsent_locked(task_id, slot_key)

    def _is_unsent_locked(self, task_id: str, slot_key: str) -> bool:
        row = self._connection.execute(
            "SELECT reported FROM runs WHERE task_id = ? AND scheduled_for = ?", (task_id, slot_key)
        ).fetchone()
        return row is not None and row[0] == 0

    def mark_reported(self, task_id: str, slot_key: str, delivered: bool = False) -> None:
        """Remove a report from the outbox. `delivered`: the server accepted it.

        A delivered report that the outbox bound dropped while it was being sent no longer
        counts as dropped.
        """
        with self._lock:
            if delivered and not self._is_unsent_locked(task_id, slot_key):
                dropped = int(self._get_meta_locked("outbox_dropped") or 0)
                if dropped > 0:
                    self._connection.execute(
                        "UPDATE meta SET value = ? WHERE key = 'outbox_dropped'", (str(dropped - 1),)
                    )
            self._fast.execute(
                "UPDATE runs SET reported = 1, body = NULL WHERE task_id = ? AND scheduled_for = ?",
                (task_id, slot_key),
            )

    def prune_runs(self, keep_per_task: int = 10) -> None:
        """Drop reported run records beyond the newest few per task."""
        with self._lock:
            self._connection.execute(
                "DELETE FROM runs WHERE reported = 1 AND rowid NOT IN ("
                " SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER ("
                "  PARTITION BY task_id ORDER BY scheduled_for DESC) AS rank FROM runs)"
                " WHERE rank <= ?)",
                (keep_per_task,),
            )


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """The process group of a started run, which a restarted agent kills if it is left over."""

    task_id: str
    slot: dt.datetime
    process_group: int


@dataclasses.dataclass
class _PendingWrite:
    """One statement waiting for a group commit, and its outcome once committed."""

    sql: str
    parameters: tuple
    rowcount: int = 0
    error: Optional[sqlite3.Error] = None
    done: bool = False


def _task_body(task: Task) -> str:
    return json.dumps(task.to_json(), sort_keys=True)


def _slot_key(slot: dt.datetime) -> str:
    # Fixed-width text sorts in time order, which the outbox query relies on.
    return slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _result_payload(result: RunResult) -> dict:
    payload = {
        "scheduled_for": format_time(result.scheduled_for),
        "started_at": format_time(result.started_at),
        "finished_at": format_time(result.finished_at),
        "exit_code": result.exit_code,
        "status": result.status,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "stdout_bytes": result.stdout_bytes,
        "stderr_bytes": result.stderr_bytes,
        "truncated": result.truncated,
    }
    if result.late:
        payload["late"] = True
    if result.reason:
        payload["reason"] = result.reason[:500]
    if result.status == "missed":
        payload["missed_slots"] = result.missed_slots
        payload["first_missed"] = format_time(result.first_missed)
    if result.stdout_base64 is not None:
        payload["stdout_base64"] = result.stdout_base64
    if result.stderr_base64 is not None:
        payload["stderr_base64"] = result.stderr_base64
    return payload


# ---------------------------------------------------------------------------
# The task scheduler
# ---------------------------------------------------------------------------


def jitter_offset(agent_id: str, task: Task, slot: dt.datetime) -> float:
    """Return this agent's start delay for a slot: fixed per agent, task and slot, below jitter."""
    if not task.jitter:
        return 0.0
    digest = hashlib.sha256(f"{agent_id}\0{task.task_id}\0{_slot_key(slot)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 * task.jitter


def count_slots(frequency: Frequency, after: dt.datetime, until: dt.datetime,
                limit: int = 10_000) -> int:
    """Count the slots in (after, until], stopping at `limit` for cron expressions.

    Interval slots are counted exactly. Cron slots are stepped through one by one, which
    costs up to milliseconds each near a daylight-saving change, so the count stops at
    `limit` to keep the loop thread free after a long downtime.
    """
    if isinstance(frequency, IntervalFrequency):
        period = dt.timedelta(seconds=frequency.seconds)
        return max((until - EPOCH) // period - (after - EPOCH) // period, 0)
    count = 0
    slot = frequency.next_after(after)
    while slot <= until and count < limit:
        count += 1
        slot = frequency.next_after(slot)
    return count


LOG_VERBS = {"added": "planned", "replaced": "re-planned changed", "removed": "dropped"}


@dataclasses.dataclass
class PlannedTask:
    task: Task
    slot: dt.datetime
    job: schedule.Job


class TaskScheduler:
    """Fires each task at its slots through one-shot jobs of a `schedule.Scheduler`.

    `schedule`'s own intervals count from the end of the previous run and drift, so
    the next slot is computed here from the task's frequency, and handed to `schedule`
    as a job that fires once. `schedule` is not thread-safe, so only the loop thread
    (the thread in `run_forever` or `run_pending`) touches it. Other threads hand it
    a new task list through `request_reconcile`.

    Every slot is handled once, also across restarts, because the state store keeps
    the newest slot handled per task:

    1. A slot that starts within `MISFIRE_GRACE_SECONDS` of its time (plus the task's
       jitter) runs.
    2. Slots the agent could not start in time (it was stopped, asleep, blocked, or the
       wall clock jumped forward) are missed: they are reported as one missed record
       with their count. The newest of them still runs once, marked late, if it is
       within the task's catch-up window.
    3. When the wall clock steps back, slots already handled are not run again: the
       task waits for its first slot after the newest one handled.
    """

    # A difference between wall-clock and monotonic time over one loop turn larger than
    # this is taken as a step of the wall clock.
    CLOCK_STEP_SECONDS = 1.0
    # The loop waits for a due job without sleeping from this many seconds before it.
    SPIN_SECONDS = 0.002

    def __init__(self, store: StateStore, fire: Callable[[Task, dt.datetime, bool], None],
                 missed: Optional[Callable[[Task, dt.datetime, dt.datetime, int], None]] = None,
                 clock: Optional[Clock] = None, max_sleep: float = 60.0, agent_id: str = "",
                 batch: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                 gate: Optional["StartGate"] = None):
        self.store = store
        self._gate = gate
        # Wraps each loop turn's firings, so their starts can be handled together.
        self._batch = batch or contextlib.nullcontext
        self.clock = clock or Clock()
        self.max_sleep = max_sleep
        self.agent_id = agent_id
        self._fire_callback = fire
        self._missed_callback = missed or (lambda task, first, last, count: None)
        self._scheduler = schedule.Scheduler()
        self._planned: dict[str, PlannedTask] = {}
        self._requests: "queue.SimpleQueue[list[Task]]" = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._clock_reading: Optional[tuple[dt.datetime, float, Optional[dt.timedelta]]] = None
        # When each task was first planned, for tasks the store has no known_since for.
        self._first_planned: dict[str, dt.datetime] = {}
        # Tasks fired in this turn of the loop, to plan once all of them have started.
        self._fired: list[tuple[Task, dt.datetime, dt.datetime]] = []

    def request_reconcile(self, tasks: list[Task]) -> None:
        """Ask the loop thread to make the planned tasks exactly `tasks`. Thread-safe."""
        self._requests.put(list(tasks))
        self._wakeup.set()

    def planned(self) -> dict[str, dt.datetime]:
        """Return the next planned slot of each task (loop thread or tests only)."""
        return {task_id: planned.slot for task_id, planned in self._planned.items()}

    def jobs(self) -> list[schedule.Job]:
        """Return the pending `schedule` jobs (loop thread or tests only)."""
        return list(self._scheduler.jobs)

    def reconcile(self, tasks: list[Task], now: Optional[dt.datetime] = None) -> dict[str, list[str]]:
        """Plan new tasks, re-plan changed ones and drop removed ones.

        Returns the ids of the tasks added, replaced and removed. A task that is
        already planned with the same definition keeps its job untouched.
        """
        now = now or self.clock.now()
        wanted = {task.task_id: task for task in tasks}
        changes: dict[str, list[str]] = {"added": [], "replaced": [], "removed": []}

        for task_id in list(self._planned):
            if task_id not in wanted:
                self._cancel(task_id)
                self._first_planned.pop(task_id, None)
                changes["removed"].append(task_id)

        for task_id, task in wanted.items():
            current = self._planned.get(task_id)
            if current is not None and current.task == task and not self._drifted(current, now):
                continue
            if current is not None:
                self._cancel(task_id)
            if current is None or current.task != task:
                self._first_planned[task_id] = now
            try:
                self._handle_due_slots(task, now)
                self._plan(task, now)
            except Exception as error:  # one task must never stop the others from planning
                log.error("task %s cannot be scheduled: %s", task_id, error)
                continue
            changes["replaced" if current is not None else "added"].append(task_id)

        for kind, task_ids in changes.items():
            if task_ids:
                log.info("%s %d tasks: %s", LOG_VERBS[kind], len(task_ids), ", ".join(task_ids))
        return changes

    def replan_all(self, now: Optional[dt.datetime] = None) -> None:
        """Re-plan every task from `now`, for example after the wall clock stepped."""
        now = now or self.clock.now()
        for task_id in list(self._planned):
            task = self._planned[task_id].task
            self._cancel(task_id)
            try:
                self._handle_due_slots(task, now)
                self._plan(task, now)
            except Exception as error:
                log.error("task %s cannot be scheduled: %s", task_id, error)

    def _drifted(self, planned: PlannedTask, now: dt.datetime) -> bool:
        """Return whether a job's due time no longer matches its slot.

        `schedule` keeps due times in naive local time, so a step of the wall clock or a
        change of the host's UTC offset moves them away from the slot.
        """
        if planned.job.next_run is None:
            return False
        start = planned.slot + dt.timedelta(seconds=jitter_offset(self.agent_id, planned.task, planned.slot))
        expected = dt.datetime.now() + (start - now)
        return abs((planned.job.next_run - expected).total_seconds()) > self.CLOCK_STEP_SECONDS

    def _handle_due_slots(self, task: Task, now: dt.datetime) -> None:
        """Run or report the task's slots that are due at `now` and not handled yet."""
        frequency = task.parsed_frequency()
        handled = self.store.last_slot(task.task_id)
        known_since = self.store.known_since(task.task_id) or self._first_planned.get(task.task_id)
        after = max((instant for instant in (handled, known_since) if instant is not None), default=now)
        if after >= now:
            return
        latest = frequency.latest_at_or_before(now)
        if latest <= after:
            return

        count = count_slots(frequency, after, now)
        start = latest + dt.timedelta(seconds=jitter_offset(self.agent_id, task, latest))
        lateness = (now - start).total_seconds()
        runs_latest = lateness <= max(MISFIRE_GRACE_SECONDS, task.catchup)
        if runs_latest:
            count -= 1
        if count > 0:
            first = frequency.next_after(after)
            last = latest if not runs_latest else frequency.latest_at_or_before(latest - dt.timedelta(microseconds=1))
            self._missed_callback(task, first, last, count)
        if runs_latest:
            self._fire_callback(task, latest, lateness > MISFIRE_GRACE_SECONDS)

    def _plan(self, task: Task, now: dt.datetime) -> dt.datetime:
        after = now
        handled = self.store.last_slot(task.task_id)
        if handled is not None and handled > after:
            after = handled
        slot = task.parsed_frequency().next_after(after)
        start = slot + dt.timedelta(seconds=jitter_offset(self.agent_id, task, slot))
        # schedule computes its due time from its own clock reading, so hand it the delay
        # from a clock reading taken just now. A delay of zero would make schedule loop forever.
        delay = max((start - self.clock.now()).total_seconds(), 0.001)
        job = self._scheduler.every(delay).seconds.do(self._fire, task.task_id, slot)
        self._planned[task.task_id] = PlannedTask(task, slot, job)
        return slot

    def _cancel(self, task_id: str) -> None:
        planned = self._planned.pop(task_id)
        self._scheduler.cancel_job(planned.job)

    def _fire(self, task_id: str, slot: dt.datetime):
        now = self.clock.now()
        planned = self._planned.pop(task_id, None)
        if planned is None:
            return schedule.CancelJob
        try:
            self._handle_due_slots(planned.task, now)
        except Exception:
            # One task's failure must never end the loop.
            log.exception("task %s failed to start for slot %s", task_id, format_time(slot))
        # Planned after every due task has started, so the last of a burst is not delayed.
        self._fired.append((planned.task, slot, now))
        return schedule.CancelJob

    def _plan_fired(self) -> None:
        fired, self._fired = self._fired, []
        for task, slot, now in fired:
            try:
                self._plan(task, now)
            except Exception:
                log.exception("task %s could not be planned after slot %s", task.task_id, format_time(slot))

    def _check_clock(self) -> None:
        """Re-plan everything when the wall clock stepped or the host's UTC offset changed."""
        now = self.clock.now()
        monotonic = self.clock.monotonic()
        offset = self.clock.local_offset()
        previous = self._clock_reading
        self._clock_reading = (now, monotonic, offset)
        if previous is None:
            return
        wall_elapsed = (now - previous[0]).total_seconds()
        step = wall_elapsed - (monotonic - previous[1])
        if abs(step) > self.CLOCK_STEP_SECONDS:
            log.warning("wall clock stepped by %+.1f s; re-planning %d tasks", step, len(self._planned))
            if step < 0:
                # Times recorded before a step back lie in the future now, and slots before
                # them would count as never this agent's to run.
                for task_id in self._planned:
                    self.store.limit_known_since(task_id, now)
                    if self._first_planned.get(task_id, now) > now:
                        self._first_planned[task_id] = now
            self.replan_all(now)
        elif offset != previous[2]:
            log.info("host UTC offset changed from %s to %s; re-planning %d tasks",
                     previous[2], offset, len(self._planned))
            self.replan_all(now)

    def run_pending(self) -> Optional[float]:
        """Apply waiting reconcile requests, fire due jobs, and return seconds until the next one."""
        self._check_clock()
        latest: Optional[list[Task]] = None
        while True:
            try:
                latest = self._requests.get_nowait()
            except queue.Empty:
                break
        with self._batch():
            if latest is not None:
                self.reconcile(latest)
            self._scheduler.run_pending()
        self._plan_fired()
        idle = self._scheduler.idle_seconds
        if self._gate is not None:
            self._gate.expect(math.inf if idle is None else time.monotonic() + idle)
        return idle

    def run_forever(self, stop: threading.Event) -> None:
        """Run the loop until `stop` is set, sleeping until the next due job."""
        try:
            while not stop.is_set():
                idle = self.run_pending()
                timeout = self.max_sleep if idle is None else min(max(idle, 0.0), self.max_sleep)
                if timeout > self.SPIN_SECONDS:
                    if self._wakeup.wait(timeout - self.SPIN_SECONDS):
                        self._wakeup.clear()
                    continue
                self._spin(timeout)
        finally:
            # A stopped loop fires nothing more. Left set, its last planned start would
            # keep the gate busy for good, and every later wait would last its full bound.
            if self._gate is not None:
                self._gate.expect(math.inf)

    def _spin(self, seconds: float) -> None:
        """Wait `seconds` without sleeping, giving up the interpreter lock on each turn.

        A timed sleep ends 0.1-0.4 ms late and leaves the CPU idle, so the process that
        starts next waits for the CPU to wake up. The last `SPIN_SECONDS` before a due
        job are spent in this loop instead, at a cost of that much CPU per firing.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._wakeup.is_set():
            time.sleep(0)

    def wake(self) -> None:
        self._wakeup.set()


# ---------------------------------------------------------------------------
# Running one command
# ---------------------------------------------------------------------------


class BoundedOutput:
    """Collects a stream's bytes, keeping the head and the tail when it is too long."""

    def __init__(self, limit: int):
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def append(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit // 2 - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            excess = len(self.tail) - (self.limit - self.limit // 2)
            if excess > 0:
                del self.tail[:excess]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def raw_base64(self) -> Optional[str]:
        """Return the kept bytes (head, then tail) as base64 when the text view lost any.

        The text view replaces bytes that are not UTF-8 with U+FFFD, and the server
        shows NUL the same way, so the exact bytes are sent beside it in those cases.
        """
        kept = bytes(self.head) + bytes(self.tail)
        head, tail = bytes(self.head), bytes(self.tail)
        if self.truncated:
            # The cut may split a character at the end of the head or the start of the
            # tail. That alone loses none of the bytes kept.
            skipped = 0
            while skipped < 3 and skipped < len(tail) and 0x80 <= tail[skipped] < 0xC0:
                skipped += 1
            tail = tail[skipped:]
        else:
            head, tail = kept, b""
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=not self.truncated)
            tail.decode("utf-8")
            lossless = b"\x00" not in kept
        except UnicodeDecodeError:
            lossless = False
        return None if lossless else base64.b64encode(kept).decode("ascii")

    def text(self) -> str:
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", errors="replace")
        omitted = self.total - len(self.head) - len(self.tail)
        marker = f"\n[... {omitted} bytes truncated by taskscheduler ...]\n"
        return (
            bytes(self.head).decode("utf-8", errors="replace")
            + marker
            + bytes(self.tail).decode("utf-8", errors="replace")
        )


def _collect_with_selector(process: subprocess.Popen, stdout: BoundedOutput, stderr: BoundedOutput,
                           timeout: float, clock: Clock, handle: Optional["RunHandle"],
                           kill_grace: float, pipe_grace: float) -> tuple[Optional[int], bool, dt.datetime]:
    """Read a run's output on the calling thread until the shell exits and its pipes close.

    Returns the exit code, whether the time limit ended the run, and when the shell
    exited. One thread serves both pipes, so a run costs one thread, not three. A
    Linux host also watches the shell's exit through a pidfd. Elsewhere the exit is
    polled while a background child keeps the pipes open, at most every 0.25 s.
    """
    selector = selectors.DefaultSelector()
    outputs: dict[int, tuple[object, BoundedOutput]] = {}
    for stream, output in ((process.stdout, stdout), (process.stderr, stderr)):
        selector.register(stream.fileno(), selectors.EVENT_READ)
        outputs[stream.fileno()] = (stream, output)
    exit_watch = _open_pidfd(process.pid)
    if exit_watch is not None:
        selector.register(exit_watch, selectors.EVENT_READ)

    deadline = time.monotonic() + timeout
    killer: Optional[threading.Thread] = None
    finished_at: Optional[dt.datetime] = None
    pipe_deadline = math.inf
    poll_delay = 0.01
    try:
        while True:
            now = time.monotonic()
            if finished_at is None and process.poll() is not None:
                finished_at = clock.now()
                pipe_deadline = now + pipe_grace
                if handle is not None:
                    handle.exited = True
            if finished_at is not None and (not outputs or now >= pipe_deadline):
                break
            if killer is None and finished_at is None and now >= deadline:
                # The output is still read while the process tree is being stopped.
                killer = threading.Thread(target=kill_process_tree, args=(process, kill_grace),
                                          name="kill", daemon=True)
                killer.start()
            if not outputs:
                # The command closed both pipes but goes on: wait for its exit alone.
                wait = deadline - now if killer is None else 0.05
                try:
                    process.wait(max(wait, 0.0))
                except subprocess.TimeoutExpired:
                    pass
                continue

            if finished_at is not None:
                wait = pipe_deadline - now
            elif killer is not None:
                wait = 0.05
            elif exit_watch is not None:
                wait = deadline - now
            else:
                wait = min(poll_delay, deadline - now)
                poll_delay = min(poll_delay * 2, 0.25)
            for key, _events in selector.select(max(wait, 0.0)):
                if key.fd == exit_watch:
                    selector.unregister(exit_watch)
                    continue
                stream, output = outputs[key.fd]
                try:
                    chunk = os.read(key.fd, 65536)
                except OSError:
                    chunk = b""
                if chunk:
                    output.append(chunk)
                else:
                    selector.unregister(key.fd)
                    del outputs[key.fd]
                    stream.close()
    finally:
        for stream, _output in outputs.values():
            stream.close()
        selector.close()
        if exit_watch is not None:
            os.close(exit_watch)

    if killer is not None:
        killer.join()
        finished_at = clock.now()
    return process.wait(), killer is not None, finished_at


def _open_pidfd(pid: int) -> Optional[int]:
    """Return a file descriptor that becomes readable when the process exits, where Linux has one."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:
        return None  # a kernel older than Linux 5.3


def _collect_with_threads(process: subprocess.Popen, stdout: BoundedOutput, stderr: BoundedOutput,
                          timeout: float, clock: Clock, handle: Optional["RunHandle"],
                          kill_grace: float, pipe_grace: float) -> tuple[Optional[int], bool, dt.datetime]:
    """Read a run's output with a thread per pipe, for Windows, where pipes cannot be selected."""
    readers = [
        threading.Thread(target=_drain, args=(process.stdout, stdout), daemon=True),
        threading.Thread(target=_drain, args=(process.stderr, stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()

    timed_out = False
    try:
        exit_code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        exit_code = kill_process_tree(process, kill_grace)
    finished_at = clock.now()
    if handle is not None:
        handle.exited = True

    deadline = time.monotonic() + pipe_grace
    for reader in readers:
        reader.join(max(deadline - time.monotonic(), 0))
    return exit_code, timed_out, finished_at


def _drain(stream, output: BoundedOutput) -> None:
    try:
        for chunk in iter(lambda: stream.read1(65536), b""):
            output.append(chunk)
    except (OSError, ValueError):
        pass  # the pipe was closed under us
    finally:
        try:
            stream.close()
        except OSError:
            pass


class Runner:
    """Runs one task's command through the host's shell and captures its output.

    POSIX hosts use `/bin/sh -c COMMAND`; Windows hosts use `cmd.exe /c COMMAND`
    (through COMSPEC). Each run starts in its own session or process group, and the
    command's environment adds TASKSCHEDULER_TASK_ID, TASKSCHEDULER_AGENT_ID and
    TASKSCHEDULER_SCHEDULED_FOR to the agent's own.
    """

    # How long to keep reading output after the shell exits. A background child that
    # keeps the pipe open does not delay the report beyond this.
    PIPE_GRACE_SECONDS = 2.0
    KILL_GRACE_SECONDS = 5.0
    MAX_TIMEOUT_SECONDS = 3600.0

    def __init__(self, agent_id: str, work_dir: str, output_limit: int = 1024 * 1024,
                 clock: Optional[Clock] = None):
        self.agent_id = agent_id
        self.work_dir = work_dir
        self.output_limit = output_limit
        self.clock = clock or Clock()
        os.makedirs(work_dir, exist_ok=True)

    def timeout_for(self, task: Task, slot: dt.datetime, started_at: Optional[dt.datetime] = None) -> float:
        """Return the run's time limit in seconds from its start.

        It is the task's timeout, or by default the time until the task's next slot (at
        least 1 s, at most 1 hour). So by default a run that hangs ends when the next one
        is due, instead of making it skip.
        """
        if task.timeout is not None:
            return float(task.timeout)
        until_next = (task.parsed_frequency().next_after(slot) - (started_at or slot)).total_seconds()
        return min(max(until_next, 1.0), self.MAX_TIMEOUT_SECONDS)

    def run(self, task: Task, slot: dt.datetime, handle: Optional["RunHandle"] = None) -> RunResult:
        env = dict(os.environ)
        env.update(task.environment)
        env["TASKSCHEDULER_TASK_ID"] = task.task_id
        env["TASKSCHEDULER_AGENT_ID"] = self.agent_id
        env["TASKSCHEDULER_SCHEDULED_FOR"] = format_time(slot)
        options: dict = {}
        if ON_WINDOWS:
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True

        started_at = self.clock.now()
        try:
            process = subprocess.Popen(
                task.command, shell=True, cwd=self.work_dir, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                **options,
            )
        except (OSError, ValueError) as error:
            return RunResult(
                task_id=task.task_id, scheduled_for=slot, started_at=started_at,
                finished_at=self.clock.now(), exit_code=None, status="failed",
                stdout="", stderr=f"taskscheduler could not start the shell: {error}",
            )

        timeout = self.timeout_for(task, slot, started_at)
        if handle is not None:
            handle.deadline = started_at + dt.timedelta(seconds=timeout)
            handle.attach(process)
        stdout, stderr = BoundedOutput(self.output_limit), BoundedOutput(self.output_limit)
        collect = _collect_with_threads if ON_WINDOWS else _collect_with_selector
        exit_code, timed_out, finished_at = collect(
            process, stdout, stderr, timeout, self.clock, handle,
            kill_grace=self.KILL_GRACE_SECONDS, pipe_grace=self.PIPE_GRACE_SECONDS,
        )

        status = "timed_out" if timed_out else "succeeded"
        if handle is not None and handle.cancelled:
            status = "cancelled"
        if status == "succeeded" and exit_code != 0:
            status = "failed"
        reason = ""
        if status == "timed_out":
            reason = f"the run lasted longer than its timeout of {timeout:g} s"
        elif status == "cancelled":
            reason = "the run was stopped because the next slot replaced it"
        return RunResult(
            task_id=task.task_id, scheduled_for=slot, started_at=started_at,
            finished_at=finished_at, exit_code=exit_code, status=status,
            stdout=stdout.text(), stderr=stderr.text(),
            stdout_bytes=stdout.total, stderr_bytes=stderr.total,
            truncated=stdout.truncated or stderr.truncated, reason=reason,
            stdout_base64=stdout.raw_base64(), stderr_base64=stderr.raw_base64(),
        )


class StartGate:
    """Counts the runs handed to the workers whose command has not started yet.

    Writes that can wait (results), syncs and the reports that results lead to, wait
    until no run is starting and none started in the last `QUIET_SECONDS`. So
    they do not hold the store's write lock, with its fsync, while the runs of a slot
    record their starts, nor take the CPU while the new commands load.
    """

    QUIET_SECONDS = 0.05
    # Background work that would begin this close before the next planned start waits
    # until that start is over.
    SLOT_MARGIN_SECONDS = 0.1

    def __init__(self):
        self._starting = 0
        self._left_at = -math.inf
        # When the loop next fires, in time.monotonic() seconds; set by `expect`.
        self._next_start = math.inf
        self._changed = threading.Condition()

    def expect(self, next_start: float) -> None:
        """Note when the loop fires next, in time.monotonic() seconds (inf: nothing planned)."""
        with self._changed:
            self._next_start = next_start
            self._changed.notify_all()

    @property
    def starting(self) -> int:
        with self._changed:
            return self._starting

    def enter(self) -> None:
        with self._changed:
            self._starting += 1

    def leave(self) -> None:
        with self._changed:
            self._starting -= 1
            self._left_at = time.monotonic()
            if self._starting == 0:
                self._changed.notify_all()

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait until the gate is quiet or `timeout` seconds have passed; return True if it is."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                now = time.monotonic()
                if self._starting > 0:
                    wait = deadline - now
                elif now < self._left_at + self.QUIET_SECONDS:
                    wait = self._left_at + self.QUIET_SECONDS - now
                elif self._next_start - self.SLOT_MARGIN_SECONDS <= now:
                    # A start is near, or due and not fired yet: `expect` ends this wait.
                    wait = max(self._next_start - now, 0.0) + self.QUIET_SECONDS
                else:
                    return True
                if now >= deadline:
                    return False
                self._changed.wait(min(wait, deadline - now))


class RunHandle:
    """A run in progress, which another thread can stop (overlap policy `replace`)."""

    def __init__(self, task: Task, slot: dt.datetime, kill_grace: float = Runner.KILL_GRACE_SECONDS,
                 on_start: Optional[Callable[[int], None]] = None, gate: Optional[StartGate] = None):
        self.task = task
        # Entered here, left once the command started or the run ended without it.
        self._gate = gate
        if gate is not None:
            gate.enter()
        self.slot = slot
        self.kill_grace = kill_grace
        self.cancelled = False
        # When the run's time limit ends it; None until the command starts.
        self.deadline: Optional[dt.datetime] = None
        self.exited = False
        self.future: Optional[Future] = None
        self._on_start = on_start
        self._process: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    def attach(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._process = process
            cancelled = self.cancelled
        if self._on_start is not None:
            try:
                self._on_start(process.pid)
            except Exception:
                log.exception("task %s slot %s: could not record the process group",
                              self.task.task_id, format_time(self.slot))
        if cancelled:
            self._kill_in_background(process)

    def leave_gate(self) -> None:
        """Count this run as no longer starting; later calls do nothing."""
        with self._lock:
            gate, self._gate = self._gate, None
        if gate is not None:
            gate.leave()

    def cancel(self) -> None:
        """Stop the run's process tree without blocking the caller."""
        with self._lock:
            self.cancelled = True
            process = self._process
        if process is not None:
            self._kill_in_background(process)

    def _kill_in_background(self, process: subprocess.Popen) -> None:
        threading.Thread(target=kill_process_tree, args=(process, self.kill_grace),
                         name="kill", daemon=True).start()


def kill_process_tree(process: subprocess.Popen, grace: float) -> Optional[int]:
    """Stop a run's whole process group: SIGTERM, then SIGKILL after `grace` seconds."""
    if ON_WINDOWS:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return process.wait()
    # The shell may exit at SIGTERM while a child that ignores it lives on, so wait
    # for the whole group to be gone, not only the shell.
    group = process.pid
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()
        if not _group_alive(group):
            break
        time.sleep(0.05)
    else:
        _signal_group(group, signal.SIGKILL)
    return process.wait()


def kill_orphaned_run(process_group: int, task_id: str, slot: dt.datetime,
                      use_proc: Optional[bool] = None) -> int:
    """Kill what is left of a run whose agent died, and return how many processes were killed.

    A process group id can be reused after its processes are gone, so only processes
    of that group whose environment names this run's task and slot are killed. Linux
    hosts read /proc; other POSIX hosts (macOS, the BSDs) read `ps -E`, which shows each
    process's environment to its own user and to root.
    """
    markers = (f"TASKSCHEDULER_TASK_ID={task_id}", f"TASKSCHEDULER_SCHEDULED_FOR={format_time(slot)}")
    if use_proc is None:
        use_proc = os.path.isdir("/proc/self")
    candidates = _group_environments_proc(process_group) if use_proc else _group_environments_ps(process_group)
    killed = 0
    for pid, environment in candidates:
        if all(marker in environment for marker in markers):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def _group_environments_proc(process_group: int) -> list[tuple[int, list[str]]]:
    """Return (pid, environment entries) of a process group's members, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                # The command name in brackets may hold spaces, so split after it.
                fields = stat_file.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) != process_group:
                continue
            with open(f"/proc/{entry}/environ", "rb") as environ_file:
                environment = environ_file.read().decode("utf-8", "replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        members.append((int(entry), environment))
    return members


def _group_environments_ps(process_group: int) -> list[tuple[int, list[str]]]:
    """Return (pid, command line and environment words) of a process group's members, from ps."""
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=,pgid="], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    members = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or parts[1] != str(process_group):
            continue
        # BSD and macOS ps take -E for the environment; procps (Linux) takes the e modifier.
        for command in (["ps", "-E", "-ww", "-o", "command=", "-p", parts[0]],
                        ["ps", "eww", "-o", "command=", "-p", parts[0]]):
            try:
                shown = subprocess.run(command, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            if shown.returncode == 0 and "TASKSCHEDULER_" in shown.stdout:
                members.append((int(parts[0]), shown.stdout.split()))
                break
    return members


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(group: int) -> bool:
    """Return whether a process group has a member that is not a zombie.

    A killed child whose shell is gone becomes a zombie until init reaps it, which
    some init processes do only every second or so. Such a zombie counts as dead here.
    """
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    states = _group_states(group)
    return states is None or any(state != "Z" for state in states)


def _group_states(group: int) -> Optional[list[str]]:
    """Return the states of a process group's members from /proc, or None without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    states = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                # The command name in brackets may hold spaces, so split after it.
                fields = stat_file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(group).encode():
            states.append(fields[0].decode())
    return states


# ---------------------------------------------------------------------------
# Talking to the server
# ---------------------------------------------------------------------------


class ServerError(Exception):
    """The server could not be reached, or returned an error."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


CREDENTIALS_FILE = "agent-credentials.json"


class BearerAuth(requests.auth.AuthBase):
    """Sets `Authorization: Bearer TOKEN` on a request.

    Given as `auth=`, it keeps requests from replacing the header with credentials from a
    netrc file, which requests applies only to requests without `auth`.
    """

    def __init__(self, token: str):
        self.token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The agent's enrollment result: its bearer token and the key of its push wake-ups."""

    agent_id: str
    agent_token: str
    push_secret: str
    # When the server stops accepting the token (RFC 3339), or None for never. The agent
    # only logs it: it enrolls again when the server rejects the token.
    expires_at: Optional[str] = None

    def __repr__(self) -> str:
        # Keeps the secrets out of tracebacks and debug logs.
        return f"Credentials(agent_id={self.agent_id!r}, expires_at={self.expires_at!r})"


def load_credentials(path: str, agent_id: str) -> Optional[Credentials]:
    """Return the credentials stored at `path` for `agent_id`, or None when there are none.

    Credentials of another agent id (after --id changed it) are ignored, so the agent
    enrolls again under its new id.
    """
    try:
        with open(path, encoding="utf-8") as credentials_file:
            data = json.load(credentials_file)
        credentials = Credentials(agent_id=data["agent_id"], agent_token=data["agent_token"],
                                  push_secret=data["push_secret"], expires_at=data.get("expires_at"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.error("credentials file %s cannot be read, ignored: %s; delete it to enroll again",
                  path, type(error).__name__)
        return None
    if credentials.agent_id != agent_id:
        log.warning("credentials file %s belongs to agent %s, not %s; ignored, so the agent "
                    "enrolls as %s", path, credentials.agent_id, agent_id, agent_id)
        return None
    if not ON_WINDOWS and os.stat(path).st_mode & 0o077:
        log.warning("credentials file %s can be read by other users; run chmod 600 on it", path)
    return credentials


def save_credentials(path: str, credentials: Credentials) -> None:
    """Write the credentials to `path` with mode 0600, replacing the file in one step."""
    temporary = path + ".tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as credentials_file:
        # os.open's mode applies only to a new file, so a leftover temporary file is fixed too.
        if not ON_WINDOWS:
            os.fchmod(credentials_file.fileno(), 0o600)
        json.dump(dataclasses.asdict(credentials), credentials_file)
        credentials_file.flush()
        os.fsync(credentials_file.fileno())
    os.replace(temporary, path)


class ServerClient:
    """The agent's calls to the server's REST API.

    With several server URLs, a request that cannot connect, times out or gets a 5xx
    response moves on to the next URL, and the client stays with the first one that works.
    """

    def __init__(self, base_urls: "str | list[str]", agent_id: str, timeout: float = 10.0,
                 credentials_path: Optional[str] = None, enrollment_token: Optional[str] = None,
                 verify: "bool | str" = True):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.base_urls = [url.rstrip("/") for url in urls]
        self._current = 0
        # The digest of each thread's last response body: the sync and report threads
        # share this client.
        self._response = threading.local()
        self._task_list_digest: Optional[bytes] = None
        self.agent_id = agent_id
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"taskscheduler-agent/{__version__}"
        # True verifies the server's certificate against certifi's CA bundle (or
        # REQUESTS_CA_BUNDLE), a path against that bundle instead, and False not at all.
        self.verify = verify
        self.credentials_path = credentials_path
        self.enrollment_token = enrollment_token
        self.credentials = load_credentials(credentials_path, agent_id) if credentials_path else None
        self._enroll_lock = threading.Lock()
        # The agent's labels, sent at every registration; the server lists only the tasks
        # that target this agent by id or by labels.
        self.labels: dict[str, str] = {}
        # The manual runs of the last task list that changed, as (task id, run id, request instant).
        self.manual_runs: list[tuple[str, str, dt.datetime]] = []

    @property
    def push_secret(self) -> Optional[str]:
        return self.credentials.push_secret if self.credentials is not None else None

    @property
    def base_url(self) -> str:
        return self.base_urls[self._current]

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        """Send a request with the agent token; on a 401, enroll if possible and send it again."""
        credentials = self.credentials
        try:
            return self._request_any(method, path, body, self._token_of(credentials))
        except ServerError as error:
            if error.status != 401:
                raise
            self._recover_from_unauthorized(credentials, error)
        return self._request_any(method, path, body, self._token_of(self.credentials))

    @staticmethod
    def _token_of(credentials: Optional[Credentials]) -> Optional[str]:
        return credentials.agent_token if credentials is not None else None

    def _recover_from_unauthorized(self, used: Optional[Credentials], rejection: ServerError) -> None:
        """Enroll after the server rejected `used` (None: no token) with `rejection`, or raise
        a ServerError whose message explains how the operator fixes it.

        A revoked token and an expired one are handled alike: the enrollment token gets
        the agent a new token.
        """
        with self._enroll_lock:
            if self.credentials is not used:
                return  # another thread enrolled meanwhile
            path = self.credentials_path or CREDENTIALS_FILE
            if self.enrollment_token is None:
                if used is None:
                    message = ("the server requires an agent token: give the agent the enrollment "
                               "token with --enrollment-token-file PATH or the environment variable "
                               "TASKSCHEDULER_ENROLLMENT_TOKEN, so that it can enroll")
                else:
                    message = (f"the server rejected the stored token of agent {self.agent_id} "
                               f"from {path} ({rejection}): the token expired, or an admin revoked "
                               "it. To enroll again, give the agent the enrollment token "
                               "(--enrollment-token-file or TASKSCHEDULER_ENROLLMENT_TOKEN), or "
                               "delete that file and restart with the enrollment token")
                log.error("%s", message)
                raise ServerError(message, status=401)
            if used is not None:
                log.warning("the server rejected the stored token of agent %s (%s); enrolling again "
                            "with the enrollment token", self.agent_id, rejection)
            self.credentials = self._enroll(path, previous=used)

    def _enroll(self, path: str, previous: Optional[Credentials] = None) -> Credentials:
        # The server lets an id whose token expired enroll again only with that token, so
        # that nobody else who has the enrollment token can take the id over.
        request = {"previous_token": previous.agent_token} if previous is not None else None
        try:
            body = self._request_any("POST", f"/api/v1/agents/{self.agent_id}/enroll", request,
                                     self.enrollment_token)
        except ServerError as error:
            message = f"enrollment of agent {self.agent_id} failed: {error}"
            if error.status == 409:
                message += (f". Delete {path} only if an admin also revoked the agent's token; "
                            "otherwise start the agent with another --id")
            elif error.status == 401:
                message += (". The enrollment token is not valid or expired: give the agent a "
                            "current one (--enrollment-token-file or TASKSCHEDULER_ENROLLMENT_TOKEN)")
            log.error("%s", message)
            # The request that needed the enrollment is still unauthorized. So a 4xx becomes
            # a 401, which makes the report sender keep a report instead of dropping it as
            # rejected for good. An unreachable server keeps its own status.
            status = 401 if error.status is not None and error.status < 500 else error.status
            raise ServerError(message, status=status) from None
        try:
            expires_at = body.get("expires_at")
            credentials = Credentials(agent_id=self.agent_id, agent_token=str(body["agent_token"]),
                                      push_secret=str(body["push_secret"]),
                                      expires_at=str(expires_at) if expires_at is not None else None)
        except KeyError as error:
            raise ServerError(f"the enrollment response lacks {error}") from None
        if self.credentials_path is not None:
            save_credentials(self.credentials_path, credentials)
        log.info("enrolled with %s as agent %s; credentials stored in %s; the token expires %s",
                 redact_url(self.base_url), self.agent_id, path,
                 f"at {credentials.expires_at}" if credentials.expires_at else "never")
        return credentials

    def _request_any(self, method: str, path: str, body: Optional[dict], token: Optional[str]) -> dict:
        error: Optional[ServerError] = None
        for attempt in range(len(self.base_urls)):
            index = (self._current + attempt) % len(self.base_urls)
            try:
                result = self._request_one(self.base_urls[index], method, path, body, token)
            except ServerError as failure:
                error = failure
                if failure.status is not None and failure.status < 500:
                    raise
                continue
            if index != self._current:
                log.info("switched to server %s", redact_url(self.base_urls[index]))
                self._current = index
            return result
        assert error is not None
        raise error

    def _request_one(self, base_url: str, method: str, path: str, body: Optional[dict],
                     token: Optional[str] = None) -> dict:
        url = base_url + path
        auth = BearerAuth(token) if token is not None else None
        try:
            # verify is passed with each request because requests lets REQUESTS_CA_BUNDLE
            # and CURL_CA_BUNDLE override a session's verify setting.
            response = self.session.request(method, url, json=body, auth=auth,
                                            timeout=self.timeout, stream=True, verify=self.verify)
        except requests.RequestException as error:
            raise ServerError(f"{method} {redact_url(url)} failed: {error}") from None

        # requests' timeout bounds each socket read, not the whole response, so a server
        # that trickles its body is cut off here after `timeout` seconds in all.
        deadline = time.monotonic() + self.timeout
        chunks = []
        try:
            # read1 returns what has arrived, so the deadline is checked while a slow body
            # trickles in. Each read still waits at most `timeout` for new bytes.
            while chunk := response.raw.read1(65536):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise ServerError(f"{method} {redact_url(url)} timed out after {self.timeout:g} s")
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ServerError(f"{method} {redact_url(url)} failed: {error}") from None
        finally:
            response.close()
        response._content = b"".join(chunks)
        self._response.digest = hashlib.sha256(response._content).digest()

        if response.status_code >= 400:
            try:
                answer = response.json()
                message = answer.get("error", response.text) if isinstance(answer, dict) else response.text
            except ValueError:
                message = response.text[:200]
            raise ServerError(
                f"{method} {redact_url(url)} returned {response.status_code}: {message}",
                status=response.status_code,
            )

        try:
            answer = response.json()
        except ValueError:
            raise ServerError(f"{method} {redact_url(url)} returned a body that is not JSON") from None
        if not isinstance(answer, dict):
            raise ServerError(f"{method} {redact_url(url)} returned JSON that is not an object")
        return answer

    def register(self, push_url: Optional[str], outbox: Optional[dict] = None) -> dict:
        # `clock` is read last, just before sending, so that the server's offset
        # estimate includes as little of the agent's own delay as possible.
        body = dict({
            "hostname": socket.gethostname(),
            "platform": f"{platform.system()} {platform.release()} {platform.machine()}".strip(),
            "version": __version__,
            "push_url": push_url,
            "labels": self.labels,
        }, **(outbox or {}))
        body["clock"] = format_time(dt.datetime.now(UTC))
        return self._request("PUT", f"/api/v1/agents/{self.agent_id}", body)

    def fetch_tasks(self, only_if_changed: bool = False) -> Optional[list[Task]]:
        """Fetch the agent's task list.

        With `only_if_changed`, return None when the response body is byte for byte the one
        of the previous call, so an unchanged list of thousands of tasks is not parsed again.
        """
        body = self._request("GET", f"/api/v1/agents/{self.agent_id}/tasks")
        digest = getattr(self._response, "digest", None)
        if only_if_changed and digest is not None and digest == self._task_list_digest:
            return None
        self._task_list_digest = digest
        items = body.get("tasks")
        if not isinstance(items, list):
            raise ServerError(f"the task list from {redact_url(self.base_url)} has no list of tasks")
        tasks = []
        manual_runs = []
        for item in items:
            try:
                task = Task.from_json(item)
            except ValueError as error:
                log.error("server sent a task that is not valid, skipped: %s", error)
                continue
            tasks.append(task)
            manual_runs += _manual_runs_of(task.task_id, item.get("manual_runs"))
        self.manual_runs = manual_runs
        return tasks

    def forget_task_list(self) -> None:
        """Make the next fetch_tasks(only_if_changed=True) parse the list even if unchanged."""
        self._task_list_digest = None

    def complete(self, task_id: str, payload: dict) -> dict:
        body = dict(payload, server_id=self.agent_id)
        return self._request("POST", f"/api/v1/tasks/{urllib.parse.quote(task_id, safe='')}/complete", body)


def _manual_runs_of(task_id: str, items: object) -> list[tuple[str, str, dt.datetime]]:
    """Return the valid entries of a task's `manual_runs` list; log and skip the others."""
    if items is None:
        return []
    if not isinstance(items, list):
        log.error("task %s: manual_runs is not a list, ignored", task_id)
        return []
    runs = []
    for item in items:
        run_id = item.get("run_id") if isinstance(item, dict) else None
        try:
            if not isinstance(run_id, str) or not TASK_ID_PATTERN.fullmatch(run_id):
                raise ValueError(f"run_id {run_id!r} is not 1-64 letters, digits, '.', '_' or '-'")
            requested_at = parse_time(item.get("requested_at"))
        except ValueError as error:
            log.error("task %s: manual run entry ignored: %s", task_id, error)
            continue
        runs.append((task_id, run_id, requested_at))
    return runs


def manual_run_key(task_id: str, run_id: str) -> str:
    """Return the `runs` table key of a manual run.

    It differs from every task id ('@' is not allowed in one), so a manual run never
    counts as a handled slot of its task.
    """
    return f"{task_id}{MANUAL_RUN_SEPARATOR}{run_id}"


MANUAL_RUN_SEPARATOR = "@"


class Backoff:
    """Capped exponential backoff with full jitter; `reset` after a success."""

    def __init__(self, initial: float = 1.0, maximum: float = 60.0):
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class ReportSender:
    """Sends finished runs from the outbox to the server until each is acknowledged.

    A run leaves the outbox only when the server accepted it (2xx) or rejected it for
    good (4xx other than 401, 408 and 429, for example a task that was deleted). A 401
    keeps it, because the agent can still enroll or be given a valid token.
    """

    BATCH_DELAY_SECONDS = 0.5

    # Maximum seconds a batch of reports waits for starting commands (see StartGate).
    MAX_START_WAIT_SECONDS = 0.25

    def __init__(self, store: StateStore, client: ServerClient, gate: Optional["StartGate"] = None):
        self.store = store
        self.client = client
        self._gate = gate
        self.backoff = Backoff()
        self._wakeup = threading.Event()
        self._server_back = threading.Event()

    def notify(self) -> None:
        self._wakeup.set()

    def send_pending(self) -> bool:
        """Send every unreported run once; return False if the server could not be reached."""
        while True:
            # Reports give way to starting commands (see StartGate).
            if self._gate is not None:
                self._gate.wait_until_idle(self.MAX_START_WAIT_SECONDS)
            batch = self.store.unreported()
            if not batch:
                return True
            for task_id, slot_key, payload in batch:
                # The outbox bound may have dropped this report since the batch was read.
                if self.store.is_unsent(task_id, slot_key) and not self._send(task_id, slot_key, payload):
                    return False

    def _send(self, task_id: str, slot_key: str, payload: dict) -> bool:
        """Send one report and take it out of the outbox; return False if it must be sent again later."""
        report_task_id, _, manual_run_id = task_id.partition(MANUAL_RUN_SEPARATOR)
        if manual_run_id:
            payload = dict(payload, trigger="manual", manual_run_id=manual_run_id)
        try:
            self.client.complete(report_task_id, payload)
        except ServerError as error:
            rejected = error.status is not None and 400 <= error.status < 500 \
                and error.status not in (401, 408, 429)
            if not rejected:
                log.warning("report of task %s slot %s not sent, will retry: %s",
                            task_id, payload.get("scheduled_for"), error)
                return False
            log.warning("report of task %s slot %s rejected, dropped: %s",
                        task_id, payload.get("scheduled_for"), error)
            self.store.mark_reported(task_id, slot_key)
            return True

        self.store.mark_reported(task_id, slot_key, delivered=True)
        return True

    def server_reachable(self) -> None:
        """Cut a retry wait short: a sync just reached the server."""
        self._server_back.set()
        self._wakeup.set()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wakeup.clear()
            self._server_back.clear()
            try:
                sent = self.send_pending()
            except Exception:
                # The reports stay in the outbox, so a later turn sends them.
                log.exception("sending reports failed inside the agent; retrying")
                sent = False
            if sent:
                self.backoff.reset()
                if self._wakeup.wait(30.0):
                    # Reports wait a moment, so a burst of slots starting together is not
                    # slowed by their sending, and they go out in one batch.
                    stop.wait(self.BATCH_DELAY_SECONDS)
            else:
                # New results do not end this wait, or an outage would retry at their pace.
                self._server_back.wait(self.backoff.next_delay())


class ResultWriter:
    """Writes finished runs and the process groups of started runs on a thread of its own.

    A worker hands its result over and is free for the next run at once. Results that
    arrive while a write is going share the next transaction, so a burst of runs pays
    for a few fsyncs, not one each. Before it writes results the thread waits, for at
    most `MAX_START_WAIT_SECONDS`, until no run is starting (see StartGate). Process
    groups are written without that wait. A result still queued when the agent is
    killed is lost with it, and its run is reported as lost at the next start, as for a
    kill during the run.
    """

    # Runs queued behind --max-concurrent-runs count as starting, so a full agent would
    # hold results back for good without this bound.
    MAX_START_WAIT_SECONDS = 0.25

    def __init__(self, store: StateStore, on_written: Callable[[], None], gate: Optional[StartGate] = None):
        self.store = store
        self._on_written = on_written
        self._gate = gate
        self._queue: "queue.SimpleQueue[RunResult | ProcessGroup | None]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()

    def submit(self, item: "RunResult | ProcessGroup") -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_forever, name="results", daemon=True)
                self._thread.start()
        self._queue.put(item)

    def close(self) -> None:
        """Write every result submitted so far, then end the thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _write_forever(self) -> None:
        while True:
            batch = self._take([self._queue.get()])
            # Process groups do not wait for the gate: until one is stored, a kill of the
            # agent leaves its run's processes behind. Their write has no fsync.
            self._write_groups([item for item in batch if isinstance(item, ProcessGroup)])
            results = [item for item in batch if isinstance(item, RunResult)]
            if results and batch[-1] is not None and self._gate is not None:
                self._gate.wait_until_idle(self.MAX_START_WAIT_SECONDS)
                later = self._take([])
                self._write_groups([item for item in later if isinstance(item, ProcessGroup)])
                results += [item for item in later if isinstance(item, RunResult)]
                batch += later
            if results:
                self._write(results)
            if batch and batch[-1] is None:
                return

    def _take(self, batch: list) -> list:
        """Append the queued items to `batch` without blocking, up to the end mark (None)."""
        while not batch or batch[-1] is not None:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write_groups(self, groups: list[ProcessGroup]) -> None:
        if not groups:
            return
        try:
            self.store.record_process_groups(groups)
        except Exception:
            # Only the clean-up of leftover processes after a kill of the agent needs them.
            log.exception("could not store the process groups of %d runs: %s", len(groups),
                          ", ".join(f"task {group.task_id} slot {format_time(group.slot)}"
                                    for group in groups))

    def _write(self, results: list[RunResult]) -> None:
        try:
            self.store.record_finishes(results)
        except Exception:
            # The runs stay recorded as started, so the next start reports them as lost.
            log.exception("could not store the results of %d runs: %s", len(results),
                          ", ".join(f"task {result.task_id} slot {format_time(result.scheduled_for)}"
                                    for result in results))
            return
        self._on_written()


# ---------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------


class Agent:
    """Ties the parts together: sync with the server, fire tasks, run them, report."""

    # Pruning old run records keeps the store's lock for about 10 ms with 1,000 tasks, so
    # it runs after a sync at most this often, not after every one.
    PRUNE_INTERVAL_SECONDS = 300.0
    # Maximum seconds a sync waits for starting commands (see StartGate).
    MAX_SYNC_START_WAIT_SECONDS = 0.25

    def __init__(self, server_url: "str | list[str]", state_dir: str, agent_id: Optional[str] = None,
                 push_url: Optional[str] = None, sync_interval: float = 5.0,
                 max_concurrent_runs: int = 16, when_busy: str = "queue",
                 work_dir: Optional[str] = None, clock: Optional[Clock] = None,
                 outbox_size: int = 10000, enrollment_token: Optional[str] = None,
                 verify: "bool | str" = True):
        self.clock = clock or Clock()
        self.store = StateStore(state_dir, outbox_size=outbox_size)
        self.agent_id = self._resolve_id(agent_id)
        self.push_url = push_url
        self.sync_interval = sync_interval
        self.max_concurrent_runs = max_concurrent_runs
        self.when_busy = when_busy
        self.client = ServerClient(server_url, self.agent_id,
                                   credentials_path=os.path.join(state_dir, CREDENTIALS_FILE),
                                   enrollment_token=enrollment_token, verify=verify)
        self.push_verifier = PushVerifier()
        self._sync_requested = threading.Event()
        self.runner = Runner(self.agent_id, work_dir or os.path.join(state_dir, "work"), clock=self.clock)
        # Background work (writes, syncs, reports) gives way to starting commands.
        self.start_gate = StartGate()
        self.sender = ReportSender(self.store, self.client, self.start_gate)
        self.results = ResultWriter(self.store, self.sender.notify, self.start_gate)
        self.scheduler = TaskScheduler(self.store, self.start_run, missed=self.record_missed,
                                       clock=self.clock, max_sleep=max(sync_interval, 1.0),
                                       agent_id=self.agent_id, batch=self.start_batch,
                                       gate=self.start_gate)
        # Runs that start_run accepted during a start_batch, waiting for their start records.
        self._batched_runs: Optional[list[tuple[RunHandle, bool]]] = None
        self.pool = ThreadPoolExecutor(max_workers=max_concurrent_runs, thread_name_prefix="run")
        self.stop_event = threading.Event()
        self._running: dict[str, list[RunHandle]] = {}
        self._active_runs = 0
        self._running_lock = threading.Lock()
        self._registered = False
        self._sync_backoff = Backoff(initial=sync_interval, maximum=max(60.0, sync_interval))
        self._pruned_at = -math.inf

    def _resolve_id(self, requested: Optional[str]) -> str:
        stored = self.store.get_meta("agent_id")
        if requested is not None:
            if not AGENT_ID_PATTERN.fullmatch(requested):
                raise ValueError(
                    f"invalid agent id {requested!r}: use 1-64 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit"
                )
            if stored and stored != requested:
                log.warning("agent id changes from %s to %s as requested by --id", stored, requested)
            self.store.set_meta("agent_id", requested)
            return requested
        if stored:
            return stored
        hostname = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:40] or "agent"
        generated = f"{hostname}-{uuid.uuid4().hex[:8]}"
        self.store.set_meta("agent_id", generated)
        log.info("generated agent id %s", generated)
        return generated

    # Runs ------------------------------------------------------------------

    def start_run(self, task: Task, slot: dt.datetime, late: bool = False) -> None:
        """Start a due slot in a worker thread, or record why it is skipped.

        Called on the loop thread. It hands the command to the worker pool and does not
        wait for it.
        """
        with self._running_lock:
            # A run whose shell exited (its output may still be read) or whose time limit
            # ends by this slot does not count.
            going = [handle for handle in self._running.get(task.task_id, ())
                     if not handle.exited and (handle.deadline is None or handle.deadline > slot)]
            busy = self._active_runs >= self.max_concurrent_runs
        if going and task.overlap == "skip":
            self._record_skipped(task, slot, "the previous run was still going")
            return
        if busy and self.when_busy == "skip":
            self._record_skipped(task, slot, f"the agent was busy with {self.max_concurrent_runs} runs")
            return
        if not self.store.claim_slot(task.task_id, slot):
            log.info("task %s slot %s already ran, not repeated", task.task_id, format_time(slot))
            return
        if going and task.overlap == "replace":
            for handle in going:
                log.info("task %s slot %s stopped: slot %s replaces it",
                         task.task_id, format_time(handle.slot), format_time(slot))
                handle.cancel()
        if busy:
            log.info("task %s slot %s queued: %d runs are going", task.task_id, format_time(slot),
                     self.max_concurrent_runs)

        def started(process_group: int) -> None:
            self.results.submit(ProcessGroup(task.task_id, slot, process_group))
            handle.leave_gate()

        handle = RunHandle(task, slot, on_start=started, gate=self.start_gate)
        with self._running_lock:
            self._running.setdefault(task.task_id, []).append(handle)
            self._active_runs += 1
        # A run that waits for a free worker records its start when it gets one.
        if self._batched_runs is not None and not busy:
            self._batched_runs.append((handle, late))
            return
        handle.future = self.pool.submit(self._run, handle, late)

    @contextlib.contextmanager
    def start_batch(self):
        """Hold back the runs that start_run accepts until the block ends, then record all
        their starts in one transaction and hand them to the workers.

        The loop thread fires every due task in one batch: the workers of a burst then
        start their commands at once instead of taking turns at the store.
        """
        self._batched_runs = []
        try:
            yield
        finally:
            batch, self._batched_runs = self._batched_runs, None
            if batch:
                self._submit_batch(batch)

    def _submit_batch(self, batch: list[tuple[RunHandle, bool]]) -> None:
        try:
            inserted = self.store.record_starts([(handle.task.task_id, handle.slot) for handle, _late in batch])
        except Exception:
            log.exception("could not record the start of %d runs; they do not run: %s", len(batch),
                          ", ".join(f"task {handle.task.task_id} slot {format_time(handle.slot)}"
                                    for handle, _late in batch))
            inserted = [None] * len(batch)
        for (handle, late), fresh in zip(batch, inserted):
            if fresh:
                handle.future = self.pool.submit(self._run, handle, late, True)
                continue
            if fresh is False:
                log.info("task %s slot %s already ran, not repeated", handle.task.task_id,
                         format_time(handle.slot))
            self._forget_run(handle)

    def start_manual_runs(self, tasks: list[Task], manual_runs: list[tuple[str, str, dt.datetime]]) -> None:
        """Start each manual run that this agent has not started before, once.

        A manual run is recorded in the `runs` table under its own key before it starts,
        so it runs once across syncs and restarts, and its report goes through the
        outbox like any other. It ignores the task's `overlap` policy and counts
        towards `--max-concurrent-runs`. Its `TASKSCHEDULER_SCHEDULED_FOR` is the
        request instant.

        NOTE: `prune_runs` keeps the newest rows per key, and each manual run has a key of
        its own, so the row of every manual run stays in `agent.db` (one small row each).
        """
        by_id = {task.task_id: task for task in tasks}
        for task_id, run_id, requested_at in manual_runs:
            task = by_id.get(task_id)
            key = manual_run_key(task_id, run_id)
            if task is None or not self.store.record_start(key, requested_at):
                continue
            log.info("task %s manual run %s requested at %s starts", task_id, run_id,
                     format_time(requested_at))
            self.pool.submit(self._run_manual, task, key, requested_at)

    def _run_manual(self, task: Task, key: str, requested_at: dt.datetime) -> None:
        try:
            result = self.runner.run(task, requested_at, RunHandle(task, requested_at))
            result.task_id = key
            log.info("task %s %s: exit code %s", key, result.status, result.exit_code)
            self.results.submit(result)
        except Exception:
            log.exception("task %s: the manual run failed inside the agent", key)

    def _record_skipped(self, task: Task, slot: dt.datetime, reason: str) -> None:
        now = self.clock.now()
        recorded = self.store.record_outcome(RunResult(
            task_id=task.task_id, scheduled_for=slot, started_at=None, finished_at=now,
            exit_code=None, status="skipped", reason=reason,
        ))
        if recorded:
            log.warning("task %s slot %s skipped: %s", task.task_id, format_time(slot), reason)
            self.sender.notify()

    def record_missed(self, task: Task, first: dt.datetime, last: dt.datetime, count: int) -> None:
        """Record slots that could not start in time as one missed report."""
        recorded = self.store.record_outcome(RunResult(
            task_id=task.task_id, scheduled_for=last, started_at=None, finished_at=self.clock.now(),
            exit_code=None, status="missed", missed_slots=count, first_missed=first,
            reason="the agent could not start these slots in time (stopped, asleep, blocked "
                   "or the clock jumped)",
        ))
        if recorded:
            log.warning("task %s: slots missed: %d, from %s to %s", task.task_id, count,
                        format_time(first), format_time(last))
            self.sender.notify()

    def _run(self, handle: RunHandle, late: bool, recorded: bool = False) -> None:
        task, slot = handle.task, handle.slot
        try:
            # A run outside a start batch records its start here; the loop already
            # claimed the slot in memory.
            if not recorded and not self.store.record_start(task.task_id, slot):
                log.info("task %s slot %s already ran, not repeated", task.task_id, format_time(slot))
                return
            result = self.runner.run(task, slot, handle)
            result.late = late
            duration = (result.finished_at - result.started_at).total_seconds() if result.started_at else 0.0
            lag = (result.started_at - slot).total_seconds() * 1000 if result.started_at else 0.0
            log.info("task %s slot %s %s: exit code %s, %.3f s, start lag %.1f ms%s",
                     task.task_id, format_time(slot), result.status, result.exit_code, duration,
                     lag, " (late)" if late else "")
            self.results.submit(result)
        except Exception:
            log.exception("task %s slot %s: the run failed inside the agent",
                          task.task_id, format_time(slot))
        finally:
            self._forget_run(handle)

    def _forget_run(self, handle: RunHandle) -> None:
        """Remove a run that ended, or never started, from the running runs."""
        handle.leave_gate()
        with self._running_lock:
            handles = self._running.get(handle.task.task_id, [])
            if handle in handles:
                handles.remove(handle)
            if not handles:
                self._running.pop(handle.task.task_id, None)
            self._active_runs -= 1

    # Sync ------------------------------------------------------------------

    def request_sync(self) -> None:
        """Make the sync thread sync now, for a push wake-up. Requests made during a sync
        lead to one more sync, not one each."""
        self._sync_requested.set()

    def sync_once(self) -> bool:
        """Register (or heartbeat) and fetch the full task list; return whether it worked."""
        try:
            self.client.register(self.push_url, self.store.outbox_stats())
            if not self._registered:
                log.info("registered with %s as agent %s", redact_url(self.client.base_url), self.agent_id)
                self._registered = True
            tasks = self.client.fetch_tasks(only_if_changed=True)
        except ServerError as error:
            log.warning("sync with %s failed, running the stored task list: %s",
                        redact_url(self.client.base_url), error)
            return False
        if tasks is not None:
            changed = self.store.replace_tasks(tasks)
            log.debug("sync: %d tasks, changed: %s", len(tasks), changed)
            self.scheduler.request_reconcile(tasks)
            self.start_manual_runs(tasks, self.client.manual_runs)
        monotonic = time.monotonic()
        if monotonic - self._pruned_at >= self.PRUNE_INTERVAL_SECONDS:
            self._pruned_at = monotonic
            self.store.prune_runs()
        self.sender.server_reachable()
        return True

    def sync_forever(self) -> None:
        while not self.stop_event.is_set():
            # Cleared before the sync, so a wake-up that arrives during it leads to one more.
            self._sync_requested.clear()
            self.start_gate.wait_until_idle(self.MAX_SYNC_START_WAIT_SECONDS)
            try:
                synced = self.sync_once()
            except Exception:
                # Sync goes on after any failure of one attempt (a full disk, a bad response).
                log.exception("sync failed inside the agent; retrying")
                synced = False
            if synced:
                self._sync_backoff.reset()
                self._sync_requested.wait(self.sync_interval)
            else:
                # Wake-ups do not cut a backoff short, so they cannot hammer a failing server.
                self.stop_event.wait(self._sync_backoff.next_delay())

    # Lifecycle -------------------------------------------------------------

    def start_background_threads(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self.sync_forever, name="sync", daemon=True),
            threading.Thread(target=self.sender.run_forever, args=(self.stop_event,),
                             name="report", daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads

    def run(self) -> None:
        """Run until `stop()` is called: plan the stored tasks, then sync and fire."""
        stored = self.store.tasks()
        log.info("agent %s starting with %d stored tasks", self.agent_id, len(stored))
        for task_id, slot, process_group in self.store.mark_lost_runs(self.clock.now()):
            killed = 0
            if process_group is not None and not ON_WINDOWS:
                killed = kill_orphaned_run(process_group, task_id, slot)
            log.warning("task %s slot %s was still running when the agent last stopped: reported "
                        "as lost, %d leftover processes killed", task_id, format_time(slot), killed)
        # The server's task list comes first, so that a task deleted or paused while the
        # agent was stopped does not run again. The stored list is the fallback for a
        # server that cannot be reached.
        try:
            synced = self.sync_once()
        except Exception:
            log.exception("first sync failed inside the agent")
            synced = False
        if not synced:
            log.info("running the %d stored tasks until the server can be reached", len(stored))
            self.scheduler.request_reconcile(stored)
        threads = self.start_background_threads()
        self.scheduler.run_forever(self.stop_event)
        log.info("agent %s stopping; waiting for running commands", self.agent_id)
        self._skip_queued_runs()
        self.wait_for_runs()
        # The sync and report threads use the store, so they end before it closes. Each
        # finishes its current request, which the client's timeout bounds.
        self.sender.notify()
        for thread in threads:
            thread.join(self.client.timeout * 2 + 5)
        self.sender.send_pending()
        self.store.close()
        log.info("agent %s stopped", self.agent_id)

    def _skip_queued_runs(self) -> None:
        """Record runs still waiting for a worker as skipped, so a stop starts no command."""
        with self._running_lock:
            handles = [handle for handles in self._running.values() for handle in handles]
        for handle in handles:
            if handle.future is not None and handle.future.cancel():
                handle.leave_gate()
                self.store.record_finish(RunResult(
                    task_id=handle.task.task_id, scheduled_for=handle.slot, started_at=None,
                    finished_at=self.clock.now(), exit_code=None, status="skipped",
                    reason="the agent stopped before the run could start",
                ))
                log.info("task %s slot %s skipped: the agent is stopping",
                         handle.task.task_id, format_time(handle.slot))

    def wait_for_runs(self) -> None:
        """Wait until every run handed to the workers has finished and its result is stored."""
        self.pool.shutdown(wait=True)
        self.results.close()

    def stop(self) -> None:
        self.stop_event.set()
        self._sync_requested.set()
        self.scheduler.wake()


# ---------------------------------------------------------------------------
# Push listener
# ---------------------------------------------------------------------------


WAKEUP_PATH = "/api/v1/sync"
PUSH_TIMESTAMP_HEADER = "X-Taskscheduler-Timestamp"
PUSH_NONCE_HEADER = "X-Taskscheduler-Nonce"
PUSH_SIGNATURE_HEADER = "X-Taskscheduler-Signature"
NONCE_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")


def push_signature(secret: str, timestamp: str, nonce: str, body: bytes) -> str:
    """Return the hex HMAC-SHA256 of a wake-up under the agent's push secret.

    The message is the timestamp (Unix seconds), the nonce and the body, joined by
    newlines, so none of them can be changed or moved to another request.
    """
    message = timestamp.encode("ascii") + b"\n" + nonce.encode("ascii") + b"\n" + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


class PushVerifier:
    """Checks the signature, age and nonce of signed wake-ups.

    A wake-up is accepted when its timestamp is within `window` seconds of this host's
    clock, in either direction, so the server's and agent's clocks must agree to within
    that. Its nonce is remembered for twice the window, which covers every timestamp
    still accepted, so a captured wake-up cannot be sent again.
    """

    MAX_NONCES = 10000

    def __init__(self, window: float = 60.0):
        self.window = window
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, headers, body: bytes, secret: str, now: Optional[float] = None) -> Optional[str]:
        """Return why the wake-up is rejected, or None when it is authentic and new."""
        now = time.time() if now is None else now
        timestamp = headers.get(PUSH_TIMESTAMP_HEADER)
        nonce = headers.get(PUSH_NONCE_HEADER)
        signature = headers.get(PUSH_SIGNATURE_HEADER)
        if timestamp is None or nonce is None or signature is None:
            return (f"the wake-up is not signed: this agent requires the headers {PUSH_TIMESTAMP_HEADER}, "
                    f"{PUSH_NONCE_HEADER} and {PUSH_SIGNATURE_HEADER}")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            return f"{PUSH_TIMESTAMP_HEADER} must be whole Unix seconds"
        if not NONCE_PATTERN.fullmatch(nonce):
            return f"{PUSH_NONCE_HEADER} must be 16-64 letters, digits, '-' or '_'"

        expected = push_signature(secret, timestamp, nonce, body)
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii", "replace")):
            return "the wake-up's signature is not valid for this agent's push secret"
        age = now - int(timestamp)
        if age > self.window:
            return f"the wake-up is {age:.0f} s old, more than the {self.window:g} s allowed"
        if age < -self.window:
            return (f"the wake-up is dated {-age:.0f} s in the future, more than the "
                    f"{self.window:g} s allowed; check both hosts' clocks")

        with self._lock:
            for seen_nonce, expiry in list(self._seen.items()):
                if expiry <= now:
                    del self._seen[seen_nonce]
            if nonce in self._seen:
                return "the wake-up was already received once (replayed nonce)"
            if len(self._seen) >= self.MAX_NONCES:
                return "too many wake-ups within the last two minutes; retry later"
            self._seen[nonce] = now + 2 * self.window
        return None


# C0 and C1 control characters and the Unicode line and paragraph separators.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object) -> str:
    """Return `value` as text for a log line, with control characters escaped as Python does.

    A line feed becomes the two characters `\\n`, so a value sent by a client cannot start
    a forged log line.
    """
    return CONTROL_CHARACTERS.sub(lambda match: ascii(match.group())[1:-1], str(value))


class EscapingFormatter(logging.Formatter):
    """A log formatter that escapes control characters in every message (see `printable`).

    Tracebacks are appended after the escaping and keep their line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - name fixed by the base class
        record.message = printable(record.message)
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    """Send log records of `level` and above to stderr, one escaped line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


class PushHandler(http.server.BaseHTTPRequestHandler):
    """Accepts `POST /api/v1/sync`, the server's wake-up, and makes the agent sync now.

    A wake-up carries no task: the agent fetches its task list from the server, with its
    own token, as at every sync. An enrolled agent accepts only wake-ups signed with its
    push secret. An agent without one (its server runs without tokens) accepts unsigned
    wake-ups, which let a caller trigger a sync and nothing else.
    """

    agent: Agent  # set on the subclass made by `start_push_listener`
    server_version = f"taskscheduler-agent/{__version__}"
    MAX_BODY_BYTES = 64 * 1024

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - name fixed by the base class
        # The request line and headers come from the caller, so their control characters
        # are escaped before they reach the log.
        log.debug("push listener: %s", printable(format % args))

    def _send_json(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - name fixed by the base class
        if self.path != WAKEUP_PATH:
            self._send_json(404, {"error": f"no endpoint at {self.path}; use POST {WAKEUP_PATH}"})
            return
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            self._send_json(415, {"error": "send the body as JSON with the header "
                                           "Content-Type: application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > self.MAX_BODY_BYTES:
            self._send_json(413, {"error": f"body must be 0-{self.MAX_BODY_BYTES} bytes"})
            return
        body = self.rfile.read(length)
        secret = self.agent.client.push_secret
        if secret is not None:
            refusal = self.agent.push_verifier.check(self.headers, body, secret)
            if refusal is not None:
                log.warning("wake-up from %s rejected: %s", self.client_address[0], refusal)
                self._send_json(401, {"error": refusal})
                return
        try:
            data = json.loads(body or b"null")
        except (ValueError, RecursionError) as error:  # also UnicodeDecodeError for non-UTF-8
            self._send_json(400, {"error": f"body is not valid JSON: {error}"})
            return
        if not isinstance(data, dict):
            self._send_json(400, {"error": "body must be a JSON object"})
            return
        if data.get("agent_id") != self.agent.agent_id:
            self._send_json(400, {"error": f"the wake-up is for agent {data.get('agent_id')!r}, "
                                           f"not {self.agent.agent_id}", "field": "agent_id"})
            return
        log.info("wake-up from the server (%s), syncing now",
                 "signed" if secret is not None else "unsigned")
        self.agent.request_sync()
        self._send_json(202, {"agent_id": self.agent.agent_id, "result": "sync requested"})

    def do_GET(self) -> None:  # noqa: N802 - name fixed by the base class
        self._send_json(405, {"error": f"use POST {WAKEUP_PATH}"}, {"Allow": "POST"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET  # noqa: N815 - names fixed by the base class


def start_push_listener(agent: Agent, host: str, port: int) -> http.server.ThreadingHTTPServer:
    handler = type("BoundPushHandler", (PushHandler,), {"agent": agent})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="push", daemon=True).start()
    log.info("push listener on http://%s:%d%s", host, server.server_address[1], WAKEUP_PATH)
    return server


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def lock_state_dir(state_dir: str):
    """Take an exclusive lock on the state directory, or raise OSError if another agent has it.

    Two agents on one state directory would each take the other's running slots for
    lost runs. The lock is released when the returned file is closed or the process ends.
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "agent.lock")
    lock_file = open(path, "a+")
    try:
        if ON_WINDOWS:
            import msvcrt
            msvcrt.locking(lock_file.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.seek(0)
        owner = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise OSError(f"state directory {state_dir} is in use by another agent (pid {owner}); "
                      "give each agent its own --state-dir") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file


def redact_url(url: str) -> str:
    """Hide a password in a URL's user information, for logs."""
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]*@", r"\1***@", url)


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid --listen {value!r}: use HOST:PORT, such as 127.0.0.1:8081")
    return host.strip("[]"), int(port)


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a number of seconds above 0")
    return number


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a whole number of 1 or more")
    return int(value)


def is_loopback_host(host: str) -> bool:
    """Return whether `host` (a name or an address, IPv6 in brackets or not) is this host's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server_url(url: str, insecure: bool) -> Optional[str]:
    """Return why the agent must not use `url`, or None when it may."""
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        return f"invalid --server URL {url!r}: use http://HOST:PORT or https://HOST"
    if "\\" in url:
        return f"invalid --server URL {redact_url(url)}: it must not contain a backslash"
    parsed = urllib.parse.urlsplit(url)
    # requests connects to the host that urllib3 parses. Where the two parsers disagree,
    # the URL is rejected, so that the loopback check below tests the host that is used.
    try:
        connected_host = urllib3.util.parse_url(url).host
    except urllib3.exceptions.LocationParseError:
        connected_host = None
    if connected_host is None or connected_host.strip("[]").lower() != (parsed.hostname or "").lower():
        return f"invalid --server URL {redact_url(url)}: its host is ambiguous; use http://HOST:PORT or https://HOST"
    if parsed.scheme == "http" and not insecure and not is_loopback_host(parsed.hostname or ""):
        return (f"--server {redact_url(url)} uses plain HTTP to another host, which would send the "
                "agent's token and receive its commands unencrypted; use https://, or pass "
                "--insecure if the network is trusted")
    return None


def read_secret_file(path: str) -> str:
    """Return the token of the first line of `path` that is neither blank nor a '#' comment.

    The token is the line's first word, so a line of the server's token file, such as
    `TOKEN expires=2027-01-31T00:00:00Z`, gives the token alone.
    """
    with open(path, encoding="utf-8") as secret_file:
        for line in secret_file:
            if line.strip() and not line.strip().startswith("#"):
                return line.split()[0]
    raise ValueError(f"{path} contains no token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run taskscheduler's periodic shell commands on this host and report their output.",
        # Without this, --enrollment-token VALUE would be taken for --enrollment-token-file.
        allow_abbrev=False,
    )
    parser.add_argument("--server", default=os.environ.get("TASKSCHEDULER_SERVER"),
                        help="base URL of the taskscheduler server, such as http://127.0.0.1:8080; "
                             "several URLs separated by commas are tried in turn when one fails "
                             "(env TASKSCHEDULER_SERVER)")
    parser.add_argument("--state-dir", default=os.environ.get("TASKSCHEDULER_STATE_DIR", "agent-state"),
                        help="directory for the agent's id, task list and unsent reports "
                             "(env TASKSCHEDULER_STATE_DIR; default: ./agent-state)")
    parser.add_argument("--id", dest="agent_id", default=os.environ.get("TASKSCHEDULER_AGENT_ID"),
                        help="agent id, 1-64 letters, digits, '.', '_' or '-' (env TASKSCHEDULER_AGENT_ID; "
                             "default: the stored id, or HOSTNAME-RANDOM generated on first start)")
    parser.add_argument("--labels", default=os.environ.get("TASKSCHEDULER_AGENT_LABELS", ""),
                        metavar="NAME=VALUE[,NAME=VALUE...]",
                        help="labels that tasks select agents by, such as role=web,region=eu "
                             "(env TASKSCHEDULER_AGENT_LABELS; default: none)")
    parser.add_argument("--enrollment-token-file", metavar="PATH",
                        help="file holding the server's enrollment token, used to enroll when "
                             "the server requires tokens and again when the server rejects the "
                             "agent token as expired or revoked (env TASKSCHEDULER_ENROLLMENT_TOKEN "
                             "holds the token itself; default: none)")
    parser.add_argument("--ca-bundle", metavar="PATH",
                        help="CA certificates (PEM) that the server's TLS certificate is verified "
                             "against (default: the certifi bundle that requests ships)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain http:// to a server that is not on this host, and skip "
                             "verification of the server's TLS certificate (default: off)")
    parser.add_argument("--listen", type=parse_listen, metavar="HOST:PORT",
                        help="accept the server's wake-ups on this address (default: off; "
                             "the agent then gets tasks by pulling alone)")
    parser.add_argument("--advertise-url", metavar="URL",
                        help="URL the server uses to reach the push listener (default: http://HOST:PORT "
                             "from --listen)")
    parser.add_argument("--sync-interval", type=positive_float, default=5.0, metavar="SECONDS",
                        help="seconds between task list fetches from the server (default: 5)")
    parser.add_argument("--max-concurrent-runs", type=positive_int, default=16, metavar="N",
                        help="commands run at once at most; more wait in a queue (default: 16)")
    parser.add_argument("--when-busy", choices=["queue", "skip"], default="queue",
                        help="what happens to a slot when --max-concurrent-runs commands are "
                             "running: wait in a queue, or skip it and report it skipped "
                             "(default: queue)")
    parser.add_argument("--outbox-size", type=positive_int, default=10000, metavar="N",
                        help="reports kept while the server is unreachable; beyond this the oldest "
                             "are dropped with a warning (default: 10000)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="working directory of every command (default: STATE_DIR/work)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level for messages on stderr (default: INFO)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if not args.server:
        print("agent.py: error: --server is required (or set TASKSCHEDULER_SERVER)", file=sys.stderr)
        return 2
    server_urls = [url.strip() for url in args.server.split(",") if url.strip()]
    for url in server_urls:
        problem = check_server_url(url, args.insecure)
        if problem is not None:
            print(f"agent.py: error: {problem}", file=sys.stderr)
            return 2
    try:
        labels = parse_labels(args.labels)
    except TaskError as error:
        print(f"agent.py: error: --labels is invalid: {error}", file=sys.stderr)
        return 2
    # The first word of the first entry, as in read_secret_file, so the server's form
    # `TOKEN expires=...` works too.
    words = (os.environ.get("TASKSCHEDULER_ENROLLMENT_TOKEN") or "").split(",")[0].split()
    enrollment_token = words[0] if words else None
    # Commands inherit the agent's environment, and must not see the token.
    os.environ.pop("TASKSCHEDULER_ENROLLMENT_TOKEN", None)
    if args.enrollment_token_file:
        try:
            enrollment_token = read_secret_file(args.enrollment_token_file)
        except (OSError, ValueError) as error:
            print(f"agent.py: error: cannot read --enrollment-token-file: {error}", file=sys.stderr)
            return 2
    verify: "bool | str" = True
    if args.insecure:
        verify = False
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    elif args.ca_bundle:
        if not os.path.isfile(args.ca_bundle):
            print(f"agent.py: error: --ca-bundle {args.ca_bundle} is not a file", file=sys.stderr)
            return 2
        verify = args.ca_bundle

    push_url = args.advertise_url
    try:
        state_lock = lock_state_dir(args.state_dir)
    except OSError as error:
        print(f"agent.py: error: {error}", file=sys.stderr)
        return 2
    try:
        agent = Agent(server_urls, args.state_dir, agent_id=args.agent_id,
                      sync_interval=args.sync_interval,
                      max_concurrent_runs=args.max_concurrent_runs, when_busy=args.when_busy,
                      work_dir=args.work_dir, outbox_size=args.outbox_size,
                      enrollment_token=enrollment_token, verify=verify)
    except (ValueError, OSError, sqlite3.Error) as error:
        print(f"agent.py: error: {error}", file=sys.stderr)
        return 2

    listener = None
    if args.listen:
        host, port = args.listen
        try:
            listener = start_push_listener(agent, host, port)
        except OSError as error:
            print(f"agent.py: error: cannot listen on {host}:{port}: {error}", file=sys.stderr)
            return 2
        if push_url is None:
            bound_port = listener.server_address[1]
            shown_host = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
            shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
            push_url = f"http://{shown_host}:{bound_port}"
    agent.push_url = push_url
    agent.client.labels = labels

    log.info("agent %s: servers %s, state dir %s, push URL %s, labels %s, sync every %.1f s, "
             "at most %d runs at once (%s beyond), outbox size %d, TLS verification %s, %s",
             agent.agent_id,
             ", ".join(redact_url(url) for url in server_urls),
             os.path.abspath(args.state_dir), push_url or "none",
             ",".join(f"{name}={value}" for name, value in sorted(labels.items())) or "none",
             args.sync_interval,
             args.max_concurrent_runs, args.when_busy, args.outbox_size,
             "off (--insecure)" if verify is False else f"against {verify}" if verify is not True
             else "on", "enrolled" if agent.client.credentials is not None
             else "enrollment token given" if enrollment_token else "no credentials")

    def request_stop(signum, _frame):
        log.info("received signal %d", signum)
        agent.stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    agent.run()
    if listener is not None:
        listener.shutdown()
    state_lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
