"""TLS end to end: real brokers, real executors and the SDK, with certificates made here.

The deployment under test is the documented one: the broker serves clients
with TLS on `listen` (no client certificate needed) and executors with mutual
TLS on `executor_listen`, where a certificate signed by the client CA is
required; ExecutorService refuses a peer without a verified certificate on
either port.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from qiskit import QuantumCircuit
from structlog.testing import capture_logs

from qrelay._proto.v1 import backends_pb2, executor_pb2, executor_pb2_grpc, types_pb2
from qrelay.client import AsyncQRelayService, QRelayService, Sampler
from qrelay.codec import encode_sampler_task
from qrelay.errors import DeadlineExceeded, Unavailable
from qrelay.executor.agent import running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.testing import LocalStack, local_stack_in_thread
from qrelay.tls import HandshakeFailed
from tests.conftest import FAST_BROKER, owned_stack
from tests.tls.certs import CertificateAuthority, Pair


def bell() -> QuantumCircuit:
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    return qc


def mtls_broker(ca: CertificateAuthority, server: Pair, **extra: Any) -> dict[str, Any]:
    return {
        **FAST_BROKER,
        "tls_cert": server.cert,
        "tls_key": server.key,
        "tls_client_ca": ca.cert,
        "executor_listen": "127.0.0.1:0",
        **extra,
    }


def executor_tls(ca: CertificateAuthority, pair: Pair | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"tls": True, "tls_ca": ca.cert, "connect_timeout_s": 2.0}
    if pair is not None:
        settings.update(tls_cert=pair.cert, tls_key=pair.key)
    return settings


@pytest.fixture
async def mtls_stack(
    ca: CertificateAuthority, server_pair: Pair, executor_pair: Pair
) -> AsyncIterator[LocalStack]:
    async with owned_stack(
        backends=("aer",),
        broker=mtls_broker(ca, server_pair),
        executor=executor_tls(ca, executor_pair),
    ) as env:
        yield env


async def hello(address: str, credentials: grpc.ChannelCredentials) -> tuple[grpc.StatusCode, str]:
    """Open ExecutorService.Connect with `credentials`, say Hello: the status it ends with
    (OK when the broker answered Welcome)."""
    async with grpc.aio.secure_channel(address, credentials) as channel:
        call = executor_pb2_grpc.ExecutorServiceStub(channel).Connect(timeout=10)
        try:
            await call.write(
                executor_pb2.ExecutorMessage(
                    hello=executor_pb2.Hello(
                        executor_id="e-raw",
                        slots=1,
                        version="test",
                        backends=[backends_pb2.BackendInfo(name="aer", num_qubits=5)],
                    )
                )
            )
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        finally:
            call.cancel()
        assert reply.WhichOneof("message") == "welcome"
        return grpc.StatusCode.OK, ""


async def test_client_over_tls_runs_a_job_on_an_executor_over_mtls(
    mtls_stack: LocalStack, ca: CertificateAuthority
) -> None:
    broker = mtls_stack.broker
    assert broker.executor_address != broker.address  # the executor came in on the mTLS port
    assert mtls_stack.executors[0].connected
    async with AsyncQRelayService(f"grpcs://{broker.address}", tls_ca=ca.cert) as service:
        assert service.connection.tls is not None
        backends = await service.backends()
        assert [(b.name, b.online) for b in backends] == [("aer", True)]
        job = await service.submit(
            types_pb2.JobSpec(backend="aer", sampler=encode_sampler_task([bell()], 40))
        )
        result = await job.result(timeout=60)
    counts = result[0].data.meas.get_counts()
    assert sum(counts.values()) == 40
    assert set(counts) <= {"00", "11"}


def test_blocking_sdk_takes_the_ca_from_qrelay_tls_ca(
    ca: CertificateAuthority,
    server_pair: Pair,
    executor_pair: Pair,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with local_stack_in_thread(
        backends=("aer",),
        broker=mtls_broker(ca, server_pair),
        executor=executor_tls(ca, executor_pair),
    ) as (env, _portal):
        monkeypatch.setenv("QRELAY_TLS_CA", str(ca.cert))
        with QRelayService(f"grpcs://{env.address}") as service:
            result = Sampler(mode=service.backend("aer")).run([bell()], shots=64).result()
    counts = result[0].data.meas.get_counts()
    assert sum(counts.values()) == 64
    assert set(counts) <= {"00", "11"}


async def test_client_that_does_not_trust_the_certificate_fails_unavailable_saying_so(
    mtls_stack: LocalStack, other_ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qrelay.client")
    address = mtls_stack.broker.address
    async with AsyncQRelayService(f"grpcs://{address}", tls_ca=other_ca.cert) as service:
        with pytest.raises(
            Unavailable, match=r"certificate of the broker .* was not trusted"
        ) as err:
            await service.backends()
        assert service.connection.tls is not None
    assert str(other_ca.cert) in err.value.message  # says what it checked against
    assert "CERTIFICATE_VERIFY_FAILED" in err.value.message  # and gRPC's own words
    assert isinstance(err.value, HandshakeFailed)
    assert err.value.code_name == "UNAVAILABLE"
    assert "rpc.retried" not in caplog.text  # a retry cannot make the certificate trusted


async def test_client_without_a_ca_checks_the_system_roots_and_refuses_a_private_ca(
    mtls_stack: LocalStack,
) -> None:
    async with AsyncQRelayService(f"grpcs://{mtls_stack.broker.address}") as service:
        with pytest.raises(Unavailable, match="not trusted: it is not signed by the system"):
            await service.backends()


async def test_plaintext_client_of_a_tls_broker_is_unavailable(
    mtls_stack: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qrelay.client")
    async with AsyncQRelayService(mtls_stack.broker.address, timeout=3.0) as service:
        assert service.connection.tls is None
        with pytest.raises(Unavailable) as err:
            await service.backends()
    assert not isinstance(err.value, HandshakeFailed)
    assert "rpc.retried" in caplog.text  # it may be a passing outage: retried, unlike TLS


async def test_executor_certificate_from_our_ca_is_welcomed_on_the_executor_port(
    mtls_stack: LocalStack, ca: CertificateAuthority, executor_pair: Pair
) -> None:
    credentials = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(), executor_pair.key.read_bytes(), executor_pair.cert.read_bytes()
    )
    code, _ = await hello(mtls_stack.broker.executor_address, credentials)
    assert code is grpc.StatusCode.OK


@pytest.mark.parametrize("client_cert", ["none", "foreign"])
async def test_executor_port_refuses_a_peer_without_a_certificate_from_the_client_ca(
    mtls_stack: LocalStack,
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    client_cert: str,
) -> None:
    pair = other_ca.client("e-intruder") if client_cert == "foreign" else None
    credentials = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(),
        None if pair is None else pair.key.read_bytes(),
        None if pair is None else pair.cert.read_bytes(),
    )
    code, _ = await hello(mtls_stack.broker.executor_address, credentials)
    assert code is grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails
    assert set(mtls_stack.broker.scheduler.executors) == {
        mtls_stack.executors[0].settings.executor_id
    }


async def test_executor_service_on_the_client_port_demands_a_verified_certificate(
    mtls_stack: LocalStack, ca: CertificateAuthority
) -> None:
    credentials = grpc.ssl_channel_credentials(ca.cert.read_bytes())
    with capture_logs() as logs:
        code, details = await hello(mtls_stack.broker.address, credentials)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "TLS client certificate signed by its client CA" in details
    assert "executor_listen" in details
    refusals = [e for e in logs if e["event"] == "audit.executor.refused"]
    assert len(refusals) == 1
    assert refusals[0]["reason"] == "no verified client certificate"


async def test_tls_client_of_a_plaintext_broker_is_told_the_handshake_failed(
    ca: CertificateAuthority,
) -> None:
    async with owned_stack(executors=0) as plain:
        address = f"grpcs://{plain.address}"
        async with AsyncQRelayService(address, tls_ca=ca.cert, timeout=3.0) as service:
            with pytest.raises(Unavailable, match=r"TLS handshake with the broker .* failed"):
                await service.backends()


@pytest.mark.slow
async def test_real_executor_without_a_client_certificate_never_connects(
    mtls_stack: LocalStack, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    for pair in (None, other_ca.client("e-foreign")):
        settings = ExecutorSettings(
            broker=mtls_stack.broker.executor_address,
            backends=["aer"],
            slots=1,
            executor_id="e-refused",
            programs=False,
            **executor_tls(ca, pair),
        )
        with pytest.raises(DeadlineExceeded, match="not connected"):
            async with running_executor(settings, connect_timeout=5.0):
                pass
    assert "e-refused" not in mtls_stack.broker.scheduler.executors


async def test_one_port_mtls_requires_a_client_certificate_from_clients_too(
    ca: CertificateAuthority, server_pair: Pair, executor_pair: Pair
) -> None:
    async with owned_stack(
        backends=("aer",),
        broker=mtls_broker(ca, server_pair, executor_listen=None),
        executor=executor_tls(ca, executor_pair),
    ) as env:
        assert env.broker.executor_address == env.address
        address = f"grpcs://{env.address}"
        async with AsyncQRelayService(address, tls_ca=ca.cert, timeout=3.0) as anonymous:
            with pytest.raises(Unavailable):
                await anonymous.backends()
        client = ca.client("alice")
        async with AsyncQRelayService(
            address, tls_ca=ca.cert, tls_cert=client.cert, tls_key=client.key
        ) as alice:
            assert [b.name for b in await alice.backends()] == ["aer"]
