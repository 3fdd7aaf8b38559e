"""Tokens on the REST API: operator tokens, enrollment, agent tokens and what each may do.

Every test runs against the real bottle app on a fresh SQLite file and on a fresh
PostgreSQL schema, with a server that has one token of each operator kind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging

import pytest
import webtest

import agent
import auth
import models
import server

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
ENROLL = "enrollment-token-0123456789abcdef"
SLOT_FREE_REPORT = {"stdout": "ok\n", "exit_code": 0}


@pytest.fixture
def config():
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[READ], enrollment=[ENROLL])
    return server.ServerConfig(tokens=tokens)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def enroll(app, agent_id, token=ENROLL, status=201, previous_token=None):
    if previous_token is None:
        return app.post(f"/api/v1/agents/{agent_id}/enroll", headers=bearer(token), status=status)
    return app.post_json(f"/api/v1/agents/{agent_id}/enroll", {"previous_token": previous_token},
                         headers=bearer(token), status=status)


def enrolled_agent(app, agent_id):
    """Enroll and register `agent_id`; return its agent token."""
    agent_token = enroll(app, agent_id).json["agent_token"]
    app.put_json(f"/api/v1/agents/{agent_id}", {}, headers=bearer(agent_token))
    return agent_token


def create_task(app, token=ADMIN, status=201):
    return app.post_json("/api/v1/tasks/create", {"command": "echo hi", "frequency": "every 5 minutes"},
                         headers=bearer(token), status=status)


def report(app, task_id, agent_id, token, status=201):
    return app.post_json(f"/api/v1/tasks/{task_id}/complete", dict(SLOT_FREE_REPORT, server_id=agent_id),
                         headers=bearer(token), status=status)


def assert_401(response):
    assert response.status_int == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.content_type == "application/json"
    assert set(response.json) <= {"error", "field"}
    assert response.json["error"]


PROTECTED = [
    ("GET", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks/0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae"),
    ("GET", "/api/v1/tasks/0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae/latest_output"),
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/agents/web-1/tasks"),
    ("PUT", "/api/v1/agents/web-1"),
    ("POST", "/api/v1/tasks/create"),
    ("POST", "/api/v1/tasks/0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae/complete"),
    ("POST", "/api/v1/agents/web-1/enroll"),
    ("DELETE", "/api/v1/agents/web-1/token"),
]


# ---------------------------------------------------------------------------
# Operator tokens
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
@pytest.mark.parametrize("header", [None, "Bearer", "Basic YWRtaW46YWRtaW4=", "Bearer a b",
                                    "Bearer wrong-token-0123456789abcdef", f"Token {ADMIN}"],
                         ids=["missing", "empty-bearer", "basic", "two-words", "unknown", "wrong-scheme"])
def test_request_without_valid_token_is_401(app, method, path, header):
    headers = {"Authorization": header} if header is not None else {}

    response = app.request(path, method=method, headers=headers, expect_errors=True,
                           content_type="application/json", body=b"{}")

    assert_401(response)


def test_healthz_needs_no_token(app):
    assert app.get("/healthz").json == {"status": "ok"}


@pytest.mark.parametrize("path", ["/api/v1/tasks", "/api/v1/agents"])
def test_read_token_reads_lists(app, path):
    assert app.get(path, headers=bearer(READ)).status_int == 200


def test_read_token_reads_task_and_output(app):
    task_id = create_task(app).json["task_id"]

    shown = app.get(f"/api/v1/tasks/{task_id}", headers=bearer(READ))
    output = app.get(f"/api/v1/tasks/{task_id}/latest_output", headers=bearer(READ))

    assert shown.json["task_id"] == task_id
    assert output.json["outputs"] == []


def test_read_token_cannot_create(app, pusher):
    response = create_task(app, token=READ, status=403)

    assert "admin token" in response.json["error"]
    assert app.get("/api/v1/tasks", headers=bearer(ADMIN)).json["tasks"] == []
    assert pusher.pushes == []


def test_admin_token_creates_and_reads(app):
    task_id = create_task(app).json["task_id"]

    listed = app.get("/api/v1/tasks", headers=bearer(ADMIN)).json["tasks"]

    assert [task["task_id"] for task in listed] == [task_id]


def test_bearer_scheme_case_insensitive(app):
    assert app.get("/api/v1/tasks", headers={"Authorization": f"bearer {READ}"}).status_int == 200


@pytest.mark.parametrize("token", [ENROLL, "agent"], ids=["enrollment", "agent"])
def test_non_operator_token_cannot_read(app, token):
    if token == "agent":
        token = enrolled_agent(app, "web-1")

    response = app.get("/api/v1/tasks", headers=bearer(token), status=403)

    assert "admin or read token" in response.json["error"]


def test_open_server_needs_no_token(db, pusher):
    open_app = webtest.TestApp(server.create_app(server.ServerConfig(), pusher=pusher))

    created = open_app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "1m"})

    assert created.status_int == 201
    assert open_app.put_json("/api/v1/agents/web-1", {}).status_int == 201


# ---------------------------------------------------------------------------
# Enrollment
# ---------------------------------------------------------------------------


def test_enroll_returns_credentials(app):
    response = enroll(app, "web-1")

    assert set(response.json) == {"agent_id", "agent_token", "push_secret", "expires_at"}
    assert response.json["agent_id"] == "web-1"
    assert response.json["expires_at"] is None
    assert len(response.json["agent_token"]) >= 43
    assert response.json["agent_token"] != response.json["push_secret"]


def test_enroll_stores_only_token_hash(app):
    agent_token = enroll(app, "web-1").json["agent_token"]

    row = models.Agent.get(models.Agent.id == "web-1")

    assert row.token_hash == hashlib.sha256(agent_token.encode()).hexdigest()
    stored = [str(value) for value in row.__data__.values()]
    assert not any(agent_token in value for value in stored)


@pytest.mark.parametrize("token, status", [(READ, 403), (ADMIN, 403), ("agent", 403)],
                         ids=["read", "admin", "agent"])
def test_enroll_needs_enrollment_token(app, token, status):
    if token == "agent":
        token = enrolled_agent(app, "web-0")

    enroll(app, "web-1", token=token, status=status)

    assert models.Agent.get_or_none(models.Agent.id == "web-1") is None


def test_enroll_rejects_invalid_id(app):
    response = app.post("/api/v1/agents/-bad/enroll", headers=bearer(ENROLL), status=400)

    assert response.json["field"] == "agent_id"


def test_reenroll_enrolled_id_rejected(app):
    first_token = enrolled_agent(app, "web-1")

    response = enroll(app, "web-1", status=409)

    assert "DELETE /api/v1/agents/web-1/token" in response.json["error"]
    assert app.get("/api/v1/agents/web-1/tasks", headers=bearer(first_token)).status_int == 200


def test_revoked_agent_enrolls_again(app):
    old_token = enrolled_agent(app, "web-1")

    app.delete("/api/v1/agents/web-1/token", headers=bearer(ADMIN))
    refused = app.get("/api/v1/agents/web-1/tasks", headers=bearer(old_token), expect_errors=True)
    new_token = enroll(app, "web-1").json["agent_token"]

    assert_401(refused)
    assert new_token != old_token
    assert app.get("/api/v1/agents/web-1/tasks", headers=bearer(new_token)).status_int == 200


@pytest.mark.parametrize("token", [READ, ENROLL], ids=["read", "enrollment"])
def test_revoke_needs_admin(app, token):
    agent_token = enrolled_agent(app, "web-1")

    app.delete("/api/v1/agents/web-1/token", headers=bearer(token), status=403)

    assert app.get("/api/v1/agents/web-1/tasks", headers=bearer(agent_token)).status_int == 200


def test_revoke_unknown_agent_is_404(app):
    app.delete("/api/v1/agents/nobody/token", headers=bearer(ADMIN), status=404)


def test_agent_registered_before_tokens_enrolls(app):
    models.Agent.create(id="old-1")

    agent_token = enroll(app, "old-1").json["agent_token"]

    assert app.put_json("/api/v1/agents/old-1", {}, headers=bearer(agent_token)).status_int == 200


def test_open_server_has_no_enrollment(db, pusher):
    open_app = webtest.TestApp(server.create_app(server.ServerConfig(), pusher=pusher))

    response = open_app.post("/api/v1/agents/web-1/enroll", status=404)

    assert "without tokens" in response.json["error"]


# ---------------------------------------------------------------------------
# Agent tokens
# ---------------------------------------------------------------------------


def test_agent_registers_and_fetches_as_itself(app):
    agent_token = enrolled_agent(app, "web-1")
    create_task(app)

    tasks = app.get("/api/v1/agents/web-1/tasks", headers=bearer(agent_token)).json["tasks"]

    assert len(tasks) == 1


@pytest.mark.parametrize("method", ["PUT", "GET"])
def test_agent_cannot_act_as_other(app, method):
    agent_token = enrolled_agent(app, "web-1")
    enrolled_agent(app, "web-2")
    path = "/api/v1/agents/web-2" if method == "PUT" else "/api/v1/agents/web-2/tasks"

    response = app.request(path, method=method, headers=bearer(agent_token), body=b"{}",
                           content_type="application/json", expect_errors=True)

    assert response.status_int == 403
    assert "only agent web-2 itself" in response.json["error"]


@pytest.mark.parametrize("token", [ADMIN, READ, ENROLL], ids=["admin", "read", "enrollment"])
def test_operator_token_cannot_act_as_agent(app, token):
    enrolled_agent(app, "web-1")

    app.put_json("/api/v1/agents/web-1", {}, headers=bearer(token), status=403)
    app.get("/api/v1/agents/web-1/tasks", headers=bearer(token), status=403)


def test_complete_as_itself_stored(app):
    agent_token = enrolled_agent(app, "web-1")
    task_id = create_task(app).json["task_id"]

    response = report(app, task_id, "web-1", agent_token)

    assert response.json["agent_id"] == "web-1"


def test_complete_rejects_other_agent(app):
    agent_token = enrolled_agent(app, "web-1")
    enrolled_agent(app, "web-2")
    task_id = create_task(app).json["task_id"]

    response = report(app, task_id, "web-2", agent_token, status=403)

    assert "another agent" in response.json["error"]
    assert models.Result.select().count() == 0


@pytest.mark.parametrize("token", [ADMIN, READ, ENROLL], ids=["admin", "read", "enrollment"])
def test_complete_rejects_operator_token(app, token):
    enrolled_agent(app, "web-1")
    task_id = create_task(app).json["task_id"]

    response = report(app, task_id, "web-1", token, status=403)

    assert "own token" in response.json["error"]
    assert models.Result.select().count() == 0


def test_complete_unknown_task_stays_404(app):
    agent_token = enrolled_agent(app, "web-1")

    response = report(app, "0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae", "web-1", agent_token, status=404)

    assert response.json["field"] == "task_id"


def test_complete_unknown_task_without_token_is_401(app):
    response = app.post_json("/api/v1/tasks/0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae/complete",
                             dict(SLOT_FREE_REPORT, server_id="web-1"), expect_errors=True)

    assert_401(response)


def test_may_report_unassigned_task():
    """The one check that decides whether an agent may report a task."""
    task = models.Task(id="0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae")

    assert auth.may_report(auth.Identity("agent", "web-1"), task, "web-1") is None
    assert auth.may_report(auth.Identity("agent", "web-1"), task, "web-2") is not None
    assert auth.may_report(auth.Identity("admin"), task, "web-1") is not None
    assert auth.may_report(auth.OPEN, task, "web-1") is None


def test_create_wakes_only_enrolled_agents(app, pusher):
    agent_token = enroll(app, "web-1").json["agent_token"]
    app.put_json("/api/v1/agents/web-1", {"push_url": "http://127.0.0.1:9/"}, headers=bearer(agent_token))
    models.Agent.create(id="old-1", push_url="http://127.0.0.1:10/")

    task_id = create_task(app).json["task_id"]

    [(pushed_task_id, targets)] = pusher.pushes
    row = models.Agent.get(models.Agent.id == "web-1")
    assert pushed_task_id == task_id
    assert targets == [("web-1", "http://127.0.0.1:9/", row.push_secret)]


# ---------------------------------------------------------------------------
# Token files and variables
# ---------------------------------------------------------------------------


def test_token_file_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "admin-tokens"
    path.write_text(f"# operators\n\n  {ADMIN}  \n# old: revoked\n{READ}\n")

    entries = auth.read_tokens(str(path), "X", None)

    assert [entry.token for entry in entries] == [ADMIN, READ]
    assert [entry.expires_at for entry in entries] == [None, None]
    assert [entry.origin for entry in entries] == [f"line 3 of {path}", f"line 5 of {path}"]


def test_token_variable_is_comma_separated():
    entries = auth.read_tokens(None, "X", f"{ADMIN}, {READ},")

    assert [entry.token for entry in entries] == [ADMIN, READ]
    assert entries[1].origin == "entry 2 of environment variable X"


@pytest.mark.parametrize("text", ["short", "has space inside-0123456789", "tab\there-0123456789abc"],
                         ids=["short", "space", "tab"])
def test_invalid_token_rejected_without_echo(tmp_path, text):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n{text}\n")

    with pytest.raises(auth.TokenFileError) as raised:
        auth.read_tokens(str(path), "X", None)

    assert f"line 2 of {path}" in str(raised.value)
    assert text not in str(raised.value)


def test_missing_token_file_rejected(tmp_path):
    with pytest.raises(auth.TokenFileError, match="cannot read token file"):
        auth.read_tokens(str(tmp_path / "absent"), "X", None)


def test_find_token_compares_every_token(monkeypatch):
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[READ], enrollment=[ENROLL])
    compared = []
    compare_digest = hmac.compare_digest

    def counting_compare(a, b):
        compared.append(b)
        return compare_digest(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting_compare)
    found = auth.find_token(auth.token_digest(ADMIN), tokens.all)

    assert found.kind == "admin"
    assert compared == [token.digest for token in tokens.all]


def test_find_token_returns_none_for_unknown():
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[READ])

    assert auth.find_token(auth.token_digest(READ), tokens.all).kind == "read"
    assert auth.find_token(auth.token_digest(ENROLL), tokens.all) is None
    assert auth.find_token(auth.token_digest(READ), ()) is None


def test_token_given_twice_acts_as_admin():
    tokens = auth.TokenConfig.from_tokens(admin=[ADMIN], read=[ADMIN])

    assert auth.find_token(auth.token_digest(ADMIN), tokens.all).kind == "admin"


# ---------------------------------------------------------------------------
# Expiry of operator and enrollment tokens
# ---------------------------------------------------------------------------

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
FUTURE = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365)


def test_token_file_reads_expiry(tmp_path):
    path = tmp_path / "admin-tokens"
    path.write_text(f"{ADMIN} expires=2027-01-31T00:00:00Z\n{READ}\t expires=2027-01-31T02:30:00+02:00 \n")

    entries = auth.read_tokens(str(path), "X", None)

    assert [entry.token for entry in entries] == [ADMIN, READ]
    assert entries[0].expires_at == dt.datetime(2027, 1, 31, tzinfo=dt.timezone.utc)
    assert entries[1].expires_at == dt.datetime(2027, 1, 31, 0, 30, tzinfo=dt.timezone.utc)


def test_token_variable_reads_expiry():
    entries = auth.read_tokens(None, "X", f"{ADMIN} expires=2027-01-31T00:00:00Z,{READ}")

    assert entries[0].expires_at == dt.datetime(2027, 1, 31, tzinfo=dt.timezone.utc)
    assert entries[1].expires_at is None


INVALID_EXPIRIES = {
    "no-offset": "expires=2027-01-31T00:00:00",
    "date-only": "expires=2027-01-31",
    "month-13": "expires=2027-13-01T00:00:00Z",
    "empty": "expires=",
    "other-option": "until=2027-01-31T00:00:00Z",
    "twice": "expires=2027-01-31T00:00:00Z expires=2028-01-31T00:00:00Z",
    "second-token": "other-token-0123456789abcdef",
}


@pytest.mark.parametrize("suffix", INVALID_EXPIRIES.values(), ids=INVALID_EXPIRIES.keys())
def test_invalid_expiry_rejected_without_echo(tmp_path, suffix):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n{ADMIN} {suffix}\n")

    with pytest.raises(auth.TokenFileError) as raised:
        auth.read_tokens(str(path), "X", None)

    assert f"line 2 of {path}" in str(raised.value)
    assert "expires=" in str(raised.value)
    assert ADMIN not in str(raised.value)
    assert "other-token" not in str(raised.value)


def test_invalid_expiry_in_variable_names_entry():
    with pytest.raises(auth.TokenFileError) as raised:
        auth.read_tokens(None, "TASKSCHEDULER_READ_TOKENS", f"{ADMIN},{READ} expires=tomorrow")

    assert "entry 2 of environment variable TASKSCHEDULER_READ_TOKENS" in str(raised.value)
    assert READ not in str(raised.value)


def test_token_expires_at_its_instant():
    [token] = auth.TokenConfig.from_tokens(admin=[auth.TokenEntry(ADMIN, FUTURE)]).admin

    assert not token.expired(FUTURE - dt.timedelta(microseconds=1))
    assert token.expired(FUTURE)


def expiring_config(expires_at, lifetime=None):
    entries = {kind: [auth.TokenEntry(token, expires_at, f"line 1 of {kind}-tokens")]
               for kind, token in (("admin", ADMIN), ("read", READ), ("enrollment", ENROLL))}
    return server.ServerConfig(tokens=auth.TokenConfig.from_tokens(**entries),
                               agent_token_lifetime=lifetime)


@pytest.mark.parametrize("config", [expiring_config(PAST)], ids=["expired"])
@pytest.mark.parametrize("token, kind, method, path", [
    (ADMIN, "admin", "POST", "/api/v1/tasks/create"),
    (READ, "read", "GET", "/api/v1/tasks"),
    (ENROLL, "enrollment", "POST", "/api/v1/agents/web-1/enroll"),
], ids=["admin", "read", "enrollment"])
def test_expired_operator_token_is_401(app, caplog, token, kind, method, path):
    caplog.set_level(logging.INFO, logger="taskscheduler.server")

    response = app.request(path, method=method, headers=bearer(token), expect_errors=True,
                           content_type="application/json", body=b'{"command": "true", "frequency": "1m"}')

    assert_401(response)
    assert f"the {kind} token expired at 2020-01-01T00:00:00Z" in response.json["error"]
    assert "ask an admin" in response.json["error"]
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert "expired" in response.headers["WWW-Authenticate"]
    assert f"{kind} token from line 1 of {kind}-tokens expired at 2020-01-01T00:00:00Z" in caplog.text
    assert token not in caplog.text
    assert models.Agent.select().count() == 0
    assert models.Task.select().count() == 0


@pytest.mark.parametrize("config", [expiring_config(FUTURE)], ids=["future"])
def test_token_before_expiry_accepted(app):
    create_task(app, token=ADMIN)

    assert app.get("/api/v1/tasks", headers=bearer(READ)).status_int == 200
    assert enroll(app, "web-1", token=ENROLL).status_int == 201


@pytest.mark.parametrize("config", [expiring_config(PAST)], ids=["expired"])
@pytest.mark.parametrize("method, path", PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
def test_expired_only_tokens_keep_api_closed(app, config, method, path):
    for token in (ADMIN, READ, ENROLL, "unknown-token-0123456789abcdef"):
        response = app.request(path, method=method, headers=bearer(token), expect_errors=True,
                               content_type="application/json", body=b"{}")

        assert_401(response)
    assert config.tokens.enabled
    assert server.binding_problem("0.0.0.0", config.tokens) is None


def test_start_warns_of_expired_tokens(caplog):
    tokens = auth.TokenConfig.from_tokens(
        admin=[auth.TokenEntry(ADMIN, PAST), "second-admin-token-0123456789"],
        read=[auth.TokenEntry(READ, PAST)], enrollment=[auth.TokenEntry(ENROLL, FUTURE)])
    caplog.set_level(logging.INFO, logger="taskscheduler.server")

    server.warn_expired_tokens(tokens, dt.datetime.now(dt.timezone.utc))

    assert "1 admin, 1 read and 0 enrollment tokens have already expired" in caplog.text
    assert "every token has expired" not in caplog.text
    assert ADMIN not in caplog.text
    assert READ not in caplog.text


def test_start_warns_when_every_token_expired(caplog):
    tokens = expiring_config(PAST).tokens
    caplog.set_level(logging.INFO, logger="taskscheduler.server")

    server.warn_expired_tokens(tokens, dt.datetime.now(dt.timezone.utc))

    assert "1 admin, 1 read and 1 enrollment tokens have already expired" in caplog.text
    assert "every token has expired" in caplog.text


def test_start_is_quiet_without_expired_tokens(caplog):
    caplog.set_level(logging.INFO, logger="taskscheduler.server")

    server.warn_expired_tokens(expiring_config(FUTURE).tokens, dt.datetime.now(dt.timezone.utc))

    assert caplog.text == ""


# ---------------------------------------------------------------------------
# Agent token lifetime
# ---------------------------------------------------------------------------


def expire_agent_token(agent_id):
    """Move the agent's token expiry into the past, as if its lifetime had passed."""
    past = models.utc_now() - dt.timedelta(seconds=1)
    models.Agent.update(token_expires_at=past).where(models.Agent.id == agent_id).execute()


@pytest.mark.parametrize("config", [expiring_config(None, dt.timedelta(days=2))], ids=["2-days"])
def test_enroll_returns_expiry(app):
    response = enroll(app, "web-1")

    row = models.Agent.get(models.Agent.id == "web-1")
    assert row.token_expires_at - row.enrolled_at == dt.timedelta(days=2)
    assert agent.parse_time(response.json["expires_at"]).replace(tzinfo=None) == row.token_expires_at


def test_enroll_without_lifetime_never_expires(app):
    agent_token = enrolled_agent(app, "web-1")

    row = models.Agent.get(models.Agent.id == "web-1")
    assert row.token_expires_at is None
    assert app.get("/api/v1/agents/web-1/tasks", headers=bearer(agent_token)).status_int == 200


@pytest.mark.parametrize("config", [expiring_config(None, dt.timedelta(days=2))], ids=["2-days"])
def test_expired_agent_token_is_401(app, caplog):
    agent_token = enrolled_agent(app, "web-1")
    expire_agent_token("web-1")
    caplog.set_level(logging.INFO, logger="taskscheduler.server")

    response = app.get("/api/v1/agents/web-1/tasks", headers=bearer(agent_token), expect_errors=True)

    assert_401(response)
    assert "the agent token of web-1 expired at" in response.json["error"]
    assert "POST /api/v1/agents/web-1/enroll" in response.json["error"]
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert "agent token of web-1 expired at" in caplog.text
    assert agent_token not in caplog.text


@pytest.mark.parametrize("config", [expiring_config(None, dt.timedelta(days=2))], ids=["2-days"])
def test_expired_agent_enrolls_again(app, caplog):
    old_token = enrolled_agent(app, "web-1")
    expire_agent_token("web-1")
    caplog.set_level(logging.INFO, logger="taskscheduler.server")

    response = enroll(app, "web-1", previous_token=old_token)
    old_refused = app.get("/api/v1/agents/web-1/tasks", headers=bearer(old_token), expect_errors=True)
    new_token = response.json["agent_token"]

    assert new_token != old_token
    assert response.json["expires_at"] is not None
    assert app.get("/api/v1/agents/web-1/tasks", headers=bearer(new_token)).status_int == 200
    assert_401(old_refused)
    assert "not valid" in old_refused.json["error"]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert any("replacing its token that expired at" in record.getMessage() for record in warnings)


@pytest.mark.parametrize("config", [expiring_config(None, dt.timedelta(days=2))], ids=["2-days"])
def test_expired_id_needs_previous_token(app):
    old_token = enrolled_agent(app, "web-1")
    expire_agent_token("web-1")

    # Someone else with the enrollment token cannot take the id when its token expires.
    enroll(app, "web-1", status=409)
    enroll(app, "web-1", previous_token="not-the-token-of-web-1-0123456789", status=409)
    bad = enroll(app, "web-1", previous_token=["list"], status=400)
    response = enroll(app, "web-1", previous_token=old_token)

    assert bad.json["field"] == "previous_token"
    assert app.get("/api/v1/agents/web-1/tasks",
                   headers=bearer(response.json["agent_token"])).status_int == 200


@pytest.mark.parametrize("config", [expiring_config(None, dt.timedelta(days=2))], ids=["2-days"])
def test_unexpired_agent_enroll_still_409(app):
    agent_token = enrolled_agent(app, "web-1")

    enroll(app, "web-1", status=409)

    assert app.get("/api/v1/agents/web-1/tasks", headers=bearer(agent_token)).status_int == 200


@pytest.mark.parametrize("config", [expiring_config(None, dt.timedelta(days=2))], ids=["2-days"])
def test_revoke_clears_expiry(app):
    enrolled_agent(app, "web-1")

    app.delete("/api/v1/agents/web-1/token", headers=bearer(ADMIN))

    row = models.Agent.get(models.Agent.id == "web-1")
    assert row.token_hash is None
    assert row.token_expires_at is None
