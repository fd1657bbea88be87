"""A 100-point parameter sweep through the executor's pipeline: transpilations and time per point.

One job per point (the same parametrised circuit, new parameter values), as
a client-side sweep or an optimizer sends them. Three passes over the same
points on the executor's real `PrimitivePipeline`: without a cache (a fresh
`TranspileCache` per point, so every point transpiles), cold (one fresh
cache for the sweep) and warm (the same cache again). The cache's own miss
counter says how many transpilations ran.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench._report import Report, arg_parser, ratio, summarize

SEED = 7


def sweep_specs(backend: str, points: int, shots: int, num_qubits: int, reps: int) -> list[Any]:
    """One Sampler JobSpec per point: an EfficientSU2 ansatz with seeded random angles."""
    from qiskit.circuit.library import efficient_su2

    from qrelay import codec
    from qrelay._proto.v1 import types_pb2

    circuit = efficient_su2(num_qubits, reps=reps, entanglement="linear")
    circuit.measure_all()
    rng = np.random.default_rng(SEED)
    values = rng.uniform(-np.pi, np.pi, (points, circuit.num_parameters))
    specs = []
    for row in values:
        task = codec.encode_sampler_task([(circuit, row)], shots)
        spec = types_pb2.JobSpec(backend=backend, sampler=task)
        spec.options.update({"simulator": {"seed_simulator": SEED}})
        specs.append(spec)
    return specs


def run_pass(
    specs: Sequence[Any], pipeline_for: Callable[[int], Any]
) -> tuple[list[float], int, int]:
    """Run every spec; returns (seconds per point, transpilations, cache hits)."""
    times: list[float] = []
    misses = hits = 0
    for i, spec in enumerate(specs):
        pipeline = pipeline_for(i)
        before = pipeline.cache.stats()
        start = time.perf_counter()
        pipeline.run(spec, threading.Event())
        times.append(time.perf_counter() - start)
        after = pipeline.cache.stats()
        misses += after["misses"] - before["misses"]
        hits += after["hits"] - before["hits"]
    return times, misses, hits


def run(
    backend_names: Sequence[str], points: int, shots: int, num_qubits: int, reps: int
) -> Report:
    report = Report(
        "transpile_cache",
        title=f"{points}-point sweep: transpilations and time per point (ms)",
        parameters={
            "backends": list(backend_names),
            "points": points,
            "shots": shots,
            "ansatz": f"efficient_su2({num_qubits}, reps={reps}, linear) + measure_all",
            "seed": SEED,
        },
    )
    for name in backend_names:
        sweep_backend(report, name, points, shots, num_qubits, reps)
    return report


def sweep_backend(
    report: Report, backend_name: str, points: int, shots: int, num_qubits: int, reps: int
) -> None:
    """The three passes on one backend, a row each, plus speed-up figures."""
    from qrelay.executor.backends import load_backend
    from qrelay.executor.pipeline import PrimitivePipeline
    from qrelay.executor.transpile import TranspileCache

    backend = load_backend(backend_name)
    specs = sweep_specs(backend_name, points, shots, num_qubits, reps)
    # Warm the interpreter (imports, Aer start-up) so the first pass isn't charged for it.
    PrimitivePipeline(backend, TranspileCache()).run(specs[0], threading.Event())

    def fresh(_: int) -> Any:
        return PrimitivePipeline(backend, TranspileCache())

    shared = PrimitivePipeline(backend, TranspileCache())
    passes = {
        "no cache": fresh,
        "cold": lambda i: shared,
        "warm": lambda i: shared,
    }
    totals: dict[str, float] = {}
    for mode, pipeline_for in passes.items():
        times, misses, hits = run_pass(specs, pipeline_for)
        totals[mode] = sum(times)
        stats = summarize(times, 1e3)
        report.add_row(
            backend=backend_name,
            mode=mode,
            points=len(times),
            transpilations=misses,
            cache_hits=hits,
            first_ms=times[0] * 1e3,
            p50=stats["p50"],
            p95=stats["p95"],
            mean=stats["mean"],
            total_s=totals[mode],
        )
    report.figures[f"{backend_name}.speedup_cold_vs_no_cache"] = ratio(
        totals["no cache"], totals["cold"]
    )
    report.figures[f"{backend_name}.speedup_warm_vs_no_cache"] = ratio(
        totals["no cache"], totals["warm"]
    )
    report.figures[f"{backend_name}.ms_per_point_saved_warm"] = (
        (totals["no cache"] - totals["warm"]) / points * 1e3
    )


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        modes = [r["mode"] for r in report.rows]
        ax.bar(modes, [r["p50"] for r in report.rows], label="p50")
        ax.scatter(
            modes, [r["p95"] for r in report.rows], color="k", marker="_", s=400, label="p95"
        )
        for i, r in enumerate(report.rows):
            ax.annotate(f"{r['transpilations']} transpilations", (i, r["p50"]), ha="center")
        ax.set_ylabel("time per point (ms)")
        ax.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("transpile_cache", __doc__)
    parser.add_argument("--backends", nargs="+", default=["aer", "fake_manila"])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--shots", type=int, default=256)
    parser.add_argument("--num-qubits", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.tiny:
        args.points, args.shots, args.backends = 4, 16, ["aer"]
    report = run(args.backends, args.points, args.shots, args.num_qubits, args.reps)
    report.out_dir = args.results_dir
    report.finish(_plot(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
