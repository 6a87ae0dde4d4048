"""Batch EM for Gaussian mixtures, with sample weights."""

from __future__ import annotations

import warnings

import numpy as np

from . import _gaussian as g
from ._base import (
    STATE_FORMAT_VERSION,
    ConvergenceWarning,
    MixtureBase,
    check_state_header,
    covariance_shape,
    require_array,
)
from ._kmeans import kmeans, kmeans_plusplus, squared_distances
from ._validation import (
    check_array,
    check_positive_float,
    check_positive_int,
    check_random_state,
    check_sample_weight,
)

INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")


def initial_responsibilities(X, n_components, init_params, rng, sample_weight):
    """Responsibilities (n_samples, n_components) to start EM from.

    ``kmeans`` runs Lloyd's algorithm; ``k-means++`` and ``random_from_data`` pick centres
    (by k-means++ or uniformly) and assign every point to its nearest one; ``random`` draws
    uniform responsibilities.
    """
    n_samples = X.shape[0]
    resp = np.zeros((n_samples, n_components))
    if init_params == "kmeans":
        _, labels = kmeans(X, n_components, rng, sample_weight)
    elif init_params in ("k-means++", "random_from_data"):
        if init_params == "k-means++":
            indices = kmeans_plusplus(X, n_components, rng, sample_weight)
        else:
            indices = rng.choice(n_samples, size=n_components, replace=False)
        labels = np.argmin(squared_distances(X, X[indices]), axis=1)
        # The chosen points keep their own component even if they tie with another centre.
        labels[indices] = np.arange(n_components)
    else:
        resp = rng.uniform(size=(n_samples, n_components))
        return resp / resp.sum(axis=1)[:, np.newaxis]
    resp[np.arange(n_samples), labels] = 1.0
    return resp


class GaussianMixture(MixtureBase):
    """Gaussian mixture fitted by expectation-maximisation, optionally with sample weights.

    Parameters follow scikit-learn's ``GaussianMixture``; with the same initial parameters it
    takes the same EM steps.  ``fit`` also accepts ``sample_weight`` (integer weights are
    equivalent to repeating rows).

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
    tol : float, default=1e-3
        EM stops when the mean log-likelihood gains less than this.
    reg_covar : float, default=1e-6
        Added to the covariance diagonals to keep them positive definite.
    max_iter : int, default=100
    n_init : int, default=1
        Number of initialisations; the one with the best lower bound is kept.
    init_params : {"kmeans", "k-means++", "random", "random_from_data"}, default="kmeans"
    weights_init, means_init, precisions_init : array-like, optional
    warm_start : bool, default=False
        Continue from the previous fit's parameters on the next ``fit``.
    random_state : int, numpy Generator or None

    Attributes
    ----------
    weights_, means_, covariances_, precisions_cholesky_, converged_, n_iter_,
    lower_bound_ (mean log-likelihood at the last E-step), lower_bounds_ (one per iteration).

    Examples
    --------
    >>> import numpy as np
    >>> from streamgmm import GaussianMixture
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(-5, 1, (200, 2)), rng.normal(5, 1, (200, 2))])
    >>> gm = GaussianMixture(n_components=2, random_state=0).fit(X)
    >>> np.sort(gm.means_[:, 0]).round(0)
    array([-5.,  5.])
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        warm_start: bool = False,
        random_state=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.warm_start = warm_start
        self.random_state = random_state

    # ------------------------------------------------------------------ checks
    def _check_parameters(self, n_features: int) -> None:
        check_positive_int(self.n_components, "n_components")
        g.check_covariance_type(self.covariance_type)
        check_positive_float(self.tol, "tol", allow_zero=True)
        check_positive_float(self.reg_covar, "reg_covar", allow_zero=True)
        check_positive_int(self.max_iter, "max_iter", minimum=0)
        check_positive_int(self.n_init, "n_init")
        if self.init_params not in INIT_PARAMS:
            raise ValueError(f"init_params must be one of {', '.join(INIT_PARAMS)}; got {self.init_params!r}")
        K = self.n_components
        if self.weights_init is not None:
            weights = np.asarray(self.weights_init, dtype=float)
            if weights.shape != (K,) or np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
                raise ValueError(f"weights_init must be {K} non-negative numbers summing to 1; got {weights!r}")
        if self.means_init is not None and np.shape(self.means_init) != (K, n_features):
            raise ValueError(f"means_init must have shape ({K}, {n_features}); got {np.shape(self.means_init)}")
        if self.precisions_init is not None:
            expected = covariance_shape(self.covariance_type, K, n_features)
            if np.shape(self.precisions_init) != expected:
                raise ValueError(
                    f"precisions_init must have shape {expected} for covariance_type="
                    f"{self.covariance_type!r}; got {np.shape(self.precisions_init)}"
                )

    # -------------------------------------------------------------------- fitting
    def fit(self, X, y=None, sample_weight=None):
        """Estimate the parameters with EM; returns self."""
        X = check_array(X, min_samples=max(2, self.n_components if isinstance(self.n_components, int) else 2))
        self._check_parameters(X.shape[1])
        weight = check_sample_weight(sample_weight, X.shape[0])
        if weight.sum() <= 0:
            raise ValueError("sample_weight sums to zero: there is nothing to fit")
        self.n_features_in_ = X.shape[1]
        do_init = not (self.warm_start and hasattr(self, "converged_"))
        n_init = self.n_init if do_init else 1
        rng = check_random_state(self.random_state)

        best = None
        for _ in range(n_init):
            if do_init:
                self._initialize(X, weight, rng)
            lower_bound = -np.inf if do_init else self.lower_bound_
            lower_bounds = []
            converged = False
            n_iter = 0
            for n_iter in range(1, self.max_iter + 1):
                previous = lower_bound
                log_prob_norm, log_resp = g.e_step(self._estimate_weighted_log_prob(X))
                lower_bound = float(np.average(log_prob_norm, weights=weight))
                self._m_step(X, log_resp, weight)
                lower_bounds.append(lower_bound)
                if abs(lower_bound - previous) < self.tol:
                    converged = True
                    break
            if best is None or lower_bound > best[0]:
                best = (lower_bound, self._get_parameters(), n_iter, converged, lower_bounds)

        lower_bound, parameters, n_iter, converged, lower_bounds = best
        self._set_parameters(parameters)
        self.lower_bound_ = lower_bound
        self.lower_bounds_ = lower_bounds
        self.n_iter_ = n_iter
        self.converged_ = converged
        if not converged and self.max_iter > 0:
            warnings.warn(
                f"EM did not converge in {self.max_iter} iterations (tol={self.tol}); raise max_iter "
                "or tol, or check the data's scale",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def fit_predict(self, X, y=None, sample_weight=None):
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def _initialize(self, X, weight, rng) -> None:
        have_all = self.weights_init is not None and self.means_init is not None and self.precisions_init is not None
        if have_all:
            resp = np.full((X.shape[0], self.n_components), 1.0 / self.n_components)
        else:
            resp = initial_responsibilities(X, self.n_components, self.init_params, rng, weight)
        nk, means, covariances = g.estimate_gaussian_parameters(
            X, resp * weight[:, np.newaxis], self.reg_covar, self.covariance_type
        )
        self.weights_ = nk / weight.sum() if self.weights_init is None else np.asarray(self.weights_init, float)
        self.means_ = means if self.means_init is None else np.asarray(self.means_init, float).copy()
        if self.precisions_init is None:
            self.covariances_ = covariances
            self.precisions_cholesky_ = g.compute_precision_cholesky(covariances, self.covariance_type)
        else:
            precisions = np.asarray(self.precisions_init, dtype=float)
            self.precisions_cholesky_ = g.precision_cholesky_from_precisions(precisions, self.covariance_type)
            self.covariances_ = g.covariances_from_precision_cholesky(self.precisions_cholesky_, self.covariance_type)

    def _m_step(self, X, log_resp, weight) -> None:
        nk, self.means_, self.covariances_ = g.estimate_gaussian_parameters(
            X, np.exp(log_resp) * weight[:, np.newaxis], self.reg_covar, self.covariance_type
        )
        self.weights_ = nk / nk.sum()
        self.precisions_cholesky_ = g.compute_precision_cholesky(self.covariances_, self.covariance_type)

    def _get_parameters(self):
        return (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_)

    def _set_parameters(self, parameters) -> None:
        self.weights_, self.means_, self.covariances_, self.precisions_cholesky_ = parameters

    @property
    def precisions_(self):
        if self.covariance_type == "full":
            return np.einsum("kij,klj->kil", self.precisions_cholesky_, self.precisions_cholesky_)
        if self.covariance_type == "tied":
            return self.precisions_cholesky_ @ self.precisions_cholesky_.T
        return self.precisions_cholesky_**2

    # ---------------------------------------------------------------------- state
    def to_dict(self) -> dict:
        """The fitted state as plain numbers and numpy arrays (see ``from_dict``)."""
        self._check_fitted()
        return {
            "kind": "GaussianMixture",
            "format_version": STATE_FORMAT_VERSION,
            "n_components": int(self.n_components),
            "n_features": int(self.n_features_in_),
            "covariance_type": self.covariance_type,
            "reg_covar": float(self.reg_covar),
            "converged": bool(getattr(self, "converged_", False)),
            "n_iter": int(getattr(self, "n_iter_", 0)),
            "lower_bound": float(getattr(self, "lower_bound_", -np.inf)),
            "weights": self.weights_.copy(),
            "means": self.means_.copy(),
            "covariances": np.asarray(self.covariances_).copy(),
            "precisions_cholesky": np.asarray(self.precisions_cholesky_).copy(),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "GaussianMixture":
        check_state_header(state, "GaussianMixture")
        K, D, cov_type = int(state["n_components"]), int(state["n_features"]), state["covariance_type"]
        g.check_covariance_type(cov_type)
        model = cls(n_components=K, covariance_type=cov_type, reg_covar=float(state["reg_covar"]))
        model.n_features_in_ = D
        model.weights_ = require_array(state, "weights", (K,))
        model.means_ = require_array(state, "means", (K, D))
        model.covariances_ = require_array(state, "covariances", covariance_shape(cov_type, K, D))
        model.precisions_cholesky_ = require_array(state, "precisions_cholesky", covariance_shape(cov_type, K, D))
        model.converged_ = bool(state["converged"])
        model.n_iter_ = int(state["n_iter"])
        model.lower_bound_ = float(state["lower_bound"])
        return model
