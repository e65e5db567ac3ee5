"""Which Redis the gateway talks to, chosen by the URL's scheme (SPEC §8), and its connections.

* ``redis://host:port/db``, ``rediss://…``, ``unix://…`` — one Redis;
* ``redis+cluster://host:port[,host:port…]`` (``rediss+cluster://`` with TLS) — Redis
  Cluster: the listed nodes are seeds, the rest is discovered (redis-py's cluster client);
* ``redis+sentinel://host:port[,host:port…]/<service>[/db]`` — the primary a set of
  Sentinels names, followed through failovers (redis-py's Sentinel client).

Whatever the topology, a node holds a bounded number of connections per Redis primary:
at most ``max_connections`` for commands (a caller waits up to ``pool_wait`` for one, then
gets a connection error) plus one per primary for the notifications of the logs it
follows (``Shard.pubsub``); with Sentinel, one more to a sentinel, which announces
failovers. Credentials in the URL go to redis-py only; ``describe`` gives a URL safe to log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from gateway.tasks import Backoff, raise_if_cancelled, stop

log = logging.getLogger(__name__)

SCHEMES: Final = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel",
                  "rediss+sentinel")
DEFAULT_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
SWITCH_CHANNEL: Final = "+switch-master"  # what sentinels publish when they name a new primary
REPLICA_CHECK: Final = 2.0  # how often a node asks the sentinel whether a replica is in sync


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A parsed ``--redis-url``."""

    kind: str  # "single", "cluster" or "sentinel"
    url: str  # as given (single: handed to redis-py as is)
    hosts: tuple[tuple[str, int], ...] = ()  # cluster seeds or sentinels
    service: str = ""  # sentinel: the monitored primary's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisUrl:
        """Raises ``ValueError`` with a message fit for an operator (never the password)."""
        scheme, _, rest = url.partition("://")
        if not rest or scheme not in SCHEMES:
            raise ValueError("unsupported Redis URL (use redis://, rediss://, unix://, "
                             "redis+cluster://host:port[,host:port...] or "
                             "redis+sentinel://host:port[,host:port...]/service[/db])")
        if scheme in ("redis", "rediss", "unix"):
            return cls("single", url)
        userinfo, _, location = rest.rpartition("@")
        username = password = None
        if userinfo:
            user, has_password, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if has_password else None
        hostlist, _, path = location.partition("/")
        default_port = DEFAULT_SENTINEL_PORT if "sentinel" in scheme else DEFAULT_PORT
        hosts = tuple(_host_port(item, default_port) for item in hostlist.split(",") if item)
        if not hosts:
            raise ValueError(f"{scheme}:// needs at least one host:port")
        parts = [part for part in path.split("/") if part]
        if "cluster" in scheme:
            if parts:
                raise ValueError("a Redis Cluster URL takes no path (a cluster has database 0 only)")
            return cls("cluster", url, hosts, username=username, password=password,
                       tls=scheme.startswith("rediss"))
        if not parts or len(parts) > 2:
            raise ValueError("a Sentinel URL names the service: redis+sentinel://host:port/<service>[/db]")
        db = _integer(parts[1], "database") if len(parts) == 2 else 0
        return cls("sentinel", url, hosts, unquote(parts[0]), db, username, password,
                   tls=scheme.startswith("rediss"))

    def describe(self) -> str:
        """The URL without credentials, for logs."""
        if self.kind == "single":
            parts = urlsplit(self.url)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{host}{port}{parts.path}"
        hosts = ",".join(f"{host}:{port}" for host, port in self.hosts)
        tail = f"/{self.service}/{self.db}" if self.kind == "sentinel" else ""
        return f"redis+{self.kind}://{hosts}{tail}"


def _names(announcement: bytes | str, service: str) -> bool:
    """Whether a ``+switch-master`` message (``<service> <old ip> <old port> <new ip> <new
    port>``) is about ``service``."""
    text = announcement.decode(errors="replace") if isinstance(announcement, bytes) else announcement
    return text.split(" ", 1)[0] == service


def _in_sync(replica: dict[str, Any]) -> bool:
    """Whether a sentinel's view of a replica (``SENTINEL REPLICAS``) says it could take over
    with the primary's data: up, and its replication link established."""
    down = replica.get("is_sdown") or replica.get("is_odown") or replica.get("is_disconnected")
    return not down and replica.get("master-link-status") == "ok"


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6 address]:port``."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, ""
    return host, _integer(port, "port") if port else default_port


def _integer(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the {what} in the Redis URL must be a number")
    return int(text)


class _LimitedCluster(RedisCluster):
    """redis-py's cluster client raises at once when a node's pool is exhausted; this one
    makes callers wait (at most ``pool_wait``) for one of ``max_connections`` slots, as
    ``BlockingConnectionPool`` does for one Redis. Every command holds one slot, so no node
    ever sees more than ``max_connections`` command connections from this node."""

    def __init__(self, *args: Any, pool_wait: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(kwargs["max_connections"])
        self._pool_wait = pool_wait

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._pool_wait):
                await self._slots.acquire()
        except TimeoutError:
            raise RedisConnectionError("no free Redis connection (cluster)") from None
        try:
            yield
        finally:
            self._slots.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.slot():
            return await super().execute_command(*args, **kwargs)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The Sentinel-managed pool (follows failovers), waiting for a free connection."""


@dataclass(frozen=True, slots=True)
class Shard:
    """One Redis primary, as the follower of logs sees it: where to subscribe."""

    name: str
    client: Redis  # a client on this primary alone (its pool: one pub/sub connection)

    def pubsub(self) -> PubSub:
        return self.client.pubsub()


class RedisClients:
    """The connections of one node to one Redis topology.

    ``commands`` is redis-py's client for it (``Redis`` or ``RedisCluster``): every
    per-workspace script and command runs there; a batch of script calls goes through
    ``run_scripts`` (one pipeline on one Redis, concurrent calls routed per slot on a
    cluster). ``shard(name)`` is a primary's own client, for subscriptions."""

    def __init__(self, url: str, *, max_connections: int, pool_wait: float,
                 common: dict[str, Any]) -> None:
        self.url = RedisUrl.parse(url)
        self._pool_wait = pool_wait
        self._shards: dict[str, Shard] = {}
        self._sentinel: Sentinel | None = None
        self._named: tuple[str, int] | None = None  # the primary the sentinels named last
        self._replica_in_sync: bool | None = None  # what the sentinels said last (None: not asked)
        self._watch: asyncio.Task[None] | None = None
        self.commands: Any
        self._common = common
        if self.url.kind == "single":
            self.commands = self._single(max_connections)
        elif self.url.kind == "sentinel":
            auth: dict[str, Any] = {"username": self.url.username, "password": self.url.password}
            self._sentinel = Sentinel(
                list(self.url.hosts), sentinel_kwargs={"socket_connect_timeout": 2.0,
                                                       "socket_timeout": 2.0},
                ssl=self.url.tls, **auth,
            )
            self.commands = self._primary(max_connections)
        else:
            self.commands = _LimitedCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self.url.hosts],
                max_connections=max_connections, pool_wait=pool_wait,
                username=self.url.username, password=self.url.password, ssl=self.url.tls,
                require_full_coverage=True, **{k: v for k, v in common.items()
                                               if k != "health_check_interval"},
            )

    def _single(self, max_connections: int) -> Redis:
        return Redis.from_pool(BlockingConnectionPool.from_url(
            self.url.url, max_connections=max_connections, timeout=self._pool_wait, **self._common))

    def _primary(self, max_connections: int) -> Redis:
        assert self._sentinel is not None
        return self._sentinel.master_for(
            self.url.service, connection_pool_class=_BlockingSentinelPool,
            max_connections=max_connections, timeout=self._pool_wait, db=self.url.db,
            **self._common,
        )

    @property
    def is_cluster(self) -> bool:
        return self.url.kind == "cluster"

    async def start(self) -> None:
        if self.is_cluster:
            await self.commands.initialize()
        elif self._sentinel is not None and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(
                self._follow_primary(), name="redis sentinel announcements")

    async def close(self) -> None:
        await stop(self._watch)
        self._watch = None
        for shard in list(self._shards.values()):
            with contextlib.suppress(Exception):
                await shard.client.aclose()
        self._shards.clear()
        await self.commands.aclose()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a command slot around a pipeline (one Redis: the blocking pool does it)."""
        if self.is_cluster:
            async with self.commands.slot():
                yield
        else:
            yield

    # -- shards -------------------------------------------------------------------

    def shard_name(self, key: str) -> str:
        """The primary that holds ``key`` (one Redis, or a Sentinel's primary: ``main``)."""
        if not self.is_cluster:
            return "main"
        return str(self.commands.get_node_from_key(key).name)

    def shard(self, name: str) -> Shard:
        shard = self._shards.get(name)
        if shard is None:
            # A client of its own, whose one connection the subscriptions hold.
            if self.is_cluster:
                host, _, port = name.rpartition(":")
                client = Redis(host=host, port=int(port), username=self.url.username,
                               password=self.url.password, ssl=self.url.tls,
                               max_connections=1, **self._common)
            elif self._sentinel is not None:
                client = self._primary(1)
            else:
                client = self._single(1)
            shard = self._shards[name] = Shard(name, client)
        return shard

    async def config(self, name: str) -> list[str]:
        """The value of the configuration parameter ``name`` on every primary (raises
        ``ResponseError`` where ``CONFIG`` is not allowed, as on many managed Redis)."""
        if self.is_cluster:
            answers = [await self.commands.execute_command("CONFIG", "GET", name, target_nodes=node)
                       for node in self.commands.get_primaries()]
        else:
            answers = [await self.commands.execute_command("CONFIG", "GET", name)]
        values = []
        for answer in answers:
            pairs = answer if isinstance(answer, dict) else dict(zip(answer[::2], answer[1::2],
                                                                       strict=True))
            values += [value.decode() if isinstance(value, bytes) else str(value)
                       for value in pairs.values()]
        return values

    async def refresh(self) -> None:
        """Learn the cluster's current slots (after a failover or a resharding)."""
        if self.is_cluster:
            await self.commands.nodes_manager.initialize()

    # -- sentinel failovers -------------------------------------------------------

    async def _follow_primary(self) -> None:
        """Leave a demoted primary as soon as the sentinels name another.

        redis-py asks the sentinels for the primary only when it opens a connection. After a
        failover that leaves the old primary up (``SENTINEL FAILOVER``, a partition that
        heals), it keeps taking writes until the sentinels demote it — at their next look,
        up to 10 s later — and throws them away when it resyncs from the new one. So this
        listens to the sentinel that discovery asks first (``+switch-master``) and, when the
        primary it names changes, reconnects everything: idle command connections at once,
        busy ones when their command is done, the notification connections at once. Every
        ``REPLICA_CHECK`` it also asks whether a replica could take over (``_check_replicas``)."""
        assert self._sentinel is not None
        sentinels = self._sentinel.sentinels
        backoff = Backoff(0.1, 2.0)
        loop = asyncio.get_running_loop()
        while True:
            sentinel = sentinels[0]
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe(SWITCH_CHANNEL)
                await self._check_primary()  # a switch made while nobody listened
                if backoff.recovered():
                    log.info("listening to the sentinels again")
                checked = -REPLICA_CHECK
                while sentinel is sentinels[0]:  # else discovery asks another one first now
                    if loop.time() - checked >= REPLICA_CHECK:
                        checked = loop.time()
                        await self._check_replicas(sentinel)
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    raise_if_cancelled()
                    if message is not None and _names(message["data"], self.url.service):
                        await self._check_primary()
            except Exception as exc:
                raise_if_cancelled()
                if backoff.failed():
                    log.warning("cannot listen to the sentinels; retrying with backoff",
                                extra={"problem": f"{type(exc).__name__}: {str(exc)[:200]}"})
                if sentinel is sentinels[0] and len(sentinels) > 1:
                    sentinels.append(sentinels.pop(0))  # try the next one (discovery too)
                await backoff.pause()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _check_replicas(self, sentinel: Redis) -> None:
        """Warn while the sentinels know no replica in sync with the primary, and say when one
        is again (each change once).

        Meanwhile the primary's death cannot be failed over: the sentinels have no replica
        to promote (writes answer 503 until the primary is back), or promote one without the
        data (every log is lost: every stream gets ``sync.reset``). A deployment started all
        at once is in that state for its first seconds: a sentinel learns of replicas from
        the primary's INFO, every 10 s, and Redis 7.0 starts a new replica's first sync 5 s
        after it connects (``repl-diskless-sync-delay``). A failed question is no answer (the
        subscription's own failures restart it)."""
        try:
            replicas = await sentinel.sentinel_slaves(self.url.service)
        except RedisError:
            return
        in_sync = any(_in_sync(replica) for replica in replicas)
        previous, self._replica_in_sync = self._replica_in_sync, in_sync
        if in_sync == previous or (in_sync and previous is None):
            return
        if in_sync:
            log.info("the sentinels know a replica in sync with the primary again")
        else:
            log.warning("the sentinels know no replica in sync with the primary: if it fails now, "
                        "writes answer 503 until it is back, or a replica without its data is "
                        "promoted (every stream resets)", extra={"replicas": len(replicas)})

    async def _check_primary(self) -> None:
        assert self._sentinel is not None
        primary = await self._sentinel.discover_master(self.url.service)
        previous, self._named = self._named, primary
        if previous is None or primary == previous:
            return
        log.warning("the sentinels name a new primary; reconnecting",
                    extra={"primary": f"{primary[0]}:{primary[1]}"})
        pool = self.commands.connection_pool
        await pool.update_active_connections_for_reconnect()
        await pool.disconnect(inuse_connections=False)
        for shard in list(self._shards.values()):
            # Its listener reconnects (through the sentinels) and reads every log again.
            await shard.client.connection_pool.disconnect()

    # -- batches ------------------------------------------------------------------

    async def run_scripts(
        self, script: AsyncScript, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """``script`` once per (keys, args), in order; each result, or the exception it raised."""
        if not calls:
            return []
        if self.is_cluster:
            # A cluster pipeline refuses scripts: concurrent calls, each routed to its slot's
            # primary and bounded by the command slots.
            return list(await asyncio.gather(
                *(script(keys=keys, args=args) for keys, args in calls), return_exceptions=True
            ))
        results = await self._evalsha(script, calls)
        if any(isinstance(result, NoScriptError) for result in results):
            # Redis lost its scripts (a restart, a failover): load it, run the batch again
            # (what runs here is idempotent: read.lua).
            await self.commands.script_load(script.script)
            results = await self._evalsha(script, calls)
        return results

    async def _evalsha(
        self, script: AsyncScript, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        # By hand: a script registered on a pipeline makes redis-py send SCRIPT EXISTS before
        # every execute, a second round trip per batch.
        async with self.commands.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
