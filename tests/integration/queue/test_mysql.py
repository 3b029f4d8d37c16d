"""MySQL/MariaDB specifics: the fetch plan, SKIP LOCKED, and transient errors retried."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from buildq.queue import Message
from buildq.queue.sql import SqlQueue
from buildq.queue.sql import queries as q
from buildq.queue.sql.schema import groups
from buildq.storage.database import Database, create_engine, is_transient

pytestmark = pytest.mark.mysql


@pytest.fixture
def mysql_db(mysql_url: str):
    database = Database(create_engine(mysql_url), retry_for_s=20)
    yield database
    database.dispose()


def _explain(db: Database, statement: sa.Executable, values: dict) -> list[dict]:
    compiled = statement.params(q.params(values)).compile(
        dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}
    )
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.exec_driver_sql(f"EXPLAIN {compiled}")]


def test_the_fetch_uses_its_index_without_a_filesort(mysql_db):
    queue = SqlQueue(mysql_db)
    for topic in ("t", "other"):
        for batch in range(10):
            queue.publish_many(
                topic,
                [
                    Message(id=f"m{batch}-{i}", payload=b"", partition_key=f"build-{i}")
                    for i in range(500)
                ],
                delay_ms=(batch % 3) * 60_000,
            )
    from buildq.queue.sql.leases import ensure_group

    ensure_group(mysql_db, "t", "g", 64)
    ensure_group(mysql_db, "other", "g", 64)
    with mysql_db.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE TABLE queue_deliveries")
    values = {"grp": "g", "topic": "t", "slots": list(range(0, 64, 3)), "limit": 64}
    for statement in (q.claim_due, q.select_next_due):
        [plan] = _explain(mysql_db, statement, values)
        assert plan["key"] == "ix_deliveries_fetch", plan
        assert "filesort" not in (plan["Extra"] or ""), plan
        assert plan["type"] in ("range", "ref"), plan


def test_server_supports_skip_locked(mysql_db):
    with mysql_db.engine.begin() as conn:
        conn.execute(sa.select(groups.c.topic).with_for_update(skip_locked=True))


def test_a_lock_wait_timeout_is_transient_and_retried(mysql_db):
    queue = SqlQueue(mysql_db)
    queue.publish("t", Message(id="row", payload=b"", partition_key="p"))
    holder = mysql_db.engine.connect()
    tx = holder.begin()
    holder.exec_driver_sql("SET innodb_lock_wait_timeout = 1")
    holder.exec_driver_sql("SELECT * FROM queue_messages FOR UPDATE")

    # A direct attempt fails with 1205 and is classified as transient.
    probe = mysql_db.engine.connect()
    probe.exec_driver_sql("SET innodb_lock_wait_timeout = 1")
    with pytest.raises(sa.exc.OperationalError) as caught:
        probe.exec_driver_sql("UPDATE queue_messages SET metadata = '{}'")
    assert caught.value.orig.args[0] == 1205 and is_transient(caught.value)
    probe.close()

    # Through Database.write the same conflict is waited out: release the lock meanwhile.
    attempts = []

    def write(conn: sa.Connection) -> int:
        attempts.append(1)
        conn.exec_driver_sql("SET innodb_lock_wait_timeout = 1")
        return conn.exec_driver_sql('UPDATE queue_messages SET metadata = \'{"k": "v"}\'').rowcount

    releaser = threading.Timer(1.5, lambda: (tx.rollback(), holder.close()))
    releaser.start()
    assert mysql_db.write(write) == 1
    releaser.join()
    assert len(attempts) >= 2
