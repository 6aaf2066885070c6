"""The scheduling index (``controller.sched_index``, ``migration_queue.MigrationQueue``):
its answers equal those of the full scans it replaces, across creates, updates, deletes
and node removal, and it is as current as the store right after a write.

The admission walk below is the one the queue replaced (every VMIM and VMI, sorted per
decision): random histories compare the two decision by decision.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from controller import scheduler
from controller.migration_controller import without_heartbeats
from controller.migration_queue import (
    EVACUATION_ANNOTATION,
    Admission,
    MigrationQueue,
    queue_order,
)
from controller.store import Store
from vmferry.migration_state import ConfigKey, Field, MigrationPhase, VMIPhase
from vmferry.objects import kinds

pytestmark = pytest.mark.timeout(60)
Obj = dict[str, Any]
VMI = "VirtualMachineInstance"
VMIM = "VirtualMachineInstanceMigration"
PHASES = [
    MigrationPhase.UNSET,
    MigrationPhase.PENDING,
    MigrationPhase.PENDING,
    MigrationPhase.PENDING,
    MigrationPhase.SCHEDULING,
    MigrationPhase.RUNNING,
    MigrationPhase.SUCCEEDED,
    MigrationPhase.FAILED,
]


def reference_admit(
    vmim: Obj, vmims: Iterable[Obj], vmis: Iterable[Obj], config: Mapping[str, Any]
) -> Admission:
    """The admission walk over full lists, as it was before the index."""
    node_of = {
        (v["metadata"]["namespace"], v["metadata"]["name"]): (v.get("status") or {}).get("nodeName")
        for v in vmis
    }

    def source(m: Obj) -> str | None:
        return node_of.get((m["metadata"]["namespace"], m["spec"]["vmiName"]))

    everything = list(vmims)
    active = [m for m in everything if MigrationPhase.of(m).active]
    outbound = Counter(source(m) for m in active)
    limit = int(config[ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER])
    per_node = int(config[ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE])
    free = limit - len(active)
    queue = sorted(
        (
            m
            for m in everything
            if MigrationPhase.of(m) == MigrationPhase.PENDING
            and not m["metadata"].get("deletionTimestamp")
        ),
        key=queue_order,
    )
    uid = vmim["metadata"]["uid"]
    for candidate in queue:
        if free <= 0:
            break
        src = source(candidate)
        if outbound[src] >= per_node:
            if candidate["metadata"]["uid"] == uid:
                return Admission(False, f"{outbound[src]} migrations already leave node {src}")
            continue
        if candidate["metadata"]["uid"] == uid:
            return Admission(True)
        free -= 1
        outbound[src] += 1
    return Admission(False, f"waiting in the queue ({len(active)} running, limit {limit})")


def vmim_obj(rng: random.Random, ns: str, name: str, vmis: list[str]) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": ns,
        "uid": f"uid-{ns}-{name}-{rng.randrange(3)}",
        # Few distinct timestamps: the tie-breaks (name, namespace) matter.
        "creationTimestamp": f"2026-01-01T00:00:0{rng.randrange(3)}Z",
    }
    if rng.random() < 0.3:
        meta["annotations"] = {EVACUATION_ANNOTATION: "n0"}
    if rng.random() < 0.1:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    phase = rng.choice(PHASES)
    status: Obj = {"phase": phase.value} if phase.value else {}
    if rng.random() < 0.3:
        status["migrationState"] = {Field.MIGRATION_UID: f"sender-{rng.randrange(4)}"}
    return {"metadata": meta, "spec": {"vmiName": rng.choice(vmis)}, "status": status}


@pytest.mark.parametrize("seed", range(6))
def test_the_queue_decides_as_the_full_walk_through_a_random_history(seed: int) -> None:
    rng = random.Random(seed)
    namespaces = ["a", "b"]
    vmi_names = [f"v{i}" for i in range(6)]
    nodes = [None, "n0", "n1", "n2"]
    queue = MigrationQueue()
    vmims: dict[tuple[str, str], Obj] = {}
    vmis: dict[tuple[str, str], Obj] = {}
    for _ in range(300):
        roll = rng.random()
        if roll < 0.5:  # create or update a VMIM
            ns, name = rng.choice(namespaces), f"m{rng.randrange(10)}"
            vmims[(ns, name)] = vmim_obj(rng, ns, name, vmi_names)
            queue.set_vmim((ns, name), vmims[(ns, name)])
        elif roll < 0.6 and vmims:  # delete a VMIM
            key = rng.choice(sorted(vmims))
            del vmims[key]
            queue.set_vmim(key, None)
        elif roll < 0.9:  # a VMI moves (or appears)
            key = (rng.choice(namespaces), rng.choice(vmi_names))
            node = rng.choice(nodes)
            vmis[key] = {
                "metadata": {"namespace": key[0], "name": key[1]},
                "status": {"nodeName": node} if node else {},
            }
            queue.set_vmi_node(key, node)
        elif vmis:  # a VMI is deleted
            key = rng.choice(sorted(vmis))
            del vmis[key]
            queue.set_vmi_node(key, None)
        config: dict[str, Any] = {
            ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER: rng.randrange(0, 6),
            ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE: rng.randrange(0, 4),
        }
        listed = [vmims[k] for k in sorted(vmims)]  # a store list's order
        for candidate in listed:
            expected = reference_admit(candidate, listed, vmis.values(), config)
            assert queue.admit(candidate, config) == expected, candidate
        open_ = {
            k: MigrationPhase.of(m) for k, m in vmims.items() if not MigrationPhase.of(m).final
        }
        assert queue.unfinished() == open_
        unfinished = {
            m["metadata"]["uid"] for m in vmims.values() if not MigrationPhase.of(m).final
        }
        unfinished |= {
            m["status"]["migrationState"][Field.MIGRATION_UID]
            for m in vmims.values()
            if not MigrationPhase.of(m).final and "migrationState" in m["status"]
        }
        assert queue.unfinished_uids() == unfinished
        assert queue.ended_uids() == {
            m["metadata"]["uid"] for m in vmims.values() if MigrationPhase.of(m).final
        }
        for ns in namespaces:
            for vmi_name in vmi_names:
                assert queue.migrations_of(ns, vmi_name) == sorted(
                    k[1]
                    for k, m in vmims.items()
                    if k[0] == ns and m["spec"]["vmiName"] == vmi_name
                )


def node_obj(name: str, memory: str = "1Gi") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {
            "capacity": {"memory": memory},
            "nodeInfo": {"cpuModel": "m"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def vmi_obj(name: str, memory: str = "256Mi") -> Obj:
    return {
        "apiVersion": kinds.KUBEVIRT,
        "kind": VMI,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"domain": {"memory": {"guest": memory}}},
    }


async def assert_matches_store(store: Store) -> None:
    """The index equals what full lists of the store give."""
    vmis, _ = await store.list(VMI)
    nodes, _ = await store.list("Node")
    assert dict(store.index.memory_used()) == scheduler.memory_usage(vmis)
    assert [facts.obj for facts in store.index.nodes()] == nodes
    assert store.index.nodes() == [scheduler.NodeFacts.of(node) for node in nodes]


def test_the_store_keeps_nodes_and_memory_in_use_through_every_change(tmp_path: Path) -> None:
    async def body() -> None:
        store = await Store.open(tmp_path / "s.db")
        try:
            for name in ("n1", "n2", "n3"):
                await store.create(node_obj(name))
            await store.create(vmi_obj("a", "512Mi"))
            await assert_matches_store(store)
            assert store.index.memory_used() == {}  # not placed: holds nothing

            a = await store.get(VMI, "default", "a")
            a["status"] = {"phase": VMIPhase.RUNNING, "nodeName": "n1"}
            a = await store.update(a, subresource="status")
            assert store.index.memory_used() == {"n1": 512 << 20}

            # A migration to n2 in progress: held on both; once ended, on the source only.
            a["status"]["migrationState"] = {Field.TARGET_NODE: "n2", Field.MIGRATION_UID: "u"}
            a = await store.update(a, subresource="status")
            assert store.index.memory_used() == {"n1": 512 << 20, "n2": 512 << 20}
            await assert_matches_store(store)
            a["status"]["migrationState"][Field.FAILED] = True
            a["status"]["migrationState"][Field.END_TIMESTAMP] = "2026-01-01T00:00:00Z"
            a = await store.update(a, subresource="status")
            assert store.index.memory_used() == {"n1": 512 << 20}

            # A bigger guest (spec change) and a second VMI, then node removal.
            await store.create(vmi_obj("b"))
            b = await store.get(VMI, "default", "b")
            b["status"] = {"phase": VMIPhase.RUNNING, "nodeName": "n3"}
            await store.update(b, subresource="status")
            a["spec"]["domain"]["memory"]["guest"] = "768Mi"
            a = await store.update(a)
            assert store.index.memory_used() == {"n1": 768 << 20, "n3": 256 << 20}
            n2 = await store.get("Node", "", "n2")
            n2["spec"] = {"unschedulable": True}  # cordoned: placement sees it at once
            await store.update(n2)
            assert [n.unschedulable for n in store.index.nodes()] == [False, True, False]
            await store.delete("Node", "", "n3")
            assert [n.name for n in store.index.nodes()] == ["n1", "n2"]
            await assert_matches_store(store)

            # Final phase, then deletion: nothing held.
            a["status"]["phase"] = VMIPhase.SUCCEEDED
            await store.update(a, subresource="status")
            await store.delete(VMI, "default", "b")
            assert store.index.memory_used() == {}
            await assert_matches_store(store)
        finally:
            await store.close()

    asyncio.run(body())


def test_a_reopened_store_and_a_reloaded_cache_rebuild_the_index(tmp_path: Path) -> None:
    async def body() -> None:
        store = await Store.open(tmp_path / "s.db")
        await store.create(node_obj("n1"))
        await store.create(vmi_obj("a"))
        a = await store.get(VMI, "default", "a")
        a["status"] = {"phase": VMIPhase.RUNNING, "nodeName": "n1"}
        await store.update(a, subresource="status")
        await store.close()
        store = await Store.open(tmp_path / "s.db")
        try:
            assert store.index.memory_used() == {"n1": 256 << 20}
            await assert_matches_store(store)
            store.reset([], await store.current_rv())  # what a lost etcd history does
            assert store.index.memory_used() == {} and store.index.nodes() == []
        finally:
            await store.close()

    asyncio.run(body())


def test_placement_right_after_a_write_sees_it(tmp_path: Path) -> None:
    """Two 768Mi guests, two 1Gi nodes: the second placement must see the first's
    write (a stale index would put both on n1)."""

    async def body() -> None:
        store = await Store.open(tmp_path / "s.db")
        try:
            await store.create(node_obj("n1", "1Gi"))
            await store.create(node_obj("n2", "1Gi"))
            chosen = []
            for name in ("a", "b", "c"):
                vmi = await store.create(vmi_obj(name, "768Mi"))
                placement = scheduler.place_with_usage(
                    vmi, store.index.nodes(), store.index.memory_used()
                )
                chosen.append(placement.node)
                if placement.node is not None:
                    vmi["status"] = {"phase": VMIPhase.SCHEDULED, "nodeName": placement.node}
                    await store.update(vmi, subresource="status")
            assert chosen == ["n1", "n2", None]
        finally:
            await store.close()

    asyncio.run(body())


def test_admission_right_after_a_write_sees_the_slot_taken(tmp_path: Path) -> None:
    """Limit 1: once the first VMIM's Scheduling is written, the second waits."""

    async def body() -> None:
        config: dict[str, Any] = {
            ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER: 1,
            ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE: 5,
        }
        store = await Store.open(tmp_path / "s.db")
        try:
            made = []
            for name in ("m1", "m2"):
                vmim = await store.create(
                    {
                        "apiVersion": kinds.KUBEVIRT,
                        "kind": VMIM,
                        "metadata": {"name": name, "namespace": "default"},
                        "spec": {"vmiName": "a"},
                        "status": {},
                    }
                )
                vmim["status"] = {"phase": MigrationPhase.PENDING.value}
                made.append(await store.update(vmim, subresource="status"))
            first, second = made
            assert store.index.queue.admit(first, config) == Admission(True)
            first["status"]["phase"] = MigrationPhase.SCHEDULING.value
            await store.update(first, subresource="status")
            assert store.index.queue.admit(second, config) == Admission(
                False, "waiting in the queue (1 running, limit 1)"
            )
            await store.delete(VMIM, "default", "m1")
            assert store.index.queue.admit(second, config) == Admission(True)
        finally:
            await store.close()

    asyncio.run(body())


def test_a_heartbeat_alone_is_no_node_change_for_the_migrations() -> None:
    before = node_obj("n1")
    before["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:00:00Z"
    beat = copy.deepcopy(before)
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:00:20Z"
    beat["metadata"]["resourceVersion"] = "7"
    assert without_heartbeats(beat) == without_heartbeats(before)
    assert beat["status"]["conditions"][0]["lastHeartbeatTime"].endswith("20Z")  # a copy
    not_ready = copy.deepcopy(beat)
    not_ready["status"]["conditions"][0]["status"] = "False"
    assert without_heartbeats(not_ready) != without_heartbeats(before)


def test_list_labels_gives_a_lists_labels_without_the_objects(tmp_path: Path) -> None:
    async def body() -> None:
        store = await Store.open(tmp_path / "s.db")
        try:
            for ns, name, labels in (("b", "x", {"k": "1"}), ("a", "y", {}), ("a", "x", None)):
                meta: Obj = {"name": name, "namespace": ns}
                if labels is not None:
                    meta["labels"] = labels
                await store.create({"apiVersion": "v1", "kind": "Secret", "metadata": meta})
            rows = store.list_labels("Secret")
            assert rows == [("a", "x", {}), ("a", "y", {}), ("b", "x", {"k": "1"})]
            rows[2][2]["k"] = "changed"  # a copy
            assert store.list_labels("Secret", "b") == [("b", "x", {"k": "1"})]
            assert store.list_labels("ConfigMap") == []
        finally:
            await store.close()

    asyncio.run(body())
