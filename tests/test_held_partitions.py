"""HeldPartitions, the bookkeeping of partitions held paused (scope: partition), on its own:
a fake clock, no daemon, no broker."""

import logging

import pytest

from streamgmm.service.partitions import (RESTORE_RETRY_MAX_TIMEOUT_SECONDS, RESTORE_RETRY_TIMEOUT_SECONDS,
                                          HeldPartitions, later_offset)

A, B, C = ("in", 0), ("in", 1), ("in", 2)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def held(clock):
    return HeldPartitions(initial_backoff=1.0, max_backoff=4.0, clock=clock)


def test_later_offset_is_the_later_of_those_known():
    assert later_offset(10, 20) == 20 and later_offset(20, 10) == 20
    assert later_offset(None, 5) == 5 and later_offset(5, None) == 5 and later_offset(None, None) is None


def test_only_partitions_not_held_before_are_returned_to_be_paused(held):
    assert held.hold_unrestored({A: "state topic down"}) == [A]
    assert held.hold_unrestored({A: "still down", B: "still down"}) == [B]
    assert held.partitions() == {A, B} and held.reasons(A) == ("still down", None)
    assert held and not HeldPartitions(initial_backoff=1.0, max_backoff=4.0)


def test_failures_are_logged_once_per_reason(held, caplog):
    with caplog.at_level(logging.ERROR, logger="streamgmm.service.partitions"):
        held.hold_unrestored({A: "down", B: "down", C: "unreadable"})
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "cannot restore the model of in/0, in/1", "cannot restore the model of in/2"]


def test_a_partition_restored_stays_held_until_it_is_sought(held):
    held.hold_unrestored({A: "down", B: "down"})
    held.remember_commits({A: 300, B: 400, C: 500})  # C is not held: not kept
    assert held.commits == {A: 300, B: 400}
    held.restored([A, B])
    assert held.unrestored == {} and held.partitions() == set()  # the caller marks them unsought or sought
    held.sought([A, B], {B: "cannot seek to 400 yet"})
    assert held.partitions() == {B} and held.reasons(B) == (None, "cannot seek to 400 yet")
    assert held.commits == {B: 400}  # A's commit was only kept for its lag while it was held


def test_a_round_that_cannot_read_the_commits_holds_every_partition_for_that_reason(held, clock):
    held.hold_unrestored({A: "down"})
    held.keep_unsought({B: "cannot seek yet"})
    held.schedule_retry(again=False)
    held.round_failed("cannot read the group's committed offsets: timed out")
    assert held.reasons(A) == ("cannot read the group's committed offsets: timed out", None)
    assert held.reasons(B) == (None, "cannot read the group's committed offsets: timed out")
    assert held.retry_at == clock.now + 2.0  # the round counted: the back-off doubled


def test_the_back_off_doubles_once_per_round_up_to_its_maximum(held, clock):
    held.hold_unrestored({A: "down"})
    held.schedule_retry(again=False)
    assert held.retry_at == 101.0 and not held.retry_due()
    clock.now = 101.0
    assert held.retry_due()
    waits = []
    for _ in range(4):
        held.schedule_retry(again=True)
        waits.append(held.retry_at - clock.now)
    assert waits == [2.0, 4.0, 4.0, 4.0]


def test_a_partition_held_outside_a_round_joins_the_round_already_scheduled(held, clock):
    held.hold_unrestored({A: "down"})
    held.schedule_retry(again=False)
    clock.now += 0.5
    held.hold_unrestored({B: "down"})
    held.schedule_retry(again=False)
    assert held.retry_at == 101.0 and held.backoff == 2.0


def test_with_none_held_no_round_is_scheduled_and_the_back_off_starts_over(held):
    held.hold_unrestored({A: "down"})
    held.schedule_retry(again=False)
    held.schedule_retry(again=True)
    held.restored([A])
    held.schedule_retry(again=True)
    assert held.retry_at is None and held.backoff == 1.0 and not held.retry_due()


def test_stopping_schedules_no_new_round(held):
    held.hold_unrestored({A: "down"})
    held.stop_retrying()
    held.schedule_retry(again=False)
    assert held.retry_at is None


@pytest.mark.parametrize("backoff, allowed", [
    (0.1, RESTORE_RETRY_TIMEOUT_SECONDS), (12.0, 12.0), (120.0, RESTORE_RETRY_MAX_TIMEOUT_SECONDS)])
def test_a_round_may_wait_longer_as_the_back_off_grows(held, backoff, allowed):
    held.backoff = backoff
    assert held.retry_timeout() == allowed


def test_only_the_first_offset_read_of_a_partition_is_kept(held):
    held.saw(A, 100)
    held.saw(A, 200)
    assert held.first_offset(A) == 100 and held.first_offset(B) is None


def test_a_released_partition_is_forgotten_with_its_first_offset(held):
    # Assigned again later, it goes back to what is read of it then, not to a stale offset.
    held.hold_unrestored({A: "down", B: "down"})
    held.remember_commits({A: 300})
    held.schedule_retry(again=False)
    held.saw(A, 100)
    held.saw(C, 700)
    assert held.release({A, C}) == [A]  # C was not held: nothing to resume
    assert held.partitions() == {B} and held.commits == {} and held.retry_at is not None
    assert held.first_offset(A) is None and held.first_offset(C) is None
    held.saw(A, 900)
    assert held.first_offset(A) == 900


def test_releasing_the_last_held_partition_starts_the_back_off_over(held):
    held.hold_unrestored({A: "down"})
    held.schedule_retry(again=False)
    held.schedule_retry(again=True)
    held.release({A})
    assert held.retry_at is None and held.backoff == 1.0


def test_the_dicts_the_metrics_thread_reads_are_replaced_not_changed(held):
    held.hold_unrestored({A: "down"})
    held.keep_unsought({B: "cannot seek yet"})
    unrestored, unsought = held.unrestored, held.unsought
    held.hold_unrestored({C: "down"})
    held.restored([A])
    held.keep_unsought({A: "stopping"})
    held.round_failed("timed out")
    held.sought([A, B], {})
    held.release({C})
    assert unrestored == {A: "down"} and unsought == {B: "cannot seek yet"}


@pytest.mark.parametrize("checkpointed, commit, first, earliest, expected", [
    (500, 300, 100, True, 500),  # the later of checkpoint and commit
    (None, 300, 100, True, 300),
    (None, None, 100, True, 100),  # else the first offset read of it (dropped while held)
    (None, None, None, True, 0),  # else the log's start (the collector clamps it)
    (None, None, None, False, None),  # latest: unknown
])
def test_a_held_partition_lag_is_from_where_it_will_resume(held, checkpointed, commit, first, earliest,
                                                           expected):
    held.hold_unrestored({A: "down"})
    if commit is not None:
        held.remember_commits({A: commit})
    if first is not None:
        held.saw(A, first)
    assert held.lag_position(A, checkpointed, earliest=earliest) == expected
