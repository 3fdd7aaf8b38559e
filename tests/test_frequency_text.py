"""The dashboard's frequency words: intervals, macros and cron expressions in their zone."""

from __future__ import annotations

import pytest

from agent import FrequencyError
from frequency_text import describe_frequency


@pytest.mark.parametrize("frequency, timezone, words", [
    ("every 5 minutes", "UTC", "every 5 minutes"),
    ("every minute", "UTC", "every minute"),
    ("30s", "UTC", "every 30 seconds"),
    ("@every 10s", "UTC", "every 10 seconds"),
    ("1h30m", "UTC", "every 90 minutes"),
    ("every 2 hours", "UTC", "every 2 hours"),
    ("2d", "UTC", "every 2 days"),
    ("90s", "UTC", "every 90 seconds"),
    # Intervals count real seconds, so their zone is not shown.
    ("every 5 minutes", "Europe/Berlin", "every 5 minutes"),
])
def test_interval_words(frequency, timezone, words):
    assert describe_frequency(frequency, timezone) == words


@pytest.mark.parametrize("frequency, words", [
    ("@hourly", "every hour"),
    ("@daily", "at 00:00 every day (UTC)"),
    ("@midnight", "at 00:00 every day (UTC)"),
    ("@weekly", "at 00:00 on Sunday (UTC)"),
    ("@monthly", "at 00:00 on day 1 of the month (UTC)"),
    ("@yearly", "at 00:00 on 1 January (UTC)"),
])
def test_macro_words(frequency, words):
    assert describe_frequency(frequency) == words


@pytest.mark.parametrize("frequency, timezone, words", [
    ("0 9 * * MON-FRI", "Europe/Berlin", "at 09:00 on weekdays (Europe/Berlin)"),
    ("*/5 * * * *", "UTC", "every 5 minutes"),
    ("*/5 * * * *", "Asia/Kolkata", "every 5 minutes (Asia/Kolkata)"),
    ("* * * * *", "UTC", "every minute"),
    ("0 * * * *", "UTC", "every hour"),
    ("5/15 * * * *", "UTC", "at minutes 5, 20, 35 and 50 past every hour"),
    ("0,7,13,29,31,47,59 * * * *", "UTC", "at minutes 0,7,13,29,31,47,59 past every hour"),
    ("30 2 * * *", "America/New_York", "at 02:30 every day (America/New_York)"),
    ("0 9,17 * * *", "UTC", "at 09:00 and 17:00 every day (UTC)"),
    ("0,30 8-9 * * *", "UTC", "at 08:00, 08:30, 09:00 and 09:30 every day (UTC)"),
    ("0 9-17 * * *", "UTC", "every hour from 09:00 to 17:00 (UTC)"),
    ("*/10 9-17 * * 1-5", "America/New_York",
     "every 10 minutes from 09:00 to 17:59 on weekdays (America/New_York)"),
    ("* 3 * * *", "UTC", "every minute from 03:00 to 03:59 (UTC)"),
    ("0 */2 * * *", "UTC", "every 2 hours (UTC)"),
    ("30 */6 * * *", "UTC", "every 6 hours at minute 30 (UTC)"),
    ("0 1,5,9,13,17 * * *", "UTC", "at minute 0 past hours 01, 05, 09, 13 and 17 (UTC)"),
    ("0 0 1,15 * *", "UTC", "at 00:00 on days 1 and 15 of the month (UTC)"),
    ("0 0 * * 6,0", "UTC", "at 00:00 on weekends (UTC)"),
    ("0 0 * * SAT,SUN", "UTC", "at 00:00 on weekends (UTC)"),
    ("0 0 * * 7", "UTC", "at 00:00 on Sunday (UTC)"),
    ("0 8 * * 1-3", "UTC", "at 08:00 on Monday to Wednesday (UTC)"),
    ("0 8 * * MON,WED,FRI", "UTC", "at 08:00 on Monday, Wednesday and Friday (UTC)"),
    ("15 2 29 2 *", "UTC", "at 02:15 on 29 February (UTC)"),
    ("0 0 * JUN *", "UTC", "at 00:00 in June (UTC)"),
    ("0 0 1 */3 *", "UTC", "at 00:00 on day 1 of the month every 3 months (UTC)"),
])
def test_cron_words(frequency, timezone, words):
    assert describe_frequency(frequency, timezone) == words


def test_cron_with_both_day_fields_reads_or():
    # Vixie cron: with both day fields restricted, a day matches if either matches.
    assert describe_frequency("0 0 13 * 5") == "at 00:00 on day 13 of the month or on Friday (UTC)"


def test_invalid_frequency_raises():
    with pytest.raises(FrequencyError):
        describe_frequency("0 0 30 2 *")
