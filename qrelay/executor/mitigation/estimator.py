"""The Estimator with error suppression and mitigation, on a backend's ISA pubs.

For every pub: bind parameters, group the observables' Pauli terms into
qubit-wise commuting measurement bases, then build one circuit per (binding,
noise factor, randomization, basis): 2-qubit gates folded (ZNE), gates Pauli
twirled, basis rotation, measurements twirled, DD pulses in idle windows. All
circuits of a job go to the backend in one run. Readout is corrected per qubit
with the cached calibration (TREX when measurements are twirled, or M3), each
Pauli term is extrapolated to zero noise separately (Runtime's "heterogeneous"
fit) and the observables are summed from their terms.

Result data as Runtime's: ``evs``, ``stds``, and with ZNE
``evs_noise_factors``, ``stds_noise_factors`` (shape + (n_factors,)) and
``evs_extrapolated``, ``stds_extrapolated`` (shape + (n_extrapolators,
n_evaluation_points)). Metadata says which techniques ran, the shots per
circuit, the shot overhead, and any option that could not act on the backend.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import structlog
from qiskit.circuit import QuantumCircuit
from qiskit.primitives import DataBin, PrimitiveResult, PubResult
from qiskit.primitives.containers.estimator_pub import EstimatorPub
from qiskit.quantum_info import Pauli, PauliList

from qrelay.errors import InvalidArgument
from qrelay.executor.mitigation import circuits as cx
from qrelay.executor.mitigation.calibration import (
    CalibrationCache,
    QubitCalibration,
    default_calibrations,
    m3_distance,
    run_options,
)
from qrelay.executor.mitigation.extrapolation import Fit, FitFailed, fit
from qrelay.executor.mitigation.techniques import DEFAULT_PRECISION, Techniques, resolve_estimator
from qrelay.options import EstimatorOptions, options_from_wire

__all__ = ["estimator_shots", "resolved_precision", "run_estimator", "shots_for_precision"]

log = structlog.get_logger(__name__)


def _options(options: EstimatorOptions | Mapping[str, Any] | None) -> EstimatorOptions:
    if options is None:
        return EstimatorOptions()
    if isinstance(options, EstimatorOptions):
        return options
    made = options_from_wire("estimator", options)
    assert isinstance(made, EstimatorOptions)
    return made


def estimator_shots(opts: EstimatorOptions, pub_precision: float | None) -> tuple[int, float]:
    """(shots per circuit configuration, target precision), Runtime's rule: a pub's own
    precision wins; else default_shots; else default_precision; else Runtime's default.

    The caller leaves `pub_precision` None for pubs whose precision comes from no
    pub (the run-level precision is filled in only without default_shots).
    """
    if pub_precision is None and opts.default_shots is not None:
        return opts.default_shots, 1 / math.sqrt(opts.default_shots)
    precision = resolved_precision(pub_precision, opts)
    return shots_for_precision(precision), precision


def resolved_precision(pub_precision: float | None, opts: EstimatorOptions) -> float:
    """The pub's precision, else default_precision, else Runtime's default (0 is a value)."""
    if pub_precision is not None:
        return pub_precision
    if opts.default_precision is not None:
        return opts.default_precision
    return DEFAULT_PRECISION


def shots_for_precision(precision: float) -> int:
    """ceil(1 / precision**2), for a precision > 0 that may be tiny (1e-300 squares to 0).

    Huge values are returned as they are: the shot budget check refuses them.
    """
    squared = precision * precision
    if squared <= 0 or not math.isfinite(1 / squared):
        return 2**63 - 1
    return math.ceil(min(1 / squared, 2**63 - 1))


@dataclass
class _Execution:
    """One circuit to run and how to read its bits."""

    circuit: QuantumCircuit
    param: tuple[int, ...]
    group: int
    factor_index: int
    flips: np.ndarray  # uint8 per measured qubit (zeros without measurement twirling)
    qubits: list[int]


@dataclass
class _PubPlan:
    pub: EstimatorPub
    shots: int
    precision: float
    randomizations: int
    shots_per_randomization: int
    groups: dict[tuple[int, ...], list[tuple[str, list[str]]]]  # param -> [(basis, labels)]
    achieved: dict[tuple[int, ...], list[float]] = field(default_factory=dict)
    executions: list[_Execution] = field(default_factory=list)


def _bare(circuit: QuantumCircuit) -> QuantumCircuit:
    """The circuit without its TranspileLayout: every circuit copy (folding, each twirl)
    deep-copies it otherwise, which cost more than the twirling itself (measured)."""
    circuit._layout = None
    return circuit


def _group(labels: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Qubit-wise commuting groups as (measurement basis, member labels)."""
    labels = sorted({lab for lab in labels if set(lab) != {"I"}})
    if not labels:
        return []
    out = []
    for grp in PauliList(labels).group_qubit_wise_commuting():
        members = grp.to_labels()
        basis = [next((m[i] for m in members if m[i] != "I"), "I") for i in range(len(members[0]))]
        out.append(("".join(basis), members))
    return out


def _plan(
    pub: EstimatorPub,
    tech: Techniques,
    opts: EstimatorOptions,
    rng: np.random.Generator,
    target: Any,
) -> _PubPlan:
    shots, precision = estimator_shots(opts, pub.precision)
    nr, spr = tech.twirl.split(shots)
    # remove_final_measurements round-trips through a DAG (~2 ms on a 150-gate circuit,
    # measured): only pay it when there is a measurement to remove.
    src = pub.circuit
    has_measure = "measure" in src.count_ops()
    circuit = _bare(src.remove_final_measurements(inplace=False) if has_measure else src.copy())
    params = pub.parameter_values
    param_indices = np.fromiter(np.ndindex(params.shape), dtype=object).reshape(params.shape)
    bc_param, bc_obs = np.broadcast_arrays(param_indices, pub.observables)
    labels: dict[tuple[int, ...], set[str]] = defaultdict(set)
    for index in np.ndindex(*bc_param.shape):
        labels[tuple(bc_param[index])].update(bc_obs[index])
    plan = _PubPlan(
        pub=pub,
        shots=shots,
        precision=precision,
        randomizations=nr,
        shots_per_randomization=spr,
        groups={p: _group(labs) for p, labs in labels.items()},
    )
    factors = tech.zne.noise_factors if tech.zne else (1.0,)
    amplifier = tech.zne.amplifier if tech.zne else "gate_folding"
    for p, groups in plan.groups.items():
        if not groups:
            continue
        bound = (
            circuit.assign_parameters(params[p].as_array()) if params.num_parameters else circuit
        )
        plan.achieved[p] = []
        for fi, factor in enumerate(factors):
            folded, achieved = cx.fold_2q_gates(bound, factor, amplifier, rng, target)
            plan.achieved[p].append(achieved)
            if tech.twirl.gates:
                variants = cx.twirl_2q_gates(folded, nr, int(rng.integers(2**31)), target)
            else:
                variants = [folded] * nr
            for gi, (basis, _) in enumerate(groups):
                k = sum(1 for c in basis if c != "I")
                for variant in variants:
                    flips = (
                        rng.integers(0, 2, size=k, dtype=np.uint8)
                        if tech.twirl.measure
                        else np.zeros(k, dtype=np.uint8)
                    )
                    measured, qubits = cx.measure_in_basis(variant, basis, flips, target)
                    plan.executions.append(_Execution(measured, p, gi, fi, flips, qubits))
    return plan


def _bits(counts: Mapping[str, int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(outcomes as uint8 bits [n, k] with column i = clbit i, counts [n]) of our register."""
    keys = list(counts)
    bits = np.zeros((len(keys), k), dtype=np.uint8)
    for row, key in enumerate(keys):
        ours = key.split(" ")[0]  # the measurement register was added last: leftmost
        bits[row] = np.frombuffer(ours[::-1].encode(), dtype=np.uint8) - ord("0")
    return bits, np.array([counts[key] for key in keys], dtype=np.float64)


class _TermStats:
    """Per-randomization sums for one (param, label, noise factor)."""

    def __init__(self) -> None:
        self.means: list[float] = []
        self.sq: float = 0.0
        self.n: float = 0.0
        self.total: float = 0.0

    def add(self, values: np.ndarray, counts: np.ndarray) -> None:
        n = float(counts.sum())
        s = float(values @ counts)
        self.means.append(s / n)
        self.sq += float((values**2) @ counts)
        self.total += s
        self.n += n

    def result(self) -> tuple[float, float]:
        """Mean and standard error: the larger of the spread over randomizations
        (which includes the twirl-to-twirl variation) and the pooled shot noise
        (a floor the spread of few randomizations can randomly undercut)."""
        mean = self.total / self.n
        var = max(self.sq / self.n - mean**2, 0.0)
        std = math.sqrt(var / self.n)
        if len(self.means) >= 2:
            std = max(std, float(np.std(self.means, ddof=1) / math.sqrt(len(self.means))))
        return mean, std


def _term_values(
    label: str,
    qubits: list[int],
    bits: np.ndarray,
    flips: np.ndarray,
    weights: dict[int, np.ndarray] | None,
) -> np.ndarray:
    """Per-outcome estimate of <label>; readout-corrected when weights are given."""
    n = len(label)
    values = np.ones(len(bits))
    for i, q in enumerate(qubits):
        if label[n - 1 - q] == "I":
            continue
        sign = -1.0 if flips[i] else 1.0
        col = bits[:, i]
        if weights is None:
            values *= sign * (1.0 - 2.0 * col)
        else:
            values *= sign * weights[q][col]
    return values


def _logical_counts(counts: Mapping[str, int], flips: np.ndarray) -> dict[str, int]:
    """Our register's counts with measurement-twirl flips undone (key char -1-i = bit i)."""
    mask = "".join("1" if f else "0" for f in flips[::-1])
    out: dict[str, int] = defaultdict(int)
    for key, c in counts.items():
        ours = key.split(" ")[0]
        if "1" in mask:
            ours = "".join("1" if a != b else "0" for a, b in zip(ours, mask, strict=True))
        out[ours] += c
    return out


def _m3_values(label: str, qubits: list[int], quasi: Any, shots: float) -> tuple[float, float]:
    """<label> from M3 quasi-probabilities over `qubits` (rightmost key char = qubits[0])."""
    n = len(label)
    op = "".join("I" if label[n - 1 - q] == "I" else "Z" for q in reversed(qubits))
    value = float(quasi.expval(op))
    overhead = float(getattr(quasi, "mitigation_overhead", 1.0) or 1.0)
    return value, math.sqrt(max(overhead - value**2, 0.0) / shots) if shots else 0.0


def _m3(cals: dict[int, QubitCalibration], num_qubits: int, symmetric: bool) -> Any:
    """An mthree corrector from our calibrations. Twirled readout is a symmetric flip
    with the average error, so twirled counts (flips undone) use symmetrized matrices."""
    import mthree

    mit = mthree.M3Mitigation(None)
    matrices: list[Any] = [None] * num_qubits
    for q, cal in cals.items():
        m = cal.matrix
        if symmetric:
            p = (cal.p01 + cal.p10) / 2
            m = np.array([[1 - p, p], [p, 1 - p]])
        matrices[q] = m.astype(np.float32)
    mit.single_qubit_cals = matrices
    mit.num_qubits = num_qubits
    return mit


def run_estimator(
    backend: Any,
    isa_pubs: Iterable[Any],
    options: EstimatorOptions | Mapping[str, Any] | None = None,
    precision: float | None = None,
    seed: int | None = None,
    *,
    calibrations: CalibrationCache | None = None,
) -> PrimitiveResult[PubResult]:
    """Run ISA estimator pubs on `backend` (a qrelay Backend) with the options' techniques.

    Blocking (simulation, fitting): call it from a worker thread. Returns a Qiskit
    `PrimitiveResult` exactly as the reference primitives shape it, plus Runtime's
    ZNE fields and mitigation metadata.
    """
    started = time.perf_counter()
    opts = _options(options)
    tech = resolve_estimator(opts, backend)
    if seed is None:
        seed = opts.effective_seed()
        if seed is None:
            seed = opts.seed_estimator
    rng = np.random.default_rng(seed)
    qk = getattr(backend, "qiskit", backend)
    target = qk.target
    pubs = [EstimatorPub.coerce(p, precision) for p in isa_pubs]
    for i, pub in enumerate(pubs):
        if pub.circuit.num_qubits > qk.num_qubits:
            raise InvalidArgument(
                f"pub {i}: circuit has {pub.circuit.num_qubits} qubits but backend "
                f"'{getattr(backend, 'name', '?')}' has {qk.num_qubits}"
            )
    exact = [i for i, pub in enumerate(pubs) if _pub_precision(pub, opts) == 0]
    if getattr(backend, "ideal", False) and (exact or not tech.active):
        if exact and tech.active:
            tech.notes.append(
                "precision 0 gives exact expectation values on the ideal simulator: "
                "there is no noise to mitigate, so no technique ran"
            )
        return _ideal(qk, pubs, opts, tech, seed)
    if exact:
        raise InvalidArgument(
            f"pub {exact[0]}: precision 0 asks for exact expectation values, which only the "
            f"ideal simulator 'aer' gives; backend '{getattr(backend, 'name', '?')}' samples "
            "shots, so precision must be larger than 0"
        )
    if not tech.active:
        return _reference(qk, pubs, opts, tech, seed)
    plans = [_plan(pub, tech, opts, rng, target) for pub in pubs]

    executions = [e for plan in plans for e in plan.executions]
    if tech.dd is not None and executions:
        scheduled = cx.insert_dd(
            [e.circuit for e in executions],
            target,
            tech.dd.sequence_type,
            tech.dd.scheduling_method,
            tech.dd.extra_slack_distribution,
            tech.dd.skip_reset_qubits,
        )
        for e, c in zip(executions, scheduled, strict=True):
            e.circuit = c

    cal_shots_before = 0
    weights: dict[int, np.ndarray] | None = None
    mit: Any = None
    cal_info: dict[str, Any] | None = None
    if tech.measure_mitigation and executions:
        cache = calibrations or default_calibrations()
        before = cache.measurements
        measured = {q for e in executions for q in e.qubits}
        cals = cache.get(
            backend,
            measured,
            num_randomizations=tech.cal_randomizations,
            shots_per_randomization=tech.cal_shots_per_randomization,
            seed=None if seed is None else seed + 7919,
        )
        cal_info = {
            "method": tech.measure_mitigation,
            "qubits": sorted(cals),
            "measured_this_job": cache.measurements > before,
            "readout_errors": {str(q): round((c.p01 + c.p10) / 2, 6) for q, c in cals.items()},
        }
        if cache.measurements > before:
            cal_shots_before = sum(c.shots for c in cals.values()) // max(len(cals), 1)
        if tech.measure_mitigation == "trex":
            weights = {q: c.z_correction() for q, c in cals.items()}
        else:
            mit = _m3(cals, qk.num_qubits, symmetric=tech.twirl.measure)

    counts_list: list[Mapping[str, int]] = []
    shots_by_plan = {id(p): p.shots_per_randomization for p in plans}
    # One backend run per distinct shots-per-randomization (usually exactly one).
    by_shots: dict[int, list[int]] = defaultdict(list)
    owner = [id(plan) for plan in plans for _ in plan.executions]
    for idx, o in enumerate(owner):
        by_shots[shots_by_plan[o]].append(idx)
    counts_list = [{}] * len(executions)
    for spr, idxs in by_shots.items():
        result = qk.run(
            [executions[i].circuit for i in idxs],
            shots=spr,
            seed_simulator=None if seed is None else int(rng.integers(2**31)),
            **run_options(qk),
        ).result()
        for j, i in enumerate(idxs):
            counts_list[i] = result.get_counts(j)

    pub_results = []
    cursor = 0
    for plan in plans:
        n_exec = len(plan.executions)
        pub_counts = counts_list[cursor : cursor + n_exec]
        cursor += n_exec
        pub_results.append(
            _postprocess(plan, pub_counts, tech, weights, mit, cal_info, cal_shots_before)
        )
    log.debug(
        "estimator.mitigated",
        pubs=len(pubs),
        circuits=len(executions),
        seconds=round(time.perf_counter() - started, 3),
    )
    return PrimitiveResult(
        pub_results,
        metadata={
            "version": 2,
            "resilience_level": tech.resilience_level,
            "techniques": tech.metadata(),
            "notes": list(tech.notes),
        },
    )


def _pub_precision(pub: EstimatorPub, opts: EstimatorOptions) -> float:
    """The precision a pub gets: its own, else default_shots', else the defaults."""
    return estimator_shots(opts, pub.precision)[1]


def _with_precision(pubs: list[EstimatorPub], opts: EstimatorOptions) -> list[EstimatorPub]:
    """Pubs whose precision comes from no pub get default_shots' or the default one."""
    return [
        p
        if p.precision is not None
        else EstimatorPub(
            p.circuit, p.observables, p.parameter_values, _pub_precision(p, opts), validate=False
        )
        for p in pubs
    ]


def _summary(tech: Techniques) -> dict[str, Any]:
    return {
        "version": 2,
        "resilience_level": tech.resilience_level,
        "techniques": tech.metadata(),
        "notes": list(tech.notes),
    }


def _ideal(
    qk: Any, pubs: list[EstimatorPub], opts: EstimatorOptions, tech: Techniques, seed: int | None
) -> PrimitiveResult[PubResult]:
    """The ideal simulator's Estimator, as Aer's own EstimatorV2 and Runtime's local mode
    compute it: each Pauli term's exact expectation value from one statevector
    simulation per parameter set (no measurement circuits, no shots), then, for a
    precision > 0, normal noise of that standard deviation (seeded) on the sums.
    Precision 0 gives the exact values, as StatevectorEstimator does.
    """
    results = [_ideal_pub(qk, pub, seed) for pub in _with_precision(pubs, opts)]
    for pub_result in results:
        if tech.notes:
            pub_result.metadata["notes"] = list(tech.notes)
    return PrimitiveResult(results, metadata=_summary(tech))


#: ISA circuits with their expectation-value save instructions, by (circuit, labels):
#: the transpile cache hands out the same ISA circuit object for the same wire
#: circuit, and building the save instructions (a SparsePauliOp each) cost more
#: than simulating a small circuit (measured).
_SAVED: OrderedDict[tuple[int, tuple[str, ...]], tuple[QuantumCircuit, QuantumCircuit]] = (
    OrderedDict()
)
_SAVED_MAX = 128
_saved_lock = threading.Lock()


def _with_saved_expectations(isa: QuantumCircuit, labels: tuple[str, ...]) -> QuantumCircuit:
    """`isa` without final measurements, saving the expectation value of each label."""
    key = (id(isa), labels)
    with _saved_lock:
        found = _SAVED.get(key)
        if found is not None and found[0] is isa:  # the id is this very circuit's
            _SAVED.move_to_end(key)
            return found[1]
    circuit = isa
    if "measure" in circuit.count_ops():
        circuit = circuit.remove_final_measurements(inplace=False)
    circuit = _bare(circuit.copy())
    qubits = list(range(circuit.num_qubits))
    for label in labels:
        circuit.save_expectation_value(Pauli(label), qubits, label=label)
    with _saved_lock:
        _SAVED[key] = (isa, circuit)
        while len(_SAVED) > _SAVED_MAX:
            _SAVED.popitem(last=False)
    return circuit


def _ideal_pub(qk: Any, pub: EstimatorPub, seed: int | None) -> PubResult:
    precision = float(pub.precision or 0.0)
    params = pub.parameter_values
    flat = np.arange(params.size).reshape(params.shape)
    index, observables = np.broadcast_arrays(flat, pub.observables)
    evs = np.zeros(index.shape, dtype=np.float64)
    metadata: dict[str, Any] = {
        "target_precision": precision,
        "circuit_metadata": pub.circuit.metadata,
    }
    if evs.size:
        labels = tuple(sorted({label for obs in observables.ravel() for label in obs}))
        circuit = _with_saved_expectations(pub.circuit, labels)
        binds = None
        if params.num_parameters:
            values = params.as_array(circuit.parameters).reshape(params.size, -1)
            binds = [{p: values[:, j] for j, p in enumerate(circuit.parameters)}]
        # One shot: the saved expectation values are exact whatever the shot count.
        data = qk.run(circuit, parameter_binds=binds, shots=1).result()
        per_binding = [data.data(k) for k in range(params.size)]
        for i in np.ndindex(*evs.shape):
            expvals = per_binding[int(index[i])]
            terms = cast(dict[str, complex], observables[i])
            evs[i] = math.fsum(float(np.real(c)) * float(expvals[lab]) for lab, c in terms.items())
        if precision > 0:
            evs = np.asarray(np.random.default_rng(seed).normal(evs, precision), dtype=np.float64)
    stds = np.full(evs.shape, precision)
    return PubResult(DataBin(evs=evs, stds=stds, shape=evs.shape), metadata=metadata)


def _reference(
    qk: Any, pubs: list[EstimatorPub], opts: EstimatorOptions, tech: Techniques, seed: int | None
) -> PrimitiveResult[PubResult]:
    """No technique on (level 0): Qiskit's reference BackendEstimatorV2, bit for bit.

    Pubs without their own precision get default_shots as precision 1/sqrt(shots),
    as Runtime's local mode does, else default_precision.
    """
    from qiskit.primitives import BackendEstimatorV2

    pubs = _with_precision(pubs, opts)
    estimator = BackendEstimatorV2(
        backend=qk,
        options={"seed_simulator": seed, "default_precision": resolved_precision(None, opts)},
    )
    # What `estimator.run(pubs).result()` does (pubs are coerced already), minus
    # the thread PrimitiveJob starts per call: we are in a worker thread already.
    pubs = [EstimatorPub.coerce(p, estimator.options.default_precision) for p in pubs]
    estimator._validate_pubs(pubs)
    result = estimator._run(pubs)
    for pub_result in result:  # pub metadata stays Qiskit's own unless there is a note
        if tech.notes:
            pub_result.metadata["notes"] = list(tech.notes)
    return PrimitiveResult(list(result), metadata=_summary(tech))


def _postprocess(
    plan: _PubPlan,
    counts_list: list[Mapping[str, int]],
    tech: Techniques,
    weights: dict[int, np.ndarray] | None,
    mit: Any,
    cal_info: dict[str, Any] | None,
    cal_shots: int,
) -> PubResult:
    factors = tech.zne.noise_factors if tech.zne else (1.0,)
    nf = len(factors)
    stats: dict[tuple[tuple[int, ...], str, int], _TermStats] = defaultdict(_TermStats)
    # M3: all randomizations of one (binding, basis, noise factor) corrected together, so
    # the observed-bitstring subspace M3 works in is that of every shot, not of 1/32.
    merged: dict[tuple[tuple[int, ...], int, int], dict[str, int]] = {}
    merged_qubits: dict[tuple[tuple[int, ...], int, int], list[int]] = {}
    for e, counts in zip(plan.executions, counts_list, strict=True):
        _, labels = plan.groups[e.param][e.group]
        if mit is not None:
            key = (e.param, e.group, e.factor_index)
            acc = merged.setdefault(key, defaultdict(int))
            merged_qubits[key] = e.qubits
            for bits_key, cnt in _logical_counts(counts, e.flips).items():
                acc[bits_key] += cnt
            continue
        bits, n = _bits(counts, len(e.qubits))
        for label in labels:
            values = _term_values(label, e.qubits, bits, e.flips, weights)
            stats[(e.param, label, e.factor_index)].add(values, n)

    m3_terms: dict[tuple[tuple[int, ...], str, int], tuple[float, float]] = {}
    for (p, gi, fi), acc in merged.items():
        qubits = merged_qubits[(p, gi, fi)]
        quasi = mit.apply_correction(
            dict(acc), qubits, distance=m3_distance(len(qubits)), return_mitigation_overhead=True
        )
        shots = float(sum(acc.values()))
        for label in plan.groups[p][gi][1]:
            m3_terms[(p, label, fi)] = _m3_values(label, qubits, quasi, shots)

    def term(p: tuple[int, ...], label: str, fi: int) -> tuple[float, float]:
        if set(label) == {"I"}:
            return 1.0, 0.0
        if mit is not None:
            return m3_terms[(p, label, fi)]
        return stats[(p, label, fi)].result()

    zne = tech.zne
    extrapolators = zne.extrapolators if zne else ()
    eval_points = np.array(zne.extrapolated_noise_factors if zne else (), dtype=float)
    used: dict[str, int] = defaultdict(int)
    fallbacks: list[str] = []
    term_cache: dict[tuple[tuple[int, ...], str], dict[str, Any]] = {}

    def zne_term(p: tuple[int, ...], label: str) -> dict[str, Any]:
        key = (p, label)
        if key in term_cache:
            return term_cache[key]
        raw = [term(p, label, fi) for fi in range(nf)]
        ys = np.array([v for v, _ in raw])
        ss = np.array([s for _, s in raw])
        out: dict[str, Any] = {"raw": ys, "raw_std": ss}
        if zne is None:
            out["ev"], out["std"] = ys[0], ss[0]
            term_cache[key] = out
            return out
        xs = np.array(plan.achieved.get(p, [1.0] * nf))
        unfolded = len(set(xs.tolist())) == 1
        fits: list[Fit | None] = []
        for name in extrapolators:
            try:
                fits.append(None if unfolded else fit(name, xs, ys, ss))
            except FitFailed:
                fits.append(None)
        out["extrap"] = np.array(
            [f.values(eval_points) if f else np.full(len(eval_points), np.nan) for f in fits]
        ).reshape(len(fits), len(eval_points))
        out["extrap_std"] = np.array(
            [f.stds(eval_points) if f else np.full(len(eval_points), np.nan) for f in fits]
        ).reshape(len(fits), len(eval_points))
        chosen = next((f for f in fits if f is not None), None)
        if set(label) == {"I"}:
            out["ev"], out["std"] = 1.0, 0.0
        elif unfolded:
            out["ev"], out["std"] = ys[0], ss[0]
        elif chosen is None:
            low = int(np.argmin(xs))
            out["ev"], out["std"] = ys[low], ss[low]
            fallbacks.append(label)
            used["fallback"] += 1
        else:
            out["ev"] = float(chosen.values(np.zeros(1))[0])
            out["std"] = float(chosen.stds(np.zeros(1))[0])
            used[chosen.name] += 1
        term_cache[key] = out
        return out

    params = plan.pub.parameter_values
    param_indices = np.fromiter(np.ndindex(params.shape), dtype=object).reshape(params.shape)
    bc_param, bc_obs = np.broadcast_arrays(param_indices, plan.pub.observables)
    shape = bc_param.shape
    evs = np.zeros(shape)
    stds = np.zeros(shape)
    evs_nf = np.zeros((*shape, nf))
    stds_nf = np.zeros((*shape, nf))
    n_ex, n_ev = len(extrapolators), len(eval_points)
    evs_ex = np.zeros((*shape, n_ex, n_ev))
    stds_ex = np.zeros((*shape, n_ex, n_ev))
    for index in np.ndindex(*shape):
        p = tuple(bc_param[index])
        obs: dict[str, complex] = bc_obs[index]  # type: ignore[assignment]
        var = 0.0
        var_nf = np.zeros(nf)
        var_ex = np.zeros((n_ex, n_ev))
        for label, coeff in obs.items():
            c = float(np.real(coeff))
            t = zne_term(p, label)
            evs[index] += c * t["ev"]
            var += (c * t["std"]) ** 2
            evs_nf[index] += c * t["raw"]
            var_nf += (c * t["raw_std"]) ** 2
            if zne is not None and set(label) != {"I"}:
                evs_ex[index] += c * t["extrap"]
                var_ex += (c * t["extrap_std"]) ** 2
            elif zne is not None:
                evs_ex[index] += c
        stds[index] = math.sqrt(var)
        stds_nf[index] = np.sqrt(var_nf)
        stds_ex[index] = np.sqrt(var_ex)

    fields: dict[str, Any] = {"evs": evs, "stds": stds}
    if zne is not None:
        fields.update(
            evs_noise_factors=evs_nf,
            stds_noise_factors=stds_nf,
            evs_extrapolated=evs_ex,
            stds_extrapolated=stds_ex,
        )
    n_exec = len(plan.executions)
    n_groups = sum(len(g) for g in plan.groups.values())
    baseline = n_groups * plan.shots
    executed = n_exec * plan.shots_per_randomization
    metadata: dict[str, Any] = {
        "target_precision": plan.precision,
        "shots": plan.shots,
        "num_randomizations": plan.randomizations,
        "shots_per_randomization": plan.shots_per_randomization,
        "num_circuits": n_exec,
        "total_shots": executed,
        "shot_overhead": round(executed / baseline, 6) if baseline else 1.0,
        "techniques": tech.metadata(),
    }
    if cal_info is not None:
        metadata["measure_mitigation"] = {**cal_info, "calibration_shots_per_qubit": cal_shots}
    if zne is not None:
        achieved = next(iter(plan.achieved.values()), list(factors))
        metadata["zne"] = {
            "noise_factors": list(factors),
            "achieved_noise_factors": [round(a, 6) for a in achieved],
            "extrapolator": list(extrapolators),
            "extrapolated_noise_factors": eval_points.tolist(),
            "extrapolator_used": dict(used),
            "fallback_terms": fallbacks,
        }
        if fallbacks:
            tech_note = (
                f"zne: every extrapolator failed numerically for {len(fallbacks)} Pauli term(s) "
                f"{fallbacks[:5]}; their evs fall back to the raw value at the lowest noise factor"
            )
            metadata.setdefault("notes", []).append(tech_note)
        if plan.achieved and all(len(set(a)) == 1 for a in plan.achieved.values()):
            metadata.setdefault("notes", []).append(
                "zne: the circuit has no 2-qubit gates to fold; evs are the unamplified values"
            )
    if tech.notes:
        metadata.setdefault("notes", []).extend(tech.notes)
    return PubResult(DataBin(**fields, shape=shape), metadata=metadata)
