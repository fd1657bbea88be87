"""Identity end to end on a real broker, over both stores: tokens from the store,
roles, revocation on the next call, tenant-restricted executors, audit events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qrelay._proto.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    backends_pb2,
    backends_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    types_pb2,
)
from qrelay.broker.identity import bootstrap_admin, lookup_prefix, new_token, token_digest
from qrelay.broker.server import Broker, running_broker
from qrelay.broker.store.base import Role, TokenRecord
from tests.broker.conftest import (
    FakeExecutor,
    auth,
    broker_settings,
    postgres_schema,
    sampler_spec,
    until,
)
from tests.broker.test_programs import upload_request

Code = grpc.StatusCode
KEY = "k" * 64


@dataclass
class Deployment:
    """A broker with identity in its store: an admin, tenants alice and bob."""

    broker: Broker
    channel: grpc.aio.Channel
    admin_token: str

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def jobs(self) -> jobs_pb2_grpc.JobServiceStub:
        return jobs_pb2_grpc.JobServiceStub(self.channel)

    @property
    def backends(self) -> backends_pb2_grpc.BackendServiceStub:
        return backends_pb2_grpc.BackendServiceStub(self.channel)

    async def token(self, role: int = admin_pb2.ROLE_USER, **fields: Any) -> tuple[str, str]:
        """A new token (id, secret) made through AdminService."""
        reply = await self.admin.CreateToken(
            admin_pb2.CreateTokenRequest(role=role, **fields), metadata=auth(self.admin_token)
        )
        return reply.token.id, reply.secret


@contextlib.asynccontextmanager
async def deployment(kind: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    async with contextlib.AsyncExitStack() as stack:
        extra: dict[str, Any] = {}
        if kind == "postgres":
            dsn, schema = await stack.enter_async_context(postgres_schema())
            extra = {"database_url": dsn, "database_schema": schema, "identity_key": KEY}
        broker = await stack.enter_async_context(running_broker(broker_settings(tmp_path, **extra)))
        assert broker.identity.key is not None
        _, admin_token = await bootstrap_admin(broker.store, broker.identity.key)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(broker.address))
        env = Deployment(broker, channel, admin_token)
        for name in ("alice", "bob"):
            await env.admin.CreateTenant(
                admin_pb2.CreateTenantRequest(name=name), metadata=auth(admin_token)
            )
        _, executor = await env.token(admin_pb2.ROLE_EXECUTOR, label="announcer")
        async with FakeExecutor(
            broker.address, "e-shared", backends=["aer"], heartbeat=False, metadata=auth(executor)
        ):
            pass  # "aer" is known, offline, served to any tenant
        await until(lambda: not broker.scheduler.executors)
        yield env


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Deployment]:
    async with deployment(request.param, tmp_path) as running:
        yield running


async def rpc_error(awaitable: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await awaitable  # type: ignore[misc]
    return err.value


def _list(env: Deployment, metadata: Any = ()) -> Any:
    return env.backends.List(backends_pb2.ListBackendsRequest(), metadata=metadata)


async def test_missing_malformed_and_unknown_tokens_are_unauthenticated(env: Deployment) -> None:
    cases = {
        "no token": (),
        "not bearer": (("authorization", "Basic YWxpY2U6cHc="),),
        "bearer without token": (("authorization", "Bearer "),),
        "unknown qrelay token": auth(new_token()),
        "right prefix, wrong secret": auth(env.admin_token[:12] + "x" * 43),
        "not a qrelay token": auth("tok-a"),
    }
    for case, metadata in cases.items():
        err = await rpc_error(_list(env, metadata))
        assert err.code() == Code.UNAUTHENTICATED, case
        assert err.details(), case
    _, secret = await env.token(tenant="alice")
    assert [b.info.name for b in (await _list(env, auth(secret))).backends] == ["aer"]


async def test_expired_token_is_refused(env: Deployment) -> None:
    secret = new_token()
    key = env.broker.identity.key
    assert key is not None
    await env.broker.store.create_token(
        TokenRecord(
            id="tok-old",
            prefix=lookup_prefix(secret),
            role=Role.USER,
            tenant="alice",
            executor_tenants=None,
            label="",
            created_at=time.time() - 60,
            expires_at=time.time() - 1,
            revoked_at=None,
            digest=token_digest(key, secret),
        )
    )
    err = await rpc_error(_list(env, auth(secret)))
    assert err.code() == Code.UNAUTHENTICATED
    assert "has expired" in (err.details() or "")


async def test_revoked_token_is_refused_on_its_next_call(env: Deployment) -> None:
    token_id, secret = await env.token(tenant="alice")
    job = await env.jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(secret))
    revoked = await env.admin.RevokeToken(
        admin_pb2.RevokeTokenRequest(token_id=token_id), metadata=auth(env.admin_token)
    )
    assert revoked.HasField("revoked_at")
    err = await rpc_error(
        env.jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth(secret))
    )
    assert err.code() == Code.UNAUTHENTICATED
    assert "was revoked" in (err.details() or "")


async def test_revocation_holds_on_another_replica_at_once(tmp_path: Path) -> None:
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
        token_id, secret = await one.token(tenant="alice")
        stub = backends_pb2_grpc.BackendServiceStub(channel)
        await stub.List(backends_pb2.ListBackendsRequest(), metadata=auth(secret))
        await one.admin.RevokeToken(
            admin_pb2.RevokeTokenRequest(token_id=token_id), metadata=auth(one.admin_token)
        )
        err = await rpc_error(stub.List(backends_pb2.ListBackendsRequest(), metadata=auth(secret)))
        assert err.code() == Code.UNAUTHENTICATED


async def test_user_token_cannot_connect_as_an_executor(env: Deployment) -> None:
    _, secret = await env.token(tenant="alice")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with FakeExecutor(env.broker.address, metadata=auth(secret)):
            pass
    assert err.value.code() == Code.PERMISSION_DENIED
    assert "ExecutorService is for executor tokens" in (err.value.details() or "")
    assert not env.broker.scheduler.executors


async def test_executor_token_cannot_use_the_tenant_services(env: Deployment) -> None:
    _, secret = await env.token(admin_pb2.ROLE_EXECUTOR)
    err = await rpc_error(
        env.jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(secret))
    )
    assert err.code() == Code.PERMISSION_DENIED
    async with FakeExecutor(env.broker.address, metadata=auth(secret)) as executor:
        assert executor.welcome is not None


async def test_admin_rpcs_are_refused_to_users(env: Deployment) -> None:
    _, secret = await env.token(tenant="alice")
    calls = [
        env.admin.CreateTenant(admin_pb2.CreateTenantRequest(name="eve"), metadata=auth(secret)),
        env.admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=auth(secret)),
        env.admin.CreateToken(
            admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ADMIN), metadata=auth(secret)
        ),
        env.admin.ListTokens(admin_pb2.ListTokensRequest(), metadata=auth(secret)),
        env.admin.RevokeToken(admin_pb2.RevokeTokenRequest(token_id="x"), metadata=auth(secret)),
    ]
    for call in calls:
        err = await rpc_error(call)
        assert err.code() == Code.PERMISSION_DENIED
        assert "needs an admin token" in (err.details() or "")
    listed = await env.admin.ListTenants(
        admin_pb2.ListTenantsRequest(), metadata=auth(env.admin_token)
    )
    assert [t.name for t in listed.tenants] == ["alice", "bob"]


async def test_admin_without_a_tenant_cannot_submit(env: Deployment) -> None:
    err = await rpc_error(
        env.jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(env.admin_token))
    )
    assert err.code() == Code.PERMISSION_DENIED


async def test_bad_admin_requests_get_clear_statuses(env: Deployment) -> None:
    admin = auth(env.admin_token)
    cases = [
        (admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_USER), Code.INVALID_ARGUMENT),
        (admin_pb2.CreateTokenRequest(), Code.INVALID_ARGUMENT),
        (
            admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_USER, tenant="nobody"),
            Code.NOT_FOUND,
        ),
        (
            admin_pb2.CreateTokenRequest(
                role=admin_pb2.ROLE_EXECUTOR, restricted=True, executor_tenants=["nobody"]
            ),
            Code.NOT_FOUND,
        ),
        (
            admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_USER, tenant="alice", ttl_s=-1),
            Code.INVALID_ARGUMENT,
        ),
    ]
    for request, code in cases:
        err = await rpc_error(env.admin.CreateToken(request, metadata=admin))
        assert err.code() == code, request
    err = await rpc_error(
        env.admin.CreateTenant(admin_pb2.CreateTenantRequest(name="alice"), metadata=admin)
    )
    assert err.code() == Code.ALREADY_EXISTS
    err = await rpc_error(
        env.admin.CreateTenant(admin_pb2.CreateTenantRequest(name="a b"), metadata=admin)
    )
    assert err.code() == Code.INVALID_ARGUMENT
    err = await rpc_error(
        env.admin.RevokeToken(admin_pb2.RevokeTokenRequest(token_id="tok-x"), metadata=admin)
    )
    assert err.code() == Code.NOT_FOUND


async def test_restricted_executor_never_receives_another_tenants_job(env: Deployment) -> None:
    _, alice = await env.token(tenant="alice")
    _, bob = await env.token(tenant="bob")
    _, runner = await env.token(
        admin_pb2.ROLE_EXECUTOR, restricted=True, executor_tenants=["alice"]
    )
    _, anyone = await env.token(admin_pb2.ROLE_EXECUTOR)
    async with FakeExecutor(
        env.broker.address, "e-any", backends=["qpu"], heartbeat=False, metadata=auth(anyone)
    ):
        pass  # "qpu" was announced for everyone; its queue holds both tenants' jobs
    await until(lambda: not env.broker.scheduler.executors)
    # Bob's job first: plain FIFO would hand it to the next executor first.
    bobs = await env.jobs.Submit(
        jobs_pb2.SubmitRequest(spec=sampler_spec("qpu")), metadata=auth(bob)
    )
    alices = await env.jobs.Submit(
        jobs_pb2.SubmitRequest(spec=sampler_spec("qpu")), metadata=auth(alice)
    )
    async with FakeExecutor(
        env.broker.address, "e-alice", backends=["qpu"], slots=2, metadata=auth(runner)
    ) as executor:
        assignment = await executor.recv("assignment")
        assert (assignment.job_id, assignment.tenant) == (alices.id, "alice")
        executor.finish(assignment)
        assert await env.broker.scheduler.dispatch() == 0, "a free slot, and still not bob's"
        job = await env.jobs.Get(jobs_pb2.GetJobRequest(job_id=bobs.id), metadata=auth(bob))
        assert job.state == types_pb2.JOB_STATE_QUEUED
    async with FakeExecutor(
        env.broker.address, "e-any", backends=["qpu"], metadata=auth(anyone)
    ) as unrestricted:
        assignment = await unrestricted.recv("assignment")
        assert (assignment.job_id, assignment.tenant) == (bobs.id, "bob")


async def test_a_tenant_sees_and_uses_only_backends_served_to_it(env: Deployment) -> None:
    _, alice = await env.token(tenant="alice")
    _, bob = await env.token(tenant="bob")
    _, runner = await env.token(
        admin_pb2.ROLE_EXECUTOR, restricted=True, executor_tenants=["alice"]
    )
    async with FakeExecutor(
        env.broker.address, "e-alice", backends=["qpu_alice"], metadata=auth(runner)
    ) as executor:
        seen = {b.info.name for b in (await _list(env, auth(alice))).backends}
        assert seen == {"aer", "qpu_alice"}
        seen = {b.info.name for b in (await _list(env, auth(bob))).backends}
        assert seen == {"aer"}
        mine = await env.backends.Get(
            backends_pb2.GetBackendRequest(name="qpu_alice"), metadata=auth(alice)
        )
        assert mine.online
        sessions = sessions_pb2_grpc.SessionServiceStub(env.channel)
        for call in (
            env.backends.Get(backends_pb2.GetBackendRequest(name="qpu_alice"), metadata=auth(bob)),
            env.jobs.Submit(
                jobs_pb2.SubmitRequest(spec=sampler_spec("qpu_alice")), metadata=auth(bob)
            ),
            sessions.Create(
                sessions_pb2.CreateSessionRequest(backend="qpu_alice"), metadata=auth(bob)
            ),
        ):
            err = await rpc_error(call)
            assert err.code() == Code.NOT_FOUND
            details = err.details() or ""
            assert details.startswith("unknown backend 'qpu_alice'; known: ")
            assert "qpu_alice" not in details.split("known:")[1], "no other tenant's names"
        job = await env.jobs.Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec("qpu_alice")), metadata=auth(alice)
        )
        assert (await executor.recv("assignment")).job_id == job.id


async def test_admin_tokens_list_without_secrets(env: Deployment) -> None:
    token_id, secret = await env.token(tenant="alice", label="alice's laptop", ttl_s=3600)
    listed = await env.admin.ListTokens(
        admin_pb2.ListTokensRequest(tenant="alice"), metadata=auth(env.admin_token)
    )
    (token,) = listed.tokens
    assert (token.id, token.prefix, token.label) == (token_id, secret[:12], "alice's laptop")
    assert token.HasField("expires_at")
    assert secret not in str(listed)
    everyone = await env.admin.ListTokens(
        admin_pb2.ListTokensRequest(), metadata=auth(env.admin_token)
    )
    assert len(everyone.tokens) == 3  # the bootstrap admin's and the announcer's too


async def test_bootstrap_refuses_a_second_admin_unless_forced(env: Deployment) -> None:
    from qrelay.errors import FailedPrecondition

    key = env.broker.identity.key
    assert key is not None
    with pytest.raises(FailedPrecondition, match="an admin token already exists"):
        await bootstrap_admin(env.broker.store, key)
    _, second = await bootstrap_admin(env.broker.store, key, force=True)
    listed = await env.admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=auth(second))
    assert len(listed.tenants) == 2


async def test_audit_events_for_identity_and_cross_tenant_denials(env: Deployment) -> None:
    secrets: list[str] = [env.admin_token]
    with structlog.testing.capture_logs() as logs:
        await env.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name="carol"), metadata=auth(env.admin_token)
        )
        token_id, alice = await env.token(tenant="alice")
        _, bob = await env.token(tenant="bob")
        secrets += [alice, bob]
        wrong = new_token()
        secrets.append(wrong)
        await rpc_error(_list(env, auth(wrong)))
        await rpc_error(env.admin.ListTokens(admin_pb2.ListTokensRequest(), metadata=auth(alice)))
        job = await env.jobs.Submit(
            jobs_pb2.SubmitRequest(spec=sampler_spec()), metadata=auth(alice)
        )
        sessions = sessions_pb2_grpc.SessionServiceStub(env.channel)
        session = await sessions.Create(
            sessions_pb2.CreateSessionRequest(backend="aer"), metadata=auth(alice)
        )
        # Bob asks for Alice's job and session: answered as if they did not exist.
        for call in (
            env.jobs.Get(jobs_pb2.GetJobRequest(job_id=job.id), metadata=auth(bob)),
            env.jobs.Cancel(jobs_pb2.CancelJobRequest(job_id=job.id), metadata=auth(bob)),
            sessions.Get(sessions_pb2.GetSessionRequest(session_id=session.id), metadata=auth(bob)),
        ):
            err = await rpc_error(call)
            assert err.code() == Code.NOT_FOUND
        programs = programs_pb2_grpc.ProgramServiceStub(env.channel)
        program = await programs.Upload(upload_request(), metadata=auth(alice))
        err = await rpc_error(
            programs.Get(programs_pb2.GetProgramRequest(program=program.id), metadata=auth(bob))
        )
        assert err.code() == Code.NOT_FOUND
        missing = await rpc_error(
            env.jobs.Get(jobs_pb2.GetJobRequest(job_id="j-nothere"), metadata=auth(bob))
        )
        assert missing.code() == Code.NOT_FOUND
        await env.admin.RevokeToken(
            admin_pb2.RevokeTokenRequest(token_id=token_id), metadata=auth(env.admin_token)
        )
        await rpc_error(_list(env, auth(alice)))
    events = [e for e in logs if e.get("audit")]
    names = [e["event"] for e in events]
    assert names.count("audit.tenant.created") == 1
    assert names.count("audit.token.created") == 2  # alice's and bob's
    assert names.count("audit.token.revoked") == 1
    assert names.count("audit.auth.failed") == 2  # the unknown token, the revoked one
    assert names.count("audit.auth.denied") == 1  # alice on AdminService
    denials = [e for e in events if e["event"] == "audit.cross_tenant.denied"]
    assert sorted((e["kind"], e["tenant"], e["owner"]) for e in denials) == [
        ("job", "bob", "alice"),
        ("job", "bob", "alice"),
        ("program", "bob", "alice"),
        ("session", "bob", "alice"),
    ], "one per foreign object asked for; none for a missing one"
    text = repr(logs)
    for secret in secrets:
        assert secret not in text


async def test_health_answers_probes_without_a_token_and_reflection_needs_one(
    env: Deployment,
) -> None:
    health = health_pb2_grpc.HealthStub(env.channel)
    for service in ("", "qrelay.v1.JobService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest())
    err = await rpc_error(watch.read())
    assert err.code() == Code.UNAUTHENTICATED
    _, secret = await env.token(tenant="alice")
    # With a token, health is the standard service (which reads the request).
    err = await rpc_error(
        health.Check(
            health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=auth(secret)
        )
    )
    assert err.code() == Code.NOT_FOUND
    reflect = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    err = await rpc_error(reflect.ServerReflectionInfo(iter([request])).read())
    assert err.code() == Code.UNAUTHENTICATED
    reply = await reflect.ServerReflectionInfo(iter([request]), metadata=auth(secret)).read()
    names = {s.name for s in reply.list_services_response.service}
    assert "qrelay.v1.AdminService" in names


async def test_an_open_broker_closes_once_a_token_is_bootstrapped(tmp_path: Path) -> None:
    async with (
        running_broker(broker_settings(tmp_path)) as broker,
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        stub = backends_pb2_grpc.BackendServiceStub(channel)
        await stub.List(backends_pb2.ListBackendsRequest())  # open: anyone is "default"
        assert broker.identity.key is not None
        _, admin = await bootstrap_admin(broker.store, broker.identity.key)  # out of band

        async def code() -> grpc.StatusCode:
            try:
                await stub.List(backends_pb2.ListBackendsRequest())
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return Code.OK

        async with asyncio.timeout(10):  # the "no token yet" cache lives <= 1 s
            answered = await code()
            while answered == Code.OK:
                await asyncio.sleep(0.05)
                answered = await code()
        assert answered == Code.UNAUTHENTICATED
        admin_stub = admin_pb2_grpc.AdminServiceStub(channel)
        await admin_stub.ListTenants(admin_pb2.ListTenantsRequest(), metadata=auth(admin))
