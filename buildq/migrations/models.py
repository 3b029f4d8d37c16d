"""Every table model the migrations must produce (what the migration test compares against)."""

from __future__ import annotations

from sqlalchemy import MetaData


def all_metadata() -> list[MetaData]:
    from buildq.orchestrator.schema import metadata as build_metadata
    from buildq.queue.sql.schema import metadata as queue_metadata

    return [queue_metadata, build_metadata]
