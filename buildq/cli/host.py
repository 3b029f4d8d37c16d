"""``buildq setup-host``: write this host's config and systemd unit from the installed package.

A ``pip install buildq`` host has no checkout: the templates ship inside the package
(``buildq/host/``) and this command renders them with the paths of this installation, so
docs/systemd.md's install steps work from the wheel. Existing files are never overwritten
without ``--force``.
"""

from __future__ import annotations

import argparse
import grp
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from buildq.cli import common

#: What the shipped templates say, each replaced by this host's value.
SHIPPED_EXEC = "/opt/buildq/venv/bin/buildq"
SHIPPED_CONFIG_DIR = "/etc/buildq"
SHIPPED_STATE_DIR = "/var/lib/buildq"
SHIPPED_URL = 'url = "sqlite:////var/lib/buildq/buildq.db"'
#: systemd creates StateDirectory= under this directory.
_SYSTEMD_STATE_ROOT = Path("/var/lib")
_SERVICE_GROUP = "buildq"


@dataclass(frozen=True)
class Host:
    config_dir: Path
    unit_dir: Path
    state_dir: Path
    executable: Path
    database_url: str | None


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "setup-host",
        help="write this host's config and systemd unit from the installed package",
        description=__doc__,
    )
    parser.add_argument("--config-dir", type=Path, default=Path(SHIPPED_CONFIG_DIR))
    parser.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(SHIPPED_STATE_DIR),
        help="the service's writable directory: SQLite database, runner state",
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="instead of SQLite in the state directory, e.g. mysql+pymysql://buildq@db/buildq "
        "(no password: the config reads it from $BUILDQ_DB_PASSWORD)",
    )
    parser.add_argument("--force", action="store_true", help="replace files that exist")
    parser.add_argument(
        "--only",
        choices=("config", "unit"),
        help="just this file (an upgrade rewrites the unit: --only unit --force)",
    )
    parser.add_argument(
        "--print",
        action="store_true",
        dest="print_only",
        help="with --only: print the file to stdout instead of writing it",
    )
    parser.set_defaults(handler=_setup_host)


def _setup_host(args: argparse.Namespace) -> int:
    host = Host(
        config_dir=args.config_dir.absolute(),
        unit_dir=args.unit_dir.absolute(),
        state_dir=args.state_dir.absolute(),
        executable=_executable(),
        database_url=_checked_url(args.database_url),
    )
    files = {
        "config": (host.config_dir / "buildq.toml", render_config(host), 0o640),
        "unit": (host.unit_dir / "buildq.service", render_unit(host), 0o644),
    }
    if args.only:
        files = {args.only: files[args.only]}
    if args.print_only:
        if not args.only:
            raise common.CliError("--print needs --only config or --only unit")
        print(files[args.only][1], end="")
        return 0
    clashes = [path for path, text, _ in files.values() if _differs(path, text)]
    if clashes and not args.force:
        raise common.CliError(
            f"{', '.join(map(str, clashes))} exists and differs: keep it, or --force to replace",
            exit_code=1,
        )
    for path, text, mode in files.values():
        _write(path, text, mode)
    if host.database_url is None:
        host.state_dir.mkdir(parents=True, exist_ok=True)
    if not args.only:
        _next_steps(host, files["config"][0], files["unit"][0])
    return 0


def template(name: str) -> str:
    return (resources.files("buildq") / "host" / name).read_text()


def render_config(host: Host) -> str:
    text = template("buildq.toml")
    if host.database_url is not None:
        text = _replace(text, SHIPPED_URL, f'url = "{host.database_url}"')
        if not host.database_url.startswith("sqlite"):
            text = _replace(text, '# password_env = "', 'password_env = "')
    return _replace(text, SHIPPED_STATE_DIR, str(host.state_dir), count=None)


def render_unit(host: Host) -> str:
    text = template("buildq.service")
    text = _replace(text, f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={host.executable} ")
    text = _replace(
        text,
        f"Environment=BUILDQ_CONFIG={SHIPPED_CONFIG_DIR}/buildq.toml",
        f"Environment=BUILDQ_CONFIG={host.config_dir / 'buildq.toml'}",
    )
    text = _replace(
        text,
        f"EnvironmentFile=-{SHIPPED_CONFIG_DIR}/buildq.env",
        f"EnvironmentFile=-{host.config_dir / 'buildq.env'}",
    )
    text = _replace(
        text, f"WorkingDirectory={SHIPPED_STATE_DIR}", f"WorkingDirectory={host.state_dir}"
    )
    if host.state_dir.parent == _SYSTEMD_STATE_ROOT:
        return _replace(text, "StateDirectory=buildq\n", f"StateDirectory={host.state_dir.name}\n")
    # Not under /var/lib: systemd cannot create it; the sandbox must still let it be written.
    return _replace(text, "StateDirectory=buildq\n", f"ReadWritePaths={host.state_dir}\n")


def _replace(text: str, old: str, new: str, *, count: int | None = 1) -> str:
    """Replace ``old``, which the shipped template must contain (exactly ``count`` times)."""
    found = text.count(old)
    if found == 0 or (count is not None and found != count):
        raise RuntimeError(f"template changed: {old!r} found {found} times")  # a packaging bug
    return text.replace(old, new)


def _executable() -> Path:
    """This installation's ``buildq`` (next to the interpreter in a virtualenv)."""
    beside = Path(sys.executable).with_name("buildq")
    if beside.exists():
        return beside
    found = shutil.which("buildq")
    return Path(found).absolute() if found else Path(SHIPPED_EXEC)


def _checked_url(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise common.CliError("--database-url cannot be parsed") from None
    if parsed.password:
        raise common.CliError(
            "--database-url must not hold the password: put BUILDQ_DB_PASSWORD=... in "
            "the environment file instead"
        )
    return url


def _differs(path: Path, text: str) -> bool:
    return path.exists() and path.read_text() != text


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    if mode == 0o640 and os.geteuid() == 0 and _group_exists(_SERVICE_GROUP):
        os.chown(tmp, 0, grp.getgrnam(_SERVICE_GROUP).gr_gid)  # readable by the service
    tmp.replace(path)
    print(f"wrote {path}")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _next_steps(host: Host, config: Path, unit: Path) -> None:
    if host.state_dir.parent == _SYSTEMD_STATE_ROOT:
        state = f"-p StateDirectory={host.state_dir.name}"
        own = ""
    else:
        state = f"-p ReadWritePaths={host.state_dir}"
        own = f"\n  chown buildq:buildq {host.state_dir}"
    print(
        f"""
next, as root (docs/systemd.md):
  useradd --system --home-dir {host.state_dir} --no-create-home --shell /usr/sbin/nologin buildq
  chgrp buildq {config}{own}
  $EDITOR {config}          # runners and queues
  systemd-run --quiet --pipe --wait --uid=buildq --gid=buildq \\
      -p EnvironmentFile=-{host.config_dir / "buildq.env"} {state} \\
      {host.executable} db upgrade --config {config}
  systemctl daemon-reload && systemctl enable --now {unit.stem}
  {host.executable} doctor --config {config}"""
    )
