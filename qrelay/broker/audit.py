"""Audit events: one structlog line per security-relevant decision, never a secret.

Every authentication failure, token change, cross-tenant denial and quota
refusal goes through `audit()`, so an operator can follow them with one
filter (`logger == "qrelay.audit"`) whatever else the broker logs.
"""

from __future__ import annotations

from typing import Any

import structlog

# Field names that must never reach an audit line, whatever a caller passes.
_SECRET_FIELDS = frozenset({"token", "secret", "password", "authorization"})


def audit(event: str, **fields: Any) -> None:
    """Log one audit event (`audit.<event>`) at warning level with its fields.

    Fields named like secrets are dropped rather than trusted to callers.
    """
    safe = {k: v for k, v in fields.items() if k.lower() not in _SECRET_FIELDS}
    # Looked up per event, not cached in the module: audit lines follow the
    # logging configured now, even after a process cached its loggers.
    structlog.get_logger("qrelay.audit").warning(f"audit.{event}", audit=True, **safe)
