"""``flowd run``: wires the daemon together, handles signals and talks to systemd.

Start order matters. The database is checked first (a damaged file: one line, exit 4,
nothing opened or published; SPEC 7). Recovery runs before the worker pool exists, so
no step can be running while the queue is rebuilt; the workers are forked before any thread
starts (forking a process that runs paho or APScheduler threads can deadlock the child;
a worker that dies later is replaced by a fresh interpreter, see flowd.queue.workers); only
then start the MQTT bridge, the outbox publisher and the scheduler. Signal handlers only set a flag
and wake the main loop, which does the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import logging
import os
import select
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

from flowd import __version__
from flowd.config import Config, load_config, redact_url
from flowd.errors import ConfigError, DatabaseDamaged, FlowdError, StoreUnavailable
from flowd.service import libc
from flowd.service.imports import import_for
from flowd.service.logs import set_level, setup_logging
from flowd.service.sdnotify import Notifier
from flowd.service.statelock import daemon_pid, lock_state_dir, unlock_state_dir

log = logging.getLogger(__name__)

LOOP_INTERVAL_S = 1.0
SCHEDULE_CHECK_EVERY_S = 2.0
HEARTBEAT_EVERY_S = 30.0
STOP_DRAIN_S = 5.0
# A damaged database file (SPEC 7): restarting cannot help, so flowd.service names this
# code in RestartPreventExitStatus= and a person runs flowctl db check / db recover.
EXIT_DATABASE_DAMAGED = 4
# Keys that take effect on SIGHUP; the rest are read once by a thread or process
# that lives as long as the daemon, so they wait for a restart.
LIVE_KEYS = ("flowd.log_level",)


def main(argv: list[str] | None = None) -> int:
    """Console script ``flowd`` (and ``python -m flowd``)."""
    parser = argparse.ArgumentParser(prog="flowd", description="flowd: runs Python tasks as durable flows.")
    parser.add_argument("--version", action="version", version=f"flowd {__version__}")
    parser.add_argument("--config", metavar="PATH", help="configuration file (TOML)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="configuration file (TOML)")
    reload = commands.add_parser("reload", help="check the configuration, then make the running daemon reload it")
    reload.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="configuration file (TOML)")
    reload.add_argument("--pid", type=int, help="the daemon's pid (ExecReload passes $MAINPID); "
                        "default: the one holding the state folder's lock")
    args = parser.parse_args(argv)
    if args.command not in ("run", "reload"):
        parser.print_usage(sys.stderr)
        print("flowd: error: say what to do, e.g. 'flowd run --config /etc/flowd/flowd.toml'", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"flowd: {exc}" + ("; the running daemon keeps its configuration" if args.command == "reload" else ""),
              file=sys.stderr)
        return 2
    if args.command == "reload":
        return request_reload(config, args.pid)
    libc.use_one_malloc_arena()  # before any thread: the workers forked later keep it too
    import_for(config)
    return Service(config, config_arg=args.config).run()


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every key that differs; secrets shown masked."""
    changes: list[tuple[str, Any, Any]] = []

    def walk(prefix: str, a: Any, b: Any) -> None:
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            for f in dataclasses.fields(a):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(a, f.name), getattr(b, f.name))
        elif a != b:
            changes.append((prefix, _shown_value(prefix, a), _shown_value(prefix, b)))

    for section in ("flowd", "mqtt", "scheduler", "database", "queue", "homeassistant", "web"):
        walk(section, getattr(old, section), getattr(new, section))
    return changes


def _shown_value(key: str, value: Any) -> Any:
    """A config value fit for the log: passwords masked, URLs without their credentials."""
    if key.endswith("password"):
        return "***" if value else value
    if key.endswith(".url") and isinstance(value, str):
        return redact_url(value)
    return value


class Service:
    """The running daemon.

    >>> raise SystemExit(Service(load_config("/etc/flowd/flowd.toml")).run())
    """

    def __init__(self, config: Config, config_arg: str | None = None, notifier: Notifier | None = None):
        self.config = config
        self.config_arg = config_arg if config_arg is not None else config.path
        self.notifier = notifier or Notifier()
        self.engine: Any = None
        self.pool: Any = None
        self.bridge: Any = None
        self.scheduler: Any = None
        self.reaper: Any = None
        self.discovery: Any = None
        self.lease: Any = None
        self.console: Any = None
        self._console_password: Any = None
        from flowd.store.models import utcnow

        self.started_at = utcnow()
        self._stop_signal: int | None = None
        self._reload_requested = False
        self._exit_code = 0
        self._lock_fd: int | None = None
        self._sig_r: socket.socket | None = None
        self._sig_w: socket.socket | None = None
        self._last_heartbeat = 0.0
        self._last_connected: bool | None = None
        self._last_error: str | None = None
        self._damaged = False
        self._last_counts: dict[str, int] | None = None
        self._last_counts_at = time.monotonic()  # the status sent at connect has them
        self._heap_trimmer = libc.HeapTrimmer()  # each tick: hands free heap back once a busy spell ends

    # ------------------------------------------------------------------ life cycle
    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, stop cleanly; the exit code."""
        setup_logging(self.config)
        self._log_config()
        try:
            self._take_lock()
        except FlowdError as exc:
            log.error("%s", exc)
            return 1
        try:
            return self._run_locked()
        finally:
            self._release_lock()

    def _run_locked(self) -> int:
        from flowd import api
        from flowd.engine import recovery
        from flowd.mqtt.bridge import MqttBridge
        from flowd.queue.workers import WorkerPool
        from flowd.store import integrity

        try:
            # Before anything opens the files: a damaged database is never served half-working,
            # a damaged queue file is set aside (recovery rebuilds the queue from the database).
            integrity.check_at_start(self.config)
            integrity.replace_damaged_queue(self.config)
            self.engine = api.configure(self.config, create=True)
            from flowd.engine.lease import LeaseKeeper

            self.lease = LeaseKeeper(self.config)
            self.lease.renew()  # before recovery: the other nodes leave this node's flows to it
            recovered = recovery.recover(self.config, self.engine)
            # Built (not started) before the fork: a bad TLS file stops us here, cleanly.
            self.bridge = MqttBridge(self.config, self.engine)
            self.bridge.counts = node_counts
            from flowd.mqtt.homeassistant import Discovery

            self.discovery = Discovery(self.config, self.bridge)
            self._read_console_password()
        except Exception as exc:
            damage = exc if isinstance(exc, DatabaseDamaged) else None
            if damage is None and integrity.note_damage(exc, "flowd's start-up"):
                damage = integrity.damage_noticed()
            if damage is not None:
                return self._stop_for_damage(damage)
            if isinstance(exc, StoreUnavailable):
                log.error("cannot start: %s", exc)
                return 3
            if isinstance(exc, FlowdError):
                log.error("cannot start: %s", exc)
                return 2
            raise
        self.pool = WorkerPool(self.config)
        self.pool.start()  # fork: before any thread exists in this process
        try:
            self._install_signal_handlers()
            self._start_threads()
            self._write_heartbeat(force=True)
            libc.trim_heap()  # what recovery and the imports freed
            self.notifier.ready()
            log.info("flowd %s ready: node '%s', %d worker(s), %d flow(s) recovered", __version__,
                     self.config.flowd.node_id, self.config.flowd.workers, recovered)
            self._main_loop()
        except FlowdError as exc:
            log.error("cannot run: %s", exc)
            self._exit_code = 2
        except Exception as exc:
            if not integrity.note_damage(exc, "the daemon"):
                raise
            self._exit_code = self._stop_for_damage(integrity.damage_noticed())
        finally:
            self._shutdown()
        return self._exit_code

    def _stop_for_damage(self, damage: DatabaseDamaged | None) -> int:
        """One clear line, a STATUS= for systemctl status, and the exit code that stops restarts."""
        self._damaged = True
        log.error("%s", damage)
        self.notifier.status("stopped: the database is damaged; run 'flowctl db check' and 'flowctl db recover'")
        return EXIT_DATABASE_DAMAGED

    def _start_threads(self) -> None:
        from flowd.engine.reaper import Reaper

        self.reaper = Reaper(self.config, self.engine)
        self.reaper.on_session_taken = self.bridge.end_session_of
        self.lease.start()
        from flowd.mqtt.bridge import SESSION_LIMIT_S

        self.lease.wait_for_session_drain(SESSION_LIMIT_S + self.config.mqtt.keepalive)
        self.bridge.start()
        if importlib.util.find_spec("flowd.schedule.scheduler") is not None:
            from flowd.schedule.gate import SchedulerGate

            self.scheduler = SchedulerGate(self.config, self.engine)  # APScheduler once a routine has a schedule
            self.scheduler.start()
        else:
            log.warning("schedules are off: this installation has no flowd.schedule.scheduler module")
        self._start_console()

    def _read_console_password(self) -> None:
        """Before the fork, so a bad password file stops the start (SPEC 11)."""
        web = self.config.web
        if web.enabled and web.password_file:
            from flowd.web.auth import load_password

            self._console_password = load_password(web.password_file, self.config.path)

    def _start_console(self) -> None:
        """The console's port, taken now (after the fork: no worker holds it); its web
        libraries are imported at the first connection (flowd.web.lazy)."""
        if not self.config.web.enabled:
            return
        from flowd.web.lazy import LazyConsole

        console = LazyConsole(self.config, self._console_password)
        try:
            console.start()
        except ConfigError as exc:
            log.error("%s; flows run as usual, without the console", exc)
            return
        self.console = console

    def _shutdown(self) -> None:
        """Stop taking work, let running steps finish, publish offline, disconnect."""
        self.notifier.stopping()
        grace = self.config.flowd.shutdown_grace
        why = signal.Signals(self._stop_signal).name if self._stop_signal else "error"
        log.info("stopping (%s): taking no new work; running steps get up to %.0fs", why, grace)
        if self.console is not None:
            self._guard("stopping the web console", self.console.stop)
        if self.bridge is not None:
            self.bridge.stop_intake()
        if self.scheduler is not None:
            self._guard("stopping the scheduler", self.scheduler.shutdown)
        if self.pool is not None:
            self._guard("stopping the worker pool", lambda: self.pool.stop(grace=grace))
        if self._damaged:
            # Nothing more is written to a damaged file. No clean disconnect either: the
            # broker then publishes the Last Will, the retained "offline".
            signal.set_wakeup_fd(-1)
            log.info("flowd stopped")
            return
        if self.bridge is not None and self.bridge.started:
            self._guard("publishing the offline status", self.bridge.publish_offline)
            drained = self._guard("disconnecting from the broker", lambda: self.bridge.stop(drain=STOP_DRAIN_S))
            if not drained:
                log.warning("MQTT: stopped with messages still in the outbox; they are sent at the next start")
        if self.lease is not None:
            self._guard("ending the lease", lambda: self.lease.stop(release=True))
        if self.engine is not None:
            self._guard("recording the stop", self._write_stopped)
        signal.set_wakeup_fd(-1)
        log.info("flowd stopped")

    def _guard(self, what: str, action: Any) -> Any:
        try:
            return action()
        except Exception:
            log.exception("while %s", what)
            return None

    # ------------------------------------------------------------------ the main loop
    def _main_loop(self) -> None:
        next_tick = 0.0
        next_schedule_check = time.monotonic() + SCHEDULE_CHECK_EVERY_S
        while self._stop_signal is None:
            now = time.monotonic()
            timeout = max(0.0, next_tick - now)
            if self.notifier.watchdog_interval is not None:
                timeout = min(timeout, self.notifier.watchdog_interval / 2)
            self._wait_for_signal(timeout)
            if self._stop_signal is not None:
                break
            if self._is_damage_noticed():
                return
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + LOOP_INTERVAL_S
                self._guarded_tick()
            if now >= next_schedule_check:
                next_schedule_check = now + SCHEDULE_CHECK_EVERY_S
                if self.scheduler is not None:
                    self._guarded("schedule check", self.scheduler.check_for_changes)
                self._guarded("wait topics", self.bridge.refresh_wait_topics)
            if self._is_damage_noticed():
                return
            if self.notifier.watchdog_due():
                self.notifier.watchdog()

    def _is_damage_noticed(self) -> bool:
        """A thread or a duty met a damaged database: stop rather than fail the same way forever."""
        from flowd.store import integrity

        damage = integrity.damage_noticed()
        if damage is None:
            return False
        self._exit_code = self._stop_for_damage(damage)
        return True

    def _guarded(self, what: str, action: Any) -> None:
        """Run a periodic duty; an error is logged (once while it repeats) and the loop goes on."""
        from flowd.store import integrity

        try:
            action()
            self._last_error = None
        except Exception as exc:
            if integrity.note_damage(exc, f"the {what}"):
                return  # the main loop stops with one clear line
            text = f"{what}: {type(exc).__name__}: {exc}"
            if text != self._last_error:
                self._last_error = text
                log.exception("%s failed", what)

    def _guarded_tick(self) -> None:
        self._heap_trimmer.idle_point()
        self._guarded("worker supervision", self.pool.replace_dead)
        self._guarded("MQTT protocol fallback", self.bridge.fall_back_if_needed)
        self._guarded("reaper", self.reaper.run_once)
        self._guarded("heartbeat", self._write_heartbeat)
        self._guarded("status", self._send_status)
        self._guarded("node status", self._publish_counts)
        if self.discovery is not None:
            self._guarded("Home Assistant discovery", self.discovery.tick)

    def _send_status(self) -> None:
        if not self.notifier.enabled:
            return  # nobody to tell: spare the query every second
        from flowd import store
        from flowd.store.models import ACTIVE_STATES

        counts = store.count_flows_by_state(ACTIVE_STATES)
        parts = [f"{counts['RUNNING']} running", f"{counts['INIT']} queued"]
        if counts["WAITING"]:
            parts.append(f"{counts['WAITING']} waiting")
        parts.append("broker connected" if self.bridge.is_connected() else "broker unreachable")
        self.notifier.status(", ".join(parts))

    def _publish_counts(self) -> None:
        """Re-publish the retained ``online`` status when the node's counts changed, at most
        every HEARTBEAT_EVERY_S (each is an outbox row: spare the SD card)."""
        now = time.monotonic()
        if now - self._last_counts_at < HEARTBEAT_EVERY_S or not self.bridge.is_connected():
            return
        counts = node_counts()
        if counts != self._last_counts:
            self._last_counts = counts
            self.bridge.publish_online()
        self._last_counts_at = now

    def _write_heartbeat(self, force: bool = False) -> None:
        """The node_status row flowctl reads: on start, when the broker link changes, every 30 s."""
        from flowd import store
        from flowd.store.models import utcnow, write_transaction

        connected = self.bridge.is_connected() if self.bridge is not None else False
        now = time.monotonic()
        if not force and connected == self._last_connected and now - self._last_heartbeat < HEARTBEAT_EVERY_S:
            return
        self._last_heartbeat = now
        self._last_connected = connected
        with write_transaction():
            store.save_heartbeat(self.config.flowd.node_id, os.getpid(), __version__, self.started_at, utcnow(),
                                 connected)

    def _write_stopped(self) -> None:
        from flowd import store
        from flowd.store.models import utcnow, write_transaction

        with write_transaction():
            store.mark_node_stopped(self.config.flowd.node_id, utcnow())

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        # The C-level handler writes to this socket, so select() below returns at once.
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True

    def _wait_for_signal(self, timeout: float) -> None:
        assert self._sig_r is not None
        try:
            readable, _, _ = select.select([self._sig_r], [], [], timeout)
        except InterruptedError:
            return
        if readable:
            try:
                while self._sig_r.recv(64):
                    pass
            except OSError:
                pass

    def _reload(self) -> None:
        """SIGHUP: re-read the configuration; rebuild schedules. Task scripts reload on change."""
        self.notifier.reloading()
        log.info("reloading (SIGHUP)")
        try:
            new = load_config(self.config_arg)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running configuration", exc)
        else:
            changes = config_changes(self.config, new)
            for key, before, after in changes:
                log.info("reload: %s changed from %r to %r", key, before, after)
            later = [key for key, _, _ in changes if key not in LIVE_KEYS]
            if later:
                log.warning("reload: %s take(s) effect at the next restart", ", ".join(later))
            set_level(new.flowd.log_level)
            if not changes:
                log.info("reload: the configuration is unchanged")
            self.config = dataclasses.replace(self.config, flowd=dataclasses.replace(
                self.config.flowd, log_level=new.flowd.log_level))
        if self.scheduler is not None:
            self._guarded("schedule reload", self.scheduler.reload)
        self.notifier.ready()

    # ------------------------------------------------------------------ one daemon per state folder
    def _take_lock(self) -> None:
        self._lock_fd = lock_state_dir(self.config.state_dir)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            unlock_state_dir(self._lock_fd)
            self._lock_fd = None

    def _log_config(self) -> None:
        c = self.config
        m = c.mqtt
        log.info("flowd %s starting (pid %d): config %s; node '%s'; state_dir %s; task_paths %s; %d worker(s); "
                 "database %s; queue %s; broker %s:%d (MQTT %s%s%s); log level %s", __version__, os.getpid(),
                 c.path or "(defaults)", c.flowd.node_id, c.state_dir, ", ".join(c.flowd.task_paths),
                 c.flowd.workers, redact_url(c.database.url), c.queue.backend, m.host, m.port, m.protocol,
                 ", TLS" if m.tls else "", f", user '{m.username}'" if m.username else "", c.flowd.log_level)


def node_counts(now: dt.datetime | None = None) -> dict[str, int]:
    """What the node's retained status tells (``flowctl nodes``): flows running, queued
    and waiting now, and failed in the last hour (of the database this node serves)."""
    from flowd import store
    from flowd.store.models import ACTIVE_STATES, utcnow

    counts = store.count_flows_by_state(ACTIVE_STATES)
    failed = store.count_failed_since((now or utcnow()) - dt.timedelta(hours=1))
    return {"running": counts["RUNNING"], "queued": counts["INIT"], "waiting": counts["WAITING"],
            "failed_last_hour": failed}


def request_reload(config: Config, pid: int | None = None) -> int:
    """``flowd reload`` (ExecReload=): SIGHUP to the daemon, sent by Python itself.

    A minimal Debian has no /bin/kill (procps), so the unit cannot rely on it. The
    configuration was checked by the caller: a broken file fails the reload here, with
    its sentence, and the daemon is not disturbed. Exit 1 when no daemon can be signalled.
    """
    where = config.path or "the defaults"
    if pid is None:
        pid = daemon_pid(config.state_dir)
        if pid is None:
            print(f"flowd reload: no flowd is running with state_dir {config.state_dir}", file=sys.stderr)
            return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"flowd reload: no process {pid}", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"flowd reload: not allowed to signal process {pid} (run as its user or root)", file=sys.stderr)
        return 1
    print(f"flowd reload: {where} is valid; asked flowd (pid {pid}) to reload it")
    return 0
