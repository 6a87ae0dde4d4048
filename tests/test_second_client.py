"""The daemon with a Kafka client written by others (kafka-python) on both sides of it.

kafka-python creates the input topic and writes it (keys, headers, explicit timestamps, a gzip
producer, malformed values, a tombstone, outliers), the daemon processes it, and kafka-python
reads everything back: dead letters, anomaly records, the input's high watermarks and the
consumer group's committed offsets. Every message sent is accounted for.
"""

import json
import time

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka_helpers import DaemonProcess, inspect, write_config

from streamgmm.detection.decode import encode
from streamgmm.dev.synthetic import random_mixture

pytestmark = pytest.mark.kafka

PARTITIONS = 2
N_VALID = 4000
FIRST_OUTLIER = 2000  # 1000 messages into each partition: well past the 500-point warm-up
OUTLIER_EVERY = 160
BASE_TIMESTAMP_MS = 1_700_000_000_000
# (key, value, reason the daemon gives); each sent with headers of its own.
MALFORMED = [
    (b"bad-json", b"{not json", "undecodable"),
    (b"bad-short", b"[1.0, 2.0]", "wrong_dimension"),
    (b"bad-long", b"[1.0, 2.0, 3.0, 4.0, 5.0]", "wrong_dimension"),
    (b"bad-tombstone", None, "empty"),
    (None, b"\xff\xfe\x00garbage", "undecodable"),
    (b"bad-strings", b'["a", "b", "c", "d"]', "undecodable"),
    (b"bad-nan", b"[1.0, NaN, 2.0, 3.0]", "non_finite"),
]
GZIP_MALFORMED = {1, 5}  # indices into MALFORMED also sent through the gzip producer
# The fields README.md ("Reading an anomaly record") documents.
ANOMALY_FIELDS = {"source", "features", "feature_names", "log_density", "threshold", "component",
                  "model_version", "n_seen", "detected_at", "rarity", "nearest_component", "top_features"}
SOURCE_FIELDS = {"topic", "partition", "offset", "timestamp", "key"}
RARITY_FIELDS = {"tail_probability", "log10_tail_probability", "one_in", "method"}
TOP_FEATURE_FIELDS = {"name", "value", "expected", "normal_range", "z", "share", "given"}


def _messages(seed: int = 11) -> list[dict]:
    """Valid vectors with every 3rd keyed and headed and every 10th gzip-compressed, outliers
    (+100 on every feature, keyed and headed) from FIRST_OUTLIER on, and MALFORMED spread
    through the stream, some before the warm-up ends and some after."""
    rng = np.random.default_rng(seed)
    X, _ = random_mixture(3, 4, rng, separation=5.0).sample(N_VALID, rng)
    messages = []
    for i, x in enumerate(X):
        outlier = i >= FIRST_OUTLIER and i % OUTLIER_EVERY == 0
        if outlier:
            x = x + 100.0
        keyed = outlier or i % 3 == 0
        messages.append({
            "kind": "outlier" if outlier else "valid", "features": x, "value": encode(x, "json"),
            "key": f"k{i}".encode() if keyed else None,
            "headers": [("trace", f"t{i}".encode()), ("client", b"kafka-python")] if keyed else [],
            "gzip": i % 10 == 7,
        })
    for j, (key, value, reason) in enumerate(MALFORMED):
        messages.insert(300 + j * 600, {
            "kind": "malformed", "value": value, "key": key, "reason": reason,
            "headers": [("trace", f"bad{j}".encode()), ("empty-header", b"")], "gzip": j in GZIP_MALFORMED,
        })
    for n, message in enumerate(messages):
        message["partition"] = n % PARTITIONS
        message["timestamp"] = BASE_TIMESTAMP_MS + n
    return messages


def _send(bootstrap: str, topic: str, messages: list[dict]) -> None:
    """Write with two kafka-python producers (one gzip) and note each message's offset."""
    plain = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    gzipped = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, compression_type="gzip")
    try:
        futures = [
            (gzipped if m["gzip"] else plain).send(topic, value=m["value"], key=m["key"],
                                                   headers=m["headers"], partition=m["partition"],
                                                   timestamp_ms=m["timestamp"])
            for m in messages
        ]
        plain.flush(timeout=30)
        gzipped.flush(timeout=30)
        for message, future in zip(messages, futures):
            metadata = future.get(timeout=10)
            assert metadata.partition == message["partition"]
            message["offset"] = metadata.offset
    finally:
        plain.close(timeout=10)
        gzipped.close(timeout=10)


def _read(bootstrap: str, topic: str, limit: int, timeout: float = 20.0) -> list:
    """Every record of ``topic`` from the start with kafka-python: ConsumerRecords, at most
    ``limit``, ending at the high watermark of every partition, after 2 s without a new record
    (consumer_timeout_ms, for a partition no fetch has answered for yet) or at ``timeout``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                             consumer_timeout_ms=2000)
    try:
        deadline = time.monotonic() + timeout
        partitions = set()
        while not partitions and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                time.sleep(0.2)
        assert partitions, f"kafka-python found no partitions of {topic}"
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning()
        records = []
        for record in consumer:
            records.append(record)
            marks = {tp: consumer.highwater(tp) for tp in assigned}
            caught_up = all(mark is not None and consumer.position(tp) >= mark for tp, mark in marks.items())
            if caught_up or len(records) >= limit or time.monotonic() > deadline:
                break
        return records
    finally:
        consumer.close()


def _high_watermarks(bootstrap: str, topic: str, n_messages: int) -> dict[int, int]:
    """The input's log end per partition, as kafka-python sees it after reading it all.

    Not ``end_offsets``: Tansu answers ListOffsets(latest) with the first offset of the last
    batch + 1, not the log end (probed: 502 for a partition holding 506 messages whose last batch
    was a gzip batch of 5, while ``highwater`` gave 506). ``highwater`` comes from the fetch
    responses and is right.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                             consumer_timeout_ms=2000)
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        deadline, n_read = time.monotonic() + 20.0, 0
        for _ in consumer:
            n_read += 1
            if n_read >= n_messages or time.monotonic() > deadline:
                break
        assert n_read == n_messages, f"kafka-python read {n_read} of the {n_messages} input messages back"
        return {tp.partition: consumer.highwater(tp) for tp in partitions}
    finally:
        consumer.close()


def _committed(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """The group's committed offsets read twice by kafka-python: KafkaConsumer.committed and
    KafkaAdminClient.list_group_offsets (kafka-python 3's name for list_consumer_group_offsets)."""
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        by_consumer = {tp.partition: consumer.committed(tp) for tp in partitions}
    finally:
        consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        found = admin.list_group_offsets({group: partitions})[group]
        by_admin = {tp.partition: found[tp].offset for tp in partitions if tp in found}
    finally:
        admin.close()
    return by_consumer, by_admin


def test_kafka_python_writes_the_input_and_reads_every_output(broker, topic, tmp_path):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        admin.close()
    messages = _messages()
    _send(broker.bootstrap, topic, messages)
    valid = [m for m in messages if m["kind"] != "malformed"]
    malformed = [m for m in messages if m["kind"] == "malformed"]
    outliers = [m for m in messages if m["kind"] == "outlier"]
    by_source = {(m["partition"], m["offset"]): m for m in messages}
    assert len(by_source) == len(messages)

    state = tmp_path / "state"
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_for(
            lambda: (s := inspect(state)) is not None and s["n_valid"] + s["n_invalid"] >= len(messages),
            timeout=40, what=f"{len(messages)} messages checkpointed",
        )
    finally:
        exit_code = daemon.stop()  # asserted after, so that a wait_for timeout is what fails
    assert exit_code == 0

    # Dead letters: one per malformed message, value unchanged (a tombstone's as b""), key and
    # original headers kept ahead of the daemon's own.
    letters = _read(broker.bootstrap, f"{topic}.dead-letter", limit=len(malformed) + 50)
    assert len(letters) == len(malformed)
    lettered = {}
    for letter in letters:
        headers = dict(letter.headers)
        source = (int(headers["streamgmm.source.partition"]), int(headers["streamgmm.source.offset"]))
        sent = by_source[source]
        assert sent["kind"] == "malformed", source
        lettered[source] = sent
        assert letter.key == sent["key"]
        assert letter.value == (sent["value"] or b"")
        assert letter.headers[:len(sent["headers"])] == sent["headers"]
        assert headers["streamgmm.error.reason"] == sent["reason"].encode(), (sent, headers)
        assert headers["streamgmm.source.topic"] == topic.encode()
        assert headers["streamgmm.source.timestamp"] == str(sent["timestamp"]).encode()
    assert len(lettered) == len(malformed)

    # Anomaly records: documented fields, exact source, key and headers; every outlier among them.
    records = _read(broker.bootstrap, f"{topic}.anomalies", limit=len(valid))
    flagged = {}
    for record in records:
        doc = json.loads(record.value)
        assert ANOMALY_FIELDS <= doc.keys(), sorted(ANOMALY_FIELDS - doc.keys())
        assert SOURCE_FIELDS <= doc["source"].keys()
        assert RARITY_FIELDS <= doc["rarity"].keys()
        assert doc["top_features"] and all(TOP_FEATURE_FIELDS <= f.keys() for f in doc["top_features"])
        source = (doc["source"]["partition"], doc["source"]["offset"])
        sent = by_source[source]
        assert sent["kind"] != "malformed", source
        flagged[source] = doc  # output is at-least-once: a repeat names the same source
        assert doc["source"]["topic"] == topic
        assert doc["source"]["timestamp"] == sent["timestamp"]
        assert doc["source"]["key"] == (sent["key"].decode() if sent["key"] is not None else None)
        np.testing.assert_allclose(doc["features"], sent["features"], rtol=0)
        assert doc["log_density"] < doc["threshold"]
        assert record.key == sent["key"]
        origin = f"{topic}/{source[0]}/{source[1]}".encode()
        assert record.headers == sent["headers"] + [("streamgmm.source", origin)]
    missed = [(m["partition"], m["offset"]) for m in outliers if (m["partition"], m["offset"]) not in flagged]
    assert not missed, f"outliers not reported: {missed}"
    # Quantile 0.001 on ~3,500 scored points: only a handful of ordinary points flagged.
    assert len(flagged) - len(outliers) <= 25

    # The daemon's own count, from its final checkpoint: every message, each in its class.
    summary = inspect(state)
    assert summary["n_valid"] == len(valid)
    assert summary["n_invalid"] == len(malformed)
    assert summary["n_anomalies"] == len(flagged)

    # Offsets: the group's commits, read by kafka-python, are the log end of each input partition.
    ends = _high_watermarks(broker.bootstrap, topic, len(messages))
    sent_ends = {p: 1 + max(m["offset"] for m in messages if m["partition"] == p) for p in range(PARTITIONS)}
    assert ends == sent_ends
    by_consumer, by_admin = _committed(broker.bootstrap, f"{topic}-group", topic)
    assert by_consumer == ends
    assert by_admin == ends
    assert summary["offsets"][topic] == {str(p): end for p, end in ends.items()}
