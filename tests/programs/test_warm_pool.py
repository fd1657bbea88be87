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


def test_a_pool_closed_at_shutdown_leaves_nothing_for_finalizers(sandbox_root: Path) -> None:
    """Idle sandboxes killed as the executor stops close their pipes while the loop runs.

    Before, `make demo` ended with "Exception ignored in BaseSubprocessTransport.__del__
    ... RuntimeError: Event loop is closed" for each idle sandbox.
    """
    import asyncio
    import gc
    import sys
    import threading

    settings = SandboxSettings(cache_dir=sandbox_root, warm_pool_size=2, allow_weak_sandbox=True)
    for d in ("idle", "work"):
        (sandbox_root / d).mkdir(mode=0o755)

    async def run_and_close() -> int:
        isolation = await Isolation.probe(settings)
        python = SandboxUser.of(isolation).resolve_python(settings.python)
        pool = WarmPool(settings, isolation, python)
        await pool.fill()
        await pool.warmed()
        started = len(pool._idle)
        await pool.aclose()
        return started

    unraisable: list[str] = []
    started: list[int] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    try:
        # A loop of its own, closed the moment the pool is: nothing else runs on it
        # after aclose() returns, the worst case of a process exiting.
        def in_own_loop() -> None:
            loop = asyncio.new_event_loop()
            try:
                started.append(loop.run_until_complete(run_and_close()))
            finally:
                loop.close()

        thread = threading.Thread(target=in_own_loop)
        thread.start()
        thread.join(120)
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert started == [2]
    assert unraisable == []


def test_a_refill_cancelled_at_any_moment_leaves_no_sandbox_behind(sandbox_root: Path) -> None:
    """An executor stopping while it starts a replacement sandbox kills and reaps it."""
    import asyncio
    import gc
    import sys

    import anyio

    settings = SandboxSettings(cache_dir=sandbox_root, warm_pool_size=1, allow_weak_sandbox=True)
    for d in ("idle", "work"):
        (sandbox_root / d).mkdir(mode=0o755)

    async def cancel_fills() -> None:
        isolation = await Isolation.probe(settings)
        python = SandboxUser.of(isolation).resolve_python(settings.python)
        for step in range(12):
            pool = WarmPool(settings, isolation, python)
            with anyio.move_on_after(step * 0.002):
                await pool.fill()
            await pool.aclose()

    unraisable: list[str] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    try:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(cancel_fills())
        finally:
            loop.close()
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert unraisable == []
    assert _processes_mentioning(str(sandbox_root)) == [], "sandboxes left running"


def _processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line holds `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found
