"""Warm pool priorities: sandboxes import niced, a job gets the executor's priority back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrelay.executor.programs import SandboxSettings
from qrelay.executor.programs.sandbox import Isolation, SandboxUser, WarmPool


def _nice_of_group(pgid: int) -> list[int]:
    """Nice value of every thread of every process in the group (field 19 of stat)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:  # fields after comm: state, ppid, pgrp, ...
                    out.append(int(fields[16]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


async def test_replacement_imports_niced_and_the_taken_sandbox_runs_at_executor_priority(
    sandbox_root: Path,
) -> None:
    settings = SandboxSettings(cache_dir=sandbox_root, warm_pool_size=1, warm_nice=15)
    for d in ("idle", "work"):
        (sandbox_root / d).mkdir(mode=0o755)
    isolation = await Isolation.probe(settings)
    pool = WarmPool(settings, isolation, SandboxUser.of(isolation).resolve_python(settings.python))
    if pool.nice == 0:
        pytest.skip("this process may not raise priorities back (no root, RLIMIT_NICE)")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        await pool.fill()
        await pool.warmed()
        (idle,) = list(pool._idle)
        assert set(_nice_of_group(idle.pid)) == {min(19, base + 15)}
        taken = await pool.take()
        assert taken is idle
        assert set(_nice_of_group(taken.pid)) == {base}, "every thread back to the executor's"
        (replacement,) = list(pool._idle)
        await replacement.wait_ready(settings.start_timeout_s)
        assert set(_nice_of_group(replacement.pid)) == {min(19, base + 15)}
        await taken.kill()
    finally:
        await pool.aclose()


def test_warm_nice_is_bounded_like_nice_itself() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="warm_nice"):
        SandboxSettings(warm_nice=20)
    with pytest.raises(ValidationError, match="warm_nice"):
        SandboxSettings(warm_nice=-1)
