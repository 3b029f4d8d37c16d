"""The statements of the batched hot path: settling many deliveries and publishing many
messages in a fixed number of statements per batch (``batch.py``), and keeping claims alive
(``claims.py``).

A batch's deliveries and messages vary in number, so the statements whose shape follows the
batch (a ``CASE`` arm per delivery, a ``VALUES`` row per message) are rendered as text, once per
dialect and size, and sent with positional parameters: no SQLAlchemy compilation, no IN-list
expansion per execution. Names in the text are this module's constants; every value is bound.

Fencing without locks: a delivery's write lands only if its row is still the claim we hold
(same ``attempt``, still in flight). Which leases this member holds is read once per batch, by
a plain (non-locking) SELECT: no statement here takes a lock on ``queue_leases``, so a batch
cannot deadlock with the member's own lease renewal (see docs/queue.md, "Locks").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, ClassVar

from sqlalchemy import Update, bindparam, delete, select, update
from sqlalchemy.engine import Connection, Dialect

from buildq.queue.sql.schema import deliveries as d
from buildq.queue.sql.schema import groups as g
from buildq.queue.sql.schema import leases as lease
from buildq.queue.sql.schema import messages as m
from buildq.storage.dialect import (
    db_now_ms,
    insert_ignore,
    insert_ignore_sql,
    now_ms_sql,
    placeholder,
    updates_row_by_row,
)

NOW = db_now_ms()

#: The columns a published message's row is written with, in VALUES order.
MESSAGE_COLUMNS = (
    "topic",
    "partition_key",
    "message_id",
    "partition_hash",
    "payload",
    "metadata",
    "visible_after",
    "created_at",
    "publish_token",
)
#: A claim as the fenced statements name it: (offset, attempt).
Claim = tuple[int, int]
#: Rows per INSERT: within SQLite's 32,766 parameters and MySQL's max_allowed_packet.
MAX_ROWS_PER_INSERT = 500

#: The leases some members of a group hold, with the database's clock: a batch's fence.
select_member_leases = select(
    lease.c.topic, lease.c.slot, lease.c.epoch, lease.c.owner, NOW.label("now")
).where(
    lease.c.grp == bindparam("p_grp"),
    lease.c.owner.in_(bindparam("p_owners", expanding=True)),
)

#: The claims, among these offsets, that are still in flight, with their attempts (only when
#: a batch's fenced delete missed some: to tell which).
select_inflight_attempts = select(d.c.seq, d.c.attempt).where(
    d.c.grp == bindparam("p_grp"),
    d.c.seq.in_(bindparam("p_seqs", expanding=True)),
    d.c.inflight == 1,
)

_claim_held = (
    (d.c.seq == bindparam("p_seq"))
    & (d.c.grp == bindparam("p_grp"))
    & (d.c.attempt == bindparam("p_attempt"))
    & (d.c.inflight == 1)
)

#: Who holds one slot's lease now, and at which epoch (a plain read: no lock).
select_lease_holder = select(lease.c.owner, lease.c.epoch).where(
    lease.c.grp == bindparam("p_grp"),
    lease.c.topic == bindparam("p_topic"),
    lease.c.slot == bindparam("p_slot"),
)

#: Ack one claim.
settle_ack = delete(d).where(_claim_held)

#: Push one claim further out.
extend_claim: Update = (
    update(d).where(_claim_held).values(visible_at=NOW + bindparam("p_extend_ms"))
)

#: A failure: deliver again after a delay, one retry more.
settle_nack: Update = (
    update(d)
    .where(_claim_held)
    .values(
        inflight=0,
        owner="",
        visible_at=NOW + bindparam("p_delay_ms"),
        retry_count=d.c.retry_count + 1,
        last_error=bindparam("p_error"),
    )
)

#: Not now, not a failure: deliver again after a delay, retry count unchanged.
settle_defer: Update = (
    update(d)
    .where(_claim_held)
    .values(inflight=0, owner="", visible_at=NOW + bindparam("p_delay_ms"))
)

#: Never started (shutdown, rebalance): no retry counted, and back to its place in the fetch
#: order (its message's visible_after), so a handover keeps its partition's order.
settle_hand_back: Update = (
    update(d)
    .where(_claim_held)
    .values(
        inflight=0,
        owner="",
        visible_at=select(m.c.visible_after).where(m.c.seq == d.c.seq).scalar_subquery(),
    )
)

#: The identities of the rows one INSERT wrote (only when some of its messages were
#: duplicates: to tell which).
select_inserted_ids = select(m.c.topic, m.c.partition_key, m.c.message_id).where(
    m.c.seq >= bindparam("p_first_seq"),
    m.c.publish_token == bindparam("p_publish_token"),
)

#: Every group of the topic gets a delivery of each message one INSERT wrote: the rows from
#: its first offset on that carry its publish token (other writers' rows interleaved with
#: them, or written since, carry other tokens).
fan_out_inserted = insert_ignore(d).from_select(
    ["seq", "grp", "topic", "slot", "visible_at"],
    select(m.c.seq, g.c.grp, m.c.topic, m.c.partition_hash % g.c.slots, m.c.visible_after)
    .join(g, g.c.topic == m.c.topic)
    .where(
        m.c.seq >= bindparam("p_first_seq"),
        m.c.publish_token == bindparam("p_publish_token"),
    ),
)


class BatchSql:
    """The size-shaped statements of one dialect, rendered once per size."""

    _by_dialect: ClassVar[dict[tuple[str, str], BatchSql]] = {}

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.p = placeholder(dialect)
        self.now = now_ms_sql(dialect)
        self.insert_ignore = insert_ignore_sql(dialect)
        self.row_by_row = updates_row_by_row(dialect)
        #: The row-by-row forms (executemany; see ``updates_row_by_row``).
        p = self.p
        self._delete_acked_row = (
            f"DELETE FROM queue_deliveries WHERE seq = {p} AND grp = {p} "  # noqa: S608
            f"AND attempt = {p} AND inflight = 1"
        )
        self._extend_claim_row = (
            f"UPDATE queue_deliveries SET visible_at = {self.now} + {p} "  # noqa: S608
            f"WHERE seq = {p} AND grp = {p} AND attempt = {p} AND inflight = 1"
        )

    @classmethod
    def of(cls, dialect: Dialect) -> BatchSql:
        key = (dialect.name, dialect.driver)
        found = cls._by_dialect.get(key)
        if found is None:
            found = cls._by_dialect[key] = cls(dialect)
        return found

    def delete_acked(self, conn: Connection, group: str, claims: Sequence[Claim]) -> int:
        """Ack these claims of one group; how many were still ours."""
        return self._fenced(conn, self._delete_acked_row, self._delete_acked, (), group, claims)

    def extend_claims(self, conn: Connection, group: str, claims: Sequence[Claim], ms: int) -> int:
        """Push these claims of one group ``ms`` past the database's now; how many were still
        ours."""
        return self._fenced(conn, self._extend_claim_row, self._extend_claims, (ms,), group, claims)

    def _fenced(
        self,
        conn: Connection,
        row_sql: str,
        sql_of_size: Callable[[int], str],
        lead: tuple[Any, ...],
        group: str,
        claims: Sequence[Claim],
    ) -> int:
        """Run a statement fenced per claim by its attempt, in the form this dialect runs best
        (``updates_row_by_row``): its rowcount."""
        if self.row_by_row:
            rows = [(*lead, seq, group, attempt) for seq, attempt in claims]
            return int(conn.exec_driver_sql(row_sql, rows).rowcount)
        params: list[Any] = [*lead, group, *(seq for seq, _ in claims)]
        for claim in claims:
            params += claim
        return int(conn.exec_driver_sql(sql_of_size(len(claims)), tuple(params)).rowcount)

    def _attempt_case(self, n: int) -> str:
        arms = " ".join(f"WHEN {self.p} THEN {self.p}" for _ in range(n))
        return f"attempt = CASE seq {arms} END"

    def _in(self, n: int) -> str:
        return ", ".join([self.p] * n)

    @lru_cache(maxsize=1024)  # noqa: B019 (a few instances, one per engine, live as long)
    def _delete_acked(self, n: int) -> str:
        """Params: grp, the n offsets, then (offset, attempt) pairs."""
        return (
            f"DELETE FROM queue_deliveries WHERE grp = {self.p} "  # noqa: S608 (constants)
            f"AND seq IN ({self._in(n)}) AND inflight = 1 AND {self._attempt_case(n)}"
        )

    @lru_cache(maxsize=1024)  # noqa: B019
    def _extend_claims(self, n: int) -> str:
        """Params: ms, grp, the n offsets, then (offset, attempt) pairs."""
        return (
            f"UPDATE queue_deliveries SET visible_at = {self.now} + {self.p} "  # noqa: S608
            f"WHERE grp = {self.p} AND seq IN ({self._in(n)}) AND inflight = 1 "
            f"AND {self._attempt_case(n)}"
        )

    @lru_cache(maxsize=1024)  # noqa: B019
    def insert_messages(self, n: int) -> str:
        """``n`` messages in one statement, params in ``MESSAGE_COLUMNS`` order per row; its
        rowcount says how many were new (the rest were duplicates)."""
        row = "(" + ", ".join([self.p] * len(MESSAGE_COLUMNS)) + ")"
        return (
            f"{self.insert_ignore} INTO queue_messages ({', '.join(MESSAGE_COLUMNS)}) "
            f"VALUES {', '.join([row] * n)}"
        )
