"""The ``buildq`` command: one sub-command module per area, each adding its own parsers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from buildq.cli import common


def build_parser() -> argparse.ArgumentParser:
    from buildq.cli import admin, builds, db, dlq, doctor, run

    parser = argparse.ArgumentParser(
        prog="buildq",
        description="Trigger builds on CI systems and follow each to a terminal state.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (run, builds, db, admin, dlq, doctor):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except common.CliError as err:
        print(f"buildq: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
