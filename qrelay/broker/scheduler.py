"""Matching queued jobs to connected executors' free slots.

One dispatcher task wakes when something can change the match (a submit, a
freed slot, an executor connecting, a lease expiring) and claims, per
executor with free slots, the oldest queued jobs of the backends it serves.
No job is polled for. The in-memory registry counts slots; the store decides
who holds which job (leases), so a lost registry costs nothing but time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from qrelay._proto.v1 import backends_pb2, executor_pb2, types_pb2
from qrelay.broker.events import EventHub, timestamp
from qrelay.broker.metrics import BrokerMetrics
from qrelay.broker.quotas import QuotaSource, SettingsQuotas
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import BackendRecord, JobKind, JobRecord, JobStore, LeaseGrant, UpdateKind
from qrelay.errors import FailedPrecondition, InvalidArgument, QRelayError

log = structlog.get_logger(__name__)

T = TypeVar("T")
# Executors without the "program" capability (no sandbox) only get primitive jobs.
PRIMITIVE_KINDS = (JobKind.SAMPLER, JobKind.ESTIMATOR)
# How stale `Scheduler.usable()` may be for Submit and session creation (a
# backend a restricted executor just announced may stay usable to others that
# long; their jobs would only wait). BackendService reads it fresh.
ACCESS_MAX_AGE_S = 1.0
STALE_LEASE = "lease is no longer valid (expired, cancelled or finished)"
# Resolves a program job's bundle at assignment time (`Programs.bundle`).
ProgramResolver = Callable[[types_pb2.JobSpec, str], Awaitable[executor_pb2.ProgramBundle | None]]


class RemoteExecutors:
    """Executors connected to sibling broker replicas (a store replicas share).

    The replica fan-out keeps `backends` as the presence table has it; the
    scheduler counts them as online and sets `changed` whenever its own
    executors come or go, so the fan-out publishes them.
    """

    def __init__(self) -> None:
        self.backends: dict[str, tuple[str, ...]] = {}  # executor_id -> backends
        self.changed = asyncio.Event()


@dataclass(eq=False)
class ExecutorLink:
    """One connected executor stream, as the scheduler sees it."""

    executor_id: str
    backends: tuple[str, ...]
    slots: int
    capabilities: frozenset[str]
    inflight: dict[str, str] = field(default_factory=dict)  # lease_id -> job_id
    outbox: asyncio.Queue[executor_pb2.BrokerMessage | None] = field(default_factory=asyncio.Queue)
    closed: bool = False
    # Queue generation at which a claim for this executor last came back short:
    # until something is queued again for its backends, claiming is pointless.
    idle_generation: int = -1
    # Set when the executor hands a job back under a still-valid lease (it is
    # stopping): it gets nothing more until it reconnects.
    draining: bool = False
    # Its token restricts it to these tenants' jobs (None: any tenant).
    tenants: tuple[str, ...] | None = None

    @property
    def free(self) -> int:
        if self.closed or self.draining:
            return 0
        return max(self.slots - len(self.inflight), 0)

    def send(self, message: executor_pb2.BrokerMessage) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)

    def cancel(self, job_id: str, lease_id: str, reason: str = STALE_LEASE) -> None:
        """Tell the executor to stop a run."""
        self.send(
            executor_pb2.BrokerMessage(
                cancel=executor_pb2.CancelJob(job_id=job_id, lease_id=lease_id, reason=reason)
            )
        )

    def close(self) -> None:
        """Ask the stream handler to end (replaced by a newer stream, or shutdown)."""
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)


class Scheduler:
    """Registry of executors plus the dispatcher that hands out leases."""

    def __init__(
        self,
        store: JobStore,
        hub: EventHub,
        settings: BrokerSettings,
        metrics: BrokerMetrics,
        *,
        program_resolver: ProgramResolver | None = None,
        remote: RemoteExecutors | None = None,
        quotas: QuotaSource | None = None,
    ) -> None:
        self.store = store
        self.quotas = quotas or SettingsQuotas(settings)
        # Runs ended here: with running quotas, an end may let a held-back
        # tenant's queued jobs start, so it counts as news for idle executors.
        self._runs_ended = 0
        self.hub = hub
        self.settings = settings
        self.metrics = metrics
        self.executors: dict[str, ExecutorLink] = {}
        self.closing = False
        self.known_backends: set[str] = set()
        self.program_resolver = program_resolver
        # With broker replicas: executors connected to the others.
        self.remote = remote
        self._wake = asyncio.Event()
        self._steps: set[asyncio.Task[Any]] = set()
        # How often a job was queued per (backend, is_program). An executor whose
        # claim came back short is skipped until the sum over what it serves
        # changes, so idle executors cost no store round trip per wake. (Per
        # executor, not per backend: with sessions pinned to one executor, a
        # short claim by another says nothing about what the pinned one may take.)
        self._queued_generations: dict[tuple[str, bool], int] = {}
        # `usable()`'s copy of the store's backend access table, and when read.
        self._access: dict[str, frozenset[str] | None] | None = None
        self._access_at = 0.0

    async def usable(
        self, tenant: str | None, *, max_age_s: float = ACCESS_MAX_AGE_S
    ) -> Callable[[str], bool]:
        """Whether `tenant` (None: anyone) may use a backend: not when every
        executor that announced it is restricted to other tenants. The access
        table is read at most every `max_age_s` (0: now)."""
        if tenant is None:
            return lambda name: True
        now = time.monotonic()
        if self._access is None or now - self._access_at >= max_age_s:
            self._access = await self.store.backend_access()
            self._access_at = now
        access = self._access

        def usable(name: str) -> bool:
            allowed = access.get(name)
            return name not in access or allowed is None or tenant in allowed

        return usable

    async def load(self) -> None:
        """Remember every backend ever announced (submit checks names against it)."""
        self.known_backends = {b.name for b in await self.store.list_backends()}

    def wake(self) -> None:
        self._wake.set()

    def rescan(self) -> None:
        """Let every executor claim once more, whatever was heard (replica sync tick:
        a queued-job hint from another replica may have been lost)."""
        for link in self.executors.values():
            link.idle_generation = -1
        self._wake.set()

    async def shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a commit-then-react step to its end even if the caller is cancelled.

        A client may vanish after the store committed but before the events
        were published or the executor told (a Watch would then wait forever,
        a queued job would not be placed). The step runs in a task the
        scheduler owns; `drain()` waits for stragglers at shutdown.
        """
        task = asyncio.get_running_loop().create_task(coro)
        self._steps.add(task)
        task.add_done_callback(self._step_done)
        return await asyncio.shield(task)

    def _step_done(self, task: asyncio.Task[Any]) -> None:
        self._steps.discard(task)
        # Retrieved here so that an error nobody awaited any more is logged once,
        # not reported by asyncio as "never retrieved".
        if (
            not task.cancelled()
            and (exc := task.exception()) is not None
            and not isinstance(exc, QRelayError)
        ):
            log.error("step.failed", exc_info=exc)

    async def drain(self) -> None:
        """Wait for shielded steps still running (shutdown, before the store closes)."""
        if self._steps:
            await asyncio.gather(*self._steps, return_exceptions=True)

    def queued(self, backend: str, kind: JobKind) -> None:
        """A job for this backend was queued (submitted, requeued or unpinned): try to place it."""
        key = (backend, kind is JobKind.PROGRAM)
        self._queued_generations[key] = self._queued_generations.get(key, 0) + 1
        self._wake.set()

    # --- executors ------------------------------------------------------------
    async def attach(
        self, hello: executor_pb2.Hello, *, tenants: tuple[str, ...] | None = None
    ) -> tuple[ExecutorLink, list[tuple[str, str]]]:
        """Register an executor after its Hello; returns its link and the held
        leases it must cancel (already queued as CancelJob on the link).

        `tenants` (from its token) restricts it to those tenants' jobs, and
        its backends to those tenants' view."""
        if not hello.executor_id:
            raise InvalidArgument("Hello.executor_id is required")
        if hello.slots <= 0:
            raise InvalidArgument(f"Hello.slots must be > 0, got {hello.slots}")
        if not hello.backends:
            raise InvalidArgument("Hello.backends must name at least one backend")
        names = [b.name for b in hello.backends]
        if any(not n for n in names):
            raise InvalidArgument("every BackendInfo in Hello needs a name")
        now = time.time()
        await self.store.upsert_backends(
            [BackendRecord(b.name, b.SerializeToString(), now) for b in hello.backends]
        )
        await self.store.set_backend_access(hello.executor_id, names, tenants)
        self._access = None
        self.known_backends.update(names)
        held = [(h.job_id, h.lease_id) for h in hello.held]
        check = await self.store.check_held(hello.executor_id, held, self.settings.lease_ttl_s)
        link = ExecutorLink(
            executor_id=hello.executor_id,
            backends=tuple(dict.fromkeys(names)),
            slots=hello.slots,
            capabilities=frozenset(hello.capabilities),
            inflight={lease: job for job, lease in check.valid},
            tenants=tenants,
        )
        old = self.executors.get(hello.executor_id)
        if old is not None:
            old.close()
        self.executors[hello.executor_id] = link
        for job_id, lease_id in check.invalid:
            link.cancel(job_id, lease_id)
        log.info(
            "executor.connected",
            executor_id=hello.executor_id,
            backends=list(link.backends),
            slots=link.slots,
            kept=len(check.valid),
            cancelled=len(check.invalid),
        )
        self._gauge()
        self._executors_changed()
        self.wake()
        return link, check.invalid

    async def detach(self, link: ExecutorLink) -> None:
        link.close()
        if self.executors.get(link.executor_id) is link:
            del self.executors[link.executor_id]
        if not self.closing:  # at shutdown, close_all() has recorded last_seen already
            await self.store.touch_backends(list(link.backends), time.time())
        log.info("executor.disconnected", executor_id=link.executor_id, inflight=len(link.inflight))
        self._gauge()
        self._executors_changed()

    def _executors_changed(self) -> None:
        if self.remote is not None:
            self.remote.changed.set()

    async def close_all(self) -> None:
        """Shutdown: record when each backend was last seen, then end every stream.

        Stream handlers may finish after the store has closed, so `detach`
        skips its store write from here on.
        """
        self.closing = True
        links = list(self.executors.values())
        backends = sorted({b for link in links for b in link.backends})
        if backends:
            await self.store.touch_backends(backends, time.time())
        for link in links:
            link.close()

    def online_executors(self, backend: str) -> int:
        """Executors serving this backend, here and (with replicas) on the others."""
        online = {eid for eid, link in self.executors.items() if backend in link.backends}
        if self.remote is not None:
            online.update(eid for eid, bs in self.remote.backends.items() if backend in bs)
        return len(online)

    def executor_online(self, executor_id: str) -> bool:
        """Whether this executor is connected here or (with replicas) to another broker."""
        if executor_id in self.executors:
            return True
        return self.remote is not None and executor_id in self.remote.backends

    def send_cancel(self, executor_id: str, job_id: str, lease_id: str, reason: str) -> None:
        link = self.executors.get(executor_id)
        if link is not None and lease_id in link.inflight:
            link.cancel(job_id, lease_id, reason)

    # --- stream traffic --------------------------------------------------------
    async def heartbeat(self, link: ExecutorLink, lease_ids: list[str]) -> None:
        extended = await self.store.extend_leases(lease_ids, self.settings.lease_ttl_s)
        for lease_id in lease_ids:
            if lease_id not in extended and lease_id in link.inflight:
                link.cancel(link.inflight[lease_id], lease_id)

    async def update(self, link: ExecutorLink, update: executor_pb2.JobUpdate) -> None:
        which = update.WhichOneof("update")
        if which is None:
            link.send(self._rejected(update, InvalidArgument.code, "JobUpdate carries no update"))
            return
        kind = UpdateKind(which)
        payload = getattr(update, which).SerializeToString()
        outcome = await self.store.apply_update(update.job_id, update.lease_id, kind, payload)
        if kind.final and link.inflight.pop(update.lease_id, None) is not None:
            self._runs_ended += 1
            self._gauge()
            self.wake()
        if not outcome.accepted:
            log.info(
                "update.rejected",
                executor_id=link.executor_id,
                job_id=update.job_id,
                lease_id=update.lease_id,
                reason=outcome.message,
            )
            link.send(self._rejected(update, FailedPrecondition.code, outcome.message))
            return
        self.hub.publish(outcome.events)
        job = outcome.job
        if job is not None and kind.final and job.state.terminal and outcome.events:
            self.job_finished(job)
            log.info(
                "job.finished", job_id=job.id, state=job.state.name, executor_id=link.executor_id
            )
        elif job is not None and outcome.events and kind is UpdateKind.RELEASED:
            # A voluntary hand-back (the executor is stopping): requeue the job
            # for someone else, and never lease it straight back to this link.
            if not link.draining:
                link.draining = True
                log.info("executor.draining", executor_id=link.executor_id)
            self.queued(job.backend, job.kind)

    def job_finished(self, job: JobRecord) -> None:
        self._runs_ended += 1
        if job.finished_at is not None:
            self.metrics.job_latency.labels(job.backend, job.state.name).observe(
                max(job.finished_at - job.created_at, 0.0)
            )

    @staticmethod
    def _rejected(
        update: executor_pb2.JobUpdate, code: int, message: str
    ) -> executor_pb2.BrokerMessage:
        return executor_pb2.BrokerMessage(
            rejected=executor_pb2.UpdateRejected(
                job_id=update.job_id, lease_id=update.lease_id, code=code, message=message
            )
        )

    # --- dispatch ---------------------------------------------------------------
    async def run(self) -> None:
        """The dispatcher loop; runs until cancelled."""
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.dispatch()
                backoff = 0.05
            except Exception as exc:  # the dispatcher must outlive a bad moment (logged)
                # e.g. the disk is full: log, wait, retry; jobs stay safely queued.
                log.error("dispatch.failed", retry_in_s=backoff, exc_info=exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
                self._wake.set()

    async def dispatch(self) -> int:
        """Lease queued jobs to executors with free slots until none fits; returns count."""
        total = 0
        progress = True
        running = await self.quotas.running_limits()
        ended = self._runs_ended if running is not None else 0
        while progress:
            progress = False
            for link in sorted(self.executors.values(), key=lambda lk: -lk.free):
                free = link.free
                any_kind = "program" in link.capabilities
                wanted = {
                    (b, p) for b in link.backends for p in ((False, True) if any_kind else (False,))
                }
                if free <= 0:
                    continue
                generation = ended + sum(self._queued_generations.get(k, 0) for k in wanted)
                if generation == link.idle_generation:
                    continue
                grants = await self.store.claim(
                    link.backends,
                    link.executor_id,
                    self.settings.lease_ttl_s,
                    free,
                    None if any_kind else PRIMITIVE_KINDS,
                    running,
                    link.tenants,
                )
                link.idle_generation = generation if len(grants) < free else -1
                for grant in grants:
                    await self._assign(link, grant)
                if grants:
                    total += len(grants)
                    progress = True
        if total:
            self._gauge()
        return total

    async def _assign(self, link: ExecutorLink, grant: LeaseGrant) -> None:
        job = grant.job
        self.hub.publish(grant.events)
        spec = types_pb2.JobSpec.FromString(grant.spec)
        assignment = executor_pb2.Assignment(
            job_id=job.id,
            lease_id=job.lease_id,
            attempt=job.attempts,
            tenant=job.tenant,
            spec=spec,
            lease_expires_at=timestamp(job.lease_expires_at or time.time()),
        )
        if spec.WhichOneof("work") == "program" and self.program_resolver is not None:
            bundle = await self.program_resolver(spec, job.tenant)
            if bundle is not None:
                assignment.program.CopyFrom(bundle)
        if link.closed:
            # The stream went away between claim and send: the lease will
            # expire and the job will be requeued; nothing else to do.
            log.info("lease.orphaned", job_id=job.id, executor_id=link.executor_id)
            return
        link.inflight[job.lease_id] = job.id
        link.send(executor_pb2.BrokerMessage(assignment=assignment))
        log.debug("job.assigned", job_id=job.id, executor_id=link.executor_id, attempt=job.attempts)

    def _gauge(self) -> None:
        self.metrics.executors.set(len(self.executors))
        self.metrics.slots_total.set(sum(link.slots for link in self.executors.values()))
        self.metrics.slots_busy.set(sum(len(link.inflight) for link in self.executors.values()))

    def backend_proto(self, record: BackendRecord, queue_length: int) -> backends_pb2.Backend:
        online = self.online_executors(record.name)
        return backends_pb2.Backend(
            info=backends_pb2.BackendInfo.FromString(record.info),
            online=online > 0,
            online_executors=online,
            queue_length=queue_length,
            last_seen=timestamp(time.time() if online else record.last_seen),
        )
