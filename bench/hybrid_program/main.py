"""The hybrid_loop benchmark's VQE loop, also uploaded as a qrelay program.

One module so every mode runs literally the same algorithm: the benchmark
imports `vqe_loop` for the direct, client-loop and session modes, and the
program mode uploads this directory and calls `main(ctx, ...)` on the
executor, where `ctx.estimator` goes through the executor's own pipeline.
Each iteration: one Estimator call evaluating the energy at x and at the
parameter-shifted points (one PUB), then one gradient-descent step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def shifted_points(x: np.ndarray) -> np.ndarray:
    """Row 0 is x; rows 1..2P are x ± π/2 along each axis (parameter-shift rule)."""
    p = len(x)
    points = np.repeat(np.asarray(x, dtype=float)[None, :], 2 * p + 1, axis=0)
    for i in range(p):
        points[1 + 2 * i, i] += math.pi / 2
        points[2 + 2 * i, i] -= math.pi / 2
    return points


def step(x: np.ndarray, evs: np.ndarray, learning_rate: float) -> np.ndarray:
    """One gradient-descent step from the energies at `shifted_points(x)`."""
    grad = (evs[1::2] - evs[2::2]) / 2.0
    return np.asarray(x - learning_rate * grad)


def vqe_loop(
    evaluate: Callable[[np.ndarray], np.ndarray],
    x0: np.ndarray,
    iterations: int,
    learning_rate: float,
) -> tuple[list[float], list[float]]:
    """Run the loop; returns (energy per iteration, seconds per iteration)."""
    x = np.array(x0, dtype=float)
    energies: list[float] = []
    times: list[float] = []
    for _ in range(iterations):
        start = time.perf_counter()
        evs = np.asarray(evaluate(shifted_points(x)), dtype=float).reshape(-1)
        x = step(x, evs, learning_rate)
        times.append(time.perf_counter() - start)
        energies.append(float(evs[0]))
    return energies, times


def estimator_evaluate(estimator: Any, circuit: Any, observable: Any) -> Callable[[Any], Any]:
    """Evaluate with any BaseEstimatorV2: one PUB per call."""

    def evaluate(points: np.ndarray) -> np.ndarray:
        return np.asarray(estimator.run([(circuit, observable, points)]).result()[0].data.evs)

    return evaluate


def main(
    ctx: Any,
    circuit: Any,
    observable: Any,
    x0: list[float],
    iterations: int,
    learning_rate: float,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Program entry point: the loop beside the backend; returns energies and timings."""
    estimator = ctx.estimator(options)
    evaluate = estimator_evaluate(estimator, circuit, observable)
    energies, times = vqe_loop(evaluate, np.asarray(x0), iterations, learning_rate)
    return {"energies": energies, "iteration_seconds": times}
