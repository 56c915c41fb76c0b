"""The device agent: one MQTT connection at a time, each with its own session and last will.

Threads. ``start()`` runs one *supervisor* thread that owns every decision: connecting,
backoff, birth, heartbeats, pumping the outbox, clean stop. For each connection it makes a new
paho client and runs paho's network thread (``loop_start``) for it; paho callbacks only put
small events on the supervisor's queue (``on_publish`` is called with paho's internal lock
held, so doing real work there would risk a lock-order deadlock with threads that publish).
State messages and replies are handled on the paho thread because they only touch local
data, the state file and an ack publish.

Why a new paho client for every connection, rather than paho's automatic reconnect: MQTT fixes
the last will at CONNECT, and each connection needs a will that carries *its own* session id
(the hub ignores wills of old sessions). paho 2.x can change the will before its own
reconnects (``on_pre_connect``), but a fresh client also drops paho's in-memory queue of the
old connection, so the only copy of undelivered activity is the on-disk outbox and nothing is
sent twice by two mechanisms; and the backoff (with jitter), attempt counting and give-up are
ours, with log lines a person can follow.

Client ids and sessions. Every connection gets a new session id and, by default, the client id
``presence-agent/{user}/{device}/{session}``: a reconnect is a new client, never a takeover of
the old one (a takeover makes the broker publish the old connection's will just before the new
birth). The birth announces the heartbeat interval and the user's idle time. The agent also
reads its own ``conn`` topic: a birth of a session that is not this device's means a second
agent runs for the same device, and it says so once (:meth:`PresenceAgent._on_conn`).

Sleeping. :meth:`PresenceAgent.sleep` announces ``{"state":"sleeping","sleepMs":N}``, sends
DISCONNECT (so the broker drops the will), waits out the sleep in the supervisor and connects
again with a new session; the hub neither loses nor times out the device meanwhile.

Delivery of activity: ``record_activity`` appends to the :class:`~device_agent.outbox.Outbox`
(fsynced) and wakes the supervisor; the supervisor publishes rows in order (at most
:data:`WINDOW` unacknowledged) and deletes each row when its PUBACK arrives. Rows appended by
other processes (``presence-agent activity``) are noticed by polling SQLite's cheap
``data_version`` every :data:`OUTBOX_POLL_S`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Final, Self

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from hub.protocol import (
    MAX_PAYLOAD_BYTES,
    STATUSES,
    AckPayload,
    ActivityPayload,
    ConnPayload,
    HeartbeatPayload,
    ReplyPayload,
    RequestPayload,
    SetPayload,
    Topics,
    UserStatePayload,
    new_session_id,
)
from hub.protocol.payloads import MAX_ANNOUNCED_MS

from .config import AgentConfig
from .errors import AgentLocked, BrokerUnavailable, ConfigError, GaveUp, HubUnavailable
from .idle import IdleSource, make_idle_source
from .outbox import Outbox
from .statefile import StateFile
from .transport import (
    PERMANENT_REFUSALS,
    connect_error_text,
    disconnect_text,
    is_failure,
    make_client,
    reason_text,
    reason_value,
)

log = logging.getLogger("device_agent")

#: Most outbox rows published and not yet acknowledged at once (paho's default in-flight cap).
WINDOW: Final = 20
#: How often the supervisor looks for rows other processes appended to the outbox.
OUTBOX_POLL_S: Final = 0.25
#: How long to wait for the broker's CONNACK after the TCP (and TLS) connection is up.
CONNACK_TIMEOUT_S: Final = 10.0
#: How long a clean stop waits for the broker to acknowledge the offline message.
OFFLINE_ACK_TIMEOUT_S: Final = 2.0
#: How long after connecting the agent expects its own birth back on its conn topic. A broker
#: whose ACL lets a device publish but not read its conn topic grants the subscription and
#: then delivers nothing (Mosquitto), so the missing echo is the only sign.
CONN_ECHO_TIMEOUT_S: Final = 10.0

#: Outbox kinds the agent knows how to deliver.
OUTBOX_KINDS: Final = ("activity", "set")

StateCallback = Callable[[UserStatePayload], None]
TextCallback = Callable[[str], None]
OptionalTextCallback = Callable[[str | None], None]


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------
# Payload builders shared by the agent and ``presence-agent activity``


def build_activity(
    type: str,
    channel_id: str | None = None,
    data: dict[str, Any] | None = None,
    timestamp: int | None = None,
) -> bytes:
    """The activity payload, stamped with the time it was *recorded* (not delivered)."""
    try:
        payload = ActivityPayload(
            type=type,
            channel_id=channel_id,
            data=data,
            timestamp=timestamp if timestamp is not None else now_ms(),
        ).to_json()
    except ValidationError as exc:
        raise ValueError(f"invalid activity: {_first_error(exc)}") from None
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"activity too large: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    return payload


def queue_activity(
    config: AgentConfig,
    type: str,
    channel_id: str | None = None,
    data: dict[str, Any] | None = None,
    timestamp: int | None = None,
) -> tuple[int, int]:
    """Append one activity to the device's outbox without connecting anywhere.

    The running agent for the same user and device (or its next start) delivers it. Returns
    ``(row id, rows now waiting)``.
    """
    payload = build_activity(type, channel_id, data, timestamp)
    with Outbox(config.outbox_path, owner=f"{config.user}/{config.device}") as outbox:
        row = outbox.add("activity", payload)
        return row, outbox.count()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "value"
    return f"{loc}: {err.get('msg', 'invalid')}"


# --------------------------------------------------------------------------------------------
# Supervisor events (paho thread / caller threads -> supervisor)


@dataclass(frozen=True, slots=True)
class _Event:
    kind: str  # connack, disconnect, puback, suback, wake, sleep, stop
    generation: int = 0
    value: Any = None


@dataclass(slots=True)
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    reply: ReplyPayload | None = None


@dataclass(slots=True)
class _SleepRequest:
    """One call of :meth:`PresenceAgent.sleep`, handed from the caller to the supervisor.

    ``taken`` is set (under the agent's sleep lock) once the supervisor starts announcing, so
    a caller that gives up waiting knows whether it may still withdraw the request.
    """

    ms: int
    done: threading.Event = field(default_factory=threading.Event)
    taken: bool = False
    acked: bool = False


class _ConnectionEnded(Exception):
    """Internal: the current connection is over; ``outcome`` says how."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(outcome)
        self.outcome = outcome  # "stopped", "lost", "failed", "refused"
        self.detail = detail


class PresenceAgent:
    """Publishes this device's presence and delivers its activity; see the module docstring.

    Callbacks (``on_state``, ``on_status``, ``on_custom_status``, ``on_primary_change``) run on
    the network thread: keep them short and do not call :meth:`request` from them.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        idle_source: IdleSource | None = None,
        on_state: StateCallback | None = None,
        on_status: TextCallback | None = None,
        on_custom_status: OptionalTextCallback | None = None,
        on_primary_change: OptionalTextCallback | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.on_state = on_state
        self.on_status = on_status
        self.on_custom_status = on_custom_status
        self.on_primary_change = on_primary_change
        self._idle_source = idle_source
        self._outbox = Outbox(config.outbox_path, owner=f"{config.user}/{config.device}")
        self._state_file = (
            StateFile(config.state_file, config.user, config.device) if config.state_file else None
        )

        self._conn_topic = self.topics.device(config.user, config.device, "conn")
        self._reply_topic = self.topics.reply(config.user, config.device)
        self._state_topic = self.topics.user(config.user, "state")

        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._ready = threading.Event()  # connected and subscribed: requests can be answered
        self._stop_reason = "disconnect"
        self._lock_file: IO[bytes] | None = None

        self._client_lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._session: str | None = None
        self._connected_at: float | None = None  # monotonic time of the last CONNACK

        self._pending_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}

        self._state: UserStatePayload | None = None
        #: Every session id this device's agents used lately (this one's and, from the
        #: outbox, its predecessors'): a birth of one of them on our conn topic is our own.
        self._own_sessions: set[str] = set(self._outbox.recent_sessions())
        #: The first other live session seen for this device (warned about once).
        self.rival_session: str | None = None
        self._conn_watch_refused = False
        self._conn_echo = False  # our own birth came back on the conn topic

        self._sleep_lock = threading.Lock()
        self._sleep_request: _SleepRequest | None = None
        self._wake_early = threading.Event()  # wake_up() or stop() ends a sleep
        self._wake_deadline: float | None = None  # monotonic end of the current sleep
        self._wake_at: int | None = None  # the same, in wall-clock ms for people

        #: Set when the agent stopped trying (bad credentials, retries exhausted).
        self.error: GaveUp | None = None
        #: Counters for people and tests: delivered outbox rows, dropped incoming messages...
        self.stats: dict[str, int] = {
            "connections": 0,
            "delivered": 0,
            "heartbeats": 0,
            "acks": 0,
            "dropped": 0,
            "conn_seen": 0,  # messages on this device's own conn topic
            "rivals": 0,  # of them, births of sessions that are not this device's
            "sleeps": 0,
        }

    # -- public API -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def session(self) -> str | None:
        """The session id of the current connection (``None`` while disconnected)."""
        return self._session

    @property
    def sleeping(self) -> bool:
        """True between an announced sleep and the next connection attempt."""
        return self._wake_deadline is not None

    @property
    def wake_at(self) -> int | None:
        """When the current sleep ends (ms since the epoch), ``None`` while awake."""
        return self._wake_at

    @property
    def state(self) -> UserStatePayload | None:
        """The user's state as last published by the hub."""
        return self._state

    @property
    def pending_count(self) -> int:
        """Messages in the outbox that the broker has not acknowledged yet."""
        return self._outbox.count()

    def start(self) -> None:
        """Start connecting in the background; returns at once (see :meth:`wait_connected`)."""
        if self._thread is not None:
            raise RuntimeError("agent already started; a stopped agent cannot be restarted")
        make_client(self.config, self.config.client_id_for("check"))  # bad TLS: fail here
        if self.config.fixed_client_id:
            log.warning(
                "client_id %r has no {session}: every reconnect reuses it, so the broker takes"
                " over the previous connection (and may publish its will just before the new"
                " birth); use a template with {session} unless the broker demands a fixed id",
                self.config.client_id,
            )
        mismatch = self.config.account_mismatch()
        if mismatch is not None:
            log.warning("%s: the broker will refuse this agent, or drop what it publishes",
                        mismatch)
        if self._idle_source is None:
            self._idle_source = make_idle_source(self.config.idle_source)
        self._acquire_lock()
        self._thread = threading.Thread(target=self._supervise, name="presence-agent", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "disconnect", timeout: float = 5.0) -> None:
        """Publish ``conn`` offline with ``reason`` (if connected), disconnect, and wait.

        While asleep nothing is published and nothing connects: the announced sleep stands.
        """
        if self._thread is None or self._stopping.is_set():
            self._join(timeout)
            return
        if not reason or len(reason) > 64:
            raise ValueError("stop reason must be 1-64 characters")
        self._stop_reason = reason
        self._stopping.set()
        self._wake_early.set()
        self._events.put(_Event("stop"))
        self._join(timeout)

    def close(self) -> None:
        """Stop (if running) and close the outbox."""
        self.stop()
        self._outbox.close()

    def sleep(self, ms: int, timeout: float = 5.0) -> bool:
        """Announce a sleep of ``ms`` milliseconds, disconnect cleanly, and stay away that long.

        For battery devices: the hub keeps the device neither lost nor timed out until
        ``ms`` plus its heartbeat timeout have passed, where a silent disconnect would read
        as a lost device. The agent publishes ``{"state":"sleeping","sleepMs":ms}`` on
        ``conn`` (QoS 1, retained) once it is connected and subscribed (so the user state the
        broker retains is acked first), waits for the broker's PUBACK, then sends DISCONNECT,
        so no last will follows. After ``ms`` (or :meth:`wake_up`) it connects again with a
        new session and birth. Activity recorded meanwhile waits in the outbox.

        Blocks until the announcement is done; returns True if the broker acknowledged it,
        False if it could not be sent within ``timeout`` (then nothing changes) or was not
        acknowledged (the agent sleeps anyway). To exit while asleep, call :meth:`close`: a
        stop during a sleep leaves the announcement standing and does not connect.
        """
        if self._thread is None:
            raise RuntimeError("start the agent before sleep()")
        if self.sleeping:
            raise RuntimeError("the agent is asleep already: wake_up() first, or close()")
        if isinstance(ms, bool) or not isinstance(ms, int) or not 0 < ms <= MAX_ANNOUNCED_MS:
            raise ValueError(f"sleep must be 1 to {MAX_ANNOUNCED_MS} ms, not {ms!r}")
        request = _SleepRequest(ms)
        with self._sleep_lock:
            if self._sleep_request is not None:
                raise RuntimeError("the agent is already going to sleep")
            self._sleep_request = request
            self._wake_early.clear()  # an earlier wake_up() must not cut this sleep short
        self._events.put(_Event("sleep"))
        if request.done.wait(timeout):
            return request.acked
        with self._sleep_lock:
            if not request.taken:
                self._sleep_request = None
                return False
        # The supervisor is announcing: that ends within the PUBACK deadline.
        request.done.wait(OFFLINE_ACK_TIMEOUT_S + 1.0)
        return request.acked

    def wake_up(self) -> None:
        """End a sleep early: connect (new session, birth) now. No effect while awake."""
        self._wake_early.set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected and subscribed (True) or ``timeout`` passed (False)."""
        return self._ready.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the agent has stopped (clean stop or give-up); True if it has."""
        return self._finished.wait(timeout)

    def record_activity(
        self,
        type: str,
        channel_id: str | None = None,
        data: dict[str, Any] | None = None,
        timestamp: int | None = None,
    ) -> None:
        """Record one interaction; it is on disk when this returns and sent when possible."""
        payload = build_activity(type, channel_id, data, timestamp)
        self._outbox.add("activity", payload)
        self._wake()

    def set_status(self, status: str) -> None:
        """Ask the hub to set the user's status (``online`` clears a manual status)."""
        if status not in STATUSES:
            raise ValueError(f"invalid status {status!r}: use one of {', '.join(STATUSES)}")
        self._outbox.add("set", SetPayload.model_validate({"status": status}).to_json())
        self._wake()

    def set_custom_status(self, text: str | None) -> None:
        """Set the user's custom status text, or clear it with ``None``."""
        try:
            body = SetPayload(custom_status=text)
        except ValidationError as exc:
            raise ValueError(f"invalid custom status: {_first_error(exc)}") from None
        # exclude_unset keeps an explicit null: {"customStatus": null} clears, {} would not.
        payload = body.model_dump_json(by_alias=True, exclude_unset=True).encode()
        self._outbox.add("set", payload)
        self._wake()

    def request(self, command: str, timeout: float = 5.0) -> ReplyPayload:
        """Send a chat command to the hub and wait for its reply.

        Raises :class:`~device_agent.errors.BrokerUnavailable` when not connected to the
        broker within ``timeout``, :class:`~device_agent.errors.HubUnavailable` when the hub
        does not answer within it.
        """
        deadline = time.monotonic() + timeout
        request_id = secrets.token_hex(8)
        try:
            body = RequestPayload(id=request_id, command=command).to_json()
        except ValidationError as exc:
            raise ValueError(f"invalid command: {_first_error(exc)}") from None
        if not self._ready.wait(timeout):
            raise BrokerUnavailable(
                f"not connected to the broker at {self.config.broker} (waited {timeout:g}s);"
                " check that it runs and that the agent can reach it"
            )
        slot = _Pending()
        with self._pending_lock:
            self._pending[request_id] = slot
        try:
            with self._client_lock:
                client = self._client
            topic = self.topics.device(self.config.user, self.config.device, "req")
            if client is None or client.publish(topic, body, qos=1).rc != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(f"lost the connection to the broker at {self.config.broker}")
            if not slot.event.wait(max(0.0, deadline - time.monotonic())) or slot.reply is None:
                raise HubUnavailable(
                    f"no reply from the hub within {timeout:g}s (asked via {self.config.broker},"
                    f" prefix {self.config.prefix!r}); is presence-hub running on that broker?"
                )
            return slot.reply
        finally:
            with self._pending_lock:
                self._pending.pop(request_id, None)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- lifecycle helpers ----------------------------------------------------------------------
    def _wake(self) -> None:
        self._events.put(_Event("wake"))

    def _join(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._release_lock()

    def _acquire_lock(self) -> None:
        """One agent per user/device and outbox: two would share the outbox, and two live
        sessions of one device make its presence flap (see :meth:`_on_conn` for two agents
        on different machines, which no lock file can see)."""
        path = self.config.outbox_path.with_name(self.config.outbox_path.name + ".lock")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX; go without the guard
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = path.open("a+b")
        except OSError as exc:
            raise ConfigError(f"cannot create lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise AgentLocked(
                f"another presence-agent already runs for {self.config.user}/"
                f"{self.config.device} (it holds {path})"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._lock_file = handle

    def _release_lock(self) -> None:
        handle, self._lock_file = self._lock_file, None
        if handle is not None:
            handle.close()  # closing drops the flock

    # -- the supervisor thread ------------------------------------------------------------------
    def _supervise(self) -> None:
        failures = 0
        broker = self.config.broker
        try:
            while not self._stopping.is_set():
                self._connected_at = None
                try:
                    self._one_connection()
                    outcome = _ConnectionEnded("stopped")
                except _ConnectionEnded as ended:
                    outcome = ended
                except ConfigError as exc:  # e.g. TLS files removed while running
                    self._give_up(str(exc))
                    break
                if outcome.outcome == "stopped" or self._stopping.is_set():
                    break
                if outcome.outcome == "sleeping":
                    failures = 0
                    self._sleep_until_woken()
                    continue
                if outcome.outcome == "refused-permanent":
                    mismatch = self.config.account_mismatch()
                    self._give_up(f"the broker at {broker} refused the connection: {outcome.detail}"
                                  + (f"; {mismatch}" if mismatch else ""))
                    break
                # A connection that held for a while starts the backoff afresh; one that drops
                # at once (a duplicate client id, an ACL kick) keeps backing off.
                lasted_ms = (
                    (time.monotonic() - self._connected_at) * 1000
                    if self._connected_at is not None
                    else 0.0
                )
                failures = 1 if lasted_ms >= self.config.reconnect_max_ms else failures + 1
                limit = self.config.max_reconnect_attempts
                if limit and failures >= limit:
                    self._give_up(
                        f"could not stay connected to {broker} after {failures} attempts"
                        f" (last: {outcome.detail})"
                    )
                    break
                delay = self._backoff(failures)
                log.info("reconnecting to %s in %.2fs (attempt %d)", broker, delay, failures + 1)
                self._stopping.wait(delay)
        except Exception:  # pragma: no cover - a bug; say so instead of dying silently
            log.exception("presence agent crashed")
            self.error = GaveUp("the agent stopped after an internal error (see the log)")
        finally:
            self._set_disconnected()
            with self._sleep_lock:
                request, self._sleep_request = self._sleep_request, None
            if request is not None:
                request.done.set()  # never announced: sleep() answers False
            self._finished.set()

    def _sleep_until_woken(self) -> None:
        """Stay disconnected until the announced sleep is over, :meth:`wake_up` or a stop."""
        deadline = self._wake_deadline
        # stop() sets _stopping before _wake_early: checking it here closes the window in
        # which a sleep() racing a stop() cleared _wake_early again.
        if deadline is not None and not self._stopping.is_set():
            self._wake_early.wait(max(0.0, deadline - time.monotonic()))
        self._wake_deadline = None
        self._wake_at = None
        if not self._stopping.is_set():
            log.info("awake: connecting to %s with a new session", self.config.broker)

    def _backoff(self, failures: int) -> float:
        """Exponential, capped, with "equal jitter" so a hub's devices do not reconnect in step."""
        base = self.config.reconnect_min_ms << min(max(failures - 1, 0), 30)
        capped = min(self.config.reconnect_max_ms, base) / 1000
        jitter: float = random.uniform(0, capped / 2)
        return capped / 2 + jitter

    def _give_up(self, why: str) -> None:
        log.error("giving up: %s", why)
        self.error = GaveUp(why)

    def _one_connection(self) -> None:
        """Connect once and serve until the connection ends (raises :class:`_ConnectionEnded`)."""
        config = self.config
        self._generation += 1
        generation = self._generation
        session = new_session_id()
        self._remember_session(session)
        client_id = config.client_id_for(session)
        client = make_client(config, client_id)
        will = ConnPayload(state="offline", session=session, reason="lost").to_json()
        client.will_set(self._conn_topic, will, qos=1, retain=True)
        self._install_callbacks(client, generation)

        log.info("connecting to %s as %s", config.broker, client_id)
        try:
            client.connect(config.broker.host, config.broker.port, keepalive=config.keepalive_s)
        except OSError as exc:  # includes ssl.SSLError and socket.gaierror
            detail = connect_error_text(exc)
            log.warning("cannot connect to %s: %s", config.broker, detail)
            raise _ConnectionEnded("failed", detail) from None
        client.loop_start()
        try:
            self._await_connack(client, generation)
            self._serve(client, generation, session)
        finally:
            with self._client_lock:
                self._client = None
            self._set_disconnected()
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    def _remember_session(self, session: str) -> None:
        self._own_sessions.add(session)
        try:
            self._outbox.remember_session(session)
        except sqlite3.Error as exc:  # only a restarted agent's warning depends on it
            log.warning("cannot note session %s in %s: %s", session, self._outbox.path, exc)

    def _install_callbacks(self, client: mqtt.Client, generation: int) -> None:
        put = self._events.put

        def on_connect(_c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
            put(_Event("connack", generation, reason_code))

        def on_disconnect(_c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
            put(_Event("disconnect", generation, reason_code))

        def on_publish(_c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
            put(_Event("puback", generation, mid))

        def on_subscribe(_c: Any, _u: Any, mid: int, codes: Any, _props: Any) -> None:
            put(_Event("suback", generation, (mid, codes)))

        def on_message(c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            try:
                self._on_message(c, message)
            except Exception:  # never let a bad message kill paho's thread
                self.stats["dropped"] += 1
                log.exception("error while handling a message on %s", message.topic)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_subscribe = on_subscribe
        client.on_message = on_message

    def _next_event(self, generation: int, timeout: float | None) -> _Event | None:
        """The next event for this connection (stale ones of old clients are skipped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                return None
            if event.generation in (0, generation):
                return event

    def _await_connack(self, client: mqtt.Client, generation: int) -> None:
        broker = self.config.broker
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while True:
            event = self._next_event(generation, deadline - time.monotonic())
            if event is None:
                log.warning("no CONNACK from %s within %.0fs", broker, CONNACK_TIMEOUT_S)
                raise _ConnectionEnded("failed", "no CONNACK")
            if event.kind == "stop":
                raise _ConnectionEnded("stopped")
            if event.kind == "disconnect":
                detail = disconnect_text(event.value)
                log.warning("connection to %s closed before CONNACK: %s", broker, detail)
                raise _ConnectionEnded("failed", detail)
            if event.kind == "connack":
                if is_failure(event.value):
                    detail = reason_text(event.value)
                    log.warning("broker %s refused the connection: %s", broker, detail)
                    permanent = reason_value(event.value) in PERMANENT_REFUSALS
                    raise _ConnectionEnded("refused-permanent" if permanent else "failed", detail)
                return

    def _serve(self, client: mqtt.Client, generation: int, session: str) -> None:
        """Birth, subscriptions, heartbeats and the outbox, until the connection ends."""
        config = self.config
        interval = config.heartbeat_interval_ms / 1000
        self.stats["connections"] += 1
        self._connected_at = time.monotonic()
        self._session = session
        with self._client_lock:
            self._client = client
        log.info("connected to %s (session %s)", config.broker, session)

        # Our own conn topic first: the broker answers with the conn retained *before* our
        # birth, so a live birth of another session (a second agent for this device) shows,
        # and later births of other sessions arrive live (see _on_conn).
        self._conn_echo = False
        conn_result, conn_mid = client.subscribe(self._conn_topic, 1)
        idle = self._idle_ms()
        birth = ConnPayload(state="online", session=session, name=config.name, ts=now_ms(),
                            heartbeat_ms=config.heartbeat_interval_ms, idle_ms=idle)
        client.publish(self._conn_topic, birth.to_json(), qos=1, retain=True)
        result, sub_mid = client.subscribe(
            [(self.topics.user_filter(config.user), 1), (self._reply_topic, 1)]
        )
        if result != mqtt.MQTT_ERR_SUCCESS or conn_result != mqtt.MQTT_ERR_SUCCESS:
            raise _ConnectionEnded("lost", "subscribe failed")
        self._write_connection(True, session)

        inflight: dict[int, int] = {}  # paho mid -> outbox row id
        cursor = 0  # highest row id published on this connection
        seq = 0
        heartbeat_topic = self.topics.device(config.user, config.device, "heartbeat")
        next_heartbeat = time.monotonic()
        next_poll = time.monotonic() + OUTBOX_POLL_S
        echo_due: float | None = time.monotonic() + CONN_ECHO_TIMEOUT_S

        def pump() -> None:
            nonlocal cursor
            room = WINDOW - len(inflight)
            if room <= 0:
                return
            for entry in self._outbox.pending(after=cursor, limit=room):
                cursor = entry.id
                if entry.kind not in OUTBOX_KINDS:
                    log.warning("dropping outbox row %d of unknown kind %r", entry.id, entry.kind)
                    self._outbox.remove([entry.id])
                    continue
                topic = self.topics.device(config.user, config.device, entry.kind)  # type: ignore[arg-type]
                info = client.publish(topic, entry.payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise _ConnectionEnded("lost", f"publish failed: {mqtt.error_string(info.rc)}")
                inflight[info.mid] = entry.id

        pump()
        while True:
            if self._ready.is_set() and self._sleep_request is not None:
                self._go_to_sleep(client, generation, session, inflight)
            now = time.monotonic()
            if now >= next_heartbeat:
                self._heartbeat(client, heartbeat_topic, session, seq)
                seq += 1
                next_heartbeat = max(next_heartbeat + interval, now + interval / 2)
            if now >= next_poll:
                next_poll = now + OUTBOX_POLL_S
                if self._outbox.changed_by_others():
                    pump()
            if echo_due is not None and now >= echo_due:
                echo_due = None
                if not self._conn_echo:
                    self._conn_watch_failed()

            wait = max(0.0, min(next_heartbeat, next_poll) - time.monotonic())
            first = self._next_event(generation, wait)
            if first is None:
                continue
            events = [first]
            with contextlib.suppress(queue.Empty):
                while len(events) < 1000:
                    events.append(self._events.get_nowait())
            delivered: list[int] = []
            outbox_touched = False
            stop = False
            for event in events:
                if event.generation not in (0, generation):
                    continue
                if event.kind == "puback" and event.value in inflight:
                    delivered.append(inflight.pop(event.value))
                elif event.kind == "suback" and event.value[0] == sub_mid:
                    if any(is_failure(code) for code in event.value[1]):
                        log.warning("the broker at %s refused a subscription (check its ACL):"
                                    " no user state or replies will arrive", config.broker)
                    self._ready.set()
                elif event.kind == "suback" and event.value[0] == conn_mid:
                    if any(is_failure(code) for code in event.value[1]):
                        self._conn_watch_failed()
                elif event.kind == "wake":
                    outbox_touched = True
                elif event.kind == "stop":
                    stop = True
                elif event.kind == "disconnect":
                    if delivered:
                        self._delivered(delivered)
                    detail = disconnect_text(event.value)
                    log.warning("connection to %s lost: %s", config.broker, detail)
                    raise _ConnectionEnded("lost", detail)
            if delivered:
                self._delivered(delivered)
            if stop:
                self._clean_stop(client, generation, session, inflight)
                raise _ConnectionEnded("stopped")
            if delivered or outbox_touched:
                pump()

    def _delivered(self, rows: list[int]) -> None:
        self._outbox.remove(rows)
        self.stats["delivered"] += len(rows)

    def _conn_watch_failed(self) -> None:
        if not self._conn_watch_refused:
            self._conn_watch_refused = True
            log.info("the broker at %s does not let this device read its own conn topic %s"
                     " (its ACL): a second agent for %s/%s would go unnoticed",
                     self.config.broker, self._conn_topic, self.config.user, self.config.device)

    def _idle_ms(self) -> int | None:
        """The user's idle time now, or None where the idle source cannot tell."""
        return self._idle_source.idle_ms() if self._idle_source is not None else None

    def _heartbeat(self, client: mqtt.Client, topic: str, session: str, seq: int) -> None:
        idle = self._idle_ms()
        beat = HeartbeatPayload(session=session, seq=seq, ts=now_ms(), idle_ms=idle)
        client.publish(topic, beat.to_json(), qos=0)
        self.stats["heartbeats"] += 1

    def _clean_stop(
        self, client: mqtt.Client, generation: int, session: str, inflight: dict[int, int]
    ) -> None:
        """Offline with the stop reason, retained; wait for its PUBACK; then DISCONNECT."""
        offline = ConnPayload(
            state="offline", session=session, reason=self._stop_reason, ts=now_ms()
        )
        if self._announce_and_disconnect(client, generation, offline, inflight):
            log.info("stopped: %s offline (reason %s)", self.config.broker, self._stop_reason)
        else:
            log.warning("stopped without confirmation of the offline message from %s",
                        self.config.broker)

    def _go_to_sleep(
        self, client: mqtt.Client, generation: int, session: str, inflight: dict[int, int]
    ) -> None:
        """Announce the requested sleep, disconnect cleanly, and end this connection."""
        with self._sleep_lock:
            request = self._sleep_request
            if request is None:  # withdrawn by a caller that stopped waiting
                return
            request.taken = True
        ms = request.ms
        sleeping = ConnPayload(state="sleeping", session=session, sleep_ms=ms, ts=now_ms())
        acked = self._announce_and_disconnect(client, generation, sleeping, inflight)
        self._wake_deadline = time.monotonic() + ms / 1000
        self._wake_at = now_ms() + ms
        self.stats["sleeps"] += 1
        self._set_disconnected()
        with self._sleep_lock:
            self._sleep_request = None
        request.acked = acked
        request.done.set()
        if acked:
            log.info("asleep for %d ms (session %s announced it); then a new session", ms, session)
        else:
            log.warning("asleep for %d ms, but %s did not confirm the announcement",
                        ms, self.config.broker)
        raise _ConnectionEnded("sleeping")

    def _announce_and_disconnect(
        self, client: mqtt.Client, generation: int, payload: ConnPayload,
        inflight: dict[int, int],
    ) -> bool:
        """Publish ``payload`` on conn (retained), wait for its PUBACK (outbox PUBACKs that
        arrive meanwhile still count), then DISCONNECT so the broker drops the last will.
        True if the broker acknowledged ``payload``."""
        self._ready.clear()
        info = client.publish(self._conn_topic, payload.to_json(), qos=1, retain=True)
        deadline = time.monotonic() + OFFLINE_ACK_TIMEOUT_S
        acked = False
        delivered: list[int] = []
        while info.rc == mqtt.MQTT_ERR_SUCCESS and not acked:
            event = self._next_event(generation, deadline - time.monotonic())
            if event is None or event.kind == "disconnect":
                break
            if event.kind == "puback":
                if event.value == info.mid:
                    acked = True
                elif event.value in inflight:
                    delivered.append(inflight.pop(event.value))
        if delivered:
            self._delivered(delivered)
        client.disconnect()
        return acked

    def _set_disconnected(self) -> None:
        self._ready.clear()
        session, self._session = self._session, None
        if session is not None:
            self._write_connection(False, None)

    def _write_connection(self, connected: bool, session: str | None) -> None:
        if self._state_file is None:
            return
        try:
            self._state_file.set_connection(connected, session, now_ms())
        except OSError as exc:  # a full disk must not take presence down with it
            log.warning("cannot write state file %s: %s", self._state_file.path, exc)

    # -- incoming messages (paho thread) -------------------------------------------------------
    def _on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic == self._reply_topic:
            self._on_reply(bytes(message.payload))
        elif topic == self._state_topic:
            self._on_state(client, bytes(message.payload))
        elif topic == self._conn_topic:
            self._on_conn(client, bytes(message.payload))
        # status/custom/primary repeat what the state carries; the versioned state is the
        # single source for callbacks, so the plain-text topics are not used here.

    def _on_conn(self, client: mqtt.Client, payload: bytes) -> None:
        """Our own conn topic: a birth of a session that is not this device's is a second agent.

        Two agents for one user and device (say, the same config on two machines, where no
        lock file can see the other) each announce a session; the hub follows whichever was
        born last, so the device's presence flaps with every reconnect. That is a setup
        mistake only a person can fix, so say it once, naming the other session; its name
        (the host name by default) and birth time tell which machine it is. Offline, will
        and sleeping messages of other sessions are no sign of a live agent.
        """
        self.stats["conn_seen"] += 1
        if not payload:  # the retained conn was cleared: the device was removed at the hub
            self._born_again(client)
            return
        try:
            conn = ConnPayload.model_validate_json(payload)
        except ValidationError as exc:
            self.stats["dropped"] += 1
            log.debug("ignoring a malformed conn message: %s", _first_error(exc))
            return
        if conn.session == self._session:
            self._conn_echo = True
        if conn.state != "online" or conn.session in self._own_sessions:
            return
        self.stats["rivals"] += 1
        if self.rival_session is not None:
            log.debug("another birth for this device: session %s", conn.session)
            return
        self.rival_session = conn.session
        born = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(conn.ts / 1000)) \
            if conn.ts is not None else "at an unknown time"
        log.warning(
            "another agent is running as %s/%s: session %s (name %r, born %s; this agent is"
            " session %s). Two agents for one device make its presence flap: stop one, or"
            " give each its own device id",
            self.config.user, self.config.device, conn.session, conn.name or "?", born,
            self._session or "?",
        )

    def _born_again(self, client: mqtt.Client) -> None:
        """The hub forgot this device while its agent runs (``presence devices remove``) and
        cleared its retained birth. The next heartbeat would bring it back, but by its id
        alone: heartbeats carry no name. So the same session is born again, and the device
        comes back as it was first born, name and heartbeat interval included."""
        session = self._session
        if session is None or not self.connected:
            return
        birth = ConnPayload(state="online", session=session, name=self.config.name, ts=now_ms(),
                            heartbeat_ms=self.config.heartbeat_interval_ms, idle_ms=self._idle_ms())
        client.publish(self._conn_topic, birth.to_json(), qos=1, retain=True)
        log.info("this device was removed at the hub while running: announced it again")

    def _on_reply(self, payload: bytes) -> None:
        try:
            reply = ReplyPayload.model_validate_json(payload)
        except ValidationError as exc:
            self.stats["dropped"] += 1
            log.warning("dropping malformed reply: %s", _first_error(exc))
            return
        with self._pending_lock:
            slot = self._pending.get(reply.id)
        if slot is not None:  # replies to the `presence` command share the topic: not ours
            slot.reply = reply
            slot.event.set()

    def _on_state(self, client: mqtt.Client, payload: bytes) -> None:
        if not payload:  # the retained state was cleared (user removed)
            return
        try:
            state = UserStatePayload.model_validate_json(payload)
        except ValidationError as exc:
            self.stats["dropped"] += 1
            log.warning("dropping malformed user state: %s", _first_error(exc))
            return
        previous, self._state = self._state, state
        if self._state_file is not None:
            try:
                self._state_file.set_state(state, now_ms())
            except OSError as exc:
                log.warning("cannot write state file %s: %s", self._state_file.path, exc)
        self._call(self.on_state, state)
        if previous is None or previous.status != state.status:
            self._call(self.on_status, state.status)
        if previous is None or previous.custom_status != state.custom_status:
            self._call(self.on_custom_status, state.custom_status)
        if previous is None or previous.active_device != state.active_device:
            self._call(self.on_primary_change, state.active_device)
        ack_topic = self.topics.device(self.config.user, self.config.device, "ack")
        client.publish(ack_topic, AckPayload(version=state.version).to_json(), qos=1)
        self.stats["acks"] += 1

    @staticmethod
    def _call(callback: Callable[[Any], None] | None, value: Any) -> None:
        if callback is None:
            return
        try:
            callback(value)
        except Exception:
            log.exception("presence callback %r failed", callback)

