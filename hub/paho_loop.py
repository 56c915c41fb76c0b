"""Drive a paho-mqtt client from the asyncio event loop itself, with no paho network thread.

Why: with ``loop_start()`` paho's thread and the asyncio thread take turns on the GIL for every
small ``recv``/``send`` paho makes (paho 2.2 reads one packet per ``select()`` with a 1-byte
``recv`` for the command, one per length byte and one for the body, and sends one packet per
``send``), and the hand-off of each batch to the loop costs a wake-up. Here the socket is
registered with ``loop.add_reader``/``add_writer`` through paho's ``on_socket_*`` callbacks, so
paho's callbacks (``on_message``, ``on_connect``, ``on_disconnect``) run on the loop thread,
``publish``/``ack`` from the loop need no lock hand-off, and one wake-up handles everything the
kernel has buffered.

Measured facts about paho 2.2 that shaped this module:

* ``loop_read(max_packets)`` ignores its argument: it reads at most
  ``len(_out_messages) + len(_in_messages)`` packets (at least 1), so a QoS 0 subscriber gets
  one packet per call, and it returns success both for "read one" and "nothing left".
* Reading is unbuffered: 3 ``recv`` calls per small packet. :class:`_BufferedSocket` wraps the
  socket so paho's ``recv`` is served from one 64 KiB ``recv``; the driver calls ``loop_read``
  until that buffer is empty, then lets the loop poll again.
* ``reconnect()`` connects (DNS, TCP, TLS handshake) blocking. The socket is made in a worker
  thread (paho's own ``_create_socket``, so proxies, TLS and websockets keep working) and then
  handed to ``reconnect()`` on the loop thread, so every other paho state change happens on
  the loop thread only (no PUBLISH can slip in before CONNECT).

Two private paho names are used, both checked at import time of the driver: ``_sock`` (to put
the buffered wrapper in place) and ``_create_socket`` (to connect off the loop). If a future
paho lacks them the driver falls back to unbuffered reads and a blocking ``reconnect`` in a
worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

log = logging.getLogger(__name__)

#: bytes asked of the kernel per real ``recv`` (a batch of ~800 heartbeats)
READ_CHUNK = 64 * 1024
#: kernel reads per reader wake-up (x READ_CHUNK bytes) before other loop work gets its turn
READS_PER_WAKEUP = 4
#: unsent bytes above which paho is told "would block" (it then keeps packets queued)
WRITE_HIGH_WATER = 1024 * 1024
#: how long closing may block to get our DISCONNECT out in ``stop()``
LINGER_S = 1.0
#: how often ``loop_misc`` runs (keepalive pings, ping timeouts)
MISC_INTERVAL_S = 1.0
#: how long ``stop()`` waits for the DISCONNECT to leave before closing the socket itself
STOP_TIMEOUT_S = 2.0

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0


def jittered_backoff(
    failures: int, min_s: float = RECONNECT_MIN_S, max_s: float = RECONNECT_MAX_S
) -> float:
    """Exponential backoff with "equal jitter": half of the delay is random.

    So many hubs and agents that lost the same broker do not all knock on it at once.
    ``failures`` is the number of attempts that failed in a row (0 for the first retry).
    """
    base = min(max_s, min_s * 2 ** min(failures, 16))
    return random.uniform(base / 2, base)


class _BufferedSocket:
    """paho's socket with buffers both ways, so one system call serves many packets.

    Reading: one kernel ``recv`` of up to :data:`READ_CHUNK` serves paho's many small ``recv``
    calls. Writing: paho's one-``send``-per-packet goes into :attr:`out`; the driver sends it
    with :meth:`flush` after each round of paho work (measured on loopback: one ``send`` costs
    ~90 us, as much as paho's Python for a packet). Above :data:`WRITE_HIGH_WATER` unsent bytes
    ``send`` says "would block", so paho keeps the rest queued (and its flow control) until
    the socket drains.

    A send error is kept and raised to paho on its next ``recv``/``send``, so paho notices the
    dead link the usual way (``on_disconnect``, socket closed).
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self.out = bytearray()
        self.error: OSError | None = None
        #: kernel reads left in this wake-up; at 0 ``recv`` says "would block" (paho: AGAIN)
        self.reads_left = READS_PER_WAKEUP
        #: seconds ``close`` may block to get the last bytes (DISCONNECT) out; 0 = one try
        self.linger = 0.0

    @property
    def buffered(self) -> int:
        """Bytes read from the kernel that paho has not taken yet."""
        return len(self._buf) - self._pos

    def recv(self, buffer_size: int) -> bytes:
        if self.error is not None:
            raise self.error
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            if self.reads_left <= 0:
                raise BlockingIOError("read budget of this wake-up spent")
            self.reads_left -= 1
            # BlockingIOError (nothing to read) passes through to paho
            buf = bytes(self._sock.recv(max(buffer_size, READ_CHUNK)))
            if not buf:
                return buf
            self._buf = buf
            pos = 0
        end = pos + buffer_size
        self._pos = min(end, len(buf))
        return buf[pos:end]

    def send(self, buffer: bytes | bytearray) -> int:
        if self.error is not None:
            raise self.error
        if len(self.out) >= WRITE_HIGH_WATER and self.flush() and (
            len(self.out) >= WRITE_HIGH_WATER
        ):
            raise BlockingIOError("write buffer full")
        self.out += buffer
        return len(buffer)

    def flush(self) -> bool:
        """Send what is buffered; True if bytes are left (the socket is full)."""
        out = self.out
        if not out or self.error is not None:
            return False
        try:
            sent: int = self._sock.send(out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return True
        except OSError as exc:
            self.error = exc
            out.clear()
            return False
        del out[:sent]
        return bool(out)

    def close(self) -> None:
        if self.out and self.error is None:
            try:
                if self.linger > 0:
                    self._sock.settimeout(self.linger)
                    self._sock.sendall(self.out)
                else:
                    self.flush()
            except OSError:
                pass
        self.out.clear()
        self._buf = b""
        self._pos = 0
        self._sock.close()

    def fileno(self) -> int:
        fd: int = self._sock.fileno()
        return fd

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def pending(self) -> int:
        return self.buffered + self.inner_pending()

    def inner_pending(self) -> int:
        """Bytes an SSL socket has decrypted but not handed out (invisible to the poller)."""
        inner = getattr(self._sock, "pending", None)
        return int(inner()) if inner is not None else 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _paho_has(client: paho.Client, name: str) -> bool:
    return hasattr(client, name)


class AsyncioPahoLoop:
    """Runs ``client``'s network I/O on ``loop``: connect, read, write, keepalive, reconnect.

    paho's own callbacks keep working and fire on the loop thread: ``on_connect`` after every
    CONNACK (so subscribing there re-subscribes after a reconnect), ``on_disconnect`` whenever
    the link goes, ``on_connect_fail`` when a connection attempt fails before MQTT (called by
    this driver, as paho's own thread would). ``backoff(n)`` gives the delay before the next
    attempt after ``n`` failures in a row (0 after a working connection was lost).

    Call ``publish``/``subscribe``/``ack`` on the client from the loop thread (calls from other
    threads work, but then the registration of the writer is handed to the loop).
    """

    def __init__(
        self,
        client: paho.Client,
        loop: asyncio.AbstractEventLoop,
        *,
        host: str,
        port: int,
        keepalive: int,
        backoff: Callable[[int], float] = jittered_backoff,
        reads_per_wakeup: int = READS_PER_WAKEUP,
    ) -> None:
        self.client = client
        self.loop = loop
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.backoff = backoff
        self.reads_per_wakeup = reads_per_wakeup
        #: connection attempts that failed in a row
        self.failures = 0
        #: successful CONNACKs seen (tests and stats)
        self.connects = 0
        self._thread_id: int | None = None
        self._sock: Any = None  # the registered socket (wrapped)
        self._fd: int | None = None
        self._writing = False  # a writer is registered (only while the socket is full)
        self._kick_scheduled = False
        self._established = False  # this socket got a CONNACK
        self._stopping = False
        self._closed = asyncio.Event()
        self._closed.set()
        self._retry: asyncio.TimerHandle | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._buffered = _paho_has(client, "_sock")
        self._premade = _paho_has(client, "_create_socket")
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    # ------------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        """The broker accepted us (CONNACK) and the socket is open."""
        return self._fd is not None and self.client.is_connected()

    @property
    def registered(self) -> bool:
        """Is a socket registered with the loop (reader, maybe writer)?"""
        return self._fd is not None

    async def start(self) -> None:
        """Make the first connection attempt; on failure keep retrying in the background.

        Returns once the TCP (and TLS) connection is open and CONNECT is queued, or once the
        first attempt failed; ``on_connect`` tells when the broker accepted.
        """
        self._thread_id = threading.get_ident()
        self._stopping = False
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._misc = self.loop.call_later(MISC_INTERVAL_S, self._tick)
        await self._connect_task()

    async def stop(self) -> None:
        """Send DISCONNECT (so no will is published), close the socket, stop reconnecting."""
        self._stopping = True
        for handle in (self._retry, self._misc):
            if handle is not None:
                handle.cancel()
        self._retry = self._misc = None
        if self._connecting is not None:
            with contextlib.suppress(Exception):
                await self._connecting  # a worker thread cannot be cancelled; let it finish
        if self._fd is None:
            self.client.disconnect()  # nothing open: just marks paho disconnected
            return
        if isinstance(self._sock, _BufferedSocket):
            self._sock.linger = LINGER_S
        self.client.disconnect()  # queues DISCONNECT; the writer sends it and paho closes
        try:
            await asyncio.wait_for(self._closed.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("broker %s:%d did not take our DISCONNECT within %.1f s; closing",
                        self.host, self.port, STOP_TIMEOUT_S)
            self._force_close()

    # ------------------------------------------------------------------ connecting

    def _connect_task(self) -> asyncio.Task[None]:
        task = self.loop.create_task(self._connect_once())
        self._connecting = task
        return task

    async def _connect_once(self) -> None:
        self._retry = None
        client = self.client
        try:
            if self._premade:
                sock = await self.loop.run_in_executor(None, self._make_socket)
                if self._stopping:
                    sock.close()
                    return
                self._reconnect_with(sock)
            else:
                await self.loop.run_in_executor(None, client.reconnect)
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS, timeout
            self._connecting = None
            self._failed(f"cannot reach the broker {self.host}:{self.port}: {exc}")
            on_fail = client.on_connect_fail
            if on_fail is not None:
                try:
                    on_fail(client, client.user_data_get())
                except Exception:
                    log.exception("on_connect_fail raised")
            return
        self._connecting = None

    def _make_socket(self) -> Any:
        """Worker thread: DNS, TCP connect and TLS handshake, all through paho (blocking)."""
        return self.client._create_socket()

    def _reconnect_with(self, sock: Any) -> None:
        """Loop thread: paho's ``reconnect()`` on a socket that is already connected.

        The override is one-shot: a reconnect paho makes itself (its MQTT 3.1 downgrade) goes
        the normal, blocking way.
        """
        client = self.client
        taken = False

        def premade() -> Any:
            nonlocal taken
            vars(client).pop("_create_socket", None)
            taken = True
            return sock

        vars(client)["_create_socket"] = premade
        try:
            client.reconnect()
        except BaseException:
            if not taken:
                vars(client).pop("_create_socket", None)
                sock.close()
            raise

    def _failed(self, why: str) -> None:
        if self._stopping:
            return
        delay = self.backoff(self.failures)
        self.failures += 1
        log.warning("%s; retrying in %.1f s", why, delay)
        self._schedule_connect(delay)

    def _schedule_connect(self, delay: float) -> None:
        if self._stopping or self._retry is not None or self._connecting is not None:
            return
        self._retry = self.loop.call_later(delay, self._connect_task)

    # ------------------------------------------------------------------ paho socket callbacks

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self.loop.is_closed():
            return  # the client outlived its loop (garbage collection closes its socket)
        if threading.get_ident() == self._thread_id:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        setsockopt = getattr(sock, "setsockopt", None)
        if setsockopt is not None:
            # paho leaves Nagle on: a lone PUBLISH or PUBACK could wait for the broker's
            # delayed ACK (up to 40 ms on Linux); we coalesce writes ourselves
            with contextlib.suppress(OSError):
                setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._buffered and getattr(client, "_sock", None) is sock:
            sock = _BufferedSocket(sock)
            client._sock = sock  # paho reads and writes through the wrapper from now on
        self._call(self._attach, sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call(self._detach, sock)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call(self._kick_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """Nothing to do: :meth:`_sync_writer` decides after each round of writing."""

    # ------------------------------------------------------------------ loop thread

    def _attach(self, sock: Any) -> None:
        self._unregister()
        self._sock = sock
        self._fd = sock.fileno()
        self._established = False
        self._closed.clear()
        self.loop.add_reader(self._fd, self._on_readable)
        if self.client.want_write():
            self._kick_write()

    def _unregister(self) -> None:
        fd, self._fd, self._sock = self._fd, None, None
        if fd is None:
            return
        self.loop.remove_reader(fd)
        if self._writing:
            self.loop.remove_writer(fd)
            self._writing = False
        self._closed.set()

    def _detach(self, sock: Any) -> None:
        if self._fd is None or sock is not self._sock:
            return
        self._unregister()
        if self._stopping:
            return
        if self._established:
            self.failures = 0
        self._established = False
        delay = self.backoff(self.failures)
        self.failures += 1
        log.info("link to %s:%d closed; reconnecting in %.1f s", self.host, self.port, delay)
        self._schedule_connect(delay)

    def _kick_write(self) -> None:
        """paho queued a packet: write on the next loop turn, with whatever else comes by then.

        The socket is almost always writable, so this costs no poll registration; only a full
        socket gets a writer (see :meth:`_sync_writer`).
        """
        if self._fd is None or self._kick_scheduled or self._writing:
            return
        self._kick_scheduled = True
        self.loop.call_soon(self._on_writable)

    def _on_writable(self) -> None:
        self._kick_scheduled = False
        if self._fd is not None:
            self.client.loop_write()
            self._sync_writer()

    def _sync_writer(self) -> None:
        """Send what our buffer holds; watch for writability only while something is stuck."""
        sock = self._sock
        if sock is None:
            return
        stuck = False
        if isinstance(sock, _BufferedSocket):
            stuck = sock.flush()
            if sock.error is not None:
                self.loop.call_soon(self._on_readable)  # paho learns of it on its next recv
                return
        stuck = stuck or self.client.want_write()
        if stuck and not self._writing:
            self.loop.add_writer(sock.fileno(), self._on_writable)
            self._writing = True
        elif not stuck and self._writing:
            self.loop.remove_writer(sock.fileno())
            self._writing = False

    def _on_readable(self) -> None:
        """Every packet in up to ``reads_per_wakeup`` kernel reads, then the loop's other work.

        paho's ``loop_read`` handles one packet per call for a QoS 0 subscriber whatever its
        ``max_packets``, and reports "nothing left" as success, so we call it while our buffer
        holds bytes. The buffer is always emptied (a partial packet waits in paho's state), so
        nothing is left behind that the poller cannot see: the fd stays readable while the
        kernel holds more.
        """
        sock = self._sock
        if sock is None:
            return
        client = self.client
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        if isinstance(sock, _BufferedSocket):
            sock.reads_left = self.reads_per_wakeup
            while True:
                if client.loop_read() != ok or self._sock is not sock:
                    return  # paho closed the socket; _detach ran
                if not sock.buffered:
                    break
            if sock.reads_left <= 0 and sock.inner_pending():
                self.loop.call_soon(self._on_readable)  # TLS data the poller cannot see
        elif client.loop_read() != ok or self._sock is not sock:
            return
        if not self._established and client.is_connected():
            self._established = True
            self.failures = 0
            self.connects += 1
        # answers (PUBACKs, the next QoS 1 of the window) go out in this same turn
        if client.want_write():
            client.loop_write()
        self._sync_writer()

    def _tick(self) -> None:
        self._misc = None
        if self._stopping:
            return
        if self._fd is not None:
            self.client.loop_misc()
        self._misc = self.loop.call_later(MISC_INTERVAL_S, self._tick)

    def _force_close(self) -> None:
        """The socket outlived ``stop()``'s deadline: close it through paho (private, 2.2)."""
        close = getattr(self.client, "_sock_close", None)
        if close is not None:
            close()
        if self._fd is not None:
            self._detach(self._sock)


__all__ = ["READS_PER_WAKEUP", "READ_CHUNK", "AsyncioPahoLoop", "jittered_backoff"]
