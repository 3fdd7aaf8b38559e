"""Measure the agent's start lag: how long after its slot a command really starts.

Each scenario starts a real server and a real agent on 127.0.0.1 in a temporary directory,
creates tasks over HTTP, and lets every command record its own start time:

    exec date "+$TASKSCHEDULER_TASK_ID $TASKSCHEDULER_SCHEDULED_FOR %s.%N" >> FILE

Start lag is that recorded time minus the slot instant. The same command started by
`subprocess.Popen` straight from this script gives the floor of the method: the lag that
the spawn, the shell and `date` add on their own. Scenarios whose tasks share a slot also
start that many commands at once from a bare Python loop and from bench/spawn_floor.c,
which calls only posix_spawn (where a C compiler is installed).

Scenarios, chosen with `--scenario` (`all` runs one, thousand, burst and idle):

- one: one task `every 1 seconds`, 300 firings (60 with --quick).
- thousand: 1,000 tasks, of which 20 are `every 1 seconds` and 980 never come due during
  the run (`0 0 1 1 *`), over 20 slots (3 with --quick).
- twenty: the 20 tasks of `thousand` alone, to show what the 980 idle tasks add.
- burst: 200 tasks `every 10 seconds`, so 200 commands share each slot, over 3 slots (2
  with --quick), beside the serial spawn time of 200 `/bin/sh -c true` on this machine.
- idle: 1,000 tasks of which none comes due, and the agent's CPU use over 30 s (10 s with
  --quick), once with a sync interval of 1 s and once with the default 5 s.

The agent runs with --sync-interval 1. The lag scenarios also run the same jobs with the
`schedule` library's usual loop (bench/schedule_baseline.py) and print the ratio of the
p99 lags. Firings of the first 3 seconds after the tasks were created, and of the slot
they were created in, are left out. CPU use is the process's user + system time (all its
threads, not its commands) divided by the wall time of the measurement. Memory is its
VmRSS and VmHWM at the end. Linux only.

The benchmark prints figures and asserts no timing. Run it from the repository root:

    .venv/bin/python bench/start_lag.py [--scenario NAME] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from measure import (  # noqa: E402
    LagStats, StartRecord, Usage, UsageMeter, measure_group_floor, measure_group_floor_c, measure_probe_floor,
    measure_serial_spawn_ms,
    parse_rfc3339, probe_command, read_start_records, rfc3339, sleep_until, summarize,
)
from tests.processes import AgentProcess, Api, ServerProcess, child_environment  # noqa: E402

BASELINE_SCRIPT = ROOT / "bench" / "schedule_baseline.py"

# Firings of the first seconds after task creation are left out: the agent fetches its
# task list once per sync interval, so it may not know every task yet.
WARMUP_SECONDS = 3.0
# The agent is stopped at least this long after the last measured slot, so the commands
# of that slot have started. 1.5 s also keeps the stop away from the next 1-second slot.
SETTLE_SECONDS = 1.5
# A cron expression that comes due only at midnight UTC on January 1.
NEVER_DUE = "0 0 1 1 *"
AGENT_ID = "bench-agent"
SYNC_INTERVAL_SECONDS = 1.0
DEFAULT_SYNC_INTERVAL_SECONDS = 5.0
DEFAULT_MAX_CONCURRENT_RUNS = 16
PROBE_FLOOR_RUNS = 200
SERIAL_SPAWN_COUNT = 200
SERIAL_SPAWN_REPEATS = 3
IDLE_TASKS = 1000
# Scenarios with at most this many tasks due at once also measure the floor of starting
# that many commands at one instant. The burst has its serial spawn time instead.
GROUP_FLOOR_MAX_SIZE = 50
IDLE_SECONDS = 30.0
QUICK_IDLE_SECONDS = 10.0

# The agent's INFO line for each finished run, for example:
# task 3f1c... slot 2026-12-04T20:42:55Z succeeded: exit code 0, 0.002 s, start lag 1.2 ms
AGENT_RUN_LINE = re.compile(
    r"task (?P<task>\S+) slot (?P<slot>\S+) (?P<status>\w+): exit code \S+, [\d.]+ s, "
    r"start lag (?P<lag>-?[\d.]+) ms"
)
# Words of the agent's log lines for missed, skipped and queued slots.
MISSED_WORD = re.compile(r"\bmissed\b")
SKIPPED_WORD = re.compile(r"\bskipped\b")
QUEUED_WORD = re.compile(r"\bqueued\b")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A set of tasks: `due_tasks` fire every `period` seconds, `idle_tasks` never come due."""

    name: str
    description: str
    due_tasks: int
    period: int
    idle_tasks: int
    rounds: int
    quick_rounds: int

    def rounds_for(self, quick: bool) -> int:
        return self.quick_rounds if quick else self.rounds


SCENARIOS = {
    "one": Scenario("one", "one task every 1 seconds", 1, 1, 0, 300, 60),
    "thousand": Scenario("thousand", "1,000 tasks registered, 20 of them every 1 seconds",
                         20, 1, 980, 20, 3),
    "twenty": Scenario("twenty", "20 tasks every 1 seconds and nothing else", 20, 1, 0, 20, 3),
    "burst": Scenario("burst", "200 tasks every 10 seconds, all due at the same instant",
                      200, 10, 0, 3, 2),
}
ALL_SCENARIOS = ("one", "thousand", "burst", "idle")


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


class BenchAgentProcess(AgentProcess):
    """The tests' agent process with a chosen --max-concurrent-runs."""

    def __init__(self, *args, max_concurrent_runs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_concurrent_runs = max_concurrent_runs

    def arguments(self) -> list[str]:
        return super().arguments() + ["--max-concurrent-runs", str(self.max_concurrent_runs)]


class Cluster:
    """A server and one agent in `directory`, stopped by `stop`."""

    def __init__(self, directory: Path, sync_interval: float, max_concurrent_runs: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.server = ServerProcess(directory / "server.log", data_dir=directory / "server-data")
        self.agent = BenchAgentProcess(directory / "agent.log", self.server.url, directory / "agent-state",
                                       AGENT_ID, sync_interval=sync_interval,
                                       max_concurrent_runs=max_concurrent_runs)
        self.api: Optional[Api] = None

    def start(self) -> "Cluster":
        self.server.start()
        self.agent.start()
        self.api = Api(self.server.url)
        return self

    def agent_command_line(self) -> str:
        return "python " + " ".join(shlex.quote(argument) for argument in self.agent.arguments())

    def create_tasks(self, command: str, frequency: str, count: int) -> list[str]:
        return [self.api.create_task(command, frequency) for _ in range(count)]

    def stop(self) -> None:
        if self.api is not None:
            self.api.close()
        self.agent.stop()
        self.server.stop()


@dataclasses.dataclass
class AgentLog:
    """The agent log's start lags (slot to the Popen call), warnings and tracebacks."""

    own_lags_ms: dict[tuple[str, float], float]
    warnings: list[str]
    exceptions: list[str]
    missed: int
    skipped: int
    queued: int


def read_agent_log(text: str) -> AgentLog:
    own_lags = {}
    warnings = []
    exceptions = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = AGENT_RUN_LINE.search(line)
        if match:
            own_lags[(match["task"], parse_rfc3339(match["slot"]))] = float(match["lag"])
        elif " WARNING " in line or " ERROR " in line or " CRITICAL " in line:
            warnings.append(line)
        elif line.startswith("Traceback"):
            # The exception line is the first unindented line after the stack.
            following = (later for later in lines[index + 1:] if not later.startswith(" "))
            exceptions.append(next(following, "(no exception line)"))
    return AgentLog(own_lags, warnings, exceptions,
                    missed=sum(MISSED_WORD.search(line) is not None for line in warnings),
                    skipped=sum(SKIPPED_WORD.search(line) is not None for line in warnings),
                    queued=len(QUEUED_WORD.findall(text)))


# ---------------------------------------------------------------------------
# Scenario runs
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ScenarioRun:
    """The measured firings of one scenario, by the agent or by the baseline loop."""

    command_line: str
    records: list[StartRecord]
    expected: int
    usage: Usage
    duration_seconds: float
    agent_log: Optional[AgentLog] = None
    # Baseline only: how far a job's due instants slid beyond its interval, and the lag
    # measured from the nominal instants (first measured due instant + n * interval).
    drift_ms: Optional[float] = None
    nominal_lags_ms: list[float] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def stats(self) -> Optional[LagStats]:
        return summarize([record.lag_ms for record in self.records])

    @property
    def own_stats(self) -> Optional[LagStats]:
        """The agent's own start lags (slot to just before Popen) of the measured firings."""
        if self.agent_log is None:
            return None
        own = self.agent_log.own_lags_ms
        return summarize([own[(record.task_id, record.slot)] for record in self.records
                          if (record.task_id, record.slot) in own])

    def missing(self) -> int:
        return self.expected - len({(record.task_id, record.slot) for record in self.records})

    def duplicates(self) -> int:
        return len(self.records) - len({(record.task_id, record.slot) for record in self.records})

    def rounds(self) -> list[tuple[float, list[StartRecord]]]:
        """Group the firings by slot, oldest first."""
        groups: dict[float, list[StartRecord]] = {}
        for record in self.records:
            groups.setdefault(record.slot, []).append(record)
        return sorted(groups.items())


def run_agent(scenario: Scenario, rounds: int, directory: Path, max_concurrent_runs: int) -> ScenarioRun:
    """Run `scenario` on a fresh server and agent, and return the firings of the measured slots."""
    record_path = directory / "starts.txt"
    command = probe_command(record_path)
    cluster = Cluster(directory, SYNC_INTERVAL_SECONDS, max_concurrent_runs)
    try:
        cluster.start()
        # The never-due tasks first, so the due ones are the newest when the warm-up starts.
        cluster.create_tasks(command, NEVER_DUE, scenario.idle_tasks)
        due_ids = set(cluster.create_tasks(command, f"every {scenario.period} seconds", scenario.due_tasks))
        created = time.time()

        period = scenario.period
        first_slot = math.ceil((created + WARMUP_SECONDS) / period) * period
        last_slot = first_slot + (rounds - 1) * period
        # The CPU window covers whole periods: from half a period (at most 0.5 s) before the
        # first slot to the same point in the period after the last one.
        margin = min(0.5, period / 2)
        meter = UsageMeter(cluster.agent.process.pid)
        sleep_until(first_slot - margin)
        meter.start()
        sleep_until(last_slot + period - margin)
        usage = meter.stop()
        sleep_until(last_slot + SETTLE_SECONDS)
        if not cluster.agent.running():
            raise RuntimeError(f"the agent exited during the measurement\n{cluster.agent.log_tail()}")
    finally:
        cluster.stop()

    all_records = read_start_records(record_path)
    records = [record for record in all_records
               if record.task_id in due_ids and first_slot <= record.slot <= last_slot]
    run = ScenarioRun(cluster.agent_command_line(), records, scenario.due_tasks * rounds, usage,
                      last_slot + period - first_slot, agent_log=read_agent_log(cluster.agent.log_text()))
    unexpected = sum(record.task_id not in due_ids for record in all_records)
    if unexpected:
        run.notes.append(f"{unexpected} firings of tasks that should never come due")
    return run


def run_baseline(scenario: Scenario, rounds: int, directory: Path) -> ScenarioRun:
    """Run the same jobs with the `schedule` library's usual loop."""
    directory.mkdir(parents=True, exist_ok=True)
    record_path = directory / "starts.txt"
    log_path = directory / "baseline.log"
    period = scenario.period
    # Long enough for `rounds` firings after the warm-up even if each interval drifts by 2 %.
    duration = WARMUP_SECONDS + (rounds + 1) * period * 1.02 + 1.0
    arguments = [str(BASELINE_SCRIPT), "--job", f"{scenario.due_tasks}:{period}"]
    if scenario.idle_tasks:
        # schedule has no cron expressions: a 366-day interval never comes due during the run.
        arguments += ["--job", f"{scenario.idle_tasks}:{366 * 86400}"]
    arguments += ["--command", probe_command(record_path), "--duration", f"{duration:.1f}"]
    command_line = "python " + " ".join(shlex.quote(argument) for argument in arguments)

    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, *arguments], cwd=ROOT, env=child_environment(),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file)
        try:
            first_line = process.stdout.readline().decode()
            if not first_line.startswith("registered "):
                raise RuntimeError(f"the baseline did not register its jobs (output {first_line!r}). "
                                   f"See {log_path}")
            window_start = float(first_line.split()[1]) + WARMUP_SECONDS
            meter = UsageMeter(process.pid)
            sleep_until(window_start)
            meter.start()
            sleep_until(window_start + rounds * period)
            usage = meter.stop()
            rest, _ = process.communicate(timeout=duration + 60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if process.returncode != 0 or b"finished" not in rest:
        raise RuntimeError(f"the baseline failed with exit code {process.returncode}. See {log_path}")

    due_ids = {f"job-{index:04d}" for index in range(scenario.due_tasks)}
    by_task: dict[str, list[StartRecord]] = {}
    for record in read_start_records(record_path):
        if record.task_id in due_ids and record.slot >= window_start:
            by_task.setdefault(record.task_id, []).append(record)
    run = ScenarioRun(command_line, [], scenario.due_tasks * rounds, usage, rounds * period)
    drifts = []
    for task_records in by_task.values():
        measured = sorted(task_records, key=lambda record: record.slot)[:rounds]
        run.records.extend(measured)
        first_due = measured[0].slot
        run.nominal_lags_ms.extend((record.start - (first_due + index * period)) * 1000.0
                                   for index, record in enumerate(measured))
        drifts.append((measured[-1].slot - first_due - (len(measured) - 1) * period) * 1000.0)
    run.drift_ms = max(drifts, default=None)
    return run


def run_idle(directory: Path, sync_interval: float, seconds: float) -> tuple[str, Usage, AgentLog]:
    """Measure the CPU use of an agent with 1,000 tasks of which none comes due."""
    cluster = Cluster(directory, sync_interval, DEFAULT_MAX_CONCURRENT_RUNS)
    try:
        cluster.start()
        cluster.create_tasks("true", NEVER_DUE, IDLE_TASKS)
        # Wait for two syncs after the last task, so the agent has planned all of them.
        time.sleep(max(WARMUP_SECONDS, 2 * sync_interval + 1.0))
        meter = UsageMeter(cluster.agent.process.pid)
        meter.start()
        time.sleep(seconds)
        usage = meter.stop()
    finally:
        cluster.stop()
    return cluster.agent_command_line(), usage, read_agent_log(cluster.agent.log_text())


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def print_figure(name: str, value: Optional[float], unit: str) -> None:
    text = "n/a" if value is None else f"{value:.3f}"
    print(f"figure {name} {text} {unit}")


def format_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(str(cell).rjust(width) if index else str(cell).ljust(width)
                        for index, (cell, width) in enumerate(zip(row, widths))))


LAG_HEADERS = ["start lag", "firings", "p50 ms", "p99 ms", "max ms", "CPU %", "RSS MiB", "peak MiB"]


def lag_row(label: str, stats: Optional[LagStats], expected: Optional[int] = None,
            usage: Optional[Usage] = None) -> list[str]:
    count = "0" if stats is None else str(stats.count)
    if expected is not None:
        count += f"/{expected}"
    return [
        label, count,
        format_ms(stats and stats.p50), format_ms(stats and stats.p99), format_ms(stats and stats.maximum),
        "-" if usage is None else f"{usage.cpu_percent:.1f}",
        "-" if usage is None else f"{usage.rss_mib:.1f}",
        "-" if usage is None else f"{usage.peak_rss_mib:.1f}",
    ]


def report_agent_log(name: str, agent_log: AgentLog) -> None:
    print(f"agent log: {len(agent_log.warnings)} warnings or errors ({agent_log.missed} missed, "
          f"{agent_log.skipped} skipped), {len(agent_log.exceptions)} tracebacks, "
          f"{agent_log.queued} runs queued")
    for line in agent_log.warnings[:5] + agent_log.exceptions[:5]:
        print(f"  {line[:300]}")
    print_figure(f"{name}.agent.log_warnings", len(agent_log.warnings), "lines")
    print_figure(f"{name}.agent.log_tracebacks", len(agent_log.exceptions), "tracebacks")


def report_lag_scenario(scenario: Scenario, agent: ScenarioRun, baseline: Optional[ScenarioRun],
                        floor: Optional[LagStats], group_floor: Optional[LagStats] = None,
                        group_floor_c: Optional[LagStats] = None) -> None:
    name = scenario.name
    rows = [
        lag_row("agent: command's own record", agent.stats, agent.expected, agent.usage),
        lag_row("agent: its log, slot to Popen", agent.own_stats),
    ]
    if baseline is not None:
        rows.append(lag_row("schedule loop: behind next_run", baseline.stats, baseline.expected,
                            baseline.usage))
        rows.append(lag_row("schedule loop: behind nominal", summarize(baseline.nominal_lags_ms)))
    rows.append(lag_row("floor: probe started directly", floor))
    if group_floor is not None:
        rows.append(lag_row(f"floor: {scenario.due_tasks} probes at once", group_floor))
    if group_floor_c is not None:
        rows.append(lag_row(f"floor: {scenario.due_tasks} at once from C", group_floor_c))
    print_table(LAG_HEADERS, rows)
    print(f"agent command: {agent.command_line}")
    print(f"agent measurement: {agent.duration_seconds:.0f} s, {agent.missing()} firings missing, "
          f"{agent.duplicates()} duplicates")
    if baseline is not None:
        print(f"baseline command: {baseline.command_line}")
        print(f"schedule loop: the due instants of a job slid up to {format_ms(baseline.drift_ms)} ms "
              f"beyond its interval over the measured firings; 'behind nominal' counts the lag from "
              f"the first measured due instant + n * {scenario.period} s")
    for note in agent.notes:
        print(f"note: {note}")
    report_agent_log(name, agent.agent_log)

    stats = agent.stats
    own = agent.own_stats
    print_figure(f"{name}.agent.firings", len(agent.records), "firings")
    print_figure(f"{name}.agent.missing_firings", agent.missing(), "firings")
    print_figure(f"{name}.agent.duplicate_firings", agent.duplicates(), "firings")
    print_figure(f"{name}.agent.lag_p50", stats and stats.p50, "ms")
    print_figure(f"{name}.agent.lag_p99", stats and stats.p99, "ms")
    print_figure(f"{name}.agent.lag_max", stats and stats.maximum, "ms")
    print_figure(f"{name}.agent.slot_to_popen_p50", own and own.p50, "ms")
    print_figure(f"{name}.agent.slot_to_popen_p99", own and own.p99, "ms")
    print_figure(f"{name}.agent.cpu", agent.usage.cpu_percent, "% of one core")
    print_figure(f"{name}.agent.rss", agent.usage.rss_mib, "MiB")
    print_figure(f"{name}.agent.peak_rss", agent.usage.peak_rss_mib, "MiB")
    print_figure(f"{name}.floor.lag_p50", floor and floor.p50, "ms")
    print_figure(f"{name}.floor.lag_p99", floor and floor.p99, "ms")
    if group_floor is not None:
        print_figure(f"{name}.group_floor.lag_p50", group_floor.p50, "ms")
        print_figure(f"{name}.group_floor.lag_p99", group_floor.p99, "ms")
    if group_floor_c is not None:
        print_figure(f"{name}.group_floor_c.lag_p50", group_floor_c.p50, "ms")
        print_figure(f"{name}.group_floor_c.lag_p99", group_floor_c.p99, "ms")
    if baseline is None:
        return
    base = baseline.stats
    nominal = summarize(baseline.nominal_lags_ms)
    print_figure(f"{name}.schedule.firings", len(baseline.records), "firings")
    print_figure(f"{name}.schedule.lag_p50", base and base.p50, "ms")
    print_figure(f"{name}.schedule.lag_p99", base and base.p99, "ms")
    print_figure(f"{name}.schedule.lag_max", base and base.maximum, "ms")
    print_figure(f"{name}.schedule.nominal_lag_p99", nominal and nominal.p99, "ms")
    print_figure(f"{name}.schedule.drift", baseline.drift_ms, "ms")
    print_figure(f"{name}.schedule.cpu", baseline.usage.cpu_percent, "% of one core")
    print_figure(f"{name}.schedule.rss", baseline.usage.rss_mib, "MiB")
    ratio = base.p99 / stats.p99 if base and stats and stats.p99 > 0 else None
    print_figure(f"{name}.p99_ratio_schedule_to_agent", ratio, "x")
    nominal_ratio = nominal.p99 / stats.p99 if nominal and stats and stats.p99 > 0 else None
    print_figure(f"{name}.p99_ratio_schedule_nominal_to_agent", nominal_ratio, "x")


def report_burst_rounds(agent: ScenarioRun, baseline: Optional[ScenarioRun], serial_spawn_ms: list[float],
                        max_concurrent_runs: int, group_floor_c: Optional[LagStats] = None) -> None:
    serial = statistics.median(serial_spawn_ms)
    print(f"serial spawn of {SERIAL_SPAWN_COUNT} `/bin/sh -c true` with subprocess.run: "
          f"{', '.join(f'{total:.1f}' for total in serial_spawn_ms)} ms (median {serial:.1f} ms)")
    print(f"agent --max-concurrent-runs {max_concurrent_runs}")
    rows = []
    agent_last = []
    for index, (slot, records) in enumerate(agent.rounds(), start=1):
        last = max(record.lag_ms for record in records)
        agent_last.append(last)
        rows.append([f"agent round {index} ({rfc3339(slot)[11:19]})", str(len(records)),
                     format_ms(min(record.lag_ms for record in records)), format_ms(last),
                     f"{last / serial:.2f}"])
    if baseline is not None:
        # The loop's jobs do not share a slot, so a round is the n-th measured firing of each job.
        by_task: dict[str, list[StartRecord]] = {}
        for record in baseline.records:
            by_task.setdefault(record.task_id, []).append(record)
        for index in range(max((len(records) for records in by_task.values()), default=0)):
            lags = [records[index].lag_ms for records in by_task.values() if len(records) > index]
            rows.append([f"schedule loop round {index + 1}", str(len(lags)),
                         format_ms(min(lags)), format_ms(max(lags)), f"{max(lags) / serial:.2f}"])
    if group_floor_c is not None:
        rows.append(["C floor, worst round", str(SCENARIOS["burst"].due_tasks), "-",
                     format_ms(group_floor_c.maximum), f"{group_floor_c.maximum / serial:.2f}"])
    print_table(["burst round", "started", "first ms", "last ms", "last / serial"], rows)

    print_figure("burst.serial_spawn_200", serial, "ms")
    for index, last in enumerate(agent_last, start=1):
        print_figure(f"burst.agent.round{index}_last_start", last, "ms")
    worst = max(agent_last, default=None)
    print_figure("burst.agent.worst_round_last_start", worst, "ms")
    print_figure("burst.agent.worst_round_to_serial_spawn", worst and worst / serial, "x")


def report_idle(results: list[tuple[float, str, Usage, AgentLog]], seconds: float) -> None:
    rows = [[f"sync every {sync:g} s", f"{seconds:.0f}", f"{usage.cpu_percent:.2f}",
             f"{usage.rss_mib:.1f}", f"{usage.peak_rss_mib:.1f}"]
            for sync, _, usage, _ in results]
    print_table([f"idle agent, {IDLE_TASKS} tasks", "seconds", "CPU %", "RSS MiB", "peak MiB"], rows)
    for sync, command_line, usage, agent_log in results:
        name = f"idle.sync{sync:g}s"
        print(f"agent command: {command_line}")
        report_agent_log(name, agent_log)
        print_figure(f"{name}.agent.cpu", usage.cpu_percent, "% of one core")
        print_figure(f"{name}.agent.rss", usage.rss_mib, "MiB")
        print_figure(f"{name}.agent.peak_rss", usage.peak_rss_mib, "MiB")


def describe_revision() -> str:
    """Return the git commit of the repository, marked when the work tree has changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git work tree)"
    return commit + (" with uncommitted changes" if status.strip() else "")


def print_machine() -> None:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    print(f"machine: {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
          f"{platform.platform()}")
    print(f"revision: {describe_revision()}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a whole number of 1 or more")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure how late the agent starts commands after their slots.")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "idle", "all"], default="all",
                        help="scenario to run, or all for one, thousand, burst and idle (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer firings and a shorter idle window, for a smoke run "
                             "(one: 60 firings instead of 300)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not run the schedule-loop baseline beside the agent")
    parser.add_argument("--burst-max-concurrent-runs", type=positive_int, default=200, metavar="N",
                        help="the agent's --max-concurrent-runs in the burst scenario (default: 200)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory with the logs and records, and print its path")
    return parser


def run_idle_scenario(args: argparse.Namespace, directory: Path) -> None:
    seconds = QUICK_IDLE_SECONDS if args.quick else IDLE_SECONDS
    results = []
    for sync in (SYNC_INTERVAL_SECONDS, DEFAULT_SYNC_INTERVAL_SECONDS):
        command_line, usage, agent_log = run_idle(directory / f"sync{sync:g}s", sync, seconds)
        results.append((sync, command_line, usage, agent_log))
    report_idle(results, seconds)


def run_lag_scenario(scenario: Scenario, args: argparse.Namespace, directory: Path) -> None:
    rounds = scenario.rounds_for(args.quick)
    print(f"{scenario.description}; {rounds} slots per due task")
    serial_spawn_ms = []
    if scenario.name == "burst":
        serial_spawn_ms = measure_serial_spawn_ms(SERIAL_SPAWN_COUNT, SERIAL_SPAWN_REPEATS)
    floor = measure_probe_floor(directory, PROBE_FLOOR_RUNS)
    group_floor = None
    if 1 < scenario.due_tasks <= GROUP_FLOOR_MAX_SIZE:
        group_floor = measure_group_floor(directory, scenario.due_tasks, rounds)
    group_floor_c = None
    if scenario.due_tasks > 1:
        group_floor_c = measure_group_floor_c(directory, scenario.due_tasks, rounds)
    max_concurrent_runs = args.burst_max_concurrent_runs if scenario.name == "burst" else DEFAULT_MAX_CONCURRENT_RUNS
    agent = run_agent(scenario, rounds, directory / "agent", max_concurrent_runs)
    baseline = None if args.skip_baseline else run_baseline(scenario, rounds, directory / "baseline")
    report_lag_scenario(scenario, agent, baseline, floor, group_floor, group_floor_c)
    if scenario.name == "burst":
        report_burst_rounds(agent, baseline, serial_spawn_ms, max_concurrent_runs, group_floor_c)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    names = ALL_SCENARIOS if args.scenario == "all" else (args.scenario,)
    directory = Path(tempfile.mkdtemp(prefix="taskscheduler-bench-"))
    print_machine()
    try:
        for name in names:
            print(f"\n=== {name} ===", flush=True)
            scenario_directory = directory / name
            scenario_directory.mkdir()
            if name == "idle":
                run_idle_scenario(args, scenario_directory)
            else:
                run_lag_scenario(SCENARIOS[name], args, scenario_directory)
            sys.stdout.flush()
    except (AssertionError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"logs and records are kept in {directory}", file=sys.stderr)
        return 1
    if args.keep:
        print(f"\nlogs and records: {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
