"""Entry points: `AsyncQRelayService` (the core) and `QRelayService` (sync facade).

Shaped like qiskit-ibm-runtime's `QiskitRuntimeService`: list backends, get
jobs, and hand primitives a mode to submit to. The sync service owns a
background event-loop thread (`_loop.LoopThread`) on which the async core
and its grpc.aio channel live, so it works the same from a plain script and
from inside a running loop such as a Jupyter kernel.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TypeAlias

import structlog
from qiskit.providers import JobStatus

from qrelay._proto.v1 import backends_pb2, jobs_pb2, types_pb2
from qrelay.client._connection import Connection, RetryPolicy
from qrelay.client._loop import LoopThread
from qrelay.client.backend import QRelayBackend
from qrelay.client.job import AsyncRuntimeJob, RuntimeJob, state_for_status
from qrelay.errors import InvalidArgument

log = structlog.get_logger(__name__)

#: The broker answers at most this many jobs per List page.
_MAX_PAGE = 1000

StateFilter: TypeAlias = JobStatus | str | Iterable[JobStatus | str] | None


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
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be > 0 seconds, got {timeout}")
        self.connection = Connection(address, token, timeout=timeout, retry=retry or RetryPolicy())

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
    ) -> list[jobs_pb2.Job]:
        if limit < 0:
            raise InvalidArgument(f"limit must be >= 0, got {limit}")
        backend_name = backend.name if isinstance(backend, QRelayBackend) else (backend or "")
        request = jobs_pb2.ListJobsRequest(
            states=_states(state), backend=backend_name, session_id=session_id or ""
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
    ) -> list[AsyncRuntimeJob]:
        """The caller's newest jobs first, optionally only some states/backend/session.

        `state` takes `JobStatus` values or names ("queued", "failed"/"error",
        ...), one or several.
        """
        found = await self._job_protos(limit, state, backend, session_id)
        return [AsyncRuntimeJob(self, j) for j in found]

    async def _submit_proto(self, spec: types_pb2.JobSpec, idempotency_key: str) -> jobs_pb2.Job:
        conn = self.connection
        job: jobs_pb2.Job = await conn.unary(
            conn.jobs.Submit, jobs_pb2.SubmitRequest(spec=spec, idempotency_key=idempotency_key)
        )
        log.info("job.submitted", job_id=job.id, backend=job.backend, kind=job.kind)
        return job

    async def submit(
        self, spec: types_pb2.JobSpec, *, idempotency_key: str | None = None
    ) -> AsyncRuntimeJob:
        """Submit a job spec; retried on UNAVAILABLE under one idempotency key.

        Without `idempotency_key` a fresh one is generated, so retries after a
        lost response never create a second job.
        """
        key = idempotency_key or uuid.uuid4().hex
        return AsyncRuntimeJob(self, await self._submit_proto(spec, key))


async def _open(
    address: str,
    token: str | None,
    timeout: float,  # noqa: ASYNC109 - passed on
) -> AsyncQRelayService:
    return AsyncQRelayService(address, token, timeout=timeout)


def _shutdown(loop: LoopThread, core: AsyncQRelayService) -> None:
    """Close the channel and stop the loop thread; run by close(), GC or atexit."""
    loop.stop(before=core.close)


class QRelayService:
    """Blocking client of one qrelay broker, like qiskit-ibm-runtime's `QiskitRuntimeService`.

    Safe to use from any thread, including one whose event loop is running.
    Use as a context manager or call `close()`; a forgotten service is closed
    when garbage-collected or at interpreter exit.
    """

    def __init__(self, address: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        self._loop = LoopThread(name=f"qrelay-client-{address}")
        try:
            self._core: AsyncQRelayService = self._loop.call(_open, address, token, timeout)
        except BaseException:
            self._loop.stop()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._core)

    def __repr__(self) -> str:
        return f"<QRelayService {self.address}>"

    @property
    def address(self) -> str:
        return self._core.address

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> QRelayService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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

    def job(self, job_id: str) -> RuntimeJob:
        """A handle on an existing job; `NotFound` if it is not the caller's."""
        return RuntimeJob(self._loop.call(self._core.job, job_id), self._loop)

    def jobs(
        self,
        limit: int = 10,
        *,
        state: StateFilter = None,
        backend: str | QRelayBackend | None = None,
        session_id: str | None = None,
    ) -> list[RuntimeJob]:
        """The caller's newest jobs first; filters as in `AsyncQRelayService.jobs`."""

        async def fetch() -> list[AsyncRuntimeJob]:
            return await self._core.jobs(limit, state=state, backend=backend, session_id=session_id)

        return [RuntimeJob(core, self._loop) for core in self._loop.call(fetch)]

    def submit(self, spec: types_pb2.JobSpec, *, idempotency_key: str | None = None) -> RuntimeJob:
        """Submit a raw job spec (the primitives build one for you)."""

        async def send() -> AsyncRuntimeJob:
            return await self._core.submit(spec, idempotency_key=idempotency_key)

        return RuntimeJob(self._loop.call(send), self._loop)

    def run_async(self, func: Any, *args: Any) -> Any:
        """Run `await func(*args)` on the service's loop (for code built on the async core)."""
        return self._loop.call(func, *args)

    @property
    def async_service(self) -> AsyncQRelayService:
        """The async core; only usable from coroutines run through `run_async`."""
        return self._core
