"""Shared fixtures: a real broker and real executors on loopback.

`stack` runs on the test's own event loop (for async tests and raw async
stubs); `sync_stack` runs on a background loop so that blocking SDK calls in
a sync test cannot deadlock the servers they talk to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from qrelay.testing import LocalStack, local_stack, local_stack_in_thread

# Short lease/heartbeat so that failure tests finish quickly.
FAST_BROKER: dict[str, Any] = {"lease_ttl_s": 2.0, "heartbeat_interval_s": 0.25}
STACK_BACKENDS = ("aer", "fake_manila")


@pytest.fixture
async def stack() -> AsyncIterator[LocalStack]:
    async with local_stack(backends=STACK_BACKENDS, broker=FAST_BROKER) as env:
        yield env


@pytest.fixture
def sync_stack() -> Iterator[LocalStack]:
    with local_stack_in_thread(backends=STACK_BACKENDS, broker=FAST_BROKER) as (env, _portal):
        yield env
