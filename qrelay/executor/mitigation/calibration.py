"""Readout calibration: per-qubit assignment matrices, measured and cached.

Both readout corrections (TREX for the Estimator, M3 for the Sampler) need
the same data: for every measured physical qubit, the 2x2 matrix
``A[m, p] = P(read m | prepared p)``. It is measured on the backend itself
with randomized preparations (each randomization prepares a random bit string
with X gates, as mthree's "balanced" calibration), so every qubit sees both
preparations about equally often and one batch calibrates every requested
qubit at once.

Calibrations are kept per backend and qubit for `ttl_s` seconds, so a stream
of jobs (an iterative algorithm) measures once and reuses the data; expired or
missing qubits are measured again, together, in the next job that needs them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from qiskit.circuit import QuantumCircuit

from qrelay.errors import FailedPrecondition
from qrelay.executor.mitigation.circuits import append_flip

__all__ = [
    "CalibrationCache",
    "QubitCalibration",
    "default_calibrations",
    "m3_distance",
    "run_options",
]

log = structlog.get_logger(__name__)

DEFAULT_TTL_S = 900.0
# 32 x 2048 = 65,536 shots per qubit. A calibration is cached and reused by every
# job for `ttl_s`, so its sampling error is a bias shared by all of them, not noise
# that averages out: it must sit well below one job's shot noise. Measured on
# fake_manila, TFIM d=1 <Z>avg at 65,536 job shots: with 256 per randomization
# (8,192 per qubit) level 2 kept a -0.0029 bias and level 1 -0.0132; with 2048
# (two calibration seeds) -0.0013..-0.0020 and -0.0107..-0.0113. The one-off cost
# is ~0.15 s on fake_manila (measurement-only circuits).
DEFAULT_SHOTS_PER_RANDOMIZATION = 2048


def m3_distance(num_bits: int) -> int:
    """M3's Hamming-distance truncation: none up to 12 bits (the reduced matrix is at
    most the number of distinct observed strings, cheap), mthree's default 3 beyond."""
    return num_bits if num_bits <= 12 else 3


def run_options(qiskit_backend: object) -> dict[str, object]:
    """Backend run options for many small circuits.

    Aer's default OpenMP threading costs ~4x on batches of small mitigation
    circuits on a busy machine (measured: 96 twirled 5-qubit circuits, 128 shots:
    1.2 s with default threads, 0.3 s with one); circuits are cheap, threads
    contend. qiskit-ibm-runtime fake devices run on Aer too (their ``run`` passes
    options through); other backends get no extra options.
    """
    from qiskit_aer import AerSimulator

    aer = isinstance(qiskit_backend, AerSimulator)  # the executor's are subclasses
    fake_on_aer = type(getattr(qiskit_backend, "sim", None)).__name__ == "AerSimulator" or (
        hasattr(qiskit_backend, "_setup_sim") and hasattr(qiskit_backend, "sim")
    )
    if aer or fake_on_aer:
        return {"max_parallel_threads": 1}
    return {}


@dataclass(frozen=True)
class QubitCalibration:
    """One qubit's assignment matrix (columns: prepared 0, prepared 1) and its age."""

    matrix: np.ndarray  # float64 (2, 2), columns sum to 1
    measured_at: float
    shots: int

    @property
    def p01(self) -> float:
        """P(read 0 | prepared 1)."""
        return float(self.matrix[0, 1])

    @property
    def p10(self) -> float:
        """P(read 1 | prepared 0)."""
        return float(self.matrix[1, 0])

    def z_correction(self) -> np.ndarray:
        """Per-outcome weights w[m] with E[w[m]] = <Z> of the state before readout.

        ``[1, -1] @ inv(A)``; with twirled (symmetrized) readout this is TREX's
        ``(-1)**m / (1 - p01 - p10)``.
        """
        inv: np.ndarray = np.linalg.inv(self.matrix)
        weights: np.ndarray = np.array([1.0, -1.0]) @ inv
        return weights


class CalibrationCache:
    """Readout calibrations per (backend, qubit) with an expiry; thread-safe.

    `measurements` counts calibration batches actually run (for tests and
    benchmarks); `hits` counts qubits served from the cache.
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._seed = seed
        self._lock = threading.Lock()
        self._cals: dict[tuple[str, int], QubitCalibration] = {}
        self.measurements = 0
        self.hits = 0

    def clear(self) -> None:
        """Forget everything (e.g. after a backend recalibration)."""
        with self._lock:
            self._cals.clear()

    def get(
        self,
        backend: object,
        qubits: Iterable[int],
        *,
        num_randomizations: int = 32,
        shots_per_randomization: int | str = "auto",
        seed: int | None = None,
    ) -> dict[int, QubitCalibration]:
        """Fresh calibrations for `qubits` on `backend`, measuring the missing ones.

        The lock is held while measuring so concurrent jobs on one backend do not
        calibrate the same qubits twice.
        """
        name = str(getattr(backend, "name", "backend"))
        wanted = sorted(set(qubits))
        with self._lock:
            now = self._clock()
            out: dict[int, QubitCalibration] = {}
            missing: list[int] = []
            for q in wanted:
                cal = self._cals.get((name, q))
                if cal is not None and now - cal.measured_at < self.ttl_s:
                    out[q] = cal
                else:
                    missing.append(q)
            self.hits += len(out)
            if missing:
                spr = (
                    DEFAULT_SHOTS_PER_RANDOMIZATION
                    if shots_per_randomization == "auto"
                    else int(shots_per_randomization)
                )
                fresh = measure_readout(
                    backend,
                    missing,
                    num_randomizations=num_randomizations,
                    shots_per_randomization=spr,
                    seed=self._seed if self._seed is not None else seed,
                    now=now,
                )
                self.measurements += 1
                for q, cal in fresh.items():
                    self._cals[(name, q)] = cal
                out.update(fresh)
                log.info(
                    "readout.calibrated",
                    backend=name,
                    qubits=missing,
                    shots=num_randomizations * spr,
                )
            return out


def measure_readout(
    backend: object,
    qubits: Sequence[int],
    *,
    num_randomizations: int,
    shots_per_randomization: int,
    seed: int | None,
    now: float,
) -> dict[int, QubitCalibration]:
    """Run randomized-preparation circuits on `backend` and build each qubit's matrix."""
    qiskit_backend: Any = getattr(backend, "qiskit", backend)
    num_qubits = int(qiskit_backend.num_qubits)
    target = qiskit_backend.target
    ops = frozenset(target.operation_names)
    if "measure" not in ops or not ({"x", "sx"} & ops):
        raise FailedPrecondition(
            f"measurement mitigation needs 'measure' and an 'x' or 'sx' gate on backend "
            f"'{getattr(backend, 'name', '?')}' to calibrate readout"
        )
    rng = np.random.default_rng(seed)
    k = len(qubits)
    # Balanced preparations: half the randomizations are complements of the other half.
    half = max(1, num_randomizations // 2)
    base = rng.integers(0, 2, size=(half, k), dtype=np.uint8)
    preps = np.concatenate([base, 1 - base])[: max(2, num_randomizations)]
    circuits = []
    for row in preps:
        qc = QuantumCircuit(num_qubits, k)
        for i, q in enumerate(qubits):
            if row[i]:
                append_flip(qc, q, ops)
        qc.measure(list(qubits), list(range(k)))
        circuits.append(qc)
    result = qiskit_backend.run(
        circuits,
        shots=shots_per_randomization,
        seed_simulator=None if seed is None else int(rng.integers(0, 2**31)),
        **run_options(qiskit_backend),
    ).result()
    tallies = np.zeros((k, 2, 2), dtype=np.float64)  # [qubit, read, prepared]
    for row, counts in zip(preps, result.get_counts(), strict=True):
        for bits, n in counts.items():
            read = bits.replace(" ", "")[::-1]  # read[i] is clbit i
            for i in range(k):
                tallies[i, int(read[i]), int(row[i])] += n
    out: dict[int, QubitCalibration] = {}
    for i, q in enumerate(qubits):
        col = tallies[i].sum(axis=0)
        if np.any(col == 0):
            raise FailedPrecondition(f"readout calibration of qubit {q} saw no shots")
        matrix = tallies[i] / col
        if matrix[0, 0] <= matrix[0, 1]:
            raise FailedPrecondition(
                f"readout of qubit {q} on backend '{getattr(backend, 'name', '?')}' is no better "
                "than a coin flip; measurement mitigation cannot correct it"
            )
        out[q] = QubitCalibration(matrix=matrix, measured_at=now, shots=int(col.sum()))
    return out


_DEFAULT = CalibrationCache()


def default_calibrations() -> CalibrationCache:
    """The executor process's shared calibration cache."""
    return _DEFAULT
