"""Error suppression and mitigation for the executor's primitives.

Entry points for the primitive pipeline (blocking; call from a worker thread):

- `run_estimator(backend, isa_pubs, options, precision, seed)`: twirling, DD,
  TREX or M3 readout mitigation, ZNE by gate folding; Runtime's result fields.
- `run_sampler(backend, isa_pubs, options, shots, seed)`: twirling, DD and
  opt-in M3 readout correction (quasi-probabilities).

`resolve_estimator`/`resolve_sampler` document and compute the level table;
`CalibrationCache` keeps readout calibrations per backend with an expiry.
"""

from qrelay.executor.mitigation.calibration import (
    CalibrationCache,
    QubitCalibration,
    default_calibrations,
)
from qrelay.executor.mitigation.estimator import run_estimator
from qrelay.executor.mitigation.sampler import run_sampler
from qrelay.executor.mitigation.techniques import (
    LEVEL_TABLE,
    Techniques,
    resolve_estimator,
    resolve_sampler,
)

__all__ = [
    "LEVEL_TABLE",
    "CalibrationCache",
    "QubitCalibration",
    "Techniques",
    "default_calibrations",
    "resolve_estimator",
    "resolve_sampler",
    "run_estimator",
    "run_sampler",
]
