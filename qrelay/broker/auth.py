"""Who is calling: tenant from the `authorization: Bearer <token>` metadata."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from qrelay.errors import Unauthenticated


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer ...` entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    return None


class Authenticator:
    """Maps bearer tokens to tenants; without tokens everyone is the default tenant."""

    def __init__(self, tokens: Mapping[str, str], default_tenant: str) -> None:
        self._tokens = dict(tokens)
        self.default_tenant = default_tenant

    @property
    def open_mode(self) -> bool:
        return not self._tokens

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        if self.open_mode:
            return self.default_tenant
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated(
                "this broker requires a bearer token: send metadata "
                "'authorization: Bearer <token>' (QRELAY_TOKEN on the client)"
            )
        for known, tenant in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        raise Unauthenticated("unknown bearer token")


def check_executor_token(
    expected: str | None, metadata: Iterable[tuple[str, str | bytes]] | None
) -> None:
    """ExecutorService.Connect requires the executor token when one is configured."""
    if expected is None:
        return
    token = bearer_token(metadata)
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthenticated(
            "executors must send 'authorization: Bearer <executor token>' "
            "(QRELAY_EXECUTOR_TOKEN on the broker and the executor)"
        )
