"""Raw gRPC echo round trip, direct and through the WAN proxy.

The floor every qrelay latency is compared with: one unary grpc.aio call
carrying a few bytes, no protobuf, no broker. Measured directly and through
`WanProxy` at several one-way delays, it also verifies the proxy: the round
trip through a proxy with one-way delay d should be about 2·d above the
direct round trip.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import grpc

from bench._report import Report, arg_parser, summarize
from bench.wanproxy import WanProxy

#: Full method name of the echo RPC (raw bytes in, the same bytes out).
ECHO_METHOD = "/qrelay.bench.v1.Echo/Echo"
#: How long to wait for a channel to connect before giving up.
_CONNECT_TIMEOUT_S = 10.0


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


@asynccontextmanager
async def running_echo_server(host: str = "127.0.0.1") -> AsyncIterator[str]:
    """A grpc.aio server with one raw-bytes echo method; yields `host:port`."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "qrelay.bench.v1.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    try:
        yield f"{host}:{port}"
    finally:
        await server.stop(grace=None)


async def measure_rtt(
    address: str, samples: int, *, payload: bytes = b"0123456789abcdef", warmup: int = 10
) -> list[float]:
    """`samples` sequential echo round trips in seconds, after `warmup` unrecorded ones."""
    async with grpc.aio.insecure_channel(address) as channel:
        with anyio.fail_after(_CONNECT_TIMEOUT_S):
            await channel.channel_ready()
        call = channel.unary_unary(ECHO_METHOD)
        out: list[float] = []
        for i in range(warmup + samples):
            start = time.perf_counter()
            reply = await call(payload, timeout=_CONNECT_TIMEOUT_S)
            elapsed = time.perf_counter() - start
            if reply != payload:
                raise RuntimeError("echo returned different bytes")
            if i >= warmup:
                out.append(elapsed)
        return out


def _samples_at(rtt_s: float, samples: int) -> int:
    """Fewer samples on slow links so each path takes a few seconds at most."""
    if rtt_s <= 0:
        return samples
    return max(20, min(samples, int(3.0 / rtt_s)))


async def run(samples: int, one_way_delays_ms: Sequence[float], jitter_ms: float) -> Report:
    report = Report(
        "echo",
        title="gRPC echo round trip, direct and through the WAN proxy (ms)",
        parameters={
            "samples": samples,
            "one_way_delays_ms": list(one_way_delays_ms),
            "jitter_ms": jitter_ms,
            "payload_bytes": 16,
        },
    )
    async with running_echo_server() as address:
        direct = summarize(await measure_rtt(address, samples), 1e3)
        report.add_row(path="direct", rtt_ms=0.0, **direct, extra_p50_ms=0.0)
        host, port = address.rsplit(":", 1)
        worst = 0.0
        for d_ms in one_way_delays_ms:
            async with WanProxy(
                (host, int(port)), one_way_delay_s=d_ms / 1e3, jitter_s=jitter_ms / 1e3, seed=1
            ) as proxy:
                n = _samples_at(2 * d_ms / 1e3, samples)
                stats = summarize(await measure_rtt(proxy.address, n), 1e3)
            extra = stats["p50"] - direct["p50"]
            report.add_row(
                path=f"proxy {2 * d_ms:g} ms RTT",
                rtt_ms=2 * d_ms,
                **stats,
                extra_p50_ms=extra,
            )
            if d_ms > 0:
                worst = max(worst, abs(extra - 2 * d_ms) / (2 * d_ms))
            else:
                report.figures["proxy_overhead_p50_ms"] = extra
        report.figures["direct_rtt_p50_ms"] = direct["p50"]
        report.figures["proxy_rtt_worst_relative_error"] = worst
    return report


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        rows = report.rows[1:]
        xs = [r["rtt_ms"] for r in rows]
        ax.plot(xs, xs, "k--", label="ideal (direct + 2·delay)", alpha=0.5)
        base = report.rows[0]["p50"]
        ax.errorbar(
            xs,
            [r["p50"] - base for r in rows],
            yerr=[[0 for _ in rows], [r["p99"] - r["p50"] for r in rows]],
            fmt="o",
            label="measured p50 - direct p50 (bar to p99)",
        )
        ax.set_xlabel("configured RTT (ms)")
        ax.set_ylabel("extra round-trip time (ms)")
        ax.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("echo", __doc__)
    parser.add_argument("--samples", type=int, default=2000, help="round trips per path")
    parser.add_argument(
        "--one-way-ms",
        type=float,
        nargs="+",
        default=[0.0, 5.0, 25.0, 50.0],
        help="proxy one-way delays to measure (RTT is twice)",
    )
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.samples, args.one_way_ms = 20, [0.0, 5.0]
    report = anyio.run(run, args.samples, args.one_way_ms, args.jitter_ms)
    report.out_dir = args.results_dir
    report.finish(
        _plot(report),
        columns=["path", "rtt_ms", "n", "p50", "p95", "p99", "extra_p50_ms"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
