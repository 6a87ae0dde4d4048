"""End-to-end daemon throughput and latency through a real broker (embedded Tansu), the
daemon of this tree beside a baseline release of it, in one run on the same broker.

    python bench/bench_daemon.py [--messages 100000] [--rounds 3] [--baseline REF | --no-baseline]
    python bench/bench_daemon.py --latency [--rounds 3]

For each input format (json, float32) one topic of 2 x --messages messages of 16 features,
4 partitions.  Each round measures on the same topic: the raw consume rate of both Kafka
clients (confluent-kafka, and kafka-python if installed; no decoding), then each daemon
(``streamgmm run`` as its own process, metrics scraped every 20 ms) from an empty state: its
cold-start rate over the first --messages (warm-up and the young model's threshold refreshes
included) and its sustained rate over the rest.  Rounds interleave, so a noisy moment of the
shared machine hits all columns alike; the table gives medians and each round's ratio.

The baseline is the tree at git REF (default: the last commit before the move to
confluent-kafka, kafka-python with its helper process), checked out as a worktree under
bench/out/ and run with the same virtualenv (it needs kafka-python and crc32c: the bench
extras install them).  Then the p50/p99 latency from a message's timestamp to its anomaly
record, each daemon caught up and a live producer at 2,000 msg/s.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from streamgmm.detection.decode import encode  # noqa: E402
from streamgmm.dev import kafka_tools  # noqa: E402
from streamgmm.dev.embedded import EmbeddedBroker, free_port  # noqa: E402
from streamgmm.dev.synthetic import random_mixture  # noqa: E402

D, PARTITIONS = 16, 4
BASELINE_REF = "ac98167"  # kafka-python, helper process (parallel_decode), before issue 13


def produce_topic(bootstrap, topic, X, fmt):
    kafka_tools.create_topics(bootstrap, {topic: PARTITIONS})
    producer = kafka_tools.producer(bootstrap, **{"linger.ms": 20, "batch.size": 1_000_000})
    start = time.perf_counter()
    for x in X:
        while True:
            try:
                producer.produce(topic, encode(x, fmt))
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    return len(X) / (time.perf_counter() - start)


def _rate(poll, n) -> float:
    """Messages a second from the first non-empty poll until n are read (``poll()`` -> count)."""
    count, first, deadline = 0, None, time.monotonic() + 300
    while count < n and time.monotonic() < deadline:
        got = poll()
        if got and first is None:
            first = time.perf_counter()
        count += got
    return count / (time.perf_counter() - first)


def raw_confluent_rate(bootstrap, topic, n):
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-{time.monotonic_ns()}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 20})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    try:
        return _rate(lambda: len(consumer.consume(num_messages=10_000, timeout=0.2)), n)
    finally:
        consumer.close()


def raw_kafka_python_rate(bootstrap, topic, n):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                             max_poll_records=20_000)
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    try:
        return _rate(lambda: sum(len(v) for v in consumer.poll(timeout_ms=200, max_records=20_000).values()), n)
    finally:
        consumer.close()


class Variant:
    """One daemon to measure: this tree, or the baseline worktree."""

    def __init__(self, label: str, source: Path, kafka_python: bool, sections: dict | None = None,
                 fetch_wait_ms: int | None = 20):
        self.label, self.source, self.kafka_python = label, source, kafka_python
        # The bench's fetch wait for both clients; None leaves each daemon its own default.
        self.fetch_wait_ms = fetch_wait_ms
        # Keys that replace the bench's own, by section (model, threshold, input).
        self.sections = sections or {}

    def config(self, bootstrap, topic, fmt, state_dir, group, port) -> dict:
        consumer = ({"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "fetch_max_wait_ms": self.fetch_wait_ms}
                    if self.kafka_python else
                    {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": self.fetch_wait_ms})
        consumer = {key: value for key, value in consumer.items() if value is not None}
        settings = {
            "kafka": {"bootstrap_servers": [bootstrap], "input_topics": [topic], "output_topic": f"{topic}.anomalies",
                      "dead_letter_topic": f"{topic}.dlq", "group_id": group, "consumer": consumer},
            "input": {"format": fmt, "dimension": D},
            "model": {"n_components": 8, "warmup": 1000},
            "threshold": {"quantile": 0.001},
            "checkpoint": {"dir": str(state_dir), "interval_seconds": 30, "interval_messages": 100_000},
            "metrics": {"host": "127.0.0.1", "port": port},
            "logging": {"level": "WARNING"},
        }
        return {key: {**value, **self.sections.get(key, {})} for key, value in settings.items()}

    def start(self, settings: dict, workdir: Path) -> subprocess.Popen:
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(settings))
        env = {**os.environ, "PYTHONPATH": str(self.source)}
        return subprocess.Popen([sys.executable, "-m", "streamgmm", "run", "--config", str(path)], cwd=self.source,
                                env=env, stdin=subprocess.DEVNULL, stdout=open(workdir / "daemon.log", "wb"),
                                stderr=subprocess.STDOUT)


def scrape(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def daemon_rates(variant, bootstrap, topic, fmt, n_cold, n_total, group, timeout=600):
    """(cold-start rate over the first n_cold messages, sustained rate over the rest)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        process = variant.start(variant.config(bootstrap, topic, fmt, Path(work) / "state", group, port), Path(work))
        try:
            consumed = lambda: scrape(port, "streamgmm_messages_consumed_total")  # noqa: E731
            deadline = time.monotonic() + timeout
            count = 0.0
            while count == 0 and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
                count = consumed()
            first, first_count, at_split = time.perf_counter(), count, None
            while count < n_total and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
                count = consumed()
                if at_split is None and count >= n_cold:
                    at_split = (time.perf_counter(), count)
            end = time.perf_counter()
            if at_split is None or count < n_total:
                log = (Path(work) / "daemon.log").read_text()[-2000:]
                raise RuntimeError(f"{variant.label} consumed {count:.0f} of {n_total}:\n{log}")
        finally:
            stop(process)
    # The first reading already past the cold window (the scrapes waited on a busy loop, 2026-12-07:
    # float32 "0 msg/s"): nothing measured, not a rate of 0.
    cold = float("nan") if first_count >= n_cold else (at_split[1] - first_count) / (at_split[0] - first)
    sustained = (count - at_split[1]) / (end - at_split[0])
    return cold, sustained


def produce_live(producer, topic, rows, rate: float) -> None:
    """Produce ``rows`` as float32 at ``rate`` a second, each stamped with the time it is sent."""
    start = time.perf_counter()
    for i, row in enumerate(rows):
        producer.produce(topic, encode(row, "float32"), timestamp=int(time.time() * 1000))
        producer.poll(0)
        ahead = start + (i + 1) / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    producer.flush(30)


def latency(variant, bootstrap, topic, X, seconds=10.0, rate=2000.0):
    """p50/p99 from message timestamp to anomaly record, caught up, live producer, 1% outliers."""
    kafka_tools.create_topics(bootstrap, {topic: PARTITIONS})
    producer = kafka_tools.producer(bootstrap, **{"linger.ms": 1})
    for x in X[:2000]:  # warm-up material
        producer.produce(topic, encode(x, "float32"))
    producer.flush(30)
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        process = variant.start(variant.config(bootstrap, topic, "float32", Path(work) / "state",
                                               f"{topic}-group", port), Path(work))
        try:
            deadline = time.monotonic() + 120
            while scrape(port, "streamgmm_messages_consumed_total") < 2000 and time.monotonic() < deadline:
                time.sleep(0.05)
            rng = np.random.default_rng(7)
            live_since_ms = int(time.time() * 1000)
            live = (X[2000 + i % (len(X) - 2000)] for i in range(int(seconds * rate)))
            produce_live(producer, topic, (row if rng.random() > 0.01 else row + 100.0 for row in live), rate)
            time.sleep(2.0)
        finally:
            stop(process)
    latencies = []
    for m in kafka_tools.read_all(bootstrap, f"{topic}.anomalies", timeout=20):
        source = json.loads(m.value())["source"]["timestamp"]
        if source >= live_since_ms:  # not the warm-up backlog
            latencies.append((m.timestamp()[1] - source) / 1000.0)
    return np.array(latencies)


def _bare_consumer(client, bootstrap, topic, wait_ms, seconds, assigned, finish, out):
    """Runs in a process of its own (no GIL shared with the producer): ms from each message's
    timestamp to the poll that returned it, put on ``out`` at the end."""
    received, deadline = [], time.monotonic() + seconds + 60
    if client == "confluent-kafka":
        from confluent_kafka import Consumer

        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-bare", "enable.auto.commit": False,
                             "auto.offset.reset": "latest", "fetch.wait.max.ms": wait_ms})
        consumer.subscribe([topic], on_assign=lambda _, partitions: assigned.set())
        while not finish.is_set() and time.monotonic() < deadline:
            # as the daemon's source polls: what is queued, else wait for one message
            messages = consumer.consume(1000, 0) or consumer.consume(1, 0.1)
            now = time.time() * 1000
            received.extend(now - m.timestamp()[1] for m in messages)
    else:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"{topic}-bare",
                                 enable_auto_commit=False, auto_offset_reset="latest", fetch_max_wait_ms=wait_ms)
        while not finish.is_set() and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=100)
            now = time.time() * 1000
            if consumer.assignment():
                assigned.set()
            received.extend(now - m.timestamp for batch in polled.values() for m in batch)
    consumer.close()
    out.put(received)


def bare_latency(client, bootstrap, topic, X, wait_ms, seconds=10.0, rate=2000.0):
    """The same live producer as ``latency``, read by a bare consumer of ``client`` (no daemon):
    what the client and the broker cost before the daemon does anything."""
    import multiprocessing

    kafka_tools.create_topics(bootstrap, {topic: PARTITIONS})
    context = multiprocessing.get_context("spawn")
    assigned, finish, out = context.Event(), context.Event(), context.Queue()
    reader = context.Process(target=_bare_consumer,
                             args=(client, bootstrap, topic, wait_ms, seconds, assigned, finish, out))
    reader.start()
    try:
        if not assigned.wait(60):
            raise RuntimeError(f"the bare {client} consumer got no partitions of {topic} in 60 s "
                               f"(exit code {reader.exitcode})")
        time.sleep(2.0)  # its first fetch has positioned it at the end before anything is produced
        producer = kafka_tools.producer(bootstrap, **{"linger.ms": 1})
        produce_live(producer, topic, (X[i % len(X)] for i in range(int(seconds * rate))), rate)
        time.sleep(1.0)
        finish.set()
        received = out.get(timeout=60)
    finally:
        finish.set()
        reader.join(30)
        if reader.is_alive():
            reader.kill()
            reader.join(10)
    return np.array(received) / 1000.0


def latency_main(args, variants) -> None:
    """--latency: the daemons' latency beside the bare clients', rounds interleaved."""
    wait = 20
    probes = {f"bare confluent-kafka, fetch.wait.max.ms {wait}": ("confluent-kafka", wait),
              "bare confluent-kafka, fetch.wait.max.ms 10": ("confluent-kafka", 10),
              "bare confluent-kafka, fetch.wait.max.ms 5": ("confluent-kafka", 5)}
    try:
        import kafka  # noqa: F401
        probes[f"bare kafka-python, fetch_max_wait_ms {wait}"] = ("kafka-python", wait)
    except ImportError:
        pass
    this = variants[0]
    defaults = [Variant(f"{v.label}, its default fetch wait", v.source, v.kafka_python, fetch_wait_ms=None)
                for v in variants]
    variants = [this, *(Variant(f"this tree, fetch.wait.max.ms {ms}", ROOT, kafka_python=False, fetch_wait_ms=ms)
                        for ms in (10, 5)), *variants[1:], *defaults]
    rng = np.random.default_rng(0)
    X, _ = random_mixture(8, D, rng).sample(40_000, rng)
    found: dict = {}
    with EmbeddedBroker() as broker:
        for round_ in range(args.rounds):
            for i, (label, (client, wait_ms)) in enumerate(probes.items()):
                found.setdefault(label, []).append(
                    bare_latency(client, broker.bootstrap, f"lat-bare-{i}-{round_}", X, wait_ms))
            for i, variant in enumerate(variants):
                found.setdefault(variant.label, []).append(
                    latency(variant, broker.bootstrap, f"lat-daemon-{i}-{round_}", X))
            for label, runs in found.items():
                p50 = f"{np.percentile(runs[-1], 50) * 1000:.1f} ms" if len(runs[-1]) else "nothing timed"
                print(f"round {round_ + 1} {label}: p50 {p50}", file=sys.stderr, flush=True)
    print(f"\n## Latency at 2,000 msg/s (float32, caught up), {args.rounds} interleaved rounds\n")
    print("Bare clients: message timestamp -> the poll that returned it. Daemons: message timestamp -> "
          "its anomaly record produced (1% of the messages are outliers).\n")
    print("| reader | messages timed | p50 ms, each round | p50 ms, median | p99 ms, median |")
    print("|---|---|---|---|---|")
    for label, runs in found.items():
        p50 = [np.percentile(r, 50) * 1000 for r in runs if len(r)]
        p99 = [np.percentile(r, 99) * 1000 for r in runs if len(r)]
        print(f"| {label} | {sum(len(r) for r in runs):,} | {', '.join(f'{v:.1f}' for v in p50)} | "
              f"{np.median(p50):.1f} | {np.median(p99):.1f} |")


def baseline_variant(ref: str) -> Variant | None:
    tree = ROOT / "bench" / "out" / f"baseline-{ref}"
    if not tree.exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=True, capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
    if (tree / "streamgmm" / "service" / "kafka.py").exists():  # already on confluent-kafka
        return Variant(f"baseline {ref} (confluent-kafka)", tree, kafka_python=False)
    try:
        import crc32c  # noqa: F401
        import kafka  # noqa: F401
    except ImportError:
        print("no baseline: kafka-python and crc32c are not installed (pip install -e '.[bench]')", file=sys.stderr)
        return None
    return Variant(f"baseline {ref} (kafka-python + helper)", tree, kafka_python=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_REF, help="git ref of the daemon to compare with")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--detection", action="store_true",
                        help="instead: this tree with the default detection (model and covariance type auto, "
                             "stream-calibrated threshold, explanations) against its issue-13 settings "
                             "(K=8 full, the model's density quantile, no explanations)")
    parser.add_argument("--latency", action="store_true",
                        help="only latency: the daemons (this tree at fetch.wait.max.ms 20, 10 and 5, the baseline) "
                             "beside bare confluent-kafka and kafka-python consumers, --rounds interleaved")
    args = parser.parse_args()
    variants = [Variant("this tree (confluent-kafka, one thread)", ROOT, kafka_python=False)]
    if args.detection:
        variants = [Variant("defaults: auto model, stream-calibrated threshold, explained", ROOT, kafka_python=False,
                            sections={"model": {"n_components": "auto"}}),
                    Variant("before issue 14: K=8 full, model_quantile, unexplained", ROOT, kafka_python=False,
                            sections={"model": {"n_components": 8, "covariance_type": "full", "warmup": 1000},
                                      "threshold": {"mode": "model_quantile", "quantile": 0.001},
                                      "input": {"explain_top_features": 0}})]
        baseline = variants[1]
    else:
        baseline = None if args.no_baseline else baseline_variant(args.baseline)
    if baseline is not None and baseline not in variants:
        variants.append(baseline)
    if args.latency:
        latency_main(args, variants)
        return
    try:
        import kafka  # noqa: F401
        raw_clients = {"confluent-kafka": raw_confluent_rate, "kafka-python": raw_kafka_python_rate}
    except ImportError:
        raw_clients = {"confluent-kafka": raw_confluent_rate}
    rng = np.random.default_rng(0)
    total = 2 * args.messages
    X, _ = random_mixture(8, D, rng).sample(total + 20_000, rng)
    produce_rates = {}
    raw = {(fmt, c): [] for fmt in ("json", "float32") for c in raw_clients}
    rates = {(fmt, v.label): [] for fmt in ("json", "float32") for v in variants}
    with EmbeddedBroker() as broker:
        for fmt in ("json", "float32"):
            produce_rates[fmt] = produce_topic(broker.bootstrap, f"bench-{fmt}", X[:total], fmt)
        for round_ in range(args.rounds):
            for fmt in ("json", "float32"):
                for client, measure in raw_clients.items():
                    raw[(fmt, client)].append(measure(broker.bootstrap, f"bench-{fmt}", total))
                for i, variant in enumerate(variants):
                    rates[(fmt, variant.label)].append(daemon_rates(
                        variant, broker.bootstrap, f"bench-{fmt}", fmt, args.messages, total,
                        group=f"bench-{fmt}-{i}-{round_}"))
                    print(f"round {round_ + 1} {fmt} {variant.label}: cold {rates[(fmt, variant.label)][-1][0]:,.0f}"
                          f" sustained {rates[(fmt, variant.label)][-1][1]:,.0f} msg/s", file=sys.stderr, flush=True)
        lat = {v.label: latency(v, broker.bootstrap, f"bench-latency-{i}", X) for i, v in enumerate(variants)}

    print(f"\n## Daemon end-to-end, {D} features, {PARTITIONS} partitions, one broker on loopback, "
          f"median of {args.rounds} interleaved rounds\n")
    print(f"Cold start: the first {args.messages:,} messages from an empty state. Sustained: the next "
          f"{args.messages:,}. Produce rate (confluent-kafka): "
          + ", ".join(f"{fmt} {r:,.0f} msg/s" for fmt, r in produce_rates.items()) + ".\n")
    print("| input | consumer | raw consume msg/s | cold start msg/s | sustained msg/s | sustained / raw confluent "
          "| sustained vs baseline, each round |")
    print("|---|---|---|---|---|---|---|")
    for fmt in ("json", "float32"):
        raw_confluent = float(np.median(raw[(fmt, "confluent-kafka")]))
        for client in raw_clients:
            print(f"| {fmt} | raw {client} (no decoding) | {float(np.median(raw[(fmt, client)])):,.0f} | | | | |")
        for variant in variants:
            runs = rates[(fmt, variant.label)]
            cold, sustained = (float(np.median([r[i] for r in runs])) for i in (0, 1))
            versus = ""
            if baseline is not None and variant is not baseline:
                base = rates[(fmt, baseline.label)]
                versus = ", ".join(f"{a[1] / b[1]:.2f}x" for a, b in zip(runs, base))
            print(f"| {fmt} | {variant.label} | | {cold:,.0f} | {sustained:,.0f} | {sustained / raw_confluent:.0%} "
                  f"| {versus} |")
    print("\n## Latency, message timestamp -> anomaly record produced (caught up, live 2,000 msg/s, float32)\n")
    print("| daemon | anomalies | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for label, values in lat.items():
        if len(values):
            print(f"| {label} | {len(values)} | {np.percentile(values, 50) * 1000:.1f} | "
                  f"{np.percentile(values, 99) * 1000:.1f} | {values.max() * 1000:.1f} |")
        else:
            print(f"| {label} | 0 | | | |")


if __name__ == "__main__":
    main()
