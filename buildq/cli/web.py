"""``buildq web``: the status page (needs the ``web`` extra: ``pip install 'buildq[web]'``)."""

from __future__ import annotations

import argparse
from typing import Any

from buildq.cli import argtypes, common


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "web", help="serve the status page (builds, queue, dead letters) over HTTP"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config file (default: ${common.CONFIG_ENV} or {common.DEFAULT_CONFIG})",
    )
    parser.add_argument("--bind", metavar="ADDRESS", help="listen address (default: [web] bind)")
    parser.add_argument(
        "--port", type=argtypes.port, metavar="N", help="listen port (default: [web] port)"
    )
    parser.set_defaults(handler=_web)


def _web(args: argparse.Namespace) -> int:
    import dataclasses

    from buildq.config import ConfigError
    from buildq.storage.errors import DatabaseMissing

    config = common.load(args)
    try:
        from buildq.web.config import WebConfig
        from buildq.web.server import serve
    except ImportError as err:
        raise common.CliError(
            f"buildq web needs the 'web' extra ({err.name} is missing): pip install 'buildq[web]'"
        ) from None
    try:
        web = WebConfig.from_table(config.web)
    except ConfigError as err:
        raise common.CliError(str(err)) from None
    overrides = {
        key: value for key, value in (("bind", args.bind), ("port", args.port)) if value is not None
    }
    if "bind" in overrides:
        overrides["allowed_hosts"] = tuple(dict.fromkeys([*web.allowed_hosts, args.bind]))
    try:
        return serve(config, dataclasses.replace(web, **overrides))
    except DatabaseMissing as err:
        hint = common.upgrade_hint(args, config.database.url)
        raise common.CliError(f"{err}: {hint} to create it", exit_code=1) from None
