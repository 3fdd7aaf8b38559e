"""Which agents a task targets: every agent, a list of agent ids, or a label selector.

A task stores at most one of `target_agents` (a JSON list of ids) and `target_labels`
(a JSON object). A selector matches an agent that carries every label with the same
value, like Kubernetes' `matchLabels`. A selector that matches no agent stays stored
and targets none; it is never widened to every agent.
"""

from __future__ import annotations

import json
from typing import Optional

from agent import AGENT_ID_PATTERN, TaskError, check_labels
from models import Agent, Task

MAX_TARGET_AGENTS = 1000


def read_targets(data: dict) -> tuple[Optional[str], Optional[str]]:
    """Return the `target_agents` and `target_labels` columns of a request, or raise TaskError.

    `agents` and `labels` may be absent or null (every agent), but not both set.
    """
    agents = data.get("agents")
    labels = data.get("labels")
    if agents is not None and labels is not None:
        raise TaskError("labels", "give agents or labels, not both; a task targets a list of "
                                  "agent ids or a label selector")
    if agents is not None:
        if not isinstance(agents, list) or not agents:
            raise TaskError("agents", "agents must be a non-empty list of agent ids; leave it out "
                                      "or null to target every agent")
        if len(agents) > MAX_TARGET_AGENTS:
            raise TaskError("agents", f"agents lists more than {MAX_TARGET_AGENTS} agent ids; "
                                      "select them by labels instead")
        for agent_id in agents:
            if not isinstance(agent_id, str) or not AGENT_ID_PATTERN.fullmatch(agent_id):
                raise TaskError("agents", f"agent id {agent_id!r} is invalid: agent ids are 1-64 "
                                          "letters, digits, '.', '_' or '-', starting with a letter "
                                          "or digit")
        return json.dumps(sorted(set(agents))), None
    if labels is not None:
        selector = check_labels(labels)
        if not selector:
            raise TaskError("labels", "labels must name at least one label; leave it out or null "
                                      "to target every agent")
        return None, json.dumps(selector, sort_keys=True)
    return None, None


def target_agents(task: Task) -> Optional[list[str]]:
    return json.loads(task.target_agents) if task.target_agents else None


def target_labels(task: Task) -> Optional[dict[str, str]]:
    return json.loads(task.target_labels) if task.target_labels else None


def agent_labels(agent: Agent) -> dict[str, str]:
    try:
        labels = json.loads(agent.labels or "{}")
    except ValueError:
        return {}
    return labels if isinstance(labels, dict) else {}


def targets(task: Task, agent_id: str, labels: dict[str, str]) -> bool:
    """Return whether `task` targets the agent `agent_id` that carries `labels`."""
    ids = target_agents(task)
    if ids is not None:
        return agent_id in ids
    selector = target_labels(task)
    if selector is not None:
        return all(labels.get(name) == value for name, value in selector.items())
    return True


def targets_agent_id(task: Task, agent_id: str) -> bool:
    """Return whether `task` targets agent `agent_id`, reading its labels when needed.

    An agent that has not registered carries no labels.
    """
    if task.target_labels is None:
        return targets(task, agent_id, {})
    agent = Agent.get_or_none(Agent.id == agent_id)
    return agent is not None and targets(task, agent_id, agent_labels(agent))


def matching_agents(task: Task) -> list[Agent]:
    """Return the registered agents that `task` targets, by id."""
    return [agent for agent in Agent.select().order_by(Agent.id)
            if targets(task, agent.id, agent_labels(agent))]
