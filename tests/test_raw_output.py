"""Output that is not lossless as text: the exact bytes are stored and served as base64."""

from __future__ import annotations

import base64
import datetime as dt

import agent
import models

AGENT_ID = "web-1"


def create_task(app) -> str:
    response = app.post_json("/api/v1/tasks/create", {"command": "true", "frequency": "every 1 hours"})
    return response.json["task_id"]


def run_command(tmp_path, command: str) -> dict:
    """Run `command` with the real Runner and return its report body as the agent sends it."""
    runner = agent.Runner(AGENT_ID, str(tmp_path / "work"))
    slot = dt.datetime(2026, 1, 1, tzinfo=agent.UTC)
    result = runner.run(agent.Task("t", command, "every 1 hours"), slot)
    return dict(agent._result_payload(result), server_id=AGENT_ID)


def latest_output(app, task_id: str) -> dict:
    outputs = app.get(f"/api/v1/tasks/{task_id}/latest_output").json["outputs"]
    assert len(outputs) == 1, outputs
    return outputs[0]


def test_latin1_and_nul_bytes_round_trip(app, tmp_path):
    task_id = create_task(app)
    report = run_command(tmp_path, r"printf 'caf\351\n'; printf 'a\000b\n' >&2")

    app.post_json(f"/api/v1/tasks/{task_id}/complete", report, status=201)
    output = latest_output(app, task_id)

    assert base64.b64decode(output["stdout_base64"]).hex(" ") == "63 61 66 e9 0a"
    assert base64.b64decode(output["stderr_base64"]).hex(" ") == "61 00 62 0a"
    assert output["stdout"] == "caf\ufffd\n"
    assert output["stderr"] == "a\x00b\n"
    assert output["exit_code"] == 0


def test_utf8_output_has_no_base64(app, tmp_path):
    task_id = create_task(app)
    report = run_command(tmp_path, "printf 'gr\\303\\274n\\n'")

    app.post_json(f"/api/v1/tasks/{task_id}/complete", report, status=201)
    output = latest_output(app, task_id)

    assert output["stdout"] == "gr\u00fcn\n"
    assert "stdout_base64" not in output
    assert "stdout_base64" not in report


def test_nul_stored_in_text_column(app, tmp_path, db):
    task_id = create_task(app)
    report = run_command(tmp_path, r"printf 'a\000b'")

    app.post_json(f"/api/v1/tasks/{task_id}/complete", report, status=201)
    stored = models.Result.get(models.Result.task == task_id)

    assert stored.stdout == "a\ufffdb"
    assert bytes(stored.stdout_raw) == b"a\x00b"


def test_complete_rejects_bad_base64(app):
    task_id = create_task(app)

    response = app.post_json(f"/api/v1/tasks/{task_id}/complete",
                             {"server_id": AGENT_ID, "stdout_base64": "not base64!"}, status=400)

    assert response.json["field"] == "stdout_base64"
    assert models.Result.select().count() == 0


def test_register_stores_outbox_counts(app):
    app.put_json(f"/api/v1/agents/{AGENT_ID}", {"outbox_depth": 12, "outbox_dropped": 3}, status=201)

    agents = app.get("/api/v1/agents").json["agents"]

    assert agents[0]["outbox_depth"] == 12
    assert agents[0]["outbox_dropped"] == 3


def test_register_rejects_negative_outbox_depth(app):
    response = app.put_json(f"/api/v1/agents/{AGENT_ID}", {"outbox_depth": -1}, status=400)

    assert response.json["field"] == "outbox_depth"


def test_outbox_drops_oldest_beyond_size(tmp_path):
    store = agent.StateStore(str(tmp_path / "state"), outbox_size=3)
    start = dt.datetime(2026, 1, 1, tzinfo=agent.UTC)
    for index in range(5):
        slot = start + dt.timedelta(seconds=index)
        store.record_start("t", slot)
        store.record_finish(agent.RunResult("t", slot, slot, slot, 0, "succeeded"))

    kept = [slot for _task_id, slot, _body in store.unreported()]
    stats = store.outbox_stats()
    last_slot = store.last_slot("t")
    store.close()

    assert kept == ["2026-01-01T00:00:02.000000Z", "2026-01-01T00:00:03.000000Z",
                    "2026-01-01T00:00:04.000000Z"]
    assert stats == {"outbox_depth": 3, "outbox_dropped": 2}
    assert last_slot == start + dt.timedelta(seconds=4)


