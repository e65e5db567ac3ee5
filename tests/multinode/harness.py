"""Real processes on loopback: a private redis-server and gateway nodes, plus a small SSE
client. Used by the multi-node tests and by ``bench/bench_cross_node.py``.

Every process is started here and stopped here by its own PID; nothing else is touched.
Every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.auth import mint_token
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "multinode-secret-" + "k" * 32
ORG = "org-1"
WORKSPACE = "ws-1"
BASE = f"/v1/orgs/{ORG}/workspaces/{WORKSPACE}/sync"


def base(workspace: str = WORKSPACE, org: str = ORG) -> str:
    """The API path prefix of a workspace (``BASE`` is ``base()``)."""
    return f"/v1/orgs/{org}/workspaces/{workspace}/sync"


def token(sub: str, **extra: Any) -> str:
    return mint_token(SECRET, sub=sub, org_id=ORG, workspaces="*", ttl=3600, extra=extra)


def auth(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class RedisServer:
    """A private redis-server on a free port; ``persist`` keeps data across a kill (AOF,
    ``appendfsync`` ``fsync``: ``always`` by default), otherwise a restart comes back empty."""

    def __init__(self, directory: Path, *, persist: bool, fsync: str = "always") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
                "--daemonize", "no"]
        args += ["--appendonly", "yes", "--appendfsync", self.fsync] if self.persist else [
            "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{_tail(self.dir / 'redis.log')}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def aof_tail(self) -> tuple[Path, int] | None:
        """The AOF file Redis appends to now, and its size: what a host crash would keep if
        the OS had flushed the file up to here (``appendfsync everysec`` flushes once a
        second). ``None`` without an AOF."""
        manifest = self.dir / "appendonlydir" / "appendonly.aof.manifest"
        if not manifest.exists():
            return None
        increments = [line.split()[1] for line in manifest.read_text().splitlines()
                      if line.split()[-1:] == ["i"]]
        if not increments:
            return None
        path = manifest.parent / increments[-1]
        return path, path.stat().st_size

    def crash_host(self, synced: tuple[Path, int] | None) -> int:
        """What a power loss does to a Redis with ``appendfsync everysec``: SIGKILL, and the
        AOF loses what was written after the last fsync (``synced``, from ``aof_tail``; the
        file may end mid-command, which Redis loads with ``aof-load-truncated``). Bytes lost."""
        self.kill()
        now = self.aof_tail()
        if synced is None or now is None or now[0] != synced[0]:
            return 0  # no AOF, or it was rewritten meanwhile: nothing to cut honestly
        with synced[0].open("r+b") as aof:
            aof.truncate(synced[1])
        return now[1] - synced[1]

    def read_offline(self, *commands: Sequence[str]) -> list[Any]:
        """Each command's answer (JSON-decoded) from the data as it is on disk now, read by a
        redis-server of its own on a unix socket, so that nothing connected to ``port``
        (a gateway node) sees or changes it first. The server must be down."""
        assert self.proc is None, "read_offline() reads a stopped server's files"
        sock = self.dir / "offline.sock"
        args = ["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.persist else "no",
                "--logfile", str(self.dir / "offline.log"), "--daemonize", "no"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli = ["redis-cli", "-s", str(sock)]
        try:
            _wait_until(lambda: subprocess.run([*cli, "ping"], capture_output=True, timeout=5,
                                               check=False).stdout.startswith(b"PONG"),
                        10, "offline redis-server up", lambda: _tail(self.dir / "offline.log"))
            return [json.loads(subprocess.run([*cli, "--json", *command], capture_output=True, timeout=5,
                                              check=True).stdout or b"null")
                    for command in commands]
        finally:
            _stop_process(proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# --- Redis Cluster and Sentinel -----------------------------------------------------------------

SLOTS = 16384
#: The slot ranges ``redis-cli --cluster create`` gives three primaries (in the order listed).
THREE_SHARDS: tuple[tuple[int, int], ...] = ((0, 5460), (5461, 10922), (10923, 16383))


def redis_cli(port: int, *args: str, json_output: bool = False, timeout: float = 5.0) -> str:
    """One ``redis-cli`` command against ``127.0.0.1:port``; its raw (or ``--json``) output.
    Raises ``RuntimeError`` when redis-cli fails or the server answers an error."""
    command = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
    command += ["--json"] if json_output else ["--raw"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)
    out = result.stdout.strip()
    if result.returncode != 0 or out.startswith(("ERR", "WRONGTYPE", "MOVED", "CLUSTERDOWN",
                                                 "NOAUTH", "Could not connect")):
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {out} {result.stderr.strip()}")
    return out


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together while picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
    return False


def _spawn_redis(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``redis-server`` with ``args``, loopback only, its log in ``log``."""
    return subprocess.Popen(["redis-server", *args, "--logfile", str(log), "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_until(check: Callable[[], bool], timeout: float, what: str,
                logs: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired, ValueError, KeyError,
                                 IndexError):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout}s\n{logs()}")


def _stop_process(proc: subprocess.Popen[bytes] | None, *, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def replica_synced(primary: int) -> bool:
    """The Redis on ``primary`` has one connected replica whose offset has caught up with its own."""
    info = dict(line.split(":", 1) for line in redis_cli(primary, "info", "replication").splitlines()
                if ":" in line)
    if info.get("connected_slaves") != "1":
        return False
    offset = int(info["master_repl_offset"])
    replica = info["slave0"]  # ip=127.0.0.1,port=...,state=online,offset=...,lag=...
    fields = dict(part.split("=", 1) for part in replica.split(","))
    return fields.get("state") == "online" and int(fields["offset"]) >= offset


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` (blocking; run it in a thread from a test) until true, or raise."""
    _wait_until(check, timeout, what)


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str | bytes) -> int:
    """The cluster slot of ``key``: of its hash tag (the text between the first ``{`` and the
    next ``}``, when not empty), else of the whole key."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return _crc16(raw) % SLOTS


def workspace_log_key(workspace: str = WORKSPACE, prefix: str = "gw", org: str = ORG) -> str:
    """The gateway's stream key of a workspace (ids that need no escaping)."""
    return f"{prefix}:{{{org}:{workspace}}}:log"


def workspaces_on_every_shard(prefix: str = "gw", org: str = ORG, n_per_shard: int = 1, *,
                              shards: Sequence[tuple[int, int]] = THREE_SHARDS) -> list[str]:
    """Workspace ids (``ws-1``, ``ws-2``... the first that fit) whose keys land ``n_per_shard``
    on each shard, shard by shard. ``shards``: each primary's slot range (by default the three
    ranges of ``redis-cli --cluster create`` with three primaries)."""
    found: list[list[str]] = [[] for _ in shards]
    candidate = 0
    while any(len(ids) < n_per_shard for ids in found):
        candidate += 1
        workspace = f"ws-{candidate}"
        slot = key_slot(workspace_log_key(workspace, prefix, org))
        for index, (low, high) in enumerate(shards):
            if low <= slot <= high and len(found[index]) < n_per_shard:
                found[index].append(workspace)
    return [workspace for ids in found for workspace in ids]


class RedisClusterServers:
    """A private three-primary Redis Cluster on free loopback ports. Without replicas (the
    default) as the topology tests use it; with ``replicas=1`` each primary gets a replica
    and ``cluster-node-timeout`` is 1 s, so a primary SIGKILLed is replaced in ~2-3 s.
    ``ports`` are the primaries as created (``all_ports`` adds the replicas); ``kill``,
    ``restart``, ``failover`` and ``reshard`` are what an operator (or a crash) does to it,
    ``wait_settled`` and ``wait_replaced`` wait for the cluster to agree on its new slot map."""

    size = 3

    def __init__(self, directory: Path, *, replicas: int = 0) -> None:
        self.dir = directory
        self.replicas = replicas
        count = self.size * (1 + replicas)
        # The cluster bus listens on its own port: by default port + 10000, which is out of
        # range for ephemeral ports above 55535, so each node gets a second free port for it.
        picked = free_ports(2 * count)
        self.all_ports = picked[:count]
        self.ports = self.all_ports[:self.size]
        self.bus_ports = dict(zip(self.all_ports, picked[count:], strict=True))
        self.node_timeout_ms = 1000 if replicas else 2000
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.killed: set[int] = set()  # ports SIGKILLed and not restarted yet
        self.started_in: float | None = None  # seconds start() took

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.all_ports)

    def _dir(self, port: int) -> Path:
        return self.dir / f"cluster-{port}"

    def logs(self) -> str:
        return "\n".join(f"--- redis {port} ---\n{_tail(self._dir(port) / 'redis.log', 15)}"
                         for port in self.all_ports)

    def _spawn(self, port: int) -> None:
        """Start (or restart: its ``nodes.conf`` makes it rejoin) the node on ``port``."""
        directory = self._dir(port)
        directory.mkdir(parents=True, exist_ok=True)
        self.procs[port] = _spawn_redis([
            "--port", str(port), "--cluster-port", str(self.bus_ports[port]), "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--cluster-enabled", "yes", "--cluster-config-file", str(directory / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "no", "--save", "",
            # a replica's full sync starts at once (the default waits 5 s)
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        ], directory / "redis.log")

    def start(self) -> None:
        began = time.monotonic()
        for port in self.all_ports:
            self._spawn(port)
        try:
            for port in self.all_ports:
                _wait_until(functools.partial(_ping, port), 10, f"cluster node {port} up", self.logs)
            # With one IP, redis-cli makes the first ``size`` nodes listed the primaries.
            create = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.all_ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=30,
            )
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
            _wait_until(self._all_ok, 20, "cluster_state:ok on every node", self.logs)
            if self.shards() != list(THREE_SHARDS):
                raise RuntimeError(f"unexpected slot layout: {self.shards()}")
            if self.replicas:
                self.wait_replicas_synced(20)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def alive_ports(self) -> list[int]:
        return [port for port in self.all_ports if port not in self.killed]

    def _all_ok(self) -> bool:
        for port in self.alive_ports():
            info = redis_cli(port, "cluster", "info")
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.all_ports)}" not in info:
                return False
        return True

    def cluster_nodes(self, port: int | None = None) -> list[ClusterNodeLine]:
        """``CLUSTER NODES`` as one node (by default the first alive) sees the cluster."""
        asked = self.alive_ports()[0] if port is None else port
        return [ClusterNodeLine.parse(line) for line in redis_cli(asked, "cluster", "nodes").splitlines()
                if len(line.split()) >= 8]

    def slot_map(self, port: int | None = None) -> dict[tuple[int, int], int]:
        """(first slot, last slot) -> port of the primary serving them (``CLUSTER NODES`` of
        ``port``, by default the first alive node)."""
        return {span: node.port for node in self.cluster_nodes(port) if node.primary
                for span in node.slots}

    def shards(self) -> list[tuple[int, int]]:
        """The primaries' slot ranges in the order of ``ports`` (one range each after create)."""
        owners = self.slot_map()
        return [next(span for span, port in sorted(owners.items()) if port == p) for p in self.ports]

    def slot_owner_port(self, key: str) -> int:
        """Port of the primary that serves ``key``'s slot."""
        return self.slot_owner_port_of(key_slot(key))

    def replica_of(self, primary: int) -> int:
        """The port of the (alive) replica of the primary on ``primary``."""
        nodes = self.cluster_nodes()
        (owner,) = [node for node in nodes if node.port == primary]
        for node in nodes:
            if node.master_id == owner.node_id and node.port not in self.killed and not node.failed:
                return node.port
        raise RuntimeError(f"no replica of {primary}")

    def wait_replicas_synced(self, timeout: float = 10.0) -> None:
        """Until every primary's replica has acknowledged everything written to it so far
        (``WAIT 1``: also under load, where ``INFO`` offsets are always a little behind)."""
        _wait_until(lambda: all(redis_cli(port, "wait", "1", "1000") == "1"
                                for port in set(self.slot_map().values())),
                    timeout, "every primary's replica caught up", self.logs)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (no shutdown save, no goodbye)."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.killed.add(port)

    def restart(self, port: int) -> None:
        """Start a killed node again: it rejoins (as a replica, when it was replaced)."""
        self._spawn(port)
        _wait_until(functools.partial(_ping, port), 10, f"cluster node {port} up", self.logs)
        self.killed.discard(port)

    def failover(self, replica: int) -> None:
        """``CLUSTER FAILOVER`` on ``replica``: it takes over its primary's slots once it has
        caught up; the old primary, still up, becomes its replica."""
        redis_cli(replica, "cluster", "failover")

    def _settled(self) -> bool:
        maps = []
        for port in self.alive_ports():
            if "cluster_state:ok" not in redis_cli(port, "cluster", "info"):
                return False
            maps.append(self.slot_map(port))
        owners = set(maps[0].values())
        return (all(other == maps[0] for other in maps) and sum(high - low + 1 for low, high in maps[0]) == SLOTS
                and not owners & self.killed
                and all(redis_cli(port, "role").splitlines()[0] == "master" for port in owners))

    def wait_settled(self, timeout: float = 20.0) -> dict[tuple[int, int], int]:
        """Until every alive node is ``cluster_state:ok`` and all agree on which live primary
        serves each slot; that slot map."""
        _wait_until(self._settled, timeout, "cluster slot map settled", self.logs)
        return self.slot_map()

    def wait_replaced(self, primary: int, timeout: float = 20.0) -> dict[tuple[int, int], int]:
        """Until the slot map has settled with ``primary`` serving no slot (its replica took
        them over: after ``kill`` or ``failover``); that slot map."""
        _wait_until(lambda: self._settled() and primary not in self.slot_map().values(), timeout,
                    f"the slots of {primary} served by another primary", self.logs)
        return self.slot_map()

    def node_id(self, port: int) -> str:
        return redis_cli(port, "cluster", "myid")

    def reshard(self, source: int, target: int, slots: int, *, pipeline: int = 10,
                timeout: float = 60.0) -> str:
        """Move the ``slots`` lowest slots of the primary on ``source`` to the one on
        ``target``, keys included, as an operator does (``redis-cli --cluster reshard``,
        ``pipeline`` keys per ``MIGRATE``: fewer make the migration last longer); its output."""
        result = subprocess.run(
            ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}",
             "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
             "--cluster-slots", str(slots), "--cluster-pipeline", str(pipeline), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )
        if result.returncode != 0 or "[ERR]" in result.stdout:
            raise RuntimeError(f"redis-cli --cluster reshard failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def migrate_slot(self, slot: int, target: int, *, halfway: float, timeout: float = 30.0) -> int:
        """Move ``slot`` to the primary on ``target`` step by step, as ``redis-cli --cluster
        reshard`` does (``SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``, ``SETSLOT NODE``), but
        with half of its keys moved and the other half not for ``halfway`` seconds: commands
        on keys of both halves are answered ``TRYAGAIN`` (or ``ASK``) meanwhile. The number
        of keys moved."""
        source = self.slot_owner_port_of(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        redis_cli(target, "cluster", "setslot", str(slot), "importing", source_id)
        redis_cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
        keys = redis_cli(source, "cluster", "getkeysinslot", str(slot), "1000").split()
        moved = self._migrate(source, target, keys[:len(keys) // 2])
        time.sleep(halfway)
        deadline = time.monotonic() + timeout
        while keys := redis_cli(source, "cluster", "getkeysinslot", str(slot), "1000").split():
            if time.monotonic() > deadline:
                raise RuntimeError(f"slot {slot} still has keys on {source}")
            moved += self._migrate(source, target, keys)
        for port in set(self.slot_map().values()) | {target}:
            redis_cli(port, "cluster", "setslot", str(slot), "node", target_id)
        return moved

    @staticmethod
    def _migrate(source: int, target: int, keys: list[str]) -> int:
        if keys:
            redis_cli(source, "migrate", "127.0.0.1", str(target), "", "0", "5000", "keys", *keys)
        return len(keys)

    def slot_owner_port_of(self, slot: int) -> int:
        """Port of the primary that serves ``slot``."""
        for (low, high), port in self.slot_map().items():
            if low <= slot <= high:
                return port
        raise RuntimeError(f"no node serves slot {slot}")

    def workspaces_on_every_shard(self, prefix: str = "gw", org: str = ORG,
                                  n_per_shard: int = 1) -> list[str]:
        return workspaces_on_every_shard(prefix, org, n_per_shard, shards=self.shards())

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop_process(proc)


@dataclass(frozen=True, slots=True)
class ClusterNodeLine:
    """One line of ``CLUSTER NODES``: who a node is, what it serves, whom it replicates."""

    node_id: str
    port: int
    flags: tuple[str, ...]
    master_id: str  # "-" for a primary
    slots: tuple[tuple[int, int], ...]  # slot ranges served (slots being migrated left out)

    @property
    def primary(self) -> bool:
        return "master" in self.flags and not self.failed

    @property
    def failed(self) -> bool:
        return "fail" in self.flags

    @classmethod
    def parse(cls, line: str) -> ClusterNodeLine:
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        spans = []
        for part in fields[8:]:
            if part.startswith("["):  # a slot being migrated
                continue
            low, _, high = part.partition("-")
            spans.append((int(low), int(high or low)))
        return cls(fields[0], port, tuple(fields[2].split(",")), fields[3], tuple(spans))


class SentinelServers:
    """A private primary, one replica and three sentinels (quorum 2) on free loopback ports;
    sentinels declare a primary down after 1 s, so a failover takes a few seconds.

    ``sentinels=1`` is the operator's probe of issue 20: one sentinel (quorum 1), which
    decides alone; ``down_after`` and ``failover_timeout`` (ms) are its settings.
    ``initial_sync_delay`` (s, Redis's ``repl-diskless-sync-delay``): the sentinels start as
    soon as the replica is connected, before its first sync (a deployment started at once)."""

    service = "mymaster"

    def __init__(self, directory: Path, *, sentinels: int = 3, down_after: int = 1000,
                 failover_timeout: int = 3000, initial_sync_delay: int = 0) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.quorum = 1 if sentinels == 1 else 2
        self.down_after, self.failover_timeout = down_after, failover_timeout
        self.initial_sync_delay = initial_sync_delay
        picked = free_ports(2 + sentinels)
        self.first_primary = picked[0]
        self.data_ports = picked[:2]
        self.sentinel_ports = picked[2:]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.killed: list[int] = []  # data ports killed by kill_primary()
        self.replaced: list[int] = []  # data ports that were primary before a failover
        self.detached_at: float | None = None  # time.monotonic() of detach_replica()
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{seeds}/{self.service}/0"

    def _dir(self, port: int) -> Path:
        return self.dir / f"{'sentinel' if port in self.sentinel_ports else 'redis'}-{port}"

    def logs(self) -> str:
        return "\n".join(f"--- {self._dir(port).name} ---\n{_tail(self._dir(port) / 'redis.log', 15)}"
                         for port in [*self.data_ports, *self.sentinel_ports])

    def start(self) -> None:
        began = time.monotonic()
        primary, replica = self.data_ports
        try:
            for port in self.data_ports:
                directory = self._dir(port)
                directory.mkdir(parents=True, exist_ok=True)
                args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                        "--appendonly", "no", "--save", "",
                        # the initial full sync starts at once unless asked (the default waits 5 s)
                        "--repl-diskless-sync", "yes",
                        "--repl-diskless-sync-delay", str(self.initial_sync_delay)]
                if port == replica:
                    args += ["--replicaof", "127.0.0.1", str(primary)]
                self.procs[port] = _spawn_redis(args, directory / "redis.log")
            for port in self.data_ports:
                _wait_until(functools.partial(_ping, port), 10, f"redis {port} up", self.logs)
            # Before the sentinels start: a sentinel learns of replicas from the primary's INFO,
            # which it reads every 10 s once connected, so a replica that connected later
            # would be known only that much later.
            connected = self._replica_connected if self.initial_sync_delay else self.replica_synced
            _wait_until(lambda: connected(primary), 20, "replica connected (and in sync)", self.logs)
            for port in self.sentinel_ports:
                directory = self._dir(port)
                directory.mkdir(parents=True, exist_ok=True)
                conf = directory / "sentinel.conf"  # sentinels rewrite their config: writable
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                    f"sentinel resolve-hostnames no\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {primary} {self.quorum}\n"
                    f"sentinel down-after-milliseconds {self.service} {self.down_after}\n"
                    f"sentinel failover-timeout {self.service} {self.failover_timeout}\n"
                    f"sentinel parallel-syncs {self.service} 1\n"
                )
                self.procs[port] = subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel", "--logfile", str(directory / "redis.log"),
                     "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for port in self.sentinel_ports:
                _wait_until(functools.partial(_ping, port), 10, f"sentinel {port} up", self.logs)
            # Every sentinel must know the primary, the replica and the other sentinels
            # (hello messages every 2 s), or a quorum could not be reached on a failure.
            _wait_until(self._sentinels_ready, 20, "sentinels know primary, replica and peers", self.logs)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            if self.sentinel_primary(port) != self.first_primary:
                return False
            fields = redis_cli(port, "sentinel", "master", self.service).splitlines()
            state = dict(zip(fields[::2], fields[1::2], strict=False))
            others = str(len(self.sentinel_ports) - 1)
            if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != others:
                return False
        return True

    @staticmethod
    def _replica_connected(primary: int) -> bool:
        return "connected_slaves:1" in redis_cli(primary, "info", "replication")

    def sentinel_primary(self, sentinel_port: int) -> int | None:
        """The primary's port according to one sentinel."""
        lines = redis_cli(sentinel_port, "sentinel", "get-master-addr-by-name", self.service).splitlines()
        return int(lines[1]) if len(lines) == 2 else None

    def primary_port(self) -> int:
        """The primary's port according to the first sentinel that answers."""
        for port in self.sentinel_ports:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, ValueError):
                answer = self.sentinel_primary(port)
                if answer is not None:
                    return answer
        raise RuntimeError("no sentinel answers")

    def replica_ports(self) -> list[int]:
        return [port for port in self.data_ports if port != self.primary_port() and port not in self.killed]

    def role(self, port: int) -> str:
        return redis_cli(port, "role").splitlines()[0]

    def replica_synced(self, primary: int | None = None) -> bool:
        """The primary (by default the sentinels' one) has one connected replica whose
        offset has caught up with its own."""
        return replica_synced(self.primary_port() if primary is None else primary)

    def wait_replica_synced(self, timeout: float = 10.0) -> None:
        _wait_until(self.replica_synced, timeout, "replica caught up", self.logs)

    def detach_replica(self) -> int:
        """Make the replica fall behind on purpose: it stops replicating (``REPLICAOF`` a
        closed port) but keeps its data and stays a failover candidate, so writes from now on
        are lost if the primary dies. The sentinels point it back at the primary after
        ``failover-timeout`` (3 s): kill the primary before. Returns the replica's port."""
        (replica,) = self.replica_ports()
        (closed,) = free_ports(1)
        redis_cli(replica, "replicaof", "127.0.0.1", str(closed))
        self.detached_at = time.monotonic()
        return replica

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown save, no goodbye); its port."""
        port = self.primary_port()
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.killed.append(port)
        self.replaced.append(port)
        return port

    def restart_as_replica(self, port: int, timeout: float = 20.0) -> None:
        """Start the data server killed on ``port`` again, empty (no persistence), as a
        replica of the current primary, and wait until it has caught up and the sentinels
        see it as a healthy replica (so it can be promoted in turn)."""
        assert port in self.killed, "kill_primary() first"
        primary = self.primary_port()
        directory = self._dir(port)
        self.procs[port] = _spawn_redis(
            ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
             "--appendonly", "no", "--save", "", "--repl-diskless-sync", "yes",
             "--repl-diskless-sync-delay", "0", "--replicaof", "127.0.0.1", str(primary)],
            directory / "redis.log")
        self.killed.remove(port)
        _wait_until(lambda: self.replica_synced(primary) and self._healthy_replica(port), timeout,
                    f"redis {port} back as a replica", self.logs)
        # After a diskless full sync the primary streams writes to the replica only once the
        # replica's first ACK came (up to a second): until then a kill loses them all.
        probe = str(time.monotonic_ns())
        redis_cli(primary, "set", "harness:streaming", probe)
        _wait_until(lambda: redis_cli(port, "get", "harness:streaming") == probe, timeout,
                    f"redis {port} receiving the primary's writes", self.logs)

    def _healthy_replica(self, port: int) -> bool:
        """Every sentinel knows ``port`` as a replica of the primary, up and linked."""
        for sentinel in self.sentinel_ports:
            replicas = json.loads(redis_cli(sentinel, "sentinel", "replicas", self.service,
                                            json_output=True) or "[]")
            states = [r if isinstance(r, dict) else dict(zip(r[::2], r[1::2], strict=False))
                      for r in replicas]
            if not any(int(state.get("port", 0)) == port and state.get("flags") == "slave"
                       and state.get("master-link-status") == "ok" for state in states):
                return False
        return True

    def failover(self) -> int:
        """A graceful failover (``SENTINEL FAILOVER``): the sentinels promote the replica and
        turn the old primary, which stays up, into a replica; its port."""
        port = self.primary_port()
        redis_cli(self.sentinel_ports[0], "sentinel", "failover", self.service)
        self.replaced.append(port)
        return port

    def wait_failover(self, timeout: float = 20.0) -> int:
        """Until every sentinel names a primary other than the one killed or failed over from
        last, and that server's ``ROLE`` is master; its port."""
        assert self.replaced, "kill_primary() or failover() first"
        old = self.replaced[-1]
        result: list[int] = []

        def promoted() -> bool:
            answers = {self.sentinel_primary(port) for port in self.sentinel_ports}
            if len(answers) != 1:
                return False
            (new,) = answers
            if new is None or new == old or self.role(new) != "master":
                return False
            result[:] = [new]
            return True

        _wait_until(promoted, timeout, "sentinel failover", self.logs)
        return result[0]

    def stop(self) -> None:
        for port in [*self.sentinel_ports, *self.data_ports]:
            _stop_process(self.procs.get(port))


class Endpoint:
    """A loopback address that stands for "the primary", as a DNS name or a virtual IP of a
    managed Redis does: each new connection goes to the server on ``target``; connections
    already open stay with the server they reached (moving the address does not close them).

    It is also the link between a node and Redis, which a test can break the way networks
    do: ``blackhole()`` cuts it like a cable (nothing is forwarded either way, nothing is
    closed or reset; bytes and ends of stream are held, as TCP would retransmit them, and
    new connections hang before they reach the server); ``slow(low, high)`` delays every
    chunk, each direction on its own, by ``low`` to ``high`` seconds, keeping the order;
    ``heal()`` makes it pass everything through again (what was held goes on, in order)."""

    def __init__(self, target: int, *, seed: int = 0) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._delay: tuple[float, float] = (0.0, 0.0)
        self._random = random.Random(seed)
        self._closing = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def blackhole(self) -> None:
        self._flowing.clear()

    def slow(self, low: float, high: float) -> None:
        if not 0 <= low <= high:
            raise ValueError("0 <= low <= high")
        self._delay = (low, high)
        self._flowing.set()

    def heal(self) -> None:
        self._delay = (0.0, 0.0)
        self._flowing.set()

    async def __aenter__(self) -> Endpoint:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is None:
            return
        self._server.close()
        self._closing = True
        self._flowing.set()  # connections waiting for the link give up
        for task in list(self._pipes):
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*self._pipes, return_exceptions=True), 5)
        await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    def stop(self) -> None:
        """(A deployment's stop: the servers behind it are stopped on their own.)"""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()  # a cut cable: the connection attempt gets no answer
        try:
            if self._closing:
                raise ConnectionAbortedError
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.target), 2)
        except (OSError, TimeoutError):
            writer.close()
            return
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            for pipe in (self._receive(source, chunks), self._forward(chunks, sink)):
                pipe_task = asyncio.create_task(pipe)
                self._pipes.add(pipe_task)
                pipe_task.add_done_callback(self._pipes.discard)

    async def _receive(self, source: asyncio.StreamReader,
                       chunks: asyncio.Queue[tuple[float, bytes]]) -> None:
        """Read what one side sends, each chunk stamped with when it may go on (b"": the end)."""
        due = 0.0
        try:
            while data := await source.read(65536):
                due = max(due, time.monotonic() + self._random.uniform(*self._delay))
                chunks.put_nowait((due, data))
        except OSError:
            pass
        chunks.put_nowait((max(due, time.monotonic() + self._random.uniform(*self._delay)), b""))

    async def _forward(self, chunks: asyncio.Queue[tuple[float, bytes]],
                       sink: asyncio.StreamWriter) -> None:
        """Pass the chunks on in order, each once it is due and while the link is up."""
        try:
            while True:
                due, data = await chunks.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await self._flowing.wait()
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


def faketime_library() -> Path | None:
    """libfaketime (Debian ``faketime``; ``scripts/test.sh`` installs it), if installed."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def skewed_clock(seconds: float, *, file: Path | None = None) -> dict[str, str]:
    """The environment that runs a process with its wall clock ``seconds`` ahead (behind if
    negative) of everyone's, through libfaketime. Its monotonic clock is left alone, so the
    event loop's timers still run in real time. With ``file``, the offset is read from it
    (within a second of each change: ``step_clock``), so the clock can be stepped."""
    library = faketime_library()
    if library is None:
        raise RuntimeError("libfaketime is not installed (apt-get install faketime)")
    env = {"LD_PRELOAD": str(library), "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    if file is None:
        return env | {"FAKETIME": f"{seconds:+g}s"}
    step_clock(file, seconds)
    return env | {"FAKETIME_TIMESTAMP_FILE": str(file), "FAKETIME_CACHE_DURATION": "1"}


def step_clock(file: Path, seconds: float) -> None:
    """Set the offset of the processes started with ``skewed_clock(..., file=file)``."""
    file.write_text(f"{seconds:+g}s\n")


@dataclass
class Node:
    """One ``python -m gateway serve`` process."""

    name: str
    redis_url: str
    directory: Path
    node_timeout: float = 3.0
    disconnect_grace: float = 2.0
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # e.g. ``skewed_clock(30)``
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> None:
        args = [
            sys.executable, "-m", "gateway", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--redis-url", self.redis_url,
            "--node-id", self.name, "--jwt-secret", SECRET,
            "--node-timeout", str(self.node_timeout), "--disconnect-grace", str(self.disconnect_grace),
            "--sweep-interval", "0.2", "--log-format", "text", *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | self.env
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{_tail(self.log_path)}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{_tail(self.log_path)}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def logs(self) -> str:
        return _tail(self.log_path, 60)


@dataclass
class Event:
    id: str | None
    type: str | None
    data: dict[str, Any] | None


class Stream:
    """An SSE subscription read in the background; events and ``retry:`` hints collected."""

    def __init__(self, session: aiohttp.ClientSession, node: Node, user: str,
                 last_event_id: str | None = None, workspace: str = WORKSPACE) -> None:
        self.session, self.node, self.user = session, node, user
        self.workspace = workspace
        self.last_event_id = last_event_id
        self.events: list[Event] = []
        self.retries: list[int] = []
        self.ended = False
        self.arrived: list[float] = []  # time.perf_counter() at each event
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.response: aiohttp.ClientResponse | None = None

    async def open(self) -> Stream:
        headers = auth(self.user)
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        self.response = await self.session.get(
            f"{self.node.url}{base(self.workspace)}/stream", headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=5),
        )
        if self.response.status != 200:
            raise RuntimeError(f"stream on {self.node.name}: {self.response.status}")
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.response is not None
        current: dict[str, str] = {}
        try:
            async for raw in self.response.content:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if "data" in current or "event" in current:
                        data = json.loads(current["data"]) if "data" in current else None
                        self.events.append(Event(current.get("id"), current.get("event"), data))
                        self.arrived.append(time.perf_counter())
                        self._changed.set()
                    current = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "retry":
                    self.retries.append(int(value))
                    self._changed.set()
                else:
                    current[name] = value
        except (aiohttp.ClientError, OSError):
            pass
        finally:
            self.ended = True
            self._changed.set()

    async def wait_for(self, predicate: Callable[[Stream], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out on {self.node.name}/{self.workspace}: {self.summary()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    def of_type(self, *types: str) -> list[Event]:
        return [event for event in self.events if event.type in types]

    def presence(self) -> list[tuple[str, str]]:
        """(type, user) of every presence event received."""
        return [(e.type or "", (e.data or {}).get("data", {}).get("user_id", ""))
                for e in self.of_type("presence.joined", "presence.left")]

    def summary(self) -> str:
        return str([(e.type, e.id) for e in self.events][-20:]) + f" ended={self.ended}"

    async def close(self) -> None:
        if self.response is not None:
            self.response.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def call(session: aiohttp.ClientSession, method: str, url: str, user: str,
               **kwargs: Any) -> tuple[int, Any]:
    headers = {**auth(user), **kwargs.pop("headers", {})}
    async with session.request(method, url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=10), **kwargs) as response:
        body = await response.json(content_type=None)
        return response.status, body


async def members(session: aiohttp.ClientSession, node: Node, user: str = "observer",
                  workspace: str = WORKSPACE) -> list[str]:
    status, body = await call(session, "GET", f"{node.url}{base(workspace)}/presence", user)
    assert status == 200, body
    return [member["user_id"] for member in body["members"]]


async def eventually(check: Callable[[], Any], timeout: float, interval: float = 0.05,
                     what: str = "") -> Any:
    """Await ``check()`` until it returns a truthy value (returned) or ``timeout`` passes
    (an AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what + ': ' if what else ''}not true within {timeout}s (last: {last!r})")
