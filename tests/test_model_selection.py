"""The model sizes itself at warm-up (n_components/covariance_type "auto"), with a covariance
prior that keeps few points in many dimensions from making a degenerate model, and does not
hang on the seed."""

import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from streamgmm import OnlineGaussianMixture
from streamgmm.detection.detector import Detector
from streamgmm.detection.records import InputRecord
from streamgmm.dev.synthetic import random_mixture
from streamgmm.mixture import _gaussian as g
from streamgmm.mixture._selection import map_covariances, map_em, prior_points, prior_scatter
from streamgmm.service.config import config_from_dict


def _stream(model, X, batch=500):
    for start in range(0, len(X), batch):
        model.partial_fit(X[start : start + batch])
    return model


def _separated(n_components, n_features, rng, separation=12.0):
    """Well-separated spherical clusters with equal weights (the right K is not in doubt)."""
    means = rng.normal(size=(n_components, n_features))
    means *= separation / np.linalg.norm(means[:, None] - means[None], axis=2)[np.triu_indices(n_components, 1)].min()
    return means


def _detector_flags(X, **model):
    config = config_from_dict({"input": {"format": "float64", "dimension": X.shape[1]}, "model": model}, environ={})
    detector = Detector(config)
    flagged = scored = 0
    for start in range(0, len(X), 50):
        rows = np.ascontiguousarray(X[start : start + 50], dtype="<f8")
        result = detector.process([InputRecord("t", 0, start + i, row.tobytes()) for i, row in enumerate(rows)], now=0.0)
        flagged += int(result.flags.sum())
        scored += len(result.flags)
    return detector, flagged / max(scored, 1)


@pytest.mark.parametrize("covariance_type", g.COVARIANCE_TYPES)
def test_map_covariances_add_the_prior_scatter_to_each_component(covariance_type):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 3.0]])
    resp = rng.dirichlet(np.ones(2), size=60)
    nk, means, covariances = g.estimate_gaussian_parameters(X, resp, 0.0, covariance_type)
    C = np.cov(X.T, bias=True)
    tau = prior_points(covariance_type, 3)
    shrunk = map_covariances(nk, covariances, covariance_type, tau, prior_scatter(covariance_type, 2, C))
    # Naively: (scatter + Lambda) / (n_k + c), Lambda = K^(-2/D) (C + 1e-3 I), c = 2D+4 (full, tied) or D+4.
    c = 10.0 if covariance_type in ("full", "tied") else 7.0
    lam = 2 ** (-2 / 3) * (C + 1e-3 * np.eye(3))
    assert tau == c
    scatters = [(resp[:, k, None] * (X - means[k])).T @ (X - means[k]) for k in range(2)]
    for k, scatter in enumerate(scatters):
        if covariance_type == "full":
            np.testing.assert_allclose(shrunk[k], (scatter + lam) / (nk[k] + c), rtol=1e-10)
        elif covariance_type == "diag":
            np.testing.assert_allclose(shrunk[k], np.diag(scatter + lam) / (nk[k] + c), rtol=1e-10)
        elif covariance_type == "spherical":
            assert shrunk[k] == pytest.approx(np.trace(scatter + lam) / 3 / (nk[k] + c), rel=1e-10)
    if covariance_type == "tied":
        np.testing.assert_allclose(shrunk, (sum(scatters) + lam) / (nk.sum() + c), rtol=1e-10)


def test_map_em_keeps_a_component_on_one_repeated_point_positive_definite():
    X = np.vstack([np.zeros((30, 5)), np.random.default_rng(1).normal(size=(30, 5))])
    resp = np.eye(2)[np.repeat([0, 1], 30)]
    fit = map_em(X, np.ones(60), resp, "full", reg_covar=1e-12)
    assert np.all(np.linalg.eigvalsh(fit.covariances) > 1e-3)
    assert np.isfinite(fit.log_likelihood) and np.isfinite(fit.bic)


@pytest.mark.parametrize("seed", range(5))
def test_auto_picks_one_component_on_one_gaussian(seed):
    rng = np.random.default_rng(100 + seed)
    A = rng.normal(size=(4, 4))
    X = rng.normal(size=(1000, 4)) @ A
    model = OnlineGaussianMixture(warmup=1000, random_state=seed).partial_fit(X)
    assert model.n_components_ == 1
    assert model.n_components == 1 and model.get_params()["n_components"] == "auto"


@pytest.mark.parametrize("seed", range(5))
def test_auto_finds_the_clusters_of_a_well_separated_mixture(seed):
    rng = np.random.default_rng(200 + seed)
    means = _separated(4, 3, rng)
    labels = rng.integers(0, 4, 1500)
    X = means[labels] + rng.normal(size=(1500, 3))
    model = OnlineGaussianMixture(warmup=1500, random_state=seed).partial_fit(X)
    assert model.n_components_ == 4
    # Each true cluster is one component.
    assert len(set(model.predict(means))) == 4


def test_given_sizes_are_kept():
    X = np.random.default_rng(3).normal(size=(600, 3))
    model = OnlineGaussianMixture(3, covariance_type="diag", warmup=300, random_state=0)
    _stream(model, X)
    assert (model.n_components_, model.covariance_type_) == (3, "diag")
    assert model.covariances_.shape == (3, 3) and model.weights_.shape == (3,)


@pytest.mark.parametrize("n_points, n_features, warmup", [(214, 9, 100), (643, 36, 300)])
def test_few_points_in_many_dimensions_make_a_sane_model(n_points, n_features, warmup):
    # Two correlated clusters, 4% of the points far off: the user's 214 x 9 stream flagged 33%
    # with K=8 full covariances; a 36-d one scored below a single Gaussian.
    rng = np.random.default_rng(4)
    A = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
    X = rng.normal(size=(n_points, n_features)) @ A + np.where(rng.random((n_points, 1)) < 0.5, 3.0, -3.0)
    anomalies = rng.random(n_points) < 0.04
    anomalies[:warmup] = False
    X[anomalies] += rng.choice([-1.0, 1.0], size=(anomalies.sum(), n_features)) * 4.0
    detector, flagged = _detector_flags(X, warmup=warmup, random_state=0)
    model = detector.model
    assert flagged <= 0.10, f"flags {flagged:.0%} of the points"
    for name in ("_S0", "_S1", "_S2", "_weights", "_means", "_covariances", "_precisions_chol"):
        assert np.all(np.isfinite(getattr(model, name))), name
    covariances = model.covariances_
    if model.covariance_type_ in ("full", "tied"):
        eigenvalues = np.linalg.eigvalsh(covariances)
        assert np.all(eigenvalues > 1e-6 * eigenvalues.max()), "a degenerate covariance"
    scores = -model.score_samples(X[warmup:])
    assert roc_auc_score(anomalies[warmup:], scores) > 0.9


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_points, n_features", [(40, 100), (25, 20)])
def test_too_few_warm_up_points_for_a_full_covariance_do_not_make_one_of_the_prior_alone(seed, n_points, n_features):
    # 40 points of N(0, I) in 100-d: tied K=8 was chosen, and new points scored -8e6 a point
    # (the truth: -142) until the stream had mended the covariance; 25 in 20-d: tied K=5 or 8,
    # 450-970 nats a point below the truth.
    rng = np.random.default_rng(seed)
    model = OnlineGaussianMixture(warmup=n_points, random_state=seed).fit(rng.normal(size=(n_points, n_features)))
    assert model.covariance_type_ in ("diag", "spherical")
    truth = -0.5 * n_features * np.log(2 * np.pi * np.e)
    new = model.score(rng.normal(size=(1000, n_features)))
    assert new > truth - 2 * n_features, f"new points score {new:.0f} nats a point, the truth {truth:.0f}"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clusters", [1, 2])
def test_a_constant_feature_does_not_change_the_number_of_components(seed, clusters):
    # Its variance comes from the prior alone, which shrinks with K: BIC took 7 components for
    # one Gaussian beside a constant column.
    rng = np.random.default_rng(10 + seed)
    X = rng.normal(size=(1000, 2)) + np.where(np.arange(1000)[:, None] % clusters == 0, 0.0, 8.0)
    plain = OnlineGaussianMixture(warmup=1000, random_state=seed).fit(X)
    with_constant = OnlineGaussianMixture(warmup=1000, random_state=seed).fit(np.c_[X, np.full(1000, 7.0)])
    assert plain.n_components_ == with_constant.n_components_ == clusters
    # The other features are scored as without it (a diagonal model where a spherical one won).
    np.testing.assert_allclose(with_constant.means_[:, :2][np.argsort(with_constant.means_[:, 0])],
                               plain.means_[np.argsort(plain.means_[:, 0])], atol=1e-6)
    assert np.all(with_constant.means_[:, 2] == 7.0)


def test_seeds_give_close_models():
    rng = np.random.default_rng(5)
    truth = random_mixture(4, 5, rng, separation=8.0)
    X, _ = truth.sample(8000, rng)
    held_out, _ = truth.sample(4000, rng)
    anomalies = truth.means[rng.integers(0, 4, 200)] + rng.choice([-1.0, 1.0], size=(200, 5)) * 6.0
    probe = np.vstack([held_out, anomalies])
    is_anomaly = np.r_[np.zeros(len(held_out), bool), np.ones(len(anomalies), bool)]
    likelihoods, aucs = [], []
    for seed in range(5):
        model = _stream(OnlineGaussianMixture(warmup=1000, random_state=seed), X)
        likelihoods.append(model.score(held_out))
        aucs.append(roc_auc_score(is_anomaly, -model.score_samples(probe)))
    assert np.ptp(likelihoods) < 0.02, likelihoods
    assert np.ptp(aucs) < 0.005, aucs


def test_an_auto_sized_model_round_trips_with_its_choice(tmp_path):
    rng = np.random.default_rng(6)
    means = _separated(3, 4, rng)
    X = means[rng.integers(0, 3, 4000)] + rng.normal(size=(4000, 4))
    model = _stream(OnlineGaussianMixture(warmup=1000, random_state=0), X[:2000])
    state = model.to_dict()
    assert state["params"]["n_components"] == "auto" and state["chosen"] == {
        "n_components": model.n_components_, "covariance_type": model.covariance_type_}
    model.save(tmp_path / "model.npz")
    for copy in (OnlineGaussianMixture.from_dict(state), OnlineGaussianMixture.load(tmp_path / "model.npz")):
        assert (copy.n_components_, copy.covariance_type_) == (model.n_components_, model.covariance_type_)
        assert copy.get_params() == {**model.get_params(), "random_state": None}  # the generator state is saved instead
        _stream(copy, X[2000:])
    _stream(model, X[2000:])
    np.testing.assert_array_equal(copy.score_samples(X[:100]), model.score_samples(X[:100]))


def test_a_state_from_before_auto_still_loads():
    X = np.random.default_rng(7).normal(size=(800, 2))
    state = _stream(OnlineGaussianMixture(2, covariance_type="full", warmup=400, random_state=0), X).to_dict()
    old = {key: value for key, value in state.items() if key != "chosen"}
    old["params"] = {key: value for key, value in state["params"].items() if key != "max_components"}
    copy = OnlineGaussianMixture.from_dict(old)
    assert (copy.n_components_, copy.covariance_type_) == (2, "full")
    np.testing.assert_array_equal(copy.score_samples(X[:10]), OnlineGaussianMixture.from_dict(state).score_samples(X[:10]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_components": "many"}, "n_components must be an integer >= 1; got 'many'"),
        ({"covariance_type": "ful"}, "covariance_type must be one of auto, full, tied, diag, spherical; got 'ful'"),
        ({"max_components": 0}, "max_components must be an integer >= 1; got 0"),
        ({"min_weight": 0.2}, "min_weight must be in [0, 1/max_components); got 0.2"),
    ],
)
def test_size_parameter_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OnlineGaussianMixture(**kwargs).partial_fit(np.zeros((4, 2)))


def test_the_config_sizes_the_detectors_model():
    default = config_from_dict({}, environ={}).model
    assert (default.n_components, default.covariance_type, default.max_components) == ("auto", "auto", 8)
    given = config_from_dict({}, environ={"STREAMGMM_MODEL__N_COMPONENTS": "3",
                                          "STREAMGMM_MODEL__COVARIANCE_TYPE": "diag"}).model
    assert (given.n_components, given.covariance_type) == (3, "diag")
    X = np.random.default_rng(8).normal(size=(300, 4))
    detector, _ = _detector_flags(X, n_components=3, covariance_type="diag", warmup=200, random_state=0)
    assert (detector.model.n_components_, detector.model.covariance_type_) == (3, "diag")
    detector, _ = _detector_flags(X, max_components=2, warmup=200, random_state=0)
    assert detector.model.n_components_ <= 2


def test_a_cautious_warmup_choice_turns_full_as_the_stream_grows(tmp_path):
    # 8 correlated clusters in 16-d: BIC on 1,000 warm-up points prefers one shared (tied)
    # covariance to 8 full ones; 200,000 points later that cost 2.2 nats/point. The review
    # turns the model full once the stream has shown enough.
    rng = np.random.default_rng(1)
    truth = random_mixture(8, 16, rng)
    X, _ = truth.sample(12_000, rng)
    model = OnlineGaussianMixture(warmup=1000, random_state=0).partial_fit(X[:1000])
    assert model.covariance_type_ != "full" and model.n_components_ == 8
    _stream(model, X[1000:3000], batch=1000)
    copy = OnlineGaussianMixture.from_dict(model.to_dict())  # mid-review
    for m in (model, copy):
        _stream(m, X[3000:], batch=1000)
    assert model.covariance_type_ == "full" and model.covariance_type == "full"
    np.testing.assert_array_equal(copy.score_samples(X[:50]), model.score_samples(X[:50]))
    assert model.get_params()["covariance_type"] == "auto"


def test_a_given_covariance_type_is_never_reviewed():
    rng = np.random.default_rng(1)
    X, _ = random_mixture(8, 16, rng).sample(12_000, rng)
    model = _stream(OnlineGaussianMixture(8, covariance_type="tied", warmup=1000, random_state=0), X, batch=1000)
    assert model.covariance_type_ == "tied"


def test_spherical_asked_for_by_name_stays_spherical_beside_a_constant_feature():
    X = np.random.default_rng(0).normal(size=(500, 2))
    model = OnlineGaussianMixture(covariance_type="spherical", warmup=500, random_state=0)
    assert model.fit(np.c_[X, np.full(500, 7.0)]).covariance_type_ == "spherical"
