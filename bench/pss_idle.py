#!/usr/bin/env python3
"""PSS of every flowd process at idle (issue 12: all processes <= 40 MiB).

Starts a private mosquitto on a free 127.0.0.1 port and ``flowd run`` (2 workers, the
bench3 routine applied, everything else default) on a fresh state folder, waits until
it is ready and settled, and prints PSS per process (``/proc/PID/smaps_rollup``) and
the total. With ``--flows N`` it then runs N flows through MQTT, waits ``--settle``
seconds again and prints a second reading (idle after work). Every child is started
here and stopped by PID.

    .venv/bin/python bench/pss_idle.py [--flows 200] [--settle 5] [--web on|off] [--json]

With ``--web on`` (the default, as in flowd) the console's pages and /metrics are opened
before each reading, so it counts a console that has served; ``--web off`` turns it off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
KEYS = ("Pss", "Rss", "Private_Dirty", "Shared_Dirty", "Shared_Clean", "Private_Clean")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"pss_idle: {what} did not happen within {timeout:.0f}s")
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(p) for p in f.read().split())
    except OSError:
        return []


def rollup(pid: int) -> dict[str, int]:
    values = dict.fromkeys(KEYS, 0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0])
    return values


def by_mapping(pids: list[int]) -> dict[str, int]:
    """PSS (KiB) summed over ``pids`` per mapped file ("[heap]", "[anon]" for the rest)."""
    total: dict[str, int] = {}
    for pid in pids:
        name = "[anon]"
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and not head[0].endswith(":"):
                    name = head[5].strip().rsplit("/", 1)[-1] if len(head) > 5 else "[anon]"
                elif head[0] == "Pss:":
                    total[name] = total.get(name, 0) + int(head[1])
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def roles(main: int) -> list[tuple[str, int]]:
    """(role, pid) for the daemon's tree: main, its workers, or (flowd before issue 12)
    a pool parent and the pool's children."""
    found = [("main", main)]
    for index, child in enumerate(children_of(main)):
        below = children_of(child)
        found.append(("pool parent" if below else f"worker {index + 1}", child))
        found.extend((f"pool child {n + 1}", pid) for n, pid in enumerate(below))
    return found


def reading(main: int) -> dict[str, Any]:
    procs = [{"role": role, "pid": pid, **{k: round(v / 1024, 1) for k, v in rollup(pid).items()}}
             for role, pid in roles(main)]
    return {"processes": len(procs), "pss_mib": round(sum(p["Pss"] for p in procs), 1), "per_process": procs}


def show(title: str, r: dict[str, Any]) -> None:
    print(f"{title}: {r['processes']} processes, PSS {r['pss_mib']} MiB")
    print(f"  {'role':<14} {'pid':>7} {'PSS':>6} {'RSS':>6} {'priv.dirty':>10} {'shared':>7}")
    for p in r["per_process"]:
        print(f"  {p['role']:<14} {p['pid']:>7} {p['Pss']:>6} {p['Rss']:>6} {p['Private_Dirty']:>10} "
              f"{round(p['Shared_Dirty'] + p['Shared_Clean'], 1):>7}")


def run_flows(port: int, count: int, timeout: float) -> None:
    import paho.mqtt.client as mqtt

    results: set[str] = set()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pss-idle-{port}")
    client.on_message = lambda c, u, m: results.add(m.topic)
    client.connect("127.0.0.1", port)
    client.subscribe("flow/+/result", qos=1)
    client.loop_start()
    try:
        time.sleep(0.3)
        for i in range(count):
            client.publish("flow/submit", json.dumps({"routine": "bench3", "kwargs": {"id": i}}), qos=1)
        wait_until(f"{count} results", lambda: len(results) >= count, timeout)
    finally:
        client.loop_stop()
        client.disconnect()


def open_console(port: int) -> None:
    """GET every kind of console page once (templates compiled, /metrics counted)."""
    import http.client

    for path in ("/", "/routines", "/flows", "/flows?state=DONE", "/flows/1", "/metrics", "/healthz"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        if status not in (200, 404):
            raise SystemExit(f"pss_idle: the console answered {status} to GET {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--settle", type=float, default=5.0, help="seconds after ready (and after the flows)")
    p.add_argument("--flows", type=int, default=0, help="flows to run before a second reading")
    p.add_argument("--mappings", type=int, default=0, metavar="N",
                   help="also print the N mappings with the most PSS, summed over the processes")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--web", choices=("on", "unvisited", "off"), default="on",
                   help="the web console: on and visited (the default), on but never visited, or off")
    p.add_argument("--daemon-wrapper", metavar="SCRIPT", help="experiments: start the daemon as "
                   "'python SCRIPT run --config X' instead of 'python -m flowd run --config X'")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flowd-pss-", dir="/var/tmp"))
    port = free_port()
    web_port = free_port()
    procs: list[subprocess.Popen[Any]] = []
    try:
        (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                                             "persistence false\nlog_dest none\n")
        procs.append(subprocess.Popen([MOSQUITTO, "-c", str(work / "mosquitto.conf")]))

        def broker_up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until("mosquitto", broker_up, 10)
        config = work / "flowd.toml"
        config.write_text(f'[flowd]\nstate_dir = "{work / "state"}"\ntask_paths = ["{BENCH / "tasks"}"]\n'
                          f'workers = {a.workers}\nnode_id = "pss"\n\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
                          f'\n[web]\nenabled = {"false" if a.web == "off" else "true"}\n'
                          f'listen = "127.0.0.1:{web_port}"\n')
        subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config), "apply",
                        str(BENCH / "bench3.toml")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        log = open(work / "flowd.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        entry = [a.daemon_wrapper] if a.daemon_wrapper else ["-m", "flowd"]
        daemon = subprocess.Popen([sys.executable, *entry, "run", "--config", str(config)], cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT)
        procs.append(daemon)
        wait_until("flowd ready", lambda: b" ready: " in (work / "flowd.log").read_bytes(), 30)
        if a.web == "on":
            open_console(web_port)
        time.sleep(a.settle)
        out: dict[str, Any] = {"web": a.web, "idle": reading(daemon.pid)}
        show("idle after start", out["idle"])
        if a.mappings:
            pids = [p["pid"] for p in out["idle"]["per_process"]]
            for name, kib in list(by_mapping(pids).items())[:a.mappings]:
                print(f"  {kib / 1024:7.2f} MiB  {name}")
            for proc in out["idle"]["per_process"]:
                top = list(by_mapping([proc["pid"]]).items())[:a.mappings]
                print(f"  {proc['role']}: " + ", ".join(f"{name} {kib / 1024:.2f}" for name, kib in top))
        if a.flows:
            run_flows(port, a.flows, 120)
            if a.web == "on":
                open_console(web_port)
            time.sleep(a.settle)
            out["after_flows"] = reading(daemon.pid)
            show(f"idle after {a.flows} flows", out["after_flows"])
            if a.mappings:
                for proc in out["after_flows"]["per_process"]:
                    top = list(by_mapping([proc["pid"]]).items())[:a.mappings]
                    print(f"  {proc['role']}: " + ", ".join(f"{name} {kib / 1024:.2f}" for name, kib in top))
        if daemon.poll() is not None:
            raise SystemExit(f"pss_idle: flowd exited ({daemon.returncode}); see {work}/flowd.log")
        if a.json:
            print(json.dumps(out))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
