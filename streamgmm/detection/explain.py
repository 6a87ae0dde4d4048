"""Why a point was flagged, in the input's own units, and how rare its density is.

For a flagged point x:

- **nearest component**: of the components that score points (not rare structure, see
  ``model.rare_weight``), the one x belongs to in its other features once its most deviant
  feature is set aside, or as a whole (see ``explain``).
- **per feature j**, the distribution of x_j given all the other features under that
  component: Gaussian with variance 1 / P_jj and mean x_j - (P x_c)_j / P_jj, where
  P = Sigma_k^-1 and x_c = x - mu_k.  ``z_j = (P x_c)_j / sqrt(P_jj)`` is the feature's
  standardised residual given the others, and z_j ** 2 is exactly how much the point's squared
  Mahalanobis distance falls if x_j alone is moved to its expected value: ranking features by
  |z_j| ranks them by how much of the distance each explains on its own.  With diagonal
  covariances these are the plain per-feature z-scores.
- **rarity**: the probability that a point of the stream scores this low or lower (see
  ``rarity``), shown as "1 in N".

Everything is computed from the model's public parameters in original units (``weights_``,
``means_``, ``covariances_``), once per batch that has anomalies (``ComponentGeometry``), and
then for the flagged rows only, vectorised: a point that is not flagged costs nothing here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import special

LOG_2PI = math.log(2.0 * math.pi)
# The "normal range" of a feature is its expected value +- this many conditional standard
# deviations (99.7% of the component's points, given the other features, fall inside).
NORMAL_RANGE_SD = 3.0
# ``log_tail_probability``'s ``method`` when the number is the model bound below.
MODEL_BOUND = "model_bound"
# The model bound of many points is interpolated between this many exact values, over the
# highest (10 nats x max(D, 10)) of log-density; points further down are computed exactly.
INTERPOLATION_NODES = 512
INTERPOLATION_SPAN_PER_FEATURE = 10.0
# For the arithmetic of the explanation, a value further than this many of a component's
# standard deviations beyond every component is brought back to that distance: further out,
# the expected value (the value less its own residual) and the density with the feature
# repaired (a huge density plus a huge z ** 2 / 2) are differences of numbers that large, with
# no correct digit left (a counter at 1e12 was "expected" at -7.8, and the wrong component
# chosen).  The value reported, the first feature's z and the distance are still the original's;
# a second far feature of the same row is named in its order (see ``_bring_back``) with the z of
# the value brought back (about 1e4).
EXPLAIN_CLIP_SD = 1e4


class TailModel(Protocol):
    """What a threshold offers to say how rare a log-density is (optional).

    ``log_tail_probability(log_density)``: natural log of the probability that a point of the
    stream has a log-density at or below each value (an array in, an array out), or None while
    the tail model cannot say (too few scores yet).  Logs, because the anomalies worth
    explaining are often 1e-400 rare.  ``tail_method`` names it in the record
    (e.g. ``"gpd_tail"``).
    """

    tail_method: str

    def log_tail_probability(self, log_density: np.ndarray) -> np.ndarray | None: ...


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class ComponentGeometry:
    """The mixture's components in original units, as the explanation needs them.

    log_weights : (K,); means : (K, D); precisions : (K, D, D) (diagonal for diag and
    spherical covariances); log_det : (K,) log-determinant of each covariance; usual : (K,)
    whether the component scores points (False for rare structure); sd : (K, D) each
    feature's standard deviation in each component; low, high : (D,) the least and greatest
    value of each feature the model learned (None: unknown), which bound the normal ranges.
    """

    log_weights: np.ndarray
    means: np.ndarray
    precisions: np.ndarray
    log_det: np.ndarray
    usual: np.ndarray
    sd: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    # (D,) each feature's standard deviation under the whole mixture: the unit a feature set
    # aside is measured in when the component is chosen (see ``explain``).  None: 1.
    spread: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return self.means.shape[1]


def _full_from_full(covariances, n_components, n_features):
    return covariances


def _full_from_tied(covariances, n_components, n_features):
    return np.broadcast_to(covariances, (n_components, n_features, n_features))


def _full_from_diag(variances, n_components, n_features):
    variances = np.broadcast_to(np.reshape(variances, (n_components, -1)), (n_components, n_features))
    return variances[:, :, np.newaxis] * np.eye(n_features)


# Covariances as (K, D, D) matrices.  ``spherical`` is (K,) in scikit-learn's convention and
# (K, D) per-feature variances in OnlineGaussianMixture's original units (it is spherical in
# the standardised space): both are diagonal.
_AS_FULL = {"full": _full_from_full, "tied": _full_from_tied, "diag": _full_from_diag, "spherical": _full_from_diag}


def usual_components(weights: np.ndarray, rare_weight: float) -> np.ndarray:
    """Which components score points: all but those lighter than ``rare_weight``, unless that
    would leave none (the rule ``OnlineGaussianMixture`` scores by)."""
    usual = weights >= rare_weight if rare_weight > 0 else np.ones(len(weights), dtype=bool)
    return usual if usual.any() else np.ones(len(weights), dtype=bool)


def component_geometry(weights, means, covariances, covariance_type: str, rare_weight: float = 0.0) -> ComponentGeometry:
    """Precisions and log-determinants of a mixture given in original units.

    Parameters
    ----------
    weights : array of shape (n_components,)
    means : array of shape (n_components, n_features)
    covariances : as ``covariances_`` of the model for ``covariance_type``
    rare_weight : components lighter than this do not score points (the model's rare_weight)
    """
    weights, means = np.asarray(weights, dtype=float), np.asarray(means, dtype=float)
    n_components, n_features = means.shape
    if covariance_type not in _AS_FULL:
        raise ValueError(f"covariance_type must be one of {', '.join(_AS_FULL)}; got {covariance_type!r}")
    full = _AS_FULL[covariance_type](np.asarray(covariances, dtype=float), n_components, n_features)
    try:
        chol = np.linalg.cholesky(full)
    except np.linalg.LinAlgError:
        raise ValueError("a component covariance is not positive definite; increase model.reg_covar") from None
    inv_chol = np.linalg.inv(chol)
    precisions = np.swapaxes(inv_chol, 1, 2) @ inv_chol
    log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)
    sd = np.sqrt(np.diagonal(full, axis1=1, axis2=2))
    share = weights / weights.sum()
    centre = share @ means
    spread = np.sqrt(np.maximum(share @ (sd**2 + (means - centre) ** 2), 0.0))
    return ComponentGeometry(log_weights, means, precisions, log_det, usual_components(weights, rare_weight), sd,
                             spread=np.where(spread > 0, spread, 1.0))


def model_geometry(model) -> ComponentGeometry:
    """``component_geometry`` of a fitted OnlineGaussianMixture (any covariance type), with the
    range of the values it learned where it keeps one."""
    geometry = component_geometry(model.weights_, model.means_, model.covariances_, model.covariance_type,
                                  getattr(model, "rare_weight", 0.0))
    low, high = getattr(model, "data_min_", None), getattr(model, "data_max_", None)
    return geometry if low is None or high is None else dataclasses.replace(geometry, low=low, high=high)


@dataclasses.dataclass(frozen=True)
class OutlyingComponent:
    """A light component far from every other: a mode of the data, or anomalies the warm-up
    took in (their own component makes them normal structure)."""

    index: int
    share: float  # of the mixture's weight
    distance_sd: float  # its mean, in the nearest other component's Mahalanobis distance
    feature: int  # where it differs most from that component, in that component's sd
    value: float  # its mean there
    expected: float  # the nearest component's mean there


def outlying_components(geometry: ComponentGeometry, min_share: float = 0.0, max_share: float = 0.05,
                        min_distance_sd: float = 6.0) -> list[OutlyingComponent]:
    """Components of ``min_share`` to ``max_share`` whose mean lies more than ``min_distance_sd``
    from every other component (each other's Mahalanobis distance), with the feature that sets
    them apart.  An operator's 0.5% of CPU spikes 10 sd off, present from the first message, got a
    component in the warm-up and went unflagged without a word (helper-83).  (A heavy tail's
    far points get components of one or two points: ``min_share`` leaves them out.)"""
    weights = np.exp(geometry.log_weights)
    share = weights / weights.sum()
    found = []
    for j in np.flatnonzero((share >= min_share) & (share < max_share)):
        others = [k for k in range(len(share)) if k != j and share[k] > 0]
        if not others:
            continue
        gaps = geometry.means[j] - geometry.means[others]  # (K-1, D)
        distances = np.sqrt(np.maximum(np.einsum("kd,kde,ke->k", gaps, geometry.precisions[others], gaps), 0.0))
        nearest = int(np.argmin(distances))
        if distances[nearest] > min_distance_sd:
            k = others[nearest]
            z = np.abs(gaps[nearest]) / geometry.sd[k]
            feature = int(np.argmax(z))
            found.append(OutlyingComponent(int(j), float(share[j]), float(distances[nearest]), feature,
                                           float(geometry.means[j, feature]), float(geometry.means[k, feature])))
    return found


# --------------------------------------------------------------- explanation
@dataclass(frozen=True)
class Explanation:
    """The explanation of n points: component : (n,) the nearest component; mahalanobis : (n,)
    the distance to it, in standard deviations; top : (n, n_top) feature indices, in the order
    they explain the distance; expected, sd, z : (n, n_top) each one's conditional mean and
    standard deviation and its standardised residual (x - expected) / sd at its turn."""

    component: np.ndarray
    mahalanobis: np.ndarray
    top: np.ndarray
    expected: np.ndarray
    sd: np.ndarray
    z: np.ndarray
    # (n, n_top): the feature that moves the expected value most, when it moves it by at least
    # one conditional standard deviation (-1: none); see ``explain``.
    given: np.ndarray | None = None


def explain(X, geometry: ComponentGeometry, n_top: int = 3) -> Explanation:
    """Explain each row of X (array of shape (n_samples, n_features), original units).

    The component is the one that gives the point the most density once one feature is set
    aside, or none (the largest of w_k N_k(x_-j) / (sqrt(2 pi) D s_j) over components k and
    features j, x_-j the other features, s_j feature j's spread under the whole mixture, and of
    w_k N_k(x); with one feature, of w_k N_k(x) only): a point with one feature far off
    belongs, in all its other features, to the component it came from, even when another
    component, wider in that feature, now gives the raw point more density.

    Greedy: the feature with the largest |z| given all the others comes first; it is then
    set to its expected value and the next is the largest |z| of the rest given that, and so
    on.  So each feature's z ** 2 is its own share of the squared distance (they add up to at
    most mahalanobis ** 2), and a feature that is off only because the first one is (its
    expected value given the first was off) is not named after it.
    """
    original = np.asarray(X, dtype=float)
    n, n_features = original.shape
    reach = EXPLAIN_CLIP_SD * geometry.sd
    X = _bring_back(original, (geometry.means - reach).min(axis=0), (geometry.means + reach).max(axis=0))
    with np.errstate(over="ignore", invalid="ignore"):
        diff = X[:, np.newaxis, :] - geometry.means[np.newaxis]  # (n, K, D)
        p_diff = np.einsum("kij,nkj->nki", geometry.precisions, diff)  # P x_c per component
        squared = np.einsum("nki,nki->nk", diff, p_diff)
        log_prob = geometry.log_weights - 0.5 * (n_features * LOG_2PI + geometry.log_det + squared)
        # Each component's z of each feature, and the point's density under that component
        # with that one feature set aside: the density of the other features (the density plus
        # z ** 2 / 2 and the log of the feature's conditional sd), times that of the feature
        # spread over the whole mixture's range of it (the same for every component).  Without
        # the conditional sd, the density with the feature at its expected value, a component
        # flat in that feature (a percentage clipped at 100, sd 0.18) won every point it was
        # set aside for by its own 1 / sd: 4-9% of a clean stream's records of clipped
        # percentages named an ordinary value first, "79.9, expected 99.95, z -39.8" (helper-68).
        conditional_sd = 1.0 / np.sqrt(np.diagonal(geometry.precisions, axis1=1, axis2=2))  # (K, D)
        z_all = p_diff * conditional_sd[np.newaxis]
        spread = np.ones(n_features) if geometry.spread is None else geometry.spread
        # (And a prior: as likely that one feature is off, any of the D, as that none is.)
        repaired = (log_prob[:, :, np.newaxis] + 0.5 * z_all**2 + np.log(conditional_sd / spread)[np.newaxis]
                    - math.log(n_features))
    # ... or with none set aside: a point the component explains whole is its own (a clean
    # stream's flag, mildly off in several features, was given to the component flat in a
    # clipped percentage with it set aside, "disk 52.8, expected 99.95, z -111").
    # (With one feature nothing is left once it is set aside, and the heaviest component took
    # every point: 103 was "component 0, expected 0, z 103" beside a component at 100; review.)
    set_aside = np.nanmax(repaired, axis=2, initial=-np.inf) if n_features > 1 else log_prob
    best = np.nan_to_num(np.fmax(set_aside, log_prob), neginf=-np.finfo(float).max)
    component = np.argmax(np.where(geometry.usual, best, -np.inf), axis=1)  # usual, even for absurd points
    rows = np.arange(n)
    precision = geometry.precisions[component]  # (n, D, D)
    p_x = p_diff[rows, component]  # (n, D)
    p_jj = np.diagonal(precision, axis1=1, axis2=2)
    sd = 1.0 / np.sqrt(p_jj)
    n_top = min(n_top, n_features)
    top = np.zeros((n, n_top), dtype=np.intp)
    expected, z = np.zeros((n, n_top)), np.zeros((n, n_top))
    chosen = np.zeros((n, n_features), dtype=bool)
    given = np.full((n, n_top), -1, dtype=np.intp)
    centred = X - geometry.means[component]  # x - mu, with each named feature then at its expected value
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(n_top):
            z_all = p_x * sd
            magnitude = np.where(chosen, -1.0, np.nan_to_num(np.abs(z_all), nan=np.inf))
            j = np.argmax(magnitude, axis=1)
            top[:, step], z[:, step] = j, z_all[rows, j]
            shift = p_x[rows, j] / p_jj[rows, j]
            expected[:, step] = X[rows, j] - shift
            # expected - mu_j = sum over i != j of -(P_ji / P_jj)(x_i - mu_i): the feature with the
            # largest term is what the expectation leans on (a correlated partner: "expected 2771
            # given conns = 750" reads as conns being off too, not as 2771 being normal).
            lean = -precision[rows, j, :] / p_jj[rows, j][:, np.newaxis] * centred
            lean[rows, j] = 0.0
            lean[chosen] = 0.0  # a feature named before stands at its expected value here, not its own
            partner = np.argmax(np.nan_to_num(np.abs(lean), nan=np.inf), axis=1)
            moved = np.abs(lean[rows, partner]) >= sd[rows, j]
            given[:, step] = np.where(moved, partner, -1)
            centred[rows, j] -= shift
            chosen[rows, j] = True
            # x_j moved to its expected value: P x_c changes by -shift times P's column j.
            p_x = p_x - shift[:, np.newaxis] * precision[rows, :, j]
    mahalanobis = np.sqrt(np.maximum(squared[rows, component], 0.0))
    far = np.flatnonzero(np.any(X != original, axis=1))
    if len(far):  # the first feature's z and the distance, of the value as it is (see EXPLAIN_CLIP_SD)
        with np.errstate(over="ignore", invalid="ignore"):
            diff_far = original[far] - geometry.means[component[far]]
            p_far = np.einsum("nij,nj->ni", precision[far], diff_far)
            z[far, 0] = p_far[np.arange(len(far)), top[far, 0]] * sd[far, top[far, 0]]
            mahalanobis[far] = np.sqrt(np.einsum("ni,ni->n", diff_far, p_far))
    return Explanation(component, mahalanobis, top, expected, np.take_along_axis(sd, top, axis=1), z, given)


def _bring_back(X: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """X with each value beyond [low, high] (per feature) brought back to just past that range,
    log-compressed so that far values keep their order (a 1e20 glitch stays further out than a
    1e8 one in the same row, and is named first); at most 2.5 times the range's half-width off
    its centre.  Values inside are unchanged."""
    centre, half = (low + high) / 2.0, (high - low) / 2.0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        deviation = X - centre
        ratio = np.abs(deviation) / half
        compressed = centre + np.sign(deviation) * half * (1.0 + 1e-3 * np.minimum(np.log(ratio), 1500.0))
    return np.where(ratio > 1.0, compressed, X)


def explanation_documents(X, explanation: Explanation, geometry: ComponentGeometry, names) -> list[dict]:
    """The record fields of each explained row: ``nearest_component`` and ``top_features``.

    A feature's ``share`` is z ** 2 / mahalanobis ** 2: the part of the point's squared
    distance from its component that this feature accounts for.  (Numbers that overflow, for
    an absurd point, are NaN or infinite here: orjson writes them as null.)
    """
    e = explanation
    weights = np.exp(geometry.log_weights)[e.component].tolist()
    expected = e.expected
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        share = np.minimum(e.z**2 / (e.mahalanobis**2)[:, np.newaxis], 1.0)
        lo, hi = e.expected - NORMAL_RANGE_SD * e.sd, e.expected + NORMAL_RANGE_SD * e.sd
        if geometry.low is not None:
            # Not past what the model ever learned: a latency's range went below zero, a count's
            # below 0, a share's past 1 (the Gaussian does not know the feature's limits).
            # (Where the whole range lies beyond them, it is left as it is.)
            low, high = np.maximum(lo, geometry.low[e.top]), np.minimum(hi, geometry.high[e.top])
            inside = low <= high
            lo, hi = np.where(inside, low, lo), np.where(inside, high, hi)
            # Nor the expected value: a request size "expected" at -5,808 bytes beside a normal
            # range of [27.7, 11,864] (helper-59).  It is the nearest value of that range; z is
            # still the component's (from its own expectation), as the README says.
            expected = np.where(inside, np.clip(expected, lo, hi), expected)
        lo, hi = lo.tolist(), hi.tolist()
    values = np.take_along_axis(np.asarray(X, dtype=float), e.top, axis=1).tolist()
    expected, zs, shares, top = expected.tolist(), e.z.tolist(), share.tolist(), e.top.tolist()
    given = (np.full(e.top.shape, -1) if e.given is None else e.given).tolist()
    return [
        {"nearest_component": {"index": k, "weight": w, "mahalanobis": distance},
         "top_features": [
             {"name": names[j], "value": v, "expected": mu, "normal_range": [a, b], "z": zj, "share": sh,
              "given": names[g] if g >= 0 else None}
             for j, v, mu, a, b, zj, sh, g in zip(top[i], values[i], expected[i], lo[i], hi[i], zs[i], shares[i],
                                                  given[i])
         ]}
        for i, (k, w, distance) in enumerate(zip(e.component.tolist(), weights, e.mahalanobis.tolist()))
    ]


# -------------------------------------------------------------------- rarity
def _logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(a))) along ``axis``, -inf where every term is (scipy's costs 0.1 ms a call)."""
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - top), axis=axis)) + np.squeeze(top, axis=axis)


def _log_chi2_sf(squared, n_features: int):
    """log P(chi2 with n_features degrees of freedom > squared), also far below 1e-308."""
    a, half = 0.5 * n_features, 0.5 * np.maximum(squared, 0.0)
    with np.errstate(divide="ignore"):
        log_sf = np.log(special.gammaincc(a, half))
    # Underflowed: the asymptotic series of the upper incomplete gamma function, accurate
    # where it is needed (half >> a).
    deep = ~np.isfinite(log_sf) & np.isfinite(half)
    if deep.any():
        h = half[deep]
        log_sf[deep] = (a - 1.0) * np.log(h) - h - special.gammaln(a) + np.log1p((a - 1.0) / h)
    return log_sf


def model_log_tail_bound(log_density, geometry: ComponentGeometry) -> np.ndarray:
    """An upper bound on log P(log p(X) <= l) for X drawn from the model's usual components.

    A point's density is at least its own component's term, so log p(X) <= l implies, for X
    drawn from component k, that its squared Mahalanobis distance exceeds
    r_k^2 = 2 (log w_k - l) - D log 2 pi - log det Sigma_k: P(chi2_D > r_k^2).  Summed over the
    components (weights renormalised over the usual ones) that bounds the tail probability;
    tight in the far tail, where one component's term is all of a point's density, and never
    more than a factor K loose.  ``log_density`` : array of shape (n_samples,).

    Many points at once (every point of a batch, for the scores topic) are interpolated
    between ``INTERPOLATION_NODES`` exact values spanning the batch's bulk (the bound is smooth
    and monotone in l; nodes a fraction of a nat apart), the far tail computed exactly.
    """
    log_density = np.asarray(log_density, dtype=float)
    if len(log_density) <= 2 * INTERPOLATION_NODES:
        return _model_log_tail_bound(log_density, geometry)
    finite = np.isfinite(log_density)
    high = log_density[finite].max(initial=-np.inf)
    low = max(log_density[finite].min(initial=np.inf), high - INTERPOLATION_SPAN_PER_FEATURE * max(geometry.n_features, 10))
    if not low < high:
        return _model_log_tail_bound(log_density, geometry)
    nodes = np.linspace(low, high, INTERPOLATION_NODES)
    log_tail = np.interp(log_density, nodes, _model_log_tail_bound(nodes, geometry))
    outside = ~(log_density >= low)
    if outside.any():
        log_tail[outside] = _model_log_tail_bound(log_density[outside], geometry)
    return log_tail


def _model_log_tail_bound(log_density: np.ndarray, geometry: ComponentGeometry) -> np.ndarray:
    l = log_density[:, np.newaxis]
    log_w = np.where(geometry.usual, geometry.log_weights, -np.inf)
    log_w = log_w - _logsumexp(log_w)
    with np.errstate(invalid="ignore"):
        radius2 = 2.0 * (geometry.log_weights - l) - geometry.n_features * LOG_2PI - geometry.log_det
    radius2 = np.nan_to_num(radius2, nan=np.inf, posinf=np.inf)
    log_tail = _logsumexp(log_w + _log_chi2_sf(radius2, geometry.n_features), axis=1)
    return np.minimum(log_tail, 0.0)


@dataclass(frozen=True)
class Rarity:
    """log_tail : (n,) natural log of the tail probability; method : what produced it, one
    name or one per row."""

    log_tail: np.ndarray
    method: str | list


def rarity(log_density, threshold, geometry: ComponentGeometry, points_learned: int = 0) -> Rarity:
    """How rare each log-density is: the threshold's own tail model when it has one (see
    ``TailModel``), else the model bound (``model_log_tail_bound``, method ``model_bound``).

    A tail model that has counted no score yet (the first step after the warm-up) leaves the
    model bound, no rarer there than 1 in ``points_learned`` + 1: the bound is the Gaussian
    components' tail, and on heavy-tailed streams it called points a few nats past the
    threshold 1 in 1e14 (records claiming 1 in 1e6 came 9 times for 0.3 expected on a Student t
    stream, most of them from that step; ``bench_rarity.py``)."""
    log_density = np.asarray(log_density, dtype=float)
    tail_of = getattr(threshold, "log_tail_probability", None)
    floor = -np.inf
    if tail_of is not None:
        log_tail = tail_of(log_density)
        if log_tail is not None:
            log_tail = np.minimum(np.asarray(log_tail, dtype=float), 0.0)
            beyond = ~np.isfinite(log_tail)
            if not beyond.any():
                return Rarity(log_tail, str(threshold.tail_method))
            # Probability 0 under the tail model (a density of -inf, or past the end of a tail
            # model that stops there): the model bound says how rare, row by row.
            log_tail[beyond] = _never_impossible(model_log_tail_bound(log_density[beyond], geometry))
            return Rarity(log_tail, [MODEL_BOUND if b else str(threshold.tail_method) for b in beyond.tolist()])
        if points_learned > 0:
            floor = -math.log(points_learned + 1.0)
    return Rarity(np.maximum(_never_impossible(model_log_tail_bound(log_density, geometry)), floor), MODEL_BOUND)


def _never_impossible(log_tail: np.ndarray) -> np.ndarray:
    """A density of -inf (a value like 1e308, whose square overflows) is as rare as can be
    written, not impossible: its log tail probability is the lowest float, not -inf (which the
    record could only write as null)."""
    return np.maximum(log_tail, -np.finfo(float).max)


def one_in(log_tail: np.ndarray) -> list:
    """1 / tail probability to three significant digits: an integer from 100 up to 2**53, a
    float otherwise, None where it exceeds the largest float (the log still says how rare)."""
    log10_n = -np.asarray(log_tail, dtype=float) / math.log(10.0)
    with np.errstate(over="ignore", invalid="ignore"):
        unit = 10.0 ** (np.floor(log10_n) - 2.0)
        n = np.round(10.0**log10_n / unit) * unit
    exact = (n >= 100.0) & (n < 2.0**53)
    if exact.all():
        return n.astype(np.int64).tolist()
    # Below 100, through the shortest decimal: 49.9, not 499 * 0.1 = 49.900000000000006.
    return [int(v) if e else (float(f"{v:.3g}") if v < math.inf else None) for v, e in zip(n.tolist(), exact.tolist())]


def rarity_documents(rarity_: Rarity) -> list[dict]:
    """The ``rarity`` field of each row's record (a log10 of -inf, past the end of a tail model, is written null)."""
    log_tail = rarity_.log_tail
    probabilities = np.exp(log_tail).tolist()
    log10 = (log_tail / math.log(10.0)).tolist()
    methods = rarity_.method if isinstance(rarity_.method, list) else [rarity_.method] * len(log_tail)
    return [
        {"tail_probability": p, "log10_tail_probability": l10, "one_in": n, "method": m}
        for p, l10, n, m in zip(probabilities, log10, one_in(log_tail), methods)
    ]


# ------------------------------------------------------- for a tail-model threshold
def gpd_log_tail_probability(log_density, *, level: float, exceedance_rate: float, scale: float,
                             shape: float) -> np.ndarray:
    """log P(L <= l) under a peaks-over-threshold model of the low tail of scores L.

    The scores below ``level`` make up ``exceedance_rate`` of all scores, and how far below it
    they fall, y = level - l, follows a generalized Pareto distribution (``scale`` > 0,
    ``shape`` xi): P(L <= l) = rate * (1 + xi y / scale) ** (-1 / xi) for l < level (xi = 0:
    rate * exp(-y / scale)); beyond the end point of a xi < 0 tail it is 0 (log -inf).
    Above ``level`` there is no tail model: the rate is returned there, an upper bound.
    For a threshold's ``log_tail_probability`` (``TailModel``).
    """
    y = np.maximum(level - np.asarray(log_density, dtype=float), 0.0)
    log_rate = math.log(exceedance_rate)
    if abs(shape) < 1e-9:
        return log_rate - y / scale
    with np.errstate(divide="ignore", invalid="ignore"):
        t = 1.0 + shape * y / scale
        log_tail = log_rate - np.log(np.maximum(t, 0.0)) / shape
    return np.where(np.isnan(log_tail), -np.inf, log_tail)
