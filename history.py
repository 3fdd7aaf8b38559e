"""The run history of a task: every report, newest first, and one run with its output."""

from __future__ import annotations

import base64
from typing import Any, Callable, Optional

import bottle

from agent import AGENT_ID_PATTERN
from auth import TokenConfig, require_operator
from jsonapi import RESULT_STATUSES, api_error, json_response, time_text
from models import Result, Task
from pagination import encode_cursor, read_cursor, read_limit

# A run id is the database row id of a report, a positive integer.
MAX_RUN_ID = 2 ** 63 - 1


def output_fields(name: str, text: str, raw: Optional[bytes], truncated: bool) -> dict[str, Any]:
    """Return a stream's fields of an output: its text (left out when empty), and its
    exact bytes as base64 when the text alone is lossy.

    With the bytes at hand and no truncation, the text is decoded from them, so a NUL
    shows as NUL (escaped by JSON) rather than as the U+FFFD stored in the text column.
    A truncated text keeps its truncation marker, which the bytes lack.
    """
    fields: dict[str, Any] = {}
    if raw is not None:
        fields[f"{name}_base64"] = base64.b64encode(bytes(raw)).decode("ascii")
        if not truncated:
            text = bytes(raw).decode("utf-8", errors="replace")
    if text:
        fields[name] = text
    return fields


def run_summary(result: Result) -> dict[str, Any]:
    """Return a report without its output: the fields of a run history page."""
    summary: dict[str, Any] = {
        "run_id": result.id,
        "agent_id": result.agent_id,
        "trigger": result.trigger,
        "scheduled_for": time_text(result.scheduled_for),
        "started_at": time_text(result.started_at),
        "finished_at": time_text(result.finished_at),
        "received_at": time_text(result.received_at),
        "status": result.status,
        "exit_code": result.exit_code,
        "stdout_bytes": result.stdout_bytes,
        "stderr_bytes": result.stderr_bytes,
    }
    if result.manual_run:
        summary["manual_run_id"] = result.manual_run
    if result.late:
        summary["late"] = True
    if result.truncated:
        summary["truncated"] = True
    if result.status == "missed":
        summary.update(missed_slots=result.missed_slots, first_missed=time_text(result.first_missed))
    if result.reason:
        summary["reason"] = result.reason
    return summary


def add_history_routes(app: bottle.Bottle, tokens: TokenConfig, find_task: Callable[[str], Task]) -> None:
    """Add GET /api/v1/tasks/{task_id}/runs and GET /api/v1/tasks/{task_id}/runs/{run_id}."""

    @app.get("/api/v1/tasks/<task_id>/runs")
    def list_runs(task_id):
        require_operator(tokens, admin=False)
        task = find_task(task_id)
        limit = read_limit()
        before = read_cursor(int)
        query = Result.select(*[field for field in Result._meta.sorted_fields
                                if field.name not in ("stdout", "stderr", "stdout_raw", "stderr_raw")]
                              ).where(Result.task == task.id)
        agent_id = bottle.request.query.get("agent")
        if agent_id is not None:
            if not AGENT_ID_PATTERN.fullmatch(agent_id):
                raise api_error(400, "agent must be an agent id: 1-64 letters, digits, '.', '_' or "
                                     "'-', starting with a letter or digit", "agent")
            query = query.where(Result.agent_id == agent_id)
        status = bottle.request.query.get("status")
        if status is not None:
            if status not in RESULT_STATUSES:
                raise api_error(400, f"status must be one of {', '.join(RESULT_STATUSES)}", "status")
            query = query.where(Result.status == status)
        if before is not None:
            scheduled_for, run_id = before
            query = query.where((Result.scheduled_for < scheduled_for)
                                | ((Result.scheduled_for == scheduled_for) & (Result.id < run_id)))
        results = list(query.order_by(Result.scheduled_for.desc(), Result.id.desc()).limit(limit + 1))
        next_cursor = None
        if len(results) > limit:
            results = results[:limit]
            next_cursor = encode_cursor(results[-1].scheduled_for, results[-1].id)
        return json_response({"task_id": task.id, "runs": [run_summary(result) for result in results],
                              "next_cursor": next_cursor})

    @app.get("/api/v1/tasks/<task_id>/runs/<run_id>")
    def show_run(task_id, run_id):
        require_operator(tokens, admin=False)
        task = find_task(task_id)
        result = None
        if run_id.isascii() and run_id.isdigit() and 0 < int(run_id) <= MAX_RUN_ID:
            result = Result.get_or_none((Result.id == int(run_id)) & (Result.task == task.id))
        if result is None:
            raise api_error(404, f"run {run_id[:40]} of task {task.id} not found", "run_id")
        body = dict(run_summary(result), task_id=task.id)
        body.update(output_fields("stdout", result.stdout, result.stdout_raw, result.truncated))
        body.update(output_fields("stderr", result.stderr, result.stderr_raw, result.truncated))
        return json_response(body)
