"""A consumer group of daemons with scope: partition: state follows its partition."""

import json
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from kafka_helpers import DaemonProcess, create_topic, produce, read_all, write_config

from streamgmm.detection.decode import encode
from streamgmm.dev.synthetic import random_mixture

pytestmark = pytest.mark.kafka

PARTITIONS = 4


def _topic_states(bootstrap, state_topic):
    result = subprocess.run([sys.executable, "-m", "streamgmm", "inspect", "--topic", state_topic,
                             "--bootstrap", bootstrap, "--json"], capture_output=True, text=True, timeout=120)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def test_instances_join_and_die_and_every_partition_model_learns_each_message_once(broker, topic, tmp_path):
    create_topic(broker.bootstrap, topic, partitions=PARTITIONS)
    n = 16_000
    rng = np.random.default_rng(21)
    X, _ = random_mixture(3, 4, rng, separation=5.0).sample(n, rng)
    outliers = set(range(3000, n, 500))
    for i in outliers:
        X[i] = X.mean(axis=0) + 30 * X.std(axis=0)
    messages = [(f"id-{i}".encode(), encode(x, "json")) for i, x in enumerate(X)]
    sent = []
    chunk = n // 4

    def send(k):
        start = k * chunk
        sent.extend(produce(broker.bootstrap, topic, messages[start:start + chunk],
                            partition_of=lambda j: (start + j) % PARTITIONS))

    state_topic = f"{topic}.state"
    group_consumer = {"session.timeout.ms": 3000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 20}
    configs = [
        write_config(tmp_path / f"{name}.yaml", broker.bootstrap, topic, tmp_path / f"state-{name}",
                     model={"n_components": 3, "warmup": 500, "scope": "partition"},
                     checkpoint={"dir": str(tmp_path / f"state-{name}"), "interval_seconds": 0.5,
                                 "interval_messages": 1000, "topic": state_topic},
                     kafka={"consumer": group_consumer, "client_id": name})
        for name in ("a", "b")
    ]
    a = DaemonProcess(configs[0], tmp_path / "a.log").start()
    b = DaemonProcess(configs[1], tmp_path / "b.log")
    try:
        a.wait_for(lambda: (a.metric("streamgmm_assigned_partitions") or 0) == PARTITIONS, what="A owns all")
        send(0)
        a.wait_for(lambda: a.metric("streamgmm_messages_consumed_total") == chunk, what="A consumed chunk 0")
        b.start()  # B joins mid-stream: the group splits the partitions
        b.wait_for(lambda: (b.metric("streamgmm_assigned_partitions") or 0) == PARTITIONS // 2, timeout=60,
                   what="B owns half")
        a.wait_for(lambda: (a.metric("streamgmm_assigned_partitions") or 0) == PARTITIONS // 2, what="A owns half")
        send(1)
        send(2)
        b.wait_for(lambda: (b.metric("streamgmm_messages_consumed_total") or 0) > 0, what="B consuming")
        time.sleep(1.0)
        a.kill()  # SIGKILL: no hand-over, B must restore A's partitions from the state topic
        b.wait_for(lambda: (b.metric("streamgmm_assigned_partitions") or 0) == PARTITIONS, timeout=60,
                   what="B owns everything")
        send(3)
        assert len(sent) == n

        def all_done():
            states = _topic_states(broker.bootstrap, state_topic)
            return len(states) == PARTITIONS and sum(s["n_valid"] for s in states.values()) == n

        b.wait_for(all_done, timeout=120, what="every message in the state records")
    finally:
        a.kill()
        assert b.stop() == 0

    per_partition = Counter(p for p, _ in sent)
    states = _topic_states(broker.bootstrap, state_topic)
    for p in range(PARTITIONS):
        state = states[f"{topic}/{p}"]
        assert state["offsets"] == {topic: {str(p): per_partition[p]}}
        assert state["n_valid"] == per_partition[p]
        # Learned exactly once: every valid message not flagged, no replay counted twice.
        assert state["n_seen"] == state["n_valid"] - state["n_anomalies"] + state["n_flagged_learned"], (p, state)

    position = {f"id-{i}": sent[i] for i in range(n)}
    flagged = set()
    for record in read_all(broker.bootstrap, f"{topic}.anomalies"):
        doc = json.loads(record.value())
        key = doc["source"]["key"]
        assert position[key] == (doc["source"]["partition"], doc["source"]["offset"])
        flagged.add(int(key[3:]))
    assert outliers <= flagged
    assert "restored model" in b.log_tail(400)
