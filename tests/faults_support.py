"""Fault injection for tests/test_faults.py: a TCP proxy, a private PostgreSQL, /proc scans.

Everything here works on 127.0.0.1 and on files and processes that the tests create.
The /proc helpers work on Linux only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from agent import UTC, format_time
from processes import AgentProcess, free_port

# How long a proxy socket waits in accept() or recv() before it checks whether the
# proxy was closed.
PROXY_POLL_SECONDS = 0.2
PROXY_CONNECT_TIMEOUT_SECONDS = 5.0
POSTGRES_COMMAND_TIMEOUT_SECONDS = 60.0


# ---------------------------------------------------------------------------
# A TCP proxy that passes, delays or drops connections
# ---------------------------------------------------------------------------


class TcpProxy:
    """A TCP proxy from a free port on 127.0.0.1 to one port on 127.0.0.1.

    It has three modes. `pass_through` forwards bytes both ways. `delay_requests`
    delays each chunk that the client sends by some seconds, so every request arrives
    that much later. `drop` closes open connections and closes new ones right after
    accepting them.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.dropped_connections = 0
        self._mode = "pass"
        self._delay_seconds = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(PROXY_POLL_SECONDS)
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="proxy-accept",
                                               daemon=True)
        self._accept_thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pass_through(self) -> None:
        with self._lock:
            self._mode = "pass"

    def delay_requests(self, seconds: float) -> None:
        with self._lock:
            self._mode = "delay"
            self._delay_seconds = seconds

    def drop(self) -> None:
        """Close every open connection, and close new ones right after accepting them."""
        with self._lock:
            self._mode = "drop"
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _close_socket(sock)

    def close(self) -> None:
        self._closed.set()
        self.drop()
        self._listener.close()
        self._accept_thread.join(timeout=5.0)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # the listener was closed
            with self._lock:
                mode = self._mode
            if mode == "drop":
                self.dropped_connections += 1
                _close_socket(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port),
                                                    timeout=PROXY_CONNECT_TIMEOUT_SECONDS)
            except OSError:
                _close_socket(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(PROXY_POLL_SECONDS)
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             name="proxy-request", daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             name="proxy-response", daemon=True).start()

    def _pump(self, source: socket.socket, destination: socket.socket, from_client: bool) -> None:
        """Copy bytes from `source` to `destination` until either closes or the proxy drops."""
        try:
            while not self._closed.is_set():
                try:
                    data = source.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                with self._lock:
                    delay = self._delay_seconds if from_client and self._mode == "delay" else 0.0
                if delay:
                    time.sleep(delay)
                with self._lock:
                    if self._mode == "drop":
                        break
                destination.sendall(data)
        except OSError:
            pass  # the other pump or `drop` closed a socket
        finally:
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(destination)
            _close_socket(source)
            _close_socket(destination)


def _close_socket(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on the same socket; close() alone may not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------------
# A private PostgreSQL instance
# ---------------------------------------------------------------------------


def postgres_bin_dir() -> Optional[Path]:
    """Return the newest /usr/lib/postgresql/VERSION/bin that has initdb and pg_ctl, or None."""
    candidates = []
    for directory in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(directory).parent.name
        if version.isdigit() and all(os.access(os.path.join(directory, name), os.X_OK)
                                     for name in ("initdb", "pg_ctl", "postgres")):
            candidates.append((int(version), Path(directory)))
    return max(candidates)[1] if candidates else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in a temporary directory, on a free port of 127.0.0.1.

    Authentication is `trust` for the superuser `postgres`. PostgreSQL does not run as
    root, so when the tests run as root its commands run as the `postgres` user, which
    then owns the directory.
    """

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="taskscheduler-pg-"))
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgresql.log"
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._prefix = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *arguments: str) -> None:
        command = [*self._prefix, str(self.bin_dir / program), *arguments]
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                   text=True, timeout=POSTGRES_COMMAND_TIMEOUT_SECONDS)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with exit code {completed.returncode}:\n"
                               f"{completed.stdout}{completed.stderr}\n{self.log_tail()}")

    def initialize(self) -> None:
        self._run("initdb", "--pgdata", str(self.data_dir), "--username", "postgres",
                  "--auth", "trust", "--encoding", "UTF8", "--no-sync")

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.directory}"
        self._run("pg_ctl", "--pgdata", str(self.data_dir), "--log", str(self.log_path),
                  "--options", options, "--wait", "--timeout", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. Mode `fast` ends the sessions cleanly, and `immediate` acts as a crash."""
        self._run("pg_ctl", "--pgdata", str(self.data_dir), "--mode", mode,
                  "--wait", "--timeout", "30", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def remove(self) -> None:
        """Stop the server if it runs, and delete its directory."""
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of PostgreSQL log ({self.log_path}):\n{tail}"


# ---------------------------------------------------------------------------
# Agents with further options
# ---------------------------------------------------------------------------


class FaultAgent(AgentProcess):
    """An agent process with a free-form server URL list and further command-line options."""

    def __init__(self, log_path: Path, server_url: str, state_dir: Path, agent_id: str,
                 extra_arguments: tuple[str, ...] = ()):
        super().__init__(log_path, server_url, state_dir, agent_id)
        self.extra_arguments = tuple(extra_arguments)

    def arguments(self) -> list[str]:
        return super().arguments() + list(self.extra_arguments)


def outbox_depth(state_dir: Path) -> int:
    """Return how many finished runs in an agent's state store wait to be reported."""
    connection = sqlite3.connect(f"file:{state_dir / 'agent.db'}?mode=ro", uri=True, timeout=5.0)
    try:
        (depth,) = connection.execute(
            "SELECT COUNT(*) FROM runs WHERE reported = 0 AND status != 'running'").fetchone()
    finally:
        connection.close()
    return depth


def outbox_dropped(state_dir: Path) -> int:
    """Return how many unsent reports an agent dropped because its outbox was full."""
    connection = sqlite3.connect(f"file:{state_dir / 'agent.db'}?mode=ro", uri=True, timeout=5.0)
    try:
        row = connection.execute("SELECT value FROM meta WHERE key = 'outbox_dropped'").fetchone()
    finally:
        connection.close()
    return int(row[0]) if row else 0


def running_process_groups(state_dir: Path) -> list[tuple[str, Optional[int]]]:
    """Return the slot and process group of each run that an agent's state store marks running."""
    connection = sqlite3.connect(f"file:{state_dir / 'agent.db'}?mode=ro", uri=True, timeout=5.0)
    try:
        return connection.execute(
            "SELECT scheduled_for, process_group FROM runs WHERE status = 'running'").fetchall()
    finally:
        connection.close()


# ---------------------------------------------------------------------------
# Reports stored by the server
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredReport:
    """One row of the server's `result` table. Times are aware UTC datetimes."""

    agent_id: str
    slot: str  # RFC 3339 in UTC, as in TASKSCHEDULER_SCHEDULED_FOR
    status: str
    exit_code: Optional[int]
    started_at: Optional[dt.datetime]
    finished_at: dt.datetime
    received_at: dt.datetime
    stdout: str


REPORT_COLUMNS = ("agent_id, scheduled_for, status, exit_code, started_at, finished_at, received_at,"
                  " stdout")


def _aware(value) -> Optional[dt.datetime]:
    """Turn a stored naive UTC time (datetime, or text from SQLite) into an aware datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC)


def stored_reports(database_url: str, task_id: str) -> list[StoredReport]:
    """Read a task's reports straight from the server's database, without the server.

    A SQLite file is opened read-only. A PostgreSQL URL may carry libpq options such
    as a search_path.
    """
    query = f"SELECT {REPORT_COLUMNS} FROM result WHERE task_id = %s ORDER BY scheduled_for, agent_id"
    if database_url.startswith("sqlite:///"):
        path = database_url[len("sqlite:///"):]
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = connection.execute(query.replace("%s", "?"), (task_id,)).fetchall()
        finally:
            connection.close()
    else:
        import psycopg2

        connection = psycopg2.connect(database_url, connect_timeout=5)
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, (task_id,))
                rows = cursor.fetchall()
        finally:
            connection.close()
    return [StoredReport(agent_id, format_time(_aware(slot)), status, exit_code, _aware(started_at),
                         _aware(finished_at), _aware(received_at), stdout)
            for agent_id, slot, status, exit_code, started_at, finished_at, received_at, stdout in rows]


# ---------------------------------------------------------------------------
# Processes of runs, from /proc
# ---------------------------------------------------------------------------


def run_processes(environment: dict[str, str]) -> list[int]:
    """Return the pids of live processes whose environment has every NAME=value given.

    Zombies are left out, because they are already dead and their environment is gone.
    """
    markers = [f"{name}={value}".encode() for name, value in environment.items()]
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                state = stat_file.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                continue
            with open(f"/proc/{entry}/environ", "rb") as environ_file:
                variables = environ_file.read().split(b"\0")
        except (OSError, IndexError):
            continue  # the process ended while being read
        if all(marker in variables for marker in markers):
            pids.append(int(entry))
    return pids


def environment_value(pid: int, name: str) -> Optional[str]:
    """Return one environment variable of a process, or None if it or the process is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ_file:
            variables = environ_file.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    for variable in variables:
        if variable.startswith(prefix):
            return variable[len(prefix):].decode(errors="replace")
    return None


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            return cmdline_file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_run_processes(agent_id: str) -> list[int]:
    """Send SIGKILL to every live process started for runs of `agent_id`, and return their pids."""
    pids = run_processes({"TASKSCHEDULER_AGENT_ID": agent_id})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def peak_rss_kib(pid: int) -> int:
    """Return a process's peak resident set size (VmHWM) in KiB."""
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no VmHWM line")
