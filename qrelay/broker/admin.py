"""AdminService: tenants, users and API tokens (admin tokens only; the
interceptor checks the role). Thin: decode, call `Identity`, encode."""

from __future__ import annotations

from typing import Any, TypeAlias

from qrelay._proto.v1 import admin_pb2, admin_pb2_grpc
from qrelay.broker.auth import caller
from qrelay.broker.events import timestamp
from qrelay.broker.identity import Identity
from qrelay.broker.store.base import Role, TenantRecord, TokenRecord, UserRecord
from qrelay.errors import InvalidArgument
from qrelay.rpc import grpc_errors

Context: TypeAlias = Any

_ROLES = {
    admin_pb2.ROLE_ADMIN: Role.ADMIN,
    admin_pb2.ROLE_USER: Role.USER,
    admin_pb2.ROLE_EXECUTOR: Role.EXECUTOR,
}
_ROLE_NUMBERS = {role: number for number, role in _ROLES.items()}


def tenant_to_proto(record: TenantRecord) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(
        name=record.name, description=record.description, created_at=timestamp(record.created_at)
    )


def token_to_proto(record: TokenRecord) -> admin_pb2.ApiToken:
    message = admin_pb2.ApiToken(
        id=record.id,
        prefix=record.prefix,
        role=_ROLE_NUMBERS[record.role],
        tenant=record.tenant,
        executor_tenants=list(record.executor_tenants or ()),
        restricted=record.executor_tenants is not None,
        label=record.label,
        created_at=timestamp(record.created_at),
        user=record.user or "",
    )
    if record.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(record.expires_at))
    if record.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(record.revoked_at))
    return message


def user_to_proto(record: UserRecord) -> admin_pb2.User:
    message = admin_pb2.User(
        name=record.name,
        tenant=record.tenant,
        role=_ROLE_NUMBERS[record.role],
        created_at=timestamp(record.created_at),
    )
    if record.disabled_at is not None:
        message.disabled_at.CopyFrom(timestamp(record.disabled_at))
    return message


def _role(number: admin_pb2.Role.ValueType) -> Role:
    role = _ROLES.get(number)
    if role is None:
        raise InvalidArgument(
            f"role {number} is not one of ROLE_ADMIN=1, ROLE_USER=2, ROLE_EXECUTOR=3"
        )
    return role


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    @grpc_errors
    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: Context
    ) -> admin_pb2.Tenant:
        record = await self.identity.create_tenant(caller(), request.name, request.description)
        return tenant_to_proto(record)

    @grpc_errors
    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: Context
    ) -> admin_pb2.ListTenantsResponse:
        records = await self.identity.list_tenants()
        return admin_pb2.ListTenantsResponse(tenants=[tenant_to_proto(r) for r in records])

    @grpc_errors
    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Context
    ) -> admin_pb2.CreateTokenResponse:
        role = _role(request.role)
        if request.executor_tenants and not request.restricted:
            raise InvalidArgument("executor_tenants needs restricted=true")
        record, secret = await self.identity.create_token(
            caller(),
            role=role,
            tenant=request.tenant,
            executor_tenants=list(request.executor_tenants) if request.restricted else None,
            label=request.label,
            ttl_s=request.ttl_s or None,
            user=request.user,
        )
        return admin_pb2.CreateTokenResponse(token=token_to_proto(record), secret=secret)

    @grpc_errors
    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: Context
    ) -> admin_pb2.ApiToken:
        return token_to_proto(await self.identity.revoke_token(caller(), request.token_id))

    @grpc_errors
    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Context
    ) -> admin_pb2.ListTokensResponse:
        records = await self.identity.list_tokens(request.tenant)
        return admin_pb2.ListTokensResponse(tokens=[token_to_proto(r) for r in records])

    @grpc_errors
    async def CreateUser(
        self, request: admin_pb2.CreateUserRequest, context: Context
    ) -> admin_pb2.User:
        role = Role.USER if request.role == admin_pb2.ROLE_UNSPECIFIED else _role(request.role)
        record = await self.identity.create_user(
            caller(), tenant=request.tenant, name=request.name, role=role
        )
        return user_to_proto(record)

    @grpc_errors
    async def ListUsers(
        self, request: admin_pb2.ListUsersRequest, context: Context
    ) -> admin_pb2.ListUsersResponse:
        records = await self.identity.list_users(request.tenant)
        return admin_pb2.ListUsersResponse(users=[user_to_proto(r) for r in records])

    @grpc_errors
    async def DisableUser(
        self, request: admin_pb2.DisableUserRequest, context: Context
    ) -> admin_pb2.User:
        record = await self.identity.disable_user(
            caller(), tenant=request.tenant, name=request.name
        )
        return user_to_proto(record)
