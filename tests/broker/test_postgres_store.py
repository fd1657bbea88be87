"""What only the PostgreSQL store has to prove: several brokers' stores on one database.

Each "replica" here is its own `PostgresJobStore` (own pool, own connections)
on the same fresh schema, as separate broker processes would be. The shared
behaviour of every store is in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError

from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import BackendRecord, JobKind, JobState, NewJob, UpdateKind, open_store
from qrelay.broker.store.postgres import PostgresJobStore
from qrelay.broker.store.schema import MIGRATIONS, SCHEMA_VERSION
from qrelay.broker.store.sqlite import SQLiteJobStore
from qrelay.errors import ResourceExhausted, Unavailable
from tests.broker.conftest import postgres_schema

TTL = 30.0


def new_job(tenant: str = "t1", key: str = "") -> NewJob:
    return NewJob(tenant, "aer", JobKind.SAMPLER, b"spec", 1, idempotency_key=key)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PostgresJobStore, PostgresJobStore]]:
    """Two stores (two replicas' worth of connections) on one fresh schema."""
    async with postgres_schema() as (dsn, schema):
        one = PostgresJobStore(dsn, schema=schema, origin="r1")
        two = PostgresJobStore(dsn, schema=schema, origin="r2")
        await asyncio.gather(one.open(), two.open())  # concurrent migrations are serialized
        try:
            yield one, two
        finally:
            await asyncio.gather(one.close(), two.close())


async def test_two_replicas_claiming_at_once_never_lease_a_job_twice(
    pair: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    one, two = pair
    ids = {(await one.submit(new_job(), max_queued_per_tenant=100))[0].id for _ in range(40)}
    batches = await asyncio.gather(
        *((one if i % 2 else two).claim(["aer"], f"e-{i}", TTL, 3) for i in range(20))
    )
    claimed = [g.job.id for batch in batches for g in batch]
    assert len(claimed) == len(set(claimed)) == 40
    assert set(claimed) == ids
    assert (await one.count_by_state())[JobState.RUNNING] == 40


async def test_queue_limit_and_idempotency_hold_across_replicas(
    pair: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    one, two = pair
    outcomes = await asyncio.gather(
        *((one if i % 2 else two).submit(new_job(), max_queued_per_tenant=5) for i in range(12)),
        return_exceptions=True,
    )
    created = [o for o in outcomes if isinstance(o, tuple)]
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    assert (len(created), len(refused)) == (5, 7)
    assert "queues at most 5 per tenant" in str(refused[0])

    same = await asyncio.gather(
        *(
            (one if i % 2 else two).submit(new_job("t2", key="k"), max_queued_per_tenant=5)
            for i in range(8)
        )
    )
    assert len({job.id for job, _ in same}) == 1
    assert sum(was_created for _, was_created in same) == 1


async def test_event_seqs_stay_gap_free_with_writers_on_both_replicas(
    pair: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    one, two = pair
    job, _ = await one.submit(new_job(), max_queued_per_tenant=10)
    (grant,) = await two.claim(["aer"], "e-1", TTL, 1)
    lease = grant.job.lease_id
    outcomes = await asyncio.gather(
        *(
            (one if i % 2 else two).apply_update(job.id, lease, UpdateKind.LOG, b"")
            for i in range(30)
        )
    )
    assert all(o.accepted for o in outcomes)
    seqs = [e.seq for e in await one.events_after(job.id, 0)]
    assert seqs == list(range(1, 33))  # submitted, running, 30 log lines
    assert (await two.get(job.id)).last_seq == 32


async def test_commits_send_hints_and_rolled_back_work_sends_none(
    pair: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    one, two = pair
    heard: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    listener = await asyncpg.connect(**two.connect_kwargs())
    try:
        await listener.add_listener(
            two.channel, lambda _c, _p, _ch, payload: heard.put_nowait(json.loads(payload))
        )

        async def next_hints(count: int) -> list[dict[str, object]]:
            return [await asyncio.wait_for(heard.get(), 5) for _ in range(count)]

        job, _ = await one.submit(new_job(), max_queued_per_tenant=1)
        hints = await next_hints(2)
        assert {"k": "e", "o": "r1", "j": job.id, "s": 1} in hints
        assert {"k": "q", "o": "r1", "b": "aer", "n": int(JobKind.SAMPLER)} in hints

        with pytest.raises(ResourceExhausted):
            await one.submit(new_job(), max_queued_per_tenant=1)  # rolled back: no hint

        (grant,) = await two.claim(["aer"], "e-9", TTL, 1)
        assert await next_hints(1) == [{"k": "e", "o": "r2", "j": job.id, "s": 2}]

        await one.cancel(job.id, "t1", "stop it")
        hints = await next_hints(2)
        assert {"k": "e", "o": "r1", "j": job.id, "s": 3} in hints
        stop = {
            "k": "c",
            "o": "r1",
            "x": "e-9",
            "j": job.id,
            "l": grant.job.lease_id,
            "r": "cancelled: stop it",
        }
        assert stop in hints

        await one.upsert_backends([BackendRecord("fake_manila", b"", time.time())])
        assert await next_hints(1) == [{"k": "b", "o": "r1", "n": ["fake_manila"]}]
        assert heard.empty()
    finally:
        await listener.close()


async def test_presence_of_a_silent_replica_ages_out(
    pair: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    one, two = pair
    now = time.time()
    await one.publish_presence("b-1", [("e-1", ("aer",), 2)], now)
    await two.publish_presence("b-2", [("e-2", ("aer", "fake"), 1)], now - 60)
    fresh = await one.list_presence(since=now - 10)
    assert [(p.executor_id, p.broker_id, p.backends) for p in fresh] == [("e-1", "b-1", ("aer",))]
    # e-1 reconnects to replica b-2: b-1 leaving must not remove b-2's row.
    await two.publish_presence("b-2", [("e-1", ("aer",), 2)], now)
    await one.withdraw_presence("b-1")
    assert [p.broker_id for p in await two.list_presence(since=now - 10)] == ["b-2"]


async def test_open_migrates_once_and_refuses_a_newer_schema() -> None:
    async with postgres_schema() as (dsn, schema):
        store = PostgresJobStore(dsn, schema=schema)
        await store.open()
        await store.close()
        await store.open()  # an existing, current schema is fine
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            versions = await conn.fetch(f'SELECT version FROM "{schema}".schema_version')
            assert [r["version"] for r in versions] == sorted(MIGRATIONS)
            await conn.execute(f'INSERT INTO "{schema}".schema_version VALUES (99)')
        finally:
            await conn.close()
        with pytest.raises(
            RuntimeError, match=f"version 99; this qrelay knows up to {SCHEMA_VERSION}"
        ):
            await store.open()


async def test_unreachable_database_is_unavailable_with_the_address() -> None:
    store = PostgresJobStore("postgresql://postgres:secret@127.0.0.1:1/qrelay")
    with pytest.raises(Unavailable) as info:
        await store.open()
    assert info.value.code == 14
    assert "cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1:1/qrelay" in str(
        info.value
    )
    assert "secret" not in str(info.value)


def test_settings_choose_the_store_and_check_the_url(tmp_path: Path) -> None:
    sqlite = open_store(BrokerSettings(db_path=tmp_path / "b.db"))
    assert isinstance(sqlite, SQLiteJobStore)
    postgres = open_store(
        BrokerSettings(database_url="postgresql://u@h:5432/q", database_schema="prod"),
        origin="b-1",
    )
    assert isinstance(postgres, PostgresJobStore)
    assert (postgres.schema, postgres.channel, postgres.origin) == ("prod", "qrelay_prod", "b-1")
    with pytest.raises(ValidationError, match="database_url must be a PostgreSQL URL"):
        BrokerSettings(database_url="mysql://u@h/q")
    with pytest.raises(ValidationError, match="database_schema must be a lower-case identifier"):
        BrokerSettings(database_schema="Robert'); DROP TABLE jobs;--")
    with pytest.raises(ValueError, match="lower-case identifier"):
        PostgresJobStore("postgresql://u@h/q", schema="a-b")


def test_only_a_store_replicas_share_offers_them_a_link(tmp_path: Path) -> None:
    sqlite = open_store(BrokerSettings(db_path=tmp_path / "b.db"))
    assert sqlite.replicas() is None
    assert sqlite.describe() == str(tmp_path / "b.db")
    postgres = open_store(
        BrokerSettings(database_url="postgresql://u:pw@h:5432/q", database_schema="prod")
    )
    assert postgres.replicas() is postgres
    assert postgres.describe() == "postgresql://u:***@h:5432/q schema prod"


async def test_store_survives_the_database_dropping_its_connections(
    pair: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    one, two = pair
    job, _ = await one.submit(new_job(), max_queued_per_tenant=10)

    async def drop_connections_of_one() -> None:
        admin = await asyncpg.connect(**two.connect_kwargs())
        try:
            dropped = await admin.fetchval(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'qrelay r1'"
            )
            assert dropped >= 1
        finally:
            await admin.close()

    # Nothing was committed on a connection found dead, so reads and writes
    # are repeated on a fresh one: the caller sees no error.
    await drop_connections_of_one()
    assert (await one.get(job.id)).id == job.id
    await drop_connections_of_one()
    again, created = await one.submit(new_job(key="after-drop"), max_queued_per_tenant=10)
    assert created
    assert (await two.get(again.id)).idempotency_key == "after-drop"


async def test_a_tenants_position_and_queue_numbers_never_scan_the_jobs_table() -> None:
    """With 3,000 of A's jobs queued (and analysed), the statements behind B's
    position, its queue lengths and a claim's running count and priority look-up
    read indexes or counters, never a sequential scan of jobs."""
    from qrelay.broker.store.schema import BETTER_THAN, OWN_AHEAD, OWN_BELOW, PRIORITY_ORDER

    async with postgres_schema() as (dsn, schema):
        store = PostgresJobStore(dsn, schema=schema)
        await store.open()
        try:
            for _ in range(10):
                await asyncio.gather(
                    *(
                        store.submit(
                            NewJob("a", "aer", JobKind.SAMPLER, b"s", 1),
                            max_queued_per_tenant=10_000,
                        )
                        for _ in range(300)
                    )
                )
            b_job, _ = await store.submit(
                NewJob("b", "aer", JobKind.SAMPLER, b"s", 1), max_queued_per_tenant=10_000
            )
            conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
            try:
                await conn.execute("ANALYZE")
                qseq = await conn.fetchval("SELECT qseq FROM jobs WHERE id = $1", b_job.id)
                statements = [
                    OWN_AHEAD.format(t="'b'", b="'aer'", p="0", q=str(qseq)),
                    OWN_BELOW.format(t="'b'", b="'aer'", p="0"),
                    "SELECT COUNT(*) FROM jobs WHERE state = 2 AND tenant = 'b'",
                    f"SELECT j.qseq FROM jobs j WHERE j.state = 1 AND j.tenant = 'b' "
                    f"AND j.backend = 'aer' AND j.session_id = '' AND "
                    f"{BETTER_THAN[0].format(p='0')} ORDER BY {PRIORITY_ORDER} LIMIT 1",
                    f"SELECT j.qseq FROM jobs j WHERE j.state = 1 AND j.tenant = 'b' "
                    f"AND j.backend = 'aer' AND j.session_id = '' AND "
                    f"{BETTER_THAN[1].format(p='0', q=str(qseq))}",
                ]
                for sql in statements:
                    plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}"))
                    assert "Seq Scan on jobs" not in plan, (sql, plan)
            finally:
                await conn.close()
            assert (await store.get(b_job.id)).queue_position == 1
            assert await store.queue_estimates("b") == {"aer": 2}
        finally:
            await store.close()
