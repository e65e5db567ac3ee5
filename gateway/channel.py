"""The state of one WebSocket connection that is not about aiohttp: its bounded send
queue, its subscriptions, and its rate limit.

Every subscription of a socket feeds the socket's one ``Outgoing`` queue without
awaiting: the queue is bounded, and a socket whose client does not read overflows
it and is closed (and nobody else notices). Events are queued as ``Envelope``
objects shared with every other subscriber, so a slow socket pins at most
``limit`` shared envelopes, never copies.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

from gateway.hub import REPLAY_PAGE, Closed, Outbox, Resync, is_after, sync_envelope
from protocol.envelope import SYNC_RESET, Envelope, EventId, WorkspaceKey

# What a socket sends: an event (encoded once per encoding by the writer) or an
# already-encoded message (a reply, an error, a pong).
Frame = Envelope | bytes

OVERFLOW: Final = "overflow"


class _Replayed:
    """A replayed frame in the queue (it counts against the replay window, not the limit)."""

    __slots__ = ("frame",)

    def __init__(self, frame: Frame) -> None:
        self.frame = frame


class Outgoing:
    """A socket's bounded send queue.

    ``offer`` never blocks; past ``limit`` queued frames (live events and answers) it
    closes the queue with ``overflow``. ``put`` is for replays, which the client asked for
    and reads at its own pace: it waits while ``replay_window`` replayed frames are queued,
    and replayed frames never count against ``limit`` (a long resume of one workspace does
    not make another's live event overflow). Once closed, ``next`` answers ``Closed`` at
    once: queued frames are dropped (the client resumes with ``since``), except the
    ``farewell`` frames given to ``close``, which the writer sends before closing.
    """

    def __init__(self, limit: int, on_close: Callable[[str], None] | None = None,
                 replay_window: int = REPLAY_PAGE) -> None:
        self._frames: deque[Frame | _Replayed] = deque()
        self._limit = limit
        self._window = replay_window
        self._replayed = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.closed: Closed | None = None
        self.farewell: tuple[Frame, ...] = ()
        self._on_close = on_close

    def offer(self, frame: Frame) -> bool:
        if self.closed is not None:
            return False
        if len(self._frames) - self._replayed >= self._limit:
            self.close(OVERFLOW)
            return False
        self._frames.append(frame)
        self._ready.set()
        return True

    async def put(self, frame: Frame) -> bool:
        """Queue a replayed ``frame`` once the replay window has room; False if the queue
        is (or gets) closed."""
        while self.closed is None and self._replayed >= self._window:
            self._room.clear()
            await self._room.wait()
        if self.closed is not None:
            return False
        self._replayed += 1
        self._frames.append(_Replayed(frame))
        self._ready.set()
        return True

    def close(self, reason: str, farewell: tuple[Frame, ...] = ()) -> None:
        if self.closed is not None:
            return
        self.closed = Closed(reason)
        self.farewell = farewell
        self._frames.clear()
        self._replayed = 0
        self._ready.set()
        self._room.set()
        if self._on_close is not None:
            self._on_close(reason)

    async def next(self) -> Frame | Closed:
        while True:
            if self.closed is not None:
                return self.closed
            if self._frames:
                frame = self._frames.popleft()
                if isinstance(frame, _Replayed):
                    self._replayed -= 1
                    self._room.set()
                    return frame.frame
                return frame
            self._ready.clear()
            await self._ready.wait()

    def __len__(self) -> int:
        return len(self._frames)


class Subscription(Outbox):
    """One workspace followed by one socket: the outbox its feed offers events to.

    Until ``go_live`` (while the reply and the replay are being queued) live events
    wait here, bounded like any outbox; from then on each event after the cursor is
    forwarded to the socket's queue at once. A history loss (``Resync``) forwards
    ``sync.reset`` and the fresh snapshot, as SSE does. Closing it (drain, overflow)
    closes the socket's queue with the same reason.
    """

    def __init__(self, workspace: WorkspaceKey, outgoing: Outgoing, limit: int) -> None:
        super().__init__(limit, on_close=outgoing.close)
        self.workspace = workspace
        self._outgoing = outgoing
        # Events up to here were queued by the replay; None once a newer one went through
        # (from then on the feed's order holds, and no id needs parsing on the hot path).
        self._skip_through: EventId | None = None
        self._last_id = ""
        self._live = False
        self.replaying: asyncio.Task[None] | None = None  # the replay being written, if any

    def offer(self, item: Envelope | Resync) -> bool:
        if not self._live:
            return super().offer(item)
        return self._forward(item)

    def go_live(self, cursor: EventId | None) -> None:
        """Forward what waited (skipping what the replay covered), then every later event."""
        self._skip_through = cursor
        self._last_id = str(cursor) if cursor else ""
        self._live = True
        while self._items and self.closed is None:
            self._forward(self._items.popleft())

    def _forward(self, item: Envelope | Resync) -> bool:
        if self.closed is not None:
            return False
        if isinstance(item, Resync):
            reset = sync_envelope(self.workspace, SYNC_RESET, item.snapshot.id,
                                  {"reason": "history_lost", "last_event_id": self._last_id})
            self._skip_through = EventId.parse(item.snapshot.id)
            self._last_id = item.snapshot.id
            return self._outgoing.offer(reset) and self._outgoing.offer(item.snapshot)
        if self._skip_through is not None:
            if not is_after(item, self._skip_through):
                return True  # already queued by the replay
            self._skip_through = None
        self._last_id = item.id
        return self._outgoing.offer(item)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; ``take`` spends one if there is one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    @property
    def full(self) -> bool:
        """True when no token has been spent recently (the client is within its rate)."""
        return self._tokens >= self._burst - 1.0

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._at)  # a clock stepping back refills nothing
        self._at = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
