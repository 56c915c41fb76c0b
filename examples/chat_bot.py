"""A chat bot that answers /presence commands, with the presence service embedded in-process.

Run it and type lines as if they came from a chat (``alice: /presence dnd``):

    python examples/chat_bot.py

A real bot (Telegram, Slack, Matrix, ...) does the same in its message handler: record the
message as activity on its channel, and hand any ``/presence`` text to ``handle_command``.
Pass ``broker="mqtt://127.0.0.1:1883"`` to ``create_presence_service`` to make the bot the hub
too, so device agents and MQTT dashboards share the same presence.
"""

from __future__ import annotations

import asyncio
import sys

from hub import create_presence_service, handle_command


async def on_chat_message(presence, channel_id: str, user_id: str, text: str) -> str | None:
    """What a bot does with every message it sees; returns the reply, if any."""
    await presence.record_activity(user_id, {"type": "message", "channel_id": channel_id})
    if text.startswith("/presence"):
        return await handle_command(presence, user_id, text)
    return None


async def main() -> None:
    presence = create_presence_service(storage="memory")
    presence.on("statusChange", lambda user, old, new: print(f"  [{user}: {old} -> {new}]"))
    async with presence:
        print("type 'user: message' lines, e.g.  alice: /presence who   (Ctrl-D to quit)")
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            user, sep, text = line.strip().partition(":")
            if not sep:
                continue
            reply = await on_chat_message(presence, "console-1", user.strip(), text.strip())
            if reply:
                print(reply)


if __name__ == "__main__":
    asyncio.run(main())
