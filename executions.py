"""Which execution of a task is the latest complete one.

An execution is one slot of a task (`scheduled_for`), run by every agent. It is
complete when every expected agent has reported it, or when its deadline has passed:

- expected agents: agents that registered no later than the slot and that the server
  has heard from within the agent timeout (they are online now);
- deadline: the slot plus the task's period (the time to its next slot) plus the report
  grace, so an agent that went silent holds an execution back for at most that long.

An execution that no agent reported is never complete, because it has no output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Optional

from agent import UTC, parse_frequency
from models import Agent, Result, Task

# How many of the newest executions to examine. Older ones are only served if all of
# these are still in progress, which needs a deadline longer than this many periods.
CANDIDATE_EXECUTIONS = 20


@dataclasses.dataclass
class Execution:
    scheduled_for: dt.datetime
    results: list[Result]
    expected_agents: list[str]
    complete_reason: str  # "all_reported" or "deadline_passed"


def as_utc(naive: dt.datetime) -> dt.datetime:
    return naive.replace(tzinfo=UTC)


def execution_deadline(task: Task, slot: dt.datetime, report_grace: float) -> dt.datetime:
    """Return when an execution counts as complete even if an expected agent is silent."""
    aware_slot = as_utc(slot)
    period = parse_frequency(task.frequency).next_after(aware_slot) - aware_slot
    return slot + period + dt.timedelta(seconds=report_grace)


def expected_agents(slot: dt.datetime, now: dt.datetime, agent_timeout: float) -> list[str]:
    online_since = now - dt.timedelta(seconds=agent_timeout)
    query = (Agent
             .select(Agent.id)
             .where((Agent.registered_at <= slot) & (Agent.last_seen_at >= online_since))
             .order_by(Agent.id))
    return [agent.id for agent in query]


def latest_complete_execution(task: Task, now: dt.datetime, agent_timeout: float,
                              report_grace: float) -> Optional[Execution]:
    """Return the newest complete execution of `task` at `now` (naive UTC), or None."""
    slots = [row.scheduled_for for row in (Result
                                           .select(Result.scheduled_for)
                                           .where(Result.task == task)
                                           .distinct()
                                           .order_by(Result.scheduled_for.desc())
                                           .limit(CANDIDATE_EXECUTIONS))]
    for slot in slots:
        results = list(Result
                       .select()
                       .where((Result.task == task) & (Result.scheduled_for == slot))
                       .order_by(Result.agent_id))
        expected = expected_agents(slot, now, agent_timeout)
        reported = {result.agent_id for result in results}
        if reported.issuperset(expected):
            return Execution(slot, results, expected, "all_reported")
        if now >= execution_deadline(task, slot, report_grace):
            return Execution(slot, results, expected, "deadline_passed")
    return None
