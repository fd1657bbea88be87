"""The executor pipeline behaves as Qiskit's and Aer's reference primitives document.

Exact mode (precision 0) on the ideal simulator equals StatevectorEstimator to
1e-12; circuits wider than the simulator run on their active qubits; Runtime's
default_shots rule; Qiskit's warnings travel in the result metadata; bad
precisions answer InvalidArgument or ResourceExhausted, never a crash.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.primitives import StatevectorEstimator
from qiskit.quantum_info import SparsePauliOp

from qrelay import codec
from qrelay.errors import InvalidArgument, ResourceExhausted
from qrelay.executor.backends import Backend, load_backend
from qrelay.executor.pipeline import PrimitivePipeline
from qrelay.executor.transpile import TranspileCache
from tests.executor.test_pipeline import estimator_spec, run, sampler_spec


@pytest.fixture(scope="module")
def aer() -> Backend:
    return load_backend("aer")


@pytest.fixture(scope="module")
def manila() -> Backend:
    return load_backend("fake_manila")


def _estimator(backend: str, pubs: Any, precision: float | None = None, **options: Any) -> Any:
    """Like test_pipeline's, but options exactly as given (no resilience level forced)."""
    spec = estimator_spec(backend, pubs, precision, **options)
    if "resilience_level" not in options:
        del spec.options.fields["resilience_level"]
    return spec


def _ansatz() -> QuantumCircuit:
    a, b = Parameter("a"), Parameter("b")
    qc = QuantumCircuit(3)
    qc.ry(a, 0)
    qc.cx(0, 1)
    qc.rx(b, 2)
    qc.cz(1, 2)
    return qc


OBSERVABLES = [
    [SparsePauliOp(["ZZI", "XII", "IYZ"], [1.0, -0.5, 0.25])],
    [SparsePauliOp("IIX")],
]  # shape (2, 1)


def test_precision_zero_on_the_ideal_simulator_is_exact(aer: Backend) -> None:
    values = np.random.default_rng(3).uniform(-np.pi, np.pi, (4, 2))  # broadcasts to (2, 4)
    pub = (_ansatz(), OBSERVABLES, values)
    got = run(PrimitivePipeline(aer, TranspileCache()), _estimator("aer", [pub], precision=0))[0]
    want = StatevectorEstimator().run([pub]).result()[0]
    assert got.data.evs.shape == (2, 4)
    np.testing.assert_allclose(got.data.evs, want.data.evs, atol=1e-12)
    assert np.all(got.data.stds == 0)
    assert got.metadata["target_precision"] == 0


def test_default_precision_zero_is_exact_and_a_pubs_own_precision_still_wins(
    aer: Backend,
) -> None:
    """Seed 5: the pub with precision 0.1 is noisy (|error| > 1e-6), the others exact."""
    qc = _ansatz()
    values = [0.3, -1.1]
    pubs = [(qc, OBSERVABLES, values), (qc, OBSERVABLES, values, 0.1)]
    spec = _estimator("aer", pubs, default_precision=0.0, seed_simulator=5)
    got = run(PrimitivePipeline(aer, TranspileCache()), spec)
    want = StatevectorEstimator().run([pubs[0]]).result()[0].data.evs
    np.testing.assert_allclose(got[0].data.evs, want, atol=1e-12)
    assert np.all(got[1].data.stds == 0.1)
    assert np.all(np.abs(got[1].data.evs - want) > 1e-6)
    assert np.all(np.abs(got[1].data.evs - want) < 0.6)  # 6 sigma


def test_ideal_estimator_with_precision_adds_seeded_noise_of_that_size(aer: Backend) -> None:
    """Seed 11, precision 0.05, 200 parameter sets: the errors' std is 0.05 within 20%."""
    qc = _ansatz()
    values = np.random.default_rng(11).uniform(-np.pi, np.pi, (200, 2))
    pub = (qc, SparsePauliOp("ZZI"), values)
    pipeline = PrimitivePipeline(aer, TranspileCache())
    spec = _estimator("aer", [pub], precision=0.05, seed_simulator=11)
    got = run(pipeline, spec)[0]
    again = run(pipeline, spec)[0]
    want = StatevectorEstimator().run([pub]).result()[0].data.evs
    errors = got.data.evs - want
    assert abs(float(np.std(errors)) - 0.05) < 0.01
    assert abs(float(np.mean(errors))) < 0.05 * 4 / np.sqrt(200)
    np.testing.assert_array_equal(got.data.evs, again.data.evs)  # same seed, same values


def test_precision_zero_on_a_sampling_backend_says_why_it_cannot(manila: Backend) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    with pytest.raises(InvalidArgument, match=r"^pub 1: precision 0 asks for exact expectation"):
        PrimitivePipeline(manila, TranspileCache()).run(
            _estimator("fake_manila", [(qc, "X"), (qc, "Z", None, 0)], precision=0.1)
        )


@pytest.mark.parametrize("precision", [1e-300, 5e-324])
def test_vanishing_precision_is_refused_as_too_many_shots_where_shots_are_sampled(
    aer: Backend, manila: Backend, precision: float
) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    with pytest.raises(ResourceExhausted, match=f"precision {precision:g} would need"):
        PrimitivePipeline(manila, TranspileCache()).run(
            _estimator("fake_manila", [(qc, "X")], precision=precision, resilience_level=0)
        )
    # The ideal simulator samples no shots: the noise is just that small.
    got = run(PrimitivePipeline(aer, TranspileCache()), _estimator("aer", [(qc, "X")], precision))
    assert float(got[0].data.evs) == pytest.approx(1.0, abs=1e-12)


def test_pubs_of_no_parameter_sets_give_empty_results(aer: Backend) -> None:
    """A parameter sweep of shape (0, 1): nothing to run, results of shape (0,), as the
    statevector primitives give (Aer itself fails on an empty list of circuits)."""
    a = Parameter("a")
    qc = QuantumCircuit(1, 1)
    qc.rx(a, 0)
    qc.measure(0, 0)
    pipeline = PrimitivePipeline(aer, TranspileCache())
    sampled = run(pipeline, sampler_spec("aer", [(qc, np.zeros((0, 1)))], shots=5))[0]
    assert sampled.data.c.shape == (0,)
    assert sampled.data.c.num_shots == 5
    assert sampled.data.c.num_bits == 1
    bare = QuantumCircuit(1)
    bare.rx(a, 0)
    for precision in (None, 0.0, 1e-300):
        est = run(pipeline, _estimator("aer", [(bare, "Z", np.zeros((0, 1)))], precision))[0]
        assert est.data.evs.shape == est.data.stds.shape == (0,)


def test_default_shots_overrides_the_run_precision_but_not_a_pubs_own(manila: Backend) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    pubs = [(qc, "X"), (qc, "X", None, 0.1)]
    spec = _estimator("fake_manila", pubs, 0.05, default_shots=900, resilience_level=0)
    got = run(PrimitivePipeline(manila, TranspileCache()), spec)
    assert [r.metadata["shots"] for r in got] == [900, 100]


def test_default_shots_overrides_the_run_precision_on_the_ideal_simulator(aer: Backend) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    spec = _estimator("aer", [(qc, "X"), (qc, "X", None, 0)], 0.5, default_shots=400)
    got = run(PrimitivePipeline(aer, TranspileCache()), spec)
    assert [float(r.data.stds) for r in got] == pytest.approx([0.05, 0.0])


def _wide(num_qubits: int, active: list[int]) -> QuantumCircuit:
    """GHZ on `active` qubits of a `num_qubits`-wide circuit (as transpiled for a device)."""
    qc = QuantumCircuit(num_qubits)
    qc.h(active[0])
    for a, b in itertools.pairwise(active):
        qc.cx(a, b)
    qc.barrier()
    return qc


def test_circuit_wider_than_the_ideal_simulator_runs_on_its_active_qubits(aer: Backend) -> None:
    width = aer.num_qubits + 97
    active = [3, 60, width - 1]
    qc = _wide(width, active)
    terms = [
        ("ZZ", [3, width - 1], 1.0),  # GHZ: +1
        ("XXX", active, 0.5),  # GHZ: +1
        ("Z", [7], 2.0),  # idle qubit, |0>: +1
        ("X", [8], 4.0),  # idle qubit: 0
    ]
    observable = SparsePauliOp.from_sparse_list(terms, width)
    pipeline = PrimitivePipeline(aer, TranspileCache())
    got = run(pipeline, _estimator("aer", [(qc, observable)], precision=0))[0]
    assert float(got.data.evs) == pytest.approx(3.5, abs=1e-12)

    measured = qc.copy()
    creg = ClassicalRegister(len(active), "c")
    measured.add_register(creg)
    measured.measure(active, creg)
    result = run(pipeline, sampler_spec("aer", [measured], shots=200, seed_simulator=2))[0]
    counts = result.data.c.get_counts()
    assert set(counts) == {"000", "111"}  # both, from 200 shots of a fair GHZ (p of not: 2**-199)


def test_refusal_of_a_wide_circuit_says_how_many_qubits_are_active(aer: Backend) -> None:
    width = aer.num_qubits + 5
    qc = QuantumCircuit(width)
    qc.h(range(aer.num_qubits + 1))
    with pytest.raises(InvalidArgument) as err:
        PrimitivePipeline(aer, TranspileCache()).run(
            _estimator("aer", [(qc, "Z" * width)], precision=0)
        )
    assert str(err.value) == (
        f"pub 0: circuit has {width} qubits, {aer.num_qubits + 1} of them active, "
        f"but backend aer has {aer.num_qubits}"
    )


def test_qiskit_warnings_travel_in_the_result_metadata_every_time(aer: Backend) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)  # no classical register: Qiskit warns the result will be empty
    pipeline = PrimitivePipeline(aer, TranspileCache())
    for _ in range(2):  # a warning Python would show once per location arrives each job
        result = run(pipeline, sampler_spec("aer", [qc], shots=10))
        (carried,) = result.metadata["warnings"]
        assert carried["category"] == "UserWarning"
        assert "no output classical registers" in carried["message"]


def test_a_pubs_warning_names_its_index_in_the_job(aer: Backend) -> None:
    measured = QuantumCircuit(1, 1)
    measured.measure(0, 0)
    bare = QuantumCircuit(1)
    result = run(
        PrimitivePipeline(aer, TranspileCache()),
        sampler_spec("aer", [measured, bare, measured, bare], shots=5),
    )
    assert [w["message"][:16] for w in result.metadata["warnings"]] == [
        "The 1-th pub's c",
        "The 3-th pub's c",
    ]


def test_warnings_of_concurrent_jobs_stay_with_their_own_job(aer: Backend) -> None:
    quiet = QuantumCircuit(1, 1)
    quiet.measure(0, 0)
    noisy = QuantumCircuit(1)
    pipeline = PrimitivePipeline(aer, TranspileCache())
    out: dict[str, list[Any]] = {"quiet": [], "noisy": []}

    def work(name: str, qc: QuantumCircuit) -> None:
        for _ in range(10):
            out[name].append(run(pipeline, sampler_spec("aer", [qc], shots=5)).metadata)

    threads = [
        threading.Thread(target=work, args=("quiet", quiet)),
        threading.Thread(target=work, args=("noisy", noisy)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("warnings" not in m for m in out["quiet"])
    assert all(len(m["warnings"]) == 1 for m in out["noisy"])


def test_ideal_estimator_runs_no_mitigation_by_default(aer: Backend) -> None:
    """An ideal simulator has no noise: its default resilience level is 0."""
    qc = QuantumCircuit(1)
    qc.h(0)
    spec = _estimator("aer", [(qc, "X")], precision=0)
    raw = PrimitivePipeline(aer, TranspileCache()).run(spec)
    result = codec.decode_primitive_result(raw.primitive)
    assert float(result[0].data.evs) == pytest.approx(1.0, abs=1e-12)
    assert "notes" not in result[0].metadata
