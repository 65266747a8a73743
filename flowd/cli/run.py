"""flowctl commands for living with flowd: ``run`` (a routine in the foreground),
``flow wait`` (and ``submit --wait``), ``nodes``. cli.py parses and registers them.

Like cli.py, nothing heavy is imported before a command needs it.
"""

from __future__ import annotations

import sys
import time

from flowd.cli.common import (
    EXIT_FLOW_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_WAIT_TIMEOUT,
    Context,
    parse_pairs,
    parse_value,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from flowd.cli.foreground import Attempt, Published, Run

NODES_WAIT_S = 3.0       # at most this long for the broker's retained statuses
NODES_QUIET_S = 0.5      # when the broker ignores our marker message: this long without news ends it


# --------------------------------------------------------------------------- flowctl run
def cmd_run(ctx: Context) -> int:
    """Run a routine here, step by step, printing each step's input and output."""
    from flowd.cli.foreground import Definitions, ForegroundRunner, record_run
    from flowd.loader import ScriptLoader

    a = ctx.args
    args = [parse_value(v) for v in a.args]
    kwargs = parse_pairs(a.kw, "--kw")
    events = [parse_value(e) for e in a.event or ()]
    task_paths = ctx.config.flowd.task_paths
    if a.file:
        from flowd.apply import read_file

        definitions = Definitions.from_document(read_file(a.file), task_paths, a.file)
    else:
        ctx.open_database()
        definitions = Definitions.from_database()
    printer = RunPrinter(sys.stderr if ctx.json else sys.stdout, quiet=ctx.json)
    runner = ForegroundRunner(definitions, ScriptLoader(task_paths), events=events, reporter=printer)
    run = runner.run_routine(a.routine, args, kwargs)
    recorded = None
    if a.record:
        ctx.open_database(create=True)
        recorded = record_run(run)
    data = {**run.as_dict(), "recorded_flow": recorded}
    ctx.emit(data, printer.summary(run, recorded))
    return EXIT_OK if run.ok else EXIT_FLOW_FAILED


class RunPrinter:
    """Prints a foreground run as it goes: one block per attempt, publishes as they happen."""

    def __init__(self, stream: Any, quiet: bool = False):
        from flowd.cli.display import terminal_width

        self.stream = stream
        self.quiet = quiet
        self.width = terminal_width() - 1

    def _line(self, depth: int, text: str) -> None:
        if not self.quiet:
            print("    " * depth + text, file=self.stream, flush=True)

    def _value(self, value: Any, depth: int) -> str:
        from flowd.cli.display import compact

        return compact(value, max(self.width - 13 - 4 * depth, 20))

    def step_started(self, run: Run, attempt: Attempt) -> None:
        again = f", attempt {attempt.attempt}" if attempt.attempt > 1 else ""
        self._line(run.depth, f"step {attempt.position + 1}/{attempt.steps} {attempt.task} ({attempt.script}){again}")
        self._line(run.depth, f"  input    {self._value(attempt.input, run.depth)}")
        if attempt.options:
            self._line(run.depth, f"  options  {self._value(attempt.options, run.depth)} (merged under the kwargs)")

    def published(self, run: Run, attempt: Attempt, message: Published) -> None:
        payload = message.payload.decode("utf-8", "replace") if isinstance(message.payload, bytes) else message.payload
        shown = _printable(payload) if isinstance(payload, str) else self._value(payload, run.depth)
        flags = f"qos {message.qos}" + (", retained" if message.retain else "")
        self._line(run.depth, f"  publish  {message.topic} {shown} ({flags}; not sent: flowctl run sends nothing)")

    def logged(self, run: Run, attempt: Attempt, level: str, message: str) -> None:
        self._line(run.depth, f"  log      {level} {_printable(message)}")

    def step_ended(self, run: Run, attempt: Attempt) -> None:
        from flowd.cli.display import human_duration

        took = human_duration(attempt.seconds) if attempt.seconds >= 1 else f"{attempt.seconds * 1000:.1f} ms"
        if attempt.error is not None:
            lines = [_printable(line) for line in attempt.error.rstrip().splitlines()] or ["failed"]
            self._line(run.depth, f"  FAILED   {lines[-1]} ({took})")
            for line in lines[:-1]:
                self._line(run.depth, f"           {line}")
            if attempt.retry_in is not None:
                self._line(run.depth, f"  retry    in {human_duration(attempt.retry_in)} (the task's retry_delay, "
                                      "doubling)")
            return
        if attempt.wait is not None and "topic" in attempt.wait:
            match = f" matching {self._value(attempt.wait['match'], run.depth)}" if attempt.wait.get("match") else ""
            self._line(run.depth, f"  wait     for a message on '{attempt.wait['topic']}'{match}"
                                  + (f", up to {human_duration(attempt.wait['timeout'])}" if attempt.wait.get(
                                      "timeout") else ""))
            if attempt.output is not None:
                self._line(run.depth, f"  event    {self._value(attempt.event, run.depth)} (given with --event)")
        if attempt.output is not None:
            self._line(run.depth, f"  output   {self._value(attempt.output, run.depth)} ({took})")

    def subflow_started(self, run: Run, attempt: Attempt, routine: str) -> None:
        self._line(run.depth, f"  sub-flow routine {routine} (the daemon runs it as its own flow, trigger "
                              "'flow'; here it runs nested):")

    def run_ended(self, run: Run) -> None:
        if run.depth:
            self._line(run.depth, f"sub-flow {run.routine} {run.state}")

    def summary(self, run: Run, recorded: int | None) -> str:
        from flowd.cli.display import compact, human_duration, span

        seconds = span(run.started_at, run.finished_at) or 0.0
        took = human_duration(seconds) if seconds >= 1 else f"{seconds * 1000:.1f} ms"
        where = f"recorded as flow {recorded}" if recorded else "nothing stored"
        sent = len(run.published)
        lines = [f"{run.routine} {run.state} after {took} ({where}; {sent} publish{'es' if sent != 1 else ''} "
                 "not sent)"]
        if run.state == "DONE":
            lines.append(f"result: {compact(run.result, self.width - 8)}")
        elif run.error:
            lines.append(f"{'error' if run.state == 'FAILED' else 'stopped'}: {run.error}")
        if run.state == "WAITING":
            lines.append("give the awaited message with --event JSON (once per Wait) to go on")
        return "\n".join(lines)


# --------------------------------------------------------------------------- flow wait / submit --wait
def cmd_flow_wait(ctx: Context) -> int:
    """Follow a flow started anywhere until it ends; the exit code is its outcome."""
    ctx.open_database()
    return follow_flow(ctx, ctx.args.id, ctx.args.timeout)


def follow_flow(ctx: Context, flow_id: int, timeout: float | None) -> int:
    """Live progress of a flow until it ends: one line redrawn on a terminal, a line per
    change otherwise. Woken by the flow's messages on the broker (flowd.engine.waiting), not by
    reading the database in a loop. Ctrl-C or ``timeout`` stop the waiting, never the flow."""
    from flowd import api
    from flowd.api import any_daemon_alive
    from flowd.cli.display import compact, flow_dict, human_duration, progress_line, shorten, span, terminal_width
    from flowd.engine.waiting import FlowWaiter, Progress, read_progress
    from flowd.errors import FlowWaitTimeout

    stream = sys.stderr if ctx.json else sys.stdout
    live = stream.isatty()
    quiet = ctx.json and not live
    first = read_progress(flow_id)
    if not first.flow.is_ended and not any_daemon_alive(ctx.config.flowd.node_id):
        print("flowctl: note: flowd is not running; the flow waits in the queue until it starts", file=sys.stderr)
    last_line: list[str | None] = [None]

    def show(progress: Progress) -> None:
        if progress.flow.is_ended:
            return
        line = progress_line(progress.flow, progress.task, progress.attempt, progress.attempt_state,
                             progress.retries)
        if live:
            elapsed = human_duration(span(progress.flow.created_at, None, api.now()))
            stream.write("\r" + shorten(f"{line}  {elapsed}", terminal_width() - 1) + "\x1b[K")
            stream.flush()
        elif line != last_line[0] and not quiet:
            print(line, file=stream, flush=True)
        last_line[0] = line

    flow = first.flow
    import signal

    # Python leaves SIGINT ignored when it starts that way (nohup, `&` in a script, CI
    # runners); stopping to wait harms no flow, so Ctrl-C and `kill -INT` always work here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with FlowWaiter(ctx.config, flow_id) as waiter:
            flow = waiter.wait(timeout, on_progress=show, on_tick=show if live else None)
    except FlowWaitTimeout as exc:
        _end_live(stream, live)
        print(f"flowctl: stopped waiting after {human_duration(exc.timeout)}; flow {flow_id} goes on "
              f"({exc.state}); follow it with: flowctl flow show {flow_id}", file=sys.stderr)
        if ctx.json:
            ctx.emit({**flow_dict(exc.flow), "waited": "timeout"}, "")  # type: ignore[arg-type]
        return EXIT_WAIT_TIMEOUT
    except KeyboardInterrupt:
        _end_live(stream, live)
        print(f"flowctl: stopped waiting; flow {flow_id} goes on; follow it with: flowctl flow show {flow_id}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    _end_live(stream, live)
    took = human_duration(span(flow.started_at or flow.created_at, flow.finished_at))
    text = f"flow {flow.id} ({flow.routine}) {flow.state} after {took}"
    if flow.state == "DONE":
        text += f"\nresult: {compact(flow.result, terminal_width() - 9)}"
    elif flow.error:
        text += f"\nerror: {flow.error.strip().splitlines()[-1] if flow.error.strip() else ''}"
    ctx.emit(flow_dict(flow), text)
    return EXIT_OK if flow.state == "DONE" else EXIT_FLOW_FAILED


def _end_live(stream: Any, live: bool) -> None:
    if live:
        stream.write("\r\x1b[K")
        stream.flush()


# --------------------------------------------------------------------------- nodes
def cmd_nodes(ctx: Context) -> int:
    """Every flowd node seen on the broker: the retained ``flowd/<node_id>/status``."""
    import json
    import threading
    import uuid

    from flowd.cli.display import table
    from flowd.errors import StoreUnavailable
    from flowd.mqtt.listener import Listener

    config = ctx.config
    prefix, suffix = config.topic("flowd/"), "/status"
    marker = config.topic(f"flowctl/nodes/{uuid.uuid4().hex}")
    found: dict[str, dict[str, Any]] = {}
    done = threading.Event()
    last_news = [time.monotonic()]

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if topic == marker:
            done.set()  # the broker sends the retained messages of a subscription before later ones
            return
        node_id = topic[len(prefix):-len(suffix)]
        last_news[0] = time.monotonic()
        if not payload:
            found.pop(node_id, None)  # its retained status was cleared: the node is gone
            return
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            data = None
        if not isinstance(data, dict):
            found[node_id] = {"node_id": node_id, "state": "unreadable", "version": None, "since": None,
                              "counts": None}
            return
        counts = data.get("counts")
        found[node_id] = {"node_id": node_id, "state": _text(data.get("state")), "version": _text(data.get("version")),
                          "since": _text(data.get("since")), "counts": counts if isinstance(counts, dict) else None}

    listener = Listener(config, [f"{prefix}+{suffix}", marker], on_message)
    listener.start()
    try:
        if not listener.wait_subscribed(NODES_WAIT_S):
            raise StoreUnavailable(f"cannot list nodes: {listener.problem or 'the broker did not answer'} "
                                   f"({config.mqtt.host}:{config.mqtt.port})")
        listener.publish(marker, "{}")
        deadline = time.monotonic() + NODES_WAIT_S
        while not done.is_set() and time.monotonic() < deadline:
            if done.wait(0.05):
                break
            if time.monotonic() - last_news[0] > NODES_QUIET_S * 4:
                break  # no marker came back (an ACL?): the retained ones came long ago
    finally:
        listener.close()
    nodes = [found[key] for key in sorted(found)]
    rows = []
    for n in nodes:
        counts = n["counts"] or {}
        rows.append((_printable(n["node_id"]), _printable(n["state"] or "?"), _printable(n["version"] or "?"),
                     _since(n["since"]), *(_printable(str(counts.get(key, ""))) for key in (
                         "running", "queued", "failed_last_hour"))))
    text = table(("NODE", "STATE", "VERSION", "SINCE", "RUNNING", "QUEUED", "FAILED 1H"), rows, flex=0) if nodes \
        else f"no flowd node has published its status on {config.mqtt.host}:{config.mqtt.port} ({prefix}+{suffix})"
    ctx.emit(nodes, text)
    return EXIT_OK


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None if value is None else str(value)


def _printable(text: str) -> str:
    """Text from the broker, safe on a terminal: control characters shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _since(text: str | None) -> str:
    from flowd.cli.display import local_time, parse_iso

    try:
        return local_time(parse_iso(text)) if text else "?"
    except ValueError:
        return _printable(text or "?")


# --------------------------------------------------------------------------- parsers
def add_run_parser(commands: Any, add: Any, help_text: str) -> None:
    """``flowctl run``."""
    p: argparse.ArgumentParser = add(commands, "run", cmd_run, help_text)
    p.add_argument("routine", metavar="ROUTINE")
    p.add_argument("args", metavar="ARG", nargs="*", help="positional arguments (JSON or strings)")
    p.add_argument("--kw", action="append", metavar="K=V", help="keyword argument (repeatable; V is JSON or a string)")
    p.add_argument("--event", action="append", metavar="JSON",
                   help="the message a Wait receives (repeatable, in order); without one the run stops at a Wait")
    p.add_argument("--file", metavar="FILE.toml", help="take tasks and routines from this apply file, not the "
                                                        "database")
    p.add_argument("--record", action="store_true", help="store the run as an ended flow (trigger cli)")


def add_nodes_parser(commands: Any, add: Any, help_text: str) -> None:
    """``flowctl nodes``."""
    add(commands, "nodes", cmd_nodes, help_text)


def add_flow_wait_parser(flow_cmds: Any, add: Any, flow_id: Any, duration: Any) -> None:
    """``flowctl flow wait ID [--timeout S]``."""
    p = add(flow_cmds, "wait", cmd_flow_wait, "follow a flow until it ends; exit code = outcome")
    p.add_argument("id", metavar="ID", type=flow_id)
    p.add_argument("--timeout", type=duration, metavar="S", help="stop waiting after S seconds (exit 124)")
