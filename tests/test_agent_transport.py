"""How the agent reaches the server: URL checks, and TLS verification against a real
HTTPS server on 127.0.0.1 with a self-signed certificate made by the openssl command."""

from __future__ import annotations

import datetime as dt
import http.server
import shutil
import ssl
import subprocess
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

import agent
import auth
import models
import server


@pytest.mark.parametrize("url, insecure, accepted", [
    ("http://127.0.0.1:8080", False, True),
    ("http://localhost:8080", False, True),
    ("http://[::1]:8080", False, True),
    ("https://scheduler.example.net", False, True),
    ("http://scheduler.example.net:8080", False, False),
    ("http://10.0.0.5:8080", False, False),
    ("http://127.0.0.1.example.net:8080", False, False),
    ("http://scheduler.example.net:8080", True, True),
    # urllib.parse reads 127.0.0.1 as the host of these, and urllib3 (which requests
    # connects with) reads 10.0.0.5.
    ("http://10.0.0.5\\@127.0.0.1:1", False, False),
    ("https://10.0.0.5\\@127.0.0.1:1", True, False),
    ("http://user@127.0.0.1:8080", False, True),
    # Only the name localhost itself counts: other names under .localhost go to a resolver.
    ("http://scheduler.localhost:8080", False, False),
], ids=["loopback-ip", "localhost", "ipv6-loopback", "https", "http-remote-name", "http-remote-ip",
        "lookalike-name", "http-remote-insecure", "backslash-userinfo", "backslash-insecure",
        "userinfo-loopback", "localhost-subdomain"])
def test_server_url_check(url, insecure, accepted):
    assert (agent.check_server_url(url, insecure) is None) == accepted


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - name fixed by the base class
        pass


@pytest.fixture
def tls_server(db, tmp_path):
    """The real app over HTTPS on 127.0.0.1 with a fresh self-signed certificate; yields (URL, cert path)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = make_server("127.0.0.1", 0, server.create_app(), handler_class=QuietHandler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", str(cert)
    httpd.shutdown()
    httpd.server_close()


def test_agent_trusts_ca_bundle(tls_server):
    url, cert = tls_server
    client = agent.ServerClient(url, "tls-1", verify=cert)

    assert client.register(None)["agent_id"] == "tls-1"


def test_agent_rejects_unknown_certificate(tls_server):
    url, _cert = tls_server
    client = agent.ServerClient(url, "tls-1")

    with pytest.raises(agent.ServerError, match="CERTIFICATE_VERIFY_FAILED"):
        client.register(None)


def test_insecure_agent_skips_verification(tls_server):
    url, _cert = tls_server
    client = agent.ServerClient(url, "tls-1", verify=False)

    assert client.register(None)["agent_id"] == "tls-1"


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Returns an empty JSON object and records each request's Authorization header."""

    headers_seen: list = []

    def do_PUT(self):  # noqa: N802 - name fixed by the base class
        self.headers_seen.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format, *args):  # noqa: A002 - name fixed by the base class
        pass


def test_bearer_token_wins_over_netrc(tmp_path, monkeypatch):
    """requests replaces a plain Authorization header with netrc credentials; the token must win."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login basic-user password basic-password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    handler = type("Handler", (RecordingHandler,), {"headers_seen": []})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = agent.ServerClient(f"http://127.0.0.1:{httpd.server_address[1]}", "web-1")
        client.register(None)
        client.credentials = agent.Credentials("web-1", "agent-token-0123456789abcdef", "unused")
        client.register(None)
    finally:
        httpd.shutdown()
        httpd.server_close()

    assert handler.headers_seen[0].startswith("Basic ")
    assert handler.headers_seen[1] == "Bearer agent-token-0123456789abcdef"


# ---------------------------------------------------------------------------
# Enrolling again after the server rejects the agent token
# ---------------------------------------------------------------------------

ENROLL = "enrollment-token-0123456789abcdef"


@pytest.fixture
def token_server_url(db):
    """The real app over HTTP on 127.0.0.1, with an enrollment token and a 1-day agent token lifetime."""
    config = server.ServerConfig(tokens=auth.TokenConfig.from_tokens(enrollment=[ENROLL]),
                                 agent_token_lifetime=dt.timedelta(days=1))
    httpd = make_server("127.0.0.1", 0, server.create_app(config), handler_class=QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_client_enrolls_again_after_expiry(token_server_url, tmp_path):
    credentials_path = str(tmp_path / agent.CREDENTIALS_FILE)
    client = agent.ServerClient(token_server_url, "web-1", credentials_path=credentials_path,
                                enrollment_token=ENROLL)
    client.register(None)
    first = client.credentials
    past = models.utc_now() - dt.timedelta(seconds=1)
    models.Agent.update(token_expires_at=past).where(models.Agent.id == "web-1").execute()

    tasks = client.fetch_tasks()

    assert tasks == []
    assert first.expires_at is not None
    assert client.credentials.agent_token != first.agent_token
    assert agent.load_credentials(credentials_path, "web-1") == client.credentials


def test_client_rejected_enrollment_is_401(token_server_url, tmp_path, caplog):
    """A rejected enrollment keeps status 401, so the report sender keeps the report."""
    setup = agent.ServerClient(token_server_url, "web-1", enrollment_token=ENROLL)
    setup.register(None)
    client = agent.ServerClient(token_server_url, "web-1", enrollment_token=ENROLL)
    client.credentials = agent.Credentials("web-1", "unknown-agent-token-0123456789", "unused")

    with pytest.raises(agent.ServerError) as raised:
        client.complete("0fc8e2b2-bc76-4da9-aa06-6ad895c1fdae", {"stdout": "", "exit_code": 0})

    assert raised.value.status == 401
    assert "returned 409" in str(raised.value)
    assert "the token is not valid" in caplog.text


def test_enrollment_token_file_line_with_expiry(tmp_path):
    """The agent reads a line of the server's token file, expiry included, as the token alone."""
    path = tmp_path / "enrollment-tokens"
    path.write_text(f"# fleet set-up\n\n  {ENROLL} expires=2099-01-31T00:00:00Z\nsecond-token-0123456789abcdef\n")

    assert agent.read_secret_file(str(path)) == ENROLL
