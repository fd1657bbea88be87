"""SQLite `JobStore`: one file, WAL, every operation one transaction.

All sqlite3 calls run on one dedicated worker thread that owns the
connection, so the event loop never blocks and transactions never interleave.
Commits in WAL mode with synchronous=NORMAL do not fsync (only checkpoints
do) yet survive a process crash, which keeps submit→result throughput high.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

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
    SessionMode,
    SessionRecord,
    SessionState,
    StoredEvent,
    UpdateKind,
    UpdateOutcome,
    job_error,
    state_payload,
    update_payload,
)
from qrelay.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = structlog.get_logger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 3
UNAVAILABLE = 14

# Schema migrations by target version.
_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE jobs (
        qseq INTEGER PRIMARY KEY AUTOINCREMENT,  -- FIFO order, also the page cursor
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        backend TEXT NOT NULL,
        kind INTEGER NOT NULL,
        state INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        error BLOB,
        session_id TEXT NOT NULL DEFAULT '',
        executor_id TEXT NOT NULL DEFAULT '',
        lease_id TEXT NOT NULL DEFAULT '',
        lease_expires_at REAL,
        last_seq INTEGER NOT NULL DEFAULT 0,
        tags TEXT NOT NULL DEFAULT '{}',
        idempotency_key TEXT,
        num_pubs INTEGER NOT NULL DEFAULT 0,
        spec BLOB NOT NULL,
        result BLOB
    );
    CREATE UNIQUE INDEX jobs_idempotency ON jobs(tenant, idempotency_key);
    CREATE INDEX jobs_queued ON jobs(backend, qseq) WHERE state = 1;
    CREATE INDEX jobs_tenant_queued ON jobs(tenant) WHERE state = 1;
    CREATE INDEX jobs_lease ON jobs(lease_id) WHERE lease_id != '';
    CREATE INDEX jobs_lease_expiry ON jobs(lease_expires_at) WHERE state = 2;
    CREATE INDEX jobs_tenant ON jobs(tenant, qseq);
    CREATE TABLE events (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        time REAL NOT NULL,
        payload BLOB NOT NULL,
        terminal INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE backends (
        name TEXT PRIMARY KEY,
        info BLOB NOT NULL,
        last_seen REAL NOT NULL
    );
    """,
    2: """
    ALTER TABLE jobs ADD COLUMN program_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_session ON jobs(session_id, state) WHERE session_id != '';
    CREATE INDEX jobs_session_live ON jobs(session_id) WHERE session_id != '' AND state IN (1, 2);
    CREATE INDEX jobs_program ON jobs(tenant, program_id) WHERE program_id != '';
    CREATE TABLE programs (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        entry_point TEXT NOT NULL,
        requirements TEXT NOT NULL,  -- JSON list
        input_schema_json TEXT NOT NULL,
        description TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,  -- 1: hidden, kept for unfinished jobs
        archive BLOB NOT NULL,
        PRIMARY KEY (tenant, id)
    );
    CREATE UNIQUE INDEX programs_name ON programs(tenant, name, version);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        backend TEXT NOT NULL,
        mode INTEGER NOT NULL,
        state INTEGER NOT NULL,
        state_reason TEXT NOT NULL DEFAULT '',
        executor_id TEXT NOT NULL DEFAULT '',
        max_time_s INTEGER NOT NULL,
        max_idle_s INTEGER NOT NULL,
        created_at REAL NOT NULL,
        activated_at REAL,
        closed_at REAL,
        last_job_at REAL
    );
    CREATE INDEX sessions_live ON sessions(state) WHERE state IN (1, 2);
    CREATE INDEX sessions_pinned ON sessions(executor_id) WHERE executor_id != '';
    """,
    # Queued counters per tenant ('t') and per backend ('b'), kept exact by
    # triggers so every path that moves a job in or out of QUEUED (present and
    # future) keeps them right: Submit's limit and queue position stay O(1)
    # in queue depth instead of two COUNT(*) scans of the whole queue.
    3: """
    CREATE TABLE queued_counts (
        scope TEXT NOT NULL,  -- 't': tenant, 'b': backend
        key TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) WITHOUT ROWID;
    INSERT INTO queued_counts (scope, key, n)
        SELECT 't', tenant, COUNT(*) FROM jobs WHERE state = 1 GROUP BY tenant;
    INSERT INTO queued_counts (scope, key, n)
        SELECT 'b', backend, COUNT(*) FROM jobs WHERE state = 1 GROUP BY backend;
    CREATE TRIGGER jobs_queued_insert AFTER INSERT ON jobs WHEN NEW.state = 1 BEGIN
        INSERT INTO queued_counts (scope, key, n) VALUES ('t', NEW.tenant, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
        INSERT INTO queued_counts (scope, key, n) VALUES ('b', NEW.backend, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_queued_leave AFTER UPDATE OF state, tenant, backend ON jobs
    WHEN OLD.state = 1 BEGIN
        UPDATE queued_counts SET n = n - 1 WHERE scope = 't' AND key = OLD.tenant;
        UPDATE queued_counts SET n = n - 1 WHERE scope = 'b' AND key = OLD.backend;
    END;
    CREATE TRIGGER jobs_queued_enter AFTER UPDATE OF state, tenant, backend ON jobs
    WHEN NEW.state = 1 BEGIN
        INSERT INTO queued_counts (scope, key, n) VALUES ('t', NEW.tenant, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
        INSERT INTO queued_counts (scope, key, n) VALUES ('b', NEW.backend, 1)
            ON CONFLICT (scope, key) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_queued_delete AFTER DELETE ON jobs WHEN OLD.state = 1 BEGIN
        UPDATE queued_counts SET n = n - 1 WHERE scope = 't' AND key = OLD.tenant;
        UPDATE queued_counts SET n = n - 1 WHERE scope = 'b' AND key = OLD.backend;
    END;
    """,
}

_PROGRAM_COLUMNS = (
    "id, tenant, name, version, entry_point, requirements, input_schema_json, description, "
    "size_bytes, created_at"
)
_SESSION_COLUMNS = (
    "id, tenant, backend, mode, state, state_reason, executor_id, max_time_s, max_idle_s, "
    "created_at, activated_at, closed_at, last_job_at"
)
_SESSION_WORDS = {
    SessionState.CLOSED: "closed",
    SessionState.CANCELLED: "cancelled",
    SessionState.EXPIRED: "expired",
}

_JOB_COLUMNS = (
    "id, tenant, backend, kind, state, attempts, created_at, started_at, finished_at, error, "
    "session_id, executor_id, lease_id, lease_expires_at, last_seq, tags, idempotency_key, "
    "num_pubs, qseq"
)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class SQLiteJobStore(JobStore):
    """The embedded default store (see module docstring)."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._writer = _GroupCommitThread(f"qrelay-sqlite-{self.path.name}")
        self._conn: sqlite3.Connection | None = None

    # --- plumbing ----------------------------------------------------------
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` atomically on the store's thread; returns once it is committed."""
        return await self._writer.submit(fn, transactional=True)

    async def open(self) -> None:
        def connect(_: sqlite3.Connection | None) -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
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
            for target in range(version + 1, SCHEMA_VERSION + 1):
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
    def _record(row: Sequence[Any], queue_position: int = 0) -> JobRecord:
        return JobRecord(
            id=row[0],
            tenant=row[1],
            backend=row[2],
            kind=JobKind(row[3]),
            state=JobState(row[4]),
            attempts=row[5],
            created_at=row[6],
            started_at=row[7],
            finished_at=row[8],
            error=row[9],
            session_id=row[10],
            executor_id=row[11],
            lease_id=row[12],
            lease_expires_at=row[13],
            last_seq=row[14],
            tags=json.loads(row[15]),
            idempotency_key=row[16] or "",
            num_pubs=row[17],
            queue_position=queue_position,
        )

    @staticmethod
    def _queued(conn: sqlite3.Connection, scope: str, key: str) -> int:
        """Queued jobs of a tenant ('t') or backend ('b'), from the trigger-kept counters."""
        row = conn.execute(
            "SELECT n FROM queued_counts WHERE scope = ? AND key = ?", (scope, key)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _load(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        tenant: str | None = None,
        *,
        position: int | None = None,
    ) -> JobRecord:
        """Load a job; its exact queue position is counted unless the caller knows it."""
        row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            raise NotFound(f"job {job_id!r} not found")
        if position is not None:
            return self._record(row, position)
        position = 0
        if row[4] == JobState.QUEUED:
            position = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 1 AND backend = ? AND qseq <= ?",
                (row[2], row[18]),
            ).fetchone()[0]
        return self._record(row, position)

    @staticmethod
    def _append(
        conn: sqlite3.Connection,
        job_id: str,
        last_seq: int,
        payloads: Sequence[tuple[bytes, bool]],
        now: float,
    ) -> list[StoredEvent]:
        """Append events after `last_seq` and move the job's last_seq along."""
        events = [
            StoredEvent(job_id, last_seq + i + 1, now, payload, terminal)
            for i, (payload, terminal) in enumerate(payloads)
        ]
        conn.executemany(
            "INSERT INTO events (job_id, seq, time, payload, terminal) VALUES (?, ?, ?, ?, ?)",
            [(e.job_id, e.seq, e.time, e.payload, int(e.terminal)) for e in events],
        )
        conn.execute("UPDATE jobs SET last_seq = ? WHERE id = ?", (events[-1].seq, job_id))
        return events

    # --- jobs --------------------------------------------------------------
    async def submit(self, job: NewJob, *, max_queued_per_tenant: int) -> tuple[JobRecord, bool]:
        def tx(conn: sqlite3.Connection) -> tuple[JobRecord, bool]:
            if job.idempotency_key:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                    (job.tenant, job.idempotency_key),
                ).fetchone()
                if row is not None:
                    return self._load(conn, row[0]), False
            if job.session_id:
                self._check_session_accepts(conn, job)
            queued = self._queued(conn, "t", job.tenant)
            if queued >= max_queued_per_tenant:
                raise ResourceExhausted(
                    f"tenant {job.tenant!r} already has {queued} queued jobs; this broker "
                    f"queues at most {max_queued_per_tenant} per tenant "
                    "(QRELAY_MAX_QUEUED_PER_TENANT); wait for some to finish"
                )
            now = time.time()
            job_id = job.id or _new_id("j")
            conn.execute(
                "INSERT INTO jobs (id, tenant, backend, kind, state, created_at, session_id, "
                "tags, idempotency_key, num_pubs, spec, program_id) "
                "VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    job.tenant,
                    job.backend,
                    int(job.kind),
                    now,
                    job.session_id,
                    json.dumps(job.tags, sort_keys=True),
                    job.idempotency_key or None,
                    job.num_pubs,
                    job.spec,
                    job.program_id,
                ),
            )
            if job.session_id:
                conn.execute(
                    "UPDATE sessions SET last_job_at = ? WHERE id = ?", (now, job.session_id)
                )
            self._append(
                conn, job_id, 0, [(state_payload(JobState.QUEUED, "submitted", 0), False)], now
            )
            # A fresh job is last in its backend's FIFO: its position is the count.
            return self._load(conn, job_id, position=self._queued(conn, "b", job.backend)), True

        return await self._run(tx)

    @staticmethod
    def _check_session_accepts(conn: sqlite3.Connection, job: NewJob) -> None:
        row = conn.execute(
            "SELECT tenant, backend, state FROM sessions WHERE id = ?", (job.session_id,)
        ).fetchone()
        if row is None or row[0] != job.tenant:
            raise NotFound(f"session {job.session_id!r} not found")
        if row[1] != job.backend:
            raise InvalidArgument(
                f"job backend {job.backend!r} differs from the backend {row[1]!r} of session "
                f"{job.session_id}"
            )
        state = SessionState(row[2])
        if not state.accepting:
            raise FailedPrecondition(
                f"session {job.session_id} is {_SESSION_WORDS[state]}; it accepts no new jobs "
                "(create a new session)"
            )

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
        page_size: int = 50,
        page_token: str = "",
    ) -> JobPage:
        where = ["tenant = ?"]
        params: list[Any] = [tenant]
        if page_token:
            try:
                cursor = int(page_token)
            except ValueError:
                raise InvalidArgument(
                    f"page_token {page_token!r} is not one this broker issued"
                ) from None
            where.append("qseq < ?")
            params.append(cursor)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(int(s) for s in states)
        if backend:
            where.append("backend = ?")
            params.append(backend)
        if session_id:
            where.append("session_id = ?")
            params.append(session_id)

        def tx(conn: sqlite3.Connection) -> JobPage:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                "ORDER BY qseq DESC LIMIT ?",
                (*params, page_size + 1),
            ).fetchall()
            more = len(rows) > page_size
            rows = rows[:page_size]
            positions: dict[str, int] = {}
            queued_backends = sorted({row[2] for row in rows if row[4] == JobState.QUEUED})
            if queued_backends:
                # One pass over those backends' queues, not one count per job.
                positions = dict(
                    conn.execute(
                        "SELECT id, ROW_NUMBER() OVER (PARTITION BY backend ORDER BY qseq) "
                        f"FROM jobs WHERE state = 1 AND backend IN "
                        f"({','.join('?' * len(queued_backends))})",
                        queued_backends,
                    ).fetchall()
                )
            jobs = [self._record(row, positions.get(row[0], 0)) for row in rows]
            return JobPage(jobs, str(rows[-1][18]) if more else "")

        return await self._run(tx)

    async def events_after(self, job_id: str, after_seq: int) -> list[StoredEvent]:
        def tx(conn: sqlite3.Connection) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, time, payload, terminal FROM events WHERE job_id = ? AND seq > ? "
                "ORDER BY seq",
                (job_id, after_seq),
            ).fetchall()
            return [StoredEvent(job_id, r[0], r[1], bytes(r[2]), bool(r[3])) for r in rows]

        return await self._run(tx)

    # --- scheduling and leases ----------------------------------------------
    async def claim(
        self,
        backends: Sequence[str],
        executor_id: str,
        lease_ttl_s: float,
        limit: int,
        kinds: Sequence[JobKind] | None = None,
    ) -> list[LeaseGrant]:
        if not backends or limit <= 0 or (kinds is not None and not kinds):
            return []
        kind_filter = ""
        params: list[Any] = list(backends)
        if kinds is not None:
            kind_filter = f" AND j.kind IN ({','.join('?' * len(kinds))})"
            params.extend(int(k) for k in kinds)
        where = f"j.state = 1 AND j.backend IN ({','.join('?' * len(backends))}){kind_filter}"
        columns = "j.id, j.attempts, j.last_seq, j.spec, j.session_id"

        def tx(conn: sqlite3.Connection) -> list[LeaseGrant]:
            # First the jobs of active dedicated sessions pinned here (they jump
            # the queue), then everyone's by age, minus jobs pinned elsewhere.
            rows = conn.execute(
                # CROSS JOIN fixes the order (pinned sessions, then their jobs);
                # the != '' terms let SQLite use the partial indexes.
                f"SELECT {columns} FROM sessions s CROSS JOIN jobs j ON j.session_id = s.id "
                "WHERE s.executor_id = ? AND s.executor_id != '' AND s.mode = 1 AND s.state = 2 "
                f"AND j.session_id != '' AND {where} "
                "ORDER BY j.qseq LIMIT ?",
                (executor_id, *params, limit),
            ).fetchall()
            if len(rows) < limit:
                rows += conn.execute(
                    f"SELECT {columns} FROM jobs j LEFT JOIN sessions s ON s.id = j.session_id "
                    f"WHERE {where} AND (s.id IS NULL OR s.mode != 1 OR s.executor_id = '' "
                    "OR (s.executor_id = ? AND s.state != 2)) ORDER BY j.qseq LIMIT ?",
                    (*params, executor_id, limit - len(rows)),
                ).fetchall()
            now = time.time()
            grants = []
            for job_id, attempts, last_seq, spec, session_id in rows:
                if session_id:
                    conn.execute(
                        "UPDATE sessions SET activated_at = COALESCE(activated_at, ?), "
                        "state = CASE state WHEN 1 THEN 2 ELSE state END, "
                        "executor_id = CASE WHEN mode = 1 AND executor_id = '' THEN ? "
                        "ELSE executor_id END WHERE id = ?",
                        (now, executor_id, session_id),
                    )
                lease_id = _new_id("l")
                conn.execute(
                    "UPDATE jobs SET state = 2, attempts = ?, started_at = ?, executor_id = ?, "
                    "lease_id = ?, lease_expires_at = ? WHERE id = ?",
                    (attempts + 1, now, executor_id, lease_id, now + lease_ttl_s, job_id),
                )
                events = self._append(
                    conn,
                    job_id,
                    last_seq,
                    [
                        (
                            state_payload(
                                JobState.RUNNING,
                                f"running on executor {executor_id}",
                                attempts + 1,
                                executor_id,
                            ),
                            False,
                        )
                    ],
                    now,
                )
                grants.append(LeaseGrant(self._load(conn, job_id), bytes(spec), events))
            return grants

        return await self._run(tx)

    async def extend_leases(self, lease_ids: Sequence[str], lease_ttl_s: float) -> set[str]:
        if not lease_ids:
            return set()

        def tx(conn: sqlite3.Connection) -> set[str]:
            expires = time.time() + lease_ttl_s
            extended = set()
            for lease_id in lease_ids:
                cur = conn.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE lease_id = ? AND state = 2",
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
                    "WHERE id = ? AND lease_id = ? AND state = 2",
                    (expires, executor_id, job_id, lease_id),
                )
                (valid if cur.rowcount else invalid).append((job_id, lease_id))
            return HeldCheck(valid, invalid)

        return await self._run(tx)

    async def apply_update(
        self, job_id: str, lease_id: str, kind: UpdateKind, payload: bytes
    ) -> UpdateOutcome:
        def tx(conn: sqlite3.Connection) -> UpdateOutcome:
            row = conn.execute(
                "SELECT state, lease_id, last_seq, attempts, executor_id FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                return UpdateOutcome(False, f"unknown job {job_id!r}", None, [])
            state, current_lease, last_seq, attempts, executor_id = row
            state = JobState(state)
            if kind is UpdateKind.RELEASED and state is JobState.CANCELLED:
                return UpdateOutcome(True, "already cancelled", self._load(conn, job_id), [])
            if not lease_id or lease_id != current_lease or state is not JobState.RUNNING:
                why = (
                    f"job is {state.name}"
                    if state is not JobState.RUNNING
                    else "it was re-leased after this lease expired"
                )
                return UpdateOutcome(
                    False,
                    f"lease {lease_id!r} is not the current lease of job {job_id}; {why}",
                    self._load(conn, job_id),
                    [],
                )
            now = time.time()
            if kind in (UpdateKind.INTERIM, UpdateKind.LOG):
                events = self._append(
                    conn, job_id, last_seq, [(update_payload(kind, payload), False)], now
                )
            elif kind is UpdateKind.RESULT:
                conn.execute(
                    "UPDATE jobs SET state = 3, result = ?, finished_at = ?, lease_id = '', "
                    "lease_expires_at = NULL WHERE id = ?",
                    (payload, now, job_id),
                )
                events = self._append(
                    conn,
                    job_id,
                    last_seq,
                    [
                        (update_payload(kind, payload), False),
                        (state_payload(JobState.DONE, "done", attempts, executor_id), True),
                    ],
                    now,
                )
            elif kind is UpdateKind.ERROR:
                conn.execute(
                    "UPDATE jobs SET state = 4, error = ?, finished_at = ?, lease_id = '', "
                    "lease_expires_at = NULL WHERE id = ?",
                    (payload, now, job_id),
                )
                events = self._append(
                    conn,
                    job_id,
                    last_seq,
                    [
                        (update_payload(kind, payload), False),
                        (state_payload(JobState.FAILED, "failed", attempts, executor_id), True),
                    ],
                    now,
                )
            else:  # RELEASED under a valid lease: the executor gave the job back unrun
                conn.execute(
                    "UPDATE jobs SET state = 1, attempts = ?, lease_id = '', "
                    "lease_expires_at = NULL WHERE id = ?",
                    (max(attempts - 1, 0), job_id),
                )
                events = self._append(
                    conn,
                    job_id,
                    last_seq,
                    [
                        (
                            state_payload(
                                JobState.QUEUED,
                                f"released by executor {executor_id}; requeued",
                                max(attempts - 1, 0),
                            ),
                            False,
                        )
                    ],
                    now,
                )
            return UpdateOutcome(True, "accepted", self._load(conn, job_id), events)

        return await self._run(tx)

    async def expire_leases(self, now: float, max_attempts: int) -> list[ExpiredLease]:
        def tx(conn: sqlite3.Connection) -> list[ExpiredLease]:
            rows = conn.execute(
                "SELECT id, lease_id, executor_id, attempts, last_seq FROM jobs "
                "WHERE state = 2 AND lease_expires_at < ? ORDER BY lease_expires_at",
                (now,),
            ).fetchall()
            expired = []
            for job_id, lease_id, executor_id, attempts, last_seq in rows:
                if attempts >= max_attempts:
                    message = (
                        f"lease expired on executor {executor_id} on attempt {attempts} of "
                        f"{max_attempts}; giving up: executors kept vanishing while running this "
                        "job (QRELAY_MAX_ATTEMPTS)"
                    )
                    error = job_error(UNAVAILABLE, message)
                    conn.execute(
                        "UPDATE jobs SET state = 4, error = ?, finished_at = ?, lease_id = '', "
                        "lease_expires_at = NULL WHERE id = ?",
                        (error, now, job_id),
                    )
                    payloads = [
                        (update_payload(UpdateKind.ERROR, error), False),
                        (state_payload(JobState.FAILED, message, attempts, executor_id), True),
                    ]
                else:
                    message = (
                        f"lease expired on executor {executor_id}; requeued "
                        f"(attempt {attempts} of {max_attempts})"
                    )
                    conn.execute(
                        "UPDATE jobs SET state = 1, lease_id = '', lease_expires_at = NULL "
                        "WHERE id = ?",
                        (job_id,),
                    )
                    payloads = [(state_payload(JobState.QUEUED, message, attempts), False)]
                events = self._append(conn, job_id, last_seq, payloads, now)
                expired.append(
                    ExpiredLease(self._load(conn, job_id), lease_id, executor_id, events)
                )
            return expired

        return await self._run(tx)

    async def next_lease_expiry(self) -> float | None:
        def tx(conn: sqlite3.Connection) -> float | None:
            row = conn.execute("SELECT MIN(lease_expires_at) FROM jobs WHERE state = 2").fetchone()
            return None if row is None else row[0]

        return await self._run(tx)

    async def renew_running_leases(self, lease_ttl_s: float) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            floor = time.time() + lease_ttl_s
            cur = conn.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE state = 2 AND lease_expires_at < ?",
                (floor, floor),
            )
            return int(cur.rowcount)

        return await self._run(tx)

    async def cancel(self, job_id: str, tenant: str | None, reason: str) -> CancelOutcome:
        def tx(conn: sqlite3.Connection) -> CancelOutcome:
            job = self._load(conn, job_id, tenant)
            if job.state.terminal:
                return CancelOutcome(job, job.state, "", "", [])
            now = time.time()
            conn.execute(
                "UPDATE jobs SET state = 5, finished_at = ?, lease_id = '', "
                "lease_expires_at = NULL WHERE id = ?",
                (now, job_id),
            )
            message = f"cancelled: {reason}" if reason else "cancelled"
            events = self._append(
                conn,
                job_id,
                job.last_seq,
                [(state_payload(JobState.CANCELLED, message, job.attempts, job.executor_id), True)],
                now,
            )
            lease = job.lease_id if job.state is JobState.RUNNING else ""
            executor = job.executor_id if job.state is JobState.RUNNING else ""
            return CancelOutcome(self._load(conn, job_id), job.state, lease, executor, events)

        return await self._run(tx)

    # --- programs -----------------------------------------------------------
    @staticmethod
    def _program(row: Sequence[Any]) -> ProgramRecord:
        return ProgramRecord(
            id=row[0],
            tenant=row[1],
            name=row[2],
            version=row[3],
            entry_point=row[4],
            requirements=tuple(json.loads(row[5])),
            input_schema_json=row[6],
            description=row[7],
            size_bytes=row[8],
            created_at=row[9],
        )

    def _find_program(
        self, conn: sqlite3.Connection, tenant: str, program: str, include_deleted: bool
    ) -> ProgramRecord:
        hidden = "" if include_deleted else " AND deleted = 0"
        row = conn.execute(
            f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE tenant = ? AND id = ?{hidden}",
            (tenant, program),
        ).fetchone()
        if row is None:
            row = conn.execute(
                f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE tenant = ? AND name = ?{hidden} "
                "ORDER BY version DESC LIMIT 1",
                (tenant, program),
            ).fetchone()
        if row is None:
            raise NotFound(f"program {program!r} not found (no such id or name)")
        return self._program(row)

    async def put_program(self, program: NewProgram) -> tuple[ProgramRecord, bool]:
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
            version = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM programs WHERE tenant = ? AND name = ?",
                (program.tenant, program.name),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO programs (tenant, id, name, version, entry_point, requirements, "
                "input_schema_json, description, size_bytes, created_at, archive) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE tenant = ? AND name = ? "
                    "AND deleted = 0 ORDER BY version DESC",
                    (tenant, name),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_PROGRAM_COLUMNS} FROM programs p WHERE tenant = ? AND deleted = 0 "
                    "AND version = (SELECT MAX(version) FROM programs q WHERE q.tenant = p.tenant "
                    "AND q.name = p.name AND q.deleted = 0) ORDER BY name",
                    (tenant,),
                ).fetchall()
            return [self._program(r) for r in rows]

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
                "AND state IN (1, 2))",
                (tenant, tenant),
            )
            return len(ids)

        return await self._run(tx)

    # --- sessions -------------------------------------------------------------
    @staticmethod
    def _session(conn: sqlite3.Connection, row: Sequence[Any]) -> SessionRecord:
        counts = {s: 0 for s in JobState}
        for state, n in conn.execute(
            "SELECT state, COUNT(*) FROM jobs WHERE session_id = ? AND session_id != '' "
            "GROUP BY state",
            (row[0],),
        ).fetchall():
            counts[JobState(state)] = n
        last_finished = conn.execute(
            "SELECT MAX(finished_at) FROM jobs WHERE session_id = ? AND session_id != ''",
            (row[0],),
        ).fetchone()[0]
        return SessionRecord(
            id=row[0],
            tenant=row[1],
            backend=row[2],
            mode=SessionMode(row[3]),
            state=SessionState(row[4]),
            state_reason=row[5],
            executor_id=row[6],
            max_time_s=row[7],
            max_idle_s=row[8],
            created_at=row[9],
            activated_at=row[10],
            closed_at=row[11],
            last_job_at=row[12],
            last_finished_at=last_finished,
            counts=counts,
        )

    def _load_session(
        self, conn: sqlite3.Connection, session_id: str, tenant: str | None
    ) -> SessionRecord:
        row = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            raise NotFound(f"session {session_id!r} not found")
        return self._session(conn, row)

    async def create_session(self, session: NewSession) -> SessionRecord:
        def tx(conn: sqlite3.Connection) -> SessionRecord:
            session_id = _new_id("s")
            conn.execute(
                "INSERT INTO sessions (id, tenant, backend, mode, state, max_time_s, max_idle_s, "
                "created_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?)",
                (
                    session_id,
                    session.tenant,
                    session.backend,
                    int(session.mode),
                    session.max_time_s,
                    session.max_idle_s,
                    time.time(),
                ),
            )
            return self._load_session(conn, session_id, None)

        return await self._run(tx)

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord:
        return await self._run(lambda conn: self._load_session(conn, session_id, tenant))

    async def end_session(
        self, session_id: str, tenant: str | None, state: SessionState, reason: str
    ) -> tuple[SessionRecord, bool]:
        if state not in _SESSION_WORDS:
            raise ValueError(f"cannot end a session as {state.name}")

        def tx(conn: sqlite3.Connection) -> tuple[SessionRecord, bool]:
            current = self._load_session(conn, session_id, tenant)
            allowed = current.state.accepting or (
                state is SessionState.CANCELLED and current.state is SessionState.CLOSED
            )
            if not allowed:
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
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE state IN (1, 2) UNION ALL "
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id IN (SELECT session_id "
                "FROM jobs INDEXED BY jobs_session_live WHERE session_id != '' "
                "AND state IN (1, 2)) AND state = 3 AND executor_id != '' ORDER BY created_at"
            ).fetchall()
            return [self._session(conn, r) for r in rows]

        return await self._run(tx)

    async def unpin_sessions(self, executor_id: str) -> list[SessionRecord]:
        def tx(conn: sqlite3.Connection) -> list[SessionRecord]:
            rows = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE executor_id = ? AND mode = 1",
                (executor_id,),
            ).fetchall()
            changed = [self._session(conn, r) for r in rows]
            conn.execute(
                "UPDATE sessions SET executor_id = '' WHERE executor_id = ? AND mode = 1",
                (executor_id,),
            )
            return changed

        return await self._run(tx)

    # --- backends and statistics ------------------------------------------
    async def upsert_backends(self, backends: Sequence[BackendRecord]) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO backends (name, info, last_seen) VALUES (?, ?, ?) ON CONFLICT(name) "
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
            rows = conn.execute(
                "SELECT name, info, last_seen FROM backends ORDER BY name"
            ).fetchall()
            return [BackendRecord(r[0], bytes(r[1]), r[2]) for r in rows]

        return await self._run(tx)

    async def get_backend(self, name: str) -> BackendRecord | None:
        def tx(conn: sqlite3.Connection) -> BackendRecord | None:
            r = conn.execute(
                "SELECT name, info, last_seen FROM backends WHERE name = ?", (name,)
            ).fetchone()
            return None if r is None else BackendRecord(r[0], bytes(r[1]), r[2])

        return await self._run(tx)

    async def queue_lengths(self) -> dict[str, int]:
        def tx(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT key, n FROM queued_counts WHERE scope = 'b' AND n > 0"
            ).fetchall()
            return {r[0]: r[1] for r in rows}

        return await self._run(tx)

    async def count_by_state(self) -> dict[JobState, int]:
        def tx(conn: sqlite3.Connection) -> dict[JobState, int]:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            counts = {s: 0 for s in JobState}
            for state, n in rows:
                counts[JobState(state)] = n
            return counts

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
        op = _Op(fn, transactional, loop, loop.create_future())
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
