"""Run arguments as Qiskit's reference primitives check them: PUB coercion, shots, precision.

Shared by the SDK's primitives and the program primitives (`ctx.sampler()`),
so bad input raises the same classes with Qiskit's messages in both:
`InvalidArgument` is a `ValueError`, `InvalidType` a `TypeError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

from qiskit.primitives.containers.estimator_pub import EstimatorPub
from qiskit.primitives.containers.sampler_pub import SamplerPub

from qrelay.errors import InvalidArgument, InvalidType, QRelayError, invalid_argument


def pub_list(pubs: Any) -> list[Any]:
    """The PUBs as a list. A single PUB without brackets is iterated as Qiskit's
    primitives iterate it, so its coercion fails with Qiskit's own message."""
    if isinstance(pubs, str | bytes):
        raise InvalidType(f"pubs must be an iterable of PUBs, got {type(pubs).__name__}")
    try:
        return list(pubs)  # a QuantumCircuit iterates as its instructions, as in Qiskit
    except TypeError:
        raise InvalidType(f"pubs must be an iterable of PUBs, got {type(pubs).__name__}") from None


def coerce_each(items: list[Any], coerce: Callable[[Any], Any]) -> list[Any]:
    out = []
    for i, pub in enumerate(items):
        try:
            out.append(coerce(pub))
        except QRelayError as exc:
            raise type(exc)(f"pub {i}: {exc.message}") from None
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise invalid_argument(exc, f"pub {i}: ") from None
    return out


def check_shots(shots: Any) -> None:
    """Qiskit's rule and messages for `run(pubs, shots=...)`."""
    if shots is None:
        return
    if not isinstance(shots, Integral) or isinstance(shots, bool):
        raise InvalidType("shots must be an integer")
    if shots <= 0:
        raise InvalidArgument("shots must be positive")


def check_precision(precision: Any) -> None:
    """Qiskit's rule and messages for `run(pubs, precision=...)`; 0 asks for exact values."""
    if precision is None:
        return
    if not isinstance(precision, Real) or isinstance(precision, bool):
        raise InvalidType(f"precision must be a real number, not {type(precision)}.")
    if not math.isfinite(precision):
        raise InvalidArgument(f"precision must be a finite number, got {precision}")
    if precision < 0:
        raise InvalidArgument("precision must be non-negative")


def sampler_pubs(pubs: Any, shots: int | None) -> list[SamplerPub]:
    """The Sampler's PUBs coerced as Qiskit does, after Qiskit's check of `shots`."""
    check_shots(shots)
    return coerce_each(pub_list(pubs), lambda p: SamplerPub.coerce(p, shots))


def estimator_pubs(pubs: Any, precision: float | None) -> list[EstimatorPub]:
    """The Estimator's PUBs coerced as Qiskit does, each precision checked (0 = exact)."""
    check_precision(precision)

    def coerce(pub: Any) -> EstimatorPub:
        coerced = EstimatorPub.coerce(pub, precision)
        check_precision(coerced.precision)
        return coerced

    return coerce_each(pub_list(pubs), coerce)
