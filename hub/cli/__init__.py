"""``presence-hub``: the hub's command line (settings, run, users)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hub.cli.run import run_hub
from hub.cli.settings import UsageError, build_parser, resolve
from hub.cli.users import users_main

log = logging.getLogger("presence-hub")

#: what the hub needs beyond a plain install (the agent's): the extra ``[hub]``
HUB_EXTRA = ("amqtt", "tinydb")


def _missing_hub_stack() -> str | None:
    """The first module of the hub's stack that is not installed, if any."""
    import importlib.util

    return next((m for m in HUB_EXTRA if importlib.util.find_spec(m) is None), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = _missing_hub_stack()
    if missing is not None:
        print(f"presence-hub: the hub's stack is not installed ({missing} is missing); a plain "
              "install is the device agent: pip install 'mqtt-presence-hub[hub]'",
              file=sys.stderr)
        return 1
    if argv[:1] == ["users"]:
        return users_main(argv[1:])
    if argv[:1] == ["status"]:
        from hub.cli.failover import status_main

        return status_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve(args, os.environ)
    except UsageError as exc:
        print(f"presence-hub: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings["log_level"],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings["log_level"] != "DEBUG":
        # amqtt and its state machine library log every connection at INFO: keep ours readable
        for noisy in ("transitions", "amqtt"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings["storage"] == "tinydb":
        Path(settings["db"]).parent.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(run_hub(settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for what the user can fix, never a traceback
        from hub.auth import CredentialsError
        from hub.broker import BrokerError
        from hub.core.errors import PresenceError
        from hub.stores import StoreError

        if isinstance(exc, BrokerError | PresenceError | StoreError | CredentialsError | OSError):
            print(f"presence-hub: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
