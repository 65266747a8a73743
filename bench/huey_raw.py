"""Raw huey on SqliteHuey, no flowd: the floor flowd's queue sits on.

Run by ``run_bench.py`` (one JSON line on stdout); can be run alone:

    .venv/bin/python bench/huey_raw.py --dir /tmp/hb --delay 0.1 --max-delay 10

With 2 process workers (flowd's bench setting) it measures:

* a five-step ``.then()`` pipeline, one at a time: latency from enqueue to the end of
  the last step (taken in the worker, CLOCK_MONOTONIC is system-wide), p50/p90/p99;
* a burst of pipelines enqueued at once: steps/s;
* a burst of no-op tasks enqueued at once: tasks/s (from the first enqueue to the end
  of a sentinel task enqueued last).

The consumer polls an empty queue every ``delay`` seconds, growing by ``backoff`` up to
``max_delay`` (huey's defaults 0.1 / 1.15 / 10). flowd does not poll (wake socket).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from huey import SqliteHuey
from huey.consumer import Consumer

huey: Any = None


def _make_huey(path: str) -> Any:
    h = SqliteHuey("bench", filename=path, results=True)

    @h.task(name="add")
    def add(x: int) -> int:
        return x + 1

    @h.task(name="last")
    def last(x: int) -> float:
        return time.monotonic()

    @h.task(name="noop")
    def noop() -> None:
        return None

    h.bench_tasks = {"add": add, "last": last, "noop": noop}
    return h


def _consume(path: str, workers: int, delay: float, max_delay: float) -> None:
    os.setpgid(0, 0)  # own group: the parent can kill workers and all
    consumer = Consumer(_make_huey(path), workers=workers, worker_type="process", periodic=False,
                        initial_delay=delay, backoff=1.15, max_delay=max_delay)
    consumer.run()


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # nearest rank
    return ordered[int(rank) - 1]


def _wait_result(result: Any, deadline: float) -> Any:
    while time.monotonic() < deadline:
        value = result.get(preserve=True)
        if value is not None:
            return value
        time.sleep(0.002)
    raise TimeoutError("huey result did not arrive in time")


def run(folder: Path, workers: int, delay: float, max_delay: float, pipelines: int, burst: int, noops: int,
        timeout: float) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / f"huey-{delay:g}-{max_delay:g}.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    h = _make_huey(path)
    h.storage.conn  # noqa: B018 - create the tables before the consumer forks
    t = h.bench_tasks
    proc = multiprocessing.get_context("fork").Process(target=_consume, args=(path, workers, delay, max_delay))
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        time.sleep(0.5)  # consumer and workers up
        # 1. sequential five-step pipelines: latency
        latencies = []
        for _ in range(pipelines):
            pipe = t["add"].s(0).then(t["add"]).then(t["add"]).then(t["add"]).then(t["last"])
            start = time.monotonic()
            group = h.enqueue(pipe)
            latencies.append((_wait_result(list(group)[-1], deadline) - start) * 1000)
        # 2. burst of pipelines: steps/s
        start = time.monotonic()
        groups = [h.enqueue(t["add"].s(0).then(t["add"]).then(t["add"]).then(t["add"]).then(t["last"]))
                  for _ in range(burst)]
        ends = [_wait_result(list(g)[-1], deadline) for g in groups]
        pipe_rate = 5 * burst / (max(ends) - start)
        # 3. burst of no-op tasks: tasks/s
        start = time.monotonic()
        for _ in range(noops):
            t["noop"]()
        end = _wait_result(t["last"](0), deadline)
        noop_rate = (noops + 1) / (end - start)
    finally:
        if proc.pid is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.join(5)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.join(5)
    return {
        "delay": delay, "max_delay": max_delay, "workers": workers,
        "pipeline_n": pipelines, "pipeline_p50_ms": round(_percentile(latencies, 50), 2),
        "pipeline_p90_ms": round(_percentile(latencies, 90), 2),
        "pipeline_p99_ms": round(_percentile(latencies, 99), 2),
        "pipeline_burst": burst, "pipeline_steps_per_s": round(pipe_rate, 1),
        "noop_n": noops, "noop_tasks_per_s": round(noop_rate, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="folder for the queue files")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--delay", type=float, default=0.1, help="consumer initial_delay (huey default 0.1)")
    p.add_argument("--max-delay", type=float, default=10.0, help="consumer max_delay (huey default 10)")
    p.add_argument("--pipelines", type=int, default=20, help="sequential five-step pipelines (latency)")
    p.add_argument("--burst", type=int, default=400, help="pipelines enqueued at once (steps/s)")
    p.add_argument("--noops", type=int, default=2000, help="no-op tasks enqueued at once (tasks/s)")
    p.add_argument("--timeout", type=float, default=120)
    a = p.parse_args()
    result = run(Path(a.dir), a.workers, a.delay, a.max_delay, a.pipelines, a.burst, a.noops, a.timeout)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
