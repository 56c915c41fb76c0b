"""Where the agent learns how long its user has been idle (the heartbeat's ``idleMs``).

The hub turns ``idleMs`` into away/offline, so a wrong number is worse than none: every source
returns ``None`` when it cannot tell, and the heartbeat then proves liveness only. Sources:

* ``none``: liveness only (servers, headless Raspberry Pis).
* ``command:CMD``: run ``CMD`` (split like a shell would, no shell involved) each heartbeat; it
  prints the idle time in milliseconds (``xprintidle`` does exactly this).
* ``file:PATH``: the file's modification time is the last interaction, so anything that can
  ``touch`` a file (a shell prompt hook, a door sensor script) reports activity.
* ``auto``: the desktop's input idle time where the platform offers it (``xprintidle`` on X11,
  ``ioreg`` HIDIdleTime on macOS), else ``none``, said once in the log.

A failing source logs once when it starts failing and once when it recovers, not on every
heartbeat, so a missing X display does not flood a small device's journal.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

from .errors import ConfigError

log = logging.getLogger("device_agent.idle")

_IOREG_RE: Final = re.compile(rb'"HIDIdleTime"\s*=\s*(\d+)')


class IdleSource(Protocol):
    """Anything with a name (for logs) and an ``idle_ms()`` that may answer ``None``."""

    @property
    def name(self) -> str: ...

    def idle_ms(self) -> int | None: ...


class _Reporter:
    """Log a source's failure once per streak of failures, and its recovery once."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._failing = False

    def failed(self, why: str) -> None:
        if not self._failing:
            log.warning("idle source %s failed: %s; heartbeats carry no idleMs until it works",
                        self._name, why)
            self._failing = True

    def worked(self) -> None:
        if self._failing:
            log.info("idle source %s works again", self._name)
            self._failing = False


class NoIdle:
    """Liveness only."""

    name = "none"

    def idle_ms(self) -> int | None:
        return None


class CommandIdle:
    """Runs a command that prints idle milliseconds (the first number on its output)."""

    def __init__(self, argv: Sequence[str], timeout: float = 2.0, name: str | None = None) -> None:
        if not argv:
            raise ConfigError("idle_source command is empty")
        self.argv = list(argv)
        self.timeout = timeout
        self.name = name or f"command:{shlex.join(self.argv)}"
        self._report = _Reporter(self.name)

    def idle_ms(self) -> int | None:
        done = _run(self.argv, self.timeout, self._report)
        if done is None:
            return None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            self._report.failed(f"exit status {done.returncode}" + (f": {err[-1]}" if err else ""))
            return None
        value = _first_number(done.stdout)
        if value is None:
            self._report.failed(f"printed no number of milliseconds: {done.stdout[:80]!r}")
            return None
        self._report.worked()
        return value


class FileIdle:
    """Idle since the file's modification time; a missing file means "cannot tell"."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.name = f"file:{path}"
        self._clock = clock
        self._report = _Reporter(self.name)

    def idle_ms(self) -> int | None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            self._report.failed(exc.strerror or str(exc))
            return None
        self._report.worked()
        return max(0, round((self._clock() - mtime) * 1000))


class IoregIdle:
    """macOS: ``ioreg -c IOHIDSystem`` reports HIDIdleTime in nanoseconds."""

    name = "ioreg"

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._report = _Reporter(self.name)

    def idle_ms(self) -> int | None:
        done = _run(["ioreg", "-c", "IOHIDSystem", "-d", "4"], self.timeout, self._report)
        if done is None:
            return None
        match = _IOREG_RE.search(done.stdout)
        if done.returncode != 0 or match is None:
            self._report.failed("no HIDIdleTime in ioreg output")
            return None
        self._report.worked()
        return int(match.group(1)) // 1_000_000


def _run(
    argv: Sequence[str], timeout: float, report: _Reporter
) -> subprocess.CompletedProcess[bytes] | None:
    """Run an idle probe with no stdin and a deadline; a failure to run is reported, not raised."""
    try:
        return subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        report.failed(str(exc))
        return None


def _first_number(output: bytes) -> int | None:
    match = re.search(rb"\d+(?:\.\d+)?", output)
    if match is None:
        return None
    return round(float(match.group(0)))


def detect_desktop(env: Mapping[str, str] | None = None) -> IdleSource:
    """The platform's input idle time if it works here, else :class:`NoIdle` (logged once)."""
    env = os.environ if env is None else env
    candidate: IdleSource | None = None
    why = ""
    if sys.platform == "darwin":
        if shutil.which("ioreg"):
            candidate = IoregIdle()
        else:
            why = "ioreg not found"
    elif env.get("DISPLAY"):
        path = shutil.which("xprintidle")
        if path:
            candidate = CommandIdle([path], name="xprintidle")
        else:
            why = "xprintidle not installed (apt-get install xprintidle)"
    elif env.get("WAYLAND_DISPLAY"):
        why = "Wayland offers no portable idle time; use idle_source = command:CMD"
    else:
        why = "no desktop session (no DISPLAY)"
    if candidate is not None:
        if candidate.idle_ms() is not None:
            log.info("idle source: %s", candidate.name)
            return candidate
        why = f"{candidate.name} does not work here"
    log.info("idle source: none (%s); heartbeats prove liveness only", why)
    return NoIdle()


def make_idle_source(spec: str) -> IdleSource:
    """Build the source named by an ``idle_source`` setting (see the module docstring)."""
    if spec == "none":
        return NoIdle()
    if spec == "auto":
        return detect_desktop()
    head, _, rest = spec.partition(":")
    if head == "command" and rest.strip():
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise ConfigError(f"invalid idle_source command {rest!r}: {exc}") from None
        return CommandIdle(argv)
    if head == "file" and rest.strip():
        return FileIdle(Path(rest).expanduser())
    raise ConfigError(f"invalid idle_source {spec!r}: use auto, none, command:CMD or file:PATH")
