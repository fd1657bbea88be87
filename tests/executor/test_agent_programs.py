"""Program jobs through the executor agent: real broker, real sandbox processes, real Aer."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, programs_pb2, programs_pb2_grpc, types_pb2
from qrelay.broker.server import running_broker
from qrelay.broker.settings import BrokerSettings
from qrelay.executor.agent import Executor, running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.program import pack_program
from qrelay.values import decode_value
from tests.integration.rawstubs import watch_all

pytestmark = pytest.mark.slow


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    """World-searchable: sandboxes run as uids of their own when the tests run as root."""
    root = Path(tempfile.mkdtemp(prefix="qrelay-agent-sandbox-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Env:
    executor: Executor
    jobs: jobs_pb2_grpc.JobServiceStub
    programs: programs_pb2_grpc.ProgramServiceStub
    tmp: Path

    async def upload(self, source: str, name: str = "prog") -> str:
        src = self.tmp / name
        src.mkdir()
        (src / "main.py").write_text(textwrap.dedent(source))
        program = await self.programs.Upload(
            programs_pb2.UploadProgramRequest(
                name=name, archive=pack_program(src), entry_point="main:main"
            ),
            timeout=10,
        )
        return str(program.id)

    async def submit(self, program: str, inputs: dict[str, Any] | None = None) -> str:
        spec = types_pb2.JobSpec(
            backend="aer",
            program=types_pb2.ProgramTask(program=program, inputs_json=json.dumps(inputs or {})),
        )
        job = await self.jobs.Submit(jobs_pb2.SubmitRequest(spec=spec), timeout=10)
        return str(job.id)


@pytest.fixture
async def env(tmp_path: Path, sandbox_root: Path) -> AsyncIterator[Env]:
    broker_settings = BrokerSettings(
        listen="127.0.0.1:0",
        db_path=tmp_path / "broker.db",
        lease_ttl_s=5.0,
        heartbeat_interval_s=0.5,
    )
    async with running_broker(broker_settings) as broker:
        settings = ExecutorSettings(
            broker=broker.address,
            backends=["aer"],
            slots=1,
            sandbox={
                "cache_dir": str(sandbox_root),
                "warm_pool_size": 1,
                "wall_timeout_s": 60,
                "allow_weak_sandbox": True,
            },
        )
        async with (
            running_executor(settings) as executor,
            grpc.aio.insecure_channel(broker.address) as channel,
        ):
            yield Env(
                executor,
                jobs_pb2_grpc.JobServiceStub(channel),
                programs_pb2_grpc.ProgramServiceStub(channel),
                tmp_path,
            )


SAMPLING = """
from qiskit import QuantumCircuit

def main(ctx, shots):
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    ctx.log.info("sampling %d shots on %s", shots, ctx.backend.name)
    counts = ctx.sampler().run([qc], shots=shots).result()[0].data.meas.get_counts()
    ctx.publish({"outcomes": sorted(counts)})
    return {"shots": sum(counts.values()), "agree": counts.get("00", 0) + counts.get("11", 0)}
"""


async def test_program_samples_on_the_executor_and_streams_its_log_and_interim(env: Env) -> None:
    assert env.executor.capabilities == ["program"]
    job_id = await env.submit(await env.upload(SAMPLING), {"shots": 200})
    events = await watch_all(env.jobs, job_id, deadline=120)
    kinds = [e.WhichOneof("payload") for e in events]
    assert events[-1].state.state == types_pb2.JOB_STATE_DONE, events[-2:]
    logs = [e.log for e in events if e.HasField("log")]
    assert any(line.text == "sampling 200 shots on aer" and line.stream == "log" for line in logs)
    interims = [decode_value(e.interim.value_json) for e in events if e.HasField("interim")]
    # Ideal Bell state: only 00 and 11 ever appear (exact, no tolerance needed).
    assert interims == [{"outcomes": ["00", "11"]}]
    assert kinds.index("interim") < kinds.index("result")
    result = next(e.result for e in events if e.HasField("result"))
    assert decode_value(result.program_json) == {"shots": 200, "agree": 200}


FAILING = """
def helper(x):
    raise ValueError(f"x must be positive, got {x}")

def main(ctx, x):
    return helper(x)
"""


async def test_program_exception_fails_the_job_with_the_users_traceback_only(env: Env) -> None:
    job_id = await env.submit(await env.upload(FAILING), {"x": -1})
    events = await watch_all(env.jobs, job_id, deadline=120)
    assert events[-1].state.state == types_pb2.JOB_STATE_FAILED
    error = next(e.error for e in events if e.HasField("error"))
    assert error.code == 2  # UNKNOWN: an exception in user code
    assert error.type == "ValueError"
    assert "x must be positive, got -1" in error.message
    assert any("helper" in line for line in error.traceback)
    assert not any("qrelay/executor" in line for line in error.traceback)


SPINNING = """
import os, time

def main(ctx):
    ctx.publish({"pid": os.getpid(), "uid": os.getuid()})
    while True:
        time.sleep(0.05)
"""


def _gone(pid: int, uid: int) -> bool:
    """Whether the sandbox is gone: no process of its own uid left (when it has one, its
    pids are those of its own PID namespace), else no process `pid`."""
    if uid != os.getuid():
        return not _live_processes_of(uid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _live_processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                pids.append(int(entry.name))
    return pids


async def test_cancelling_a_running_program_releases_it_and_kills_its_sandbox(env: Env) -> None:
    job_id = await env.submit(await env.upload(SPINNING))
    pid: int | None = None
    uid = -1
    with anyio.fail_after(60):
        call = env.jobs.Watch(jobs_pb2.WatchRequest(job_id=job_id))
        async for event in call:
            if event.HasField("interim"):
                value = decode_value(event.interim.value_json)
                assert isinstance(value, dict)
                pid, uid = int(value["pid"]), int(value["uid"])
                break
        call.cancel()
    assert pid is not None
    assert not _gone(pid, uid)
    await env.jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job_id, reason="enough"), timeout=5)
    with anyio.fail_after(15):
        while not (_gone(pid, uid) and not env.executor.held_leases):  # noqa: ASYNC110 - /proc
            await anyio.sleep(0.05)
    events = await watch_all(env.jobs, job_id, deadline=30)
    assert events[-1].state.state == types_pb2.JOB_STATE_CANCELLED
    assert not any(e.HasField("result") or e.HasField("error") for e in events)
