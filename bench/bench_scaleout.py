"""A consumer group of `streamgmm run` processes (model.scope: partition) on one topic.

    python bench/bench_scaleout.py [--messages 200000]

1. Throughput with 1, 2 and 4 instances on a 4-partition topic (same data, fresh group each).
2. Rebalance pause: two instances under a live stream; one is SIGKILLed; the time until the
   survivor owns every partition and each partition's model is learning again.
The machine has 2 cores: expect little gain past 2 instances.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from streamgmm.dev import kafka_tools  # noqa: E402

from streamgmm.detection.decode import encode  # noqa: E402
from streamgmm.dev.embedded import EmbeddedBroker, free_port  # noqa: E402
from streamgmm.dev.synthetic import random_mixture  # noqa: E402

D, PARTITIONS = 16, 4
SESSION_MS = 6000


def metrics(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith("streamgmm_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class Instance:
    def __init__(self, work: Path, name: str, bootstrap: str, topic: str, group: str):
        self.port = free_port()
        self.config = work / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": [bootstrap], "input_topics": [topic], "output_topic": f"{topic}.anomalies",
                      "dead_letter_topic": f"{topic}.dlq", "group_id": group, "client_id": name,
                      "consumer": {"session.timeout.ms": SESSION_MS, "heartbeat.interval.ms": 1000,
                                   "fetch.wait.max.ms": 20}},
            "input": {"format": "float32", "dimension": D},
            "model": {"n_components": 8, "scope": "partition"},
            "checkpoint": {"dir": str(work / f"state-{name}"), "interval_seconds": 5, "interval_messages": 100_000,
                           "topic": f"{group}.state"},
            "metrics": {"port": self.port},
            "logging": {"level": "WARNING"},
        }))
        self.log = open(work / f"{name}.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "streamgmm", "run", "--config", str(self.config)],
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})

    def metrics(self):
        return metrics(self.port)

    def stop(self, kill=False):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=120)
        self.log.close()


def create(bootstrap, topic):
    kafka_tools.create_topics(bootstrap, {topic: PARTITIONS})


def throughput(broker, work, payloads, instances):
    group = f"tp{instances}"
    members = [Instance(work, f"{group}-{i}", broker.bootstrap, "scale", group) for i in range(instances)]
    try:
        consumed = lambda: sum(m.metrics().get("streamgmm_messages_consumed_total", 0) for m in members)  # noqa: E731
        deadline = time.monotonic() + 600
        while consumed() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        while consumed() < len(payloads) and time.monotonic() < deadline:
            time.sleep(0.1)
        return consumed() / (time.monotonic() - start)
    finally:
        for m in members:
            m.stop()


def rebalance_pause(broker, work, payloads):
    create(broker.bootstrap, "live")
    stop = threading.Event()

    def produce():
        producer = kafka_tools.producer(broker.bootstrap)
        i = 0
        while not stop.is_set():
            for _ in range(50):
                producer.produce("live", payloads[i % len(payloads)])
                i += 1
            producer.poll(0)
            time.sleep(0.01)  # about 5,000 msg/s
        producer.flush(30)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    a = Instance(work, "live-a", broker.bootstrap, "live", "live")
    time.sleep(1.0)
    b = Instance(work, "live-b", broker.bootstrap, "live", "live")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ma, mb = a.metrics(), b.metrics()
            if ma.get("streamgmm_assigned_partitions") == 2 and mb.get("streamgmm_assigned_partitions") == 2 and \
                    mb.get("streamgmm_model_points_seen", 0) > 0 and ma.get("streamgmm_model_points_seen", 0) > 0:
                break
            time.sleep(0.2)
        time.sleep(2.0)
        before = b.metrics()
        killed_at = time.monotonic()
        a.stop(kill=True)
        owned_at = None
        while time.monotonic() - killed_at < 120:
            now = b.metrics()
            if owned_at is None and now.get("streamgmm_assigned_partitions") == PARTITIONS:
                owned_at = time.monotonic()
            models = [f'streamgmm_partition_model_points_seen{{model="live/{p}"}}' for p in range(PARTITIONS)]
            if owned_at and all(now.get(m, 0) > before.get(m, 0) for m in models):
                return owned_at - killed_at, time.monotonic() - killed_at
            time.sleep(0.1)
        return owned_at and owned_at - killed_at, None
    finally:
        stop.set()
        thread.join(timeout=30)
        a.stop()
        b.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    X, _ = random_mixture(8, D, rng).sample(args.messages, rng)
    payloads = [encode(x, "float32") for x in X]
    rows = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        create(broker.bootstrap, "scale")
        kafka_tools.produce(broker.bootstrap, "scale", [(None, payload) for payload in payloads],
                            partition_of=lambda i: i % PARTITIONS)
        for instances in (1, 2, 4):
            rows.append((instances, throughput(broker, work, payloads, instances)))
        owned, scoring = rebalance_pause(broker, work, payloads)

    print(f"\n## Consumer group throughput, {args.messages:,} float32 messages x {D}, {PARTITIONS} partitions, "
          "model.scope: partition, 2 cores\n")
    print("| instances | msg/s (all instances) | vs 1 instance |")
    print("|---|---|---|")
    for instances, rate in rows:
        print(f"| {instances} | {rate:,.0f} | {rate / rows[0][1]:.2f}x |")
    print(f"\n## Rebalance pause (2 instances, live stream ~5k msg/s, SIGKILL one; session.timeout.ms={SESSION_MS})\n")
    print("| kill -> survivor owns all partitions (s) | kill -> every partition's model learning again (s) |")
    print("|---|---|")
    print(f"| {owned if owned is None else f'{owned:.1f}'} | {scoring if scoring is None else f'{scoring:.1f}'} |")


if __name__ == "__main__":
    main()
