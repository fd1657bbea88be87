"""Identity's rules on plain values: token format, the server key, which role
may call which service, static file tokens (no socket)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrelay.broker.identity import (
    LOOKUP_CHARS,
    MAX_USER_CHARS,
    Identity,
    Principal,
    Service,
    check_user_name,
    load_server_key,
    lookup_prefix,
    new_token,
)
from qrelay.broker.settings import BrokerSettings
from qrelay.broker.store.base import Role
from qrelay.broker.store.sqlite import SQLiteJobStore
from qrelay.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)


def test_tokens_are_random_with_a_public_lookup_prefix() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert token.startswith("qrl_")
        assert len(token) == 4 + 43  # 32 bytes, urlsafe base64 without padding
        assert len(lookup_prefix(token)) == LOOKUP_CHARS


def test_services_are_told_apart_by_method_name() -> None:
    assert Service.of("/qrelay.v1.JobService/Submit") is Service.TENANT
    assert Service.of("/qrelay.v1.SessionService/Create") is Service.TENANT
    assert Service.of("/qrelay.v1.ExecutorService/Connect") is Service.EXECUTOR
    assert Service.of("/qrelay.v1.AdminService/CreateToken") is Service.ADMIN
    assert Service.of("/grpc.health.v1.Health/Check") is Service.HEALTH
    assert Service.of("/grpc.reflection.v1alpha.ServerReflection/X") is Service.REFLECTION
    assert Service.of("/no.such.Service/X") is Service.TENANT  # needs a user token


def test_sqlite_broker_generates_its_key_once_readable_only_by_its_owner(
    tmp_path: Path,
) -> None:
    settings = BrokerSettings(db_path=tmp_path / "d" / "broker.db")
    key = load_server_key(settings)
    assert key is not None
    assert len(key) == 64
    path = tmp_path / "d" / "identity.key"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_server_key(settings) == key


def test_key_from_the_environment_or_a_file_must_be_long_enough(tmp_path: Path) -> None:
    assert load_server_key(BrokerSettings(identity_key="s" * 40)) == b"s" * 40
    (tmp_path / "key").write_text("f" * 32 + "\n")
    assert load_server_key(BrokerSettings(identity_key_file=tmp_path / "key")) == b"f" * 32
    with pytest.raises(FailedPrecondition, match="at least 32 characters"):
        load_server_key(BrokerSettings(identity_key="short"))
    with pytest.raises(FailedPrecondition, match="cannot read identity_key_file"):
        load_server_key(BrokerSettings(identity_key_file=tmp_path / "absent"))
    postgres = BrokerSettings(database_url="postgresql://postgres@db/q")
    assert load_server_key(postgres) is None, "replicas must be given one shared key"


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    impl = SQLiteJobStore(tmp_path / "broker.db")
    await impl.open()
    yield impl
    await impl.close()


async def test_static_tokens_keep_their_roles(store: SQLiteJobStore) -> None:
    identity = Identity(
        store, b"k" * 32, static_tokens={"tok-a": "alice"}, executor_token="exec-secret"
    )
    alice = await identity.authenticate("tok-a", Service.TENANT, "/m")
    assert alice == Principal(Role.USER, "alice", "file:alice")
    executor = await identity.authenticate("exec-secret", Service.EXECUTOR, "/m")
    assert (executor.role, executor.executor_tenants) == (Role.EXECUTOR, None)
    with pytest.raises(PermissionDenied):
        await identity.authenticate("tok-a", Service.EXECUTOR, "/m")
    with pytest.raises(PermissionDenied):
        await identity.authenticate("exec-secret", Service.TENANT, "/m")
    with pytest.raises(Unauthenticated):
        await identity.authenticate(None, Service.TENANT, "/m")
    with pytest.raises(Unauthenticated):
        await identity.authenticate(None, Service.EXECUTOR, "/m")


async def test_an_open_broker_admits_anyone_but_never_as_admin(store: SQLiteJobStore) -> None:
    identity = Identity(store, b"k" * 32, default_tenant="lab")
    user = await identity.authenticate(None, Service.TENANT, "/m")
    assert (user.role, user.tenant, user.anonymous) == (Role.USER, "lab", True)
    executor = await identity.authenticate(None, Service.EXECUTOR, "/m")
    assert executor.role is Role.EXECUTOR
    with pytest.raises(PermissionDenied, match="qrelay admin bootstrap"):
        await identity.authenticate(None, Service.ADMIN, "/m")


async def test_a_made_token_authenticates_with_its_role_and_restriction(
    store: SQLiteJobStore,
) -> None:
    from qrelay.broker.store.base import TenantRecord

    identity = Identity(store, b"k" * 32)
    await store.create_tenant(TenantRecord("alice", "", 0.0))
    actor = Principal(Role.ADMIN, "", "tok-admin")
    record, secret = await identity.create_token(
        actor, role=Role.EXECUTOR, executor_tenants=["alice"]
    )
    principal = await identity.authenticate(secret, Service.EXECUTOR, "/m")
    assert principal == Principal(Role.EXECUTOR, "", record.id, ("alice",))
    assert record.digest != secret.encode()
    forged = secret[:-1] + ("B" if secret.endswith("A") else "A")  # same prefix
    with pytest.raises(Unauthenticated, match="unknown bearer token"):
        await identity.authenticate(forged, Service.EXECUTOR, "/m")


def test_user_names_allow_mail_like_names_and_refuse_the_rest() -> None:
    for good in ("alice@lab", "ci+nightly", "a.b-c_d", "u" * MAX_USER_CHARS):
        assert check_user_name(good) == good
    for bad in ("", "a b", "a\x00b", "a\nb", "ålice", "a/b", "u" * (MAX_USER_CHARS + 1)):
        with pytest.raises(InvalidArgument, match="user name must be 1-128 characters") as err:
            check_user_name(bad)
        assert len(err.value.message) < 300, "an overlong name is shown shortened"


async def test_a_user_token_carries_its_user_until_the_user_is_disabled(
    store: SQLiteJobStore,
) -> None:
    from qrelay.broker.store.base import TenantRecord

    identity = Identity(store, b"k" * 32)
    await store.create_tenant(TenantRecord("lab", "", 0.0))
    admin = Principal(Role.ADMIN, "", "tok-admin")
    user = await identity.create_user(admin, tenant="lab", name="alice@lab")
    assert (user.role, user.disabled_at) == (Role.USER, None)
    record, secret = await identity.create_token(
        admin, role=Role.USER, tenant="lab", user="alice@lab"
    )
    assert (record.tenant, record.user) == ("lab", "alice@lab")
    principal = await identity.authenticate(secret, Service.TENANT, "/m")
    assert principal == Principal(Role.USER, "lab", record.id, None, "alice@lab")
    with pytest.raises(PermissionDenied, match="role ceiling user"):
        await identity.create_token(admin, role=Role.ADMIN, tenant="lab", user="alice@lab")
    with pytest.raises(InvalidArgument, match="belongs to no user"):
        await identity.create_token(admin, role=Role.EXECUTOR, user="alice@lab")
    with pytest.raises(InvalidArgument, match="role ceiling is user or admin"):
        await identity.create_user(admin, tenant="lab", name="bot", role=Role.EXECUTOR)
    with pytest.raises(NotFound, match="tenant 'nowhere' not found"):
        await identity.create_user(admin, tenant="nowhere", name="bob")
    await identity.disable_user(admin, tenant="lab", name="alice@lab")
    with pytest.raises(Unauthenticated, match="which is disabled"):
        await identity.authenticate(secret, Service.TENANT, "/m")
    with pytest.raises(FailedPrecondition, match="is disabled"):
        await identity.create_token(admin, role=Role.USER, tenant="lab", user="alice@lab")
