"""Upload the VQE program and run it beside the backend, with a live view of its energy.

    python -m examples.vqe.run_program --broker 127.0.0.1:50051

The whole optimisation runs on the executor; the client pays one round trip
to submit and then only listens to interim values (`job.interim_results()`).
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
    maxiter: int = 50,
    seed: int = 7,
    backend: str = "aer",
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Upload (deduplicated by content), run, follow; the program's return value."""
    program = service.upload_program(
        PROGRAM_DIR,
        name="vqe-h2",
        entry_point="main:main",
        input_schema=SCHEMA,
        description="VQE for H2 at 0.735 Å (COBYLA, RY/CX ansatz)",
    )
    job = service.run(program, {"maxiter": maxiter, "seed": seed}, backend=backend)
    if live and console is not None:
        console.print(f"{program} running as job {job.job_id()}", highlight=False)
    if live:
        with IterationView("VQE on " + backend, maxiter, console=console) as view:
            for interim in job.interim_results():
                view.update(interim["iteration"], interim["energy"])
    result: dict[str, Any] = job.result()
    return result


def main(address: str, maxiter: int = 40, seed: int = 7) -> None:
    console = Console()
    with QRelayService(address) as service:
        start = time.perf_counter()
        result = run(service, maxiter=maxiter, seed=seed, console=console)
        wall = time.perf_counter() - start
    error = result["energy"] - result["exact"]
    console.print(
        f"VQE energy [bold]{result['energy']:+.5f}[/] Ha vs exact {result['exact']:+.5f} Ha "
        f"(error {error:+.4f}; {result['evaluations']} evaluations, {wall:.1f} s wall)",
        highlight=False,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.environ.get("QRELAY_BROKER", "127.0.0.1:50051"))
    parser.add_argument("--maxiter", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    main(args.broker, args.maxiter, args.seed)
