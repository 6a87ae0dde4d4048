"""Output topics that do not exist: reported at start, and their records retried, not dropped."""

from confluent_kafka import KafkaError, KafkaException, Producer

from streamgmm.detection.records import OutputRecord
from streamgmm.service.kafka import KafkaSink, missing_topics


def _sink():
    refused = []
    sink = KafkaSink({"bootstrap.servers": "127.0.0.1:1", "log_level": 0}, on_error=lambda e: None,
                     on_permanent=lambda record, why: refused.append(why))
    return sink, refused


def _record(topic="anomalies"):
    return OutputRecord(topic, b"{}", b"k", [])


def test_a_record_for_a_missing_topic_is_retried_not_dropped():
    sink, refused = _sink()
    for code in (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART):
        sink._failed(_record(), KafkaError(code))
    taken = sink.take()
    assert (taken.transient, taken.permanent, refused) == (2, 0, [])
    assert any("anomalies" in reason for reason in taken.transient_reasons)


def test_a_record_for_a_missing_optional_topic_is_dropped_and_counted():
    # The scores topic: missing, it must not hold up the anomalies and the checkpoints.
    refused = []
    sink = KafkaSink({"bootstrap.servers": "127.0.0.1:1", "log_level": 0}, on_error=lambda e: None,
                     on_permanent=lambda record, why: refused.append(record.topic),
                     optional_topics=frozenset(["scores"]))
    sink._failed(_record("scores"), KafkaError(KafkaError._UNKNOWN_TOPIC))
    sink._failed(_record("anomalies"), KafkaError(KafkaError._UNKNOWN_TOPIC))
    taken = sink.take()
    assert (taken.transient, taken.permanent, refused) == (1, 1, ["scores"])


def test_a_record_too_large_is_still_dropped_for_good():
    sink, refused = _sink()
    sink._failed(_record(), KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    taken = sink.take()
    assert (taken.transient, taken.permanent, len(refused)) == (0, 1, 1)


class _Metadata:
    def __init__(self, topics):
        self.topics = topics


class _Topic:
    def __init__(self, error=None):
        self.error = error


class _Cluster:
    """list_topics as a broker with auto-create off answers it: the topic, with an error if missing."""

    def __init__(self, existing, answers=True):
        self.existing, self.answers = existing, answers

    def list_topics(self, topic, timeout):
        if not self.answers:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        found = _Topic() if topic in self.existing else _Topic(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        return _Metadata({topic: found})


def test_missing_topics_names_those_the_cluster_does_not_have():
    cluster = _Cluster({"anomalies"})
    assert missing_topics(cluster, ["anomalies", "features.dead-letter", "scores"]) == ["features.dead-letter",
                                                                                        "scores"]
    down = _Cluster(set(), answers=False)
    asked = []
    down.list_topics = lambda topic, timeout: asked.append(timeout) or _Cluster.list_topics(down, topic, timeout)
    assert missing_topics(down, ["anomalies", "features.dead-letter", "scores"]) == []
    assert asked == [2.0]  # a broker that does not answer is asked once, briefly


def test_missing_topics_on_the_real_broker(broker):
    # Tansu creates a topic a metadata request names (as a Kafka broker with auto-create on): none missing.
    producer = Producer({"bootstrap.servers": broker.bootstrap, "log_level": 0})
    assert missing_topics(producer, ["streamgmm-output-topic-check"]) == []


def test_an_existing_state_topic_is_used_without_asking_to_create_it(broker, topic, monkeypatch):
    # A principal allowed to use a topic made for it, but not to create topics, is refused a
    # create even of an existing topic (TOPIC_AUTHORIZATION_FAILED): it must not be asked.
    from confluent_kafka.admin import AdminClient

    from streamgmm.service.kafka import ensure_topic

    settings = {"bootstrap.servers": broker.bootstrap}
    ensure_topic(settings, topic, {"cleanup.policy": "compact"})
    assert topic in AdminClient(settings).list_topics(topic, timeout=10).topics

    def refused(*args, **kwargs):
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorised"))

    monkeypatch.setattr(AdminClient, "create_topics", refused)
    ensure_topic(settings, topic, {"cleanup.policy": "compact"})


def test_inspect_with_a_group_shows_the_state_its_members_restore(broker, topic):
    # A member expired without knowing wrote a record (at 40) after the new owner's (at 150, the
    # group's commit): the daemon passes over it, and so must inspect --group, which a plain
    # inspect of the newest record does not.
    from confluent_kafka import Consumer, TopicPartition

    from streamgmm.cli.main import topic_summaries
    from streamgmm.detection.detector import Detector
    from streamgmm.service.config import config_from_dict
    from streamgmm.service.kafka import ensure_topic
    from streamgmm.service.state import TopicStateStore

    settings = {"bootstrap.servers": broker.bootstrap}
    state_topic, group, source = f"{topic}.state", f"{topic}-group", f"{topic}.in"
    ensure_topic(settings, state_topic, {"cleanup.policy": "compact"})
    ensure_topic(settings, source, {})
    producer = Producer(settings)
    store = TopicStateStore(state_topic, settings, producer)
    for offset in (150, 40):  # the new owner's, then the expired member's
        state = Detector(config_from_dict({"input": {"dimension": 2}}, environ={})).state(0.0)
        state["offsets"], state["counters"]["n_valid"] = {source: {"0": offset}}, offset
        store.write(f"{source}/0", state)
    store.flush(10)
    member = Consumer({**settings, "group.id": group, "enable.auto.commit": False})
    member.commit(offsets=[TopicPartition(source, 0, 150)], asynchronous=False)
    member.close()

    assert topic_summaries(state_topic, broker.bootstrap)[f"{source}/0"]["n_valid"] == 40
    restored = topic_summaries(state_topic, broker.bootstrap, group=group)[f"{source}/0"]
    assert (restored["n_valid"], restored["group_commit"]) == (150, 150)


def test_a_broker_error_the_producer_retries_rewinds_and_one_it_never_will_is_refused():
    # A delivery report's KafkaError.retriable() is False whatever the code: with `retries`
    # lowered, NOT_ENOUGH_REPLICAS came through and the anomaly was dropped (helper-82).
    sink, refused = _sink()
    assert not KafkaError(KafkaError.NOT_ENOUGH_REPLICAS).retriable()
    for code in (KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.REQUEST_TIMED_OUT,
                 KafkaError._MSG_TIMED_OUT):
        sink._failed(_record(), KafkaError(code))
    sink._failed(_record(), KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    sink._failed(_record(), KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    taken = sink.take()
    assert (taken.transient, taken.permanent, len(refused)) == (4, 2, 2)
