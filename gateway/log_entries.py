"""Workspace log entries in Redis: the documented stream entry format, both ways.

One place turns a pending event into stream fields (what a node writes) and a stream
entry into an ``Envelope`` (what every reader delivers). ``docs/redis.md`` documents
the format, so a backend service may append with a plain ``XADD``; whatever it writes,
an entry that is not in that format is skipped (and logged once per workspace), never
allowed to stop a feed, fail a resume or fail a publish that was written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from gateway.presence import PendingEvent
from protocol.envelope import (
    PRESENCE_JOINED,
    PRESENCE_VIEWING,
    RESERVED_PREFIXES,
    EntryId,
    Envelope,
    WorkspaceKey,
    is_publishable_type,
    portability_problem,
)
from protocol.errors import format_timestamp

log = logging.getLogger(__name__)

# The latest instant a timestamp can name; an entry id beyond it (a service writing
# microseconds, a forged id) still gets an envelope, stamped with this.
_LAST_INSTANT: Final = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)

RawEntry = tuple[bytes | str, Any]  # (entry id, flat [field, value, ...] list or a dict)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entry_fields(pending: PendingEvent, node_id: str) -> list[str]:
    """The stream fields of an event a gateway node appends (``docs/redis.md``)."""
    return [
        "type", pending.type,
        "actor", json.dumps(pending.actor, separators=(",", ":"), ensure_ascii=False),
        "data", json.dumps(pending.data, separators=(",", ":"), ensure_ascii=False),
        "node", node_id,
    ]


def entry_timestamp(entry: EntryId) -> str:
    """The envelope timestamp of an entry: its id's milliseconds, clamped to year 9999."""
    try:
        moment = datetime.fromtimestamp(entry.ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        moment = _LAST_INSTANT
    return format_timestamp(moment)


def issued(
    workspace: WorkspaceKey, epoch: str, ids: Sequence[bytes | str], pending: Sequence[PendingEvent]
) -> tuple[Envelope, ...]:
    """The envelopes of events this node just appended, from the ids Redis gave them."""
    out = []
    for raw_id, item in zip(ids, pending, strict=True):
        entry_id = text(raw_id)
        out.append(Envelope(
            id=f"{epoch}:{entry_id}",
            type=item.type,
            org_id=workspace.org_id,
            workspace_id=workspace.workspace_id,
            actor=item.actor,
            data=item.data,
            timestamp=entry_timestamp(EntryId.parse(entry_id)),
        ))
    return tuple(out)


class EntryReader:
    """Stream entries to envelopes, skipping (and logging once per workspace) malformed ones."""

    def __init__(self, max_logged: int = 10_000) -> None:
        self._logged: set[WorkspaceKey] = set()
        self._max_logged = max_logged

    def envelope(self, workspace: WorkspaceKey, epoch: str, raw_id: bytes | str,
                 raw_fields: Any) -> Envelope | None:
        """The envelope of one stream entry; None (logged once per workspace) if malformed."""
        try:
            entry = EntryId.parse(text(raw_id))
            event_type, actor, data = parse_fields(_as_dict(raw_fields))
        except Exception as exc:
            # Any failure to parse outside bytes means "malformed" (RecursionError for JSON
            # nested 100 000 deep, ...): one entry must never stop a feed or fail a resume.
            self._log_once(workspace, raw_id, exc)
            return None
        return Envelope(
            id=f"{epoch}:{entry}",
            type=event_type,
            org_id=workspace.org_id,
            workspace_id=workspace.workspace_id,
            actor=actor,
            data=data,
            timestamp=entry_timestamp(entry),
        )

    def envelopes(self, workspace: WorkspaceKey, epoch: str,
                  entries: Sequence[RawEntry]) -> list[Envelope]:
        out = []
        for raw_id, raw_fields in entries:
            envelope = self.envelope(workspace, epoch, raw_id, raw_fields)
            if envelope is not None:
                out.append(envelope)
        return out

    def _log_once(self, workspace: WorkspaceKey, raw_id: bytes | str, exc: Exception) -> None:
        if workspace in self._logged:
            return
        if len(self._logged) >= self._max_logged:  # bounded, whatever the number of workspaces
            self._logged.clear()
        self._logged.add(workspace)
        log.warning("skipping malformed log entries (logged once per workspace)",
                    extra={"workspace": str(workspace), "entry_id": text(raw_id)[:40],
                           "problem": f"{type(exc).__name__}: {str(exc)[:200]}"})


def _as_dict(raw: Any) -> dict[bytes, bytes]:
    if isinstance(raw, dict):
        return raw
    return {raw[index]: raw[index + 1] for index in range(0, len(raw) - 1, 2)}


def parse_fields(fields: dict[bytes, bytes]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(type, actor, data) of a stream entry in the documented format; raises otherwise.

    An entry is accepted only if every subscriber can get it, whatever its encoding: actor
    and data must pass ``portability_problem`` (a JSON client must never see an event a
    msgpack client silently misses), and a ``presence.*`` entry must have the shape the
    replicas apply.
    """
    event_type = fields[b"type"].decode()
    actor = json.loads(fields[b"actor"])
    data = json.loads(fields[b"data"]) if b"data" in fields else {}
    if not isinstance(actor, dict) or not isinstance(data, dict):
        raise ValueError("actor and data must be JSON objects")
    for name, value in (("actor", actor), ("data", data)):
        problem = portability_problem(value)
        if problem is not None:
            raise ValueError(f"{name} at {list(problem[0])[:8]}: {problem[1]}")
    if event_type.startswith(RESERVED_PREFIXES):
        # Only gateway nodes write presence.* (the replica depends on them).
        if b"node" not in fields or not event_type.startswith("presence."):
            raise ValueError("reserved event type from outside the gateway")
        problem_text = _presence_problem(event_type, data)
        if problem_text is not None:
            raise ValueError(problem_text)
    elif not is_publishable_type(event_type):
        raise ValueError("invalid event type")
    return event_type, actor, data


def _presence_problem(event_type: str, data: dict[str, Any]) -> str | None:
    """Why ``data`` is not what a replica (``presence.Replica``) can apply, or None."""
    if not isinstance(data.get("user_id"), str):
        return "presence event without a string user_id"
    if event_type not in (PRESENCE_JOINED, PRESENCE_VIEWING):
        return None
    if not isinstance(data.get("actor"), dict) or not isinstance(data.get("joined_at"), str):
        return "presence member without an actor object or a joined_at string"
    viewing = data.get("viewing")
    if not isinstance(viewing, list) or not all(
        isinstance(item, dict)
        and isinstance(item.get("resource_type"), str)
        and isinstance(item.get("resource_id"), str)
        for item in viewing
    ):
        return "presence member whose viewing is not a list of {resource_type, resource_id} strings"
    return None
