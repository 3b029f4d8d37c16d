"""``buildq doctor``: check the config, the database and the runners; say how to fix each
problem. Exits 1 when anything failed, so it can gate a deploy.

A check that cannot run because an earlier one failed (no URL, no connection) is skipped,
not failed: the first failure is the one to fix.
"""

from __future__ import annotations

import argparse
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from buildq.buildrunner import registry
from buildq.cli import common, doctor_ci
from buildq.config import Config, ConfigError, Table, load_config
from buildq.storage.database import READ_ONLY, backend_name, create_engine, redacted_url
from buildq.storage.errors import first_line

#: The oldest servers buildq supports: what it is designed and tested for (MySQL 8 and
#: MariaDB 10.6+: utf8mb4 keys of 3072 bytes, millisecond NOW(3), READ COMMITTED locking
#: reads; SQLite 3.35+ for RETURNING-era row values and WAL behaviour).
MIN_VERSIONS = {"MySQL": (8, 0, 1), "MariaDB": (10, 6), "SQLite": (3, 35)}


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # "ok", "FAIL", "WARN" (does not fail the run) or "skip"
    detail: str
    fix: str = ""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "doctor", help="check config, database and runners", description=__doc__
    )
    common.add_target_options(parser)
    common.add_json_option(parser)
    parser.add_argument(
        "--offline",
        action="store_true",
        help="do not ask the CI services (token access, settings that cancel sibling builds)",
    )
    parser.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    checks, config, url = _check_config(args)
    if url is None:
        checks.append(Check("database", "skip", "no database URL (the config did not load)"))
    else:
        checks += _check_database(url, common.upgrade_hint(args, url))
    checks += _check_plugins()
    checks += _check_runners(config, online=not args.offline)
    failed = any(check.status == "FAIL" for check in checks)
    warned = any(check.status == "WARN" for check in checks)
    if args.json:
        common.print_json({"ok": not failed, "checks": [asdict(check) for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            print(f"{check.status:<4}  {check.name.ljust(width)}  {check.detail}")
            if check.fix:
                print(f"{'':<4}  {''.ljust(width)}  fix: {check.fix}")
        verdict = "something is wrong: see FAIL above" if failed else "all checks passed"
        print("\n" + verdict + (" (see WARN above)" if warned and not failed else ""))
    return 1 if failed else 0


def _check_config(args: argparse.Namespace) -> tuple[list[Check], Config | None, str | None]:
    if getattr(args, "url", None):
        skipped = Check("config", "skip", "--url given: no config file read")
        return [skipped], None, str(args.url)
    try:
        path = common.config_path(args)
    except common.CliError as err:
        fix = f"{common.CONFIG_ENV}=PATH or --config PATH, or 'buildq setup-host' to write one"
        return [Check("config", "FAIL", str(err), fix=fix)], None, None
    try:
        config = load_config(path)
    except ConfigError as err:
        return [Check("config", "FAIL", f"{path or 'no config file'}", fix=str(err))], None, None
    where = str(path) if path else "no file: defaults and BUILDQ_* environment"
    return [Check("config", "ok", where)], config, config.database.connect_url()


def _check_database(url: str, upgrade: str) -> list[Check]:
    try:
        shown = redacted_url(url)
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
            # Connecting would create an empty file and hide the real problem.
            return [Check("database", "FAIL", f"{shown}: the file does not exist", upgrade)]
        engine = create_engine(url, pool_size=1)
    except (ValueError, sa.exc.ArgumentError) as err:
        return [
            Check("database", "FAIL", first_line(err), "give a sqlite:/// or mysql+pymysql:// URL")
        ]
    try:
        # Read-only: on SQLite a plain connection would BEGIN IMMEDIATE and hold the write
        # lock, blocking the daemon (and the schema check's own connection).
        with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            conn.execute(sa.text("SELECT 1"))
            checks = [Check("database", "ok", f"reachable: {shown}"), _check_version(engine)]
            if backend_name(engine) == "sqlite":
                checks.append(_check_wal(conn))
        return [*checks, _check_schema(engine, upgrade)]
    except Exception as err:  # drivers raise many types; the operator needs one line
        fix = "check that the server is up and reachable, and the URL and password"
        return [Check("database", "FAIL", f"{shown}: {first_line(err)}", fix)]
    finally:
        engine.dispose()


def _check_version(engine: Engine) -> Check:
    version: tuple[int, ...]
    if backend_name(engine) == "sqlite":
        product, version = "SQLite", sqlite3.sqlite_version_info
    else:
        product = "MariaDB" if getattr(engine.dialect, "is_mariadb", False) else "MySQL"
        version = tuple(v for v in engine.dialect.server_version_info or () if isinstance(v, int))
    needed = MIN_VERSIONS[product]
    shown = ".".join(map(str, version))
    if tuple(version) >= needed:
        return Check("server", "ok", f"{product} {shown}")
    want = ".".join(map(str, needed))
    return Check(
        "server",
        "FAIL",
        f"{product} {shown} is too old: the queue needs {product} >= {want}",
        f"upgrade {product} to {want} or newer",
    )


def _check_wal(conn: Connection) -> Check:
    mode = str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()
    if mode == "wal":
        return Check("sqlite wal", "ok", "journal_mode=wal")
    return Check(
        "sqlite wal",
        "FAIL",
        f"journal_mode={mode}: readers would block the writer",
        "put the database file on a local disk (WAL does not work on network filesystems)",
    )


def _check_schema(engine: Engine, upgrade: str) -> Check:
    from buildq.migrations import current_revision, head_revision

    current, head = current_revision(engine), head_revision()
    if current == head:
        return Check("schema", "ok", f"at head ({head})")
    if current is None:
        return Check("schema", "FAIL", "no buildq schema (never migrated)", upgrade)
    return Check("schema", "FAIL", f"at revision {current}, head is {head}", upgrade)


def _check_runners(config: Config | None, *, online: bool) -> list[Check]:
    if config is None:
        return [Check("runners", "skip", "no config")]
    if not config.runners:
        return [Check("runners", "ok", "none configured")]
    checks = []
    for name, table in sorted(config.runners.items()):
        checks += _check_runner(name, table, online=online)
    return checks


def _check_plugins() -> list[Check]:
    """Installed runner plugins: each one's kind and package, and whether it loads."""
    checks = []
    for kind, provider, error in registry.plugins():
        if error is None:
            checks.append(Check(f"plugin {kind}", "ok", f"runner type {kind} from {provider}"))
        else:
            fix = f"reinstall or uninstall {provider}"
            checks.append(Check(f"plugin {kind}", "FAIL", error, fix))
    return checks


def _check_runner(name: str, table: Table, *, online: bool) -> list[Check]:
    kind_name = str(table.data.get("type"))
    try:
        kind = registry.for_table(table)
        # Validates, builds nothing: wiring builds runners (clients, directories).
        config = kind.validate(table)
    except ValueError as err:  # ConfigError, naming the key; secrets never in it
        return [Check(f"runner {name}", "FAIL", f"type {kind_name}: invalid", str(err))]
    where = "" if kind.source == registry.BUILTIN else f" (plugin {kind.source})"
    detail = f"type {kind_name}{where}: config and secrets resolve"
    checks = [Check(f"runner {name}", "ok", detail)]
    if online:
        checks += [Check(*row) for row in doctor_ci.inspect(name, kind, config)]
    return checks
