"""deploy/install.sh and flowd.service, run for real into a scratch root.

install.sh runs to the end with ``--root``: the flowd account is created by
``useradd --prefix`` in the scratch root's etc/passwd, the virtualenv is built and flowd
installed by pip (dependencies from the package index), files get their real owners
and modes, and the unit is enabled by ``systemctl --root``. Not exercised here: apt
(``--with-mosquitto``), ``daemon-reload``/``enable --now``/restart on a machine booted
with systemd, and systemd-python (only built when libsystemd-dev is present).

systemd-analyze runs offline against the same scratch root, which holds the installed
binary and a copy of the system's unit folder so that ``verify`` can resolve ExecStart,
ExecReload (flowd itself: a minimal Debian has no /bin/kill) and the targets.
tests/test_booted_debian.py boots a real Debian root under systemd for the rest.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowd.config import build_config

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "deploy" / "install.sh"
UNIT = ROOT / "flowd.service"
README = ROOT / "deploy" / "README.md"
EXPOSURE = re.compile(r"Overall exposure level for flowd\.service: (\d+\.\d+)")
MAX_EXPOSURE = 2.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh chowns files and creates accounts: needs root")
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("systemd-analyze", "systemctl", "useradd", "userdel", "groupdel"))
    or not Path("/usr/bin/python3").exists(),
    reason="needs systemd-analyze, systemctl, useradd/userdel/groupdel and /usr/bin/python3")
pytestmark = [needs_root, needs_tools]


def run_install(root: Path, *args: str, check: bool = True,
                script: Path = INSTALL) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", str(script), "--root", str(root), *args], capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, f"install.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def seed_root(root: Path) -> None:
    """A minimal system image: its accounts and systemd's own units (no /bin/kill, like debootstrap's)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)


def account(root: Path, name: str, file: str = "passwd") -> list[str] | None:
    for line in (root / "etc" / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def owner_mode(path: Path) -> tuple[int, int, str]:
    st = path.stat()
    return st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))


def snapshot(root: Path) -> dict[str, Any]:
    """Everything install.sh may touch: type, owner, mode, mtime and content of each entry."""
    found: dict[str, Any] = {}
    skip = root / "usr" / "lib" / "systemd" / "system"
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip.parent:
            dirs[:] = [d for d in dirs if d != "system"]
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            entry: tuple[Any, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISREG(st.st_mode):
                entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            found[str(path.relative_to(root))] = entry
    return found


def exposure(*args: str) -> tuple[float, str]:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", *args], capture_output=True,
                            text=True, timeout=60)
    match = EXPOSURE.search(result.stdout)
    assert match, f"no exposure line in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), result.stdout


def readme_dropin(name: str) -> str:
    """The ```ini block that follows ``<!-- drop-in: NAME -->`` in deploy/README.md."""
    text = README.read_text()
    match = re.search(rf"<!-- drop-in: {re.escape(name)} -->\s*```ini\n(.*?)```", text, re.S)
    assert match, f"deploy/README.md has no drop-in {name}"
    return match.group(1)


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in the unit (keys like SystemCallFilter repeat)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """One real install into a scratch root, shared by the tests below (pip takes seconds).

    install.sh runs from a copy of the source tree, so the tree it installed from stays
    the same for the idempotency checks even while the working tree is being edited.
    """
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE", "flowd.service"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    for name in ("flowd", "config", "deploy", "tasks"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    # A git checkout, with a task script the user wrote there and never added: not an example.
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    subprocess.run(["git", "-C", str(source), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm",
                    "source"], check=True)
    (source / "tasks" / "task_scratch.py").write_text("from flowd.task import Task\n")
    script = source / "deploy" / "install.sh"
    root = tmp_path_factory.mktemp("root")
    seed_root(root)
    result = run_install(root, script=script)
    return root, result.stdout, script


def test_install_creates_account_folders_and_files(installed: tuple[Path, str, Path]) -> None:
    root, out, script = installed
    user = account(root, "flowd")
    group = account(root, "flowd", "group")
    assert user is not None and group is not None, out
    uid, gid = int(user[2]), int(group[2])
    assert 0 < uid < 1000 and user[3] == group[2], user          # a system user with its own group
    assert user[5] == "/var/lib/flowd" and user[6] == "/usr/sbin/nologin"
    try:
        pwd.getpwnam("flowd")
        host_has_flowd = True
    except KeyError:
        host_has_flowd = False
    assert host_has_flowd == ("flowd:" in Path("/etc/passwd").read_text())  # the host's passwd is not ours
    assert owner_mode(root / "etc/flowd") == (0, 0, "0o755")
    assert owner_mode(root / "etc/flowd/tasks") == (0, 0, "0o755")
    assert owner_mode(root / "var/lib/flowd") == (uid, gid, "0o700")
    assert owner_mode(root / "etc/flowd/flowd.toml") == (0, gid, "0o640")
    assert (root / "etc/flowd/flowd.toml").read_text() == (ROOT / "config/flowd.toml").read_text()
    for script in (ROOT / "tasks").glob("task_*.py"):
        assert owner_mode(root / "etc/flowd/tasks" / script.name) == (0, 0, "0o644")
    assert not (root / "etc/flowd/tasks/task_scratch.py").exists()  # untracked in the checkout
    assert (root / "etc/systemd/system/flowd.service").read_text() == UNIT.read_text()
    assert owner_mode(root / "etc/systemd/system/flowd.service") == (0, 0, "0o644")
    wants = root / "etc/systemd/system/multi-user.target.wants/flowd.service"
    assert os.readlink(wants) == "/etc/systemd/system/flowd.service"
    wrapper = (root / "usr/local/bin/flowctl").read_text()
    assert "runuser -u flowd -- /opt/flowd/venv/bin/flowctl" in wrapper and "STATE_DIRECTORY=/var/lib/flowd" in wrapper


def test_installed_venv_runs_flowd_and_loads_the_installed_config(installed: tuple[Path, str, Path]) -> None:
    root, _, script = installed
    venv = root / "opt/flowd/venv"
    for script in ("flowd", "flowctl"):
        assert os.access(venv / "bin" / script, os.X_OK), f"no {script} entry point"
    code = ("import flowd, flowd.config as c, sys\n"
            "cfg = c.load_config(sys.argv[1], env={'STATE_DIRECTORY': '/var/lib/flowd'})\n"
            "print(flowd.__file__)\nprint(cfg.state_dir, cfg.flowd.task_paths[0], cfg.flowd.shutdown_grace)")
    result = subprocess.run([str(venv / "bin/python"), "-c", code, str(root / "etc/flowd/flowd.toml")],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    module_file, values = result.stdout.splitlines()
    assert module_file.startswith(str(venv)), "flowd was imported from outside the virtualenv"
    assert values == "/var/lib/flowd /etc/flowd/tasks 30.0"
    # Every dependency the daemon imports is in the venv.
    deps = subprocess.run([str(venv / "bin/python"), "-c", "import paho.mqtt.client, huey, peewee, apscheduler"],
                          capture_output=True, text=True, timeout=60)
    assert deps.returncode == 0, deps.stderr


def test_second_run_changes_nothing(installed: tuple[Path, str, Path]) -> None:
    root, _, script = installed
    before = snapshot(root)
    result = run_install(root, script=script)
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"second run changed {changed[:10]}\n{result.stdout}"
    for word in ("created", "wrote", "installed flowd", "fixed"):
        assert not re.search(rf"^flowd-install: {word}\b", result.stdout, re.M), result.stdout
    assert "flowd already installed from this source" in result.stdout


def test_rerun_keeps_edits_and_fixes_unsafe_modes(installed: tuple[Path, str, Path]) -> None:
    root, _, script = installed
    config = root / "etc/flowd/flowd.toml"
    config.write_text('[mqtt]\nhost = "broker.local"\n')
    task_script = next((root / "etc/flowd/tasks").glob("task_*.py"), None)
    if task_script is not None:
        task_script.write_text("# edited on site\n")
    (root / "etc/flowd/tasks").chmod(0o777)           # anyone could drop code that runs as flowd
    (root / "var/lib/flowd").chmod(0o755)
    result = run_install(root, script=script)
    assert config.read_text() == '[mqtt]\nhost = "broker.local"\n'
    if task_script is not None:
        assert task_script.read_text() == "# edited on site\n"
    assert owner_mode(root / "etc/flowd/tasks")[2] == "0o755"
    assert owner_mode(root / "var/lib/flowd")[2] == "0o700"
    assert re.search(r"^flowd-install: fixed +.*/etc/flowd/tasks ", result.stdout, re.M), result.stdout
    assert "kept    " + str(config) in result.stdout


def test_systemd_analyze_verify_passes_on_the_installed_unit(installed: tuple[Path, str, Path]) -> None:
    root = installed[0]
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/flowd.service"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_of_the_bare_unit_only_misses_the_binary() -> None:
    # Before install.sh the only complaint is the virtualenv's binary: the unit itself is sound.
    if Path("/opt/flowd/venv/bin/flowd").exists():
        pytest.skip("flowd is installed on this machine")
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).strip().splitlines()
    # Once for ExecStart=, once for ExecReload= (flowd reload): nothing else is missing.
    missing = "flowd.service: Command /opt/flowd/venv/bin/flowd is not executable: No such file or directory"
    assert lines == [missing, missing]


def test_security_exposure_is_at_most_2(installed: tuple[Path, str, Path]) -> None:
    root = installed[0]
    score, report = exposure(str(UNIT))
    assert score <= MAX_EXPOSURE, report
    installed_score, _ = exposure(f"--root={root}", "flowd.service")
    assert installed_score == score
    for setting in ("PrivateDevices=", "ProtectSystem=", "MemoryDenyWriteExecute=", "ProcSubset=",
                    "CapabilityBoundingSet=~CAP_SYS_ADMIN", "SystemCallFilter=~@privileged",
                    "SystemCallFilter=~@resources", "RestrictAddressFamilies=~AF_NETLINK", "UMask="):
        assert re.search(rf"^✓ {re.escape(setting)}\s", report, re.M), f"{setting} not satisfied:\n{report}"


@pytest.mark.parametrize(("dropin", "device"), [("gpio.conf", "char-gpiochip:rw"), ("serial.conf", "/dev/ttyUSB0:rw")])
def test_readme_dropins_verify_and_open_only_their_device(installed: tuple[Path, str, Path], dropin: str,
                                                          device: str) -> None:
    root = installed[0]
    folder = root / "etc/systemd/system/flowd.service.d"
    folder.mkdir(exist_ok=True)
    (folder / dropin).write_text(readme_dropin(dropin))
    try:
        result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/flowd.service"],
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout + result.stderr) == (0, "")
        score, report = exposure(f"--root={root}", "flowd.service")
        assert score <= MAX_EXPOSURE, report
        acl = re.search(r"device ACL with some special devices: (.*?)\s{2,}", report)
        assert acl and sorted(acl.group(1).split()) == sorted(["char-rtc:r", device]), report
    finally:
        (folder / dropin).unlink()


def test_unit_matches_the_daemon_contract() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    exec_start = s["ExecStart"][0].split()
    assert exec_start[:2] == ["/opt/flowd/venv/bin/flowd", "run"]    # the binary itself, no shell wrapper
    assert exec_start[2:] == ["--config", "/etc/flowd/flowd.toml"]
    # flowd sends its own SIGHUP: nothing outside the virtualenv (a minimal Debian has no /bin/kill)
    assert s["ExecReload"] == ["/opt/flowd/venv/bin/flowd reload --config /etc/flowd/flowd.toml --pid $MAINPID"]
    assert s["KillMode"] == ["mixed"]
    default_grace = build_config({}, env={}).flowd.shutdown_grace
    assert float(s["TimeoutStopSec"][0]) > default_grace
    assert s["User"] == ["flowd"] and "DynamicUser" not in s
    assert s["StateDirectory"] == ["flowd"] and s["StateDirectoryMode"] == ["0700"]
    assert "mosquitto.service" in s["Wants"][0] and "mosquitto.service" in s["After"][0]
    assert "Requires" not in s and "BindsTo" not in s   # flowd outlives a broker restart
    assert s["Restart"] == ["on-failure"] and s["WatchdogSec"] == ["30"]
    from flowd.service.service import EXIT_DATABASE_DAMAGED

    assert s["RestartPreventExitStatus"] == [str(EXIT_DATABASE_DAMAGED)]  # damaged database: no restart loop
    assert s["OOMPolicy"] == ["continue"]                # a worker killed for memory is replaced, not fatal


def test_memory_deny_write_execute_leaves_flowd_working() -> None:
    # The kernel's own MDWE switch (Linux 6.3+) refuses W+X mappings as the unit's
    # MemoryDenyWriteExecute= does; flowd's libraries, ctypes, sqlite, ssl and fork must not care.
    code = r"""
import ctypes, mmap, multiprocessing, sqlite3, ssl, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:          # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("unsupported"); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("not enforced"); sys.exit(1)
except PermissionError:
    pass
import paho.mqtt.client, huey, peewee, apscheduler.schedulers.background
import flowd.config, flowd.store.models, flowd.engine.engine, flowd.loader, flowd.queue.queue
sqlite3.connect(":memory:").execute("select 1")
ssl.create_default_context()
child = multiprocessing.get_context("fork").Process(target=sqlite3.connect, args=(":memory:",))
child.start(); child.join()
print("ok", child.exitcode)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.stdout.strip() == "unsupported":
        pytest.skip("kernel without PR_SET_MDWE")
    assert result.returncode == 0 and result.stdout.strip() == "ok 0", result.stdout + result.stderr


def test_refuses_bad_usage(tmp_path: Path) -> None:
    empty = run_install(tmp_path, check=False)
    assert empty.returncode == 1 and "must hold etc/passwd and etc/group" in empty.stderr
    unknown = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "unknown option '--frobnicate'" in unknown.stderr
    purge = run_install(tmp_path, "--purge", check=False)
    assert purge.returncode == 1 and "--purge only goes with --uninstall" in purge.stderr



@pytest.mark.skipif(not shutil.which("sqlite3"), reason="needs the sqlite3 command (apt-get install sqlite3)")
def test_readme_backup_command_copies_a_live_database(db: Any, tmp_path: Path) -> None:
    # The README's online backup, run on flowd's real WAL database while another
    # process keeps committing to it, gives a whole, consistent copy.
    import sqlite3
    import threading

    match = re.search(r"sqlite3 /var/lib/flowd/flowd\.db \"\.backup '([^']+)'\"", README.read_text())
    assert match, "deploy/README.md lost its backup command"
    database = Path(db.config.database.url.removeprefix("sqlite:///"))
    target = tmp_path / Path(match.group(1)).name
    stop = threading.Event()
    written = [0]

    def keep_writing() -> None:
        conn = sqlite3.connect(database, timeout=10)
        conn.execute("create table if not exists backup_probe (n integer)")
        while not stop.is_set():
            with conn:
                conn.execute("insert into backup_probe values (?)", (written[0],))
            written[0] += 1
        conn.close()

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        from conftest import wait_for

        wait_for(lambda: written[0] > 50, message="the writer to commit")
        result = subprocess.run(["sqlite3", str(database), f".backup '{target}'"], capture_output=True, text=True,
                                timeout=60)
    finally:
        stop.set()
        writer.join(10)
    assert result.returncode == 0, result.stderr
    copy = sqlite3.connect(target)
    assert copy.execute("pragma integrity_check").fetchone() == ("ok",)
    tables = {row[0] for row in copy.execute("select name from sqlite_master where type = 'table'")}
    assert {"flow", "backup_probe"} <= tables, tables
    assert copy.execute("select count(*) from backup_probe").fetchone()[0] > 0
    copy.close()

SANDBOX = r'''
"""exec a command under flowd.service's system call filter, as systemd would set it up:
SystemCallFilter=@system-service ~@privileged @resources, SystemCallErrorNumber=EPERM,
SystemCallArchitectures=native, NoNewPrivileges=yes, MemoryDenyWriteExecute=yes (PR_SET_MDWE)."""
import ctypes, errno, os, subprocess, sys
import seccomp

def expand(group):
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True,
                         check=True).stdout
    names = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line.startswith("@"):
            names |= expand(line)
        elif line and not line.startswith("#"):
            names.add(line)
    return names

allowed = expand("@system-service") - expand("@privileged") - expand("@resources")
rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in sorted(allowed):
    try:
        rules.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError, OSError):
        pass                       # not a system call on this architecture
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0:          # PR_SET_NO_NEW_PRIVS
    sys.exit("no_new_privs refused")
mdwe = libc.prctl(65, 1, 0, 0, 0) == 0       # PR_SET_MDWE (Linux 6.3+)
rules.load()
print(f"sandbox: seccomp on, MDWE {'on' if mdwe else 'unsupported'}", file=sys.stderr, flush=True)
os.execv(sys.argv[1], sys.argv[1:])
'''


def has_seccomp() -> bool:
    probe = subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not Path("/usr/bin/python3").exists() or not has_seccomp(),
                    reason="needs libseccomp's Python binding for /usr/bin/python3 (apt-get install python3-seccomp)")
def test_daemon_runs_a_flow_and_stops_cleanly_under_the_units_syscall_filter(
        installed: tuple[Path, str, Path], broker: Any, config_file: Any, mqtt_client: Any, task_dir: Path,
        flowctl: Any, tmp_path: Path) -> None:
    # The installed binary (/opt/flowd/venv/bin/flowd of the scratch root, /usr/bin/python3's
    # virtualenv), sandboxed with the unit's system call filter, comes online, runs a
    # two-step flow submitted by flowctl, then stops with exit 0 on SIGTERM: nothing it
    # needs is refused.
    import json
    import signal

    from conftest import flowd_env, wait_for

    (task_dir / "task_deploycheck.py").write_text(
        "from flowd.task import Task\n\n\n"
        "class Step(Task):\n"
        "    def perform(self, *args, key='a', source=None, **kwargs):\n"
        "        return args, {**kwargs, key: kwargs.get(source, 0) + 1 if source else 1}\n")
    definitions = tmp_path / "pair.toml"
    definitions.write_text('[tasks.step-a]\nscript = "deploycheck.Step"\noptions = { key = "a" }\n\n'
                           '[tasks.step-b]\nscript = "deploycheck.Step"\noptions = { key = "b", source = "a" }\n\n'
                           '[routines.pair]\ntasks = ["step-a", "step-b"]\n')
    path = config_file(broker=broker)
    applied = flowctl("apply", str(definitions), config=path)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    watcher = mqtt_client()
    watcher.subscribe("flowd/testnode/status")
    helper = tmp_path / "sandbox.py"
    helper.write_text(SANDBOX)
    log_path = tmp_path / "flowd-sandboxed.log"
    binary = installed[0] / "opt/flowd/venv/bin/flowd"
    env = flowd_env()
    env.pop("PYTHONPATH")                      # the installed flowd, not the source tree
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["/usr/bin/python3", str(helper), str(binary), "run", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)
    try:
        def online_or_exited() -> Any:
            if proc.poll() is not None:
                return "exited"
            return [m for m in watcher.json_on("flowd/testnode/status") if m.get("state") == "online"]

        try:
            state = wait_for(online_or_exited, timeout=30, message="flowd online")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{log_path.read_text()}") from None
        assert state != "exited", f"flowd exited with {proc.returncode}:\n{log_path.read_text()}"
        assert "sandbox: seccomp on" in log_path.read_text()
        done = flowctl("--json", "submit", "pair", "--wait", "--timeout", "30", config=path, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr + log_path.read_text()
        flow = json.loads(done.stdout)
        assert flow["state"] == "DONE" and flow["result"]["kwargs"] == {"a": 1, "b": 2}, done.stdout
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log_text = log_path.read_text()
        assert code == 0, log_text
        assert "Operation not permitted" not in log_text, log_text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_uninstall_keeps_data_reinstall_adopts_it_purge_removes_it(installed: tuple[Path, str, Path]) -> None:
    # Runs last: it removes the shared install.
    root, _, script = installed
    database = root / "var/lib/flowd/flowd.db"
    database.write_bytes(b"flows")
    old_uid = int(account(root, "flowd")[2])  # type: ignore[index]
    os.chown(database, old_uid, old_uid)

    out = run_install(root, "--uninstall", script=script).stdout
    assert not (root / "etc/systemd/system/flowd.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/flowd.service").is_symlink()
    assert not (root / "opt/flowd").exists() and not (root / "usr/local/bin/flowctl").exists()
    assert account(root, "flowd") is None and account(root, "flowd", "group") is None
    assert database.read_bytes() == b"flows" and (root / "etc/flowd/flowd.toml").exists()
    assert "kept " in out
    again = run_install(root, "--uninstall", script=script)         # nothing left to remove: still fine
    assert "no unit at" in again.stdout

    # Another system account takes the old uid, so the reinstalled flowd gets a new one
    # and must be given the kept database and configuration.
    subprocess.run(["useradd", "--prefix", str(root), "--system", "--user-group", "--uid", str(old_uid),
                    "--no-create-home", "other"], check=True, capture_output=True)
    run_install(root, script=script)
    new_uid = int(account(root, "flowd")[2])  # type: ignore[index]
    new_gid = int(account(root, "flowd", "group")[2])  # type: ignore[index]
    assert new_uid != old_uid
    assert database.read_bytes() == b"flows"
    assert owner_mode(database)[:2] == (new_uid, new_gid)
    assert owner_mode(root / "var/lib/flowd") == (new_uid, new_gid, "0o700")
    assert owner_mode(root / "etc/flowd/flowd.toml")[:2] == (0, new_gid)

    run_install(root, "--uninstall", "--purge", script=script)
    assert not (root / "var/lib/flowd").exists() and not (root / "etc/flowd").exists()
    assert account(root, "other") is not None                       # only flowd's account went
