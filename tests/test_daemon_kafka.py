"""The daemon against a real broker: outliers out, dead letters, restarts, clean stop."""

import json
import re
import signal

import numpy as np
import pytest
from kafka_helpers import DaemonProcess, create_topic, headers_of, inspect, produce, read_all, write_config

from streamgmm.detection.decode import encode
from streamgmm.dev.synthetic import random_mixture

pytestmark = pytest.mark.kafka


def _stream(n, seed=0, outlier_every=None, start_outliers=1500):
    rng = np.random.default_rng(seed)
    X, _ = random_mixture(3, 4, rng, separation=5.0).sample(n, rng)
    outliers = []
    if outlier_every:
        for i in range(start_outliers, n, outlier_every):
            X[i] = X.mean(axis=0) + 25.0 * X.std(axis=0) * rng.choice([-1, 1], 4)
            outliers.append(i)
    return X, outliers


def _wait_processed(daemon, state_dir, n_expected, timeout=90):
    daemon.wait_for(
        lambda: (s := inspect(state_dir)) is not None and s["n_valid"] + s["n_invalid"] >= n_expected,
        timeout=timeout, what=f"{n_expected} messages checkpointed",
    )


@pytest.mark.parametrize("fmt", ["json", "float32"])
def test_outliers_reach_the_output_topic_with_their_source_offsets(broker, topic, tmp_path, fmt):
    create_topic(broker.bootstrap, topic, partitions=2)
    X, outliers = _stream(6000, seed=1, outlier_every=250)
    sent = produce(broker.bootstrap, topic, [(str(i).encode(), encode(x, fmt)) for i, x in enumerate(X)],
                   partition_of=lambda i: i % 2)
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, tmp_path / "state",
                          input={"format": fmt, "dimension": 4})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        _wait_processed(daemon, tmp_path / "state", len(X))
    finally:
        assert daemon.stop() == 0
    records = read_all(broker.bootstrap, f"{topic}.anomalies")
    flagged = {}
    for record in records:
        doc = json.loads(record.value())
        flagged[(doc["source"]["partition"], doc["source"]["offset"])] = doc
        # The record names its source exactly: key and features match what was sent there.
        index = int(doc["source"]["key"])
        assert sent[index] == (doc["source"]["partition"], doc["source"]["offset"])
        np.testing.assert_allclose(doc["features"], X[index], rtol=1e-6 if fmt == "float32" else 0)
        assert doc["log_density"] < doc["threshold"]
        assert record.key() == str(index).encode()
        assert headers_of(record)["streamgmm.source"] == f"{topic}/{sent[index][0]}/{sent[index][1]}".encode()
    found = [i for i in outliers if sent[i] in flagged]
    assert len(found) == len(outliers), f"missed outliers {sorted(set(outliers) - set(found))}"
    # Quantile 0.001 on ~5,500 scored points: only a handful of ordinary points flagged.
    assert len(flagged) - len(found) <= 25
    summary = inspect(tmp_path / "state")
    assert summary["n_valid"] == 6000 and summary["n_invalid"] == 0
    assert summary["offsets"][topic] == {"0": 3000, "1": 3000}
    assert summary["n_anomalies"] == len(flagged)
    # Flagged points are not learned from (learn_from_anomalies: false).
    assert summary["n_seen"] == 6000 - summary["n_anomalies"] + summary["n_flagged_learned"]


def test_each_kind_of_bad_input_is_dead_lettered_with_its_reason(broker, topic, tmp_path):
    create_topic(broker.bootstrap, topic)
    X, _ = _stream(1200, seed=2)
    good = [(None, encode(x, "json")) for x in X]
    bad = [
        (b"k-undecodable", b"{not json", [("trace", b"abc")]),
        (b"k-dimension", b"[1.0, 2.0]"),
        (b"k-nonfinite", b"[1.0, NaN, 2.0, 3.0]"),
        (b"k-oversized", b"[" + b"1.0," * 400 + b"1.0]"),
        (b"k-empty", b""),
        (None, b"\xff\xfe\x00garbage"),
        (b"k-strings", b'["a", "b", "c", "d"]'),
    ]
    sent = produce(broker.bootstrap, topic, good[:700] + bad + good[700:])
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, tmp_path / "state",
                          input={"format": "json", "dimension": 4, "max_message_bytes": 1000})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        _wait_processed(daemon, tmp_path / "state", len(sent))
    finally:
        assert daemon.stop() == 0
    letters = read_all(broker.bootstrap, f"{topic}.dead-letter", expect=len(bad))
    assert len(letters) == len(bad)
    by_offset = {int(headers_of(r)["streamgmm.source.offset"]): r for r in letters}
    expected_reasons = ["undecodable", "wrong_dimension", "non_finite", "oversized", "empty", "undecodable", "undecodable"]
    for position, (message, reason) in enumerate(zip(bad, expected_reasons)):
        offset = sent[700 + position][1]
        letter = by_offset[offset]
        headers = headers_of(letter)
        assert headers["streamgmm.error.reason"] == reason.encode(), (message, headers)
        assert headers["streamgmm.source.topic"] == topic.encode()
        assert headers["streamgmm.source.partition"] == b"0"
        assert (letter.value() or b"") == message[1]  # unchanged
        assert letter.key() == message[0]
    assert headers_of(by_offset[sent[700][1]])["trace"] == b"abc"  # original headers kept
    summary = inspect(tmp_path / "state")
    assert summary["n_invalid"] == len(bad) and summary["n_valid"] == len(good)


def test_restart_resumes_at_checkpoint_offsets_with_the_same_model(broker, topic, tmp_path):
    create_topic(broker.bootstrap, topic)
    X, _ = _stream(4000, seed=3)
    produce(broker.bootstrap, topic, [(None, encode(x, "json")) for x in X[:2500]])
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state)
    first = DaemonProcess(config, tmp_path / "d1.log").start()
    try:
        _wait_processed(first, state, 2500)
    finally:
        assert first.stop() == 0
    after_first = inspect(state)
    assert after_first["offsets"][topic] == {"0": 2500}

    # A restart with nothing new to read must not learn anything twice.
    second = DaemonProcess(config, tmp_path / "d2.log").start()
    second.wait_for(lambda: second.get("/readyz")[0] == 200, what="ready")
    assert second.stop() == 0
    after_second = inspect(state)
    assert after_second["n_seen"] == after_first["n_seen"]
    assert after_second["weights"] == after_first["weights"]
    assert after_second["offsets"] == after_first["offsets"]

    produce(broker.bootstrap, topic, [(None, encode(x, "json")) for x in X[2500:]])
    third = DaemonProcess(config, tmp_path / "d3.log").start()
    try:
        _wait_processed(third, state, 4000)
    finally:
        assert third.stop() == 0
    final = inspect(state)
    assert final["offsets"][topic] == {"0": 4000}
    assert final["n_valid"] == 4000
    assert final["n_seen"] == 4000 - final["n_anomalies"] + final["n_flagged_learned"]


def test_sigterm_stops_cleanly_with_a_final_checkpoint(broker, topic, tmp_path):
    create_topic(broker.bootstrap, topic)
    X, _ = _stream(3000, seed=4)
    produce(broker.bootstrap, topic, [(None, encode(x, "json")) for x in X])
    state = tmp_path / "state"
    # Checkpoint intervals far away: only the stop itself can write the final checkpoint.
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state,
                          checkpoint={"dir": str(state), "interval_seconds": 3600, "interval_messages": 10**9})
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    daemon.wait_for(lambda: (daemon.metric("streamgmm_messages_consumed_total") or 0) >= 3000, what="all consumed")
    assert inspect(state) is None
    assert daemon.stop(signal.SIGTERM, timeout=30) == 0
    summary = inspect(state)
    assert summary["offsets"][topic] == {"0": 3000}
    assert summary["n_valid"] == 3000
    assert "stopped" in daemon.log_tail()


def test_the_scores_topic_gets_one_record_per_scored_message(broker, topic, tmp_path):
    create_topic(broker.bootstrap, topic, partitions=2)
    X, _ = _stream(2000, seed=5)
    sent = produce(broker.bootstrap, topic, [(str(i).encode(), encode(x, "json")) for i, x in enumerate(X)],
                   partition_of=lambda i: i % 2)
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, tmp_path / "state",
                          kafka={"scores_topic": f"{topic}.scores"})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        _wait_processed(daemon, tmp_path / "state", len(X))
    finally:
        assert daemon.stop() == 0
    scores = read_all(broker.bootstrap, f"{topic}.scores", expect=2000)
    documents = [json.loads(m.value()) for m in scores]
    # Every message, each once, naming its source and key exactly; the 500 of the warm-up (which
    # 500 depends on how the two partitions were polled) learned, not scored.
    sources = [(d["partition"], d["offset"]) for d in documents]
    assert len(documents) == 2000 and set(sources) == set(sent)
    assert sum(d["log_density"] is None for d in documents) == 500
    index_of = {source: i for i, source in enumerate(sent)}
    assert all(d["key"] == str(index_of[(d["partition"], d["offset"])]) for d in documents)


def test_latest_is_pinned_at_the_first_assignment_so_a_restart_reads_what_came_meanwhile(broker, topic, tmp_path):
    # auto.offset.reset latest, stopped before its first message: nothing was committed, and the
    # next start resolved "latest" anew, past all that was written while it was down (helper-35:
    # 1,841 of 2,000 never read). The end is now committed at the first assignment.
    create_topic(broker.bootstrap, topic, partitions=2)
    produce(broker.bootstrap, topic, [(None, encode(x, "json")) for x in _stream(300, seed=5)[0]])  # before: skipped
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state,
                          kafka={"auto_offset_reset": "latest"})
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    daemon.wait_for(lambda: "auto.offset.reset latest: the log's end, committed" in daemon.log_tail(80),
                    what="the assignment")
    assert daemon.stop(signal.SIGTERM) == 0
    # Where "latest" put each partition (Tansu's log end is its last batch's first offset + 1,
    # KAFKA-NOTES.md, so some of the 300 may be read: they count too).
    pinned = [int(n) for n in re.findall(r"/\d+ at (\d+) \(auto.offset.reset latest", daemon.log_tail(80))]
    assert len(pinned) == 2
    X, _ = _stream(2000, seed=6)
    produce(broker.bootstrap, topic, [(None, encode(x, "json")) for x in X])
    daemon = DaemonProcess(config, tmp_path / "d2.log").start()
    try:
        daemon.wait_for(lambda: (daemon.metric("streamgmm_messages_consumed_total") or 0) >= 2000, timeout=90,
                        what="the 2,000 written while it was down")
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    summary = inspect(state)
    assert sum(summary["offsets"][topic].values()) == 2300
    assert summary["n_valid"] == 2300 - sum(pinned)  # from the pinned start on, nothing skipped


def test_with_latest_a_topic_a_pattern_finds_later_is_read_from_its_first_message(broker, topic, tmp_path):
    # auto.offset.reset latest is for the backlog there was when the daemon started. A topic the
    # subscription pattern matched later was pinned at its end when the metadata refresh found
    # it: all written to it before then was skipped (a Kafka consumer does the same). Its start
    # is committed as a pin is, so a restart before its first checkpoint reads it from there.
    first, later = f"{topic}-first", f"{topic}-later"
    create_topic(broker.bootstrap, first, partitions=1)
    produce(broker.bootstrap, first, [(None, encode(x, "json")) for x in _stream(200, seed=5)[0]])  # skipped
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state,
                          kafka={"auto_offset_reset": "latest", "input_topics": [f"^{re.escape(topic)}-.*"],
                                 "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                                              "fetch.wait.max.ms": 20, "topic.metadata.refresh.interval.ms": 3000}})
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    try:
        daemon.wait_for(lambda: "auto.offset.reset latest: the log's end, committed" in daemon.log_tail(80),
                        what="the first assignment")
        create_topic(broker.bootstrap, later, partitions=2)
        X, _ = _stream(700, seed=6)
        for chunk in np.split(X, 7):  # before it is found; in batches, so Tansu's "end" is near the end
            produce(broker.bootstrap, later, [(None, encode(x, "json")) for x in chunk])
        daemon.wait_for(lambda: (daemon.metric("streamgmm_messages_consumed_total") or 0) >= 700, timeout=90,
                        what="the 700 written to the later topic")
        log_text = daemon.log_tail(200)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    # Tansu's log end is its last batch's first offset + 1 (KAFKA-NOTES.md): from there the
    # first topic's messages are read and counted.
    pinned = int(re.search(rf"{re.escape(first)}/0 at (\d+) \(auto.offset.reset latest", log_text).group(1))
    summary = inspect(state)
    assert summary["n_valid"] == 700 + 200 - pinned
    assert sum(summary["offsets"][later].values()) == 700
    assert len(re.findall(rf"{re.escape(later)}/\d+ at 0 \(new since this daemon started", log_text)) == 2


def test_an_input_pattern_that_matches_nothing_is_said_so_not_called_an_invalid_topic(broker, topic, tmp_path):
    # The pattern was asked of the broker as a topic name: "ERROR no partitions assigned: input
    # topic ^rx-.* Broker: Invalid topic" at every start, and the same in /readyz (helper-44).
    pattern = f"^{re.escape(topic)}-nothing-.*"
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, tmp_path / "state",
                          kafka={"input_topics": [pattern]})
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    try:
        daemon.wait_for(lambda: "matches no topic" in daemon.get("/readyz")[1], timeout=60, what="/readyz's reason")
        status, body = daemon.get("/readyz")
        assert status == 503 and "Invalid topic" not in body
        assert "Invalid topic" not in daemon.log_tail(200)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
