"""Processes and a light client shared by the benchmarks that run qrelay as deployed.

`processes()` starts a broker and executors as separate `python -m qrelay`
processes on loopback (each with its own interpreter and GIL, as in a real
deployment) and stops them all on exit; `RawClient` drives JobService.Run
over the generated stubs without decoding results, so a load generator
sharing the machine takes as little CPU from qrelay as it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from qrelay.testing import free_port

#: Deadline for a process to come up (health SERVING, executor online).
_START_TIMEOUT_S = 60.0
#: Deadline for one job driven by RawClient.
JOB_TIMEOUT_S = 120.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by the broker, the executors and this client over one measurement, in cores."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    def sample(self) -> dict[str, float]:
        broker = self.procs.broker
        assert broker is not None
        executors = [p for p in self.procs.procs if p is not broker and p.poll() is None]
        return {
            "broker": cpu_seconds(broker.pid),
            "executors": sum(cpu_seconds(p.pid) for p in executors),
            "client": cpu_seconds(os.getpid()),
            "t": time.perf_counter(),
        }

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        dt = after["t"] - before["t"]
        return {f"cpu_{k}": (after[k] - before[k]) / dt for k in ("broker", "executors", "client")}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Processes:
    """A broker process and executor processes on loopback; all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.address = ""

    def _spawn(self, args: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / log_name).open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "qrelay", "--log-level", "warning", "--log-json", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
        log.close()
        self.procs.append(proc)
        return proc

    async def start_broker(self, max_queued: int) -> str:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.broker = self._spawn(
            [
                "broker",
                "serve",
                "--listen",
                self.address,
                "--db",
                str(self.workdir / "broker.db"),
                "--max-queued-per-tenant",
                str(max_queued),
            ],
            "broker.log",
        )
        await self._wait_serving()
        return self.address

    async def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with anyio.fail_after(_START_TIMEOUT_S):
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    self._check_alive()
                    try:
                        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
                    await anyio.sleep(0.1)

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                logs = "\n".join(p.read_text()[-2000:] for p in self.workdir.glob("*.log"))
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{logs}")

    async def add_executor(
        self, service: Any, backend: str, slots: int, expect_online: int
    ) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            [
                "executor",
                "serve",
                "--broker",
                self.address,
                "--backend",
                backend,
                "--slots",
                str(slots),
            ],
            f"executor-{len(self.procs)}.log",
        )
        await self.wait_online(service, backend, expect_online)
        return proc

    async def wait_online(self, service: Any, backend: str, executors: int) -> None:
        from qrelay._proto.v1 import backends_pb2
        from qrelay.errors import NotFound

        conn = service.connection
        with anyio.fail_after(_START_TIMEOUT_S):
            while True:
                self._check_alive()
                try:
                    b = await conn.unary(
                        conn.backends.Get, backends_pb2.GetBackendRequest(name=backend)
                    )
                    if b.online_executors == executors:
                        return
                except NotFound:
                    pass
                await anyio.sleep(0.1)

    async def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                await anyio.to_thread.run_sync(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await anyio.to_thread.run_sync(proc.wait, 10)
        if proc in self.procs:
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        with anyio.CancelScope(shield=True):
            for proc in reversed(list(self.procs)):
                await self.stop(proc)


@asynccontextmanager
async def processes() -> AsyncIterator[Processes]:
    with tempfile.TemporaryDirectory(prefix="qrelay-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            yield procs
        finally:
            await procs.stop_all()


class RawClient:
    """A load generator over the generated stubs: events read, results never decoded.

    `rpc="stream"` sends every job on one JobService.RunStream (tags name
    them; a reader task hands each job its items); `rpc="run"` makes one
    JobService.Run call per job.
    """

    def __init__(self, address: str, rpc: str = "stream") -> None:
        import grpc

        from qrelay._proto.v1 import jobs_pb2_grpc

        if rpc not in ("stream", "run"):
            raise ValueError(f"rpc must be 'stream' or 'run', not {rpc!r}")
        self.rpc = rpc
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._seen_result: set[str] = set()
        self._write_lock = asyncio.Lock()
        self._tags = itertools.count()

    async def __aenter__(self) -> RawClient:
        if self.rpc == "stream":
            self._stream = self._stub.RunStream()
            self._reader = asyncio.create_task(self._read_stream())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._channel.close()

    async def run(self, spec: Any) -> None:
        if self.rpc == "run":
            await self._run_call(spec)
            return
        from qrelay._proto.v1 import jobs_pb2

        tag = str(next(self._tags))
        done = asyncio.get_running_loop().create_future()
        self._waiting[tag] = done
        try:
            async with self._write_lock:  # one write at a time on a gRPC stream
                await self._stream.write(
                    jobs_pb2.RunStreamRequest(tag=tag, submit=jobs_pb2.SubmitRequest(spec=spec))
                )
            async with asyncio.timeout(JOB_TIMEOUT_S):
                await done
        finally:
            self._waiting.pop(tag, None)
            self._seen_result.discard(tag)

    async def _read_stream(self) -> None:
        import grpc

        from qrelay._proto.v1 import types_pb2

        try:
            while (reply := await self._stream.read()) is not grpc.aio.EOF:
                for item in reply.items:
                    waiter = self._waiting.get(item.tag)
                    if waiter is None or waiter.done():
                        continue
                    if item.HasField("error"):
                        waiter.set_exception(RuntimeError(f"refused: {item.error.message}"))
                        continue
                    event = item.event
                    which = event.WhichOneof("payload")
                    if which == "result":
                        self._seen_result.add(item.tag)
                    elif which == "error":
                        waiter.set_exception(RuntimeError(f"job failed: {event.error.message}"))
                    elif which == "state" and event.state.state >= types_pb2.JOB_STATE_DONE:
                        if item.tag in self._seen_result:
                            waiter.set_result(None)
                        else:
                            waiter.set_exception(RuntimeError("job ended without a result"))
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(RuntimeError("RunStream ended"))

    async def _run_call(self, spec: Any) -> None:
        from qrelay._proto.v1 import jobs_pb2, types_pb2

        got_result = False
        call = self._stub.Run(jobs_pb2.SubmitRequest(spec=spec), timeout=JOB_TIMEOUT_S)
        async for event in call:
            which = event.WhichOneof("payload")
            if which == "result":
                got_result = True
            elif which == "error":
                raise RuntimeError(f"job {event.job_id} failed: {event.error.message}")
            elif which == "state" and event.state.state >= types_pb2.JOB_STATE_DONE:
                if not got_result:
                    raise RuntimeError(f"job {event.job_id} ended without a result")
                return
        raise RuntimeError("Run stream ended before the job did")
