"""``presence-hub`` (run): the hub on an edge box until SIGINT/SIGTERM, then a clean stop.

With no flags it uses an MQTT broker already listening on 127.0.0.1:1883, or starts the
embedded one there, and keeps state in a TinyDB file; on SIGINT/SIGTERM it stops cleanly
(``offline`` on ``P/hub/status``, state flushed).
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hub.core.errors import PresenceError
from hub.process import raise_open_file_limit, tune_gc
from hub.protocol import format_duration_ms

log = logging.getLogger("presence-hub")

def script_prefix(executable: str | None = None, cwd: Path | None = None,
                  path: str | None = None) -> str:
    """What to put before ``presence-agent`` (and ``presence``, ``presence-hub``) in commands
    shown to the user: ``""`` when the shell finds this installation's scripts on ``PATH``
    (an activated venv, a system install), else their folder, ``.venv/bin/`` for a checkout's
    venv run from the checkout. A fresh clone's ``make run`` has no venv on ``PATH``, and a
    bare ``presence-agent`` there is "command not found" (or another installation's)."""
    bin_dir = Path(executable or sys.executable).absolute().parent  # not resolved: a venv's
    if not (bin_dir / "presence-agent").exists():                   # python is a symlink
        return ""  # not run from an installation's scripts: nothing better to say
    found = shutil.which("presence-agent", path=path)
    if found is not None and Path(found).absolute().parent == bin_dir:
        return ""
    try:
        return f"{bin_dir.relative_to((cwd or Path.cwd()).absolute())}/"
    except ValueError:
        return f"{bin_dir}/"


def _banner(settings: dict[str, Any], broker_desc: str, broker: str,
            access: str | None = None, tls_url: str | None = None,
            scripts: str | None = None) -> str:
    """The start-up lines: what runs, and commands that work as shown for this configuration
    (with accounts: logins, and the watcher's filter, which is narrower than ``P/#``)."""
    from hub.protocol import BrokerURL

    host, _, port = settings["listen"].rpartition(":")
    hub_login = None
    if broker != "embedded":
        parsed = BrokerURL.parse(broker)
        host, port, hub_login = parsed.host, str(parsed.port), parsed.username
    if host.strip("[]") in ("0.0.0.0", "::", ""):  # listening everywhere: name this machine
        import socket

        host = socket.gethostname()
    prefix = settings["prefix"]
    scripts = script_prefix() if scripts is None else scripts
    lines = [
        f"presence hub running: {broker_desc}; storage {settings['storage']}"
        f"{' ' + settings['db'] if settings['storage'] == 'tinydb' else ''}; heartbeat "
        f"{format_duration_ms(settings['heartbeat_interval'])}, away after "
        f"{format_duration_ms(settings['away_after'])}, offline after "
        f"{format_duration_ms(settings['offline_after'])}",
    ]
    if access is not None:
        lines.append(f"  access:       {access}")
    if tls_url is not None:
        lines.append(f"  TLS:          {tls_url}")
    url = f"mqtt://{host}:{port}"
    device = f"--broker {url} --user alice --device laptop"
    # an external broker the hub logs in to has accounts of its own, whatever this box holds
    logins = hub_login is not None or (access is not None and access.startswith(
        ("authentication on", "enforced by the external")))
    if logins:
        from hub.auth import default_credentials_path
        from hub.cli.settings import SETTINGS

        where = ""
        if Path(settings["credentials"]) != default_credentials_path(settings["db"]):
            where = f" --credentials {shlex.quote(str(settings['credentials']))}"
        elif settings["db"] != next(s.default for s in SETTINGS if s.name == "db"):
            where = f" --db {shlex.quote(str(settings['db']))}"
        export = ("; then export-mosquitto and reload Mosquitto" if broker != "embedded"
                  else "")
        login = "PRESENCE_BROKER_USERNAME=alice/laptop PRESENCE_BROKER_PASSWORD=PASSWORD"
        lines += [
            f"  watch:        mosquitto_sub -h {host} -p {port} -u WATCHER -P PASSWORD "
            f"-t '{prefix}/users/#' -v",
            f"                (a read-only account, {scripts}presence-hub users add-watcher "
            f"WATCHER{where}: it may read {prefix}/users/#, {prefix}/events/# and "
            f"{prefix}/hub/status)",
            f"  join device:  {scripts}presence-hub users add alice laptop{where}   (prints "
            f"its password{export}), then",
            f"                {login} {scripts}presence-agent {device}",
            f"  ask the hub:  {login} {scripts}presence {device} who",
        ]
    else:
        lines += [
            f"  watch:        mosquitto_sub -h {host} -p {port} -t '{prefix}/#' -v",
            f"  join device:  {scripts}presence-agent {device}",
            f"  ask the hub:  {scripts}presence {device} who",
        ]
    lines.append("  stop:         Ctrl-C")
    return "\n".join(lines)


def _attach_web(presence: Any, hub: Any, settings: dict[str, Any]) -> Any:
    """The HTTP side (``--http``), started and stopped with the service; None without it."""
    if settings["http"] is None:
        return None
    from hub.core.errors import PresenceError

    try:
        from hub.web.link import MqttLink
        from hub.web.server import WebServer
    except ImportError as exc:
        raise PresenceError(f"--http needs the hub's web stack ({exc.name} is missing): "
                            "pip install 'mqtt-presence-hub[hub]'") from None
    web = WebServer(presence, settings["http"], token=settings["http_token"],
                    link=MqttLink(hub))
    presence.attach(web)
    return web


def _with_dashboard(banner: str, web: Any, settings: dict[str, Any]) -> str:
    """The banner with the dashboard's address, above its last line (how to stop)."""
    if web is None:
        return banner
    login = ("   (token: log in with any name and the token as password, or add ?token=TOKEN)"
             if settings["http_token"] else "")
    head, _, last = banner.rpartition("\n")
    return (f"{head}\n  dashboard:    {web.url}{login}\n"
            f"  metrics:      {web.url}metrics   health: {web.url}healthz\n{last}")


#: What the engine's counters count, said in the log lines that show them. Most are the
#: normal life of devices, not faults, and a bare "stale_session=1" at stop left users
#: guessing. tests/test_first_hour.py checks that every counter the engine keeps is here.
ENGINE_COUNTERS = {
    "will_applied": "last wills that took a device offline",
    "will_voided_by_reconnect": "last wills void: the device came back within the grace",
    "will_voided_by_link_loss": "last wills void: they came as the hub's broker link dropped",
    "will_while_sleeping": "last wills of sleeping devices, ignored",
    "stale_session": "messages of a device's earlier connection, ignored: normal after a "
                     "reconnect",
    "implicit_birth": "devices first heard by a heartbeat, their birth missed",
    "device_revived": "timed-out devices heard from again",
    "device_timeout": "devices silent past their heartbeat timeout, taken offline",
    "late_heartbeat": "heartbeats much later than their device's interval",
    "activity_history": "activity older than the device's last, kept as history only",
    "clock_skew_clamped": "activity stamped in the future, clamped to the hub's time",
    "ack_unknown_device": "acks from devices the hub does not know",
    "ack_future_version": "acks of a version the hub has not published",
    "too_many_devices": "devices refused beyond --max-devices-per-user",
}


def _counter_line(parts: dict[str, dict[str, int]]) -> str:
    def item(group: str, name: str, count: int) -> str:
        meaning = ENGINE_COUNTERS.get(name) if group == "engine" else None
        return f"{name}={count}" + (f" ({meaning})" if meaning else "")

    return " | ".join(
        f"{group}: " + ", ".join(item(group, k, v) for k, v in sorted(counts.items()))
        for group, counts in parts.items() if counts
    )


class CounterReport:
    """Logs what was dropped or refused, by reason, and what the engine counted (each with
    what it means): every ``interval`` if there is something new, and once more in total at
    stop. Each drop is also logged where it happens, but those lines are limited to one per
    reason per second; this line has the full counts."""

    def __init__(self, presence: Any, hub: Any) -> None:
        self.presence = presence
        self.hub = hub
        self._last: dict[str, dict[str, int]] = {}

    def totals(self) -> dict[str, dict[str, int]]:
        out = {
            "dropped": dict(self.presence.rejected),
            "engine": dict(self.presence.engine.counters),
        }
        broker = getattr(getattr(self.hub, "transport", None), "broker", None)
        refused = getattr(broker, "refused", None)
        if refused is not None:
            out["broker refused"] = dict(refused)
        return out

    def since_last(self) -> dict[str, dict[str, int]]:
        now = self.totals()
        delta = {
            group: {k: v - self._last.get(group, {}).get(k, 0) for k, v in counts.items()
                    if v - self._last.get(group, {}).get(k, 0)}
            for group, counts in now.items()
        }
        self._last = now
        return delta

    async def run(self, interval_ms: int) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000)
            line = _counter_line(self.since_last())
            if line:
                log.info("in the last %s: %s", format_duration_ms(interval_ms), line)

    def final(self) -> None:
        line = _counter_line(self.totals())
        if line:
            log.info("since start: %s", line)


async def run_hub(settings: dict[str, Any], ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly."""
    raise_open_file_limit()  # a socket per client: the default 1,024 would cap the broker
    from hub.auth import CredentialStore
    from hub.broker import BrokerError
    from hub.mqtt import broker_answers, parse_listen

    broker = settings["broker"]
    host, port = parse_listen(settings["listen"])
    accounts = len(CredentialStore(settings["credentials"])) if settings["credentials"] else 0
    if broker == "auto":
        if broker_answers(host, port):
            if accounts:
                # the accounts the user made would silently not apply: anyone could use that
                # broker, so do not pick it without being told to
                raise BrokerError(
                    f"{accounts} account(s) are configured ({settings['credentials']}), but "
                    f"--broker auto found a broker already listening on {host}:{port}, which "
                    "does not know them (anyone who reaches it can read and set presence). "
                    "Serve the accounts with the embedded broker on a free address "
                    "(--broker embedded --listen 127.0.0.1:PORT), or give that broker the same "
                    "rules ('presence-hub users export-mosquitto') and name it with "
                    f"--broker mqtt://USER:PASS@{host}:{port}")
            broker = f"mqtt://{host}:{port}"
            desc = f"using the broker already listening on {host}:{port}"
        else:
            broker = "embedded"
            desc = f"embedded broker on {host}:{port}"
    elif broker == "embedded":
        desc = f"embedded broker on {host}:{port}"
    else:
        from hub.protocol import redact_url as redact

        desc = f"external broker {redact(broker)}"
    log.info("broker: %s", desc)
    if broker != "embedded" and (settings["tls_cert"] or settings["allow_anonymous"]):
        log.warning("--tls-* and --allow-anonymous apply to the embedded broker only; the "
                    "external broker has its own (see 'presence-hub users export-mosquitto')")
    store = None
    if broker != "embedded" and accounts:
        log.warning("%d account(s) in %s apply to the embedded broker only: on %s the broker, "
                    "not the hub, decides who may read and publish. Give it the same rules "
                    "with 'presence-hub users export-mosquitto'.", accounts,
                    settings["credentials"], desc)
    if broker == "embedded":
        # Refuse an open broker on a public address before anything is opened or started.
        from hub.auth import AccessPolicy, listen_policy_error

        store = CredentialStore(settings["credentials"])
        policy = AccessPolicy(settings["prefix"], store, settings["allow_anonymous"])
        hosts = [host]
        if settings["tls_listen"]:
            hosts.append(parse_listen(settings["tls_listen"])[0])
        refusal = listen_policy_error(hosts, policy)
        if refusal is not None:
            raise BrokerError(refusal)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    lease = None
    if settings["storage"] == "redis":
        # several hubs may share the store: the lease says which one acts (hub/cli/failover.py)
        from hub.cli.failover import make_lease

        lease = make_lease(settings)
    try:
        while True:
            keeper = None
            if lease is not None:
                from hub.cli.failover import take_lease

                keeper = await take_lease(lease, settings, broker, stop)
                if keeper is None:  # stopped while standing by
                    return
            presence, hub = _build(settings, broker, store,
                                   lease.fence if lease is not None else None)
            if keeper is not None:
                presence.set_leadership(keeper)
            stepped_down = await _serve(settings, presence, hub, desc, broker, accounts, stop,
                                        ready, keeper, lease)
            if not stepped_down:
                if lease is not None:
                    await lease.release()  # a standby takes over at once, not after the TTL
                break
            if not settings["standby"]:
                raise PresenceError("another hub took the lease over: this hub stopped; start "
                                    "it with --standby to stand by instead")
            log.warning("this hub stands by again")
    finally:
        if lease is not None:
            await lease.close()
    log.info("stopped cleanly")


def _build(settings: dict[str, Any], broker: str, store: Any, fence: str | None) -> Any:
    """A presence service with its MQTT side, as configured."""
    from hub.app.factory import attach_broker, create_presence_service

    presence = create_presence_service(
        heartbeat_interval_ms=settings["heartbeat_interval"],
        away_after_ms=settings["away_after"],
        offline_after_ms=settings["offline_after"],
        storage=settings["storage"],
        db_path=settings["db"],
        redis_url=settings["redis_url"],
        prefix=settings["prefix"],
        flush_interval_ms=settings["flush_interval"],
        max_payload_bytes=settings["max_payload_bytes"],
        device_rate=settings["device_rate"],
        device_burst=settings["device_burst"],
        max_devices_per_user=settings["max_devices_per_user"],
        activity_limit=settings["activity_limit"],
        activity_max_age_ms=settings["activity_max_age"],
        max_custom_status=settings["max_custom_status"],
        will_grace_ms=settings["will_grace"],
        max_heartbeat_interval_ms=settings["max_heartbeat_interval"],
        fence=fence,
    )
    if broker == "embedded":
        hub = attach_broker(
            presence, "embedded", listen=settings["listen"],
            credentials=store, allow_anonymous=settings["allow_anonymous"],
            tls_listen=settings["tls_listen"], tls_cert=settings["tls_cert"],
            tls_key=settings["tls_key"], homeassistant=settings["homeassistant"],
        )
    else:
        hub = attach_broker(presence, broker, listen=settings["listen"],
                            homeassistant=settings["homeassistant"],
                            ca_file=settings["ca_file"], leased=fence is not None)
    return presence, hub


async def _serve(settings: dict[str, Any], presence: Any, hub: Any, desc: str, broker: str,
                 accounts: int, stop: asyncio.Event, ready: Callable[[str], None] | None,
                 keeper: Any, lease: Any) -> bool:
    """Run the hub until ``stop`` (then a clean stop: False) or until another hub took the
    lease over (True: stopped without the final flush and ``offline``)."""
    from hub.mqtt import EmbeddedTransport

    web = _attach_web(presence, hub, settings)
    report = CounterReport(presence, hub)
    async with presence:
        tune_gc()
        if keeper is not None:
            keeper.start()
        transport = hub.transport
        embedded = transport.broker if isinstance(transport, EmbeddedTransport) else None
        access = embedded.policy.describe() if embedded is not None else None
        tls_url = embedded.tls_url if embedded is not None else None
        if embedded is None and accounts:
            access = (f"enforced by the external broker, not the hub ({accounts} account(s) "
                      "here apply only once exported: presence-hub users export-mosquitto)")
        banner = _with_dashboard(_banner(settings, desc, broker, access, tls_url), web,
                                 settings)
        if lease is not None:
            from hub.cli.failover import lease_line

            first, _, rest = banner.partition("\n")
            banner = "\n".join([first, lease_line(lease), rest])
        print(banner, flush=True)
        if ready is not None:
            ready(banner)
        reporter = (asyncio.create_task(report.run(settings["stats_interval"]))
                    if settings["stats_interval"] > 0 else None)
        waits = [asyncio.ensure_future(stop.wait()),
                 asyncio.ensure_future(presence.stepped_down.wait())]
        if keeper is not None:
            waits.append(asyncio.ensure_future(keeper.lost.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            if reporter is not None:
                reporter.cancel()
            if keeper is not None:
                await keeper.stop()
        if keeper is not None and keeper.lost.is_set():
            presence.step_down("another hub took the lease over")
        if presence.fenced:
            log.warning("stopping without the final flush and 'offline': the active hub "
                        "owns the store and the retained state now")
        else:
            log.info("stopping: publishing hub offline and flushing state")
    report.final()
    return bool(presence.fenced)
