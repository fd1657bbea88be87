"""The Prometheus endpoint: bound to the listen host, logged, and behind a token if asked."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import anyio.to_thread
import pytest
from structlog.testing import capture_logs

from qrelay.broker.server import running_broker
from qrelay.broker.settings import BrokerSettings
from qrelay.errors import FailedPrecondition
from qrelay.metrics_http import MetricsServer
from qrelay.testing import free_port
from tests.broker.conftest import broker_settings
from tests.conftest import owned_stack

# A second loopback address: the broker listens there, so metrics must too.
LISTEN_HOST = "127.0.0.2"


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    return False


async def test_metrics_bind_the_listen_host_log_where_and_require_the_token(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text("scrape-secret\n")
    port = free_port()
    settings = broker_settings(
        tmp_path,
        listen=f"{LISTEN_HOST}:0",
        metrics_port=port,
        metrics_token_file=token_file,
    )
    assert settings.metrics_bind_host == LISTEN_HOST
    with capture_logs() as logs:
        async with running_broker(settings):
            url = f"http://{LISTEN_HOST}:{port}/metrics"
            without = await anyio.to_thread.run_sync(get, url)
            wrong = await anyio.to_thread.run_sync(get, url, "not-the-token")
            status, body = await anyio.to_thread.run_sync(get, url, "scrape-secret")
            elsewhere = await anyio.to_thread.run_sync(refused, f"http://127.0.0.1:{port}/metrics")
    assert without[0] == 401
    assert "Authorization: Bearer" in without[1]
    assert wrong[0] == 401
    assert status == 200
    assert "qrelay_executors" in body
    assert elsewhere  # not on every interface: nothing listens on 127.0.0.1
    listening = [e for e in logs if e["event"] == "metrics.listening"]
    assert listening == [
        {"event": "metrics.listening", "url": url, "token": True, "log_level": "info"}
    ]
    assert "scrape-secret" not in repr(logs)


def test_metrics_host_can_be_chosen_apart_from_the_listen_host(tmp_path: Path) -> None:
    settings = BrokerSettings(listen="127.0.0.1:50051", metrics_host="127.0.0.3")
    assert settings.metrics_bind_host == "127.0.0.3"
    assert BrokerSettings(listen="0.0.0.0:1").metrics_bind_host == "0.0.0.0"


def test_metrics_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRELAY_METRICS_TOKEN", "from-env")
    assert BrokerSettings().metrics_token == "from-env"


def test_an_empty_metrics_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"metrics_token_file .* is empty"):
        BrokerSettings(metrics_token_file=empty)


def test_open_metrics_server_answers_without_a_token_and_404s_elsewhere() -> None:
    server = MetricsServer("127.0.0.1", 0)
    try:
        status, body = get(server.url)
        missing, _ = get(server.url.replace("/metrics", "/nope"))
    finally:
        server.stop()
    assert status == 200
    assert "python_info" in body  # the default registry (the executor's)
    assert missing == 404
    assert refused(server.url)  # stopped means closed


async def test_executor_metrics_bind_loopback_by_default_and_take_a_token(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text("exec-scrape")
    port = free_port()
    with capture_logs() as logs:
        async with owned_stack(
            backends=("aer",),
            executor={"metrics_port": port, "metrics_token_file": token_file, "programs": False},
        ):
            url = f"http://127.0.0.1:{port}/metrics"
            without = await anyio.to_thread.run_sync(get, url)
            status, body = await anyio.to_thread.run_sync(get, url, "exec-scrape")
    assert without[0] == 401
    assert status == 200
    assert "qrelay_executor_slots{" in body
    assert [e["url"] for e in logs if e["event"] == "metrics.listening"] == [url]


def test_a_metrics_port_in_use_is_a_failed_precondition_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FailedPrecondition, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            MetricsServer("127.0.0.1", port)
