"""The chaos checker's judgement (``bench/chaos.py``), on made-up histories: it must flag
every broken promise, and nothing that the product allows."""

from __future__ import annotations

from bench.chaos import (
    EVENT_TYPE,
    Crash,
    End,
    Entry,
    Fault,
    Pos,
    Publish,
    Recorder,
    RssSample,
    Tally,
    Violation,
    build_known,
    check_answers,
    check_deliveries,
    check_keys,
    check_memory,
    presence_mismatches,
)

WS = "chaos-0"


def ack(recorder: Recorder, key: str, id_: str, t: float = 1.0) -> None:
    recorder.publishes[key] = Publish(key, WS, "pub", [(t, "node-a", f"200 {id_}")], id_, t)


def deliveries(recorder: Recorder, client: str, *items: tuple[str, str] | tuple[str, str, str],
               role: str = "regular", since: str = "", start: int = 1) -> None:
    """``items``: ``(type, id)`` or ``(type, id, subject)``, delivered at t = start, start + 1, ..."""
    journal = recorder.journal(client, role, "sse", (WS,))
    journal.add(Entry(start - 0.5, "connect", WS, since, note="node-a"))
    for t, item in enumerate(items, start=start):
        type_, id_, *subject = item
        journal.add(Entry(float(t), "event", WS, id_, type_, subject[0] if subject else ""))


def kinds(recorder: Recorder, ends: dict[str, End] | None = None,
          logs: dict[str, list[tuple[str, str, str]]] | None = None) -> list[str]:
    if logs is None:  # by default the final log holds every acknowledged event
        logs = {WS: [(p.acked_id, EVENT_TYPE, p.key) for p in recorder.publishes.values()]}
    known = build_known(recorder, logs)
    found = check_deliveries(recorder, known, ends or {}, Tally())
    found += check_keys(recorder, known, logs, {WS: (ends or {}).get(WS, End(0, None, None)).epoch})
    return sorted(v.kind for v in found)


def test_a_complete_ordered_history_passes_and_is_counted() -> None:
    recorder = Recorder()
    for n in (1, 2, 3):
        ack(recorder, f"k{n}", f"E1:{n}-0")
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), *[(EVENT_TYPE, f"E1:{n}-0", f"k{n}") for n in (1, 2, 3)])
    tally = Tally()
    known = build_known(recorder, {})
    assert check_deliveries(recorder, known, {WS: End(9, "E1", Pos.parse("E1:3-0"))}, tally) == []
    assert (tally.deliveries, tally.verified) == (4, 3)


def test_a_gap_a_duplicate_and_a_reordering_are_each_flagged() -> None:
    recorder = Recorder()
    for n in (1, 2, 3, 4):
        ack(recorder, f"k{n}", f"E1:{n}-0")
    deliveries(recorder, "gap", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"), (EVENT_TYPE, "E1:3-0"),
               (EVENT_TYPE, "E1:4-0"))
    deliveries(recorder, "twice", ("sync.snapshot", "E1:0-0"), *[(EVENT_TYPE, f"E1:{n}-0") for n in (1, 2, 2, 3, 4)])
    deliveries(recorder, "swapped", ("sync.snapshot", "E1:0-0"), *[(EVENT_TYPE, f"E1:{n}-0") for n in (1, 3, 2, 4)])
    found = kinds(recorder)
    # "swapped" never gets E1:2-0 in order: out of order, and then missing from its view.
    assert found == ["duplicate_delivery", "missing_event", "missing_event", "out_of_order"]


def test_a_regular_client_must_reach_the_end_of_the_log() -> None:
    recorder = Recorder()
    for n in (1, 2):
        ack(recorder, f"k{n}", f"E1:{n}-0")
    deliveries(recorder, "late", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"))
    assert kinds(recorder, {WS: End(9, "E1", Pos.parse("E1:2-0"))}) == ["missing_event"]
    # A client that stopped early (a far-back staller) is checked only up to where it got.
    recorder.journals["late"].role = "transient"
    assert kinds(recorder, {WS: End(9, "E1", Pos.parse("E1:2-0"))}) == []


def test_a_resume_starts_after_its_id() -> None:
    recorder = Recorder()
    for n in (1, 2, 3):
        ack(recorder, f"k{n}", f"E1:{n}-0")
    deliveries(recorder, "resumer", (EVENT_TYPE, "E1:3-0"), role="transient", since="E1:1-0")
    assert kinds(recorder) == ["missing_event"]  # E1:2-0 skipped
    deliveries(recorder, "resumer", (EVENT_TYPE, "E1:2-0"), (EVENT_TYPE, "E1:3-0"), role="transient", since="E1:1-0")
    assert kinds(recorder) == []


def test_a_new_epoch_without_a_reset_is_a_silent_gap() -> None:
    recorder = Recorder()
    ack(recorder, "k1", "E1:1-0")
    ack(recorder, "k2", "E2:5-0", t=3.0)
    recorder.fault(Fault(2.0, 2.5, "redis_wipe", "redis"))
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"), (EVENT_TYPE, "E2:5-0"))
    assert kinds(recorder) == ["silent_epoch_change"]


def test_a_reset_after_data_loss_excuses_what_was_lost_but_not_more() -> None:
    recorder = Recorder()
    ack(recorder, "k1", "E1:1-0")
    ack(recorder, "k2", "E1:2-0")  # acknowledged, then lost with Redis' data
    ack(recorder, "k3", "E2:7-0", t=4.0)
    recorder.fault(Fault(2.5, 3.0, "redis_wipe", "redis"))
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"), ("sync.reset", "E2:6-0"),
               ("sync.snapshot", "E2:6-0"), (EVENT_TYPE, "E2:7-0"))
    ends = {WS: End(9, "E2", Pos.parse("E2:7-0"))}
    logs = {WS: [("E2:7-0", EVENT_TYPE, "k3")]}
    assert kinds(recorder, ends, logs) == []
    # Still in the lost epoch at the end: no reset reached it.
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"))
    assert kinds(recorder, ends, logs) == ["stale_epoch"]


def test_a_host_crash_excuses_the_events_it_took_and_the_resets_it_caused_nothing_else() -> None:
    """``redis_crash``: the log kept E1 up to 1-0; 2-0 and 3-0 (acknowledged, delivered to
    one client) were lost; the nodes gave the log epoch E2."""
    recorder = Recorder()
    for n in (1, 2, 3):
        ack(recorder, f"k{n}", f"E1:{n}-0")
    ack(recorder, "k4", "E2:9-0", t=8.0)
    recorder.crashes.append(Crash(4.5, {WS: ("E1", (1, 0))}))
    ends = {WS: End(20, "E2", Pos.parse("E2:9-0"))}
    logs = {WS: [("E2:1-0", EVENT_TYPE, "k1"), ("E2:9-0", EVENT_TYPE, "k4")]}
    deliveries(recorder, "saw", ("sync.snapshot", "E1:0-0"), *[(EVENT_TYPE, f"E1:{n}-0") for n in (1, 2, 3)],
               ("sync.reset", "E2:1-0"), ("sync.snapshot", "E2:1-0"), (EVENT_TYPE, "E2:9-0"))
    # Got only what survived: the lost events are owed to nobody.
    deliveries(recorder, "slow", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"),
               ("sync.reset", "E2:1-0"), ("sync.snapshot", "E2:1-0"), (EVENT_TYPE, "E2:9-0"), start=3)
    assert kinds(recorder, ends, logs) == []
    # Reading on in E1 past a lost event, with an event appended after the restart.
    ack(recorder, "k5", "E1:5-0", t=8.0)
    deliveries(recorder, "past", ("sync.snapshot", "E1:0-0"), *[(EVENT_TYPE, f"E1:{n}-0") for n in (1, 2, 3)],
               (EVENT_TYPE, "E1:5-0"), ("sync.reset", "E2:5-0"), ("sync.snapshot", "E2:5-0"),
               (EVENT_TYPE, "E2:9-0"))
    assert kinds(recorder, ends, logs) == ["read_past_loss"]


def test_a_host_crash_that_lost_nothing_owes_nobody_a_reset() -> None:
    recorder = Recorder()
    for n in (1, 2):
        ack(recorder, f"k{n}", f"E1:{n}-0")
    recorder.crashes.append(Crash(4.5, {WS: ("E1", (2, 0))}))
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"), (EVENT_TYPE, "E1:2-0"),
               ("sync.reset", "E1:2-0"), ("sync.snapshot", "E1:2-0"))
    assert kinds(recorder, {WS: End(20, "E1", Pos.parse("E1:2-0"))}) == ["reset_without_loss"]
    # An acknowledged event it did take is counted, not flagged, even if no node noticed.
    ack(recorder, "k3", "E1:3-0")
    recorder.journals.clear()
    assert kinds(recorder, {WS: End(20, "E1", Pos.parse("E1:2-0"))},
                 {WS: [("E1:1-0", EVENT_TYPE, "k1"), ("E1:2-0", EVENT_TYPE, "k2")]}) == []


def test_a_reset_to_a_stale_snapshot_of_the_lost_epoch_is_owed_too() -> None:
    recorder = Recorder()
    ack(recorder, "k1", "E1:1-0")
    ack(recorder, "k2", "E2:7-0", t=6.0)
    recorder.fault(Fault(2.5, 3.0, "redis_wipe", "redis"))
    # A node still in E1 resets the client to its (lost) position; its resync then resets
    # it into E2. Both resets come after the data loss of the epoch the client stood in.
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"), ("sync.reset", "E1:1-0"),
               ("sync.snapshot", "E1:1-0"), ("sync.reset", "E2:6-0"), ("sync.snapshot", "E2:6-0"),
               (EVENT_TYPE, "E2:7-0"))
    assert kinds(recorder, {WS: End(9, "E2", Pos.parse("E2:7-0"))}, {WS: [("E2:7-0", EVENT_TYPE, "k2")]}) == []


def test_a_reset_where_nothing_was_lost_is_flagged() -> None:
    recorder = Recorder()
    for n in (1, 2, 3):
        ack(recorder, f"k{n}", f"E1:{n}-0")
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"), ("sync.reset", "E1:2-0"),
               ("sync.snapshot", "E1:2-0"), (EVENT_TYPE, "E1:3-0"))
    assert kinds(recorder) == ["reset_without_loss"]
    # A new epoch with no data loss injected (a rotation) is no excuse either.
    recorder = Recorder()
    ack(recorder, "k1", "E1:1-0")
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0"), ("sync.reset", "E2:3-0"),
               ("sync.snapshot", "E2:3-0"))
    assert kinds(recorder) == ["epoch_without_loss", "reset_without_loss"]
    # After a data loss, a client already in the new epoch must not be reset again.
    recorder = Recorder()
    ack(recorder, "k1", "E2:5-0", t=0.8)
    recorder.fault(Fault(0.1, 0.2, "redis_wipe", "redis"))  # E1 lost; E2 first seen at t=0.5
    deliveries(recorder, "c", (EVENT_TYPE, "E2:5-0"), ("sync.reset", "E3:6-0"), ("sync.snapshot", "E3:6-0"),
               role="transient", since="E2:4-0")
    assert kinds(recorder, None, {WS: []}) == ["reset_without_loss"]
    recorder.fault(Fault(1.5, 1.6, "redis_wipe", "redis"))  # with E2 lost too, the reset is owed
    assert kinds(recorder, None, {WS: []}) == []


def test_a_key_appended_twice_is_flagged_unless_data_loss_forgot_it() -> None:
    recorder = Recorder()
    ack(recorder, "k1", "E1:1-0")
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0", "k1"), (EVENT_TYPE, "E1:2-0", "k1"))
    assert kinds(recorder) == ["duplicate_append"]
    # The first append was lost with Redis' data; the retry appended into the new epoch.
    recorder = Recorder()
    ack(recorder, "k1", "E2:4-0", t=5.0)
    recorder.fault(Fault(2.5, 3.0, "redis_wipe", "redis"))
    deliveries(recorder, "c", ("sync.snapshot", "E1:0-0"), (EVENT_TYPE, "E1:1-0", "k1"), ("sync.reset", "E2:3-0"),
               ("sync.snapshot", "E2:3-0"), (EVENT_TYPE, "E2:4-0", "k1"))
    assert kinds(recorder, {WS: End(9, "E2", Pos.parse("E2:4-0"))}, {WS: [("E2:4-0", EVENT_TYPE, "k1")]}) == []


def test_an_acknowledged_event_missing_from_the_final_log_is_lost() -> None:
    recorder = Recorder()
    ack(recorder, "k1", "E1:1-0")
    ack(recorder, "k2", "E1:2-0")
    assert kinds(recorder, {WS: End(9, "E1", None)}, {WS: [("E1:1-0", EVENT_TYPE, "k1")]}) == ["acked_event_lost"]


def test_presence_ghosts_missing_members_and_silent_nodes() -> None:
    seen = {("node-a", WS): {"u1", "vanish-3"}, ("node-b", WS): {"u1", "u2"}, ("node-c", WS): None}
    found = presence_mismatches(1.0, {WS: {"u1", "u2"}}, seen, "now")
    assert [(v.kind, v.subject) for v in found] == [
        ("presence_ghost", "vanish-3"), ("presence_missing", "u2"), ("presence_unreadable", "")]
    assert presence_mismatches(1.0, {WS: {"u1"}}, {("node-a", WS): {"u1"}}, "now") == []


def test_memory_over_the_cap_or_growing() -> None:
    steady = [RssSample(float(t), "node-a", 1 + t // 30, 70_000 + 30_000 * (t % 30 == 5)) for t in range(120)]
    assert check_memory(steady, 512, 96) == []  # restarted every 30 s, a peak in each life
    growing = [RssSample(float(t), "node-a", 1, 70_000 + t * 4_000) for t in range(120)]
    assert [v.kind for v in check_memory(growing, 512, 96)] == ["rss_over_cap", "rss_growth"]
    assert all(isinstance(v, Violation) for v in check_memory(growing, 512, 96))


def test_a_publish_answered_500_is_flagged_even_when_a_retry_landed() -> None:
    recorder = Recorder()
    recorder.publishes["k1"] = Publish("k1", WS, "pub", [(1.0, "node-a", "HTTP 503"),
                                                         (1.2, "node-b", "200 e:1-0")], "e:1-0", 1.2)
    assert check_answers(recorder) == []  # a 503 retried is what the API promises
    recorder.publishes["k2"] = Publish("k2", WS, "pub", [(2.0, "node-a", "HTTP 500"),
                                                         (2.3, "node-a", "200 e:2-0")], "e:2-0", 2.3)
    recorder.publishes["k3"] = Publish("k3", WS, "ws-pub", [(3.0, "node-c", "error 500"),
                                                            (3.1, "node-c", "reply e:3-0")], "e:3-0", 3.1)
    flagged = check_answers(recorder)
    assert [(v.kind, v.subject, v.t) for v in flagged] == [("server_error", "k2", 2.0),
                                                           ("server_error", "k3", 3.0)]
