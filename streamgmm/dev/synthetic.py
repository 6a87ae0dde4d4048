"""Synthetic streams with known answers: mixtures, drift and injected anomalies.

Used by the tests, the benchmarks and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrueMixture:
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray  # (K, D, D)

    def sample(self, n: int, rng: np.random.Generator):
        counts = rng.multinomial(n, self.weights)
        labels = rng.permutation(np.repeat(np.arange(len(self.weights)), counts))
        chol = np.linalg.cholesky(self.covariances)
        z = rng.standard_normal((n, self.means.shape[1]))
        X = self.means[labels] + np.einsum("nij,nj->ni", chol[labels], z)
        return X, labels

    def log_density(self, X) -> np.ndarray:
        from scipy.stats import multivariate_normal

        dens = np.column_stack(
            [np.log(w) + multivariate_normal(m, c).logpdf(X) for w, m, c in zip(self.weights, self.means, self.covariances)]
        )
        top = dens.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(dens - top).sum(axis=1, keepdims=True)))[:, 0]


def random_mixture(n_components: int, n_features: int, rng: np.random.Generator, separation: float = 6.0) -> TrueMixture:
    """A mixture with random correlated covariances and means ``separation`` apart on average."""
    weights = rng.dirichlet(np.full(n_components, 5.0))
    means = rng.normal(0.0, separation / np.sqrt(2.0), size=(n_components, n_features))
    covariances = np.empty((n_components, n_features, n_features))
    for k in range(n_components):
        A = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
        covariances[k] = A @ A.T + 0.3 * np.eye(n_features)
    return TrueMixture(weights, means, covariances)


def inject_point_anomalies(X, fraction: float, rng: np.random.Generator, distance: float = 8.0):
    """Replace a ``fraction`` of rows by points far outside the data; returns (X, is_anomaly)."""
    X = X.copy()
    n = len(X)
    is_anomaly = rng.random(n) < fraction
    spread = X.std(axis=0)
    center = X.mean(axis=0)
    direction = rng.normal(size=(int(is_anomaly.sum()), X.shape[1]))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = distance * (1.0 + rng.random((len(direction), 1)))
    X[is_anomaly] = center + direction * radius * spread
    return X, is_anomaly


def shell(rng, n, d, radius=2.0, noise=0.1):
    """Points on a sphere of this radius in d dimensions, with Gaussian noise of this size."""
    v = rng.normal(size=(n, d))
    return radius * v / np.linalg.norm(v, axis=1, keepdims=True) + noise * rng.normal(size=(n, d))


def skewed_clusters(n, rng, d=6):
    """Four clusters, none Gaussian: log-normal, uniform, Student t (df 4), a spherical shell."""
    labels = rng.choice(4, n, p=[0.4, 0.3, 0.2, 0.1])
    centers = rng.normal(size=(4, d)) * 10.0
    X = np.empty((n, d))
    for k, make in enumerate((
        lambda m: np.exp(0.7 * rng.normal(size=(m, d))),
        lambda m: rng.uniform(-2.0, 2.0, (m, d)),
        lambda m: rng.normal(size=(m, d)) / np.sqrt(rng.chisquare(4, (m, 1)) / 4),
        lambda m: shell(rng, m, d),
    )):
        rows = labels == k
        X[rows] = centers[k] + make(int(rows.sum()))
    return X


def daily_load(n: int, rng: np.random.Generator, days: float = 4.0) -> np.ndarray:
    """Requests over ``days`` days in time order, their rate peaking in the afternoon (helper-59):
    the hour (as sine and cosine), requests per second and a latency that grows with the load."""
    grid = rng.uniform(0.0, 24.0 * days, int(1.9 * n))
    keep = rng.random(len(grid)) < (1.0 + 0.8 * np.sin(2.0 * np.pi * (grid - 9.0) / 24.0)) / 1.8
    hours = np.sort(grid[keep])[:n] % 24.0
    rps = 1000.0 * (1.0 + 0.8 * np.sin(2.0 * np.pi * (hours - 9.0) / 24.0)) * (1.0 + 0.05 * rng.normal(size=n))
    latency = (20.0 + 30.0 * (rps / 1800.0) ** 3) * rng.lognormal(0.0, 0.2, n)
    return np.column_stack([np.sin(2.0 * np.pi * hours / 24.0), np.cos(2.0 * np.pi * hours / 24.0), rps, latency])


# Every this many rows of ``daily_load_with_collections`` is a garbage collection's.
COLLECTION_EVERY = 30


def daily_load_with_collections(n: int, rng: np.random.Generator, days: float = 4.0) -> np.ndarray:
    """``daily_load`` with a pause column, and every COLLECTION_EVERY-th row (i % 30 == 29, 3.3%)
    a garbage collection's: a pause that grows with the square of the load and a latency 2-3.8
    times the usual (helper-65): a normal minority mode that moves with the load, which the
    warm-up (the first hour of the night) sees at its smallest."""
    X = daily_load(n, rng, days)
    load = X[:, 2] / 1000.0
    collection = np.arange(n) % COLLECTION_EVERY == COLLECTION_EVERY - 1
    pause = 0.5 * rng.lognormal(0.0, 0.3, n)
    pause[collection] = 40.0 * load[collection] ** 2 * rng.lognormal(0.0, 0.2, int(collection.sum()))
    X[collection, 3] *= 2.0 + load[collection]
    return np.column_stack([X, pause])
