#!/usr/bin/env python3
"""What the web console costs (issue 14): PSS and the hot path, console on and off.

One command, every figure: the import time and memory of the console's libraries in a
process that already holds the daemon's; ``bench/pss_idle.py`` (after start, and after
``--flows`` flows with the console's pages opened) and a short ``bench/run_bench.py``
(no peers, no counted pass, no raw huey; with the console on, /metrics is scraped every
``--scrape`` seconds during the runs), each with ``--web off`` and ``--web on``, in the
order off, on, on, off (``--rounds 2``) so that a machine getting busier favours neither.

    .venv/bin/python bench/console_cost.py [--rounds 2] [--flows 200] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

IMPORT_PROBE = r"""
import json, sys, time
def pss():
    with open('/proc/self/smaps_rollup') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('Pss:'))
import flowd.service.service, flowd.api, flowd.engine.engine, flowd.mqtt.bridge, flowd.schedule.scheduler
import flowd.queue.queue, flowd.mqtt.outbox
before, t0 = pss(), time.perf_counter()
import flowd.web.server
print(json.dumps({"import_ms": round(1000 * (time.perf_counter() - t0), 1),
                  "import_pss_mib": round((pss() - before) / 1024, 2)}))
"""


def run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run one bench script and return the JSON object on its last line."""
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"console_cost: {' '.join(cmd[1:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def pss_run(web: str, flows: int) -> dict[str, Any]:
    r = run_json([sys.executable, str(BENCH / "pss_idle.py"), "--web", web, "--flows", str(flows), "--settle", "5",
                  "--json"], 600)
    main_of = {k: next(p["Pss"] for p in r[k]["per_process"] if p["role"] == "main") for k in ("idle", "after_flows")}
    return {"pss_idle_mib": r["idle"]["pss_mib"], "pss_after_mib": r["after_flows"]["pss_mib"],
            "main_pss_idle_mib": main_of["idle"], "main_pss_after_mib": main_of["after_flows"]}


def bench_run(web: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", prefix="console-cost-") as out:
        run_json([sys.executable, str(BENCH / "run_bench.py"), "--web", web, "--web-scrape", str(args.scrape),
                  "--no-huey", "--no-counts", "--idle-seconds", "5", "--settle", "3", "--db-flows", "0",
                  "--lat-n", str(args.lat_n), "--tp-n", str(args.tp_n), "--json-out", out.name], 1200)
        r: dict[str, Any] = json.loads(Path(out.name).read_text())
    lat, tp = r["latency"], r["throughput"]
    return {"latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
            "throughput_rps": tp["throughput_rps"], "cpu_ms_per_flow": tp["cpu_ms_per_flow"],
            "idle_cpu_pct": r["idle_cpu_pct"], "bench_pss_idle_mib": r["pss_idle_mib"], "web": r.get("web")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="pairs of off/on runs (ABBA order)")
    p.add_argument("--flows", type=int, default=200, help="flows before pss_idle's second reading")
    p.add_argument("--lat-n", type=int, default=300)
    p.add_argument("--tp-n", type=int, default=3000)
    p.add_argument("--scrape", type=float, default=5.0, help="seconds between /metrics scrapes while benched")
    p.add_argument("--json-out", metavar="FILE")
    a = p.parse_args(argv)
    probe = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=60, cwd=ROOT)
    imports = json.loads(probe.stdout) if probe.returncode == 0 else {"error": probe.stderr[-500:]}
    order = [w for i in range(a.rounds) for w in (("off", "on") if i % 2 == 0 else ("on", "off"))]
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for web in order:
        runs[web].append({**pss_run(web, a.flows), **bench_run(web, a)})
    keys = ("pss_idle_mib", "pss_after_mib", "main_pss_idle_mib", "main_pss_after_mib", "latency_p50_ms",
            "latency_p99_ms", "throughput_rps", "cpu_ms_per_flow", "idle_cpu_pct")
    mean = {web: {k: round(statistics.mean(r[k] for r in rs), 3) for k in keys} for web, rs in runs.items()}
    print(f"import flowd.web.server after the daemon's modules: {imports}")
    print(f"{'mean of ' + str(a.rounds) + ' run(s)':<34} {'console off':>12} {'console on':>12} {'on - off':>10}")
    for k in keys:
        print(f"{k:<34} {mean['off'][k]:>12} {mean['on'][k]:>12} {round(mean['on'][k] - mean['off'][k], 3):>10}")
    scrapes = [r["web"] for r in runs["on"] if r.get("web")]
    if scrapes:
        print("scrapes of /metrics during the on runs: " + "; ".join(
            f"{s['scrapes']} (p50 {s['scrape_ms_p50']} ms, max {s['scrape_ms_max']} ms, {s['scrape_errors']} errors)"
            for s in scrapes))
    result = {"imports": imports, "order": order, "runs": runs, "mean": mean,
              "config": {"flows": a.flows, "lat_n": a.lat_n, "tp_n": a.tp_n, "scrape_s": a.scrape}}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
