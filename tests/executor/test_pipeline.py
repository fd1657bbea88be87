"""PrimitivePipeline: wire JobSpec in, wire JobResult out, with Qiskit's reference
primitive semantics, on real Aer (ideal and with FakeManilaV2's noise model)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from google.protobuf import struct_pb2
from qiskit import QuantumCircuit, qasm3
from qiskit.circuit import ClassicalRegister, Parameter, QuantumRegister
from qiskit.circuit.library import real_amplitudes
from qiskit.primitives import (
    BackendEstimatorV2,
    BackendSamplerV2,
    PrimitiveResult,
    StatevectorEstimator,
    StatevectorSampler,
)
from qiskit.quantum_info import SparsePauliOp

from qrelay import codec
from qrelay._proto.v1 import types_pb2
from qrelay.errors import Cancelled, InvalidArgument, ResourceExhausted
from qrelay.executor.backends import Backend, load_backend
from qrelay.executor.pipeline import PrimitivePipeline
from qrelay.executor.transpile import TranspileCache


@pytest.fixture(scope="module")
def aer() -> Backend:
    return load_backend("aer")


@pytest.fixture(scope="module")
def manila() -> Backend:
    return load_backend("fake_manila")


@pytest.fixture
def cache() -> TranspileCache:
    return TranspileCache(64)


def _options(**options: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(options)
    return struct


def sampler_spec(
    backend: str, pubs: Sequence[Any], shots: int | None = None, **options: Any
) -> types_pb2.JobSpec:
    return types_pb2.JobSpec(
        backend=backend,
        sampler=codec.encode_sampler_task(pubs, shots),
        options=_options(**options),
    )


def estimator_spec(
    backend: str, pubs: Sequence[Any], precision: float | None = None, **options: Any
) -> types_pb2.JobSpec:
    """Resilience level 0 unless asked: these tests pin the unmitigated pipeline to
    Qiskit's reference semantics (mitigation has its own tests)."""
    options.setdefault("resilience_level", 0)
    return types_pb2.JobSpec(
        backend=backend,
        estimator=codec.encode_estimator_task(pubs, precision),
        options=_options(**options),
    )


def run(pipeline: PrimitivePipeline, spec: types_pb2.JobSpec) -> PrimitiveResult[Any]:
    wire = types_pb2.JobResult.FromString(pipeline.run(spec).SerializeToString())
    return codec.decode_primitive_result(wire.primitive)


def bell() -> QuantumCircuit:
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    return qc


def ansatz() -> QuantumCircuit:
    return real_amplitudes(3, reps=1)  # 6 parameters, no measurements


HAMILTONIAN = SparsePauliOp(["ZZI", "IZZ", "XXX", "ZII"], [0.5, -0.75, 0.3, 0.2])


# ----------------------------------------------------------------- sampler


def test_sampler_matches_statevector_sampler_within_tolerance(
    aer: Backend, cache: TranspileCache
) -> None:
    """Seed 11, 8000 shots: every outcome frequency within 5 sigma of the exact one."""
    theta = Parameter("theta")
    qc = QuantumCircuit(2)
    qc.ry(theta, 0)
    qc.cx(0, 1)
    qc.h(1)
    qc.measure_all()
    values = np.array([[0.3], [1.2], [2.5]])
    shots = 8000
    got = run(
        PrimitivePipeline(aer, cache), sampler_spec("aer", [(qc, values)], shots, seed_simulator=11)
    )
    want = StatevectorSampler(default_shots=200_000, seed=5).run([(qc, values)]).result()
    assert got[0].data.meas.shape == (3,)
    assert got[0].data.meas.num_shots == shots
    for loc in range(3):
        got_counts = got[0].data.meas.get_counts(loc)
        exact = want[0].data.meas.get_counts(loc)
        for outcome in set(got_counts) | set(exact):
            p = exact.get(outcome, 0) / 200_000
            sigma = np.sqrt(max(p * (1 - p), 1e-4) / shots)
            assert abs(got_counts.get(outcome, 0) / shots - p) < 5 * sigma, (loc, outcome)


def test_single_pub_job_is_bit_identical_to_qiskit_backend_sampler(
    aer: Backend, cache: TranspileCache
) -> None:
    """Same ISA circuit, same seed: the pipeline adds nothing to Qiskit's semantics."""
    qc = bell()
    got = run(PrimitivePipeline(aer, cache), sampler_spec("aer", [qc], 500, seed_simulator=42))
    isa = cache.get(codec.encode_circuit(qc), aer).isa
    want = (
        BackendSamplerV2(backend=aer.qiskit, options={"seed_simulator": 42})
        .run([isa], shots=500)
        .result()
    )
    assert got[0].data.meas == want[0].data.meas
    assert got[0].metadata == {"shots": 500, "circuit_metadata": {}}
    assert got.metadata == want.metadata == {"version": 2}


def test_sampler_keeps_multiple_classical_registers_in_order(
    aer: Backend, cache: TranspileCache
) -> None:
    q = QuantumRegister(3, "q")
    alpha, beta = ClassicalRegister(2, "alpha"), ClassicalRegister(1, "beta")
    qc = QuantumCircuit(q, alpha, beta)
    qc.x(0)
    qc.h(2)
    qc.measure([0, 1], alpha)
    qc.measure(2, beta)
    result = run(PrimitivePipeline(aer, cache), sampler_spec("aer", [qc], 2000, seed_simulator=3))
    data = result[0].data
    assert list(data.keys()) == ["alpha", "beta"]
    assert data.alpha.num_bits == 2
    assert data.beta.num_bits == 1
    assert data.alpha.get_counts() == {"01": 2000}
    ones = data.beta.get_counts().get("1", 0)
    assert abs(ones / 2000 - 0.5) < 5 * np.sqrt(0.25 / 2000)  # seed 3, 5 sigma


def test_shots_resolve_pub_then_job_then_default_shots(aer: Backend, cache: TranspileCache) -> None:
    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    pipeline = PrimitivePipeline(aer, cache)
    result = run(pipeline, sampler_spec("aer", [(qc, None, 100), qc], 50))
    assert [r.data.c.num_shots for r in result] == [100, 50]
    assert [r.metadata["shots"] for r in result] == [100, 50]
    result = run(pipeline, sampler_spec("aer", [qc], None, default_shots=77))
    assert result[0].data.c.num_shots == 77
    result = run(pipeline, sampler_spec("aer", [qc]))
    assert result[0].data.c.num_shots == 1024  # Qiskit's BackendSamplerV2 default


def test_seeded_runs_reproduce_and_pubs_get_independent_streams(
    aer: Backend, cache: TranspileCache
) -> None:
    pipeline = PrimitivePipeline(aer, cache)
    spec = sampler_spec("aer", [bell(), bell()], 200, seed_simulator=9)
    first, again = run(pipeline, spec), run(pipeline, spec)
    assert first[0].data.meas == again[0].data.meas
    assert first[1].data.meas == again[1].data.meas
    assert first[0].data.meas != first[1].data.meas


def test_noisy_fake_manila_sampler_is_noisy_but_sane(
    manila: Backend, cache: TranspileCache
) -> None:
    """Seed 5, 4000 shots: a Bell pair keeps most weight on 00/11 but not all of it."""
    result = run(
        PrimitivePipeline(manila, cache),
        sampler_spec("fake_manila", [bell()], 4000, seed_simulator=5),
    )
    counts = result[0].data.meas.get_counts()
    correlated = (counts.get("00", 0) + counts.get("11", 0)) / 4000
    assert 0.80 < correlated < 0.995
    assert abs(counts.get("00", 0) - counts.get("11", 0)) / 4000 < 0.1


def test_openqasm3_circuit_runs(aer: Backend, cache: TranspileCache) -> None:
    src = qasm3.dumps(bell())
    spec = types_pb2.JobSpec(
        backend="aer",
        sampler=types_pb2.SamplerTask(
            pubs=[types_pb2.SamplerPub(circuit=types_pb2.Circuit(qasm3=src))], shots=300
        ),
    )
    counts = run(PrimitivePipeline(aer, cache), spec)[0].data.meas.get_counts()
    assert set(counts) == {"00", "11"}
    assert sum(counts.values()) == 300


def test_parameter_dropped_by_transpiler_is_still_bindable(
    aer: Backend, cache: TranspileCache
) -> None:
    """At level 2 an RZ right before a measurement is removed with its parameter."""
    phi, theta = Parameter("phi"), Parameter("theta")
    qc = QuantumCircuit(1, 1)
    qc.rx(theta, 0)
    qc.rz(phi, 0)
    qc.measure(0, 0)
    spec = sampler_spec("aer", [(qc, [[0.7, np.pi], [0.1, 0.0]])], 100, optimization_level=2)
    result = run(PrimitivePipeline(aer, cache), spec)
    assert result[0].data.c.get_counts(0) == {"1": 100}  # rx(pi)
    assert result[0].data.c.get_counts(1) == {"0": 100}
    (entry,) = cache._entries.values()
    assert [p.name for p in entry.isa_parameters] == ["theta"]


# ----------------------------------------------------------------- estimator


def test_estimator_matches_statevector_estimator_within_stds(
    aer: Backend, cache: TranspileCache
) -> None:
    """Seed 17, precision 0.01: each ev within 5 reported stds (+1e-9) of the exact value."""
    qc = ansatz()
    values = np.random.default_rng(17).uniform(-np.pi, np.pi, size=(4, qc.num_parameters))
    observables = [[HAMILTONIAN], [SparsePauliOp("XYZ")]]  # (2, 1) x (4,) -> (2, 4)
    pub = (qc, observables, values)
    got = run(
        PrimitivePipeline(aer, cache),
        estimator_spec("aer", [pub], precision=0.01, seed_simulator=17),
    )[0]
    want = StatevectorEstimator().run([pub]).result()[0]
    assert got.data.evs.shape == got.data.stds.shape == (2, 4)
    assert np.all(np.abs(got.data.evs - want.data.evs) <= 5 * got.data.stds + 1e-9)
    # The ideal simulator computes exact values and adds noise of the precision (as
    # Aer's EstimatorV2): the stds are the precision, no shots are sampled.
    assert np.all(got.data.stds == 0.01)
    assert "shots" not in got.metadata
    assert got.metadata["target_precision"] == pytest.approx(0.01)


def test_estimator_is_identical_to_qiskit_backend_estimator_on_the_isa_circuit(
    manila: Backend, cache: TranspileCache
) -> None:
    qc = ansatz()
    values = np.linspace(0, 1, qc.num_parameters)
    got = run(
        PrimitivePipeline(manila, cache),
        estimator_spec("fake_manila", [(qc, HAMILTONIAN, values)], seed_simulator=4),
    )[0]
    tc = cache.get(codec.encode_circuit(qc), manila)
    isa_obs = HAMILTONIAN.apply_layout(tc.layout)
    want = (
        BackendEstimatorV2(backend=manila.qiskit, options={"seed_simulator": 4})
        .run([(tc.isa, isa_obs, values)])
        .result()[0]
    )
    assert np.array_equal(got.data.evs, want.data.evs)
    assert np.array_equal(got.data.stds, want.data.stds)
    assert got.metadata["shots"] == want.metadata["shots"] == 4096


def test_noisy_estimator_maps_observables_through_the_layout(
    manila: Backend, cache: TranspileCache
) -> None:
    """A star of CXs forces virtual qubit 0 off physical qubit 0 on Manila's line.

    Qubit 1 alone is |1>: <IIZ>=+1, <IZI>=-1, <ZII>=+1 ideally (seed 8, precision
    0.02); noise shrinks each a little, a wrong mapping would flip signs.
    """
    qc = QuantumCircuit(3)
    qc.x(1)
    qc.cx(0, 1)
    qc.cx(0, 2)
    spec = estimator_spec(
        "fake_manila", [(qc, ["IIZ", "IZI", "ZII"])], precision=0.02, seed_simulator=8
    )
    result = run(PrimitivePipeline(manila, cache), spec)[0]
    layout = cache.get(codec.encode_circuit(qc), manila).layout.final_index_layout()
    assert layout[:1] != [0]  # the mapping is not the identity
    evs = result.data.evs
    assert evs[0] > 0.8
    assert evs[1] < -0.8
    assert evs[2] > 0.8
    assert np.all(np.abs(evs) < 1.0)  # readout noise is visible


def test_precision_resolves_pub_then_job_then_default(
    aer: Backend, manila: Backend, cache: TranspileCache
) -> None:
    qc = QuantumCircuit(1)
    qc.h(0)
    pipeline = PrimitivePipeline(aer, cache)
    pipeline_manila = PrimitivePipeline(manila, cache)
    result = run(pipeline, estimator_spec("aer", [(qc, "X", None, 0.1), (qc, "Z")], precision=0.05))
    assert [r.metadata["target_precision"] for r in result] == pytest.approx([0.1, 0.05])
    assert [float(r.data.stds) for r in result] == pytest.approx([0.1, 0.05])
    result = run(pipeline, estimator_spec("aer", [(qc, "X")], default_precision=0.2))
    assert result[0].metadata["target_precision"] == pytest.approx(0.2)
    result = run(pipeline, estimator_spec("aer", [(qc, "X")]))
    assert result[0].metadata["target_precision"] == 1 / 64  # Qiskit's default precision
    # On a sampling backend the precision is the shots: ceil(1 / precision**2).
    result = run(
        pipeline_manila,
        estimator_spec("fake_manila", [(qc, "X", None, 0.1), (qc, "Z")], precision=0.05),
    )
    assert [r.metadata["shots"] for r in result] == [100, 400]


# ----------------------------------------------------------------- transpile cache


def test_parameter_sweep_across_20_jobs_transpiles_once(
    aer: Backend, cache: TranspileCache
) -> None:
    qc = ansatz()
    qc.measure_all()
    pipeline = PrimitivePipeline(aer, cache)
    for value in np.linspace(0, np.pi, 20):
        run(pipeline, sampler_spec("aer", [(qc, np.full(qc.num_parameters, value))], 10))
    assert (cache.misses, cache.hits) == (1, 19)


def test_iterative_estimator_loop_transpiles_once(manila: Backend, cache: TranspileCache) -> None:
    qc = ansatz()
    pipeline = PrimitivePipeline(manila, cache)
    params = np.zeros(qc.num_parameters)
    for _ in range(10):
        result = run(pipeline, estimator_spec("fake_manila", [(qc, HAMILTONIAN, params)], 0.1))
        params = params + 0.1 * result[0].data.evs
    assert cache.stats() == {"hits": 9, "misses": 1, "entries": 1}


def test_cache_key_includes_backend_and_optimization_level(
    aer: Backend, manila: Backend, cache: TranspileCache
) -> None:
    wire = codec.encode_circuit(bell())
    cache.get(wire, aer)
    cache.get(wire, manila)
    cache.get(wire, manila, optimization_level=0)
    cache.get(wire, manila)
    assert (cache.misses, cache.hits) == (3, 1)


def test_cache_evicts_least_recently_used(aer: Backend) -> None:
    cache = TranspileCache(2)
    circuits = []
    for n in range(1, 4):
        qc = QuantumCircuit(n)
        qc.h(range(n))
        circuits.append(codec.encode_circuit(qc))
    cache.get(circuits[0], aer)
    cache.get(circuits[1], aer)
    cache.get(circuits[0], aer)  # 0 is now the most recent
    cache.get(circuits[2], aer)  # evicts 1
    cache.get(circuits[0], aer)
    assert (cache.misses, cache.hits, len(cache)) == (3, 2, 2)
    cache.get(circuits[1], aer)
    assert cache.misses == 4


def test_concurrent_misses_on_one_circuit_transpile_once(aer: Backend) -> None:
    cache = TranspileCache(8)
    wire = codec.encode_circuit(ansatz())
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def worker() -> None:
        barrier.wait()
        results.append(cache.get(wire, aer))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4
    assert all(r is results[0] for r in results)
    assert cache.misses == 1


# ----------------------------------------------------------------- bad input


def test_observable_circuit_qubit_mismatch_is_invalid_argument(
    aer: Backend, cache: TranspileCache
) -> None:
    spec = estimator_spec("aer", [(QuantumCircuit(2), "ZZ")])
    spec.estimator.pubs[0].observables.elements[0].paulis[:] = ["ZZZ"]
    with pytest.raises(InvalidArgument) as err:
        PrimitivePipeline(aer, cache).run(spec)
    assert err.value.code == 3
    assert str(err.value) == (
        "pub 0: observable 0 acts on 3 qubits ('ZZZ') but the circuit has 2 qubits"
    )


def test_bad_qpy_is_invalid_argument(aer: Backend, cache: TranspileCache) -> None:
    spec = sampler_spec("aer", [bell()])
    spec.sampler.pubs[0].circuit.qpy = b"\x00garbage"
    with pytest.raises(InvalidArgument, match=r"^pub 0: circuit is not valid QPY: "):
        PrimitivePipeline(aer, cache).run(spec)
    assert len(cache) == 0  # failures are not cached


def test_parameter_count_mismatch_is_invalid_argument_also_on_a_cache_hit(
    aer: Backend, cache: TranspileCache
) -> None:
    qc = QuantumCircuit(1, 1)
    qc.rx(Parameter("a"), 0)
    qc.rz(Parameter("b"), 0)
    qc.measure(0, 0)
    pipeline = PrimitivePipeline(aer, cache)
    run(pipeline, sampler_spec("aer", [(qc, [0.1, 0.2])], 10))
    spec = sampler_spec("aer", [(qc, [0.1, 0.2])], 10)
    spec.sampler.pubs[0].parameter_values.values.CopyFrom(codec.encode_array(np.zeros((4, 3))))
    del spec.sampler.pubs[0].parameter_values.parameter_names[:]
    with pytest.raises(InvalidArgument) as err:
        pipeline.run(spec)
    assert (
        str(err.value) == "pub 0: circuit has 2 parameters but parameter_values has 3 per binding"
    )
    assert cache.hits == 1


def test_non_hermitian_observable_is_invalid_argument(aer: Backend, cache: TranspileCache) -> None:
    spec = estimator_spec("aer", [(QuantumCircuit(1), SparsePauliOp(["X", "Y"], [1.0, 1j]))])
    with pytest.raises(InvalidArgument, match=r"^pub 0: observable 0 is not Hermitian: term 'Y'"):
        PrimitivePipeline(aer, cache).run(spec)


def test_circuit_wider_than_device_is_invalid_argument(
    manila: Backend, cache: TranspileCache
) -> None:
    qc = QuantumCircuit(6)
    qc.h(range(6))
    qc.measure_all()
    with pytest.raises(InvalidArgument) as err:
        PrimitivePipeline(manila, cache).run(sampler_spec("fake_manila", [qc]))
    assert str(err.value) == "pub 0: circuit has 6 qubits but backend fake_manila has 5"


def test_unknown_option_is_invalid_argument(aer: Backend, cache: TranspileCache) -> None:
    with pytest.raises(InvalidArgument, match="default_shotz"):
        PrimitivePipeline(aer, cache).run(sampler_spec("aer", [bell()], default_shotz=5))


def test_a_bad_option_is_refused_every_time_and_good_ones_are_reused(
    aer: Backend, cache: TranspileCache
) -> None:
    pipeline = PrimitivePipeline(aer, cache)
    for _ in range(2):  # a refusal is never remembered as valid
        with pytest.raises(InvalidArgument, match="default_shotz") as err:
            pipeline.run(sampler_spec("aer", [bell()], default_shotz=5))
        assert err.value.code == 3
    first = pipeline._options("sampler", sampler_spec("aer", [bell()], default_shots=7))
    again = pipeline._options("sampler", sampler_spec("aer", [bell()], default_shots=7))
    other = pipeline._options("sampler", sampler_spec("aer", [bell()], default_shots=8))
    assert first is again
    assert first.default_shots == 7
    assert other.default_shots == 8
    # The same bytes as a sampler and as an estimator are different options.
    assert pipeline._options("estimator", sampler_spec("aer", [bell()])) is not (
        pipeline._options("sampler", sampler_spec("aer", [bell()]))
    )
    result = codec.decode_primitive_result(
        pipeline.run(sampler_spec("aer", [bell()], default_shots=7)).primitive
    )
    assert result[0].data.meas.num_shots == 7


def test_program_job_is_refused_by_the_primitive_pipeline(
    aer: Backend, cache: TranspileCache
) -> None:
    spec = types_pb2.JobSpec(backend="aer", program=types_pb2.ProgramTask(program="p"))
    with pytest.raises(InvalidArgument, match="runs sampler and estimator jobs, not program"):
        PrimitivePipeline(aer, cache).run(spec)


def test_job_for_another_backend_is_refused(aer: Backend, cache: TranspileCache) -> None:
    with pytest.raises(InvalidArgument, match="job is for backend 'fake_manila'"):
        PrimitivePipeline(aer, cache).run(sampler_spec("fake_manila", [bell()]))


def test_cancelled_job_stops_before_running_a_pub(aer: Backend, cache: TranspileCache) -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled, match="job cancelled before pub 0 ran") as err:
        PrimitivePipeline(aer, cache).run(sampler_spec("aer", [bell()]), cancelled)
    assert err.value.code == 1


def test_concurrent_jobs_in_worker_threads_give_the_sequential_results(
    manila: Backend, cache: TranspileCache
) -> None:
    """The agent runs several slots at once: shared backend, cache and pass managers."""
    pipeline = PrimitivePipeline(manila, cache)
    specs = [
        estimator_spec(
            "fake_manila", [(ansatz(), HAMILTONIAN, np.full(6, k / 4))], 0.05, seed_simulator=k
        )
        for k in range(4)
    ]
    sequential = [run(pipeline, spec)[0].data.evs for spec in specs]
    concurrent: dict[int, Any] = {}

    def worker(k: int) -> None:
        concurrent[k] = run(pipeline, specs[k])[0].data.evs

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(np.array_equal(concurrent[k], sequential[k]) for k in range(4))


def test_pub_beyond_the_shot_budget_is_resource_exhausted(
    aer: Backend, manila: Backend, cache: TranspileCache
) -> None:
    qc = QuantumCircuit(1, 1)
    qc.rx(Parameter("t"), 0)
    qc.measure(0, 0)
    spec = sampler_spec("aer", [(qc, np.zeros((1000, 1)))], 200_000)
    with pytest.raises(ResourceExhausted) as err:
        PrimitivePipeline(aer, cache).run(spec)
    assert err.value.code == 8
    assert str(err.value).startswith(
        "pub 0: 200000 shots x 1000 parameter sets exceeds the limit of 100000000 executed "
        "shots per pub"
    )
    # 1e10 shots where shots are sampled (the ideal simulator's own path samples none).
    tiny_precision = estimator_spec("fake_manila", [(QuantumCircuit(1), "Z")], 1e-5)
    with pytest.raises(
        ResourceExhausted, match=r"^pub 0: precision 1e-05 would need 1e\+10 shots per parameter"
    ):
        PrimitivePipeline(manila, cache).run(tiny_precision)
