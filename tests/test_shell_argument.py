"""A task's command reaches the shell as one argument, `/bin/sh -c COMMAND`, byte for byte.

The shell reads its own argument vector from /proc, so the test reads exactly what
the agent passed, including quotes, `;`, `$()`, backticks and newlines. The command is
never spliced into another string.
"""

from __future__ import annotations

import datetime as dt
import os
import sys

import pytest

import agent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads the shell's argument vector from /proc")

SLOT = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
# The first line prints the shell's own argument vector. The rest is valid shell syntax
# that must arrive unchanged; its output is discarded.
COMMAND_TEMPLATE = "cat /proc/$$/cmdline\n{{ {tail}\n}} >/dev/null 2>&1"
TRICKY_COMMANDS = [
    "\"double quoted\" 'single quoted' \\\"escaped\\\"",
    "; echo injected; true && false || true | cat & wait",
    "$(echo substituted) `echo backticks` ${HOME} $((1 + 2))",
    "first line\necho second line\n\n# comment with ' unbalanced \"",
    "' ; echo broke out of single quotes ; '",
    "\" ; echo broke out of double quotes ; \"",
    "-c --version --help",
    "ünïcode ✓ \t tab \x1b[31m escape",
]


@pytest.mark.parametrize("tail", TRICKY_COMMANDS)
def test_command_is_one_shell_argument(tmp_path, tail):
    command = COMMAND_TEMPLATE.format(tail=tail)
    runner = agent.Runner("agent-7", str(tmp_path / "work"))
    task = agent.Task(task_id="task-1", command=command, frequency="1m")

    result = runner.run(task, SLOT)

    argv = result.stdout.split("\0")
    assert argv[:3] == ["/bin/sh", "-c", command]
    assert argv[3:] == [""]  # cmdline ends with NUL, and no further argument follows


def test_command_output_matches_shell_semantics(tmp_path):
    # The shell, not the agent, interprets quotes and substitutions.
    command = "printf '%s|' \"a b\" 'c;d' \"$(printf x)\" `printf y`\necho; printf 'line2'"
    runner = agent.Runner("agent-7", str(tmp_path / "work"))

    result = runner.run(agent.Task(task_id="task-1", command=command, frequency="1m"), SLOT)

    assert result.stdout == "a b|c;d|x|y|\nline2"


def test_task_values_reach_command_as_environment_only(tmp_path):
    # Ids and environment values are variables, never text inside the command.
    runner = agent.Runner("agent-7", str(tmp_path / "work"))
    task = agent.Task(task_id="task-1", command="printf '%s' \"$VALUE\"", frequency="1m",
                      environment=(("VALUE", "$(echo not run); `echo nor this` ' \""),))

    result = runner.run(task, SLOT)

    assert result.stdout == "$(echo not run); `echo nor this` ' \""
    assert os.environ.get("VALUE") is None
