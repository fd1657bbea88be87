"""The lifecycle decisions both stores execute, proved without a database."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from qrelay._proto.v1 import types_pb2
from qrelay.broker.store import lifecycle
from qrelay.broker.store.base import (
    JobKind,
    JobRecord,
    JobState,
    NewJob,
    SessionState,
    UpdateKind,
    update_payload,
)
from qrelay.broker.store.lifecycle import JobFacts, Refusal, Transition
from qrelay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

NOW = 1000.0

RUNNING = JobFacts(
    id="j-1",
    state=JobState.RUNNING,
    lease_id="l-1",
    last_seq=3,
    attempts=2,
    executor_id="x-1",
    backend="sim",
    kind=int(JobKind.SAMPLER),
    tenant="a",
    started_at=NOW - 30.0,
)


def facts(**changes: Any) -> JobFacts:
    return dataclasses.replace(RUNNING, **changes)


def state_change(payload: bytes) -> types_pb2.StateChange:
    event = types_pb2.JobEvent.FromString(payload)
    assert event.WhichOneof("payload") == "state"
    return event.state


def transition(decision: Transition | Refusal | None) -> Transition:
    assert isinstance(decision, Transition)
    return decision


def record(job: JobFacts) -> JobRecord:
    return JobRecord(
        id=job.id,
        tenant="t",
        backend=job.backend,
        kind=JobKind(job.kind),
        state=job.state,
        attempts=job.attempts,
        created_at=NOW,
        started_at=None,
        finished_at=None,
        error=None,
        session_id="",
        executor_id=job.executor_id,
        lease_id=job.lease_id,
        lease_expires_at=None,
        last_seq=job.last_seq,
        tags={},
        idempotency_key="",
        num_pubs=1,
    )


# --- executor updates -------------------------------------------------------


def test_update_of_an_unknown_job_is_refused() -> None:
    decision = lifecycle.update("j-x", None, "l-1", UpdateKind.RESULT, b"r", NOW)
    assert decision == Refusal(False, "unknown job 'j-x'")


def test_released_after_cancel_is_accepted_and_changes_nothing() -> None:
    job = facts(state=JobState.CANCELLED, lease_id="")
    decision = lifecycle.update(job.id, job, "l-1", UpdateKind.RELEASED, b"", NOW)
    assert decision == Refusal(True, "already cancelled")


@pytest.mark.parametrize("kind", list(UpdateKind))
def test_stale_lease_cannot_change_a_job(kind: UpdateKind) -> None:
    decision = lifecycle.update(RUNNING.id, RUNNING, "l-old", kind, b"p", NOW)
    assert isinstance(decision, Refusal)
    assert not decision.accepted
    assert "re-leased after this lease expired" in decision.message


def test_update_of_a_finished_job_names_its_state() -> None:
    job = facts(state=JobState.DONE, lease_id="")
    decision = lifecycle.update(job.id, job, "l-1", UpdateKind.RESULT, b"r", NOW)
    assert isinstance(decision, Refusal)
    assert not decision.accepted
    assert decision.message.endswith("job is DONE")


def test_empty_lease_is_never_current() -> None:
    job = facts(lease_id="")
    decision = lifecycle.update(job.id, job, "", UpdateKind.LOG, b"", NOW)
    assert isinstance(decision, Refusal)
    assert not decision.accepted


@pytest.mark.parametrize("kind", [UpdateKind.INTERIM, UpdateKind.LOG, UpdateKind.PROGRESS])
def test_interim_log_and_progress_append_one_event_and_keep_the_state(kind: UpdateKind) -> None:
    change = transition(lifecycle.update(RUNNING.id, RUNNING, "l-1", kind, b"", NOW))
    assert change.columns == {"last_seq": 4}
    assert [(e.seq, e.terminal) for e in change.events] == [(4, False)]
    assert change.events[0].payload == update_payload(kind, b"", RUNNING.attempts)
    assert not change.requeued
    assert change.stop is None


@pytest.mark.parametrize("kind", [UpdateKind.INTERIM, UpdateKind.PROGRESS, UpdateKind.RESULT])
def test_every_event_an_attempt_produces_says_which_attempt(kind: UpdateKind) -> None:
    payloads = {
        UpdateKind.INTERIM: types_pb2.Interim(value_json="1"),
        UpdateKind.PROGRESS: types_pb2.Progress(stage="run", done=3, total=40),
        UpdateKind.RESULT: types_pb2.JobResult(program_json="2"),
    }
    wire = payloads[kind].SerializeToString()
    change = transition(lifecycle.update(RUNNING.id, facts(attempts=3), "l-1", kind, wire, NOW))
    events = [types_pb2.JobEvent.FromString(e.payload) for e in change.events]
    assert events[0].WhichOneof("payload") == kind.value
    assert getattr(events[0], kind.value) == payloads[kind]
    assert [e.attempt for e in events] == [3] * len(events)


@pytest.mark.parametrize(
    ("kind", "state", "column"),
    [(UpdateKind.RESULT, JobState.DONE, "result"), (UpdateKind.ERROR, JobState.FAILED, "error")],
)
def test_result_or_error_finishes_the_job_and_drops_the_lease(
    kind: UpdateKind, state: JobState, column: str
) -> None:
    change = transition(lifecycle.update(RUNNING.id, RUNNING, "l-1", kind, b"p", NOW))
    assert change.columns == {
        "state": int(state),
        column: b"p",
        "finished_at": NOW,
        "lease_id": "",
        "lease_expires_at": None,
        "last_seq": 5,
        "usage_s": 30.0,
    }
    assert change.usage == lifecycle.Usage("a", lifecycle.usage_day(NOW), 30.0)
    assert [(e.seq, e.terminal) for e in change.events] == [(4, False), (5, True)]
    final = state_change(change.events[1].payload)
    assert (final.state, final.attempt, final.executor_id) == (int(state), 2, "x-1")


@pytest.mark.parametrize(("attempts", "left"), [(2, 1), (0, 0)])
def test_released_job_is_requeued_without_spending_an_attempt(attempts: int, left: int) -> None:
    job = facts(attempts=attempts)
    change = transition(lifecycle.update(job.id, job, "l-1", UpdateKind.RELEASED, b"", NOW))
    assert change.columns["state"] == int(JobState.QUEUED)
    assert change.columns["attempts"] == left
    assert change.columns["lease_id"] == ""
    assert change.requeued
    assert change.stop is None
    queued = state_change(change.events[0].payload)
    assert queued.message == "released by executor x-1; requeued"


# --- claim, expiry, cancel -------------------------------------------------


def test_claim_runs_the_job_under_a_new_lease_one_attempt_more() -> None:
    job = facts(state=JobState.QUEUED, lease_id="", attempts=1, executor_id="")
    change = lifecycle.claim(job, "x-2", "l-2", 30.0, NOW)
    assert change.columns == {
        "state": int(JobState.RUNNING),
        "attempts": 2,
        "started_at": NOW,
        "executor_id": "x-2",
        "lease_id": "l-2",
        "lease_expires_at": NOW + 30.0,
        "last_seq": 4,
    }
    running = state_change(change.events[0].payload)
    assert (running.state, running.attempt, running.executor_id) == (
        int(JobState.RUNNING),
        2,
        "x-2",
    )


def test_expired_lease_requeues_and_stops_the_executor() -> None:
    change = lifecycle.expire(RUNNING, max_attempts=3, now=NOW)
    assert change.columns == {
        "state": int(JobState.QUEUED),
        "lease_id": "",
        "lease_expires_at": None,
        "last_seq": 4,
    }
    assert change.requeued
    assert change.stop == lifecycle.Stop("x-1", "l-1", lifecycle.LEASE_EXPIRED_STOP)
    assert "attempt 2 of 3" in state_change(change.events[0].payload).message


def test_expired_lease_on_the_last_attempt_fails_the_job_as_unavailable() -> None:
    change = lifecycle.expire(RUNNING, max_attempts=2, now=NOW)
    assert change.columns["state"] == int(JobState.FAILED)
    assert change.columns["finished_at"] == NOW
    error = types_pb2.JobError.FromString(change.columns["error"])
    assert error.code == Unavailable.code
    assert "QRELAY_MAX_ATTEMPTS" in error.message
    assert not change.requeued
    assert change.stop is not None
    assert [e.terminal for e in change.events] == [False, True]


@pytest.mark.parametrize("state", [JobState.DONE, JobState.FAILED, JobState.CANCELLED])
def test_cancel_of_a_finished_job_does_nothing(state: JobState) -> None:
    assert lifecycle.cancel(facts(state=state), "why", NOW) is None


def test_cancel_of_a_queued_job_stops_nobody() -> None:
    job = facts(state=JobState.QUEUED, lease_id="", executor_id="")
    change = transition(lifecycle.cancel(job, "", NOW))
    assert change.columns["state"] == int(JobState.CANCELLED)
    assert change.stop is None
    assert not change.requeued
    assert state_change(change.events[0].payload).message == "cancelled"
    outcome = lifecycle.cancel_outcome(job, change, record(job))
    assert (outcome.previous_state, outcome.lease_id, outcome.executor_id) == (
        JobState.QUEUED,
        "",
        "",
    )


def test_cancel_of_a_running_job_stops_its_executor() -> None:
    change = transition(lifecycle.cancel(RUNNING, "user asked", NOW))
    assert change.stop == lifecycle.Stop("x-1", "l-1", "cancelled: user asked")
    assert state_change(change.events[0].payload).message == "cancelled: user asked"
    assert change.events[0].terminal
    # The run so far is charged, as a finished run is.
    assert change.columns["usage_s"] == 30.0
    assert change.usage == lifecycle.Usage("a", "1970-01-01", 30.0)
    outcome = lifecycle.cancel_outcome(RUNNING, change, record(RUNNING))
    assert (outcome.lease_id, outcome.executor_id, outcome.events) == ("l-1", "x-1", change.events)


def test_update_outcome_reports_the_decision() -> None:
    change = transition(lifecycle.update(RUNNING.id, RUNNING, "l-1", UpdateKind.LOG, b"", NOW))
    accepted = lifecycle.update_outcome(change, record(RUNNING))
    assert (accepted.accepted, accepted.message, accepted.events) == (
        True,
        "accepted",
        change.events,
    )
    refused = lifecycle.update_outcome(Refusal(False, "no"), None)
    assert (refused.accepted, refused.job, refused.events) == (False, None, [])


# --- submit and sessions ----------------------------------------------------


def new_job(**changes: Any) -> NewJob:
    job = NewJob("t", "sim", JobKind.SAMPLER, b"", 1, session_id="s-1")
    return dataclasses.replace(job, **changes)


def test_full_queue_refuses_a_submit() -> None:
    lifecycle.check_queue_room("t", 9, 10)
    with pytest.raises(ResourceExhausted, match="QRELAY_MAX_QUEUED_PER_TENANT"):
        lifecycle.check_queue_room("t", 10, 10)


def test_submitted_event_is_the_first_and_queued() -> None:
    event = lifecycle.submitted("j-1", NOW)
    assert (event.seq, event.terminal) == (1, False)
    assert state_change(event.payload).state == int(JobState.QUEUED)


@pytest.mark.parametrize(
    ("session", "error"),
    [
        (None, NotFound),
        ({"tenant": "other", "backend": "sim", "state": 1}, NotFound),
        ({"tenant": "t", "backend": "qpu", "state": 1}, InvalidArgument),
        ({"tenant": "t", "backend": "sim", "state": int(SessionState.CLOSED)}, FailedPrecondition),
        ({"tenant": "t", "backend": "sim", "state": int(SessionState.EXPIRED)}, FailedPrecondition),
    ],
)
def test_job_joins_only_an_accepting_session_of_its_tenant_and_backend(
    session: dict[str, Any] | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        lifecycle.check_session_accepts(new_job(), session)


@pytest.mark.parametrize("state", [SessionState.OPEN, SessionState.ACTIVE])
def test_job_joins_an_open_or_active_session(state: SessionState) -> None:
    lifecycle.check_session_accepts(new_job(), {"tenant": "t", "backend": "sim", "state": state})


@pytest.mark.parametrize(
    ("current", "target", "changes"),
    [
        (SessionState.OPEN, SessionState.CLOSED, True),
        (SessionState.ACTIVE, SessionState.EXPIRED, True),
        (SessionState.CLOSED, SessionState.CANCELLED, True),
        (SessionState.CLOSED, SessionState.EXPIRED, False),
        (SessionState.CANCELLED, SessionState.CLOSED, False),
        (SessionState.EXPIRED, SessionState.CANCELLED, False),
    ],
)
def test_session_ends_once_except_cancel_after_close(
    current: SessionState, target: SessionState, changes: bool
) -> None:
    assert lifecycle.session_may_end(current, target) is changes


@pytest.mark.parametrize("state", [SessionState.OPEN, SessionState.ACTIVE])
def test_a_session_cannot_end_as_a_live_state(state: SessionState) -> None:
    with pytest.raises(ValueError, match="cannot end a session"):
        lifecycle.check_session_end(state)


def test_fair_start_begins_at_the_clock_or_where_the_tenant_left_off() -> None:
    # A tenant new to the backend starts at its clock; one with a backlog, behind it.
    assert lifecycle.fair_start(clock=7.0, tenant_last=0.0, weight=1.0) == (7.0, 8.0)
    assert lifecycle.fair_start(clock=7.0, tenant_last=500.0, weight=1.0) == (500.0, 501.0)
    # Weight w takes 1/w of virtual time per job: three jobs in the time of one.
    assert lifecycle.fair_start(clock=0.0, tenant_last=1.0, weight=3.0)[1] == pytest.approx(4 / 3)


# --- quotas, usage, priorities, queue-position estimates ----------------------


def test_a_queued_cancel_and_an_expired_lease_charge_nothing() -> None:
    queued = facts(state=JobState.QUEUED, lease_id="", executor_id="", started_at=None)
    assert transition(lifecycle.cancel(queued, "", NOW)).usage is None
    # A vanished executor's lost run is not the tenant's to pay for.
    assert lifecycle.expire(RUNNING, max_attempts=3, now=NOW).usage is None
    assert lifecycle.expire(RUNNING, max_attempts=2, now=NOW).usage is None


def test_usage_day_is_the_utc_date() -> None:
    assert lifecycle.usage_day(0.0) == "1970-01-01"
    assert lifecycle.usage_day(86400.0 * 365 - 1) == "1970-12-31"


def test_submit_quota_names_the_quota_its_limit_and_the_use() -> None:
    from qrelay.broker.store.base import Quota
    from qrelay.errors import QuotaExceeded

    quota = Quota(
        max_queued_jobs=100,
        max_executor_seconds=60.0,
        period_start="2026-11-01",
        period_end="2026-12-01",
    )
    lifecycle.check_submit_quota("a", quota, queued=99, executor_seconds=59.9)
    with pytest.raises(QuotaExceeded) as queued:
        lifecycle.check_submit_quota("a", quota, queued=100, executor_seconds=0.0)
    assert str(queued.value) == (
        "tenant 'a' has 100 queued jobs, its quota of queued jobs (max_queued_jobs=100); "
        "wait for some to finish or cancel some"
    )
    assert (queued.value.quota, queued.value.limit, queued.value.used) == (
        "max_queued_jobs",
        100,
        100,
    )
    assert isinstance(queued.value, ResourceExhausted)
    with pytest.raises(QuotaExceeded) as spent:
        lifecycle.check_submit_quota("a", quota, queued=0, executor_seconds=61.5)
    assert str(spent.value) == (
        "tenant 'a' used 61.5 executor-seconds since 2026-11-01, its quota of executor-seconds "
        "per period (max_executor_seconds=60); the budget renews on 2026-12-01 "
        "(see service.usage())"
    )
    lifecycle.check_submit_quota("a", Quota(), queued=10**6, executor_seconds=1e9)  # no limits


def test_session_and_program_quotas() -> None:
    from qrelay.broker.store.base import Quota
    from qrelay.errors import QuotaExceeded

    quota = Quota(max_sessions=2, max_program_bytes=1000)
    lifecycle.check_session_quota("a", quota, 1)
    with pytest.raises(QuotaExceeded, match=r"2 open sessions.*max_sessions=2"):
        lifecycle.check_session_quota("a", quota, 2)
    lifecycle.check_program_quota("a", quota, stored=600, adding=400)
    with pytest.raises(
        QuotaExceeded,
        match=r"has 600 bytes of programs stored and this upload adds 401, its quota of bytes "
        r"of programs stored \(max_program_bytes=1000\)",
    ):
        lifecycle.check_program_quota("a", quota, stored=600, adding=401)
    lifecycle.check_session_quota("a", None, 10**6)
    lifecycle.check_program_quota("a", None, 10**9, 10**9)


def test_running_room_counts_each_tenants_starts_against_its_limit() -> None:
    from qrelay.broker.store.base import RunningLimits

    room = lifecycle.RunningRoom(RunningLimits(default=2, tenants={"big": None}), {"a": 1})
    assert room.blocked() == []
    assert room.take("a")  # 2 of 2
    assert room.blocked() == ["a"]
    assert not room.take("a")
    assert all(room.take("big") for _ in range(50))  # no limit for "big"
    assert [room.take("b") for _ in range(3)] == [True, True, False]
    unlimited = lifecycle.RunningRoom(None, {})
    assert not unlimited.active
    assert unlimited.take("a")


def test_priority_is_bounded() -> None:
    lifecycle.check_priority(10)
    lifecycle.check_priority(-10)
    with pytest.raises(InvalidArgument, match="between -10 and 10"):
        lifecycle.check_priority(11)


@pytest.mark.parametrize(
    ("ahead", "own", "active", "position"),
    [(0, 1.0, 3.0, 1), (4, 1.0, 1.0, 5), (4, 1.0, 2.0, 9), (3, 2.0, 3.0, 6), (5, 1.0, 0.0, 6)],
)
def test_estimated_position_scales_own_jobs_ahead_by_the_active_weights(
    ahead: int, own: float, active: float, position: int
) -> None:
    assert lifecycle.estimated_position(ahead, own, active) == position


def test_estimated_length_is_zero_without_own_queued_jobs() -> None:
    assert lifecycle.estimated_length(0, 1.0, 5.0) == 0
    assert lifecycle.estimated_length(3, 1.0, 2.0) == 6
