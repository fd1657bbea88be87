"""Durable job storage behind the `JobStore` interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qrelay.broker.store.base import (
    BackendRecord,
    CancelOutcome,
    ExpiredLease,
    HeldCheck,
    JobKind,
    JobPage,
    JobRecord,
    JobState,
    JobStore,
    LeaseGrant,
    NewJob,
    StoredEvent,
    UpdateKind,
    UpdateOutcome,
)

if TYPE_CHECKING:
    from qrelay.broker.settings import BrokerSettings


def open_store(settings: BrokerSettings, *, origin: str = "") -> JobStore:
    """The store the settings ask for (not yet opened; `await store.open()`).

    PostgreSQL when `database_url` is set (replicas may share it; `origin`
    tags its notifications), else SQLite at `db_path`.
    """
    if settings.database_url:
        from qrelay.broker.store.postgres import PostgresJobStore

        return PostgresJobStore(
            settings.database_url, schema=settings.database_schema, origin=origin
        )
    from qrelay.broker.store.sqlite import SQLiteJobStore

    return SQLiteJobStore(settings.db_path, synchronous=settings.sqlite_synchronous)


__all__ = [
    "BackendRecord",
    "CancelOutcome",
    "ExpiredLease",
    "HeldCheck",
    "JobKind",
    "JobPage",
    "JobRecord",
    "JobState",
    "JobStore",
    "LeaseGrant",
    "NewJob",
    "StoredEvent",
    "UpdateKind",
    "UpdateOutcome",
    "open_store",
]
