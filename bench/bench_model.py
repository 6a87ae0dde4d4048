"""Speed and memory of the GMM core, side by side with river and scikit-learn in one run.

    python bench/bench_model.py [--quick]

Prints five tables: online score+learn throughput (vs river HalfSpaceTrees; the default
auto-sized model too), batch fit time at equal log-likelihood (vs scikit-learn), the one-off
cost of sizing the model at warm-up, scoring time and memory by covariance type (vs
scikit-learn), and memory against stream length.
Single-threaded BLAS (OPENBLAS_NUM_THREADS=1 unless already set): one core, as in the issue.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import sys
import time
import tracemalloc
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from streamgmm import GaussianMixture, OnlineGaussianMixture  # noqa: E402
from streamgmm.dev.synthetic import random_mixture  # noqa: E402


def table(title, header, rows):
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def online_throughput(X, batch=1000, repeats=3, **params):
    """Best of ``repeats`` score+learn rates (points/s) of a model of ``params`` (K=8 full if none)."""
    params = params or {"n_components": 8, "covariance_type": "full"}
    best = 0.0
    for _ in range(repeats):
        model = OnlineGaussianMixture(random_state=0, **params)
        model.partial_fit(X[:1000])
        start = time.perf_counter()
        n = 0
        for i in range(1000, len(X), batch):
            chunk = X[i : i + batch]
            scored = model.score_batch(chunk)  # score first (prequential) ...
            model.learn(scored)  # ... then learn from the same batch
            n += len(chunk)
        best = max(best, n / (time.perf_counter() - start))
    return best, f"{model.covariance_type_} K={model.n_components_}"


def warmup_sizing(cases):
    """Seconds the warm-up takes to size and fit the default (auto) model, per (D, warm-up points)."""
    rows = []
    for D, n in cases:
        rng = np.random.default_rng(D)
        X, _ = random_mixture(4, D, rng).sample(n, rng)
        times = []
        for seed in range(3):
            start = time.perf_counter()
            model = OnlineGaussianMixture(warmup=n, random_state=seed).partial_fit(X)
            times.append(time.perf_counter() - start)
        rows.append((D, f"{n:,}", f"{np.median(times):.2f}", f"{max(times):.2f}",
                     f"{model.covariance_type_} K={model.n_components_}"))
    return rows


def river_throughput(X, n_points):
    from river import anomaly, compose, preprocessing

    names = [f"x{i}" for i in range(X.shape[1])]
    rows = [dict(zip(names, row)) for row in X[:n_points].tolist()]
    hst = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=0))
    start = time.perf_counter()
    for row in rows:
        hst.score_one(row)
        hst.learn_one(row)
    return n_points / (time.perf_counter() - start)


def batch_fit_comparison(X, K=8):
    from sklearn.mixture import GaussianMixture as SklearnGM

    from streamgmm.mixture import _gaussian as g
    from streamgmm.mixture._kmeans import kmeans

    centers, labels = kmeans(X, K, np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resp = np.eye(K)[labels]
        nk, means, covs = g.estimate_gaussian_parameters(X, resp, 1e-6, "full")
        precisions = np.linalg.inv(covs)
        init = dict(weights_init=nk / nk.sum(), means_init=means, precisions_init=precisions)
        rows = []
        for name, cls in (("streamgmm", GaussianMixture), ("scikit-learn", SklearnGM)):
            times = []
            for _ in range(3):
                model = cls(K, covariance_type="full", tol=1e-3, max_iter=200, **init)
                start = time.perf_counter()
                model.fit(X)
                times.append(time.perf_counter() - start)
            rows.append((name, min(times), model.n_iter_, model.score(X)))
    return rows


def memory_against_length(X, lengths):
    rows = []
    for n in lengths:
        model = OnlineGaussianMixture(8, covariance_type="full", random_state=0)
        tracemalloc.start()
        for i in range(0, n, 1000):
            j = i % (len(X) - 1000)
            model.learn(model.score_batch(X[j : j + 1000])) if model.is_initialized else model.partial_fit(X[j : j + 1000])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        state = model.to_dict()
        state_bytes = sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))
        rows.append((f"{n:,}", f"{peak / 1e6:.2f}", f"{state_bytes / 1e3:.1f}"))
    return rows


def scoring_by_covariance_type(X, K=16):
    """score_samples on all of X for each covariance type, beside scikit-learn's: best of 2
    seconds and the peak memory numpy allocated (tracemalloc) while scoring."""
    from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

    rows = []
    for covariance_type in ("full", "tied", "diag", "spherical"):
        cells = []
        for cls in (GaussianMixture, SklearnGaussianMixture):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls(K, covariance_type=covariance_type, max_iter=2, random_state=0).fit(X[:20_000])
            seconds = []
            for _ in range(2):
                tracemalloc.start()
                started = time.perf_counter()
                model.score_samples(X)
                seconds.append(time.perf_counter() - started)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            cells += [min(seconds), peak / 2**20]
        rows.append((covariance_type, *cells))
    return rows


def dgemm_peak_gflops():
    """Single-thread double-precision GEMM rate: the machine's practical flop ceiling here."""
    a = np.random.default_rng(0).normal(size=(1024, 1024))
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        best = max(best, 2 * 1024**3 / (time.perf_counter() - start) / 1e9)
    return best


def scaling(quick):
    """Online points/s and batch fit time vs scikit-learn as D and K grow."""
    from sklearn.mixture import GaussianMixture as SklearnGM

    from streamgmm.mixture import _gaussian as g
    from streamgmm.mixture._kmeans import kmeans

    peak = dgemm_peak_gflops()
    online_rows, batch_rows = [], []
    n_batch = 5_000 if quick else 20_000
    for D in (4, 16, 64):
        for K in (2, 8, 32):
            rng = np.random.default_rng(D * 100 + K)
            X, _ = random_mixture(K, D, rng).sample(60_000, rng)
            model = OnlineGaussianMixture(K, covariance_type="full", warmup=max(1000, 4 * K),
                                          random_state=0).partial_fit(X[:max(1000, 4 * K)])
            start, n = time.perf_counter(), 0
            for i in range(5_000, len(X), 1000):
                model.learn(model.score_batch(X[i:i + 1000]))
                n += 1000
            rate = n / (time.perf_counter() - start)
            flops = 4.0 * K * D * D  # scoring GEMM (2KD^2) + second-moment update (2KD^2)
            online_rows.append((D, K, rate, flops * rate / 1e9, flops * rate / 1e9 / peak))

            Xb = X[:n_batch]
            _, labels = kmeans(Xb, K, np.random.default_rng(0))
            nk, means, covs = g.estimate_gaussian_parameters(Xb, np.eye(K)[labels], 1e-6, "full")
            init = dict(weights_init=nk / nk.sum(), means_init=means, precisions_init=np.linalg.inv(covs))
            timings = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name, cls in (("ours", GaussianMixture), ("sklearn", SklearnGM)):
                    model_b = cls(K, tol=1e-3, max_iter=100, **init)
                    start = time.perf_counter()
                    model_b.fit(Xb)
                    timings[name] = (time.perf_counter() - start, model_b.score(Xb), model_b.n_iter_)
            batch_rows.append((D, K, *timings["ours"], *timings["sklearn"]))
    return peak, online_rows, batch_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--scaling", action="store_true", help="also the D x K grid (a few minutes)")
    parser.add_argument("--plot", default=None, help="with --scaling: write points/s vs K*D^2 to this PNG")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = 50_000 if args.quick else 200_000
    X, _ = random_mixture(8, 16, rng).sample(n, rng)

    ours, _ = online_throughput(X)
    auto, chosen = online_throughput(X, n_components="auto", covariance_type="auto")
    river_n = 5_000 if args.quick else 20_000
    try:
        theirs = river_throughput(X, river_n)
        river_cell, ratio, auto_ratio = f"{theirs:,.0f}", f"{ours / theirs:.0f}x", f"{auto / theirs:.0f}x"
    except ImportError:
        river_cell, ratio, auto_ratio = "river not installed", "-", "-"
    table(
        "Online score + learn, full covariance, D=16, K=8, mini-batch 1,000, one core",
        ["method", "points/s", "ratio"],
        [("streamgmm OnlineGaussianMixture (K=8 full)", f"{ours:,.0f}", ratio),
         (f"streamgmm default (auto: chose {chosen})", f"{auto:,.0f}", auto_ratio),
         ("river HalfSpaceTrees (MinMaxScaler)", river_cell, "1x")],
    )
    cases = [(9, 1000), (16, 1000), (36, 643)] if args.quick else [(9, 1000), (16, 1000), (36, 643), (36, 1000), (64, 1000)]
    table(
        "Warm-up sizing (n_components and covariance_type auto: 1-8 components x 4 types, MAP EM, BIC), one core",
        ["D", "warm-up points", "median s", "max s (seeds 0..2)", "chosen (seed 2)"],
        warmup_sizing(cases),
    )

    try:
        rows = batch_fit_comparison(X)
        base = rows[1][1]
        table(
            f"Batch EM fit, {n:,} x 16, K=8, same k-means init, tol=1e-3",
            ["library", "fit seconds", "iterations", "mean log-likelihood", "time ratio"],
            [(r[0], f"{r[1]:.2f}", r[2], f"{r[3]:.6f}", f"{r[1] / base:.2f}") for r in rows],
        )
    except ImportError:
        print("\n(scikit-learn not installed: batch comparison skipped)")

    try:
        table(
            f"score_samples on {n:,} x 16, K=16, by covariance type (best of 2; peak memory allocated while scoring)",
            ["covariance", "streamgmm s", "streamgmm peak MB", "sklearn s", "sklearn peak MB", "time ratio"],
            [(c, f"{t1:.3f}", f"{m1:.0f}", f"{t2:.3f}", f"{m2:.0f}", f"{t1 / t2:.2f}")
             for c, t1, m1, t2, m2 in scoring_by_covariance_type(X)],
        )
    except ImportError:
        print("\n(scikit-learn not installed: scoring comparison skipped)")

    lengths = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    table(
        "Memory against stream length (online model, D=16, K=8)",
        ["points streamed", "peak traced MB", "state KB"],
        memory_against_length(X, lengths),
    )
    if not args.scaling:
        return
    peak, online_rows, batch_rows = scaling(args.quick)
    table(
        f"Online score + learn as D and K grow (full covariance, batch 1,000, one core; dgemm peak {peak:.1f} GFLOP/s)",
        ["D", "K", "points/s", "GFLOP/s (4KD^2 per point)", "share of dgemm peak"],
        [(D, K, f"{r:,.0f}", f"{gf:.2f}", f"{share:.0%}") for D, K, r, gf, share in online_rows],
    )
    table(
        "Batch EM vs scikit-learn, same k-means init and tol=1e-3 (time at equal log-likelihood)",
        ["D", "K", "streamgmm s", "streamgmm LL", "iters", "sklearn s", "sklearn LL", "iters", "time ratio"],
        [(D, K, f"{t1:.2f}", f"{l1:.4f}", i1, f"{t2:.2f}", f"{l2:.4f}", i2, f"{t1 / t2:.2f}")
         for D, K, t1, l1, i1, t2, l2, i2 in batch_rows],
    )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        cost = np.array([K * D * D for D, K, *_ in online_rows], dtype=float)
        rate = np.array([r for _, _, r, *_ in online_rows])
        ax.loglog(cost, rate, "o")
        for (D, K, *_), c, r in zip(online_rows, cost, rate):
            ax.annotate(f"D={D},K={K}", (c, r), fontsize=7)
        line = np.logspace(np.log10(cost.min()), np.log10(cost.max()))
        ax.loglog(line, peak * 1e9 / (4 * line), "--", label="dgemm peak / (4 K D^2)")
        ax.set_xlabel("K * D^2")
        ax.set_ylabel("points / s (score + learn)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
