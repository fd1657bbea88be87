"""The audit helper drops secret-named fields and marks each line as audit."""

from __future__ import annotations

import structlog

from qrelay.broker.audit import audit


def test_audit_events_never_carry_secret_fields() -> None:
    with structlog.testing.capture_logs() as logs:
        audit("auth_failed", tenant="a", token="s3cret", method="/x")
    assert logs == [
        {
            "event": "audit.auth_failed",
            "audit": True,
            "tenant": "a",
            "method": "/x",
            "log_level": "warning",
        }
    ]
