"""flowd.config: defaults, the example file, and every refusal (one line naming key and file)."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from flowd.config import Config, TlsSection, build_config, find_config_file, load_config, parse_duration
from flowd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "flowd.toml"
NO_SYSTEMD: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "flowd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=NO_SYSTEMD if env is None else env)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert str(path) in message, f"file not named: {message}"
    return info.value


def test_empty_file_gives_every_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, ""), env=NO_SYSTEMD)
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
    assert config.flowd.node_id == host
    assert config.state_dir == tmp_path / "var"                     # outside systemd: ./var
    assert config.flowd.task_paths == (str(tmp_path / "tasks"),)
    assert config.flowd.workers == (os.cpu_count() or 1)
    assert (config.flowd.shutdown_grace, config.flowd.retention, config.flowd.log_level) == (30.0, 30 * 86400.0, "info")
    m = config.mqtt
    assert (m.host, m.port, m.username, m.password, m.tls) == ("127.0.0.1", 1883, None, None, None)
    assert (m.client_id, m.keepalive, m.topic_prefix, m.protocol) == (f"flowd-{host}", 60, "", "5")
    assert (m.session_expiry, m.max_payload, m.outbox_max) == (7 * 86400.0, 65536, 100_000)
    assert (config.scheduler.misfire_grace, config.scheduler.timezone) == (60.0, None)
    assert config.database.url == f"sqlite:///{tmp_path / 'var' / 'flowd.db'}"
    assert config.queue.path == str(tmp_path / "var" / "queue.db")
    assert config.path == str(tmp_path / "flowd.toml")


def test_under_systemd_defaults_follow_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "lib-flowd"
    config = load_config(write(tmp_path, ""), env={"STATE_DIRECTORY": str(state), "INVOCATION_ID": "x"})
    assert config.state_dir == state
    assert config.flowd.task_paths == ("/etc/flowd/tasks",)
    assert config.database.url == f"sqlite:///{state / 'flowd.db'}"


def test_example_file_equals_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    example = load_config(write(tmp_path / "config", EXAMPLE.read_text()), env=NO_SYSTEMD)
    empty = load_config(write(tmp_path / "config", "", name="empty.toml"), env=NO_SYSTEMD)
    assert dataclasses.replace(example, path=None) == dataclasses.replace(empty, path=None)


def example_settings() -> dict[str, dict[str, str]]:
    """Every ``#key = value`` line of the example, by section."""
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^#?\[([a-z.]+)\]\s*$", line)
        if header:
            section = header.group(1)
            continue
        setting = re.match(r"^#([a-z_]+) = (.+)$", line)
        if setting:
            sections.setdefault(section, {})[setting.group(1)] = setting.group(2)
    return sections


def test_example_documents_every_key_with_its_default(tmp_path: Path) -> None:
    # Uncommenting any one line of the example changes nothing, except for keys that are
    # unset by default, whose example value must still be accepted.
    documented = example_settings()
    defaults = build_config({}, env=NO_SYSTEMD)
    sections: dict[str, Any] = {name: getattr(defaults, name) for name in ("flowd", "mqtt", "scheduler", "database",
                                                                         "queue", "web")}
    sections["mqtt.tls"] = TlsSection()
    password_file = write(tmp_path, "pw\n", "password")
    for section, default_values in sections.items():
        fields = {f.name: f.default for f in dataclasses.fields(default_values) if f.name != "tls"}  # [mqtt.tls]
        assert set(documented.get(section, {})) == set(fields), f"[{section}]: documented keys differ from config.py"
        for key, value_text in documented[section].items():
            value = str(password_file) if key == "password_file" else tomllib.loads(f"v = {value_text}")["v"]
            nested: dict[str, Any] = {key: value}
            for part in reversed(section.split(".")):
                nested = {part: nested}
            shown = getattr(_section_of(build_config(nested, str(EXAMPLE), env=NO_SYSTEMD), section), key)
            if fields[key] is not None:
                assert shown == getattr(default_values, key), \
                    f"{section}.{key}: the example shows {value_text}, the default is {getattr(default_values, key)!r}"


def _section_of(config: Config, dotted: str) -> Any:
    obj: Any = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("text", "key", "words"), [
    ("[mqtt]\nport = \"1883\"\n", "mqtt.port", "must be int, not str"),
    ("[mqtt]\nport = true\n", "mqtt.port", "must be int, not bool"),
    ("[mqtt]\nkeepalive = 1.5\n", "mqtt.keepalive", "must be int, not float"),
    ("[mqtt]\nkeepalive = -1\n", "mqtt.keepalive", "must not be negative"),
    ("[flowd]\nshutdown_grace = true\n", "flowd.shutdown_grace", "number of seconds"),
    ("[flowd]\nshutdown_grace = [1]\n", "flowd.shutdown_grace", "number of seconds"),
    ("[mqtt]\nhost = 5\n", "mqtt.host", "must be str, not int"),
    ("[mqtt.tls]\ninsecure = \"yes\"\n", "mqtt.tls.insecure", "must be bool, not str"),
    ("[flowd]\ntask_paths = [1, 2]\n", "flowd.task_paths", "must be a list of strings"),
    ("[flowd]\ntask_paths = 5\n", "flowd.task_paths", "must be a list of strings"),
    ("[flowd]\nretention = \"10 parsecs\"\n", "flowd.retention", "like '30s'"),
    ("[mqtt]\nsession_expiry = -5\n", "mqtt.session_expiry", "must not be negative"),
    ("[flowd]\nlog_level = \"loud\"\n", "flowd.log_level", "must be one of debug, info, warning, error"),
    ("[queue]\nbackend = \"kafka\"\n", "queue.backend", "must be one of sqlite, redis"),
    ("[mqtt]\nprotocol = 3\n", "mqtt.protocol", "must be one of 5, 3.1.1"),
    ("[database]\nsynchronous = \"fast\"\n", "database.synchronous", "must be one of full, normal;"),
    ("[database]\nsynchronous = \"off\"\n", "database.synchronous", "a power cut can corrupt the database"),
    ("[database]\nurl = \"mysql://x\"\n", "database.url", "must start with sqlite:/// or postgresql://"),
    ("[flowd]\nnode_id = \"a/b\"\n", "flowd.node_id", "must not be empty or contain '/'"),
    ("[mqtt]\ntopic_prefix = \"site/#/\"\n", "mqtt.topic_prefix", "must not contain '+' or '#'"),
    ("[scheduler]\ntimezone = \"Mars/Olympus\"\n", "scheduler.timezone", "unknown time zone 'Mars/Olympus'"),
    ("[mqtt]\nhots = \"x\"\n", "mqtt.hots", "unknown key; [mqtt] accepts"),
    ("[mqtt.tls]\npem = \"x\"\n", "mqtt.tls.pem", "unknown key"),
    ("[mqttt]\nhost = \"x\"\n", "mqttt", "unknown section; known sections are database, flowd, homeassistant, mqtt"),
    ("flowd = 5\n", "flowd", "must be a table"),
    ("[mqtt]\npassword_file = \"/nonexistent/flowd-password\"\n", "mqtt.password_file",
     "cannot read the password file: No such file or directory"),
])
def test_bad_key_is_one_line_naming_key_and_file(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = refusal(write(tmp_path, text))
    assert error.key == key
    assert f"key '{key}'" in str(error) and words in str(error), str(error)


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    error = refusal(write(tmp_path, "[mqtt]\nhost = \n"))
    assert "not valid TOML" in str(error) and "line 2" in str(error)


def test_missing_folder_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    assert "does not exist" in str(refusal(tmp_path / "absent.toml"))
    folder = tmp_path / "conf.d"
    folder.mkdir()
    assert "is a folder" in str(refusal(folder))
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b"[mqtt]\nhost = \"caf\xe9\"\n")
    assert "not UTF-8" in str(refusal(binary))


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\n")
    path.chmod(0o000)
    if os.geteuid() != 0:
        assert "permission denied" in str(refusal(path))
        return
    # root reads any file: check as an unprivileged user in a child process instead.
    tmp_path.chmod(0o755)
    code = ("import sys; from flowd.config import load_config; from flowd.errors import ConfigError\n"
            "try:\n    load_config(sys.argv[1], env={})\nexcept ConfigError as e:\n    print(e)\n")
    result = subprocess.run(["/usr/bin/python3", "-c", code, str(path)], capture_output=True, text=True,
                            timeout=60, user=65534, group=65534, cwd="/",
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if result.returncode != 0 and "Permission denied" in result.stderr and "flowd" in result.stderr:
        pytest.skip("the source tree is not readable by nobody")
    assert result.stdout.strip() == f"config error (in {path}): the file cannot be read (permission denied)", \
        result.stdout + result.stderr


def test_password_file_is_read_and_stripped_and_never_shown(tmp_path: Path) -> None:
    secret = write(tmp_path, "  s3cr3t-pa55  \n\n", "password")
    path = write(tmp_path, f'[mqtt]\nusername = "flowd"\npassword_file = "{secret}"\n')
    config = load_config(path, env=NO_SYSTEMD)
    assert config.mqtt.password == "s3cr3t-pa55" and config.mqtt.username == "flowd"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config) and "s3cr3t" not in repr(config.mqtt)
    inline = load_config(write(tmp_path, '[mqtt]\npassword = "inline-pa55"\n', "inline.toml"), env=NO_SYSTEMD)
    assert inline.mqtt.password == "inline-pa55" and "inline-pa55" not in repr(inline)


def test_values_are_converted(tmp_path: Path) -> None:
    path = write(tmp_path, """
[flowd]
task_paths = "scripts"
shutdown_grace = "1m"
retention = "2w"
workers = 3
[mqtt]
protocol = "3.1.1"
session_expiry = 90
[mqtt.tls]
ca = "/etc/ssl/ca.pem"
[scheduler]
misfire_grace = "500ms"
timezone = "Europe/Oslo"
""")
    config = load_config(path, env=NO_SYSTEMD)
    assert config.flowd.task_paths == (str(tmp_path / "scripts"),)  # beside the file, not the current folder
    assert (config.flowd.shutdown_grace, config.flowd.retention, config.flowd.workers) == (60.0, 14 * 86400.0, 3)
    assert (config.mqtt.protocol, config.mqtt.session_expiry) == ("3.1.1", 90.0)
    assert config.mqtt.tls is not None and config.mqtt.tls.ca == "/etc/ssl/ca.pem" and not config.mqtt.tls.insecure
    assert (config.scheduler.misfire_grace, config.scheduler.timezone) == (0.5, "Europe/Oslo")


@pytest.mark.parametrize(("text", "seconds"), [(0, 0.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0),
                                               ("30d", 2592000.0), ("1w", 604800.0), ("250ms", 0.25), (" 7 ", 7.0)])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_lookup_order(tmp_path: Path) -> None:
    explicit, from_env = write(tmp_path, "", "a.toml"), write(tmp_path, "", "b.toml")
    assert find_config_file(str(explicit), {"FLOWD_CONFIG": str(from_env)}) == explicit
    assert find_config_file(None, {"FLOWD_CONFIG": str(from_env)}) == from_env
    config = load_config(None, env={"FLOWD_CONFIG": str(from_env)})
    assert config.path == str(from_env)


@pytest.mark.parametrize("text", ["[flowd]\nshutdown_grace = inf\n", "[flowd]\nretention = nan\n"])
def test_non_finite_duration_is_refused(tmp_path: Path, text: str) -> None:
    # shutdown_grace = inf would wait forever on SIGTERM; retention = nan never prunes.
    refusal(write(tmp_path, text))


@pytest.mark.parametrize("port", [0, 70000])
def test_port_out_of_range_is_refused(tmp_path: Path, port: int) -> None:
    error = refusal(write(tmp_path, f"[mqtt]\nport = {port}\n"))
    assert error.key == "mqtt.port"


@pytest.mark.parametrize("listen", ["127.0.0.1:8470", "localhost:9000", "[::1]:8470", "127.3.4.5:1"])
def test_web_console_on_loopback_needs_no_password(tmp_path: Path, listen: str) -> None:
    config = load_config(write(tmp_path, f'[web]\nlisten = "{listen}"\n'), env=NO_SYSTEMD)
    assert config.web.enabled and config.web.listen == listen and config.web.password_file is None
    assert config.web.address[1] == int(listen.rsplit(":", 1)[1])


@pytest.mark.parametrize("text, key, message", [
    ('[web]\nlisten = "0.0.0.0:8470"\n', "web.password_file", "which other machines can reach"),
    ('[web]\nlisten = "flowd.local:8470"\n', "web.password_file", "set [web] password_file"),
    ('[web]\nlisten = "8470"\n', "web.listen", "must be HOST:PORT"),
    ('[web]\nlisten = "127.0.0.1:99999"\n', "web.listen", "port from 1 to 65535"),
    ('[web]\nlisten = "127.0.0.1:http"\n', "web.listen", "must be HOST:PORT"),
    ("[web]\nenabled = 1\n", "web.enabled", "must be bool"),
    ("[web]\nport = 8470\n", "web.port", "unknown key"),
])
def test_web_section_refusals_name_the_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env=NO_SYSTEMD)
    assert f"key '{key}'" in str(caught.value) and message in str(caught.value)


def test_web_console_off_or_with_a_password_may_listen_anywhere(tmp_path: Path) -> None:
    off = load_config(write(tmp_path, '[web]\nenabled = false\nlisten = "0.0.0.0:8470"\n'), env=NO_SYSTEMD)
    assert not off.web.enabled
    secured = load_config(write(tmp_path, '[web]\nlisten = "0.0.0.0:8470"\npassword_file = "pw"\n'), env=NO_SYSTEMD)
    assert secured.web.password_file is not None and Path(secured.web.password_file).is_absolute()
