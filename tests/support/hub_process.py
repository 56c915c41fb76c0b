"""Run ``presence-hub`` as a real process (so tests can SIGKILL and restart it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.support.wait import wait_for

READY_LINE = "presence hub running"
#: what a hub started with --standby prints while another hub is active
STANDBY_LINE = "presence hub standing by"


class HubProcess:
    """``python -m hub.cli ARGS``; ``start()`` returns once the hub printed its banner."""

    def __init__(self, args: Sequence[str], workdir: Path, env: dict[str, str] | None = None):
        self.args = list(args)
        self.workdir = workdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self.starts = 0

    def start(self, timeout: float = 15.0, ready_line: str = READY_LINE) -> HubProcess:
        """Start and wait for ``ready_line`` (the banner; :data:`STANDBY_LINE` for a standby)."""
        self.starts += 1
        log = open(self.workdir / f"hub-{self.starts}.log", "w")  # noqa: SIM115 - closed by reader
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", *self.args],
            cwd=self.workdir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        proc = self.proc
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            with log:
                for line in proc.stdout:
                    self.lines.append(line.rstrip())
                    log.write(line)
                    log.flush()
                    if ready_line in line:
                        ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        wait_for(lambda: ready.is_set() or proc.poll() is not None, timeout, "hub to start")
        if not ready.is_set():
            raise AssertionError("hub exited at start:\n" + "\n".join(self.lines[-30:]))
        return self

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float = 15.0, after: int = 0) -> int:
        """Wait until a line from index ``after`` on contains ``text``; return its index."""
        found: list[int] = []

        def seen() -> bool:
            for i in range(after, len(self.lines)):
                if text in self.lines[i]:
                    found.append(i)
                    return True
            return False

        wait_for(seen, timeout, f"the hub to print {text!r}")
        return found[0]

    def pause(self) -> None:
        """SIGSTOP: the process freezes (a long GC, a VM migration), its sockets stay open."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL: no clean stop, no final flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self._wait_exit(10)

    def stop(self) -> int:
        """SIGTERM and wait: the clean stop path."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self._wait_exit(15)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self._wait_exit(10)
