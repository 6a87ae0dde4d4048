"""Stepwise online EM for Gaussian mixtures (Cappé & Moulines 2009; Liang & Klein 2009).

The model keeps running averages of the expected sufficient statistics of each component
(S0 = mass, S1 = first moment, S2 = second moment).  After each mini-batch it moves them
toward the batch's statistics with step size rho, then re-derives the parameters:

    S <- (1 - rho) S + rho * s(batch),       eta_i = max((i + t0) ** -alpha, floor)

where rho compounds the per-point steps eta_i of the batch's points, so results do not
depend on how the stream is cut into batches.  ``alpha = 1`` is the exact running mean
(best on a stationary stream); a floor (``forgetting``, or ``half_life`` in points) keeps
the model tracking a drifting stream.

The model computes in a standardised space fixed at warm-up (per-feature centre and
scale), so multiplying a feature by a constant does not change the ranking of points and
``reg_covar`` is relative to each feature's spread.

The warm-up also sizes the model: with ``n_components="auto"`` and/or
``covariance_type="auto"`` it fits every candidate by MAP EM (a covariance prior keeps few
points in many dimensions from making a degenerate model) and keeps the lowest BIC
(``_selection``).  The online model keeps that K; a chosen covariance type other than full
turns full later if the stream shows BIC it should (``_review_covariance_type``).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from . import _gaussian as g
from ._base import (
    STATE_FORMAT_VERSION,
    STATE_FORMAT_VERSION_ROUNDING,
    MixtureBase,
    NotFittedError,
    check_state_header,
    covariance_shape,
    plain_value,
    require_array,
    state_errors_said,
)
from ._validation import (
    check_array,
    check_feature_names,
    check_positive_float,
    check_positive_int,
    check_random_state,
    check_sample_weight,
)
from ._selection import SELECTION_COVARIANCE_TYPES, select_mixture
from .gaussian_mixture import INIT_PARAMS, GaussianMixture

# Standardised values are clipped here before they enter the sufficient statistics, so a
# single absurd point (1e308) cannot overflow x x^T; it is scored, not learned, truthfully.
LEARN_CLIP = 1e12
# A feature whose warm-up spread is below this (relative to its magnitude) is treated as
# constant: scale 1, so it neither blows up nor dominates.
RELATIVE_SCALE_FLOOR = 1e-12
# A warm-up row this many times the feature's central spread (1st to 99th percentile) from its
# median is left out of the standardisation and the warm-up fit: one absurd value (1e100 among
# values of order 1) would otherwise set the feature's scale and squash the rest to a constant.
# Heavy tails stay in (a Cauchy feature passes this far once in 1e8 rows).
ABSURD_SPREADS = 1e6
# ... and so is a row whose squared deviation would overflow, whatever the spread (1e200: the
# warm-up fit could not run at all and every restart would fail on the same buffered row).
SQUARE_SAFE = 1e150
# A warm-up component of fewer rows than this is a glitch's, not a mode: its rows leave the
# warm-up (see _isolated_rows).  Three far points among 1,000 made a component of weight 0.003
# under which that glitch, seen again, scored as normal (helper-39).
MIN_WARMUP_COMPONENT_ROWS = 4
# Values within this fraction of a step of the grid are on it: float arithmetic on recorded
# decimals (0.1 + 0.2) is not exact.
GRID_TOLERANCE = 1e-6
# Model versions are unique within a process (not a per-model count from 0), so a batch scored
# under one model state can never pass for another's, also after a restore.
_MODEL_VERSIONS = itertools.count(1)
AUTO = "auto"
# A covariance type chosen at warm-up other than full is reviewed each time the stream doubles,
# until it is this many warm-ups long: BIC on a small warm-up is cautious with parameters.
TYPE_REVIEW_LIMIT = 64
# Warm-up EM restarts per candidate (K, covariance type) by default, and the multiple of them the
# chosen candidate is refitted with in all (2 and 12: BENCHMARKS.md, "Restarts per candidate").
WARMUP_N_INIT = 2
FINAL_N_INIT_FACTOR = 6


class _ChosenAtWarmup:
    """A constructor parameter that may be "auto".

    ``get_params`` and ``clone`` see what was given; reading the attribute on a model that
    has made its choice gives the choice (the fitted ``n_components_`` / ``covariance_type_``),
    so code that asks a fitted model for its covariance type gets one it can use.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, model, owner=None):
        if model is None:
            return self
        chosen = model.__dict__.get(self.name + "_")
        return model.__dict__[self.name] if chosen is None else chosen

    def __set__(self, model, value):
        model.__dict__[self.name] = value


def _ordinary_rows(X) -> np.ndarray:
    """Which warm-up rows are not absurd (see ``ABSURD_SPREADS`` and ``SQUARE_SAFE``)."""
    low, median, high = np.percentile(X, [1.0, 50.0, 99.0], axis=0)
    with np.errstate(over="ignore", invalid="ignore"):
        deviation = np.abs(X - median)
        limit = np.where(high > low, np.minimum(ABSURD_SPREADS * (high - low), SQUARE_SAFE), SQUARE_SAFE)
        return np.all(deviation <= limit, axis=1)


def recorded_resolution(X, weight) -> np.ndarray:
    """Per feature, the step its warm-up values are recorded at (counts: 1, cents: 0.01), or 0
    when they are not all on one grid (measured values).  A feature with one value in the
    warm-up has the step of that value's last decimal (7.0: 1, 2.5: 0.1; 0 says nothing: 0):
    without it a value seen once in 1,000 rows but not in the warm-up (7.0, then 8.0) scored
    5e5 nats low and was flagged every time it came, never learned (helper-40)."""
    steps = np.zeros(X.shape[1])
    for j, column in enumerate(X[weight > 0].T):
        values = np.unique(column)
        if not np.all(np.isfinite(values)):
            continue
        if len(values) == 1:
            steps[j] = _last_decimal_step(float(values[0]))
            continue
        step = float(np.min(np.diff(values)))
        if np.all(_whole((values - values[0]) / step)):
            steps[j] = step
    return steps


def _whole(ratio):
    """Whether a ratio to a grid step is a whole number, up to GRID_TOLERANCE.  (The float error
    of each ratio grows with it and so does the tolerance here; the GRID_TOLERANCE part does not,
    or a measured feature with a tiny closest pair would pass for a fine grid.)"""
    return np.abs(ratio - np.round(ratio)) <= GRID_TOLERANCE + 64 * np.finfo(float).eps * np.abs(ratio)


def _last_decimal_step(value: float) -> float:
    """10^-k for the fewest decimals k (at most 12) that write ``value`` (7.0: 1, 0.25: 0.01), 0
    for 0 or a value with more."""
    if value == 0.0:
        return 0.0
    for decimals in range(13):
        scaled = value * 10.0**decimals
        if round(scaled) != 0 and _whole(scaled):
            return 10.0**-decimals
    return 0.0


def _is_real(value) -> bool:
    """A real number, numpy's included (np.float32(0.9) is as good an alpha as 0.9), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _usual_components(weights, rare_weight) -> np.ndarray | None:
    """Which components score points (not rare), or None when all of them do."""
    if rare_weight > 0:
        usual = weights >= rare_weight
        if usual.any() and not usual.all():
            return usual
    return None


@dataclass(frozen=True)
class BatchStatistics:
    """The expected sufficient statistics of some rows of a batch under one model state:
    what stepwise EM learns from them (``OnlineGaussianMixture.learn``).

    Small: K x D x D at most, whatever the batch size.
    """

    s0: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    n_points: int  # rows with a positive weight
    total_weight: float
    model_version: int


@dataclass(frozen=True)
class ScoredBatch:
    """A batch scored under one version of the model, ready to learn from.

    ``log_density[i]`` is the log-density of row i before the model learns from it.
    """

    X_internal: np.ndarray
    log_density: np.ndarray
    log_resp: np.ndarray
    component: np.ndarray  # most responsible component per row
    model_version: int

    def head(self, n: int) -> "ScoredBatch":
        """The first ``n`` rows."""
        return ScoredBatch(self.X_internal[:n], self.log_density[:n], self.log_resp[:n], self.component[:n],
                           self.model_version)


def batch_statistics(scored: ScoredBatch, weight: np.ndarray, covariance_type: str) -> BatchStatistics:
    """Statistics of the batch's rows weighted by ``weight`` (one per row); rows whose density
    is not finite weigh nothing."""
    weight = np.where(np.isfinite(scored.log_density), weight, 0.0)
    with np.errstate(invalid="ignore"):
        resp = np.exp(scored.log_resp)
    resp = np.where(weight[:, np.newaxis] > 0, resp, 0.0) * weight[:, np.newaxis]
    X = np.clip(scored.X_internal, -LEARN_CLIP, LEARN_CLIP)
    s0, s1, s2 = g.sufficient_statistics(X, resp, covariance_type)
    return BatchStatistics(s0, s1, s2, int(np.count_nonzero(weight)), float(weight.sum()), scored.model_version)


def recency_weights(steps_before: float, alpha: float, step_floor: float, n_points: int) -> np.ndarray:
    """Each of a batch's n_points rows' weight, relative to the batch's mean, in the one update
    that stands for n_points single-row steps: row i's share of the result is eta_i prod_{j>i}
    (1 - eta_j) (the later steps shrink it), eta the per-point step sizes after ``steps_before``
    (t0 included).  All 1 with alpha 1 and no floor (each share is 1 / t_n): the running mean.
    With a floor, a batch much longer than the half-life was a plain average of its rows (one of
    10,000 rows with a half-life of 500 learned a drifting mean at 10.0 where rows one at a time
    had 18.6; helper-77)."""
    t = steps_before + np.arange(1, n_points + 1, dtype=float)
    eta = np.minimum(np.maximum(t ** (-alpha), step_floor), 1.0 - 1e-12)
    log_keep = np.log1p(-eta)
    kept_after = np.cumsum(log_keep[::-1])[::-1] - log_keep  # sum over j > i
    log_share = np.log(eta) + kept_after
    share = np.exp(log_share - log_share.max())
    # Never exactly 0: a row of weight 0 is not learned and not counted (n_seen_), and the oldest
    # rows of a batch 1,000 half-lives long underflowed (10,000 rows, half_life 5: n_seen_ 5,576).
    return np.maximum(share / share.mean(), np.finfo(float).tiny)


class OnlineGaussianMixture(MixtureBase):
    """Gaussian mixture that learns from a stream with stepwise online EM.

    Parameters
    ----------
    n_components : int or "auto", default="auto"
        "auto": chosen at warm-up by BIC from 1 to ``max_components`` (see ``_selection``).
    covariance_type : {"auto", "full", "tied", "diag", "spherical"}, default="auto"
        Applies in the standardised space.  "auto": chosen at warm-up by BIC with the K.
    max_components : int, default=8
        The largest K that ``n_components="auto"`` tries.
    warmup : int, default=1000
        Points buffered before the model exists; they fix the standardisation, choose K and
        the covariance type if asked to, and initialise the model (MAP EM with a covariance
        prior, best of several restarts).
    alpha : float in (0.5, 1], default=1.0
        Step-size decay.  1 is the running mean; smaller adapts faster but is noisier.
    t0 : float, optional
        Step-size offset; defaults to ``warmup`` so the first steps weigh one point as one
        point of the warm-up.
    half_life : float, optional
        Forgetting as a half-life in points: the step never falls below
        ``1 - 2 ** (-1 / half_life)``, so a point's influence halves every ``half_life`` points.
    forgetting : float, optional
        The same floor given directly as a per-point step size.  Set at most one of the two.
    reg_covar : float, default=1e-6
        Added to the (standardised) covariance diagonals: relative regularisation.  A feature
        whose warm-up values all lie on one grid (counts: step 1; cents: 0.01) also gets the
        variance of rounding, step^2 / 12 (``rounding_variance_``); a feature constant through
        the warm-up, the step of its value's last decimal (7.0: 1, 7.3: 0.1, 7.123456: 1e-6), so
        its density, unlike scikit-learn's, depends on how the constant is written (helper-64):
        without it a value first seen after the warm-up was flagged every time it came.
    min_weight : float, default=1e-4
        A component whose weight falls below this is re-seeded.
    rare_weight : float, default=0.0
        For anomaly scoring: components lighter than this are rare structure, not normal
        behaviour.  ``score_samples`` / ``score_batch`` then score points by the other
        components only (so a small, tight cluster of anomalies the model has absorbed does
        not make its members look normal).  0 gives the exact mixture log-density.  The
        E-step always uses every component.
    warmup_iter : int, default=100
        Batch EM iterations on the warm-up buffer.
    init_params : str, default="kmeans"
        How the warm-up batch EM starts (see ``GaussianMixture``).
    warmup_n_init : int, default=2
        Warm-up EM restarts per candidate (K, covariance type); the chosen candidate is refitted
        with six times as many in all (12 by default).  The best likelihood wins.
    standardize : bool, default=True
    random_state : None, int, numpy Generator or numpy RandomState
        Fixes the model's own generator at the first ``partial_fit`` (a RandomState seeds a
        new Generator); the generator's state, not this parameter, is saved by ``to_dict``.

    The constructor only stores the parameters: the first ``partial_fit`` checks them.
    ``get_params``/``set_params`` work as in scikit-learn.

    Attributes
    ----------
    n_components_, covariance_type_   what the warm-up chose (or was given); reading
        ``n_components`` / ``covariance_type`` on an initialised model gives these too.
        With ``covariance_type="auto"`` a type other than full is reviewed as the stream
        grows (each doubling, up to 64 warm-ups): the model keeps full second moments beside
        its own and turns full when BIC on the effective number of points says so.
    selection_   the warm-up's choice: ``best`` (the MAP EM fit kept) and ``bic`` (the BIC of
        every (covariance type, K) tried); not kept by ``to_dict``
    n_seen_ : int   points learned from (the warm-up included)
    n_reseeded_ : int   component re-seeds so far
    warmup_median_log_density_ : float   the warm-up rows' median log-density under the model
        they made (below its own points' when the covariance prior holds the components inside
        the data: few points in many dimensions); not kept by ``to_dict``
    weights_, means_, covariances_ (original units), center_, scale_

    Examples
    --------
    >>> import numpy as np
    >>> from streamgmm import OnlineGaussianMixture
    >>> rng = np.random.default_rng(0)
    >>> model = OnlineGaussianMixture(n_components=2, warmup=200, random_state=0)
    >>> for _ in range(20):
    ...     batch = np.vstack([rng.normal(-5, 1, (50, 2)), rng.normal(5, 1, (50, 2))])
    ...     model = model.partial_fit(batch)
    >>> model.n_seen_
    2000
    >>> bool(model.score_samples([[0.0, 0.0]])[0] < model.score_samples([[5.0, 5.0]])[0])
    True
    """

    n_components = _ChosenAtWarmup()
    covariance_type = _ChosenAtWarmup()

    def __init__(
        self,
        n_components: int | str = AUTO,
        *,
        covariance_type: str = AUTO,
        max_components: int = 8,
        warmup: int = 1000,
        alpha: float = 1.0,
        t0: float | None = None,
        half_life: float | None = None,
        forgetting: float | None = None,
        reg_covar: float = 1e-6,
        min_weight: float = 1e-4,
        rare_weight: float = 0.0,
        warmup_iter: int = 100,
        init_params: str = "kmeans",
        warmup_n_init: int = WARMUP_N_INIT,
        standardize: bool = True,
        random_state=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.max_components = max_components
        self.warmup = warmup
        self.alpha = alpha
        self.t0 = t0
        self.half_life = half_life
        self.forgetting = forgetting
        self.reg_covar = reg_covar
        self.min_weight = min_weight
        self.rare_weight = rare_weight
        self.warmup_iter = warmup_iter
        self.init_params = init_params
        self.warmup_n_init = warmup_n_init
        self.standardize = standardize
        self.random_state = random_state

    # Until the first partial_fit (or to_dict, from_dict, from_mixture) there is no learning
    # state; these class-level values answer for it.
    n_seen_ = 0
    n_reseeded_ = 0
    _S2_full = None  # full second moments while a chosen covariance type is under review
    rounding_variance_ = 0.0  # see _reg
    data_min_ = data_max_ = None  # per feature, the least and greatest value learned (original units)

    @property
    def _reg(self):
        """What is added to every component's variances (standardised units): ``reg_covar``, plus
        the variance of rounding, step^2 / 12, for a feature recorded on a grid (see
        ``recorded_resolution``).  A count is a rounded quantity, and a density of counts must not
        be tighter than that: otherwise a component sitting on one count shrinks without end as the
        stream grows, and the next count up, never learned, scores as impossible (BENCHMARKS.md,
        "Counts recorded on a grid")."""
        return self.reg_covar + self.rounding_variance_

    def _is_started(self) -> bool:
        return hasattr(self, "_rng")

    def _start(self) -> None:
        """Check the parameters and create the empty learning state (the first partial_fit does it)."""
        self._check_parameters()
        self._rng = _generator_of(self.random_state)
        self.n_seen_ = 0
        self.n_reseeded_ = 0
        self._steps = 0.0
        self._version = next(_MODEL_VERSIONS)
        self._buffer: list[np.ndarray] = []
        self._buffer_weights: list[np.ndarray] = []
        self.n_features_in_: int | None = None

    def set_params(self, **params):
        """Set constructor parameters.  Before the first ``partial_fit`` they are checked then;
        afterwards at once, and n_components, covariance_type and standardize can no longer
        change (the learned statistics are shaped by them).  Returns self."""
        if not self._is_started():
            return super().set_params(**params)
        given = self.get_params(deep=False)
        changed = [name for name in _STRUCTURAL_PARAMS if name in params and params[name] != given[name]]
        if changed:
            raise ValueError(
                f"cannot change {', '.join(changed)} of a model that has started learning; "
                "start a new model (e.g. sklearn.base.clone(model).set_params(...)) instead"
            )
        previous = self.get_params(deep=False)
        super().set_params(**params)
        try:
            self._check_parameters()
        except ValueError:
            super().set_params(**previous)
            raise
        return self

    # ------------------------------------------------------------------ checks
    def _check_parameters(self) -> None:
        given = self.get_params(deep=False)
        n_components, covariance_type = given["n_components"], given["covariance_type"]
        check_positive_int(self.max_components, "max_components")
        if n_components != AUTO:
            check_positive_int(n_components, "n_components")
        if covariance_type != AUTO and covariance_type not in g.COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of auto, {', '.join(g.COVARIANCE_TYPES)}; "
                             f"got {covariance_type!r}")
        largest = self.max_components if n_components == AUTO else n_components
        check_positive_int(self.warmup, "warmup", minimum=2 * (1 if n_components == AUTO else n_components))
        if not (_is_real(self.alpha) and 0.5 < self.alpha <= 1.0):
            raise ValueError(f"alpha must be in (0.5, 1]; got {self.alpha!r}")
        if self.t0 is not None:
            check_positive_float(self.t0, "t0")
        if self.half_life is not None and self.forgetting is not None:
            raise ValueError("set either half_life or forgetting, not both (they are the same floor)")
        if self.half_life is not None:
            check_positive_float(self.half_life, "half_life")
        if self.forgetting is not None and not (_is_real(self.forgetting) and 0.0 < self.forgetting < 1.0):
            raise ValueError(f"forgetting must be a step size in (0, 1); got {self.forgetting!r}")
        check_positive_float(self.reg_covar, "reg_covar")
        if not (_is_real(self.min_weight) and 0.0 <= self.min_weight < 1.0 / largest):
            raise ValueError(f"min_weight must be in [0, 1/{'max_components' if n_components == AUTO else 'n_components'}); "
                             f"got {self.min_weight!r}")
        if not (_is_real(self.rare_weight) and 0.0 <= self.rare_weight < 1.0):
            raise ValueError(f"rare_weight must be in [0, 1); got {self.rare_weight!r}")
        check_positive_int(self.warmup_iter, "warmup_iter")
        check_positive_int(self.warmup_n_init, "warmup_n_init")
        if self.init_params not in INIT_PARAMS:
            raise ValueError(f"init_params must be one of {', '.join(INIT_PARAMS)}; got {self.init_params!r}")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise ValueError(f"standardize must be True or False; got {self.standardize!r}")
        check_random_state(self.random_state)

    @property
    def step_floor(self) -> float:
        """The smallest per-point step size (0 without forgetting)."""
        if self.half_life is not None:
            return -math.expm1(-math.log(2.0) / self.half_life)
        return float(self.forgetting or 0.0)

    @property
    def is_initialized(self) -> bool:
        return hasattr(self, "_S0")

    def _is_fitted(self) -> bool:
        return self.is_initialized

    @property
    def n_buffered_(self) -> int:
        return int(sum(len(b) for b in getattr(self, "_buffer", ())))

    def _not_fitted_message(self) -> str:
        return (
            f"This {type(self).__name__} instance is not fitted yet. Call 'partial_fit' until the "
            f"warm-up is complete (warmup={self.warmup} points; {self.n_buffered_} buffered) "
            "before using this estimator."
        )

    # ---------------------------------------------------------- standardisation
    def _to_internal(self, X):
        # Absurd inputs (1e308 in a feature with a small spread) overflow to inf here: such
        # rows get a -inf density, are flagged and are never learned from.
        with np.errstate(over="ignore", invalid="ignore"):
            return (X - self.center_) / self.scale_

    def standardized(self, X) -> np.ndarray:
        """X in the standardised space the model computes in (``ScoredBatch.X_internal``)."""
        self._check_fitted()
        return self._to_internal(self._check_X(X))

    def _from_internal(self, X):
        return X * self.scale_ + self.center_

    @property
    def _log_jacobian(self) -> float:
        """Added to internal (standardised) log-densities to make them densities of the input."""
        return -float(np.sum(np.log(self.scale_)))

    def _internal_parameters(self):
        return self._weights, self._means, self._precisions_chol

    def _internal_covariances(self):
        return self._covariances

    # -------------------------------------------------------------- public params
    @property
    def weights_(self) -> np.ndarray:
        self._check_fitted()
        return self._weights

    @property
    def means_(self) -> np.ndarray:
        self._check_fitted()
        return self._from_internal(self._means)

    @property
    def covariances_(self) -> np.ndarray:
        """Covariances in original units; for ``spherical`` the per-feature variances (K, D)."""
        self._check_fitted()
        s = self.scale_
        c = self._covariances
        if self.covariance_type_ == "full":
            return c * s[np.newaxis, :, np.newaxis] * s[np.newaxis, np.newaxis, :]
        if self.covariance_type_ == "tied":
            return c * s[:, np.newaxis] * s[np.newaxis, :]
        if self.covariance_type_ == "diag":
            return c * s**2
        return c[:, np.newaxis] * s**2

    @property
    def precisions_cholesky_(self) -> np.ndarray:
        """As scikit-learn's, of ``covariances_`` (original units; ``spherical``: per feature)."""
        kind = "diag" if self.covariance_type_ == "spherical" else self.covariance_type_
        return g.compute_precision_cholesky(self.covariances_, kind)

    @property
    def precisions_(self) -> np.ndarray:
        """The inverses of ``covariances_`` (scikit-learn's attribute; it was missing, helper-64)."""
        kind = "diag" if self.covariance_type_ == "spherical" else self.covariance_type_
        return g.precisions_from_cholesky(self.precisions_cholesky_, kind)

    # ------------------------------------------------------------------ learning
    def fit(self, X, y=None, sample_weight=None):
        """Forget what was learned and take X as the first batch of a new stream. Returns self.

        What scikit-learn's tools call (``cross_val_score``, ``GridSearchCV``,
        ``check_is_fitted`` needs it to exist).  With at least ``warmup`` rows the model is
        initialised from all of them (batch EM on X); with fewer it is still warming up.
        """
        for name in _STATE_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.partial_fit(X, sample_weight=sample_weight)
        if not self.is_initialized:  # scikit-learn's tools would go on to score nothing (nan)
            warnings.warn(f"fit got {self.n_buffered_} rows, fewer than warmup={self.warmup}: the model is still "
                          "warming up and cannot score; pass at least warmup rows, or lower warmup", UserWarning,
                          stacklevel=2)
        return self

    def partial_fit(self, X, y=None, sample_weight=None):
        """Learn from one mini-batch; before the warm-up is complete, buffer it. Returns self.

        The first call checks the parameters (``ValueError`` naming the parameter).  Rows whose
        density is not finite (values so far out that their standardised square overflows) are
        scored but not learned from, and absurd rows in the warm-up (``ABSURD_SPREADS``) do not
        shape the model: ``n_seen_`` counts the rows learned.  After the warm-up every row with a
        finite density is learned, a glitch too: one row at 1e6 among standard normals leaves a
        variance of 2e7 that 50,000 clean rows do not undo (helper-77).  Learn only what the model
        passes (``score_batch``, then ``learn`` with a zero weight for rows far below the stream's
        usual densities), as the detector does.

        ``sample_weight`` weighs the rows against each other within the batch: the step size
        comes from the number of rows, so weights of 5 everywhere learn what weights of 1 do
        (unlike the batch ``GaussianMixture``, where an integer weight is a repeated row).
        """
        if not self._is_started():
            self._start()
        first = self.n_features_in_ is None
        if not first:
            check_feature_names(self, X)
        X_checked = check_array(X, n_features=self.n_features_in_, expected_by=type(self).__name__)
        weight = check_sample_weight(sample_weight, X_checked.shape[0])
        if first:  # names and width of the first batch that passed the checks
            self._remember_feature_names(X)
            self.n_features_in_ = X_checked.shape[1]
        X = X_checked
        if not self.is_initialized:
            # Rows of zero weight teach nothing: the warm-up counts the others.
            self._buffer.append(X[weight > 0])
            self._buffer_weights.append(weight[weight > 0])
            if self.n_buffered_ >= self.warmup:
                self._initialize_from_buffer()
            return self
        self.learn(self.score_batch(X), sample_weight=weight)
        return self

    def score_batch(self, X) -> ScoredBatch:
        """Score a batch under the current model without learning (prequential step one): the
        online model's one scoring path, each row's density and responsibilities."""
        self._check_fitted()
        X_internal = self._to_internal(self._check_X(X))
        weights, means, precisions_chol = self._internal_parameters()
        wlp = g.weighted_log_prob(X_internal, weights, means, precisions_chol, self.covariance_type_)
        log_prob_norm, log_resp = g.e_step(wlp)
        usual = self._usual_components()
        density = log_prob_norm if usual is None else g.logsumexp_rows(np.where(usual, wlp, -np.inf))
        return ScoredBatch(X_internal, density + self._log_jacobian, log_resp, np.argmax(log_resp, axis=1),
                           self._version)

    def typical_log_density(self) -> float:
        """Minus the components' mean entropy, -sum_k pi_k H_k (H_k the k-th Gaussian's): about
        the mean log-density of the model's own points, but for its weights' entropy, which is
        left out so that splitting a component in two (a re-seed) leaves it as it was.  It falls
        as the components widen: a level to read a log-density against as the model follows
        the stream."""
        self._check_fitted()
        weights, _, precisions_chol = self._internal_parameters()
        n_features = self.n_features_in_
        log_det = np.broadcast_to(g.compute_log_det_cholesky(precisions_chol, self.covariance_type_, n_features),
                                  weights.shape)
        entropy = 0.5 * n_features * np.log(2.0 * np.pi * np.e) - log_det
        return float(-np.sum(weights * entropy) + self._log_jacobian)

    def _usual_components(self) -> np.ndarray | None:
        return _usual_components(self._weights, self.rare_weight)

    def _score_from_weighted_log_prob(self, wlp):
        """Log-density from the components that are not rare (all of them if rare_weight is 0)."""
        usual = self._usual_components()
        return g.logsumexp_rows(wlp if usual is None else np.where(usual, wlp, -np.inf))

    def density_quantile(self, quantile: float, n_samples: int, random_state=None) -> float:
        """The ``quantile`` of the log-density of ``n_samples`` draws from this model.

        The value of ``np.quantile(self.score_samples(self.sample(n_samples, random_state)[0]),
        quantile)``, for a fraction of its cost: a draw's density is at least its own
        component's term (when that component is not rare), which comes with the draw, so
        only the draws whose bound is among the lowest are scored in full.
        """
        self._check_fitted()
        weights, means, _ = self._internal_parameters()
        X, labels, own = g.sample_with_own_log_prob(
            check_random_state(random_state), n_samples, weights, means, self._internal_covariances(),
            self.covariance_type_,
        )
        scored_by_own = np.ones(len(weights), dtype=bool) if (usual := self._usual_components()) is None else usual
        bounded = scored_by_own[labels] & np.isfinite(own)
        # The lowest `need` densities fix the quantile (np.quantile interpolates between two).
        need = int(np.ceil(quantile * (n_samples - 1))) + 1
        margin = 4 * need  # bound and density are close in the tail, so a few times `need` suffices
        if np.count_nonzero(bounded) > margin:
            cutoff = np.partition(own[bounded], margin)[margin]
            cutoff += 1e-9 * (1.0 + abs(cutoff))  # the bound and the score round differently
            candidates = ~bounded | (own <= cutoff)
            density = np.full(n_samples, np.inf)
            density[candidates] = self.score_samples(self._from_internal(X[candidates]))
            # Every draw not scored has a density above the cutoff: if `need` scored ones are
            # at or below it, they are the lowest of all.
            if np.count_nonzero(density - self._log_jacobian <= cutoff) >= need:
                return float(np.quantile(density, quantile))
        return float(np.quantile(self.score_samples(self._from_internal(X)), quantile))

    def score_samples(self, X) -> np.ndarray:
        """Log-density of each sample (with ``rare_weight`` > 0: of the usual components only)."""
        return self._score_from_weighted_log_prob(self._estimate_weighted_log_prob(self._check_X(X)))

    def learn(self, scored: ScoredBatch, sample_weight=None) -> None:
        """Learn from a batch scored by ``score_batch`` (prequential step two).

        Rows with zero weight, or whose density is not finite, are not learned from.
        """
        self._check_fitted()
        weight = check_sample_weight(sample_weight, scored.X_internal.shape[0])
        learned = (weight > 0) & np.isfinite(scored.log_density)
        n_learned = int(np.count_nonzero(learned))
        if n_learned > 1 and (self.alpha != 1.0 or self.step_floor > 0.0):
            # The rows in their order, as single-row steps would weigh them (the default's
            # running mean weighs them alike).
            t0 = float(self.warmup if self.t0 is None else self.t0)
            weight = weight.astype(float, copy=True)
            weight[learned] *= recency_weights(self._steps + t0, self.alpha, self.step_floor, n_learned)
        statistics = batch_statistics(scored, weight, self.covariance_type_)
        full_s2 = None if self._S2_full is None else batch_statistics(scored, weight, "full").s2
        self._learn(statistics, lambda: (scored.X_internal, np.where(learned, scored.log_density, np.inf)), full_s2)
        if self.data_min_ is not None and np.any(learned):
            # In standardised units (the map back is increasing), a feature a row: numpy reduces
            # a contiguous row several times faster than a column.
            X = scored.X_internal if learned.all() else scored.X_internal[learned]
            by_feature = np.ascontiguousarray(X.T)
            with np.errstate(over="ignore", invalid="ignore"):
                low, high = self._from_internal(by_feature.min(axis=1)), self._from_internal(by_feature.max(axis=1))
            # Past the limits by more than the round trip through standard units: a count's 0 came
            # back as -8.9e-16 and a normal range read [-8.9e-16, ...] (helper-37).
            slack = 1e-9 * self.scale_
            self.data_min_ = np.where(np.isfinite(low) & (low < self.data_min_ - slack), low, self.data_min_)
            self.data_max_ = np.where(np.isfinite(high) & (high > self.data_max_ + slack), high, self.data_max_)

    def _learn(self, statistics: BatchStatistics, candidates, full_s2) -> None:
        """Learn a batch's statistics, and the full second moments ``full_s2`` of the same rows for a
        covariance type under review (None: the review stops, the batch did not bring them)."""
        self._check_fitted()
        if statistics.model_version != self._version:
            raise ValueError(
                "this batch was scored by an older version of the model; score it again with score_batch"
            )
        if statistics.n_points == 0:
            return
        rho = self._compound_step(statistics.n_points)
        keep = 1.0 - rho
        self._S0 = keep * self._S0 + (rho / statistics.total_weight) * statistics.s0
        self._S1 = keep * self._S1 + (rho / statistics.total_weight) * statistics.s1
        self._S2 = keep * self._S2 + (rho / statistics.total_weight) * statistics.s2
        if self._S2_full is not None:
            self._S2_full = None if full_s2 is None else keep * self._S2_full + (rho / statistics.total_weight) * full_s2
        self._steps += statistics.n_points
        self.n_seen_ += statistics.n_points
        self._refresh_parameters(candidates=candidates)
        if self._S2_full is not None and self.n_seen_ >= self._next_review:
            self._review_covariance_type()

    # ------------------------------------------------------------------ growth
    def add_component(self, X, weight: float) -> None:
        """Give these points (original units, a new regime the model does not explain: a
        cluster that appeared after the warm-up) a component of their own, of mixture weight
        ``weight``: their mean, and their covariance shrunk toward the components' pooled one
        (with the weight of D + 2 points, so a few points in many dimensions are safe).  The
        model then learns it like the others.  A model with ``max_components`` already does not
        grow: ValueError."""
        self._check_fitted()
        K, D = self._means.shape
        if K >= self.max_components:
            raise ValueError(f"the model already has max_components={self.max_components} components")
        X = np.clip(self._to_internal(self._check_X(X)), -LEARN_CLIP, LEARN_CLIP)
        if len(X) < 2:
            raise ValueError("a new component needs at least 2 points")
        mean, centred = X.mean(axis=0), X - X.mean(axis=0)

        def shrunk(scatter, covariances):
            """The points' covariance from their ``scatter``, shrunk toward the components'
            pooled ``covariances`` with the weight of D + 2 points."""
            pooled = np.average(covariances, axis=0, weights=self._weights)
            return (scatter + (D + 2.0) * pooled) / (len(X) + D + 2.0)

        covariances = self._covariances
        if self.covariance_type_ == "full":
            covariances = np.concatenate([covariances, shrunk(centred.T @ centred, covariances)[np.newaxis]])
        elif self.covariance_type_ == "diag":
            covariances = np.concatenate([covariances, shrunk((centred**2).sum(axis=0), covariances)[np.newaxis]])
        elif self.covariance_type_ == "spherical":
            covariances = np.append(covariances, shrunk((centred**2).sum() / D, covariances))
        share = float(np.clip(weight, 2.0 * self.min_weight, 0.5))
        mass = np.append(self._S0, share / (1.0 - share) * self._S0.sum())
        if self._S2_full is not None:
            # The full moments kept for the type review gain the new component's, estimated the
            # same way; what they have gathered on the others is kept.
            _, _, full = g.parameters_from_statistics(self._S0, self._S1, self._S2_full, "full", self._reg)
            own = shrunk(centred.T @ centred, full)
            added = g.statistics_from_parameters(mass[-1:], mean[np.newaxis], own[np.newaxis], "full", self._reg)[2]
            self._S2_full = np.concatenate([self._S2_full, added])
        self._S0, self._S1, self._S2 = g.statistics_from_parameters(
            mass, np.vstack([self._means, mean]), covariances, self.covariance_type_, self._reg)
        self.n_components_ = K + 1
        self._refresh_parameters(candidates=None)

    # ------------------------------------------------------- covariance type review
    def _start_type_review(self) -> None:
        """Keep full second moments beside a chosen type other than full (see ``_review_covariance_type``)."""
        self._S2_full, self._next_review = None, 0
        if self.get_params(deep=False)["covariance_type"] == AUTO and self.covariance_type_ != "full":
            self._S2_full = self._full_second_moments()
            self._next_review = 2 * self.n_seen_

    def _full_second_moments(self) -> np.ndarray:
        """S2 of a full-covariance model with the current parameters (K, D, D)."""
        K, D = self._S1.shape
        _, means, covariances = g.parameters_from_statistics(
            self._S0, self._S1, self._S2, self.covariance_type_, self._reg)
        full = _full_covariances(covariances, self.covariance_type_, K, D)
        return g.statistics_from_parameters(self._S0, means, full, "full", self._reg)[2]

    def _review_covariance_type(self) -> None:
        """Turn full if BIC prefers it on what the stream has shown.

        For maximum-likelihood Gaussians the expected complete-data log-likelihood per point
        of component k is -0.5 (log det(2 pi Sigma_k) + D) whatever the covariance type, so the
        full model gains 0.5 n sum_k w_k (log det Sigma_k(type) - log det Sigma_k(full)) over
        the chosen type, n the effective number of points (1 / the current step size).  It
        turns full when twice that exceeds its extra parameters times log n.
        """
        K, D = self._S1.shape
        t0 = float(self.warmup if self.t0 is None else self.t0)
        n = 1.0 / max((self._steps + t0) ** (-self.alpha), self.step_floor)
        _, _, chosen = g.parameters_from_statistics(self._S0, self._S1, self._S2, self.covariance_type_, self._reg)
        _, _, full = g.parameters_from_statistics(self._S0, self._S1, self._S2_full, "full", self._reg)
        sign_chosen, logdet_chosen = np.linalg.slogdet(_full_covariances(chosen, self.covariance_type_, K, D))
        sign_full, logdet_full = np.linalg.slogdet(full)
        extra = g.n_parameters(K, D, "full") - g.n_parameters(K, D, self.covariance_type_)
        if np.all(sign_chosen > 0) and np.all(sign_full > 0):
            gain = 0.5 * n * float(np.dot(self._S0 / self._S0.sum(), logdet_chosen - logdet_full))
            if 2.0 * gain > extra * np.log(n):
                self.covariance_type_, self._S2, self._S2_full = "full", self._S2_full, None
                self._refresh_parameters(candidates=None)
                return
        self._next_review *= 2
        if self._next_review > TYPE_REVIEW_LIMIT * self.warmup:
            self._S2_full = None

    def _compound_step(self, n_points: int) -> float:
        """1 - prod(1 - eta_i) over the next n_points per-point steps."""
        t0 = float(self.warmup if self.t0 is None else self.t0)
        t = self._steps + t0 + np.arange(1, n_points + 1, dtype=float)
        eta = np.maximum(t ** (-self.alpha), self.step_floor)
        return float(-np.expm1(np.sum(np.log1p(-np.minimum(eta, 1.0 - 1e-12)))))

    # ----------------------------------------------------------- initialisation
    def _initialize_from_buffer(self) -> None:
        X = np.vstack(self._buffer)
        weight = np.concatenate(self._buffer_weights)
        ordinary = _ordinary_rows(X)
        if np.any(weight[ordinary] > 0):
            X, weight = X[ordinary], weight[ordinary]
        self._fit_warmup(X, weight)
        isolated = self._isolated_rows(X, weight)
        if isolated.any():
            # A handful of far points (a glitch) got a component of their own, and the same glitch
            # later scored as normal under it: 0 of 20 flagged after one such point in the warm-up
            # (helper-39).  They leave the warm-up, as absurd rows do, and the fit is made again.
            X, weight = X[~isolated], weight[~isolated]
            self._fit_warmup(X, weight)
        self._buffer, self._buffer_weights = [], []  # kept until the fit has worked
        fit = self.selection_.best
        self.n_components_, self.covariance_type_ = fit.n_components, fit.covariance_type
        self._S0, self._S1, self._S2 = g.statistics_from_parameters(
            fit.weights, fit.means, fit.covariances, fit.covariance_type, self._reg
        )
        self.n_seen_ = int(np.count_nonzero(weight))
        # A warm-up longer than warmup (fit(X) with more rows) has already taken the steps of its
        # extra points: with t0 = warmup (the default) the next batch then weighs 1/(n+1) per point,
        # not 1/(warmup+1).  A warm-up of warmup rows (the daemon's) starts at step 0, so a t0 of
        # the user's keeps its meaning.
        self._steps = max(float(self.n_seen_ - self.warmup), 0.0)
        self._refresh_parameters(candidates=None)
        self._start_type_review()
        # Where the warm-up rows themselves score: a covariance prior made for few points in many
        # dimensions can hold the components well inside the data (300-d: its own points' mean
        # log-density -336, the warm-up rows' median -459), which a level read off the model's
        # own draws does not know.
        self.warmup_median_log_density_ = float(np.median(self.score_samples(X[weight > 0])))

    def _fit_warmup(self, X, weight) -> None:
        """Standardisation, recorded steps, limits and the chosen mixture of these warm-up rows."""
        self._set_standardization(X, weight)
        self.rounding_variance_ = (recorded_resolution(X, weight) / self.scale_) ** 2 / 12.0
        self.data_min_, self.data_max_ = X[weight > 0].min(axis=0), X[weight > 0].max(axis=0)
        self.selection_ = self._select_warmup_mixture(self._to_internal(X), weight)

    def _isolated_rows(self, X, weight) -> np.ndarray:
        """Warm-up rows of a component that fewer than MIN_WARMUP_COMPONENT_ROWS rows hold and whose
        centre lies further from every other row than any row of the other components lies from
        its own centre (standardised units): far points, not a group the fit split (8 rare
        values of a zero-inflated feature came as components of 5 and 3, and the 3 stay)."""
        none = np.zeros(len(X), dtype=bool)
        fit = self.selection_.best
        if fit.n_components == 1:
            return none
        Z = self._to_internal(X)
        precisions_chol = g.compute_precision_cholesky(fit.covariances, fit.covariance_type)
        component = np.argmax(g.weighted_log_prob(Z, fit.weights, fit.means, precisions_chol, fit.covariance_type),
                              axis=1)
        small = np.bincount(component[weight > 0], minlength=fit.n_components) < MIN_WARMUP_COMPONENT_ROWS
        in_small = small[component]
        if not small.any() or np.count_nonzero(weight[~in_small] > 0) < len(X) // 2:
            return none
        radius = np.linalg.norm(Z[~in_small] - fit.means[component[~in_small]], axis=1).max()
        far = np.zeros(fit.n_components, dtype=bool)
        for k in np.flatnonzero(small):
            gap = np.linalg.norm(Z[component != k] - fit.means[k], axis=1).min()
            far[k] = gap > radius
        return far[component]

    def _select_warmup_mixture(self, X_internal, weight):
        """MAP EM on the warm-up buffer over the candidate Ks and covariance types (one each
        when they are given), lowest BIC; see ``_selection.select_mixture``."""
        given = self.get_params(deep=False)
        if given["n_components"] == AUTO:
            largest = min(self.max_components, max(len(X_internal) // 2, 1))
            components = range(1, largest + 1)
        else:
            components = [given["n_components"]]
        covariance_types = SELECTION_COVARIANCE_TYPES if given["covariance_type"] == AUTO else [given["covariance_type"]]
        return select_mixture(
            X_internal, weight, components=components, covariance_types=covariance_types, rng=self._rng,
            reg_covar=self._reg, n_init=self.warmup_n_init, final_n_init=FINAL_N_INIT_FACTOR * self.warmup_n_init,
            max_iter=self.warmup_iter, init_params=self.init_params,
        )

    def _set_standardization(self, X, weight) -> None:
        D = X.shape[1]
        if not self.standardize:
            self.center_, self.scale_ = np.zeros(D), np.ones(D)
            return
        center = np.average(X, axis=0, weights=weight)
        with np.errstate(over="ignore", invalid="ignore"):
            spread = np.sqrt(np.average((X - center) ** 2, axis=0, weights=weight))
        usable = np.isfinite(spread) & (spread > RELATIVE_SCALE_FLOOR * np.maximum(np.abs(center), 1e-150))
        self.center_ = center
        self.scale_ = np.where(usable, spread, 1.0)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, n_samples_seen: int = 0, **params) -> "OnlineGaussianMixture":
        """Start online learning from a fitted batch ``GaussianMixture``.

        The standardisation comes from the mixture's own overall mean and spread.
        ``n_samples_seen`` (the size of the data it was fitted on) makes the running
        averages weigh the fit as that many points instead of as a warm-up.
        """
        mixture._check_fitted()
        params.setdefault("n_components", mixture.n_components)
        params.setdefault("covariance_type", mixture.covariance_type)
        params.setdefault("reg_covar", mixture.reg_covar)
        model = cls(**params)
        model._start()
        given = model.get_params(deep=False)
        if given["n_components"] not in (AUTO, mixture.n_components) or given["covariance_type"] not in (
                AUTO, mixture.covariance_type):
            raise ValueError("n_components and covariance_type must match the mixture's")
        model.n_components_, model.covariance_type_ = mixture.n_components, mixture.covariance_type
        D = mixture.n_features_in_
        model.n_features_in_ = D
        weights, means = mixture.weights_, mixture.means_
        component_cov = _full_covariances(mixture.covariances_, mixture.covariance_type, len(weights), D)
        center = weights @ means
        spread = np.einsum("k,kdd->d", weights, component_cov) + weights @ (means - center) ** 2
        model.center_ = center if model.standardize else np.zeros(D)
        model.scale_ = np.sqrt(spread) if model.standardize else np.ones(D)
        if mixture.covariance_type == "spherical":
            # One variance per component is spherical in one scale only: per-feature scales would
            # turn it into another model (up to 21 nats a point apart).
            model.scale_ = np.full(D, np.sqrt(np.mean(model.scale_**2)))
        s = model.scale_
        internal_means = (means - model.center_) / s
        cov = mixture.covariances_
        if mixture.covariance_type == "full":
            cov = cov / s[np.newaxis, :, np.newaxis] / s[np.newaxis, np.newaxis, :]
        elif mixture.covariance_type == "tied":
            cov = cov / s[:, np.newaxis] / s[np.newaxis, :]
        elif mixture.covariance_type == "diag":
            cov = cov / s**2
        else:
            cov = cov / np.mean(s**2)
        model._S0, model._S1, model._S2 = g.statistics_from_parameters(
            weights, internal_means, cov, model.covariance_type_, model._reg
        )
        model._refresh_parameters(candidates=None)
        model._S2_full, model._next_review = None, 0
        t0 = float(model.warmup if model.t0 is None else model.t0)
        model._steps = max(float(n_samples_seen) - t0, 0.0)
        model.n_seen_ = int(n_samples_seen)
        return model

    # ------------------------------------------------- parameters from statistics
    def _refresh_parameters(self, candidates) -> None:
        """Re-derive parameters from S; re-seed dead or non-PD components.

        ``candidates`` is None, or a function giving (X_internal, log_density) of the last
        batch: dead components move to its most poorly explained points.  (A function: the
        points are needed only when a component dies, and a batch scored elsewhere has to
        standardise them first.)
        """
        weights, means, covariances = g.parameters_from_statistics(
            self._S0, self._S1, self._S2, self.covariance_type_, self._reg
        )
        precisions_chol, bad_cov = g.precision_cholesky_per_component(covariances, self.covariance_type_)
        dead = (weights < self.min_weight) | ~np.isfinite(weights) | ~np.all(np.isfinite(means), axis=1)
        if self.covariance_type_ != "tied":
            dead |= bad_cov
        if dead.any() or (self.covariance_type_ == "tied" and bad_cov.any()):
            if candidates is None:
                worst_points = np.empty((0, means.shape[1]))
            else:
                points, log_density = candidates()
                worst_points = np.clip(points[np.argsort(log_density)[: int(dead.sum())]], -LEARN_CLIP, LEARN_CLIP)
            self._reseed(weights, means, covariances, dead, bad_cov, worst_points)
            weights, means, covariances = g.parameters_from_statistics(
                self._S0, self._S1, self._S2, self.covariance_type_, self._reg
            )
            precisions_chol, still_bad = g.precision_cholesky_per_component(covariances, self.covariance_type_)
            if still_bad.any():
                raise FloatingPointError("re-seeding failed to restore positive-definite covariances")
        self._weights, self._means, self._covariances = weights, means, covariances
        self._precisions_chol = precisions_chol
        self._version = next(_MODEL_VERSIONS)

    def _reseed(self, weights, means, covariances, dead, bad_cov, worst_points) -> None:
        K, D = means.shape
        healthy = ~dead
        if self.covariance_type_ == "tied":
            if bad_cov.any():
                covariances = np.eye(D)
        else:
            if healthy.any():
                pooled = np.average(covariances[healthy], axis=0, weights=weights[healthy] + g.MASS_EPS)
            else:
                pooled = np.eye(D) if self.covariance_type_ == "full" else (np.ones(D) if self.covariance_type_ == "diag" else 1.0)
            covariances = covariances.copy()
            covariances[dead] = pooled
        weights = np.where(np.isfinite(weights), weights, 0.0)
        means = np.where(np.isfinite(means), means, 0.0)
        total_mass = float(np.sum(np.where(healthy, self._S0, 0.0))) or 1.0
        # A reborn component starts light (rare, when rare_weight is set): it sits on the worst
        # explained points, which are anomalies as often as a new regime, and must earn its
        # weight by explaining points before it counts as normal behaviour.
        share = max(10.0 * self.min_weight, min(0.5 / K, 0.5 * self.rare_weight if self.rare_weight > 0 else 1.0))
        if self.rare_weight > 0:
            share = min(share, 0.5 * self.rare_weight)  # under rare_weight even where 10 x min_weight is not
        new_mass = np.where(dead, share * total_mass, np.where(healthy, self._S0, 0.0))
        for slot, k in enumerate(np.flatnonzero(dead)):
            if slot < len(worst_points):
                means[k] = worst_points[slot]
            else:
                heaviest = int(np.argmax(np.where(healthy, weights, -np.inf))) if healthy.any() else 0
                means[k] = means[heaviest] + self._rng.standard_normal(D)
        self._S0, self._S1, self._S2 = g.statistics_from_parameters(
            new_mass, means, covariances, self.covariance_type_, self._reg
        )
        if self._S2_full is not None:
            self._S2_full[dead] = self._full_second_moments()[dead]
        self.n_reseeded_ += int(dead.sum())

    # ---------------------------------------------------------------------- state
    def to_dict(self) -> dict:
        """The state (parameters, statistics, warm-up buffer, random generator) as plain
        numbers and numpy arrays (see ``from_dict``).  ``random_state`` is not kept: the
        generator's own state is."""
        if not self._is_started():
            # A model not yet learning stays so (set_params still free): a fresh one's state.
            fresh = type(self)(**self.get_params(deep=False))
            fresh._start()
            return fresh.to_dict()
        state = {
            "kind": "OnlineGaussianMixture",
            "format_version": STATE_FORMAT_VERSION_ROUNDING if np.any(self.rounding_variance_) else STATE_FORMAT_VERSION,
            "params": {name: plain_value(value) for name, value in self.get_params(deep=False).items()
                       if name in _STATE_PARAMS},
            "n_features": self.n_features_in_,
            "n_seen": int(self.n_seen_),
            "n_reseeded": int(self.n_reseeded_),
            "steps": float(self._steps),
            "initialized": self.is_initialized,
            "rng_state": self._rng.bit_generator.state,
            **self._feature_names_state(),
        }
        if self.is_initialized:
            state.update(
                chosen={"n_components": int(self.n_components_), "covariance_type": self.covariance_type_},
                center=self.center_.copy(),
                scale=self.scale_.copy(),
                rounding_variance=np.broadcast_to(self.rounding_variance_, self.scale_.shape).copy(),
                **({} if self.data_min_ is None else {"data_min": self.data_min_.copy(), "data_max": self.data_max_.copy()}),
                S0=self._S0.copy(),
                S1=self._S1.copy(),
                S2=self._S2.copy(),
                next_type_review=int(self._next_review),
            )
            if self._S2_full is not None:
                state["S2_full"] = self._S2_full.copy()
        elif self._buffer:
            state.update(buffer=np.vstack(self._buffer), buffer_weights=np.concatenate(self._buffer_weights))
        return state

    @classmethod
    @state_errors_said
    def from_dict(cls, state: dict) -> "OnlineGaussianMixture":
        check_state_header(state, "OnlineGaussianMixture")
        params = dict(state["params"])
        model = cls(**params)
        model._start()
        D = state["n_features"]
        model.n_features_in_ = None if D is None else int(D)
        model._restore_feature_names(state)
        model.n_seen_ = int(state["n_seen"])
        model.n_reseeded_ = int(state["n_reseeded"])
        model._steps = float(state["steps"])
        try:
            model._rng = _generator_with_state(state["rng_state"])
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"state has an unusable rng_state: {exc}") from None
        if state["initialized"]:
            # A state written before "auto" existed holds the K and type in its params.
            chosen = state.get("chosen", params)
            K, cov_type = chosen["n_components"], chosen["covariance_type"]
            if not isinstance(K, int) or isinstance(K, bool) or K < 1 or cov_type not in g.COVARIANCE_TYPES:
                raise ValueError(f"state has an unusable chosen model size: {chosen!r}")
            model.n_components_, model.covariance_type_ = K, cov_type
            model.center_ = require_array(state, "center", (D,))
            model.scale_ = require_array(state, "scale", (D,))
            if np.any(model.scale_ <= 0):
                raise ValueError("state entry 'scale' must be positive")
            if "rounding_variance" in state:  # (a state written before it existed has none)
                model.rounding_variance_ = require_array(state, "rounding_variance", (D,))
            if "data_min" in state:
                model.data_min_ = require_array(state, "data_min", (D,))
                model.data_max_ = require_array(state, "data_max", (D,))
            model._S0 = require_array(state, "S0", (K,))
            model._S1 = require_array(state, "S1", (K, D))
            s2_shape = covariance_shape(cov_type, K, D)
            if cov_type == "spherical":
                s2_shape = (K, D)
            model._S2 = require_array(state, "S2", s2_shape)
            _check_statistics(model._S0, model._S1, model._S2, cov_type, model._reg)
            model._refresh_parameters(candidates=None)
            model._S2_full = require_array(state, "S2_full", (K, D, D)) if "S2_full" in state else None
            model._next_review = int(state.get("next_type_review", 0))
        elif "buffer" in state:
            buffer = require_array(state, "buffer", (len(state["buffer"]), D))
            model._buffer = [buffer]
            model._buffer_weights = [require_array(state, "buffer_weights", (len(buffer),))]
        return model

    def _sampling_rng(self):
        return self._rng


# Saved by to_dict (random_state is not: the generator's state is saved instead).
_STATE_PARAMS = (
    "n_components", "covariance_type", "max_components", "warmup", "alpha", "t0", "half_life", "forgetting",
    "reg_covar", "min_weight", "rare_weight", "warmup_iter", "init_params", "warmup_n_init", "standardize",
)
# Everything learning creates (what fit forgets).
_STATE_ATTRIBUTES = (
    "_rng", "n_seen_", "n_reseeded_", "_steps", "_version", "_buffer", "_buffer_weights", "n_features_in_",
    "feature_names_in_",
    "n_components_", "covariance_type_", "selection_", "_S2_full", "_next_review",
    "center_", "scale_", "rounding_variance_", "data_min_", "data_max_", "warmup_median_log_density_",
    "_S0", "_S1", "_S2", "_weights", "_means", "_covariances", "_precisions_chol",
)
# What the learned statistics are shaped by: fixed once learning has started.
_STRUCTURAL_PARAMS = ("n_components", "covariance_type", "standardize")
_BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "MT19937": np.random.MT19937,
                   "Philox": np.random.Philox, "SFC64": np.random.SFC64}


def _generator_of(random_state) -> np.random.Generator:
    """The model's own generator: a legacy RandomState seeds a new Generator (drawing the
    seed from it), so the saved state is always a Generator's."""
    rng = check_random_state(random_state)
    if isinstance(rng, np.random.RandomState):
        return np.random.default_rng(rng.randint(0, 2**63 - 1, dtype=np.int64))
    return rng


def _generator_with_state(rng_state: dict) -> np.random.Generator:
    bit_generator = _BIT_GENERATORS[rng_state["bit_generator"]]()
    bit_generator.state = rng_state
    return np.random.Generator(bit_generator)


def _check_statistics(S0, S1, S2, covariance_type, reg) -> None:
    """ValueError unless the sufficient statistics of a state are a model's: masses >= 0 that
    add up to more than 0, and positive-definite covariances.  A record with its masses negated
    restored without a word (re-seeding made the covariances valid again) and flagged 1,340 of
    2,000 normal points (helper-58)."""
    if np.any(S0 < 0) or not S0.sum() > 0:
        raise ValueError("state entry 'S0' (the components' masses) must be >= 0 and add up to more than 0")
    _, _, covariances = g.parameters_from_statistics(S0, S1, S2, covariance_type, reg)
    _, bad = g.precision_cholesky_per_component(covariances, covariance_type)
    if np.any(bad & (S0 > 0)):  # (a component of no mass is re-seeded, as when learning)
        raise ValueError("state entries 'S0', 'S1', 'S2' give covariances that are not positive definite")


def _full_covariances(covariances, covariance_type, n_components, n_features):
    """Any covariance type as (K, D, D) matrices."""
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.repeat(covariances[np.newaxis], n_components, axis=0)
    if covariance_type == "diag":
        return np.array([np.diag(c) for c in covariances])
    return np.array([np.eye(n_features) * c for c in covariances])


__all__ = ["BatchStatistics", "OnlineGaussianMixture", "ScoredBatch", "NotFittedError",
           "batch_statistics"]
