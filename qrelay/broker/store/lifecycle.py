"""The job lifecycle, written once: what submit, claim, an update, a lease
expiry, a cancel and a session's end do to a job.

Pure functions over plain values: a decision reads the few facts it needs of
a job's row (`JobFacts`) and returns a `Transition` (the columns to set, the
events to append, whom to wake or stop) or refuses. Each store only executes
a transition with its own SQL, in its own transaction, under its own row
locks, so the two dialects cannot drift apart and a new rule is one change
here, unit-tested without a database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qrelay.broker.audit import audit
from qrelay.broker.store.base import (
    CancelOutcome,
    JobRecord,
    JobState,
    NewJob,
    SessionState,
    StoredEvent,
    UpdateKind,
    UpdateOutcome,
    job_error,
    state_payload,
    update_payload,
)
from qrelay.broker.store.schema import Row
from qrelay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

R = TypeVar("R", bound=Row)


def not_found(kind: str, object_id: str, owner: str | None, tenant: str | None) -> NotFound:
    """The NotFound for `tenant` asking for a `kind` ("job", "session", …) whose
    row has tenant `owner` (None: no such row). Another tenant's object is
    answered exactly as a missing one (no existence oracle) but audited."""
    if owner is not None and tenant is not None and owner != tenant:
        audit("cross_tenant.denied", kind=kind, id=object_id, tenant=tenant, owner=owner)
    return NotFound(f"{kind} {object_id!r} not found")


def check_tenant(kind: str, object_id: str, row: R | None, tenant: str | None) -> R:
    """`row` if it exists and (with `tenant`) is that tenant's; else `not_found`."""
    if row is None or (tenant is not None and row["tenant"] != tenant):
        raise not_found(kind, object_id, None if row is None else row["tenant"], tenant)
    return row


#: The columns of a job's row that the decisions read (`JobFacts.of`).
FACT_COLUMNS = "id, state, lease_id, last_seq, attempts, executor_id, backend, kind"

#: Why an executor is told to stop a job whose lease expired (it may still run it).
LEASE_EXPIRED_STOP = "lease expired; the job was requeued"

#: How a session's end reads in messages, by the state it ended in.
SESSION_ENDS = {
    SessionState.CLOSED: "closed",
    SessionState.CANCELLED: "cancelled",
    SessionState.EXPIRED: "expired",
}

# Leaving RUNNING for good or back to the queue drops the lease.
_NO_LEASE: dict[str, Any] = {"lease_id": "", "lease_expires_at": None}


@dataclass(frozen=True)
class JobFacts:
    """The part of a job's row the decisions read (columns `FACT_COLUMNS`)."""

    id: str
    state: JobState
    lease_id: str
    last_seq: int
    attempts: int
    executor_id: str
    backend: str
    kind: int

    @classmethod
    def of(cls, row: Row) -> JobFacts:
        """From a row addressed by name (sqlite3.Row and asyncpg.Record alike)."""
        return cls(
            id=row["id"],
            state=JobState(row["state"]),
            lease_id=row["lease_id"],
            last_seq=row["last_seq"],
            attempts=row["attempts"],
            executor_id=row["executor_id"],
            backend=row["backend"],
            kind=row["kind"],
        )


@dataclass(frozen=True)
class Stop:
    """A run an executor must end: the job left RUNNING under this lease."""

    executor_id: str
    lease_id: str
    reason: str


@dataclass(frozen=True)
class Transition:
    """What a decision does to one job; the store writes it in one transaction.

    `columns` are the job row's new values (`last_seq` included whenever
    events are appended); `events` carry their seqs already. `requeued`: the
    job is QUEUED again, so claimers (on any replica) may want it. `stop`: an
    executor still running the job must be told to stop.
    """

    job_id: str
    columns: dict[str, Any]
    events: list[StoredEvent]
    requeued: bool = False
    stop: Stop | None = None


@dataclass(frozen=True)
class Refusal:
    """An update that changes nothing; `accepted` for the one harmless case
    (a RELEASED confirming a cancel)."""

    accepted: bool
    message: str


@dataclass(frozen=True)
class _Move:
    """Columns and event payloads, before seqs are allocated."""

    columns: dict[str, Any]
    payloads: list[tuple[bytes, bool]] = field(default_factory=list)


def _numbered(
    job_id: str, last_seq: int, payloads: Sequence[tuple[bytes, bool]], now: float
) -> list[StoredEvent]:
    """Events after `last_seq`, numbered on (seqs are per job, gap-free)."""
    return [
        StoredEvent(job_id, last_seq + i + 1, now, payload, terminal)
        for i, (payload, terminal) in enumerate(payloads)
    ]


def _transition(job: JobFacts, move: _Move, now: float, **flags: Any) -> Transition:
    appended = _numbered(job.id, job.last_seq, move.payloads, now)
    columns = dict(move.columns)
    if appended:
        columns["last_seq"] = appended[-1].seq
    return Transition(job.id, columns, appended, **flags)


# --- submit -----------------------------------------------------------------


def check_queue_room(tenant: str, queued: int, max_queued_per_tenant: int) -> None:
    """Raises ResourceExhausted when the tenant's queue is full."""
    if queued >= max_queued_per_tenant:
        raise ResourceExhausted(
            f"tenant {tenant!r} already has {queued} queued jobs; this broker "
            f"queues at most {max_queued_per_tenant} per tenant "
            "(QRELAY_MAX_QUEUED_PER_TENANT); wait for some to finish"
        )


def check_session_accepts(job: NewJob, session: Row | None) -> None:
    """Whether a job may join its session, given the session's row (its
    tenant, backend and state; None when there is no such session)."""
    check_tenant("session", job.session_id, session, job.tenant)
    assert session is not None
    if session["backend"] != job.backend:
        raise InvalidArgument(
            f"job backend {job.backend!r} differs from the backend {session['backend']!r} of "
            f"session {job.session_id}"
        )
    state = SessionState(session["state"])
    if not state.accepting:
        raise FailedPrecondition(
            f"session {job.session_id} is {SESSION_ENDS[state]}; it accepts no new jobs "
            "(create a new session)"
        )


#: How far (in jobs of weight 1) an active dedicated session's jobs may jump
#: ahead of the other tenants' queued jobs on its executor: enough to keep an
#: iterative loop's next job from queueing, too little to starve anyone.
SESSION_JUMP = 4.0


def fair_start(clock: float, tenant_last: float, weight: float) -> tuple[float, float]:
    """(start, finish) virtual times of a tenant's new job on a backend.

    Start-time fair queueing: queued jobs are claimed in order of their start
    tag. A job starts at the backend's virtual clock (the tag of the last job
    claimed there) or where the tenant's previous job finished, whichever is
    later, and takes 1/weight of virtual time. So a tenant with 10,000 jobs
    queued holds tags far ahead of the clock, and another tenant's first job
    starts at the clock: it waits for at most one job per busy slot, not for
    the backlog; weights share the slots in proportion.
    """
    start = max(clock, tenant_last)
    return start, start + 1.0 / weight


def submitted(job_id: str, now: float) -> StoredEvent:
    """A new job's first event (seq 1): QUEUED."""
    return StoredEvent(job_id, 1, now, state_payload(JobState.QUEUED, "submitted", 0), False)


# --- claim ------------------------------------------------------------------


def running_event(job_id: str, seq: int, attempt: int, executor_id: str, now: float) -> StoredEvent:
    """The event of a claim: RUNNING on an executor, on attempt `attempt`."""
    payload = state_payload(
        JobState.RUNNING, f"running on executor {executor_id}", attempt, executor_id
    )
    return StoredEvent(job_id, seq, now, payload, False)


def claim(
    job: JobFacts, executor_id: str, lease_id: str, lease_ttl_s: float, now: float
) -> Transition:
    """A QUEUED job leased to an executor: RUNNING, one attempt more.

    (PostgreSQL claims many rows in one UPDATE with the same columns and
    `running_event`; see its store.)"""
    attempt = job.attempts + 1
    event = running_event(job.id, job.last_seq + 1, attempt, executor_id, now)
    columns = {
        "state": int(JobState.RUNNING),
        "attempts": attempt,
        "started_at": now,
        "executor_id": executor_id,
        "lease_id": lease_id,
        "lease_expires_at": now + lease_ttl_s,
        "last_seq": event.seq,
    }
    return Transition(job.id, columns, [event])


# --- executor updates -------------------------------------------------------


def update(
    job_id: str,
    job: JobFacts | None,
    lease_id: str,
    kind: UpdateKind,
    payload: bytes,
    now: float,
) -> Transition | Refusal:
    """An executor's update, fenced by lease: only the current lease of a
    RUNNING job changes it. A RELEASED for a CANCELLED job is accepted as a
    no-op (the executor confirms the stop)."""
    if job is None:
        return Refusal(False, f"unknown job {job_id!r}")
    if kind is UpdateKind.RELEASED and job.state is JobState.CANCELLED:
        return Refusal(True, "already cancelled")
    if not lease_id or lease_id != job.lease_id or job.state is not JobState.RUNNING:
        why = (
            f"job is {job.state.name}"
            if job.state is not JobState.RUNNING
            else "it was re-leased after this lease expired"
        )
        return Refusal(False, f"lease {lease_id!r} is not the current lease of job {job_id}; {why}")
    if kind in (UpdateKind.INTERIM, UpdateKind.LOG, UpdateKind.PROGRESS):
        event = update_payload(kind, payload, job.attempts)
        return _transition(job, _Move({}, [(event, False)]), now)
    if kind is UpdateKind.RESULT:
        return _transition(job, _finish(job, JobState.DONE, "done", payload, now), now)
    if kind is UpdateKind.ERROR:
        return _transition(job, _finish(job, JobState.FAILED, "failed", payload, now), now)
    # RELEASED under a valid lease: the executor gave the job back unrun.
    attempts = max(job.attempts - 1, 0)
    message = f"released by executor {job.executor_id}; requeued"
    move = _Move(
        {"state": int(JobState.QUEUED), "attempts": attempts, **_NO_LEASE},
        [(state_payload(JobState.QUEUED, message, attempts), False)],
    )
    return _transition(job, move, now, requeued=True)


def _finish(job: JobFacts, state: JobState, message: str, payload: bytes, now: float) -> _Move:
    """DONE with a result or FAILED with an error: the payload, then the terminal state."""
    column = "result" if state is JobState.DONE else "error"
    kind = UpdateKind.RESULT if state is JobState.DONE else UpdateKind.ERROR
    return _Move(
        {"state": int(state), column: payload, "finished_at": now, **_NO_LEASE},
        [
            (update_payload(kind, payload, job.attempts), False),
            (state_payload(state, message, job.attempts, job.executor_id), True),
        ],
    )


def update_outcome(decision: Transition | Refusal, job: JobRecord | None) -> UpdateOutcome:
    """What `apply_update` answers, given the job as it is after the decision."""
    if isinstance(decision, Refusal):
        return UpdateOutcome(decision.accepted, decision.message, job, [])
    return UpdateOutcome(True, "accepted", job, decision.events)


# --- lease expiry -----------------------------------------------------------


def expire(job: JobFacts, max_attempts: int, now: float) -> Transition:
    """A RUNNING job whose lease expired: QUEUED again, or FAILED (UNAVAILABLE)
    once it used `max_attempts`. Its executor is told to stop either way."""
    stop = Stop(job.executor_id, job.lease_id, LEASE_EXPIRED_STOP)
    if job.attempts >= max_attempts:
        message = (
            f"lease expired on executor {job.executor_id} on attempt {job.attempts} of "
            f"{max_attempts}; giving up: executors kept vanishing while running this "
            "job (QRELAY_MAX_ATTEMPTS)"
        )
        error = job_error(Unavailable.code, message)
        return _transition(job, _finish(job, JobState.FAILED, message, error, now), now, stop=stop)
    message = (
        f"lease expired on executor {job.executor_id}; requeued "
        f"(attempt {job.attempts} of {max_attempts})"
    )
    move = _Move(
        {"state": int(JobState.QUEUED), **_NO_LEASE},
        [(state_payload(JobState.QUEUED, message, job.attempts), False)],
    )
    return _transition(job, move, now, requeued=True, stop=stop)


# --- cancel -----------------------------------------------------------------


def cancel(job: JobFacts, reason: str, now: float) -> Transition | None:
    """CANCELLED from any unfinished state (None: already finished, nothing to do).
    A running job's executor is told to stop."""
    if job.state.terminal:
        return None
    message = f"cancelled: {reason}" if reason else "cancelled"
    move = _Move(
        {"state": int(JobState.CANCELLED), "finished_at": now, **_NO_LEASE},
        [(state_payload(JobState.CANCELLED, message, job.attempts, job.executor_id), True)],
    )
    stop = None
    if job.state is JobState.RUNNING:
        why = f"cancelled: {reason}" if reason else "cancelled by the client"
        stop = Stop(job.executor_id, job.lease_id, why)
    return _transition(job, move, now, stop=stop)


def cancel_outcome(before: JobFacts, change: Transition | None, job: JobRecord) -> CancelOutcome:
    """What `cancel` answers, given the job as it is after the decision."""
    if change is None or change.stop is None:
        events = [] if change is None else change.events
        return CancelOutcome(job, before.state, "", "", events)
    return CancelOutcome(
        job, before.state, change.stop.lease_id, change.stop.executor_id, change.events
    )


# --- sessions ---------------------------------------------------------------


def check_session_end(state: SessionState) -> None:
    """Raises ValueError unless `state` is one a session can end in."""
    if state not in SESSION_ENDS:
        raise ValueError(f"cannot end a session as {state.name}")


def session_may_end(current: SessionState, state: SessionState) -> bool:
    """An OPEN/ACTIVE session may end in any way; a CLOSED one may still be
    CANCELLED (cancel after close). Anything else leaves it as it is."""
    return current.accepting or (state is SessionState.CANCELLED and current is SessionState.CLOSED)
