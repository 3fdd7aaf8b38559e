"""Retention: the newest N executions per task, at most D days, and deleted tasks removed
once their history is gone. Real reports on SQLite and PostgreSQL (the `app` fixture)."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import requests

import models
from processes import HTTP_TIMEOUT_SECONDS, Cluster, wait_until
from retention import RetentionPolicy, RetentionThread, prune_history


def create_task(app, frequency="every 1 minutes"):
    return app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": frequency}).json["task_id"]


def add_reports(task_id, agent_ids, newest, count, step=dt.timedelta(minutes=1)):
    """Insert `count` executions of `task_id` ending at `newest`, one report per agent each."""
    rows = [dict(task=task_id, agent_id=agent_id, scheduled_for=newest - step * number,
                 finished_at=newest - step * number, status="succeeded", stdout="x")
            for number in range(count) for agent_id in agent_ids]
    with models.database.atomic():
        for start in range(0, len(rows), 500):
            models.Result.insert_many(rows[start:start + 500]).execute()


def slots_of(task_id):
    return sorted({row.scheduled_for for row in models.Result.select(models.Result.scheduled_for)
                   .where(models.Result.task == task_id)}, reverse=True)


def test_keeps_newest_runs_per_task(app):
    now = models.utc_now().replace(microsecond=0)
    busy = create_task(app)
    quiet = create_task(app)
    add_reports(busy, ["web-1", "web-2"], now, 250)
    add_reports(quiet, ["web-1"], now, 30)

    removed = prune_history(RetentionPolicy(keep_runs=100, keep_days=30, batch_size=64, batch_pause=0),
                            now=now)

    assert removed["runs"] == 2 * 150
    assert slots_of(busy) == [now - dt.timedelta(minutes=number) for number in range(100)]
    assert models.Result.select().where(models.Result.task == busy).count() == 200
    assert len(slots_of(quiet)) == 30


def test_removes_runs_older_than_days(app):
    now = models.utc_now().replace(microsecond=0)
    task_id = create_task(app)
    add_reports(task_id, ["web-1"], now, 10, step=dt.timedelta(days=1))

    prune_history(RetentionPolicy(keep_runs=100, keep_days=3.5, batch_pause=0), now=now)

    assert slots_of(task_id) == [now - dt.timedelta(days=number) for number in range(4)]


def test_removes_deleted_task_without_history(app):
    now = models.utc_now().replace(microsecond=0)
    emptied = create_task(app)
    kept = create_task(app)
    active = create_task(app)
    add_reports(emptied, ["web-1"], now - dt.timedelta(days=40), 3)
    add_reports(kept, ["web-1"], now, 3)
    app.post(f"/api/v1/tasks/{emptied}/run")
    app.delete(f"/api/v1/tasks/{emptied}")
    app.delete(f"/api/v1/tasks/{kept}")

    removed = prune_history(RetentionPolicy(keep_days=30, batch_pause=0), now=now)

    assert removed["tasks"] == 1
    assert app.get(f"/api/v1/tasks/{emptied}", expect_errors=True).status_int == 404
    assert app.get(f"/api/v1/tasks/{kept}").json["state"] == "deleted"
    assert len(app.get(f"/api/v1/tasks/{kept}/runs").json["runs"]) == 3
    assert app.get(f"/api/v1/tasks/{active}").json["state"] == "active"
    assert models.ManualRun.select().count() == 0


def test_removes_old_manual_runs(app):
    now = models.utc_now().replace(microsecond=0)
    task_id = create_task(app)
    run_id = app.post(f"/api/v1/tasks/{task_id}/run").json["run_id"]
    app.post(f"/api/v1/tasks/{task_id}/run")
    models.ManualRun.update(requested_at=now - dt.timedelta(days=31)).where(
        models.ManualRun.id == run_id).execute()

    removed = prune_history(RetentionPolicy(keep_days=30, batch_pause=0), now=now)

    assert removed["manual_runs"] == 1
    assert models.ManualRun.select().count() == 1


def test_requests_proceed_during_pruning(app):
    now = models.utc_now().replace(microsecond=0)
    task_id = create_task(app)
    add_reports(task_id, [f"web-{number}" for number in range(10)], now, 500)
    thread = RetentionThread(RetentionPolicy(keep_runs=1, keep_days=30, interval=3600, batch_size=100))
    pruning = threading.Thread(target=thread.prune_once)

    pruning.start()
    served = 0
    while pruning.is_alive():
        assert app.get(f"/api/v1/tasks/{task_id}").status_int == 200
        served += 1
    pruning.join()

    assert served > 1
    assert models.Result.select().where(models.Result.task == task_id).count() == 10


@pytest.mark.e2e
def test_server_prunes_in_background(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        server = cluster.server(extra_arguments=("--keep-runs", "3", "--prune-interval", "0.5"))
        cluster.agent(server, "web-1")
        session = requests.Session()
        task_id = session.post(server.url + "/api/v1/tasks/create", timeout=HTTP_TIMEOUT_SECONDS,
                               json={"command": "true", "frequency": "every 1 seconds"}).json()["task_id"]

        def runs():
            return session.get(f"{server.url}/api/v1/tasks/{task_id}/runs",
                               timeout=HTTP_TIMEOUT_SECONDS).json()["runs"]

        wait_until(lambda: "pruned history" in server.log_text(), 20,
                   lambda: f"the server never pruned\n{cluster.log_tails()}")
        assert len(runs()) <= 4
    finally:
        cluster.stop_all()
