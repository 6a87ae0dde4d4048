"""Log-densities against a naive scipy reference, for every covariance type."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from streamgmm import GaussianMixture, OnlineGaussianMixture
from streamgmm.mixture import _gaussian as g
from streamgmm.mixture._gaussian import COVARIANCE_TYPES


def _random_parameters(rng, covariance_type, K=3, D=4):
    weights = rng.dirichlet(np.ones(K))
    means = rng.normal(0, 3, (K, D))
    full = []
    for _ in range(K):
        A = rng.normal(size=(D, D))
        full.append(A @ A.T + 0.5 * np.eye(D))
    full = np.array(full)
    if covariance_type == "full":
        cov = full
    elif covariance_type == "tied":
        cov = full[0]
    elif covariance_type == "diag":
        cov = np.array([np.diag(c) for c in full])
    else:
        cov = np.array([np.diag(c).mean() for c in full])
    return weights, means, cov


def _as_full(cov, covariance_type, K, D):
    return {
        "full": lambda: cov,
        "tied": lambda: np.repeat(cov[None], K, 0),
        "diag": lambda: np.array([np.diag(c) for c in cov]),
        "spherical": lambda: np.array([np.eye(D) * c for c in cov]),
    }[covariance_type]()


def _scipy_mixture_logpdf(X, weights, means, full_covs):
    per_component = np.column_stack(
        [np.log(w) + multivariate_normal(m, c).logpdf(X) for w, m, c in zip(weights, means, full_covs)]
    )
    top = per_component.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(per_component - top).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_density_matches_scipy(covariance_type):
    rng = np.random.default_rng(0)
    K, D = 3, 4
    weights, means, cov = _random_parameters(rng, covariance_type, K, D)
    model = GaussianMixture(K, covariance_type=covariance_type)
    model.n_features_in_ = D
    model.weights_, model.means_, model.covariances_ = weights, means, cov
    model.precisions_cholesky_ = g.compute_precision_cholesky(cov, covariance_type)
    X = rng.normal(0, 4, (500, D))
    expected = _scipy_mixture_logpdf(X, weights, means, _as_full(cov, covariance_type, K, D))
    np.testing.assert_allclose(model.score_samples(X), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_online_log_density_matches_scipy_in_original_units(covariance_type):
    """The online model works in standardised space; its densities are still of the raw data."""
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(100, 5, 3000), rng.normal(-2, 0.01, 3000), rng.normal(0, 1, 3000)])
    model = OnlineGaussianMixture(2, covariance_type=covariance_type, warmup=3000, random_state=0).partial_fit(X)
    covs = model.covariances_
    full = {
        "full": lambda: covs,
        "tied": lambda: np.repeat(covs[None], 2, 0),
        "diag": lambda: np.array([np.diag(c) for c in covs]),
        "spherical": lambda: np.array([np.diag(c) for c in covs]),  # (K, D) per-feature variances
    }[covariance_type]()
    expected = _scipy_mixture_logpdf(X[:200], model.weights_, model.means_, full)
    np.testing.assert_allclose(model.score_samples(X[:200]), expected, rtol=0, atol=1e-9)


def test_logsumexp_rows_handles_all_minus_inf():
    out = g.logsumexp_rows(np.array([[-np.inf, -np.inf], [0.0, 0.0], [np.nan, 1.0]]))
    assert out[0] == -np.inf
    assert out[1] == pytest.approx(np.log(2.0))
    assert out[2] == -np.inf


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_statistics_round_trip_parameters(covariance_type):
    rng = np.random.default_rng(2)
    weights, means, cov = _random_parameters(rng, covariance_type)
    s0, s1, s2 = g.statistics_from_parameters(weights, means, cov, covariance_type, 1e-6)
    w2, m2, c2 = g.parameters_from_statistics(s0, s1, s2, covariance_type, 1e-6)
    np.testing.assert_allclose(w2, weights / weights.sum(), rtol=1e-12)
    np.testing.assert_allclose(m2, means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c2, cov, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_covariances_from_precision_cholesky_inverts_compute_precision_cholesky(covariance_type):
    rng = np.random.default_rng(5)
    _, _, cov = _random_parameters(rng, covariance_type)
    factor = g.compute_precision_cholesky(cov, covariance_type)
    np.testing.assert_allclose(g.covariances_from_precision_cholesky(factor, covariance_type), cov, rtol=1e-10)
    if covariance_type in ("full", "tied"):
        precisions = np.linalg.inv(cov)
        np.testing.assert_allclose(g.precision_cholesky_from_precisions(precisions, covariance_type), factor, rtol=1e-9)
