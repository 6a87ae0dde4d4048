"""The live demo (``python -m streamgmm.dev.demo``): the real daemon on an embedded broker with a synthetic stream.

Starts Tansu on loopback, produces a multi-cluster stream with slow drift and injected
anomalies, runs ``streamgmm run`` as a separate process on it, shows progress from its
/metrics endpoint, then prints precision and recall against the injected anomalies.
Everything it starts, it stops.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from ..detection.decode import encode
from . import kafka_tools
from .embedded import EmbeddedBroker, free_port
from .synthetic import random_mixture

DIMENSION = 8
PARTITIONS = 4
ANOMALY_FRACTION = 0.005


def synthetic_stream(n: int, seed: int = 7):
    """A drifting 5-cluster stream; returns (X, is_anomaly)."""
    rng = np.random.default_rng(seed)
    mixture = random_mixture(5, DIMENSION, rng, separation=8.0)
    X, labels = mixture.sample(n, rng)
    # Slow drift: every cluster walks along its own direction, 3 units over the stream.
    direction = rng.normal(size=(5, DIMENSION))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X += direction[labels] * (3.0 * np.arange(n) / n)[:, None]
    is_anomaly = rng.random(n) < ANOMALY_FRACTION
    is_anomaly[:2000] = False  # not in the warm-up
    # Anomalies: points pushed 6-10 standard deviations off their own cluster.
    offsets = rng.normal(size=(int(is_anomaly.sum()), DIMENSION))
    offsets /= np.linalg.norm(offsets, axis=1, keepdims=True)
    X[is_anomaly] += offsets * rng.uniform(6.0, 10.0, (len(offsets), 1)) * X.std(axis=0).mean() / 2.0
    return X, is_anomaly


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(port: int, path: str = "/metrics") -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:  # /readyz answers 503 while not ready, with the reason
        return exc.read().decode()
    except OSError:
        return ""


def _produce(bootstrap: str, X, rate: float, stop: threading.Event):
    client = kafka_tools.producer(bootstrap, **{"linger.ms": 10})
    start = time.perf_counter()
    for i, x in enumerate(X):
        if stop.is_set():
            break
        while True:
            try:
                client.produce("features", encode(x, "json"), key=str(i).encode())
                break
            except BufferError:
                client.poll(0.05)
        client.poll(0)
        ahead = start + (i + 1) / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    client.flush(30)


DEFAULT_METRICS_PORT = 9464


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _metrics_port(requested: int | None) -> int:
    """The port asked for; 0: a free one; None: DEFAULT_METRICS_PORT unless something holds it
    (a streamgmm.service on this host: the demo read that server's page as its readiness and its
    daemon exited 2; helper-78), then a free one, said."""
    if requested is None:
        if not _port_in_use(DEFAULT_METRICS_PORT):
            return DEFAULT_METRICS_PORT
        port = free_port()
        print(f"  port {DEFAULT_METRICS_PORT} is in use (another streamgmm?): metrics on {port}")
        return port
    return free_port() if requested == 0 else requested


def run_demo(messages: int = 200_000, rate: float = 20_000.0, workdir: str | None = None,
             metrics_port: int | None = None, timeout: float = 600.0) -> int:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="streamgmm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_port = _metrics_port(metrics_port)
    print(f"streamgmm demo: {messages:,} messages, {DIMENSION} features, 5 drifting clusters, "
          f"{ANOMALY_FRACTION:.1%} injected anomalies; work dir {workdir}")
    X, is_anomaly = synthetic_stream(messages)
    stop_producing = threading.Event()
    daemon = None
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        kafka_tools.create_topics(broker.bootstrap, {"features": PARTITIONS, "anomalies": 1})
        config_path = workdir / "streamgmm.yaml"
        config_path.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": [broker.bootstrap], "input_topics": ["features"],
                      "output_topic": "anomalies", "dead_letter_topic": "features.dead-letter",
                      "group_id": "streamgmm-demo",
                      "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 50}},
            "input": {"format": "json", "dimension": DIMENSION},
            "model": {"n_components": 5, "warmup": 2000, "half_life": 20000},
            "threshold": {"mode": "quantile", "quantile": 0.001},
            "checkpoint": {"dir": str(workdir / "state"), "interval_seconds": 5, "interval_messages": 50000},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
        }))
        log_file = open(workdir / "daemon.log", "wb")
        try:
            daemon = subprocess.Popen([sys.executable, "-m", "streamgmm", "run", "--config", str(config_path)],
                                      stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            producer = threading.Thread(target=_produce, args=(broker.bootstrap, X, rate, stop_producing), daemon=True)
            producer.start()
            print(f"  metrics while it runs: curl -s http://127.0.0.1:{metrics_port}/metrics | grep ^streamgmm_")
            started = time.monotonic()
            first_seen = produced_at = None
            last_consumed, last_time = 0.0, time.monotonic()
            ticks = 0
            while time.monotonic() - started < timeout:
                # Sample often (for an honest throughput figure), print once a second.
                time.sleep(0.25)
                ticks += 1
                if daemon.poll() is not None:
                    print(f"the daemon exited with code {daemon.returncode}; see {workdir / 'daemon.log'}")
                    return 1
                text = _scrape(metrics_port)
                consumed = _metric(text, "streamgmm_messages_consumed_total")
                now = time.monotonic()
                if produced_at is None and not producer.is_alive():
                    produced_at = now
                if consumed and first_seen is None:
                    first_seen = now - 0.25
                done = consumed >= messages
                if ticks % 4 == 0 and not consumed:
                    readiness = _scrape(metrics_port, "/readyz").split("\n", 1)[0] or "not ready: starting"
                    print(f"  {now - started:5.0f} s  {readiness}", flush=True)
                elif ticks % 4 == 0 or done:
                    speed = (consumed - last_consumed) / (now - last_time)
                    last_consumed, last_time = consumed, now
                    print(f"  {now - started:5.0f} s  consumed {consumed:9,.0f}  {speed:8,.0f} msg/s  "
                          f"anomalies {_metric(text, 'streamgmm_anomalies_total'):6,.0f}  "
                          f"lag {_metric(text, 'streamgmm_consumer_lag_messages'):8,.0f}", flush=True)
                if done:
                    break
            elapsed = time.monotonic() - (first_seen or started)
            final_text = _scrape(metrics_port)
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            daemon = None
        finally:
            stop_producing.set()
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=10)
            log_file.close()
        flagged = {int(json.loads(m.value())["source"]["key"])
                   for m in kafka_tools.read_all(broker.bootstrap, "anomalies", timeout=30.0)}

    consumed = _metric(final_text, "streamgmm_messages_consumed_total")
    injected = set(np.flatnonzero(is_anomaly).tolist())
    true_positives = len(flagged & injected)
    precision = true_positives / len(flagged) if flagged else 0.0
    recall = true_positives / len(injected) if injected else 0.0
    checkpoints = sorted((workdir / "state").glob("checkpoint-*.sgmm"))
    print("\nsummary")
    # From the first message counted to the last: when the producer was done before the daemon was
    # ready, this is the rate at which the daemon caught up with a backlog, not the producer's.
    backlog = produced_at is not None and first_seen is not None and produced_at <= first_seen + 0.25
    if elapsed < 2.0:
        # (Sampled every 0.25 s: rough, but a rate; "too quick to time" beside progress lines of
        # 8,591 msg/s read as a contradiction, helper-83.)
        timing = (f"in about {elapsed:.1f} s from the first one counted (roughly {consumed / max(elapsed, 0.25):,.0f} "
                  "msg/s: sampled every 0.25 s)")
    else:
        timing = f"in {elapsed:.1f} s from the first one counted ({consumed / elapsed:,.0f} msg/s)"
    print(f"  messages consumed   {consumed:,.0f} of {messages:,} {timing}")
    print("  " + ("the producer (at most {:,.0f} msg/s) had finished before the daemon's first message (joining the "
                 "group takes a few seconds): the daemon read a backlog" if backlog else
                 "the producer sends at most {:,.0f} msg/s, live beside the daemon").format(rate))
    print(f"  injected anomalies  {len(injected):,}")
    print(f"  flagged             {len(flagged):,}")
    print(f"  precision           {precision:.3f}")
    print(f"  recall              {recall:.3f}")
    print(f"  daemon exit code    {code} (SIGTERM: finish batch, checkpoint, commit)")
    print(f"  checkpoint          {checkpoints[-1] if checkpoints else 'none'}")
    # The command as this interpreter's environment has it: `streamgmm` alone is not on the PATH
    # of a shell that has not activated .venv (helper-83).
    command = Path(sys.executable).parent / "streamgmm"
    command = str(command) if command.exists() else f"{sys.executable} -m streamgmm"
    print(f"  inspect it          {command} inspect {workdir / 'state'}")
    print(json.dumps({"demo_summary": {"consumed": consumed, "injected": len(injected), "flagged": len(flagged),
                                       "precision": precision, "recall": recall, "exit_code": code,
                                       "checkpoint": str(checkpoints[-1]) if checkpoints else None}}))
    return 0 if code == 0 and consumed >= messages else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m streamgmm.dev.demo",
                                     description="live demo on an embedded broker with a synthetic stream")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=20_000.0, help="messages per second produced")
    parser.add_argument("--workdir", default=None, help="where the demo keeps config and checkpoints")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help=f"where the daemon serves /metrics (default {DEFAULT_METRICS_PORT}, or a free port if that "
                             "is in use; 0: a free port)")
    args = parser.parse_args(argv)
    return run_demo(messages=args.messages, rate=args.rate, workdir=args.workdir, metrics_port=args.metrics_port)


if __name__ == "__main__":
    sys.exit(main())
