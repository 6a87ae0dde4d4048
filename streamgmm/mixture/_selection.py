"""Sizing a mixture at warm-up: MAP EM with a covariance prior, chosen by BIC.

The warm-up buffer is small (hundreds to a few thousand points), so a maximum-likelihood
mixture with K full covariances in D dimensions is often degenerate (a component on a few
points, a covariance of rank < D).  Each covariance gets the conjugate prior of Fraley &
Raftery (2007, "Bayesian regularization for normal mixture estimation") with their default
hyperparameters (mclust's ``defaultPrior``; the prior on the means left out): the MAP
covariance is

    Sigma_k = (W_k + Lambda) / (n_k + c),      Lambda = K ** (-2 / D) C

with W_k the component's scatter matrix (n_k times its covariance) and C the covariance of
the data (for diag and spherical its diagonal, resp. the mean of that), so Lambda is the
spread of one of K equal cells of the data cloud; c = 2D + 4 for full and tied (an
inverse-Wishart with D + 2 degrees of freedom), D + 4 for diag and spherical.  C is taken in
the standardised space with a ridge of 1e-3 (its diagonal is about 1), so Lambda is positive
definite even for collinear features, and the prior keeps every covariance positive definite
whatever the data; it fades as n_k grows.  (A scaled identity instead of C inflated a
near-collinear direction of a single Gaussian enough for BIC to prefer two components.)

``select_mixture`` fits every candidate (K, covariance type) with a few restarts and keeps
the lowest BIC (with the log-likelihood at the MAP estimate, as Fraley & Raftery do); the
winner is refitted with more restarts, so the chosen optimum does not hang on one draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _gaussian as g
from .gaussian_mixture import initial_responsibilities

# The order candidates are tried in: with equal BIC the simpler type wins.
SELECTION_COVARIANCE_TYPES = ("spherical", "diag", "tied", "full")


def prior_points(covariance_type: str, n_features: int) -> float:
    """tau (c above): the count the covariance prior adds to each component."""
    return float(2 * n_features + 4) if covariance_type in ("full", "tied") else float(n_features + 4)


# A full or tied candidate needs this many times D degrees of freedom per covariance (see
# select_mixture): from m of them in D dimensions the smallest eigenvalue of a sample
# covariance is about (1 - sqrt(D/m))^2 of the true one (Marchenko-Pastur): 0 at m = D, 0.09
# at 2D.  Ordinary warm-ups are far above it (1,000 points in 16-d: full up to K=30).
DEGREES_OF_FREEDOM_OVER_D = 2

# Added to the data covariance C's diagonal (standardised: about 1) in the prior's scatter.
PRIOR_RIDGE = 1e-3


def prior_scatter(covariance_type: str, n_components: int, data_covariance):
    """Lambda = K^(-2/D) C, shaped as ``covariance_type`` needs it.

    data_covariance : array of shape (n_features, n_features), the data's covariance
    """
    n_features = len(data_covariance)
    scale = float(n_components) ** (-2.0 / n_features)
    C = data_covariance + PRIOR_RIDGE * np.eye(n_features)
    if covariance_type in ("full", "tied"):
        return scale * C
    if covariance_type == "diag":
        return scale * np.diag(C)
    return scale * float(np.mean(np.diag(C)))


def map_covariances(nk, covariances, covariance_type: str, tau: float, scatter):
    """MAP covariances: (nk * ML covariance + scatter) / (nk + tau).

    nk : array of shape (n_components,), the components' masses (in points)
    covariances : as ``_gaussian`` shapes them for ``covariance_type``
    """
    if covariance_type == "full":
        return (covariances * nk[:, np.newaxis, np.newaxis] + scatter) / (nk + tau)[:, np.newaxis, np.newaxis]
    if covariance_type == "tied":
        n = nk.sum()
        return (covariances * n + scatter) / (n + tau)
    if covariance_type == "diag":
        return (covariances * nk[:, np.newaxis] + scatter) / (nk + tau)[:, np.newaxis]
    return (covariances * nk + scatter) / (nk + tau)


@dataclass
class MixtureFit:
    """One MAP EM fit: parameters in the space it was fitted in, and its criterion."""

    covariance_type: str
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    log_likelihood: float  # total (weighted) log-likelihood at the MAP estimate
    bic: float
    n_iter: int

    @property
    def n_components(self) -> int:
        return len(self.weights)


@dataclass
class Selection:
    """What ``select_mixture`` chose, and the BIC of every candidate it tried."""

    best: MixtureFit
    bic: dict = field(default_factory=dict)  # (covariance_type, K) -> BIC


def data_covariance(X, weight) -> np.ndarray:
    """The weighted covariance of X (n_samples, n_features)."""
    centred = X - np.average(X, axis=0, weights=weight)
    return (centred.T * weight) @ centred / weight.sum()


def map_em(X, weight, resp, covariance_type: str, *, reg_covar: float, covariance=None, max_iter: int = 100,
           tol: float = 1e-3) -> MixtureFit:
    """MAP EM from responsibilities ``resp`` (n_samples, n_components).

    X : array of shape (n_samples, n_features), standardised
    weight : array of shape (n_samples,), sample weights
    covariance : the data covariance C of the prior (default: X's own)
    """
    n_samples, n_features = X.shape
    n_components = resp.shape[1]
    covariance = data_covariance(X, weight) if covariance is None else covariance
    tau = prior_points(covariance_type, n_features)
    scatter = prior_scatter(covariance_type, n_components, covariance)
    total = float(weight.sum())
    log_likelihood, n_iter = -np.inf, 0
    for n_iter in range(1, max_iter + 1):
        nk, means, covariances = g.estimate_gaussian_parameters(X, resp * weight[:, np.newaxis], reg_covar,
                                                                covariance_type)
        covariances = map_covariances(nk, covariances, covariance_type, tau, scatter)
        weights = nk / nk.sum()
        precisions_chol, _ = g.precision_cholesky_per_component(covariances, covariance_type)
        log_prob_norm, log_resp = g.e_step(g.weighted_log_prob(X, weights, means, precisions_chol, covariance_type))
        previous, log_likelihood = log_likelihood, float(np.dot(weight, log_prob_norm))
        resp = np.exp(log_resp)
        if abs(log_likelihood - previous) < tol * total:
            break
    bic = -2.0 * log_likelihood + g.n_parameters(n_components, n_features, covariance_type) * np.log(total)
    return MixtureFit(covariance_type, weights, means, covariances, log_likelihood, bic, n_iter)


def _enough_points(covariance_type: str, n_components: int, n_points: int, n_features: int) -> bool:
    """Whether ``n_points`` distinct points give ``n_components`` covariances of this type
    DEGREES_OF_FREEDOM_OVER_D x D degrees of freedom each: a tied scatter has n - K, a full
    one n_k - 1 (at best n/K - 1)."""
    needed = DEGREES_OF_FREEDOM_OVER_D * n_features
    if covariance_type == "tied":
        return n_points - n_components >= needed
    if covariance_type == "full":
        return n_points >= n_components * (needed + 1)
    return True


def responsibilities(fit: MixtureFit, X) -> np.ndarray:
    """Each point's posterior over the components of ``fit``."""
    precisions_chol, _ = g.precision_cholesky_per_component(fit.covariances, fit.covariance_type)
    return np.exp(g.e_step(g.weighted_log_prob(X, fit.weights, fit.means, precisions_chol, fit.covariance_type))[1])


def starting_points(X, weight, n_components, rng, n_init, init_params="kmeans") -> list:
    """``n_init`` responsibilities to start EM from: the first from ``init_params``, the others
    from k-means++ seeds (k-means alone can split a wide direction rather than separate tight
    clusters, and EM does not recover from that: mixing seedings beats repeating one)."""
    return [initial_responsibilities(X, n_components, init_params if attempt == 0 else "k-means++", rng, weight)
            for attempt in range(n_init)]


def _best_of(X, weight, starts, covariance_type, reg_covar, max_iter, covariance) -> MixtureFit | None:
    """The MAP EM fit of highest likelihood from these starting responsibilities."""
    best = None
    for resp in starts:
        with np.errstate(all="ignore"):
            fit = map_em(X, weight, resp, covariance_type, reg_covar=reg_covar, covariance=covariance,
                         max_iter=max_iter)
        if np.isfinite(fit.log_likelihood) and (best is None or fit.log_likelihood > best.log_likelihood):
            best = fit
    return best


def select_mixture(X, weight, *, components, covariance_types, rng, reg_covar, n_init: int = 2,
                   final_n_init: int = 6, max_iter: int = 100, patience: int = 4,
                   init_params: str = "kmeans") -> Selection:
    """The (K, covariance type) with the lowest BIC, refitted with ``final_n_init`` restarts.

    X : array of shape (n_samples, n_features), standardised
    weight : array of shape (n_samples,)
    reg_covar : added to every variance: a number, or one per feature
    components : the candidate Ks, ascending; per covariance type the search stops once
        ``patience`` Ks in a row have not lowered that type's best BIC (EM's local optima make
        the BIC over K ragged: a patience of 2 stopped shuttle's search at K=3 for one seed).
    covariance_types : the candidate types.
    init_params : how the first restart of each candidate starts (``GaussianMixture``'s choices).
    """
    varying = np.ptp(X[weight > 0], axis=0) > 0 if np.any(weight > 0) else np.ones(X.shape[1], dtype=bool)
    if 0 < np.count_nonzero(varying) < X.shape[1]:
        # A feature constant over the warm-up says nothing about K, but its variance comes from
        # the prior alone, which shrinks as K^(-2/D): every component added gained about log(K)/D
        # nats a point there, and BIC took 7 components for one Gaussian.  The search runs on the
        # other features; the winner's responsibilities then give every feature its parameters
        # (diagonal for a spherical winner under auto: one variance cannot serve a constant feature
        # and the others, and diag scores the others as the winner does; asked for by name, spherical).
        found = select_mixture(X[:, varying], weight, components=components, covariance_types=covariance_types,
                               rng=rng, reg_covar=reg_covar[varying] if np.ndim(reg_covar) else reg_covar,
                               n_init=n_init, final_n_init=final_n_init, max_iter=max_iter, patience=patience,
                               init_params=init_params)
        with np.errstate(all="ignore"):
            whole = map_em(X, weight, responsibilities(found.best, X[:, varying]),
                           "diag" if found.best.covariance_type == "spherical" and len(covariance_types) > 1
                           else found.best.covariance_type,
                           reg_covar=reg_covar, max_iter=1)
        return Selection(whole, found.bic)
    bic: dict = {}
    best: MixtureFit | None = None
    n_distinct = len(np.unique(X[weight > 0], axis=0))
    # When the type is auto, a full or tied candidate with too few points for its covariances
    # (see DEGREES_OF_FREEDOM_OVER_D) is not tried: in the directions the points barely span it
    # is the prior's alone, far too tight (the prior's scale is the data's spread over 2D + 4),
    # and every new point scores hundreds of nats low; BIC, which sees only the points fitted,
    # preferred it (BENCHMARKS.md, "Few points in many dimensions").  Asked for by name, a type
    # is fitted.
    rank_limited = len(covariance_types) > 1
    covariance = data_covariance(X, weight)
    components = list(components)
    # Every covariance type of a K starts from the same seedings: the seeding (k-means) cost
    # a third of the search when each type drew its own, and BIC then compares the types from
    # equal starts.
    starts: dict[int, list] = {}
    for covariance_type in covariance_types:
        type_best, since_best = np.inf, 0
        for K in components:
            if K > n_distinct and K != components[0]:
                break  # more components than distinct points: only as many as were asked for
            if rank_limited and not _enough_points(covariance_type, K, n_distinct, X.shape[1]):
                break  # (and no larger K either)
            if K not in starts:
                starts[K] = starting_points(X, weight, K, rng, n_init, init_params)
            fit = _best_of(X, weight, starts[K], covariance_type, reg_covar, max_iter, covariance)
            if fit is None:
                continue
            bic[(covariance_type, K)] = fit.bic
            if best is None or fit.bic < best.bic:
                best = fit
            if fit.bic < type_best:
                type_best, since_best = fit.bic, 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    if best is None:
        raise ValueError("no candidate mixture could be fitted to the warm-up points")
    if final_n_init > n_init and best.n_components > 1:
        more = starting_points(X, weight, best.n_components, rng, final_n_init - n_init)
        refit = _best_of(X, weight, more, best.covariance_type, reg_covar, max_iter, covariance)
        if refit is not None and refit.log_likelihood > best.log_likelihood:
            best = refit
    return Selection(best, bic)
