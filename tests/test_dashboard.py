"""The dashboard pages: content, HTML escaping of hostile values, headers and tokens.

Every test runs against the real bottle app on a fresh SQLite file and on a fresh
PostgreSQL schema. tests/test_dashboard_browser.py shows the same pages in Chromium.
"""

from __future__ import annotations

import base64
import datetime as dt
import re

import pytest
import webtest

import auth
import dashboard
import server

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
ENROLL = "enrollment-token-0123456789abcdef"
HOSTILE = "<script>alert(1)</script>\"'&<img src=x onerror=alert(2)>"


def basic(password, user="anyone"):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def create_task(app, command="echo hi", frequency="every 5 minutes", **options):
    return app.post_json("/api/v1/tasks/create", dict(options, command=command, frequency=frequency)).json["task_id"]


def assert_no_markup_from(text, hostile=HOSTILE):
    """Check that no tag of `hostile` reached the page unescaped."""
    assert "<script" not in text
    assert "<img" not in text
    assert "onerror=alert" not in text or "&lt;img src=x onerror=alert(2)&gt;" in text


def test_overview_lists_task_schedule(app):
    task_id = create_task(app, command="df -h /", frequency="0 9 * * MON-FRI", timezone="Europe/Berlin")

    page = app.get("/")

    assert page.status_int == 200
    assert page.content_type == "text/html"
    assert f'href="/tasks/{task_id}"' in page.text
    assert "df -h /" in page.text
    assert "at 09:00 on weekdays (Europe/Berlin)" in page.text
    assert re.search(r"next run \d{4}-\d\d-\d\d 09:00:00 Europe/Berlin, in ", page.text)
    assert "no complete run yet" in page.text


def test_overview_marks_paused_hides_deleted(app):
    paused_id = create_task(app, command="echo paused-task", frequency="every 5 minutes")
    deleted_id = create_task(app, command="echo deleted-task", frequency="every 5 minutes")
    app.post(f"/api/v1/tasks/{paused_id}/pause")
    app.delete(f"/api/v1/tasks/{deleted_id}")

    page = app.get("/").text
    paused_card = page[page.index(f'id="task-{paused_id}"'):]
    paused_card = paused_card[:paused_card.index("</section>")]
    paused_page = app.get(f"/tasks/{paused_id}").text
    deleted_page = app.get(f"/tasks/{deleted_id}").text

    assert "deleted-task" not in page
    assert "paused: no runs until it is resumed" in paused_card
    assert "next run" not in paused_card
    assert 'class="state-paused">paused<' in paused_page
    assert 'class="state-deleted">deleted<' in deleted_page
    assert re.search(r"next runs</dt>\s*<dd>\s*none", deleted_page)


def register_long_ago(app, agent_ids):
    """Register agents as if they had registered in 2019, so every later slot expects them."""
    for agent_id in agent_ids:
        app.put_json(f"/api/v1/agents/{agent_id}", {})
    server.Agent.update(registered_at=dt.datetime(2019, 1, 1)).execute()


def test_overview_shows_host_matrix(app):
    task_id = create_task(app)
    register_long_ago(app, ["web-1", "web-2", "web-3"])
    app.post_json(f"/api/v1/tasks/{task_id}/complete", {"server_id": "web-1", "stdout": "ok", "exit_code": 0})
    app.post_json(f"/api/v1/tasks/{task_id}/complete", {"server_id": "web-2", "exit_code": 7})
    assert "no complete run yet" in app.get("/").text

    app.post_json(f"/api/v1/tasks/{task_id}/complete", {"server_id": "web-3", "exit_code": 0})
    page = app.get("/")

    assert 'class="host status-succeeded" data-agent="web-1" data-status="succeeded"' in page.text
    assert 'class="host status-failed" data-agent="web-2" data-status="failed"' in page.text
    assert 'class="host status-succeeded" data-agent="web-3" data-status="succeeded"' in page.text
    assert "exit 7" in page.text
    assert re.search(r'data-agent="web-1".*?<span class="age">\d+ s ago</span>', page.text, re.S)


def test_overview_marks_silent_expected_agent(app):
    task_id = create_task(app)
    register_long_ago(app, ["web-1", "web-2"])
    # The slot's deadline passed long ago, so the execution is complete without web-2.
    app.post_json(f"/api/v1/tasks/{task_id}/complete",
                  {"server_id": "web-1", "exit_code": 0, "scheduled_for": "2020-01-01T00:00:00Z"})

    page = app.get("/")
    task_page = app.get(f"/tasks/{task_id}")

    assert "latest complete run: slot 2020-01-01 00:00:00 UTC" in page.text
    assert 'class="host status-succeeded" data-agent="web-1"' in page.text
    assert 'class="host status-none" data-agent="web-2" data-status="no report"' in page.text
    assert "complete because its deadline passed" in task_page.text
    assert "This agent was expected and has not reported this slot." in task_page.text


def test_overview_lists_agents_with_state(app, db):
    app.put_json("/api/v1/agents/web-1", {"hostname": "web-1.example.net", "outbox_depth": 3,
                                          "outbox_dropped": 2})
    app.put_json("/api/v1/agents/old-1", {})
    server.Agent.update(last_seen_at=server.utc_now().replace(year=2020)).where(
        server.Agent.id == "old-1").execute()

    page = app.get("/")

    assert re.search(r'data-agent="web-1">\s*<td>web-1</td>\s*<td class="state-online">online</td>', page.text)
    assert re.search(r'data-agent="old-1">\s*<td>old-1</td>\s*<td class="state-offline">offline</td>', page.text)
    assert "3 (2 dropped)" in page.text
    assert "web-1.example.net" in page.text


def test_task_page_shows_escaped_output(app):
    task_id = create_task(app, command=f"echo '{HOSTILE}'")
    app.put_json("/api/v1/agents/web-1", {"hostname": HOSTILE, "platform": HOSTILE, "version": "<b>1</b>"})
    app.post_json(f"/api/v1/tasks/{task_id}/complete",
                  {"server_id": "web-1", "stdout": f"out {HOSTILE}\n", "stderr": f"err {HOSTILE}\n",
                   "exit_code": 1, "reason": HOSTILE})

    page = app.get(f"/tasks/{task_id}")
    overview = app.get("/")

    assert '<pre class="stdout">out &lt;script&gt;alert(1)&lt;/script&gt;&quot;&#039;&amp;&lt;img' in page.text
    assert '<pre class="stderr">err &lt;script&gt;' in page.text
    assert "reason: &lt;script&gt;" in page.text
    assert "echo &#039;&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    for text in (page.text, overview.text):
        assert_no_markup_from(text)
        assert "<b>" not in text


def test_task_page_shows_next_fire_times(app):
    task_id = create_task(app, frequency="30 2 * * *", timezone="America/New_York")

    page = app.get(f"/tasks/{task_id}")

    assert page.text.count(" America/New_York (") == dashboard.NEXT_FIRE_TIMES
    assert "at 02:30 every day (America/New_York)" in page.text


def test_task_page_cuts_long_output(app):
    task_id = create_task(app)
    app.post_json(f"/api/v1/tasks/{task_id}/complete",
                  {"server_id": "web-1", "stdout": "x" * (dashboard.MAX_SHOWN_OUTPUT + 10) + "END"})

    page = app.get(f"/tasks/{task_id}")

    assert "x" * dashboard.MAX_SHOWN_OUTPUT in page.text
    assert "END" not in page.text
    assert f"the first {dashboard.MAX_SHOWN_OUTPUT} characters; the API returns all of it" in page.text


@pytest.mark.parametrize("task_id", ["00000000-0000-0000-0000-000000000000",
                                     "%3Cimg%20src%3Dx%20onerror%3Dalert(2)%3E"])
def test_task_page_unknown_is_html_404(app, task_id):
    page = app.get(f"/tasks/{task_id}", status=404)

    assert page.content_type == "text/html"
    assert "Task not found" in page.text
    assert_no_markup_from(page.text)


def test_pages_have_security_headers(app):
    task_id = create_task(app)
    for path in ("/", f"/tasks/{task_id}"):
        page = app.get(path)
        policy = page.headers["Content-Security-Policy"]
        nonce = re.search(r"style-src 'nonce-([A-Za-z0-9_-]+)'", policy).group(1)

        assert policy.startswith("default-src 'none';")
        assert f'<style nonce="{nonce}">' in page.text
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Cache-Control"] == "no-store"
        assert page.headers["Referrer-Policy"] == "no-referrer"


def test_pages_load_nothing_external(app):
    task_id = create_task(app)
    for path in ("/", f"/tasks/{task_id}"):
        text = app.get(path).text

        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
        assert f'<meta http-equiv="refresh" content="{dashboard.REFRESH_SECONDS}">' in text
        assert "http://" not in text
        assert "https://" not in text
        assert "<script" not in text
        assert "<link" not in text
        assert " src=" not in text


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------


@pytest.fixture
def token_app(db, pusher):
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[READ], enrollment=[ENROLL])
    return webtest.TestApp(server.create_app(server.ServerConfig(tokens=tokens), pusher=pusher))


@pytest.mark.parametrize("headers", [
    {},
    basic("wrong-token-0123456789abcdef"),
    basic(ENROLL),
    basic("", user=READ),
    {"Authorization": "Basic !!!not-base64"},
    {"Authorization": f"Bearer {ENROLL}"},
    {"Authorization": f"Digest {READ}"},
])
def test_dashboard_without_reader_token_is_401(token_app, headers):
    for path in ("/", "/tasks/00000000-0000-0000-0000-000000000000"):
        page = token_app.get(path, headers=headers, status=401)

        assert page.headers["WWW-Authenticate"] == dashboard.BASIC_CHALLENGE
        assert page.content_type == "text/html"
        assert "token as the password" in page.text


def test_dashboard_rejects_agent_token(token_app):
    agent_token = token_app.post("/api/v1/agents/web-1/enroll",
                                 headers={"Authorization": f"Bearer {ENROLL}"}).json["agent_token"]

    token_app.get("/", headers=basic(agent_token), status=401)


@pytest.mark.parametrize("headers", [basic(READ), basic(ADMIN), basic(READ, user=""),
                                     {"Authorization": f"Bearer {READ}"}])
def test_dashboard_accepts_reader_token(token_app, headers):
    task_id = token_app.post_json("/api/v1/tasks/create", {"command": "uptime", "frequency": "1m"},
                                  headers={"Authorization": f"Bearer {ADMIN}"}).json["task_id"]

    assert "uptime" in token_app.get("/", headers=headers).text
    assert "uptime" in token_app.get(f"/tasks/{task_id}", headers=headers).text


def test_dashboard_rejects_expired_read_token(db, pusher):
    expired = auth.TokenEntry(READ, dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), "line 1 of test")
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[expired])
    expired_app = webtest.TestApp(server.create_app(server.ServerConfig(tokens=tokens), pusher=pusher))

    expired_app.get("/", headers=basic(READ), status=401)
    assert expired_app.get("/", headers=basic(ADMIN)).status_int == 200


def test_open_server_dashboard_needs_no_token(app):
    assert app.get("/").status_int == 200
