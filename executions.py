"""The latest complete execution of a task.

An execution is one slot of a task (`scheduled_for`), run by every agent. It is
complete when every expected agent has reported it, or when its deadline has passed:

- expected agents: agents that the task targets, that registered no later than the
  slot and that the server has heard from within the agent timeout (they are online now);
- deadline: the slot plus the task's period (the time to its next slot) plus the report
  grace, so an agent that went silent delays an execution for at most that long.

An execution that no agent reported is never complete, because it has no output.
Manual runs (`trigger` manual) are not executions of the schedule and are never served
here; the run history lists them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Iterator, Optional

from agent import UTC, parse_frequency
from models import Agent, Result, Task
from targeting import agent_labels, targets

# Slots read from the database at a time, newest first.
PAGE_SIZE = 50


@dataclasses.dataclass
class Execution:
    scheduled_for: dt.datetime
    results: list[Result]
    expected_agents: list[str]
    complete_reason: str  # "all_reported" or "deadline_passed"


def execution_deadline(task: Task, slot: dt.datetime, report_grace: float) -> dt.datetime:
    """Return when an execution counts as complete even if an expected agent is silent.

    The period follows the task's time zone, so a daily cron task's period is shorter or
    longer than 24 hours across a daylight-saving change there.
    """
    aware_slot = slot.replace(tzinfo=UTC)
    period = parse_frequency(task.frequency, task.timezone).next_after(aware_slot) - aware_slot
    return slot + period + dt.timedelta(seconds=report_grace)


def _reported_slots(task: Task) -> Iterator[list[dt.datetime]]:
    """Yield the task's reported slots, newest first, a page at a time."""
    before: Optional[dt.datetime] = None
    while True:
        query = Result.select(Result.scheduled_for).where(
            (Result.task == task) & (Result.trigger == "scheduled"))
        if before is not None:
            query = query.where(Result.scheduled_for < before)
        page = [row.scheduled_for for row in
                query.distinct().order_by(Result.scheduled_for.desc()).limit(PAGE_SIZE)]
        if not page:
            return
        yield page
        before = page[-1]


def latest_complete_execution(task: Task, now: dt.datetime, agent_timeout: float,
                              report_grace: float) -> Optional[Execution]:
    """Return the newest complete execution of `task` at `now` (naive UTC), or None.

    The scan stops at the newest slot whose deadline has passed, because that one is
    complete whatever was reported, so it reads a bounded number of slots.
    """
    online_since = now - dt.timedelta(seconds=agent_timeout)
    online_agents = [agent for agent in (Agent
                                         .select(Agent.id, Agent.registered_at, Agent.labels)
                                         .where(Agent.last_seen_at >= online_since)
                                         .order_by(Agent.id))
                     if targets(task, agent.id, agent_labels(agent))]

    for page in _reported_slots(task):
        results_by_slot: dict[dt.datetime, list[Result]] = {slot: [] for slot in page}
        for result in (Result
                       .select()
                       .where((Result.task == task)
                              & (Result.trigger == "scheduled")
                              & (Result.scheduled_for >= page[-1])
                              & (Result.scheduled_for <= page[0]))
                       .order_by(Result.agent_id)):
            # A slot reported after the page was read is not in it. A later request finds it.
            if result.scheduled_for in results_by_slot:
                results_by_slot[result.scheduled_for].append(result)

        for slot in page:
            results = results_by_slot[slot]
            expected = [agent.id for agent in online_agents if agent.registered_at <= slot]
            reported = {result.agent_id for result in results}
            if reported.issuperset(expected):
                return Execution(slot, results, expected, "all_reported")
            if now >= execution_deadline(task, slot, report_grace):
                return Execution(slot, results, expected, "deadline_passed")
    return None


def run_time_limit(task: Task, slot: dt.datetime) -> dt.timedelta:
    """Return how long a run of `slot` may last on an agent: its timeout, or by default
    the time to the next slot, at most 1 hour (`agent.Runner.timeout_for`)."""
    if task.timeout is not None:
        return dt.timedelta(seconds=task.timeout)
    aware_slot = slot.replace(tzinfo=UTC)
    period = parse_frequency(task.frequency, task.timezone).next_after(aware_slot) - aware_slot
    return min(period, dt.timedelta(hours=1))


def not_reported_agents(task: Task, execution: Execution, now: dt.datetime, agent_timeout: float,
                        report_grace: float) -> list[dict]:
    """Return the targeted agents, registered by the execution's slot, that have not reported it.

    Each has a `reason`: `offline` when the server has not heard from it within the agent
    timeout; `running` when it is online and its run may still be going (the slot plus
    the run's time limit plus the report grace has not passed); `no_report` when it is
    online and that time has passed, so the run was lost, its report was dropped, or
    the agent did not have the task at the slot.
    """
    reported = {result.agent_id for result in execution.results}
    online_since = now - dt.timedelta(seconds=agent_timeout)
    running_until = (execution.scheduled_for + run_time_limit(task, execution.scheduled_for)
                     + dt.timedelta(seconds=report_grace))
    missing = []
    for agent in (Agent.select(Agent.id, Agent.registered_at, Agent.last_seen_at, Agent.labels)
                  .where(Agent.registered_at <= execution.scheduled_for).order_by(Agent.id)):
        if agent.id in reported or not targets(task, agent.id, agent_labels(agent)):
            continue
        if agent.last_seen_at < online_since:
            reason = "offline"
        elif now < running_until:
            reason = "running"
        else:
            reason = "no_report"
        missing.append({"agent_id": agent.id, "reason": reason})
    return missing
