"""The `qrelay` command line: help for every command, settings errors, and a real dev stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from qrelay.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog onto CliRunner's temporary stderr; undo that after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


COMMANDS = [
    [],
    ["broker"],
    ["broker", "serve"],
    ["executor"],
    ["executor", "serve"],
    ["dev"],
    ["backends"],
    ["jobs"],
    ["jobs", "list"],
    ["jobs", "show"],
    ["jobs", "cancel"],
    ["jobs", "watch"],
    ["jobs", "delete"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "qrelay")
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_client_commands_take_broker_and_token_from_flags_and_env() -> None:
    for command in (["backends"], ["jobs", "list"], ["jobs", "watch"]):
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert "--broker" in result.output
        assert "QRELAY_BROKER" in result.output
        assert "--token" in result.output
        assert "QRELAY_TOKEN" in result.output


def test_executor_serve_rejects_zero_slots_with_exit_code_2() -> None:
    result = runner.invoke(app, ["executor", "serve", "--slots", "0"])
    assert result.exit_code == 2
    assert "invalid settings: slots" in result.output
    assert "greater than or equal to 1" in result.output


def test_executor_serve_rejects_bad_env_setting_with_exit_code_2() -> None:
    result = runner.invoke(
        app, ["executor", "serve"], env={"QRELAY_EXECUTOR_OPTIMIZATION_LEVEL": "7"}
    )
    assert result.exit_code == 2
    assert "invalid settings: optimization_level" in result.output


def test_broker_serve_rejects_nonpositive_lease_ttl_with_exit_code_2() -> None:
    result = runner.invoke(app, ["broker", "serve", "--lease-ttl", "0"])
    assert result.exit_code == 2
    assert "invalid settings: lease_ttl_s" in result.output
    assert "must be > 0" in result.output


def test_broker_serve_rejects_malformed_tokens_with_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("just-a-token\n")
    result = runner.invoke(app, ["broker", "serve", "--tokens-file", str(tmp_path / "tokens")])
    assert result.exit_code == 2
    assert "token=tenant" in result.output
    assert "just-a-token" not in result.output


def test_database_url_password_never_reaches_the_log_line() -> None:
    from qrelay.cli import _redacted

    assert _redacted("postgresql://qrelay:s3cret@db:5432/q") == "postgresql://qrelay:***@db:5432/q"
    assert _redacted("postgresql://qrelay@db/q") == "postgresql://qrelay@db/q"


def test_a_password_holding_an_at_sign_is_hidden_whole() -> None:
    from qrelay.cli import _redacted

    assert _redacted("postgresql://qrelay:p@ss@db/q") == "postgresql://qrelay:***@db/q"
