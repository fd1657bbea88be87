"""The WAN proxy forwards bytes faithfully, delays them, and shuts down cleanly."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from bench.echo import measure_rtt, running_echo_server
from bench.wanproxy import WanProxy


@asynccontextmanager
async def tcp_echo_server() -> AsyncIterator[tuple[str, int]]:
    """A plain TCP echo server that echoes until EOF, then half-closes back."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.send(await stream.receive())
            except anyio.EndOfStream:
                await stream.send_eof()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield ("127.0.0.1", port)
        finally:
            tg.cancel_scope.cancel()
    await listener.aclose()


async def read_all(stream: anyio.abc.SocketStream) -> bytes:
    chunks = []
    try:
        while True:
            chunks.append(await stream.receive())
    except anyio.EndOfStream:
        return b"".join(chunks)


async def test_proxy_forwards_every_byte_in_order_both_ways_with_jitter() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB in many chunks
    async with (
        tcp_echo_server() as target,
        WanProxy(target, one_way_delay_s=0.002, jitter_s=0.002, seed=7) as proxy,
    ):
        conn = await anyio.connect_tcp("127.0.0.1", proxy.port)
        with anyio.fail_after(30):
            async with conn, anyio.create_task_group() as tg:

                async def send_then_eof() -> None:
                    for i in range(0, len(payload), 10_000):
                        await conn.send(payload[i : i + 10_000])
                    await conn.send_eof()

                tg.start_soon(send_then_eof)
                echoed = await read_all(conn)
        assert echoed == payload
        assert proxy.stats.bytes_up == len(payload)
        assert proxy.stats.bytes_down == len(payload)


async def test_proxy_serves_many_connections_at_once() -> None:
    async with tcp_echo_server() as target, WanProxy(target, one_way_delay_s=0.001) as proxy:

        async def client(i: int, results: dict[int, bytes]) -> None:
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as conn:
                await conn.send(f"hello {i}".encode())
                await conn.send_eof()
                results[i] = await read_all(conn)

        results: dict[int, bytes] = {}
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(client, i, results)
        assert results == {i: f"hello {i}".encode() for i in range(50)}
        assert proxy.stats.connections == 50


async def test_proxy_never_delivers_before_the_round_trip_delay() -> None:
    """A lower bound only: the reply cannot arrive before 2 x one-way delay."""
    delay = 0.03
    async with (
        tcp_echo_server() as target,
        WanProxy(target, one_way_delay_s=delay) as proxy,
        await anyio.connect_tcp("127.0.0.1", proxy.port) as conn,
    ):
        for _ in range(3):
            start = time.perf_counter()
            await conn.send(b"ping")
            assert await conn.receive() == b"ping"
            assert time.perf_counter() - start >= 2 * delay


async def test_grpc_round_trip_through_proxy_includes_the_configured_delay() -> None:
    delay = 0.02
    async with running_echo_server() as address:
        host, port = address.rsplit(":", 1)
        async with WanProxy((host, int(port)), one_way_delay_s=delay) as proxy:
            samples = await measure_rtt(proxy.address, 5, warmup=1)
    assert len(samples) == 5
    assert min(samples) >= 2 * delay


async def test_closing_the_proxy_ends_open_connections() -> None:
    async with tcp_echo_server() as target:
        async with WanProxy(target) as proxy:
            conn = await anyio.connect_tcp("127.0.0.1", proxy.port)
            await conn.send(b"x")
            assert await conn.receive() == b"x"
            assert proxy.stats.active == 1
        with anyio.fail_after(10):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await conn.receive()
        await conn.aclose()
        assert proxy.stats.active == 0


async def test_unreachable_target_closes_the_client_connection() -> None:
    with anyio.fail_after(15):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        dead_port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.aclose()  # nothing listens there any more
        async with (
            WanProxy(("127.0.0.1", dead_port)) as proxy,
            await anyio.connect_tcp("127.0.0.1", proxy.port) as conn,
        ):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await conn.receive()


@pytest.mark.parametrize(("delay", "jitter"), [(-0.001, 0.0), (0.0, -1.0), (float("nan"), 0.0)])
def test_negative_or_nan_delay_is_rejected(delay: float, jitter: float) -> None:
    with pytest.raises(ValueError, match="delay and jitter must be finite and >= 0"):
        WanProxy(("127.0.0.1", 1), one_way_delay_s=delay, jitter_s=jitter)


def test_address_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        _ = WanProxy(("127.0.0.1", 1)).address
