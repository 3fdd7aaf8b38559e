"""taskscheduler server: a REST API to create periodic tasks and read every host's output.

Agents register, fetch their task list and report each run here; operators create
tasks and read the latest complete execution. Serve it with waitress:

    python server.py --host 127.0.0.1 --port 8080 --database sqlite:///data/taskscheduler.db
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import uuid
from typing import Any, Optional

import bottle
import peewee
import waitress

from agent import (AGENT_ID_PATTERN, UTC, FrequencyError, TaskError, check_jitter, check_labels,
                   is_loopback_host,
                   configure_logging, format_time, parse_frequency, printable, validate_task_options,
                   zone_for)
from agent_states import AgentStateWatcher
from auth import (TokenConfig, TokenFileError, add_enrollment_routes, authenticate, forbidden,
                  may_report, read_tokens, require_agent, require_operator, unauthorized)
from dashboard import add_dashboard_routes, is_reader_token, presented_token
from executions import latest_complete_execution, not_reported_agents
from jsonapi import (MAX_BODY_BYTES, MAX_COMMAND_LENGTH, MAX_FREQUENCY_LENGTH, MAX_HOSTNAME_LENGTH,
                     MAX_OUTPUT_LENGTH, MAX_PLATFORM_LENGTH, MAX_PUSH_URL_LENGTH, MAX_REASON_LENGTH,
                     MAX_TIMEZONE_LENGTH, MAX_VERSION_LENGTH, PUSH_URL_REGEX, RESULT_STATUSES,
                     api_error, byte_count, json_response, local_time_text, optional_base64,
                     optional_boolean, optional_count, optional_exit_code, optional_label,
                     optional_output, optional_time, read_json_object, read_missed_range,
                     render_http_error, required_string, seconds_json, time_text,
                     use_json_error_responses)
from metrics import install_metrics
from models import (TASK_STATES, Agent, ManualRun, Result, Task, database, open_database, sqlite_url,
                    utc_now)
from openapi import OPENAPI_PATH, build_spec
from pagination import encode_cursor, read_cursor, read_limit
from push import PushTarget, TaskPusher
from retention import RetentionPolicy, RetentionThread
from history import add_history_routes, output_fields
from targeting import (agent_labels, matching_agents, read_targets, target_agents, target_labels,
                       targets)

__version__ = "0.1.0"

log = logging.getLogger("taskscheduler.server")

NOT_RUN_STATUSES = ("skipped", "missed")
TRIGGERS = ("scheduled", "manual")
TASK_ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PUSH_URL_PATTERN = re.compile(PUSH_URL_REGEX)


@dataclasses.dataclass
class ServerConfig:
    """Settings of one server; defaults match the command line's."""

    agent_timeout: float = 30.0
    report_grace: float = 30.0
    push_timeout: float = 5.0
    # False makes the server send no wake-ups, so it opens no connection to any host.
    push: bool = True
    tokens: TokenConfig = dataclasses.field(default_factory=TokenConfig)
    # How long an agent token stays valid after enrollment. None means it never expires.
    agent_token_lifetime: Optional[dt.timedelta] = None
    retention: RetentionPolicy = dataclasses.field(default_factory=RetentionPolicy)


# ---------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------


# How far ahead of the server's clock a report's slot may be, for agents whose clock is ahead.
MAX_CLOCK_AHEAD = dt.timedelta(minutes=5)


def check_slot(frequency, scheduled_for: dt.datetime, now: dt.datetime) -> None:
    """Reject a report slot that is not one of the task's slots, or lies in the future.

    Such a report would make up an execution that `latest_output` serves instead of real ones.
    """
    aware = scheduled_for.replace(tzinfo=UTC)
    if scheduled_for > now + MAX_CLOCK_AHEAD:
        raise api_error(400, f"scheduled_for {time_text(scheduled_for)} is in the future; a report "
                             "belongs to a slot that is already due", "scheduled_for")
    if frequency.latest_at_or_before(aware) != aware:
        raise api_error(400, f"scheduled_for {time_text(scheduled_for)} is not a slot of the task's "
                             f"frequency {frequency.text!r}; leave it out to report the slot due now",
                        "scheduled_for")


def task_json(task: Task) -> dict:
    """Return a task as the API and the agents read it (`agent.Task.from_json`)."""
    return {
        "task_id": task.id,
        "command": task.command,
        "frequency": task.frequency,
        "timezone": task.timezone,
        "catchup": seconds_json(task.catchup),
        "overlap": task.overlap,
        "jitter": seconds_json(task.jitter),
        "timeout": seconds_json(task.timeout),
        "environment": json.loads(task.environment or "{}"),
    }


def task_view(task: Task) -> dict:
    """Return a task as operators read it: the agents' view plus its state and targets."""
    return dict(task_json(task), state=task.state, agents=target_agents(task),
                labels=target_labels(task), created_at=time_text(task.created_at),
                updated_at=time_text(task.updated_at), deleted_at=time_text(task.deleted_at))


# How long after its request an agent still starts a manual run. An agent that does not
# sync within this time never runs it.
MANUAL_RUN_WINDOW = dt.timedelta(hours=1)
# The fields a create or PATCH request may set; others are ignored.
DEFINITION_FIELDS = ("command", "frequency", "timezone", "catchup", "overlap", "jitter", "timeout",
                     "environment", "agents", "labels")


def definition_of(task: Task) -> dict:
    """Return a stored task's fields in the form of a create request."""
    return dict(task_json(task), agents=target_agents(task), labels=target_labels(task))


def next_fire_times(task: Task, now: dt.datetime, count: int = 5) -> dict[str, list[str]]:
    """Return the task's next `count` slots after the aware `now`, in UTC and in the task's zone."""
    slots = parse_frequency(task.frequency, task.timezone).next_slots(now, count)
    zone = zone_for(task.timezone)
    return {
        "next_fire_times": [format_time(slot) for slot in slots],
        "next_fire_times_local": [local_time_text(slot, zone) for slot in slots],
    }


def group_outputs(outputs: list[dict]) -> list[dict]:
    """Group outputs whose stdout, stderr (text and bytes) and exit code are equal.

    Returns the groups largest first, then by their first agent id; each lists its agents.
    """
    stream_fields = ("stdout", "stderr", "stdout_base64", "stderr_base64", "exit_code")
    groups: dict[tuple, dict] = {}
    for output in outputs:
        key = tuple(output.get(field) for field in stream_fields)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {field: output[field] for field in stream_fields if field in output}
            group["agent_ids"] = []
        group["agent_ids"].append(output["agent_id"])
    for group in groups.values():
        group["count"] = len(group["agent_ids"])
    return sorted(groups.values(), key=lambda group: (-group["count"], group["agent_ids"][0]))


def read_task_definition(data: dict) -> dict:
    """Return the Task columns of a create request, or raise a 400 error response.

    PATCH validates the stored task merged with its changes through this same function.
    """
    command = required_string(data, "command", MAX_COMMAND_LENGTH)
    frequency = required_string(data, "frequency", MAX_FREQUENCY_LENGTH)
    # The options are read first, because parse_frequency reports a bad time zone as a
    # bad frequency.
    options = read_task_options(data)
    try:
        parsed_frequency = parse_frequency(frequency, options["timezone"])
    except FrequencyError as error:
        raise api_error(400, f"frequency is invalid: {error}", "frequency") from None
    try:
        check_jitter(parsed_frequency, options["jitter"])
        target_agents_column, target_labels_column = read_targets(data)
    except TaskError as error:
        raise api_error(400, str(error), error.field) from None
    options["environment"] = json.dumps(dict(options["environment"]), sort_keys=True)
    return dict(options, command=command, frequency=frequency, target_agents=target_agents_column,
                target_labels=target_labels_column)


def manual_run_instant(task: Task, now: dt.datetime) -> dt.datetime:
    """Return the instant to record a manual run at: `now`, moved on by microseconds until
    it is neither a slot of the task's frequency nor another manual run's instant."""
    frequency = parse_frequency(task.frequency, task.timezone)
    instant = now
    while (frequency.latest_at_or_before(instant.replace(tzinfo=UTC)) == instant.replace(tzinfo=UTC)
           or ManualRun.select().where((ManualRun.task == task.id)
                                       & (ManualRun.requested_at == instant)).exists()):
        instant += dt.timedelta(microseconds=1)
    return instant


def read_task_options(data: dict) -> dict:
    """Return the validated task options of a create request, or raise a 400 error response."""
    # The maximum zone name length in tzdata 2026 is 32 characters, and the column is 64 wide.
    timezone = data.get("timezone")
    if isinstance(timezone, str) and len(timezone) > MAX_TIMEZONE_LENGTH:
        raise api_error(400, f"timezone is longer than {MAX_TIMEZONE_LENGTH} characters; "
                             "use an IANA zone name such as Europe/Berlin", "timezone")
    try:
        return validate_task_options(data)
    except TaskError as error:
        raise api_error(400, str(error), error.field) from None


def database_plugin(callback):
    """Give each request its own connection, and turn database outages into 503."""

    def wrapper(*args, **kwargs):
        try:
            with database.connection_context():
                return callback(*args, **kwargs)
        except (peewee.OperationalError, peewee.InterfaceError) as error:
            log.error("database error on %s %s: %s", bottle.request.method,
                      printable(bottle.request.path), error)
            return api_error(503, "the database is unavailable; retry later")

    return wrapper


def create_app(config: Optional[ServerConfig] = None, pusher: Optional[TaskPusher] = None) -> bottle.Bottle:
    """Build the WSGI application. The database must already be open (`open_database`)."""
    config = config or ServerConfig()
    pusher = pusher or TaskPusher(config.push_timeout)
    app = bottle.Bottle()
    app.default_error_handler = render_http_error
    app.install(database_plugin)
    app.config["taskscheduler.pusher"] = pusher
    tokens = config.tokens
    add_enrollment_routes(app, tokens, AGENT_ID_PATTERN, config.agent_token_lifetime)
    add_dashboard_routes(app, config)

    def authorize_metrics():
        # Only operator tokens, which need no database lookup, so scrapes work while it is down.
        if tokens.enabled and not is_reader_token(tokens, presented_token()):
            raise unauthorized("GET /metrics needs an admin or read token: send the header "
                               "Authorization: Bearer TOKEN", invalid_token=False)

    metrics = install_metrics(app, config.agent_timeout, authorize_metrics, skip=[database_plugin])

    def find_task(task_id: str) -> Task:
        task_id = task_id.lower()  # UUIDs compare without case; ids are stored in lower case
        task = Task.get_or_none(Task.id == task_id) if TASK_ID_PATTERN.fullmatch(task_id) else None
        if task is None:
            raise api_error(404, f"task {task_id} not found", "task_id")
        return task

    def online_since() -> dt.datetime:
        return utc_now() - dt.timedelta(seconds=config.agent_timeout)

    def find_live_task(task_id: str) -> Task:
        """Return a task that is not deleted, or raise a 404 or 409 error response."""
        task = find_task(task_id)
        if task.state == "deleted":
            raise api_error(409, f"task {task.id} was deleted at {time_text(task.deleted_at)}; "
                                 "create a new task instead", "task_id")
        return task

    def wake_agents(task: Task, also_targeted_before: Optional[Task] = None) -> None:
        """Send a wake-up to the online agents with a push URL that `task` targets.

        With `also_targeted_before`, the task as it was before a change, the agents it
        targeted then are woken too, so that they drop it at once.
        """
        if not config.push:
            return
        pushed = Agent.push_url.is_null(False) & (Agent.last_seen_at >= online_since())
        if tokens.enabled:
            # An agent without a push secret has no valid token either, and would reject
            # an unsigned wake-up.
            pushed &= Agent.push_secret.is_null(False)
        woken = []
        for agent in Agent.select().where(pushed).order_by(Agent.id):
            labels = agent_labels(agent)
            if targets(task, agent.id, labels) or (
                    also_targeted_before is not None and targets(also_targeted_before, agent.id, labels)):
                woken.append(PushTarget(agent.id, agent.push_url, agent.push_secret))
        pusher.push(task.id, woken)

    # The process is alive even while its database is down, so this route opens no connection.
    @app.get("/healthz", skip=[database_plugin])
    def healthz():
        return json_response({"status": "ok"})

    # Ready while the database responds to a trivial query, so that a load balancer sends
    # requests only to servers that can serve them.
    @app.get("/readyz", skip=[database_plugin])
    def readyz():
        try:
            with database.connection_context():
                database.execute_sql("SELECT 1")
        except (peewee.OperationalError, peewee.InterfaceError) as error:
            log.warning("readiness check failed: the database did not respond: %s", error)
            return api_error(503, "not ready: the database did not respond; the server log has the details")
        return json_response({"status": "ready"})

    @app.get(OPENAPI_PATH, skip=[database_plugin])
    def openapi_document():
        routes = ((route.method, route.rule) for route in app.routes)
        return json_response(build_spec(routes, __version__))

    @app.post("/api/v1/tasks/create")
    def create_task():
        require_operator(tokens, admin=True)
        definition = read_task_definition(read_json_object())
        now = utc_now()
        task = Task.create(id=str(uuid.uuid4()), created_at=now, updated_at=now, **definition)
        log.info("task %s created: frequency %r, time zone %s, catchup %g s, overlap %s, "
                 "jitter %g s, timeout %s, agents %s, labels %s", task.id, task.frequency,
                 task.timezone, task.catchup, task.overlap, task.jitter,
                 "none (the period, at most 1 h)" if task.timeout is None else f"{task.timeout:g} s",
                 task.target_agents or "all", task.target_labels or "any")
        wake_agents(task)
        return json_response(dict(task_view(task), command_id=task.id), 201)

    @app.route("/api/v1/tasks/create", method=["GET", "PATCH", "DELETE", "ANY"])
    def create_task_wrong_method():
        # Without the GET, PATCH and DELETE routes, those methods would match
        # /api/v1/tasks/<task_id> and return 404.
        # The ANY route takes every other method, so bottle's own 405 never lists GET
        # in its Allow header for this path.
        response = api_error(405, f"method {bottle.request.method} is not allowed on "
                                  "/api/v1/tasks/create; allowed: POST")
        response.set_header("Allow", "POST")
        return response

    @app.get("/api/v1/tasks")
    def list_tasks():
        require_operator(tokens, admin=False)
        limit = read_limit()
        after = read_cursor(str)
        state = bottle.request.query.get("state")
        query = Task.select()
        if state is None:
            query = query.where(Task.state != "deleted")
        elif state in TASK_STATES:
            query = query.where(Task.state == state)
        else:
            raise api_error(400, f"state must be one of {', '.join(TASK_STATES)}", "state")
        if after is not None:
            created_at, last_id = after
            query = query.where((Task.created_at > created_at)
                                | ((Task.created_at == created_at) & (Task.id > last_id)))
        tasks = list(query.order_by(Task.created_at, Task.id).limit(limit + 1))
        next_cursor = None
        if len(tasks) > limit:
            tasks = tasks[:limit]
            next_cursor = encode_cursor(tasks[-1].created_at, tasks[-1].id)
        return json_response({"tasks": [task_view(task) for task in tasks], "next_cursor": next_cursor})

    @app.get("/api/v1/tasks/<task_id>")
    def show_task(task_id):
        require_operator(tokens, admin=False)
        task = find_task(task_id)
        fire_times = next_fire_times(task, dt.datetime.now(UTC))
        if task.state != "active":
            fire_times = {name: [] for name in fire_times}
        return json_response(dict(
            task_view(task),
            matching_agents=[agent.id for agent in matching_agents(task)],
            **fire_times,
        ))

    @app.patch("/api/v1/tasks/<task_id>")
    def update_task(task_id):
        require_operator(tokens, admin=True)
        task = find_live_task(task_id)
        data = read_json_object()
        changes = {field: data[field] for field in DEFINITION_FIELDS if field in data}
        # Targeting is one choice: setting agents clears labels and the other way round.
        if changes.get("agents") is not None:
            changes.setdefault("labels", None)
        if changes.get("labels") is not None:
            changes.setdefault("agents", None)
        definition = read_task_definition(dict(definition_of(task), **changes))
        before = Task(**task.__data__)
        updated = (Task.update(updated_at=utc_now(), **definition)
                   .where((Task.id == task.id) & (Task.state != "deleted"))
                   .execute())
        if not updated:
            raise api_error(409, f"task {task.id} was deleted meanwhile", "task_id")
        task = Task.get_by_id(task.id)
        log.info("task %s updated: %s", task.id, ", ".join(sorted(changes)) or "no fields")
        wake_agents(task, also_targeted_before=before)
        return json_response(task_view(task))

    @app.delete("/api/v1/tasks/<task_id>")
    def delete_task(task_id):
        require_operator(tokens, admin=True)
        task = find_task(task_id)
        now = utc_now()
        deleted = (Task.update(state="deleted", deleted_at=now, updated_at=now)
                   .where((Task.id == task.id) & (Task.state != "deleted"))
                   .execute())
        if deleted:
            log.info("task %s deleted; its history stays until retention removes it", task.id)
            wake_agents(task)
        return json_response(task_view(Task.get_by_id(task.id)))

    def change_state(task_id: str, old: str, new: str, wake: bool):
        require_operator(tokens, admin=True)
        task = find_live_task(task_id)
        changed = (Task.update(state=new, updated_at=utc_now())
                   .where((Task.id == task.id) & (Task.state == old))
                   .execute())
        task = Task.get_by_id(task.id)
        if task.state == "deleted":
            raise api_error(409, f"task {task.id} was deleted meanwhile", "task_id")
        if changed:
            log.info("task %s %s", task.id, "resumed" if new == "active" else "paused")
            if wake:
                wake_agents(task)
        return json_response(task_view(task))

    @app.post("/api/v1/tasks/<task_id>/pause")
    def pause_task(task_id):
        return change_state(task_id, "active", "paused", wake=True)

    @app.post("/api/v1/tasks/<task_id>/resume")
    def resume_task(task_id):
        return change_state(task_id, "paused", "active", wake=True)

    @app.post("/api/v1/tasks/<task_id>/run")
    def run_task_now(task_id):
        require_operator(tokens, admin=True)
        task = find_live_task(task_id)
        if task.state != "active":
            raise api_error(409, f"task {task.id} is {task.state}; resume it first, because a "
                                 "paused task is in no agent's task list", "task_id")
        with database.atomic():
            requested_at = manual_run_instant(task, utc_now())
            manual = ManualRun.create(id=str(uuid.uuid4()), task=task.id, requested_at=requested_at)
        agents = [agent.id for agent in matching_agents(task) if agent.registered_at <= requested_at]
        log.info("task %s manual run %s requested for %d agents", task.id, manual.id, len(agents))
        wake_agents(task)
        return json_response({"task_id": task.id, "run_id": manual.id,
                              "requested_at": time_text(requested_at), "agents": agents}, 202)

    @app.get("/api/v1/tasks/<task_id>/latest_output")
    def latest_output(task_id):
        require_operator(tokens, admin=False)
        task = find_task(task_id)
        group_by = bottle.request.query.get("group_by")
        if group_by not in (None, "output"):
            raise api_error(400, "group_by must be output, or left out", "group_by")
        now = utc_now()
        execution = latest_complete_execution(task, now, config.agent_timeout, config.report_grace)
        if execution is None:
            return json_response({"task_id": task.id, "completion_time": None, "outputs": []})
        outputs = []
        for result in execution.results:
            output: dict[str, Any] = {"agent_id": result.agent_id}
            output.update(output_fields("stdout", result.stdout, result.stdout_raw, result.truncated))
            output.update(output_fields("stderr", result.stderr, result.stderr_raw, result.truncated))
            output.update(
                exit_code=result.exit_code,
                status=result.status,
                scheduled_for=time_text(result.scheduled_for),
                started_at=time_text(result.started_at),
                finished_at=time_text(result.finished_at),
            )
            if result.late:
                output["late"] = True
            if result.status == "missed":
                output.update(missed_slots=result.missed_slots,
                              first_missed=time_text(result.first_missed))
            if result.reason:
                output["reason"] = result.reason
            if result.truncated:
                output.update(truncated=True, stdout_bytes=result.stdout_bytes,
                              stderr_bytes=result.stderr_bytes)
            outputs.append(output)
        body = {
            "task_id": task.id,
            "scheduled_for": time_text(execution.scheduled_for),
            "completion_time": time_text(max(result.finished_at for result in execution.results)),
            "complete_reason": execution.complete_reason,
            "not_reported": not_reported_agents(task, execution, now, config.agent_timeout,
                                                config.report_grace),
        }
        if group_by == "output":
            body["groups"] = group_outputs(outputs)
        else:
            body["outputs"] = outputs
        return json_response(body)

    def find_manual_run(task: Task, run_id: object) -> ManualRun:
        if run_id is None:
            raise api_error(400, "manual_run_id is missing; a report with trigger manual names "
                                 "the run_id of its manual run", "manual_run_id")
        manual = None
        if isinstance(run_id, str) and TASK_ID_PATTERN.fullmatch(run_id.lower()):
            manual = ManualRun.get_or_none((ManualRun.id == run_id.lower()) & (ManualRun.task == task.id))
        if manual is None:
            raise api_error(400, f"manual_run_id {str(run_id)[:64]!r} is not a manual run of task "
                                 f"{task.id}", "manual_run_id")
        return manual

    @app.post("/api/v1/tasks/<task_id>/complete")
    def complete_task(task_id):
        identity = authenticate(tokens)
        task = find_task(task_id)
        data = read_json_object()
        agent_id = required_string(data, "server_id", 64)
        if not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise api_error(400, "server_id must be 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit", "server_id")
        refusal = may_report(identity, task, agent_id)
        if refusal is not None:
            raise forbidden(refusal)
        stdout = optional_output(data, "stdout", MAX_OUTPUT_LENGTH)
        stderr = optional_output(data, "stderr", MAX_OUTPUT_LENGTH)
        exit_code = optional_exit_code(data)
        now = utc_now()
        finished_at = optional_time(data, "finished_at") or now
        started_at = optional_time(data, "started_at")
        scheduled_for = optional_time(data, "scheduled_for")
        trigger = data.get("trigger")
        if trigger is None:
            trigger = "scheduled"
        elif trigger not in TRIGGERS:
            raise api_error(400, f"trigger must be one of {', '.join(TRIGGERS)}", "trigger")
        manual_run_id = None
        if trigger == "manual":
            # A manual run belongs to the instant it was requested at, which is no slot.
            manual = find_manual_run(task, data.get("manual_run_id"))
            manual_run_id = manual.id
            scheduled_for = manual.requested_at
        elif data.get("manual_run_id") is not None:
            raise api_error(400, "manual_run_id is only allowed with trigger manual", "manual_run_id")
        else:
            frequency = parse_frequency(task.frequency, task.timezone)
            if scheduled_for is None:
                # A plain REST report belongs to the execution that is due now.
                scheduled_for = frequency.latest_at_or_before(now.replace(tzinfo=UTC)).replace(tzinfo=None)
            else:
                check_slot(frequency, scheduled_for, now)
        if task.state == "deleted" and scheduled_for > task.deleted_at:
            raise api_error(409, f"task {task.id} was deleted at {time_text(task.deleted_at)}, "
                                 f"before {time_text(scheduled_for)}", "task_id")
        status = data.get("status")
        if status is None:
            status = "succeeded" if exit_code in (None, 0) else "failed"
        elif status not in RESULT_STATUSES:
            raise api_error(400, f"status must be one of {', '.join(RESULT_STATUSES)}", "status")
        if trigger == "manual" and status == "missed":
            raise api_error(400, "status missed is only allowed for scheduled slots", "status")
        missed_slots, first_missed = read_missed_range(data, status, scheduled_for)
        late = optional_boolean(data, "late")
        if late and status in NOT_RUN_STATUSES:
            raise api_error(400, f"late must be false or absent for status {status}, "
                                 "because the slot did not run", "late")
        reason = optional_label(data, "reason", MAX_REASON_LENGTH)

        fields = dict(
            task=task.id, agent_id=agent_id, scheduled_for=scheduled_for, started_at=started_at,
            finished_at=finished_at, received_at=now, status=status, exit_code=exit_code,
            stdout=stdout, stderr=stderr,
            stdout_bytes=byte_count(data, "stdout_bytes", stdout),
            stderr_bytes=byte_count(data, "stderr_bytes", stderr),
            truncated=optional_boolean(data, "truncated"),
            missed_slots=missed_slots, first_missed=first_missed, late=late, reason=reason,
            stdout_raw=optional_base64(data, "stdout_base64", MAX_OUTPUT_LENGTH),
            stderr_raw=optional_base64(data, "stderr_base64", MAX_OUTPUT_LENGTH),
            trigger=trigger, manual_run=manual_run_id,
        )
        with database.atomic():
            inserted = (Result.insert(**fields)
                        .on_conflict_ignore()
                        .as_rowcount()
                        .execute())
            Agent.update(last_seen_at=now).where(Agent.id == agent_id).execute()
        body = {"task_id": task.id, "agent_id": agent_id, "scheduled_for": time_text(scheduled_for),
                "trigger": trigger, "duplicate": inserted == 0}
        if inserted:
            metrics.record_report(status, scheduled_for, finished_at, missed_slots)
        if inserted == 0:
            log.info("duplicate report of task %s slot %s from agent %s ignored",
                     task.id, time_text(scheduled_for), agent_id)
            return json_response(body, 200)
        log.debug("report of task %s slot %s from agent %s stored", task.id, time_text(scheduled_for), agent_id)
        return json_response(body, 201)

    @app.put("/api/v1/agents/<agent_id>")
    def register_agent(agent_id):
        require_agent(tokens, agent_id)
        if not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise api_error(400, "agent id must be 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit", "agent_id")
        data = read_json_object()
        push_url = data.get("push_url")
        if push_url is not None and (not isinstance(push_url, str)
                                     or not PUSH_URL_PATTERN.fullmatch(push_url)
                                     or len(push_url) > MAX_PUSH_URL_LENGTH):
            raise api_error(400, "push_url must be an http:// or https:// URL of at most "
                                 f"{MAX_PUSH_URL_LENGTH} characters, or null", "push_url")
        details = {
            "hostname": optional_label(data, "hostname", MAX_HOSTNAME_LENGTH),
            "platform": optional_label(data, "platform", MAX_PLATFORM_LENGTH),
            "version": optional_label(data, "version", MAX_VERSION_LENGTH),
            "outbox_depth": optional_count(data, "outbox_depth"),
            "outbox_dropped": optional_count(data, "outbox_dropped"),
        }
        if data.get("labels") is not None:
            try:
                details["labels"] = json.dumps(check_labels(data["labels"]), sort_keys=True)
            except TaskError as error:
                raise api_error(400, str(error), error.field) from None
        agent_clock = optional_time(data, "clock")
        now = utc_now()
        if agent_clock is not None:
            details["clock_offset"] = (agent_clock - now).total_seconds()
        with database.atomic():
            # Insert-or-ignore, so two first registrations at once cannot both insert.
            inserted = (Agent.insert(id=agent_id, push_url=push_url, registered_at=now,
                                     last_seen_at=now, **details)
                        .on_conflict_ignore()
                        .as_rowcount()
                        .execute())
            if inserted:
                log.info("agent %s registered: host %r, platform %r, push URL %s",
                         agent_id, details["hostname"], details["platform"], push_url or "none")
                status = 201
            else:
                Agent.update(push_url=push_url, last_seen_at=now, **details).where(
                    Agent.id == agent_id).execute()
                status = 200
            agent = Agent.get(Agent.id == agent_id)
        return json_response({"agent_id": agent_id, "registered_at": time_text(agent.registered_at)},
                             status)

    @app.get("/api/v1/agents/<agent_id>/tasks")
    def agent_tasks(agent_id):
        require_agent(tokens, agent_id)
        if not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise api_error(404, "agent not found: agent ids are 1-64 letters, digits, '.', '_' "
                                 "or '-'", "agent_id")
        updated = Agent.update(last_seen_at=utc_now()).where(Agent.id == agent_id).execute()
        if not updated:
            raise api_error(404, f"agent {agent_id} is not registered; register with "
                                 f"PUT /api/v1/agents/{agent_id} first", "agent_id")
        agent = Agent.get(Agent.id == agent_id)
        labels = agent_labels(agent)
        tasks = [task for task in Task.select().where(Task.state == "active").order_by(Task.created_at, Task.id)
                 if targets(task, agent_id, labels)]
        pending = pending_manual_runs(agent, tasks)
        items = []
        for task in tasks:
            item = task_json(task)
            if task.id in pending:
                item["manual_runs"] = pending[task.id]
            items.append(item)
        return json_response({"agent_id": agent_id, "tasks": items})

    def pending_manual_runs(agent: Agent, tasks: list[Task]) -> dict[str, list[dict]]:
        """Return the manual runs that `agent` has yet to run, by task id.

        A manual run is for the agents registered by its request, for `MANUAL_RUN_WINDOW`,
        until the agent reports it.
        """
        since = max(utc_now() - MANUAL_RUN_WINDOW, agent.registered_at)
        task_ids = {task.id for task in tasks}
        recent = [manual for manual in ManualRun.select().where(ManualRun.requested_at >= since)
                  .order_by(ManualRun.requested_at) if manual.task_id in task_ids]
        if not recent:
            return {}
        reported = {row.manual_run for row in Result.select(Result.manual_run).where(
            (Result.agent_id == agent.id) & Result.manual_run.in_([manual.id for manual in recent]))}
        pending: dict[str, list[dict]] = {}
        for manual in recent:
            if manual.id not in reported:
                pending.setdefault(manual.task_id, []).append(
                    {"run_id": manual.id, "requested_at": time_text(manual.requested_at)})
        return pending

    @app.get("/api/v1/agents")
    def list_agents():
        require_operator(tokens, admin=False)
        threshold = online_since()
        agents = []
        for agent in Agent.select().order_by(Agent.id):
            agents.append({
                "agent_id": agent.id, "hostname": agent.hostname, "platform": agent.platform,
                "version": agent.version, "push_url": agent.push_url,
                "registered_at": time_text(agent.registered_at),
                "last_seen_at": time_text(agent.last_seen_at),
                "state": "online" if agent.last_seen_at >= threshold else "offline",
                "labels": agent_labels(agent), "clock_offset": agent.clock_offset,
                "outbox_depth": agent.outbox_depth, "outbox_dropped": agent.outbox_dropped,
            })
        return json_response({"agents": agents})

    add_history_routes(app, tokens, find_task)
    return app


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a number of seconds above 0")
    return number


def port_number(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: expected a number from 0 to 65535")
    return int(value)


def connection_count(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"invalid connection limit {value!r}: expected a number "
                                         "from 1 to 1000000")
    return int(value)


def run_count(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"invalid run count {value!r}: expected a number from 1 to 1000000")
    return int(value)


def thread_count(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 256:
        raise argparse.ArgumentTypeError(f"invalid thread count {value!r}: expected a number from 1 to 256")
    return int(value)


# 100 years. Far larger lifetimes overflow timedelta or push the expiry past datetime's
# year 9999, so the limit is checked at start instead of failing at enrollment.
MAX_AGENT_TOKEN_LIFETIME_DAYS = 36500.0


def lifetime_days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        days = -1.0
    if not 0 <= days <= MAX_AGENT_TOKEN_LIFETIME_DAYS:
        raise argparse.ArgumentTypeError(
            f"invalid lifetime {value!r}: expected a number of days from 0 (never expire) to "
            f"{MAX_AGENT_TOKEN_LIFETIME_DAYS:g}, fractions allowed")
    return days


def build_parser() -> argparse.ArgumentParser:
    # Without allow_abbrev=False, --admin-token VALUE would be taken for --admin-token-file.
    parser = argparse.ArgumentParser(description="Serve the taskscheduler REST API with waitress.",
                                     allow_abbrev=False)
    parser.add_argument("--host", default=os.environ.get("TASKSCHEDULER_HOST", "127.0.0.1"),
                        help="address to listen on (env TASKSCHEDULER_HOST; default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=os.environ.get("TASKSCHEDULER_PORT", "8080"),
                        help="TCP port to listen on, 0-65535 (env TASKSCHEDULER_PORT; default: 8080)")
    parser.add_argument("--data-dir", default=os.environ.get("TASKSCHEDULER_DATA_DIR", "data"),
                        help="directory of the default SQLite database (env TASKSCHEDULER_DATA_DIR; "
                             "default: ./data)")
    parser.add_argument("--database", default=os.environ.get("TASKSCHEDULER_DATABASE"), metavar="URL",
                        help="peewee database URL, such as sqlite:///data/taskscheduler.db or "
                             "postgresql://user@host:5432/name (env TASKSCHEDULER_DATABASE; "
                             "default: DATA_DIR/taskscheduler.db)")
    parser.add_argument("--threads", type=thread_count, default=16,
                        help="waitress worker threads, 1-256 (default: 16)")
    parser.add_argument("--connection-limit", type=connection_count, default=1000, metavar="N",
                        help="open connections at most; each agent keeps one open, so this bounds "
                             "the number of agents (default: 1000; raise the open-file limit with it)")
    parser.add_argument("--agent-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="an agent not heard from for this long is offline and no longer "
                             "expected to report (default: 30)")
    parser.add_argument("--report-grace", type=positive_float, default=30.0, metavar="SECONDS",
                        help="an execution is complete at most this long after its period ends, "
                             "even if an expected agent has not reported (default: 30)")
    parser.add_argument("--keep-runs", type=run_count, default=100, metavar="N",
                        help="executions kept per task, newest first; older reports are pruned "
                             "(default: 100)")
    parser.add_argument("--keep-days", type=positive_float, default=30.0, metavar="DAYS",
                        help="reports older than this many days are pruned, and deleted tasks go "
                             "once none of their reports is left (default: 30)")
    parser.add_argument("--prune-interval", type=positive_float, default=300.0, metavar="SECONDS",
                        help="seconds between two prunings of old history (default: 300)")
    parser.add_argument("--admin-token-file", metavar="PATH",
                        help="file of admin tokens, one per line; they may call every operator "
                             "endpoint (env TASKSCHEDULER_ADMIN_TOKENS: comma-separated tokens)")
    parser.add_argument("--read-token-file", metavar="PATH",
                        help="file of read-only tokens, one per line; they may call the GET "
                             "endpoints (env TASKSCHEDULER_READ_TOKENS: comma-separated tokens)")
    parser.add_argument("--enrollment-token-file", metavar="PATH",
                        help="file of enrollment tokens, one per line; agents enroll with one "
                             "(env TASKSCHEDULER_ENROLLMENT_TOKEN: comma-separated tokens)")
    parser.add_argument("--agent-token-lifetime", type=lifetime_days, metavar="DAYS",
                        default=os.environ.get("TASKSCHEDULER_AGENT_TOKEN_LIFETIME", "0"),
                        help="days an agent token stays valid after enrollment, fractions allowed; "
                             "an agent whose token expired enrolls again with the enrollment token "
                             "(env TASKSCHEDULER_AGENT_TOKEN_LIFETIME; default: 0, never expire)")
    parser.add_argument("--no-push", dest="push", action="store_false",
                        default=os.environ.get("TASKSCHEDULER_NO_PUSH", "") == "",
                        help="send no wake-ups to agents' push listeners: agents find new tasks at "
                             "their next sync, and the server opens no connection to any host "
                             "(env TASKSCHEDULER_NO_PUSH=1)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level for messages on stderr (default: INFO)")
    return parser


TOKEN_HELP = ("generate a token with python -c \"import secrets; print(secrets.token_urlsafe(32))\", "
              "then give it with --admin-token-file PATH and --enrollment-token-file PATH, or in "
              "the environment variables TASKSCHEDULER_ADMIN_TOKENS and TASKSCHEDULER_ENROLLMENT_TOKEN")


def load_token_config(args: argparse.Namespace) -> TokenConfig:
    """Read the tokens of the token files and environment variables; raise TokenFileError."""
    return TokenConfig.from_tokens(
        admin=read_tokens(args.admin_token_file, "TASKSCHEDULER_ADMIN_TOKENS",
                          os.environ.get("TASKSCHEDULER_ADMIN_TOKENS")),
        read=read_tokens(args.read_token_file, "TASKSCHEDULER_READ_TOKENS",
                         os.environ.get("TASKSCHEDULER_READ_TOKENS")),
        enrollment=read_tokens(args.enrollment_token_file, "TASKSCHEDULER_ENROLLMENT_TOKEN",
                               os.environ.get("TASKSCHEDULER_ENROLLMENT_TOKEN")),
    )


def binding_problem(host: str, tokens: TokenConfig) -> Optional[str]:
    """Return why the server must not listen on `host` with `tokens`, or None.

    Without tokens the API lets anyone create commands that every agent runs, so it may
    listen only on a loopback address. Elsewhere it needs an admin token, for operators,
    and an enrollment token, for agents. Expired tokens count: with them the API stays
    closed, because every request with an expired token gets a 401.
    """
    if is_loopback_host(host):
        return None
    missing = [name for name, configured in (("admin", tokens.admin), ("enrollment", tokens.enrollment))
               if not configured]
    if not missing:
        return None
    return (f"--host {host} is not a loopback address, and the server has no "
            f"{' and no '.join(missing)} token: without them anyone who reaches the port could "
            f"run commands on every agent. Set them: {TOKEN_HELP}")


def warn_expired_tokens(tokens: TokenConfig, now: dt.datetime) -> None:
    """Log a warning with the number of operator and enrollment tokens of each kind that expired."""
    expired = tokens.expired_counts(now)
    if not any(expired.values()):
        return
    log.warning("%d admin, %d read and %d enrollment tokens have already expired; requests with "
                "them get 401. Remove them from the token files and variables, and restart",
                expired["admin"], expired["read"], expired["enrollment"])
    if sum(expired.values()) == len(tokens.all):
        log.warning("every token has expired, so every request except GET /healthz gets 401 "
                    "until a valid token is added and the server restarted")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    # peewee logs each query with its parameters at DEBUG, and those include push secrets.
    logging.getLogger("peewee").setLevel(logging.INFO)
    try:
        tokens = load_token_config(args)
    except TokenFileError as error:
        print(f"server.py: error: {error}", file=sys.stderr)
        return 2
    problem = binding_problem(args.host, tokens)
    if problem is not None:
        print(f"server.py: error: {problem}", file=sys.stderr)
        return 2
    url = args.database or sqlite_url(args.data_dir)
    try:
        db = open_database(url)
    except (peewee.PeeweeException, OSError, ValueError, RuntimeError) as error:
        print(f"server.py: error: cannot open database: {error}", file=sys.stderr)
        return 2

    lifetime = dt.timedelta(days=args.agent_token_lifetime) if args.agent_token_lifetime else None
    retention = RetentionPolicy(keep_runs=args.keep_runs, keep_days=args.keep_days,
                                interval=args.prune_interval)
    config = ServerConfig(agent_timeout=args.agent_timeout, report_grace=args.report_grace,
                          push=args.push, tokens=tokens, agent_token_lifetime=lifetime,
                          retention=retention)
    app = create_app(config)
    try:
        # Every agent keeps a connection open between syncs, and waitress closes idle ones
        # only after channel_timeout, so the connection limit bounds the fleet size.
        server = waitress.create_server(app, host=args.host, port=args.port, threads=args.threads,
                                        max_request_body_size=MAX_BODY_BYTES + 1,
                                        connection_limit=args.connection_limit)
    except OSError as error:
        print(f"server.py: error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    use_json_error_responses(server)

    def request_stop(signum, _frame):
        # waitress has no supported shutdown call, so the main thread leaves its loop
        # through the same exception that Ctrl-C raises.
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, request_stop)
    log.info("server %s listening on http://%s:%s, database %s (%s), agent timeout %.0f s, "
             "report grace %.0f s, %d threads", __version__, args.host, server.effective_port,
             db.__class__.__name__, _redact(url), args.agent_timeout, args.report_grace, args.threads)
    if tokens.enabled:
        log.info("tokens: %d admin, %d read, %d enrollment; agents use their enrolled tokens, "
                 "which expire %s", len(tokens.admin), len(tokens.read), len(tokens.enrollment),
                 f"{args.agent_token_lifetime:g} days after enrollment" if lifetime else "never")
        warn_expired_tokens(tokens, dt.datetime.now(UTC))
    else:
        log.warning("no tokens are set, so the API is unauthenticated: anyone who can reach "
                    "%s:%s can create commands that every agent runs. This is safe only on this "
                    "host's loopback address; %s", args.host, server.effective_port, TOKEN_HELP)
    watcher = AgentStateWatcher(args.agent_timeout)
    watcher.start()
    log.info("history: the newest %d executions per task, at most %g days, pruned every %g s",
             retention.keep_runs, retention.keep_days, retention.interval)
    pruner = RetentionThread(retention)
    pruner.start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # waitress usually handles it inside run() and returns
    finally:
        log.info("stopping")
        watcher.stop()
        pruner.stop()
        server.close()
        app.config["taskscheduler.pusher"].shutdown()
        db.close()
    log.info("stopped")
    return 0


def _redact(url: str) -> str:
    """Hide the password of a database URL for the log."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


if __name__ == "__main__":
    sys.exit(main())
