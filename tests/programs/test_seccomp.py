"""The sandbox's seccomp filter, tried from inside real programs (real sandboxes, real Aer)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from qrelay._proto.v1 import backends_pb2
from qrelay.errors import FailedPrecondition
from qrelay.executor.programs import ProgramRunner, SandboxSettings
from qrelay.executor.programs.sandbox import Isolation
from qrelay.values import decode_value
from tests.programs.conftest import BundleFactory, Events, Gates
from tests.programs.test_isolation import _runner, outside_tmp_root  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="raw system call numbers below are x86_64's"
)

DENIED_CALLS = """
import ctypes, errno, os

libc = ctypes.CDLL(None, use_errno=True)

def outcome(result):
    err = ctypes.get_errno()
    return "ok" if result >= 0 else errno.errorcode.get(err, str(err))

def main(ctx):
    out = {
        "unshare": outcome(libc.unshare(0x10000000)),  # CLONE_NEWUSER
        "mount": outcome(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        "ptrace": outcome(libc.ptrace(0, 0, None, None)),  # PTRACE_TRACEME
        "process_vm_readv": outcome(libc.process_vm_readv(1, None, 0, None, 0, 0)),
        "bpf": outcome(libc.syscall(321, 0, None, 0)),  # BPF_MAP_CREATE
        "keyctl": outcome(libc.syscall(250, 0, -3, 0, 0, 0)),  # KEYCTL_GET_KEYRING_ID
        "perf_event_open": outcome(libc.syscall(298, None, 0, -1, -1, 0)),
        "clone_newns": outcome(libc.syscall(56, 0x00020000 | 17, 0, 0, 0, 0)),
    }
    with open("/proc/self/status") as f:
        out["mode"] = [l.split()[1] for l in f if l.startswith("Seccomp:")][0]
    return out
"""

ORDINARY = """
import subprocess, sys, threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from qiskit import QuantumCircuit
from qiskit.quantum_info import Statevector

def main(ctx):
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    probs = Statevector(qc).probabilities_dict()
    with ThreadPoolExecutor(4) as pool:
        squares = list(pool.map(lambda x: int(np.square(x)), range(4)))
    child = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "print(6 * 7)"], capture_output=True, text=True
    )
    qc.measure_all()
    counts = ctx.sampler().run([qc], shots=64).result()[0].data.meas.get_counts()
    return {
        "probs": sorted(probs),
        "squares": squares,
        "child": child.stdout.strip(),
        "child_rc": child.returncode,
        "shots": sum(counts.values()),
        "threads": threading.active_count(),
    }
"""


async def test_denied_system_calls_answer_eperm_and_the_job_completes(
    outside_tmp_root: Path,  # noqa: F811 - the fixture
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    async with _runner(outside_tmp_root, gates) as runner:
        assert runner.isolation.seccomp, runner.isolation.seccomp_refused
        bundle = make_bundle({"main.py": DENIED_CALLS})
        result = await runner.run("j-seccomp", bundle, "", backend_info, Events())
    seen = decode_value(result.program_json)
    assert seen == {
        "unshare": "EPERM",
        "mount": "EPERM",
        "ptrace": "EPERM",
        "process_vm_readv": "EPERM",
        "bpf": "EPERM",
        "keyctl": "EPERM",
        "perf_event_open": "EPERM",
        "clone_newns": "EPERM",
        "mode": "2",  # SECCOMP_MODE_FILTER
    }, seen


async def test_ordinary_programs_still_work_under_the_filter(
    outside_tmp_root: Path,  # noqa: F811 - the fixture
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    async with _runner(outside_tmp_root, gates) as runner:
        bundle = make_bundle({"main.py": ORDINARY})
        result = await runner.run("j-ordinary", bundle, "", backend_info, Events())
    assert decode_value(result.program_json) == {
        "probs": ["00", "11"],
        "squares": [0, 1, 4, 9],
        "child": "42",
        "child_rc": 0,
        "shots": 64,
        "threads": 1,
    }


async def test_host_without_seccomp_reports_it_and_refuses_programs(
    sandbox_root: Path, gates: Gates, monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = range(200_500, 200_510) if os.geteuid() == 0 else None

    async def no_seccomp(cls: type[Isolation], settings: SandboxSettings) -> Isolation:
        return Isolation(uids, True, seccomp=False, seccomp_refused="libseccomp missing (test)")

    monkeypatch.setattr(Isolation, "probe", classmethod(no_seccomp))
    settings = SandboxSettings(cache_dir=sandbox_root / "cache", warm_pool_size=0)
    runner = ProgramRunner(settings, gates.run_primitive)
    with pytest.raises(FailedPrecondition) as info:
        await runner.start()
    await runner.aclose()
    assert "a seccomp filter (libseccomp missing (test))" in info.value.message
    assert "tenant programs are refused" in info.value.message
