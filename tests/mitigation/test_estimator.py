"""Each Estimator technique changes a noisy result the way it should (fixed seeds).

Tolerances are stated per test; every run uses seeds, so results are reproducible.
"""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.primitives import BackendEstimatorV2
from qiskit.quantum_info import Operator, SparsePauliOp, Statevector
from qiskit.transpiler import generate_preset_pass_manager

from qrelay.errors import FailedPrecondition, InvalidArgument
from qrelay.executor.backends import Backend
from qrelay.executor.mitigation import (
    CalibrationCache,
    resolve_estimator,
    run_estimator,
)
from qrelay.executor.mitigation.circuits import fold_2q_gates, insert_dd
from qrelay.executor.mitigation.extrapolation import FitFailed, fit
from qrelay.options import EstimatorOptions


def isa(backend: Backend, qc: QuantumCircuit) -> QuantumCircuit:
    pm = generate_preset_pass_manager(
        optimization_level=1, target=backend.target, seed_transpiler=0
    )
    return pm.run(qc)


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    return qc


def deep_ghz(n: int, pairs: int) -> QuantumCircuit:
    """GHZ with `pairs` extra CX-CX identities per link: same state, more gate noise.
    Barriers keep the transpiler from cancelling the pairs."""
    qc = ghz(n)
    for _ in range(pairs):
        for i in range(n - 1):
            qc.barrier()
            qc.cx(i, i + 1)
            qc.barrier()
            qc.cx(i, i + 1)
    return qc


# ------------------------------------------------------------------ level table


@pytest.mark.parametrize(
    ("level", "measure", "twirl_measure", "twirl_gates", "zne"),
    [
        (0, None, False, False, False),
        (1, "trex", True, False, False),
        (2, "trex", True, True, True),
    ],
)
def test_levels_map_to_documented_techniques(
    manila: Backend,
    level: int,
    measure: str | None,
    twirl_measure: bool,
    twirl_gates: bool,
    zne: bool,
) -> None:
    tech = resolve_estimator(EstimatorOptions(resilience_level=level), manila)
    assert tech.measure_mitigation == measure
    assert tech.twirl.measure is twirl_measure
    assert tech.twirl.gates is twirl_gates
    assert (tech.zne is not None) is zne
    assert tech.dd is None


def test_default_level_is_one(manila: Backend) -> None:
    tech = resolve_estimator(EstimatorOptions(), manila)
    assert tech.resilience_level == 1
    assert tech.measure_mitigation == "trex"


def test_explicit_options_override_the_level(manila: Backend) -> None:
    o = EstimatorOptions(resilience_level=2)
    o.resilience.zne_mitigation = False
    o.twirling.enable_gates = False
    tech = resolve_estimator(o, manila)
    assert tech.zne is None
    assert not tech.twirl.gates
    assert tech.measure_mitigation == "trex"
    o0 = EstimatorOptions(resilience_level=0)
    o0.resilience.zne_mitigation = True
    o0.resilience.zne.noise_factors = [1, 2, 3]
    tech0 = resolve_estimator(o0, manila)
    assert tech0.zne is not None
    assert tech0.zne.noise_factors == (1, 2, 3)
    assert tech0.measure_mitigation is None


def test_zne_options_without_zne_are_reported(manila: Backend) -> None:
    o = EstimatorOptions(resilience_level=1)
    o.resilience.zne.noise_factors = [1, 3]
    tech = resolve_estimator(o, manila)
    assert tech.zne is None
    assert any("ZNE is off at resilience_level 1" in n for n in tech.notes)


def test_options_that_do_not_apply_to_a_simulator_are_reported(ideal: Backend) -> None:
    qc = QuantumCircuit(1)
    opts = {
        "resilience_level": 0,
        "execution": {"init_qubits": False, "rep_delay": 0.0001},
        "dynamical_decoupling": {"enable": True},
    }
    result = run_estimator(ideal, [(qc, "Z")], opts, seed=1)
    notes = " ".join(result[0].metadata["notes"])
    assert "init_qubits=False has no effect on 'aer'" in notes
    assert "rep_delay has no effect" in notes
    assert "dynamical_decoupling not applied: backend 'aer' has no instruction durations" in notes
    assert result.metadata["notes"] == result[0].metadata["notes"]


# ------------------------------------------------------------------ level 0


def test_level_zero_is_qiskit_backend_estimator_bit_for_bit(manila: Backend) -> None:
    circuit = isa(manila, ghz(3))
    obs = SparsePauliOp(["ZZI", "XXX"]).apply_layout(circuit.layout)
    got = run_estimator(manila, [(circuit, obs)], {"resilience_level": 0}, 0.02, seed=3)[0]
    want = BackendEstimatorV2(backend=manila.qiskit, options={"seed_simulator": 3})
    ref = want.run([(circuit, obs)], precision=0.02).result()[0]
    assert np.array_equal(got.data.evs, ref.data.evs)
    assert np.array_equal(got.data.stds, ref.data.stds)


def test_level_zero_honours_default_precision_like_runtime(manila: Backend) -> None:
    """default_precision 1/128 (16,384 shots) at level 0 is what BackendEstimatorV2 does
    with that precision; it used to fall back to 1/64 silently."""
    circuit = isa(manila, ghz(3))
    obs = SparsePauliOp(["ZZI"]).apply_layout(circuit.layout)
    opts = {"resilience_level": 0, "default_precision": 1 / 128}
    got = run_estimator(manila, [(circuit, obs)], opts, seed=4)[0]
    want = BackendEstimatorV2(backend=manila.qiskit, options={"seed_simulator": 4})
    ref = want.run([(circuit, obs)], precision=1 / 128).result()[0]
    assert got.metadata["target_precision"] == 1 / 128
    assert np.array_equal(got.data.evs, ref.data.evs)


# ------------------------------------------------------------------ readout


def test_trex_removes_readout_bias(manila: Backend, cals: CalibrationCache) -> None:
    """|10101> on Manila (qubit 2 reads wrong ~10%): raw <Z_i> shrink by 2p; TREX
    restores each to within 4 stds + 0.01 of +-1 (seed 5, 8192 shots)."""
    qc = QuantumCircuit(5)
    qc.x([0, 2, 4])
    labels = ["IIIIZ", "IIZII", "IZIII", "ZIIII"]
    ideal = np.array([-1.0, -1.0, 1.0, -1.0])
    raw = run_estimator(manila, [(qc, labels)], {"resilience_level": 0}, 2**-6.5, seed=5)[0]
    mit = run_estimator(
        manila, [(qc, labels)], {"resilience_level": 1}, 2**-6.5, seed=5, calibrations=cals
    )[0]
    raw_err = np.abs(raw.data.evs - ideal)
    mit_err = np.abs(mit.data.evs - ideal)
    assert raw_err[1] > 0.12  # qubit 2's ~9.6% readout error shows
    assert np.all(mit_err <= 4 * mit.data.stds + 0.01)
    assert mit_err.mean() < raw_err.mean() / 3
    meta = mit.metadata
    assert meta["techniques"]["measure_mitigation"] == "trex"
    assert meta["techniques"]["twirling"]["enable_measure"] is True
    assert meta["measure_mitigation"]["qubits"] == [0, 2, 3, 4]  # the measured ones


def test_measurement_twirling_symmetrizes_asymmetric_readout(asymmetric: Backend) -> None:
    """P(1|0)=0.02, P(0|1)=0.12: untwirled <Z> is +0.96 on |0>, -0.76 on |1>; twirled both
    ~0.86 in magnitude. Tolerance 0.03 (8192 shots, seed 9)."""
    zero = QuantumCircuit(3)
    one = QuantumCircuit(3)
    one.x(0)
    pubs = [(zero, "IIZ"), (one, "IIZ")]
    plain = run_estimator(asymmetric, pubs, {"resilience_level": 0}, 2**-6.5, seed=9)
    twirled = run_estimator(
        asymmetric,
        pubs,
        {"resilience_level": 0, "twirling": {"enable_measure": True}},
        2**-6.5,
        seed=9,
    )
    assert float(plain[0].data.evs) == pytest.approx(0.96, abs=0.03)
    assert float(plain[1].data.evs) == pytest.approx(-0.76, abs=0.03)
    assert float(twirled[0].data.evs) == pytest.approx(0.86, abs=0.03)
    assert float(twirled[1].data.evs) == pytest.approx(-0.86, abs=0.03)


def test_m3_method_corrects_readout_under_the_estimator(
    asymmetric: Backend, cals: CalibrationCache
) -> None:
    """M3 instead of TREX: <Z> of |1> within 0.03 of -1 (seed 4, 8192 shots)."""
    one = QuantumCircuit(3)
    one.x(0)
    opts = {"resilience_level": 1, "resilience": {"measure_mitigation_method": "m3"}}
    res = run_estimator(asymmetric, [(one, "IIZ")], opts, 2**-6.5, seed=4, calibrations=cals)
    assert float(res[0].data.evs) == pytest.approx(-1.0, abs=0.03)
    assert res[0].metadata["measure_mitigation"]["method"] == "m3"


def test_calibration_is_cached_and_expires(manila: Backend) -> None:
    now = [0.0]
    cache = CalibrationCache(ttl_s=100, clock=lambda: now[0], seed=2)
    first = cache.get(manila, [0, 1], num_randomizations=4, shots_per_randomization=64)
    again = cache.get(manila, [1, 0], num_randomizations=4, shots_per_randomization=64)
    assert cache.measurements == 1
    assert again[0] is first[0]
    cache.get(manila, [2], num_randomizations=4, shots_per_randomization=64)
    assert cache.measurements == 2  # only the missing qubit was measured
    now[0] = 150.0
    renewed = cache.get(manila, [0], num_randomizations=4, shots_per_randomization=64)
    assert cache.measurements == 3
    assert renewed[0] is not first[0]
    assert first[0].matrix.sum(axis=0) == pytest.approx([1.0, 1.0])


def test_calibration_is_reused_across_jobs(manila: Backend, cals: CalibrationCache) -> None:
    qc = QuantumCircuit(5)
    first = run_estimator(manila, [(qc, "IIIZZ")], None, 0.05, seed=1, calibrations=cals)
    second = run_estimator(manila, [(qc, "IIIZZ")], None, 0.05, seed=2, calibrations=cals)
    assert first[0].metadata["measure_mitigation"]["measured_this_job"] is True
    assert second[0].metadata["measure_mitigation"]["measured_this_job"] is False
    assert cals.measurements == 1


# ------------------------------------------------------------------ ZNE


def test_zne_reduces_gate_noise_bias(manila: Backend, cals: CalibrationCache) -> None:
    """Deep 3-qubit GHZ (10 CX after transpiling) on Manila: <ZZI>+<IZZ> (ideal 2).
    Readout mitigation alone leaves the gate-noise bias (0.18 at seed 21); + ZNE
    (linear, factors 1,2,3) cuts it by at least half. Seed 21, 4096 shots per factor."""
    qc = isa(manila, deep_ghz(3, 2))
    obs = SparsePauliOp(["ZZI", "IZZ"]).apply_layout(qc.layout)
    base = {"resilience_level": 1, "twirling": {"enable_gates": True}}
    trex = run_estimator(manila, [(qc, obs)], base, seed=21, calibrations=cals)[0]
    zne = run_estimator(
        manila,
        [(qc, obs)],
        {
            **base,
            "resilience": {
                "zne_mitigation": True,
                "zne": {"noise_factors": [1, 2, 3], "extrapolator": "linear"},
            },
        },
        seed=21,
        calibrations=cals,
    )[0]
    trex_err = abs(float(trex.data.evs) - 2)
    zne_err = abs(float(zne.data.evs) - 2)
    assert trex_err > 0.05
    assert zne_err < trex_err / 2
    nf = zne.data.evs_noise_factors
    assert nf.shape == (3,)
    assert nf[0] > nf[1] > nf[2]  # more folding, more noise
    assert zne.metadata["zne"]["extrapolator_used"] == {"linear": 2}
    assert zne.metadata["shot_overhead"] == pytest.approx(3.0, rel=0.02)


def test_zne_result_fields_have_runtime_shapes(manila: Backend, cals: CalibrationCache) -> None:
    qc = isa(manila, ghz(2))
    obs = [SparsePauliOp("ZZ").apply_layout(qc.layout), SparsePauliOp("XX").apply_layout(qc.layout)]
    res = run_estimator(
        manila, [(qc, obs)], {"resilience_level": 2}, 0.05, seed=2, calibrations=cals
    )[0]
    d = res.data
    assert d.evs.shape == d.stds.shape == (2,)
    assert d.evs_noise_factors.shape == d.stds_noise_factors.shape == (2, 3)
    # (shape, extrapolators ("exponential", "linear"), evaluation points (0, 1, 3, 5))
    assert d.evs_extrapolated.shape == d.stds_extrapolated.shape == (2, 2, 4)
    assert res.metadata["techniques"]["zne"]["extrapolated_noise_factors"] == [0.0, 1.0, 3.0, 5.0]
    first_ok = ~np.isnan(d.evs_extrapolated[:, 0, 0])
    assert np.allclose(d.evs[first_ok], d.evs_extrapolated[first_ok, 0, 0])


def test_failed_extrapolation_falls_back_and_says_so(
    manila: Backend, cals: CalibrationCache
) -> None:
    """Ideal <XI..> terms are 0: noisy points change sign, so 'exponential' cannot fit; with
    it as the only extrapolator the evs fall back to the noise-factor-1 value (seed 3)."""
    qc = isa(manila, ghz(2))
    labels = ["XI", "IX", "YI", "IY"]
    obs = [SparsePauliOp(lab).apply_layout(qc.layout) for lab in labels]
    opts = {"resilience_level": 2, "resilience": {"zne": {"extrapolator": "exponential"}}}
    res = run_estimator(manila, [(qc, obs)], opts, 0.05, seed=3, calibrations=cals)[0]
    zmeta = res.metadata["zne"]
    assert zmeta["fallback_terms"]
    assert any("fall back to the raw value" in n for n in res.metadata["notes"])
    checked = 0
    for i, o in enumerate(obs):
        if o.paulis[0].to_label() in zmeta["fallback_terms"]:
            assert res.data.evs[i] == pytest.approx(res.data.evs_noise_factors[i, 0])
            assert np.isnan(res.data.evs_extrapolated[i, 0, 0])
            checked += 1
    assert checked == len(zmeta["fallback_terms"])


def test_extrapolators_fit_known_curves() -> None:
    x = np.array([1.0, 3.0, 5.0])
    s = np.full(3, 0.01)
    exp_y = 0.9 * np.exp(-0.2 * x)
    assert fit("exponential", x, exp_y, s).values(np.zeros(1))[0] == pytest.approx(0.9)
    lin_y = 0.8 - 0.1 * x
    assert fit("linear", x, lin_y, s).values(np.zeros(1))[0] == pytest.approx(0.8)
    quad_y = 0.7 - 0.05 * x + 0.01 * x**2
    assert fit("polynomial_degree_2", x, quad_y, s).values(np.zeros(1))[0] == pytest.approx(0.7)
    assert fit("fallback", x, lin_y, s).values(np.zeros(1))[0] == pytest.approx(0.7)
    # Linear extrapolation of three points with equal stds: std at 0 is sqrt(sum w_i^2) * s.
    std0 = fit("linear", x, lin_y, s).stds(np.zeros(1))[0]
    assert std0 == pytest.approx(0.01 * np.sqrt(35 / 24), rel=1e-3)


@pytest.mark.parametrize(
    ("name", "y", "why"),
    [
        ("exponential", [0.1, -0.05, 0.02], "one sign"),
        ("exponential", [0.2, 0.4, 0.8], "no decay"),
        ("polynomial_degree_2", [0.9, 0.1, 0.5], "outside the observable's bounds"),
        ("linear", [np.nan, 0.5, 0.4], "non-finite"),
    ],
)
def test_numerically_failing_fits_raise(name: str, y: list[float], why: str) -> None:
    with pytest.raises(FitFailed, match=why):
        fit(name, np.array([1.0, 3.0, 5.0]), np.array(y), np.full(3, 0.01))


def test_gate_folding_keeps_the_unitary_and_scales_2q_gates(manila: Backend) -> None:
    qc = isa(manila, deep_ghz(3, 1))
    n = qc.count_ops()["cx"]
    rng = np.random.default_rng(0)
    for factor, amplifier in [
        (3.0, "gate_folding"),
        (2.0, "gate_folding_front"),
        (1.5, "gate_folding_back"),
        (2.0, "gate_folding"),
    ]:
        folded, achieved = fold_2q_gates(qc, factor, amplifier, rng, manila.target)
        assert folded.count_ops()["cx"] == round(n * achieved)
        assert achieved == pytest.approx(factor, abs=2 / n)
        assert Operator(folded).equiv(Operator(qc))


def test_zne_on_a_dynamic_circuit_is_refused(manila: Backend) -> None:
    qc = QuantumCircuit(2, 1)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.x(1)
    qc.cx(0, 1)
    with pytest.raises(FailedPrecondition, match="cannot fold gates inside control flow"):
        run_estimator(manila, [(qc, "ZZ")], {"resilience_level": 2}, 0.1, seed=1)


def test_bad_options_dict_is_invalid_argument(manila: Backend) -> None:
    qc = QuantumCircuit(1)
    with pytest.raises(InvalidArgument, match="did you mean 'resilience_level'"):
        run_estimator(manila, [(qc, "Z")], {"resilence_level": 2}, 0.1)


# ------------------------------------------------------------------ twirling, DD


def test_gate_twirling_is_unbiased_on_an_ideal_backend(ideal: Backend) -> None:
    """Twirled 2-qubit gates on Aer ideal: evs within 4 stds + 0.01 of Statevector (seed 8)."""
    qc = QuantumCircuit(3)
    qc.ry(0.7, 0)
    qc.rx(0.9, 1)
    qc.h(2)
    qc.cx(0, 1)
    qc.cz(1, 2)
    qc.s(2)
    labels = ["XYZ", "ZYX", "YII", "IYI", "IIY", "XXI", "ZZZ"]
    exact = np.array([Statevector(qc).expectation_value(SparsePauliOp(lab)).real for lab in labels])
    circuit = isa(ideal, qc)
    obs = [SparsePauliOp(lab).apply_layout(circuit.layout) for lab in labels]
    opts = {"resilience_level": 0, "twirling": {"enable_gates": True, "enable_measure": True}}
    res = run_estimator(ideal, [(circuit, obs)], opts, 0.01, seed=8)[0]
    assert res.metadata["num_randomizations"] == 32
    assert np.all(np.abs(res.data.evs - exact) <= 4 * res.data.stds + 0.01)


@pytest.mark.parametrize("sequence", ["XX", "XpXm", "XY4"])
def test_dd_fills_idle_windows_with_isa_pulses(manila: Backend, sequence: str) -> None:
    qc = QuantumCircuit(5)
    qc.h(0)
    for _ in range(3):
        qc.cx(0, 1)
    qc.measure_all()
    circuit = isa(manila, qc)
    out = insert_dd([circuit], manila.target, sequence, "alap", "middle", False)[0]
    extra_x = out.count_ops().get("x", 0) - circuit.count_ops().get("x", 0)
    assert extra_x >= {"XX": 2, "XpXm": 2, "XY4": 4}[sequence]
    assert set(out.count_ops()) <= set(manila.target.operation_names) | {"barrier"}
    assert Operator(out.remove_final_measurements(inplace=False)).equiv(
        Operator(circuit.remove_final_measurements(inplace=False))
    )


def test_dd_runs_and_is_reported(manila: Backend) -> None:
    qc = isa(manila, ghz(3))
    obs = SparsePauliOp("ZZI").apply_layout(qc.layout)
    opts = {
        "resilience_level": 0,
        "dynamical_decoupling": {
            "enable": True,
            "sequence_type": "XY4",
            "scheduling_method": "asap",
        },
    }
    res = run_estimator(manila, [(qc, obs)], opts, 0.05, seed=6)[0]
    dd = res.metadata["techniques"]["dynamical_decoupling"]
    assert dd == {"enable": True, "sequence_type": "XY4", "scheduling_method": "asap"}
    assert 0.7 < float(res.data.evs) <= 1.0


def test_unavailable_twirling_strategy_is_noted(manila: Backend) -> None:
    o = EstimatorOptions(resilience_level=2)
    o.twirling.strategy = "all"
    tech = resolve_estimator(o, manila)
    assert tech.twirl.strategy == "active"
    assert any("twirling.strategy 'all' is not available" in n for n in tech.notes)


def test_m3_readout_stacks_under_zne(manila: Backend, cals: CalibrationCache) -> None:
    """M3 instead of TREX under ZNE (deep 3-qubit GHZ, <ZZI>+<IZZ>, ideal 2): the error is
    below half of level 0's and within 0.1 of 2 (seed 21, 4096 shots per noise factor)."""
    qc = isa(manila, deep_ghz(3, 2))
    obs = SparsePauliOp(["ZZI", "IZZ"]).apply_layout(qc.layout)
    raw = run_estimator(manila, [(qc, obs)], {"resilience_level": 0}, seed=21)[0]
    opts = {"resilience_level": 2, "resilience": {"measure_mitigation_method": "m3"}}
    res = run_estimator(manila, [(qc, obs)], opts, seed=21, calibrations=cals)[0]
    assert abs(float(res.data.evs) - 2) < min(0.1, abs(float(raw.data.evs) - 2) / 2)
    assert res.metadata["measure_mitigation"]["method"] == "m3"
    assert res.metadata["techniques"]["zne_mitigation"] is True
