"""The JobStore contract, parametrised over every implementation via the `store` fixture."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from qrelay._proto.v1 import types_pb2
from qrelay.broker.store import (
    BackendRecord,
    JobKind,
    JobState,
    JobStore,
    NewJob,
    UpdateKind,
    lifecycle,
)
from qrelay.broker.store.base import (
    NewProgram,
    NewSession,
    Quota,
    Role,
    RunningLimits,
    SessionMode,
    SessionState,
    TenantRecord,
    TokenRecord,
    UserRecord,
)
from qrelay.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
)

TTL = 30.0


def new_job(tenant: str = "t1", backend: str = "aer", key: str = "", **kw: object) -> NewJob:
    return NewJob(
        tenant=tenant,
        backend=backend,
        kind=JobKind.SAMPLER,
        spec=b"spec-" + backend.encode(),
        num_pubs=1,
        idempotency_key=key,
        **kw,  # type: ignore[arg-type]
    )


def event(payload: bytes) -> types_pb2.JobEvent:
    return types_pb2.JobEvent.FromString(payload)


async def submit(store: JobStore, job: NewJob | None = None, limit: int = 100) -> str:
    record, created = await store.submit(job or new_job(), max_queued_per_tenant=limit)
    assert created
    return record.id


async def test_submit_creates_queued_job_with_first_event(store: JobStore) -> None:
    session = await store.create_session(NewSession("t1", "aer", SessionMode.BATCH, 60, 60))
    job, created = await store.submit(
        new_job(session_id=session.id, tags={"a": "b"}), max_queued_per_tenant=10
    )
    assert created
    assert job.state is JobState.QUEUED
    assert job.attempts == 0
    assert job.last_seq == 1
    assert job.tags == {"a": "b"}
    assert job.session_id == session.id
    assert job.queue_position == 1
    assert await store.get_spec(job.id) == b"spec-aer"
    (first,) = await store.events_after(job.id, 0)
    assert first.seq == 1
    assert not first.terminal
    assert event(first.payload).state.state == types_pb2.JOB_STATE_QUEUED


async def test_submit_keeps_a_caller_chosen_job_id(store: JobStore) -> None:
    from qrelay.broker.store.base import new_job_id

    chosen = new_job_id()
    job, created = await store.submit(new_job(id=chosen), max_queued_per_tenant=10)
    assert created
    assert job.id == chosen
    assert (await store.get(chosen)).id == chosen


async def test_idempotency_key_is_unique_per_tenant(store: JobStore) -> None:
    a, created_a = await store.submit(new_job(key="k"), max_queued_per_tenant=10)
    b, created_b = await store.submit(new_job(key="k"), max_queued_per_tenant=10)
    c, created_c = await store.submit(new_job(tenant="t2", key="k"), max_queued_per_tenant=10)
    assert created_a
    assert not created_b
    assert created_c
    assert a.id == b.id != c.id


async def test_concurrent_idempotent_submits_create_one_job(store: JobStore) -> None:
    results = await asyncio.gather(
        *(store.submit(new_job(key="same"), max_queued_per_tenant=100) for _ in range(10))
    )
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_queue_limit_per_tenant(store: JobStore) -> None:
    await submit(store, limit=2)
    await submit(store, limit=2)
    with pytest.raises(ResourceExhausted, match="at most 2 per tenant"):
        await store.submit(new_job(), max_queued_per_tenant=2)
    await submit(store, new_job(tenant="other"), limit=2)  # other tenants unaffected


async def test_get_of_another_tenants_job_is_not_found(store: JobStore) -> None:
    job_id = await submit(store)
    assert (await store.get(job_id, "t1")).id == job_id
    with pytest.raises(NotFound):
        await store.get(job_id, "t2")
    with pytest.raises(NotFound):
        await store.get("j-missing")


async def test_claim_is_fifo_per_backend_and_counts_attempts(store: JobStore) -> None:
    ids = [await submit(store) for _ in range(3)]
    other = await submit(store, new_job(backend="fake_manila"))
    job = await store.get(ids[2])
    assert job.queue_position == 3
    grants = await store.claim(["aer"], "e-1", TTL, 2)
    assert [g.job.id for g in grants] == ids[:2]
    g = grants[0]
    assert g.job.state is JobState.RUNNING
    assert g.job.attempts == 1
    assert g.job.executor_id == "e-1"
    assert g.job.lease_id
    assert g.spec == b"spec-aer"
    assert g.job.lease_expires_at is not None
    assert g.job.lease_expires_at > time.time()
    assert [e.seq for e in g.events] == [2]
    change = event(g.events[0].payload).state
    assert change.state == types_pb2.JOB_STATE_RUNNING
    assert change.executor_id == "e-1"
    assert change.attempt == 1
    assert (await store.get(ids[2])).queue_position == 1
    rest = await store.claim(["aer", "fake_manila"], "e-2", TTL, 10)
    # Fair share orders each backend's queue; across backends there is no order.
    assert {r.job.id for r in rest} == {ids[2], other}
    assert await store.claim(["aer"], "e-2", TTL, 10) == []


async def claim_order(store: JobStore, claims: int) -> list[str]:
    """The tenants of the next `claims` jobs claimed one at a time."""
    order = []
    for _ in range(claims):
        (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
        order.append(grant.job.tenant)
    return order


async def test_a_tenants_first_job_waits_for_a_share_not_for_anothers_backlog(
    store: JobStore,
) -> None:
    for _ in range(500):
        await submit(store, new_job("a"), limit=1000)
    # Two slots busy with A's work, then B's first job arrives behind 498 of A's.
    assert len(await store.claim(["aer"], "e-1", TTL, 2)) == 2
    b_job = await submit(store, new_job("b"))
    assert (await store.get(b_job)).queue_position == 1
    assert await claim_order(store, 3) == ["b", "a", "a"]


async def test_tenants_share_a_backend_by_weight_and_in_order_within_each(
    store: JobStore,
) -> None:
    ids: dict[str, list[str]] = {"a": [], "b": []}
    for _ in range(40):
        for tenant, weight in (("a", 1.0), ("b", 3.0)):
            ids[tenant].append(await submit(store, new_job(tenant, weight=weight)))
    order = await claim_order(store, 40)
    # B weighs three times A: three of B's jobs for each of A's, in every stretch.
    assert order.count("b") == 30
    assert all(order[i : i + 4].count("a") == 1 for i in range(0, 40, 4))
    claimed = [g.job.id for g in await store.claim(["aer"], "e-1", TTL, 100)]
    assert [j for j in claimed if j in ids["a"]] == ids["a"][10:], "FIFO within a tenant"


async def test_a_busy_dedicated_session_jumps_the_queue_only_so_far(store: JobStore) -> None:
    session = await store.create_session(NewSession("a", "aer", SessionMode.DEDICATED, 600, 600))
    for _ in range(20):
        await submit(store, new_job("a", session_id=session.id))
    (first,) = await store.claim(["aer"], "e-1", TTL, 1)  # pins the session to e-1
    assert first.job.session_id == session.id
    await submit(store, new_job("b"))
    order = await claim_order(store, 8)
    # The session keeps its executor busy, but B's job waits SESSION_JUMP jobs at most.
    assert order.index("b") == int(lifecycle.SESSION_JUMP)


async def test_a_requeued_job_keeps_its_place_in_the_fair_order(store: JobStore) -> None:
    first = await submit(store, new_job("a"))
    for _ in range(5):
        await submit(store, new_job("a"))
    await submit(store, new_job("b"))
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    assert grant.job.id == first
    await store.expire_leases(time.time() + 2 * TTL, max_attempts=3)
    (again,) = await store.claim(["aer"], "e-2", TTL, 1)
    assert again.job.id == first


async def test_concurrent_claims_never_hand_one_job_to_two_executors(store: JobStore) -> None:
    ids = {await submit(store) for _ in range(20)}
    batches = await asyncio.gather(*(store.claim(["aer"], f"e-{i}", TTL, 3) for i in range(10)))
    claimed = [g.job.id for batch in batches for g in batch]
    assert len(claimed) == len(set(claimed)) == 20
    assert set(claimed) == ids


async def test_result_update_is_fenced_by_lease(store: JobStore) -> None:
    job_id = await submit(store)
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    result = types_pb2.JobResult(program_json="42").SerializeToString()
    stale = await store.apply_update(job_id, "l-other", UpdateKind.RESULT, result)
    assert not stale.accepted
    assert "not the current lease" in stale.message
    log_line = types_pb2.LogLine(text="hi").SerializeToString()
    logged = await store.apply_update(job_id, grant.job.lease_id, UpdateKind.LOG, log_line)
    assert logged.accepted
    assert [e.seq for e in logged.events] == [3]
    done = await store.apply_update(job_id, grant.job.lease_id, UpdateKind.RESULT, result)
    assert done.accepted
    assert done.job is not None
    assert done.job.state is JobState.DONE
    assert [e.seq for e in done.events] == [4, 5]
    assert event(done.events[0].payload).result.program_json == "42"
    assert done.events[1].terminal
    assert not done.events[0].terminal
    assert await store.get_result(job_id) == result
    again = await store.apply_update(job_id, grant.job.lease_id, UpdateKind.RESULT, result)
    assert not again.accepted
    assert "DONE" in again.message
    assert [e.seq for e in await store.events_after(job_id, 0)] == [1, 2, 3, 4, 5]
    unknown = await store.apply_update("j-nope", "l", UpdateKind.LOG, log_line)
    assert not unknown.accepted
    assert "unknown job" in unknown.message


async def test_progress_and_interim_events_are_stored_under_their_attempt(
    store: JobStore,
) -> None:
    job_id = await submit(store)
    (first,) = await store.claim(["aer"], "e-1", TTL, 1)
    interim = types_pb2.Interim(value_json="1").SerializeToString()
    lease = first.job.lease_id
    assert (await store.apply_update(job_id, lease, UpdateKind.INTERIM, interim)).accepted
    # The executor vanishes; the job runs again, its second attempt publishes too.
    await store.expire_leases(time.time() + 2 * TTL, max_attempts=3)
    (second,) = await store.claim(["aer"], "e-2", TTL, 1)
    progress = types_pb2.Progress(stage="run", done=2, total=5).SerializeToString()
    lease = second.job.lease_id
    assert (await store.apply_update(job_id, lease, UpdateKind.PROGRESS, progress)).accepted
    assert (await store.apply_update(job_id, lease, UpdateKind.INTERIM, interim)).accepted
    stored = [event(e.payload) for e in await store.events_after(job_id, 0)]
    published = [(e.WhichOneof("payload"), e.attempt) for e in stored if not e.HasField("state")]
    assert published == [("interim", 1), ("progress", 2), ("interim", 2)]
    assert stored[-2].progress == types_pb2.Progress(stage="run", done=2, total=5)


async def test_error_update_fails_the_job(store: JobStore) -> None:
    job_id = await submit(store)
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    error = types_pb2.JobError(code=3, message="bad circuit").SerializeToString()
    out = await store.apply_update(job_id, grant.job.lease_id, UpdateKind.ERROR, error)
    assert out.job is not None
    assert out.job.state is JobState.FAILED
    assert out.job.error == error
    assert [event(e.payload).WhichOneof("payload") for e in out.events] == ["error", "state"]


async def test_released_under_valid_lease_requeues(store: JobStore) -> None:
    job_id = await submit(store)
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    released = types_pb2.JobEvent().SerializeToString()  # an empty Released
    out = await store.apply_update(job_id, grant.job.lease_id, UpdateKind.RELEASED, released)
    assert out.accepted
    assert out.job is not None
    assert out.job.state is JobState.QUEUED
    assert out.job.attempts == 0
    assert not out.job.lease_id


async def test_expired_leases_requeue_then_fail_after_max_attempts(store: JobStore) -> None:
    job_id = await submit(store)
    (grant,) = await store.claim(["aer"], "e-1", 0.0, 1)
    assert await store.next_lease_expiry() == pytest.approx(grant.job.lease_expires_at)
    (expired,) = await store.expire_leases(time.time() + 1, max_attempts=2)
    assert expired.job.state is JobState.QUEUED
    assert expired.lease_id == grant.job.lease_id
    change = event(expired.events[0].payload).state
    assert change.message == "lease expired on executor e-1; requeued (attempt 1 of 2)"
    assert not (await store.get(job_id)).lease_id
    await store.claim(["aer"], "e-2", 0.0, 1)
    (failed,) = await store.expire_leases(time.time() + 1, max_attempts=2)
    assert failed.job.state is JobState.FAILED
    assert failed.job.attempts == 2
    error = types_pb2.JobError.FromString(failed.job.error or b"")
    assert error.code == 14
    assert "attempt 2 of 2" in error.message
    assert failed.events[-1].terminal
    assert await store.expire_leases(time.time() + 1, max_attempts=2) == []


async def test_heartbeat_extends_only_current_leases(store: JobStore) -> None:
    await submit(store)
    (grant,) = await store.claim(["aer"], "e-1", 0.5, 1)
    before = grant.job.lease_expires_at or 0
    extended = await store.extend_leases([grant.job.lease_id, "l-unknown"], TTL)
    assert extended == {grant.job.lease_id}
    assert ((await store.get(grant.job.id)).lease_expires_at or 0) > before + 10
    assert await store.expire_leases(time.time() + 1, 3) == []


async def test_check_held_keeps_current_leases_only(store: JobStore) -> None:
    a = await submit(store)
    b = await submit(store)
    grants = await store.claim(["aer"], "e-1", TTL, 2)
    lease_a = grants[0].job.lease_id
    check = await store.check_held("e-1b", [(a, lease_a), (b, "l-old")], TTL)
    assert check.valid == [(a, lease_a)]
    assert check.invalid == [(b, "l-old")]
    assert (await store.get(a)).executor_id == "e-1b"


async def test_cancel_in_every_state(store: JobStore) -> None:
    queued = await submit(store)
    out = await store.cancel(queued, "t1", "no longer needed")
    assert out.job.state is JobState.CANCELLED
    assert out.previous_state is JobState.QUEUED
    assert not out.lease_id
    assert out.events[-1].terminal
    assert "no longer needed" in event(out.events[-1].payload).state.message

    running = await submit(store)
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    out = await store.cancel(running, "t1", "")
    assert out.previous_state is JobState.RUNNING
    assert (out.lease_id, out.executor_id) == (grant.job.lease_id, "e-1")
    assert not out.job.lease_id
    late = await store.apply_update(running, grant.job.lease_id, UpdateKind.RESULT, b"")
    assert not late.accepted
    confirm = await store.apply_update(running, grant.job.lease_id, UpdateKind.RELEASED, b"")
    assert confirm.accepted
    assert confirm.events == []

    again = await store.cancel(running, "t1", "")
    assert again.events == []
    assert again.job.last_seq == out.job.last_seq
    with pytest.raises(NotFound):
        await store.cancel(running, "t2", "")


async def assert_queued_counts_exact(store: JobStore, tenants: list[str]) -> None:
    """The O(1) counters (queue limit, queue_lengths) agree with the jobs actually queued."""
    by_backend: dict[str, int] = {}
    for tenant in tenants:
        queued = await store.list_jobs(tenant, states=[JobState.QUEUED], page_size=1000)
        for job in queued.jobs:
            by_backend[job.backend] = by_backend.get(job.backend, 0) + 1
        # Its per-backend counters: non-zero exactly where it has queued jobs.
        estimates = await store.queue_estimates(tenant)
        assert set(estimates) == {job.backend for job in queued.jobs}
        assert all(n > 0 for n in estimates.values())
        n = len(queued.jobs)
        # The limit check reports the tenant's counter: exactly n, at limit n.
        with pytest.raises(ResourceExhausted, match=f"already has {n} queued jobs"):
            await store.submit(new_job(tenant=tenant), max_queued_per_tenant=n)
    assert await store.queue_lengths() == by_backend


async def test_queued_counters_stay_exact_across_every_transition(store: JobStore) -> None:
    tenants = ["t1", "t2"]
    a = [await submit(store, new_job(tenant="t1")) for _ in range(4)]
    b = [await submit(store, new_job(tenant="t2", backend="fake_manila")) for _ in range(3)]
    await assert_queued_counts_exact(store, tenants)
    # claim
    grants = await store.claim(["aer"], "e-1", 0.0, 2)
    assert [g.job.id for g in grants] == a[:2]
    await assert_queued_counts_exact(store, tenants)
    fresh, _ = await store.submit(new_job(tenant="t2"), max_queued_per_tenant=100)
    # None of t2's own jobs ahead: its first job starts at the clock (fair share).
    assert fresh.queue_position == 1
    await assert_queued_counts_exact(store, tenants)
    # cancel queued, cancel running
    await store.cancel(a[2], "t1", "x")
    await store.cancel(a[0], "t1", "x")
    await store.apply_update(a[0], grants[0].job.lease_id, UpdateKind.RELEASED, b"")
    await assert_queued_counts_exact(store, tenants)
    # expire (requeue), then claim again and release (requeue)
    (expired,) = await store.expire_leases(time.time() + 1, max_attempts=3)
    assert expired.job.id == a[1]
    assert expired.job.state is JobState.QUEUED
    await assert_queued_counts_exact(store, tenants)
    (again,) = await store.claim(["aer"], "e-2", TTL, 1)
    await assert_queued_counts_exact(store, tenants)
    released = await store.apply_update(again.job.id, again.job.lease_id, UpdateKind.RELEASED, b"")
    assert released.job is not None
    assert released.job.state is JobState.QUEUED
    await assert_queued_counts_exact(store, tenants)
    # a duplicate (idempotent) submit and a refused one change nothing
    await store.submit(new_job(tenant="t2", key="k"), max_queued_per_tenant=100)
    await store.submit(new_job(tenant="t2", key="k"), max_queued_per_tenant=100)
    with pytest.raises(NotFound):
        await store.submit(new_job(tenant="t2", session_id="s-nope"), max_queued_per_tenant=100)
    await assert_queued_counts_exact(store, tenants)
    # session cancel: its queued jobs are cancelled one by one, as sessions.py does
    session = await store.create_session(
        NewSession("t2", "fake_manila", SessionMode.BATCH, 600, 60)
    )
    in_session = [
        await submit(store, new_job(tenant="t2", backend="fake_manila", session_id=session.id))
        for _ in range(2)
    ]
    await assert_queued_counts_exact(store, tenants)
    await store.end_session(session.id, "t2", SessionState.CANCELLED, "stop")
    for job_id in in_session:
        await store.cancel(job_id, None, "session cancelled")
    await assert_queued_counts_exact(store, tenants)
    # everything claimed, run to a result, or cancelled: all counters at zero
    for grant in await store.claim(["aer", "fake_manila"], "e-3", TTL, 100):
        await store.apply_update(grant.job.id, grant.job.lease_id, UpdateKind.RESULT, b"")
    assert await store.queue_lengths() == {}
    await assert_queued_counts_exact(store, tenants)
    assert b  # t2's fake_manila jobs were among those claimed


async def test_list_is_newest_first_paged_and_filtered(store: JobStore) -> None:
    ids = [await submit(store) for _ in range(5)]
    await submit(store, new_job(tenant="t2"))
    await store.claim(["aer"], "e-1", TTL, 1)  # ids[0] -> RUNNING
    page = await store.list_jobs("t1", page_size=2)
    assert [j.id for j in page.jobs] == [ids[4], ids[3]]
    assert page.next_page_token
    page2 = await store.list_jobs("t1", page_size=2, page_token=page.next_page_token)
    page3 = await store.list_jobs("t1", page_size=2, page_token=page2.next_page_token)
    assert [j.id for j in page2.jobs + page3.jobs] == [ids[2], ids[1], ids[0]]
    assert page3.next_page_token == ""
    running = await store.list_jobs("t1", states=[JobState.RUNNING])
    assert [j.id for j in running.jobs] == [ids[0]]
    assert (await store.list_jobs("t1", backend="other")).jobs == []
    with pytest.raises(InvalidArgument):
        await store.list_jobs("t1", page_token="garbage")


async def test_list_filters_by_program_id_or_every_version_of_a_name(store: JobStore) -> None:
    v1, _ = await store.put_program(new_program())
    v2, _ = await store.put_program(new_program(content=b"v2"))
    other, _ = await store.put_program(new_program(name="qaoa"))
    theirs, _ = await store.put_program(new_program(tenant="t2"))

    def program_job(program_id: str, tenant: str = "t1") -> NewJob:
        return NewJob(tenant, "aer", JobKind.PROGRAM, b"spec", 0, program_id=program_id)

    first = await submit(store, program_job(v1.id))
    second = await submit(store, program_job(v2.id))
    qaoa = await submit(store, program_job(other.id))
    await submit(store)  # a sampler job: no program
    their_job = await submit(store, program_job(theirs.id, tenant="t2"))

    by_id = await store.list_jobs("t1", program=v1.id)
    assert [j.id for j in by_id.jobs] == [first]
    by_name = await store.list_jobs("t1", program="vqe")
    assert [j.id for j in by_name.jobs] == [second, first]
    assert [j.id for j in (await store.list_jobs("t1", program="qaoa")).jobs] == [qaoa]
    paged = await store.list_jobs("t1", program="vqe", page_size=1)
    rest = await store.list_jobs("t1", program="vqe", page_token=paged.next_page_token)
    assert [j.id for j in paged.jobs + rest.jobs] == [second, first]
    # Another tenant's program of the same name (and content, so id) lists only its jobs.
    assert [j.id for j in (await store.list_jobs("t2", program=v1.id)).jobs] == [their_job]
    assert [j.id for j in (await store.list_jobs("t2", program="vqe")).jobs] == [their_job]
    assert (await store.list_jobs("t1", program="nope")).jobs == []
    # A program deleted while none of its jobs is unfinished is gone, yet its id still filters.
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    await store.apply_update(grant.job.id, grant.job.lease_id, UpdateKind.RESULT, b"")
    assert grant.job.id == first
    await store.delete_programs("t1", v1.id)
    assert [j.id for j in (await store.list_jobs("t1", program=v1.id)).jobs] == [first]


async def test_renew_running_leases_gives_restarted_broker_a_grace_period(store: JobStore) -> None:
    await submit(store)
    await store.claim(["aer"], "e-1", 0.0, 1)
    assert await store.renew_running_leases(TTL) == 1
    assert await store.expire_leases(time.time() + 1, 3) == []


async def test_backends_are_remembered(store: JobStore) -> None:
    assert await store.get_backend("aer") is None
    info = types_pb2.JobEvent().SerializeToString()
    await store.upsert_backends([BackendRecord("aer", info, 1.0), BackendRecord("b", info, 1.0)])
    await store.upsert_backends([BackendRecord("aer", b"x", 2.0)])
    await store.touch_backends(["b"], 5.0)
    records = {b.name: b for b in await store.list_backends()}
    assert records["aer"].info == b"x"
    assert records["aer"].last_seen == 2.0
    assert records["b"].last_seen == 5.0


async def test_statistics(store: JobStore) -> None:
    await submit(store)
    await submit(store, new_job(backend="b"))
    await store.claim(["b"], "e", TTL, 1)
    assert await store.queue_lengths() == {"aer": 1}
    counts = await store.count_by_state()
    assert counts[JobState.QUEUED] == 1
    assert counts[JobState.RUNNING] == 1


async def test_claim_can_be_limited_to_kinds(store: JobStore) -> None:
    program = await submit(store, NewJob("t1", "aer", JobKind.PROGRAM, b"p", 0))
    sampler = await submit(store)
    grants = await store.claim(["aer"], "e-1", TTL, 5, kinds=[JobKind.SAMPLER])
    assert [g.job.id for g in grants] == [sampler]
    assert [g.job.id for g in await store.claim(["aer"], "e-2", TTL, 5)] == [program]


# --- programs -------------------------------------------------------------------


def new_program(
    name: str = "vqe", content: bytes = b"v1", tenant: str = "t1", **kw: object
) -> NewProgram:
    fields: dict[str, object] = {
        "id": f"p-{name}-{content.decode()}",
        "tenant": tenant,
        "name": name,
        "archive": b"archive-" + content,
        "entry_point": "main:main",
        "requirements": ("six",),
        "input_schema_json": "",
        "description": "d",
        **kw,
    }
    return NewProgram(**fields)  # type: ignore[arg-type]


async def test_put_program_versions_per_name_and_dedupes_by_id(store: JobStore) -> None:
    v1, created = await store.put_program(new_program())
    same, created_again = await store.put_program(new_program())
    v2, _ = await store.put_program(new_program(content=b"v2"))
    other, _ = await store.put_program(new_program(name="qaoa"))
    theirs, _ = await store.put_program(new_program(tenant="t2"))
    assert created
    assert not created_again
    assert same == v1
    assert (v1.version, v2.version, other.version, theirs.version) == (1, 2, 1, 1)
    assert v1.requirements == ("six",)
    assert v1.size_bytes == len(b"archive-v1")
    assert v1.created_at > 0
    assert (await store.get_program("t1", "vqe")).id == v2.id  # a name means the newest
    assert (await store.get_program("t1", v1.id)).version == 1
    assert await store.get_program_archive("t1", v1.id) == b"archive-v1"
    assert [p.id for p in await store.list_programs("t1")] == [other.id, v2.id]  # by name
    assert [p.version for p in await store.list_programs("t1", "vqe")] == [2, 1]
    assert await store.list_programs("t1", "none") == []
    with pytest.raises(NotFound, match="'nope'"):
        await store.get_program("t1", "nope")
    with pytest.raises(NotFound):
        await store.get_program("t2", v2.id)  # another tenant's
    with pytest.raises(NotFound):
        await store.get_program_archive("t2", v2.id)


async def test_delete_programs_by_id_or_name(store: JobStore) -> None:
    v1, _ = await store.put_program(new_program())
    v2, _ = await store.put_program(new_program(content=b"v2"))
    assert await store.delete_programs("t1", v2.id) == 1
    assert (await store.get_program("t1", "vqe")).id == v1.id
    assert await store.delete_programs("t1", "vqe") == 1
    with pytest.raises(NotFound):
        await store.delete_programs("t1", "vqe")
    with pytest.raises(NotFound):
        await store.get_program("t1", v1.id, include_deleted=True)  # nothing needed it: gone
    assert await store.list_programs("t1") == []
    again, created = await store.put_program(new_program())
    assert created
    assert again.version == 1


async def test_deleted_program_is_kept_while_an_unfinished_job_needs_it(store: JobStore) -> None:
    program, _ = await store.put_program(new_program())
    job = await submit(
        store, NewJob("t1", "aer", JobKind.PROGRAM, b"spec", 0, program_id=program.id)
    )
    assert await store.delete_programs("t1", "vqe") == 1
    with pytest.raises(NotFound):
        await store.get_program("t1", program.id)
    assert await store.list_programs("t1") == []
    kept = await store.get_program("t1", program.id, include_deleted=True)
    assert kept.id == program.id
    assert await store.get_program_archive("t1", program.id) == b"archive-v1"
    # Uploading the same content revives the hidden version.
    revived, created = await store.put_program(new_program())
    assert not created
    assert revived.version == 1
    assert await store.delete_programs("t1", program.id) == 1
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    await store.apply_update(job, grant.job.lease_id, UpdateKind.RESULT, b"")
    await store.put_program(new_program(name="other"))
    await store.delete_programs("t1", "other")  # a later delete purges unneeded versions
    with pytest.raises(NotFound):
        await store.get_program("t1", program.id, include_deleted=True)


# --- sessions -------------------------------------------------------------------


async def new_session(
    store: JobStore, mode: SessionMode = SessionMode.DEDICATED, tenant: str = "t1"
) -> str:
    session = await store.create_session(NewSession(tenant, "aer", mode, 600, 60))
    return session.id


async def test_create_and_get_session_with_counts(store: JobStore) -> None:
    session = await store.create_session(NewSession("t1", "aer", SessionMode.BATCH, 600, 60))
    assert session.id.startswith("s-")
    assert session.state is SessionState.OPEN
    assert (session.mode, session.max_time_s, session.max_idle_s) == (SessionMode.BATCH, 600, 60)
    assert session.activated_at is None
    assert session.closed_at is None
    assert session.last_job_at is None
    assert session.executor_id == ""
    assert session.counts == dict.fromkeys(JobState, 0)
    first = await submit(store, new_job(session_id=session.id))
    await submit(store, new_job(session_id=session.id))
    await store.cancel(first, None, "x")
    got = await store.get_session(session.id, "t1")
    assert got.last_job_at is not None
    assert got.counts[JobState.QUEUED] == 1
    assert got.counts[JobState.CANCELLED] == 1
    assert got.unfinished == 1
    assert got.last_finished_at is not None
    with pytest.raises(NotFound):
        await store.get_session(session.id, "t2")
    with pytest.raises(NotFound):
        await store.get_session("s-nope")


async def test_list_sessions_is_newest_first_paged_filtered_and_per_tenant(
    store: JobStore,
) -> None:
    ids = [await new_session(store) for _ in range(4)]
    batch = await new_session(store, SessionMode.BATCH)
    theirs = await new_session(store, tenant="t2")
    other_backend = await store.create_session(
        NewSession("t1", "fake_manila", SessionMode.DEDICATED, 600, 60)
    )
    await store.end_session(ids[1], "t1", SessionState.CLOSED, "closed by the client")
    await submit(store, new_job(session_id=ids[3]))

    everything = await store.list_sessions("t1")
    assert [s.id for s in everything.sessions] == [other_backend.id, batch, *reversed(ids)]
    assert everything.next_page_token == ""
    assert theirs not in [s.id for s in everything.sessions]
    assert [s.id for s in (await store.list_sessions("t2")).sessions] == [theirs]
    # Each record carries its jobs' counts, as get_session's does.
    counted = {s.id: s for s in everything.sessions}[ids[3]]
    assert counted.counts[JobState.QUEUED] == 1

    seen: list[str] = []
    token = ""
    while True:
        page = await store.list_sessions("t1", page_size=2, page_token=token)
        assert len(page.sessions) <= 2
        seen += [s.id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [s.id for s in everything.sessions]

    closed = await store.list_sessions("t1", states=[SessionState.CLOSED])
    assert [s.id for s in closed.sessions] == [ids[1]]
    live = await store.list_sessions("t1", states=[SessionState.OPEN, SessionState.ACTIVE])
    assert ids[1] not in [s.id for s in live.sessions]
    assert len(live.sessions) == 5
    on_manila = await store.list_sessions("t1", backend="fake_manila")
    assert [s.id for s in on_manila.sessions] == [other_backend.id]
    for bad in ("garbage", "1.5", "nan/s-x", "inf/s-x", "1e999/s-x", "/s-x", "9" * 400 + "/s"):
        with pytest.raises(InvalidArgument, match="page_token"):
            await store.list_sessions("t1", page_token=bad)


async def test_submit_checks_the_session_in_its_transaction(store: JobStore) -> None:
    sid = await new_session(store)
    with pytest.raises(NotFound):
        await store.submit(new_job(tenant="t2", session_id=sid), max_queued_per_tenant=10)
    with pytest.raises(NotFound):
        await store.submit(new_job(session_id="s-nope"), max_queued_per_tenant=10)
    with pytest.raises(InvalidArgument, match="differs from the backend 'aer'"):
        await store.submit(new_job(backend="b", session_id=sid), max_queued_per_tenant=10)
    accepted = await submit(store, new_job(session_id=sid, key="k"))
    closed, changed = await store.end_session(sid, "t1", SessionState.CLOSED, "bye")
    assert changed
    assert closed.state is SessionState.CLOSED
    assert closed.state_reason == "bye"
    assert closed.closed_at is not None
    with pytest.raises(FailedPrecondition, match=f"session {sid} is closed"):
        await store.submit(new_job(session_id=sid), max_queued_per_tenant=10)
    # A retried submit of a job accepted before the close still answers with it.
    again, created = await store.submit(new_job(session_id=sid, key="k"), max_queued_per_tenant=10)
    assert again.id == accepted
    assert not created


async def test_end_session_transitions(store: JobStore) -> None:
    sid = await new_session(store)
    closed, changed = await store.end_session(sid, None, SessionState.CLOSED, "a")
    assert changed
    same, changed = await store.end_session(sid, None, SessionState.EXPIRED, "b")
    assert not changed
    assert same.state is SessionState.CLOSED
    cancelled, changed = await store.end_session(sid, None, SessionState.CANCELLED, "c")
    assert changed
    assert cancelled.state is SessionState.CANCELLED
    assert cancelled.closed_at == closed.closed_at
    _, changed = await store.end_session(sid, None, SessionState.CANCELLED, "d")
    assert not changed
    with pytest.raises(NotFound):
        await store.end_session(sid, "t2", SessionState.CLOSED, "x")
    expired, changed = await store.end_session(
        await new_session(store), None, SessionState.EXPIRED, "max_time 600 s reached"
    )
    assert changed
    assert expired.state is SessionState.EXPIRED


async def test_claim_pins_a_dedicated_session_to_the_first_claimer(store: JobStore) -> None:
    sid = await new_session(store)
    ids = [await submit(store, new_job(session_id=sid)) for _ in range(3)]
    (first,) = await store.claim(["aer"], "e-1", TTL, 1)
    assert first.job.id == ids[0]
    session = await store.get_session(sid)
    assert (session.state, session.executor_id) == (SessionState.ACTIVE, "e-1")
    assert session.activated_at is not None
    assert await store.claim(["aer"], "e-2", TTL, 5) == []  # pinned elsewhere
    rest = await store.claim(["aer"], "e-1", TTL, 5)
    assert [g.job.id for g in rest] == ids[1:]


async def test_batch_sessions_activate_without_pinning(store: JobStore) -> None:
    sid = await new_session(store, SessionMode.BATCH)
    a = await submit(store, new_job(session_id=sid))
    b = await submit(store, new_job(session_id=sid))
    assert [g.job.id for g in await store.claim(["aer"], "e-1", TTL, 1)] == [a]
    assert [g.job.id for g in await store.claim(["aer"], "e-2", TTL, 1)] == [b]
    session = await store.get_session(sid)
    assert (session.state, session.executor_id) == (SessionState.ACTIVE, "")


async def test_active_pinned_session_jobs_jump_the_executors_queue(store: JobStore) -> None:
    sid = await new_session(store)
    await submit(store, new_job(session_id=sid))
    await store.claim(["aer"], "e-1", TTL, 1)  # pins to e-1
    backlog = [await submit(store) for _ in range(3)]
    late = await submit(store, new_job(session_id=sid))
    # Another executor takes the backlog in age order and never the pinned job.
    assert [g.job.id for g in await store.claim(["aer"], "e-2", TTL, 1)] == [backlog[0]]
    grants = await store.claim(["aer"], "e-1", TTL, 2)
    assert [g.job.id for g in grants] == [late, backlog[1]]


async def test_closed_pinned_session_jobs_stay_pinned_but_wait_their_turn(
    store: JobStore,
) -> None:
    sid = await new_session(store)
    await submit(store, new_job(session_id=sid))
    await store.claim(["aer"], "e-1", TTL, 1)
    older = await submit(store)
    pinned = await submit(store, new_job(session_id=sid))
    await store.end_session(sid, None, SessionState.CLOSED, "closed")
    assert await store.claim(["aer"], "e-2", TTL, 5) != []  # takes `older` only
    assert (await store.get(older)).executor_id == "e-2"
    assert [g.job.id for g in await store.claim(["aer"], "e-1", TTL, 5)] == [pinned]
    # Closed but still pinned with running work: the reaper must still see it.
    (live,) = await store.live_sessions()
    assert (live.id, live.state, live.counts[JobState.RUNNING]) == (sid, SessionState.CLOSED, 2)


async def test_unpin_lets_another_executor_repin(store: JobStore) -> None:
    sid = await new_session(store)
    first = await submit(store, new_job(session_id=sid))
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    await store.apply_update(first, grant.job.lease_id, UpdateKind.RESULT, b"")
    second = await submit(store, new_job(session_id=sid))
    assert await store.claim(["aer"], "e-2", TTL, 1) == []
    (changed,) = await store.unpin_sessions("e-1")
    assert (changed.id, changed.executor_id) == (sid, "e-1")
    assert await store.unpin_sessions("e-1") == []
    assert [g.job.id for g in await store.claim(["aer"], "e-2", TTL, 1)] == [second]
    session = await store.get_session(sid)
    assert (session.executor_id, session.state) == ("e-2", SessionState.ACTIVE)


async def test_live_sessions_are_open_active_or_closed_with_pinned_work(store: JobStore) -> None:
    open_id = await new_session(store)
    active_id = await new_session(store, SessionMode.BATCH)
    await submit(store, new_job(session_id=active_id))
    await store.claim(["aer"], "e-1", TTL, 1)
    ended = await new_session(store)
    await store.end_session(ended, None, SessionState.EXPIRED, "x")
    live = {s.id: s for s in await store.live_sessions()}
    assert set(live) == {open_id, active_id}
    assert live[active_id].counts[JobState.RUNNING] == 1


# --- deleting jobs, tags --------------------------------------------------------


async def finish(store: JobStore, job_id: str) -> None:
    """Claim the job (the oldest queued on 'aer') and give it a result."""
    (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
    assert grant.job.id == job_id
    result = types_pb2.JobResult(program_json="1").SerializeToString()
    done = await store.apply_update(job_id, grant.job.lease_id, UpdateKind.RESULT, result)
    assert done.accepted


async def test_delete_job_removes_a_finished_job_its_events_result_and_tags(
    store: JobStore,
) -> None:
    job_id = await submit(store, new_job(tags={"keep": "", "x": "1"}))
    other = await submit(store, new_job(tags={"keep": ""}))
    await finish(store, job_id)
    deleted = await store.delete_job(job_id, "t1")
    assert deleted.id == job_id
    assert deleted.state is JobState.DONE
    with pytest.raises(NotFound):
        await store.get(job_id)
    with pytest.raises(NotFound):
        await store.get_result(job_id)
    assert await store.events_after(job_id, 0) == []
    assert [j.id for j in (await store.list_jobs("t1")).jobs] == [other]
    assert [j.id for j in (await store.list_jobs("t1", tags=["keep"])).jobs] == [other]
    assert (await store.list_jobs("t1", tags=["x"])).jobs == []
    with pytest.raises(NotFound):
        await store.delete_job(job_id, "t1")  # a second delete: gone


async def test_delete_job_refuses_unfinished_jobs_naming_their_state(store: JobStore) -> None:
    queued = await submit(store)
    with pytest.raises(FailedPrecondition, match="is QUEUED; only a finished"):
        await store.delete_job(queued, "t1")
    await store.claim(["aer"], "e-1", TTL, 1)
    with pytest.raises(FailedPrecondition, match="is RUNNING"):
        await store.delete_job(queued, "t1")
    assert (await store.get(queued)).state is JobState.RUNNING
    await store.cancel(queued, "t1", "")
    assert (await store.delete_job(queued, "t1")).state is JobState.CANCELLED


async def test_delete_of_another_tenants_job_is_not_found_and_deletes_nothing(
    store: JobStore,
) -> None:
    job_id = await submit(store)
    await store.cancel(job_id, "t1", "")
    with pytest.raises(NotFound, match=f"job '{job_id}' not found"):
        await store.delete_job(job_id, "t2")
    with pytest.raises(NotFound, match="job 'j-missing' not found"):
        await store.delete_job("j-missing", "t2")
    assert (await store.get(job_id)).state is JobState.CANCELLED


async def test_a_deleted_jobs_idempotency_key_is_refused_not_reused(store: JobStore) -> None:
    job_id = await submit(store, new_job(key="k1"))
    await store.cancel(job_id, "t1", "")
    await store.delete_job(job_id, "t1")
    with pytest.raises(FailedPrecondition, match=f"'k1' belonged to job {job_id}, which was del"):
        await store.submit(new_job(key="k1"), max_queued_per_tenant=10)
    # Keys are per tenant: another tenant's k1 is its own.
    await submit(store, new_job(tenant="t2", key="k1"))


async def test_update_tags_replaces_the_tags_and_the_tag_index(store: JobStore) -> None:
    job_id = await submit(store, new_job(tags={"old": "1", "both": ""}))
    updated = await store.update_tags(job_id, "t1", {"both": "2", "new": ""})
    assert updated.tags == {"both": "2", "new": ""}
    assert updated.state is JobState.QUEUED
    assert updated.queue_position == 1
    assert (await store.get(job_id)).tags == {"both": "2", "new": ""}
    assert (await store.list_jobs("t1", tags=["old"])).jobs == []
    assert [j.id for j in (await store.list_jobs("t1", tags=["new", "both"])).jobs] == [job_id]
    cleared = await store.update_tags(job_id, "t1", {})
    assert cleared.tags == {}
    assert (await store.list_jobs("t1", tags=["both"])).jobs == []
    with pytest.raises(NotFound):
        await store.update_tags(job_id, "t2", {"x": ""})
    with pytest.raises(NotFound):
        await store.update_tags("j-missing", "t1", {"x": ""})


async def test_list_by_tags_needs_every_tag_and_pages_newest_first(store: JobStore) -> None:
    a = await submit(store, new_job(tags={"exp": "vqe", "run": "1"}))
    b = await submit(store, new_job(tags={"exp": "qaoa"}))
    c = await submit(store, new_job(tags={"exp": "vqe", "run": "2"}))
    await submit(store, new_job(tenant="t2", tags={"exp": ""}))  # another tenant's
    await submit(store, new_job())  # untagged
    page = await store.list_jobs("t1", tags=["exp"], page_size=2)
    assert [j.id for j in page.jobs] == [c, b]
    rest = await store.list_jobs("t1", tags=["exp"], page_size=2, page_token=page.next_page_token)
    assert [j.id for j in rest.jobs] == [a]
    assert rest.next_page_token == ""
    assert [j.id for j in (await store.list_jobs("t1", tags=["run", "exp"])).jobs] == [c, a]
    assert (await store.list_jobs("t1", tags=["run", "missing"])).jobs == []
    await store.claim(["aer"], "e-1", TTL, 1)  # a -> RUNNING
    running = await store.list_jobs("t1", tags=["exp"], states=[JobState.RUNNING])
    assert [j.id for j in running.jobs] == [a]
    assert (await store.list_jobs("t1", tags=["exp"], backend="other")).jobs == []


@pytest.mark.parametrize(
    "token", ["garbage", "9" * 30, str(2**63), "-5", " 12 ", "1_000", "012", "\u0663"]
)
async def test_a_page_token_the_broker_never_issued_is_invalid_argument(
    store: JobStore, token: str
) -> None:
    with pytest.raises(InvalidArgument, match="is not one this broker issued"):
        await store.list_jobs("t1", page_token=token)
    with pytest.raises(InvalidArgument, match="is not one this broker issued"):
        await store.list_jobs("t1", tags=["k"], page_token=token)
    assert (await store.list_jobs("t1", page_token=str(2**63 - 1))).jobs == []


# --- quotas, usage, priorities and queue positions (schema v6) ----------------


async def test_queued_jobs_quota_refuses_naming_it_and_spares_other_tenants(
    store: JobStore,
) -> None:
    quota = Quota(max_queued_jobs=3)
    for _ in range(3):
        await store.submit(new_job("a"), max_queued_per_tenant=100, quota=quota)
    with pytest.raises(QuotaExceeded) as refused:
        await store.submit(new_job("a"), max_queued_per_tenant=100, quota=quota)
    assert "tenant 'a' has 3 queued jobs" in str(refused.value)
    assert "(max_queued_jobs=3)" in str(refused.value)
    assert (refused.value.quota, refused.value.limit, refused.value.used) == (
        "max_queued_jobs",
        3,
        3,
    )
    await store.submit(new_job("b"), max_queued_per_tenant=100, quota=quota)
    # A retried submit of an accepted job is no new job: still answered.
    keyed = Quota(max_queued_jobs=1)
    first, _ = await store.submit(new_job("c", key="k"), max_queued_per_tenant=100, quota=keyed)
    again, created = await store.submit(
        new_job("c", key="k"), max_queued_per_tenant=100, quota=keyed
    )
    assert (again.id, created) == (first.id, False)
    usage = await store.tenant_usage("a", "2000-01-01")
    assert usage.queued_jobs == 3


async def test_concurrent_submits_never_exceed_the_queued_quota(store: JobStore) -> None:
    quota = Quota(max_queued_jobs=5)
    outcomes = await asyncio.gather(
        *(store.submit(new_job("a"), max_queued_per_tenant=100, quota=quota) for _ in range(12)),
        return_exceptions=True,
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 5
    assert all(isinstance(o, QuotaExceeded) for o in outcomes if isinstance(o, BaseException))


async def run_one(store: JobStore, tenant: str, kind: UpdateKind = UpdateKind.RESULT) -> str:
    """Submit, claim and end one job of `tenant`; returns its id."""
    job_id = await submit(store, new_job(tenant, backend=f"solo-{tenant}"))
    (grant,) = await store.claim([f"solo-{tenant}"], "e-1", TTL, 1)
    assert grant.job.id == job_id
    await asyncio.sleep(0.01)  # some run time to charge (no time is asserted)
    await store.apply_update(job_id, grant.job.lease_id, kind, b"")
    return job_id


async def test_a_finished_run_charges_its_lease_time_to_the_job_and_the_tenants_day(
    store: JobStore,
) -> None:
    before = time.time()
    done = await run_one(store, "a")
    failed = await run_one(store, "a", UpdateKind.ERROR)
    elapsed = time.time() - before
    jobs = [await store.get(done), await store.get(failed)]
    assert all(0 < j.usage_s <= elapsed for j in jobs)
    assert all(j.usage_s == pytest.approx(j.finished_at - j.started_at) for j in jobs)  # type: ignore[operator]
    today = lifecycle.usage_day(time.time())
    usage = await store.tenant_usage("a", today)
    assert usage.executor_seconds == pytest.approx(sum(j.usage_s for j in jobs))
    assert (await store.tenant_usage("b", today)).executor_seconds == 0.0
    # A period that starts later holds none of it.
    assert (await store.tenant_usage("a", "9999-01-01")).executor_seconds == 0.0
    # A run cancelled while running is charged; a queued job cancelled is not.
    running = await submit(store, new_job("a", backend="solo-a"))
    await store.claim(["solo-a"], "e-1", TTL, 1)
    queued = await submit(store, new_job("a", backend="solo-a"))
    await store.cancel(running, "a", "stop")
    await store.cancel(queued, "a", "stop")
    assert (await store.get(running)).usage_s > 0
    assert (await store.get(queued)).usage_s == 0
    total = (await store.tenant_usage("a", today)).executor_seconds
    assert total == pytest.approx(sum(j.usage_s for j in jobs) + (await store.get(running)).usage_s)


async def test_submits_are_refused_once_the_periods_executor_seconds_are_spent(
    store: JobStore,
) -> None:
    today = lifecycle.usage_day(time.time())
    budget = Quota(max_executor_seconds=1e-6, period_start=today)
    await store.submit(new_job("a"), max_queued_per_tenant=100, quota=budget)
    await run_one(store, "a")
    with pytest.raises(
        QuotaExceeded, match=r"max_executor_seconds=0\.000001\b.*next period"
    ) as refused:
        await store.submit(new_job("a"), max_queued_per_tenant=100, quota=budget)
    assert refused.value.quota == "max_executor_seconds"
    assert refused.value.used > 0
    await store.submit(new_job("b"), max_queued_per_tenant=100, quota=budget)
    renewed = Quota(max_executor_seconds=1e-6, period_start="9999-01-01")
    await store.submit(new_job("a"), max_queued_per_tenant=100, quota=renewed)


async def test_running_quota_holds_back_a_tenants_jobs_while_others_run(
    store: JobStore,
) -> None:
    limits = RunningLimits(default=None, tenants={"a": 2})
    a = [await submit(store, new_job("a")) for _ in range(5)]
    for _ in range(5):
        await submit(store, new_job("b"))
    grants = await store.claim(["aer"], "e-1", TTL, 10, running=limits)
    assert sorted(g.job.tenant for g in grants) == ["a", "a"] + ["b"] * 5
    assert await store.claim(["aer"], "e-2", TTL, 10, running=limits) == []
    held = await store.get(a[2])
    assert held.state is JobState.QUEUED  # held back, not failed
    # One of A's runs ends: exactly one more of A's starts, the oldest waiting.
    first = next(g for g in grants if g.job.tenant == "a")
    await store.apply_update(first.job.id, first.job.lease_id, UpdateKind.RESULT, b"")
    (next_a,) = await store.claim(["aer"], "e-2", TTL, 10, running=limits)
    assert next_a.job.id == a[2]
    assert (await store.tenant_usage("a", "2000-01-01")).running_jobs == 2
    # Without limits the rest run.
    assert len(await store.claim(["aer"], "e-2", TTL, 10)) == 2


async def test_concurrent_claims_never_exceed_a_running_quota(store: JobStore) -> None:
    limits = RunningLimits(default=3)
    for _ in range(12):
        await submit(store, new_job("a"))
    batches = await asyncio.gather(
        *(store.claim(["aer"], f"e-{i}", TTL, 2, running=limits) for i in range(8))
    )
    # Never more than the quota; a claim that meets another claiming for the
    # same tenant (PostgreSQL) leaves that tenant to it, so a later one tops up.
    assert 1 <= sum(len(b) for b in batches) <= 3
    await store.claim(["aer"], "e-9", TTL, 10, running=limits)
    assert (await store.tenant_usage("a", "2000-01-01")).running_jobs == 3


async def test_sessions_quota_counts_open_and_active_sessions(store: JobStore) -> None:
    quota = Quota(max_sessions=2)
    first = await store.create_session(NewSession("a", "aer", SessionMode.BATCH, 60, 60), quota)
    await store.create_session(NewSession("a", "aer", SessionMode.DEDICATED, 60, 60), quota)
    with pytest.raises(QuotaExceeded, match=r"2 open sessions.*max_sessions=2"):
        await store.create_session(NewSession("a", "aer", SessionMode.BATCH, 60, 60), quota)
    await store.create_session(NewSession("b", "aer", SessionMode.BATCH, 60, 60), quota)
    await store.end_session(first.id, "a", SessionState.CLOSED, "done")
    await store.create_session(NewSession("a", "aer", SessionMode.BATCH, 60, 60), quota)
    assert (await store.tenant_usage("a", "2000-01-01")).open_sessions == 2


async def test_program_storage_quota_counts_every_stored_version(store: JobStore) -> None:
    quota = Quota(max_program_bytes=30)
    v1, _ = await store.put_program(new_program(content=b"one"), quota)  # 11 bytes
    await store.put_program(new_program(content=b"two"), quota)  # 22
    again, created = await store.put_program(new_program(content=b"one"), quota)
    assert (again.id, created) == (v1.id, False)  # stored already: adds nothing
    with pytest.raises(QuotaExceeded, match=r"22 bytes.*adds 11.*max_program_bytes=30"):
        await store.put_program(new_program(content=b"333"), quota)
    await store.put_program(new_program(content=b"333", tenant="t2"), quota)
    await store.delete_programs("t1", v1.id)
    await store.put_program(new_program(content=b"333"), quota)
    assert (await store.tenant_usage("t1", "2000-01-01")).program_bytes == 22


async def test_a_higher_priority_job_is_its_tenants_next_without_changing_the_share(
    store: JobStore,
) -> None:
    for _ in range(4):
        await submit(store, new_job("a"))
        await submit(store, new_job("b"))
    urgent = await submit(store, new_job("a", priority=5))
    order = []
    claimed_a = []
    for _ in range(9):
        (grant,) = await store.claim(["aer"], "e-1", TTL, 1)
        order.append(grant.job.tenant)
        if grant.job.tenant == "a":
            claimed_a.append(grant.job.id)
    # A's first turn already runs the priority-5 job; turns alternate as without it.
    assert claimed_a[0] == urgent
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b", "a"]


async def test_priorities_reorder_a_tenants_queue_highest_first_then_fifo(
    store: JobStore,
) -> None:
    low = await submit(store, new_job("a", priority=-1))
    plain = [await submit(store, new_job("a")) for _ in range(2)]
    high = await submit(store, new_job("a", priority=3))
    higher = await submit(store, new_job("a", priority=7))
    # A claim of two takes the two best; then one at a time, best first.
    claimed = {g.job.id for g in await store.claim(["aer"], "e-1", TTL, 2)}
    assert claimed == {higher, high}
    one_by_one = [(await store.claim(["aer"], "e-1", TTL, 1))[0].job.id for _ in range(3)]
    assert one_by_one == [*plain, low]
    assert (await store.get(higher)).priority == 7


async def test_queue_position_counts_own_jobs_ahead_never_other_tenants_backlog(
    store: JobStore,
) -> None:
    for _ in range(10):
        await submit(store, new_job("a"), limit=1000)
    b = [await submit(store, new_job("b"), limit=1000) for _ in range(3)]
    # Two active tenants of weight 1: each own job ahead stands for two jobs.
    positions = [(await store.get(j)).queue_position for j in b]
    assert positions == [1, 3, 5]
    listed = await store.list_jobs("b")
    assert sorted(j.queue_position for j in listed.jobs) == [1, 3, 5]
    estimates = await store.queue_estimates("b")
    assert estimates == {"aer": 6}
    for _ in range(300):
        await submit(store, new_job("a"), limit=1000)
    assert [(await store.get(j)).queue_position for j in b] == positions
    assert sorted(j.queue_position for j in (await store.list_jobs("b")).jobs) == [1, 3, 5]
    assert await store.queue_estimates("b") == estimates
    fresh, _ = await store.submit(new_job("b"), max_queued_per_tenant=1000)
    assert fresh.queue_position == 7
    # A tenant alone on a backend sees its exact place.
    alone = [await submit(store, new_job("c", backend="solo")) for _ in range(3)]
    assert [(await store.get(j)).queue_position for j in alone] == [1, 2, 3]
    assert await store.queue_estimates("nobody") == {}


async def test_random_priorities_change_a_tenants_order_but_never_the_turns(
    store: JobStore,
) -> None:
    """Seeded (random.Random(12)): A's 30 jobs with priorities in -3..3 beside
    B's 15 (weight 2 against A's 1). Claimed one at a time, whose turn it is
    matches the same queue without priorities exactly, and A's jobs come out
    highest priority first, in submission order within a priority."""
    import random

    rng = random.Random(12)
    priorities = [rng.randint(-3, 3) for _ in range(30)]

    async def turns(with_priorities: bool, backend: str) -> tuple[list[str], list[str]]:
        a_ids = []
        for i, p in enumerate(priorities):
            job = new_job("a", backend=backend, priority=p if with_priorities else 0)
            a_ids.append(await submit(store, job))
            if i % 2:
                await submit(store, new_job("b", backend=backend, weight=2.0))
        tenants, a_claimed = [], []
        for _ in range(45):
            (grant,) = await store.claim([backend], "e-1", TTL, 1)
            tenants.append(grant.job.tenant)
            if grant.job.tenant == "a":
                a_claimed.append(grant.job.id)
        order = sorted(range(30), key=lambda i: (-priorities[i], i))
        expected = [a_ids[i] for i in order] if with_priorities else a_ids
        assert a_claimed == expected
        return tenants, a_claimed

    plain, _ = await turns(False, "plain")
    ranked, _ = await turns(True, "ranked")
    assert ranked == plain


# --- identity: tenants, tokens, tenant-restricted executors ----------------------------


def token(
    n: int,
    role: Role = Role.USER,
    tenant: str = "alice",
    executor_tenants: tuple[str, ...] | None = None,
    expires_at: float | None = None,
) -> TokenRecord:
    return TokenRecord(
        id=f"tok-{n}",
        prefix=f"qrl_pref{n:04d}",
        role=role,
        tenant=tenant,
        executor_tenants=executor_tenants,
        label=f"label {n}",
        created_at=1000.0 + n,
        expires_at=expires_at,
        revoked_at=None,
        digest=bytes([n]) * 32,
    )


def tenant_job(tenant: str) -> NewJob:
    return NewJob(tenant=tenant, backend="aer", kind=JobKind.SAMPLER, spec=b"s", num_pubs=1)


async def test_tenants_are_created_once_and_listed_by_name(store: JobStore) -> None:
    await store.create_tenant(TenantRecord("bob", "B", 2.0))
    await store.create_tenant(TenantRecord("alice", "A", 1.0))
    with pytest.raises(AlreadyExists, match="tenant 'bob' already exists"):
        await store.create_tenant(TenantRecord("bob", "again", 3.0))
    assert [t.name for t in await store.list_tenants()] == ["alice", "bob"]
    assert await store.get_tenant("bob") == TenantRecord("bob", "B", 2.0)
    assert await store.get_tenant("carol") is None


async def test_tokens_are_found_by_prefix_with_their_digest_and_listed_without(
    store: JobStore,
) -> None:
    assert await store.count_tokens() == 0
    await store.create_token(token(1))
    await store.create_token(token(2, Role.EXECUTOR, "", executor_tenants=("alice", "bob")))
    await store.create_token(token(3, Role.ADMIN, ""))
    with pytest.raises(AlreadyExists):
        await store.create_token(token(1))
    found = await store.find_token("qrl_pref0002")
    assert found == token(2, Role.EXECUTOR, "", executor_tenants=("alice", "bob"))
    assert found is not None
    assert found.digest == bytes([2]) * 32
    assert await store.find_token("qrl_nothere") is None
    listed = await store.list_tokens()
    assert [t.id for t in listed] == ["tok-1", "tok-2", "tok-3"]
    assert all(t.digest == b"" for t in listed)
    assert [t.id for t in await store.list_tokens("alice")] == ["tok-1"]
    assert await store.count_tokens() == 3
    assert await store.count_tokens(Role.ADMIN) == 1


async def test_revoked_and_expired_tokens_are_not_live_admins(store: JobStore) -> None:
    await store.create_token(token(1, Role.ADMIN, "", expires_at=time.time() - 1))
    await store.create_token(token(2, Role.ADMIN, ""))
    assert await store.count_tokens(Role.ADMIN) == 1
    revoked = await store.revoke_token("tok-2", 5000.0)
    assert revoked.revoked_at == 5000.0
    again = await store.revoke_token("tok-2", 6000.0)
    assert again.revoked_at == 5000.0, "the first revocation time is kept"
    assert await store.count_tokens(Role.ADMIN) == 0
    assert await store.count_tokens() == 2
    found = await store.find_token("qrl_pref0002")
    assert found is not None
    assert found.revoked_at == 5000.0
    with pytest.raises(NotFound, match="token 'tok-9' not found"):
        await store.revoke_token("tok-9", 1.0)


async def test_claim_restricted_to_tenants_never_takes_another_tenants_job(
    store: JobStore,
) -> None:
    bobs, _ = await store.submit(tenant_job("bob"), max_queued_per_tenant=10)
    alices, _ = await store.submit(tenant_job("alice"), max_queued_per_tenant=10)
    grants = await store.claim(["aer"], "e-a", TTL, 5, tenants=["alice"])
    assert [g.job.id for g in grants] == [alices.id]
    assert await store.claim(["aer"], "e-a", TTL, 5, tenants=["alice"]) == []
    assert await store.claim(["aer"], "e-none", TTL, 5, tenants=[]) == []
    (grant,) = await store.claim(["aer"], "e-any", TTL, 5)
    assert grant.job.id == bobs.id


async def test_backend_access_folds_executors_per_backend(store: JobStore) -> None:
    assert await store.backend_access() == {}
    await store.set_backend_access("e-a", ["aer", "qpu"], ["alice"])
    await store.set_backend_access("e-b", ["qpu"], ["bob"])
    assert await store.backend_access() == {
        "aer": frozenset({"alice"}),
        "qpu": frozenset({"alice", "bob"}),
    }
    await store.set_backend_access("e-any", ["aer"], None)
    assert (await store.backend_access())["aer"] is None
    # An executor announcing again replaces what it announced before.
    await store.set_backend_access("e-a", ["qpu"], ["alice"])
    await store.set_backend_access("e-any", ["other"], None)
    assert await store.backend_access() == {
        "qpu": frozenset({"alice", "bob"}),
        "other": None,
    }


# --- identity: users --------------------------------------------------------------------


async def test_a_user_name_is_unique_within_its_tenant_only(store: JobStore) -> None:
    alice = UserRecord("lab", "alice@lab", Role.USER, 1.0)
    assert await store.create_user(alice) == alice
    with pytest.raises(AlreadyExists, match="user 'alice@lab' already exists in tenant 'lab'"):
        await store.create_user(UserRecord("lab", "alice@lab", Role.ADMIN, 2.0))
    elsewhere = UserRecord("other", "alice@lab", Role.ADMIN, 3.0)
    await store.create_user(elsewhere)
    assert await store.get_user("lab", "alice@lab") == alice, "the first one is unchanged"
    assert await store.get_user("other", "alice@lab") == elsewhere
    assert await store.get_user("lab", "bob@lab") is None


async def test_users_are_listed_per_tenant_by_name(store: JobStore) -> None:
    for tenant, name in (("lab", "carol"), ("other", "zed"), ("lab", "alice"), ("other", "bob")):
        await store.create_user(UserRecord(tenant, name, Role.USER, 1.0))
    everyone = await store.list_users()
    assert [(u.tenant, u.name) for u in everyone] == [
        ("lab", "alice"),
        ("lab", "carol"),
        ("other", "bob"),
        ("other", "zed"),
    ]
    assert [u.name for u in await store.list_users("lab")] == ["alice", "carol"]
    assert await store.list_users("nobody") == []


async def test_disabling_a_user_keeps_the_first_time_and_shows_on_its_tokens(
    store: JobStore,
) -> None:
    await store.create_user(UserRecord("alice", "al", Role.USER, 1.0))
    await store.create_user(UserRecord("bob", "al", Role.USER, 1.0))
    await store.create_token(replace(token(1), user="al"))
    await store.create_token(replace(token(2, tenant="bob"), user="al"))
    await store.create_token(token(3))
    found = await store.find_token("qrl_pref0001")
    assert found is not None
    assert (found.user, found.user_disabled_at) == ("al", None)
    disabled = await store.disable_user("alice", "al", 5000.0)
    assert disabled.disabled_at == 5000.0
    again = await store.disable_user("alice", "al", 6000.0)
    assert again.disabled_at == 5000.0, "the first disabling time is kept"
    found = await store.find_token("qrl_pref0001")
    assert found is not None
    assert found.user_disabled_at == 5000.0
    same_name = await store.find_token("qrl_pref0002")
    assert same_name is not None
    assert same_name.user_disabled_at is None, "another tenant's user of that name is untouched"
    no_user = await store.find_token("qrl_pref0003")
    assert no_user is not None
    assert (no_user.user, no_user.user_disabled_at) == (None, None)
    assert [t.user for t in await store.list_tokens("alice")] == ["al", None]
    with pytest.raises(NotFound, match="user 'al' not found in tenant 'carol'"):
        await store.disable_user("carol", "al", 1.0)
