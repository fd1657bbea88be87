"""PostgreSQL `JobStore`: the store that lets several broker replicas share one queue.

Same semantics as the SQLite store (one contract suite proves it), with what
concurrent writers on other processes need:

- claiming takes the oldest queued rows with `SELECT … FOR UPDATE SKIP LOCKED`,
  so replicas claiming at once never lease one job twice nor wait on each other;
- every write to a job holds the job's row lock while it allocates event seqs
  (`last_seq + 1 …`), so seqs stay gap-free and monotonic across replicas;
- idempotent submit rests on a unique index `(tenant, idempotency_key)` and
  `INSERT … ON CONFLICT DO NOTHING`; the per-tenant queue limit holds exactly
  under a transaction-scoped advisory lock on the tenant;
- each transaction that appends events, queues a job, cancels a running job or
  announces backends also issues `pg_notify` on the store's channel, delivered
  on commit only. `qrelay.broker.fanout` listens and turns the hints into
  local wake-ups; the tables stay the truth.

Times are the brokers' `time.time()` (as with SQLite): replicas need clocks
kept in sync (NTP), as lease expiry compares times written by different hosts.
All tables live in one schema (default `qrelay`), created and migrated at open
under an advisory lock, with the version in `schema_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import asyncpg
import structlog

from qrelay.broker.store import lifecycle
from qrelay.broker.store.base import (
    BackendRecord,
    CancelOutcome,
    ExpiredLease,
    HeldCheck,
    JobKind,
    JobPage,
    JobRecord,
    JobState,
    JobStore,
    LeaseGrant,
    NewJob,
    NewProgram,
    NewSession,
    Presence,
    ProgramRecord,
    Quota,
    Role,
    RunningLimits,
    SessionPage,
    SessionRecord,
    SessionState,
    StoredEvent,
    TenantRecord,
    TenantUsage,
    TokenRecord,
    UpdateKind,
    UpdateOutcome,
    UserRecord,
    job_not_found,
)
from qrelay.broker.store.lifecycle import FACT_COLUMNS, JobFacts, Transition
from qrelay.broker.store.schema import (
    BACKEND_COLUMNS,
    BETTER_THAN,
    CLAIM_ORDER,
    DEDICATED,
    EVENT_COLUMNS,
    FIND_TOKEN,
    JOB_COLUMNS,
    JOB_PROGRAM,
    KEY_SEP,
    NEW_JOB_COLUMNS,
    OTHERS_FIRST_TAG,
    OWN_AHEAD,
    OWN_BELOW,
    PRIORITY_ORDER,
    PROGRAM_COLUMNS,
    QUEUED,
    RUNNING,
    SCHEMA_VERSION,
    SESSION_ACTIVE,
    SESSION_BEFORE,
    SESSION_CLOSED,
    SESSION_COLUMNS,
    SESSION_LIVE,
    SESSION_OPEN,
    TENANT_BACKEND,
    TENANT_COLUMNS,
    TOKEN_COLUMNS,
    UNFINISHED,
    USER_COLUMNS,
    Dialect,
    Row,
    access_map,
    backend_record,
    event_record,
    found_token,
    job_record,
    migrations,
    page_cursor,
    pending_migrations,
    program_record,
    qualified,
    session_page_cursor,
    session_page_token,
    session_record,
    tenant_backend_key,
    tenant_record,
    token_record,
    user_record,
    zero_counts,
)
from qrelay.errors import AlreadyExists, NotFound, QRelayError, Unavailable
from qrelay.logging import safe_dsn

log = structlog.get_logger(__name__)

T = TypeVar("T")

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
# Deadlocks (e.g. a heartbeat's multi-row update against a renewal) are retried.
_RETRIES = 4
# NOTIFY payloads must stay under 8000 bytes; a cancel reason is cut to this.
_MAX_REASON = 1000

# The database went away or refuses work for now: callers get UNAVAILABLE (retryable).
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

_DIALECT = Dialect(
    serial_key="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    real="DOUBLE PRECISION",
    big="BIGINT",
    blob="BYTEA",
    flag="BOOLEAN NOT NULL DEFAULT FALSE",
    strings="TEXT[]",
    extra={
        1: """
    -- Executors connected to each replica, refreshed while they stay connected;
    -- rows not refreshed for a while belong to a replica that died.
    CREATE TABLE executor_presence (
        executor_id TEXT PRIMARY KEY,
        broker_id TEXT NOT NULL,
        backends TEXT[] NOT NULL,
        slots INTEGER NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL
    );
    """,
        # Counters kept by a trigger (see schema.MIGRATIONS[3]), each striped by
        # the writing connection (pg_backend_pid() % 16) and read as a sum, so
        # concurrent submits to one backend do not queue on one row lock until
        # their commits (a stripe may go negative; the sum is exact).
        3: f"""
    CREATE TABLE queued_counts (
        scope TEXT NOT NULL,  -- 't': tenant, 'b': backend
        key TEXT NOT NULL,
        stripe INTEGER NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (scope, key, stripe)
    );
    INSERT INTO queued_counts (scope, key, stripe, n)
        SELECT 't', tenant, 0, COUNT(*) FROM jobs WHERE state = {QUEUED} GROUP BY tenant;
    INSERT INTO queued_counts (scope, key, stripe, n)
        SELECT 'b', backend, 0, COUNT(*) FROM jobs WHERE state = {QUEUED} GROUP BY backend;
    CREATE FUNCTION jobs_queued_count() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        s INTEGER := pg_backend_pid() % 16;
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.state = {QUEUED} THEN
            INSERT INTO queued_counts (scope, key, stripe, n)
                VALUES ('t', OLD.tenant, s, -1), ('b', OLD.backend, s, -1)
                ON CONFLICT (scope, key, stripe) DO UPDATE SET n = queued_counts.n - 1;
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.state = {QUEUED} THEN
            INSERT INTO queued_counts (scope, key, stripe, n)
                VALUES ('t', NEW.tenant, s, 1), ('b', NEW.backend, s, 1)
                ON CONFLICT (scope, key, stripe) DO UPDATE SET n = queued_counts.n + 1;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_queued_count AFTER INSERT OR DELETE OR UPDATE OF state, tenant, backend
        ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_queued_count();
    """,
        # The counters gain scope 'tb' (a tenant's queued jobs on one backend).
        6: f"""
    INSERT INTO queued_counts (scope, key, stripe, n)
        SELECT 'tb', tenant || chr(31) || backend, 0, COUNT(*) FROM jobs
        WHERE state = {QUEUED} GROUP BY tenant, backend;
    CREATE OR REPLACE FUNCTION jobs_queued_count() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        s INTEGER := pg_backend_pid() % 16;
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.state = {QUEUED} THEN
            INSERT INTO queued_counts (scope, key, stripe, n)
                VALUES ('t', OLD.tenant, s, -1), ('b', OLD.backend, s, -1),
                    ('tb', OLD.tenant || chr(31) || OLD.backend, s, -1)
                ON CONFLICT (scope, key, stripe) DO UPDATE SET n = queued_counts.n - 1;
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.state = {QUEUED} THEN
            INSERT INTO queued_counts (scope, key, stripe, n)
                VALUES ('t', NEW.tenant, s, 1), ('b', NEW.backend, s, 1),
                    ('tb', NEW.tenant || chr(31) || NEW.backend, s, 1)
                ON CONFLICT (scope, key, stripe) DO UPDATE SET n = queued_counts.n + 1;
        END IF;
        RETURN NULL;
    END $$;
    """,
        7: """
    INSERT INTO job_tags (tenant, key, qseq)
        SELECT j.tenant, k, j.qseq FROM jobs j, jsonb_object_keys(j.tags::jsonb) k;
    """,
    },
)
_MIGRATIONS = migrations(_DIALECT)
#: (the tenant's weight, the sum of the active tenants' weights) on a backend:
#: active = its fair share ends past the backend's clock. $1 tenant, $2 backend.
_WEIGHTS = (
    "SELECT COALESCE(SUM(weight) FILTER (WHERE tenant = $1), 1.0) AS own, "
    "COALESCE(SUM(weight), 0.0) AS active FROM fair_share WHERE backend = $2 AND (tenant = $1 "
    "OR finish > COALESCE((SELECT clock FROM fair_clock WHERE backend = $2), 0.0))"
)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class _Tx:
    """One transaction's connection plus the notifications it sends on commit."""

    conn: asyncpg.Connection
    origin: str
    notices: list[str] = field(default_factory=list)

    def notify(self, kind: str, **fields: Any) -> None:
        self.notices.append(json.dumps({"k": kind, "o": self.origin, **fields}))


class PostgresJobStore(JobStore):
    """`JobStore` on PostgreSQL through an asyncpg pool (see module docstring).

    `origin` tags the notifications this store sends, so a replica's fan-out
    can skip its own (the broker passes its broker id).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "qrelay",
        origin: str = "",
        min_size: int = 1,
        max_size: int = 8,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(
                f"database schema {schema!r} must be a lower-case identifier "
                "(letters, digits, underscore; at most 40 characters)"
            )
        self.dsn = dsn
        self.schema = schema
        self.origin = origin or _new_id("s")
        self.channel = f"qrelay_{schema}"
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    def describe(self) -> str:
        return f"{safe_dsn(self.dsn)} schema {self.schema}"

    def replicas(self) -> PostgresJobStore:
        """Replicas share this store: it is its own `ReplicaStore`."""
        return self

    # --- plumbing ----------------------------------------------------------
    def connect_kwargs(self) -> dict[str, Any]:
        """How to open one more connection to this store (the fan-out's listener)."""
        # application_name lets an operator see which replica holds which connection.
        return {
            "dsn": self.dsn,
            "server_settings": {
                "search_path": self.schema,
                "application_name": f"qrelay {self.origin}"[:63],
            },
        }

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self.dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            raise Unavailable(f"cannot reach PostgreSQL at {safe_dsn(self.dsn)}: {exc}") from exc
        try:
            async with conn.transaction():
                # Two replicas starting together must not both migrate.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", self.channel
                )
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
                version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
                if version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"schema {self.schema!r} has version {version}; this qrelay knows up to "
                        f"{SCHEMA_VERSION} (upgrade qrelay)"
                    )
                for target in pending_migrations(version):
                    if _MIGRATIONS[target].strip():  # a number kept empty runs nothing
                        await conn.execute(_MIGRATIONS[target])
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", target)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            min_size=self._min_size, max_size=self._max_size, **self.connect_kwargs()
        )
        log.info("store.opened", database=safe_dsn(self.dsn), schema=self.schema)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def _tx(self, fn: Callable[[_Tx], Awaitable[T]]) -> T:
        """Run `fn` in one transaction; its notifications go out with the commit.

        Retried (nothing was committed): deadlocks, serialization failures and
        a connection lost before COMMIT was sent (e.g. the database dropped an
        idle pooled connection). A connection lost during COMMIT is UNAVAILABLE:
        the commit may or may not have happened, so the caller's retry decides
        (Submit with an idempotency key is safe to repeat).
        """
        pool = self._require_pool()
        for attempt in range(_RETRIES):
            last = attempt == _RETRIES - 1
            committing = False
            try:
                async with pool.acquire() as conn:
                    transaction = conn.transaction()
                    try:
                        await transaction.start()
                        tx = _Tx(conn, self.origin)
                        value = await fn(tx)
                        if tx.notices:
                            await conn.execute(
                                "SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n",
                                self.channel,
                                tx.notices,
                            )
                        committing = True
                        await transaction.commit()
                        return value
                    except BaseException as exc:
                        lost = isinstance(exc, Exception) and _connection_lost(exc, conn)
                        if not committing and not lost and not conn.is_closed():
                            with contextlib.suppress(Exception):
                                await transaction.rollback()
                        if lost:  # judged while the connection is still ours
                            raise _LostConnection(exc, committing) from exc  # type: ignore[arg-type]
                        raise
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if last:
                    raise
                await asyncio.sleep(0.005 * (2**attempt) * (0.5 + random.random()))
            except _LostConnection as lost_conn:
                if lost_conn.committing or last:
                    raise Unavailable(
                        f"database unavailable: {lost_conn.cause}"
                    ) from lost_conn.cause
            except _CONNECTION_ERRORS as exc:  # no connection to be had at all
                raise Unavailable(f"database unavailable: {exc}") from exc
        raise AssertionError("unreachable")

    async def _read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run a read-only `fn` on a pooled connection, outside a transaction block.

        A read that lost its connection (e.g. the database dropped idle pooled
        connections) is repeated once on a fresh one: reading twice is harmless.
        """
        for attempt in range(2):
            try:
                async with self._require_pool().acquire() as conn:
                    try:
                        return await fn(conn)
                    except Exception as exc:
                        if _connection_lost(exc, conn):
                            raise _LostConnection(exc) from exc
                        raise
            except _LostConnection as lost:
                if attempt == 1:
                    raise Unavailable(f"database unavailable: {lost.cause}") from lost.cause
            except _CONNECTION_ERRORS as exc:
                raise Unavailable(f"database unavailable: {exc}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    async def _queued(conn: asyncpg.Connection, scope: str, key: str) -> int:
        """Queued jobs of a tenant ('t') or backend ('b'), from the trigger-kept counters."""
        n = await conn.fetchval(
            "SELECT SUM(n)::bigint FROM queued_counts WHERE scope = $1 AND key = $2", scope, key
        )
        return 0 if n is None else int(n)

    @staticmethod
    async def _weights(conn: asyncpg.Connection, tenant: str, backend: str) -> tuple[float, float]:
        row = await conn.fetchrow(_WEIGHTS, tenant, backend)
        return float(row["own"]), float(row["active"])

    async def _load(
        self,
        conn: asyncpg.Connection,
        job_id: str,
        tenant: str | None = None,
        *,
        ahead: int | None = None,
    ) -> JobRecord:
        """Load a job with its estimated queue position (`lifecycle.estimated_position`);
        the tenant's own jobs ahead of it are counted unless the caller knows them."""
        row = await conn.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
        row = lifecycle.check_tenant("job", job_id, row, tenant)
        position = 0
        if row["state"] == QUEUED and ahead is not None:
            own, active = await self._weights(conn, row["tenant"], row["backend"])
            position = lifecycle.estimated_position(ahead, own, active)
        elif row["state"] == QUEUED:
            # The tenant's own jobs its turns take before it (jobs_tenant_order).
            ahead = await conn.fetchval(
                OWN_AHEAD.format(t="$1", b="$2", p="$3", q="$4"),
                row["tenant"],
                row["backend"],
                row["priority"],
                row["qseq"],
            )
            own, active = await self._weights(conn, row["tenant"], row["backend"])
            position = lifecycle.estimated_position(int(ahead), own, active)
        return job_record(row, position)

    @staticmethod
    async def _insert_events(tx: _Tx, events: Sequence[StoredEvent]) -> None:
        """Insert events (seqs already allocated under the jobs' row locks) and hint them."""
        if not events:
            return
        await tx.conn.execute(
            f"INSERT INTO events ({EVENT_COLUMNS}) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::float8[], $4::bytea[], "
            "$5::bool[])",
            [e.job_id for e in events],
            [e.seq for e in events],
            [e.time for e in events],
            [e.payload for e in events],
            [e.terminal for e in events],
        )
        last: dict[str, int] = {}
        for e in events:
            last[e.job_id] = max(last.get(e.job_id, 0), e.seq)
        for job_id, seq in last.items():
            tx.notify("e", j=job_id, s=seq)

    async def _write(self, tx: _Tx, job: JobFacts, change: Transition) -> None:
        """Execute a lifecycle decision (caller holds the job's row lock): the
        job's new columns, its new events, and the hints other replicas need."""
        sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(change.columns, 1))
        await tx.conn.execute(
            f"UPDATE jobs SET {sets} WHERE id = ${len(change.columns) + 1}",
            *change.columns.values(),
            change.job_id,
        )
        await self._insert_events(tx, change.events)
        if change.usage is not None:
            await tx.conn.execute(
                "INSERT INTO tenant_usage (tenant, day, seconds) VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant, day) DO UPDATE "
                "SET seconds = tenant_usage.seconds + excluded.seconds",
                change.usage.tenant,
                change.usage.day,
                change.usage.seconds,
            )
        if change.requeued:
            tx.notify("q", b=job.backend, n=job.kind)
        if change.stop is not None:
            # The executor may be connected to another replica: it relays the stop.
            stop = change.stop
            tx.notify(
                "c",
                x=stop.executor_id,
                j=change.job_id,
                l=stop.lease_id,
                r=stop.reason[:_MAX_REASON],
            )

    async def _facts(self, conn: asyncpg.Connection, job_id: str, *, more: str = "") -> Row | None:
        """The decision's facts of a job (plus `more` columns), its row locked."""
        row: Row | None = await conn.fetchrow(
            f"SELECT {FACT_COLUMNS}{more} FROM jobs WHERE id = $1 FOR UPDATE", job_id
        )
        return row

    @staticmethod
    async def _insert_tags(
        conn: asyncpg.Connection, tenant: str, qseq: int, tags: Mapping[str, str]
    ) -> None:
        if tags:
            await conn.execute(
                "INSERT INTO job_tags (tenant, key, qseq) "
                "SELECT $1, k, $2 FROM unnest($3::text[]) k",
                tenant,
                qseq,
                list(tags),
            )

    # --- jobs --------------------------------------------------------------
    @staticmethod
    async def _fair_start(conn: asyncpg.Connection, job: NewJob) -> float:
        """The new job's fair-share start tag; records where the tenant's share ends
        (under the tenant's submit lock, so its finish tags never race)."""
        clock = await conn.fetchval("SELECT clock FROM fair_clock WHERE backend = $1", job.backend)
        last = await conn.fetchval(
            "SELECT finish FROM fair_share WHERE tenant = $1 AND backend = $2",
            job.tenant,
            job.backend,
        )
        start, finish = lifecycle.fair_start(clock or 0.0, last or 0.0, job.weight)
        await conn.execute(
            "INSERT INTO fair_share (tenant, backend, finish, weight) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (tenant, backend) DO UPDATE SET finish = excluded.finish, "
            "weight = excluded.weight",
            job.tenant,
            job.backend,
            finish,
            job.weight,
        )
        return float(start)

    @staticmethod
    async def _used_seconds(conn: asyncpg.Connection, tenant: str, since_day: str) -> float:
        value = await conn.fetchval(
            "SELECT COALESCE(SUM(seconds), 0.0) FROM tenant_usage WHERE tenant = $1 AND day >= $2",
            tenant,
            since_day,
        )
        return float(value)

    async def _tenant_lock(self, conn: asyncpg.Connection, tenant: str, what: int) -> None:
        """One transaction at a time per tenant for `what` (1 submit, 4 sessions,
        5 program storage): keeps a quota's count exact under concurrent calls."""
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, $2))",
            json.dumps([self.schema, tenant]),
            what,
        )

    async def submit(
        self, job: NewJob, *, max_queued_per_tenant: int, quota: Quota | None = None
    ) -> tuple[JobRecord, bool]:
        async def tx(t: _Tx) -> tuple[JobRecord, bool]:
            conn = t.conn
            # One submit per tenant at a time keeps the queue limit exact.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 1))",
                json.dumps([self.schema, job.tenant]),
            )
            if job.idempotency_key:
                # One round trip: the key's job, or the deleted job it named.
                key = await conn.fetchrow(
                    "SELECT (SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2) "
                    "AS existing, (SELECT job_id FROM deleted_jobs WHERE tenant = $1 "
                    "AND idempotency_key = $2) AS deleted",
                    job.tenant,
                    job.idempotency_key,
                )
                if key["existing"] is not None:
                    return await self._load(conn, key["existing"]), False
                lifecycle.check_key_not_deleted(job.idempotency_key, key["deleted"])
            if job.session_id:
                # FOR UPDATE: a concurrent close of the session waits for this submit
                # (or this submit sees it closed), never a job slipping into a closed one.
                session = await conn.fetchrow(
                    "SELECT tenant, backend, state FROM sessions WHERE id = $1 FOR UPDATE",
                    job.session_id,
                )
                lifecycle.check_session_accepts(job, session)
            queued = await self._queued(conn, "t", job.tenant)
            lifecycle.check_queue_room(job.tenant, queued, max_queued_per_tenant)
            if quota is not None:
                used = (
                    await self._used_seconds(conn, job.tenant, quota.period_start)
                    if quota.max_executor_seconds is not None
                    else 0.0
                )
                lifecycle.check_submit_quota(job.tenant, quota, queued, used)
            now = time.time()
            new_id = job.id or _new_id("j")
            event = lifecycle.submitted(new_id, now)
            start = await self._fair_start(conn, job)
            inserted = await conn.fetchrow(
                f"INSERT INTO jobs ({NEW_JOB_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) "
                "ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING id, qseq",
                new_id,
                job.tenant,
                job.backend,
                int(job.kind),
                QUEUED,
                now,
                job.session_id,
                json.dumps(job.tags, sort_keys=True),
                job.idempotency_key or None,
                job.num_pubs,
                job.spec,
                job.program_id,
                event.seq,
                start,
                job.priority,
            )
            if inserted is None:  # a concurrent submit with the same key won
                existing = await conn.fetchval(
                    "SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
                    job.tenant,
                    job.idempotency_key,
                )
                return await self._load(conn, existing), False
            job_id = inserted["id"]
            if job.session_id:
                await conn.execute(
                    "UPDATE sessions SET last_job_at = $1 WHERE id = $2", now, job.session_id
                )
            await self._insert_tags(conn, job.tenant, inserted["qseq"], job.tags)
            await self._insert_events(t, [event])
            t.notify("q", b=job.backend, n=int(job.kind))
            # A fresh job holds its tenant's last start tag on the backend: all
            # its other queued jobs there are ahead (a counter, O(1)).
            key = tenant_backend_key(job.tenant, job.backend)
            mine = await self._queued(conn, TENANT_BACKEND, key)
            below = await conn.fetchval(
                OWN_BELOW.format(t="$1", b="$2", p="$3"), job.tenant, job.backend, job.priority
            )
            return await self._load(conn, job_id, ahead=mine - int(below) - 1), True

        return await self._tx(tx)

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        return await self._read(lambda conn: self._load(conn, job_id, tenant))

    async def get_spec(self, job_id: str) -> bytes:
        async def read(conn: asyncpg.Connection) -> bytes:
            row = await conn.fetchrow("SELECT spec FROM jobs WHERE id = $1", job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            return bytes(row["spec"])

        return await self._read(read)

    async def get_result(self, job_id: str) -> bytes | None:
        async def read(conn: asyncpg.Connection) -> bytes | None:
            row = await conn.fetchrow("SELECT result FROM jobs WHERE id = $1", job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            return None if row["result"] is None else bytes(row["result"])

        return await self._read(read)

    async def list_jobs(
        self,
        tenant: str,
        *,
        states: Sequence[JobState] = (),
        backend: str = "",
        session_id: str = "",
        tags: Sequence[str] = (),
        program: str = "",
        page_size: int = 50,
        page_token: str = "",
    ) -> JobPage:
        source, order = "jobs j", "j.qseq"
        where = ["j.tenant = $1"]
        params: list[Any] = [tenant]

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if tags:
            # Walk the first tag's index rows newest first; the others are probes.
            source, order = "job_tags t JOIN jobs j ON j.qseq = t.qseq", "t.qseq"
            where += ["t.tenant = $1", f"t.key = {param(tags[0])}"]
            for key in tags[1:]:
                where.append(
                    "EXISTS (SELECT 1 FROM job_tags o WHERE o.tenant = $1 "
                    f"AND o.key = {param(key)} AND o.qseq = j.qseq)"
                )
        if page_token:
            where.append(f"{order} < {param(page_cursor(page_token))}")
        if states:
            where.append(f"j.state = ANY({param([int(s) for s in states])}::int[])")
        if backend:
            where.append(f"j.backend = {param(backend)}")
        if session_id:
            where.append(f"j.session_id = {param(session_id)}")
        if program:
            where.append(JOB_PROGRAM.format(param(program), "$1", param(program)))
        limit = param(page_size + 1)

        async def read(conn: asyncpg.Connection) -> JobPage:
            rows = await conn.fetch(
                f"SELECT {qualified(JOB_COLUMNS, 'j')} FROM {source} "
                f"WHERE {' AND '.join(where)} ORDER BY {order} DESC LIMIT {limit}",
                *params,
            )
            more = len(rows) > page_size
            rows = rows[:page_size]
            positions: dict[str, int] = {}
            queued_backends = sorted({r["backend"] for r in rows if r["state"] == QUEUED})
            for backend in queued_backends:
                # One pass over the tenant's own queue there, not one count per job.
                own, active = await self._weights(conn, tenant, backend)
                for r in await conn.fetch(
                    "SELECT id, ROW_NUMBER() OVER (ORDER BY priority DESC, qseq) AS rank FROM jobs "
                    f"WHERE state = {QUEUED} AND tenant = $1 AND backend = $2",
                    tenant,
                    backend,
                ):
                    positions[r["id"]] = lifecycle.estimated_position(r["rank"] - 1, own, active)
            jobs = [job_record(r, positions.get(r["id"], 0)) for r in rows]
            return JobPage(jobs, str(rows[-1]["qseq"]) if more else "")

        return await self._read(read)

    async def events_after(self, job_id: str, after_seq: int) -> list[StoredEvent]:
        async def read(conn: asyncpg.Connection) -> list[StoredEvent]:
            rows = await conn.fetch(
                "SELECT seq, time, payload, terminal FROM events WHERE job_id = $1 AND seq > $2 "
                "ORDER BY seq",
                job_id,
                after_seq,
            )
            return [event_record(job_id, r) for r in rows]

        return await self._read(read)

    async def delete_job(self, job_id: str, tenant: str) -> JobRecord:
        async def tx(t: _Tx) -> JobRecord:
            conn = t.conn
            # The row lock orders this after any write still in flight on the job.
            row = await self._facts(conn, job_id, more=", tenant, qseq")
            if row is None or row["tenant"] != tenant:
                raise job_not_found(job_id, other_tenant=row is not None)
            job = await self._load(conn, job_id, tenant, ahead=0)
            lifecycle.check_deletable(job_id, job.state)
            if job.idempotency_key:
                await conn.execute(
                    "INSERT INTO deleted_jobs (tenant, idempotency_key, job_id, deleted_at) "
                    "VALUES ($1, $2, $3, $4)",
                    tenant,
                    job.idempotency_key,
                    job_id,
                    time.time(),
                )
            await conn.execute("DELETE FROM job_tags WHERE qseq = $1", row["qseq"])
            await conn.execute("DELETE FROM events WHERE job_id = $1", job_id)
            await conn.execute("DELETE FROM jobs WHERE id = $1", job_id)
            return job

        return await self._tx(tx)

    async def update_tags(self, job_id: str, tenant: str, tags: dict[str, str]) -> JobRecord:
        async def tx(t: _Tx) -> JobRecord:
            conn = t.conn
            row = await self._facts(conn, job_id, more=", tenant, qseq")
            if row is None or row["tenant"] != tenant:
                raise job_not_found(job_id, other_tenant=row is not None)
            await conn.execute(
                "UPDATE jobs SET tags = $1 WHERE id = $2", json.dumps(tags, sort_keys=True), job_id
            )
            await conn.execute("DELETE FROM job_tags WHERE qseq = $1", row["qseq"])
            await self._insert_tags(conn, tenant, row["qseq"], tags)
            return await self._load(conn, job_id, tenant)

        return await self._tx(tx)

    # --- scheduling and leases ----------------------------------------------
    async def claim(
        self,
        backends: Sequence[str],
        executor_id: str,
        lease_ttl_s: float,
        limit: int,
        kinds: Sequence[JobKind] | None = None,
        running: RunningLimits | None = None,
        tenants: Sequence[str] | None = None,
    ) -> list[LeaseGrant]:
        if not backends or limit <= 0 or (kinds is not None and not kinds):
            return []
        if tenants is not None and not tenants:
            return []
        kind_list = None if kinds is None else [int(k) for k in kinds]
        tenant_list = None if tenants is None else list(tenants)
        where = (
            f"j.state = {QUEUED} AND j.backend = ANY($1::text[]) "
            "AND ($2::int[] IS NULL OR j.kind = ANY($2::int[])) "
            "AND NOT (j.tenant = ANY($6::text[])) AND NOT (j.qseq = ANY($5::bigint[])) "
            "AND ($7::text[] IS NULL OR j.tenant = ANY($7::text[]))"
        )
        picked_columns = "j.qseq, j.session_id, j.tenant, j.backend, j.vt, j.priority"

        async def tx(t: _Tx) -> list[LeaseGrant]:
            conn = t.conn
            room = lifecycle.RunningRoom(running, {})
            if room.active:
                for r in await conn.fetch(
                    f"SELECT tenant, COUNT(*) AS n FROM jobs WHERE state = {RUNNING} "
                    "GROUP BY tenant"
                ):
                    room.set_running(r["tenant"], r["n"])
            counted: set[str] = set()
            picked: list[dict[str, Any]] = []

            async def admit(tenant: str) -> bool:
                """Whether one more of the tenant's jobs may start. The first time
                a tenant comes up, its running jobs are recounted under its claim
                lock (held to commit), so replicas never start more than its quota
                together; a tenant another replica is claiming for is skipped."""
                if not room.active:
                    return True
                if tenant not in counted:
                    counted.add(tenant)
                    got = await conn.fetchval(
                        "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 3))",
                        json.dumps([self.schema, tenant]),
                    )
                    if not got:
                        room.full.add(tenant)
                        return False
                    n = await conn.fetchval(
                        f"SELECT COUNT(*) FROM jobs WHERE state = {RUNNING} AND tenant = $1",
                        tenant,
                    )
                    room.set_running(tenant, int(n))
                return room.take(tenant)

            async def gather(query: str, *extra: Any) -> None:
                """Rows in claim order, minus tenants at their running quota."""
                while len(picked) < limit:
                    want = limit - len(picked)
                    batch = await conn.fetch(
                        query,
                        list(backends),
                        kind_list,
                        executor_id,
                        want,
                        [r["qseq"] for r in picked],
                        room.blocked(),
                        tenant_list,
                        *extra,
                    )
                    refused = False
                    for r in batch:
                        if await admit(r["tenant"]):
                            picked.append(dict(r))
                        else:
                            refused = True
                    if not refused:
                        return

            # SKIP LOCKED: rows another replica is claiming right now are simply
            # not ours; the row locks then cover the seq allocation below.
            # First the jobs of active dedicated sessions pinned here: they jump
            # the queue, but only while within SESSION_JUMP of the first other
            # job waiting on their backend. Then everyone's in fair order, minus
            # jobs pinned elsewhere.
            await gather(
                f"SELECT {picked_columns} FROM sessions s JOIN jobs j "
                f"ON j.session_id = s.id WHERE s.executor_id = $3 AND s.mode = {DEDICATED} "
                f"AND s.state = {SESSION_ACTIVE} AND {where} "
                f"AND j.vt <= {OTHERS_FIRST_TAG} + $8 ORDER BY {CLAIM_ORDER} LIMIT $4 "
                "FOR UPDATE OF j SKIP LOCKED",
                lifecycle.SESSION_JUMP,
            )
            await gather(
                f"SELECT {picked_columns} FROM jobs j LEFT JOIN sessions s "
                f"ON s.id = j.session_id WHERE {where} AND (s.id IS NULL "
                f"OR s.mode <> {DEDICATED} OR s.executor_id = '' "
                "OR s.executor_id = $3) "
                f"ORDER BY {CLAIM_ORDER} LIMIT $4 FOR UPDATE OF j SKIP LOCKED"
            )
            if not picked:
                return []
            # Each turn goes to the tenant's best-priority job, which takes the
            # turn's start tag (and leaves its own to the job it overtakes).
            for i, row in enumerate(picked):
                common = (
                    f"FROM jobs j WHERE j.state = {QUEUED} AND j.tenant = $1 AND j.backend = $2 "
                    "AND j.session_id = $3 AND ($4::int[] IS NULL OR j.kind = ANY($4::int[])) "
                    "AND NOT (j.qseq = ANY($5::bigint[]))"
                )
                args = (
                    row["tenant"],
                    row["backend"],
                    row["session_id"],
                    kind_list,
                    [r["qseq"] for r in picked],
                    row["priority"],
                )
                better = await conn.fetchrow(
                    f"SELECT {picked_columns} {common} AND {BETTER_THAN[0].format(p='$6')} "
                    f"ORDER BY {PRIORITY_ORDER} LIMIT 1 FOR UPDATE OF j SKIP LOCKED",
                    *args,
                )
                if better is None:
                    # Older jobs of the same priority (overtaken earlier, so holding
                    # later tags): no LIMIT, which could tempt the planner into
                    # walking a whole backend's queue by qseq; there are rarely any.
                    older = await conn.fetch(
                        f"SELECT j.qseq {common} AND {BETTER_THAN[1].format(p='$6', q='$7')}",
                        *args,
                        row["qseq"],
                    )
                    if older:
                        better = await conn.fetchrow(
                            f"SELECT {picked_columns} FROM jobs j WHERE j.qseq = $1 "
                            f"AND j.state = {QUEUED} FOR UPDATE OF j SKIP LOCKED",
                            min(r["qseq"] for r in older),
                        )
                if better is not None:
                    await conn.execute(
                        "UPDATE jobs SET vt = $1 WHERE qseq = $2", better["vt"], row["qseq"]
                    )
                    await conn.execute(
                        "UPDATE jobs SET vt = $1 WHERE qseq = $2", row["vt"], better["qseq"]
                    )
                    picked[i] = {**dict(better), "vt": row["vt"]}
            now = time.time()
            chosen = await self._claim_sessions(conn, picked, executor_id, now)
            rows = await conn.fetch(
                # The columns of lifecycle.claim(), for many rows in one statement.
                f"UPDATE jobs j SET state = {RUNNING}, attempts = j.attempts + 1, started_at = $1, "
                "executor_id = $2, lease_id = 'l-' || replace(gen_random_uuid()::text, '-', ''), "
                "lease_expires_at = $3, last_seq = j.last_seq + 1 "
                f"WHERE j.qseq = ANY($4::bigint[]) RETURNING {qualified(JOB_COLUMNS, 'j')}, j.spec",
                now,
                executor_id,
                now + lease_ttl_s,
                chosen,
            )
            order = {qseq: i for i, qseq in enumerate(chosen)}
            rows = sorted(rows, key=lambda r: order[r["qseq"]])
            grants = []
            all_events = []
            for row in rows:
                job = job_record(row)
                event = lifecycle.running_event(
                    job.id, job.last_seq, job.attempts, executor_id, now
                )
                all_events.append(event)
                grants.append(LeaseGrant(job, bytes(row["spec"]), [event]))
            await self._insert_events(t, all_events)
            # Each backend's virtual clock moves to the latest start tag claimed there.
            clocks: dict[str, float] = {}
            for row in rows:
                clocks[row["backend"]] = max(clocks.get(row["backend"], 0.0), row["vt"])
            await conn.executemany(
                "INSERT INTO fair_clock (backend, clock) VALUES ($1, $2) ON CONFLICT (backend) "
                "DO UPDATE SET clock = GREATEST(fair_clock.clock, excluded.clock)",
                sorted(clocks.items()),
            )
            return grants

        return await self._tx(tx)

    @staticmethod
    async def _claim_sessions(
        conn: asyncpg.Connection, picked: Sequence[Mapping[str, Any]], executor_id: str, now: float
    ) -> list[int]:
        """Activate and pin the sessions of the picked jobs; returns the qseqs to lease.

        The session rows are locked (in id order) and re-read, so two replicas
        claiming jobs of one unpinned dedicated session cannot pin it twice: the
        later one sees the pin and leaves that session's jobs queued.
        """
        session_ids = sorted({r["session_id"] for r in picked if r["session_id"]})
        if not session_ids:
            return [r["qseq"] for r in picked]
        sessions = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, mode, executor_id FROM sessions WHERE id = ANY($1::text[]) "
                "ORDER BY id FOR UPDATE",
                session_ids,
            )
        }
        pinned = {sid: r["executor_id"] for sid, r in sessions.items() if r["mode"] == DEDICATED}
        chosen = []
        used: set[str] = set()
        for r in picked:
            sid = r["session_id"]
            if sid in pinned:
                if pinned[sid] not in ("", executor_id):
                    continue  # pinned to another executor meanwhile
                pinned[sid] = executor_id
            if sid in sessions:
                used.add(sid)
            chosen.append(r["qseq"])
        if used:
            await conn.execute(
                "UPDATE sessions SET activated_at = COALESCE(activated_at, $1), "
                f"state = CASE state WHEN {SESSION_OPEN} THEN {SESSION_ACTIVE} ELSE state END, "
                f"executor_id = CASE WHEN mode = {DEDICATED} AND executor_id = '' THEN $2 "
                "ELSE executor_id END WHERE id = ANY($3::text[])",
                now,
                executor_id,
                sorted(used),
            )
        return chosen

    async def extend_leases(self, lease_ids: Sequence[str], lease_ttl_s: float) -> set[str]:
        if not lease_ids:
            return set()

        async def tx(t: _Tx) -> set[str]:
            rows = await t.conn.fetch(
                "UPDATE jobs SET lease_expires_at = $1 WHERE lease_id = ANY($2::text[]) "
                f"AND state = {RUNNING} RETURNING lease_id",
                time.time() + lease_ttl_s,
                list(lease_ids),
            )
            return {r["lease_id"] for r in rows}

        return await self._tx(tx)

    async def check_held(
        self, executor_id: str, held: Sequence[tuple[str, str]], lease_ttl_s: float
    ) -> HeldCheck:
        if not held:
            return HeldCheck([], [])

        async def tx(t: _Tx) -> HeldCheck:
            rows = await t.conn.fetch(
                "UPDATE jobs SET lease_expires_at = $1, executor_id = $2 "
                "FROM unnest($3::text[], $4::text[]) AS h(job_id, lease_id) "
                "WHERE jobs.id = h.job_id AND jobs.lease_id = h.lease_id "
                f"AND jobs.state = {RUNNING} "
                "RETURNING jobs.id, jobs.lease_id",
                time.time() + lease_ttl_s,
                executor_id,
                [j for j, _ in held],
                [lease for _, lease in held],
            )
            kept = {(r["id"], r["lease_id"]) for r in rows}
            valid = [h for h in held if h in kept]
            invalid = [h for h in held if h not in kept]
            return HeldCheck(valid, invalid)

        return await self._tx(tx)

    async def apply_update(
        self, job_id: str, lease_id: str, kind: UpdateKind, payload: bytes
    ) -> UpdateOutcome:
        async def tx(t: _Tx) -> UpdateOutcome:
            row = await self._facts(t.conn, job_id)
            facts = None if row is None else JobFacts.of(row)
            decision = lifecycle.update(job_id, facts, lease_id, kind, payload, time.time())
            if facts is not None and isinstance(decision, Transition):
                await self._write(t, facts, decision)
            job = None if facts is None else await self._load(t.conn, job_id)
            return lifecycle.update_outcome(decision, job)

        return await self._tx(tx)

    async def expire_leases(self, now: float, max_attempts: int) -> list[ExpiredLease]:
        async def tx(t: _Tx) -> list[ExpiredLease]:
            # SKIP LOCKED: another replica's reaper (or an update) holding a row
            # deals with it; we take the rest.
            rows = await t.conn.fetch(
                f"SELECT {FACT_COLUMNS} FROM jobs WHERE state = {RUNNING} "
                "AND lease_expires_at < $1 ORDER BY lease_expires_at FOR UPDATE SKIP LOCKED",
                now,
            )
            expired = []
            for row in rows:
                job = JobFacts.of(row)
                change = lifecycle.expire(job, max_attempts, now)
                await self._write(t, job, change)
                record = await self._load(t.conn, job.id)
                expired.append(ExpiredLease(record, job.lease_id, job.executor_id, change.events))
            return expired

        return await self._tx(tx)

    async def next_lease_expiry(self) -> float | None:
        async def read(conn: asyncpg.Connection) -> float | None:
            value = await conn.fetchval(
                f"SELECT MIN(lease_expires_at) FROM jobs WHERE state = {RUNNING}"
            )
            return None if value is None else float(value)

        return await self._read(read)

    async def renew_running_leases(self, lease_ttl_s: float) -> int:
        async def tx(t: _Tx) -> int:
            floor = time.time() + lease_ttl_s
            rows = await t.conn.fetch(
                f"UPDATE jobs SET lease_expires_at = $1 WHERE state = {RUNNING} "
                "AND lease_expires_at < $1 "
                "RETURNING id",
                floor,
            )
            return len(rows)

        return await self._tx(tx)

    async def cancel(self, job_id: str, tenant: str | None, reason: str) -> CancelOutcome:
        async def tx(t: _Tx) -> CancelOutcome:
            row = lifecycle.check_tenant(
                "job", job_id, await self._facts(t.conn, job_id, more=", tenant"), tenant
            )
            job = JobFacts.of(row)
            change = lifecycle.cancel(job, reason, time.time())
            if change is not None:
                await self._write(t, job, change)
            return lifecycle.cancel_outcome(job, change, await self._load(t.conn, job_id))

        return await self._tx(tx)

    # --- programs -----------------------------------------------------------
    async def _find_program(
        self, conn: asyncpg.Connection, tenant: str, program: str, include_deleted: bool
    ) -> ProgramRecord:
        hidden = "" if include_deleted else " AND NOT deleted"
        row = await conn.fetchrow(
            f"SELECT {PROGRAM_COLUMNS} FROM programs WHERE tenant = $1 AND id = $2{hidden}",
            tenant,
            program,
        )
        if row is None:
            row = await conn.fetchrow(
                f"SELECT {PROGRAM_COLUMNS} FROM programs WHERE tenant = $1 AND name = $2"
                f"{hidden} ORDER BY version DESC LIMIT 1",
                tenant,
                program,
            )
        if row is None:
            # Another tenant's program asked for by id: answered as missing, audited.
            other = await conn.fetchval(
                "SELECT tenant FROM programs WHERE id = $1 AND tenant <> $2 LIMIT 1",
                program,
                tenant,
            )
            if other is not None:
                lifecycle.not_found("program", program, other, tenant)
            raise NotFound(f"program {program!r} not found (no such id or name)")
        return program_record(row)

    async def put_program(
        self, program: NewProgram, quota: Quota | None = None
    ) -> tuple[ProgramRecord, bool]:
        async def tx(t: _Tx) -> tuple[ProgramRecord, bool]:
            conn = t.conn
            # Versions of a name are numbered in order: one upload of a name at a time.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 2))",
                json.dumps([self.schema, program.tenant, program.name]),
            )
            deleted = await conn.fetchval(
                "SELECT deleted FROM programs WHERE tenant = $1 AND id = $2",
                program.tenant,
                program.id,
            )
            if deleted is not None:
                if deleted:
                    await conn.execute(
                        "UPDATE programs SET deleted = FALSE WHERE tenant = $1 AND id = $2",
                        program.tenant,
                        program.id,
                    )
                return await self._find_program(conn, program.tenant, program.id, False), False
            if quota is not None and quota.max_program_bytes is not None:
                await self._tenant_lock(conn, program.tenant, 5)
                stored = await conn.fetchval(
                    "SELECT COALESCE(SUM(size_bytes), 0) FROM programs WHERE tenant = $1",
                    program.tenant,
                )
                lifecycle.check_program_quota(
                    program.tenant, quota, int(stored), len(program.archive)
                )
            version = await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM programs WHERE tenant = $1 "
                "AND name = $2",
                program.tenant,
                program.name,
            )
            inserted = await conn.fetchval(
                "INSERT INTO programs (tenant, id, name, version, entry_point, requirements, "
                "input_schema_json, description, size_bytes, created_at, archive) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
                "ON CONFLICT (tenant, id) DO NOTHING RETURNING id",
                program.tenant,
                program.id,
                program.name,
                version,
                program.entry_point,
                list(program.requirements),
                program.input_schema_json,
                program.description,
                len(program.archive),
                time.time(),
                program.archive,
            )
            record = await self._find_program(conn, program.tenant, program.id, False)
            return record, inserted is not None

        return await self._tx(tx)

    async def get_program(
        self, tenant: str, program: str, *, include_deleted: bool = False
    ) -> ProgramRecord:
        return await self._read(
            lambda conn: self._find_program(conn, tenant, program, include_deleted)
        )

    async def get_program_archive(self, tenant: str, program_id: str) -> bytes:
        async def read(conn: asyncpg.Connection) -> bytes:
            archive = await conn.fetchval(
                "SELECT archive FROM programs WHERE tenant = $1 AND id = $2", tenant, program_id
            )
            if archive is None:
                raise NotFound(f"program {program_id!r} not found")
            return bytes(archive)

        return await self._read(read)

    async def list_programs(self, tenant: str, name: str = "") -> list[ProgramRecord]:
        async def read(conn: asyncpg.Connection) -> list[ProgramRecord]:
            if name:
                rows = await conn.fetch(
                    f"SELECT {PROGRAM_COLUMNS} FROM programs WHERE tenant = $1 AND name = $2 "
                    "AND NOT deleted ORDER BY version DESC",
                    tenant,
                    name,
                )
            else:
                rows = await conn.fetch(
                    f"SELECT DISTINCT ON (name) {PROGRAM_COLUMNS} FROM programs "
                    "WHERE tenant = $1 AND NOT deleted ORDER BY name, version DESC",
                    tenant,
                )
            return [program_record(r) for r in rows]

        return await self._read(read)

    async def delete_programs(self, tenant: str, program: str) -> int:
        async def tx(t: _Tx) -> int:
            conn = t.conn
            ids = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM programs WHERE tenant = $1 AND NOT deleted AND id = $2 "
                    "FOR UPDATE",
                    tenant,
                    program,
                )
            ] or [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM programs WHERE tenant = $1 AND NOT deleted AND name = $2 "
                    "ORDER BY id FOR UPDATE",
                    tenant,
                    program,
                )
            ]
            if not ids:
                raise NotFound(f"program {program!r} not found (no such id or name)")
            await conn.execute(
                "UPDATE programs SET deleted = TRUE WHERE tenant = $1 AND id = ANY($2::text[])",
                tenant,
                ids,
            )
            # Drop every hidden version no unfinished job needs any more.
            await conn.execute(
                "DELETE FROM programs p WHERE p.tenant = $1 AND p.deleted AND NOT EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.tenant = $1 AND j.program_id = p.id "
                f"AND j.state IN {UNFINISHED})",
                tenant,
            )
            return len(ids)

        return await self._tx(tx)

    # --- sessions -------------------------------------------------------------
    @staticmethod
    async def _sessions(
        conn: asyncpg.Connection, rows: Sequence[Mapping[str, Any]]
    ) -> list[SessionRecord]:
        """Session records with their jobs' counts, from one aggregate query."""
        if not rows:
            return []
        counts = {r["id"]: zero_counts() for r in rows}
        finished: dict[str, float | None] = {}
        for agg in await conn.fetch(
            "SELECT session_id, state, COUNT(*) AS n, MAX(finished_at) AS f FROM jobs "
            "WHERE session_id = ANY($1::text[]) GROUP BY session_id, state",
            list(counts),
        ):
            sid = agg["session_id"]
            counts[sid][JobState(agg["state"])] = agg["n"]
            if agg["f"] is not None:
                finished[sid] = max(finished.get(sid) or 0.0, agg["f"])
        return [session_record(r, counts[r["id"]], finished.get(r["id"])) for r in rows]

    async def _load_session(
        self, conn: asyncpg.Connection, session_id: str, tenant: str | None, *, lock: bool = False
    ) -> SessionRecord:
        row = await conn.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
            + (" FOR UPDATE" if lock else ""),
            session_id,
        )
        row = lifecycle.check_tenant("session", session_id, row, tenant)
        (record,) = await self._sessions(conn, [row])
        return record

    async def create_session(
        self, session: NewSession, quota: Quota | None = None
    ) -> SessionRecord:
        async def tx(t: _Tx) -> SessionRecord:
            if quota is not None and quota.max_sessions is not None:
                await self._tenant_lock(t.conn, session.tenant, 4)
                lifecycle.check_session_quota(
                    session.tenant, quota, await self._open_sessions(t.conn, session.tenant)
                )
            session_id = _new_id("s")
            await t.conn.execute(
                "INSERT INTO sessions (id, tenant, backend, mode, state, max_time_s, max_idle_s, "
                "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                session_id,
                session.tenant,
                session.backend,
                int(session.mode),
                SESSION_OPEN,
                session.max_time_s,
                session.max_idle_s,
                time.time(),
            )
            return await self._load_session(t.conn, session_id, None)

        return await self._tx(tx)

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord:
        return await self._read(lambda conn: self._load_session(conn, session_id, tenant))

    async def list_sessions(
        self,
        tenant: str,
        *,
        states: Sequence[SessionState] = (),
        backend: str = "",
        page_size: int = 50,
        page_token: str = "",
    ) -> SessionPage:
        where = ["tenant = $1"]
        params: list[Any] = [tenant]

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if page_token:
            created, before = session_page_cursor(page_token)
            where.append(SESSION_BEFORE.format(param(created), param(created), param(before)))
        if states:
            where.append(f"state = ANY({param([int(s) for s in states])}::int[])")
        if backend:
            where.append(f"backend = {param(backend)}")
        limit = param(page_size + 1)

        async def read(conn: asyncpg.Connection) -> SessionPage:
            rows = await conn.fetch(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(where)} "
                f"ORDER BY created_at DESC, id DESC LIMIT {limit}",
                *params,
            )
            sessions = await self._sessions(conn, rows[:page_size])
            more = len(rows) > page_size
            return SessionPage(sessions, session_page_token(sessions[-1]) if more else "")

        return await self._read(read)

    async def end_session(
        self, session_id: str, tenant: str | None, state: SessionState, reason: str
    ) -> tuple[SessionRecord, bool]:
        lifecycle.check_session_end(state)

        async def tx(t: _Tx) -> tuple[SessionRecord, bool]:
            current = await self._load_session(t.conn, session_id, tenant, lock=True)
            if not lifecycle.session_may_end(current.state, state):
                return current, False
            await t.conn.execute(
                "UPDATE sessions SET state = $1, state_reason = $2, "
                "closed_at = COALESCE(closed_at, $3) WHERE id = $4",
                int(state),
                reason,
                time.time(),
                session_id,
            )
            return await self._load_session(t.conn, session_id, None), True

        return await self._tx(tx)

    async def live_sessions(self) -> list[SessionRecord]:
        async def read(conn: asyncpg.Connection) -> list[SessionRecord]:
            rows = await conn.fetch(
                f"SELECT {SESSION_COLUMNS} FROM sessions s WHERE state IN {SESSION_LIVE} "
                f"OR (state = {SESSION_CLOSED} AND executor_id <> '' AND EXISTS (SELECT 1 "
                f"FROM jobs j WHERE j.session_id = s.id AND j.state IN {UNFINISHED})) "
                "ORDER BY created_at"
            )
            return await self._sessions(conn, rows)

        return await self._read(read)

    async def unpin_sessions(self, executor_id: str) -> list[SessionRecord]:
        async def tx(t: _Tx) -> list[SessionRecord]:
            rows = await t.conn.fetch(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE executor_id = $1 "
                f"AND mode = {DEDICATED} "
                "ORDER BY id FOR UPDATE",
                executor_id,
            )
            changed = await self._sessions(t.conn, rows)
            await t.conn.execute(
                "UPDATE sessions SET executor_id = '' WHERE executor_id = $1 "
                f"AND mode = {DEDICATED}",
                executor_id,
            )
            # Their queued jobs may now go to any executor, on any replica.
            for backend in sorted({s.backend for s in changed}):
                for kind in (JobKind.SAMPLER, JobKind.PROGRAM):
                    t.notify("q", b=backend, n=int(kind))
            return changed

        return await self._tx(tx)

    # --- backends and statistics ------------------------------------------
    async def upsert_backends(self, backends: Sequence[BackendRecord]) -> None:
        if not backends:
            return

        async def tx(t: _Tx) -> None:
            await t.conn.executemany(
                "INSERT INTO backends (name, info, last_seen) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET info = excluded.info, "
                "last_seen = excluded.last_seen",
                [(b.name, b.info, b.last_seen) for b in backends],
            )
            # Other replicas accept submits for these names from now on.
            t.notify("b", n=sorted({b.name for b in backends}))

        await self._tx(tx)

    async def touch_backends(self, names: Sequence[str], now: float) -> None:
        if not names:
            return

        async def tx(t: _Tx) -> None:
            await t.conn.execute(
                "UPDATE backends SET last_seen = $1 WHERE name = ANY($2::text[])", now, list(names)
            )

        await self._tx(tx)

    async def list_backends(self) -> list[BackendRecord]:
        async def read(conn: asyncpg.Connection) -> list[BackendRecord]:
            rows = await conn.fetch(f"SELECT {BACKEND_COLUMNS} FROM backends ORDER BY name")
            return [backend_record(r) for r in rows]

        return await self._read(read)

    async def get_backend(self, name: str) -> BackendRecord | None:
        async def read(conn: asyncpg.Connection) -> BackendRecord | None:
            r = await conn.fetchrow(f"SELECT {BACKEND_COLUMNS} FROM backends WHERE name = $1", name)
            return None if r is None else backend_record(r)

        return await self._read(read)

    async def set_backend_access(
        self, executor_id: str, backends: Sequence[str], tenants: Sequence[str] | None
    ) -> None:
        allowed = None if tenants is None else sorted(set(tenants))

        async def tx(t: _Tx) -> None:
            await t.conn.execute("DELETE FROM backend_access WHERE executor_id = $1", executor_id)
            await t.conn.executemany(
                "INSERT INTO backend_access (backend, executor_id, tenants) VALUES ($1, $2, $3)",
                [(b, executor_id, allowed) for b in dict.fromkeys(backends)],
            )

        await self._tx(tx)

    async def backend_access(self) -> dict[str, frozenset[str] | None]:
        async def read(conn: asyncpg.Connection) -> dict[str, frozenset[str] | None]:
            return access_map(await conn.fetch("SELECT backend, tenants FROM backend_access"))

        return await self._read(read)

    # --- identity -------------------------------------------------------------
    async def create_tenant(self, tenant: TenantRecord) -> TenantRecord:
        async def tx(t: _Tx) -> TenantRecord:
            inserted = await t.conn.fetchval(
                f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO NOTHING RETURNING name",
                tenant.name,
                tenant.description,
                tenant.created_at,
            )
            if inserted is None:
                raise AlreadyExists(f"tenant {tenant.name!r} already exists")
            return tenant

        return await self._tx(tx)

    async def get_tenant(self, name: str) -> TenantRecord | None:
        async def read(conn: asyncpg.Connection) -> TenantRecord | None:
            row = await conn.fetchrow(f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1", name)
            return None if row is None else tenant_record(row)

        return await self._read(read)

    async def list_tenants(self) -> list[TenantRecord]:
        async def read(conn: asyncpg.Connection) -> list[TenantRecord]:
            rows = await conn.fetch(f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name")
            return [tenant_record(r) for r in rows]

        return await self._read(read)

    async def create_token(self, token: TokenRecord) -> TokenRecord:
        allowed = None if token.executor_tenants is None else list(token.executor_tenants)

        async def tx(t: _Tx) -> TokenRecord:
            inserted = await t.conn.fetchval(
                f"INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES "
                "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
                "ON CONFLICT DO NOTHING RETURNING id",
                token.id,
                token.prefix,
                str(token.role),
                token.tenant,
                allowed,
                token.label,
                token.created_at,
                token.expires_at,
                token.revoked_at,
                token.digest,
                token.user,
            )
            if inserted is None:
                raise AlreadyExists(f"token {token.id} or its prefix already exists")
            return token

        return await self._tx(tx)

    async def find_token(self, prefix: str) -> TokenRecord | None:
        async def read(conn: asyncpg.Connection) -> TokenRecord | None:
            row = await conn.fetchrow(FIND_TOKEN.format("$1"), prefix)
            return None if row is None else found_token(row)

        return await self._read(read)

    async def revoke_token(self, token_id: str, now: float) -> TokenRecord:
        async def tx(t: _Tx) -> TokenRecord:
            row = await t.conn.fetchrow(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 "
                f"RETURNING {TOKEN_COLUMNS}",
                now,
                token_id,
            )
            if row is None:
                raise NotFound(f"token {token_id!r} not found")
            return replace(token_record(row), digest=b"")

        return await self._tx(tx)

    async def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        async def read(conn: asyncpg.Connection) -> list[TokenRecord]:
            rows = await conn.fetch(
                f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE ($1::text IS NULL OR tenant = $1) "
                "ORDER BY created_at, id",
                tenant,
            )
            return [replace(token_record(r), digest=b"") for r in rows]

        return await self._read(read)

    async def count_tokens(self, role: Role | None = None) -> int:
        async def read(conn: asyncpg.Connection) -> int:
            if role is None:
                return int(await conn.fetchval("SELECT COUNT(*) FROM api_tokens"))
            return int(
                await conn.fetchval(
                    "SELECT COUNT(*) FROM api_tokens WHERE role = $1 AND revoked_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > $2)",
                    str(role),
                    time.time(),
                )
            )

        return await self._read(read)

    async def create_user(self, user: UserRecord) -> UserRecord:
        async def tx(t: _Tx) -> UserRecord:
            inserted = await t.conn.fetchval(
                f"INSERT INTO users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (tenant, name) DO NOTHING RETURNING name",
                user.tenant,
                user.name,
                str(user.role),
                user.created_at,
                user.disabled_at,
            )
            if inserted is None:
                raise AlreadyExists(f"user {user.name!r} already exists in tenant {user.tenant!r}")
            return user

        return await self._tx(tx)

    async def get_user(self, tenant: str, name: str) -> UserRecord | None:
        async def read(conn: asyncpg.Connection) -> UserRecord | None:
            row = await conn.fetchrow(
                f"SELECT {USER_COLUMNS} FROM users WHERE tenant = $1 AND name = $2", tenant, name
            )
            return None if row is None else user_record(row)

        return await self._read(read)

    async def list_users(self, tenant: str | None = None) -> list[UserRecord]:
        async def read(conn: asyncpg.Connection) -> list[UserRecord]:
            rows = await conn.fetch(
                f"SELECT {USER_COLUMNS} FROM users WHERE ($1::text IS NULL OR tenant = $1) "
                "ORDER BY tenant, name",
                tenant,
            )
            return [user_record(r) for r in rows]

        return await self._read(read)

    async def disable_user(self, tenant: str, name: str, now: float) -> UserRecord:
        async def tx(t: _Tx) -> UserRecord:
            row = await t.conn.fetchrow(
                "UPDATE users SET disabled_at = COALESCE(disabled_at, $1) "
                f"WHERE tenant = $2 AND name = $3 RETURNING {USER_COLUMNS}",
                now,
                tenant,
                name,
            )
            if row is None:
                raise NotFound(f"user {name!r} not found in tenant {tenant!r}")
            return user_record(row)

        return await self._tx(tx)

    async def queue_lengths(self) -> dict[str, int]:
        async def read(conn: asyncpg.Connection) -> dict[str, int]:
            rows = await conn.fetch(
                "SELECT key, SUM(n)::bigint AS n FROM queued_counts WHERE scope = 'b' "
                "GROUP BY key HAVING SUM(n) > 0"
            )
            return {r["key"]: r["n"] for r in rows}

        return await self._read(read)

    async def count_by_state(self) -> dict[JobState, int]:
        async def read(conn: asyncpg.Connection) -> dict[JobState, int]:
            rows = await conn.fetch("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            counts = zero_counts()
            for r in rows:
                counts[JobState(r["state"])] = r["n"]
            return counts

        return await self._read(read)

    # --- quotas and usage ---------------------------------------------------
    @staticmethod
    async def _open_sessions(conn: asyncpg.Connection, tenant: str) -> int:
        n = await conn.fetchval(
            f"SELECT COUNT(*) FROM sessions WHERE tenant = $1 AND state IN {SESSION_LIVE}",
            tenant,
        )
        return int(n)

    async def tenant_usage(self, tenant: str, since_day: str) -> TenantUsage:
        async def read(conn: asyncpg.Connection) -> TenantUsage:
            running = await conn.fetchval(
                f"SELECT COUNT(*) FROM jobs WHERE state = {RUNNING} AND tenant = $1", tenant
            )
            stored = await conn.fetchval(
                "SELECT COALESCE(SUM(size_bytes), 0) FROM programs WHERE tenant = $1", tenant
            )
            return TenantUsage(
                queued_jobs=await self._queued(conn, "t", tenant),
                running_jobs=int(running),
                open_sessions=await self._open_sessions(conn, tenant),
                program_bytes=int(stored),
                executor_seconds=await self._used_seconds(conn, tenant, since_day),
            )

        return await self._read(read)

    async def queue_estimates(self, tenant: str) -> dict[str, int]:
        async def read(conn: asyncpg.Connection) -> dict[str, int]:
            # The tenant's counters, one per backend: a range of the primary key.
            prefix = tenant_backend_key(tenant, "")
            rows = await conn.fetch(
                "SELECT key, SUM(n)::bigint AS n FROM queued_counts WHERE scope = $1 "
                "AND key > $2 AND key < $3 GROUP BY key HAVING SUM(n) > 0",
                TENANT_BACKEND,
                prefix,
                tenant + chr(ord(KEY_SEP) + 1),
            )
            estimates = {}
            for r in rows:
                backend = r["key"][len(prefix) :]
                own, active = await self._weights(conn, tenant, backend)
                estimates[backend] = lifecycle.estimated_length(int(r["n"]), own, active)
            return estimates

        return await self._read(read)

    # --- replica coordination (PostgreSQL only) ----------------------------
    async def job_seqs(self, job_ids: Sequence[str]) -> dict[str, int]:
        """last_seq of each of these jobs: lets a replica see which Watches fell behind."""

        async def read(conn: asyncpg.Connection) -> dict[str, int]:
            rows = await conn.fetch(
                "SELECT id, last_seq FROM jobs WHERE id = ANY($1::text[])", list(job_ids)
            )
            return {r["id"]: r["last_seq"] for r in rows}

        return await self._read(read)

    async def publish_presence(
        self, broker_id: str, executors: Sequence[tuple[str, Sequence[str], int]], now: float
    ) -> None:
        """Replace this replica's rows with its connected executors (id, backends, slots)."""

        async def tx(t: _Tx) -> None:
            ids = [e[0] for e in executors]
            await t.conn.execute(
                "DELETE FROM executor_presence WHERE broker_id = $1 "
                "AND NOT (executor_id = ANY($2::text[]))",
                broker_id,
                ids,
            )
            if executors:
                await t.conn.executemany(
                    "INSERT INTO executor_presence (executor_id, broker_id, backends, slots, "
                    "last_seen) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (executor_id) DO UPDATE "
                    "SET broker_id = excluded.broker_id, backends = excluded.backends, "
                    "slots = excluded.slots, last_seen = excluded.last_seen",
                    [(e[0], broker_id, list(e[1]), e[2], now) for e in executors],
                )
            t.notify("p")

        await self._tx(tx)

    async def withdraw_presence(self, broker_id: str) -> None:
        """This replica is stopping: its executors are no longer online here."""

        async def tx(t: _Tx) -> None:
            await t.conn.execute("DELETE FROM executor_presence WHERE broker_id = $1", broker_id)
            t.notify("p")

        await self._tx(tx)

    async def list_presence(self, since: float) -> list[Presence]:
        """Executors whose replica refreshed them after `since` (older rows: a dead replica)."""

        async def read(conn: asyncpg.Connection) -> list[Presence]:
            rows = await conn.fetch(
                "SELECT executor_id, broker_id, backends, slots, last_seen FROM executor_presence "
                "WHERE last_seen > $1 ORDER BY executor_id",
                since,
            )
            return [
                Presence(
                    r["executor_id"],
                    r["broker_id"],
                    tuple(r["backends"]),
                    r["slots"],
                    r["last_seen"],
                )
                for r in rows
            ]

        return await self._read(read)


class _LostConnection(Exception):
    """Carries an error that meant "connection gone" out of the pool's context."""

    def __init__(self, cause: Exception, committing: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.committing = committing  # lost during COMMIT: outcome unknown


def _connection_lost(exc: BaseException, conn: Any) -> bool:
    """Whether `exc` means the database connection is gone (not a bug or a bad query).

    asyncpg may report a connection the server just terminated as an internal
    client error, so a closed connection counts whatever the exception."""
    if isinstance(exc, QRelayError):
        return False
    return isinstance(exc, _CONNECTION_ERRORS) or bool(conn.is_closed())
