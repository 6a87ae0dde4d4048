"""Kafka I/O on confluent-kafka (librdkafka): client settings, the source, the sink, topics.

librdkafka fetches, decompresses and checks CRCs in its own C threads; everything that calls
back into Python (rebalance callbacks, delivery reports, errors) runs inside ``poll()`` /
``consume()`` on the caller's thread, so the daemon is one thread and blocking calls such as
a synchronous commit on revoke are allowed there.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from operator import methodcaller
from typing import Any, Callable, Iterator

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from ..detection.records import InputRecord, OutputRecord
from .config import Config, ConfigError, environment_origin, resolve_secrets, topic_pattern

log = logging.getLogger(__name__)

# Set by streamgmm itself: the delivery guarantees depend on them.
OWNED_SETTINGS = {
    "bootstrap.servers": "kafka.bootstrap_servers",
    "group.id": "kafka.group_id",
    "client.id": "kafka.client_id",
    "enable.auto.commit": "nothing: offsets are committed at checkpoints",
    "enable.auto.offset.store": "nothing: offsets are committed at checkpoints",
    "auto.offset.reset": "kafka.auto_offset_reset",
}
# kafka-python's names for the usual settings, for the error that says what to write instead.
KAFKA_PYTHON_NAMES = {
    "security_protocol": "security.protocol", "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username", "sasl_plain_password": "sasl.password",
    "sasl_plain_password_file": "sasl.password_file", "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password", "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms", "max_poll_interval_ms": "max.poll.interval.ms",
    "fetch_max_wait_ms": "fetch.wait.max.ms", "fetch_min_bytes": "fetch.min.bytes",
    "fetch_max_bytes": "fetch.max.bytes", "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "request_timeout_ms": "request.timeout.ms", "compression_type": "compression.type",
    "linger_ms": "linger.ms", "batch_size": "batch.size", "max_request_size": "message.max.bytes",
    "retries": "retries", "acks": "acks", "enable_idempotence": "enable.idempotence",
}

_VALUE = methodcaller("value")
_TIMESTAMP = methodcaller("timestamp")
_PARTITION = methodcaller("partition")
_TOPIC = methodcaller("topic")
_ERROR = methodcaller("error")
_OFFSET = methodcaller("offset")
_KEY = methodcaller("key")


# ------------------------------------------------------------------------- settings
def _user_settings(config: Config, section: str) -> dict:
    raw = getattr(config.kafka, section)
    for name in raw:
        path = f"kafka.{section}.{name}"
        # An environment variable spells sasl_plain_password as sasl.plain.password: the same hint.
        underscored = name.replace(".", "_")
        if underscored in KAFKA_PYTHON_NAMES and KAFKA_PYTHON_NAMES[underscored] != name:
            raise ConfigError(f"{path}: this is kafka-python's name; librdkafka's is "
                              f"{KAFKA_PYTHON_NAMES[underscored]!r} (streamgmm passes librdkafka's names through)")
        if name in OWNED_SETTINGS:
            raise ConfigError(f"{path}: set by streamgmm; use {OWNED_SETTINGS[name]}")
        if name == "partition.assignment.strategy" and "cooperative" in str(raw[name]):
            raise ConfigError(f"{path}: {raw[name]!r}: the cooperative protocol is not supported yet "
                              "(the daemon assigns whole assignments); use range or roundrobin")
        # (KIP-848's protocol is incremental too: accepted, it met assign() where librdkafka wants
        # incremental_assign(); helper-89.)
        if name == "group.protocol" and str(raw[name]).strip().lower() != "classic":
            raise ConfigError(f"{path}: {raw[name]!r}: only the classic group protocol is supported (the daemon "
                              "assigns whole assignments); leave it unset or set classic")
    return resolve_secrets(raw, f"kafka.{section}")


# librdkafka's default message.max.bytes: the largest record its producer sends.
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000


def message_max_bytes(settings: dict) -> int:
    """The producer's message.max.bytes in these client settings."""
    return int(settings.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))


def client_settings(config: Config, role: str) -> dict:
    """librdkafka settings for ``role`` ("consumer", "producer" or "admin"): streamgmm's
    defaults, then the security section, then the role's own section."""
    k = config.kafka
    settings: dict[str, Any] = {"bootstrap.servers": ",".join(k.bootstrap_servers), "client.id": k.client_id}
    if role == "consumer":
        settings.update({
            "group.id": k.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": k.auto_offset_reset,
            # A dead member's partitions move on after this; the default 45 s is long for a daemon.
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 3_000,
            # How long a broker may hold a fetch with nothing to return.  Tansu holds
            # librdkafka's fetch for part of it even with data waiting (bare consumer at
            # 2,000 msg/s: p50 27.5 ms at 100, 8.1 at 20, 4.0 at 5): 10 keeps an alert's
            # delay near the kafka-python daemon's, for about 100 idle fetches a second.
            "fetch.wait.max.ms": 10,
            # When the prefetch queue passes its thresholds librdkafka pauses fetching for
            # this long (default 1,000 ms): on small messages the loop then drained the queue
            # and waited (float32 A/B on the raw consumer: 158k against 871k msg/s with 10).
            "fetch.queue.backoff.ms": 10,
            # New input topics and partitions are found at this refresh: librdkafka's 5 min left a
            # topic created after the start unread for 290 s (10 s at 10,000; helper-35).
            "topic.metadata.refresh.interval.ms": 30_000,
        })
    elif role == "producer":
        settings.update({
            "acks": "all",
            "linger.ms": 5,
            # Output is at-least-once and deduplicable by source offsets; the idempotent
            # producer adds nothing to that and cannot survive some broker restarts.
            "enable.idempotence": False,
            # A record the broker has not acknowledged after this is reported failed, and the
            # daemon rewinds to its last checkpoint to produce it again.
            "message.timeout.ms": 120_000,
        })
    settings.update(_user_settings(config, "security"))
    if role in ("consumer", "producer"):
        settings.update(_user_settings(config, role))
    return settings


def check_settings(config: Config) -> None:
    """Build each client once, without talking to a broker, so librdkafka itself refuses a
    misspelled name or a bad value now (ConfigError naming the key), not as endless
    "cannot connect" retries later."""
    # Before the clients: librdkafka reads "1MB" as 1 and refuses that with a message about 1.
    _refuse_half_read_numbers(config)
    for role, client_type in (("consumer", Consumer), ("producer", Producer)):
        try:
            settings = client_settings(config, role)
        except (ValueError, TypeError) as exc:  # ours (a reserved key, a secret file): it names the key
            raise ConfigError(str(exc)) from None
        warnings = _Collect()
        try:
            client = client_type({**settings, "logger": warnings.logger})
        except (KafkaException, ValueError, TypeError) as exc:
            raise environment_origin(ConfigError(_config_error(config, role, kafka_error_text(exc))), os.environ) from None
        client.poll(0)  # delivers librdkafka's start-up warnings to the logger
        client.close() if role == "consumer" else client.flush(0)
        for message in warnings.messages:
            # "Configuration property acks is a producer property and will be ignored by this
            # consumer instance": silently ignored is how a misplaced setting fails.
            misplaced = re.search(r"property (\S+) is a (producer|consumer) property", message)
            if misplaced and misplaced.group(2) != role:
                key = _user_key(config, role, misplaced.group(1))
                if key is not None:
                    raise ConfigError(f"{key}: a {misplaced.group(2)} setting, which the {role} ignores; "
                                      f"move it to kafka.{misplaced.group(2)}")

    _refuse_settings_that_break_the_guarantees(config)


# A number librdkafka reads whole; of anything else starting with digits it reads the leading
# digits and drops the rest without a word ("6s" is 6 ms, "6,000" is 6, "1e4" is 1).
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")
# librdkafka's settings that take a decimal; the others keep a number's whole part.
_DECIMAL_SETTINGS = frozenset({"linger.ms", "queue.buffering.max.ms"})


def _refuse_half_read_numbers(config: Config) -> None:
    """ConfigError for a value of a numeric librdkafka setting that librdkafka would read as
    another number without a word: a unit, a thousands separator or an exponent (it reads the
    leading digits), a leading 0 or 0x (it reads octal or hex: session.timeout.ms 06000 was
    3072 ms; helper-47), a decimal where it keeps the whole part (fetch.wait.max.ms 10.5 was 10)."""
    for section in ("security", "consumer", "producer"):
        for key, value in getattr(config.kafka, section).items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            text = value.strip() if isinstance(value, str) else repr(value) if number else None
            if not (text and re.match(r"[+-]?\d", text) and _numeric_setting(key)):
                continue
            where = f"kafka.{section}.{key}: {value!r}"
            if key in _DECIMAL_SETTINGS:  # read with strtod: 010 is 10, 1e-3 a thousandth
                try:
                    float(text)
                except ValueError:
                    raise ConfigError(f"{where} is not a plain number; write the number alone, in the unit "
                                      "its name says") from None
                continue
            if re.fullmatch(r"[+-]?0[xX][0-9a-fA-F]+", text):
                raise ConfigError(f"{where}: librdkafka reads 0x as hex ({text} would be {int(text, 16)}); write "
                                  "the number in decimal")
            if not _PLAIN_NUMBER.fullmatch(text):
                raise ConfigError(f"{where} is not a plain number, and librdkafka would read only its leading "
                                  f"digits ({re.match(r'[+-]?[0-9]+', text).group()}); write the number alone, "
                                  "in the unit its name says")
            if re.match(r"[+-]?0\d", text):
                octal = int(text, 8) if re.fullmatch(r"[+-]?[0-7]+", text) else None
                if octal is None or octal != float(text):  # (00 and 07 read the same either way)
                    said = f" ({text} would be {octal})" if octal is not None else ""
                    raise ConfigError(f"{where}: librdkafka reads a leading 0 as octal{said}; write the number "
                                      "without it")
            if "." in text and not float(text).is_integer():
                raise ConfigError(f"{where}: librdkafka keeps only the whole part of this setting "
                                  f"({text.split('.')[0]}); write a whole number")
            if abs(float(text)) >= 2**31:
                raise ConfigError(f"{where}: librdkafka keeps this setting in 32 bits (at most 2147483647); "
                                  "write a smaller number")


def _refuse_settings_that_break_the_guarantees(config: Config) -> None:
    """ConfigError for librdkafka settings it takes but under which the daemon cannot keep its
    word: a heartbeat no more often than the session times out (the member is expired between
    two heartbeats and rewinds over and over), and output nobody acknowledges (acks 0: a
    checkpoint would commit past records the broker never took)."""
    # As the consumer gets them: streamgmm's defaults (a 10 s session, not librdkafka's 45 s: a
    # 15 s heartbeat passed here and lost the partitions every 10-25 s; helper-41), then the
    # security and consumer sections.
    consumer, producer = client_settings(config, "consumer"), client_settings(config, "producer")
    try:
        session = float(consumer["session.timeout.ms"])
        heartbeat = float(consumer["heartbeat.interval.ms"])
    except (TypeError, ValueError):
        session = heartbeat = None  # librdkafka itself refused a value that is not a number
    if session is not None and heartbeat >= session:
        raise ConfigError(f"kafka.consumer.heartbeat.interval.ms: {heartbeat:g} is not below session.timeout.ms "
                          f"({session:g}): the group would expire the member between two heartbeats; make it at "
                          "most a third of the session timeout")
    for key in ("acks", "request.required.acks"):
        if str(producer.get(key, "all")).strip() == "0":
            raise ConfigError(f"kafka.producer.{key}: 0 sends output nobody acknowledges, and a checkpoint would "
                              "commit past records the broker never took; use all (the default) or 1")


def _numeric_setting(name: str) -> bool:
    """Whether librdkafka's setting ``name`` takes a number (it refuses a word for it)."""
    quiet = _Collect()  # its start-up warnings ("no bootstrap.servers") are not the user's
    try:
        Producer({name: "not-a-number", "logger": quiet.logger}).flush(0)
    except (KafkaException, ValueError, TypeError) as exc:
        return "Invalid value" in kafka_error_text(exc) if isinstance(exc, KafkaException) else False
    return False

class _Collect(logging.Handler):
    """librdkafka's log lines while a client is built (its logger), kept for check_settings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.logger = logging.Logger(f"streamgmm.check_settings.{id(self)}")
        self.logger.addHandler(self)
        self.logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# librdkafka names an alias by its own name in messages.
LIBRDKAFKA_ALIASES = {"request.required.acks": "acks", "compression.codec": "compression.type",
                      "queue.buffering.max.ms": "linger.ms", "message.send.max.retries": "retries",
                      "max.in.flight.requests.per.connection": "max.in.flight"}


def _user_key(config: Config, section: str, name: str) -> str | None:
    """The key path under kafka.<section> (or kafka.security) that set librdkafka's ``name``."""
    for candidate in (section, "security"):
        given = getattr(config.kafka, candidate)
        for key in (name, LIBRDKAFKA_ALIASES.get(name)):
            if key is not None and key in given:
                return f"kafka.{candidate}.{key}"
    return None


def _config_error(config: Config, section: str, message: str) -> str:
    """librdkafka's complaint, prefixed with the key path it is about."""
    name = re.search(r'property:? "?([A-Za-z0-9._-]+)"?', message)
    value = re.search(r'value "([^"]*)"', message)
    path = _user_key(config, section, name.group(1)) if name else None
    if path is None:
        # A check across settings names them in backquotes (`max.poll.interval.ms`must be >=
        # `session.timeout.ms`): the first of them the user set (helper-56).
        path = next(filter(None, (_user_key(config, section, quoted)
                                  for quoted in re.findall(r"`([A-Za-z0-9._-]+)`", message))), None)
    if path is None and value:
        # An alias not in LIBRDKAFKA_ALIASES is found by the value librdkafka quotes.
        path = next((f"kafka.{candidate}.{key}" for candidate in (section, "security")
                     for key, given in getattr(config.kafka, candidate).items()
                     if str(given).lower() == value.group(1).lower()), None)
    where = path or f"kafka.{section} or kafka.security"
    return f"{where}: {message} (see librdkafka's CONFIGURATION.md)"


def kafka_error_text(error: KafkaError | Exception) -> str:
    """What went wrong, in librdkafka's words where it is a Kafka error."""
    if isinstance(error, KafkaException) and isinstance(error.args[0], KafkaError):
        error = error.args[0]
    return error.str() if isinstance(error, KafkaError) else str(error) or type(error).__name__


# --------------------------------------------------------------------------- source
@dataclass
class PolledBatch:
    """One partition's (or model's) share of a poll, as columns: no Python object per message."""

    messages: list[Message]
    values: list
    timestamps_ms: np.ndarray
    last_offsets: dict[tuple[str, int], int]

    def __len__(self) -> int:
        return len(self.messages)

    def sources(self, indices: list[int]) -> tuple[list, list, list, list]:
        """(topics, partitions, offsets, keys) of these messages, column by column (the scores
        topic takes them for every scored message: no InputRecord each)."""
        messages = list(map(self.messages.__getitem__, indices))
        return (list(map(_TOPIC, messages)), list(map(_PARTITION, messages)), list(map(_OFFSET, messages)),
                list(map(_KEY, messages)))

    def record(self, index: int) -> InputRecord:
        """One message as an InputRecord (for the few that become output records)."""
        m = self.messages[index]
        return InputRecord(m.topic(), m.partition(), m.offset(), m.value(), m.key(), m.timestamp()[1],
                           message_headers(m))


# A header key that is not UTF-8 makes confluent-kafka's Message.headers() raise (SystemError:
# it decodes keys to str); uncaught, one such message stopped the daemon at every restart
# (helper-82).  Its output record goes without the input's headers, and says so.
UNREADABLE_HEADERS = (("streamgmm.headers.unreadable", b"a header key is not UTF-8: the input's headers are left out"),)


def message_headers(m: Message) -> tuple:
    """The message's headers, or UNREADABLE_HEADERS where the client cannot read them."""
    try:
        return tuple(m.headers() or ())
    except Exception:  # noqa: BLE001 (SystemError today; whatever a later client raises instead)
        return UNREADABLE_HEADERS


def split_by_partition(messages: list[Message]) -> dict[tuple[str, int], list[Message]]:
    """librdkafka hands each partition's messages over in offset order, usually as one run."""
    by_partition: dict[tuple[str, int], list[Message]] = {}
    topics = list(map(_TOPIC, messages))
    partitions = list(map(_PARTITION, messages))
    start = 0
    for i in range(1, len(messages) + 1):
        if i == len(messages) or partitions[i] != partitions[start] or topics[i] != topics[start]:
            by_partition.setdefault((topics[start], partitions[start]), []).extend(messages[start:i])
            start = i
    return by_partition


def as_batch(by_partition: dict[tuple[str, int], list[Message]]) -> PolledBatch:
    """One batch of the messages of some partitions, each partition's in offset order."""
    lists = list(by_partition.values())
    messages = lists[0] if len(lists) == 1 else [m for part in lists for m in part]
    stamps = np.fromiter((t[1] for t in map(_TIMESTAMP, messages)), dtype=np.int64, count=len(messages))
    last_offsets = {tp: part[-1].offset() for tp, part in by_partition.items()}
    return PolledBatch(messages, list(map(_VALUE, messages)), stamps.astype(float), last_offsets)


# How often the loop's thread looks up from a commit or a flush in flight (to serve signals, and
# to see whether it should give up).
WAIT_STEP_SECONDS = 0.2
# A commit still unanswered after this long is a WARNING (the loop waits for it).
COMMIT_SLOW_SECONDS = 10.0


def flush_in_steps(producer, timeout: float, give_up: Callable[[], bool] | None = None) -> int:
    """``producer.flush(timeout)`` in steps of WAIT_STEP_SECONDS: Python runs signal
    handlers only between them (a SIGTERM during a 30 s flush to a hung broker waited for all of
    it).  Stops early when ``give_up()``; returns how many records are still pending."""
    deadline = time.monotonic() + timeout
    while True:
        pending = producer.flush(max(0.0, min(WAIT_STEP_SECONDS, deadline - time.monotonic())))
        if not pending or time.monotonic() >= deadline or (give_up is not None and give_up()):
            return pending


class KafkaSource:
    """The consumer: subscribe with rebalance callbacks, poll batches, seek, commit."""

    def __init__(self, settings: dict, topics: tuple[str, ...], *, on_assign: Callable, on_revoke: Callable,
                 on_lost: Callable, on_error: Callable[[KafkaError], None]):
        self.consumer = Consumer({**settings, "error_cb": on_error, "logger": logging.getLogger("librdkafka")})
        self.wedged = False  # a commit the broker never answered is still running (see ``commit``)
        self.consumer.subscribe(list(topics), on_assign=lambda c, tps: on_assign(tps),
                                on_revoke=lambda c, tps: on_revoke(tps), on_lost=lambda c, tps: on_lost(tps))

    def unavailable(self, topics, timeout: float) -> dict[str, str]:
        """Why each of ``topics`` that cannot be read now cannot ({} when all can): it does not
        exist, this consumer may not read it, or the broker's error.  Asking creates no topic (a
        consumer does not ask for auto-creation); KafkaException when the cluster cannot be asked."""
        words = {TOPIC_MISSING: "does not exist: create it or fix kafka.input_topics",
                 TOPIC_FORBIDDEN: "may not be read by this consumer: grant it, or fix kafka.security",
                 PATTERN_UNMATCHED: "matches no topic: create one or fix kafka.input_topics"}
        problems = {topic: pattern_problem(self.consumer, topic, timeout) if topic.startswith("^")
                    else topic_problem(self.consumer, topic, timeout) for topic in topics}
        return {topic: words.get(problem, problem) for topic, problem in problems.items() if problem is not None}

    def poll(self, max_messages: int, timeout_seconds: float) -> dict[tuple[str, int], list[Message]]:
        """The next messages by partition (errors logged and dropped)."""
        # consume(n, timeout) waits until it has n messages or the timeout passed: a live stream
        # would wait the whole timeout every time.  So: what is queued now; else wait for the
        # first message only, and take what has queued behind it.
        messages = self.consumer.consume(num_messages=max_messages, timeout=0)
        if not messages:
            messages = self.consumer.consume(num_messages=1, timeout=timeout_seconds)
            if not messages:
                return {}
            if max_messages > 1:
                try:
                    messages += self.consumer.consume(num_messages=max_messages - 1, timeout=0)
                except KafkaException as exc:  # the first is ours already: raising would lose it
                    log.warning("consume failed after its first message (%s); going on with that one",
                                kafka_error_text(exc))
        if any(map(_ERROR, messages)):
            good = []
            for m in messages:
                error = m.error()
                if error is None:
                    good.append(m)
                elif error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error on %s/%s: %s", m.topic(), m.partition(), error.str())
            messages = good
        return split_by_partition(messages)

    def committed(self, partitions: list[TopicPartition], timeout: float = 10.0) -> dict[tuple[str, int], int]:
        """The group's committed offsets of ``partitions`` (those that have one).  Raises
        KafkaException when the group cannot say for any of them: a partition left out because
        its read failed would pass for one never committed, and be resumed behind its commit."""
        found = self.consumer.committed(partitions, timeout=timeout)
        failed = [tp for tp in found if tp.error is not None]
        if failed:
            raise KafkaException(failed[0].error)
        return {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.consumer.assign(partitions)

    def pause(self, partitions) -> None:
        """Stop fetching these assigned (topic, partition)s; what was fetched of them is purged and
        each keeps its position until ``resume``."""
        self.consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions) -> None:
        """Fetch these paused (topic, partition)s again.  Seek one only after resuming it: before
        librdkafka 1.9 a resume went back to the offset saved at the pause and lost a seek made
        while paused (librdkafka #3471)."""
        self.consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.consumer.seek(TopicPartition(topic, partition, offset))

    def commit(self, offsets: dict[tuple[str, int], int], give_up: Callable[[], bool] | None = None) -> None:
        """Commit synchronously; raises KafkaException when the group refuses it, or when
        ``give_up()`` turns true before the broker answered.  ``give_up`` None: on this thread,
        waiting as long as librdkafka does; so from a rebalance callback, where the loop's thread
        is inside ``consume()`` and a commit from another thread never returned (measured: a
        hand-over on revoke waited until the process was stopped).

        A broker that holds its connections without answering (stopped, not dead) held the
        synchronous commit for minutes: the loop froze and a SIGTERM was never served (Python
        runs signal handlers only between bytecodes).  So the commit runs on a thread of its own
        and the loop's thread waits for it in short sleeps, signals served in between.  After
        giving up, this consumer is not called again (librdkafka hung a second call on a consumer
        busy in another thread): ``wedged`` is set and ``close`` leaves it as it is.
        """
        if not offsets:
            return
        partitions = [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
        if give_up is None:
            self.consumer.commit(offsets=partitions, asynchronous=False)
            return
        outcome: list[BaseException | None] = []

        def commit() -> None:
            try:
                self.consumer.commit(offsets=partitions, asynchronous=False)
                outcome.append(None)
            except BaseException as exc:  # handed to the loop's thread
                outcome.append(exc)

        worker = threading.Thread(target=commit, name="streamgmm-commit", daemon=True)
        worker.start()
        started, said = time.monotonic(), False
        while worker.is_alive():
            worker.join(WAIT_STEP_SECONDS)
            if worker.is_alive() and not said and time.monotonic() - started >= COMMIT_SLOW_SECONDS:
                said = True  # a hung broker stalled the loop with nothing in the log
                log.warning("the offset commit has waited %.0f s for the broker, which does not answer; the loop "
                            "waits for it (a stop gives it up)", time.monotonic() - started)
            if worker.is_alive() and give_up():
                self.wedged = True
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the broker did not answer the offset commit"))
        if outcome and outcome[0] is not None:
            raise outcome[0]

    def end_offset(self, topic: str, partition: int, timeout: float = 5.0, *, start: bool = False) -> int | None:
        """The partition's log end now (``start``: its first offset), asked of the broker (None if
        it cannot say in time)."""
        try:
            low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
        except (KafkaException, RuntimeError):
            return None
        offset = low if start else high
        return offset if offset >= 0 else None

    def partitions_now(self, timeout: float) -> frozenset[tuple[str, int]] | None:
        """Every (topic, partition) of the cluster now (None if it cannot say in time)."""
        try:
            topics = self.consumer.list_topics(timeout=timeout).topics
        except (KafkaException, RuntimeError):
            return None
        return frozenset((topic, partition) for topic, found in topics.items() for partition in found.partitions)

    def cached_watermarks(self, partitions) -> dict[tuple[str, int], tuple[int, int]]:
        """(low, high) of each partition as librdkafka last fetched them: no broker request."""
        found = {}
        for topic, partition in partitions:
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except (KafkaException, RuntimeError):
                continue
            if high >= 0:
                found[(topic, partition)] = (low, high)
        return found

    def close(self) -> None:
        if self.wedged:
            log.warning("leaving the consumer unclosed: its offset commit is still waiting for the broker; the "
                        "group expires this member after session.timeout.ms")
            return
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:  # closing is best effort at shutdown
            log.warning("closing the consumer: %s", exc)


class WatermarkReader:
    """Partitions' (low, high) watermarks asked of the broker, for the metrics thread when the
    loop has stalled (the loop's own consumer must not be called from another thread while it
    is inside ``consume()``: measured, the call hangs).  A client of its own, never subscribed;
    one scrape spends at most ``budget`` seconds on it."""

    def __init__(self, settings: dict, budget: float = 1.0):
        self.consumer = Consumer({**settings, "group.id": f"{settings.get('group.id', 'streamgmm')}-watermarks",
                                  "logger": logging.getLogger("librdkafka")})
        self.budget = budget
        self._lock = threading.Lock()

    def __call__(self, partitions) -> dict[tuple[str, int], tuple[int, int]]:
        found: dict[tuple[str, int], tuple[int, int]] = {}
        if not self._lock.acquire(timeout=self.budget):
            return found  # another scrape is asking
        try:
            deadline = time.monotonic() + self.budget
            for topic, partition in partitions:
                left = deadline - time.monotonic()
                if left <= 0.05:
                    break
                try:
                    low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=left)
                except (KafkaException, RuntimeError):
                    continue  # no sample rather than a stale one
                if high >= 0:
                    found[(topic, partition)] = (low, high)
            return found
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self.consumer.close()


# ----------------------------------------------------------------------------- sink
# An output topic that does not exist (a broker with auto.create.topics.enable=false): not a fault
# of the record, so not a reason to drop it.  The daemon rewinds and tries again, with back-off,
# until someone creates the topic; nothing is lost meanwhile, and the lag and rewinds say so.
# Except for an optional output (the scores topic): its records are dropped and counted.
MISSING_TOPIC = (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART)
# Produce errors that pass: a delivery report's KafkaError.retriable() is always False
# (confluent-kafka makes it from the bare code), so a broker's retriable codes are named here,
# those Kafka's producer retries.  With the default retries librdkafka retries them itself and
# reports _MSG_TIMED_OUT if they last; with `retries` lowered they came through as they are,
# and an anomaly refused with NOT_ENOUGH_REPLICAS was dropped as refused for good (helper-82).
TRANSIENT_PRODUCE_ERRORS = frozenset((
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._QUEUE_FULL,
    KafkaError._ALL_BROKERS_DOWN, KafkaError._NODE_UPDATE, KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION, KafkaError.KAFKA_STORAGE_ERROR,
    KafkaError.BROKER_NOT_AVAILABLE, KafkaError.REPLICA_NOT_AVAILABLE, KafkaError.UNKNOWN_LEADER_EPOCH,
    KafkaError.THROTTLING_QUOTA_EXCEEDED, KafkaError.INVALID_MSG,  # (a CRC failure in transit)
    KafkaError._INVALID_DIFFERENT_RECORD,  # (good, failed beside another record of its batch that was not)
))


def missing_topics(producer, topics, timeout: float = 2.0) -> list[str]:
    """Those of ``topics`` the cluster says do not exist (a metadata request, which creates them
    where the broker auto-creates topics).  A broker that does not answer within ``timeout``:
    no more asked, none reported (start-up is not held up, nor a signal during it, by an outage)."""
    missing = []
    for topic in topics:
        try:
            if topic_problem(producer, topic, timeout) == TOPIC_MISSING:
                missing.append(topic)
        except KafkaException:
            break
    return missing


TOPIC_MISSING, TOPIC_FORBIDDEN, PATTERN_UNMATCHED = "missing", "forbidden", "unmatched"


def pattern_problem(client, pattern: str, timeout: float) -> str | None:
    """PATTERN_UNMATCHED when no topic of the cluster matches a ^regex subscription (asked of
    the broker as a topic name, the pattern was "Broker: Invalid topic", an ERROR at every start
    and in /readyz; helper-44).  KafkaException when the cluster cannot be asked."""
    names, matcher = client.list_topics(timeout=timeout).topics, topic_pattern(pattern)  # (valid: the config checked it)
    return None if any(matcher.search(name) for name in names) else PATTERN_UNMATCHED


def topic_problem(client, topic: str, timeout: float) -> str | None:
    """What the cluster says of ``topic`` to this client (a metadata request, which creates it
    where the broker auto-creates topics for this client): None if it can be used,
    TOPIC_MISSING, TOPIC_FORBIDDEN, or the broker's error in words.  KafkaException when the
    cluster cannot be asked."""
    found = client.list_topics(topic, timeout=timeout).topics.get(topic)
    error = None if found is None else found.error
    if found is None or (error is not None and error.code() in MISSING_TOPIC):
        return TOPIC_MISSING
    if error is not None:
        return TOPIC_FORBIDDEN if error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED else error.str()
    return None


@dataclass
class Deliveries:
    """What became of the records sent since the last ``take``."""

    transient: int = 0  # failed but might succeed if sent again: rewind and send again
    permanent: int = 0  # can never be produced (too large, not authorised ...): counted, not retried
    transient_reasons: set = field(default_factory=set)


class KafkaSink:
    """The producer: output records out, delivery reports counted.

    A record the broker refuses for good (``permanent``) is logged with its source and counted;
    it must not hold the stream up.  One that failed for a passing reason (``transient``) makes
    the daemon rewind to its last checkpoint and produce it again.
    """

    def __init__(self, settings: dict, *, on_error: Callable[[KafkaError], None],
                 on_permanent: Callable[[OutputRecord, str], None], optional_topics: frozenset = frozenset()):
        self.producer = Producer({**settings, "error_cb": on_error, "logger": logging.getLogger("librdkafka")})
        self.on_permanent = on_permanent
        # Topics whose records may be dropped when the topic is missing (the scores topic): a
        # missing optional output must not hold up the anomalies and the checkpoints.
        self.optional_topics = optional_topics
        self.deliveries = Deliveries()

    def send(self, record: OutputRecord) -> None:
        def delivered(error, _message, record=record):
            if error is not None:
                self._failed(record, error)

        for attempt in range(100):
            try:
                self.producer.produce(record.topic, value=record.value, key=record.key, headers=record.headers,
                                      on_delivery=delivered)
                return
            except BufferError:  # the local queue is full: serve delivery reports, then again
                self.producer.poll(0.1)
            except KafkaException as exc:  # refused before sending (e.g. larger than message.max.bytes)
                self._failed(record, exc.args[0])
                return
        self._failed(record, KafkaError(KafkaError._QUEUE_FULL, "the producer's queue stayed full for 10 s"))

    def _failed(self, record: OutputRecord, error: KafkaError) -> None:
        if error.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
            return  # dropped by a rewind, which produces it again
        missing_topic = error.code() in MISSING_TOPIC
        transient = (error.retriable() or error.code() in TRANSIENT_PRODUCE_ERRORS
                     or (missing_topic and record.topic not in self.optional_topics))
        if transient:
            self.deliveries.transient += 1
            self.deliveries.transient_reasons.add(f"{record.topic}: {error.str()}")
        else:
            self.deliveries.permanent += 1
            self.on_permanent(record, error.str())

    def serve(self) -> None:
        """Run the delivery callbacks that are due (cheap; call once a loop)."""
        self.producer.poll(0)

    def flush(self, timeout: float, give_up: Callable[[], bool] | None = None) -> int:
        """Wait for every record sent so far to be acknowledged or failed; how many are still
        pending.  In short steps, so that signals are served between them and ``give_up()`` (a
        stop that has waited long enough) ends the wait early."""
        return flush_in_steps(self.producer, timeout, give_up)

    def take(self) -> Deliveries:
        taken, self.deliveries = self.deliveries, Deliveries()
        return taken

    def discard_pending(self) -> None:
        """Drop what is queued and not yet sent (a rewind produces it again)."""
        try:
            self.producer.purge(in_queue=True, in_flight=False)
            self.producer.poll(0)
        except (KafkaException, RuntimeError):
            pass

    def close(self, timeout: float = 10.0) -> None:
        remaining = flush_in_steps(self.producer, timeout)
        if remaining:
            log.warning("closing the producer with %d record(s) unacknowledged", remaining)


# ---------------------------------------------------------------------------- admin
def ensure_topic(settings: dict, topic: str, config: dict | None = None, timeout: float = 15.0,
                 partitions: int = 1) -> None:
    """Create ``topic`` unless it exists (asked first: a principal allowed to use a topic that
    was made for it, but not to create topics, is refused a create even of an existing one)."""
    # Asking must not create it: a broker's auto-creation would skip ``config`` (compaction).
    admin = AdminClient({**{k: v for k, v in settings.items() if k not in ("error_cb", "logger")},
                         "allow.auto.create.topics": False})
    metadata = admin.list_topics(topic, timeout=timeout)
    if topic in metadata.topics and metadata.topics[topic].error is None:
        return
    futures = admin.create_topics([NewTopic(topic, partitions, 1, config=config or {})], operation_timeout=timeout)
    try:
        futures[topic].result(timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


def read_topic(settings: dict, topic: str, timeout: float = 30.0,
               max_seconds: float | None = None) -> Iterator[Message]:
    """Every message of ``topic`` from its log start up to its high watermark when read, as they
    come (a caller that keeps only some of them never holds the whole topic).  Raises
    KafkaException (_TIMED_OUT) when nothing comes for ``timeout`` seconds, or after
    ``max_seconds`` in all (None: no limit): a long topic read steadily is not cut short (a state
    topic a broker does not compact grows), but a rebalance callback that reads it must end
    before max.poll.interval.ms."""
    consumer = Consumer({**{k: v for k, v in settings.items() if k not in ("error_cb",)},
                         "group.id": f"streamgmm-reader-{time.monotonic_ns()}", "enable.auto.commit": False,
                         "enable.partition.eof": False, "logger": logging.getLogger("librdkafka")})
    deadline = time.monotonic() + timeout
    end = math.inf if max_seconds is None else time.monotonic() + max_seconds
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        starts, ends = {}, {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                starts[p], ends[p] = low, high
        if not ends:
            return
        # From the log start, not offset 0: below it the consumer's auto.offset.reset would decide.
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in ends])
        positions = {p: -1 for p in ends}
        while time.monotonic() < deadline and any(positions[p] < ends[p] - 1 for p in ends):
            for m in consumer.consume(num_messages=1000, timeout=0.5):
                if m.error() is None:
                    positions[m.partition()] = m.offset()
                    deadline = min(time.monotonic() + timeout, end)
                    yield m
        if any(positions[p] < ends[p] - 1 for p in ends):
            why = (f"nothing came for {timeout:g} s" if time.monotonic() < end else
                   f"still not read to its end after {max_seconds:g} s")
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"reading {topic}: {why}"))
    finally:
        consumer.close()
