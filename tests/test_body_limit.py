"""The request body limit of a real server process, over raw sockets on 127.0.0.1.

A body over jsonapi.MAX_BODY_BYTES is rejected with a JSON 413 before it is read in
full: from Content-Length alone, or for a chunked body as soon as the bytes received
pass the limit. The server then closes the connection.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from jsonapi import MAX_BODY_BYTES
from processes import ServerProcess

pytestmark = pytest.mark.e2e

# The server must respond well before a client could have sent the rest of the body.
ANSWER_TIMEOUT_SECONDS = 5.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("body-limit")
    process = ServerProcess(directory / "server.log", data_dir=directory / "data").start()
    yield process
    process.stop()


def connect(server: ServerProcess) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_TIMEOUT_SECONDS)
    return connection


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response until the server closes the connection or its body is complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def request_head(method: str, path: str, extra: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/v1/tasks/create"),
    ("PUT", "/api/v1/agents/web-1"),
    ("POST", "/api/v1/tasks/00000000-0000-0000-0000-000000000000/complete"),
])
def test_large_content_length_rejected_before_body(server, method, path):
    with connect(server) as connection:
        connection.sendall(request_head(method, path, f"Content-Length: {MAX_BODY_BYTES + 1}\r\n"))
        connection.sendall(b'{"command": "' + b"x" * 1000)
        started = time.monotonic()

        status, headers, body = read_response(connection)

        assert time.monotonic() - started < ANSWER_TIMEOUT_SECONDS
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": f"request body is larger than {MAX_BODY_BYTES} bytes"}
    assert headers["connection"].lower() == "close"


def test_huge_content_length_rejected(server):
    with connect(server) as connection:
        connection.sendall(request_head("POST", "/api/v1/tasks/create", "Content-Length: 99999999999999\r\n"))

        status, headers, body = read_response(connection)

    assert status == 413
    assert "larger than" in json.loads(body)["error"]


def test_body_at_limit_reaches_application(server):
    # A body of exactly the limit is read and validated: here its command is too long.
    prefix, suffix = b'{"frequency": "1m", "command": "', b'"}'
    body = prefix + b"x" * (MAX_BODY_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(body) == MAX_BODY_BYTES
    with connect(server) as connection:
        connection.settimeout(30)
        connection.sendall(request_head("POST", "/api/v1/tasks/create", f"Content-Length: {len(body)}\r\n"))
        connection.sendall(body)

        status, _headers, answer = read_response(connection)

    assert status == 400
    assert json.loads(answer)["field"] == "command"


def test_chunked_body_over_limit_rejected_while_sending(server):
    chunk = b"x" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    # Twice the limit, without the final zero-length chunk: the body never ends.
    chunk_count = 2 * MAX_BODY_BYTES // len(chunk)
    sent = {"bytes": 0}

    def send_chunks(connection: socket.socket) -> None:
        try:
            for _ in range(chunk_count):
                connection.sendall(framed)
                sent["bytes"] += len(framed)
        except OSError:
            pass  # the server closed the connection after its 413

    with connect(server) as connection:
        connection.sendall(request_head("POST", "/api/v1/tasks/create", "Transfer-Encoding: chunked\r\n"))
        sender = threading.Thread(target=send_chunks, args=(connection,), daemon=True)
        sender.start()

        status, headers, body = read_response(connection)
        sender.join(ANSWER_TIMEOUT_SECONDS)

    assert status == 413
    assert headers["content-type"] == "application/json"
    assert "larger than" in json.loads(body)["error"]
    assert sent["bytes"] < chunk_count * len(framed)


def test_malformed_request_gets_json_error(server):
    with connect(server) as connection:
        connection.sendall(b"POST /api/v1/tasks/create HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")

        status, headers, body = read_response(connection)

    assert status == 400
    assert headers["content-type"] == "application/json"
    assert "error" in json.loads(body)
