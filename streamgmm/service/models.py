"""The daemon's models, by key: ``"global"``, or ``"topic/partition"`` with ``model.scope: partition``.

A model is made empty, restored from the newest checkpoint of its key (the state topic when
partition models have one, else the checkpoint directory), or started from ``model.init_from``,
and dropped with its partition.  The daemon decides when (at start, on an assignment, on a
rewind); this module says how, and which restores failed and why.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from confluent_kafka import KafkaException

from ..detection.detector import Detector
from .config import Config
from .kafka import kafka_error_text
from .metrics import Metrics
from .state import FILE_PATTERN, GLOBAL_KEY, CheckpointError, LocalStateStore, TopicStateStore, initial_state, model_key

log = logging.getLogger(__name__)


def _newest(paths) -> float | None:
    """The latest modification time of these files (None: none, or none readable)."""
    times = []
    for path in paths:
        try:
            times.append(path.stat().st_mtime)
        except OSError:  # removed meanwhile
            continue
    return max(times, default=None)

TopicPartitionKey = tuple[str, int]



def is_idle(detector) -> bool:
    """A partition's detector that has had no message, valid or not, and has no model: nothing to
    warm up on.  Keyed partitioning leaves partitions without traffic, and each kept /readyz at
    503 and StreamgmmNotReady firing for good (helper-78); one that gets only invalid messages
    is not idle (its model never warms up: that is for the alert)."""
    return detector.n_valid + detector.n_invalid == 0 and not detector.model.is_initialized

class StartupError(RuntimeError):
    """Something the daemon needs at start is missing or wrong; the message says what to do."""


# Restoring a partition's model or resume offset failed for a reason that can pass: the state
# topic or the group coordinator unreachable, the checkpoint directory unreadable.  Retried.
RESTORE_IO_ERRORS = (KafkaException, OSError, TimeoutError)
# A state record (or model.init_from) this configuration cannot use: another input.dimension
# (ValueError), no init_from checkpoint (StartupError), a malformed record (KeyError, TypeError).
# Every retry would fail the same way and every member of the group has the same configuration,
# so the daemon stops with exit code 2 (as for a bad config at start) instead of holding the
# partition paused for ever.
STATE_CONFIG_ERRORS = (ValueError, KeyError, TypeError, StartupError)


def log_restore_notes(what: str, detector: Detector) -> None:
    for note in detector.restore_notes:
        log.warning("%s: %s", what, note)
    if detector.adopting:  # (its start was logged by the process that checkpointed it)
        log.warning("%s: restored while taking a new regime: flagged points are learned until the flagged share "
                    "falls below %.2f%% (threshold.adopt)", what, 50 * detector.adopt_flag_rate)


def another_pipelines_model(config: Config, offsets: dict) -> str | None:
    """Why a global model that read ``offsets`` is another pipeline's, or None.  A model that
    read none of this daemon's input topics is (two daemons started from one directory share
    ./state): scoring with it flagged 3,000 of 3,000 normal messages without a word (helper-35).
    A regex subscription is not judged: which names it matches is the broker's to say."""
    read = sorted({topic for topic, _ in offsets})
    inputs = config.kafka.input_topics
    if not read or any(topic.startswith("^") for topic in inputs) or set(read) & set(inputs):
        return None
    return (f"the newest checkpoint in checkpoint.dir {config.checkpoint.dir} is the model of another "
            f"pipeline: it read {', '.join(read)}, this daemon reads {', '.join(inputs)}; point checkpoint.dir "
            "at this daemon's own directory, or, to start from that model on purpose (counters and offsets "
            f"anew), set model.init_from: {config.checkpoint.dir} with an empty checkpoint.dir")


class Models:
    """The detectors by model key, and how each is made or restored."""

    def __init__(self, config: Config, local: LocalStateStore, metrics: Metrics):
        self.config = config
        self.scope = config.model.scope
        self.local = local
        self.metrics = metrics
        self.topic_store: TopicStateStore | None = None  # scope: partition with checkpoint.topic
        self.detectors: dict[str, Detector] = {}
        self._initial: dict | None = None  # the model.init_from state, read once

    def get(self, key: str) -> Detector:
        """The model of ``key``, made empty if there is none."""
        return self.detectors.get(key) or self.detectors.setdefault(key, Detector(self.config))

    def offset(self, topic: str, partition: int) -> int | None:
        """The next offset the partition's model has to read (None: it has read none of it)."""
        detector = self.detectors.get(model_key(self.scope, topic, partition))
        return None if detector is None else detector.offsets.get((topic, partition))

    def drop(self, partitions) -> None:
        """scope: partition: the models of partitions gone to another member."""
        if self.scope == "partition":
            for topic, partition in partitions:
                self.detectors.pop(model_key(self.scope, topic, partition), None)

    def observe(self, assigned, has_backlog=lambda tp: False) -> None:
        """scope: partition: the metrics of the models held, an assigned partition with none
        (held: its model could not be restored yet) counting as not warm, one that has had no
        message and has none to read (``has_backlog(tp)`` false: idle) as neither."""
        models = {key: d.model for key, d in self.detectors.items()}
        keys = {model_key(self.scope, *tp): tp for tp in assigned}
        idle = {key for key, d in self.detectors.items()
                if is_idle(d) and not (key in keys and has_backlog(keys[key]))}
        self.metrics.observe_partition_models(models, {model_key(self.scope, *tp) for tp in assigned}, idle)

    # ---------------------------------------------------------------- restore
    def restore(self) -> None:
        """Forget every model; scope: global loads the newest valid checkpoint, or the
        ``model.init_from`` one, or starts empty (partition models are restored when their
        partitions are assigned, see ``restore_partitions``)."""
        self.detectors = {}
        self._say_if_the_other_scope_is_newer()
        if self.scope == "partition":
            return
        state = self._load_local(GLOBAL_KEY)
        detector = self.get(GLOBAL_KEY)
        try:
            if state is not None:
                detector.restore(state)
                log.info("restored the global model: n_valid=%d n_seen=%d offsets=%s",
                         detector.n_valid, detector.model.n_seen_, json.dumps(state["offsets"]))
            elif self.config.model.init_from:
                detector.restore(self.initial_state())
            log_restore_notes("the global model", detector)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.metrics.observe_model(detector.model)
        # (From the first batch only, the gauge read NaN after a restart on an idle stream; helper-78.)
        self.metrics.observe_threshold(detector)

    def _say_if_the_other_scope_is_newer(self) -> None:
        """A switch of model.scope was said only at INFO, as "the model's checkpoint has no
        offset for it", and the partitions warmed up anew without alerts (helper-72).  Said when
        the other scope's checkpoints are the newer: the switch is this start, or a switch back
        (this scope's older checkpoints would be restored; helper-76); not at every start after."""
        newest = {"global": _newest(self.local.store_for(GLOBAL_KEY).paths()),
                  "partition": _newest(self._partition_checkpoints())}
        other = "global" if self.scope == "partition" else "partition"
        mine, theirs = newest[self.scope], newest[other]
        if theirs is None or (mine is not None and mine >= theirs):
            return
        whose = {"global": "a global model", "partition": "partition models"}[other]
        resumes = {"global": "the global model", "partition": "a partition"}[self.scope]
        log.warning("checkpoint.dir %s holds the checkpoints of %s (model.scope: %s), newer than this scope's, which "
                    "model.scope: %s does not read: %s resumes its own older checkpoint if it has one, else starts "
                    "from the group's commit, with a warm-up of model.warmup points and no alerts before; to go on "
                    "with them, set model.scope: %s", self.local.directory, whose, other, self.scope, resumes, other)

    def _partition_checkpoints(self) -> list[Path]:
        """The checkpoint files of partition models in checkpoint.dir."""
        return [p for p in (self.local.directory / "partitions").glob("*/*") if FILE_PATTERN.match(p.name)]

    def check_initial(self) -> None:
        """scope: partition with model.init_from: read it now, at start, where a missing or
        unusable one is a config error (not in the first assignment)."""
        self._initial = self.initial_state()
        try:
            Detector(self.config).restore(copy.deepcopy(self._initial))
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"model.init_from={self.config.model.init_from}: {exc}") from None

    def initial_state(self) -> dict:
        try:
            state, path = initial_state(self.config.model.init_from)
        except CheckpointError as exc:
            raise StartupError(str(exc)) from None
        log.info("starting from the model in %s (n_seen=%d)", path, state["model"]["n_seen"])
        return state

    def restore_partitions(self, wanted: dict[str, TopicPartitionKey], floors: dict,
                           timeout: float) -> tuple[dict[TopicPartitionKey, str], dict[TopicPartitionKey, Exception]]:
        """scope: partition: a model for each of ``wanted`` ({key: partition}), from the state
        store (else model.init_from, else empty).  Returns the partitions whose state cannot be
        read now ({tp: why}: retried) and those whose state this configuration cannot use
        ({tp: the error}: no retry mends them).  ``floors``: {key: {tp: the group's commit}}, a
        newer state record behind which is a stale one."""
        try:
            states = None if self.topic_store is None else self.topic_store.load_many(
                set(wanted), timeout=timeout, floors=floors, restore_problem=self._restore_problem)
        except (*RESTORE_IO_ERRORS, ValueError) as exc:  # ValueError: a record of the topic unreadable as a whole
            return dict.fromkeys(wanted.values(), kafka_error_text(exc)), {}
        unreadable, unusable = {}, {}
        for key, tp in sorted(wanted.items()):
            try:
                self.detectors[key] = self._partition_detector(
                    key, states.get(key) if states is not None else self._load_local(key))
            except RESTORE_IO_ERRORS as exc:
                unreadable[tp] = kafka_error_text(exc)
            except STATE_CONFIG_ERRORS as exc:
                unusable[tp] = exc
        return unreadable, unusable

    def _partition_detector(self, key: str, state: dict | None) -> Detector:
        detector = Detector(self.config)
        if state is not None:
            detector.restore(state)
            log.info("restored model %s: n_valid=%d n_seen=%d", key, detector.n_valid, detector.model.n_seen_)
        elif self.config.model.init_from:
            if self._initial is None:  # read at start-up, unless start-up was skipped
                self._initial = self.initial_state()
            detector.restore(copy.deepcopy(self._initial))  # no arrays shared between partitions' models
        log_restore_notes(f"model {key}", detector)
        return detector

    def _restore_problem(self, state: dict) -> str | None:
        """Why this config cannot restore ``state`` (None: it can).  The stores pass over such a
        checkpoint for an older one, as over a corrupt one: a record with a valid checksum but
        content this streamgmm cannot take otherwise stopped every member its partition went to."""
        try:
            Detector(self.config).restore(copy.deepcopy(state))
        except ValueError as exc:  # the detector says every malformed state so
            return str(exc)
        return None

    def _load_local(self, key: str) -> dict | None:
        """The newest intact and restorable checkpoint file of a model, the files skipped counted."""
        state = self.local.load(key, self._restore_problem)
        self.metrics.checkpoints_unreadable.inc(self.local.skipped)
        return state
