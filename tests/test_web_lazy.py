"""The console costs no memory until its first visit (issue 12): ``flowd run`` takes the
port at start and imports the web libraries at the first connection, which is served."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import ROOT, flowd_env, wait_for
from webconsole import APPLY, Http, scrape, value

MIB = 1024 * 1024
LOADED = "web console: loaded at the first connection"


def main_pss(pid: int) -> float:
    """The daemon's own anonymous PSS in bytes (Pss_Anon), the median of five readings over
    a second. The console's libraries are pure Python: what they cost is anonymous memory.
    The file-backed part (the interpreter, shared libraries) is shared with every Python
    process on the machine, so its share moves by megabytes with what else runs."""
    readings = []
    for _ in range(5):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            readings.append(next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss_Anon:")))
        time.sleep(0.2)
    return statistics.median(readings)


def listening(pid: int, port: int) -> bool:
    """True if ``pid`` has a TCP socket listening on ``port`` (read from /proc: no connection made)."""
    with open(f"/proc/{pid}/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "0A" for row in rows)


def start_ready(flowd_proc: Any, config: Path) -> Any:
    daemon = flowd_proc(config)
    wait_for(lambda: " ready: " in daemon.log_text(), timeout=30, message="flowd ready")
    return daemon


def apply_routines(config: Path, tmp_path: Path) -> None:
    routines = tmp_path / "routines.toml"
    routines.write_text(APPLY.format(marker=tmp_path / "marker", secret="s"))
    subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config), "apply", str(routines)],
                   check=True, capture_output=True, env=flowd_env(), timeout=60, cwd=str(ROOT))


def test_the_console_costs_no_memory_until_its_first_visit(tmp_path: Path, broker: Any, config_file: Any,
                                                            flowd_proc: Any) -> None:
    # The same daemon with the console off, then on: before any visit, within 2 MiB of PSS
    # (loaded, the console costs about 6 of anonymous memory). The first GET of / and /metrics succeed at once,
    # and the second; only then are the libraries in memory.
    from conftest import free_port

    off = tmp_path / "off.toml"
    config_file(broker=broker, web={"enabled": False}).rename(off)
    port = free_port()
    on = config_file(broker=broker, web={"listen": f"127.0.0.1:{port}", "open_metrics": True})
    apply_routines(on, tmp_path)

    daemon = start_ready(flowd_proc, off)
    time.sleep(2)
    pss_off = main_pss(daemon.pid)
    assert daemon.terminate() == 0

    daemon = start_ready(flowd_proc, on)
    assert listening(daemon.pid, port)  # the port is taken at start, as before
    time.sleep(2)
    pss_on = main_pss(daemon.pid)
    assert LOADED not in daemon.log_text()
    assert pss_on - pss_off < 2 * MIB, (pss_off / MIB, pss_on / MIB)

    client = Http(port)
    started = time.monotonic()
    status, _, page = client.get("/")
    took = time.monotonic() - started
    assert status == 200 and "Overview" in page
    assert took < 5, took  # the import, then the request: never dropped
    assert LOADED in daemon.log_text()
    samples = scrape(client)
    assert value(samples, "flowd_broker_connected") == 1.0
    status, _, page = client.get("/routines")
    assert status == 200 and "leaky" in page
    assert scrape(client)
    assert main_pss(daemon.pid) - pss_on > 3 * MIB  # the libraries are in memory now (the reading can tell)
    assert daemon.terminate() == 0
    assert "flowd stopped" in daemon.log_text()


def test_the_first_scrape_counts_what_ran_before_the_console_loaded(tmp_path: Path, broker: Any,
                                                                    config_file: Any, flowd_proc: Any) -> None:
    # Flows run while nobody has opened the console: its first scrape counts them all,
    # as when the console was loaded at start (the baseline is taken at start).
    from conftest import free_port

    port = free_port()
    config = config_file(broker=broker, web={"listen": f"127.0.0.1:{port}", "open_metrics": True})
    apply_routines(config, tmp_path)
    daemon = start_ready(flowd_proc, config)
    for routine in ("leaky", "leaky", "fragile"):
        done = subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config), "submit", routine,
                               "--wait", "--timeout", "30"], capture_output=True, text=True, env=flowd_env(),
                              timeout=60, cwd=str(ROOT))
        assert done.returncode in (0, 1), done.stderr
    assert LOADED not in daemon.log_text()

    samples = scrape(Http(port))
    assert LOADED in daemon.log_text()
    assert value(samples, "flowd_flows_started_total", routine="leaky") == 2
    assert value(samples, "flowd_flows_started_total", routine="fragile") == 1
    assert value(samples, "flowd_flows_ended_total", routine="fragile", state="FAILED") == 1
    assert value(samples, "flowd_step_duration_seconds_count", routine="fragile", task="needs-marker") == 1
    assert value(samples, "flowd_flows_ended_total", routine="leaky", state="DONE") == 2
    assert value(samples, "flowd_step_duration_seconds_count", routine="leaky", task="quick") == 2
    assert value(samples, "flowd_step_duration_seconds_count", routine="fragile", task="quick") == 1
    assert value(samples, "flowd_flows_started_total", routine="slow") is None
    again = scrape(Http(port))  # counted once
    assert {k: v for k, v in again.items() if k[0].startswith("flowd_flows_")} == \
        {k: v for k, v in samples.items() if k[0].startswith("flowd_flows_")}
