"""The tables both stores keep: one migration description, the column lists,
state literals for SQL, and rows mapped to records by column name.

A row here is anything addressed by column name: `sqlite3.Row` and
`asyncpg.Record` alike. What stays per dialect is what must: column types,
the queued counters (SQLite triggers; striped PostgreSQL counters) and the
tables only replicas need.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from qrelay.broker.store.base import (
    BackendRecord,
    JobKind,
    JobRecord,
    JobState,
    ProgramRecord,
    Role,
    SessionMode,
    SessionRecord,
    SessionState,
    StoredEvent,
    TenantRecord,
    TokenRecord,
    UserRecord,
)
from qrelay.errors import InvalidArgument

# --- literals for SQL text (numbers from the proto enums via base) ------------
QUEUED = int(JobState.QUEUED)
RUNNING = int(JobState.RUNNING)
#: `state IN {UNFINISHED}`: QUEUED or RUNNING.
UNFINISHED = f"({QUEUED}, {RUNNING})"
DEDICATED = int(SessionMode.DEDICATED)
SESSION_OPEN = int(SessionState.OPEN)
SESSION_ACTIVE = int(SessionState.ACTIVE)
SESSION_CLOSED = int(SessionState.CLOSED)
#: `state IN {SESSION_LIVE}`: OPEN or ACTIVE.
SESSION_LIVE = f"({SESSION_OPEN}, {SESSION_ACTIVE})"

# --- column lists -------------------------------------------------------------
JOB_COLUMNS = (
    "id, tenant, backend, kind, state, attempts, created_at, started_at, finished_at, error, "
    "session_id, executor_id, lease_id, lease_expires_at, last_seq, tags, idempotency_key, "
    "num_pubs, qseq, vt, priority, usage_s"
)
PROGRAM_COLUMNS = (
    "id, tenant, name, version, entry_point, requirements, input_schema_json, description, "
    "size_bytes, created_at"
)
SESSION_COLUMNS = (
    "id, tenant, backend, mode, state, state_reason, executor_id, max_time_s, max_idle_s, "
    "created_at, activated_at, closed_at, last_job_at"
)
EVENT_COLUMNS = "job_id, seq, time, payload, terminal"
BACKEND_COLUMNS = "name, info, last_seen"
#: Columns of a new job's INSERT, in `job_values` order.
NEW_JOB_COLUMNS = (
    "id, tenant, backend, kind, state, created_at, session_id, tags, idempotency_key, "
    "num_pubs, spec, program_id, last_seq, vt, priority"
)
#: The order queued jobs are claimed in: fair-share start tag, then age.
CLAIM_ORDER = "j.vt, j.qseq"
#: A tenant's best queued job to run in its turn (`JobStore.claim`): highest
#: priority, then the oldest (index jobs_tenant_order). Start tags only say
#: when the tenant's turns come; which of its jobs fills a turn goes by this.
PRIORITY_ORDER = "j.priority DESC, j.qseq"
#: The two looks for a job before one of priority {p} and qseq {q} in
#: PRIORITY_ORDER, tried in turn: a higher priority, then an older job of the
#: same priority. Each is one seek in jobs_tenant_order ({p}, {q}: the
#: dialect's placeholders).
BETTER_THAN = ("j.priority > {p}", "j.priority = {p} AND j.qseq < {q}")
#: How many of tenant {t}'s queued jobs on backend {b} run before its job of
#: priority {p} and qseq {q} (PRIORITY_ORDER): two ranges of jobs_tenant_order.
OWN_AHEAD = (
    f"SELECT (SELECT COUNT(*) FROM jobs WHERE state = {QUEUED} AND tenant = {{t}} "
    "AND backend = {b} AND priority > {p}) + "
    f"(SELECT COUNT(*) FROM jobs WHERE state = {QUEUED} AND tenant = {{t}} "
    "AND backend = {b} AND priority = {p} AND qseq < {q})"
)
#: How many of them have a lower priority than {p}: behind a fresh job of {p}
#: (a range that is empty while the tenant uses no lower priorities).
OWN_BELOW = (
    f"SELECT COUNT(*) FROM jobs WHERE state = {QUEUED} AND tenant = {{t}} "
    "AND backend = {b} AND priority < {p}"
)
#: The start tag of the earliest queued job of another session or none on the
#: job `j`'s backend; a dedicated session's jump is bounded by it.
OTHERS_FIRST_TAG = (
    f"COALESCE((SELECT MIN(q.vt) FROM jobs q WHERE q.state = {QUEUED} "
    "AND q.backend = j.backend AND q.session_id != j.session_id), 1e300)"
)


_MAX_QSEQ = 2**63 - 1
#: queued_counts scope of a tenant's queued jobs on one backend (schema v6),
#: keyed `tenant_backend_key(tenant, backend)`: Submit's position stays O(1).
TENANT_BACKEND = "tb"
#: The separator of a `tenant_backend_key` (ASCII unit separator, char 31).
KEY_SEP = "\x1f"


def tenant_backend_key(tenant: str, backend: str) -> str:
    return f"{tenant}{KEY_SEP}{backend}"


def page_cursor(page_token: str) -> int:
    """The qseq a ListJobs page token stands for (the page holds older jobs).

    Only what the broker issues: a positive decimal qseq within int64 (a
    bigger number is refused here, not by the database with an INTERNAL)."""
    digits = page_token.isascii() and page_token.isdigit() and not page_token.startswith("0")
    if not digits or len(page_token) > 19 or int(page_token) > _MAX_QSEQ:
        shown = page_token if len(page_token) <= 40 else page_token[:40] + "…"
        raise InvalidArgument(f"page_token {shown!r} is not one this broker issued")
    return int(page_token)


def session_page_token(session: SessionRecord) -> str:
    """The token of the page after `session` (sessions are listed newest first)."""
    return f"{session.created_at!r}/{session.id}"


def session_page_cursor(page_token: str) -> tuple[float, str]:
    """The (created_at, id) a ListSessions page token stands for (the page holds older ones)."""
    created, sep, session_id = page_token.partition("/")
    try:
        when = float(created)
    except ValueError:
        when = math.nan
    if not sep or not session_id or not math.isfinite(when):
        shown = page_token if len(page_token) <= 64 else page_token[:64] + "..."
        raise InvalidArgument(f"page_token {shown!r} is not one this broker issued")
    return when, session_id


#: `(created_at, id) < (cursor)` in SQL for a ListSessions page, with three placeholders
#: (created_at, created_at, id) the dialect fills in.
SESSION_BEFORE = "(created_at < {0} OR (created_at = {1} AND id < {2}))"
#: A job's program filter: its id, or the ids of every stored version of a name (placeholders:
#: program, tenant, program).
JOB_PROGRAM = (
    "(j.program_id = {0} OR j.program_id IN "
    "(SELECT id FROM programs WHERE tenant = {1} AND name = {2}))"
)


def qualified(columns: str, alias: str) -> str:
    """`a, b` as `t.a, t.b`."""
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


# --- rows to records, by name ---------------------------------------------------
class Row(Protocol):
    """A result row addressed by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, column: str, /) -> Any: ...


def job_record(row: Row, queue_position: int = 0) -> JobRecord:
    return JobRecord(
        id=row["id"],
        tenant=row["tenant"],
        backend=row["backend"],
        kind=JobKind(row["kind"]),
        state=JobState(row["state"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        session_id=row["session_id"],
        executor_id=row["executor_id"],
        lease_id=row["lease_id"],
        lease_expires_at=row["lease_expires_at"],
        last_seq=row["last_seq"],
        tags=json.loads(row["tags"]),
        idempotency_key=row["idempotency_key"] or "",
        num_pubs=row["num_pubs"],
        queue_position=queue_position,
        priority=row["priority"],
        usage_s=row["usage_s"],
    )


def program_record(row: Row) -> ProgramRecord:
    requirements = row["requirements"]
    if isinstance(requirements, str):  # SQLite keeps the list as JSON text
        requirements = json.loads(requirements)
    return ProgramRecord(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        version=row["version"],
        entry_point=row["entry_point"],
        requirements=tuple(requirements),
        input_schema_json=row["input_schema_json"],
        description=row["description"],
        size_bytes=row["size_bytes"],
        created_at=row["created_at"],
    )


def session_record(
    row: Row, counts: dict[JobState, int], last_finished_at: float | None
) -> SessionRecord:
    return SessionRecord(
        id=row["id"],
        tenant=row["tenant"],
        backend=row["backend"],
        mode=SessionMode(row["mode"]),
        state=SessionState(row["state"]),
        state_reason=row["state_reason"],
        executor_id=row["executor_id"],
        max_time_s=row["max_time_s"],
        max_idle_s=row["max_idle_s"],
        created_at=row["created_at"],
        activated_at=row["activated_at"],
        closed_at=row["closed_at"],
        last_job_at=row["last_job_at"],
        last_finished_at=last_finished_at,
        counts=counts,
    )


def event_record(job_id: str, row: Row) -> StoredEvent:
    return StoredEvent(
        job_id, row["seq"], row["time"], bytes(row["payload"]), bool(row["terminal"])
    )


def event_values(event: StoredEvent) -> tuple[str, int, float, bytes, bool]:
    """An event as the values of `EVENT_COLUMNS`."""
    return (event.job_id, event.seq, event.time, event.payload, event.terminal)


def backend_record(row: Row) -> BackendRecord:
    return BackendRecord(row["name"], bytes(row["info"]), row["last_seen"])


def zero_counts() -> dict[JobState, int]:
    """A count for every JobState, all zero."""
    return {s: 0 for s in JobState}


# --- one migration description --------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """The column types and dialect-only steps that render `MIGRATIONS`."""

    serial_key: str  # jobs.qseq: FIFO order, also the page cursor
    real: str
    big: str
    blob: str
    flag: str  # a boolean column, NOT NULL, false by default
    strings: str  # a list of strings
    extra: Mapping[int, str]  # per version, run after the shared step


#: Schema migrations by target version, rendered by `migrations(dialect)`.
MIGRATIONS: dict[int, str] = {
    1: f"""
    CREATE TABLE jobs (
        qseq {{serial_key}},
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        backend TEXT NOT NULL,
        kind INTEGER NOT NULL,
        state INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at {{real}} NOT NULL,
        started_at {{real}},
        finished_at {{real}},
        error {{blob}},
        session_id TEXT NOT NULL DEFAULT '',
        executor_id TEXT NOT NULL DEFAULT '',
        lease_id TEXT NOT NULL DEFAULT '',
        lease_expires_at {{real}},
        last_seq {{big}} NOT NULL DEFAULT 0,
        tags TEXT NOT NULL DEFAULT '{{{{}}}}',
        idempotency_key TEXT,
        num_pubs INTEGER NOT NULL DEFAULT 0,
        spec {{blob}} NOT NULL,
        result {{blob}}
    );
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key);
    CREATE INDEX jobs_queued ON jobs (backend, qseq) WHERE state = {QUEUED};
    CREATE INDEX jobs_tenant_queued ON jobs (tenant) WHERE state = {QUEUED};
    CREATE INDEX jobs_lease ON jobs (lease_id) WHERE lease_id != '';
    CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE state = {RUNNING};
    CREATE INDEX jobs_tenant ON jobs (tenant, qseq);
    CREATE TABLE events (
        job_id TEXT NOT NULL,
        seq {{big}} NOT NULL,
        time {{real}} NOT NULL,
        payload {{blob}} NOT NULL,
        terminal {{flag}},
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE backends (
        name TEXT PRIMARY KEY,
        info {{blob}} NOT NULL,
        last_seen {{real}} NOT NULL
    );
    """,
    2: f"""
    ALTER TABLE jobs ADD COLUMN program_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_session ON jobs (session_id, state) WHERE session_id != '';
    CREATE INDEX jobs_program ON jobs (tenant, program_id) WHERE program_id != '';
    CREATE TABLE programs (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        entry_point TEXT NOT NULL,
        requirements {{strings}} NOT NULL,
        input_schema_json TEXT NOT NULL,
        description TEXT NOT NULL,
        size_bytes {{big}} NOT NULL,
        created_at {{real}} NOT NULL,
        deleted {{flag}},  -- hidden, kept for unfinished jobs
        archive {{blob}} NOT NULL,
        PRIMARY KEY (tenant, id)
    );
    CREATE UNIQUE INDEX programs_name ON programs (tenant, name, version);
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
        created_at {{real}} NOT NULL,
        activated_at {{real}},
        closed_at {{real}},
        last_job_at {{real}}
    );
    CREATE INDEX sessions_live ON sessions (state) WHERE state IN {SESSION_LIVE};
    CREATE INDEX sessions_pinned ON sessions (executor_id) WHERE executor_id != '';
    """,
    # Queued counters per tenant ('t') and per backend ('b'), kept exact in the
    # database so every path that moves a job in or out of QUEUED (present and
    # future) keeps them right: Submit's limit and queue position stay O(1) in
    # queue depth instead of two COUNT(*) scans. How they are kept is the
    # dialect's (see each store's `extra[3]`).
    3: "",
    # Fair share between tenants (`lifecycle.fair_start`): each job's start tag,
    # where each tenant's last job finished per backend, and each backend's
    # virtual clock (the tag of the last job claimed there).
    4: f"""
    ALTER TABLE jobs ADD COLUMN vt {{real}} NOT NULL DEFAULT 0;
    CREATE INDEX jobs_fair ON jobs (backend, vt, qseq) WHERE state = {QUEUED};
    CREATE TABLE fair_share (
        tenant TEXT NOT NULL,
        backend TEXT NOT NULL,
        finish {{real}} NOT NULL,
        PRIMARY KEY (tenant, backend)
    );
    CREATE TABLE fair_clock (
        backend TEXT PRIMARY KEY,
        clock {{real}} NOT NULL
    );
    """,
    # Identity (`qrelay.broker.identity`): tenants, API tokens stored as
    # HMAC-SHA256 digests under a short lookup prefix, and which tenants the
    # executors serving each backend accept (NULL: any).
    5: """
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        created_at {real} NOT NULL
    );
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        prefix TEXT NOT NULL UNIQUE,
        digest {blob} NOT NULL,
        role TEXT NOT NULL,
        tenant TEXT NOT NULL DEFAULT '',
        executor_tenants {strings},
        label TEXT NOT NULL DEFAULT '',
        created_at {real} NOT NULL,
        expires_at {real},
        revoked_at {real}
    );
    CREATE INDEX api_tokens_tenant ON api_tokens (tenant);
    CREATE TABLE backend_access (
        backend TEXT NOT NULL,
        executor_id TEXT NOT NULL,
        tenants {strings},
        PRIMARY KEY (backend, executor_id)
    );
    """,
    # Quotas, usage and priorities (`qrelay.broker.quotas`): queued counters per
    # tenant and backend (scope 'tb', kept by each dialect's `extra[6]`); each job's priority
    # within its tenant and its executor-seconds; executor-seconds per tenant
    # per UTC day (a period's use is the sum of its days); each tenant's weight
    # beside its fair share (queue-position estimates); an index of each
    # tenant's queue in the order its turns take it (priority, then age), so
    # its position and its best job are cheap however deep the other tenants'
    # queues are (it replaces jobs_tenant_queued: no more writes per change).
    6: f"""
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN usage_s {{real}} NOT NULL DEFAULT 0;
    ALTER TABLE fair_share ADD COLUMN weight {{real}} NOT NULL DEFAULT 1;
    DROP INDEX jobs_tenant_queued;  -- the counters and jobs_tenant_order serve its uses
    CREATE INDEX jobs_tenant_order ON jobs (tenant, backend, priority DESC, qseq, session_id)
        WHERE state = {QUEUED};
    CREATE INDEX sessions_tenant ON sessions (tenant, state);
    CREATE TABLE tenant_usage (
        tenant TEXT NOT NULL,
        day TEXT NOT NULL,  -- UTC date, YYYY-MM-DD
        seconds {{real}} NOT NULL,
        PRIMARY KEY (tenant, day)
    );
    """,
    # Tag filtering and deleted jobs:
    # `job_tags` has one row per tag key of each job, so ListJobs(tags=...)
    # walks the (tenant, key, qseq) index newest first and stops after a page,
    # instead of parsing every job's tags; its rows are filled by each
    # dialect's extra step for jobs that exist already. `deleted_jobs` keeps
    # the idempotency key of a deleted job, so a late retry of its Submit is
    # refused instead of quietly creating a second job under the same key.
    7: """
    CREATE TABLE job_tags (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        qseq {big} NOT NULL,
        PRIMARY KEY (tenant, key, qseq)
    );
    CREATE INDEX job_tags_job ON job_tags (qseq);
    CREATE TABLE deleted_jobs (
        tenant TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        job_id TEXT NOT NULL,
        deleted_at {real} NOT NULL,
        PRIMARY KEY (tenant, idempotency_key)
    );
    """,
    # Users (`qrelay.broker.identity`): a name unique within its tenant, the
    # role ceiling of its tokens, and when it was disabled (its tokens are
    # refused from then on). A token may belong to one user of its tenant;
    # executor and bootstrap admin tokens have none (NULL). The column is
    # `user_name`, not `user`: `user` is reserved in PostgreSQL, where an
    # unquoted `SELECT user` quietly answers the session's role name.
    8: """
    CREATE TABLE users (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        created_at {real} NOT NULL,
        disabled_at {real},
        PRIMARY KEY (tenant, name)
    );
    ALTER TABLE api_tokens ADD COLUMN user_name TEXT;
    CREATE INDEX api_tokens_user ON api_tokens (tenant, user_name) WHERE user_name IS NOT NULL;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)


def pending_migrations(current: int) -> list[int]:
    """The versions a store at version `current` still has to apply, in order
    (numbers may have gaps: each change owns its number)."""
    return sorted(v for v in MIGRATIONS if v > current)


TENANT_COLUMNS = "name, description, created_at"
TOKEN_COLUMNS = (
    "id, prefix, role, tenant, executor_tenants, label, created_at, expires_at, revoked_at, "
    "digest, user_name"
)
USER_COLUMNS = "tenant, name, role, created_at, disabled_at"
#: A token by its lookup prefix ({0}: the dialect's placeholder) with its
#: user's disabled_at, in one query: a disabled user's tokens are refused on
#: their next call, on every replica, with nothing cached.
FIND_TOKEN = (
    f"SELECT {qualified(TOKEN_COLUMNS, 't')}, u.disabled_at AS user_disabled_at "
    "FROM api_tokens t LEFT JOIN users u ON u.tenant = t.tenant AND u.name = t.user_name "
    "WHERE t.prefix = {0}"
)


def tenant_record(row: Row) -> TenantRecord:
    return TenantRecord(row["name"], row["description"], row["created_at"])


def _strings(value: Any) -> tuple[str, ...] | None:
    """A strings column: NULL, a JSON list (SQLite) or an array (PostgreSQL)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return tuple(value)


def token_record(row: Row) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        prefix=row["prefix"],
        role=Role(row["role"]),
        tenant=row["tenant"],
        executor_tenants=_strings(row["executor_tenants"]),
        label=row["label"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        digest=bytes(row["digest"]),
        user=row["user_name"],
    )


def found_token(row: Row) -> TokenRecord:
    """A `FIND_TOKEN` row: the token, digest and its user's disabled_at."""
    return replace(token_record(row), user_disabled_at=row["user_disabled_at"])


def user_record(row: Row) -> UserRecord:
    return UserRecord(
        tenant=row["tenant"],
        name=row["name"],
        role=Role(row["role"]),
        created_at=row["created_at"],
        disabled_at=row["disabled_at"],
    )


def access_map(rows: Sequence[Row]) -> dict[str, frozenset[str] | None]:
    """`backend_access` rows (backend, tenants) folded per backend: None once any
    executor of it serves anyone, else the union of the tenants."""
    access: dict[str, frozenset[str] | None] = {}
    for row in rows:
        name, tenants = row["backend"], _strings(row["tenants"])
        if tenants is None or (name in access and access[name] is None):
            access[name] = None
        else:
            access[name] = (access.get(name) or frozenset()) | frozenset(tenants)
    return access


def migrations(dialect: Dialect) -> dict[int, str]:
    """Each version's SQL for this dialect: the shared step, then its own."""
    return {
        version: sql.format(
            serial_key=dialect.serial_key,
            real=dialect.real,
            big=dialect.big,
            blob=dialect.blob,
            flag=dialect.flag,
            strings=dialect.strings,
        )
        + dialect.extra.get(version, "")
        for version, sql in MIGRATIONS.items()
    }
