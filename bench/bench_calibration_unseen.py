"""Calibration on shapes nobody tuned on: the check of ``bench_calibration.py`` (flagged share
/ q of anomaly-free streams, default configuration apart from ``threshold.quantile``) on ten
more shapes, written after the defaults were fixed and never used to choose them.

    python bench/bench_calibration_unseen.py [--seeds 3] [--n 50000] [--jobs 2]

Shapes: near-Cauchy tails (Student t, 1.5 degrees of freedom), independent exponentials,
binary features beside continuous ones, a rank-3 cloud in 20-d, four dice (six equally likely
values each), zero-inflated half-normals, a 3-cluster mixture in 40-d, a mean that swings one
full sine period of 6 sigma over the stream, a spiral, rounded log-normal "byte counts", and
(fifth session, from a tryout on streams of its own) a constant feature with a value once in
1,000 rows and a spread that grows fourfold.  The swinging mean and the growing spread are
repeated with ``model.half_life: 5000`` (without forgetting the model converges to the whole
history, and a stream that moves away from it is flagged for it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_calibration import WARMUP, _Batch, _rotation  # noqa: E402
from streamgmm.detection.detector import Detector  # noqa: E402
from streamgmm.service.config import config_from_dict  # noqa: E402

QUANTILES = (0.01, 0.001)


def near_cauchy(n, rng, d=5):
    return rng.normal(size=(n, d)) / np.sqrt(rng.chisquare(1.5, (n, 1)) / 1.5)


def exponentials(n, rng, d=10):
    return rng.exponential(rng.uniform(0.5, 5.0, d), (n, d))


def binary_and_continuous(n, rng):
    return np.hstack([rng.binomial(1, [0.1, 0.5, 0.8], (n, 3)).astype(float),
                      rng.normal(size=(n, 3)) * [1.0, 5.0, 0.1]])


def low_rank(n, rng, d=20):
    return rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) + 1e-3 * rng.normal(size=(n, d))


def dice(n, rng):
    return rng.integers(1, 7, (n, 4)).astype(float)


def zero_inflated(n, rng, d=5):
    x = np.abs(rng.normal(size=(n, d))) * rng.uniform(1.0, 100.0, d)
    x[rng.random((n, d)) < 0.3] = 0.0
    return x


def clusters_40d(n, rng, d=40):
    means = rng.normal(scale=4.0, size=(3, d))
    return means[rng.integers(0, 3, n)] + rng.normal(size=(n, d)) @ _rotation(d, rng) * rng.uniform(0.5, 2.0, d)


def swinging_mean(n, rng, d=4):
    phase = np.linspace(0.0, 1.0, n)[:, np.newaxis]
    return rng.normal(size=(n, d)) + 6.0 * np.sin(2.0 * np.pi * phase)


def spiral(n, rng):
    t = rng.uniform(0.5, 4.0 * np.pi, n)
    return np.c_[t * np.cos(t), t * np.sin(t)] + rng.normal(scale=0.3, size=(n, 2))


def byte_counts(n, rng, d=6):
    return np.round(np.exp(rng.normal(8.0, 2.0, (n, d))))


def rare_value_on_a_constant(n, rng, d=4):
    """A feature 7.0 but for 8.0 once in 1,000 rows, beside Gaussian ones (helper-40: a warm-up
    without an 8.0 flagged every later one)."""
    constant = np.where(rng.random(n) < 1e-3, 8.0, 7.0)
    return np.c_[rng.normal(size=(n, d)), constant]


def growing_spread(n, rng, d=4):
    """Every feature's standard deviation grows from 1 to 4 over the stream (helper-40)."""
    return rng.normal(size=(n, d)) * np.linspace(1.0, 4.0, n)[:, np.newaxis]


SHAPES = {
    "near-Cauchy t(1.5), 5-d": near_cauchy,
    "exponentials, 10-d": exponentials,
    "3 binary + 3 continuous": binary_and_continuous,
    "rank 3 in 20-d": low_rank,
    "four dice": dice,
    "zero-inflated, 5-d": zero_inflated,
    "3 clusters in 40-d": clusters_40d,
    "swinging mean (one sine period)": swinging_mean,
    "spiral, 2-d": spiral,
    "rounded log-normal byte counts": byte_counts,
    "constant 7.0, 8.0 once in 1,000 rows": rare_value_on_a_constant,
    "spread growing x4 over the stream": growing_spread,
}
# (label, shape, model settings)
ROWS = [(name, name, {}) for name in SHAPES] + [
    ("swinging mean, model.half_life 5000", "swinging mean (one sine period)", {"half_life": 5000}),
    ("spread growing x4, model.half_life 5000", "spread growing x4 over the stream", {"half_life": 5000})]


def flagged_ratio(job):
    label, shape, model, q, seed, n = job
    X = SHAPES[shape](n + WARMUP, np.random.default_rng(1000 + seed))
    config = config_from_dict({
        "input": {"format": "float64", "dimension": X.shape[1]},
        "model": {"warmup": WARMUP, "random_state": seed, **model},
        "threshold": {"quantile": q},
    }, environ={})
    detector = Detector(config)
    flags = np.concatenate([detector.process(_Batch(X[s:s + 1000], s), now=0.0).flags for s in range(0, len(X), 1000)])
    return label, q, flags.mean() / q


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=50_000, help="scored points per stream")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(label, shape, model, q, seed, args.n) for label, shape, model in ROWS for q in QUANTILES
            for seed in range(args.seeds)]
    ratios: dict = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for label, q, ratio in pool.map(flagged_ratio, jobs):
            ratios.setdefault((label, q), []).append(ratio)
    print(f"\n## Calibration on unseen shapes: flagged share / q, {args.n:,} scored points, seeds 0..{args.seeds - 1}\n")
    print_band_table([label for label, _, _ in ROWS], QUANTILES, ratios, "worst low, worst high")


def print_band_table(labels, quantiles, ratios: dict, cell_title: str) -> None:
    """One row a stream: the lowest and highest flagged share / q over seeds at each q, and
    whether all of them lie in 0.5-2."""
    print("| stream | " + " | ".join(f"q={q}: {cell_title}" for q in quantiles) + " | in 0.5-2 |")
    print("|---|" + "---|" * len(quantiles) + "---|")
    for label in labels:
        cells, inside = [], True
        for q in quantiles:
            r = ratios[(label, q)]
            cells.append(f"{min(r):.2f}, {max(r):.2f}")
            inside &= 0.5 <= min(r) and max(r) <= 2.0
        print(f"| {label} | " + " | ".join(cells) + f" | {'yes' if inside else '**no**'} |")


if __name__ == "__main__":
    main()
