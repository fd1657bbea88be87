"""Time one VQE three ways on loopback: as a program, as a client loop, in a Session.

    python -m examples.vqe.compare [--maxiter 50] [--broker HOST:PORT]

Without --broker an in-process stack (broker + one aer executor) is started.
Same optimizer, seed and maxiter in every mode, so the energies agree and
only the wall time differs: the program pays the client round trip once,
the client loop once per iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from examples.vqe import run_client_loop, run_program
from qrelay.client import QRelayService


@contextlib.contextmanager
def _broker(address: str | None) -> Iterator[str]:
    if address:
        yield address
        return
    from qrelay.testing import local_stack_in_thread

    with local_stack_in_thread(backends=("aer",)) as (env, _portal):
        yield env.address


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
    args = parser.parse_args()
    with _broker(args.broker) as address:
        rows = compare(address, args.maxiter, args.seed, args.repeats)
    table = Table(title=f"VQE H2, COBYLA maxiter={args.maxiter}, loopback")
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
