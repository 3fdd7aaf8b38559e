"""Overlaps, default timeouts and missed slots, with a real server and agent on 127.0.0.1.

Each case scales a minute-long schedule down to seconds: `sleep 1.5` every second, with a
timeout longer than the period, stands for a 45-second job every 30 seconds.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import models
from processes import Api, Cluster, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path):
    processes = Cluster(tmp_path)
    yield processes
    processes.stop_all()
    print(processes.log_tails())


def results_of(data_dir: Path, task_id: str) -> list[models.Result]:
    """Read the server's stored reports of a task, oldest slot first."""
    database = models.open_database(models.sqlite_url(str(data_dir)))
    try:
        with database.connection_context():
            return list(models.Result.select()
                        .where(models.Result.task == task_id)
                        .order_by(models.Result.scheduled_for))
    finally:
        database.close()


def test_overlap_skips_busy_slots(cluster, tmp_path):
    server = cluster.server()
    agent = cluster.agent(server, "web-1")
    api = Api(server.url)
    task_id = api.create_task("sleep 1.5", "every 1 seconds", timeout=10)

    def enough_reports():
        results = results_of(tmp_path / "server-data", task_id)
        statuses = [result.status for result in results]
        return results if statuses.count("succeeded") >= 3 and statuses.count("skipped") >= 2 else None

    results = wait_until(enough_reports, 20, lambda: cluster.log_tails())
    runs = [result for result in results if result.status == "succeeded"]
    skipped = [result for result in results if result.status == "skipped"]

    for earlier, later in zip(runs, runs[1:]):
        assert later.started_at >= earlier.finished_at, (earlier.scheduled_for, later.scheduled_for)
    for run in runs:
        lag = (run.started_at - run.scheduled_for).total_seconds()
        assert lag < 0.5, (run.scheduled_for, lag, agent.log_tail())
    for result in skipped:
        assert result.started_at is None
        assert "still going" in result.reason
    assert {result.scheduled_for for result in runs}.isdisjoint(
        {result.scheduled_for for result in skipped})


def test_default_timeout_ends_endless_run(cluster, tmp_path):
    # The default time limit ends each run when the next slot is due, so no slot is skipped.
    server = cluster.server()
    cluster.agent(server, "web-1")
    api = Api(server.url)
    task_id = api.create_task("echo begin; sleep 600", "every 2 seconds")

    def timed_out_twice():
        results = results_of(tmp_path / "server-data", task_id)
        timed_out = [result for result in results if result.status == "timed_out"]
        return timed_out if len(timed_out) >= 2 else None

    timed_out = wait_until(timed_out_twice, 30, lambda: cluster.log_tails())

    for result in timed_out:
        duration = (result.finished_at - result.started_at).total_seconds()
        assert 1.9 <= duration < 2.5, duration
        assert result.exit_code != 0
        assert result.stdout == "begin\n"
    statuses = [result.status for result in results_of(tmp_path / "server-data", task_id)]
    assert "skipped" not in statuses, statuses


def test_stopped_agent_reports_missed_slots(cluster, tmp_path):
    server = cluster.server()
    agent = cluster.agent(server, "web-1")
    api = Api(server.url)
    task_id = api.create_task("true", "every 1 seconds")
    wait_until(lambda: any(result.status == "succeeded"
                           for result in results_of(tmp_path / "server-data", task_id)),
               15, lambda: cluster.log_tails())

    agent.stop()
    stopped_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    wait_until(lambda: dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
               >= stopped_at + dt.timedelta(seconds=8), 15, "clock did not advance")
    agent.start()

    def missed_report():
        missed = [result for result in results_of(tmp_path / "server-data", task_id)
                  if result.status == "missed"]
        return missed[0] if missed else None

    missed = wait_until(missed_report, 15, lambda: cluster.log_tails())
    slots = [result.scheduled_for for result in results_of(tmp_path / "server-data", task_id)]

    assert missed.missed_slots >= 5, missed.missed_slots
    assert missed.first_missed < missed.scheduled_for
    assert len(slots) == len(set(slots))
