"""The daemon's logic with an in-memory source: scoring, warm-up, threshold, state."""

import base64
import hashlib
import json
import math
import re

import numpy as np
import pytest

from streamgmm.service.config import ConfigError, config_from_dict
from streamgmm.detection.decode import encode
from streamgmm.detection.detector import Detector, InputRecord
from streamgmm.dev.synthetic import COLLECTION_EVERY, daily_load, daily_load_with_collections, random_mixture


def _records(X, topic="in", partition=0, start=0, fmt="float64"):
    return [InputRecord(topic, partition, start + i, encode(x, fmt), key=str(start + i).encode(), timestamp=1_000)
            for i, x in enumerate(X)]


def _config(**sections):
    raw = {"input": {"format": "float64", "dimension": 4}, "model": {"n_components": 3, "warmup": 500}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


def _run(detector, X, batch=250, start=0):
    results = []
    for i in range(0, len(X), batch):
        results.append(detector.process(_records(X[i:i + batch], start=start + i), now=5.0))
    return results


def test_no_anomaly_before_warmup_and_rest_of_batch_is_scored():
    rng = np.random.default_rng(0)
    X, _ = random_mixture(3, 4, rng).sample(800, rng)
    X[700] = 1e3  # an outlier in the same batch that completes the warm-up
    detector = Detector(_config())
    result = detector.process(_records(X), now=5.0)
    assert result.warmup
    assert all(d == (None, False, None) for d in result.decisions()[:500])
    assert all(d[0] is not None for d in result.decisions()[500:])
    flagged = [i for i, d in enumerate(result.decisions()) if d[1]]
    assert 700 in flagged
    doc = json.loads(result.anomalies[flagged.index(700)].value)
    assert doc["source"] == {"topic": "in", "partition": 0, "offset": 700, "timestamp": 1000, "key": "700"}
    assert doc["log_density"] < doc["threshold"]


def test_quantile_threshold_flags_about_q_on_a_stationary_stream():
    rng = np.random.default_rng(1)
    truth = random_mixture(3, 4, rng)
    X, _ = truth.sample(120_000, rng)
    q = 0.01
    detector = Detector(_config(threshold={"quantile": q}))
    _run(detector, X, batch=2000)
    flagged_fraction = detector.n_anomalies / (len(X) - 500)
    assert q / 2 <= flagged_fraction <= 2 * q


def test_a_burst_of_anomalies_does_not_drag_the_threshold_down():
    rng = np.random.default_rng(2)
    truth = random_mixture(3, 4, rng)
    X, _ = truth.sample(40_000, rng)
    detector = Detector(_config(threshold={"quantile": 0.01, "refresh_every": 1000}))
    _run(detector, X[:20_000], batch=1000)
    before = detector.threshold.value
    burst = X[20_000:25_000] + 40.0  # 5,000 anomalies in a row
    results = _run(detector, burst, batch=1000, start=20_000)
    assert sum(len(r.anomalies) for r in results) == 5000  # every one of them flagged
    assert detector.threshold.value == pytest.approx(before)  # nothing learned, nothing moved
    _run(detector, X[25_000:], batch=1000, start=25_000)
    assert detector.threshold.value == pytest.approx(before, abs=0.5)


def _steadily_contaminated(seed, share, n=40_000, D=6):
    """A correlated Gaussian with a steady ``share`` of points 8-10 standard deviations out (in
    its own metric), from the first point after the warm-up on."""
    rng = np.random.default_rng(900 + seed)
    A = rng.normal(size=(D, D)) / np.sqrt(D)
    L = np.linalg.cholesky(A @ A.T + 0.3 * np.eye(D))
    X = rng.standard_normal((n, D)) @ L.T
    is_anomaly = rng.random(n) < share
    is_anomaly[:1000] = False
    direction = rng.normal(size=(int(is_anomaly.sum()), D))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X[is_anomaly] = (direction * rng.uniform(8.0, 10.0, (len(direction), 1))) @ L.T
    return X, is_anomaly


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anomalies_steadily_more_frequent_than_q_from_the_start_stay_flagged(seed):
    # 5 q of far anomalies from the start: counted while the tail calibrates, they made a heavy
    # fit that put z_q past them for good (recall 0.13-0.25, normal points flagged at 0.02 q).
    q = 0.001
    X, is_anomaly = _steadily_contaminated(seed, share=5 * q)
    config = config_from_dict({"input": {"format": "float64", "dimension": X.shape[1]},
                               "model": {"warmup": 1000, "random_state": seed}, "threshold": {"quantile": q}})
    detector = Detector(config)
    flags = np.concatenate([r.flags for r in _run(detector, X, batch=1000)])
    is_anomaly = is_anomaly[len(is_anomaly) - len(flags):]
    later = np.arange(len(flags)) >= len(flags) // 2
    assert flags[is_anomaly & later].mean() >= 0.95
    assert flags[is_anomaly].mean() >= 0.8
    assert 0.3 <= flags[~is_anomaly].mean() / q <= 2.0


@pytest.mark.parametrize("seed", [1, 2])
def test_a_burst_right_after_the_warm_up_is_flagged(seed):
    # 5% of the first 5,000 points after the warm-up far out (8-10 sd): they were half the tail's
    # peaks and more, the median excess the gap had to exceed was theirs, and 0.06-0.08 of them
    # were flagged at q = 0.01. The gap is measured against the median excess below it.
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((20_000, 6))
    burst = np.zeros(20_000, dtype=bool)
    burst[1000:6000] = rng.random(5000) < 0.05
    direction = rng.normal(size=(int(burst.sum()), 6))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X[burst] = direction * rng.uniform(8.0, 10.0, (len(direction), 1))
    config = config_from_dict({"input": {"format": "float64", "dimension": 6},
                               "model": {"warmup": 1000, "random_state": seed}, "threshold": {"quantile": 0.01}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    assert flags[burst[len(burst) - len(flags):]].mean() >= 0.6


def test_the_most_common_value_of_a_count_is_never_flagged():
    # Poisson(0.05) counts, 1-d: 95% zeros, 4.75% ones. The zeros' scores drift by thousandths of
    # a nat as the model learns; the ones, 3.6 nats past them, were taken out of the tail as a far
    # cluster of anomalies, z_q was read from the zeros alone and sat among them: zeros flagged
    # from row 18,857, every point from row 35,000 (28 q over 80,000 rows; helper-59).
    X = np.random.default_rng(0).poisson(0.05, 40_000).astype(float)[:, np.newaxis]
    config = config_from_dict({"input": {"format": "float64", "dimension": 1}, "threshold": {"quantile": 0.01}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    values = X[len(X) - len(flags):, 0]
    assert not flags[values == 0].any()
    assert flags.mean() <= 3 * 0.01


def test_a_threshold_that_flags_far_more_than_q_is_calibrated_again_even_on_a_tail_still_unusual():
    # The same counts at q = 0.001: the ones (47 q) sit past the threshold while it calibrates.
    # A tail whose older peaks the model still finds unusual is kept through a quiet span (a daily
    # cycle, below), but not while far more than q is flagged: kept, 60-80% of the ones were
    # flagged for good (29 q); calibrated again, 1.0-1.4 q after the first 40,000 rows.
    X = np.random.default_rng(0).poisson(0.05, 60_000).astype(float)[:, np.newaxis]
    config = config_from_dict({"input": {"format": "float64", "dimension": 1}, "threshold": {"quantile": 0.001}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    assert flags[-20_000:].mean() <= 3 * 0.001


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_count_next_to_its_value_of_twice_q_is_not_flagged_by_its_drift(seed):
    # The same counts at q = 0.001 over 80,000 rows: the ones' scores crowd within hundredths of a
    # nat, the twos (1.2 q) lie 5.7 nats past them, and z_q was put among the ones or just past
    # them: 357-441 of ~3,750 ones flagged, identical values flagged or not by the model's drift
    # (5.9-6.8 q). Kept in the gap after the crowd, the twos are flagged and the ones are not.
    X = np.random.default_rng(seed).poisson(0.05, 80_000).astype(float)[:, np.newaxis]
    config = config_from_dict({"input": {"format": "float64", "dimension": 1}, "threshold": {"quantile": 0.001}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    values = X[len(X) - len(flags):, 0]
    assert flags[values == 1].mean() <= 0.01
    assert flags[values >= 2].mean() >= 0.9
    assert flags.mean() <= 2 * 0.001


def test_glitches_far_out_do_not_carry_the_threshold_past_a_values_gap():
    # A 0/1 feature (2% ones) with glitches of 1e4 in 0.1% of the rows: flagged and left out,
    # they counted as the tail's own points beyond the ones' gap, and z_q went to its middle,
    # 147 nats out, where values 2 to 5 (10-97 nats) were no longer flagged (review, helper-66).
    rng = np.random.default_rng(0)
    X = (rng.random(60_000) < 0.02).astype(float)
    X[rng.random(60_000) < 0.001] = 1e4
    X = X[:, np.newaxis]
    detector = Detector(config_from_dict({"input": {"format": "float64", "dimension": 1},
                                          "threshold": {"quantile": 0.001}}))
    _run(detector, X, batch=1000)
    probes = detector.process(_records(np.array([[2.0], [3.0], [5.0]]), start=60_000), now=5.0)
    assert probes.flags.all(), f"z_q at {detector.threshold.z:.1f} nats"


def test_a_daily_cycle_is_not_taken_for_a_stale_tail_every_evening():
    # The evening's few high scores, under a quarter of the window's rate, let the tail go every
    # day, and the next afternoon's peak was judged against the night's scores: 8-10 q flagged
    # on the third and fourth days (helper-59). The older peaks, scored again, are still unusual.
    X = daily_load(80_000, np.random.default_rng(0))
    config = config_from_dict({"input": {"format": "float64", "dimension": 4}, "threshold": {"quantile": 0.001}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    assert flags[-20_000:].mean() <= 5 * 0.001


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tail_the_model_has_since_learned_is_scored_again_not_let_go(seed):
    # The first day of a daily cycle: the warm-up saw the night, the model learned the afternoon
    # as it came, and the tail, made of its first scores, was let go (the model no longer finds
    # them unusual); the next afternoon was then judged against a history of the night and
    # morning: 150-190 flags in it, 3.9 and 2.3 q over four days. The tail is scored again by
    # the current model and kept, unless even so it is stale.
    X = daily_load(80_000, np.random.default_rng(seed))
    config = config_from_dict({"input": {"format": "float64", "dimension": 4}, "threshold": {"quantile": 0.001}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    assert flags.mean() <= 2.0 * 0.001


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tail_that_comes_in_a_block_of_time_is_counted_while_it_is_flagged_too_often(seed):
    # A daily cycle brings its tail in a part of each day: flagged at far more than q there, past
    # the tokens' 3 q, the tail held z_q down, 1.7-2.25 q on the fourth day (an hour-of-day
    # feature's last hour: 2.6 q over a week, helper-62). While flags just past z_q come too
    # often, every flag up to z_far counts in the tail.
    X = daily_load(80_000, np.random.default_rng(seed))
    config = config_from_dict({"input": {"format": "float64", "dimension": 4}, "threshold": {"quantile": 0.001}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    assert flags[-20_000:].mean() <= 1.5 * 0.001


def test_learn_from_anomalies_true_learns_everything():
    rng = np.random.default_rng(3)
    X, _ = random_mixture(3, 4, rng).sample(5000, rng)
    detector = Detector(_config(threshold={"learn_from_anomalies": True, "quantile": 0.05}))
    _run(detector, X)
    assert detector.model.n_seen_ == 5000
    assert detector.n_anomalies > 0


def test_fixed_threshold():
    rng = np.random.default_rng(4)
    X, _ = random_mixture(3, 4, rng).sample(3000, rng)
    detector = Detector(_config(threshold={"mode": "fixed", "value": -1e9}))
    _run(detector, X)
    assert detector.n_anomalies == 0
    detector.threshold.value = 1e9
    result = detector.process(_records(X[:10]), now=5.0)
    assert len(result.anomalies) == 10


def test_state_restores_to_an_identical_detector():
    rng = np.random.default_rng(5)
    X, _ = random_mixture(3, 4, rng).sample(6000, rng)
    a = Detector(_config())
    _run(a, X[:3000])
    b = Detector(_config())
    b.restore(a.state(5.0))
    ra, rb = _run(a, X[3000:], start=3000), _run(b, X[3000:], start=3000)
    assert [r.decisions() for r in ra] == [r.decisions() for r in rb]
    assert a.state(5.0)["offsets"] == b.state(5.0)["offsets"] == {"in": {"0": 6000}}
    assert a.model.n_seen_ == b.model.n_seen_


def test_restore_refuses_a_different_dimension():
    a = Detector(_config())
    with pytest.raises(ValueError, match="the checkpoint is for input.dimension=4, the config says 5"):
        Detector(_config(input={"dimension": 5})).restore(a.state(5.0))


def test_restore_refuses_fields_given_or_dropped():
    arrays = Detector(_config())
    names = Detector(_config(input={"format": "json", "fields": ["a", "b", "c", "d"]}))
    with pytest.raises(ValueError, match=r"learned on input.fields none \(arrays\), the config says \['a'"):
        Detector(_config(input={"format": "json", "fields": ["a", "b", "c", "d"]})).restore(arrays.state(5.0))
    with pytest.raises(ValueError, match=r"learned on input.fields \['a', 'b', 'c', 'd'\], the config says none"):
        Detector(_config()).restore(names.state(5.0))


def test_a_restart_applies_the_settings_a_learned_model_can_change_and_names_the_others():
    rng = np.random.default_rng(6)
    X, _ = random_mixture(3, 4, rng).sample(4000, rng)
    a = Detector(_config(threshold={"quantile": 0.01}))
    _run(a, X)
    b = Detector(_config(model={"n_components": 5, "covariance_type": "diag", "half_life": 5000, "rare_weight": 0.02},
                         threshold={"quantile": 0.001}))
    b.restore(a.state(5.0))
    assert b.model.half_life == 5000 and b.model.rare_weight == 0.02  # applied
    assert b.model.n_components_ == 3 and b.model.covariance_type_ == "full"  # kept, and said
    notes = "\n".join(b.restore_notes)
    assert "model.half_life is now 5000" in notes and "model.rare_weight is now 0.02" in notes
    assert "model.n_components: the config says 5 but the checkpoint's model has 3" in notes
    assert "model.covariance_type: the config says 'diag'" in notes and "checkpoint.dir" in notes
    assert "threshold.quantile is now 0.001 (the checkpoint's threshold was for 0.01)" in notes
    assert b.threshold.value < a.threshold.value  # re-estimated for the rarer quantile at once
    unchanged = Detector(_config(threshold={"quantile": 0.01}))
    unchanged.restore(a.state(5.0))
    assert unchanged.restore_notes == [] and unchanged.threshold.value == a.threshold.value


def test_a_restart_keeps_what_a_learned_model_cannot_take_and_says_so():
    rng = np.random.default_rng(8)
    X, _ = random_mixture(3, 4, rng).sample(2000, rng)
    a = Detector(_config(model={"n_components": "auto", "max_components": 8}))
    _run(a, X)
    # Valid for K=3 but not for the checkpoint's auto model (min_weight < 1/max_components), and
    # a warm-up that would change a learned model's step size (t0 null: the warm-up's length).
    b = Detector(_config(model={"n_components": 3, "min_weight": 0.2, "warmup": 50}))
    b.restore(a.state(5.0))
    notes = "\n".join(b.restore_notes)
    assert "model.min_weight: the config says 0.2, which the checkpoint's model cannot take" in notes
    assert b.model.min_weight == a.model.min_weight and b.model.warmup == a.model.warmup == 500
    assert "warmup" not in notes


def test_a_fixed_threshold_takes_the_configured_value_after_a_restart():
    rng = np.random.default_rng(7)
    X, _ = random_mixture(3, 4, rng).sample(1000, rng)
    a = Detector(_config(threshold={"mode": "fixed", "value": -20.0}))
    _run(a, X)
    b = Detector(_config(threshold={"mode": "fixed", "value": -30.0}))
    b.restore(a.state(5.0))
    assert b.threshold.value == -30.0


def test_offsets_track_every_partition_including_invalid_records():
    detector = Detector(_config())
    records = [InputRecord("a", 0, 10, b"bad"), InputRecord("a", 1, 4, encode([1, 2, 3, 4], "float64")),
               InputRecord("b", 0, 0, None)]
    result = detector.process(records, now=5.0)
    assert detector.offsets == {("a", 0): 11, ("a", 1): 5, ("b", 0): 1}
    assert len(result.dead_letters) == 2 and detector.n_invalid == 2


def test_offsets_follow_a_partition_read_again_from_its_start():
    # The topic was made again and librdkafka reset to its start: the next offset is 3, not the
    # old 11 (a maximum kept committing 11, and a restart skipped the new messages).
    detector = Detector(_config())
    detector.process([InputRecord("a", 0, 10, b"bad")], now=5.0)
    detector.process([InputRecord("a", 0, 0, b"bad"), InputRecord("a", 0, 2, b"bad")], now=6.0)
    assert detector.offsets == {("a", 0): 3}


def test_non_finite_density_is_written_as_a_valid_json_number():
    rng = np.random.default_rng(6)
    X, _ = random_mixture(3, 4, rng).sample(1000, rng)
    detector = Detector(_config())
    _run(detector, X)
    result = detector.process(_records(np.array([[1e300, -1e300, 1e300, 1e300]]), start=5000), now=5.0)
    doc = json.loads(result.anomalies[0].value)
    assert doc["log_density"] < -1e300


def test_a_new_cluster_is_adopted_but_a_short_burst_is_not():
    rng = np.random.default_rng(7)
    truth = random_mixture(3, 4, rng)
    X, _ = truth.sample(60_000, rng)
    new_cluster = X[20_000:] + np.array([30.0, 0.0, 0.0, 0.0]) * (rng.random((40_000, 1)) < 0.2)
    # 100 anomalies in a row: not a regime.
    burst = X[:20_000].copy()
    burst[12_000:12_100] += 40.0
    adopting = Detector(_config(threshold={"quantile": 0.001}, model={"n_components": 5}))
    _run(adopting, burst, batch=1000)
    assert not adopting.adopting and adopting.points_above == 0
    results, adopted = [], False
    for i in range(0, len(new_cluster), 1000):
        results += _run(adopting, new_cluster[i:i + 1000], batch=1000, start=20_000 + i)
        adopted |= adopting.adopting  # (over once the rate has fallen back)
    assert adopted
    late = sum(len(r.anomalies) for r in results[-5:]) / 5_000
    assert late < 0.03, f"the new cluster (20% of points) is still flagged at rate {late:.3f}"

    frozen = Detector(_config(threshold={"quantile": 0.001, "adopt": False}, model={"n_components": 5}))
    _run(frozen, burst, batch=1000)
    results = _run(frozen, new_cluster, batch=1000, start=20_000)
    assert sum(len(r.anomalies) for r in results[-5:]) / 5_000 > 0.15  # never learned


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_self_sized_model_grows_a_component_for_a_cluster_that_appears_later(seed):
    # An operator's stream: one Gaussian through the warm-up (auto chooses K=1), then 10% of the
    # points from a new cluster. Adopting it by stretching the one component never ended: the
    # new cluster was flagged at 100% for 50,000 points and more.
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(70_000, 3))
    late = np.zeros(len(X), dtype=bool)
    late[20_000:] = rng.random(50_000) < 0.1
    X[late] += 8.0
    glitches = np.arange(20_000, 70_000, 997)
    X[glitches, 0] = 1e9  # an overflowed counter now and then: flagged, never learned
    detector = Detector(_config(input={"dimension": 3}, model={"n_components": "auto", "warmup": 1000}))
    results = _run(detector, X, batch=1000)
    flags = np.concatenate([r.flags for r in results])
    for r in results:  # what is reported is what was decided, also in the step that grew the model
        assert np.all(r.log_density[r.flags] < r.thresholds[r.flags])
    late[glitches] = False
    assert flags[glitches - 1000].all()
    scored_late = late[1000:]
    assert detector.model.n_components_ >= 2 and np.abs(detector.model.means_).max() < 20
    assert flags[-10_000:][scored_late[-10_000:]].mean() < 0.05  # adopted
    assert flags[-10_000:][~scored_late[-10_000:]].mean() < 0.003  # the rest about q (0.001)


def test_a_backlog_taken_in_one_batch_is_flagged_as_in_small_batches():
    # A daemon started on a backlog polls large batches from the first one on. The young
    # model's threshold must still be refreshed on its schedule inside such a batch, not left
    # at the warm-up model's value for all of it (that flagged twice as many points).
    rng = np.random.default_rng(11)
    X, _ = random_mixture(3, 4, rng).sample(20_000, rng)
    one_batch, small_batches = Detector(_config()), Detector(_config())
    big = one_batch.process(_records(X), now=5.0)
    small = _run(small_batches, X, batch=250)
    flagged_small = sum(int(r.flags.sum()) for r in small)
    assert len(big.log_density) == sum(len(r.log_density) for r in small) == 19_500  # all scored, in order
    np.testing.assert_array_equal(big.scored_index, np.arange(500, 20_000))
    assert big.flags.sum() <= 1.25 * flagged_small + 2  # 35 against 18 without the refreshes
    assert one_batch.model.n_seen_ == 20_000 - big.flags.sum()  # the rest learned


# ------------------------------------------------- explained anomalies, scores for every point
def _trained(seed=12, **sections):
    rng = np.random.default_rng(seed)
    X, _ = random_mixture(3, 4, rng).sample(6000, rng)
    detector = Detector(_config(**sections))
    _run(detector, X, batch=1000)
    return detector, X


def test_an_anomaly_record_names_the_feature_that_is_off_and_how_rare_the_point_is():
    names = ["cpu", "mem", "bytes_out", "conns"]
    detector, X = _trained(input={"fields": names}, threshold={"mode": "fixed", "value": -20.0})
    point = X[:1].copy()
    point[0, 2] += 3 * X[:, 2].std()
    doc = json.loads(detector.process(_records(point, start=6000), now=5.0).anomalies[0].value)
    # The keys consumers rely on are all there, as before.
    assert set(doc) >= {"source", "features", "log_density", "threshold", "component", "model_version", "n_seen",
                        "detected_at"}
    assert doc["features"] == point[0].tolist() and doc["feature_names"] == names
    first = doc["top_features"][0]
    assert first["name"] == "bytes_out" and first["value"] == doc["features"][2]
    lo, hi = first["normal_range"]
    assert lo < first["expected"] < hi and not lo <= first["value"] <= hi and abs(first["z"]) > 5
    assert first["share"] > 0.5 and len(doc["top_features"]) == 3
    assert len({f["name"] for f in doc["top_features"]}) == 3
    nearest = doc["nearest_component"]
    assert 0 <= nearest["index"] < 3 and 0 < nearest["weight"] < 1
    assert nearest["weight"] == pytest.approx(float(detector.model.weights_[nearest["index"]]))
    assert nearest["mahalanobis"] ** 2 >= sum(f["z"] ** 2 for f in doc["top_features"]) - 1e-6
    rarity = doc["rarity"]
    assert rarity["method"] == "model_bound"  # a fixed threshold has no tail model
    assert 0 < rarity["tail_probability"] < 1e-6
    assert rarity["log10_tail_probability"] == pytest.approx(math.log10(rarity["tail_probability"]))
    assert rarity["one_in"] == pytest.approx(1 / rarity["tail_probability"], rel=5e-3)


def test_features_are_named_f0_to_fd_without_input_fields_and_top_features_can_be_turned_off():
    detector, X = _trained(threshold={"mode": "fixed", "value": 1e9}, input={"explain_top_features": 0})
    doc = json.loads(detector.process(_records(X[:1]), now=5.0).anomalies[0].value)
    assert doc["feature_names"] == ["f0", "f1", "f2", "f3"] and doc["top_features"] == []
    detector, X = _trained(threshold={"mode": "fixed", "value": 1e9}, input={"explain_top_features": 9})
    doc = json.loads(detector.process(_records(X[:1]), now=5.0).anomalies[0].value)
    assert sorted(f["name"] for f in doc["top_features"]) == ["f0", "f1", "f2", "f3"]


def test_every_anomaly_of_a_batch_is_explained_at_once():
    detector, X = _trained(threshold={"mode": "fixed", "value": -12.0})
    points = X[:200].copy()
    feature = np.arange(200) % 4
    points[np.arange(200), feature] += 12 * X.std(axis=0)[feature]
    result = detector.process(_records(points, start=6000), now=5.0)
    assert len(result.anomalies) == 200
    docs = [json.loads(record.value) for record in result.anomalies]
    assert [doc["source"]["offset"] for doc in docs] == list(range(6000, 6200))
    named = [doc["top_features"][0]["name"] for doc in docs]
    assert np.mean([name == f"f{j}" for name, j in zip(named, feature)]) >= 0.95


def test_no_score_records_unless_kafka_scores_topic_is_set():
    detector, X = _trained()
    result = detector.process(_records(X[:100], start=6000), now=5.0)
    assert result.scores == [] and result.outputs() == result.anomalies + result.dead_letters


def test_scores_topic_gets_one_compact_record_per_scored_point():
    detector, X = _trained(kafka={"scores_topic": "scores"}, threshold={"mode": "fixed", "value": -20.0})
    records = _records(np.vstack([X[:5], [[1e300, -1e300, 1e300, 1e300]], X[5:8] + 8.0]), start=6000)
    records.append(InputRecord("in", 0, 6009, b"short"))  # invalid: a dead letter, no score
    keys = [None, b"\xff\xfe", b'say "hi"\\', "ключ".encode()]
    records[:4] = [InputRecord(r.topic, r.partition, r.offset, r.value, key=k, timestamp=r.timestamp)
                   for r, k in zip(records[:4], keys)]
    result = detector.process(records, now=5.0)
    assert len(result.scores) == 9 and len(result.dead_letters) == 1
    assert result.outputs() == result.anomalies + result.dead_letters + result.scores
    docs = [json.loads(record.value) for record in result.scores]
    assert [record.topic for record in result.scores] == ["scores"] * 9
    assert [record.key for record in result.scores] == [r.key for r in records[:9]]
    assert [record.source for record in result.scores] == [("in", 0, 6000 + i) for i in range(9)]
    assert docs[0]["key"] is None and docs[1] == {**docs[1], "key": None, "key_base64": "//4="}
    assert docs[2]["key"] == 'say "hi"\\' and docs[3]["key"] == "ключ" and docs[4]["key"] == "6004"
    decisions = result.decisions()
    for doc, (density, flagged, component) in zip(docs, decisions):
        assert set(doc) - {"key_base64"} == {"topic", "key", "partition", "offset", "log_density", "threshold",
                                             "anomaly", "component", "tail_probability", "one_in"}
        assert doc["log_density"] == pytest.approx(max(density, -1.7976931348623157e308))
        assert (doc["anomaly"], doc["component"], doc["threshold"]) == (flagged, component, -20.0)
        assert 0 <= doc["tail_probability"] <= 1
    assert [doc["anomaly"] for doc in docs] == [False] * 5 + [True] * 4
    assert docs[5]["tail_probability"] == 0.0 and docs[5]["one_in"] is None and docs[5]["log_density"] < -1e300
    assert docs[6]["one_in"] > 1e6
    # The anomaly records and the score records say the same about how rare a point is.
    anomaly = json.loads(result.anomalies[1].value)
    assert anomaly["rarity"]["tail_probability"] == pytest.approx(docs[6]["tail_probability"], rel=1e-9)


def test_scores_topic_has_a_record_for_every_valid_message_warm_up_included():
    rng = np.random.default_rng(9)
    X, _ = random_mixture(3, 4, rng).sample(1200, rng)
    detector = Detector(_config(kafka={"scores_topic": "scores"}))
    results = _run(detector, X, batch=300)
    docs = [json.loads(record.value) for r in results for record in r.scores]
    assert [doc["offset"] for doc in docs] == list(range(1200))
    warm = docs[:500]  # model.warmup: learned, not scored
    assert all(doc["log_density"] is None and doc["anomaly"] is False and doc["threshold"] is None for doc in warm)
    assert all(doc["log_density"] is not None for doc in docs[500:])


@pytest.mark.parametrize("raw, message", [
    ({"kafka": {"scores_topic": "anomalies"}}, "kafka.scores_topic: 'anomalies' is not allowed; use a topic of its own"),
    ({"kafka": {"scores_topic": "features"}}, "kafka.scores_topic: 'features' is not allowed"),
    ({"kafka": {"scores_topic": ""}}, "kafka.scores_topic: '' is not allowed"),
    ({"input": {"explain_top_features": -1}}, "input.explain_top_features: -1 is not allowed; use a number of features >= 0"),
])
def test_scores_topic_and_explain_top_features_are_checked(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(raw)


def _appearing_cluster_stream(seed):
    """8,000 points of two clusters, then a batch where half the points come from a third, near
    enough to the others that its points are scored low but not flagged (a regime appearing)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0, 0, 0], [6.0, 0, 0, 0], [3.0, 4.5, 0, 0]])
    X = centres[rng.integers(0, 2, 8_000)] + rng.normal(size=(8_000, 4))
    labels = np.where(rng.random(2_000) < 0.5, 2, rng.integers(0, 2, 2_000))
    change = centres[labels] + rng.normal(size=(2_000, 4))
    return X, change, labels == 2


def _steps_taken(X, batch, seed, monkeypatch=None):
    """(n_updates for ``batch`` after X, its log-densities), with the careful step as it is
    or, given monkeypatch, never taken."""
    import streamgmm.detection.detector as detector_module

    if monkeypatch is not None:
        monkeypatch.setattr(detector_module, "CAREFUL_STEP", 10**9)
    detector = Detector(_config(model={"n_components": 2, "warmup": 1_000, "random_state": seed}))
    _run(detector, X, batch=1_000)
    before = detector.n_updates
    result = detector.process(_records(batch, start=len(X)), now=5.0)
    return detector.n_updates - before, result.log_density


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_batch_that_brings_a_new_cluster_is_learned_in_small_steps(seed, monkeypatch):
    X, change, new = _appearing_cluster_stream(seed)
    steps, density = _steps_taken(X, change, seed)
    steps_at_once, density_at_once = _steps_taken(X, change, seed, monkeypatch)
    assert steps >= steps_at_once + 10
    # Its points late in the batch were scored by a model that had learned its earlier ones.
    late = np.s_[-1_000:]
    assert np.median(density[late][new[late]]) > np.median(density_at_once[late][new[late]]) + 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_batch_like_the_others_is_learned_as_it_comes(seed, monkeypatch):
    X, _, _ = _appearing_cluster_stream(seed)
    steps, density = _steps_taken(X[:7_000], X[7_000:], seed)
    steps_at_once, density_at_once = _steps_taken(X[:7_000], X[7_000:], seed, monkeypatch)
    assert steps == steps_at_once
    np.testing.assert_array_equal(density, density_at_once)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_restored_detector_steps_a_changing_batch_as_the_original(seed):
    # The careful step reads the threshold's tail: a checkpoint must carry it, or a rewind would
    # decide the replayed batch differently from the first time.
    from streamgmm.service.state import pack, unpack

    X, _, _ = _appearing_cluster_stream(seed)
    # A batch where 15% of the points moved 2 standard deviations: in the tail, seldom flagged.
    rng = np.random.default_rng(seed)
    change = X[rng.integers(0, len(X), 2_000)] + np.outer(rng.random(2_000) < 0.15, [0.0, 2.0, 0.0, 0.0])
    config = _config(model={"n_components": 2, "warmup": 1_000, "random_state": seed})
    a = Detector(config)
    _run(a, X, batch=1_000)
    b = Detector(config)
    b.restore(unpack(pack(a.state(5.0))))
    before_a, before_b = a.n_updates, b.n_updates
    ra = a.process(_records(change, start=len(X)), now=5.0)
    rb = b.process(_records(change, start=len(X)), now=5.0)
    assert a.n_updates - before_a == b.n_updates - before_b > 10
    np.testing.assert_array_equal(ra.log_density, rb.log_density)
    assert ra.decisions() == rb.decisions()


@pytest.mark.parametrize("broken", ["no counters", "offsets not a mapping"])
def test_a_malformed_checkpoint_is_refused_with_a_value_error(broken):
    rng = np.random.default_rng(3)
    X, _ = random_mixture(3, 4, rng).sample(1_000, rng)
    a = Detector(_config())
    _run(a, X)
    state = a.state(5.0)
    if broken == "no counters":
        del state["counters"]
    else:
        state["offsets"] = [1, 2]
    with pytest.raises(ValueError, match="malformed"):
        Detector(_config()).restore(state)


@pytest.mark.parametrize("key", [b"k" * 950_000, "é".encode() * 475_000, bytes(range(256)) * 3000])
def test_a_huge_key_is_cut_in_the_documents_and_in_the_record(key):
    # A 950 KB key, copied into the anomaly document's source too, made records the broker
    # refused as too large: 3 of 226 outliers never reached the output topic.  A 1.2 MB key
    # (or 1.2 MB of headers), which the broker took on input, did so as the record's own key:
    # every anomaly and dead letter of that message was dropped (helper-39).
    from streamgmm.detection.records import (KEY_FIELD_MAX_BYTES, OUTPUT_KEY_MAX_BYTES, anomaly_record, dead_letter,
                                             score_records)

    record = InputRecord("in", 0, 7, b"[1,2]", key=key,
                         headers=(("a", b"x" * 600_000), ("trace", b"t-1"), ("b", b"y" * 600_000)))
    out = anomaly_record("anomalies", record, {"log_density": -50.0})
    source = json.loads(out.value)["source"]
    assert out.key == key[:OUTPUT_KEY_MAX_BYTES] and len(out.value) < 2 * KEY_FIELD_MAX_BYTES
    headers = dict(out.headers)
    assert headers["streamgmm.key.original_bytes"] == str(len(key)).encode()
    assert headers["streamgmm.key.original_sha256"] == hashlib.sha256(key).hexdigest().encode()
    assert "a" not in headers and headers["streamgmm.headers.dropped"] == b"2 headers, 1200002 bytes"
    assert headers["trace"] == b"t-1"  # a small header stays beside the oversized ones
    letter = dead_letter("dead", record, "undecodable", "x", 65_536)
    assert letter.key == out.key and sum(len(k) + len(v) for k, v in letter.headers) < 4096
    assert source["key_truncated"] is True and source["key_bytes"] == len(key)
    assert source["key_sha256"] == hashlib.sha256(key).hexdigest()
    if source["key"] is None:  # binary: base64 of its first KEY_FIELD_MAX_BYTES
        assert base64.b64decode(source["key_base64"]) == key[:KEY_FIELD_MAX_BYTES] and not key.isascii()
    else:
        assert len(source["key"].encode()) <= KEY_FIELD_MAX_BYTES and key[:KEY_FIELD_MAX_BYTES].startswith(
            source["key"].encode())
    score = score_records("scores", (["in"], [0], [7], [key]), log_density=[-5.0], threshold=-20.0, flags=[False],
                          components=[0], tail_probability=[0.5], one_in=[2])[0]
    assert score.key == key[:OUTPUT_KEY_MAX_BYTES] and json.loads(score.value)["key_bytes"] == len(key)


@pytest.mark.parametrize("value", [1e308, -1e308, 1e200])
def test_a_value_whose_square_overflows_is_as_rare_as_can_be_written_not_impossible(value):
    # Its density is -inf: the record's log10_tail_probability was null, where the README
    # promises it still says how rare the point is.
    rng = np.random.default_rng(0)
    detector = Detector(_config())
    _run(detector, rng.normal(size=(6000, 4)))
    result = detector.process(_records(np.array([[value, 0.0, 0.0, 0.0]]), start=9000), now=5.0)
    rarity = json.loads(result.anomalies[0].value)["rarity"]
    assert rarity["log10_tail_probability"] < -1e300 and rarity["one_in"] is None


@pytest.mark.parametrize("seed", [0, 1])
def test_a_feature_that_is_almost_always_zero_is_flagged_at_about_q(seed):
    # A value non-zero in 1% of the rows (bytes of errors, log-normal) beside correlated features:
    # with rare_weight 0.01 the components covering the non-zero rows weighed under it, so every
    # such row, 10 q of the traffic, scored by the others only and was flagged: 10.5-11.1 q at
    # q = 0.001 (helper-31).  rare_weight auto is q here: a mode more frequent than q is normal.
    rng = np.random.default_rng(1000 + seed)
    n = 100_000
    spike = np.exp(rng.normal(3.0, 1.0, n)) * (rng.random(n) < 0.01)
    X = np.c_[spike, rng.normal(size=(n, 3)) @ rng.normal(size=(3, 3))]
    detector = Detector(config_from_dict({"input": {"format": "float64", "dimension": 4},
                                          "model": {"random_state": seed}, "threshold": {"quantile": 0.001}}))
    assert detector.model.rare_weight == 0.001
    flags = np.concatenate([r.flags for r in _run(detector, X, batch=1000)])
    assert 0.4 <= flags.mean() / 0.001 <= 2.5, flags.mean() / 0.001  # 0.63-0.97 on seeds 0-3; 9.6-11 before


def test_a_message_without_a_real_timestamp_is_not_timed():
    # One message stamped 1 ms (1970) put 56 years into the latency histogram's sum.
    X = np.random.default_rng(0).normal(size=(600, 4))
    now = 1_764_000_000.0
    records = [InputRecord("in", 0, i, encode(x, "float64"), timestamp=1 if i % 2 else int(now * 1000) - 250)
               for i, x in enumerate(X)]
    result = Detector(_config()).process(records, now=now)
    assert len(result.latencies_seconds) == 300 and np.allclose(result.latencies_seconds, 0.25)


@pytest.mark.parametrize("seed, in_warmup", [(0, 1), (2, 3)])
def test_a_glitch_in_the_warm_up_does_not_make_its_like_normal(seed, in_warmup):
    # One to three far points in the warm-up got a component of their own (weight 0.001-0.003),
    # and the same glitch later scored as normal under it: 1-9 of 20 flagged (helper-39: 22 of
    # 52 outliers never reported by one member of a group).
    rng = np.random.default_rng(seed)
    X, _ = random_mixture(3, 4, rng).sample(4000, rng)
    glitch = np.array([80.0, -80.0, 80.0, -80.0])
    X[rng.choice(np.arange(50, 950), in_warmup, replace=False)] = glitch + rng.normal(size=(in_warmup, 4))
    later = rng.choice(np.arange(1100, 4000), 20, replace=False)
    X[later] = glitch + rng.normal(size=(20, 4))
    detector = Detector(_config(threshold={"quantile": 0.001},
                                model={"random_state": seed, "warmup": 1000, "n_components": "auto"}))
    flagged = {r.source[2] for result in _run(detector, X, batch=1000) for r in result.anomalies}
    assert set(later.tolist()) <= flagged


def test_a_backlog_warms_the_model_up_on_every_partition_not_the_first():
    # A backlog's batch holds one partition after another: the warm-up took the first 1,000
    # rows, all of partition 0, and a stream whose partitions carry regimes of their own (keyed
    # by host) flagged the other partitions' normal points (135 false alarms against 10 when
    # interleaved; helper-39).
    rng = np.random.default_rng(5)
    centres = rng.normal(scale=10.0, size=(4, 4))
    batch = [record for p in range(4)
             for record in _records(centres[p] + rng.normal(size=(1500, 4)), partition=p)]
    detector = Detector(_config(threshold={"quantile": 0.001},
                                model={"n_components": "auto", "warmup": 1000, "random_state": 0}))
    result = detector.process(batch, now=5.0)
    assert len(result.warmup_index) == 1000 and len(result.scored_index) == 5000
    assert len(result.anomalies) <= 10, f"{len(result.anomalies)} of 5,000 normal points flagged"


@pytest.mark.parametrize("name", ["Student t, 3 degrees of freedom", "log-normal", "exponentials", "log-Cauchy"])
def test_anomaly_records_on_clean_heavy_tailed_streams_claim_1_in_a_million_about_as_often_as_that(name):
    # The first step after the warm-up took the Gaussian components' bound (1 in 1e14 a few nats
    # past the threshold), and past every score seen the fitted tail alone spoke: records claiming
    # 1 in 1e6 or more came 32.6 times as often as that over 14 clean streams (bench_rarity.py).
    found, points = 0, 0
    for seed in range(4):
        rng = np.random.default_rng(200 + seed)
        rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
        z = rng.normal(size=(31_000, 8)) * rng.uniform(0.5, 2.0, 8)
        X = {"Student t, 3 degrees of freedom": lambda: (z / np.sqrt(rng.chisquare(3, (31_000, 1)) / 3)) @ rotation,
             "log-normal": lambda: np.exp(0.5 * z @ rotation),
             "exponentials": lambda: rng.exponential(rng.uniform(0.5, 5.0, 8), (31_000, 8)),
             # Far points more frequent than q, taken out of the tail as a far cluster: they were
             # then in neither the tail nor the flagged points the rarity floor counts (187 records
             # of 1 in 1e6 for 0.3 expected in bench_rarity.py).
             "log-Cauchy": lambda: np.exp(np.clip(0.3 * rng.standard_cauchy((31_000, 8)), -50.0, 50.0))}[name]()
        detector = Detector(_config(input={"dimension": 8},
                                    model={"n_components": "auto", "warmup": 1000, "random_state": seed}))
        for result in _run(detector, X, batch=1000):
            points += len(result.scored_index)
            found += sum(json.loads(r.value)["rarity"]["tail_probability"] <= 1e-6 for r in result.anomalies)
    assert found <= 2, f"{found} records claimed 1 in 1e6 or more in {points:,} clean points ({points * 1e-6:.2f} expected)"


def test_the_same_far_glitch_seen_again_does_not_call_itself_new_each_time():
    # A log-Cauchy clipped at e^+-50 (bench_rarity.py's): 1.1% of the rows hold the clip value,
    # flagged as glitches, each scored a little further than the last as the model moved, so
    # beyond every score seen: 167 records called themselves 1 in 20,000 for rows that came at
    # 1 in 90. Beyond z_far, "as low" counts within a tenth of the excess.
    X = np.exp(np.clip(np.random.default_rng(5002).standard_cauchy((101_000, 3)) * 0.3, -50.0, 50.0))
    detector = Detector(_config(input={"dimension": 3}, model={"n_components": "auto", "warmup": 1000, "random_state": 2}))
    claims = [json.loads(r.value)["rarity"]["tail_probability"] for result in _run(detector, X, batch=1000)
              for r in result.anomalies]
    assert sum(p <= 1e-4 for p in claims) <= 10, f"{sum(p <= 1e-4 for p in claims)} claims of 1 in 10,000 or more"


def _switching(rng, n, block, d=4, shift=6.0):
    return rng.normal(size=(n, d)) + np.where((np.arange(n) // block) % 2 == 1, shift, 0.0)[:, np.newaxis]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_regime_that_comes_back_is_learned_after_a_few_returns(seed):
    # A mean that moves 6 sd for 7,500 points in every 15,000 (a batch job, a load that
    # switches): each block was shorter than adopt_after, the count of points above the
    # adoption rate started again from 0 at every quiet spell, and every block was flagged for
    # ever: 51 q at q = 0.01 over 150,000 points.
    rng = np.random.default_rng(seed)
    X = _switching(rng, 150_000, 7_500)
    detector = Detector(_config(threshold={"quantile": 0.01}, model={"n_components": "auto", "warmup": 1000,
                                                                     "random_state": seed}))
    flags = np.concatenate([np.zeros(1000, dtype=bool)] + [r.flags for r in _run(detector, X, batch=1000)])
    assert flags[75_000:].mean() / 0.01 < 3.0, f"{flags[75_000:].mean() / 0.01:.1f} q in the second half"


@pytest.mark.xfail(strict=True, reason="known: a regime that comes back at under a third of the stream is "
                                        "flagged for good at q = 0.01 (BENCHMARKS.md, fourteenth session)")
def test_a_weekend_is_learned_within_weeks():
    # A level that drops to a fifth at weekends (1,440 points a day): two days in seven, under
    # the third of the stream the flagged points must make, and the rate falls below 10 q
    # within each week: every weekend is flagged whole for ten weeks at q = 0.01, 29 q
    # (helper-73).  A lower bar for spells that come back (a sixth) learned it at the fifth
    # weekend, and with it recurring floods of anomalies of a sixth to a third of the stream,
    # floods after an unrelated burst and bursts after an adoption (helper-74): taken back.
    n = 100_000
    rng = np.random.default_rng(0)
    day = (np.arange(n) // 1440) % 7
    weekend = day >= 5
    hour = (np.arange(n) % 1440) / 60.0
    level = np.where(weekend, 20.0, 100.0) * (1.0 + 0.3 * np.sin(2.0 * np.pi * hour / 24.0))
    X = np.column_stack([level + rng.normal(0.0, 5.0, n), np.where(weekend, 2.0, 8.0) + rng.normal(size=n),
                         rng.normal(size=n)])
    config = config_from_dict({"input": {"format": "float64", "dimension": 3}, "threshold": {"quantile": 0.01}})
    detector = Detector(config)
    flags = np.zeros(n, dtype=bool)
    for start in range(0, n, 1000):
        result = detector.process(_records(X[start:start + 1000], start=start), now=0.0)
        flags[start + result.scored_index] = result.flags
    last_weekends = weekend & (np.arange(n) >= 70_000)
    assert flags[last_weekends].mean() < 0.2, f"{flags[last_weekends].mean():.2f} of the last weekends flagged"


@pytest.mark.xfail(strict=True, reason="known: the near points of a flood are learned as a threshold set a little "
                                        "too low (BENCHMARKS.md, fourteenth session)")
def test_a_flood_of_points_just_past_the_threshold_is_not_learned_as_a_threshold_set_too_low():
    # 2,000 points 4-6 sd off in one feature among 10,000 (20%) at q = 0.001: flags just past
    # the threshold come at over 3 q, and 265-299 of the burst are learned as the signs of a
    # threshold a little too low: recall 0.75-0.83, the widened model flags 0.4 q after it
    # (helper-73).  A gate on the flags further out (over 30 q: a flood) let a sine's values at
    # 1e-4 run away and a normal mean shift wait for adoption (helper-75): taken back.
    rng = np.random.default_rng(2)
    n, sd = 70_000, np.array([1.0, 10.0, 0.1, 100.0])
    C = np.array([[1, .7, 0, 0], [.7, 1, 0, 0], [0, 0, 1, -.5], [0, 0, -.5, 1]])
    X = rng.normal(size=(n, 4)) @ np.linalg.cholesky(C).T
    X[rng.random(n) < 0.35] += [6.0, -4.0, 3.0, 2.0]
    X *= sd
    burst = np.sort(rng.choice(np.arange(50_000, 60_000), 2_000, replace=False))
    feature = rng.integers(0, 4, len(burst))
    X[burst, feature] += sd[feature] * rng.choice([-1.0, 1.0], len(burst)) * rng.uniform(4.0, 6.0, len(burst))
    detector = Detector(config_from_dict({"input": {"format": "float64", "dimension": 4},
                                          "threshold": {"quantile": 0.001}}))
    flags = np.zeros(n, dtype=bool)
    for start in range(0, n, 1000):
        result = detector.process(_records(X[start:start + 1000], start=start), now=0.0)
        flags[start + result.scored_index] = result.flags
    assert flags[burst].mean() >= 0.9, f"recall {flags[burst].mean():.3f}"
    assert detector.n_flagged_learned < 50, detector.n_flagged_learned


def test_bursts_far_apart_are_never_adopted():
    # 2,000 far outliers every 20,000 points: each burst stays flagged, whole, however many come.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200_000, 4))
    burst = np.zeros(len(X), dtype=bool)
    for start in range(10_000, len(X), 20_000):
        burst[start:start + 2_000] = True
    X[burst] += 12.0
    detector = Detector(_config(threshold={"quantile": 0.001}, model={"n_components": 3, "warmup": 1000}))
    flags = np.concatenate([np.zeros(1000, dtype=bool)] + [r.flags for r in _run(detector, X, batch=1000)])
    assert flags[burst].all(), f"{np.count_nonzero(~flags[burst])} burst points not flagged"
    assert not detector.adopting


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_normal_regime_first_seen_during_calibration_does_not_blind_the_threshold_for_a_window(seed):
    # Regime B (another mean and spread) every other 2,500 rows from row 2,500: its first ~100
    # points, scored before the model learned B, filled the young tail; z_q sat at ~450 nats
    # for 21,500 rows at q = 0.001, and points 25 sd off went unflagged (helper-50).
    rng = np.random.default_rng(seed)
    n = 40_000
    in_b = (np.arange(n) // 2_500) % 2 == 1
    a = rng.normal(size=(n, 3)) @ np.array([[1.0, 0, 0], [0.9, 0.44, 0], [0, 0, 1.0]]).T
    b = rng.normal(size=(n, 3)) * [2.0, 0.5, 1.0] + [6.0, -4.0, 3.0]
    X = np.where(in_b[:, np.newaxis], b, a)
    detector = Detector(_config(input={"dimension": 3}, threshold={"quantile": 0.001},
                                model={"n_components": "auto", "warmup": 1000, "random_state": seed}))
    blind = 0
    for start in range(0, n, 500):
        detector.process(_records(X[start:start + 500], start=start), now=5.0)
        z = detector.threshold.z
        blind += 500 if z is not None and z > 100.0 else 0
    assert blind <= 12_000, f"the threshold stood over 100 nats out for {blind:,} rows"


def test_a_wide_input_is_not_flagged_wholesale_after_the_warm_up():
    # 200 features, 1,000 warm-up points: the model scores its own draws far higher than new
    # points, and its start value (a quantile of its own density) flagged 178-184 of the first
    # 300 normal points scored (helper-49).  Polled a message at a time too.
    for seed, batch in ((0, 100), (1, 1)):
        rng = np.random.default_rng(seed)
        centres = rng.normal(scale=5.0, size=(3, 200))
        X = centres[rng.integers(0, 3, 1_300)] + rng.normal(size=(1_300, 200))
        detector = Detector(_config(input={"dimension": 200}, threshold={"quantile": 0.001},
                                    model={"n_components": "auto", "warmup": 1000, "random_state": seed}))
        flags = np.concatenate([r.flags for r in _run(detector, X, batch=batch)])
        assert np.count_nonzero(flags[:300]) <= 12, f"{np.count_nonzero(flags[:300])} of the first 300 flagged"


def test_the_model_quantile_draws_fewer_points_of_many_features():
    # 200,000 draws of 300 features: 1.26 GB at the end of the warm-up (helper-49).
    from streamgmm.detection.threshold import ModelQuantileThreshold

    asked = []

    class Model:
        is_initialized, n_seen_, n_features_in_ = True, 1000, 300

        def density_quantile(self, quantile, n_samples, random_state=None):
            asked.append(n_samples)
            return -10.0

    ModelQuantileThreshold(1e-5).update(Model())
    assert asked and asked[0] <= 20_000, f"{asked[0]:,} draws of 300 features"  # 200,000 before


@pytest.mark.parametrize("batch", [20, 100, 1000])
def test_anomalies_right_after_the_warm_up_are_flagged_whatever_the_batches(batch):
    # A start value moved by the median of the points being judged went below them: 100 points
    # 8 sd off right after the warm-up were flagged 100, 25 or 61 times for batches of 20, 100,
    # 1000 (helper-51).  The move comes from the warm-up rows.
    rng = np.random.default_rng(9)
    X = rng.normal(size=(3_000, 4))
    X[1000:1100] += 8.0
    detector = Detector(_config(threshold={"quantile": 0.01}, model={"n_components": "auto", "warmup": 1000}))
    _run(detector, X[:1000], batch=1000)
    flags = np.concatenate([r.flags for r in _run(detector, X[1000:], batch=batch, start=1000)])
    assert flags[:100].all(), f"{np.count_nonzero(flags[:100])} of 100"


def test_adopt_after_0_adopts_at_once_and_does_not_divide_by_zero():
    detector = Detector(_config(threshold={"quantile": 0.01, "adopt_after": 0}))
    rng = np.random.default_rng(2)
    _run(detector, rng.normal(size=(1_000, 4)))
    _run(detector, rng.normal(size=(500, 4)) + 30.0, start=1_000)
    assert detector.adopting or detector.n_updates > 0


def test_an_adoption_lasts_while_the_rate_stays_up_and_a_later_burst_is_not_adopted_on_its_memory():
    # Started through the flagged points' memory, an adoption ended as soon as the memory dipped,
    # with the rate still above the adoption rate; and after a long flood the memory adopted the
    # next short burst at its first step (helper-51).
    detector = Detector(_config(threshold={"quantile": 0.01}))
    ones = lambda n, share: np.arange(n) % 100 < share * 100  # noqa: E731
    for _ in range(30):
        detector._learn_flagged(ones(1_000, 1.0))  # a flood: adopted
    assert detector.adopting
    for _ in range(3):
        detector._learn_flagged(ones(1_000, 0.3))  # still well above the adoption rate (0.1)
        assert detector.adopting
    for _ in range(9):
        detector._learn_flagged(ones(1_000, 0.0))  # quiet: over
    assert not detector.adopting
    adopted = False
    for _ in range(2):
        detector._learn_flagged(ones(750, 1.0))  # a burst of 1,500
        adopted |= detector.adopting
    assert not adopted


@pytest.mark.parametrize("seed", [2, 4])
def test_a_threshold_a_little_too_low_does_not_feed_itself(seed):
    # A sine's values (1-d): the density is lowest in the middle and flat there, so the lowest
    # scores differ by thousandths of a nat. The threshold crept just past them; the flagged
    # points of the middle were not learned, the model thinned there, and more were flagged:
    # 2-4% of the points after 40,000 (7.2 q and 6.8 q at q = 0.001 over 50,000 points). The
    # flagged points just past the threshold are learned while far more than q are flagged.
    rng = np.random.default_rng(5000 + seed)
    X = np.sin(rng.uniform(0.0, 2.0 * np.pi, (51_000, 1)))
    detector = Detector(_config(input={"dimension": 1}, threshold={"quantile": 0.001},
                                model={"n_components": "auto", "warmup": 1000, "random_state": seed}))
    flagged = sum(len(result.anomalies) for result in _run(detector, X, batch=1000))
    # Not held to 0.5-2 q: a sine's share is not stable at q = 0.001 (its lowest scores lie within
    # a few thousandths of a nat, less than a score moves from one model to the next), and any
    # change to the threshold moves it between 0.04 and 3.4 q over seeds 0..4
    # (bench_calibration_bounded.py); what is tested is that it does not run away (7.2 / 6.8 q).
    assert flagged / 50_000 <= 3.0 * 0.001, f"{flagged} of 50,000 normal points flagged at q = 0.001"


def test_a_cluster_of_anomalies_just_past_the_threshold_is_not_learned_as_a_threshold_set_too_low():
    # A first version learned flagged points up to five mean excesses of the tail past the
    # threshold while far more than q were flagged: a cluster of anomalies 20 times rarer than
    # q, 5% of the traffic, was then learned and unflagged within 16,000 points (review,
    # helper-54). Two mean excesses (a tail probability down to q/7.4) keep it out.
    rng = np.random.default_rng(0)
    detector = Detector(_config(input={"dimension": 2}, threshold={"quantile": 0.01},
                                model={"n_components": "auto", "warmup": 1000, "random_state": 0}))
    _run(detector, rng.normal(size=(60_000, 2)), batch=500)
    X = rng.normal(size=(16_000, 2))
    cluster = rng.random(16_000) < 0.05
    X[cluster] = np.array([3.9, 0.0]) + 0.05 * rng.normal(size=(int(cluster.sum()), 2))
    flagged = np.zeros(16_000, dtype=bool)
    for start, result in zip(range(0, 16_000, 500), _run(detector, X, batch=500, start=60_000)):
        flagged[start + np.asarray(result.scored_index)[result.flags]] = True
    assert flagged[cluster].mean() == 1.0, f"{flagged[cluster].mean():.3f} of the cluster flagged"


def test_with_adopt_false_no_flagged_point_is_learned_even_when_far_too_many_are_flagged():
    # threshold.adopt: false keeps every flagged point out of the model (review, helper-54). A
    # spread that triples over the stream keeps flagging points just past the threshold: with
    # adopt on, some of them are learned; with it off, none.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(51_000, 2)) * np.linspace(1.0, 3.0, 51_000)[:, np.newaxis]
    learned = {}
    for adopt in (True, False):
        detector = Detector(_config(input={"dimension": 2}, threshold={"quantile": 0.001, "adopt": adopt},
                                    model={"n_components": "auto", "warmup": 1000, "random_state": 0}))
        flagged = sum(len(result.anomalies) for result in _run(detector, X, batch=1000))
        assert flagged > 100  # far more than the 50 asked for
        learned[adopt] = detector.n_flagged_learned
    assert learned[True] > 0 and learned[False] == 0, learned


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flagged_points_the_model_learns_count_in_the_thresholds_tail(seed):
    # A spread growing fourfold, without forgetting: the points just past the threshold were
    # learned by the model (a threshold a little too low) but kept out of the tail as alarms, 3 q
    # of them at most, and the threshold stayed low: 6.8-13 q flagged over the second half,
    # under the 10 q that adopts a regime.  Counted as the model learns them: 3.6-4.9 q (the
    # window's lag; a shorter threshold.window or model.half_life follows closer).
    X = np.random.default_rng(1000 + seed).normal(size=(51_000, 4)) * np.linspace(1.0, 4.0, 51_000)[:, np.newaxis]
    detector = Detector(_config(input={"dimension": 4}, threshold={"quantile": 0.001},
                                model={"n_components": "auto", "warmup": 1000, "random_state": seed}))
    flags = np.concatenate([r.flags for r in _run(detector, X, batch=1000)])
    assert flags[len(flags) // 2:].mean() / 0.001 <= 5.5


def _flagged_share(X, q, seed, warmup=1000):
    detector = Detector(_config(input={"dimension": X.shape[1]}, threshold={"quantile": q},
                                model={"n_components": "auto", "warmup": warmup, "random_state": seed}))
    flags = np.concatenate([r.flags for r in _run(detector, X, batch=1000)])
    return flags.mean() / q, detector.threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bounded_stream_whose_model_is_still_learning_is_flagged_at_about_q(seed):
    # A uniform disk: the model sharpens at its edge for tens of thousands of points and the edge
    # points' scores fall; the window's scores as they were lagged them, and 0.04 q (seed 0) and
    # 0.24 q (seed 2) were flagged at q = 0.001 (bench_calibration_bounded.py).  The stored peaks
    # are scored again by the current model, which then predicts the next points better.
    rng = np.random.default_rng(5000 + seed)
    angle, radius = rng.uniform(0.0, 2.0 * np.pi, 51_000), np.sqrt(rng.uniform(0.0, 1.0, 51_000))
    ratio, _ = _flagged_share(np.c_[radius * np.cos(angle), radius * np.sin(angle)], 0.001, seed)
    assert 0.3 <= ratio <= 2.0, f"{ratio:.2f} q flagged"


def test_under_a_drift_the_scores_as_they_were_predict_better_and_are_kept():
    # Means that move 4 units over the stream: the model lags them, and old points scored again
    # look more usual than new ones will (the window scored again flagged 1.5-1.9 q).
    from streamgmm.dev.synthetic import random_mixture

    rng = np.random.default_rng(1)
    truth = random_mixture(6, 8, rng, separation=8.0)
    X, labels = truth.sample(100_000, rng)
    direction = rng.normal(size=(6, 8))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X += direction[labels] * (4.0 * np.arange(100_000) / 100_000)[:, np.newaxis]
    ratio, threshold = _flagged_share(X, 0.001, 1)
    assert 0.5 <= ratio <= 1.4, f"{ratio:.2f} q flagged"
    assert threshold.fit["scores"] == "then"


@pytest.mark.parametrize("seed", range(5))
def test_a_fitted_tail_that_overshoots_the_windows_own_quantile_gives_way_to_it(seed):
    # An exponential's scores (1-d, q = 0.01): the top 10% were fitted a shape of 1.3-1.9, and
    # z_q sat where 0.46 q was flagged (seed 2); the window holds 200 points beyond its own 1%
    # quantile, enough to say so.
    X = np.random.default_rng(5000 + seed).exponential(1.0, (51_000, 1))
    ratio, _ = _flagged_share(X, 0.01, seed)
    assert 0.5 <= ratio <= 2.0, f"{ratio:.2f} q flagged"


def test_a_state_holding_numbers_no_model_holds_is_refused_as_malformed():
    # "n_seen": Infinity is valid JSON; int() of it overflowed past the restore's error handling
    # and out of the rebalance callback, where the state stores would have passed it over
    # (review of the eleventh session).
    detector = Detector(_config())
    _run(detector, np.random.default_rng(5).normal(size=(600, 4)))
    state = detector.state(5.0)
    state["model"]["n_seen"] = float("inf")
    with pytest.raises(ValueError, match=r"its state record is malformed \(OverflowError"):
        Detector(_config()).restore(state)


@pytest.mark.parametrize("seed", [5, 7])
def test_a_far_burst_soon_after_the_tail_starts_again_is_flagged_whole(seed):
    # A level shift the model learns lets the tail go (the stale rule), and a burst 20 sd out
    # came 1,000-2,000 points later, while the young tail counted every score: it was 3/4 of the
    # peaks, more than a far cluster may be, stretched the fit, and 22-39% of it went unflagged
    # and was learned (helper-61). Flagged points beyond the last fit's z_far are kept out.
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, (80_000, 3)) * [1.0, 2.0, 0.5] + [100.0, 50.0, 3.0]
    X[40_000:, 1] += 8.0
    sd = X[:60_000].std(axis=0)
    X[60_000:60_300] = X[:60_000].mean(axis=0) + 20.0 * sd + rng.normal(size=(300, 3)) * sd
    config = config_from_dict({"input": {"format": "float64", "dimension": 3}, "threshold": {"quantile": 0.01}})
    flags = np.concatenate([r.flags for r in _run(Detector(config), X, batch=1000)])
    assert flags[60_000 - (len(X) - len(flags)):][:300].all()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_far_burst_before_the_tail_is_calibrated_is_flagged_whole_and_not_learned(seed):
    # A tight burst of 1,000 points 6 sd out in every feature, 1,000 points after the warm-up,
    # while the young tail counted every score: it made the whole tail, the fit put z_q past it
    # (-84 nats against -10.5), 80% of it went unflagged, and the same burst 10,000 points later
    # was learned whole (q = 0.01, a data engineer's stream; this session).  Far flagged points
    # count only as the token bucket allows, from a cold start as after a restart.
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(16_000, 4))
    bursts = np.zeros(len(X), dtype=bool)
    bursts[2_000:3_000] = bursts[12_000:13_000] = True
    X[bursts] = 6.0 + 0.3 * rng.normal(size=(2_000, 4))
    config = config_from_dict({"input": {"format": "float64", "dimension": 4}, "threshold": {"quantile": 0.01}})
    detector = Detector(config)
    flags = np.zeros(len(X), dtype=bool)
    for start in range(0, len(X), 1000):
        result = detector.process(_records(X[start:start + 1000], start=start), now=0.0)
        flags[start + result.scored_index] = result.flags
    assert flags[bursts].all(), f"{np.count_nonzero(bursts & ~flags)} of the bursts' points unflagged"
    assert 0.5 <= flags[3_000:12_000].mean() / 0.01 <= 2.0


@pytest.mark.xfail(strict=True, reason="known: a normal mode the warm-up split into components under rare_weight "
                                        "is flagged for good (BENCHMARKS.md, thirteenth session)")
def test_a_normal_minority_mode_the_warm_up_made_rare_is_not_flagged_for_good():
    # Garbage collections, every 30th row (3.3%), moving with the load: the warm-up gives them
    # components under rare_weight, so they are scored by the others, flagged, never learned, and
    # their weight only falls: every one flagged to the end (4.3 q at q = 0.01; helper-65).  A
    # watch that adopted such a component learned real bursts near it (helper-69): taken back.
    q, n = 0.01, 80_000
    X = daily_load_with_collections(n, np.random.default_rng(0))
    collection = np.arange(n) % COLLECTION_EVERY == COLLECTION_EVERY - 1
    config = config_from_dict({"input": {"format": "float64", "dimension": X.shape[1]},
                               "model": {"random_state": 0}, "threshold": {"quantile": q}})
    detector = Detector(config)
    flags = np.zeros(n, dtype=bool)
    for start in range(0, n, 1000):
        result = detector.process(_records(X[start:start + 1000], start=start), now=0.0)
        flags[start + result.scored_index] = result.flags
    last = np.arange(n) >= n - 6000
    assert flags[collection & last].mean() < 0.6


def test_the_tail_fit_is_not_reused_far_below_its_own_level():
    # A daily load (the warm-up at night) with a batch job's rows every 100th row, flagged for good
    # at q = 0.01 (a mode under rare_weight): near row 9,000 the stored peaks, scored again by the
    # model that had learned the morning, fell 4.6 nats below the level the tail was fitted at; the
    # fit's scale, moved down with them, was clipped to a tenth, z_q sat 0.3 nats past the typical
    # score, and 474 of 1,000 points were flagged (helper-70).  Fitted again there: a few a batch.
    days, n, q = 80_000, 14_000, 0.01  # (the first 14,000 rows of helper-70's stream)
    rng = np.random.default_rng(1002)
    load = 1.0 + 0.6 * np.sin(2 * np.pi * (np.arange(days) / days * 4.0 - 0.25))
    X = np.column_stack([30 * load + 4 * rng.normal(size=days), 200 * load + 25 * rng.normal(size=days),
                         60 + 3 * rng.normal(size=days), 500 * load + 60 * rng.normal(size=days),
                         15 + 5 * load**2 + 2 * rng.normal(size=days)])
    job = np.arange(days) % 100 == 99
    X[job, 0] = 85 + 3 * rng.normal(size=int(job.sum()))
    X[job, 1] = 1500 + 100 * rng.normal(size=int(job.sum()))
    X, job = X[:n], job[:n]
    detector = Detector(config_from_dict({"input": {"format": "float64", "dimension": 5},
                                          "threshold": {"quantile": q}}))
    flags = np.zeros(n, dtype=bool)
    for start in range(0, n, 1000):
        result = detector.process(_records(X[start:start + 1000], start=start), now=0.0)
        flags[start + result.scored_index] = result.flags
    for start in range(2000, n, 1000):  # every batch of the base in band, or near it
        in_batch = ~job & (np.arange(n) >= start) & (np.arange(n) < start + 1000)
        assert flags[in_batch].mean() / q < 4.0, (start, flags[in_batch].mean() / q)
