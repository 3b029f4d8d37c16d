"""End to end: ``buildq`` with the ``noop`` runner, requests/s from submit to result.

One daemon process (``bench.daemon``: ``buildq run`` with counters; default
consumer settings, the first poll 10 ms after the trigger). ``requests`` build requests are
submitted at once (``publish_many`` on ``build``, as ``buildq submit`` publishes one); each goes
through the build controller (trigger, store, first poll: one hand-off) and one poll (``noop``
says SUCCEEDED: store the result, publish ``buildresult``: a second hand-off). Throughput is
requests / (last result − first submit); latency per request is its result's ``created_at``
minus its request's, both written by the database's clock.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from sqlalchemy import and_, func, select

from bench.ceiling import Ceiling
from bench.daemon import DaemonProcess, queries, round_trips, write_config
from bench.databases import Backend
from bench.profiles import Profile
from bench.report import Result, log
from bench.timing import percentile, wait_for
from buildq.buildrunner import Change
from buildq.orchestrator import topics
from buildq.orchestrator.model import BuildRequest
from buildq.queue.contract import Message, message_id
from buildq.queue.sql import SqlQueue
from buildq.queue.sql.schema import messages as m

#: Connections of the ceiling (b) these figures are divided by.
CEILING_CONNECTIONS = 8
CONFIG = """
[runners.noop]
type = "noop"

[poll]
accepted_interval_s = 0.01

[queues.bench]
runner = "noop"
"""


def requests(count: int, prefix: str = "req") -> list[Message]:
    """``count`` build requests on queue ``bench``, ids ``<prefix>-<i>``."""
    return [
        Message(
            id=message_id(f"{prefix}-{i}", "request"),
            payload=BuildRequest(
                f"{prefix}-{i}", "bench", (Change("base-1", "b1"),), (Change(f"c-{i}", "r1"),)
            ).to_bytes(),
            partition_key=f"{prefix}-{i}",
        )
        for i in range(count)
    ]


_RESULTS = select(func.count()).where(m.c.topic == topics.BUILDRESULT)
_result, _request = m.alias("result"), m.alias("request")
_LATENCIES = (
    select(_result.c.created_at - _request.c.created_at)
    .select_from(
        _result.join(
            _request,
            and_(
                _request.c.partition_key == _result.c.partition_key,
                _request.c.topic == topics.BUILD,
            ),
        )
    )
    .where(_result.c.topic == topics.BUILDRESULT)
)


def run(backend: Backend, profile: Profile) -> Result:
    count = profile.e2e_requests
    ceiling = Ceiling(backend, profile.ceiling_s)
    before_ceiling = ceiling.txn(
        CEILING_CONNECTIONS
    )  # and again after: the mean of the two is the ceiling
    with tempfile.TemporaryDirectory(prefix="buildq-bench-e2e-") as tmp:
        directory = Path(tmp)
        config = write_config(directory, backend.url, CONFIG)
        db = backend.database(pool_size=4)
        queue = SqlQueue(db)
        daemon = DaemonProcess(config, directory).start()
        try:
            batch = requests(count)
            before = daemon.fresh_stats()
            started = time.monotonic()
            for start in range(0, count, 500):
                queue.publish_many(topics.BUILD, batch[start : start + 500])
            done = wait_for(
                lambda: db.read(lambda conn: conn.execute(_RESULTS).scalar_one()) >= count,
                timeout=300,
                interval=0.05,
            )
            elapsed = time.monotonic() - started
            after = daemon.fresh_stats()
            latencies = [
                float(x) for x in db.read(lambda conn: conn.execute(_LATENCIES).scalars().all())
            ]
        finally:
            daemon.stop()
            db.dispose()
    if not done:
        raise RuntimeError(f"end to end: not every request got a result:\n{daemon.log_text()}")
    rate = count / elapsed
    ceil = {f"b_c{CEILING_CONNECTIONS}": (before_ceiling + ceiling.txn(CEILING_CONNECTIONS)) / 2}
    trips = round_trips(queries(before, after))
    log(f"e2e {backend.name}: {rate:.0f} req/s, {trips / count:.1f} queries per request")
    return Result(
        bench="e2e",
        backend=backend.name,
        metrics={
            "req_per_s": rate,
            "latency_p50_ms": percentile(latencies, 50),
            "latency_p99_ms": percentile(latencies, 99),
            "queries_per_req": trips / count,
        },
        ceiling=ceil,
        ratio=rate / ceil[f"b_c{CEILING_CONNECTIONS}"],
        ratio_means=f"requests/s / (b) at {CEILING_CONNECTIONS} connections (each request is 2 hand-offs)",
    )
