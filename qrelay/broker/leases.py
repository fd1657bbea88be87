"""The lease reaper: requeues (or fails) jobs whose executor stopped heartbeating.

Leases are extended by heartbeats in the store. The reaper sleeps until the
earliest lease could lapse (never longer than one TTL, since a new lease
lives at least that long), then expires everything past due in one
transaction: QUEUED again with the attempt counted, or FAILED with
UNAVAILABLE once `max_attempts` runs have been lost.
"""

from __future__ import annotations

import time

import anyio
import structlog

from qrelay.broker.events import EventHub
from qrelay.broker.scheduler import Scheduler
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import ExpiredLease, JobState, JobStore

log = structlog.get_logger(__name__)


class LeaseReaper:
    def __init__(
        self, store: JobStore, hub: EventHub, scheduler: Scheduler, settings: BrokerSettings
    ) -> None:
        self.store = store
        self.hub = hub
        self.scheduler = scheduler
        self.settings = settings

    async def reap(self) -> list[ExpiredLease]:
        """Expire every lapsed lease now; publish, notify executors, reschedule."""
        expired = await self.store.expire_leases(time.time(), self.settings.max_attempts)
        for item in expired:
            self.hub.publish(item.events)
            self.scheduler.send_cancel(
                item.executor_id, item.job.id, item.lease_id, "lease expired; the job was requeued"
            )
            if item.job.state is JobState.FAILED:
                self.scheduler.job_finished(item.job)
                log.warning(
                    "lease.expired",
                    job_id=item.job.id,
                    executor_id=item.executor_id,
                    attempts=item.job.attempts,
                    outcome="failed",
                )
            else:
                self.scheduler.queued(item.job.backend, item.job.kind)
                log.info(
                    "lease.expired",
                    job_id=item.job.id,
                    executor_id=item.executor_id,
                    attempts=item.job.attempts,
                    outcome="requeued",
                )
        if expired:
            self.scheduler.wake()
        return expired

    async def run(self) -> None:
        """Loop until cancelled."""
        ttl = self.settings.lease_ttl_s
        while True:
            try:
                await self.reap()
                nxt = await self.store.next_lease_expiry()
            except Exception as exc:  # the reaper must outlive a bad moment (logged)
                log.error("reaper.failed", retry_in_s=ttl / 4, exc_info=exc)
                await anyio.sleep(ttl / 4)
                continue
            delay = ttl if nxt is None else min(max(nxt - time.time(), 0.0) + 0.01, ttl)
            await anyio.sleep(delay)
