"""When to checkpoint, and the steps of one: flush -> write -> commit."""

from __future__ import annotations

import enum
import logging
import time
from pathlib import Path
from typing import Callable

from confluent_kafka import KafkaException

from .config import CheckpointConfig
from .kafka import KafkaSink, kafka_error_text
from .metrics import Metrics
from .state import GLOBAL_KEY, CheckpointError, LocalStateStore, TopicStateStore

log = logging.getLogger(__name__)


def offsets_of(state: dict) -> dict[tuple[str, int], int]:
    """A checkpoint state's next offset per partition."""
    return {(topic, int(partition)): offset for topic, offsets in state["offsets"].items()
            for partition, offset in offsets.items()}

# How long a checkpoint waits for the broker to acknowledge the output records it covers.
FLUSH_TIMEOUT_SECONDS = 30.0
# A failed checkpoint is tried again after 1 s, then 2, 4 ... up to this (or the interval).
RETRY_MAX_SECONDS = 60.0


class Outcome(enum.Enum):
    WRITTEN = "written"
    NOTHING_TO_DO = "nothing to do"
    FAILED = "failed"  # retried later, after a back-off; nothing committed past the last good one
    REWIND = "rewind"  # output was not acknowledged: go back to the last checkpoint


class Checkpointer:
    """Owns the checkpoint schedule (every ``interval_messages`` or ``interval_seconds``,
    whichever comes first, and back-off after a failure) and runs the steps of one."""

    def __init__(self, config: CheckpointConfig, local: LocalStateStore, topic_store: TopicStateStore | None,
                 metrics: Metrics, clock: Callable[[], float] = time.monotonic, local_is_copy: bool = False):
        self.config = config
        self.local = local
        self.topic_store = topic_store
        # scope: partition with a state topic: models are restored from the topic only, so the
        # files are a copy for inspection, and a full disk must not hold up the topic and commits.
        self.local_is_copy = local_is_copy
        self.metrics = metrics
        self.clock = clock
        self.pending_messages = 0  # processed since the last checkpoint
        self.last_written = clock()
        self.written_since_start = False  # (last_written is then the start: see Daemon's /readyz words)
        self.failures = 0  # in a row
        self.retry_at = 0.0
        # Files whose offsets the group has not taken (or may not have: a commit refused or timed
        # out, the file restored at start), oldest first, as (model key, path, {(topic, partition):
        # next offset}): what a member that left the group, or handed partitions over behind
        # them, withdraws (see ``withdraw_uncommitted``) ...
        self.uncommitted: list[tuple[str, Path, dict]] = []
        # ... and what pruning keeps, per model: the newest file the group took, the oldest of
        # those it may have taken, and until it takes one, the newest 2 x keep files there were
        # at start (three
        # checkpoints in a row with their commits refused pruned the one the group had, and a
        # withdrawal then left no model at all: 1,000 messages learned by none; helper-82, -86).
        self.committed_files: dict[str, Path] = {}
        self.files_at_start: dict[str, frozenset] = {}
        self.written: dict[str, Path] = {}  # per model, the newest file written

    def due(self) -> bool:
        if not self.pending_messages or self.clock() < self.retry_at:
            return False
        if self.failures:  # a failed checkpoint is tried again when its back-off is over
            return True
        return (self.pending_messages >= self.config.interval_messages
                or self.clock() - self.last_written >= self.config.interval_seconds)

    def checkpoint(self, detectors: dict, sink: KafkaSink, commit: Callable[[], None], now: float,
                   final: bool = False, give_up: Callable[[], bool] | None = None) -> Outcome:
        """1. Flush the sink: every anomaly and dead letter of the messages covered is
              acknowledged (or refused for good, counted and logged: it cannot hold us up).
           2. A record that failed for a passing reason: return REWIND, write nothing.
           3. Write each model's state (model, threshold, counters, next offset per partition)
              to its files, and to the state topic if there is one.
           4. ``commit()`` the same offsets to the consumer group (a refused commit is logged:
              the checkpoint holds the offsets, and the next owner seeks past both).
        """
        if not detectors:
            self.pending_messages = 0
            return Outcome.NOTHING_TO_DO
        started = time.perf_counter()
        unacknowledged = sink.flush(FLUSH_TIMEOUT_SECONDS, give_up)
        deliveries = sink.take()
        if deliveries.transient:
            self.metrics.produce_errors.inc(deliveries.transient)
            self.metrics.checkpoint_failures.inc()
            log.error("%d output record(s) failed (%s): rewinding to the last checkpoint to produce them again",
                      deliveries.transient, "; ".join(sorted(deliveries.transient_reasons)[:3]))
            return Outcome.REWIND
        paths, written = [], []
        try:
            if unacknowledged:
                raise CheckpointError(f"{unacknowledged} output record(s) still unacknowledged after "
                                      f"{time.perf_counter() - started:.0f} s (is the broker reachable?)")
            copy_failed = None
            for key, detector in sorted(detectors.items()):
                state = detector.state(now)
                try:
                    if key not in self.files_at_start:  # (the newest few: a restart loop kept them all; helper-87)
                        self.files_at_start[key] = frozenset(self.local.store_for(key).paths()[-2 * self.local.keep:])
                    paths.append(self.local.write(key, state, self._kept(key)))
                    self.written[key] = paths[-1]
                    written.append((key, paths[-1], offsets_of(state)))
                except (CheckpointError, OSError) as exc:
                    if not self.local_is_copy:
                        raise CheckpointError(str(exc)) if isinstance(exc, OSError) else exc
                    copy_failed = exc
                if self.topic_store is not None:
                    self.topic_store.write(key, state)
            if self.topic_store is not None:
                self.topic_store.flush(FLUSH_TIMEOUT_SECONDS, give_up)
            if copy_failed is not None:  # the topic took it: not a failure, but not a silent one (helper-56)
                self.metrics.checkpoint_copy_failures.inc()
                log.warning("the local copy of the checkpoint in checkpoint.dir %s failed (%s); the state topic "
                            "holds the models, which are restored from there", self.config.dir, copy_failed)
        except (CheckpointError, KafkaException, BufferError) as exc:
            # Files written before the failure (the state topic's write or flush, another model's
            # file) are not committed: a reload would take them (helper-85: a hand-over after
            # this left 500 messages learned twice; helper-87).
            self._not_taken(written)
            self.metrics.checkpoint_failures.inc()
            self.failures += 1
            delay = min(2.0 ** (self.failures - 1), max(RETRY_MAX_SECONDS, self.config.interval_seconds))
            self.retry_at = self.clock() + delay
            if final:  # at shutdown there is no retry: say what the next start does instead
                log.error("the checkpoint at shutdown failed: %s; offsets stay uncommitted, and the messages since "
                          "the last checkpoint are read and learned again at the next start", kafka_error_text(exc))
            else:
                log.error("checkpoint failed (%d in a row): %s; scoring goes on, offsets stay uncommitted; "
                          "retrying in %.0f s", self.failures, kafka_error_text(exc), delay)
            return Outcome.FAILED
        failed_before, self.failures = self.failures, 0
        self.retry_at = 0.0
        self.pending_messages = 0
        self.last_written = self.clock()
        self.written_since_start = True
        if commit():
            self.committed()
        else:
            self._not_taken(written)
        duration = time.perf_counter() - started
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_seconds.observe(duration)
        self.metrics.checkpoint_last_success.set(now)
        where = (paths[-1].parent if len(paths) == 1 else
                 f"{len(paths)} directories under {paths[-1].parent.parent}" if paths else
                 f"the state topic {self.topic_store.topic}" if self.topic_store is not None else "nowhere (no model)")
        # (The models, not the files: with a state topic and its local copy failing, no file was
        # written and the line said "0 model(s)" before listing four; helper-63.)
        log.info("checkpoint of %d model(s) written in %.3f s to %s (%s)%s", len(detectors), duration, where,
                 ", ".join(f"{k}: n_valid={d.n_valid} n_seen={d.model.n_seen_}" for k, d in sorted(detectors.items())),
                 # The ERRORs of the failures had no counterpart: nothing said they were over (helper-52).
                 f"; checkpoints written again after {failed_before} failed attempt(s)" if failed_before else "",
                 extra={"ends_repeats": bool(failed_before)})  # a next failure is a new episode: logged
        return Outcome.WRITTEN

    def _kept(self, key: str) -> frozenset:
        """The files of ``key`` pruning leaves (see ``committed_files``)."""
        oldest_maybe_taken = next((path for k, path, _ in self.uncommitted if k == key), None)
        return frozenset({self.committed_files.get(key), oldest_maybe_taken}) | self.files_at_start.get(key, frozenset())

    def _not_taken(self, written: list) -> None:
        # (Those pruned since are gone: the list is as long as the files kept.)
        self.uncommitted = [entry for entry in self.uncommitted if entry[1].exists()] + written

    def committed(self) -> None:
        """The group took the offsets of the newest checkpoint: no file is ahead of it."""
        self.uncommitted, self.files_at_start = [], {key: frozenset() for key in self.files_at_start}
        self.committed_files.update((key, path) for key, path in self.written.items() if path.exists())

    def restored_from(self, key: str, path: Path, offsets: dict) -> None:
        """The file a model was restored from at start: the group may not have taken it (a commit
        refused before the last stop); the next withdrawal asks."""
        if all(p != path for _, p, _ in self.uncommitted):
            self.uncommitted = [(key, path, offsets), *self.uncommitted]

    def withdraw_uncommitted(self, group: dict | None = None) -> int:
        """Set aside (renamed ``*.withdrawn``: no longer loaded, still there to inspect) the local
        checkpoints the group has not taken, so that a reload goes back to the newest it did
        (see ``Daemon._checkpoint``).  When none is left, the model starts afresh from the
        group's commit: kept, they would hold messages that the group gives to the partitions'
        next owner as well, and they are read again from the group's commit either way (a
        member expired before its first commit had its messages learned by two models).
        ``group``: the group's commits ({(topic, partition): offset, -1 for none}) of the
        partitions asked about, where it could say: a file past them on one of those goes, one
        at or behind them on all it names is taken (one whose commit timed out and was taken
        stays; helper-85), one naming others stays listed (a cooperative assignor's partial
        revoke); None: every one goes.  Returns how many were withdrawn."""
        def past_the_group(offsets: dict) -> bool:
            return group is None or any(tp in group and offset > group[tp] for tp, offset in offsets.items())

        uncommitted, listed = [], []
        for key, path, offsets in self.uncommitted:
            if not path.exists():
                continue
            if past_the_group(offsets):
                uncommitted.append(path)
            elif all(tp in group for tp in offsets):
                self.committed_files[key] = path  # taken (the list is oldest first: the newest wins)
            else:
                listed.append((key, path, offsets))
        self.uncommitted = listed
        # (A withdrawn file is not the newest committed one, whatever a later commit says.)
        self.written = {key: path for key, path in self.written.items() if path not in uncommitted}
        if not uncommitted:
            return 0
        for path in uncommitted:
            try:
                path.rename(path.with_name(path.name + ".withdrawn"))
            except OSError as exc:  # (a read-only or failing disk: said, not fatal in a rebalance callback)
                log.error("cannot set aside checkpoint %s (%s): a reload takes it, and the messages it holds past "
                          "the group's commit are learned twice", path, exc.strerror or exc)
        try:
            remaining, _ = self.local.store_for(GLOBAL_KEY).newest_valid()
        except OSError:
            remaining = None
        log.warning("withdrew checkpoint(s) %s: the group did not take their offsets%s",
                    ", ".join(p.name for p in uncommitted),
                    "" if remaining is not None else "; no earlier one is left: the model starts afresh from the "
                                                     "group's commit")
        return len(uncommitted)

