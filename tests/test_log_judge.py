"""What a read of a workspace log means for a node following it (``redis_follow.judge``),
without Redis: every case where delivering on would be a silent gap."""

from __future__ import annotations

from typing import Any

from gateway.redis_follow import DELIVER, EPOCH_CHANGED, GONE, LOST_WRITES, LogState, judge
from protocol.envelope import ZERO, EntryId


def state(**changes: Any) -> LogState:
    values: dict[str, Any] = {
        "epoch": "e1", "last": EntryId(10, 0), "deleted": ZERO, "first": EntryId(1, 0),
        "holds": True, "added": 10, "length": 10, "entries": [], "beyond": ZERO, "mark": ZERO,
    }
    values.update(changes)
    return LogState(**values)


def test_a_log_that_goes_on_is_delivered() -> None:
    assert judge("e1", EntryId(5, 0), 5, state()) == DELIVER
    assert judge("e1", EntryId(5, 0), None, state()) == DELIVER


def test_another_epoch_is_a_change_unless_nothing_was_read_and_nothing_trimmed() -> None:
    assert judge("e0", EntryId(5, 0), 5, state()) == EPOCH_CHANGED
    assert judge("e0", EntryId(5, 0), 5, state(epoch="")) == EPOCH_CHANGED  # the log is gone
    # A read of a workspace with no log made an epoch that expired before the first append.
    assert judge("e0", ZERO, 0, state()) == DELIVER
    assert judge("e0", ZERO, 0, state(added=15)) == EPOCH_CHANGED  # 5 trimmed unread


def test_an_entry_this_node_read_that_the_log_no_longer_has_is_lost_writes() -> None:
    assert judge("e1", EntryId(12, 0), 12, state()) == LOST_WRITES  # beyond the last id
    assert judge("e1", EntryId(5, 3), 5, state(holds=False)) == LOST_WRITES  # gone from inside


def test_a_high_water_mark_above_the_log_is_lost_writes_whatever_the_cursor() -> None:
    assert judge("e1", EntryId(5, 0), 5, state(mark=EntryId(11, 0))) == LOST_WRITES


def test_an_entry_deleted_after_the_cursor_is_a_gap() -> None:
    assert judge("e1", EntryId(5, 0), 5, state(deleted=EntryId(6, 0))) == GONE


def test_a_follower_more_than_the_trimmed_count_behind_is_a_gap() -> None:
    # 500 added, 10 kept: 490 removed, the follower had consumed 1.
    lagging = state(first=EntryId(491, 0), last=EntryId(500, 0), added=500, length=10, holds=False)
    assert judge("e1", EntryId(1, 0), 1, lagging) == GONE
    # Without a count (just after a snapshot), older than everything kept is a gap too.
    assert judge("e1", EntryId(1, 0), None, lagging) == GONE
    # Its own entry trimmed, but nothing it had not read: no gap.
    caught_up = state(first=EntryId(6, 0), added=10, length=5, holds=False)
    assert judge("e1", EntryId(5, 0), 5, caught_up) == DELIVER
