"""Client SDK fixtures: real brokers and executors (from tests/conftest.py), a TCP proxy.

The proxy sits between the SDK and the broker so a test can cut every live
connection at a chosen moment, the way a flaky network or a load balancer
restart does, and prove the SDK resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from qiskit import QuantumCircuit

from qrelay.client import AsyncQRelayService, QRelayService
from qrelay.errors import NotFound
from qrelay.executor.agent import running_executor
from qrelay.executor.settings import ExecutorSettings
from qrelay.testing import LocalStack

#: A backend that an executor announced once and then left: jobs for it wait.
OFFLINE_BACKEND = "fake_lima"


class TcpProxy:
    """A loopback TCP forwarder whose connections can all be dropped at once."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        #: While True, bytes from the broker are swallowed: requests arrive, answers
        #: never do (a response lost in the network).
        self.swallow_responses = False
        #: HTTP/2 streams the client opened (one per RPC), read off the wire.
        self.rpcs_started = 0

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, downstream=False)),
            asyncio.create_task(self._pump(up_reader, writer, downstream=True)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool
    ) -> None:
        frames = _Http2Frames() if not downstream else None
        try:
            while data := await reader.read(65536):
                if downstream and self.swallow_responses:
                    continue
                if frames is not None:
                    self.rpcs_started += frames.new_streams(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    def drop(self) -> int:
        """Abort every open connection (both sides); returns how many were cut."""
        cut = 0
        for w in list(self._writers):
            transport = w.transport
            if not transport.is_closing():
                transport.abort()
                cut += 1
        return cut

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


class _Http2Frames:
    """Counts client-opened streams (first HEADERS frame per stream id) in an HTTP/2 byte flow."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    HEADERS = 0x1

    def __init__(self) -> None:
        self._buf = b""
        self._preface_done = False
        self._seen: set[int] = set()

    def new_streams(self, data: bytes) -> int:
        self._buf += data
        if not self._preface_done:
            if len(self._buf) < len(self.PREFACE):
                return 0
            assert self._buf.startswith(self.PREFACE), "not an HTTP/2 client connection"
            self._buf = self._buf[len(self.PREFACE) :]
            self._preface_done = True
        opened = 0
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                break
            kind = self._buf[3]
            stream = int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            if kind == self.HEADERS and stream not in self._seen:
                self._seen.add(stream)
                opened += 1
            self._buf = self._buf[9 + length :]
        return opened


@pytest.fixture(autouse=True)
def no_saved_accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's own saved qrelay accounts out of every client test."""
    monkeypatch.setenv("QRELAY_ACCOUNTS_FILE", str(tmp_path / "no-accounts.json"))


@pytest.fixture
async def proxy(stack: LocalStack) -> AsyncIterator[TcpProxy]:
    p = TcpProxy(stack.address)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def aservice(stack: LocalStack) -> AsyncIterator[AsyncQRelayService]:
    async with AsyncQRelayService(stack.address, timeout=20.0) as svc:
        yield svc


@pytest.fixture
async def offline_backend(stack: LocalStack) -> str:
    """Make `OFFLINE_BACKEND` known to the broker, then take its only executor away."""
    settings = ExecutorSettings(broker=stack.address, backends=[OFFLINE_BACKEND], slots=1)
    async with running_executor(settings), AsyncQRelayService(stack.address) as svc:
        for _ in range(200):
            with contextlib.suppress(NotFound):
                if (await svc.backend(OFFLINE_BACKEND)).online:
                    break
            await asyncio.sleep(0.05)
    return OFFLINE_BACKEND


@pytest.fixture
def service(sync_stack: LocalStack) -> Iterator[QRelayService]:
    with QRelayService(sync_stack.address, timeout=20.0) as svc:
        yield svc


def bell() -> QuantumCircuit:
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    return qc


def one_qubit() -> QuantumCircuit:
    qc = QuantumCircuit(1)
    qc.x(0)
    qc.measure_all()
    return qc
