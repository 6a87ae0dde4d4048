"""Stepwise online EM: accuracy against batch EM, drift, robustness, state round trips."""

import re

import numpy as np
import pytest

from streamgmm import GaussianMixture, NotFittedError, OnlineGaussianMixture
from streamgmm.mixture._gaussian import COVARIANCE_TYPES
from streamgmm.dev.synthetic import random_mixture


def _stream(model, X, batch=1000):
    for start in range(0, len(X), batch):
        model.partial_fit(X[start : start + batch])
    return model


def _assert_finite_state(model):
    for name in ("_S0", "_S1", "_S2", "_weights", "_means", "_covariances", "_precisions_chol"):
        assert np.all(np.isfinite(getattr(model, name))), name


@pytest.mark.slow
def test_one_pass_matches_batch_em_on_200k_points():
    rng = np.random.default_rng(1)
    truth = random_mixture(8, 16, rng)
    X, _ = truth.sample(200_000, rng)
    held_out, _ = truth.sample(20_000, rng)
    batch = GaussianMixture(8, n_init=2, random_state=0).fit(X)
    online = _stream(OnlineGaussianMixture(8, covariance_type="full", random_state=0), X)
    assert online.n_seen_ == 200_000
    gap = batch.score(held_out) - online.score(held_out)
    assert gap < 0.02, f"online EM is {gap:.4f} nats/point below batch EM"


@pytest.mark.slow
def test_forgetting_recovers_after_the_mixture_jumps():
    rng = np.random.default_rng(5)
    before, after = random_mixture(4, 4, rng), random_mixture(4, 4, rng)
    X_before, _ = before.sample(50_000, rng)
    X_after, _ = after.sample(50_000, rng)
    held_out, _ = after.sample(20_000, rng)
    reference = GaussianMixture(4, n_init=3, random_state=0).fit(X_after).score(held_out)
    forgetting = _stream(OnlineGaussianMixture(4, half_life=2000, random_state=0), np.vstack([X_before, X_after]), 500)
    frozen = _stream(OnlineGaussianMixture(4, random_state=0), np.vstack([X_before, X_after]), 500)
    assert reference - forgetting.score(held_out) < 0.05
    # Without forgetting the model is measurably stuck in the old regime: the test can fail.
    assert reference - frozen.score(held_out) > 0.05


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_rescaling_a_feature_keeps_the_ranking(covariance_type):
    rng = np.random.default_rng(2)
    X, _ = random_mixture(3, 4, rng).sample(6000, rng)
    scaled = X * np.array([1e6, 1e-6, 1.0, 1.0])
    plain = _stream(OnlineGaussianMixture(3, covariance_type=covariance_type, random_state=0), X)
    rescaled = _stream(OnlineGaussianMixture(3, covariance_type=covariance_type, random_state=0), scaled)
    probe, _ = random_mixture(3, 4, np.random.default_rng(9)).sample(2000, rng)
    a = plain.score_samples(probe)
    b = rescaled.score_samples(probe * np.array([1e6, 1e-6, 1.0, 1.0]))
    # Densities differ only by the Jacobian of the rescaling.
    np.testing.assert_allclose(b - a, -np.log(1e6) - np.log(1e-6), atol=1e-6)
    np.testing.assert_array_equal(np.argsort(a, kind="stable"), np.argsort(b, kind="stable"))


def test_bad_input_is_refused_and_leaves_the_model_untouched():
    rng = np.random.default_rng(3)
    model = _stream(OnlineGaussianMixture(2, warmup=500, random_state=0), rng.normal(size=(2000, 3)))
    before = model.to_dict()
    bad = rng.normal(size=(10, 3))
    bad[4, 2] = np.inf
    with pytest.raises(ValueError, match=re.escape("X contains NaN or infinity in 1 row(s), first at row 4")):
        model.partial_fit(bad)
    with pytest.raises(ValueError, match=re.escape("X has 2 features, but OnlineGaussianMixture is expecting 3 features as input")):
        model.partial_fit(rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match=re.escape("X has 0 samples; at least 1 required")):
        model.partial_fit(np.empty((0, 3)))
    after = model.to_dict()
    for key in ("S0", "S1", "S2"):
        np.testing.assert_array_equal(before[key], after[key])
    assert after["n_seen"] == before["n_seen"]


def test_huge_but_finite_values_keep_parameters_finite():
    rng = np.random.default_rng(4)
    model = _stream(OnlineGaussianMixture(2, warmup=500, random_state=0), rng.normal(size=(1000, 3)))
    hostile = np.array([[1e308, -1e308, 5e-324], [1e300, 0.0, 0.0], [0.0, 1e-300, 1e150]])
    scores = model.score_samples(hostile)
    assert np.all(scores < -1e3)
    model.partial_fit(hostile)
    model.partial_fit(rng.normal(size=(500, 3)) * 1e9)  # scale jumps by 1e9 mid-stream
    _assert_finite_state(model)
    assert np.all(np.isfinite(model.score_samples(rng.normal(size=(5, 3)))))


def test_vanishing_component_is_reseeded_at_poorly_explained_points():
    rng = np.random.default_rng(6)
    centers = np.array([[-6.0, 0.0], [0.0, 0.0], [6.0, 0.0]])
    warm = np.vstack([rng.normal(c, 0.5, (400, 2)) for c in centers])
    model = OnlineGaussianMixture(3, covariance_type="full", warmup=1200, half_life=500,
                                  random_state=0).partial_fit(rng.permutation(warm))
    assert model.n_reseeded_ == 0
    # The right-hand cluster vanishes: its component starves and must come back to life elsewhere.
    live = lambda: np.vstack([rng.normal(centers[0], 0.5, (200, 2)), rng.normal(centers[1], 0.5, (200, 2))])
    for _ in range(40):
        model.partial_fit(live())
    assert model.n_reseeded_ >= 1
    _assert_finite_state(model)
    assert np.all(model.weights_ >= model.min_weight)
    assert np.min(np.linalg.norm(model.means_ - centers[2], axis=1)) > 3.0


def test_non_positive_definite_covariance_is_reseeded_not_raised():
    rng = np.random.default_rng(7)
    model = _stream(OnlineGaussianMixture(3, covariance_type="full", warmup=600, random_state=0), rng.normal(size=(1200, 4)))
    model._S2[1] = -np.eye(4)  # a covariance that stopped being positive definite
    model._refresh_parameters(candidates=lambda: (model._to_internal(rng.normal(size=(10, 4))), np.zeros(10)))
    assert model.n_reseeded_ == 1
    _assert_finite_state(model)
    assert np.all(np.linalg.eigvalsh(model._covariances) > 0)


@pytest.mark.parametrize("rare_weight", [0.001, 0.01])
def test_a_reseeded_component_starts_rare(rare_weight):
    # It started at max(10 x min_weight, ...) = 0.001, not under a rare_weight of 0.001: a
    # component moved onto the worst-explained points (anomalies as often as not) counted as
    # normal at once (review).
    rng = np.random.default_rng(7)
    model = _stream(OnlineGaussianMixture(3, covariance_type="full", warmup=600, rare_weight=rare_weight,
                                          random_state=0), rng.normal(size=(1200, 4)))
    model._S2[1] = -np.eye(4)
    model._refresh_parameters(candidates=lambda: (model._to_internal(rng.normal(size=(10, 4))), np.zeros(10)))
    assert model.n_reseeded_ == 1
    assert model.min_weight < model.weights_[1] < 0.6 * rare_weight  # half of it, as for any rare_weight


def test_identical_points_do_not_crash():
    model = OnlineGaussianMixture(4, warmup=100, random_state=0)
    _stream(model, np.ones((5000, 3)), batch=250)
    _assert_finite_state(model)
    assert np.isfinite(model.score_samples(np.ones((1, 3)))[0])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_state_round_trips_exactly(tmp_path, covariance_type):
    rng = np.random.default_rng(8)
    X, _ = random_mixture(3, 3, rng).sample(5000, rng)
    model = _stream(OnlineGaussianMixture(3, covariance_type=covariance_type, warmup=1000, random_state=0), X[:3000])
    path = tmp_path / "model.npz"
    model.save(path)
    copies = [OnlineGaussianMixture.from_dict(model.to_dict()), OnlineGaussianMixture.load(path)]
    _stream(model, X[3000:], 500)
    expected_sample = model.sample(10)[0]
    for copy in copies:
        _stream(copy, X[3000:], 500)
        np.testing.assert_array_equal(copy.score_samples(X[:100]), model.score_samples(X[:100]))
        assert copy.n_seen_ == model.n_seen_ == 5000
        np.testing.assert_array_equal(copy.sample(10)[0], expected_sample)


def test_state_round_trips_during_warmup():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(1500, 2))
    model = OnlineGaussianMixture(2, warmup=1000, random_state=0).partial_fit(X[:600])
    copy = OnlineGaussianMixture.from_dict(model.to_dict())
    assert copy.n_buffered_ == 600 and not copy.is_initialized
    model.partial_fit(X[600:])
    copy.partial_fit(X[600:])
    np.testing.assert_array_equal(model.score_samples(X[:50]), copy.score_samples(X[:50]))


def test_load_refuses_a_corrupt_or_foreign_state(tmp_path):
    model = _stream(OnlineGaussianMixture(2, warmup=500, random_state=0), np.random.default_rng(0).normal(size=(600, 2)))
    state = model.to_dict()
    with pytest.raises(ValueError, match="state format version 99 is not supported"):
        OnlineGaussianMixture.from_dict({**state, "format_version": 99})
    with pytest.raises(ValueError, match=re.escape("state entry 'S1' has shape (1, 2), expected (2, 2)")):
        OnlineGaussianMixture.from_dict({**state, "S1": np.zeros((1, 2))})
    with pytest.raises(ValueError, match=re.escape("state entry 'S0' contains NaN or infinity")):
        OnlineGaussianMixture.from_dict({**state, "S0": np.array([np.nan, 1.0])})
    # Values no model learns (helper-58: negated masses restored silently, then flagged 67% of
    # normal points): refused, for the state stores to fall back to an older checkpoint.
    with pytest.raises(ValueError, match=re.escape("state entry 'S0' (the components' masses) must be >= 0")):
        OnlineGaussianMixture.from_dict({**state, "S0": -state["S0"]})
    with pytest.raises(ValueError, match="give covariances that are not positive definite"):
        OnlineGaussianMixture.from_dict({**state, "S2": -state["S2"]})
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="cannot read model state"):
        OnlineGaussianMixture.load(garbage)


def test_from_fitted_batch_mixture_scores_like_it():
    rng = np.random.default_rng(11)
    X, _ = random_mixture(3, 4, rng).sample(4000, rng)
    batch = GaussianMixture(3, random_state=0).fit(X)
    online = OnlineGaussianMixture.from_mixture(batch, warmup=1000)
    np.testing.assert_allclose(online.score_samples(X[:200]), batch.score_samples(X[:200]), atol=1e-8)
    online.partial_fit(X[:500])
    assert online.n_seen_ == 500


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_from_a_batch_mixture_of_any_type_on_features_of_different_scales_scores_like_it(covariance_type):
    # Spherical was standardised per feature and became another model (up to 21 nats a point apart).
    rng = np.random.default_rng(12)
    X = np.c_[rng.normal(0, 1, 2000), rng.normal(0, 1000, 2000), rng.normal(5, 0.001, 2000)]
    batch = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X)
    online = OnlineGaussianMixture.from_mixture(batch, n_samples_seen=len(X))
    np.testing.assert_allclose(online.score_samples(X), batch.score_samples(X), atol=1e-8)


def test_numpy_numbers_are_numbers():
    model = OnlineGaussianMixture(alpha=np.float32(0.9), rare_weight=np.float64(0.01), warmup=100)
    model.partial_fit(np.random.default_rng(0).normal(size=(200, 2)))
    assert model.is_initialized


def test_scoring_before_warmup_says_so():
    model = OnlineGaussianMixture(2, warmup=100)
    model.partial_fit(np.zeros((10, 2)))
    with pytest.raises(NotFittedError, match="until the warm-up is complete"):
        model.score_samples(np.zeros((1, 2)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0.5}, "alpha must be in (0.5, 1]; got 0.5"),
        ({"warmup": 3}, "warmup must be an integer >= 4; got 3"),
        ({"half_life": 10.0, "forgetting": 0.1}, "set either half_life or forgetting, not both"),
        ({"reg_covar": 0.0}, "reg_covar must be a finite number > 0; got 0.0"),
    ],
)
def test_online_parameter_errors(kwargs, message):
    model = OnlineGaussianMixture(2, **kwargs)  # the constructor only stores parameters
    assert model.get_params()[next(iter(kwargs))] == next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=re.escape(message)):
        model.partial_fit(np.zeros((4, 2)))
    assert not model.is_initialized and model.n_seen_ == 0


def test_stale_scored_batch_is_refused():
    rng = np.random.default_rng(12)
    model = _stream(OnlineGaussianMixture(2, warmup=200, random_state=0), rng.normal(size=(400, 2)))
    scored = model.score_batch(rng.normal(size=(10, 2)))
    model.partial_fit(rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match="scored by an older version"):
        model.learn(scored)


def test_rare_weight_scores_absorbed_small_clusters_as_unusual():
    rng = np.random.default_rng(13)
    big = rng.normal(0.0, 1.0, (9800, 2))
    small = rng.normal([8.0, 8.0], 0.05, (200, 2))  # 2% of the stream, tight: a "collective anomaly"
    X = rng.permutation(np.vstack([big, small]))
    plain = _stream(OnlineGaussianMixture(3, warmup=2000, random_state=0), X)
    rare = _stream(OnlineGaussianMixture(3, warmup=2000, rare_weight=0.05, random_state=0), X)
    # Learning is identical: rare_weight only changes scoring.
    np.testing.assert_array_equal(plain._S1, rare._S1)
    probe_small, probe_big = np.array([[8.0, 8.0]]), np.array([[2.5, 2.5]])
    assert plain.score_samples(probe_small)[0] > plain.score_samples(probe_big)[0]  # masked by its own component
    assert rare.score_samples(probe_small)[0] < rare.score_samples(probe_big)[0]  # unusual again
    np.testing.assert_allclose(rare.score_batch(probe_small).log_density, rare.score_samples(probe_small))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("rare_weight", [0.0, 0.2])
@pytest.mark.parametrize("quantile", [0.001, 0.01, 0.5])
def test_density_quantile_equals_scoring_every_draw(covariance_type, rare_weight, quantile):
    # Weights 0.07 to 0.5: with rare_weight 0.2 two components are rare, and draws from them
    # have no lower bound (they are always scored in full); quantile 0.5 needs more draws than
    # the pruning keeps, so it takes the path that scores every draw.
    rng = np.random.default_rng(3)
    truth = random_mixture(4, 5, rng)
    X, _ = truth.sample(6000, rng)
    model = _stream(OnlineGaussianMixture(4, covariance_type=covariance_type, rare_weight=rare_weight,
                                          warmup=500, random_state=0), X)
    for seed in (0, 1, 2):
        direct = np.quantile(model.score_samples(model.sample(20_000, random_state=seed)[0]), quantile)
        assert model.density_quantile(quantile, 20_000, random_state=seed) == pytest.approx(direct, rel=1e-10, abs=1e-10)


def test_sampling_draws_what_numpys_multivariate_normal_draws():
    # sample() draws z and applies the covariance's Cholesky factor itself (so the threshold
    # gets each draw's own-component density for free); the stream must not change.
    rng = np.random.default_rng(4)
    truth = random_mixture(3, 6, rng)
    model = _stream(OnlineGaussianMixture(3, warmup=500, random_state=0), truth.sample(3000, rng)[0])
    weights, means, _ = model._internal_parameters()
    reference = np.random.default_rng(9)
    counts = reference.multinomial(100, weights / weights.sum())
    expected = np.vstack([reference.multivariate_normal(m, c, n, method="cholesky")
                          for m, c, n in zip(means, model._internal_covariances(), counts)])
    np.testing.assert_array_equal(model.sample(100, random_state=9)[0], model._from_internal(expected))


def test_a_model_that_never_saw_data_round_trips_and_checks_its_parameters_late():
    rng = np.random.default_rng(14)
    X = rng.normal(size=(300, 2))
    fresh = OnlineGaussianMixture(2, warmup=200, random_state=3)
    assert vars(fresh) == fresh.get_params() and fresh.n_seen_ == 0 and fresh.n_buffered_ == 0
    copy = OnlineGaussianMixture.from_dict(fresh.to_dict())
    np.testing.assert_array_equal(copy.partial_fit(X).score_samples(X), fresh.partial_fit(X).score_samples(X))
    with pytest.raises(ValueError, match=re.escape("alpha must be in (0.5, 1]; got 7")):
        OnlineGaussianMixture(2, alpha=7).to_dict()


@pytest.mark.parametrize("absurd", [1e30, 1e100, 1e200, -1e308])
def test_an_absurd_value_in_the_warm_up_neither_stops_the_fit_nor_sets_the_scale(absurd):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 3)) * [1.0, 10.0, 0.1]
    poisoned = X.copy()
    poisoned[17, 0] = absurd
    model = OnlineGaussianMixture(warmup=400, random_state=0).partial_fit(poisoned)
    assert model.is_initialized and model.n_seen_ == 399  # the absurd row is not learned
    np.testing.assert_allclose(model.scale_, X[np.arange(400) != 17].std(axis=0), rtol=1e-9)
    assert model.score_samples(poisoned[17:18])[0] < model.score_samples(X).min()  # scored as what it is


def test_a_zero_inflated_feature_keeps_its_rare_values_in_the_warm_up():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(1000, 2))
    X[rng.choice(1000, 8, replace=False), 1] = 5000.0  # under 1%: the feature's central spread is ~6
    model = OnlineGaussianMixture(warmup=1000, random_state=0).partial_fit(X)
    assert model.n_seen_ == 1000


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_a_component_added_for_a_new_cluster_takes_its_points(covariance_type):
    rng = np.random.default_rng(8)
    model = OnlineGaussianMixture(1, covariance_type=covariance_type, max_components=3, warmup=1000, random_state=0)
    model.partial_fit(rng.normal(size=(1000, 3)))
    new = rng.normal(size=(40, 3)) * 0.5 + 8.0
    model.add_component(new, weight=0.1)
    assert model.n_components_ == 2 and np.isclose(model.weights_.sum(), 1.0)
    np.testing.assert_allclose(model.weights_, [0.9, 0.1], atol=1e-9)
    np.testing.assert_allclose(model.means_[1], new.mean(axis=0), atol=1e-9)
    for _ in range(20):  # the stream goes on with the new cluster at 10%
        model.partial_fit(np.vstack([rng.normal(size=(90, 3)), rng.normal(size=(10, 3)) * 0.5 + 8.0]))
    assert model.predict(np.array([[8.0, 8.0, 8.0]]))[0] == 1 and abs(model.weights_[1] - 0.1) < 0.03
    model.add_component(rng.normal(size=(5, 3)) - 8.0, weight=0.01)
    with pytest.raises(ValueError, match="max_components=3"):
        model.add_component(rng.normal(size=(5, 3)), weight=0.01)


def test_fit_with_fewer_rows_than_the_warm_up_says_the_model_cannot_score_yet():
    with pytest.warns(UserWarning, match="fewer than warmup=100"):
        model = OnlineGaussianMixture(warmup=100).fit(np.random.default_rng(0).normal(size=(10, 2)))
    assert not model.is_initialized


def test_the_step_a_feature_is_recorded_at():
    from streamgmm.mixture.online import recorded_resolution

    rng = np.random.default_rng(0)
    X = np.c_[rng.poisson(3, 500), np.round(rng.normal(size=500), 2), rng.normal(size=500),
              rng.choice([0.2, 0.7], 500), np.full(500, 4.0), 1e6 * rng.integers(0, 5, 500),
              np.full(500, 2.5), np.zeros(500), np.full(500, np.pi)]
    # One value: its last decimal's step (4.0: 1; 2.5: 0.1), none for 0 or for pi's many decimals.
    np.testing.assert_allclose(recorded_resolution(X, np.ones(500)), [1.0, 0.01, 0.0, 0.5, 1.0, 1e6, 0.1, 0.0, 0.0])


def test_a_value_the_warm_up_never_saw_on_a_constant_feature_is_not_flagged_for_ever():
    # 7.0 always in the warm-up, then 8.0 once in 1,000 rows: the feature's variance was
    # reg_covar's alone, each 8.0 scored 5e5 nats low and was flagged every time, never learned
    # (52 of 52; q = 1e-4 read 12-14 q).  With the step of 7.0 (1) the 8.0s are ordinary rare values.
    rng = np.random.default_rng(102)
    constant = np.full(20_000, 7.0)
    constant[1000:][rng.random(19_000) < 1e-3] = 8.0
    X = np.c_[rng.normal(size=(20_000, 4)), constant]
    model = OnlineGaussianMixture(warmup=1000, random_state=0).partial_fit(X[:1000])
    eights = X[1000:][constant[1000:] == 8.0]
    ordinary = model.score_samples(X[1000:][constant[1000:] == 7.0])
    assert len(eights) >= 5
    assert np.median(model.score_samples(eights)) > np.quantile(ordinary, 0.001)


@pytest.mark.parametrize("seed", range(3))
def test_a_count_never_seen_in_the_warm_up_is_not_scored_as_impossible(seed):
    # Errors per interval, Poisson(0.3), the counts 3 and more not learned (the detector does
    # not learn what it flags): the warm-up put tied components on the counts 0, 1 and 2,
    # learning shrank their variance to 1e-6, and the count 3 (1 point in 260) scored -400,000
    # nats, flagged every time (5 q).  A count is a rounded quantity: no tighter than rounding.
    rng = np.random.default_rng(seed)
    X = np.c_[rng.poisson(0.3, 20_000), rng.normal(size=20_000)].astype(float)
    model = OnlineGaussianMixture(warmup=1000, random_state=seed)
    for batch in np.array_split(X, 20):
        model.partial_fit(batch[batch[:, 0] < 3])
    two, three, four = model.score_samples(np.array([[2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]))
    assert two - three < 15 and three - four < 30, (two, three, four)
    # The rounding is part of the state, which says version 2 so that a reader without it (version
    # 1, an older streamgmm in a rolling upgrade) refuses it instead of scoring another model.
    assert model.to_dict()["format_version"] == 2
    assert OnlineGaussianMixture(warmup=100).fit(rng.normal(size=(200, 2))).to_dict()["format_version"] == 1
    restored = OnlineGaussianMixture.from_dict(model.to_dict())
    np.testing.assert_array_equal(restored.score_samples(X[:100]), model.score_samples(X[:100]))
    assert model.rounding_variance_[0] > 0 and model.rounding_variance_[1] == 0


def test_rows_of_zero_weight_do_not_count_towards_the_warm_up():
    # A warm-up of 40 rows with 2 weighted built a 3-component model from 2 points; all-zero
    # weights raised numpy's ZeroDivisionError. Now the warm-up waits for 40 weighted rows.
    X = np.random.default_rng(0).normal(size=(40, 2))
    model = OnlineGaussianMixture(n_components=3, init_params="random_from_data", warmup=40, random_state=0)
    model.partial_fit(X, sample_weight=np.zeros(40))
    assert not model.is_initialized and model.n_buffered_ == 0
    weight = np.zeros(40)
    weight[:2] = 1.0
    model.partial_fit(X, sample_weight=weight)
    assert not model.is_initialized and model.n_buffered_ == 2
    model.partial_fit(X[2:])
    assert model.is_initialized and model.n_components_ == 3 and model.n_seen_ == 40


def test_a_warm_up_longer_than_warmup_counts_all_its_points():
    # fit(X) with 50,000 rows then a batch of 5,000 from elsewhere: the mean moved to 2.49 as if
    # the warm-up had been 1,000 points (the step restarted at 1/(warmup+1)); 50,000 then 5,000
    # points in 1,000-row batches end at the pooled mean, 0.27.
    rng = np.random.default_rng(0)
    A, B = rng.normal(0.0, 1.0, (50_000, 2)), rng.normal(3.0, 1.0, (5_000, 2))
    at_once = OnlineGaussianMixture(n_components=1, covariance_type="full", random_state=0).fit(A).partial_fit(B)
    streamed = OnlineGaussianMixture(n_components=1, covariance_type="full", random_state=0)
    for batch in np.array_split(A, 50):
        streamed.partial_fit(batch)
    streamed.partial_fit(B)
    np.testing.assert_allclose(at_once.means_, streamed.means_, atol=0.01)
    np.testing.assert_allclose(at_once.means_, np.vstack([A, B]).mean(axis=0, keepdims=True), atol=0.01)


def test_fit_predict_as_the_batch_model():
    X = np.vstack([np.random.default_rng(1).normal(size=(300, 2)), 20 + np.random.default_rng(2).normal(size=(300, 2))])
    labels = OnlineGaussianMixture(n_components=2, warmup=600, random_state=0).fit_predict(X)
    assert len(set(labels[:300])) == 1 and len(set(labels[300:])) == 1 and labels[0] != labels[-1]


@pytest.mark.parametrize("t0, expected", [(10, 2.80), (100, 1.95), (None, 0.465)])
def test_t0_below_warmup_still_sets_the_first_steps(t0, expected):
    # Counting a longer warm-up's points must not cancel t0 (helper-36: t0 = 10 and 100 both gave
    # the running mean, 0.465, after a warm-up of exactly warmup points).
    rng = np.random.default_rng(0)
    model = OnlineGaussianMixture(n_components=1, covariance_type="full", warmup=1000, t0=t0, random_state=0)
    model.fit(rng.normal(0.0, 1.0, (1000, 2)))
    model.partial_fit(rng.normal(3.0, 1.0, (200, 2)))
    assert model.means_.mean() == pytest.approx(expected, abs=0.05)


def test_the_learned_limits_do_not_drift_by_the_round_trip_through_standard_units():
    # A count's 0 came back as -8.9e-16 after learning, and its normal range read [-8.9e-16, ...].
    rng = np.random.default_rng(2)
    model = OnlineGaussianMixture(n_components=2, warmup=500, random_state=0).fit(rng.poisson(5.5, (500, 3)) * 1.0)
    for _ in range(10):
        model.partial_fit(rng.poisson(5.5, (500, 3)) * 1.0)
    assert np.all(model.data_min_ == 0.0)
    model.partial_fit(np.full((1, 3), -1.0))
    np.testing.assert_allclose(model.data_min_, -1.0, atol=1e-12)  # a new low still counts


@pytest.mark.parametrize("settings", [{"half_life": 500}, {"alpha": 0.7}, {"forgetting": 0.01}])
def test_batches_longer_than_the_half_life_learn_what_single_rows_do(settings):
    # Each row of a batch weighed alike: with a half-life of 500, one batch of 10,000 rows of a
    # drifting mean learned it at 10.0 where rows one at a time had 18.6 (helper-77).
    rng = np.random.default_rng(3)
    warm = rng.normal(size=(1000, 2))
    drifting = np.c_[np.linspace(0.0, 20.0, 10_000), np.zeros(10_000)] + rng.normal(size=(10_000, 2))
    fitted = []
    for size in (1, 700, 10_000):
        model = OnlineGaussianMixture(n_components=1, covariance_type="full", warmup=1000, random_state=0,
                                      **settings).partial_fit(warm)
        for start in range(0, len(drifting), size):
            model.partial_fit(drifting[start:start + size])
        fitted.append((model.means_[0], model.covariances_[0]))
    for mean, covariance in fitted[1:]:
        np.testing.assert_allclose(mean, fitted[0][0], atol=1e-6)
        np.testing.assert_allclose(covariance, fitted[0][1], atol=1e-6)
    assert fitted[0][0][0] > 15.0  # it followed the drift


def test_numpy_scalar_settings_are_saved_and_read_back(tmp_path):
    # np.int64 from a search grid: save raised "Object of type int64 is not JSON serializable",
    # and the batch model's to_dict left such settings out (a refit of the loaded model differed).
    X = np.random.default_rng(4).normal(size=(600, 2))
    online = OnlineGaussianMixture(warmup=np.int64(500), n_components=np.int64(2), half_life=np.float32(1000.0),
                                   random_state=0).partial_fit(X)
    online.save(tmp_path / "online.npz")
    loaded = OnlineGaussianMixture.load(tmp_path / "online.npz")
    assert (loaded.warmup, loaded.n_components, loaded.half_life) == (500, 2, 1000.0)
    batch = GaussianMixture(2, max_iter=np.int64(50), random_state=np.int64(7)).fit(X)
    assert GaussianMixture.from_dict(batch.to_dict()).get_params()["max_iter"] == 50
    assert GaussianMixture.from_dict(batch.to_dict()).get_params()["random_state"] == 7


def test_to_dict_leaves_a_model_that_has_not_learned_free_to_change():
    model = OnlineGaussianMixture()
    model.to_dict()
    model.set_params(n_components=3)  # raised: "cannot change n_components of a model that has started learning"
    assert model.n_components == 3


@pytest.mark.parametrize("settings", [{"min_weight": None}, {"forgetting": "0.1"}])
def test_a_setting_of_the_wrong_type_is_a_value_error_that_names_it(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        OnlineGaussianMixture(**settings).partial_fit(np.zeros((5, 2)))


@pytest.mark.parametrize("damage", ["missing n_seen", "params None", "chosen empty", "rng_state an array", "not a dict"])
def test_a_malformed_state_is_a_value_error(damage):
    state = OnlineGaussianMixture(warmup=200, random_state=0).partial_fit(
        np.random.default_rng(5).normal(size=(300, 2))).to_dict()
    if damage == "missing n_seen":
        del state["n_seen"]
    elif damage == "params None":
        state["params"] = None
    elif damage == "chosen empty":
        state["chosen"] = {}
    elif damage == "rng_state an array":
        state["rng_state"] = np.zeros(3)
    else:
        state = [state]
    with pytest.raises(ValueError, match="state"):
        OnlineGaussianMixture.from_dict(state)


def test_a_batch_a_thousand_half_lives_long_counts_every_row():
    # The oldest rows' weights underflowed to 0, and rows of weight 0 are not counted: 10,000
    # rows with a half-life of 5 left n_seen_ at 5,576 (helper-80).
    X = np.random.default_rng(6).normal(size=(10_200, 2))
    model = OnlineGaussianMixture(n_components=1, warmup=200, half_life=5, random_state=0).partial_fit(X[:200])
    model.partial_fit(X[200:])
    assert model.n_seen_ == 10_200
