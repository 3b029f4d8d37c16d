"""``buildq run``: the daemon in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import argparse
from typing import Any

from buildq.cli import common


def register(commands: Any) -> None:
    parser = commands.add_parser("run", help="run the daemon in the foreground")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=common.CONFIG_HELP,
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from buildq import logs
    from buildq.config import ConfigError
    from buildq.orchestrator.daemon import Daemon
    from buildq.queue import NotMigrated
    from buildq.storage.errors import DatabaseMissing

    config = common.load(args)
    logs.configure(config.daemon.log_level, config.daemon.log_format)
    daemon = Daemon(config)
    try:
        return daemon.run()
    except (ConfigError, NotMigrated, DatabaseMissing) as err:
        # Something only the operator can fix (a port in use, a bad key, an unmigrated
        # database): one line, and exit status 2, which the unit does not restart.
        daemon.stop(quiet=True)
        hint = (
            f": {common.upgrade_hint(args, config.database.url)}"
            if isinstance(err, DatabaseMissing)
            else ""
        )
        logs.print_error(f"buildq: {err}{hint}")
        return 2
