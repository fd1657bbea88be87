"""Entry points: `AsyncQRelayService` (the core) and `QRelayService` (sync facade).

Shaped like qiskit-ibm-runtime's `QiskitRuntimeService`: list backends, get
jobs, and hand primitives a mode to submit to. The sync service owns a
background event-loop thread (`_loop.LoopThread`) on which the async core
and its grpc.aio channel live, so it works the same from a plain script and
from inside a running loop such as a Jupyter kernel.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import grpc
from qiskit.providers import JobStatus

from qrelay._proto.v1 import backends_pb2, jobs_pb2, programs_pb2, sessions_pb2, types_pb2
from qrelay.client._connection import Connection, RetryPolicy, retryable
from qrelay.client._log import get_logger
from qrelay.client._loop import LoopThread
from qrelay.client._runstream import RunStreamMux
from qrelay.client.accounts import (
    Account,
    delete_account,
    resolve_account,
    save_account,
    saved_accounts,
)
from qrelay.client.backend import QRelayBackend
from qrelay.client.job import (
    AsyncRuntimeJob,
    EventCall,
    RuntimeJob,
    state_for_status,
    wire_tags,
)
from qrelay.client.programs import (
    PathLike,
    Program,
    RequirementsLike,
    SchemaLike,
    program_ref,
    upload_request,
)
from qrelay.client.session import AsyncBatch, AsyncSession
from qrelay.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    QRelayError,
    Unavailable,
)
from qrelay.limits import MAX_PAGE_SIZE as _MAX_PAGE
from qrelay.values import encode_value

if TYPE_CHECKING:
    from qrelay.client.modes import Session

log = get_logger(__name__)

#: Run streams one service keeps open for jobs nobody awaited yet; beyond
#: that, jobs are submitted with Submit and followed with Watch when awaited.
MAX_OPEN_RUNS = 64
# How long a closing sync service keeps its loop for gRPC's last completions.
_GRPC_SETTLE_S = 0.05
_KINDS = {
    "sampler": types_pb2.JOB_KIND_SAMPLER,
    "estimator": types_pb2.JOB_KIND_ESTIMATOR,
    "program": types_pb2.JOB_KIND_PROGRAM,
}

StateFilter: TypeAlias = JobStatus | str | Iterable[JobStatus | str] | None


def _encoded_inputs(inputs: Mapping[str, Any] | None) -> str:
    if inputs is None:
        return "{}"
    if not isinstance(inputs, Mapping):
        raise InvalidArgument(
            f"inputs must be a dict of keyword arguments, got {type(inputs).__name__}"
        )
    for key in inputs:
        if not isinstance(key, str) or not key.isidentifier():
            raise InvalidArgument(f"input names must be Python identifiers, got {key!r}")
    return encode_value(dict(inputs))


def usage_dict(usage: jobs_pb2.Usage) -> dict[str, Any]:
    """`GetUsage` as QiskitRuntimeService.usage() shapes it, plus qrelay's quotas."""
    quotas = usage.quotas
    limits: dict[str, Any] = {
        name: getattr(quotas, name) if quotas.HasField(name) else None  # type: ignore[arg-type]
        for name in (
            "max_queued_jobs",
            "max_running_jobs",
            "max_sessions",
            "max_program_bytes",
            "max_executor_seconds",
        )
    }
    budget = limits["max_executor_seconds"]
    used = usage.executor_seconds
    return {
        "period": {
            "start": usage.period_start.ToDatetime(),
            "end": usage.period_end.ToDatetime(),
        },
        "usage_consumed_seconds": used,
        "usage_limit_seconds": budget,
        "usage_remaining_seconds": None if budget is None else max(budget - used, 0.0),
        "usage_limit_reached": budget is not None and used >= budget,
        "queued_jobs": usage.queued_jobs,
        "running_jobs": usage.running_jobs,
        "open_sessions": usage.open_sessions,
        "program_bytes": usage.program_bytes,
        "quotas": limits,
    }


def program_spec(
    program: Program | str,
    inputs: Mapping[str, Any] | None,
    backend: str,
    session_id: str,
    tags: Mapping[str, str] | Iterable[str] | None,
    priority: int = 0,
) -> types_pb2.JobSpec:
    """Validate and encode a program run; raises InvalidArgument, sends nothing."""
    if not backend:
        raise InvalidArgument(
            "run needs a backend: pass backend='aer' (or a QRelayBackend) or mode=Session(...)"
        )
    return types_pb2.JobSpec(
        backend=backend,
        program=types_pb2.ProgramTask(
            program=program_ref(program), inputs_json=_encoded_inputs(inputs)
        ),
        session_id=session_id,
        tags=wire_tags(tags),
        priority=priority,
    )


def _run_backend(backend: str | QRelayBackend | None, mode_backend: str | None) -> str:
    name = backend.name if isinstance(backend, QRelayBackend) else (backend or "")
    if mode_backend is not None:
        if name and name != mode_backend:
            raise InvalidArgument(
                f"backend {name!r} differs from the backend {mode_backend!r} of mode=; "
                "pass one of them"
            )
        return mode_backend
    return name


def _tag_keys(tags: Iterable[str] | None) -> list[str]:
    """ListJobs' tag filter: tag keys (a str alone is one key, not its characters)."""
    if tags is None:
        return []
    keys = [tags] if isinstance(tags, str) else list(tags)
    for key in keys:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"tags to filter by must be non-empty str, got {key!r}")
    return keys


def _either_tags(
    tags: Iterable[str] | None, job_tags: Iterable[str] | None
) -> Iterable[str] | None:
    if tags is not None and job_tags is not None:
        raise InvalidArgument("pass tags or job_tags (Runtime's name for it), not both")
    return tags if tags is not None else job_tags


def _states(state: StateFilter) -> list[types_pb2.JobState.ValueType]:
    if state is None:
        return []
    items = [state] if isinstance(state, JobStatus | str) else list(state)
    try:
        return [state_for_status(s) for s in items]
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class AsyncQRelayService:
    """Async client of one qrelay broker. Create it inside the loop that will use it.

    `token` travels as `authorization: Bearer <token>`; `timeout` bounds
    every unary call including its UNAVAILABLE retries.

    TLS: an address `grpcs://host:port`, `tls=True` or a CA file dials with
    TLS, verifying the broker's certificate against `tls_ca` (else the system
    roots); `tls_cert`/`tls_key` present a client certificate to a broker
    that requires one; `tls_server_name` is the name the certificate must
    carry when it differs from the host dialled. Unset, they come from
    QRELAY_TLS, QRELAY_TLS_CA, QRELAY_TLS_CLIENT_CERT, QRELAY_TLS_CLIENT_KEY
    and QRELAY_TLS_SERVER_NAME. A certificate the client does not trust
    fails at the first call with `Unavailable` saying so.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        name: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        tls: bool | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be > 0 seconds, got {timeout}")
        self.connection = Connection.to(
            address,
            token,
            name=name,
            timeout=timeout,
            retry=retry,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
        )
        self._open_runs = 0
        # Every submit-and-follow shares one RunStream (Run on brokers without it).
        self._runs = RunStreamMux(self.connection)

    def __repr__(self) -> str:
        return f"<AsyncQRelayService {self.connection.address}>"

    @property
    def address(self) -> str:
        return self.connection.address

    async def __aenter__(self) -> AsyncQRelayService:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still in flight are cancelled. Idempotent."""
        await self._runs.aclose()
        await self.connection.close()

    async def _backend_protos(self) -> list[backends_pb2.Backend]:
        conn = self.connection
        resp = await conn.unary(conn.backends.List, backends_pb2.ListBackendsRequest())
        return list(resp.backends)

    async def _backend_proto(self, name: str) -> backends_pb2.Backend:
        if not name:
            raise InvalidArgument("backend name must not be empty")
        conn = self.connection
        return await conn.unary(conn.backends.Get, backends_pb2.GetBackendRequest(name=name))

    async def backends(self) -> list[QRelayBackend]:
        """Every backend an executor has announced, online or not."""
        return [QRelayBackend(p) for p in await self._backend_protos()]

    async def backend(self, name: str) -> QRelayBackend:
        """One backend by name; `NotFound` for a name no executor ever announced."""
        return QRelayBackend(await self._backend_proto(name))

    async def least_busy(
        self, min_num_qubits: int | None = None, *, simulator: bool | None = None
    ) -> QRelayBackend:
        """The online backend with the fewest queued jobs (ties: the smaller one, then by
        name) among those with at least `min_num_qubits` qubits, as Runtime's least_busy."""
        return _least_busy(
            [QRelayBackend(p) for p in await self._backend_protos()], min_num_qubits, simulator
        )

    async def job(self, job_id: str) -> AsyncRuntimeJob:
        """A handle on an existing job; `NotFound` if it is not the caller's."""
        if not job_id:
            raise InvalidArgument("job_id must not be empty")
        conn = self.connection
        job = await conn.unary(conn.jobs.Get, jobs_pb2.GetJobRequest(job_id=job_id))
        return AsyncRuntimeJob(self, job)

    async def _job_protos(
        self,
        limit: int,
        state: StateFilter,
        backend: str | QRelayBackend | None,
        session_id: str | None,
        tags: Iterable[str] | None = None,
    ) -> list[jobs_pb2.Job]:
        if limit < 0:
            raise InvalidArgument(f"limit must be >= 0, got {limit}")
        backend_name = backend.name if isinstance(backend, QRelayBackend) else (backend or "")
        request = jobs_pb2.ListJobsRequest(
            states=_states(state),
            backend=backend_name,
            session_id=session_id or "",
            tags=_tag_keys(tags),
        )
        conn = self.connection
        found: list[jobs_pb2.Job] = []
        while len(found) < limit:
            request.page_size = min(limit - len(found), _MAX_PAGE)
            page = await conn.unary(conn.jobs.List, request)
            found.extend(page.jobs)
            if not page.next_page_token or not page.jobs:
                break
            request.page_token = page.next_page_token
        return found[:limit]

    async def jobs(
        self,
        limit: int = 10,
        *,
        state: StateFilter = None,
        backend: str | QRelayBackend | None = None,
        session_id: str | None = None,
        tags: Iterable[str] | None = None,
        job_tags: Iterable[str] | None = None,
    ) -> list[AsyncRuntimeJob]:
        """The caller's newest jobs first, optionally only some states/backend/session/tags.

        `state` takes `JobStatus` values or names ("queued", "failed"/"error",
        ...), one or several. `tags` (or Runtime's name, `job_tags`): only jobs
        carrying every one of these tag keys.
        """
        found = await self._job_protos(
            limit, state, backend, session_id, _either_tags(tags, job_tags)
        )
        return [AsyncRuntimeJob(self, j) for j in found]

    async def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its events and result, as Runtime's delete_job.

        A queued or running job raises `FailedPrecondition` (cancel it first);
        another tenant's job, or a missing one, `NotFound`."""
        if not job_id:
            raise InvalidArgument("job_id must not be empty")
        conn = self.connection
        await conn.unary(conn.jobs.Delete, jobs_pb2.DeleteJobRequest(job_id=job_id))
        log.info("job.deleted", job_id=job_id)

    async def _submit_proto(self, spec: types_pb2.JobSpec, idempotency_key: str) -> jobs_pb2.Job:
        conn = self.connection
        job: jobs_pb2.Job = await conn.unary(
            conn.jobs.Submit, jobs_pb2.SubmitRequest(spec=spec, idempotency_key=idempotency_key)
        )
        log.info("job.submitted", job_id=job.id, backend=job.backend, kind=job.kind)
        return job

    async def submit_and_follow(
        self, spec: types_pb2.JobSpec, *, idempotency_key: str | None = None
    ) -> AsyncRuntimeJob:
        """Submit a job spec and keep following its events (`JobService.RunStream`).

        Returns once the job is stored (its first event names it), like
        `submit`; `result()` then reads the same events, so submit-and-wait
        costs one round trip instead of two, and all jobs share the service's
        one RunStream (a broker without it gets one `Run` call per job).
        Retried on UNAVAILABLE before the first event under one idempotency
        key. With `MAX_OPEN_RUNS` jobs already followed (jobs nobody has
        awaited yet) it falls back to `submit`.
        """
        key = idempotency_key or uuid.uuid4().hex
        if self._open_runs >= MAX_OPEN_RUNS:
            return await self.submit(spec, idempotency_key=key)
        conn = self.connection
        request = jobs_pb2.SubmitRequest(spec=spec, idempotency_key=key)
        deadline = time.monotonic() + conn.timeout
        attempt = 0
        while True:
            attempt += 1
            on_stream = self._runs.supported
            call: EventCall = await self._runs.start(request) if on_stream else conn.run(request)
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
                    first = await call.read()
                if first is grpc.aio.EOF and on_stream:
                    raise Unavailable("the RunStream ended before the job's first event")
            except TimeoutError:
                call.cancel()
                raise DeadlineExceeded(
                    f"broker at {conn.address} did not accept the job within {conn.timeout:g} s"
                ) from None
            except (grpc.aio.AioRpcError, QRelayError) as exc:
                call.cancel()
                if on_stream and not self._runs.supported:
                    attempt -= 1  # an older broker: the same job again, by Run
                    continue
                error = conn.error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
                pause = conn.retry.backoff(attempt)
                if (
                    not retryable(error)
                    or attempt >= conn.retry.max_attempts
                    or time.monotonic() + pause >= deadline
                ):
                    raise error from None
                await anyio.sleep(pause)
                continue
            if first is grpc.aio.EOF or not first.job_id:
                call.cancel()
                raise Internal(f"broker at {conn.address} ended Run before naming the job")
            break
        self._open_runs += 1
        call.add_done_callback(self._run_closed)
        job = jobs_pb2.Job(
            id=first.job_id,
            backend=spec.backend,
            kind=_KINDS.get(spec.WhichOneof("work") or "", types_pb2.JOB_KIND_UNSPECIFIED),
            state=first.state.state,
            session_id=spec.session_id,
            last_seq=first.seq,
            tags=dict(spec.tags),
            idempotency_key=key,
        )
        job.created_at.CopyFrom(first.time)
        log.info("job.submitted", job_id=job.id, backend=job.backend, kind=job.kind, via="run")
        return AsyncRuntimeJob(self, job, run_stream=(first, call), spec=spec)

    def _run_closed(self, _call: object) -> None:
        self._open_runs -= 1

    async def submit(
        self, spec: types_pb2.JobSpec, *, idempotency_key: str | None = None
    ) -> AsyncRuntimeJob:
        """Submit a job spec; retried on UNAVAILABLE under one idempotency key.

        Without `idempotency_key` a fresh one is generated, so retries after a
        lost response never create a second job.
        """
        key = idempotency_key or uuid.uuid4().hex
        return AsyncRuntimeJob(self, await self._submit_proto(spec, key), spec=spec)

    # -- programs ----------------------------------------------------------------

    async def upload_program(
        self,
        path: PathLike,
        name: str | None = None,
        entry_point: str = "main:main",
        requirements: RequirementsLike = None,
        input_schema: SchemaLike = None,
        description: str = "",
    ) -> Program:
        """Pack the directory `path` and store it; the same content returns the same version.

        `name` defaults to the directory's name; `requirements` is a list of
        pip lines or a requirements.txt path; `input_schema` a JSON Schema
        dict or .json path. Checked locally first (`InvalidArgument`); a
        program over the broker's size limit raises `ResourceExhausted`.
        """
        request = await anyio.to_thread.run_sync(
            lambda: upload_request(
                path,
                name=name,
                entry_point=entry_point,
                requirements=requirements,
                input_schema=input_schema,
                description=description,
            )
        )
        conn = self.connection
        proto: programs_pb2.Program = await conn.unary(conn.programs.Upload, request)
        log.info("program.uploaded", program_id=proto.id, name=proto.name, version=proto.version)
        return Program.from_proto(proto)

    async def programs(self, name: str | None = None) -> list[Program]:
        """The newest version of each of your programs, or every version of `name`."""
        conn = self.connection
        request = programs_pb2.ListProgramsRequest(name=name or "")
        resp: programs_pb2.ListProgramsResponse = await conn.unary(conn.programs.List, request)
        return [Program.from_proto(p) for p in resp.programs]

    async def program(self, id_or_name: str) -> Program:
        """One program by id, or the newest version of a name; `NotFound` otherwise."""
        conn = self.connection
        request = programs_pb2.GetProgramRequest(program=program_ref(id_or_name))
        return Program.from_proto(await conn.unary(conn.programs.Get, request))

    async def delete_program(self, id_or_name: Program | str) -> int:
        """Delete one version (by id or `Program`) or every version of a name; how many."""
        conn = self.connection
        request = programs_pb2.DeleteProgramRequest(program=program_ref(id_or_name))
        resp: programs_pb2.DeleteProgramResponse = await conn.unary(conn.programs.Delete, request)
        log.info("program.deleted", program=request.program, versions=resp.deleted)
        return resp.deleted

    async def run(
        self,
        program: Program | str,
        inputs: Mapping[str, Any] | None = None,
        *,
        backend: str | QRelayBackend | None = None,
        mode: AsyncSession | None = None,
        tags: Mapping[str, str] | Iterable[str] | None = None,
        priority: int = 0,
    ) -> AsyncRuntimeJob:
        """Run a program beside `backend` (or in `mode`, a session or batch).

        `inputs` become the entry point's keyword arguments (qrelay value
        encoding: JSON types, numpy arrays, Qiskit circuits and operators).
        `result()` is the entry point's return value; interim values arrive
        through `interim_results()` and `stream()`. `priority` (-10 to 10,
        higher first) orders it among the tenant's own queued jobs only.
        """
        if mode is not None and not isinstance(mode, AsyncSession):
            raise InvalidArgument(
                f"mode must be an AsyncSession or AsyncBatch, got {type(mode).__name__}"
            )
        target = _run_backend(backend, mode.backend_name if mode else None)
        spec = program_spec(
            program, inputs, target, mode.session_id if mode else "", tags, priority
        )
        return await self.submit(spec)

    async def usage(self) -> dict[str, Any]:
        """The tenant's use in the current quota period and its quotas, like
        QiskitRuntimeService.usage(): "usage_consumed_seconds" (executor-
        seconds), "usage_limit_seconds", "usage_remaining_seconds",
        "usage_limit_reached", "period" {"start", "end"}, plus the counts the
        other quotas limit and "quotas" (each limit, None for none)."""
        conn = self.connection
        reply: jobs_pb2.Usage = await conn.unary(conn.jobs.GetUsage, jobs_pb2.GetUsageRequest())
        return usage_dict(reply)

    # -- sessions ----------------------------------------------------------------

    async def create_session(
        self,
        backend: str | QRelayBackend,
        max_time: int | float | str | None = None,
        *,
        max_idle: int | float | str | None = None,
        batch: bool = False,
    ) -> AsyncSession:
        """Open a session (or with `batch=True` a batch) on `backend`."""
        cls = AsyncBatch if batch else AsyncSession
        return await cls(self, backend, max_time, max_idle=max_idle).open()

    async def session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session or batch; `NotFound` if it is not yours."""
        if not session_id:
            raise InvalidArgument("session_id must not be empty")
        conn = self.connection
        request = sessions_pb2.GetSessionRequest(session_id=session_id)
        return AsyncSession._attached(self, await conn.unary(conn.sessions.Get, request))


def _least_busy(
    backends: list[QRelayBackend], min_num_qubits: int | None, simulator: bool | None
) -> QRelayBackend:
    fits = [
        b
        for b in backends
        if b.online
        and (min_num_qubits is None or b.num_qubits >= min_num_qubits)
        and (simulator is None or b.simulator == simulator)
    ]
    if not fits:
        wanted = f" with at least {min_num_qubits} qubits" if min_num_qubits else ""
        raise NotFound(
            f"no online backend{wanted} ({len(backends)} known, "
            f"{sum(b.online for b in backends)} online)"
        )
    return min(fits, key=lambda b: (b.queue_length, b.num_qubits, b.name))


async def _open(
    account: Account,
    timeout: float,  # noqa: ASYNC109 - passed on
    tls: dict[str, Any],
) -> AsyncQRelayService:
    return AsyncQRelayService(account.broker, account.token, timeout=timeout, **tls)


#: The services of the enclosing `with QRelayService(...)` blocks, innermost last:
#: `Sampler(mode="name")` and `Session(backend="name")` use the innermost.
_entered: ContextVar[tuple[QRelayService, ...]] = ContextVar("qrelay_services", default=())


def current_service() -> QRelayService | None:
    """The service of the innermost enclosing `with QRelayService(...)` block, if open."""
    for service in reversed(_entered.get()):
        if not service.closed:
            return service
    return None


async def _close_settled(core: AsyncQRelayService) -> None:
    """Close the channel, then let gRPC deliver what that set off while the loop runs.

    Cancelled calls and the channel's teardown complete on gRPC's poller
    thread, which hands each completion to the loop that started the call; a
    sync service's loop that stops first gets "Event loop is closed" raised in
    whichever loop polls next (measured with the demo's examples run back to
    back: 4-8 such tracebacks per 3 rounds before, none after).
    """
    await core.close()
    await asyncio.sleep(_GRPC_SETTLE_S)


def _shutdown(loop: LoopThread, core: AsyncQRelayService) -> None:
    """Close the channel and stop the loop thread; run by close(), GC or atexit."""
    loop.stop(before=functools.partial(_close_settled, core))


class QRelayService:
    """Blocking client of one qrelay broker, like qiskit-ibm-runtime's `QiskitRuntimeService`.

    Safe to use from any thread, including one whose event loop is running.
    Use as a context manager or call `close()`; a forgotten service is closed
    when garbage-collected or at interpreter exit.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        name: str | None = None,
        timeout: float = 30.0,
        tls: bool | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """Connect to `address` with `token`; without an address, to the account `name`,
        else QRELAY_BROKER, else the default saved account (`save_account`). QRELAY_TOKEN
        is the default token. TLS as `AsyncQRelayService`: `grpcs://host:port`,
        `tls=True` or `tls_ca=` (QRELAY_TLS_CA)."""
        account = resolve_account(address, token, name)
        transport: dict[str, Any] = {
            "tls": tls,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_server_name": tls_server_name,
        }
        self._loop = LoopThread(name=f"qrelay-client-{account.broker}")
        try:
            self._core: AsyncQRelayService = self._loop.call(_open, account, timeout, transport)
        except BaseException:
            self._loop.stop()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._core)
        self._entered: list[Token[tuple[QRelayService, ...]]] = []

    save_account = staticmethod(save_account)
    saved_accounts = staticmethod(saved_accounts)
    delete_account = staticmethod(delete_account)

    def __repr__(self) -> str:
        return f"<QRelayService {self.address}>"

    @property
    def address(self) -> str:
        return self._core.address

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> QRelayService:
        self._entered.append(_entered.set((*_entered.get(), self)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entered:
            token = self._entered.pop()
            try:
                _entered.reset(token)
            except ValueError:  # entered in another context (thread): just leave this one
                _entered.set(tuple(s for s in _entered.get() if s is not self))
        self.close()

    def close(self) -> None:
        """Close the channel and stop the background loop thread. Idempotent."""
        self._finalizer()

    def backends(self) -> list[QRelayBackend]:
        """Every backend an executor has announced, online or not."""
        return [QRelayBackend(p, self) for p in self._loop.call(self._core._backend_protos)]

    def backend(self, name: str) -> QRelayBackend:
        """One backend by name; `NotFound` for a name no executor ever announced."""
        return QRelayBackend(self._backend_proto(name), self)

    def _backend_proto(self, name: str) -> backends_pb2.Backend:
        return self._loop.call(self._core._backend_proto, name)

    def least_busy(
        self, min_num_qubits: int | None = None, *, simulator: bool | None = None
    ) -> QRelayBackend:
        """The online backend with the fewest queued jobs; see `AsyncQRelayService`."""
        backends = [QRelayBackend(p, self) for p in self._loop.call(self._core._backend_protos)]
        return _least_busy(backends, min_num_qubits, simulator)

    def job(self, job_id: str) -> RuntimeJob:
        """A handle on an existing job; `NotFound` if it is not the caller's."""
        return RuntimeJob(self._loop.call(self._core.job, job_id), self._loop, self)

    def jobs(
        self,
        limit: int = 10,
        *,
        state: StateFilter = None,
        backend: str | QRelayBackend | None = None,
        session_id: str | None = None,
        tags: Iterable[str] | None = None,
        job_tags: Iterable[str] | None = None,
    ) -> list[RuntimeJob]:
        """The caller's newest jobs first; filters as in `AsyncQRelayService.jobs`."""

        async def fetch() -> list[AsyncRuntimeJob]:
            return await self._core.jobs(
                limit,
                state=state,
                backend=backend,
                session_id=session_id,
                tags=tags,
                job_tags=job_tags,
            )

        return [RuntimeJob(core, self._loop, self) for core in self._loop.call(fetch)]

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job; see `AsyncQRelayService.delete_job`."""
        self._loop.call(self._core.delete_job, job_id)

    def submit(self, spec: types_pb2.JobSpec, *, idempotency_key: str | None = None) -> RuntimeJob:
        """Submit a raw job spec (the primitives build one for you)."""

        async def send() -> AsyncRuntimeJob:
            return await self._core.submit(spec, idempotency_key=idempotency_key)

        return RuntimeJob(self._loop.call(send), self._loop, self)

    def submit_and_follow(
        self, spec: types_pb2.JobSpec, *, idempotency_key: str | None = None
    ) -> RuntimeJob:
        """Submit a raw job spec on one call that also follows it (JobService.Run).

        See `AsyncQRelayService.submit_and_follow`."""

        async def send() -> AsyncRuntimeJob:
            return await self._core.submit_and_follow(spec, idempotency_key=idempotency_key)

        return RuntimeJob(self._loop.call(send), self._loop, self)

    # -- programs ----------------------------------------------------------------

    def upload_program(
        self,
        path: PathLike,
        name: str | None = None,
        entry_point: str = "main:main",
        requirements: RequirementsLike = None,
        input_schema: SchemaLike = None,
        description: str = "",
    ) -> Program:
        """Pack and store a program directory; see `AsyncQRelayService.upload_program`."""

        async def send() -> Program:
            return await self._core.upload_program(
                path, name, entry_point, requirements, input_schema, description
            )

        return self._loop.call(send)

    def programs(self, name: str | None = None) -> list[Program]:
        """The newest version of each of your programs, or every version of `name`."""
        return self._loop.call(self._core.programs, name)

    def program(self, id_or_name: str) -> Program:
        """One program by id, or the newest version of a name; `NotFound` otherwise."""
        return self._loop.call(self._core.program, id_or_name)

    def delete_program(self, id_or_name: Program | str) -> int:
        """Delete one version or every version of a name; returns how many."""
        deleted: int = self._loop.call(self._core.delete_program, id_or_name)
        return deleted

    def run(
        self,
        program: Program | str,
        inputs: Mapping[str, Any] | None = None,
        *,
        backend: str | QRelayBackend | None = None,
        mode: Session | None = None,
        tags: Mapping[str, str] | Iterable[str] | None = None,
        priority: int = 0,
    ) -> RuntimeJob:
        """Run a program beside `backend` or in `mode` (a `Session` or `Batch`).

        `result()` is the entry point's return value; `interim_results()`
        yields what it publishes, live; `logs()` its output.
        """
        session_id, mode_backend = "", None
        if mode is not None:
            target = getattr(mode, "_qrelay_target", None)
            if target is None or isinstance(mode, QRelayBackend):
                raise InvalidArgument(f"mode must be a Session or Batch, got {type(mode).__name__}")
            chosen = target()
            session_id, mode_backend = chosen.session_id, chosen.backend.name
        spec = program_spec(
            program, inputs, _run_backend(backend, mode_backend), session_id, tags, priority
        )
        return self.submit(spec)

    def usage(self) -> dict[str, Any]:
        """The tenant's usage in the current period and its quotas (see the async `usage`)."""
        report: dict[str, Any] = self._loop.call(self._core.usage)
        return report

    def run_async(self, func: Any, *args: Any) -> Any:
        """Run `await func(*args)` on the service's loop (for code built on the async core)."""
        return self._loop.call(func, *args)

    @property
    def async_service(self) -> AsyncQRelayService:
        """The async core; only usable from coroutines run through `run_async`."""
        return self._core
