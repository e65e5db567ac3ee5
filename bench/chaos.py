"""Chaos checker: three gateway nodes on one Redis, clients on every transport, faults on a
seeded schedule, and the product's promises checked against everything that was recorded.

Run (from the repository root; stops by itself after ``--duration`` plus at most ~90 s of
settling and checking; Ctrl-C stops every process it started)::

    .venv/bin/python -m bench.chaos --duration 600 --seed 7

What runs: a private ``redis-server`` with AOF (``appendfsync always``) and three
``sync-gateway serve`` nodes on loopback (``tests/multinode`` harness: free ports, stopped by
PID). Clients: SSE followers (``Last-Event-ID``) and WebSocket followers (``since``) on
several workspaces, connecting to random nodes and resuming after every close; some hold
presence (REST sessions renewed beside their stream, WebSocket ``join``). Publishers POST
events with an ``Idempotency-Key`` (or WebSocket ``publish`` with ``idempotency_key``) and
retry on errors, timeouts and 503 with the same key, on any node.

Faults (seeded, sequential for nodes and Redis, concurrent for clients): SIGKILL and restart
a node; SIGSTOP then SIGCONT a node; SIGTERM (drain) and restart; restart Redis gracefully
(AOF keeps everything); SIGKILL Redis and restart it without its data (history really lost);
make Redis full for a moment (``maxmemory`` below what it uses, ``noeviction``); crash
Redis' host (SIGKILL, the AOF cut back to what ``everysec`` had flushed); cut one node's link
to Redis (``partition``: a blackhole, nothing closed) or slow it down (``slow_link``: 200-500
ms each way), each node reaching Redis through a proxy of its own when these are enabled
(``Endpoint``); clients that vanish mid-replay (resume from far back, drop the TCP
connection) and clients that stop reading.

Checked afterwards (docs/chaos.md): (a) every client got every event of its workspaces
exactly once and in order from its start point, or a ``sync.reset`` where history was really
lost; (b) no idempotency key was appended twice; (c) presence converges on every node to
the sessions actually alive; (d) node RSS stays under a cap and does not grow; (e) no publish
was answered 500. Exit status 1
on any violation, printing the first one with its history.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.ws import SUBPROTOCOL_JSON
from tests.multinode.conftest import Spawner
from tests.multinode.harness import (
    ORG,
    Endpoint,
    Node,
    RedisClusterServers,
    RedisServer,
    auth,
    base,
    skewed_clock,
    workspace_log_key,
)

EVENT_TYPE: Final = "chaos.tick"
BALLAST: Final = "chaos-ballast"  # a workspace with a long history of big events (see seed_ballast)
BALLAST_EVENT_BYTES: Final = 16_000
CONNECT_TIMEOUT: Final = 4.0  # until a stream's headers or a socket's upgrade arrive
REQUEST_TIMEOUT: Final = 3.0  # one publish, presence call or WebSocket request
PUBLISH_DEADLINE: Final = 30.0  # a publish is retried (same key) this long, then abandoned
RENEW_EVERY: Final = 3.0  # REST presence renewal (nodes run with --presence-ttl 10)
PRESENCE_TTL: Final = 10.0
KEEPALIVE: Final = 2.0  # the nodes' --keepalive: SSE comments and WebSocket pings
IDLE: Final = 2.5 * KEEPALIVE  # nothing read for this long: the node is gone (or stopped)
SETTLE_SLACK: Final = 4.0  # heartbeat phase + a sweep + delivery, on a loaded 2-core machine
CLOCK_PROBE_EARLY: Final = 1.5  # clock_skew: seconds a deadline or an id may be off, load included
RETRYABLE: Final = frozenset({409, 425, 429, 500, 502, 503, 504})
INFRA_KINDS: Final = ("node_kill", "node_pause", "node_drain", "redis_restart", "redis_wipe",
                       "redis_full", "redis_crash", "partition", "slow_link", "cluster_failover",
                       "clock_skew")
CLIENT_KINDS: Final = ("client_vanish", "client_stall")
INFRA_WEIGHTS: Final = {"node_kill": 3, "node_pause": 3, "node_drain": 3, "redis_restart": 2,
                        "redis_wipe": 1, "redis_full": 1, "redis_crash": 1, "partition": 2, "slow_link": 2,
                        "cluster_failover": 3, "clock_skew": 1}
# Faults of one node's link to Redis; with one of them enabled every node reaches Redis
# through an ``Endpoint`` of its own. Their lengths: a blackhole from 0.5 s to twice the node
# timeout (peers reap the node past it), 200-500 ms each way for 5-30 s.
LINK_KINDS: Final = ("partition", "slow_link")
SLOW_LINK_DELAY: Final = (0.2, 0.5)
SLOW_LINK_LENGTH: Final = (5.0, 30.0)
# --topology: which fault kinds fit which Redis. A cluster (3 primaries, 3 replicas, no
# persistence) is not restarted, wiped, crashed or filled as one server is, and its nodes
# reach every primary at the addresses the cluster announces (no proxy of one link); one
# server has no failover.
TOPOLOGY_KINDS: Final = {
    "single": frozenset(INFRA_KINDS) - {"cluster_failover"},
    "cluster": frozenset(INFRA_KINDS) - {"redis_restart", "redis_wipe", "redis_full", "redis_crash",
                                          *LINK_KINDS},
}


@dataclass(frozen=True, slots=True)
class Options:
    duration: float = 60.0
    seed: int = 1
    nodes: int = 3
    workspaces: int = 3
    sse_clients: int = 4  # regular SSE followers, one workspace each; half hold presence
    ws_clients: int = 3  # regular WebSocket followers of two workspaces each, joined in both
    rest_publishers: int = 3
    ws_publishers: int = 2
    rate: float = 3.0  # publishes per second per publisher
    node_timeout: float = 3.0
    disconnect_grace: float = 2.0
    send_buffer: int = 256
    ballast_mb: float = 8.0  # history seeded into BALLAST (more than a node's socket buffers)
    faults: tuple[str, ...] = INFRA_KINDS + CLIENT_KINDS
    idempotency: bool = True  # False: publishers send no key (the checker must see duplicates)
    rss_cap_mb: float = 512.0
    rss_growth_mb: float = 96.0
    verbose: bool = False
    topology: str = "single"  # "cluster": a Redis Cluster of 3 primaries with a replica each


# -- event ids -------------------------------------------------------------------------------

_ID = re.compile(r"([^:]+):(\d+)-(\d+)")


@dataclass(frozen=True, slots=True)
class Pos:
    """A position in a workspace log: an epoch and an entry id, ordered within the epoch."""

    epoch: str
    entry: tuple[int, int]

    @classmethod
    def parse(cls, text: str | None) -> Pos | None:
        match = _ID.fullmatch(text or "")
        return None if match is None else cls(match[1], (int(match[2]), int(match[3])))

    @property
    def at_start(self) -> bool:
        return self.entry == (0, 0)

    def __str__(self) -> str:
        return f"{self.epoch}:{self.entry[0]}-{self.entry[1]}"


# -- what happened ---------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One line of a client's journal. ``kind``: ``event`` (a delivery: ``id``, ``type``,
    ``subject`` = idempotency key or presence user), ``connect`` (``id`` = the resume id sent,
    ``note`` = the outcome), ``close``, ``note``."""

    t: float
    kind: str
    workspace: str = ""
    id: str = ""
    type: str = ""
    subject: str = ""
    note: str = ""

    def __str__(self) -> str:
        parts = [f"t={self.t:8.3f}", self.kind, self.workspace, self.type, self.id,
                 self.subject, self.note]
        return " ".join(part for part in parts if part)


@dataclass(slots=True)
class Journal:
    """Everything one client did and received, in order. ``role``: ``regular`` (runs the
    whole time: checked to the end), ``transient`` (starts far back, stops early) or
    ``vanish`` (drops its connection mid-replay)."""

    client: str
    role: str
    transport: str
    workspaces: tuple[str, ...]
    entries: list[Entry] = field(default_factory=list)

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)


@dataclass(slots=True)
class Publish:
    """One logical publish: its key, every attempt ``(t, node, outcome)``, and the answer."""

    key: str
    workspace: str
    publisher: str
    attempts: list[tuple[float, str, str]] = field(default_factory=list)
    acked_id: str = ""
    acked_t: float = 0.0
    refused: str = ""


@dataclass(frozen=True, slots=True)
class Fault:
    start: float
    end: float
    kind: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        return f"t={self.start:8.3f}..{self.end:8.3f} {self.kind:<13} {self.target:<12} {self.detail}"


@dataclass(frozen=True, slots=True)
class Crash:
    """A host crash of Redis (``redis_crash``): when Redis died, and what each workspace log
    held when it came back — its epoch and last entry, read before any node reconnected."""

    t: float
    kept: dict[str, tuple[str | None, tuple[int, int] | None]]


@dataclass(frozen=True, slots=True)
class Loss:
    """History really lost at ``t`` in one workspace: every epoch seen before (a wipe, or a
    crash that lost the epoch key), or ``ids``, the events of ``epoch`` seen before the crash
    that its log no longer held afterwards."""

    t: float
    epoch: str | None = None
    ids: frozenset[str] = frozenset()

    def hits(self, epoch: str, first_seen: float, until: float) -> bool:
        """Whether it owes a client standing in ``epoch`` (first seen at ``first_seen``) a
        reset by ``until``."""
        return first_seen <= self.t <= until and self.epoch in (None, epoch)


@dataclass(frozen=True, slots=True)
class RssSample:
    t: float
    node: str
    pid: int
    kib: int


@dataclass(frozen=True, slots=True)
class Violation:
    t: float
    kind: str
    message: str
    client: str = ""
    workspace: str = ""
    subject: str = ""  # the idempotency key or user the history is about
    ids: tuple[str, ...] = ()


class Recorder:
    """The run's memory: faults, publishes, client journals, RSS samples, and violations seen
    while running (presence, processes). Times are seconds since the recorder was made."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.faults: list[Fault] = []
        self.crashes: list[Crash] = []
        self.publishes: dict[str, Publish] = {}
        self.journals: dict[str, Journal] = {}
        self.rss: list[RssSample] = []
        self.violations: list[Violation] = []
        self.failover_losses: list[tuple[str, Loss]] = []  # (workspace, what a cluster failover lost)
        self.verbose = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    def journal(self, client: str, role: str, transport: str, workspaces: Sequence[str]) -> Journal:
        journal = self.journals[client] = Journal(client, role, transport, tuple(workspaces))
        return journal

    def fault(self, fault: Fault) -> None:
        self.faults.append(fault)
        if self.verbose:
            print(f"  fault {fault}", flush=True)

    def violation(self, violation: Violation) -> None:
        self.violations.append(violation)

    def wipes(self) -> list[float]:
        return [fault.start for fault in self.faults if fault.kind == "redis_wipe"]

    def losses(self, known: dict[str, KnownLog]) -> dict[str, list[Loss]]:
        """Per workspace, every loss of history: the wipes, and what each host crash lost
        (nothing, unless it held events somebody had seen)."""
        losses: dict[str, list[Loss]] = {workspace: [Loss(t) for t in self.wipes()] for workspace in known}
        for crash in self.crashes:
            for workspace, (epoch, last) in crash.kept.items():
                log = known.get(workspace)
                if log is None:
                    continue
                if epoch is None:
                    losses[workspace].append(Loss(crash.t))
                    continue
                lost = frozenset(k.id for k in log.by_id.values() if k.pos.epoch == epoch
                                 and k.first_t <= crash.t and (last is None or k.pos.entry > last))
                if lost:
                    losses[workspace].append(Loss(crash.t, epoch, lost))
        for workspace, loss in self.failover_losses:
            losses.setdefault(workspace, []).append(loss)
        return {workspace: sorted(found, key=lambda loss: loss.t) for workspace, found in losses.items()}

    def head(self, workspace: str) -> str | None:
        """The newest acknowledged id of ``workspace``."""
        acked = max(((p.acked_t, p.acked_id) for p in self.publishes.values()
                     if p.workspace == workspace and p.acked_id), default=None)
        return acked[1] if acked else None

    def far_back(self, workspace: str, rng: random.Random) -> str | None:
        """An acknowledged id early in the newest epoch seen for ``workspace`` (the first, in
        the ballast): a resume from there replays most of what the log holds."""
        acked = sorted((p.acked_t, p.acked_id) for p in self.publishes.values()
                       if p.workspace == workspace and p.acked_id)
        if not acked:
            return None
        newest = Pos.parse(acked[-1][1])
        same = [id_ for _, id_ in acked if (pos := Pos.parse(id_)) and newest and pos.epoch == newest.epoch]
        if not same:
            return None
        return same[0] if workspace == BALLAST else same[rng.randrange(max(1, len(same) // 4))]


# -- the checks (pure: from the record to violations) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Known:
    id: str
    pos: Pos
    type: str
    subject: str
    first_t: float


class KnownLog:
    """Every event of one workspace that anybody saw: acknowledged, delivered, or in the
    log at the end. Completeness is checked against it."""

    def __init__(self) -> None:
        self.by_id: dict[str, Known] = {}
        self.epoch_seen: dict[str, float] = {}
        self._sorted: dict[str, list[Known]] = {}

    def saw_epoch(self, pos: Pos, t: float) -> None:
        self.epoch_seen[pos.epoch] = min(t, self.epoch_seen.get(pos.epoch, t))

    def add(self, id_: str, type_: str, subject: str, t: float) -> None:
        pos = Pos.parse(id_)
        if pos is None:
            return
        self.saw_epoch(pos, t)
        known = self.by_id.get(id_)
        if known is None or t < known.first_t:
            self.by_id[id_] = Known(id_, pos, type_ or (known.type if known else ""),
                                    subject or (known.subject if known else ""), t)
        self._sorted.clear()

    def between(self, epoch: str, after: tuple[int, int], upto: tuple[int, int]) -> list[Known]:
        """Known events of ``epoch`` with ``after < entry <= upto``, in log order."""
        if not self._sorted:
            for known in sorted(self.by_id.values(), key=lambda k: k.pos.entry):
                self._sorted.setdefault(known.pos.epoch, []).append(known)
        events = self._sorted.get(epoch, [])
        entries = [known.pos.entry for known in events]
        return events[bisect.bisect_right(entries, after):bisect.bisect_right(entries, upto)]


@dataclass(slots=True)
class Segment:
    """Part of a client's view of one workspace between two resets: it must hold every
    event of ``epoch`` after ``start`` up to ``end``."""

    epoch: str
    start: tuple[int, int]
    end: tuple[int, int]
    delivered: list[tuple[tuple[int, int], str, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class End:
    """Where a workspace's log stood when the regular clients were checked to the end."""

    t: float
    epoch: str | None  # the log's epoch then (Redis' epoch key)
    last: Pos | None  # its last entry then


@dataclass(slots=True)
class Tally:
    deliveries: int = 0
    verified: int = 0  # (event, client) pairs checked present
    resets: int = 0
    justified_resets: int = 0


class JournalCheck:
    """Invariant (a) for one client and one workspace: walk its deliveries in order."""

    def __init__(self, journal: Journal, workspace: str, known: KnownLog, losses: Sequence[Loss],
                 tally: Tally) -> None:
        self.journal, self.ws, self.known, self.losses, self.tally = journal, workspace, known, losses, tally
        self.lost = frozenset().union(*(loss.ids for loss in losses))  # a crash took them: owed to nobody
        self.violations: list[Violation] = []
        self.segments: list[Segment] = []
        self.pos: Pos | None = None
        self.pending_reset: Entry | None = None
        self.seen: set[str] = set()

    def flag(self, t: float, kind: str, message: str, *ids: str) -> None:
        self.violations.append(Violation(t, kind, message, self.journal.client, self.ws, ids=ids))

    def open(self, pos: Pos) -> None:
        self.segments.append(Segment(pos.epoch, pos.entry, pos.entry))
        self.pos = pos

    def feed(self, entry: Entry) -> None:
        if entry.workspace != self.ws:
            return
        if entry.kind == "connect" and self.pos is None and (since := Pos.parse(entry.id)):
            self.open(since)  # a client that starts by resuming (far back)
        if entry.kind != "event":
            return
        self.tally.deliveries += 1
        pos = Pos.parse(entry.id)
        if pos is None:
            self.flag(entry.t, "bad_event_id", f"{entry.type} with id {entry.id!r}", entry.id)
        elif entry.type == "sync.reset":
            self.pending_reset = entry
            self.tally.resets += 1
        elif entry.type == "sync.snapshot":
            self.snapshot(entry, pos)
        elif not entry.type.startswith("sync."):
            self.event(entry, pos)

    def snapshot(self, entry: Entry, pos: Pos) -> None:
        if self.pending_reset is not None:
            self.justify(self.pending_reset, pos)
        elif self.pos is not None:
            self.flag(entry.t, "snapshot_without_reset",
                      f"a sync.snapshot at {pos} while resuming from {self.pos}", entry.id)
        self.pending_reset = None
        self.open(pos)

    def justify(self, reset: Entry, snapshot: Pos) -> None:
        """A reset is owed only where history was really lost: the client's epoch lost
        entries (a wipe, or a host crash that lost events of it) after it was first seen. (A
        node that has not noticed the loss yet may reset it to a snapshot of the lost epoch;
        the next reset, into the new one, is owed as well.)"""
        old = self.pos
        if old is None:
            self.flag(reset.t, "reset_without_loss", "sync.reset before any position", reset.id)
            return
        first_seen = self.known.epoch_seen.get(old.epoch, 0.0)
        if any(loss.hits(old.epoch, first_seen, reset.t) for loss in self.losses):
            self.tally.justified_resets += 1
            return
        before = [loss.t for loss in self.losses if loss.t <= reset.t]
        since_loss = f"; {reset.t - before[-1]:.1f} s after the Redis data loss at t={before[-1]:.1f}" if before else ""
        self.flag(reset.t, "reset_without_loss",
                  f"sync.reset ({reset.note}) from {old} to {snapshot}, although epoch {old.epoch} lost "
                  f"nothing ({'same epoch' if snapshot.epoch == old.epoch else 'a new epoch'}{since_loss})",
                  reset.id)

    def event(self, entry: Entry, pos: Pos) -> None:
        if self.pending_reset is not None:
            self.flag(entry.t, "reset_without_snapshot", "sync.reset not followed by sync.snapshot", entry.id)
            self.pending_reset = None
        if entry.id in self.seen:
            self.flag(entry.t, "duplicate_delivery", f"{entry.type} {entry.id} delivered again", entry.id)
            return
        if self.pos is None:
            self.flag(entry.t, "event_before_start", f"{entry.id} before any snapshot", entry.id)
            self.open(pos)
        elif pos.epoch != self.pos.epoch:
            if not self.pos.at_start:  # nothing of the old epoch was consumed: nothing skipped
                self.flag(entry.t, "silent_epoch_change",
                          f"{entry.id} follows {self.pos} without sync.reset", entry.id)
            self.open(Pos(pos.epoch, (0, 0)))
        elif pos.entry <= self.pos.entry:
            self.flag(entry.t, "out_of_order", f"{entry.id} after {self.pos}", entry.id)
            return
        elif str(self.pos) in self.lost and entry.id not in self.lost:  # appended after the crash
            self.flag(entry.t, "read_past_loss",
                      f"{entry.id} follows {self.pos}, which Redis lost in a crash, without sync.reset",
                      entry.id, str(self.pos))
        self.seen.add(entry.id)
        segment = self.segments[-1]
        segment.delivered.append((pos.entry, entry.id, entry.t))
        segment.end = pos.entry
        self.pos = pos

    def finish(self, end: End | None) -> list[Violation]:
        """Gaps: known events inside a segment that the client did not get. A regular
        client's last segment must be in the log's final epoch and reach its end."""
        for index, segment in enumerate(self.segments):
            upto = segment.end
            if end is not None and index == len(self.segments) - 1:
                if end.epoch is not None and segment.epoch != end.epoch:
                    self.flag(end.t, "stale_epoch",
                              f"still in epoch {segment.epoch} at the end; the log is in epoch "
                              f"{end.epoch}: no sync.reset reached this client")
                elif end.last is not None and end.last.epoch == segment.epoch:
                    upto = max(upto, end.last.entry)
            self.gaps(segment, upto, end.t if end else segment_end_time(segment))
        return self.violations

    def gaps(self, segment: Segment, upto: tuple[int, int], end_t: float) -> None:
        delivered = {id_ for _, id_, _ in segment.delivered}
        entries = [entry for entry, _, _ in segment.delivered]
        run: list[Known] = []
        owed = [known for known in self.known.between(segment.epoch, segment.start, upto)
                if known.id not in self.lost or known.id in delivered]
        for known in [*owed, None]:
            if known is not None and known.id not in delivered:
                run.append(known)
                continue
            if known is not None:
                self.tally.verified += 1
            if run:
                after = bisect.bisect_right(entries, run[-1].pos.entry)
                t = segment.delivered[after][2] if after < len(entries) else end_t
                ids = [k.id for k in run]
                self.flag(t, "missing_event",
                          f"{len(run)} event(s) never delivered: {ids[0]} .. {ids[-1]} "
                          f"({', '.join(sorted({k.type for k in run}))})", *ids[:20])
                run = []


def segment_end_time(segment: Segment) -> float:
    return segment.delivered[-1][2] if segment.delivered else 0.0


def build_known(recorder: Recorder, logs: dict[str, list[tuple[str, str, str]]]) -> dict[str, KnownLog]:
    """The union of acknowledged events, deliveries (and the epochs of every position any
    client stood on) and the final logs, per workspace."""
    known: dict[str, KnownLog] = defaultdict(KnownLog)
    for publish in recorder.publishes.values():
        if publish.acked_id:
            known[publish.workspace].add(publish.acked_id, EVENT_TYPE, publish.key, publish.acked_t)
    for journal in recorder.journals.values():
        for entry in journal.entries:
            pos = Pos.parse(entry.id)
            if pos is None:
                continue
            if entry.kind == "event" and not entry.type.startswith("sync."):
                known[entry.workspace].add(entry.id, entry.type, entry.subject, entry.t)
            else:
                known[entry.workspace].saw_epoch(pos, entry.t)
    end = recorder.now()
    for workspace, entries in logs.items():
        for id_, type_, subject in entries:
            known[workspace].add(id_, type_, subject, end)
    return known


def check_deliveries(recorder: Recorder, known: dict[str, KnownLog], ends: dict[str, End],
                     tally: Tally) -> list[Violation]:
    """(a) for every journal and workspace."""
    violations: list[Violation] = []
    losses = recorder.losses(known)
    for journal in recorder.journals.values():
        for workspace in journal.workspaces:
            check = JournalCheck(journal, workspace, known[workspace], losses.get(workspace, []), tally)
            for entry in journal.entries:
                check.feed(entry)
            violations += check.finish(ends.get(workspace) if journal.role == "regular" else None)
    return violations


def check_keys(recorder: Recorder, known: dict[str, KnownLog],
               logs: dict[str, list[tuple[str, str, str]]], epochs: dict[str, str | None]) -> list[Violation]:
    """(b): one appended event per idempotency key (within one epoch: a wipe forgets keys
    with the events; a copy a crash lost does not count), and every acknowledged event of
    the final epoch still in the log, unless a host crash lost it (Redis' design with
    ``appendfsync everysec``: counted, not flagged)."""
    violations: list[Violation] = []
    losses = recorder.losses(known)
    lost = frozenset().union(*(loss.ids for found in losses.values() for loss in found))
    for workspace, log in known.items():
        by_key: dict[str, list[Known]] = defaultdict(list)
        for event in log.by_id.values():
            if event.type == EVENT_TYPE and event.subject and event.id not in lost:
                by_key[event.subject].append(event)
        for key, events in by_key.items():
            for epoch, group in itertools.groupby(sorted(events, key=lambda e: (e.pos.epoch, e.first_t)),
                                                  key=lambda e: e.pos.epoch):
                copies = list(group)
                if len(copies) > 1:
                    acked = recorder.publishes.get(key)
                    violations.append(Violation(
                        copies[1].first_t, "duplicate_append",
                        f"idempotency key {key} appended {len(copies)} times in epoch {epoch}: "
                        f"{', '.join(c.id for c in copies)} (acknowledged: {acked.acked_id if acked else '?'})",
                        workspace=workspace, subject=key, ids=tuple(c.id for c in copies)))
        if len(log.epoch_seen) > 1 + len(losses.get(workspace, [])):
            violations.append(Violation(max(log.epoch_seen.values()), "epoch_without_loss",
                                        f"{len(log.epoch_seen)} epochs ({', '.join(log.epoch_seen)}) "
                                        f"but only {len(losses.get(workspace, []))} data loss(es) injected",
                                        workspace=workspace))
    for publish in recorder.publishes.values():
        final = epochs.get(publish.workspace)
        in_log = {id_ for id_, _, _ in logs.get(publish.workspace, [])}
        pos = Pos.parse(publish.acked_id)
        if pos is not None and pos.epoch == final and publish.acked_id not in in_log | lost:
            violations.append(Violation(publish.acked_t, "acked_event_lost",
                                        f"acknowledged {publish.acked_id} (key {publish.key}) is not in the log",
                                        workspace=publish.workspace, subject=publish.key,
                                        ids=(publish.acked_id,)))
    return violations


def presence_mismatches(t: float, expected: dict[str, set[str]],
                        seen: dict[tuple[str, str], set[str] | None], when: str) -> list[Violation]:
    """(c) at one instant: ``seen[(node, workspace)]`` (members, None when the node did not
    answer) against the users whose sessions are alive. Ghosts and missing members."""
    violations: list[Violation] = []
    for (node, workspace), members in sorted(seen.items()):
        if members is None:
            violations.append(Violation(t, "presence_unreadable", f"{node} does not answer GET presence",
                                        workspace=workspace))
            continue
        alive = expected.get(workspace, set())
        violations += [Violation(t, "presence_ghost", f"{user} is a member on {node} with no live session ({when})",
                                 workspace=workspace, subject=user) for user in sorted(members - alive)]
        violations += [Violation(t, "presence_missing", f"{user} has a live session but is no member on {node} "
                                 f"({when})", workspace=workspace, subject=user) for user in sorted(alive - members)]
    return violations


def check_answers(recorder: Recorder) -> list[Violation]:
    """(e): no publish was ever answered 500. A backend that cannot serve (down, restarting,
    full, demoted) is a 503 the client may retry; a 500 is a bug, retried or not."""
    return [Violation(t, "server_error", f"publish {publish.key} on {node}: {outcome}",
                      workspace=publish.workspace, subject=publish.key)
            for publish in recorder.publishes.values()
            for t, node, outcome in publish.attempts if outcome in ("HTTP 500", "error 500")]


def id_on_clock(publish: Publish, wall_offset: float) -> bool:
    """(f) The acknowledged id's time lies between the start of the publish's first attempt
    (recorded at its end: at most ``REQUEST_TIMEOUT`` later) and its acknowledgement, on the
    wall clock (``wall_offset``: wall time minus recorder time), give or take
    ``CLOCK_PROBE_EARLY``: ids are made on Redis's clock, never on a skewed node's."""
    pos = Pos.parse(publish.acked_id)
    if pos is None or not publish.attempts:
        return True
    made = pos.entry[0] / 1000 - wall_offset
    earliest = publish.attempts[0][0] - REQUEST_TIMEOUT - CLOCK_PROBE_EARLY
    return earliest <= made <= publish.acked_t + CLOCK_PROBE_EARLY


def check_memory(samples: Sequence[RssSample], cap_mb: float, growth_mb: float) -> list[Violation]:
    """(d): every sample under the cap, and no node grows across the run: the peak of its
    last third (whichever processes it was: restarts only start lower) within
    ``growth_mb`` of the peak of its first third after a 10 s warm-up. Runs of a minute or more."""
    violations: list[Violation] = []
    for sample in samples:
        if sample.kib > cap_mb * 1024:
            violations.append(Violation(sample.t, "rss_over_cap",
                                        f"{sample.node} (pid {sample.pid}) at {sample.kib / 1024:.0f} MiB "
                                        f"> cap {cap_mb:.0f} MiB"))
            break
    by_node: dict[str, list[RssSample]] = defaultdict(list)
    for sample in samples:
        by_node[sample.node].append(sample)
    for node, series in sorted(by_node.items()):
        begin, end = series[0].t + 10, series[-1].t
        third = (end - begin) / 3
        if third < 20:
            continue
        early = max(s.kib for s in series if begin <= s.t <= begin + third)
        late = max(s.kib for s in series if s.t >= end - third)
        if late - early > growth_mb * 1024:
            violations.append(Violation(end, "rss_growth",
                                        f"{node} peaked at {early / 1024:.0f} MiB in the first third of the run "
                                        f"and at {late / 1024:.0f} MiB in the last (more than {growth_mb:.0f} MiB more)"))
    return violations


# -- the world: processes, sessions, randomness ---------------------------------------------------


def read_rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def small_buffer_socket(addr_info: Any) -> socket.socket:
    """A client socket with a small receive buffer: a client that stops reading makes the
    node's writes block after a few KiB instead of megabytes."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return sock


def drop_connection(sock: Any) -> None:
    """Vanish: no WebSocket close, no FIN handshake to wait for; reset the TCP connection."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)


class World:
    """What clients and faults share: the processes, HTTP sessions, recorder and seed."""

    def __init__(self, options: Options, spawner: Spawner, redis: RedisServer | RedisClusterServers,
                 nodes: list[Node], recorder: Recorder) -> None:
        self.options, self.spawner, self.redis, self.nodes = options, spawner, redis, nodes
        self.recorder = recorder
        self.links: dict[str, Endpoint] = {}  # node name -> its proxy to Redis (link faults)
        self.workspaces = [f"chaos-{n}" for n in range(options.workspaces)]
        if options.ballast_mb > 0:
            self.workspaces.append(BALLAST)
        self.run_id = f"{options.seed}-{random.Random().getrandbits(24):06x}"
        # Streams and sockets hold their connection; requests never reuse one (a pooled
        # connection to a killed or stopped node would only add noise to the retries).
        self.streams = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.requests = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        self.slow = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=0, force_close=True, socket_factory=small_buffer_socket))

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.options.seed}:{name}")

    @property
    def server(self) -> RedisServer:
        """The one Redis server (``--topology single``: the faults ``TOPOLOGY_KINDS`` gives it)."""
        assert isinstance(self.redis, RedisServer)
        return self.redis

    def now(self) -> float:
        return self.recorder.now()

    async def close(self) -> None:
        for session in (self.streams, self.requests, self.slow):
            await session.close()

    async def presence_call(self, node: Node, workspace: str, user: str, what: str) -> bool:
        """``POST .../presence/<what>`` on ``node``; True on 200."""
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with self.requests.post(f"{node.url}{base(workspace)}/presence/{what}",
                                          headers=auth(user),
                                          timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as response:
                return response.status == 200
        return False

    async def members(self, node: Node, workspace: str) -> set[str] | None:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
            async with self.requests.get(f"{node.url}{base(workspace)}/presence", headers=auth("checker"),
                                         timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as response:
                if response.status == 200:
                    return {member["user_id"] for member in (await response.json())["members"]}
        return None


# -- clients -----------------------------------------------------------------------------------


def subject_of(envelope: dict[str, Any]) -> str:
    data = envelope.get("data") or {}
    if envelope.get("type") == EVENT_TYPE:
        return str(data.get("key", ""))
    return str(data.get("user_id", "")) if str(envelope.get("type", "")).startswith("presence.") else ""


def record_event(journal: Journal, t: float, envelope: dict[str, Any]) -> None:
    data = envelope.get("data") or {}
    note = (f"reason={data.get('reason')} last_event_id={data.get('last_event_id')}"
            if envelope.get("type") == "sync.reset" else "")
    journal.add(Entry(t, "event", str(envelope.get("workspace_id", "")), str(envelope.get("id", "")),
                      str(envelope.get("type", "")), subject_of(envelope), note))


async def read_sse(response: aiohttp.ClientResponse,
                   paused: Callable[[], float]) -> AsyncGenerator[dict[str, Any], None]:
    """The envelopes of an SSE body, in order, until it ends; ``TimeoutError`` when nothing
    (not even a keep-alive) arrives for ``IDLE`` seconds. ``paused()``: seconds not to read."""
    fields: dict[str, str] = {}
    while True:
        if (delay := paused()) > 0:
            await asyncio.sleep(delay)
        async with asyncio.timeout(IDLE):
            raw = await response.content.readline()
        if not raw:
            return
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in fields:
                yield json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = fields[name] + "\n" + value if name == "data" and "data" in fields else value


class Pace:
    """How a client reads: at once; or, for a while, not at all or one message per ``delay``
    seconds — now (``stop``) or once it has read some more events (``later``)."""

    def __init__(self) -> None:
        self.until = 0.0
        self.delay: float | None = None
        self.after: tuple[int, float, float | None] | None = None
        self.count = 0

    def stop(self, seconds: float, delay: float | None = None) -> None:
        self.until, self.delay = time.monotonic() + seconds, delay

    def later(self, events: int, seconds: float, delay: float | None = None) -> None:
        self.after = (self.count + events, seconds, delay)

    def counted(self) -> None:
        self.count += 1
        if self.after is not None and self.count >= self.after[0]:
            self.stop(*self.after[1:])
            self.after = None

    def wait(self) -> float:
        """Seconds to spend before reading the next message."""
        remaining = self.until - time.monotonic()
        if remaining <= 0:
            return 0.0
        return remaining if self.delay is None else self.delay


class Follower:
    """What the SSE and WebSocket clients share: a journal, a pace, and a loop that follows
    from a random node, again after every end (``follow``)."""

    def __init__(self, world: World, name: str, transport: str, workspaces: Sequence[str], *,
                 role: str, presence: bool, slow: bool) -> None:
        self.world, self.name, self.presence = world, name, presence
        self.journal = world.recorder.journal(name, role, transport, tuple(workspaces))
        self.rng = world.rng(name)
        self.session = world.slow if slow else world.streams
        self.pace = Pace()
        self.received = 0
        self.closed_in = ""  # the workspace a close is journaled under ("" = the socket's)

    def paused(self) -> float:
        return self.pace.wait()

    async def follow(self, node: Node) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            node = self.rng.choice(self.world.nodes)
            try:
                await self.follow(node)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                self.journal.add(Entry(self.world.now(), "close", self.closed_in,
                                       note=f"{node.name}: {exc!r}"[:160]))
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))


class SseClient(Follower):
    """An SSE follower of one workspace: any node, resuming with ``Last-Event-ID`` after
    every end. With ``presence`` it holds a REST session: joined once each stream is open,
    renewed every few seconds while it is."""

    def __init__(self, world: World, name: str, workspace: str, *, role: str = "regular",
                 presence: bool = False, since: str | None = None, slow: bool = False) -> None:
        super().__init__(world, name, "sse", (workspace,), role=role, presence=presence, slow=slow)
        self.workspace = self.closed_in = workspace
        self.last = since
        self.open = False
        self.joined = False

    def present_in(self) -> set[str]:
        return {self.workspace} if self.open and self.joined else set()

    def position(self, workspace: str) -> Pos | None:
        return Pos.parse(self.last)

    async def connect(self, node: Node) -> aiohttp.ClientResponse | None:
        headers = auth(self.name)
        if self.last:
            headers["Last-Event-ID"] = self.last
        self.journal.add(Entry(self.world.now(), "connect", self.workspace, self.last or "", note=node.name))
        async with asyncio.timeout(CONNECT_TIMEOUT):
            response = await self.session.get(
                f"{node.url}{base(self.workspace)}/stream?timeout=60", headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT))
        if response.status != 200:
            self.journal.add(Entry(self.world.now(), "close", self.workspace, note=f"HTTP {response.status}"))
            response.close()
            return None
        return response

    async def follow(self, node: Node) -> None:
        response = await self.connect(node)
        if response is None:
            return
        holder = asyncio.create_task(self.hold_presence()) if self.presence else None
        self.open = True
        try:
            async for envelope in read_sse(response, self.paused):
                self.deliver(envelope)
            self.journal.add(Entry(self.world.now(), "close", self.workspace, note="end of stream"))
        finally:
            self.open = self.joined = False
            if holder is not None:
                holder.cancel()
                await asyncio.gather(holder, return_exceptions=True)
            response.close()

    def deliver(self, envelope: dict[str, Any]) -> None:
        record_event(self.journal, self.world.now(), envelope)
        self.last = str(envelope.get("id") or self.last or "") or None
        self.received += 1
        self.pace.counted()

    async def hold_presence(self) -> None:
        while True:
            node = self.rng.choice(self.world.nodes)
            ok = await self.world.presence_call(node, self.workspace, self.name, "join")
            if ok and not self.joined:
                self.journal.add(Entry(self.world.now(), "note", self.workspace, note=f"joined via {node.name}"))
            self.joined = self.joined or ok
            await asyncio.sleep(RENEW_EVERY if ok else 0.5)


class ChannelClosed(ConnectionError):
    pass


class Channel:
    """One JSON WebSocket to a node: ``request`` returns the answer to its ``ref``; events
    go to ``on_event`` in arrival order; ``paused()`` seconds are spent not reading."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, on_event: Callable[[dict[str, Any]], None],
                 paused: Callable[[], float]) -> None:
        self.ws, self.on_event, self.paused = ws, on_event, paused
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.refs = itertools.count(1)
        self.ended = ""
        self.reader = asyncio.create_task(self.pump())

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, node: Node, user: str,
                   on_event: Callable[[dict[str, Any]], None], paused: Callable[[], float]) -> Channel:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await session.ws_connect(f"{node.url.replace('http', 'ws', 1)}/v1/sync/ws",
                                          headers=auth(user), protocols=(SUBPROTOCOL_JSON,),
                                          heartbeat=None, timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        return cls(ws, on_event, paused)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """The ``reply``/``error`` for this message; ``ChannelClosed`` or ``TimeoutError``."""
        if self.reader.done():
            raise ChannelClosed(self.ended)
        ref = f"r{next(self.refs)}"
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ref] = answer
        try:
            await self.ws.send_str(json.dumps({"op": op, "ref": ref, **fields}))
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await answer
        finally:
            self.pending.pop(ref, None)

    async def pump(self) -> None:
        try:
            while True:
                if (delay := self.paused()) > 0:
                    await asyncio.sleep(delay)
                message = await self.ws.receive(timeout=IDLE)
                if message.type is aiohttp.WSMsgType.TEXT:
                    self.dispatch(json.loads(message.data))
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                      aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    self.ended = f"closed {self.ws.close_code}"
                    return
        except TimeoutError:
            self.ended = "idle timeout"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.ended = repr(exc)[:120]
        finally:
            for answer in self.pending.values():
                if not answer.done():
                    answer.set_exception(ChannelClosed(self.ended or "closed"))

    def dispatch(self, message: dict[str, Any]) -> None:
        if message.get("op") == "event":
            self.on_event(message["event"])
            return
        answer = self.pending.get(str(message.get("ref")))
        if answer is not None and not answer.done():
            answer.set_result(message)

    def drop(self) -> None:
        drop_connection(self.ws.get_extra_info("socket"))

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.ws.close()


def answer_error(answer: dict[str, Any]) -> str:
    if answer.get("op") == "reply":
        return ""
    error = answer.get("error") or {}
    return str(error.get("status_code") or error.get("detail") or error)[:120]


class WsClient(Follower):
    """A WebSocket follower of several workspaces on one socket: any node, ``subscribe``
    with ``since`` after every close; with ``presence`` it joins each workspace."""

    def __init__(self, world: World, name: str, workspaces: Sequence[str], *, role: str = "regular",
                 presence: bool = False, since: str | None = None, slow: bool = False) -> None:
        super().__init__(world, name, "ws", workspaces, role=role, presence=presence, slow=slow)
        self.workspaces = tuple(workspaces)
        self.last: dict[str, str | None] = {ws: since for ws in workspaces}
        self.joined: set[str] = set()
        self.closes: Counter[str] = Counter()

    def present_in(self) -> set[str]:
        return set(self.joined)

    def position(self, workspace: str) -> Pos | None:
        return Pos.parse(self.last[workspace])

    def deliver(self, envelope: dict[str, Any]) -> None:
        record_event(self.journal, self.world.now(), envelope)
        workspace = str(envelope.get("workspace_id"))
        if workspace in self.last and envelope.get("id"):
            self.last[workspace] = str(envelope["id"])
        self.received += 1
        self.pace.counted()

    async def subscribe(self, channel: Channel, node: Node) -> bool:
        for workspace in self.workspaces:
            since = self.last[workspace]
            self.journal.add(Entry(self.world.now(), "connect", workspace, since or "", note=node.name))
            fields = {"org_id": ORG, "workspace_id": workspace, **({"since": since} if since else {})}
            if problem := answer_error(await channel.request("subscribe", **fields)):
                self.journal.add(Entry(self.world.now(), "close", workspace, note=f"subscribe: {problem}"))
                return False
        return True

    async def join(self, channel: Channel, workspace: str) -> None:
        for _ in range(20):  # bounded: a node that keeps refusing is left for another
            problem = answer_error(await channel.request("join", org_id=ORG, workspace_id=workspace))
            if not problem:
                self.joined.add(workspace)
                return
            await asyncio.sleep(0.5)
        raise ChannelClosed(f"join refused: {problem}")

    async def follow(self, node: Node) -> None:
        channel = await Channel.open(self.session, node, self.name, self.deliver, self.paused)
        try:
            if await self.subscribe(channel, node):
                if self.presence:
                    for workspace in self.workspaces:
                        await self.join(channel, workspace)
                await asyncio.wait([channel.reader])
            self.closes[channel.ended or "client"] += 1
            self.journal.add(Entry(self.world.now(), "close", note=f"{node.name}: {channel.ended}"))
        finally:
            self.joined.clear()
            await channel.close()


class Publisher:
    """Publishes ``chaos.tick`` events (their key in ``data.key``) at ``rate`` per second to
    random workspaces, each retried with its key until acknowledged or ``PUBLISH_DEADLINE``;
    over REST (``Idempotency-Key``) or a WebSocket (``idempotency_key``)."""

    def __init__(self, world: World, name: str, transport: str) -> None:
        self.world, self.name, self.transport = world, name, transport
        self.rng = world.rng(name)
        self.channel: Channel | None = None
        self.channel_node = ""
        self.stopping = False

    async def run(self) -> None:
        try:
            for n in itertools.count(1):
                if self.stopping:
                    return
                workspace = self.rng.choice(self.world.workspaces)
                key = f"{self.world.run_id}.{self.name}.{n}"
                publish = self.world.recorder.publishes[key] = Publish(key, workspace, self.name)
                body = {"key": key, "n": n, "pad": "x" * self.rng.randint(100, 3000)}
                await self.publish(publish, body)
                await asyncio.sleep(self.rng.expovariate(self.world.options.rate))
        finally:
            if self.channel is not None:
                await self.channel.close()

    async def publish(self, publish: Publish, body: dict[str, Any]) -> None:
        attempt = self.attempt_ws if self.transport == "ws" else self.attempt_rest
        deadline = time.monotonic() + PUBLISH_DEADLINE
        while time.monotonic() < deadline:
            node, outcome = await attempt(self.rng.choice(self.world.nodes), publish, body)
            publish.attempts.append((self.world.now(), node, outcome))
            if publish.acked_id or publish.refused:
                return
            await asyncio.sleep(self.rng.uniform(0.1, 0.4))

    async def attempt_rest(self, node: Node, publish: Publish, body: dict[str, Any]) -> tuple[str, str]:
        return node.name, await self.post(node, publish, body)

    async def post(self, node: Node, publish: Publish, body: dict[str, Any]) -> str:
        headers = auth(self.name)
        if self.world.options.idempotency:
            headers["Idempotency-Key"] = publish.key
        try:
            async with self.world.requests.post(
                f"{node.url}{base(publish.workspace)}/events", headers=headers,
                json={"type": EVENT_TYPE, "data": body},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as response:
                answer = await response.json(content_type=None)
                if response.status == 200:
                    publish.acked_id, publish.acked_t = str(answer["id"]), self.world.now()
                    return f"200 {publish.acked_id}"
                if response.status not in RETRYABLE:
                    publish.refused = f"HTTP {response.status} {answer}"[:200]
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return repr(exc)[:80]

    async def attempt_ws(self, node: Node, publish: Publish, body: dict[str, Any]) -> tuple[str, str]:
        """Over the publisher's socket (opened on ``node`` when it has none)."""
        if self.channel is None or self.channel.reader.done():
            self.channel_node = node.name
        return self.channel_node, await self.send(node, publish, body)

    async def send(self, node: Node, publish: Publish, body: dict[str, Any]) -> str:
        try:
            if self.channel is None or self.channel.reader.done():
                self.channel = await Channel.open(self.world.streams, node, self.name, lambda _: None, lambda: 0.0)
            fields: dict[str, Any] = {"org_id": ORG, "workspace_id": publish.workspace,
                                      "type": EVENT_TYPE, "data": body}
            if self.world.options.idempotency:
                fields["idempotency_key"] = publish.key
            answer = await self.channel.request("publish", **fields)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            if self.channel is not None:
                await self.channel.close()
                self.channel = None
            return repr(exc)[:80]
        if not (problem := answer_error(answer)):
            publish.acked_id, publish.acked_t = str(answer["data"]["id"]), self.world.now()
            return f"reply {publish.acked_id}"
        if not problem.isdigit() or int(problem) not in RETRYABLE:
            publish.refused = f"error {problem}"
        return f"error {problem}"


# -- faults --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedFault:
    kind: str
    target: str  # a node's name, "redis", or the transport of a client fault
    length: float  # seconds down / paused / not reading
    gap: float  # seconds before it starts
    variant: str = ""  # client_stall: "regular" (a running client), "far_back" or "slow" (a new one)
    count: int = 0  # client_vanish: events read before the connection is dropped


class FaultPlan:
    """The seeded fault sequence: what, where, how long, and the pause before each. The same
    seed gives the same sequence (how much of it a run gets through depends on timing). The
    first round of node and Redis faults has every enabled kind once, in a random order."""

    def __init__(self, options: Options, node_names: Sequence[str]) -> None:
        self.options, self.node_names = options, list(node_names)
        self.infra = random.Random(f"{options.seed}:infra")
        self.clients = random.Random(f"{options.seed}:clients")
        self.infra_kinds = [kind for kind in INFRA_KINDS
                            if kind in options.faults and kind in TOPOLOGY_KINDS[options.topology]]
        self.client_kinds = [kind for kind in CLIENT_KINDS if kind in options.faults]
        self.first_round = self.infra.sample(self.infra_kinds, len(self.infra_kinds))

    def next_infra(self) -> PlannedFault | None:
        if not self.infra_kinds:
            return None
        rng = self.infra
        if self.first_round:
            kind = self.first_round.pop()
        else:
            kind = rng.choices(self.infra_kinds, [INFRA_WEIGHTS[k] for k in self.infra_kinds])[0]
        on_a_node = kind.startswith("node_") or kind in (*LINK_KINDS, "clock_skew")
        target = rng.choice(self.node_names) if on_a_node else "redis"
        longest = 2 * self.options.node_timeout if kind == "node_pause" else 2.5
        shortest, longest = self.link_length(kind) or (0.3, longest)
        return PlannedFault(kind, target, rng.uniform(shortest, longest), rng.uniform(0.5, self.longest_gap(4.0)))

    def link_length(self, kind: str) -> tuple[float, float] | None:
        """How long a fault of a node's link lasts (None: not a link fault)."""
        if kind == "partition":
            return 0.5, 2 * self.options.node_timeout
        return SLOW_LINK_LENGTH if kind == "slow_link" else None

    def longest_gap(self, most: float) -> float:
        """Short runs pause less between faults, so that they still get through every kind."""
        return min(most, 1.0 + self.options.duration / 60)

    def next_client(self) -> PlannedFault | None:
        if not self.client_kinds:
            return None
        rng = self.clients
        kind = rng.choice(self.client_kinds)
        transport = rng.choice(("sse", "ws"))
        variant = rng.choice(("regular", "far_back", "slow")) if kind == "client_stall" else ""
        return PlannedFault(kind, transport, rng.uniform(1.0, 5.0), rng.uniform(1.0, self.longest_gap(3.5)), variant,
                            rng.randint(0, 40))


class Faults:
    """Injects the plan: node and Redis faults one at a time, client faults beside them.
    Every fault is recorded (``Recorder.fault``) with when it started and ended."""

    def __init__(self, world: World, plan: FaultPlan, regulars: Sequence[SseClient | WsClient]) -> None:
        self.world, self.plan, self.regulars = world, plan, regulars
        self.down: set[str] = set()  # nodes a fault has stopped on purpose
        self.transients: list[asyncio.Task[None]] = []
        self.counter = itertools.count(1)
        self.ballast_rounds = 0

    async def seed_ballast(self) -> str:
        """``--ballast-mb`` of big events in the ballast workspace, 8 publishes at a time: a
        resume from its start replays more than the kernel's socket buffers hold, so a node
        writing it to a client that stopped reading really blocks. Recorded as publishes."""
        count = int(self.world.options.ballast_mb * 1_000_000 / BALLAST_EVENT_BYTES)
        if count <= 0:
            return ""
        publisher, pad = Publisher(self.world, "ballast", "rest"), "b" * BALLAST_EVENT_BYTES
        self.ballast_rounds += 1
        began = time.monotonic()

        async def one(n: int) -> None:
            key = f"{self.world.run_id}.ballast.{self.ballast_rounds}.{n}"
            publish = self.world.recorder.publishes[key] = Publish(key, BALLAST, publisher.name)
            await publisher.publish(publish, {"key": key, "n": n, "pad": pad})

        for first in range(0, count, 8):
            await asyncio.gather(*(one(n) for n in range(first, min(count, first + 8))))
        return f"; ballast: {count} events in {time.monotonic() - began:.1f}s"

    def record(self, start: float, kind: str, target: str, detail: str) -> None:
        self.world.recorder.fault(Fault(start, self.world.now(), kind, target, detail))

    def node(self, name: str) -> Node:
        return next(node for node in self.world.nodes if node.name == name)

    async def run_infra(self, until: float) -> None:
        """Node and Redis faults until ``until`` (none starts that could not end by then)."""
        actions: dict[str, Callable[[PlannedFault], Awaitable[str]]] = {
            "node_kill": self.node_kill, "node_pause": self.node_pause, "node_drain": self.node_drain,
            "redis_restart": self.redis_restart, "redis_wipe": self.redis_wipe,
            "redis_full": self.redis_full, "redis_crash": self.redis_crash,
            "partition": self.partition, "slow_link": self.slow_link,
            "cluster_failover": self.cluster_failover,
            "clock_skew": self.clock_skew,
        }
        while (fault := self.plan.next_infra()) is not None:
            await asyncio.sleep(fault.gap)
            if self.world.now() + fault.length + 3 > until:
                return
            start = self.world.now()
            detail = await actions[fault.kind](fault)
            self.record(start, fault.kind, fault.target, detail)

    async def run_clients(self, until: float) -> None:
        """Client faults until ``until`` minus enough for a vanished REST lease to run out."""
        while (fault := self.plan.next_client()) is not None:
            await asyncio.sleep(fault.gap)
            if self.world.now() + PRESENCE_TTL + 2 > until:
                return
            action = self.vanish if fault.kind == "client_vanish" else self.stall
            self.transients.append(asyncio.create_task(action(fault, next(self.counter))))

    async def restart(self, node: Node) -> str:
        for _ in range(2):
            node.start()
            try:
                await node.wait_ready(30)
                self.down.discard(node.name)
                return ""
            except RuntimeError as exc:
                self.world.recorder.violation(Violation(self.world.now(), "node_restart_failed",
                                                        f"{node.name}: {exc}"[:1500]))
                node.stop()
        self.down.discard(node.name)
        return " (restart failed)"

    async def node_kill(self, fault: PlannedFault) -> str:
        node = self.node(fault.target)
        self.down.add(node.name)
        node.signal(signal.SIGKILL)
        await asyncio.to_thread(node.wait_exit, 10)
        await asyncio.sleep(fault.length)
        return f"SIGKILL, down {fault.length:.1f}s" + await self.restart(node)

    async def node_pause(self, fault: PlannedFault) -> str:
        node = self.node(fault.target)
        node.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(fault.length)
        finally:
            node.signal(signal.SIGCONT)
        beyond = " (beyond --node-timeout)" if fault.length > self.world.options.node_timeout else ""
        return f"SIGSTOP {fault.length:.1f}s then SIGCONT{beyond}"

    async def node_drain(self, fault: PlannedFault) -> str:
        node = self.node(fault.target)
        self.down.add(node.name)
        node.signal(signal.SIGTERM)
        began = time.monotonic()
        try:
            code = await asyncio.to_thread(node.wait_exit, 15)
        except Exception:  # subprocess.TimeoutExpired: a drain that never ends
            self.world.recorder.violation(Violation(self.world.now(), "drain_timeout",
                                                    f"{node.name} still running 15 s after SIGTERM"))
            node.stop()
            code = -9
        took = time.monotonic() - began
        if code != 0:
            self.world.recorder.violation(Violation(self.world.now(), "drain_exit",
                                                    f"{node.name} exited {code} after SIGTERM"))
        await asyncio.sleep(fault.length)
        return f"SIGTERM, exit {code} after {took:.1f}s, down {fault.length:.1f}s" + await self.restart(node)

    async def redis_restart(self, fault: PlannedFault) -> str:
        await asyncio.to_thread(self.world.redis.stop)
        await asyncio.sleep(fault.length)
        await asyncio.to_thread(self.world.redis.start)
        return f"SIGTERM (AOF kept), down {fault.length:.1f}s"

    async def redis_wipe(self, fault: PlannedFault) -> str:
        redis = self.world.server
        await asyncio.to_thread(redis.kill)
        shutil.rmtree(redis.dir / "appendonlydir", ignore_errors=True)
        for leftover in [*redis.dir.glob("*.rdb"), *redis.dir.glob("*.aof")]:
            leftover.unlink(missing_ok=True)
        await asyncio.sleep(fault.length)
        await asyncio.to_thread(redis.start)
        return f"SIGKILL, AOF deleted, down {fault.length:.1f}s" + await self.seed_ballast()

    async def partition(self, fault: PlannedFault) -> str:
        """Cut the node's link to Redis like a cable (nothing closed or reset), then heal it:
        the node must say 503, its peers reap it past the node timeout, and it re-asserts
        what it holds once the link is back (its users may leave and rejoin once)."""
        link = self.world.links[fault.target]
        link.blackhole()
        try:
            await asyncio.sleep(fault.length)
        finally:
            link.heal()
        beyond = " (beyond --node-timeout)" if fault.length > self.world.options.node_timeout else ""
        return f"blackhole {fault.length:.1f}s then healed{beyond}"

    async def slow_link(self, fault: PlannedFault) -> str:
        """Delay everything between the node and Redis: no reaping, nothing lost or repeated."""
        link = self.world.links[fault.target]
        link.slow(*SLOW_LINK_DELAY)
        try:
            await asyncio.sleep(fault.length)
        finally:
            link.heal()
        low, high = SLOW_LINK_DELAY
        return f"{low * 1000:.0f}-{high * 1000:.0f} ms each way for {fault.length:.1f}s"

    async def redis_full(self, fault: PlannedFault) -> str:
        """Redis out of memory (``noeviction``): ``maxmemory`` 1 MB below what it uses, so every
        write that would grow it is refused, then no limit again."""
        client = Redis.from_url(self.world.redis.url)
        try:
            used = (await client.info("memory"))["used_memory"]
            await client.config_set("maxmemory", max(1, used - 1_000_000))
            await asyncio.sleep(fault.length)
            await client.config_set("maxmemory", 0)
        finally:
            await client.aclose()
        return f"maxmemory {used - 1_000_000} (1 MB below used) for {fault.length:.1f}s"

    async def redis_crash(self, fault: PlannedFault) -> str:
        """Redis' host loses power (``appendfsync everysec``, the deploy kit's setting):
        SIGKILL, and its AOF keeps only what had been flushed 0.1 to 1 s before, so the latest
        acknowledged writes are gone while the epochs survive. What each log still holds is
        read before any node reconnects (``Crash``): the checker counts what was lost, and
        owes a reset only to clients of a log that lost an event somebody had seen."""
        redis = self.world.server
        unsynced = self.world.rng(f"redis_crash-{next(self.counter)}").uniform(0.1, 1.0)
        synced = redis.aof_tail()
        await asyncio.sleep(unsynced)
        crashed = self.world.now()
        cut = await asyncio.to_thread(redis.crash_host, synced)
        kept = await asyncio.to_thread(self.kept_logs)
        self.world.recorder.crashes.append(Crash(crashed, kept))
        await asyncio.sleep(fault.length)
        await asyncio.to_thread(redis.start)
        return f"SIGKILL, AOF cut back {cut} bytes ({unsynced:.2f}s unflushed), down {fault.length:.1f}s"

    def kept_logs(self) -> dict[str, tuple[str | None, tuple[int, int] | None]]:
        """Each workspace log's epoch and last entry in the stopped Redis' files."""
        commands = [command for workspace in self.world.workspaces
                    for stream, epoch_key in [log_keys(workspace)]
                    for command in (["get", epoch_key], ["xrevrange", stream, "+", "-", "count", "1"])]
        answers = iter(self.world.server.read_offline(*commands))
        kept: dict[str, tuple[str | None, tuple[int, int] | None]] = {}
        for workspace, epoch, last in zip(self.world.workspaces, answers, answers, strict=True):
            pos = Pos.parse(f"{epoch}:{last[0][0]}") if epoch and last else None
            kept[workspace] = (epoch or None, pos.entry if pos else None)
        return kept

    async def cluster_failover(self, fault: PlannedFault) -> str:
        """A random primary's slots move to its replica: every other time by SIGKILL (the
        cluster fails it over after ``cluster-node-timeout``; it is restarted
        ``fault.length`` later and rejoins as a replica), else by ``CLUSTER FAILOVER`` on
        the replica (graceful, the old primary stays up as the replica)."""
        cluster = self.world.redis
        assert isinstance(cluster, RedisClusterServers)
        rng = self.world.rng(f"cluster-{next(self.counter)}")
        primary = rng.choice(sorted(set(cluster.slot_map().values())))
        replica = cluster.replica_of(primary)
        began = time.monotonic()
        if sum(f.kind == "cluster_failover" for f in self.world.recorder.faults) % 2 == 0:
            start = self.world.now()
            await asyncio.to_thread(cluster.kill, primary)
            await asyncio.to_thread(cluster.wait_replaced, primary, 30)
            settled = time.monotonic() - began
            lost = await failover_losses(self.world, start)
            self.world.recorder.failover_losses += lost
            await asyncio.sleep(fault.length)
            await asyncio.to_thread(cluster.restart, primary)
            await asyncio.to_thread(cluster.wait_settled, 30)
            return (f"SIGKILL primary {primary}, replica {replica} serving in {settled:.1f}s, "
                    f"restarted {fault.length:.1f}s later; lost {sum(len(loss.ids) for _, loss in lost)} events seen")
        await asyncio.to_thread(cluster.failover, replica)
        await asyncio.to_thread(cluster.wait_replaced, primary, 30)
        return f"CLUSTER FAILOVER on replica {replica} of {primary} in {time.monotonic() - began:.1f}s"

    async def clock_skew(self, fault: PlannedFault) -> str:
        """Restart a node (SIGKILL) with its wall clock 5 to 30 s ahead of or behind everyone's
        (libfaketime; its monotonic clock and timers untouched), keep it so for about a
        REST lease, then restart it on the true clock. Meanwhile check (f): what a node made
        holds on another whatever their clocks (``probe_clocks``). (The checker's tokens are
        fresh, so a node behind judges their ``iat`` ahead of it: accepted, docs/redis.md.)"""
        rng = self.world.rng(f"clock_skew-{next(self.counter)}")
        node = self.node(fault.target)
        offset = rng.choice((-1.0, 1.0)) * rng.uniform(5.0, 30.0)
        detail = f"{node.name} {offset:+.1f}s" + await self.restart_with(node, skewed_clock(offset))
        began = self.world.now()
        detail += await self.probe_clocks(node, hold=PRESENCE_TTL - CLOCK_PROBE_EARLY + fault.length)
        detail += f", skewed {self.world.now() - began:.1f}s" + await self.restart_with(node, {})
        return detail

    async def restart_with(self, node: Node, env: dict[str, str]) -> str:
        """SIGKILL ``node`` and start it again with ``env`` (its clock's skew, or none)."""
        self.down.add(node.name)
        node.signal(signal.SIGKILL)
        await asyncio.to_thread(node.wait_exit, 10)
        node.env = env
        return await self.restart(node)

    async def probe_clocks(self, skewed: Node, hold: float) -> str:
        """Check (f) while ``skewed`` runs off the true clock, for ``hold`` s: a stream ticket
        made on it is redeemed on another node and the other way round; a REST session made
        through each is still a member on every node ``CLOCK_PROBE_EARLY`` before its
        ``PRESENCE_TTL`` ends; ids acknowledged meanwhile are on Redis's clock (this host's,
        within ``CLOCK_PROBE_EARLY``). The probe users leave at the end."""
        world = self.world
        other = next((node for node in world.nodes if node is not skewed and node.name not in self.down), None)
        if other is None:
            return ", no other node up to probe"
        workspace, began, wall = world.workspaces[0], world.now(), time.time()
        users = {node.name: f"clock-probe-{node.name}-{next(self.counter)}" for node in (skewed, other)}
        flagged = [("skew_presence", f"{user} joined via {name} refused") for name, user in users.items()
                   if not await world.presence_call(self.node(name), workspace, user, "join")]
        flagged += [("skew_ticket", f"ticket from {a.name} refused on {b.name} ({status})")
                    for a, b in ((skewed, other), (other, skewed))
                    if (status := await self.ticket_status(a, b, workspace)) != 200]
        await asyncio.sleep(max(0.0, PRESENCE_TTL - CLOCK_PROBE_EARLY - (world.now() - began)))
        if world.now() - began <= PRESENCE_TTL - CLOCK_PROBE_EARLY / 2:  # (a loaded run may be late)
            for node in (node for node in world.nodes if node.name not in self.down):
                present = await world.members(node, workspace)
                flagged += [("skew_presence", f"{user} no member on {node.name} "
                                              f"{world.now() - began:.1f}s after joining")
                            for user in users.values() if present is not None and user not in present]
                if present is None:
                    flagged.append(("skew_presence", f"presence unreadable on {node.name}"))
        await asyncio.sleep(max(0.0, hold - (world.now() - began)))
        flagged += [("skew_id", f"{publish.key} acknowledged as {publish.acked_id}, not on Redis's clock")
                    for publish in world.recorder.publishes.values()
                    if publish.acked_t >= began and not id_on_clock(publish, wall - began)]
        for name, user in users.items():
            await world.presence_call(self.node(name), workspace, user, "leave")
        for kind, problem in flagged:
            world.recorder.violation(Violation(world.now(), kind, problem, workspace=workspace))
        return f", probes: {len(flagged)} wrong"

    async def ticket_status(self, issuer: Node, redeemer: Node, workspace: str) -> int:
        """A stream ticket issued by ``issuer``, opened on ``redeemer``: its status (0: no answer)."""
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError):
            timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
            async with self.world.requests.post(f"{issuer.url}{base(workspace)}/tickets",
                                                headers=auth("clock-probe"), timeout=timeout) as issued:
                ticket = (await issued.json())["ticket"]
            async with self.world.requests.get(f"{redeemer.url}{base(workspace)}/stream",
                                               params={"ticket": ticket}, timeout=timeout) as opened:
                return opened.status
        return 0

    async def vanish(self, fault: PlannedFault, index: int) -> None:
        """A client that joins, resumes from far back, reads ``fault.count`` events, stops
        reading (so the node's replay blocks on full buffers) and drops its TCP connection."""
        world, rng = self.world, self.world.rng(f"vanish-{index}")
        name, workspace, node = f"vanish-{index}", pick_workspace(world, rng), rng.choice(world.nodes)
        since = world.recorder.far_back(workspace, rng)
        hold = fault.length / 4  # seconds not reading before the drop
        start = world.now()
        try:
            if fault.target == "ws":
                got = await self.vanish_ws(name, workspace, node, since, fault.count, hold)
            else:
                got = await self.vanish_sse(name, workspace, node, since, fault.count, hold)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            got = f"failed: {exc!r}"[:100]
        self.record(start, "client_vanish", name, f"{fault.target} on {node.name} {workspace} since {since}: {got}")

    async def vanish_ws(self, name: str, workspace: str, node: Node, since: str | None, count: int,
                        hold: float) -> str:
        client = WsClient(self.world, name, [workspace], role="vanish", since=since, slow=True)
        client.pace.later(count, 60.0)
        channel = await Channel.open(self.world.slow, node, name, client.deliver, client.paused)
        try:
            await client.join(channel, workspace)
            await client.subscribe(channel, node)
            await wait_until(lambda: client.received >= count or channel.reader.done(), 2.0)
            await asyncio.sleep(hold)
            channel.drop()
            client.journal.add(Entry(self.world.now(), "close", workspace, note="dropped the TCP connection"))
            return f"joined, read {client.received} events, stopped reading {hold:.1f}s, dropped"
        finally:
            await channel.close()

    async def vanish_sse(self, name: str, workspace: str, node: Node, since: str | None, count: int,
                         hold: float) -> str:
        client = SseClient(self.world, name, workspace, role="vanish", since=since, slow=True)
        response = await client.connect(node)
        if response is None:
            return "refused"
        try:
            joined = await self.world.presence_call(self.world.rng(name).choice(self.world.nodes),
                                                    workspace, name, "join")
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with asyncio.timeout(2.0), contextlib.aclosing(read_sse(response, lambda: 0.0)) as events:
                    async for envelope in events:
                        if client.received >= count:
                            break
                        client.deliver(envelope)
            if not joined:  # a join whose answer was lost may still hold a lease: end it
                await self.world.presence_call(node, workspace, name, "leave")
            await asyncio.sleep(hold)
            connection = response.connection
            drop_connection(connection.transport.get_extra_info("socket")
                            if connection is not None and connection.transport is not None else None)
            client.journal.add(Entry(self.world.now(), "close", workspace, note="dropped the TCP connection"))
            return (f"{'joined' if joined else 'join failed'}, read {client.received} events, "
                    f"stopped reading {hold:.1f}s, dropped")
        finally:
            response.close()

    async def stall(self, fault: PlannedFault, index: int) -> None:
        """``regular``: a running client stops reading for ``fault.length`` s. ``far_back`` /
        ``slow``: a new client resumes from far back, after a few events stops reading (or
        reads one message per 20-50 ms) for ``fault.length`` s, then must catch up."""
        start = self.world.now()
        if fault.variant == "regular":
            candidates = [c for c in self.regulars if isinstance(c, WsClient) == (fault.target == "ws")]
            client = self.world.rng(f"stall-{index}").choice(candidates or list(self.regulars))
            client.pace.stop(fault.length)
            await asyncio.sleep(fault.length)
            self.record(start, "client_stall", client.name, f"stopped reading {fault.length:.1f}s")
            return
        detail = await self.stall_far_back(fault, index)
        self.record(start, "client_stall", f"stall-{index}", detail)

    async def stall_far_back(self, fault: PlannedFault, index: int) -> str:
        world, rng, name = self.world, self.world.rng(f"stall-{index}"), f"stall-{index}"
        workspace = pick_workspace(world, rng)
        since = world.recorder.far_back(workspace, rng)
        client: SseClient | WsClient = (
            WsClient(world, name, [workspace], role="transient", since=since, slow=True)
            if fault.target == "ws" else SseClient(world, name, workspace, role="transient", since=since, slow=True))
        after, delay = rng.randint(1, 20), rng.uniform(0.02, 0.05) if fault.variant == "slow" else None
        client.pace.later(after, fault.length, delay)
        how = f"read one message per {delay * 1000:.0f} ms" if delay else "stopped reading"
        task = asyncio.create_task(client.run())
        try:
            await asyncio.sleep(fault.length + 1.0)
            target = Pos.parse(world.recorder.head(workspace))

            def caught_up() -> bool:
                pos = client.position(workspace)
                return target is None or (pos is not None and (pos.epoch != target.epoch or pos.entry >= target.entry))

            done = await wait_until(caught_up, 25.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not done:
            world.recorder.violation(Violation(
                world.now(), "never_caught_up",
                f"resumed from {since}, {how} {fault.length:.1f}s, still behind {target} 25 s later "
                f"(at {client.position(workspace)})", client=name, workspace=workspace))
        return (f"{fault.target} {workspace} since {since}, {how} {fault.length:.1f}s after {after} events; "
                f"{'caught up' if done else 'NOT caught up in 25 s'}")


def pick_workspace(world: World, rng: random.Random) -> str:
    """For a far-back resume: the ballast half of the time (when there is one)."""
    if BALLAST in world.workspaces and rng.random() < 0.5:
        return BALLAST
    return rng.choice(world.workspaces)


async def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


# -- the run -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    options: Options
    directory: Path
    elapsed: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    known_events: int = 0
    log_events: int = 0
    presence_converged_in: float | None = None
    presence_members: int = 0
    loop_lag_max: float = 0.0
    ws_closes: Counter[str] = field(default_factory=Counter)
    wipes: list[float] = field(default_factory=list)  # when Redis lost its data
    crash_lost: int = 0  # events somebody saw that a host crash took from the logs
    crash_lost_acked: int = 0  # of them, acknowledged publishes

    @property
    def ok(self) -> bool:
        return not self.violations


class Scenario:
    """One run: clients and publishers start, faults run for ``duration`` seconds, then
    everything settles and is checked."""

    def __init__(self, world: World) -> None:
        self.world = world
        options = world.options
        self.sse = [SseClient(world, f"sse-{n}", world.workspaces[n % len(world.workspaces)],
                              presence=n % 2 == 0) for n in range(options.sse_clients)]
        self.ws = [WsClient(world, f"wsc-{n}", [world.workspaces[(n + k) % len(world.workspaces)]
                                                for k in range(min(2, len(world.workspaces)))],
                            presence=True) for n in range(options.ws_clients)]
        self.regulars: list[SseClient | WsClient] = [*self.sse, *self.ws]
        self.publishers = ([Publisher(world, f"pub-rest-{n}", "rest") for n in range(options.rest_publishers)]
                           + [Publisher(world, f"pub-ws-{n}", "ws") for n in range(options.ws_publishers)])
        self.faults = Faults(world, FaultPlan(options, [node.name for node in world.nodes]), self.regulars)
        self.report = Report(options, world.spawner.directory)
        self.restarts: list[asyncio.Task[str]] = []

    async def play(self) -> Report:
        world, options = self.world, self.world.options
        tasks: list[asyncio.Task[Any]] = [asyncio.create_task(self.sample()), asyncio.create_task(self.watch_lag())]
        try:
            log(world, f"seeded{await self.faults.seed_ballast()}")
            tasks += [asyncio.create_task(client.run()) for client in self.regulars]
            publishers = [asyncio.create_task(publisher.run()) for publisher in self.publishers]
            tasks += publishers
            await asyncio.sleep(3.0)  # everyone connected before the first fault
            until = world.now() + options.duration - 3.0
            await asyncio.gather(self.faults.run_infra(until), self.faults.run_clients(until))
            await self.finish_transients()
            faults_end = world.now()
            log(world, f"faults over at t={faults_end:.1f}s; settling")
            for publisher in self.publishers:
                publisher.stopping = True
            await asyncio.wait(publishers, timeout=PUBLISH_DEADLINE + 5)
            await self.check_presence(faults_end + options.node_timeout + options.disconnect_grace + SETTLE_SLACK)
            ends = await self.catch_up()
        finally:
            tasks += [*self.faults.transients, *self.restarts]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        logs, epochs = await read_logs(world)
        self.analyse(logs, epochs, ends)
        return self.report

    async def finish_transients(self) -> None:
        if self.faults.transients:
            await asyncio.wait(self.faults.transients, timeout=40)

    async def sample(self) -> None:
        """RSS of every node each second; a node that died outside a fault is a violation
        (and is started again, so the run goes on)."""
        recorder = self.world.recorder
        while True:
            for node in self.world.nodes:
                proc = node.proc
                if proc is None:
                    continue
                if proc.poll() is not None and node.name not in self.faults.down:
                    recorder.violation(Violation(recorder.now(), "node_died",
                                                 f"{node.name} exited {proc.returncode} on its own:\n{node.logs()}"))
                    self.faults.down.add(node.name)
                    self.restarts.append(asyncio.create_task(self.faults.restart(node)))
                elif (kib := read_rss_kib(proc.pid)) is not None:
                    recorder.rss.append(RssSample(recorder.now(), node.name, proc.pid, kib))
            await asyncio.sleep(1.0)

    async def watch_lag(self) -> None:
        """How late this process's own event loop runs (its clients time out on it too)."""
        while True:
            began = time.monotonic()
            await asyncio.sleep(0.2)
            self.report.loop_lag_max = max(self.report.loop_lag_max, time.monotonic() - began - 0.2)

    def expected_members(self) -> dict[str, set[str]]:
        expected: dict[str, set[str]] = {workspace: set() for workspace in self.world.workspaces}
        for client in self.regulars:
            for workspace in client.present_in():
                expected[workspace].add(client.name)
        return expected

    async def check_presence(self, deadline: float) -> None:
        """(c): every node's members of every workspace equal the sessions alive, by ``deadline``."""
        world = self.world
        while True:
            expected = self.expected_members()
            pairs = [(node.name, ws) for node in world.nodes for ws in world.workspaces]
            seen = dict(zip(pairs, await asyncio.gather(*(world.members(node, ws) for node in world.nodes
                                                          for ws in world.workspaces)), strict=True))
            wrong = presence_mismatches(world.now(), expected, seen, f"{self.settle_time():.0f} s after the faults")
            if not wrong:
                self.report.presence_converged_in = world.now() - (deadline - self.settle_time())
                self.report.presence_members = sum(len(users) for users in expected.values())
                return
            if world.now() >= deadline:
                world.recorder.violations.extend(wrong)
                return
            await asyncio.sleep(0.5)

    def settle_time(self) -> float:
        options = self.world.options
        return options.node_timeout + options.disconnect_grace + SETTLE_SLACK

    async def catch_up(self) -> dict[str, End]:
        """Where each log stands now; then until every regular client has read to there."""
        ends = {ws: End(self.world.now(), *await log_position(self.world, ws)) for ws in self.world.workspaces}

        def arrived() -> bool:
            for client in self.regulars:
                for ws in (client.workspaces if isinstance(client, WsClient) else (client.workspace,)):
                    pos, end = client.position(ws), ends[ws]
                    if end.epoch is not None and (pos is None or pos.epoch != end.epoch):
                        return False
                    if pos is not None and end.last is not None and pos.entry < end.last.entry:
                        return False
            return True

        await wait_until(arrived, 20.0, 0.2)
        return ends

    def analyse(self, logs: dict[str, list[tuple[str, str, str]]], epochs: dict[str, str | None],
                ends: dict[str, End]) -> None:
        recorder, report = self.world.recorder, self.report
        known = build_known(recorder, logs)
        report.known_events = sum(len(log.by_id) for log in known.values())
        report.log_events = sum(len(entries) for entries in logs.values())
        report.violations = sorted(
            [*recorder.violations,
             *check_deliveries(recorder, known, ends, report.tally),
             *check_keys(recorder, known, logs, epochs), *check_answers(recorder),
             *check_memory(recorder.rss, self.world.options.rss_cap_mb, self.world.options.rss_growth_mb)],
            key=lambda v: v.t)
        for client in self.ws:
            report.ws_closes.update(client.closes)
        report.elapsed = recorder.now()
        report.wipes = recorder.wipes() + [crash.t for crash in recorder.crashes]
        lost = frozenset().union(*(loss.ids for found in recorder.losses(known).values() for loss in found))
        report.crash_lost = len(lost)
        report.crash_lost_acked = sum(publish.acked_id in lost for publish in recorder.publishes.values())


def log(world: World, text: str) -> None:
    if world.options.verbose:
        print(f"  t={world.now():8.3f} {text}", flush=True)


def log_keys(workspace: str) -> tuple[str, str]:
    key = workspace_log_key(workspace)
    return key, key[: -len("log")] + "epoch"


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def checker_redis(world: World) -> Any:
    """A client of the run's Redis for the checker's own reads (a cluster client on a cluster)."""
    if isinstance(world.redis, RedisClusterServers):
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port) for port in world.redis.alive_ports()])
    return Redis.from_url(world.redis.url)


async def failover_losses(world: World, t: float) -> list[tuple[str, Loss]]:
    """What a cluster failover at ``t`` lost (replication is asynchronous): per workspace and
    epoch, the events somebody had seen (acknowledged or delivered) whose entries the logs,
    read now from the new primaries, no longer hold. Owed to nobody; resets for them owed.
    (What was seen is taken before the logs are read: an event appended meanwhile is in the
    log but may not be seen yet, never the other way round.)"""
    seen: set[tuple[str, str]] = {(p.workspace, p.acked_id) for p in world.recorder.publishes.values()
                                  if p.acked_id}
    seen |= {(entry.workspace, entry.id) for journal in world.recorder.journals.values()
             for entry in journal.entries if entry.kind == "event" and not entry.type.startswith("sync.")}
    logs, _ = await read_logs(world)
    held = {workspace: {entry_id.partition(":")[2] for entry_id, _, _ in entries}
            for workspace, entries in logs.items()}
    lost: dict[tuple[str, str], set[str]] = defaultdict(set)
    for workspace, event_id in seen:
        epoch, _, entry = event_id.partition(":")
        if entry not in held.get(workspace, set()):
            lost[(workspace, epoch)].add(event_id)
    return [(workspace, Loss(t, epoch, frozenset(ids))) for (workspace, epoch), ids in sorted(lost.items())]


async def log_position(world: World, workspace: str) -> tuple[str | None, Pos | None]:
    """The log's epoch and last entry, straight from Redis."""
    stream, epoch_key = log_keys(workspace)
    redis = checker_redis(world)
    try:
        epoch = await redis.get(epoch_key)
        last = await redis.xrevrange(stream, count=1)
    finally:
        await redis.aclose()
    if epoch is None:
        return None, None
    return text(epoch), Pos.parse(f"{text(epoch)}:{text(last[0][0])}") if last else None


async def read_logs(world: World) -> tuple[dict[str, list[tuple[str, str, str]]], dict[str, str | None]]:
    """Every entry of every workspace log (``(id, type, subject)``) and each log's epoch."""
    logs: dict[str, list[tuple[str, str, str]]] = {}
    epochs: dict[str, str | None] = {}
    redis = checker_redis(world)
    try:
        for workspace in world.workspaces:
            stream, epoch_key = log_keys(workspace)
            raw = await redis.get(epoch_key)
            epoch = epochs[workspace] = None if raw is None else text(raw)
            entries: list[tuple[str, str, str]] = []
            start = "-"
            for _ in range(100_000):  # pages of 1,000: a bound far above any run
                page = await redis.xrange(stream, min=start, count=1000) or []
                for entry_id, fields in page:
                    values = {text(k): text(v) for k, v in (fields or {}).items()}
                    envelope = {"type": values.get("type", ""), "data": json.loads(values.get("data") or "{}")}
                    entries.append((f"{epoch}:{text(entry_id)}", envelope["type"], subject_of(envelope)))
                if len(page) < 1000:
                    break
                start = "(" + text(page[-1][0])
            logs[workspace] = entries
    finally:
        await redis.aclose()
    return logs, epochs


# -- the report ----------------------------------------------------------------------------------


def history(violation: Violation, recorder: Recorder) -> list[str]:
    """What happened around a violation: faults near it, the publish of its key, the
    client's journal around it, and who first received the events it names."""
    lines = ["faults around it:"]
    lines += [f"  {fault}" for fault in recorder.faults if fault.start - 20 <= violation.t <= fault.end + 30]
    publish = recorder.publishes.get(violation.subject)
    if publish is not None:
        lines.append(f"publish {publish.key} to {publish.workspace} by {publish.publisher}: "
                     f"acknowledged {publish.acked_id or '-'} {publish.refused}")
        lines += [f"  attempt t={t:8.3f} {node:<7} {outcome}" for t, node, outcome in publish.attempts]
    journal = recorder.journals.get(violation.client) or recorder.journals.get(violation.subject)
    if journal is not None:
        entries = [e for e in journal.entries if e.workspace in ("", violation.workspace)]
        at = bisect.bisect_right([e.t for e in entries], violation.t)
        lines.append(f"journal of {journal.client} ({journal.role} {journal.transport}), around t={violation.t:.3f}:")
        lines += [f"  {entry}" for entry in entries[max(0, at - 25):at + 8]]
    if violation.subject and violation.kind.startswith("presence"):
        lines.append(f"presence events about {violation.subject} in {violation.workspace}:")
        lines += [f"  {entry} (seen by {j.client})" for j in recorder.journals.values() if j.role == "regular"
                  for entry in j.entries if entry.subject == violation.subject][:40]
    for id_ in violation.ids[:4]:
        firsts = sorted((e.t, j.client) for j in recorder.journals.values() for e in j.entries
                        if e.id == id_ and e.kind == "event")
        if firsts:
            lines.append(f"{id_}: first delivered t={firsts[0][0]:.3f} to {firsts[0][1]}, "
                         f"{len(firsts)} deliveries in all")
    return lines


def render(report: Report, recorder: Recorder) -> str:
    options = report.options
    publishes = list(recorder.publishes.values())
    acked = [p for p in publishes if p.acked_id]
    kinds = Counter(fault.kind for fault in recorder.faults)
    rss: dict[str, list[int]] = defaultdict(list)
    for sample in recorder.rss:
        rss[sample.node].append(sample.kib)
    lines = [
        f"chaos: seed {options.seed}, {options.duration:.0f} s of faults, {report.elapsed:.0f} s in all; "
        f"{options.nodes} nodes, {options.workspaces} workspaces, clients: {options.sse_clients} SSE + "
        f"{options.ws_clients} WebSocket, publishers: {options.rest_publishers} REST + {options.ws_publishers} "
        f"WebSocket; idempotency keys {'on' if options.idempotency else 'OFF'}",
        f"faults injected: {sum(kinds.values())} ("
        + ", ".join(f"{kind} {kinds[kind]}" for kind in (*INFRA_KINDS, *CLIENT_KINDS)) + ")",
        f"publishes: {len(publishes)}, attempts {sum(len(p.attempts) for p in publishes)}, "
        f"retried {sum(len(p.attempts) > 1 for p in publishes)}, acknowledged {len(acked)}, "
        f"abandoned {sum(not p.acked_id and not p.refused for p in publishes)}, "
        f"refused {sum(bool(p.refused) for p in publishes)}",
        f"events: {report.known_events} known (acknowledged, delivered or in the logs), "
        f"{report.log_events} in the final logs; deliveries checked {report.tally.deliveries}, "
        f"(event, client) pairs verified {report.tally.verified}; sync.reset {report.tally.resets} "
        f"(justified by data loss {report.tally.justified_resets})",
        f"host crashes of Redis: {kinds['redis_crash']}, cluster primaries killed: "
        f"{sum(f.kind == 'cluster_failover' and f.detail.startswith('SIGKILL') for f in recorder.faults)}; "
        f"taking {report.crash_lost} events somebody had seen ({report.crash_lost_acked} acknowledged "
        f"publishes: lost by appendfsync everysec's or asynchronous replication's design)",
        f"clients: {sum(j.role == 'regular' for j in recorder.journals.values())} regular, "
        f"{sum(j.role == 'transient' for j in recorder.journals.values())} far-back stallers, "
        f"{sum(j.role == 'vanish' for j in recorder.journals.values())} vanished; "
        f"regular WebSocket closes: {dict(report.ws_closes.most_common(6))}",
        "presence: " + (f"converged on every node ({report.presence_members} members) "
                        f"{report.presence_converged_in:.1f} s after the faults"
                        if report.presence_converged_in is not None else "did NOT converge"),
        "memory: " + ", ".join(f"{node} max {max(kib) / 1024:.0f} MiB, last {kib[-1] / 1024:.0f} MiB"
                               for node, kib in sorted(rss.items())),
        f"checker event loop: max lag {report.loop_lag_max:.2f} s",
        f"violations: {len(report.violations)}"
        + (" (" + ", ".join(f"{k} {n}" for k, n in Counter(v.kind for v in report.violations).items())
           + f"; {sum(any(0 <= v.t - w <= 15 for w in report.wipes) for v in report.violations)} of them "
           "within 15 s after a Redis data loss)" if report.violations else ""),
    ]
    if report.violations:
        first = report.violations[0]
        lines += ["", f"FIRST VIOLATION at t={first.t:.3f}: {first.kind} "
                      f"[{first.workspace or '-'}/{first.client or first.subject or '-'}] {first.message}"]
        lines += history(first, recorder)
        others = {v.kind: v for v in reversed(report.violations[1:])}
        if others:
            lines.append("first of each other kind:")
            lines += [f"  t={v.t:.3f} {v.kind} [{v.workspace or '-'}/{v.client or v.subject or '-'}] {v.message}"
                      for v in sorted(others.values(), key=lambda v: v.t)]
        lines.append(f"node logs and Redis: {report.directory}")
    lines.append("fault log:")
    lines += [f"  {fault}" for fault in recorder.faults]
    return "\n".join(lines)


def node_flags(options: Options) -> tuple[str, ...]:
    return ("--keepalive", str(KEEPALIVE), "--presence-ttl", str(PRESENCE_TTL),
            "--send-buffer", str(options.send_buffer), "--history-max-len", "1000000")


async def run(options: Options, directory: Path | None = None) -> tuple[Report, str]:
    """One chaos run in ``directory`` (a temporary one by default, removed when the run
    passed). Every process it starts is stopped before it returns, also when cancelled."""
    made = directory is None
    directory = directory or Path(tempfile.mkdtemp(prefix="chaos-"))
    spawner = Spawner(directory)
    passed = False
    proxies = contextlib.AsyncExitStack()
    try:
        if options.topology == "cluster":
            redis: RedisServer | RedisClusterServers = await asyncio.to_thread(spawner.redis_cluster, replicas=1)
        else:
            redis = await asyncio.to_thread(spawner.redis, persist=True, fsync="everysec")
        names = [f"node-{chr(ord('a') + n)}" for n in range(options.nodes)]
        link_faults = set(LINK_KINDS) & set(options.faults) & TOPOLOGY_KINDS[options.topology]
        links = {name: await proxies.enter_async_context(Endpoint(redis.port)) for name in names
                 if link_faults and isinstance(redis, RedisServer)}
        started = await asyncio.gather(*(spawner.start(
            links.get(name, redis), name, node_timeout=options.node_timeout,
            disconnect_grace=options.disconnect_grace, extra=node_flags(options)) for name in names))
        nodes = [node for group in started for node in group]
        recorder = Recorder()
        recorder.verbose = options.verbose
        world = World(options, spawner, redis, nodes, recorder)
        world.links = links
        try:
            report = await Scenario(world).play()
        finally:
            await world.close()
        passed = report.ok
        return report, render(report, recorder)
    finally:
        await asyncio.to_thread(spawner.stop_all)
        await proxies.aclose()
        if made and passed:
            shutil.rmtree(directory, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=defaults.duration,
                        help="seconds of faults (settling and checking add up to ~90 s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    for name in ("workspaces", "sse_clients", "ws_clients", "rest_publishers", "ws_publishers", "send_buffer"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("rate", "node_timeout", "disconnect_grace", "ballast_mb", "rss_cap_mb", "rss_growth_mb"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--faults", default=",".join(defaults.faults),
                        help=f"comma-separated kinds (default all: {','.join(defaults.faults)})")
    parser.add_argument("--no-idempotency-key", dest="idempotency", action="store_false",
                        help="publishers send no key: retried publishes may duplicate (a self-test)")
    parser.add_argument("--verbose", action="store_true", help="print each fault as it ends")
    parser.add_argument("--topology", choices=sorted(TOPOLOGY_KINDS), default=defaults.topology,
                        help="single: one redis-server (AOF); cluster: 3 primaries + 3 replicas, where "
                             "cluster_failover replaces the faults of one server (docs/chaos.md)")
    args = vars(parser.parse_args(argv))
    faults = tuple(kind for kind in args.pop("faults").split(",") if kind)
    unknown = set(faults) - set(INFRA_KINDS + CLIENT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    return Options(faults=faults, **args)


async def _main(options: Options) -> int:
    task = asyncio.current_task()
    assert task is not None
    # Both stop the run the same way: cancelled, every process it started stopped. (SIGINT
    # too: a shell starts background jobs with it ignored, so Python would not see Ctrl-C.)
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    report, text = await run(options)
    print(text, flush=True)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        return asyncio.run(_main(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("chaos: interrupted; every process it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
