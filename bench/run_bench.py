#!/usr/bin/env python3
"""flowd benchmark (issues 7 and 12): one run, every figure, flowd next to its peers.

It starts a private mosquitto on a free 127.0.0.1 port (``set_tcp_nodelay true``, no
persistence: the broker ``peer_nodered.sh`` uses) and ``flowd run`` on a clean state
folder with two workers, loads the three-step routine ``bench3`` (bench/bench3.toml,
bench/tasks/task_bench.py: the Node-RED peer's flow) and measures, with the shared
engine-agnostic client ``mqtt_flow_bench.py``:

* start-up: launching ``flowd run`` -> first result (the client's ``--probe``);
* memory: PSS and RSS of every flowd process (the daemon's process tree), idle and
  after the runs; idle CPU over ``--idle-seconds``;
* latency (C=1) and throughput (C=100) runs, submit -> ``flow/<id>/result``; per flow:
  CPU of all flowd processes and bytes written (``/proc/PID/io``), children included;
* the database size after ``--db-flows`` flows;
* a counted pass (a second daemon start, not timed): SQL statements and transactions per
  flow (bench/instrument/sitecustomize.py on the daemon's PYTHONPATH) and fsync-family
  calls per flow (bench/instrument/synccount.c, LD_PRELOAD), at C=1 and at C=100;
* with ``--peer``: Node-RED (``peer_nodered.sh``) and DBOS (``peer_dbos.sh``), each with its
  own broker and ports, same N and C; their engine process's PSS and bytes written are read
  here while the script runs, and DBOS gets a counted pass of its own;
* raw huey (bench/huey_raw.py) with huey's default polling and a tuned one.

It prints the tables and one JSON line (also written to ``--json-out``). Every child is
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
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SHARED = Path(os.environ.get("FLOWD_BENCH_SHARED", "/work/shared/bench"))
CLIENT = SHARED / "mqtt_flow_bench.py"
PEER_SCRIPTS = {"nodered": SHARED / "peer_nodered.sh", "dbos": SHARED / "peer_dbos.sh"}
PEER_NAMES = {"nodered": "Node-RED", "dbos": "DBOS"}
INSTRUMENT = BENCH / "instrument"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

sys.path.insert(0, str(INSTRUMENT))
import benchcount  # noqa: E402 - bench/instrument: the counters' file layout

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
    """``root`` and all its descendants (the workers)."""
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
    """utime+stime of ``pids``, plus cutime+cstime: the CPU of their children that have ended
    and been reaped (the kernel adds it to the reaping parent). Summed over a whole live tree
    this counts every process of the tree once, ended workers included."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")


def io_counters(pids: list[int]) -> dict[str, int]:
    """/proc/PID/io summed over ``pids``. A process's counters include those of its children
    that have ended and been reaped (added to the parent at reaping, like cutime), so over a
    whole live tree the sum keeps what ended workers wrote."""
    total = dict.fromkeys(IO_KEYS, 0)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in total:
                        total[key] += int(value)
        except (OSError, ValueError):
            pass
    return total


def pss_mib(pid: int) -> float:
    return round(_read_kib(f"/proc/{pid}/smaps_rollup", ("Pss",))["Pss"] / 1024, 1)


def cpu_by_role(root: int, pids: list[int]) -> dict[str, float]:
    """CPU seconds of the daemon (main), a pool process if there is one (a child of the
    daemon with children: flowd before issue 12), and the workers, so a run's cost can be
    split between them."""
    pool = [pid for pid in pids if _ppid(pid) == root and any(_ppid(other) == pid for other in pids)]
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


# ---------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, children: Children):
        self.args = args
        self.work = work
        self.children = children
        self.port = free_port()
        self.web_port = free_port()
        self.state = work / "state"
        self.config = work / "flowd.toml"
        self.mosq: subprocess.Popen[Any] | None = None
        self.daemon: subprocess.Popen[Any] | None = None
        self.result: dict[str, Any] = {}
        self.shim: Path | None = None
        self.shim_tried = False
        # counter files: memory-mapped, so on a tmpfs (written to memory, not to the disk)
        shm = Path("/dev/shm")
        self.count_root = Path(tempfile.mkdtemp(prefix="flowd-bench-counts-", dir=shm if shm.is_dir() else work))

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
            "", "[database]", f'synchronous = "{a.synchronous}"',
            "", "[web]", f"enabled = {'true' if a.web == 'on' else 'false'}", f'listen = "127.0.0.1:{self.web_port}"',
            "open_metrics = true", ""]))

    def apply_routine(self) -> None:
        routines = BENCH / "bench3.toml"
        if self.args.status != "steps":  # the routine's status setting (SPEC 4.4); steps is the default
            text = routines.read_text().replace("[routines.bench3]\n",
                                                f'[routines.bench3]\nstatus = "{self.args.status}"\n')
            routines = self.work / "bench3.toml"
            routines.write_text(text)
        code, out, err = run_child(self.children, "flowctl apply",
                                   [sys.executable, "-m", "flowd.cli.cli", "--config", str(self.config), "apply",
                                    str(routines)], 60, cwd=ROOT)
        if code != 0:
            raise BenchError(f"flowctl apply failed ({code}): {err.strip() or out.strip()}")

    def client_cmd(self, label: str, *extra: str, timeout: float | None = None) -> list[str]:
        return [sys.executable, str(CLIENT), "--host", "127.0.0.1", "--port", str(self.port), *SUBMIT,
                "--timeout", str(timeout or self.args.run_timeout), "--label", label, *extra]

    def start_daemon(self, env: dict[str, str] | None = None, log_name: str = "flowd.log") -> float:
        """Probe first, then launch flowd: start-up = launch -> first result (ms, returned)."""
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
            log_file=self.work / log_name, env=env)
        try:
            probe.wait(70)
        except subprocess.TimeoutExpired:
            pass
        self.children.stop(probe)
        if probe.returncode != 0 or self.daemon.poll() is not None:
            raise BenchError(f"flowd never answered the probe (see {self.work}/{log_name}): "
                             f"{probe_out.read_text()[-300:]}")
        first = last_json(probe_out.read_text())["first_result_epoch_ns"]
        startup = round((first - t0) / 1e6, 1)
        log(f"flowd pid {self.daemon.pid}: first result {startup} ms after launch")
        return startup

    def daemon_entry(self) -> list[str]:
        """``-m flowd``, or a wrapper script for experiments (--daemon-wrapper): it gets the same
        arguments and is expected to end in ``flowd.service.service.main()``."""
        return [self.args.daemon_wrapper] if self.args.daemon_wrapper else ["-m", "flowd"]

    def tree(self) -> list[int]:
        assert self.daemon is not None
        if self.daemon.poll() is not None:
            raise BenchError(f"flowd died (status {self.daemon.returncode}); see {self.work}/flowd.log")
        return process_tree(self.daemon.pid)

    # -------------------------------------------------------------- measurements
    def run_client(self, label: str, count: int, concurrency: int, counts: Path | None = None) -> dict[str, Any]:
        """One client run. CPU and /proc/PID/io of the daemon's whole tree are read before the
        run and ``--tail`` seconds after it (the outbox deletes and checkpoints that follow the
        last result belong to the run); with ``counts``, the counter files too."""
        assert self.mosq is not None
        assert self.daemon is not None
        tree0 = self.tree()
        role0 = cpu_by_role(self.daemon.pid, tree0)
        io0, c0 = io_counters(tree0), benchcount.snapshot(counts) if counts else None
        eng0, brk0, sys0 = cpu_seconds(tree0), cpu_seconds([self.mosq.pid]), system_busy_seconds()
        code, out, err = run_child(self.children, label, self.client_cmd(
            label, "--count", str(count), "--concurrency", str(concurrency), "--quiet"), self.args.run_timeout + 30)
        if code != 0:
            raise BenchError(f"client run {label} failed ({code}): {(err or out).strip()[-500:]}")
        r = last_json(out)
        time.sleep(self.args.tail)
        tree = self.tree()
        eng1, io1 = cpu_seconds(tree), io_counters(tree)
        c1 = benchcount.snapshot(counts) if counts else None
        n = max(1, r["received"])
        r["engine_cpu_s"] = round(eng1 - eng0, 2)
        r["cpu_ms_per_flow"] = round(1000 * (eng1 - eng0) / n, 3)
        role1 = cpu_by_role(self.daemon.pid, tree)
        r["engine_cpu_ms_per_flow"] = {k: round(1000 * (role1[k] - role0[k]) / n, 3) for k in role1}
        r["io"] = {k: io1[k] - io0[k] for k in IO_KEYS}
        r["write_bytes_per_flow"] = round(r["io"]["write_bytes"] / n)
        r["wchar_per_flow"] = round(r["io"]["wchar"] / n)
        r["processes"] = {"before": len(tree0), "after": len(tree),
                          "ended": len(set(tree0) - set(tree)), "started": len(set(tree) - set(tree0))}
        r["broker_cpu_s"] = round(cpu_seconds([self.mosq.pid]) - brk0, 2)
        busy = system_busy_seconds() - sys0
        r["other_cpu_s"] = round(max(0.0, busy - r["engine_cpu_s"] - r["broker_cpu_s"] - (r["client_cpu_s"] or 0)), 2)
        if c0 is not None and c1 is not None:
            r["counts"] = benchcount.summarize(benchcount.delta(c0, c1), r["received"])
        log(f"{label}: N={count} C={concurrency}: {r['received']} results, {r['throughput_rps']} results/s, "
            f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms, lost {r['lost']}, dup {r['duplicates']}; "
            f"{r['cpu_ms_per_flow']} ms CPU, {r['write_bytes_per_flow']} B written per flow"
            + (f"; {r['counts']['statements_per_flow']} statements, {r['counts']['write_transactions_per_flow']} "
               f"write transactions, {r['counts']['fsyncs_per_flow']} fsyncs per flow" if "counts" in r else ""))
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
                spy, "record", "--nonblocking", "--gil", "--format", "raw", "--rate", "250", "--pid", str(pid),
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
        self.result["startup_ms"] = self.start_daemon()
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

        scraper = MetricsScraper(self.web_port, a.web_scrape if a.web == "on" else 0.0)
        self.result["latency"] = self.run_client("flowd-latency", a.lat_n, 1)
        spies = self.profile_start()
        tp = self.run_client("flowd-throughput", a.tp_n, a.tp_c)
        self.profile_stop(spies)
        self.result["web"] = {"enabled": a.web == "on", **scraper.stop()}
        self.result["throughput"] = tp
        self.result["disk_write_bytes_per_flow"] = tp["write_bytes_per_flow"]
        after = memory(self.tree())
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
        self.measure_counts()

    # -------------------------------------------------------------- counted pass
    def build_shim(self) -> Path | None:
        """Compile bench/instrument/synccount.c (the fsync counter) into the work folder."""
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            log("no C compiler (apt-get install gcc): fsyncs are not counted")
            return None
        out = self.work / "synccount.so"
        code, _, err = run_child(self.children, "cc synccount.c", [
            cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(INSTRUMENT / "synccount.c"), "-ldl", "-lpthread"], 60)
        if code != 0:
            log(f"synccount.c did not build, fsyncs are not counted: {err.strip()[-300:]}")
            return None
        return out

    def counted_env(self, folder: Path) -> dict[str, str]:
        """Environment of a counted process: the SQL counter (sitecustomize on PYTHONPATH) and
        the fsync counter (LD_PRELOAD), both writing into ``folder``."""
        if self.shim is None and not self.shim_tried:
            self.shim, self.shim_tried = self.build_shim(), True
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(INSTRUMENT), *filter(None, [env.get("PYTHONPATH")])])
        env[benchcount.ENV_DIR] = str(folder)
        if self.shim is not None:
            env["LD_PRELOAD"] = " ".join([str(self.shim), *filter(None, [env.get("LD_PRELOAD")])])
        return env

    def measure_counts(self) -> None:
        """The counted pass: the daemon restarted on the same state folder with the counters
        loaded; an idle window, a C=1 run and a C=100 run. Its timings are not reported as
        flowd's (the trace callback costs CPU); its counts are."""
        a = self.args
        if a.no_counts:
            self.result["counts"] = None
            return
        folder = self.count_root / "flowd"
        env = self.counted_env(folder)
        assert self.daemon is not None
        self.children.stop(self.daemon, signal.SIGTERM, wait=20)
        self.daemon = None
        log("counted pass: flowd restarted with the SQL and fsync counters")
        startup = self.start_daemon(env=env, log_name="flowd-counted.log")
        time.sleep(min(a.settle, 2.0))
        s0, t0 = benchcount.snapshot(folder), time.monotonic()
        time.sleep(a.count_idle_seconds)
        idle = benchcount.summarize(benchcount.delta(s0, benchcount.snapshot(folder)), 1)
        seconds = time.monotonic() - t0
        lat = self.run_client("flowd-counted-c1", a.count_lat_n, 1, counts=folder)
        tp = self.run_client("flowd-counted-c100", a.count_tp_n, a.tp_c, counts=folder)
        timing = ("throughput_rps", "p50_ms", "p99_ms", "cpu_ms_per_flow", "received", "lost")
        self.result["counts"] = {
            "method": "SQL: sqlite3 trace callback (bench/instrument/sitecustomize.py); fsync, fdatasync, "
                      "sync_file_range, syncfs: LD_PRELOAD bench/instrument/synccount.c"
                      + ("" if self.shim else " (not built: fsyncs not counted)"),
            "fsyncs_counted": self.shim is not None,
            "c1": lat["counts"], "c100": tp["counts"],
            "idle_per_second": {"seconds": round(seconds, 1),
                                "statements": round(idle["statements_per_flow"] / seconds, 2),
                                "write_transactions": round(idle["write_transactions_per_flow"] / seconds, 2),
                                "fsyncs": round(idle["fsyncs_per_flow"] / seconds, 2)},
            "instrumented_timing": {"startup_ms": startup, "c1": {k: lat[k] for k in timing},
                                    "c100": {k: tp[k] for k in timing}},
        }

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

    def measure_peers(self) -> None:
        self.result["peers"] = {}
        for name in self.args.peers:
            try:
                peer = self.run_peer(name)
                if name == "dbos" and not self.args.no_counts:
                    counted = self.run_peer(name, counted=True)
                    peer["counts"] = {"c1": counted["runs"]["latency"].get("counts"),
                                      "c100": counted["runs"]["throughput"].get("counts"),
                                      "instrumented_timing": {k: counted["per_flow"][k] for k in (
                                          "throughput_rps", "latency_p50_ms", "cpu_ms_per_flow")}}
                self.result["peers"][name] = peer
            except BenchError as exc:  # flowd's figures stand without the peer
                log(f"{PEER_NAMES[name]} peer not measured: {exc}")
                self.result["peers"][name] = {"error": str(exc)}

    def run_peer(self, name: str, counted: bool = False) -> dict[str, Any]:
        """Run one shared peer script (its own broker and ports, same N and C as flowd) while a
        PeerWatch reads its engine process's /proc figures."""
        a = self.args
        script = PEER_SCRIPTS[name]
        peer_dir = Path(a.peer_dir)
        results_root = peer_dir / "results"
        known = set(os.listdir(results_root)) if results_root.is_dir() else set()
        env = {**os.environ, "PEER_DIR": str(peer_dir), "RUN_TIMEOUT": str(int(a.run_timeout)),
               "BROKER_PORT": str(free_port()), "LAT_N": str(a.lat_n), "TP_N": str(a.tp_n), "TP_C": str(a.tp_c),
               "IDLE_SETTLE": str(max(1, round(a.settle)))}
        folder = None
        markers: tuple[str, ...]
        if name == "nodered":
            env["NR_PORT"] = str(free_port())
            labels, markers = ("nodered-latency", "nodered-throughput"), ("red.js", "node-red")
        else:
            env.update(LAT_WARMUP="0", TP_WARMUP="0", BASELINE="0", FSYNC_N="0",
                       STATE_DIR=str(self.work / ("dbos-state-counted" if counted else "dbos-state")))
            labels, markers = ("dbos-latency", "dbos-throughput"), ("bridge.py",)
        if counted:
            folder = self.count_root / name
            env.update(self.counted_env(folder))
            env.update(LAT_N=str(a.count_lat_n), TP_N=str(a.count_tp_n), IDLE_SETTLE="1")
        what = f"{PEER_NAMES[name]} peer{' (counted pass)' if counted else ''}: {script.name}"
        log(f"{what} (installs into {peer_dir} on first use)")
        proc = self.children.start(what, ["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env, group=True)
        watch = PeerWatch(results_root, known, proc.pid, markers, labels, folder)
        watch.start()
        try:
            out, err = proc.communicate(timeout=2 * a.run_timeout + 600)
        except subprocess.TimeoutExpired:
            self.children.stop(proc, signal.SIGKILL)
            raise BenchError(f"{script.name} did not finish in time") from None
        finally:
            watch.stop_event.set()
            watch.join(5)
        self.children.stop(proc)
        (self.work / f"peer-{name}{'-counted' if counted else ''}.err").write_text(err)
        if proc.returncode != 0:
            raise BenchError(f"{script.name} failed ({proc.returncode}): {err.strip()[-500:]}")
        summary = last_json(out)
        runs = {}
        for kind, label in zip(("latency", "throughput"), labels, strict=True):
            run = dict(summary["runs"][label])
            mark = watch.marks.get(label, {})
            if watch.engine is not None and "start" in mark and "end" in mark:
                n = max(1, run["received"])
                io = {k: mark["end"]["io"][k] - mark["start"]["io"][k] for k in IO_KEYS}
                run.update(io=io, write_bytes_per_flow=round(io["write_bytes"] / n),
                           wchar_per_flow=round(io["wchar"] / n),
                           watched_cpu_ms_per_flow=round(1000 * (mark["end"]["cpu_s"] - mark["start"]["cpu_s"]) / n, 3),
                           watched_seconds=round(mark["end"]["t"] - mark["start"]["t"], 2))
                if folder is not None:
                    run["counts"] = benchcount.summarize(
                        benchcount.delta(mark["start"]["counts"], mark["end"]["counts"]), run["received"])
            runs[kind] = run
        lat, tp = runs["latency"], runs["throughput"]
        per_flow = {
            "throughput_rps": tp["throughput_rps"], "latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
            "cpu_ms_per_flow": round(1000 * tp["engine_cpu_s"] / max(1, tp["received"]), 3),
            "write_bytes_per_flow": tp.get("write_bytes_per_flow"), "wchar_per_flow": tp.get("wchar_per_flow"),
            "pss_idle_mib": watch.pss_idle, "rss_idle_mib": summary.get("rss_idle_mib"),
            "lost": lat["lost"] + tp["lost"], "duplicates": lat["duplicates"] + tp["duplicates"],
            "other_cpu_s": tp.get("other_cpu_s"),
        }
        if watch.error or watch.engine is None:
            log(f"{what}: engine process not watched ({watch.error or 'not found'}): no PSS / bytes written")
        log(f"{what}: {per_flow['throughput_rps']} results/s at C={a.tp_c}, C=1 p50 {per_flow['latency_p50_ms']} "
            f"p99 {per_flow['latency_p99_ms']} ms, {per_flow['cpu_ms_per_flow']} ms CPU and "
            f"{per_flow['write_bytes_per_flow']} B written per flow, PSS idle {per_flow['pss_idle_mib']} MiB")
        return {"summary": summary, "engine_pid": watch.engine, "watch_error": watch.error, "runs": runs,
                "per_flow": per_flow}


class PeerWatch(threading.Thread):
    """Reads a peer engine's /proc figures while its script runs.

    The script's results folder gets ``<label>.out`` as a client run starts (the shell creates
    the file before the client starts) and ``<label>.cpu`` right after the client has ended;
    both are polled every 50 ms. At each start and end: the engine process's /proc/PID/io, its
    CPU and (counted pass) its counter files; when the first (latency) run starts, its PSS:
    the script has let the engine settle ``IDLE_SETTLE`` seconds since its first result, as
    flowd's idle figure does. The engine is the process of the script's session whose command
    line contains one of ``markers`` (Node-RED renames its process to "node-red")."""

    def __init__(self, results_root: Path, known: set[str], sid: int, markers: tuple[str, ...],
                 labels: tuple[str, ...], counts: Path | None):
        super().__init__(name="peer-watch", daemon=True)
        self.results_root, self.known, self.sid, self.markers = results_root, known, sid, markers
        self.labels, self.counts = labels, counts
        self.stop_event = threading.Event()
        self.out_dir: Path | None = None
        self.engine: int | None = None
        self.pss_idle: float | None = None
        self.marks: dict[str, dict[str, Any]] = {}
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.wait(0.05):
                self.poll()
        except Exception as exc:  # reported with the peer's figures
            self.error = repr(exc)

    def poll(self) -> None:
        if self.out_dir is None:
            if not self.results_root.is_dir():
                return
            new = sorted(d for d in os.listdir(self.results_root)
                         if d not in self.known and (self.results_root / d).is_dir())
            if not new:
                return
            self.out_dir = self.results_root / new[-1]
        for label in self.labels:
            mark = self.marks.setdefault(label, {})
            if "start" not in mark and (self.out_dir / f"{label}.out").exists():
                if self.engine is None:
                    self.engine = self.find_engine()
                    if self.engine is not None:
                        self.pss_idle = pss_mib(self.engine)
                mark["start"] = self.snap()
            if "start" in mark and "end" not in mark and (self.out_dir / f"{label}.cpu").exists():
                mark["end"] = self.snap()

    def find_engine(self) -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    sid = int(f.read().rsplit(")", 1)[1].split()[3])
                if sid != self.sid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                if any(m.encode() in cmdline for m in self.markers):
                    return int(entry)
            except (OSError, IndexError, ValueError):
                continue
        return None

    def snap(self) -> dict[str, Any]:
        pids = [self.engine] if self.engine is not None else []
        return {"t": time.monotonic(), "cpu_s": cpu_seconds(pids), "io": io_counters(pids),
                "counts": benchcount.snapshot(self.counts, set(pids)) if self.counts else None}


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
        code = subprocess.run([*git, "log", "-1", "--format=%h", "--", "flowd"], capture_output=True, text=True,
                              timeout=5)
        found["flowd_code_commit"] = code.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
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
    peer = (r.get("peers") or {}).get("nodered") or {}
    if "error" in peer:
        print(f"  Node-RED peer failed: {peer['error']}")
    peer = peer.get("summary") or {}
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
        ("engine CPU per flow, throughput (ms)", tp["cpu_ms_per_flow"], "",
         round(1000 * nt["engine_cpu_s"] / max(1, nt["received"]), 3) if nt else None, ""),
        ("  of which main / pool / workers (ms)", " / ".join(str(v) for v in tp["engine_cpu_ms_per_flow"].values()),
         "", None, ""),
        ("disk writes per flow, throughput (bytes)", r["disk_write_bytes_per_flow"], "", None, ""),
        (f"database after {r['db_flows']} flows (MiB)", r["db_mib"], "", None, ""),
    ]
    print()
    print(f"flowd benchmark {r['date']}  ({r['machine']['cores']} cores, {r['machine']['cpu']}; "
          f"flowd {r['versions']['flowd_commit']} (flowd/ last changed in {r['versions'].get('flowd_code_commit')}); "
          f"workers={r['config']['workers']}, "
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


# figures compared per flow (issue 12): key, label, better when ("high" / "low")
PER_FLOW = (
    ("throughput_rps", "throughput C={c} (results/s)", "high"),
    ("latency_p50_ms", "latency C=1 p50 (ms)", "low"),
    ("latency_p99_ms", "latency C=1 p99 (ms)", "low"),
    ("cpu_ms_per_flow", "CPU per flow, C={c}, all processes (ms)", "low"),
    ("write_bytes_per_flow", "bytes written per flow, C={c} (write_bytes)", "low"),
    ("wchar_per_flow", "  wchar per flow, C={c} (bytes)", "low"),
    ("write_transactions_per_flow", "write transactions per flow, C={c}", "low"),
    ("transactions_per_flow", "  all transactions per flow, C={c}", "low"),
    ("fsyncs_per_flow", "fsyncs per flow, C={c} (fsync+fdatasync)", "low"),
    ("statements_per_flow", "SQL statements per flow, C={c}", "low"),
    ("write_transactions_per_flow_c1", "write transactions per flow, C=1", "low"),
    ("fsyncs_per_flow_c1", "fsyncs per flow, C=1", "low"),
    ("statements_per_flow_c1", "SQL statements per flow, C=1", "low"),
    ("pss_idle_mib", "PSS idle, all processes (MiB)", "low"),
    ("other_cpu_s", "other load: CPU of other processes, C={c} run (s)", None),
)
COUNT_KEYS = ("write_transactions_per_flow", "transactions_per_flow", "fsyncs_per_flow", "statements_per_flow")


def _with_counts(fig: dict[str, Any], counts: dict[str, Any] | None, fsyncs_counted: bool = True) -> dict[str, Any]:
    for suffix, key in (("", "c100"), ("_c1", "c1")):
        c = (counts or {}).get(key) or {}
        for k in COUNT_KEYS:
            value = c.get(k)
            fig[k + suffix] = None if (k == "fsyncs_per_flow" and not fsyncs_counted) else value
    return fig


def comparison(r: dict[str, Any]) -> dict[str, Any]:
    """Per-flow figures of flowd and each peer measured in this run, flowd / peer ratios, and
    the issue 12 goals that can be judged from one run."""
    tp, lat = r["throughput"], r["latency"]
    counts = r.get("counts") or {}
    engines = {"flowd": _with_counts({
        "throughput_rps": tp["throughput_rps"], "latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
        "cpu_ms_per_flow": tp["cpu_ms_per_flow"], "write_bytes_per_flow": tp["write_bytes_per_flow"],
        "wchar_per_flow": tp["wchar_per_flow"], "pss_idle_mib": r["pss_idle_mib"], "other_cpu_s": tp["other_cpu_s"]},
        counts, counts.get("fsyncs_counted", False))}
    for name, peer in (r.get("peers") or {}).items():
        if "per_flow" not in peer:
            continue
        fig = dict(peer["per_flow"])
        if name == "nodered":  # keeps flows in memory: no database, nothing to count
            fig.update({k + s: 0 for k in COUNT_KEYS if k != "fsyncs_per_flow" for s in ("", "_c1")})
        else:
            _with_counts(fig, peer.get("counts"), counts.get("fsyncs_counted", True))
        engines[name] = fig
    ratios: dict[str, dict[str, float | None]] = {}
    f = engines["flowd"]
    for name, fig in engines.items():
        if name == "flowd":
            continue
        ratios[name] = {key: (round(f[key] / fig[key], 3) if isinstance(f.get(key), (int, float)) and
                              isinstance(fig.get(key), (int, float)) and fig[key] and better else None)
                        for key, _, better in PER_FLOW}
    goals12: dict[str, Any] = {}

    def goal(key: str, text: str, value: Any, ok: bool | None) -> None:
        goals12[key] = {"goal": text, "value": value, "met": ok}

    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

    nr, db = ratios.get("nodered", {}), ratios.get("dbos", {})
    goal("throughput_vs_nodered", ">= 0.5x Node-RED", nr.get("throughput_rps"), at_least(nr.get("throughput_rps"), 0.5))
    goal("throughput_vs_dbos", ">= 5x DBOS", db.get("throughput_rps"), at_least(db.get("throughput_rps"), 5))
    p50 = db.get("latency_p50_ms")
    goal("latency_p50_vs_dbos", "<= 0.5x DBOS", p50, None if p50 is None else p50 <= 0.5)
    goal("write_bytes_per_flow", "<= 16384", f["write_bytes_per_flow"], f["write_bytes_per_flow"] <= 16384)
    goal("cpu_ms_per_flow", "<= 0.6", f["cpu_ms_per_flow"], f["cpu_ms_per_flow"] <= 0.6)
    goal("pss_idle_mib", "<= 40", f["pss_idle_mib"], f["pss_idle_mib"] <= 40)
    return {"engines": engines, "ratios": ratios, "goals_issue12": goals12}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_comparison(r: dict[str, Any]) -> None:
    cmp = r["comparison"]
    engines, ratios, g12 = cmp["engines"], cmp["ratios"], cmp["goals_issue12"]
    names = list(engines)
    goal_rows = {"throughput_rps": ["throughput_vs_nodered", "throughput_vs_dbos"],
                 "latency_p50_ms": ["latency_p50_vs_dbos"], "write_bytes_per_flow": ["write_bytes_per_flow"],
                 "cpu_ms_per_flow": ["cpu_ms_per_flow"], "pss_idle_mib": ["pss_idle_mib"]}
    print()
    print(f"per flow: flowd (synchronous={r['config']['synchronous']}) and its peers, this one command "
          f"(C={r['config']['tp_c']} N={r['config']['tp_n']}, C=1 N={r['config']['lat_n']})")
    print("  ratio = flowd / peer: above 1 is better for throughput, below 1 is better for everything else")
    head = f"  {'figure':<50}" + "".join(f"{PEER_NAMES.get(n, n):>11}" for n in names)
    head += "".join(f"{'flowd/' + PEER_NAMES.get(n, n)[:4]:>12}" for n in names[1:]) + "   goal (issue 12)"
    print(head)
    for key, label, _ in PER_FLOW:
        label = label.format(c=r["config"]["tp_c"])
        line = f"  {label:<50}" + "".join(f"{_fmt(engines[n].get(key)):>11}" for n in names)
        line += "".join(f"{_fmt(ratios[n].get(key)) + ('x' if ratios[n].get(key) is not None else ''):>12}"
                        for n in names[1:])
        marks = []
        for gk in goal_rows.get(key, []):
            gv = g12[gk]
            marks.append(f"{gv['goal']}: {'-' if gv['met'] is None else ('ok' if gv['met'] else 'MISSED')}")
        print(line + ("   " + "; ".join(marks) if marks else ""))
    counts = r.get("counts")
    if counts:
        c = counts["c100"]
        by_db = ", ".join(f"{db} {v['statements']} statements / {v['write_transactions']} write tx"
                          for db, v in c["by_database"].items())
        by_file = ", ".join(f"{fn} {v['syncs']}" for fn, v in c["syncs_by_file"].items()) or "-"
        print(f"  flowd at C={r['config']['tp_c']} per flow, by database: {by_db}; fsyncs by file: {by_file}")
        idle = counts["idle_per_second"]
        print(f"  flowd idle ({idle['seconds']:g} s): {idle['statements']} statements, {idle['write_transactions']} "
              f"write transactions, {idle['fsyncs']} fsyncs per second")
    for name, peer in (r.get("peers") or {}).items():
        if "error" in peer:
            print(f"  {PEER_NAMES[name]} peer failed: {peer['error']}")
    print("  CPU and bytes: the whole process tree (children included) over the run; counts: a separate "
          "counted pass (not timed). Node-RED keeps flows in memory (no database); its fsyncs are not counted.")


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="flowd benchmark: figures next to the issue 7 goals.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny counts, for the smoke test (figures meaningless)")
    p.add_argument("--synchronous", choices=("full", "normal"), default="full", help="[database] synchronous")
    p.add_argument("--status", choices=("steps", "states", "off"), default="steps",
                   help="the bench routine's status setting (SPEC 4.4)")
    p.add_argument("--peer", action="store_true", help="also run the peers, Node-RED (peer_nodered.sh) and DBOS "
                   "(peer_dbos.sh), with the same N and C")
    p.add_argument("--peers", default="nodered,dbos", help="which peers --peer runs (comma-separated)")
    p.add_argument("--peer-dir", default="/tmp/peer", help="PEER_DIR of the peer scripts (their installs, reused)")
    p.add_argument("--no-counts", action="store_true", help="skip the counted passes (statements, transactions, "
                   "fsyncs)")
    p.add_argument("--count-lat-n", type=int, default=200, help="flows of the counted C=1 run")
    p.add_argument("--count-tp-n", type=int, default=2000, help="flows of the counted C=100 run")
    p.add_argument("--count-idle-seconds", type=float, default=5.0, help="idle window of the counted pass")
    p.add_argument("--tail", type=float, default=1.0, help="seconds after a client run before its CPU, bytes and "
                   "counts are read (outbox deletes, checkpoints)")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON result here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--web", choices=("on", "off"), default="on", help="[web] enabled: the console (default on)")
    p.add_argument("--web-scrape", type=float, default=5.0, metavar="S",
                   help="with --web on, GET /metrics once before the runs and every S seconds during them, "
                   "as Prometheus would (0: never)")
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
    p.add_argument("--profile", metavar="DIR", help="py-spy (raw stacks of the thread holding the GIL: Python "
                   "CPU) on every flowd process during the throughput run; needs py-spy in PATH or next to this Python")
    p.add_argument("--daemon-wrapper", metavar="SCRIPT", help="experiments: start the daemon as "
                   "'python SCRIPT run --config X' instead of 'python -m flowd run --config X'")
    p.add_argument("--keep", action="store_true", help="keep the work folder (state, logs)")
    a = p.parse_args(argv)
    if a.quick:
        a.lat_n, a.tp_n, a.tp_c, a.db_flows = 20, 20, 5, 0
        a.idle_seconds, a.settle = min(a.idle_seconds, 1.0), 1.0
        a.huey_pipelines, a.huey_burst, a.huey_noops = 3, 5, 20
        a.run_timeout = min(a.run_timeout, 30.0)
        a.count_lat_n, a.count_tp_n, a.count_idle_seconds, a.tail = 10, 20, 0.5, 0.3
    names = [n.strip() for n in a.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEER_SCRIPTS]
    if unknown:
        p.error(f"--peers: unknown {', '.join(unknown)} (known: {', '.join(PEER_SCRIPTS)})")
    a.peers = names if a.peer else []
    return a


class MetricsScraper:
    """GETs the console's /metrics every ``every`` seconds on a thread (0: does nothing).

    The first GET is made at once, before the timed runs, as a Prometheus scraping since
    the daemon's start would have made it: the console loads its web stack at its first
    visit (0.4-1.2 s of the daemon's CPU, once), and a first scrape landing inside a
    5,000-flow run moved its CPU per flow by up to 0.08 ms. Its time is kept apart."""

    def __init__(self, port: int, every: float):
        self.port, self.every = port, every
        self.times: list[float] = []
        self.errors = 0
        self.first_ms: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if every > 0 else None
        if self._thread is not None:
            start = time.perf_counter()
            if self._scrape():
                self.first_ms = round((time.perf_counter() - start) * 1000, 1)
            else:
                self.errors += 1
            self._thread.start()

    def _scrape(self) -> bool:
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", "/metrics")
            ok = bool(conn.getresponse().read())
            conn.close()
        except OSError:
            ok = False
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            start = time.perf_counter()
            if self._scrape():
                self.times.append(time.perf_counter() - start)
            else:
                self.errors += 1

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        ms = sorted(t * 1000 for t in self.times)
        return {"scrape_every_s": self.every, "first_scrape_ms": self.first_ms, "scrapes": len(ms),
                "scrape_errors": self.errors,
                "scrape_ms_p50": round(ms[len(ms) // 2], 1) if ms else None,
                "scrape_ms_max": round(ms[-1], 1) if ms else None}


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
                            "workers": a.workers, "synchronous": a.synchronous, "status": a.status, "quick": a.quick,
                            "lat_n": a.lat_n, "tp_n": a.tp_n, "tp_c": a.tp_c, "peers": a.peers,
                            "count_lat_n": a.count_lat_n, "count_tp_n": a.count_tp_n, "tail_s": a.tail,
                            "broker": "mosquitto set_tcp_nodelay, no persistence"})
    code = 0
    t_start = time.monotonic()
    try:
        try:
            bench.measure_flowd()
        finally:
            bench.stop_flowd()
        bench.measure_peers()
        if a.no_huey:
            bench.result["huey_raw"] = {}
        else:
            bench.measure_huey()
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
            log(f"work folder kept: {work}; counter files: {bench.count_root}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(bench.count_root, ignore_errors=True)
    if code:
        return code
    r = bench.result
    r["run_seconds"] = round(time.monotonic() - t_start, 1)
    r["goals"] = goals(r)
    r["comparison"] = comparison(r)
    print_table(r)
    print_comparison(r)
    line = json.dumps(r, separators=(",", ":"))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
