"""A plain install is the device agent: nothing of the agent needs the hub's stack (issue 15).

The hub's stack (amqtt, TinyDB, the web side) is the extra ``[hub]``. These tests run the
agent's entry points in a fresh interpreter where importing amqtt, tinydb or redis fails, as
it does after ``pip install mqtt-presence-hub``, and check that ``presence-hub`` there says
in one line what to install.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: makes the hub's stack look uninstalled for the interpreter that runs it
BLOCK = """
import importlib.abc, importlib.machinery, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("amqtt", "tinydb", "redis"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _Absent())
import importlib.util
_find = importlib.util.find_spec
def _find_spec(name, package=None):
    if name.split(".")[0] in ("amqtt", "tinydb", "redis"):
        return None
    return _find(name, package)
importlib.util.find_spec = _find_spec
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_the_base_install_is_the_agent_and_the_hub_stack_is_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "mqtt-presence-hub"  # "mqtt-presence" on PyPI is someone else's
    base = " ".join(project["dependencies"])
    assert "amqtt" not in base and "tinydb" not in base
    assert "amqtt==0.12.1" in project["optional-dependencies"]["hub"]


def test_the_agent_and_the_presence_command_run_without_the_hub_stack() -> None:
    for module in ("device_agent.cli", "device_agent.command"):
        done = run(f"import sys; from {module} import main; sys.argv = ['x', '--help']; main()")
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout.lower(), done.stdout
    done = run("import device_agent, hub.protocol; from hub import create_presence_service")
    assert done.returncode == 0, done.stderr


def test_presence_hub_without_the_extra_says_what_to_install_in_one_line() -> None:
    done = run("import sys; from hub.cli import main; sys.exit(main(['--help']))")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'mqtt-presence-hub[hub]'" in lines[0], done.stderr
