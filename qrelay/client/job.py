"""Job handles: `AsyncRuntimeJob` (the core) and `RuntimeJob` (its sync facade).

A job's progress arrives through `JobService.Watch`, never by polling: the
result, errors, interim values and logs are all events of one ordered
stream. A dropped stream is reopened with `after_seq` = the last event seen,
so a subscriber sees every event exactly once and in order.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import anyio
import grpc
from qiskit.primitives import BasePrimitiveJob, PrimitiveResult
from qiskit.providers import JobStatus

from qrelay import job_warnings
from qrelay._proto.v1 import jobs_pb2, types_pb2
from qrelay.client._connection import is_resumable
from qrelay.client._log import get_logger
from qrelay.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    QRelayError,
    Unavailable,
    error_for_code,
)
from qrelay.finished_job import FinishedJob
from qrelay.limits import tag_problem
from qrelay.rpc import error_from_rpc

if TYPE_CHECKING:
    from qrelay.client._loop import LoopThread
    from qrelay.client.backend import QRelayBackend
    from qrelay.client.service import AsyncQRelayService, QRelayService

log = get_logger(__name__)

EventKind = Literal["state", "interim", "log", "progress", "result", "error"]

_STATUS: dict[types_pb2.JobState.ValueType, JobStatus] = {
    types_pb2.JOB_STATE_QUEUED: JobStatus.QUEUED,
    types_pb2.JOB_STATE_RUNNING: JobStatus.RUNNING,
    types_pb2.JOB_STATE_DONE: JobStatus.DONE,
    types_pb2.JOB_STATE_FAILED: JobStatus.ERROR,
    types_pb2.JOB_STATE_CANCELLED: JobStatus.CANCELLED,
}
_FINAL_STATES = frozenset(
    {types_pb2.JOB_STATE_DONE, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED}
)

_DONE_STATUSES = frozenset({JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED})


def _final_attempt(history: list[types_pb2.JobEvent]) -> int:
    """The attempt of a finished job's last state change (0 from a broker without attempts)."""
    for ev in reversed(history):
        if ev.WhichOneof("payload") == "state":
            return int(ev.state.attempt)
    return 0


#: Results above this size are decoded in a worker thread, not on the loop.
_DECODE_IN_THREAD_BYTES = 256 * 1024


def job_status(state: types_pb2.JobState.ValueType) -> JobStatus:
    """Qiskit's JobStatus for a wire JobState (FAILED is Qiskit's ERROR)."""
    try:
        return _STATUS[state]
    except KeyError:
        raise Internal(f"broker sent an unknown job state {state}") from None


def state_for_status(status: JobStatus | str) -> types_pb2.JobState.ValueType:
    """Wire JobState for a JobStatus or a name ('queued', 'failed', 'error', ...)."""
    if isinstance(status, JobStatus):
        for state, known in _STATUS.items():
            if known is status:
                return state
        raise ValueError(f"JobStatus.{status.name} is not a qrelay job state")
    name = status.strip().upper()
    if name == "ERROR":
        name = "FAILED"
    value = types_pb2.JobState.Value(f"JOB_STATE_{name}") if name in _STATE_NAMES else None
    if value is None:
        raise ValueError(
            f"unknown job state {status!r}; use one of queued, running, done, failed, cancelled"
        )
    return value


_STATE_NAMES = frozenset({"QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"})


def job_error(error: types_pb2.JobError) -> QRelayError:
    """The qrelay exception a JobError stands for, with the user's traceback as a note."""
    message = error.message or "job failed"
    if error.type and not message.startswith(f"{error.type}:"):
        message = f"{error.type}: {message}"
    exc = error_for_code(error.code, message)
    if error.traceback:
        lines = (line if line.endswith("\n") else line + "\n" for line in error.traceback)
        exc.add_note("".join(lines))
    return exc


async def decode_job_result(result: types_pb2.JobResult) -> Any:
    """A PrimitiveResult for primitive jobs, the decoded value for program jobs."""
    which = result.WhichOneof("value")
    if which == "primitive":
        from qrelay.codec import decode_primitive_result

        if result.primitive.ByteSize() > _DECODE_IN_THREAD_BYTES:
            return await anyio.to_thread.run_sync(decode_primitive_result, result.primitive)
        return decode_primitive_result(result.primitive)
    if which == "program_json":
        from qrelay.values import decode_value

        return decode_value(result.program_json)
    raise Internal("broker sent a job result without a value")


@dataclass(frozen=True)
class Progress:
    """How far a long primitive job has got: `done` of `total` pubs in `stage`."""

    stage: str
    done: int
    total: int

    @property
    def fraction(self) -> float:
        """Done over total in this stage (0 when there is no total)."""
        return self.done / self.total if self.total else 0.0


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's history, decoded.

    `data` is a `JobStatus` for "state", the published value for "interim",
    the line's text for "log", a `Progress` for "progress" (long primitive
    jobs), the `PrimitiveResult` (or program value) for
    "result" and the `qrelay.errors` exception for "error". `raw` keeps the
    wire event for anything else (state messages, log levels, attempts).
    """

    job_id: str
    seq: int
    kind: EventKind
    data: Any
    time: datetime | None = None
    raw: types_pb2.JobEvent | None = field(default=None, repr=False, compare=False)

    @property
    def message(self) -> str:
        """The state change's reason, or the log line's stream, or ""."""
        if self.raw is None:
            return ""
        if self.kind == "state":
            return self.raw.state.message
        if self.kind == "log":
            return self.raw.log.stream
        return ""


async def decode_event(ev: types_pb2.JobEvent) -> JobEvent:
    """Decode one wire event into a JobEvent."""
    which = ev.WhichOneof("payload")
    when = ev.time.ToDatetime() if ev.HasField("time") else None
    kind: EventKind
    data: Any
    if which == "state":
        kind, data = "state", job_status(ev.state.state)
    elif which == "interim":
        from qrelay.values import decode_value

        kind, data = "interim", decode_value(ev.interim.value_json)
    elif which == "log":
        kind, data = "log", ev.log.text
    elif which == "progress":
        kind = "progress"
        data = Progress(ev.progress.stage, ev.progress.done, ev.progress.total)
    elif which == "result":
        kind, data = "result", await decode_job_result(ev.result)
    elif which == "error":
        kind, data = "error", job_error(ev.error)
    else:
        raise Internal(f"broker sent event {ev.seq} of job {ev.job_id} without a payload")
    return JobEvent(job_id=ev.job_id, seq=ev.seq, kind=kind, data=data, time=when, raw=ev)


def wire_tags(tags: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """Tags as the wire's map; a list of strings (Runtime's style) becomes {tag: ""}."""
    if tags is None:
        return {}
    if isinstance(tags, str):
        raise InvalidArgument("tags must be a dict of str to str or a list of str, got a str")
    pairs = dict(tags) if isinstance(tags, Mapping) else {t: "" for t in tags}
    for key, value in pairs.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise InvalidArgument(f"tags must map non-empty str to str, got {key!r}: {value!r}")
    problem = tag_problem(pairs)
    if problem is not None:
        raise InvalidArgument(f"tags {problem}")
    return pairs


class EventCall(Protocol):
    """What follows one job's events: a Run or Watch call, or a job's share of a RunStream."""

    async def read(self) -> Any: ...

    def cancel(self) -> bool: ...

    def add_done_callback(self, callback: Any) -> None: ...


async def _read_events(
    pending: list[types_pb2.JobEvent], call: EventCall
) -> AsyncGenerator[types_pb2.JobEvent, None]:
    """Events already read from `call`, then the rest of it (read() only: never mixed)."""
    for ev in pending:
        yield ev
    while True:
        ev = await call.read()
        if ev is grpc.aio.EOF:
            return
        yield ev


def is_terminal(ev: types_pb2.JobEvent) -> bool:
    """True for the job's last event: its DONE/FAILED/CANCELLED state change."""
    return ev.WhichOneof("payload") == "state" and ev.state.state in _FINAL_STATES


_UNSET: Any = object()


def spec_inputs(spec: types_pb2.JobSpec) -> dict[str, Any]:
    """A JobSpec's work as Python values (pubs coerced as the executor coerces them)."""
    from google.protobuf import json_format

    from qrelay import codec

    options = json_format.MessageToDict(spec.options) if spec.HasField("options") else {}
    which = spec.WhichOneof("work")
    if which == "sampler":
        pubs, shots = codec.decode_sampler_task(spec.sampler)
        return {"pubs": pubs, "shots": shots, "options": options}
    if which == "estimator":
        est_pubs, precision = codec.decode_estimator_task(spec.estimator)
        return {"pubs": est_pubs, "precision": precision, "options": options}
    if which == "program":
        from qrelay.values import decode_value

        return {"program": spec.program.program, "inputs": decode_value(spec.program.inputs_json)}
    return {}


class AsyncRuntimeJob:
    """A submitted job, for asyncio code: `await job.result()`, `async for ev in job.stream()`."""

    def __init__(
        self,
        service: AsyncQRelayService,
        job: jobs_pb2.Job,
        *,
        run_stream: tuple[types_pb2.JobEvent, EventCall] | None = None,
        spec: types_pb2.JobSpec | None = None,
    ) -> None:
        self._service = service
        self._job = job
        # What was submitted, when this process submitted it (the broker does not
        # return a job's inputs).
        self._spec = spec
        # The Run call that submitted this job, with its first event already
        # read: the first reader of events takes it instead of opening Watch.
        self._run_stream = run_stream
        self._result: Any = _UNSET
        self._failure: QRelayError | None = None
        # Warnings the executor carried in the result's metadata, warned once by result().
        self._warnings: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<AsyncRuntimeJob {self.job_id()} backend={self.backend_name!r}>"

    def job_id(self) -> str:
        return self._job.id

    @property
    def backend_name(self) -> str:
        return self._job.backend

    @property
    def session_id(self) -> str:
        return self._job.session_id

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._job.tags)

    @property
    def creation_date(self) -> datetime | None:
        return self._job.created_at.ToDatetime() if self._job.HasField("created_at") else None

    async def update_tags(
        self, new_tags: Mapping[str, str] | Iterable[str] | None = None
    ) -> dict[str, str]:
        """Replace the job's tags (Runtime's `update_tags`): a list of strings (Runtime's
        style, keys with empty values) or a dict; none clears them. Returns the
        new tags, which `tags` shows from then on."""
        request = jobs_pb2.UpdateTagsRequest(job_id=self.job_id(), tags=wire_tags(new_tags))
        conn = self._service.connection
        self._job = await conn.unary(conn.jobs.UpdateTags, request)
        log.info("job.tags_updated", job_id=self.job_id(), tags=len(self._job.tags))
        return self.tags

    @property
    def inputs(self) -> dict[str, Any]:
        """What the job was given, as Runtime's `job.inputs`: the pubs (coerced), shots or
        precision and options of a primitive job; the program and its inputs of a
        program job. The broker does not return a job's inputs, so only a job this
        service object submitted knows them (FailedPrecondition otherwise)."""
        if self._spec is None:
            raise FailedPrecondition(
                f"the inputs of job {self.job_id()} are unknown here: the broker does not "
                "return a job's inputs, only the handle that submitted the job has them"
            )
        return spec_inputs(self._spec)

    async def backend(self) -> QRelayBackend:
        """The backend the job runs on (as Runtime's `job.backend()`)."""
        return await self._service.backend(self.backend_name)

    async def error_message(self) -> str | None:
        """Why the job failed, None unless it did (Runtime's `job.error_message()`)."""
        job = await self.refresh()
        if job.state != types_pb2.JOB_STATE_FAILED:
            return None
        return str(job_error(job.error))

    async def wait_for_final_state(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the job is DONE, FAILED or CANCELLED, without raising its error;
        `DeadlineExceeded` after `timeout` seconds (the job keeps running)."""
        if self._result is not _UNSET or self._failure is not None:
            return
        try:
            with anyio.fail_after(timeout):
                await self._await_final()
        except TimeoutError:
            raise DeadlineExceeded(
                f"job {self.job_id()} did not reach a final state within {timeout:g} s"
            ) from None

    @property
    def last_known(self) -> jobs_pb2.Job:
        """The job as of the last call that fetched it (no network)."""
        return self._job

    async def refresh(self) -> jobs_pb2.Job:
        """Fetch the job's current record from the broker."""
        conn = self._service.connection
        self._job = await conn.unary(conn.jobs.Get, jobs_pb2.GetJobRequest(job_id=self.job_id()))
        return self._job

    async def status(self) -> JobStatus:
        return job_status((await self.refresh()).state)

    async def done(self) -> bool:
        return await self.status() is JobStatus.DONE

    async def running(self) -> bool:
        return await self.status() is JobStatus.RUNNING

    async def cancelled(self) -> bool:
        return await self.status() is JobStatus.CANCELLED

    async def in_final_state(self) -> bool:
        return (await self.refresh()).state in _FINAL_STATES

    async def cancel(self, reason: str = "") -> None:
        """Cancel in any state; cancelling a finished job changes nothing."""
        conn = self._service.connection
        self._job = await conn.unary(
            conn.jobs.Cancel, jobs_pb2.CancelJobRequest(job_id=self.job_id(), reason=reason)
        )
        log.info("job.cancel_requested", job_id=self.job_id(), state=self._job.state)

    async def _events(self, after_seq: int = 0) -> AsyncGenerator[types_pb2.JobEvent, None]:
        """Raw events after `after_seq`, reconnecting and resuming on dropped streams.

        Gives up when the broker stays unreachable for the service timeout
        without delivering a single event.
        """
        conn = self._service.connection
        last = after_seq
        failures = 0
        stalled_since: float | None = None
        run, self._run_stream = self._run_stream, None
        while True:
            pending: list[types_pb2.JobEvent] = []
            if run is not None:
                pending, call = [run[0]], run[1]
                run = None
            else:
                call = conn.watch(self.job_id(), last)
            try:
                async for ev in _read_events(pending, call):
                    if ev.seq <= last:
                        continue  # already delivered before the reconnect
                    last, failures, stalled_since = ev.seq, 0, None
                    yield ev
                    if is_terminal(ev):
                        return
                # The broker ends a Watch cleanly without the terminal event when
                # that event is numbered `after_seq` or lower: nothing is left.
                job = await self.refresh()
                if job.state in _FINAL_STATES and job.last_seq <= last:
                    return
                reason = "stream ended before the job's terminal event"
            except grpc.aio.AioRpcError as exc:
                if not is_resumable(exc):
                    raise error_from_rpc(exc) from None
                reason = f"{exc.code().name}: {exc.details()}"
            finally:
                call.cancel()
            failures += 1
            now = time.monotonic()
            stalled_since = stalled_since if stalled_since is not None else now
            if now - stalled_since > conn.timeout:
                raise Unavailable(
                    f"lost the event stream of job {self.job_id()} and could not resume it "
                    f"within {conn.timeout:g} s ({reason})"
                )
            pause = conn.retry.backoff(min(failures, conn.retry.max_attempts))
            log.info(
                "watch.resumed",
                job_id=self.job_id(),
                after_seq=last,
                attempt=failures,
                reason=reason,
            )
            await anyio.sleep(pause)

    async def stream(self, after_seq: int = 0) -> AsyncGenerator[JobEvent, None]:
        """Every event after `after_seq` in order, live, ending with the terminal state."""
        async with aclosing(self._events(after_seq)) as events:
            async for ev in events:
                yield await decode_event(ev)

    async def interim_results(self, after_seq: int = 0) -> AsyncGenerator[Any, None]:
        """A program's published values in order, live, until the job ends.

        A late subscriber starts from the first one (events are durable);
        how the job ended is for `result()` to say. When a job was re-run
        because its executor vanished, the abandoned attempt's values are not
        the result's: a subscriber that starts after the job finished gets
        only the values of the attempt that produced the result, and a live
        one is warned (RuntimeWarning) when a new attempt starts over.
        """
        from qrelay.values import decode_value

        if await self.status() in _DONE_STATUSES:
            history = [ev async for ev in self._events(after_seq)]
            final = _final_attempt(history)
            for ev in history:
                if ev.WhichOneof("payload") == "interim" and (
                    not final or ev.attempt in (0, final)
                ):
                    yield decode_value(ev.interim.value_json)
            return
        attempt = 0
        published = 0
        async with aclosing(self._events(after_seq)) as events:
            async for ev in events:
                which = ev.WhichOneof("payload")
                if which == "state" and ev.state.state == types_pb2.JOB_STATE_RUNNING:
                    if published and ev.state.attempt != attempt:
                        warnings.warn(
                            f"job {self.job_id()} runs again (attempt {ev.state.attempt}) "
                            "after its executor was lost; the interim results before this "
                            f"came from attempt {attempt}, which was abandoned",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    attempt, published = ev.state.attempt, 0
                elif which == "interim":
                    published += 1
                    yield decode_value(ev.interim.value_json)

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - Qiskit's API
        """Wait for the job; its PrimitiveResult (or program value), else its error.

        A FAILED job raises the `qrelay.errors` class of its error code; a
        cancelled one raises `Cancelled`; `timeout` seconds without a final
        state raise `DeadlineExceeded` (the job keeps running).
        """
        result = await self._outcome(timeout)
        self._warn()
        return result

    def _warn(self, stacklevel: int = 4) -> None:
        """Warn (once) what Qiskit warned on the executor while running this job."""
        carried, self._warnings = self._warnings, {}
        job_warnings.reemit(carried, stacklevel)

    async def _outcome(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        if self._result is not _UNSET:
            return self._result
        if self._failure is not None:
            raise self._failure
        try:
            with anyio.fail_after(timeout):
                await self._await_final()
        except TimeoutError:
            raise DeadlineExceeded(
                f"job {self.job_id()} did not finish within {timeout:g} s; "
                "it keeps running (call result() again or cancel())"
            ) from None
        if self._failure is not None:
            raise self._failure
        return self._result

    async def _await_final(self) -> None:
        """Follow the job to its terminal event and store its outcome."""
        wire_result: types_pb2.JobResult | None = None
        wire_error: types_pb2.JobError | None = None
        final: types_pb2.StateChange | None = None
        async with aclosing(self._events(0)) as events:
            async for ev in events:
                which = ev.WhichOneof("payload")
                if which == "result":
                    wire_result = ev.result
                elif which == "error":
                    wire_error = ev.error
                elif which == "state" and ev.state.state in _FINAL_STATES:
                    final = ev.state
        if final is None:
            raise Internal(f"event stream of job {self.job_id()} ended without a final state")
        if final.state == types_pb2.JOB_STATE_DONE:
            if wire_result is None:
                conn = self._service.connection
                fetched: types_pb2.JobResult = await conn.unary(
                    conn.jobs.GetResult, jobs_pb2.GetResultRequest(job_id=self.job_id())
                )
                wire_result = fetched
            self._result = await decode_job_result(wire_result)
            metadata = getattr(self._result, "metadata", None)
            if isinstance(metadata, dict) and job_warnings.METADATA_KEY in metadata:
                self._warnings = {
                    job_warnings.METADATA_KEY: metadata.pop(job_warnings.METADATA_KEY)
                }
        elif final.state == types_pb2.JOB_STATE_FAILED:
            if wire_error is None:
                wire_error = (await self.refresh()).error
            self._failure = job_error(wire_error)
        else:
            why = f": {final.message}" if final.message else ""
            self._failure = Cancelled(f"job {self.job_id()} was cancelled{why}")

    async def logs(self) -> list[str]:
        """The job's log lines so far (stdout, stderr and ctx.log of programs)."""
        last_seq = (await self.refresh()).last_seq
        lines: list[str] = []
        if last_seq == 0:
            return lines
        async with aclosing(self._events(0)) as events:
            async for ev in events:
                if ev.WhichOneof("payload") == "log":
                    lines.append(ev.log.text)
                if ev.seq >= last_seq:
                    break
        return lines

    async def metrics(self) -> dict[str, Any]:
        """Timestamps, attempts, executor and queue position, like Runtime's job.metrics()."""
        job = await self.refresh()

        def ts(name: Literal["created_at", "started_at", "finished_at"]) -> datetime | None:
            return cast(datetime, getattr(job, name).ToDatetime()) if job.HasField(name) else None

        created, started, finished = ts("created_at"), ts("started_at"), ts("finished_at")
        return {
            "timestamps": {"created": created, "running": started, "finished": finished},
            "attempts": job.attempts,
            "executor_id": job.executor_id,
            "queue_position": job.queue_position,
            "num_pubs": job.num_pubs,
            "priority": job.priority,
            "usage": {
                # Executor-seconds charged to the tenant (Runtime's "seconds").
                "seconds": job.usage_seconds if finished else None,
                "wall_seconds": (finished - started).total_seconds()
                if finished and started
                else None,
            },
        }

    async def usage(self) -> float | None:
        """Executor-seconds of the job's final run (None until it ends), like
        qiskit-ibm-runtime's RuntimeJobV2.usage(): what the tenant's
        executor-seconds quota was charged for it."""
        job = await self.refresh()
        return job.usage_seconds if job.HasField("finished_at") else None


class RuntimeJob(BasePrimitiveJob[Any, JobStatus]):  # type: ignore[misc]
    """A submitted job (Qiskit's `BasePrimitiveJob`), usable from any thread.

    Each call runs the `AsyncRuntimeJob` core on the service's event-loop
    thread, so this works in scripts and inside a running loop (Jupyter).
    """

    def __init__(
        self, core: AsyncRuntimeJob, loop: LoopThread, service: QRelayService | None = None
    ) -> None:
        super().__init__(core.job_id())
        self._core = core
        self._loop = loop
        self._service = service

    @property
    def inputs(self) -> dict[str, Any]:
        """See `AsyncRuntimeJob.inputs`."""
        return self._core.inputs

    def backend(self) -> QRelayBackend:
        """The backend the job runs on, usable as a primitive's mode."""
        if self._service is not None:
            return self._service.backend(self.backend_name)
        return self._loop.call(self._core.backend)

    def error_message(self) -> str | None:
        """Why the job failed, None unless it did."""
        return self._loop.call(self._core.error_message)

    def wait_for_final_state(self, timeout: float | None = None) -> None:
        """Block until a final state, without raising the job's error; see the async core."""
        self._loop.call(self._core.wait_for_final_state, timeout)

    def __repr__(self) -> str:
        return f"<RuntimeJob {self.job_id()} backend={self.backend_name!r}>"

    @property
    def backend_name(self) -> str:
        return self._core.backend_name

    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def tags(self) -> dict[str, str]:
        return self._core.tags

    @property
    def creation_date(self) -> datetime | None:
        return self._core.creation_date

    def update_tags(
        self, new_tags: Mapping[str, str] | Iterable[str] | None = None
    ) -> dict[str, str]:
        """Replace the job's tags; see `AsyncRuntimeJob.update_tags`."""
        tags: dict[str, str] = self._loop.call(self._core.update_tags, new_tags)
        return tags

    def result(self, timeout: float | None = None) -> Any:
        """Block until the job finishes; see `AsyncRuntimeJob.result`."""
        result = self._loop.call(self._core._outcome, timeout)
        self._core._warn()  # in the caller's thread, pointing at its line
        return result

    def status(self) -> JobStatus:
        return self._loop.call(self._core.status)

    def done(self) -> bool:
        return self._loop.call(self._core.done)

    def running(self) -> bool:
        return self._loop.call(self._core.running)

    def cancelled(self) -> bool:
        return self._loop.call(self._core.cancelled)

    def in_final_state(self) -> bool:
        return self._loop.call(self._core.in_final_state)

    def cancel(self, reason: str = "") -> None:
        self._loop.call(self._core.cancel, reason)

    def stream(self, after_seq: int = 0) -> Iterator[JobEvent]:
        """Iterate the job's events live (see `AsyncRuntimeJob.stream`); break to stop."""
        return self._loop.iterate(self._core.stream(after_seq))

    def interim_results(self, after_seq: int = 0) -> Iterator[Any]:
        """A program's published values in order, live (see `AsyncRuntimeJob.interim_results`)."""
        return self._loop.iterate(self._core.interim_results(after_seq))

    def logs(self) -> list[str]:
        """The job's log lines so far (stdout, stderr and ctx.log of programs)."""
        return self._loop.call(self._core.logs)

    def metrics(self) -> dict[str, Any]:
        return self._loop.call(self._core.metrics)

    def usage(self) -> float | None:
        """Executor-seconds of the job's final run (None until it ends), like
        Runtime's RuntimeJobV2.usage()."""
        return self._loop.call(self._core.usage)


class EmptyJob(FinishedJob):
    """What `run([])` returns: nothing to run, so no job is sent; done at once, and
    its result is an empty PrimitiveResult, as Qiskit's reference primitives give."""

    def __init__(self, backend_name: str) -> None:
        super().__init__(f"empty-{uuid.uuid4().hex}", PrimitiveResult([], metadata={"version": 2}))
        self.backend_name = backend_name
        self.session_id = ""
        self.tags: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<EmptyJob {self.job_id()} backend={self.backend_name!r}>"


__all__ = [
    "AsyncRuntimeJob",
    "EmptyJob",
    "JobEvent",
    "RuntimeJob",
    "decode_event",
    "job_error",
    "job_status",
    "state_for_status",
]
