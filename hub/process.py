"""Process-wide tuning: when the cyclic garbage collector runs, how many files may be open.

Kept out of the engine (which owns presence rules, not the interpreter) and out of the stores'
and service's own logic; they call these around the work that needs them. The hub holds a few
long-lived objects per device and none of them are garbage, so the collector's default
behaviour (walk everything, often) is pure cost at scale. Measured figures are in each
function's docstring.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: A soft limit to aim at when the hard limit is unlimited (Linux refuses "unlimited" itself).
_UNLIMITED_TARGET = 1 << 20


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector off for a burst of allocation that makes no garbage.

    Used for a whole database being parsed (a 1M-device file is ~5M containers: parsing 6.1 s
    with the collector on, 3.1 s off; validating 14 s on, 3-4 s off), for the engine loading
    it (35.6 -> 11.7 s at 1M), and for a clock step (a mass expiry allocates hundreds of
    thousands of short-lived effect objects, none in a cycle; the young collections were ~60%
    of a 100k-device expiry: 3.6-6.0 s with, 1.7 s without). The collector is switched back on
    only if it was on before, so nesting and a caller that keeps it off are both respected.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the presence state, once start-up has loaded it.

    With the default thresholds every full collection walks all the hub's objects (millions at
    100k devices), which profiled as ~9% of a timeout storm. ``gc.freeze()`` moves what
    start-up loaded (the store's state, imports) out of the collector's sight, and a larger
    first threshold makes young collections rarer under a steady stream of short-lived
    messages. The price: a device or user loaded at start and removed later stays in memory
    until the next restart (its objects reference each other, and frozen cycles are not
    collected).
    """
    gc.freeze()  # no collect first: it took 7 s at 1M devices, for garbage start-up hardly has
    gc.set_threshold(50_000, 20, 100)


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit on open files to its hard limit, as far as the OS allows;
    returns (before, after), or None where there is no such limit (Windows) or it cannot move.

    Why: every client of the embedded broker is an open socket, and most systems start a
    process with a soft limit of 1,024 files (a user may raise it to the hard limit, often
    ~500k, without privileges). The broker measured at 10k devices under 10% of a core hit
    the limit long before its CPU did; the benchmark stopped at 19k on a 20,000 limit.
    Beyond the hard limit only the administrator can go (``ulimit -Hn``, systemd's
    ``LimitNOFILE``); the line logged says which limit the hub runs with.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays at %d (each MQTT connection takes one): "
                        "raising it to %d failed: %s", soft, target, exc)
            return None
        log.info("open-file limit raised from %d to %d (each MQTT connection takes one)",
                 soft, target)
        return soft, target
    log.debug("open-file limit %s already (each MQTT connection takes one)",
              "unlimited" if soft == resource.RLIM_INFINITY else soft)
    return soft, soft
