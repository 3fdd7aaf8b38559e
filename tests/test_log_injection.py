"""No value a client sends can forge a log line: control characters are escaped.

A real server process logs to a file while requests carry CR, LF and other control
characters in ids, paths, commands and agent details. Every line of its log must
still start with a timestamp. The agent's push listener and the shared log formatter
are checked in process.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket

import pytest
import requests

import agent
from processes import HTTP_TIMEOUT_SECONDS, ServerProcess

FORGED = "1999-01-01 00:00:00,000 ERROR taskscheduler.server: FORGED"
LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} [A-Z]+ [\w.]+: |--- start )")
HOSTILE = ["\n" + FORGED, "\r\n" + FORGED, "\r" + FORGED, "\x1b[2K\r" + FORGED, "\u2028" + FORGED,
           "\x85" + FORGED]


def send_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_SECONDS) as connection:
        connection.sendall(request)
        answer = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                return answer
            answer += chunk


@pytest.mark.e2e
def test_server_log_has_no_forged_line(tmp_path):
    server = ServerProcess(tmp_path / "server.log", data_dir=tmp_path / "data",
                           extra_arguments=("--log-level", "DEBUG")).start()
    try:
        session = requests.Session()
        url = server.url
        for index, hostile in enumerate(HOSTILE):
            agent_id = f"web-{index}"
            response = session.put(f"{url}/api/v1/agents/{agent_id}", timeout=HTTP_TIMEOUT_SECONDS,
                                   json={"hostname": "host" + hostile, "platform": "Linux" + hostile,
                                         "version": "1" + hostile})
            assert response.status_code == 201, response.text
            response = session.post(f"{url}/api/v1/tasks/create", timeout=HTTP_TIMEOUT_SECONDS,
                                    json={"command": "echo hi" + hostile, "frequency": "1m" + hostile})
            assert response.status_code == 400
            response = session.post(f"{url}/api/v1/tasks/create", timeout=HTTP_TIMEOUT_SECONDS,
                                    json={"command": "echo hi" + hostile, "frequency": "1m"})
            assert response.status_code == 201
            task_id = response.json()["task_id"]
            response = session.post(f"{url}/api/v1/tasks/{task_id}/complete", timeout=HTTP_TIMEOUT_SECONDS,
                                    json={"server_id": agent_id, "stdout": hostile, "reason": hostile})
            assert response.status_code == 201
            response = session.post(f"{url}/api/v1/tasks/{task_id}/complete", timeout=HTTP_TIMEOUT_SECONDS,
                                    json={"server_id": agent_id + hostile})
            assert response.status_code == 400
        for encoded in ("%0A", "%0D%0A", "%0D", "%1B", "%E2%80%A8"):
            for path in (f"/api/v1/agents/web{encoded}{FORGED.replace(' ', '%20')}/tasks",
                         f"/api/v1/tasks/x{encoded}FORGED", f"/nowhere{encoded}FORGED"):
                assert session.get(url + path, timeout=HTTP_TIMEOUT_SECONDS).status_code == 404
                assert session.put(url + path, json={}, timeout=HTTP_TIMEOUT_SECONDS).status_code in (400, 404, 405)
        # Malformed requests that waitress itself rejects.
        send_raw(server.port, b"GET /x\rFORGED HTTP/1.1\r\nHost: x\r\n\r\n")
        send_raw(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Forged: a\rFORGED\r\n\r\n")
    finally:
        server.stop()

    text = server.log_text()
    log_lines = text.split("\n")
    assert len(log_lines) > 10
    for line in log_lines:
        if line:
            assert LOG_LINE.match(line), f"broken log line: {line!r}"
            assert not line.startswith("1999-"), f"forged log line: {line!r}"
    assert "FORGED" in text  # the values were logged, escaped
    for character in "\r\x1b\x85\u2028":
        assert character not in text


def test_formatter_escapes_control_characters():
    formatter = agent.EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("waitress", logging.ERROR, __file__, 1,
                               "Exception while serving %s", ("/x\nERROR FORGED\r\x1b\u2028",), None)

    line = formatter.format(record)

    assert line == "ERROR Exception while serving /x\\nERROR FORGED\\r\\x1b\\u2028"


def test_formatter_keeps_traceback_lines():
    formatter = agent.EscapingFormatter("%(message)s")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        import sys
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info())

    text = formatter.format(record)

    assert text.startswith("failed: a\\nb\nTraceback")


@pytest.mark.parametrize("value, shown", [
    ("plain", "plain"), ("a\nb", "a\\nb"), ("tab\there", "tab\\there"), ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),
    ("ünïcode ✓", "ünïcode ✓"),
])
def test_printable_escapes_only_controls(value, shown):
    assert agent.printable(value) == shown


def test_push_listener_log_has_no_forged_line(tmp_path, caplog):
    pushed_agent = agent.Agent("http://127.0.0.1:9", str(tmp_path / "state"), agent_id="web-1")
    listener = agent.start_push_listener(pushed_agent, "127.0.0.1", 0)
    port = listener.server_address[1]
    caplog.set_level(logging.DEBUG, logger="taskscheduler.agent")
    try:
        send_raw(port, b"POST /api/v1/sync\rFORGED\x1b[1A HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 0\r\n\r\n")
        send_raw(port, b"GET /\x85FORGED\xe2\x80\xa8 HTTP/1.1\r\nHost: x\r\n\r\n")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_SECONDS)
        connection.request("POST", "/api/v1/sync", body=b"{}",
                           headers={"Content-Type": "application/json"})
        assert connection.getresponse().status == 400
        connection.close()
    finally:
        listener.shutdown()
        listener.server_close()
        pushed_agent.store.close()

    messages = [record.getMessage() for record in caplog.records if record.name == "taskscheduler.agent"]
    listener_lines = [message for message in messages if message.startswith("push listener:")]
    assert any("FORGED" in message for message in listener_lines)
    for message in listener_lines:
        assert agent.CONTROL_CHARACTERS.search(message) is None, repr(message)
