"""The agent's push listener: signed wake-ups that make the agent sync, and what it rejects.

Each test starts a real Agent (never run) with its listener on 127.0.0.1 and sends real
HTTP requests, signed by the server's own `push.wakeup_request`.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

import agent
import push
from agent import Credentials, PushVerifier

# The Agent constructor needs a server URL, but no test sends anything to it.
UNUSED_SERVER_URL = "http://127.0.0.1:9"
AGENT_ID = "push-test"
PUSH_SECRET = "push-secret-of-the-test-agent-0123456789"
TASK_ID = "0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae"


def start_listening_agent(state_dir: str, push_secret):
    listening = agent.Agent(server_url=UNUSED_SERVER_URL, state_dir=state_dir, agent_id=AGENT_ID)
    if push_secret is not None:
        listening.client.credentials = Credentials(AGENT_ID, "agent-token-unused-here", push_secret)
    listener = agent.start_push_listener(listening, "127.0.0.1", 0)
    return listening, listener


@pytest.fixture(params=["enrolled", "open"])
def listening(request, tmp_path):
    """A real Agent with its listener; enrolled ones have a push secret. Yields (agent, base URL)."""
    secret = PUSH_SECRET if request.param == "enrolled" else None
    listening_agent, listener = start_listening_agent(str(tmp_path / "state"), secret)
    yield listening_agent, f"http://127.0.0.1:{listener.server_address[1]}"
    listener.shutdown()
    listener.server_close()
    listening_agent.wait_for_runs()
    listening_agent.store.close()


@pytest.fixture
def enrolled(tmp_path):
    listening_agent, listener = start_listening_agent(str(tmp_path / "state"), PUSH_SECRET)
    yield listening_agent, f"http://127.0.0.1:{listener.server_address[1]}"
    listener.shutdown()
    listener.server_close()
    listening_agent.wait_for_runs()
    listening_agent.store.close()


@pytest.fixture
def http():
    """A requests session that ignores proxy settings from the environment."""
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


def signed_wakeup(secret=PUSH_SECRET, agent_id=AGENT_ID, now=None):
    return push.wakeup_request(push.PushTarget(agent_id, "http://unused", secret), TASK_ID, now=now)


def send(http, base_url, body, headers):
    return http.post(base_url + agent.WAKEUP_PATH, data=body, headers=headers, timeout=5)


def sync_requested(listening_agent) -> bool:
    return listening_agent._sync_requested.is_set()


def assert_rejected(response, listening_agent, fragment):
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert fragment in response.json()["error"]
    assert not sync_requested(listening_agent)


def test_signed_wakeup_requests_sync(listening, http):
    listening_agent, base_url = listening
    body, headers = signed_wakeup(secret=listening_agent.client.push_secret)

    response = send(http, base_url, body, headers)

    assert response.status_code == 202, response.text
    assert response.json() == {"agent_id": AGENT_ID, "result": "sync requested"}
    assert sync_requested(listening_agent)


def test_wakeup_carries_no_task(listening, http):
    listening_agent, base_url = listening
    body, headers = signed_wakeup(secret=listening_agent.client.push_secret)

    send(http, base_url, body, headers)

    assert json.loads(body) == {"agent_id": AGENT_ID, "task_id": TASK_ID}
    assert listening_agent.store.tasks() == []


def test_open_agent_accepts_unsigned_wakeup(tmp_path, http):
    listening_agent, listener = start_listening_agent(str(tmp_path / "state"), None)
    try:
        body, headers = signed_wakeup(secret=None)
        response = send(http, f"http://127.0.0.1:{listener.server_address[1]}", body, headers)
    finally:
        listener.shutdown()
        listener.server_close()
        listening_agent.store.close()

    assert "X-Taskscheduler-Signature" not in headers
    assert response.status_code == 202, response.text
    assert sync_requested(listening_agent)


def test_enrolled_agent_rejects_unsigned(enrolled, http):
    listening_agent, base_url = enrolled
    body, headers = signed_wakeup(secret=None)

    response = send(http, base_url, body, headers)

    assert_rejected(response, listening_agent, "not signed")


def test_enrolled_agent_rejects_wrong_secret(enrolled, http):
    listening_agent, base_url = enrolled
    body, headers = signed_wakeup(secret="another-agents-push-secret-0123456789")

    response = send(http, base_url, body, headers)

    assert_rejected(response, listening_agent, "signature is not valid")


def test_enrolled_agent_rejects_changed_body(enrolled, http):
    listening_agent, base_url = enrolled
    body, headers = signed_wakeup()

    response = send(http, base_url, body.replace(TASK_ID.encode(), b"x" * len(TASK_ID)), headers)

    assert_rejected(response, listening_agent, "signature is not valid")


@pytest.mark.parametrize("offset, fragment", [(-61, "s old"), (61, "in the future")],
                         ids=["stale", "future"])
def test_enrolled_agent_rejects_out_of_window(enrolled, http, offset, fragment):
    listening_agent, base_url = enrolled
    body, headers = signed_wakeup(now=time.time() + offset)

    response = send(http, base_url, body, headers)

    assert_rejected(response, listening_agent, fragment)


def test_enrolled_agent_rejects_replay(enrolled, http):
    listening_agent, base_url = enrolled
    body, headers = signed_wakeup()
    first = send(http, base_url, body, headers)
    listening_agent._sync_requested.clear()

    replayed = send(http, base_url, body, headers)

    assert first.status_code == 202, first.text
    assert_rejected(replayed, listening_agent, "replayed")


def test_wakeup_for_other_agent_rejected(listening, http):
    listening_agent, base_url = listening
    body, headers = signed_wakeup(secret=listening_agent.client.push_secret, agent_id="someone-else")

    response = send(http, base_url, body, headers)

    assert response.status_code == 400, response.text
    assert response.json()["field"] == "agent_id"
    assert not sync_requested(listening_agent)


def test_task_push_path_gone(listening, http):
    """The former endpoint that took a task body no longer exists, so no command arrives by push."""
    listening_agent, base_url = listening

    response = http.post(base_url + "/api/v1/tasks/schedule", timeout=5,
                         json={"task_id": "t1", "command": "echo hi", "frequency": "1m"})

    assert response.status_code == 404
    assert agent.WAKEUP_PATH in response.json()["error"]
    assert listening_agent.store.tasks() == []
    assert not sync_requested(listening_agent)


def test_wakeup_rejects_bad_json(tmp_path, http):
    listening_agent, listener = start_listening_agent(str(tmp_path / "state"), None)
    try:
        response = send(http, f"http://127.0.0.1:{listener.server_address[1]}", b"{not json",
                        {"Content-Type": "application/json"})
    finally:
        listener.shutdown()
        listener.server_close()
        listening_agent.store.close()

    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_wakeup_get_is_405(listening, http):
    _listening_agent, base_url = listening

    response = http.get(base_url + agent.WAKEUP_PATH, timeout=5)

    assert response.status_code == 405
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Allow"] == "POST"


def test_wakeup_rejects_wrong_content_type(listening, http):
    listening_agent, base_url = listening
    body, headers = signed_wakeup(secret=listening_agent.client.push_secret)

    response = send(http, base_url, body, dict(headers, **{"Content-Type": "text/plain"}))

    assert response.status_code == 415
    assert not sync_requested(listening_agent)


def test_real_pusher_wakes_enrolled_agent(enrolled):
    listening_agent, base_url = enrolled
    pusher = push.TaskPusher(timeout=5.0)
    try:
        pusher.push(TASK_ID, [push.PushTarget(AGENT_ID, base_url, PUSH_SECRET)])
        woken = listening_agent._sync_requested.wait(10.0)
    finally:
        pusher.shutdown()

    assert woken


# ---------------------------------------------------------------------------
# The verifier alone, with the clock passed in
# ---------------------------------------------------------------------------

NOW = 1_800_000_000.0


def verifier_check(verifier, headers, body, now):
    return verifier.check(headers, body, PUSH_SECRET, now=now)


@pytest.mark.parametrize("age, accepted", [(0, True), (60, True), (61, False), (-60, True), (-61, False)])
def test_verifier_window_edges(age, accepted):
    body, headers = signed_wakeup(now=NOW - age)

    refusal = verifier_check(PushVerifier(window=60.0), headers, body, NOW)

    assert (refusal is None) == accepted, refusal


def test_verifier_forgets_nonces_after_window():
    verifier = PushVerifier(window=60.0)
    body, headers = signed_wakeup(now=NOW)
    verifier_check(verifier, headers, body, NOW)
    later_body, later_headers = signed_wakeup(now=NOW + 121)

    verifier_check(verifier, later_headers, later_body, NOW + 121)

    assert list(verifier._seen) == [later_headers[agent.PUSH_NONCE_HEADER]]


def test_verifier_rejects_bad_nonce():
    body, headers = signed_wakeup(now=NOW)
    headers[agent.PUSH_NONCE_HEADER] = "short"

    refusal = verifier_check(PushVerifier(), headers, body, NOW)

    assert "Nonce" in refusal
