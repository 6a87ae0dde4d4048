"""Is "1 in N" true?  Each anomaly record says how rare its point is (``rarity.tail_probability``,
shown as "1 in N").  On a stream with no anomalies, points claiming a tail probability of p or
less should come about n x p times in n points.  This counts them, per stream and over seeds,
at the default configuration (``threshold.quantile`` 0.001), for p = 1e-4, 1e-5 and 1e-6.

    python bench/bench_rarity.py [--seeds 3] [--n 100000] [--jobs 2]

Streams: the calibration benchmark's synthetic shapes, five of ``bench_calibration_unseen.py``'s
and two heavier tails written for this check (a Pareto with tail index 1.1 beside a |Cauchy|,
and a log-Cauchy), none used to choose a default.  A count over expected of 1 is right; far
above 1 the records over-claim (an on-call engineer reads "1 in 10 million" on a point that
comes every few hours); below 1 they under-claim.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import orjson

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_calibration import SYNTHETIC, WARMUP, _Batch  # noqa: E402
from bench_calibration_unseen import SHAPES  # noqa: E402
from streamgmm.detection.detector import Detector  # noqa: E402
from streamgmm.service.config import config_from_dict  # noqa: E402

LEVELS = (1e-4, 1e-5, 1e-6)


def pareto_and_cauchy(n, rng, d=4):
    """Tail index 1.1 (infinite variance) in two features, |Cauchy| in one, a Gaussian one."""
    return np.c_[rng.pareto(1.1, (n, 2)), np.abs(rng.standard_cauchy((n, 1))), rng.normal(size=(n, d - 3))]


def log_cauchy(n, rng, d=3):
    """exp of a Cauchy, clipped to a float's range: a tail heavier than any power."""
    return np.exp(np.clip(rng.standard_cauchy((n, d)) * 0.3, -50, 50))


STREAMS = {**SYNTHETIC,
           **{name: SHAPES[name] for name in ("near-Cauchy t(1.5), 5-d", "exponentials, 10-d", "zero-inflated, 5-d",
                                               "rounded log-normal byte counts", "spread growing x4 over the stream")},
           "Pareto(1.1) + |Cauchy|, 4-d": pareto_and_cauchy,
           "log-Cauchy, 3-d": log_cauchy}


def claims(job):
    """(stream, seed, points scored, tail probabilities of the anomaly records)."""
    name, seed, n = job
    X = STREAMS[name](n + WARMUP, np.random.default_rng(5000 + seed))
    config = config_from_dict({"input": {"format": "float64", "dimension": X.shape[1]},
                               "model": {"warmup": WARMUP, "random_state": seed}}, environ={})
    detector = Detector(config)
    tails, scored = [], 0
    for start in range(0, len(X), 1000):
        result = detector.process(_Batch(X[start:start + 1000], start), now=0.0)
        scored += len(result.scored_index)
        tails += [orjson.loads(record.value)["rarity"]["tail_probability"] for record in result.anomalies]
    return name, seed, scored, np.array(tails)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", default="", help="streams whose name contains this")
    args = parser.parse_args()
    jobs = [(name, seed, args.n) for name in STREAMS if args.only in name for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(claims, jobs))
    print(f"\nAnomaly-free streams, {args.n:,} points after the warm-up, seeds 0..{args.seeds - 1}, default config "
          "(q = 0.001): records claiming a tail probability <= p, found / expected (n x p), summed over seeds\n")
    print("| stream | " + " | ".join(f"<= {p:g}" for p in LEVELS) + " | worst seed at 1e-5 |")
    print("|---|" + "---|" * (len(LEVELS) + 1))
    totals = {p: [0, 0.0] for p in LEVELS}
    for name in dict.fromkeys(r[0] for r in results):
        mine = [r for r in results if r[0] == name]
        cells = []
        for p in LEVELS:
            found = sum(int((tails <= p).sum()) for _, _, _, tails in mine)
            expected = sum(scored for _, _, scored, _ in mine) * p
            totals[p][0] += found
            totals[p][1] += expected
            cells.append(f"{found} / {expected:.1f}")
        worst = max(int((tails <= 1e-5).sum()) / (scored * 1e-5) for _, _, scored, tails in mine)
        print(f"| {name} | " + " | ".join(cells) + f" | {worst:.1f} |")
    print("| all | " + " | ".join(f"{f} / {e:.1f} ({f / e:.1f}x)" for f, e in totals.values()) + " | |")


if __name__ == "__main__":
    main()
