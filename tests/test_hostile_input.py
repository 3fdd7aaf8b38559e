"""Hostile and broken input: request bodies and server responses that once crashed a thread or gave a 500."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time

import pytest

import agent
import models


def create_body(**fields):
    return dict({"command": "true", "frequency": "every 1 minutes"}, **fields)


def post_raw(app, path, raw: bytes, status):
    return app.post(path, raw, headers={"Content-Type": "application/json"}, status=status)


def test_create_rejects_deep_nesting(app):
    raw = b'{"command": "true", "frequency": "1m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    response = post_raw(app, "/api/v1/tasks/create", raw, status=400)

    assert "nested too deeply" in response.json["error"]
    assert app.get("/api/v1/tasks").json["tasks"] == []


def test_create_rejects_huge_integer(app):
    raw = json.dumps(create_body()).encode()[:-1] + b', "x": ' + b"9" * 5000 + b"}"

    response = post_raw(app, "/api/v1/tasks/create", raw, status=400)

    assert "not valid JSON" in response.json["error"]


@pytest.mark.parametrize("field", ["catchup", "jitter", "timeout"])
def test_create_rejects_400_digit_option(app, field):
    raw = json.dumps(create_body()).encode()[:-1] + f', "{field}": '.encode() + b"9" * 400 + b"}"

    response = post_raw(app, "/api/v1/tasks/create", raw, status=400)

    assert response.json["field"] == field


def test_create_rejects_surrogate_in_environment(app):
    raw = json.dumps(create_body()).encode()[:-1] + b', "environment": {"X": "\\ud800"}}'

    response = post_raw(app, "/api/v1/tasks/create", raw, status=400)

    assert response.json["field"] == "environment"


def test_complete_rejects_huge_byte_count(app):
    task_id = app.post_json("/api/v1/tasks/create", create_body()).json["task_id"]

    response = app.post_json(f"/api/v1/tasks/{task_id}/complete",
                             {"server_id": "web-1", "stdout": "x", "stdout_bytes": 2 ** 63},
                             status=400)

    assert response.json["field"] == "stdout_bytes"
    assert models.Result.select().count() == 0


def test_agent_tasks_rejects_nul_in_id(app):
    response = app.get("/api/v1/agents/a%00b/tasks", status=404)

    assert response.json["field"] == "agent_id"


def test_task_rejects_path_characters_in_id():
    with pytest.raises(agent.TaskError) as raised:
        agent.Task.from_json({"task_id": "../../agents/x?y=1#", "command": "true", "frequency": "1m"})

    assert raised.value.field == "task_id"


@pytest.mark.parametrize("field, value", [
    ("exit_code", 3.0), ("stdout_bytes", 5.0), ("missed_slots", 2.0),
])
def test_complete_accepts_integral_float(app, field, value):
    # JSON Schema counts 3.0 as an integer; schemathesis sent such values and got 400.
    task_id = app.post_json("/api/v1/tasks/create", create_body()).json["task_id"]
    body = {"server_id": "web-1", "stdout": "x", field: value}
    if field == "missed_slots":
        body.update(status="missed")

    response = app.post_json(f"/api/v1/tasks/{task_id}/complete", body, status=201)

    assert response.json["duplicate"] is False
    stored = models.Result.get()
    assert getattr(stored, field) == int(value)
    assert isinstance(getattr(stored, field), int)


@pytest.mark.parametrize("field, value", [
    ("exit_code", 3.5), ("exit_code", True), ("stdout_bytes", 1e300), ("missed_slots", 0.0),
])
def test_complete_rejects_non_integer(app, field, value):
    task_id = app.post_json("/api/v1/tasks/create", create_body()).json["task_id"]
    body = {"server_id": "web-1", field: value, "status": "missed" if field == "missed_slots" else None}

    response = app.post_json(f"/api/v1/tasks/{task_id}/complete", body, status=400)

    assert response.json["field"] == field


def test_register_accepts_integral_float_counts(app):
    response = app.put_json("/api/v1/agents/web-1", {"outbox_depth": 7.0, "outbox_dropped": 0.0}, status=201)

    assert response.json["agent_id"] == "web-1"
    assert app.get("/api/v1/agents").json["agents"][0]["outbox_depth"] == 7


@pytest.mark.parametrize("push_url", ["http://host\x85name/", "http://host/\u2028x", "http://host/\x9b",
                                      "http://ho\ufeffst\u3000/"])
def test_register_rejects_push_url_with_unicode_space(app, push_url):
    # schemathesis sent U+0085, which the document's ECMA-262 pattern allowed and the
    # server rejected; the server also accepted C1 controls such as U+009B.
    response = app.put_json("/api/v1/agents/web-1", {"push_url": push_url}, status=400)

    assert response.json["field"] == "push_url"


# ---------------------------------------------------------------------------
# The agent against a misbehaving server
# ---------------------------------------------------------------------------


class FakeServer:
    """An HTTP server on 127.0.0.1 that returns responses a test scripts, and counts task-list fetches."""

    def __init__(self, task_list_answers: list[bytes], trickle_seconds: float = 0.0):
        self.answers = list(task_list_answers)
        self.fetches = 0
        self.trickle_seconds = trickle_seconds
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fake.trickle_seconds:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(fake.trickle_seconds)
                else:
                    self.wfile.write(body)

            def do_PUT(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.reply(b'{"agent_id": "web-1"}')

            def do_GET(self):
                fake.fetches += 1
                answer = fake.answers.pop(0) if len(fake.answers) > 1 else fake.answers[0]
                self.reply(answer)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_sync_survives_bad_task_list(tmp_path):
    fake = FakeServer([b'{"tasks": null}', b'{"tasks": 5}', b'{"tasks": []}'])
    synced_agent = agent.Agent(fake.url, str(tmp_path / "state"), agent_id="web-1", sync_interval=0.2)
    synced_agent._sync_backoff = agent.Backoff(initial=0.2, maximum=0.2)
    thread = threading.Thread(target=synced_agent.sync_forever, daemon=True)
    thread.start()

    deadline = time.monotonic() + 10
    while fake.fetches < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    synced_agent.stop_event.set()
    thread.join(5)
    fake.close()

    assert fake.fetches >= 4


def test_trickling_server_times_out(tmp_path):
    fake = FakeServer([b'{"tasks": []}' + b" " * 200], trickle_seconds=0.1)
    client = agent.ServerClient(fake.url, "web-1", timeout=1.0)

    started = time.monotonic()
    with pytest.raises(agent.ServerError) as raised:
        client.fetch_tasks()
    elapsed = time.monotonic() - started
    fake.close()

    assert "timed out" in str(raised.value)
    assert elapsed < 5.0, elapsed


def test_unreadable_outbox_entry_skipped(tmp_path):
    store = agent.StateStore(str(tmp_path / "state"))
    slot = dt.datetime(2026, 1, 1, tzinfo=agent.UTC)
    store.record_start("t", slot)
    store.record_finish(agent.RunResult("t", slot, slot, slot, 0, "succeeded"))
    store._connection.execute("UPDATE runs SET body = '{not json'")

    first = store.unreported()
    second = store.unreported()
    store.close()

    assert first == []
    assert second == []


def test_truncation_split_character_not_lossy():
    output = agent.BoundedOutput(20)
    output.append(("a" * 9 + "\u20ac" * 5).encode())

    assert output.truncated
    assert output.raw_base64() is None


def test_truncated_invalid_bytes_lossy():
    output = agent.BoundedOutput(20)
    output.append(b"\x80" * 40)

    assert output.raw_base64() is not None
