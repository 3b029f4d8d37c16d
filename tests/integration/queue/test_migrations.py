"""Migrations own the schema: upgrading equals the models, and old rows survive upgrades."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from buildq.migrations import current_revision, head_revision, upgrade
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database, create_engine
from tests.support.database import BACKENDS, FAST, private_database


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path):
    """A database with no tables at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    server_url = request.getfixturevalue("mysql_server_url")
    with private_database(server_url, "buildq_mig", charset=False) as url:
        yield url


def _metadata():
    from buildq.migrations.models import all_metadata

    return all_metadata()


def test_upgrade_through_every_revision_equals_the_models(empty_url):
    upgrade(empty_url)
    engine = create_engine(empty_url, pool_size=1)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        diffs = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": False}), _metadata()
        )
    engine.dispose()
    assert diffs == []


def test_upgrade_twice_is_a_no_op(empty_url):
    upgrade(empty_url)
    upgrade(empty_url)


def test_rows_from_before_visible_after_are_still_delivered(empty_url):
    upgrade(empty_url, "0001")
    engine = create_engine(empty_url, pool_size=1)
    with engine.begin() as conn:
        for i in range(3):
            conn.execute(
                sa.text(
                    "INSERT INTO queue_messages"
                    " (topic, partition_key, message_id, payload, metadata, created_at)"
                    " VALUES ('t', 'p', :mid, :payload, '{}', 1)"
                ),
                {"mid": f"old-{i}", "payload": b"legacy"},
            )
    engine.dispose()
    upgrade(empty_url)
    db = Database(create_engine(empty_url))
    queue = SqlQueue(db)
    sub = queue.subscribe("t", "g", FAST)
    try:
        got = sub.fetch(10)
        assert [d.message.id for d in got] == ["old-0", "old-1", "old-2"]
        assert all(d.message.payload == b"legacy" for d in got)
        assert [s.visible_after_ms for s in queue.store.fetch_by_offset("t", "p", 0, 0)] == [
            0,
            0,
            0,
        ]
    finally:
        sub.close()
        db.dispose()
