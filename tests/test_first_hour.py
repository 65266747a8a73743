"""A new user's first hour (SPEC 6, 8): the same database from any folder, no empty
database made by accident, refusals instead of silent replacement, examples that are
safe to apply, a FAILED flow in the warnings, a hint when the broker is not there."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, flowd_env, wait_for, write_config

from flowd.config import load_config

Run = Callable[..., subprocess.CompletedProcess[str]]


def flowctl_in(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real flowctl, run from ``folder``."""
    return subprocess.run([sys.executable, "-m", "flowd.cli.cli", *args], capture_output=True, text=True,
                          env=flowd_env(env), cwd=str(folder), timeout=60)


def python_in(folder: Path, code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=flowd_env(env),
                          cwd=str(folder), timeout=60)


# ---------------------------------------------------------------------- paths
def test_relative_paths_in_a_file_are_beside_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "secret.txt").write_text("pw\n")
    path = write_config(site / "flowd.toml", {
        "flowd": {"state_dir": "state", "task_paths": ["tasks", "/opt/flowd-tasks"]},
        "mqtt": {"password_file": "secret.txt"},
        "mqtt.tls": {"ca": "tls/ca.pem", "cert": "/etc/c.pem"},
        "database": {"url": "sqlite:///db/flowd.db"},
        "queue": {"path": "q/queue.db"},
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path, env={})
    assert config.flowd.state_dir == str(site / "state")
    assert config.flowd.task_paths == (str(site / "tasks"), "/opt/flowd-tasks")
    assert config.database.url == f"sqlite:///{site / 'db' / 'flowd.db'}"
    assert config.queue.path == str(site / "q" / "queue.db")
    assert config.mqtt.password == "pw" and config.mqtt.password_file == str(site / "secret.txt")
    assert config.mqtt.tls is not None and (config.mqtt.tls.ca, config.mqtt.tls.cert) == (str(site / "tls/ca.pem"),
                                                                                            "/etc/c.pem")


def test_defaults_sit_beside_the_file_or_beside_its_config_folder(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "config").mkdir(parents=True)
    alone = load_config(write_config(tmp_path / "a" / "flowd.toml", {}), env={})
    assert (alone.flowd.state_dir, alone.flowd.task_paths) == (str(tmp_path / "a" / "var"),
                                                               (str(tmp_path / "a" / "tasks"),))
    project = load_config(write_config(tmp_path / "b" / "config" / "flowd.toml", {}), env={})
    assert (project.flowd.state_dir, project.flowd.task_paths) == (str(tmp_path / "b" / "var"),
                                                                   (str(tmp_path / "b" / "tasks"),))
    assert project.database.url == f"sqlite:///{tmp_path / 'b' / 'var' / 'flowd.db'}"
    systemd = load_config(write_config(tmp_path / "a" / "flowd.toml", {}), env={"INVOCATION_ID": "x"})
    assert (systemd.flowd.state_dir, systemd.flowd.task_paths) == ("/var/lib/flowd", ("/etc/flowd/tasks",))


def test_flowctl_and_api_find_the_same_database_from_any_folder(tmp_path: Path) -> None:
    # The config keeps its paths relative (the repository's layout: config/, tasks/,
    # var/). flowctl adds a routine from the project folder; from two other folders,
    # by --config and by $FLOWD_CONFIG, flowctl and the Python API see it, and no
    # var/ appears in those folders.
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "tasks").mkdir()
    (project / "tasks" / "task_example.py").write_text((ROOT / "tasks" / "task_example.py").read_text())
    config = write_config(project / "config" / "flowd.toml", {"flowd": {"node_id": "n1"}})
    assert flowctl_in(project, "--config", "config/flowd.toml", "task", "add", "echo", "example.Echo").returncode == 0
    assert flowctl_in(project, "--config", "config/flowd.toml", "routine", "add", "r", "echo").returncode == 0
    assert (project / "var" / "flowd.db").exists()

    other, third = tmp_path / "other", tmp_path / "third"
    other.mkdir()
    third.mkdir()
    listed = flowctl_in(other, "--json", "--config", str(config), "routine", "list")
    assert listed.returncode == 0 and [r["name"] for r in json.loads(listed.stdout)] == ["r"], listed.stderr
    by_env = flowctl_in(other, "--json", "routine", "list", env={"FLOWD_CONFIG": str(config)})
    assert [r["name"] for r in json.loads(by_env.stdout)] == ["r"], by_env.stderr
    status = flowctl_in(other, "--json", "status", env={"FLOWD_CONFIG": str(config)})
    assert json.loads(status.stdout)["database"] == f"sqlite:///{project / 'var' / 'flowd.db'}"
    api = python_in(third, "from flowd import api; f = api.submit_flow('r', 1); print(f.id, api.get_flow(f.id).state)",
                    {"FLOWD_CONFIG": str(config)})
    assert api.returncode == 0 and api.stdout.split() == ["1", "INIT"], api.stderr
    assert not (other / "var").exists() and not (third / "var").exists()


def test_api_never_creates_an_empty_database(tmp_path: Path, config_file: Callable[..., Path]) -> None:
    # A script using the API with a configuration flowd never ran with gets one clear
    # error naming the database, and no empty file is left behind.
    config = config_file()
    db = Path(load_config(config).database.url[len("sqlite:///"):])
    code = ("from flowd import api\nfrom flowd.errors import StoreUnavailable\n"
            "try:\n    api.submit_flow('anything')\nexcept StoreUnavailable as exc:\n    print('refused:', exc)\n")
    result = python_in(tmp_path, code, {"FLOWD_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert f"refused: the database {db} does not exist yet" in result.stdout
    assert not db.exists()


# ---------------------------------------------------------------------- setup.sh
def _setup_sandbox(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """scripts/setup.sh in a copy of the project whose apt-get, sudo and .venv/bin/python
    only write down how they were called; PATH holds no other tool, so every system
    package counts as missing."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "scripts" / "setup.sh").write_text((ROOT / "scripts" / "setup.sh").read_text())
    calls = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = f'#!/bin/sh\necho "$(basename "$0") $*" >> {calls}\n'
    for name in ("apt-get", "sudo"):
        (bin_dir / name).write_text(recorder if name == "apt-get" else '#!/bin/sh\nexec "$@"\n')
        (bin_dir / name).chmod(0o755)
    for tool in ("bash", "sh", "id", "dirname", "basename", "python3", "cat"):
        (bin_dir / tool).symlink_to(subprocess.run(["/bin/sh", "-c", f"command -v {tool}"], capture_output=True,
                                                   text=True, check=True).stdout.strip())
    venv_python = project / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\necho "venv-python $*" >> {calls}\n')
    venv_python.chmod(0o755)
    return project, calls, {"PATH": str(bin_dir)}


@pytest.mark.parametrize(("args", "extras", "absent"), [
    ([], "-e .[test,systemd]", []),
    (["--run"], "-e .", ["gcc", "fuse3", "libsystemd-dev", "python3-dev", "sqlite3", "openssl"]),
])
def test_setup_installs_for_running_or_for_testing(tmp_path: Path, args: list[str], extras: str,
                                                   absent: list[str]) -> None:
    project, calls, env = _setup_sandbox(tmp_path)
    result = subprocess.run(["/bin/bash", str(project / "scripts" / "setup.sh"), *args], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    recorded = calls.read_text().splitlines()
    [install] = [line for line in recorded if line.startswith("apt-get install")]
    packages = set(install.split()[5:])
    assert "mosquitto-clients" in packages  # both paths: a broker's tools (and the broker, unless /usr/sbin has it)
    assert not packages & set(absent), packages
    if not absent:
        assert {"gcc", "fuse3", "libsystemd-dev"} <= packages
    assert recorded[-1].endswith(extras) and recorded[-1].startswith("venv-python -m pip install")
    assert subprocess.run(["/bin/bash", str(project / "scripts" / "setup.sh"), "--bogus"], capture_output=True,
                          text=True, env=env, timeout=60).returncode == 2


# ---------------------------------------------------------------------- flowctl small things
@pytest.fixture
def cli(flowctl: Run, db: Any, task_dir: Path) -> Run:
    """flowctl on a database with one task and one routine."""
    from flowd import catalog

    catalog.save_task("echo", "example.Echo", task_paths=[str(task_dir)])
    catalog.save_routine("greenhouse", ["echo"])
    return flowctl


def test_a_mistyped_command_action_or_routine_gets_a_suggestion(cli: Run) -> None:
    for args, hint in ((["stauts"], "did you mean 'status'?"), (["routine", "lsit"], "did you mean 'list'?"),
                       (["submit", "greenhose"], "did you mean 'greenhouse'?"),
                       (["routine", "show", "grenhouse"], "did you mean 'greenhouse'?"),
                       (["task", "show", "ecko"], "did you mean 'echo'?")):
        result = cli(*args)
        assert result.returncode == 2 and hint in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    far = cli("routine", "show", "zzzzzz")
    assert far.returncode == 2 and "did you mean" not in far.stderr


def test_submit_usage_shows_arg_as_optional(cli: Run) -> None:
    result = cli("submit")
    assert result.returncode == 2
    assert "required: ROUTINE (" in result.stderr and "ARG" not in result.stderr.split("(")[0]


def test_prune_dry_run_counts_and_deletes_nothing(cli: Run, db: Any) -> None:
    from flowd import api

    flow = api.submit_flow("greenhouse")
    api.cancel_flow(flow.id)
    dry = json.loads(cli("--json", "prune", "--older-than", "0", "--dry-run").stdout)
    assert (dry["would_remove"], dry["removed"], dry["dry_run"]) == (1, 0, True)
    text = cli("prune", "--older-than", "7d", "--dry-run").stdout
    assert "would prune 0 flows ended more than 7 days ago (--dry-run: nothing deleted)" in text
    assert api.get_flow(flow.id).state == "CANCELLED"
    assert "pruned 1 flow ended more than" in cli("prune", "--older-than", "0").stdout
    assert "ended more than 12 hours ago" in cli("prune", "--older-than", "12h").stdout


# ---------------------------------------------------------------------- examples and the journal
def test_the_shipped_examples_are_safe_and_a_failed_flow_is_a_warning(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, flowctl: Run, state_dir: Path,
        tmp_path: Path) -> None:
    # A new user applies config/routines.toml as the README says, with flowd running:
    # no schedule starts, no path points outside the state folder, and the reading a
    # flow stores lands there. A flow that ends FAILED is logged at WARNING, where
    # `journalctl -p warning` sees it.
    import shutil

    from flowd import api, catalog

    path = config_file(broker=broker)
    proc = flowd_proc(path)
    wait_for(lambda: "ready" in proc.log_text(), timeout=30, message="flowd ready")
    example = tmp_path / "routines.toml"
    shutil.copy(ROOT / "config" / "routines.toml", example)
    applied = flowctl("--json", "apply", str(example), config=path)
    assert applied.returncode == 0, applied.stderr
    routines = json.loads(flowctl("--json", "routine", "list", config=path).stdout)
    assert routines and all(not r["enabled"] for r in routines if r["schedule"]), routines
    tasks = json.loads(flowctl("--json", "task", "list", config=path).stdout)
    for task in tasks:
        shown = json.loads(flowctl("--json", "task", "show", task["name"], config=path).stdout)
        assert not Path(str(shown["options"].get("path", "x"))).is_absolute(), shown

    api.configure(load_config(path))
    catalog.save_routine("store", ["store-reading"])
    catalog.save_task("boom", "t.Fail", task_paths=list(load_config(path).flowd.task_paths))
    catalog.save_routine("boom", ["boom"])
    stored = api.submit_flow("store", status=200, sha256="ab", data={"t": 21})
    failed = api.submit_flow("boom")
    for flow_id in (stored.id, failed.id):
        wait_for(lambda i=flow_id: api.get_flow(i).is_ended, timeout=30, message=f"flow {flow_id} to end")
    assert api.get_flow(stored.id).state == "DONE", api.get_flow(stored.id).error
    [line] = (state_dir / "readings.jsonl").read_text().splitlines()
    assert json.loads(line)["data"] == {"t": 21}
    assert api.get_flow(failed.id).state == "FAILED"
    wait_for(lambda: f"WARNING flowd.engine.engine: flow {failed.id} (boom) ended FAILED" in proc.log_text(),
             timeout=10,
             message=f"the FAILED flow in the log at WARNING:\n{proc.log_text()[-2000:]}")
    assert api.list_flows(routine="read-sensor") == [] and api.list_flows(routine="heartbeat") == []
    api.reset()
