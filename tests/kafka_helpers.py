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

from streamgmm.dev.embedded import free_port
from streamgmm.dev.kafka_tools import committed_offsets, create_topics, high_watermarks, produce, read_all  # noqa: F401

# Joins are slow against Tansu with long session timeouts (KAFKA-NOTES.md).
TEST_CONSUMER = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 20}


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    create_topics(bootstrap, {name: partitions})


def headers_of(message) -> dict:
    return dict(message.headers() or [])


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


def default_hangup() -> None:
    """In a daemon started by a test, SIGHUP as in a fresh session: a suite run under nohup would
    pass SIG_IGN on, which the daemon keeps on purpose (test_startup.py), and its SIGHUP tests
    would wait for a stop that never comes."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


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
            preexec_fn=default_hangup,
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


def inspect(state_dir: Path) -> dict | None:
    result = subprocess.run(
        [sys.executable, "-m", "streamgmm", "inspect", str(state_dir), "--json"],
        capture_output=True, text=True, timeout=60,
    )
    return json.loads(result.stdout) if result.returncode == 0 else None
