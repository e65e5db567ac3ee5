"""Node liveness decisions, pure: what a node does after each heartbeat, and which peers
are dead. The process that talks to Redis (``redis_liveness``) only carries them out —
the way Phoenix's tracker keeps its ``Replica`` state apart from the shard doing I/O.

A node beats every ``node_timeout / 3``. A beat answers ``ok`` (alive all along),
``lapsed`` (its key had expired: peers may have removed its sessions), ``taken``
(another process uses this node id), or ``reaped`` (a peer is removing its sessions
right now). After a lapse, a reaping, an outage or a failure, the node re-asserts what
it holds once it beats normally again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

BACKOFF_START: Final = 0.1
BACKOFF_CAP: Final = 2.0
REAPED_RETRY: Final = 0.2  # beat again this soon while a peer reaps this node

UP: Final = "up"
REAPED: Final = "reaped"
DOWN: Final = "down"  # Redis unreachable
FAILING: Final = "failing"  # an unforeseen error


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after one beat: sleep this long; re-assert now or not; log this
    (level, message) — at most once per change of state."""

    sleep: float
    reassert: bool = False
    log: tuple[str, str] | None = None


class Heartbeat:
    """The state of one node's heartbeat, moved by what each beat answers."""

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.state = UP
        self._must_reassert = False
        self._delay = BACKOFF_START

    def answered(self, result: str) -> Step:
        """The beat reached Redis and answered ``result``."""
        if result == REAPED:
            message = None
            if self.state != REAPED:
                message = ("warning", "peers are removing this node's sessions (it missed its "
                                      "heartbeat); re-asserting after")
            self.state, self._must_reassert = REAPED, True
            return Step(REAPED_RETRY, log=message)
        message = None
        if result != "ok":
            if result == "taken":
                message = ("error", "another process uses this node id; node ids must be unique")
            elif self.state == UP:
                message = ("warning", "this node's heartbeat had lapsed; re-asserting its sessions")
            self._must_reassert = True
        if self.state != UP:
            message = message or ("info", "redis heartbeat healthy again")
            self._must_reassert = True
        self.state, self._delay = UP, BACKOFF_START
        reassert, self._must_reassert = self._must_reassert, False
        return Step(self.interval, reassert=reassert, log=message)

    def failed(self, *, unavailable: bool) -> Step:
        """The beat did not get an answer (``unavailable``: Redis unreachable)."""
        state = DOWN if unavailable else FAILING
        message = None
        if self.state != state:
            message = ("warning", "redis unreachable; retrying with backoff") if unavailable else (
                "exception", "heartbeat failed; retrying with backoff")
        self.state, self._must_reassert = state, True
        delay, self._delay = self._delay, min(self._delay * 2, BACKOFF_CAP)
        return Step(delay, log=message)


def claim_lifetime_ms(node_timeout: float) -> int:
    """How long a claim to reap a node lasts unless renewed: twice the timeout, at least 10 s."""
    return int(max(node_timeout * 2, 10.0) * 1000)


def dead_peers(me: str, nodes: Sequence[str], alive: Sequence[bool]) -> list[str]:
    """The nodes other than ``me`` whose alive key is gone, in a stable order."""
    return sorted({node for node, is_alive in zip(nodes, alive, strict=True)
                   if not is_alive and node != me})


def may_judge_peers(*, beating: bool, now: float, recovered_at: float | None,
                    node_timeout: float) -> bool:
    """Whether a node may take a peer's missing alive key for its death: only while its own
    heartbeat reaches Redis, and not until a whole ``node_timeout`` after it came back
    (``recovered_at``; ``now`` on the same monotonic clock). What cut this node off — a Redis
    restart, a cluster failover answering ``CLUSTERDOWN`` on every shard — stopped the
    peers' beats as well, and their keys may have expired meanwhile: they get one timeout
    to beat again. A peer really dead is reaped that much later; the peers of a node cut
    off alone (a partition) still reap it within the timeout, their own beats never failed."""
    if not beating:
        return False
    return recovered_at is None or now - recovered_at >= node_timeout


def may_forget(*, force: bool, failed: bool, index_left: bool) -> bool:
    """Whether a reaper removes the node from the set of known nodes: only after a complete
    reaping of a dead node (not its own previous incarnation, which stays registered)."""
    return not force and not failed and not index_left


class Link:
    """Whether this node's link to Redis works, from the outcomes of its round trips (the
    heartbeat's, every node_timeout/3, and every request's). Current while the latest
    outcome was an answer and an answer came within ``within`` seconds: a node cut off
    (a partition) stops being current as soon as one round trip times out, and within
    ``within`` at the latest. Times are ``time.monotonic()``, given by the caller."""

    def __init__(self, within: float) -> None:
        if within <= 0:
            raise ValueError("within must be positive")
        self.within = within
        self._answered_at = float("-inf")
        self._failing = False

    def answered(self, now: float) -> None:
        self._answered_at, self._failing = now, False

    def failed(self) -> None:
        self._failing = True

    def current(self, now: float) -> bool:
        return not self._failing and now - self._answered_at < self.within
