"""Real Mosquitto and Redis processes for tests, each on its own free port on 127.0.0.1.

Why real processes: the hub's promises (retained state after a broker restart, wills on a dead
socket, queued QoS 1 messages for persistent sessions) are broker behaviour, and a mock would
only repeat our assumptions back to us. Each process gets its own temporary directory for its
config, persistence and log, so a failing test can show what the broker said.

A missing binary skips the test with the install hint, except in CI (``CI=true``) where a
skipped broker test would hide a broken machine, so it fails instead.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_LOG_TAIL_LINES = 30


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _missing(binary: str, hint: str) -> None:
    reason = f"{binary} not installed: {hint}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def find_binary(name: str, hint: str) -> str:
    """Find ``name`` on PATH or in Debian's sbin folders; skip (fail in CI) if it is absent."""
    found = shutil.which(name)
    if found is None:
        for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            candidate = Path(folder) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found = str(candidate)
                break
    if found is None:
        _missing(name, hint)
        raise AssertionError("unreachable")  # pytest.skip/fail raise
    return found


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class _ServerProcess:
    """Start/stop/kill/restart of one server process on a fixed port with a deadline on start."""

    name = "server"
    host = "127.0.0.1"
    #: A line the server logs once its listening socket is open.
    _ready_marker = ""

    def __init__(self, binary: str, port: int | None, workdir: Path | None) -> None:
        self.binary = binary
        self._own_port = port is None
        self.port: int = port if port is not None else free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"test-{self.name}-")
            workdir = Path(self._tmp.name)
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.output_path = workdir / f"{self.name}.out"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- subclass hooks ---------------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write whatever config the command needs for the current port."""

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the server logged so far (its log file, then its stdout/stderr)."""
        parts = []
        for path in (self.log_path, self.output_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def start(self) -> None:
        """Start and wait until the port accepts connections.

        If a port picked by :func:`free_port` was taken meanwhile by someone else, try again on
        a fresh one; a port given by the caller (or kept by :meth:`restart`) is never changed.
        """
        if self.running:
            raise RuntimeError(f"{self.name} already running on {self.host}:{self.port}")
        attempts = 3 if self._own_port else 1
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()

    def _start_once(self) -> None:
        self._prepare()
        with self.output_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C on pytest does not race our own SIGTERM
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                last_lines = "\n".join(self.log_text().splitlines()[-5:])
                if "Address already in use" in last_lines:
                    raise _PortTaken(
                        f"{self.name} cannot listen on {self.host}:{self.port}: port in use;"
                        f" log tail:\n{last_lines}"
                    )
                raise RuntimeError(
                    f"{self.name} exited with code {code} while starting on "
                    f"{self.host}:{self.port}; log tail:\n{_tail(self.log_path)}\n"
                    f"output tail:\n{_tail(self.output_path)}"
                )
            # The log line proves it is *our* process listening, not someone else on the port.
            if self._ready_marker in self.log_text() and _port_accepts(self.host, self.port):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"{self.name} did not accept connections on {self.host}:{self.port} within "
                    f"{START_TIMEOUT:.0f}s; log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM and wait: the server saves its state (Mosquitto writes its persistence db)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; only what the server had already saved survives."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same state directory."""
        self.stop()
        own, self._own_port = self._own_port, False
        try:
            self.start()
        finally:
            self._own_port = own

    def cleanup(self) -> None:
        """Stop and remove the temporary directory if this object created it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class _PortTaken(RuntimeError):
    pass


class MosquittoProcess(_ServerProcess):
    """A private Mosquitto with persistence, so a restart keeps retained and queued messages.

    Measured with Mosquitto 2.0.11: :meth:`stop` (SIGTERM) publishes the will of every client
    still connected, and a retained will is saved, so after :meth:`restart` the retained topic
    holds the will. :meth:`kill` sends no wills but keeps only what the last autosave (every
    second) wrote.

    ``extra_conf`` lines are appended to the generated config (``password_file``, ``acl_file``,
    ``allow_anonymous false`` ...); later lines win in Mosquitto for single-valued options.
    """

    name = "mosquitto"
    _ready_marker = " running"

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        extra_conf: str = "",
        binary: str | None = None,
    ) -> None:
        binary = binary or find_binary("mosquitto", "apt-get install mosquitto")
        super().__init__(binary, port, workdir)
        self.extra_conf = extra_conf
        self.conf_path = self.workdir / "mosquitto.conf"
        self.persistence_dir = self.workdir / "data"
        self.persistence_dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _prepare(self) -> None:
        # Run as whoever runs the tests: as root Mosquitto would otherwise drop to the
        # "mosquitto" user, which cannot write our temporary directory.
        lines = [
            f"user {getpass.getuser()}",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            "max_queued_messages 0",  # 0 = no limit (Mosquitto 2.x)
            "set_tcp_nodelay true",  # no Nagle delays on retained updates (see README)
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            self.extra_conf,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.conf_path)]


class RedisProcess(_ServerProcess):
    """A throw-away redis-server without persistence; tests use their own key prefixes."""

    name = "redis"
    _ready_marker = "Ready to accept connections"

    def __init__(
        self, *, port: int | None = None, workdir: Path | None = None, binary: str | None = None
    ) -> None:
        binary = binary or find_binary("redis-server", "apt-get install redis-server")
        super().__init__(binary, port, workdir)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A started Mosquitto on a free port, stopped at teardown whatever the test did."""
    proc = MosquittoProcess(workdir=tmp_path / "mosquitto")
    proc.start()
    try:
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoProcess]]:
    """Make (and start) Mosquittos with extra config; all are stopped at teardown."""
    made: list[MosquittoProcess] = []

    def make(extra_conf: str = "", *, start: bool = True) -> MosquittoProcess:
        proc = MosquittoProcess(workdir=tmp_path / f"mosquitto-{len(made)}", extra_conf=extra_conf)
        made.append(proc)
        if start:
            proc.start()
        return proc

    try:
        yield make
    finally:
        for proc in made:
            proc.cleanup()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, for tests that kill, restart or freeze it (doing that
    to the session's one would stall the others); continued at teardown if it was frozen."""
    server = RedisProcess(workdir=tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if server.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the session; tests keep to distinct key prefixes (or flush)."""
    proc = RedisProcess(workdir=tmp_path_factory.mktemp("redis"))
    proc.start()
    try:
        yield proc
    finally:
        proc.cleanup()
