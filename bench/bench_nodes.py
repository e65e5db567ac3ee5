"""Redis cost per event as the number of nodes grows: K gateway nodes beside K floor servers.

One invocation, one private redis-server on loopback. For each K in ``--nodes`` (1,2,4,8)
and each column — the floor (``bench/floor_server.py``: one ``XREAD BLOCK`` per room per
process), then the gateway of each ``--gateway-root`` (``sync-gateway serve``, as
``bench/bench_delivery.py`` starts it, ``--log-level WARNING``) — K fresh server processes
share the redis-server (flushed between runs), and:

1. every server gets one receiver (WebSocket or SSE, alternately: ``--transport``) on each
   of ``--workspaces`` (20) workspaces, so every server follows all of them;
2. an unmeasured warm-up: ``--warmup`` events (lazy imports, first reads);
3. idle: ``--idle-seconds`` with everything connected and nothing published (the Redis
   CPU the nodes cost by merely being there: heartbeats, audits; printed, not subtracted);
4. steady: ``--events`` (2,000) events of ~``--event-bytes`` at ``--rate`` (200/s), event
   ``k`` to workspace ``k % workspaces``, published by ``--publish``: ``http`` (the server
   0's own publish: the gateway's ``POST .../sync/events`` with a service token, the
   floor's ``POST /rooms/{room}/events``) or ``xadd`` (``MULTI; XADD; SPUBLISH <notify>;
   EXEC`` straight to Redis, as docs/redis.md shows a service appending).

Over the steady phase (just before the first publish to the last delivery):

* Redis CPU µs per event: the redis-server's CPU / events published;
* node CPU µs per event per node: all K servers' CPU / events / K (server 0's includes the
  HTTP publish when ``--publish http``);
* deliveries: every receiver must get every event of its workspace once, in log order
  (lost, duplicate and out-of-order deliveries are counted, as bench_delivery counts them);
* the gateway's Redis CPU per event at K over that at the smallest K (the issue's target:
  8 nodes ≤ 1.5x 1 node);
* printed per run: Redis calls per event (``INFO commandstats``, a script's own calls
  included), the count that does not depend on how busy the machine is.

CPU is each process's time on a CPU from ``/proc/<pid>/task/*/schedstat`` (nanoseconds:
the runtime that the user+sys ticks of ``/proc/<pid>/stat`` are truncated from), checked
against those 10 ms ticks (which also keep the time of ended threads): when the two
disagree by more than the truncation, or schedstat is not kept, the ticks count. With
``--rounds`` > 1 each figure is the median of the rounds; the rounds alternate.

    .venv/bin/python bench/bench_nodes.py                      # 3 rounds, ~7 minutes on 2 cores
    .venv/bin/python bench/bench_nodes.py --quick              # K 1,2, ~20 s: a smoke run
    .venv/bin/python bench/bench_nodes.py --publish xadd --gateway-root /tmp/before --gateway-root .

The receivers are bench_delivery's (raw asyncio protocols in ``--client-procs`` processes);
the publisher runs in this process. Every wait is bounded (``--timeout`` for the whole
run); every process started here is stopped here, by its own PID; everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_delivery import (  # the delivery benchmark's servers, receivers and senders
    Dialect,
    Send,
    Server,
    Workers,
    fmt,
    http_sender,
    quiet,
    xadd_sender,
)
from bench.bench_scale import RedisProc, cpu_seconds, raise_nofile, run_bounded, scratch_redis

FLOOR = "floor"


# ---------------------------------------------------------------------------------------------
# CPU: nanoseconds where the kernel says them

TICK = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuMark:
    """A process's CPU so far, read twice: the whole process in ``/proc/<pid>/stat`` ticks
    (ended threads included, 10 ms), and its live threads' ``schedstat`` runtime (ns)."""

    ticks: float
    ns: int | None


def _schedstat_ns(pid: int) -> int | None:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total, seen = 0, False
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            seen = True
    return total if seen else None


def cpu_mark(pid: int) -> CpuMark:
    return CpuMark(cpu_seconds(pid) or 0.0, _schedstat_ns(pid))


def cpu_used(before: CpuMark, after: CpuMark) -> float:
    """Seconds on a CPU between two marks: the nanoseconds, unless they and the ticks (the
    same runtime, user and sys each truncated: under 2 ticks a reading) disagree by more —
    a thread that ended took its nanoseconds with it — or schedstat is not kept (it reads
    0): then the ticks."""
    coarse = max(0.0, after.ticks - before.ticks)
    if not before.ns or not after.ns:
        return coarse
    fine = (after.ns - before.ns) / 1e9
    return fine if abs(fine - coarse) <= 2 * TICK else coarse


def marks(pids: list[int]) -> list[CpuMark]:
    return [cpu_mark(pid) for pid in pids]


def used(before: list[CpuMark], pids: list[int]) -> float:
    """Seconds on a CPU of all ``pids`` since ``before`` (their marks, in the same order)."""
    return sum(cpu_used(mark, cpu_mark(pid)) for mark, pid in zip(before, pids, strict=True))


# ---------------------------------------------------------------------------------------------
# the publisher: this process


@contextlib.asynccontextmanager
async def spread_sender(targets: list[tuple[Any, ...]]) -> AsyncIterator[Send]:
    """Event ``k`` to ``targets[k % len(targets)]`` (one per workspace), through
    bench_delivery's HTTP sender, or one of its XADD senders per workspace."""
    if targets[0][0] == "http":
        async with http_sender(targets) as send:
            yield send
        return
    async with contextlib.AsyncExitStack() as stack:
        sends = [await stack.enter_async_context(xadd_sender([target])) for target in targets]

        async def send(k: int, data: dict[str, Any]) -> str | None:
            return await sends[k % len(sends)](k, data)

        yield send


@dataclass
class Published:
    ok: int = 0
    seconds: float = 0.0  # first send to the last answer
    failures: Counter[str] = field(default_factory=Counter)


async def publish(send: Send, count: int, rate: float, phase_id: int, event_bytes: int,
                  in_flight: int, budget: float) -> Published:
    """Events ``0..count-1`` of the phase at ``rate`` per second, never more than
    ``in_flight`` unanswered (a slower server makes the rate drop, not the queue grow)."""
    sample = {"i": count, "t": time.time(), "n": 0, "p": phase_id, "pad": ""}
    pad = "x" * max(0, event_bytes - len(json.dumps(sample, separators=(",", ":"))))
    result = Published()
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(k: int) -> None:
        try:
            # "n" is who published, to bench_delivery's receivers: here nobody they know
            failure = await send(k, {"i": k, "t": time.time(), "n": 0, "p": phase_id, "pad": pad})
        finally:
            slots.release()
        if failure is None:
            result.ok += 1
        else:
            result.failures[failure] += 1

    started = time.monotonic()
    deadline = started + budget
    for k in range(count):
        await asyncio.sleep(max(0.0, started + k / rate - time.monotonic()))
        try:  # (not wait_for: on 3.11 it can swallow a cancel that meets an acquired slot)
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                await slots.acquire()
        except TimeoutError:
            result.failures["not sent: publish budget spent"] += count - k
            break
        task = asyncio.create_task(one(k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(1.0, deadline - time.monotonic()))
    for task in list(tasks):
        task.cancel()
        result.failures["publish cancelled at the budget"] += 1
    result.seconds = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------------------------
# one run: one column at one K


@dataclass
class Measure:
    column: str
    k: int
    round: int
    events: int = 0  # published, steady phase
    expected: int = 0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    redis_cpu: float = 0.0
    node_cpu: float = 0.0
    seconds: float = 0.0  # the steady phase's publishing
    wall: float = 0.0  # just before the first publish to the last delivery
    redis_idle: float | None = None  # CPU seconds per second, nothing published
    calls: Counter[str] = field(default_factory=Counter)  # Redis commands, steady phase
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def redis_us(self) -> float | None:
        return 1e6 * self.redis_cpu / self.events if self.events else None

    @property
    def node_us(self) -> float | None:
        return 1e6 * self.node_cpu / self.events / self.k if self.events else None

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.delivered)


class Bench:
    def __init__(self, args: argparse.Namespace, workers: Workers, redis: RedisProc, tmp: Path) -> None:
        self.args, self.workers, self.redis, self.tmp = args, workers, redis, tmp
        self.phase_ids = itertools.count(1)
        self.rooms = [f"w{i}" for i in range(args.workspaces)]

    async def run(self, measure: Measure, root: Path | None) -> None:
        """Measure one column (``root`` None: the floor) on ``measure.k`` fresh servers; what
        was measured stays in ``measure`` if anything fails or is interrupted."""
        args, k = self.args, measure.k
        mode = FLOOR if root is None else "gateway"
        settings = argparse.Namespace(**{**vars(args), "gateway_root": root or ROOT})
        directory = Path(tempfile.mkdtemp(prefix=f"{measure.column}-k{k}-", dir=self.tmp))
        servers = [Server(mode, i, self.redis.url, directory, settings) for i in range(k)]
        # bench_delivery's gateway dialects are named by wire format; "ws" asks for the
        # gateway's JSON subprotocol on WebSockets and speaks SSE to its streams alike.
        dialect = Dialect(FLOOR if root is None else "ws", args.transport)
        started = time.monotonic()
        try:
            for server in servers:
                server.start()
            await asyncio.gather(*(server.wait_ready(60.0) for server in servers))
            await self.open(measure, dialect, servers)
            # Server 0's publish or Redis, for each workspace; connected once for both phases.
            targets = [dialect.targets(servers[:1], room, args.publish, self.redis.url)[0]
                       for room in self.rooms]
            async with spread_sender(targets) as send:
                await self.phase(measure, send, servers, args.warmup)  # unmeasured
                await quiet(servers, 10.0)
                redis0 = marks([self.redis.pid])
                await asyncio.sleep(args.idle_seconds)
                measure.redis_idle = used(redis0, [self.redis.pid]) / args.idle_seconds
                await self.phase(measure, send, servers, args.events, measure)
        except Exception as exc:  # recorded; the other runs still happen
            measure.errors[f"run aborted: {type(exc).__name__}: {str(exc)[:300]}"] += 1
        finally:
            with contextlib.suppress(Exception):
                await self.workers.close("live")
            for server in servers:
                server.stop()
                for line in server.problems():
                    measure.errors[f"server {server.index} log: {line}"] += 1
            self.flush()
        report_run(measure, time.monotonic() - started)

    def flush(self) -> None:
        import redis

        with contextlib.suppress(Exception), redis.Redis(host="127.0.0.1", port=self.redis.port,
                                                         socket_timeout=10) as client:
            client.flushall()  # the next run starts from an empty Redis

    async def open(self, measure: Measure, dialect: Dialect, servers: list[Server]) -> None:
        """One receiver per workspace per server, spread over the receiver processes."""
        procs = len(self.workers.pipes)
        shares: dict[int, list[Any]] = {i: [] for i in range(procs)}
        for server in servers:
            for w, room in enumerate(self.rooms):
                kind = self.kind(server.index, w)
                request = dialect.request(kind, server.port, room, f"n{server.index}-{room}")
                shares[(server.index * len(self.rooms) + w) % procs].append(
                    (server.port, server.index, kind, request, False))
        want = len(servers) * len(self.rooms)
        opened = await self.workers.open("live", {i: s for i, s in shares.items() if s},
                                         self.args.connect_concurrency, 30.0, 30 + want * 0.05)
        for why, count in opened["failures"].items():
            measure.errors[f"open: {why}"] += count
        if opened["ok"] < want:
            measure.errors["receivers not opened"] += want - opened["ok"]

    async def delivered(self, expected: int) -> dict[str, Any]:
        """The receivers' counts once ``expected`` deliveries arrived, or at --deliver-timeout."""
        deadline = time.monotonic() + self.args.deliver_timeout
        while True:
            state = await self.workers.status("live")
            if state["delivered"] >= expected or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.02)

    def kind(self, server: int, workspace: int) -> str:
        transport = self.args.transport
        return transport if transport != "mixed" else ("ws", "sse")[(server + workspace) % 2]

    async def phase(self, measure: Measure, send: Send, servers: list[Server], count: int,
                    into: Measure | None = None) -> None:
        """Publish ``count`` events over the workspaces; wait (bounded) until every receiver
        has those of its workspace; account them into ``into`` (None: unmeasured)."""
        args = self.args
        phase_id = next(self.phase_ids)
        await self.workers.all("phase", phase_id, count, False)
        before = await self.workers.status("live")
        pids = [server.pid for server in servers]
        calls0 = command_calls(self.redis.port)
        redis0, nodes0, t0 = marks([self.redis.pid]), marks(pids), time.monotonic()
        budget = 30 + 2 * count / args.rate
        published = await publish(send, count, args.rate, phase_id, args.event_bytes,
                                  args.in_flight, budget)
        expected = len(servers) * published.ok  # each workspace has one receiver per server
        state = await self.delivered(expected)
        redis_cpu, node_cpu = used(redis0, [self.redis.pid]), used(nodes0, pids)
        wall = time.monotonic() - t0
        calls = command_calls(self.redis.port) - calls0
        calls.pop("info", None)  # ours
        for why, n in published.failures.items():
            measure.errors[f"publish: {why}"] += n
        for key, what in (("dropped", "receivers closed by the server"),
                          ("stray", "events of no phase, or unreadable")):
            if state[key] > before[key]:
                measure.errors[what] += state[key] - before[key]
        if into is None:
            return
        into.events, into.expected, into.seconds = published.ok, expected, published.seconds
        into.delivered, into.duplicates = state["delivered"], state["duplicates"]
        into.out_of_order = state["out_of_order"]
        into.redis_cpu, into.node_cpu, into.wall, into.calls = redis_cpu, node_cpu, wall, calls


def command_calls(port: int) -> Counter[str]:
    """Redis's calls of each command so far (``INFO commandstats``: a script's own calls are
    counted too, under their command); empty when Redis does not answer."""
    import redis
    from redis.exceptions import RedisError

    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=10,
                         decode_responses=True) as client:
            stats = client.info("commandstats")
    except (RedisError, OSError):
        return Counter()
    return Counter({name.removeprefix("cmdstat_"): int(value["calls"])
                    for name, value in stats.items()})


def report_run(m: Measure, elapsed: float) -> None:
    idle = "-" if m.redis_idle is None else f"{100 * m.redis_idle:.2f} % of a core"
    rate = f"{m.events / m.seconds:.0f}/s" if m.seconds else "-"
    busy = (f"nodes {100 * m.node_cpu / m.wall:.0f} %, Redis {100 * m.redis_cpu / m.wall:.0f} % "
            f"of a core" if m.wall else "-")
    print(f"  round {m.round} K={m.k} {m.column:<16} Redis {fmt(m.redis_us, '.1f')} µs/event, "
          f"nodes {fmt(m.node_us, '.1f')} µs/event/node; {m.delivered}/{m.expected} delivered "
          f"(lost {m.lost}, duplicate {m.duplicates}, out of order {m.out_of_order}); "
          f"{m.events} events at {rate}; {busy}; Redis idle {idle}; {elapsed:.0f} s"
          + (f"  ({sum(m.errors.values())} problems)" if m.errors else ""), flush=True)
    if m.events and m.calls:
        each = ", ".join(f"{name} {count / m.events:.2f}" for name, count in m.calls.most_common(8)
                         if count / m.events >= 0.01)
        print(f"      Redis calls per event ({m.calls.total() / m.events:.2f}): {each}", flush=True)


# ---------------------------------------------------------------------------------------------
# the report


def med(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def figures(measures: list[Measure], column: str, k: int) -> tuple[float | None, float | None]:
    """(Redis µs/event, node µs/event/node): medians over the rounds."""
    runs = [m for m in measures if m.column == column and m.k == k]
    return med([m.redis_us for m in runs]), med([m.node_us for m in runs])


def table(measures: list[Measure], columns: list[str], ks: list[int]) -> list[str]:
    base = min(ks)
    header = ["K"]
    for column in columns:
        header += [f"{column} Redis µs/event", f"{column} node µs/event/node"]
        if column != FLOOR:
            header.append(f"{column} Redis x K={base}")
    lines = ["| " + " | ".join(header) + " |", "|---:|" + "---:|" * (len(header) - 1)]
    for k in ks:
        cells = [str(k)]
        for column in columns:
            redis_us, node_us = figures(measures, column, k)
            cells += [fmt(redis_us, ".1f"), fmt(node_us, ".1f")]
            if column != FLOOR:
                first = figures(measures, column, base)[0]
                cells.append(f"{redis_us / first:.2f}x" if redis_us is not None and first else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def print_report(measures: list[Measure], args: argparse.Namespace, elapsed: float) -> None:
    columns = [c for c in args.columns if any(m.column == c for m in measures)]
    print()
    print(f"bench_nodes: K servers on one redis-server; {args.workspaces} workspaces, one "
          f"{args.transport} receiver per workspace per server; {args.events} events of "
          f"~{args.event_bytes} B at {args.rate:g}/s published by "
          f"{'HTTP on server 0' if args.publish == 'http' else 'MULTI XADD SPUBLISH'}; "
          f"{args.rounds} round(s), median; CPU: schedstat ns, checked against ticks; nproc {os.cpu_count()}; "
          f"{elapsed:.0f} s; load average at start {args.load_at_start:.2f}, at the end "
          f"{os.getloadavg()[0]:.2f} (1 min)")
    for column, root in zip(args.columns, [None, *args.gateway_root], strict=True):
        if root is not None:
            print(f"  {column}: {root} ({describe(root)})")
    print("\n".join(table(measures, columns, args.nodes)))
    for column in columns:
        runs = [m for m in measures if m.column == column]
        print(f"{column}: {sum(m.delivered for m in runs):,} of {sum(m.expected for m in runs):,} "
              f"deliveries; lost {sum(m.lost for m in runs)}, duplicate "
              f"{sum(m.duplicates for m in runs)}, out of order {sum(m.out_of_order for m in runs)}")
    top = max(args.nodes)
    for column in columns:
        if column == FLOOR or top == min(args.nodes):
            continue
        high, low = figures(measures, column, top)[0], figures(measures, column, min(args.nodes))[0]
        if high is not None and low:
            verdict = "met" if high / low <= 1.5 else "not met"
            print(f"target (Redis CPU per event at K={top} ≤ 1.5x K={min(args.nodes)}), "
                  f"{column}: {high / low:.2f}x, {verdict}")
    problems: Counter[str] = Counter()
    for m in measures:
        for what, count in m.errors.items():
            problems[f"{m.column} K={m.k}: {what}"] += count
    if problems:
        print("\nproblems (count, what):")
        for what, count in problems.most_common(30):
            print(f"  {count} x {what}")


def describe(root: Path) -> str:
    """The checkout's commit, and whether its gateway/ has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "gateway"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if not commit:
        return "not a git checkout"
    return f"commit {commit}" + (", gateway/ modified" if dirty else "")


# ---------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    args.load_at_start = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    sys.path.insert(0, str(args.gateway_root[0]))  # gateway.auth.mint_token for the tokens
    want = 2 * max(args.nodes) * args.workspaces + 4096
    raise_nofile(want)
    workers = Workers(args.client_procs, want)
    measures: list[Measure] = []
    try:
        with scratch_redis("bench-nodes-") as (tmp, redis):
            bench = Bench(args, workers, redis, tmp)
            for rnd in range(1, args.rounds + 1):
                for k in args.nodes:
                    for column, root in zip(args.columns, [None, *args.gateway_root], strict=True):
                        if column == FLOOR and args.no_floor:
                            continue
                        measure = Measure(column, k, rnd)
                        measures.append(measure)  # reported even if interrupted
                        await bench.run(measure, root)
    finally:  # also on Ctrl-C and on --timeout: report what was measured
        workers.shutdown()
        print_report(measures, args, time.monotonic() - started)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a ~20 s smoke run: K 1,2; 400 events (flags given explicitly still win)")
    parser.add_argument("--nodes", default=None, help="the Ks, comma-separated: 1,2,4,8")
    parser.add_argument("--workspaces", type=int, default=20)
    parser.add_argument("--events", type=int, default=None, help="steady-phase events: 2000")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second, all workspaces")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured events first: 100")
    parser.add_argument("--idle-seconds", type=float, default=None,
                        help="Redis CPU measured with nothing published: 3")
    parser.add_argument("--event-bytes", type=int, default=200, help="size of an event's data JSON")
    parser.add_argument("--in-flight", type=int, default=64, help="unanswered publishes at most")
    parser.add_argument("--publish", choices=("http", "xadd"), default="http",
                        help="server 0's HTTP publish, or MULTI XADD + SPUBLISH straight to Redis")
    parser.add_argument("--transport", choices=("mixed", "ws", "sse"), default="mixed",
                        help="the receivers' wire format (mixed: WebSocket and SSE alternately)")
    parser.add_argument("--rounds", type=int, default=None, help="3 (quick: 1); medians")
    parser.add_argument("--no-floor", action="store_true", help="the gateway columns only")
    parser.add_argument("--client-procs", type=int, default=2, help="receiver processes")
    parser.add_argument("--connect-concurrency", type=int, default=40)
    parser.add_argument("--deliver-timeout", type=float, default=30.0,
                        help="seconds after the last publish to wait for deliveries")
    parser.add_argument("--timeout", type=float, default=None,
                        help="the whole benchmark stops after this many seconds (default: 120 + "
                             "per run 45 + twice its publishing time)")
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="extra argument for `sync-gateway serve` (repeat it)")
    parser.add_argument("--gateway-root", type=Path, action="append", default=None, metavar="DIR",
                        help="directory whose gateway/ package runs: one column each, in order "
                             "(repeat it to compare checkouts; default: this checkout)")
    args = parser.parse_args(argv)
    defaults = ({"nodes": "1,2", "events": 400, "warmup": 40, "idle_seconds": 1.0, "rounds": 1}
                if args.quick else
                {"nodes": "1,2,4,8", "events": 2000, "warmup": 100, "idle_seconds": 3.0, "rounds": 3})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.nodes = sorted({int(k) for k in args.nodes.split(",") if k.strip()})
    except ValueError:
        parser.error("--nodes takes comma-separated integers")
    if not args.nodes or args.nodes[0] < 1 or args.workspaces < 1 or args.rate <= 0:
        parser.error("need --nodes ≥ 1, --workspaces ≥ 1, --rate > 0")
    if args.rounds < 1 or args.client_procs < 1 or args.events < 1 or args.in_flight < 1:
        parser.error("need --rounds, --client-procs, --events, --in-flight ≥ 1")
    args.gateway_root = [root.resolve() for root in (args.gateway_root or [ROOT])]
    names = [root.name for root in args.gateway_root]
    args.columns = [FLOOR] + (["gateway"] if len(names) == 1 else
                              [f"gw{i + 1}:{n}" for i, n in enumerate(names)])
    if args.timeout is None:
        runs = args.rounds * len(args.nodes) * (len(args.columns) - args.no_floor)
        args.timeout = 120 + runs * (45 + 2 * (args.events + args.warmup) / args.rate)
    return args


if __name__ == "__main__":
    run_bounded("bench_nodes", main, parse_args())
