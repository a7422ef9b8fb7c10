"""The pure offset logic that keeps the worker from losing a message faust dropped:
`commit_offset` (what may be committed) and `OffsetGuard` (what was never delivered)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from monitor.faust_ext import OffsetGuard, commit_offset

TP = ("events", 0)


def test_commit_covers_the_run_that_starts_at_the_committed_offset() -> None:
    assert commit_offset([5, 6, 7, 9], committed=5) == (8, 3)
    assert commit_offset([], committed=5) == (None, 0)


def test_nothing_is_committed_past_an_offset_never_acked() -> None:
    # faust 0.15 committed 11 here: its check let exactly one unacked offset (8) through
    assert commit_offset([9, 10], committed=8) == (None, 0)
    assert commit_offset([10, 11], committed=8) == (None, 0)


def test_without_a_commit_the_first_run_is_committed() -> None:
    assert commit_offset([0, 1, 2], committed=None) == (3, 3)
    assert commit_offset([0, 1], committed=0) == (2, 2)


@given(st.sets(st.integers(0, 60)), st.integers(0, 60))
def test_a_commit_never_passes_an_offset_that_was_not_acked(acked: set[int],
                                                            committed: int) -> None:
    ordered = sorted(offset for offset in acked if offset >= committed)
    offset, covered = commit_offset(ordered, committed)
    if offset is None:
        assert covered == 0
        assert not ordered or ordered[0] != committed
    else:
        assert set(range(committed, offset)) <= acked  # everything below it was acked
        assert ordered[:covered] == list(range(committed, offset))


def test_guard_finds_the_offsets_faust_never_delivered() -> None:
    guard = OffsetGuard()
    guard.reset({TP: 10})
    assert guard.check(TP, 10) is None
    assert guard.check(TP, 11) is None
    assert guard.check(TP, 14) == (12, 14)  # 12 and 13 are missing
    assert guard.check(TP, 15) is None


def test_guard_takes_messages_read_again_and_unknown_partitions() -> None:
    guard = OffsetGuard()
    guard.reset({TP: 10})
    assert guard.check(TP, 7) is None  # before the expected offset: read again
    assert guard.check(TP, 10) is None
    other = ("events", 1)
    assert guard.check(other, 40) is None  # no position known: its first message starts it
    assert guard.check(other, 42) == (41, 42)


def test_guard_starts_again_from_each_seek() -> None:
    guard = OffsetGuard()
    first = {TP: 3}
    guard.reset(first, source=first)
    assert guard.check(TP, 5) == (3, 5)
    assert guard.source is first
    guard.reset({TP: 0})
    assert guard.check(TP, 0) is None


@given(st.lists(st.integers(0, 50), max_size=80), st.integers(0, 10))
def test_guard_accounts_for_every_offset_up_to_the_last_delivered(delivered: list[int],
                                                                  start: int) -> None:
    """Whatever faust delivers (gaps, repeats, rewinds), the delivered offsets and the
    holes the guard reports cover every offset from the start to the highest one."""
    guard = OffsetGuard()
    guard.reset({TP: start})
    covered: set[int] = set()
    for offset in delivered:
        hole = guard.check(TP, offset)
        if hole is not None:
            assert hole[0] < hole[1] == offset
            covered.update(range(*hole))
        covered.add(offset)
    top = max([o for o in delivered if o >= start], default=None)
    if top is not None:
        assert set(range(start, top + 1)) <= covered


def test_offsets_read_again_are_marked_acked_from_the_committed_offset_on() -> None:
    from collections import defaultdict
    from types import SimpleNamespace

    from monitor.faust_ext import mark_acked

    consumer = SimpleNamespace(_acked=defaultdict(list), _acked_index=defaultdict(set),
                               _committed_offset=defaultdict(lambda: None))
    consumer._committed_offset[TP] = 5
    consumer._acked[TP].append(8)
    consumer._acked_index[TP].add(8)
    mark_acked(consumer, TP, range(3, 9))
    assert sorted(consumer._acked[TP]) == [5, 6, 7, 8]  # once each, none below the commit
    assert commit_offset(sorted(consumer._acked[TP]), 5) == (9, 4)


def test_a_hole_at_the_end_counts_when_two_looks_agree() -> None:
    guard = OffsetGuard()
    guard.reset({TP: 10})
    assert guard.check(TP, 10) is None
    assert guard.tails({TP: 10}) == {}  # fetched up to what was delivered: no hole
    assert guard.tails({TP: 12}) == {}  # 11, 12 fetched, not delivered: on their way?
    assert guard.tails({TP: 12}) == {TP: (11, 13)}  # still not: faust dropped them
    guard.filled(TP, 13)
    assert guard.tails({TP: 12}) == {}
    assert guard.check(TP, 13) is None


def test_a_message_delivered_between_two_looks_is_no_hole() -> None:
    guard = OffsetGuard()
    guard.reset({TP: 0})
    assert guard.tails({TP: 3}) == {}
    assert guard.check(TP, 0) is None  # the agent got one meanwhile
    assert guard.tails({TP: 3}) == {}  # a new suspect, not yet a hole
    assert guard.check(TP, 1) is None and guard.check(TP, 2) is None
    assert guard.check(TP, 3) is None
    assert guard.tails({TP: 3}) == {}
    assert guard.tails({TP: 3}) == {}


def test_sync_keeps_the_positions_of_the_agents_topic() -> None:
    from types import SimpleNamespace

    from monitor.faust_ext import sync

    positions = {("events", 0): 4, ("alerts", 0): 9}
    guard = OffsetGuard()
    sync(guard, SimpleNamespace(positions=positions), "events")
    assert guard.next == {("events", 0): 4} and guard.source is positions
    guard.check(("events", 0), 4)
    sync(guard, SimpleNamespace(positions=positions), "events")  # the same seek: kept
    assert guard.next == {("events", 0): 5}
