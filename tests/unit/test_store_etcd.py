"""The etcd backend beyond the shared store contract (tests/unit/test_store.py runs that
on both backends): compaction, several replicas on one prefix, a member restart, the
key layout and bad settings. Each test that needs etcd starts a one-member etcd on
127.0.0.1 (random ports) of its own; they skip, saying why, without the etcd binary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.etcd_client import EtcdClient, EtcdConfig, EtcdConfigError, prefix_end
from controller.store import Store
from controller.store_etcd import EtcdBackend, open_etcd_store
from vmferry.errors import Conflict, Gone, Invalid, NotFound
from vmferry.lab.etcd import EtcdCluster, etcd_binary, missing_reason

pytestmark = pytest.mark.timeout(60)
VMI = "VirtualMachineInstance"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    if etcd_binary() is None:
        pytest.skip(missing_reason())
    cluster = EtcdCluster.plan(tmp_path / "etcd", 1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def vmi(name: str, namespace: str = "default") -> dict:
    return {"kind": VMI, "metadata": {"name": name, "namespace": namespace}, "spec": {"v": 0}}


def rv(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


async def _equal(got: Any, expected: dict) -> bool:
    return bool(await got == expected)


def test_watch_from_compacted_revision_is_gone_and_from_the_compaction_point_is_not(
    etcd: EtcdCluster,
) -> None:
    async def main() -> None:
        store = await open_etcd_store(EtcdConfig(etcd.endpoints), prefix="/c")
        client = EtcdClient.connect(EtcdConfig(etcd.endpoints))
        try:
            first = await store.create(vmi("a"))
            for i in range(5):
                await store.update(dict(vmi("a"), spec={"v": i + 1}))
            now = await store.current_rv()
            await client.compact(now - 1)
            old = store.watch(VMI, None, rv(first))
            with pytest.raises(Gone, match=rf"too old resource version: {rv(first)}"):
                await anext(old)
            # From the compaction point on, history is still there.
            kept = store.watch(VMI, None, now - 1)
            kind, obj = await asyncio.wait_for(anext(kept), 5)
            assert (kind, rv(obj), obj["spec"]) == ("MODIFIED", now, {"v": 5})
            await kept.aclose()
        finally:
            await client.close()
            await store.close()

    asyncio.run(main())


def test_replicas_share_state_and_compare_on_mod_revision(etcd: EtcdCluster) -> None:
    async def main() -> None:
        a = await open_etcd_store(EtcdConfig(etcd.endpoints), prefix="/r")
        b = await open_etcd_store(EtcdConfig(etcd.endpoints), prefix="/r")
        try:
            watch_b = b.watch(VMI, None, await b.current_rv())
            created = await a.create(vmi("x"))
            kind, seen = await asyncio.wait_for(anext(watch_b), 5)
            assert (kind, seen) == ("ADDED", created)
            assert await b.get(VMI, "default", "x") == created  # B's cache has it now

            updated = await a.update(dict(created, spec={"v": 1}))
            # B may not have applied A's update yet: a stale resourceVersion is a Conflict
            # either way, a blind update is last writer wins on the current state.
            with pytest.raises(Conflict, match="has been modified"):
                await b.update(dict(created, spec={"v": 2}))
            blind = await b.update(dict(vmi("x"), spec={"v": 3}))
            assert blind["metadata"]["generation"] == 3 and rv(blind) > rv(updated)
            await eventually(lambda: _equal(a.get(VMI, "default", "x"), blind))
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_replica_resumes_after_its_member_restarts_and_reloads_after_compaction(
    etcd: EtcdCluster,
) -> None:
    async def main() -> None:
        store = await open_etcd_store(EtcdConfig(etcd.endpoints), prefix="/m")
        try:
            await store.create(vmi("before"))
            live = store.watch(VMI, None, await store.current_rv())
            pending = asyncio.ensure_future(anext(live))

            etcd.kill("etcd-1")
            etcd.start_member(etcd.members[0])
            other = await open_etcd_store(EtcdConfig(etcd.endpoints), prefix="/m")
            await other.create(vmi("during"))
            kind, obj = await asyncio.wait_for(pending, 10)  # the feed resumed: no gap
            assert (kind, obj["metadata"]["name"]) == ("ADDED", "during")

            # Lose the feed again and compact past it while it is away (the store's next
            # watch waits at a gate until then): the replica reloads its cache and its
            # watchers are told to list again.
            client = store.backend.client  # type: ignore[attr-defined]
            gate = asyncio.Event()
            real_watch = client.watch

            async def gated_watch(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                await gate.wait()
                async for response in real_watch(*args, **kwargs):
                    yield response

            client.watch = gated_watch
            etcd.kill("etcd-1")
            etcd.start_member(etcd.members[0])
            await other.delete(VMI, "default", "before")
            await other.create(vmi("after"))  # the compaction point is past the delete
            compactor = EtcdClient.connect(EtcdConfig(etcd.endpoints))
            await compactor.compact((await compactor.range(b"/m/")).header.revision)
            await compactor.close()
            gate.set()
            with pytest.raises(Gone):
                async with asyncio.timeout(10):
                    async for _ in live:
                        pass

            async def reloaded() -> bool:
                try:
                    await store.get(VMI, "default", "before")
                except NotFound:
                    return True
                return False

            await eventually(reloaded, 10)
            await other.close()
        finally:
            await store.close()

    asyncio.run(main())


def test_key_layout_and_value_encoding(etcd: EtcdCluster) -> None:
    async def main() -> None:
        store = await open_etcd_store(EtcdConfig(etcd.endpoints), prefix="/k")
        client = EtcdClient.connect(EtcdConfig(etcd.endpoints))
        try:
            created = await store.create(vmi("vm1", "ns1"))
            await store.create({"kind": "Node", "metadata": {"name": "n1"}})
            response = await client.range(b"/k/", prefix_end(b"/k/"))
            keys = [kv.key for kv in response.kvs]
            assert keys == [b"/k/registry/Node//n1", b"/k/registry/VirtualMachineInstance/ns1/vm1"]
            stored = json.loads(response.kvs[1].value)
            assert "resourceVersion" not in stored["metadata"]
            assert response.kvs[1].mod_revision == rv(created)
            with pytest.raises(Invalid, match="may not contain '/'"):
                await store.create(vmi("x", "a/b"))
        finally:
            await client.close()
            await store.close()

    asyncio.run(main())


def test_bad_settings_are_named() -> None:
    with pytest.raises(EtcdConfigError, match="no address"):
        EtcdConfig(()).target()
    with pytest.raises(EtcdConfigError, match="not host:port"):
        EtcdConfig(("127.0.0.1",)).target()
    with pytest.raises(EtcdConfigError, match="must be IP addresses"):
        EtcdConfig(("etcd-1:2379", "etcd-2:2379")).target()
    with pytest.raises(EtcdConfigError, match="mix"):
        EtcdConfig(("127.0.0.1:2379", "[::1]:2379")).target()
    assert EtcdConfig(("etcd-1:2379",)).target() == "etcd-1:2379"
    assert EtcdConfig(("192.0.2.1:2379", "192.0.2.2:2379")).target() == (
        "ipv4:192.0.2.1:2379,192.0.2.2:2379"
    )
    assert EtcdConfig(("[2001:db8::1]:2379", "[2001:db8::2]:2379")).target().startswith("ipv6:")

    async def bad_prefix() -> None:
        client = EtcdClient.connect(EtcdConfig(("127.0.0.1:1",)))
        try:
            with pytest.raises(ValueError, match="prefix"):
                EtcdBackend(client, "no-slash")
        finally:
            await client.close()

    asyncio.run(bad_prefix())


def test_unreachable_etcd_is_unavailable_not_a_hang() -> None:
    async def main() -> None:
        config = EtcdConfig(("127.0.0.1:1",), timeout=0.2)
        from vmferry.errors import Unavailable

        with pytest.raises(Unavailable, match="etcd"):
            await open_etcd_store(config)

    asyncio.run(main())


def test_store_front_is_the_same_class() -> None:
    assert open_etcd_store.__annotations__["return"] in ("Store", Store)
