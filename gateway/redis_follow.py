"""Following many workspace logs through a few connections per Redis primary.

A node follows every workspace some local client watches: thousands of Redis streams.
Rather than one blocking ``XREAD`` (and one connection) per stream, every append also
publishes on the workspace's sharded notification channel (``SPUBLISH``, in the same
script, in the workspace's slot); a node subscribes to the channels of the workspaces it
follows, one pub/sub connection per primary (``ShardListener``), and reads the logs that
were notified in batches (``LogReader``: one pipeline per batch on one Redis). Idle
workspaces cost nothing: no wake-ups, no commands.

A caught-up follower reads nothing: the appending script publishes the entries themselves
(``Notice``: the epoch, the log's last id before them, and the entries as ``XRANGE`` gives
them), and a follower whose cursor is that id, in that epoch, delivers them straight from
the notification. Every other notification is only a hint to read — one a follower is
not at the head for (it is behind, missed one, sees another epoch, has a read under way),
one announcing entries too large to carry, one that cannot be parsed, a plain ``XADD``'s
— and the reader's cursor, not the notification, says what was delivered, so a lost or
repeated notification never loses or repeats an event:

* a log is read once right after its subscription is confirmed (nothing appended while
  the subscription was being made is missed), and every log of a shard once more after
  its pub/sub connection comes back (notifications sent meanwhile are lost);
* a slow audit reads every followed log about once a minute (at most ``AUDIT_RATE`` a
  second), for what no notification announces: a plain ``XADD`` by a service that does
  not publish, a Redis that lost its data without dropping its connections.

Each read also checks what the log says about the follower's position (``judge``):
delivery goes on only while it is exact; otherwise the follower's sink is told its
history is gone (it resyncs from a fresh snapshot) and, when the log lost entries this
node had read, the workspace gets a new epoch so every node and client resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgpack
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.broker import Following, LogSink
from gateway.log_entries import EntryReader, text
from gateway.redis_topology import RedisClients, Shard
from gateway.tasks import Backoff, pause, raise_if_cancelled, stop
from protocol.envelope import ZERO, EntryId, Envelope, EventId, WorkspaceKey

log = logging.getLogger(__name__)

READ_PAGE: Final = 256  # entries per read of one log; a longer backlog is read page by page
READ_BATCH: Final = 256  # logs read per round trip
AUDIT_PERIOD: Final = 60.0  # every followed log is read at least this often...
AUDIT_RATE: Final = 50  # ...unless that means more than this many reads a second
# A pub/sub connection silent this long is sent a PING; silent as long again, it is taken
# for dead and made anew. A link cut without a reset (a partition) is otherwise noticed only
# by the kernel's TCP timeout, many minutes later, if ever (nothing is sent on it).
SILENCE: Final = 2.0
BACKOFF_CAP: Final = 2.0


@dataclass(frozen=True, slots=True)
class LogState:
    """Where a log stands and a page of its entries, as ``read.lua`` answers."""

    epoch: str  # "" = no log
    last: EntryId  # last-generated-id
    deleted: EntryId  # max-deleted-entry-id (XDEL; trimming does not move it)
    first: EntryId  # the first entry still in the stream (ZERO: none)
    holds: bool  # the stream has the entry the caller asked about
    added: int  # entries ever added
    length: int  # entries in the stream now
    entries: list[Any]
    beyond: EntryId  # the newest entry kept past the retention promise (ZERO: none)
    mark: EntryId  # the last id a gateway node appended (ZERO: none)

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> LogState:
        epoch, last, deleted, first, holds, added, length, entries, beyond, mark = raw
        return cls(text(epoch), EntryId.parse(text(last)), EntryId.parse(text(deleted)),
                   EntryId.parse(text(first)), bool(holds), int(added), int(length), entries,
                   EntryId.parse(text(beyond)), EntryId.parse(text(mark)))

    @property
    def lost_appends(self) -> bool:
        """The log ends before the last entry a gateway node appended to it: Redis lost
        writes (the mark, written with every append, survived them)."""
        return self.mark > self.last

    @property
    def removed(self) -> int:
        """Entries ever removed from the stream (trimmed or deleted)."""
        return self.added - self.length

    def trimmed_past(self, position: EntryId) -> bool:
        """True when entries after ``position`` may have been trimmed: something was removed
        and ``position`` is older than every entry the stream still has."""
        if not self.removed or position >= self.last:
            return False
        return self.first == ZERO or position < self.first

    def lost_writes_before(self, seen: EntryId) -> bool:
        """True when the log no longer has an entry it had: ``seen`` (read from this log in
        this epoch) is above its last id, or missing from inside the retained range without
        having been deleted. Neither trimming (from the head) nor ``XDEL`` (it moves
        ``deleted``) explains that: Redis lost writes while the epoch survived."""
        if seen > self.last:
            return True
        return not self.holds and ZERO < self.first <= seen and seen > self.deleted


@dataclass(frozen=True, slots=True)
class Notice:
    """What an append published (``gateway/lua/_log.lua``): the entries appended right
    after ``previous`` in ``epoch``, after which the log had ever had ``added`` entries."""

    epoch: str
    previous: EntryId
    added: int
    last: EntryId
    entries: list[Any]  # as XRANGE gives them: [id, [field, value, ...]]

    @classmethod
    def parse(cls, payload: Any) -> Notice | None:
        """The notice in a notification; None for anything else (a plain id, a rotation,
        a service's empty message, bytes that are not a well-formed notice)."""
        if not isinstance(payload, bytes) or not payload or not 0x90 <= payload[0] <= 0x9F:
            return None  # (a msgpack array of up to 15 items; an id starts with a digit)
        try:
            epoch, previous, added, entries = msgpack.unpackb(payload, raw=True)
            position = EntryId.parse(text(previous))
            last = position
            for entry_id, fields in entries:
                entry = EntryId.parse(text(entry_id))
                if entry <= last or not isinstance(fields, list):
                    return None
                last = entry
            if not entries or not isinstance(added, int):
                return None
            return cls(text(epoch), position, added, last, entries)
        except Exception:
            return None


# What a read means for a follower at (epoch, cursor), having consumed ``consumed`` of the
# log's ``added`` entries (None: not known yet).
DELIVER: Final = "deliver"
GONE: Final = "gone"  # history after the cursor is not what the follower saw: resync
EPOCH_CHANGED: Final = "epoch_changed"  # the log was lost or rotated: resync and re-assert
LOST_WRITES: Final = "lost_writes"  # the log lost entries this node read: new epoch, resync


def judge(epoch: str, cursor: EntryId, consumed: int | None, state: LogState) -> str:
    """Pure: whether a follower may take ``state.entries`` as the events after its cursor."""
    if state.epoch != epoch:
        if cursor == ZERO and not state.removed:
            # Nothing was read in the old epoch (the log's epoch, made by a read of a
            # workspace that had no log, expired before its first entry): start in this one.
            return DELIVER
        return EPOCH_CHANGED
    if not state.epoch:
        return DELIVER  # still no log
    if state.lost_appends or state.lost_writes_before(cursor):
        return LOST_WRITES
    if state.deleted > cursor:
        return GONE  # an entry after the cursor was deleted before it was read
    if consumed is not None:
        # Trimming removes from the head: every removed entry must be one already consumed.
        return GONE if state.removed > consumed else DELIVER
    return GONE if state.trimmed_past(cursor) else DELIVER


class LogKeys(Protocol):
    """The keys of a workspace log (``broker_redis.Keys``)."""

    def log(self, workspace: WorkspaceKey) -> str: ...
    def epoch(self, workspace: WorkspaceKey) -> str: ...
    def notify(self, workspace: WorkspaceKey) -> str: ...
    def mark(self, workspace: WorkspaceKey) -> str: ...

    def read(self, workspace: WorkspaceKey) -> list[str]:
        """The keys ``read.lua`` takes."""


class _Follower:
    """One sink following one workspace log."""

    __slots__ = ("_reader", "closed", "consumed", "cursor", "epoch", "moves", "paused", "reading",
                 "sink", "workspace")

    def __init__(self, reader: LogReader, workspace: WorkspaceKey, after: EventId,
                 sink: LogSink) -> None:
        self._reader = reader
        self.workspace = workspace
        self.sink = sink
        self.epoch = after.epoch
        self.cursor = after.entry
        self.consumed: int | None = 0 if after.entry == ZERO else None
        self.paused = False
        self.closed = False
        self.reading = False  # a read of its log is under way: notices wait for it
        self.moves = 0  # a read issued before a move answers about another position

    def move_to(self, position: EventId) -> None:
        if self.closed:
            return
        self.moves += 1
        self.epoch, self.cursor = position.epoch, position.entry
        self.consumed = 0 if position.entry == ZERO else None
        self.paused = False
        self._reader.mark(self)

    def check(self) -> None:
        self._reader.mark(self)

    def takes(self, notice: Notice) -> bool:
        """Whether ``notice``'s entries are exactly the ones after this follower's cursor."""
        return (not self.closed and not self.paused and not self.reading
                and self.cursor == notice.previous and self.epoch == notice.epoch)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._reader.unfollow(self)


class ShardListener:
    """The notification channels of one primary, on one pub/sub connection.

    Wanted channels are (re)subscribed whenever the connection is (re)made; each
    confirmation marks its followers for a read. A channel the server drops by itself
    (its slot moved) goes back to the reader, which finds its new primary. A connection
    that neither delivers nor answers a PING for twice ``SILENCE`` is reconnected (every
    log of the shard is then read again)."""

    def __init__(self, reader: LogReader, shard: Shard) -> None:
        self._reader = reader
        self.shard = shard
        self.channels: set[str] = set()
        self._pending: dict[str, bool] = {}  # channel -> subscribe (True) / unsubscribe
        self._kick = asyncio.Event()
        self._connected = False
        self._pubsub: Any = None
        self._task = asyncio.get_running_loop().create_task(
            self._listen(), name=f"redis notifications {shard.name}")
        self._sender = asyncio.get_running_loop().create_task(
            self._send(), name=f"redis subscriptions {shard.name}")

    def want(self, channel: str) -> None:
        self.channels.add(channel)
        self._pending[channel] = True
        self._kick.set()

    def drop(self, channel: str) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self._pending[channel] = False
            self._kick.set()

    async def close(self) -> None:
        await stop(self._sender)
        await stop(self._task)
        await self._discard()

    async def _discard(self) -> None:
        pubsub, self._pubsub, self._connected = self._pubsub, None, False
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _send(self) -> None:
        """Send the pending (un)subscriptions, one channel a command (on a cluster, one
        command may not name channels of two slots), while connected."""
        while True:
            raise_if_cancelled()
            await self._kick.wait()
            self._kick.clear()
            while self._pending and self._connected:
                channel, subscribe = next(iter(self._pending.items()))
                del self._pending[channel]
                try:
                    if subscribe:
                        await self._pubsub.ssubscribe(channel)
                    else:
                        await self._pubsub.sunsubscribe(channel)
                except Exception:
                    # The listener sees the broken connection too, and resubscribes all.
                    break
                finally:
                    raise_if_cancelled()

    async def _listen(self) -> None:
        backoff = Backoff(0.1, BACKOFF_CAP)
        while True:
            try:
                pubsub = self._pubsub = self.shard.pubsub()
                await pubsub.connect()
                self._connected = True
                self._pending = dict.fromkeys(self.channels, True)
                self._kick.set()
                if backoff.recovered():
                    log.info("redis notifications flowing again", extra={"shard": self.shard.name})
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled()
                await self._discard()
                if backoff.failed():
                    log.warning("redis notification connection failed; reconnecting with backoff",
                                extra={"shard": self.shard.name,
                                       "problem": f"{type(exc).__name__}: {str(exc)[:200]}"})
                await backoff.pause()
                # Notifications may have been missed: read every log of this shard again once
                # resubscribed. On a cluster the slots may have moved: re-home every channel.
                await self._reader.rehome(self)

    async def _receive(self, pubsub: PubSub) -> None:
        """Handle what the connection delivers until it fails or falls silent (raised)."""
        pinged = False
        while True:
            try:
                message = await pubsub.get_message(timeout=SILENCE)
            finally:
                raise_if_cancelled()
            if message is not None:
                pinged = False
                self._handle(message)
            elif pinged:
                raise RedisConnectionError(f"no answer to a PING in {SILENCE} s")
            else:
                await pubsub.ping()
                pinged = True

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = text(message["channel"]) if message.get("channel") is not None else ""
        if kind == "smessage":
            if channel in self.channels:
                self._reader.notified(channel, message["data"])
        elif kind == "ssubscribe":
            if channel in self.channels:
                self._reader.notified(channel)
        elif kind == "sunsubscribe" and channel in self.channels and channel not in self._pending:
            # Dropped by the server (its slot moved to another primary).
            self.channels.discard(channel)
            self._reader.moved(channel)


class LogReader:
    """Delivers the entries of every followed workspace log to its sinks, in order.

    ``follow`` and ``Following.close`` never wait for Redis. Reads are batched: one
    round trip per ``READ_BATCH`` notified logs. Redis failures are retried with capped
    backoff (followers keep their cursors; nothing is skipped)."""

    def __init__(
        self, clients: RedisClients, *, keys: LogKeys,
        read_script: AsyncScript, rotate_script: AsyncScript, entries: EntryReader,
        on_epoch_change: Callable[[], None], unavailable: tuple[type[BaseException], ...],
        audit_period: float = AUDIT_PERIOD,
    ) -> None:
        if audit_period <= 0:
            raise ValueError("audit_period must be positive")
        self._audit_period = audit_period
        self._clients = clients
        self._keys = keys
        self._read, self._rotate = read_script, rotate_script
        self._entries = entries
        self._on_epoch_change = on_epoch_change
        self._unavailable = unavailable
        self._followers: dict[WorkspaceKey, set[_Follower]] = {}
        self._channels: dict[str, WorkspaceKey] = {}
        self._listeners: dict[str, ShardListener] = {}
        self._dirty: dict[_Follower, None] = {}
        self._wake = asyncio.Event()
        self.reads = 0  # logs read (each a read.lua call)
        self.notices_delivered = 0  # batches a follower delivered from a notice, reading nothing
        self._drainer: asyncio.Task[None] | None = None
        self._auditor: asyncio.Task[None] | None = None

    # -- following ----------------------------------------------------------------

    def follow(self, workspace: WorkspaceKey, after: EventId, sink: LogSink) -> Following:
        """Deliver to ``sink`` every event after ``after``, then each new one, until closed."""
        self._start_tasks()
        follower = _Follower(self, workspace, after, sink)
        followers = self._followers.get(workspace)
        if followers is None:
            followers = self._followers[workspace] = set()
            channel = self._keys.notify(workspace)
            self._channels[channel] = workspace
            self._listener_for(channel).want(channel)  # its confirmation marks it for a read
        else:
            self.mark(follower)
        followers.add(follower)
        return follower

    def unfollow(self, follower: _Follower) -> None:
        self._dirty.pop(follower, None)
        followers = self._followers.get(follower.workspace)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            del self._followers[follower.workspace]
            channel = self._keys.notify(follower.workspace)
            self._channels.pop(channel, None)
            for listener in self._listeners.values():
                listener.drop(channel)

    @property
    def followed(self) -> int:
        return len(self._followers)

    def mark(self, follower: _Follower) -> None:
        if not follower.closed and not follower.paused:
            self._dirty[follower] = None
            self._wake.set()

    def notified(self, channel: str, payload: Any = None) -> None:
        """A notification on ``channel``: its followers at the head deliver what it carries;
        the others read their log."""
        workspace = self._channels.get(channel)
        if workspace is None:
            return
        notice = Notice.parse(payload)
        batch: list[Envelope] | None = None
        for follower in self._followers.get(workspace, ()):
            if notice is None or not follower.takes(notice):
                self.mark(follower)
                continue
            if batch is None:  # parsed once, for every follower at the head
                batch = self._entries.envelopes(workspace, notice.epoch, notice.entries)
            follower.cursor, follower.consumed = notice.last, notice.added
            self.notices_delivered += 1
            if batch:
                self._hand(follower, batch)

    def moved(self, channel: str) -> None:
        """A channel whose primary dropped it: subscribe it where its slot lives now."""
        if channel in self._channels:
            self._listener_for(channel).want(channel)

    async def rehome(self, listener: ShardListener) -> None:
        """After ``listener``'s connection failed: learn the topology again and subscribe
        each of its channels on its slot's primary (the same one, on one Redis)."""
        with contextlib.suppress(Exception):
            await self._clients.refresh()
        channels = [channel for channel in listener.channels if channel in self._channels]
        for channel in channels:
            home = self._listener_for(channel)
            if home is not listener:
                listener.channels.discard(channel)
                home.want(channel)

    def _listener_for(self, channel: str) -> ShardListener:
        name = self._clients.shard_name(channel)
        listener = self._listeners.get(name)
        if listener is None:
            listener = self._listeners[name] = ShardListener(self, self._clients.shard(name))
        return listener

    # -- reading ------------------------------------------------------------------

    def _start_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain(), name="redis log reader")
            self._auditor = loop.create_task(self._audit(), name="redis log audit")

    async def close(self) -> None:
        await stop(self._auditor)
        await stop(self._drainer)
        self._drainer = self._auditor = None
        for listener in list(self._listeners.values()):
            await listener.close()
        self._listeners.clear()

    async def _drain(self) -> None:
        backoff = Backoff(0.05, BACKOFF_CAP)
        while True:
            raise_if_cancelled()  # a cancellation redis-py absorbed in the last read
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                batch = []
                for follower in self._dirty:
                    batch.append(follower)
                    if len(batch) >= READ_BATCH:
                        break
                for follower in batch:
                    del self._dirty[follower]
                try:
                    retry = await self._read_batch(batch)
                except self._unavailable:
                    raise_if_cancelled()
                    retry = batch
                except Exception:
                    raise_if_cancelled()
                    log.exception("reading followed logs failed; retrying")
                    retry = batch
                if not retry:
                    if backoff.recovered():
                        log.info("reading followed logs again")
                    continue
                for follower in retry:
                    self.mark(follower)
                if backoff.failed():
                    log.warning("cannot read followed logs; retrying with backoff")
                await backoff.pause()

    async def _read_batch(self, batch: list[_Follower]) -> list[_Follower]:
        """Read each follower's log after its cursor; returns those to read again later."""
        calls = []
        moves = [follower.moves for follower in batch]
        for follower in batch:
            cursor = str(follower.cursor)
            calls.append((
                self._keys.read(follower.workspace),
                [cursor, READ_PAGE, cursor if follower.cursor != ZERO else "",
                 secrets.token_hex(4), ""],
            ))
        for follower in batch:
            follower.reading = True  # notices for it wait (a read again) until its answer is in
        try:
            results = await self._clients.run_scripts(self._read, calls)
            self.reads += len(batch)
            retry = []
            for follower, result, moved in zip(batch, results, moves, strict=True):
                if follower.closed or follower.paused or follower.moves != moved:
                    # (A follower moved since is marked for a read at its new position: this
                    # answer, about the old one, would look like lost writes or a gap.)
                    continue
                if isinstance(result, self._unavailable):
                    retry.append(follower)
                    continue
                if isinstance(result, BaseException):
                    log.warning("cannot read a followed log; retrying",
                                extra={"workspace": str(follower.workspace),
                                       "problem": f"{type(result).__name__}: {str(result)[:200]}"})
                    retry.append(follower)
                    continue
                await self._apply(follower, LogState.parse(result))
            return retry
        finally:
            for follower in batch:
                follower.reading = False

    async def _apply(self, follower: _Follower, state: LogState) -> None:
        verdict = judge(follower.epoch, follower.cursor, follower.consumed, state)
        if verdict == DELIVER:
            self._advance(follower, state)
            return
        if verdict == LOST_WRITES:
            await self.rotate(follower.workspace, state.epoch, seen=follower.cursor)
        if verdict in (LOST_WRITES, EPOCH_CHANGED):
            # The records may have gone back in time too: what this node holds is re-asserted.
            self._on_epoch_change()
        else:
            log.warning("a followed log lost history this node had not read; resyncing",
                        extra={"workspace": str(follower.workspace), "cursor": str(follower.cursor)})
        follower.paused = True
        try:
            follower.sink.history_gone()
        except Exception:
            log.exception("a log sink failed", extra={"workspace": str(follower.workspace)})

    async def rotate(self, workspace: WorkspaceKey, epoch: str, *, seen: EntryId) -> None:
        """Give a log that lost writes a new epoch (unless another node just did), so that
        every node and client resyncs instead of reading on past a silent gap."""
        keys = self._keys
        rotated = text(await self._rotate(
            keys=[keys.epoch(workspace), keys.notify(workspace), keys.mark(workspace)],
            args=[epoch, secrets.token_hex(4)],
        ))
        log.warning("the workspace log lost entries a node had appended or read; new epoch",
                    extra={"workspace": str(workspace), "seen": str(seen),
                           "old_epoch": epoch, "epoch": rotated})

    def _advance(self, follower: _Follower, state: LogState) -> None:
        if not state.epoch:
            return
        follower.epoch = state.epoch
        entries = state.entries
        if len(entries) < READ_PAGE:
            follower.consumed = state.added  # read through the last entry
        elif follower.consumed is not None:
            follower.consumed += len(entries)
        if not entries:
            return
        follower.cursor = EntryId.parse(text(entries[-1][0]))
        if len(entries) >= READ_PAGE:
            self.mark(follower)  # more to read: after the other logs of this round
        batch = self._entries.envelopes(follower.workspace, state.epoch, entries)
        if batch:
            self._hand(follower, batch)

    @staticmethod
    def _hand(follower: _Follower, batch: list[Envelope]) -> None:
        try:
            follower.sink.deliver(batch)
        except Exception:
            log.exception("a log sink failed", extra={"workspace": str(follower.workspace)})

    async def _audit(self) -> None:
        """Read every followed log about once per audit period (at most ``AUDIT_RATE`` a
        second), in case a change came without a notification."""
        queue: list[_Follower] = []
        budget = 0.0
        while True:
            await pause(1.0)
            budget = min(budget + len(self._followers) / self._audit_period, AUDIT_RATE)
            if budget < 1:
                continue
            if not queue:
                queue = [f for followers in self._followers.values() for f in followers]
            share = int(budget)
            budget -= share
            for follower in queue[-share:]:
                self.mark(follower)
            del queue[-share:]
