"""The Sampler with twirling, dynamical decoupling and opt-in M3 readout correction.

Bits come back exactly as Qiskit's reference Sampler shapes them (one
`BitArray` per classical register). Measurement twirling flips each measured
bit back classically, so the bits mean what the circuit says. With
``resilience.measure_mitigation`` (qrelay extension, off by default) the
result also carries ``quasi_dists``: M3 (mthree) quasi-probabilities of shape
pub_shape + (2**k,), indexed by the integer whose bit i is the i-th measured
clbit (ascending; all clbits when every clbit is measured once), built from
the cached per-qubit readout calibration; the metadata gives M3's mitigation
overhead per binding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from qiskit.circuit import QuantumCircuit
from qiskit.primitives import DataBin, PrimitiveResult, SamplerPubResult
from qiskit.primitives.containers import BitArray
from qiskit.primitives.containers.sampler_pub import SamplerPub

from qrelay.errors import FailedPrecondition, InvalidArgument
from qrelay.executor.mitigation import circuits as cx
from qrelay.executor.mitigation.calibration import (
    CalibrationCache,
    default_calibrations,
    m3_distance,
    run_options,
)
from qrelay.executor.mitigation.techniques import (
    DEFAULT_SAMPLER_SHOTS,
    Techniques,
    resolve_sampler,
)
from qrelay.options import SamplerOptions, options_from_wire

__all__ = ["MAX_M3_BITS", "run_sampler"]

MAX_M3_BITS = 20  # quasi_dists is dense: 2**20 float64 per binding at most


def _options(options: SamplerOptions | Mapping[str, Any] | None) -> SamplerOptions:
    if options is None:
        return SamplerOptions()
    if isinstance(options, SamplerOptions):
        return options
    made = options_from_wire("sampler", options)
    assert isinstance(made, SamplerOptions)
    return made


def _measure_map(circuit: QuantumCircuit) -> dict[int, int]:
    """clbit -> qubit of terminal measurements (each clbit written once, nothing after)."""
    mapping: dict[int, int] = {}
    done: set[int] = set()
    for inst in reversed(circuit.data):
        name = inst.operation.name
        qs = [circuit.find_bit(q).index for q in inst.qubits]
        if name == "measure":
            q, c = qs[0], circuit.find_bit(inst.clbits[0]).index
            if q in done or c in mapping:
                raise FailedPrecondition(
                    "measurement mitigation/twirling needs terminal measurements: "
                    f"qubit {q} or clbit {c} is measured more than once"
                )
            mapping[c] = q
            done.add(q)
        elif name == "barrier":
            continue
        else:
            if cx.has_control_flow(QuantumCircuit.from_instructions([inst])) or inst.clbits:
                raise FailedPrecondition(
                    "measurement mitigation/twirling needs terminal measurements; this "
                    "circuit uses classical bits mid-circuit"
                )
            done.update(qs)
    return mapping


def _twirl_measures(
    circuit: QuantumCircuit, flips: dict[int, int], ops: frozenset[str]
) -> QuantumCircuit:
    """X before the measurement of every clbit c with flips[c] = 1."""
    out = circuit.copy_empty_like()
    for inst in circuit.data:
        if inst.operation.name == "measure":
            c = circuit.find_bit(inst.clbits[0]).index
            if flips.get(c):
                cx.append_flip(out, circuit.find_bit(inst.qubits[0]).index, ops)
        out.append(inst)
    return out


def _bits_of(memory: list[str], num_clbits: int, mask: int) -> np.ndarray:
    """Hex memory -> bool array [shots, num_clbits] (column i = clbit i), flips undone."""
    values = [int(h, 16) ^ mask for h in memory]
    if num_clbits == 0:
        return np.zeros((len(values), 0), dtype=bool)
    if num_clbits <= 62:
        arr = np.array(values, dtype=np.int64)
        return ((arr[:, None] >> np.arange(num_clbits)) & 1).astype(bool)
    return np.array([[(v >> i) & 1 for i in range(num_clbits)] for v in values], dtype=bool)


def run_sampler(
    backend: Any,
    isa_pubs: Iterable[Any],
    options: SamplerOptions | Mapping[str, Any] | None = None,
    shots: int | None = None,
    seed: int | None = None,
    *,
    calibrations: CalibrationCache | None = None,
) -> PrimitiveResult[SamplerPubResult]:
    """Run ISA sampler pubs on `backend` (a qrelay Backend) with the options' techniques.

    Blocking: call it from a worker thread. Returns the same PrimitiveResult
    shape as Qiskit's reference Sampler (plus ``quasi_dists`` when M3 is on).
    """
    opts = _options(options)
    tech = resolve_sampler(opts, backend)
    if seed is None:
        seed = opts.effective_seed()
    rng = np.random.default_rng(seed)
    qk = getattr(backend, "qiskit", backend)
    target = qk.target
    default = shots or opts.default_shots or DEFAULT_SAMPLER_SHOTS
    pubs = [SamplerPub.coerce(p, default) for p in isa_pubs]
    if not tech.active:
        return _reference(qk, pubs, default, tech, seed)
    results = []
    for i, pub in enumerate(pubs):
        if pub.circuit.num_qubits > qk.num_qubits:
            raise InvalidArgument(
                f"pub {i}: circuit has {pub.circuit.num_qubits} qubits but backend "
                f"'{getattr(backend, 'name', '?')}' has {qk.num_qubits}"
            )
        results.append(_run_pub(pub, tech, backend, qk, target, rng, seed, calibrations))
    return PrimitiveResult(
        results,
        metadata={"version": 2, "techniques": tech.metadata(), "notes": list(tech.notes)},
    )


def _reference(
    qk: Any, pubs: list[SamplerPub], shots: int, tech: Techniques, seed: int | None
) -> PrimitiveResult[SamplerPubResult]:
    """No technique on: Qiskit's reference BackendSamplerV2, bit for bit."""
    from qiskit.primitives import BackendSamplerV2

    sampler = BackendSamplerV2(backend=qk, options={"default_shots": shots, "seed_simulator": seed})
    # What `sampler.run(pubs).result()` does, minus the thread PrimitiveJob starts
    # per call (~0.35 ms, a quarter of a tiny job's CPU): we are in a worker already.
    sampler._validate_pubs(pubs)
    result = sampler._run(pubs)
    for pub_result in result:  # pub metadata stays Qiskit's own unless there is a note
        if tech.notes:
            pub_result.metadata["notes"] = list(tech.notes)
    return PrimitiveResult(
        list(result),
        metadata={"version": 2, "techniques": tech.metadata(), "notes": list(tech.notes)},
    )


def _run_pub(
    pub: SamplerPub,
    tech: Techniques,
    backend: Any,
    qk: Any,
    target: Any,
    rng: np.random.Generator,
    seed: int | None,
    calibrations: CalibrationCache | None,
) -> SamplerPubResult:
    circuit = pub.circuit.copy()
    circuit._layout = None  # not deep-copied into every twirled variant (see estimator._bare)
    assert pub.shots is not None
    nr, spr = tech.twirl.split(pub.shots)
    needs_map = tech.twirl.measure or tech.measure_mitigation is not None
    mapping = _measure_map(circuit) if needs_map else {}
    if tech.measure_mitigation and len(mapping) > MAX_M3_BITS:
        raise FailedPrecondition(
            f"measure_mitigation returns dense quasi-probabilities and supports at most "
            f"{MAX_M3_BITS} measured bits; this circuit measures {len(mapping)}"
        )
    params = pub.parameter_values
    pshape = params.shape
    circuits: list[QuantumCircuit] = []
    masks: list[int] = []
    for p in np.ndindex(pshape):
        bound = (
            circuit.assign_parameters(params[p].as_array()) if params.num_parameters else circuit
        )
        variants = (
            cx.twirl_2q_gates(bound, nr, int(rng.integers(2**31)), target)
            if tech.twirl.gates
            else [bound] * nr
        )
        for variant in variants:
            flips = {c: int(rng.integers(0, 2)) for c in mapping} if tech.twirl.measure else {}
            circuits.append(
                _twirl_measures(variant, flips, frozenset(target.operation_names))
                if flips
                else variant
            )
            masks.append(sum(1 << c for c, f in flips.items() if f))
    if tech.dd is not None:
        circuits = cx.insert_dd(
            circuits,
            target,
            tech.dd.sequence_type,
            tech.dd.scheduling_method,
            tech.dd.extra_slack_distribution,
            tech.dd.skip_reset_qubits,
        )
    result = qk.run(
        circuits,
        shots=spr,
        memory=True,
        seed_simulator=None if seed is None else int(rng.integers(2**31)),
        **run_options(qk),
    ).result()
    nclb = circuit.num_clbits
    total = nr * spr
    bits = np.zeros((*pshape, total, nclb), dtype=bool)
    for j, p in enumerate(np.ndindex(pshape)):
        chunks = [
            _bits_of(result.data(j * nr + r)["memory"], nclb, masks[j * nr + r]) for r in range(nr)
        ]
        bits[p] = np.concatenate(chunks) if chunks else bits[p]
    fields: dict[str, Any] = {}
    for creg in circuit.cregs:
        cols = [circuit.find_bit(c).index for c in creg]
        fields[creg.name] = BitArray.from_bool_array(bits[..., cols][..., ::-1], order="big")
    metadata: dict[str, Any] = {
        "shots": total,
        "num_randomizations": nr,
        "shots_per_randomization": spr,
        "circuit_metadata": circuit.metadata,
        "techniques": tech.metadata(),
    }
    if tech.measure_mitigation:
        quasi, overheads, cal_info = _m3(
            result, masks, mapping, nr, pshape, backend, qk, seed, calibrations, tech
        )
        fields["quasi_dists"] = quasi
        metadata["measure_mitigation"] = {**cal_info, "mitigation_overhead": overheads}
    if tech.notes:
        metadata["notes"] = list(tech.notes)
    return SamplerPubResult(DataBin(**fields, shape=pshape), metadata=metadata)


def _m3(
    result: Any,
    masks: list[int],
    mapping: dict[int, int],
    nr: int,
    pshape: tuple[int, ...],
    backend: Any,
    qk: Any,
    seed: int | None,
    calibrations: CalibrationCache | None,
    tech: Techniques,
) -> tuple[np.ndarray, list[float], dict[str, Any]]:
    """Dense M3 quasi-probabilities per binding over all randomizations' shots."""
    import mthree

    clbits = sorted(mapping)
    qubits = [mapping[c] for c in clbits]
    k = len(clbits)
    cache = calibrations or default_calibrations()
    before = cache.measurements
    cals = cache.get(
        backend,
        qubits,
        num_randomizations=tech.cal_randomizations,
        shots_per_randomization=tech.cal_shots_per_randomization,
        seed=None if seed is None else seed + 7919,
    )
    mit = mthree.M3Mitigation(None)
    matrices: list[Any] = [None] * qk.num_qubits
    for q, cal in cals.items():
        m = cal.matrix
        if tech.twirl.measure:  # twirled readout is a symmetric flip with the mean error
            pbar = (cal.p01 + cal.p10) / 2
            m = np.array([[1 - pbar, pbar], [pbar, 1 - pbar]])
        matrices[q] = m.astype(np.float32)
    mit.single_qubit_cals = matrices
    mit.num_qubits = qk.num_qubits
    out = np.zeros((*pshape, 2**k))
    overheads: list[float] = []
    for j, p in enumerate(np.ndindex(pshape)):
        # Every randomization's shots, flips undone, corrected together: M3 works in the
        # subspace of observed bit strings, which one randomization's few shots under-cover.
        counts: dict[str, int] = {}
        for r in range(nr):
            idx = j * nr + r
            mask = masks[idx]
            for h in result.data(idx)["memory"]:
                v = int(h, 16) ^ mask
                key = "".join(str((v >> c) & 1) for c in reversed(clbits))
                counts[key] = counts.get(key, 0) + 1
        quasi = mit.apply_correction(
            counts, qubits, distance=m3_distance(k), return_mitigation_overhead=True
        )
        # mthree: key position from the right <-> qubits list order (clbits ascending).
        for key, value in quasi.items():
            out[p][int(key, 2)] += value
        overheads.append(round(float(getattr(quasi, "mitigation_overhead", 1.0) or 1.0), 6))
    info = {
        "method": "m3",
        "qubits": qubits,
        "measured_this_job": cache.measurements > before,
        "readout_errors": {str(q): round((c.p01 + c.p10) / 2, 6) for q, c in cals.items()},
        "quasi_dists_bits": k,
    }
    return out, overheads, info
