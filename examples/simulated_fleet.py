"""A simulated fleet: N devices spread over U users, each a real MQTT connection with its own
session, last will, heartbeats and now and then some activity.

    .venv/bin/python examples/simulated_fleet.py --devices 50 --users 10 --broker 127.0.0.1:1883
    mosquitto_sub -t 'presence/users/+/status' -v      # watch the users come online

(from the checkout, with the venv's Python or the venv activated). It plays many devices of
many users from one login, which no device account may do: on a broker with accounts, give it
the hub's (``--username presence-hub``, the password in ``PRESENCE_BROKER_PASSWORD``), or run
it against a hub without accounts.

Ctrl-C kills every connection at once, without a clean stop, so the hub sees their last wills.
Each device is one paho client on its own network thread: fine for a few hundred devices. The
benchmarks (``python -m bench``) multiplex far more devices over a few connections.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.protocol import (
    ActivityPayload,
    BrokerURL,
    ConnPayload,
    HeartbeatPayload,
    InvalidURL,
    Topics,
    new_session_id,
)


def main() -> int:
    parser = argparse.ArgumentParser(description="Simulate a fleet of presence devices.")
    env = os.environ.get
    parser.add_argument("--broker", default=env("PRESENCE_BROKER", "127.0.0.1:1883"),
                        help="HOST:PORT, mqtt://... or mqtts://... [PRESENCE_BROKER]")
    parser.add_argument("--username", default=env("PRESENCE_BROKER_USERNAME"),
                        help="with accounts: the hub's, the only one that may speak for every"
                        " device [PRESENCE_BROKER_USERNAME]")
    parser.add_argument("--password", default=env("PRESENCE_BROKER_PASSWORD"),
                        help="its password; the environment variable keeps it out of ps"
                        " [PRESENCE_BROKER_PASSWORD]")
    parser.add_argument("--ca-file", default=env("PRESENCE_CA_FILE"),
                        help="CA certificate for mqtts:// [PRESENCE_CA_FILE]")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument("--prefix", default="presence")
    args = parser.parse_args()
    try:
        broker = BrokerURL.parse(args.broker).with_login(args.username, args.password)
    except InvalidURL as exc:
        parser.error(str(exc))
    topics = Topics(args.prefix)
    fleet: list[tuple[mqtt.Client, str, str, str]] = []
    seq = 0
    try:
        for i in range(args.devices):
            user, device = f"user-{i % args.users}", f"device-{i}"
            session = new_session_id()
            conn = topics.device(user, device, "conn")
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{user}-{device}")
            if broker.username is not None:
                client.username_pw_set(broker.username, broker.password)
            if broker.tls:
                client.tls_set(ca_certs=args.ca_file)
            client.will_set(conn, ConnPayload(state="offline", session=session,
                                              reason="lost").to_json(), qos=1, retain=True)
            client.connect(broker.host, broker.port, keepalive=60)
            client.loop_start()
            birth = ConnPayload(state="online", session=session, name=f"Simulated {device}",
                                ts=int(time.time() * 1000))
            client.publish(conn, birth.to_json(), qos=1, retain=True)
            fleet.append((client, user, device, session))
        print(f"{len(fleet)} devices of {args.users} users online; Ctrl-C to kill them all",
              flush=True)
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
    except OSError as exc:
        print(f"simulated_fleet: cannot connect to {broker}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        for client, *_ in fleet:
            sock = client.socket()
            if sock is not None:
                sock.close()  # no DISCONNECT: the broker sends each will
        print("killed; the hub takes each device offline by its will", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
