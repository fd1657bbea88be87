"""Settings from the environment, and the Prometheus endpoint."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import anyio.to_thread
import grpc
import pytest
from pydantic import ValidationError

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc
from qrelay.broker.server import running_broker
from qrelay.broker.settings import MIB, BrokerSettings
from qrelay.testing import free_port
from tests.broker.conftest import FakeExecutor, announce, broker_settings, sampler_spec, until


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRELAY_TOKENS", "tok1=tenantA, tok2=tenantB")
    monkeypatch.setenv("QRELAY_LEASE_TTL_S", "2.5")
    monkeypatch.setenv("QRELAY_SQLITE_SYNCHRONOUS", "full")
    monkeypatch.setenv("QRELAY_MAX_STREAM_JOBS", "64")
    settings = BrokerSettings()
    assert settings.tokens == {"tok1": "tenantA", "tok2": "tenantB"}
    assert settings.lease_ttl_s == 2.5
    assert settings.max_stream_jobs == 64
    assert settings.sqlite_synchronous == "FULL"
    assert settings.max_job_bytes == 8 * MIB
    assert settings.default_tenant == "default"


def test_a_malformed_token_entry_is_named_by_position_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QRELAY_TOKENS", "tok1=tenantA,oops-a-secret")
    with pytest.raises(
        ValidationError, match="tokens entry 2 is not of the form token=tenant"
    ) as err:
        BrokerSettings()
    assert "oops-a-secret" not in str(err.value)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_metrics_endpoint_reports_queue_jobs_latency_and_slots(tmp_path: Path) -> None:
    port = free_port()
    async with running_broker(broker_settings(tmp_path, metrics_port=port)) as broker:
        await announce(broker.address)
        async with grpc.aio.insecure_channel(broker.address) as ch:
            jobs = jobs_pb2_grpc.JobServiceStub(ch)
            queued = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec("fake_manila")))
            async with FakeExecutor(broker.address, slots=3) as executor:
                job = await jobs.Submit(jobs_pb2.SubmitRequest(spec=sampler_spec()))
                executor.finish(await executor.recv("assignment"))
                await broker.metrics.refresh(broker.store)
                await until(lambda: broker.metrics.jobs.labels("DONE")._value.get() == 1)
                text = await anyio.to_thread.run_sync(scrape, port)
    assert queued.id != job.id
    assert 'qrelay_queue_depth{backend="fake_manila"} 1.0' in text
    assert 'qrelay_jobs{state="DONE"} 1.0' in text
    assert 'qrelay_job_latency_seconds_count{backend="aer",state="DONE"} 1.0' in text
    assert "qrelay_executors 1.0" in text
    assert "qrelay_slots 3.0" in text


def test_the_broker_never_imports_qiskit() -> None:
    code = (
        "import sys, qrelay.broker, qrelay.broker.service; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('qiskit', 'qiskit_aer')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_stream_must_follow_at_least_one_job() -> None:
    with pytest.raises(ValidationError, match="must be >= 1"):
        BrokerSettings(max_stream_jobs=0)
