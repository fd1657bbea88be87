"""Transport security, shared by the broker, the executor, the SDK and the CLI.

Clients and executors choose TLS per broker address: `grpcs://host:port`
(or `tls=True`, or a CA file) dials with TLS and verifies the broker's
certificate against the CA file given, else the system roots; `grpc://` or a
bare `host:port` is plaintext. An executor (or a client of a broker that
requires it) also presents its own certificate and key.

The broker serves TLS with a certificate and key; with a client CA it asks
for client certificates signed by it (mutual TLS). gRPC's Python server
cannot ask for a client certificate without also requiring one, so a broker
that wants both certificate-less clients and verified executors listens on a
second port for executors (`executor_listen`), where the certificate is
required; ExecutorService then refuses any stream whose peer presented no
verified certificate (`verified_peer`), whichever port it came in on.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from qrelay.errors import InvalidArgument, Unavailable

GRPCS = "grpcs://"
GRPC = "grpc://"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def read_pem(path: Path, what: str) -> bytes:
    """A PEM file's bytes, or InvalidArgument naming the setting and the reason."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def split_scheme(address: str) -> tuple[str, bool | None]:
    """`grpcs://h:p` -> ("h:p", True); `grpc://h:p` -> ("h:p", False); `h:p` -> ("h:p", None)."""
    if address.startswith(GRPCS):
        return address[len(GRPCS) :], True
    if address.startswith(GRPC):
        return address[len(GRPC) :], False
    return address, None


def host_of(address: str) -> str:
    """The host part of HOST:PORT, without IPv6 brackets ("" for ":PORT")."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    """True if HOST:PORT names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host_of(address).lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClientTLS:
    """How a client or an executor verifies the broker, and what it presents itself.

    `ca_file` None trusts the system roots. `cert_file`/`key_file` (both or
    neither) are this side's certificate for mutual TLS. `server_name`
    overrides the name checked against the broker's certificate (when it is
    dialled by an address its certificate does not name).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument(
                "a TLS client certificate needs both its certificate and its key file"
            )

    @property
    def trusts(self) -> str:
        """What the broker's certificate is checked against, for messages."""
        return f"the CA in {self.ca_file}" if self.ca_file else "the system's root CAs"

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials (reads the files now: a bad path fails here)."""
        root = None if self.ca_file is None else read_pem(self.ca_file, "TLS CA file")
        key = None if self.key_file is None else read_pem(self.key_file, "TLS key file")
        cert = None if self.cert_file is None else read_pem(self.cert_file, "TLS certificate file")
        return grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=cert
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options that go with the credentials."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def _flag(text: str | None, what: str) -> bool | None:
    if text is None:
        return None
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidArgument(f"{what} must be true or false, got {text!r}")


def _path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None or str(value) == "" else Path(value)


def client_tls(
    address: str,
    *,
    tls: bool | None = None,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    server_name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, ClientTLS | None]:
    """The address to dial and its TLS (None: plaintext) from arguments, scheme and `env`.

    Arguments win, then the address's scheme, then the environment (`env`,
    e.g. `os.environ`: QRELAY_TLS, QRELAY_TLS_CA, QRELAY_TLS_CLIENT_CERT,
    QRELAY_TLS_CLIENT_KEY, QRELAY_TLS_SERVER_NAME). A CA file or a client
    certificate alone turns TLS on; `tls=False` with one of them is refused.
    """
    target, scheme = split_scheme(address)
    env = env or {}
    explicit_files = ca is not None or cert is not None or key is not None
    if (tls is False or (tls is None and scheme is False)) and explicit_files:
        raise InvalidArgument("plaintext (tls=False or grpc://) contradicts the TLS files given")
    if tls is not None and scheme is not None and tls != scheme:
        raise InvalidArgument(
            f"address {address!r} says {'TLS' if scheme else 'plaintext'} but tls={tls}"
        )
    ca = ca if ca is not None else env.get("QRELAY_TLS_CA")
    cert = cert if cert is not None else env.get("QRELAY_TLS_CLIENT_CERT")
    key = key if key is not None else env.get("QRELAY_TLS_CLIENT_KEY")
    server_name = server_name or env.get("QRELAY_TLS_SERVER_NAME") or None
    on = tls if tls is not None else scheme
    if on is None and explicit_files:
        on = True
    if on is None:
        on = _flag(env.get("QRELAY_TLS"), "QRELAY_TLS")
    if on is None:
        on = bool(_path(ca) or _path(cert))
    if not on:
        return target, None
    return target, ClientTLS(_path(ca), _path(cert), _path(key), server_name)


def secure_channel(
    target: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: TLS when `tls` is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


class HandshakeFailed(Unavailable):
    """UNAVAILABLE because the TLS handshake failed: an untrusted certificate, a
    plaintext peer, a refused client certificate. Retrying does not help."""


def explain_failure(message: str, tls: ClientTLS | None, address: str) -> str | None:
    """A clear sentence for a TLS handshake failure in a gRPC error's details, else None."""
    text = message.upper()
    if tls is not None and "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"the TLS certificate of the broker at {address} was not trusted: it is not signed "
            f"by {tls.trusts} (or does not name that host); pass the CA that signed it "
            f"(tls_ca= / --tls-ca / QRELAY_TLS_CA). gRPC said: {message}"
        )
    if tls is not None and ("WRONG_VERSION_NUMBER" in text or "HANDSHAKE" in text):
        return (
            f"the TLS handshake with the broker at {address} failed (a plaintext broker, or "
            f"one that requires a client certificate this client did not present?). "
            f"gRPC said: {message}"
        )
    return None


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None, *, require_client_cert: bool
) -> grpc.ServerCredentials:
    """Server credentials; with `require_client_cert`, peers must present a certificate
    signed by `client_ca_file` (gRPC's Python server cannot ask without requiring)."""
    pair = (read_pem(key_file, "TLS key file"), read_pem(cert_file, "TLS certificate file"))
    roots = None if client_ca_file is None else read_pem(client_ca_file, "TLS client CA file")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=require_client_cert and bool(roots)
    )


def verified_peer(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The verified client certificate's subject of a call's auth context, None without one.

    gRPC puts `x509_pem_cert` there only for a certificate the handshake
    verified against the server's client CA.
    """
    if not auth_context.get("x509_pem_cert"):
        return None
    for key in ("x509_subject", "x509_common_name"):
        values = auth_context.get(key)
        if values:
            return values[0].decode(errors="replace")
    return "(certificate without a subject)"


def exposure(listen: str, *, tls: bool, tokens: bool) -> str | None:
    """Why listening on `listen` is dangerous, or None (loopback, or TLS with tokens)."""
    if is_loopback(listen):
        return None
    missing = [what for what, have in (("TLS", tls), ("tokens", tokens)) if not have]
    if not missing:
        return None
    lacks = " and ".join(missing)
    consequences = []
    if not tls:
        consequences.append("bearer tokens and circuits cross the network in clear")
    if not tokens:
        consequences.append("anyone who reaches the port can submit and read jobs")
    return f"listening on {listen} without {lacks}: {'; '.join(consequences)}"
