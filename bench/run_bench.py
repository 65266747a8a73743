#!/usr/bin/env python3
"""flowd benchmark (issue 7): one run, every figure, each next to its goal.

It starts a private mosquitto on a free 127.0.0.1 port (``set_tcp_nodelay true``, no
persistence: the broker ``peer_nodered.sh`` uses) and ``flowd run`` on a clean state
folder with two workers, loads the three-step routine ``bench3`` (bench/bench3.toml,
bench/tasks/task_bench.py: the Node-RED peer's flow) and measures, with the shared
engine-agnostic client ``mqtt_flow_bench.py``:

* start-up: launching ``flowd run`` -> first result (the client's ``--probe``);
* memory: PSS and RSS of every flowd process (the daemon's process tree), idle and
  after the runs; idle CPU over ``--idle-seconds``;
* latency (C=1) and throughput (C=100) runs, submit -> ``flow/<id>/result``;
* bytes written to disk per flow in the throughput run (``/proc/PID/io``), and the
  database size after ``--db-flows`` flows;
* raw huey (bench/huey_raw.py) with huey's default polling and a tuned one;
* Node-RED, with ``--peer`` (``peer_nodered.sh``, its own broker and ports).

It prints a table and one JSON line (also written to ``--json-out``). Every child is
started by this script and stopped by PID or process group at the end, also on error
or Ctrl-C; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SHARED = Path(os.environ.get("FLOWD_BENCH_SHARED", "/work/shared/bench"))
CLIENT = SHARED / "mqtt_flow_bench.py"
PEER_SCRIPT = SHARED / "peer_nodered.sh"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

SUBMIT = ["--submit-topic", "flow/submit", "--result-topic", "flow/+/result",
          "--payload-template", '{"routine":"bench3","kwargs":{"id":"{id}"}}', "--id-field", "result.kwargs.id"]

# Issue 7 goals, and the Node-RED figures measured on this machine (shared/bench/README.md).
GOALS = {
    "throughput_rps": (">=", 4480.0, "Node-RED stock 4,480 results/s at C=100"),
    "latency_p50_ms": ("<=", 5.0, "Node-RED stock 43.8 ms"),
    "latency_p99_ms": ("<=", 20.0, "Node-RED stock 47.6 ms"),
    "pss_idle_mib": ("<=", 40.0, "Node-RED 94.7 MiB RSS idle"),
    "startup_ms": ("<=", 400.0, "Node-RED 765 ms"),
    "idle_cpu_pct": ("<=", 0.5, "% of one core"),
}


def log(text: str) -> None:
    print(f"[run_bench] {text}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The run cannot go on; the message says why."""


class Deadline(BaseException):
    """The whole run went over --max-seconds."""


# ---------------------------------------------------------------------- children
class Children:
    """Every process this script starts, so each can be stopped by PID / group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any], bool]] = []
        self.logs: dict[int, Any] = {}

    def start(self, name: str, cmd: list[str], *, group: bool = False, log_file: Path | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` (in its own process group if ``group``), output to ``log_file`` if given."""
        out = None
        if log_file is not None:
            out = open(log_file, "wb")  # noqa: SIM115 - closed in stop()
            kwargs.update(stdout=out, stderr=subprocess.STDOUT)
        try:
            proc = subprocess.Popen(cmd, start_new_session=group, **kwargs)
        except BaseException:
            if out is not None:
                out.close()
            raise
        self.procs.append((name, proc, group))
        if out is not None:
            self.logs[proc.pid] = out
        return proc

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        """Signal ``proc`` (its whole group if started with one), wait, then SIGKILL."""
        for entry in self.procs:
            if entry[1] is proc:
                name, p, group = entry
                break
        else:
            return
        if p.poll() is None:
            self._signal(p, group, sig)
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                log(f"{name} ({p.pid}) ignored {signal.Signals(sig).name}; killing it")
        if group:
            self._signal(p, True, signal.SIGKILL)  # stragglers left in its group
        if p.poll() is None:
            p.kill()
            p.wait(5)
        self.procs = [entry for entry in self.procs if entry[1] is not p]
        out = self.logs.pop(p.pid, None)
        if out is not None:
            out.close()

    @staticmethod
    def _signal(p: subprocess.Popen[Any], group: bool, sig: int) -> None:
        try:
            if group:
                os.killpg(p.pid, sig)
            elif p.poll() is None:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for _, proc, _ in reversed(list(self.procs)):
            self.stop(proc, wait=15.0)


def run_child(children: Children, name: str, cmd: list[str], timeout: float, **kwargs: Any) -> tuple[int, str, str]:
    """Run a command to its end (bounded by ``timeout``); (exit code, stdout, stderr)."""
    proc = children.start(name, cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children.stop(proc, signal.SIGKILL)
        raise BenchError(f"{name} did not finish within {timeout:.0f}s") from None
    children.stop(proc)
    return proc.returncode, out, err


def last_json(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no JSON line in the output: {text[-500:]!r}")
    return dict(json.loads(lines[-1]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the process on port {port} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


# ---------------------------------------------------------------------- /proc accounting
def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (pool, huey scheduler, workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            found.append(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


def _read_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    values = dict.fromkeys(keys, 0)
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in values:
                    values[name] = int(rest.split()[0])
    except OSError:
        pass
    return values


def memory(pids: list[int]) -> dict[str, Any]:
    """PSS and RSS (MiB) summed over ``pids``, from /proc/PID/smaps_rollup."""
    per = {pid: _read_kib(f"/proc/{pid}/smaps_rollup", ("Pss", "Rss")) for pid in pids}
    return {"pss_mib": round(sum(v["Pss"] for v in per.values()) / 1024, 1),
            "rss_mib": round(sum(v["Rss"] for v in per.values()) / 1024, 1),
            "processes": len(pids),
            "per_process_pss_mib": [round(v["Pss"] / 1024, 1) for v in per.values()]}


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def cpu_by_role(root: int, pids: list[int]) -> dict[str, float]:
    """CPU seconds of the daemon (main), the pool process, and the pool's children
    (huey workers and scheduler), so a run's cost can be split between them."""
    pool = [pid for pid in pids if _ppid(pid) == root]
    return {"main": cpu_seconds([root]), "pool": cpu_seconds(pool),
            "workers": cpu_seconds([pid for pid in pids if pid != root and pid not in pool])}


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def fsync_ms(folder: Path, count: int = 50) -> float:
    """Median time of a small write + fsync in ``folder``: what one synchronous=FULL commit waits for."""
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, b"x" * 512)
            os.fsync(fd)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return round(sorted(times)[len(times) // 2], 3)


def system_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / CLK_TCK


def write_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        total += _read_io(pid)
    return total


def _read_io(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, children: Children):
        self.args = args
        self.work = work
        self.children = children
        self.port = free_port()
        self.state = work / "state"
        self.config = work / "flowd.toml"
        self.mosq: subprocess.Popen[Any] | None = None
        self.daemon: subprocess.Popen[Any] | None = None
        self.result: dict[str, Any] = {}

    # -------------------------------------------------------------- set-up
    def start_broker(self) -> None:
        conf = self.work / "mosquitto.conf"
        conf.write_text("\n".join([
            "# private broker for run_bench.py (loopback only, no persistence), as peer_nodered.sh writes it",
            f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false",
            "set_tcp_nodelay true", "log_dest stdout", "log_type error", "log_type warning", "log_type notice", ""]))
        self.mosq = self.children.start("mosquitto", [MOSQUITTO, "-c", str(conf)],
                                        log_file=self.work / "mosquitto.log")
        wait_port(self.port, self.mosq, 5)
        log(f"mosquitto pid {self.mosq.pid} on 127.0.0.1:{self.port}")

    def write_config(self) -> None:
        a = self.args
        self.config.write_text("\n".join([
            "[flowd]", f'state_dir = "{self.state}"', f'task_paths = ["{BENCH / "tasks"}"]',
            f"workers = {a.workers}", 'shutdown_grace = "5s"', f'log_level = "{a.log_level}"', 'node_id = "bench"',
            "", "[mqtt]", 'host = "127.0.0.1"', f"port = {self.port}", f'client_id = "flowd-bench-{self.port}"',
            "", "[database]", f'synchronous = "{a.synchronous}"', ""]))

    def apply_routine(self) -> None:
        code, out, err = run_child(self.children, "flowctl apply",
                                   [sys.executable, "-m", "flowd.cli", "--config", str(self.config), "apply",
                                    str(BENCH / "bench3.toml")], 60, cwd=ROOT)
        if code != 0:
            raise BenchError(f"flowctl apply failed ({code}): {err.strip() or out.strip()}")

    def client_cmd(self, label: str, *extra: str, timeout: float | None = None) -> list[str]:
        return [sys.executable, str(CLIENT), "--host", "127.0.0.1", "--port", str(self.port), *SUBMIT,
                "--timeout", str(timeout or self.args.run_timeout), "--label", label, *extra]

    def start_daemon(self) -> None:
        """Probe first, then launch flowd: start-up = launch -> first result."""
        probe_out = self.work / "probe.out"
        probe = self.children.start("probe", self.client_cmd("startup", "--probe", timeout=60),
                                    log_file=probe_out)
        deadline = time.monotonic() + 10
        while "READY" not in probe_out.read_text():
            if probe.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"probe client not ready: {probe_out.read_text()[-500:]}")
            time.sleep(0.02)
        t0 = time.time_ns()
        self.daemon = self.children.start(
            "flowd", [sys.executable, *self.daemon_entry(), "run", "--config", str(self.config)], group=True, cwd=ROOT,
            log_file=self.work / "flowd.log")
        try:
            probe.wait(70)
        except subprocess.TimeoutExpired:
            pass
        self.children.stop(probe)
        if probe.returncode != 0 or self.daemon.poll() is not None:
            raise BenchError(f"flowd never answered the probe (see {self.work}/flowd.log): "
                             f"{probe_out.read_text()[-300:]}")
        first = last_json(probe_out.read_text())["first_result_epoch_ns"]
        self.result["startup_ms"] = round((first - t0) / 1e6, 1)
        log(f"flowd pid {self.daemon.pid}: first result {self.result['startup_ms']} ms after launch")

    def daemon_entry(self) -> list[str]:
        """``-m flowd``, or a wrapper script for experiments (--daemon-wrapper): it gets the same
        arguments and is expected to end in ``flowd.service.main()``."""
        return [self.args.daemon_wrapper] if self.args.daemon_wrapper else ["-m", "flowd"]

    def tree(self) -> list[int]:
        assert self.daemon is not None
        if self.daemon.poll() is not None:
            raise BenchError(f"flowd died (status {self.daemon.returncode}); see {self.work}/flowd.log")
        return process_tree(self.daemon.pid)

    # -------------------------------------------------------------- measurements
    def run_client(self, label: str, count: int, concurrency: int) -> dict[str, Any]:
        assert self.mosq is not None
        assert self.daemon is not None
        tree = self.tree()
        role0 = cpu_by_role(self.daemon.pid, tree)
        eng0, brk0, sys0 = cpu_seconds(tree), cpu_seconds([self.mosq.pid]), system_busy_seconds()
        code, out, err = run_child(self.children, label, self.client_cmd(
            label, "--count", str(count), "--concurrency", str(concurrency), "--quiet"), self.args.run_timeout + 30)
        if code != 0:
            raise BenchError(f"client run {label} failed ({code}): {(err or out).strip()[-500:]}")
        r = last_json(out)
        tree = self.tree()
        r["engine_cpu_s"] = round(cpu_seconds(tree) - eng0, 2)
        role1 = cpu_by_role(self.daemon.pid, tree)
        r["engine_cpu_ms_per_flow"] = {k: round(1000 * (role1[k] - role0[k]) / max(1, r["received"]), 3)
                                       for k in role1}
        r["broker_cpu_s"] = round(cpu_seconds([self.mosq.pid]) - brk0, 2)
        busy = system_busy_seconds() - sys0
        r["other_cpu_s"] = round(max(0.0, busy - r["engine_cpu_s"] - r["broker_cpu_s"] - (r["client_cpu_s"] or 0)), 2)
        log(f"{label}: N={count} C={concurrency}: {r['received']} results, {r['throughput_rps']} results/s, "
            f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms, lost {r['lost']}, dup {r['duplicates']}")
        return r

    def flows_in_db(self) -> int:
        with sqlite3.connect(f"file:{self.state / 'flowd.db'}?mode=ro", uri=True, timeout=10) as db:
            return int(db.execute("SELECT COUNT(*) FROM flow").fetchone()[0])

    def db_files(self) -> dict[str, int]:
        sizes = {}
        for name in ("flowd.db", "flowd.db-wal", "queue.db", "queue.db-wal"):
            path = self.state / name
            sizes[name] = path.stat().st_size if path.exists() else 0
        return sizes

    def profile_start(self) -> list[subprocess.Popen[Any]]:
        """py-spy on the daemon and every worker during the throughput run (``--profile DIR``)."""
        if not self.args.profile:
            return []
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        folder = Path(self.args.profile)
        folder.mkdir(parents=True, exist_ok=True)
        assert self.daemon is not None
        procs = []
        for pid in self.tree():
            role = "main" if pid == self.daemon.pid else f"pid{pid}"
            procs.append(self.children.start(f"py-spy {pid}", [
                spy, "record", "--nonblocking", "--format", "raw", "--rate", "250", "--pid", str(pid),
                "-o", str(folder / f"{role}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        return procs

    def profile_stop(self, procs: list[subprocess.Popen[Any]]) -> None:
        for proc in procs:
            self.children.stop(proc, signal.SIGINT, wait=20)

    def measure_flowd(self) -> None:
        a = self.args
        self.state.mkdir(mode=0o700)
        self.result["machine"]["fsync_ms_p50"] = fsync_ms(self.state)
        self.start_broker()
        self.write_config()
        self.apply_routine()
        self.start_daemon()
        time.sleep(a.settle)
        tree = self.tree()
        idle = memory(tree)
        self.result.update(pss_idle_mib=idle["pss_mib"], rss_idle_mib=idle["rss_mib"], processes=idle["processes"],
                           per_process_pss_idle_mib=idle["per_process_pss_mib"])
        log(f"idle: PSS {idle['pss_mib']} MiB, RSS {idle['rss_mib']} MiB over {idle['processes']} processes; "
            f"idle CPU over {a.idle_seconds:g}s")
        assert self.daemon is not None
        cpu0, role0, t0 = cpu_seconds(tree), cpu_by_role(self.daemon.pid, tree), time.monotonic()
        time.sleep(a.idle_seconds)
        tree = self.tree()
        idle_cpu, role1, elapsed = cpu_seconds(tree) - cpu0, cpu_by_role(self.daemon.pid, tree), time.monotonic() - t0
        self.result["idle_cpu_pct"] = round(100 * idle_cpu / elapsed, 3)
        self.result["idle_cpu_pct_by_role"] = {k: round(100 * (role1[k] - role0[k]) / elapsed, 3) for k in role1}
        self.result["idle_seconds"] = a.idle_seconds

        self.result["latency"] = self.run_client("flowd-latency", a.lat_n, 1)
        spies = self.profile_start()
        tree = self.tree()
        wb0 = write_bytes(tree)
        tp = self.run_client("flowd-throughput", a.tp_n, a.tp_c)
        tree = self.tree()
        wb = write_bytes(tree) - wb0
        self.profile_stop(spies)
        self.result["throughput"] = tp
        self.result["disk_write_bytes_per_flow"] = round(wb / max(1, tp["received"]))
        after = memory(tree)
        self.result.update(pss_after_mib=after["pss_mib"], rss_after_mib=after["rss_mib"])

        more = a.db_flows - self.flows_in_db()
        if more > 0:
            self.run_client("flowd-db-fill", more, a.tp_c)
        time.sleep(1.0)  # let the outbox delete the last acknowledged rows
        self.result["db_flows"] = self.flows_in_db()
        files = self.db_files()
        self.result["db_files"] = files
        self.result["db_mib"] = round(sum(files.values()) / MIB, 2)
        self.result["db_bytes_per_flow"] = round(sum(files.values()) / max(1, self.result["db_flows"]))

    def stop_flowd(self) -> None:
        if self.daemon is not None:
            self.children.stop(self.daemon, signal.SIGTERM, wait=20)
            self.daemon = None
        if self.mosq is not None:
            self.children.stop(self.mosq)
            self.mosq = None

    def measure_huey(self) -> None:
        a = self.args
        runs = {}
        for name, delay, max_delay in (("default", 0.1, 10.0), ("tuned", 0.01, 0.05)):
            code, out, err = run_child(self.children, f"huey-{name}", [
                sys.executable, str(BENCH / "huey_raw.py"), "--dir", str(self.work / "huey"),
                "--workers", str(a.workers), "--delay", str(delay), "--max-delay", str(max_delay),
                "--pipelines", str(a.huey_pipelines), "--burst", str(a.huey_burst), "--noops", str(a.huey_noops),
                "--timeout", str(a.run_timeout)], a.run_timeout + 30)
            if code != 0:
                raise BenchError(f"raw huey run ({name}) failed: {err.strip()[-500:]}")
            runs[name] = last_json(out)
            log(f"raw huey {name}: pipeline p50 {runs[name]['pipeline_p50_ms']} ms, "
                f"{runs[name]['pipeline_steps_per_s']} steps/s, {runs[name]['noop_tasks_per_s']} no-op tasks/s")
        self.result["huey_raw"] = runs

    def measure_peer(self) -> None:
        if not self.args.peer:
            self.result["peer"] = None
            return
        env = {**os.environ, "BROKER_PORT": str(free_port()), "NR_PORT": str(free_port()),
               "RUN_TIMEOUT": str(int(self.args.run_timeout)), "PEER_DIR": self.args.peer_dir}
        log("Node-RED peer: peer_nodered.sh (about a minute)")
        try:
            code, out, err = run_child(self.children, "peer_nodered.sh", ["bash", str(PEER_SCRIPT)], 600,
                                       env=env, group=True)
            (self.work / "peer.err").write_text(err)
            if code != 0:
                raise BenchError(f"peer_nodered.sh failed ({code}): {err.strip()[-500:]}")
            self.result["peer"] = last_json(out)
        except BenchError as exc:  # flowd's figures stand without the peer
            log(f"Node-RED peer not measured: {exc}")
            self.result["peer"] = {"error": str(exc)}


# ---------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": platform.python_version()}
    for name in ("flowd", "huey", "paho-mqtt", "peewee", "APScheduler"):
        try:
            found[name] = version(name)
        except Exception:
            found[name] = "?"
    try:
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5).stdout
        found["mosquitto"] = out.split()[2] if out else "?"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        found["mosquitto"] = "?"
    found["sqlite"] = sqlite3.sqlite_version
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "flowd"], capture_output=True, text=True,
                               timeout=5)
        found["flowd_commit"] = head.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        found["flowd_commit"] = "?"
    return found


def machine() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kib / 1024 / 1024, 1),
            "kernel": platform.release(), "loadavg_at_start": list(os.getloadavg())}


def goals(result: dict[str, Any]) -> dict[str, Any]:
    values = {
        "throughput_rps": result["throughput"]["throughput_rps"],
        "latency_p50_ms": result["latency"]["p50_ms"],
        "latency_p99_ms": result["latency"]["p99_ms"],
        "pss_idle_mib": result["pss_idle_mib"],
        "startup_ms": result["startup_ms"],
        "idle_cpu_pct": result["idle_cpu_pct"],
    }
    out = {}
    for key, (op, goal, anchor) in GOALS.items():
        value = values[key]
        met = value is not None and (value >= goal if op == ">=" else value <= goal)
        out[key] = {"value": value, "goal": f"{op} {goal:g}", "met": met, "anchor": anchor}
    return out


def print_table(r: dict[str, Any]) -> None:
    peer = r.get("peer") or {}
    if "error" in peer:
        print(f"  Node-RED peer failed: {peer['error']}")
        peer = {}
    pr = peer.get("runs", {})
    nl, nt = pr.get("nodered-latency", {}), pr.get("nodered-throughput", {})
    lat, tp = r["latency"], r["throughput"]
    g = r["goals"]

    def mark(key: str) -> str:
        return "ok" if g[key]["met"] else "MISSED"

    rows = [
        ("start-up to first result (ms)", r["startup_ms"], g["startup_ms"]["goal"],
         peer.get("startup_to_first_result_ms"), mark("startup_ms")),
        ("PSS idle, all processes (MiB)", r["pss_idle_mib"], g["pss_idle_mib"]["goal"], None, mark("pss_idle_mib")),
        ("RSS idle, sum (MiB)", r["rss_idle_mib"], "", peer.get("rss_idle_mib"), ""),
        ("PSS / RSS after runs (MiB)", f"{r['pss_after_mib']} / {r['rss_after_mib']}", "",
         peer.get("rss_after_mib"), ""),
        (f"idle CPU over {r['idle_seconds']:g}s (% core)", r["idle_cpu_pct"], g["idle_cpu_pct"]["goal"], None,
         mark("idle_cpu_pct")),
        ("  of which main / pool / workers (%)", " / ".join(str(v) for v in r["idle_cpu_pct_by_role"].values()),
         "", None, ""),
        ("latency C=1 p50 (ms)", lat["p50_ms"], g["latency_p50_ms"]["goal"], nl.get("p50_ms"), mark("latency_p50_ms")),
        ("latency C=1 p90 (ms)", lat["p90_ms"], "", nl.get("p90_ms"), ""),
        ("latency C=1 p99 (ms)", lat["p99_ms"], g["latency_p99_ms"]["goal"], nl.get("p99_ms"), mark("latency_p99_ms")),
        (f"throughput C={r['config']['tp_c']} (results/s)", tp["throughput_rps"], g["throughput_rps"]["goal"],
         nt.get("throughput_rps"), mark("throughput_rps")),
        ("throughput run p50 / p99 (ms)", f"{tp['p50_ms']} / {tp['p99_ms']}", "",
         f"{nt['p50_ms']} / {nt['p99_ms']}" if nt else None, ""),
        ("lost / duplicates (both runs)", f"{lat['lost'] + tp['lost']} / {lat['duplicates'] + tp['duplicates']}",
         "0 / 0", f"{nl['lost'] + nt['lost']} / {nl['duplicates'] + nt['duplicates']}" if nt else None, ""),
        ("engine CPU per flow, throughput (ms)", round(1000 * tp["engine_cpu_s"] / max(1, tp["received"]), 3), "",
         round(1000 * nt["engine_cpu_s"] / max(1, nt["received"]), 3) if nt else None, ""),
        ("  of which main / pool / workers (ms)", " / ".join(str(v) for v in tp["engine_cpu_ms_per_flow"].values()),
         "", None, ""),
        ("disk writes per flow (bytes)", r["disk_write_bytes_per_flow"], "", None, ""),
        (f"database after {r['db_flows']} flows (MiB)", r["db_mib"], "", None, ""),
    ]
    print()
    print(f"flowd benchmark {r['date']}  ({r['machine']['cores']} cores, {r['machine']['cpu']}; "
          f"flowd {r['versions']['flowd_commit']}; workers={r['config']['workers']}, "
          f"synchronous={r['config']['synchronous']}"
          f"{', QUICK counts' if r['config']['quick'] else ''})")
    print(f"  {'figure':<40} {'flowd':>16} {'goal':>9} {'Node-RED':>14}  ")
    for name, value, goal, nr, ok in rows:
        print(f"  {name:<40} {'' if value is None else str(value):>16} {goal:>9} "
              f"{'' if nr is None else str(nr):>14}  {ok}")
    for name, h in r["huey_raw"].items():
        print(f"  raw huey ({name}, delay {h['delay']:g}/max {h['max_delay']:g}): 5-step pipeline p50 "
              f"{h['pipeline_p50_ms']} ms p99 {h['pipeline_p99_ms']} ms; {h['pipeline_steps_per_s']} steps/s; "
              f"{h['noop_tasks_per_s']} no-op tasks/s")
    print(f"  fsync p50 in the state folder: {r['machine']['fsync_ms_p50']} ms; load average at start: "
          f"{', '.join(f'{x:.2f}' for x in r['machine']['loadavg_at_start'])}")
    print("  (Node-RED column: this run's peer_nodered.sh when --peer; anchors quoted in bench/README.md otherwise)")
    print(f"  other CPU during the runs (s): latency {lat['other_cpu_s']}, throughput {tp['other_cpu_s']} "
          "(large = figures disturbed by other load)")


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="flowd benchmark: figures next to the issue 7 goals.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny counts, for the smoke test (figures meaningless)")
    p.add_argument("--synchronous", choices=("full", "normal"), default="full", help="[database] synchronous")
    p.add_argument("--peer", action="store_true", help="also run Node-RED via peer_nodered.sh")
    p.add_argument("--peer-dir", default="/tmp/peer", help="PEER_DIR for peer_nodered.sh")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON result here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lat-n", type=int, default=500)
    p.add_argument("--tp-n", type=int, default=5000)
    p.add_argument("--tp-c", type=int, default=100)
    p.add_argument("--db-flows", type=int, default=10000, help="flows in the database when its size is read")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--settle", type=float, default=10.0, help="seconds after ready before the idle memory read")
    p.add_argument("--huey-pipelines", type=int, default=20)
    p.add_argument("--huey-burst", type=int, default=400)
    p.add_argument("--huey-noops", type=int, default=2000)
    p.add_argument("--no-huey", action="store_true", help="skip the raw huey runs")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--run-timeout", type=float, default=600.0, help="bound (s) for each client run")
    p.add_argument("--max-seconds", type=int, default=2400, help="bound for the whole run")
    p.add_argument("--profile", metavar="DIR", help="py-spy (raw stacks) on every flowd process during the "
                   "throughput run; needs py-spy in PATH or next to this Python")
    p.add_argument("--daemon-wrapper", metavar="SCRIPT", help="experiments: start the daemon as "
                   "'python SCRIPT run --config X' instead of 'python -m flowd run --config X'")
    p.add_argument("--keep", action="store_true", help="keep the work folder (state, logs)")
    a = p.parse_args(argv)
    if a.quick:
        a.lat_n, a.tp_n, a.tp_c, a.db_flows = 20, 20, 5, 0
        a.idle_seconds, a.settle = min(a.idle_seconds, 1.0), 1.0
        a.huey_pipelines, a.huey_burst, a.huey_noops = 3, 5, 20
        a.run_timeout = min(a.run_timeout, 30.0)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not CLIENT.exists():
        print(f"run_bench: the shared client {CLIENT} is missing (set FLOWD_BENCH_SHARED)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="flowd-bench-", dir="/var/tmp"))
    children = Children()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def on_alarm(signum: int, frame: Any) -> None:
        raise Deadline

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(a.max_seconds)
    bench = Bench(a, work, children)
    started = dt.datetime.now(dt.UTC)
    bench.result.update(engine="flowd", work_dir=str(work), daemon_wrapper=a.daemon_wrapper,
                        date=started.isoformat(timespec="seconds"),
                        machine=machine(),
                        versions=versions(), config={
                            "workers": a.workers, "synchronous": a.synchronous, "quick": a.quick, "lat_n": a.lat_n,
                            "tp_n": a.tp_n, "tp_c": a.tp_c, "broker": "mosquitto set_tcp_nodelay, no persistence"})
    code = 0
    try:
        try:
            bench.measure_flowd()
        finally:
            bench.stop_flowd()
        if a.no_huey:
            bench.result["huey_raw"] = {}
        else:
            bench.measure_huey()
        bench.measure_peer()
    except BenchError as exc:
        log(f"ERROR: {exc}")
        code = 1
    except Deadline:
        log(f"ERROR: the run took longer than --max-seconds {a.max_seconds}")
        code = 1
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        signal.alarm(0)
        children.stop_all()
        if a.keep or code:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if code:
        return code
    r = bench.result
    r["goals"] = goals(r)
    print_table(r)
    line = json.dumps(r, separators=(",", ":"))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
