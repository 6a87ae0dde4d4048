"""What the daemon's loop sees of its inputs that an operator must be told, and is not an error
of the loop itself: why no partition is assigned, input topics that cannot be read, partitions
whose next offset is past the end of their log, and batches that are mostly dead-lettered or
stamped oddly.  Each is said in the log once (or at most once in a while), in /readyz, and where
it has one in a metric; nothing here changes what the loop reads or decides.

The loop's thread calls the ``look_*`` / ``after_*`` methods; the metrics thread reads the
public attributes for /readyz (each replaced whole, never changed in place).
"""

from __future__ import annotations

import logging
import math
import time

from confluent_kafka import KafkaException

from .kafka import kafka_error_text
from .partitions import partition_names

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]

# With no partition assigned, the loop asks the cluster this often why (broker unreachable,
# input topics missing), for /readyz and the log; each question waits at most the timeout.
UNASSIGNED_CHECK_SECONDS = 15.0
UNASSIGNED_CHECK_TIMEOUT_SECONDS = 2.0
# Input topics with no partition here (normal in a group) are asked after this often.
UNREADABLE_INPUT_CHECK_SECONDS = 60.0
# A partition whose next offset is past its log's end for this long is reported.
PAST_THE_END_SECONDS = 30.0
# A batch of at least this many messages, more than half of them dead-lettered, is logged as a
# WARNING, at most this often.
MOSTLY_INVALID_MIN_BATCH = 20
# A warning about the input (mostly invalid, stamped in the future) is repeated at most this often.
INPUT_WARNING_EVERY_SECONDS = 60.0
# A batch with a message stamped this long before its decision says so, at most this often.
ODD_LATENCY_SECONDS = 86_400.0
OLD_TIMESTAMPS_EVERY_SECONDS = 3_600.0


class InputWatch:
    """The input's troubles the loop tells of (see the module's docstring)."""

    def __init__(self, input_topics: list[str], bootstrap_servers: list[str], metrics):
        self.input_topics = input_topics
        self.bootstrap_servers = bootstrap_servers
        self.metrics = metrics
        # Why no partition is assigned, when the cluster says (None: joining, or a standby
        # member), and since when none is.
        self.unassigned_reason: str | None = None
        self.unassigned_since = time.monotonic()
        self._unassigned_checked = -math.inf
        # Input topics this member has no partition of that the cluster says cannot be read (why).
        self.inputs_unavailable: dict[str, str] = {}
        self._inputs_checked = -math.inf
        # Assigned partitions whose next offset is past the end of their log (the topic was
        # recreated, or the broker lost data): {tp: (position, log end)}; nothing is read of them.
        self.past_the_end: dict[TopicPartitionKey, tuple[int, int]] = {}
        self._past_the_end_since: dict[TopicPartitionKey, float] = {}
        self._warned_at: dict[str, float] = {}  # when each repeated warning was last logged (see _due)

    def none_assigned(self) -> None:
        """The last partition went: /readyz counts how long none has been assigned from now."""
        self.unassigned_since = time.monotonic()

    # ------------------------------------------------------------ assignment
    def look_at_assignment(self, source, assigned) -> None:
        """With nothing assigned for a while, ask the cluster why: unreachable, or input topics
        that do not exist (a standby member or a group still joining has neither).  With
        partitions assigned, look for input topics none of whose partitions are here."""
        now = time.monotonic()
        if assigned:
            self.unassigned_reason = None
            self._look_for_unreadable_inputs(source, assigned, now)
            return
        if now - self._unassigned_checked < UNASSIGNED_CHECK_SECONDS:
            return
        self.inputs_unavailable = {}  # (the question below covers every input topic)
        self._unassigned_checked = now
        try:
            problems = source.unavailable(self.input_topics, UNASSIGNED_CHECK_TIMEOUT_SECONDS)
            reason = "; ".join(f"input topic {topic} {why}" for topic, why in problems.items()) or None
        except KafkaException as exc:
            reason = f"cannot reach Kafka at {','.join(self.bootstrap_servers)} ({kafka_error_text(exc)})"
        if reason is not None and reason != self.unassigned_reason:
            log.error("no partitions assigned: %s", reason)
        self.unassigned_reason = reason

    def _look_for_unreadable_inputs(self, source, assigned, now: float) -> None:
        """Input topics none of whose partitions are here: one the cluster says cannot be read is
        an ERROR once (and in /readyz), and its coming back is said.  With partitions of another
        topic assigned, a missing one was said once at start and never again (helper-35)."""
        here = {topic for topic, _ in assigned}
        if came := [topic for topic in self.inputs_unavailable if topic in here]:
            log.info("input topic %s is read now", ", ".join(came))
            self.inputs_unavailable = {t: why for t, why in self.inputs_unavailable.items() if t not in here}
        # (a "^regex" subscription names no topic to ask about)
        absent = [t for t in self.input_topics if t not in here and not t.startswith("^")]
        if not absent:
            self.inputs_unavailable = {}
            return
        if now - self._inputs_checked < UNREADABLE_INPUT_CHECK_SECONDS:
            return  # a metadata request on the loop's thread: rare (a member without a topic is normal)
        self._inputs_checked = now
        try:
            problems = source.unavailable(absent, UNASSIGNED_CHECK_TIMEOUT_SECONDS)
        except KafkaException:
            return  # the loop's own errors say so
        for topic, why in problems.items():
            if topic not in self.inputs_unavailable:
                log.error("input topic %s %s; the other input topics are read", topic, why)
        for topic in set(self.inputs_unavailable) - set(problems):
            log.info("input topic %s can be read now: its partitions are assigned within the consumer's "
                     "topic.metadata.refresh.interval.ms (30 s by default here)", topic)
        self.inputs_unavailable = problems

    # ------------------------------------------------------------- positions
    def look_at_positions(self, watermarks: dict, positions: dict, held, assigned) -> None:
        """An assigned partition whose next offset is past the end of its log reads nothing and
        shows no lag: a topic deleted and made again, or a broker that lost its data (a Kafka
        broker answers OFFSET_OUT_OF_RANGE and librdkafka applies auto.offset.reset; Tansu just
        returns nothing).  Said once per partition (ERROR), in /readyz and in a gauge."""
        now, past = time.monotonic(), {}
        for tp, (_, end) in watermarks.items():
            position = positions.get(tp)
            if position is None or position <= end or tp in held:
                self._past_the_end_since.pop(tp, None)
                continue
            # librdkafka keeps a partition's last fetched end across a revoke and an assignment:
            # a partition handed back after another member moved it on looks past its end until
            # the next fetch. Only a lasting one counts.
            if now - self._past_the_end_since.setdefault(tp, now) < PAST_THE_END_SECONDS:
                continue
            past[tp] = (position, end)
            if tp not in self.past_the_end:
                log.error("%s/%d: the next offset to read, %d, has been past the end of its log (%d) for %.0f s: "
                          "the topic was deleted and made again, or the broker lost data, and nothing of it is "
                          "read until the log reaches that offset. If the topic was made again, its messages can "
                          "only be read from the start by a model and a group that have not read the old one "
                          "(another checkpoint.dir or checkpoint.topic, and kafka.group_id)",
                          *tp, position, end, now - self._past_the_end_since[tp])
        self._past_the_end_since = {tp: t for tp, t in self._past_the_end_since.items() if tp in assigned}
        if past != self.past_the_end:
            self.past_the_end = past
            self.metrics.partitions_past_log_end.set(len(past))

    # --------------------------------------------------------------- batches
    def after_batch(self, result, partitions) -> None:
        """What a processed batch says of its input: mostly dead-lettered, or stamped oddly."""
        self._warn_of_mostly_invalid(result)
        self._warn_of_odd_timestamps(result, partitions)

    def _warn_of_mostly_invalid(self, result) -> None:
        """A batch mostly dead-lettered says so in the log, at most once a minute: a member with
        the wrong input.* dead-letters (and commits) everything, and counters alone do not say
        why."""
        n_invalid = sum(result.invalid_reasons.values())
        if result.n_records < MOSTLY_INVALID_MIN_BATCH or 2 * n_invalid <= result.n_records:
            return
        if not self._due("mostly invalid", INPUT_WARNING_EVERY_SECONDS):
            return
        log.warning("%d of %d messages of a batch were dead-lettered (%s; e.g. %s): if all of them are, check "
                    "input.format, input.dimension and input.fields against what the producers send",
                    n_invalid, result.n_records,
                    ", ".join(f"{reason} {count}" for reason, count in result.invalid_reasons.most_common()),
                    result.invalid_example)

    def _warn_of_odd_timestamps(self, result, partitions) -> None:
        """Message timestamps in the future (at most once a minute), or more than a day old (once
        an hour), say so in the log: they went into the latency histogram (an hour ahead as 0, 25
        years old as a sum of 7.9e11 s) and nothing said why its percentiles moved (helper-49).
        A day-old message is a backlog as often as a wrong clock: the line says which partitions
        to look at."""
        oldest = float(result.latencies_seconds.max(initial=0.0))
        if result.n_future_timestamps and self._due("future timestamps", INPUT_WARNING_EVERY_SECONDS):
            log.warning("%d message(s) of a batch of %s are stamped up to %.0f s after they were decided: a "
                        "producer's clock is ahead, or its timestamps are not milliseconds; they are left out of "
                        "end_to_end_latency_seconds (streamgmm_future_timestamps_total)", result.n_future_timestamps,
                        partition_names(sorted(partitions)), result.future_lead_seconds)
        # Once an hour: catching up a backlog days old is no fault, said every minute it was noise.
        if oldest >= ODD_LATENCY_SECONDS and self._due("old timestamps", OLD_TIMESTAMPS_EVERY_SECONDS):
            log.warning("a batch of %s holds messages stamped %.1f days before they were decided: a backlog, or a "
                        "producer whose clock or timestamps are wrong; end_to_end_latency_seconds counts them",
                        partition_names(sorted(partitions)), oldest / 86_400.0)

    def _due(self, warning: str, every_seconds: float) -> bool:
        """Whether ``warning`` may be logged now (at most once every ``every_seconds``); if so,
        it is taken as logged."""
        now = time.monotonic()
        if now - self._warned_at.get(warning, -math.inf) < every_seconds:
            return False
        self._warned_at[warning] = now
        return True
