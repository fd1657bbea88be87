"""The CLI's calls to a broker: wire messages over the SDK's `Connection`, without Qiskit.

The commands that only talk to a broker (`backends`, `jobs ...`, `sessions
...`, `programs list|show|delete`) print what the broker says, so they need
its messages, not Qiskit objects: this module returns protobuf messages and
never imports `qrelay.client.service`, `qrelay.client.job` or `qrelay.codec`
(each pulls in Qiskit, ~1 s of CPU per command). The channel, the bearer
token, the deadline, the UNAVAILABLE retries and the status -> exception
mapping are the SDK's own (`qrelay.client._connection`), so both speak to a
broker the same way. Results are summarised from the wire by
`qrelay.cli._results`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import grpc

from qrelay._proto.v1 import (
    backends_pb2,
    jobs_pb2,
    programs_pb2,
    sessions_pb2,
    types_pb2,
)
from qrelay.client._connection import Connection, is_resumable
from qrelay.client.session import duration_seconds
from qrelay.errors import Unavailable
from qrelay.limits import MAX_PAGE_SIZE
from qrelay.rpc import error_from_rpc
from qrelay.tls import HandshakeFailed

FINAL_STATES = frozenset(
    {types_pb2.JOB_STATE_DONE, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED}
)


class Unreachable(Unavailable):
    """No broker answered at the address the CLI was given."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            f"no broker answers at {address} ({reason}); start one with `qrelay dev`, "
            "or point --broker (env QRELAY_BROKER) at yours"
        )
        self.address = address


#: What gRPC says when no connection could be made (as opposed to a broker that
#: answered UNAVAILABLE itself, e.g. because its database is down).
_NO_CONNECTION = (
    "failed to connect to all addresses",
    "DNS resolution failed",
    "Connection refused",
    "No route to host",
    "Name or service not known",
)


def _reason(message: str) -> str:
    """'Connection refused' out of gRPC's 'failed to connect to all addresses; ...: Connection
    refused' (the whole text when it has no such tail)."""
    tail = message.rsplit(": ", 1)[-1].strip()
    return tail or message


def is_terminal(event: types_pb2.JobEvent) -> bool:
    return event.WhichOneof("payload") == "state" and event.state.state in FINAL_STATES


class Broker:
    """One connection to a broker for one CLI command; `async with` closes it."""

    def __init__(
        self,
        address: str | None,
        token: str | None,
        *,
        timeout: float = 15.0,
        tls_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`tls_options`: AsyncQRelayService's TLS keywords (tls, tls_ca, tls_cert, ...)."""
        self.connection = Connection.to(address, token, timeout=timeout, **(tls_options or {}))
        self.address = self.connection.address

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.connection.close()

    async def _call(self, method: object, request: object) -> object:
        try:
            return await self.connection.unary(method, request)  # type: ignore[arg-type]
        except HandshakeFailed:
            raise  # it already says what went wrong with TLS
        except Unavailable as exc:
            if "Socket closed" in exc.message and self.connection.tls is None:
                raise Unavailable(
                    f"the server at {self.address} closed the connection at once: if it "
                    f"serves TLS, use --broker grpcs://{self.address} or qrelay --tls-ca FILE"
                ) from None
            if any(sign in exc.message for sign in _NO_CONNECTION):
                raise Unreachable(self.address, _reason(exc.message)) from None
            raise

    # --- backends -------------------------------------------------------------
    async def backends(self) -> list[backends_pb2.Backend]:
        conn = self.connection
        resp = await self._call(conn.backends.List, backends_pb2.ListBackendsRequest())
        assert isinstance(resp, backends_pb2.ListBackendsResponse)
        return list(resp.backends)

    # --- usage ----------------------------------------------------------------
    async def usage(self) -> jobs_pb2.Usage:
        conn = self.connection
        resp = await self._call(conn.jobs.GetUsage, jobs_pb2.GetUsageRequest())
        assert isinstance(resp, jobs_pb2.Usage)
        return resp

    # --- jobs -----------------------------------------------------------------
    async def jobs(
        self,
        limit: int,
        *,
        states: Sequence[types_pb2.JobState.ValueType] = (),
        backend: str = "",
        session_id: str = "",
        program: str = "",
        tags: Sequence[str] = (),
    ) -> list[jobs_pb2.Job]:
        """The caller's newest jobs first, page after page until `limit`."""
        request = jobs_pb2.ListJobsRequest(
            states=states, backend=backend, session_id=session_id, program=program, tags=tags
        )
        found: list[jobs_pb2.Job] = []
        while len(found) < limit:
            request.page_size = min(limit - len(found), MAX_PAGE_SIZE)
            page = await self._call(self.connection.jobs.List, request)
            assert isinstance(page, jobs_pb2.ListJobsResponse)
            found.extend(page.jobs)
            if not page.next_page_token or not page.jobs:
                break
            request.page_token = page.next_page_token
        return found[:limit]

    async def job(self, job_id: str) -> jobs_pb2.Job:
        job = await self._call(self.connection.jobs.Get, jobs_pb2.GetJobRequest(job_id=job_id))
        assert isinstance(job, jobs_pb2.Job)
        return job

    async def delete_job(self, job_id: str) -> jobs_pb2.Job:
        """Delete a finished job; returns it as it was."""
        request = jobs_pb2.DeleteJobRequest(job_id=job_id)
        reply = await self._call(self.connection.jobs.Delete, request)
        assert isinstance(reply, jobs_pb2.DeleteJobResponse)
        return reply.job

    async def cancel(self, job_id: str, reason: str) -> jobs_pb2.Job:
        request = jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        job = await self._call(self.connection.jobs.Cancel, request)
        assert isinstance(job, jobs_pb2.Job)
        return job

    async def result(self, job_id: str) -> types_pb2.JobResult:
        request = jobs_pb2.GetResultRequest(job_id=job_id)
        result = await self._call(self.connection.jobs.GetResult, request)
        assert isinstance(result, types_pb2.JobResult)
        return result

    async def events(
        self, job_id: str, after_seq: int = 0, *, until_seq: int | None = None
    ) -> AsyncGenerator[types_pb2.JobEvent, None]:
        """The job's events after `after_seq` in order, live, to the terminal one (or to
        `until_seq`), resuming a dropped stream where it left off (for up to the timeout)."""
        conn = self.connection
        last = after_seq
        stalled_since: float | None = None
        failures = 0
        while until_seq is None or last < until_seq:
            call = conn.watch(job_id, last)
            try:
                async for event in call:
                    if event.seq <= last:
                        continue
                    last, failures, stalled_since = event.seq, 0, None
                    yield event
                    if is_terminal(event) or (until_seq is not None and last >= until_seq):
                        return
                reason = "the stream ended before the job's last event"
            except grpc.aio.AioRpcError as exc:
                if not is_resumable(exc):
                    raise error_from_rpc(exc) from None
                reason = exc.details() or exc.code().name
            finally:
                call.cancel()
            failures += 1
            now = time.monotonic()
            stalled_since = now if stalled_since is None else stalled_since
            if now - stalled_since > conn.timeout:
                if last == after_seq and any(sign in reason for sign in _NO_CONNECTION):
                    raise Unreachable(self.address, _reason(reason))
                raise Unavailable(f"lost the events of job {job_id} ({reason})")
            await anyio.sleep(conn.retry.backoff(min(failures, conn.retry.max_attempts)))

    # --- sessions ---------------------------------------------------------------
    async def create_session(
        self, backend: str, max_time: str | None, max_idle: str | None, *, batch: bool
    ) -> sessions_pb2.Session:
        request = sessions_pb2.CreateSessionRequest(
            backend=backend,
            mode=sessions_pb2.SESSION_MODE_BATCH if batch else sessions_pb2.SESSION_MODE_DEDICATED,
            max_time_s=duration_seconds(max_time, "--max-time"),
            max_idle_s=duration_seconds(max_idle, "--max-idle"),
        )
        return await self._session(self.connection.sessions.Create, request)

    async def session(self, session_id: str) -> sessions_pb2.Session:
        request = sessions_pb2.GetSessionRequest(session_id=session_id)
        return await self._session(self.connection.sessions.Get, request)

    async def close_session(self, session_id: str) -> sessions_pb2.Session:
        request = sessions_pb2.CloseSessionRequest(session_id=session_id)
        return await self._session(self.connection.sessions.Close, request)

    async def cancel_session(self, session_id: str) -> sessions_pb2.Session:
        request = sessions_pb2.CancelSessionRequest(session_id=session_id)
        return await self._session(self.connection.sessions.Cancel, request)

    async def _session(self, method: object, request: object) -> sessions_pb2.Session:
        found = await self._call(method, request)
        assert isinstance(found, sessions_pb2.Session)
        return found

    async def sessions(
        self,
        limit: int,
        *,
        states: Sequence[sessions_pb2.SessionState.ValueType] = (),
        backend: str = "",
    ) -> list[sessions_pb2.Session]:
        """The caller's newest sessions first, page after page until `limit`."""
        request = sessions_pb2.ListSessionsRequest(states=states, backend=backend)
        found: list[sessions_pb2.Session] = []
        while len(found) < limit:
            request.page_size = min(limit - len(found), MAX_PAGE_SIZE)
            page = await self._call(self.connection.sessions.List, request)
            assert isinstance(page, sessions_pb2.ListSessionsResponse)
            found.extend(page.sessions)
            if not page.next_page_token or not page.sessions:
                break
            request.page_token = page.next_page_token
        return found[:limit]

    # --- programs ---------------------------------------------------------------
    async def programs(self, name: str = "") -> list[programs_pb2.Program]:
        request = programs_pb2.ListProgramsRequest(name=name)
        resp = await self._call(self.connection.programs.List, request)
        assert isinstance(resp, programs_pb2.ListProgramsResponse)
        return list(resp.programs)

    async def program(self, program: str) -> programs_pb2.Program:
        request = programs_pb2.GetProgramRequest(program=program)
        found = await self._call(self.connection.programs.Get, request)
        assert isinstance(found, programs_pb2.Program)
        return found

    async def delete_program(self, program: str) -> int:
        request = programs_pb2.DeleteProgramRequest(program=program)
        resp = await self._call(self.connection.programs.Delete, request)
        assert isinstance(resp, programs_pb2.DeleteProgramResponse)
        return resp.deleted


__all__ = ["FINAL_STATES", "Broker", "Unreachable", "is_terminal"]
