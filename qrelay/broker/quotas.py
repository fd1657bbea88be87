"""Quotas per tenant and what a tenant uses: where the limits come from, the
current period, the audit of every refusal, and the usage report.

The limits are enforced by the stores inside their transactions (queued
jobs, the period's executor-seconds, open sessions and program storage at
submit, create and upload; running jobs at claim, where a tenant at its
quota simply gets nothing claimed) so they hold exactly, across replicas
too. This module decides which limits apply: `QuotaSource` is the one small
interface the broker asks, and `SettingsQuotas` answers it from the broker's
settings (a store-backed source can replace it once tenants live in the
store).

Executor-seconds: a job's run is charged from its lease (claim) to its end
(done, failed, or cancelled while running) on the broker's clock; a run
lost with its executor is not. Use is kept per tenant per UTC day; a
period ("day" or "month", calendar, UTC) is the sum of its days, and a
submit is refused once the period's use reaches the budget (the job that
crosses it still finishes).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from qrelay.broker.audit import audit
from qrelay.broker.settings import BrokerSettings, QuotaLimits
from qrelay.broker.store.base import JobStore, Quota, RunningLimits, TenantUsage
from qrelay.errors import QuotaExceeded


class QuotaSource(Protocol):
    """Where a tenant's quotas come from (settings today; the tenant record later)."""

    async def quota(self, tenant: str) -> Quota:
        """The tenant's limits as they apply now, with the current period's first day."""
        ...

    async def running_limits(self) -> RunningLimits | None:
        """Every tenant's running-jobs limit, for claims; None when no tenant has one."""
        ...

    def period(self) -> Period:
        """The current executor-seconds period."""
        ...


@dataclass(frozen=True)
class Period:
    """A calendar day or month, UTC: [start, end)."""

    start: dt.datetime
    end: dt.datetime

    @property
    def first_day(self) -> str:
        return self.start.strftime("%Y-%m-%d")

    @property
    def next_day(self) -> str:
        """The first day of the next period."""
        return self.end.strftime("%Y-%m-%d")


def current_period(kind: str, now: float) -> Period:
    """The calendar "day" or "month" (UTC) holding `now`."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    if kind == "day":
        return Period(today, today + dt.timedelta(days=1))
    start = today.replace(day=1)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return Period(start, end)


class SettingsQuotas:
    """`QuotaSource` from `BrokerSettings.tenant_quotas` and `quota_period`."""

    def __init__(self, settings: BrokerSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        configured = settings.tenant_quotas
        self._default = configured.get("default", QuotaLimits())
        self._tenants = {
            name: limits.over(self._default)
            for name, limits in configured.items()
            if name != "default"
        }

    def limits(self, tenant: str) -> QuotaLimits:
        return self._tenants.get(tenant, self._default)

    def period(self) -> Period:
        return current_period(self.settings.quota_period, self.clock())

    async def quota(self, tenant: str) -> Quota:
        limits = self.limits(tenant)
        period = self.period()
        return Quota(
            max_queued_jobs=limits.max_queued_jobs,
            max_running_jobs=limits.max_running_jobs,
            max_sessions=limits.max_sessions,
            max_program_bytes=limits.max_program_bytes,
            max_executor_seconds=limits.max_executor_seconds,
            period_start=period.first_day,
            period_end=period.next_day,
        )

    async def running_limits(self) -> RunningLimits | None:
        limits = RunningLimits(
            default=self._default.max_running_jobs,
            tenants={name: q.max_running_jobs for name, q in self._tenants.items()},
        )
        return limits if limits.any else None


@contextmanager
def audited(action: str) -> Iterator[None]:
    """Audit a quota's refusal of `action` ("submit", "create_session",
    "upload_program") as `quota_refused`, then let it go on to the caller."""
    try:
        yield
    except QuotaExceeded as exc:
        audit(
            "quota_refused",
            tenant=exc.tenant,
            quota=exc.quota,
            limit=exc.limit,
            used=exc.used,
            action=action,
        )
        raise


@dataclass(frozen=True)
class UsageReport:
    """A tenant's use in the current period beside its quotas (service.usage())."""

    tenant: str
    period: Period
    usage: TenantUsage
    quota: Quota


async def usage_report(store: JobStore, quotas: QuotaSource, tenant: str) -> UsageReport:
    quota = await quotas.quota(tenant)
    period = quotas.period()
    usage = await store.tenant_usage(tenant, period.first_day)
    return UsageReport(tenant, period, usage, quota)
