"""End-to-end daemon throughput and latency through a real broker (embedded Tansu).

    python bench/bench_daemon.py [--messages 100000] [--rounds 3]

For each input format (json, float32) one topic of 2 x --messages messages.  Each round
measures, on the same topic: the raw kafka-python consume rate (no decoding), then the
daemon from an empty state: its cold-start rate over the first --messages (warm-up and the
young model's frequent threshold refreshes included) and its sustained rate over the
rest, with and without the helper process (input.parallel_decode).  The table
gives the median of the rounds (rounds interleave, so a noisy moment of the shared machine
hits all columns alike).  Then the p50/p99 latency from a message's timestamp to its
anomaly record, with the daemon caught up and a live producer: at 2,000 msg/s (small
batches, processed at once) and at 12,000 msg/s with a consumer that waits for 128 KB a
fetch (batches of 1,000 and more, through the helper).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import logging
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from streamgmm.service.config import as_dict, config_from_dict  # noqa: E402
from streamgmm.service.daemon import Daemon  # noqa: E402
from streamgmm.detection.decode import encode  # noqa: E402
from streamgmm.dev.embedded import EmbeddedBroker  # noqa: E402
from streamgmm.dev.synthetic import random_mixture  # noqa: E402

D, PARTITIONS = 16, 4


def produce_topic(bootstrap, topic, X, fmt):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20, batch_size=256_000)
    start = time.perf_counter()
    for x in X:
        producer.send(topic, encode(x, fmt))
    producer.flush()
    producer.close()
    return len(X) / (time.perf_counter() - start)


def raw_consume_rate(bootstrap, topic, n):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                             max_poll_records=2000)
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    count, first, deadline = 0, None, time.monotonic() + 300
    while count < n and time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=200, max_records=2000)
        got = sum(len(v) for v in batch.values())
        if got and first is None:
            first = time.perf_counter()
        count += got
    rate = count / (time.perf_counter() - first)
    consumer.close()
    return rate


def daemon_config(bootstrap, topic, fmt, state_dir, group=None, parallel_decode=True, **threshold):
    return config_from_dict({
        "kafka": {
            "bootstrap_servers": [bootstrap], "input_topics": [topic], "output_topic": f"{topic}.anomalies",
            "dead_letter_topic": f"{topic}.dlq", "group_id": group or f"bench-{topic}",
            "consumer": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "fetch_max_wait_ms": 20},
        },
        "input": {"format": fmt, "dimension": D, "parallel_decode": parallel_decode},
        "model": {"n_components": 8, "warmup": 1000},
        "threshold": {"quantile": 0.001, **threshold},
        "checkpoint": {"dir": state_dir, "interval_seconds": 30, "interval_messages": 100_000},
        "metrics": {"enabled": False},
    }, environ={})


def run_daemon_until(config, n, timeout=600, split=None):
    """Start a daemon; return it once it has consumed n messages, with its rate.

    With ``split``: (rate over the first ``split`` messages, rate over the rest).
    """
    daemon = Daemon(config)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    consumed = lambda: daemon.metrics.value("streamgmm_messages_consumed_total") or 0  # noqa: E731
    deadline = time.monotonic() + timeout
    while consumed() == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    first, first_count = time.perf_counter(), consumed()
    at_split = None
    while consumed() < n and time.monotonic() < deadline:
        if split is not None and at_split is None and consumed() >= split:
            at_split = (time.perf_counter(), consumed())
        time.sleep(0.002)
    end, end_count = time.perf_counter(), consumed()
    if split is None:
        return daemon, thread, end_count / (end - first)
    if at_split is None:
        raise RuntimeError(f"the daemon consumed {end_count} of {n} messages within {timeout} s")
    cold = (at_split[1] - first_count) / (at_split[0] - first)
    sustained = (end_count - at_split[1]) / (end - at_split[0])
    return daemon, thread, (cold, sustained)


def latency_run(bootstrap, topic, X, seconds, rate, consumer=None):
    """Daemon caught up; a live producer sends at `rate`/s with 1% far outliers.

    Returns (latencies in s, the live rate reached, the daemon's mean batch size while live).
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=1)
    for x in X[:2000]:  # warm-up material
        producer.send(topic, encode(x, "float32"))
    producer.flush()
    with tempfile.TemporaryDirectory() as state:
        settings = as_dict(daemon_config(bootstrap, topic, "float32", state))
        settings["kafka"]["consumer"].update(consumer or {})
        config = config_from_dict(settings, environ={})
        daemon, thread, _ = run_daemon_until(config, 2000)
        value = daemon.metrics.value
        consumed_before = value("streamgmm_messages_consumed_total") or 0.0
        batches_before = value("streamgmm_batch_processing_seconds_count") or 0.0
        rng = np.random.default_rng(7)
        n = int(seconds * rate)
        live_since_ms = int(time.time() * 1000)
        start = time.perf_counter()
        for i in range(n):
            row = X[2000 + i % (len(X) - 2000)]
            x = row if rng.random() > 0.01 else row + 100.0
            producer.send(topic, encode(x, "float32"), timestamp_ms=int(time.time() * 1000))
            lag = start + (i + 1) / rate - time.perf_counter()
            if lag > 0:
                time.sleep(lag)
        producer.flush()
        reached = n / (time.perf_counter() - start)
        time.sleep(2.0)
        consumed = (value("streamgmm_messages_consumed_total") or 0.0) - consumed_before
        mean_batch = consumed / max((value("streamgmm_batch_processing_seconds_count") or 0.0) - batches_before, 1.0)
        daemon.stop()
        thread.join(timeout=60)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    tps = [TopicPartition(f"{topic}.anomalies", p) for p in (consumer.partitions_for_topic(f"{topic}.anomalies") or [])]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    latencies, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=500)
        if not batch and latencies:
            break
        for records in batch.values():
            for r in records:
                source = json.loads(r.value)["source"]["timestamp"]
                if source >= live_since_ms:  # not the backlog read while the group was joining
                    latencies.append((r.timestamp - source) / 1000.0)
    consumer.close()
    return np.array(latencies), reached, mean_batch


# (live msg/s, kafka.consumer settings) of the latency runs
LATENCY_CASES = [(2000, {}), (12000, {"fetch_min_bytes": 131072, "fetch_max_wait_ms": 200})]
# (label, input format, input.parallel_decode)
VARIANTS = [("json", "json", True), ("json, one process", "json", False), ("float32", "float32", True),
            ("float32, one process", "float32", False)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("streamgmm").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    total = 2 * args.messages
    X, _ = random_mixture(8, D, rng).sample(total + 20_000, rng)
    produce_rates, raw_rates = {}, {}
    daemon_rates = {label: [] for label, _, _ in VARIANTS}
    with EmbeddedBroker() as broker:
        for fmt in ("json", "float32"):
            produce_rates[fmt] = produce_topic(broker.bootstrap, f"bench-{fmt}", X[:total], fmt)
            raw_rates[fmt] = []
        for round_ in range(args.rounds):
            for fmt in ("json", "float32"):
                raw_rates[fmt].append(raw_consume_rate(broker.bootstrap, f"bench-{fmt}", total))
            for label, fmt, parallel in VARIANTS:
                with tempfile.TemporaryDirectory() as state:
                    config = daemon_config(broker.bootstrap, f"bench-{fmt}", fmt, state, parallel_decode=parallel,
                                           group=f"bench-{label}-{round_}")
                    daemon, thread, rates = run_daemon_until(config, total, split=args.messages)
                    daemon.stop()
                    thread.join(timeout=60)
                daemon_rates[label].append(rates)
        # Small batches (processed at once) and, with a consumer told to wait for more data per
        # fetch, batches of 1,000 and more (through the helper).
        latency_cases = [(rate, consumer, latency_run(broker.bootstrap, f"bench-latency-{rate}", X, seconds=10,
                                                      rate=rate, consumer=consumer))
                         for rate, consumer in LATENCY_CASES]

    print(f"\n## Daemon end-to-end, {D} features, {PARTITIONS} partitions, one broker on loopback, "
          f"median of {args.rounds} interleaved rounds\n")
    print(f"Cold start: the first {args.messages:,} messages from an empty state (warm-up, young model). "
          f"Sustained: the next {args.messages:,}.\n")
    print("| input | produce msg/s | raw consume msg/s | daemon cold start msg/s | cold / raw "
          "| daemon sustained msg/s | sustained / raw | sustained / raw, each round |")
    print("|---|---|---|---|---|---|---|---|")
    for label, fmt, _ in VARIANTS:
        raw = float(np.median(raw_rates[fmt]))
        cold = float(np.median([c for c, _ in daemon_rates[label]]))
        sustained = float(np.median([s for _, s in daemon_rates[label]]))
        each = ", ".join(f"{s / r:.0%}" for (_, s), r in zip(daemon_rates[label], raw_rates[fmt]))
        print(f"| {label} | {produce_rates[fmt]:,.0f} | {raw:,.0f} | {cold:,.0f} | {cold / raw:.0%} "
              f"| {sustained:,.0f} | {sustained / raw:.0%} | {each} |")
    print("\n## Latency, message timestamp -> anomaly record produced (daemon caught up, live producer, float32)\n")
    print("Batches under 1,000 messages are processed at once; larger ones go through the helper process.\n")
    print("| live msg/s asked | reached | consumer settings | mean batch | anomalies | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|")
    for rate, consumer, (latencies, reached, mean_batch) in latency_cases:
        settings = ", ".join(f"{k}={v}" for k, v in consumer.items()) or "bench defaults"
        row = f"| {rate:,} | {reached:,.0f} | {settings} | {mean_batch:,.0f} | {len(latencies)} |"
        if len(latencies):
            print(f"{row} {np.percentile(latencies, 50) * 1000:.1f} | {np.percentile(latencies, 99) * 1000:.1f} | "
                  f"{latencies.max() * 1000:.1f} |")
        else:
            print(f"{row} | | |")

if __name__ == "__main__":
    main()
