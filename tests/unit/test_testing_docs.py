"""The examples in docs/testing.md run: each block is executed, then its tests awaited."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCKS = [
    block
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    if "async def test_" in block  # complete examples, not fragments
]


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example-{i}" for i in range(len(BLOCKS))])
async def test_example_runs(block: str) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    exec(compile(block, str(DOC), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests, "an example defines at least one test"
    for test in tests:
        assert inspect.iscoroutinefunction(test)
        await test()
