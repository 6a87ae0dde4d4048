"""Does ``threshold.quantile: q`` flag about q of normal traffic, whatever the data's shape?

    python bench/bench_calibration.py [--quick] [--seeds 3] [--jobs 2]

Anomaly-free streams go through the real ``Detector`` in batches of 1000 (as ``streamgmm
replay`` does; the messages are float64 values), with the default configuration except
``threshold.quantile``.  For every stream, q and seed: the flagged share of the points after
the warm-up, divided by q (1 is perfect; the target is 0.5-2), over the whole stream and over
its first 10k and 50k scored points.  Then the same with a burst: a block of 1% of the stream
at its middle, moved far from the data (3 times its range); its recall, and the ratio
on the normal points after it.  The model-density mode (``model_quantile``, the default
before) runs beside each.  Markdown tables on stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from streamgmm.detection.detector import Detector  # noqa: E402
from streamgmm.detection.records import InputRecord  # noqa: E402
from streamgmm.service.config import config_from_dict  # noqa: E402
from streamgmm.dev.synthetic import skewed_clusters  # noqa: E402

SHUTTLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "shuttle.csv"
WARMUP = 1000
BATCH = 1000
QUANTILES = (0.01, 0.001, 0.0001)


# ------------------------------------------------------------------ streams
def _rotation(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def student_t(n, rng, d=8, df=3):
    """Heavy tails: a correlated multivariate Student t with 3 degrees of freedom."""
    z = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d)
    return (z / np.sqrt(rng.chisquare(df, (n, 1)) / df)) @ _rotation(d, rng)


def log_normal(n, rng, d=8):
    """Skew: exp of a correlated Gaussian."""
    z = rng.normal(size=(n, d)) @ (_rotation(d, rng) * rng.uniform(0.3, 1.0, d))
    return np.exp(z)


def uniform_box(n, rng, d=6):
    """Bounded: uniform in a box."""
    return rng.uniform(0.0, 1.0, (n, d)) * rng.uniform(1.0, 10.0, d)


def ring(n, rng, d=4):
    """A circle with 2% radial noise, in a random plane of d dimensions (1% noise off it)."""
    angle = rng.uniform(0.0, 2 * np.pi, n)
    radius = 1.0 + 0.02 * rng.normal(size=n)
    X = 0.01 * rng.normal(size=(n, d))
    X[:, 0] += radius * np.cos(angle)
    X[:, 1] += radius * np.sin(angle)
    return X @ _rotation(d, rng)


def poisson_counts(n, rng, d=6):
    """Discrete: independent Poisson counts, means 2 to 30."""
    return rng.poisson(rng.uniform(2.0, 30.0, d), (n, d)).astype(float)


def drifting(n, rng, d=8):
    """Drift: bench_quality's six clusters, whose means move 4 units (half their separation)
    over the stream.  (bench_quality's cluster that appears at 40% is left out: it is flagged
    until the detector adopts it, threshold.adopt_after points later, whatever the threshold.)"""
    from streamgmm.dev.synthetic import random_mixture

    truth = random_mixture(6, d, rng, separation=8.0)
    X, labels = truth.sample(n, rng)
    direction = rng.normal(size=(6, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return X + direction[labels] * (4.0 * np.arange(n) / n)[:, None]


def shuttle(n, rng):
    """The normal rows of shuttle (9 integer features): file order for seed 0, shuffled after."""
    data = np.loadtxt(SHUTTLE, delimiter=",", skiprows=1)
    X = data[data[:, -1] == 0, :-1]
    return X if rng is None else X[rng.permutation(len(X))]


SYNTHETIC = {
    "Student t df=3 (8-d)": student_t,
    "log-normal (8-d)": log_normal,
    "uniform box (6-d)": uniform_box,
    "ring (2-d circle in 4-d)": ring,
    "Poisson counts (6-d)": poisson_counts,
    "non-Gaussian clusters (6-d)": skewed_clusters,
    "drifting means (8-d)": drifting,
}


def stream(name, n, seed):
    rng = np.random.default_rng(seed)
    if name == "shuttle normal rows (9-d)":
        return shuttle(n, None if seed == 0 else rng)
    return SYNTHETIC[name](n, rng)


# -------------------------------------------------------------------- runs
class _Batch:
    """Columns of a batch of float64 messages, as the Kafka source hands them over."""

    def __init__(self, X, start):
        self.X, self.start = X, start
        self.values = [row.tobytes() for row in X]
        self.timestamps_ms = np.zeros(len(X))
        self.last_offsets = {("bench", 0): start + len(X) - 1}

    def __len__(self):
        return len(self.X)

    def record(self, i):
        return InputRecord("bench", 0, self.start + i, self.values[i])


def run(X, q, mode, seed, window=None):
    """Flags (and the threshold's calibration state) for every point after the warm-up."""
    config = config_from_dict({
        "input": {"format": "float64", "dimension": X.shape[1]},
        "model": {"warmup": WARMUP, "random_state": seed},
        "threshold": {"mode": mode, "quantile": q, **({"window": window} if window else {})},
    }, environ={})
    detector = Detector(config)
    flags = []
    for start in range(0, len(X), BATCH):
        result = detector.process(_Batch(X[start:start + BATCH], start), now=0.0)
        flags.append(result.flags)
    return np.concatenate(flags)


def with_burst(X, rng, fraction=0.01, distance=3.0):
    """X with a block of ``fraction`` of it, at the middle, moved along one random direction
    by ``distance`` times the data's range (min to max, per feature): far from all of it."""
    X = X.copy()
    n = len(X)
    block = slice(n // 2, n // 2 + int(fraction * n))
    direction = rng.normal(size=X.shape[1])
    direction /= np.linalg.norm(direction)
    X[block] += distance * (X.max(axis=0) - X.min(axis=0)) * direction
    return X, block


def one_case(case):
    """One (stream, q, seed): the default mode and the model-density mode, plain and with a burst."""
    name, q, seed, n, window = case
    X = stream(name, n + WARMUP, seed)
    out = {}
    for mode in ("quantile", "model_quantile"):
        started = time.perf_counter()
        flags = run(X, q, mode, seed, window)
        out[mode] = {
            "ratio": flags.mean() / q,
            "first10k": flags[:10_000].mean() / q,
            "first50k": flags[:50_000].mean() / q,
            "seconds": time.perf_counter() - started,
        }
        Xb, block = with_burst(X, np.random.default_rng(seed + 100))
        flags = run(Xb, q, mode, seed, window)
        scored = np.arange(WARMUP, len(X))  # flags[i] is point WARMUP + i
        in_burst = (scored >= block.start) & (scored < block.stop)
        out[mode]["burst_recall"] = flags[in_burst].mean()
        out[mode]["after_burst"] = flags[scored >= block.stop].mean() / q
    return name, q, seed, len(X) - WARMUP, out


def sweep_case(case):
    """Flagged share / q of the default mode with one threshold.window (no burst)."""
    name, q, seed, n, window = case
    X = stream(name, n + WARMUP, seed)
    return name, q, window, run(X, q, "quantile", seed, window).mean() / q


def window_sweep(jobs, seeds, windows=(10_000, 20_000, 100_000)):
    names = ["ring (2-d circle in 4-d)", "drifting means (8-d)", "log-normal (8-d)", "Student t df=3 (8-d)"]
    cases = [(name, q, seed, 100_000, w) for name in names for q in (0.01, 0.001)
             for seed in range(seeds) for w in windows]
    with ProcessPoolExecutor(jobs) as pool:
        results = list(pool.map(sweep_case, cases))
    print(f"\n### threshold.window: flagged share / q, 100,000 points ({seeds} seeds: worst / median)\n")
    print("| stream | q | " + " | ".join(f"window {w:,}" for w in windows) + " |")
    print("|---|---|" + "---|" * len(windows))
    for name in names:
        for q in (0.01, 0.001):
            cells = []
            for w in windows:
                values = np.array([r for n_, q_, w_, r in results if (n_, q_, w_) == (name, q, w)])
                worst = values[np.argmax(np.abs(np.log(np.maximum(values, 1e-9))))]
                cells.append(f"{worst:.2f} / {np.median(values):.2f}")
            print(f"| {name} | {q:g} | " + " | ".join(cells) + " |")


def threshold_cost(n=2_000_000, batch=1000):
    """The threshold's own time per point (classify + observe, refits included), on scores
    from a gamma distribution fed in batches as the detector does."""
    from streamgmm.detection.threshold import StreamQuantileThreshold

    print(f"\n### Cost of the threshold per point ({n:,} scores, batches of {batch})\n")
    print("| q | window | ns per point | refits of the GPD |")
    print("|---|---|---|---|")
    scores = np.random.default_rng(0).gamma(4.0, size=n)
    for q in QUANTILES:
        threshold = StreamQuantileThreshold(q)
        threshold.start.value = -float(np.quantile(scores, 1 - q))
        fits = 0
        started = time.perf_counter()
        for i in range(0, n, batch):
            log_density = -scores[i:i + batch]
            threshold.observe(log_density, threshold.classify(log_density))
            fits += threshold.shape_fitted_at == threshold.n_counted
        elapsed = time.perf_counter() - started
        print(f"| {q:g} | {threshold.window:,} | {elapsed / n * 1e9:.0f} | {fits} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter streams, q 0.01 and 0.001 only")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=None, help="streams whose name contains this")
    parser.add_argument("--window", type=int, default=None, help="threshold.window (default: the default)")
    parser.add_argument("--quantiles", default=None,
                        help="comma-separated q values (default 0.01,0.001,0.0001)")
    parser.add_argument("--sweep", action="store_true", help="only the threshold.window sweep")
    args = parser.parse_args()
    if args.sweep:
        window_sweep(args.jobs, args.seeds)
        return
    names = ["shuttle normal rows (9-d)", *SYNTHETIC] if SHUTTLE.exists() else list(SYNTHETIC)
    if args.only:
        names = [n for n in names if args.only.lower() in n.lower()]
    quantiles = tuple(float(v) for v in args.quantiles.split(",")) if args.quantiles else QUANTILES
    cases = []
    for name in names:
        for q in quantiles[:2] if args.quick else quantiles:
            n = max(100_000, int(50 / q)) if not args.quick else 50_000
            if name.startswith("shuttle"):
                if q < 0.001:
                    continue  # 45,586 rows: too short for q = 1e-4
                n = 45_586 - WARMUP
            for seed in range(args.seeds):
                cases.append((name, q, seed, n, args.window))
    cases.sort(key=lambda c: -c[3])  # longest first, for the pool
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one_case, cases))
    elapsed = time.perf_counter() - started

    table: dict = {}
    for name, q, seed, n, out in results:
        table.setdefault((name, q), []).append((n, out))

    def summary(rows, mode, key, fmt="{:.2f}"):
        values = np.array([out[mode][key] for _, out in rows])
        if key == "burst_recall":
            worst = values.min()
        else:  # the furthest from 1, either way
            worst = values[np.argmax(np.abs(np.log(np.maximum(values, 1e-9))))]
        return f"{fmt.format(worst)} / {fmt.format(np.median(values))}"

    print(f"\n### Flagged share / q on anomaly-free streams ({args.seeds} seeds: worst / median)\n")
    print("| stream | q | points scored | quantile (stream tail) | first 10k | first 50k "
          "| model_quantile (before) |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        for q in quantiles:
            rows = table.get((name, q))
            if not rows:
                continue
            print(f"| {name} | {q:g} | {rows[0][0]:,} | {summary(rows, 'quantile', 'ratio')} | "
                  f"{summary(rows, 'quantile', 'first10k')} | {summary(rows, 'quantile', 'first50k')} | "
                  f"{summary(rows, 'model_quantile', 'ratio')} |")
    print("\n### A burst of 1% of the stream, 3 times the data's range off, at the middle "
          f"({args.seeds} seeds: worst / median)\n")
    print("| stream | q | burst recall | flagged / q after the burst | model_quantile: recall "
          "| model_quantile: after |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for q in quantiles:
            rows = table.get((name, q))
            if not rows:
                continue
            print(f"| {name} | {q:g} | {summary(rows, 'quantile', 'burst_recall', '{:.3f}')} | "
                  f"{summary(rows, 'quantile', 'after_burst')} | "
                  f"{summary(rows, 'model_quantile', 'burst_recall', '{:.3f}')} | "
                  f"{summary(rows, 'model_quantile', 'after_burst')} |")
    seconds = sum(out[m]["seconds"] for _, _, _, _, out in results for m in out)
    points = sum(n for _, _, _, n, _ in results) * 2
    threshold_cost()
    print(f"\n{len(results)} cases in {elapsed:.0f} s ({points / seconds:,.0f} points/s per process "
          "through Detector.process, float64 messages)")


if __name__ == "__main__":
    main()
