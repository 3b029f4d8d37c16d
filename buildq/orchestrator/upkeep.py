"""The daemon's chore that keeps the database in shape: the retention purge.

Every daemon runs it; the deletes are conditional, so running it twice is harmless. (The
other periodic work has its home with what it serves: the metrics refresh in
``instrumented.StatsRefresher``, the database probe and the watchdog in ``health``.)
"""

from __future__ import annotations

import threading

import structlog

from buildq.queue.sql.retention import Retention
from buildq.storage.errors import first_line

log = structlog.get_logger("buildq.daemon")

_RETENTION_INTERVAL_S = 60.0


def purge_retained(retention: Retention, stopping: threading.Event) -> None:
    """Delete messages every group is done with once they are past retention, every minute
    until ``stopping``."""
    while not stopping.wait(_RETENTION_INTERVAL_S):
        try:
            result = retention.purge()
        except Exception as err:  # the next round tries again
            log.warning("retention_failed", error=first_line(err))
            continue
        if result.deleted:
            log.info("retention_purged", deleted=result.deleted)
