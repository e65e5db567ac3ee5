"""The Redis Streams backend: workspace logs, presence records and node liveness in Redis.

Every node on the same Redis (and key prefix) shares everything: a workspace's events,
presence changes included, are one Redis stream whose entry ids are the event ids
clients see; presence records change only together with the events that announce the
change (one Lua compare-and-set per change, the transition itself computed by the pure
functions of ``gateway.presence``); each node heartbeats, and the survivors remove the
sessions of a node that stops. ``docs/redis.md`` documents the key layout and the
stream entry format (a backend service may append with a plain ``XADD``).

Keys of one workspace share the hash tag ``{<org>:<workspace>}`` and every transaction
touches one workspace (or one node) only, so the layout works on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final, cast
from urllib.parse import quote, unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.broker import BackendUnavailable, HistoryGone, PresenceOutcome, Snapshot
from gateway.clock import Clock, SystemClock
from gateway.presence import (
    PendingEvent,
    PresenceChange,
    UserRecord,
    bound_nodes,
    node_reaped,
    prune,
    transition,
)
from gateway.tasks import stop
from protocol.envelope import (
    PRESENCE_JOINED,
    PRESENCE_VIEWING,
    RESERVED_PREFIXES,
    ZERO,
    EntryId,
    Envelope,
    EventId,
    WorkspaceKey,
    is_publishable_type,
    portability_problem,
)
from protocol.errors import format_timestamp

log = logging.getLogger(__name__)

# Errors that mean "Redis cannot serve us now" (not "the request is wrong").
UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

TAIL_BLOCK_MS: Final = 5_000  # one blocking read waits at most this long, then re-checks the epoch
TAIL_COUNT: Final = 1_000  # entries per blocking read
MAX_ID_SKEW_MS: Final = 60_000  # ids from further in the future than this were never issued
CAS_ATTEMPTS: Final = 100  # a presence change retried this often under contention, then 503
SWEEP_BATCH: Final = 100  # workspaces (and dead nodes) handled per sweep
SWEEP_RETRY: Final = 30.0  # a workspace the sweep failed on is tried again this much later
REAP_ROUNDS: Final = 10  # reads of a dead node's workspace index per reap
HEARTBEAT_BACKOFF_CAP: Final = 2.0
REASSERT_BACKOFF_CAP: Final = 5.0


def _lua(name: str) -> str:
    return resources.files("gateway").joinpath("lua", f"{name}.lua").read_text()


def _escape(part: str) -> str:
    # ":" separates org from workspace, "{" / "}" would move the hash tag.
    return quote(part, safe="-_.~!$&'()*+,;=@ ")


def workspace_tag(workspace: WorkspaceKey) -> str:
    """The hash tag of a workspace: ``org:workspace`` with ``%``, ``:``, ``{``, ``}`` escaped."""
    return f"{_escape(workspace.org_id)}:{_escape(workspace.workspace_id)}"


def parse_workspace_tag(tag: str) -> WorkspaceKey:
    org, workspace = tag.split(":")
    return WorkspaceKey(unquote(org), unquote(workspace))


class Keys:
    """The key layout (``docs/redis.md``)."""

    def __init__(self, prefix: str) -> None:
        if not prefix or any(char in prefix for char in "{}"):
            raise ValueError("key_prefix must be non-empty and free of '{' and '}'")
        self.prefix = prefix
        self.nodes = f"{prefix}:nodes"  # set: node ids that may hold sessions
        self.expiring = f"{prefix}:expiring"  # zset: workspace tag -> earliest record expiry

    def workspace(self, workspace: WorkspaceKey) -> str:
        return f"{self.prefix}:{{{workspace_tag(workspace)}}}"

    def log(self, workspace: WorkspaceKey) -> str:
        return f"{self.workspace(workspace)}:log"

    def epoch(self, workspace: WorkspaceKey) -> str:
        return f"{self.workspace(workspace)}:epoch"

    def records(self, workspace: WorkspaceKey) -> str:
        return f"{self.workspace(workspace)}:presence"

    def expiry(self, workspace: WorkspaceKey) -> str:
        return f"{self.workspace(workspace)}:expiry"

    def bound(self, workspace: WorkspaceKey, node_id: str) -> str:
        return f"{self.workspace(workspace)}:bound:{node_id}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}:{{node:{node_id}}}"

    def alive(self, node_id: str) -> str:
        return f"{self.node(node_id)}:alive"

    def reaping(self, node_id: str) -> str:
        return f"{self.node(node_id)}:reaping"

    def node_workspaces(self, node_id: str) -> str:
        return f"{self.node(node_id)}:workspaces"

    def ticket(self, ticket: str) -> str:
        # Hashed: the key space never holds a usable ticket.
        return f"{self.prefix}:ticket:{hashlib.sha256(ticket.encode()).hexdigest()}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry_fields(pending: PendingEvent, node_id: str) -> list[str]:
    return [
        "type", pending.type,
        "actor", json.dumps(pending.actor, separators=(",", ":"), ensure_ascii=False),
        "data", json.dumps(pending.data, separators=(",", ":"), ensure_ascii=False),
        "node", node_id,
    ]


class RedisBroker:
    """Workspace logs and presence in Redis, shared by every node on the same key prefix.

    Same observable semantics as ``MemoryBroker`` (the contract suite runs on both), plus:
    ids are issued by Redis streams and identical on every node; a workspace's epoch lives
    in Redis, so a Redis that lost its data answers ``HistoryGone`` for every older id;
    every Redis failure surfaces as ``BackendUnavailable``. ``start`` also starts this
    node's heartbeat; ``sweep`` also removes the sessions of nodes whose heartbeat stopped.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        clock: Clock | None = None,
        history_max_len: int = 10_000,
        history_max_age: float = 86_400.0,
        node_timeout: float = 15.0,
        disconnect_grace: float = 10.0,
        key_prefix: str = "gw",
        max_connections: int = 200,
        max_tails: int = 10_000,
        pool_wait: float = 2.0,
        **_: Any,
    ) -> None:
        if not node_id or any(char in node_id for char in "{}"):
            raise ValueError("node_id must be non-empty and free of '{' and '}'")
        if history_max_len < 1 or history_max_age <= 0 or node_timeout <= 0:
            raise ValueError("history_max_len, history_max_age and node_timeout must be positive")
        if max_connections < 1 or max_tails < 1 or pool_wait <= 0:
            raise ValueError("max_connections, max_tails and pool_wait must be positive")
        self.node_id = node_id
        self.incarnation = secrets.token_hex(8)
        self.keys = Keys(key_prefix)
        self._clock = clock or SystemClock()
        self._max_len = history_max_len
        self._max_age_ms = int(history_max_age * 1000)
        self._node_timeout = node_timeout
        del disconnect_grace  # reaping ends REST sessions at once: node_timeout was their grace
        common: dict[str, Any] = {
            "decode_responses": False,
            "socket_connect_timeout": 2.0,
            "retry": Retry(NoBackoff(), 0),  # never re-send a non-idempotent script
            "health_check_interval": 15,
        }
        # Both pools are bounded and wait (at most ``pool_wait``, then BackendUnavailable) for
        # a free connection rather than failing at once. Commands hold a connection for one
        # round trip; each tail (one per followed workspace) holds one of its own for the
        # length of a blocking read, so ``max_tails`` bounds the workspaces a node follows
        # at once (Redis's ``maxclients``, 10 000 by default, bounds all nodes together).
        self._redis = Redis.from_pool(BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_wait, socket_timeout=5.0, **common
        ))
        self._blocking = Redis.from_pool(BlockingConnectionPool.from_url(
            url, max_connections=max_tails, timeout=pool_wait,
            socket_timeout=TAIL_BLOCK_MS / 1000 + 5.0, **common,
        ))
        self._append = self._script("append")
        self._presence = self._script("presence")
        self._position = self._script("position")
        self._heartbeat = self._script("heartbeat")
        self._claim = self._script("claim")
        self._rotate = self._script("rotate")
        self._indexed: set[WorkspaceKey] = set()  # in this node's workspace index (this life)
        self._malformed_logged: set[WorkspaceKey] = set()
        self._corrupt_logged: set[WorkspaceKey] = set()
        self._sweep_failing: set[str] = set()  # workspace tags the sweep failed on (logged)
        self._nodes_cursor = 0  # SSCAN cursor over the known nodes, carried across sweeps
        self._reassert: Callable[[], Awaitable[None]] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reassert_task: asyncio.Task[None] | None = None
        self._reassert_wanted = False
        self._dropping: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Redis failures as ``BackendUnavailable``. A connection failure also drops the idle
        pooled connections: after a Redis restart they are all dead, and each would otherwise
        fail one more request (writes are never retried, so each would be a 503)."""
        try:
            yield
        except UNAVAILABLE as exc:
            if isinstance(exc, (RedisConnectionError, OSError)) and self._dropping is None:
                self._dropping = asyncio.get_running_loop().create_task(self._drop_idle())
            raise BackendUnavailable(type(exc).__name__) from exc

    async def _drop_idle(self) -> None:
        try:
            for pool in (self._redis.connection_pool, self._blocking.connection_pool):
                await pool.disconnect(inuse_connections=False)
        except Exception:  # best effort: a dead connection still fails on its own
            log.debug("could not drop idle redis connections", exc_info=True)
        finally:
            self._dropping = None

    def _script(self, name: str) -> AsyncScript:
        return self._redis.register_script(_lua(name))

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Reap what a previous process with this node id left, register, start beating."""
        with self._unavailable():
            await self._redis.ping()
            await self._reap(self.node_id, force=True)
            await self._redis.sadd(self.keys.nodes, self.node_id)
            await self._beat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="redis heartbeat")

    async def close(self) -> None:
        """Stop beating and let the peers reap at once whatever this node still holds."""
        task, self._reassert_task = self._reassert_task, None
        await stop(task)
        if self._heartbeat_task is not None:
            await stop(self._heartbeat_task)
            self._heartbeat_task = None
            with contextlib.suppress(*UNAVAILABLE):
                await self._redis.delete(self.keys.alive(self.node_id))
        await stop(self._dropping)
        await self._blocking.aclose()
        await self._redis.aclose()

    async def ping(self) -> None:
        with self._unavailable():
            await asyncio.wait_for(self._redis.ping(), 2.0)

    def on_reassert(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` whenever this node's bindings in Redis may have been lost."""
        self._reassert = callback

    # -- liveness -----------------------------------------------------------------

    async def _beat(self) -> str:
        result = _text(await self._heartbeat(
            keys=[self.keys.alive(self.node_id), self.keys.reaping(self.node_id)],
            args=[self.incarnation, int(self._node_timeout * 1000)],
        ))
        return result

    async def _heartbeat_loop(self) -> None:
        """Beat every node_timeout/3, whatever else runs; after a lapse, a reaping or an
        outage, have the node re-assert what it holds (beside the beating, which must go
        on however long that takes: ``_request_reassert``)."""
        interval = self._node_timeout / 3
        state = "up"
        must_reassert = False
        delay = 0.1
        while True:
            try:
                result = await self._beat()
                if result == "reaped":
                    if state != "reaped":
                        log.warning("peers are removing this node's sessions (it missed its "
                                    "heartbeat); re-asserting after", extra={"node_id": self.node_id})
                    state, must_reassert = "reaped", True
                    await asyncio.sleep(0.2)
                    continue
                if result != "ok":
                    if result == "taken":
                        log.error("another process uses this node id; node ids must be unique",
                                  extra={"node_id": self.node_id})
                    elif state == "up":
                        log.warning("this node's heartbeat had lapsed; re-asserting its sessions",
                                    extra={"node_id": self.node_id})
                    must_reassert = True
                if state != "up":
                    log.info("redis heartbeat healthy again", extra={"node_id": self.node_id})
                    must_reassert = True
                state, delay = "up", 0.1
                if must_reassert:
                    self._request_reassert()
                    must_reassert = False
                await asyncio.sleep(interval)
            except (*UNAVAILABLE, BackendUnavailable):
                if state != "down":
                    log.warning("redis unreachable; retrying with backoff",
                                extra={"node_id": self.node_id})
                state, must_reassert = "down", True
                await asyncio.sleep(delay)
                delay = min(delay * 2, HEARTBEAT_BACKOFF_CAP)
            except Exception:  # an unforeseen failure must not stop the heartbeat for good
                if state != "failing":
                    log.exception("heartbeat failed; retrying with backoff",
                                  extra={"node_id": self.node_id})
                state, must_reassert = "failing", True
                await asyncio.sleep(delay)
                delay = min(delay * 2, HEARTBEAT_BACKOFF_CAP)

    def _request_reassert(self) -> None:
        """Re-assert what this node holds, soon, in the background: one run at a time; a
        request made while one runs makes one more run after it."""
        self._reassert_wanted = True
        if self._reassert_task is None or self._reassert_task.done():
            self._reassert_task = asyncio.create_task(self._reassert_loop(), name="redis re-assert")

    async def _reassert_loop(self) -> None:
        """Run the re-assertion until no request is left, retrying with capped backoff."""
        delay, failing = 0.1, False
        while self._reassert_wanted:
            self._reassert_wanted = False
            try:
                self._indexed.clear()  # the node's workspace index may have lost entries
                with self._unavailable():
                    await self._redis.sadd(self.keys.nodes, self.node_id)
                if self._reassert is not None:
                    await self._reassert()
            except Exception as exc:
                self._reassert_wanted = True
                if not failing:
                    failing = True
                    if isinstance(exc, BackendUnavailable):
                        log.warning("re-assertion failed (redis unavailable); retrying with backoff",
                                    extra={"node_id": self.node_id})
                    else:
                        log.exception("re-assertion failed; retrying with backoff",
                                      extra={"node_id": self.node_id})
                await asyncio.sleep(delay)
                delay = min(delay * 2, REASSERT_BACKOFF_CAP)
                continue
            if failing:
                log.info("re-assertion done", extra={"node_id": self.node_id})
                delay, failing = 0.1, False

    # -- the log ------------------------------------------------------------------

    def _trim_args(self, now_ms: int) -> list[int]:
        return [now_ms, self._max_len, max(0, now_ms - self._max_age_ms)]

    def _envelope(
        self, workspace: WorkspaceKey, epoch: str, entry_id: bytes | str,
        fields: dict[bytes, bytes],
    ) -> Envelope | None:
        """The envelope of one stream entry; None (logged once per workspace) if malformed."""
        try:
            entry = EntryId.parse(_text(entry_id))
            event_type, actor, data = _parse_entry(fields)
        except Exception as exc:
            # Any failure to parse outside bytes means "malformed" (RecursionError for JSON
            # nested 100 000 deep, ...): one entry must never stop a feed or fail a resume.
            if workspace not in self._malformed_logged:
                self._malformed_logged.add(workspace)
                log.warning("skipping malformed log entries (logged once per workspace)",
                            extra={"workspace": str(workspace), "entry_id": _text(entry_id)[:40],
                                   "problem": f"{type(exc).__name__}: {str(exc)[:200]}"})
            return None
        return Envelope(
            id=f"{epoch}:{entry}",
            type=event_type,
            org_id=workspace.org_id,
            workspace_id=workspace.workspace_id,
            actor=actor,
            data=data,
            timestamp=format_timestamp(datetime.fromtimestamp(entry.ms / 1000, UTC)),
        )

    def _envelopes(
        self, workspace: WorkspaceKey, epoch: str,
        entries: Sequence[tuple[bytes | str, dict[bytes, bytes]]],
    ) -> list[Envelope]:
        out = []
        for entry_id, fields in entries:
            envelope = self._envelope(workspace, epoch, entry_id, fields)
            if envelope is not None:
                out.append(envelope)
        return out

    def _issued(
        self, workspace: WorkspaceKey, epoch: str, ids: Sequence[bytes], pending: Sequence[PendingEvent]
    ) -> tuple[Envelope, ...]:
        return tuple(
            Envelope(
                id=f"{epoch}:{_text(entry_id)}",
                type=item.type,
                org_id=workspace.org_id,
                workspace_id=workspace.workspace_id,
                actor=item.actor,
                data=item.data,
                timestamp=format_timestamp(
                    datetime.fromtimestamp(EntryId.parse(_text(entry_id)).ms / 1000, UTC)
                ),
            )
            for entry_id, item in zip(ids, pending, strict=True)
        )

    async def append(
        self, workspace: WorkspaceKey, event_type: str, actor: dict[str, Any], data: dict[str, Any]
    ) -> Envelope:
        pending = PendingEvent(event_type, actor, data)
        now_ms = int(self._clock.now() * 1000)
        with self._unavailable():
            result = await self._append(
                keys=[self.keys.epoch(workspace), self.keys.log(workspace)],
                args=[secrets.token_hex(4), *self._trim_args(now_ms), *_entry_fields(pending, self.node_id)],
            )
        return self._issued(workspace, _text(result[0]), result[1:], [pending])[0]

    async def _state(
        self, workspace: WorkspaceKey, *, create_epoch: bool, after: EntryId | None = None,
        count: int = 0,
    ) -> _LogState:
        with self._unavailable():
            raw = await self._position(
                keys=[self.keys.epoch(workspace), self.keys.log(workspace)],
                args=[secrets.token_hex(4) if create_epoch else "",
                      "" if after is None else str(after), count,
                      "" if after is None else str(after)],
            )
        return _parse_state(raw)

    async def presence_snapshot(self, workspace: WorkspaceKey) -> Snapshot:
        with self._unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                await self._position(
                    keys=[self.keys.epoch(workspace), self.keys.log(workspace)],
                    args=[secrets.token_hex(4), "", 0, ""], client=pipe,
                )
                pipe.hgetall(self.keys.records(workspace))
                raw_state, raw_records = await pipe.execute()
        state = _parse_state(raw_state)
        members = {}
        for user_id, raw in raw_records.items():
            try:
                member = UserRecord.from_dict(json.loads(raw)).member()
            except Exception:  # a corrupt record must not make the workspace unreadable
                if workspace not in self._corrupt_logged:
                    self._corrupt_logged.add(workspace)
                    log.warning("skipping corrupt presence records (logged once per workspace)",
                                extra={"workspace": str(workspace), "user_id": _text(user_id)[:200]})
                continue
            if member is not None:
                members[_text(user_id)] = member
        return Snapshot(members, EventId(state.epoch, state.last))

    async def read_after(self, workspace: WorkspaceKey, after: EventId) -> list[Envelope]:
        return await self._read_after(workspace, after, read_here=False)

    async def _read_after(
        self, workspace: WorkspaceKey, after: EventId, *, read_here: bool
    ) -> list[Envelope]:
        """``read_after``; ``read_here``: ``after`` is a position this node read from the log
        itself (not a client's word), so a log that no longer has it lost writes."""
        state = await self._state(
            workspace, create_epoch=False, after=after.entry, count=self._max_len + 1
        )
        if state.epoch != after.epoch:
            raise HistoryGone(str(after))
        if state.lost_writes_before(after.entry):
            # A client's id newer than every entry is proof enough: no node issues ids from
            # the future (beyond clock skew), so it was issued and then lost. One in the
            # middle that is missing may be a forgery: only that client resyncs.
            if read_here or (after.entry > state.last
                             and after.entry.ms <= self._clock.now() * 1000 + MAX_ID_SKEW_MS):
                await self._lost_writes(workspace, state.epoch, after.entry)
            raise HistoryGone(str(after))
        if after.entry < state.deleted or state.trimmed_past(after.entry):
            raise HistoryGone(str(after))
        # Retention is a promise of at least max_len entries and max_age seconds; Redis trims
        # approximately (MAXLEN ~ / MINID ~), so entries past the promise count as gone too.
        entries = state.entries
        if len(entries) > self._max_len:
            raise HistoryGone(str(after))
        oldest_kept = int(self._clock.now() * 1000) - self._max_age_ms
        if entries and EntryId.parse(_text(entries[0][0])).ms < oldest_kept:
            raise HistoryGone(str(after))
        return self._envelopes(workspace, state.epoch, entries)

    async def _lost_writes(self, workspace: WorkspaceKey, epoch: str, seen: EntryId) -> None:
        """Redis lost entries of the log but not its epoch (failover to a replica that was
        behind, an older snapshot restored): give the log a new epoch, so every node and
        client resyncs instead of reading on past a silent gap, and re-assert what this node
        holds (the records went back in time too). Every other node following the workspace
        sees the new epoch at its next read and re-asserts as well."""
        with self._unavailable():
            now_epoch = _text(await self._rotate(
                keys=[self.keys.epoch(workspace)], args=[epoch, secrets.token_hex(4)]
            ))
        log.warning("the workspace log lost entries this node had read; new epoch",
                    extra={"workspace": str(workspace), "seen": str(seen),
                           "old_epoch": epoch, "epoch": now_epoch})
        self._request_reassert()

    async def tail(self, workspace: WorkspaceKey, after: EventId) -> AsyncIterator[list[Envelope]]:
        """Blocking reads (``XREAD BLOCK``), tracking the last id read. ``HistoryGone`` when
        the epoch changed (Redis lost the log, or another node found it lost entries),
        entries after the last id read were trimmed or deleted, or the log no longer has
        entries this reader read (it then gets a new epoch, see ``_lost_writes``)."""
        batch = await self._read_after(workspace, after, read_here=True)
        cursor = after.entry
        if batch:
            cursor = EventId.parse(batch[-1].id).entry
            yield batch
        log_key = self.keys.log(workspace)
        while True:
            with self._unavailable():
                async with self._blocking.pipeline(transaction=False) as pipe:
                    pipe.xread({log_key: str(cursor)}, count=TAIL_COUNT, block=TAIL_BLOCK_MS)
                    await self._position(keys=[self.keys.epoch(workspace), log_key],
                                         args=["", "", 0, str(cursor)], client=pipe)
                    read, raw_state = await pipe.execute()
            state = _parse_state(raw_state)
            if state.epoch != after.epoch:
                # Lost (with this node's records, maybe) or rotated by a peer that found
                # lost entries: either way what this node holds must be asserted again.
                self._request_reassert()
                raise HistoryGone(f"{after.epoch}:{cursor}")
            if state.lost_writes_before(cursor):
                await self._lost_writes(workspace, state.epoch, cursor)
                raise HistoryGone(f"{after.epoch}:{cursor}")
            if state.deleted > cursor:
                raise HistoryGone(f"{after.epoch}:{cursor}")
            entries = read[0][1] if read else []
            if not entries:
                continue
            cursor = EntryId.parse(_text(entries[-1][0]))
            batch = self._envelopes(workspace, state.epoch, entries)
            if batch:
                yield batch

    # -- presence -----------------------------------------------------------------

    async def change_presence(
        self, workspace: WorkspaceKey, user_id: str, change: PresenceChange
    ) -> PresenceOutcome:
        for _ in range(CAS_ATTEMPTS):
            outcome = await self._try_change(workspace, user_id, change)
            if outcome is not None:
                return outcome
        raise BackendUnavailable("presence change kept conflicting")

    async def _try_change(
        self, workspace: WorkspaceKey, user_id: str, change: PresenceChange
    ) -> PresenceOutcome | None:
        keys = self.keys
        with self._unavailable():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(keys.epoch(workspace))
                pipe.hget(keys.records(workspace), user_id)
                epoch, raw = await pipe.execute()
        before = UserRecord.from_dict(json.loads(raw)) if raw else None
        now = self._clock.now()
        after = change.apply(before, now)
        pending = transition(before, after, change.reason)
        nodes_before, nodes_after = bound_nodes(before), bound_nodes(after)
        added, removed = nodes_after - nodes_before, nodes_before - nodes_after
        tag = workspace_tag(workspace)
        # Whoever reaps a node finds its bindings through its workspace index. A reaper may
        # have removed this workspace from it while this node was paused, so the workspace
        # is indexed again (once per life of ``_indexed``) whenever the record binds this
        # node, changed by this call or not.
        to_index = added - {self.node_id}
        if self.node_id in nodes_after and workspace not in self._indexed:
            to_index = to_index | {self.node_id}
        if after == before and not pending:
            if to_index:
                with self._unavailable():
                    await self._redis.sadd(keys.node_workspaces(self.node_id), tag)
                self._indexed.add(workspace)
            return PresenceOutcome(after, ())
        expiry = after.next_expiry() if after is not None else None
        with self._unavailable():
            # Indexes other slots hold, written before the change so a crash never leaves a
            # binding or an expiry that no sweep can find.
            if expiry is not None or to_index:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for node in to_index:
                        pipe.sadd(keys.node_workspaces(node), tag)
                    if expiry is not None:
                        pipe.zadd(keys.expiring, {tag: expiry}, lt=True)
                    await pipe.execute()
                if self.node_id in to_index:
                    self._indexed.add(workspace)
            bound = sorted(added | removed)
            events = [value for item in pending for value in _entry_fields(item, self.node_id)]
            result = await self._presence(
                keys=[keys.epoch(workspace), keys.records(workspace), keys.log(workspace),
                      keys.expiry(workspace), *(keys.bound(workspace, node) for node in bound)],
                args=[
                    _text(epoch) if epoch else "", secrets.token_hex(4), user_id,
                    raw or "", json.dumps(after.to_dict()) if after is not None else "",
                    repr(expiry) if expiry is not None else "",
                    *self._trim_args(int(now * 1000)),
                    len(bound), *("+" if node in added else "-" for node in bound),
                    *events,
                ],
            )
            if _text(result[0]) != "ok":
                return None
            if expiry is not None:
                # Again after: a sweep may have re-indexed the workspace in between.
                await self._redis.zadd(keys.expiring, {tag: expiry}, lt=True)
        return PresenceOutcome(after, self._issued(workspace, _text(result[1]), result[2:], pending))

    async def bound_to_node(self) -> set[tuple[WorkspaceKey, str]]:
        """The (workspace, user) pairs whose records Redis binds to this node."""
        with self._unavailable():
            tags = await self._redis.smembers(self.keys.node_workspaces(self.node_id))
            found = set()
            for tag in tags:
                workspace = parse_workspace_tag(_text(tag))
                for user in await self._redis.smembers(self.keys.bound(workspace, self.node_id)):
                    found.add((workspace, _text(user)))
        return found

    # -- sweeping -----------------------------------------------------------------

    async def sweep(self) -> int:
        """Prune the records whose time is up (found through the expiry indexes, not by
        scanning), and remove the sessions of nodes whose heartbeat stopped.

        A workspace (or a dead node) that cannot be handled, e.g. because of a corrupt
        record, is logged once, skipped (tried again ``SWEEP_RETRY`` later) and never keeps
        the others from being swept. Raises ``BackendUnavailable`` if Redis cannot be read."""
        changed = 0
        now = self._clock.now()
        with self._unavailable():
            due = await self._redis.zrangebyscore(self.keys.expiring, "-inf", now,
                                                  start=0, num=SWEEP_BATCH)
        for raw_tag in due:
            tag = _text(cast(bytes, raw_tag))
            count, problem = await self._prune_workspace(tag, now)
            changed += count
            if problem is None:
                if tag in self._sweep_failing:
                    self._sweep_failing.discard(tag)
                    log.info("sweeping a workspace works again", extra={"workspace_tag": tag[:200]})
                continue
            if tag not in self._sweep_failing:
                self._sweep_failing.add(tag)
                log.warning("cannot sweep a workspace; skipping it for now (logged once)",
                            extra={"workspace_tag": tag[:200],
                                   "problem": f"{type(problem).__name__}: {str(problem)[:200]}"})
            with self._unavailable():  # do not let it hold the head of the index
                await self._redis.zadd(self.keys.expiring, {tag: now + SWEEP_RETRY}, xx=True, gt=True)
        return changed + await self._reap_dead_nodes()

    async def _prune_workspace(self, tag: str, now: float) -> tuple[int, Exception | None]:
        """Prune the due records of one workspace: (how many, the first failure or None)."""
        changed = 0
        problem: Exception | None = None
        try:
            workspace = parse_workspace_tag(tag)
            with self._unavailable():
                users = await self._redis.zrangebyscore(self.keys.expiry(workspace), "-inf", now)
            for user in users:
                try:
                    await self.change_presence(workspace, _text(cast(bytes, user)), prune())
                    changed += 1
                except Exception as exc:  # one corrupt record must not keep the others alive
                    problem = problem or exc
            await self._reindex_expiry(workspace)
        except Exception as exc:
            problem = problem or exc
        return changed, problem

    async def _reindex_expiry(self, workspace: WorkspaceKey) -> None:
        """Set the workspace's score in the global index to its earliest record expiry."""
        tag = workspace_tag(workspace)
        with self._unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(CAS_ATTEMPTS):
                    try:
                        await pipe.watch(self.keys.expiring)
                        head = await self._redis.zrange(self.keys.expiry(workspace), 0, 0,
                                                        withscores=True)
                        pipe.multi()
                        if head:
                            pipe.zadd(self.keys.expiring, {tag: head[0][1]})
                        else:
                            pipe.zrem(self.keys.expiring, tag)
                        await pipe.execute()
                        return
                    except WatchError:
                        continue

    async def _reap_dead_nodes(self) -> int:
        """Reap the dead among the next ``SWEEP_BATCH`` or so known nodes: a cursor
        (``SSCAN``) carried from sweep to sweep visits every node, however many are alive."""
        with self._unavailable():
            cursor, found = await self._redis.sscan(self.keys.nodes, self._nodes_cursor,
                                                    count=SWEEP_BATCH)
            self._nodes_cursor = int(cursor)
            others = sorted({_text(n) for n in found} - {self.node_id})
            if not others:
                return 0
            async with self._redis.pipeline(transaction=False) as pipe:
                for node in others:
                    pipe.exists(self.keys.alive(node))
                alive = await pipe.execute()
        changed = 0
        for node, is_alive in zip(others, alive, strict=True):
            if not is_alive:
                changed += await self._reap(node, force=False)
        return changed

    async def _reap(self, node_id: str, *, force: bool) -> int:
        """Remove every session and stream bound to ``node_id`` (``presence.node_reaped``:
        exactly one ``presence.left`` per user who had nothing else), if this node wins the
        claim to do it.

        The node may be paused rather than dead, and index new workspaces while this runs:
        only the workspaces processed leave its index, and the reaper goes on until the
        index is empty (at most ``REAP_ROUNDS`` reads). A node that was reaped re-asserts
        afterwards (its heartbeat tells it), which indexes again what it still holds."""
        keys = self.keys
        claim_ms = int(max(self._node_timeout * 2, 10.0) * 1000)
        with self._unavailable():
            claimed = await self._claim(
                keys=[keys.alive(node_id), keys.reaping(node_id)],
                args=[f"{self.node_id}/{self.incarnation}", claim_ms, "force" if force else ""],
            )
            if not claimed:
                return 0
        changed = 0
        done: set[bytes | str] = set()
        failed: set[bytes | str] = set()
        try:
            for _ in range(REAP_ROUNDS):
                with self._unavailable():
                    tags = await self._redis.smembers(keys.node_workspaces(node_id)) - failed
                if not tags:
                    break
                for tag in tags:
                    with self._unavailable():
                        await self._redis.pexpire(keys.reaping(node_id), claim_ms)
                    try:
                        changed += await self._reap_workspace(node_id, _text(tag))
                    except BackendUnavailable:
                        raise
                    except Exception:  # e.g. a corrupt record: the others are still reaped
                        log.exception("cannot remove a dead node's sessions in one workspace; "
                                      "left for the next sweep",
                                      extra={"dead_node": node_id, "workspace_tag": _text(tag)[:200]})
                        failed.add(tag)
                        continue
                    with self._unavailable():
                        await self._redis.srem(keys.node_workspaces(node_id), tag)
                    done.add(tag)
            with self._unavailable():
                if not force and not failed and not await self._redis.exists(
                    keys.node_workspaces(node_id)
                ):
                    await self._redis.srem(keys.nodes, node_id)
                await self._redis.delete(keys.reaping(node_id))
        except BaseException:
            # Leave the claim to expire only if Redis is gone; otherwise let another try now.
            with contextlib.suppress(*UNAVAILABLE):
                await self._redis.delete(keys.reaping(node_id))
            raise
        if done and not force:
            log.warning("removed the sessions of a node that stopped heartbeating",
                        extra={"dead_node": node_id, "workspaces": len(done), "left_events": changed})
        return changed

    async def _reap_workspace(self, node_id: str, tag: str) -> int:
        workspace = parse_workspace_tag(tag)
        with self._unavailable():
            users = await self._redis.smembers(self.keys.bound(workspace, node_id))
        changed = 0
        for user in users:
            outcome = await self.change_presence(workspace, _text(user), node_reaped(node_id))
            changed += len(outcome.events)
        return changed

    # -- tickets ------------------------------------------------------------------

    async def put_ticket(self, ticket: str, payload: dict[str, Any], ttl: float) -> None:
        value = json.dumps({"expires_at": self._clock.now() + ttl, "payload": payload})
        with self._unavailable():
            await self._redis.set(self.keys.ticket(ticket), value, px=max(1, int(ttl * 1000)))

    async def take_ticket(self, ticket: str) -> dict[str, Any] | None:
        with self._unavailable():
            raw = await self._redis.getdel(self.keys.ticket(ticket))
        if raw is None:
            return None
        item = json.loads(raw)
        if item["expires_at"] <= self._clock.now():
            return None
        payload: dict[str, Any] = item["payload"]
        return payload


@dataclass(frozen=True, slots=True)
class _LogState:
    """Where a workspace log stands (``position.lua``)."""

    epoch: str  # "" = none
    last: EntryId  # last-generated-id
    deleted: EntryId  # max-deleted-entry-id (XDEL; trimming does not move it)
    first: EntryId  # the first entry still in the stream (ZERO: none)
    holds_seen: bool  # the stream has the entry the caller asked about
    removed: int  # entries ever removed from the stream (trimmed or deleted)
    entries: list[tuple[bytes, dict[bytes, bytes]]]

    def trimmed_past(self, position: EntryId) -> bool:
        """True when entries after ``position`` may have been trimmed: something was removed
        from the stream and ``position`` is older than every entry it still has. (Redis 7.0
        does not move ``max-deleted-entry-id`` when it trims.)"""
        if not self.removed or position >= self.last:
            return False
        return self.first == ZERO or position < self.first

    def lost_writes_before(self, seen: EntryId) -> bool:
        """True when the log no longer has an entry it had: ``seen`` (read from this log in
        this epoch) is above its last id, or missing from inside the retained range without
        having been deleted. Neither trimming (it removes from the head) nor ``XDEL`` (it
        moves ``deleted``) explains that: Redis lost writes while the epoch survived."""
        if seen > self.last:
            return True
        return not self.holds_seen and ZERO < self.first <= seen and seen > self.deleted


def _parse_state(raw: Sequence[Any]) -> _LogState:
    epoch, last, deleted, raw_entries, first, holds, removed = raw
    entries = []
    for entry_id, flat in raw_entries:
        fields: dict[bytes, bytes] = {}
        for index in range(0, len(flat) - 1, 2):
            fields[flat[index]] = flat[index + 1]
        entries.append((entry_id, fields))
    return _LogState(
        epoch=_text(epoch),
        last=EntryId.parse(_text(last)),
        deleted=EntryId.parse(_text(deleted)),
        first=EntryId.parse(_text(first)),
        holds_seen=bool(holds),
        removed=int(removed),
        entries=entries,
    )


def _parse_entry(fields: dict[bytes, bytes]) -> tuple[str, dict[str, Any], dict[str, Any]]:
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
