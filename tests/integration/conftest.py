"""Integration tests: a real lab (controller + 3 handlers as processes, mTLS) per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lab import LabHarness


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("lab")))
    harness.up(nodes=3)
    try:
        yield harness
    finally:
        harness.down()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
