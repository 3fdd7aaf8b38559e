"""The dashboard in a real headless Chromium, against a real server and agent on 127.0.0.1.

Playwright drives Debian's Chromium (/usr/bin/chromium, package chromium); it downloads
no browser of its own. The server has tokens, so the browser logs in with HTTP Basic and
the read token. Every request the page makes must go to the server: any other request is
aborted and fails the test. Screenshots go to tests/artifacts/ (ignored by git), and the
test prints their paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from processes import ROOT, Api, Cluster, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("TASKSCHEDULER_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "tests" / "artifacts"
ADMIN = "browser-admin-token-5e4d3c2b1a09"
READ = "browser-read-token-0a1b2c3d4e5f"
ENROLL = "browser-enrollment-token-9f8e7d6c5b4a"
# Printed by every agent; the page must show it as text, and the script must never run.
COMMAND = "printf '<script>window.pwned = 1</script> hello from %s\\n' \"$TASKSCHEDULER_AGENT_ID\""
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture
def playwright_api():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package")
    with sync_api.sync_playwright() as playwright:
        yield playwright


@pytest.fixture
def browser(playwright_api):
    browser = playwright_api.chromium.launch(
        executable_path=str(CHROMIUM), headless=True,
        # As root Chromium needs --no-sandbox. No host name resolves, so nothing can be
        # fetched from the network even if a page asked for it.
        args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
    )
    yield browser
    browser.close()


@pytest.fixture
def cluster(tmp_path):
    processes = Cluster(tmp_path)
    yield processes
    processes.stop_all()
    print(processes.log_tails())


def open_page(browser, server_url: str, viewport: dict, password: str = READ):
    """Open a page whose context logs in with `password`, and records requests to other origins."""
    context = browser.new_context(viewport=viewport, http_credentials={"username": "operator",
                                                                       "password": password})
    foreign: list[str] = []

    def route(request_route):
        url = request_route.request.url
        if url.startswith(server_url + "/"):
            request_route.continue_()
        else:
            foreign.append(url)
            request_route.abort()

    context.route("**/*", route)
    return context, context.new_page(), foreign


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_dashboard_shows_task_and_output(cluster, browser, tmp_path):
    server = cluster.server(environment={"TASKSCHEDULER_ADMIN_TOKENS": ADMIN,
                                         "TASKSCHEDULER_READ_TOKENS": READ,
                                         "TASKSCHEDULER_ENROLLMENT_TOKEN": ENROLL})
    token_file = tmp_path / "enrollment-token"
    token_file.write_text(ENROLL + "\n")
    cluster.agent(server, "web-1", extra_arguments=("--enrollment-token-file", str(token_file)))
    api = Api(server.url, token=ADMIN)
    task_id = api.create_task(COMMAND, "every 2 seconds")
    errors: list[str] = []

    # Without the token the context gets the login challenge, not the page. Headless
    # Chromium cannot show the login dialog and aborts a navigation to it, so this
    # request goes through the context's HTTP client.
    anonymous = browser.new_context()
    response = anonymous.request.get(server.url + "/")
    assert response.status == 401
    assert response.headers["www-authenticate"].startswith("Basic ")
    anonymous.close()

    context, page, foreign = open_page(browser, server.url, PHONE)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    response = page.goto(server.url + "/")
    assert response.status == 200
    task = page.locator(f"#task-{task_id}")
    assert task.locator("code.command").inner_text() == COMMAND
    assert task.locator(".schedule").inner_text() == "every 2 seconds"
    assert re.search(r"next run .* UTC, in \d+ s", task.inner_text())

    # The page reloads itself; wait until it shows web-1's run.
    host = task.locator('li.host[data-agent="web-1"]')
    wait_until(lambda: host.count() and host.get_attribute("data-status") == "succeeded", 30,
               lambda: f"the page shows no run of web-1\n{page.content()[-2000:]}\n{cluster.log_tails()}")
    assert "exit 0" in host.inner_text()
    agent_row = page.locator('table.agents tr[data-agent="web-1"]')
    assert agent_row.locator("td").nth(1).inner_text() == "online"
    # Phone width: nothing sticks out sideways.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "dashboard-overview-phone.png")

    page.set_viewport_size(DESKTOP)
    page.goto(server.url + f"/tasks/{task_id}")
    stdout = page.locator('section.run[data-agent="web-1"] pre.stdout')
    assert stdout.inner_text() == "<script>window.pwned = 1</script> hello from web-1\n"
    assert page.evaluate("window.pwned") is None
    assert page.locator("script").count() == 0
    screenshot(page, "dashboard-task-desktop.png")

    assert foreign == []
    assert errors == []
    context.close()


def test_dashboard_rejects_wrong_token_in_browser(cluster, browser):
    server = cluster.server(environment={"TASKSCHEDULER_ADMIN_TOKENS": ADMIN,
                                         "TASKSCHEDULER_ENROLLMENT_TOKEN": ENROLL})
    context, page, foreign = open_page(browser, server.url, DESKTOP, password="wrong-token-0123456789")

    response = page.goto(server.url + "/")

    assert response.status == 401
    assert "Token required" in page.locator("h1").inner_text()
    assert foreign == []
    context.close()
