"""Node liveness in Redis: this node's heartbeat, and the removal of dead peers' sessions.

The decisions are ``gateway.liveness`` (pure); this module does the I/O. A node's keys
(``{node:<id>}``) live in one slot, a workspace's in another: every script touches one
of them, so liveness works across the shards of a Redis Cluster. A dead node's sessions
are found through its workspace index and removed workspace by workspace with the same
presence change any node makes (``presence.node_reaped``): exactly one
``presence.left`` per user who had nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from gateway.broker import BackendUnavailable
from gateway.liveness import Heartbeat, claim_lifetime_ms, dead_peers, may_forget, may_judge_peers
from gateway.log_entries import text
from gateway.presence import PresenceChange, node_reaped
from gateway.tasks import Backoff, pause, raise_if_cancelled, stop
from protocol.envelope import WorkspaceKey

log = logging.getLogger(__name__)

SWEEP_BATCH: Final = 100  # known nodes looked at per sweep
REAP_ROUNDS: Final = 10  # reads of a dead node's workspace index per reap
REASSERT_BACKOFF_CAP: Final = 5.0

ChangePresence = Callable[[WorkspaceKey, str, PresenceChange], Awaitable[Any]]


class NodeLiveness:
    """This node's heartbeat and re-assertions, and the reaping of dead peers.

    ``guard`` turns Redis failures into ``BackendUnavailable`` (the broker's context
    manager), ``slot`` holds a command slot around a pipeline (``RedisClients.slot``);
    ``change_presence`` is the broker's. The heartbeat and the node's registration go
    through ``reserved`` (``RedisClients.liveness``), never waiting behind requests; the
    reaping of peers is ordinary work on ``redis``."""

    def __init__(self, *, redis: Any, reserved: Any,
                 slot: Callable[[], contextlib.AbstractAsyncContextManager[None]], keys: Any,
                 scripts: Any, node_id: str, incarnation: str,
                 node_timeout: float, guard: Callable[[], contextlib.AbstractContextManager[None]],
                 change_presence: ChangePresence, parse_tag: Callable[[str], WorkspaceKey],
                 unavailable: tuple[type[BaseException], ...]) -> None:
        self._redis = redis
        self._reserved = reserved
        self._slot = slot
        self._keys = keys
        self._heartbeat_script, self._claim_script = scripts
        self.node_id = node_id
        self.incarnation = incarnation
        self._node_timeout = node_timeout
        self._guard = guard
        self._change_presence = change_presence
        self._parse_tag = parse_tag
        self._unavailable = unavailable
        self._beat_errors: tuple[type[BaseException], ...] = (*unavailable, BackendUnavailable)
        self._reassert: Callable[[], Awaitable[None]] | None = None
        self._before_reassert: Callable[[], None] = lambda: None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reassert_task: asyncio.Task[None] | None = None
        self._reassert_wanted = False
        self._nodes_cursor = 0  # SSCAN cursor over the known nodes, carried across sweeps
        self._beating = True  # the last beat reached Redis
        self._recovered_at: float | None = None  # loop.time() of the first beat after failed ones

    def on_reassert(self, callback: Callable[[], Awaitable[None]],
                    before: Callable[[], None]) -> None:
        self._reassert, self._before_reassert = callback, before

    async def start(self) -> None:
        """Reap what a previous process with this node id left, register, start beating."""
        with self._guard():
            await self.reap(self.node_id, force=True)
            await self._reserved.sadd(self._keys.nodes, self.node_id)
            await self._beat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="redis heartbeat")

    async def close(self) -> None:
        """Stop beating and let the peers reap at once whatever this node still holds."""
        task, self._reassert_task = self._reassert_task, None
        await stop(task)
        if self._heartbeat_task is not None:
            await stop(self._heartbeat_task)
            self._heartbeat_task = None
            with contextlib.suppress(*self._unavailable):
                await self._reserved.delete(self._keys.alive(self.node_id))

    # -- heartbeat -------------------------------------------------------------------

    async def _beat(self) -> str:
        return text(await self._heartbeat_script(
            keys=[self._keys.alive(self.node_id), self._keys.reaping(self.node_id)],
            args=[self.incarnation, int(self._node_timeout * 1000)],
            client=self._reserved,
        ))

    async def _heartbeat_loop(self) -> None:
        """Beat every node_timeout/3, whatever else runs; re-assertions run beside it
        (``request_reassert``), however long they take. The period counts from when a beat
        was sent: over a slow link the round trip does not stretch the gap between two
        beats reaching Redis (a gap past ``node_timeout`` is a false reaping)."""
        heartbeat = Heartbeat(self._node_timeout / 3)
        while True:
            failure: Exception | None = None  # (an unforeseen one, logged with its traceback)
            started = time.monotonic()
            try:
                # Through the guard: a beat that finds its connection dead or on a demoted
                # primary (READONLY) drops the idle pooled connections, so the next beat
                # reconnects even on a node whose clients write nothing.
                with self._guard():
                    answer = await self._beat()
                self._beat_reached_redis(True)
                step = heartbeat.answered(answer)
            except self._beat_errors:
                raise_if_cancelled()
                self._beat_reached_redis(False)
                step = heartbeat.failed(unavailable=True)
            except Exception as exc:  # an unforeseen failure must not stop the heartbeat for good
                raise_if_cancelled()
                step = heartbeat.failed(unavailable=False)
                failure = exc
            if step.log is not None:
                level, message = step.log
                getattr(log, level)(message, extra={"node_id": self.node_id},
                                    exc_info=failure if level == "exception" else None)
            if step.reassert:
                self.request_reassert()
            await pause(max(0.0, step.sleep - (time.monotonic() - started)))

    def _beat_reached_redis(self, reached: bool) -> None:
        if reached and not self._beating:
            self._recovered_at = asyncio.get_running_loop().time()
        self._beating = reached

    # -- re-assertion ------------------------------------------------------------------

    def request_reassert(self) -> None:
        """Re-assert what this node holds, soon, in the background: one run at a time; a
        request made while one runs makes one more run after it."""
        self._reassert_wanted = True
        if self._reassert_task is None or self._reassert_task.done():
            self._reassert_task = asyncio.create_task(self._reassert_loop(), name="redis re-assert")

    async def _reassert_loop(self) -> None:
        backoff = Backoff(0.1, REASSERT_BACKOFF_CAP)
        while self._reassert_wanted:
            self._reassert_wanted = False
            try:
                self._before_reassert()  # the node's workspace index may have lost entries
                with self._guard():
                    await self._reserved.sadd(self._keys.nodes, self.node_id)
                if self._reassert is not None:
                    await self._reassert()
            except Exception as exc:
                raise_if_cancelled()
                self._reassert_wanted = True
                if backoff.failed():
                    if isinstance(exc, BackendUnavailable):
                        log.warning("re-assertion failed (redis unavailable); retrying with backoff",
                                    extra={"node_id": self.node_id})
                    else:
                        log.exception("re-assertion failed; retrying with backoff",
                                      extra={"node_id": self.node_id})
                await backoff.pause()
                continue
            if backoff.recovered():
                log.info("re-assertion done", extra={"node_id": self.node_id})

    # -- reaping -------------------------------------------------------------------------

    async def reap_dead_nodes(self) -> int:
        """Reap the dead among the next ``SWEEP_BATCH`` or so known nodes: a cursor
        (``SSCAN``) carried from sweep to sweep visits every node, however many are alive.
        None while this node's own heartbeat fails or has just recovered (``may_judge_peers``)."""
        with self._guard():
            cursor, found = await self._redis.sscan(self._keys.nodes, self._nodes_cursor,
                                                    count=SWEEP_BATCH)
            self._nodes_cursor = int(cursor)
            nodes = sorted({text(node) for node in found} - {self.node_id})
            if not nodes:
                return 0
            # One command a node (their keys live in as many slots as there are nodes), in
            # one pipeline (on a cluster, one per primary).
            async with self._slot(), self._redis.pipeline(transaction=False) as pipe:
                for node in nodes:
                    pipe.exists(self._keys.alive(node))
                alive = [bool(found) for found in await pipe.execute()]
        if not may_judge_peers(beating=self._beating, now=asyncio.get_running_loop().time(),
                               recovered_at=self._recovered_at, node_timeout=self._node_timeout):
            return 0
        changed = 0
        for node in dead_peers(self.node_id, nodes, alive):
            changed += await self.reap(node, force=False)
        return changed

    async def reap(self, node_id: str, *, force: bool) -> int:
        """Remove every session and stream bound to ``node_id``, if this node wins the claim
        to do it.

        The node may be paused rather than dead, and index new workspaces while this runs:
        only the workspaces processed leave its index, and the reaper goes on until the
        index is empty (at most ``REAP_ROUNDS`` reads). A node that was reaped re-asserts
        afterwards (its heartbeat tells it), which indexes again what it still holds."""
        keys = self._keys
        claim_ms = claim_lifetime_ms(self._node_timeout)
        with self._guard():
            claimed = await self._claim_script(
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
                with self._guard():
                    tags = await self._redis.smembers(keys.node_workspaces(node_id)) - failed
                if not tags:
                    break
                for tag in tags:
                    with self._guard():
                        await self._redis.pexpire(keys.reaping(node_id), claim_ms)
                    try:
                        changed += await self._reap_workspace(node_id, text(tag))
                    except BackendUnavailable:
                        raise
                    except Exception:  # e.g. a corrupt record: the others are still reaped
                        log.exception("cannot remove a dead node's sessions in one workspace; "
                                      "left for the next sweep",
                                      extra={"dead_node": node_id, "workspace_tag": text(tag)[:200]})
                        failed.add(tag)
                        continue
                    with self._guard():
                        await self._redis.srem(keys.node_workspaces(node_id), tag)
                    done.add(tag)
            with self._guard():
                index_left = bool(await self._redis.exists(keys.node_workspaces(node_id)))
                if may_forget(force=force, failed=bool(failed), index_left=index_left):
                    await self._redis.srem(keys.nodes, node_id)
                await self._redis.delete(keys.reaping(node_id))
        except BaseException:
            # Leave the claim to expire only if Redis is gone; otherwise let another try now.
            with contextlib.suppress(*self._unavailable):
                await self._redis.delete(keys.reaping(node_id))
            raise
        if done and not force:
            log.warning("removed the sessions of a node that stopped heartbeating",
                        extra={"dead_node": node_id, "workspaces": len(done), "left_events": changed})
        return changed

    async def _reap_workspace(self, node_id: str, tag: str) -> int:
        workspace = self._parse_tag(tag)
        with self._guard():
            users = await self._redis.smembers(self._keys.bound(workspace, node_id))
        changed = 0
        for user in users:
            outcome = await self._change_presence(workspace, text(user), node_reaped(node_id))
            changed += len(outcome.events)
        return changed
