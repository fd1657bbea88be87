"""QAOA for MaxCut on a small graph, as a qrelay program.

Cost operator C = sum over edges (1 - Z_i Z_j) / 2 counts cut edges; QAOA
with `p` layers (RZZ cost, RX mixer) is optimised with scipy's COBYLA on the
Estimator's <sum 0.5 Z_i Z_j>, then the optimised circuit is sampled and the
best sampled cut is reported next to the brute-force optimum.

`main(ctx, ...)` runs it beside the backend; `qaoa()` is plain Qiskit and
takes any V2 Estimator/Sampler, so the client loop
(`examples/qaoa/run_client_loop.py`) runs the same code remotely.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import ParameterVector
from qiskit.quantum_info import SparsePauliOp
from scipy.optimize import minimize

#: A 5-node graph: a triangle, a square sharing an edge with it, and a tail.
EDGES: list[tuple[int, int]] = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (3, 4)]
NUM_NODES = 5


def zz_operator(edges: list[tuple[int, int]], n: int) -> SparsePauliOp:
    """sum over edges of 0.5 Z_i Z_j; the expected cut is len(edges) / 2 - <this>."""
    terms = []
    for i, j in edges:
        label = ["I"] * n
        label[n - 1 - i] = label[n - 1 - j] = "Z"
        terms.append(("".join(label), 0.5))
    return SparsePauliOp.from_list(terms)


def qaoa_circuit(edges: list[tuple[int, int]], n: int, p: int) -> QuantumCircuit:
    """|+>^n, then p layers of exp(-i gamma ZZ) on edges and RX(2 beta) mixers."""
    gammas = ParameterVector("gamma", p)
    betas = ParameterVector("beta", p)
    qc = QuantumCircuit(n)
    qc.h(range(n))
    for layer in range(p):
        for i, j in edges:
            qc.rzz(2 * gammas[layer], i, j)
        qc.rx(2 * betas[layer], range(n))
    return qc


def cut_value(bitstring: str, edges: list[tuple[int, int]]) -> int:
    """Edges cut by a Qiskit bitstring (qubit 0 is the rightmost character)."""
    bits = bitstring[::-1]
    return sum(bits[i] != bits[j] for i, j in edges)


def brute_force(edges: list[tuple[int, int]], n: int) -> tuple[int, list[str]]:
    """The maximum cut and every bitstring achieving it."""
    cuts = {"".join(b): cut_value("".join(b), edges) for b in itertools.product("01", repeat=n)}
    best = max(cuts.values())
    return best, sorted(s for s, c in cuts.items() if c == best)


def qaoa(
    estimator: Any,
    sampler: Any,
    *,
    p: int = 2,
    maxiter: int = 40,
    seed: int = 11,
    shots: int = 2000,
    on_iteration: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Maximise the expected cut with COBYLA, then sample the optimum."""
    op = zz_operator(EDGES, NUM_NODES)
    circuit = qaoa_circuit(EDGES, NUM_NODES, p)
    offset = len(EDGES) / 2
    history: list[float] = []

    def negative_cut(params: np.ndarray) -> float:
        ev = float(estimator.run([(circuit, op, params)]).result()[0].data.evs)
        history.append(offset - ev)
        if on_iteration is not None:
            on_iteration(len(history), offset - ev)
        return ev - offset

    x0 = np.random.default_rng(seed).uniform(0, np.pi / 2, circuit.num_parameters)
    res = minimize(negative_cut, x0, method="COBYLA", options={"maxiter": maxiter, "rhobeg": 0.4})
    measured = circuit.measure_all(inplace=False)
    counts = sampler.run([(measured, res.x)], shots=shots).result()[0].data.meas.get_counts()
    best_bits = max(counts, key=lambda s: (cut_value(s, EDGES), counts[s]))
    optimum, optimal_bitstrings = brute_force(EDGES, NUM_NODES)
    top = max(counts, key=lambda s: counts[s])
    return {
        "expected_cut": -float(res.fun),
        "best_cut": cut_value(best_bits, EDGES),
        "best_bitstring": best_bits,
        "most_likely": top,
        "most_likely_cut": cut_value(top, EDGES),
        "p_optimal": sum(counts.get(s, 0) for s in optimal_bitstrings) / shots,
        "brute_force": optimum,
        "optimal_bitstrings": optimal_bitstrings,
        "evaluations": len(history),
        "history": history,
        "params": [float(x) for x in res.x],
    }


def main(
    ctx: Any, p: int = 2, maxiter: int = 40, seed: int = 11, shots: int = 2000
) -> dict[str, Any]:
    """Entry point "main:main": publishes {"iteration", "expected_cut"} per evaluation."""
    options = {"seed_simulator": seed}

    def publish(i: int, cut: float) -> None:
        ctx.publish({"iteration": i, "expected_cut": cut})

    return qaoa(
        ctx.estimator(options),
        ctx.sampler(options),
        p=p,
        maxiter=maxiter,
        seed=seed,
        shots=shots,
        on_iteration=publish,
    )
