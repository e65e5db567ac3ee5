"""Presence: per-user records (the authoritative state a backend stores), the pure
transitions that turn a change of sessions into events, and the in-process
replica every node builds from a workspace's log.

A user is a member of a workspace while at least one of their sessions there is
live. Events are per user, never per session:

* ``presence.joined`` when the first session appears (data: the member),
* ``presence.left`` when the last one ends (data: ``user_id``, ``reason``),
* ``presence.viewing`` when the set of resources the user views changes (data: the member).

Sessions are WebSocket sessions (one per joined connection, ``expires_at`` None:
they live as long as their socket and node) and at most one REST session per
user (id ``"rest"``), which expires ``presence_ttl`` after the last REST call,
never while the user holds an open SSE stream to the workspace on any node, and
``disconnect_grace`` after the user's last stream closes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

from protocol.envelope import (
    PRESENCE_JOINED,
    PRESENCE_LEFT,
    PRESENCE_VIEWING,
    Envelope,
    EventId,
)
from protocol.errors import format_timestamp

REST_SESSION: Final = "rest"


@dataclass(frozen=True, slots=True)
class Resource:
    resource_type: str
    resource_id: str

    def to_dict(self) -> dict[str, str]:
        return {"resource_type": self.resource_type, "resource_id": self.resource_id}


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    node_id: str
    viewing: Resource | None = None
    viewing_at: float = 0.0
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class UserRecord:
    """Everything a backend stores about one user in one workspace."""

    user_id: str
    actor: dict[str, Any]
    joined_at: float
    sessions: tuple[Session, ...] = ()
    # Open SSE streams of this user to this workspace, per node.
    streams: tuple[tuple[str, int], ...] = ()

    def session(self, session_id: str) -> Session | None:
        return next((s for s in self.sessions if s.id == session_id), None)

    def with_session(self, session: Session) -> UserRecord:
        others = tuple(s for s in self.sessions if s.id != session.id)
        return replace(self, sessions=(*others, session))

    def without_sessions(self, keep: Callable[[Session], bool]) -> UserRecord:
        return replace(self, sessions=tuple(s for s in self.sessions if keep(s)))

    @property
    def stream_count(self) -> int:
        return sum(count for _, count in self.streams)

    def member(self) -> dict[str, Any] | None:
        """The member this record shows to clients, or None when the user is not present."""
        if not self.sessions:
            return None
        viewing: list[dict[str, str]] = []
        for session in sorted(self.sessions, key=lambda s: s.viewing_at, reverse=True):
            if session.viewing is not None and session.viewing.to_dict() not in viewing:
                viewing.append(session.viewing.to_dict())
        return {
            "user_id": self.user_id,
            "actor": self.actor,
            "viewing": viewing,
            "joined_at": format_timestamp(datetime.fromtimestamp(self.joined_at, UTC)),
        }

    def next_expiry(self) -> float | None:
        """When ``prune`` may next change this record (None: not by time alone)."""
        times = [s.expires_at for s in self.sessions
                 if s.expires_at is not None and not self._kept_alive(s)]
        return min(times) if times else None

    def _kept_alive(self, session: Session) -> bool:
        """An open SSE stream keeps the user's REST session (and only it) from expiring."""
        return session.id == REST_SESSION and self.stream_count > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "actor": self.actor,
            "joined_at": self.joined_at,
            "sessions": [
                [s.id, s.node_id, s.viewing.to_dict() if s.viewing else None,
                 s.viewing_at, s.expires_at]
                for s in self.sessions
            ],
            "streams": [list(item) for item in self.streams],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UserRecord:
        return cls(
            user_id=raw["user_id"],
            actor=raw["actor"],
            joined_at=raw["joined_at"],
            sessions=tuple(
                Session(sid, node, Resource(**viewing) if viewing else None, at, expires)
                for sid, node, viewing, at, expires in raw["sessions"]
            ),
            streams=tuple((node, count) for node, count in raw["streams"]),
        )


# A change of one user's record: (record before or None, now) -> record after or None.
Change = Callable[[UserRecord | None, float], UserRecord | None]


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A change to apply atomically, and the reason reported if it makes the user leave."""

    apply: Change
    reason: str


def _normalise(record: UserRecord | None) -> UserRecord | None:
    if record is None or (not record.sessions and not record.stream_count):
        return None
    return record


def _new_record(user_id: str, actor: dict[str, Any], now: float) -> UserRecord:
    return UserRecord(user_id=user_id, actor=actor, joined_at=now)


def _present_or_new(
    record: UserRecord | None, user_id: str, actor: dict[str, Any], now: float
) -> UserRecord:
    if record is None:
        return _new_record(user_id, actor, now)
    if not record.sessions:  # joining again: a fresh membership
        return replace(record, actor=actor, joined_at=now)
    return record


def rest_touch(
    user_id: str, actor: dict[str, Any], node_id: str, ttl: float,
    viewing: Resource | None = None,
) -> PresenceChange:
    """Create or refresh the user's REST session (``join``; ``viewing`` when a resource is given)."""

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        record = _present_or_new(record, user_id, actor, now)
        current = record.session(REST_SESSION)
        session = current or Session(REST_SESSION, node_id)
        session = replace(session, node_id=node_id, expires_at=now + ttl)
        if viewing is not None:
            session = replace(session, viewing=viewing, viewing_at=now)
        return record.with_session(session)

    return PresenceChange(apply, "join")


def rest_leave() -> PresenceChange:
    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        if record is None:
            return None
        return _normalise(record.without_sessions(lambda s: s.id != REST_SESSION))

    return PresenceChange(apply, "leave")


def session_join(user_id: str, actor: dict[str, Any], session_id: str, node_id: str) -> PresenceChange:
    """A WebSocket session joins; it lives until ``session_leave`` or its node is gone."""

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        record = _present_or_new(record, user_id, actor, now)
        current = record.session(session_id)
        return record.with_session(current or Session(session_id, node_id))

    return PresenceChange(apply, "join")


def session_viewing(
    user_id: str, actor: dict[str, Any], session_id: str, node_id: str, viewing: Resource
) -> PresenceChange:
    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        record = _present_or_new(record, user_id, actor, now)
        current = record.session(session_id) or Session(session_id, node_id)
        return record.with_session(replace(current, viewing=viewing, viewing_at=now))

    return PresenceChange(apply, "join")


def session_leave(session_id: str, reason: str = "leave") -> PresenceChange:
    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        if record is None:
            return None
        return _normalise(record.without_sessions(lambda s: s.id != session_id))

    return PresenceChange(apply, reason)


def session_linger(session_id: str, grace: float) -> PresenceChange:
    """A WebSocket session whose node drains: it ends ``grace`` seconds from now (``prune``
    removes it), so a client that reconnects elsewhere meanwhile causes no left/joined."""

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        if record is None:
            return None
        current = record.session(session_id)
        if current is None:
            return record
        return record.with_session(replace(current, expires_at=now + grace))

    return PresenceChange(apply, "disconnected")


def _set_streams(record: UserRecord, node_id: str, delta: int, now: float, grace: float) -> UserRecord:
    counts = dict(record.streams)
    counts[node_id] = max(0, counts.get(node_id, 0) + delta)
    streams = tuple((node, count) for node, count in counts.items() if count > 0)
    record = replace(record, streams=streams)
    if not streams:
        # The user's last stream closed: the REST session ends after the grace period.
        rest = record.session(REST_SESSION)
        if rest is not None:
            record = record.with_session(replace(rest, expires_at=now + grace))
    return record


def stream_opened(user_id: str, actor: dict[str, Any], node_id: str) -> PresenceChange:
    """An SSE stream of the user opened on ``node_id``: the REST session cannot expire meanwhile."""

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        if record is None:
            record = _new_record(user_id, actor, now)
        return _set_streams(record, node_id, +1, now, 0.0)

    return PresenceChange(apply, "expired")


def stream_closed(node_id: str, grace: float) -> PresenceChange:
    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        if record is None:
            return None
        return _normalise(_set_streams(record, node_id, -1, now, grace))

    return PresenceChange(apply, "disconnected")


def prune() -> PresenceChange:
    """Drop sessions whose time is up: REST sessions (never while the user holds a stream)
    and lingering sessions of drained sockets."""

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        if record is None:
            return None
        current = record
        return _normalise(record.without_sessions(
            lambda s: s.expires_at is None or s.expires_at > now or current._kept_alive(s)
        ))

    return PresenceChange(apply, "expired")


def node_gone(node_id: str, grace: float) -> PresenceChange:
    """Forget the sessions and streams held by a node that is gone."""

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        if record is None:
            return None
        had_streams = record.stream_count
        record = record.without_sessions(lambda s: s.expires_at is not None or s.node_id != node_id)
        record = replace(record, streams=tuple(i for i in record.streams if i[0] != node_id))
        if had_streams and not record.stream_count:
            rest = record.session(REST_SESSION)
            if rest is not None:
                record = record.with_session(replace(rest, expires_at=now + grace))
        return _normalise(record)

    return PresenceChange(apply, "node_down")


def node_reaped(node_id: str) -> PresenceChange:
    """Peers remove a node that stopped heartbeating ``node_timeout`` ago: ``node_gone``, and
    the REST sessions only its streams kept alive end now (``node_timeout`` was their
    grace: a client that reconnected elsewhere meanwhile holds a stream there)."""
    gone, pruned = node_gone(node_id, 0.0), prune()

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        return pruned.apply(gone.apply(record, now), now)

    return PresenceChange(apply, "node_down")


def restore(
    user_id: str,
    actor: dict[str, Any],
    node_id: str,
    held: Callable[[], tuple[int, Mapping[str, Resource | None], Session | None]],
) -> PresenceChange:
    """Make the record show what ``node_id`` holds now (idempotent; used to re-assert).

    ``held()`` is read when the change is applied and gives: the number of the user's
    SSE streams open on the node, its WebSocket sessions there (id -> what each views),
    and the REST session the node last saw. Afterwards the record has exactly that
    many streams on the node; every listed session, added back if missing; no other
    session bound to the node (those are stale); and, if the record lost it while the
    user still has a stream open on the node (which keeps it alive), the REST session.
    A REST session without such a stream is a lease its client renews: never restored,
    so a leave made through another node is never undone.
    """

    def apply(record: UserRecord | None, now: float) -> UserRecord | None:
        streams, sessions, rest = held()
        if record is None:
            record = _new_record(user_id, actor, now)
        elif not record.sessions:
            record = replace(record, actor=actor, joined_at=now)
        counts = dict(record.streams)
        counts.pop(node_id, None)
        if streams > 0:
            counts[node_id] = streams
        record = replace(record, streams=tuple(counts.items()))
        record = record.without_sessions(
            lambda s: not (s.node_id == node_id and s.expires_at is None and s.id not in sessions)
        )
        for session_id, viewing in sessions.items():
            if record.session(session_id) is None:
                record = record.with_session(
                    Session(session_id, node_id, viewing, now if viewing else 0.0)
                )
        if rest is not None and streams > 0 and record.session(REST_SESSION) is None:
            record = record.with_session(rest)
        return _normalise(record)

    return PresenceChange(apply, "expired")


def bound_nodes(record: UserRecord | None) -> frozenset[str]:
    """The nodes whose death would change ``record``: its untimed sessions' and open streams'."""
    if record is None:
        return frozenset()
    nodes = {s.node_id for s in record.sessions if s.expires_at is None}
    nodes.update(node for node, count in record.streams if count > 0)
    return frozenset(nodes)


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event a transition calls for, before the log gives it an id."""

    type: str
    actor: dict[str, Any]
    data: dict[str, Any]


def transition(
    before: UserRecord | None, after: UserRecord | None, reason: str
) -> list[PendingEvent]:
    """The events (at most one) that take a client from ``before``'s member to ``after``'s."""
    old = before.member() if before else None
    new = after.member() if after else None
    if old is None and new is not None:
        return [PendingEvent(PRESENCE_JOINED, new["actor"], new)]
    if old is not None and new is None:
        return [PendingEvent(PRESENCE_LEFT, old["actor"],
                             {"user_id": old["user_id"], "reason": reason})]
    if old is not None and new is not None and old["viewing"] != new["viewing"]:
        return [PendingEvent(PRESENCE_VIEWING, new["actor"], new)]
    return []


def caller_view(user_id: str, record: UserRecord | None) -> dict[str, Any]:
    """What a presence call answers: the caller's presence after the call."""
    member = record.member() if record else None
    if member is None:
        return {"user_id": user_id, "present": False, "viewing": [], "sessions": 0}
    return {**member, "present": True, "sessions": len(record.sessions) if record else 0}


class Replica:
    """One workspace's members as its log says, and the event id they are valid at.

    Built from a backend snapshot, then kept current by applying each later event
    of the log in order; two replicas that applied the same log agree exactly.
    """

    def __init__(self, members: dict[str, dict[str, Any]], position: EventId) -> None:
        self.members = dict(members)
        self.position = position

    def apply(self, envelope: Envelope) -> None:
        if envelope.type in (PRESENCE_JOINED, PRESENCE_VIEWING):
            self.members[envelope.data["user_id"]] = envelope.data
        elif envelope.type == PRESENCE_LEFT:
            self.members.pop(str(envelope.data.get("user_id")), None)
        self.position = envelope.event_id

    def snapshot(self, resource: Resource | None = None) -> dict[str, Any]:
        members = sorted(self.members.values(), key=lambda m: m["user_id"])
        if resource is not None:
            wanted = resource.to_dict()
            members = [m for m in members if wanted in m["viewing"]]
        return {"members": members, "last_event_id": str(self.position)}
