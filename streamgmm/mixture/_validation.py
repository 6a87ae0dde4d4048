"""Input checks with messages that say what is wrong and what to do."""

from __future__ import annotations

import numbers

import numpy as np


def check_array(X, *, n_features: int | None = None, min_samples: int = 1, name: str = "X") -> np.ndarray:
    """Return X as a C-contiguous float64 array of shape (n_samples, n_features).

    Raises ValueError for non-numeric data, a wrong number of dimensions or features,
    too few rows, and NaN or infinity (naming the first offending row).
    """
    try:
        array = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, array-like of shape (n_samples, n_features): {exc}") from None
    if array.ndim == 1 and n_features is not None and array.shape[0] == n_features:
        raise ValueError(
            f"{name} is 1-d with {n_features} values; reshape it to (1, {n_features}) for a single sample"
        )
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-d of shape (n_samples, n_features); got shape {array.shape}")
    if array.shape[0] < min_samples:
        raise ValueError(f"{name} has {array.shape[0]} samples; at least {min_samples} required")
    if n_features is not None and array.shape[1] != n_features:
        raise ValueError(
            f"{name} has {array.shape[1]} features, but the model was fitted with {n_features} features"
        )
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{name} contains NaN or infinity in {len(bad_rows)} row(s), first at row {bad_rows[0]}; "
            "drop or impute those rows first"
        )
    return np.ascontiguousarray(array)


def check_sample_weight(sample_weight, n_samples: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n_samples)
    weight = np.asarray(sample_weight, dtype=np.float64)
    if weight.shape != (n_samples,):
        raise ValueError(f"sample_weight must have shape ({n_samples},); got {weight.shape}")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("sample_weight must be finite and non-negative")
    return weight


def check_positive_int(value, name: str, minimum: int = 1) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def check_positive_float(value, name: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")


def check_random_state(random_state) -> np.random.Generator:
    if random_state is None or isinstance(random_state, numbers.Integral):
        return np.random.default_rng(random_state)
    if isinstance(random_state, np.random.Generator):
        return random_state
    raise ValueError(f"random_state must be None, an int or a numpy Generator; got {random_state!r}")
