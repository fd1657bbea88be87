"""Sessions and batches, as qiskit-ibm-runtime users know them: the asyncio core.

A `Session` pins its jobs to one executor, whose queue they jump while the
session is active, so an iterative client loop pays no queueing between
iterations; a `Batch` groups jobs without pinning. Both are context managers
accepted as `mode=` by `Sampler`, `Estimator` and `service.run`; leaving the
block closes them (submitted jobs finish, new ones are refused by the broker
with FAILED_PRECONDITION). `cancel()` also cancels every unfinished job.

`AsyncSession`/`AsyncBatch` are the asyncio core (here); `Session`/`Batch`
(`qrelay.client.modes`) run it on their service's event-loop thread.
"""

from __future__ import annotations

import re
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from qrelay._proto.v1 import sessions_pb2
from qrelay.client.backend import QRelayBackend
from qrelay.errors import InvalidArgument

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from qrelay.client.service import AsyncQRelayService

SessionModeName = Literal["dedicated", "batch"]

_MODES: dict[str, sessions_pb2.SessionMode.ValueType] = {
    "dedicated": sessions_pb2.SESSION_MODE_DEDICATED,
    "batch": sessions_pb2.SESSION_MODE_BATCH,
}
_STATE_NAMES: dict[int, str] = {
    sessions_pb2.SESSION_STATE_OPEN: "open",
    sessions_pb2.SESSION_STATE_ACTIVE: "active",
    sessions_pb2.SESSION_STATE_CLOSED: "closed",
    sessions_pb2.SESSION_STATE_CANCELLED: "cancelled",
    sessions_pb2.SESSION_STATE_EXPIRED: "expired",
}
_ACCEPTING = frozenset({sessions_pb2.SESSION_STATE_OPEN, sessions_pb2.SESSION_STATE_ACTIVE})
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def duration_seconds(value: int | float | str | None, what: str) -> int:
    """Seconds from a number or a Runtime-style string ("1h 30m", "90s"); 0 means the default."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be seconds or a string like '1h 30m', got {value!r}")
    if isinstance(value, int | float):
        seconds = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.isdigit():
            seconds = int(text)
        else:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise InvalidArgument(
                    f"{what} must be seconds or a string like '1h 30m', got {value!r}"
                )
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise InvalidArgument(
            f"{what} must be seconds or a string like '1h 30m', got {type(value).__name__}"
        )
    if seconds <= 0 or seconds > 2**31 - 1:
        raise InvalidArgument(f"{what} must be > 0 seconds, got {value!r}")
    return max(1, round(seconds))


def state_name(state: int) -> str:
    """'open', 'active', 'closed', 'cancelled' or 'expired'."""
    return _STATE_NAMES.get(state, "unspecified")


def _when(ts: Timestamp) -> datetime | None:
    return ts.ToDatetime() if ts.seconds or ts.nanos else None


def session_details(s: sessions_pb2.Session) -> dict[str, Any]:
    """A session record as a dict, with Runtime's key names where one exists."""
    return {
        "id": s.id,
        "backend_name": s.backend,
        "mode": "batch" if s.mode == sessions_pb2.SESSION_MODE_BATCH else "dedicated",
        "state": state_name(s.state),
        "state_reason": s.state_reason,
        "accepting_jobs": s.state in _ACCEPTING,
        "executor_id": s.executor_id,
        "max_time": s.max_time_s,
        "interactive_timeout": s.max_idle_s,
        "created_at": _when(s.created_at),
        "activated_at": _when(s.activated_at),
        "closed_at": _when(s.closed_at),
        "last_job_at": _when(s.last_job_at),
        "jobs": {
            "total": s.jobs_total,
            "queued": s.jobs_queued,
            "running": s.jobs_running,
            "done": s.jobs_done,
            "failed": s.jobs_failed,
            "cancelled": s.jobs_cancelled,
        },
    }


def _backend_name(backend: str | QRelayBackend) -> str:
    if isinstance(backend, QRelayBackend):
        return backend.name
    if isinstance(backend, str) and backend.strip():
        return backend.strip()
    raise InvalidArgument(f"backend must be a backend name or a QRelayBackend, got {backend!r}")


class AsyncSession:
    """A session on an `AsyncQRelayService`; created on `open()` or `async with`."""

    _mode: ClassVar[SessionModeName] = "dedicated"

    def __init__(
        self,
        service: AsyncQRelayService,
        backend: str | QRelayBackend,
        max_time: int | float | str | None = None,
        *,
        max_idle: int | float | str | None = None,
    ) -> None:
        self._service = service
        self._backend = _backend_name(backend)
        self._request = sessions_pb2.CreateSessionRequest(
            backend=self._backend,
            mode=_MODES[self._mode],
            max_time_s=duration_seconds(max_time, "max_time"),
            max_idle_s=duration_seconds(max_idle, "max_idle"),
        )
        self._proto: sessions_pb2.Session | None = None

    @classmethod
    def _attached(cls, service: AsyncQRelayService, proto: sessions_pb2.Session) -> AsyncSession:
        """A handle on an existing session record (no network)."""
        made = AsyncBatch if proto.mode == sessions_pb2.SESSION_MODE_BATCH else AsyncSession
        self = made.__new__(made)
        self._service = service
        self._backend = proto.backend
        self._request = sessions_pb2.CreateSessionRequest(
            backend=proto.backend,
            mode=proto.mode,
            max_time_s=proto.max_time_s,
            max_idle_s=proto.max_idle_s,
        )
        self._proto = proto
        return self

    def __repr__(self) -> str:
        sid = self._proto.id if self._proto else "(not created)"
        return f"<{type(self).__name__} {sid} backend={self._backend!r}>"

    @property
    def session_id(self) -> str:
        if self._proto is None:
            raise InvalidArgument(f"{type(self).__name__} is not open yet: await open() first")
        return self._proto.id

    @property
    def backend_name(self) -> str:
        return self._backend

    @property
    def last_known(self) -> sessions_pb2.Session | None:
        return self._proto

    async def open(self) -> AsyncSession:
        """Create the session at the broker (once)."""
        if self._proto is None:
            conn = self._service.connection
            created: sessions_pb2.Session = await conn.unary(conn.sessions.Create, self._request)
            self._proto = created
        return self

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proto is not None:
            await self.close()

    async def refresh(self) -> sessions_pb2.Session:
        conn = self._service.connection
        request = sessions_pb2.GetSessionRequest(session_id=self.session_id)
        found: sessions_pb2.Session = await conn.unary(conn.sessions.Get, request)
        self._proto = found
        return found

    async def close(self) -> None:
        """Refuse new jobs; the ones already submitted finish. Idempotent."""
        conn = self._service.connection
        request = sessions_pb2.CloseSessionRequest(session_id=self.session_id)
        self._proto = await conn.unary(conn.sessions.Close, request)

    async def cancel(self) -> None:
        """Close and cancel every unfinished job of the session."""
        conn = self._service.connection
        request = sessions_pb2.CancelSessionRequest(session_id=self.session_id)
        self._proto = await conn.unary(conn.sessions.Cancel, request)

    async def status(self) -> str:
        """'open', 'active', 'closed', 'cancelled' or 'expired'."""
        return state_name((await self.refresh()).state)

    async def details(self) -> dict[str, Any]:
        """State, reason, pinned executor, times and job counts per state."""
        return session_details(await self.refresh())


class AsyncBatch(AsyncSession):
    """A batch: jobs grouped (closed and cancelled together) but not pinned."""

    _mode: ClassVar[SessionModeName] = "batch"


__all__ = [
    "AsyncBatch",
    "AsyncSession",
    "duration_seconds",
    "session_details",
    "state_name",
]
