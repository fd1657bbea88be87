"""JobService and BackendService logic on plain values, testable without a socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import structlog

from qrelay._proto.v1 import backends_pb2, types_pb2
from qrelay.broker import validation
from qrelay.broker.audit import audit
from qrelay.broker.events import EventHub, HubClosed, Subscription, follow
from qrelay.broker.quotas import QuotaSource, SettingsQuotas, UsageReport, audited, usage_report
from qrelay.broker.scheduler import Scheduler
from qrelay.broker.settings import MIB, BrokerSettings
from qrelay.broker.store import (
    JobKind,
    JobRecord,
    JobState,
    JobStore,
    NewJob,
    StoredEvent,
    lifecycle,
)
from qrelay.broker.store.base import JobPage, OtherTenants, new_job_id, state_payload
from qrelay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_for_code,
)
from qrelay.limits import MAX_PAGE_SIZE

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 50
# Submit-time hook (`Programs.check_job`): checks a program job's inputs and
# rewrites spec.program.program to the resolved id, which it returns.
# (Sessions need no hook: the store checks a job's session in the submit transaction.)
ProgramCheck = Callable[[str, types_pb2.JobSpec], Awaitable[str]]


class Jobs:
    """Submit, inspect, cancel and follow jobs of one tenant at a time."""

    def __init__(
        self,
        store: JobStore,
        hub: EventHub,
        scheduler: Scheduler,
        settings: BrokerSettings,
        *,
        program_check: ProgramCheck | None = None,
        quotas: QuotaSource | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.scheduler = scheduler
        self.settings = settings
        self.program_check = program_check
        self.quotas = quotas or SettingsQuotas(settings)

    async def submit(
        self, tenant: str, spec: types_pb2.JobSpec, idempotency_key: str = "", job_id: str = ""
    ) -> tuple[JobRecord, bool]:
        """Validate, store durably, queue; returns (job, created).

        A program job is stored with its program resolved to an id (a later
        upload under the same name does not change what it runs)."""
        original = spec
        validation.check_idempotency_key(idempotency_key)
        size = spec.ByteSize()
        if size > self.settings.max_job_bytes:
            raise ResourceExhausted(
                f"job is {size / MIB:.1f} MiB; this broker accepts at most "
                f"{self.settings.max_job_bytes / MIB:.1f} MiB per job (QRELAY_MAX_JOB_BYTES)"
            )
        # Backends only other tenants' executors serve are unknown to this tenant.
        usable = await self.scheduler.usable(tenant)
        names = sorted(n for n in self.scheduler.known_backends if usable(n))
        kind = validation.validate_spec(spec, spec.backend in names, names)
        lifecycle.check_priority(spec.priority)
        program_id = ""
        if kind is JobKind.PROGRAM and self.program_check is not None:
            spec = types_pb2.JobSpec()
            spec.CopyFrom(original)
            program_id = await self.program_check(tenant, spec)
        new = NewJob(
            tenant=tenant,
            backend=spec.backend,
            kind=kind,
            spec=spec.SerializeToString(),
            num_pubs=validation.num_pubs(spec),
            session_id=spec.session_id,
            tags=dict(spec.tags),
            idempotency_key=idempotency_key,
            program_id=program_id,
            id=job_id,
            weight=self.settings.tenant_weights.get(tenant, 1.0),
            priority=spec.priority,
        )
        return await self.scheduler.shielded(self._store(new))

    async def _store(self, new: NewJob) -> tuple[JobRecord, bool]:
        quota = await self.quotas.quota(new.tenant)
        with audited("submit"):
            job, created = await self.store.submit(
                new, max_queued_per_tenant=self.settings.max_queued_per_tenant, quota=quota
            )
        if created:
            log.info("job.submitted", job_id=job.id, tenant=job.tenant, backend=job.backend)
            self.scheduler.queued(job.backend, job.kind)
        else:
            log.info("job.resubmitted", job_id=job.id, tenant=job.tenant, key=job.idempotency_key)
        return job, created

    async def usage(self, tenant: str) -> UsageReport:
        """The tenant's use in the current period beside its quotas."""
        return await usage_report(self.store, self.quotas, tenant)

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        if not job_id:
            raise InvalidArgument("job_id is required")
        return await self.store.get(job_id, tenant)

    async def list(
        self,
        tenant: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        states: Sequence[int] = (),
        backend: str = "",
        session_id: str = "",
        tags: Sequence[str] = (),
        program: str = "",
    ) -> JobPage:
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        validation.check_text(program, "program")  # PostgreSQL text cannot hold NUL
        try:
            wanted = [JobState(s) for s in states]
        except ValueError:
            raise InvalidArgument(f"states has an unknown state in {list(states)}") from None
        return await self.store.list_jobs(
            tenant,
            states=wanted,
            backend=backend,
            session_id=session_id,
            tags=validation.tag_filter(tags),
            program=program,
            page_size=size,
            page_token=page_token,
        )

    async def cancel(self, tenant: str, job_id: str, reason: str = "") -> JobRecord:
        if not job_id:
            raise InvalidArgument("job_id is required")
        return await self.scheduler.shielded(self._cancel(tenant, job_id, reason))

    async def _cancel(self, tenant: str, job_id: str, reason: str) -> JobRecord:
        outcome = await self.store.cancel(job_id, tenant, reason)
        if outcome.events:
            self.hub.publish(outcome.events)
            self.scheduler.job_finished(outcome.job)
            log.info("job.cancelled", job_id=job_id, tenant=tenant, was=outcome.previous_state.name)
        if outcome.lease_id:
            self.scheduler.send_cancel(
                outcome.executor_id,
                job_id,
                outcome.lease_id,
                f"cancelled: {reason}" if reason else "cancelled by the client",
            )
        return outcome.job

    async def delete(self, tenant: str, job_id: str) -> JobRecord:
        """Delete a finished job with its events and result (Runtime's delete_job)."""
        if not job_id:
            raise InvalidArgument("job_id is required")
        try:
            job = await self.store.delete_job(job_id, tenant)
        except OtherTenants:
            audit("cross_tenant_denied", rpc="JobService.Delete", tenant=tenant, job_id=job_id)
            raise
        log.info("job.deleted", job_id=job_id, tenant=tenant, state=job.state.name)
        return job

    async def update_tags(self, tenant: str, job_id: str, tags: dict[str, str]) -> JobRecord:
        """Replace a job's tags (Runtime's job.update_tags)."""
        if not job_id:
            raise InvalidArgument("job_id is required")
        validation.check_tags(tags, "tags")
        try:
            job = await self.store.update_tags(job_id, tenant, tags)
        except OtherTenants:
            audit("cross_tenant_denied", rpc="JobService.UpdateTags", tenant=tenant, job_id=job_id)
            raise
        log.info("job.tags_updated", job_id=job_id, tenant=tenant, tags=len(tags))
        return job

    async def run(
        self, tenant: str, spec: types_pb2.JobSpec, idempotency_key: str = ""
    ) -> AsyncIterator[StoredEvent]:
        """Submit (durably, as `submit`), then every event of the job from the first.

        One call instead of Submit + Watch: a client waiting for the result
        pays one round trip. A repeat with the same key follows the first job.
        """
        job_id = new_job_id()
        # Listening before the commit: every event after the first reaches this
        # subscription, so the first (QUEUED, written by the submit) need not
        # be read back from the store.
        with self.hub.subscribe(job_id) as sub:
            job, created = await self.submit(tenant, spec, idempotency_key, job_id)
            if created:
                first = StoredEvent(
                    job.id, 1, job.created_at, state_payload(JobState.QUEUED, "submitted", 0), False
                )
                async for event in self._follow(job, 0, subscription=sub, history=[first]):
                    yield event
                return
        async for event in self._follow(job, 0):  # a repeat: the first job's events
            yield event

    async def watch(self, tenant: str, job_id: str, after_seq: int) -> AsyncIterator[StoredEvent]:
        """Events after after_seq, replayed then live, until the terminal event.

        An after_seq at or beyond the job's last event is allowed: the Watch
        waits for newer events and still ends when the job does, with no event
        at all if the terminal one is numbered after_seq or lower. So it follows
        from the job's last event (a cursor beyond it would make every new event
        look delivered already, the terminal one included, and the Watch would
        never end) and sends only the events above after_seq."""
        if after_seq < 0:
            raise InvalidArgument(f"after_seq must be >= 0, got {after_seq}")
        job = await self.get(tenant, job_id)
        async for event in self._follow(job, min(after_seq, job.last_seq)):
            if event.seq > after_seq:
                yield event

    async def _follow(
        self,
        job: JobRecord,
        after_seq: int,
        *,
        subscription: Subscription | None = None,
        history: Sequence[StoredEvent] | None = None,
    ) -> AsyncIterator[StoredEvent]:
        job_id = job.id
        terminal_seq = job.last_seq if job.state.terminal else None
        last = after_seq
        try:
            async for event in follow(
                self.store,
                self.hub,
                job_id,
                after_seq,
                terminal_seq=terminal_seq,
                subscription=subscription,
                history=history,
            ):
                last = event.seq
                yield event
        except HubClosed:
            raise Unavailable(
                f"broker is shutting down; resume with Watch(job_id={job_id!r}, after_seq={last})"
            ) from None

    async def result(self, tenant: str, job_id: str) -> bytes:
        job = await self.get(tenant, job_id)
        if job.state is JobState.DONE:
            result = await self.store.get_result(job_id)
            if result is None:
                raise FailedPrecondition(f"job {job_id} is DONE but has no stored result")
            return result
        if job.state is JobState.FAILED:
            error = types_pb2.JobError.FromString(job.error or b"")
            raise error_for_code(error.code, error.message or "job failed")
        if job.state is JobState.CANCELLED:
            raise FailedPrecondition(f"job {job_id} was cancelled; it has no result")
        raise FailedPrecondition(
            f"job {job_id} is {job.state.name}; its result is not ready (Watch it or poll Get)"
        )


class Backends:
    """What executors announced, with live availability."""

    def __init__(self, store: JobStore, scheduler: Scheduler) -> None:
        self.store = store
        self.scheduler = scheduler

    async def list(self, tenant: str) -> list[backends_pb2.Backend]:
        """Every backend `tenant` may use (one whose executors are restricted to other
        tenants is not shown), with queue lengths as it sees them (`queue_estimates`)."""
        lengths = await self.store.queue_estimates(tenant)
        visible = await self.scheduler.usable(tenant, max_age_s=0)
        return [
            self.scheduler.backend_proto(record, lengths.get(record.name, 0))
            for record in await self.store.list_backends()
            if visible(record.name)
        ]

    async def get(self, tenant: str, name: str) -> backends_pb2.Backend:
        if not name:
            raise InvalidArgument("name is required")
        visible = await self.scheduler.usable(tenant, max_age_s=0)
        record = await self.store.get_backend(name)
        if record is None or not visible(name):
            known = ", ".join(sorted(n for n in self.scheduler.known_backends if visible(n)))
            raise NotFound(f"unknown backend {name!r}; known: {known or 'none yet'}")
        lengths = await self.store.queue_estimates(tenant)
        return self.scheduler.backend_proto(record, lengths.get(name, 0))
