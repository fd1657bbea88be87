"""The ideal simulator's Estimator path against Aer's own EstimatorV2, same pubs, same run.

One call per parameter point of a small VQE-style ansatz (RY layer, CX
chain, RY layer; a 3-term Hamiltonian), as an iterative loop makes them.
Two precisions: 0 (exact values) and Qiskit's default 1/64. For each call
the same pub goes to qiskit_aer.primitives.EstimatorV2 (`aer EstimatorV2`,
in this process) and to the executor's real `PrimitivePipeline` on backend
"aer" (`qrelay pipeline`: spec already encoded, as the executor receives
it; decoding, transpile cache, run and result encoding included). A third
row adds the client's side (encode the pubs, decode the result) to the
pipeline. Calls alternate between the paths so machine noise hits both
alike; the figure is the ratio of medians (target <= 1.2).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench._report import Report, arg_parser, median, ratio, summarize

SEED = 11
PRECISIONS = (0.0, 0.015625)
#: Row names in table order.
PATHS = ("aer EstimatorV2", "qrelay pipeline", "qrelay pipeline + client codec")
TARGET_RATIO = 1.2


def problem(num_qubits: int) -> tuple[Any, Any]:
    """(ansatz, Hamiltonian): RY-CX-RY on a line and a transverse-field Ising model."""
    from qiskit import QuantumCircuit
    from qiskit.circuit import ParameterVector
    from qiskit.quantum_info import SparsePauliOp

    theta = ParameterVector("θ", 2 * num_qubits)
    qc = QuantumCircuit(num_qubits)
    for q in range(num_qubits):
        qc.ry(theta[q], q)
    for q in range(num_qubits - 1):
        qc.cx(q, q + 1)
    for q in range(num_qubits):
        qc.ry(theta[num_qubits + q], q)
    terms = [("ZZ", [q, q + 1], -1.0) for q in range(num_qubits - 1)]
    terms += [("X", [q], -0.5) for q in range(num_qubits)]
    return qc, SparsePauliOp.from_sparse_list(terms, num_qubits=num_qubits)


class Paths:
    """The compared paths for one precision, each a call on one pub."""

    def __init__(self, precision: float) -> None:
        from qiskit_aer.primitives import EstimatorV2

        from qrelay.executor.backends import load_backend
        from qrelay.executor.pipeline import PrimitivePipeline
        from qrelay.executor.transpile import TranspileCache

        self.precision = precision
        self.aer_estimator = EstimatorV2(
            options={"default_precision": precision, "run_options": {"seed_simulator": SEED}}
        )
        self.pipeline = PrimitivePipeline(load_backend("aer"), TranspileCache())

    def spec(self, pub: Any) -> Any:
        """The JobSpec the SDK sends for `pub` (what the executor receives)."""
        from qrelay import codec
        from qrelay._proto.v1 import types_pb2

        spec = types_pb2.JobSpec(
            backend="aer", estimator=codec.encode_estimator_task([pub], self.precision)
        )
        spec.options.update({"simulator": {"seed_simulator": SEED}})
        return spec

    def aer(self, pub: Any) -> Any:
        return self.aer_estimator.run([pub]).result()[0].data.evs

    def qrelay(self, spec: Any) -> Any:
        return self.pipeline.run(spec, threading.Event())

    def qrelay_with_codec(self, pub: Any) -> Any:
        from qrelay import codec

        raw = self.qrelay(self.spec(pub))
        return codec.decode_primitive_result(raw.primitive)[0].data.evs


def time_paths(bench: Paths, pubs: list[Any]) -> dict[str, list[float]]:
    """Seconds per call of each path, calls alternating between the paths."""
    specs = [bench.spec(pub) for pub in pubs]
    call: dict[str, Callable[[int], Any]] = {
        PATHS[0]: lambda k: bench.aer(pubs[k]),
        PATHS[1]: lambda k: bench.qrelay(specs[k]),
        PATHS[2]: lambda k: bench.qrelay_with_codec(pubs[k]),
    }
    for fn in call.values():  # warm: imports, transpile cache, Aer start-up
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for k in range(len(pubs)):
        for name in PATHS if k % 2 == 0 else PATHS[::-1]:
            start = time.perf_counter()
            call[name](k)
            times[name].append(time.perf_counter() - start)
    return times


def run(num_qubits: int, calls: int) -> Report:
    report = Report(
        "estimator_ideal",
        title=f"ideal Estimator, one call per point: ms per call ({calls} calls)",
        parameters={
            "num_qubits": num_qubits,
            "calls": calls,
            "precisions": list(PRECISIONS),
            "seed": SEED,
            "target_ratio": TARGET_RATIO,
        },
    )
    circuit, hamiltonian = problem(num_qubits)
    rng = np.random.default_rng(SEED)
    points = rng.uniform(-np.pi, np.pi, (calls, circuit.num_parameters))
    for precision in PRECISIONS:
        pubs = [(circuit, hamiltonian, p) for p in points]
        times = time_paths(Paths(precision), pubs)
        for name in PATHS:
            stats = summarize(times[name], 1e3)
            report.add_row(
                precision=precision,
                path=name,
                calls=len(times[name]),
                p50=stats["p50"],
                p95=stats["p95"],
                mean=stats["mean"],
                ratio_p50_vs_aer=ratio(median(times[name]), median(times[PATHS[0]])),
            )
        key = "exact" if precision == 0 else f"precision_{precision:g}"
        report.figures[f"{key}.pipeline_over_aer_p50"] = ratio(
            median(times["qrelay pipeline"]), median(times[PATHS[0]])
        )
        report.figures[f"{key}.with_codec_over_aer_p50"] = ratio(
            median(times["qrelay pipeline + client codec"]), median(times[PATHS[0]])
        )
    worst = max(v for k, v in report.figures.items() if k.endswith("pipeline_over_aer_p50"))
    report.figures["pipeline_within_target"] = worst <= TARGET_RATIO
    return report


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        width = 0.8 / len(PATHS)
        for j, name in enumerate(PATHS):
            rows = [r for r in report.rows if r["path"] == name]
            xs = [i + j * width for i in range(len(rows))]
            ax.bar(xs, [r["p50"] for r in rows], width, label=name)
        ax.set_xticks(
            [i + width for i in range(len(PRECISIONS))],
            [f"precision {p:g}" for p in PRECISIONS],
        )
        ax.set_ylabel("ms per call (p50)")
        ax.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("estimator_ideal", __doc__)
    parser.add_argument("--num-qubits", type=int, default=2)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args(argv)
    if args.tiny:
        args.calls = 4
    report = run(args.num_qubits, args.calls)
    report.out_dir = args.results_dir
    report.finish(_plot(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
