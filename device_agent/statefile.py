"""A small JSON file with the user's presence state, for programs that do not speak MQTT.

A status bar, a shell prompt or a door sign reads one file instead of subscribing to a broker.
It holds the hub's last ``P/users/{user}/state`` (wire field names, so ``jq .status`` works)
plus an ``agent`` object saying whether this device is connected right now::

    {"userId": "alice", "status": "online", "customStatus": null, "activeDevice": "laptop",
     "version": 7, "devices": [...], "lastSeen": 1700000000000, "name": "Alice",
     "agent": {"user": "alice", "device": "laptop", "connected": true,
               "session": "3f2a...", "updatedAt": 1700000000123}}

Before the first state arrives only ``agent`` is present. The file is replaced atomically
(write a temporary file beside it, then ``os.replace``), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from hub.protocol import UserStatePayload


class StateFile:
    """Keeps the latest state and connection facts and rewrites the file when they change."""

    def __init__(self, path: Path, user: str, device: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._agent: dict[str, Any] = {
            "user": user,
            "device": device,
            "connected": False,
            "session": None,
            "updatedAt": None,
        }

    def set_state(self, state: UserStatePayload, now_ms: int) -> None:
        with self._lock:
            self._state = json.loads(state.to_json())
            self._agent["updatedAt"] = now_ms
            self._write()

    def set_connection(self, connected: bool, session: str | None, now_ms: int) -> None:
        with self._lock:
            self._agent.update(connected=connected, session=session, updatedAt=now_ms)
            self._write()

    def _write(self) -> None:
        document = {**self._state, "agent": dict(self._agent)}
        data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_state_file(path: Path) -> dict[str, Any]:
    """What another program would read (used by tests and ``presence-agent status``)."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data
