"""A minimal Debian 12 booted under its own systemd, to test deploy/install.sh for real.

The root is made once by ``debootstrap`` (Debian's minbase plus systemd and python3, as
close to a fresh Raspberry Pi OS Lite as a container gets) and cached as a tarball under
``/var/cache/flowd-test`` (``$FLOWD_TEST_CACHE``), named by a hash of the recipe below so
a changed recipe builds a new one. Each boot unpacks a fresh copy and runs

    unshare --fork --pid --mount --net --uts --ipc --cgroup --propagation private

with a short script that bind-mounts the root onto itself, gives it a private ``/dev``
(a few bound device nodes, no host disks or consoles), a read-only ``/sys`` and a
cgroup2 hierarchy of its own, enters it with ``pivot_root`` and execs
``/lib/systemd/systemd`` as PID 1, with ``$container`` set as systemd's container
interface asks (so it leaves hardware alone). The pivot matters: the unit's sandboxing
(ProtectSystem=, PrivateTmp=, PrivateUsers=) sets up mount namespaces from the root
mount, and under a plain chroot every sandboxed start fails with 226/NAMESPACE.
Commands run inside through ``nsenter``.

The network namespace has loopback only: the booted mosquitto on 1883 never meets
this machine's, and nothing inside reaches out. So whatever the booted root needs from
the network is fetched at cache time: the ``.deb`` files install.sh asks apt for go
into the root's apt cache (with its package lists), and the Python packages flowd
needs are downloaded by this machine's pip, with its own index configuration, into a
wheelhouse that install.sh gets through ``--pip-args`` (the documented offline install).

What this cannot show: a real SD card, a reboot, a Raspberry Pi kernel, udev, or a
network other than loopback.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

CACHE = Path(os.environ.get("FLOWD_TEST_CACHE", "/var/cache/flowd-test"))
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# In the root: what a Pi owner's fresh system has (systemd-sysv: /sbin/init, which
# invoke-rc.d looks for before it lets a package start its service). Not procps (no
# /bin/kill), not python3-venv, not libsystemd-dev: install.sh must cope with that.
INCLUDE = ("systemd", "systemd-sysv", "python3")
# Downloaded into the root's apt cache only: install.sh installs them itself.
FETCH = ("python3-venv", "mosquitto")
HOSTNAME = "flowd-pi"
# Units that would reach past the container into this machine (gettys on its ttys, its
# kernel's sysctls and binfmt, remounting the shared root file system).
MASK = ("getty@.service", "console-getty.service", "getty-static.service", "systemd-sysctl.service",
        "systemd-remount-fs.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
        "systemd-modules-load.service")
RECIPE_VERSION = 1
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
       "HOME": "/root", "TERM": "dumb", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}

BOOT_SCRIPT = r"""
set -eu
R=$1
mount --bind "$R" "$R"
mount -t tmpfs -o mode=755,nosuid,size=4m flowd-test-dev "$R/dev"
for node in null zero full random urandom tty; do
    touch "$R/dev/$node"
    mount --bind "/dev/$node" "$R/dev/$node"
done
mkdir "$R/dev/pts" "$R/dev/shm"
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
mount -t proc -o nosuid,nodev,noexec proc /proc
umount -l /.oldroot
rmdir /.oldroot
export container=flowd-test
exec /lib/systemd/systemd
"""

T = TypeVar("T")


def run(cmd: Sequence[str | os.PathLike[str]], timeout: float = 600, **kwargs: Any) -> str:
    """Run a command on this machine; its output, or AssertionError with what it said."""
    result = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} exited {result.returncode}:\n" \
                                   f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def debian_mirror() -> str:
    """This machine's Debian mirror (its apt sources), so the root comes from where apt goes."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.is_file():
            texts.append(path.read_text(errors="replace"))
    for text in texts:
        for match in re.finditer(r"(?m)^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(https?://\S+)", text):
            url = match.group(1).rstrip("/")
            if url.endswith("/debian"):
                return url
    return DEFAULT_MIRROR


def recipe_key() -> str:
    recipe = {"suite": SUITE, "include": INCLUDE, "fetch": FETCH, "mask": MASK, "hostname": HOSTNAME,
              "version": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _unmount_below(folder: Path) -> None:
    """debootstrap mounts /proc and /sys in its target; a failed run can leave them there."""
    below = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if line.split()[4].startswith(str(folder) + "/")]
    for mount_point in sorted(below, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False)


def root_tarball(cache: Path = CACHE) -> Path:
    """The cached root as a tarball, built first if missing (about a minute on a fast mirror)."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"debian12-{recipe_key()}.tar.gz"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if tarball.exists():
            return tarball
        build = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        try:
            run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, build,
                 debian_mirror()], timeout=1200)
            (build / "etc" / "hostname").write_text(HOSTNAME + "\n")
            (build / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost\n")
            for unit in MASK:
                link = build / "etc" / "systemd" / "system" / unit
                link.unlink(missing_ok=True)
                link.symlink_to("/dev/null")
            # The lists and the .deb files install.sh's apt-get commands will want, offline.
            run(["chroot", build, "apt-get", "update", "-qq"], env=ENV, timeout=600)
            run(["chroot", build, "apt-get", "install", "-y", "-qq", "--download-only", *FETCH], env=ENV,
                timeout=600)
            build.chmod(0o755)  # mkdtemp's 0700 would become the booted "/": nobody but root gets in
            partial = tarball.with_name(tarball.name + ".part")
            run(["tar", "-C", build, "--numeric-owner", "-I", "gzip -1", "-cf", partial, "."], timeout=600)
            partial.rename(tarball)
            for old in cache.glob("debian12-*.tar.gz"):
                if old != tarball:
                    old.unlink()
        finally:
            _unmount_below(build)
            shutil.rmtree(build, ignore_errors=True)
    return tarball


def wheelhouse(source: Path, cache: Path = CACHE) -> Path:
    """Wheels of flowd's dependencies and build backend, fetched by this machine's pip."""
    project = tomllib.loads((source / "pyproject.toml").read_text())
    wanted = sorted([*project["build-system"]["requires"], "wheel", *project["project"]["dependencies"]])
    folder = cache / f"wheels-{hashlib.sha256(json.dumps(wanted).encode()).hexdigest()[:12]}"
    if (folder / ".complete").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--wheel-dir",
                 folder, *wanted], timeout=600)
            (folder / ".complete").write_text("\n".join(wanted) + "\n")
            for old in cache.glob("wheels-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
    return folder


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
    """Poll ``condition`` until it returns something true; AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(every)


def own_cgroup(name: str) -> Path:
    """A new, empty cgroup2 folder below this process's own (hybrid or unified hierarchy)."""
    mount = next((line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split(" - ", 1)[1].startswith("cgroup2 ")), None)
    assert mount, "no cgroup2 hierarchy is mounted: systemd cannot be booted here"
    mine = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    folder = Path(mount + mine.rstrip("/")) / f"flowd-test-{os.getpid()}-{name}"
    folder.mkdir()
    return folder


def remove_cgroup(folder: Path) -> None:
    """Remove a cgroup tree the booted systemd left (empty folders once its processes are gone)."""
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass


class BootedDebian:
    """A Debian root booted under its own systemd, reached through nsenter.

    >>> machine = BootedDebian(Path("/tmp/root"), Path("/tmp/boot.log"))
    >>> machine.boot()
    >>> machine.run("systemctl", "is-system-running").stdout
    'running\\n'
    >>> machine.poweroff()
    """

    def __init__(self, root: Path, log: Path):
        self.root = root
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's pid, as this machine sees it
        self.cgroup: Path | None = None

    def boot(self, timeout: float = 60) -> None:
        # A cgroup of its own first: the booted systemd makes its slices under the root of
        # its cgroup namespace, and two test runs must not manage the same cgroups.
        self.cgroup = own_cgroup(self.root.parent.name)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "enter", str(self.cgroup),
                 "unshare", "--fork", "--pid", "--mount", "--net", "--uts", "--ipc", "--cgroup",
                 "--propagation", "private", "bash", "-c", BOOT_SCRIPT, "boot", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        self.pid = wait_for(self._systemd_pid, 20, f"systemd to start as PID 1 (see {self.log})")
        state = wait_for(lambda: self.run("systemctl", "is-system-running", check=False).stdout.strip()
                         in ("running", "degraded") and self.run("systemctl", "is-system-running").stdout,
                         timeout, "the boot to finish")
        assert state.strip() == "running", self.run("systemctl", "--failed", "--no-pager").stdout

    def _systemd_pid(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the boot script exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd":
                return int(children[0])
        except OSError:
            pass
        return None

    def _enter(self, namespaces: Sequence[str]) -> list[str]:
        return ["nsenter", "--target", str(self.pid), *namespaces]

    def run(self, *cmd: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside, as root, in every namespace of the booted system."""
        full = self._enter(["--mount", "--pid", "--net", "--uts", "--ipc", "--cgroup", "--root", "--wd"])
        result = subprocess.run([*full, *cmd], capture_output=True, text=True, timeout=timeout, env=ENV,
                                input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, f"inside: {' '.join(cmd)} exited {result.returncode}:\n" \
                                           f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def run_on_its_network(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run one of this machine's programs (mosquitto_pub, mosquitto_sub) on the booted
        system's loopback, where its broker listens."""
        return subprocess.run([*self._enter(["--net"]), *cmd], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def unit(self, name: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        out = self.run("systemctl", "show", name, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str, since: int = 0) -> list[dict[str, Any]]:
        """Journal entries as JSON objects (``--all``: long fields are not blanked), only
        those journald received after ``since`` (a :meth:`mark`) when given."""
        window = [f"--since=@{since // 1_000_000}"] if since else []
        out = self.run("journalctl", "--no-pager", "--all", "--output=json", *window, *args).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in entries if int(e["__REALTIME_TIMESTAMP"]) > since]

    def mark(self) -> int:
        """Now, in journald's microseconds (the clock is this machine's): ``journal(since=mark)``
        shows what came later. Cursors are no good for that here: the flowd user's entries go
        to their own journal file, and --after-cursor across files misses some."""
        return time.time_ns() // 1000

    def poweroff(self, timeout: float = 30) -> None:
        """Shut the system down (SIGRTMIN+4 is systemd's container poweroff); SIGKILL at the deadline."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid:
            try:
                os.kill(self.pid, signal.SIGRTMIN + 4)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: every process in it dies
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.proc = None
        if self.cgroup is not None:
            remove_cgroup(self.cgroup)
            self.cgroup = None
