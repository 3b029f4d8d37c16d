"""Retention deletes messages every group is done with once they are old enough, nothing else."""

from __future__ import annotations

import sqlalchemy as sa

from buildq.queue import Message
from buildq.queue.sql.retention import Retention
from buildq.queue.sql.schema import messages
from tests.integration.queue.test_publish import count


def test_purges_only_old_messages_that_no_group_still_needs(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish_many(
        "t", [Message(id=f"m{i}", payload=b"", partition_key=f"k{i}") for i in range(5)]
    )
    queue.publish_after("t", Message(id="later", payload=b"", partition_key="k9"), 3_600_000)
    queue.publish("nobody-listens", Message(id="x", payload=b"", partition_key="k"))
    done = sub.fetch(3)
    for d in done:
        d.ack()
    # Age everything by an hour, as if it had been written long ago.
    db.write(
        lambda c: c.execute(
            sa.update(messages).values(created_at=messages.c.created_at - 3_600_000)
        )
    )
    result = Retention(db, retention_ms=60_000).purge()
    remaining = {
        r.message_id for r in db.read(lambda c: c.execute(sa.select(messages.c.message_id)).all())
    }
    # Acked by its only group, or on a topic without groups: gone. Pending or in flight: kept.
    assert remaining == {"m3", "m4", "later"}
    assert result.deleted == 4
    # A fresh message is kept however done it is: it is also the deduplication record.
    queue.publish("nobody-listens", Message(id="y", payload=b"", partition_key="k"))
    Retention(db, retention_ms=60_000).purge()
    assert count(db, messages, messages.c.message_id == "y") == 1
    assert queue.publish(
        "nobody-listens", Message(id="y", payload=b"", partition_key="k")
    ).duplicate
