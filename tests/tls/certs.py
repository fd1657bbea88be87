"""Certificates made in the test: a CA, server and client certificates it signs.

Made with the `cryptography` package (EC P-256, valid from a minute ago for a
day), written as PEM files so that every part reads them the way an operator's
files are read.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """A certificate file and its key file."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _window(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Pair:
    pair = Pair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair.key.chmod(0o600)
    return pair


class CertificateAuthority:
    """A throw-away CA in `directory` that signs server and client certificates."""

    def __init__(self, directory: Path, name: str = "qrelay test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.stem = name.replace(" ", "-")
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = (
            _window(x509.CertificateBuilder())
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = _write(directory, self.stem, self._cert, self._key).cert

    def _issue(
        self, common_name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _window(x509.CertificateBuilder())
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _write(
            self.directory,
            f"{self.stem}-{common_name}",
            builder.sign(self._key, hashes.SHA256()),
            key,
        )

    def server(self, *hosts: str) -> Pair:
        """A server certificate naming `hosts` (IP addresses or DNS names; default loopback)."""
        names: list[x509.GeneralName] = []
        for host in hosts or ("127.0.0.1", "localhost"):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._issue("broker", ExtendedKeyUsageOID.SERVER_AUTH, names)

    def client(self, common_name: str) -> Pair:
        """A client certificate for `common_name` (an executor id, say)."""
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
