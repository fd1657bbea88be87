"""Options: Runtime names, explicit-set tracking, round trip, and every bad input."""

from __future__ import annotations

import pytest

from qrelay.errors import InvalidArgument
from qrelay.options import (
    EstimatorOptions,
    SamplerOptions,
    UnknownOption,
    options_from_wire,
    options_to_wire,
)


def test_fresh_options_send_nothing() -> None:
    assert options_to_wire(EstimatorOptions()) == {}
    assert options_to_wire(SamplerOptions()) == {}


def test_nested_attribute_assignment_on_fresh_object_survives_to_wire() -> None:
    o = EstimatorOptions()
    o.resilience_level = 2
    o.resilience.zne_mitigation = True
    o.resilience.zne.noise_factors = [1, 2, 3]
    o.twirling.enable_gates = False
    assert options_to_wire(o) == {
        "resilience_level": 2,
        "resilience": {"zne_mitigation": True, "zne": {"noise_factors": [1.0, 2.0, 3.0]}},
        "twirling": {"enable_gates": False},
    }


def test_dict_at_construction_round_trips_through_wire() -> None:
    raw = {
        "default_shots": 2048,
        "seed_simulator": 7,
        "optimization_level": 1,
        "resilience_level": 1,
        "resilience": {
            "measure_mitigation": True,
            "measure_noise_learning": {"num_randomizations": 16},
            "zne_mitigation": True,
            "zne": {"extrapolator": ["exponential", "polynomial_degree_2"]},
        },
        "twirling": {"enable_measure": True, "num_randomizations": 8},
        "dynamical_decoupling": {"enable": True, "sequence_type": "XY4"},
    }
    opts = options_from_wire("estimator", raw)
    assert options_to_wire(opts) == raw
    assert options_to_wire(options_from_wire("estimator", options_to_wire(opts))) == raw


def test_struct_floats_become_ints() -> None:
    # google.protobuf.Struct carries every number as a double.
    opts = options_from_wire("sampler", {"default_shots": 1024.0, "seed_simulator": 3.0})
    assert isinstance(opts, SamplerOptions)
    assert opts.default_shots == 1024
    assert isinstance(opts.default_shots, int)


def test_deep_copy_keeps_explicit_fields() -> None:
    o = EstimatorOptions()
    o.resilience.zne_mitigation = True
    assert options_to_wire(o.model_copy(deep=True)) == {"resilience": {"zne_mitigation": True}}


def test_update_sets_nested_options_like_runtime() -> None:
    o = EstimatorOptions()
    o.update(resilience_level=0, twirling={"enable_measure": True})
    assert options_to_wire(o) == {"resilience_level": 0, "twirling": {"enable_measure": True}}


def test_estimator_resilience_level_defaults_to_one() -> None:
    assert EstimatorOptions().effective_level() == 1


def test_unknown_top_level_option_names_nearest() -> None:
    with pytest.raises(InvalidArgument) as err:
        options_from_wire("estimator", {"resilence_level": 1})
    assert err.value.code == 3
    assert str(err.value) == "unknown option 'resilence_level'; did you mean 'resilience_level'?"


def test_unknown_nested_option_names_path_and_nearest() -> None:
    with pytest.raises(InvalidArgument, match=r"'resilience\.zne\.extrapolater'.*'extrapolator'"):
        options_from_wire("estimator", {"resilience": {"zne": {"extrapolater": "linear"}}})


def test_sampler_rejects_estimator_only_option() -> None:
    with pytest.raises(InvalidArgument, match="unknown option 'resilience_level'"):
        options_from_wire("sampler", {"resilience_level": 1})


def test_unknown_attribute_assignment_names_nearest() -> None:
    o = EstimatorOptions()
    with pytest.raises(UnknownOption, match="did you mean 'resilience_level'"):
        o.resilence_level = 1
    with pytest.raises(AttributeError, match=r"'resilience\.zne_mitigaton'.*'zne_mitigation'"):
        o.resilience.zne_mitigaton = True


def test_section_must_be_an_object() -> None:
    with pytest.raises(InvalidArgument, match="'twirling': expected an object"):
        options_from_wire("estimator", {"twirling": True})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"resilience_level": 3}, "resilience_level must be 0, 1 or 2 (got 3)"),
        ({"resilience_level": -1}, "resilience_level must be 0, 1 or 2"),
        ({"resilience": {"zne": {"noise_factors": [0.5, 1, 3]}}}, "must all be >= 1"),
        ({"resilience": {"zne": {"noise_factors": []}}}, "must not be empty"),
        ({"resilience": {"zne": {"noise_factors": [1, 1]}}}, "must be distinct"),
        (
            {"resilience": {"zne": {"extrapolator": "cubic"}}},
            "'resilience.zne.extrapolator': unknown extrapolator 'cubic'",
        ),
        (
            {"resilience": {"zne": {"extrapolator": ["linear", "polynomial_degre_2"]}}},
            "did you mean 'polynomial_degree_2'",
        ),
        ({"resilience": {"zne": {"amplifier": "pea"}}}, "does not offer"),
        ({"resilience": {"pec_mitigation": True}}, "use zne_mitigation instead"),
        ({"default_shots": 0}, "'default_shots': Input should be greater than or equal to 1"),
        (
            {"default_precision": -0.1},
            "'default_precision': Input should be greater than or equal to 0",
        ),
        ({"optimization_level": 4}, "'optimization_level'"),
        ({"twirling": {"num_randomizations": 0}}, "must be >= 1 or 'auto'"),
        ({"dynamical_decoupling": {"sequence_type": "XZX"}}, "'XX', 'XpXm' or 'XY4'"),
        ({"dynamical_decoupling": {"scheduling_method": "soon"}}, "'alap' or 'asap'"),
    ],
)
def test_invalid_values_are_rejected_with_the_option_named(
    raw: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        options_from_wire("estimator", raw)
    assert err.value.code == 3
    assert message in str(err.value)


def test_invalid_attribute_value_is_rejected_with_path() -> None:
    o = EstimatorOptions()
    with pytest.raises(InvalidArgument, match=r"'resilience\.zne\.noise_factors'.*>= 1"):
        o.resilience.zne.noise_factors = [0.5, 2]
    assert o.resilience.zne.noise_factors is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"resilience": {"zne": {"noise_factors": [1], "extrapolator": "linear"}}},
            "'linear' needs at least 2 noise factors",
        ),
        (
            {"resilience": {"zne": {"extrapolator": "polynomial_degree_3"}}},
            "'polynomial_degree_3' needs at least 4 noise factors",
        ),
        (
            {"resilience": {"zne_mitigation": False, "zne": {"noise_factors": [1, 2]}}},
            "resilience.zne options are set but resilience.zne_mitigation is False",
        ),
        (
            {
                "resilience": {
                    "measure_mitigation": False,
                    "measure_noise_learning": {"num_randomizations": 4},
                }
            },
            "measure_noise_learning is set but resilience.measure_mitigation is False",
        ),
        ({"seed_simulator": 1, "simulator": {"seed_simulator": 2}}, "set one of them"),
    ],
)
def test_conflicting_options_are_rejected(raw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match="conflicting options") as err:
        options_from_wire("estimator", raw)
    assert message in str(err.value)


def test_sampler_m3_conflicts_with_kerneled_measurements() -> None:
    with pytest.raises(InvalidArgument, match="needs classified measurements"):
        options_from_wire(
            "sampler",
            {"resilience": {"measure_mitigation": True}, "execution": {"meas_type": "kerneled"}},
        )


def test_options_do_not_import_qiskit() -> None:
    import subprocess
    import sys

    code = "import sys, qrelay.options; print('qiskit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
