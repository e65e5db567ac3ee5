"""The event envelope every client sees, and the event id (cursor) it carries.

An event id is ``<epoch>:<ms>-<seq>``: ``<ms>-<seq>`` is the entry id of the
workspace's log (a Redis stream entry id on the Redis backend), and ``epoch``
names the incarnation of that log. Ids are ordered within one epoch; an id of
another epoch cannot be resumed from (the history it points into is gone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

# The families of event types that only the gateway may emit.
RESERVED_PREFIXES: Final = ("presence.", "sync.")
PUBLISHABLE_TYPE: Final = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")

PRESENCE_JOINED: Final = "presence.joined"
PRESENCE_LEFT: Final = "presence.left"
PRESENCE_VIEWING: Final = "presence.viewing"
SYNC_SNAPSHOT: Final = "sync.snapshot"
SYNC_RESET: Final = "sync.reset"
SYNC_TOKEN_EXPIRED: Final = "sync.token_expired"

_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_EVENT_ID = re.compile(r"([0-9a-z]{1,32}):(\d{1,20})-(\d{1,20})")
# Both parts of a Redis stream id are unsigned 64-bit integers.
_ID_PART_MAX: Final = 2**64 - 1


def is_publishable_type(event_type: str) -> bool:
    """True for a type a client or service may publish (not a reserved family)."""
    return bool(PUBLISHABLE_TYPE.match(event_type)) and not event_type.startswith(
        RESERVED_PREFIXES
    )


@dataclass(frozen=True, slots=True, order=True)
class EntryId:
    """A log entry id ``<ms>-<seq>``, ordered as Redis orders stream ids."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> EntryId:
        """Parse ``<ms>-<seq>`` (each part 0..2**64-1); raises ``ValueError`` for anything else."""
        match = _ENTRY_ID.fullmatch(text)
        if match is None:
            raise ValueError(f"not an entry id: {text[:64]!r}")
        return cls._checked(int(match[1]), int(match[2]))

    @classmethod
    def _checked(cls, ms: int, seq: int) -> EntryId:
        if ms > _ID_PART_MAX or seq > _ID_PART_MAX:
            raise ValueError("entry id out of range")
        return cls(ms, seq)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO: Final = EntryId(0, 0)


@dataclass(frozen=True, slots=True)
class EventId:
    """A resumable cursor: an entry id within one epoch of a workspace log."""

    epoch: str
    entry: EntryId

    @classmethod
    def parse(cls, text: str) -> EventId:
        """Parse ``<epoch>:<ms>-<seq>``; raises ``ValueError`` for anything else."""
        match = _EVENT_ID.fullmatch(text)
        if match is None:
            raise ValueError("not an event id")
        return cls(match[1], EntryId._checked(int(match[2]), int(match[3])))

    def __str__(self) -> str:
        return f"{self.epoch}:{self.entry}"


@dataclass(frozen=True, slots=True)
class WorkspaceKey:
    """One workspace of one organization: the unit of ordering and presence."""

    org_id: str
    workspace_id: str

    def __str__(self) -> str:
        return f"{self.org_id}/{self.workspace_id}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event as every transport delivers it (SSE ``data``, WebSocket ``event``).

    ``id`` is the event id; events of one workspace are delivered in ``id`` order.
    """

    id: str
    type: str
    org_id: str
    workspace_id: str
    actor: dict[str, Any]
    data: dict[str, Any]
    timestamp: str
    # Cached encodings (keyed by codec name), filled lazily by the hub so that an
    # event is encoded once per encoding however many subscribers receive it.
    _encoded: dict[str, bytes] = field(
        default_factory=dict, compare=False, repr=False, init=False
    )
    _event_id: EventId | None = field(default=None, compare=False, repr=False, init=False)

    @property
    def event_id(self) -> EventId:
        """``id`` parsed (once per envelope, whatever the number of subscribers); raises
        ``ValueError`` if it is not an event id."""
        parsed = self._event_id
        if parsed is None:
            parsed = EventId.parse(self.id)
            object.__setattr__(self, "_event_id", parsed)
        return parsed

    def known_at(self, event_id: EventId) -> Envelope:
        """This envelope, told its id parsed (``event_id``, of which ``id`` is the text): the
        envelopes made at one position then share one ``EventId``."""
        object.__setattr__(self, "_event_id", event_id)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "org_id": self.org_id,
            "workspace_id": self.workspace_id,
            "actor": self.actor,
            "data": self.data,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Envelope:
        return cls(
            id=str(raw["id"]),
            type=str(raw["type"]),
            org_id=str(raw["org_id"]),
            workspace_id=str(raw["workspace_id"]),
            actor=dict(raw["actor"]),
            data=dict(raw["data"]),
            timestamp=str(raw["timestamp"]),
        )

    @property
    def workspace(self) -> WorkspaceKey:
        return WorkspaceKey(self.org_id, self.workspace_id)


# Limits on event data (and on every WebSocket message) so that any value accepted
# can be encoded by every codec: JSON text and msgpack.
MAX_DEPTH: Final = 32
_INT_RANGE: Final = (-(2**63), 2**64 - 1)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def portability_problem(value: Any) -> tuple[tuple[str | int, ...], str] | None:
    """Where and why ``value`` cannot travel as both JSON and msgpack, or None if it can.

    Allowed: objects with string keys, arrays, strings (no lone surrogates), booleans,
    null, finite floats, integers in the 64-bit range; nested at most ``MAX_DEPTH`` deep.
    """
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if len(path) > MAX_DEPTH:
            return path, f"nested deeper than {MAX_DEPTH} levels"
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path, "strings must be valid Unicode (no lone surrogates)"
        elif isinstance(item, int):
            if not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
                return path, "integers must fit in 64 bits"
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                return path, "numbers must be finite"
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str) or _SURROGATE.search(key):
                    return path, "object keys must be strings"
                stack.append(((*path, key), child))
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in enumerate(item))
        else:
            return path, f"unsupported value of type {type(item).__name__}"
    return None
