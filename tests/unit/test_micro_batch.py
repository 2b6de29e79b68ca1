"""`MicroBatch`: the store calls of one turn of the loop go as one batch, and each caller
still gets its own answer or its own error (issue 16)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from consumer.stores._batching import MicroBatch


class Server:
    """Answers each item with its double; fails the items listed, or the whole batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.bad_items: set[int] = set()
        self.down = False
        self.release = asyncio.Event()
        self.release.set()
        self.sent = asyncio.Event()  # set by each batch as it arrives

    async def send(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.sent.set()
        await self.release.wait()
        if self.down:
            raise ConnectionError("store down")
        return [ValueError(f"bad {i}") if i in self.bad_items else i * 2 for i in items]


async def test_the_calls_of_one_turn_go_as_one_batch_each_with_its_answer() -> None:
    server = Server()
    batch = MicroBatch(server.send, max_batch=100)
    answers = await asyncio.gather(*(batch(i) for i in range(250)))
    assert answers == [i * 2 for i in range(250)]
    assert [len(sent) for sent in server.batches] == [100, 100, 50]
    assert sorted(i for sent in server.batches for i in sent) == list(range(250))


async def test_an_item_error_reaches_its_caller_only() -> None:
    server = Server()
    server.bad_items = {3, 7}
    batch = MicroBatch(server.send)
    results = await asyncio.gather(*(batch(i) for i in range(10)), return_exceptions=True)
    assert [str(r) for r in results if isinstance(r, ValueError)] == ["bad 3", "bad 7"]
    assert [r for r in results if not isinstance(r, Exception)] == [
        i * 2 for i in range(10) if i not in (3, 7)
    ]
    assert len(server.batches) == 1


async def test_a_failed_batch_fails_every_caller_and_the_next_turn_sends_again() -> None:
    server = Server()
    server.down = True
    batch = MicroBatch(server.send)
    results = await asyncio.gather(*(batch(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    server.down = False
    assert await asyncio.gather(*(batch(i) for i in range(5))) == [0, 2, 4, 6, 8]
    assert len(server.batches) == 2


async def test_a_cancelled_caller_leaves_the_others_their_answers() -> None:
    server = Server()
    server.release.clear()
    batch = MicroBatch(server.send)
    calls = [asyncio.create_task(batch(i)) for i in range(4)]
    await server.sent.wait()
    calls[1].cancel()
    server.release.set()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert [done[0], done[2], done[3]] == [0, 4, 6]


async def test_close_sends_what_is_pending_and_bounds_the_wait() -> None:
    server = Server()
    batch = MicroBatch(server.send)
    call = asyncio.create_task(batch(21))
    await asyncio.sleep(0)  # the call is queued, its flush not yet run
    await batch.close()
    assert await call == 42
    server.release.clear()
    server.sent.clear()
    stuck = asyncio.create_task(batch(1))
    await server.sent.wait()
    await batch.close(timeout_s=0.05)
    with pytest.raises(asyncio.CancelledError):
        await stuck
