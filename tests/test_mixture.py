"""Batch EM: scikit-learn parity, sample weights, API and errors."""

import re
import warnings

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from streamgmm import ConvergenceWarning, GaussianMixture, NotFittedError, OnlineGaussianMixture
from streamgmm.mixture._gaussian import COVARIANCE_TYPES


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    return np.vstack([rng.normal(c, s, (400, 3)) for c, s in [(-4, 1.0), (0, 0.5), (5, 1.5)]])


def _sklearn_start(X, covariance_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SklearnGaussianMixture(3, covariance_type=covariance_type, max_iter=1, random_state=0).fit(X)
    return {"weights_init": sk.weights_, "means_init": sk.means_, "precisions_init": sk.precisions_}


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_lower_bound_per_iteration_matches_sklearn(blobs, covariance_type):
    start = _sklearn_start(blobs, covariance_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = GaussianMixture(3, covariance_type=covariance_type, tol=0.0, max_iter=25, **start).fit(blobs)
        theirs = SklearnGaussianMixture(3, covariance_type=covariance_type, tol=0.0, max_iter=25, **start).fit(blobs)
    ours_lb, theirs_lb = np.array(ours.lower_bounds_), np.array(theirs.lower_bounds_)
    assert len(ours_lb) == len(theirs_lb) == 25
    np.testing.assert_allclose(ours_lb, theirs_lb, rtol=1e-6)
    np.testing.assert_allclose(ours.means_, theirs.means_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.score_samples(blobs), theirs.score_samples(blobs), rtol=1e-8)
    assert ours.bic(blobs) == pytest.approx(theirs.bic(blobs), rel=1e-8)
    assert ours.aic(blobs) == pytest.approx(theirs.aic(blobs), rel=1e-8)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_integer_sample_weight_equals_repeated_rows(blobs, covariance_type):
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 4, len(blobs))
    start = _sklearn_start(blobs, covariance_type)
    kwargs = dict(covariance_type=covariance_type, tol=0.0, max_iter=15, **start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        weighted = GaussianMixture(3, **kwargs).fit(blobs, sample_weight=counts)
        repeated = GaussianMixture(3, **kwargs).fit(np.repeat(blobs, counts, axis=0))
    np.testing.assert_allclose(weighted.lower_bounds_, repeated.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(weighted.means_, repeated.means_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(weighted.covariances_, repeated.covariances_, rtol=1e-8, atol=1e-10)


def test_weights_that_leave_fewer_rows_than_components_are_refused(blobs):
    weight = np.zeros(len(blobs))
    weight[5] = 1.0
    with pytest.raises(ValueError, match="at least n_components rows of positive sample_weight"):
        GaussianMixture(2, random_state=0).fit(blobs, sample_weight=weight)


@pytest.mark.parametrize("seed", range(10))
def test_random_from_data_draws_its_centres_among_the_weighted_rows(seed):
    # Drawn among all rows, a centre on a row of weight 0 made a component of no mass at (0, 0).
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(-3, 1, (300, 2)), rng.normal(3, 1, (300, 2))])
    weight = np.zeros(len(X))
    weight[300:] = 1.0  # the blob at -3 is not data
    model = GaussianMixture(2, init_params="random_from_data", random_state=seed).fit(X, sample_weight=weight)
    assert model.weights_.min() > 0.01 and np.all(model.means_ > 1.0)  # both on the weighted blob


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_every_init_finds_the_three_blobs(blobs, init_params):
    model = GaussianMixture(3, init_params=init_params, n_init=3, max_iter=300, random_state=0).fit(blobs)
    assert model.converged_
    np.testing.assert_allclose(np.sort(model.means_[:, 0]), [-4, 0, 5], atol=0.3)


def test_predict_sample_and_proba(blobs):
    model = GaussianMixture(3, random_state=0).fit(blobs)
    proba = model.predict_proba(blobs)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.predict(blobs), proba.argmax(axis=1))
    X, labels = model.sample(3000, random_state=1)
    assert X.shape == (3000, 3) and labels.shape == (3000,)
    for k in range(3):
        np.testing.assert_allclose(X[labels == k].mean(axis=0), model.means_[k], atol=0.2)
    assert abs(np.mean(labels == 0) - model.weights_[0]) < 0.03


def test_bic_prefers_the_true_number_of_components(blobs):
    bics = [GaussianMixture(k, random_state=0, n_init=2).fit(blobs).bic(blobs) for k in range(1, 6)]
    assert int(np.argmin(bics)) + 1 == 3


def test_warm_start_continues_from_previous_fit(blobs):
    model = GaussianMixture(3, warm_start=True, max_iter=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(blobs)
        first = model.lower_bound_
        model.fit(blobs)
    assert model.lower_bound_ >= first - 1e-12


def test_not_converged_warns(blobs):
    with pytest.warns(ConvergenceWarning, match=re.escape("did not converge. Try different init parameters")):
        GaussianMixture(3, max_iter=1, tol=0.0, random_state=0).fit(blobs)


def test_state_round_trip(tmp_path, blobs):
    model = GaussianMixture(3, covariance_type="diag", random_state=0).fit(blobs)
    path = tmp_path / "gm.npz"
    model.save(path)
    loaded = GaussianMixture.load(path)
    np.testing.assert_array_equal(loaded.score_samples(blobs), model.score_samples(blobs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_components": 0}, "n_components must be an integer >= 1; got 0"),
        ({"covariance_type": "ful"}, "covariance_type must be one of full, tied, diag, spherical; got 'ful'"),
        ({"init_params": "best"}, "init_params must be one of kmeans, k-means++, random, random_from_data; got 'best'"),
        ({"reg_covar": -1.0}, "reg_covar must be a finite number >= 0; got -1.0"),
        ({"means_init": np.zeros((2, 3))}, "The parameter 'means' should have the shape of (3, 3), but got (2, 3)"),
        ({"n_components": 2000}, "Expected n_samples >= n_components but got n_components = 2000, n_samples = 1200"),
        ({"random_state": "seed"}, "random_state must be None, an int, a numpy Generator or a numpy RandomState"),
    ],
)
def test_parameter_errors_name_the_parameter(blobs, kwargs, message):
    params = {"n_components": 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        GaussianMixture(**params).fit(blobs)


def test_input_errors(blobs):
    model = GaussianMixture(2, random_state=0).fit(blobs)
    with pytest.raises(ValueError, match=re.escape("X has 2 features, but GaussianMixture is expecting 3 features as input")):
        model.score_samples(blobs[:, :2])
    bad = blobs.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=re.escape("X contains NaN or infinity in 1 row(s), first at row 7")):
        GaussianMixture(2).fit(bad)
    with pytest.raises(NotFittedError, match=re.escape("This GaussianMixture instance is not fitted yet.")):
        GaussianMixture(2).score_samples(blobs)


def test_collapsed_component_error_says_what_to_do():
    X = np.vstack([np.zeros((50, 2)), np.ones((50, 2))])
    with pytest.raises(ValueError, match="increase reg_covar"):
        GaussianMixture(2, reg_covar=0.0, random_state=0).fit(X)


class _Frame:
    """The two things of a DataFrame the estimators look at: named columns and the values."""

    def __init__(self, values, columns):
        self.values, self.columns = np.asarray(values), list(columns)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def reordered(self, columns):
        return _Frame(self.values[:, [self.columns.index(c) for c in columns]], columns)


@pytest.mark.parametrize("make", [lambda: GaussianMixture(2, random_state=0),
                                  lambda: __import__("streamgmm").OnlineGaussianMixture(2, warmup=100, random_state=0)])
def test_columns_named_at_fit_must_come_back_in_the_same_order(blobs, make):
    # Columns passed in another order were scored without a word (wrong densities).
    X = blobs[:, :3]
    frame = _Frame(X, ["a", "b", "c"])
    model = make().fit(frame)
    assert list(model.feature_names_in_) == ["a", "b", "c"]
    np.testing.assert_array_equal(model.score_samples(frame), model.score_samples(frame.reordered(["a", "b", "c"])))
    with pytest.raises(ValueError, match="The feature names should match those that were passed during fit"):
        model.score_samples(frame.reordered(["c", "b", "a"]))
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        model.score_samples(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.bic(frame)  # checked once, not again inside
    restored = type(model).from_dict(model.to_dict())
    assert list(restored.feature_names_in_) == ["a", "b", "c"]


def test_a_saved_model_keeps_its_settings(tmp_path, blobs):
    # load() gave back tol=0.001, max_iter=100, n_init=1, init_params='kmeans', random_state=None
    # whatever was fitted; a refit or clone of the loaded model then used the defaults.
    model = GaussianMixture(3, tol=1e-8, max_iter=500, n_init=2, init_params="k-means++", random_state=7).fit(blobs)
    model.save(tmp_path / "m.npz")
    loaded = GaussianMixture.load(tmp_path / "m.npz")
    assert loaded.get_params() == model.get_params()
    assert loaded.lower_bounds_ == pytest.approx(model.lower_bounds_)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_diagonal_log_probabilities_equal_the_direct_sum_far_from_the_origin(covariance_type):
    # The expanded products (no (n, K, D) temporary) against sum_d p^2 (x - mu)^2 itself, on
    # data offset by 1e6 with unit spread, where an uncentred expansion loses digits; and a
    # row so far out that its square overflows scores -inf, not nan.
    rng = np.random.default_rng(3)
    X = 1e6 + rng.normal(size=(500, 4))
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    p = model.precisions_cholesky_ if covariance_type == "diag" else model.precisions_cholesky_[:, None] * np.ones(4)
    direct = -0.5 * (4 * np.log(2 * np.pi) + np.einsum("nkd,nkd->nk", (X[:, None] - model.means_) * p, (X[:, None] - model.means_) * p))
    direct += np.log(p).sum(axis=1) + np.log(model.weights_)
    np.testing.assert_allclose(model.score_samples(X), np.logaddexp.reduce(direct, axis=1), rtol=0, atol=1e-6)
    assert model.score_samples(np.array([[1e300, 0.0, 0.0, 0.0]]))[0] == -np.inf


def test_warm_start_with_other_settings_says_what_to_do(blobs):
    # A changed covariance_type or feature count under warm_start raised numpy's broadcast error.
    model = GaussianMixture(3, warm_start=True, random_state=0).fit(blobs)
    model.set_params(covariance_type="diag")
    with pytest.raises(ValueError, match="warm_start=True continues the last fit.*set warm_start=False"):
        model.fit(blobs)
    model.set_params(covariance_type="full")
    with pytest.raises(ValueError, match="warm_start=False"):
        model.fit(blobs[:, :1])
    model.fit(blobs)  # the same settings still continue


def test_warm_start_refuses_reordered_columns_and_a_failed_fit_keeps_the_names(blobs):
    # warm_start took reordered columns and went on from parameters in the old order; a fit that
    # failed after reading the names left them on the old parameters (helper-36).
    frame = _Frame(blobs[:, :3], ["a", "b", "c"])
    model = GaussianMixture(2, warm_start=True, random_state=0).fit(frame)
    with pytest.raises(ValueError, match="The feature names should match"):
        model.fit(frame.reordered(["c", "b", "a"]))
    with pytest.raises(ValueError):
        model.fit(_Frame(np.full((5, 3), np.nan), ["x", "y", "z"]))
    assert list(model.feature_names_in_) == ["a", "b", "c"]
    model.score_samples(frame)


def test_online_first_batch_that_fails_the_checks_leaves_no_names(blobs):
    # The online model kept a rejected first batch's names: it showed feature_names_in_ of data
    # it never took.
    model = OnlineGaussianMixture(2, warmup=50, random_state=0)
    with pytest.raises(ValueError):
        model.partial_fit(_Frame(np.full((5, 3), np.nan), ["x", "y", "z"]))
    assert not hasattr(model, "feature_names_in_")
    model.partial_fit(_Frame(blobs[:100, :3], ["a", "b", "c"]))
    assert list(model.feature_names_in_) == ["a", "b", "c"]


def test_fewer_distinct_points_than_components_warns_as_scikit_learn_does():
    # K = 5 on 3 distinct rows: scikit-learn warns; the fit was silent and left two components
    # of weight 0 (helper-45).
    X = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]), 10, axis=0)
    for model in (SklearnGaussianMixture(5, random_state=0), GaussianMixture(5, random_state=0)):
        with pytest.warns(Warning, match=r"Number of distinct clusters \(3\) found smaller than n_clusters \(5\)"):
            model.fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianMixture(3, random_state=0).fit(X)  # as many distinct points as components: no warning



@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random_from_data"])
def test_a_large_common_offset_does_not_change_the_fit(init_params):
    # Two clusters 6 apart at 1e9 were one cluster and an empty component (k-means distances
    # as |x|^2 - 2 x.c + |c|^2 lost every digit to the offset; helper-50): scikit-learn fits
    # them as without the offset.
    for seed in range(5):
        rng = np.random.default_rng(seed)
        X = np.vstack([rng.normal(-3.0, 1.0, (300, 2)), rng.normal(3.0, 1.0, (300, 2))])
        plain = GaussianMixture(2, random_state=seed, init_params=init_params).fit(X)
        shifted = GaussianMixture(2, random_state=seed, init_params=init_params).fit(X + 1e9)
        assert shifted.score(X + 1e9) == pytest.approx(plain.score(X), abs=1e-6), seed
        assert shifted.weights_.min() > 0.2, seed  # (was 3.7e-18)


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical", "full"])
def test_data_far_from_zero_by_their_spread_fit_as_they_do_at_zero(covariance_type):
    # Tied, diagonal and spherical covariances were second moments about zero less the means'
    # squares: at 1e8 + unit noise (a timestamp) every digit cancelled and EM stopped on an
    # "ill-defined empirical covariance", as scikit-learn's does (helper-64).
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (500, 2)), rng.normal(6, 1, (500, 2))])
    at_zero = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X).score(X)
    far = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X + 1e8).score(X + 1e8)
    assert far == pytest.approx(at_zero, abs=1e-6)


def test_sample_weights_of_any_scale_give_the_unweighted_fit():
    # Weights of 1e-300 gave a model scoring -8.2e7 nats per point without a word (helper-64):
    # only their ratios matter.
    rng = np.random.default_rng(3)
    X = np.vstack([rng.normal(c, 1.0, (400, 3)) for c in (0.0, 5.0, 10.0)])
    plain = GaussianMixture(3, random_state=0).fit(X).score(X)
    for scale in (1e-300, 1e-14, 1e12):
        weighted = GaussianMixture(3, random_state=0).fit(X, sample_weight=np.full(len(X), scale)).score(X)
        assert weighted == pytest.approx(plain, abs=1e-9)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_the_online_model_has_scikit_learns_precisions(covariance_type):
    # precisions_ and precisions_cholesky_ were missing from OnlineGaussianMixture (helper-64).
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(c, [1.0, 3.0, 0.5], (1500, 3)) for c in (0.0, 8.0)]) * [1.0, 100.0, 0.01]
    model = OnlineGaussianMixture(n_components=2, covariance_type=covariance_type, warmup=1000,
                                  random_state=0).partial_fit(X)
    covariances, precisions = model.covariances_, model.precisions_
    if covariance_type == "full":
        products = np.einsum("kij,kjl->kil", covariances, precisions)
        assert np.allclose(products, np.eye(3), atol=1e-8)
    elif covariance_type == "tied":
        assert np.allclose(covariances @ precisions, np.eye(3), atol=1e-8)
    else:
        assert np.allclose(covariances * precisions, 1.0)
    assert model.precisions_cholesky_.shape == precisions.shape
