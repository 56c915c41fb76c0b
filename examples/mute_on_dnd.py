"""React to presence changes from any MQTT client: mute notifications while a user is dnd.

    python examples/mute_on_dnd.py --broker 127.0.0.1:1883 --user alice

It subscribes to the retained ``presence/users/alice/status`` topic (so it knows the current
status at once) and to ``presence/events/alice`` (to log transitions). Replace ``mute()`` with
your own action: a Home Assistant service call, ``notify-send``, a Do Not Disturb toggle.
"""

from __future__ import annotations

import argparse
import json

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def mute(on: bool) -> None:
    print("notifications muted" if on else "notifications back on", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT")
    parser.add_argument("--user", required=True)
    parser.add_argument("--prefix", default="presence")
    args = parser.parse_args()
    host, _, port = args.broker.rpartition(":")
    status_topic = f"{args.prefix}/users/{args.user}/status"
    events_topic = f"{args.prefix}/events/{args.user}"
    muted: bool | None = None

    def on_connect(client: mqtt.Client, *_: object) -> None:
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
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host or "127.0.0.1", int(port))
    client.loop_forever()


if __name__ == "__main__":
    main()
