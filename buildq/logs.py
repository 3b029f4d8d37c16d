"""Logging: structlog, JSON lines for journald, a readable console on a TTY.

Under systemd, each line starts with its syslog priority (``<4>`` for a warning, sd-daemon(3)),
which journald strips and records as the entry's priority: ``journalctl -u buildq -p warning``
then shows buildq's warnings and errors. Whether stderr goes to the journal is decided as
systemd documents it: ``$JOURNAL_STREAM`` names the device and inode of the stream it connected,
so a redirect (``buildq run 2>file`` from a unit's shell) is told apart.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

#: sd-daemon(3) prefixes by structlog method name; "exception" logs at error.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}
_ERR = 3


def configure(level: str = "info", fmt: str = "auto") -> None:
    """``fmt``: "json", "console", or "auto" (console when stderr is a terminal)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    if to_journal():
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Not cached: tests (and `buildq run` after the CLI default) reconfigure at run time.
        cache_logger_on_first_use=False,
    )
    _route_stdlib_warnings()


def to_journal(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd set up for this process."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (tests)
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def print_error(text: str) -> None:
    """One line for the operator on stderr (``buildq: …``), at priority err in the journal."""
    prefix = f"<{_ERR}>" if to_journal() else ""
    print(f"{prefix}{text}", file=sys.stderr, flush=True)


def _with_priority(renderer: structlog.types.Processor) -> structlog.types.Processor:
    def render(logger: Any, method_name: str, event_dict: structlog.types.EventDict) -> str:
        line = renderer(logger, method_name, event_dict)
        text = line.decode() if isinstance(line, bytes) else str(line)
        return f"<{_PRIORITY.get(method_name, 6)}>{text}"

    return render


class _ToStructlog(logging.Handler):
    """Library warnings (stdlib ``logging``) as buildq log lines, with their priority, instead
    of Python's bare last-resort output."""

    def emit(self, record: logging.LogRecord) -> None:
        method = record.levelname.lower() if record.levelno < logging.CRITICAL else "critical"
        log = structlog.get_logger(record.name)
        getattr(log, method if method in _PRIORITY else "warning")(
            "library_log", logger=record.name, message=record.getMessage()[:2000]
        )


def _route_stdlib_warnings() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(_ToStructlog(logging.WARNING))
