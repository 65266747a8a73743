"""bench/run_bench.py --quick end to end: a real broker, a real daemon, real huey.

No figure is asserted (performance lives in bench/); only that the run completes, loses
nothing, reports every key, and leaves no process of its own behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_BENCH = ROOT / "bench" / "run_bench.py"
CLIENT = Path(os.environ.get("FLOWD_BENCH_SHARED", "/work/shared/bench")) / "mqtt_flow_bench.py"

TOP_KEYS = {
    "engine", "date", "machine", "versions", "config", "startup_ms", "pss_idle_mib", "rss_idle_mib", "processes",
    "idle_cpu_pct", "idle_seconds", "latency", "throughput", "disk_write_bytes_per_flow", "pss_after_mib",
    "rss_after_mib", "work_dir", "db_flows", "db_files", "db_mib", "db_bytes_per_flow", "huey_raw", "peers", "goals",
    "counts", "comparison", "run_seconds",
}
RUN_KEYS = {"sent", "received", "lost", "duplicates", "throughput_rps", "p50_ms", "p90_ms", "p99_ms",
            "engine_cpu_s", "broker_cpu_s", "engine_cpu_ms_per_flow", "cpu_ms_per_flow", "io", "write_bytes_per_flow",
            "wchar_per_flow"}
COUNT_KEYS = {"statements_per_flow", "write_transactions_per_flow", "transactions_per_flow", "fsyncs_per_flow",
              "by_database", "syncs_by_file"}
HUEY_KEYS = {"pipeline_p50_ms", "pipeline_p99_ms", "pipeline_steps_per_s", "noop_tasks_per_s"}
GOAL_KEYS = {"throughput_rps", "latency_p50_ms", "latency_p99_ms", "pss_idle_mib", "startup_ms", "idle_cpu_pct"}


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry}: {cmdline}")
    return found


@pytest.mark.skipif(not CLIENT.exists(), reason=f"the shared bench client {CLIENT} is not on this machine")
def test_quick_bench_reports_every_figure_and_loses_nothing(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(RUN_BENCH), "--quick", "--idle-seconds", "1", "--max-seconds", "50",
                           "--json-out", str(out_file)], capture_output=True, text=True, timeout=55, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert json.loads(out_file.read_text()) == result

    assert result.keys() >= TOP_KEYS, TOP_KEYS - result.keys()
    for run in ("latency", "throughput"):
        assert result[run].keys() >= RUN_KEYS, (run, RUN_KEYS - result[run].keys())
        assert result[run]["sent"] == 20
        assert result[run]["lost"] == 0, result[run]
        assert result[run]["duplicates"] == 0, result[run]
        assert result[run]["received"] == 20
    assert set(result["huey_raw"]) == {"default", "tuned"}
    for run in result["huey_raw"].values():
        assert run.keys() >= HUEY_KEYS
    assert set(result["goals"]) == GOAL_KEYS
    assert result["peers"] == {}
    # the counted pass: SQL through the sitecustomize, fsyncs through the LD_PRELOAD shim
    counts = result["counts"]
    for run in ("c1", "c100"):
        assert counts[run].keys() >= COUNT_KEYS, (run, COUNT_KEYS - counts[run].keys())
        assert counts[run]["flows"] > 0
        assert counts[run]["statements_per_flow"] > 0, counts[run]
        assert counts[run]["write_transactions_per_flow"] > 0, counts[run]
        assert "flowd.db" in counts[run]["by_database"], counts[run]["by_database"]
        if counts["fsyncs_counted"]:  # synchronous = full: a durable commit syncs the WAL
            assert counts[run]["fsyncs_per_flow"] > 0, counts[run]
    engines = result["comparison"]["engines"]
    assert set(engines) == {"flowd"}
    assert engines["flowd"]["statements_per_flow"] == counts["c100"]["statements_per_flow"]
    assert result["throughput"]["write_bytes_per_flow"] > 0
    assert result["processes"] >= 3  # daemon, two workers
    assert result["pss_idle_mib"] > 0 and result["startup_ms"] > 0
    assert result["db_flows"] >= 40  # probe flows + 20 + 20
    assert result["db_files"]["flowd.db"] > 0
    assert "synchronous=full" in proc.stdout
    # flowd (--config <work>/flowd.toml) and mosquitto (-c <work>/mosquitto.conf) are gone
    assert result["work_dir"].startswith("/")
    assert not _processes_mentioning(result["work_dir"]), "the bench left processes running"
    assert not Path(result["work_dir"]).exists()
