"""Waiting for a flow from elsewhere, seeing every node, and appearing in Home Assistant,
against a real ``flowd run``, a real mosquitto and real ``flowctl`` processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import ROOT, flowd_env, wait_for, write_config

from flowd import api, catalog
from flowd.store.models import Flow

WAITER = textwrap.dedent('''
    """api.wait_flow in a process of its own, counting the reads of the flow table."""
    import json, sys, time
    from flowd import api
    from flowd.errors import FlowWaitTimeout
    from flowd.store.models import database

    api.configure(sys.argv[1])
    reads = []
    database.obj.connection().set_trace_callback(
        lambda sql: reads.append(sql) if sql.startswith("SELECT") and 'FROM "flow"' in sql else None)
    for item in sys.argv[2:]:
        flow_id, timeout = item.split(":")
        reads.clear()
        began = time.time()
        try:
            flow = api.wait_flow(int(flow_id), timeout=float(timeout) if timeout else None)
            outcome = {"state": flow.state, "finished_at": flow.finished_at.timestamp() if flow.finished_at else None}
        except FlowWaitTimeout as exc:
            outcome = {"timeout": str(exc), "state": exc.state}
        print(json.dumps({"flow": int(flow_id), "returned": time.time(), "waited": time.time() - began,
                          "reads": len(reads), **outcome}), flush=True)
''')


def start(broker: Any, config_path: Path, flowd_proc: Any, watcher: Any, node: str = "testnode") -> Any:
    """Start flowd and wait for its retained ``online`` status."""
    proc = flowd_proc(config_path)
    before = len(watcher.json_on(f"flowd/{node}/status"))
    wait_for(lambda: [m for m in watcher.json_on(f"flowd/{node}/status")[before:] if m["state"] == "online"],
             timeout=30, message=f"flowd {node} online; log:\n{proc.log_text()}")
    return proc


def test_wait_flow_and_flow_wait_from_another_process_and_folder(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, db: Any,
        task_dir: Path, tmp_path: Path) -> None:
    # Flows started by this process; another process, in another folder, waits for
    # them with api.wait_flow (then flowctl flow wait): a 3 s flow that ends DONE, one
    # that FAILS, one still running when the timeout passes. The waiter is woken by
    # the flow's messages: it reads the flow table a few times, not every 0.15 s, and
    # returns well before its slow database check (5 s) would have noticed.
    paths = [str(task_dir)]
    catalog.save_task("sleep3", "t.Sleep", options={"seconds": 3}, task_paths=paths)
    catalog.save_task("sleep1", "t.Sleep", options={"seconds": 1}, task_paths=paths)
    catalog.save_task("fail", "t.Fail", task_paths=paths)
    catalog.save_task("sleep60", "t.Sleep", options={"seconds": 60}, task_paths=paths)
    catalog.save_routine("slow-ok", ["sleep3"])
    catalog.save_routine("slow-fail", ["sleep1", "fail"])
    catalog.save_routine("long", ["sleep60"])
    config_path = config_file(broker=broker)
    watcher = session_client(["flowd/#"])
    start(broker, config_path, flowd_proc, watcher)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = elsewhere / "waiter.py"
    script.write_text(WAITER)
    ok_id = api.submit_flow("slow-ok").id
    fail_id = api.submit_flow("slow-fail").id
    long_id = api.submit_flow("long").id
    waiter = subprocess.run([sys.executable, str(script), str(config_path), f"{ok_id}:", f"{fail_id}:30",
                             f"{long_id}:1"], capture_output=True, text=True, cwd=str(elsewhere), timeout=60,
                            env=flowd_env())
    assert waiter.returncode == 0, waiter.stderr
    done, failed, timed_out = [json.loads(line) for line in waiter.stdout.splitlines()]
    assert done["state"] == "DONE"
    assert done["returned"] - done["finished_at"] < 1.0  # woken by the result, not the 5 s check
    assert done["waited"] > 2.0 and done["reads"] <= 8  # ~3 s: a 0.15 s loop would have read it 20 times
    assert failed["state"] == "FAILED"
    assert timed_out["state"] == "RUNNING" and "did not end within 1s" in timed_out["timeout"]
    assert 0.9 < timed_out["waited"] < 3.0
    assert Flow.get_by_id(long_id).state == "RUNNING"  # waiting never touches the flow

    def flowctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config_path), *args],
                              capture_output=True, text=True, cwd=str(elsewhere), env=flowd_env(), timeout=60)

    ok_id = api.submit_flow("slow-ok").id
    fail_id = api.submit_flow("slow-fail").id
    result = flowctl("flow", "wait", str(ok_id))
    assert result.returncode == 0, result.stderr
    assert f"flow {ok_id} (slow-ok) RUNNING step 1/1 sleep3" in result.stdout
    assert f"flow {ok_id} (slow-ok) DONE after" in result.stdout
    result = flowctl("--json", "flow", "wait", str(fail_id))
    assert result.returncode == 1 and json.loads(result.stdout)["state"] == "FAILED"
    result = flowctl("flow", "wait", str(long_id), "--timeout", "1")
    assert result.returncode == 124 and f"flow {long_id} goes on" in result.stderr
    result = flowctl("flow", "wait", "999999")
    assert result.returncode == 2 and "999999" in result.stderr and "Traceback" not in result.stderr

    # Without the broker the waiter still finds the end, by its once-a-second check.
    broker.stop()
    ok_id = api.submit_flow("slow-ok").id
    began = time.monotonic()
    assert api.wait_flow(ok_id, timeout=30).state == "DONE"
    assert time.monotonic() - began < 6.0


def test_nodes_lists_two_daemons_on_one_broker(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                               session_client: Any, mqtt_client: Any, tmp_path: Path,
                                               task_dir: Path) -> None:
    # Two nodes, each with its own state folder, share one broker. Node "alpha" has one
    # flow that failed a moment ago (recorded with flowctl run --record). flowctl nodes
    # lists both, online, with version, since and counts; stopped, beta is offline.
    alpha = config_file(broker=broker, flowd={"node_id": "alpha"})
    beta_state = tmp_path / "beta-state"
    beta_state.mkdir(mode=0o700)
    beta = write_config(tmp_path / "beta.toml", {
        "flowd": {"state_dir": str(beta_state), "task_paths": [str(task_dir)], "workers": 1, "node_id": "beta",
                  "shutdown_grace": 5},
        "mqtt": {"host": "127.0.0.1", "port": broker.port}})

    def flowctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config), *args],
                              capture_output=True, text=True, cwd=str(ROOT), env=flowd_env(), timeout=60)

    assert flowctl(alpha, "task", "add", "fail", "t.Fail").returncode == 0
    assert flowctl(alpha, "routine", "add", "broken", "fail").returncode == 0
    assert flowctl(alpha, "run", "broken", "--record").returncode == 1
    watcher = session_client(["flowd/#"])
    start(broker, alpha, flowd_proc, watcher, node="alpha")
    beta_proc = start(broker, beta, flowd_proc, watcher, node="beta")
    result = flowctl(alpha, "--json", "nodes")
    assert result.returncode == 0, result.stderr
    nodes = {n["node_id"]: n for n in json.loads(result.stdout)}
    assert set(nodes) == {"alpha", "beta"}
    from flowd import __version__

    for node in nodes.values():
        assert node["state"] == "online" and node["version"] == __version__
        assert node["since"].endswith("Z")
        assert set(node["counts"]) == {"running", "queued", "waiting", "failed_last_hour"}
    assert nodes["alpha"]["counts"]["failed_last_hour"] == 1
    assert nodes["beta"]["counts"]["failed_last_hour"] == 0
    text = flowctl(alpha, "nodes").stdout
    assert "alpha" in text and "beta" in text and "online" in text and "FAILED 1H" in text
    # Whatever else sits on the broker cannot break the listing or the terminal.
    other = mqtt_client("someone-else")
    other.client.publish("flowd/junk/status", "not json", qos=1, retain=True).wait_for_publish(5)
    other.client.publish("flowd/evil/status", json.dumps({"state": "online\x1b[31m", "since": "yesterday",
                                                                "counts": [1]}), qos=1, retain=True).wait_for_publish(5)
    listed = flowctl(alpha, "nodes")
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "junk" in listed.stdout and "unreadable" in listed.stdout
    assert "online\\x1b[31m" in listed.stdout and "yesterday" in listed.stdout
    assert beta_proc.terminate() == 0
    nodes = {n["node_id"]: n for n in json.loads(flowctl(alpha, "--json", "nodes").stdout)}
    assert nodes["beta"]["state"] == "offline" and nodes["alpha"]["state"] == "online"


def test_nodes_without_a_broker_is_a_clear_error(flowctl: Any) -> None:
    result = flowctl("nodes", timeout=30)
    assert result.returncode == 3
    assert "cannot list nodes" in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr


def _configs(watcher: Any, component: str, object_id: str) -> list[Any]:
    return watcher.json_on(f"homeassistant/{component}/flowd_testnode/{object_id}/config")


def test_home_assistant_discovery(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                  session_client: Any, mqtt_client: Any, db: Any, task_dir: Path) -> None:
    # flowd with [homeassistant] discovery = true publishes, retained, a button and a
    # sensor for each routine MQTT may start ('greenhouse', 'other', 'third'; not 'local').
    # Home Assistant pressing the button (payload_press on command_topic) starts the
    # routine; its sensor's state topic then holds the flow's end. Removing a routine
    # empties its configs; Home Assistant's birth message makes flowd publish again;
    # discovery turned off removes every entity at the next start.
    paths = [str(task_dir)]
    catalog.save_task("reading", "greenhouse.Reading", options={"raw": 312}, task_paths=paths)
    catalog.save_routine("greenhouse", ["reading"])
    catalog.save_routine("other", ["reading"])
    catalog.save_routine("third", ["reading"])
    catalog.save_routine("local", ["reading"], mqtt=False)
    watcher = session_client(["homeassistant/#", "flowd/#", "flow/+/result"])
    proc = start(broker, config_file(broker=broker, homeassistant={"discovery": True}), flowd_proc, watcher)
    button = wait_for(lambda: _configs(watcher, "button", "greenhouse"), timeout=10, message="button config")[-1]
    sensor = wait_for(lambda: _configs(watcher, "sensor", "greenhouse"), timeout=10, message="sensor config")[-1]
    assert _configs(watcher, "button", "local") == []
    # What Home Assistant's MQTT button and sensor require, and what ties them to the node.
    device = {"identifiers": ["flowd_testnode"], "name": "flowd testnode", "manufacturer": "flowd",
              "model": "flowd node", "sw_version": button["device"]["sw_version"]}
    for config in (button, sensor):
        assert config["device"] == device
        assert config["availability_topic"] == "flowd/testnode/status"
        assert config["availability_template"] == "{{ value_json.state }}"
        assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
        assert config["origin"]["name"] == "flowd"
    assert button["unique_id"] == "flowd_testnode_greenhouse_run" != sensor["unique_id"]
    assert button["command_topic"] == "flowd/testnode/submit"
    assert json.loads(button["payload_press"]) == {"routine": "greenhouse"}
    assert sensor["state_topic"] == sensor["json_attributes_topic"] == "flowd/testnode/routines/greenhouse/last"
    assert sensor["value_template"] == "{{ value_json.state }}"
    assert {"flow_id", "result", "error", "finished_at"} <= {
        part.split('"')[1] for part in sensor["json_attributes_template"].split(", ")}

    # Pressing the button.
    presser = mqtt_client("home-assistant")
    presser.publish(button["command_topic"], button["payload_press"])
    result = wait_for(lambda: [m for m in watcher.json_on("flow/+/result") if m["routine"] == "greenhouse"],
                      timeout=20, message="the pressed routine's result")[-1]
    assert result["state"] == "DONE" and Flow.get_by_id(result["flow_id"]).trigger == "mqtt"
    last = wait_for(lambda: watcher.json_on(sensor["state_topic"]), timeout=10, message="the sensor state")[-1]
    assert (last["state"], last["flow_id"], last["finished_at"]) == ("DONE", result["flow_id"],
                                                                     result["finished_at"])
    fresh = mqtt_client("ha-restarted")  # retained: what a Home Assistant that starts now is told
    fresh.subscribe(sensor["state_topic"])
    assert wait_for(lambda: fresh.json_on(sensor["state_topic"]), timeout=5)[-1]["flow_id"] == result["flow_id"]

    # Removing the routine removes its entities (an empty retained config) and its state.
    catalog.remove_routine("greenhouse")
    wait_for(lambda: watcher.received("homeassistant/button/flowd_testnode/greenhouse/config")[-1][1] == b"",
             timeout=10, message="the button's config emptied")
    # published just after the button's: it may reach the watcher a moment later
    wait_for(lambda: watcher.received("homeassistant/sensor/flowd_testnode/greenhouse/config")[-1][1] == b"",
             timeout=5, message="the sensor's config emptied")
    late = mqtt_client("ha-late")
    late.subscribe("homeassistant/#")
    time.sleep(0.5)  # retained messages come right after the SUBACK; give them time to arrive
    topics = {t for t, _, _ in late.messages}
    assert "homeassistant/button/flowd_testnode/other/config" in topics
    assert "homeassistant/button/flowd_testnode/greenhouse/config" not in topics

    # Home Assistant announces itself: flowd publishes its configs again.
    before = len(_configs(watcher, "button", "other"))
    presser.publish("homeassistant/status", "online", qos=0)
    wait_for(lambda: len(_configs(watcher, "button", "other")) > before, timeout=10,
             message="configs published again after the birth message")
    assert "Home Assistant announced itself" in proc.log_text()

    # A routine MQTT may no longer start loses its entities too.
    assert _configs(watcher, "button", "third")[-1]["command_topic"] == "flowd/testnode/submit"
    catalog.save_routine("third", ["reading"], mqtt=False)
    wait_for(lambda: watcher.received("homeassistant/button/flowd_testnode/third/config")[-1][1] == b"",
             timeout=10, message="the button of a routine without mqtt emptied")

    # Discovery off: at the next start every entity it published is removed.
    assert proc.terminate() == 0
    start(broker, config_file(broker=broker, homeassistant={"discovery": False}), flowd_proc, watcher)
    wait_for(lambda: watcher.received("homeassistant/button/flowd_testnode/other/config")[-1][1] == b"",
             timeout=10, message="the other button emptied with discovery off")


def test_discovery_ids_keep_to_home_assistants_characters(config: Any) -> None:
    # Routine names may hold '.', which a discovery topic id may not: 'a.b' and 'a_b'
    # must still be two entities, each under a topic Home Assistant accepts.
    import re

    from flowd.mqtt.homeassistant import discovery_id, entity_configs

    assert discovery_id("greenhouse") == "greenhouse"
    assert discovery_id("a.b") != discovery_id("a_b") == "a_b"
    configs = entity_configs(config, ["a.b", "a_b"])
    assert len(configs) == 4 and len({json.loads(c)["unique_id"] for c in configs.values()}) == 4
    assert all(re.fullmatch(r"homeassistant/(button|sensor)/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config", t) for t in configs)
