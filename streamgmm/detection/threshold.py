"""Log-density thresholds: calibrated on the stream's own scores, the model's density, or fixed.

``StreamQuantileThreshold`` (mode ``quantile``, the default) flags about a fraction q of normal
traffic whatever the shape of the data.  It works on the anomaly score s = L - log p(x) of
each point *as it was scored* (prequential, before the model learned it), L the model's typical
log-density then (``OnlineGaussianMixture.typical_log_density``: a stream whose spread grows
lowers every log p with the model's, and s stays put), by peaks over threshold as in SPOT
(Siffer et al., KDD 2017):

1. t is the (1 - p) quantile of the recent scores, p = max(10 q, min(2%, TAIL_PEAKS / n)) over
   the n points of the window (with the default windows: 10 q for q >= 0.002, 2% down to
   q = 5e-4, the top 1,000 peaks at q = 1e-4); the excesses s - t of
   the scores above it (the peaks) follow a generalised Pareto distribution (GPD) whatever
   the distribution of s, fitted by maximum likelihood (Grimshaw's one-dimensional profile);
2. the threshold is z_q = t + sigma/gamma ((q n / N_t)^-gamma - 1), n the points counted and
   N_t those above t (gamma -> 0: t - sigma log(q n / N_t)).  Flagged points are those with
   s > z_q, i.e. log p(x) < value = L - z_q.

Bursts.  A flagged point is an alarm, not a peak: it enters the fit only as *censored* (its
score is known to exceed the threshold it was flagged at, and nothing more), only if it is not
beyond the fitted tail's (q/100)-quantile (further out it says nothing about where z_q should
be), and only while a token bucket allows, filled at 3 q per unflagged point and holding 3:
normal flags (rate q) are all counted, so the tail is not truncated at z_q (which would pull
z_q down round after round), while a block of anomalies adds at most 3 censored exceedances.
Points not counted do not advance the window either, so a long burst does not push the
normal history out.

Where the window holds at least 20 scores beyond z_q's (q n >= 20), it is held to them: a fit
that puts z_q where far fewer than q n of the window's scores lie beyond gives way to the
window's own (1 - q) quantile (a fit to the top 10% extrapolates a shape the data then
contradict).  Only downwards: more scores beyond z_q than q n may be a cluster of anomalies.

Values.  Scores crowding within a tenth of a nat (one value of the data: a count's ones) followed
by a wide gap are not a tail to cut through: where z_q falls among them or just past them and at
least half of q n lie beyond the gap, z_q goes to the gap's middle, so identical values get the
same verdict (``_clear_of_a_value``).

Scores then and now.  The highest stored peaks keep their rows (at most ROWS_KEPT), and at each
re-estimate they are scored again by the model as it is then (the others move by their block's
median move).  A model still learning moves its scores for tens of thousands
of points, and the scores as they were lag it (a disk's edge: 0.04 q flagged); under a drift the
model lags the stream, and old points scored again look more usual than new ones will.  Which
of the two sets the threshold is decided by their record: the share of the stream's next scores
beyond the z_q each gave, against q (``_now_leads``).

Drift.  Only the peaks of the last ``window`` counted points are kept (default max(20k, 20/q):
with a young model the scores move, and a longer window lags them); t and z_q are re-estimated
from them every window/10 points with the last GPD shape (moved to the new t), the GPD itself
every window/2 (a fit: about a millisecond, nearly all of the cost).

Start.  The first fit comes after 300 scored points (30 peaks over their 90% quantile; while
the stream is young, t is the quantile with 30 points above it, down to the 90% quantile).
Before it the value is the q/100-quantile of the model's own density
(``ModelQuantileThreshold``): only gross outliers are flagged.  For the first ``calibration``
points every scored point counts as it is, flagged or not (the start is not trusted enough to
censor); after that alarms are kept out as above.  The same holds for the first ``calibration``
points after the history restarts (a tail that got lighter, see ``_restart_history``).

A stale tail.  Where the recent scores come over t far less often than the window's rate and
the model has learned the older peaks (``_stale_since``, ``_still_unusual``), the peaks are
first scored again by the current model and kept so, each collection level moved as the peaks
it collected (``_rescored``): a daily cycle's first afternoon, learned by the evening, was let go
with its history, and the next afternoon was judged against the night (3.9 q at q = 0.001).  The
history restarts only where, so scored, the tail is still stale, or a level that collected
nothing holds t above it (a regime's first points in the tail: nothing says where that level
lies now).

``ModelQuantileThreshold`` (mode ``model_quantile``) is right when the data is a Gaussian
mixture; ``FixedThreshold`` (mode ``fixed``) never moves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import pdtr

from ..mixture.online import OnlineGaussianMixture
from .explain import gpd_log_tail_probability

if TYPE_CHECKING:  # the service layer builds the config; only its type is named here
    from ..service.config import ThresholdConfig

# The tail above t is this fraction of the scores (at least TAIL_OVER_Q x q, so that z_q sits
# well inside the fitted tail; at most half of them).
TAIL_FRACTION = 0.02
TAIL_OVER_Q = 10.0
# ... and once the window holds more peaks than this at that share (q = 1e-4: 4,000 in its
# 200,000 points), t moves up to keep this many: enough for the fit (the shape's standard error
# about 0.05), and z_q extrapolated 50 times past t instead of 200 (a heavy tail read at 2%
# put z_q at 96 nats where the scores' own 1e-4 quantile was 79: 0.37 q flagged).
TAIL_PEAKS = 1_000
# Censored exceedances: tokens per unflagged point (in units of q) and the bucket's size.
TOKEN_RATE_OVER_Q = 3.0
TOKEN_BUCKET = 3.0
# Alarms further out than the fitted tail's quantile at this fraction of q are not counted at
# all (only those between z_q and there can say that z_q is too low).
FAR_OVER_Q = 0.01
# ... and at least this many of the fitted tail's mean excesses past z_q.  For an exponential
# tail the q/100 quantile is 4.6 of them (z_far moves a little further); a tail that ends
# changes most: its fitted quantiles all crowd at its end (a sine's values, shape -1: z_far 0.001
# nats past z_q), and a score drift of 0.06 nats put every alarm beyond it.
FAR_MEAN_EXCESSES = 5.0
# Flagged points at most this many mean excesses past z_q are "just past" it (see
# ``marginal_flags``): for an exponential tail, those with a tail probability between q and q/7.4.
# At 2 a sine's run-away stops at q = 0.001 (7.2 -> 1.2 q) but not at 0.01 (7.1 -> 4.0 q; 4 would
# stop it); at 3 or more a cluster of anomalies 20 times rarer than q, 5% of the traffic, was
# learned within 16,000 points (the threshold's own drift took 32,000): distance cannot tell them
# apart (BENCHMARKS.md, eighth session).
MARGINAL_MEAN_EXCESSES = 2.0
# A step with this many (binomial) standard deviations more of its scores in the tail than the
# tail's share looks like a change, not chance.
SURPRISE_SD = 4.0
# The recent scores over t this many times fewer than the window's rate says: the tail is stale
# (see ``_stale``), when at least STALE_MIN_EXPECTED were expected.
STALE_RATIO = 4.0
STALE_MIN_EXPECTED = 40.0
# ... or none came where at least this many were expected.
STALE_NONE_EXPECTED = 25.0
# At least this many older peaks scored again to say the tail is not stale (_still_unusual).
STALE_MIN_ROWS = 20
# ... unless the span's flagged points left out of the tail were more than this many q.
STALE_FLAGGED_OVER_Q = 2.0
# ... and more than this many (at q = 0.001 a 2,000-point span's 2 q is 4 points: a few real
# anomalies in a quiet evening would let the tail go again).
STALE_FLAGGED_MIN = 10
# The fitted z_q gives way to the window's own (1 - q) quantile where at least this many of its
# scores are expected beyond z_q and so few lie beyond it that a Poisson count of that mean
# comes that low with a probability under EMPIRICAL_P (see ``_held_to_the_window``).  From 10
# expected on, the drifting stream of bench_quality.py lost AP 0.910 -> 0.843 (more of a new
# cluster's first points flagged, and not learned, while the window was young).
EMPIRICAL_MIN_EXPECTED = 20.0
EMPIRICAL_P = 0.01
# The record of the two ways of scoring the peaks (see ``_now_leads``) halves every this fraction
# of the window.
RACE_HALF_LIFE_OVER_WINDOW = 0.25
# Rows of stored peaks kept for scoring them again (the highest scores; see ``_prune_rows``): at
# most this many, and this many values in all (float64), at least MIN_ROWS_KEPT.
ROWS_KEPT = 500
ROW_VALUES_KEPT = 25_000
MIN_ROWS_KEPT = 100
# Fewer peaks than this: no stream estimate yet.
MIN_PEAKS = 30
# Young again after a restart, a flagged point this many nats (a density e^-30 times) beyond the
# last fit's z_far is an anomaly, kept out of the tail that counts every other score.
RESTART_FAR_NATS = 30.0
# Scores within this many nats (a density ratio of 1%) are one value of the data, moved by the
# model's learning, not a tail (see StreamQuantileThreshold._beyond_the_bulk).
ATOM_NATS = 0.01
# Scores this close below a wide gap (and within 1/BULK_GAP_OVER_MEDIAN of its length) are a
# crowd: one value of the data, moved by the model's learning (a count's ones drift a few
# hundredths of a nat), that z_q is kept clear of (see StreamQuantileThreshold._clear_of_a_value).
# A continuous tail has a point or two there; a far cluster after a tail, the tail's whole top
# within 1/30 of a 1,000-nat gap, is not one.
VALUE_NATS = 0.1
# ... and a z_q more than this many nats past such a crowd is clear of it already (the crowd's
# drift is hundredths of a nat).
CLEAR_NATS = 1.0
# Peaks beyond a jump of this many median excesses are a separate far cluster, not the tail:
# anomalies more frequent than q that the history took in (during calibration, or in a
# sustained flow).  They leave the fit and the counts (see _beyond_the_bulk).
BULK_GAP_OVER_MEDIAN = 30.0
# ... when they are clearly more than this many q of the points (three Poisson standard
# deviations over it).  A rarer far cluster is the normal tail's own (shuttle's normal rows
# have one, 0.8 q): it belongs in the tail, as before.
FAR_CLUSTER_OVER_Q = 2.0
# ... or beyond a gap that no decreasing density leaves (see _gap_after_the_bulk): with at least
# this many points beyond it, at this level (over all the gaps tested), in the upper GAP_MAX_SHARE
# of at least GAP_MIN_PEAKS peaks, GAP_MIN_DISTINCT of them distinct.
GAP_MIN_POINTS = 10
GAP_ALPHA = 1e-4
GAP_MIN_PEAKS = 100
GAP_MIN_DISTINCT = 0.9
GAP_MAX_SHARE = 0.75
# ... and the gap at least this many median excesses wide: a tail whose density rises to a cliff
# (a sine's values: its scores crowd at their end) has narrow gaps before the crowd, which a
# density that only decreases would not leave (a sine at q = 0.01: 1.2 -> 2.3 q).
GAP_MIN_OVER_MEDIAN = 1.0
# A GPD fit moved to another level keeps at least this share of its scale (see _gpd_at); a move
# that would take it under is not made: the tail is fitted again (see refit).
GPD_SCALE_FLOOR = 0.1
# Flagged points kept for how often the stream scores that low (see _seen_as_rare).
FLAGGED_KEPT = 2_000
# ... and beyond z_far, a score counts as that low within this fraction of its excess past z_far.
SEEN_TOLERANCE = 0.1
# More than this: the fit takes this many, evenly spread (a fit then costs about a millisecond).
FIT_PEAKS = 2_000
# While the top TAIL_FRACTION holds fewer than MIN_PEAKS, the peaks come from a deeper tail,
# the top 10% at most: the first fit comes after 300 points.
START_TAIL_FRACTION = 0.1
# The model's draws for its density quantile hold at most this many values (8 bytes each, twice
# over while they are made): the number of draws shrinks with the number of features, down to
# 1,000 (past 4,000 features).
SAMPLE_VALUES = 4_000_000


def _many_flags(flags: np.ndarray, rate: float) -> bool:
    """Far more flags than the expected rate: ten times, and at least 5."""
    return int(np.count_nonzero(flags)) > max(5.0, 10.0 * rate * len(flags))


def flags_below(log_density: np.ndarray, value: float | None) -> np.ndarray:
    """Which points a threshold at ``value`` flags (none while there is no value yet)."""
    if value is None:
        return np.zeros(len(log_density), dtype=bool)
    return log_density < value


# --------------------------------------------------------------- the GPD tail
def _profile_log_likelihood(u: np.ndarray, excess: np.ndarray, censored: np.ndarray, scale: float):
    """Grimshaw's profile log-likelihood of the GPD at x = u / scale, for each u.

    With x = gamma / sigma, the likelihood is maximised over gamma in closed form:
    gamma(x) = (sum log1p(x y) + sum log1p(x c)) / n_u over the excesses y and the censoring
    levels c, leaving one dimension to search.  Returns (log-likelihood, gamma) per u.
    """
    n_u = len(excess)
    x = np.asarray(u, dtype=float)[:, None] / scale
    a = np.log1p(x * excess[None, :]).sum(axis=1)
    c = np.log1p(x * censored[None, :]).sum(axis=1) if len(censored) else 0.0
    x = x[:, 0]
    gamma = (a + c) / n_u
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(x != 0.0, gamma / np.where(x != 0.0, x, 1.0), 0.0)
    total = excess.sum() + censored.sum()
    sigma = np.where(x == 0.0, total / n_u, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        loglik = -n_u * np.log(sigma) - a - (a + c) / np.where(gamma != 0.0, gamma, 1.0)
    # x = 0 is the exponential limit: -n_u log(sigma) - total / sigma.
    loglik = np.where(x == 0.0, -n_u * np.log(sigma) - total / sigma, loglik)
    return np.where(np.isfinite(loglik) & (sigma > 0), loglik, -np.inf), gamma


def fit_gpd(excess, censored=None) -> tuple[float, float]:
    """Maximum-likelihood (gamma, sigma) of a generalised Pareto distribution.

    Parameters
    ----------
    excess : array-like of shape (n_excess,)
        Observed excesses over the threshold, all > 0.
    censored : array-like of shape (n_censored,), optional
        Right-censored excesses: each is known to be at least this level (>= 0).

    Grimshaw's reduction to one dimension (see ``_profile_log_likelihood``): a log-spaced
    grid of x, refined four times around the best point (each time 5x finer); gamma is kept
    in [-1, 5].
    """
    y = np.asarray(excess, dtype=float)
    c = np.zeros(0) if censored is None else np.asarray(censored, dtype=float)
    if len(y) < 2:
        raise ValueError(f"fit_gpd needs at least 2 excesses, got {len(y)}")
    scale = float(max(y.max(), c.max() if len(c) else 0.0))
    mean = float(y.mean())
    # u = x * max > -1 (the support); on the positive side up to gamma/sigma ~ 1e4/mean.
    grid = np.concatenate([-(1.0 - np.geomspace(1e-4, 0.999, 12)), [0.0],
                           np.geomspace(1e-5, 1e4 * scale / mean, 20)])
    grid.sort()
    for refinement in range(5):
        loglik, gamma = _profile_log_likelihood(grid, y, c, scale)
        loglik = np.where((gamma >= -1.0) & (gamma <= 5.0), loglik, -np.inf)
        best = int(np.argmax(loglik))
        if refinement == 4:
            break
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        grid = np.linspace(lo, hi, 11)
        if lo < 0.0 < hi:
            grid = np.union1d(grid, [0.0])
    x = grid[best] / scale
    g = float(gamma[best])
    sigma = (y.sum() + c.sum()) / len(y) if x == 0.0 else g / x
    return g, float(sigma)


def _thin(values: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` of ``values``, evenly spaced in sorted order (their distribution
    with less detail: the fit costs less and moves little)."""
    if len(values) <= size:
        return values
    return np.sort(values)[np.linspace(0, len(values) - 1, size).round().astype(np.intp)]


def gpd_excess_quantile(gamma: float, sigma: float, tail_probability: float) -> float:
    """The excess y with P(Y > y) = ``tail_probability`` under GPD(gamma, sigma)."""
    log_p = math.log(tail_probability)
    if abs(gamma) < 1e-9:
        return -sigma * log_p
    try:
        return sigma / gamma * math.expm1(-gamma * log_p)
    except OverflowError:
        return math.inf


def _gap_after_the_bulk(ordered: np.ndarray) -> float | None:
    """The excess after which the top of ``ordered`` (sorted excesses) is a separate cluster, by
    a gap no decreasing density leaves, or None.

    A tail's density decreases (a GPD's, whatever its shape): across an empty gap of length G
    it is at least its mean over the k points beyond the gap, spread over a range R, so about
    k G / R points were due in the gap; none came with probability exp(-k G / R).  The largest
    such k G / R over the gaps in the upper 75% of the peaks, with at least GAP_MIN_POINTS
    beyond, is a cluster when it is over log(gaps tested / GAP_ALPHA).  No shape is assumed
    (the bulk's shape, fitted to a part of the peaks, was read short on Pareto data, whose
    own top was then taken for a cluster).  Scores on a grid (dice) have gaps of their own:
    not tested; nor gaps narrower than the median excess below them (a tail rising to a cliff).

    Anomalies more frequent than q that came while the tail counted everything (its
    calibration) sat 12 nats past a normal tail whose median excess was 0.7, under the 30
    median excesses the jump rule asks, and stretched the fit until z_q lay past them: a
    steady 0.5% of points 8-10 standard deviations out, from the start, flagged at 13-20% at
    q = 0.001.  Anomalies that overlap the tail's end leave no gap, and are taken in.
    """
    n = len(ordered)
    if n < GAP_MIN_PEAKS or len(np.unique(ordered)) < GAP_MIN_DISTINCT * n:
        return None
    first = int(math.floor((1.0 - GAP_MAX_SHARE) * n))
    last = n - 1 - GAP_MIN_POINTS  # the gap after ordered[i], for first <= i <= last
    if last < first:
        return None
    i = np.arange(first, last + 1)
    # (R over all the points beyond: read from the nearer half, a new cluster of the drifting
    # stream's (bench_quality.py) was found as one and kept out, 57 q flagged and AP 0.91 -> 0.10.
    # A few glitches far past a cluster spread R and hide its gap, which errs on the side of the tail.)
    beyond = n - 1 - i
    gap = ordered[i + 1] - ordered[i]
    spread = ordered[-1] - ordered[i + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        # (the median excess of the bulk below each gap: a cluster that is most of the peaks, as a
        # burst in the first points after the warm-up is, held the median of them all)
        due = np.where((spread > 0.0) & (gap >= GAP_MIN_OVER_MEDIAN * ordered[i // 2]), beyond * gap / spread, 0.0)
    best = int(np.argmax(due))
    if due[best] <= math.log(len(i) / GAP_ALPHA):
        return None
    return float(ordered[i[best]])


def _top_and_level(scores: np.ndarray, kth: list[int], above: int, floor: float) -> tuple[np.ndarray, float]:
    """``scores`` with its largest first, in order, down to the ranks ``kth`` (a partition), and
    the level with ``above`` of them over it, at least ``floor`` (see ``_level_over``)."""
    top = -np.partition(-scores, kth) if kth else scores
    return top, _level_over(top, above, floor, partitioned=True)


def _level_over(scores: np.ndarray, above: int, floor: float, partitioned: bool = False) -> float:
    """The score with ``above`` scores over it (``floor`` if there are not that many), at least
    ``floor``.  ``partitioned``: ``scores`` already has its largest first, in order, down to
    that rank (``np.partition`` of the negated scores)."""
    if len(scores) <= above:
        return floor
    top = scores if partitioned else -np.partition(-scores, above)
    return max(float(top[above]), floor)


def _draws_for(quantile: float) -> int:
    """About 20 draws below the quantile: enough to keep the flagged fraction within a factor of
    two of q (on a Gaussian mixture), at well under one draw per learned point."""
    return int(min(200_000, max(10_000, 20.0 / quantile)))


def _model_density_quantile(model: OnlineGaussianMixture, quantile: float, samples: int) -> float:
    """The model's density quantile from ``samples`` draws seeded by its ``n_seen_`` (a replay
    after a restart draws the same), not more than SAMPLE_VALUES values in all (each draw is a
    row of n_features): 200,000 draws of 300 features took 1.26 GB at the end of the warm-up
    (helper-49)."""
    samples = min(samples, max(1_000, SAMPLE_VALUES // max(model.n_features_in_, 1)))
    return model.density_quantile(quantile, samples, random_state=model.n_seen_)


# ------------------------------------------------------------------ thresholds
def _at_the_same_rank(z: float, scores: np.ndarray, other: np.ndarray) -> float:
    """The value of ``other`` (the same points scored another way) with as many of them beyond it
    as ``scores`` has beyond ``z``; past all of them, as far past their highest as ``z`` is."""
    beyond = int(np.count_nonzero(scores > z))
    if beyond == 0 or not len(other):
        return float(z - scores.max() + other.max()) if len(other) else float(z)
    if beyond >= len(other):
        return float(other.min())
    return float(-np.partition(-other, beyond)[beyond])


class FixedThreshold:
    """Flag points whose log-density is below ``value``."""

    mode = "fixed"

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, model: OnlineGaussianMixture) -> None:
        """A fixed threshold does not move."""

    def points_before_refresh(self, model: OnlineGaussianMixture) -> int | None:
        """Never refreshed."""
        return None

    def classify(self, log_density: np.ndarray) -> np.ndarray:
        return flags_below(log_density, self.value)

    def surprised(self, log_density: np.ndarray, flags: np.ndarray) -> bool:
        return _many_flags(flags, 0.001)

    def observe(self, log_density: np.ndarray, flags: np.ndarray, count_flagged: bool = False,
                points: np.ndarray | None = None) -> None:
        """Scores do not move a fixed threshold."""

    def marginal_flags(self, log_density: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """None: the stream's scores do not move this threshold."""
        return np.zeros(len(flags), dtype=bool)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "value": self.value}

    def load_dict(self, state: dict) -> None:
        """The configured value stands (a restart is how it is changed)."""


class ModelQuantileThreshold:
    """Flag the lowest ``quantile`` fraction of the model's density.

    Re-estimated from ``samples`` draws of the model, seeded by the model's ``n_seen_`` so
    that a replay after a restart gives the same values: often while the model is young
    (whenever it has learned half as many points again), then every ``refresh_every``.
    Right when the data is a Gaussian mixture; a burst cannot drag it (only what the model
    learns moves it).
    """

    mode = "model_quantile"

    def __init__(self, quantile: float, refresh_every: int = 50_000, samples: int | None = None):
        self.quantile = float(quantile)
        self.refresh_every = int(refresh_every)
        self.samples = int(samples) if samples else _draws_for(quantile)
        self.value: float | None = None
        self.refreshed_at = -1

    def update(self, model: OnlineGaussianMixture) -> None:
        if not model.is_initialized:
            return
        if self.value is not None:
            learned_since = model.n_seen_ - self.refreshed_at
            if learned_since < self._interval():
                return
        self.value = _model_density_quantile(model, self.quantile, self.samples)
        self.refreshed_at = model.n_seen_

    def points_before_refresh(self, model: OnlineGaussianMixture) -> int | None:
        """While the model is young (refreshes closer together than ``refresh_every``), how
        many more points it learns before the next refresh; None once it is not."""
        if self.value is None or not model.is_initialized:
            return None
        interval = self._interval()
        if interval >= self.refresh_every:
            return None
        return max(interval - (model.n_seen_ - self.refreshed_at), 1)

    def _interval(self) -> int:
        return min(self.refresh_every, max(1_000, self.refreshed_at // 2))

    def classify(self, log_density: np.ndarray) -> np.ndarray:
        return flags_below(log_density, self.value)

    def surprised(self, log_density: np.ndarray, flags: np.ndarray) -> bool:
        return _many_flags(flags, self.quantile)

    def observe(self, log_density: np.ndarray, flags: np.ndarray, count_flagged: bool = False,
                points: np.ndarray | None = None) -> None:
        """Only the model moves this threshold."""

    def marginal_flags(self, log_density: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """None: the stream's scores do not move this threshold."""
        return np.zeros(len(flags), dtype=bool)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "value": self.value, "refreshed_at": self.refreshed_at, "quantile": self.quantile}

    def load_dict(self, state: dict) -> None:
        if state.get("quantile", self.quantile) != self.quantile:
            return  # a value for another quantile: re-estimated at the next update
        self.value = None if state["value"] is None else float(state["value"])
        self.refreshed_at = int(state["refreshed_at"])


class StreamQuantileThreshold:
    """Flag about a fraction ``quantile`` of the stream, from its own prequential scores.

    See the module docstring for the method.  ``observe`` is called with every scored batch
    (log-densities and flags); the peaks of the last ``window`` counted points are kept; for
    the first ``calibration`` points flagged points count as any other.
    """

    mode = "quantile"

    def __init__(self, quantile: float, window: int | None = None, calibration: int | None = None,
                 refresh_every: int = 50_000, samples: int | None = None):
        self.quantile = float(quantile)
        self.window = int(window) if window else int(max(20_000, math.ceil(20.0 / quantile)))
        self.calibration = int(max(5_000, math.ceil(1.0 / quantile)) if calibration is None else calibration)
        self.tail_fraction = min(0.5, max(TAIL_FRACTION, TAIL_OVER_Q * quantile))
        # Until the first fit only gross outliers: the model's density is usually far too
        # light-tailed for real data (its q-quantile flagged up to 90 q on non-Gaussian
        # streams), so the start is its q/100-quantile (at most 200,000 draws: their lowest).
        self.start = ModelQuantileThreshold(quantile / 100.0, refresh_every, samples)
        # The model's typical log-density (see ``update``): scores are counted relative to it.
        self.typical = 0.0
        # How far below the mean log-density of the model's own points (about typical +
        # sum w log w) its warm-up rows' median sat when it was made (see ``update``).
        self.start_shift = 0.0
        self._reset()

    def _reset(self) -> None:
        self.n_counted = 0  # points counted so far (unflagged, plus flagged ones with a token)
        self._absolute_history = False  # a checkpoint's history in -log p itself (see load_dict)
        self.history_start = 0  # the counted point the history starts at (see ``_restart_history``)
        self.tokens = TOKEN_BUCKET
        # Stored peaks: every counted score above the collection level in force when it came.
        self._scores: list[np.ndarray] = []
        self._censor: list[np.ndarray] = []  # the flagged point's z (censored), or NaN
        self._index: list[np.ndarray] = []
        # The rows of stored peaks (those given with ``observe``), by counted index, to be scored
        # again under the model as it is now (see ``_scored_now``).
        self._point_rows: list[np.ndarray] = []
        self._point_index: list[np.ndarray] = []
        self._model = None  # the model (set by ``update``): to score stored rows again, and its density quantile
        self._model_z = None  # (n_seen_ when drawn, that quantile as a score), see ``_model_score_at_q``
        self._rows_stale = False  # peaks were taken out since the rows were last pruned
        # z_q from the peaks as they were and as the model now scores them (see ``_scored_now``),
        # and their record: (q x points, points beyond the first, beyond the second), decayed;
        # the points since the last re-estimate: (points, beyond the first, beyond the second).
        self.race_z: tuple[float, float] | None = None
        self.jitter = 0.0  # (see ``_scored_now``)
        self.race_record = (0.0, 0.0, 0.0)
        self.race_pending = np.zeros(3)
        # Collection levels: level[i] applies from counted point start[i] on.
        self.level_start = np.zeros(1, dtype=np.int64)
        self.level = np.full(1, -np.inf)
        self.fitted_at = 0  # t and z_q were last re-estimated here (counted points) ...
        self.shape_fitted_at = 0  # ... and the GPD here
        self.gpd: tuple[float, float, float] | None = None  # (t, gamma, sigma) of that fit
        # How far the scores the last estimate used ("now": scored again) stood from the stored
        # ones the fit's t is kept in: a t of the estimate less this is in the fit's space.
        self.gpd_offset = 0.0
        self.z: float | None = None  # the stream's threshold on s = -log p (None: not yet)
        self.z_far = math.inf  # the GPD's quantile at FAR_OVER_Q x q
        # (t, the share of counted scores over it, the share the GPD fit stands for: without a far
        # cluster taken out) at the last estimate: what the tail is, for ``surprised`` and
        # ``log_tail_probability``; kept by checkpoints, so a restored threshold decides as the original
        self.tail: tuple[float, float, float] | None = None
        self.fit: dict | None = None  # the last estimate, for inspection
        # Flagged points left out of the counts (after calibration), the newest FLAGGED_KEPT of
        # the window: how often the stream itself scores that low, for ``_seen_as_rare``.
        self._flagged = np.empty(0)
        self._flagged_index = np.empty(0, dtype=np.int64)

    # ---------------------------------------------------------------- the value
    @property
    def value(self) -> float | None:
        """The log-density threshold: L - z_q once fitted (L the model's typical log-density), the
        model's density quantile before."""
        if self.z is not None:
            return self.typical - self.z
        return None if self.start.value is None else self.start.value + self.start_shift

    @property
    def calibrated(self) -> bool:
        """Whether the stream's tail is trusted enough to keep alarms out of it."""
        # Counted from the history's start: after a restart (see ``_restart_history``) the tail is
        # young again, and until it has grown, flagged points count as they are, so that a z_q
        # estimated from few peaks corrects itself (censored, a z_q too low stays too low).
        return self.z is not None and self.n_counted - self.history_start >= self.calibration

    def classify(self, log_density: np.ndarray) -> np.ndarray:
        return flags_below(log_density, self.value)

    def surprised(self, log_density: np.ndarray, flags: np.ndarray) -> bool:
        """Whether these scores lie in the stream's tail (below t) far more often than the tail's
        share: the stream may be changing (a cluster appearing, a shift), not just one point."""
        if self.tail is None:
            return _many_flags(flags, self.quantile)
        t, share, _ = self.tail
        below = int(np.count_nonzero(self._score(log_density) > t))
        expected = share * len(log_density)
        return below > max(5.0, expected + SURPRISE_SD * math.sqrt(expected * (1.0 - share)))

    @property
    def tail_method(self) -> str:
        """How ``log_tail_probability`` says how rare: ``gpd_tail`` once fitted, before that
        ``empirical_rank`` (see there)."""
        return "gpd_tail" if self._fitted() else "empirical_rank"

    def _fitted(self) -> bool:
        return self.tail is not None and self.gpd is not None and self.z is not None

    def log_tail_probability(self, log_density: np.ndarray) -> np.ndarray | None:
        """log P(a point of the stream scores this low or lower) from the fitted tail (see
        ``explain.TailModel``): the share of scores beyond t times the GPD's survival function,
        with the fit's shape moved to the current t as z_q is.

        Before the first fit (the first 300 scored points), the rank among the scores seen so
        far, (at or beyond + 1) / (seen + 1): at most "1 in seen + 1", which is all those points
        can say (the model's own bound is a statement about the model, off by many orders of
        magnitude where the data's tail is heavier).  None before any score was counted."""
        log_density = -self._score(log_density)  # relative to the model's typical log-density
        if not self._fitted():
            if not self._scores or self.n_counted == 0:
                return None
            seen = np.sort(np.concatenate(self._scores))
            at_or_beyond = len(seen) - np.searchsorted(seen, -np.asarray(log_density, dtype=float), side="left")
            return np.log((at_or_beyond + 1.0) / (self.n_counted - self.history_start + 1.0))
        t, _, share = self.tail  # the share z_q was computed with: the probability at z_q is q
        gamma, sigma = self._gpd_at(t - self.gpd_offset)
        log_tail = gpd_log_tail_probability(log_density, level=-t, exceedance_rate=share, scale=sigma, shape=gamma)
        if gamma < 0:
            # A short-tailed fit ends at t + sigma/|gamma|: beyond the threshold it goes on as an
            # exponential at the rate it has at z_q, so that it agrees with q at the threshold and
            # never calls a point impossible (the fit only knows the scores it has seen).
            y_q = self.z - t
            at_z = gpd_log_tail_probability(np.array([-self.z]), level=-t, exceedance_rate=share, scale=sigma,
                                            shape=gamma)[0]
            y = -np.asarray(log_density, dtype=float) - t
            log_tail = np.where(y > y_q, at_z - (y - y_q) / (sigma + gamma * y_q), log_tail)
        return np.maximum(log_tail, self._seen_as_rare(log_density, level=t))

    def _seen_as_rare(self, log_density: np.ndarray, level: float) -> np.ndarray:
        """log(k / (n + 1)), k the counted scores of the window at or beyond each point's, n the
        window's points: a floor for the fitted tail.  Where k earlier points scored as low, the
        stream says such a point comes about k times in n, whatever a young fit extrapolates: a
        GPD fitted to the first few dozen peaks called a point 1 in 2.4e12 that one point in
        1,584 had matched (helper-37).  Flagged points left out of the counts count here, as
        points of the stream: 19,100 records in a row after a level shift each called themselves
        1 in millions, and clean streams' "1 in 1e6" came 16 times too often (helper-40).

        Beyond every score seen (excess y over the tail's ``level``, y_max the farthest seen),
        1 / (n + 1) shrinks as y_max / y: the tail of a Cauchy's scores.  The fit alone
        extrapolated from a shape the peaks cannot pin down: on clean streams, records claiming
        1 in 1e6 or more came 33 times as often as that (log-Cauchy 250x, Student t 27x;
        ``bench_rarity.py``).  A tail fit heavier than that still speaks for itself."""
        oldest = self._window_start()
        flagged = self._flagged[self._flagged_index >= oldest]
        n = self.n_counted - oldest + len(flagged)
        scores = np.concatenate([self._peaks()[0], flagged])
        if n <= 0 or not len(scores):
            return np.full(np.shape(log_density), -np.inf)
        seen = np.sort(scores)
        score = -np.asarray(log_density, dtype=float)
        # Beyond z_far "as low" is within SEEN_TOLERANCE of the excess past it: a far point's
        # score moves in proportion to its size with every change of the model, and the same
        # glitch value (a log-Cauchy's clipped at e^50, 1.1% of the rows) scored a little further
        # each time, beyond every one seen: 167 records called themselves 1 in 20,000
        # (bench_rarity.py).
        with np.errstate(invalid="ignore"):  # (an infinite score stays itself)
            reach = np.where(np.isfinite(score), score - SEEN_TOLERANCE * np.maximum(score - self.z_far, 0.0), score)
        k = len(seen) - np.searchsorted(seen, reach, side="left")
        with np.errstate(divide="ignore", invalid="ignore"):
            log_seen = np.log(k / (n + 1.0))
            y_max = seen[-1] - level
            beyond = np.log(1.0 / (n + 1.0)) - np.log((score - level) / y_max)
        return np.where((k == 0) & (y_max > 0) & (score > seen[-1]), beyond, log_seen)

    def _score(self, log_density) -> np.ndarray:
        """What the tail is fitted on: -log p(x) relative to the model's typical log-density."""
        return self.typical - np.asarray(log_density, dtype=float)

    def update(self, model: OnlineGaussianMixture) -> None:
        """Follow the model: its typical log-density, and the start value before the first fit.

        Scores are counted as -log p(x) plus the model's typical log-density (``typical_log_density``:
        about the mean log-density of its own points): a stream whose spread grows lowers every
        log-density with the model's, so the tail of absolute scores moved past z_q and the
        threshold could not follow (it keeps flagged points out): sd x4 over 50,000 points was
        flagged at 35-50 q (helper-40).  Relative to the model, the scores stay where they were."""
        if model.is_initialized:
            self.typical = model.typical_log_density()
            self._model = model
            warmup_median = getattr(model, "warmup_median_log_density_", None)
            if self.z is None and self.n_counted == 0 and warmup_median is not None:
                # Before the first fit the start value moves down by as much as the warm-up rows
                # scored below the model's own points: a prior made for few points in many
                # dimensions held the components inside the data (200-d: own mean -242, warm-up
                # median -295, start -284), and 178-184 of the first 300 normal points scored were
                # flagged (helper-49).  A model that fits scores its rows as its own: no shift.
                # From the warm-up, not the points being judged: anomalies right after it would
                # lower the start below themselves (helper-51).
                weights = model.weights_
                own_mean = self.typical + float(np.sum(weights * np.log(np.maximum(weights, 1e-300))))
                self.start_shift = min(0.0, warmup_median - own_mean)
            if self._absolute_history:
                self._shift_scores(self.typical)
                self._absolute_history = False
        if self.z is None:
            self.start.update(model)

    def points_before_refresh(self, model: OnlineGaussianMixture) -> int | None:
        """Counted points before the next re-estimate (or the start value's next refresh), so
        that a large batch is decided as small ones would be, re-estimates at the same points."""
        if self.value is None:
            return None
        left = max(self._interval() - (self.n_counted - self.fitted_at), 1)
        if self.z is None:
            start = self.start.points_before_refresh(model)
            if start is not None:
                left = min(left, start)
        return left

    def _interval(self, shape: bool = False) -> int:
        """Counted points between two estimates of t and z_q (``shape``: of the GPD).

        The first as soon as there can be MIN_PEAKS peaks; then, while the stream is young,
        whenever it has grown by a quarter; then t and z_q every window/10 points (a partial
        sort of the peaks) and the GPD every window/2, at least every 20k points (a fit: about
        a millisecond).
        """
        first = math.ceil(MIN_PEAKS / max(self.tail_fraction, START_TAIL_FRACTION))
        cap = max(20_000, self.window // 2) if shape else self.window // 10
        return int(min(max(first, (self.n_counted - self.history_start) // 4), max(first, cap)))

    def marginal_flags(self, log_density: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """The flagged points at most MARGINAL_MEAN_EXCESSES of the fitted tail's mean excesses
        past z_q: what a z_q a little too low flags; anomalies beyond doubt lie further out.  None on
        a tail of infinite variance (shape >= 1/2), whose far points are its own and whose mean
        excess says little of where "just past" ends (a log-Cauchy's fit, shape 4.8, put every
        flagged point within reach).  The detector learns these when it flags far more than q
        (see ``Detector._flag_learn``)."""
        none = np.zeros(len(flags), dtype=bool)
        if self.z is None or self.tail is None or self.gpd is None:
            return none
        gamma, sigma = self._gpd_at(self.tail[0] - self.gpd_offset)
        if gamma >= 0.5:
            return none
        reach = min(self.z_far, self.z + MARGINAL_MEAN_EXCESSES * sigma / (1.0 - gamma))
        return flags & (self._score(log_density) <= reach)

    # -------------------------------------------------------------- the scores
    def observe(self, log_density: np.ndarray, flags: np.ndarray, count_flagged: bool | np.ndarray = False,
                points: np.ndarray | None = None) -> None:
        """Count one scored batch: its prequential log-densities and which were flagged.

        ``count_flagged``: the flagged points count as the others (True: the detector is adopting
        a new regime: its scores are the stream's from now on, which the tail must take in), or
        those of them where this mask is set, up to z_far (while flags just past z_q come too
        often: a threshold a little too low, see ``Detector._flag_learn``).
        ``points``: the batch's rows (as given to the model); those of the stored peaks are kept
        and scored again under the model of each re-estimate (see ``_scored_now``)."""
        score = self._score(log_density)
        counted = np.isfinite(score)
        alarms = None  # flagged points that count, censored at the threshold
        in_full = np.asarray(count_flagged, dtype=bool) & flags if np.ndim(count_flagged) else None
        if in_full is not None:
            # The detector passes every flagged point while flags just past z_q come too often
            # (z_q is too low): those the tail may count (up to z_far) count in full, not only
            # those the model learns: a tail that comes in a block of time (an hour-of-day
            # feature's last hour, where the model fits worst: 40-60 q flagged there, day after
            # day) was flagged past the tokens' 3 q and the tail, truncated, held z_q down: 2.6 q
            # over a week at q = 0.001 (helper-62).
            in_full &= score <= self.z_far
        if in_full is None and count_flagged:
            pass  # the flagged are a regime: every scored point counts
        elif not self.calibrated:
            # The start is not trusted: every scored point counts, but, young again after a
            # restart (see ``_restart_history``), not a flagged one RESTART_FAR_NATS beyond the
            # last fit's z_far: a burst 20 sd out, 2,000 points after a restart, was 3/4 of the
            # young tail's peaks, more than a far cluster may be, and stretched the fit to -727
            # nats: 45-78% of it went unflagged and was learned (helper-61, 5 of 10 seeds at
            # q = 0.01).  (Beyond z_far alone, the ones of Poisson(0.05) counts, flagged 3.6 nats
            # past the zeros' narrow tail, were kept out of the calibration meant to take them
            # in: 27 q at q = 0.001.)  From a cold start, once there is a fit, such points count
            # only as the token bucket allows (below: filled here by every point counted, flagged
            # ones near z_q too), censored at z_q: a tight burst of 1,000 points 6 sd out in every
            # one of 4 features, 4,000 points after the warm-up, made the whole tail, the fit put
            # z_q past it (-84 nats against -10.5), and the next burst was learned (q = 0.01);
            # the far values of a heavy tail come rarely enough to pass.  (Not before the first
            # fit, 300 points in: a burst from the warm-up's end is the young tail; nor a burst
            # nearer than z_far + RESTART_FAR_NATS: both still fail, see BENCHMARKS.md.)
            if flags.any() and self.z is not None:
                far = flags & (score > self.z_far + RESTART_FAR_NATS)
                counted &= ~far
                if self.history_start == 0 and far.any():
                    flagged = np.flatnonzero(far)
                    alarms = flagged[self._spend_tokens(counted, flagged)]
                    counted[alarms] = True
        elif flags.any():
            alarm = flags if in_full is None else flags & ~in_full
            flagged = np.flatnonzero(counted & alarm)
            counted &= ~alarm
            # Beyond z_far a point says nothing about where z_q should be: it is an anomaly.
            flagged = flagged[score[flagged] <= self.z_far]
            if len(flagged):
                alarms = flagged[self._spend_tokens(counted, flagged)]
                counted[alarms] = True
            else:
                self._fill_tokens(np.count_nonzero(counted))
        else:
            self._fill_tokens(np.count_nonzero(counted))
        self._keep_flagged(score, flags & ~counted & np.isfinite(score), counted)
        self._race(score[counted])
        n = int(np.count_nonzero(counted))
        if n == 0:
            return
        kept = np.flatnonzero(counted & (score > self.level[-1]))
        if len(kept):
            position = kept if n == len(score) else np.cumsum(counted)[kept] - 1
            self._scores.append(score[kept])
            censor = np.full(len(kept), np.nan)
            if alarms is not None:
                censor[np.isin(kept, alarms)] = self.z
            self._censor.append(censor)
            self._index.append(self.n_counted + position.astype(np.int64))
            if points is not None:
                self._point_rows.append(np.asarray(points, dtype=float)[kept])
                self._point_index.append(self._index[-1])
        self.n_counted += n
        if self.n_counted - self.fitted_at >= self._interval():
            self.refit()

    def _keep_flagged(self, score: np.ndarray, left_out: np.ndarray, counted: np.ndarray) -> None:
        if not left_out.any():
            return
        position = self.n_counted + (np.cumsum(counted) - counted)[left_out]  # the counted point each precedes
        self._flagged = np.concatenate([self._flagged, score[left_out]])[-FLAGGED_KEPT:]
        self._flagged_index = np.concatenate([self._flagged_index, position.astype(np.int64)])[-FLAGGED_KEPT:]

    def _fill_tokens(self, n_unflagged: int) -> None:
        self.tokens = min(TOKEN_BUCKET, self.tokens + TOKEN_RATE_OVER_Q * self.quantile * n_unflagged)

    def _spend_tokens(self, counted: np.ndarray, flagged: np.ndarray) -> np.ndarray:
        """Which of the flagged points (positions into ``flagged``) are counted, as a token
        bucket filled by the unflagged points before each decides."""
        rate = TOKEN_RATE_OVER_Q * self.quantile
        unflagged_before = np.cumsum(counted)[flagged]
        gaps = np.diff(unflagged_before, prepend=0)
        tokens = self.tokens
        taken = np.zeros(len(flagged), dtype=bool)
        for j, gap in enumerate(gaps.tolist()):
            tokens = min(TOKEN_BUCKET, tokens + rate * gap)
            if tokens >= 1.0:
                tokens -= 1.0
                taken[j] = True
        after_last = np.count_nonzero(counted) - int(unflagged_before[-1])
        self.tokens = min(TOKEN_BUCKET, tokens + rate * after_last)
        return taken

    # ------------------------------------------------------------------ the fit
    def refit(self) -> None:
        """Re-estimate t, the GPD and z_q from the peaks in the window."""
        self.fitted_at = self.n_counted
        self._settle_race()
        then_scores, then_censor, index = self._peaks()
        now = self._scored_now(then_scores, then_censor, index)
        use_now = now is not None and self._now_leads()
        scores, censor, moved = now if use_now else (then_scores, then_censor, 0.0)
        oldest = self._window_start()
        n = self.n_counted - oldest
        if n <= 0:
            return  # nothing counted since the history started
        in_force = np.searchsorted(self.level_start, oldest, side="right") - 1
        floor = float(self.level[max(in_force, 0):].max()) + moved
        # While the stream is young, a deeper tail: at least MIN_PEAKS peaks.
        share = max(TAIL_OVER_Q * self.quantile, min(self.tail_fraction, TAIL_PEAKS / n))
        above = int(math.ceil(max(share, min(START_TAIL_FRACTION, MIN_PEAKS / n)) * n))
        twice = 2 * above
        # t: the score with `above` counted scores over it; collect from twice the tail's share
        # next time (lower if there were too few stored).
        kth = [k for k in (above, twice) if k < len(scores)]
        top, t = _top_and_level(scores, kth, above, floor)
        collect = float(top[twice]) if len(top) > twice else None
        stale_since = self._stale_since(scores, index, t, oldest)
        if stale_since is not None:
            t_then = t if scores is then_scores else _level_over(then_scores, above, floor - moved)
            if not self._still_unusual(then_scores, index, t_then, stale_since):
                heavy = self.gpd is not None and self.gpd[1] >= 0.5  # (its far scores are its own)
                rescored = None if heavy else self._rescored(then_scores, then_censor, index)
                if rescored is None:
                    self._restart_history()
                    return
                now_scores, now_censor, now_moved = rescored
                # Each collection level moved as the peaks it collected: a level of 229 nats, set
                # while a regime's first points filled the tail, held t over every peak scored
                # again.  One that collected none moves by the median move: where it then holds t
                # over too few peaks, nothing says where it lies now, and the history restarts.
                now_level = self._levels_moved(now_scores - then_scores, index, now_moved)
                now_floor = float(now_level[max(in_force, 0):].max())
                now_top, now_t = _top_and_level(now_scores, kth, above, now_floor)
                if (np.count_nonzero(now_scores > now_t) < min(above, MIN_PEAKS)
                        or self._stale_since(now_scores, index, now_t, oldest) is not None):
                    self._restart_history()
                    return
                # The history as the current model scores it, for good: what the rest of this
                # estimate calls the scores as they were, with no other way to race them.
                self._scores, self._censor, self.level = [now_scores], [now_censor], now_level
                self._flagged = self._flagged + now_moved
                if self.gpd is not None:
                    self.gpd = (self.gpd[0] + now_moved, *self.gpd[1:])
                self.race_z, self.race_record, self.race_pending = None, (0.0, 0.0, 0.0), np.zeros(3)
                then_scores, then_censor, now, use_now = now_scores, now_censor, None, False
                scores, censor, moved, top, t = now_scores, now_censor, 0.0, now_top, now_t
                collect = float(top[twice]) if len(top) > twice else None
        tail = scores > t
        in_tail = tail.copy()  # the peaks the tail's count holds
        is_censored = np.isfinite(censor) & tail
        excess = scores[tail & ~is_censored] - t
        censored = np.maximum(censor[is_censored] - t, 0.0)
        n_tail = len(excess) + len(censored)
        # An alarm counted as censored is known to be past z_q, and its own score says how far: a
        # far cluster is found, and left out, by where its points are (alarms counted with
        # tokens, 3 q of a steady 0.5% of anomalies, pushed z_q up round after round).
        alarm_excess = scores[is_censored] - t
        far = self._beyond_the_bulk(np.concatenate([excess, alarm_excess]), level=t)
        if far is not None:
            n_far = int(np.count_nonzero(excess > far) + np.count_nonzero(alarm_excess > far))
            excess, censored = excess[excess <= far], censored[alarm_excess <= far]
            expected = FAR_CLUSTER_OVER_Q * self.quantile * n  # the most a tail's own far cluster holds
            # How often the stream comes that far is told by every point that did: with the
            # alarms left out of the counts (the tokens let 3 q of them in, under the bar).
            left_out = self._flagged[self._flagged_index >= oldest] + moved
            came_that_far = n_far + int(np.count_nonzero(left_out - t > far))
            if n_far >= 3 and came_that_far > expected + 3.0 * math.sqrt(expected):
                # Anomalies, not tail: out of the counts, and out of the stored peaks for good
                # (as the window grows their share would fall under the bar and bring them back).
                n_tail -= n_far
                keep = ~(scores - t > far)
                in_tail &= keep
                self._scores, self._censor, self._index = [then_scores[keep]], [then_censor[keep]], [index[keep]]
                self._rows_stale = True  # (rows of the peaks taken out go at the next _peaks)
                # Still points of the stream that scored that low, for the rarity of later ones
                # (see _seen_as_rare), as flagged points left out of the counts are: counted in
                # the tail while a regime was adopted and then taken out here, they were in
                # neither, and on a log-Cauchy stream records claiming 1 in 1e6 came 187 times
                # for 0.3 expected.
                order = np.argsort(np.concatenate([self._flagged_index, index[~keep]]), kind="stable")
                self._flagged = np.concatenate([self._flagged, scores[~keep]])[order][-FLAGGED_KEPT:]
                self._flagged_index = np.concatenate([self._flagged_index, index[~keep]])[order][-FLAGGED_KEPT:]
            else:
                # The tail's own rare far points: counted as beyond the gap, but their size
                # does not stretch the fit (a few far peaks made the shape explode).
                censored = np.concatenate([censored, np.full(n_far, far)])
        if len(excess) >= MIN_PEAKS and n * self.quantile < n_tail:
            # The last fit is moved to a new t by its shape (see _gpd_at), not so far down that
            # the scale would go under a tenth, where the move says nothing: the peaks, scored
            # again, fell 4.6 nats under the fitted level, the scale moved down with them was
            # clipped, and z_q sat 0.3 nats past the typical score (474 of 1,000 points flagged at
            # q = 0.01; helper-70).  Fitted again there.  (A first version refitted whenever t
            # fell a scale below the fit: a sine's values at q = 0.001 went 2.63 -> 4.22 q.)
            # (t less ``moved`` is in the space of the stored scores, where the fit's t is kept: the
            # two compared across spaces read the peaks' 4.06-nat move as a move of t; helper-71.)
            below_the_fit = self.gpd is not None and self._gpd_scale_at(t - moved) < GPD_SCALE_FLOOR * self.gpd[2]
            if (self.gpd is None or below_the_fit
                    or self.n_counted - self.shape_fitted_at >= self._interval(shape=True)):
                share = min(1.0, FIT_PEAKS / n_tail)
                gamma, sigma = fit_gpd(_thin(excess, max(MIN_PEAKS, round(share * len(excess)))),
                                       _thin(censored, round(share * len(censored))))
                if gamma < 0.0 and self.n_counted - self.history_start < self.calibration:
                    # Young: a tail that ends is not trusted past the scores seen. A short-tailed
                    # fit to the first few dozen peaks ends near the highest of them, and z_q sat
                    # there: at q = 1e-4, 7 flags in the next 300 points, events of 1 in 100
                    # (helper-40). The exponential (shape 0, its maximum-likelihood scale) goes on
                    # past them, as a -log-density's tail does for Gaussian and heavier data.
                    gamma, sigma = 0.0, float((excess.sum() + censored.sum()) / len(excess))
                if use_now:
                    # Scored again by one model, a tail that ends at a cliff (a sine's values: its
                    # lowest 5% within 0.08 nats) narrows to a few ten-thousandths of a nat, below
                    # how much scores move from one model to the next: z_q sat there and new points,
                    # scored by the next models, were flagged at 4.6 q.  No narrower than that move.
                    sigma = max(sigma, self.jitter)
                self.gpd = (t - moved, gamma, sigma)
                self.shape_fitted_at = self.n_counted
            else:
                gamma, sigma = self._gpd_at(t - moved)
            fitted_z = t + gpd_excess_quantile(gamma, sigma, self.quantile * n / n_tail)
            # (Flagged points left out that came as far, not beyond the last fit's z_far: those
            # are anomalies, and a dozen glitches 400 nats out carried z_q 200 nats up; review.)
            left_out = self._flagged[self._flagged_index >= oldest] + moved
            self.z, far_floor = self._clear_of_a_value(self._held_to_the_window(fitted_z, scores[in_tail], n),
                                                       scores[in_tail], left_out[left_out <= self.z_far], n)
            tail_share = n_tail / n
            if self.z < fitted_z:
                # The fitted shape, scaled to agree with the window at z_q: a point's rarity there
                # reads q, as the flag it gets says (the tail's share alone read more than q).
                at_z = gpd_log_tail_probability(np.array([t - self.z]), level=0.0, exceedance_rate=1.0,
                                                scale=sigma, shape=gamma)[0]  # log P(excess > z - t)
                tail_share = self.quantile / math.exp(at_z)
            self.z_far = t + gpd_excess_quantile(gamma, sigma, FAR_OVER_Q * self.quantile * n / n_tail)
            if gamma < 1.0:  # (the mean excess sigma / (1 - gamma) is finite)
                self.z_far = max(self.z_far, self.z + FAR_MEAN_EXCESSES * sigma / (1.0 - gamma))
            if far_floor is not None:  # (z_q moved into a gap: see _clear_of_a_value)
                self.z_far = max(self.z_far, far_floor)
            self.tail = (t, above / n, tail_share)
            self.gpd_offset = moved
            self.fit = {"t": t, "tail_share": above / n, "gamma": gamma, "sigma": sigma, "n": n, "n_tail": n_tail,
                        "n_censored": len(censored), "scores": "now" if use_now else "then",
                        "held_to_the_window": self.z < fitted_z}
            if now is None:
                self.race_z = None
            else:
                other = _at_the_same_rank(self.z, scores, then_scores if use_now else now[0])
                self.race_z = (other, self.z) if use_now else (self.z, other)
            if collect is None:
                collect = t - sigma * math.log(2.0)
        elif collect is None:
            self._restart_history()
            return
        # (The new level is in the space of the points to come, scored by the current model, as
        # the peaks it was read from are when they are the scores now.)
        if collect is not None and collect != self.level[-1]:
            self.level_start = np.append(self.level_start, self.n_counted)
            self.level = np.append(self.level, collect)

    def _scored_now(self, scores: np.ndarray, censor: np.ndarray, index: np.ndarray):
        """The stored peaks as the model now scores them (scores, censoring levels, and the median
        move, for the collection levels: the points not stored moved too), or None.

        A model still learning moves its scores for tens of thousands of points, more in its
        tail than in its bulk, and the scores as they were lag it: a uniform disk's edge scores
        fell for 50,000 points, and 0.04 q was flagged at q = 0.001 (the window scored again by
        the current model: 0.84-1.24 q).  Which of the two the threshold uses is decided by their
        record on the stream's next points (see ``_now_leads``): under a drift the model lags
        the stream, and old points scored again look more usual than new ones will (1.5-1.9 q
        on drifting means).  Each peak moves by its own move, within the middle 80% of the
        moves of its block (the span between two re-estimates); peaks beyond z_far by the
        block's median: a far point's score moves in proportion to its size with every change of
        the model (a log-Cauchy's reached 1e26), and a far peak the model learned moves on its
        own.  None while the tail is young or of infinite variance (shape >= 1/2: its far scores
        are its own), or without rows.  (The cost: see ``_rows_kept``.)"""
        if (self._model is None or not self._point_index or not self.calibrated or self.gpd is None
                or self.gpd[1] >= 0.5):
            return None
        rows, row_index = np.concatenate(self._point_rows), np.concatenate(self._point_index)
        if not len(rows):
            return None
        position = np.searchsorted(index, row_index)  # (rows are kept for stored peaks only: _peaks)
        moved = (self.typical - self._model.score_batch(rows).log_density) - scores[position]
        ok = np.isfinite(moved)
        if not ok.any():
            return None
        position, moved = position[ok], moved[ok]
        block_of = index // max(self._interval(), 1)
        near = scores[position] <= self.z_far
        # Every stored peak moves: by its own move if its row was kept and rescored, else by its
        # block's median (or the median of all, in a block with none rescored).  Per block, the
        # 10%, 50% and 90% points of the moves of its near peaks (of all its peaks, if none is
        # near), from one sort: a loop of quantiles per block cost a third of the detector's time.
        row_block = block_of[position]
        reference = near | ~np.isin(row_block, row_block[near])
        order = np.lexsort((moved[reference], row_block[reference]))
        sorted_block, sorted_moved = row_block[reference][order], moved[reference][order]
        starts = np.flatnonzero(np.r_[True, sorted_block[1:] != sorted_block[:-1]])
        sizes = np.diff(np.r_[starts, len(sorted_block)])
        low, middle, high = (sorted_moved[starts + np.floor(f * (sizes - 1)).astype(np.int64)] for f in (0.1, 0.5, 0.9))
        blocks = sorted_block[starts]
        shift = np.full(len(scores), float(np.median(moved)))
        which = np.searchsorted(blocks, block_of)
        has = (which < len(blocks)) & (blocks[np.minimum(which, len(blocks) - 1)] == block_of)
        shift[has] = middle[which[has]]
        mine = np.searchsorted(blocks, row_block)
        middles = middle[mine]
        clipped = np.where(near, np.clip(moved, low[mine], high[mine]), middles)
        shift[position] = clipped
        now_scores, now_censor = scores + shift, censor + shift  # (NaN, not censored, stays NaN)
        # How much a score moves from one model to another beyond its block's drift (a robust
        # standard deviation): what the scores of new points will move by too.
        self.jitter = 1.4826 * float(np.median(np.abs(clipped - middles)))
        return now_scores, now_censor, float(np.median(shift))

    def _race(self, score: np.ndarray) -> None:
        """Count, for the z_q of each way of scoring the peaks, how many of these scores (as scored)
        lie beyond it: the record ``_now_leads`` reads.  Only the points the tail counts (flagged
        ones with a token, see ``observe``: a cluster just past z_q counted in full made the record
        lean to the higher z_q), and none beyond z_far (anomalies)."""
        if self.race_z is None:
            return
        score = score[np.isfinite(score) & (score <= self.z_far)]
        self.race_pending += (len(score), int(np.count_nonzero(score > self.race_z[0])),
                              int(np.count_nonzero(score > self.race_z[1])))

    def _settle_race(self) -> None:
        """Add the points counted since the last re-estimate to the record, with the older record
        halved every RACE_HALF_LIFE_OVER_WINDOW x window points."""
        points, beyond_then, beyond_now = self.race_pending
        self.race_pending = np.zeros(3)
        if points == 0:
            return
        decay = 0.5 ** (points / max(RACE_HALF_LIFE_OVER_WINDOW * self.window, 1.0))
        expected, then, now = self.race_record
        self.race_record = (decay * expected + self.quantile * points, decay * then + beyond_then,
                            decay * now + beyond_now)

    def _now_leads(self) -> bool:
        """Whether the peaks as the model now scores them have put z_q where the share beyond
        it came closer to q than the peaks as they were (on the record of the points since)."""
        expected, then, now = self.race_record
        off = [abs(math.log((beyond + 1.0) / (expected + 1.0))) for beyond in (then, now)]
        return off[1] < off[0]

    def _prune_rows(self, scores: np.ndarray, index: np.ndarray) -> None:
        """Keep the rows of stored peaks only, and of at most ``_rows_kept`` of them: the highest
        scores (the others move by their block's median move when scored again).  At q = 1e-4 a
        window's peaks are 2,000 and more (5,500 while it fills), and with 64 features their rows
        made a checkpoint of 3.4 MB, past a state topic's 1 MB messages (helper-55)."""
        self._rows_stale = False
        if not self._point_index:
            return
        rows, row_index = np.concatenate(self._point_rows), np.concatenate(self._point_index)
        live = np.isin(row_index, index, assume_unique=True)
        rows, row_index = rows[live], row_index[live]
        budget = self._rows_kept(rows.shape[1])
        if len(row_index) > budget:
            own_score = scores[np.searchsorted(index, row_index)]
            top = np.sort(np.argpartition(-own_score, budget - 1)[:budget])
            rows, row_index = rows[top], row_index[top]
        self._point_rows, self._point_index = [rows], [row_index]

    @staticmethod
    def _rows_kept(n_features: int) -> int:
        """How many peaks' rows are kept: ROWS_KEPT, fewer with many features (ROW_VALUES_KEPT
        values in all, 200 KB), at least MIN_ROWS_KEPT.  Scoring them again at each re-estimate
        costs 500 more scored rows every window/10 points (a few percent of the detector's time;
        300 rows were no cheaper to measure, and calibrated a little worse)."""
        return int(max(MIN_ROWS_KEPT, min(ROWS_KEPT, ROW_VALUES_KEPT // max(n_features, 1))))

    def _rows_state(self, index: np.ndarray) -> dict:
        """The rows of the stored peaks, for a checkpoint (none if no rows were ever given)."""
        if not self._point_index:
            return {}
        rows, row_index = np.concatenate(self._point_rows), np.concatenate(self._point_index)
        return {"peak_rows": rows.copy(), "peak_row_index": row_index.copy()}

    def _held_to_the_window(self, z: float, tail_scores: np.ndarray, n: int) -> float:
        """``z`` (the fitted tail's), or the window's own (1 - q) quantile where the window holds
        enough scores beyond it to say so and far fewer lie beyond z than the q n expected
        (Poisson, below EMPIRICAL_P: at q n = 20, 9 or fewer).  The fit stands
        for where the data are too few (q n under EMPIRICAL_MIN_EXPECTED; an extrapolation is
        what it is for), not against them: an exponential's scores (1-d, q = 0.01) were fitted a
        shape of 1.3-1.9 from the top 10%, and z sat where half of q was flagged.  Censored
        peaks count by their own scores (only how many lie beyond z matters)."""
        expected = self.quantile * n
        if expected < EMPIRICAL_MIN_EXPECTED or not len(tail_scores):
            return z
        beyond = int(np.count_nonzero(tail_scores > z))
        if pdtr(beyond, expected) >= EMPIRICAL_P:
            return z
        m = int(round(expected))
        if m >= len(tail_scores):
            return z  # (the tail holds fewer than q n: the fit's z is past all of it anyway)
        return float(-np.partition(-tail_scores, m)[m])

    def _clear_of_a_value(self, z: float, tail_scores: np.ndarray, left_out: np.ndarray,
                          n: int) -> tuple[float, float | None]:
        """``z``, or the middle of the gap after a crowd of scores it sits on or just past, where
        the crowd holds more than the q n points a threshold may flag and at least half of q n
        lie beyond the gap.

        The scores of one value of the data (a count's ones, 4.75% of Poisson(0.05) counts) crowd
        within a few hundredths of a nat, moved only by the model's learning, and the next value
        (the twos, 0.12%) lies nats away.  A z_q among them or just past them, where a fit to the
        crowd and the few beyond puts it, flags some of the crowd and not the rest by that drift
        alone, and once they are flagged and left out the tail looks lighter, restarts, and puts
        z_q there again: 5.9-6.8 q at q = 0.001, identical counts flagged or not by the hundred
        (BENCHMARKS.md, twelfth session).  In the gap the crowd is never flagged and what lies
        beyond always is.  The crowd: the scores within VALUE_NATS (and 1/BULK_GAP_OVER_MEDIAN of
        the gap's length) below it (a continuous tail has a point or two there; a value, all of
        its points).  The move is only ever up, and leaves at least half of q n beyond: flagged
        can fall, to no less than q/2 of the window, never rise.  Beyond the gap count the
        flagged points left out of the tail (``left_out``) too: they came that far (the twos,
        flagged, were mostly not counted)."""
        scores = np.concatenate([tail_scores, left_out])
        # (A crowd lies within VALUE_NATS above z or below it, or up to CLEAR_NATS below: a count
        # without a sort says most fits have none.)
        if np.count_nonzero((scores >= z - CLEAR_NATS) & (scores <= z + VALUE_NATS)) <= self.quantile * n:
            return z, None
        ordered = np.sort(scores)
        first = int(np.searchsorted(ordered, z, side="right")) - 1  # the last score at or below z
        if first < 0 or first >= len(ordered) - 1:
            return z, None
        gaps = np.diff(ordered[first:])
        beyond = len(ordered) - 1 - np.arange(first, len(ordered) - 1)
        gaps[beyond < max(1.0, self.quantile * n / 2.0)] = 0.0
        i = first + int(np.argmax(gaps))
        start, gap = float(ordered[i]), float(gaps[i - first])
        width = min(gap / BULK_GAP_OVER_MEDIAN, VALUE_NATS)
        if gap <= 0.0 or z < start - width or z > start + CLEAR_NATS:
            return z, None  # (scores between z and the gap that are not one crowd: a tail, flagged as fitted)
        crowd = i + 1 - int(np.searchsorted(ordered, start - width, side="left"))
        if crowd <= self.quantile * n:
            return z, None
        # The points just beyond the gap are the tail's own (at least q n / 2 of them), not beyond
        # z_far: counted, they keep the gap in the window (left out, it emptied of them).
        return max(z, start + gap / 2.0), start + 2.0 * gap

    def _stale_since(self, scores: np.ndarray, index: np.ndarray, t: float, oldest: int) -> int | None:
        """Where the span begins (a count of scored points) over which the window's tail no
        longer describes the stream, or None: over the last re-estimate's span (longer where
        few peaks are expected), far fewer scores came above t than the window's own rate says
        (a quarter, with at least STALE_MIN_EXPECTED expected, so chance alone does not:
        Poisson(40) <= 10 is 2e-9).
        A change the model has since learned (a new regime during calibration: its first
        scores filled the tail) would otherwise hold t and z_q far above every later score for a
        whole window, and nothing would be flagged (BENCHMARKS.md, Calibration, third session)."""
        # Against the window's own rate over t, not the tail's nominal share: scores tied at t (a
        # stream of repeated values) are not over it, anywhere in the window.
        above = scores > t
        rate = np.count_nonzero(above) / max(self.n_counted - oldest, 1)
        # At least STALE_NONE_EXPECTED of them expected in the span looked at, and none there,
        # is as telling (Poisson(25) = 0: 1e-11): at q = 0.001 the tail's 2% of a re-estimate's
        # 2,000 points is 40 at most, the check below never ran, and 100 points of a normal
        # regime first seen during calibration held z_q at 450 nats for 20,000 points (helper-50).
        span = max(self._interval(), math.ceil(STALE_NONE_EXPECTED / rate) if rate > 0 else 0)
        start = self.n_counted - span
        if start <= oldest:
            return None  # the window is all recent: no older tail to be stale
        expected = rate * span
        recent = int(np.count_nonzero(above & (index >= start)))
        if recent == 0 and expected >= STALE_NONE_EXPECTED:
            return start
        return start if expected >= STALE_MIN_EXPECTED and recent < expected / STALE_RATIO else None

    def _still_unusual(self, then_scores: np.ndarray, index: np.ndarray, t_then: float, start: int) -> bool:
        """Whether the peaks over ``t_then`` before ``start`` (the span ``_stale_since`` judged;
        ``then_scores``: the peaks as they were scored, ``t_then`` read from them), scored again
        by the current model, mostly still lie over it (moved as the span's peaks moved): the
        model has not learned them, so a span with few peaks is a quiet spell of the stream,
        not a stale tail.  A daily cycle (load peaking in the afternoon) put the evening's few
        peaks under a quarter of the window's rate, the tail was let go every evening, and the
        next day's peak was judged against the night's scores: 8-10 q flagged at q = 0.001
        (helper-59).  Without rows to score again, False (the rate alone decides, as before);
        nor while the span flagged far more than q beyond the alarms the tail counts
        (STALE_FLAGGED_OVER_Q, and over STALE_FLAGGED_MIN: a few anomalies in a quiet evening are
        not that): then the threshold is too low, and calibrating again is what mends it (the
        ones of Poisson(0.05) counts, 4.75% of the points, were 60-80% flagged at q = 0.001,
        29 q, when the tail was kept because they are still unusual)."""
        if self._model is None or not self._point_index:
            return False
        span = self.n_counted - start
        left_out = np.count_nonzero(self._flagged_index >= start)
        if left_out > max(STALE_FLAGGED_OVER_Q * self.quantile * span, STALE_FLAGGED_MIN):
            return False
        rows, row_index, position = self._rows_of_peaks(index)
        if not len(rows):
            return False
        then = then_scores[position]
        old = (row_index < start) & (then > t_then)
        if np.count_nonzero(old) < STALE_MIN_ROWS:
            return False
        recent = row_index >= start
        look = old | recent
        now = self.typical - self._model.score_batch(rows[look]).log_density
        moved = now - then[look]
        drift = float(np.median(moved[recent[look]])) if recent.any() else 0.0
        still = now[old[look]] > t_then + drift
        return bool(np.count_nonzero(still) >= 0.5 * np.count_nonzero(old))

    def _rows_of_peaks(self, index: np.ndarray):
        """The kept rows whose peaks are in ``index`` (the stored peaks' counts), with their
        counts and their positions in ``index``."""
        rows, row_index = np.concatenate(self._point_rows), np.concatenate(self._point_index)
        position = np.searchsorted(index, row_index)
        known = (position < len(index)) & (index[np.minimum(position, len(index) - 1)] == row_index)
        return rows[known], row_index[known], position[known]

    def _rescored(self, scores: np.ndarray, censor: np.ndarray, index: np.ndarray):
        """The stored peaks scored again by the current model (those without a row, or beyond
        z_far, by the median move), or None without rows: (scores, censoring levels, median
        move)."""
        if self._model is None or not self._point_index:
            return None
        rows, _, position = self._rows_of_peaks(index)
        if not len(rows):
            return None
        moved = (self.typical - self._model.score_batch(rows).log_density) - scores[position]
        ok = np.isfinite(moved)
        if not ok.any():
            return None
        median = float(np.median(moved[ok]))
        shift = np.full(len(scores), median)
        # (Beyond z_far by the median move, as in _scored_now: a far point's score moves in
        # proportion to its size with every change of the model.)
        own = ok & (scores[position] <= self.z_far)
        shift[position[own]] = moved[own]
        return scores + shift, censor + shift, median

    def _levels_moved(self, shift: np.ndarray, index: np.ndarray, median: float) -> np.ndarray:
        """Each collection level moved by the median move of the peaks collected under it (the
        median of all where it collected none)."""
        bounds = np.append(self.level_start[1:], np.iinfo(np.int64).max)
        moved = np.full(len(self.level), median)
        for j, (start, stop) in enumerate(zip(self.level_start.tolist(), bounds.tolist())):
            mine = shift[(index >= start) & (index < stop)]
            if len(mine):
                moved[j] = float(np.median(mine))
        return self.level + moved

    def _restart_history(self) -> None:
        """Too few peaks even to place t: the scores have moved below the collection level (the
        tail got lighter, or a young model's scores fell) and the stored peaks are another
        stream's.  The history starts again from here, collecting every score, and the next
        estimates come as on a young stream (the first after 300 points); z_q stays until then.
        Without this the threshold stayed where it was for good and flagged nothing.  So does the
        last GPD fit, for the rarity of flagged points until the next (the model bound, the
        only other answer, says how rare under the model, not in the stream); the next estimate
        fits the shape anew (it is the first since this restart)."""
        self.history_start = self.n_counted
        self._scores, self._censor, self._index = [], [], []
        self._point_rows, self._point_index = [], []
        self.level_start = np.full(1, self.n_counted, dtype=np.int64)
        self.level = np.full(1, -np.inf)
        self.shape_fitted_at = min(self.shape_fitted_at, self.history_start - 10**9)  # refit at the next estimate

    def _shift_scores(self, by: float) -> None:
        """Move every stored score and level by ``by`` (a history of absolute -log p scores made
        relative to the model's typical log-density)."""
        scores, censor, index = self._peaks()
        self._scores, self._censor, self._flagged = [scores + by], [censor + by], self._flagged + by
        self.level = self.level + by
        self.z = None if self.z is None else self.z + by
        self.z_far += by
        self.tail = None if self.tail is None else (self.tail[0] + by, *self.tail[1:])
        self.race_z = None if self.race_z is None else (self.race_z[0] + by, self.race_z[1] + by)
        self.gpd = None if self.gpd is None else (self.gpd[0] + by, *self.gpd[1:])

    def _gpd_scale_at(self, t: float) -> float:
        """The last GPD fit's scale moved to ``t``: excesses over a GPD's threshold moved by d
        are GPD(gamma, sigma + gamma d).  (Negative where the move says nothing.)"""
        fitted_t, gamma, fitted_sigma = self.gpd
        return fitted_sigma + gamma * (t - fitted_t)

    def _gpd_at(self, t: float) -> tuple[float, float]:
        """(shape, scale) of the last GPD fit for excesses over ``t`` (the scale moved, see
        ``_gpd_scale_at``, kept above GPD_SCALE_FLOOR of the fitted one)."""
        return self.gpd[1], max(self._gpd_scale_at(t), GPD_SCALE_FLOOR * self.gpd[2])

    def _beyond_the_bulk(self, excess: np.ndarray, level: float = 0.0) -> float | None:
        """The excess beyond which the peaks are a separate far cluster, or None.

        Far: beyond a jump between consecutive excesses of more than BULK_GAP_OVER_MEDIAN times
        the median excess, in the upper half of the peaks (so the cluster is under half the tail
        and the median is the bulk's).  A fitted tail cannot be trusted to say this: the cluster
        itself stretches any fit that includes it.  A heavy tail's top spacings rarely reach it,
        and then only its top few peaks leave the fit.  Or beyond a gap no decreasing density
        leaves (``_gap_after_the_bulk``) where the model scores that far (``level`` + excess, ``level``
        the tail's t) less often than q.
        """
        if len(excess) < 10:
            return None
        ordered = np.sort(excess)
        half = len(ordered) // 2
        median = float(ordered[half])
        if median <= 0.0:
            return None
        jumps = np.flatnonzero(np.diff(ordered[half:]) > BULK_GAP_OVER_MEDIAN * median)
        if len(jumps):
            far = float(ordered[half + jumps[0]])  # the first: the bulk's end
            # A bulk narrower than ATOM_NATS is one value, not a tail, and its jump says nothing:
            # counts of Poisson(0.05) (95% zeros) drift a few thousandths of a nat in score as the
            # model learns, the ones (4.75%) 3.6 nats past them were taken out as anomalies, and
            # z_q, read from the zeros alone, sat among them: every point flagged for 20,000 rows
            # (helper-59).  Past such a bulk, the gap rule with the model's word decides.
            if far - ordered[0] >= ATOM_NATS:
                return far
        gap = _gap_after_the_bulk(ordered)
        if gap is None or self._model is None:
            return None
        # A mode of the data the model has a component for scores as far, as often as its
        # weight: a feature non-zero in 1% of the rows (log-normal bytes of errors) put its rows
        # past such a gap, and, taken out, they were all flagged (5.8 q at q = 0.001).  Points
        # beyond the gap are a far cluster only where the model itself scores that far less often
        # than q: anomalies, which no component explains.
        return gap if level + gap > self._model_score_at_q() else None

    def _model_score_at_q(self) -> float:
        """The score (relative to the typical log-density) of the model's own density quantile at
        q, from 20 / q draws (10,000 to 200,000), drawn again once the model has learned half a
        window more: drawn at every re-estimate it cost 25 ms a time, twice the detector's own
        work on a stream whose gap the model calls common (helper-57)."""
        model = self._model
        if self._model_z is None or model.n_seen_ - self._model_z[0] >= self.window // 2:
            value = _model_density_quantile(model, self.quantile, _draws_for(self.quantile))
            self._model_z = (model.n_seen_, self.typical - value)
        return self._model_z[1]

    def _window_start(self) -> int:
        """The first counted point the fit may use: ``window`` points back, not before the history's
        start (nor before the stream's)."""
        return max(self.n_counted - self.window, self.history_start, 0)

    def _peaks(self):
        """The stored peaks of the window, compacted into one array each."""
        if self._scores:
            scores, censor, index = (np.concatenate(a) for a in (self._scores, self._censor, self._index))
        else:
            scores, censor, index = np.empty(0), np.empty(0), np.empty(0, dtype=np.int64)
        oldest = self._window_start()
        trimmed = bool(len(index) and index[0] < oldest)
        if trimmed:
            live = index >= oldest
            scores, censor, index = scores[live], censor[live], index[live]
        self._scores, self._censor, self._index = [scores], [censor], [index]
        if trimmed or self._rows_stale or len(self._point_index) > 1:
            self._prune_rows(scores, index)
        # Levels that ended before the window are no longer needed (the one in force stays).
        first = max(int(np.searchsorted(self.level_start, oldest, side="right")) - 1, 0)
        self.level_start, self.level = self.level_start[first:], self.level[first:]
        return scores, censor, index

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict:
        scores, censor, index = self._peaks()
        return {
            "mode": self.mode,
            "scores": "relative",  # to the model's typical log-density (see update)
            "quantile": self.quantile,
            "window": self.window,
            "value": self.value,
            "start": self.start.to_dict(),
            "n_counted": self.n_counted,
            "history_start": self.history_start,
            "tokens": self.tokens,
            "fitted_at": self.fitted_at,
            "shape_fitted_at": self.shape_fitted_at,
            "gpd": None if self.gpd is None else list(self.gpd),
            "gpd_offset": self.gpd_offset,
            "z": self.z,
            "z_far": self.z_far,
            "tail": None if self.tail is None else list(self.tail),
            "level_start": self.level_start.copy(),
            "level": self.level.copy(),
            "peak_scores": scores.copy(),
            "peak_censor": censor.copy(),
            "peak_index": index.copy(),
            **self._rows_state(index),
            # How the last estimate read the tail, for ``inspect`` (not read back: the next
            # estimate says it again).
            "tail_from": None if self.fit is None else self.fit["scores"],
            "held_to_the_window": None if self.fit is None else bool(self.fit["held_to_the_window"]),
            "race_z": None if self.race_z is None else list(self.race_z),
            "race_record": list(self.race_record),
            "race_pending": self.race_pending.copy(),
            "flagged_scores": self._flagged[self._flagged_index >= self._window_start()],
            "flagged_index": self._flagged_index[self._flagged_index >= self._window_start()],
            "start_shift": self.start_shift,
        }

    def load_dict(self, state: dict) -> None:
        self._reset()
        if "n_counted" not in state:
            # A checkpoint from before calibration on the stream (the model's quantile then).
            self.start.load_dict(state)
            return
        self.start.load_dict(state["start"])
        self.n_counted = int(state["n_counted"])
        self.history_start = int(state.get("history_start", 0))  # absent before the restart existed
        self.tokens = float(state["tokens"])
        self.fitted_at = int(state["fitted_at"])
        self.shape_fitted_at = int(state["shape_fitted_at"])
        self.gpd = None if state["gpd"] is None else tuple(float(v) for v in state["gpd"])
        self.gpd_offset = float(state.get("gpd_offset", 0.0))
        self.z = None if state["z"] is None else float(state["z"])
        self.z_far = float(state["z_far"])
        tail = state.get("tail")  # absent from checkpoints before the careful step
        self.tail = None if tail is None else (float(tail[0]), float(tail[1]), float(tail[-1]))
        self.level_start = np.asarray(state["level_start"], dtype=np.int64).copy()
        self.level = np.asarray(state["level"], dtype=float).copy()
        self._scores = [np.asarray(state["peak_scores"], dtype=float).copy()]
        self._censor = [np.asarray(state["peak_censor"], dtype=float).copy()]
        self._index = [np.asarray(state["peak_index"], dtype=np.int64).copy()]
        race_z = state.get("race_z")  # (absent before peaks were scored again)
        self.race_z = None if race_z is None else (float(race_z[0]), float(race_z[1]))
        self.race_record = tuple(float(v) for v in state.get("race_record", (0.0, 0.0, 0.0)))
        self.race_pending = np.asarray(state.get("race_pending", np.zeros(3)), dtype=float).copy()
        if "peak_rows" in state:  # (absent before peaks were scored again: those stay as they were)
            self._point_rows = [np.asarray(state["peak_rows"], dtype=float).copy()]
            self._point_index = [np.asarray(state["peak_row_index"], dtype=np.int64).copy()]
            self._rows_stale = True
        # (Absent from checkpoints before flagged points were kept for rarity.)
        self._flagged = np.asarray(state.get("flagged_scores", ()), dtype=float).copy()
        self._flagged_index = np.asarray(state.get("flagged_index", ()), dtype=np.int64).copy()
        self.start_shift = float(state.get("start_shift", 0.0))  # (absent before it existed)
        # Before scores were relative to the model, the history was in -log p itself: made relative
        # at the first update, when the model is known.
        self._absolute_history = state.get("scores") != "relative"
        if state.get("quantile", self.quantile) != self.quantile:
            # The race's record was kept for the other q: it starts again.
            self.race_z, self.race_record, self.race_pending = None, (0.0, 0.0, 0.0), np.zeros(3)
            # The stored peaks cover the saved window only: a longer one (a smaller q) must not
            # count points whose peaks were never kept.
            saved_window = int(state.get("window", self.window))
            self.history_start = max(self.history_start, self.n_counted - saved_window)
            if self.n_counted > self.history_start:
                self.refit()  # the same peaks, the configured quantile: z_q at once, not a refit later


def make_threshold(config: ThresholdConfig):
    if config.mode == "fixed":
        return FixedThreshold(config.value)
    if config.mode == "model_quantile":
        return ModelQuantileThreshold(config.quantile, config.refresh_every, config.samples)
    return StreamQuantileThreshold(config.quantile, window=config.window, calibration=config.calibration,
                                   refresh_every=config.refresh_every, samples=config.samples)
