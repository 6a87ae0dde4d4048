"""Gaussian mixture math: small pure functions over numpy arrays.

Every model in the package scores through ``weighted_log_prob`` (one log-probability
path), stores precision Cholesky factors rather than covariances, and takes
log-determinants from their diagonals.  Covariance types dispatch through dicts
of functions, not if-chains repeated in each method.

Shapes of ``covariances`` / ``precisions_cholesky`` by covariance type:
``full`` (K, D, D), ``tied`` (D, D), ``diag`` (K, D), ``spherical`` (K,).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
LOG_2PI = np.log(2.0 * np.pi)
# Rows x components x features per chunk of the log-probability products (32 MB of float64).
ROW_CHUNK_ELEMENTS = 1 << 22

# Added to component masses so that an empty component never divides by zero
# (the same guard scikit-learn uses, which keeps our iterations identical to its).
MASS_EPS = 10.0 * np.finfo(np.float64).eps

ILL_DEFINED_MESSAGE = (
    "Fitting the mixture model failed because some components have ill-defined "
    "empirical covariance (for instance caused by singleton or collapsed samples). "
    "Try to decrease the number of components, increase reg_covar, or scale the input data."
)


def check_covariance_type(covariance_type: str) -> None:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {', '.join(COVARIANCE_TYPES)}; got {covariance_type!r}"
        )


# --------------------------------------------------------------------------- M-step
def _covariances_full(resp, X, nk, means, reg_covar):
    """Weighted covariance per component, centred (numerically stable).

    resp : array of shape (n_samples, n_components), already multiplied by sample weights.
    """
    n_components, n_features = means.shape
    covariances = np.empty((n_components, n_features, n_features))
    for k in range(n_components):
        diff = X - means[k]
        covariances[k] = np.dot(resp[:, k] * diff.T, diff) / nk[k]
        covariances[k].flat[:: n_features + 1] += reg_covar
    return covariances


def _covariances_tied(resp, X, nk, means, reg_covar):
    weights = resp.sum(axis=1)
    avg_X2 = np.dot(weights * X.T, X)
    avg_means2 = np.dot(nk * means.T, means)
    covariance = (avg_X2 - avg_means2) / nk.sum()
    covariance.flat[:: len(covariance) + 1] += reg_covar
    return covariance


def _covariances_diag(resp, X, nk, means, reg_covar):
    avg_X2 = np.dot(resp.T, X * X) / nk[:, np.newaxis]
    avg_means2 = means**2
    return avg_X2 - avg_means2 + reg_covar


def _covariances_spherical(resp, X, nk, means, reg_covar):
    return _covariances_diag(resp, X, nk, means, reg_covar).mean(axis=1)


# Each takes (resp, X, nk, means, reg_covar), as scikit-learn's _estimate_gaussian_covariances_*.
COVARIANCE_ESTIMATORS = {
    "full": _covariances_full,
    "tied": _covariances_tied,
    "diag": _covariances_diag,
    "spherical": _covariances_spherical,
}


def estimate_gaussian_parameters(X, resp, reg_covar, covariance_type):
    """M-step: component masses, means and covariances from responsibilities.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    resp : array of shape (n_samples, n_components)
        Responsibilities, already multiplied by any sample weights.

    Returns
    -------
    nk : array of shape (n_components,)
    means : array of shape (n_components, n_features)
    covariances : array, shape depends on covariance_type
    """
    nk = resp.sum(axis=0) + MASS_EPS
    if covariance_type == "full":  # (centred per component already)
        means = np.dot(resp.T, X) / nk[:, np.newaxis]
        return nk, means, _covariances_full(resp, X, nk, means, reg_covar)
    # Tied, diagonal and spherical covariances are second moments less the means' squares, as
    # scikit-learn's: about zero, data offset far from it by their spread (a timestamp, 1e8 +
    # unit noise) lost every digit and EM stopped on an "ill-defined empirical covariance" (as
    # scikit-learn's does; helper-64).  About the data's weighted mean they keep them: a
    # covariance about a component's own mean does not depend on where zero is.
    weights = resp.sum(axis=1)
    centre = np.dot(weights, X) / max(float(weights.sum()), np.finfo(float).tiny)
    X = X - centre
    means = np.dot(resp.T, X) / nk[:, np.newaxis]
    covariances = COVARIANCE_ESTIMATORS[covariance_type](resp, X, nk, means, reg_covar)
    return nk, means + centre, covariances


# ----------------------------------------------------------- Choleskys and log-dets
def _cholesky_of_precision(covariance: np.ndarray) -> np.ndarray:
    """Upper-triangular P with P P^T = inv(covariance), via the covariance's Cholesky."""
    cov_chol = linalg.cholesky(covariance, lower=True)
    return linalg.solve_triangular(cov_chol, np.eye(len(covariance)), lower=True).T


def compute_precision_cholesky(covariances, covariance_type):
    """Precision Cholesky factors; raises ValueError if a covariance is not positive definite."""
    if covariance_type == "full":
        precisions_chol = np.empty_like(covariances)
        for k, covariance in enumerate(covariances):
            try:
                precisions_chol[k] = _cholesky_of_precision(covariance)
            except linalg.LinAlgError:
                raise ValueError(ILL_DEFINED_MESSAGE) from None
        return precisions_chol
    if covariance_type == "tied":
        try:
            return _cholesky_of_precision(covariances)
        except linalg.LinAlgError:
            raise ValueError(ILL_DEFINED_MESSAGE) from None
    if np.any(np.less_equal(covariances, 0.0)) or not np.all(np.isfinite(covariances)):
        raise ValueError(ILL_DEFINED_MESSAGE)
    return 1.0 / np.sqrt(covariances)


def precision_cholesky_per_component(covariances, covariance_type):
    """Like ``compute_precision_cholesky`` but never raises for one bad component.

    Returns (precisions_chol, bad) where ``bad`` is a boolean mask of components whose
    covariance is not positive definite (their factor is left as the identity so the
    caller can re-seed them).  ``tied`` has one shared matrix: ``bad`` is all-or-nothing.
    """
    n_components = len(covariances) if covariance_type != "tied" else None
    if covariance_type == "full":
        # Fast path: one batched factorisation; only on failure look at components one by one.
        try:
            with np.errstate(all="ignore"):
                cov_chol = np.linalg.cholesky(covariances)
                eye = np.broadcast_to(np.eye(covariances.shape[1]), covariances.shape)
                precisions_chol = np.linalg.solve(cov_chol, eye).transpose(0, 2, 1)
            if np.all(np.isfinite(precisions_chol)):
                return np.ascontiguousarray(precisions_chol), np.zeros(n_components, dtype=bool)
        except np.linalg.LinAlgError:
            pass
        precisions_chol = np.empty_like(covariances)
        bad = np.zeros(n_components, dtype=bool)
        n_features = covariances.shape[1]
        for k, covariance in enumerate(covariances):
            try:
                if not np.all(np.isfinite(covariance)):
                    raise linalg.LinAlgError("non-finite covariance")
                precisions_chol[k] = _cholesky_of_precision(covariance)
                if not np.all(np.isfinite(precisions_chol[k])):
                    raise linalg.LinAlgError("non-finite precision")
            except linalg.LinAlgError:
                bad[k] = True
                precisions_chol[k] = np.eye(n_features)
        return precisions_chol, bad
    if covariance_type == "tied":
        try:
            if not np.all(np.isfinite(covariances)):
                raise linalg.LinAlgError("non-finite covariance")
            return _cholesky_of_precision(covariances), np.array([False])
        except linalg.LinAlgError:
            return np.eye(len(covariances)), np.array([True])
    ok = np.isfinite(covariances) & (covariances > 0.0)
    if covariances.ndim == 2:
        bad = ~ok.all(axis=1)
    else:
        bad = ~ok
    safe = np.where(ok, covariances, 1.0)
    return 1.0 / np.sqrt(safe), bad


def compute_log_det_cholesky(precisions_chol, covariance_type, n_features):
    """log det of each component's precision Cholesky factor (= -0.5 log det covariance)."""
    if covariance_type == "full":
        n_components = precisions_chol.shape[0]
        diagonals = precisions_chol.reshape(n_components, -1)[:, :: n_features + 1]
        return np.sum(np.log(diagonals), axis=1)
    if covariance_type == "tied":
        return np.sum(np.log(np.diag(precisions_chol)))
    if covariance_type == "diag":
        return np.sum(np.log(precisions_chol), axis=1)
    return n_features * np.log(precisions_chol)


def covariances_from_precision_cholesky(precisions_chol, covariance_type):
    """Inverse of ``compute_precision_cholesky``: covariances from precision factors."""
    if covariance_type == "full":
        return np.array([_covariance_of_precision_cholesky(p) for p in precisions_chol])
    if covariance_type == "tied":
        return _covariance_of_precision_cholesky(precisions_chol)
    return 1.0 / precisions_chol**2


def precisions_from_cholesky(precisions_chol, covariance_type):
    """The precision matrices (inverse covariances) of their upper-triangular factors."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", precisions_chol, precisions_chol)
    if covariance_type == "tied":
        return precisions_chol @ precisions_chol.T
    return precisions_chol**2


def _covariance_of_precision_cholesky(precision_chol):
    """inv(U U^T) = U^-T U^-1 for the upper-triangular precision factor U."""
    inverse = linalg.solve_triangular(precision_chol, np.eye(len(precision_chol)), lower=False)
    return inverse.T @ inverse


def _upper_cholesky_of(precision):
    """Upper-triangular U with U U^T = precision: the factor ``compute_precision_cholesky`` gives.

    A plain Cholesky factor is lower-triangular (L L^T); reversing rows and columns (J P J,
    J the exchange matrix) before and after turns it into the upper one, as scikit-learn does.
    """
    flipped = precision[::-1, ::-1]
    return np.ascontiguousarray(linalg.cholesky(flipped, lower=True)[::-1, ::-1])


def precision_cholesky_from_precisions(precisions, covariance_type):
    """Precision Cholesky factors of user-given precisions (``precisions_init``), in the
    same upper-triangular form as ``compute_precision_cholesky`` (everything that reads them
    back, such as ``covariances_from_precision_cholesky``, relies on it)."""
    if covariance_type == "full":
        return np.array([_upper_cholesky_of(p) for p in precisions])
    if covariance_type == "tied":
        return _upper_cholesky_of(precisions)
    return np.sqrt(precisions)


# ----------------------------------------------------------------- log-probabilities
def _squared_mahalanobis_full(X, means, precisions_chol):
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    # One GEMM over all components: X @ [P_1 | ... | P_K], then shift by mu_k P_k.
    stacked = precisions_chol.transpose(1, 0, 2).reshape(n_features, n_components * n_features)
    y = X @ stacked
    y -= np.einsum("kd,kde->ke", means, precisions_chol).reshape(-1)
    y = y.reshape(n_samples, n_components, n_features)
    return np.einsum("nkd,nkd->nk", y, y)


def _squared_mahalanobis_tied(X, means, precisions_chol):
    y = (X @ precisions_chol)[:, np.newaxis, :] - (means @ precisions_chol)[np.newaxis]
    return np.einsum("nkd,nkd->nk", y, y)


def _squared_mahalanobis_diag(X, means, precisions_chol):
    # sum_d p^2 (x - mu)^2 expanded into three products, as scikit-learn does: (n, K) arrays
    # only, no (n, K, D) difference.  Centring on the means' average first keeps the expansion
    # from cancelling when the data sit far from the origin.
    shift = means.mean(axis=0)
    X, means = X - shift, means - shift
    p2 = precisions_chol**2
    return _expanded((X * X) @ p2.T - 2.0 * (X @ (means * p2).T) + np.sum(means * means * p2, axis=1))


def _squared_mahalanobis_spherical(X, means, precisions_chol):
    return _squared_mahalanobis_diag(X, means, np.broadcast_to(precisions_chol[:, np.newaxis], means.shape))


def _expanded(squared):
    """An expanded square: rounding can leave it a hair below zero, and a row so far out that
    its square overflows gives inf - inf; both are put right (0 and inf)."""
    squared = np.maximum(squared, 0.0, out=squared)
    squared[np.isnan(squared)] = np.inf
    return squared


_MAHALANOBIS = {
    "full": _squared_mahalanobis_full,
    "tied": _squared_mahalanobis_tied,
    "diag": _squared_mahalanobis_diag,
    "spherical": _squared_mahalanobis_spherical,
}


def estimate_log_gaussian_prob(X, means, precisions_chol, covariance_type):
    """log N(x_n | mu_k, Sigma_k) for every sample and component.

    Returns
    -------
    log_prob : array of shape (n_samples, n_components)
    """
    n_samples, n_features = X.shape
    log_det = compute_log_det_cholesky(precisions_chol, covariance_type, n_features)
    squared_mahalanobis = _MAHALANOBIS[covariance_type]
    # Rows in chunks, so the (rows, K, D) temporaries of the full and tied products stay near
    # 32 MB whatever n (a batch of the daemon is one chunk).
    rows = max(1, ROW_CHUNK_ELEMENTS // (means.shape[0] * n_features))
    with np.errstate(over="ignore", invalid="ignore"):
        if n_samples <= rows:
            mahalanobis = squared_mahalanobis(X, means, precisions_chol)
        else:
            mahalanobis = np.concatenate([squared_mahalanobis(X[start:start + rows], means, precisions_chol)
                                          for start in range(0, n_samples, rows)])
    return -0.5 * (n_features * LOG_2PI + mahalanobis) + log_det


def weighted_log_prob(X, weights, means, precisions_chol, covariance_type):
    """log(pi_k) + log N(x_n | k): the single path behind scoring and the E-step."""
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)
    return estimate_log_gaussian_prob(X, means, precisions_chol, covariance_type) + log_weights


def logsumexp_rows(a):
    """Row-wise log-sum-exp, -inf for rows that are all -inf (no NaN)."""
    # Reducing along a short last axis (K components) is slow in numpy; reducing the
    # contiguous transpose over its first axis is several times faster.
    columns = np.ascontiguousarray(a.T)
    row_max = columns.max(axis=0)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.log(np.exp(columns - safe_max).sum(axis=0)) + safe_max
    # Rows with +inf or NaN inputs are not a density: report -inf so they rank as anomalies.
    return np.where(np.isnan(out), -np.inf, out)


def e_step(weighted_log_prob_):
    """Normalise weighted log-probabilities.

    Returns (log_prob_norm of shape (n_samples,), log_resp of shape (n_samples, n_components)).
    """
    log_prob_norm = logsumexp_rows(weighted_log_prob_)
    with np.errstate(invalid="ignore"):
        log_resp = weighted_log_prob_ - log_prob_norm[:, np.newaxis]
    return log_prob_norm, log_resp


# ------------------------------------------------------------ sufficient statistics
def sufficient_statistics(X, resp, covariance_type):
    """Expected sufficient statistics of one batch (sums, not averages).

    Returns (s0, s1, s2): s0 (K,), s1 (K, D); s2 is (K, D, D) for full, (D, D) for tied
    (sum of x x^T over all points) and (K, D) for diag and spherical.
    """
    s0 = resp.sum(axis=0)
    s1 = resp.T @ X
    if covariance_type == "full":
        n_components, n_features = resp.shape[1], X.shape[1]
        s2 = np.empty((n_components, n_features, n_features))
        # Contiguous transposes: each product then streams rows, ~25% faster than strided.
        X_T, resp_T = np.ascontiguousarray(X.T), np.ascontiguousarray(resp.T)
        for k in range(n_components):
            s2[k] = (X_T * resp_T[k]) @ X
    elif covariance_type == "tied":
        s2 = (X.T * resp.sum(axis=1)) @ X
    else:
        s2 = resp.T @ (X * X)
    return s0, s1, s2


def parameters_from_statistics(s0, s1, s2, covariance_type, reg_covar):
    """Weights, means and covariances from (averaged) expected sufficient statistics."""
    nk = s0 + MASS_EPS
    weights = nk / nk.sum()
    means = s1 / nk[:, np.newaxis]
    if covariance_type == "full":
        covariances = s2 / nk[:, np.newaxis, np.newaxis] - means[:, :, np.newaxis] * means[:, np.newaxis, :]
        n_features = means.shape[1]
        covariances = 0.5 * (covariances + covariances.transpose(0, 2, 1))
        covariances.reshape(len(nk), -1)[:, :: n_features + 1] += reg_covar
    elif covariance_type == "tied":
        covariances = (s2 - (means.T * nk) @ means) / nk.sum()
        covariances = 0.5 * (covariances + covariances.T)
        covariances.flat[:: len(covariances) + 1] += reg_covar
    else:
        variances = s2 / nk[:, np.newaxis] - means**2 + reg_covar
        covariances = variances if covariance_type == "diag" else variances.mean(axis=1)
    return weights, means, covariances


def statistics_from_parameters(mass, means, covariances, covariance_type, reg_covar):
    """Inverse of ``parameters_from_statistics`` for masses ``mass`` (K,)."""
    s0 = np.asarray(mass, dtype=float).copy()
    s1 = means * s0[:, np.newaxis]
    if covariance_type == "full":
        n_features = means.shape[1]
        centred = covariances - reg_covar * np.eye(n_features)
        s2 = s0[:, np.newaxis, np.newaxis] * (centred + means[:, :, np.newaxis] * means[:, np.newaxis, :])
    elif covariance_type == "tied":
        centred = covariances - reg_covar * np.eye(len(covariances))
        s2 = centred * s0.sum() + (means.T * s0) @ means
    else:
        variances = covariances if covariance_type == "diag" else np.repeat(
            covariances[:, np.newaxis], means.shape[1], axis=1
        )
        s2 = s0[:, np.newaxis] * (variances - reg_covar + means**2)
    return s0, s1, s2


def n_parameters(n_components, n_features, covariance_type):
    """Number of free parameters (for BIC / AIC)."""
    cov_params = {
        "full": n_components * n_features * (n_features + 1) / 2.0,
        "tied": n_features * (n_features + 1) / 2.0,
        "diag": n_components * n_features,
        "spherical": n_components,
    }[covariance_type]
    return int(cov_params + n_components * n_features + n_components - 1)


def sample_from_parameters(rng, n_samples, weights, means, covariances, covariance_type):
    """Draw (X, labels) from the mixture."""
    X, labels, _ = sample_with_own_log_prob(rng, n_samples, weights, means, covariances, covariance_type)
    return X, labels


def sample_with_own_log_prob(rng, n_samples, weights, means, covariances, covariance_type):
    """Draw (X, labels, own) from the mixture.

    ``own[i]`` is log(pi_k) + log N(x_i | k) for the component k that drew x_i.  Each draw is
    mu_k + A_k z with A_k A_k^T = Sigma_k and z standard normal (for full and tied exactly
    what ``Generator.multivariate_normal(method="cholesky")`` draws), so its own
    Mahalanobis distance is |z|^2 and ``own`` costs no matrix product.
    """
    n_features = means.shape[1]
    counts = rng.multinomial(n_samples, weights / weights.sum())
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)
    blocks, own = [], []
    for k, (mean, count) in enumerate(zip(means, counts)):
        z = rng.standard_normal((count, n_features))
        if covariance_type in ("full", "tied"):
            factor = np.linalg.cholesky(covariances[k] if covariance_type == "full" else covariances)
            blocks.append(mean + z @ factor.T)
            log_det = -np.sum(np.log(np.diag(factor)))
        else:
            scale = np.sqrt(covariances[k])  # (n_features,) for diag, a scalar for spherical
            blocks.append(mean + z * scale)
            log_det = -np.sum(np.log(scale) * np.ones(n_features))
        own.append(log_weights[k] + log_det - 0.5 * (n_features * LOG_2PI + np.einsum("nd,nd->n", z, z)))
    X = np.vstack(blocks) if blocks else np.empty((0, n_features))
    labels = np.repeat(np.arange(len(weights)), counts)
    return X, labels, np.concatenate(own) if own else np.empty(0)
