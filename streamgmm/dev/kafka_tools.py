"""Small confluent-kafka helpers for the demo, the tests and the benchmarks (not the product)."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Producer, TopicPartition

from ..service.kafka import ensure_topic


def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 30.0) -> None:
    """Create each topic with its number of partitions (an existing one is left as it is)."""
    for name, partitions in topics.items():
        ensure_topic({"bootstrap.servers": bootstrap}, name, timeout=timeout, partitions=partitions)


def producer(bootstrap: str, **settings) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": False, "acks": "all",
                     "linger.ms": 5, **settings})


def produce(bootstrap: str, topic: str, messages, partition_of=None, timeout: float = 60.0) -> list[tuple[int, int]]:
    """Send (key, value[, headers]) tuples; returns (partition, offset) of each, in order."""
    client = producer(bootstrap)
    errors = []

    def delivered(index):
        def callback(error, message):
            if error is not None:
                errors.append(error.str())
            else:
                results[index] = (message.partition(), message.offset())
        return callback

    messages = list(messages)
    results = [None] * len(messages)
    for i, message in enumerate(messages):
        key, value = message[0], message[1]
        headers = message[2] if len(message) > 2 else None
        kwargs = {"partition": partition_of(i)} if partition_of else {}
        while True:
            try:
                client.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered(i), **kwargs)
                break
            except BufferError:
                client.poll(0.1)
        client.poll(0)
    remaining = client.flush(timeout)
    if remaining or errors:
        raise RuntimeError(f"{remaining} message(s) unacknowledged, errors: {errors[:3]}")
    return results


def read_all(bootstrap: str, topic: str, timeout: float = 20.0, expect: int | None = None, idle: float = 2.0):
    """Every message of a topic from the beginning (bounded in time): confluent Messages."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 20})
    try:
        deadline = time.monotonic() + timeout
        partitions: list[int] = []
        while not partitions and time.monotonic() < deadline:
            metadata = consumer.list_topics(topic, timeout=5)
            info = metadata.topics.get(topic)
            partitions = sorted(info.partitions) if info is not None and info.error is None else []
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            return []
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records, last_new = [], time.monotonic()
        while time.monotonic() < deadline:
            new = [m for m in consumer.consume(num_messages=10_000, timeout=0.2) if m.error() is None]
            records.extend(new)
            if new:
                last_new = time.monotonic()
            if expect is not None and len(records) >= expect:
                break
            if expect is None and time.monotonic() - last_new > idle:
                break
        return records
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}
    finally:
        consumer.close()


def high_watermarks(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"marks-{time.monotonic_ns()}"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        consumer.close()
