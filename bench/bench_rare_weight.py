"""model.rare_weight on random mixtures nobody tuned on.

    python bench/bench_rare_weight.py [--weights 0.01,0.05] [--jobs 2]

16 streams: ``random_mixture`` (Dirichlet(5) weights) with K in {4, 8} and D in {4, 16}, 4 seeds
each, 20,000 points with 1% local anomalies (5-8 sigma off their own cluster, as in
bench_quality), replayed through the daemon's pipeline with each rare_weight; AP and ROC-AUC on
the rows after the warm-up.  A normal cluster lighter than rare_weight is scored by the other
components: its points then rank as the most anomalous.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_quality as bq  # noqa: E402
from streamgmm.dev.synthetic import random_mixture  # noqa: E402


def one(case):
    from sklearn.metrics import average_precision_score, roc_auc_score

    warnings.filterwarnings("ignore")
    K, D, seed, rare_weight = case
    rng = np.random.default_rng(1000 + seed * 31 + K * 7 + D)
    truth = random_mixture(K, D, rng, separation=8.0)
    X, labels = truth.sample(20_000, rng)
    X, y = bq.local_anomalies(X, labels, truth.means, 0.01, rng)
    score, _, _ = bq.streamgmm_scores(X, {"random_state": 0, "rare_weight": rare_weight})
    rows = np.arange(len(X)) >= bq.WARMUP
    return (K, D, seed, rare_weight, float(truth.weights.min()),
            average_precision_score(y[rows], score[rows]), roc_auc_score(y[rows], score[rows]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="0.01,0.05")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    cases = [(K, D, seed, w) for K in (4, 8) for D in (4, 16) for seed in range(4) for w in weights]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, cases))
    print("\n### rare_weight on 16 random mixtures (K 4/8, D 4/16, 4 seeds; 1% local anomalies)\n")
    print("| rare_weight | AP worst | AP median | streams with AP < 0.9 | ROC-AUC worst | failing (K, D, seed, smallest cluster, AP) |")
    print("|---|---|---|---|---|---|")
    for w in weights:
        rows = [r for r in results if r[3] == w]
        ap = np.array([r[5] for r in rows])
        failing = "; ".join(f"{r[0]}, {r[1]}, {r[2]}, {r[4]:.3f}, {r[5]:.3f}" for r in rows if r[5] < 0.9)
        print(f"| {w} | {ap.min():.3f} | {np.median(ap):.3f} | {int(np.sum(ap < 0.9))} of {len(ap)} | "
              f"{min(r[6] for r in rows):.4f} | {failing} |")


if __name__ == "__main__":
    main()
