"""The house rules of flowd/ (issue 17), checked by scripts/house/check_homes.py: each
third-party library imported within one module or sub-package, no import circle (at
module level or closed by an import inside a function), no module over 600 lines.

The checker is first shown a small tree that breaks each rule, and must name every break.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

CHECK = ROOT / "scripts" / "house" / "check_homes.py"


def check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), str(tree)], capture_output=True, text=True, timeout=60)


def test_the_checker_names_a_second_home_a_hidden_circle_and_a_long_module(tmp_path: Path) -> None:
    package = tmp_path / "flowd"
    (package / "mqtt").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mqtt" / "__init__.py").write_text("")
    (package / "mqtt" / "client.py").write_text("import paho.mqtt.client\n")
    (package / "api.py").write_text("import paho.mqtt.client\n\n\ndef f():\n    from flowd import cli\n")
    (package / "cli.py").write_text("from flowd import api\n" + "x = 1\n" * 600)
    found = check(tmp_path)
    assert found.returncode == 1, found.stdout
    assert "paho: 2 modules in 2 places" in found.stdout
    hidden = found.stdout.split("Import circles hidden by imports inside functions:")[1]
    assert "flowd.api -> flowd.cli -> flowd.api" in hidden or "flowd.cli -> flowd.api -> flowd.cli" in hidden
    assert "Modules over 600 lines: flowd.cli (601)" in found.stdout


def test_flowd_keeps_the_house_rules() -> None:
    found = check(ROOT)
    assert found.returncode == 0, found.stdout
    for family in ("peewee/playhouse/sqlite3: one home: flowd.store/", "paho: one home: flowd.mqtt/",
                   "apscheduler: one home: flowd.schedule/", "huey: one home: flowd.queue/",
                   "systemd: one home: flowd.service/"):
        assert family in found.stdout, found.stdout
    assert "Import circles, module-level imports: none" in found.stdout
    assert "Import circles hidden by imports inside functions: none" in found.stdout
    assert "Modules over 600 lines: none" in found.stdout
