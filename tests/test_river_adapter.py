"""The river adapter: river's anomaly-detector contract and evaluation on a stream with outliers."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

river = pytest.importorskip("river")
from river import anomaly, base, compose, evaluate, metrics, preprocessing  # noqa: E402

from streamgmm.mixture.river import RiverGaussianMixture  # noqa: E402


def _stream(n=4000, outlier_rate=0.02, seed=0):
    """Two correlated clusters in 4-D; outliers (label True) scattered well outside them."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0, 0.0], [6.0, -3.0, 2.0, 0.0]])
    mixing = np.array([[1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    for _ in range(n):
        if rng.random() < outlier_rate:
            x, y = rng.uniform(-12, 18, 4), True
        else:
            x, y = centers[rng.integers(2)] + rng.normal(size=4) @ mixing.T, False
        yield dict(zip(["w", "x", "y", "z"], x.tolist())), y


def test_module_import_does_not_import_river():
    code = "import sys, streamgmm.mixture.river; assert 'river' not in sys.modules, 'river imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_is_a_river_anomaly_detector():
    detector = RiverGaussianMixture()
    assert isinstance(detector, base.AnomalyDetector)
    assert not detector._supervised
    assert metrics.ROCAUC().works_with(detector)
    assert isinstance(preprocessing.StandardScaler() | detector, compose.Pipeline)
    fresh = detector.clone()
    assert type(fresh) is RiverGaussianMixture and fresh._get_params() == detector._get_params()
    copy = pickle.loads(pickle.dumps(detector))
    assert type(copy) is RiverGaussianMixture


# Scores are -log p(x), not probabilities: river's ROCAUC thresholds y_pred in [0, 1] only,
# so the exact, scale-free RollingROCAUC over a window as long as the stream is the metric.
def _auc():
    return metrics.RollingROCAUC(window_size=10_000)


def test_prequential_roc_auc_beats_chance_clearly():
    detector = RiverGaussianMixture(n_components=2, warmup=256, random_state=0)
    auc = _auc()
    for x, y in _stream():
        score = detector.score_one(x)  # score first, then learn: prequential
        if detector.mixture.is_initialized:  # before, every score is 0.0
            auc.update(y, score)
        detector.learn_one(x)
    assert auc.get() > 0.98, auc


def test_progressive_val_score_takes_it_and_beats_half_space_trees():
    ours = evaluate.progressive_val_score(_stream(), RiverGaussianMixture(n_components=2, random_state=0), _auc())
    trees = evaluate.progressive_val_score(
        _stream(), preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=0), _auc()
    )
    # Over the whole stream, warm-up included (outliers there score 0.0 like everything else).
    assert ours.get() > 0.85
    assert ours.get() > trees.get()


def test_scores_zero_until_warmed_up_then_negative_log_density():
    detector = RiverGaussianMixture(n_components=1, warmup=64, batch_size=16, random_state=0)
    stream = [x for x, _ in _stream(200, outlier_rate=0.0)]
    for x in stream[:63]:
        assert detector.score_one(x) == 0.0
        detector.learn_one(x)
    assert not detector.mixture.is_initialized  # 63 learned: 48 handed over, 15 pending
    assert detector.mixture.n_buffered_ == 48
    detector.learn_one(stream[63])
    assert detector.mixture.is_initialized and detector.mixture.n_seen_ == 64
    row = np.array([list(stream[100].values())])
    assert detector.score_one(stream[100]) == pytest.approx(-detector.mixture.score_samples(row)[0])


def test_feature_order_is_fixed_by_the_first_dict():
    detector = RiverGaussianMixture(n_components=1, warmup=100, random_state=0)
    for x, _ in _stream(300, outlier_rate=0.0):
        detector.learn_one(x)
    assert detector.features == ["w", "x", "y", "z"]
    x = {"w": 1.0, "x": 2.0, "y": -1.0, "z": 0.5}
    shuffled = {key: x[key] for key in ["z", "x", "w", "y"]}
    assert detector.score_one(shuffled) == detector.score_one(x)
    assert detector.score_one({**x, "extra": 1e9}) == detector.score_one(x)  # unknown keys are ignored
    with pytest.raises(ValueError, match=r"x lacks the feature\(s\) \['y'\]"):
        detector.score_one({"w": 1.0, "x": 2.0, "z": 0.5})


def test_batch_size_is_checked():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        RiverGaussianMixture(batch_size=0)
