"""The examples `make demo` runs keep working (against an in-process stack)."""

from __future__ import annotations

import pytest

from examples import estimator_sweep, sampler_ghz
from qrelay.testing import LocalStack


def test_sampler_example_runs(sync_stack: LocalStack, capsys: pytest.CaptureFixture[str]) -> None:
    sampler_ghz.main(sync_stack.address)
    out = capsys.readouterr().out
    assert "fake_manila" in out
    assert "P(000)+P(111)" in out


def test_estimator_sweep_example_runs(
    sync_stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    estimator_sweep.main(sync_stack.address, points=6)
    out = capsys.readouterr().out
    assert "mean |error| vs exact" in out
