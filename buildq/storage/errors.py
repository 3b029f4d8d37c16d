"""The errors of the database layer, and the one line of a driver error shown to people.

``buildq.queue`` exports these as part of its contract: ``QueueError`` is ``StoreError``, so an
``except QueueError`` catches a database failure as well as a misuse of the queue.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error of buildq's stores (the queue's ``QueueError`` is this class)."""


class TransientQueueError(StoreError):
    """The database could not do it now (down, deadlock, lock timeout); safe to retry.

    Named for the queue, whose contract exported it first; the build store raises it too."""


class StorageError(StoreError):
    """The database refused the operation for a reason retrying will not fix."""


class DatabaseMissing(Exception):
    """The SQLite file does not exist. Only ``buildq db upgrade`` creates one: a read, the
    daemon or a typo'd path must not leave an empty database (and directories) behind."""

    def __init__(self, path: str) -> None:
        super().__init__(f"database file {path} does not exist")
        self.path = path


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, at most ``limit`` characters; for a SQLAlchemy
    error the driver's own message, without the SQL and parameters (which may hold payloads).
    An error without a message is shown by its type's name."""
    orig = getattr(err, "orig", None)
    lines = str(orig if orig is not None else err).splitlines()
    return lines[0][:limit] if lines else type(err).__name__
