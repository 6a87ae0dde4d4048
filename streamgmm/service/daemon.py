"""The daemon: a composition root and one loop on one thread.

    poll -> process -> send -> observe -> checkpoint when due

Delivery: a checkpoint (model + threshold + the next offset of every input partition) is
written only after the producer has had every anomaly and dead letter of the messages it
covers acknowledged; the same offsets are then committed to the consumer group.  A partition
is resumed at the later of its checkpoint offset and the group's committed offset, so each
message is learned exactly once even when a commit failed or another member moved on.  After
output the broker did not acknowledge, the daemon rewinds to its last checkpoint and produces
it again (at-least-once output; ``source`` topic/partition/offset identify duplicates).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import numpy as np
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from ..detection.detector import AdoptionChange, Detector
from ..detection.explain import model_geometry, outlying_components
from ..detection.records import OutputRecord
from .checkpointer import Checkpointer, Outcome
from .config import Config, as_dict, masked
from .kafka import (KafkaSink, KafkaSource, WatermarkReader, as_batch, check_settings, client_settings,
                    ensure_topic, flush_in_steps, kafka_error_text, message_max_bytes, missing_topics)
from .metrics import HealthServer, Metrics
from .partitions import HeldPartitions, later_offset
from .models import Models, StartupError, another_pipelines_model, is_idle
from .state import (GLOBAL_KEY, CheckpointError, CheckpointSpaceError, LocalStateStore, TopicStateStore,
                    model_key)
from .watch import InputWatch

log = logging.getLogger(__name__)


# The loop polls at least every poll_timeout_ms (or its retry back-off) while alive; longer
# than this without a poll, and the lag is asked of the broker at scrape time.
LOOP_STALL_SECONDS = 30.0
# A warm-up state record beyond its rows' 8 bytes a value: the record's other fields, its JSON and
# checksum (helper-56: 1,565,304 bytes for 3,000 rows of 64, 29 KB over the rows).
WARMUP_RECORD_OVERHEAD = 64 * 1024
# While the global model warms up, polls without waiting to gather every partition's first
# messages (see Daemon._gather_for_warm_up).
WARM_UP_GATHER_POLLS = 20
WARM_UP_GATHER_SECONDS = 1.0
# ... and /readyz says not ready after this long without a poll (a large warm-up fit takes a
# few seconds; a broker that hangs a checkpoint's flush, up to its 30 s timeout).
READY_STALL_SECONDS = 10.0
# auto.offset.reset latest: the most an assignment waits for the logs' ends (see _pin_latest).
PIN_LATEST_BUDGET_SECONDS = 5.0
# After a stop is asked, a commit the broker has not answered is given up after this long (the
# checkpoint already holds its offsets); systemd's TimeoutStopSec is 90 s.
STOP_COMMIT_WAIT_SECONDS = 15.0
COMMIT_LEAST_WAIT_SECONDS = 5.0
# After a stop is asked, a checkpoint waits this long at most for output to be acknowledged.
STOP_FLUSH_WAIT_SECONDS = 10.0
# After a refused commit the group is asked this long whether it took the offsets anyway (a
# timeout is not a refusal).
GROUP_ASK_SECONDS = 2.0
# Closing, the producers wait this long for what is still unacknowledged; after a stop whose last
# checkpoint failed, the shorter.
CLOSE_FLUSH_SECONDS = 10.0
UNCLEAN_CLOSE_FLUSH_SECONDS = 1.0
# With no space to make checkpoint.dir's lock file, the start waits and tries again this often.
LOCK_RETRY_SECONDS = 5.0
# Why a rewind is pending when its seek back failed: tried again next turn, the same rewind.
SEEK_BACK_FAILED = "a seek back to the checkpoint failed"
# A commit refused with these: the group has moved on without this member.
MEMBERSHIP_LOST = frozenset({KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
                             KafkaError.REBALANCE_IN_PROGRESS, KafkaError.FENCED_INSTANCE_ID})


def _log_adoption(key: str, detector: Detector, change: AdoptionChange) -> None:
    """Adoption starts or ends: the model's idea of normal changes, which nothing said (an
    operator saw 838 outliers in a row go unflagged and a new component in `inspect`; helper-44)."""
    t = detector.config.threshold
    if change.adopting:
        log.warning("model %s: %.1f%% of the points flagged over the last ~%d, above threshold.adopt_flag_rate "
                    "%.2f%% for %d points: taken as a new regime, flagged points are learned from now on "
                    "(threshold.adopt: false keeps them anomalies)", key, 100 * change.flag_rate, t.adopt_window,
                    100 * detector.adopt_flag_rate, change.points_above)
    else:
        log.info("model %s: the flagged share fell to %.2f%%: the new regime is learned, flagged points are "
                 "no longer learned", key, 100 * change.flag_rate)


OUTLYING_MIN_POINTS = 4


def _log_warm_model(key: str, detector: Detector, seconds: float) -> None:
    """Say the model a warm-up made (nothing was scored before it; /readyz counted up to it)."""
    model = detector.model
    weights = np.asarray(model.weights_)
    log.info("%s: warm-up done on %d points in %.2f s: %d component(s), %s covariances (weights %s); scoring "
             "from here", key, model.warmup, seconds, model.n_components_, model.covariance_type_,
             ", ".join(f"{w:.3f}" for w in sorted(weights, reverse=True)))
    names = detector.feature_names
    # (At least OUTLYING_MIN_POINTS of the warm-up's points: fewer are a heavy tail's far points.)
    for far in outlying_components(model_geometry(model), min_share=OUTLYING_MIN_POINTS / max(model.n_seen_, 1)):
        log.warning("%s: a component of %.1f%% of the warm-up lies %.0f sd from every other (most in %s: %.4g, "
                    "against %.4g): a mode of the data, or anomalies present from the start, which are normal "
                    "from now on. If they are anomalies, start from `streamgmm fit` on a clean sample "
                    "(model.init_from)", key, 100 * far.share, far.distance_sd, names[far.feature], far.value,
                    far.expected, extra={"event": True})


def _why_there(checkpointed: int | None, committed: int | None) -> str:
    """Where a partition resumes, said when the model's checkpoint and the group's commit differ:
    an operator who moved the group's offsets (or another member that read on) sees which won
    and how many messages lie between."""
    if checkpointed is None and committed is not None:
        # (after a fall-back to an older checkpoint that lacks it, too: helper-35)
        return " (the group's commit; the model's checkpoint has no offset for it)"
    if checkpointed is None or committed is None or checkpointed == committed:
        return ""
    if committed > checkpointed:
        return (f" (the group's commit; the model's checkpoint is at {checkpointed}: {committed - checkpointed} "
                "message(s) between were learned by another member, or by this model in a newer checkpoint since "
                "lost, or skipped by a move of the group's offsets)")
    return (f" (the model's checkpoint; the group's commit is behind it at {committed}: not read again, the model "
            "has learned them)")


def warmup_record_problem(config: Config) -> str | None:
    """Until the model is made its state record carries the warm-up's rows (8 bytes a value):
    model.warmup x 64 features over 1 MB failed every write for the whole warm-up, the group's
    commit waiting (helper-56).  What is wrong, with the most rows that fit, or None (or no
    state topic)."""
    if not config.checkpoint.topic:
        return None
    m, d = config.model, config.input.dimension
    limit = message_max_bytes(client_settings(config, "producer"))
    size = 8 * m.warmup * d + WARMUP_RECORD_OVERHEAD
    if size < limit:
        return None
    fits = max((limit - WARMUP_RECORD_OVERHEAD) // (8 * d), 0)
    fewer = f"use model.warmup of at most {fits:,}, or " if fits >= 1 else ""
    return (f"model.warmup {m.warmup:,} rows of {d} features make state records of about {size:,} bytes while the "
            f"model warms up, more than the producer's message.max.bytes ({limit:,}): {fewer}raise "
            f"kafka.producer.message.max.bytes (and the max.message.bytes of topic {config.checkpoint.topic})")


class Daemon:
    """Runs until ``stop()``; survives broker outages; never exits on its own."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        m = config.model  # a fixed n_components may exceed max_components (12 of 12 series, not 8)
        self.metrics = metrics or Metrics(max_components=max(m.max_components, m.n_components if m.n_components != "auto" else 0))
        self.scope = config.model.scope
        self.local = LocalStateStore(config.checkpoint.dir, config.checkpoint.keep)
        self.models = Models(config, self.local, self.metrics)  # by key: "global", or "topic/partition"
        # With scope: partition and a state topic, models are restored from the topic only: the
        # files are a copy (see Checkpointer.local_is_copy).
        self.checkpointer = Checkpointer(config.checkpoint, self.local, None, self.metrics,
                                         local_is_copy=self.scope == "partition" and bool(config.checkpoint.topic))
        self.source: KafkaSource | None = None
        self.sink: KafkaSink | None = None
        self.server: HealthServer | None = None
        self.watermarks: WatermarkReader | None = None
        # Replaced whole, never changed in place: the metrics thread reads it (readiness).
        self.assigned: frozenset[tuple[str, int]] = frozenset()
        # auto.offset.reset latest: the cluster's partitions at this process's first assignment (see _pin_latest).
        self._partitions_at_start: frozenset[tuple[str, int]] | None = None
        # Next offset to process per assigned partition (read by the lag collector's thread:
        # replaced whole, never mutated).
        self.positions: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._stop_asked_at = 0.0
        # Whether the last stop left everything checkpointed (False: the exit code says so).
        self.clean_stop = True
        # A fatal error of a Kafka client stopped the daemon (its words): the exit is a failure,
        # whatever the last checkpoint (a clean exit 0 left a Restart=on-failure unit down).
        self.fatal_error: str | None = None
        self.source_wedged = False  # the consumer was left with a commit in flight (see KafkaSource.commit)
        self._restored_noted = False  # the checkpoint restored at start judged (see _note_restored)
        self._closing = False  # in _close: no hand-over commits (see _hand_over)
        self._in_rebalance = False  # in a rebalance callback: commits on this thread (see _commit)
        self._rewind_pending: str | None = None
        self._rewinds_in_a_row = 0
        self._error_backoff = config.kafka.retry_backoff_initial_seconds
        self._last_poll = time.monotonic()
        self._loop_watermarks: dict = {}
        self._aborting = False
        self._commit_refused = False
        self._membership_lost = False  # the last commit was refused because the group moved on
        # The group's committed offset of each partition when it was assigned to us: a rewind
        # never goes behind it, even when the group cannot say its commit at that moment (what
        # lies before it was learned by the member that committed it).
        self._commits_at_assignment: dict[tuple[str, int], int] = {}
        # scope: partition: the partitions held paused until their model is restored and they
        # are sought; and, for every scope, the first offset read of each partition.
        # Why nothing is assigned, unreadable inputs, positions past the end, odd batches: said.
        self.watch = InputWatch(config.kafka.input_topics, config.kafka.bootstrap_servers, self.metrics)
        self.held = HeldPartitions(initial_backoff=config.kafka.retry_backoff_initial_seconds,
                                   max_backoff=config.kafka.retry_backoff_max_seconds)
        self.started = False  # start_up() passed: a StartupError now stops a running daemon
        # Why the daemon stops with exit code 2 (a partition's state needs a config change).
        self._fatal: str | None = None

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint, commit and return (signal-safe)."""
        if not self._stop.is_set():
            self._stop_asked_at = time.monotonic()
        self._stop.set()

    def _stopped_for(self, seconds: float) -> bool:
        """Whether a stop was asked at least ``seconds`` ago."""
        return self._stop.is_set() and time.monotonic() - self._stop_asked_at >= seconds

    def _give_up_flush(self) -> bool:
        """Whether a checkpoint's wait for acknowledgements ends now: STOP_FLUSH_WAIT_SECONDS after
        a stop was asked (the unacknowledged output is produced again after the next start)."""
        return self._stopped_for(STOP_FLUSH_WAIT_SECONDS)

    def _give_up_commit(self, started: float) -> Callable[[], bool]:
        """When to give up a commit the broker has not answered: STOP_COMMIT_WAIT_SECONDS after a
        stop was asked, and not before it has had COMMIT_LEAST_WAIT_SECONDS of its own (a last
        checkpoint that waited for output could otherwise leave it none).  The checkpoint holds
        the offsets, and a stop must end (systemd kills after 90 s)."""
        return lambda: (self._stopped_for(STOP_COMMIT_WAIT_SECONDS)
                        and time.monotonic() - started >= COMMIT_LEAST_WAIT_SECONDS)

    @property
    def detector(self) -> Detector:
        """The global detector (scope: global)."""
        return self.models.get(GLOBAL_KEY)

    @property
    def detectors(self) -> dict[str, Detector]:
        return self.models.detectors

    @property
    def topic_store(self) -> TopicStateStore | None:
        """The state topic's store (checkpoint.topic), where partition models are restored from."""
        return self.models.topic_store

    @topic_store.setter
    def topic_store(self, store: TopicStateStore | None) -> None:
        self.models.topic_store = store

    def _has_backlog(self, tp) -> bool:
        """Whether the partition has messages not yet read, or may have (its log's end not yet
        known): a backlog's poll returns one partition's fetch after another, and one not yet
        fetched is not idle (helper-80).  From what the loop last saw (replaced whole by its
        thread, read here by the metrics thread)."""
        watermarks = self._loop_watermarks.get(tp)
        if watermarks is None:
            return True
        low, high = watermarks
        position = self.positions.get(tp)
        return high > (low if position is None else position)

    def readiness(self) -> tuple[bool, str, dict]:
        """(ready, why in words, the state of each assigned partition's model)."""
        if self.source is None:
            return False, "not connected to Kafka yet", {}
        quiet = time.monotonic() - self._last_poll
        if self.started and quiet >= READY_STALL_SECONDS:
            # Blocked in a checkpoint's flush or commit on a broker that hangs: the group may have
            # dropped this member already, and /readyz said "models ready" for 30 s (helper-39).
            return False, (f"the loop has not polled Kafka for {quiet:.0f} s (a checkpoint or commit waiting on the "
                           "broker, or a stall: see the log)"), {}
        if not self.assigned:
            waited = time.monotonic() - self.watch.unassigned_since
            return False, self.watch.unassigned_reason or (
                f"no partitions assigned for {waited:.0f} s (a standby member of the group, or joining; a group "
                f"stuck joining shows here for long: kafka-consumer-groups --describe --group "
                f"{self.config.kafka.group_id})"), {}
        details, warming, idle = {}, [], []
        for tp in sorted(self.assigned):
            topic, partition = tp
            name, detector = f"{topic}/{partition}", self.detectors.get(model_key(self.scope, topic, partition))
            model = None if detector is None else detector.model
            unrestored, unsought = self.held.reasons((topic, partition))
            if unrestored is not None:
                details[name] = f"restoring its model: {unrestored}"
                warming.append(f"{name} (restoring its model)")
            elif unsought is not None:
                details[name] = f"model restored, not yet sought to where it resumes: {unsought}"
                warming.append(f"{name} (seeking)")
            elif model is not None and model.is_initialized:
                details[name] = "ready"
            elif self.scope == "partition" and (detector is None or is_idle(detector)) and not self._has_backlog(tp):
                details[name] = f"idle: no message yet (its model warms up on its first {self.config.model.warmup})"
                idle.append(name)
            else:
                progress = f"{0 if model is None else model.n_buffered_}/{self.config.model.warmup}"
                details[name] = f"warming up {progress}"
                warming.append(f"{name} {progress}")
        for topic, why in dict(self.watch.inputs_unavailable).items():  # (replaced whole by the loop's thread)
            details[topic] = f"input topic {why}"
        past = dict(self.watch.past_the_end)  # (replaced whole by the loop's thread)
        for (topic, partition), (position, end) in sorted(past.items()):
            details[f"{topic}/{partition}"] = f"its next offset {position} is past the end of its log ({end})"
        if past:
            return False, (f"{len(past)} partition(s) past the end of their log (topic recreated, or the broker "
                           "lost data): nothing is read of them"), details
        if warming and self.scope == "global":  # one model: its progress once, not once per partition
            model = self.detectors.get(GLOBAL_KEY)
            return False, (f"warming up the model {0 if model is None else model.model.n_buffered_}/"
                           f"{self.config.model.warmup}"), details
        if warming:
            return False, "warming up " + ", ".join(warming), details
        if len(idle) == len(self.assigned):
            return False, f"no message yet on any of the {len(idle)} partition(s) assigned: nothing to warm up on", details
        words = f"{len(self.assigned)} partition(s) assigned, models ready"
        if idle:
            words += f" ({len(idle)} idle: no message yet)"
        if failures := self.checkpointer.failures:
            # Still ready (scoring and alerting go on), but /readyz said nothing of a disk full for
            # minutes (helper-52).
            age = self.checkpointer.clock() - self.checkpointer.last_written
            # (Before the first success since the start, last_written is the start: "the last written
            # 13 s ago" was said of one written 28 s before, by the process killed then; helper-63.)
            last = (f"the last written {age:.0f} s ago" if self.checkpointer.written_since_start else
                    f"none written since this process started {age:.0f} s ago")
            words += f"; checkpoints failing ({failures} in a row, {last}: see the log)"
        return True, words, details

    # --------------------------------------------------------------- start-up
    def start_up(self) -> None:
        """Everything that can be checked before the loop: raises StartupError/ConfigError."""
        check_settings(self.config)
        if self.config.checkpoint.topic:
            self._check_state_record_size()
        try:
            try:
                self.local.check_writable()
            except CheckpointSpaceError as exc:
                # A full disk passes; a restart during it exited 2, and systemd (RestartPreventExitStatus=2)
                # then left the unit stopped for good where a running daemon rides it out (helper-52).
                if self.checkpointer.local_is_copy:
                    # (The state topic holds the checkpoints and the commits go on: the words for a
                    # local store said they did not; helper-63.  A WARNING, as the README says of a
                    # full or unwritable copy.)
                    log.warning("%s; starting anyway: checkpoints go to the state topic %s and offsets are "
                                "committed as usual; the local copy fails until there is space", exc,
                                self.config.checkpoint.topic)
                else:
                    log.error("%s; starting anyway: scoring and alerts go on, checkpoints are retried with a "
                              "back-off and the offsets stay uncommitted until one is written", exc)
            self._lock_checkpoint_dir()
        except CheckpointError as exc:
            if not self.checkpointer.local_is_copy:
                raise StartupError(str(exc)) from None
            log.warning("%s; going on: the state topic %s holds the models", exc, self.config.checkpoint.topic)
        self.restore()
        self._refuse_another_pipelines_model()
        if self.scope == "partition" and self.config.model.init_from:
            self.models.check_initial()
        if self.scope == "partition" and not self.config.checkpoint.topic:
            log.warning("model.scope=partition without checkpoint.topic: partition models stay on this "
                        "instance's disk and cannot follow their partitions to other instances")
        m = self.config.metrics
        if m.enabled:
            try:
                self.server = HealthServer(self.metrics.registry, m.host, m.port, self.readiness).start()
            except OSError as exc:
                raise StartupError(exc.strerror or str(exc)) from None
            log.info("metrics on http://%s:%d/metrics", m.host, self.server.port)

    def _lock_checkpoint_dir(self) -> None:
        """Lock checkpoint.dir, waiting while there is no space to make its lock file (a new
        directory on a full disk): no daemon runs on a directory it has not locked, and exit code
        2 would leave the unit down for good (review, helper-54)."""
        said = False
        while True:
            try:
                self.local.lock()
                return
            except CheckpointSpaceError as exc:
                if self.checkpointer.local_is_copy:
                    raise  # the state topic holds the models: start_up goes on without the copy's lock
                if not said:
                    log.error("%s; waiting for space (retrying every %.0f s)", exc, LOCK_RETRY_SECONDS)
                    said = True
                if self._stop.wait(LOCK_RETRY_SECONDS):
                    raise StartupError(f"stopped while waiting to lock checkpoint.dir: {exc}") from None

    def _refuse_another_pipelines_model(self) -> None:
        if self.scope == "global" and (detector := self.detectors.get(GLOBAL_KEY)) is not None:
            if why := another_pipelines_model(self.config, detector.offsets):
                raise StartupError(why)
            inputs = self.config.kafka.input_topics
            gone = sorted({topic for topic, _ in detector.offsets} - set(inputs))
            if gone and not any(topic.startswith("^") for topic in inputs):
                log.warning("the restored model also read %s, which is not among kafka.input_topics any more",
                            ", ".join(gone))

    def _check_state_record_size(self) -> None:
        """A model whose statistics alone are over the producer's message.max.bytes can never be
        written to the state topic: refused at start when the size is fixed (K and the covariance
        type set), a warning when auto may grow that large (the write itself then fails, saying so)."""
        m, d = self.config.model, self.config.input.dimension
        limit = message_max_bytes(client_settings(self.config, "producer"))
        k = m.max_components if m.n_components == "auto" else m.n_components
        kind = "full" if m.covariance_type == "auto" else m.covariance_type
        size = 8 * (k * d + {"full": k * d * d, "diag": k * d, "tied": d * d, "spherical": k}[kind])
        if problem := warmup_record_problem(self.config):
            raise StartupError(problem)
        if size < limit:
            return
        what = (f"a model of {k} components with {kind} covariances in {d} dimensions needs state records over "
                f"{size:,} bytes, more than the producer's message.max.bytes ({limit:,}): raise "
                f"kafka.producer.message.max.bytes (and the max.message.bytes of topic {self.config.checkpoint.topic}"
                ") or make the model smaller")
        if m.n_components == "auto" or m.covariance_type == "auto":
            log.warning("model.n_components or model.covariance_type is auto and %s, if it grows that large", what)
        else:
            raise StartupError(what)

    def restore(self) -> None:
        """The models from their newest checkpoints (scope: global; partition models come with
        their partitions)."""
        self.models.restore()

    def _restore_partitions(self, partitions, timeout: float = 30.0) -> list[tuple[str, int]]:
        """scope: partition: a detector for each of these partitions that has none, from the state
        store (else model.init_from, else empty).  One whose state cannot be read now gets none and
        is held (``held.unrestored``; counted once per partition); one whose state this configuration
        cannot use stops the daemon.  Returns the partitions held that were not before."""
        wanted = {key: tp for tp in partitions if (key := model_key(self.scope, *tp)) not in self.detectors}
        if not wanted:
            return []
        # The state restored must reach the group's commit: a newer record behind it is a stale one.
        floors = {key: {tp: self._commits_at_assignment[tp]} for key, tp in wanted.items()
                  if tp in self._commits_at_assignment}
        failed, unusable = self.models.restore_partitions(wanted, floors, timeout)
        failed.update({tp: self._stop_for_state(tp, exc) for tp, exc in unusable.items()})
        self.held.restored(set(wanted.values()) - set(failed))
        return self._restores_failed(failed)

    def _restores_failed(self, failed: dict[tuple[str, int], str]) -> list[tuple[str, int]]:
        """Hold these partitions (why), counted once each; the ones not held before are returned,
        to be paused."""
        if not failed:
            return []
        self.metrics.restore_failures.inc(len(failed))
        return self.held.hold_unrestored(failed)

    def _stop_for_state(self, tp: tuple[str, int], exc: Exception) -> str:
        """A state this configuration cannot use: no retry can mend it, so the daemon stops (exit
        code 2, after the rebalance callback has returned) and says what to change."""
        what = str(exc) if isinstance(exc, (ValueError, StartupError)) else (
            f"its state record is malformed ({type(exc).__name__}: {exc}); point checkpoint.topic (or "
            "checkpoint.dir) at a new one to start it afresh")
        if self._fatal is None:
            self._fatal = f"cannot restore the model of {tp[0]}/{tp[1]}: {what}"
            log.critical("%s; stopping (retrying cannot mend this)", self._fatal)
            self.held.stop_retrying()
            self.stop()
        return what

    def _retry_restores(self) -> None:
        """A round of retries for the held partitions once the back-off is over:
        1. the group's committed offsets of all of them (unreadable: nothing is guessed, each
           counts a failure and the round ends);
        2. the models still missing, briefly (this is the loop's thread);
        3. each partition with a model is resumed and sought to the later of its checkpoint and
           the group's commit, else to the first offset this process read of it (dropped while
           held), else left where librdkafka has it (auto.offset.reset, applied at assignment).
           A seek that fails keeps the model: only the seek is tried again."""
        if not self.held.retry_due():
            return
        held = sorted(self.held.partitions())
        timeout = self.held.retry_timeout()
        try:
            committed = self.source.committed([TopicPartition(t, p) for t, p in held], timeout=timeout)
        except KafkaException as exc:
            self.metrics.restore_failures.inc(len(held))
            self.held.round_failed(f"cannot read the group's committed offsets: {kafka_error_text(exc)}")
            return
        self.held.remember_commits(committed)
        self._commits_at_assignment = {**self._commits_at_assignment, **committed}  # (if unread at assignment)
        unrestored = list(self.held.unrestored)
        self._restore_partitions(unrestored, timeout=timeout)
        if self.scope == "partition" and self.topic_store is not None:
            self._warn_of_state_behind_the_group([tp for tp in unrestored if tp not in self.held.unrestored], committed)
        ready = [tp for tp in held if tp not in self.held.unrestored]
        if ready and self._fatal is not None:
            # Stopping: a model restored in this round is not sought, so it must not be checkpointed
            # or committed at its state's offset (the group's commit may be later): held until then.
            self.held.keep_unsought(dict.fromkeys(ready, "stopping"))
        elif ready:
            self.source.resume(ready)
            failed = self._seek_to_resume(ready, self.held.first_offset, committed)
            if failed:
                self.source.pause(sorted(failed))
            self.held.sought(ready, failed)
        self.held.schedule_retry(again=True)
        self._observe_partition_models()
        self.positions = self._positions()

    def _connect(self) -> None:
        k = self.config.kafka
        on_error = self._on_client_error
        producing, consuming = client_settings(self.config, "producer"), client_settings(self.config, "consumer")
        self.sink = KafkaSink(producing, on_error=on_error, on_permanent=self._on_output_refused,
                              optional_topics=frozenset([k.scores_topic] if k.scores_topic else []))
        outputs = [t for t in (k.output_topic, k.dead_letter_topic, k.scores_topic) if t]
        for topic in missing_topics(self.sink.producer, outputs):
            then = ("its records are dropped and counted (output_records_dropped_total)"
                    if topic in self.sink.optional_topics
                    else "records for it will be retried (rewinding to the last checkpoint) until it exists")
            log.error("output topic %s does not exist and the broker did not create it: %s; create it "
                      "(kafka-topics.sh --create --topic %s)", topic, then, topic)
        if self.config.checkpoint.topic:
            from confluent_kafka import Producer

            self._ensure_state_topic(producing)
            # Read in rebalance callbacks: done well before librdkafka's max.poll.interval.ms would
            # take this member out of the group.
            poll_interval = float(k.consumer.get("max.poll.interval.ms", 300_000)) / 1000.0
            self.topic_store = TopicStateStore(self.config.checkpoint.topic, consuming,
                                               # (Its logger, as every client's: without it
                                               # librdkafka wrote its own lines to stderr, past
                                               # logging.format json; helper-67.)
                                               Producer({**producing, "error_cb": on_error,
                                                         "logger": logging.getLogger("librdkafka")}),
                                               max_bytes=message_max_bytes(producing),
                                               read_max_seconds=0.8 * poll_interval)
            self.checkpointer.topic_store = self.topic_store
        self.source = KafkaSource(consuming, k.input_topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                  on_lost=self._on_lost, on_error=on_error)
        self.watermarks = WatermarkReader(consuming)
        self.metrics.watch_lag(lambda: self.positions, self._watermarks_for_scrape)
        log.info("subscribed to %s at %s", ",".join(k.input_topics), ",".join(k.bootstrap_servers))

    def _ensure_state_topic(self, settings: dict) -> None:
        backoff = self.config.kafka.retry_backoff_initial_seconds
        while not self._stop.is_set():
            try:
                ensure_topic(settings, self.config.checkpoint.topic, {"cleanup.policy": "compact"})
                return
            except (KafkaException, TimeoutError) as exc:  # TimeoutError: no broker answered
                why = kafka_error_text(exc) if isinstance(exc, KafkaException) else "no answer from the broker"
                log.warning("cannot create the state topic %s (%s); retrying in %.1f s (or create it yourself "
                            "with cleanup.policy=compact)", self.config.checkpoint.topic, why, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.kafka.retry_backoff_max_seconds)

    def _on_client_error(self, error: KafkaError) -> None:
        """librdkafka's errors (broker down, authentication ...): it retries by itself."""
        self.metrics.broker_errors.inc()
        if error.fatal():
            log.critical("fatal Kafka client error: %s; stopping (exit 1: a service manager starts it again "
                         "with new clients)", error.str())
            self.fatal_error = error.str()
            self.stop()
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
            log.warning("cannot connect to Kafka at %s (%s); the client retries by itself",
                        ",".join(self.config.kafka.bootstrap_servers), error.str())
        else:
            log.warning("Kafka: %s", error.str())

    def _on_output_refused(self, record: OutputRecord, why: str) -> None:
        self.metrics.output_dropped.inc()
        topic, partition, offset = record.source or ("?", -1, -1)
        size = len(record.value) + len(record.key or b"") + sum(len(k) + len(v or b"") for k, v in record.headers)
        log.error("the broker refused a record for %s for good (%s); it is dropped: source %s/%d offset %d, "
                  "%d bytes with its key and headers", record.topic, why, topic, partition, offset, size)

    # ------------------------------------------------------- rebalance callbacks
    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        """Resume each partition at the later of its checkpoint offset and the group's
        committed offset: what our model learned is never learned again, and what another
        member learned after our checkpoint is not either."""
        owned = [(tp.topic, tp.partition) for tp in partitions]
        if self._rewind_pending is not None:
            # Reload before assigning, so the partitions start at the checkpoint: no seek needed.
            self._reload_from_checkpoint(self._rewind_pending)
        read = self._committed(owned)
        committed = read or {}
        self._commits_at_assignment = {**self._commits_at_assignment, **committed}
        if self.scope == "global" and not self._restored_noted and owned:
            # Once, at the first assignment with partitions (an eager assignor gives a restarted
            # member none while its old consumer still holds them; judged then, the file passed
            # for taken: helper-88): a file reloaded later by a rewind is this process's own.
            self._restored_noted = True
            self._note_restored()
        held = self._restore_partitions(owned) if self.scope == "partition" else []
        if self.scope == "partition" and self.topic_store is not None:  # (else no state follows a partition)
            self._warn_of_state_behind_the_group(owned, committed)
        starts, why = [], {}
        pinned, new = self._pin_latest(owned, committed) if read is not None else ({}, set())
        for topic, partition in owned:
            start = self._resume_offset(topic, partition, committed)
            if (topic, partition) in self.held.unrestored:
                why[(topic, partition)] = " (held: its model is not restored yet)"
            else:
                checkpointed = self._checkpoint_offset(topic, partition)
                why[(topic, partition)] = _why_there(checkpointed, committed.get((topic, partition)))
                if read is not None and checkpointed and (topic, partition) not in committed:
                    # The broker lost the group's commits and the log (or the topic was made again):
                    # resumed at the checkpoint, the new log's first messages were skipped without
                    # a word (helper-39: 4,000 of 8,000).
                    log.warning("%s/%d: the model's checkpoint read it up to offset %d, but the group has no "
                                "commit for it: if the topic was made again or the broker lost its data, the "
                                "messages now below %d are skipped; to read them, stop the daemon and start it "
                                "with an empty checkpoint.dir (or model.init_from)", topic, partition,
                                checkpointed, checkpointed)
                    # Four WARNING lines were all there was of 15,071 messages skipped (helper-49).
                    self.metrics.resumed_without_commit.inc()
            if start is None and (topic, partition) in pinned:
                start = pinned[(topic, partition)]
                why[(topic, partition)] = (" (new since this daemon started: its first message, committed)"
                                           if (topic, partition) in new else
                                           " (auto.offset.reset latest: the log's end, committed)")
            # Neither a checkpoint nor a commit: OFFSET_INVALID, auto.offset.reset decides.
            starts.append(TopicPartition(topic, partition, OFFSET_INVALID if start is None else start))
            if start is not None and (topic, partition) not in self.held.unrestored:
                self._detector(model_key(self.scope, topic, partition)).offsets[(topic, partition)] = start
        self.source.assign(starts)
        self.assigned = self.assigned | set(owned)
        if held:
            self.source.pause(held)  # librdkafka fetches nothing of them until they are resumed
            self.held.remember_commits(committed)
            self.held.schedule_retry(again=False)
        self.positions = self._positions()
        self.metrics.assigned_partitions.set(len(self.assigned))
        if self.scope == "partition":
            self._observe_partition_models()
        log.info("assigned %s", ", ".join(f"{tp.topic}/{tp.partition} at {tp.offset if tp.offset >= 0 else 'reset'}"
                                          f"{why[(tp.topic, tp.partition)]}" for tp in starts) or "no partitions")

    def _note_restored(self) -> None:
        """The checkpoint restored at start, unless the group's commit of every partition it names
        is at or past it, is one the group may not have taken (its commit refused before the
        last stop): the next withdrawal asks the group (helper-85: after a restart, a refused
        hand-over unlearned back to it only, and the next owner learned 300 messages again)."""
        path = self.local.restored.get(GLOBAL_KEY)  # (not the newest file: that one may be unreadable)
        if path is None or GLOBAL_KEY not in self.detectors or path == self.checkpointer.committed_files.get(GLOBAL_KEY):
            return  # (nothing restored, or a file this process saw the group take)
        offsets = dict(self.detector.offsets)
        committed = self._committed(list(offsets))
        if committed is not None and all(offset <= committed.get(tp, -1) for tp, offset in offsets.items()):
            self.checkpointer.committed_files[GLOBAL_KEY] = path
        else:
            self.checkpointer.restored_from(GLOBAL_KEY, path, offsets)

    def _pin_latest(self, owned, committed: dict) -> tuple[dict[tuple[str, int], int], set[tuple[str, int]]]:
        """auto.offset.reset latest: the log's end now of each partition with neither a checkpoint
        offset nor a group commit, committed at once (in the rebalance callback, on this thread);
        returned with the partitions that are new (below).
        Left to librdkafka, "latest" was resolved anew at every start, and a daemon stopped before
        its first message skipped all that was written while it was down (helper-35: 1,841 of
        2,000).  "latest" is for the backlog there was when the daemon started: a partition the
        cluster did not have then (a topic a pattern matches later) starts at its first offset
        instead (at its end, what was written before the metadata refresh found it, up to 30 s,
        was skipped).  Called only when the group's commits were read (a failed read is no absent
        commit: pinning then would commit over the real one); not for a held partition (its
        state, not yet read, may be behind the end).  Partitions whose end cannot be had within
        the budget, or whose pin the group refuses, are left to librdkafka, as before; the log says so."""
        if self.config.kafka.auto_offset_reset != "latest":
            return {}, set()
        deadline = time.monotonic() + PIN_LATEST_BUDGET_SECONDS
        if self._partitions_at_start is None:  # this process's first assignment: what the cluster has now
            # (None if the cluster could not say: nothing is new, and the next assignment asks again;
            # a guess from this member's own partitions took others' unpinned backlogs for new.)
            self._partitions_at_start = self.source.partitions_now(PIN_LATEST_BUDGET_SECONDS)
        unplaced = [tp for tp in owned if tp not in self.held.unrestored
                    and self._resume_offset(*tp, committed) is None]
        known = self._partitions_at_start
        new = set() if known is None else {tp for tp in unplaced if tp not in known}
        pinned = {}
        for topic, partition in unplaced:
            left = deadline - time.monotonic()
            offset = (self.source.end_offset(topic, partition, timeout=left, start=(topic, partition) in new)
                      if left > 0 else None)
            if offset is not None:
                pinned[(topic, partition)] = offset
        if pinned:
            try:
                self.source.commit(pinned)  # on this thread: a rebalance callback (see KafkaSource.commit)
            except KafkaException as exc:
                log.warning("could not commit the log's end as the start of %s (%s)",
                            ", ".join(f"{t}/{p}" for t, p in pinned), kafka_error_text(exc))
                pinned = {}
        if missed := [tp for tp in unplaced if tp not in pinned]:
            log.warning("auto.offset.reset latest: the broker did not give the log's end of %s in time, or the "
                        "commit was refused; librdkafka resolves them, and a restart before their first checkpoint "
                        "resolves them again", ", ".join(f"{t}/{p}" for t, p in missed))
        return pinned, new

    def _warn_of_state_behind_the_group(self, owned, committed: dict) -> None:
        """scope: partition: a restored state behind the group's commit, or none where the group
        has one, means messages learned by a model whose state is not where this member looks
        (another checkpoint.topic or dir, a record lost): they are not learned again, so say so."""
        where = f"checkpoint.topic {self.config.checkpoint.topic}"  # (only called with one)
        for tp in owned:
            commit = committed.get(tp)
            if commit is None or tp in self.held.unrestored:
                continue
            state = self._checkpoint_offset(*tp)
            if state is None or state < commit:
                self.metrics.state_behind_group.inc()
            if state is None:
                log.warning("%s/%d: no state of it in %s, but the group has committed it up to %d: a new model "
                            "starts there (do the group's members share this %s?)", *tp, where, commit, where)
            elif state < commit:
                log.warning("%s/%d: its state in %s is at offset %d, behind the group's commit %d: the %d messages "
                            "between were learned by a model whose state is not there (another checkpoint.topic or "
                            "dir, a record lost, or the commit moved ahead by hand) and are not learned again",
                            *tp, where, state, commit, commit - state)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        self._in_rebalance = True
        try:
            self._hand_over(partitions)
        finally:
            self._in_rebalance = False

    def _hand_over(self, partitions: list[TopicPartition]) -> None:
        # Hand over cleanly: everything processed so far is checkpointed and committed
        # before the partitions go, so their next owner starts exactly where we stopped.
        # Not while a rewind is pending (the model holds messages whose output failed), nor
        # when the loop is leaving on an error (its last batch may be half sent), nor while
        # closing (the loop made its last checkpoint and commit already; a commit here, inside
        # close(), would wait for a hung broker with no one to give it up).
        if not self._aborting and not self._closing:
            ready = self._rewind_pending is None
            if ready and self.checkpointer.pending_messages and self.sink is not None:
                if self._checkpoint(" before a rebalance") is Outcome.FAILED:
                    # The group's commit stays at the last checkpoint, where the partitions' next
                    # owner starts: what this model learned since is unlearned, not learned twice.
                    self._rewind_pending = "the checkpoint before a rebalance failed"
            elif ready and self._commit_refused and self.source is not None:
                self._commit()  # nothing new, but the last commit was refused: hand over the checkpoint's offsets
            # (Also with a rewind pending: it reloads the newest checkpoint, which may be one of these.)
            if self.scope == "global" and self.checkpointer.uncommitted:
                # The partitions' next owner starts at the group's commit, which a refused commit
                # (a coordinator moving, a timeout) may have left behind this model's newest
                # checkpoints: kept, what they hold past it was learned twice (helper-82: 300-400
                # messages).  Those past it are withdrawn (all of them if the group cannot say),
                # and the model unlearns back to the newest one the group took.
                if self.checkpointer.withdraw_uncommitted(self._group_commits(partitions)):
                    self._rewind_pending = "the group did not take the offsets of the checkpoint handed over"
        self._release(partitions)
        log.info("revoked %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions))

    def _group_commits(self, partitions) -> dict | None:
        """The group's commits of those of ``partitions`` (TopicPartitions or (topic, partition))
        that the uncommitted checkpoints name, -1 for none yet; None if the group cannot say.
        (Asked also of a member that left the group: its commits are the group's, not the member's.)"""
        named = {tp for _, _, offsets in self.checkpointer.uncommitted for tp in offsets}
        wanted = [tp for tp in (p if isinstance(p, tuple) else (p.topic, p.partition) for p in partitions) if tp in named]
        # (Briefly once a stop is asked: the stop's own deadlines hold the rest; helper-88.)
        committed = self._committed(wanted, timeout=GROUP_ASK_SECONDS if self._stop.is_set() else 10.0)
        return None if committed is None else {tp: committed.get(tp, -1) for tp in wanted}

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        # The group gave these away without us (we were too slow or cut off): their new owner
        # resumes from the last commit, so what we learned of them since must be unlearned.
        self._rewind_pending = "partitions were lost to the group (session timed out)"
        if (self.scope == "global" and self.checkpointer.uncommitted
                and self.checkpointer.withdraw_uncommitted(self._group_commits(partitions)) and self._closing):
            # (Their new owners start from the group's commit.)  On the way out: the stop is not
            # clean (it exited 0 after the broker went down and the commit of the checkpoint at
            # shutdown was refused; helper-67).
            if self.clean_stop:  # (else the stop has said already that messages are read again)
                log.error("checkpoints withdrawn while stopping (the group did not take their offsets): the "
                          "messages since the group's last commit are read and learned again at the next start")
            self.clean_stop = False
        self._release(partitions)
        log.warning("lost %s to the group", ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions),
                    extra={"event": True})  # each loss is logged, however soon after the last

    def _release(self, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        held = self.held.release(gone)
        if held:
            self.source.resume(held)  # not left paused for a later assignment of them
        self.assigned = self.assigned - gone
        if not self.assigned:
            self.watch.none_assigned()
        self._commits_at_assignment = {tp: o for tp, o in self._commits_at_assignment.items() if tp not in gone}
        if self.scope == "partition":
            self.models.drop(gone)
            self._observe_partition_models()
        # scope: global keeps the partition's offset: the checkpoint must not forget it.
        self.positions = self._positions()
        self.metrics.assigned_partitions.set(len(self.assigned))

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        """Start up, then poll -> process -> send -> observe -> checkpoint until stopped."""
        self.start_up()
        self.started = True
        log.info("effective config: %s", json.dumps(masked(as_dict(self.config))))
        try:
            self._connect()
            while not self._stop.is_set():
                self._turn()
            self._last_checkpoint()
            if self._fatal is not None:
                raise StartupError(self._fatal)  # exit code 2: not restarted until the config is fixed
        except BaseException:
            self._aborting = True  # no checkpoint on the way out: the batch in hand may be half sent
            raise
        finally:
            self._close()

    def _last_checkpoint(self) -> None:
        """The checkpoint on the way out; ``clean_stop`` says whether it left nothing to redo."""
        if not self.checkpointer.pending_messages:
            if (self._commit_refused and self._rewind_pending is None and self.source is not None
                    and not self.source.wedged):  # (a wedged consumer's commit hangs: see KafkaSource.commit)
                if not self._commit() and self._membership_lost and self.scope == "global":
                    # (As a stop with messages pending: the group moved on without this member.)
                    if self.checkpointer.withdraw_uncommitted(self._group_commits(self.assigned)):
                        self.clean_stop = False
                        log.error("checkpoints withdrawn while stopping (the group did not take their offsets): the "
                                  "messages since the group's last commit are read and learned again at the next start")
            return
        if self._rewind_pending is None:
            outcome = self._checkpoint(" at shutdown", last=True)
            # (Written, then withdrawn for a refused commit, it exited 0; helper-86.)
            self.clean_stop = outcome is Outcome.WRITTEN and self._rewind_pending is None
        else:
            self.clean_stop = False
            log.error("stopping without a checkpoint (%s): the messages since the last one are read and learned "
                      "again at the next start", self._rewind_pending)

    def _turn(self) -> None:
        self._retry_restores()
        self.watch.look_at_assignment(self.source, self.assigned)
        polled = self._gather_for_warm_up(self._poll()) if self._fatal is None else {}
        if self._fatal is not None:
            return  # stopping on a partition's state: nothing more is processed
        if self._rewind_pending is not None:
            self._rewind()  # what was polled is read again from the checkpoint
            return
        self._process(polled)
        self.sink.serve()
        if self.checkpointer.due():
            self._checkpoint()

    def _gather_for_warm_up(self, polled: dict) -> dict:
        """While the global model warms up on several partitions: poll again (at most
        WARM_UP_GATHER_POLLS times within WARM_UP_GATHER_SECONDS) until every assigned partition
        has given some, so that the warm-up sees each partition's first messages.  A
        backlog's poll returns one partition's fetch after another: 4 partitions of a regime each
        warmed up on one and flagged 15,005 of 20,000 normal messages (helper-43)."""
        if (self.scope != "global" or not polled or len(self.assigned) < 2 or self.detector.model.is_initialized
                or self._rewind_pending is not None):
            return polled
        deadline = time.monotonic() + WARM_UP_GATHER_SECONDS
        for _ in range(WARM_UP_GATHER_POLLS):
            left = deadline - time.monotonic()
            if set(polled) >= self.assigned or left <= 0 or self._rewind_pending is not None:
                break
            # (The other partitions' first fetches may still be on their way: a short wait.)
            for tp, messages in self._poll(timeout_seconds=min(0.1, left)).items():
                polled.setdefault(tp, []).extend(messages)
        return {tp: messages for tp, messages in polled.items() if tp in self.assigned}  # (a rebalance meanwhile)

    def _observe_partition_models(self) -> None:
        self.models.observe(self.assigned, self._has_backlog)

    def _poll(self, timeout_seconds: float | None = None) -> dict:
        k = self.config.kafka
        try:
            wait = k.poll_timeout_ms / 1000.0 if timeout_seconds is None else timeout_seconds
            polled = self.source.poll(k.max_batch_messages, wait)
            self._error_backoff = k.retry_backoff_initial_seconds
        except KafkaException as exc:
            # The client reconnects by itself; pause so an outage does not spin the CPU.
            self.metrics.broker_errors.inc()
            log.warning("Kafka error in the loop (%s); retrying in %.1f s", kafka_error_text(exc), self._error_backoff)
            self._stop.wait(self._error_backoff)
            self._error_backoff = min(self._error_backoff * 2, k.retry_backoff_max_seconds)
            polled = {}
        self.metrics.last_poll.set(time.time())
        self._last_poll = time.monotonic()
        self._loop_watermarks = self.source.cached_watermarks(self.assigned)
        self.watch.look_at_positions(self._loop_watermarks, self.positions, self.held.partitions(),
                                     self.assigned)
        # A partition revoked during the poll is not ours any more.
        if not self.held:
            return {tp: messages for tp, messages in polled.items() if tp in self.assigned}
        # A held one's messages (fetched before its pause took effect) are dropped and read again
        # once it is resumed: from its checkpoint or commit, else from the first of them.
        kept, held = {}, self.held.partitions()
        for tp, messages in polled.items():
            if tp in held:
                self.held.saw(tp, messages[0].offset())
            elif tp in self.assigned:
                kept[tp] = messages
        return kept

    def _process(self, polled: dict) -> None:
        if not polled:
            return
        by_model: dict[str, dict] = {}
        for (topic, partition), messages in polled.items():
            self.held.saw((topic, partition), messages[0].offset())
            by_model.setdefault(model_key(self.scope, topic, partition), {})[(topic, partition)] = messages
        for key, partitions in by_model.items():
            started = time.perf_counter()
            batch = as_batch(partitions)
            detector = self._detector(key)
            updates_before, was_ready = detector.n_updates, detector.ready
            type_before = detector.model.covariance_type_ if was_ready else None
            result = detector.process(batch, now=time.time())
            if detector.ready and not was_ready:
                _log_warm_model(key, detector, time.perf_counter() - started)
            elif was_ready and detector.model.covariance_type_ != type_before:
                # (It changed without a word, and `inspect` then put it down to the warm-up; helper-83.)
                log.info("model %s: %s covariances turned %s after %d points: the stream shows BIC prefers them "
                         "(model.covariance_type auto)", key, type_before, detector.model.covariance_type_,
                         detector.model.n_seen_)
            for change in result.adoption_changes:
                _log_adoption(key, detector, change)
            for record in result.outputs():
                self.sink.send(record)
            self.watch.after_batch(result, partitions)
            self.metrics.observe_batch(result, detector, updates_before, time.perf_counter() - started,
                                       partition_key=None if self.scope == "global" else key)
            self.checkpointer.pending_messages += len(batch)
        for tp in polled.keys() & self._commits_at_assignment.keys():
            if self._checkpoint_offset(*tp) < self._commits_at_assignment[tp]:
                # Read from below the group's old commit: the log was reset (a topic made again,
                # librdkafka's auto.offset.reset); a rewind must not seek back past it any more.
                del self._commits_at_assignment[tp]
        if self.scope == "partition":
            self._observe_partition_models()
        self.positions = self._positions()

    def _watermarks_for_scrape(self) -> dict:
        """For the lag at a scrape (metrics thread): what the loop saw at its last poll, or,
        when the loop has not polled for a while, the broker's answer now, so a stalled loop
        shows a growing lag rather than its last value."""
        if time.monotonic() - self._last_poll >= LOOP_STALL_SECONDS:
            return self.watermarks(list(self.positions)) if self.watermarks is not None else {}
        held = list(self.held.partitions() & self.positions.keys())
        if not held or self.watermarks is None:
            return self._loop_watermarks
        # A paused partition fetches nothing, so librdkafka's cached watermarks of it are old or none.
        return {**self._loop_watermarks, **self.watermarks(held)}

    def _next_offsets(self) -> dict[tuple[str, int], int]:
        """The next offset to process of every assigned partition that has one and is not held
        (what a checkpoint commits)."""
        held = self.held.partitions()
        return {tp: o for tp in self.assigned if tp not in held and (o := self._checkpoint_offset(*tp)) is not None}

    def _positions(self) -> dict[tuple[str, int], int]:
        """``_next_offsets`` and, for the lag, where each held partition will resume
        (``HeldPartitions.lag_position``)."""
        positions = self._next_offsets()
        earliest = self.config.kafka.auto_offset_reset == "earliest"
        for tp in self.held.partitions() & self.assigned:
            offset = self.held.lag_position(tp, self._checkpoint_offset(*tp), earliest=earliest)
            if offset is not None:
                positions[tp] = offset
        return positions

    def _detector(self, key: str) -> Detector:
        return self.models.get(key)

    def _committed(self, partitions, timeout: float = 10.0) -> dict[tuple[str, int], int] | None:
        """The group's committed offsets of these partitions (None if the group cannot say now: for
        assignments and rewinds, which then go by the checkpoints; a held partition's retry does
        not guess)."""
        if not partitions:
            return {}
        try:
            return self.source.committed([TopicPartition(t, p) for t, p in partitions], timeout=timeout)
        except KafkaException as exc:
            log.warning("cannot read the group's committed offsets (%s); going by the checkpoint's",
                        kafka_error_text(exc))
            return None

    def _resume_offset(self, topic: str, partition: int, committed: dict) -> int | None:
        """The later of the model's offset and the group's committed one (None: neither)."""
        return later_offset(self._checkpoint_offset(topic, partition), committed.get((topic, partition)))

    def _checkpoint_offset(self, topic: str, partition: int) -> int | None:
        return self.models.offset(topic, partition)

    # ------------------------------------------------------- checkpoints, rewinds
    def _checkpoint(self, when: str = "", last: bool = False) -> Outcome:
        self._membership_lost = False
        # Once a stop is asked, a checkpoint waits for the broker's acknowledgements at most
        # STOP_FLUSH_WAIT_SECONDS from the stop, and speaks as the last one (no retry follows).
        outcome = self.checkpointer.checkpoint(self.detectors, self.sink, self._commit, time.time(),
                                               final=last or self._stop.is_set(),
                                               give_up=self._give_up_flush)
        if outcome is Outcome.REWIND:
            self._rewind_pending = f"output records were not acknowledged{when}"
        elif outcome is Outcome.WRITTEN and self._membership_lost and self.scope == "global":
            # The group refused the commit because it had moved on without this member (a stopped
            # or stalled process): the partitions' new owners start from the group's last commit,
            # so what the checkpoints since hold beyond it would be learned twice. They are
            # withdrawn and the model unlearns back to the last one the group took.
            self.checkpointer.withdraw_uncommitted(self._group_commits(self.assigned))
            self._rewind_pending = f"the group refused the commit of the checkpoint{when} (this member had left it)"
        elif outcome is Outcome.WRITTEN:
            self._rewinds_in_a_row = 0
        return outcome

    def _commit(self) -> bool:
        """Commit the models' offsets to the group; whether it took them."""
        try:
            # From a rebalance callback, on this thread (see KafkaSource.commit).
            give_up = None if self._in_rebalance else self._give_up_commit(time.monotonic())
            offsets = self._next_offsets()
            self.source.commit(offsets, give_up=give_up)
            self._commit_refused = False
            # (A later loss withdrew a checkpoint that the hand-over's commit had since given the
            # group: 300 messages learned by no model; helper-82.)
            self.checkpointer.committed()
            return True
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            self._membership_lost = isinstance(error, KafkaError) and error.code() in MEMBERSHIP_LOST
            if not self._membership_lost and self._group_took(offsets):
                # A commit that timed out may have been taken: the group says.  (Left in doubt,
                # two such in a row had the later pruned, and 100 messages learned by none;
                # helper-87.)
                log.info("offset commit answered with an error (%s), but the group has the offsets",
                         kafka_error_text(exc))
                self._commit_refused = False
                self.checkpointer.committed()
                return True
            self._commit_refused = True
            log.warning("offset commit refused (%s); the checkpoint holds the offsets and the next owner "
                        "resumes at the later of the two", kafka_error_text(exc))
            return False

    def _group_took(self, offsets: dict) -> bool:
        """Whether the group's commit of each of ``offsets``' partitions is at or past it (asked
        briefly: a coordinator that cannot answer leaves the doubt to the next withdrawal)."""
        if not offsets or self.source.wedged:
            return False
        committed = self._committed(list(offsets), timeout=GROUP_ASK_SECONDS)
        return committed is not None and all(committed.get(tp, -1) >= offset for tp, offset in offsets.items())

    def _reload_from_checkpoint(self, why: str) -> bool:
        """Drop the output not yet sent and reload every model from its newest checkpoint,
        after a pause that grows with rewinds in a row (a broker that keeps failing is not
        hammered).  The caller puts the consumer back at the models' offsets.  False, the rewind
        left pending, where checkpoint.dir cannot be read now."""
        try:  # (a directory that cannot be listed raised out of the loop, or a rebalance callback; helper-87)
            self.local.store_for(GLOBAL_KEY).paths()
        except OSError as exc:
            log.error("%s, but checkpoint.dir %s cannot be read (%s): the rewind waits, tried again next turn", why,
                      self.config.checkpoint.dir, exc.strerror or exc)
            self._stop.wait(self.config.kafka.retry_backoff_initial_seconds)
            return False
        self._rewind_pending = None
        self._rewinds_in_a_row += 1
        pause = min(self.config.kafka.retry_backoff_initial_seconds * 2 ** (self._rewinds_in_a_row - 1),
                    self.config.kafka.retry_backoff_max_seconds)
        log.error("%s: rewinding to the last checkpoint (rewind %d in a row; pausing %.1f s first)",
                  why, self._rewinds_in_a_row, pause, extra={"event": True})  # each rewind is logged
        if why != SEEK_BACK_FAILED:  # (the same rewind again: counted once; StreamgmmRewinding, helper-54)
            self.metrics.rewinds.inc()
        self.sink.discard_pending()
        self.metrics.produce_errors.inc(self.sink.take().transient)  # failed before the rewind found them
        self._stop.wait(pause)
        unsought = {key: self.detectors[key] for tp in self.held.unsought
                    if (key := model_key(self.scope, *tp)) in self.detectors}
        self.restore()
        if self.scope == "partition":
            self.detectors.update(unsought)  # restored from their newest state and not used since
            # The held ones are restored by _retry_restores.
            held = self._restore_partitions(self.assigned - self.held.partitions())
            if held:
                self.source.pause(held)
                self.held.schedule_retry(again=False)
        self.checkpointer.pending_messages = 0
        if self.scope == "partition":
            self._observe_partition_models()
        return True

    def _rewind(self) -> None:
        """Reload the models and seek every assigned partition back to where it resumes (before
        any checkpoint or commit, where this process started reading it).  A seek that fails
        leaves the rewind pending: tried again next turn."""
        if not self._reload_from_checkpoint(self._rewind_pending):
            return
        partitions = self.assigned - self.held.partitions()
        committed = self._committed(partitions) or {}
        floors = {tp: later_offset(committed.get(tp), self._commits_at_assignment.get(tp)) for tp in partitions}
        if self._seek_to_resume(partitions, self.held.first_offset, {tp: o for tp, o in floors.items() if o is not None}):
            self._rewind_pending = SEEK_BACK_FAILED
            self._rewinds_in_a_row -= 1  # the same rewind, not another one
        self.positions = self._positions()

    def _seek_to_resume(self, partitions, fallback: Callable, committed: dict) -> dict[tuple[str, int], str]:
        """Seek each partition to the later of its checkpoint and the group's commit, else to
        ``fallback(tp)`` (None: leave it), and set its model's offset there.  {tp: why} of those
        whose seek failed."""
        failed = {}
        for topic, partition in sorted(partitions):
            target = self._resume_offset(topic, partition, committed)
            target = fallback((topic, partition)) if target is None else target
            if target is None:
                continue  # nothing read from it yet: librdkafka's position stands
            try:
                self.source.seek(topic, partition, target)
            except KafkaException as exc:
                failed[(topic, partition)] = f"cannot seek to {target} yet: {kafka_error_text(exc)}"
                log.warning("%s/%d: %s; trying again", topic, partition, failed[(topic, partition)])
                continue
            self._detector(model_key(self.scope, topic, partition)).offsets[(topic, partition)] = target
        return failed

    def _close(self) -> None:
        self._closing = True
        if self.source is not None:
            self.source.close()
            self.source_wedged = self.source.wedged
        # After a stop that could not checkpoint, what is unacknowledged is produced again at the
        # next start: no long wait for it here, for the output or the state records.
        wait = CLOSE_FLUSH_SECONDS if self.clean_stop else UNCLEAN_CLOSE_FLUSH_SECONDS
        if self.sink is not None:
            self.sink.close(timeout=wait)
        self.source = self.sink = None
        if self.topic_store is not None:
            flush_in_steps(self.topic_store.producer, wait)
        self.assigned, self.positions = frozenset(), {}
        if self.server is not None:
            self.server.stop()
        if self.watermarks is not None:
            self.watermarks.close()
        log.info("stopped")
