"""agent.py runs alone on a host: it imports only the standard library and its own packages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The agent's pinned packages and the packages they depend on.
AGENT_PACKAGES = {
    "requests", "urllib3", "idna", "charset_normalizer", "certifi",
    "schedule", "croniter", "dateutil", "six", "pytz", "tzdata",
}

LIST_IMPORTS = """
import json, sys
sys.argv = ["agent.py", "--help"]
import agent
try:
    agent.main(["--help"])
except SystemExit:
    pass
names = {name.split(".")[0] for name in sys.modules}
# Private modules belong to the interpreter, setuptools' import hook or the Cython runtime
# of charset_normalizer's optional speedups, which also ships as pure Python.
names = {name for name in names if not name.startswith("_") and name != "cython_runtime"}
print(json.dumps(sorted(names - set(sys.stdlib_module_names) - {"agent"})))
"""


def test_agent_imports_only_its_packages(tmp_path):
    shutil.copy(ROOT / "agent.py", tmp_path / "agent.py")

    # The folder holds only the copy of agent.py, so nothing else of the project is importable.
    completed = subprocess.run([sys.executable, "-c", LIST_IMPORTS], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    third_party = set(json.loads(completed.stdout.strip().splitlines()[-1]))

    assert third_party <= AGENT_PACKAGES, third_party - AGENT_PACKAGES
    assert "server" not in third_party
    assert "models" not in third_party


def test_agent_requirements_are_pure_python():
    lines = (ROOT / "requirements-agent.txt").read_text().splitlines()
    names = {line.split("==")[0].strip().lower() for line in lines
             if line.strip() and not line.startswith("#")}

    assert names == {"requests", "schedule", "croniter", "tzdata"}
