"""``buildq db upgrade``: bring the schema to the current revision."""

from __future__ import annotations

import argparse
from typing import Any

from buildq.cli import common
from buildq.storage.database import create_engine, redacted_url
from buildq.storage.errors import first_line


def register(commands: Any) -> None:
    parser = commands.add_parser("db", help="database schema")
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = sub.add_parser("upgrade", help="run migrations up to the newest revision")
    common.add_target_options(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.set_defaults(handler=_upgrade)


def _upgrade(args: argparse.Namespace) -> int:
    from buildq.migrations import head_revision, upgrade

    url = common.database_url(args)
    try:
        upgrade(url, args.revision)
        revision = _revision(url)
    except Exception as err:  # alembic and drivers raise many types; the user needs one line
        raise common.CliError(
            f"upgrade of {redacted_url(url)} failed: {first_line(err)}", 1
        ) from None
    # The id itself, as the daemon's "is at revision X, not Y" and doctor name it.
    latest = " (the latest)" if revision == head_revision() else ""
    print(f"database {redacted_url(url)} is at revision {revision}{latest}")
    return 0


def _revision(url: str) -> str | None:
    from buildq.migrations import current_revision

    engine = create_engine(url, pool_size=1)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()
