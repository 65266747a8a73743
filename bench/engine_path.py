#!/usr/bin/env python3
"""The engine's per-flow path in one process, counted in a way the host's load cannot move.

    .venv/bin/python bench/engine_path.py [--flows N] [--batch B] [--callgrind]

Submits N flows of the bench's 3-step routine (``bench3.toml``) in batches of B, as the
intake does, and runs each batch's queue messages as a worker does (``run_batch``): the
same transactions, statements, JSON and state checks as the daemon, without MQTT, huey or
another process. It prints the CPU per flow.

This machine is shared, and the same code's CPU per flow moves by a fifth from one hour
to the next. With ``--callgrind`` the run happens twice under valgrind's callgrind, with
N/2 flows and with N, and the difference in instructions per flow is printed: the same
for the same code (within 0.3 % here), whatever else runs. It leaves out the kernel and
the fsync wait, and what happens once (start-up, lazy imports) drops out.
Compare two trees with it (``PYTHONPATH=<tree>``): a ratio of instructions per flow.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(flows: int, batch: int) -> float:
    """Run ``flows`` flows in a fresh state folder; CPU seconds they took."""
    from flowd import api
    from flowd.apply import apply_file
    from flowd.config import load_config
    from flowd.engine.batch import run_batch
    from flowd.engine.engine import Engine, Submission
    from flowd.engine.runner import WorkerRuntime
    from flowd.loader import ScriptLoader

    work = Path(tempfile.mkdtemp(prefix="flowd-engine-path-"))
    try:
        config_path = work / "flowd.toml"
        config_path.write_text(f'[flowd]\nstate_dir = "{work / "state"}"\ntask_paths = ["{HERE / "tasks"}"]\n'
                               'workers = 2\nnode_id = "bench"\n')
        config = load_config(str(config_path))
        api.configure(config, create=True)
        apply_file(str(HERE / "bench3.toml"), config.flowd.task_paths, prune=False)
        messages: list[list[tuple[int, int]]] = []
        engine = Engine(config, enqueue=lambda flow_id, token, delay: messages.append([(flow_id, token)]),
                        enqueue_many=messages.append)
        runtime = WorkerRuntime(config, engine, ScriptLoader(config.flowd.task_paths))
        started = time.process_time()
        done = 0
        while done < flows:
            count = min(batch, flows - done)
            engine.submit_many([Submission("bench3", [], {"n": done + i}) for i in range(count)])
            while messages:
                run_batch(runtime, messages.pop(0), os.getpid())
            done += count
        used = time.process_time() - started
        api.reset()
        return used
    finally:
        shutil.rmtree(work, ignore_errors=True)


def instructions(flows: int, batch: int) -> int:
    """Instructions the whole process took under callgrind for ``flows`` flows."""
    with tempfile.TemporaryDirectory() as out:
        target = Path(out) / "callgrind.out"
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={target}",
                               sys.executable, __file__, "--flows", str(flows), "--batch", str(batch)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        if done.returncode != 0:
            raise SystemExit(f"engine_path: valgrind failed:\n{done.stderr[-2000:]}")
        found = re.search(r"Collected : (\d+)", done.stderr) or re.search(r"refs:\s+([\d,]+)", done.stderr)
        if found is None:
            raise SystemExit(f"engine_path: no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
        return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100, help="flows submitted together (the intake's batch)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions per flow under valgrind")
    parser.add_argument("--base-flows", type=int, default=None, metavar="M",
                        help="with --callgrind: the first run has M flows, not 0, so what happens once (lazy "
                             "imports, first statements) drops out of the difference (default: N/2)")
    args = parser.parse_args()
    if args.callgrind:
        if shutil.which("valgrind") is None:
            raise SystemExit("engine_path: --callgrind needs valgrind (apt-get install valgrind)")
        first = args.flows // 2 if args.base_flows is None else args.base_flows
        base = instructions(first, args.batch)
        total = instructions(args.flows, args.batch)
        print(f"engine path: {(total - base) / (args.flows - first):,.0f} instructions per flow "
              f"(runs of {first} and {args.flows} flows in batches of {args.batch})")
        return 0
    used = run(args.flows, args.batch)
    print(f"engine path: {1000 * used / max(args.flows, 1):.3f} ms CPU per flow "
          f"({args.flows} flows in batches of {args.batch}, one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
