"""A set of ids that also keeps them in sorted order, for paging by id without a sort per page.

Why: ``/presence who --after USER`` asks for the next page of present users by user id. With
100k present users, finding the page in an unsorted set took 120 ms a page (one pass over all
of them) and sorting them all once took 40-80 ms, both with the event loop held. Kept sorted,
a page is a binary search and a slice.

How: the ids live in a plain ``set`` (membership, iteration, ``len``) and, once
:meth:`SortedIdSet.build_step` has indexed them, also in a list of sorted buckets of at most
``2 * BUCKET`` ids each, with every bucket's last id in ``_maxes``. An insert or a removal is
a binary search over the buckets' last ids and one over the bucket, then a ``list.insert`` or
``del`` in a bucket of about a thousand ids (a short memmove), about 1-3 us at 1M ids. Until
a build begins it costs nothing over the plain set, so a hub nobody asks for pages never pays.

Building is incremental, each step bounded (a few ms): a snapshot of the ids is cut into runs
of ``RUN`` ids, each sorted in one step; runs are merged two at a time while the pair holds at
most ``MERGE`` ids (``list.sort`` of two concatenated sorted runs is a linear merge in C), and
the runs left are merged ``STEP`` ids a step (``heapq.merge``); then the result is cut into
buckets. Changes made meanwhile are journalled and replayed onto the buckets, ``STEP`` a step,
so the set stays exact throughout and a caller can spread a build over many turns of an event
loop (measured on a quiet day: 100k ids in 43 ms over 51 steps of at most 4 ms; on a slower
one, 100k ids in 190 ms over 63 steps of at most 12 ms, and 1M in 2.7 s over 586 steps; the
longest is the snapshot, 100 ms at 1M ids). ``MERGE`` was 131,072: a pair merged in one step
then took 30 ms at 100k ids; cutting into buckets is done ``STEP`` ids a step for the same
reason.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, MutableSet

#: ids per bucket after a split: small enough that an insert's memmove is short, large enough
#: that the list of buckets stays short (1,000 buckets for 1M ids)
BUCKET = 512
#: ids sorted in one build step, and the most ids two runs merged in one step may hold
RUN = 4096
MERGE = 32_768
#: ids taken a step from the last merge, and changes replayed a step
STEP = 16_384


class SortedIdSet(MutableSet[str]):
    """A ``set[str]`` that can also page its members in sorted order (:meth:`after`)."""

    __slots__ = ("_buckets", "_built", "_cut", "_journal", "_maxes", "_members", "_merged",
                 "_merger", "_replayed", "_runs", "_unsorted")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._members: set[str] = set(ids)
        self._buckets: list[list[str]] = []
        self._maxes: list[str] = []
        #: while a build runs: the snapshot's ids not sorted yet, the sorted runs (merged two
        #: at a time), and the changes since the snapshot as (added?, id) in order
        self._unsorted: list[str] | None = None
        self._runs: list[list[str]] = []
        self._journal: list[tuple[bool, str]] = []
        self._merger: Iterator[str] | None = None
        self._merged: list[str] | None = None
        self._replayed = 0
        #: how far the merged ids are cut into buckets
        self._cut = 0
        self._built = False

    @classmethod
    def over(cls, members: set[str]) -> SortedIdSet:
        """One that takes ``members`` over as its own (no copy: the caller drops it)."""
        s = cls()
        s._members = members
        return s

    # ------------------------------------------------------------------ the set

    def __contains__(self, x: object) -> bool:
        return x in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def add(self, value: str) -> None:
        if value in self._members:
            return
        self._members.add(value)
        if self._built:
            self._insert(value)
        elif self._unsorted is not None:
            self._journal.append((True, value))

    def discard(self, value: str) -> None:
        if value not in self._members:
            return
        self._members.remove(value)
        if self._built:
            self._remove(value)
        elif self._unsorted is not None:
            self._journal.append((False, value))

    # ------------------------------------------------------------------ the order

    @property
    def built(self) -> bool:
        """Whether :meth:`after` may be used (every member is in the buckets)."""
        return self._built

    def build_step(self) -> bool:
        """One bounded step of building the order; True once :meth:`after` may be used."""
        if self._built:
            return True
        unsorted = self._unsorted
        if unsorted is None:  # begin: a snapshot (a C-level copy: ~3 ms at 100k ids)
            self._unsorted = list(self._members)
        elif unsorted:  # sort the next run
            run = unsorted[-RUN:]
            del unsorted[-RUN:]
            run.sort()
            self._runs.append(run)
        elif self._merged is None:
            self._merge_step()
        elif self._merger is not None:  # the last merge, STEP ids at a time
            taken = len(self._merged)
            self._merged.extend(itertools.islice(self._merger, STEP))
            if len(self._merged) - taken < STEP:
                self._merger = None
        elif self._cut < len(self._merged):  # cut into buckets, STEP ids a step
            merged = self._merged
            end = min(len(merged), self._cut + STEP)
            for i in range(self._cut, end, BUCKET):
                bucket = merged[i:min(i + BUCKET, end)]
                self._buckets.append(bucket)
                self._maxes.append(bucket[-1])
            self._cut = end
        else:  # replay what changed while it was built, in order
            journal = self._journal
            end = min(len(journal), self._replayed + STEP)
            for added, x in journal[self._replayed:end]:
                if added:
                    self._insert(x)
                else:
                    self._remove(x)
            self._replayed = end
            if end == len(journal):
                self._journal = []
                self._merged = None
                self._cut = 0
                self._unsorted = None
                self._replayed = 0
                self._built = True
        return self._built

    def _merge_step(self) -> None:
        """Merge the two shortest runs when they are short; else begin the last merge."""
        runs = self._runs
        runs.sort(key=len, reverse=True)
        if len(runs) > 1 and len(runs[-1]) + len(runs[-2]) <= MERGE:
            b = runs.pop()
            a = runs.pop()
            a += b
            a.sort()  # two sorted runs: a linear merge
            runs.append(a)
        elif len(runs) <= 1:
            self._merged = runs.pop() if runs else []
        else:
            self._merger = heapq.merge(*runs)
            self._merged = []
            self._runs = []

    def after(self, after: str | None) -> Iterator[str]:
        """Members in sorted order, from the first one above ``after`` (all with None).

        The caller must not change the set while it iterates (a page is taken in one go)."""
        assert self._built, "build the order first (build_step)"
        buckets = self._buckets
        if after is None:
            k, i = 0, 0
        else:
            k = bisect_right(self._maxes, after)
            if k == len(buckets):
                return
            i = bisect_right(buckets[k], after)
        for b in buckets[k:]:
            yield from b[i:] if i else b
            i = 0

    def _insert(self, x: str) -> None:
        maxes = self._maxes
        buckets = self._buckets
        if not maxes:
            buckets.append([x])
            maxes.append(x)
            return
        k = bisect_left(maxes, x)
        if k == len(maxes):  # above every id: the end of the last bucket
            k -= 1
            b = buckets[k]
            b.append(x)
            maxes[k] = x
        else:
            b = buckets[k]
            i = bisect_left(b, x)
            if i < len(b) and b[i] == x:  # there already
                return
            b.insert(i, x)
        if len(b) > 2 * BUCKET:
            buckets[k:k + 1] = [b[:BUCKET], b[BUCKET:]]
            maxes[k:k + 1] = [b[BUCKET - 1], b[-1]]

    def _remove(self, x: str) -> None:
        maxes = self._maxes
        k = bisect_left(maxes, x)
        if k == len(maxes):
            return
        b = self._buckets[k]
        i = bisect_left(b, x)
        if i == len(b) or b[i] != x:  # not there
            return
        del b[i]
        if not b:
            del self._buckets[k]
            del maxes[k]
        elif i == len(b):
            maxes[k] = b[-1]
