"""Secrets never travel in argv: tokens come from files or the environment.

A process's command line is readable by every user of its host
(/proc/PID/cmdline); a tenant's program once read the broker's and the
executor's tokens there. The flags that took secrets now refuse them, and a
malformed token line is reported by its position, never shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc
from qrelay.broker.settings import BrokerSettings
from qrelay.cli import app
from qrelay.client.accounts import resolve_account
from qrelay.executor.settings import ExecutorSettings
from qrelay.testing import free_port
from tests.integration.procs import Proc, wait_serving
from tests.test_cli import _restore_logging  # noqa: F401 - autouse: the CLI reconfigures structlog

runner = CliRunner()
SECRET = "s3cret-0123456789abcdef"


@pytest.mark.parametrize(
    ("command", "flag", "instead"),
    [
        (["broker", "serve"], "--tokens", "--tokens-file"),
        (["broker", "serve"], "--executor-token", "--executor-token-file"),
        (["executor", "serve"], "--token", "--token-file"),
    ],
)
def test_a_secret_given_as_a_flag_is_refused_and_never_echoed(
    command: list[str], flag: str, instead: str
) -> None:
    result = runner.invoke(app, [*command, flag, f"{SECRET}=t"], terminal_width=200)
    assert result.exit_code == 2
    assert "/proc/PID/cmdline" in result.output
    assert instead in result.output
    assert SECRET not in result.output


def test_client_commands_take_no_token_flag_and_never_echo_it() -> None:
    result = runner.invoke(app, ["jobs", "list", "--token", SECRET], terminal_width=200)
    assert result.exit_code == 2
    assert "--token-file" in result.output  # click's "did you mean"
    assert SECRET not in result.output


def test_a_malformed_token_line_is_named_by_position_not_shown(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# tenants\ngood-token=alice\n{SECRET}\n")
    result = runner.invoke(
        app, ["broker", "serve", "--tokens-file", str(tokens)], terminal_width=200
    )
    assert result.exit_code == 2
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "tokens entry 2 is not of the form token=tenant" in said
    assert SECRET not in said


def test_tokens_come_from_files_for_broker_executor_and_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tokens").write_text("tok-a=alice  # first\ntok-b=bob, tok-c=carol\n")
    (tmp_path / "executor").write_text("exec-secret\n")
    broker = BrokerSettings(
        tokens_file=tmp_path / "tokens", executor_token_file=tmp_path / "executor"
    )
    assert broker.tokens == {"tok-a": "alice", "tok-b": "bob", "tok-c": "carol"}
    assert broker.executor_token == "exec-secret"
    assert ExecutorSettings(token_file=tmp_path / "executor").token == "exec-secret"
    monkeypatch.delenv("QRELAY_TOKEN", raising=False)
    monkeypatch.setenv("QRELAY_TOKEN_FILE", str(tmp_path / "executor"))
    assert resolve_account("127.0.0.1:1").token == "exec-secret"
    with pytest.raises(ValueError, match="cannot read tokens_file"):
        BrokerSettings(tokens_file=tmp_path / "missing")


@pytest.mark.slow
def test_a_broker_given_tokens_by_file_shows_none_in_its_command_line(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"{SECRET}=alice\n")
    port = free_port()
    args = ["broker", "serve", "--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "b.db")]
    broker = Proc([*args, "--tokens-file", str(tmp_path / "tokens")], tmp_path / "broker.log")
    try:
        wait_serving(f"127.0.0.1:{port}", broker)
        cmdline = Path(f"/proc/{broker.popen.pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            listed = stub.List(
                jobs_pb2.ListJobsRequest(), metadata=(("authorization", f"Bearer {SECRET}"),)
            )
            assert list(listed.jobs) == []
        # The CLI reads the same token from the environment, not from a flag.
        ran = subprocess.run(
            [sys.executable, "-m", "qrelay", "jobs", "list", "--broker", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            env={**os.environ, "QRELAY_TOKEN": SECRET},
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
    finally:
        broker.stop()
