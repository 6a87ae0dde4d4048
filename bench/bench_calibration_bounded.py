"""Calibration on bounded, short-tailed and discrete shapes: the check of ``bench_calibration.py``
(flagged share / q of anomaly-free streams, default configuration apart from
``threshold.quantile``) on twelve shapes written in the eighth session, several of them in one
or two dimensions, where a density's lowest values crowd together: a point's log-density near
the edge of a uniform or in the middle of a sine's values differs from the next by a few
thousandths of a nat, so the threshold sits on a cliff.

    python bench/bench_calibration_bounded.py [--seeds 5] [--n 50000] [--jobs 2] [--no-1e-4]

Shapes: uniform on [0, 1] (1-d and 2-d), the values of a sine (1-d; the density is lowest in the
middle and infinite at the ends), Beta(0.5, 0.5) in 3-d, uniform on a disk, a triangular, an
exponential and a log-normal (1-d), half-normals (2-d), rounded percentages (3-d), geometric
counts (2-d), and uniform beside normal features.  The sine and the 1-d uniform were used to find
the fix of this session (flagged points just past the threshold learned while far more than q
are flagged, see ``Detector._flag_learn``); the others were not used to choose anything.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_calibration import WARMUP, _Batch  # noqa: E402
from bench_calibration_unseen import print_band_table  # noqa: E402
from streamgmm.detection.detector import Detector  # noqa: E402
from streamgmm.service.config import config_from_dict  # noqa: E402

QUANTILES = (0.01, 0.001, 0.0001)
# Scored points at least this many times 1/q (q = 1e-4: 500,000), so that q n flags are expected.
POINTS_OVER_1_OVER_Q = 50


def _disk(n, rng):
    angle, radius = rng.uniform(0.0, 2.0 * np.pi, n), np.sqrt(rng.uniform(0.0, 1.0, n))
    return np.c_[radius * np.cos(angle), radius * np.sin(angle)]


SHAPES = {
    "uniform, 1-d": lambda n, rng: rng.uniform(0.0, 1.0, (n, 1)),
    "uniform, 2-d": lambda n, rng: rng.uniform(0.0, 1.0, (n, 2)),
    "a sine's values, 1-d": lambda n, rng: np.sin(rng.uniform(0.0, 2.0 * np.pi, (n, 1))),
    "Beta(0.5, 0.5), 3-d": lambda n, rng: rng.beta(0.5, 0.5, (n, 3)),
    "uniform on a disk": _disk,
    "triangular, 1-d": lambda n, rng: rng.triangular(0.0, 0.2, 1.0, (n, 1)),
    "exponential, 1-d": lambda n, rng: rng.exponential(1.0, (n, 1)),
    "half-normal, 2-d": lambda n, rng: np.abs(rng.normal(size=(n, 2))),
    "rounded percentages, 3-d": lambda n, rng: np.round(100.0 * rng.beta(2.0, 5.0, (n, 3))),
    "geometric counts, 2-d": lambda n, rng: rng.geometric(0.3, (n, 2)).astype(float),
    "log-normal, 1-d": lambda n, rng: rng.lognormal(0.0, 1.0, (n, 1)),
    "uniform beside normal, 3-d": lambda n, rng: np.c_[rng.uniform(-3, 3, n), rng.normal(size=n),
                                                        rng.uniform(0, 10, n)],
}


def flagged_ratio(job):
    name, q, seed, n = job
    X = SHAPES[name](n + WARMUP, np.random.default_rng(5000 + seed))
    config = config_from_dict({"input": {"format": "float64", "dimension": X.shape[1]},
                               "model": {"warmup": WARMUP, "random_state": seed},
                               "threshold": {"quantile": q}}, environ={})
    detector = Detector(config)
    flags = np.concatenate([detector.process(_Batch(X[s:s + 1000], s), now=0.0).flags for s in range(0, len(X), 1000)])
    return name, q, flags[WARMUP:].mean() / q


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=50_000, help="scored points per stream")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-1e-4", dest="tiny", action="store_false",
                        help="leave out q = 1e-4 (its streams are 500,000 points: about 2 minutes on 2 cores)")
    args = parser.parse_args()
    quantiles = QUANTILES if args.tiny else QUANTILES[:2]
    jobs = [(name, q, seed, max(args.n, round(POINTS_OVER_1_OVER_Q / q))) for name in SHAPES for q in quantiles
            for seed in range(args.seeds)]
    ratios: dict = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, q, ratio in pool.map(flagged_ratio, jobs):
            ratios.setdefault((name, q), []).append(ratio)
    print(f"\n## Calibration on bounded shapes: flagged share / q, {args.n:,} scored points "
          f"(at q = 1e-4: {round(POINTS_OVER_1_OVER_Q / 1e-4):,}), seeds 0..{args.seeds - 1}\n")
    print_band_table(list(SHAPES), quantiles, ratios, "lowest, highest")


if __name__ == "__main__":
    main()
