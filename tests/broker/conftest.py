"""Broker test fixtures: real stores, a real in-process broker, and a fake executor
that is a real peer speaking the ExecutorService protocol with raw stubs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from qrelay._proto.v1 import (
    backends_pb2,
    executor_pb2,
    executor_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    types_pb2,
)
from qrelay.broker.server import Broker, running_broker
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import JobStore
from qrelay.broker.store.postgres import PostgresJobStore
from qrelay.broker.store.sqlite import SQLiteJobStore

BELL = (
    'OPENQASM 3.0;\ninclude "stdgates.inc";\nbit[2] c;\nqubit[2] q;\n'
    "h q[0];\ncx q[0], q[1];\nc = measure q;\n"
)
# Short leases so expiry tests finish quickly; heartbeats well inside them.
FAST = {"lease_ttl_s": 1.0, "heartbeat_interval_s": 0.2, "shutdown_grace_s": 1.0}


DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_dsn() -> str | None:
    """The test database: QRELAY_TEST_POSTGRES_DSN, else a local server if one answers."""
    dsn = os.environ.get("QRELAY_TEST_POSTGRES_DSN")
    if dsn:
        return dsn
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return DEFAULT_POSTGRES_DSN
    except OSError:
        return None


def require_postgres() -> str:
    dsn = postgres_dsn()
    if dsn is None:
        pytest.skip(
            "no PostgreSQL: QRELAY_TEST_POSTGRES_DSN is unset and nothing answers on "
            "127.0.0.1:5432 (.ci/run starts one)"
        )
    return dsn


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[tuple[str, str]]:
    """A fresh schema (dropped afterwards) in the test database: (dsn, schema).

    Each test gets its own schema and NOTIFY channel, so tests stay isolated
    and can run side by side in one database.
    """
    import asyncpg

    dsn = require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield dsn, schema
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """Every JobStore implementation: SQLite in tmp_path, PostgreSQL in a fresh schema."""
    async with contextlib.AsyncExitStack() as stack:
        impl: JobStore
        if request.param == "sqlite":
            impl = SQLiteJobStore(tmp_path / "nested" / "dir" / "broker.db")
        else:
            dsn, schema = await stack.enter_async_context(postgres_schema())
            impl = PostgresJobStore(dsn, schema=schema)
        await impl.open()
        try:
            yield impl
        finally:
            await impl.close()


def broker_settings(tmp_path: Path, **overrides: Any) -> BrokerSettings:
    return BrokerSettings(
        **{"listen": "127.0.0.1:0", "db_path": tmp_path / "broker.db", **FAST, **overrides}
    )


async def announce(address: str, backends: Sequence[str] = ("aer", "fake_manila")) -> None:
    """Let an executor announce these backends once and leave (they stay known, offline)."""
    async with FakeExecutor(address, executor_id="e-announcer", backends=backends, heartbeat=False):
        pass


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A running broker on which 'aer' and 'fake_manila' were announced (now offline)."""
    async with running_broker(broker_settings(tmp_path)) as running:
        await announce(running.address)
        yield running


@pytest.fixture
async def channel(broker: Broker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(broker.address) as chan:
        yield chan


@pytest.fixture
def jobs(channel: grpc.aio.Channel) -> jobs_pb2_grpc.JobServiceStub:
    return jobs_pb2_grpc.JobServiceStub(channel)


def auth(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying `token` as a bearer token."""
    return (("authorization", f"Bearer {token}"),)


def sampler_spec(backend: str = "aer", shots: int = 100, **kwargs: Any) -> types_pb2.JobSpec:
    task = types_pb2.SamplerTask(pubs=[types_pb2.SamplerPub(circuit=types_pb2.Circuit(qasm3=BELL))])
    task.shots = shots
    return types_pb2.JobSpec(backend=backend, sampler=task, **kwargs)


def result_for(job_id: str) -> types_pb2.JobResult:
    return types_pb2.JobResult(program_json=f'{{"job": "{job_id}"}}')


class FakeExecutor:
    """A real ExecutorService peer driven by the test, message by message."""

    def __init__(
        self,
        address: str,
        executor_id: str = "e-1",
        backends: Sequence[str] = ("aer",),
        slots: int = 1,
        held: Sequence[tuple[str, str]] = (),
        heartbeat: bool = True,
        extend: bool = True,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.address = address
        self.executor_id = executor_id
        self.backends = backends
        self.slots = slots
        self.held = list(held)
        self.heartbeat = heartbeat
        self.extend = extend  # False: heartbeat (stay connected) without extending leases
        self.metadata = tuple(metadata)
        self.leases: dict[str, str] = dict(held)  # job_id -> lease_id, what we'd heartbeat
        self.inbox: asyncio.Queue[executor_pb2.BrokerMessage | None] = asyncio.Queue()
        self._outbox: asyncio.Queue[executor_pb2.ExecutorMessage | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.welcome: executor_pb2.Welcome | None = None

    async def _requests(self) -> AsyncIterator[executor_pb2.ExecutorMessage]:
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            yield message

    async def __aenter__(self) -> FakeExecutor:
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = executor_pb2_grpc.ExecutorServiceStub(self._channel)
        self.call = stub.Connect(self._requests(), metadata=self.metadata)
        hello = executor_pb2.Hello(
            executor_id=self.executor_id,
            backends=[
                backends_pb2.BackendInfo(name=b, num_qubits=5, simulator=True)
                for b in self.backends
            ],
            slots=self.slots,
            version="test",
            held=[executor_pb2.HeldLease(job_id=j, lease_id=lease) for j, lease in self.held],
        )
        self.send(executor_pb2.ExecutorMessage(hello=hello))
        first = await asyncio.wait_for(self.call.read(), 5)
        assert first.WhichOneof("message") == "welcome", first
        self.welcome = first.welcome
        self._tasks.append(asyncio.create_task(self._read()))
        if self.heartbeat:
            self._tasks.append(asyncio.create_task(self._beat()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        self._tasks.clear()
        self.call.cancel()
        await self._channel.close()

    def stop_heartbeats(self) -> None:
        for task in self._tasks[1:]:
            task.cancel()

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                if message.WhichOneof("message") == "assignment":
                    self.leases[message.assignment.job_id] = message.assignment.lease_id
                self.inbox.put_nowait(message)
        finally:
            self.inbox.put_nowait(None)

    async def _beat(self) -> None:
        assert self.welcome is not None
        while True:
            await asyncio.sleep(self.welcome.heartbeat_interval_ms / 1000)
            self.send(
                executor_pb2.ExecutorMessage(
                    heartbeat=executor_pb2.Heartbeat(
                        lease_ids=list(self.leases.values()) if self.extend else []
                    )
                )
            )

    def send(self, message: executor_pb2.ExecutorMessage) -> None:
        self._outbox.put_nowait(message)

    async def recv(self, kind: str, within: float = 5.0) -> Any:
        """The next message of this kind (others before it are dropped)."""
        async with asyncio.timeout(within):
            while True:
                message = await self.inbox.get()
                if message is None:
                    raise EOFError("broker closed the stream")
                if message.WhichOneof("message") == kind:
                    return getattr(message, kind)

    async def ended(self, within: float = 5.0) -> None:
        """Wait until the broker closes the stream."""
        async with asyncio.timeout(within):
            while (await self.inbox.get()) is not None:
                pass

    def update(self, job_id: str, lease_id: str, **payload: Any) -> None:
        self.send(
            executor_pb2.ExecutorMessage(
                update=executor_pb2.JobUpdate(job_id=job_id, lease_id=lease_id, **payload)
            )
        )

    def finish(self, assignment: executor_pb2.Assignment) -> None:
        self.leases.pop(assignment.job_id, None)
        self.update(assignment.job_id, assignment.lease_id, result=result_for(assignment.job_id))


async def watch_all(
    stub: jobs_pb2_grpc.JobServiceStub, job_id: str, after_seq: int = 0, **kw: Any
) -> list[types_pb2.JobEvent]:
    call = stub.Watch(jobs_pb2.WatchRequest(job_id=job_id, after_seq=after_seq), timeout=10, **kw)
    return [event async for event in call]


async def wait_state(
    stub: jobs_pb2_grpc.JobServiceStub, job_id: str, state: int, within: float = 10.0
) -> jobs_pb2.Job:
    async with asyncio.timeout(within):
        while True:
            job = await stub.Get(jobs_pb2.GetJobRequest(job_id=job_id))
            if job.state == state:
                return job
            await asyncio.sleep(0.02)


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until predicate() holds (checked every 20 ms)."""
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)
