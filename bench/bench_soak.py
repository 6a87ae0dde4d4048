"""Soak: a million messages through the broker and the real daemon process.

    python bench/bench_soak.py [--messages 1000000] [--format float32]

Prints throughput over time and the daemon's resident memory (and peak) when it has
consumed 100k messages and at the end; the goal is flat memory (within 10%).
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
from streamgmm.dev.synthetic import inject_point_anomalies, random_mixture  # noqa: E402

D = 16


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def consumed(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("streamgmm_messages_consumed_total "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--format", default="float32", choices=["float32", "json"])
    args = parser.parse_args()
    n = args.messages
    rng = np.random.default_rng(0)
    base, _ = random_mixture(8, D, rng).sample(200_000, rng)
    base, _ = inject_point_anomalies(base, 0.002, rng)
    payloads = [encode(x, args.format) for x in base]

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as work:
        kafka_tools.create_topics(broker.bootstrap, {"soak": 4, "soak.anomalies": 1})
        port = free_port()
        config = Path(work) / "c.yaml"
        config.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": [broker.bootstrap], "input_topics": ["soak"], "output_topic": "soak.anomalies",
                      "dead_letter_topic": "soak.dlq", "group_id": "soak",
                      "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 20}},
            "input": {"format": args.format, "dimension": D},
            "model": {"n_components": 8, "half_life": 100_000},
            "checkpoint": {"dir": str(Path(work) / "state"), "interval_seconds": 10, "interval_messages": 200_000},
            "metrics": {"port": port},
            "logging": {"level": "WARNING"},
        }))
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        daemon = subprocess.Popen([sys.executable, "-m", "streamgmm", "run", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=open(Path(work) / "d.log", "wb"), env=env)

        def produce():
            producer = kafka_tools.producer(broker.bootstrap, **{"linger.ms": 20, "batch.size": 512_000})
            for i in range(n):
                while True:
                    try:
                        producer.produce("soak", payloads[i % len(payloads)])
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.flush(120)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        samples, rss_at = [], {}
        start = time.monotonic()
        last_count, last_time = 0.0, start
        try:
            while time.monotonic() - start < 1800:
                time.sleep(1.0)
                count = consumed(port)
                now = time.monotonic()
                rss, peak = memory_kb(daemon.pid)
                samples.append((now - start, count, (count - last_count) / (now - last_time), rss, peak))
                last_count, last_time = count, now
                if count >= 100_000 and "100k" not in rss_at:
                    rss_at["100k"] = (rss, peak)
                if count >= n:
                    rss_at["end"] = (rss, peak)
                    break
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=120)

    print(f"\n## Soak: {n:,} {args.format} messages of {D} features through the broker and `streamgmm run`\n")
    print("| t (s) | consumed | msg/s over the last second | RSS MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for t, count, speed, rss, peak in samples[::max(1, len(samples) // 20)]:
        print(f"| {t:.0f} | {count:,.0f} | {speed:,.0f} | {rss / 1024:.1f} | {peak / 1024:.1f} |")
    print("\n| point | RSS MB | peak RSS MB |")
    print("|---|---|---|")
    for label, (rss, peak) in rss_at.items():
        print(f"| {label} | {rss / 1024:.1f} | {peak / 1024:.1f} |")
    if "100k" in rss_at and "end" in rss_at:
        growth = rss_at["end"][1] / rss_at["100k"][1] - 1.0
        print(f"\npeak RSS growth from 100k to {n:,} messages: {growth:+.1%} (goal: within 10%)")
    print(f"daemon exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
