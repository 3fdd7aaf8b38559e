"""Measuring helpers of bench/start_lag.py: start records, lag statistics, /proc readings, floors.

They work on Linux only, because CPU time and memory come from /proc/PID/stat and
/proc/PID/status, and the probe command needs GNU date for `%N`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

UTC = dt.timezone.utc
SPAWN_FLOOR_SOURCE = Path(__file__).resolve().parent / "spawn_floor.c"
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# Lag statistics
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class LagStats:
    """Start lags in milliseconds. Percentiles use the nearest-rank method."""

    count: int
    minimum: float
    p50: float
    p99: float
    maximum: float


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def summarize(lags_ms: list[float]) -> Optional[LagStats]:
    if not lags_ms:
        return None
    ordered = sorted(lags_ms)
    return LagStats(len(ordered), ordered[0], percentile(ordered, 0.50),
                    percentile(ordered, 0.99), ordered[-1])


# ---------------------------------------------------------------------------
# CPU and memory of a process
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Usage:
    """A process's CPU use over a window, and its memory at the window's end."""

    cpu_percent: float  # of one core
    rss_mib: float
    peak_rss_mib: float


def read_cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time of all threads of `pid`, from /proc/PID/stat.

    Children's time is not included, so the commands a process starts do not count.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name in brackets may contain spaces, so split after its closing bracket.
    fields = text[text.rindex(")") + 2:].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / CLOCK_TICKS_PER_SECOND


def read_memory_mib(pid: int) -> tuple[float, float]:
    """Return (VmRSS, VmHWM) of `pid` in MiB, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024  # the kernel reports kB
    return values["VmRSS"], values["VmHWM"]


class UsageMeter:
    """Reads a process's CPU time at `start` and `stop`, and its memory at `stop`."""

    def __init__(self, pid: int):
        self.pid = pid
        self._cpu_start = 0.0
        self._wall_start = 0.0

    def start(self) -> None:
        self._cpu_start = read_cpu_seconds(self.pid)
        self._wall_start = time.monotonic()

    def stop(self) -> Usage:
        cpu = read_cpu_seconds(self.pid) - self._cpu_start
        wall = time.monotonic() - self._wall_start
        rss, peak = read_memory_mib(self.pid)
        return Usage(100.0 * cpu / wall, rss, peak)


# ---------------------------------------------------------------------------
# Start records
# ---------------------------------------------------------------------------


def probe_command(record_path: Path) -> str:
    """Return the shell command that appends `TASK_ID SLOT START_EPOCH` to `record_path`.

    `exec` makes the shell replace itself with `date`, so no extra process is forked.
    Task ids and RFC 3339 times contain no `%`, so date prints them as they are. Lines
    of concurrent commands do not mix, because each is one small O_APPEND write.
    """
    return ('exec date "+$TASKSCHEDULER_TASK_ID $TASKSCHEDULER_SCHEDULED_FOR %s.%N" >> '
            + shlex.quote(str(record_path)))


def rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """Return the epoch seconds of an RFC 3339 time with an offset or Z."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"  # fromisoformat accepts Z only from Python 3.11 on
    return dt.datetime.fromisoformat(text).timestamp()


@dataclasses.dataclass(frozen=True)
class StartRecord:
    """One command start: its task, its slot and when it started, in epoch seconds."""

    task_id: str
    slot: float
    start: float

    @property
    def lag_ms(self) -> float:
        return (self.start - self.slot) * 1000.0


def read_start_records(path: Path) -> list[StartRecord]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            print(f"warning: record line is not `TASK_ID SLOT START`, ignored: {line!r}")
            continue
        records.append(StartRecord(parts[0], parse_rfc3339(parts[1]), float(parts[2])))
    return records


def sleep_until(epoch: float) -> None:
    """Sleep until the wall clock reaches `epoch` (returns at once if it has)."""
    while True:
        remaining = epoch - time.time()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 5.0))


# ---------------------------------------------------------------------------
# Floors: the probe alone, and serial spawns
# ---------------------------------------------------------------------------


def measure_probe_floor(work_dir: Path, runs: int) -> Optional[LagStats]:
    """Start the probe command `runs` times from this process, as the agent's runner does.

    The slot is the wall-clock time just before `subprocess.Popen`, so the lag is what
    the spawn, the shell and `date` add with no scheduler in front of them.
    """
    record_path = work_dir / "probe-floor.txt"
    command = probe_command(record_path)
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("TASKSCHEDULER_")}
    for index in range(runs):
        slot = time.time()
        environment["TASKSCHEDULER_TASK_ID"] = f"floor-{index}"
        environment["TASKSCHEDULER_SCHEDULED_FOR"] = rfc3339(slot)
        process = subprocess.Popen(command, shell=True, env=environment, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the probe command failed with exit code {process.returncode}: "
                               f"{command}: {stderr.decode(errors='replace').strip()}")
    return summarize([record.lag_ms for record in read_start_records(record_path)])


def measure_group_floor(work_dir: Path, group_size: int, groups: int) -> Optional[LagStats]:
    """Start the probe command `group_size` times at once from this process, `groups` times.

    Each group shares one slot, taken just before the first `subprocess.Popen`, and the
    commands start one after another from one thread without waiting for each other. The
    lags are what starting that many commands at one instant costs with no scheduler in
    front of them: the floor for tasks that share a slot.
    """
    record_path = work_dir / f"probe-group-floor-{group_size}.txt"
    command = probe_command(record_path)
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("TASKSCHEDULER_")}
    for group in range(groups):
        slot = time.time()
        processes = []
        for index in range(group_size):
            environment["TASKSCHEDULER_TASK_ID"] = f"group-floor-{group}-{index}"
            environment["TASKSCHEDULER_SCHEDULED_FOR"] = rfc3339(slot)
            processes.append(subprocess.Popen(command, shell=True, env=environment,
                                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, start_new_session=True))
        for process in processes:
            _, stderr = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"the probe command failed with exit code {process.returncode}: "
                                   f"{command}: {stderr.decode(errors='replace').strip()}")
        time.sleep(0.2)
    return summarize([record.lag_ms for record in read_start_records(record_path)])


def measure_group_floor_c(work_dir: Path, group_size: int, groups: int) -> Optional[LagStats]:
    """Start the probe command `group_size` times at once with bench/spawn_floor.c, `groups` times.

    The same as `measure_group_floor`, from a small C program that only calls
    posix_spawn: what this machine needs to start that many commands at one instant
    whatever the language. Returns None, after saying why, where no C compiler or no
    posix_spawn is found.
    """
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        print("note: no C compiler (cc, gcc or clang) found; the C spawn floor is not measured")
        return None
    program = work_dir / "spawn_floor"
    build = subprocess.run([compiler, "-O2", "-o", str(program), str(SPAWN_FLOOR_SOURCE)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        print(f"note: {SPAWN_FLOOR_SOURCE.name} did not compile; the C spawn floor is not measured: "
              f"{build.stderr.strip()[:300]}")
        return None
    record_path = work_dir / f"probe-group-floor-c-{group_size}.txt"
    subprocess.run([str(program), str(group_size), str(groups), probe_command(record_path)], check=True)
    return summarize([record.lag_ms for record in read_start_records(record_path)])


def measure_serial_spawn_ms(count: int, repeats: int) -> list[float]:
    """Return the wall time in ms of `count` serial `subprocess.run(['/bin/sh', '-c', 'true'])`, per repeat."""
    totals = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(count):
            subprocess.run(["/bin/sh", "-c", "true"], check=True)
        totals.append((time.perf_counter() - started) * 1000.0)
    return totals
