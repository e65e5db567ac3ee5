"""Combined writes per key (``gateway.combining``), without Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.combining import Combiner


class Store:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def write(self, key: str, items: list[int]) -> list[str]:
        self.batches.append((key, items))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [f"{key}:{item}" for item in items]


async def test_concurrent_writes_of_one_key_go_together_in_order_and_keys_run_apart() -> None:
    store = Store()
    combiner: Combiner[str, int, str] = Combiner(store.write)
    first = asyncio.create_task(combiner.submit("a", 0))
    await asyncio.sleep(0)  # the writer of "a" starts with item 0
    rest = [asyncio.create_task(combiner.submit("a", n)) for n in range(1, 6)]
    other = asyncio.create_task(combiner.submit("b", 9))
    await asyncio.sleep(0)
    store.release.set()
    assert await asyncio.gather(first, *rest, other) == [f"a:{n}" for n in range(6)] + ["b:9"]
    # One batch with the first, one with all five that waited; "b" on its own.
    assert sorted(store.batches) == [("a", [0]), ("a", [1, 2, 3, 4, 5]), ("b", [9])]
    assert combiner.keys_busy == 0


async def test_a_caller_that_gave_up_before_its_batch_is_left_out() -> None:
    store = Store()
    combiner: Combiner[str, int, str] = Combiner(store.write)
    first = asyncio.create_task(combiner.submit("a", 0))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(combiner.submit("a", 1))
    stayer = asyncio.create_task(combiner.submit("a", 2))
    await asyncio.sleep(0)
    quitter.cancel()
    store.release.set()
    assert await first == "a:0" and await stayer == "a:2"
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert store.batches == [("a", [0]), ("a", [2])]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    store = Store()
    combiner: Combiner[str, int, str] = Combiner(store.write)
    store.fail = RuntimeError("backend down")
    first = asyncio.create_task(combiner.submit("a", 0))
    await asyncio.sleep(0)
    later = asyncio.create_task(combiner.submit("a", 1))
    await asyncio.sleep(0)
    store.release.set()
    with pytest.raises(RuntimeError):
        await first
    with pytest.raises(RuntimeError):
        await later  # its batch ran (and failed the same way): nobody waits forever
    store.fail = None
    assert await combiner.submit("a", 2) == "a:2"


async def test_closing_cancels_waiting_callers() -> None:
    store = Store()
    combiner: Combiner[str, int, str] = Combiner(store.write)
    waiting = [asyncio.create_task(combiner.submit("a", n)) for n in range(3)]
    await asyncio.sleep(0)
    await combiner.close()
    for task in waiting:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert combiner.keys_busy == 0


async def test_a_limited_batch_leaves_the_rest_to_the_next_in_order_and_skips_quitters() -> None:
    store = Store()
    store.release.set()
    combiner: Combiner[str, int, str] = Combiner(store.write, limit=2)
    tasks = [asyncio.create_task(combiner.submit("a", n)) for n in range(6)]
    await asyncio.sleep(0)  # all six are queued before the writer runs
    tasks[1].cancel()  # gave up before its batch: left out, and takes no place in one
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for n, r in enumerate(results) if n != 1] == ["a:0", "a:2", "a:3", "a:4", "a:5"]
    assert isinstance(results[1], asyncio.CancelledError)
    assert store.batches == [("a", [0, 2]), ("a", [3, 4]), ("a", [5])]
    with pytest.raises(ValueError):
        Combiner(store.write, limit=0)
