"""Where jobs go: a backend, or a `Session` or `Batch` on one, with its service.

`Sampler`, `Estimator` and `service.run` accept any of these as `mode=`; a
backend *name* resolves with the service of the innermost enclosing
`with QRelayService(...)` block, else one made from QRELAY_BROKER /
QRELAY_TOKEN or the default saved account (Runtime's rule). `Session` and
`Batch` run the asyncio core of `qrelay.client.session` on their service's
event-loop thread; leaving their block closes them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Protocol

from qrelay.client.backend import QRelayBackend
from qrelay.client.service import QRelayService, current_service
from qrelay.client.session import AsyncBatch, AsyncSession, _backend_name
from qrelay.errors import InvalidArgument

__all__ = ["Batch", "ModeLike", "Session", "SubmitTarget", "default_service"]


@dataclass(frozen=True)
class SubmitTarget:
    """Where a primitive's jobs go: a service, a backend and maybe a session or batch."""

    service: QRelayService
    backend: QRelayBackend
    session_id: str = ""


class ModeLike(Protocol):
    """Anything that can say where jobs go (`Session` and `Batch` implement this)."""

    def _qrelay_target(self) -> SubmitTarget: ...


_default_lock = threading.Lock()
_default_service: QRelayService | None = None


def default_service() -> QRelayService:
    """The service a backend name resolves with when none is passed: the innermost
    enclosing `with QRelayService(...)` block's, else one made from QRELAY_BROKER /
    QRELAY_TOKEN or the default saved account (Runtime's rule), kept for reuse."""
    global _default_service
    entered = current_service()
    if entered is not None:
        return entered
    with _default_lock:
        if _default_service is None or _default_service.closed:
            try:
                _default_service = QRelayService()
            except InvalidArgument:
                raise InvalidArgument(
                    "a backend name needs a service: pass service=QRelayService(...), use a "
                    "backend from service.backend(name), run inside `with QRelayService(...)`, "
                    "set QRELAY_BROKER or save an account (QRelayService.save_account)"
                ) from None
        return _default_service


def _resolve_service(backend: str | QRelayBackend, service: QRelayService | None) -> QRelayService:
    if service is not None:
        return service
    if isinstance(backend, QRelayBackend) and backend.service is not None:
        return backend.service
    return default_service()


class Session:
    """A dedicated session (qiskit-ibm-runtime's `Session`), created at construction.

    `backend` is a name or a `QRelayBackend`; the service is `service`, the
    backend's own, or the one QRELAY_BROKER names. `max_time` and
    `max_idle` are seconds or strings like "1h 30m" (None: broker default).
    """

    _async_cls: ClassVar[type[AsyncSession]] = AsyncSession

    def __init__(
        self,
        backend: str | QRelayBackend,
        max_time: int | float | str | None = None,
        *,
        service: QRelayService | None = None,
        max_idle: int | float | str | None = None,
    ) -> None:
        self._service = _resolve_service(backend, service)
        self._backend = (
            backend
            if isinstance(backend, QRelayBackend) and backend.service is self._service
            else self._service.backend(_backend_name(backend))
        )

        async def create() -> AsyncSession:
            core = self._async_cls(
                self._service.async_service, self._backend.name, max_time, max_idle=max_idle
            )
            return await core.open()

        self._core: AsyncSession = self._service.run_async(create)

    @classmethod
    def from_id(cls, session_id: str, service: QRelayService | None = None) -> Session:
        """A handle on an existing session or batch (its own class, whatever `cls` is)."""
        if not session_id:
            raise InvalidArgument("session_id must not be empty")
        owner = service
        if owner is None:
            owner = default_service()
        core: AsyncSession = owner.run_async(owner.async_service.session, session_id)
        made = Batch if isinstance(core, AsyncBatch) else Session
        self = made.__new__(made)
        self._service = owner
        self._backend = owner.backend(core.backend_name)
        self._core = core
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.session_id} backend={self._backend.name!r}>"

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def service(self) -> QRelayService:
        return self._service

    def backend(self) -> str:
        """The backend's name (as Runtime's `Session.backend()`)."""
        return self._backend.name

    def _qrelay_target(self) -> SubmitTarget:
        return SubmitTarget(self._service, self._backend, self.session_id)

    def close(self) -> None:
        """Refuse new jobs; the ones already submitted finish. Idempotent."""
        self._service.run_async(self._core.close)

    def cancel(self) -> None:
        """Close and cancel every unfinished job of the session."""
        self._service.run_async(self._core.cancel)

    def status(self) -> str:
        """'open', 'active', 'closed', 'cancelled' or 'expired'."""
        return str(self._service.run_async(self._core.status))

    def details(self) -> dict[str, Any]:
        """State, reason, pinned executor, times and job counts per state."""
        found: dict[str, Any] = self._service.run_async(self._core.details)
        return found


class Batch(Session):
    """A batch (qiskit-ibm-runtime's `Batch`): jobs grouped but not pinned to one executor."""

    _async_cls: ClassVar[type[AsyncSession]] = AsyncBatch
