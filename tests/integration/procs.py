"""Real qrelay processes for crash tests (`kill -9` needs a process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A `python -m qrelay ...` child with its output in a log file."""

    def __init__(
        self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "qrelay", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "QRELAY_LOG_JSON": "1", **(env or {})},
        )

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_serving(address: str, proc: Proc, timeout: float = 30.0) -> None:
    """Block until the server's grpc.health.v1 says SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"process exited early:\n{proc.output()[-4000:]}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not serving after {timeout}s:\n{proc.output()[-4000:]}")


def start_broker(port: int, db: Path, log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    proc = Proc(
        ["broker", "serve", "--listen", f"127.0.0.1:{port}", "--db", str(db)],
        log_dir / "broker.log",
        env,
    )
    wait_serving(f"127.0.0.1:{port}", proc)
    return proc
