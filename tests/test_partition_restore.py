"""scope: partition with a state store that fails: the partition is held paused, its restore is
retried after a back-off, and no message is lost or learned twice (in-memory consumer, no broker)."""

import time
from collections import Counter

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException

from streamgmm.detection.decode import encode
from streamgmm.service.config import config_from_dict
from streamgmm.service.daemon import Daemon
from streamgmm.service.kafka import Deliveries


class Message:
    def __init__(self, topic, partition, offset, value):
        self._t, self._p, self._o, self._v = topic, partition, offset, value

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def key(self):
        return None

    def headers(self):
        return None

    def timestamp(self):
        return (1, 1_000)


class Consumer:
    """A consumer over in-memory partition logs: assign, pause, resume, seek, poll, commit.

    ``leak`` hands out one batch of a partition paused right after its assignment (librdkafka may
    have fetched before the pause took effect)."""

    def __init__(self, logs, group, leak=False):
        self.logs, self.group, self.leak = logs, group, leak
        self.positions, self.paused = {}, set()
        self.consumer = self  # the daemon pauses and resumes through KafkaSource.consumer

    def assign(self, partitions):
        self.positions = {}
        for tp in partitions:
            self.positions[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else self.group.get(
                (tp.topic, tp.partition), 0)

    def pause(self, partitions):
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions):
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def seek(self, topic, partition, offset):
        self.positions[(topic, partition)] = 0 if offset == OFFSET_BEGINNING else offset

    def committed(self, partitions, timeout=10.0):
        return {(tp.topic, tp.partition): self.group[(tp.topic, tp.partition)] for tp in partitions
                if (tp.topic, tp.partition) in self.group}

    def commit(self, offsets):
        self.group.update(offsets)

    def poll(self, max_messages, timeout):
        polled = {}
        for tp, position in sorted(self.positions.items()):
            if tp in self.paused and not self.leak:
                continue
            messages = self.logs[tp][position:position + 100]
            if messages:
                polled[tp] = messages
                self.positions[tp] = position + len(messages)
        self.leak = False
        return polled

    def cached_watermarks(self, partitions):
        return {tp: (0, len(self.logs[tp])) for tp in partitions}


class Sink:
    def __init__(self):
        self.deliveries = Deliveries()

    def send(self, record):
        pass

    def serve(self):
        pass

    def flush(self, timeout):
        return 0

    def take(self):
        taken, self.deliveries = self.deliveries, Deliveries()
        return taken

    def discard_pending(self):
        pass


class StateTopic:
    """The state topic: newest record per key; ``failures`` reads fail first."""

    def __init__(self, records, failures=0):
        self.records, self.failures, self.reads = records, failures, 0
        self.producer = self

    def load_many(self, keys=None, timeout=30.0):
        self.reads += 1
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "reading streamgmm-state took over 30 s"))
        return {k: v for k, v in self.records.items() if keys is None or k in keys}

    def write(self, key, state):
        self.records[key] = state

    def flush(self, timeout):
        pass


PARTITIONS = [("in", 0), ("in", 1)]


def _logs(n=600):
    rng = np.random.default_rng(0)
    return {tp: [Message(*tp, i, encode(x, "json")) for i, x in enumerate(rng.normal(size=(n, 3)))]
            for tp in PARTITIONS}


def _daemon(tmp_path, name, consumer, store):
    config = config_from_dict({
        "kafka": {"retry_backoff_initial_seconds": 0.05, "retry_backoff_max_seconds": 0.2},
        "input": {"format": "json", "dimension": 3},
        "model": {"n_components": 2, "covariance_type": "full", "warmup": 100, "scope": "partition"},
        "checkpoint": {"dir": str(tmp_path / name), "topic": "streamgmm-state", "interval_messages": 10**9},
        "metrics": {"enabled": False},
    }, environ={})
    daemon = Daemon(config)
    daemon.source, daemon.sink = consumer, Sink()
    daemon.topic_store = daemon.checkpointer.topic_store = store
    processed = Counter()
    process = daemon._process

    def counting(polled):
        for tp, messages in polled.items():
            processed.update((tp, m.offset()) for m in messages)
        process(polled)

    daemon._process = counting
    return daemon, processed


def _assignment():
    from confluent_kafka import TopicPartition

    return [TopicPartition(t, p) for t, p in PARTITIONS]


def _run(daemon, until, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        daemon._turn()
    assert until()


def test_a_state_store_that_fails_once_holds_the_partitions_and_learns_each_message_once(tmp_path):
    logs, group, records = _logs(), {}, {}
    # A first owner learns 300 messages of each partition, checkpoints and commits, and goes.
    first, _ = _daemon(tmp_path, "a", Consumer({tp: log[:300] for tp, log in logs.items()}, group), StateTopic(records))
    first._on_assign(_assignment())
    _run(first, lambda: first.positions == {tp: 300 for tp in PARTITIONS})
    first._checkpoint()
    assert group == {tp: 300 for tp in PARTITIONS} and set(records) == {"in/0", "in/1"}

    # The next owner's first read of the state topic fails.
    store = StateTopic(records, failures=1)
    consumer = Consumer(logs, group, leak=True)
    daemon, processed = _daemon(tmp_path, "b", consumer, store)
    daemon._on_assign(_assignment())
    assert set(daemon._unrestored) == set(PARTITIONS) and consumer.paused == set(PARTITIONS)
    assert daemon.detectors == {} and daemon.assigned == set(PARTITIONS)
    ready, words, details = daemon.readiness()
    assert not ready and "restoring" in details["in/0"] and "took over 30 s" in details["in/0"]
    daemon._turn()  # the batch librdkafka fetched before the pause: dropped, not learned
    assert not processed and daemon._unrestored
    assert daemon.metrics.value("streamgmm_state_restore_failures_total") == 1

    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS})
    assert store.reads == 2 and not daemon._unrestored and not consumer.paused
    # Each message after the checkpoint exactly once; the models hold 300 + 300.
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(300, 600)})
    assert all(daemon.detectors[f"{t}/{p}"].n_valid == 600 for t, p in PARTITIONS)
    daemon._checkpoint()
    assert group == {tp: 600 for tp in PARTITIONS}


def test_restores_that_keep_failing_back_off_and_a_revoked_partition_is_no_longer_tried(tmp_path):
    logs, group = _logs(200), {}
    store = StateTopic({}, failures=10**6)
    consumer = Consumer(logs, group)
    daemon, processed = _daemon(tmp_path, "a", consumer, store)
    daemon._on_assign(_assignment())
    _run(daemon, lambda: store.reads >= 4, seconds=2.0)
    assert daemon._restore_backoff == 0.2 and not processed and daemon.source.group == {}
    daemon._on_revoke(_assignment())
    assert not daemon._unrestored and not consumer.paused
    reads = store.reads
    time.sleep(0.25)
    daemon._turn()
    assert store.reads == reads


def test_a_partition_with_no_state_anywhere_starts_where_auto_offset_reset_says(tmp_path):
    logs, group = _logs(200), {}
    consumer = Consumer(logs, group, leak=True)
    daemon, processed = _daemon(tmp_path, "a", consumer, StateTopic({}, failures=1))
    daemon._on_assign(_assignment())
    _run(daemon, lambda: daemon.positions == {tp: 200 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(200)})


def test_a_corrupt_state_for_one_partition_holds_only_that_one(tmp_path):
    logs, group = _logs(200), {}
    consumer = Consumer(logs, group)

    class OneBad(StateTopic):
        def load_many(self, keys=None, timeout=30.0):
            if "in/1" in keys and self.failures:
                self.failures -= 1
                return {"in/1": {"kind": "something else"}}
            return {}

    daemon, processed = _daemon(tmp_path, "a", consumer, OneBad({}, failures=1))
    daemon._on_assign(_assignment())
    assert set(daemon._unrestored) == {("in", 1)} and consumer.paused == {("in", 1)}
    _run(daemon, lambda: daemon.positions == {tp: 200 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(200)})

