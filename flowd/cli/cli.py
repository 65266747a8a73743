"""flowctl: the command line of flowd (SPEC 6).

Parses a command, calls the catalog, the engine or the models, prints for people (or
JSON with ``--json``; display.py builds both) and turns flowd's errors into exit
codes. It works whether or not the daemon runs: a submitted flow waits in the queue
until workers take it.

Start-up time matters on a Pi, so nothing heavy is imported before a command needs
it: ``--help`` loads argparse only, read-only commands load peewee but never huey,
paho or APScheduler.

Exit codes:
  0    success
  1    the flow ended FAILED or CANCELLED (``submit --wait``, ``flow wait``, ``run``)
  2    bad usage or bad input (one line on stderr)
  3    the database or the queue cannot be used (one line on stderr); ``db check``: a
       file is damaged (the report says which and how, on stdout)
  124  ``--timeout S`` of ``submit --wait`` or ``flow wait``: S passed before the flow ended (it goes on)
  130  Ctrl-C (while waiting it stops the waiting, never the flow)

With ``--json`` every command prints JSON on stdout; an error is still one line on
stderr, and also ``{"error": "...", "exit_code": N}`` on stdout.
"""


from __future__ import annotations

import os
import sys

from flowd.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    Context,
    redact,
)
from flowd.cli.parser import parse_arguments
from flowd.errors import ConfigError, InputError, StoreUnavailable, TaskScriptError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence



def main(argv: Sequence[str] | None = None) -> int:
    """Run one flowctl command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    ctx: Context | None = None
    try:
        args = parse_arguments(argv)
        ctx = Context(args)
        want_json = ctx.json
        code = int(args.func(ctx))
        ctx.finish(succeeded=True)
        return code
    except (ConfigError, InputError, TaskScriptError) as exc:
        from flowd.cli.hints import with_suggestion

        if ctx is not None:
            ctx.finish(succeeded=False)
        return _fail(with_suggestion(exc), EXIT_USAGE, want_json)
    except StoreUnavailable as exc:
        if ctx is not None:
            ctx.finish(succeeded=False)
        from flowd import api

        return _fail(api.damage_hint(exc, str(exc)), EXIT_STORE, want_json)
    except KeyboardInterrupt:
        print("flowctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `flowctl flows | head -3`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        where = redact(ctx.config.database.url) if ctx is not None and ctx._config is not None else "the database"
        reason = None
        if "peewee" in sys.modules:  # the database was touched: its failures have a sentence
            from flowd import api

            reason = api.failure_reason(exc, where)
        if reason is None:
            raise
        return _fail(reason, EXIT_STORE, want_json)


def _fail(message: str, code: int, want_json: bool) -> int:
    print(f"flowctl: {message}", file=sys.stderr)
    if want_json:
        import json

        print(json.dumps({"error": message, "exit_code": code}))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
