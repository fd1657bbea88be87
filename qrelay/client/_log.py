"""Logging for the SDK, which runs inside other people's programs.

Servers configure structlog for themselves (`qrelay.logging`); a library
must not print into a user's script or notebook unless asked. SDK events go
through the stdlib `logging` module (logger `qrelay.client.*`), so nothing
below WARNING appears until the application configures logging, e.g.
`logging.basicConfig(level=logging.INFO)` or `qrelay.logging.configure_logging()`.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog


def get_logger(name: str) -> Any:
    """A structlog logger that renders `event key=value ...` into stdlib logging."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
        ],
    )
