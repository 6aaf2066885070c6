"""A one-member etcd on 127.0.0.1 (random ports) for the store's tests, and the store
factories that put the same contract tests on SQLite and on etcd."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.etcd_client import EtcdConfig
from controller.store import Store
from controller.store_etcd import open_etcd_store
from vmferry.lab.etcd import EtcdCluster, etcd_binary, missing_reason


@pytest.fixture(scope="session")
def etcd_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ...]]:
    """A running one-member etcd for the session; skips (saying why) without etcd."""
    if etcd_binary() is None:
        pytest.skip(missing_reason())
    cluster = EtcdCluster.plan(tmp_path_factory.mktemp("etcd"), 1)
    cluster.start()
    try:
        yield cluster.endpoints
    finally:
        cluster.stop()


async def open_store(
    backend: str, tmp_path: Path, endpoints: tuple[str, ...] | None, **options: Any
) -> Store:
    """A fresh store: SQLite in ``tmp_path``, or etcd under a prefix of its own."""
    if backend == "sqlite":
        return await Store.open(tmp_path / "store.db", **options)
    assert endpoints is not None
    options.pop("history", None)  # etcd keeps its own history (until compacted)
    prefix = f"/test-{uuid.uuid4().hex[:12]}"
    return await open_etcd_store(EtcdConfig(endpoints), prefix=prefix, **options)
