"""The stream-calibrated threshold: the GPD fit, the flagged share on non-Gaussian scores,
bursts, and the state round trip.  The threshold is driven directly with synthetic scores."""

import numpy as np
import pytest
from scipy import stats

from streamgmm.detection.threshold import (
    _gap_after_the_bulk,
    StreamQuantileThreshold,
    fit_gpd,
    gpd_excess_quantile,
    make_threshold,
)
from streamgmm.service.config import config_from_dict


def _feed(threshold, scores, batch=1000):
    """Score batches of anomaly scores s (log-density -s) through classify + observe."""
    flags = []
    for start in range(0, len(scores), batch):
        log_density = -scores[start:start + batch]
        flagged = threshold.classify(log_density)
        threshold.observe(log_density, flagged)
        flags.append(flagged)
    return np.concatenate(flags)


def _started(q, start_score, **kwargs):
    """A threshold whose start (the model's quantile) flags scores above ``start_score``."""
    threshold = StreamQuantileThreshold(q, **kwargs)
    threshold.start.value = -start_score
    return threshold


SCORES = {
    # -log p of skewed / heavy-tailed data under a wrong model: heavier or lighter than Gaussian.
    "log-normal": lambda rng, n: np.exp(rng.normal(0.0, 0.8, n)),
    "student-t": lambda rng, n: np.log1p(stats.t.rvs(3, size=n, random_state=rng) ** 2) * 2.0,
    "gamma": lambda rng, n: rng.gamma(3.0, size=n),
}


@pytest.mark.parametrize("name", sorted(SCORES))
@pytest.mark.parametrize("q", [0.01, 0.001])
def test_flags_about_q_of_non_gaussian_scores(name, q):
    rng = np.random.default_rng(0)
    scores = SCORES[name](rng, 300_000)
    # The start value flags ten times too many: the stream's tail must take over.
    threshold = _started(q, np.quantile(scores, 1 - 10 * q))
    flags = _feed(threshold, scores)
    after = flags[threshold.calibration:]
    assert threshold.calibrated
    assert 0.5 * q <= after.mean() <= 2.0 * q, f"{name}: flagged {after.mean() / q:.2f} x q"


def test_a_burst_is_flagged_and_does_not_move_the_threshold():
    rng = np.random.default_rng(1)
    q = 0.001
    scores = rng.gamma(3.0, size=200_000)
    threshold = _started(q, np.quantile(scores, 1 - q), window=50_000)
    _feed(threshold, scores[:100_000])
    before = threshold.value
    burst = 50.0 + rng.gamma(3.0, size=5_000)  # far beyond anything normal, 10% of the window
    assert _feed(threshold, burst).all()
    after = _feed(threshold, scores[100_000:130_000])
    # Refitted while the burst is in the window: it counts as at most a bucket of alarms.
    assert threshold.shape_fitted_at > 100_000
    assert threshold.fit["n_censored"] <= 3 * q * threshold.fit["n"] + 3
    assert threshold.value == pytest.approx(before, abs=0.5)
    after = np.concatenate([after, _feed(threshold, scores[130_000:])])
    assert 0.5 * q <= after.mean() <= 2.0 * q


def test_a_long_burst_mixed_into_normal_traffic_stays_flagged_and_does_not_ratchet():
    rng = np.random.default_rng(2)
    q = 0.001
    scores = rng.gamma(3.0, size=300_000)
    scores[150_000:250_000:5] = 60.0 + rng.random(20_000)  # 20% of the points for 100k points
    threshold = _started(q, np.quantile(scores[:100_000], 1 - q))
    flags = _feed(threshold, scores[:150_000])
    before = threshold.value
    flags = np.concatenate([flags, _feed(threshold, scores[150_000:])])
    assert flags[150_000:250_000:5].all()
    # 3 q of alarms a point would be let in by the bucket; beyond the tail's q/100 quantile
    # they are not, so the threshold does not creep up while the anomalies go on.
    assert threshold.value == pytest.approx(before, abs=0.5)


def test_state_round_trip_gives_identical_decisions():
    rng = np.random.default_rng(3)
    scores = np.exp(rng.normal(0.0, 0.8, 150_000))
    a = _started(0.001, 5.0, window=30_000)
    _feed(a, scores[:60_500], batch=500)
    b = StreamQuantileThreshold(0.001, window=30_000)
    b.load_dict(a.to_dict())
    assert b.value == a.value
    np.testing.assert_array_equal(_feed(a, scores[60_500:], batch=700), _feed(b, scores[60_500:], batch=700))
    assert a.value == b.value and a.fit == b.fit


def test_a_checkpoint_of_the_model_density_threshold_is_the_start_value():
    threshold = StreamQuantileThreshold(0.01)
    threshold.load_dict({"mode": "quantile", "value": -12.5, "refreshed_at": 4000})
    assert threshold.value == -12.5 and not threshold.calibrated


def test_drift_is_followed_within_the_window():
    rng = np.random.default_rng(4)
    q = 0.01
    scores = rng.gamma(3.0, size=400_000) + np.linspace(0.0, 6.0, 400_000)  # the tail moves by 2x its scale
    threshold = _started(q, np.quantile(scores[:10_000], 1 - q), window=20_000)
    flags = _feed(threshold, scores)
    assert 0.5 * q <= flags[100_000:].mean() <= 2.0 * q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tail_that_gets_lighter_is_followed_not_frozen(seed):
    # Heavy-tailed scores, then light ones far below the old tail (a model that has learned, or
    # a calmer stream): the old collection level held nothing any more, and the threshold
    # stayed where it was for good, flagging nothing.
    rng = np.random.default_rng(seed)
    q = 0.001
    heavy = np.log1p(stats.t.rvs(1.5, size=60_000, random_state=rng) ** 2) * 6.0
    light = rng.gamma(3.0, size=100_000)
    threshold = _started(q, np.quantile(heavy[:10_000], 1 - q))
    flags = _feed(threshold, np.concatenate([heavy, light]))
    assert 0.5 * q <= flags[60_000 + threshold.window + 10_000:].mean() <= 2.0 * q
    restored = StreamQuantileThreshold(q)
    restored.load_dict(threshold.to_dict())
    assert restored.history_start == threshold.history_start


@pytest.mark.parametrize("new_q", [0.0005, 0.002, 0.01])
def test_a_restored_threshold_takes_a_new_quantile_on_the_peaks_it_kept(new_q):
    # A smaller q has a longer window than the peaks kept: counting the points whose peaks were
    # never stored halved the tail's share and flagged twice q.
    rng = np.random.default_rng(1)
    old = StreamQuantileThreshold(0.001)
    _feed(old, rng.chisquare(4, 100_000), batch=500)
    new = StreamQuantileThreshold(new_q)
    new.load_dict(old.to_dict())
    fresh = -rng.chisquare(4, 400_000)
    assert 0.7 * new_q <= new.classify(fresh).mean() <= 1.4 * new_q


def test_a_threshold_saved_as_its_history_restarted_restores_under_a_new_quantile():
    threshold = StreamQuantileThreshold(0.001)
    _feed(threshold, np.random.default_rng(2).chisquare(4, 30_000))
    threshold._restart_history()  # as the last step of a batch: nothing counted since
    restored = StreamQuantileThreshold(0.002)
    restored.load_dict(threshold.to_dict())  # no division by the empty history
    assert restored.history_start == restored.n_counted == threshold.n_counted


@pytest.mark.parametrize("gamma, sigma", [(0.0, 1.0), (0.3, 2.0), (-0.3, 1.0), (0.7, 0.5)])
def test_gpd_fit_matches_scipy(gamma, sigma):
    excess = stats.genpareto.rvs(gamma, scale=sigma, size=4_000, random_state=np.random.default_rng(5))
    ours = fit_gpd(excess)
    c, _, scale = stats.genpareto.fit(excess, floc=0.0)
    assert ours[0] == pytest.approx(c, abs=0.01)
    assert ours[1] == pytest.approx(scale, rel=0.01)
    assert ours[0] == pytest.approx(gamma, abs=0.1)  # and close to the truth


def test_gpd_fit_with_censored_excesses_recovers_the_truth():
    rng = np.random.default_rng(6)
    excess = stats.genpareto.rvs(0.2, scale=1.0, size=20_000, random_state=rng)
    level = np.quantile(excess, 0.9)
    gamma, sigma = fit_gpd(excess[excess <= level], np.full(np.count_nonzero(excess > level), level))
    assert gamma == pytest.approx(0.2, abs=0.05) and sigma == pytest.approx(1.0, rel=0.05)


def test_gpd_excess_quantile():
    for gamma, sigma in ((0.0, 2.0), (0.25, 1.5), (-0.2, 1.0)):
        assert gpd_excess_quantile(gamma, sigma, 0.01) == pytest.approx(
            stats.genpareto.isf(0.01, gamma, scale=sigma))


def test_make_threshold_modes():
    assert make_threshold(config_from_dict({}).threshold).mode == "quantile"
    model = make_threshold(config_from_dict({"threshold": {"mode": "model_quantile"}}).threshold)
    assert model.mode == "model_quantile"
    fixed = make_threshold(config_from_dict({"threshold": {"mode": "fixed", "value": -3.0}}).threshold)
    assert fixed.mode == "fixed" and fixed.value == -3.0


def test_detector_checkpoint_round_trip_gives_identical_decisions():
    from streamgmm.detection.decode import encode
    from streamgmm.detection.detector import Detector, InputRecord
    from streamgmm.dev.synthetic import random_mixture
    from streamgmm.service.state import pack, unpack

    rng = np.random.default_rng(7)
    X, _ = random_mixture(3, 4, rng).sample(20_000, rng)
    X[15_000] += 50.0
    config = config_from_dict({"input": {"format": "float64", "dimension": 4},
                               "model": {"n_components": 3, "warmup": 500}, "threshold": {"quantile": 0.01}})

    def run(detector, rows, start):
        return [detector.process([InputRecord("in", 0, start + i + j, encode(x, "float64"))
                                  for j, x in enumerate(rows[i:i + 500])], now=5.0).decisions()
                for i in range(0, len(rows), 500)]

    a = Detector(config)
    run(a, X[:10_000], 0)
    assert a.threshold.calibrated
    # The stored peaks' rows and the record of the two ways of scoring them travel too.
    assert len(a.state(5.0)["threshold"]["peak_rows"]) and a.threshold.race_z is not None
    b = Detector(config)
    b.restore(unpack(pack(a.state(5.0))))  # the checkpoint file's format: arrays and JSON
    assert run(a, X[10_000:], 10_000) == run(b, X[10_000:], 10_000)
    assert a.threshold.value == b.threshold.value


@pytest.mark.parametrize("name", sorted(SCORES))
def test_far_anomalies_more_frequent_than_q_from_the_first_point_are_all_flagged(name):
    # 0.6% far anomalies (6 q) from the very start: inside the calibration period, where every
    # point counts, they must not become the tail (they did: the threshold sank below them).
    rng = np.random.default_rng(5)
    q, n = 0.001, 60_000
    scores = SCORES[name](rng, n)
    anomalous = rng.random(n) < 0.006
    scores[anomalous] = scores.max() * 50.0 + rng.uniform(0, 1000, anomalous.sum())
    threshold = _started(0.001, start_score=np.quantile(scores[~anomalous], 1 - q / 100))
    flags = _feed(threshold, scores)
    assert flags[anomalous].mean() >= 0.99
    normal_share = flags[~anomalous][20_000:].mean() / q
    assert 0.5 <= normal_share <= 2.0, normal_share


@pytest.mark.parametrize("name", sorted(SCORES))
def test_the_tail_probability_reads_as_a_frequency_of_the_stream(name):
    # Fitted on one stream of scores, the tail probability of fresh scores from the same
    # distribution matches how often they occur, and is q at the threshold.
    rng = np.random.default_rng(1)
    q = 0.001
    scores = SCORES[name](rng, 200_000)
    threshold = _started(q, np.quantile(scores, 1 - 10 * q))
    _feed(threshold, scores)
    fresh = SCORES[name](rng, 1_000_000)
    for level in (0.01, 0.001, 0.0002):
        cut = np.quantile(fresh, 1 - level)
        said = float(np.exp(threshold.log_tail_probability(np.array([-cut]))[0]))
        assert 0.5 * level <= said <= 2.0 * level, f"{name}: {said:.2e} for a {level} quantile"
    # At the threshold the fitted tail says q; the window's own count of scores that far out (the
    # floor, see _seen_as_rare) may say more (seeds 1..6: 1.0-1.8 q), never less.
    at_threshold = float(np.exp(threshold.log_tail_probability(np.array([threshold.value]))[0]))
    assert 0.95 * q <= at_threshold <= 2.0 * q


def test_a_short_tail_never_calls_a_point_impossible_and_falls_with_distance():
    rng = np.random.default_rng(2)
    threshold = _started(0.001, 5.0)
    _feed(threshold, rng.uniform(0.0, 6.0, 100_000))  # bounded scores: a short-tailed fit
    assert threshold.gpd[1] < 0
    far = -np.array([threshold.z, threshold.z + 1.0, threshold.z + 10.0, 1e4])
    log_tail = threshold.log_tail_probability(far)
    assert np.all(np.isfinite(log_tail)) and np.all(np.diff(log_tail) < 0)
    assert float(np.exp(log_tail[0])) == pytest.approx(0.001, rel=0.05)


def test_no_tail_probability_before_the_first_fit_and_after_a_restore_the_same():
    threshold = _started(0.001, 5.0)
    assert threshold.log_tail_probability(np.array([-10.0])) is None
    rng = np.random.default_rng(3)
    _feed(threshold, rng.gamma(3.0, size=50_000))
    restored = StreamQuantileThreshold(0.001)
    restored.load_dict(threshold.to_dict())
    points = -np.array([8.0, 12.0, 20.0])
    np.testing.assert_array_equal(restored.log_tail_probability(points), threshold.log_tail_probability(points))


def test_after_its_history_restarts_the_tail_is_young_again_and_flags_count_as_they_are():
    # After a level shift was learned, the scores got lighter, the history restarted, and a z_q
    # estimated from a few hundred peaks was too low; with the flags censored as on a calibrated
    # stream it stayed so (8 q in the next 10k points of a data engineer's stream, 2-3 q for
    # 40k more).  Counted as they are, as at the stream's start, they correct it.
    rng = np.random.default_rng(0)
    threshold = _started(0.001, 20.0)
    _feed(threshold, rng.gamma(3.0, size=30_000))
    assert threshold.calibrated
    threshold._restart_history()
    assert not threshold.calibrated
    _feed(threshold, rng.gamma(3.0, size=threshold.calibration - 1000))
    assert not threshold.calibrated
    _feed(threshold, rng.gamma(3.0, size=1000))
    assert threshold.calibrated


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tail_filled_by_a_change_the_model_has_since_learned_is_let_go(seed):
    # A new regime at point 5,000, during calibration (every score counts): its first scores,
    # hundreds of nats while the model caught up, filled the tail; at q = 1e-4 the window is
    # 200,000 points, and t and z_q stayed far above every later score: nothing was flagged for
    # 64k+ points, 8-sd outliers of the new regime included (helper-31).  Once far fewer recent
    # scores come above t than its share, the history starts again.
    rng = np.random.default_rng(seed)
    q = 1e-4
    threshold = _started(q, 30.0)
    _feed(threshold, rng.gamma(3.0, size=4_000))
    _feed(threshold, 100.0 + 50.0 * rng.random(1_500))  # the change, before the model learns it
    _feed(threshold, rng.gamma(3.0, size=60_000))
    clean = _started(q, 30.0)
    _feed(clean, rng.gamma(3.0, size=60_000))
    assert threshold.z == pytest.approx(clean.z, rel=0.25), (threshold.z, clean.z)
    flags = _feed(threshold, rng.gamma(3.0, size=100_000))
    assert 0.3 <= flags.mean() / q <= 3.0


def test_a_stationary_stream_never_finds_its_tail_stale():
    rng = np.random.default_rng(4)
    for q in (0.01, 0.001, 0.0001):
        threshold = _started(q, 30.0)
        _feed(threshold, rng.standard_t(3, size=300_000) ** 2)
        assert threshold.history_start == 0, q


def test_the_rarity_of_the_last_fit_stands_across_a_restart_of_the_history():
    # After a restart the records fell back to the model bound until the next fit: on Pareto
    # latencies "1 in 3e54" for a point 175 in 100k scored as low (helper-31).
    rng = np.random.default_rng(5)
    threshold = _started(0.001, 20.0)
    _feed(threshold, rng.gamma(3.0, size=30_000))
    points = -np.array([10.0, 14.0, 25.0])
    threshold._seen_as_rare = lambda d, level: np.full(np.shape(d), -np.inf)  # the fit's own figures
    before = threshold.log_tail_probability(points)
    del threshold._seen_as_rare
    threshold._restart_history()  # (no scores seen since: the fit alone speaks)
    np.testing.assert_array_equal(threshold.log_tail_probability(points), before)
    fitted = threshold.shape_fitted_at
    _feed(threshold, rng.gamma(3.0, size=400))
    assert threshold.shape_fitted_at > fitted  # the shape is fitted anew at the first estimate


def test_before_the_first_fit_rarity_is_the_rank_among_the_scores_seen():
    # The model's bound said "1 in 1e85" on Pareto latencies where 1 in 1,000 scored as low
    # (helper-31): before the tail is fitted, say only what the scores seen can say.
    threshold = _started(0.001, 1e9)
    assert threshold.log_tail_probability(-np.array([1.0])) is None  # nothing seen yet
    _feed(threshold, np.arange(1.0, 201.0))  # 200 scores, fewer than the first fit needs
    assert threshold.fit is None and threshold.tail_method == "empirical_rank"
    np.testing.assert_allclose(np.exp(threshold.log_tail_probability(-np.array([500.0, 200.0, 101.0, 0.5]))),
                               [1 / 201, 2 / 201, 101 / 201, 1.0])
    _feed(threshold, np.random.default_rng(0).gamma(3.0, size=2_000))
    assert threshold.tail_method == "gpd_tail"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_tied_at_t_do_not_make_the_tail_look_stale(seed):
    # A stream of repeated values (99.6% of each batch one score) put t on the tie: few scores
    # were strictly over it, and the first version of the rule restarted the history 19 times
    # in 200k points (review).
    rng = np.random.default_rng(seed)
    threshold = _started(0.001, 30.0)
    for _ in range(400):
        scores = np.full(500, 5.0 + 0.01 * rng.normal())
        rare = rng.random(500) < 0.004
        scores[rare] = 8.0 + rng.exponential(size=rare.sum())
        _feed(threshold, scores, batch=500)
    assert threshold.history_start == 0 and threshold.calibrated


def test_at_q_1e4_the_tail_is_read_close_to_z_q_not_200_times_below_it():
    # Four non-Gaussian clusters (log-normal, uniform, Student t, a shell; bench_calibration's
    # seed 2), 500,000 points, a burst of 1% far away at the middle: the GPD fitted to the top
    # 2% of the scores (shape ~0.5) and extrapolated 200 times put z_q past the scores' own 1e-4
    # quantile, 0.37 q flagged after the burst (0.56 q without it). From the top 1,000 peaks of
    # the window: 0.98 q.
    from streamgmm.detection.detector import Detector, InputRecord

    from streamgmm.dev.synthetic import skewed_clusters

    n, d, q = 501_000, 6, 1e-4
    X = skewed_clusters(n, np.random.default_rng(2), d)
    burst = slice(n // 2, n // 2 + n // 100)
    direction = np.random.default_rng(102).normal(size=d)
    X[burst] += 3.0 * (X.max(axis=0) - X.min(axis=0)) * direction / np.linalg.norm(direction)
    config = config_from_dict({"input": {"format": "float64", "dimension": d},
                               "model": {"warmup": 1000, "random_state": 2}, "threshold": {"quantile": q}}, environ={})
    detector = Detector(config)
    flags = np.concatenate([
        detector.process([InputRecord("in", 0, start + i, row.tobytes()) for i, row in enumerate(X[start:start + 1000])],
                         now=0.0).flags for start in range(0, n, 1000)])
    flags = np.concatenate([np.zeros(n - len(flags), dtype=bool), flags])  # the warm-up's rows are not scored
    assert flags[burst].mean() == 1.0
    after = flags[burst.stop:].mean() / q
    assert 0.5 <= after <= 2.0, after


def test_a_young_fit_never_calls_a_point_rarer_than_the_points_seen_as_low_say():
    # A GPD fitted to the first peaks extrapolated wildly: "1 in 2.4e12" for a point one point in
    # 1,584 had matched (helper-37, Poisson integers). Where k counted scores of the window are at
    # or beyond a point's, its tail probability is at least k / (n + 1).
    for seed in range(5):
        rng = np.random.default_rng(seed)
        threshold = _started(0.001, 30.0)
        scores = rng.gamma(3.0, size=1_500)  # the GPD put the highest of them at 1 in 3,300-4,100
        _feed(threshold, scores)
        assert threshold.tail_method == "gpd_tail"
        probe = np.sort(scores)[-5:]  # the five highest scores seen
        log_tail = threshold.log_tail_probability(-probe)
        n = threshold.n_counted
        at_or_beyond = np.array([np.count_nonzero(scores >= s) for s in probe])
        assert np.all(log_tail >= np.log(at_or_beyond / (n + 1.0)) - 1e-9)
        assert np.all(np.diff(log_tail) <= 1e-12)  # rarer as the score grows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_young_tail_that_seems_to_end_is_not_trusted_past_the_scores_seen(seed):
    # q = 1e-4, -log p of a 4-d Gaussian: the first fits, on a few dozen peaks, came out short
    # tailed and put z_q at their end, among scores of 1 in 100: 11 flags in the first 3,000
    # points on one seed (helper-40).  About 1 is expected in the first 10,000.
    rng = np.random.default_rng(seed)
    scores = rng.chisquare(4, 10_000) / 2.0
    threshold = _started(1e-4, np.quantile(rng.chisquare(4, 10**6) / 2.0, 1 - 1e-6))
    flags = _feed(threshold, scores, batch=100)
    assert flags.sum() <= 4, f"{flags.sum()} flags in 10,000 points at q = 1e-4"


class _ModelOfTypicalLevel:
    """What the threshold asks of a model: whether it exists, its typical log-density and
    weights, and for the start value (before the first fit) a density quantile, here the one it
    was given."""

    is_initialized = True
    n_seen_ = 0
    n_features_in_ = 4
    weights_ = np.ones(1)

    def __init__(self, typical, start=-12.0):
        self.typical, self.start = typical, start

    def typical_log_density(self):
        return self.typical

    def density_quantile(self, *args, **kwargs):
        return self.start


def test_scores_are_read_against_the_model_so_a_wider_stream_is_not_flagged_for_it():
    # Every log-density falls as the stream's spread grows and the model follows it; in -log p
    # itself the tail moved past z_q, and flagged points are kept out of it, so the threshold
    # could not follow (sd x4 over 50,000 points: 35-50 q; helper-40).  Relative to the model's
    # typical log-density the scores stay put.
    rng = np.random.default_rng(0)
    q, n, batch = 0.001, 60_000, 1000
    scores = rng.gamma(3.0, size=n)
    drop = np.linspace(0.0, 8.0, n)  # 4-d, sd x 4 over the stream: 4 log 4 = 5.5 nats; more here
    threshold = _started(q, np.quantile(scores, 1 - q))
    model = _ModelOfTypicalLevel(0.0, start=-np.quantile(scores, 1 - q))
    flags = []
    for start in range(0, n, batch):
        model.typical = -float(drop[start])
        threshold.update(model)
        log_density = -scores[start:start + batch] - drop[start:start + batch]
        flagged = threshold.classify(log_density)
        threshold.observe(log_density, flagged)
        flags.append(flagged)
    after = np.concatenate(flags)[threshold.calibration:]
    assert 0.5 * q <= after.mean() <= 2.0 * q, f"flagged {after.mean() / q:.2f} x q"


def test_a_threshold_saved_in_absolute_scores_is_made_relative_to_the_model_on_restore():
    # A checkpoint from before scores were relative holds -log p itself and no "scores" key:
    # what this code saves under a model whose typical log-density is 0.  Restored under a model
    # at -7 it must decide as it did.
    rng = np.random.default_rng(3)
    scores = rng.gamma(3.0, size=30_000)
    threshold = _started(0.001, np.quantile(scores, 0.999))
    threshold.update(_ModelOfTypicalLevel(0.0))
    _feed(threshold, scores[:20_000])
    absolute = threshold.to_dict()
    absolute.pop("scores")
    restored = StreamQuantileThreshold(0.001)
    restored.load_dict(absolute)
    restored.update(_ModelOfTypicalLevel(-7.0))
    assert restored.value == pytest.approx(threshold.value)
    test = -scores[20_000:]
    np.testing.assert_array_equal(restored.classify(test), threshold.classify(test))
    assert restored.log_tail_probability(test[:50]) == pytest.approx(threshold.log_tail_probability(test[:50]))
    # Read as relative (the marker trusted blindly) it would be 7 nats off.
    relative = StreamQuantileThreshold(0.001)
    relative.load_dict({**absolute, "scores": "relative"})
    relative.update(_ModelOfTypicalLevel(-7.0))
    assert relative.value == pytest.approx(threshold.value - 7.0)


def test_points_flagged_and_left_out_of_the_tail_count_for_how_rare_a_point_is():
    # After a level shift every point was flagged and kept out of the tail, and each record
    # called itself 1 in millions: 19,100 records in a row (helper-40).
    rng = np.random.default_rng(4)
    q = 0.001
    threshold = _started(q, 12.0)
    _feed(threshold, rng.gamma(3.0, size=20_000))
    assert threshold.calibrated
    shifted = rng.gamma(3.0, size=5_000) + 25.0
    flags = _feed(threshold, shifted)
    assert flags.mean() > 0.99
    one_in = np.exp(-threshold.log_tail_probability(-np.median(shifted) * np.ones(1)))[0]
    assert one_in < 50, f"a point like half of the last 5,000 is called 1 in {one_in:.3g}"  # 1e6 and more before


def _detector(q, dimension, **model):
    from streamgmm.detection.detector import Detector

    return Detector(config_from_dict({"input": {"format": "float64", "dimension": dimension},
                                      "model": {"n_components": "auto", "warmup": 1000, "random_state": 0, **model},
                                      "threshold": {"quantile": q}}))


def _process(detector, X, batch=1000):
    from streamgmm.detection.decode import encode
    from streamgmm.detection.detector import InputRecord

    for i in range(0, len(X), batch):
        detector.process([InputRecord("in", 0, i + j, encode(x, "float64")) for j, x in enumerate(X[i:i + batch])],
                         now=5.0)


@pytest.mark.parametrize("name", ["normal, 64-d, q = 1e-4", "Cauchy, 2-d (a tail never scored again)"])
def test_the_rows_kept_for_scoring_the_peaks_again_stay_within_their_budget(name):
    # At q = 1e-4 a window's peaks were 2,000 and more (5,500 while it filled), and with 64
    # features their rows made a 3.4 MB checkpoint, past a state topic's 1 MB messages; on a
    # Cauchy stream (shape >= 1/2: never scored again) the rows were never pruned: 1,149 -> 6,239
    # over 200,000 points for 492 live peaks (helper-55).
    from streamgmm.service.state import pack

    rng = np.random.default_rng(0)
    if name.startswith("normal"):
        detector, X = _detector(1e-4, 64), rng.normal(size=(40_000, 64))
    else:
        detector, X = _detector(0.001, 2), rng.standard_cauchy((60_000, 2))
    _process(detector, X)
    threshold = detector.threshold
    budget = threshold._rows_kept(X.shape[1])
    kept = sum(len(rows) for rows in threshold._point_rows)
    # The budget, plus the peaks of one interval between two re-estimates.
    assert 0 < kept <= budget + 2 * threshold.tail_fraction * threshold._interval() + 50, (kept, budget)
    rows = threshold.to_dict()["peak_rows"]
    assert rows.size <= budget * X.shape[1]
    assert len(pack(detector.state(5.0))) < 1_000_000 or name.startswith("Cauchy")


def test_a_point_at_a_threshold_held_to_the_window_reads_as_rare_as_q():
    # Where the window's own quantile replaces the fitted z_q, the tail's share is scaled so that
    # the fitted shape gives q there: a point flagged at the threshold says "1 in 1/q", not more
    # common (helper-55).
    detector = _detector(0.01, 1)
    _process(detector, np.random.default_rng(5002).exponential(1.0, (51_000, 1)))
    threshold = detector.threshold
    assert threshold.fit["held_to_the_window"]  # (seed 5002: the fit overshot, 0.46 q flagged before)
    at_z = threshold.log_tail_probability(np.array([threshold.value - 1e-9]))[0]
    assert abs(at_z - np.log(0.01)) < 0.05, np.exp(at_z)


def test_a_new_quantile_on_restore_starts_the_race_of_the_two_scorings_again():
    detector = _detector(0.001, 2)
    _process(detector, np.random.default_rng(1).normal(size=(30_000, 2)))
    state = detector.threshold.to_dict()
    assert state["race_record"][0] > 0
    restored = StreamQuantileThreshold(0.01)
    restored.load_dict(state)
    assert restored.race_record == (0.0, 0.0, 0.0) and restored.race_z is None


# ------------------------------------------------ a far cluster among the peaks
@pytest.mark.parametrize("seed", range(5))
def test_a_gap_is_found_before_a_cluster_past_an_exponential_tail_and_none_in_tails_alone(seed):
    rng = np.random.default_rng(seed)
    tail = rng.exponential(1.0, 300)
    cluster = rng.uniform(20.0, 35.0, 100)  # a quarter of the peaks, 13 mean excesses past the tail's top
    gap = _gap_after_the_bulk(np.sort(np.concatenate([tail, cluster])))
    assert gap is not None and tail.max() <= gap < 20.0
    # Tails alone, however heavy or short, and a grid of scores, have none.
    for excesses in (rng.exponential(1.0, 400), stats.genpareto.rvs(0.7, size=400, random_state=seed),
                     stats.genpareto.rvs(2.0, size=400, random_state=seed), rng.uniform(0.0, 1.0, 400),
                     stats.genpareto.rvs(-0.5, size=400, random_state=seed),
                     rng.integers(0, 8, 400).astype(float) + 1.0):
        assert _gap_after_the_bulk(np.sort(excesses)) is None


class _ModelSaying:
    """What the threshold asks of a model for its far-cluster guard: its density quantile."""

    n_seen_ = 10_000
    n_features_in_ = 3

    def __init__(self, log_density_at_q: float):
        self.value = log_density_at_q

    def density_quantile(self, quantile, n_samples, random_state=None):
        return self.value


@pytest.mark.parametrize("model_score_at_q, far", [(50.0, False), (10.0, True)])
def test_a_gap_is_a_far_cluster_only_where_the_model_scores_that_far_less_often_than_q(model_score_at_q, far):
    # The same peaks, a gap after an exponential tail and a cluster past it: a mode the model has
    # a component for (its q-quantile score past the cluster) stays in the tail; past the model's
    # own q-quantile it is a far cluster (a feature non-zero in 1% of the rows: 5.8 q without this).
    rng = np.random.default_rng(0)
    excess = np.concatenate([rng.exponential(1.0, 300), rng.uniform(20.0, 35.0, 100)])
    threshold = StreamQuantileThreshold(0.001)
    threshold.typical = 0.0
    threshold._model = _ModelSaying(-model_score_at_q)  # score = typical - log-density
    gap = threshold._beyond_the_bulk(excess, level=5.0)
    assert (gap is not None) == far


def _wandering_scores(rng, n, phi=0.98, d=4):
    """-log p (up to a constant) of a 4-d AR(1) stream with coefficient phi: a metric that
    wanders, its marginal a standard normal, its high scores in runs of several points."""
    noise = rng.normal(size=(n, d)) * np.sqrt(1.0 - phi**2)
    x = np.empty((n, d))
    x[0] = rng.normal(size=d)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + noise[i]
    return 0.5 * (x**2).sum(axis=1)


@pytest.mark.xfail(strict=True, reason="known: a metric that wanders passes z_q in runs of normal points, which the "
                                       "token bucket takes for bursts: 3.4-3.9 q (BENCHMARKS.md, fifteenth session)")
def test_a_wandering_stream_whose_high_scores_come_in_runs_is_flagged_about_q():
    rng = np.random.default_rng(0)
    q = 0.01
    scores = _wandering_scores(rng, 200_000)
    threshold = _started(q, np.quantile(scores, 1 - 10 * q))
    flags = _feed(threshold, scores)
    assert 0.5 * q <= flags[threshold.calibration:].mean() <= 2.0 * q
