"""The Redis Streams backend: workspace logs, presence records and node liveness in Redis.

Every node on the same Redis (and key prefix) shares everything: a workspace's events,
presence changes included, are one Redis stream whose entry ids are the event ids
clients see; presence records change only together with the events that announce the
change (one Lua compare-and-set per change, the transition itself computed by the pure
functions of ``gateway.presence``); each node heartbeats, and the survivors remove the
sessions of a node that stops (``redis_liveness``). A node follows the logs its clients
watch through one pub/sub connection per Redis primary (``redis_follow``).
``docs/redis.md`` documents the key layout and the stream entry format, and
``docs/scaling.md`` what each operation costs.

Keys of one workspace share the hash tag ``{<org>:<workspace>}`` and every script touches
one workspace (or one node) only, so the layout works on Redis Cluster
(``redis+cluster://``); a Sentinel-managed primary (``redis+sentinel://``) is followed
through failovers (``redis_topology``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, cast
from urllib.parse import quote, unquote

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterUnreachableError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.broker import (
    BackendRefused,
    BackendUnavailable,
    Following,
    HistoryGone,
    LogSink,
    PresenceOutcome,
    Snapshot,
    publisher_key,
)
from gateway.clock import AlignedClock, Clock, SystemClock
from gateway.combining import Combiner
from gateway.liveness import Link
from gateway.log_entries import EntryReader, entry_fields, issued, text
from gateway.presence import (
    PendingEvent,
    PresenceChange,
    UserRecord,
    bound_nodes,
    prune,
    transition,
)
from gateway.redis_follow import LogReader, LogState
from gateway.redis_liveness import NodeLiveness
from gateway.redis_topology import RedisClients
from gateway.tasks import stop
from protocol.envelope import ZERO, EntryId, Envelope, EventId, WorkspaceKey

log = logging.getLogger(__name__)

# Errors that mean "Redis cannot serve us now" (not "the request is wrong"). Out of memory
# (``maxmemory`` under ``noeviction``) refuses writes that would grow it: 503 until it frees.
# A Redis Cluster that is failing over or resharding says so too: ``CLUSTERDOWN`` (every
# shard, while a failed primary's slots are not served yet; ``MASTERDOWN`` is one),
# ``TRYAGAIN`` (a script's keys split by a slot migration), a slot no known node serves, no
# node reachable, or redirections that did not end (``ClusterError``, "TTL exhausted").
# redis-py learns the new slot map on these errors itself; the caller retries (docs/redis.md).
UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError,
                      OSError, ClusterError, TryAgainError, SlotNotCoveredError,
                      RedisClusterUnreachableError)
# Those that say the link itself fails (not a full or demoted Redis that still answers).
LINK_FAILURES: Final = (RedisConnectionError, RedisTimeoutError, OSError)
# The only ``maxmemory-policy`` under which Redis never deletes a key the gateway relies on.
SAFE_POLICY: Final = "noeviction"

CAS_ATTEMPTS: Final = 100  # a presence change retried this often against other nodes, then 503
READ_PAGE: Final = 256  # entries a resume reads per round trip
SWEEP_BATCH: Final = 100  # workspaces handled per sweep
SWEEP_RETRY: Final = 30.0  # a workspace the sweep failed on is tried again this much later
IDLE_EPOCH_TTL_MS: Final = 600_000  # the epoch a read made for a workspace with no log
APPEND_BATCH: Final = 64  # publishes of one workspace sent in one append.lua call at most
APPENDING: Final = ("append", "presence")  # the scripts that start with _log.lua
CLOCK_WARN_OFFSET: Final = 1.0  # seconds off Redis's clock worth a warning at start
READY_TIMEOUT: Final = 2.0  # a readiness check waits this long for Redis's answer


def liveness_timeout(node_timeout: float) -> float:
    """The socket timeout of the heartbeat's connections: two thirds of ``node_timeout``
    (0.5 s to 5 s), so a beat over a slow link still counts and a cut link is noticed
    within about ``node_timeout``."""
    return max(0.5, min(node_timeout * 2 / 3, 5.0))


def _lua(name: str) -> str:
    scripts = resources.files("gateway").joinpath("lua")
    source = scripts.joinpath(f"{name}.lua").read_text()
    if name in APPENDING:
        return scripts.joinpath("_log.lua").read_text() + source
    return source


@dataclass(frozen=True, slots=True)
class _Publish:
    """One publish waiting for its workspace's next append (``RedisBroker.append``)."""

    event: PendingEvent
    key: str | None  # the idempotency key scoped to its publisher (``publisher_key``)


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

    def notify(self, workspace: WorkspaceKey) -> str:
        """The sharded pub/sub channel every append to the log publishes on."""
        return f"{self.workspace(workspace)}:notify"

    def published(self, workspace: WorkspaceKey, key: str) -> str:
        """What the publish with this (``publisher_key``) idempotency key appended."""
        return f"{self.workspace(workspace)}:published:{key}"

    def mark(self, workspace: WorkspaceKey) -> str:
        """The high-water mark: the id of the last entry a node appended."""
        return f"{self.workspace(workspace)}:hw"

    def read(self, workspace: WorkspaceKey) -> list[str]:
        return [self.epoch(workspace), self.log(workspace), self.mark(workspace)]

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
        key_prefix: str = "gw",
        max_connections: int = 6,
        pool_wait: float = 2.0,
        audit_period: float = 60.0,
        idempotency_ttl: float = 300.0,
        allow_eviction: bool = False,
    ) -> None:
        if not node_id or any(char in node_id for char in "{}"):
            raise ValueError("node_id must be non-empty and free of '{' and '}'")
        if history_max_len < 1 or history_max_age <= 0 or node_timeout <= 0:
            raise ValueError("history_max_len, history_max_age and node_timeout must be positive")
        if max_connections < 1 or pool_wait <= 0:
            raise ValueError("max_connections and pool_wait must be positive")
        self.node_id = node_id
        self.incarnation = secrets.token_hex(8)
        self.keys = Keys(key_prefix)
        # Every deadline or age this backend writes or judges is compared by other nodes:
        # on Redis's clock (``start`` measures the offset), not on this node's. The system
        # clock is followed by its monotonic reading, which a step of the wall clock (NTP
        # at boot, a VM resumed) does not move; a test's clock is followed as it is moved.
        # Until ``start`` aligns it (or when Redis refuses ``TIME``) it reads as this node's
        # own clock: the wall clock, not the monotonic clock's arbitrary zero.
        local = clock or SystemClock()
        if isinstance(local, SystemClock):
            self._clock = AlignedClock(SystemClock(time.monotonic))
            self._clock.offset = time.time() - time.monotonic()
        else:
            self._clock = AlignedClock(local)
        self._max_len = history_max_len
        self._max_age_ms = int(history_max_age * 1000)
        self._idempotency_ttl_ms = max(1, int(idempotency_ttl * 1000))
        self._allow_eviction = allow_eviction
        # Commands hold a connection for one round trip, and wait (at most ``pool_wait``,
        # then BackendUnavailable) for one of ``max_connections`` per primary. The heartbeat
        # has connections of its own, whose answers may take up to two thirds of the
        # timeout (a beat answered later than that is no use: the key is about to lapse).
        self._clients = RedisClients(url, max_connections=max_connections, pool_wait=pool_wait,
                                     liveness_timeout=liveness_timeout(node_timeout),
                                     common={
                                         "decode_responses": False,
                                         "socket_connect_timeout": 2.0,
                                         "socket_timeout": 5.0,
                                         "socket_keepalive": True,
                                         # never re-send a non-idempotent script
                                         "retry": Retry(NoBackoff(), 0),
                                         "health_check_interval": 15,
                                     })
        self._redis = self._clients.commands
        self._append = self._script("append")
        self._presence = self._script("presence")
        self._snapshot = self._script("snapshot")
        self._read = self._script("read")
        self._entries = EntryReader()
        self._indexed: set[WorkspaceKey] = set()  # in this node's workspace index (this life)
        self._corrupt_logged: set[WorkspaceKey] = set()
        self._sweep_failing: set[str] = set()  # workspace tags the sweep failed on (logged)
        self._presence_writes: Combiner[tuple[WorkspaceKey, str], PresenceChange, PresenceOutcome] = (
            Combiner(lambda key, changes: self._change_all(*key, changes)))
        self._appends: Combiner[WorkspaceKey, _Publish, Envelope] = Combiner(
            self._append_all, limit=APPEND_BATCH)
        self._dropping: asyncio.Task[None] | None = None
        self._pinging: asyncio.Task[None] | None = None
        self._link = Link(node_timeout)  # every round trip through ``_unavailable`` counts
        self._liveness = NodeLiveness(
            redis=self._redis, reserved=self._clients.liveness, slot=self._clients.slot,
            keys=self.keys, node_id=node_id,
            incarnation=self.incarnation,
            scripts=(self._script("heartbeat"), self._script("claim")),
            node_timeout=node_timeout, guard=self._unavailable,
            # late-bound: the broker's own method, whatever it is when the reaper runs
            change_presence=lambda *change: self.change_presence(*change),
            parse_tag=parse_workspace_tag,
            unavailable=UNAVAILABLE,
        )
        self._reader = LogReader(
            self._clients, keys=self.keys, read_script=self._read,
            rotate_script=self._script("rotate"), entries=self._entries,
            on_epoch_change=self._liveness.request_reassert, unavailable=UNAVAILABLE,
            audit_period=audit_period,
        )

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Redis failures as ``BackendUnavailable``. A connection failure (or a write to a
        demoted primary) also drops the idle pooled connections: after a Redis restart or
        a failover they are all dead or pointed at a replica, and each would otherwise fail
        one more request (writes are never retried, so each would be a 503)."""
        try:
            yield
        except UNAVAILABLE as exc:
            if isinstance(exc, LINK_FAILURES):
                self._link.failed()
            if self._dropping is None and not self._clients.is_cluster:
                self._dropping = asyncio.get_running_loop().create_task(self._drop_idle())
            raise BackendUnavailable(type(exc).__name__) from exc
        self._link.answered(time.monotonic())

    async def _drop_idle(self) -> None:
        try:
            for client in (self._redis, self._clients.liveness):
                await client.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # best effort: a dead connection still fails on its own
            log.debug("could not drop idle redis connections", exc_info=True)
        finally:
            self._dropping = None

    def _script(self, name: str) -> AsyncScript:
        return cast(AsyncScript, self._redis.register_script(_lua(name)))

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check that Redis keeps every key, reap what a previous process with this
        node id left, start beating."""
        with self._unavailable():
            await self._clients.start()
            await self._redis.ping()
            await self._check_eviction()
            await self._align_clock()
        await self._liveness.start()

    async def _align_clock(self) -> None:
        """Measure how far this node's clock is from Redis's (``docs/redis.md``, "Clocks"):
        session expiries written by one node are swept by another, a ticket made on one is
        redeemed on another, and a log's age is judged by whichever node a client resumes
        on, so they all use Redis's clock. (A wall clock far off Redis's is said once: the
        node's own JWT checks still use it.) A Redis that does not allow ``TIME`` leaves the
        node on its own clock, said once too."""
        sent = self._clock.local.now()
        try:
            reference = await self._clients.server_time()
        except ResponseError as exc:
            log.warning("cannot read Redis's clock (TIME); shared deadlines use this node's "
                        "clock, which must then agree with its peers'", extra={"problem": str(exc)[:200]})
            return
        self._clock.align(reference, sent, self._clock.local.now())
        if abs(wall_offset := reference - time.time()) > CLOCK_WARN_OFFSET:
            log.warning("this node's clock is off Redis's; shared deadlines use Redis's clock, "
                        "JWT exp/nbf this node's", extra={"offset_s": round(wall_offset, 3)})

    async def _check_eviction(self) -> None:
        """Refuse a Redis that may evict keys (``BackendRefused``), unless allowed (then log
        it as an error): presence records, epochs, marks, liveness and idempotency keys would
        go silently — members who stay, reaped nodes whose users linger, resets, publishes
        appended twice. Where ``CONFIG`` is not allowed, say so and go on."""
        try:
            policies = sorted(set(await self._clients.config("maxmemory-policy")))
        except ResponseError as exc:
            log.info("cannot read Redis's maxmemory-policy; it must be noeviction (docs/redis.md)",
                     extra={"problem": str(exc)[:200]})
            return
        unsafe = [policy for policy in policies if policy != SAFE_POLICY]
        if not unsafe:
            return
        problem = (f"Redis's maxmemory-policy is {', '.join(unsafe)}: it may evict the gateway's "
                   f"keys (presence records, epochs, node liveness, idempotency keys); set "
                   f"maxmemory-policy {SAFE_POLICY}")
        if not self._allow_eviction:
            raise BackendRefused(f"{problem} (or start with --redis-allow-eviction)")
        log.error(f"{problem}; running anyway (--redis-allow-eviction)")

    async def close(self) -> None:
        await stop(self._pinging)
        await self._appends.close()
        await self._presence_writes.close()
        await self._reader.close()
        await self._liveness.close()
        if self._dropping is not None:
            with contextlib.suppress(BaseException):
                await self._dropping
        await self._clients.close()

    async def ping(self) -> None:
        """Reachable and writable: a server demoted to a replica answers PING but refuses
        every write, so a node still pointed at one must not report itself ready.

        On the node's reserved connections (a slow link or busy requests do not make it
        unready), and concurrent checks share one round trip (a load balancer polling
        often holds at most one of them)."""
        if self._pinging is None or self._pinging.done():
            self._pinging = asyncio.get_running_loop().create_task(self._check_writable())
            # (its failure is each waiter's; one that nobody waited for is not an error)
            self._pinging.add_done_callback(lambda task: task.cancelled() or task.exception())
        with self._unavailable():
            await asyncio.wait_for(asyncio.shield(self._pinging), READY_TIMEOUT)

    async def _check_writable(self) -> None:
        reserved = self._clients.liveness
        if self._clients.is_cluster:  # the cluster client sends writes to primaries
            await reserved.ping()
            return
        role = await reserved.execute_command("ROLE")
        if text(role[0]) != "master":
            raise ReadOnlyError(f"the Redis this node writes to is a {text(role[0])}")

    def require_current(self) -> None:
        """Raise ``BackendUnavailable`` unless the link to Redis works (``Link``: the last
        round trip was answered, and one was within ``node_timeout``; the heartbeat makes
        one every node_timeout/3): cut off from Redis, the node's replica of a log may be
        missing what others appended, and its peers reap its own sessions — a presence
        read must not answer from it as if it were current."""
        if not self._link.current(time.monotonic()):
            raise BackendUnavailable("redis unreachable: presence replica not current")

    def on_reassert(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` whenever this node's bindings in Redis may have been lost."""
        self._liveness.on_reassert(callback, before=self._indexed.clear)

    @property
    def followed(self) -> int:
        """Workspace logs this node follows (one subscription each, none idle-polled)."""
        return self._reader.followed

    # -- the log ------------------------------------------------------------------

    def _trim_args(self, now_ms: int) -> list[int]:
        return [now_ms, self._max_len, max(0, now_ms - self._max_age_ms)]

    async def append(
        self, workspace: WorkspaceKey, event_type: str, actor: dict[str, Any], data: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> Envelope:
        """Publishes to one workspace made on this node while an append of it is under way
        go to Redis together, in arrival order, in its next ``append.lua`` call (group
        commit: one round trip and one notification for all of them); each caller gets its
        own envelope and its own idempotency outcome."""
        key = publisher_key(actor, idempotency_key) if idempotency_key is not None else None
        return await self._appends.submit(workspace, _Publish(PendingEvent(event_type, actor, data), key))

    async def _append_all(self, workspace: WorkspaceKey, publishes: list[_Publish]) -> list[Envelope]:
        keys = self.keys
        script_keys = [keys.epoch(workspace), keys.log(workspace), keys.notify(workspace),
                       keys.mark(workspace)]
        args: list[Any] = [secrets.token_hex(4), *self._trim_args(int(self._clock.now() * 1000)),
                           self._idempotency_ttl_ms]
        sent: list[int] = []  # the publishes the script is given (index in ``publishes``)
        first: dict[str, int] = {}  # idempotency key -> the publish of this batch that sends it
        for index, publish in enumerate(publishes):
            key_index = 0
            if publish.key is not None:
                if publish.key in first:
                    continue  # one key twice in a batch: the second gets what the first appended
                first[publish.key] = index
                script_keys.append(keys.published(workspace, publish.key))
                key_index = len(script_keys)
            args += [key_index, *entry_fields(publish.event, self.node_id)]
            sent.append(index)
        with self._unavailable():
            result = await self._append(keys=script_keys, args=args)
        epoch = text(result[0])
        envelopes = {index: self._appended(workspace, epoch, text(raw), publishes[index].event)
                     for index, raw in zip(sent, result[1:], strict=True)}
        return [envelopes[index if index in envelopes else first[cast(str, publish.key)]]
                for index, publish in enumerate(publishes)]

    @staticmethod
    def _appended(workspace: WorkspaceKey, epoch: str, result: str, event: PendingEvent) -> Envelope:
        """A publish's envelope from ``append.lua``'s answer for it: its entry id, or (a retry)
        "=" and what the first publish with its idempotency key appended."""
        if result.startswith("="):
            epoch, entry_id, kind, actor_json, data_json = json.loads(result[1:])
            event = PendingEvent(kind, json.loads(actor_json), json.loads(data_json))
            result = entry_id
        return issued(workspace, epoch, [result], [event])[0]

    async def presence_snapshot(self, workspace: WorkspaceKey) -> Snapshot:
        """Members and the position they are consistent with. Reading a workspace that has
        no log leaves only its epoch behind, for ``IDLE_EPOCH_TTL_MS`` (no lasting state: ids
        of an empty log may then get another epoch; their holders get ``sync.reset``, with
        nothing missed)."""
        with self._unavailable():
            epoch, last, flat = await self._snapshot(
                keys=[self.keys.epoch(workspace), self.keys.log(workspace),
                      self.keys.records(workspace)],
                args=[secrets.token_hex(4), min(self._max_age_ms, IDLE_EPOCH_TTL_MS)],
            )
        members = {}
        for index in range(0, len(flat) - 1, 2):
            user_id, raw = text(flat[index]), flat[index + 1]
            try:
                member = UserRecord.from_dict(json.loads(raw)).member()
            except Exception:  # a corrupt record must not make the workspace unreadable
                if workspace not in self._corrupt_logged:
                    self._corrupt_logged.add(workspace)
                    log.warning("skipping corrupt presence records (logged once per workspace)",
                                extra={"workspace": str(workspace), "user_id": user_id[:200]})
                continue
            if member is not None:
                members[user_id] = member
        return Snapshot(members, EventId(text(epoch), EntryId.parse(text(last))))

    async def read_after(
        self, workspace: WorkspaceKey, after: EventId, limit: int = READ_PAGE
    ) -> list[Envelope]:
        """Up to ``limit`` retained events after ``after`` (a client's word: never taken as
        evidence that the log lost anything; an id the log cannot vouch for is
        ``HistoryGone`` for that client only)."""
        with self._unavailable():
            raw = await self._read(
                keys=self.keys.read(workspace),
                args=[str(after.entry), max(1, limit),
                      str(after.entry) if after.entry != ZERO else "", "", self._max_len],
            )
        state = LogState.parse(raw)
        if state.lost_appends:
            # What the nodes recorded (not the client's id) shows the log lost writes.
            with self._unavailable():
                await self._reader.rotate(workspace, state.epoch, seen=after.entry)
            self._liveness.request_reassert()
            raise HistoryGone(str(after))
        if state.epoch != after.epoch:
            raise HistoryGone(str(after))
        if state.lost_writes_before(after.entry) or after.entry < state.deleted \
                or state.trimmed_past(after.entry) or after.entry < state.beyond:
            # (Retention is a promise of max_len entries: Redis trims approximately, so
            # entries kept past the promise count as gone too, as on every backend.)
            raise HistoryGone(str(after))
        entries = state.entries
        # Retention is a promise of max_age seconds: an idle log is trimmed at its next append
        # only, so entries past the promise count as gone already.
        oldest_kept = int(self._clock.now() * 1000) - self._max_age_ms
        if entries and EntryId.parse(text(entries[0][0])).ms < oldest_kept:
            raise HistoryGone(str(after))
        envelopes = self._entries.envelopes(workspace, state.epoch, entries)
        if len(entries) >= limit > len(envelopes):
            # Malformed entries were skipped: read on, so that a short page still means
            # the end of the log to the caller (a replay stops at a short page).
            last = EventId(state.epoch, EntryId.parse(text(entries[-1][0])))
            envelopes += await self.read_after(workspace, last, limit - len(envelopes))
        return envelopes

    def follow(self, workspace: WorkspaceKey, after: EventId, sink: LogSink) -> Following:
        """Deliver the events after ``after`` to ``sink``, then each new one, in order."""
        return self._reader.follow(workspace, after, sink)

    # -- presence -----------------------------------------------------------------

    async def change_presence(
        self, workspace: WorkspaceKey, user_id: str, change: PresenceChange
    ) -> PresenceOutcome:
        """Changes of one user made on this node are applied in arrival order, the ones
        that arrive while a write is under way together in the next write (``Combiner``:
        one read and one script call for all of them), so any number of concurrent changes
        of one user (tabs, a service identity's streams, a mass reconnect) succeed without
        contention. Changes from other nodes race by compare-and-set: each conflict means
        another node's write succeeded, so all make progress."""
        return await self._presence_writes.submit((workspace, user_id), change)

    async def _change_all(
        self, workspace: WorkspaceKey, user_id: str, changes: list[PresenceChange]
    ) -> list[PresenceOutcome]:
        for attempt in range(CAS_ATTEMPTS):
            outcomes = await self._try_changes(workspace, user_id, changes)
            if outcomes is not None:
                return outcomes
            # Another node changed this record meanwhile: try again soon, a little apart.
            await asyncio.sleep(random.uniform(0, min(0.001 * 2 ** attempt, 0.05)))
        raise BackendUnavailable("presence change kept conflicting")

    async def _try_changes(
        self, workspace: WorkspaceKey, user_id: str, changes: list[PresenceChange]
    ) -> list[PresenceOutcome] | None:
        keys = self.keys
        with self._unavailable():
            async with self._clients.slot(), self._redis.pipeline(transaction=False) as pipe:
                pipe.get(keys.epoch(workspace))
                pipe.hget(keys.records(workspace), user_id)
                epoch, raw = await pipe.execute()
        before = UserRecord.from_dict(json.loads(raw)) if raw else None
        now = self._clock.now()
        records: list[UserRecord | None] = []
        pendings: list[list[PendingEvent]] = []
        after = before
        for change in changes:
            record = change.apply(after, now)
            pendings.append(transition(after, record, change.reason))
            records.append(record)
            after = record
        pending = [item for events in pendings for item in events]
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
            return [PresenceOutcome(record, ()) for record in records]
        expiry = after.next_expiry() if after is not None else None
        with self._unavailable():
            # Indexes other slots hold, written before the change so a crash never leaves a
            # binding or an expiry that no sweep can find.
            if expiry is not None or to_index:
                async with self._clients.slot(), self._redis.pipeline(transaction=False) as pipe:
                    for node in to_index:
                        pipe.sadd(keys.node_workspaces(node), tag)
                    if expiry is not None:
                        pipe.zadd(keys.expiring, {tag: expiry}, lt=True)
                    await pipe.execute()
            if self.node_id in to_index:
                self._indexed.add(workspace)
            bound = sorted(added | removed)
            result = await self._presence(
                keys=[keys.epoch(workspace), keys.records(workspace), keys.log(workspace),
                      keys.expiry(workspace), keys.notify(workspace), keys.mark(workspace),
                      *(keys.bound(workspace, node) for node in bound)],
                args=[
                    text(epoch) if epoch else "", secrets.token_hex(4), user_id,
                    raw or "", json.dumps(after.to_dict()) if after is not None else "",
                    repr(expiry) if expiry is not None else "",
                    *self._trim_args(int(now * 1000)),
                    len(bound), *("+" if node in added else "-" for node in bound),
                    *(value for item in pending for value in entry_fields(item, self.node_id)),
                ],
            )
            if text(result[0]) != "ok":
                return None
            if expiry is not None:
                # Again after: a sweep may have re-indexed the workspace in between.
                await self._redis.zadd(keys.expiring, {tag: expiry}, lt=True)
        envelopes = issued(workspace, text(result[1]), result[2:], pending)
        outcomes, start = [], 0
        for record, events in zip(records, pendings, strict=True):
            outcomes.append(PresenceOutcome(record, envelopes[start:start + len(events)]))
            start += len(events)
        return outcomes

    async def bound_to_node(self) -> set[tuple[WorkspaceKey, str]]:
        """The (workspace, user) pairs whose records Redis binds to this node."""
        with self._unavailable():
            tags = await self._redis.smembers(self.keys.node_workspaces(self.node_id))
            found = set()
            for tag in tags:
                workspace = parse_workspace_tag(text(tag))
                for user in await self._redis.smembers(self.keys.bound(workspace, self.node_id)):
                    found.add((workspace, text(user)))
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
            tag = text(cast(bytes, raw_tag))
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
        return changed + await self._liveness.reap_dead_nodes()

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
                    await self.change_presence(workspace, text(cast(bytes, user)), prune())
                    changed += 1
                except Exception as exc:  # one corrupt record must not keep the others alive
                    problem = problem or exc
            await self._reindex_expiry(workspace)
        except Exception as exc:
            problem = problem or exc
        return changed, problem

    async def _reindex_expiry(self, workspace: WorkspaceKey) -> None:
        """Set the workspace's score in the global index to its earliest record expiry.

        The index and the workspace live in different slots (on a cluster, on different
        primaries): no transaction spans both. So the head is read again after the write;
        a change that lowered it meanwhile is written back (``LT``), and a change after the
        second read writes its own expiry (``change_presence`` does, after its script)."""
        tag = workspace_tag(workspace)
        expiry, index = self.keys.expiry(workspace), self.keys.expiring
        with self._unavailable():
            head = await self._redis.zrange(expiry, 0, 0, withscores=True)
            if head:
                await self._redis.zadd(index, {tag: head[0][1]})
            else:
                await self._redis.zrem(index, tag)
            again = await self._redis.zrange(expiry, 0, 0, withscores=True)
            if again and (not head or again[0][1] < head[0][1]):
                await self._redis.zadd(index, {tag: again[0][1]}, lt=True)

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
