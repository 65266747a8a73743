"""Configuration: one TOML file parsed once into frozen dataclasses (SPEC 8).

Lookup order: ``--config``, ``$FLOWD_CONFIG``, ``/etc/flowd/flowd.toml``,
``./config/flowd.toml``; with none of them present every default applies.
This is the only module that reads the environment or configuration files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowd.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/flowd/flowd.toml")
LOCAL_CONFIG = Path("config/flowd.toml")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object, *, what: str = "duration") -> float:
    """Seconds from a number or a string like ``"30s"``, ``"5m"``, ``"30d"``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds or a string like '30s', not {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number of seconds, not {value!r}")
        if value < 0:
            raise ValueError(f"{what} must not be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"{what} must be a number of seconds or a string like '30s', '5m', '30d'; got {value!r}")


_SECRET_PARAMETER = re.compile(r"pass|secret|token|key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A database or queue URL fit to log or show: the password (``postgresql://u:***@host/db``)
    and any secret-looking query parameter (``?password=``, ``?sslkey=``) masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    location, query_sep, query = rest.partition("?")
    credentials, at, host = location.rpartition("@")
    if at and ":" in credentials:
        location = f"{credentials.split(':', 1)[0]}:***@{host}"
    if query_sep:
        masked = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            masked.append(f"{name}=***" if eq and value and _SECRET_PARAMETER.search(name) else pair)
        query = "&".join(masked)
    return f"{scheme}://{location}{query_sep}{query}"


def _under_systemd(env: Mapping[str, str]) -> bool:
    return bool(env.get("INVOCATION_ID") or env.get("STATE_DIRECTORY"))


@dataclass(frozen=True)
class FlowdSection:
    """``[flowd]``: the node itself."""

    node_id: str = ""
    state_dir: str = ""
    task_paths: tuple[str, ...] = ()
    workers: int = 0
    shutdown_grace: float = 30.0
    retention: float = 30 * 86400.0
    log_level: str = "info"
    # Several nodes on one database (SPEC 10): a node that has not renewed its lease for
    # this long is taken for dead, and the live nodes take over its flows.
    lease: float = 5.0


@dataclass(frozen=True)
class TlsSection:
    """``[mqtt.tls]``: certificates for a TLS connection to the broker."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class MqttSection:
    """``[mqtt]``: the broker connection and topics."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    tls: TlsSection | None = None
    client_id: str = ""
    keepalive: int = 60
    topic_prefix: str = ""
    session_expiry: float = 7 * 86400.0
    max_payload: int = 64 * 1024
    outbox_max: int = 100_000
    protocol: str = "5"
    shared_group: str | None = None


@dataclass(frozen=True)
class SchedulerSection:
    """``[scheduler]``: how schedules fire."""

    misfire_grace: float = 60.0
    timezone: str | None = None


@dataclass(frozen=True)
class DatabaseSection:
    """``[database]``: where flows live (SPEC 10)."""

    url: str = ""
    synchronous: str = "full"


@dataclass(frozen=True)
class QueueSection:
    """``[queue]``: the huey queue that hands steps to workers (SPEC 10)."""

    backend: str = "sqlite"
    path: str = ""
    url: str = "redis://127.0.0.1:6379/0"
    name: str = "flowd"


@dataclass(frozen=True)
class HomeAssistantSection:
    """``[homeassistant]``: MQTT discovery (SPEC 12)."""

    discovery: bool = False
    prefix: str = "homeassistant"


@dataclass(frozen=True)
class WebSection:
    """``[web]``: the console and /metrics served by ``flowd run`` (SPEC 11)."""

    enabled: bool = True
    listen: str = "127.0.0.1:8470"
    password_file: str | None = None
    open_metrics: bool = False

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of ``listen``; validated at load."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``path`` is the file it came from (None: defaults only)."""

    flowd: FlowdSection
    mqtt: MqttSection
    scheduler: SchedulerSection
    database: DatabaseSection
    queue: QueueSection
    path: str | None = None
    homeassistant: HomeAssistantSection = field(default_factory=HomeAssistantSection)
    web: WebSection = field(default_factory=WebSection)

    @property
    def state_dir(self) -> Path:
        return Path(self.flowd.state_dir)

    def topic(self, suffix: str) -> str:
        """A topic with the configured prefix, e.g. ``topic('flow/submit')``."""
        return self.mqtt.topic_prefix + suffix


_SECTIONS: dict[str, type] = {
    "flowd": FlowdSection,
    "mqtt": MqttSection,
    "scheduler": SchedulerSection,
    "database": DatabaseSection,
    "queue": QueueSection,
    "homeassistant": HomeAssistantSection,
    "web": WebSection,
}
_DURATION_KEYS = {"shutdown_grace", "retention", "session_expiry", "misfire_grace", "lease"}
_CHOICES = {
    ("flowd", "log_level"): ("debug", "info", "warning", "error"),
    ("database", "synchronous"): ("full", "normal"),  # never "off": it can corrupt the file (DESIGN.md)
    ("queue", "backend"): ("sqlite", "redis"),
    ("mqtt", "protocol"): ("5", "3.1.1"),
}


def find_config_file(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """The file to read, by SPEC 8's lookup order; None when there is none (defaults apply)."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("FLOWD_CONFIG"):
        return Path(env["FLOWD_CONFIG"])
    for candidate in (SYSTEM_CONFIG, LOCAL_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and complete the configuration.

    Raises ConfigError naming the key and the file for an unknown key, a wrong type or
    an unreadable file.
    """
    env = os.environ if env is None else env
    file = find_config_file(os.fspath(path) if path is not None else None, env)
    raw: dict[str, Any] = {}
    where = str(file) if file else None
    if file is not None:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("the file does not exist", path=where) from None
        except PermissionError:
            raise ConfigError("the file cannot be read (permission denied)", path=where) from None
        except IsADirectoryError:
            raise ConfigError("is a folder, not a TOML file", path=where) from None
        except UnicodeDecodeError:
            raise ConfigError("the file is not UTF-8 text", path=where) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", path=where) from None
    return build_config(raw, where, env)


def build_config(raw: Mapping[str, Any], where: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document and fill in the defaults."""
    env = os.environ if env is None else env
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section; known sections are {', '.join(sorted(_SECTIONS))}",
                              key=name, path=where)
    sections = {name: _build_section(name, cls, raw.get(name, {}), where) for name, cls in _SECTIONS.items()}
    return _complete(Config(path=where, **sections), env, where)


def _build_section(name: str, cls: type, values: Any, where: str | None) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"must be a table ([{name}]), not {type(values).__name__}", key=name, path=where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"unknown key; [{name}] accepts {', '.join(sorted(known))}", key=dotted, path=where)
        kwargs[key] = _convert(dotted, hints[key], value, where)
        choices = _CHOICES.get((name, key))
        if (name, key) == ("database", "synchronous") and kwargs[key] == "off":
            raise ConfigError('"off" is not accepted: a power cut can corrupt the database with it; use "normal", '
                              "which syncs only before flowd acknowledges or publishes something",
                              key=dotted, path=where)
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)}; got {value!r}", key=dotted, path=where)
    return cls(**kwargs)


def _convert(key: str, hint: Any, value: Any, where: str | None) -> Any:
    short = key.rsplit(".", 1)[-1]
    if short in _DURATION_KEYS:
        try:
            return parse_duration(value, what="the value")
        except ValueError as exc:
            raise ConfigError(str(exc), key=key, path=where) from None
    if short == "protocol" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value) if value != 5 else "5"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    if dataclasses.is_dataclass(hint):
        return _build_section(key, hint, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"must be a list of strings, not {value!r}", key=key, path=where)
        return tuple(value)
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}[hint]
    if (isinstance(value, bool) and hint is not bool) or not isinstance(value, expected):
        raise ConfigError(f"must be {hint.__name__}, not {type(value).__name__} ({value!r})", key=key, path=where)
    if hint is float and not math.isfinite(float(value)):
        raise ConfigError(f"must be a finite number, not {value!r}", key=key, path=where)
    if hint in (int, float) and float(value) < 0:
        raise ConfigError(f"must not be negative, got {value!r}", key=key, path=where)
    return hint(value)


def _hostname_node_id() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "flowd"


def base_folders(where: str | None) -> tuple[Path, Path]:
    """(folder for relative paths written in the file, folder for the default ``var`` and
    ``tasks``): the file's folder, so flowd, flowctl and api agree from any current folder.
    A file in a folder named ``config`` (this repository's layout: config/, tasks/, var/)
    keeps its defaults beside that folder. Without a file, both are the current folder."""
    if where is None:
        return Path.cwd(), Path.cwd()
    folder = Path(where).expanduser().absolute().parent
    return folder, folder.parent if folder.name == "config" else folder


def _resolve(path: str, base: Path) -> str:
    return str(base / Path(path).expanduser())  # an absolute path stays as it is


def _complete(config: Config, env: Mapping[str, str], where: str | None) -> Config:
    """Fill the defaults that depend on the machine, resolve relative paths, and read
    secrets from files."""
    f = config.flowd
    systemd = _under_systemd(env)
    base, home = base_folders(where)
    default_state = env.get("STATE_DIRECTORY", "").split(":")[0] or ("/var/lib/flowd" if systemd else "var")
    state_dir = _resolve(f.state_dir, base) if f.state_dir else _resolve(default_state, home)
    task_paths = tuple(_resolve(p, base) for p in f.task_paths) or (
        ("/etc/flowd/tasks",) if systemd else (_resolve("tasks", home),))
    flowd = dataclasses.replace(
        f,
        node_id=f.node_id or _hostname_node_id(),
        state_dir=state_dir,
        task_paths=task_paths,
        workers=f.workers or os.cpu_count() or 1,
    )
    if any(c in flowd.node_id for c in "+#/") or not flowd.node_id:
        raise ConfigError(f"must not be empty or contain '/', '+' or '#'; got {flowd.node_id!r}",
                          key="flowd.node_id", path=where)
    if flowd.lease < 1.0:
        raise ConfigError(f"must be at least 1s (the node renews it every third of it); got {flowd.lease:g}s",
                          key="flowd.lease", path=where)
    m = config.mqtt
    if not 1 <= m.port <= 65535:
        raise ConfigError(f"must be a TCP port from 1 to 65535, not {m.port}", key="mqtt.port", path=where)
    password = m.password
    password_file = _resolve(m.password_file, base) if m.password_file else None
    tls = m.tls
    if tls is not None:
        tls = dataclasses.replace(tls, ca=tls.ca and _resolve(tls.ca, base), cert=tls.cert and _resolve(tls.cert, base),
                                  key=tls.key and _resolve(tls.key, base))
    if password_file:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the password file: {exc.strerror}", key="mqtt.password_file",
                              path=where) from None
    if any(c in m.topic_prefix for c in "+#"):
        raise ConfigError(f"must not contain '+' or '#'; got {m.topic_prefix!r}", key="mqtt.topic_prefix", path=where)
    mqtt = dataclasses.replace(m, password=password, password_file=password_file, tls=tls,
                               client_id=m.client_id or f"flowd-{flowd.node_id}")
    db = config.database
    url = db.url or f"sqlite:///{Path(flowd.state_dir) / 'flowd.db'}"
    if url.startswith("sqlite:///"):
        url = "sqlite:///" + _resolve(url[len("sqlite:///"):], base)
    database = dataclasses.replace(db, url=url)
    if not (database.url.startswith("sqlite:///") or database.url.startswith(("postgresql://", "postgres://"))):
        raise ConfigError(f"must start with sqlite:/// or postgresql://; got {database.url!r}",
                          key="database.url", path=where)
    q = config.queue
    queue = dataclasses.replace(q, path=_resolve(q.path, base) if q.path else str(Path(flowd.state_dir) / "queue.db"))
    prefix = config.homeassistant.prefix
    if not prefix or any(c in prefix for c in "+#\x00") or prefix.startswith("/") or prefix.endswith("/"):
        raise ConfigError(f"must be a topic without '+', '#' or a '/' at either end; got {prefix!r}",
                          key="homeassistant.prefix", path=where)
    tz = config.scheduler.timezone
    if tz:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"unknown time zone {tz!r}; use an IANA name like 'Europe/Oslo'",
                              key="scheduler.timezone", path=where) from None
    return dataclasses.replace(config, flowd=flowd, mqtt=mqtt, database=database, queue=queue,
                               web=_check_web(config.web, base, where))


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_web(web: WebSection, base: Path, where: str | None) -> WebSection:
    """``listen`` is HOST:PORT; anything but loopback needs ``password_file`` (SPEC 11)."""
    host, colon, port = web.listen.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"must be HOST:PORT with a port from 1 to 65535, e.g. \"127.0.0.1:8470\"; got {web.listen!r}",
                          key="web.listen", path=where)
    password_file = _resolve(web.password_file, base) if web.password_file else None
    if web.enabled and not password_file and not is_loopback_host(host.strip("[]")):
        raise ConfigError(f"the console would listen on {web.listen}, which other machines can reach: set "
                          "[web] password_file (a file holding the console's password, readable by flowd's user "
                          "only), or listen on 127.0.0.1", key="web.password_file", path=where)
    return dataclasses.replace(web, password_file=password_file or None)
