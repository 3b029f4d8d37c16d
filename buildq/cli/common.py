"""What every sub-command shares: finding the database, errors, JSON output, confirmation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import ArgumentError

from buildq.config import Config, ConfigError, load_config
from buildq.db import Database, create_engine
from buildq.queue.contract import QueueError

DEFAULT_CONFIG = "config/buildq.toml"
CONFIG_ENV = "BUILDQ_CONFIG"


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
        help=f"config file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG})",
    )
    group.add_argument("--url", metavar="URL", help="database URL, instead of a config file")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_yes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="do it without asking")


def config_path(args: argparse.Namespace) -> Path | None:
    value = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    if value:
        return Path(value)
    default = Path(DEFAULT_CONFIG)
    return default if default.exists() else None


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


def open_database(args: argparse.Namespace) -> Database:
    url = database_url(args)
    try:
        return Database(create_engine(url, pool_size=2), retry_for_s=5)
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
