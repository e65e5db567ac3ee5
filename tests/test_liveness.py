"""Node liveness decisions, without Redis (``gateway.liveness``)."""

from __future__ import annotations

import functools

import pytest

from gateway.liveness import (
    BACKOFF_CAP,
    REAPED_RETRY,
    Heartbeat,
    Link,
    claim_lifetime_ms,
    dead_peers,
    may_forget,
    may_judge_peers,
)


def test_a_healthy_heartbeat_beats_every_interval_and_never_reasserts() -> None:
    beat = Heartbeat(5.0)
    for _ in range(3):
        step = beat.answered("ok")
        assert (step.sleep, step.reassert, step.log) == (5.0, False, None)


def test_a_lapse_reasserts_once_and_logs_once() -> None:
    beat = Heartbeat(5.0)
    step = beat.answered("lapsed")
    assert step.reassert and step.log is not None and step.log[0] == "warning"
    assert beat.answered("ok") == type(step)(5.0)  # back to quiet beats


def test_a_reaping_peer_makes_the_node_beat_soon_then_reassert_when_it_is_over() -> None:
    beat = Heartbeat(5.0)
    first, second = beat.answered("reaped"), beat.answered("reaped")
    assert first.sleep == second.sleep == REAPED_RETRY
    assert first.log is not None and second.log is None  # logged once per state change
    assert not first.reassert and not second.reassert  # not while the peer still reaps
    after = beat.answered("lapsed")
    assert after.reassert and after.sleep == 5.0


def test_an_outage_backs_off_with_a_cap_then_reasserts_once_redis_answers() -> None:
    beat = Heartbeat(5.0)
    delays = [beat.failed(unavailable=True).sleep for _ in range(8)]
    assert delays[:3] == [0.1, 0.2, 0.4] and max(delays) == BACKOFF_CAP
    logs = [beat.failed(unavailable=True).log for _ in range(3)]
    assert logs == [None, None, None]  # only the first failure of a state is logged
    back = beat.answered("ok")
    assert back.reassert and back.log == ("info", "redis heartbeat healthy again")
    assert beat.failed(unavailable=True).sleep == 0.1  # backoff starts over


def test_a_taken_node_id_is_an_error_and_reasserts() -> None:
    step = Heartbeat(5.0).answered("taken")
    assert step.reassert and step.log is not None and step.log[0] == "error"


def test_an_unforeseen_failure_is_its_own_state() -> None:
    beat = Heartbeat(5.0)
    assert beat.failed(unavailable=True).log is not None
    step = beat.failed(unavailable=False)
    assert step.log is not None and step.log[0] == "exception"


def test_dead_peers_are_the_others_without_an_alive_key() -> None:
    assert dead_peers("me", ["b", "me", "a", "c"], [False, False, False, True]) == ["a", "b"]


def test_only_a_complete_reaping_of_a_dead_node_forgets_it() -> None:
    assert may_forget(force=False, failed=False, index_left=False)
    assert not may_forget(force=True, failed=False, index_left=False)  # its own old life
    assert not may_forget(force=False, failed=True, index_left=False)
    assert not may_forget(force=False, failed=False, index_left=True)


def test_a_claim_outlives_two_timeouts_and_at_least_ten_seconds() -> None:
    assert claim_lifetime_ms(15.0) == 30_000
    assert claim_lifetime_ms(1.0) == 10_000
    with pytest.raises(ValueError):
        Heartbeat(0)


def test_a_link_is_current_only_while_answers_keep_coming_and_none_failed_since() -> None:
    link = Link(3.0)
    assert not link.current(100.0)  # never answered
    link.answered(100.0)
    assert link.current(102.9)
    assert not link.current(103.0)  # silent for the whole window: cut off
    link.answered(104.0)
    link.failed()  # a round trip timed out: at once, not at the end of the window
    assert not link.current(104.1)
    link.answered(104.5)  # any answer (a request's, the next beat's) makes it current again
    assert link.current(104.6)


def test_peers_are_judged_only_while_beating_and_a_timeout_after_an_outage() -> None:
    judge = functools.partial(may_judge_peers, node_timeout=3.0)
    assert judge(beating=True, now=100.0, recovered_at=None)  # never cut off
    assert not judge(beating=False, now=100.0, recovered_at=None)  # cut off now
    # Back at 98: the peers' beats failed too, their keys may have expired; wait for them.
    assert not judge(beating=True, now=100.0, recovered_at=98.0)
    assert judge(beating=True, now=101.0, recovered_at=98.0)
