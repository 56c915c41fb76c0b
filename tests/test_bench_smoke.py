"""A tiny end-to-end run of ``python -m bench`` so the benchmark cannot rot.

It runs every scenario at toy sizes (seconds) and checks the shape of the result, never a
timing: on a shared 2-core box timings are the benchmark's business, not the test suite's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.procs import find_binary

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_reports_every_figure() -> None:
    find_binary("mosquitto", "apt-get install mosquitto")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    assert lines[-1].startswith("BENCH "), proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(lines[-1][len("BENCH "):])
    assert figures["failed"] == [], proc.stdout[-3000:]
    assert proc.returncode == 0
    for key in ("ingest_ratio", "ingest_ratio_c", "ingest_hub_sustained", "ingest_bare_sustained",
                "ingest_c_sustained", "who_page_p99_ms", "who_loop_stall_max_ms", "who_loop_busy_max_ms",
                "who_first_page_ms", "who_scan_page_ms", "who_e2e_ms", "steady_cpu",
                "steady_rss_per_device_b", "will_p99_ms", "restart_ready_s",
                "restart_republished_s", "storm_p99_s", "embedded_max_devices",
                "engine_heartbeats_per_s"):
        assert isinstance(figures.get(key), int | float), key
    assert figures["storm_users"] == 100
    assert figures["will_kills"] == 3
    assert figures["who_listed"] > 0 and figures["who_pages"] == 20
    for target in ("target ingest_ratio_c", "target ingest_ratio ", "target who page p99",
                   "target who: loop"):  # the readable table, every figure with its target
        assert target in proc.stdout


def test_bench_help_lists_scenarios() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0
    for word in ("--quick", "--only", "ingest", "steady", "storm", "embedded", "who", "bench-full"):
        assert word in proc.stdout
