"""Processes the benchmark runs and watches: its own Mosquitto, ``presence-hub``, observers.

Everything listens on 127.0.0.1 on ports the kernel picked; every process started here is
stopped by the same object that started it (context managers), so a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench import wire

CLK_TCK = os.sysconf("SC_CLK_TCK")
HUB_READY = "presence hub running"


class BenchError(RuntimeError):
    """A scenario could not run (a process did not start, a deadline passed)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll ``cond`` until true; return the time it took; raise BenchError saying what on timeout."""
    began = time.monotonic()
    deadline = began + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - began


# ---------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


class CpuMeter:
    """CPU share of one core used by ``pid`` between ``start()`` and ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._t0 = self._c0 = 0.0

    def start(self) -> None:
        self._c0, self._t0 = cpu_seconds(self.pid), time.monotonic()

    def stop(self) -> float:
        return (cpu_seconds(self.pid) - self._c0) / max(1e-9, time.monotonic() - self._t0)


# ---------------------------------------------------------------------------- Mosquitto


class Mosquitto:
    """A private Mosquitto configured so that nothing is dropped on the way to a slow client.

    Mosquitto's default ``max_queued_messages 1000`` silently drops messages to a subscriber
    that falls behind (issue #6: 135k of 200k), which would make a slow hub look fast. No
    persistence: every run starts empty.
    """

    def __init__(self, *, persistence: bool = False) -> None:
        #: keep sessions, queues and retained messages across :meth:`restart` (README's advice)
        self.persistence = persistence
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(binary):
            raise BenchError("mosquitto not installed: apt-get install mosquitto")
        self.binary = binary
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-mosquitto-")
        self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Self:
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join([
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            *(["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
              if self.persistence else ["persistence false"]),
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "max_inflight_messages 0",
            "set_tcp_nodelay true",
            "max_connections -1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]) + "\n")
        out = open(self.dir / "out.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"mosquitto exited: {(self.dir / 'out.log').read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(up, 10, "mosquitto to listen")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def restart(self) -> None:
        """SIGTERM (it saves its state) and start again on the same port."""
        _stop(self.proc)
        self.start()

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# ---------------------------------------------------------------------------- the hub


class HubProcess:
    """``python -m hub.cli ARGS`` as a real process; ``root`` puts another checkout first.

    ``root`` is how patches are measured: a scratch copy of the tree with the change applied,
    put first on PYTHONPATH, runs instead of the installed (editable) ``hub`` package.
    """

    def __init__(self, args: Iterable[str], *, root: str | None = None, log_level: str = "warning"):
        self.args = ["--log-level", log_level, *args]
        self.root = root
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.ready_at: float | None = None  # time.time() when the banner came
        self.started_at = 0.0
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 600) -> Self:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key in [k for k in env if k.startswith("PRESENCE_")]:
            del env[key]
        if self.root:
            env["PYTHONPATH"] = self.root + os.pathsep + env.get("PYTHONPATH", "")
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", *self.args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True, cwd=self.root or None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError("presence-hub exited while starting:\n" + "".join(self.lines[-20:]))
            return self.ready_at is not None

        wait_until(ready, timeout, "presence-hub to print its banner", 0.005)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.ready_at is None and HUB_READY in line:
                self.ready_at = time.time()
            if len(self.lines) < 2000:
                self.lines.append(line)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        _stop(self.proc, timeout=60)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---------------------------------------------------------------------------- observer


class Observer:
    """A subscriber that stamps every message with its arrival time (``time.time()``).

    It reads the socket itself (one thread, 256 KiB reads, one time stamp per read, PUBACKs
    sent once per read) and decodes no payload, so it keeps up with the hub's output: a paho
    subscriber tops out at 25-60k messages/s here, and a storm's offline messages would have
    queued in the observer, timing the observer instead of the hub. Scenarios parse afterwards.
    """

    def __init__(self, host: str, port: int, filters: Iterable[str], name: str = "bench-observer"):
        self.messages: list[tuple[float, str, bytes]] = []
        self.latest: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()
        self._subacks = 0
        self._suback = threading.Condition(self._lock)
        self._filters = list(filters)
        self._client_id = f"{name}-{os.getpid()}-{id(self)}"
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._mid = 0
        self.host, self.port = host, port
        self.keep_all = True

    def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        split = wire.Splitter()
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(262144)
                if not data:
                    return
                now = time.time()
                acks = bytearray()
                got: list[tuple[float, str, bytes]] = []
                subacks = 0
                for head, body in split.feed(data):
                    kind = head & 0xF0
                    if kind == wire.PUBLISH:
                        topic, payload, qos, mid = wire.publish_fields(head, body)
                        got.append((now, topic, payload))
                        if qos:
                            acks += wire.puback_packet(mid)
                    elif kind == wire.SUBACK:
                        subacks += 1
                if acks:
                    sock.sendall(acks)
                with self._lock:
                    if got:
                        if self.keep_all:
                            self.messages.extend(got)
                        latest = self.latest
                        for t, topic, payload in got:
                            latest[topic] = (t, payload)
                    if subacks:
                        self._subacks += subacks
                        self._suback.notify_all()

    def snapshot(self) -> dict[str, tuple[float, bytes]]:
        """A copy of ``latest`` (the reader thread keeps writing the original)."""
        with self._lock:
            return dict(self.latest)

    def subscribe(self, filters: Iterable[str]) -> None:
        flt = list(filters)
        self._filters += flt
        self._send_subscribe(flt)

    def _send_subscribe(self, filters: list[str]) -> None:
        assert self._sock is not None
        with self._lock:
            want = self._subacks + 1
            self._mid += 1
            self._sock.sendall(wire.subscribe_packet([(f, 1) for f in filters], self._mid))
            if not self._suback.wait_for(lambda: self._subacks >= want, 10):
                raise BenchError("observer subscription not acknowledged")

    def start(self) -> Self:
        self._sock = wire.connect_blocking(self.host, self.port, self._client_id, keepalive=0)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._thread = threading.Thread(target=self._read, daemon=True, name="bench-observer")
        self._thread.start()
        if self._filters:
            self._send_subscribe(self._filters)
        return self

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"\xe0\x00")  # DISCONNECT
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def loads(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None
