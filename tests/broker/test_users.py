"""Users in the identity store, end to end on real brokers over both stores: user
tokens, role ceilings, disabling (on the next call, also on another replica),
clear statuses for bad requests, and audit lines that name the user."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import structlog

from qrelay._proto.v1 import (
    admin_pb2,
    backends_pb2,
    backends_pb2_grpc,
    jobs_pb2,
)
from qrelay.broker.server import running_broker
from tests.broker.conftest import auth, broker_settings, sampler_spec
from tests.broker.test_identity import KEY, Deployment, deployment, env, rpc_error

__all__ = ["env"]  # the two-store fixture, shared with test_identity

Code = grpc.StatusCode


async def make_user(
    env: Deployment, name: str, tenant: str, role: int = admin_pb2.ROLE_USER
) -> admin_pb2.User:
    return await env.admin.CreateUser(
        admin_pb2.CreateUserRequest(name=name, tenant=tenant, role=role),
        metadata=auth(env.admin_token),
    )


async def disable(env: Deployment, name: str, tenant: str) -> admin_pb2.User:
    return await env.admin.DisableUser(
        admin_pb2.DisableUserRequest(name=name, tenant=tenant), metadata=auth(env.admin_token)
    )


def _list(stub: backends_pb2_grpc.BackendServiceStub, secret: str) -> Any:
    return stub.List(backends_pb2.ListBackendsRequest(), metadata=auth(secret))


async def test_a_user_token_names_its_user_and_acts_as_its_tenant(env: Deployment) -> None:
    user = await make_user(env, "alice@lab", "alice")
    assert (user.name, user.tenant, user.role) == ("alice@lab", "alice", admin_pb2.ROLE_USER)
    assert not user.HasField("disabled_at")
    token_id, secret = await env.token(tenant="alice", user="alice@lab", label="laptop")
    job = await env.jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(secret))
    listed = await env.jobs.List(jobs_pb2.ListJobsRequest(), metadata=auth(secret))
    assert [j.id for j in listed.jobs] == [job.id]
    tokens = await env.admin.ListTokens(
        admin_pb2.ListTokensRequest(tenant="alice"), metadata=auth(env.admin_token)
    )
    assert [(t.id, t.user, t.tenant) for t in tokens.tokens] == [(token_id, "alice@lab", "alice")]
    everyone = await env.admin.ListTokens(
        admin_pb2.ListTokensRequest(), metadata=auth(env.admin_token)
    )
    assert sorted(t.user for t in everyone.tokens) == ["", "", "alice@lab"], (
        "the bootstrap admin's and the executor's tokens belong to no user"
    )


async def test_a_disabled_users_tokens_are_refused_on_their_next_call(env: Deployment) -> None:
    await make_user(env, "alice@lab", "alice")
    await make_user(env, "carol@lab", "alice")
    _, first = await env.token(tenant="alice", user="alice@lab")
    _, second = await env.token(tenant="alice", user="alice@lab")
    _, carols = await env.token(tenant="alice", user="carol@lab")
    _, nobodys = await env.token(tenant="alice")
    job = await env.jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(first))
    disabled = await disable(env, "alice@lab", "alice")
    assert disabled.HasField("disabled_at")
    for secret in (first, second):
        err = await rpc_error(
            env.jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth(secret))
        )
        assert err.code() == Code.UNAUTHENTICATED
        assert "belongs to user 'alice@lab', which is disabled" in (err.details() or "")
        assert secret not in (err.details() or "")
    for secret in (carols, nobodys):  # the tenant's other tokens keep working
        got = await env.jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth(secret))
        assert got.id == job.id
    err = await rpc_error(env.token(tenant="alice", user="alice@lab"))
    assert err.code() == Code.FAILED_PRECONDITION
    assert "user 'alice@lab' of tenant 'alice' is disabled" in (err.details() or "")
    again = await disable(env, "alice@lab", "alice")
    assert again.disabled_at == disabled.disabled_at, "disabling twice keeps the first time"
    users = await env.admin.ListUsers(
        admin_pb2.ListUsersRequest(tenant="alice"), metadata=auth(env.admin_token)
    )
    assert [(u.name, u.HasField("disabled_at")) for u in users.users] == [
        ("alice@lab", True),
        ("carol@lab", False),
    ]


async def test_disabling_a_user_holds_on_another_replica_at_once(tmp_path: Path) -> None:
    async with (
        deployment("postgres", tmp_path / "one") as one,
        running_broker(
            broker_settings(
                tmp_path / "two",
                database_url=one.broker.settings.database_url,
                database_schema=one.broker.settings.database_schema,
                identity_key=KEY,
            )
        ) as two,
        grpc.aio.insecure_channel(two.address) as channel,
    ):
        await make_user(one, "alice@lab", "alice")
        _, secret = await one.token(tenant="alice", user="alice@lab")
        stub = backends_pb2_grpc.BackendServiceStub(channel)
        await _list(stub, secret)  # replica two admits it
        await disable(one, "alice@lab", "alice")  # through replica one
        err = await rpc_error(_list(stub, secret))
        assert err.code() == Code.UNAUTHENTICATED
        assert "disabled" in (err.details() or "")


async def test_a_users_role_is_the_ceiling_of_its_tokens(env: Deployment) -> None:
    await make_user(env, "alice@lab", "alice")
    err = await rpc_error(env.token(admin_pb2.ROLE_ADMIN, tenant="alice", user="alice@lab"))
    assert err.code() == Code.PERMISSION_DENIED
    assert "role ceiling user: it cannot hold an admin token" in (err.details() or "")
    admins = await env.admin.ListTokens(
        admin_pb2.ListTokensRequest(tenant="alice"), metadata=auth(env.admin_token)
    )
    assert list(admins.tokens) == [], "nothing was made"
    await make_user(env, "root@lab", "alice", admin_pb2.ROLE_ADMIN)
    _, admin = await env.token(admin_pb2.ROLE_ADMIN, tenant="alice", user="root@lab")
    listed = await env.admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=auth(admin))
    assert [t.name for t in listed.tenants] == ["alice", "bob"]
    job = await env.jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(admin))
    got = await env.jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth(admin))
    assert got.id == job.id, "an admin user's token acts as the user's tenant"
    _, plain = await env.token(tenant="alice", user="root@lab")  # below the ceiling is fine
    await env.jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth(plain))
    err = await rpc_error(
        env.admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=auth(plain))
    )
    assert err.code() == Code.PERMISSION_DENIED, "a user token of an admin user is still a user's"


async def test_unknown_users_and_tenants_are_not_found(env: Deployment) -> None:
    await make_user(env, "alice@lab", "alice")
    admin = auth(env.admin_token)
    cases = [
        ("token for an unknown user", env.token(tenant="alice", user="nobody@lab")),
        ("token naming another tenant", env.token(tenant="bob", user="alice@lab")),
        ("token naming an unknown tenant", env.token(tenant="nowhere", user="alice@lab")),
        (
            "user in an unknown tenant",
            env.admin.CreateUser(
                admin_pb2.CreateUserRequest(name="x@lab", tenant="nowhere"), metadata=admin
            ),
        ),
        (
            "disable an unknown user",
            env.admin.DisableUser(
                admin_pb2.DisableUserRequest(name="nobody@lab", tenant="alice"), metadata=admin
            ),
        ),
        (
            "disable in another tenant",
            env.admin.DisableUser(
                admin_pb2.DisableUserRequest(name="alice@lab", tenant="bob"), metadata=admin
            ),
        ),
    ]
    for case, call in cases:
        err = await rpc_error(call)
        assert err.code() == Code.NOT_FOUND, case
        assert "not found" in (err.details() or ""), case
    users = await env.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=admin)
    assert [(u.tenant, u.name, u.HasField("disabled_at")) for u in users.users] == [
        ("alice", "alice@lab", False)
    ]


async def test_user_names_are_unique_within_a_tenant_only(env: Deployment) -> None:
    await make_user(env, "sam@lab", "alice")
    err = await rpc_error(make_user(env, "sam@lab", "alice", admin_pb2.ROLE_ADMIN))
    assert err.code() == Code.ALREADY_EXISTS
    assert "user 'sam@lab' already exists in tenant 'alice'" in (err.details() or "")
    await make_user(env, "sam@lab", "bob")
    _, alices_sam = await env.token(tenant="alice", user="sam@lab")
    _, bobs_sam = await env.token(tenant="bob", user="sam@lab")
    await disable(env, "sam@lab", "bob")
    stub = env.backends
    err = await rpc_error(_list(stub, bobs_sam))
    assert err.code() == Code.UNAUTHENTICATED
    await _list(stub, alices_sam)  # alice's sam is another user
    for tenant, expected in (("alice", ["sam@lab"]), ("bob", ["sam@lab"]), ("", ["sam@lab"] * 2)):
        users = await env.admin.ListUsers(
            admin_pb2.ListUsersRequest(tenant=tenant), metadata=auth(env.admin_token)
        )
        assert [u.name for u in users.users] == expected, tenant
    users = await env.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=auth(env.admin_token))
    assert [(u.tenant, u.role) for u in users.users] == [
        ("alice", admin_pb2.ROLE_USER),
        ("bob", admin_pb2.ROLE_USER),
    ]


async def test_bad_user_requests_are_invalid_argument(env: Deployment) -> None:
    await make_user(env, "alice@lab", "alice")
    admin = auth(env.admin_token)

    def create(name: str, tenant: str = "alice", role: int = 0) -> Any:
        return env.admin.CreateUser(
            admin_pb2.CreateUserRequest(name=name, tenant=tenant, role=role), metadata=admin
        )

    cases = [
        ("empty name", create("")),
        ("space", create("alice smith")),
        ("NUL", create("a\x00b@lab")),
        ("control character", create("a\tb")),
        ("overlong", create("u" * 129)),
        ("no tenant", create("dave@lab", "")),
        ("bad tenant", create("dave@lab", "a b")),
        ("executor ceiling", create("dave@lab", role=admin_pb2.ROLE_EXECUTOR)),
        ("unknown role", create("dave@lab", role=99)),
        ("executor token of a user", env.token(admin_pb2.ROLE_EXECUTOR, user="alice@lab")),
        ("user token without its tenant", env.token(user="alice@lab")),
        ("token for a NUL user", env.token(tenant="alice", user="al\x00ice")),
        ("token for an overlong user", env.token(tenant="alice", user="u" * 200)),
        (
            "disable without a tenant",
            env.admin.DisableUser(admin_pb2.DisableUserRequest(name="alice@lab"), metadata=admin),
        ),
        (
            "disable a bad name",
            env.admin.DisableUser(
                admin_pb2.DisableUserRequest(name="x" * 500, tenant="alice"), metadata=admin
            ),
        ),
        (
            "list a bad tenant",
            env.admin.ListUsers(admin_pb2.ListUsersRequest(tenant="a/b"), metadata=admin),
        ),
    ]
    for case, call in cases:
        err = await rpc_error(call)
        assert err.code() == Code.INVALID_ARGUMENT, case
        details = err.details() or ""
        assert details, case
        assert len(details) < 600, case  # an overlong name is not echoed whole
    made = await create("u" * 128)  # the longest name allowed
    assert made.name == "u" * 128
    made = await create("ci+nightly.build-1_x@lab.example")
    assert made.role == admin_pb2.ROLE_USER, "an unspecified role ceiling is user"
    users = await env.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=admin)
    assert len(users.users) == 3, "no refused request made a user"


async def test_users_rpcs_are_for_admins_only(env: Deployment) -> None:
    await make_user(env, "alice@lab", "alice")
    _, secret = await env.token(tenant="alice", user="alice@lab")
    user = auth(secret)
    for call in (
        env.admin.CreateUser(
            admin_pb2.CreateUserRequest(name="eve", tenant="alice", role=admin_pb2.ROLE_ADMIN),
            metadata=user,
        ),
        env.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=user),
        env.admin.DisableUser(
            admin_pb2.DisableUserRequest(name="alice@lab", tenant="alice"), metadata=user
        ),
    ):
        err = await rpc_error(call)
        assert err.code() == Code.PERMISSION_DENIED
        assert "needs an admin token" in (err.details() or "")
    await _list(env.backends, secret)  # not disabled by its own attempt


async def test_audit_lines_name_the_user_never_a_secret(env: Deployment) -> None:
    secrets = [env.admin_token]
    # merge_contextvars as the broker's logging has it: the user bound to a call
    # reaches every line logged while serving it.
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        await make_user(env, "root@lab", "alice", admin_pb2.ROLE_ADMIN)
        _, root = await env.token(admin_pb2.ROLE_ADMIN, tenant="alice", user="root@lab")
        secrets.append(root)
        created = await env.admin.CreateUser(
            admin_pb2.CreateUserRequest(name="alice@lab", tenant="alice"), metadata=auth(root)
        )
        assert created.name == "alice@lab"
        made = await env.admin.CreateToken(
            admin_pb2.CreateTokenRequest(
                role=admin_pb2.ROLE_USER, tenant="alice", user="alice@lab"
            ),
            metadata=auth(root),
        )
        alice = made.secret
        secrets.append(alice)
        _, bob = await env.token(tenant="bob")
        secrets.append(bob)
        bobs_job = await env.jobs.Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(bob)
        )
        err = await rpc_error(  # alice asks for bob's job
            env.jobs.Get(jobs_pb2.GetJobRequest(job_id=bobs_job.id), metadata=auth(alice))
        )
        assert err.code() == Code.NOT_FOUND
        await rpc_error(env.admin.ListUsers(admin_pb2.ListUsersRequest(), metadata=auth(alice)))
        await env.admin.DisableUser(
            admin_pb2.DisableUserRequest(name="alice@lab", tenant="alice"), metadata=auth(root)
        )
        await rpc_error(_list(env.backends, alice))
    events = [e for e in logs if e.get("audit")]

    def one(name: str, **fields: Any) -> dict[str, Any]:
        found = [
            e
            for e in events
            if e["event"] == name and all(e.get(k) == v for k, v in fields.items())
        ]
        assert len(found) == 1, (name, fields, events)
        return found[0]

    one("audit.user.created", tenant="alice", user="root@lab", role="admin", by_user=None)
    one("audit.user.created", tenant="alice", user="alice@lab", role="user", by_user="root@lab")
    one("audit.token.created", tenant="alice", user="alice@lab", by_user="root@lab")
    one("audit.cross_tenant.denied", tenant="alice", owner="bob", user="alice@lab")
    one("audit.auth.denied", tenant="alice", user="alice@lab")
    one("audit.user.disabled", tenant="alice", user="alice@lab", by_user="root@lab")
    failed = one("audit.auth.failed", user="alice@lab")
    assert failed["tenant"] == "alice"
    assert failed["prefix"] == alice[:12]
    (bobs,) = [e for e in logs if e["event"] == "job.submitted" and e["job_id"] == bobs_job.id]
    assert "user" not in bobs, "a call by a token of no user names no user"
    text = repr(logs)
    for secret in secrets:
        assert secret not in text
