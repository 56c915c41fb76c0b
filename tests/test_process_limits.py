"""The hub raises its open-file limit at start (issue 16): one socket per broker client."""

from __future__ import annotations

import resource
import subprocess
import sys

_PROBE = """
import logging, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from hub.process import raise_open_file_limit
print(raise_open_file_limit())
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _lowered() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_and_logged() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    done = subprocess.run([sys.executable, "-c", _PROBE], preexec_fn=_lowered,
                          capture_output=True, text=True, timeout=60, check=True)
    logged, result, soft = done.stdout.splitlines()
    assert logged == f"open-file limit raised from 256 to {expected} (each MQTT connection takes one)"
    assert result == f"(256, {expected})"
    assert int(soft) == expected

