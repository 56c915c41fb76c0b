"""A chat bot that answers /presence commands, with the presence service embedded in-process.

Run it from the checkout (with the venv's Python, or the venv activated) and type lines as if
they came from a chat (``alice: /presence dnd``); Ctrl-D or Ctrl-C ends it:

    .venv/bin/python examples/chat_bot.py

A real bot (Telegram, Slack, Matrix, ...) does the same in its message handler: record the
message as activity on its channel, and hand any ``/presence`` text to ``handle_command``.
Pass ``broker="mqtt://127.0.0.1:1883"`` to ``create_presence_service`` to make the bot the hub
too, so device agents and MQTT dashboards share the same presence (on a broker with accounts,
with the hub's login: ``mqtt://presence-hub:PASSWORD@host:1883``); it then takes the place of
``presence-hub``, as one hub is active per broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator

from hub import create_presence_service, handle_command


async def on_chat_message(presence, channel_id: str, user_id: str, text: str) -> str | None:
    """What a bot does with every message it sees; returns the reply, if any."""
    await presence.record_activity(user_id, {"type": "message", "channel_id": channel_id})
    if text.startswith("/presence"):
        return await handle_command(presence, user_id, text)
    return None


async def console_lines() -> AsyncIterator[str]:
    """Lines typed on stdin, read by a daemon thread: a read blocked on the terminal must not
    keep the process alive after Ctrl-C (an executor's thread would, until Enter)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")  # end of input

    threading.Thread(target=read, name="console", daemon=True).start()
    while line := await lines.get():
        yield line


async def main() -> None:
    presence = create_presence_service(storage="memory")
    presence.on("statusChange", lambda user, old, new: print(f"  [{user}: {old} -> {new}]"))
    async with presence:
        print("type 'user: message' lines, e.g.  alice: /presence who   (Ctrl-D to quit)",
              flush=True)
        async for line in console_lines():
            user, sep, text = line.strip().partition(":")
            if not sep:
                continue
            reply = await on_chat_message(presence, "console-1", user.strip(), text.strip())
            if reply:
                print(reply, flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: leave quietly, as Ctrl-D does
        asyncio.run(main())
