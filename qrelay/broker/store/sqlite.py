"""SQLite `JobStore`: one file, WAL, every operation one transaction.

All sqlite3 calls run on one dedicated worker thread that owns the
connection, so the event loop never blocks and transactions never interleave.
Commits in WAL mode with synchronous=NORMAL do not fsync (only checkpoints
do) yet survive a process crash, which keeps submit→result throughput high.
The lifecycle decisions are `lifecycle.py`'s; this module is their SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

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
    access_map,
    backend_record,
    event_record,
    event_values,
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
from qrelay.errors import AlreadyExists, NotFound

log = structlog.get_logger(__name__)

T = TypeVar("T")

__all__ = ["SCHEMA_VERSION", "SQLiteJobStore"]

_DIALECT = Dialect(
    serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
    real="REAL",
    big="INTEGER",
    blob="BLOB",
    flag="INTEGER NOT NULL DEFAULT 0",
    strings="TEXT",  # a JSON list
    extra={
        2: f"""
    CREATE INDEX jobs_session_live ON jobs(session_id)
        WHERE session_id != '' AND state IN {UNFINISHED};
    """,
        # Counters kept by triggers (see schema.MIGRATIONS[3]).
        3: f"""
    CREATE TABLE queued_counts (
        scope TEXT NOT NULL,  -- 't': tenant, 'b': backend
        key TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) WITHOUT ROWID;
    INSERT INTO queued_counts (scope, key, n)
        SELECT 't', tenant, COUNT(*) FROM jobs WHERE state = {QUEUED} GROUP BY tenant;
    INSERT INTO queued_counts (scope, key, n)
        SELECT 'b', backend, COUNT(*) FROM jobs WHERE state = {QUEUED} GROUP BY backend;
    CREATE TRIGGER jobs_queued_insert AFTER INSERT ON jobs WHEN NEW.state = {QUEUED} BEGIN
        INSERT INTO queued_counts (scope, key, n) VALUES ('t', NEW.tenant, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
        INSERT INTO queued_counts (scope, key, n) VALUES ('b', NEW.backend, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_queued_leave AFTER UPDATE OF state, tenant, backend ON jobs
    WHEN OLD.state = {QUEUED} BEGIN
        UPDATE queued_counts SET n = n - 1 WHERE scope = 't' AND key = OLD.tenant;
        UPDATE queued_counts SET n = n - 1 WHERE scope = 'b' AND key = OLD.backend;
    END;
    CREATE TRIGGER jobs_queued_enter AFTER UPDATE OF state, tenant, backend ON jobs
    WHEN NEW.state = {QUEUED} BEGIN
        INSERT INTO queued_counts (scope, key, n) VALUES ('t', NEW.tenant, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
        INSERT INTO queued_counts (scope, key, n) VALUES ('b', NEW.backend, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_queued_delete AFTER DELETE ON jobs WHEN OLD.state = {QUEUED} BEGIN
        UPDATE queued_counts SET n = n - 1 WHERE scope = 't' AND key = OLD.tenant;
        UPDATE queued_counts SET n = n - 1 WHERE scope = 'b' AND key = OLD.backend;
    END;
    """,
        # The counters gain scope 'tb' (a tenant's queued jobs on one backend).
        6: f"""
    INSERT INTO queued_counts (scope, key, n)
        SELECT 'tb', tenant || char(31) || backend, COUNT(*) FROM jobs WHERE state = {QUEUED}
        GROUP BY tenant, backend;
    DROP TRIGGER jobs_queued_insert;
    DROP TRIGGER jobs_queued_leave;
    DROP TRIGGER jobs_queued_enter;
    DROP TRIGGER jobs_queued_delete;
    CREATE TRIGGER jobs_queued_insert AFTER INSERT ON jobs WHEN NEW.state = {QUEUED} BEGIN
        INSERT INTO queued_counts (scope, key, n)
            VALUES ('t', NEW.tenant, 1), ('b', NEW.backend, 1),
            ('tb', NEW.tenant || char(31) || NEW.backend, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_queued_leave AFTER UPDATE OF state, tenant, backend ON jobs
    WHEN OLD.state = {QUEUED} BEGIN
        UPDATE queued_counts SET n = n - 1 WHERE (scope = 't' AND key = OLD.tenant)
            OR (scope = 'b' AND key = OLD.backend)
            OR (scope = 'tb' AND key = OLD.tenant || char(31) || OLD.backend);
    END;
    CREATE TRIGGER jobs_queued_enter AFTER UPDATE OF state, tenant, backend ON jobs
    WHEN NEW.state = {QUEUED} BEGIN
        INSERT INTO queued_counts (scope, key, n)
            VALUES ('t', NEW.tenant, 1), ('b', NEW.backend, 1),
            ('tb', NEW.tenant || char(31) || NEW.backend, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_queued_delete AFTER DELETE ON jobs WHEN OLD.state = {QUEUED} BEGIN
        UPDATE queued_counts SET n = n - 1 WHERE (scope = 't' AND key = OLD.tenant)
            OR (scope = 'b' AND key = OLD.backend)
            OR (scope = 'tb' AND key = OLD.tenant || char(31) || OLD.backend);
    END;
    """,
        7: """
    INSERT INTO job_tags (tenant, key, qseq)
        SELECT j.tenant, t.key, j.qseq FROM jobs j, json_each(j.tags) t;
    """,
    },
)
_MIGRATIONS = migrations(_DIALECT)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _marks(n: int) -> str:
    """`?, ?, …` for n values."""
    return ", ".join("?" * n)


class SQLiteJobStore(JobStore):
    """The embedded default store (see module docstring)."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._writer = _GroupCommitThread(f"qrelay-sqlite-{self.path.name}")
        self._conn: sqlite3.Connection | None = None

    def describe(self) -> str:
        """Where the data lives, for logs."""
        return str(self.path)

    # --- plumbing ----------------------------------------------------------
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` atomically on the store's thread; returns once it is committed."""
        return await self._writer.submit(fn, transactional=True)

    async def open(self) -> None:
        def connect(_: sqlite3.Connection | None) -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row  # rows by column name, as asyncpg's
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.close()
                raise RuntimeError(
                    f"{self.path} has schema version {version}; this qrelay knows up to "
                    f"{SCHEMA_VERSION} (upgrade qrelay)"
                )
            for target in pending_migrations(version):
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_MIGRATIONS[target]}; PRAGMA user_version={target}; COMMIT;"
                )
            self._writer.conn = conn
            return conn

        self._writer.start()
        self._conn = await self._writer.submit(connect, transactional=False)
        log.info("store.opened", path=str(self.path), synchronous=self.synchronous)

    async def close(self) -> None:
        def disconnect(conn: sqlite3.Connection | None) -> None:
            if conn is not None:
                conn.close()
            self._writer.conn = None

        if self._writer.running:
            await self._writer.submit(disconnect, transactional=False)
            await asyncio.to_thread(self._writer.stop)
        self._conn = None

    # --- helpers run on the store thread -----------------------------------
    @staticmethod
    def _queued(conn: sqlite3.Connection, scope: str, key: str) -> int:
        """Queued jobs of a tenant ('t') or backend ('b'), from the trigger-kept counters."""
        row = conn.execute(
            "SELECT n FROM queued_counts WHERE scope = ? AND key = ?", (scope, key)
        ).fetchone()
        return 0 if row is None else int(row[0])

    @staticmethod
    def _weights(conn: sqlite3.Connection, tenant: str, backend: str) -> tuple[float, float]:
        """(the tenant's weight, the sum of the active tenants' weights) on a
        backend: active = its fair share ends past the backend's clock."""
        row = conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN tenant = ? THEN weight END), 1.0), "
            "COALESCE(SUM(weight), 0.0) FROM fair_share WHERE backend = ? AND (tenant = ? "
            "OR finish > COALESCE((SELECT clock FROM fair_clock WHERE backend = ?), 0.0))",
            (tenant, backend, tenant, backend),
        ).fetchone()
        return float(row[0]), float(row[1])

    @classmethod
    def _load(
        cls,
        conn: sqlite3.Connection,
        job_id: str,
        tenant: str | None = None,
        *,
        ahead: int | None = None,
    ) -> JobRecord:
        """Load a job with its estimated queue position (`lifecycle.estimated_position`);
        the tenant's own jobs ahead of it are counted unless the caller knows them."""
        row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        row = lifecycle.check_tenant("job", job_id, row, tenant)
        position = 0
        if row["state"] == QUEUED and ahead is not None:
            own, active = cls._weights(conn, row["tenant"], row["backend"])
            position = lifecycle.estimated_position(ahead, own, active)
        elif row["state"] == QUEUED:
            # The tenant's own jobs its turns take before it (jobs_tenant_order).
            ahead = conn.execute(
                OWN_AHEAD.format(t=":t", b=":b", p=":p", q=":q"),
                {"t": row["tenant"], "b": row["backend"], "p": row["priority"], "q": row["qseq"]},
            ).fetchone()[0]
            own, active = cls._weights(conn, row["tenant"], row["backend"])
            position = lifecycle.estimated_position(ahead, own, active)
        return job_record(row, position)

    @staticmethod
    def _facts(conn: sqlite3.Connection, job_id: str) -> JobFacts | None:
        row = conn.execute(f"SELECT {FACT_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobFacts.of(row)

    @staticmethod
    def _insert_events(conn: sqlite3.Connection, events: Sequence[StoredEvent]) -> None:
        conn.executemany(
            f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({_marks(5)})",
            [event_values(e) for e in events],
        )

    def _write(self, conn: sqlite3.Connection, change: Transition) -> None:
        """Execute a lifecycle decision: the job's new columns and its new events."""
        sets = ", ".join(f"{column} = ?" for column in change.columns)
        conn.execute(
            f"UPDATE jobs SET {sets} WHERE id = ?", (*change.columns.values(), change.job_id)
        )
        self._insert_events(conn, change.events)
        if change.usage is not None:
            conn.execute(
                "INSERT INTO tenant_usage (tenant, day, seconds) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant, day) DO UPDATE SET seconds = seconds + excluded.seconds",
                (change.usage.tenant, change.usage.day, change.usage.seconds),
            )

    @staticmethod
    def _insert_tags(
        conn: sqlite3.Connection, tenant: str, qseq: int, tags: dict[str, str]
    ) -> None:
        conn.executemany(
            "INSERT INTO job_tags (tenant, key, qseq) VALUES (?, ?, ?)",
            [(tenant, key, qseq) for key in tags],
        )

    # --- jobs --------------------------------------------------------------
    @staticmethod
    def _fair_start(conn: sqlite3.Connection, job: NewJob) -> float:
        """The new job's fair-share start tag; records where the tenant's share ends."""
        clock = conn.execute(
            "SELECT clock FROM fair_clock WHERE backend = ?", (job.backend,)
        ).fetchone()
        last = conn.execute(
            "SELECT finish FROM fair_share WHERE tenant = ? AND backend = ?",
            (job.tenant, job.backend),
        ).fetchone()
        start, finish = lifecycle.fair_start(
            clock[0] if clock else 0.0, last[0] if last else 0.0, job.weight
        )
        conn.execute(
            "INSERT INTO fair_share (tenant, backend, finish, weight) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tenant, backend) DO UPDATE SET finish = excluded.finish, "
            "weight = excluded.weight",
            (job.tenant, job.backend, finish, job.weight),
        )
        return start

    @staticmethod
    def _used_seconds(conn: sqlite3.Connection, tenant: str, since_day: str) -> float:
        row = conn.execute(
            "SELECT COALESCE(SUM(seconds), 0.0) FROM tenant_usage WHERE tenant = ? AND day >= ?",
            (tenant, since_day),
        ).fetchone()
        return float(row[0])

    async def submit(
        self, job: NewJob, *, max_queued_per_tenant: int, quota: Quota | None = None
    ) -> tuple[JobRecord, bool]:
        def tx(conn: sqlite3.Connection) -> tuple[JobRecord, bool]:
            if job.idempotency_key:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                    (job.tenant, job.idempotency_key),
                ).fetchone()
                if row is not None:
                    return self._load(conn, row[0]), False
                deleted = conn.execute(
                    "SELECT job_id FROM deleted_jobs WHERE tenant = ? AND idempotency_key = ?",
                    (job.tenant, job.idempotency_key),
                ).fetchone()
                lifecycle.check_key_not_deleted(job.idempotency_key, deleted and deleted[0])
            if job.session_id:
                session = conn.execute(
                    "SELECT tenant, backend, state FROM sessions WHERE id = ?", (job.session_id,)
                ).fetchone()
                lifecycle.check_session_accepts(job, session)
            queued = self._queued(conn, "t", job.tenant)
            lifecycle.check_queue_room(job.tenant, queued, max_queued_per_tenant)
            if quota is not None:
                used = (
                    self._used_seconds(conn, job.tenant, quota.period_start)
                    if quota.max_executor_seconds is not None
                    else 0.0
                )
                lifecycle.check_submit_quota(job.tenant, quota, queued, used)
            now = time.time()
            job_id = job.id or _new_id("j")
            event = lifecycle.submitted(job_id, now)
            start = self._fair_start(conn, job)
            conn.execute(
                f"INSERT INTO jobs ({NEW_JOB_COLUMNS}) VALUES ({_marks(15)})",
                (
                    job_id,
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
                ),
            )
            if job.session_id:
                conn.execute(
                    "UPDATE sessions SET last_job_at = ? WHERE id = ?", (now, job.session_id)
                )
            if job.tags:
                qseq = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                self._insert_tags(conn, job.tenant, qseq, job.tags)
            self._insert_events(conn, [event])
            # A fresh job holds its tenant's last start tag on the backend: all
            # its other queued jobs there are ahead (a counter, O(1)).
            mine = self._queued(conn, TENANT_BACKEND, tenant_backend_key(job.tenant, job.backend))
            below = conn.execute(
                OWN_BELOW.format(t=":t", b=":b", p=":p"),
                {"t": job.tenant, "b": job.backend, "p": job.priority},
            ).fetchone()[0]
            return self._load(conn, job_id, ahead=mine - below - 1), True

        return await self._run(tx)

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        return await self._run(lambda conn: self._load(conn, job_id, tenant))

    async def get_spec(self, job_id: str) -> bytes:
        def tx(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            return bytes(row[0])

        return await self._run(tx)

    async def get_result(self, job_id: str) -> bytes | None:
        def tx(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            return None if row[0] is None else bytes(row[0])

        return await self._run(tx)

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
        where = ["j.tenant = ?"]
        params: list[Any] = [tenant]
        if tags:
            # Walk the first tag's index rows newest first; the others are probes.
            source, order = "job_tags t CROSS JOIN jobs j ON j.qseq = t.qseq", "t.qseq"
            where = ["t.tenant = ?", "t.key = ?", *where]
            params = [tenant, tags[0], *params]
            for key in tags[1:]:
                where.append(
                    "EXISTS (SELECT 1 FROM job_tags o WHERE o.tenant = j.tenant AND o.key = ? "
                    "AND o.qseq = j.qseq)"
                )
                params.append(key)
        if page_token:
            where.append(f"{order} < ?")
            params.append(page_cursor(page_token))
        if states:
            where.append(f"j.state IN ({_marks(len(states))})")
            params.extend(int(s) for s in states)
        if backend:
            where.append("j.backend = ?")
            params.append(backend)
        if session_id:
            where.append("j.session_id = ?")
            params.append(session_id)
        if program:
            where.append(JOB_PROGRAM.format("?", "?", "?"))
            params.extend((program, tenant, program))

        def tx(conn: sqlite3.Connection) -> JobPage:
            rows = conn.execute(
                f"SELECT {qualified(JOB_COLUMNS, 'j')} FROM {source} WHERE {' AND '.join(where)} "
                f"ORDER BY {order} DESC LIMIT ?",
                (*params, page_size + 1),
            ).fetchall()
            more = len(rows) > page_size
            rows = rows[:page_size]
            positions: dict[str, int] = {}
            queued_backends = sorted({r["backend"] for r in rows if r["state"] == QUEUED})
            for backend in queued_backends:
                # One pass over the tenant's own queue there, not one count per job.
                own, active = self._weights(conn, tenant, backend)
                for job_id, rank in conn.execute(
                    "SELECT id, ROW_NUMBER() OVER (ORDER BY priority DESC, qseq) FROM jobs "
                    f"WHERE state = {QUEUED} AND tenant = ? AND backend = ?",
                    (tenant, backend),
                ).fetchall():
                    positions[job_id] = lifecycle.estimated_position(rank - 1, own, active)
            jobs = [job_record(r, positions.get(r["id"], 0)) for r in rows]
            return JobPage(jobs, str(rows[-1]["qseq"]) if more else "")

        return await self._run(tx)

    async def events_after(self, job_id: str, after_seq: int) -> list[StoredEvent]:
        def tx(conn: sqlite3.Connection) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, time, payload, terminal FROM events WHERE job_id = ? AND seq > ? "
                "ORDER BY seq",
                (job_id, after_seq),
            ).fetchall()
            return [event_record(job_id, r) for r in rows]

        return await self._run(tx)

    @staticmethod
    def _owned(conn: sqlite3.Connection, job_id: str, tenant: str) -> int:
        """The qseq of the tenant's job; NotFound (OtherTenants for another's job)."""
        row = conn.execute("SELECT tenant, qseq FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["tenant"] != tenant:
            raise job_not_found(job_id, other_tenant=row is not None)
        return int(row["qseq"])

    async def delete_job(self, job_id: str, tenant: str) -> JobRecord:
        def tx(conn: sqlite3.Connection) -> JobRecord:
            qseq = self._owned(conn, job_id, tenant)
            job = self._load(conn, job_id, tenant, ahead=0)
            lifecycle.check_deletable(job_id, job.state)
            if job.idempotency_key:
                conn.execute(
                    "INSERT INTO deleted_jobs (tenant, idempotency_key, job_id, deleted_at) "
                    "VALUES (?, ?, ?, ?)",
                    (tenant, job.idempotency_key, job_id, time.time()),
                )
            conn.execute("DELETE FROM job_tags WHERE qseq = ?", (qseq,))
            conn.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return job

        return await self._run(tx)

    async def update_tags(self, job_id: str, tenant: str, tags: dict[str, str]) -> JobRecord:
        def tx(conn: sqlite3.Connection) -> JobRecord:
            qseq = self._owned(conn, job_id, tenant)
            conn.execute(
                "UPDATE jobs SET tags = ? WHERE id = ?", (json.dumps(tags, sort_keys=True), job_id)
            )
            conn.execute("DELETE FROM job_tags WHERE qseq = ?", (qseq,))
            self._insert_tags(conn, tenant, qseq, tags)
            return self._load(conn, job_id, tenant)

        return await self._run(tx)

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
        kind_filter = ""
        kind_params: list[Any] = []
        if kinds is not None:
            kind_filter = f" AND j.kind IN ({_marks(len(kinds))})"
            kind_params = [int(k) for k in kinds]
        if tenants is not None:  # an executor restricted to these tenants
            kind_filter += f" AND j.tenant IN ({_marks(len(tenants))})"
            kind_params.extend(tenants)
        params: list[Any] = [*backends, *kind_params]
        where = f"j.state = {QUEUED} AND j.backend IN ({_marks(len(backends))}){kind_filter}"
        columns = f"{qualified(FACT_COLUMNS, 'j')}, j.spec, j.session_id, j.vt, j.qseq, j.priority"

        def tx(conn: sqlite3.Connection) -> list[LeaseGrant]:
            room = lifecycle.RunningRoom(
                running, self._running_counts(conn) if running is not None else {}
            )
            rows: list[dict[str, Any]] = []

            def gather(select: Callable[[list[str], list[int], int], list[sqlite3.Row]]) -> None:
                """Rows in claim order, minus tenants at their running quota."""
                while len(rows) < limit:
                    want = limit - len(rows)
                    batch = select(room.blocked(), [r["qseq"] for r in rows], want)
                    refused = False
                    for row in batch:
                        if room.take(row["tenant"]):
                            rows.append(dict(row))
                        else:
                            refused = True
                    if not refused:
                        return

            # First the jobs of active dedicated sessions pinned here: they jump
            # the queue, but only while within SESSION_JUMP of the first other
            # job waiting on their backend. Then everyone's in fair order, minus
            # jobs pinned elsewhere.
            def pinned(blocked: list[str], taken: list[int], want: int) -> list[sqlite3.Row]:
                # CROSS JOIN fixes the order (pinned sessions, then their jobs);
                # the != '' terms let SQLite use the partial indexes.
                return conn.execute(
                    f"SELECT {columns} FROM sessions s CROSS JOIN jobs j ON j.session_id = s.id "
                    f"WHERE s.executor_id = ? AND s.executor_id != '' AND s.mode = {DEDICATED} "
                    f"AND s.state = {SESSION_ACTIVE} AND j.session_id != '' AND {where} "
                    f"AND j.tenant NOT IN ({_marks(len(blocked))}) "
                    f"AND j.qseq NOT IN ({_marks(len(taken))}) "
                    f"AND j.vt <= {OTHERS_FIRST_TAG} + ? ORDER BY {CLAIM_ORDER} LIMIT ?",
                    (executor_id, *params, *blocked, *taken, lifecycle.SESSION_JUMP, want),
                ).fetchall()

            def fair(blocked: list[str], taken: list[int], want: int) -> list[sqlite3.Row]:
                return conn.execute(
                    f"SELECT {columns} FROM jobs j LEFT JOIN sessions s ON s.id = j.session_id "
                    f"WHERE {where} AND (s.id IS NULL OR s.mode != {DEDICATED} OR "
                    "s.executor_id = '' OR s.executor_id = ?) "
                    f"AND j.tenant NOT IN ({_marks(len(blocked))}) "
                    f"AND j.qseq NOT IN ({_marks(len(taken))}) "
                    f"ORDER BY {CLAIM_ORDER} LIMIT ?",
                    (*params, executor_id, *blocked, *taken, want),
                ).fetchall()

            gather(pinned)
            gather(fair)
            # Each turn goes to the tenant's best-priority job, which takes the
            # turn's start tag (and leaves its own to the job it overtakes).
            for i, row in enumerate(rows):
                taken = [r["qseq"] for r in rows]
                better = None
                for condition, values in (
                    (BETTER_THAN[0], (row["priority"],)),
                    (BETTER_THAN[1], (row["priority"], row["qseq"])),
                ):
                    better = conn.execute(
                        f"SELECT {columns} FROM jobs j WHERE j.state = {QUEUED} "
                        "AND j.tenant = ? AND j.backend = ? AND j.session_id = ? "
                        f"AND {condition.format(p='?', q='?')}{kind_filter} "
                        f"AND j.qseq NOT IN ({_marks(len(taken))}) "
                        f"ORDER BY {PRIORITY_ORDER} LIMIT 1",
                        (
                            row["tenant"],
                            row["backend"],
                            row["session_id"],
                            *values,
                            *kind_params,
                            *taken,
                        ),
                    ).fetchone()
                    if better is not None:
                        break
                if better is not None:
                    conn.execute(
                        "UPDATE jobs SET vt = ? WHERE qseq = ?", (better["vt"], row["qseq"])
                    )
                    conn.execute(
                        "UPDATE jobs SET vt = ? WHERE qseq = ?", (row["vt"], better["qseq"])
                    )
                    rows[i] = {**dict(better), "vt": row["vt"]}
            now = time.time()
            grants = []
            for row in rows:
                if row["session_id"]:
                    conn.execute(
                        "UPDATE sessions SET activated_at = COALESCE(activated_at, ?), "
                        f"state = CASE state WHEN {SESSION_OPEN} THEN {SESSION_ACTIVE} "
                        f"ELSE state END, executor_id = CASE WHEN mode = {DEDICATED} "
                        "AND executor_id = '' THEN ? ELSE executor_id END WHERE id = ?",
                        (now, executor_id, row["session_id"]),
                    )
                change = lifecycle.claim(
                    JobFacts.of(row), executor_id, _new_id("l"), lease_ttl_s, now
                )
                self._write(conn, change)
                grants.append(
                    LeaseGrant(self._load(conn, change.job_id), bytes(row["spec"]), change.events)
                )
                # The backend's virtual clock moves to the claimed job's start tag.
                conn.execute(
                    "INSERT INTO fair_clock (backend, clock) VALUES (?, ?) ON CONFLICT (backend) "
                    "DO UPDATE SET clock = MAX(clock, excluded.clock)",
                    (row["backend"], row["vt"]),
                )
            return grants

        return await self._run(tx)

    @staticmethod
    def _running_counts(conn: sqlite3.Connection) -> dict[str, int]:
        """RUNNING jobs per tenant (from the partial index of RUNNING jobs: as many
        rows as busy slots)."""
        rows = conn.execute(
            # INDEXED BY: the planner would rather walk jobs_tenant (every job).
            "SELECT tenant, COUNT(*) FROM jobs INDEXED BY jobs_lease_expiry "
            f"WHERE state = {RUNNING} GROUP BY tenant"
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    async def extend_leases(self, lease_ids: Sequence[str], lease_ttl_s: float) -> set[str]:
        if not lease_ids:
            return set()

        def tx(conn: sqlite3.Connection) -> set[str]:
            expires = time.time() + lease_ttl_s
            extended = set()
            for lease_id in lease_ids:
                cur = conn.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE lease_id = ? "
                    f"AND state = {RUNNING}",
                    (expires, lease_id),
                )
                if cur.rowcount:
                    extended.add(lease_id)
            return extended

        return await self._run(tx)

    async def check_held(
        self, executor_id: str, held: Sequence[tuple[str, str]], lease_ttl_s: float
    ) -> HeldCheck:
        def tx(conn: sqlite3.Connection) -> HeldCheck:
            expires = time.time() + lease_ttl_s
            valid: list[tuple[str, str]] = []
            invalid: list[tuple[str, str]] = []
            for job_id, lease_id in held:
                cur = conn.execute(
                    "UPDATE jobs SET lease_expires_at = ?, executor_id = ? "
                    f"WHERE id = ? AND lease_id = ? AND state = {RUNNING}",
                    (expires, executor_id, job_id, lease_id),
                )
                (valid if cur.rowcount else invalid).append((job_id, lease_id))
            return HeldCheck(valid, invalid)

        return await self._run(tx)

    async def apply_update(
        self, job_id: str, lease_id: str, kind: UpdateKind, payload: bytes
    ) -> UpdateOutcome:
        def tx(conn: sqlite3.Connection) -> UpdateOutcome:
            facts = self._facts(conn, job_id)
            decision = lifecycle.update(job_id, facts, lease_id, kind, payload, time.time())
            if isinstance(decision, Transition):
                self._write(conn, decision)
            job = None if facts is None else self._load(conn, job_id)
            return lifecycle.update_outcome(decision, job)

        return await self._run(tx)

    async def expire_leases(self, now: float, max_attempts: int) -> list[ExpiredLease]:
        def tx(conn: sqlite3.Connection) -> list[ExpiredLease]:
            rows = conn.execute(
                f"SELECT {FACT_COLUMNS} FROM jobs WHERE state = {RUNNING} "
                "AND lease_expires_at < ? ORDER BY lease_expires_at",
                (now,),
            ).fetchall()
            expired = []
            for row in rows:
                job = JobFacts.of(row)
                change = lifecycle.expire(job, max_attempts, now)
                self._write(conn, change)
                expired.append(
                    ExpiredLease(
                        self._load(conn, job.id), job.lease_id, job.executor_id, change.events
                    )
                )
            return expired

        return await self._run(tx)

    async def next_lease_expiry(self) -> float | None:
        def tx(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                f"SELECT MIN(lease_expires_at) FROM jobs WHERE state = {RUNNING}"
            ).fetchone()
            return None if row is None else row[0]

        return await self._run(tx)

    async def renew_running_leases(self, lease_ttl_s: float) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            floor = time.time() + lease_ttl_s
            cur = conn.execute(
                f"UPDATE jobs SET lease_expires_at = ? WHERE state = {RUNNING} "
                "AND lease_expires_at < ?",
                (floor, floor),
            )
            return int(cur.rowcount)

        return await self._run(tx)

    async def cancel(self, job_id: str, tenant: str | None, reason: str) -> CancelOutcome:
        def tx(conn: sqlite3.Connection) -> CancelOutcome:
            row = conn.execute(
                f"SELECT {FACT_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            row = lifecycle.check_tenant("job", job_id, row, tenant)
            job = JobFacts.of(row)
            change = lifecycle.cancel(job, reason, time.time())
            if change is not None:
                self._write(conn, change)
            return lifecycle.cancel_outcome(job, change, self._load(conn, job_id))

        return await self._run(tx)

    # --- programs -----------------------------------------------------------
    @staticmethod
    def _find_program(
        conn: sqlite3.Connection, tenant: str, program: str, include_deleted: bool
    ) -> ProgramRecord:
        hidden = "" if include_deleted else " AND deleted = 0"
        row = conn.execute(
            f"SELECT {PROGRAM_COLUMNS} FROM programs WHERE tenant = ? AND id = ?{hidden}",
            (tenant, program),
        ).fetchone()
        if row is None:
            row = conn.execute(
                f"SELECT {PROGRAM_COLUMNS} FROM programs WHERE tenant = ? AND name = ?{hidden} "
                "ORDER BY version DESC LIMIT 1",
                (tenant, program),
            ).fetchone()
        if row is None:
            # Another tenant's program asked for by id: answered as missing, audited.
            other = conn.execute(
                "SELECT tenant FROM programs WHERE id = ? AND tenant != ? LIMIT 1",
                (program, tenant),
            ).fetchone()
            if other is not None:
                lifecycle.not_found("program", program, other["tenant"], tenant)
            raise NotFound(f"program {program!r} not found (no such id or name)")
        return program_record(row)

    async def put_program(
        self, program: NewProgram, quota: Quota | None = None
    ) -> tuple[ProgramRecord, bool]:
        def tx(conn: sqlite3.Connection) -> tuple[ProgramRecord, bool]:
            row = conn.execute(
                "SELECT deleted FROM programs WHERE tenant = ? AND id = ?",
                (program.tenant, program.id),
            ).fetchone()
            if row is not None:
                if row[0]:
                    conn.execute(
                        "UPDATE programs SET deleted = 0 WHERE tenant = ? AND id = ?",
                        (program.tenant, program.id),
                    )
                return self._find_program(conn, program.tenant, program.id, False), False
            if quota is not None and quota.max_program_bytes is not None:
                stored = conn.execute(
                    "SELECT COALESCE(SUM(size_bytes), 0) FROM programs WHERE tenant = ?",
                    (program.tenant,),
                ).fetchone()[0]
                lifecycle.check_program_quota(
                    program.tenant, quota, int(stored), len(program.archive)
                )
            version = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM programs WHERE tenant = ? AND name = ?",
                (program.tenant, program.name),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO programs (tenant, id, name, version, entry_point, requirements, "
                "input_schema_json, description, size_bytes, created_at, archive) "
                f"VALUES ({_marks(11)})",
                (
                    program.tenant,
                    program.id,
                    program.name,
                    version,
                    program.entry_point,
                    json.dumps(list(program.requirements)),
                    program.input_schema_json,
                    program.description,
                    len(program.archive),
                    time.time(),
                    program.archive,
                ),
            )
            return self._find_program(conn, program.tenant, program.id, False), True

        return await self._run(tx)

    async def get_program(
        self, tenant: str, program: str, *, include_deleted: bool = False
    ) -> ProgramRecord:
        return await self._run(
            lambda conn: self._find_program(conn, tenant, program, include_deleted)
        )

    async def get_program_archive(self, tenant: str, program_id: str) -> bytes:
        def tx(conn: sqlite3.Connection) -> bytes:
            row = conn.execute(
                "SELECT archive FROM programs WHERE tenant = ? AND id = ?", (tenant, program_id)
            ).fetchone()
            if row is None:
                raise NotFound(f"program {program_id!r} not found")
            return bytes(row[0])

        return await self._run(tx)

    async def list_programs(self, tenant: str, name: str = "") -> list[ProgramRecord]:
        def tx(conn: sqlite3.Connection) -> list[ProgramRecord]:
            if name:
                rows = conn.execute(
                    f"SELECT {PROGRAM_COLUMNS} FROM programs WHERE tenant = ? AND name = ? "
                    "AND deleted = 0 ORDER BY version DESC",
                    (tenant, name),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {PROGRAM_COLUMNS} FROM programs p WHERE tenant = ? AND deleted = 0 "
                    "AND version = (SELECT MAX(version) FROM programs q WHERE q.tenant = p.tenant "
                    "AND q.name = p.name AND q.deleted = 0) ORDER BY name",
                    (tenant,),
                ).fetchall()
            return [program_record(r) for r in rows]

        return await self._run(tx)

    async def delete_programs(self, tenant: str, program: str) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM programs WHERE tenant = ? AND deleted = 0 AND id = ?",
                    (tenant, program),
                ).fetchall()
            ] or [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM programs WHERE tenant = ? AND deleted = 0 AND name = ?",
                    (tenant, program),
                ).fetchall()
            ]
            if not ids:
                raise NotFound(f"program {program!r} not found (no such id or name)")
            conn.executemany(
                "UPDATE programs SET deleted = 1 WHERE tenant = ? AND id = ?",
                [(tenant, i) for i in ids],
            )
            # Drop every hidden version no unfinished job needs any more.
            conn.execute(
                "DELETE FROM programs WHERE tenant = ? AND deleted = 1 AND id NOT IN "
                "(SELECT program_id FROM jobs WHERE tenant = ? AND program_id != '' "
                f"AND state IN {UNFINISHED})",
                (tenant, tenant),
            )
            return len(ids)

        return await self._run(tx)

    # --- sessions -------------------------------------------------------------
    @staticmethod
    def _session(conn: sqlite3.Connection, row: sqlite3.Row) -> SessionRecord:
        counts = zero_counts()
        for state, n in conn.execute(
            "SELECT state, COUNT(*) FROM jobs WHERE session_id = ? AND session_id != '' "
            "GROUP BY state",
            (row["id"],),
        ).fetchall():
            counts[JobState(state)] = n
        last_finished = conn.execute(
            "SELECT MAX(finished_at) FROM jobs WHERE session_id = ? AND session_id != ''",
            (row["id"],),
        ).fetchone()[0]
        return session_record(row, counts, last_finished)

    def _load_session(
        self, conn: sqlite3.Connection, session_id: str, tenant: str | None
    ) -> SessionRecord:
        row = conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return self._session(conn, lifecycle.check_tenant("session", session_id, row, tenant))

    async def create_session(
        self, session: NewSession, quota: Quota | None = None
    ) -> SessionRecord:
        def tx(conn: sqlite3.Connection) -> SessionRecord:
            if quota is not None and quota.max_sessions is not None:
                lifecycle.check_session_quota(
                    session.tenant, quota, self._open_sessions(conn, session.tenant)
                )
            session_id = _new_id("s")
            conn.execute(
                "INSERT INTO sessions (id, tenant, backend, mode, state, max_time_s, max_idle_s, "
                f"created_at) VALUES ({_marks(8)})",
                (
                    session_id,
                    session.tenant,
                    session.backend,
                    int(session.mode),
                    SESSION_OPEN,
                    session.max_time_s,
                    session.max_idle_s,
                    time.time(),
                ),
            )
            return self._load_session(conn, session_id, None)

        return await self._run(tx)

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord:
        return await self._run(lambda conn: self._load_session(conn, session_id, tenant))

    async def list_sessions(
        self,
        tenant: str,
        *,
        states: Sequence[SessionState] = (),
        backend: str = "",
        page_size: int = 50,
        page_token: str = "",
    ) -> SessionPage:
        where = ["tenant = ?"]
        params: list[Any] = [tenant]
        if page_token:
            created, before = session_page_cursor(page_token)
            where.append(SESSION_BEFORE.format("?", "?", "?"))
            params.extend((created, created, before))
        if states:
            where.append(f"state IN ({_marks(len(states))})")
            params.extend(int(s) for s in states)
        if backend:
            where.append("backend = ?")
            params.append(backend)

        def tx(conn: sqlite3.Connection) -> SessionPage:
            rows = conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(where)} "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, page_size + 1),
            ).fetchall()
            sessions = [self._session(conn, r) for r in rows[:page_size]]
            more = len(rows) > page_size
            return SessionPage(sessions, session_page_token(sessions[-1]) if more else "")

        return await self._run(tx)

    async def end_session(
        self, session_id: str, tenant: str | None, state: SessionState, reason: str
    ) -> tuple[SessionRecord, bool]:
        lifecycle.check_session_end(state)

        def tx(conn: sqlite3.Connection) -> tuple[SessionRecord, bool]:
            current = self._load_session(conn, session_id, tenant)
            if not lifecycle.session_may_end(current.state, state):
                return current, False
            conn.execute(
                "UPDATE sessions SET state = ?, state_reason = ?, "
                "closed_at = COALESCE(closed_at, ?) WHERE id = ?",
                (int(state), reason, time.time(), session_id),
            )
            return self._load_session(conn, session_id, None), True

        return await self._run(tx)

    async def live_sessions(self) -> list[SessionRecord]:
        def tx(conn: sqlite3.Connection) -> list[SessionRecord]:
            # Two index-driven halves, so old sessions cost nothing per reaper tick.
            rows = conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE state IN {SESSION_LIVE} UNION ALL "
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id IN (SELECT session_id "
                "FROM jobs INDEXED BY jobs_session_live WHERE session_id != '' "
                f"AND state IN {UNFINISHED}) AND state = {SESSION_CLOSED} AND executor_id != '' "
                "ORDER BY created_at"
            ).fetchall()
            return [self._session(conn, r) for r in rows]

        return await self._run(tx)

    async def unpin_sessions(self, executor_id: str) -> list[SessionRecord]:
        def tx(conn: sqlite3.Connection) -> list[SessionRecord]:
            rows = conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE executor_id = ? "
                f"AND mode = {DEDICATED}",
                (executor_id,),
            ).fetchall()
            changed = [self._session(conn, r) for r in rows]
            conn.execute(
                "UPDATE sessions SET executor_id = '' WHERE executor_id = ? "
                f"AND mode = {DEDICATED}",
                (executor_id,),
            )
            return changed

        return await self._run(tx)

    # --- backends and statistics ------------------------------------------
    async def upsert_backends(self, backends: Sequence[BackendRecord]) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"INSERT INTO backends ({BACKEND_COLUMNS}) VALUES (?, ?, ?) ON CONFLICT(name) "
                "DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen",
                [(b.name, b.info, b.last_seen) for b in backends],
            )

        await self._run(tx)

    async def touch_backends(self, names: Sequence[str], now: float) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE backends SET last_seen = ? WHERE name = ?", [(now, n) for n in names]
            )

        await self._run(tx)

    async def list_backends(self) -> list[BackendRecord]:
        def tx(conn: sqlite3.Connection) -> list[BackendRecord]:
            rows = conn.execute(f"SELECT {BACKEND_COLUMNS} FROM backends ORDER BY name").fetchall()
            return [backend_record(r) for r in rows]

        return await self._run(tx)

    async def get_backend(self, name: str) -> BackendRecord | None:
        def tx(conn: sqlite3.Connection) -> BackendRecord | None:
            r = conn.execute(
                f"SELECT {BACKEND_COLUMNS} FROM backends WHERE name = ?", (name,)
            ).fetchone()
            return None if r is None else backend_record(r)

        return await self._run(tx)

    async def set_backend_access(
        self, executor_id: str, backends: Sequence[str], tenants: Sequence[str] | None
    ) -> None:
        allowed = None if tenants is None else json.dumps(sorted(set(tenants)))

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM backend_access WHERE executor_id = ?", (executor_id,))
            conn.executemany(
                "INSERT INTO backend_access (backend, executor_id, tenants) VALUES (?, ?, ?)",
                [(b, executor_id, allowed) for b in dict.fromkeys(backends)],
            )

        await self._run(tx)

    async def backend_access(self) -> dict[str, frozenset[str] | None]:
        def tx(conn: sqlite3.Connection) -> dict[str, frozenset[str] | None]:
            return access_map(
                conn.execute("SELECT backend, tenants FROM backend_access").fetchall()
            )

        return await self._run(tx)

    # --- identity -------------------------------------------------------------
    async def create_tenant(self, tenant: TenantRecord) -> TenantRecord:
        def tx(conn: sqlite3.Connection) -> TenantRecord:
            try:
                conn.execute(
                    f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?, ?, ?)",
                    (tenant.name, tenant.description, tenant.created_at),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"tenant {tenant.name!r} already exists") from None
            return tenant

        return await self._run(tx)

    async def get_tenant(self, name: str) -> TenantRecord | None:
        def tx(conn: sqlite3.Connection) -> TenantRecord | None:
            row = conn.execute(
                f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name = ?", (name,)
            ).fetchone()
            return None if row is None else tenant_record(row)

        return await self._run(tx)

    async def list_tenants(self) -> list[TenantRecord]:
        def tx(conn: sqlite3.Connection) -> list[TenantRecord]:
            rows = conn.execute(f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name").fetchall()
            return [tenant_record(r) for r in rows]

        return await self._run(tx)

    async def create_token(self, token: TokenRecord) -> TokenRecord:
        allowed = None if token.executor_tenants is None else json.dumps(token.executor_tenants)

        def tx(conn: sqlite3.Connection) -> TokenRecord:
            try:
                conn.execute(
                    f"INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES ({_marks(11)})",
                    (
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
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"token {token.id} or its prefix already exists") from None
            return token

        return await self._run(tx)

    async def find_token(self, prefix: str) -> TokenRecord | None:
        def tx(conn: sqlite3.Connection) -> TokenRecord | None:
            row = conn.execute(FIND_TOKEN.format("?"), (prefix,)).fetchone()
            return None if row is None else found_token(row)

        return await self._run(tx)

    async def revoke_token(self, token_id: str, now: float) -> TokenRecord:
        def tx(conn: sqlite3.Connection) -> TokenRecord:
            conn.execute(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (now, token_id),
            )
            row = conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"token {token_id!r} not found")
            return replace(token_record(row), digest=b"")

        return await self._run(tx)

    async def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        def tx(conn: sqlite3.Connection) -> list[TokenRecord]:
            where, params = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
            rows = conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM api_tokens{where} ORDER BY created_at, id", params
            ).fetchall()
            return [replace(token_record(r), digest=b"") for r in rows]

        return await self._run(tx)

    async def count_tokens(self, role: Role | None = None) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            if role is None:
                return int(conn.execute("SELECT COUNT(*) FROM api_tokens").fetchone()[0])
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM api_tokens WHERE role = ? AND revoked_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > ?)",
                    (str(role), time.time()),
                ).fetchone()[0]
            )

        return await self._run(tx)

    async def create_user(self, user: UserRecord) -> UserRecord:
        def tx(conn: sqlite3.Connection) -> UserRecord:
            try:
                conn.execute(
                    f"INSERT INTO users ({USER_COLUMNS}) VALUES ({_marks(5)})",
                    (user.tenant, user.name, str(user.role), user.created_at, user.disabled_at),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(
                    f"user {user.name!r} already exists in tenant {user.tenant!r}"
                ) from None
            return user

        return await self._run(tx)

    async def get_user(self, tenant: str, name: str) -> UserRecord | None:
        def tx(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(
                f"SELECT {USER_COLUMNS} FROM users WHERE tenant = ? AND name = ?", (tenant, name)
            ).fetchone()
            return None if row is None else user_record(row)

        return await self._run(tx)

    async def list_users(self, tenant: str | None = None) -> list[UserRecord]:
        def tx(conn: sqlite3.Connection) -> list[UserRecord]:
            where, params = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
            rows = conn.execute(
                f"SELECT {USER_COLUMNS} FROM users{where} ORDER BY tenant, name", params
            ).fetchall()
            return [user_record(r) for r in rows]

        return await self._run(tx)

    async def disable_user(self, tenant: str, name: str, now: float) -> UserRecord:
        def tx(conn: sqlite3.Connection) -> UserRecord:
            conn.execute(
                "UPDATE users SET disabled_at = COALESCE(disabled_at, ?) "
                "WHERE tenant = ? AND name = ?",
                (now, tenant, name),
            )
            row = conn.execute(
                f"SELECT {USER_COLUMNS} FROM users WHERE tenant = ? AND name = ?", (tenant, name)
            ).fetchone()
            if row is None:
                raise NotFound(f"user {name!r} not found in tenant {tenant!r}")
            return user_record(row)

        return await self._run(tx)

    async def queue_lengths(self) -> dict[str, int]:
        def tx(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT key, n FROM queued_counts WHERE scope = 'b' AND n > 0"
            ).fetchall()
            return {r["key"]: r["n"] for r in rows}

        return await self._run(tx)

    async def count_by_state(self) -> dict[JobState, int]:
        def tx(conn: sqlite3.Connection) -> dict[JobState, int]:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            counts = zero_counts()
            for state, n in rows:
                counts[JobState(state)] = n
            return counts

        return await self._run(tx)

    # --- quotas and usage ---------------------------------------------------
    @staticmethod
    def _open_sessions(conn: sqlite3.Connection, tenant: str) -> int:
        return int(
            conn.execute(
                f"SELECT COUNT(*) FROM sessions WHERE tenant = ? AND state IN {SESSION_LIVE}",
                (tenant,),
            ).fetchone()[0]
        )

    async def tenant_usage(self, tenant: str, since_day: str) -> TenantUsage:
        def tx(conn: sqlite3.Connection) -> TenantUsage:
            running = conn.execute(
                "SELECT COUNT(*) FROM jobs INDEXED BY jobs_lease_expiry "
                f"WHERE state = {RUNNING} AND tenant = ?",
                (tenant,),
            ).fetchone()[0]
            stored = conn.execute(
                "SELECT COALESCE(SUM(size_bytes), 0) FROM programs WHERE tenant = ?", (tenant,)
            ).fetchone()[0]
            return TenantUsage(
                queued_jobs=self._queued(conn, "t", tenant),
                running_jobs=int(running),
                open_sessions=self._open_sessions(conn, tenant),
                program_bytes=int(stored),
                executor_seconds=self._used_seconds(conn, tenant, since_day),
            )

        return await self._run(tx)

    async def queue_estimates(self, tenant: str) -> dict[str, int]:
        def tx(conn: sqlite3.Connection) -> dict[str, int]:
            # The tenant's counters, one per backend: a range of the primary key.
            prefix = tenant_backend_key(tenant, "")
            rows = conn.execute(
                "SELECT key, n FROM queued_counts WHERE scope = ? AND key > ? AND key < ? "
                "AND n > 0",
                (TENANT_BACKEND, prefix, tenant + chr(ord(KEY_SEP) + 1)),
            ).fetchall()
            estimates = {}
            for key, n in rows:
                backend = key[len(prefix) :]
                own, active = self._weights(conn, tenant, backend)
                estimates[backend] = lifecycle.estimated_length(int(n), own, active)
            return estimates

        return await self._run(tx)


MAX_BATCH = 256


@dataclass
class _Op:
    fn: Callable[[Any], Any]
    transactional: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    value: Any = None
    error: BaseException | None = None


class _GroupCommitThread:
    """The one thread that owns the SQLite connection.

    Operations queued while a commit is in progress run together in the next
    transaction, each inside its own SAVEPOINT (so one failing operation rolls
    back alone), then a single COMMIT acknowledges them all. Callers are
    resumed only after that COMMIT: group commit keeps every acknowledgement
    durable while paying one commit and one thread hop per batch, not per job.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.conn: sqlite3.Connection | None = None

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    async def submit(self, fn: Callable[[Any], T], *, transactional: bool) -> T:
        if not self._thread.is_alive():
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        # `fn` runs in a copy of the caller's context, so what it logs (an audit
        # of a cross-tenant denial) carries what the call bound (its user), as
        # it does on PostgreSQL, where a transaction runs in the caller's task.
        context = contextvars.copy_context()

        def call(conn: Any) -> T:
            return context.run(fn, conn)

        op = _Op(call, transactional, loop, loop.create_future())
        self._queue.put(op)
        return await op.future  # type: ignore[no-any-return]

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            loops = {op.loop for op in batch}
            for loop in loops:
                mine = [op for op in batch if op.loop is loop]
                # A loop closed while we worked has nobody left waiting.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, mine)
            if stop:
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        in_tx: list[_Op] = []
        for op in batch:
            if not op.transactional:
                self._commit(in_tx)
                in_tx = []
                try:
                    op.value = op.fn(self.conn)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    op.error = exc
                continue
            conn = self.conn
            if conn is None:
                op.error = RuntimeError("store is not open")
                continue
            if not in_tx:
                conn.execute("BEGIN IMMEDIATE")
            in_tx.append(op)
            conn.execute("SAVEPOINT op")
            try:
                op.value = op.fn(conn)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                op.error = exc
                conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
        self._commit(in_tx)

    def _commit(self, ops: list[_Op]) -> None:
        if not ops or self.conn is None:
            return
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            for op in ops:
                op.error, op.value = exc, None


def _resolve(ops: list[_Op]) -> None:
    """On the event loop: hand each operation's outcome to its waiting caller."""
    for op in ops:
        if op.future.cancelled():
            continue
        if op.error is not None:
            op.future.set_exception(op.error)
        else:
            op.future.set_result(op.value)
