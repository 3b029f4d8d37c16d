"""Proposed optimisations, measured before they are made: bench-only patches and hand-offs.

    python -m bench.experiments [--backend mysql|sqlite|all] [--only handoff,framework,daemon]

Nothing here changes ``buildq/``: each candidate is either another way to drive today's
queue (a hand-off the P1 driver runs instead of ``publish_after`` + ``ack``) or a monkeypatch
applied inside this process, or inside a daemon child through ``BUILDQ_BENCH_PATCHES``. Every
variant is measured in interleaved rounds next to the unchanged code and ceiling (b), so the
before/after ratio holds however noisy the machine is. docs/BENCHMARKS.md turns the results
into the patches proposed for ``buildq/``.

Hand-offs (``handoff``; P1's workload, minimal driver):

- ``sa``: today — ``tx.publish_after`` (INSERT IGNORE + INSERT…SELECT fan-out, SQLAlchemy
  Core) + ``tx.ack`` (fenced DELETE) + COMMIT, one transaction per cycle.
- ``driver``: the same statements pre-compiled once per dialect and run with
  ``exec_driver_sql``; the fan-out selects the new row by its key (``lastrowid``) instead of
  IN-lists over the unique key.
- ``multi`` (MariaDB): the three statements in one round trip (``CLIENT.MULTI_STATEMENTS``,
  the fan-out keyed by ``LAST_INSERT_ID()`` and the publish token), then COMMIT: 2 round trips.
- ``saG``: today's API, G cycles per transaction (G × publish_after + G × ack).
- ``bulkG``: G cycles per transaction in 3 statements: one multi-row INSERT with a delay per
  row, one fan-out, one fenced DELETE for all G deliveries, then COMMIT.

Patches (``framework`` and ``daemon``):

- ``lowwater``: the consumer framework's fetcher waits until half its in-flight window is free
  before fetching again, so a busy consumer claims full batches instead of one delivery per
  claim transaction.
- ``readnocommit``: the MySQL autocommit read pool skips COMMIT/ROLLBACK (PyMySQL sends them
  to the server even in autocommit mode: one wasted round trip per read).
- ``driversql``: the ``driver`` hand-off's statements inside the real queue (single-message
  publish and ack), so the daemon uses them.
- ``buildstore``: the build store's per-poll statements (``get_by_build``, ``record_poll``)
  built once with bound parameters, as the queue's are, instead of a new construct with literal
  values on every call (which SQLAlchemy must coerce and hash into a cache key each time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import bindparam, event, select
from sqlalchemy.engine import Connection, Dialect

from bench.ceiling import Ceiling
from bench.common import (
    BACKENDS,
    PROFILES,
    Recorder,
    Result,
    fresh_database,
    log,
    machine_info,
    mysql_available,
)
from bench.p1_cycle import Step, Workload, run_driver, run_framework
from buildq.queue.contract import Delivery, DeliveryLost
from buildq.queue.sql import SqlDelivery, SqlTransaction
from buildq.queue.sql import queries as q
from buildq.queue.sql.dialect import db_now_ms, insert_ignore
from buildq.queue.sql.schema import deliveries as d
from buildq.queue.sql.schema import groups as g
from buildq.queue.sql.schema import messages as m

PATCHES_ENV = "BUILDQ_BENCH_PATCHES"

#: Fan-out of one message, found by its key: no IN-lists over the unique key.
fan_out_seq = insert_ignore(d).from_select(
    ["seq", "grp", "topic", "slot", "visible_at"],
    select(m.c.seq, g.c.grp, m.c.topic, m.c.partition_hash % g.c.slots, m.c.visible_after)
    .join(g, g.c.topic == m.c.topic)
    .where(m.c.seq == bindparam("p_seq")),
)


class Precompiled:
    """A Core statement compiled once for a dialect, run with ``exec_driver_sql``."""

    def __init__(self, stmt: Any, dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql: str = compiled.string
        self.positional: list[str] | None = compiled.positiontup
        self.defaults = {name: bind.effective_value for name, bind in compiled.binds.items()}

    def args(self, params: dict[str, Any]) -> Any:
        """Positional (sqlite3) or named (PyMySQL here) parameters, defaults filled in."""
        values = self.defaults | params
        if self.positional is not None:
            return tuple(values[name] for name in self.positional)
        return {name: values[name] for name in self.defaults}

    def run(self, conn: Connection, params: dict[str, Any]) -> Any:
        return conn.exec_driver_sql(self.sql, self.args(params))


def _settling(tx: SqlTransaction, delivery: Delivery) -> SqlDelivery:
    """What ``tx.ack`` does besides its SQL: the delivery settles when the transaction commits."""
    assert isinstance(delivery, SqlDelivery)
    delivery._subscription.begin_settle(delivery)
    tx._settling.append(delivery)
    return delivery


class HandOffs:
    """The hand-off variants for one queue (statements compiled for its dialect)."""

    def __init__(self, work: Workload) -> None:
        self.queue = work.queue
        self.store = work.queue.store
        self.dialect = work.db.engine.dialect
        self.insert = Precompiled(q.insert_messages_after, self.dialect)
        self.fan_out = Precompiled(fan_out_seq, self.dialect)
        self.ack = Precompiled(q.delete_acked, self.dialect)
        self.mark = "%s" if self.dialect.paramstyle in ("format", "pyformat") else "?"
        self.now = str(db_now_ms().compile(dialect=self.dialect))

    def driver(self, tx: SqlTransaction, chunk: Sequence[Delivery], steps: list[Step]) -> None:
        conn = tx.connection
        for delivery, step in zip(chunk, steps, strict=True):
            row = self.store.encode(step.topic, [step.message])[0]
            inserted = self.insert.run(conn, q.params(row | {"delay_ms": step.delay_ms}))
            if inserted.rowcount == 1:
                self.fan_out.run(conn, {"p_seq": inserted.lastrowid})
            sql_delivery = _settling(tx, delivery)
            fence = sql_delivery._subscription._fence(sql_delivery)
            if self.ack.run(conn, q.params(fence)).rowcount != 1:
                raise DeliveryLost("ack refused")

    def multi(self, tx: SqlTransaction, chunk: Sequence[Delivery], steps: list[Step]) -> None:
        """MariaDB: INSERT + fan-out + DELETE as one multi-statement round trip."""
        raw = tx.connection.connection.driver_connection
        assert raw is not None
        fan_out = (
            "INSERT IGNORE INTO queue_deliveries (seq, grp, topic, slot, visible_at)"
            " SELECT m.seq, g.grp, m.topic, m.partition_hash %% g.slots, m.visible_after"
            " FROM queue_messages m JOIN queue_groups g ON g.topic = m.topic"
            " WHERE m.seq = LAST_INSERT_ID() AND m.publish_token = %s"
        )
        for delivery, step in zip(chunk, steps, strict=True):
            row = self.store.encode(step.topic, [step.message])[0]
            sql_delivery = _settling(tx, delivery)
            fence = q.params(sql_delivery._subscription._fence(sql_delivery))
            with raw.cursor() as cur:
                batch = ";\n".join(
                    [
                        cur.mogrify(
                            self.insert.sql,
                            self.insert.args(q.params(row | {"delay_ms": step.delay_ms})),
                        ),
                        cur.mogrify(fan_out, (row["publish_token"],)),
                        cur.mogrify(self.ack.sql, self.ack.args(fence)),
                    ]
                )
                cur.execute(batch)
                counts = [cur.rowcount]
                while cur.nextset():
                    counts.append(cur.rowcount)
            if counts[-1] != 1:
                raise DeliveryLost("ack refused")

    def bulk(self, tx: SqlTransaction, chunk: Sequence[Delivery], steps: list[Step]) -> None:
        """G cycles in 3 statements: multi-row INSERT, one fan-out, one fenced DELETE."""
        conn, mark = tx.connection, self.mark
        topic = steps[0].topic
        rows = self.store.encode(topic, [s.message for s in steps])
        columns = "topic, partition_key, message_id, partition_hash, payload, metadata"
        one = f"({', '.join([mark] * 6)}, {self.now} + {mark}, {self.now}, {mark})"
        ignore = "INSERT OR IGNORE" if self.dialect.name == "sqlite" else "INSERT IGNORE"
        sql = (
            f"{ignore} INTO queue_messages ({columns}, visible_after, created_at, publish_token)"
            f" VALUES {', '.join([one] * len(rows))}"
        )
        args: list[Any] = []
        for row, step in zip(rows, steps, strict=True):
            args += [row["topic"], row["partition_key"], row["message_id"]]
            args += [row["partition_hash"], row["payload"], row["metadata"], step.delay_ms]
            args.append(row["publish_token"])
        if conn.exec_driver_sql(sql, tuple(args)).rowcount:
            keys = {
                "topic": topic,
                "partition_keys": sorted({r["partition_key"] for r in rows}),
                "message_ids": sorted({r["message_id"] for r in rows}),
                "publish_token": rows[0]["publish_token"],
                "dlq_group": "",
            }
            conn.execute(q.fan_out_messages, q.params(keys))
        settled = [_settling(tx, delivery) for delivery in chunk]
        if self._ack_many(conn, settled) != len(settled):
            raise DeliveryLost("some acks refused: the caller retries them one by one")

    def _ack_many(self, conn: Connection, deliveries: list[SqlDelivery]) -> int:
        mark, sub = self.mark, deliveries[0]._subscription
        pairs = ", ".join([f"({mark}, {mark})"] * len(deliveries))
        seqs = ", ".join([mark] * len(deliveries))
        leases = {(x.slot, x.epoch) for x in deliveries}
        lease_pairs = ", ".join([f"({mark}, {mark})"] * len(leases))
        # Only placeholders are interpolated; every value is a bound parameter.
        sql = (
            f"DELETE FROM queue_deliveries WHERE grp = {mark} AND inflight = 1"  # noqa: S608
            f" AND seq IN ({seqs}) AND (seq, attempt) IN ({pairs})"
            " AND EXISTS (SELECT 1 FROM queue_leases l WHERE l.grp = queue_deliveries.grp"
            f" AND l.topic = queue_deliveries.topic AND l.slot = queue_deliveries.slot"
            f" AND l.owner = {mark} AND (l.slot, l.epoch) IN ({lease_pairs}))"
        )
        args: list[Any] = [sub.group, *[x.offset for x in deliveries]]
        for x in deliveries:
            args += [x.offset, x.attempt]
        args.append(sub.member_id)
        for slot, epoch in sorted(leases):
            args += [slot, epoch]
        return int(conn.exec_driver_sql(sql, tuple(args)).rowcount)


# --- patches ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def lowwater() -> contextlib.AbstractContextManager[None]:
    from buildq.orchestrator.framework import Consumer

    def _wait_for_room(self: Any, subscription: Any, limit: int) -> int:
        refill = max(1, limit // 2)
        with self._capacity:
            while not self._stop.is_set() and self._inflight[id(subscription)] > limit - refill:
                self._capacity.wait(0.5)
            return int(limit - self._inflight[id(subscription)])

    return _patched(Consumer, "_wait_for_room", _wait_for_room)


def readnocommit() -> contextlib.AbstractContextManager[None]:
    import buildq.db

    original = buildq.db._mysql_engine

    def _mysql_engine(url: Any, pool_size: int, *, autocommit: bool = False) -> Any:
        engine = original(url, pool_size, autocommit=autocommit)
        if autocommit:  # nothing to commit or roll back: skip the round trip PyMySQL would make
            engine.dialect.do_commit = lambda _dbapi_conn: None  # type: ignore[method-assign]
            engine.dialect.do_rollback = lambda _dbapi_conn: None  # type: ignore[method-assign]
        return engine

    return _patched(buildq.db, "_mysql_engine", _mysql_engine)


@contextlib.contextmanager
def driversql() -> Iterator[None]:
    from buildq.queue.sql.store import MessageStore
    from buildq.queue.sql.subscription import SqlSubscription

    insert_rows_in = MessageStore.insert_rows_in
    compiled: dict[int, tuple[Precompiled, Precompiled, Precompiled]] = {}

    def statements(conn: Connection) -> tuple[Precompiled, Precompiled, Precompiled]:
        key = id(conn.dialect)
        if key not in compiled:
            compiled[key] = (
                Precompiled(q.insert_messages_after, conn.dialect),
                Precompiled(fan_out_seq, conn.dialect),
                Precompiled(q.delete_acked, conn.dialect),
            )
        return compiled[key]

    def fast_insert(self: Any, conn: Connection, topic: str, rows: list[Any], **kw: Any) -> Any:
        if len(rows) != 1 or kw.get("delay_ms", 0) <= 0:
            return insert_rows_in(self, conn, topic, rows, **kw)
        from buildq.queue.contract import PublishResult

        insert, fan_out, _ = statements(conn)
        inserted = insert.run(conn, q.params(rows[0] | {"delay_ms": kw["delay_ms"]}))
        if inserted.rowcount == 1:
            fan_out.run(conn, {"p_seq": inserted.lastrowid})
        row = rows[0]
        return [PublishResult(row["message_id"], row["partition_key"], inserted.rowcount == 0)]

    def fast_ack(self: Any, conn: Connection, delivery: Any) -> None:
        if statements(conn)[2].run(conn, q.params(self._fence(delivery))).rowcount == 0:
            raise self._refused(delivery, "ack")

    with (
        _patched(MessageStore, "insert_rows_in", fast_insert),
        _patched(SqlSubscription, "ack_in", fast_ack),
    ):
        yield


@contextlib.contextmanager
def buildstore() -> Iterator[None]:
    """The build store's per-poll read and write as statements built once, values bound."""
    from sqlalchemy import and_, literal_column, update

    from buildq.orchestrator import sqlstore
    from buildq.orchestrator.schema import builds as b

    not_terminal = and_(*(b.c.status != literal_column(f"'{s}'") for s in sqlstore.TERMINAL))
    record_poll = (
        update(b)
        .where(b.c.build_id == bindparam("p_build_id"), not_terminal)
        .values(
            status=bindparam("p_status"),
            metadata=bindparam("p_metadata"),
            polls=bindparam("p_polls"),
            next_poll_at=sqlstore.NOW + bindparam("p_next_poll_ms"),
            updated_at=sqlstore.NOW,
        )
    )
    get_by_build = select(b).where(b.c.build_id == bindparam("p_build_id"))

    def fast_record_poll(
        self: Any, build_id: str, status: Any, metadata: Any, polls: int, next_poll_ms: int
    ) -> None:
        self.conn.execute(
            record_poll,
            {
                "p_build_id": build_id,
                "p_status": status.value,
                "p_metadata": sqlstore._dump(metadata),
                "p_polls": polls,
                "p_next_poll_ms": next_poll_ms,
            },
        )

    def fast_get_by_build(self: Any, build_id: str) -> Any:
        row = self.conn.execute(get_by_build, {"p_build_id": build_id}).first()
        return None if row is None else sqlstore.to_build(row)

    with (
        _patched(sqlstore.SqlBuildWrites, "record_poll", fast_record_poll),
        _patched(sqlstore.SqlBuildWrites, "get_by_build", fast_get_by_build),
    ):
        yield


PATCHES: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "buildstore": buildstore,
    "lowwater": lowwater,
    "readnocommit": readnocommit,
    "driversql": driversql,
}


def apply_from_environment(stack: contextlib.ExitStack) -> list[str]:
    """In a daemon child: apply the patches named in ``BUILDQ_BENCH_PATCHES``."""
    names = [n for n in os.environ.get(PATCHES_ENV, "").split(",") if n]
    for name in names:
        stack.enter_context(PATCHES[name]())
    return names


# --- the experiments ------------------------------------------------------------------------------


def _multi_statements(engine: Any) -> None:
    from pymysql.constants import CLIENT

    @event.listens_for(engine, "do_connect")
    def _flags(dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        if dialect.name in ("mysql", "mariadb"):
            cparams["client_flag"] = cparams.get("client_flag", 0) | CLIENT.MULTI_STATEMENTS


def handoff(backend: Any, rounds: int, seconds: float, threads: Sequence[int]) -> Result:
    """Cycles/s and CPU ms per cycle of each hand-off, next to ceiling (b)."""
    if backend.name == "mysql":
        _multi_statements_for_new_engines()
    work = Workload(backend, 3_000)
    ceiling = Ceiling(backend, 1.0)
    offs = HandOffs(work)
    variants: dict[str, tuple[int, Any]] = {"sa": (1, None), "driver": (1, offs.driver)}
    if backend.name == "mysql":
        variants["multi"] = (1, offs.multi)
    variants |= {"sa16": (16, None), "bulk16": (16, offs.bulk)}
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        for n in threads:
            for _ in range(rounds):
                rates.setdefault(f"b_c{n}", []).append(ceiling.txn(n))
                for name, (group, hand_off) in variants.items():
                    figures = run_driver(
                        work.queue, work.sub, work.cycle, n, seconds, group, hand_off
                    )
                    rates.setdefault(f"{name}_t{n}", []).append(figures["rate"])
                    cpu.setdefault(f"{name}_cpu_ms_t{n}", []).append(figures["cpu_ms_per_cycle"])
                log(f"handoff {backend.name} t{n}: { {k: v[-1] for k, v in rates.items()} }")
    finally:
        work.close()
    return _result("x-handoff", backend.name, rates, cpu, "sa", "bulk16", threads[0])


_ENGINE_HOOKED = False


def _multi_statements_for_new_engines() -> None:
    global _ENGINE_HOOKED
    if not _ENGINE_HOOKED:
        from sqlalchemy.engine import Engine

        _multi_statements(Engine)
        _ENGINE_HOOKED = True


def framework(backend: Any, rounds: int, seconds: float, threads: Sequence[int]) -> Result:
    """The consumer framework as it is and with the low-water fetch."""
    work = Workload(backend, 3_000)
    ceiling = Ceiling(backend, 1.0)
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    fetches: dict[str, list[float]] = {}
    try:
        for n in threads:
            for _ in range(rounds):
                rates.setdefault(f"b_c{n}", []).append(ceiling.txn(n))
                for name, patch in (("fw", contextlib.nullcontext), ("lowwater", lowwater)):
                    with patch():
                        figures = run_framework(work.queue, work.sub, work.cycle, n, seconds)
                    rates.setdefault(f"{name}_t{n}", []).append(figures["rate"])
                    cpu.setdefault(f"{name}_cpu_ms_t{n}", []).append(figures["cpu_ms_per_cycle"])
                    fetches.setdefault(f"{name}_per_fetch_t{n}", []).append(figures["per_fetch"])
            log(f"framework {backend.name} t{n}: { {k: v[-1] for k, v in rates.items()} }")
    finally:
        work.close()
    result = _result("x-framework", backend.name, rates, cpu, "fw", "lowwater", threads[0])
    result.metrics |= {k: sum(v) / len(v) for k, v in fetches.items()}
    return result


def daemon(backend: Any, rounds: int, seconds: float, variants: Sequence[str]) -> Result:
    """P5 saturation (one daemon) with patch sets applied in the daemon process."""
    from bench.p5_capacity import saturate

    rates: dict[str, list[float]] = {}
    notes: dict[str, Any] = {}
    for _ in range(rounds):
        for variant in variants:
            os.environ[PATCHES_ENV] = "" if variant == "base" else variant.replace("+", ",")
            try:
                figures = saturate(backend.name, 1, seconds)
            finally:
                os.environ.pop(PATCHES_ENV, None)
            rates.setdefault(variant, []).append(figures["polls_per_s"])
            for key in ("cpu_ms_per_poll", "queries_per_poll"):
                rates.setdefault(f"{variant}:{key}", []).append(figures[key])
            notes.setdefault(variant, []).append(figures)
            log(f"daemon {backend.name} {variant}: {figures['polls_per_s']:.0f} polls/s")
    metrics = {k: sum(v) / len(v) for k, v in rates.items()}
    best = max(variants, key=lambda v: metrics[v])
    return Result(
        bench="x-daemon",
        backend=backend.name,
        metrics=metrics,
        ceiling={},
        ratio=metrics[best] / metrics["base"],
        ratio_means=f"polls/s of the best variant ({best}) / unpatched daemon",
        notes={"runs": notes},
    )


def overhead(backend: Any, rounds: int, count: int = 2_000) -> Result:
    """CPU µs per statement: raw driver cursor vs ``exec_driver_sql`` vs SQLAlchemy Core.

    One thread, one transaction, ``count`` executions of the fenced ack DELETE (it matches no
    row, so the server's share is a probe of two indexes) and of the fan-out INSERT…SELECT
    with its IN-lists (matching nothing). What differs between the three is client-side work.
    """
    db = backend.database(pool_size=2)
    ack = Precompiled(q.delete_acked, db.engine.dialect)
    fence = q.params(
        {"seq": 0, "grp": "g", "topic": "t", "attempt": 1, "slot": 0, "owner": "o", "epoch": 1}
    )
    keys = q.params(
        {
            "topic": "t",
            "partition_keys": ["k1"],
            "message_ids": ["k1/poll/2"],
            "publish_token": 1,
            "dlq_group": "",
        }
    )
    per: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(count):
            fn()
        per.setdefault(f"{name}_cpu_us", []).append((time.process_time() - cpu) / count * 1e6)
        per.setdefault(f"{name}_wall_us", []).append((time.perf_counter() - wall) / count * 1e6)

    try:
        for _ in range(rounds):
            with db.engine.connect() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                cur = raw.cursor()
                timed("ack_raw", lambda cur=cur: cur.execute(ack.sql, ack.args(fence)))
                timed("ack_driver_sql", lambda conn=conn: ack.run(conn, fence))
                timed("ack_core", lambda conn=conn: conn.execute(q.delete_acked, fence))
                timed("fanout_core", lambda conn=conn: conn.execute(q.fan_out_messages, keys))
                cur.close()
                conn.rollback()
    finally:
        db.dispose()
    metrics = {k: sum(v) / len(v) for k, v in per.items()}
    return Result(
        bench="x-overhead",
        backend=backend.name,
        metrics=metrics,
        ceiling={},
        ratio=metrics["ack_core_cpu_us"] / metrics["ack_raw_cpu_us"],
        ratio_means="CPU per ack DELETE through SQLAlchemy Core / through the raw cursor",
    )


def delay(backend: Any, rounds: int, seconds: float) -> Result:
    """P4 at its target rate, as it is and with the low-water fetch."""
    from bench.p4_delay import measure

    figures: dict[str, list[float]] = {}
    notes: dict[str, Any] = {}
    for _ in range(rounds):
        for name, patch in (("fw", contextlib.nullcontext), ("lowwater", lowwater)):
            with patch():
                result = measure(backend, PROFILES["quick"].p4_rates[0], seconds)
            for key in ("late_p50_ms", "late_p99_ms", "rate"):
                figures.setdefault(f"{name}_{key}", []).append(result[key])
            notes.setdefault(name, []).append(result)
    metrics = {k: sum(v) / len(v) for k, v in figures.items()}
    return Result(
        bench="x-delay",
        backend=backend.name,
        metrics=metrics,
        ceiling={},
        ratio=metrics["lowwater_late_p99_ms"] / metrics["fw_late_p99_ms"],
        ratio_means="P4 lateness p99 at 1,000 msgs/s with the low-water fetch / without",
        notes={"runs": notes},
    )


def _result(
    bench: str,
    backend: str,
    rates: dict[str, list[float]],
    cpu: dict[str, list[float]],
    before: str,
    after: str,
    n: int,
) -> Result:
    means = {k: sum(v) / len(v) for k, v in rates.items()}
    metrics = {k: v for k, v in means.items() if not k.startswith("b_c")}
    metrics |= {k: sum(v) / len(v) for k, v in cpu.items()}
    return Result(
        bench=bench,
        backend=backend,
        metrics=metrics,
        ceiling={k: v for k, v in means.items() if k.startswith("b_c")},
        ratio=means[f"{after}_t{n}"] / means[f"{before}_t{n}"],
        ratio_means=f"{after} / {before} at {n} thread(s)",
        notes={"rounds": rates},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments")
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="all")
    parser.add_argument("--only", default="handoff,framework,daemon")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument(
        "--daemon-variants",
        default="base,buildstore,driversql,readnocommit,lowwater,"
        "buildstore+driversql+readnocommit+lowwater",
    )
    args = parser.parse_args(argv)
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    if "mysql" in backends and mysql_available() is not None:
        backends.remove("mysql")
    from buildq import logs

    logs.configure("warning", "json")
    recorder = Recorder(
        {
            "run_id": time.strftime("%Y%m%dT%H%M%S"),
            "profile": "experiments",
            "benches": args.only,
            "backends": backends,
            "machine": machine_info(backends),
        }
    )
    threads = [int(t) for t in args.threads.split(",")]
    variants = args.daemon_variants.split(",")
    for backend_name in backends:
        for name in args.only.split(","):
            with fresh_database(backend_name, f"x{name}") as backend:
                if name == "overhead":
                    result = overhead(backend, args.rounds)
                elif name == "delay":
                    result = delay(backend, args.rounds, max(args.seconds, 6.0))
                elif name == "handoff":
                    result = handoff(backend, args.rounds, args.seconds, threads)
                elif name == "framework":
                    result = framework(backend, args.rounds, args.seconds, threads)
                else:
                    seconds = max(args.seconds, PROFILES["quick"].p5_saturate_s)
                    result = daemon(backend, args.rounds, seconds, variants)
                recorder.record(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
