"""The same QAOA driven from the client: one Estimator job per iteration, one Sampler job.

python -m examples.qaoa.run_client_loop --broker 127.0.0.1:50051 [--session]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

from rich.console import Console

from examples.qaoa.program.main import qaoa
from examples.qaoa.run_program import report
from examples.vqe.live import IterationView
from qrelay.client import Estimator, QRelayService, Sampler, Session


def run(
    service: QRelayService,
    *,
    p: int = 2,
    maxiter: int = 40,
    seed: int = 11,
    backend: str = "aer",
    session: bool = False,
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """The QAOA result dict, exactly as the program returns it."""
    with contextlib.ExitStack() as stack:
        mode: Any = service.backend(backend)
        if session:
            mode = stack.enter_context(Session(mode, max_time="10m"))
        options = {"seed_simulator": seed}
        estimator, sampler = Estimator(mode, options), Sampler(mode, options)
        if not live:
            return qaoa(estimator, sampler, p=p, maxiter=maxiter, seed=seed)
        title = f"QAOA client loop{' (session)' if session else ''}"
        view = IterationView(title, maxiter, label="expected cut", console=console, minimise=False)
        with view:
            return qaoa(
                estimator,
                sampler,
                p=p,
                maxiter=maxiter,
                seed=seed,
                on_iteration=view.update,
            )


def main(address: str, maxiter: int = 40, seed: int = 11, session: bool = False) -> None:
    console = Console()
    with QRelayService(address) as service:
        start = time.perf_counter()
        result = run(service, maxiter=maxiter, seed=seed, session=session, console=console)
        report(console, result, time.perf_counter() - start, "jobs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.environ.get("QRELAY_BROKER", "127.0.0.1:50051"))
    parser.add_argument("--maxiter", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--session", action="store_true", help="Run the loop in a Session.")
    args = parser.parse_args()
    main(args.broker, args.maxiter, args.seed, args.session)
