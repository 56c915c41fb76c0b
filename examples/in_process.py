"""The presence service in-process, with no broker at all (README, "A tour"): a chat bot's
view of it. Run it from the checkout with the venv's Python (or with the venv activated):

    .venv/bin/python examples/in_process.py

It records a message, sets a custom status, and asks who is online, through the API and
through the chat commands. Give ``create_presence_service`` ``broker="embedded"`` or
``broker="mqtt://host:1883"`` and the same object is the hub. README shows the code below
this docstring, and tests/test_examples.py runs it and keeps the two the same.
"""

import asyncio

from hub import create_presence_service, handle_command


async def main() -> None:
    presence = create_presence_service(away_after_ms=300_000, storage="memory")
    presence.on("statusChange", lambda user_id, old, new: print(user_id, old, "->", new))
    async with presence:
        await presence.record_activity("user-1", {"type": "message", "channel_id": "telegram-123"})
        await presence.set_custom_status("user-1", "Trading BTC")
        for user in await presence.get_online_users(channel_id="telegram-123"):
            print(user.user_id, user.status, user.custom_status)
        print(await handle_command(presence, "user-1", "/presence who"))


asyncio.run(main())
