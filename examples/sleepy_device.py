"""A battery device that sleeps and wakes in a loop, and tells the hub each time.

    .venv/bin/python examples/sleepy_device.py --broker 127.0.0.1:1883 --user alice \\
        --device badge --awake 20s --sleep 5m
    mosquitto_sub -t 'presence/devices/alice/badge/conn' -v     # birth, sleeping, birth, ...

(from the checkout, with the venv's Python or the venv activated; with accounts, log in as the
device: ``--username alice/badge`` and its password in ``PRESENCE_BROKER_PASSWORD``.)

Each cycle: connect with a new session (the birth announces ``heartbeatMs`` and, with an idle
source, ``idleMs``), stay awake for ``--awake`` (heartbeats), then announce the sleep
(``{"state":"sleeping","sleepMs":...}`` on ``conn``, retained), disconnect cleanly (so no last
will) and stay away for ``--sleep``. The hub shows the device as sleeping with its ``wakeAt``
and neither loses nor times it out until the sleep plus its heartbeat timeout have passed.

A real device would deep-sleep here instead of waiting in this process, or exit and let a
timer start ``presence-agent sleep --for 5m`` on its next wake. Ctrl-C stops: while awake with a
clean offline, while asleep leaving the sleep announced. ``--cycles N`` stops after N sleeps.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from device_agent import AgentConfig, AgentError, PresenceAgent
from hub.protocol import format_duration_ms, parse_duration_ms


def duration(text: str) -> int:
    try:
        return parse_duration_ms(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main() -> int:
    parser = argparse.ArgumentParser(description="A device that sleeps and wakes in a loop.")
    env = os.environ.get
    parser.add_argument("--broker", default=env("PRESENCE_BROKER", "127.0.0.1:1883"),
                        help="HOST:PORT, mqtt://... or mqtts://... [PRESENCE_BROKER]")
    parser.add_argument("--username", default=env("PRESENCE_BROKER_USERNAME"),
                        help="the device's account, USER/DEVICE [PRESENCE_BROKER_USERNAME]")
    parser.add_argument("--password", default=env("PRESENCE_BROKER_PASSWORD"),
                        help="its password; the environment variable keeps it out of ps"
                        " [PRESENCE_BROKER_PASSWORD]")
    parser.add_argument("--ca-file", default=env("PRESENCE_CA_FILE"),
                        help="CA certificate for mqtts:// [PRESENCE_CA_FILE]")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--device", default="badge")
    parser.add_argument("--prefix", default="presence")
    parser.add_argument("--awake", type=duration, default="20s", help="time awake per cycle")
    parser.add_argument("--sleep", type=duration, default="5m", help="time asleep per cycle")
    parser.add_argument("--heartbeat-interval", default="30s",
                        help="announced in the birth; the hub times out after 2.5 x this")
    parser.add_argument("--idle-source", default="none", help="none, command:CMD or file:PATH")
    parser.add_argument("--cycles", type=int, default=0, help="stop after N sleeps (0: never)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        config = AgentConfig.from_values(
            broker=args.broker, broker_username=args.username, broker_password=args.password,
            ca_file=args.ca_file,
            user=args.user, device=args.device, name=f"Sleepy {args.device}",
            prefix=args.prefix, heartbeat_interval=args.heartbeat_interval,
            idle_source=args.idle_source,
        )
        agent = PresenceAgent(config)
        agent.start()
    except AgentError as exc:
        print(f"sleepy_device: {exc}", file=sys.stderr)
        return 2
    slept = 0
    try:
        while not args.cycles or slept < args.cycles:
            while not agent.wait_connected(1.0):  # short waits: Ctrl-C is seen at once
                if agent.error is not None:
                    print(f"sleepy_device: {agent.error}", file=sys.stderr)
                    return 1
            print(f"awake as session {agent.session}", flush=True)
            time.sleep(args.awake / 1000)  # a real device does its work here
            announced = agent.sleep(args.sleep)
            slept += 1
            print(f"asleep for {format_duration_ms(args.sleep)}"
                  f"{'' if announced else ' (the broker did not confirm it)'}", flush=True)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        agent.close()  # awake: a clean offline; asleep: the announcement stands
    return 0


if __name__ == "__main__":
    sys.exit(main())
