"""``type=`` helpers for every numeric option of the CLI, and the parser that reports a bad one.

Each helper accepts only what the command can act on and the database can store: a value out
of range is refused here, as one ``buildq: …`` line and exit 2, instead of reaching SQL (where
SQLite raises OverflowError, MariaDB answers a syntax error for a negative LIMIT and silently
clamps a huge delay to the largest BIGINT). The bounds are far beyond any real use; they only
keep out what cannot be meant.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NoReturn

#: The largest value a BIGINT column (offsets, epoch milliseconds) holds, on both backends.
MAX_BIGINT = 2**63 - 1
#: The largest value an INTEGER column (slots) holds on MySQL.
MAX_INT = 2**31 - 1
#: Longest duration or delay the CLI accepts: ten years. Beyond it a filter matches nothing
#: and a delay never ends, so a larger value is a typo, not a wish.
MAX_DURATION_MS = 3650 * 86_400_000
#: Most rows a listing prints.
MAX_LIMIT = 1_000_000

UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"\s*(\d{1,15}(?:\.\d{1,6})?)\s*(ms|s|m|h|d)\s*")
_WHOLE = re.compile(r"\s*[-+]?\d{1,30}\s*")
_DECIMAL = re.compile(r"\s*[-+]?\d{1,15}(?:\.\d{1,9})?\s*")
_RATE = re.compile(r"\s*(\d{1,15}(?:\.\d{1,9})?)\s*(?:/\s*s)?\s*")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``buildq: …`` line, exit status 2.

    argparse prints the whole usage block and then the error; every other refusal of the CLI
    is one line on stderr, and scripts read that line. Sub-command parsers are of this class
    too (``add_subparsers`` makes its parsers of the class it is called on).
    """

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("buildq").strip()
        text = " ".join(message.split())  # one line, whatever argparse composed
        if len(text) > 300:  # a 10 MB argument echoed back is no help
            text = text[:299] + "…"
        prefix = f"buildq: {where}: " if where else "buildq: "
        self.exit(2, f"{prefix}{text} (see '{self.prog} --help')\n")


def _shown(text: str) -> str:
    """The refused argument as the error quotes it: short and escaped."""
    return repr(text if len(text) <= 40 else text[:39] + "…")


def _plain(number: float) -> str:
    """``2592000`` and ``0.1``, never ``2.592e+06``."""
    return format(number, "f").rstrip("0").rstrip(".")


def whole(low: int, high: int, what: str = "a whole number") -> Callable[[str], int]:
    """An integer from ``low`` to ``high``, written in digits (no exponent, no fraction)."""

    def parse(text: str) -> int:
        value = int(text) if _WHOLE.fullmatch(text) else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{_shown(text)}: expected {what} from {low} to {high}"
            )
        return value

    parse.__name__ = what  # what argparse would call it in its own messages
    return parse


def seconds(low: float, high: float, what: str = "seconds") -> Callable[[str], float]:
    """A finite number of seconds from ``low`` to ``high`` (a decimal, no exponent)."""

    def parse(text: str) -> float:
        value = float(text) if _DECIMAL.fullmatch(text) else math.nan
        if not low <= value <= high:  # also refuses NaN
            raise argparse.ArgumentTypeError(
                f"{_shown(text)}: expected {what} from {_plain(low)} to {_plain(high)}"
            )
        return value

    parse.__name__ = what
    return parse


def duration_ms(text: str) -> int:
    """``30s``, ``10m``, ``2h``, ``1d`` or ``500ms`` as milliseconds; the unit is required."""
    match = _DURATION.fullmatch(text)
    value = round(float(match.group(1)) * UNITS_MS[match.group(2)]) if match else -1
    if not 0 <= value <= MAX_DURATION_MS:
        raise argparse.ArgumentTypeError(
            f"{_shown(text)}: expected a duration like 30s, 10m, 2h, 1d (at most 3650d)"
        )
    return value


def rate(text: str) -> float:
    """Messages per second, ``10/s`` or ``10``: from 0.001 to 100,000 a second."""
    match = _RATE.fullmatch(text)
    value = float(match.group(1)) if match else 0.0
    if not 0.001 <= value <= 100_000:
        raise argparse.ArgumentTypeError(
            f"{_shown(text)}: expected a rate like 10/s (from 0.001/s to 100000/s)"
        )
    return value


positive_int = whole(1, MAX_LIMIT, "a whole number")
delay_ms = whole(0, MAX_DURATION_MS, "a whole number of milliseconds")
slot = whole(0, MAX_INT, "a slot number")
port = whole(0, 65535, "a port number")


def offset(text: str) -> int | str:
    """A log offset, ``earliest`` or ``latest``."""
    if text in ("earliest", "latest"):
        return text
    try:
        return whole(0, MAX_BIGINT, "an offset")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{_shown(text)}: expected an offset (0 to {MAX_BIGINT}), 'earliest' or 'latest'"
        ) from None
