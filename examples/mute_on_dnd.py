"""React to presence changes from any MQTT client: mute notifications while a user is dnd.

    .venv/bin/python examples/mute_on_dnd.py --broker 127.0.0.1:1883 --user alice

(from the checkout, with the venv's Python or the venv activated). On a broker with accounts,
log in with a read-only account (``presence-hub users add-watcher ha``, then ``--username ha``
and the password in ``PRESENCE_BROKER_PASSWORD``) or with one of alice's devices.

It subscribes to the retained ``presence/users/alice/status`` topic (so it knows the current
status at once) and to ``presence/events/alice`` (to log transitions). Replace ``mute()`` with
your own action: a Home Assistant service call, ``notify-send``, a Do Not Disturb toggle.
Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.protocol import BrokerURL, InvalidURL


def mute(on: bool) -> None:
    print("notifications muted" if on else "notifications back on", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    env = os.environ.get
    parser.add_argument("--broker", default=env("PRESENCE_BROKER", "127.0.0.1:1883"),
                        help="HOST:PORT, mqtt://... or mqtts://... [PRESENCE_BROKER]")
    parser.add_argument("--username", default=env("PRESENCE_BROKER_USERNAME"),
                        help="a watcher account, or one of the user's devices"
                        " [PRESENCE_BROKER_USERNAME]")
    parser.add_argument("--password", default=env("PRESENCE_BROKER_PASSWORD"),
                        help="its password; the environment variable keeps it out of ps"
                        " [PRESENCE_BROKER_PASSWORD]")
    parser.add_argument("--ca-file", default=env("PRESENCE_CA_FILE"),
                        help="CA certificate for mqtts:// [PRESENCE_CA_FILE]")
    parser.add_argument("--user", required=True)
    parser.add_argument("--prefix", default="presence")
    args = parser.parse_args()
    try:
        broker = BrokerURL.parse(args.broker).with_login(args.username, args.password)
    except InvalidURL as exc:
        parser.error(str(exc))
    status_topic = f"{args.prefix}/users/{args.user}/status"
    events_topic = f"{args.prefix}/events/{args.user}"
    muted: bool | None = None

    def on_connect(client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:  # a wrong password, say: retrying will not help
            print(f"mute_on_dnd: {broker} refused the login: {reason}", file=sys.stderr)
            client.disconnect()
            return
        client.subscribe([(status_topic, 1), (events_topic, 1)])

    def on_message(_client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal muted
        if msg.topic == events_topic:
            event = json.loads(msg.payload)
            print(f"{event['event']}: {event['old']} -> {event['new']}", flush=True)
            return
        want = msg.payload == b"dnd"
        if want != muted:
            muted = want
            mute(want)

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(ca_certs=args.ca_file)
    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(broker.host, broker.port)
        client.loop_forever()
    except OSError as exc:
        print(f"mute_on_dnd: cannot connect to {broker}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: leave quietly
        client.disconnect()
        print("stopping", flush=True)
        return 0
    return 1  # the loop ends only when the login was refused


if __name__ == "__main__":
    sys.exit(main())
