"""The executor's link to the broker: one outbound stream, jobs run beside it.

An `Executor` opens `ExecutorService.Connect` (outbound, so it works behind
NAT), says Hello with its backends, slots and the leases it still holds, then
heartbeats at the broker's interval while it receives Assignment, CancelJob
and UpdateRejected messages. When the stream breaks it reconnects with
exponential backoff and full jitter, forever; jobs keep running meanwhile and
their updates wait in an outbox, so a broker restart costs no work.

Concurrency: `run()` owns one task group for jobs (they outlive a connection)
and, per connection, a task group for the reader, the sender and the
heartbeat. Every write to the stream goes through one lock, job updates
through one ordered outbox. Quantum work never runs in this process: each
primitive job (and each primitive call of a program) runs in a worker process
of the `WorkerPool`, so an hour-long simulation, a gigabyte result being
built or a malicious QPY cannot delay a heartbeat; this process only moves
bytes. Heartbeats prove the executor alive, not the job short: a job may run
up to its backend's `max_run_time_s`.

Stopping (cancelling `run()`) is graceful within SHUTDOWN_GRACE_S: results
already computed are sent, every other held job is Released so the broker
requeues it at once, and the stream is half-closed.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import grpc
import structlog
from prometheus_client import Counter, Gauge, start_http_server

import qrelay
from qrelay._proto.v1 import backends_pb2, executor_pb2, executor_pb2_grpc, types_pb2
from qrelay.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    QRelayError,
    ResourceExhausted,
    Unimplemented,
    exception_leaves,
)
from qrelay.executor import guards
from qrelay.executor.settings import ExecutorSettings
from qrelay.executor.workers import Progress, WorkerPool, WorkerPoolConfig
from qrelay.rpc import error_from_rpc

log = structlog.get_logger(__name__)

# Non-final updates (logs, interim values) kept while the broker is away;
# beyond this further ones are dropped so a chatty program cannot eat memory.
MAX_BUFFERED_UPDATES = 10_000
# A primitive job reports progress once it has run this long (and then at
# most once per heartbeat).
PROGRESS_AFTER_S = 1.0
# How long a shutting-down executor spends handing its jobs back to the broker.
SHUTDOWN_GRACE_S = 3.0
# How long leaving `running_executor` waits for the executor to stop (grace, sandbox kills).
STOP_WAIT_S = 30.0

SLOTS = Gauge("qrelay_executor_slots", "Jobs an executor runs at once.", ["executor_id"])
BUSY_SLOTS = Gauge("qrelay_executor_busy_slots", "Slots in use.", ["executor_id"])
CONNECTED = Gauge("qrelay_executor_connected", "1 while connected to a broker.", ["executor_id"])
JOBS_FINISHED = Counter(
    "qrelay_executor_jobs_finished", "Jobs finished, by outcome.", ["executor_id", "outcome"]
)
RECONNECTS = Counter("qrelay_executor_reconnects", "Broken broker streams.", ["executor_id"])


class StreamClosed(Exception):
    """The broker ended the stream (EOF or an error status); reconnect."""


@dataclass
class _Job:
    """One accepted assignment, from Assignment until its final update is written."""

    job_id: str
    lease_id: str
    attempt: int
    kind: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    # Set on CancelJob/UpdateRejected: the job's result is dropped, nothing more is sent.
    dropped: bool = False
    # True while the job holds a slot and runs.
    running: bool = False
    # When it started running (monotonic), and its latest progress report
    # (stage, done, total) with whether that report went out yet.
    started: float = 0.0
    progress: tuple[str, int, int] | None = None
    progress_sent: bool = True


@dataclass
class _Outgoing:
    job_id: str
    lease_id: str
    message: executor_pb2.ExecutorMessage
    final: bool


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, initial * 2**attempt)]."""
    ceiling = min(max_s, initial_s * (2 ** min(attempt, 30)))
    return random.uniform(0.0, ceiling)


class Executor:
    """One executor process's connection to the broker and its running jobs."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self._log = log.bind(executor_id=settings.executor_id)
        self._jobs: dict[str, _Job] = {}
        self._outbox: deque[_Outgoing] = deque()
        # asyncio primitives on the per-job path: anyio's look up the running
        # backend on every call, which showed in the executor's profile.
        self._outbox_wakeup = asyncio.Event()
        self._connected = anyio.Event()
        self._is_connected = False
        self._slots = anyio.Semaphore(settings.slots)
        self._write_lock = asyncio.Lock()
        # Where primitive work runs (created by run()).
        self._pool: WorkerPool | None = None
        self._busy_gauge = BUSY_SLOTS.labels(settings.executor_id)
        self._finished = {
            outcome: JOBS_FINISHED.labels(settings.executor_id, outcome)
            for outcome in ("succeeded", "failed", "dropped")
        }
        self._backend_infos: list[backends_pb2.BackendInfo] = []
        # job id -> pid of the worker process running it (primitive jobs).
        self._worker_pids: dict[str, int] = {}
        self._program_runner: Any = None
        self._programs_unavailable = ""
        self._job_tg: anyio.abc.TaskGroup | None = None
        self._max_update_bytes = 0
        self._peak_running = 0
        self._in_slots = 0
        self._heartbeat_interval_s = 1.0
        self._connections = 0
        self._stopping = anyio.Event()
        self._half_closed = False
        self.broker_id = ""
        # Broker replicas, tried in turn: a lost link fails over to the next.
        self._brokers = settings.broker_addresses
        self._broker_index = 0

    # -- properties for tests and the CLI ---------------------------------

    @property
    def broker(self) -> str:
        """The broker replica this executor talks to (or tries next)."""
        return self._brokers[self._broker_index]

    @property
    def connected(self) -> bool:
        """True between the broker's Welcome and the stream breaking."""
        return self._is_connected

    @property
    def running_jobs(self) -> list[str]:
        """Ids of jobs that currently run here and whose result is still wanted."""
        return [j.job_id for j in self._jobs.values() if j.running and not j.dropped]

    @property
    def busy_slots(self) -> int:
        """Slots in use (a cancelled job's slot frees once its worker is killed)."""
        return self._in_slots

    @property
    def held_leases(self) -> list[executor_pb2.HeldLease]:
        """Leases this executor still answers for (running or final update not yet sent)."""
        return [
            executor_pb2.HeldLease(job_id=j.job_id, lease_id=j.lease_id)
            for j in self._jobs.values()
            if not j.dropped
        ]

    @property
    def max_update_bytes(self) -> int:
        """The broker's limit on one update (from Welcome); 0 before the first Welcome."""
        return self._max_update_bytes

    @property
    def capabilities(self) -> list[str]:
        """Optional features announced in Hello: "program" once the sandbox runner started."""
        return ["program"] if self._program_runner is not None else []

    @property
    def peak_running(self) -> int:
        """Most jobs that ever ran at once (bounded by `slots`)."""
        return self._peak_running

    @property
    def job_worker_pids(self) -> dict[str, int]:
        """Worker process of each primitive job running now (tests kill them)."""
        return dict(self._worker_pids)

    @property
    def worker_pool(self) -> WorkerPool | None:
        """The worker processes, while `run()` runs."""
        return self._pool

    @property
    def connections(self) -> int:
        """How many times a Welcome was received (1 + successful reconnects)."""
        return self._connections

    async def wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109 - public API
        """Return once connected; DeadlineExceeded after `timeout` seconds."""
        with anyio.move_on_after(timeout):
            await self._connected.wait()
            return
        raise DeadlineExceeded(
            f"executor {self.settings.executor_id} not connected to {self.settings.broker} "
            f"after {timeout:g}s"
        )

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled: start the workers, then connect, and reconnect, forever."""
        async with WorkerPool(self._pool_config()) as pool:
            self._pool = pool
            self._backend_infos = list(pool.infos)
            await self._start_program_runner()
            self._log.info(
                "executor.started", backends=self.settings.backends, slots=self.settings.slots
            )
            try:
                await self._serve()
            finally:
                self._pool = None

    def _pool_config(self) -> WorkerPoolConfig:
        s = self.settings
        return WorkerPoolConfig(
            backends=list(s.backends),
            size=s.slots,
            backend_providers=list(s.backend_providers),
            optimization_level=s.optimization_level,
            transpile_cache_size=s.transpile_cache_size,
            memory_limit_bytes=s.worker_memory_bytes,
            max_message_bytes=s.max_message_bytes,
            start_timeout_s=s.worker_start_timeout_s,
            nice=s.worker_nice,
            executor_id=s.executor_id,
        )

    async def _serve(self) -> None:
        metrics_server = None
        if self.settings.metrics_port:
            metrics_server, _ = start_http_server(self.settings.metrics_port)
            self._log.info("metrics.serving", port=self.settings.metrics_port)
        SLOTS.labels(self.settings.executor_id).set(self.settings.slots)
        self._busy_gauge.set(0)
        async with anyio.create_task_group() as jobs:
            self._job_tg = jobs
            try:
                await self._serve_link()
            finally:
                self._job_tg = None
                jobs.cancel_scope.cancel()
                CONNECTED.labels(self.settings.executor_id).set(0)
                if metrics_server is not None:
                    metrics_server.shutdown()
                    metrics_server.server_close()
                await self._close_program_runner()

    async def _start_program_runner(self) -> None:
        """Start the program sandbox runner (warm pool) unless programs are switched off.

        A sandbox that cannot start leaves the executor serving primitives:
        logged as an error, "program" is not announced, and program jobs fail
        UNIMPLEMENTED with the reason.
        """
        if not self.settings.programs:
            self._programs_unavailable = "programs are switched off on this executor"
            return
        from qrelay.executor.programs.runner import ProgramRunner
        from qrelay.executor.programs.settings import SandboxSettings

        runner = ProgramRunner(
            SandboxSettings(**self.settings.sandbox), self._run_primitive_for_program
        )
        try:
            await runner.start()
        except (QRelayError, OSError) as exc:
            self._programs_unavailable = f"sandbox unavailable: {exc}"
            self._log.error("programs.unavailable", reason=str(exc))
            with anyio.CancelScope(shield=True):
                await runner.aclose()
            return
        self._program_runner = runner

    async def _close_program_runner(self) -> None:
        if self._program_runner is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._program_runner.aclose()

    async def _serve_link(self) -> None:
        """Keep the broker link up until cancelled; then stop gracefully within a grace period.

        The link runs shielded from the caller's cancellation, so that on
        shutdown the stream stays usable: queued results are sent, every other
        held job is Released (the broker requeues it at once instead of at
        lease expiry) and the stream is half-closed. After SHUTDOWN_GRACE_S it
        is cut regardless.
        """
        link_done = anyio.Event()
        link_scope = anyio.CancelScope(shield=True)

        async def link() -> None:
            try:
                with link_scope:
                    await self._connect_forever()
            finally:
                link_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(link, name=f"broker link {self.settings.executor_id}")
            try:
                await link_done.wait()
            finally:
                self._stopping.set()
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(SHUTDOWN_GRACE_S):
                        await link_done.wait()
                    link_scope.cancel()

    async def _connect_forever(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with anyio.create_task_group() as guard:
                    guard.start_soon(self._abort_unless_connected_on_stop, guard.cancel_scope)
                    await self._connect_once()
                    guard.cancel_scope.cancel()
            except Exception as exc:  # noqa: BLE001 - any broken link means: log, back off, reconnect
                if not self._stopping.is_set():
                    self._log.warning(
                        "connection.lost",
                        broker=self.broker,
                        reason=_reason(exc),
                        exc_info=exc if _unexpected(exc) else None,
                    )
            finally:
                if self._is_connected:
                    RECONNECTS.labels(self.settings.executor_id).inc()
                    CONNECTED.labels(self.settings.executor_id).set(0)
                    self._is_connected = False
                    self._connected = anyio.Event()
                    attempt = 0
                if len(self._brokers) > 1:
                    # Fail over: results finished meanwhile go out through the
                    # next replica (same store, same leases) instead of waiting
                    # for this one to come back.
                    self._broker_index = (self._broker_index + 1) % len(self._brokers)
            if self._stopping.is_set():
                return
            # The backoff grows once per round of replicas, not per replica.
            delay = backoff_delay(
                attempt // len(self._brokers),
                self.settings.reconnect_initial_s,
                self.settings.reconnect_max_s,
            )
            attempt += 1
            self._log.info("reconnect.scheduled", attempt=attempt, delay_s=round(delay, 3))
            with anyio.move_on_after(delay):
                await self._stopping.wait()

    async def _abort_unless_connected_on_stop(self, scope: anyio.CancelScope) -> None:
        """On shutdown, give up a connection attempt that has not been welcomed yet."""
        await self._stopping.wait()
        if not self._is_connected:
            scope.cancel()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = [("x-qrelay-executor-id", self.settings.executor_id)]
        if self.settings.token:
            md.append(("authorization", f"Bearer {self.settings.token}"))
        return tuple(md)

    async def _connect_once(self) -> None:
        options = [
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            # gRPC's own reconnect backoff (default 1 s growing to 120 s) follows ours.
            ("grpc.initial_reconnect_backoff_ms", int(self.settings.reconnect_initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self.settings.reconnect_initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.settings.reconnect_max_s * 1000)),
            # Notice a broker that vanished without closing the TCP connection.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        timeout = self.settings.connect_timeout_s
        broker = self.broker
        async with grpc.aio.insecure_channel(broker, options=options) as channel:
            try:
                with anyio.fail_after(timeout):
                    await channel.channel_ready()
            except TimeoutError:
                raise StreamClosed(f"could not reach {broker} within {timeout:g}s") from None
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            call = stub.Connect(metadata=self._metadata())
            try:
                await self._handshake(call)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._sender, call)
                    tg.start_soon(self._heartbeats, call)
                    tg.start_soon(self._hand_back_on_stop, call)
                    await self._reader(call)
                    tg.cancel_scope.cancel()
            finally:
                call.cancel()

    async def _hand_back_on_stop(self, call: Any) -> None:
        """On shutdown: flush the outbox, release every other held job, half-close.

        Released under a valid lease makes the broker requeue the job at once
        (the attempt is not counted), so another executor can take it without
        waiting for the lease to expire. The reader keeps running until the
        broker ends the stream.
        """
        await self._stopping.wait()
        with anyio.move_on_after(SHUTDOWN_GRACE_S / 2):
            while self._outbox:
                self._outbox_wakeup.set()
                await anyio.sleep(0.01)
        released = 0
        for job in list(self._jobs.values()):
            if job.dropped or self._has_pending(job):
                continue
            self._drop(job)
            await self._write(
                call,
                _update(
                    job.job_id,
                    job.lease_id,
                    released=executor_pb2.Released(reason="executor shutting down"),
                ),
            )
            self._jobs.pop(job.job_id, None)
            released += 1
        async with self._write_lock:
            self._half_closed = True
            await call.done_writing()
        self._log.info("executor.stopping", released=released, unsent=len(self._outbox))

    async def _handshake(self, call: Any) -> None:
        timeout = self.settings.connect_timeout_s
        held = self.held_leases
        hello = executor_pb2.Hello(
            executor_id=self.settings.executor_id,
            backends=self._backend_infos,
            slots=self.settings.slots,
            version=qrelay.__version__,
            capabilities=self.capabilities,
            held=held,
        )
        try:
            with anyio.fail_after(timeout):
                await call.write(executor_pb2.ExecutorMessage(hello=hello))
                reply = await call.read()
        except TimeoutError:
            raise StreamClosed(f"no Welcome from {self.broker} within {timeout:g}s") from None
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc)
            self._log.error("connection.refused", code=err.code_name, reason=err.message)
            raise StreamClosed(f"{err.code_name}: {err.message}") from None
        if reply is grpc.aio.EOF or reply.WhichOneof("message") != "welcome":
            raise StreamClosed("broker did not answer Hello with Welcome")
        welcome = reply.welcome
        self.broker_id = welcome.broker_id
        self._heartbeat_interval_s = max(welcome.heartbeat_interval_ms, 10) / 1000.0
        self._max_update_bytes = welcome.max_update_bytes
        self._half_closed = False
        self._is_connected = True
        self._connections += 1
        self._connected.set()
        CONNECTED.labels(self.settings.executor_id).set(1)
        self._outbox_wakeup.set()
        self._log.info(
            "executor.connected",
            broker=self.broker,
            broker_id=welcome.broker_id,
            held=len(held),
            heartbeat_interval_ms=welcome.heartbeat_interval_ms,
        )

    async def _write(self, call: Any, message: executor_pb2.ExecutorMessage) -> None:
        # A big result may take a while to stream: allow for 1 MB/s on top of the base deadline.
        deadline = self.settings.connect_timeout_s + message.ByteSize() / 1e6
        async with self._write_lock:
            if self._half_closed:
                raise StreamClosed("stream half-closed for shutdown")
            async with asyncio.timeout(deadline):
                await call.write(message)

    async def _heartbeats(self, call: Any) -> None:
        while True:
            leases = [j.lease_id for j in self._jobs.values() if not j.dropped]
            await self._write(
                call,
                executor_pb2.ExecutorMessage(heartbeat=executor_pb2.Heartbeat(lease_ids=leases)),
            )
            self._report_progress()
            await anyio.sleep(self._heartbeat_interval_s)

    def _report_progress(self) -> None:
        """Relay the latest progress of jobs running longer than PROGRESS_AFTER_S.

        Once per heartbeat at most, and never for short jobs: a tiny job's
        transpile/run reports would cost the broker three events more.
        """
        now = time.monotonic()
        for job in self._jobs.values():
            if (
                job.progress_sent
                or job.dropped
                or not job.running
                or job.progress is None
                or now - job.started < PROGRESS_AFTER_S
            ):
                continue
            stage, done, total = job.progress
            job.progress_sent = True
            report = types_pb2.Progress(stage=stage, done=done, total=total)
            message = _update(job.job_id, job.lease_id, progress=report)
            self._enqueue(_Outgoing(job.job_id, job.lease_id, message, final=False))

    async def _sender(self, call: Any) -> None:
        """Write the outbox in order; an item leaves the outbox only once written."""
        while True:
            self._outbox_wakeup = asyncio.Event()
            while self._outbox:
                item = self._outbox[0]
                job = self._jobs.get(item.job_id)
                if (
                    job is None
                    or job.lease_id != item.lease_id
                    or (job.dropped and not _is_released(item))
                ):
                    self._outbox.popleft()
                    continue
                message = self._fit(item)
                if message is not None:
                    await self._write(call, message)
                self._outbox.popleft()
                if item.final and self._jobs.get(item.job_id) is job:
                    del self._jobs[item.job_id]
            await self._outbox_wakeup.wait()

    def _fit(self, item: _Outgoing) -> executor_pb2.ExecutorMessage | None:
        """The message, or a RESOURCE_EXHAUSTED error for a final result over the broker's limit."""
        limit = self._max_update_bytes
        size = item.message.ByteSize()
        if limit <= 0 or size <= limit:
            return item.message
        self._log.warning("update.too_large", job_id=item.job_id, bytes=size, limit=limit)
        if not item.final:
            return None
        return _update(
            item.job_id,
            item.lease_id,
            error=types_pb2.JobError(
                code=ResourceExhausted.code,
                message=f"the job result is {size} bytes, over the broker limit of {limit} bytes",
            ),
        )

    def _enqueue(self, item: _Outgoing) -> None:
        if not item.final and len(self._outbox) >= MAX_BUFFERED_UPDATES:
            buffered = sum(1 for o in self._outbox if not o.final)
            if buffered >= MAX_BUFFERED_UPDATES:
                self._log.warning("update.dropped", job_id=item.job_id, reason="outbox full")
                return
        self._outbox.append(item)
        self._outbox_wakeup.set()

    async def _reader(self, call: Any) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise StreamClosed("broker closed the stream")
            kind = message.WhichOneof("message")
            if kind == "assignment":
                self._on_assignment(message.assignment)
            elif kind == "cancel":
                self._on_cancel(message.cancel)
            elif kind == "rejected":
                self._on_rejected(message.rejected)
            else:
                self._log.warning("message.ignored", kind=kind)

    # -- jobs ----------------------------------------------------------------

    def _on_assignment(self, assignment: executor_pb2.Assignment) -> None:
        job_id = assignment.job_id
        if self._stopping.is_set():
            self._log.info("job.refused", job_id=job_id, reason="executor shutting down")
            if not self._half_closed:
                released = executor_pb2.Released(reason="executor shutting down")
                job = _Job(job_id, assignment.lease_id, assignment.attempt, "primitive")
                job.dropped = True
                self._jobs.setdefault(job_id, job)
                self._enqueue(
                    _Outgoing(
                        job_id,
                        assignment.lease_id,
                        _update(job_id, assignment.lease_id, released=released),
                        final=True,
                    )
                )
            return
        existing = self._jobs.get(job_id)
        if existing is not None and existing.lease_id == assignment.lease_id:
            return  # a repeated assignment of a job already running here
        if existing is not None:
            # A new lease supersedes the old one: the old run's result is stale.
            self._drop(existing)
        is_program = assignment.spec.WhichOneof("work") == "program" or bool(assignment.program.id)
        kind = "program" if is_program else "primitive"
        job = _Job(
            job_id=job_id, lease_id=assignment.lease_id, attempt=assignment.attempt, kind=kind
        )
        self._jobs[job_id] = job
        assert self._job_tg is not None
        self._job_tg.start_soon(self._run_job, job, assignment, name=f"job {job_id}")
        self._log.info(
            "job.assigned",
            job_id=job_id,
            lease_id=job.lease_id,
            attempt=job.attempt,
            tenant=assignment.tenant,
            backend=assignment.spec.backend,
            kind=kind,
        )

    def _on_cancel(self, cancel: executor_pb2.CancelJob) -> None:
        job = self._jobs.get(cancel.job_id)
        if job is None or job.dropped or (cancel.lease_id and cancel.lease_id != job.lease_id):
            # Unknown, superseded or already released: nothing runs for this lease any more.
            self._log.debug("cancel.ignored", job_id=cancel.job_id, lease_id=cancel.lease_id)
            return
        self._drop(job)
        reason = cancel.reason or "cancelled"
        self._enqueue(
            _Outgoing(
                job.job_id,
                job.lease_id,
                _update(job.job_id, job.lease_id, released=executor_pb2.Released(reason=reason)),
                final=True,
            )
        )
        self._log.info("job.released", job_id=job.job_id, lease_id=job.lease_id, reason=reason)

    def _on_rejected(self, rejected: executor_pb2.UpdateRejected) -> None:
        job = self._jobs.get(rejected.job_id)
        self._log.warning(
            "update.rejected",
            job_id=rejected.job_id,
            lease_id=rejected.lease_id,
            code=rejected.code,
            reason=rejected.message,
        )
        if job is not None and (not rejected.lease_id or rejected.lease_id == job.lease_id):
            self._drop(job)
            if not job.running:
                self._jobs.pop(job.job_id, None)

    def _drop(self, job: _Job) -> None:
        """Stop a job and forget its result: its task is cancelled, which kills its
        worker process (primitive) or sandbox (program) at once."""
        job.dropped = True
        job.scope.cancel()

    async def _run_job(self, job: _Job, assignment: executor_pb2.Assignment) -> None:
        jlog = self._log.bind(job_id=job.job_id, lease_id=job.lease_id)
        try:
            async with self._slots:
                if job.dropped:
                    return
                job.running = True
                job.started = time.monotonic()
                self._in_slots += 1
                self._busy_gauge.set(self._in_slots)
                self._peak_running = max(self._peak_running, self._in_slots)
                try:
                    started = time.perf_counter()
                    outcome: types_pb2.JobResult | types_pb2.JobError | None = None
                    with job.scope:
                        outcome = await self._execute(job, assignment, jlog)
                finally:
                    self._in_slots -= 1
                    self._busy_gauge.set(self._in_slots)
                    job.running = False
                if job.dropped or outcome is None:
                    self._finished["dropped"].inc()
                    jlog.info("job.dropped")
                    return
                if isinstance(outcome, types_pb2.JobResult):
                    message = _update(job.job_id, job.lease_id, result=outcome)
                    jlog.info("job.succeeded", seconds=round(time.perf_counter() - started, 3))
                    self._finished["succeeded"].inc()
                else:
                    message = _update(job.job_id, job.lease_id, error=outcome)
                    jlog.info("job.failed", code=outcome.code, reason=outcome.message)
                    self._finished["failed"].inc()
                self._enqueue(_Outgoing(job.job_id, job.lease_id, message, final=True))
        finally:
            if job.dropped and self._jobs.get(job.job_id) is job and not self._has_pending(job):
                del self._jobs[job.job_id]

    def _has_pending(self, job: _Job) -> bool:
        return any(o.job_id == job.job_id and o.lease_id == job.lease_id for o in self._outbox)

    async def _execute(
        self, job: _Job, assignment: executor_pb2.Assignment, jlog: Any
    ) -> types_pb2.JobResult | types_pb2.JobError:
        """Run the job; any failure becomes a JobError (never executor internals)."""
        try:
            if job.kind == "program":
                return await self._execute_program(job, assignment)
            return await self._execute_primitive(job, assignment.spec)
        except _JobFailed as exc:
            return exc.error
        except QRelayError as exc:
            return types_pb2.JobError(code=exc.code, message=exc.message)
        except Exception as exc:  # noqa: BLE001 - reported as INTERNAL, traceback stays here
            incident = uuid.uuid4().hex[:12]
            jlog.error("job.crashed", incident=incident, exc_info=exc)
            return types_pb2.JobError(
                code=Internal.code, message=f"internal error on the executor (incident {incident})"
            )

    async def _execute_primitive(self, job: _Job, spec: types_pb2.JobSpec) -> types_pb2.JobResult:
        def progress(stage: str, done: int, total: int) -> None:
            job.progress = (stage, done, total)
            job.progress_sent = False

        def on_worker(pid: int) -> None:
            self._worker_pids[job.job_id] = pid

        try:
            return await self._run_spec(spec, progress, on_worker)
        finally:
            self._worker_pids.pop(job.job_id, None)

    async def _run_spec(
        self,
        spec: types_pb2.JobSpec,
        progress: Progress | None = None,
        on_worker: Callable[[int], None] | None = None,
    ) -> types_pb2.JobResult:
        """Run one primitive spec in a worker process; refusals before any work."""
        info = next((b for b in self._backend_infos if b.name == spec.backend), None)
        if info is None:
            raise InvalidArgument(
                f"backend {spec.backend!r} is not served by executor "
                f"{self.settings.executor_id} (it serves {', '.join(self.settings.backends)})"
            )
        if self._pool is None:
            raise Internal(f"executor {self.settings.executor_id} is not running")
        for i, circuit in enumerate(guards.spec_circuits(spec)):
            guards.check_circuit(
                circuit, spec.backend, info.num_qubits, info.simulator, f"pub {i}: circuit"
            )
            if i % 16 == 15:  # a job of thousands of pubs must not hold the loop
                await anyio.lowlevel.checkpoint()
        outcome = await self._pool.run(
            spec,
            max_run_time_s=self.settings.max_run_time_for(spec.backend),
            progress=progress,
            on_worker=on_worker,
        )
        if isinstance(outcome, types_pb2.JobError):
            raise _JobFailed(outcome)
        return outcome

    async def _run_primitive_for_program(self, spec: types_pb2.JobSpec) -> types_pb2.JobResult:
        """A running program's primitive call: the same guards and worker processes.

        It runs in the program job's task, so cancelling the job kills the
        worker as well as the sandbox.
        """
        return await self._run_spec(spec)

    async def _execute_program(
        self, job: _Job, assignment: executor_pb2.Assignment
    ) -> types_pb2.JobResult:
        if self._program_runner is None:
            why = f" ({self._programs_unavailable})" if self._programs_unavailable else ""
            raise _JobFailed(
                types_pb2.JobError(
                    code=Unimplemented.code, message=f"this executor does not run programs{why}"
                )
            )
        from qrelay.executor.programs.runner import ProgramFailed

        spec = assignment.spec
        info = next((b for b in self._backend_infos if b.name == spec.backend), None)
        if info is None:
            raise InvalidArgument(
                f"backend {spec.backend!r} is not served by executor "
                f"{self.settings.executor_id} (it serves {', '.join(self.settings.backends)})"
            )
        if not assignment.program.id:
            raise InvalidArgument(f"program job {job.job_id} arrived without its program bundle")

        async def emit(item: types_pb2.Interim | types_pb2.LogLine) -> None:
            if job.dropped:
                return
            if isinstance(item, types_pb2.Interim):
                message = _update(job.job_id, job.lease_id, interim=item)
            else:
                message = _update(job.job_id, job.lease_id, log=item)
            self._enqueue(_Outgoing(job.job_id, job.lease_id, message, final=False))

        try:
            result: types_pb2.JobResult = await self._program_runner.run(
                job.job_id, assignment.program, spec.program.inputs_json, info, emit
            )
            return result
        except ProgramFailed as exc:
            raise _JobFailed(exc.job_error) from None


class _JobFailed(QRelayError):
    """Carries a ready JobError out of the execution path."""

    def __init__(self, error: types_pb2.JobError) -> None:
        super().__init__(error.message)
        self.error = error
        self.code = error.code  # type: ignore[misc]


def _reason(exc: BaseException) -> str:
    """A one-line reason for a broken connection (task groups wrap errors in groups)."""
    parts = []
    for leaf in exception_leaves(exc):
        if isinstance(leaf, grpc.aio.AioRpcError):
            parts.append(f"{leaf.code().name}: {leaf.details()}")
        else:
            parts.append(str(leaf) or type(leaf).__name__)
    return "; ".join(parts)


def _unexpected(exc: BaseException) -> bool:
    """True unless a failure is a plain network/stream event (then no traceback is logged)."""
    expected = (StreamClosed, grpc.aio.AioRpcError, TimeoutError, OSError)
    return not all(isinstance(leaf, expected) for leaf in exception_leaves(exc))


def _is_released(item: _Outgoing) -> bool:
    return item.message.update.WhichOneof("update") == "released"


def _update(job_id: str, lease_id: str, **payload: Any) -> executor_pb2.ExecutorMessage:
    return executor_pb2.ExecutorMessage(
        update=executor_pb2.JobUpdate(job_id=job_id, lease_id=lease_id, **payload)
    )


@asynccontextmanager
async def running_executor(
    settings: ExecutorSettings, *, connect_timeout: float = 60.0
) -> AsyncIterator[Executor]:
    """Run an executor until the block exits; yields once it is connected.

    The executor runs in a task this context manager owns: cancelled and
    awaited on exit. (Not a task group around the `yield`, so the block may be
    entered and left from different tasks, as pytest-asyncio fixtures and
    AsyncExitStacks do.) A failure before connecting (e.g. an unknown backend)
    is raised here; DeadlineExceeded when not connected within `connect_timeout`.
    """
    executor = Executor(settings)
    task = asyncio.create_task(executor.run(), name=f"executor {settings.executor_id}")
    try:
        connected = asyncio.create_task(executor.wait_connected(connect_timeout))
        try:
            await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connected.done():
                connected.cancel()
        if task.done():
            task.result()  # raises why run() stopped
            raise Internal(f"executor {settings.executor_id} stopped before connecting")
        connected.result()
        yield executor
    finally:
        task.cancel()
        # Waited for shielded: a caller being cancelled (Ctrl-C under `qrelay
        # dev`) would otherwise cancel the executor's task again at every loop
        # turn, through its shielded clean-up, leaving sandboxes unreaped and
        # "Event loop is closed" from their transports at exit. The executor's
        # own stop is bounded (link grace, sandbox kill deadlines).
        with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_WAIT_S):
            await asyncio.wait({task})
        if not task.done():
            log.warning("executor.stop_abandoned", executor_id=settings.executor_id)
        elif not task.cancelled() and (error := task.exception()) is not None:
            raise error
