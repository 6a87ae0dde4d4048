"""Regimes that come back: flagged share / q, and flagged points per block, on anomaly-free
streams that switch between two normal regimes (default config apart from
``threshold.quantile``).

    python bench/bench_regimes.py [--seeds 2] [--jobs 2]

4-d standard Gaussian points; in every other block the mean moves 6 sd along every feature, or
the spread grows x5.  Blocks of 7,500 points (shorter than ``threshold.adopt_after``, 20,000)
and of 50,000.  Nothing here is anomalous: the target is about q flagged.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_calibration import WARMUP, _Batch  # noqa: E402
from streamgmm.detection.detector import Detector  # noqa: E402
from streamgmm.service.config import config_from_dict  # noqa: E402


def switching(n, rng, block, kind, d=4):
    moved = (np.arange(n) // block) % 2 == 1
    X = rng.normal(size=(n, d))
    if kind == "mean":
        return X + np.where(moved, 6.0, 0.0)[:, np.newaxis]
    return X * np.where(moved, 5.0, 1.0)[:, np.newaxis]


CASES = [("mean 0 <-> 6", "mean", 7_500, 150_000), ("spread x5", "spread", 7_500, 150_000),
         ("mean 0 <-> 6", "mean", 50_000, 300_000), ("spread x5", "spread", 50_000, 300_000)]


def one(job):
    label, kind, block, n, q, seed = job
    X = switching(n, np.random.default_rng(900 + seed), block, kind)
    config = config_from_dict({"input": {"format": "float64", "dimension": X.shape[1]},
                               "model": {"warmup": WARMUP, "random_state": seed},
                               "threshold": {"quantile": q}}, environ={})
    detector = Detector(config)
    flags = np.zeros(len(X), dtype=bool)
    for start in range(0, len(X), 1000):
        result = detector.process(_Batch(X[start:start + 1000], start), now=0.0)
        flags[start + result.scored_index] = result.flags
    per_block = [int(flags[i:i + block].sum()) for i in range(0, len(X), block)]
    return label, block, q, seed, flags.mean() / q, per_block


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(*case, q, seed) for case in CASES for q in (0.01, 0.001) for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    print(f"\n## Regimes that come back, seeds 0..{args.seeds - 1}\n")
    print("| stream | block | q | flagged / q (worst) | flagged per block, worst seed |")
    print("|---|---|---|---|---|")
    for label, _, block, _ in CASES:
        for q in (0.01, 0.001):
            mine = [r for r in results if r[0] == label and r[1] == block and r[2] == q]
            worst = max(mine, key=lambda r: r[4])
            shown = ", ".join(f"{v:,}" for v in worst[5][:12]) + (", ..." if len(worst[5]) > 12 else "")
            print(f"| {label} | {block:,} | {q} | {worst[4]:.1f} | {shown} |")


if __name__ == "__main__":
    main()
