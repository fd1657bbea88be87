"""Durable job storage behind the `JobStore` interface."""

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
]
