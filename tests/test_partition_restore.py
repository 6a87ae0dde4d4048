"""scope: partition with a state store that fails: the partition is held paused, its restore is
retried after a back-off, and no message is lost or learned twice (in-memory consumer, no broker)."""

import re
import time
from collections import Counter

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, TopicPartition

from streamgmm.detection.decode import encode
from streamgmm.service.config import config_from_dict
from streamgmm.detection.detector import Detector
from streamgmm.service.daemon import Daemon, StartupError
from streamgmm.service.kafka import KafkaSource
from streamgmm.service.state import TopicStateStore, pack
from fakes import FakeMessage, FakeSink


class Consumer:
    """A consumer over in-memory partition logs with KafkaSource's methods (assign, pause, resume,
    seek, committed, commit, poll) and librdkafka's rules for them, which the daemon must keep: a
    paused partition is resumed before it is sought, and only a paused partition is resumed.

    ``leak`` hands out one batch of a partition paused right after its assignment (librdkafka may
    have fetched before the pause took effect).  ``reset`` is auto.offset.reset for a partition
    assigned with no offset and no commit.  ``committed_failures`` / ``seek_failures``: that many
    reads of the committed offsets / seeks fail first."""

    def unavailable(self, topics, timeout):
        return {}  # the input topics exist and may be read

    def __init__(self, logs, group, leak=False, reset="earliest"):
        self.logs, self.group, self.leak, self.reset = logs, group, leak, reset
        self.positions, self.paused = {}, set()
        self.committed_failures = self.seek_failures = 0
        self.committed_timeouts = []

    def assign(self, partitions):
        self.positions = {}
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0:
                self.positions[key] = tp.offset
            elif key in self.group:
                self.positions[key] = self.group[key]
            else:
                self.positions[key] = 0 if self.reset == "earliest" else len(self.logs[key])

    def pause(self, partitions):
        self.paused |= set(partitions)

    def resume(self, partitions):
        assert set(partitions) <= self.paused, f"resume of {set(partitions) - self.paused}, which is not paused"
        self.paused -= set(partitions)

    def seek(self, topic, partition, offset):
        assert (topic, partition) not in self.paused, f"seek of {topic}/{partition} while paused: resume it first"
        if self.seek_failures:
            self.seek_failures -= 1
            raise KafkaException(KafkaError(KafkaError._STATE, "Partition is not being fetched"))
        logical = {OFFSET_BEGINNING: 0, OFFSET_END: len(self.logs[(topic, partition)])}
        self.positions[(topic, partition)] = logical.get(offset, offset)

    def committed(self, partitions, timeout=10.0):
        self.committed_timeouts.append(timeout)
        if self.committed_failures:
            self.committed_failures -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the group coordinator did not answer"))
        return {(tp.topic, tp.partition): self.group[(tp.topic, tp.partition)] for tp in partitions
                if (tp.topic, tp.partition) in self.group}

    wedged = False

    def commit(self, offsets, give_up=None):
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

    def end_offset(self, topic, partition, timeout=5.0, start=False):
        return 0 if start else len(self.logs[(topic, partition)])

    def partitions_now(self, timeout):
        return frozenset(self.logs)

    def close(self):
        pass


class StateTopic:
    """The state topic: newest record per key; ``failures`` reads fail first."""

    def __init__(self, records, failures=0):
        self.records, self.failures, self.reads, self.timeouts = records, failures, 0, []
        self.producer = self

    def load_many(self, keys=None, timeout=30.0, floors=None, restore_problem=None):
        self.reads += 1
        self.timeouts.append(timeout)
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "reading streamgmm-state: nothing came for 30 s"))
        return {k: v for k, v in self.records.items() if keys is None or k in keys}

    def write(self, key, state):
        self.records[key] = state

    def flush(self, timeout, give_up=None):
        pass


PARTITIONS = [("in", 0), ("in", 1)]


def _logs(n=600):
    rng = np.random.default_rng(0)
    return {tp: [FakeMessage(*tp, i, encode(x, "json")) for i, x in enumerate(rng.normal(size=(n, 3)))]
            for tp in PARTITIONS}


def _config(tmp_path, name, reset="earliest", **model):
    return config_from_dict({
        "kafka": {"retry_backoff_initial_seconds": 0.05, "retry_backoff_max_seconds": 0.2, "auto_offset_reset": reset},
        "input": {"format": "json", "dimension": 3},
        "model": {"n_components": 2, "covariance_type": "full", "warmup": 100, "scope": "partition", **model},
        "checkpoint": {"dir": str(tmp_path / name), "topic": "streamgmm-state", "interval_messages": 10**9},
        "metrics": {"enabled": False},
    }, environ={})


def _daemon(tmp_path, name, consumer, store):
    config = _config(tmp_path, name, consumer.reset)
    daemon = Daemon(config)
    daemon.source, daemon.sink = consumer, FakeSink()
    daemon.topic_store = daemon.checkpointer.topic_store = store
    processed = Counter()
    process = daemon._process

    def counting(polled):
        for tp, messages in polled.items():
            processed.update((tp, m.offset()) for m in messages)
        process(polled)

    daemon._process = counting
    return daemon, processed


def _assignment(partitions=PARTITIONS):
    return [TopicPartition(t, p) for t, p in partitions]


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
    assert set(daemon.held.unrestored) == set(PARTITIONS) and consumer.paused == set(PARTITIONS)
    assert daemon.detectors == {} and daemon.assigned == set(PARTITIONS)
    ready, words, details = daemon.readiness()
    assert not ready and "restoring" in details["in/0"] and "nothing came for 30 s" in details["in/0"]
    daemon._turn()  # the batch librdkafka fetched before the pause: dropped, not learned
    assert not processed and daemon.held.unrestored
    assert daemon.metrics.value("streamgmm_state_restore_failures_total") == 2  # one per partition

    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS})
    assert store.reads == 2 and not daemon.held.unrestored and not consumer.paused
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
    assert daemon.held.backoff == 0.2 and not processed and daemon.source.group == {}
    daemon._on_revoke(_assignment())
    assert not daemon.held.unrestored and not consumer.paused
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


def _state(tmp_path, **change):
    """A usable state record of a fresh model, with some of its input section changed."""
    state = Detector(_config(tmp_path, "seed")).state(0.0)
    state["input"].update(change)
    return state


class OneRecord(StateTopic):
    """The state topic holds one record, for in/1."""

    def load_many(self, keys=None, timeout=30.0, floors=None, restore_problem=None):
        self.reads += 1
        return {k: v for k, v in self.records.items() if k in keys}


@pytest.mark.parametrize("record, says", [
    ({"dimension": 4}, "the checkpoint is for input.dimension=4, the config says 3"),
    ({"dimension": None, "kind": None}, "its state record is malformed (TypeError"),
    ("no input section", "its state record is malformed (KeyError: 'input')"),
])
def test_a_state_record_this_config_cannot_use_stops_the_daemon_with_exit_code_2(tmp_path, record, says):
    # Retrying cannot mend it, so neither holding the partition for ever nor an exception out of
    # the rebalance callback (which would end consume() half way): the loop stops with a StartupError,
    # which the command line turns into exit code 2 (not restarted by systemd).
    if record == "no input section":
        bad = {"kind": "streamgmm-detector"}
    else:
        bad = _state(tmp_path, **{k: v for k, v in record.items() if k != "kind"})
        if "kind" in record:
            bad["input"] = None
    logs, group = _logs(200), {}
    consumer = Consumer(logs, group)
    daemon, processed = _daemon(tmp_path, "a", consumer, OneRecord({"in/1": bad}))
    daemon._on_assign(_assignment())  # does not raise
    assert daemon._stop.is_set() and set(daemon.held.unrestored) == {("in", 1)} and consumer.paused == {("in", 1)}
    daemon._turn()
    assert not processed  # stopping: not even the healthy partition's batch
    daemon.start_up = daemon._connect = lambda: None
    with pytest.raises(StartupError, match=re.escape(f"cannot restore the model of in/1: {says}")):
        daemon.run()


class FakeProducer:
    """Acknowledges every record at once (the state records of this test are not read back)."""

    def produce(self, topic, key=None, value=None, on_delivery=None):
        pass

    def flush(self, timeout=None):
        return 0


def test_a_newest_state_record_that_cannot_be_restored_gives_way_to_the_one_before(tmp_path, monkeypatch, caplog):
    # helper-53: a record with a valid checksum but malformed content stopped every member its
    # partition went to (exit 2), while the record before it was good.  Now it is passed over like
    # a corrupt one, loudly, and only a partition with no usable record stops the daemon.
    logs, group, records = _logs(), {}, {}
    first, _ = _daemon(tmp_path, "a", Consumer({tp: log[:300] for tp, log in logs.items()}, group), StateTopic(records))
    first._on_assign(_assignment())
    _run(first, lambda: first.positions == {tp: 300 for tp in PARTITIONS})
    first._checkpoint()
    malformed = {"kind": "streamgmm-detector"}  # packs and checksums fine; no input section
    log = [KeyedMessage(b"in/0", pack(records["in/0"])), KeyedMessage(b"in/1", pack(records["in/1"])),
           KeyedMessage(b"in/0", pack(malformed))]
    monkeypatch.setattr("streamgmm.service.state.read_topic", lambda *args, **kwargs: iter(log))
    store = TopicStateStore("streamgmm-state", {}, producer=FakeProducer())
    consumer = Consumer(logs, group)
    daemon, processed = _daemon(tmp_path, "b", consumer, store)
    daemon._on_assign(_assignment())
    assert not daemon._stop.is_set() and not daemon.held.unrestored
    assert ("state in/0: passing over 1 newer record(s) that cannot be restored (its state record is malformed"
            in caplog.text)
    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(300, 600)})
    assert all(daemon.detectors[f"{t}/{p}"].n_valid == 600 for t, p in PARTITIONS)

    # Malformed records only: the newest is restored, and says why the daemon stops (exit 2).
    log[:] = [KeyedMessage(b"in/1", pack(records["in/1"])), KeyedMessage(b"in/0", pack(malformed)),
              KeyedMessage(b"in/0", pack({**malformed, "input": None}))]
    caplog.clear()
    daemon, processed = _daemon(tmp_path, "c", Consumer(logs, group), store)
    daemon._on_assign(_assignment())
    assert daemon._stop.is_set() and set(daemon.held.unrestored) == {("in", 0)}
    assert "passing over" not in caplog.text  # (none restores: the newest's restore says why, once)
    daemon.start_up = daemon._connect = lambda: None
    with pytest.raises(StartupError, match=re.escape("cannot restore the model of in/0: its state record is "
                                                     "malformed (TypeError")):
        daemon.run()


def test_state_records_of_other_bytes_are_passed_over_not_fatal(tmp_path, monkeypatch):
    # helper-82: another program's record whose key is not UTF-8 held every partition paused for
    # good (the topic taken as unreadable as a whole), and a record that passes its checksum but
    # whose payload is not an archive (BadZipFile) stopped the daemon at every assignment.
    import hashlib
    import json as json_module

    from streamgmm.service.state import MAGIC
    logs, group, records = _logs(), {}, {}
    first, _ = _daemon(tmp_path, "a", Consumer({tp: log[:300] for tp, log in logs.items()}, group), StateTopic(records))
    first._on_assign(_assignment())
    _run(first, lambda: first.positions == {tp: 300 for tp in PARTITIONS})
    first._checkpoint()
    payload = b"PK\x03\x04" + bytes(40)
    not_an_archive = MAGIC + json_module.dumps({"format_version": 2, "payload_bytes": len(payload),
                                                "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n" + payload
    log = [KeyedMessage(b"in/0", pack(records["in/0"])), KeyedMessage(b"in/1", pack(records["in/1"])),
           KeyedMessage(b"\xff\xfe-not-utf8", b"another program's record"), KeyedMessage(b"in/1", not_an_archive)]
    monkeypatch.setattr("streamgmm.service.state.read_topic", lambda *args, **kwargs: iter(log))
    store = TopicStateStore("streamgmm-state", {}, producer=FakeProducer())
    daemon, processed = _daemon(tmp_path, "b", Consumer(logs, group), store)
    daemon._on_assign(_assignment())
    assert not daemon._stop.is_set() and not daemon.held.partitions()
    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(300, 600)})
    assert all(daemon.detectors[f"{t}/{p}"].n_valid == 600 for t, p in PARTITIONS)


def test_a_missing_init_from_is_refused_at_start_with_scope_partition(tmp_path):
    (tmp_path / "empty").mkdir()
    daemon = Daemon(_config(tmp_path, "a", init_from=str(tmp_path / "empty")))
    with pytest.raises(StartupError, match=re.escape(f"model.init_from={tmp_path / 'empty'}: no valid checkpoint")):
        daemon.start_up()


def test_an_unreadable_commit_is_retried_not_guessed(tmp_path):
    # The group committed 300; there is no state record; the first state read fails and the
    # group's commit cannot be read at the first retry: the partitions still start at 300.
    logs, group = _logs(), {tp: 300 for tp in PARTITIONS}
    consumer = Consumer(logs, group)
    store = StateTopic({}, failures=1)
    daemon, processed = _daemon(tmp_path, "a", consumer, store)
    daemon._on_assign(_assignment())
    consumer.committed_failures = 1
    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS} and not daemon.held.unrestored)
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(300, 600)})
    # Per partition: the state read at assignment, the commit at the first retry.
    assert daemon.metrics.value("streamgmm_state_restore_failures_total") == 4


def test_with_latest_a_partition_held_from_its_assignment_loses_nothing_produced_meanwhile(tmp_path):
    # No commit, no state, nothing fetched before the pause: librdkafka's position (the log's end
    # at assignment) stands; the retry must not seek to the end at its own time.
    full, group = _logs(200), {}
    logs = {tp: log[:100] for tp, log in full.items()}
    consumer = Consumer(logs, group, reset="latest")
    daemon, processed = _daemon(tmp_path, "a", consumer, StateTopic({}, failures=1))
    daemon._on_assign(_assignment())
    logs.update(full)  # 100 more each while held
    _run(daemon, lambda: daemon.positions == {tp: 200 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(100, 200)})


def test_a_held_partition_keeps_reporting_its_lag(tmp_path):
    logs, group = _logs(), {("in", 0): 300}
    consumer = Consumer(logs, group)
    daemon, _ = _daemon(tmp_path, "a", consumer, StateTopic({}, failures=1))
    daemon.metrics.watch_lag(lambda: daemon.positions, daemon._watermarks_for_scrape)
    daemon.held.schedule_retry = lambda again: None  # no retry yet
    daemon._on_assign(_assignment())
    daemon._turn()

    def lag(partition):
        return daemon.metrics.value("streamgmm_consumer_lag_messages", {"topic": "in", "partition": str(partition)})

    assert lag(0) == 300 and lag(1) == 600  # from the commit; from the log's start (earliest)


def test_a_retry_reads_briefly_and_a_failed_seek_keeps_the_restored_model(tmp_path):
    logs, group = _logs(200), {tp: 100 for tp in PARTITIONS}
    consumer = Consumer(logs, group)
    store = StateTopic({}, failures=1)
    daemon, processed = _daemon(tmp_path, "a", consumer, store)
    daemon._on_assign(_assignment())
    consumer.seek_failures = 1
    _run(daemon, lambda: daemon.positions == {tp: 200 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(100, 200)})
    assert store.reads == 2  # at assignment, and the retry that restored both; the seek's retry read nothing
    assert store.timeouts[0] == 30.0 and max(store.timeouts[1:]) <= 5.0
    assert max(consumer.committed_timeouts[1:]) <= 5.0
    assert daemon.metrics.value("streamgmm_state_restore_failures_total") == 2  # the seek is no restore failure


def test_failures_count_per_partition_and_the_back_off_doubles_once_per_round(tmp_path):
    consumer = Consumer(_logs(200), {})
    daemon, _ = _daemon(tmp_path, "a", consumer, None)

    def unreadable(key, restore_problem=None):
        raise PermissionError(13, "Permission denied")

    daemon.topic_store, daemon.local.load = None, unreadable
    daemon._on_assign(_assignment([("in", 0)]))
    first_retry = daemon.held.retry_at
    assert daemon.held.backoff == 0.1 and first_retry is not None
    daemon._on_assign(_assignment([("in", 1)]))  # joins the round scheduled: does not postpone it
    assert daemon.held.retry_at == first_retry and daemon.held.backoff == 0.1
    time.sleep(0.06)
    daemon._turn()  # one round for both partitions: doubled once
    assert daemon.held.backoff == 0.2
    assert daemon.metrics.value("streamgmm_state_restore_failures_total") == 4


def test_readiness_reads_a_held_partition_once(tmp_path):
    class Vanishing(dict):
        """The loop takes the partition out right after the metrics thread found it there."""

        def __contains__(self, key):
            found = dict.__contains__(self, key)
            self.pop(key, None)
            return found

    consumer = Consumer(_logs(200), {})
    daemon, _ = _daemon(tmp_path, "a", consumer, StateTopic({}, failures=1))
    daemon._on_assign(_assignment())
    daemon.held.unrestored = Vanishing(daemon.held.unrestored)
    ready, _, details = daemon.readiness()
    assert not ready and details["in/0"].startswith(("restoring its model", "warming up"))


def test_a_rewind_while_a_partition_is_held_leaves_it_paused_and_loses_nothing(tmp_path):
    logs, group = _logs(200), {}
    consumer = Consumer(logs, group)
    daemon, _ = _daemon(tmp_path, "a", consumer, None)
    failures = [3]

    def second_fails(key, restore_problem=None):  # scope: partition without a state topic: a directory per partition
        if key == "in/1" and failures[0]:
            failures[0] -= 1
            raise PermissionError(13, "Permission denied")

    daemon.topic_store, daemon.local.load = None, second_fails
    daemon._on_assign(_assignment())
    assert consumer.paused == {("in", 1)}
    daemon._turn()
    daemon._rewind_pending = "output records were not acknowledged"
    daemon._turn()  # seeks in/0 back; in/1 stays paused (a seek of it would be refused)
    assert consumer.paused == {("in", 1)} and daemon._rewind_pending is None
    _run(daemon, lambda: daemon.positions == {tp: 200 for tp in PARTITIONS})
    assert all(daemon.detectors[f"{t}/{p}"].n_valid == 200 for t, p in PARTITIONS) and not consumer.paused


def test_a_partition_assigned_again_is_rewound_to_its_new_first_offset_not_an_old_one(tmp_path):
    # Lost with nothing checkpointed, then assigned again (auto.offset.reset: latest): a rewind
    # goes back to the first offset read since the new assignment (300), not to the one read
    # before it was lost (100).
    full, group = _logs(400), {}
    logs = {tp: log[:100] for tp, log in full.items()}
    consumer = Consumer(logs, group, reset="latest")
    daemon, processed = _daemon(tmp_path, "a", consumer, StateTopic({}))
    daemon._on_assign(_assignment())
    logs.update({tp: log[:200] for tp, log in full.items()})
    daemon._turn()  # reads 100..199
    daemon._on_lost(_assignment())
    assert group == {tp: 100 for tp in PARTITIONS}  # where latest put them, committed at the first assignment
    logs.update({tp: log[:300] for tp, log in full.items()})
    group.update({tp: 300 for tp in PARTITIONS})  # the member that had them meanwhile committed 300
    daemon._on_assign(_assignment())  # at the group's commit: 300
    logs.update(full)
    daemon._turn()  # reads 300..399
    daemon._rewind_pending = "output records were not acknowledged"
    daemon._turn()
    assert consumer.positions == {tp: 300 for tp in PARTITIONS} and daemon._rewind_pending is None
    read = [*range(100, 200), *range(300, 400)]  # 200..299 came while another member had them
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in read})


def test_kafka_source_pauses_and_resumes_by_topic_and_partition():
    calls = []

    class Recorder:
        def pause(self, partitions):
            calls.append(("pause", [(tp.topic, tp.partition) for tp in partitions]))

        def resume(self, partitions):
            calls.append(("resume", [(tp.topic, tp.partition) for tp in partitions]))

    source = KafkaSource.__new__(KafkaSource)
    source.consumer = Recorder()
    source.pause([("in", 1)])
    source.resume([("in", 1)])
    assert calls == [("pause", [("in", 1)]), ("resume", [("in", 1)])]


@pytest.mark.parametrize("backoff, allowed", [(0.1, 5.0), (12.0, 12.0), (120.0, 25.0)])
def test_a_retry_is_allowed_longer_as_the_back_off_grows(tmp_path, backoff, allowed):
    # A state topic slower to read than the first allowance must not hold the partition for ever;
    # the allowance stays under the loop-stall alert's 30 s.
    consumer = Consumer(_logs(200), {tp: 100 for tp in PARTITIONS})
    store = StateTopic({}, failures=2)
    daemon, _ = _daemon(tmp_path, "a", consumer, store)
    daemon._on_assign(_assignment())
    daemon.held.backoff, daemon.held.retry_at = backoff, time.monotonic()
    daemon._turn()
    assert store.timeouts[-1] == allowed and consumer.committed_timeouts[-1] == allowed


class LoggedStateTopic(TopicStateStore):
    """The state topic as a log (every record kept, in order), read by the real ``load_many``."""

    def __init__(self, monkeypatch):
        super().__init__("streamgmm-state", {}, producer=None)
        self.log = []
        monkeypatch.setattr("streamgmm.service.state.read_topic", lambda settings, topic, timeout, cap: iter(self.log))

    def write(self, key, state):
        self.log.append(KeyedMessage(key.encode(), pack(state)))

    def flush(self, timeout, give_up=None):
        pass


class KeyedMessage:
    def __init__(self, key, value):
        self._k, self._v = key, value

    def key(self):
        return self._k

    def value(self):
        return self._v


def _checkpointed_at(tmp_path, name, logs, group, store, offset, reads_to=None):
    """A member given every partition that learns it up to ``offset``, checkpoints and commits
    (and reads on to ``reads_to`` without checkpointing)."""
    member, _ = _daemon(tmp_path, name, Consumer({tp: log[:reads_to or offset] for tp, log in logs.items()}, group),
                        store)
    member._on_assign(_assignment())
    _run(member, lambda: member.positions == {tp: offset for tp in PARTITIONS})
    member._checkpoint()
    if reads_to:
        _run(member, lambda: member.positions == {tp: reads_to for tp in PARTITIONS})
    return member


def _refused(offsets, give_up=None):
    raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "the member is not known to the group"))


def test_a_state_record_written_by_an_expired_member_after_the_new_owners_is_passed_over(tmp_path, monkeypatch):
    logs, group = _logs(), {}
    store = LoggedStateTopic(monkeypatch)
    # A learns 0..299 of each partition, checkpoints and commits, reads on to 399, and is stopped
    # (SIGSTOP) past its session timeout before its next checkpoint.
    a = _checkpointed_at(tmp_path, "a", logs, group, store, 300, reads_to=400)
    # B is given the partitions: it restores A's state at 300, learns 300..499, checkpoints, commits.
    _checkpointed_at(tmp_path, "b", logs, group, store, 500)
    assert group == {tp: 500 for tp in PARTITIONS}
    # A wakes and checkpoints before it hears it was expired: its records (at 400) are the newest.
    a.source.commit = _refused
    a._checkpoint()
    assert group == {tp: 500 for tp in PARTITIONS} and len(store.log) == 6
    # C is given the partitions: it restores B's states, which the group's commit is at.
    c, processed = _daemon(tmp_path, "c", Consumer(logs, group), store)
    c._on_assign(_assignment())
    assert all(c.detectors[f"{t}/{p}"].n_valid == 500 for t, p in PARTITIONS)
    _run(c, lambda: c.positions == {tp: 600 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(500, 600)})
    assert all(c.detectors[f"{t}/{p}"].n_valid == 600 for t, p in PARTITIONS)  # each message learned once
    assert c.metrics.value("streamgmm_state_behind_group_total") == 0


def test_with_no_state_at_the_commit_the_newest_is_restored(tmp_path, monkeypatch, caplog):
    # An operator moved the group's offsets ahead of every state: the newest state, resumed at the commit.
    logs, group = _logs(), {}
    store = LoggedStateTopic(monkeypatch)
    _checkpointed_at(tmp_path, "a", logs, group, store, 300)
    group.update({tp: 450 for tp in PARTITIONS})
    c, processed = _daemon(tmp_path, "c", Consumer(logs, group), store)
    c._on_assign(_assignment())
    assert all(c.detectors[f"{t}/{p}"].n_valid == 300 for t, p in PARTITIONS)
    _run(c, lambda: c.positions == {tp: 600 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(450, 600)})
    # Said, per partition: the 150 messages between are not learned by this model.
    said = [r.getMessage() for r in caplog.records if "behind the group's commit 450" in r.getMessage()]
    assert len(said) == 2 and all("the 150 messages between" in m for m in said)
    assert c.metrics.value("streamgmm_state_behind_group_total") == 2


def test_a_partition_with_a_group_commit_but_no_state_says_so(tmp_path, monkeypatch, caplog):
    # A member whose checkpoint.topic has a typo: the group has committed, its topic has nothing.
    logs, group = _logs(), {tp: 200 for tp in PARTITIONS}
    c, processed = _daemon(tmp_path, "c", Consumer(logs, group), LoggedStateTopic(monkeypatch))
    c._on_assign(_assignment())
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("no state of it in checkpoint.topic streamgmm-state, but the group has committed it up to 200" in m
               for m in said) == 2
    assert c.metrics.value("streamgmm_state_behind_group_total") == 2


class TopicMessage(FakeMessage):
    def error(self):
        return None


class SlowTopicConsumer:
    """A consumer of a 2-partition topic of 6 messages that gives one message per consume after
    ``delay`` seconds, or (``stalled``) nothing at all."""

    def __init__(self, delay, stalled=False, n=6):
        self.delay, self.stalled, self.n = delay, stalled, n
        self.left = [TopicMessage("t", i % 2, i // 2, b"x") for i in range(n)]

    def list_topics(self, topic, timeout):
        return type("Metadata", (), {"topics": {topic: type("Topic", (), {"partitions": {0: None, 1: None}})}})

    def get_watermark_offsets(self, tp, timeout):
        return 0, self.n // 2

    def assign(self, partitions):
        pass

    def consume(self, num_messages, timeout):
        time.sleep(self.delay)
        return [] if self.stalled or not self.left else [self.left.pop(0)]

    def close(self):
        pass


def test_a_state_topic_read_steadily_is_read_to_its_end_however_long_it_takes(monkeypatch):
    from streamgmm.service import kafka

    monkeypatch.setattr(kafka, "Consumer", lambda settings: SlowTopicConsumer(delay=0.1))
    read = list(kafka.read_topic({}, "t", timeout=0.25))  # 0.6 s in all, a message every 0.1 s
    assert [(m.partition(), m.offset()) for m in read] == [(i % 2, i // 2) for i in range(6)]
    monkeypatch.setattr(kafka, "Consumer", lambda settings: SlowTopicConsumer(delay=0.05, stalled=True))
    with pytest.raises(KafkaException, match="nothing came for 0.25 s"):
        list(kafka.read_topic({}, "t", timeout=0.25))
    # ... but not for ever when asked (in a rebalance callback, before max.poll.interval.ms).
    monkeypatch.setattr(kafka, "Consumer", lambda settings: SlowTopicConsumer(delay=0.05, n=100))
    with pytest.raises(KafkaException, match="still not read to its end after 1 s"):
        list(kafka.read_topic({}, "t", timeout=0.1, max_seconds=1.0))


def test_with_a_state_topic_a_full_checkpoint_dir_does_not_hold_up_the_topic_or_the_commits(tmp_path, monkeypatch,
                                                                                              caplog):
    # The models are restored from the topic only: a full local disk held up every partition's
    # state record and commit (8 failures and a rewind in an operator's run).
    from streamgmm.service import state as state_module

    def disk_full(path, data, pause=None):
        raise OSError(28, "No space left on device")

    logs, group = _logs(), {}
    store = LoggedStateTopic(monkeypatch)
    daemon, _ = _daemon(tmp_path, "a", Consumer({tp: log[:300] for tp, log in logs.items()}, group), store)
    assert daemon.checkpointer.local_is_copy  # scope: partition with a state topic: the files are a copy
    daemon._on_assign(_assignment())
    _run(daemon, lambda: daemon.positions == {tp: 300 for tp in PARTITIONS})
    monkeypatch.setattr(state_module, "write_atomically", disk_full)
    with caplog.at_level("INFO"):
        assert daemon._checkpoint().name == "WRITTEN"
    assert group == {tp: 300 for tp in PARTITIONS} and len(store.log) == 2
    # The models written, not the files (none): "0 model(s)" before listing them (helper-63).
    assert "checkpoint of 2 model(s) written" in caplog.text
    # Counted where an operator looks (it was a WARNING only), and not as a failed checkpoint.
    assert daemon.metrics.value("streamgmm_checkpoint_local_copy_failures_total") == 1
    assert daemon.metrics.value("streamgmm_checkpoint_failures_total") == 0
    # When the topic does not take it either, it is a failed checkpoint, and only that.
    from streamgmm.service.state import CheckpointError

    def unacknowledged(timeout, give_up=None):
        raise CheckpointError("state topic streamgmm-state: 2 record(s) unacknowledged after 30 s")

    store.flush = unacknowledged
    daemon.checkpointer.pending_messages = 1  # (as after more messages)
    assert daemon._checkpoint().name == "FAILED"
    assert daemon.metrics.value("streamgmm_checkpoint_local_copy_failures_total") == 1
    assert daemon.metrics.value("streamgmm_checkpoint_failures_total") == 1


def test_a_partition_whose_position_is_past_the_end_of_its_log_is_said_not_ready(tmp_path, monkeypatch, caplog):
    # The broker lost its data (or the topic was made again): the group's commit is at 900, the
    # log holds 600. Tansu answers nothing, and the lag showed 0 and /readyz "models ready".
    logs, group = _logs(), {tp: 900 for tp in PARTITIONS}
    daemon, processed = _daemon(tmp_path, "a", Consumer(logs, group), LoggedStateTopic(monkeypatch))
    daemon._on_assign(_assignment())
    for _ in range(3):
        daemon._turn()
    # Not at once: a partition handed back shows its old end until librdkafka fetches it again.
    assert not daemon.watch.past_the_end and "past the end" not in daemon.readiness()[1]
    daemon.watch._past_the_end_since = {tp: t - 31.0 for tp, t in daemon.watch._past_the_end_since.items()}
    for _ in range(3):
        daemon._turn()
    ready, words, details = daemon.readiness()
    assert not ready and "past the end of their log" in words
    assert details["in/0"] == "its next offset 900 is past the end of its log (600)"
    assert daemon.metrics.value("streamgmm_partitions_past_log_end") == 2
    said = [r.getMessage() for r in caplog.records if "past the end of its log" in r.getMessage()]
    assert len(said) == 2  # once per partition, not once per turn
    # (A Kafka broker would answer OFFSET_OUT_OF_RANGE and librdkafka reset to the start: from
    # then on a rewind must not seek back to the old commit, which lies past the new log.)
    assert daemon._commits_at_assignment == {tp: 900 for tp in PARTITIONS}
    # The log grows past it again: read, and the gauge back to 0.
    for tp in PARTITIONS:
        logs[tp].extend(FakeMessage(*tp, o, logs[tp][0].value()) for o in range(600, 1000))
    _run(daemon, lambda: daemon.positions == {tp: 1000 for tp in PARTITIONS})
    assert daemon.metrics.value("streamgmm_partitions_past_log_end") == 0 and not daemon.watch.past_the_end


def test_a_partition_read_again_from_below_the_groups_old_commit_drops_that_floor(tmp_path, monkeypatch):
    # The topic was made again and librdkafka reset to its start: a rewind sought back to the old
    # commit (past the new log; a Kafka broker then resets to the start again and the model
    # learns those messages twice).
    logs, group = _logs(), {tp: 900 for tp in PARTITIONS}
    consumer = Consumer(logs, group)
    daemon, processed = _daemon(tmp_path, "a", consumer, LoggedStateTopic(monkeypatch))
    daemon._on_assign(_assignment())
    consumer.positions = {tp: 0 for tp in PARTITIONS}  # auto.offset.reset to the new log's start
    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS})
    assert daemon._commits_at_assignment == {}


def test_with_scope_global_a_partition_new_to_the_model_is_not_behind_the_group(tmp_path, monkeypatch):
    # One model for all partitions: one it has not read yet is normal, not a state lost.
    logs, group = _logs(), {tp: 400 for tp in PARTITIONS}
    daemon = Daemon(_config(tmp_path, "g", scope="global"))
    daemon.source, daemon.sink = Consumer(logs, group), FakeSink()
    daemon.topic_store = daemon.checkpointer.topic_store = LoggedStateTopic(monkeypatch)
    daemon._on_assign(_assignment())
    assert daemon.metrics.value("streamgmm_state_behind_group_total") == 0


def test_latest_is_not_pinned_when_the_groups_commits_cannot_be_read(tmp_path):
    # A failed read of the group's commits is no absent commit: the log's end was committed over
    # the group's 100 and 500 messages a partition skipped (helper-36).
    logs, group = _logs(600), {tp: 100 for tp in PARTITIONS}
    consumer = Consumer(logs, group, reset="latest")
    consumer.committed_failures = 1
    daemon, processed = _daemon(tmp_path, "a", consumer, StateTopic({}))
    daemon._on_assign(_assignment())
    assert group == {tp: 100 for tp in PARTITIONS}
    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(100, 600)})


def test_latest_is_not_pinned_for_a_held_partition(tmp_path):
    # Held (its state unreadable at assignment) with no group commit: the pin committed the log's
    # end, and the retry then resumed there, past the state's offset 200 (helper-36).
    logs, group, records = _logs(600), {}, {}
    first, _ = _daemon(tmp_path, "a", Consumer({tp: log[:200] for tp, log in logs.items()}, group), StateTopic(records))
    first._on_assign(_assignment())
    _run(first, lambda: first.positions == {tp: 200 for tp in PARTITIONS})
    first._checkpoint()
    group.clear()  # the group's offsets expired (or a new group.id over the same state topic)
    consumer = Consumer(logs, group, reset="latest")
    daemon, processed = _daemon(tmp_path, "b", consumer, StateTopic(records, failures=1))
    daemon._on_assign(_assignment())
    assert group == {} and set(daemon.held.unrestored) == set(PARTITIONS)
    _run(daemon, lambda: daemon.positions == {tp: 600 for tp in PARTITIONS})
    assert processed == Counter({(tp, o): 1 for tp in PARTITIONS for o in range(200, 600)})


def test_with_latest_a_partition_the_cluster_had_not_at_the_start_is_read_from_its_first_message(tmp_path):
    # A topic a pattern matched later was pinned at its end: what was written to it before the
    # metadata refresh found it was skipped. One that existed at the start but was left unpinned
    # (its end not had in time) is still "latest" at a restart, not read from its start (helper-46).
    logs, group = _logs(300), {}
    consumer = Consumer(logs, group, reset="latest")
    ends = consumer.end_offset
    consumer.end_offset = lambda t, p, timeout=5.0, start=False: None if (t, p) == ("in", 1) else ends(t, p, timeout, start)
    daemon, processed = _daemon(tmp_path, "a", consumer, StateTopic({}))
    daemon._on_assign(_assignment())
    assert group == {("in", 0): 300}  # ("in", 1) is left to librdkafka: its end, uncommitted
    rng = np.random.default_rng(1)
    logs[("later", 0)] = [FakeMessage("later", 0, i, encode(x, "json")) for i, x in enumerate(rng.normal(size=(50, 3)))]
    daemon._on_assign(_assignment([*PARTITIONS, ("later", 0)]))  # (an eager rebalance: all again)
    assert group[("later", 0)] == 0  # its start committed, as a pin is
    _run(daemon, lambda: daemon.positions.get(("later", 0)) == 50)
    assert processed == Counter({(("later", 0), o): 1 for o in range(50)})
    restarted, processed = _daemon(tmp_path, "b", Consumer(logs, group, reset="latest"), StateTopic({}))
    restarted._on_assign(_assignment())
    assert group[("in", 1)] == 300 and not processed  # the restart's first assignment: its end


def test_with_latest_nothing_is_new_while_the_cluster_cannot_list_its_partitions(tmp_path):
    # A guess from this member's own first partitions, when list_topics timed out, took another
    # member's unpinned partition for new and read its backlog (helper-48).
    logs, group = _logs(300), {}
    consumer = Consumer(logs, group, reset="latest")
    consumer.partitions_now = lambda timeout: None
    daemon, processed = _daemon(tmp_path, "a", consumer, StateTopic({}))
    daemon._on_assign(_assignment([("in", 0)]))
    daemon._on_assign(_assignment())  # ("in", 1): another member's, never committed
    assert group == {("in", 0): 300, ("in", 1): 300}  # both at their end
    assert daemon._partitions_at_start is None  # asked again at the next assignment


def test_a_scan_of_every_key_says_other_programs_records_once_without_an_error_each(tmp_path, monkeypatch, caplog):
    # `inspect --topic` over a state topic another program also writes to logged an ERROR for each
    # of its records (helper-53); a damaged record of streamgmm's own is still an ERROR.
    good = pack(_state(tmp_path))
    log = [KeyedMessage(b"in/0", good), KeyedMessage(b"in/1", good[:-10])]
    log += [KeyedMessage(f"app-{i}".encode(), b'{"hello": 1}') for i in range(7)]
    monkeypatch.setattr("streamgmm.service.state.read_topic", lambda *args, **kwargs: iter(log))
    with caplog.at_level("WARNING"):
        found = TopicStateStore("streamgmm-state", {}, producer=None).load_many()
    assert set(found) == {"in/0"}
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "in/1" in errors[0] and "truncated" in errors[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["topic streamgmm-state: 7 key(s) hold no streamgmm state, only records of another program "
                        "(app-0, app-1, app-2, app-3, app-4, ...): left out"]


def test_inspect_with_the_daemons_config_reads_its_state_topic_with_its_security_settings(tmp_path, monkeypatch, capsys):
    # --bootstrap alone could not reach a SASL/TLS cluster, where scope: partition runs (helper-78).
    import json

    import yaml

    from streamgmm.cli.main import main

    seen = {}

    def read_topic(settings, topic, *args, **kwargs):
        seen.update(settings=settings, topic=topic)
        return iter([KeyedMessage(b"in/0", pack(_state(tmp_path)))])

    monkeypatch.setattr("streamgmm.service.state.read_topic", read_topic)
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": ["kafka-1:9093"], "security": {
            "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "streamgmm",
            "sasl.password": "secret"}},
        "input": {"format": "json", "dimension": 3},
        "model": {"scope": "partition"}, "checkpoint": {"topic": "streamgmm-state", "dir": str(tmp_path / "s")}}))
    assert main(["inspect", "--config", str(config), "--json"]) == 0
    assert seen["topic"] == "streamgmm-state"
    assert seen["settings"]["bootstrap.servers"] == "kafka-1:9093"
    assert seen["settings"]["sasl.password"] == "secret" and seen["settings"]["security.protocol"] == "SASL_SSL"
    assert set(json.loads(capsys.readouterr().out)) == {"in/0"}


def test_inspect_of_a_topic_on_an_unreachable_broker_says_so_in_a_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "streamgmm", "inspect", "--topic", "state", "--bootstrap",
                             "127.0.0.1:1", "--timeout", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "streamgmm: cannot read state topic state at 127.0.0.1:1:" in result.stderr
