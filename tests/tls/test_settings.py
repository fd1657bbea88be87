"""How TLS is chosen and validated: addresses, environment, settings, and exposure warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from qrelay.broker.settings import BrokerSettings
from qrelay.errors import InvalidArgument
from qrelay.executor.settings import ExecutorSettings
from qrelay.tls import ClientTLS, client_tls, exposure, is_loopback, verified_peer
from tests.tls.certs import CertificateAuthority


def test_grpcs_address_means_tls_with_the_system_roots() -> None:
    target, tls = client_tls("grpcs://broker.example:443")
    assert target == "broker.example:443"
    assert tls == ClientTLS()
    assert tls.trusts == "the system's root CAs"


def test_bare_and_grpc_addresses_are_plaintext() -> None:
    assert client_tls("127.0.0.1:50051") == ("127.0.0.1:50051", None)
    assert client_tls("grpc://127.0.0.1:50051") == ("127.0.0.1:50051", None)


def test_a_ca_file_alone_turns_tls_on(tmp_path: Path) -> None:
    target, tls = client_tls("h:1", ca=tmp_path / "ca.pem")
    assert target == "h:1"
    assert tls is not None
    assert tls.ca_file == tmp_path / "ca.pem"


def test_environment_fills_in_what_arguments_leave_unset() -> None:
    env = {"QRELAY_TLS_CA": "/etc/qrelay/ca.pem", "QRELAY_TLS_SERVER_NAME": "broker.internal"}
    _, tls = client_tls("10.0.0.5:50051", env=env)
    assert tls == ClientTLS(ca_file=Path("/etc/qrelay/ca.pem"), server_name="broker.internal")
    assert tls.options() == [("grpc.ssl_target_name_override", "broker.internal")]
    # An explicit plaintext address wins over the environment's CA.
    assert client_tls("grpc://h:1", env=env) == ("h:1", None)
    assert client_tls("h:1", env={"QRELAY_TLS": "yes"})[1] == ClientTLS()
    assert client_tls("h:1", env={"QRELAY_TLS": "0"})[1] is None
    # A CA passed as an argument wins over QRELAY_TLS=0 in the environment.
    assert client_tls("h:1", ca="ca.pem", env={"QRELAY_TLS": "0"})[1] == ClientTLS(Path("ca.pem"))


@pytest.mark.parametrize(
    ("address", "kwargs", "message"),
    [
        ("h:1", {"tls": False, "ca": "ca.pem"}, "contradicts the TLS files"),
        ("grpc://h:1", {"ca": "ca.pem"}, "contradicts the TLS files"),
        ("grpcs://h:1", {"tls": False}, "says TLS but tls=False"),
        ("h:1", {"cert": "c.pem"}, "needs both its certificate and its key"),
        ("h:1", {"env": {"QRELAY_TLS": "maybe"}}, "QRELAY_TLS must be true or false"),
    ],
)
def test_contradictory_tls_choices_are_invalid_arguments(
    address: str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        client_tls(address, **kwargs)  # type: ignore[arg-type]


def test_unreadable_and_non_pem_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"cannot read TLS CA file .*missing.pem"):
        ClientTLS(ca_file=tmp_path / "missing.pem").credentials()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(InvalidArgument, match="is not a PEM file"):
        ClientTLS(ca_file=junk).credentials()


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1:50051")
    assert is_loopback("127.9.9.9:1")
    assert is_loopback("localhost:50051")
    assert is_loopback("[::1]:50051")
    assert not is_loopback("0.0.0.0:50051")
    assert not is_loopback("[::]:50051")
    assert not is_loopback("broker.example:443")
    assert not is_loopback(":50051")


def test_exposure_names_what_is_missing_off_loopback() -> None:
    assert exposure("127.0.0.1:50051", tls=False, tokens=False) is None
    assert exposure("0.0.0.0:50051", tls=True, tokens=True) is None
    plain = exposure("0.0.0.0:50051", tls=False, tokens=True)
    assert plain is not None
    assert "without TLS" in plain
    assert "in clear" in plain
    both = exposure("0.0.0.0:50051", tls=False, tokens=False)
    assert both is not None
    assert "without TLS and tokens" in both


def test_verified_peer_reads_the_certificate_subject() -> None:
    assert verified_peer({"transport_security_type": [b"ssl"]}) is None
    context = {"x509_pem_cert": [b"-----BEGIN"], "x509_subject": [b"CN=e-1"]}
    assert verified_peer(context) == "CN=e-1"


def test_broker_tls_settings_must_be_complete(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        BrokerSettings(tls_cert=ca.cert)
    with pytest.raises(ValidationError, match=r"tls_client_ca .* needs tls_cert"):
        BrokerSettings(tls_client_ca=ca.cert)
    server = ca.server()
    with pytest.raises(ValidationError, match=r"executor_listen .* needs tls_client_ca"):
        BrokerSettings(tls_cert=server.cert, tls_key=server.key, executor_listen="0.0.0.0:1")
    monkeypatch.setenv("QRELAY_TLS_CERT", str(server.cert))
    monkeypatch.setenv("QRELAY_TLS_KEY", str(server.key))
    monkeypatch.setenv("QRELAY_TLS_CLIENT_CA", str(ca.cert))
    settings = BrokerSettings()
    assert settings.tls
    assert settings.tls_client_ca == ca.cert


def test_executor_tls_settings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        ExecutorSettings(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="tls is off but TLS files are given"):
        ExecutorSettings(tls=False, tls_ca=tmp_path / "ca.pem")
