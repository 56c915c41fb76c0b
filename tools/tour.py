"""Replay README.md's tour from this checkout and check everything it promises.

    .venv/bin/python tools/tour.py                     # on the embedded broker, then Mosquitto
    .venv/bin/python tools/tour.py --broker mosquitto  # one of them

Why a replay rather than a test of its own: the tour is the first thing a new user runs, and
it drifts from the code one harmless-looking edit at a time (a flag renamed, a command that
now prints something else, a step that needs one the README forgot). So the commands come
from README.md itself, from the shell blocks marked with ``<!-- tour -->``, and are run as a
user would run them, each as its own process, and every one of them is checked: the hub's
first line, what ``mosquitto_sub`` shows, what each command prints. The prose's promises
(the status going online then dnd, a ``kill -9`` taken offline by the will) are checked too,
each tied to its sentence in the tour, so removing or rewording one fails here until this
file follows.

Differences from a person at a terminal, all on purpose:

* a free port instead of 1883 (a system Mosquitto often holds 1883, and tests run side by
  side), given as README says for another port: ``--listen`` for the hub, ``-p`` for
  ``mosquitto_sub``, ``PRESENCE_BROKER`` for the agents and ``presence``;
* a scratch directory for the hub's files and the agents' state (``XDG_*``), and no
  ``DISPLAY``, so every run is the headless one the README describes;
* on Mosquitto, a ``mosquitto -p PORT`` started here first, which ``make run``'s
  ``--broker auto`` then finds and uses, as it would a system Mosquitto on 1883.

Exit status: 0 when every check passed, 1 when one failed (each is printed with what was
seen instead), 2 when the replay cannot run here (a missing program, no marked blocks).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"
#: the line right above a shell block of the tour
MARKER = "<!-- tour -->"
#: how long any one promised output may take to appear (generous: CI machines are slow)
DEADLINE_S = 15.0
COMMAND_TIMEOUT_S = 60.0
HOST = "127.0.0.1"


class CannotRun(Exception):
    """The replay cannot run here (not a failed check): exit status 2."""


# ------------------------------------------------------------------------------------------
# What README.md says


@dataclass(frozen=True)
class Step:
    """One command of a marked block: the line as README has it, and its words."""

    line: str
    argv: tuple[str, ...]


def tour_section(readme: str) -> str:
    """The text of the "A tour" section, where the promises are."""
    match = re.search(r"^## A tour\n(.*?)(?=^## )", readme, re.M | re.S)
    if match is None:
        raise CannotRun("README.md has no '## A tour' section")
    return match.group(1)


def tour_steps(readme: str) -> list[Step]:
    """The commands of every block marked with :data:`MARKER`, in README order."""
    lines = readme.splitlines()
    steps: list[Step] = []
    for index, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        if index + 1 >= len(lines) or not lines[index + 1].startswith("```"):
            raise CannotRun(f"README.md line {index + 1}: {MARKER} must be right above a block")
        end = index + 2
        while end < len(lines) and not lines[end].startswith("```"):
            words = tuple(shlex.split(lines[end], comments=True))
            if words:
                steps.append(Step(lines[end].split("  #")[0].rstrip(), words))
            end += 1
    if not steps:
        raise CannotRun(f"README.md has no block marked {MARKER}")
    return steps


def make_run_command(bindir: Path) -> list[str]:
    """What ``make run`` runs, from the Makefile's own recipe (so the two cannot differ)."""
    text = MAKEFILE.read_text()
    match = re.search(r"^run:.*\n((?:\t.*\n)+)", text, re.M)
    if match is None:
        raise CannotRun("the Makefile has no 'run' target")
    recipe = [line.strip() for line in match.group(1).replace("\\\n", " ").splitlines()]
    if len(recipe) != 1:
        raise CannotRun(f"the Makefile's run target has {len(recipe)} commands; the replay "
                        "knows one")
    line = recipe[0].replace("$(BIN)", str(bindir)).replace("$(VENV)", str(bindir.parent))
    if "$(" in line:
        raise CannotRun(f"the Makefile's run recipe uses a variable the replay cannot expand: {line}")
    return shlex.split(line)


# ------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def find_program(name: str, hint: str) -> str:
    """``name`` on PATH or in the sbin folders (Debian puts mosquitto in /usr/sbin)."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path(d) / name for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"))
         if p.is_file() and os.access(p, os.X_OK)), None)
    if found is None:
        raise CannotRun(f"{name} not found ({hint})")
    return found


class Background:
    """A long-running process of the tour (hub, agent, mosquitto_sub) and its output lines."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=name, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_line(self, match: Callable[[str], bool], what: str) -> str:
        """The first line that matches, waiting up to :data:`DEADLINE_S` for it."""
        deadline = time.monotonic() + DEADLINE_S
        seen = 0
        while True:
            lines = self.snapshot()
            for line in lines[seen:]:
                if match(line):
                    return line
            seen = len(lines)
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise Failed(f"{self.name} exited ({self.proc.returncode}) before {what}")
            if time.monotonic() >= deadline:
                raise Failed(f"no {what} within {DEADLINE_S:.0f}s")
            time.sleep(0.02)

    def send(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def end(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Stop with ``sig`` (then SIGKILL if it lingers) and return the exit status."""
        self.send(sig)
        try:
            code = self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        return code


class Failed(Exception):
    """A check that did not hold; the message says what was seen instead."""


# ------------------------------------------------------------------------------------------
# The replay


@dataclass
class Device:
    user: str
    device: str
    name: str | None
    agent: Background


@dataclass
class Expected:
    """What the tour has done so far, so each command's output can be predicted."""

    status: str = "online"
    custom: str | None = None
    devices: dict[str, Device] = field(default_factory=dict)
    #: (user, device, type, channel) of each recorded activity
    activity: list[tuple[str, str, str, str | None]] = field(default_factory=list)


class Replay:
    def __init__(self, broker: str, bindir: Path, workdir: Path, readme: str) -> None:
        self.broker = broker
        self.bindir = bindir
        self.workdir = workdir
        self.readme = readme
        self.port = free_port()
        # the agents' default host is localhost (mqtt://localhost:1883): keep it, change the port
        self.url = f"mqtt://localhost:{self.port}"
        self.expected = Expected()
        self.background: list[Background] = []
        self.hub: Background | None = None
        self.watch: Background | None = None
        self.results: list[tuple[bool, str, str]] = []
        self.env = self._environment()

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PRESENCE_") and k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        env.update(
            PRESENCE_BROKER=self.url,
            XDG_CONFIG_HOME=str(self.workdir / "config"),
            XDG_STATE_HOME=str(self.workdir / "state"),
            PYTHONUNBUFFERED="1",
        )
        return env

    # -- reporting ------------------------------------------------------------------------
    def check(self, label: str, run: Callable[[], str]) -> bool:
        try:
            detail = run()
        except Failed as exc:
            self.results.append((False, label, str(exc)))
            return False
        self.results.append((True, label, detail))
        return True

    def report(self) -> str:
        lines = [f"tour on the {self.broker} broker, {HOST}:{self.port}"]
        for ok, label, detail in self.results:
            lines.append(f"  {'ok  ' if ok else 'FAIL'}  {label}")
            lines.extend(f"        {d}" for d in detail.splitlines() if d.strip())
        failed = sum(not ok for ok, _l, _d in self.results)
        lines.append(f"{len(self.results) - failed} passed, {failed} failed")
        return "\n".join(lines)

    # -- the tour ---------------------------------------------------------------------------
    def run(self) -> bool:
        steps = tour_steps(self.readme)
        section = " ".join(tour_section(self.readme).split())
        with self._mosquitto():
            try:
                for step in steps:
                    if not self.check(step.line, functools.partial(self.step, step)):
                        break  # later steps build on this one: their failures would be noise
                else:
                    for phrase, promise in self.promises():
                        if phrase not in section:
                            self.results.append((False, f"README: {phrase!r}", "the tour no longer "
                                                 "says this: update tools/tour.py with it"))
                            continue
                        self.check(f"README: {phrase!r}", promise)
            finally:
                self.stop_all()
        return all(ok for ok, _l, _d in self.results)

    @contextmanager
    def _mosquitto(self) -> Iterator[None]:
        if self.broker != "mosquitto":
            yield
            return
        binary = find_program("mosquitto", "apt-get install mosquitto")
        broker = Background("mosquitto", [binary, "-p", str(self.port)], self.env, self.workdir)
        try:
            broker.wait_line(lambda line: " running" in line, "'mosquitto ... running'")
            yield
        finally:
            broker.end()

    def step(self, step: Step) -> str:
        program = Path(step.argv[0]).name
        if step.argv[:2] == ("make", "run"):
            return self.start_hub(step)
        if program == "mosquitto_sub":
            return self.start_watch(step)
        if program == "presence-agent":
            return self.agent(step)
        if program == "presence":
            return self.presence(step)
        raise Failed(f"the replay does not know how to check {program!r}: teach tools/tour.py")

    def resolve(self, argv: Sequence[str]) -> list[str]:
        """``.venv/bin/X`` of README -> this venv's X; ports 1883 -> the replay's port."""
        out = [str(self.bindir / Path(argv[0]).name) if argv[0].startswith(".venv/bin/")
               else argv[0]]
        out += [a.replace(f"{HOST}:1883", f"{HOST}:{self.port}")
                .replace("localhost:1883", f"{HOST}:{self.port}") for a in argv[1:]]
        return out

    def start(self, name: str, argv: Sequence[str]) -> Background:
        proc = Background(name, argv, self.env, self.workdir)
        self.background.append(proc)
        return proc

    def start_hub(self, step: Step) -> str:
        # the broker on the replay's port; any other local port of the recipe (the dashboard's)
        # on a free one, so that replays and a hub of your own can run side by side
        argv = [re.sub(rf"^(?:{HOST}|localhost):(\d+)$", lambda m: f"{HOST}:{free_port()}", a)
                for a in make_run_command(self.bindir)]
        argv += ["--listen", f"{HOST}:{self.port}"]
        self.hub = self.start("hub", argv)
        line = self.hub.wait_line(lambda ln: ln.startswith("presence hub running:"), "banner")
        which = (f"embedded broker on {HOST}:{self.port}" if self.broker == "embedded"
                 else f"using the broker already listening on {HOST}:{self.port}")
        if which not in line:
            raise Failed(f"expected the banner to say {which!r}:\n{line}")
        return line

    def start_watch(self, step: Step) -> str:
        argv = self.resolve(step.argv)
        argv[0] = find_program("mosquitto_sub", "apt-get install mosquitto-clients")
        self.watch = self.start("mosquitto_sub", [*argv, "-h", HOST, "-p", str(self.port)])
        return self.watch.wait_line(lambda ln: ln == "presence/hub/status online",
                                    "'presence/hub/status online' from mosquitto_sub")

    def watched(self, topic: str, what: str, match: Callable[[str], bool] = lambda _p: True,
                ) -> str:
        """Wait for mosquitto_sub to show a message on ``topic`` whose payload matches."""
        if self.watch is None:
            raise Failed("the tour never started mosquitto_sub")
        prefix = topic + " "
        return self.watch.wait_line(
            lambda ln: ln.startswith(prefix) and match(ln[len(prefix):]), what)

    def run_command(self, step: Step) -> str:
        done = subprocess.run(self.resolve(step.argv), env=self.env, cwd=self.workdir,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        if done.returncode != 0:
            raise Failed(f"exit status {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    # -- presence-agent ---------------------------------------------------------------------
    def agent(self, step: Step) -> str:
        from device_agent.cli import build_parser

        ns = build_parser().parse_args(list(step.argv[1:]))
        user, device = getattr(ns, "user", None), getattr(ns, "device", None)
        if user is None or device is None:
            raise Failed("the replay needs --user and --device on every agent command")
        if ns.subcommand == "activity":
            out = self.run_command(step)
            channel = ns.channel
            said = f"queued {ns.activity_type} activity{f' on {channel}' if channel else ''} " \
                   f"for {user}/{device}"
            if said not in out:
                raise Failed(f"expected {said!r}, got:\n{out}")
            self.watched(f"presence/devices/{user}/{device}/activity", "the activity delivered",
                         lambda p: _fields(p, type=ns.activity_type, channelId=channel))
            self.expected.activity.append((user, device, ns.activity_type, channel))
            return out
        if ns.subcommand not in (None, "run"):
            raise Failed(f"the replay knows the agent's daemon and 'activity', not {ns.subcommand}")
        name = getattr(ns, "name", None)
        agent = self.start(f"agent {device}", self.resolve(step.argv))
        birth: dict[str, Any] = {"state": "online"}
        if name is not None:
            birth["name"] = name
        interval = getattr(ns, "heartbeat_interval", None)
        if interval is not None:
            from hub.protocol import parse_duration_ms

            birth["heartbeatMs"] = parse_duration_ms(interval)
        conn = self.watched(f"presence/devices/{user}/{device}/conn",
                            f"the birth of {device} with {birth}", lambda p: _fields(p, **birth))
        self.watched(f"presence/users/{user}/state", f"{device} online in {user}'s state",
                     lambda p: _has_device(p, device, "online"))
        self.expected.devices[device] = Device(user, device, name, agent)
        return conn

    # -- presence ---------------------------------------------------------------------------
    def presence(self, step: Step) -> str:
        from device_agent.command import to_chat_command

        argv = list(step.argv[1:])
        words = shlex.split(to_chat_command(argv))[1:]
        user = _flag(argv, "--user")
        if user is None:
            raise Failed("the replay needs --user on every presence command")
        out = self.run_command(step)
        want = self.expected
        if not words:  # your status
            head = f"{user}: {want.status}"
            if not out.startswith(head) or (want.custom and f'"{want.custom}"' not in out):
                raise Failed(f"expected {head!r} with {want.custom!r}, got:\n{out}")
        elif words[0] == "who":
            rows = [line.split() for line in out.splitlines()]
            if [user, want.status] not in [row[:2] for row in rows]:
                raise Failed(f"expected a row '{user} {want.status}', got:\n{out}")
            if len(words) > 1 and f"on {words[1]}" not in out.splitlines()[0]:
                raise Failed(f"expected the answer to name channel {words[1]}, got:\n{out}")
        elif words[0] == "status" and len(words) == 2 and words[1] != "--clear":
            if f'custom status set to "{words[1]}"' not in out:
                raise Failed(f"expected 'custom status set to \"{words[1]}\"', got:\n{out}")
            self.watched(f"presence/users/{user}/custom", f"the custom status {words[1]!r}",
                         lambda p: p == words[1])
            want.custom = words[1]
        elif words[0] in ("online", "away", "dnd", "offline") and len(words) == 1:
            if f"status set to {words[0]}" not in out:
                raise Failed(f"expected 'status set to {words[0]}', got:\n{out}")
            self.watched(f"presence/users/{user}/status", f"status {words[0]}",
                         lambda p: p == words[0])
            want.status = words[0]
        elif words == ["devices"]:
            for dev in want.devices.values():
                row = next((ln for ln in out.splitlines() if dev.device in ln.split()), "")
                if "online" not in row or (dev.name and dev.name not in row):
                    raise Failed(f"expected {dev.device} ({dev.name}) online, got:\n{out}")
        elif words == ["sync"]:
            n = len(want.devices)
            if f"sync: {n}/{n} devices" not in out:
                raise Failed(f"expected 'sync: {n}/{n} devices', got:\n{out}")
        elif words[0] == "activity" and "--json" in argv:
            entries = json.loads(out)
            for _user, device, kind, channel in want.activity:
                if not any(e.get("type") == kind and e.get("channelId") == channel
                           and e.get("deviceId") == device for e in entries):
                    raise Failed(f"expected {kind} on {channel} from {device}, got:\n{out}")
            if not entries:
                raise Failed("the activity log is empty: the tour must record activity first")
        else:
            raise Failed(f"the replay has no check for 'presence {' '.join(words)}': teach "
                         "tools/tour.py")
        return out

    # -- what the prose promises --------------------------------------------------------------
    def promises(self) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("shows `presence/users/alice/status` go `online`, then `dnd`", self.online_then_dnd),
            ("idle source: none", self.headless_agents_say_so),
            ("kill an agent with `kill -9`", self.kill_9),
            ("Ctrl-C stops the hub cleanly: `presence/hub/status` says `offline`",
             self.stop_hub),
        ]

    def online_then_dnd(self) -> str:
        if self.watch is None:
            raise Failed("no mosquitto_sub")
        topic = "presence/users/alice/status "
        seen = [ln[len(topic):] for ln in self.watch.snapshot() if ln.startswith(topic)]
        changes = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
        if changes != ["online", "dnd"]:
            raise Failed(f"expected online, then dnd; mosquitto_sub showed {seen}")
        return " -> ".join(changes)

    def headless_agents_say_so(self) -> str:
        for dev in self.expected.devices.values():
            dev.agent.wait_line(lambda ln: "idle source: none" in ln,
                                f"'idle source: none' in {dev.device}'s log")
        return "every agent logged it (no DISPLAY here)"

    def kill_9(self) -> str:
        devices = list(self.expected.devices.values())
        if len(devices) < 2:
            raise Failed("the tour joins fewer than two devices")
        victim, other = devices[-1], devices[0]
        killed = time.monotonic()
        victim.agent.end(signal.SIGKILL)
        self.watched(f"presence/devices/{victim.user}/{victim.device}/conn",
                     f"{victim.device}'s last will", lambda p: _fields(p, state="offline",
                                                                          reason="lost"))
        state = self.watched(f"presence/users/{victim.user}/state",
                             f"{victim.device} offline while {other.device} stays online",
                             lambda p: _has_device(p, victim.device, "offline")
                             and _has_device(p, other.device, "online"))
        took = time.monotonic() - killed
        status = json.loads(state.split(" ", 1)[1])["status"]
        if status != self.expected.status:
            raise Failed(f"expected alice to stay {self.expected.status}, she is {status}")
        return (f"{victim.device} offline {took:.1f}s after kill -9 (will grace 1s); "
                f"alice stays {status} on {other.device}")

    def stop_hub(self) -> str:
        if self.hub is None:
            raise Failed("no hub")
        for dev in self.expected.devices.values():
            dev.agent.end()
        code = self.hub.end(signal.SIGINT)
        if code != 0 or not any("stopped cleanly" in ln for ln in self.hub.snapshot()):
            raise Failed(f"the hub exited {code} on Ctrl-C:\n" + "\n".join(self.hub.lines[-10:]))
        self.watched("presence/hub/status", "'presence/hub/status offline'",
                     lambda p: p == "offline")
        return "stopped cleanly (exit status 0), presence/hub/status offline"

    def stop_all(self) -> None:
        for proc in reversed(self.background):
            proc.end(signal.SIGINT if proc is self.hub else signal.SIGTERM)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.lines[-40:]) for p in self.background)


def _flag(argv: Sequence[str], name: str) -> str | None:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name), None)


def _fields(payload: str, **want: Any) -> bool:
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and all(data.get(k) == v for k, v in want.items())


def _has_device(payload: str, device: str, status: str) -> bool:
    try:
        devices = json.loads(payload).get("devices", [])
    except (ValueError, AttributeError):
        return False
    return any(d.get("id") == device and d.get("status") == status for d in devices)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/tour.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("embedded", "mosquitto", "both"), default="both")
    parser.add_argument("--readme", type=Path, default=README, help="the README to replay")
    parser.add_argument("--logs", action="store_true", help="print every process's output")
    args = parser.parse_args(argv)
    # stopped from outside (a test's timeout): stop what the replay started, then exit
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    bindir = Path(sys.executable).parent
    if not (bindir / "presence-hub").exists():
        print(f"tour: run it with the checkout's venv (.venv/bin/python tools/tour.py): "
              f"{bindir} has no presence-hub", file=sys.stderr)
        return 2
    ok = True
    for broker in ("embedded", "mosquitto") if args.broker == "both" else (args.broker,):
        with tempfile.TemporaryDirectory(prefix=f"tour-{broker}-") as tmp:
            replay = Replay(broker, bindir, Path(tmp), args.readme.read_text())
            try:
                passed = replay.run()
            except CannotRun as exc:
                print(f"tour: {exc}", file=sys.stderr)
                return 2
            print(replay.report(), flush=True)
            if args.logs or not passed:
                print(replay.logs(), flush=True)
            ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
