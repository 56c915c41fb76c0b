"""The device agent installed alone, as a device gets it: ``pip install .`` without extras.

A plain install is the agent (paho-mqtt, pydantic); the hub's stack (amqtt, TinyDB, Redis) is
the extra ``[hub]`` (issue 15). ``tests/test_packaging.py`` hides that stack from a fresh
interpreter; this module goes further and really installs: it builds the wheel once, installs
it without extras into a fresh venv, checks that nothing of the hub's stack came along, and
runs the agent's own test modules there, against the installed package rather than the
checkout.

Which test modules: every ``tests/test_agent*.py`` whose imports (function-level ones too)
need nothing beyond the agent, ``hub.protocol``, pytest and what a plain install brings. The
selection is computed, so a new agent test module joins by itself, and one that starts using
the hub (a ``presence-hub`` process, say) drops out instead of failing for a missing amqtt.

Why this is fast enough for every ``make test`` (about 14 s here, most of it the agent tests
themselves): the venv is made without pip (``pip --python`` installs into it from the outer
venv), the wheel is built without build isolation when the outer venv already has the
setuptools that ``pyproject.toml`` asks for (``make`` installs it), nothing is byte-compiled
at install, pip's cache serves the dependencies, and the selected modules run as parallel
pytest processes (they mostly wait on real processes and timers, not on the CPU).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

#: top-level modules a plain install brings (its dependencies and theirs), and pytest's
PLAIN_INSTALL = {"device_agent", "paho", "pydantic", "pydantic_core", "typing_extensions",
                 "annotated_types", "typing_inspection", "pytest", "_pytest"}
#: amqtt's own dependencies as the issue found them pulled onto devices (compiled, pinned)
AMQTT_BAGGAGE = ("psutil", "argon2-cffi", "websockets", "transitions")
#: what of the test support an agent test may use (hub_process would start a presence-hub)
SUPPORT = {"tests.support.procs", "tests.support.wait", "tests.support.agent_fixtures",
           "tests.support.mqtt_clients", "tests.test_agent_helpers", "tests.support"}

PIP_TIMEOUT = 300


def _imports(path: Path) -> set[str]:
    """Every absolute import of a module, at any depth (a lazy import is still needed)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _needs_more_than_the_agent(name: str) -> bool:
    top = name.split(".")[0]
    if name == "hub.protocol" or name.startswith("hub.protocol."):
        return False
    if top == "tests":
        return name not in SUPPORT
    return top not in PLAIN_INSTALL and top not in sys.stdlib_module_names


def agent_test_modules() -> dict[str, list[str]]:
    """``{module file: []}`` for the agent test modules that run on a plain install, and for
    the others the imports that keep them out (returned under their names, for the report)."""
    out: dict[str, list[str]] = {}
    for path in sorted(TESTS.glob("test_agent*.py")):
        if path.name == "test_agent_install.py":
            continue
        out[path.name] = sorted(m for m in _imports(path) if _needs_more_than_the_agent(m))
    return out


def agent_plugins() -> list[str]:
    """The conftest's fixture plugins that need only the agent (the others would fail to
    import on a plain install, and the agent tests use none of their fixtures)."""
    names: list[str] = []
    for node in ast.parse((TESTS / "conftest.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytest_plugins" for t in node.targets):
            names = list(ast.literal_eval(node.value))
    return [name for name in names if not any(
        _needs_more_than_the_agent(m) for m in _imports(ROOT / (name.replace(".", "/") + ".py")))]


def hub_stack() -> set[str]:
    """Distributions of the extras ``[hub]`` and ``[redis]`` and amqtt's baggage, normalized:
    a plain install must bring none of them."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = {Requirement(r).name for extra in ("hub", "redis") for r in extras[extra]}
    return {canonicalize_name(n) for n in (*names, *AMQTT_BAGGAGE)}


def _setuptools_is_enough() -> bool:
    """True when this interpreter has the setuptools pyproject.toml asks for, so the wheel can
    be built without an isolated build environment (which pip would first have to fill)."""
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    try:
        return all(Requirement(r).name == "setuptools"
                   and Requirement(r).specifier.contains(metadata.version("setuptools"))
                   for r in wanted)
    except metadata.PackageNotFoundError:
        return False


def _pip_start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pip_end(proc: subprocess.Popen[str]) -> None:
    try:
        out, _ = proc.communicate(timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    if proc.returncode != 0:
        # pip's own words (the network, the index, the build): the test cannot say more
        raise AssertionError(f"{' '.join(map(str, proc.args))} failed:\n{out}")


@dataclass(frozen=True)
class AgentVenv:
    root: Path
    python: Path
    #: a copy of the agent tests, away from the checkout so ``hub`` resolves to the install
    tests_dir: Path

    def bin(self, name: str) -> Path:
        return self.root / "bin" / name

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), *args], cwd=self.tests_dir.parent,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentVenv]:
    base = tmp_path_factory.mktemp("agent-install")
    # Build from a copy: setuptools writes build/ and *.egg-info into the source folder, and
    # the checkout is shared with whoever is working in it.
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("hub", "device_agent"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    # pytest goes in while the wheel is built (pip from this venv installs into the new one,
    # so the new one needs no pip of its own); the wheel then brings its own dependencies
    runner = _pip_start("--python", str(python), "install", "--quiet", "--no-compile", "pytest",
                        cwd=base)
    wheels = base / "wheels"
    isolation = ["--no-build-isolation"] if _setuptools_is_enough() else []
    try:
        _pip_end(_pip_start("wheel", "--quiet", "--no-deps", *isolation, "--wheel-dir",
                            str(wheels), "./src", cwd=base))
    finally:
        _pip_end(runner)
    wheel = next(wheels.glob("mqtt_presence_hub-*.whl"))
    _pip_end(_pip_start("--python", str(python), "install", "--quiet", "--no-compile",
                        str(wheel), cwd=base))

    copy = base / "run" / "tests"
    (copy / "support").mkdir(parents=True)
    for path in (TESTS / "support").glob("*.py"):
        shutil.copy2(path, copy / "support" / path.name)
    for name in ("__init__.py", "test_agent_helpers.py",
                 *(m for m, why in agent_test_modules().items() if not why)):
        shutil.copy2(TESTS / name, copy / name)
    (copy / "conftest.py").write_text(f"pytest_plugins = {agent_plugins()!r}\n")
    # the checkout's pytest settings name plugins (asyncio, timeout) a plain install lacks;
    # its markers are all that the agent tests need of them
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"].get("markers", [])
    (copy.parent / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider\nmarkers =\n"
        + "".join(f"    {m}\n" for m in markers))
    yield AgentVenv(venv, python, copy)


def test_the_agent_modules_are_the_ones_that_need_only_the_agent() -> None:
    modules = agent_test_modules()
    runnable = {m for m, why in modules.items() if not why}
    # the daemon as a process, its settings, and its MQTT behaviour must all be among them
    assert {"test_agent_cli.py", "test_agent_config.py", "test_agent_truth.py"} <= runnable, \
        modules
    # with the fixtures they use: a real Mosquitto, the watcher and the proxy
    assert {"tests.support.procs", "tests.support.agent_fixtures"} <= set(agent_plugins())
    # those that start a hub are left out, for the reason the report names
    assert any("tests.support.hub_process" in why for why in modules.values()), modules


def test_a_plain_install_is_the_agent_without_the_hub_stack(agent_venv: AgentVenv) -> None:
    probe = ("import importlib.metadata as m, json;"
             "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))")
    done = agent_venv.run("-c", probe)
    assert done.returncode == 0, done.stderr
    installed = {canonicalize_name(name) for name in json.loads(done.stdout)}
    assert "mqtt-presence-hub" in installed and "paho-mqtt" in installed, installed
    assert not installed & hub_stack(), f"the hub's stack came along: {installed & hub_stack()}"
    # and none of it is importable there either
    for module in ("amqtt", "tinydb", "redis"):
        gone = agent_venv.run("-c", f"import {module}")
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr, gone.stderr
    # the installed package, not the checkout, is what the agent tests will import
    where = agent_venv.run("-c", "import device_agent, hub.protocol, sys;"
                           "print(device_agent.__file__); print(hub.protocol.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(agent_venv.root)) for line in where.stdout.split()), \
        where.stdout
    # the agent's commands are there; the hub's says in one line what to install
    for script in ("presence-agent", "presence"):
        assert agent_venv.bin(script).exists(), script
    hub = subprocess.run([str(agent_venv.bin("presence-hub")), "--help"], capture_output=True,
                         text=True, timeout=60, env=agent_venv.env())
    assert hub.returncode == 1
    lines = hub.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'mqtt-presence-hub[hub]'" in lines[0], hub.stderr


def test_the_agent_tests_pass_on_a_plain_install(agent_venv: AgentVenv) -> None:
    modules = sorted(p.name for p in agent_venv.tests_dir.glob("test_agent_*.py")
                     if p.name != "test_agent_helpers.py")
    # one pytest per module, side by side: they wait on brokers and timers, not the CPU
    procs = {
        name: subprocess.Popen(
            [str(agent_venv.python), "-m", "pytest", "-q", "-x", f"tests/{name}"],
            cwd=agent_venv.tests_dir.parent, env=agent_venv.env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        for name in modules
    }
    failed = []
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0:
                failed.append(f"--- {name} (exit {proc.returncode}):\n{out[-4000:]}")
    finally:
        for proc in procs.values():  # a hung one (a timeout above) does not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failed, "\n".join(failed)
