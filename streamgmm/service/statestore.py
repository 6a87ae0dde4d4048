"""Where detector checkpoints live, per model key ("global" or "topic/partition").

``LocalStateStore``: numbered checkpoint files in ``checkpoint.dir`` (``global``) or one
sub-directory per partition.  ``TopicStateStore``: one record per model key in a Kafka topic
(meant to be compacted) holding the same versioned, checksummed bytes, so any instance of the
consumer group can restore a partition's model when the partition moves to it.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from .checkpoint import CheckpointError, CheckpointStore, pack, unpack

log = logging.getLogger(__name__)

GLOBAL_KEY = "global"


def model_key(scope: str, topic: str, partition: int) -> str:
    return GLOBAL_KEY if scope == "global" else f"{topic}/{partition}"


def _directory_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key.replace("/", "-"))


class LocalStateStore:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory)
        self.keep = keep

    def store_for(self, key: str) -> CheckpointStore:
        # The global model keeps the top-level directory, as single-instance deployments expect.
        path = self.directory if key == GLOBAL_KEY else self.directory / "partitions" / _directory_name(key)
        return CheckpointStore(path, self.keep)

    def write(self, key: str, state: dict) -> Path:
        return self.store_for(key).write(state)

    def load(self, key: str) -> dict | None:
        found = self.store_for(key).load_latest()
        return None if found is None else found[0]


class TopicStateStore:
    """Checkpoints as records of a Kafka topic, newest record per key wins.

    Writes go through the daemon's producer (flushed before offsets are committed); reads
    scan the topic from the beginning with their own consumer, because a broker need not
    compact (Tansu accepts cleanup.policy=compact and keeps everything).
    """

    def __init__(self, topic: str, consumer_settings: dict, producer):
        self.topic = topic
        self.consumer_settings = consumer_settings
        self.producer = producer

    def ensure_topic(self, admin_settings: dict) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(**admin_settings)
        try:
            admin.create_topics([NewTopic(self.topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        except TopicAlreadyExistsError:
            pass
        finally:
            admin.close()

    def write(self, key: str, state: dict):
        return self.producer.send(self.topic, key=key.encode(), value=pack(state))

    def read_all(self, timeout: float = 30.0) -> dict[str, list[bytes]]:
        """Every value per key, oldest first, reading the whole topic (bounded by ``timeout``)."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(enable_auto_commit=False, group_id=None, fetch_max_wait_ms=50,
                                 **self.consumer_settings)
        newest: dict[str, list[bytes]] = {}
        try:
            partitions = consumer.partitions_for_topic(self.topic)
            deadline = time.monotonic() + timeout
            while partitions is None and time.monotonic() < deadline:
                time.sleep(0.1)
                partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                return newest
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            idle_polls = 0
            while time.monotonic() < deadline:
                batch = consumer.poll(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        if record.key is not None and record.value is not None:
                            newest.setdefault(record.key.decode(), []).append(record.value)
                caught_up = all(
                    consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp) for tp in tps
                )
                idle_polls = idle_polls + 1 if not batch else 0
                if caught_up or idle_polls >= 5:
                    break
            return newest
        finally:
            consumer.close()

    def load_many(self, keys, timeout: float = 30.0) -> dict[str, dict]:
        """The newest readable state per key; a corrupt newest record falls back to the one before."""
        found = {}
        for key, values in self.read_all(timeout).items():
            if key not in keys:
                continue
            for value in reversed(values[-10:]):
                try:
                    found[key] = unpack(value, f"{self.topic} record {key}")
                    break
                except CheckpointError as exc:
                    log.error("skipping state record %s: %s; trying the previous one", key, exc)
        return found
