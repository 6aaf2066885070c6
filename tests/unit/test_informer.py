"""The informer's handlers: a handler registered after the first list sees every cached
object first (a replica that becomes the leader after a VM was created reconciles it),
and a handler scope removes what was added inside it (a leadership term's reconcilers)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controller.objects import StoreSource
from controller.store import Store
from controller.vm_controller import VMController
from tests.unit.test_vm_controller import vm
from vmferry.informer import Informer, Key, WorkQueue

pytestmark = pytest.mark.timeout(30)
Obj = dict[str, Any]


def config_map(name: str, rv: str = "1") -> Obj:
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": rv}}


def informer_with(*names: str) -> Informer:
    informer = Informer(object(), "ConfigMap")  # type: ignore[arg-type]  # fed by hand
    for name in names:
        informer.apply_event("ADDED", config_map(name))
    return informer


def test_a_late_handler_first_sees_every_cached_object_then_the_changes() -> None:
    informer = informer_with("a", "b")
    seen: list[tuple[Key, Obj | None, Obj | None]] = []
    informer.add_handler(lambda key, old, new: seen.append((key, old, new)))
    assert sorted((key, old) for key, old, _ in seen) == [
        (("default", "a"), None),
        (("default", "b"), None),
    ]
    informer.apply_event("MODIFIED", config_map("a", "2"))
    assert seen[-1][0] == ("default", "a") and seen[-1][1] is not None


def test_replay_can_be_declined() -> None:
    informer = informer_with("a")
    seen: list[Key] = []
    informer.add_handler(lambda key, old, new: seen.append(key), replay=False)
    assert seen == []
    informer.apply_event("DELETED", config_map("a"))
    assert seen == [("default", "a")]


def test_a_handler_scope_removes_the_handlers_added_inside_it() -> None:
    informer = informer_with()
    kept: list[Key] = []
    dropped: list[Key] = []
    informer.add_handler(lambda key, old, new: kept.append(key))
    with informer.handler_scope():
        informer.add_handler(lambda key, old, new: dropped.append(key))
        informer.apply_event("ADDED", config_map("x"))
    informer.apply_event("ADDED", config_map("y"))
    assert kept == [("default", "x"), ("default", "y")]
    assert dropped == [("default", "x")], "a handler outlived its scope"


def test_a_vm_controller_started_after_the_list_reconciles_the_existing_vm(
    tmp_path: Path,
) -> None:
    """The failure this guards: a VM created while no replica led was never given its
    VMI by the next leader (its reconcilers only saw later changes)."""

    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        source = StoreSource(store)
        vms = Informer(source, "VirtualMachine")
        vmis = Informer(source, "VirtualMachineInstance")
        tasks: list[asyncio.Task[None]] = []
        try:
            await store.create(vm())
            tasks += [asyncio.create_task(inf.run()) for inf in (vms, vmis)]
            for inf in (vms, vmis):
                await inf.synced.wait()
            assert vms.get("default", "v") is not None
            started = asyncio.Event()
            vmis.add_handler(lambda key, old, new: new is not None and started.set())
            controller = VMController(store, vms, vmis)  # the new leader's, started now
            tasks.append(asyncio.create_task(controller.run()))
            async with asyncio.timeout(10):
                await started.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await store.close()

    asyncio.run(main())


def test_add_soon_coalesces_a_burst_and_is_never_postponed() -> None:
    async def main() -> None:
        queue = WorkQueue()
        passes: list[tuple[Key, float]] = []
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def reconcile(key: Key) -> None:
            passes.append((key, loop.time() - start))

        runner = asyncio.create_task(queue.run(reconcile, "test"))
        try:
            key = ("default", "a")
            for _ in range(5):  # a burst of events: one pass
                queue.add_soon(key, 0.05)
            queue.add_after(key, 5.0)  # a recheck due later does not postpone it
            queue.add_soon(key, 1.0)  # nor does a later add_soon
            await asyncio.sleep(0.3)
            assert [k for k, _ in passes] == [key]
            assert 0.04 <= passes[0][1] < 0.3
            queue.add_soon(key, 1.0)
            queue.add_soon(key, 0.02)  # a sooner one wins
            await asyncio.sleep(0.2)
            assert len(passes) == 2 and passes[1][1] < 0.55
        finally:
            runner.cancel()

    asyncio.run(main())
