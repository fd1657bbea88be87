"""`qrelay admin tenant create|list`, `qrelay admin user create|list|disable`,
`qrelay admin token create|revoke|list` (AdminService, with an admin token)
and `qrelay admin bootstrap` (the first admin token, written straight into
the store).

A token's secret is printed once (or written to `--out`, mode 0600) and never
again: the broker keeps only its HMAC.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.table import Table

from qrelay._proto.v1 import admin_pb2, admin_pb2_grpc
from qrelay.cli._shared import (
    BrokerAddr,
    Token,
    Typer,
    _fail,
    _run,
    _service,
    _ts,
    console,
    err_console,
    refuse_secret_flag,
)

admin_app = Typer(
    help="Tenants, users and API tokens (needs an admin token); `bootstrap` makes the first.",
    no_args_is_help=True,
)
tenant_app = Typer(help="Create and list tenants.", no_args_is_help=True)
user_app = Typer(
    help="Create, list and disable users (the holders of tokens).", no_args_is_help=True
)
token_app = Typer(help="Create, revoke and list API tokens.", no_args_is_help=True)
admin_app.add_typer(tenant_app, name="tenant")
admin_app.add_typer(user_app, name="user")
admin_app.add_typer(token_app, name="token")

_ROLES = {
    "admin": admin_pb2.ROLE_ADMIN,
    "user": admin_pb2.ROLE_USER,
    "executor": admin_pb2.ROLE_EXECUTOR,
}
_ROLE_NAMES = {number: name for name, number in _ROLES.items()}

Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Write the new token to this file (created with mode 0600) instead of printing it.",
    ),
]


async def _admin(broker: str, token: Path | None, method: str, request: Any) -> Any:
    async with _service(broker, token) as service:
        connection = service.connection
        stub = admin_pb2_grpc.AdminServiceStub(connection.channel)
        return await connection.unary(getattr(stub, method), request)


def _check_out(out: Path | None) -> None:
    """Refuse an --out that exists before a token is made (it would be lost)."""
    if out is not None and (out.exists() or out.is_symlink()):
        _fail(f"--out {out} already exists; a token file is never overwritten", 2)


def _deliver(secret: str, token_id: str, out: Path | None) -> None:
    """Show the secret once: on stdout, or only in `out` (0600)."""
    if out is None:
        console.print(f"token {token_id} (shown once, keep it secret):")
        print(secret)  # plain, so that `... | tail -1 > file` works
        return
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        _fail(f"cannot create --out {out}: {exc.strerror or exc} (it must not exist yet)", 2)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    console.print(f"token {token_id} written to {out} (mode 0600)")


def _print_tokens(tokens: list[admin_pb2.ApiToken]) -> None:
    table = Table(title="API tokens")
    for column in (
        "id",
        "prefix",
        "role",
        "tenant",
        "user",
        "executor tenants",
        "label",
        "created",
    ):
        table.add_column(column, no_wrap=column in ("id", "prefix", "user"))
    table.add_column("expires")
    table.add_column("revoked")
    for t in tokens:
        serves = "any" if t.role == admin_pb2.ROLE_EXECUTOR else ""
        table.add_row(
            t.id,
            t.prefix + "…",
            _ROLE_NAMES.get(t.role, str(t.role)),
            t.tenant,
            t.user,
            ", ".join(t.executor_tenants) if t.restricted else serves,
            t.label,
            _ts(t.created_at),
            _ts(t.expires_at) if t.HasField("expires_at") else "never",
            _ts(t.revoked_at) if t.HasField("revoked_at") else "",
        )
    console.print(table)


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(help="Tenant name: letters, digits, '-', '_', '.'.")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Create a tenant."""
    request = admin_pb2.CreateTenantRequest(name=name, description=description)
    tenant = _run(lambda: _admin(broker, token, "CreateTenant", request))
    console.print(f"tenant {tenant.name} created")


@tenant_app.command("list")
def tenant_list(broker: BrokerAddr = "127.0.0.1:50051", token: Token = None) -> None:
    """List tenants."""
    reply = _run(lambda: _admin(broker, token, "ListTenants", admin_pb2.ListTenantsRequest()))
    table = Table(title="tenants")
    for column in ("name", "description", "created"):
        table.add_column(column)
    for t in reply.tenants:
        table.add_row(t.name, t.description, _ts(t.created_at))
    console.print(table)


_USER_ROLES = ("user", "admin")


@user_app.command("create")
def user_create(
    name: Annotated[str, typer.Argument(help="User name, unique in its tenant (e.g. alice@lab).")],
    tenant: Annotated[str, typer.Option(help="The user's tenant (must exist).")],
    role: Annotated[
        str, typer.Option(help="The ceiling of the user's tokens: user or admin.")
    ] = "user",
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Create a user of a tenant; make its tokens with `token create --user`."""
    if role not in _USER_ROLES:
        _fail(f"--role must be user or admin, got {role!r}", 2)
    request = admin_pb2.CreateUserRequest(name=name, tenant=tenant, role=_ROLES[role])
    user = _run(lambda: _admin(broker, token, "CreateUser", request))
    console.print(f"user {user.name} of tenant {user.tenant} created (role {role})")


@user_app.command("list")
def user_list(
    tenant: Annotated[str, typer.Option(help="Only this tenant's users.")] = "",
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """List users (disabled ones too, with the time they were disabled)."""
    request = admin_pb2.ListUsersRequest(tenant=tenant)
    reply = _run(lambda: _admin(broker, token, "ListUsers", request))
    table = Table(title="users")
    for column in ("tenant", "name", "role", "created", "disabled"):
        table.add_column(column, no_wrap=column == "name")
    for u in reply.users:
        table.add_row(
            u.tenant,
            u.name,
            _ROLE_NAMES.get(u.role, str(u.role)),
            _ts(u.created_at),
            _ts(u.disabled_at) if u.HasField("disabled_at") else "",
        )
    console.print(table)


@user_app.command("disable")
def user_disable(
    name: Annotated[str, typer.Argument(help="The user's name.")],
    tenant: Annotated[str, typer.Option(help="The user's tenant.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Disable a user: all its tokens are refused from their next call, on every replica."""
    request = admin_pb2.DisableUserRequest(name=name, tenant=tenant)
    user = _run(lambda: _admin(broker, token, "DisableUser", request))
    console.print(f"user {user.name} of tenant {user.tenant} disabled; its tokens are refused")


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="admin, user or executor.")] = "user",
    tenant: Annotated[
        str, typer.Option(help="The tenant of a user (or admin) token; with --user, the user's.")
    ] = "",
    user: Annotated[
        str,
        typer.Option(
            help="Make the token this user's (see `admin user create`); needs --tenant.",
        ),
    ] = "",
    executor_tenant: Annotated[
        list[str] | None,
        typer.Option(
            "--executor-tenant",
            help="Restrict an executor token to this tenant's jobs (repeat for several).",
        ),
    ] = None,
    label: Annotated[str, typer.Option(help="Who holds the token (shown in lists).")] = "",
    ttl_s: Annotated[
        float | None, typer.Option("--ttl-s", help="Expire after this many seconds.")
    ] = None,
    out: Out = None,
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Create an API token; its secret is shown once."""
    if role not in _ROLES:
        _fail(f"--role must be one of {', '.join(_ROLES)}, got {role!r}", 2)
    _check_out(out)
    request = admin_pb2.CreateTokenRequest(
        role=_ROLES[role],
        tenant=tenant,
        executor_tenants=executor_tenant or [],
        restricted=bool(executor_tenant),
        label=label,
        ttl_s=ttl_s or 0.0,
        user=user,
    )
    reply = _run(lambda: _admin(broker, token, "CreateToken", request))
    _deliver(reply.secret, reply.token.id, out)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (tok-…), from `token list`.")],
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """Revoke a token: its next call is refused, on every broker replica."""
    request = admin_pb2.RevokeTokenRequest(token_id=token_id)
    revoked = _run(lambda: _admin(broker, token, "RevokeToken", request))
    console.print(f"token {revoked.id} ({revoked.prefix}…) revoked")


@token_app.command("list")
def token_list(
    tenant: Annotated[str, typer.Option(help="Only this tenant's tokens.")] = "",
    broker: BrokerAddr = "127.0.0.1:50051",
    token: Token = None,
) -> None:
    """List tokens (ids and lookup prefixes, never secrets)."""
    request = admin_pb2.ListTokensRequest(tenant=tenant)
    _print_tokens(list(_run(lambda: _admin(broker, token, "ListTokens", request)).tokens))


@admin_app.command("bootstrap")
def bootstrap(
    store: Annotated[
        str | None,
        typer.Option(
            help=(
                "The broker's store: a SQLite file path or a postgresql:// URL without a "
                "password (default: QRELAY_DATABASE_URL, else QRELAY_DB_PATH, as the broker)."
            )
        ),
    ] = None,
    schema: Annotated[
        str | None, typer.Option(help="PostgreSQL schema (default QRELAY_DATABASE_SCHEMA).")
    ] = None,
    label: Annotated[str, typer.Option(help="Label of the token.")] = "bootstrap",
    force: Annotated[
        bool, typer.Option(help="Make another admin token even if a live one exists.")
    ] = False,
    out: Out = None,
) -> None:
    """Write the first admin token straight into the broker's store and show it once.

    Run it where the broker's store and identity key are (the same
    QRELAY_IDENTITY_KEY_FILE as the broker; with SQLite, identity.key beside
    the database is made if absent). Refused while a live admin token exists,
    unless --force.
    """
    from qrelay.broker.settings import BrokerSettings

    _check_out(out)
    overrides: dict[str, Any] = {}
    if store is not None:
        if store.startswith(("postgresql://", "postgres://")):
            if urlsplit(store).password:
                refuse_secret_flag("--store", "QRELAY_DATABASE_URL for a URL with a password")
            overrides["database_url"] = store
        else:
            overrides["db_path"] = Path(store)
            overrides["database_url"] = None
    if schema is not None:
        overrides["database_schema"] = schema

    async def make() -> tuple[str, str]:
        from qrelay.broker.identity import bootstrap_admin, load_server_key
        from qrelay.broker.store import open_store
        from qrelay.errors import FailedPrecondition

        settings = BrokerSettings(**overrides)
        key = load_server_key(settings)
        if key is None:
            raise FailedPrecondition(
                "no identity key: set QRELAY_IDENTITY_KEY_FILE (the broker's) to bootstrap "
                "a PostgreSQL store"
            )
        opened = open_store(settings)
        await opened.open()
        try:
            record, secret = await bootstrap_admin(opened, key, label=label, force=force)
        finally:
            await opened.close()
        err_console.print(f"admin token {record.id} written to {opened.describe()}")
        return record.id, secret

    token_id, secret = _run(make)
    _deliver(secret, token_id, out)
