"""Upload the QAOA MaxCut program and run it beside the backend, with a live view.

python -m examples.qaoa.run_program --broker 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from examples.vqe.live import IterationView
from qrelay.client import QRelayService

HERE = Path(__file__).resolve().parent
PROGRAM_DIR = HERE / "program"
SCHEMA = HERE / "schema.json"


def run(
    service: QRelayService,
    *,
    p: int = 2,
    maxiter: int = 40,
    seed: int = 11,
    backend: str = "aer",
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Upload (deduplicated by content), run, follow; the program's return value."""
    program = service.upload_program(
        PROGRAM_DIR,
        name="qaoa-maxcut",
        entry_point="main:main",
        input_schema=SCHEMA,
        description="QAOA MaxCut on a 5-node graph (COBYLA)",
    )
    job = service.run(program, {"p": p, "maxiter": maxiter, "seed": seed}, backend=backend)
    if live and console is not None:
        console.print(f"{program} running as job {job.job_id()}", highlight=False)
    if live:
        view = IterationView(
            "QAOA on " + backend, maxiter, label="expected cut", console=console, minimise=False
        )
        with view:
            for interim in job.interim_results():
                view.update(interim["iteration"], interim["expected_cut"])
    result: dict[str, Any] = job.result()
    return result


def report(console: Console, result: dict[str, Any], wall: float, what: str) -> None:
    console.print(
        f"QAOA best sampled cut [bold]{result['best_cut']}[/] ({result['best_bitstring']}) vs "
        f"brute force {result['brute_force']}; expected cut {result['expected_cut']:.3f}, "
        f"P(optimal) {result['p_optimal']:.2f} ({result['evaluations']} {what}, {wall:.1f} s)",
        highlight=False,
    )


def main(address: str, maxiter: int = 40, seed: int = 11) -> None:
    console = Console()
    with QRelayService(address) as service:
        start = time.perf_counter()
        result = run(service, maxiter=maxiter, seed=seed, console=console)
        report(console, result, time.perf_counter() - start, "evaluations")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.environ.get("QRELAY_BROKER", "127.0.0.1:50051"))
    parser.add_argument("--maxiter", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    main(args.broker, args.maxiter, args.seed)
