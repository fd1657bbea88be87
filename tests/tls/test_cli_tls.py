"""The command line and TLS: client commands over TLS, dev's refusal, serve's warning."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from qrelay.cli import app
from qrelay.testing import LocalStack, local_stack_in_thread
from tests.tls.certs import CertificateAuthority, Pair

runner = CliRunner()


def flat(output: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def tls_stack(ca: CertificateAuthority, server_pair: Pair) -> Iterator[LocalStack]:
    saved = structlog.get_config()
    with local_stack_in_thread(
        backends=("aer",),
        broker={"tls_cert": server_pair.cert, "tls_key": server_pair.key},
        executor={"tls_ca": ca.cert, "programs": False},
    ) as (env, _portal):
        try:
            yield env
        finally:
            # The CLI logged to CliRunner's stream, closed by now: the stack's
            # shutdown must log elsewhere.
            structlog.configure(**saved)


def test_client_commands_speak_tls_with_the_ca_given_to_qrelay(
    tls_stack: LocalStack, ca: CertificateAuthority
) -> None:
    result = runner.invoke(
        app,
        ["--tls-ca", str(ca.cert), "backends", "--broker", tls_stack.address],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "aer" in flat(result.output)


def test_client_commands_take_the_ca_from_qrelay_tls_ca_and_grpcs(
    tls_stack: LocalStack, ca: CertificateAuthority
) -> None:
    result = runner.invoke(
        app,
        ["jobs", "list", "--broker", f"grpcs://{tls_stack.address}"],
        env={"QRELAY_TLS_CA": str(ca.cert)},
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output


def test_a_client_command_that_does_not_trust_the_broker_says_so(
    tls_stack: LocalStack, other_ca: CertificateAuthority
) -> None:
    result = runner.invoke(
        app,
        ["--tls-ca", str(other_ca.cert), "backends", "--broker", tls_stack.address],
        terminal_width=400,
    )
    assert result.exit_code == 1
    assert "UNAVAILABLE: the TLS certificate of the broker" in flat(result.output)
    assert "was not trusted" in flat(result.output)


def test_dev_refuses_a_public_address_without_tls_and_tokens(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["dev", "--listen", "0.0.0.0:0", "--dir", str(tmp_path)], terminal_width=400
    )
    assert result.exit_code == 2
    assert "qrelay dev refuses to listen on 0.0.0.0:0 without TLS and tokens" in flat(result.output)
    assert "--insecure-public" in flat(result.output)
    assert not (tmp_path / "broker.db").exists()  # refused before anything started


def test_dev_refuses_tls_without_tokens_too(tmp_path: Path, server_pair: Pair) -> None:
    result = runner.invoke(
        app,
        [
            "dev",
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            str(server_pair.cert),
            "--tls-key",
            str(server_pair.key),
            "--dir",
            str(tmp_path),
        ],
        terminal_width=400,
    )
    assert result.exit_code == 2
    assert "refuses to listen on 0.0.0.0:0" in flat(result.output)


def test_dev_takes_port_or_listen_not_both(tmp_path: Path) -> None:
    result = runner.invoke(app, ["dev", "--port", "0", "--listen", "127.0.0.1:0"])
    assert result.exit_code == 2
    assert "--port or --listen, not both" in flat(result.output)


def qrelay(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m qrelay ARGS` as a process of its own (a server logs from many places)."""
    return subprocess.run(
        [sys.executable, "-m", "qrelay", "--log-json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
        check=False,
    )


def test_broker_serve_warns_loudly_on_a_public_plaintext_address() -> None:
    # The store cannot open (nothing listens on port 1), so the broker stops
    # after the warning, before it binds anything.
    result = qrelay(
        "broker",
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--database-url",
        "postgresql://nobody@127.0.0.1:1/none",
    )
    assert result.returncode != 0
    stderr = flat(result.stderr)
    assert "WARNING: qrelay broker serve is listening on 0.0.0.0:0 without TLS" in stderr
    assert "in clear" in stderr
    assert '"event": "broker.exposed"' in stderr


def test_broker_serve_names_an_unreadable_certificate(tmp_path: Path) -> None:
    result = qrelay(
        "broker",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        str(tmp_path / "b.db"),
        "--tls-cert",
        str(tmp_path / "missing.crt"),
        "--tls-key",
        str(tmp_path / "missing.key"),
    )
    assert result.returncode == 1
    stderr = flat(result.stderr)
    assert "INVALID_ARGUMENT: cannot read TLS" in stderr
    assert "missing." in stderr
    assert "Traceback" not in stderr


def test_broker_serve_refuses_a_metrics_token_flag() -> None:
    result = runner.invoke(app, ["broker", "serve", "--metrics-token", "s3cret"])
    assert result.exit_code == 2
    assert "secrets are not accepted as flags" in flat(result.output)


@pytest.mark.slow
def test_dev_serves_tls_when_given_a_certificate(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qrelay",
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(server_pair.cert),
            "--tls-key",
            str(server_pair.key),
            "--tls-ca",
            str(ca.cert),
            "--backend",
            "aer",
            "--dir",
            str(tmp_path / "q"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "QRELAY_LOG_LEVEL": "warning", "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once broker and executor are up
        match = re.search(r"broker on (grpcs://127\.0\.0\.1:\d+)", line)
        assert match, f"qrelay dev printed {line!r} (exit code {proc.poll()})"
        trusted = qrelay("--tls-ca", str(ca.cert), "backends", "--broker", match.group(1))
        plain = qrelay("backends", "--broker", match.group(1).removeprefix("grpcs://"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert trusted.returncode == 0, trusted.stderr
    assert "aer" in trusted.stdout
    assert plain.returncode == 1  # a plaintext client gets nowhere
    assert "UNAVAILABLE" in plain.stderr
    assert proc.returncode == 0
