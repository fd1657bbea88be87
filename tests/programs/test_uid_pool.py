"""Sandbox uids shared by executors on one host: claimed with a per-uid flock (real locks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qrelay.errors import FailedPrecondition, ResourceExhausted
from qrelay.executor.programs.sandbox import UidPool

# A range no process of the host runs as (the pool skips uids in use).
UIDS = range(260_000, 260_006)


def test_two_executors_never_hold_the_same_uid(tmp_path: Path) -> None:
    a, b = UidPool(UIDS, tmp_path / "uids"), UidPool(UIDS, tmp_path / "uids")
    held = [pool.acquire() for _ in range(3) for pool in (a, b)]
    assert sorted(held) == list(UIDS), "every uid handed out exactly once"
    for pool in (a, b):
        with pytest.raises(ResourceExhausted, match="in use on this host"):
            pool.acquire()
    # A uid released by one executor is free for the other; the rest stay taken.
    a.release(held[0])
    assert b.acquire() == held[0]
    with pytest.raises(ResourceExhausted):
        a.acquire()
    a.close()
    b.close()


def test_lock_files_are_one_per_uid_and_survive_release(tmp_path: Path) -> None:
    pool = UidPool(UIDS, tmp_path / "uids")
    uid = pool.acquire()
    pool.release(uid)
    assert [p.name for p in (tmp_path / "uids").iterdir()] == [f"{uid}.lock"]
    assert pool.acquire() != uid, "round robin: the rest of the range comes first"
    pool.close()


HOLDER = """
import sys, time
from pathlib import Path
from qrelay.executor.programs.sandbox import UidPool
pool = UidPool(range(int(sys.argv[2]), int(sys.argv[2]) + 1), Path(sys.argv[1]))
print(pool.acquire(), flush=True)
time.sleep(600)
"""


def test_crashed_holders_uid_is_released_by_the_kernel(tmp_path: Path) -> None:
    uid = UIDS[0]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "uids"), str(uid)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == str(uid)
        pool = UidPool(range(uid, uid + 1), tmp_path / "uids")
        with pytest.raises(ResourceExhausted):
            pool.acquire()
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
        assert pool.acquire() == uid
        pool.close()
    finally:
        holder.kill()
        holder.wait()


def test_unusable_lock_dir_is_a_clear_start_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(FailedPrecondition, match="QRELAY_SANDBOX_UID_LOCK_DIR"):
        UidPool(UIDS, blocker / "uids")
