"""What every sub-command shares: finding the database, errors, JSON output, confirmation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.exc import ArgumentError

from buildq.config import Config, ConfigError, load_config
from buildq.queue.contract import QueueError
from buildq.storage.database import Database, create_engine, redacted_url
from buildq.storage.errors import DatabaseMissing

#: Where a command looks for its config when neither --config nor $BUILDQ_CONFIG says:
#: a checkout (``make local-start``), then a host set up by ``buildq setup-host``.
DEFAULT_CONFIG = "config/buildq.toml"
SYSTEM_CONFIG = "/etc/buildq/buildq.toml"
CONFIG_ENV = "BUILDQ_CONFIG"
#: With this set, a command may run without any config file (defaults + environment).
DATABASE_URL_ENV = "BUILDQ_DATABASE__URL"
CONFIG_HELP = f"config file (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}, else {SYSTEM_CONFIG})"


class CliError(Exception):
    """An error the user can act on: printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """--config / --url: which database a command talks to."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--config",
        metavar="PATH",
        help=CONFIG_HELP,
    )
    group.add_argument("--url", metavar="URL", help="database URL, instead of a config file")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_yes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="do it without asking")


def config_path(args: argparse.Namespace) -> Path | None:
    """The config file a command reads: --config, else $BUILDQ_CONFIG, else the first of
    ./config/buildq.toml and /etc/buildq/buildq.toml that exists. None (defaults plus
    environment) only when $BUILDQ_DATABASE__URL is set; otherwise no file is an error that
    lists where the command looked."""
    return find_config(getattr(args, "config", None), os.environ, Path.cwd())


def find_config(
    explicit: str | None,
    environ: Mapping[str, str],
    cwd: Path,
    system: Path = Path(SYSTEM_CONFIG),
) -> Path | None:
    # An explicit choice is never second-guessed: if it does not exist, loading it says so.
    if explicit:
        return Path(explicit)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    candidates = (cwd / DEFAULT_CONFIG, system)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if environ.get(DATABASE_URL_ENV):
        return None
    looked = ", ".join(str(c) for c in candidates)
    raise CliError(
        f"no config file found: looked at --config (not given), ${CONFIG_ENV} (not set), "
        f"{looked}; give --config PATH or set {CONFIG_ENV}"
    )


def load(args: argparse.Namespace) -> Config:
    try:
        return load_config(config_path(args))
    except ConfigError as err:
        raise CliError(str(err)) from None


def database_url(args: argparse.Namespace) -> str:
    """The connect URL from --url, or from the config (password filled from its secret)."""
    if getattr(args, "url", None):
        return str(args.url)
    return load(args).database.connect_url()


def upgrade_hint(args: argparse.Namespace, url: str) -> str:
    """How to create or migrate the database this command was pointed at."""
    if not getattr(args, "url", None):
        try:
            path = config_path(args)
        except CliError:
            path = None
        if path:
            return f"run 'buildq db upgrade --config {path}'"
    return f"run \"buildq db upgrade --url '{redacted_url(url)}'\""


def open_database(args: argparse.Namespace) -> Database:
    """The database to work on; never creates one (only ``buildq db upgrade`` does)."""
    url = database_url(args)
    try:
        return Database(create_engine(url, pool_size=2), retry_for_s=5)
    except DatabaseMissing as err:
        raise CliError(f"{err}: {upgrade_hint(args, url)} to create it", exit_code=1) from None
    except (ValueError, ArgumentError) as err:
        raise CliError(
            f"the database URL cannot be parsed: {str(err).splitlines()[0][:200]}"
        ) from None


def run_db(args: argparse.Namespace, fn: Callable[[Database], int]) -> int:
    """Run a command body against the database, turning database failures into one line."""
    db = open_database(args)
    try:
        return fn(db)
    except QueueError as err:
        raise CliError(str(err), exit_code=1) from None
    finally:
        db.dispose()


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def confirm(args: argparse.Namespace, question: str) -> None:
    """Destructive commands: ask on a TTY, demand --yes otherwise."""
    if getattr(args, "yes", False):
        return
    if not sys.stdin.isatty():
        raise CliError(f"{question} — refusing without --yes (stdin is not a terminal)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("cancelled", exit_code=1)
