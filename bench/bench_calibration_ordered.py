"""Calibration on streams in time order that a tryout brought (helper-59, eleventh session): the
check of ``bench_calibration.py`` (flagged share / q of anomaly-free streams, default
configuration apart from ``input`` and ``threshold.quantile``, batches of 1,000) where the order
of the rows matters: the same rows shuffled are in band.

    python bench/bench_calibration_ordered.py [--seeds 3] [--jobs 2]

Streams (80,000 rows): a daily load cycle over four days (hour as sine and cosine, requests per
second peaking in the afternoon, a latency growing with the load: the warm-up sees the first
hour of the night); Poisson(0.05) counts in one feature (95% zeros, the most common value one
exact number); counters stuck at constants beside a Poisson(0.05) column; the daily cycle with
a garbage collection every 30th row (helper-65: a pause growing with the load, a normal
minority mode the warm-up sees at its smallest); weekdays and weekends (helper-73: two days in
seven at a fifth of the level, new to the model at the first weekend); metrics that wander
(fifteenth session: AR(1) with coefficients 0.9, 0.98, 0.995, whose high scores come in runs);
and the daily cycle shuffled, for reference.  The table gives the whole stream after the warm-up and its last
quarter (the fourth day), worst and median over the seeds, and the most common value's rows
flagged (the zeros; the counters' constant rows).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_calibration import _Batch  # noqa: E402
from streamgmm.detection.detector import Detector  # noqa: E402
from streamgmm.dev.synthetic import daily_load, daily_load_with_collections  # noqa: E402
from streamgmm.service.config import config_from_dict  # noqa: E402

QUANTILES = (0.01, 0.001)
N = 80_000


def daily_load_shuffled(n, rng):
    return daily_load(n, rng)[rng.permutation(n)]


def poisson_counts(n, rng):
    return rng.poisson(0.05, (n, 1)).astype(float)


def stuck_counters(n, rng):
    """Three counters stuck at constants and one Poisson(0.05) column."""
    X = np.empty((n, 4))
    X[:] = [52.0, 0.0, 0.0, 37.0]
    X[:, 2] = rng.poisson(0.05, n)
    return X


def weekly_levels(n, rng):
    """helper-73's week of 1,440 points a day: a level of 100 on weekdays and 20 at weekends, a
    daily swing of 30%, a second feature 8 on weekdays and 2 at weekends, and noise; the warm-up
    sees part of a weekday only, and the first weekend is new to the model."""
    t = np.arange(n)
    weekend = (t // 1440) % 7 >= 5
    hour = (t % 1440) / 60.0
    level = np.where(weekend, 20.0, 100.0) * (1.0 + 0.3 * np.sin(2.0 * np.pi * hour / 24.0))
    return np.column_stack([level + rng.normal(0.0, 5.0, n), np.where(weekend, 2.0, 8.0) + rng.normal(size=n),
                            rng.normal(size=n)])


def wandering(phi):
    """A metric that wanders (fifteenth session): a 4-d AR(1) with coefficient ``phi``, each step
    a standard normal's marginal; its high scores come in runs (tens of points at 0.98)."""
    def make(n, rng, d=4):
        noise = rng.normal(size=(n, d)) * np.sqrt(1.0 - phi**2)
        x = np.empty((n, d))
        x[0] = rng.normal(size=d)
        for i in range(1, n):
            x[i] = phi * x[i - 1] + noise[i]
        return x
    return make


SHAPES = {
    "daily load cycle, 4 days in time order": daily_load,
    "daily load cycle, shuffled": daily_load_shuffled,
    "Poisson(0.05) counts, 1-d": poisson_counts,
    "3 stuck counters + Poisson(0.05)": stuck_counters,
    "daily load cycle with GC pauses (every 30th row)": daily_load_with_collections,
    "weekdays and weekends at a fifth of the level": weekly_levels,
    "a wandering metric, AR(1) 0.9, 4-d": wandering(0.9),
    "a wandering metric, AR(1) 0.98, 4-d": wandering(0.98),
    "a wandering metric, AR(1) 0.995, 4-d": wandering(0.995),
}


def run(job):
    shape, q, seed = job
    X = SHAPES[shape](N, np.random.default_rng(seed))
    config = config_from_dict({"input": {"format": "float64", "dimension": X.shape[1]},
                               "threshold": {"quantile": q}}, environ={})
    detector = Detector(config)
    flags = np.zeros(N, dtype=bool)
    scored = np.zeros(N, dtype=bool)
    for s in range(0, N, 1000):
        result = detector.process(_Batch(X[s:s + 1000], s), now=0.0)
        flags[s + result.scored_index] = result.flags
        scored[s + result.scored_index] = True
    values, counts = np.unique(X, axis=0, return_counts=True)
    modal = (X == values[np.argmax(counts)]).all(axis=1) if counts.max() > N // 2 else np.zeros(N, dtype=bool)
    last = np.arange(N) >= 3 * N // 4
    return (shape, q, flags[scored].mean() / q, flags[scored & last].mean() / q,
            int(np.count_nonzero(flags & modal)), int(np.count_nonzero(modal & scored)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(shape, q, seed) for shape in SHAPES for q in QUANTILES for seed in range(args.seeds)]
    results: dict = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for shape, q, whole, last, modal_flagged, modal in pool.map(run, jobs):
            results.setdefault((shape, q), []).append((whole, last, modal_flagged, modal))
    print(f"\n## Streams in time order: flagged share / q, {N:,} rows, seeds 0..{args.seeds - 1}\n")
    print("| stream | q | whole stream: worst / median | last quarter: worst / median | most common value's rows flagged | in 0.5-2 |")
    print("|---|---|---|---|---|---|")

    def worst(values):
        return max(values, key=lambda r: abs(np.log(max(r, 1e-9))))

    for (shape, q), rows in results.items():
        whole, last = [r[0] for r in rows], [r[1] for r in rows]
        flagged, modal = sum(r[2] for r in rows), sum(r[3] for r in rows)
        common = f"{flagged:,} of {modal:,}" if modal else "(none over half)"
        ok = "yes" if all(0.5 <= r <= 2.0 for r in whole) else "**no**"
        print(f"| {shape} | {q:g} | {worst(whole):.2f} / {np.median(whole):.2f} | {worst(last):.2f} / "
              f"{np.median(last):.2f} | {common} | {ok} |")


if __name__ == "__main__":
    main()
