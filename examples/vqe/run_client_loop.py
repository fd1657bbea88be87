"""The same VQE driven from the client: one Estimator job per iteration.

    python -m examples.vqe.run_client_loop --broker 127.0.0.1:50051 [--session]

Same Hamiltonian, ansatz, optimizer, seed and maxiter as the program
(`examples/vqe/program/main.py`, imported here), so the answers agree; what
differs is that every iteration pays a client-broker-executor round trip.
Inside a `Session` the jobs are pinned to one executor and jump its queue.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

from rich.console import Console

from examples.vqe.live import IterationView
from examples.vqe.program.main import vqe
from qrelay.client import Estimator, QRelayService, Session


def run(
    service: QRelayService,
    *,
    maxiter: int = 50,
    seed: int = 7,
    backend: str = "aer",
    session: bool = False,
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """The VQE result dict, exactly as the program returns it."""
    with contextlib.ExitStack() as stack:
        mode: Any = service.backend(backend)
        if session:
            mode = stack.enter_context(Session(mode, max_time="10m"))
        estimator = Estimator(mode=mode, options={"seed_simulator": seed})
        if not live:
            return vqe(estimator, maxiter=maxiter, seed=seed)
        title = f"VQE client loop{' (session)' if session else ''}"
        with IterationView(title, maxiter, console=console) as view:
            return vqe(
                estimator,
                maxiter=maxiter,
                seed=seed,
                on_iteration=lambda i, e, _p: view.update(i, e),
            )


def main(address: str, maxiter: int = 40, seed: int = 7, session: bool = False) -> None:
    console = Console()
    with QRelayService(address) as service:
        start = time.perf_counter()
        result = run(service, maxiter=maxiter, seed=seed, session=session, console=console)
        wall = time.perf_counter() - start
    error = result["energy"] - result["exact"]
    console.print(
        f"VQE energy [bold]{result['energy']:+.5f}[/] Ha vs exact {result['exact']:+.5f} Ha "
        f"(error {error:+.4f}; {result['evaluations']} jobs, {wall:.1f} s wall)",
        highlight=False,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.environ.get("QRELAY_BROKER", "127.0.0.1:50051"))
    parser.add_argument("--maxiter", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--session", action="store_true", help="Run the loop in a Session.")
    args = parser.parse_args()
    main(args.broker, args.maxiter, args.seed, args.session)
