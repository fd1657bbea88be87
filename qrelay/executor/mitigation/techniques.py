"""Which error suppression and mitigation techniques a job gets.

Effective techniques = the resilience level's defaults, overridden field by
field by whatever the user set explicitly (Runtime's rule). The level table,
as Runtime documents it for the Estimator:

======  =====================================  =================================
level   mitigation                             suppression
======  =====================================  =================================
0       none                                   none
1       measurement mitigation (TREX)          measurement twirling
2       measurement mitigation + ZNE           measurement + gate twirling
        (2-qubit gate folding, factors 1,3,5,
        extrapolators exponential then linear)
======  =====================================  =================================

On the ideal simulator (`aer`) the default level is 0: there is no noise to
mitigate. Dynamical decoupling is off at every level unless enabled. The Sampler has no
levels: everything is off unless asked for; its measurement mitigation is M3
(quasi-probabilities), a qrelay extension.

Options that cannot act on the chosen backend (init_qubits and rep_delay on a
simulator, DD without instruction durations, ...) are not silently dropped:
they become `notes` in the result metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from qrelay.errors import FailedPrecondition
from qrelay.options import EstimatorOptions, ExtrapolatorName, SamplerOptions

__all__ = [
    "DEFAULT_PRECISION",
    "DEFAULT_SAMPLER_SHOTS",
    "LEVEL_TABLE",
    "DDPlan",
    "Techniques",
    "TwirlPlan",
    "ZnePlan",
    "resolve_estimator",
    "resolve_sampler",
]

DEFAULT_PRECISION = 0.015625  # 1/sqrt(4096), Runtime's default_precision
DEFAULT_SAMPLER_SHOTS = 4096
AUTO_MAX_RANDOMIZATIONS = 32
DEFAULT_CAL_RANDOMIZATIONS = 32

# Level -> defaults of (measure_mitigation, twirl_measure, twirl_gates, zne).
LEVEL_TABLE: dict[int, dict[str, bool]] = {
    0: {"measure_mitigation": False, "enable_measure": False, "enable_gates": False, "zne": False},
    1: {"measure_mitigation": True, "enable_measure": True, "enable_gates": False, "zne": False},
    2: {"measure_mitigation": True, "enable_measure": True, "enable_gates": True, "zne": True},
}


@dataclass(frozen=True)
class TwirlPlan:
    """Pauli twirling: which parts, and how the shots are spread over randomizations."""

    gates: bool
    measure: bool
    num_randomizations: int | Literal["auto"]
    shots_per_randomization: int | Literal["auto"]
    strategy: str

    @property
    def enabled(self) -> bool:
        return self.gates or self.measure

    def split(self, shots: int) -> tuple[int, int]:
        """(randomizations, shots each) for a circuit that needs `shots` shots."""
        if not self.enabled:
            return 1, shots
        nr, spr = self.num_randomizations, self.shots_per_randomization
        if nr == "auto" and spr == "auto":
            # Runtime's rule: shots_per_randomization = max(64, ceil(shots / 32)).
            each = max(64, math.ceil(shots / AUTO_MAX_RANDOMIZATIONS))
            return max(1, math.ceil(shots / each)), each
        if nr == "auto":
            assert isinstance(spr, int)
            return max(1, math.ceil(shots / spr)), spr
        if spr == "auto":
            return nr, max(1, math.ceil(shots / nr))
        assert isinstance(nr, int)
        assert isinstance(spr, int)
        return nr, spr


@dataclass(frozen=True)
class ZnePlan:
    """Zero-noise extrapolation by 2-qubit gate folding."""

    amplifier: str
    noise_factors: tuple[float, ...]
    extrapolators: tuple[ExtrapolatorName, ...]
    extrapolated_noise_factors: tuple[float, ...]


@dataclass(frozen=True)
class DDPlan:
    """Dynamical decoupling on the scheduled ISA circuit."""

    sequence_type: str
    scheduling_method: str
    extra_slack_distribution: str
    skip_reset_qubits: bool


@dataclass
class Techniques:
    """What will run, plus the notes that go into the metadata."""

    resilience_level: int | None
    measure_mitigation: Literal["trex", "m3"] | None
    twirl: TwirlPlan
    zne: ZnePlan | None
    dd: DDPlan | None
    cal_randomizations: int = DEFAULT_CAL_RANDOMIZATIONS
    cal_shots_per_randomization: int | Literal["auto"] = "auto"
    notes: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether anything beyond Qiskit's reference primitive runs."""
        return bool(self.measure_mitigation or self.twirl.enabled or self.zne or self.dd)

    def metadata(self) -> dict[str, Any]:
        """The techniques as JSON-able metadata."""
        out: dict[str, Any] = {
            "measure_mitigation": self.measure_mitigation or False,
            "twirling": {
                "enable_gates": self.twirl.gates,
                "enable_measure": self.twirl.measure,
                "strategy": self.twirl.strategy if self.twirl.gates else None,
            },
            "zne_mitigation": self.zne is not None,
            "dynamical_decoupling": (
                {
                    "enable": True,
                    "sequence_type": self.dd.sequence_type,
                    "scheduling_method": self.dd.scheduling_method,
                }
                if self.dd
                else {"enable": False}
            ),
        }
        if self.resilience_level is not None:
            out["resilience_level"] = self.resilience_level
        if self.zne is not None:
            out["zne"] = {
                "amplifier": self.zne.amplifier,
                "noise_factors": list(self.zne.noise_factors),
                "extrapolator": list(self.zne.extrapolators),
                "extrapolated_noise_factors": list(self.zne.extrapolated_noise_factors),
            }
        return out


def _backend_notes(opts: EstimatorOptions | SamplerOptions, backend: Any) -> list[str]:
    """Options that exist in Runtime but cannot act on this backend."""
    notes: list[str] = []
    name = getattr(backend, "name", "backend")
    ex = opts.execution
    if ex.init_qubits is False:
        notes.append(
            f"execution.init_qubits=False has no effect on '{name}': a simulator starts "
            "every shot from |0>"
        )
    if ex.rep_delay is not None:
        notes.append(
            f"execution.rep_delay has no effect on '{name}': a simulator has no repetition delay"
        )
    if opts.max_execution_time is not None:
        notes.append("max_execution_time is recorded; the executor's own job timeout applies")
    env = opts.environment.model_fields_set - {"job_tags"}  # job_tags become the job's tags
    if env:
        notes.append(f"environment options {sorted(env)} are recorded only")
    return notes


def _dd_plan(
    opts: EstimatorOptions | SamplerOptions, backend: Any, notes: list[str]
) -> DDPlan | None:
    dd = opts.dynamical_decoupling
    if not dd.enable:
        if dd.model_fields_set - {"enable"}:
            notes.append(
                "dynamical_decoupling options are set but dynamical_decoupling.enable "
                "is not True: no DD applied"
            )
        return None
    target = backend.target
    durations = target.durations()
    has_timing = False
    try:
        has_timing = bool(durations.get("x", [0], unit="s")) or bool(
            durations.get("sx", [0], unit="s")
        )
    except Exception:  # noqa: BLE001 - qiskit raises TranspilerError without durations
        has_timing = False
    if not has_timing:
        notes.append(
            f"dynamical_decoupling not applied: backend '{backend.name}' has no instruction "
            "durations to schedule idle windows with"
        )
        return None
    if "x" not in target.operation_names:
        notes.append(f"dynamical_decoupling not applied: backend '{backend.name}' has no 'x' gate")
        return None
    return DDPlan(
        sequence_type=dd.sequence_type or "XX",
        scheduling_method=dd.scheduling_method or "alap",
        extra_slack_distribution=dd.extra_slack_distribution or "middle",
        skip_reset_qubits=bool(dd.skip_reset_qubits),
    )


def _twirl_plan(
    opts: EstimatorOptions | SamplerOptions, gates: bool, measure: bool, notes: list[str]
) -> TwirlPlan:
    """Twirling as asked. Gate twirling is Qiskit's pauli_twirl_2q_gates, which twirls
    each 2-qubit gate's own qubits: Runtime's "active" strategy; another requested
    strategy is noted rather than silently changed."""
    tw = opts.twirling
    if tw.strategy not in (None, "active") and gates:
        notes.append(
            f"twirling.strategy '{tw.strategy}' is not available: qrelay twirls the qubits "
            "of each 2-qubit gate ('active')"
        )
    if (
        not gates
        and not measure
        and (tw.num_randomizations is not None or tw.shots_per_randomization is not None)
    ):
        notes.append("twirling randomization options are set but no twirling is enabled")
    return TwirlPlan(
        gates=gates,
        measure=measure,
        num_randomizations=tw.num_randomizations or "auto",
        shots_per_randomization=tw.shots_per_randomization or "auto",
        strategy="active",
    )


def _pick(explicit: bool | None, default: bool) -> bool:
    return default if explicit is None else explicit


def resolve_estimator(opts: EstimatorOptions, backend: Any) -> Techniques:
    """Level defaults overridden by explicit options, checked against the backend."""
    opts.check_consistent()
    # An ideal simulator has no noise to mitigate: its default level is 0 (what Runtime's
    # local mode runs on AerSimulator); a level the user sets is honoured.
    ideal = bool(getattr(backend, "ideal", False))
    level = 0 if ideal and opts.resilience_level is None else opts.effective_level()
    base = LEVEL_TABLE[level]
    res, tw = opts.resilience, opts.twirling
    notes = _backend_notes(opts, backend)

    measure = _pick(res.measure_mitigation, base["measure_mitigation"])
    zne_on = _pick(res.zne_mitigation, base["zne"])
    if res.zne.model_fields_set and res.zne_mitigation is None and not zne_on:
        notes.append(
            f"resilience.zne options are set but ZNE is off at resilience_level {level}; "
            "set resilience.zne_mitigation=True to use them"
        )
    if res.measure_noise_learning.model_fields_set and not measure:
        notes.append("resilience.measure_noise_learning is set but measurement mitigation is off")
    twirl = _twirl_plan(
        opts,
        gates=_pick(tw.enable_gates, base["enable_gates"]),
        measure=_pick(tw.enable_measure, base["enable_measure"]),
        notes=notes,
    )
    zne: ZnePlan | None = None
    if zne_on:
        factors = res.zne.effective_noise_factors()
        zne = ZnePlan(
            amplifier=res.zne.amplifier or "gate_folding",
            noise_factors=factors,
            extrapolators=res.zne.effective_extrapolators(),
            extrapolated_noise_factors=tuple(
                res.zne.extrapolated_noise_factors
                if res.zne.extrapolated_noise_factors is not None
                else (0.0, *factors)
            ),
        )
    method: Literal["trex", "m3"] | None = None
    if measure:
        method = res.measure_mitigation_method or "trex"
        if method == "trex" and not twirl.measure:
            notes.append(
                "measurement mitigation without measurement twirling: readout is corrected "
                "with the full per-qubit assignment matrices instead of TREX's symmetrized ones"
            )
    mnl = res.measure_noise_learning
    dd = _dd_plan(opts, backend, notes)
    return Techniques(
        resilience_level=level,
        measure_mitigation=method,
        twirl=twirl,
        zne=zne,
        dd=dd,
        cal_randomizations=mnl.num_randomizations or DEFAULT_CAL_RANDOMIZATIONS,
        cal_shots_per_randomization=mnl.shots_per_randomization or "auto",
        notes=notes,
    )


def resolve_sampler(opts: SamplerOptions, backend: Any) -> Techniques:
    """Sampler techniques: all off unless asked for (Runtime's Sampler defaults)."""
    opts.check_consistent()
    notes = _backend_notes(opts, backend)
    meas_type = opts.execution.meas_type
    if meas_type in ("kerneled", "avg_kerneled"):
        raise FailedPrecondition(
            f"execution.meas_type '{meas_type}' needs level-1 (IQ) measurement data, which "
            f"backend '{backend.name}' (a simulator) does not produce; use 'classified'"
        )
    tw = opts.twirling
    twirl = _twirl_plan(
        opts, gates=bool(tw.enable_gates), measure=bool(tw.enable_measure), notes=notes
    )
    dd = _dd_plan(opts, backend, notes)
    return Techniques(
        resilience_level=None,
        measure_mitigation="m3" if opts.resilience.measure_mitigation else None,
        twirl=twirl,
        zne=None,
        dd=dd,
        notes=notes,
    )
