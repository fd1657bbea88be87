"""Who may call: tenants, API tokens and roles, kept in the broker's store.

Tokens are `qrl_` + 32 random bytes (urlsafe base64), shown once when made.
The store keeps `HMAC-SHA256(server key, token)` under a short lookup prefix
(the token's first 12 characters, not secret: it names the token in lists
and finds its row). Why HMAC and not argon2/scrypt: a slow KDF protects
guessable secrets (passwords); a 256-bit random token cannot be guessed, so
a KDF would buy nothing and cost every call tens of milliseconds. The key
makes a stolen table useless on its own: without the key a digest cannot
even be checked against a candidate token.

The server key comes from `identity_key_file` (QRELAY_IDENTITY_KEY_FILE) or
QRELAY_IDENTITY_KEY. With SQLite and neither set, a key is generated once
into `identity.key` beside the database (mode 0600), so a dev broker just
works. PostgreSQL replicas must share one key, so there it must be given;
without it the store's tokens are off (file tokens still work) and the
broker says so at start.

Every call looks its token up in the store: a revoked or expired token is
refused on its next call, on every replica, with no cache to wait out. The
one cached fact is whether the store holds any token at all (open mode), for
at most `OPEN_MODE_TTL_S`, and only while it holds none.

Users: a token may belong to a user of its tenant (`alice@lab`), so lists
and audit lines name its holder rather than a free-text label. A user's role
is a ceiling: a `user` user cannot be given an `admin` token. Disabling a
user refuses all its tokens from their next call on, on every replica: the
token's lookup reads its user's `disabled_at` in the same query, uncached.
Executor tokens and bootstrap admin tokens belong to no user.

Static tokens (`tokens_file`, `executor_token_file`) keep working as before:
a file token is a `user` of its tenant, the executor token an unrestricted
`executor`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from qrelay.broker.audit import audit
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store import JobStore
from qrelay.broker.store.base import Role, TenantRecord, TokenRecord, UserRecord
from qrelay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "qrl_"
#: Characters of a token kept in the clear as its lookup prefix ("qrl_" + 8).
LOOKUP_CHARS = 12
#: The longest a broker believes "no token exists yet" without asking again.
OPEN_MODE_TTL_S = 1.0
KEY_FILE_NAME = "identity.key"
_MIN_KEY_CHARS = 32
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
#: A user name may also hold '@' and '+' (`alice@lab`, `ci+nightly`).
_USER_CHARS = _NAME_CHARS | frozenset("@+")
MAX_USER_CHARS = 128
#: The role ceilings a user may have (executors are machines, not users).
USER_ROLES = (Role.USER, Role.ADMIN)


class Service(enum.Enum):
    """What a gRPC method belongs to, as far as authorization goes."""

    TENANT = "tenant"  # JobService, BackendService, ProgramService, SessionService
    EXECUTOR = "executor"
    ADMIN = "admin"
    REFLECTION = "reflection"
    HEALTH = "health"

    @classmethod
    def of(cls, method: str) -> Service:
        """The service of a full method name ("/qrelay.v1.JobService/Submit")."""
        service = method.lstrip("/").split("/", 1)[0]
        if service == "qrelay.v1.ExecutorService":
            return cls.EXECUTOR
        if service == "qrelay.v1.AdminService":
            return cls.ADMIN
        if service == "grpc.health.v1.Health":
            return cls.HEALTH
        if service.startswith("grpc.reflection."):
            return cls.REFLECTION
        return cls.TENANT


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as the interceptor hands it to servicers.

    `token_id` names the token (never its secret): a store token's id,
    "file:<tenant>" / "file:executor" for static ones, "" when anonymous
    (open mode). `executor_tenants` restricts an executor (None: any tenant).
    `user` names the token's user in `tenant` ("" for a token of no user).
    """

    role: Role
    tenant: str
    token_id: str
    executor_tenants: tuple[str, ...] | None = None
    user: str = ""

    @property
    def anonymous(self) -> bool:
        return not self.token_id


def new_token() -> str:
    """A fresh secret token: "qrl_" + 32 random bytes, urlsafe base64 (43 chars)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def lookup_prefix(token: str) -> str:
    return token[:LOOKUP_CHARS]


def token_digest(key: bytes, token: str) -> bytes:
    return hmac.new(key, token.encode(), hashlib.sha256).digest()


def check_name(what: str, name: str) -> str:
    """A tenant name: 1-64 of letters, digits, '-', '_', '.'."""
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise InvalidArgument(
            f"{what} must be 1-64 characters of letters, digits, '-', '_' or '.', got {name[:80]!r}"
        )
    return name


def check_user_name(name: str) -> str:
    """A user name: 1-128 of letters, digits, '-', '_', '.', '@', '+' (no spaces,
    no control characters: it is shown in lists and audit lines verbatim)."""
    if not name or len(name) > MAX_USER_CHARS or not set(name) <= _USER_CHARS:
        shown = name[:80] + ("…" if len(name) > 80 else "")
        raise InvalidArgument(
            f"user name must be 1-{MAX_USER_CHARS} characters of letters, digits, "
            f"'-', '_', '.', '@' or '+', got {shown!r} ({len(name)} characters)"
        )
    return name


def load_server_key(settings: BrokerSettings, *, create: bool = True) -> bytes | None:
    """The HMAC key: QRELAY_IDENTITY_KEY, else `identity_key_file`, else (SQLite
    only, with `create`) `identity.key` beside the database, generated if absent.
    None for PostgreSQL without a key."""
    if settings.identity_key:
        return _checked_key(settings.identity_key, "QRELAY_IDENTITY_KEY")
    if settings.identity_key_file is not None:
        try:
            text = settings.identity_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot read identity_key_file {settings.identity_key_file}: {exc.strerror or exc}"
            ) from None
        return _checked_key(text, f"identity_key_file {settings.identity_key_file}")
    if settings.database_url:
        return None
    path = settings.db_path.parent / KEY_FILE_NAME
    if path.exists():
        return _checked_key(path.read_text(encoding="utf-8"), str(path))
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    # O_EXCL: two brokers starting on one directory must not write two keys.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _checked_key(path.read_text(encoding="utf-8"), str(path))
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(key + "\n")
    log.info("identity.key_created", path=str(path))
    return key.encode()


def _checked_key(text: str, where: str) -> bytes:
    key = text.strip()
    if len(key) < _MIN_KEY_CHARS:
        raise FailedPrecondition(
            f"{where}: the identity key must be at least {_MIN_KEY_CHARS} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    return key.encode()


class Identity:
    """Authentication, authorization and the admin operations, on plain values."""

    def __init__(
        self,
        store: JobStore,
        key: bytes | None,
        *,
        default_tenant: str = "default",
        static_tokens: Mapping[str, str] | None = None,
        executor_token: str | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.default_tenant = default_tenant
        self._static = dict(static_tokens or {})
        self._executor_token = executor_token
        # Whether the store holds any token, and when that was last asked
        # (only "none" is cached: once a token exists, the store stays closed).
        self._store_closed = False
        self._checked_at = -OPEN_MODE_TTL_S

    # --- authentication ---------------------------------------------------------
    async def authenticate(self, token: str | None, service: Service, method: str) -> Principal:
        """The caller of `method` presenting `token` (None: no authorization
        metadata), allowed to call it; else Unauthenticated / PermissionDenied,
        each audited."""
        try:
            principal = await self._identify(token, service)
        except DisabledUser as exc:
            audit(
                "auth.failed",
                method=method,
                reason=exc.message,
                prefix=_shown_prefix(token),
                tenant=exc.tenant,
                user=exc.user,
            )
            raise
        except Unauthenticated as exc:
            audit("auth.failed", method=method, reason=exc.message, prefix=_shown_prefix(token))
            raise
        self._authorize(principal, service, method)
        return principal

    async def admits(self, token: str | None, service: Service) -> bool:
        """Whether `token` (or no token) identifies someone, without auditing."""
        try:
            await self._identify(token, service)
        except Unauthenticated:
            return False
        return True

    async def _identify(self, token: str | None, service: Service) -> Principal:
        if token is not None:
            found = self._static_principal(token)
            if found is None and token.startswith(TOKEN_PREFIX) and self.key is not None:
                found = await self._stored_principal(token)
            if found is not None:
                return found
            if await self._open(service):
                return self._anonymous(service)  # open mode has never checked tokens
            raise Unauthenticated("unknown bearer token")
        if await self._open(service):
            return self._anonymous(service)
        raise Unauthenticated(
            "this broker requires a bearer token: send metadata "
            "'authorization: Bearer <token>' (QRELAY_TOKEN on the client)"
        )

    def _static_principal(self, token: str) -> Principal | None:
        presented = token.encode()
        if self._executor_token is not None and hmac.compare_digest(
            presented, self._executor_token.encode()
        ):
            return Principal(Role.EXECUTOR, "", "file:executor")
        for known, tenant in self._static.items():
            if hmac.compare_digest(known.encode(), presented):
                return Principal(Role.USER, tenant, f"file:{tenant}")
        return None

    async def _stored_principal(self, token: str) -> Principal | None:
        assert self.key is not None
        record = await self.store.find_token(lookup_prefix(token))
        if record is None or not hmac.compare_digest(record.digest, token_digest(self.key, token)):
            return None
        if record.revoked_at is not None:
            raise Unauthenticated(f"token {record.prefix}… was revoked")
        if record.expires_at is not None and record.expires_at <= time.time():
            raise Unauthenticated(f"token {record.prefix}… has expired")
        if record.user is not None and record.user_disabled_at is not None:
            raise DisabledUser(record.tenant, record.user, record.prefix)
        return Principal(
            record.role, record.tenant, record.id, record.executor_tenants, record.user or ""
        )

    async def _open(self, service: Service) -> bool:
        """Whether `service` may be called without a token: nothing configured
        guards it and the store holds no token (this broker is a dev broker)."""
        if service is Service.EXECUTOR and self._executor_token is not None:
            return False
        if service is Service.TENANT and self._static:
            return False
        if service in (Service.REFLECTION, Service.HEALTH) and (
            self._static or self._executor_token
        ):
            return False
        return not await self._tokens_exist()

    async def _tokens_exist(self) -> bool:
        if self._store_closed:
            return True
        now = time.monotonic()
        if now - self._checked_at >= OPEN_MODE_TTL_S:
            self._checked_at = now
            self._store_closed = await self.store.count_tokens() > 0
        return self._store_closed

    def _anonymous(self, service: Service) -> Principal:
        role = Role.EXECUTOR if service is Service.EXECUTOR else Role.USER
        return Principal(role, self.default_tenant, "")

    def _authorize(self, principal: Principal, service: Service, method: str) -> None:
        role = principal.role
        if service is Service.HEALTH:
            return
        if service is Service.EXECUTOR:
            allowed = role is Role.EXECUTOR
        elif service is Service.ADMIN:
            allowed = role is Role.ADMIN and not principal.anonymous
        elif service is Service.REFLECTION:
            allowed = True
        else:
            allowed = role is Role.USER or (role is Role.ADMIN and bool(principal.tenant))
        if allowed:
            return
        audit(
            "auth.denied",
            method=method,
            role=str(role),
            tenant=principal.tenant,
            token_id=principal.token_id,
            **_user_of(principal),
        )
        if service is Service.ADMIN:
            raise PermissionDenied(
                f"{method} needs an admin token; this one has role {role}"
                if not principal.anonymous
                else f"{method} needs an admin token (create the first one with "
                "`qrelay admin bootstrap`)"
            )
        if service is Service.EXECUTOR:
            raise PermissionDenied(f"ExecutorService is for executor tokens; this one is {role}")
        raise PermissionDenied(
            f"{method} is for user tokens; a {role} token "
            + ("without a tenant " if role is Role.ADMIN else "")
            + "may not call it"
        )

    # --- administration --------------------------------------------------------
    async def create_tenant(self, actor: Principal, name: str, description: str) -> TenantRecord:
        check_name("tenant name", name)
        record = await self.store.create_tenant(TenantRecord(name, description, time.time()))
        audit("tenant.created", tenant=name, by=actor.token_id, **_by_user(actor))
        return record

    async def list_tenants(self) -> list[TenantRecord]:
        return await self.store.list_tenants()

    async def create_token(
        self,
        actor: Principal,
        *,
        role: Role,
        tenant: str = "",
        executor_tenants: Sequence[str] | None = None,
        label: str = "",
        ttl_s: float | None = None,
        user: str = "",
    ) -> tuple[TokenRecord, str]:
        """A new token and its secret (shown once: only its digest is kept).

        With `user`, the token is that user's: its tenant is the user's
        (`tenant` must name it), its role at most the user's ceiling, and the
        user must exist and not be disabled."""
        key = self._require_key()
        if user:
            await self._token_user(user, tenant, role)
        if role is Role.USER and not tenant:
            raise InvalidArgument("a user token needs a tenant")
        if role is Role.EXECUTOR and tenant:
            raise InvalidArgument(
                "an executor token has no tenant of its own; restrict it with executor_tenants"
            )
        if role is not Role.EXECUTOR and executor_tenants is not None:
            raise InvalidArgument("executor_tenants applies to executor tokens only")
        if ttl_s is not None and not ttl_s > 0:
            raise InvalidArgument(f"ttl_s must be > 0 (or unset for no expiry), got {ttl_s}")
        if len(label) > 200:
            raise InvalidArgument(f"label is {len(label)} characters; at most 200")
        for name in ([tenant] if tenant else []) + list(executor_tenants or ()):
            check_name("tenant", name)
            if await self.store.get_tenant(name) is None:
                raise NotFound(f"tenant {name!r} not found (create it with `admin tenant create`)")
        secret = new_token()
        now = time.time()
        record = TokenRecord(
            id=f"tok-{uuid.uuid4().hex[:16]}",
            prefix=lookup_prefix(secret),
            role=role,
            tenant=tenant,
            executor_tenants=None if executor_tenants is None else tuple(executor_tenants),
            label=label,
            created_at=now,
            expires_at=None if ttl_s is None else now + ttl_s,
            revoked_at=None,
            digest=token_digest(key, secret),
            user=user or None,
        )
        await self.store.create_token(record)
        self._store_closed = True
        audit(
            "token.created",
            token_id=record.id,
            prefix=record.prefix,
            role=str(role),
            tenant=tenant,
            executor_tenants=list(executor_tenants) if executor_tenants is not None else None,
            expires_at=record.expires_at,
            user=user,
            by=actor.token_id,
            **_by_user(actor),
        )
        return record, secret

    async def _token_user(self, user: str, tenant: str, role: Role) -> None:
        """Check that a token of `role` may be made for `user` of `tenant`."""
        check_user_name(user)
        if role is Role.EXECUTOR:
            raise InvalidArgument(
                "an executor token belongs to no user; leave `user` empty for executors"
            )
        if not tenant:
            raise InvalidArgument(
                f"a user token needs the user's tenant: user names are unique within a "
                f"tenant only (give the tenant of {user!r})"
            )
        check_name("tenant", tenant)
        record = await self.store.get_user(tenant, user)
        if record is None:
            raise NotFound(
                f"user {user!r} not found in tenant {tenant!r} (create it with `admin user create`)"
            )
        if record.disabled_at is not None:
            raise FailedPrecondition(f"user {user!r} of tenant {tenant!r} is disabled")
        if role is Role.ADMIN and record.role is not Role.ADMIN:
            raise PermissionDenied(
                f"user {user!r} of tenant {tenant!r} has role ceiling {record.role}: "
                "it cannot hold an admin token (create the user with role admin)"
            )

    async def revoke_token(self, actor: Principal, token_id: str) -> TokenRecord:
        if not token_id:
            raise InvalidArgument("token_id is required")
        record = await self.store.revoke_token(token_id, time.time())
        audit(
            "token.revoked",
            token_id=record.id,
            prefix=record.prefix,
            tenant=record.tenant,
            user=record.user or "",
            by=actor.token_id,
            **_by_user(actor),
        )
        return record

    async def list_tokens(self, tenant: str = "") -> list[TokenRecord]:
        return await self.store.list_tokens(tenant or None)

    async def create_user(
        self, actor: Principal, *, tenant: str, name: str, role: Role = Role.USER
    ) -> UserRecord:
        """A user of `tenant` (which must exist), its tokens at most `role`."""
        check_user_name(name)
        if not tenant:
            raise InvalidArgument("a user needs a tenant")
        check_name("tenant", tenant)
        if role not in USER_ROLES:
            raise InvalidArgument(
                f"a user's role ceiling is user or admin, not {role} "
                "(executor tokens belong to no user)"
            )
        if await self.store.get_tenant(tenant) is None:
            raise NotFound(f"tenant {tenant!r} not found (create it with `admin tenant create`)")
        record = await self.store.create_user(UserRecord(tenant, name, role, time.time()))
        audit(
            "user.created",
            tenant=tenant,
            user=name,
            role=str(role),
            by=actor.token_id,
            **_by_user(actor),
        )
        return record

    async def list_users(self, tenant: str = "") -> list[UserRecord]:
        if tenant:
            check_name("tenant", tenant)
        return await self.store.list_users(tenant or None)

    async def disable_user(self, actor: Principal, *, tenant: str, name: str) -> UserRecord:
        """Disable a user: every token of it is refused from its next call on."""
        check_user_name(name)
        if not tenant:
            raise InvalidArgument("the user's tenant is required: user names are unique per tenant")
        check_name("tenant", tenant)
        record = await self.store.disable_user(tenant, name, time.time())
        audit(
            "user.disabled",
            tenant=tenant,
            user=name,
            disabled_at=record.disabled_at,
            by=actor.token_id,
            **_by_user(actor),
        )
        return record

    def _require_key(self) -> bytes:
        if self.key is None:
            raise FailedPrecondition(
                "this broker has no identity key (QRELAY_IDENTITY_KEY_FILE or "
                "QRELAY_IDENTITY_KEY), so it cannot make tokens; every replica sharing "
                "PostgreSQL needs the same key"
            )
        return self.key


class DisabledUser(Unauthenticated):
    """A valid token whose user is disabled (audited with the user's name)."""

    def __init__(self, tenant: str, user: str, prefix: str) -> None:
        super().__init__(f"token {prefix}… belongs to user {user!r}, which is disabled")
        self.tenant = tenant
        self.user = user


def _user_of(principal: Principal) -> dict[str, str]:
    """`user=` for an audit line about `principal`, when it has a user."""
    return {"user": principal.user} if principal.user else {}


def _by_user(actor: Principal) -> dict[str, str]:
    """`by_user=` for an audit line about what `actor` did, when it has a user."""
    return {"by_user": actor.user} if actor.user else {}


def _shown_prefix(token: str | None) -> str:
    """What an audit line may say of a presented token: a qrelay token's public
    lookup prefix, else nothing (a static token has no public part)."""
    if token is not None and token.startswith(TOKEN_PREFIX) and len(token) > LOOKUP_CHARS:
        return lookup_prefix(token)
    return ""


async def bootstrap_admin(
    store: JobStore, key: bytes, *, label: str = "bootstrap", force: bool = False
) -> tuple[TokenRecord, str]:
    """The first admin token, written straight into the store (no broker needed).

    Refuses while a live admin token exists unless `force` (a lost admin token
    is replaced this way by whoever can write the store)."""
    if not force and await store.count_tokens(Role.ADMIN) > 0:
        raise FailedPrecondition(
            "an admin token already exists; use it (`qrelay admin token create --role admin`) "
            "or pass --force to make another"
        )
    identity = Identity(store, key)
    actor = Principal(Role.ADMIN, "", "bootstrap")
    return await identity.create_token(actor, role=Role.ADMIN, label=label)
