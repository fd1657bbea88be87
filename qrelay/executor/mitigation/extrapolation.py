"""Zero-noise extrapolators with Runtime's names, and their documented fallback.

Each extrapolator fits (noise factor, value, std) points and returns a model
to evaluate anywhere (0 is the zero-noise estimate); its standard deviation is
propagated from the points' stds through the fit (numerical Jacobian).

A fit *fails* when it is numerically unusable: a singular or ill-posed system,
non-finite values, an exponential whose data change sign or grow with noise,
or a zero-noise value farther than `BOUND_SLACK` x the observable term's bound
(|<P>| <= 1) from the origin. Runtime's heuristic is the same in spirit. The
caller tries the extrapolators in order, uses the first success, and when all
fail falls back to the raw value at the lowest noise factor, saying so in the
metadata ("fallback" is also an extrapolator one can ask for directly).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["BOUND_SLACK", "Fit", "FitFailed", "fit"]

BOUND_SLACK = 1.5


class FitFailed(ValueError):
    """The extrapolation is numerically unusable; the message says why."""


Model = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Fit:
    """A fitted extrapolation model: values and stds at any noise factors."""

    name: str
    values: Callable[[np.ndarray], np.ndarray]
    stds: Callable[[np.ndarray], np.ndarray]


def _poly(x: np.ndarray, y: np.ndarray, w: np.ndarray, degree: int) -> Model:
    if len(x) < degree + 1:
        raise FitFailed(f"polynomial of degree {degree} needs {degree + 1} points")
    vander = np.vander(x, degree + 1)
    sw = np.sqrt(w)
    coef, _, rank, _ = np.linalg.lstsq(vander * sw[:, None], y * sw, rcond=None)
    if rank < degree + 1:
        raise FitFailed("singular polynomial fit (noise factors too close)")
    return lambda xs: np.polyval(coef, xs)


def _exponential(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> Model:
    """A exp(-x/tau), tau > 0: a line through log|y| (weights y^2 w)."""
    if np.any(y == 0) or not (np.all(y > 0) or np.all(y < 0)):
        raise FitFailed("exponential fit needs values of one sign, away from zero")
    sign = float(np.sign(y[0]))
    logy = np.log(np.abs(y))
    lw = w * y**2
    slope, intercept = np.polyfit(x, logy, 1, w=np.sqrt(lw))
    if not slope < 0:
        raise FitFailed("exponential fit found no decay with noise (tau <= 0)")
    amp = sign * math.exp(intercept)
    return lambda xs: amp * np.exp(slope * xs)


def _double_exponential(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> Model:
    from scipy.optimize import curve_fit

    if len(x) < 4:
        raise FitFailed("double exponential needs 4 points")

    def f(xs: np.ndarray, a: float, r1: float, b: float, r2: float) -> np.ndarray:
        return np.asarray(a * np.exp(-r1 * xs) + b * np.exp(-r2 * xs))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = curve_fit(
                f,
                x,
                y,
                p0=(y[0], 0.1, 0.0, 1.0),
                sigma=1 / np.sqrt(w),
                maxfev=2000,
                bounds=([-np.inf, 0, -np.inf, 0], [np.inf, np.inf, np.inf, np.inf]),
            )
    except (RuntimeError, ValueError) as err:
        raise FitFailed(f"double exponential did not converge: {err}") from None
    return lambda xs: f(xs, *p)


def _model(name: str, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> Model:
    if name == "linear":
        return _poly(x, y, w, 1)
    if name.startswith("polynomial_degree_"):
        return _poly(x, y, w, int(name.rsplit("_", 1)[1]))
    if name == "exponential":
        return _exponential(x, y, w)
    if name == "double_exponential":
        return _double_exponential(x, y, w)
    if name == "fallback":
        lowest = float(y[int(np.argmin(x))])
        return lambda xs: np.full(np.shape(xs), lowest)
    raise FitFailed(f"unknown extrapolator {name!r}")


def fit(
    name: str, factors: np.ndarray, values: np.ndarray, stds: np.ndarray, bound: float = 1.0
) -> Fit:
    """Fit `name` to the points; raises FitFailed when it is numerically unusable."""
    x = np.asarray(factors, dtype=float)
    y = np.asarray(values, dtype=float)
    s = np.maximum(np.asarray(stds, dtype=float), 1e-6)
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
        raise FitFailed("non-finite input values")
    w = 1 / s**2
    with np.errstate(all="ignore"):
        model = _model(name, x, y, w)
        zero = float(np.asarray(model(np.zeros(1)))[0])
    if not math.isfinite(zero):
        raise FitFailed("non-finite zero-noise value")
    if abs(zero) > BOUND_SLACK * bound:
        raise FitFailed(f"zero-noise value {zero:.3g} is outside the observable's bounds")

    def values_at(xs: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(model(np.asarray(xs, dtype=float)), dtype=float)

    def stds_at(xs: np.ndarray) -> np.ndarray:
        xs = np.asarray(xs, dtype=float)
        base = values_at(xs)
        var = np.zeros_like(base)
        for j in range(len(y)):
            h = max(1e-4, 1e-3 * s[j])
            y2 = y.copy()
            y2[j] += h
            try:
                with np.errstate(all="ignore"):
                    moved = np.asarray(_model(name, x, y2, w)(xs), dtype=float)
            except FitFailed:
                return np.full_like(base, np.nan)
            var += ((moved - base) / h * s[j]) ** 2
        out: np.ndarray = np.sqrt(var)
        return out

    return Fit(name=name, values=values_at, stds=stds_at)
