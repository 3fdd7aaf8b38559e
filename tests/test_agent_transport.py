"""How the agent reaches the server: URL checks, and TLS verification against a real
HTTPS server on 127.0.0.1 with a self-signed certificate made by the openssl command."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

import agent
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
], ids=["loopback-ip", "localhost", "ipv6-loopback", "https", "http-remote-name", "http-remote-ip",
        "lookalike-name", "http-remote-insecure"])
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
