"""Input checks with messages that say what is wrong and what to do."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from scipy import sparse


def check_array(X, *, n_features: int | None = None, min_samples: int = 1, name: str = "X",
                expected_by: str = "the model") -> np.ndarray:
    """Return X as a C-contiguous float64 array of shape (n_samples, n_features).

    Raises ValueError for non-numeric, complex or sparse data, a wrong number of dimensions
    or features (``expected_by`` names who expects ``n_features``), too few rows, and NaN or
    infinity (naming the first offending row).  The messages contain scikit-learn's key
    phrases ("Reshape your data", "Complex data not supported", "is expecting ... features").
    """
    if sparse.issparse(X):
        raise TypeError(
            f"Sparse data was passed for {name}, but dense data is required. "
            "Use '.toarray()' to convert to a dense numpy array."
        )
    try:
        array = np.asarray(X)
        if np.iscomplexobj(array):
            raise ValueError(f"Complex data not supported: {name} must be real-valued")
        array = array.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        if str(exc).startswith("Complex data"):
            raise
        if "NAType" in str(exc):
            raise ValueError(f"{name} contains missing values (pandas NA); drop or impute those rows first") from None
        # TypeError stays TypeError (an object that is no number), ValueError ValueError (a bad string).
        raise type(exc)(f"{name} must be numeric, array-like of shape (n_samples, n_features): {exc}") from None
    if array.ndim == 1:
        if n_features is not None and array.shape[0] == n_features:
            raise ValueError(
                f"{name} is 1-d with {n_features} values. Reshape your data: "
                f"{name}.reshape(1, {n_features}) for a single sample"
            )
        raise ValueError(
            f"{name} must be 2-d of shape (n_samples, n_features); got a 1-d array. Reshape your data: "
            f"{name}.reshape(1, -1) if it is one sample, {name}.reshape(-1, 1) if it is one feature"
        )
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-d of shape (n_samples, n_features); got shape {array.shape}")
    if array.shape[0] < min_samples:
        raise ValueError(f"{name} has {array.shape[0]} samples; at least {min_samples} required")
    if array.shape[1] == 0:
        raise ValueError(f"Found array with 0 feature(s) (shape={array.shape}) while a minimum of 1 is required.")
    if n_features is not None and array.shape[1] != n_features:
        raise ValueError(
            f"{name} has {array.shape[1]} features, but {expected_by} is expecting {n_features} features as input"
        )
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{name} contains NaN or infinity in {len(bad_rows)} row(s), first at row {bad_rows[0]}; "
            "drop or impute those rows first"
        )
    return np.ascontiguousarray(array)


def feature_names_of(X) -> np.ndarray | None:
    """The column names of a DataFrame-like X when they are all strings (as scikit-learn's
    ``feature_names_in_``), else None."""
    columns = getattr(X, "columns", None)
    if columns is None:
        return None
    names = np.asarray(list(columns), dtype=object)
    return names if len(names) and all(isinstance(name, str) for name in names) else None


def check_feature_names(estimator, X) -> None:
    """scikit-learn's rule: columns named at fit must come back with the same names in the same
    order (a DataFrame with its columns reordered would be scored wrongly without a word);
    a warning when only one of the two has names."""
    fitted, given = getattr(estimator, "feature_names_in_", None), feature_names_of(X)
    kind = type(estimator).__name__
    if fitted is None and given is None:
        return
    if given is None:
        warnings.warn(f"X does not have valid feature names, but {kind} was fitted with feature names", UserWarning,
                      stacklevel=3)
    elif fitted is None:
        warnings.warn(f"X has feature names, but {kind} was fitted without feature names", UserWarning, stacklevel=3)
    elif len(fitted) != len(given) or np.any(fitted != given):
        unseen = [name for name in given if name not in set(fitted)]
        missing = [name for name in fitted if name not in set(given)]
        detail = "".join(f"Feature names unseen at fit time:\n- {n}\n" for n in unseen[:1]) if unseen else ""
        detail += f"Feature names seen at fit time, yet now missing:\n- {missing[0]}\n" if missing else ""
        if not unseen and not missing:
            detail = "Feature names must be in the same order as they were in fit.\n"
        raise ValueError("The feature names should match those that were passed during fit.\n" + detail)


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


def check_random_state(random_state) -> np.random.Generator | np.random.RandomState:
    """A random generator for ``random_state``.

    None or an int gives a new ``np.random.Generator`` (seeded by the int); a ``Generator``
    or a legacy ``np.random.RandomState`` (what scikit-learn users pass) is used as it is,
    so successive calls draw on from where it stands.  Both kinds have every method the
    package draws with (``choice``, ``random``, ``uniform``, ``multinomial``,
    ``standard_normal``).
    """
    if random_state is None or (isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool)):
        return np.random.default_rng(random_state)
    if isinstance(random_state, (np.random.Generator, np.random.RandomState)):
        return random_state
    raise ValueError(
        f"random_state must be None, an int, a numpy Generator or a numpy RandomState; got {random_state!r}"
    )


# ------------------------------------------------------- initial parameters
# The messages are scikit-learn's (``sklearn.mixture._gaussian_mixture._check_weights`` and
# friends), so code and tests written against scikit-learn's GaussianMixture match them.
def _as_float_array(value, name: str) -> np.ndarray:
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The parameter '{name}' must be numeric: {exc}") from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"The parameter '{name}' contains NaN or infinity")
    return array


def check_shape(param: np.ndarray, param_shape: tuple, name: str) -> None:
    if param.shape != param_shape:
        raise ValueError(f"The parameter '{name}' should have the shape of {param_shape}, but got {param.shape}")


def check_weights(weights, n_components: int) -> np.ndarray:
    """``weights_init``: shape (n_components,), each in [0, 1], summing to 1."""
    weights = _as_float_array(weights, "weights")
    check_shape(weights, (n_components,), "weights")
    if np.any(weights < 0.0) or np.any(weights > 1.0):
        # (min and max swapped as in scikit-learn, whose tests match this exact text)
        raise ValueError(
            "The parameter 'weights' should be in the range [0, 1], but got "
            f"max value {np.min(weights):.5f}, min value {np.max(weights):.5f}"
        )
    if not np.allclose(abs(1.0 - np.sum(weights)), 0.0, atol=1e-8):
        raise ValueError(f"The parameter 'weights' should be normalized, but got sum(weights) = {np.sum(weights):.5f}")
    return weights


def check_means(means, n_components: int, n_features: int) -> np.ndarray:
    """``means_init``: shape (n_components, n_features)."""
    means = _as_float_array(means, "means")
    check_shape(means, (n_components, n_features), "means")
    return means


def check_precisions(precisions, covariance_type: str, n_components: int, n_features: int) -> np.ndarray:
    """``precisions_init``: the shape of ``covariance_type``; symmetric positive-definite
    matrices for ``full`` and ``tied``, positive numbers for ``diag`` and ``spherical``."""
    name = f"{covariance_type} precision"
    precisions = _as_float_array(precisions, name)
    expected = {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]
    check_shape(precisions, expected, name)
    if covariance_type in ("diag", "spherical"):
        if np.any(precisions <= 0.0):
            raise ValueError(f"'{name}' should be positive; got minimum {np.min(precisions):.5g}")
        return precisions
    matrices = precisions if covariance_type == "full" else precisions[np.newaxis]
    for k, matrix in enumerate(matrices):
        where = f" (component {k})" if covariance_type == "full" else ""
        if not np.all(np.isclose(matrix, matrix.T)):
            raise ValueError(f"'{name}' should be symmetric, positive-definite; the matrix{where} is not symmetric")
        smallest = np.linalg.eigvalsh(matrix)[0]
        if not smallest > 0.0:
            raise ValueError(
                f"'{name}' should be symmetric, positive-definite; the matrix{where} has eigenvalue {smallest:.5g}"
            )
    return precisions
