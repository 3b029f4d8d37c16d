"""How the daemon shows an error in one line (logs, /readyz): the driver's own message for a
database error, without the SQL and parameters that follow it."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None)
    return (
        str(orig if orig is not None else err).splitlines()[0][:300]
        if str(err)
        else type(err).__name__
    )
