"""`qrelay usage` against a real broker process started with quotas in its environment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from typer.testing import CliRunner

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc
from qrelay.cli import app
from qrelay.testing import free_port
from tests.broker.conftest import announce
from tests.integration.procs import start_broker
from tests.integration.rawstubs import BELL_QASM3, sampler_spec

QUOTAS = {"default": {"max_queued_jobs": 5, "max_executor_seconds": 100}}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog onto CliRunner's temporary stderr; undo that after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_usage_shows_the_tenants_use_beside_its_quotas(tmp_path: Path) -> None:
    port = free_port()
    broker = start_broker(
        port,
        tmp_path / "broker.db",
        tmp_path,
        env={"QRELAY_TENANT_QUOTAS": json.dumps(QUOTAS), "QRELAY_QUOTA_PERIOD": "day"},
    )
    address = f"127.0.0.1:{port}"
    try:
        asyncio.run(announce(address, ["aer"]))
        with grpc.insecure_channel(address) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            request = jobs_pb2.SubmitRequest(spec=sampler_spec("aer", BELL_QASM3, shots=10))
            for _ in range(2):
                stub.Submit(request, timeout=10)
        result = CliRunner().invoke(app, ["usage", "--broker", address], env={"COLUMNS": "100"})
    finally:
        broker.stop()
    assert result.exit_code == 0, result.output
    rows = {" ".join(line.split()[:-2]): line.split()[-2:] for line in result.output.splitlines()}
    assert rows["executor-seconds"] == ["0.0", "100.0"]
    assert rows["queued jobs"] == ["2", "5"]
    assert rows["running jobs"] == ["0", "none"]
    assert rows["open sessions"] == ["0", "none"]
    assert "(UTC)" in result.output
