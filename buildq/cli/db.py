"""``buildq db upgrade``: bring the schema to the current revision."""

from __future__ import annotations

import argparse
from typing import Any

from buildq.cli import common
from buildq.db import redacted_url


def register(commands: Any) -> None:
    parser = commands.add_parser("db", help="database schema")
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = sub.add_parser("upgrade", help="run migrations up to the newest revision")
    common.add_target_options(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.set_defaults(handler=_upgrade)


def _upgrade(args: argparse.Namespace) -> int:
    from buildq.migrations import upgrade

    url = common.database_url(args)
    try:
        upgrade(url, args.revision)
    except Exception as err:  # alembic and drivers raise many types; the user needs one line
        raise common.CliError(
            f"upgrade of {redacted_url(url)} failed: {_first_line(err)}", 1
        ) from None
    print(f"database {redacted_url(url)} is at revision {args.revision}")
    return 0


def _first_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None)
    return str(orig if orig is not None else err).splitlines()[0][:300]
