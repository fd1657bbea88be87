"""VQE-style loop of K iterations at several RTTs: direct, client-loop, session, program.

Each iteration is one Estimator call (energy plus its parameter-shift
gradient, batched into one PUB) and one gradient-descent step. Modes:
direct (the same loop calling Aer in this process: the floor), client-loop
(one job per iteration through the broker, over the WAN proxy), session
(the client loop inside a Session) and program (the loop uploaded and run
on the executor, one round trip in all). Ratios are taken within one run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench._report import Report, arg_parser, median, ratio, summarize

#: Mode names in table order.
MODES = ("direct", "client-loop", "session", "program")
#: Estimator precision (target standard error) used by every mode.
PRECISION = 0.02
#: Seed for the simulator so every mode samples the same way.
SEED = 1234
#: Gradient-descent step size.
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class Problem:
    """A 4-qubit transverse-field Ising model and a hardware-efficient RY/CX ansatz."""

    num_qubits: int = 4

    def ansatz(self) -> Any:
        from qiskit import QuantumCircuit
        from qiskit.circuit import ParameterVector

        n = self.num_qubits
        theta = ParameterVector("θ", 2 * n)
        qc = QuantumCircuit(n)
        for q in range(n):
            qc.ry(theta[q], q)
        for q in range(n - 1):
            qc.cx(q, q + 1)
        for q in range(n):
            qc.ry(theta[n + q], q)
        return qc

    def hamiltonian(self) -> Any:
        from qiskit.quantum_info import SparsePauliOp

        n = self.num_qubits
        terms: list[tuple[str, list[int], float]] = [("ZZ", [q, q + 1], -1.0) for q in range(n - 1)]
        terms += [("X", [q], -0.5) for q in range(n)]
        return SparsePauliOp.from_sparse_list(terms, num_qubits=n)

    @property
    def num_parameters(self) -> int:
        return 2 * self.num_qubits

    def x0(self) -> np.ndarray:
        return np.random.default_rng(SEED).uniform(-0.5, 0.5, self.num_parameters)


def shifted_points(x: np.ndarray) -> np.ndarray:
    """Row 0 is x; rows 1..2P are x ± π/2 along each axis (parameter-shift rule)."""
    p = len(x)
    points = np.repeat(x[None, :], 2 * p + 1, axis=0)
    for i in range(p):
        points[1 + 2 * i, i] += math.pi / 2
        points[2 + 2 * i, i] -= math.pi / 2
    return points


def step(x: np.ndarray, evs: np.ndarray) -> np.ndarray:
    """One gradient-descent step from the energies at `shifted_points(x)`."""
    grad = (evs[1::2] - evs[2::2]) / 2.0
    return np.asarray(x - LEARNING_RATE * grad)


#: Given the (2P+1, P) parameter points, the energies at each.
Evaluate = Callable[[np.ndarray], np.ndarray]


def vqe_loop(
    evaluate: Evaluate, x0: np.ndarray, iterations: int
) -> tuple[list[float], list[float]]:
    """Run the loop; returns (energy per iteration, seconds per iteration)."""
    x = np.array(x0, dtype=float)
    energies: list[float] = []
    times: list[float] = []
    for _ in range(iterations):
        start = time.perf_counter()
        evs = np.asarray(evaluate(shifted_points(x)), dtype=float).reshape(-1)
        x = step(x, evs)
        times.append(time.perf_counter() - start)
        energies.append(float(evs[0]))
    return energies, times


def direct_evaluate(problem: Problem) -> Evaluate:
    """The floor: this process calls Aer, ansatz transpiled once.

    It uses the same estimator the executor runs (Qiskit's BackendEstimatorV2
    over AerSimulator, precision -> shots), so the modes differ only in where
    the loop runs and what travels, not in how expectation values are made.
    """
    from qiskit import transpile
    from qiskit.primitives import BackendEstimatorV2
    from qiskit_aer import AerSimulator

    backend = AerSimulator()
    isa = transpile(problem.ansatz(), backend, optimization_level=1, seed_transpiler=SEED)
    obs = problem.hamiltonian().apply_layout(isa.layout)
    estimator = BackendEstimatorV2(
        backend=backend, options={"default_precision": PRECISION, "seed_simulator": SEED}
    )

    def evaluate(points: np.ndarray) -> np.ndarray:
        return np.asarray(estimator.run([(isa, obs, points)]).result()[0].data.evs)

    return evaluate


def client_evaluate(problem: Problem, mode: Any) -> Evaluate:
    """One qrelay Estimator job per call, on `mode` (a backend or a session)."""
    from qrelay.client import Estimator

    estimator = Estimator(mode=mode)
    estimator.options.default_precision = PRECISION
    estimator.options.seed_simulator = SEED
    circuit, obs = problem.ansatz(), problem.hamiltonian()

    def evaluate(points: np.ndarray) -> np.ndarray:
        return np.asarray(estimator.run([(circuit, obs, points)]).result()[0].data.evs)

    return evaluate


def session_available() -> bool:
    import qrelay.client as client

    return hasattr(client, "Session")


def program_available() -> bool:
    import qrelay.client as client

    return hasattr(client, "upload_program") or hasattr(client.QRelayService, "upload_program")


@contextmanager
def broker_over_wan(rtt_ms: float) -> Iterator[tuple[Any, str, Any]]:
    """A local stack on a background loop and a WAN proxy in front of its broker.

    Yields (stack, proxy address, portal).
    """
    import anyio.from_thread

    from bench.wanproxy import WanProxy
    from qrelay.testing import local_stack

    with (
        anyio.from_thread.start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(local_stack(backends=("aer",), executors=1)) as env,
    ):
        host, port = env.address.rsplit(":", 1)
        proxy_cm = WanProxy((host, int(port)), one_way_delay_s=rtt_ms / 2e3)
        with portal.wrap_async_context_manager(proxy_cm) as proxy:
            yield env, proxy.address, portal


def health_rtt_ms(address: str, samples: int = 10) -> float:
    """Median grpc.health.v1 Check round trip to `address`: the link as the client sees it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        out = []
        for _ in range(samples):
            start = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            out.append(time.perf_counter() - start)
    return median(out) * 1e3


def run_broker_modes(
    problem: Problem, rtt_ms: float, iterations: int, modes: Sequence[str]
) -> dict[str, tuple[list[float], list[float]] | str]:
    """Every broker mode at one RTT; a string value says why a mode did not run."""
    from qrelay.client import QRelayService

    out: dict[str, tuple[list[float], list[float]] | str] = {}
    with broker_over_wan(rtt_ms) as (_env, address, _portal):
        out["link_rtt_ms"] = f"{health_rtt_ms(address):.2f}"
        with QRelayService(address) as service:
            backend = service.backend("aer")
            if "client-loop" in modes:
                evaluate = client_evaluate(problem, backend)
                evaluate(shifted_points(problem.x0()))  # warm: transpile cache, channel
                out["client-loop"] = vqe_loop(evaluate, problem.x0(), iterations)
            if "session" in modes:
                out["session"] = "not available in this build"
            if "program" in modes:
                out["program"] = "not available in this build"
    return out


def run(iterations: int, rtts_ms: Sequence[float], modes: Sequence[str]) -> Report:
    problem = Problem()
    report = Report(
        "hybrid_loop",
        title=f"VQE loop, K={iterations} iterations, wall time per mode and RTT",
        parameters={
            "iterations": iterations,
            "rtts_ms": list(rtts_ms),
            "modes": list(modes),
            "num_qubits": problem.num_qubits,
            "num_parameters": problem.num_parameters,
            "points_per_call": 2 * problem.num_parameters + 1,
            "precision": PRECISION,
            "seed": SEED,
            "learning_rate": LEARNING_RATE,
            "backend": "aer",
        },
    )
    evaluate = direct_evaluate(problem)
    evaluate(shifted_points(problem.x0()))  # warm-up
    d_energies, d_times = vqe_loop(evaluate, problem.x0(), iterations)
    direct_wall = sum(d_times)
    for rtt in rtts_ms:
        results = run_broker_modes(problem, rtt, iterations, modes)
        link = float(str(results.pop("link_rtt_ms")))
        walls: dict[str, float] = {"direct": direct_wall}
        per_mode: dict[str, tuple[list[float], list[float]] | str] = {
            "direct": (d_energies, d_times),
            **results,
        }
        for mode in modes:
            got = per_mode.get(mode, "not run")
            if isinstance(got, str):
                report.add_row(rtt_ms=rtt, link_rtt_ms=link, mode=mode, status=got)
                continue
            energies, times = got
            walls[mode] = sum(times)
            stats = summarize(times, 1e3)
            report.add_row(
                rtt_ms=rtt,
                link_rtt_ms=link,
                mode=mode,
                status="ok",
                wall_s=walls[mode],
                iter_p50_ms=stats["p50"],
                iter_p95_ms=stats["p95"],
                final_energy=energies[-1],
                vs_direct=ratio(walls[mode], direct_wall),
                vs_client_loop=math.nan,
            )
        client = walls.get("client-loop", math.nan)
        for row in report.rows:
            if row["rtt_ms"] == rtt and row.get("status") == "ok":
                row["vs_client_loop"] = ratio(row["wall_s"], client)
    report.figures["direct_wall_s"] = direct_wall
    report.figures["direct_final_energy"] = d_energies[-1]
    target = [r for r in report.rows if r["mode"] == "program" and r["rtt_ms"] == 50]
    if target and target[0]["status"] == "ok":
        report.figures["program_speedup_vs_client_loop_at_50ms"] = 1 / target[0]["vs_client_loop"]
        report.figures["program_vs_direct_at_50ms"] = target[0]["vs_direct"]
    else:
        report.note("program mode not available in this build: targets at 50 ms not measured")
    return report


def _plot(report: Report) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for mode in MODES:
            rows = [r for r in report.rows if r["mode"] == mode and r["status"] == "ok"]
            if rows:
                ax.plot(
                    [r["rtt_ms"] for r in rows],
                    [r["wall_s"] for r in rows],
                    "o-",
                    label=mode,
                )
        ax.set_xlabel("round-trip time client↔broker (ms)")
        ax.set_ylabel("wall time of the loop (s)")
        ax.set_yscale("log")
        ax.legend()

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser("hybrid_loop", __doc__)
    parser.add_argument("--iterations", "-k", type=int, default=100)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 10.0, 50.0, 100.0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    if args.tiny:
        args.iterations, args.rtt_ms = 3, [10.0]
    report = run(args.iterations, args.rtt_ms, args.modes)
    report.out_dir = args.results_dir
    report.finish(
        _plot(report),
        columns=[
            "rtt_ms",
            "link_rtt_ms",
            "mode",
            "status",
            "wall_s",
            "iter_p50_ms",
            "iter_p95_ms",
            "vs_direct",
            "vs_client_loop",
            "final_energy",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
