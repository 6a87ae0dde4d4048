"""The daemon's decisions with an in-memory source and sink (no broker): rewinds after output
that failed for a passing reason, no rewind for a record refused for good, checkpoint back-off."""

import errno
import logging
import os
import re
import time

import numpy as np
import pytest
from confluent_kafka import KafkaError, TopicPartition

from streamgmm.detection.decode import encode
from streamgmm.service.checkpointer import Outcome
from streamgmm.service.config import config_from_dict
from streamgmm.service.daemon import Daemon
from fakes import FakeMessage, FakeSink


class FakeSource:
    def __init__(self):
        self.seeks, self.commits = [], []

    def seek(self, topic, partition, offset):
        self.seeks.append((topic, partition, offset))

    def committed(self, partitions, timeout=10.0):
        return {}

    wedged = False

    def commit(self, offsets, give_up=None):
        self.commits.append(dict(offsets))


def _fails(code, why):
    """A stand-in for a client call that raises the KafkaException librdkafka would."""
    from confluent_kafka import KafkaError, KafkaException

    def call(*args, **kwargs):
        raise KafkaException(KafkaError(code, why))

    return call


def _daemon(tmp_path):
    config = config_from_dict({
        "kafka": {"retry_backoff_initial_seconds": 0.01, "retry_backoff_max_seconds": 0.05},
        "input": {"format": "json", "dimension": 3},
        "model": {"n_components": 2, "covariance_type": "full", "warmup": 200},
        "checkpoint": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False},
    }, environ={})
    daemon = Daemon(config)
    daemon.source, daemon.sink = FakeSource(), FakeSink()
    daemon.assigned = {("in", 0)}
    return daemon


def _past_a_checkpoint(tmp_path, seed, more):
    """A daemon whose model was checkpointed and committed at offset 1000 and has learned
    ``more`` messages since."""
    rng = np.random.default_rng(seed)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    _feed(daemon, 1000, more, rng)
    return daemon


def _feed(daemon, start, n, rng):
    X = rng.normal(size=(n, 3))
    daemon._process({("in", 0): [FakeMessage("in", 0, start + i, encode(x, "json")) for i, x in enumerate(X)]})


def test_output_that_failed_for_a_passing_reason_rewinds_to_the_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    assert daemon.source.commits[-1] == {("in", 0): 1000}
    _feed(daemon, 1000, 500, rng)
    assert daemon.detector.n_valid == 1500
    daemon.sink.deliveries.transient = 2
    daemon._checkpoint()
    assert daemon._rewind_pending is not None and daemon.source.commits[-1] == {("in", 0): 1000}
    daemon._rewind()  # the loop's next turn
    # Back to the checkpoint: the model as it was at 1000 messages, the partition sought there.
    assert daemon.detector.n_valid == 1000 and daemon.source.seeks[-1] == ("in", 0, 1000)
    assert daemon.source.commits[-1] == {("in", 0): 1000} and daemon.sink.purged == 1
    assert daemon.metrics.value("streamgmm_rewinds_total") == 1


def test_a_record_refused_for_good_does_not_rewind(tmp_path):
    rng = np.random.default_rng(1)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon.sink.deliveries.permanent = 1  # counted and logged by the sink's callback
    daemon._checkpoint()
    assert daemon.source.seeks == [] and daemon.source.commits[-1] == {("in", 0): 1000}
    assert (daemon.metrics.value("streamgmm_rewinds_total") or 0) == 0


def test_rewinds_in_a_row_back_off(tmp_path):
    rng = np.random.default_rng(2)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    pauses = []
    for _ in range(4):
        _feed(daemon, 1000, 10, rng)
        daemon.sink.deliveries.transient = 1
        started = time.monotonic()
        daemon._checkpoint()
        daemon._rewind()
        pauses.append(time.monotonic() - started)
    assert daemon._rewinds_in_a_row == 4
    assert pauses[-1] >= 0.05 - 0.005 and pauses[0] < pauses[-1]  # 0.01, 0.02, 0.04, 0.05 s
    _feed(daemon, 1000, 10, rng)
    daemon._checkpoint()
    assert daemon._rewinds_in_a_row == 0


def test_checkpoint_failures_back_off_1_2_4_seconds(tmp_path):
    rng = np.random.default_rng(3)
    daemon = _daemon(tmp_path)
    clock = [100.0]
    daemon.checkpointer.clock = lambda: clock[0]
    (tmp_path / "state").write_text("a file where the directory should be")
    _feed(daemon, 0, 1000, rng)
    waits = []
    for _ in range(4):
        assert daemon.checkpointer.checkpoint(daemon.detectors, daemon.sink, daemon._commit, time.time()) \
            is Outcome.FAILED
        waits.append(daemon.checkpointer.retry_at - clock[0])
        clock[0] = daemon.checkpointer.retry_at - 0.01
        assert not daemon.checkpointer.due()  # not before it said
        clock[0] += 0.02
        assert daemon.checkpointer.due()
    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert daemon.source.commits == []  # nothing committed past the last good checkpoint


def test_the_default_self_sizing_model_runs_through_the_loop_and_its_metrics(tmp_path):
    # model.n_components: auto (the default) once sized the metrics with the string "auto".
    config = config_from_dict({"input": {"format": "json", "dimension": 3}, "model": {"warmup": 200},
                               "checkpoint": {"dir": str(tmp_path / "state")}, "metrics": {"enabled": False}},
                              environ={})
    daemon = Daemon(config)
    daemon.source, daemon.sink = FakeSource(), FakeSink()
    daemon.assigned = {("in", 0)}
    _feed(daemon, 0, 1000, np.random.default_rng(4))
    assert daemon.detector.ready and daemon.metrics.value("streamgmm_model_initialized") == 1
    assert daemon.metrics.value("streamgmm_component_weight", {"component": "0"}) > 0
    daemon._checkpoint()
    restored = Daemon(config)
    restored.restore()
    assert restored.detector.n_valid == 1000


def test_a_revoke_while_a_rewind_is_pending_checkpoints_nothing(tmp_path):
    daemon = _past_a_checkpoint(tmp_path, seed=6, more=300)
    daemon.sink.deliveries.transient = 1
    daemon._checkpoint()  # REWIND: the failed output's messages are in the model
    daemon._on_revoke([])  # e.g. the close at shutdown runs the revoke callback
    assert daemon.source.commits[-1] == {("in", 0): 1000}  # nothing committed past the failure
    daemon._aborting, daemon._rewind_pending = True, None
    daemon._on_revoke([])  # leaving on an error: no checkpoint either
    assert len(daemon.source.commits) == 1


def test_a_rewind_before_any_checkpoint_goes_back_to_the_first_offset_read(tmp_path):
    daemon = _daemon(tmp_path)
    _feed(daemon, 500, 400, np.random.default_rng(7))  # a partition first read at offset 500
    daemon._rewind_pending = "test"
    daemon._rewind()
    assert daemon.source.seeks[-1] == ("in", 0, 500) and daemon.detector.n_valid == 0


def test_a_failed_seek_leaves_the_rewind_pending(tmp_path):
    from confluent_kafka import KafkaError

    rng = np.random.default_rng(8)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()

    refuse = _fails(KafkaError._STATE, "Erroneous state")

    daemon.source.seek = refuse
    daemon._rewind_pending = "test"
    daemon._rewind()
    assert daemon._rewind_pending is not None


def test_a_refused_commit_is_made_again_at_the_hand_over(tmp_path):
    from confluent_kafka import KafkaError

    rng = np.random.default_rng(9)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    commit = daemon.source.commit

    refuse = _fails(KafkaError.COORDINATOR_NOT_AVAILABLE, "coordinator moving")

    daemon.source.commit = refuse
    daemon._checkpoint()  # written, but the group could not take the commit
    daemon.source.commit = commit
    daemon._on_revoke([])  # nothing new since: the hand-over commits the checkpoint's offsets
    assert daemon.source.commits == [{("in", 0): 1000}]


def test_a_commit_refused_because_the_group_moved_on_withdraws_the_checkpoint_and_unlearns(tmp_path):
    # A member stopped past its session timeout wakes, checkpoints and commits: the group refuses
    # (unknown member) and its partitions' new owners start from the last commit. The checkpoint
    # just written must not be what the model goes back to, or those messages are learned twice.
    from confluent_kafka import KafkaError

    daemon = _past_a_checkpoint(tmp_path, seed=12, more=400)
    commit = daemon.source.commit

    expired = _fails(KafkaError.UNKNOWN_MEMBER_ID, "Broker: Unknown member")

    daemon.source.commit = expired
    daemon._checkpoint()
    assert daemon._rewind_pending is not None
    assert len(list((tmp_path / "state").glob("checkpoint-*.sgmm"))) == 1  # the one committed
    daemon.source.commit = commit
    daemon._rewind()
    assert daemon.detector.n_valid == 1000 and daemon.source.seeks[-1] == ("in", 0, 1000)


def test_every_checkpoint_since_the_last_commit_is_withdrawn_when_the_group_has_moved_on(tmp_path):
    # Cut off from the coordinator past the session timeout but still fetching: commits fail
    # (coordinator not available), then the group says unknown member, or the partitions are
    # lost. The model must go back to the last checkpoint the group took, not the one before
    # the last.
    from confluent_kafka import KafkaError, TopicPartition

    for ending in ("refused", "lost"):
        rng = np.random.default_rng(13)
        daemon = _daemon(tmp_path / ending)
        _feed(daemon, 0, 1000, rng)
        daemon._checkpoint()  # taken by the group: 1000
        commit = daemon.source.commit

        unavailable = _fails(KafkaError.COORDINATOR_NOT_AVAILABLE, "no coordinator")

        expired = _fails(KafkaError.UNKNOWN_MEMBER_ID, "Broker: Unknown member")

        daemon.source.commit = unavailable
        _feed(daemon, 1000, 300, rng)
        daemon._checkpoint()  # written at 1300, not taken
        _feed(daemon, 1300, 300, rng)
        if ending == "refused":
            daemon.source.commit = expired
            daemon._checkpoint()  # written at 1600, refused: the member had left
        else:
            daemon._checkpoint()  # written at 1600, not taken
            daemon._on_lost([TopicPartition("in", 0)])
            daemon.assigned = frozenset({("in", 0)})  # assigned again
        daemon.source.commit = commit
        assert daemon._rewind_pending is not None
        daemon._rewind()
        assert daemon.detector.n_valid == 1000, ending
        assert daemon.source.seeks[-1] == ("in", 0, 1000), ending
        assert len(list((tmp_path / ending / "state").glob("checkpoint-*.sgmm.withdrawn"))) == 2


def test_scope_partition_counts_an_assigned_partition_without_a_model_as_not_warm():
    from types import SimpleNamespace

    from streamgmm.service.metrics import Metrics

    metrics = Metrics()
    metrics.observe_partition_models({"in/0": SimpleNamespace(is_initialized=True, n_seen_=10)}, {"in/0", "in/1"})
    assert metrics.value("streamgmm_model_initialized") == 0
    metrics.observe_partition_models({"in/0": SimpleNamespace(is_initialized=True, n_seen_=10)}, {"in/0"})
    assert metrics.value("streamgmm_model_initialized") == 1


def test_the_threshold_gauge_is_nan_while_the_model_has_none():
    # 0.0 before the warm-up read as a threshold on a dashboard (helper-67), and a model started
    # afresh kept showing the old model's (review).
    import math
    from types import SimpleNamespace

    from streamgmm.detection.detector import BatchResult
    from streamgmm.service.metrics import Metrics

    metrics = Metrics()
    assert math.isnan(metrics.value("streamgmm_threshold_log_density"))
    model = SimpleNamespace(is_initialized=True, n_seen_=10, weights_=[1.0])
    warm = SimpleNamespace(threshold=SimpleNamespace(value=-12.5), n_updates=0, model=model)
    metrics.observe_batch(BatchResult(n_records=0), warm, updates_before=0, seconds=0.0, partition_key="in/0")
    assert metrics.value("streamgmm_threshold_log_density") == -12.5
    afresh = SimpleNamespace(threshold=SimpleNamespace(value=None), n_updates=0, model=model)
    metrics.observe_batch(BatchResult(n_records=0), afresh, updates_before=0, seconds=0.0, partition_key="in/0")
    assert math.isnan(metrics.value("streamgmm_threshold_log_density"))


def test_a_checkpoint_that_fails_at_a_revoke_unlearns_what_the_next_owner_reads_again(tmp_path):
    from streamgmm.service.state import CheckpointError

    # 500 learned, not checkpointed: the group's commit stays at 1000
    daemon = _past_a_checkpoint(tmp_path, seed=10, more=500)

    def full_disk(key, state, protect=None):
        raise CheckpointError("No space left on device")

    daemon.local.write = full_disk
    daemon._on_revoke([])
    assert daemon.source.commits == [{("in", 0): 1000}] and daemon._rewind_pending is not None
    daemon._rewind()
    assert daemon.detector.n_valid == 1000 and daemon.source.seeks[-1] == ("in", 0, 1000)


def test_a_rewind_never_goes_behind_the_commit_the_partition_was_assigned_at(tmp_path):
    from confluent_kafka import KafkaError, TopicPartition

    rng = np.random.default_rng(11)
    daemon = _daemon(tmp_path)
    daemon.source.assign = lambda partitions: None
    _feed(daemon, 0, 500, rng)
    daemon._checkpoint()  # our checkpoint: 500
    daemon._on_revoke([TopicPartition("in", 0)])
    daemon.source.committed = lambda partitions, timeout=10.0: {("in", 0): 900}  # another member's
    daemon._on_assign([TopicPartition("in", 0)])
    _feed(daemon, 900, 100, rng)

    unreachable = _fails(KafkaError._TIMED_OUT, "coordinator unreachable")

    daemon.source.committed = unreachable
    daemon._rewind_pending = "test"
    daemon._rewind()  # the model goes back to its checkpoint (500); 500..899 are the other member's
    assert daemon.source.seeks[-1] == ("in", 0, 900) and daemon.detector.offsets[("in", 0)] == 900


def test_with_nothing_assigned_readiness_says_whether_kafka_is_unreachable_or_the_input_topic_missing(tmp_path):
    from confluent_kafka import KafkaError

    daemon = _daemon(tmp_path)
    daemon.assigned = frozenset()
    daemon.source.poll = lambda n, timeout: {}
    daemon.source.cached_watermarks = lambda assigned: {}
    daemon.source.unavailable = lambda topics, timeout: {"features": "does not exist: create it or fix "
                                                                     "kafka.input_topics"}
    daemon._turn()
    assert daemon.readiness()[1] == "input topic features does not exist: create it or fix kafka.input_topics"

    unreachable = _fails(KafkaError._TRANSPORT, "Connection refused")

    daemon.source.unavailable = unreachable
    daemon._turn()  # asked again only after a while
    assert "input topic" in daemon.readiness()[1]
    daemon.watch._unassigned_checked -= 60.0
    daemon._turn()
    assert daemon.readiness()[1].startswith("cannot reach Kafka at 127.0.0.1:9092 (")
    daemon.source.unavailable = lambda topics, timeout: {}
    daemon.watch._unassigned_checked -= 60.0
    daemon._turn()  # joining, or a standby member
    assert re.fullmatch(r"no partitions assigned for \d+ s \(a standby member of the group, or joining; a group "
                        r"stuck joining shows here for long: kafka-consumer-groups --describe --group \S+\)",
                        daemon.readiness()[1]), daemon.readiness()[1]


def test_an_input_topic_missing_beside_one_assigned_is_said_and_its_return_too(tmp_path, caplog):
    # With partitions of another input topic assigned, a missing one was said once at start and
    # never again; /readyz said ready (helper-35).
    config = config_from_dict({"kafka": {"input_topics": ["in", "later"]}, "input": {"format": "json", "dimension": 3},
                               "checkpoint": {"dir": str(tmp_path / "state")}, "metrics": {"enabled": False}},
                              environ={})
    daemon = Daemon(config)
    daemon.source, daemon.sink = FakeSource(), FakeSink()
    daemon.assigned = frozenset({("in", 0)})
    daemon.source.poll = lambda n, timeout: {}
    daemon.source.cached_watermarks = lambda assigned: {}
    asked = []
    daemon.source.unavailable = lambda topics, timeout: asked.append(topics) or {
        "later": "does not exist: create it or fix kafka.input_topics"}
    with caplog.at_level("INFO"):
        daemon._turn()
        daemon._turn()  # asked again only after a while
        assert asked == [["later"]]
        assert daemon.readiness()[2]["later"] == "input topic does not exist: create it or fix kafka.input_topics"
        assert caplog.text.count("input topic later does not exist") == 1
        daemon.source.unavailable = lambda topics, timeout: {}
        daemon.watch._inputs_checked -= 60.0
        daemon._turn()
    assert "later" not in daemon.readiness()[2]
    assert "input topic later can be read now" in caplog.text
    # Assigned before the next question (the usual case): that is said too (helper-38: the line
    # never came, the assignment cleared the topic first).
    daemon.source.unavailable = lambda topics, timeout: {"later": "does not exist"}
    daemon.watch._inputs_checked -= 60.0
    daemon._turn()
    daemon.assigned = frozenset({("in", 0), ("later", 0)})
    with caplog.at_level("INFO"):
        daemon._turn()
    assert "input topic later is read now" in caplog.text and "later" not in daemon.readiness()[2]


def test_a_kafka_batch_gives_the_same_sources_as_its_records():
    from streamgmm.service.kafka import as_batch

    messages = [FakeMessage("in", 1, 10 + i, b"[1,2,3]") for i in range(5)]
    batch = as_batch({("in", 1): messages})
    indices = [0, 3, 4]
    records = [batch.record(i) for i in indices]
    assert batch.sources(indices) == ([r.topic for r in records], [r.partition for r in records],
                                      [r.offset for r in records], [r.key for r in records])


def test_produce_errors_and_dropped_records_count_different_things(tmp_path):
    from streamgmm.detection.records import OutputRecord

    rng = np.random.default_rng(10)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    # Refused for good: dropped (and logged), not a produce error, no rewind.
    daemon._on_output_refused(OutputRecord("anomalies", b"x" * 10, None, [], ("in", 0, 7)), "Message size too large")
    daemon._checkpoint()
    assert daemon.metrics.value("streamgmm_output_records_dropped_total") == 1
    assert daemon.metrics.value("streamgmm_produce_errors_total") == 0
    # Failed for a passing reason: produce errors, counted once by the checkpoint that rewinds.
    _feed(daemon, 1000, 100, rng)
    daemon.sink.deliveries.transient = 2
    daemon._checkpoint()
    daemon._rewind()
    assert daemon.metrics.value("streamgmm_produce_errors_total") == 2
    # ... or by a rewind that comes first (partitions lost to the group).
    _feed(daemon, 1000, 100, rng)
    daemon.sink.deliveries.transient = 3
    daemon._on_lost([])
    daemon._rewind()
    assert daemon.metrics.value("streamgmm_produce_errors_total") == 5
    assert daemon.metrics.value("streamgmm_output_records_dropped_total") == 1


def test_a_committed_offset_the_group_could_not_read_is_an_error_not_a_missing_commit():
    """confluent-kafka reports a failed read per partition (TopicPartition.error); leaving that
    partition out would make it look never committed, and resume it behind its commit."""
    import pytest
    from types import SimpleNamespace

    from confluent_kafka import KafkaError, KafkaException

    from streamgmm.service.kafka import KafkaSource

    def found(error):
        return [SimpleNamespace(topic="in", partition=0, offset=7, error=None),
                SimpleNamespace(topic="in", partition=1, offset=-1001, error=None),
                SimpleNamespace(topic="in", partition=2, offset=-1001, error=error)]

    source = object.__new__(KafkaSource)  # no client: committed() only asks its consumer
    source.consumer = SimpleNamespace(committed=lambda partitions, timeout: found(None))
    assert source.committed([]) == {("in", 0): 7}  # partition 1 has no commit yet
    source.consumer = SimpleNamespace(
        committed=lambda partitions, timeout: found(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE)))
    with pytest.raises(KafkaException):
        source.committed([])


def test_scope_partition_is_initialized_when_every_model_is_and_drops_series_of_partitions_gone():
    # One partition that never warms up (only invalid messages) must keep the instance not
    # initialized: the last partition processed decided before, flipping the gauge at each batch.
    from types import SimpleNamespace

    from streamgmm.service.metrics import Metrics

    metrics = Metrics()
    warm, cold = SimpleNamespace(is_initialized=True, n_seen_=3000), SimpleNamespace(is_initialized=False, n_seen_=0)
    for key, model in (("in/0", warm), ("in/1", cold)):
        metrics.observe_batch(SimpleNamespace(n_records=0, n_valid=0, invalid_reasons={}, dead_letters=[],
                                              anomalies=[], n_learned=0, n_flagged_learned=0, log_density=np.empty(0),
                                              latencies_seconds=np.empty(0), n_future_timestamps=0),
                              SimpleNamespace(n_updates=0, threshold=SimpleNamespace(value=None), model=model),
                              0, 0.01, partition_key=key)
    metrics.observe_partition_models({"in/0": warm, "in/1": cold})
    assert metrics.value("streamgmm_model_initialized") == 0
    assert metrics.value("streamgmm_model_points_seen") == 3000
    metrics.observe_partition_models({"in/0": warm})  # in/1 handed away
    assert metrics.value("streamgmm_model_initialized") == 1
    assert metrics.value("streamgmm_partition_model_points_seen", {"model": "in/1"}) is None
    assert metrics.value("streamgmm_partition_model_points_seen", {"model": "in/0"}) == 3000
    # A partition assigned with a restored model has its series before its first batch.
    metrics.observe_partition_models({"in/0": warm, "in/2": SimpleNamespace(is_initialized=True, n_seen_=700)})
    assert metrics.value("streamgmm_partition_model_points_seen", {"model": "in/2"}) == 700
    assert metrics.value("streamgmm_partition_model_initialized", {"model": "in/2"}) == 1
    # Another model under the same key (a rewind reloaded it): its series follow, without a batch.
    metrics.observe_partition_models({"in/0": warm, "in/2": SimpleNamespace(is_initialized=False, n_seen_=0)})
    assert metrics.value("streamgmm_partition_model_points_seen", {"model": "in/2"}) == 0
    assert metrics.value("streamgmm_partition_model_initialized", {"model": "in/2"}) == 0


def test_a_stop_whose_last_checkpoint_fails_is_not_clean_and_says_what_the_next_start_does(tmp_path, caplog):
    # It said "scoring goes on ... retrying in 1 s" and the process exited 0.
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 300, np.random.default_rng(5))
    (tmp_path / "state").write_text("a file where the directory should be")
    with caplog.at_level("ERROR"):
        daemon._last_checkpoint()
    assert daemon.clean_stop is False
    assert "the checkpoint at shutdown failed" in caplog.text and "read and learned again at the next start" in caplog.text
    assert "retrying" not in caplog.text


def test_a_stop_with_output_to_send_again_is_not_clean(tmp_path, caplog):
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 300, np.random.default_rng(6))
    daemon._rewind_pending = "output records were not acknowledged"
    with caplog.at_level("ERROR"):
        daemon._last_checkpoint()
    assert daemon.clean_stop is False and "stopping without a checkpoint" in caplog.text


def test_a_stop_whose_last_checkpoint_is_written_is_clean(tmp_path):
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 300, np.random.default_rng(7))
    daemon._last_checkpoint()
    assert daemon.clean_stop is True and daemon.source.commits[-1] == {("in", 0): 300}


def test_an_assignment_says_which_of_checkpoint_and_group_commit_it_resumes_at():
    # scope global resumed at a group commit moved 1,000 ahead (or back) without a word.
    from streamgmm.service.daemon import _why_there

    assert _why_there(2500, 3000).startswith(" (the group's commit; the model's checkpoint is at 2500: 500 message")
    assert _why_there(2000, 0).startswith(" (the model's checkpoint; the group's commit is behind it at 0")
    assert _why_there(2000, 2000) == _why_there(5, None) == _why_there(None, None) == ""
    # A fall-back to an older checkpoint without the partition resumed at the group's commit with
    # a plain "assigned ... at 4502" (helper-35).
    assert _why_there(None, 4502) == " (the group's commit; the model's checkpoint has no offset for it)"


def test_checkpoint_files_that_do_not_read_back_are_counted_and_said(tmp_path, caplog):
    # Every checkpoint overwritten with random bytes: a new model, with one ERROR per file and
    # no metric before (helper-35).
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 300, np.random.default_rng(7))
    daemon._last_checkpoint()
    for path in (tmp_path / "state").glob("checkpoint-*.sgmm"):
        path.write_bytes(np.random.default_rng(1).bytes(500))
    fresh = _daemon(tmp_path)
    with caplog.at_level("ERROR"):
        fresh.restore()
    assert fresh.metrics.value("streamgmm_checkpoints_unreadable_total") == 1
    assert "reads back intact: its model starts afresh" in caplog.text


def test_a_newest_checkpoint_file_that_cannot_be_restored_gives_way_to_the_one_before(tmp_path, caplog):
    # A file with a valid checksum but content this streamgmm cannot take (written by a broken
    # tool, or another program's JSON packed alike) stopped the daemon with exit 2 while the file
    # before it was good: now passed over like a corrupt file, counted and said.
    from streamgmm.service.daemon import StartupError
    from streamgmm.service.state import CheckpointStore

    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, np.random.default_rng(3))
    daemon._checkpoint()
    store = CheckpointStore(tmp_path / "state")
    store.write({"kind": "streamgmm-detector", "offsets": {"in": {"0": 2000}}})
    fresh = _daemon(tmp_path)
    with caplog.at_level("ERROR"):
        fresh.restore()
    assert fresh.detectors["global"].n_valid == daemon.detectors["global"].n_valid == 1000
    assert fresh.metrics.value("streamgmm_checkpoints_unreadable_total") == 1
    assert "it cannot be restored (its state record is malformed (KeyError: 'input')" in caplog.text
    assert "falling back to the previous one" in caplog.text

    # Only files this streamgmm cannot restore: the newest says why, at start (exit 2).
    for path in store.paths()[:-1]:
        path.unlink()
    with pytest.raises(StartupError, match=re.escape("its state record is malformed (KeyError: 'input')")):
        _daemon(tmp_path).restore()


def test_the_end_of_the_warm_up_is_logged_with_the_model_it_made(tmp_path, caplog):
    # Nothing said when the warm-up ended or what it chose; only `inspect` did.
    daemon = _daemon(tmp_path)
    with caplog.at_level("INFO"):
        _feed(daemon, 0, 150, np.random.default_rng(8))
        assert "warm-up done" not in caplog.text
        _feed(daemon, 150, 100, np.random.default_rng(9))
    assert re.search(r"global: warm-up done on 200 points in [0-9.]+ s: 2 component\(s\), full covariances "
                     r"\(weights 0\.\d+, 0\.\d+\)", caplog.text), caplog.text
    assert caplog.text.count("warm-up done") == 1


def test_a_batch_mostly_dead_lettered_is_a_warning_at_most_once_a_minute(tmp_path, caplog):
    # A member configured with the wrong dimension dead-lettered every message with no WARNING.
    daemon = _daemon(tmp_path)
    bad = [FakeMessage("in", 0, i, encode(x, "json")) for i, x in enumerate(np.ones((50, 4)))]
    with caplog.at_level("WARNING"):
        daemon._process({("in", 0): bad})
        daemon._process({("in", 0): bad})
    assert caplog.text.count("50 of 50 messages of a batch were dead-lettered (wrong_dimension 50; e.g. "
                             "wrong_dimension: got 4 values, expected 3)") == 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        _feed(daemon, 100, 50, np.random.default_rng(10))
    assert "dead-lettered" not in caplog.text


def test_a_first_checkpoint_the_group_refuses_is_withdrawn_and_the_model_starts_afresh(tmp_path):
    # A member expired before its first commit (a hung broker during a hand-over) kept that
    # checkpoint, "no earlier valid one is left: they stay": the partitions' next owner read the
    # same messages from the group's commit, and 9,758 were learned by two models (helper-33).
    from confluent_kafka import KafkaError

    rng = np.random.default_rng(13)
    daemon = _daemon(tmp_path)
    daemon.held.saw(("in", 0), 0)  # where this process started reading
    _feed(daemon, 0, 600, rng)
    daemon.source.commit = _fails(KafkaError.UNKNOWN_MEMBER_ID, "Broker: Unknown member")
    daemon._checkpoint()
    assert daemon._rewind_pending is not None
    assert not list((tmp_path / "state").glob("checkpoint-*.sgmm"))  # withdrawn, not kept
    assert list((tmp_path / "state").glob("checkpoint-*.sgmm.withdrawn"))
    daemon._rewind()
    assert daemon.detector.n_valid == 0 and daemon.source.seeks[-1] == ("in", 0, 0)


def test_a_checkpoint_offset_the_group_has_no_commit_for_is_said(tmp_path, caplog):
    # The broker lost its data and the group's commits (or the topic was made again): resumed at
    # the checkpoint's 1,000, the new log's first 1,000 messages were skipped without a word
    # (helper-39).
    from confluent_kafka import TopicPartition

    rng = np.random.default_rng(12)
    daemon = _daemon(tmp_path)
    daemon.source.assign = lambda partitions: None
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    daemon._on_revoke([TopicPartition("in", 0)])
    daemon.source.committed = lambda partitions, timeout=10.0: {}  # read, and none there
    with caplog.at_level("WARNING"):
        daemon._on_assign([TopicPartition("in", 0)])
    assert "in/0: the model's checkpoint read it up to offset 1000, but the group has no commit" in caplog.text
    # ... and counted, for an alert: four WARNING lines were all there was of 15,071 messages
    # skipped after the broker lost its data (helper-49).
    assert daemon.metrics.resumed_without_commit._value.get() == 1


def test_a_loop_that_has_not_polled_for_a_while_is_not_ready(tmp_path):
    # Blocked in a checkpoint's flush to a broker that hung (scope partition, state topic),
    # /readyz said "8 partitions assigned, models ready" for 30 s while the group had dropped
    # the member (helper-39).
    rng = np.random.default_rng(13)
    daemon = _daemon(tmp_path)
    daemon.started = True
    _feed(daemon, 0, 1000, rng)
    assert daemon.readiness()[0]
    daemon._last_poll -= 15.0
    ready, why, _ = daemon.readiness()
    assert not ready and why.startswith("the loop has not polled Kafka for 15 s")


def test_the_warm_up_of_a_backlog_gathers_every_partition_first(tmp_path):
    # A backlog's poll returns one partition's fetch after another: with a regime per partition
    # the global model warmed up on partition 0 alone and flagged 15,005 of 20,000 normal
    # messages of the others (helper-43).
    rng = np.random.default_rng(14)
    daemon = _daemon(tmp_path)
    daemon.assigned = frozenset(("in", p) for p in range(4))
    centres = rng.normal(scale=10.0, size=(2, 3))  # partitions 0 and 2 in one regime, 1 and 3 in another
    queue = [{("in", p): [FakeMessage("in", p, i, encode(centres[p % 2] + rng.normal(size=3), "json"))
                          for i in range(start, start + 600)]}
             for p in range(4) for start in (0, 600)]  # all of partition 0 first, then 1, ...
    daemon.source.poll = lambda n, timeout: queue.pop(0) if queue else {}
    daemon.source.cached_watermarks = lambda assigned: {}
    daemon.source.unavailable = lambda topics, timeout: {}
    for _ in range(10):
        daemon._turn()
    assert daemon.detector.n_valid == 4800
    assert daemon.detector.n_anomalies <= 25, f"{daemon.detector.n_anomalies} of 4,800 normal messages flagged"  # 200 before


def _a_daemon_that_adopts_a_shift(tmp_path):
    """(config, daemon, X): a daemon that adopts quickly, and 3,000 points then 3,000 moved 40 sd."""
    config = config_from_dict({
        "input": {"format": "json", "dimension": 3},
        "model": {"n_components": 2, "covariance_type": "full", "warmup": 200},
        "threshold": {"quantile": 0.01, "adopt_after": 300, "adopt_window": 100},
        "checkpoint": {"dir": str(tmp_path / "state")}, "metrics": {"enabled": False},
    }, environ={})
    daemon = Daemon(config)
    daemon.source, daemon.sink = FakeSource(), FakeSink()
    daemon.assigned = {("in", 0)}
    rng = np.random.default_rng(5)
    return config, daemon, np.concatenate([rng.normal(size=(3000, 3)), rng.normal(size=(3000, 3)) + 40.0])


def test_an_adoption_is_said_in_the_log_when_it_starts_and_when_it_ends(tmp_path, caplog):
    # 838 outliers in a row went unflagged and `inspect` showed a new component, with nothing in
    # the log to say the model had taken them for a new regime (helper-44).
    config, daemon, X = _a_daemon_that_adopts_a_shift(tmp_path)
    restored_text = None
    with caplog.at_level("INFO"):
        for start in range(0, len(X), 100):
            daemon._process({("in", 0): [FakeMessage("in", 0, start + i, encode(x, "json"))
                                         for i, x in enumerate(X[start:start + 100])]})
            if daemon.detector.adopting and restored_text is None:  # a restart in the middle of it says so too
                assert caplog.text.count("taken as a new regime") == 1
                daemon._checkpoint()
                caplog.clear()
                Daemon(config).restore()
                restored_text = caplog.text
    assert "restored while taking a new regime" in restored_text
    assert "taken as a new regime" not in caplog.text and "the new regime is learned" in caplog.text


def test_an_adoption_that_starts_and_ends_inside_one_batch_is_said_both_times(tmp_path, caplog):
    # A backlog is decided in steps within one batch; a look at the detector before and after
    # the batch saw no change and logged nothing.
    _, daemon, X = _a_daemon_that_adopts_a_shift(tmp_path)
    with caplog.at_level("INFO"):
        daemon._process({("in", 0): [FakeMessage("in", 0, i, encode(x, "json")) for i, x in enumerate(X)]})
    assert not daemon.detector.adopting
    assert caplog.text.count("taken as a new regime") == 1 and caplog.text.count("the new regime is learned") == 1


def test_messages_stamped_in_the_future_or_decades_ago_are_said_and_kept_out_of_the_latency(tmp_path, caplog):
    # 1,000 messages an hour ahead went into the lowest latency bucket as 0, and 1,000 stamped 25
    # years ago made the histogram's sum 7.9e11 s, with nothing in the log (helper-49).
    daemon = _daemon(tmp_path)
    rng = np.random.default_rng(4)
    now_ms = int(time.time() * 1000)
    _feed(daemon, 0, 300, rng)  # warm
    timed_before = int(daemon.metrics.latency._counts.sum())
    ahead = [FakeMessage("in", 0, 300 + i, encode(rng.normal(size=3), "json"), timestamp_ms=now_ms + 3_600_000)
             for i in range(100)]
    with caplog.at_level("WARNING"):
        daemon._process({("in", 0): ahead})
    assert daemon.metrics.future_timestamps._value.get() == 100
    assert int(daemon.metrics.latency._counts.sum()) == timed_before
    assert "100 message(s) of a batch of in/0 are stamped up to 3600 s after they were decided" in caplog.text
    daemon.watch._warned_at.clear()  # (at most once a minute)
    old = [FakeMessage("in", 0, 400 + i, encode(rng.normal(size=3), "json"),
                       timestamp_ms=now_ms - 25 * 365 * 86_400_000) for i in range(100)]
    with caplog.at_level("WARNING"):
        daemon._process({("in", 0): old})
    assert "holds messages stamped 9125" in caplog.text and "days before they were decided" in caplog.text


def test_a_start_while_the_checkpoint_disk_is_full_goes_on_and_checkpoints_once_there_is_space(tmp_path, monkeypatch,
                                                                                                 caplog):
    # A restart while the disk was full exited 2 ("not writable: No space left on device"), and
    # systemd (RestartPreventExitStatus=2) left the unit stopped for good, where a running daemon
    # rides the same disk out (helper-52).
    from streamgmm.service import state

    real_write = state.write_atomically
    full = {"on": True}

    def write(path, data, *args, **kwargs):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, data, *args, **kwargs)

    monkeypatch.setattr(state, "write_atomically", write)
    daemon = _daemon(tmp_path)
    with caplog.at_level(logging.ERROR):
        daemon.start_up()  # no StartupError
    assert "has no space left: No space left on device; free space on its disk" in caplog.text
    assert "starting anyway" in caplog.text and (tmp_path / "state" / ".lock").exists()
    _feed(daemon, 0, 300, np.random.default_rng(0))
    assert daemon._checkpoint() is Outcome.FAILED  # still full: retried later, nothing committed
    assert daemon.source.commits == []
    ready, words, _ = daemon.readiness()
    # Nothing written since the start: not "the last written N s ago", N the time since the start
    # (helper-63: said of a checkpoint written 28 s before, by the process killed then).
    assert ready and "models ready; checkpoints failing (1 in a row, none written since this process started" in words
    full["on"] = False
    daemon.checkpointer.retry_at = 0.0  # (the back-off is over)
    with caplog.at_level(logging.INFO):
        assert daemon._checkpoint() is Outcome.WRITTEN and daemon.source.commits == [{("in", 0): 300}]
    assert "after 1 failed attempt" in caplog.text and daemon.readiness()[1].endswith("models ready")


def test_a_rewind_whose_seek_back_fails_is_counted_once(tmp_path):
    # The seek is tried again next turn as the same rewind: counting it again made three seek
    # failures look like three rewinds, enough for StreamgmmRewinding (review, helper-54).
    from confluent_kafka import KafkaError, KafkaException

    rng = np.random.default_rng(7)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    _feed(daemon, 1000, 10, rng)
    daemon.sink.deliveries.transient = 1
    daemon._checkpoint()
    seek = daemon.source.seek
    failures = [KafkaException(KafkaError(KafkaError._STATE))] * 2

    def flaky_seek(topic, partition, offset):
        if failures:
            raise failures.pop()
        seek(topic, partition, offset)

    daemon.source.seek = flaky_seek
    for _ in range(3):
        daemon._rewind()
        if daemon._rewind_pending is None:
            break
    assert daemon._rewind_pending is None and daemon.source.seeks[-1] == ("in", 0, 1000)
    assert daemon.metrics.value("streamgmm_rewinds_total") == 1


def test_a_new_checkpoint_dir_on_a_full_disk_waits_for_space_instead_of_exiting_2(tmp_path, monkeypatch, caplog):
    # Its lock file could not be made: "cannot open .lock: No space left on device; ... chown -R",
    # exit 2, and systemd left the unit down for good (review, helper-54).
    from streamgmm.service import daemon as daemon_module, state

    monkeypatch.setattr(daemon_module, "LOCK_RETRY_SECONDS", 0.01)
    real_open, full = open, [2]

    def open_on_a_full_disk(path, *args, **kwargs):
        if str(path).endswith(".lock") and full[0]:
            full[0] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(state, "open", open_on_a_full_disk, raising=False)
    daemon = _daemon(tmp_path)
    with caplog.at_level(logging.ERROR):
        daemon.start_up()
    assert full == [0] and "No space left on device; free space on its disk" in caplog.text
    assert "waiting for space" in caplog.text and daemon.local._lock is not None


def test_with_a_state_topic_a_checkpoint_dir_without_space_for_its_lock_does_not_hold_up_the_start(
        tmp_path, monkeypatch, caplog):
    # The files are then a copy (the state topic holds the partition models): the start goes on
    # without their lock, as it did before the wait for space came in.
    from streamgmm.service import daemon as daemon_module, state

    monkeypatch.setattr(daemon_module, "LOCK_RETRY_SECONDS", 60.0)  # a wait would show
    real_open = open

    def open_on_a_full_disk(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(state, "open", open_on_a_full_disk, raising=False)
    config = config_from_dict({
        "input": {"format": "json", "dimension": 3},
        "model": {"n_components": 2, "covariance_type": "full", "warmup": 200, "scope": "partition"},
        "checkpoint": {"dir": str(tmp_path / "state"), "topic": "states"},
        "metrics": {"enabled": False},
    }, environ={})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        Daemon(config).start_up()
    assert time.monotonic() - started < 30.0 and "going on: the state topic states holds the models" in caplog.text


@pytest.mark.parametrize("before, after", [("global", "partition"), ("partition", "global")])
def test_a_change_of_model_scope_over_checkpoints_of_the_other_says_they_are_not_read(tmp_path, caplog, before, after):
    # global -> partition with the global checkpoint in place: each partition warmed up anew,
    # without alerts, said at INFO as "the model's checkpoint has no offset for it" (helper-72).
    from streamgmm.detection.records import InputRecord
    from streamgmm.service.metrics import Metrics
    from streamgmm.service.models import Models
    from streamgmm.service.state import LocalStateStore

    def config(scope):
        return config_from_dict({"input": {"format": "json", "dimension": 3},
                                 "model": {"n_components": 2, "warmup": 200, "scope": scope},
                                 "checkpoint": {"dir": str(tmp_path / "state")}, "metrics": {"enabled": False}},
                                environ={})

    local = LocalStateStore(tmp_path / "state", keep=3)
    writer = Models(config(before), local, Metrics())
    key = "global" if before == "global" else "in/0"
    detector = writer.get(key)
    X = np.random.default_rng(3).normal(size=(300, 3))
    detector.process([InputRecord("in", 0, i, encode(x, "json")) for i, x in enumerate(X)], now=0.0)
    local.write(key, detector.state(0.0))
    with caplog.at_level(logging.WARNING, logger="streamgmm.service.models"):
        Models(config(after), local, Metrics()).restore()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"model.scope: {before}" in line and f"set model.scope: {before}" in line for line in said), said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamgmm.service.models"):
        Models(config(before), local, Metrics()).restore()  # the same scope: nothing to say
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # Checkpoints of both kinds, this scope's the newer (the switch made before, the old files
    # left): nothing either.
    other = Models(config(after), local, Metrics())
    other_key = "in/0" if after == "partition" else "global"
    other.get(other_key).process([InputRecord("in", 0, i, encode(x, "json")) for i, x in enumerate(X)], now=0.0)
    newer = local.write(other_key, other.get(other_key).state(0.0))
    os.utime(newer, (time.time() + 10, time.time() + 10))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamgmm.service.models"):
        Models(config(after), local, Metrics()).restore()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # Switched back: this scope's own checkpoints are the older, and would be restored (helper-76).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamgmm.service.models"):
        Models(config(before), local, Metrics()).restore()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"set model.scope: {after}" in line and "older checkpoint" in line for line in said), said


def test_a_restored_model_shows_its_threshold_before_any_batch(tmp_path):
    # The gauge read NaN after a restart until the first batch: an idle stream showed no threshold
    # though the model had one (helper-78).
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, np.random.default_rng(16))
    daemon._checkpoint()
    value = daemon.detectors["global"].threshold.value
    assert value is not None
    fresh = _daemon(tmp_path)
    fresh.restore()
    assert fresh.metrics.value("streamgmm_threshold_log_density") == pytest.approx(value)


def test_scope_partition_with_a_partition_that_gets_no_message_is_ready_and_initialized(tmp_path):
    # Keyed partitioning leaves partitions without traffic: each kept /readyz at 503 ("warming
    # up q12/6 0/400") and StreamgmmNotReady firing for good (helper-78).  One that gets only
    # invalid messages still counts as warming: its model never warms up.
    config = config_from_dict({
        "input": {"format": "json", "dimension": 3},
        "model": {"n_components": 2, "covariance_type": "full", "warmup": 200, "scope": "partition"},
        "checkpoint": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False},
    }, environ={})
    daemon = Daemon(config)
    daemon.source, daemon.sink = FakeSource(), FakeSink()
    daemon.assigned = {("in", 0), ("in", 1)}
    daemon._restore_partitions(sorted(daemon.assigned), timeout=1.0)  # as an assignment does: empty models
    ready, why, details = daemon.readiness()
    assert not ready and why.startswith("warming up in/0 0/200, in/1 0/200")  # logs' ends not yet known
    daemon._loop_watermarks = {("in", 0): (0, 0), ("in", 1): (0, 0)}
    ready, why, details = daemon.readiness()
    assert not ready and why.startswith("no message yet on any of the 2 partition(s)"), why
    daemon._loop_watermarks = {("in", 0): (0, 300), ("in", 1): (0, 0)}
    ready, why, details = daemon.readiness()
    assert not ready and why == "warming up in/0 0/200", why  # in/0 has a backlog, in/1 is empty
    X = np.random.default_rng(17).normal(size=(300, 3))
    daemon._process({("in", 0): [FakeMessage("in", 0, i, encode(x, "json")) for i, x in enumerate(X)]})
    daemon._observe_partition_models()
    daemon.positions = daemon._positions()
    ready, why, details = daemon.readiness()
    assert ready and why == "2 partition(s) assigned, models ready (1 idle: no message yet)", why
    assert details["in/1"].startswith("idle: no message yet")
    assert daemon.metrics.value("streamgmm_model_initialized") == 1
    # A backlog not yet fetched is not idle: a backlog's poll returns one partition after another.
    daemon._loop_watermarks = {("in", 0): (0, 300), ("in", 1): (0, 5)}
    ready, why, _ = daemon.readiness()
    assert not ready and why.startswith("warming up in/1 0/200"), why
    daemon._observe_partition_models()
    assert daemon.metrics.value("streamgmm_model_initialized") == 0
    daemon._process({("in", 1): [FakeMessage("in", 1, i, b"not json") for i in range(5)]})
    daemon._observe_partition_models()
    ready, why, _ = daemon.readiness()
    assert not ready and why.startswith("warming up in/1 0/200"), why
    assert daemon.metrics.value("streamgmm_model_initialized") == 0


# ---------------------------------------------------------------- refused commits (helper-82)
def _refused_then_good(daemon, code=None):
    """Make the group refuse commits (COORDINATOR_NOT_AVAILABLE by default) until the returned
    callable is called."""
    good = daemon.source.commit
    daemon.source.commit = _fails(code or KafkaError.COORDINATOR_NOT_AVAILABLE, "refused")
    return lambda: setattr(daemon.source, "commit", good)


def _group_at(daemon, offsets):
    def committed(partitions, timeout=10.0):
        wanted = [(tp.topic, tp.partition) for tp in partitions]
        return {tp: offsets[tp] for tp in wanted if tp in offsets}

    daemon.source.committed = committed


def test_pruning_keeps_the_checkpoint_the_group_took_however_many_came_after(tmp_path):
    # keep: 3 counted uncommitted files too: three checkpoints with their commits refused pruned
    # the last committed one, and the loss that followed withdrew the rest: the model started
    # afresh while the partition resumed at the group's commit (1,000 messages learned by none).
    rng = np.random.default_rng(13)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    _refused_then_good(daemon)
    for i in range(4):
        _feed(daemon, 1000 + 100 * i, 100, rng)
        daemon._checkpoint()
    # keep 3, the one the group took, and the oldest it may have taken (its commit refused)
    assert len(list((tmp_path / "state").glob("checkpoint-*.sgmm"))) == 5
    daemon._on_lost([TopicPartition("in", 0)])
    daemon.assigned = {("in", 0)}
    _group_at(daemon, {("in", 0): 1000})
    daemon._rewind()
    assert daemon.detector.n_valid == 1000 and daemon.source.seeks[-1] == ("in", 0, 1000)


@pytest.mark.parametrize("hand_over", ["checkpoint fails", "commit refused"])
def test_a_hand_over_the_group_did_not_take_unlearns_back_to_its_commit(tmp_path, hand_over):
    # A commit refused for a reason other than membership (a coordinator moving, a timeout) left
    # the group behind the model's checkpoints; the partitions' next owner starts at the group's
    # commit: kept, the messages between were learned twice.
    rng = np.random.default_rng(5)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    restore_commits = _refused_then_good(daemon, KafkaError.REQUEST_TIMED_OUT)
    _feed(daemon, 1000, 300, rng)
    daemon._checkpoint()  # written at 1300, its commit refused
    _feed(daemon, 1300, 200, rng)
    if hand_over == "checkpoint fails":
        restore_commits()
        daemon.sink.flush = lambda timeout, give_up=None: 3  # output unacknowledged: no checkpoint
    else:
        _refused_then_good(daemon, KafkaError.NOT_COORDINATOR)  # written at 1500, its commit refused
    _group_at(daemon, {("in", 0): 1000})
    daemon._on_revoke([TopicPartition("in", 0)])
    assert daemon._rewind_pending is not None
    assert all(c == {("in", 0): 1000} for c in daemon.source.commits)
    daemon.sink.flush = lambda timeout, give_up=None: 0
    daemon._reload_from_checkpoint(daemon._rewind_pending)
    assert daemon.detector.n_valid == 1000


def test_a_hand_over_commit_that_timed_out_but_was_taken_keeps_the_model(tmp_path):
    rng = np.random.default_rng(6)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    _feed(daemon, 1000, 400, rng)
    _refused_then_good(daemon, KafkaError.REQUEST_TIMED_OUT)
    _group_at(daemon, {("in", 0): 1400})  # the group says it took it
    daemon._on_revoke([TopicPartition("in", 0)])
    assert daemon._rewind_pending is None and daemon.detector.n_valid == 1400
    assert not daemon.checkpointer.uncommitted and not list((tmp_path / "state").glob("*.withdrawn"))


def test_a_checkpoint_committed_late_by_the_hand_over_is_not_withdrawn_by_a_later_loss(tmp_path):
    rng = np.random.default_rng(7)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    restore_commits = _refused_then_good(daemon)
    _feed(daemon, 1000, 300, rng)
    daemon._checkpoint()  # 1300, refused
    restore_commits()
    daemon._on_revoke([TopicPartition("in", 0)])  # nothing new: the hand-over commits 1300
    assert daemon.source.commits[-1] == {("in", 0): 1300}
    _group_at(daemon, {("in", 0): 1300})
    daemon.assigned = {("in", 0)}
    _feed(daemon, 1300, 100, rng)
    daemon._on_lost([TopicPartition("in", 0)])
    daemon.assigned = {("in", 0)}
    daemon._rewind()
    assert not list((tmp_path / "state").glob("*.withdrawn"))
    assert daemon.detector.n_valid == 1300 and daemon.source.seeks[-1] == ("in", 0, 1300)


def test_a_stop_tries_a_refused_commit_again(tmp_path):
    rng = np.random.default_rng(8)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    restore_commits = _refused_then_good(daemon)
    _feed(daemon, 1000, 300, rng)
    daemon._checkpoint()  # 1300, refused; nothing processed after it
    restore_commits()
    daemon.stop()
    daemon._last_checkpoint()
    assert daemon.source.commits[-1] == {("in", 0): 1300} and daemon.clean_stop


def test_a_covariance_type_that_turns_full_later_is_logged(tmp_path, caplog):
    # (helper-83: the warm-up chose tied; later checkpoints said full, with no word of the change.)
    rng = np.random.default_rng(9)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 400, rng)
    model = daemon.detector.model
    model.covariance_type_ = "tied"  # as a warm-up's choice; the review itself is the model's (test_online)
    process = daemon.detector.process

    def reviewed(batch, now):
        model.covariance_type_ = "full"  # (the model's covariances are full: scored as such)
        return process(batch, now)

    daemon.detector.process = reviewed
    with caplog.at_level(logging.INFO, logger="streamgmm.service.daemon"):
        _feed(daemon, 400, 100, rng)
    assert "model global: tied covariances turned full after 500 points" in caplog.text


def test_a_warm_up_that_gave_far_points_a_component_of_their_own_says_so(tmp_path, caplog):
    # helper-83: 0.5% of CPU spikes present from the first message got a component and went
    # unflagged, and nothing in the log or `inspect` said so.
    rng = np.random.default_rng(10)
    daemon = _daemon(tmp_path)
    X = rng.normal(size=(200, 3))
    X[::25, 1] += 12.0  # 8 of the 200 warm-up points
    with caplog.at_level(logging.WARNING, logger="streamgmm.service.daemon"):
        daemon._process({("in", 0): [FakeMessage("in", 0, i, encode(x, "json")) for i, x in enumerate(X)]})
    assert daemon.detector.ready
    assert re.search(r"a component of 4\.0% of the warm-up lies \d+ sd from every other \(most in f1: 1[12]\.\d+",
                     caplog.text), caplog.text


def test_a_failed_hand_over_after_a_commit_that_timed_out_but_was_taken_keeps_that_checkpoint(tmp_path):
    # Judged by the newest checkpoint the group was asked to take, not the model (ahead of it):
    # withdrawn, the 300 messages the group took would be learned by no model.
    rng = np.random.default_rng(11)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    restore_commits = _refused_then_good(daemon, KafkaError.REQUEST_TIMED_OUT)
    _feed(daemon, 1000, 300, rng)
    daemon._checkpoint()  # 1300: the commit timed out, and was taken
    restore_commits()
    _feed(daemon, 1300, 200, rng)
    daemon.sink.flush = lambda timeout, give_up=None: 3  # the hand-over's checkpoint fails
    _group_at(daemon, {("in", 0): 1300})
    daemon._on_revoke([TopicPartition("in", 0)])
    assert daemon._rewind_pending == "the checkpoint before a rebalance failed"
    daemon.sink.flush = lambda timeout, give_up=None: 0
    daemon._reload_from_checkpoint(daemon._rewind_pending)
    assert daemon.detector.n_valid == 1300 and not list((tmp_path / "state").glob("*.withdrawn"))


# ---------------------------------------------------------------- helper-85's review
def _files(tmp_path, pat="checkpoint-*.sgmm"):
    return sorted(p.name for p in (tmp_path / "state").glob(pat))


def _unlistable_state_dir(monkeypatch):
    """checkpoint.dir (tmp_path / "state") fails to list with EIO from now on."""
    import pathlib

    real = pathlib.Path.iterdir

    def iterdir(self):
        if self.name == "state":
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)


def test_a_hand_over_withdraws_only_the_checkpoints_past_the_groups_commit(tmp_path):
    """C2 (1300): its commit 'timed out' but the group took it; C3 (1500): refused for real.
    At the hand-over (group at 1300) only C3 goes: withdrawing both put the model back at 1000
    while the next owner starts at 1300, 300 messages learned by no model."""
    rng = np.random.default_rng(5)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()  # C1 1000 committed
    _refused_then_good(daemon, KafkaError.REQUEST_TIMED_OUT)
    _feed(daemon, 1000, 300, rng)
    daemon._checkpoint()  # C2 1300 "refused" (but taken)
    _refused_then_good(daemon, KafkaError.NOT_COORDINATOR)
    _feed(daemon, 1300, 200, rng)
    daemon._checkpoint()  # C3 1500 refused
    _group_at(daemon, {("in", 0): 1300})
    daemon._on_revoke([TopicPartition("in", 0)])
    daemon._reload_from_checkpoint(daemon._rewind_pending)
    # The next owner starts at 1300 (the group's commit); this model is at 1000:
    assert daemon.detector.n_valid == 1300, "messages 1000..1300 learned by no model"


def test_pruning_never_protects_a_withdrawn_checkpoint(tmp_path):
    rng = np.random.default_rng(6)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()  # C1 1000 committed
    restore = _refused_then_good(daemon, KafkaError.REQUEST_TIMED_OUT)
    _feed(daemon, 1000, 300, rng)
    daemon._checkpoint()  # C2 1300 refused
    _group_at(daemon, {("in", 0): 1000})
    daemon._on_revoke([TopicPartition("in", 0)])  # commit refused again; group behind: C2 withdrawn
    assert daemon._rewind_pending
    # next assignment: reload before assigning (as _on_assign does)
    daemon._reload_from_checkpoint(daemon._rewind_pending)
    assert daemon.detector.n_valid == 1000
    # a second rebalance before any message: the hand-over retries the refused commit, now taken
    restore()
    daemon._on_revoke([TopicPartition("in", 0)])
    daemon.assigned = {("in", 0)}
    # three checkpoints whose commits are refused (coordinator moving), then a loss
    _refused_then_good(daemon, KafkaError.COORDINATOR_NOT_AVAILABLE)
    for i in range(3):
        _feed(daemon, 1000 + 100 * i, 100, rng)
        daemon._checkpoint()
    daemon._on_lost([TopicPartition("in", 0)])
    daemon.assigned = {("in", 0)}
    daemon._rewind()
    assert daemon.detector.n_valid == 1000, "the 1000 messages the group took are in no model"


def test_a_checkpoint_whose_state_topic_write_failed_is_withdrawn_at_a_hand_over_behind_it(tmp_path):
    from streamgmm.service.state import CheckpointError

    class BadTopic:
        topic = "state"
        def write(self, key, state):
            pass
        def flush(self, timeout, give_up=None):
            raise CheckpointError("state topic: 1 record(s) unacknowledged")

    rng = np.random.default_rng(7)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()  # 1000, committed
    _feed(daemon, 1000, 500, rng)
    daemon.checkpointer.topic_store = BadTopic()
    _group_at(daemon, {("in", 0): 1000})
    daemon._on_revoke([TopicPartition("in", 0)])
    daemon._reload_from_checkpoint(daemon._rewind_pending)
    assert daemon.detector.n_valid == 1000, "reloaded the failed checkpoint's file: next owner starts at 1000"


def test_a_checkpoint_restored_past_the_groups_commit_is_withdrawn_at_a_hand_over_behind_it(tmp_path):
    rng = np.random.default_rng(8)
    first = _daemon(tmp_path)
    _feed(first, 0, 1000, rng)
    first._checkpoint()  # 1000 committed
    _refused_then_good(first, KafkaError.COORDINATOR_NOT_AVAILABLE)
    _feed(first, 1000, 300, rng)
    first.stop()
    first._last_checkpoint()  # 1300 written, commit refused; the process exits
    second = _daemon(tmp_path)
    second.restore()
    _group_at(second, {("in", 0): 1000})
    second.assigned = set()
    second.source.assign = lambda starts: None
    second.source.pause = lambda tps: None
    second.assigned = frozenset()
    second._on_assign([TopicPartition("in", 0)])
    _feed(second, 1300, 200, rng)
    _refused_then_good(second, KafkaError.NOT_COORDINATOR)
    second._on_revoke([TopicPartition("in", 0)])
    second._reload_from_checkpoint(second._rewind_pending or "x")
    assert second.detector.n_valid <= 1000, "1000..1300 learned by this model and by the next owner"


def test_a_checkpoint_dir_that_cannot_be_listed_fails_the_checkpoint_not_the_daemon(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    daemon = _daemon(tmp_path)   # a fresh process: committed_files is empty
    _feed(daemon, 0, 1000, rng)
    _unlistable_state_dir(monkeypatch)
    (tmp_path / "state").mkdir(exist_ok=True)
    outcome = daemon._checkpoint()   # base: FAILED (retried with a back-off); HEAD: raises
    assert outcome is Outcome.FAILED


def test_a_hand_over_that_cannot_read_the_groups_commit_withdraws_every_uncommitted_checkpoint(tmp_path):
    rng = np.random.default_rng(12)
    daemon = _daemon(tmp_path)
    _feed(daemon, 0, 1000, rng)
    daemon._checkpoint()
    _refused_then_good(daemon, KafkaError.REQUEST_TIMED_OUT)
    _feed(daemon, 1000, 300, rng)
    daemon._checkpoint()  # 1300, refused
    daemon.source.committed = _fails(KafkaError._TIMED_OUT, "coordinator gone")
    daemon._on_revoke([TopicPartition("in", 0)])
    assert daemon._rewind_pending is not None and len(_files(tmp_path, "*.withdrawn")) == 1
    daemon._reload_from_checkpoint(daemon._rewind_pending)
    assert daemon.detector.n_valid == 1000
