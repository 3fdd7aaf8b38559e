"""Tokens end to end: real server and agent processes on 127.0.0.1 with tokens set.

These start the server with token files and variables, let a real agent enroll, run a
task, get a signed wake-up and report, and then check the files and logs they leave.
The server's check against listening publicly without tokens, and the agent's check
against plain HTTP to another host, run as real processes too. Neither binds nor connects
anywhere.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import requests

from agent import parse_time
from processes import AGENT_SCRIPT, ROOT, SERVER_SCRIPT, Api, Cluster, child_environment, wait_until

pytestmark = pytest.mark.e2e

ADMIN = "e2e-admin-token-4b1c0f6e2d9a8b7c"
READ = "e2e-read-token-9d8c7b6a5f4e3d2c"
ENROLL = "e2e-enrollment-token-1a2b3c4d5e6f7a8b"
HELLO_COMMAND = 'echo "hello from $TASKSCHEDULER_AGENT_ID"'


@pytest.fixture
def cluster(tmp_path):
    processes = Cluster(tmp_path)
    yield processes
    processes.stop_all()
    print(processes.log_tails())


def token_server(cluster: Cluster, tmp_path, log_level: str = "INFO", extra_arguments: tuple = ()):
    """Start a server with the admin token in a file, the others in variables."""
    admin_file = tmp_path / "admin-tokens"
    admin_file.write_text(f"# operators\n\n{ADMIN}\n")
    return cluster.server(extra_arguments=("--admin-token-file", str(admin_file), "--log-level", log_level,
                                           *extra_arguments),
                          environment={"TASKSCHEDULER_READ_TOKENS": READ,
                                       "TASKSCHEDULER_ENROLLMENT_TOKEN": ENROLL})


def enrolling_agent(cluster: Cluster, server, tmp_path, agent_id: str, **options):
    token_file = tmp_path / f"enroll-{agent_id}"
    token_file.write_text(ENROLL + "\n")
    return cluster.agent(server, agent_id,
                         extra_arguments=("--enrollment-token-file", str(token_file)), **options)


def credentials_of(agent) -> dict:
    return json.loads((agent.state_dir / "agent-credentials.json").read_text())


def wait_for_output(api: Api, cluster: Cluster, task_id: str, timeout: float) -> dict:
    return wait_until(lambda: api.latest_output(task_id)["outputs"] and api.latest_output(task_id),
                      timeout, lambda: f"task {task_id} has no output\n{cluster.log_tails()}")


def test_enrolled_agent_runs_task(cluster, tmp_path):
    server = token_server(cluster, tmp_path)
    agent = enrolling_agent(cluster, server, tmp_path, "web-1", listen="127.0.0.1:0",
                            sync_interval=30.0, log_level="DEBUG")
    wait_until(lambda: "sync: 0 tasks" in agent.log_text(), 10.0,
               lambda: f"agent web-1 did not enroll and sync\n{cluster.log_tails()}")
    admin, reader = Api(server.url, ADMIN), Api(server.url, READ)

    task_id = admin.create_task(HELLO_COMMAND, "every 1 seconds")
    # The agent syncs again only in 30 s, so an output within 8 s followed the wake-up.
    body = wait_for_output(reader, cluster, task_id, timeout=8.0)

    credentials_path = agent.state_dir / "agent-credentials.json"
    assert stat.S_IMODE(os.stat(credentials_path).st_mode) == 0o600
    assert set(credentials_of(agent)) == {"agent_id", "agent_token", "push_secret", "expires_at"}
    assert credentials_of(agent)["expires_at"] is None
    assert body["outputs"][0]["stdout"] == "hello from web-1\n", cluster.log_tails()
    assert "wake-up from the server (signed), syncing now" in agent.log_text(), agent.log_tail()
    assert "enrolled with" in agent.log_text(), agent.log_tail()


def test_unsigned_wakeup_rejected_by_enrolled_agent(cluster, tmp_path):
    server = token_server(cluster, tmp_path)
    agent = enrolling_agent(cluster, server, tmp_path, "web-1", listen="127.0.0.1:0", sync_interval=30.0)
    wait_until(lambda: "registered with" in agent.log_text(), 10.0, cluster.log_tails)
    push_url = Api(server.url, READ).agents()[0]["push_url"]

    response = requests.post(f"{push_url}/api/v1/sync", json={"agent_id": "web-1"}, timeout=5)

    assert push_url.startswith("http://127.0.0.1:"), push_url
    assert response.status_code == 401
    assert "not signed" in response.json()["error"]


def test_server_without_enrollment_token_in_agent(cluster, tmp_path):
    server = token_server(cluster, tmp_path)
    agent = cluster.agent(server, "web-1")

    wait_until(lambda: "--enrollment-token-file" in agent.log_text(), 10.0, cluster.log_tails)

    assert "ERROR" in agent.log_text()
    assert not (agent.state_dir / "agent-credentials.json").exists()
    assert Api(server.url, READ).agents() == []


def test_revoked_agent_logs_fix_then_enrolls_again(cluster, tmp_path):
    server = token_server(cluster, tmp_path)
    agent = enrolling_agent(cluster, server, tmp_path, "web-1")
    wait_until(lambda: "enrolled with" in agent.log_text(), 10.0, cluster.log_tails)
    first_token = credentials_of(agent)["agent_token"]
    # Restarted without the enrollment token, the agent can only report how to fix it.
    agent.extra_arguments = ()
    agent.restart()

    response = requests.delete(f"{server.url}/api/v1/agents/web-1/token",
                               headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
    wait_until(lambda: "rejected the stored token" in agent.log_text(), 10.0, cluster.log_tails)
    agent.extra_arguments = ("--enrollment-token-file", str(tmp_path / "enroll-web-1"))
    agent.restart()
    wait_until(lambda: agent.log_text().count("enrolled with") == 2, 15.0, cluster.log_tails)

    assert response.status_code == 200, response.text
    assert "delete" in agent.log_text()
    assert "agent-credentials.json" in agent.log_text()
    assert credentials_of(agent)["agent_token"] != first_token


def test_no_secret_in_logs(cluster, tmp_path):
    server = token_server(cluster, tmp_path, log_level="DEBUG")
    agent = enrolling_agent(cluster, server, tmp_path, "web-1", listen="127.0.0.1:0", log_level="DEBUG")
    wait_until(lambda: "sync: 0 tasks" in agent.log_text(), 10.0, cluster.log_tails)
    admin = Api(server.url, ADMIN)
    task_id = admin.create_task("echo secret-test", "every 1 seconds")
    wait_for_output(Api(server.url, READ), cluster, task_id, timeout=10.0)
    # Rejected calls log too: a wrong token, an agent token on an operator call, a report
    # with an admin token, and a second enrollment of the same id.
    credentials = credentials_of(agent)
    requests.get(server.url + "/api/v1/tasks", headers={"Authorization": "Bearer " + ADMIN[::-1]}, timeout=5)
    requests.get(server.url + "/api/v1/tasks",
                 headers={"Authorization": "Bearer " + credentials["agent_token"]}, timeout=5)
    admin.report(task_id, "web-1", {"stdout": "forged"})
    requests.post(server.url + "/api/v1/agents/web-1/enroll",
                  headers={"Authorization": "Bearer " + ENROLL}, timeout=5)
    agent.stop()
    server.stop()

    logs = server.log_text() + agent.log_text()
    assert "wake-up from the server (signed)" in agent.log_text()
    for name, secret in [("admin", ADMIN), ("read", READ), ("enrollment", ENROLL),
                         ("agent token", credentials["agent_token"]),
                         ("push secret", credentials["push_secret"]),
                         ("reversed admin", ADMIN[::-1])]:
        assert secret not in logs, f"the {name} appears in a log"


# ---------------------------------------------------------------------------
# Token expiry
# ---------------------------------------------------------------------------

# 0.0001 days is 8.64 seconds.
SHORT_LIFETIME_DAYS = "0.0001"
EXPIRED = "expires=2020-01-01T00:00:00Z"


def test_expired_agent_enrolls_again_and_reports(cluster, tmp_path):
    server = token_server(cluster, tmp_path, extra_arguments=("--agent-token-lifetime", SHORT_LIFETIME_DAYS))
    # The variable in the server's form, with an expiry, gives the agent the token alone.
    agent = cluster.agent(server, "web-1", environment={
        "TASKSCHEDULER_ENROLLMENT_TOKEN": f"{ENROLL} expires=2099-01-31T00:00:00Z"})
    wait_until(lambda: "enrolled with" in agent.log_text(), 10.0, cluster.log_tails)
    first = credentials_of(agent)
    task_id = Api(server.url, ADMIN).create_task(HELLO_COMMAND, "every 2 seconds")
    reader = Api(server.url, READ)

    wait_until(lambda: agent.log_text().count("enrolled with") >= 2, 30.0,
               lambda: f"agent web-1 did not enroll again\n{cluster.log_tails()}")
    # A slot after the first token's expiry ran after it, so its report used the new token.
    after_expiry = wait_until(
        lambda: (output := reader.latest_output(task_id))["outputs"]
        and parse_time(output["scheduled_for"]) > parse_time(first["expires_at"]) and output,
        20.0, lambda: f"no report of a slot after {first['expires_at']}\n{cluster.log_tails()}")

    assert first["expires_at"] is not None
    assert after_expiry["outputs"][0]["stdout"] == "hello from web-1\n"
    assert credentials_of(agent)["agent_token"] != first["agent_token"]
    assert "replacing its token that expired at" in server.log_text(), server.log_tail()
    assert "agent token of web-1 expired at" in server.log_text(), server.log_tail()
    assert "enrolling again with the enrollment token" in agent.log_text(), agent.log_tail()
    assert " ERROR " not in agent.log_text(), agent.log_tail()
    assert first["agent_token"] not in server.log_text() + agent.log_text()


def test_expired_agent_without_enrollment_token_logs_fix(cluster, tmp_path):
    server = token_server(cluster, tmp_path, extra_arguments=("--agent-token-lifetime", SHORT_LIFETIME_DAYS))
    agent = enrolling_agent(cluster, server, tmp_path, "web-1")
    wait_until(lambda: "enrolled with" in agent.log_text(), 10.0, cluster.log_tails)
    agent.extra_arguments = ()
    agent.restart()

    wait_until(lambda: "rejected the stored token" in agent.log_text(), 30.0, cluster.log_tails)

    error_lines = [line for line in agent.log_text().splitlines() if " ERROR " in line]
    assert any("expired at" in line and "--enrollment-token-file" in line for line in error_lines), \
        agent.log_tail()
    assert agent.log_text().count("enrolled with") == 1


def test_expired_operator_tokens_rejected(cluster, tmp_path):
    admin_file = tmp_path / "admin-tokens"
    admin_file.write_text(f"{ADMIN} expires=2099-01-01T00:00:00+02:00\n{ADMIN[::-1]} {EXPIRED}\n")
    server = cluster.server(extra_arguments=("--admin-token-file", str(admin_file)),
                            environment={"TASKSCHEDULER_READ_TOKENS": f"{READ} {EXPIRED}",
                                         "TASKSCHEDULER_ENROLLMENT_TOKEN": ENROLL})

    rejected = requests.get(server.url + "/api/v1/tasks", headers={"Authorization": f"Bearer {READ}"},
                            timeout=5)
    accepted = requests.get(server.url + "/api/v1/tasks", headers={"Authorization": f"Bearer {ADMIN}"},
                            timeout=5)
    wait_until(lambda: "rejected: the read token" in server.log_text(), 5.0, server.log_tail)

    assert rejected.status_code == 401
    assert rejected.headers["Content-Type"].startswith("application/json")
    assert rejected.json()["error"] == ("the read token expired at 2020-01-01T00:00:00Z; "
                                        "ask an admin of this server for a new one")
    assert 'error="invalid_token"' in rejected.headers["WWW-Authenticate"]
    assert accepted.status_code == 200
    assert "1 admin, 1 read and 0 enrollment tokens have already expired" in server.log_text()
    assert ("the read token from entry 1 of environment variable TASKSCHEDULER_READ_TOKENS "
            "expired at 2020-01-01T00:00:00Z") in server.log_text()
    for secret in (ADMIN, ADMIN[::-1], READ, ENROLL):
        assert secret not in server.log_text()


def test_expired_only_tokens_keep_api_closed(cluster, tmp_path):
    server = cluster.server(environment={"TASKSCHEDULER_ADMIN_TOKENS": f"{ADMIN} {EXPIRED}",
                                         "TASKSCHEDULER_ENROLLMENT_TOKEN": f"{ENROLL} {EXPIRED}"})

    statuses = [requests.request(method, server.url + path, headers=headers, timeout=5).status_code
                for method, path in (("GET", "/api/v1/tasks"), ("POST", "/api/v1/agents/web-1/enroll"))
                for headers in ({}, {"Authorization": f"Bearer {ADMIN}"},
                                {"Authorization": f"Bearer {ENROLL}"})]

    assert statuses == [401] * 6
    assert "every token has expired" in server.log_text(), server.log_tail()
    assert "the API is unauthenticated" not in server.log_text()


@pytest.mark.parametrize("environment, fragment", [
    ({"TASKSCHEDULER_ADMIN_TOKENS": f"{ADMIN} expires=2027-01-31"},
     "entry 1 of environment variable TASKSCHEDULER_ADMIN_TOKENS has an invalid expiry"),
    ({"TASKSCHEDULER_AGENT_TOKEN_LIFETIME": "-1"}, "invalid lifetime '-1'"),
], ids=["date-without-time", "negative-lifetime"])
def test_invalid_expiry_setting_exits(tmp_path, environment, fragment):
    # The settings are checked before the server opens its database or binds.
    completed = run_program(SERVER_SCRIPT, ["--port", "1", "--data-dir", str(tmp_path)], environment)

    assert completed.returncode == 2, completed.stderr
    assert fragment in completed.stderr
    assert ADMIN not in completed.stderr
    assert not (tmp_path / "taskscheduler.db").exists()


# ---------------------------------------------------------------------------
# Binding and transport refusals
# ---------------------------------------------------------------------------


def run_program(script, arguments, environment=None, timeout=30):
    return subprocess.run([sys.executable, str(script), *arguments], cwd=ROOT,
                          env=dict(child_environment(), **(environment or {})),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("environment", [{}, {"TASKSCHEDULER_ADMIN_TOKENS": ADMIN}],
                         ids=["no-tokens", "admin-only"])
def test_public_bind_without_tokens_exits(tmp_path, environment):
    # The check runs before the server opens its database or binds, so nothing listens.
    completed = run_program(SERVER_SCRIPT, ["--host", "0.0.0.0", "--port", "1",
                                            "--data-dir", str(tmp_path)], environment)

    assert completed.returncode == 2, completed.stderr
    assert "--enrollment-token-file" in completed.stderr
    assert "TASKSCHEDULER_ENROLLMENT_TOKEN" in completed.stderr
    assert not (tmp_path / "taskscheduler.db").exists()


def test_loopback_without_tokens_warns(cluster):
    server = cluster.server()

    assert "the API is unauthenticated" in server.log_text()
    assert Api(server.url).agents() == []


def test_token_value_option_rejected(tmp_path):
    """A token is never a plain command-line value, not even through an abbreviated option."""
    completed = run_program(SERVER_SCRIPT, ["--admin-token", ADMIN, "--data-dir", str(tmp_path)])

    assert completed.returncode == 2
    assert "unrecognized arguments" in completed.stderr


def test_agent_rejects_plain_http_to_other_host(tmp_path):
    completed = run_program(AGENT_SCRIPT, ["--server", "http://scheduler.example.net:8080",
                                           "--state-dir", str(tmp_path / "state")])

    assert completed.returncode == 2
    assert "--insecure" in completed.stderr
    assert not (tmp_path / "state").exists()
