"""Helpers for tests that talk to the real embedded broker (Tansu)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from streamgmm.dev.embedded import free_port

# Joins are slow against Tansu with kafka-python's 45 s default (KAFKA-NOTES.md).
TEST_CONSUMER = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "fetch_max_wait_ms": 20}


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, messages, partition_of=None) -> list[tuple[int, int]]:
    """Send (key, value[, headers]) tuples; returns (partition, offset) of each, in order."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", linger_ms=5)
    try:
        futures = []
        for i, message in enumerate(messages):
            key, value = message[0], message[1]
            headers = message[2] if len(message) > 2 else None
            partition = partition_of(i) if partition_of else None
            futures.append(producer.send(topic, key=key, value=value, headers=headers, partition=partition))
        producer.flush(timeout=60)
        return [(m.partition, m.offset) for m in (f.get(timeout=60) for f in futures)]
    finally:
        producer.close(timeout=10)


def read_all(bootstrap: str, topic: str, timeout: float = 20.0, expect: int | None = None, idle: float = 2.0):
    """Every record of a topic from the beginning (bounded in time)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + timeout
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records, last_new = [], time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            new = [r for rs in batch.values() for r in rs]
            records.extend(new)
            if new:
                last_new = time.monotonic()
            if expect is not None and len(records) >= expect:
                break
            if expect is None and time.monotonic() - last_new > idle:
                break
        return records
    finally:
        consumer.close()


def write_config(path: Path, bootstrap: str, topic: str, state_dir: Path, **sections) -> Path:
    config = {
        "kafka": {
            "bootstrap_servers": [bootstrap],
            "input_topics": [topic],
            "output_topic": f"{topic}.anomalies",
            "dead_letter_topic": f"{topic}.dead-letter",
            "group_id": f"{topic}-group",
            "consumer": dict(TEST_CONSUMER),
            "retry_backoff_max_seconds": 2.0,
        },
        "input": {"format": "json", "dimension": 4},
        "model": {"n_components": 3, "warmup": 500},
        "checkpoint": {"dir": str(state_dir), "interval_seconds": 1.0, "interval_messages": 2000},
        "metrics": {"port": free_port()},
        "logging": {"level": "INFO"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


class DaemonProcess:
    """``python -m streamgmm run`` as a real process, stopped by signal."""

    def __init__(self, config_path: Path, log_path: Path, env: dict | None = None):
        self.extra_env = env or {}
        self.config = yaml.safe_load(Path(config_path).read_text())
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config['metrics']['port']}"

    def start(self) -> "DaemonProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamgmm", "run", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, labels: str = "") -> float | None:
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + (("{" + labels + "}") if labels else " ")):
                return float(line.rsplit(" ", 1)[1])
        return None

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log_tail()}")
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_tail()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log_tail()}")
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def inspect(state_dir: Path) -> dict | None:
    result = subprocess.run(
        [sys.executable, "-m", "streamgmm", "inspect", str(state_dir), "--json"],
        capture_output=True, text=True, timeout=60,
    )
    return json.loads(result.stdout) if result.returncode == 0 else None
