"""Primitive options with qiskit-ibm-runtime's V2 names and meanings.

Pure pydantic and no qiskit import: the broker validates a job's options at
submit (so a typo fails fast, with the nearest valid name), the client SDK
offers them as attributes (``estimator.options.resilience_level = 2``), and the
executor resolves them into techniques (`qrelay.executor.mitigation`).

Every field defaults to ``None`` meaning "not set: the resilience level or the
executor decides", as Runtime's ``Unset``. Which fields were set explicitly is
pydantic's ``model_fields_set`` (assignment records it too, also on a nested
model created by default), and `options_to_wire` sends exactly those, so an
explicit option overrides the level's default on the executor and nothing
else travels.

qrelay extensions beyond Runtime's names (documented per field):
``seed_simulator`` (shorthand for ``simulator.seed_simulator``),
``optimization_level`` (the executor's transpiler level),
``resilience.measure_mitigation`` on the Sampler (mthree/M3 readout
correction returning quasi-probabilities) and
``resilience.measure_mitigation_method`` on the Estimator (``"trex"`` or
``"m3"``: the readout correction stacked under ZNE).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from qrelay.errors import InvalidArgument

__all__ = [
    "MAX_RESILIENCE_LEVEL",
    "DynamicalDecouplingOptions",
    "EnvironmentOptions",
    "EstimatorOptions",
    "EstimatorResilienceOptions",
    "ExecutionOptions",
    "ExtrapolatorName",
    "MeasureNoiseLearningOptions",
    "SamplerExecutionOptions",
    "SamplerOptions",
    "SamplerResilienceOptions",
    "SimulatorOptions",
    "TwirlingOptions",
    "UnknownOption",
    "ZneOptions",
    "options_from_wire",
    "options_to_wire",
]

MAX_RESILIENCE_LEVEL = 2

ExtrapolatorName: TypeAlias = Literal[
    "linear",
    "exponential",
    "double_exponential",
    "polynomial_degree_1",
    "polynomial_degree_2",
    "polynomial_degree_3",
    "polynomial_degree_4",
    "polynomial_degree_5",
    "polynomial_degree_6",
    "polynomial_degree_7",
    "fallback",
]

# Fewest noise factors each extrapolator needs (as Runtime checks them).
REQUIRED_NOISE_FACTORS: dict[str, int] = {
    "linear": 2,
    "exponential": 2,
    "double_exponential": 4,
    "fallback": 1,
    **{f"polynomial_degree_{k}": k + 1 for k in range(1, 8)},
}
DEFAULT_NOISE_FACTORS: tuple[float, ...] = (1.0, 3.0, 5.0)
DEFAULT_EXTRAPOLATORS: tuple[ExtrapolatorName, ...] = ("exponential", "linear")


class UnknownOption(InvalidArgument, AttributeError):
    """An option name that does not exist; the message names the nearest valid one."""


def _nearest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid options here: {', '.join(sorted(valid))}"


def _unknown(path: str, name: str, valid: list[str]) -> UnknownOption:
    where = f"{path}." if path else ""
    return UnknownOption(f"unknown option '{where}{name}'{_nearest(name, valid)}")


_TYPE_TAGS = frozenset({"int", "str", "float", "bool", "list", "none"})


def _clean_loc(path: str, loc: tuple[int | str, ...]) -> str:
    """Dotted option name from a pydantic location, without union branch tags."""
    parts = [path] if path else []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        elif "[" not in p and p not in _TYPE_TAGS:
            parts.append(p)
    return ".".join(parts)


def _describe(err: ValidationError, path: str) -> str:
    """One readable line per offending option (first message of a union wins)."""
    seen: dict[str, str] = {}
    for item in err.errors():
        loc = _clean_loc(path, item["loc"])
        if loc in seen:
            continue
        msg = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "value_error":
            seen[loc] = f"invalid value for option '{loc}': {msg}"
        else:
            seen[loc] = f"invalid value for option '{loc}': {msg} (got {item.get('input')!r})"
    # A list element's error is more specific than its parent's union error.
    specific = {
        loc: msg
        for loc, msg in seen.items()
        if not any(o != loc and o.startswith((f"{loc}[", f"{loc}.")) for o in seen)
    }
    return "; ".join(specific.values())


class _Options(BaseModel):
    """Base of every options section: strict names, validated assignment.

    ``_path`` is the section's dotted name inside the whole options object, so
    an error raised by ``o.resilience.zne.noise_factors = [0.5]`` names
    ``resilience.zne.noise_factors``.
    """

    model_config = ConfigDict(validate_assignment=True, extra="forbid")
    _path: str = PrivateAttr(default="")

    def model_post_init(self, context: Any, /) -> None:
        """Tell nested sections where they live."""
        self._name_children()

    def _name_children(self) -> None:
        for name in type(self).model_fields:
            child = getattr(self, name, None)
            if isinstance(child, _Options):
                child._path = self._where(name)
                child._name_children()

    def _where(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
            return
        fields = list(type(self).model_fields)
        if name not in fields:
            raise _unknown(self._path, name, fields)
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise InvalidArgument(_describe(err, self._path)) from None
        self._name_children()

    def update(self, **kwargs: Any) -> None:
        """Set several options at once, as Runtime's ``options.update(...)``."""
        for name, value in kwargs.items():
            current = getattr(self, name, None) if name in type(self).model_fields else None
            if isinstance(current, _Options) and isinstance(value, Mapping):
                current.update(**value)
            else:
                setattr(self, name, value)


class EnvironmentOptions(_Options):
    """Runtime's environment options; recorded in the result metadata, not acted on."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None
    job_tags: list[str] | None = None
    private: bool | None = None


class SimulatorOptions(_Options):
    """Simulator options; only the seed applies (the backend fixes the noise model)."""

    seed_simulator: int | None = None


class ExecutionOptions(_Options):
    """Runtime's execution options; a simulator always initialises qubits."""

    init_qubits: bool | None = None
    rep_delay: float | None = Field(default=None, ge=0)


class SamplerExecutionOptions(ExecutionOptions):
    """Sampler execution options; only classified (bit) results travel on qrelay's wire."""

    meas_type: Literal["classified", "kerneled", "avg_kerneled"] | None = None


class DynamicalDecouplingOptions(_Options):
    """Dynamical decoupling: pulses in idle windows of the scheduled ISA circuit.

    Defaults when enabled: ``sequence_type="XX"``, ``extra_slack_distribution=
    "middle"``, ``scheduling_method="alap"``, ``skip_reset_qubits=False``.
    """

    enable: bool | None = None
    sequence_type: Literal["XX", "XpXm", "XY4"] | None = None
    extra_slack_distribution: Literal["middle", "edges"] | None = None
    scheduling_method: Literal["alap", "asap"] | None = None
    skip_reset_qubits: bool | None = None


class TwirlingOptions(_Options):
    """Pauli twirling of 2-qubit gates and of measurements.

    ``num_randomizations``/``shots_per_randomization`` are ints >= 1 or
    ``"auto"``, with Runtime's rule: both auto gives ``max(64, ceil(shots/32))``
    shots per randomization and ``ceil(shots / that)`` randomizations.
    """

    enable_gates: bool | None = None
    enable_measure: bool | None = None
    num_randomizations: int | Literal["auto"] | None = None
    shots_per_randomization: int | Literal["auto"] | None = None
    strategy: Literal["active", "active-accum", "active-circuit", "all"] | None = None

    @field_validator("num_randomizations", "shots_per_randomization")
    @classmethod
    def _at_least_one(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value


class MeasureNoiseLearningOptions(_Options):
    """How readout noise is learned for measurement mitigation (default 32 x auto)."""

    num_randomizations: int | None = Field(default=None, ge=1)
    shots_per_randomization: int | Literal["auto"] | None = None

    @field_validator("shots_per_randomization")
    @classmethod
    def _at_least_one(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value


class ZneOptions(_Options):
    """Zero-noise extrapolation (Estimator only).

    Defaults: ``amplifier="gate_folding"``, ``noise_factors=(1, 3, 5)``,
    ``extrapolator=("exponential", "linear")``, ``extrapolated_noise_factors=
    [0, *noise_factors]``. Extrapolators are tried in order and the first whose
    fit succeeds gives ``evs``; when every one fails numerically (singular or
    non-finite fit, or a value outside the observable's bounds) the result falls
    back to the raw value at the lowest noise factor and the metadata says so.
    """

    amplifier: Literal["gate_folding", "gate_folding_front", "gate_folding_back", "pea"] | None = (
        None
    )
    noise_factors: list[float] | None = None
    extrapolator: ExtrapolatorName | list[ExtrapolatorName] | None = None
    extrapolated_noise_factors: list[float] | None = None

    @field_validator("noise_factors")
    @classmethod
    def _factors_at_least_one(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("noise_factors must not be empty")
        bad = [f for f in value if not f >= 1]
        if bad:
            raise ValueError(f"noise factors must all be >= 1, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError("noise factors must be distinct")
        return value

    @field_validator("extrapolator", mode="before")
    @classmethod
    def _known_extrapolators(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if isinstance(names, list | tuple):
            valid = list(REQUIRED_NOISE_FACTORS)
            for name in names:
                if isinstance(name, str) and name not in valid:
                    raise ValueError(f"unknown extrapolator '{name}'{_nearest(name, valid)}")
        return value

    @field_validator("extrapolated_noise_factors")
    @classmethod
    def _evaluation_points(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(not f >= 0 for f in value):
            raise ValueError("extrapolated noise factors must all be >= 0")
        return value

    @field_validator("amplifier")
    @classmethod
    def _supported_amplifier(cls, value: str | None) -> str | None:
        if value == "pea":
            raise ValueError(
                "amplifier 'pea' (probabilistic error amplification) needs layer noise "
                "learning, which qrelay does not offer; use 'gate_folding', "
                "'gate_folding_front' or 'gate_folding_back'"
            )
        return value

    def effective_noise_factors(self) -> tuple[float, ...]:
        """The noise factors to run, defaults applied."""
        return tuple(self.noise_factors) if self.noise_factors else DEFAULT_NOISE_FACTORS

    def effective_extrapolators(self) -> tuple[ExtrapolatorName, ...]:
        """The extrapolators to try in order, defaults applied."""
        if self.extrapolator is None:
            return DEFAULT_EXTRAPOLATORS
        if isinstance(self.extrapolator, str):
            return (self.extrapolator,)
        return tuple(self.extrapolator)

    def check_consistent(self, path: str) -> None:
        """Every extrapolator must have enough noise factors to fit."""
        factors = self.effective_noise_factors()
        for name in self.effective_extrapolators():
            need = REQUIRED_NOISE_FACTORS[name]
            if len(factors) < need:
                raise InvalidArgument(
                    f"conflicting options: {path}.extrapolator '{name}' needs at least "
                    f"{need} noise factors but {path}.noise_factors has {len(factors)} "
                    f"({list(factors)})"
                )


class EstimatorResilienceOptions(_Options):
    """Estimator error mitigation; unset fields follow ``resilience_level``.

    ``measure_mitigation_method`` is a qrelay extension: ``"trex"`` (default;
    twirled readout error extinction as Runtime) or ``"m3"`` (mthree's matrix-free
    correction of the measured distribution); either stacks under ZNE.
    """

    measure_mitigation: bool | None = None
    measure_mitigation_method: Literal["trex", "m3"] | None = None
    measure_noise_learning: MeasureNoiseLearningOptions = Field(
        default_factory=MeasureNoiseLearningOptions
    )
    zne_mitigation: bool | None = None
    zne: ZneOptions = Field(default_factory=ZneOptions)
    pec_mitigation: bool | None = None

    @field_validator("pec_mitigation")
    @classmethod
    def _no_pec(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(
                "probabilistic error cancellation needs layer noise learning, which qrelay "
                "does not offer; use zne_mitigation instead"
            )
        return value


class SamplerResilienceOptions(_Options):
    """Sampler readout correction (qrelay extension, opt-in): M3 quasi-probabilities."""

    measure_mitigation: bool | None = None


class _Common(_Options):
    """Options both primitives share."""

    default_shots: int | None = Field(default=None, ge=1)
    seed_simulator: int | None = None
    optimization_level: int | None = Field(default=None, ge=0, le=3)
    max_execution_time: int | None = Field(default=None, ge=1)
    dynamical_decoupling: DynamicalDecouplingOptions = Field(
        default_factory=DynamicalDecouplingOptions
    )
    twirling: TwirlingOptions = Field(default_factory=TwirlingOptions)
    simulator: SimulatorOptions = Field(default_factory=SimulatorOptions)
    environment: EnvironmentOptions = Field(default_factory=EnvironmentOptions)

    def effective_seed(self) -> int | None:
        """The simulator seed from either spelling (they must agree when both are set)."""
        if self.simulator.seed_simulator is not None:
            return self.simulator.seed_simulator
        return self.seed_simulator

    def check_consistent(self) -> None:
        """Cross-field checks pydantic cannot express per field."""
        a, b = self.seed_simulator, self.simulator.seed_simulator
        if a is not None and b is not None and a != b:
            raise InvalidArgument(
                f"conflicting options: seed_simulator={a} and simulator.seed_simulator={b}; "
                "set one of them"
            )


class SamplerOptions(_Common):
    """Sampler V2 options (Runtime names, plus qrelay's opt-in M3 readout correction)."""

    execution: SamplerExecutionOptions = Field(default_factory=SamplerExecutionOptions)
    resilience: SamplerResilienceOptions = Field(default_factory=SamplerResilienceOptions)

    def check_consistent(self) -> None:
        """Sampler checks: M3 correction needs unmodified classified bits."""
        super().check_consistent()
        meas = self.execution.meas_type
        if self.resilience.measure_mitigation and meas not in (None, "classified"):
            raise InvalidArgument(
                f"conflicting options: resilience.measure_mitigation needs classified "
                f"measurements but execution.meas_type is '{meas}'"
            )


class EstimatorOptions(_Common):
    """Estimator V2 options (Runtime names); ``resilience_level`` defaults to 1.

    Level table (explicit options override the level's defaults):

    ====== ================== ============== ============= =====
    level  measure_mitigation enable_measure enable_gates  zne
    ====== ================== ============== ============= =====
    0      off                off            off           off
    1      on (TREX)          on             off           off
    2      on (TREX)          on             on            on
    ====== ================== ============== ============= =====
    """

    # 0: exact expectation values (the ideal simulator only), as StatevectorEstimator.
    default_precision: float | None = Field(default=None, ge=0)
    resilience_level: int | None = None
    seed_estimator: int | None = None
    execution: ExecutionOptions = Field(default_factory=ExecutionOptions)
    resilience: EstimatorResilienceOptions = Field(default_factory=EstimatorResilienceOptions)

    @field_validator("resilience_level")
    @classmethod
    def _level(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_RESILIENCE_LEVEL:
            raise ValueError(
                f"resilience_level must be 0, 1 or 2 (got {value}); qrelay offers no level 3"
            )
        return value

    def effective_level(self) -> int:
        """The resilience level, default 1 as Runtime's Estimator."""
        return 1 if self.resilience_level is None else self.resilience_level

    def check_consistent(self) -> None:
        """Estimator checks: ZNE settings fit together, and nothing contradicts itself."""
        super().check_consistent()
        res = self.resilience
        res.zne.check_consistent("resilience.zne")
        if res.measure_mitigation is False and res.measure_noise_learning.model_fields_set:
            raise InvalidArgument(
                "conflicting options: resilience.measure_noise_learning is set but "
                "resilience.measure_mitigation is False"
            )
        if res.measure_mitigation is False and res.measure_mitigation_method is not None:
            raise InvalidArgument(
                "conflicting options: resilience.measure_mitigation_method is set but "
                "resilience.measure_mitigation is False"
            )
        if res.zne_mitigation is False and res.zne.model_fields_set:
            raise InvalidArgument(
                "conflicting options: resilience.zne options are set but "
                "resilience.zne_mitigation is False"
            )


AnyOptions: TypeAlias = SamplerOptions | EstimatorOptions

_KINDS: dict[str, type[_Common]] = {"sampler": SamplerOptions, "estimator": EstimatorOptions}


def _check_names(cls: type[_Options], raw: Mapping[str, Any], path: str) -> None:
    """Reject unknown names (anywhere in the tree) before pydantic sees them."""
    fields = cls.model_fields
    for name, value in raw.items():
        if not isinstance(name, str) or name not in fields:
            raise _unknown(path, str(name), list(fields))
        sub = fields[name].annotation
        if isinstance(sub, type) and issubclass(sub, _Options):
            where = f"{path}.{name}" if path else name
            if not isinstance(value, Mapping):
                raise InvalidArgument(
                    f"invalid value for option '{where}': expected an object of options, "
                    f"got {type(value).__name__}"
                )
            _check_names(sub, value, where)


def options_from_wire(
    kind: Literal["sampler", "estimator"], raw: Mapping[str, Any]
) -> SamplerOptions | EstimatorOptions:
    """Validate a nested dict (e.g. a JobSpec's options Struct) into options.

    Raises `InvalidArgument` naming the offending option; unknown names get the
    nearest valid one (``unknown option 'resilence_level'; did you mean
    'resilience_level'?``). Whole floats (protobuf Struct numbers) become ints.
    """
    cls = _KINDS.get(kind)
    if cls is None:
        raise InvalidArgument(f"options are for 'sampler' or 'estimator', not {kind!r}")
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"options must be an object, got {type(raw).__name__}")
    _check_names(cls, raw, "")
    try:
        opts = cls.model_validate(dict(raw))
    except ValidationError as err:
        raise InvalidArgument(_describe(err, "")) from None
    opts.check_consistent()
    assert isinstance(opts, SamplerOptions | EstimatorOptions)
    return opts


def _explicit(model: _Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, _Options):
            sub = _explicit(value)
            if sub:
                out[name] = sub
        elif name in model.model_fields_set and value is not None:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def options_to_wire(opts: SamplerOptions | EstimatorOptions) -> dict[str, Any]:
    """The explicitly set options as a JSON-able nested dict (round-trips `options_from_wire`).

    Sections that end up empty are left out; ``None`` means "unset" and is
    never sent.
    """
    return _explicit(opts)
