"""Alembic environment: run migrations on the connection buildq hands over (or the URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from buildq.storage.database import create_engine

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1, create=True)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
