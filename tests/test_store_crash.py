"""A hub killed (SIGKILL) while it writes its TinyDB file never loses the file.

A child process saves ever-growing batches of users into one TinyDB file, and we kill it in the
middle of a flush, several times, continuing on the same file each time. After every kill the
file must open (never torn, never empty) and hold exactly the state of one complete batch: the
last one the child reported done, or the one it was writing if its rename got through.

Two kinds of kill: at a random moment during a flush (the delay drawn from how long flushes
took in that round), and deterministic ones where the child parks itself inside the write, after
the temporary file is written but before its fsync, or before the rename, so we know for sure
that a kill mid-write is covered. The random seed is printed in every failure message.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub.core.models import UserRecord
from hub.stores.tinydb import TinyDBStore

BASE_USERS = 400
USERS_PER_VERSION = 25
LINE_TIMEOUT = 30.0

CHILD = r"""
import asyncio, os, sys
from hub.core.models import DeviceRecord, UserRecord
from hub.stores.tinydb import TinyDBStore

path, mode, block_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
base, step = int(sys.argv[4]), int(sys.argv[5])
flushes_here = 0


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if mode != "random":
    # Park inside the write so the parent kills us at a known point of it.
    hook = mode.removeprefix("block-")
    real = getattr(os, hook)

    def parked(*args, **kwargs):
        if flushes_here >= block_after:
            say("parked in " + hook)
            sys.stdin.readline()  # the parent never answers; it kills us here
        return real(*args, **kwargs)

    setattr(os, hook, parked)


def batch(version):
    # The whole state of a version: the user count grows with it and the second device changes.
    return [
        UserRecord(
            id=f"u{k:05d}", name=f"user {k}", version=version, last_seen=version,
            devices=[
                DeviceRecord(id="phone", name="Phone", last_seen=version),
                DeviceRecord(id=f"d{version % 3}", name="Other", acked_version=version),
            ],
        )
        for k in range(base + step * version)
    ]


async def main():
    global flushes_here
    store = TinyDBStore(path)
    await store.open()
    users = await store.load_users()
    version = max((u.version for u in users), default=0) + 1
    say(f"opened {version - 1}")
    while True:
        say(f"begin {version}")
        await store.save_users(batch(version))
        flushes_here += 1
        say(f"done {version}")
        version += 1


asyncio.run(main())
"""


@dataclass
class Child:
    """The child process and its stdout lines, read by a thread so waits can have deadlines."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    stderr_path: Path
    context: str
    ended: bool = False

    @classmethod
    def start(cls, db: Path, mode: str, block_after: int, tmp_path: Path, context: str) -> Child:
        stderr_path = tmp_path / f"child-{time.monotonic_ns()}.err"
        with stderr_path.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(db), mode, str(block_after),
                 str(BASE_USERS), str(USERS_PER_VERSION)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.strip())
            lines.put(None)  # end of output: the child exited

        threading.Thread(target=pump, daemon=True).start()
        return cls(proc, lines, stderr_path, context)

    def next_line(self) -> str:
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(
                f"{self.context}: child said nothing for {LINE_TIMEOUT:.0f}s"
            ) from None
        if line is None:
            self.ended = True
            code = self.proc.wait()
            raise AssertionError(
                f"{self.context}: child exited with {code}; stderr:\n"
                f"{self.stderr_path.read_text()[-3000:]}"
            )
        return line

    def kill(self) -> list[str]:
        """SIGKILL, then every line the child wrote that we had not read yet.

        Those matter: on a busy machine the child can be several flushes ahead of our reading.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        rest: list[str] = []
        while not self.ended:
            line = self.lines.get(timeout=LINE_TIMEOUT)  # EOF comes right after the kill
            if line is None:
                self.ended = True
            else:
                rest.append(line)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return rest


def _versions(users: list[UserRecord]) -> set[int]:
    return {u.version for u in users}


def _load(db: Path) -> list[UserRecord]:
    async def load() -> list[UserRecord]:
        store = TinyDBStore(db)
        await store.open()
        try:
            return await store.load_users()
        finally:
            await store.close()

    return asyncio.run(load())


def _check_complete_batch(users: list[UserRecord], allowed: set[int], context: str) -> int:
    """The file holds exactly one complete batch whose version is in ``allowed``."""
    versions = _versions(users)
    counts = {v: sum(1 for u in users if u.version == v) for v in versions}
    assert len(versions) == 1, f"{context}: users from several batches (version: count) {counts}"
    [version] = versions
    assert version in allowed, f"{context}: loaded version {version}, expected one of {allowed}"
    assert len(users) == BASE_USERS + USERS_PER_VERSION * version, f"{context}: torn user list"
    for u in users:
        assert [d.id for d in u.devices] == ["phone", f"d{version % 3}"], f"{context}: {u.id}"
    return version


@pytest.mark.slow
def test_sigkill_during_flushes_always_leaves_a_complete_database(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_TEST_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    db = tmp_path / "data" / "presence.json"
    modes = ["random", "block-fsync", "random", "block-replace", "random", "random"]
    version = 0
    for round_no, mode in enumerate(modes):
        context = f"round {round_no} ({mode}, seed {seed})"
        min_flushes = 3 + rng.randrange(3)
        child = Child.start(db, mode, min_flushes, tmp_path, context)
        try:
            opened = child.next_line()
            assert opened == f"opened {version}", f"{context}: {opened!r}"
            last_done = version
            durations: list[float] = []
            while True:
                line = child.next_line()
                if line.startswith("parked in "):
                    break  # inside the write of batch last_done + 1: kill it right there
                kind, number = line.split()
                if kind == "begin":
                    began = time.monotonic()
                    if mode == "random" and len(durations) >= min_flushes:
                        # Somewhere inside this flush (or just after it): never a fixed moment.
                        time.sleep(rng.uniform(0, 1.2 * max(durations)))
                        break
                else:
                    durations.append(time.monotonic() - began)
                    last_done = int(number)
        finally:
            unread = child.kill()
        for line in unread:
            kind, _, number = line.partition(" ")
            if kind == "done":
                last_done = int(number)

        if mode != "random":
            leftovers = list(db.parent.glob(f".{db.name}.*.tmp"))
            assert leftovers, f"{context}: the kill was meant to land mid-write"
            allowed = {last_done}
        else:
            allowed = {last_done, last_done + 1}
        assert last_done >= version + min_flushes, f"{context}: too few flushes before the kill"
        version = _check_complete_batch(_load(db), allowed, context)

    # The reopen after the last kill also cleared what the interrupted writes left behind.
    assert not list(db.parent.glob(f".{db.name}.*.tmp"))
