"""streamgmm's estimators in scikit-learn's tools: clone, model selection, pipelines, the
exceptions and warnings scikit-learn users catch, and precisions_init as scikit-learn has it."""

import re
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning  # noqa: E402
from sklearn.exceptions import NotFittedError as SklearnNotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils import get_tags  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402
from sklearn.utils.validation import check_is_fitted  # noqa: E402

from streamgmm import ConvergenceWarning, GaussianMixture, NotFittedError, OnlineGaussianMixture  # noqa: E402
from streamgmm.mixture import _gaussian  # noqa: E402

P = np.array([[2.0, 0.9], [0.9, 1.0]])  # a precision matrix; its inverse is the covariance


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    return rng.permutation(np.vstack([rng.normal(c, 1.0, (200, 2)) for c in centers]))


# ----------------------------------------------------- scikit-learn's common checks
def _online_by_design(estimator) -> dict:
    if not isinstance(estimator, OnlineGaussianMixture):
        return {}
    return {
        "check_all_zero_sample_weights_error":
            "rows of weight 0 are not learned from (the detector marks rows so); a batch of them learns nothing",
        "check_sample_weight_equivalence_on_dense_data":
            "stepwise EM: a repeated row is one more point in the step size, a weight of 2 is not",
    }


@parametrize_with_checks([GaussianMixture(), OnlineGaussianMixture(2, warmup=10, warmup_n_init=1)],
                         expected_failed_checks=_online_by_design)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


# ----------------------------------------------------------------- parameters
@pytest.mark.parametrize("estimator", [
    GaussianMixture(3, covariance_type="diag", tol=1e-4, random_state=np.random.RandomState(0), verbose=0),
    OnlineGaussianMixture(3, warmup=300, half_life=500.0, random_state=7),
], ids=type)
def test_get_params_set_params_and_clone_round_trip(estimator):
    params = estimator.get_params()
    assert params == estimator.get_params(deep=False)  # no parameter is an estimator
    assert type(estimator)(**params).get_params() == params
    copy = clone(estimator)
    assert copy is not estimator and copy.get_params().keys() == params.keys()
    assert all(copy.get_params()[k] is v or k == "random_state" for k, v in params.items())
    assert copy.set_params(n_components=2, reg_covar=1e-3) is copy
    assert (copy.n_components, copy.reg_covar) == (2, 1e-3)
    assert estimator.n_components == 3  # the original is untouched
    with pytest.raises(ValueError, match=re.escape(f"Invalid parameter 'n_component' for estimator {type(estimator).__name__}")):
        copy.set_params(n_component=2)
    assert get_tags(estimator).estimator_type == "density_estimator"
    assert estimator._estimator_type == "density_estimator"


def test_constructor_only_stores_parameters_and_fit_checks_them(blobs):
    model = GaussianMixture(n_components=0, covariance_type="nope", tol=-1)  # no error yet
    assert model.get_params()["covariance_type"] == "nope"
    with pytest.raises(ValueError, match=re.escape("n_components must be an integer >= 1; got 0")):
        model.fit(blobs)
    model.set_params(n_components=3)
    with pytest.raises(ValueError, match=re.escape("covariance_type must be one of full, tied, diag, spherical; got 'nope'")):
        model.fit(blobs)
    online = OnlineGaussianMixture(2, alpha=2.0)
    with pytest.raises(ValueError, match=re.escape("alpha must be in (0.5, 1]; got 2.0")):
        online.partial_fit(blobs)


def test_online_set_params_after_learning_started(blobs):
    model = OnlineGaussianMixture(3, warmup=300, random_state=0).partial_fit(blobs)
    assert model.is_initialized
    model.set_params(half_life=1000.0)  # tuning forgetting mid-stream is fine
    with pytest.raises(ValueError, match="cannot change n_components of a model that has started learning"):
        model.set_params(n_components=4)
    with pytest.raises(ValueError, match=re.escape("alpha must be in (0.5, 1]; got 0.2")):
        model.set_params(alpha=0.2)
    assert model.alpha == 1.0 and model.half_life == 1000.0  # the refused change is undone
    model.partial_fit(blobs)
    assert model.n_seen_ == 2 * len(blobs)


def test_repr_shows_what_differs_from_the_defaults():
    assert repr(GaussianMixture(3, random_state=0)) == "GaussianMixture(n_components=3, random_state=0)"
    assert repr(OnlineGaussianMixture()) == "OnlineGaussianMixture()"


# ------------------------------------------------------------ scikit-learn tools
def test_grid_search_and_cross_val_score_pick_the_true_number_of_components(blobs):
    search = GridSearchCV(GaussianMixture(random_state=0), {"n_components": [1, 2, 3, 4]},
                          cv=KFold(3, shuffle=True, random_state=0))
    search.fit(blobs)
    # Held-out log-likelihood gains little beyond the truth; it must at least reach it.
    assert search.best_params_["n_components"] >= 3
    assert isinstance(search.best_estimator_, GaussianMixture)
    scores = {k: cross_val_score(GaussianMixture(k, random_state=0), blobs, cv=5) for k in (1, 3)}
    assert scores[3].shape == (5,) and np.all(np.isfinite(scores[3]))
    assert scores[3].mean() > scores[1].mean() + 0.5


def test_online_mixture_in_cross_val_score(blobs):
    """fit is a fresh start with X as the first batch: at least warmup rows initialise it."""
    model = OnlineGaussianMixture(3, warmup=300, random_state=0)
    scores = cross_val_score(model, blobs, cv=KFold(2, shuffle=True, random_state=0))
    assert np.all(np.isfinite(scores))
    fitted = clone(model).fit(blobs)
    assert fitted.n_seen_ == len(blobs)
    assert fitted.fit(blobs[:300]).n_seen_ == 300  # refitting forgets the first stream


def test_pipeline_score_is_the_mixture_score_of_the_scaled_data(blobs):
    pipeline = Pipeline([("scale", StandardScaler()), ("gmm", GaussianMixture(3, random_state=0))]).fit(blobs)
    scaled = StandardScaler().fit_transform(blobs)
    expected = GaussianMixture(3, random_state=0).fit(scaled).score(scaled)
    assert pipeline.score(blobs) == pytest.approx(expected, rel=1e-12)


def test_random_state_instance_is_drawn_from(blobs):
    fit = lambda rs: GaussianMixture(3, init_params="random_from_data", max_iter=2, random_state=rs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = fit(np.random.RandomState(0)).fit(blobs)
        b = fit(np.random.RandomState(0)).fit(blobs)
        np.testing.assert_array_equal(a.means_, b.means_)  # same seed, same fit
        shared = np.random.RandomState(0)
        first, second = fit(shared).fit(blobs).means_, fit(shared).fit(blobs).means_
    assert not np.array_equal(first, second)  # the instance moved on between fits
    online = OnlineGaussianMixture(3, warmup=300, random_state=np.random.RandomState(1)).partial_fit(blobs)
    again = OnlineGaussianMixture(3, warmup=300, random_state=np.random.RandomState(1)).partial_fit(blobs)
    np.testing.assert_array_equal(online.means_, again.means_)
    restored = OnlineGaussianMixture.from_dict(online.to_dict())
    np.testing.assert_array_equal(restored.sample(5)[0], online.sample(5)[0])


def test_not_fitted_error_is_scikit_learns(blobs):
    assert issubclass(NotFittedError, SklearnNotFittedError)
    assert issubclass(NotFittedError, (ValueError, AttributeError))
    for model in (GaussianMixture(2), OnlineGaussianMixture(2, warmup=100)):
        with pytest.raises(SklearnNotFittedError, match="instance is not fitted yet"):
            model.score_samples(blobs)
        with pytest.raises(SklearnNotFittedError):
            check_is_fitted(model)
    online = OnlineGaussianMixture(2, warmup=1000).partial_fit(blobs)  # still warming up
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(online)
    with pytest.raises(SklearnNotFittedError, match=re.escape("until the warm-up is complete (warmup=1000 points; 600 buffered)")):
        online.predict(blobs)
    check_is_fitted(GaussianMixture(2).fit(blobs))
    check_is_fitted(OnlineGaussianMixture(2, warmup=100).partial_fit(blobs))


def test_convergence_warning_is_silenced_by_scikit_learns_filter(blobs):
    assert issubclass(ConvergenceWarning, SklearnConvergenceWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        model = GaussianMixture(3, max_iter=1, tol=0.0, random_state=0).fit(blobs)
    assert not model.converged_
    with pytest.warns(SklearnConvergenceWarning, match="Best performing initialization did not converge"):
        GaussianMixture(3, max_iter=1, tol=0.0, random_state=0).fit(blobs)


def test_verbose_prints_scikit_learns_progress_lines(blobs, capsys):
    GaussianMixture(3, n_init=2, verbose=1, verbose_interval=1, random_state=0).fit(blobs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["Initialization 0", "  Iteration 1"]
    assert "Initialization 1" in lines and lines[-1] == "Initialization converged."
    GaussianMixture(3, verbose=2, verbose_interval=1, random_state=0).fit(blobs)
    assert re.search(r"Iteration 1\t time lapse \d+\.\d{5}s\t ll change", capsys.readouterr().out)


# --------------------------------------------------------------- precisions_init
def test_full_precisions_init_gives_its_inverse_as_covariance():
    X = np.random.default_rng(0).normal(size=(50, 2))
    model = GaussianMixture(1, weights_init=[1.0], means_init=[[0, 0]], precisions_init=P[None], max_iter=0).fit(X)
    np.testing.assert_allclose(model.covariances_[0], np.linalg.inv(P), rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.covariances_[0], [[0.840336, -0.756303], [-0.756303, 1.680672]], atol=1e-6)
    np.testing.assert_allclose(model.precisions_[0], P, atol=1e-12)
    assert np.allclose(np.triu(model.precisions_cholesky_[0]), model.precisions_cholesky_[0])  # upper, as computed ones
    samples, _ = model.sample(200_000, random_state=1)
    np.testing.assert_allclose(np.cov(samples.T), np.linalg.inv(P), atol=0.02)
    online = OnlineGaussianMixture.from_mixture(model, warmup=100)
    np.testing.assert_allclose(online.covariances_[0], np.linalg.inv(P), atol=1e-6)


def test_tied_precisions_init_gives_its_inverse_as_covariance():
    X = np.random.default_rng(0).normal(size=(50, 2))
    model = GaussianMixture(2, covariance_type="tied", weights_init=[0.5, 0.5], means_init=[[0, 0], [1, 1]],
                            precisions_init=P, max_iter=0).fit(X)
    np.testing.assert_allclose(model.covariances_, np.linalg.inv(P), rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.precisions_, P, atol=1e-12)


def test_precisions_init_is_the_same_factor_as_a_computed_one():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(3, 4, 4))
    covariances = A @ A.transpose(0, 2, 1) + np.eye(4)
    computed = _gaussian.compute_precision_cholesky(covariances, "full")
    from_precisions = _gaussian.precision_cholesky_from_precisions(np.linalg.inv(covariances), "full")
    np.testing.assert_allclose(from_precisions, computed, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("covariance_type, precisions, message", [
    ("full", np.array([[[2.0, 0.9], [0.3, 1.0]]]),
     "'full precision' should be symmetric, positive-definite; the matrix (component 0) is not symmetric"),
    ("full", np.array([[[1.0, 2.0], [2.0, 1.0]]]),
     "'full precision' should be symmetric, positive-definite; the matrix (component 0) has eigenvalue -1"),
    ("tied", np.array([[2.0, 0.9], [0.3, 1.0]]),
     "'tied precision' should be symmetric, positive-definite; the matrix is not symmetric"),
    ("diag", np.array([[1.0, -2.0]]), "'diag precision' should be positive; got minimum -2"),
    ("spherical", np.array([-1.0]), "'spherical precision' should be positive; got minimum -1"),
    ("full", np.ones((2, 2, 2)), "The parameter 'full precision' should have the shape of (1, 2, 2), but got (2, 2, 2)"),
])
def test_bad_precisions_init_is_refused_with_a_clear_message(covariance_type, precisions, message):
    X = np.random.default_rng(0).normal(size=(50, 2))
    model = GaussianMixture(1, covariance_type=covariance_type, precisions_init=precisions)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fit(X)


def test_all_initial_parameters_given_means_no_initial_estimate(blobs, monkeypatch):
    """streamgmm's counterpart of scikit-learn's test_gaussian_mixture_all_init_does_not_
    estimate_gaussian_parameters: the Gaussian parameters are estimated once per M-step only."""
    calls = []
    estimate = _gaussian.estimate_gaussian_parameters
    monkeypatch.setattr(_gaussian, "estimate_gaussian_parameters", lambda *a, **k: calls.append(1) or estimate(*a, **k))
    model = GaussianMixture(1, weights_init=[1.0], means_init=[[0.0, 0.0]], precisions_init=P[None]).fit(blobs)
    assert len(calls) == model.n_iter_ > 0
    calls.clear()
    model = GaussianMixture(1, means_init=[[0.0, 0.0]], max_iter=3, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(blobs)
    assert len(calls) == model.n_iter_ + 1  # one initial estimate: the weights and covariances
