"""`qrelay programs ...` and `qrelay sessions ...` against `qrelay dev` in its own process.

The stack runs in a subprocess (as in test_cli_processes): CliRunner runs
each command on a fresh event loop in this process, and grpc.aio servers on
a long-lived loop in another thread of the same process crashed (SIGSEGV in
a gRPC thread) after a few such commands.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from qrelay.cli import app
from tests.dev_process import qrelay_dev

runner = CliRunner()


@pytest.fixture(scope="module")
def dev_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`qrelay dev --port 0` (broker + aer/fake_manila executor); yields its address."""
    with qrelay_dev(tmp_path_factory.mktemp("dev")) as (address, _):
        yield address


PROGRAM = """
def main(ctx, n=3):
    for i in range(n):
        ctx.publish({"step": i, "energy": -i / 2})
        ctx.log.info("iteration %d", i)
    return {"n": n, "answer": 42}
"""

FAILING = """
def main(ctx):
    raise RuntimeError("the program broke")
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog onto CliRunner's temporary stderr; undo that after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def cli(address: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        app, ["--log-level", "warning", *args, "--broker", address], terminal_width=200
    )
    return result.exit_code, result.output


@pytest.fixture
def program_dir(tmp_path: Path) -> Path:
    root = tmp_path / "prog"
    root.mkdir()
    (root / "main.py").write_text(textwrap.dedent(PROGRAM))
    return root


@pytest.mark.parametrize(
    "command",
    [
        ["programs"],
        ["programs", "upload"],
        ["programs", "list"],
        ["programs", "show"],
        ["programs", "delete"],
        ["programs", "run"],
        ["sessions"],
        ["sessions", "create"],
        ["sessions", "show"],
        ["sessions", "close"],
        ["sessions", "cancel"],
    ],
    ids=" ".join,
)
def test_every_programs_and_sessions_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--broker" in result.output or "Commands" in result.output


def test_upload_list_show_run_watch_delete(
    dev_address: str, program_dir: Path, tmp_path: Path
) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    code, out = cli(
        dev_address,
        "programs",
        "upload",
        str(program_dir),
        "--name",
        "steps",
        "--schema",
        str(schema),
    )
    assert code == 0, out
    match = re.search(r"uploaded steps version 1: (p-[0-9a-f]+)", out)
    assert match, out
    program_id = match.group(1)

    code, out = cli(dev_address, "programs", "list")
    assert code == 0, out
    assert "steps" in out
    assert program_id[:11] in out  # the id column folds on a narrow terminal

    code, out = cli(dev_address, "programs", "show", "steps")
    assert code == 0, out
    assert program_id in out.replace("\n", "").replace(" ", "")
    assert "main:main" in out
    assert '"integer"' in out

    inputs = tmp_path / "inputs.json"
    inputs.write_text('{"n": 4}')
    code, out = cli(
        dev_address,
        "programs",
        "run",
        "steps",
        "--backend",
        "aer",
        "--inputs",
        f"@{inputs}",
        "--watch",
    )
    assert code == 0, out
    assert out.count("interim") == 4
    assert '{"step": 3, "energy": -1.5}' in out
    assert "iteration 3" in out
    assert '"answer": 42' in out
    assert "DONE" in out

    code, out = cli(
        dev_address, "programs", "run", "steps", "--backend", "aer", "--inputs", '{"n": "x"}'
    )
    assert code == 1
    assert "INVALID_ARGUMENT" in out
    assert "'x' is not of type 'integer'" in out

    code, out = cli(dev_address, "programs", "delete", "steps")
    assert code == 0, out
    assert "deleted 1 version of steps" in out
    code, out = cli(dev_address, "programs", "show", "steps")
    assert code == 1
    assert "NOT_FOUND" in out


def test_run_watch_of_a_failing_program_exits_1_with_its_traceback(
    dev_address: str, tmp_path: Path
) -> None:
    (tmp_path / "main.py").write_text(textwrap.dedent(FAILING))
    assert cli(dev_address, "programs", "upload", str(tmp_path), "--name", "broken")[0] == 0
    code, out = cli(dev_address, "programs", "run", "broken", "--backend", "aer", "--watch")
    assert code == 1
    assert "RuntimeError" in out
    assert "the program broke" in out
    assert "FAILED" in out


def test_bad_inputs_and_paths_are_reported_clearly(dev_address: str, tmp_path: Path) -> None:
    code, out = cli(dev_address, "programs", "upload", str(tmp_path / "missing"), "--name", "x")
    assert code == 1
    out = " ".join(out.split())  # error lines wrap at 80 columns
    assert "INVALID_ARGUMENT" in out
    assert "must be a directory" in out
    code, out = cli(dev_address, "programs", "run", "x", "--backend", "aer", "--inputs", "[1, 2]")
    assert code == 1
    out = " ".join(out.split())  # error lines wrap at 80 columns
    assert "--inputs must be a JSON object" in out
    code, out = cli(dev_address, "programs", "run", "x", "--backend", "aer", "--inputs", "{nope")
    assert code == 1
    out = " ".join(out.split())  # error lines wrap at 80 columns
    assert "--inputs: value is not valid JSON" in out
    code, out = cli(dev_address, "programs", "run", "x", "--backend", "aer", "--tag", "novalue")
    assert code == 1
    out = " ".join(out.split())  # error lines wrap at 80 columns
    assert "--tag must look like KEY=VALUE" in out


def test_sessions_create_run_show_close_cancel(dev_address: str, program_dir: Path) -> None:
    assert cli(dev_address, "programs", "upload", str(program_dir), "--name", "steps")[0] == 0
    code, out = cli(dev_address, "sessions", "create", "--backend", "aer", "--max-time", "10m")
    assert code == 0, out
    match = re.search(r"id\s+(\S+)", out)
    assert match, out
    session_id = match.group(1)
    assert "OPEN" in out
    assert "600 s" in out

    code, out = cli(
        dev_address,
        "programs",
        "run",
        "steps",
        "--session",
        session_id,
        "--inputs",
        '{"n": 1}',
        "--watch",
    )
    assert code == 0, out

    code, out = cli(dev_address, "sessions", "show", session_id)
    assert code == 0, out
    assert "ACTIVE" in out
    assert "1 total" in out
    assert "1 done" in out

    code, out = cli(dev_address, "sessions", "close", session_id)
    assert code == 0, out
    assert "CLOSED" in out
    code, out = cli(dev_address, "programs", "run", "steps", "--session", session_id)
    assert code == 1
    assert "FAILED_PRECONDITION" in out
    assert "closed" in out

    code, out = cli(dev_address, "sessions", "create", "--backend", "aer", "--batch")
    batch_id = re.search(r"id\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    code, out = cli(dev_address, "sessions", "cancel", batch_id)
    assert code == 0, out
    assert "CANCELLED" in out
    assert "batch" in out

    code, out = cli(dev_address, "sessions", "show", "s-unknown")
    assert code == 1
    assert "NOT_FOUND" in out
