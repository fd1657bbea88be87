"""TLS fixtures: a CA made per test session, another one nobody trusts, and their files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tls.certs import CertificateAuthority, Pair


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="session")
def ca(tls_dir: Path) -> CertificateAuthority:
    """The deployment's CA: it signs the broker's certificate and the executors'."""
    return CertificateAuthority(tls_dir / "ca", "qrelay test CA")


@pytest.fixture(scope="session")
def other_ca(tls_dir: Path) -> CertificateAuthority:
    """A CA the broker and the clients do not trust."""
    return CertificateAuthority(tls_dir / "other", "someone else's CA")


@pytest.fixture(scope="session")
def server_pair(ca: CertificateAuthority) -> Pair:
    return ca.server("127.0.0.1", "localhost")


@pytest.fixture(scope="session")
def executor_pair(ca: CertificateAuthority) -> Pair:
    return ca.client("e-tls")
