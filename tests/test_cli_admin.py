"""`qrelay admin`: help for each command, and bootstrap's rules (once, --force,
--out with mode 0600, no password in argv), run in-process on a real store."""

from __future__ import annotations

import os
import sqlite3
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


@pytest.mark.parametrize(
    "command",
    [
        ["admin"],
        ["admin", "bootstrap"],
        ["admin", "tenant", "create"],
        ["admin", "tenant", "list"],
        ["admin", "token", "create"],
        ["admin", "token", "revoke"],
        ["admin", "token", "list"],
        ["admin", "user", "create"],
        ["admin", "user", "list"],
        ["admin", "user", "disable"],
    ],
    ids=" ".join,
)
def test_every_admin_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bootstrap_makes_one_admin_token_unless_forced(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    out = tmp_path / "admin.token"
    first = runner.invoke(app, ["admin", "bootstrap", "--store", str(db), "--out", str(out)])
    assert first.exit_code == 0, first.output
    secret = out.read_text().strip()
    assert secret.startswith("qrl_")
    assert secret not in first.output
    assert os.stat(out).st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["admin", "bootstrap", "--store", str(db)])
    assert again.exit_code == 1
    assert "an admin token already exists" in again.output
    forced = runner.invoke(app, ["admin", "bootstrap", "--store", str(db), "--force"])
    assert forced.exit_code == 0, forced.output
    shown = forced.output.strip().splitlines()[-1]
    assert shown.startswith("qrl_")
    assert shown != secret
    with sqlite3.connect(db) as conn:
        roles = [r for (r,) in conn.execute("SELECT role FROM api_tokens")]
    assert roles == ["admin", "admin"]
    exists = runner.invoke(
        app, ["admin", "bootstrap", "--store", str(db), "--force", "--out", str(out)]
    )
    assert exists.exit_code == 2, "--out never overwrites a file"
    assert out.read_text().strip() == secret
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM api_tokens").fetchone()[0] == 2, (
            "refused before a token was made"
        )


def test_bootstrap_refuses_a_database_password_in_argv() -> None:
    result = runner.invoke(
        app, ["admin", "bootstrap", "--store", "postgresql://postgres:pw@db:5432/q"]
    )
    assert result.exit_code == 2
    assert "QRELAY_DATABASE_URL" in result.output
    assert "pw@" not in result.output
