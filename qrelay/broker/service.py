"""gRPC servicers of every broker service: authenticate, decode, call the logic
(jobs.py, scheduler.py, programs.py, sessions.py), encode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from qrelay._proto.v1 import (
    backends_pb2,
    backends_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    types_pb2,
)
from qrelay.broker import validation
from qrelay.broker.audit import audit
from qrelay.broker.auth import caller
from qrelay.broker.events import timestamp, to_proto
from qrelay.broker.jobs import Backends, Jobs
from qrelay.broker.programs import Programs
from qrelay.broker.quotas import UsageReport
from qrelay.broker.scheduler import ExecutorLink, Scheduler
from qrelay.broker.sessions import Sessions
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import JobRecord, JobState
from qrelay.broker.store.base import ProgramRecord, SessionMode, SessionRecord
from qrelay.broker.streams import Item, RunStreams, Submission
from qrelay.errors import InvalidArgument, QRelayError, Unauthenticated
from qrelay.rpc import grpc_errors
from qrelay.tls import verified_peer

log = structlog.get_logger(__name__)

# grpc ships no type hints; servicer contexts are grpc.aio.ServicerContext.
Context: TypeAlias = Any


def job_to_proto(job: JobRecord) -> jobs_pb2.Job:
    message = jobs_pb2.Job(
        id=job.id,
        backend=job.backend,
        kind=types_pb2.JobKind.ValueType(int(job.kind)),
        state=types_pb2.JobState.ValueType(int(job.state)),
        attempts=job.attempts,
        created_at=timestamp(job.created_at),
        session_id=job.session_id,
        executor_id=job.executor_id,
        last_seq=job.last_seq,
        tags=job.tags,
        idempotency_key=job.idempotency_key,
        num_pubs=job.num_pubs,
        queue_position=job.queue_position,
        usage_seconds=job.usage_s,
        priority=job.priority,
    )
    if job.started_at is not None:
        message.started_at.CopyFrom(timestamp(job.started_at))
    if job.finished_at is not None:
        message.finished_at.CopyFrom(timestamp(job.finished_at))
    if job.error:
        message.error.ParseFromString(job.error)
    return message


def usage_to_proto(report: UsageReport) -> jobs_pb2.Usage:
    quota, usage = report.quota, report.usage
    return jobs_pb2.Usage(
        period_start=timestamp(report.period.start.timestamp()),
        period_end=timestamp(report.period.end.timestamp()),
        executor_seconds=usage.executor_seconds,
        queued_jobs=usage.queued_jobs,
        running_jobs=usage.running_jobs,
        open_sessions=usage.open_sessions,
        program_bytes=usage.program_bytes,
        quotas=jobs_pb2.Quotas(
            max_queued_jobs=quota.max_queued_jobs,
            max_running_jobs=quota.max_running_jobs,
            max_sessions=quota.max_sessions,
            max_program_bytes=quota.max_program_bytes,
            max_executor_seconds=quota.max_executor_seconds,
        ),
    )


def _stream_item(item: Item) -> jobs_pb2.RunStreamItem:
    tag, what = item
    if isinstance(what, QRelayError):
        return jobs_pb2.RunStreamItem(
            tag=tag, error=jobs_pb2.RunStreamError(code=what.code, message=what.message)
        )
    return jobs_pb2.RunStreamItem(tag=tag, event=to_proto(what))


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: Jobs, streams: RunStreams) -> None:
        self.jobs = jobs
        self.streams = streams

    def _tenant(self, context: Context) -> str:
        return caller().tenant

    @grpc_errors
    async def Submit(self, request: jobs_pb2.SubmitRequest, context: Context) -> jobs_pb2.Job:
        tenant = self._tenant(context)
        job, _ = await self.jobs.submit(tenant, request.spec, request.idempotency_key)
        return job_to_proto(job)

    @grpc_errors
    async def Get(self, request: jobs_pb2.GetJobRequest, context: Context) -> jobs_pb2.Job:
        return job_to_proto(await self.jobs.get(self._tenant(context), request.job_id))

    @grpc_errors
    async def List(
        self, request: jobs_pb2.ListJobsRequest, context: Context
    ) -> jobs_pb2.ListJobsResponse:
        page = await self.jobs.list(
            self._tenant(context),
            page_size=request.page_size,
            page_token=request.page_token,
            states=list(request.states),
            backend=request.backend,
            session_id=request.session_id,
            tags=list(request.tags),
            program=request.program,
        )
        return jobs_pb2.ListJobsResponse(
            jobs=[job_to_proto(j) for j in page.jobs], next_page_token=page.next_page_token
        )

    @grpc_errors
    async def Cancel(self, request: jobs_pb2.CancelJobRequest, context: Context) -> jobs_pb2.Job:
        job = await self.jobs.cancel(self._tenant(context), request.job_id, request.reason)
        return job_to_proto(job)

    @grpc_errors
    async def Watch(
        self, request: jobs_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[types_pb2.JobEvent]:
        events = self.jobs.watch(self._tenant(context), request.job_id, request.after_seq)
        try:
            async for event in events:
                yield to_proto(event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    @grpc_errors
    async def Run(
        self, request: jobs_pb2.SubmitRequest, context: Context
    ) -> AsyncIterator[types_pb2.JobEvent]:
        events = self.jobs.run(self._tenant(context), request.spec, request.idempotency_key)
        try:
            async for event in events:
                yield to_proto(event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    @grpc_errors
    async def RunStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[jobs_pb2.RunStreamRequest], context: Context
    ) -> None:
        tenant = self._tenant(context)

        async def submissions() -> AsyncIterator[Submission]:
            async for request in request_iterator:
                yield Submission(request.tag, request.submit.spec, request.submit.idempotency_key)

        async def send(batch: list[Item]) -> None:
            await context.write(jobs_pb2.RunStreamReply(items=[_stream_item(i) for i in batch]))

        await self.streams.serve(tenant, submissions(), send)

    @grpc_errors
    async def Delete(
        self, request: jobs_pb2.DeleteJobRequest, context: Context
    ) -> jobs_pb2.DeleteJobResponse:
        job = await self.jobs.delete(self._tenant(context), request.job_id)
        return jobs_pb2.DeleteJobResponse(job=job_to_proto(job))

    @grpc_errors
    async def UpdateTags(
        self, request: jobs_pb2.UpdateTagsRequest, context: Context
    ) -> jobs_pb2.Job:
        job = await self.jobs.update_tags(self._tenant(context), request.job_id, dict(request.tags))
        return job_to_proto(job)

    @grpc_errors
    async def GetUsage(self, request: jobs_pb2.GetUsageRequest, context: Context) -> jobs_pb2.Usage:
        return usage_to_proto(await self.jobs.usage(self._tenant(context)))

    @grpc_errors
    async def GetResult(
        self, request: jobs_pb2.GetResultRequest, context: Context
    ) -> types_pb2.JobResult:
        data = await self.jobs.result(self._tenant(context), request.job_id)
        return types_pb2.JobResult.FromString(data)


class BackendServicer(backends_pb2_grpc.BackendServiceServicer):
    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    @grpc_errors
    async def List(
        self, request: backends_pb2.ListBackendsRequest, context: Context
    ) -> backends_pb2.ListBackendsResponse:
        return backends_pb2.ListBackendsResponse(backends=await self.backends.list(caller().tenant))

    @grpc_errors
    async def Get(
        self, request: backends_pb2.GetBackendRequest, context: Context
    ) -> backends_pb2.Backend:
        return await self.backends.get(caller().tenant, request.name)


def _check_executor_certificate(context: Context) -> None:
    """With mutual TLS configured, an executor must have presented a verified certificate
    (which only a port that requires one obtains: see qrelay.tls)."""
    subject = verified_peer(context.auth_context())
    if subject is None:
        audit("executor.refused", reason="no verified client certificate", peer=context.peer())
        raise Unauthenticated(
            "this broker requires executors to present a TLS client certificate signed by its "
            "client CA: connect to its executor port (executor_listen) with --tls-cert/--tls-key"
        )
    log.info("executor.certificate_verified", subject=subject)


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    """One long-lived stream per executor: Hello, then heartbeats/updates in, work out."""

    def __init__(self, scheduler: Scheduler, settings: BrokerSettings, broker_id: str) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.broker_id = broker_id

    @property
    def _silence_limit(self) -> float:
        return 3 * self.settings.heartbeat_interval_s

    @grpc_errors
    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[executor_pb2.ExecutorMessage], context: Context
    ) -> None:
        incoming = aiter(request_iterator)
        try:
            async with asyncio.timeout(self._silence_limit):
                first = await anext(incoming)
        except (TimeoutError, StopAsyncIteration):
            raise InvalidArgument("executor stream must start with Hello") from None
        # Checked after the Hello has arrived: answering before the executor's
        # first send completes can surface on its side as a send failure
        # (INTERNAL) instead of our UNAUTHENTICATED.
        if self.settings.tls_client_ca is not None:
            _check_executor_certificate(context)
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument(
                f"executor stream must start with Hello, got {first.WhichOneof('message')}"
            )
        validation.check_no_nul(first.hello, "hello")
        link, _ = await self.scheduler.attach(first.hello, tenants=caller().executor_tenants)
        try:
            await context.write(
                executor_pb2.BrokerMessage(
                    welcome=executor_pb2.Welcome(
                        broker_id=self.broker_id,
                        heartbeat_interval_ms=int(self.settings.heartbeat_interval_s * 1000),
                        lease_ttl_ms=int(self.settings.lease_ttl_s * 1000),
                        max_update_bytes=max_message_bytes(self.settings),
                    )
                )
            )
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._read(link, incoming))
                writer = tg.create_task(self._write(link, context))
                await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                reader.cancel()
                writer.cancel()
        finally:
            await self.scheduler.detach(link)

    async def _read(
        self, link: ExecutorLink, incoming: AsyncIterator[executor_pb2.ExecutorMessage]
    ) -> None:
        log_ = log.bind(executor_id=link.executor_id)
        loop = asyncio.get_running_loop()
        limit = self._silence_limit
        # One deadline moved along per message (not a wait_for task per message);
        # off while a message is handled, so a slow commit is not silence.
        try:
            async with asyncio.timeout(limit) as silence:
                async for message in incoming:
                    silence.reschedule(None)
                    which = message.WhichOneof("message")
                    if which == "heartbeat":
                        validation.check_no_nul(message.heartbeat, "heartbeat")
                        await self.scheduler.heartbeat(link, list(message.heartbeat.lease_ids))
                    elif which == "update":
                        # Ids reach the store; payloads are stored as bytes.
                        validation.check_text(message.update.job_id, "update.job_id")
                        validation.check_text(message.update.lease_id, "update.lease_id")
                        await self.scheduler.shielded(self.scheduler.update(link, message.update))
                    else:
                        log_.warning("executor.unexpected_message", kind=which)
                    silence.reschedule(loop.time() + limit)
        except TimeoutError:
            log_.warning("executor.timed_out", silent_s=limit)

    async def _write(self, link: ExecutorLink, context: Context) -> None:
        while True:
            message = await link.outbox.get()
            if message is None:
                return
            await context.write(message)


def max_message_bytes(settings: BrokerSettings) -> int:
    """gRPC receive limit: several times max_job_bytes (and max_program_bytes),
    so our own size checks (with their clear messages) are what callers just
    above a limit meet."""
    return max(4 * settings.max_job_bytes, 2 * settings.max_program_bytes) + 1024 * 1024


# --- programs ---------------------------------------------------------------


def program_to_proto(record: ProgramRecord) -> programs_pb2.Program:
    return programs_pb2.Program(
        id=record.id,
        name=record.name,
        entry_point=record.entry_point,
        requirements=list(record.requirements),
        input_schema_json=record.input_schema_json,
        description=record.description,
        size_bytes=record.size_bytes,
        version=record.version,
        created_at=timestamp(record.created_at),
    )


class ProgramServicer(programs_pb2_grpc.ProgramServiceServicer):
    """Thin: authenticate, call `Programs`, encode."""

    def __init__(self, programs: Programs) -> None:
        self.programs = programs

    def _tenant(self, context: Context) -> str:
        return caller().tenant

    @grpc_errors
    async def Upload(
        self, request: programs_pb2.UploadProgramRequest, context: Context
    ) -> programs_pb2.Program:
        record, _ = await self.programs.upload(
            self._tenant(context),
            name=request.name,
            archive=request.archive,
            entry_point=request.entry_point,
            requirements=list(request.requirements),
            input_schema_json=request.input_schema_json,
            description=request.description,
        )
        return program_to_proto(record)

    @grpc_errors
    async def Get(
        self, request: programs_pb2.GetProgramRequest, context: Context
    ) -> programs_pb2.Program:
        return program_to_proto(await self.programs.get(self._tenant(context), request.program))

    @grpc_errors
    async def List(
        self, request: programs_pb2.ListProgramsRequest, context: Context
    ) -> programs_pb2.ListProgramsResponse:
        records = await self.programs.list(self._tenant(context), request.name)
        return programs_pb2.ListProgramsResponse(programs=[program_to_proto(r) for r in records])

    @grpc_errors
    async def Delete(
        self, request: programs_pb2.DeleteProgramRequest, context: Context
    ) -> programs_pb2.DeleteProgramResponse:
        deleted = await self.programs.delete(self._tenant(context), request.program)
        return programs_pb2.DeleteProgramResponse(deleted=deleted)


# --- sessions ---------------------------------------------------------------


def _ts(seconds: float | None) -> Timestamp | None:
    return None if seconds is None else timestamp(seconds)


def session_to_proto(session: SessionRecord) -> sessions_pb2.Session:
    counts = session.counts
    message = sessions_pb2.Session(
        id=session.id,
        backend=session.backend,
        mode=sessions_pb2.SessionMode.ValueType(int(session.mode)),
        state=sessions_pb2.SessionState.ValueType(int(session.state)),
        state_reason=session.state_reason,
        executor_id=session.executor_id,
        max_time_s=session.max_time_s,
        max_idle_s=session.max_idle_s,
        created_at=_ts(session.created_at),
        activated_at=_ts(session.activated_at),
        closed_at=_ts(session.closed_at),
        last_job_at=_ts(session.last_job_at),
        jobs_total=sum(counts.values()),
        jobs_queued=counts[JobState.QUEUED],
        jobs_running=counts[JobState.RUNNING],
        jobs_done=counts[JobState.DONE],
        jobs_failed=counts[JobState.FAILED],
        jobs_cancelled=counts[JobState.CANCELLED],
    )
    return message


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    """Thin: authenticate, call `Sessions`, encode."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def _tenant(self, context: Context) -> str:
        return caller().tenant

    @grpc_errors
    async def Create(
        self, request: sessions_pb2.CreateSessionRequest, context: Context
    ) -> sessions_pb2.Session:
        tenant = self._tenant(context)
        try:
            mode = SessionMode(request.mode) if request.mode else None
        except ValueError:
            modes = ", ".join(f"{m.name}={m.value}" for m in SessionMode)
            raise InvalidArgument(f"mode {request.mode} is not a SessionMode ({modes})") from None
        session = await self.sessions.create(
            tenant, request.backend, mode, request.max_time_s, request.max_idle_s
        )
        return session_to_proto(session)

    @grpc_errors
    async def Get(
        self, request: sessions_pb2.GetSessionRequest, context: Context
    ) -> sessions_pb2.Session:
        return session_to_proto(await self.sessions.get(self._tenant(context), request.session_id))

    @grpc_errors
    async def Close(
        self, request: sessions_pb2.CloseSessionRequest, context: Context
    ) -> sessions_pb2.Session:
        tenant = self._tenant(context)
        return session_to_proto(await self.sessions.close(tenant, request.session_id))

    @grpc_errors
    async def Cancel(
        self, request: sessions_pb2.CancelSessionRequest, context: Context
    ) -> sessions_pb2.Session:
        tenant = self._tenant(context)
        return session_to_proto(await self.sessions.cancel(tenant, request.session_id))

    @grpc_errors
    async def List(
        self, request: sessions_pb2.ListSessionsRequest, context: Context
    ) -> sessions_pb2.ListSessionsResponse:
        page = await self.sessions.page(
            self._tenant(context),
            page_size=request.page_size,
            page_token=request.page_token,
            states=list(request.states),
            backend=request.backend,
        )
        return sessions_pb2.ListSessionsResponse(
            sessions=[session_to_proto(s) for s in page.sessions],
            next_page_token=page.next_page_token,
        )
