"""Unit tests for controller.store (SQLite-backed, Kubernetes-semantics object store)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import controller.store_core as store_core
import controller.store_sqlite as store_sqlite
from controller.store import Store
from tests.support.etcd import etcd_endpoints, open_store  # noqa: F401 (a fixture)
from vmferry.errors import AlreadyExists, BadRequest, Conflict, Gone, Invalid, NotFound, Unavailable
from vmferry.objects.labels import parse_selector

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
VMI = "VirtualMachineInstance"
T = TypeVar("T")


# The backend ``run`` opens: SQLite, unless a test is marked ``@both`` and runs on etcd.
# On etcd each test has a key prefix of its own in a shared etcd whose revision counter
# already moved: ``rv``/``cur`` count from the revision the store opened at (BASE).
_BACKEND: tuple[str, tuple[str, ...] | None] = ("sqlite", None)
BASE = 0


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    global _BACKEND
    name: str = request.param
    endpoints = request.getfixturevalue("etcd_endpoints") if name == "etcd" else None
    _BACKEND = (name, endpoints)
    try:
        yield name
    finally:
        _BACKEND = ("sqlite", None)


def both(test: Callable[..., None]) -> Callable[..., None]:
    """Run a contract test on both backends."""
    marked = pytest.mark.usefixtures("backend")(test)
    return pytest.mark.parametrize("backend", ["sqlite", "etcd"], indirect=True)(marked)


def run(tmp_path: Path, body: Callable[[Store], Awaitable[T]], **options: Any) -> T:
    """Open a store in tmp_path, run ``body(store)`` under asyncio.run, close the store."""

    async def main() -> T:
        global BASE
        store = await open_store(_BACKEND[0], tmp_path, _BACKEND[1], **options)
        BASE = await store.current_rv() if _BACKEND[0] == "etcd" else 0
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def vmi(name: str, namespace: str = "default", labels: dict[str, str] | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels is not None:
        meta["labels"] = labels
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": VMI,
        "metadata": meta,
        "spec": {"domain": {"memory": {"guest": "1Gi"}}},
    }


def node(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}}


async def take(events: AsyncIterator[tuple[str, dict]], count: int) -> list[tuple[str, dict]]:
    out = []
    for _ in range(count):
        out.append(await asyncio.wait_for(anext(events), 5))
    return out


async def nothing_more(events: AsyncIterator[tuple[str, dict]]) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(events), 0.1)


def rv(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"]) - BASE


async def cur(store: Store) -> int:
    return await store.current_rv() - BASE


# --- create / get ---------------------------------------------------------------------


@both
def test_create_sets_metadata_and_get_returns_it(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        assert await cur(store) == 0
        created = await store.create(vmi("vm1"))
        meta = created["metadata"]
        assert meta["name"] == "vm1"
        assert meta["namespace"] == "default"
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", meta["uid"]
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
        assert meta["generation"] == 1
        assert rv(created) == 1
        assert await cur(store) == 1
        assert await store.get(VMI, "default", "vm1") == created
        second = await store.create(vmi("vm2"))
        assert rv(second) == 2
        assert second["metadata"]["uid"] != meta["uid"]

    run(tmp_path, body)


@both
def test_create_overrides_caller_bookkeeping(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        obj = vmi("vm1")
        obj["metadata"].update(
            uid="mine",
            resourceVersion="999",
            generation=7,
            creationTimestamp="2000-01-01T00:00:00Z",
            deletionTimestamp="2000-01-01T00:00:00Z",
        )
        meta = (await store.create(obj))["metadata"]
        assert meta["uid"] != "mine"
        assert int(meta["resourceVersion"]) - BASE == 1
        assert meta["generation"] == 1
        assert meta["creationTimestamp"] != "2000-01-01T00:00:00Z"
        assert "deletionTimestamp" not in meta

    run(tmp_path, body)


@both
def test_cluster_scoped_objects_have_no_namespace_key(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        created = await store.create(node("n1"))
        assert "namespace" not in created["metadata"]
        explicit_empty = node("n2")
        explicit_empty["metadata"]["namespace"] = ""
        assert "namespace" not in (await store.create(explicit_empty))["metadata"]
        assert (await store.get("Node", "", "n1"))["metadata"]["name"] == "n1"

    run(tmp_path, body)


@both
def test_objects_are_copied_across_the_api(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        obj = vmi("vm1")
        created = await store.create(obj)
        assert "uid" not in obj["metadata"]  # the caller's dict is untouched
        obj["spec"]["mutated"] = True
        created["spec"]["mutated"] = True
        fetched = await store.get(VMI, "default", "vm1")
        assert "mutated" not in fetched["spec"]
        fetched["spec"]["mutated"] = True
        items, _ = await store.list(VMI)
        assert "mutated" not in items[0]["spec"]

    run(tmp_path, body)


@both
def test_already_exists_and_not_found_messages(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        await store.create(vmi("vm1"))
        with pytest.raises(AlreadyExists, match=r'^virtualmachineinstances "vm1" already exists$'):
            await store.create(vmi("vm1"))
        await store.create(vmi("vm1", namespace="other"))  # same name, other namespace
        with pytest.raises(NotFound, match=r'^virtualmachineinstances "vm9" not found$'):
            await store.get(VMI, "default", "vm9")
        with pytest.raises(NotFound, match=r'^widgets? "w" not found$'):
            await store.get("Widget", "default", "w")
        with pytest.raises(NotFound):
            await store.get(VMI, "elsewhere", "vm1")
        # A failed create does not consume a resourceVersion.
        assert await cur(store) == 2

    run(tmp_path, body)


@both
def test_unknown_kind_uses_lowercase_kind_in_messages(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        obj = {"kind": "Widget", "metadata": {"name": "c", "namespace": "ns"}}
        await store.create(obj)
        with pytest.raises(AlreadyExists, match=r'^widget "c" already exists$'):
            await store.create(obj)

    run(tmp_path, body)


@both
def test_create_requires_kind_and_name(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(Invalid, match="name or generateName is required"):
            await store.create({"kind": VMI, "metadata": {"namespace": "default"}})
        with pytest.raises(Invalid, match="kind"):
            await store.create({"metadata": {"name": "x"}})
        with pytest.raises(Invalid, match="metadata"):
            await store.create({"kind": VMI, "metadata": "nope"})
        with pytest.raises(BadRequest, match="JSON"):
            await store.create({"kind": VMI, "metadata": {"name": "x"}, "spec": {"s": {1, 2}}})
        with pytest.raises(BadRequest, match="JSON"):
            await store.create(
                {"kind": VMI, "metadata": {"name": "x"}, "spec": {"f": float("nan")}}
            )
        assert await cur(store) == 0

    run(tmp_path, body)


@both
def test_generate_name(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        obj = vmi("")
        obj["metadata"]["generateName"] = "kubevirt-migrate-vm-"
        first = await store.create(obj)
        second = await store.create(obj)
        for created in (first, second):
            name = created["metadata"]["name"]
            assert re.fullmatch(r"kubevirt-migrate-vm-[a-z0-9]{5}", name)
            assert created["metadata"]["generateName"] == "kubevirt-migrate-vm-"
        assert first["metadata"]["name"] != second["metadata"]["name"]

    run(tmp_path, body)


@both
def test_generate_name_retries_on_collision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffixes = iter(["aaaaa", "aaaaa", "aaaaa", "bbbbb"])
    monkeypatch.setattr(store_core, "random_suffix", lambda: next(suffixes))

    async def body(store: Store) -> None:
        obj = vmi("")
        obj["metadata"]["generateName"] = "m-"
        assert (await store.create(obj))["metadata"]["name"] == "m-aaaaa"
        assert (await store.create(obj))["metadata"]["name"] == "m-bbbbb"
        monkeypatch.setattr(store_core, "random_suffix", lambda: "aaaaa")
        with pytest.raises(AlreadyExists, match="generated names"):
            await store.create(obj)

    run(tmp_path, body)


# --- update ---------------------------------------------------------------------------


@both
def test_update_with_stale_resource_version_conflicts(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        created = await store.create(vmi("vm1"))
        fresh = dict(created, spec={"v": 1})
        updated = await store.update(fresh)
        assert rv(updated) == rv(created) + 1
        stale = dict(created, spec={"v": 2})
        with pytest.raises(Conflict) as info:
            await store.update(stale)
        assert str(info.value) == (
            'Operation cannot be fulfilled on virtualmachineinstances "vm1": the object has '
            "been modified; please apply your changes to the latest version and try again"
        )
        assert (await store.get(VMI, "default", "vm1"))["spec"] == {"v": 1}

    run(tmp_path, body)


@both
def test_update_without_resource_version_is_last_writer_wins(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        await store.create(vmi("vm1"))
        blind = vmi("vm1")
        blind["spec"] = {"v": "blind"}
        result = await store.update(blind)
        assert result["spec"] == {"v": "blind"}
        assert rv(result) == 2

    run(tmp_path, body)


@both
def test_update_keeps_immutable_metadata_and_counts_generation(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        created = await store.create(vmi("vm1"))
        meta = created["metadata"]
        change = vmi("vm1")
        change["metadata"].update(uid="", generation=42, creationTimestamp="1999-01-01T00:00:00Z")
        change["spec"] = {"changed": True}
        updated = await store.update(change)
        assert updated["metadata"]["uid"] == meta["uid"]
        assert updated["metadata"]["creationTimestamp"] == meta["creationTimestamp"]
        assert updated["metadata"]["generation"] == 2

        labelled = dict(updated)
        labelled["metadata"] = dict(updated["metadata"], labels={"a": "b"}, annotations={"x": "y"})
        labelled = await store.update(labelled)
        assert labelled["metadata"]["generation"] == 2  # metadata changes keep generation
        assert labelled["metadata"]["labels"] == {"a": "b"}
        assert rv(labelled) == rv(updated) + 1

    run(tmp_path, body)


@both
def test_update_with_wrong_uid_conflicts(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        await store.create(vmi("vm1"))
        other = vmi("vm1")
        other["metadata"]["uid"] = "0000"
        with pytest.raises(Conflict, match="UID in precondition: 0000"):
            await store.update(other)

    run(tmp_path, body)


@both
def test_update_ignores_status_and_status_subresource_ignores_the_rest(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        obj = vmi("vm1")
        obj["status"] = {"phase": "Pending"}
        created = await store.create(obj)
        assert created["status"] == {"phase": "Pending"}

        main = dict(created, spec={"new": 1}, status={"phase": "Hacked"})
        main = await store.update(main)
        assert main["status"] == {"phase": "Pending"}
        assert main["spec"] == {"new": 1}
        assert main["metadata"]["generation"] == 2

        sub = dict(main, spec={"ignored": 1}, status={"phase": "Running"})
        sub["metadata"] = dict(main["metadata"], labels={"ignored": "yes"})
        status = await store.update(sub, subresource="status")
        assert status["status"] == {"phase": "Running"}
        assert status["spec"] == {"new": 1}
        assert "labels" not in status["metadata"]
        assert status["metadata"]["generation"] == 2  # status writes never bump generation
        assert rv(status) == rv(main) + 1

        with pytest.raises(Conflict):
            await store.update(sub, subresource="status")  # sub carries main's (stale) rv
        with pytest.raises(BadRequest, match="subresource"):
            await store.update(status, subresource="scale")

    run(tmp_path, body)


@both
def test_noop_update_is_not_a_write(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        created = await store.create(vmi("vm1"))
        events = store.watch(VMI, None, int(created["metadata"]["resourceVersion"]))
        again = await store.update(created)
        assert again == created
        assert await cur(store) == rv(created)
        same_status = await store.update(created, subresource="status")
        assert same_status == created
        await nothing_more(events)
        # Equal in Python but stored differently (2 == 2.0): a change of type is a write,
        # and a change of the spec.
        retyped = {**created, "spec": {**created["spec"], "replicas": 2}}
        first = await store.update(retyped)
        again = await store.update({**first, "spec": {**first["spec"], "replicas": 2.0}})
        assert again["spec"]["replicas"] == 2.0 and isinstance(again["spec"]["replicas"], float)
        assert rv(again) > rv(first) and again["metadata"]["generation"] == 3
        await events.aclose()

    run(tmp_path, body)


@both
def test_update_missing_object_is_not_found(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(NotFound, match='virtualmachineinstances "ghost" not found'):
            await store.update(vmi("ghost"))
        with pytest.raises(Invalid):
            await store.update({"kind": VMI, "metadata": {"namespace": "default"}})

    run(tmp_path, body)


# --- delete and finalizers ------------------------------------------------------------


@both
def test_delete_without_finalizers_removes(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        created = await store.create(vmi("vm1"))
        events = store.watch(VMI, "default", int(created["metadata"]["resourceVersion"]))
        gone = await store.delete(VMI, "default", "vm1")
        assert rv(gone) == rv(created) + 1
        assert gone["spec"] == created["spec"]
        [(kind, obj)] = await take(events, 1)
        assert kind == "DELETED" and obj == gone
        with pytest.raises(NotFound):
            await store.get(VMI, "default", "vm1")
        with pytest.raises(NotFound, match='virtualmachineinstances "vm1" not found'):
            await store.delete(VMI, "default", "vm1")
        await events.aclose()

    run(tmp_path, body)


@both
def test_delete_preconditions(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        created = await store.create(vmi("vm1"))
        with pytest.raises(Conflict, match="ResourceVersion in precondition: 99"):
            await store.delete(VMI, "default", "vm1", resource_version="99")
        with pytest.raises(Conflict, match="UID in precondition: nope"):
            await store.delete(VMI, "default", "vm1", uid="nope")
        await store.get(VMI, "default", "vm1")
        await store.delete(
            VMI,
            "default",
            "vm1",
            resource_version=created["metadata"]["resourceVersion"],
            uid=created["metadata"]["uid"],
        )

    run(tmp_path, body)


@both
def test_finalizers_delay_deletion_until_emptied(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        obj = vmi("vm1")
        obj["metadata"]["finalizers"] = ["vmferry.io/handler", "vmferry.io/other"]
        created = await store.create(obj)
        events = store.watch(VMI, None, int(created["metadata"]["resourceVersion"]))

        marked = await store.delete(VMI, "default", "vm1")
        assert marked["metadata"]["deletionTimestamp"]
        assert marked["metadata"]["generation"] == 2
        assert await store.get(VMI, "default", "vm1") == marked
        [(kind, seen)] = await take(events, 1)
        assert kind == "MODIFIED" and seen == marked

        # A second delete changes nothing; the caller cannot clear deletionTimestamp.
        assert await store.delete(VMI, "default", "vm1") == marked
        undelete = dict(marked)
        undelete["metadata"] = dict(marked["metadata"], finalizers=["vmferry.io/other"])
        del undelete["metadata"]["deletionTimestamp"]
        one_left = await store.update(undelete)
        assert one_left["metadata"]["deletionTimestamp"] == marked["metadata"]["deletionTimestamp"]
        assert one_left["metadata"]["finalizers"] == ["vmferry.io/other"]

        done = dict(one_left)
        done["metadata"] = dict(one_left["metadata"], finalizers=[])
        removed = await store.update(done)
        with pytest.raises(NotFound):
            await store.get(VMI, "default", "vm1")
        kinds = [k for k, _ in await take(events, 2)]
        assert kinds == ["MODIFIED", "DELETED"]
        assert rv(removed) == await cur(store)
        await events.aclose()

    run(tmp_path, body)


# --- list -----------------------------------------------------------------------------


@both
def test_list_sorting_namespaces_and_selectors(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        await store.create(vmi("b", "ns2", {"app": "web"}))
        await store.create(vmi("a", "ns2", {"app": "db"}))
        await store.create(vmi("z", "ns1", {"app": "web", "tier": "front"}))
        await store.create(vmi("m", "ns1"))
        await store.create(node("n1", {"app": "web"}))
        items, list_rv = await store.list(VMI)
        assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items] == [
            ("ns1", "m"),
            ("ns1", "z"),
            ("ns2", "a"),
            ("ns2", "b"),
        ]
        assert list_rv - BASE == 5 == await cur(store)
        names = lambda objs: [o["metadata"]["name"] for o in objs]  # noqa: E731
        assert names((await store.list(VMI, "ns2"))[0]) == ["a", "b"]
        assert names((await store.list(VMI, "nowhere"))[0]) == []
        web = parse_selector("app=web")
        assert names((await store.list(VMI, None, web))[0]) == ["z", "b"]
        assert names((await store.list(VMI, "ns1", parse_selector("!app")))[0]) == ["m"]
        assert names((await store.list(VMI, None, parse_selector("app!=web")))[0]) == [
            "m",
            "a",
        ]
        assert names((await store.list(VMI, None, parse_selector("")))[0]) == [
            "m",
            "z",
            "a",
            "b",
        ]
        assert names((await store.list("Node", "", web))[0]) == ["n1"]
        assert names((await store.list("Node"))[0]) == ["n1"]

    run(tmp_path, body)


# --- watch ----------------------------------------------------------------------------


@both
def test_watch_replays_history_then_follows_live(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        first = await store.create(vmi("vm1"))
        await store.update(dict(first, spec={"v": 2}))
        events = store.watch(VMI, "default", 0)
        replayed = await take(events, 2)
        assert [(k, rv(o)) for k, o in replayed] == [("ADDED", 1), ("MODIFIED", 2)]
        await store.delete(VMI, "default", "vm1")
        assert [(k, rv(o)) for k, o in await take(events, 1)] == [("DELETED", 3)]
        await nothing_more(events)
        await events.aclose()

    run(tmp_path, body)


@both
def test_watch_filters_kind_and_namespace(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        everything = store.watch(None, None, 0)
        vmis_ns1 = store.watch(VMI, "ns1", 0)
        nodes = store.watch("Node", None, 0)
        await store.create(vmi("a", "ns1"))
        await store.create(vmi("b", "ns2"))
        await store.create(node("n1"))
        await store.create(vmi("c", "ns1"))
        assert [o["metadata"]["name"] for _, o in await take(everything, 4)] == [
            "a",
            "b",
            "n1",
            "c",
        ]
        assert [o["metadata"]["name"] for _, o in await take(vmis_ns1, 2)] == ["a", "c"]
        assert [o["metadata"]["name"] for _, o in await take(nodes, 1)] == ["n1"]
        for events in (everything, vmis_ns1, nodes):
            await nothing_more(events)
            await events.aclose()

    run(tmp_path, body)


@both
def test_watch_selector_transitions(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        live = store.watch(VMI, None, 0, parse_selector("app=web"))
        obj = await store.create(vmi("vm1", labels={"app": "db"}))  # not seen
        obj["metadata"]["labels"] = {"app": "web"}
        obj = await store.update(obj)  # starts matching -> ADDED
        obj["spec"] = {"v": 2}
        obj = await store.update(obj)  # MODIFIED
        obj["metadata"]["labels"] = {"app": "db"}
        obj = await store.update(obj)  # stops matching -> DELETED
        obj["spec"] = {"v": 3}
        obj = await store.update(obj)  # not seen
        await store.create(vmi("vm2", labels={"app": "web"}))  # ADDED
        await store.delete(VMI, "default", "vm2")  # DELETED
        expected = [
            ("ADDED", "vm1", 2),
            ("MODIFIED", "vm1", 3),
            ("DELETED", "vm1", 4),
            ("ADDED", "vm2", 6),
            ("DELETED", "vm2", 7),
        ]
        seen = [(k, o["metadata"]["name"], rv(o)) for k, o in await take(live, 5)]
        assert seen == expected
        # The same transitions come out of a replay from the persisted events.
        replay = store.watch(VMI, None, 0, parse_selector("app=web"))
        assert [(k, o["metadata"]["name"], rv(o)) for k, o in await take(replay, 5)] == expected
        for events in (live, replay):
            await nothing_more(events)
            await events.aclose()

    run(tmp_path, body)


@both
def test_watch_from_current_rv_sees_only_new_changes(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        await store.create(vmi("old"))
        _, list_rv = await store.list(VMI)
        events = store.watch(VMI, None, list_rv)
        await store.create(vmi("new"))
        [(kind, obj)] = await take(events, 1)
        assert (kind, obj["metadata"]["name"]) == ("ADDED", "new")
        await events.aclose()

    run(tmp_path, body)


@both
def test_watch_yields_independent_copies(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        first = store.watch(None, None, 0)
        second = store.watch(None, None, 0)
        await store.create(vmi("vm1"))
        [(_, a)] = await take(first, 1)
        a["spec"]["mutated"] = True
        [(_, b)] = await take(second, 1)
        assert "mutated" not in b["spec"]
        for events in (first, second):
            await events.aclose()

    run(tmp_path, body)


@both
@pytest.mark.parametrize("page", [3, 500])
def test_watch_racing_writers_has_no_gap_and_no_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: int
) -> None:
    """Watchers start at different points while a writer is busy; each must see exactly
    the events after its starting resourceVersion, in order."""
    monkeypatch.setattr(store_sqlite, "REPLAY_PAGE", page)
    total = 400

    async def body(store: Store) -> None:
        progress = asyncio.Event()

        async def writer() -> None:
            for i in range(total):
                if i % 3 == 0:
                    await store.create(vmi(f"vm{i}"))
                else:
                    await store.update(dict(vmi(f"vm{i - i % 3}"), spec={"i": i}))
                if i % 50 == 0:
                    progress.set()
                    await asyncio.sleep(0)

        async def watcher(since: int) -> list[int]:
            seen = []
            async for _, obj in store.watch(None, None, since):
                seen.append(rv(obj))
                if seen[-1] == total:
                    return seen
            raise AssertionError("watch ended early")

        async with asyncio.TaskGroup() as group:
            write = group.create_task(writer())
            watchers = [group.create_task(watcher(0))]
            for _ in range(5):
                await progress.wait()
                progress.clear()
                watchers.append(group.create_task(watcher(await store.current_rv())))
            await write
        for task in watchers:
            seen = task.result()
            start = seen[0] - 1
            assert seen == list(range(start + 1, total + 1))

    run(tmp_path, body)


@both
def test_slow_watcher_overflowing_its_queue_catches_up_from_disk(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        events = store.watch(None, None, 0)
        await store.create(vmi("vm0"))
        seen = [rv((await take(events, 1))[0][1])]  # now in the live phase
        for i in range(1, 40):  # the watcher does not read: its queue (4) overflows
            await store.create(vmi(f"vm{i}"))
        seen += [rv(o) for _, o in await take(events, 39)]
        assert seen == list(range(1, 41))
        await store.create(vmi("late"))
        assert rv((await take(events, 1))[0][1]) == 41
        await events.aclose()

    run(tmp_path, body, watch_queue_limit=4)


def test_watch_from_pruned_history_is_gone(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        for i in range(20):
            await store.create(vmi(f"vm{i}"))
        events = store.watch(None, None, 3)  # no error until iteration starts
        with pytest.raises(Gone, match="too old resource version: 3"):
            await anext(events)
        kept = store.watch(None, None, 15)
        assert [rv(o) for _, o in await take(kept, 5)] == [16, 17, 18, 19, 20]
        await kept.aclose()

    run(tmp_path, body, history=5)


def test_slow_watcher_overtaken_by_pruning_gets_gone(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        events = store.watch(None, None, 0)
        await store.create(vmi("vm0"))
        await take(events, 1)
        for i in range(1, 30):  # queue overflows and history no longer covers rv 1
            await store.create(vmi(f"vm{i}"))
        with pytest.raises(Gone):
            await take(events, 29)

    run(tmp_path, body, history=5, watch_queue_limit=4)


def test_history_is_pruned_to_the_newest_events(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        for i in range(30):
            await store.create(vmi(f"vm{i}"))

    run(tmp_path, body, history=10)
    with sqlite3.connect(tmp_path / "store.db") as db:
        rvs = [r for (r,) in db.execute("SELECT rv FROM events ORDER BY rv")]
    assert rvs == list(range(21, 31))

    # Reopening with a smaller history prunes immediately.
    async def reopened(store: Store) -> None:
        with pytest.raises(Gone):
            await anext(store.watch(None, None, 24))
        assert len(await take(store.watch(None, None, 25), 5)) == 5

    run(tmp_path, reopened, history=5)


def test_close_ends_watches_and_refuses_calls(tmp_path: Path) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        events = store.watch(None, None, 0)
        await store.create(vmi("vm1"))
        waiter = asyncio.create_task(take(events, 2))
        await asyncio.sleep(0.05)
        await store.close()
        with pytest.raises(StopAsyncIteration):
            await waiter
        await store.close()  # idempotent
        with pytest.raises(Unavailable):
            await store.get(VMI, "default", "vm1")
        with pytest.raises(Unavailable):
            await anext(store.watch(None, None, 0))

    asyncio.run(main())


# --- durability -----------------------------------------------------------------------


def test_state_and_events_survive_reopen(tmp_path: Path) -> None:
    async def first(store: Store) -> int:
        created = await store.create(vmi("vm1", labels={"a": "b"}))
        await store.update(dict(created, spec={"v": 2}))
        await store.create(node("n1"))
        return await store.current_rv()

    assert run(tmp_path, first) == 3

    async def second(store: Store) -> None:
        assert await store.current_rv() == 3
        assert (await store.get(VMI, "default", "vm1"))["spec"] == {"v": 2}
        events = store.watch(None, None, 1)  # resume a watch across the restart
        assert [(k, rv(o)) for k, o in await take(events, 2)] == [("MODIFIED", 2), ("ADDED", 3)]
        created = await store.create(vmi("vm2"))
        assert created["metadata"]["resourceVersion"] == "4"
        assert [(k, rv(o)) for k, o in await take(events, 1)] == [("ADDED", 4)]
        await events.aclose()

    run(tmp_path, second)


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from controller.store import Store

    async def main() -> None:
        store = await Store.open(Path(sys.argv[1]))
        i = 0
        while True:
            obj = await store.create({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": f"cm-{i}", "namespace": "default"},
                "data": {"i": str(i)},
            })
            print(obj["metadata"]["name"], obj["metadata"]["resourceVersion"], flush=True)
            i += 1

    asyncio.run(main())
    """
)


def test_sigkill_loses_no_committed_write(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None
    reported: list[tuple[str, int]] = []
    try:
        for line in proc.stdout:
            name, version = line.split()
            reported.append((name, int(version)))
            if len(reported) == 300:
                break
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for line in rest.splitlines():  # lines written before the kill are committed too
        if len(line.split()) == 2:
            name, version = line.split()
            reported.append((name, int(version)))
    assert len(reported) >= 300

    async def check(store: Store) -> None:
        current = await store.current_rv()
        last_reported = reported[-1][1]
        assert current >= last_reported
        items, _ = await store.list("ConfigMap", "default")
        stored = {o["metadata"]["name"]: rv(o) for o in items}
        for name, version in reported:
            assert stored[name] == version
        # Every create bumped the counter by one: no committed write vanished.
        assert len(stored) == current
        created = await store.create({"kind": "ConfigMap", "metadata": {"name": "after"}})
        assert rv(created) == current + 1

    run(tmp_path, check)


def test_reads_come_from_the_cache_and_see_every_committed_write(tmp_path: Path) -> None:
    """get/list/current_rv answer on the event loop while the worker thread is busy, and
    reflect each write (create, update, status, finalizer removal) once it returns."""

    async def body(store: Store) -> None:
        a = await store.create(vmi("a", labels={"app": "x"}))
        await store.create(vmi("b", namespace="other"))
        release = threading.Event()
        store.backend.executor.submit(release.wait, 10)  # the worker thread is busy meanwhile
        try:
            async with asyncio.timeout(2):  # no trip to the worker: not blocked by it
                assert (await store.get(VMI, "default", "a"))["metadata"]["uid"] == a["metadata"][
                    "uid"
                ]
                items, listed_rv = await store.list(VMI)
                assert [o["metadata"]["name"] for o in items] == ["a", "b"]
                assert listed_rv == await store.current_rv() == 2
                picked, _ = await store.list(VMI, None, parse_selector("app=x"))
                assert [o["metadata"]["name"] for o in picked] == ["a"]
        finally:
            release.set()
        updated = await store.update(dict(a, status={"phase": "Running"}), subresource="status")
        assert (await store.get(VMI, "default", "a"))["status"] == {"phase": "Running"}
        assert (await store.get(VMI, "default", "a"))["metadata"]["resourceVersion"] == (
            updated["metadata"]["resourceVersion"]
        )
        with_finalizer = await store.update(
            dict(updated, metadata=dict(updated["metadata"], finalizers=["f"]))
        )
        marked = await store.delete(VMI, "default", "a")
        assert marked["metadata"]["deletionTimestamp"]
        assert (await store.get(VMI, "default", "a"))["metadata"]["finalizers"] == ["f"]
        gone = dict(marked, metadata=dict(marked["metadata"], finalizers=[]))
        await store.update(gone)
        with pytest.raises(NotFound):
            await store.get(VMI, "default", "a")
        items, listed_rv = await store.list(VMI)
        assert [o["metadata"]["name"] for o in items] == ["b"]
        assert listed_rv == rv(with_finalizer) + 2  # marked, then removed
        got = await store.get(VMI, "other", "b")
        got["spec"]["mutated"] = True  # a copy: the cache is not changed through it
        assert "mutated" not in (await store.get(VMI, "other", "b"))["spec"]

    run(tmp_path, body)
