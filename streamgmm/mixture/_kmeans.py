"""k-means++ seeding and weighted Lloyd iterations in plain numpy (no scikit-learn at run time)."""

from __future__ import annotations

import numpy as np


def squared_distances(X, centers):
    """||x_n - c_k||^2, shape (n_samples, n_centers), clipped at 0 against rounding."""
    d = (
        np.einsum("nd,nd->n", X, X)[:, np.newaxis]
        - 2.0 * X @ centers.T
        + np.einsum("kd,kd->k", centers, centers)[np.newaxis]
    )
    return np.maximum(d, 0.0)


def cluster_sums(X, labels, n_clusters):
    """Sum of the rows of X (n_samples, n_features) per label: one bincount over (label,
    feature) cells, a third of np.add.at's time, with the same additions in the same order."""
    n_features = X.shape[1]
    cells = (labels[:, np.newaxis] * n_features + np.arange(n_features)).ravel()
    return np.bincount(cells, weights=X.ravel(), minlength=n_clusters * n_features).reshape(n_clusters, n_features)


def kmeans_plusplus(X, n_clusters, rng, sample_weight=None):
    """Greedy k-means++ (Arthur & Vassilvitskii; 2 + log k local trials as scikit-learn does).

    Returns the indices of the chosen rows of X.
    """
    n_samples = X.shape[0]
    weight = np.ones(n_samples) if sample_weight is None else sample_weight
    n_local_trials = 2 + int(np.log(n_clusters))
    first = rng.choice(n_samples, p=weight / weight.sum())
    indices = [first]
    closest = squared_distances(X, X[[first]])[:, 0]
    for _ in range(1, n_clusters):
        potential = closest * weight
        total = potential.sum()
        if total <= 0.0:
            # Every point coincides with a chosen centre: any point will do.
            candidates = rng.choice(n_samples, size=n_local_trials)
        else:
            cumulative = np.cumsum(potential)
            candidates = np.searchsorted(cumulative, rng.random(n_local_trials) * total)
            candidates = np.minimum(candidates, n_samples - 1)
        candidate_d = np.minimum(closest[np.newaxis], squared_distances(X, X[candidates]).T)
        best = int(np.argmin((candidate_d * weight).sum(axis=1)))
        indices.append(int(candidates[best]))
        closest = candidate_d[best]
    return np.asarray(indices)


def kmeans(X, n_clusters, rng, sample_weight=None, max_iter=100, tol=1e-4):
    """Weighted Lloyd's algorithm from k-means++ seeds.

    Returns (centers of shape (n_clusters, n_features), labels of shape (n_samples,)).
    Empty clusters are re-seeded at the point farthest from its centre.
    """
    weight = np.ones(X.shape[0]) if sample_weight is None else sample_weight
    centers = X[kmeans_plusplus(X, n_clusters, rng, weight)].copy()
    # Tolerance relative to the data's spread, as scikit-learn defines it.
    scaled_tol = tol * float(np.mean(np.average((X - np.average(X, axis=0, weights=weight)) ** 2, axis=0, weights=weight)))
    labels = np.zeros(X.shape[0], dtype=np.intp)
    for _ in range(max_iter):
        distances = squared_distances(X, centers)
        labels = np.argmin(distances, axis=1)
        mass = np.bincount(labels, weights=weight, minlength=n_clusters)
        sums = cluster_sums(X * weight[:, np.newaxis], labels, n_clusters)
        new_centers = centers.copy()
        filled = mass > 0
        new_centers[filled] = sums[filled] / mass[filled, np.newaxis]
        for k in np.flatnonzero(~filled):
            far = int(np.argmax(distances[np.arange(len(X)), labels]))
            new_centers[k] = X[far]
            labels[far] = k
        shift = np.sum((new_centers - centers) ** 2)
        centers = new_centers
        if shift <= scaled_tol:
            break
    labels = np.argmin(squared_distances(X, centers), axis=1)
    return centers, labels
