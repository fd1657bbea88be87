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

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qrelay.broker.audit import audit
from qrelay.broker.store.base import (
    CancelOutcome,
    JobRecord,
    JobState,
    NewJob,
    Quota,
    RunningLimits,
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
    QuotaExceeded,
    ResourceExhausted,
    Unavailable,
)
from qrelay.limits import MAX_PRIORITY, MIN_PRIORITY

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
FACT_COLUMNS = (
    "id, state, lease_id, last_seq, attempts, executor_id, backend, kind, tenant, started_at"
)

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
    tenant: str = ""
    started_at: float | None = None

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
            tenant=row["tenant"],
            started_at=row["started_at"],
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
    executor still running the job must be told to stop. `usage`: executor-
    seconds to add to the tenant's use of that UTC day (a run ended).
    """

    job_id: str
    columns: dict[str, Any]
    events: list[StoredEvent]
    requeued: bool = False
    stop: Stop | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Usage:
    """Executor-seconds a tenant used, charged to one UTC day (`usage_day`)."""

    tenant: str
    day: str
    seconds: float


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


def _refuse(
    tenant: str, quota: str, what: str, limit: float, used: float, advice: str, *, has: str = ""
) -> None:
    """QuotaExceeded as `tenant 'a' has 100 queued jobs, its quota of queued
    jobs (max_queued_jobs=100); <advice>` (`has` words the use, if not so)."""
    has = has or f"has {_amount(used)} {what}"
    raise QuotaExceeded(
        f"tenant {tenant!r} {has}, its quota of {what} ({quota}={_amount(limit)}); {advice}",
        tenant=tenant,
        quota=quota,
        limit=limit,
        used=used,
    )


def _amount(value: float) -> str:
    """12 as "12", 0.001 as "0.001", 12.3456789 as "12.345679"."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def check_submit_quota(tenant: str, quota: Quota, queued: int, executor_seconds: float) -> None:
    """A new job against the tenant's queued-jobs quota and its period's
    executor-seconds budget; raises QuotaExceeded naming the one it exceeds."""
    if quota.max_queued_jobs is not None and queued >= quota.max_queued_jobs:
        _refuse(
            tenant,
            "max_queued_jobs",
            "queued jobs",
            quota.max_queued_jobs,
            queued,
            "wait for some to finish or cancel some",
        )
    if quota.max_executor_seconds is not None and executor_seconds >= quota.max_executor_seconds:
        renews = f" on {quota.period_end}" if quota.period_end else " with the next period"
        _refuse(
            tenant,
            "max_executor_seconds",
            "executor-seconds per period",
            quota.max_executor_seconds,
            executor_seconds,
            f"the budget renews{renews} (see service.usage())",
            has=f"used {_amount(executor_seconds)} executor-seconds since {quota.period_start}",
        )


def check_session_quota(tenant: str, quota: Quota | None, open_sessions: int) -> None:
    if quota is not None and quota.max_sessions is not None and open_sessions >= quota.max_sessions:
        _refuse(
            tenant,
            "max_sessions",
            "open sessions",
            quota.max_sessions,
            open_sessions,
            "close a session first",
        )


def check_program_quota(tenant: str, quota: Quota | None, stored: int, adding: int) -> None:
    """A new archive of `adding` bytes on top of the tenant's `stored` bytes."""
    limit = None if quota is None else quota.max_program_bytes
    if limit is not None and stored + adding > limit:
        _refuse(
            tenant,
            "max_program_bytes",
            "bytes of programs stored",
            limit,
            stored,
            "delete programs it no longer needs",
            has=f"has {stored} bytes of programs stored and this upload adds {adding}",
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


class RunningRoom:
    """How many more jobs each tenant may start in one claim under its
    running-jobs quota (`RunningLimits`), given how many it runs now."""

    def __init__(self, limits: RunningLimits | None, running: Mapping[str, int]) -> None:
        self.limits = limits if limits is not None and limits.any else None
        self.running = dict(running)
        self.full: set[str] = set()
        if self.limits is not None:
            for tenant, n in self.running.items():
                limit = self.limits.limit(tenant)
                if limit is not None and n >= limit:
                    self.full.add(tenant)

    @property
    def active(self) -> bool:
        return self.limits is not None

    def blocked(self) -> list[str]:
        """Tenants at their quota: the claim's queries leave their jobs out."""
        return sorted(self.full)

    def set_running(self, tenant: str, n: int) -> None:
        """A fresh count (PostgreSQL recounts under the tenant's claim lock)."""
        self.running[tenant] = n
        limit = None if self.limits is None else self.limits.limit(tenant)
        if limit is not None and n >= limit:
            self.full.add(tenant)

    def take(self, tenant: str) -> bool:
        """Whether one more of the tenant's jobs may start now (counts it if so)."""
        if self.limits is None:
            return True
        if tenant in self.full:  # at its quota, or being claimed for elsewhere
            return False
        limit = self.limits.limit(tenant)
        n = self.running.get(tenant, 0)
        if limit is not None and n >= limit:
            self.full.add(tenant)
            return False
        self.running[tenant] = n + 1
        if limit is not None and n + 1 >= limit:
            self.full.add(tenant)
        return True


def check_priority(priority: int) -> None:
    """JobSpec.priority within `qrelay.limits`' bounds (the SDK checks the same)."""
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidArgument(
            f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY} (higher runs first "
            f"among the tenant's own queued jobs; default 0), got {priority}"
        )


# --- queue position, without other tenants' counts ---------------------------


def estimated_position(own_ahead: int, own_weight: float, active_weight: float) -> int:
    """A queued job's estimated place in its backend's queue (1 = next).

    Under fair share every active tenant (one with work queued or just
    started on the backend) gets slots in proportion to its weight, so while
    the tenant's `own_ahead` jobs run, the others run about `own_ahead *
    (active weight - own weight) / own weight` of theirs: the estimate is
    `1 + round(own_ahead * active_weight / own_weight)`. It reads the
    tenant's own queue and the sum of the active weights only: another
    tenant's backlog (beyond whether it is active) changes nothing in it.
    """
    total = max(active_weight, own_weight)
    return 1 + _half_up(own_ahead * total / own_weight)


def estimated_length(own_queued: int, own_weight: float, active_weight: float) -> int:
    """The queue length a tenant sees for a backend: its own queued jobs scaled
    as `estimated_position` scales the jobs ahead (0 when it has none)."""
    if own_queued <= 0:
        return 0
    return _half_up(own_queued * max(active_weight, own_weight) / own_weight)


def _half_up(value: float) -> int:
    return int(value + 0.5)


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
        move = _finish(job, JobState.DONE, "done", payload, now)
        return _charged(job, move, now)
    if kind is UpdateKind.ERROR:
        move = _finish(job, JobState.FAILED, "failed", payload, now)
        return _charged(job, move, now)
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


def usage_day(now: float) -> str:
    """The UTC day ("YYYY-MM-DD") executor-seconds ending at `now` count for."""
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


def run_seconds(job: JobFacts, now: float) -> float:
    """Executor-seconds of the job's current run: from its lease (claim) to now.

    Lease timestamps rather than the executor's own report: the broker's
    clock is the one every tenant is charged by, an executor cannot
    under-report, and queueing, transpiling and post-processing on the
    executor all hold the slot, so they count."""
    return max(now - job.started_at, 0.0) if job.started_at is not None else 0.0


def _charged(job: JobFacts, move: _Move, now: float, **flags: Any) -> Transition:
    """A run ends (done, failed or cancelled while running): the job's usage is
    its run time, added to the tenant's use of today."""
    seconds = run_seconds(job, now)
    move = _Move({**move.columns, "usage_s": seconds}, move.payloads)
    usage = Usage(job.tenant, usage_day(now), seconds) if seconds > 0 else None
    return _transition(job, move, now, usage=usage, **flags)


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
    if job.state is JobState.RUNNING:
        why = f"cancelled: {reason}" if reason else "cancelled by the client"
        # The run so far used the slot: it is charged as a finished one.
        return _charged(job, move, now, stop=Stop(job.executor_id, job.lease_id, why))
    return _transition(job, move, now)


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


# --- deleting a job ---------------------------------------------------------------


def check_deletable(job_id: str, state: JobState) -> None:
    """Only a finished job may be deleted (Runtime's rule): its events and result
    go with it, and nothing may still write to them."""
    if not state.terminal:
        raise FailedPrecondition(
            f"job {job_id} is {state.name}; only a finished (DONE, FAILED or CANCELLED) job "
            "can be deleted (cancel it first)"
        )


def check_key_not_deleted(idempotency_key: str, deleted_job_id: str | None) -> None:
    """A Submit whose idempotency key named a job since deleted is refused: the key
    stands for that job, and quietly creating another under it would break the
    promise that one key is one job (a late retry would run the work twice)."""
    if deleted_job_id is not None:
        raise FailedPrecondition(
            f"idempotency_key {idempotency_key!r} belonged to job {deleted_job_id}, which was "
            "deleted; submit with a new key"
        )
