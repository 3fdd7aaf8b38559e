"""Run shell commands with the `schedule` library's usual loop, as a baseline for the agent.

For each `--job COUNT:SECONDS`, register COUNT jobs with `schedule.every(SECONDS).seconds`,
then loop `schedule.run_pending(); time.sleep(1)` for `--duration` seconds. Each job starts
`--command` through `/bin/sh -c` in a new thread, with two variables in its environment:

- TASKSCHEDULER_TASK_ID: the job's name, `job-N` for the first --job and `job-M-N` after it;
- TASKSCHEDULER_SCHEDULED_FOR: the instant the job became due, as RFC 3339 in UTC. This is
  the job's `next_run`, read inside the job function before `schedule` reschedules it.

The script prints `registered EPOCH_SECONDS` once all jobs are registered, and `finished`
when every command thread has ended. bench/start_lag.py starts it; it needs only the
standard library and `schedule`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import threading
import time
from typing import Optional

import schedule

UTC = dt.timezone.utc
# Seconds to wait for the command threads after the loop ends. Threads still running
# then make the script exit with code 1.
THREAD_JOIN_SECONDS = 30.0


class CommandJob:
    """The function of one `schedule` job, which starts the command in a thread with its due time."""

    def __init__(self, name: str, command: str, threads: list[threading.Thread]):
        self.name = name
        self.command = command
        self.threads = threads
        self.job: Optional[schedule.Job] = None

    def __call__(self) -> None:
        # schedule keeps `next_run` as naive local time, and astimezone reads a naive time as local.
        due = self.job.next_run.astimezone(UTC)
        environment = dict(os.environ)
        environment["TASKSCHEDULER_TASK_ID"] = self.name
        environment["TASKSCHEDULER_SCHEDULED_FOR"] = due.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        thread = threading.Thread(target=subprocess.run, args=(self.command,),
                                  kwargs={"shell": True, "env": environment}, daemon=True)
        thread.start()
        self.threads.append(thread)


def parse_job_spec(value: str) -> tuple[int, int]:
    count, separator, seconds = value.partition(":")
    if not separator or not count.isdigit() or not seconds.isdigit() \
            or int(count) < 1 or int(seconds) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid --job {value!r}: use COUNT:SECONDS with whole numbers of 1 or more, such as 20:1")
    return int(count), int(seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", dest="jobs", type=parse_job_spec, action="append", required=True,
                        metavar="COUNT:SECONDS",
                        help="register COUNT jobs that run every SECONDS seconds (repeatable)")
    parser.add_argument("--command", required=True,
                        help="shell command that every job starts through /bin/sh -c")
    parser.add_argument("--duration", type=float, required=True, metavar="SECONDS",
                        help="seconds to run the loop after registering the jobs")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads: list[threading.Thread] = []

    for group, (count, seconds) in enumerate(args.jobs):
        prefix = "job" if group == 0 else f"job-{group}"
        for index in range(count):
            command_job = CommandJob(f"{prefix}-{index:04d}", args.command, threads)
            command_job.job = schedule.every(seconds).seconds.do(command_job)
    print(f"registered {time.time():.6f}", flush=True)

    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        schedule.run_pending()
        time.sleep(1)
        threads[:] = [thread for thread in threads if thread.is_alive()]

    join_deadline = time.monotonic() + THREAD_JOIN_SECONDS
    for thread in threads:
        thread.join(max(join_deadline - time.monotonic(), 0))
    still_running = sum(thread.is_alive() for thread in threads)
    if still_running:
        print(f"error: {still_running} command threads still running after "
              f"{THREAD_JOIN_SECONDS:g} s", file=sys.stderr)
        return 1
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
