"""A cgroup per sandbox: memory (tmpfs included), pids, CPU; kill and removal.

The end-to-end tests run real programs on this host's cgroups (v1 here:
memory, pids, cpu, freezer), tenant B's limit-breaking program beside tenant
A's job, which must finish. The v2 driver is tested against a fake cgroupfs
tree in tmp_path (file operations only: a kernel with v2 controllers is not
available here), plus the detection logic on recorded /proc texts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from qrelay._proto.v1 import backends_pb2
from qrelay.executor.programs import _cgroups
from qrelay.executor.programs._cgroups import CgroupLimits, CgroupsV1, CgroupsV2
from qrelay.executor.programs.runner import ProgramFailed
from qrelay.values import decode_value, encode_value
from tests.programs.conftest import BundleFactory, Events, Gates
from tests.programs.test_isolation import (  # noqa: F401 - fixture
    _pids_named,
    _runner,
    _wait_no_process,
    outside_tmp_root,
)

# --- detection and the v2 driver, on recorded texts and a fake tree ---------------

V1_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
35 30 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_OWN = "8:pids:/\n6:freezer:/\n4:memory:/jobs/abc\n1:cpu:/\n0::/\n"
V2_MOUNTINFO = "28 22 0:25 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_detects_v1_on_a_hybrid_host_under_the_executors_own_cgroups() -> None:
    found = _cgroups.detect("", V1_MOUNTINFO, V1_OWN)
    assert isinstance(found, CgroupsV1)
    assert found.where.split(", ") == [
        f"/sys/fs/cgroup/memory/jobs/abc/{found.group}",
        f"/sys/fs/cgroup/pids/{found.group}",
        f"/sys/fs/cgroup/cpu/{found.group}",
        f"/sys/fs/cgroup/freezer/{found.group}",
    ]


def test_detects_v2_and_a_configured_parent() -> None:
    found = _cgroups.detect("", V2_MOUNTINFO, "0::/system.slice/qrelay.service\n")
    assert isinstance(found, CgroupsV2)
    assert found.where == f"/sys/fs/cgroup/system.slice/qrelay.service/{found.group}"
    found = _cgroups.detect("/qrelay.slice", V2_MOUNTINFO, "0::/user.slice\n")
    assert isinstance(found, CgroupsV2)
    assert found.where == f"/sys/fs/cgroup/qrelay.slice/{found.group}"


def test_detection_says_why_there_are_no_cgroups() -> None:
    no_pids = V1_MOUNTINFO.replace("rw,pids", "rw,blkio")
    assert _cgroups.detect("", no_pids, V1_OWN) == "cgroup v1 without the pids controller(s)"
    assert _cgroups.detect("", "", "0::/\n") == "no cgroup file system is mounted"


def _fake_v2_root(root: Path) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


LIMITS = CgroupLimits(memory_bytes=512 << 20, pids=34, cpu_weight=50, cpu_quota=1.5)


async def test_v2_driver_writes_limits_and_kills_through_cgroup_kill(tmp_path: Path) -> None:
    root = _fake_v2_root(tmp_path / "cg")
    driver = CgroupsV2(root)
    driver.setup()
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    group = root / driver.group
    assert (group / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    cgroup = driver.create(LIMITS)
    path = group / "sb-1"
    assert cgroup.procs_files == [str(path / "cgroup.procs")]
    assert (path / "memory.max").read_text() == str(512 << 20)
    assert (path / "pids.max").read_text() == "34"
    assert (path / "cpu.weight").read_text() == "50"
    assert (path / "cpu.max").read_text() == "150000 100000"
    (path / "memory.current").write_text("1000\n")
    cgroup.set_memory_limit(cgroup.memory_usage() + (128 << 20))
    assert (path / "memory.max").read_text() == str(1000 + (128 << 20))
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\n")
    assert cgroup.oom_kills() == 1
    (path / "cgroup.kill").write_text("")
    await cgroup.kill()
    assert (path / "cgroup.kill").read_text() == "1"


async def test_v2_driver_without_cgroup_kill_freezes_and_kills_every_pid(tmp_path: Path) -> None:
    root = _fake_v2_root(tmp_path / "cg")
    driver = CgroupsV2(root)
    driver.setup()
    cgroup = driver.create(LIMITS)
    path = root / driver.group / "sb-1"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # noqa: ASYNC220
    try:
        (path / "cgroup.procs").write_text(f"{victim.pid}\n")
        (path / "cgroup.events").write_text("populated 1\nfrozen 1\n")
        await cgroup.kill()
        assert victim.wait(timeout=30) == -9
        assert (path / "cgroup.freeze").read_text() == "0", "thawed after the kills"
    finally:
        victim.kill()
        victim.wait()


def test_v2_driver_refuses_a_parent_without_the_controllers(tmp_path: Path) -> None:
    root = _fake_v2_root(tmp_path / "cg")
    (root / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(OSError, match="memory, pids are not delegated"):
        CgroupsV2(root).setup()


# --- real sandboxes on this host's cgroups ---------------------------------------

PROGRAM_A = """
from qiskit import QuantumCircuit

def main(ctx, work):
    ctx.publish("started")
    qc = QuantumCircuit(1)
    qc.measure_all()
    ctx.sampler({"test_gate": "A"}).run([qc], shots=1).result()
    total = sum(i * i for i in range(work))  # CPU time of its own
    return {"total": total}
"""

PROGRAM_B = """
import ctypes, os, time

def _gate(ctx, name):
    from qiskit import QuantumCircuit
    qc = QuantumCircuit(1)
    qc.measure_all()
    ctx.sampler({"test_gate": name}).run([qc], shots=1).result()

def _cgroups():
    with open("/proc/self/cgroup") as f:
        return dict(line.strip().split(":", 2)[1:] for line in f)

def children_allocate(ctx, marker):
    pids = []
    for _ in range(4):  # each within its own address-space limit, together over the job's
        pid = os.fork()
        if pid == 0:
            block = bytearray(100 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(600)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return "survived"

def fill_tmpfs(ctx, marker):
    chunk = b"x" * (8 << 20)
    written = 0
    while written < (400 << 20):
        with open(f"/tmp/fill-{written}.bin", "wb") as f:
            f.write(chunk)
        written += len(chunk)
    return written

def fork_bomb(ctx, marker):
    forks, error = 0, None
    while forks < 10000:
        try:
            pid = os.fork()
        except OSError as exc:
            error = type(exc).__name__
            break
        if pid == 0:
            ctypes.CDLL(None).prctl(15, marker.encode(), 0, 0, 0)
            time.sleep(600)
            os._exit(0)
        forks += 1
    ctx.publish({"forks": forks, "error": error, "cgroups": _cgroups()})
    _gate(ctx, "B")
    return "done"

def cpu_hog(ctx, marker):
    for _ in range(4):
        if os.fork() == 0:
            ctypes.CDLL(None).prctl(15, marker.encode(), 0, 0, 0)
            while True:
                pass
    ctx.publish({"cgroups": _cgroups()})
    _gate(ctx, "B")
    return "done"

def main(ctx, attack, marker):
    return globals()[attack](ctx, marker)
"""


async def _a_beside_b(
    runner: Any,
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
    attack: str,
    marker: str,
    *,
    b_holds: bool,
) -> tuple[Any, Any, Any]:
    """Run A; while it waits, run B's attack; A goes on once B failed or published.

    Returns (A's result, B's outcome, what B published first)."""
    bundle_a = make_bundle({"main.py": PROGRAM_A})
    bundle_b = make_bundle({"main.py": PROGRAM_B})
    events_a, events_b = Events(), Events()
    results: dict[str, Any] = {}

    async def run(name: str, bundle: Any, inputs: dict[str, Any], events: Events) -> None:
        try:
            result = await runner.run(
                f"j-{name}", bundle, encode_value(inputs), backend_info, events
            )
            results[name] = decode_value(result.program_json)
        except ProgramFailed as exc:
            results[name] = exc

    seen: Any = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "A", bundle_a, {"work": 2_000_000}, events_a)
        await events_a.wait_for(lambda: bool(events_a.interims) or "A" in results, 120)
        tg.start_soon(run, "B", bundle_b, {"attack": attack, "marker": marker}, events_b)
        if b_holds:
            await events_b.wait_for(lambda: bool(events_b.interims) or "B" in results, 120)
            seen = decode_value(events_b.interims[0]) if events_b.interims else None
        else:
            with anyio.fail_after(120):
                while "B" not in results:  # noqa: ASYNC110 - set by the task above
                    await anyio.sleep(0.02)
        gates["A"].set()
        with anyio.fail_after(120):
            while "A" not in results:  # noqa: ASYNC110 - set by the task above
                await anyio.sleep(0.02)
        if b_holds:
            seen = seen, await _while_b_holds(seen)
        gates["B"].set()
    return results["A"], results["B"], seen


async def _while_b_holds(seen: Any) -> dict[str, str]:
    """Read B's live cgroup files (pids and cpu hierarchies) while it holds at its gate."""
    out: dict[str, str] = {}
    if not isinstance(seen, dict) or "cgroups" not in seen:
        return out
    for controller, files in (
        ("pids", ("pids.max", "pids.events")),
        ("cpu", ("cpu.shares", "cpu.stat")),
    ):
        path = seen["cgroups"].get(controller)
        for name in files:
            file = anyio.Path(f"/sys/fs/cgroup/{controller}{path}/{name}")
            out[name] = await file.read_text() if await file.exists() else "missing"
    return out


def _cgroup_runner(root: Path, gates: Gates, **overrides: Any) -> Any:
    fields = {"memory_mb": 128, "warm_pool_size": 0, "disk_mb": 512, **overrides}
    return _runner(root, gates, **fields)


async def test_program_over_its_memory_limit_fails_while_a_finishes(
    outside_tmp_root: Path,  # noqa: F811 - the fixture
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    async with _cgroup_runner(outside_tmp_root, gates) as runner:
        a, b, _ = await _a_beside_b(
            runner, gates, backend_info, make_bundle, "children_allocate", "qm", b_holds=False
        )
    assert a == {"total": sum(i * i for i in range(2_000_000))}
    assert isinstance(b, ProgramFailed), b
    assert b.code == 8, b.job_error  # RESOURCE_EXHAUSTED
    message = b.job_error.message
    assert message.startswith("memory limit of 128 MB exceeded (the job's processes"), message
    assert "the kernel killed" in message, "the cgroup's limit, not one process's address space"


async def test_files_in_the_tmpfs_count_against_the_jobs_memory(
    outside_tmp_root: Path,  # noqa: F811 - the fixture
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    # 400 MB of files fit the 512 MB tmpfs but not the 128 MB memory limit.
    async with _cgroup_runner(outside_tmp_root, gates) as runner:
        a, b, _ = await _a_beside_b(
            runner, gates, backend_info, make_bundle, "fill_tmpfs", "qt", b_holds=False
        )
    assert a == {"total": sum(i * i for i in range(2_000_000))}
    assert isinstance(b, ProgramFailed), b
    assert b.code == 8, b.job_error
    message = b.job_error.message
    assert message.startswith("memory limit of 128 MB exceeded (the job's processes"), message
    assert "the files it wrote to its tmpfs" in message


async def test_fork_bomb_stops_at_the_jobs_pids_limit_and_nothing_outlives_it(
    outside_tmp_root: Path,  # noqa: F811 - the fixture
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    marker = "qf" + Path(outside_tmp_root).name[-6:]
    async with _cgroup_runner(outside_tmp_root, gates, max_processes=24) as runner:
        a, b, (seen, live) = await _a_beside_b(
            runner, gates, backend_info, make_bundle, "fork_bomb", marker, b_holds=True
        )
        survivors = await _wait_no_process(marker)
    assert a == {"total": sum(i * i for i in range(2_000_000))}
    assert b == "done"
    assert seen["error"] == "BlockingIOError", seen  # fork refused: EAGAIN
    assert seen["forks"] < 24, seen
    assert live["pids.max"].strip() == "26", live  # max_processes + outer and init
    assert int(live["pids.events"].split()[1]) > 0, "the cgroup's limit refused the forks"
    assert survivors == [], "a forked child outlived its job"
    for controller in ("memory", "pids", "cpu", "freezer"):
        path = anyio.Path(f"/sys/fs/cgroup/{controller}{seen['cgroups'][controller]}")
        assert not await path.exists(), f"{path} was left behind"


async def test_cpu_hog_does_not_stop_another_job_from_finishing(
    outside_tmp_root: Path,  # noqa: F811 - the fixture
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    marker = "qc" + Path(outside_tmp_root).name[-6:]
    async with _cgroup_runner(outside_tmp_root, gates, cpu_quota=0.5, cpu_weight=50) as runner:
        a, b, (_seen, live) = await _a_beside_b(
            runner, gates, backend_info, make_bundle, "cpu_hog", marker, b_holds=True
        )
        survivors = await _wait_no_process(marker)
    # A finished its own CPU work while B's four spinning processes ran.
    assert a == {"total": sum(i * i for i in range(2_000_000))}
    assert b == "done"
    assert live["cpu.shares"].strip() == "512", live  # weight 50 of 100
    throttled = dict(line.split() for line in live["cpu.stat"].splitlines())
    assert int(throttled["nr_throttled"]) > 0, "B was held to its quota of half a CPU"
    assert survivors == [], "a spinning child outlived its job"
    assert _pids_named(marker) == []


def test_empty_groups_of_dead_executors_are_reaped_and_live_ones_kept(tmp_path: Path) -> None:
    root = _fake_v2_root(tmp_path / "cg")
    dead = max(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) + 100_000
    (root / f"qrelay-{dead}-abc123" / "sb-1").mkdir(parents=True)
    (root / f"qrelay-{dead}-abc123-executor").mkdir()
    (root / f"qrelay-{os.getpid()}-def456" / "sb-1").mkdir(parents=True)  # a live executor's
    (root / "system.slice").mkdir()
    driver = CgroupsV2(root)
    assert driver.reap_stale() == 3
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        f"qrelay-{os.getpid()}-def456",
        "system.slice",
    ]


async def test_cleanup_that_cannot_remove_the_cgroup_never_raises(tmp_path: Path) -> None:
    root = _fake_v2_root(tmp_path / "cg")
    driver = CgroupsV2(root)
    driver.setup()
    cgroup = driver.create(LIMITS)  # a fake directory with files in it: rmdir fails
    (cgroup.paths[0] / "cgroup.kill").write_text("")
    assert await cgroup.destroy() is False
    assert (cgroup.paths[0] / "cgroup.kill").read_text() == "1", "it was killed all the same"
    assert await cgroup.destroy() is False, "a second clean-up (a race) is harmless too"


async def test_host_without_cgroups_reports_it_and_refuses_programs(
    sandbox_root: Path, gates: Gates, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qrelay.errors import FailedPrecondition
    from qrelay.executor.programs import ProgramRunner, SandboxSettings
    from qrelay.executor.programs.sandbox import Isolation

    uids = range(200_500, 200_510) if os.geteuid() == 0 else None

    async def no_cgroups(cls: type[Isolation], settings: SandboxSettings) -> Isolation:
        return Isolation(uids, True, seccomp=True, seccomp_refused="", cgroups_refused="test")

    monkeypatch.setattr(Isolation, "probe", classmethod(no_cgroups))
    settings = SandboxSettings(cache_dir=sandbox_root / "cache", warm_pool_size=0)
    runner = ProgramRunner(settings, gates.run_primitive)
    with pytest.raises(FailedPrecondition) as info:
        await runner.start()
    await runner.aclose()
    assert "a cgroup per job (test): memory is limited per process only" in info.value.message
    assert "tenant programs are refused" in info.value.message
