"""A simulated fleet: N devices spread over U users, each a real MQTT connection with its own
session, last will, heartbeats and now and then some activity.

    python examples/simulated_fleet.py --devices 50 --users 10 --broker 127.0.0.1:1883
    mosquitto_sub -t 'presence/users/+/status' -v      # watch the users come online

Ctrl-C kills every connection at once, without a clean stop, so the hub sees their last wills.
Each device is one paho client on its own network thread: fine for a few hundred devices. The
benchmarks (``python -m bench``) multiplex far more devices over a few connections.
"""

from __future__ import annotations

import argparse
import random
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.protocol import ActivityPayload, ConnPayload, HeartbeatPayload, Topics, new_session_id


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulate a fleet of presence devices.")
    parser.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument("--prefix", default="presence")
    args = parser.parse_args()
    host, _, port = args.broker.rpartition(":")
    topics = Topics(args.prefix)
    fleet: list[tuple[mqtt.Client, str, str, str]] = []
    for i in range(args.devices):
        user, device = f"user-{i % args.users}", f"device-{i}"
        session = new_session_id()
        conn = topics.device(user, device, "conn")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{user}-{device}")
        client.will_set(conn, ConnPayload(state="offline", session=session, reason="lost").to_json(),
                        qos=1, retain=True)
        client.connect(host or "127.0.0.1", int(port), keepalive=60)
        client.loop_start()
        birth = ConnPayload(state="online", session=session, name=f"Simulated {device}",
                            ts=int(time.time() * 1000))
        client.publish(conn, birth.to_json(), qos=1, retain=True)
        fleet.append((client, user, device, session))
    print(f"{len(fleet)} devices of {args.users} users online; Ctrl-C to kill them all")
    seq = 0
    try:
        while True:
            time.sleep(args.heartbeat)
            seq += 1
            now = int(time.time() * 1000)
            for client, user, device, session in fleet:
                idle = random.choice([None, 0, 30_000, 600_000])
                hb = HeartbeatPayload(session=session, seq=seq, ts=now, idle_ms=idle)
                client.publish(topics.device(user, device, "heartbeat"), hb.to_json(), qos=0)
                if random.random() < 0.05:
                    act = ActivityPayload(type="message", channel_id="sim-chat", timestamp=now)
                    client.publish(topics.device(user, device, "activity"), act.to_json(), qos=1)
    except KeyboardInterrupt:
        for client, *_ in fleet:
            sock = client.socket()
            if sock is not None:
                sock.close()  # no DISCONNECT: the broker sends each will
        print("killed; the hub takes each device offline by its will")


if __name__ == "__main__":
    main()
