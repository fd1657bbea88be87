"""Shared fixtures: a real broker and real executors on loopback.

`stack` runs on the test's own event loop (for async tests and raw async
stubs); `sync_stack` runs on a background loop so that blocking SDK calls in
a sync test cannot deadlock the servers they talk to.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog

from qrelay.testing import LocalStack, local_stack, local_stack_in_thread

# The CLI run in-process (CliRunner) must not freeze this process's loggers: later
# tests capture log events with structlog.testing.capture_logs.
os.environ["QRELAY_LOG_CACHE"] = "0"

#: structlog as the test session found it: every test ends with it again, so a
#: test that ran the CLI in-process (which configures logging onto CliRunner's
#: stream, at the level its flags say) leaves nothing to the next one.
_STRUCTLOG_BASELINE = structlog.get_config()


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    yield
    structlog.configure(**_STRUCTLOG_BASELINE)


# Short lease/heartbeat so that failure tests finish quickly.
FAST_BROKER: dict[str, Any] = {"lease_ttl_s": 2.0, "heartbeat_interval_s": 0.25}
STACK_BACKENDS = ("aer", "fake_manila")


@asynccontextmanager
async def owned_stack(**kwargs: Any) -> AsyncIterator[LocalStack]:
    """`local_stack` entered and exited by one task that lives as long as the test.

    pytest-asyncio runs an async fixture's setup and teardown as different
    tasks, which anyio's cancel scopes inside `local_stack` refuse; a task that
    owns the stack for the fixture's lifetime sidesteps that.
    """
    ready = asyncio.Event()
    stop = asyncio.Event()
    holder: list[LocalStack] = []

    async def own() -> None:
        async with local_stack(**kwargs) as env:
            holder.append(env)
            ready.set()
            await stop.wait()

    owner = asyncio.create_task(own())
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({owner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not holder:
        waiter.cancel()
        await owner  # raises why the stack did not start
    try:
        yield holder[0]
    finally:
        stop.set()
        await owner


@pytest.fixture
async def stack() -> AsyncIterator[LocalStack]:
    async with owned_stack(backends=STACK_BACKENDS, broker=FAST_BROKER) as env:
        yield env


@pytest.fixture
def sync_stack() -> Iterator[LocalStack]:
    with local_stack_in_thread(backends=STACK_BACKENDS, broker=FAST_BROKER) as (env, _portal):
        yield env
