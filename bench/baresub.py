"""The baseline: a bare paho subscriber that only counts, in its own process like the hub.

``python -m bench.baresub --port P [--prefix presence]`` subscribes to every device topic at
QoS 1 (as the hub does), counts messages, and echoes each marker ``set`` (see bench.fleet) to
``bench/echo/<user>`` so the benchmark times it exactly as it times the hub. It prints ``READY``
once subscribed and its count on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baresub", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="presence")
    args = parser.parse_args(argv)
    count = 0
    stop = threading.Event()
    device_prefix = f"{args.prefix}/devices/"

    def on_connect(client: paho.Client, *_: Any) -> None:
        client.subscribe(f"{device_prefix}+/+/+", qos=1)

    def on_subscribe(*_: Any) -> None:
        print("READY", flush=True)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        nonlocal count
        count += 1
        topic = msg.topic
        if topic.endswith("/set"):
            user = topic[len(device_prefix):].split("/", 1)[0]
            text = msg.payload.split(b'"customStatus":"', 1)[-1].split(b'"', 1)[0]
            client.publish(f"bench/echo/{user}", text, qos=1)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-baresub", clean_session=True)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=600)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    print(f"COUNT {count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
