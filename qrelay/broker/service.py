"""gRPC servicers: authenticate, decode, call the logic in jobs.py/scheduler.py, encode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import structlog

from qrelay._proto.v1 import (
    backends_pb2,
    backends_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    types_pb2,
)
from qrelay.broker.auth import Authenticator, check_executor_token
from qrelay.broker.events import timestamp, to_proto
from qrelay.broker.jobs import Backends, Jobs
from qrelay.broker.scheduler import ExecutorLink, Scheduler
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import JobRecord
from qrelay.broker.streams import Item, RunStreams, Submission
from qrelay.errors import InvalidArgument, QRelayError
from qrelay.rpc import grpc_errors

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
    )
    if job.started_at is not None:
        message.started_at.CopyFrom(timestamp(job.started_at))
    if job.finished_at is not None:
        message.finished_at.CopyFrom(timestamp(job.finished_at))
    if job.error:
        message.error.ParseFromString(job.error)
    return message


def _stream_item(item: Item) -> jobs_pb2.RunStreamItem:
    tag, what = item
    if isinstance(what, QRelayError):
        return jobs_pb2.RunStreamItem(
            tag=tag, error=jobs_pb2.RunStreamError(code=what.code, message=what.message)
        )
    return jobs_pb2.RunStreamItem(tag=tag, event=to_proto(what))


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: Jobs, auth: Authenticator, streams: RunStreams) -> None:
        self.jobs = jobs
        self.auth = auth
        self.streams = streams

    def _tenant(self, context: Context) -> str:
        return self.auth.tenant(context.invocation_metadata())

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
    async def GetResult(
        self, request: jobs_pb2.GetResultRequest, context: Context
    ) -> types_pb2.JobResult:
        data = await self.jobs.result(self._tenant(context), request.job_id)
        return types_pb2.JobResult.FromString(data)


class BackendServicer(backends_pb2_grpc.BackendServiceServicer):
    def __init__(self, backends: Backends, auth: Authenticator) -> None:
        self.backends = backends
        self.auth = auth

    @grpc_errors
    async def List(
        self, request: backends_pb2.ListBackendsRequest, context: Context
    ) -> backends_pb2.ListBackendsResponse:
        self.auth.tenant(context.invocation_metadata())
        return backends_pb2.ListBackendsResponse(backends=await self.backends.list())

    @grpc_errors
    async def Get(
        self, request: backends_pb2.GetBackendRequest, context: Context
    ) -> backends_pb2.Backend:
        self.auth.tenant(context.invocation_metadata())
        return await self.backends.get(request.name)


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
            first = await asyncio.wait_for(anext(incoming), self._silence_limit)
        except (TimeoutError, StopAsyncIteration):
            raise InvalidArgument("executor stream must start with Hello") from None
        # Checked after the Hello has arrived: answering before the executor's
        # first send completes can surface on its side as a send failure
        # (INTERNAL) instead of our UNAUTHENTICATED.
        check_executor_token(self.settings.executor_token, context.invocation_metadata())
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument(
                f"executor stream must start with Hello, got {first.WhichOneof('message')}"
            )
        link, _ = await self.scheduler.attach(first.hello)
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
                        await self.scheduler.heartbeat(link, list(message.heartbeat.lease_ids))
                    elif which == "update":
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
