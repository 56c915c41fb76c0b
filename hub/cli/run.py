"""``presence-hub`` (run): the hub on an edge box until SIGINT/SIGTERM, then a clean stop.

With no flags it uses an MQTT broker already listening on 127.0.0.1:1883, or starts the
embedded one there, and keeps state in a TinyDB file; on SIGINT/SIGTERM it stops cleanly
(``offline`` on ``P/hub/status``, state flushed).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from hub.process import tune_gc
from hub.protocol import format_duration_ms

log = logging.getLogger("presence-hub")

def _banner(settings: dict[str, Any], broker_desc: str, broker: str,
            access: str | None = None, tls_url: str | None = None) -> str:
    host, _, port = settings["listen"].rpartition(":")
    if broker != "embedded":
        from hub.protocol import BrokerURL

        parsed = BrokerURL.parse(broker)
        host, port = parsed.host, str(parsed.port)
    if host.strip("[]") in ("0.0.0.0", "::", ""):  # listening everywhere: name this machine
        import socket

        host = socket.gethostname()
    prefix = settings["prefix"]
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
    if access is not None and access.startswith(("authentication on", "enforced by the external")):
        login = "PRESENCE_BROKER_USERNAME=alice/laptop PRESENCE_BROKER_PASSWORD=..."
        lines += [
            f"  watch:        mosquitto_sub -h {host} -p {port} -u WATCHER -P PASSWORD "
            f"-t '{prefix}/users/#' -v   (presence-hub users add-watcher WATCHER)",
            "  join device:  presence-hub users add alice laptop   (prints the password), then",
            f"                {login} presence-agent --broker {url} --user alice --device laptop",
            f"  ask the hub:  {login} presence --broker {url} --user alice who",
        ]
    else:
        lines += [
            f"  watch:        mosquitto_sub -h {host} -p {port} -t '{prefix}/#' -v",
            f"  join device:  presence-agent --broker {url} --user alice --device laptop",
            f"  ask the hub:  presence --broker {url} --user alice who",
        ]
    lines.append("  stop:         Ctrl-C")
    return "\n".join(lines)


def _counter_line(parts: dict[str, dict[str, int]]) -> str:
    return " | ".join(
        f"{group}: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        for group, counts in parts.items() if counts
    )


class CounterReport:
    """Logs what was dropped or refused, by reason: every ``interval`` if there is something
    new, and once more in total at stop. Each drop is also logged where it happens, but those
    lines are limited to one per reason per second; this line has the full counts."""

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
    from hub.app.factory import attach_broker, create_presence_service
    from hub.auth import CredentialStore
    from hub.broker import BrokerError
    from hub.mqtt import EmbeddedTransport, broker_answers, parse_listen

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
    )
    if broker == "embedded":
        hub = attach_broker(
            presence, "embedded", listen=settings["listen"],
            credentials=store, allow_anonymous=settings["allow_anonymous"],
            tls_listen=settings["tls_listen"], tls_cert=settings["tls_cert"],
            tls_key=settings["tls_key"],
        )
    else:
        hub = attach_broker(presence, broker, listen=settings["listen"],
                            ca_file=settings["ca_file"])
    report = CounterReport(presence, hub)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with presence:
        tune_gc()
        transport = hub.transport
        embedded = transport.broker if isinstance(transport, EmbeddedTransport) else None
        access = embedded.policy.describe() if embedded is not None else None
        tls_url = embedded.tls_url if embedded is not None else None
        if embedded is None and accounts:
            access = (f"enforced by the external broker, not the hub ({accounts} account(s) "
                      "here apply only once exported: presence-hub users export-mosquitto)")
        banner = _banner(settings, desc, broker, access, tls_url)
        print(banner, flush=True)
        if ready is not None:
            ready(banner)
        reporter = (asyncio.create_task(report.run(settings["stats_interval"]))
                    if settings["stats_interval"] > 0 else None)
        try:
            await stop.wait()
        finally:
            if reporter is not None:
                reporter.cancel()
        log.info("stopping: publishing hub offline and flushing state")
    report.final()
    log.info("stopped cleanly")
