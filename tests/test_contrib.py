"""Checks of the service definitions in contrib/ against the programs they start.

Every file is parsed with the tool or library that will read it: plistlib, xml.etree,
systemd-analyze or nginx. Every option and variable in a file is checked against what
server.py and agent.py accept, which is their --help output, their argument parser and the
environment variables their source reads. Checks that need a tool skip when it is missing.
The tests marked e2e start real server and nginx processes on 127.0.0.1.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import os
import plistlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
PROGRAMS = ("server", "agent")

# Where the systemd units and launchd plists expect the installation.
INSTALL_DIR = "/opt/taskscheduler"
VENV_PYTHON = "/opt/taskscheduler/.venv/bin/python"
LAUNCHD_LOG_DIR = "/usr/local/var/log/taskscheduler/"

# Variables that the units expand on the command line. The programs never read them.
OPTIONS_VARIABLES = {
    "server": "TASKSCHEDULER_SERVER_OPTIONS",
    "agent": "TASKSCHEDULER_AGENT_OPTIONS",
}

MAX_BODY_BYTES = 16 * 1024 * 1024
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 15.0

# prctl(2) constants from linux/prctl.h (Linux 6.3 and later).
PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1


# ---------------------------------------------------------------------------
# What the programs accept
# ---------------------------------------------------------------------------


def child_environment(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Return this process's environment without TASKSCHEDULER_* settings, plus `extra`."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("TASKSCHEDULER_")}
    environment.update(extra or {})
    return environment


@functools.lru_cache(maxsize=None)
def accepted_flags(program: str) -> frozenset[str]:
    """Return the long options listed by `python PROGRAM.py --help`."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / f"{program}.py"), "--help"],
        cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, f"{program}.py --help failed: {completed.stderr}"
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", completed.stdout))


@functools.lru_cache(maxsize=None)
def variables_read(program: str) -> frozenset[str]:
    """Return the names in os.environ.get(NAME), os.getenv(NAME) and os.environ[NAME] calls."""
    tree = ast.parse((ROOT / f"{program}.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = ast.unparse(node.func)
            if called in ("os.environ.get", "os.getenv"):
                names.add(node.args[0].value)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            if isinstance(node.slice, ast.Constant):
                names.add(node.slice.value)
    return frozenset(names)


def check_arguments(program: str, arguments: list[str], environment: dict[str, str]) -> None:
    """Assert that the program's own parser accepts `arguments` with `environment` set.

    This runs build_parser().parse_args() in a child process, so values are checked too,
    such as a port that is not a number or a log level that does not exist. So are the
    environment variables that the parser reads when it is built, such as TASKSCHEDULER_PORT.
    """
    flags = {argument.split("=", 1)[0] for argument in arguments if argument.startswith("--")}
    unknown = flags - accepted_flags(program)
    assert not unknown, f"{program}.py --help lists no {sorted(unknown)}"

    code = f"import sys, {program}; {program}.build_parser().parse_args(sys.argv[1:])"
    completed = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        cwd=ROOT, env=child_environment(environment), capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, (
        f"{program}.py rejects {arguments} with environment {environment}: {completed.stderr}"
    )


def check_variables(program: str, names: set[str]) -> None:
    """Assert that every TASKSCHEDULER_* name is read by the program or expanded by its unit."""
    known = variables_read(program) | {OPTIONS_VARIABLES[program]}
    unknown = {name for name in names if name.startswith("TASKSCHEDULER_")} - known
    assert not unknown, f"{program}.py reads no variable {sorted(unknown)}"


# ---------------------------------------------------------------------------
# Parsers of the contrib formats
# ---------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Parse a systemd unit into {section: [(key, value), ...]}, keeping repeated keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path.name}: setting outside a section: {line!r}"
        assert not stripped.endswith("\\"), f"{path.name}: continuation lines are not parsed here"
        key, separator, value = stripped.partition("=")
        assert separator, f"{path.name}: line without '=': {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> Optional[str]:
    values = unit_values(unit, section, key)
    return values[-1] if values else None


def read_env_example(path: Path) -> list[tuple[str, str, bool]]:
    """Return (name, value, active) for each NAME=value line, commented out or not."""
    assignments = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^(#?)(TASKSCHEDULER_[A-Z0-9_]+)=(.*)$", line)
        if match:
            assignments.append((match.group(2), match.group(3), match.group(1) == ""))
    return assignments


def plist_path(program: str) -> Path:
    return CONTRIB / "launchd" / f"org.taskscheduler.{program}.plist"


def winsw_path(program: str) -> Path:
    return CONTRIB / "windows" / f"taskscheduler-{program}.xml"


def unit_path(program: str) -> Path:
    return CONTRIB / "systemd" / f"taskscheduler-{program}.service"


def env_example_path(program: str) -> Path:
    return CONTRIB / "env" / f"{program}.env.example"


# ---------------------------------------------------------------------------
# launchd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("program", PROGRAMS)
def test_plist_has_required_keys(program):
    path = plist_path(program)
    with path.open("rb") as stream:
        job = plistlib.load(stream)

    for key in ("Label", "ProgramArguments", "UserName", "WorkingDirectory",
                "EnvironmentVariables", "KeepAlive", "RunAtLoad", "StandardErrorPath",
                "ExitTimeOut"):
        assert key in job, f"{path.name} has no {key}"
    assert job["Label"] == path.stem
    assert job["ProgramArguments"][0] == VENV_PYTHON
    assert job["ProgramArguments"][1] == f"{INSTALL_DIR}/{program}.py"
    assert job["WorkingDirectory"] == INSTALL_DIR
    assert job["UserName"]
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["StandardErrorPath"].startswith(LAUNCHD_LOG_DIR)
    assert isinstance(job["ExitTimeOut"], int)
    assert job["ExitTimeOut"] > 0
    for name, value in job["EnvironmentVariables"].items():
        assert isinstance(value, str), f"{path.name}: launchd needs a string for {name}"


@pytest.mark.parametrize("program", PROGRAMS)
def test_plist_options_accepted(program):
    with plist_path(program).open("rb") as stream:
        job = plistlib.load(stream)
    environment = job["EnvironmentVariables"]

    check_variables(program, set(environment))
    check_arguments(program, job["ProgramArguments"][2:], environment)


@pytest.mark.parametrize("program, user", [("server", "_taskscheduler"), ("agent", "_taskscheduler-agent")])
def test_plist_runs_as_role_account(program, user):
    with plist_path(program).open("rb") as stream:
        job = plistlib.load(stream)

    assert job["UserName"] == user
    assert job.get("GroupName", user) == user
    assert job["Umask"] == 0o027


def test_agent_plist_sets_server():
    with plist_path("agent").open("rb") as stream:
        job = plistlib.load(stream)

    assert job["EnvironmentVariables"]["TASKSCHEDULER_SERVER"].startswith("https://")


# ---------------------------------------------------------------------------
# WinSW
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("program", PROGRAMS)
def test_winsw_xml_has_required_elements(program):
    path = winsw_path(program)
    root = ElementTree.parse(path).getroot()

    assert root.tag == "service"
    assert root.findtext("id") == path.stem
    assert root.findtext("executable").endswith("\\.venv\\Scripts\\python.exe")
    assert root.findtext("arguments").split()[0].endswith(f"\\{program}.py")
    assert root.findtext("workingdirectory")
    assert root.findtext("stoptimeout")
    assert root.findall("onfailure"), f"{path.name} has no onfailure"
    assert root.findtext("serviceaccount/user")
    for element in root.iter("env"):
        assert element.get("name"), f"{path.name}: env without a name"
        name = element.get("name")
        assert element.get("value") is not None, f"{path.name}: env {name} without a value"


@pytest.mark.parametrize("program", PROGRAMS)
def test_winsw_options_accepted(program):
    root = ElementTree.parse(winsw_path(program)).getroot()
    environment = {element.get("name"): element.get("value") for element in root.iter("env")}
    # The arguments contain Windows paths and no quotes, so plain splitting keeps backslashes.
    arguments = root.findtext("arguments").split()[1:]

    check_variables(program, set(environment))
    check_arguments(program, arguments, environment)


# ---------------------------------------------------------------------------
# systemd and the environment files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("program", PROGRAMS)
def test_unit_has_expected_settings(program):
    path = unit_path(program)
    unit = read_unit(path)
    user = "taskscheduler" if program == "server" else "taskscheduler-agent"
    expected = {
        ("Unit", "After"): "network-online.target",
        ("Unit", "Wants"): "network-online.target",
        ("Service", "User"): user,
        ("Service", "WorkingDirectory"): INSTALL_DIR,
        ("Service", "EnvironmentFile"): f"-/etc/taskscheduler/{program}.env",
        ("Service", "StateDirectory"): user,
        ("Service", "Restart"): "on-failure",
        ("Service", "KillSignal"): "SIGTERM",
        ("Service", "NoNewPrivileges"): "yes",
        ("Service", "ProtectSystem"): "strict",
        ("Service", "PrivateTmp"): "yes",
        ("Service", "ProtectKernelTunables"): "yes",
        ("Service", "ProtectControlGroups"): "yes",
        ("Service", "RestrictSUIDSGID"): "yes",
        ("Service", "LockPersonality"): "yes",
    }
    for (section, key), value in expected.items():
        assert unit_value(unit, section, key) == value, f"{path.name}: [{section}] {key}"
    for section, key in (("Unit", "StartLimitIntervalSec"), ("Unit", "StartLimitBurst"),
                         ("Service", "RestartSec"), ("Service", "TimeoutStopSec"),
                         ("Service", "ProtectHome")):
        assert unit_value(unit, section, key), f"{path.name}: [{section}] {key} is not set"

    command = shlex.split(unit_value(unit, "Service", "ExecStart"))
    assert command[0] == VENV_PYTHON
    assert command[1] == f"{INSTALL_DIR}/{program}.py"


# Hardening both units share. The agent's sandbox is narrower in what it leaves out (see
# test_agent_unit_keeps_commands_working), because it runs operators' commands.
SHARED_HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RemoveIPC": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0027",
}


def comment_above(path: Path, key: str) -> str:
    """Return the comment lines right above the unit's `key=` line, joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = next(number for number, line in enumerate(lines) if line.startswith(f"{key}="))
    comment = []
    for line in reversed(lines[:index]):
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("# "))
    return " ".join(reversed(comment))


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("key, words", [("KillSignal", "SIGTERM, because"),
                                        ("Restart", "on-failure, not always"),
                                        ("TimeoutStopSec", "TimeoutStopSec")])
def test_unit_states_stop_and_restart_reasons(program, key, words):
    text = comment_above(unit_path(program), key)
    if key == "TimeoutStopSec":
        # KillSignal and TimeoutStopSec share one comment above KillSignal.
        text = comment_above(unit_path(program), "KillSignal")

    assert words in text, f"{program} unit: no reason for {key} in the comment above it"


@pytest.mark.parametrize("program", PROGRAMS)
def test_unit_runs_as_dedicated_user_with_hardening(program):
    unit = read_unit(unit_path(program))
    user = "taskscheduler" if program == "server" else "taskscheduler-agent"

    assert unit_value(unit, "Service", "User") == user
    assert unit_value(unit, "Service", "Group") == user
    assert unit_value(unit, "Service", "StateDirectory") == user
    for key, value in SHARED_HARDENING.items():
        assert unit_value(unit, "Service", key) == value, f"{program}: {key}"


def test_server_unit_has_narrowest_sandbox():
    unit = read_unit(unit_path("server"))

    assert unit_value(unit, "Service", "ProtectHome") == "yes"
    assert unit_value(unit, "Service", "RestrictAddressFamilies") == "AF_INET AF_INET6 AF_UNIX"
    assert unit_value(unit, "Service", "SystemCallFilter") == "@system-service"
    assert unit_value(unit, "Service", "ProtectProc") == "invisible"


def test_agent_unit_keeps_commands_working():
    unit = read_unit(unit_path("agent"))

    # Commands may read home directories, list the host's processes and use netlink (ip, ss).
    assert unit_value(unit, "Service", "ProtectHome") == "read-only"
    assert unit_value(unit, "Service", "ProtectProc") is None
    assert unit_value(unit, "Service", "SystemCallFilter") is None
    assert unit_value(unit, "Service", "RestrictAddressFamilies") == "AF_INET AF_INET6 AF_UNIX AF_NETLINK"


def test_agent_unit_documents_drop_in():
    text = unit_path("agent").read_text(encoding="utf-8")

    assert "systemctl edit taskscheduler-agent" in text
    for line in text.splitlines():
        # A drop-in example copied as shown must work: systemd takes "# ..." after a
        # value as part of the value.
        if line.startswith("#   ") and "=" in line:
            assert "#" not in line[4:], line


def test_agent_unit_lets_commands_finish():
    unit = read_unit(unit_path("agent"))

    assert unit_value(unit, "Service", "KillMode") == "mixed"
    # Commands may be JIT runtimes, which need writable and executable memory.
    assert unit_value(unit, "Service", "MemoryDenyWriteExecute") is None


def test_server_unit_denies_write_execute():
    unit = read_unit(unit_path("server"))

    assert unit_value(unit, "Service", "MemoryDenyWriteExecute") == "yes"


@pytest.mark.parametrize("program", PROGRAMS)
def test_unit_options_accepted(program):
    unit = read_unit(unit_path(program))
    examples = read_env_example(env_example_path(program))
    options_variable = OPTIONS_VARIABLES[program]

    environment = {}
    for assignment in unit_values(unit, "Service", "Environment"):
        for word in shlex.split(assignment):
            name, _, value = word.partition("=")
            environment[name] = value
    for name, value, _active in examples:
        if name != options_variable:
            environment[name] = value
    check_variables(program, set(environment))

    command = shlex.split(unit_value(unit, "Service", "ExecStart"))
    assert f"${options_variable}" in command, f"ExecStart does not expand ${options_variable}"
    fixed_arguments = [word for word in command[2:] if word != f"${options_variable}"]
    option_examples = [value for name, value, _active in examples if name == options_variable]
    assert option_examples, f"{program}.env.example shows no {options_variable}"

    check_arguments(program, fixed_arguments, environment)
    for value in option_examples:
        # systemd splits an unquoted $VARIABLE at whitespace, like str.split().
        check_arguments(program, fixed_arguments + value.split(), environment)


@pytest.mark.parametrize("program", PROGRAMS)
def test_env_example_lists_every_variable(program):
    listed = {name for name, _value, _active in read_env_example(env_example_path(program))}

    missing = variables_read(program) - listed
    assert not missing, f"{program}.env.example does not mention {sorted(missing)}"


def test_agent_env_example_sets_server():
    active = {name: value for name, value, is_active in read_env_example(env_example_path("agent"))
              if is_active}

    assert "TASKSCHEDULER_SERVER" in active, "the agent exits at once without TASKSCHEDULER_SERVER"


@pytest.mark.parametrize("program", PROGRAMS)
def test_unit_passes_systemd_analyze_verify(program, tmp_path):
    """Verify a copy of the unit in which only the installation paths are replaced.

    systemd-analyze verify fails on an ExecStart program that does not exist, and this
    host has no /opt/taskscheduler/.venv. The copy therefore runs this test's Python and
    works in tmp_path; every other line is the unit as shipped.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")

    text = unit_path(program).read_text(encoding="utf-8")
    assert VENV_PYTHON in text
    assert f"WorkingDirectory={INSTALL_DIR}\n" in text
    text = text.replace(VENV_PYTHON, sys.executable)
    text = text.replace(f"WorkingDirectory={INSTALL_DIR}\n", f"WorkingDirectory={tmp_path}\n")
    copy = tmp_path / unit_path(program).name
    copy.write_text(text, encoding="utf-8")

    completed = subprocess.run(
        [analyze, "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True, text=True, timeout=60,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    # Any line that names the unit is a finding, such as an unknown key or a value that does
    # not parse, whatever the exit status.
    about_unit = [line for line in output.splitlines() if copy.name in line]
    assert not about_unit, "\n".join(about_unit)


# ---------------------------------------------------------------------------
# Real processes: the server under MemoryDenyWriteExecute's rule, and behind nginx
# ---------------------------------------------------------------------------


def start_server(tmp_path: Path, prefix: str = "") -> tuple[subprocess.Popen, int]:
    """Start server.py on a free port of 127.0.0.1 and return the process and its port.

    `prefix` is Python code run in the server's process before server.py itself. The
    server's stderr goes to tmp_path/server.log.
    """
    code = (
        f"{prefix}\n"
        "import runpy, sys\n"
        f"sys.argv = ['server.py', '--port', '0', '--data-dir', {str(tmp_path / 'data')!r}]\n"
        "runpy.run_path('server.py', run_name='__main__')\n"
    )
    log = tmp_path / "server.log"
    with log.open("w", encoding="utf-8") as stream:
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=child_environment(),
            stdout=subprocess.DEVNULL, stderr=stream,
        )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        text = log.read_text(encoding="utf-8")
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
        if match:
            return process, int(match.group(1))
        time.sleep(0.1)
    stop_process(process)
    raise AssertionError(f"server did not start within {START_TIMEOUT_SECONDS:.0f} s:\n"
                         + log.read_text(encoding="utf-8"))


def stop_process(process: subprocess.Popen) -> Optional[int]:
    """Stop `process` with SIGTERM, or with SIGKILL if it outlasts STOP_TIMEOUT_SECONDS.

    Returns the exit status after SIGTERM, or None when SIGKILL was needed.
    """
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def mdwe_supported() -> bool:
    """Return True if this kernel refuses writable-and-executable memory on request."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_GET_MDWE fails with EINVAL before Linux 6.3, which has no PR_SET_MDWE either.
    return libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0


@pytest.mark.e2e
def test_server_runs_under_mdwe(tmp_path):
    """Serve requests with PR_SET_MDWE, the kernel's form of MemoryDenyWriteExecute=yes.

    PR_MDWE_REFUSE_EXEC_GAIN makes mmap and mprotect fail for memory that would become
    both writable and executable, or executable after the fact: the mappings that
    systemd's MemoryDenyWriteExecute rejects. The server unit sets that option.
    """
    if not mdwe_supported():
        pytest.skip("prctl(PR_SET_MDWE) needs Linux 6.3 or later")

    prefix = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
        "    raise SystemExit('prctl(PR_SET_MDWE) failed: ' + os.strerror(ctypes.get_errno()))\n"
        f"assert libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0) == {PR_MDWE_REFUSE_EXEC_GAIN}\n"
    )
    process, port = start_server(tmp_path, prefix)
    try:
        base = f"http://127.0.0.1:{port}"
        created = requests.post(f"{base}/api/v1/tasks/create", timeout=10,
                                json={"command": "echo mdwe", "frequency": "every 1 minute"})
        listed = requests.get(f"{base}/api/v1/tasks", timeout=10)
    finally:
        status = stop_process(process)

    assert created.status_code == 201, created.text
    assert [task["command"] for task in listed.json()["tasks"]] == ["echo mdwe"]
    assert status == 0, (tmp_path / "server.log").read_text(encoding="utf-8")


def make_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """Create a self-signed certificate for 127.0.0.1 and return (certificate, key) paths."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    certificate, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True, timeout=60,
    )
    return certificate, key


def write_nginx_config(tmp_path: Path, ports: Optional[dict[str, int]] = None) -> Path:
    """Write contrib/nginx/taskscheduler.conf, wrapped in a main configuration, to tmp_path.

    The copy uses a self-signed certificate from tmp_path, and with `ports` ({"http",
    "https", "server"}) listens on 127.0.0.1 ports and proxies to a test server.
    """
    certificate, key = make_certificate(tmp_path)
    text = (CONTRIB / "nginx" / "taskscheduler.conf").read_text(encoding="utf-8")
    assert "/etc/ssl/taskscheduler/fullchain.pem" in text
    assert "/etc/ssl/taskscheduler/privkey.pem" in text
    text = text.replace("/etc/ssl/taskscheduler/fullchain.pem", str(certificate))
    text = text.replace("/etc/ssl/taskscheduler/privkey.pem", str(key))
    if ports is not None:
        for old, new in (("listen 80;", f"listen 127.0.0.1:{ports['http']};"),
                         ("listen 443 ssl;", f"listen 127.0.0.1:{ports['https']} ssl;"),
                         ("proxy_pass http://127.0.0.1:8080;",
                          f"proxy_pass http://127.0.0.1:{ports['server']};")):
            assert old in text
            text = text.replace(old, new)
        text = "\n".join(line for line in text.splitlines() if "listen [::]" not in line)
    site = tmp_path / "taskscheduler.conf"
    site.write_text(text, encoding="utf-8")

    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'error.log'} warn;\n"
        "daemon off;\n"
        "master_process off;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        f"    client_body_temp_path {temp / 'body'};\n"
        f"    proxy_temp_path {temp / 'proxy'};\n"
        f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
        f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
        f"    scgi_temp_path {temp / 'scgi'};\n"
        f"    include {site};\n"
        "}\n",
        encoding="utf-8",
    )
    return main


def nginx_command(tmp_path: Path, config: Path) -> list[str]:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx-light or nginx)")
    # -e moves the startup error log out of /var/log/nginx, which may not be writable.
    return [nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(config)]


def test_nginx_accepts_config(tmp_path):
    command = nginx_command(tmp_path, tmp_path / "nginx.conf")
    write_nginx_config(tmp_path)

    completed = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr
    assert "test is successful" in completed.stderr


def test_nginx_accepts_optional_directives(tmp_path):
    """Check the config with its commented-out access rules (allow, deny, auth_basic) enabled."""
    command = nginx_command(tmp_path, tmp_path / "nginx.conf")
    write_nginx_config(tmp_path)
    site = tmp_path / "taskscheduler.conf"
    text, enabled = re.subn(r"^(\s*)#((?:allow|deny|auth_basic)\S*\s[^#]*;)$", r"\1\2",
                            site.read_text(encoding="utf-8"), flags=re.MULTILINE)
    site.write_text(text, encoding="utf-8")

    completed = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=60)

    assert enabled == 5
    assert completed.returncode == 0, completed.stderr


def test_nginx_body_limit_matches_server():
    text = (CONTRIB / "nginx" / "taskscheduler.conf").read_text(encoding="utf-8")
    sizes = re.findall(r"^\s*client_max_body_size\s+(\d+)m;", text, flags=re.MULTILINE)

    assert sizes == ["16"]
    assert int(sizes[0]) * 1024 * 1024 == MAX_BODY_BYTES


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    log_text = log.read_text(encoding="utf-8") if log.exists() else ""
    raise AssertionError(f"nginx did not listen on 127.0.0.1:{port}:\n{log_text}")


@pytest.mark.e2e
def test_nginx_proxies_to_server(tmp_path):
    command = nginx_command(tmp_path, tmp_path / "nginx.conf")
    server, server_port = start_server(tmp_path)
    nginx = None
    try:
        # Inside try, so that the server stops when openssl is missing and the test skips.
        ports = {"http": free_port(), "https": free_port(), "server": server_port}
        write_nginx_config(tmp_path, ports)
        nginx = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(ports["https"], nginx, tmp_path / "error.log")

        base = f"https://127.0.0.1:{ports['https']}"
        certificate = str(tmp_path / "fullchain.pem")
        health = requests.get(f"{base}/healthz", verify=certificate, timeout=10)
        redirect = requests.get(f"http://127.0.0.1:{ports['http']}/healthz",
                                allow_redirects=False, timeout=10)
        at_limit = requests.post(f"{base}/api/v1/tasks/create", verify=certificate, timeout=60,
                                 data=b" " * MAX_BODY_BYTES,
                                 headers={"Content-Type": "application/json"})
        over_limit = requests.post(f"{base}/api/v1/tasks/create", verify=certificate, timeout=60,
                                   data=b" " * (MAX_BODY_BYTES + 1),
                                   headers={"Content-Type": "application/json"})
    finally:
        if nginx is not None:
            stop_process(nginx)
        stop_process(server)

    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert redirect.status_code == 301
    assert redirect.headers["Location"] == "https://127.0.0.1/healthz"
    # A body of exactly 16 MiB passes nginx and reaches the server, which rejects the
    # blank body as invalid JSON.
    assert at_limit.status_code == 400, at_limit.text
    assert at_limit.json()["error"].startswith("request body is not valid JSON"), at_limit.text
    # One byte more is rejected by nginx, in the server's JSON error shape.
    assert over_limit.status_code == 413
    assert over_limit.headers["Content-Type"].startswith("application/json")
    assert over_limit.json() == {"error": f"request body is larger than {MAX_BODY_BYTES} bytes"}
