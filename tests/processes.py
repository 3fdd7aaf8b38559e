"""Helpers for the end-to-end tests: real server and agent processes on 127.0.0.1.

Every process writes its stdout and stderr to a log file, which the tests quote in
their failure messages. Restarts append to the same file after a marker line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import requests

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "server.py"
AGENT_SCRIPT = ROOT / "agent.py"

POLL_SECONDS = 0.15
STOP_GRACE_SECONDS = 5.0
START_TIMEOUT_SECONDS = 15.0
HTTP_TIMEOUT_SECONDS = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float,
               message: Union[str, Callable[[], str]]) -> Any:
    """Poll `predicate` until it returns a truthy value, and return that value.

    Raises AssertionError with `message` (a string, or a callable evaluated only on
    failure, so it can read the process logs at that moment) after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f} s: {text}")
        time.sleep(POLL_SECONDS)


def child_environment() -> dict[str, str]:
    """Return the test's environment without TASKSCHEDULER_* settings.

    The server and the agent read their defaults from those variables, so a value
    set in the developer's shell would change what the tests start.
    """
    return {name: value for name, value in os.environ.items()
            if not name.startswith("TASKSCHEDULER_")}


class ManagedProcess:
    """A child process started from a fixed argument list, logging to one file."""

    def __init__(self, name: str, log_path: Path, environment: Optional[dict[str, str]] = None):
        self.name = name
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0
        # Variables set for the child on top of child_environment(), such as tokens.
        self.environment = dict(environment or {})

    def arguments(self) -> list[str]:
        raise NotImplementedError

    def launch(self) -> None:
        if self.running():
            raise RuntimeError(f"{self.name} is already running as pid {self.process.pid}")
        self.starts += 1
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- start {self.starts}: {' '.join(self.arguments())}\n".encode())
            log_file.flush()
            self.process = subprocess.Popen(
                [sys.executable, *self.arguments()], cwd=ROOT,
                env=dict(child_environment(), **self.environment),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> Optional[int]:
        """Send `sig`, then SIGKILL after a grace period; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.name} log ({self.log_path}):\n{tail}"


class ServerProcess(ManagedProcess):
    """`server.py` on 127.0.0.1, on a database URL or a data directory."""

    def __init__(self, log_path: Path, database_url: Optional[str] = None,
                 data_dir: Optional[Path] = None, port: Optional[int] = None,
                 extra_arguments: tuple[str, ...] = (), environment: Optional[dict[str, str]] = None):
        super().__init__("server", log_path, environment)
        if (database_url is None) == (data_dir is None):
            raise ValueError("give exactly one of database_url and data_dir")
        self.database_url = database_url
        self.data_dir = data_dir
        self.port = port or free_port()
        self.extra_arguments = tuple(extra_arguments)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arguments(self) -> list[str]:
        arguments = [str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.database_url is not None:
            arguments += ["--database", self.database_url]
        else:
            arguments += ["--data-dir", str(self.data_dir)]
        return arguments + list(self.extra_arguments)

    def healthy(self) -> bool:
        try:
            response = requests.get(self.url + "/healthz", timeout=1.0)
        except requests.RequestException:
            return False
        return response.status_code == 200

    def start(self) -> "ServerProcess":
        """Start the server on its port and return once GET /healthz returns 200."""
        self.launch()

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"server exited with code {self.process.returncode} "
                                     f"during start\n{self.log_tail()}")
            return self.healthy()

        wait_until(ready, START_TIMEOUT_SECONDS,
                   lambda: f"server did not answer GET /healthz\n{self.log_tail()}")
        return self

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()


class AgentProcess(ManagedProcess):
    """`agent.py` with its own state directory, kept across restarts."""

    def __init__(self, log_path: Path, server_url: str, state_dir: Path,
                 agent_id: Optional[str], listen: Optional[str] = None,
                 sync_interval: float = 1.0, log_level: str = "INFO",
                 extra_arguments: tuple[str, ...] = (), environment: Optional[dict[str, str]] = None):
        super().__init__(f"agent {agent_id or state_dir.name}", log_path, environment)
        self.extra_arguments = tuple(extra_arguments)
        self.server_url = server_url
        self.state_dir = state_dir
        self.agent_id = agent_id
        self.listen = listen
        self.sync_interval = sync_interval
        self.log_level = log_level
        self.pass_id = agent_id is not None

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "work"

    def arguments(self) -> list[str]:
        arguments = [str(AGENT_SCRIPT), "--server", self.server_url,
                     "--state-dir", str(self.state_dir),
                     "--sync-interval", str(self.sync_interval),
                     "--log-level", self.log_level]
        if self.pass_id:
            arguments += ["--id", self.agent_id]
        if self.listen is not None:
            arguments += ["--listen", self.listen]
        return arguments + list(self.extra_arguments)

    def start(self) -> "AgentProcess":
        """Start the agent and return once it has opened its state store and logged its settings."""
        marker_count = self.log_text().count("sync every")
        self.launch()

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"{self.name} exited with code {self.process.returncode} "
                                     f"during start\n{self.log_tail()}")
            return self.log_text().count("sync every") > marker_count

        wait_until(ready, START_TIMEOUT_SECONDS,
                   lambda: f"{self.name} did not log its start\n{self.log_tail()}")
        return self

    def restart(self, pass_id: bool = True) -> "AgentProcess":
        """Stop and start the agent on the same state directory.

        With `pass_id=False` the agent starts without --id and must use its stored id.
        """
        self.stop()
        self.pass_id = pass_id and self.agent_id is not None
        return self.start()


class Cluster:
    """The processes of one test, all stopped by `stop_all` in the fixture's teardown."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.processes: list[ManagedProcess] = []

    def server(self, database_url: Optional[str] = None, data_dir: Optional[Path] = None,
               extra_arguments: tuple[str, ...] = (),
               environment: Optional[dict[str, str]] = None) -> ServerProcess:
        """Start a server; without a database it uses a fresh data directory."""
        if database_url is None and data_dir is None:
            data_dir = self.directory / "server-data"
        server = ServerProcess(self.directory / f"server-{len(self.processes)}.log",
                               database_url=database_url, data_dir=data_dir,
                               extra_arguments=extra_arguments, environment=environment)
        self.processes.append(server)
        return server.start()

    def agent(self, server: ServerProcess, agent_id: str, listen: Optional[str] = None,
              sync_interval: float = 1.0, log_level: str = "INFO",
              extra_arguments: tuple[str, ...] = (),
              environment: Optional[dict[str, str]] = None) -> AgentProcess:
        """Start an agent with its own state directory, named after its id."""
        agent = AgentProcess(self.directory / f"agent-{agent_id}.log", server.url,
                             self.directory / f"state-{agent_id}", agent_id, listen=listen,
                             sync_interval=sync_interval, log_level=log_level,
                             extra_arguments=extra_arguments, environment=environment)
        self.processes.append(agent)
        return agent.start()

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(process.log_tail(lines) for process in self.processes)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()


class Api:
    """A client of the server's REST API that raises on unexpected status codes."""

    def __init__(self, base_url: str, token: Optional[str] = None):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _check(self, response: requests.Response, expected: int) -> dict:
        if response.status_code != expected:
            raise AssertionError(f"{response.request.method} {response.url} returned "
                                 f"{response.status_code}, expected {expected}: {response.text[:500]}")
        return response.json()

    def create_task(self, command: str, frequency: str, **options) -> str:
        """Create a task; `options` are further fields such as timezone or overlap."""
        response = self.session.post(self.base_url + "/api/v1/tasks/create",
                                     json=dict(options, command=command, frequency=frequency),
                                     timeout=HTTP_TIMEOUT_SECONDS)
        return self._check(response, 201)["task_id"]

    def latest_output(self, task_id: str) -> dict:
        response = self.session.get(f"{self.base_url}/api/v1/tasks/{task_id}/latest_output",
                                    timeout=HTTP_TIMEOUT_SECONDS)
        return self._check(response, 200)

    def report(self, task_id: str, agent_id: str, payload: dict) -> tuple[int, dict]:
        """Send a run report as an agent does; return the status code and the body."""
        response = self.session.post(f"{self.base_url}/api/v1/tasks/{task_id}/complete",
                                     json=dict(payload, server_id=agent_id),
                                     timeout=HTTP_TIMEOUT_SECONDS)
        return response.status_code, response.json()

    def agents(self) -> list[dict]:
        response = self.session.get(self.base_url + "/api/v1/agents", timeout=HTTP_TIMEOUT_SECONDS)
        return self._check(response, 200)["agents"]

    def agent_ids(self) -> list[str]:
        return [agent["agent_id"] for agent in self.agents()]

    def close(self) -> None:
        self.session.close()
