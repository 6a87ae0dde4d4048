"""Explanations of anomalies: the math against naive references, and the shifted-feature check."""

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from streamgmm.detection.explain import (
    MODEL_BOUND,
    Rarity,
    component_geometry,
    explain,
    explanation_documents,
    gpd_log_tail_probability,
    model_geometry,
    model_log_tail_bound,
    one_in,
    rarity,
    rarity_documents,
)
from streamgmm.dev.synthetic import random_mixture
from streamgmm.mixture.online import OnlineGaussianMixture

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def _fitted(X, covariance_type, n_components=4, rare_weight=0.0, seed=0):
    model = OnlineGaussianMixture(n_components, covariance_type=covariance_type, warmup=1000,
                                  rare_weight=rare_weight, random_state=seed)
    for i in range(0, len(X), 2000):
        model.partial_fit(X[i:i + 2000])
    return model


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(0)
    X, _ = random_mixture(3, 5, rng).sample(12_000, rng)
    return X


# --------------------------------------------------------------- the math
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("rare_weight", [0.0, 0.3])
def test_geometry_in_original_units_gives_the_models_own_density(stream, covariance_type, rare_weight):
    model = _fitted(stream, covariance_type, rare_weight=rare_weight)
    g = model_geometry(model)
    X = stream[:50] * 1.5
    terms = np.column_stack([
        lw + stats.multivariate_normal(mean, np.linalg.inv(p)).logpdf(X)
        for lw, mean, p in zip(g.log_weights, g.means, g.precisions)
    ])
    density = np.logaddexp.reduce(np.where(g.usual, terms, -np.inf), axis=1)
    np.testing.assert_allclose(density, model.score_samples(X), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_first_feature_is_the_largest_conditional_residual_by_the_textbook_formula(stream, covariance_type):
    model = _fitted(stream, covariance_type)
    g = model_geometry(model)
    X = stream[100:140] + np.random.default_rng(1).normal(0, 3, (40, 5))
    e = explain(X, g, n_top=5)
    for x, k, top, expected, sd, z in zip(X, e.component, e.top, e.expected, e.sd, e.z):
        cov, mean = np.linalg.inv(g.precisions[k]), g.means[k]
        # x_j | x_-j by partitioning the covariance: mu_j + S_j,-j S_-j,-j^-1 (x_-j - mu_-j).
        reference = []
        for j in range(5):
            rest = [i for i in range(5) if i != j]
            gain = np.linalg.solve(cov[np.ix_(rest, rest)], cov[rest, j])
            mu = mean[j] + gain @ (x[rest] - mean[rest])
            var = cov[j, j] - cov[j, rest] @ gain
            reference.append((mu, math.sqrt(var), (x[j] - mu) / math.sqrt(var)))
        first = int(np.argmax([abs(r[2]) for r in reference]))
        assert top[0] == first
        np.testing.assert_allclose([expected[0], sd[0], z[0]], reference[first], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_the_features_shares_add_up_to_the_squared_distance(stream, covariance_type):
    model = _fitted(stream, covariance_type)
    g = model_geometry(model)
    X = stream[:30] + np.random.default_rng(2).normal(0, 4, (30, 5))
    e = explain(X, g, n_top=5)
    assert all(sorted(row) == list(range(5)) for row in e.top.tolist())
    squared = np.einsum("nkd,kde,nke->nk", X[:, None] - g.means, g.precisions, X[:, None] - g.means)
    np.testing.assert_allclose(e.mahalanobis**2, squared[np.arange(30), e.component], rtol=1e-9)
    # Moving the named features to their expected values, in turn, takes each one's z ** 2 off
    # the squared distance: what is left is the distance of the point so repaired.
    repaired = X.copy()
    np.put_along_axis(repaired, e.top, e.expected, axis=1)
    diff = repaired - g.means[e.component]
    left = np.einsum("nd,nde,ne->n", diff, g.precisions[e.component], diff)
    np.testing.assert_allclose((e.z**2).sum(axis=1) + left, e.mahalanobis**2, rtol=1e-8)
    if covariance_type in ("diag", "spherical"):  # independent features: plain z-scores, largest first
        assert np.all(np.abs(e.z[:, :-1]) >= np.abs(e.z[:, 1:]))


def test_nearest_component_is_never_rare_structure(stream):
    model = _fitted(stream, "full", rare_weight=0.3)
    g = model_geometry(model)
    assert not g.usual.all()
    assert g.usual[explain(stream[:500], g).component].all()


def test_a_covariance_that_is_not_positive_definite_says_what_to_do():
    with pytest.raises(ValueError, match="increase model.reg_covar"):
        component_geometry([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]], "full")


# ------------------------------------------------------------------ rarity
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_model_bound_is_an_upper_bound_and_tight_in_the_tail(stream, covariance_type):
    model = _fitted(stream, covariance_type)
    g = model_geometry(model)
    draws = model.score_samples(model.sample(400_000, random_state=1)[0])
    levels = np.quantile(draws, [0.2, 0.05, 0.01, 0.001, 1e-4])
    observed = np.array([np.mean(draws <= level) for level in levels])
    bound = np.exp(model_log_tail_bound(levels, g))
    assert np.all(bound >= observed * 0.95)  # an upper bound (up to the Monte Carlo error)
    assert np.all(bound[2:] <= 2.0 * observed[2:])  # and close to the truth in the tail


def test_model_bound_of_many_points_interpolates_the_exact_one(stream):
    model = _fitted(stream, "full")
    g = model_geometry(model)
    density = np.concatenate([model.score_samples(stream), [-500.0, -1e4, -np.inf, 5.0]])
    exact = np.concatenate([model_log_tail_bound(part, g) for part in np.array_split(density, 100)])
    many = model_log_tail_bound(density, g)
    np.testing.assert_allclose(many, exact, rtol=1e-3, atol=2e-3)  # probabilities within 0.2%
    assert many[-2] == -np.inf and many[-1] == pytest.approx(0.0, abs=1e-12)


def test_chi2_tail_far_below_the_smallest_float_continues_the_exact_one():
    g = component_geometry([1.0], [np.zeros(16)], [np.eye(16)], "full")
    density = -np.array([500.0, 600.0, 700.0, 800.0, 1000.0, 5000.0])
    log_tail = model_log_tail_bound(density, g)
    assert np.all(np.isfinite(log_tail)) and np.all(np.diff(log_tail) < 0)
    # Once chi2_16 tail ~ exp(-r2/2) r2^7, each further nat of log-density costs about one nat.
    slopes = np.diff(log_tail) / np.diff(density)
    np.testing.assert_allclose(slopes, 1.0, rtol=0.05)
    r2 = 2 * 500 - 16 * math.log(2 * math.pi)
    np.testing.assert_allclose(log_tail[0], stats.chi2.logsf(r2, 16), rtol=1e-6)


def test_rarity_uses_the_thresholds_tail_model_when_it_has_one(stream):
    g = model_geometry(_fitted(stream, "full"))

    class Tail:
        tail_method = "gpd_tail"

        def __init__(self, fit):
            self.fit = fit

        def log_tail_probability(self, log_density):
            if self.fit is None:
                return None
            return gpd_log_tail_probability(log_density, **self.fit)

    density = np.array([-20.0, -30.0, -60.0])
    fitted = rarity(density, Tail({"level": -15.0, "exceedance_rate": 0.01, "scale": 2.0, "shape": 0.1}), g)
    assert fitted.method == "gpd_tail"
    np.testing.assert_allclose(fitted.log_tail, np.log(0.01 * (1 + 0.1 * np.array([5, 15, 45]) / 2.0) ** -10))
    unfitted = rarity(density, Tail(None), g)
    assert unfitted.method == MODEL_BOUND
    np.testing.assert_array_equal(unfitted.log_tail, model_log_tail_bound(density, g))
    assert rarity(density, object(), g).method == MODEL_BOUND


def test_gpd_tail_ends_where_a_short_tail_ends():
    log_tail = gpd_log_tail_probability(np.array([-10.0, -12.0, -20.0, -5.0]), level=-10.0, exceedance_rate=0.02,
                                        scale=4.0, shape=-0.5)
    np.testing.assert_allclose(log_tail[:2], np.log(0.02 * np.array([1.0, (1 - 0.5 * 2 / 4) ** 2])))
    assert log_tail[2] == -np.inf and log_tail[3] == pytest.approx(math.log(0.02))
    exponential = gpd_log_tail_probability(np.array([-14.0]), level=-10.0, exceedance_rate=0.02, scale=2.0, shape=0.0)
    np.testing.assert_allclose(exponential, math.log(0.02) - 2.0)


def test_one_in_reads_as_three_significant_digits():
    log_tail = np.log([2.1e-6, 0.5, 1e-30, 1.0]).tolist() + [-800.0, -np.inf]
    assert one_in(np.array(log_tail)) == [476000, 2.0, 1e30, 1.0, None, None]
    assert one_in(np.log(np.array([2.1e-6, 1e-3]))) == [476000, 1000]
    assert one_in(np.log(np.array([1 / 49.9, 1 / 3.14159]))) == [49.9, 3.14]  # not 49.900000000000006
    document = rarity_documents(Rarity(np.array([-800.0]), MODEL_BOUND))[0]
    assert document["tail_probability"] == 0.0 and document["one_in"] is None
    assert document["log10_tail_probability"] == pytest.approx(-800.0 / math.log(10.0))


# ------------------------------------------------------ shifted features
def _gaussian(rng, n, D):
    return random_mixture(3, D, rng).sample(n, rng)[0]


def _correlated_normal(rng, n, D):
    A = rng.normal(size=(D, D)) / np.sqrt(D)
    return rng.standard_normal((n, D)) @ np.linalg.cholesky(A @ A.T + 0.3 * np.eye(D)).T


def _log_normal(rng, n, D):
    return np.exp(0.5 * _correlated_normal(rng, n, D))


def _student_t(rng, n, D, df=5):
    return _correlated_normal(rng, n, D) * np.sqrt(df / rng.chisquare(df, (n, 1)))


STREAMS = {"gaussian_mixture": _gaussian, "log_normal": _log_normal, "student_t5": _student_t}


def shifted_feature_rate(make, D, covariance_type, seed, n_train=20_000, n_test=2_000):
    """Fraction of normal points with ONE feature shifted by 6-10 of its standard deviations
    whose explanation names that feature first."""
    rng = np.random.default_rng(seed)
    X = make(rng, n_train + n_test, D)
    model = _fitted(X[:n_train], covariance_type, n_components=4, seed=seed)
    normal = X[n_train:]
    feature = rng.integers(0, D, n_test)
    shift = rng.uniform(6.0, 10.0, n_test) * rng.choice([-1.0, 1.0], n_test) * X[:n_train].std(axis=0)[feature]
    outliers = normal.copy()
    outliers[np.arange(n_test), feature] += shift
    return float(np.mean(explain(outliers, model_geometry(model), n_top=1).top[:, 0] == feature))


@pytest.mark.slow
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("D", [4, 9, 16])
@pytest.mark.parametrize("stream_name, seeds", [("gaussian_mixture", (0, 1, 2)), ("log_normal", (3,)), ("student_t5", (4,))])
def test_a_shifted_feature_is_named_first(stream_name, seeds, D, covariance_type):
    rates = [shifted_feature_rate(STREAMS[stream_name], D, covariance_type, seed) for seed in seeds]
    assert min(rates) >= 0.95, f"{stream_name} D={D} {covariance_type}: rates {rates}"


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_a_glitch_value_however_large_gets_the_explanation_of_a_merely_far_one(stream, covariance_type):
    # An overflowed counter or a float-max sentinel: the expected value, normal range and
    # component must not depend on how absurd the value is (they were differences of numbers
    # that large: "expected -7.8" at 1e12, the wrong component, expected 0 beyond 1e16).
    geometry = model_geometry(_fitted(stream, covariance_type))
    point = stream[5].copy()
    explanations = []
    for value in (1e5, 1e12, 1e20, 3.4e38):
        point[2] = value
        explanations.append(explain(point[None], geometry, n_top=2))
    first = explanations[0]
    for e in explanations[1:]:
        assert e.top[0, 0] == 2 and e.component[0] == first.component[0]
        np.testing.assert_allclose(e.expected, first.expected, rtol=1e-9)
        np.testing.assert_allclose(e.sd, first.sd, rtol=1e-12)
    z = [abs(e.z[0, 0]) for e in explanations]
    assert z == sorted(z) and z[-1] > 1e30  # the distance is still the value's own


def test_a_normal_range_does_not_reach_past_the_values_the_model_learned():
    # A latency (log-normal, in ms) had "normal_range [-35.2, 87.2]", a count a range below 0:
    # the Gaussian does not know the feature's limits, the values learned do.
    rng = np.random.default_rng(3)
    X = np.c_[rng.lognormal(3.0, 0.8, 5000), rng.normal(size=5000)]
    model = OnlineGaussianMixture(warmup=1000, random_state=0)
    for batch in np.array_split(X, 5):
        model.partial_fit(batch)
    np.testing.assert_allclose([model.data_min_[0], model.data_max_[0]], [X[:, 0].min(), X[:, 0].max()], rtol=1e-12)
    spikes = np.array([[20.0, 6.0], [20.0, -6.0]])  # the second feature off: the latency is named second
    geometry = model_geometry(model)
    documents = explanation_documents(spikes, explain(spikes, geometry, n_top=2), geometry, ["latency", "noise"])
    for document in documents:
        ranges = {t["name"]: t["normal_range"] for t in document["top_features"]}
        assert ranges["latency"][0] >= model.data_min_[0] > 0
    unbounded = explanation_documents(spikes, explain(spikes, geometry, n_top=2),
                                      component_geometry(model.weights_, model.means_, model.covariances_,
                                                         model.covariance_type_), ["latency", "noise"])
    assert min(t["normal_range"][0] for d in unbounded for t in d["top_features"] if t["name"] == "latency") < 0
    restored = OnlineGaussianMixture.from_dict(model.to_dict())
    np.testing.assert_array_equal(restored.data_min_, model.data_min_)


def test_an_expected_value_is_never_outside_its_own_normal_range():
    # A request size was "expected" at -5,808 bytes beside a normal range of [27.7, 11,864]
    # (helper-59): the range was held to the values learned, the expected value was not.
    covariance = np.array([[2500.0, 25.0], [25.0, 1.0]])  # size (sd 50) and a partner, correlation 0.5
    geometry = dataclasses.replace(component_geometry([1.0], [[10.0, 0.0]], covariance[np.newaxis], "full"),
                                   low=np.array([1.0, -4.0]), high=np.array([1000.0, 4.0]))
    point = np.array([[500.0, -5.0]])  # given the partner, the Gaussian expects 10 - 0.5 * 50 * 5 = -115
    explanation = explain(point, geometry, n_top=1)
    assert explanation.expected[0, 0] == pytest.approx(-115.0)
    feature = explanation_documents(point, explanation, geometry, ["size", "partner"])[0]["top_features"][0]
    low, high = feature["normal_range"]
    assert 1.0 <= low <= feature["expected"] <= high
    assert feature["expected"] == low and feature["z"] == pytest.approx(explanation.z[0, 0])


def test_an_expected_value_names_the_feature_it_leans_on():
    # Two features correlated 0.95 (requests, connections) and one on its own: "req 3000, expected
    # 2771" read as 2771 being normal, when it is what conns = 750 (also far off) implies.
    cov = np.array([[1.0, 0.95, 0.0], [0.95, 1.0, 0.0], [0.0, 0.0, 1.0]])
    geometry = component_geometry([1.0], np.zeros((1, 3)), cov[None], "full")
    points = np.array([[20.0, 19.0, 0.0],   # both far, together
                       [2.0, -2.0, 0.0],    # the pair broken, each within range
                       [0.0, 0.0, 8.0]])    # the lone feature off: leans on nothing
    e = explain(points, geometry, n_top=2)
    documents = explanation_documents(points, e, geometry, ["req", "conns", "cpu"])
    first = [d["top_features"][0] for d in documents]
    assert {first[0]["name"], first[0]["given"]} == {"req", "conns"}
    assert {first[1]["name"], first[1]["given"]} == {"req", "conns"}
    assert first[2]["name"] == "cpu" and first[2]["given"] is None
    # The second feature is explained with the first at its expected value: it leans on nothing
    # named before it (it read "conns -2, expected -1.8, given req" beside "req 2.0").
    assert all(d["top_features"][1]["given"] != d["top_features"][0]["name"] for d in documents)
    # The partner leans the expectation by at least a conditional sd; a partner near its mean does not.
    quiet = explain(np.array([[3.0, 0.1, 0.0]]), geometry, n_top=1)
    assert quiet.given[0, 0] == -1


def test_a_component_flat_in_a_feature_does_not_claim_points_by_setting_it_aside():
    # Percentages clipped at 100: one component holds the rows stuck at 100% (disk sd 0.1), another
    # the rest (disk 60 +- 15).  A point mildly off in cpu with an ordinary disk of 55 went to the
    # flat component with disk set aside, which kept that component's 1 / sd: "disk 55, expected
    # 99.95, z -450" (helper-68: 19-72% of a clean stream's records).  It belongs to the other.
    means = [[50.0, 60.0, 0.0], [50.0, 100.0, 0.0]]
    covariances = np.array([np.diag([100.0, 225.0, 1.0]), np.diag([100.0, 0.01, 1.0])])
    geometry = component_geometry([0.6, 0.4], means, covariances, "full")
    points = np.array([[88.0, 55.0, 0.5],     # cpu 3.8 sd off under either
                       [50.0, 20.0, 0.0],     # disk low for both: the wide one, disk named
                       [52.0, 99.99, 6.0]])   # at 100, the third feature off: the flat one
    e = explain(points, geometry, n_top=1)
    assert e.component.tolist() == [0, 0, 1]
    assert e.top[:, 0].tolist() == [0, 1, 2]
    assert abs(e.z[0, 0]) < 5.0


def test_a_shifted_feature_still_takes_its_own_component_beside_a_flat_one():
    # The same mixture: a point of the wide component with its third feature shifted 8 sd is
    # explained by it, not by the flat one, for any disk value of the wide component's.
    means = [[50.0, 60.0, 0.0], [50.0, 100.0, 0.0]]
    covariances = np.array([np.diag([100.0, 225.0, 1.0]), np.diag([100.0, 0.01, 1.0])])
    geometry = component_geometry([0.6, 0.4], means, covariances, "full")
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.normal(50, 10, 200), rng.normal(60, 15, 200), np.full(200, 8.0)])
    e = explain(points, geometry, n_top=1)
    assert np.mean(e.component == 0) >= 0.95
    assert np.all(e.top[:, 0] == 2)


def test_one_feature_is_explained_by_the_component_it_lies_in():
    # With one feature, setting it aside left only the weights: the heavier component took every
    # point ("103: component 0, expected 0, z 103" beside a component at 100; review).
    geometry = component_geometry([0.6, 0.4], [[0.0], [100.0]], np.ones((2, 1, 1)), "full")
    e = explain(np.array([[103.0], [-4.0]]), geometry, n_top=1)
    assert e.component.tolist() == [1, 0]
    assert e.z[:, 0] == pytest.approx([3.0, -4.0])


def test_a_light_component_far_from_the_others_is_found_with_the_feature_that_sets_it_apart():
    from streamgmm.detection.explain import component_geometry, outlying_components

    means = np.array([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 10.0, 0.0], [0.3, 0.0, 0.2]])
    covariances = np.array([np.eye(3), np.eye(3), np.eye(3), np.eye(3) * 0.01])
    weights = np.array([0.6, 0.36, 0.03, 0.01])
    far = outlying_components(component_geometry(weights, means, covariances, "full"))
    assert [(f.index, f.feature) for f in far] == [(2, 1)]  # the tight light one is near the first
    assert far[0].share == pytest.approx(0.03) and far[0].distance_sd == pytest.approx(np.hypot(1.0, 9.5))
    assert (far[0].value, far[0].expected) == (10.0, 0.5)
    assert outlying_components(component_geometry(weights, means, covariances, "full"), min_share=0.05) == []
