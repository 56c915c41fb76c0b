"""What an idle connection costs the embedded broker (issue 16, item 4).

amqtt kept seven tasks, four ``asyncio.Queue`` and two ``Event`` per connection: ~44 KB per
idle device, measured. These tests count the objects that made it so, for connections that
do what the agent does (a will, two subscriptions, a retained birth, heartbeats), so a change
that brings one back per connection fails here rather than only in the benchmark
(``python -m bench --only embedded`` has the bytes).
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator

import pytest

from hub.broker import EmbeddedBroker
from tests.support.wait import async_wait_for
from tests.test_embedded_faults import (
    DISCONNECT,
    RawClient,
    connect_packet,
    publish_packet,
    read_exactly,
    subscribe_packet,
)

DEVICES = 20


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker("127.0.0.1", 0, on_message=lambda *_: None) as running:
        yield running


def _agent(port: int, n: int) -> socket.socket:
    """An agent-like connection that has done its start-up and is now idle."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    base = f"presence/devices/u{n}/d{n}/".encode()
    sock.sendall(connect_packet(f"agent-{n}".encode(), will=(base + b"conn", b"lost")))
    assert read_exactly(sock, 4) == b"\x20\x02\x00\x00"
    sock.sendall(subscribe_packet(f"presence/users/u{n}/+".encode(), 1, packet_id=1))
    assert read_exactly(sock, 5) == b"\x90\x03\x00\x01\x01"
    sock.sendall(subscribe_packet(f"presence/replies/u{n}/d{n}".encode(), 1, packet_id=2))
    assert read_exactly(sock, 5) == b"\x90\x03\x00\x02\x01"
    sock.sendall(publish_packet(base + b"conn", b'{"state":"online"}', qos=1, packet_id=3,
                                retain=True))
    assert read_exactly(sock, 4) == b"\x40\x02\x00\x03"
    sock.sendall(publish_packet(base + b"heartbeat", b'{"seq":1}'))
    sock.sendall(b"\xc0\x00")  # PINGREQ: its answer proves the heartbeat before it was read
    assert read_exactly(sock, 2) == b"\xd0\x00"
    return sock


def _count(kind: type) -> int:
    """Live objects of ``kind``: garbage of earlier tests in this process is collected first,
    or a collection between two counts changes them (11 events before, 8 after, in one run)."""
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


async def test_an_idle_connection_costs_no_task_and_no_queue(broker: EmbeddedBroker) -> None:
    tasks_before = len(asyncio.all_tasks())
    queues_before = _count(asyncio.Queue)
    events_before = _count(asyncio.Event)

    socks = [await asyncio.to_thread(_agent, broker.port, n) for n in range(DEVICES)]
    assert sorted(broker.connected_clients()) == sorted(f"agent-{n}" for n in range(DEVICES))
    # amqtt: a reader task, a wait_for task per read, four waiter tasks and the connection's
    # own task; here a task runs only while a connection has packets to handle
    await async_wait_for(lambda: len(asyncio.all_tasks()) == tasks_before,
                         what="no task for an idle connection")
    # amqtt: two queues on the handler and two on the session, an Event in each, and two more
    assert _count(asyncio.Queue) == queues_before
    assert _count(asyncio.Event) == events_before

    for sock in socks:
        sock.sendall(DISCONNECT)
        sock.close()
    await async_wait_for(lambda: not broker.connected_clients(), what="every client gone")
    await async_wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before,
                         what="no task left behind by the connections")


async def test_a_burst_beyond_what_the_broker_buffers_arrives_whole_and_in_order(
    broker: EmbeddedBroker,
) -> None:
    # A client's packets are read into a queue handled by one task; past 1,000 packets (or
    # 256 KB) queued the connection stops reading until most are handled. 3,000 PUBLISHes in
    # one write make it stop and go on: every one must arrive, in the order sent.
    watcher = await RawClient.connect(broker.port, b"watcher")
    await watcher.subscribe(b"burst/#", qos=0)
    count = 3000
    burst = b"".join(publish_packet(b"burst/x", str(n).encode()) for n in range(count))

    def send() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", broker.port))
        sock.settimeout(5)
        sock.sendall(connect_packet(b"burster"))
        assert read_exactly(sock, 4) == b"\x20\x02\x00\x00"
        sock.sendall(burst + b"\xc0\x00")  # then PINGREQ: answered after the burst
        assert read_exactly(sock, 2) == b"\xd0\x00"
        return sock

    sock = await asyncio.to_thread(send)
    await async_wait_for(lambda: len(watcher.got("burst/x")) == count, what="the whole burst")
    assert watcher.got("burst/x") == [str(n).encode() for n in range(count)]
    sock.close()
    await watcher.close()
