"""Faults an operator meets, each accounting for every message: an oversized message, a member
stopped past its session timeout, a partition handed away and back, a full checkpoint disk."""

import hashlib
import json
import re
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from kafka_helpers import DaemonProcess, create_topic, headers_of, inspect, produce, read_all, write_config

from streamgmm.detection.decode import encode
from streamgmm.dev.kafka_tools import committed_offsets, producer
from streamgmm.dev.synthetic import random_mixture

pytestmark = pytest.mark.kafka

GROUP_CONSUMER = {"session.timeout.ms": 3000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 20}


def _vectors(n, seed, outlier_every=None):
    """(messages as (key, json value), indices of far outliers)."""
    rng = np.random.default_rng(seed)
    X, _ = random_mixture(3, 4, rng, separation=5.0).sample(n, rng)
    outliers = []
    if outlier_every:
        for i in range(1500, n, outlier_every):
            X[i] = X.mean(axis=0) + 30.0 * X.std(axis=0)
            outliers.append(i)
    return [(f"id-{i}".encode(), encode(x, "json")) for i, x in enumerate(X)], outliers


def _produce_big(bootstrap, topic, key, value, partition):
    client = producer(bootstrap, **{"message.max.bytes": 4_000_000})
    client.produce(topic, value=value, key=key, partition=partition)
    assert client.flush(30) == 0


def _checkpointed(state, n):
    return lambda: (s := inspect(state)) is not None and s["n_valid"] + s["n_invalid"] >= n


def test_an_oversized_message_is_dead_lettered_once_and_never_stops_detection(broker, topic, tmp_path):
    # A cut that would leave the dead letter over the producer's limit is refused at start
    # (tests/test_config.py); a record refused for good at run time is test_daemon_logic's.
    dead_letter_max_bytes = 65_536
    create_topic(broker.bootstrap, topic, partitions=2)
    messages, outliers = _vectors(20_000, seed=21, outlier_every=997)
    sent = produce(broker.bootstrap, topic, messages[:10_000], partition_of=lambda i: i % 2)
    huge = b"[" + b"1.0," * 500_000 + b"1.0]"  # 2 MB: over input.max_message_bytes and the producer's limit
    _produce_big(broker.bootstrap, topic, b"huge", huge, partition=0)
    sent += produce(broker.bootstrap, topic, messages[10_000:], partition_of=lambda i: i % 2)
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state,
                          kafka={"consumer": GROUP_CONSUMER, "dead_letter_max_bytes": dead_letter_max_bytes})
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    try:
        daemon.wait_for(_checkpointed(state, 20_001), timeout=120, what="every message checkpointed")
        assert daemon.metric("streamgmm_rewinds_total") == 0
        assert daemon.metric("streamgmm_messages_consumed_total") == 20_001
    finally:
        assert daemon.stop() == 0
    summary = inspect(state)
    assert summary["n_valid"] == 20_000 and summary["n_invalid"] == 1
    per_partition = Counter(p for p, _ in sent)
    assert summary["offsets"][topic] == {"0": per_partition[0] + 1, "1": per_partition[1]}
    assert committed_offsets(broker.bootstrap, f"{topic}-group", topic, 2) == {0: per_partition[0] + 1,
                                                                               1: per_partition[1]}
    letters = read_all(broker.bootstrap, f"{topic}.dead-letter", idle=3.0)
    anomalies = read_all(broker.bootstrap, f"{topic}.anomalies", idle=3.0)
    reported = Counter(json.loads(m.value())["source"]["key"] for m in anomalies)
    assert {f"id-{i}" for i in outliers} <= set(reported)
    assert max(reported.values()) == 1  # no rewind: nothing produced twice
    assert len(letters) == 1
    headers = headers_of(letters[0])
    assert letters[0].key() == b"huge" and headers["streamgmm.error.reason"] == b"oversized"
    assert letters[0].value() == huge[:dead_letter_max_bytes]
    assert headers["streamgmm.value.original_bytes"] == str(len(huge)).encode()
    assert headers["streamgmm.value.original_sha256"] == hashlib.sha256(huge).hexdigest().encode()


def test_a_member_stopped_past_its_session_timeout_learns_nothing_twice(broker, topic, tmp_path):
    """SIGSTOP one member with processed but uncheckpointed messages; another member joins and
    takes the partitions; the first is continued: what it learned since its checkpoint is
    unlearned (its partitions were lost), so the group learns each message exactly once."""
    partitions = 4
    create_topic(broker.bootstrap, topic, partitions=partitions)
    messages, _ = _vectors(12_000, seed=22)
    sent = produce(broker.bootstrap, topic, messages[:4000], partition_of=lambda i: i % partitions)
    # Checkpoints only on revoke and stop: the stopped member holds learned, unsaved messages.
    rare = {"interval_seconds": 3600, "interval_messages": 10**9}
    configs = [write_config(tmp_path / f"{name}.yaml", broker.bootstrap, topic, tmp_path / f"state-{name}",
                            kafka={"consumer": GROUP_CONSUMER, "client_id": name},
                            checkpoint={"dir": str(tmp_path / f"state-{name}"), **rare})
               for name in ("a", "b")]
    a = DaemonProcess(configs[0], tmp_path / "a.log").start()
    b = None
    try:
        a.wait_for(lambda: a.metric("streamgmm_messages_consumed_total") == 4000, what="a consumed the first part")
        a.process.send_signal(signal.SIGSTOP)
        try:
            b = DaemonProcess(configs[1], tmp_path / "b.log").start()
            b.wait_for(lambda: (b.metric("streamgmm_assigned_partitions") or 0) == partitions, timeout=60,
                       what="b owns every partition")
            sent += produce(broker.bootstrap, topic, messages[4000:8000], partition_of=lambda i: i % partitions)
            b.wait_for(lambda: b.metric("streamgmm_messages_consumed_total") == 8000, what="b caught up")
        finally:
            a.process.send_signal(signal.SIGCONT)
        a.wait_for(lambda: (a.metric("streamgmm_rewinds_total") or 0) >= 1, timeout=60,
                   what="a unlearned what it lost")
        a.wait_for(lambda: (a.metric("streamgmm_assigned_partitions") or 0) > 0, timeout=60, what="a back in the group")
        sent += produce(broker.bootstrap, topic, messages[8000:], partition_of=lambda i: i % partitions)
        time.sleep(3)
    finally:
        codes = [a.stop(), b.stop() if b else 0]
    assert codes == [0, 0]
    states = [inspect(tmp_path / "state-a"), inspect(tmp_path / "state-b")]
    learned = sum(s["n_valid"] for s in states if s)
    per_partition = Counter(p for p, _ in sent)
    committed = committed_offsets(broker.bootstrap, f"{topic}-group", topic, partitions)
    assert committed == {p: per_partition[p] for p in range(partitions)}
    assert learned == len(messages), f"learned {[s and s['n_valid'] for s in states]} of {len(messages)}"
    for p in range(partitions):
        assert max(int(s["offsets"].get(topic, {}).get(str(p), 0)) for s in states if s) == per_partition[p]


def test_a_partition_handed_away_and_back_with_no_new_data_keeps_its_offsets(broker, topic, tmp_path):
    create_topic(broker.bootstrap, topic, partitions=2)
    messages, _ = _vectors(3000, seed=23)
    produce(broker.bootstrap, topic, messages, partition_of=lambda i: i % 2)
    state = tmp_path / "state"
    config = write_config(tmp_path / "a.yaml", broker.bootstrap, topic, state, kafka={"consumer": GROUP_CONSUMER})
    other = write_config(tmp_path / "b.yaml", broker.bootstrap, topic, tmp_path / "state-b",
                         kafka={"consumer": GROUP_CONSUMER, "client_id": "b"})
    a = DaemonProcess(config, tmp_path / "a.log").start()
    try:
        a.wait_for(_checkpointed(state, 3000), what="all checkpointed")
        b = DaemonProcess(other, tmp_path / "b.log").start()
        a.wait_for(lambda: a.metric("streamgmm_assigned_partitions") == 1, timeout=60, what="a gave one away")
        assert b.stop() == 0
        a.wait_for(lambda: a.metric("streamgmm_assigned_partitions") == 2, timeout=60, what="a has both back")
        # Caught up: the lag of both partitions is 0, not what they would have been from offset 0.
        a.wait_for(lambda: [a.metric("streamgmm_consumer_lag_messages", f'partition="{p}",topic="{topic}"')
                            for p in (0, 1)] == [0.0, 0.0], what="lag 0 on both")
    finally:
        assert a.stop() == 0
    summary = inspect(state)
    assert summary["offsets"][topic] == {"0": 1500, "1": 1500}
    assert summary["n_valid"] == 3000
    # A restart under a new group id resumes from the checkpoint: nothing is learned again.
    fresh = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state,
                         kafka={"consumer": GROUP_CONSUMER, "group_id": f"{topic}-new-group"})
    again = DaemonProcess(fresh, tmp_path / "again.log").start()
    try:
        again.wait_for(lambda: again.get("/readyz")[0] == 200, what="ready")
        time.sleep(2)
        assert (again.metric("streamgmm_messages_consumed_total") or 0) == 0
    finally:
        assert again.stop() == 0
    assert inspect(state)["n_valid"] == 3000


def _log_times(text, pattern):
    return [datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00"))
            for line in text.splitlines() if re.search(pattern, line)]


def test_a_full_checkpoint_disk_backs_off_and_recovers_without_losing_a_message(broker, topic, tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip()}); needs root")
    try:
        create_topic(broker.bootstrap, topic)
        messages, _ = _vectors(6000, seed=24)
        state = mount / "state"
        config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state,
                              checkpoint={"dir": str(state), "interval_seconds": 0.5, "interval_messages": 500})
        produce(broker.bootstrap, topic, messages[:2000])
        daemon = DaemonProcess(config, tmp_path / "d.log").start()
        try:
            daemon.wait_for(_checkpointed(state, 2000), what="first checkpoints")
            filler = mount / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=1000"], capture_output=True)
            produce(broker.bootstrap, topic, messages[2000:4000])
            daemon.wait_for(lambda: daemon.metric("streamgmm_messages_consumed_total") == 4000, what="still scoring")
            daemon.wait_for(lambda: (daemon.metric("streamgmm_checkpoint_failures_total") or 0) >= 4, timeout=30,
                            what="failures")
            assert committed_offsets(broker.bootstrap, f"{topic}-group", topic, 1)[0] == 2000
            # Each failure says when it retries, and the next one comes no sooner.
            text = Path(tmp_path / "d.log").read_text()
            delays = [float(d) for d in re.findall(r"checkpoint failed .*retrying in (\d+) s", text)]
            times = _log_times(text, "checkpoint failed")
            assert delays[:3] == [1.0, 2.0, 4.0]
            gaps = [(t2 - t1).total_seconds() for t1, t2 in zip(times, times[1:])]
            assert all(gap >= delay - 0.05 for gap, delay in zip(gaps, delays)), (gaps, delays)
            filler.unlink()  # space again
            produce(broker.bootstrap, topic, messages[4000:])
            daemon.wait_for(lambda: committed_offsets(broker.bootstrap, f"{topic}-group", topic, 1)[0] == 6000,
                            timeout=60, what="commit after recovery")
        finally:
            assert daemon.stop() == 0
        summary = inspect(state)
        assert summary["n_valid"] == 6000
        assert summary["n_seen"] == summary["n_valid"] - summary["n_anomalies"] + summary["n_flagged_learned"]
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_the_lag_at_a_scrape_comes_from_the_broker_once_the_loop_has_stalled(tmp_path):
    """Unit check of the choice the metrics thread makes (no broker: the reader is a stand-in)."""
    from streamgmm.service import daemon as daemon_module
    from streamgmm.service.config import config_from_dict

    daemon = daemon_module.Daemon(config_from_dict({"checkpoint": {"dir": str(tmp_path)}}))
    asked = []
    daemon.watermarks = lambda partitions: asked.append(list(partitions)) or {("t", 0): (0, 500)}
    daemon.positions = {("t", 0): 100}
    daemon._loop_watermarks = {("t", 0): (0, 100)}
    daemon._last_poll = time.monotonic()
    assert daemon._watermarks_for_scrape() == {("t", 0): (0, 100)} and not asked  # the loop's own view
    daemon._last_poll = time.monotonic() - daemon_module.LOOP_STALL_SECONDS - 1
    assert daemon._watermarks_for_scrape() == {("t", 0): (0, 500)} and asked == [[("t", 0)]]


def _stop_while_the_broker_hangs(broker, daemon, after: float = 0.0) -> tuple[int, float]:
    """SIGSTOP the broker, SIGTERM the daemon ``after`` s later, SIGCONT the broker once the
    daemon has stopped: (exit code, seconds the stop took)."""
    broker.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(after)
        started = time.monotonic()
        code = daemon.stop(timeout=80)
        return code, time.monotonic() - started
    finally:
        broker.process.send_signal(signal.SIGCONT)


def _group_config_on(own, tmp_path, topic, messages, interval_messages):
    """A 2-partition ``topic`` on the broker ``own`` holding ``messages`` (alternating partitions),
    and the config of a group daemon for it that checkpoints every ``interval_messages`` only."""
    create_topic(own.bootstrap, topic, partitions=2)
    produce(own.bootstrap, topic, messages, partition_of=lambda i: i % 2)
    return write_config(tmp_path / "c.yaml", own.bootstrap, topic, tmp_path / "state",
                        kafka={"consumer": GROUP_CONSUMER},
                        checkpoint={"dir": str(tmp_path / "state"), "interval_seconds": 3600,
                                    "interval_messages": interval_messages})


def test_a_stop_while_the_broker_hangs_ends_in_bounded_time_and_the_checkpoint_holds(tmp_path):
    """A broker that holds its connections without answering (SIGSTOP, not dead) held the final
    synchronous commit for minutes: a SIGTERM never ended (400 s, then systemd's SIGKILL).  Now
    the commit is given up 15 s after the stop (the checkpoint file already holds the offsets:
    exit 0, as its last checkpoint was written), and a restart resumes from the checkpoint with
    every message learned once."""
    from streamgmm.dev.embedded import EmbeddedBroker

    topic = "hang"
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as own:
        messages, _ = _vectors(5000, seed=31)
        config = _group_config_on(own, tmp_path, topic, messages[:3000], interval_messages=10**9)
        daemon = DaemonProcess(config, tmp_path / "d.log").start()
        try:
            daemon.wait_for(lambda: daemon.metric("streamgmm_messages_consumed_total") == 3000, what="consumed")
            code, took = _stop_while_the_broker_hangs(own, daemon)
        finally:
            daemon.kill()
        log = Path(tmp_path / "d.log").read_text()
        assert code in (0, 1), log[-3000:]
        assert took < 75, f"the stop took {took:.0f} s"
        state = inspect(tmp_path / "state")
        assert state is not None and state["n_valid"] == 3000, log[-3000:]
        # Restarted with the broker back: the rest is learned, nothing twice.
        produce(own.bootstrap, topic, messages[3000:], partition_of=lambda i: i % 2)
        again = DaemonProcess(config, tmp_path / "d2.log").start()
        try:
            again.wait_for(lambda: again.metric("streamgmm_messages_consumed_total") == 2000, timeout=90,
                           what="the rest consumed after the restart")
        finally:
            assert again.stop() == 0
        assert inspect(tmp_path / "state")["n_valid"] == 5000


def test_a_stop_after_the_broker_died_says_whether_its_checkpoint_is_kept(tmp_path):
    """The broker killed, then SIGTERM: the checkpoint at shutdown was written, its commit refused,
    and then withdrawn when closing the consumer gave the partitions up as lost; the process exited
    0 all the same, though the README says a stop whose last checkpoint is not kept exits 1 and
    says the messages are read again (helper-67).  Whatever the timing, the two agree."""
    from streamgmm.dev.embedded import EmbeddedBroker

    topic = "gone"
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as own:
        messages, _ = _vectors(3000, seed=37)
        config = _group_config_on(own, tmp_path, topic, messages[:2500], interval_messages=2000)
        daemon = DaemonProcess(config, tmp_path / "d.log").start()
        try:
            daemon.wait_for(lambda: (daemon.metric("streamgmm_checkpoints_written_total") or 0) >= 1, what="a checkpoint")
            produce(own.bootstrap, topic, messages[2500:], partition_of=lambda i: i % 2)
            daemon.wait_for(lambda: daemon.metric("streamgmm_messages_consumed_total") == 3000, what="consumed")
            own.stop(kill=True)  # 500 messages since the last checkpoint
            time.sleep(2.0)
            code = daemon.stop(timeout=80)
        finally:
            daemon.kill()
    log = Path(tmp_path / "d.log").read_text()
    withdrawn = "checkpoints withdrawn while stopping" in log
    assert code in (0, 1), log[-3000:]
    unclean = withdrawn or "the checkpoint at shutdown failed" in log or "stopping without a checkpoint" in log
    assert (code == 1) == unclean, log[-3000:]
    if "withdrew checkpoint" in log.split("checkpoint of 1 model(s) written")[-1]:
        assert withdrawn and code == 1, log[-3000:]


def test_sighup_stops_cleanly_and_a_second_signal_stops_at_once(broker, topic, tmp_path):
    """SIGHUP (a closed terminal) killed the process at once, without a word or a checkpoint;
    a second SIGTERM ended it with nothing in the log."""
    create_topic(broker.bootstrap, topic, partitions=1)
    messages, _ = _vectors(2000, seed=32)
    produce(broker.bootstrap, topic, messages, partition_of=lambda i: 0)
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, tmp_path / "state",
                          checkpoint={"dir": str(tmp_path / "state"), "interval_seconds": 3600,
                                      "interval_messages": 10**9})
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    try:
        daemon.wait_for(lambda: daemon.metric("streamgmm_messages_consumed_total") == 2000, what="consumed")
        # 129, not 0: exit 0 left a Restart=on-failure unit down after a `kill -HUP` to reload (helper-41).
        assert daemon.stop(signal.SIGHUP) == 129
    finally:
        daemon.kill()
    assert "received SIGHUP: finishing the batch, checkpointing and stopping" in Path(tmp_path / "d.log").read_text()
    assert inspect(tmp_path / "state")["n_valid"] == 2000

    # A second signal while the first stop is under way (held here by a checkpoint pause).
    slow = DaemonProcess(config, tmp_path / "d2.log", env={"STREAMGMM_FAULT_CHECKPOINT_PAUSE_SECONDS": "30"}).start()
    try:
        slow.wait_for(lambda: (slow.metric("streamgmm_assigned_partitions") or 0) == 1, what="assigned")
        produce(broker.bootstrap, topic, messages[:10], partition_of=lambda i: 0)
        slow.wait_for(lambda: slow.metric("streamgmm_messages_consumed_total") == 10, what="consumed more")
        slow.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        code = slow.stop(signal.SIGTERM, timeout=10)
    finally:
        slow.kill()
    assert code == 128 + signal.SIGTERM
    assert "received SIGTERM again: stopping at once, without a checkpoint" in Path(tmp_path / "d2.log").read_text()


def test_a_stop_with_output_the_hung_broker_never_acknowledged_ends_soon_and_loses_nothing(tmp_path):
    """A backlog with outliers, the broker SIGSTOPped mid-way (librdkafka's prefetched messages
    still make anomaly records nobody acknowledges), then SIGTERM: the checkpoint's wait for the
    acknowledgements, 30 s, then another 30 s for the last checkpoint and 10 s more at close,
    made a stop of 70 s (docker stop -t 60 would have killed it).  The wait ends 10 s after the
    stop; a restart produces the output again and learns every message once."""
    from streamgmm.dev.embedded import EmbeddedBroker

    topic = "backlog"
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as own:
        create_topic(own.bootstrap, topic, partitions=2)
        messages, outliers = _vectors(30_000, seed=33, outlier_every=100)
        produce(own.bootstrap, topic, messages, partition_of=lambda i: i % 2)
        config = write_config(tmp_path / "c.yaml", own.bootstrap, topic, tmp_path / "state",
                              kafka={"consumer": GROUP_CONSUMER, "max_batch_messages": 500},
                              checkpoint={"dir": str(tmp_path / "state"), "interval_seconds": 3600,
                                          "interval_messages": 10**9})
        daemon = DaemonProcess(config, tmp_path / "d.log").start()
        try:
            daemon.wait_for(lambda: (daemon.metric("streamgmm_messages_consumed_total") or 0) >= 3000,
                            what="part of the backlog consumed")
            code, took = _stop_while_the_broker_hangs(own, daemon, after=1.0)
        finally:
            daemon.kill()
        log = Path(tmp_path / "d.log").read_text()
        assert took < 35, f"the stop took {took:.0f} s:\n{log[-3000:]}"
        assert code in (0, 1), log[-3000:]
        assert "retrying in" not in log.split("received SIGTERM")[-1]  # no retry is coming
        state = inspect(tmp_path / "state")
        left = 30_000 - (state["n_valid"] + state["n_invalid"] if state else 0)
        again = DaemonProcess(config, tmp_path / "d2.log").start()
        try:
            again.wait_for(lambda: again.metric("streamgmm_messages_consumed_total") == left, timeout=120,
                           what="the rest of the backlog consumed after the restart")
        finally:
            assert again.stop() == 0
        assert inspect(tmp_path / "state")["n_valid"] == 30_000
        reported = {(json.loads(m.value())["source"]["partition"], json.loads(m.value())["source"]["offset"])
                    for m in read_all(own.bootstrap, f"{topic}.anomalies")}
        expected = {(i % 2, i // 2) for i in outliers}
        assert expected <= reported  # every outlier reported at least once (output is at-least-once)


def test_a_header_key_that_is_not_utf8_is_dead_lettered_and_never_stops_the_daemon(broker, topic, tmp_path):
    """confluent-kafka's Message.headers() raises on such a key; uncaught, the message stopped the
    daemon at every restart with the partition never advancing (helper-82).  Another client
    (kafka-python, whose header keys are str, made to encode to other bytes) writes it."""
    from kafka import KafkaProducer

    class RawKey(str):
        def encode(self, *args, **kwargs):
            return b"\xff\xfe"

    create_topic(broker.bootstrap, topic, partitions=1)
    messages, _ = _vectors(1_000, seed=23)
    produce(broker.bootstrap, topic, messages[:600])
    other = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False, acks="all")
    other.send(topic, key=b"odd", value=b"not json", headers=[(RawKey("x"), b"v"), ("trace", b"t-1")]).get(timeout=30)
    other.flush()
    other.close()
    produce(broker.bootstrap, topic, messages[600:])
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, state, kafka={"consumer": GROUP_CONSUMER})
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    try:
        daemon.wait_for(_checkpointed(state, 1_001), timeout=90, what="every message checkpointed")
    finally:
        assert daemon.stop() == 0
    summary = inspect(state)
    assert summary["n_valid"] == 1_000 and summary["n_invalid"] == 1
    assert summary["offsets"][topic] == {"0": 1_001}
    letters = read_all(broker.bootstrap, f"{topic}.dead-letter", idle=3.0)
    assert len(letters) == 1 and letters[0].key() == b"odd" and letters[0].value() == b"not json"
    headers = headers_of(letters[0])
    assert headers["streamgmm.error.reason"] == b"undecodable"
    assert b"not UTF-8" in headers["streamgmm.headers.unreadable"]
