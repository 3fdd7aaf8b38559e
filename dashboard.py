"""The read-only web dashboard: tasks, each host's latest run and its output, and the agents.

The pages are rendered on the server with Bottle's SimpleTemplate from `views/`, which
HTML-escapes every `{{value}}`. They load nothing else: the CSS is inline, there is no
script, and the Content-Security-Policy allows only the page's own style element. Each
page reloads itself every REFRESH_SECONDS with a meta refresh.

When the server has tokens, a browser sends a read or admin token as the password of
HTTP Basic authentication (any user name), and scripts may send it as a bearer token.
docs/security.md gives the reasons for that choice.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import logging
import os
import re
import secrets
from typing import Any, Optional

import bottle

from agent import UTC, FrequencyError, parse_frequency, zone_for
from auth import TokenConfig, find_token, token_digest
from executions import Execution, latest_complete_execution
from frequency_text import describe_frequency
from jsonapi import RESULT_STATUSES, time_text
from models import Agent, Result, Task, utc_now

log = logging.getLogger("taskscheduler.server")

VIEWS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "views")
# The dashboard's HTML pages, which the OpenAPI document leaves out.
PAGE_ROUTES = frozenset({("GET", "/"), ("GET", "/tasks/<task_id>")})
REFRESH_SECONDS = 10
# Characters of stdout or stderr shown per host; the API returns all of it.
MAX_SHOWN_OUTPUT = 65536
NEXT_FIRE_TIMES = 5
TASK_ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BASIC_CHALLENGE = 'Basic realm="taskscheduler dashboard", charset="UTF-8"'


# ---------------------------------------------------------------------------
# Tokens from a browser or a script
# ---------------------------------------------------------------------------


def presented_token() -> Optional[str]:
    """Return the token of the request's Authorization header, or None.

    `Basic` carries it as the password (the user name is ignored), `Bearer` as itself.
    """
    scheme, _, credentials = bottle.request.headers.get("Authorization", "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, separator, password = decoded.partition(":")
    return password if separator and password else None


def is_reader_token(tokens: TokenConfig, token: Optional[str]) -> bool:
    """Return whether `token` is an admin or read token that has not expired.

    The token is compared with every configured one in constant time.
    """
    if token is None:
        return False
    accepted = find_token(token_digest(token), tokens.admin + tokens.read)
    return accepted is not None and not accepted.expired(dt.datetime.now(UTC))


# ---------------------------------------------------------------------------
# What the pages show
# ---------------------------------------------------------------------------


def duration_text(seconds: float) -> str:
    """Return a rounded duration such as "42 s", "5 min", "3 h 20 min" or "2 d 4 h"."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(seconds // 3600, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def status_class(status: str) -> str:
    """Return the CSS class of a run status; unknown values get a neutral class."""
    return f"status-{status.replace('_', '-')}" if status in RESULT_STATUSES else "status-none"


@dataclasses.dataclass
class HostRun:
    """One host's report of an execution, or the lack of one, as the pages show it."""

    agent_id: str
    status: str
    css_class: str
    exit_code: Optional[int]
    age: str
    result: Optional[Result] = None


def host_runs(execution: Execution, now: dt.datetime) -> list[HostRun]:
    """Return a HostRun per reporting agent and per expected agent that did not report."""
    runs = []
    for result in execution.results:
        runs.append(HostRun(result.agent_id, result.status, status_class(result.status),
                            result.exit_code, duration_text((now - result.finished_at).total_seconds()),
                            result))
    reported = {result.agent_id for result in execution.results}
    for agent_id in execution.expected_agents:
        if agent_id not in reported:
            runs.append(HostRun(agent_id, "no report", "status-none", None, ""))
    return sorted(runs, key=lambda run: run.agent_id)


@dataclasses.dataclass
class TaskView:
    task: Task
    words: str
    next_fire_times: list[tuple[str, str]]  # (UTC, local) texts
    next_in: str
    execution: Optional[Execution]
    runs: list[HostRun]


def task_view(task: Task, now: dt.datetime, config: Any, fire_times: int = 1) -> TaskView:
    """Gather what the pages show of `task` at the naive UTC `now`."""
    try:
        words = describe_frequency(task.frequency, task.timezone)
        slots = parse_frequency(task.frequency, task.timezone).next_slots(now.replace(tzinfo=UTC), fire_times)
        if task.state != "active":
            slots = []  # a paused or deleted task has no next run
        zone = zone_for(task.timezone)
    except FrequencyError as error:
        # A task stored by a newer server version may use a form this one cannot read.
        log.warning("dashboard: task %s has a frequency this server cannot read: %s", task.id, error)
        words, slots, zone = task.frequency, [], UTC
    next_fire_times = [(slot.strftime("%Y-%m-%d %H:%M:%S UTC"),
                        slot.astimezone(zone).strftime(f"%Y-%m-%d %H:%M:%S {task.timezone}"))
                       for slot in slots]
    next_in = duration_text((slots[0] - now.replace(tzinfo=UTC)).total_seconds()) if slots else ""
    execution = latest_complete_execution(task, now, config.agent_timeout, config.report_grace)
    runs = host_runs(execution, now) if execution is not None else []
    return TaskView(task, words, next_fire_times, next_in, execution, runs)


@dataclasses.dataclass
class AgentView:
    agent: Agent
    online: bool
    last_seen: str


def agent_views(now: dt.datetime, agent_timeout: float) -> list[AgentView]:
    online_since = now - dt.timedelta(seconds=agent_timeout)
    return [AgentView(agent, agent.last_seen_at >= online_since,
                      duration_text((now - agent.last_seen_at).total_seconds()))
            for agent in Agent.select().order_by(Agent.id)]


def shown_output(text: str) -> tuple[str, bool]:
    """Return the part of an output that a page shows, and whether it was cut."""
    if len(text) <= MAX_SHOWN_OUTPUT:
        return text, False
    return text[:MAX_SHOWN_OUTPUT], True


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


def html_page(template_name: str, status: int = 200, **values: Any) -> bottle.HTTPResponse:
    """Render a page of `views/` with security headers and a fresh style nonce."""
    nonce = secrets.token_urlsafe(16)
    body = bottle.template(template_name, template_lookup=[VIEWS_DIR], nonce=nonce,
                           root=bottle.request.script_name, refresh=values.pop("refresh", REFRESH_SECONDS),
                           generated_at=utc_now().strftime("%Y-%m-%d %H:%M:%S UTC"), **values)
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        # No scripts, frames, images or requests elsewhere: only this page's own style element.
        "Content-Security-Policy": (f"default-src 'none'; style-src 'nonce-{nonce}'; base-uri 'none'; "
                                    "form-action 'none'; frame-ancestors 'none'"),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        # Outputs may contain secrets, so no cache keeps a copy.
        "Cache-Control": "no-store",
    }
    return bottle.HTTPResponse(body=body, status=status, headers=headers)


def message_page(status: int, title: str, message: str) -> bottle.HTTPResponse:
    return html_page("message.tpl", status=status, title=title, message=message, refresh=0)


def require_reader(tokens: TokenConfig) -> None:
    """Raise a 401 page with a Basic challenge unless the request has a read or admin token."""
    if not tokens.enabled:
        return
    token = presented_token()
    if is_reader_token(tokens, token):
        return
    if token is not None:
        log.info("dashboard request %s from %s rejected: the token is not a read or admin token",
                 bottle.request.path, bottle.request.remote_addr)
    response = message_page(401, "Token required",
                            "This dashboard needs a read or admin token of this server. Enter any "
                            "user name, and the token as the password.")
    response.set_header("WWW-Authenticate", BASIC_CHALLENGE)
    raise response


def add_dashboard_routes(app: bottle.Bottle, config: Any) -> None:
    """Add the pages of PAGE_ROUTES; `config` is the server's ServerConfig."""

    @app.get("/")
    def overview():
        require_reader(config.tokens)
        now = utc_now()
        # Deleted tasks leave the overview, as they leave the task list of the API.
        tasks = [task_view(task, now, config) for task in
                 Task.select().where(Task.state != "deleted").order_by(Task.created_at, Task.id)]
        return html_page("overview.tpl", title="Overview", tasks=tasks,
                         agents=agent_views(now, config.agent_timeout))

    @app.get("/tasks/<task_id>")
    def task_page(task_id):
        require_reader(config.tokens)
        task_id = task_id.lower()
        task = Task.get_or_none(Task.id == task_id) if TASK_ID_PATTERN.fullmatch(task_id) else None
        if task is None:
            raise message_page(404, "Task not found", f"No task has the id {task_id}.")
        view = task_view(task, utc_now(), config, fire_times=NEXT_FIRE_TIMES)
        return html_page("task.tpl", title="Task", view=view, shown_output=shown_output,
                         time_text=time_text)
