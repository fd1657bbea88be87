"""A loopback TCP proxy that makes a link look like a WAN.

Placed between a client and the broker, it delays every chunk of bytes by a
one-way delay (plus optional jitter) in each direction, so a proxy with
`one_way_delay_s=0.025` behaves like a 50 ms round-trip link. Each direction
of each connection is a pipeline — a reader stamps chunks with the time they
are due and a writer releases them then — rather than sleeping per chunk in
series, so bandwidth is not capped by the delay (a link with latency, not a
slow link). TCP never reorders, so jittered due times are clamped to be
non-decreasing per direction: jitter delays, it never reorders.

    async with WanProxy(("127.0.0.1", broker_port), one_way_delay_s=0.025) as proxy:
        channel = grpc.aio.insecure_channel(proxy.address)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = structlog.get_logger(__name__)

#: Largest chunk read at once; big enough for bulk transfer, small enough to interleave.
_CHUNK = 64 * 1024
#: Chunks buffered per direction before the reader waits (backpressure, ~16 MiB worst case).
_BUFFER_CHUNKS = 256
#: How long connecting to the target may take before the client connection is dropped.
_CONNECT_TIMEOUT_S = 5.0

#: A chunk and the loop time it is due; `None` data marks end of stream.
_Item = tuple[float, bytes | None]


@dataclass
class ProxyStats:
    """Counters a benchmark can report next to its figures."""

    connections: int = 0
    active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class WanProxy:
    """Async context manager running the proxy on `listen_host`, ephemeral port.

    `one_way_delay_s` and `jitter_s` may be changed while running; chunks
    read afterwards get the new delay (never earlier than chunks before them).
    Jitter is uniform in [-jitter_s, +jitter_s] around the delay, floored at 0.
    """

    def __init__(
        self,
        target: tuple[str, int],
        one_way_delay_s: float = 0.0,
        jitter_s: float = 0.0,
        *,
        listen_host: str = "127.0.0.1",
        seed: int | None = None,
    ) -> None:
        if one_way_delay_s < 0 or jitter_s < 0 or not math.isfinite(one_way_delay_s + jitter_s):
            raise ValueError("delay and jitter must be finite and >= 0")
        self.target = target
        self.one_way_delay_s = one_way_delay_s
        self.jitter_s = jitter_s
        self.stats = ProxyStats()
        self._listen_host = listen_host
        self._rng = random.Random(seed)
        self._port: int | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("WanProxy is not running")
        return self._port

    @property
    def address(self) -> str:
        """`host:port` to dial instead of the target."""
        return f"{self._listen_host}:{self.port}"

    async def __aenter__(self) -> WanProxy:
        listener = await anyio.create_tcp_listener(local_host=self._listen_host, local_port=0)
        self._listener = listener
        self._port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._serve, listener, self._tg)
        log.debug(
            "wanproxy.started",
            address=self.address,
            target=self.target,
            one_way_delay_s=self.one_way_delay_s,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._tg is None or self._listener is None:
            raise RuntimeError("WanProxy was not entered")
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            await self._listener.aclose()
            self._port = None
            log.debug("wanproxy.stopped", connections=self.stats.connections)

    async def _serve(
        self, listener: anyio.abc.Listener[anyio.abc.SocketStream], tg: anyio.abc.TaskGroup
    ) -> None:
        await listener.serve(self._handle, task_group=tg)

    def _due(self, now: float, last_due: float) -> float:
        delay = self.one_way_delay_s
        if self.jitter_s:
            delay = max(0.0, delay + self._rng.uniform(-self.jitter_s, self.jitter_s))
        return max(now + delay, last_due)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        try:
            async with client:
                try:
                    with anyio.fail_after(_CONNECT_TIMEOUT_S):
                        upstream = await anyio.connect_tcp(*self.target)
                except (OSError, TimeoutError) as exc:
                    log.warning("wanproxy.connect_failed", target=self.target, error=str(exc))
                    return
                async with upstream, anyio.create_task_group() as tg:
                    tg.start_soon(self._direction, client, upstream, True, tg)
                    tg.start_soon(self._direction, upstream, client, False, tg)
        finally:
            self.stats.active -= 1

    async def _direction(
        self,
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        up: bool,
        conn_tg: anyio.abc.TaskGroup,
    ) -> None:
        """One direction: reader stamps chunks, writer releases them when due."""
        send, receive = anyio.create_memory_object_stream[_Item](_BUFFER_CHUNKS)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write_when_due, receive, dst, conn_tg)
            await self._read_and_stamp(src, send, up, conn_tg)

    async def _read_and_stamp(
        self,
        src: anyio.abc.SocketStream,
        send: MemoryObjectSendStream[_Item],
        up: bool,
        conn_tg: anyio.abc.TaskGroup,
    ) -> None:
        last_due = 0.0
        async with send:
            while True:
                try:
                    data: bytes | None = await src.receive(_CHUNK)
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    data = None
                except anyio.BrokenResourceError:
                    # Peer reset: drop the whole connection, as a real link would.
                    conn_tg.cancel_scope.cancel()
                    return
                last_due = self._due(anyio.current_time(), last_due)
                await send.send((last_due, data))
                if data is None:
                    return
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)

    async def _write_when_due(
        self,
        receive: MemoryObjectReceiveStream[_Item],
        dst: anyio.abc.SocketStream,
        conn_tg: anyio.abc.TaskGroup,
    ) -> None:
        async with receive:
            async for due, data in receive:
                await anyio.sleep_until(due)
                try:
                    if data is None:
                        await dst.send_eof()
                        return
                    await dst.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    conn_tg.cancel_scope.cancel()
                    return
