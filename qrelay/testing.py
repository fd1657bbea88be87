"""A whole qrelay deployment in one process, for tests, benchmarks and demos.

`local_stack()` starts a real broker (SQLite file, ephemeral loopback port)
and real executors connected to it over gRPC, like temporalio's testing
environment: nothing is mocked, only co-located.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qrelay.broker.server import Broker, running_broker
from qrelay.broker.settings import BrokerSettings
from qrelay.executor.agent import Executor, running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.tls import ClientTLS


@dataclass
class LocalStack:
    """A running broker and its executors."""

    broker: Broker
    executors: list[Executor]
    db_path: Path
    _stack: AsyncExitStack = field(repr=False)
    _executor_defaults: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def address(self) -> str:
        return self.broker.address

    async def add_executor(self, backends: Sequence[str] = ("aer",), **overrides: Any) -> Executor:
        """Start one more executor connected to this broker; it stops with the stack."""
        settings = ExecutorSettings(
            **{
                **self._executor_defaults,
                "broker": self.broker.executor_address,
                "backends": list(backends),
                **overrides,
            }
        )
        executor = await self._stack.enter_async_context(running_executor(settings))
        self.executors.append(executor)
        return executor


@asynccontextmanager
async def local_stack(
    *,
    backends: Sequence[str] = ("aer",),
    executors: int = 1,
    slots: int = 2,
    db_path: Path | None = None,
    broker: dict[str, Any] | None = None,
    executor: dict[str, Any] | None = None,
) -> AsyncIterator[LocalStack]:
    """Start a broker on 127.0.0.1:0 and `executors` executors serving `backends`.

    `broker` and `executor` override settings fields (e.g. short lease TTLs
    in tests). Without `db_path` the SQLite file lives in a temporary
    directory removed on exit.
    """
    async with AsyncExitStack() as stack:
        if db_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qrelay-"))
            db_path = Path(tmp) / "broker.db"
        broker_settings = BrokerSettings(
            **{"listen": "127.0.0.1:0", "db_path": db_path, **(broker or {})}
        )
        running = await stack.enter_async_context(running_broker(broker_settings))
        env = LocalStack(
            broker=running,
            executors=[],
            db_path=db_path,
            _stack=stack,
            _executor_defaults={"slots": slots, **(executor or {})},
        )
        for _ in range(executors):
            await env.add_executor(backends)
        yield env


@contextmanager
def local_stack_in_thread(
    **kwargs: Any,
) -> Iterator[tuple[LocalStack, anyio.from_thread.BlockingPortal]]:
    """`local_stack` on a background event loop, so blocking (sync SDK) code can use it."""
    with (
        anyio.from_thread.start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(local_stack(**kwargs)) as env,
    ):
        yield env, portal


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers started as processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(
    address: str,
    proc: subprocess.Popen[bytes],
    timeout: float = 60.0,
    tls: ClientTLS | None = None,
) -> None:
    """Block until the server `proc` started answers grpc.health.v1 SERVING on `address`
    (over TLS with `tls`).

    Raises RuntimeError if the process exits first, TimeoutError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    channel = (
        grpc.insecure_channel(address)
        if tls is None
        else grpc.secure_channel(address, tls.credentials(), options=tls.options())
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited early with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not serving after {timeout:g}s")
