"""flowctl's argument parser: one sub-parser per command, built only for the command
given (every sub-parser costs ~0.4 ms, several on a Pi, and flowctl has thirty)."""

from __future__ import annotations

import argparse

from flowd.cli.common import UsageError, count_arg, duration_arg, flow_id_arg, positive_arg, state_arg
from flowd.cli.definitions import (
    cmd_apply,
    cmd_routine_add,
    cmd_routine_enable,
    cmd_routine_list,
    cmd_routine_remove,
    cmd_routine_show,
    cmd_scripts,
    cmd_task_add,
    cmd_task_list,
    cmd_task_remove,
    cmd_task_show,
)
from flowd.cli.flows import (
    cmd_db_check,
    cmd_db_recover,
    cmd_flow_cancel,
    cmd_flow_retry,
    cmd_flow_show,
    cmd_flows,
    cmd_prune,
    cmd_status,
    cmd_submit,
)
from flowd.states import MODES, PARALLEL, STATES, STATUS_MODES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn



class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so flowctl owns the output."""

    def error(self, message: str) -> NoReturn:
        from flowd.cli.hints import explain_invalid_choice

        raise UsageError(f"{explain_invalid_choice(message)} (see '{self.prog} --help')")


COMMANDS = {
    "status": "daemon, broker, queue depth, flows by state",
    "scripts": "task scripts found in the task folders",
    "task": "add, list, show or remove stored tasks",
    "routine": "add, list, show, remove, enable or disable routines",
    "apply": "create or update tasks and routines from a TOML file; idempotent",
    "submit": "start a flow of a routine",
    "flows": "list flows, newest first",
    "flow": "show, cancel or retry one flow",
    "prune": "delete ended flows and their results now",
    "run": "run a routine in the foreground, in this process, without the daemon or the broker",
    "nodes": "every flowd node seen on the broker, with version, since and counts",
    "db": "check the database file, or salvage a damaged one",
}


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (skipping global options), to build only its parser."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--config":
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """flowctl's parser; with ``command`` only that command's arguments are built.

    Every sub-parser costs ~0.4 ms here (several on a Pi), and flowctl has thirty.
    """
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $FLOWD_CONFIG, /etc/flowd/flowd.toml, ./config/flowd.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON on stdout (errors too, as {\"error\": ...})")
    parser = _Parser(prog="flowctl", description="Manage flowd: tasks, routines and flows.",
                     epilog="exit codes: 0 ok, 1 flow FAILED/CANCELLED (submit --wait, flow wait, run), "
                            "2 bad usage or input, 3 database, queue or broker unreachable (db check: damaged), "
                            "124 --timeout ran out while waiting, 130 Ctrl-C while waiting")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="config file (default: $FLOWD_CONFIG, /etc/flowd/flowd.toml, ./config/flowd.toml)")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print JSON on stdout, for programs (also after the command)")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    parser.usage = "flowctl [--config PATH] [--json] COMMAND ..."  # after: sub-commands read it for their prog

    def add(sub: Any, name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    def group(name: str, dest: str) -> Any:
        p = commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], parents=[common])
        return p.add_subparsers(dest=dest, metavar="ACTION", required=True, parser_class=_Parser)

    for name, help_text in COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=help_text, add_help=False)
            continue
        if name == "status":
            add(commands, "status", cmd_status, help_text)
        elif name == "scripts":
            add(commands, "scripts", cmd_scripts, help_text)
        elif name == "task":
            _add_task_parsers(group("task", "task_command"), add)
        elif name == "routine":
            _add_routine_parsers(group("routine", "routine_command"), add)
        elif name == "apply":
            p = add(commands, "apply", cmd_apply, help_text)
            p.add_argument("file", metavar="FILE.toml")
            p.add_argument("--prune", action="store_true", help="also remove tasks and routines the file does not name")
        elif name == "submit":
            p = add(commands, "submit", cmd_submit, help_text)
            p.add_argument("routine", metavar="ROUTINE")
            p.add_argument("args", metavar="ARG", nargs="*", default=[], help="positional arguments (JSON or strings)")
            p.add_argument("--kw", action="append", metavar="K=V",
                           help="keyword argument (repeatable; V is JSON or a string)")
            p.add_argument("--request-id", metavar="ID", help="idempotency key: a repeat returns the existing flow")
            p.add_argument("--wait", action="store_true", help="follow the flow and exit with its outcome")
            p.add_argument("--timeout", type=duration_arg, metavar="S",
                           help="with --wait: stop waiting after S seconds")
        elif name == "flows":
            p = add(commands, "flows", cmd_flows, help_text)
            p.add_argument("--state", type=state_arg, metavar="S", help=f"one of {', '.join(STATES)}")
            p.add_argument("--routine", metavar="R")
            p.add_argument("--limit", type=positive_arg, default=20, metavar="N", help="at most N flows (default 20)")
        elif name == "flow":
            flow_cmds = group("flow", "flow_command")
            for action, func, text in (
                    ("show", cmd_flow_show, "every step and attempt of a flow"),
                    ("cancel", cmd_flow_cancel, "cancel a flow that has not ended"),
                    ("retry", cmd_flow_retry, "resume a FAILED or CANCELLED flow from its failed step")):
                add(flow_cmds, action, func, text).add_argument("id", metavar="ID", type=flow_id_arg)
            from flowd.cli import run as cli_run

            cli_run.add_flow_wait_parser(flow_cmds, add, flow_id_arg, duration_arg)
        elif name in ("run", "nodes"):
            from flowd.cli import run as cli_run

            (cli_run.add_run_parser if name == "run" else cli_run.add_nodes_parser)(commands, add, help_text)
        elif name == "prune":
            p = add(commands, "prune", cmd_prune, help_text)
            p.add_argument("--older-than", type=duration_arg, metavar="AGE",
                           help="e.g. 30d, 12h (default: the retention)")
            p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
        elif name == "db":
            db_cmds = group("db", "db_command")
            p = add(db_cmds, "check", cmd_db_check, "check the database and the queue file (exit 3: damaged); "
                                                    "read-only, safe while flowd runs")
            p.add_argument("--full", action="store_true", help="integrity_check (every index too) instead of "
                                                                "quick_check")
            p = add(db_cmds, "recover", cmd_db_recover, "with flowd stopped: salvage a damaged database into a new "
                                                        "file, keep the damaged one beside it, say what was lost")
            p.add_argument("--force", action="store_true", help="rebuild the file even when it passes the check")
    return parser


def _add_task_parsers(task_cmds: Any, add: Any) -> None:
    p = add(task_cmds, "add", cmd_task_add, "create a task (--replace: update an existing one in place)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--replace", action="store_true", help="change the task if it exists (else: refused)")
    p.add_argument("script", metavar="SCRIPT", help="module.Class, e.g. example.VeryLong")
    p.add_argument("--retries", type=count_arg, metavar="N")
    p.add_argument("--retry-delay", type=duration_arg, metavar="S", help="seconds before the first retry (doubles)")
    p.add_argument("--timeout", type=duration_arg, metavar="S", help="seconds one attempt may run")
    p.add_argument("--option", action="append", metavar="K=V",
                   help="default keyword argument (repeatable; V is JSON or a string)")
    add(task_cmds, "list", cmd_task_list, "list tasks")
    add(task_cmds, "show", cmd_task_show, "show one task").add_argument("name", metavar="NAME")
    add(task_cmds, "remove", cmd_task_remove, "remove a task no routine uses").add_argument("name", metavar="NAME")


def _add_routine_parsers(routine_cmds: Any, add: Any) -> None:
    p = add(routine_cmds, "add", cmd_routine_add, "create a routine (--replace: replace an existing one's definition)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--replace", action="store_true", help="replace the routine if it exists (else: refused)")
    p.add_argument("tasks", metavar="TASK", nargs="+")
    p.add_argument("--schedule", metavar="CRON", help="'*/5 * * * *' or '@every 30s'")
    p.add_argument("--timezone", metavar="TZ", help="IANA zone of the schedule (default: the system's)")
    p.add_argument("--jitter", type=duration_arg, metavar="S", help="spread scheduled runs by up to S seconds")
    p.add_argument("--no-mqtt", action="store_true", help="MQTT may not start this routine")
    p.add_argument("--mode", choices=MODES, default=PARALLEL)
    p.add_argument("--max", type=positive_arg, default=10, metavar="N", help="concurrency limit of the mode")
    p.add_argument("--timeout", type=duration_arg, metavar="S", help="seconds the whole flow may take")
    p.add_argument("--status", choices=STATUS_MODES, default=STATUS_MODES[0],
                   help="flow/<id>/status messages: each state change and finished step (steps, the default), "
                        "state changes only (states), or none (off)")
    add(routine_cmds, "list", cmd_routine_list, "list routines")
    for name, func, text in (("show", cmd_routine_show, "show one routine"),
                             ("remove", cmd_routine_remove, "remove a routine (its flows stay)"),
                             ("enable", cmd_routine_enable, "let schedules, MQTT and flowctl start it"),
                             ("disable", cmd_routine_enable, "stop schedules, MQTT and flowctl from starting it")):
        add(routine_cmds, name, func, text).add_argument("name", metavar="NAME")


def _version() -> str:
    from flowd import __version__

    return f"flowctl {__version__}"


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``submit`` also takes ARGs after its options (``submit r --kw a=1 x y``)."""
    command = command_of(argv)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if command in ("submit", "run") and not any(token.startswith("-") for token in extra):
        args.args = [*args.args, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
