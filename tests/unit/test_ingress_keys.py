"""The `Idempotency-Key` binding's state machine (`consumer/stores/_keys.py`) on the memory
status store; `tests/integration/test_ingress_keys.py` runs the same on Redis."""

from __future__ import annotations

import asyncio

import pytest

from consumer.stores import KeyState, MemoryStatusStore
from jobstream._ingress_keys import binding_name, fingerprint


async def test_reserve_publish_and_repeat() -> None:
    store = MemoryStatusStore()
    first = await store.reserve_key("k", "job-1", "fp", 30)
    again = await store.reserve_key("k", "job-2", "fp", 30)
    assert first.held and (first.binding.job_id, first.binding.state) == ("job-1", "reserved")
    assert not again.held and again.binding == first.binding, "reserved: the repeat waits"
    await store.settle_key("k", first.binding.holder, KeyState.PUBLISHED, spooled=True)
    repeat = await store.reserve_key("k", "job-3", "fp", 30)
    assert not repeat.held
    assert (repeat.binding.state, repeat.binding.job_id, repeat.binding.spooled) == (
        KeyState.PUBLISHED,
        "job-1",
        True,
    )


async def test_failed_is_taken_over_under_the_same_job_id() -> None:
    store = MemoryStatusStore()
    first = await store.reserve_key("k", "job-1", "fp", 30)
    await store.settle_key("k", first.binding.holder, KeyState.FAILED)
    retry = await store.reserve_key("k", "job-2", "fp", 30)
    assert retry.held and retry.binding.job_id == "job-1"
    assert retry.binding.holder != first.binding.holder
    # The old holder cannot fail the new reservation; publishing is final for anyone.
    await store.settle_key("k", first.binding.holder, KeyState.FAILED)
    assert not (await store.reserve_key("k", "job-3", "fp", 30)).held
    await store.settle_key("k", first.binding.holder, KeyState.PUBLISHED)
    await store.settle_key("k", retry.binding.holder, KeyState.FAILED)
    final = await store.reserve_key("k", "job-4", "fp", 30)
    assert (final.held, final.binding.state) == (False, KeyState.PUBLISHED)


async def test_an_expired_lease_counts_as_failed() -> None:
    store = MemoryStatusStore()
    await store.reserve_key("k", "job-1", "fp", 0.05)
    await asyncio.sleep(0.1)
    retry = await store.reserve_key("k", "job-2", "fp", 30)
    assert retry.held and retry.binding.job_id == "job-1"


async def test_another_fingerprint_never_takes_the_key() -> None:
    store = MemoryStatusStore()
    first = await store.reserve_key("k", "job-1", "fp", 30)
    await store.settle_key("k", first.binding.holder, KeyState.FAILED)
    other = await store.reserve_key("k", "job-2", "other", 30)
    assert not other.held and other.binding.fingerprint == "fp"


async def test_settling_as_reserved_is_refused() -> None:
    store = MemoryStatusStore()
    first = await store.reserve_key("k", "job-1", "fp", 30)
    with pytest.raises(ValueError, match="never reserved"):
        await store.settle_key("k", first.binding.holder, KeyState.RESERVED)


def test_fingerprint_covers_type_version_key_and_body() -> None:
    base = fingerprint("t", 1, None, b"{}")
    assert fingerprint("t", 1, None, b"{}") == base
    others = [
        fingerprint("u", 1, None, b"{}"),
        fingerprint("t", 2, None, b"{}"),
        fingerprint("t", 1, "", b"{}"),
        fingerprint("t", 1, "k", b"{}"),
        fingerprint("t", 1, None, b"{ }"),
    ]
    assert len({base, *others}) == 6
    assert fingerprint("t", 1, "ab", b"c") != fingerprint("t", 1, "a", b"bc")


def test_binding_names_are_per_type_and_bounded() -> None:
    name = binding_name("report.generate", "k" * 100_000)
    assert name.startswith("report.generate:") and len(name) == len("report.generate:") + 64
    assert binding_name("a", "k") != binding_name("b", "k")
