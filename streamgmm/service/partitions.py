"""The partitions the daemon holds paused (``model.scope: partition``) and where they go back to.

A partition is *held* while its model cannot be restored yet (``unrestored``), or while its
model is restored but the partition is not yet sought to where it resumes (``unsought``): it is
paused and none of its messages is processed.  Held partitions are retried in rounds, after a
back-off that doubles once per round.  This module keeps that bookkeeping; the daemon does the
I/O (reading state and commits, pausing, seeking) and calls the methods named for each step.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]

# A retry round reads a held partition's state and the group's commit on the loop's thread:
# briefly, so the other partitions keep flowing (the first read, at assignment, has the store's
# 30 s); the time allowed grows with the back-off, up to under the daemon's LOOP_STALL_SECONDS,
# so that a state topic slower to read than the first allowance does not hold the partition for ever.
RESTORE_RETRY_TIMEOUT_SECONDS = 5.0
RESTORE_RETRY_MAX_TIMEOUT_SECONDS = 25.0


def later_offset(checkpointed: int | None, committed: int | None) -> int | None:
    """Where a partition resumes: the later of its model's checkpoint offset and the group's
    committed one (None: neither).  What the model learned is never learned again, and what
    another member learned after our checkpoint is not either."""
    return max({checkpointed, committed} - {None}, default=None)


def partition_names(partitions: Iterable[TopicPartitionKey]) -> str:
    return ", ".join(f"{topic}/{partition}" for topic, partition in partitions)


class HeldPartitions:
    """The held partitions with why each is held, the group's commits of them (for their lag),
    the schedule of the next retry round, and the first offset read of every partition.

    Threads: the metrics thread reads ``unrestored`` and ``unsought`` (readiness, lag) while the
    loop changes them, so both are replaced whole, never changed in place; a reader looks each
    partition up once (``reasons``).  The rest is the loop's alone.
    """

    def __init__(self, *, initial_backoff: float, max_backoff: float,
                 clock: Callable[[], float] = time.monotonic):
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.clock = clock
        self.unrestored: dict[TopicPartitionKey, str] = {}  # no model yet: why
        self.unsought: dict[TopicPartitionKey, str] = {}  # a model, not yet sought to where it resumes: why
        self.commits: dict[TopicPartitionKey, int] = {}  # the group's, of held partitions, for their lag
        self.backoff = initial_backoff  # the wait of the next round scheduled; doubles once per round
        self.retry_at: float | None = None  # the clock's time of the next round; None: none scheduled
        self._retrying = True  # False once the daemon stops on a partition's state
        # The first offset this process read of each assigned partition, processed or dropped
        # while it was held: where a rewind or a held partition goes back to when there is
        # neither a checkpoint nor a committed offset yet.
        self._first_offsets: dict[TopicPartitionKey, int] = {}

    # ------------------------------------------------------------- the held set
    def partitions(self) -> set[TopicPartitionKey]:
        """Every held partition (safe from the metrics thread)."""
        return set(self.unrestored) | set(self.unsought)

    def __bool__(self) -> bool:
        return bool(self.unrestored or self.unsought)

    def reasons(self, tp: TopicPartitionKey) -> tuple[str | None, str | None]:
        """(why it has no model, why it is not sought): one lookup each, as the loop may replace
        the dicts between two lookups of the metrics thread."""
        return self.unrestored.get(tp), self.unsought.get(tp)

    def hold_unrestored(self, failed: dict[TopicPartitionKey, str]) -> list[TopicPartitionKey]:
        """Hold these partitions, whose model could not be restored (why); returns the ones not
        held before, which the caller pauses."""
        before = self.partitions()
        self.unrestored = {**self.unrestored, **failed}
        by_why: dict[str, list] = {}
        for tp, why in sorted(failed.items()):
            by_why.setdefault(why, []).append(tp)
        for why, partitions in by_why.items():
            log.error("cannot restore the model of %s (%s): held paused, none of its messages is processed "
                      "until it is", partition_names(partitions), why)
        return [tp for tp in sorted(failed) if tp not in before]

    def restored(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """These have a model now; the caller seeks them (``sought``) or keeps them unsought."""
        done = set(partitions)
        self.unrestored = {tp: why for tp, why in self.unrestored.items() if tp not in done}

    def keep_unsought(self, why: dict[TopicPartitionKey, str]) -> None:
        """These have a model but are not to be sought now (why)."""
        self.unsought = {**self.unsought, **why}

    def sought(self, ready: list[TopicPartitionKey], failed: dict[TopicPartitionKey, str]) -> None:
        """A retry round resumed and sought ``ready`` (every held partition with a model): the
        ones whose seek failed (why) stay held for another seek, the others are free."""
        self.unsought = dict(failed)
        resumed = [tp for tp in ready if tp not in failed]
        self.commits = {tp: offset for tp, offset in self.commits.items() if tp not in resumed}
        if resumed:
            log.info("restored the models of %s: resumed", partition_names(resumed))

    def remember_commits(self, committed: dict[TopicPartitionKey, int]) -> None:
        """The group's committed offsets, kept for the held partitions among them (their lag)."""
        held = self.partitions()
        self.commits = {**self.commits, **{tp: offset for tp, offset in committed.items() if tp in held}}

    def release(self, gone: set[TopicPartitionKey]) -> list[TopicPartitionKey]:
        """These partitions are no longer ours: forget them, and their first offsets (assigned
        again later, they start from what is read of them then).  Returns the ones that were
        held, which the caller resumes so that they are not left paused for a later assignment."""
        held = sorted(gone & self.partitions())
        self.unrestored = {tp: why for tp, why in self.unrestored.items() if tp not in gone}
        self.unsought = {tp: why for tp, why in self.unsought.items() if tp not in gone}
        self.commits = {tp: offset for tp, offset in self.commits.items() if tp not in gone}
        self._first_offsets = {tp: offset for tp, offset in self._first_offsets.items() if tp not in gone}
        self.schedule_retry(again=False)  # if none is held any more, the back-off starts over
        return held

    # ------------------------------------------------------------ retry rounds
    def schedule_retry(self, *, again: bool) -> None:
        """After a round of restores: the next round once the back-off is over, the back-off
        doubling once per round (``again``: this was a retry round).  Partitions held outside a
        retry round join the round already scheduled instead of postponing it."""
        if not self:
            self.retry_at, self.backoff = None, self.initial_backoff
            return
        if self._retrying and (again or self.retry_at is None):
            self.retry_at = self.clock() + self.backoff
            log.warning("%d partition(s) held paused; trying again in %.1f s", len(self.partitions()),
                        self.backoff)
            self.backoff = min(self.backoff * 2, self.max_backoff)

    def retry_due(self) -> bool:
        return self.retry_at is not None and self.clock() >= self.retry_at

    def retry_timeout(self) -> float:
        """How long a retry round may wait for the state and the group's commits: longer as the
        back-off (doubled once per failed round) grows, within the bounds above."""
        return min(RESTORE_RETRY_MAX_TIMEOUT_SECONDS, max(RESTORE_RETRY_TIMEOUT_SECONDS, self.backoff))

    def round_failed(self, why: str) -> None:
        """The round could not even start (the group's commits unreadable): every held partition
        stays held for this reason until the next round."""
        held = sorted(self.partitions())
        self.unrestored = dict.fromkeys(self.unrestored, why)
        self.unsought = dict.fromkeys(self.unsought, why)
        log.error("%s of %s: still held", why, partition_names(held))
        self.schedule_retry(again=True)

    def stop_retrying(self) -> None:
        """The daemon is stopping on a partition's state: no new round is scheduled."""
        self._retrying = False

    # ---------------------------------------------------------- first offsets
    def saw(self, tp: TopicPartitionKey, offset: int) -> None:
        """``offset`` was read of ``tp``: kept if it is the first since its assignment."""
        self._first_offsets.setdefault(tp, offset)

    def first_offset(self, tp: TopicPartitionKey) -> int | None:
        return self._first_offsets.get(tp)

    def lag_position(self, tp: TopicPartitionKey, checkpointed: int | None, *, earliest: bool) -> int | None:
        """Where a held partition will resume, for its lag: the later of its checkpoint and the
        group's commit, else the first offset read of it, else the log's start with
        auto.offset.reset: earliest (the lag collector clamps it to the low watermark)."""
        offset = later_offset(checkpointed, self.commits.get(tp))
        offset = self.first_offset(tp) if offset is None else offset
        return 0 if offset is None and earliest else offset
