"""State records larger than Kafka takes: refused with the setting to raise, at start when the
model's size is fixed, at write time always (no broker: librdkafka checks the size itself)."""

import logging
import re
import time

import numpy as np
import pytest
from confluent_kafka import KafkaError, Producer

from streamgmm.detection.decode import encode
from streamgmm.detection.detector import Detector
from streamgmm.service.checkpointer import Outcome
from streamgmm.service.config import config_from_dict
from streamgmm.service.daemon import Daemon, StartupError
from streamgmm.service.state import CheckpointError, TopicStateStore
from fakes import FakeMessage


def _config(tmp_path, dimension=3, producer=None, **model):
    return config_from_dict({
        "kafka": {"producer": producer or {}},
        "input": {"format": "json", "dimension": dimension},
        "model": {"n_components": 2, "covariance_type": "full", "warmup": 200, **model},
        "checkpoint": {"dir": str(tmp_path / "state"), "topic": "streamgmm-state"},
        "metrics": {"enabled": False},
    }, environ={})


def _warm_detector(config):
    detector = Detector(config)
    X = np.random.default_rng(0).normal(size=(400, config.input.dimension))

    from streamgmm.service.kafka import as_batch

    detector.process(as_batch({("in", 0): [FakeMessage("in", 0, i, encode(x, "json")) for i, x in enumerate(X)]}), now=time.time())
    return detector


def _store(max_bytes):
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": max_bytes, "log_level": 0})
    return TopicStateStore("streamgmm-state", {}, producer, max_bytes=max_bytes), producer


def test_a_state_record_over_the_producers_limit_names_the_setting_to_raise(tmp_path):
    state = _warm_detector(_config(tmp_path, dimension=40)).state(0.0)
    store, producer = _store(10_000)
    with pytest.raises(CheckpointError, match=re.escape("raise kafka.producer.message.max.bytes")) as caught:
        store.write("in/0", state)
    assert "in/0" in str(caught.value) and "(10,000)" in str(caught.value)
    producer.purge()


def test_a_state_record_within_the_limit_is_sent(tmp_path):
    store, producer = _store(1_000_000)
    store.write("in/0", _warm_detector(_config(tmp_path)).state(0.0))
    assert len(producer) >= 1  # queued (no broker here)
    producer.purge()


def test_the_broker_refusing_a_record_as_too_large_names_the_topic_setting(tmp_path):
    class RefusingProducer:
        def produce(self, topic, key, value, on_delivery):
            self.report = lambda: on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)

        def flush(self, timeout, give_up=None):
            self.report()
            return 0

    store = TopicStateStore("streamgmm-state", {}, RefusingProducer())
    store.write("global", _warm_detector(_config(tmp_path)).state(0.0))
    with pytest.raises(CheckpointError, match="max.message.bytes of topic streamgmm-state"):
        store.flush(1.0)


def test_a_checkpoint_over_the_limit_fails_and_is_retried_saying_what_to_raise(tmp_path, caplog):
    from fakes import FakeSink
    from test_daemon_logic import FakeSource  # noqa: I001 (tests/ is on the path)

    config = _config(tmp_path, dimension=40)
    daemon = Daemon(config)
    daemon.source, daemon.sink = FakeSource(), FakeSink()
    daemon.detectors["global"] = _warm_detector(config)
    store, producer = _store(10_000)
    daemon.topic_store = daemon.checkpointer.topic_store = store
    daemon.checkpointer.pending_messages = 400
    with caplog.at_level(logging.ERROR):
        assert daemon.checkpointer.checkpoint(daemon.detectors, daemon.sink, daemon._commit, 0.0) is Outcome.FAILED
    assert "raise kafka.producer.message.max.bytes" in caplog.text and daemon.source.commits == []
    producer.purge()


def test_a_fixed_model_too_large_for_the_state_topic_is_refused_at_start(tmp_path):
    daemon = Daemon(_config(tmp_path, dimension=64, n_components=64))  # 64 x 64 x 64 doubles: 2 MB
    with pytest.raises(StartupError, match=re.escape("raise kafka.producer.message.max.bytes")):
        daemon.start_up()
    Daemon(_config(tmp_path, dimension=64, n_components=64, covariance_type="diag")).start_up()
    Daemon(_config(tmp_path, dimension=64, n_components=64, producer={"message.max.bytes": 4_000_000})).start_up()


def test_an_auto_model_that_may_grow_too_large_is_a_warning_at_start(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        Daemon(_config(tmp_path, dimension=200, n_components="auto", max_components=8)).start_up()
    assert "raise kafka.producer.message.max.bytes" in caplog.text

