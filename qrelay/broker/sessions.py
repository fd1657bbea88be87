"""SessionService on the broker: sessions and batches as qiskit-ibm-runtime has them.

A DEDICATED session pins its jobs to one executor: the first of its jobs to
be claimed pins the executor that claimed it (the store does this inside
`claim`, atomically), later ones go only there and, while the session is
ACTIVE, jump that executor's queue. A client-driven loop thus waits for no
other work between iterations. A BATCH session only groups jobs.

Lifecycle: OPEN → ACTIVE (first job started) → CLOSED (no new jobs, submitted
ones finish) | CANCELLED (closed and every unfinished job cancelled) |
EXPIRED. The store refuses a submit to a session that is not OPEN/ACTIVE
inside the submit transaction, so a close racing a submit is never lost.

Expiry (the reaper here, every `session_check_interval_s`):
- max_time is measured from the session's creation (Runtime measures from the
  first job's start; from creation also bounds a session whose backend never
  comes online). When reached, as in Runtime, the session is EXPIRED with
  "max_time N s reached": its queued jobs are cancelled, running ones finish.
- max_idle: an OPEN/ACTIVE session with no queued or running job whose last
  activity (creation, last submit, last job finished) is max_idle ago is
  EXPIRED with "max_idle N s reached (no job for N s)".
Re-pinning: when a session's pinned executor has been disconnected for longer
than the lease TTL (by then its running jobs' leases have lapsed and been
requeued), the session is unpinned and its next job re-pins it to whichever
executor claims it; `session.repinned`/`session.unpinned` are logged. The
same happens when a session pinned to an executor without a program sandbox
has a program job waiting (that executor could never run it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import structlog

from qrelay.broker import validation
from qrelay.broker.jobs import DEFAULT_PAGE_SIZE, Jobs
from qrelay.broker.quotas import QuotaSource, SettingsQuotas, audited
from qrelay.broker.scheduler import Scheduler
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import JobKind, JobState, JobStore
from qrelay.broker.store.base import (
    NewSession,
    SessionMode,
    SessionPage,
    SessionRecord,
    SessionState,
)
from qrelay.errors import InvalidArgument, NotFound
from qrelay.limits import MAX_PAGE_SIZE

log = structlog.get_logger(__name__)

UNFINISHED = (JobState.QUEUED, JobState.RUNNING)


class Sessions:
    """Session logic on plain values; `run()` is the expiry/re-pin reaper."""

    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        jobs: Jobs,
        settings: BrokerSettings,
        quotas: QuotaSource | None = None,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.jobs = jobs
        self.settings = settings
        self.quotas = quotas or SettingsQuotas(settings)
        self._missing_since: dict[str, float] = {}  # pinned executor id -> first seen gone
        self._pins: dict[str, str] = {}  # session id -> executor id last seen pinned

    def _limit(self, value: int, field: str, default: int, cap: int) -> int:
        if value < 0:
            raise InvalidArgument(f"{field} must be >= 0 seconds (0 for the default), got {value}")
        if value == 0:
            return min(default, cap)
        return min(value, cap)

    async def create(
        self,
        tenant: str,
        backend: str,
        mode: SessionMode | None = None,
        max_time_s: int = 0,
        max_idle_s: int = 0,
    ) -> SessionRecord:
        """Mode None means DEDICATED (Runtime's Session); 0 s means the broker's
        default; values above the broker's caps are lowered to them."""
        if not backend:
            raise InvalidArgument("backend is required (a backend name as BackendService lists it)")
        usable = await self.scheduler.usable(tenant)
        if backend not in self.scheduler.known_backends or not usable(backend):
            known = ", ".join(sorted(n for n in self.scheduler.known_backends if usable(n)))
            raise NotFound(f"unknown backend {backend!r}; known: {known or 'none yet'}")
        s = self.settings
        quota = await self.quotas.quota(tenant)
        new = NewSession(
            tenant=tenant,
            backend=backend,
            mode=mode or SessionMode.DEDICATED,
            max_time_s=self._limit(
                max_time_s, "max_time_s", s.session_max_time_s, s.session_max_time_cap_s
            ),
            max_idle_s=self._limit(
                max_idle_s, "max_idle_s", s.session_max_idle_s, s.session_max_idle_cap_s
            ),
        )
        with audited("create_session"):
            session = await self.store.create_session(new, quota)
        log.info(
            "session.created",
            session_id=session.id,
            tenant=tenant,
            backend=backend,
            mode=session.mode.name,
            max_time_s=session.max_time_s,
            max_idle_s=session.max_idle_s,
        )
        return session

    async def get(self, tenant: str | None, session_id: str) -> SessionRecord:
        if not session_id:
            raise InvalidArgument("session_id is required")
        return await self.store.get_session(session_id, tenant)

    async def page(
        self,
        tenant: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        states: Sequence[int] = (),
        backend: str = "",
    ) -> SessionPage:
        """The tenant's sessions and batches, newest first, a page at a time (as ListJobs)."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
        for field, value in (("backend", backend), ("page_token", page_token)):
            validation.check_text(value, field)  # PostgreSQL text cannot hold NUL
        try:
            wanted = [SessionState(s) for s in states]
        except ValueError:
            names = ", ".join(f"{s.name}={s.value}" for s in SessionState)
            raise InvalidArgument(
                f"states has an unknown session state in {list(states)} ({names})"
            ) from None
        return await self.store.list_sessions(
            tenant,
            states=wanted,
            backend=backend,
            page_size=min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
            page_token=page_token,
        )

    async def close(self, tenant: str | None, session_id: str) -> SessionRecord:
        """No new jobs; submitted ones finish. Closing a closed session is a no-op."""
        await self.get(tenant, session_id)
        session, changed = await self.store.end_session(
            session_id, tenant, SessionState.CLOSED, "closed by the client"
        )
        if changed:
            log.info("session.closed", session_id=session_id, tenant=session.tenant)
        return session

    async def cancel(self, tenant: str | None, session_id: str) -> SessionRecord:
        """Close and cancel every unfinished job (running ones are told to stop)."""
        await self.get(tenant, session_id)
        session, changed = await self.store.end_session(
            session_id, tenant, SessionState.CANCELLED, "cancelled by the client"
        )
        cancelled = await self._cancel_jobs(session, UNFINISHED, f"session {session_id} cancelled")
        if changed or cancelled:
            log.info(
                "session.cancelled", session_id=session_id, tenant=session.tenant, jobs=cancelled
            )
        return await self.store.get_session(session_id, tenant)

    async def _cancel_jobs(
        self, session: SessionRecord, states: tuple[JobState, ...], reason: str
    ) -> int:
        count = 0
        token = ""
        while True:
            page = await self.store.list_jobs(
                session.tenant,
                states=states,
                session_id=session.id,
                page_size=500,
                page_token=token,
            )
            for job in page.jobs:
                await self.jobs.cancel(session.tenant, job.id, reason)
                count += 1
            if not page.next_page_token:
                return count
            token = page.next_page_token

    # --- the reaper -----------------------------------------------------------
    async def reap(self, now: float | None = None) -> list[SessionRecord]:
        """Expire sessions past max_time/max_idle; unpin vanished executors.
        Returns the sessions it expired."""
        now = time.time() if now is None else now
        expired: list[SessionRecord] = []
        gone: set[str] = set()
        for session in await self.store.live_sessions():
            reason = ""
            if session.state.accepting:
                idle_since = max(
                    session.created_at, session.last_job_at or 0.0, session.last_finished_at or 0.0
                )
                if now - session.created_at >= session.max_time_s:
                    reason = f"max_time {session.max_time_s} s reached"
                elif session.unfinished == 0 and now - idle_since >= session.max_idle_s:
                    reason = (
                        f"max_idle {session.max_idle_s} s reached "
                        f"(no job for {session.max_idle_s} s)"
                    )
            if reason:
                ended, changed = await self.store.end_session(
                    session.id, None, SessionState.EXPIRED, reason
                )
                if changed:
                    cancelled = await self._cancel_jobs(
                        ended, (JobState.QUEUED,), f"session {session.id} expired: {reason}"
                    )
                    log.info(
                        "session.expired",
                        session_id=session.id,
                        tenant=session.tenant,
                        reason=reason,
                        queued_cancelled=cancelled,
                    )
                    expired.append(await self.store.get_session(session.id))
                continue
            self._note_pin(session)
            link = self.scheduler.executors.get(session.executor_id)
            if session.executor_id and not self.scheduler.executor_online(session.executor_id):
                gone.add(session.executor_id)  # connected to no replica
            elif link is not None and "program" not in link.capabilities:
                await self._unpin_if_programs_wait(session)
        await self._unpin_vanished(gone, now)
        return expired

    async def _unpin_if_programs_wait(self, session: SessionRecord) -> None:
        """A session pinned to an executor without a program sandbox cannot run
        its queued program jobs there: unpin that executor's sessions so a
        program-capable executor can take this one over (the others re-pin at
        their next claim, usually to the same executor)."""
        if not session.counts[JobState.QUEUED]:
            return
        page = await self.store.list_jobs(
            session.tenant, states=(JobState.QUEUED,), session_id=session.id, page_size=1000
        )
        if not any(job.kind is JobKind.PROGRAM for job in page.jobs):
            return
        for changed in await self.store.unpin_sessions(session.executor_id):
            log.warning(
                "session.unpinned",
                session_id=changed.id,
                executor_id=changed.executor_id,
                reason="pinned executor cannot run program jobs",
            )
            self.scheduler.queued(changed.backend, JobKind.PROGRAM)

    def _note_pin(self, session: SessionRecord) -> None:
        before = self._pins.get(session.id)
        if session.executor_id and before and before != session.executor_id:
            log.info(
                "session.repinned",
                session_id=session.id,
                executor_id=session.executor_id,
                previous_executor_id=before,
            )
        if session.executor_id:
            self._pins[session.id] = session.executor_id

    async def _unpin_vanished(self, gone: set[str], now: float) -> None:
        for executor_id in list(self._missing_since):
            if executor_id not in gone:
                del self._missing_since[executor_id]
        for executor_id in gone:
            since = self._missing_since.setdefault(executor_id, now)
            if now - since < self.settings.lease_ttl_s:
                continue
            del self._missing_since[executor_id]
            for session in await self.store.unpin_sessions(executor_id):
                log.warning(
                    "session.unpinned",
                    session_id=session.id,
                    executor_id=executor_id,
                    reason="pinned executor disconnected for longer than the lease TTL",
                )
                for kind in (JobKind.SAMPLER, JobKind.PROGRAM):
                    self.scheduler.queued(session.backend, kind)

    async def run(self) -> None:
        """Reaper loop until cancelled; survives store errors (logged, retried)."""
        interval = self.settings.session_check_interval_s
        while True:
            try:
                await self.reap()
            except Exception as exc:  # the reaper must outlive a bad moment (logged)
                log.error("session_reaper.failed", retry_in_s=interval, exc_info=exc)
            await anyio.sleep(interval)
