"""The ``buildq`` command: one sub-command module per area, each adding its own parsers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from buildq.cli import common
from buildq.cli.argtypes import Parser


def build_parser() -> argparse.ArgumentParser:
    from buildq.cli import builds, db, dlq, doctor, host, queue, run, web

    parser = Parser(
        prog="buildq",
        description="Trigger builds on CI systems and follow each to a terminal state.",
    )
    parser.add_argument("--version", action="version", version=f"buildq {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (run, builds, db, queue, dlq, doctor, host, web):
        module.register(commands)
    return parser


def version() -> str:
    """The installed distribution's version (what ``pip install`` put there)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("buildq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    from buildq import logs

    # Library logs go to stderr and only when they matter, so --json output stays parseable;
    # `buildq run` reconfigures from its config.
    logs.configure("warning", "auto")
    arguments = list(sys.argv[1:] if argv is None else argv)
    bad = _not_unicode(arguments)
    if bad is not None:
        # Bytes that are not UTF-8 (Python keeps them as lone surrogates) cannot be stored,
        # looked up or shown: refuse them before any command sees them.
        logs.print_error(f"buildq: argument {bad} is not valid UTF-8 text")
        return 2
    parser = build_parser()
    args = parser.parse_args(arguments)
    try:
        code: int = args.handler(args)
    except common.CliError as err:
        logs.print_error(f"buildq: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `buildq ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


def _not_unicode(arguments: Sequence[str]) -> str | None:
    """The first argument that is not valid Unicode, shown escaped; None if all are."""
    for argument in arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            return ascii(argument)[:200]
    return None


if __name__ == "__main__":
    sys.exit(main())
