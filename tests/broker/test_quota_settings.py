"""Quota settings and the settings-backed QuotaSource: parsing, validation,
per-tenant overrides over the default, and the calendar periods."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from pydantic import ValidationError

from qrelay.broker.quotas import SettingsQuotas, current_period
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store.base import Quota, RunningLimits

QUOTAS = (
    '{"default": {"max_queued_jobs": 100, "max_running_jobs": 4, "max_executor_seconds": 3600},'
    ' "lab": {"max_running_jobs": 16, "max_queued_jobs": null}}'
)


def test_quotas_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRELAY_TENANT_QUOTAS", QUOTAS)
    monkeypatch.setenv("QRELAY_QUOTA_PERIOD", "day")
    settings = BrokerSettings()
    assert settings.quota_period == "day"
    assert settings.tenant_quotas["lab"].max_running_jobs == 16


async def test_a_tenants_entry_overrides_the_default_limit_by_limit() -> None:
    now = dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC).timestamp()
    quotas = SettingsQuotas(BrokerSettings(tenant_quotas=QUOTAS), clock=lambda: now)
    assert await quotas.quota("someone") == Quota(
        max_queued_jobs=100,
        max_running_jobs=4,
        max_executor_seconds=3600.0,
        period_start="2026-11-01",
        period_end="2026-12-01",
    )
    lab = await quotas.quota("lab")
    # Named limits win (null: none), the rest come from "default".
    assert (lab.max_queued_jobs, lab.max_running_jobs, lab.max_executor_seconds) == (
        None,
        16,
        3600.0,
    )
    assert await quotas.running_limits() == RunningLimits(default=4, tenants={"lab": 16})


async def test_no_quotas_means_no_limits_and_no_running_limits() -> None:
    quotas = SettingsQuotas(BrokerSettings())
    quota = await quotas.quota("a")
    assert quota == Quota(period_start=quota.period_start, period_end=quota.period_end)
    assert await quotas.running_limits() is None


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('{"default": {"max_queued_jobs": -1}}', "greater than or equal to 0"),
        ('{"default": {"max_running_jobs": 0}}', "greater than or equal to 1"),
        ('{"default": {"max_queue": 5}}', "Extra inputs are not permitted"),
        ('{"default": 5}', "valid dictionary"),
        ("{not json", "tenant_quotas is not JSON"),
    ],
)
def test_bad_quota_settings_are_refused_clearly(value: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        BrokerSettings(tenant_quotas=value)


def test_an_unknown_period_is_refused() -> None:
    with pytest.raises(ValidationError, match="'day' or 'month'"):
        BrokerSettings(quota_period="week")


@pytest.mark.parametrize(
    ("kind", "when", "start", "end"),
    [
        ("month", "2026-11-30T23:59:59", "2026-11-01", "2026-12-01"),
        ("month", "2026-12-31T12:00:00", "2026-12-01", "2027-01-01"),
        ("day", "2026-11-30T23:59:59", "2026-11-30", "2026-12-01"),
    ],
)
def test_periods_are_calendar_days_and_months_in_utc(
    kind: str, when: str, start: str, end: str
) -> None:
    now = dt.datetime.fromisoformat(when).replace(tzinfo=dt.UTC).timestamp()
    period = current_period(kind, now)
    assert (period.first_day, period.end.strftime("%Y-%m-%d")) == (start, end)


def test_the_cli_refuses_bad_quota_json_without_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qrelay", "broker", "serve", "--tenant-quotas", "{nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "tenant_quotas is not JSON" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
