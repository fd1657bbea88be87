"""The executor's primitive pipeline: one Sampler or Estimator job, wire in, wire out.

validate -> decode -> transpile (cached) -> map observables through the
layout -> run -> post-process -> encode. Pubs are coerced by Qiskit's own
SamplerPub/EstimatorPub and, without mitigation, run by Qiskit's reference
primitives (`BackendSamplerV2`, `BackendEstimatorV2`) on the ISA circuits, so
shots/precision resolution, broadcasting, classical registers and metadata
behave exactly as in Qiskit. The run step is one function per primitive
(`_run_isa_sampler`, `_run_isa_estimator`), which hands over to
`qrelay.executor.mitigation`; error mitigation happens there and nowhere else.

Pubs run one at a time (Qiskit groups pubs of equal shots into one backend
run) so that a cancellation takes effect between pubs; with a seed, pub k
gets its own derived seed (`_pub_seed`), pub 0 the job's seed itself.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import structlog
from google.protobuf import json_format
from qiskit.primitives.containers import (
    BindingsArray,
    BitArray,
    DataBin,
    ObservablesArray,
    PrimitiveResult,
    PubResult,
    SamplerPubResult,
)
from qiskit.primitives.containers.estimator_pub import EstimatorPub
from qiskit.primitives.containers.sampler_pub import SamplerPub

from qrelay import codec, job_warnings
from qrelay._proto.v1 import types_pb2
from qrelay.errors import Cancelled, InvalidArgument, ResourceExhausted
from qrelay.executor import guards
from qrelay.executor.backends import Backend
from qrelay.executor.mitigation import (
    Techniques,
    resolve_estimator,
    resolve_sampler,
    run_estimator,
    run_sampler,
)
from qrelay.executor.mitigation.estimator import estimator_shots
from qrelay.executor.transpile import (
    DEFAULT_OPTIMIZATION_LEVEL,
    DEFAULT_SEED_TRANSPILER,
    TranspileCache,
    TranspiledCircuit,
)
from qrelay.options import EstimatorOptions, SamplerOptions, options_from_wire

__all__ = [
    "DEFAULT_PRECISION",
    "DEFAULT_SHOTS",
    "MAX_SHOTS_PER_PUB",
    "PrimitivePipeline",
]

log = structlog.get_logger(__name__)

# Qiskit's reference primitives' defaults (BackendSamplerV2 / BackendEstimatorV2).
DEFAULT_SHOTS = 1024
DEFAULT_PRECISION = 0.015625
# Executions per pub (shots x parameter sets) beyond which a job would hold an
# executor slot for hours and produce results too big for a gRPC message.
MAX_SHOTS_PER_PUB = 100_000_000
# Distinct option sets remembered validated (oldest dropped first).
_OPTIONS_CACHE_SIZE = 256
# Distinct (observables, ISA circuit) pairs remembered decoded and laid out.
_OBSERVABLES_CACHE_SIZE = 256

# progress(stage, done, total): "transpile" and "run", counted in pubs.
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    """The default progress callback: nobody is listening."""


class PrimitivePipeline:
    """Runs Sampler/Estimator JobSpecs on one backend; blocking, thread-safe.

    The agent calls `run` in a worker thread. Bad input raises
    `qrelay.errors.InvalidArgument`; a cancellation seen between pubs raises
    `qrelay.errors.Cancelled`.
    """

    def __init__(
        self,
        backend: Backend,
        cache: TranspileCache,
        default_optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
        memory_limit_bytes: int = 0,
    ) -> None:
        self.backend = backend
        self.cache = cache
        # For jobs whose options name no level (the executor's setting).
        self.default_optimization_level = default_optimization_level
        # Memory one simulation may take (0: unchecked); see `limit_memory`.
        self.memory_budget_bytes = memory_limit_bytes
        self._log = log.bind(backend=backend.name)
        self._options_cache: dict[tuple[str, bytes], SamplerOptions | EstimatorOptions] = {}
        self._observables_cache: OrderedDict[
            tuple[bytes, int], tuple[TranspiledCircuit, ObservablesArray]
        ] = OrderedDict()
        self._observables_lock = threading.Lock()

    def limit_memory(self, budget_bytes: int) -> None:
        """Refuse simulations needing more than `budget_bytes`, here and in Aer itself.

        Called in a worker once its address-space limit is set, with what is
        left under it; Aer's own `max_memory_mb` check then refuses (instead
        of crashing on) what the statevector estimate does not foresee.
        """
        self.memory_budget_bytes = max(budget_bytes, 0)
        if budget_bytes > 0 and self.backend.simulator:
            # AttributeError: a simulator without Aer's memory option.
            with contextlib.suppress(AttributeError):
                self.backend.qiskit.set_options(max_memory_mb=max(budget_bytes >> 20, 1))

    def run(
        self,
        spec: types_pb2.JobSpec,
        cancelled: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> types_pb2.JobResult:
        """Execute one primitive job and return its encoded result."""
        if spec.backend and spec.backend != self.backend.name:
            raise InvalidArgument(
                f"job is for backend {spec.backend!r} but this pipeline serves "
                f"{self.backend.name!r}"
            )
        kind = spec.WhichOneof("work")
        if kind not in ("sampler", "estimator"):
            raise InvalidArgument(
                "the primitive pipeline runs sampler and estimator jobs, "
                f"not {kind or 'an empty job spec'}"
            )
        started = time.perf_counter()
        guards.check_spec(spec, self.backend.num_qubits, self.backend.simulator)
        options = self._options(kind, spec)
        result: PrimitiveResult[Any]
        report = progress or _no_progress
        # Qiskit's warnings reach the caller: carried in the metadata, warned by the SDK.
        with job_warnings.capture() as caught:
            if kind == "sampler":
                assert isinstance(options, SamplerOptions)
                result = self.run_sampler(spec.sampler, options, cancelled, report)
            else:
                assert isinstance(options, EstimatorOptions)
                result = self.run_estimator(spec.estimator, options, cancelled, report)
        if caught:
            result.metadata[job_warnings.METADATA_KEY] = caught
        encoded = types_pb2.JobResult(primitive=codec.encode_primitive_result(result))
        self._log.debug(
            "primitive.executed",
            kind=kind,
            pubs=len(result),
            seconds=round(time.perf_counter() - started, 4),
        )
        return encoded

    def _options(
        self, kind: Literal["sampler", "estimator"], spec: types_pb2.JobSpec
    ) -> SamplerOptions | EstimatorOptions:
        """Validated options, cached by their wire bytes: clients send the same few
        option sets again and again, and validating one (pydantic) was ~20% of a tiny
        job's pipeline CPU. Cached objects are shared: nothing here mutates options."""
        wire = spec.options.SerializeToString(deterministic=True)
        key = (kind, wire)
        options = self._options_cache.get(key)
        if options is None:
            raw = json_format.MessageToDict(spec.options) if spec.HasField("options") else {}
            options = options_from_wire(kind, raw)  # raises InvalidArgument: never cached
            if len(self._options_cache) >= _OPTIONS_CACHE_SIZE:
                self._options_cache.pop(next(iter(self._options_cache)), None)
            self._options_cache[key] = options
        return options

    # ----------------------------------------------------------------- sampler

    def run_sampler(
        self,
        task: types_pb2.SamplerTask,
        options: SamplerOptions,
        cancelled: threading.Event | None = None,
        progress: Progress = _no_progress,
    ) -> PrimitiveResult[SamplerPubResult]:
        """Sampler semantics of BackendSamplerV2: pub shots > task shots > default_shots."""
        job_shots = codec.check_sampler_task(task)
        shots = job_shots if job_shots is not None else options.default_shots or DEFAULT_SHOTS
        tech = resolve_sampler(options, self.backend)
        isa_pubs: list[SamplerPub] = []
        total = len(task.pubs)
        for i, wire in enumerate(task.pubs):
            progress("transpile", i, total)
            tc = self._transpiled(wire.circuit, options, i)
            bindings = _isa_bindings(tc, wire, i)
            pub_shots = wire.shots if wire.HasField("shots") else None
            try:
                pub = SamplerPub.coerce((tc.isa, bindings, pub_shots), shots)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"pub {i}: {exc}") from None
            _check_budget(i, tech, pub.shots or shots, pub.size)
            isa_pubs.append(pub)
        seed = options.effective_seed()
        results: list[SamplerPubResult] = []
        for k, pub in enumerate(isa_pubs):
            _check_cancelled(cancelled, k)
            progress("run", k, total)
            with job_warnings.capture() as caught:
                results.extend(
                    _run_isa_sampler(self.backend, [pub], options, shots, _pub_seed(seed, k))
                )
            job_warnings.add([_renumbered(entry, k) for entry in caught])
        progress("run", total, total)
        return PrimitiveResult(results, metadata={"version": 2})

    # ----------------------------------------------------------------- estimator

    def run_estimator(
        self,
        task: types_pb2.EstimatorTask,
        options: EstimatorOptions,
        cancelled: threading.Event | None = None,
        progress: Progress = _no_progress,
    ) -> PrimitiveResult[PubResult]:
        """Estimator precision as Runtime resolves it: a pub's own precision, else
        default_shots (1/sqrt(shots)), else the run's precision, else default_precision,
        else Qiskit's default. Precision 0 asks for exact values (ideal simulator only)."""
        job_precision = codec.check_estimator_task(task)
        # default_shots overrides the run-level precision, never a pub's own (Runtime).
        run_precision = job_precision if options.default_shots is None else None
        tech = resolve_estimator(options, self.backend)
        exact_path = self.backend.ideal and not tech.active
        isa_pubs: list[EstimatorPub] = []
        total = len(task.pubs)
        for i, wire in enumerate(task.pubs):
            progress("transpile", i, total)
            tc = self._transpiled(wire.circuit, options, i)
            bindings = _isa_bindings(tc, wire, i)
            isa_observables = self._isa_observables(wire.observables, tc, i)
            pub_precision = wire.precision if wire.HasField("precision") else run_precision
            pub = codec.make_estimator_pub(tc.isa, isa_observables, bindings, pub_precision, i)
            shots, precision = estimator_shots(options, pub.precision)
            if precision == 0 and not self.backend.ideal:
                raise InvalidArgument(
                    f"pub {i}: precision 0 asks for exact expectation values, which only the "
                    f"ideal simulator 'aer' gives; backend '{self.backend.name}' samples "
                    "shots, so precision must be larger than 0"
                )
            # The ideal simulator's own path and exact values (precision 0) sample no shots.
            if not exact_path and precision > 0:
                _check_budget(i, tech, shots, pub.size, precision)
            isa_pubs.append(pub)
        seed = options.effective_seed()
        results: list[PubResult] = []
        for k, pub in enumerate(isa_pubs):
            _check_cancelled(cancelled, k)
            progress("run", k, total)
            results.extend(
                _run_isa_estimator(self.backend, [pub], options, None, _pub_seed(seed, k))
            )
        progress("run", total, total)
        return PrimitiveResult(results, metadata={"version": 2})

    # ----------------------------------------------------------------- helpers

    def _isa_observables(
        self, wire: types_pb2.ObservablesArray, tc: TranspiledCircuit, pub_index: int
    ) -> ObservablesArray:
        """Decoded, validated observables on the ISA circuit's qubits, cached by their
        wire bytes and ISA circuit: a loop sends the same Hamiltonian every iteration,
        and decoding plus layout cost as much as simulating a small circuit (measured).
        Cached arrays are shared: nothing downstream mutates them."""
        key = (wire.SerializeToString(deterministic=True), id(tc))
        with self._observables_lock:
            found = self._observables_cache.get(key)
            if found is not None and found[0] is tc:
                self._observables_cache.move_to_end(key)
                return found[1]
        observables = codec.decode_observables(wire, tc.num_qubits, pub_index)
        isa = _isa_observables(observables, tc)
        with self._observables_lock:
            self._observables_cache[key] = (tc, isa)
            while len(self._observables_cache) > _OBSERVABLES_CACHE_SIZE:
                self._observables_cache.popitem(last=False)
        return isa

    def _transpiled(
        self,
        circuit: types_pb2.Circuit,
        options: SamplerOptions | EstimatorOptions,
        pub_index: int,
    ) -> TranspiledCircuit:
        level = options.optimization_level
        tc = self.cache.get(
            circuit,
            self.backend,
            self.default_optimization_level if level is None else level,
            DEFAULT_SEED_TRANSPILER,
            what=f"pub {pub_index}: circuit",
        )
        if self.backend.simulator:
            guards.check_simulation_memory(
                tc.isa, self.memory_budget_bytes, f"pub {pub_index}: circuit"
            )
        return tc


def _run_isa_sampler(
    backend: Backend,
    isa_pubs: list[SamplerPub],
    options: SamplerOptions,
    shots: int,
    seed_simulator: int | None,
) -> list[SamplerPubResult]:
    """THE place Sampler pubs (already ISA, bound to `backend`) are executed.

    `shots` applies to pubs that carry none. Twirling, DD and M3 readout
    correction run in `qrelay.executor.mitigation`; with none of them on it is
    Qiskit's BackendSamplerV2 bit for bit.
    """
    if all(pub.size == 0 for pub in isa_pubs):  # nothing to run; Aer fails on no circuits
        return [_empty_sampler_result(pub, shots) for pub in isa_pubs]
    return list(run_sampler(backend, isa_pubs, options, shots, seed_simulator))


def _renumbered(entry: dict[str, str], k: int) -> dict[str, str]:
    """Qiskit's per-pub warning names the pub's index in the list it was given; pubs run
    one at a time here, so "the 0-th pub" is the job's k-th."""
    prefix = "The 0-th pub"
    if k and entry["message"].startswith(prefix):
        return {**entry, "message": f"The {k}-th pub{entry['message'][len(prefix) :]}"}
    return entry


def _empty_sampler_result(pub: SamplerPub, shots: int) -> SamplerPubResult:
    """What StatevectorSampler returns for a pub of no parameter sets (a shape with a 0)."""
    pub_shots = pub.shots or shots
    arrays = {
        creg.name: BitArray(
            np.zeros((*pub.shape, pub_shots, (creg.size + 7) // 8), dtype=np.uint8), creg.size
        )
        for creg in pub.circuit.cregs
    }
    return SamplerPubResult(
        DataBin(**arrays, shape=pub.shape),
        metadata={"shots": pub_shots, "circuit_metadata": pub.circuit.metadata},
    )


def _run_isa_estimator(
    backend: Backend,
    isa_pubs: list[EstimatorPub],
    options: EstimatorOptions,
    precision: float | None,
    seed_simulator: int | None,
) -> list[PubResult]:
    """THE place Estimator pubs (ISA circuits, observables on physical qubits) are executed.

    `precision` applies to pubs that carry none (ceil(1 / precision**2) shots); pubs
    left without one get default_shots or default_precision (`estimator_shots`).
    Resilience levels run in `qrelay.executor.mitigation`; at level 0 with no
    suppression it is Qiskit's BackendEstimatorV2 bit for bit.
    """
    return list(run_estimator(backend, isa_pubs, options, precision, seed_simulator))


def _isa_observables(observables: ObservablesArray, tc: TranspiledCircuit) -> ObservablesArray:
    """The user's observables on the ISA circuit's physical qubits.

    When idle qubits were dropped to fit the backend, each Pauli term is first
    reduced to the kept qubits: an idle qubit is |0>, so I or Z there is a factor
    1 and X or Y makes the term's expectation value 0 (the term is left out).
    """
    if tc.active_qubits is not None:
        observables = _on_active_qubits(observables, tc.active_qubits)
    # Virtual qubit q of the observables -> the physical qubit it was laid on.
    return observables.apply_layout(tc.layout, tc.isa.num_qubits)


def _on_active_qubits(observables: ObservablesArray, active: tuple[int, ...]) -> ObservablesArray:
    n = observables.num_qubits
    keep = set(active)
    idle = [n - 1 - q for q in range(n) if q not in keep]  # label positions (qubit 0 last)
    kept = [n - 1 - q for q in reversed(active)]
    out = np.empty(observables.size, dtype=object)
    for j, terms in enumerate(observables.ravel()):
        reduced: dict[str, float] = {}
        for label, coeff in terms.items():
            if any(label[p] in "XY" for p in idle):
                continue
            short = "".join(label[p] for p in kept)
            reduced[short] = reduced.get(short, 0.0) + coeff
        out[j] = reduced or {"I" * len(active): 0.0}
    return ObservablesArray(out.reshape(observables.shape), num_qubits=len(active))


def _isa_bindings(
    tc: TranspiledCircuit, wire: types_pb2.SamplerPub | types_pb2.EstimatorPub, pub_index: int
) -> BindingsArray:
    """Validate bindings against the virtual circuit, then keep the ISA circuit's columns."""
    msg = wire.parameter_values if wire.HasField("parameter_values") else None
    values, shape = codec.decode_bindings(msg, tc.parameter_names, pub_index)
    if not tc.isa_parameters:
        return BindingsArray(shape=shape)
    return BindingsArray({tc.isa_parameters: values[..., list(tc.isa_columns)]}, shape=shape)


def _pub_seed(seed: int | None, k: int) -> int | None:
    """Seed for the k-th pub: the job's seed itself for pub 0 (so a one-pub job is
    bit-identical to Qiskit's primitive with that seed), independent streams after."""
    if seed is None or k == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, k]).generate_state(1, dtype=np.uint32)[0])


def _check_budget(
    pub_index: int, tech: Techniques, shots: int, size: int, precision: float | None = None
) -> None:
    """Refuse a pub whose executed shots would occupy the backend for hours.

    Counts what really runs: twirling's randomizations x shots each (which
    can exceed the requested shots many times over) and one circuit per ZNE
    noise factor, for every parameter set (a pub of no parameter sets runs
    nothing).
    """
    if size == 0:
        return
    if precision is not None and shots > MAX_SHOTS_PER_PUB:
        raise ResourceExhausted(
            f"pub {pub_index}: precision {precision:g} would need {shots:.3g} shots per "
            f"parameter set, beyond the limit of {MAX_SHOTS_PER_PUB} shots per pub; use a "
            "larger precision (or precision 0 on the ideal simulator 'aer': exact values)"
        )
    randomizations, each = tech.twirl.split(shots)
    factors = len(tech.zne.noise_factors) if tech.zne else 1
    executed = randomizations * each * factors
    if executed * size > MAX_SHOTS_PER_PUB:
        detail = f"{shots} shots"
        if randomizations > 1 or each != shots:
            detail = f"{randomizations} twirling randomizations x {each} shots"
        if factors > 1:
            detail += f" x {factors} ZNE noise factors"
        raise ResourceExhausted(
            f"pub {pub_index}: {detail} x {size} parameter sets exceeds the limit of "
            f"{MAX_SHOTS_PER_PUB} executed shots per pub; use fewer shots or randomizations, "
            "a larger precision or split the sweep"
        )


def _check_cancelled(cancelled: threading.Event | None, k: int) -> None:
    if cancelled is not None and cancelled.is_set():
        raise Cancelled(f"job cancelled before pub {k} ran")
