"""GET /readyz, GET /metrics, request logging and the agent state log.

The app tests run on a fresh SQLite file and on a fresh PostgreSQL schema. An unreachable
database is a PostgreSQL URL on a free port of 127.0.0.1, where nothing listens.
"""

from __future__ import annotations

import datetime as dt
import logging
import re

import peewee
import pytest
import requests
import webtest

import auth
import models
import server
from agent_states import AgentStateWatcher
from faults_support import PrivatePostgres, postgres_bin_dir
from processes import Cluster, free_port, wait_until

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
ENROLL = "enrollment-token-0123456789abcdef"


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Return the value of one sample, such as name{label="x"}; fail when it is missing."""
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"no sample {name}{{{labels}}} in:\n{text}"
    return float(match.group(1))


@pytest.fixture
def unreachable_database(db):
    """Point the models at a database that refuses connections, then back at `db`."""
    models.database.initialize(peewee.PostgresqlDatabase(
        "test", host="127.0.0.1", port=free_port(), user="postgres", connect_timeout=2))
    yield
    models.database.initialize(db)


def test_readyz_ready_with_database(app):
    response = app.get("/readyz")

    assert response.json == {"status": "ready"}
    assert response.headers["Cache-Control"] == "no-store"


def test_readyz_503_without_database(app, unreachable_database, caplog):
    response = app.get("/readyz", status=503)

    assert response.content_type == "application/json"
    assert response.json["error"].startswith("not ready: the database did not respond")
    assert "readiness check failed" in caplog.text


@pytest.mark.e2e
@pytest.mark.fault
def test_readyz_follows_database_outage(tmp_path):
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) under /usr/lib/postgresql")
    postgres = PrivatePostgres(bin_dir)
    cluster = Cluster(tmp_path)
    try:
        postgres.initialize()
        postgres.start()
        server_process = cluster.server(database_url=postgres.url)
        assert requests.get(server_process.url + "/readyz", timeout=10).status_code == 200

        postgres.stop()
        down = requests.get(server_process.url + "/readyz", timeout=10)
        assert down.status_code == 503, down.text
        assert down.json()["error"].startswith("not ready")
        assert requests.get(server_process.url + "/healthz", timeout=10).status_code == 200

        postgres.start()
        wait_until(lambda: requests.get(server_process.url + "/readyz", timeout=10).status_code == 200,
                   20, lambda: f"/readyz stayed 503 after PostgreSQL came back\n{cluster.log_tails()}")
        assert "readiness check failed: the database did not respond" in server_process.log_text()
    finally:
        cluster.stop_all()
        postgres.remove()


def test_healthz_200_without_database(app, unreachable_database):
    assert app.get("/healthz").json == {"status": "ok"}


def test_metrics_without_database(app, unreachable_database):
    text = app.get("/metrics").text

    assert metric_value(text, "taskscheduler_database_up") == 0
    assert "taskscheduler_agents{" not in text


def test_metrics_content_type(app):
    response = app.get("/metrics")

    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert metric_value(response.text, "taskscheduler_database_up") == 1


def test_metrics_count_reports_by_status(app):
    task_id = app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "1m"}).json["task_id"]
    report = {"server_id": "web-1", "exit_code": 0, "scheduled_for": "2026-01-01T00:00:00Z",
              "finished_at": "2026-01-01T00:00:03Z"}
    app.post_json(f"/api/v1/tasks/{task_id}/complete", report)
    app.post_json(f"/api/v1/tasks/{task_id}/complete", report, status=200)  # a duplicate
    app.post_json(f"/api/v1/tasks/{task_id}/complete", dict(report, server_id="web-2", exit_code=2))
    app.post_json(f"/api/v1/tasks/{task_id}/complete",
                  {"server_id": "web-3", "status": "missed", "scheduled_for": "2026-01-01T00:05:00Z",
                   "first_missed": "2026-01-01T00:01:00Z", "missed_slots": 5})

    text = app.get("/metrics").text

    assert metric_value(text, "taskscheduler_reports_total", 'status="succeeded"') == 1
    assert metric_value(text, "taskscheduler_reports_total", 'status="failed"') == 1
    assert metric_value(text, "taskscheduler_reports_total", 'status="missed"') == 1
    assert metric_value(text, "taskscheduler_missed_slots_total") == 5
    assert metric_value(text, "taskscheduler_report_latency_seconds_count") == 2
    assert metric_value(text, "taskscheduler_report_latency_seconds_sum") == 6
    assert metric_value(text, "taskscheduler_report_latency_seconds_bucket", 'le="2.5"') == 0
    assert metric_value(text, "taskscheduler_report_latency_seconds_bucket", 'le="5.0"') == 2


def test_metrics_agents_and_outbox(app):
    app.put_json("/api/v1/agents/web-1", {"outbox_depth": 4, "outbox_dropped": 1})
    app.put_json("/api/v1/agents/web-2", {})
    models.Agent.update(last_seen_at=dt.datetime(2020, 1, 1)).where(models.Agent.id == "web-2").execute()

    text = app.get("/metrics").text

    assert metric_value(text, "taskscheduler_agents", 'state="online"') == 1
    assert metric_value(text, "taskscheduler_agents", 'state="offline"') == 1
    assert metric_value(text, "taskscheduler_agent_outbox_depth", 'agent_id="web-1"') == 4
    assert metric_value(text, "taskscheduler_agent_outbox_dropped", 'agent_id="web-1"') == 1
    assert metric_value(text, "taskscheduler_agent_outbox_depth", 'agent_id="web-2"') == 0
    assert metric_value(text, "taskscheduler_agent_last_seen_timestamp_seconds",
                        'agent_id="web-2"') == dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc).timestamp()


def test_metrics_count_requests_by_route(app, monkeypatch):
    app.get("/api/v1/tasks")
    app.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000", status=404)
    app.get("/no/such/path", status=404)
    app.request("/healthz", method="PROPFIND", status=405)
    monkeypatch.setattr(server, "task_json", lambda task: 1 / 0)
    app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "1m"}, status=500,
                  expect_errors=True)

    text = app.get("/metrics").text

    assert metric_value(text, "taskscheduler_http_requests_total",
                        'method="GET",route="/api/v1/tasks",status="200"') == 1
    assert metric_value(text, "taskscheduler_http_requests_total",
                        'method="GET",route="/api/v1/tasks/<task_id>",status="404"') == 1
    assert metric_value(text, "taskscheduler_http_requests_total",
                        'method="GET",route="unmatched",status="404"') == 1
    assert metric_value(text, "taskscheduler_http_requests_total",
                        'method="other",route="unmatched",status="405"') == 1
    assert metric_value(text, "taskscheduler_http_requests_total",
                        'method="POST",route="/api/v1/tasks/create",status="500"') == 1
    assert metric_value(text, "taskscheduler_http_request_duration_seconds_count",
                        'method="GET",route="/api/v1/tasks"') == 1


def test_requests_logged_at_debug(app, caplog):
    caplog.set_level(logging.DEBUG, logger="taskscheduler.server")

    app.get("/api/v1/tasks?x=1")

    assert re.search(r"GET /api/v1/tasks 200 \d+\.\d ms", caplog.text)


@pytest.fixture
def token_app(db, pusher):
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[READ], enrollment=[ENROLL])
    return webtest.TestApp(server.create_app(server.ServerConfig(tokens=tokens), pusher=pusher))


@pytest.mark.parametrize("token", [None, ENROLL, "unknown-token-0123456789abcdef"])
def test_metrics_needs_reader_token(token_app, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    response = token_app.get("/metrics", headers=headers, status=401)

    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "admin or read token" in response.json["error"]


def test_metrics_rejects_expired_read_token(db, pusher):
    expired = auth.TokenEntry(READ, dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), "line 1 of test")
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[expired])
    expired_app = webtest.TestApp(server.create_app(server.ServerConfig(tokens=tokens), pusher=pusher))

    expired_app.get("/metrics", headers={"Authorization": f"Bearer {READ}"}, status=401)
    assert expired_app.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).status_int == 200


@pytest.mark.parametrize("token", [READ, ADMIN])
def test_metrics_accepts_reader_token(token_app, token):
    response = token_app.get("/metrics", headers={"Authorization": f"Bearer {token}"})

    assert "taskscheduler_database_up 1.0" in response.text


def test_readyz_needs_no_token(token_app):
    assert token_app.get("/readyz").json == {"status": "ready"}


# ---------------------------------------------------------------------------
# Agent state transitions
# ---------------------------------------------------------------------------


def test_watcher_logs_offline_and_online(db, caplog):
    caplog.set_level(logging.INFO, logger="taskscheduler.server")
    start = dt.datetime(2026, 1, 1, 12, 0, 0)
    models.Agent.create(id="web-1", registered_at=start, last_seen_at=start)
    models.Agent.create(id="web-2", registered_at=start, last_seen_at=start - dt.timedelta(hours=1))
    watcher = AgentStateWatcher(agent_timeout=30)

    assert watcher.check(start) == []
    assert "agents at start: 1 online, 1 offline" in caplog.text
    assert watcher.check(start + dt.timedelta(seconds=29)) == []

    assert watcher.check(start + dt.timedelta(seconds=31)) == [("web-1", "offline")]
    assert "agent web-1 is offline: last seen 2026-01-01T12:00:00Z, 31 s ago (agent timeout 30 s)" in caplog.text
    assert watcher.check(start + dt.timedelta(seconds=40)) == []

    models.Agent.update(last_seen_at=start + dt.timedelta(seconds=100)).execute()
    assert watcher.check(start + dt.timedelta(seconds=101)) == [("web-1", "online"), ("web-2", "online")]
    assert "agent web-1 is online again after 100 s without contact" in caplog.text
    assert "agent web-2 is online again after 3700 s without contact" in caplog.text


def test_watcher_skips_new_agents(db, caplog):
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    watcher = AgentStateWatcher(agent_timeout=30)
    watcher.check(now)
    models.Agent.create(id="web-9", registered_at=now, last_seen_at=now)

    assert watcher.check(now + dt.timedelta(seconds=1)) == []
    assert watcher.check(now + dt.timedelta(seconds=60)) == [("web-9", "offline")]
