"""Fixtures the executor tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from qrelay._proto.v1 import jobs_pb2_grpc


@pytest.fixture
async def jobs_stub(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Filled in by tests through `connect`; closes every channel it opened."""
    channels: list[grpc.aio.Channel] = []

    def connect(address: str) -> jobs_pb2_grpc.JobServiceStub:
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        return jobs_pb2_grpc.JobServiceStub(channel)

    yield connect
    for channel in channels:
        await channel.close()
