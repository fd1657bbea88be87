"""The `JobStore` interface and the plain domain values it speaks.

The store persists jobs, their events and the backends executors announced.
Specs, results, errors and event payloads travel as protobuf bytes, so a
store implementation never needs to understand them (nor qiskit). Every
method is one atomic transaction. Event payloads are serialized `JobEvent`
messages with only the payload oneof set; the store adds `seq` and time.
"""

from __future__ import annotations

import enum
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qrelay._proto.v1 import sessions_pb2, types_pb2
from qrelay.errors import NotFound


class JobState(enum.IntEnum):
    """Lifecycle state, numbered as qrelay.v1.JobState."""

    QUEUED = types_pb2.JOB_STATE_QUEUED
    RUNNING = types_pb2.JOB_STATE_RUNNING
    DONE = types_pb2.JOB_STATE_DONE
    FAILED = types_pb2.JOB_STATE_FAILED
    CANCELLED = types_pb2.JOB_STATE_CANCELLED

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobKind(enum.IntEnum):
    """Kind of work, numbered as qrelay.v1.JobKind."""

    SAMPLER = types_pb2.JOB_KIND_SAMPLER
    ESTIMATOR = types_pb2.JOB_KIND_ESTIMATOR
    PROGRAM = types_pb2.JOB_KIND_PROGRAM


class UpdateKind(enum.Enum):
    """What an executor's JobUpdate carries."""

    INTERIM = "interim"
    LOG = "log"
    PROGRESS = "progress"
    RESULT = "result"
    ERROR = "error"
    RELEASED = "released"

    @property
    def final(self) -> bool:
        return self in (UpdateKind.RESULT, UpdateKind.ERROR, UpdateKind.RELEASED)


@dataclass(frozen=True)
class NewJob:
    """A validated submission."""

    tenant: str
    backend: str
    kind: JobKind
    spec: bytes
    num_pubs: int
    session_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    # For program jobs: the resolved program id (keeps a deleted program's
    # archive alive until the job finishes).
    program_id: str = ""
    # The new job's id when the caller chose it (`new_job_id()`, so that Run can
    # listen for the job's events before it is committed); else the store's.
    id: str = ""
    # The tenant's fair-share weight on the backend (`lifecycle.fair_start`).
    weight: float = 1.0
    # Order among the tenant's own queued jobs (higher first); never changes
    # the tenant's share against others (`lifecycle` "priorities").
    priority: int = 0


class OtherTenants(NotFound):
    """NotFound for a job that exists but belongs to another tenant: it travels as
    NOT_FOUND with the very message a missing job gets (existence never leaks),
    and lets the broker audit the cross-tenant denial."""


def job_not_found(job_id: str, *, other_tenant: bool = False) -> NotFound:
    """The NotFound of a job id, the same words whoever's job it is."""
    cls = OtherTenants if other_tenant else NotFound
    return cls(f"job {job_id!r} not found")


def new_job_id() -> str:
    """A fresh job id, e.g. "j-8c1f..." (what the stores generate)."""
    return f"j-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class JobRecord:
    """A job's row, without its (possibly large) spec and result."""

    id: str
    tenant: str
    backend: str
    kind: JobKind
    state: JobState
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: bytes | None  # serialized JobError when FAILED
    session_id: str
    executor_id: str
    lease_id: str  # empty unless RUNNING
    lease_expires_at: float | None
    last_seq: int
    tags: dict[str, str]
    idempotency_key: str
    num_pubs: int
    # Estimated place in its backend's queue (1 = next; 0 when not queued),
    # from the tenant's own jobs ahead and the active tenants' weights only
    # (`lifecycle.estimated_position`), never other tenants' counts.
    queue_position: int = 0
    priority: int = 0
    usage_s: float = 0.0  # executor-seconds of its final run (0 until it ends)


@dataclass(frozen=True)
class StoredEvent:
    """One persisted job event: `payload` is a JobEvent with only its payload set."""

    job_id: str
    seq: int
    time: float
    payload: bytes
    terminal: bool  # the job's terminal StateChange


@dataclass(frozen=True)
class LeaseGrant:
    """A job claimed for an executor under a fresh lease."""

    job: JobRecord
    spec: bytes
    events: list[StoredEvent]


@dataclass(frozen=True)
class UpdateOutcome:
    """Result of a fenced update. `accepted` False means it changed nothing."""

    accepted: bool
    message: str
    job: JobRecord | None
    events: list[StoredEvent]


@dataclass(frozen=True)
class ExpiredLease:
    """A lease the reaper ended: the job is QUEUED again or FAILED (attempts used up)."""

    job: JobRecord
    lease_id: str
    executor_id: str
    events: list[StoredEvent]


@dataclass(frozen=True)
class CancelOutcome:
    """Cancel's effect: `lease_id`/`executor_id` name the run to stop, if one was running."""

    job: JobRecord
    previous_state: JobState
    lease_id: str
    executor_id: str
    events: list[StoredEvent]


@dataclass(frozen=True)
class HeldCheck:
    """Which leases an executor reported on reconnect are still the jobs' current ones."""

    valid: list[tuple[str, str]]  # (job_id, lease_id), lease extended
    invalid: list[tuple[str, str]]


@dataclass(frozen=True)
class BackendRecord:
    """A backend some executor announced: `info` is a serialized BackendInfo."""

    name: str
    info: bytes
    last_seen: float


@dataclass(frozen=True)
class JobPage:
    jobs: list[JobRecord]
    next_page_token: str


@dataclass(frozen=True)
class SessionPage:
    sessions: list[SessionRecord]
    next_page_token: str


@dataclass(frozen=True)
class NewProgram:
    """A validated upload; `id` is already the content hash ("p-" + sha256)."""

    id: str
    tenant: str
    name: str
    archive: bytes
    entry_point: str
    requirements: tuple[str, ...]
    input_schema_json: str
    description: str


@dataclass(frozen=True)
class ProgramRecord:
    """A stored program version, without its archive."""

    id: str
    tenant: str
    name: str
    version: int  # 1 for the first version of a name
    entry_point: str
    requirements: tuple[str, ...]
    input_schema_json: str
    description: str
    size_bytes: int
    created_at: float


@dataclass(frozen=True)
class Quota:
    """A tenant's limits as they apply now (None: no limit), as the stores
    check them inside their transactions (`qrelay.broker.quotas` builds it).

    `period_start` is the first UTC day ("YYYY-MM-DD") of the current
    executor-seconds period: the period's use is the sum of its days;
    `period_end` the first day of the next one (for messages)."""

    max_queued_jobs: int | None = None
    max_running_jobs: int | None = None
    max_sessions: int | None = None
    max_program_bytes: int | None = None
    max_executor_seconds: float | None = None
    period_start: str = ""
    period_end: str = ""


@dataclass(frozen=True)
class RunningLimits:
    """Running-job quotas for every tenant at claim time: `default` for tenants
    not in `tenants` (None: unlimited)."""

    default: int | None = None
    tenants: dict[str, int | None] = field(default_factory=dict)

    def limit(self, tenant: str) -> int | None:
        return self.tenants.get(tenant, self.default)

    @property
    def any(self) -> bool:
        return self.default is not None or any(v is not None for v in self.tenants.values())


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant uses now: the counts its quotas limit."""

    queued_jobs: int
    running_jobs: int
    open_sessions: int
    program_bytes: int
    executor_seconds: float  # since the period's first day


class SessionMode(enum.IntEnum):
    """Numbered as qrelay.v1.SessionMode."""

    DEDICATED = sessions_pb2.SESSION_MODE_DEDICATED
    BATCH = sessions_pb2.SESSION_MODE_BATCH


class SessionState(enum.IntEnum):
    """Numbered as qrelay.v1.SessionState."""

    OPEN = sessions_pb2.SESSION_STATE_OPEN
    ACTIVE = sessions_pb2.SESSION_STATE_ACTIVE
    CLOSED = sessions_pb2.SESSION_STATE_CLOSED
    CANCELLED = sessions_pb2.SESSION_STATE_CANCELLED
    EXPIRED = sessions_pb2.SESSION_STATE_EXPIRED

    @property
    def accepting(self) -> bool:
        """Whether jobs may still be submitted to the session."""
        return self in (SessionState.OPEN, SessionState.ACTIVE)


@dataclass(frozen=True)
class NewSession:
    tenant: str
    backend: str
    mode: SessionMode
    max_time_s: int
    max_idle_s: int


@dataclass(frozen=True)
class SessionRecord:
    """A session's row plus its jobs' counts per state (computed on read)."""

    id: str
    tenant: str
    backend: str
    mode: SessionMode
    state: SessionState
    state_reason: str
    executor_id: str  # the pinned executor of a DEDICATED session, once a job started
    max_time_s: int
    max_idle_s: int
    created_at: float
    activated_at: float | None
    closed_at: float | None
    last_job_at: float | None  # last submit into the session
    last_finished_at: float | None  # latest finished_at among its jobs
    counts: dict[JobState, int]  # every JobState present, zeros included

    @property
    def unfinished(self) -> int:
        return self.counts[JobState.QUEUED] + self.counts[JobState.RUNNING]


@dataclass(frozen=True)
class Presence:
    """One executor connected to some broker replica, as the replicas publish them."""

    executor_id: str
    broker_id: str
    backends: tuple[str, ...]
    slots: int
    last_seen: float


class Role(enum.StrEnum):
    """What a token may do: `user` speaks the tenant services as its tenant,
    `executor` only ExecutorService, `admin` AdminService (and the tenant
    services when it names a tenant)."""

    ADMIN = "admin"
    USER = "user"
    EXECUTOR = "executor"


@dataclass(frozen=True)
class TenantRecord:
    name: str
    description: str
    created_at: float


@dataclass(frozen=True)
class TokenRecord:
    """An API token's row. `digest` is HMAC-SHA256(server key, token), never the
    token; `prefix` is its first characters, not secret, the lookup key.
    `executor_tenants` restricts an executor token to these tenants' jobs
    (None: any tenant)."""

    id: str
    prefix: str
    role: Role
    tenant: str
    executor_tenants: tuple[str, ...] | None
    label: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    digest: bytes = field(default=b"", repr=False)
    # The user (of `tenant`) holding the token; None for executor tokens and
    # bootstrap or other admin tokens issued to no one in particular.
    user: str | None = None
    # When the token's user was disabled, as `find_token` reads it with the
    # token in one query (None: not disabled, or no user; lists leave it None).
    user_disabled_at: float | None = None


@dataclass(frozen=True)
class UserRecord:
    """A user of a tenant: `name` is unique within `tenant`; `role` is the
    ceiling of the tokens made for it (`user` or `admin`). Disabling a user
    (`disabled_at`) refuses all its tokens from their next call on."""

    tenant: str
    name: str
    role: Role
    created_at: float
    disabled_at: float | None = None


class JobStore(ABC):
    """Durable state of the broker. Implementations: `SQLiteJobStore` (embedded)
    and `PostgresJobStore` (shared by replicas); the lifecycle rules both
    execute are in `lifecycle.py`.

    `tenant=None` on reads means "any tenant" (internal callers); a tenant's
    view of another tenant's job raises NotFound so existence never leaks.
    """

    @abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema; safe to call on an existing store."""

    @abstractmethod
    def describe(self) -> str:
        """Where the data lives, for logs (no secrets)."""

    def replicas(self) -> ReplicaStore | None:
        """What sibling broker replicas sharing this store need of it (the
        replica fan-out's side of the store), or None: only this broker uses it."""
        return None

    @abstractmethod
    async def close(self) -> None: ...

    # --- jobs -------------------------------------------------------------
    @abstractmethod
    async def submit(
        self, job: NewJob, *, max_queued_per_tenant: int, quota: Quota | None = None
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job with its first event, or return the tenant's job
        with the same idempotency key (created=False). Raises ResourceExhausted
        when the tenant already has `max_queued_per_tenant` queued jobs, and
        QuotaExceeded when `quota` refuses it (queued jobs, or the period's
        executor-seconds spent), checked in the same transaction.

        With `job.session_id` set, in the same transaction: the session must be
        the tenant's (else NotFound), on the job's backend (else
        InvalidArgument) and accepting jobs, i.e. OPEN or ACTIVE (else
        FailedPrecondition "session s-… is closed|cancelled|expired"); its
        `last_job_at` becomes now. (The idempotency lookup comes first: a
        retried submit of an accepted job still returns it.)"""

    @abstractmethod
    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Raises NotFound."""

    @abstractmethod
    async def get_spec(self, job_id: str) -> bytes: ...

    @abstractmethod
    async def get_result(self, job_id: str) -> bytes | None:
        """Serialized JobResult of a DONE job, else None."""

    @abstractmethod
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
        """Newest first. `tags`: only jobs carrying every one of these tag keys
        (found through the tag index, newest first, not by reading every job).
        `program` is a program id, or a name for the jobs of every version of it
        still stored."""

    @abstractmethod
    async def delete_job(self, job_id: str, tenant: str) -> JobRecord:
        """Delete a finished job with its events, result and tag rows; returns the
        job as it was. NotFound for a missing job or another tenant's;
        FailedPrecondition for a QUEUED or RUNNING one. The job's idempotency
        key stays taken: a later submit with it is refused (FailedPrecondition
        naming the deleted job) rather than creating a second job under it."""

    @abstractmethod
    async def update_tags(self, job_id: str, tenant: str, tags: dict[str, str]) -> JobRecord:
        """Replace a job's tags (in any state); returns the updated job. NotFound
        for a missing job or another tenant's."""

    @abstractmethod
    async def events_after(self, job_id: str, after_seq: int) -> list[StoredEvent]: ...

    # --- scheduling and leases -------------------------------------------
    @abstractmethod
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
        """Lease up to `limit` of the oldest QUEUED jobs for these backends (and
        of these kinds; None = any; and of these tenants, None = any: an
        executor token restricted to tenants) to the executor: RUNNING,
        attempts + 1, a new lease id, a StateChange event.

        Sessions: a job of a DEDICATED session pinned to another executor is
        never claimed. Jobs of DEDICATED sessions pinned to this executor and
        ACTIVE come first (oldest first), then the rest by age. Claiming a
        job of a session without `activated_at` sets it (and OPEN becomes
        ACTIVE); claiming a job of an unpinned DEDICATED session pins it to
        this executor (executor_id), so its later jobs go only here.

        Running quotas (`running`): a tenant with as many RUNNING jobs as its
        limit gets none claimed (its jobs stay queued, in place), exactly, also
        across replicas. Priorities: the fair order picks whose turn it is;
        that tenant's queued job of the highest priority (same backend and
        session, a wanted kind) runs in the turn, the two swapping start
        tags, so the tenant's share is unchanged."""

    @abstractmethod
    async def extend_leases(self, lease_ids: Sequence[str], lease_ttl_s: float) -> set[str]:
        """Push expiry of these current leases to now + ttl; returns the ones extended."""

    @abstractmethod
    async def check_held(
        self, executor_id: str, held: Sequence[tuple[str, str]], lease_ttl_s: float
    ) -> HeldCheck: ...

    @abstractmethod
    async def apply_update(
        self, job_id: str, lease_id: str, kind: UpdateKind, payload: bytes
    ) -> UpdateOutcome:
        """Fenced by lease: only the job's current lease may change it.

        `payload` is the serialized Interim / LogLine / JobResult / JobError /
        Released message. A RELEASED for a job already CANCELLED is accepted
        as a no-op (the executor confirms the stop)."""

    @abstractmethod
    async def expire_leases(self, now: float, max_attempts: int) -> list[ExpiredLease]: ...

    @abstractmethod
    async def next_lease_expiry(self) -> float | None: ...

    @abstractmethod
    async def renew_running_leases(self, lease_ttl_s: float) -> int:
        """At start-up: give every RUNNING lease at least one TTL from now, so
        executors reconnecting after a broker restart can keep their jobs."""

    @abstractmethod
    async def cancel(self, job_id: str, tenant: str | None, reason: str) -> CancelOutcome: ...

    # --- programs ---------------------------------------------------------
    @abstractmethod
    async def put_program(
        self, program: NewProgram, quota: Quota | None = None
    ) -> tuple[ProgramRecord, bool]:
        """Store a version, or return the tenant's existing one with this id
        (created=False). A new version of a name is numbered 1 + the highest
        version of that name the tenant has (deleted-but-retained ones count).
        Uploading the id of a deleted-but-retained version revives it.
        A new archive that would take the tenant's stored bytes (every version
        kept, deleted-but-retained included) over `quota.max_program_bytes`
        raises QuotaExceeded."""

    @abstractmethod
    async def get_program(
        self, tenant: str, program: str, *, include_deleted: bool = False
    ) -> ProgramRecord:
        """By id, else by name (highest version). Raises NotFound naming `program`.
        `include_deleted` also finds versions deleted while jobs still needed them."""

    @abstractmethod
    async def get_program_archive(self, tenant: str, program_id: str) -> bytes:
        """The archive of a version, deleted-but-retained ones too. Raises NotFound."""

    @abstractmethod
    async def list_programs(self, tenant: str, name: str = "") -> list[ProgramRecord]:
        """Without `name`: the highest version of each name, by name. With it:
        every version of that name, highest first (empty list if none)."""

    @abstractmethod
    async def delete_programs(self, tenant: str, program: str) -> int:
        """Delete a version by id, or every version of a name; returns how many.
        Raises NotFound when nothing matches. A version that an unfinished
        job (NewJob.program_id) still needs disappears from get/list at once
        but its row and archive stay until a later delete finds it unneeded,
        so queued jobs still run what they were submitted with."""

    # --- sessions ---------------------------------------------------------
    @abstractmethod
    async def create_session(
        self, session: NewSession, quota: Quota | None = None
    ) -> SessionRecord:
        """Insert an OPEN session with id "s-…". Raises QuotaExceeded when the
        tenant already has `quota.max_sessions` OPEN or ACTIVE sessions."""

    @abstractmethod
    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord:
        """With counts. Raises NotFound (also for another tenant's session)."""

    @abstractmethod
    async def list_sessions(
        self,
        tenant: str,
        *,
        states: Sequence[SessionState] = (),
        backend: str = "",
        page_size: int = 50,
        page_token: str = "",
    ) -> SessionPage:
        """The tenant's sessions, newest first."""

    @abstractmethod
    async def end_session(
        self, session_id: str, tenant: str | None, state: SessionState, reason: str
    ) -> tuple[SessionRecord, bool]:
        """Move an OPEN/ACTIVE session to CLOSED, CANCELLED or EXPIRED with a
        reason and closed_at = now; returns (session, changed). CANCELLED may
        also follow CLOSED (cancel after close). Otherwise unchanged, False."""

    @abstractmethod
    async def live_sessions(self) -> list[SessionRecord]:
        """Every OPEN or ACTIVE session (with counts), for the expiry reaper;
        plus CLOSED sessions still pinned with unfinished jobs (for re-pinning)."""

    @abstractmethod
    async def unpin_sessions(self, executor_id: str) -> list[SessionRecord]:
        """Clear executor_id of DEDICATED sessions pinned to this (vanished)
        executor, so their next job re-pins to whichever executor claims it.
        Returns the sessions it changed (before the change: executor_id kept)."""

    # --- backends and statistics -----------------------------------------
    @abstractmethod
    async def upsert_backends(self, backends: Sequence[BackendRecord]) -> None: ...

    @abstractmethod
    async def touch_backends(self, names: Sequence[str], now: float) -> None: ...

    @abstractmethod
    async def list_backends(self) -> list[BackendRecord]: ...

    @abstractmethod
    async def get_backend(self, name: str) -> BackendRecord | None: ...

    @abstractmethod
    async def set_backend_access(
        self, executor_id: str, backends: Sequence[str], tenants: Sequence[str] | None
    ) -> None:
        """Record which tenants this executor serves its backends to (None: any),
        replacing what it announced before."""

    @abstractmethod
    async def backend_access(self) -> dict[str, frozenset[str] | None]:
        """Per backend with recorded access: the tenants its executors serve
        (None: some executor serves anyone). Backends absent serve anyone."""

    # --- identity ---------------------------------------------------------
    @abstractmethod
    async def create_tenant(self, tenant: TenantRecord) -> TenantRecord:
        """Raises AlreadyExists."""

    @abstractmethod
    async def get_tenant(self, name: str) -> TenantRecord | None: ...

    @abstractmethod
    async def list_tenants(self) -> list[TenantRecord]:
        """By name."""

    @abstractmethod
    async def create_token(self, token: TokenRecord) -> TokenRecord:
        """Insert a token row (its id and prefix unique; AlreadyExists otherwise)."""

    @abstractmethod
    async def find_token(self, prefix: str) -> TokenRecord | None:
        """The token with this lookup prefix, digest included (revoked ones too),
        with its user's `disabled_at` read in the same query."""

    @abstractmethod
    async def revoke_token(self, token_id: str, now: float) -> TokenRecord:
        """Set revoked_at (kept if already set). Raises NotFound."""

    @abstractmethod
    async def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        """Every token (or those of one tenant), oldest first, without digests."""

    @abstractmethod
    async def count_tokens(self, role: Role | None = None) -> int:
        """How many tokens exist (of this role), revoked and expired ones included
        unless `role` is given (then only live ones: not revoked, not expired)."""

    @abstractmethod
    async def create_user(self, user: UserRecord) -> UserRecord:
        """Raises AlreadyExists for a name its tenant already has."""

    @abstractmethod
    async def get_user(self, tenant: str, name: str) -> UserRecord | None: ...

    @abstractmethod
    async def list_users(self, tenant: str | None = None) -> list[UserRecord]:
        """Every user (or those of one tenant), by tenant, then name."""

    @abstractmethod
    async def disable_user(self, tenant: str, name: str, now: float) -> UserRecord:
        """Set disabled_at (kept if already set). Raises NotFound."""

    @abstractmethod
    async def queue_lengths(self) -> dict[str, int]:
        """QUEUED jobs per backend."""

    @abstractmethod
    async def count_by_state(self) -> dict[JobState, int]: ...

    # --- quotas and usage -------------------------------------------------
    @abstractmethod
    async def tenant_usage(self, tenant: str, since_day: str) -> TenantUsage:
        """The tenant's queued and running jobs, open sessions, stored program
        bytes, and executor-seconds of jobs finished on `since_day` or later."""

    @abstractmethod
    async def queue_estimates(self, tenant: str) -> dict[str, int]:
        """Per backend where the tenant has queued jobs: the estimated queue
        length it sees (`lifecycle.estimated_length`), never others' counts."""


class ReplicaStore(Protocol):
    """A store several broker replicas share: change hints on a channel
    (tagged with `origin`) and the table of executors connected to each replica."""

    channel: str
    origin: str

    def connect_kwargs(self) -> dict[str, Any]:
        """How to open one more connection (the fan-out's listener)."""
        ...

    async def events_after(self, job_id: str, after_seq: int) -> list[StoredEvent]: ...

    async def list_backends(self) -> list[BackendRecord]: ...

    async def job_seqs(self, job_ids: Sequence[str]) -> dict[str, int]: ...

    async def publish_presence(
        self, broker_id: str, executors: Sequence[tuple[str, Sequence[str], int]], now: float
    ) -> None: ...

    async def withdraw_presence(self, broker_id: str) -> None: ...

    async def list_presence(self, since: float) -> list[Presence]: ...


# --- event payload helpers (shared by every implementation) ---------------


def state_payload(state: JobState, message: str, attempt: int, executor_id: str = "") -> bytes:
    """Serialized JobEvent payload for a StateChange (the event's attempt is its own)."""
    return types_pb2.JobEvent(
        state=types_pb2.StateChange(
            state=types_pb2.JobState.ValueType(state),
            message=message,
            attempt=attempt,
            executor_id=executor_id,
        ),
        attempt=attempt,
    ).SerializeToString()


# JobEvent's payload fields, numbered as the descriptor has them.
_PAYLOAD_FIELD = {
    kind: types_pb2.JobEvent.DESCRIPTOR.fields_by_name[kind.value].number
    for kind in UpdateKind
    if kind is not UpdateKind.RELEASED
}
# JobEvent.attempt, appended after the payload field (protobuf fields may come in any order).
_ATTEMPT_TAG = (types_pb2.JobEvent.DESCRIPTOR.fields_by_name["attempt"].number << 3) | 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def update_payload(kind: UpdateKind, payload: bytes, attempt: int = 0) -> bytes:
    """Serialized JobEvent payload for an executor update (interim/log/progress/
    result/error), saying which execution `attempt` produced it.

    Built by framing the already-serialized message as JobEvent's oneof field
    (protobuf wire format), so a large result is not parsed again.
    """
    if kind not in _PAYLOAD_FIELD:
        raise ValueError(f"{kind} has no event payload")
    tag = (_PAYLOAD_FIELD[kind] << 3) | 2
    framed = _varint(tag) + _varint(len(payload)) + payload
    return framed + _varint(_ATTEMPT_TAG) + _varint(attempt) if attempt > 0 else framed


def job_error(code: int, message: str) -> bytes:
    return types_pb2.JobError(code=code, message=message).SerializeToString()
