"""`qrelay admin user create|list|disable` and `token create --user` against a
real broker process: the user's token works until the user is disabled, and
`token list` shows each token's user."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from typer.testing import CliRunner

from qrelay._proto.v1 import backends_pb2, backends_pb2_grpc
from qrelay.cli import app
from qrelay.testing import free_port
from tests.integration.procs import start_broker

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog onto CliRunner's temporary stderr; undo that after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _backends(address: str, token_file: Path) -> grpc.StatusCode:
    secret = token_file.read_text().strip()
    with grpc.insecure_channel(address) as channel:
        stub = backends_pb2_grpc.BackendServiceStub(channel)
        try:
            stub.List(
                backends_pb2.ListBackendsRequest(),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=10,
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_admin_user_commands_make_list_and_disable_users(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    db = tmp_path / "broker.db"
    broker = start_broker(port, db, tmp_path)
    admin = tmp_path / "admin.token"
    env = {"QRELAY_BROKER": address, "QRELAY_TOKEN_FILE": str(admin), "COLUMNS": "200"}

    def qrelay(*args: str) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == 0, (args, result.output)
        return result.output

    try:
        boot = runner.invoke(app, ["admin", "bootstrap", "--store", str(db), "--out", str(admin)])
        assert boot.exit_code == 0, boot.output
        qrelay("admin", "tenant", "create", "lab")
        assert "user alice@lab of tenant lab created (role user)" in qrelay(
            "admin", "user", "create", "alice@lab", "--tenant", "lab"
        )
        qrelay("admin", "user", "create", "root@lab", "--tenant", "lab", "--role", "admin")
        alice = tmp_path / "alice.token"
        qrelay(
            "admin", "token", "create", "--user", "alice@lab", "--tenant", "lab",
            "--out", str(alice),
        )  # fmt: skip
        assert _backends(address, alice) == grpc.StatusCode.OK
        admin_for_alice = ["--role", "admin", "--user", "alice@lab", "--tenant", "lab"]
        refused = runner.invoke(app, ["admin", "token", "create", *admin_for_alice], env=env)
        assert refused.exit_code != 0
        assert "cannot hold an admin token" in refused.output
        tokens = qrelay("admin", "token", "list", "--tenant", "lab")
        (row,) = [line for line in tokens.splitlines() if "alice@lab" in line]
        cells = [cell.strip() for cell in row.split("│")]
        assert cells[3:6] == ["user", "lab", "alice@lab"], "role, tenant, user"
        users = qrelay("admin", "user", "list", "--tenant", "lab")
        names = [cell.strip() for line in users.splitlines() for cell in line.split("│")[2:3]]
        assert names == ["alice@lab", "root@lab"]
        assert "disabled; its tokens are refused" in qrelay(
            "admin", "user", "disable", "alice@lab", "--tenant", "lab"
        )
        assert _backends(address, alice) == grpc.StatusCode.UNAUTHENTICATED
        listed = qrelay("admin", "user", "list")
        (alice_row,) = [line for line in listed.splitlines() if "alice@lab" in line]
        (root_row,) = [line for line in listed.splitlines() if "root@lab" in line]
        assert len(alice_row.split()) > len(root_row.split()), "the disabled time is shown"
        unknown = runner.invoke(
            app, ["admin", "user", "disable", "nobody@lab", "--tenant", "lab"], env=env
        )
        assert unknown.exit_code != 0
        assert "user 'nobody@lab' not found in tenant 'lab'" in unknown.output
        bad_role = runner.invoke(
            app, ["admin", "user", "create", "x", "--tenant", "lab", "--role", "executor"], env=env
        )
        assert bad_role.exit_code == 2
        assert "--role must be user or admin" in bad_role.output
    finally:
        broker.stop()
    assert alice.read_text().strip() not in broker.output(), "no secret in the broker's log"
