"""A device that heartbeats rarely (every 10 minutes, say) and is still never timed out.

    .venv/bin/python examples/long_interval_device.py --broker 127.0.0.1:1883 --user alice \\
        --device water-meter --heartbeat-interval 10m

(from the checkout, with the venv's Python or the venv activated; with accounts, log in as the
device: ``--username alice/water-meter`` and its password in ``PRESENCE_BROKER_PASSWORD``.)

It is ``presence-agent --heartbeat-interval 10m`` as a library. The birth announces the
interval (``"heartbeatMs": 600000``), so the hub times this device out after 2.5 x 10 min of
silence, not after 2.5 x the hub's own interval; the hub bounds it by its
``--max-heartbeat-interval``. A dead link is still noticed within 1.5 x the MQTT keepalive
(default 60 s): the broker then publishes the device's last will. Ctrl-C stops cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from device_agent import AgentConfig, AgentError, PresenceAgent


def main() -> int:
    parser = argparse.ArgumentParser(description="A device with a long heartbeat interval.")
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
    parser.add_argument("--device", default="water-meter")
    parser.add_argument("--prefix", default="presence")
    parser.add_argument("--heartbeat-interval", default="10m", help="e.g. 10m (at most 7d)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        config = AgentConfig.from_values(
            broker=args.broker, broker_username=args.username, broker_password=args.password,
            ca_file=args.ca_file,
            user=args.user, device=args.device, name=f"Meter {args.device}",
            prefix=args.prefix, heartbeat_interval=args.heartbeat_interval, idle_source="none",
        )
        agent = PresenceAgent(config)
        agent.start()
    except AgentError as exc:
        print(f"long_interval_device: {exc}", file=sys.stderr)
        return 2
    try:
        announced = False
        while agent.error is None:
            if agent.wait_connected(1.0) and not announced:  # short waits: Ctrl-C at once
                print(f"online as session {agent.session}, heartbeat every"
                      f" {config.heartbeat_interval_ms} ms (announced in the birth)", flush=True)
                announced = True
            time.sleep(0.2)
        print(f"long_interval_device: {agent.error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        agent.close()  # a clean offline
    return 0


if __name__ == "__main__":
    sys.exit(main())
