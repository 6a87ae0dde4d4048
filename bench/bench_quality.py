"""Detection quality, prequential, side by side in one run.

    python bench/bench_quality.py [--quick] [--plots DIR]

Every streaming method scores each point before it learns it.  streamgmm runs through
``streamgmm.replay`` (the pipeline behind ``streamgmm replay``: CSV decoding, warm-up,
scoring, threshold, learning).  river's HalfSpaceTrees and LODA run behind MinMaxScaler as
river's documentation does; PySAD detectors run if PySAD is installed; scikit-learn's batch
GaussianMixture and IsolationForest, fitted offline on the whole set, are upper references.
All methods are evaluated on the same rows: everything after streamgmm's warm-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from streamgmm.service.config import config_from_dict  # noqa: E402
from streamgmm.cli.replay import replay  # noqa: E402
from streamgmm.dev.synthetic import random_mixture  # noqa: E402

SHUTTLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "shuttle.csv"
WARMUP = 1000


# ------------------------------------------------------------------ data sets
def local_anomalies(X, labels, means, fraction, rng, sigma=(5.0, 8.0)):
    """Move a fraction of points 5-8 standard deviations off their own cluster."""
    X = X.copy()
    is_anomaly = rng.random(len(X)) < fraction
    is_anomaly[:WARMUP] = False
    scale = X[~is_anomaly].std(axis=0).mean() / np.sqrt(len(means))
    direction = rng.normal(size=(int(is_anomaly.sum()), X.shape[1]))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X[is_anomaly] = means[labels[is_anomaly]] + direction * rng.uniform(*sigma, (len(direction), 1)) * scale
    return X, is_anomaly


def stationary(n, rng):
    truth = random_mixture(5, 8, rng, separation=8.0)
    X, labels = truth.sample(n, rng)
    return local_anomalies(X, labels, truth.means, 0.01, rng)


def drifting(n, rng):
    """Means move; a new cluster appears at 40%, one vanishes at 70%."""
    truth = random_mixture(6, 8, rng, separation=8.0)
    X, labels = truth.sample(n, rng)
    t = np.arange(n) / n
    direction = rng.normal(size=(6, 8))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X += direction[labels] * (4.0 * t)[:, None]
    appear, vanish = labels == 5, labels == 4
    keep = ~((appear & (t < 0.4)) | (vanish & (t > 0.7)))
    X, labels = X[keep], labels[keep]
    drifted_means = truth.means  # anomalies are placed relative to the moved points below
    X_out, is_anomaly = local_anomalies(X, labels, drifted_means, 0.01, rng)
    # Re-apply the drift to the anomalies so they sit off their cluster's *current* place.
    moved = direction[labels] * (4.0 * t[keep])[:, None]
    X_out[is_anomaly] += moved[is_anomaly]
    return X_out, is_anomaly


def collective(n, rng):
    """Stationary mixture plus bursts of points from small tight clusters that do not belong."""
    truth = random_mixture(5, 8, rng, separation=8.0)
    X, labels = truth.sample(n, rng)
    X, is_anomaly = local_anomalies(X, labels, truth.means, 0.005, rng)
    for start in (int(0.3 * n), int(0.6 * n), int(0.85 * n)):
        center = X.mean(axis=0) + rng.normal(size=8) * X.std(axis=0) * 1.5
        burst = slice(start, start + 150)
        X[burst] = center + 0.3 * rng.normal(size=(150, 8))
        is_anomaly[burst] = True
    return X, is_anomaly


def load_sets(quick):
    rng = np.random.default_rng(2024)
    n = 20_000 if quick else 60_000
    sets = {}
    if SHUTTLE.exists():
        data = np.loadtxt(SHUTTLE, delimiter=",", skiprows=1)
        sets["shuttle"] = (data[:, :-1], data[:, -1].astype(bool))
    sets["stationary"] = stationary(n, rng)
    sets["drifting"] = drifting(n, rng)
    sets["collective"] = collective(n, rng)
    return sets


# ------------------------------------------------------------------- methods
def streamgmm_scores(X, model=None, threshold=None):
    """Log-density per row through the replay pipeline; NaN for warm-up rows."""
    config = config_from_dict({
        "input": {"format": "csv", "dimension": X.shape[1]},
        "model": {"warmup": WARMUP, **(model or {})},
        "threshold": threshold or {},
    }, environ={})
    source = io.StringIO("\n".join(",".join(repr(float(v)) for v in row) for row in X))
    sink = io.StringIO()
    replay(config, source, sink, "csv")
    rows = [json.loads(line) for line in sink.getvalue().splitlines()]
    density = np.array([np.nan if r["log_density"] is None else r["log_density"] for r in rows])
    flagged = np.array([r["anomaly"] for r in rows])
    return -density, flagged


def river_scores(X, name):
    from river import anomaly, compose, preprocessing

    detector = anomaly.HalfSpaceTrees(seed=42) if name == "hst" else anomaly.LODA(seed=42)
    model = compose.Pipeline(preprocessing.MinMaxScaler(), detector)
    names = [f"x{i}" for i in range(X.shape[1])]
    scores = np.empty(len(X))
    for i, row in enumerate(X.tolist()):
        features = dict(zip(names, row))
        scores[i] = model.score_one(features)
        model.learn_one(features)
    return scores


def pysad_scores(X, name, budget_seconds=240.0):
    from pysad.models import RSHash, xStream

    model = RSHash(feature_mins=X.min(axis=0), feature_maxes=X.max(axis=0)) if name == "rshash" else xStream()
    scores = np.empty(len(X))
    start = time.perf_counter()
    for i, x in enumerate(X):
        scores[i] = model.fit_partial(x).score_partial(x)
        if i == 1000 and (time.perf_counter() - start) * len(X) / 1000 > budget_seconds:
            return None  # too slow to finish this data set in the budget
    return scores


def offline_gmm(X):
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    best = min((GaussianMixture(k, random_state=0).fit(Z) for k in (1, 2, 4, 8)), key=lambda m: m.bic(Z))
    return -best.score_samples(Z), best.n_components


def offline_gaussian(X):
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    return -GaussianMixture(1, random_state=0).fit(Z).score_samples(Z)


def offline_iforest(X):
    from sklearn.ensemble import IsolationForest

    return -IsolationForest(random_state=0).fit(X).score_samples(X)


# ------------------------------------------------------------------ evaluation
def evaluate(y, scores, rows):
    from sklearn.metrics import average_precision_score, roc_auc_score

    s = np.nan_to_num(scores[rows], nan=np.nanmin(scores[rows]), posinf=1e300, neginf=-1e300)
    return roc_auc_score(y[rows], s), average_precision_score(y[rows], s)


# label -> (model settings, threshold settings); everything else is the daemon's default.
STREAMGMM_VARIANTS = {
    "streamgmm default": ({}, {}),
    "streamgmm rare_weight=0 (plain density)": ({"rare_weight": 0.0}, {}),
    "streamgmm K=1": ({"n_components": 1}, {}),
    "streamgmm K=4": ({"n_components": 4}, {}),
    "streamgmm K=8 diag": ({"covariance_type": "diag"}, {}),
    "streamgmm half_life=5000": ({"half_life": 5000}, {}),
    "streamgmm learn_from_anomalies": ({}, {"learn_from_anomalies": True}),
    "streamgmm no adoption (adopt: false)": ({}, {"adopt": False}),
    "streamgmm alpha=0.7": ({"alpha": 0.7}, {}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plots", default=None, help="write PNG plots to this directory")
    parser.add_argument("--no-pysad", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sets = load_sets(args.quick)
    results, flag_rates = {}, {}
    q = config_from_dict({}, environ={}).threshold.quantile
    for set_name, (X, y) in sets.items():
        rows = np.arange(WARMUP, len(X))
        table = results[set_name] = {}
        for label, (model, threshold) in STREAMGMM_VARIANTS.items():
            start = time.perf_counter()
            scores, flagged = streamgmm_scores(X, model, threshold)
            table[label] = (*evaluate(y, scores, rows), time.perf_counter() - start)
            if label == "streamgmm default":
                flag_rates[set_name] = float(flagged[rows].mean())
        for name in ("hst", "loda"):
            start = time.perf_counter()
            scores = river_scores(X, name)
            table[f"river {name.upper()}"] = (*evaluate(y, scores, rows), time.perf_counter() - start)
        if not args.no_pysad:
            for name in ("rshash", "xstream"):
                try:
                    start = time.perf_counter()
                    scores = pysad_scores(X, name)
                except ImportError:
                    break
                if scores is not None:
                    table[f"PySAD {name}"] = (*evaluate(y, scores, rows), time.perf_counter() - start)
        start = time.perf_counter()
        scores, k = offline_gmm(X)
        table[f"offline sklearn GMM (BIC: K={k})"] = (*evaluate(y, scores, rows), time.perf_counter() - start)
        table["offline 1 Gaussian"] = (*evaluate(y, offline_gaussian(X), rows), 0.0)
        start = time.perf_counter()
        table["offline IsolationForest"] = (*evaluate(y, offline_iforest(X), rows), time.perf_counter() - start)

    for set_name, table in results.items():
        X, y = sets[set_name]
        print(f"\n## {set_name}: {len(X):,} x {X.shape[1]}, {y.mean():.2%} anomalies (evaluated on rows {WARMUP}+)\n")
        print("| method | ROC-AUC | AP | seconds |")
        print("|---|---|---|---|")
        for label, (auc, ap, seconds) in table.items():
            print(f"| {label} | {auc:.4f} | {ap:.4f} | {seconds:.1f} |")
    print(f"\n## Flag rate of the default configuration (quantile q = {q})\n")
    print("| data set | flagged fraction | flagged / q |")
    print("|---|---|---|")
    for set_name, rate in flag_rates.items():
        print(f"| {set_name} | {rate:.4f} | {rate / q:.1f} |")

    if args.plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(13, 6))
        labels = list(next(iter(results.values())).keys())
        width = 0.8 / len(labels)
        colors = plt.get_cmap("tab20")(np.linspace(0, 1, len(labels)))
        for m, label in enumerate(labels):
            for ax, metric in zip(axes, (0, 1)):
                values = [results[s].get(label, (np.nan, np.nan))[metric] for s in results]
                ax.bar(np.arange(len(results)) + m * width, values, width, label=label, color=colors[m])
        for ax, title in zip(axes, ("ROC-AUC", "average precision")):
            ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2, list(results))
            ax.set_title(title)
            ax.set_ylim(0, 1)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.17, 1, 1))
        fig.savefig(out / "quality.png", dpi=120)
        print(f"\nplot: {out / 'quality.png'}")


if __name__ == "__main__":
    main()
