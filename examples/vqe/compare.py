"""Time one VQE three ways on loopback: as a program, as a client loop, in a Session.

    python -m examples.vqe.compare [--maxiter 50] [--broker HOST:PORT]

Without --broker an in-process stack (broker + one aer executor) is started.
Same optimizer, seed and maxiter in every mode, so the energies agree and
only the wall time differs: the program pays the client round trip once,
the client loop once per iteration. `--rtt-ms 40` puts a TCP proxy between
client and broker that delays each direction by half of that, like a WAN.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio.from_thread
from rich.console import Console
from rich.table import Table

from examples.vqe import run_client_loop, run_program
from qrelay.client import QRelayService
from qrelay.logging import configure_logging


@contextlib.contextmanager
def _broker(address: str | None) -> Iterator[str]:
    if address:
        yield address
        return
    from qrelay.testing import local_stack_in_thread

    with local_stack_in_thread(backends=("aer",)) as (env, _portal):
        yield env.address


class DelayProxy:
    """Loopback TCP proxy adding `one_way_s` of latency to every byte, order kept."""

    def __init__(self, upstream: str, one_way_s: float) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._delay = one_way_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        pumps = {
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        }
        self._tasks |= pumps
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks -= pumps
            writer.close()
            up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self._delay, data))
                if not data:
                    break
            await sender
        except (ConnectionError, OSError):
            sender.cancel()


@contextlib.contextmanager
def _delayed(address: str, rtt_ms: float) -> Iterator[str]:
    if rtt_ms <= 0:
        yield address
        return
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        proxy = DelayProxy(address, rtt_ms / 2000)
        yield portal.call(proxy.start)
        portal.call(proxy.stop)


def compare(address: str, maxiter: int, seed: int, repeats: int = 1) -> list[dict[str, Any]]:
    modes: dict[str, Callable[[QRelayService], dict[str, Any]]] = {
        "program": lambda s: run_program.run(s, maxiter=maxiter, seed=seed, live=False),
        "client loop": lambda s: run_client_loop.run(s, maxiter=maxiter, seed=seed, live=False),
        "client loop in Session": lambda s: run_client_loop.run(
            s, maxiter=maxiter, seed=seed, session=True, live=False
        ),
    }
    rows = []
    with QRelayService(address) as service:
        run_program.run(service, maxiter=8, seed=seed, live=False)  # upload, warm caches
        for name, fn in modes.items():
            walls, result = [], {}
            for _ in range(repeats):
                start = time.perf_counter()
                result = fn(service)
                walls.append(time.perf_counter() - start)
            rows.append(
                {
                    "mode": name,
                    "wall_s": min(walls),
                    "evaluations": result["evaluations"],
                    "energy": result["energy"],
                    "exact": result["exact"],
                }
            )
    base = rows[0]["wall_s"]
    for row in rows:
        row["ratio_vs_program"] = row["wall_s"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=None)
    parser.add_argument("--maxiter", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="Added client-broker RTT.")
    args = parser.parse_args()
    # The in-process broker and executor log here: warnings only, as `make demo` does.
    configure_logging(os.environ.get("QRELAY_LOG_LEVEL", "warning"))
    with _broker(args.broker) as address, _delayed(address, args.rtt_ms) as via:
        rows = compare(via, args.maxiter, args.seed, args.repeats)
    link = f"loopback + {args.rtt_ms:g} ms RTT" if args.rtt_ms > 0 else "loopback"
    table = Table(title=f"VQE H2, COBYLA maxiter={args.maxiter}, {link}")
    for col in ("mode", "evaluations", "wall s", "s / evaluation", "vs program", "energy"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(
            r["mode"],
            str(r["evaluations"]),
            f"{r['wall_s']:.2f}",
            f"{r['wall_s'] / r['evaluations'] * 1000:.1f} ms",
            f"{r['ratio_vs_program']:.2f}",
            f"{r['energy']:+.5f} (exact {r['exact']:+.5f})",
        )
    Console().print(table)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
