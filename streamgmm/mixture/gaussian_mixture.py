"""Batch EM for Gaussian mixtures, with sample weights."""

from __future__ import annotations

import time
import warnings

import numpy as np

from . import _gaussian as g
from ._base import (
    STATE_FORMAT_VERSION,
    ConvergenceWarning,
    MixtureBase,
    check_state_header,
    covariance_shape,
    plain_value,
    require_array,
    state_errors_said,
)
from ._kmeans import kmeans, kmeans_plusplus, squared_distances
from ._validation import (
    check_array,
    check_feature_names,
    check_means,
    check_positive_float,
    check_positive_int,
    check_precisions,
    check_random_state,
    check_sample_weight,
    check_weights,
)

INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")


def initial_responsibilities(X, n_components, init_params, rng, sample_weight):
    """Responsibilities (n_samples, n_components) to start EM from.

    ``kmeans`` runs Lloyd's algorithm; ``k-means++`` and ``random_from_data`` pick centres
    (by k-means++, or at random in proportion to the sample weights) and assign every point to
    its nearest one; ``random`` draws uniform responsibilities.
    """
    n_samples = X.shape[0]
    resp = np.zeros((n_samples, n_components))
    # Distances as |x|^2 - 2 x.c + |c|^2 lose every digit to a common offset (two clusters
    # 6 apart at 1e9 came out as one, the second component empty): centred first, as
    # scikit-learn's KMeans does.  Only labels leave this function.
    X = X - X.mean(axis=0)
    if init_params == "kmeans":
        _, labels = kmeans(X, n_components, rng, sample_weight)
    elif init_params in ("k-means++", "random_from_data"):
        if init_params == "k-means++":
            indices = kmeans_plusplus(X, n_components, rng, sample_weight)
        else:
            # Among the rows with weight, as often as their weight: a row of weight 0 is not data.
            uniform = sample_weight is None or np.all(sample_weight == sample_weight[0])
            p = None if uniform else sample_weight / sample_weight.sum()  # (None: the draws scikit-learn makes)
            # Fewer weighted rows than components (an online warm-up asked for more): some repeat.
            repeat = p is not None and np.count_nonzero(p) < n_components
            indices = rng.choice(n_samples, size=n_components, replace=repeat, p=p)
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

    A drop-in for scikit-learn's ``GaussianMixture`` (same parameters, attributes, methods,
    error messages; with the same initial parameters it takes the same EM steps), without
    scikit-learn at run time.  ``fit`` also accepts ``sample_weight`` (integer weights are
    equivalent to repeating rows).  The constructor only stores the parameters; ``fit``
    checks them.

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
    weights_init : array-like of shape (n_components,), optional
    means_init : array-like of shape (n_components, n_features), optional
    precisions_init : array-like, optional
        Inverse covariances, shaped as ``covariances_``: symmetric positive-definite
        matrices for ``full`` and ``tied``, positive numbers for ``diag`` and ``spherical``.
    warm_start : bool, default=False
        Continue from the previous fit's parameters on the next ``fit``.
    random_state : None, int, numpy Generator or numpy RandomState
        An int (or None) seeds a new ``np.random.Generator`` at every ``fit``; a Generator or
        RandomState instance is drawn from as it stands.
    verbose : int, default=0
        1 prints each initialisation and every ``verbose_interval``-th iteration; 2 also
        prints times and the change of the lower bound (scikit-learn's format).
    verbose_interval : int, default=10

    Attributes
    ----------
    weights_, means_, covariances_, precisions_, precisions_cholesky_, converged_, n_iter_,
    lower_bound_ (mean log-likelihood at the last E-step), lower_bounds_ (one per iteration),
    n_features_in_.

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
        verbose: int = 0,
        verbose_interval: int = 10,
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
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    # ------------------------------------------------------------------ checks
    def _check_scalar_parameters(self) -> None:
        check_positive_int(self.n_components, "n_components")
        g.check_covariance_type(self.covariance_type)
        check_positive_float(self.tol, "tol", allow_zero=True)
        check_positive_float(self.reg_covar, "reg_covar", allow_zero=True)
        check_positive_int(self.max_iter, "max_iter", minimum=0)
        check_positive_int(self.n_init, "n_init")
        if self.init_params not in INIT_PARAMS:
            raise ValueError(f"init_params must be one of {', '.join(INIT_PARAMS)}; got {self.init_params!r}")
        if not isinstance(self.verbose, bool):
            check_positive_int(self.verbose, "verbose", minimum=0)
        check_positive_int(self.verbose_interval, "verbose_interval")
        check_random_state(self.random_state)

    def _check_parameters(self, X) -> None:
        """Check every parameter against the data X (n_samples, n_features); ``fit`` calls it."""
        self._check_scalar_parameters()
        n_samples, n_features = X.shape
        if n_samples < self.n_components:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = {self.n_components}, "
                f"n_samples = {n_samples}"
            )
        if self.weights_init is not None:
            check_weights(self.weights_init, self.n_components)
        if self.means_init is not None:
            check_means(self.means_init, self.n_components, n_features)
        if self.precisions_init is not None:
            check_precisions(self.precisions_init, self.covariance_type, self.n_components, n_features)

    # -------------------------------------------------------------------- fitting
    def fit(self, X, y=None, sample_weight=None):
        """Estimate the parameters with EM; returns self."""
        frame = X
        X = check_array(X, min_samples=2)
        self._check_parameters(X)
        weight = check_sample_weight(sample_weight, X.shape[0])
        if weight.sum() <= 0:
            raise ValueError("sample_weight sums to zero: there is nothing to fit")
        # Only the weights' ratios matter; scaled to a mean of 1 they keep the masses at the rows'
        # scale, where MASS_EPS and the weights of the rows are not of one size: weights of 1e-300
        # gave a model scoring -8.2e7 nats per point without a word (helper-64).
        weight = weight / weight.max()  # (first: finite weights of 1e306 have no finite mean)
        weight = weight / weight.mean()
        if sample_weight is not None and np.count_nonzero(weight) < self.n_components:
            raise ValueError(f"Expected at least n_components rows of positive sample_weight but got "
                             f"n_components = {self.n_components}, rows weighted = {np.count_nonzero(weight)}")
        do_init = not (self.warm_start and hasattr(self, "converged_"))
        if not do_init:
            self._check_warm_start(X.shape[1])
            check_feature_names(self, frame)  # the parameters are in the fitted columns' order
        self._remember_feature_names(frame)
        self.n_features_in_ = X.shape[1]
        n_init = self.n_init if do_init else 1
        rng = check_random_state(self.random_state)

        best = None
        for init in range(n_init):
            self._print_verbose_msg_init_beg(init)
            if do_init:
                self._initialize_parameters(X, rng, weight)
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
                self._print_verbose_msg_iter_end(n_iter, lower_bound - previous)
                if abs(lower_bound - previous) < self.tol:
                    converged = True
                    break
            if self.max_iter > 0:
                self._print_verbose_msg_init_end(lower_bound, converged)
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
                "Best performing initialization did not converge. Try different init parameters, "
                "or increase max_iter, tol, or check for degenerate data. "
                f"(EM stopped after max_iter={self.max_iter} iterations with tol={self.tol}.)",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _initialize_parameters(self, X, rng, sample_weight) -> None:
        """Starting parameters: responsibilities from ``init_params`` unless the user gave all three."""
        if self.weights_init is not None and self.means_init is not None and self.precisions_init is not None:
            self._initialize(X, None, sample_weight)
        else:
            resp = initial_responsibilities(X, self.n_components, self.init_params, rng, sample_weight)
            if self.init_params == "kmeans" and (found := int(np.count_nonzero(resp.any(axis=0)))) < self.n_components:
                # scikit-learn's KMeans says so too; silently, the fit had components of weight 0.
                warnings.warn(f"Number of distinct clusters ({found}) found smaller than n_clusters "
                              f"({self.n_components}). Possibly due to duplicate points in X.",
                              ConvergenceWarning, stacklevel=3)
            self._initialize(X, resp, sample_weight)

    def _initialize(self, X, resp, sample_weight=None) -> None:
        """Parameters from responsibilities ``resp`` (n_samples, n_components) or None, with
        the user's ``weights_init``/``means_init``/``precisions_init`` taking precedence.
        (scikit-learn's ``_initialize(X, resp)``, plus sample weights.)"""
        weight = np.ones(X.shape[0]) if sample_weight is None else sample_weight
        covariances = None
        if resp is not None:
            nk, means, covariances = g.estimate_gaussian_parameters(
                X, resp * weight[:, np.newaxis], self.reg_covar, self.covariance_type
            )
        self.weights_ = nk / weight.sum() if self.weights_init is None else np.array(self.weights_init, dtype=float)
        self.means_ = means if self.means_init is None else np.array(self.means_init, dtype=float)
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

    # -------------------------------------------------------------- verbose output
    # scikit-learn's format, so logs and tests that read it see the same lines.
    def _print_verbose_msg_init_beg(self, n_init) -> None:
        if self.verbose >= 1:
            print(f"Initialization {n_init}")
        if self.verbose >= 2:
            self._init_prev_time = self._iter_prev_time = time.time()

    def _print_verbose_msg_iter_end(self, n_iter, diff_ll) -> None:
        if self.verbose == 0 or n_iter % self.verbose_interval != 0:
            return
        if self.verbose == 1:
            print(f"  Iteration {n_iter}")
        else:
            now = time.time()
            print(f"  Iteration {n_iter}\t time lapse {now - self._iter_prev_time:.5f}s\t ll change {diff_ll:.5f}")
            self._iter_prev_time = now

    def _check_warm_start(self, n_features: int) -> None:
        """warm_start continues the last fit: its shapes must still fit the settings and data."""
        fitted = (self.means_.shape[0], self.means_.shape[1], np.shape(self.covariances_))
        wanted = (self.n_components, n_features, covariance_shape(self.covariance_type, self.n_components, n_features))
        if fitted != wanted:
            raise ValueError(
                f"warm_start=True continues the last fit ({fitted[0]} components, {fitted[1]} features, covariances "
                f"of shape {fitted[2]}), which does not fit n_components={self.n_components}, "
                f"covariance_type={self.covariance_type!r} and {n_features} features; set warm_start=False to start over"
            )

    def _print_verbose_msg_init_end(self, lower_bound, converged) -> None:
        status = "converged" if converged else "did not converge"
        if self.verbose == 1:
            print(f"Initialization {status}.")
        elif self.verbose >= 2:
            lapse = time.time() - self._init_prev_time
            print(f"Initialization {status}. time lapse {lapse:.5f}s\t lower bound {lower_bound:.5f}.")

    @property
    def precisions_(self):
        return g.precisions_from_cholesky(self.precisions_cholesky_, self.covariance_type)

    # ---------------------------------------------------------------------- state
    def to_dict(self) -> dict:
        """The fitted state as plain numbers and numpy arrays (see ``from_dict``)."""
        self._check_fitted()
        return {
            "kind": "GaussianMixture",
            "format_version": STATE_FORMAT_VERSION,
            # The settings a refit or clone of the loaded model uses (arrays given as init are
            # not kept; a random generator is kept as None).
            "params": {name: plain_value(value) for name, value in self.get_params(deep=False).items()
                       if value is None or isinstance(plain_value(value), (bool, int, float, str))},
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
            **({"lower_bounds": np.asarray(self.lower_bounds_, dtype=float)} if hasattr(self, "lower_bounds_") else {}),
            **self._feature_names_state(),
        }

    @classmethod
    @state_errors_said
    def from_dict(cls, state: dict) -> "GaussianMixture":
        check_state_header(state, "GaussianMixture")
        K, D, cov_type = int(state["n_components"]), int(state["n_features"]), state["covariance_type"]
        g.check_covariance_type(cov_type)
        known = cls().get_params(deep=False)
        params = {name: value for name, value in state.get("params", {}).items() if name in known}
        model = cls(**{**params, "n_components": K, "covariance_type": cov_type, "reg_covar": float(state["reg_covar"])})
        model.n_features_in_ = D
        model._restore_feature_names(state)
        if "lower_bounds" in state:
            model.lower_bounds_ = [float(v) for v in np.asarray(state["lower_bounds"], dtype=float).ravel()]
        model.weights_ = require_array(state, "weights", (K,))
        model.means_ = require_array(state, "means", (K, D))
        model.covariances_ = require_array(state, "covariances", covariance_shape(cov_type, K, D))
        model.precisions_cholesky_ = require_array(state, "precisions_cholesky", covariance_shape(cov_type, K, D))
        model.converged_ = bool(state["converged"])
        model.n_iter_ = int(state["n_iter"])
        model.lower_bound_ = float(state["lower_bound"])
        return model
