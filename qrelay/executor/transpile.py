"""Transpilation to a backend's ISA, cached by the circuit's wire bytes.

Iterative algorithms send the same ansatz with new parameter values every
iteration; transpiling it again each time would cost more than simulating
it. The cache key is the SHA-256 of the circuit exactly as it arrived (QPY
bytes or QASM text) plus backend, optimization level and transpiler seed, so
a hit needs neither QPY decoding nor a pass manager run.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from qiskit.circuit import Parameter, QuantumCircuit
from qiskit.transpiler import generate_preset_pass_manager

from qrelay import codec
from qrelay._proto.v1 import types_pb2
from qrelay.errors import InvalidArgument

if TYPE_CHECKING:
    from qrelay.executor.backends import Backend

__all__ = [
    "DEFAULT_OPTIMIZATION_LEVEL",
    "DEFAULT_SEED_TRANSPILER",
    "TranspileCache",
    "TranspiledCircuit",
    "pass_manager",
]

log = structlog.get_logger(__name__)

CacheKey = tuple[bytes, str, int, int | None]

# Level 1 (light optimization, VF2 layout, 1q-gate merging) costs milliseconds
# on a cache miss, which is on the critical path of an iterative loop's first
# call, and keeps the circuit recognisably the user's; levels 2-3 spend much
# more time for gains that matter mainly on deep circuits and real hardware.
# Users who want them set the `optimization_level` option.
DEFAULT_OPTIMIZATION_LEVEL = 1
# A fixed transpiler seed makes the ISA circuit (and so a seeded run's
# result) the same on every executor and after every restart.
DEFAULT_SEED_TRANSPILER = 0

# Building a preset pass manager costs ~0.1-1 s (Aer's target is large), so
# they are built once per process per (backend name, level, seed) and shared.
# Passes keep per-run state on themselves, hence one run at a time per manager.
_pass_managers: dict[tuple[str, int, int | None], tuple[Any, threading.Lock]] = {}
_pass_managers_lock = threading.Lock()


def pass_manager(
    backend: Backend,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    seed_transpiler: int | None = DEFAULT_SEED_TRANSPILER,
) -> tuple[Any, threading.Lock]:
    """The shared preset pass manager for `backend` and the lock to hold while running it."""
    key = (backend.name, optimization_level, seed_transpiler)
    with _pass_managers_lock:
        found = _pass_managers.get(key)
    if found is None:
        pm = generate_preset_pass_manager(
            optimization_level=optimization_level,
            backend=backend.qiskit,
            seed_transpiler=seed_transpiler,
        )
        with _pass_managers_lock:
            found = _pass_managers.setdefault(key, (pm, threading.Lock()))
    return found


@dataclass(frozen=True)
class TranspiledCircuit:
    """An ISA circuit plus what is needed to bind and map a pub onto it.

    The virtual circuit's facts (`num_qubits`, `parameter_names`) are kept so
    that a cache hit can validate a pub without decoding the circuit again.
    Transpilation may drop parameters whose gates it removes (e.g. an RZ just
    before a measurement at optimization level 2); `isa_columns` says which
    columns of the virtual bindings the ISA circuit still uses.
    """

    isa: QuantumCircuit
    layout: Any  # qiskit TranspileLayout | None
    num_qubits: int
    num_clbits: int
    parameter_names: tuple[str, ...]
    isa_parameters: tuple[Parameter, ...]
    isa_columns: tuple[int, ...]
    #: The user's qubits the ISA circuit keeps, when idle ones were dropped to fit the
    #: backend (None: all of them). Observables are reduced to these before the layout.
    active_qubits: tuple[int, ...] | None = None


class TranspileCache:
    """LRU cache of ISA circuits, safe to share between worker threads and backends.

    Concurrent misses on one key transpile once; the others wait for that
    result. `hits` and `misses` (= transpilations attempted) are counters for
    tests, metrics and benchmarks.
    """

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, TranspiledCircuit] = OrderedDict()
        self._inflight: dict[CacheKey, Future[TranspiledCircuit]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries)}

    def get(
        self,
        circuit: types_pb2.Circuit,
        backend: Backend,
        optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
        seed_transpiler: int | None = DEFAULT_SEED_TRANSPILER,
        what: str = "circuit",
    ) -> TranspiledCircuit:
        """The ISA form of a wire circuit for `backend`, transpiling on a miss.

        Raises InvalidArgument (via the codec) when the circuit cannot be
        decoded, and for circuits the backend cannot run.
        """
        digest = hashlib.sha256(codec.circuit_wire_bytes(circuit)).digest()
        key: CacheKey = (digest, backend.name, optimization_level, seed_transpiler)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            pending = self._inflight.get(key)
            if pending is None:
                self.misses += 1
                owner: Future[TranspiledCircuit] = Future()
                self._inflight[key] = owner
            else:
                self.hits += 1
        if pending is not None:
            return pending.result()
        try:
            entry = self._transpile(circuit, backend, optimization_level, seed_transpiler, what)
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            owner.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        owner.set_result(entry)
        return entry

    def _transpile(
        self,
        circuit_msg: types_pb2.Circuit,
        backend: Backend,
        optimization_level: int,
        seed_transpiler: int | None,
        what: str,
    ) -> TranspiledCircuit:
        circuit = codec.decode_circuit(circuit_msg, what)
        active: tuple[int, ...] | None = None
        runnable = circuit
        if circuit.num_qubits > backend.num_qubits:
            if not backend.ideal:  # a device's qubits are not interchangeable
                raise InvalidArgument(
                    f"{what} has {circuit.num_qubits} qubits but backend {backend.name} has "
                    f"{backend.num_qubits}"
                )
            active = codec.active_qubits(circuit)
            if len(active) > backend.num_qubits:
                raise InvalidArgument(
                    f"{what} has {circuit.num_qubits} qubits, {len(active)} of them active, "
                    f"but backend {backend.name} has {backend.num_qubits}"
                )
            runnable = without_idle_qubits(circuit, active)
        started = time.perf_counter()
        pm, pm_lock = pass_manager(backend, optimization_level, seed_transpiler)
        with pm_lock:
            isa = pm.run(runnable)
        names = tuple(p.name for p in circuit.parameters)
        isa_params = tuple(isa.parameters)
        columns = tuple(names.index(p.name) for p in isa_params)
        log.debug(
            "circuit.transpiled",
            backend=backend.name,
            optimization_level=optimization_level,
            seconds=round(time.perf_counter() - started, 4),
            depth=isa.depth(),
        )
        return TranspiledCircuit(
            isa=isa,
            layout=isa.layout,
            num_qubits=circuit.num_qubits,
            num_clbits=circuit.num_clbits,
            parameter_names=names,
            isa_parameters=isa_params,
            isa_columns=columns,
            active_qubits=active,
        )


def without_idle_qubits(circuit: QuantumCircuit, active: tuple[int, ...]) -> QuantumCircuit:
    """The circuit on its active qubits only (in order), clbits and registers kept.

    What Aer's primitives do for a circuit transpiled for a wide device: idle
    wires stay |0> and nothing reads them, so dropping them changes no result.
    """
    keep = [circuit.qubits[i] for i in active]
    index = {q: k for k, q in enumerate(keep)}
    out = QuantumCircuit(
        len(keep), name=circuit.name, global_phase=circuit.global_phase, metadata=circuit.metadata
    )
    out.add_bits(circuit.clbits)  # same clbits in the same order, then their registers
    for creg in circuit.cregs:
        out.add_register(creg)
    for inst in circuit.data:
        qubits = [out.qubits[index[q]] for q in inst.qubits if q in index]
        if len(qubits) != len(inst.qubits):
            if inst.operation.name not in codec.NOT_ACTING or not qubits:
                continue
            if inst.operation.name == "barrier":
                out.barrier(*qubits)
                continue
        out.append(inst.operation, qubits, inst.clbits, copy=False)
    return out
