"""A FUSE passthrough filesystem that forgets unsynced writes at a simulated power cut.

Why: a power cut loses every write that fsync/fdatasync did not make durable, and
neither kill -9 nor a normal test run can show what that does to SQLite. This mount
keeps, per file, what each write overwrote since that file's last fsync; a *cut*
puts every file back to its last synced state, like the disk after a power loss.

What is modelled (and what is not):

- File contents: each file reverts to its contents and size at its last
  fsync/fdatasync, or at mount time if it was not synced since. A file created since
  and never synced goes back to empty. Undo data is kept per 4 KiB block, saved the
  first time a write or a truncate touches the block after a sync.
- Metadata (create, unlink, rename, mkdir, chmod...) is durable at once, as on a
  filesystem that journals metadata synchronously; directory fsync is a no-op. Hard
  links are not supported (each path has its own undo log).
- Nothing is really fsynced to the backing folder: the backing disk is not what is cut.
- Locks: the filesystem implements neither ``lock`` nor ``flock``, so the kernel's FUSE
  driver keeps POSIX and flock locks locally on the mount's inodes. Every process of a
  test runs on this one machine and mount, so SQLite's locks work across processes.
- No direct_io and ``kernel_cache``: every process shares the one page cache of the
  mount, so SQLite's ``-shm`` can be mmap'd MAP_SHARED; pages are not invalidated on
  open or on mtime changes (nothing but this mount changes the backing files).

A cut: the caller SIGKILLs every process using the mount, then writes ``cut`` to the
FUSE process's stdin. It refuses every further request (dirty pages the kernel would
still write back are lost, as in a real cut), unmounts, reverts the backing files,
prints one JSON line with what it reverted, and exits 0. Mounting again gives a new
page cache, like a reboot. ``stop`` (or EOF on stdin) unmounts without reverting.

Run: ``python tests/lossyfs.py BACKING MOUNTPOINT``; tests use :class:`LossyMount`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 4096
MNT_DETACH = 2
FUSE_CAP_POSIX_LOCKS = 1 << 1  # fuse_common.h (libfuse 3)
FUSE_CAP_FLOCK_LOCKS = 1 << 10
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize", "st_rdev", "st_ino")


def fuse_missing() -> str | None:
    """Why a lossyfs cannot be mounted here (a reason to skip), or None."""
    from ctypes.util import find_library
    from importlib.util import find_spec

    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE on this machine or in this container)"
    if not find_library("fuse3"):
        return "libfuse3 is not installed (scripts/setup.sh installs fuse3 and libfuse3-3)"
    if find_spec("mfusepy") is None:
        return "mfusepy is not installed (pip install -e '.[test]')"
    return None


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """True while anything is mounted on ``mountpoint`` (also a FUSE mount whose server
    died, which os.path.ismount reports as False)."""
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1].replace("\\040", " ") == target for line in mounts if line.strip())


def unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Lazy unmount (MNT_DETACH): never blocks on a mount that is busy or whose server is gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(os.path.abspath(mountpoint)), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted (any more)
            raise OSError(err, os.strerror(err), str(mountpoint))


@dataclass
class UndoLog:
    """What one file looked like at its last sync: its size and the old bytes of every
    block written or truncated away since (an unsaved block below ``synced_size`` still
    holds its synced bytes)."""

    synced_size: int
    blocks: dict[int, bytes] = field(default_factory=dict)

    def save(self, fd: int, start: int, end: int) -> None:
        """Keep the synced bytes of every block in [start, end) before they change."""
        end = min(end, self.synced_size)
        if start >= end:
            return
        for block in range(start // BLOCK, (end + BLOCK - 1) // BLOCK):
            if block not in self.blocks:
                self.blocks[block] = os.pread(fd, BLOCK, block * BLOCK)

    def restore(self, path: str) -> int:
        """Put the synced bytes back and cut the file to its synced size; bytes written back."""
        fd = os.open(path, os.O_RDWR)
        try:
            for block, data in self.blocks.items():
                os.pwrite(fd, data, block * BLOCK)
            os.ftruncate(fd, self.synced_size)
        finally:
            os.close(fd)
        return sum(len(d) for d in self.blocks.values())


class LossyFS:
    """Passthrough to ``root`` that keeps an :class:`UndoLog` per written file path.

    mfusepy registers only the methods an object has (no need to subclass its
    Operations), so importing this module does not need libfuse.
    """

    use_ns = True

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._mutex = threading.Lock()  # one writer at a time (named so mfusepy does not see a "lock" op)
        self.logs: dict[str, UndoLog] = {}
        self.cutting = False

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Locks stay in the kernel; the page cache is dropped neither when the backing
        mtime moves (auto_inval_data) nor on open (``kernel_cache`` is a mount option)."""
        if conn is not None:
            conn.want &= ~(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS | FUSE_CAP_AUTO_INVAL_DATA)

    # ------------------------------------------------------------------ helpers
    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _refuse_after_cut(self) -> None:
        if self.cutting:
            raise OSError(errno.EIO, "lossyfs: the power is cut")

    def _log(self, path: str, fd: int) -> UndoLog:
        log = self.logs.get(path)
        if log is None:
            log = self.logs[path] = UndoLog(os.fstat(fd).st_size)
        return log

    def _truncate(self, path: str, fd: int, length: int) -> None:
        log = self._log(path, fd)  # also when it grows: the synced size must come back
        size = os.fstat(fd).st_size
        if length < size:
            log.save(fd, length, size)
        os.ftruncate(fd, length)

    def revert(self) -> dict[str, int]:
        """Every file back to its last synced state (after the unmount)."""
        files = restored = 0
        for path, log in self.logs.items():
            full = self._full(path)
            if os.path.exists(full):
                restored += log.restore(full)
                files += 1
        self.logs.clear()
        return {"files": files, "bytes": restored}

    # ------------------------------------------------------------------ reading
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
        attrs: dict[str, Any] = {key: getattr(st, key) for key in _STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode):
            raise OSError(errno.EACCES, "access")
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    def open(self, path: str, flags: int) -> int:
        self._refuse_after_cut()
        # Write-only opens become read-write so the undo log can read what a write replaces;
        # the kernel computes O_APPEND offsets itself; O_TRUNC goes through the undo log.
        mode = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        fd = os.open(self._full(path), (flags & ~(os.O_ACCMODE | os.O_APPEND | os.O_TRUNC)) | mode)
        if flags & os.O_TRUNC:
            with self._mutex:
                self._truncate(path, fd, 0)
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    # ------------------------------------------------------------------ writing (undo-logged)
    def create(self, path: str, mode: int, flags: int = 0) -> int:
        self._refuse_after_cut()
        extra = flags & ~(os.O_ACCMODE | os.O_APPEND | os.O_TRUNC)
        return os.open(self._full(path), extra | os.O_RDWR | os.O_CREAT, mode)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            self._refuse_after_cut()
            self._log(path, fh).save(fh, offset, offset + len(data))
            return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._mutex:
            self._refuse_after_cut()
            fd = fh if fh is not None else os.open(self._full(path), os.O_RDWR)
            try:
                self._truncate(path, fd, length)
            finally:
                if fh is None:
                    os.close(fd)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            self._refuse_after_cut()
            self.logs.pop(path, None)  # what is there now is what survives a cut
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    # ------------------------------------------------------------------ metadata (durable at once)
    def unlink(self, path: str) -> int:
        with self._mutex:
            self._refuse_after_cut()
            os.unlink(self._full(path))
            self.logs.pop(path, None)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            self._refuse_after_cut()
            os.rename(self._full(old), self._full(new))
            for path in [p for p in self.logs if p == new or p.startswith(new + "/")]:
                del self.logs[path]
            for path in [p for p in self.logs if p == old or p.startswith(old + "/")]:
                self.logs[new + path[len(old):]] = self.logs.pop(path)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._refuse_after_cut()
        os.mkdir(self._full(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        self._refuse_after_cut()
        os.rmdir(self._full(path))
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._refuse_after_cut()
        os.mknod(self._full(path), mode, dev)  # Unix sockets bound on the mount come here
        return 0

    def symlink(self, target: str, source: str) -> int:
        self._refuse_after_cut()
        os.symlink(source, self._full(target))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._full(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._full(path), ns=times) if times else os.utime(self._full(path))
        return 0


def serve(backing: str, mountpoint: str) -> int:
    """Mount in the foreground until ``cut``/``stop``/EOF on stdin; the exit code is 0 when clean."""
    import mfusepy

    fs = LossyFS(backing)

    def control() -> None:
        for line in sys.stdin:
            if line.strip() in ("cut", "stop"):
                with fs._mutex:
                    fs.cutting = line.strip() == "cut"
                break
        unmount(mountpoint)

    threading.Thread(target=control, name="control", daemon=True).start()
    mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=True, fsname="lossyfs", kernel_cache=True)
    report: dict[str, Any] = {"cut": fs.cutting}
    if fs.cutting:
        report.update(fs.revert())
    print(json.dumps(report), flush=True)
    return 0


class LossyMount:
    """A lossyfs mount of ``backing`` on ``mountpoint``, served by a subprocess.

    ``cut()`` needs every process using the mount gone first (the caller SIGKILLs them);
    ``mount()`` again is the reboot. ``close()`` unmounts, whatever state it is in.
    """

    def __init__(self, backing: Path, mountpoint: Path, log: Path | None = None):
        self.backing = backing
        self.mountpoint = mountpoint
        self.log = log or backing.with_name(backing.name + "-lossyfs.log")
        self.proc: subprocess.Popen[str] | None = None
        self.cuts = 0

    def mount(self, timeout: float = 15) -> None:
        assert self.proc is None, "already mounted"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FUSE_LIBRARY_NAME": "fuse3"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, str(self.backing), str(self.mountpoint)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"lossyfs did not mount {self.mountpoint}: {self.log.read_text()[-2000:]}")
            time.sleep(0.01)

    remount = mount

    def users(self) -> list[int]:
        """Pids (other than zombies) with a file, folder or mapping open under the mount."""
        root = os.path.realpath(self.mountpoint)
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                links = [os.readlink(f"/proc/{pid}/cwd")]
                links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                with open(f"/proc/{pid}/maps") as maps:
                    links += [line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line]
            except OSError:
                continue
            if any(link == root or link.startswith(root + "/") for link in links):
                found.append(int(pid))
        return found

    def cut(self, timeout: float = 15) -> dict[str, Any]:
        """Power cut: refuse the mount's pending writes, unmount, revert to the synced state."""
        return self._stop("cut", timeout)

    def close(self, timeout: float = 15) -> None:
        """Unmount without losing anything (teardown); safe to call at any time."""
        if self.proc is not None:
            try:
                self._stop("stop", timeout)
            except (RuntimeError, OSError):
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        if is_mounted(self.mountpoint):
            unmount(self.mountpoint)

    def _stop(self, command: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while users := self.users():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes still use {self.mountpoint}: {users}; kill them before a {command}")
            time.sleep(0.02)
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"lossyfs did not stop after '{command}': {self.log.read_text()[-2000:]}") from None
        line = self.proc.stdout.read().strip()
        code = self.proc.returncode
        self.proc = None
        if code != 0 or not line:
            raise RuntimeError(f"lossyfs exited {code} after '{command}': {self.log.read_text()[-2000:]}")
        if command == "cut":
            self.cuts += 1
        report: dict[str, Any] = json.loads(line.splitlines()[-1])
        return report

    def __enter__(self) -> LossyMount:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2]))
