"""The post-copy keeper (handler/vm_postcopy.py) with fakes: after a handler restart in
post-copy the source re-adopts its paused guest with a re-adopted engine (never destroys
it), the target re-registers its guest in PostCopyRunning from the restart record (and
resumes one that was committed but not yet resumed), and the VM is declared lost only when
its memory is gone: the guest stopped, the VMI Failed with a reason, the migration failed
with one when nobody else said so."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from handler.drivers.base import Drivers, EngineContext, VMHandle
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.memvm_source import MemvmSourceMigration
from handler.migration.postcopy_source import POSTCOPY_FAILED_REASON
from handler.migration.restart_record import RestartRecord, RestartRecords
from handler.migration.source import SourceEngine
from handler.migration.target_state import TargetState
from handler.vm_incoming import incoming_id
from handler.vm_postcopy import COMPLETION_GRACE, LOSS_GRACE, PostCopyKeeper, in_postcopy
from tests.support.fake_api import FakeClock, StoreApi
from tests.support.fake_guest import FakeGuest
from tests.support.fake_handle import FakeHandle
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    Field,
    MigrationMode,
    Switchover,
    token_secret_name,
)

Obj = dict[str, Any]
SOURCE, TARGET = "node1", "node2"
MIG = "mig-00000001"
WINDOW = 30
POSTCOPY: Obj = {
    Field.SWITCHOVER: Switchover.COMMITTED,
    Field.MODE: MigrationMode.POST_COPY,
    Field.START_TIMESTAMP: "2026-01-01T00:00:00Z",
    Field.TARGET_NODE_ADDRESS: "127.0.0.1",
    Field.TARGET_NODE_PORT: 1,
    Field.MIGRATION_CONFIGURATION: {"postCopyRecoveryWindowSeconds": WINDOW},
    Field.TRANSFER: {"digestVerified": True, "postCopyInterruptions": 1, "wireBytes": 100},
}


class FakeDriver:
    name = "fake"

    def claims(self, vmi: Obj) -> bool:
        return True

    def source_engine(
        self, context: EngineContext, vmi: Obj, handle: VMHandle
    ) -> MemvmSourceMigration:
        return MemvmSourceMigration(
            context.api, context.node, vmi, handle, context.tls, on_progress=context.on_progress
        )


class Node:
    """A keeper on ``node`` over a StoreApi holding one VMI and the migration's Secret."""

    def __init__(self, api: StoreApi, tmp: Path, node: str) -> None:
        self.api = api
        self.records = RestartRecords(tmp / node)
        self.registry = IncomingRegistry(self.records, require_peer_identity=False)
        self.handles: dict[str, VMHandle] = {}
        self.orphans: dict[str, VMHandle] = {}
        self.started: list[SourceEngine] = []
        self.spawned: list[asyncio.Task[None]] = []
        self.running: set[str] = set()
        self.clock = FakeClock()
        self.keeper = PostCopyKeeper(
            api,  # type: ignore[arg-type]
            node,
            Drivers(FakeDriver()),  # type: ignore[arg-type]
            self.registry,
            self.handles,
            self.orphans,
            tls=None,
            on_progress=lambda vmi, stats: None,
            start_source=self.started.append,
            migrating=lambda uid: uid in self.running,
            spawn=self.spawn,
            clock=self.clock,
        )

    def spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        self.spawned.append(asyncio.create_task(work))

    async def settle(self) -> None:
        while self.spawned:
            await self.spawned.pop()

    async def vmi(self) -> Obj:
        return await self.api.get("VirtualMachineInstance", "default", "vm")

    async def pass_(self) -> bool:
        vmi = await self.vmi()
        return await self.keeper.reconcile(vmi, vmi["status"]["migrationState"])


async def setup(api: StoreApi, node_name: str = SOURCE, ms: Obj | None = None) -> Obj:
    await api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": TOKEN_SECRET_NAMESPACE, "name": token_secret_name(MIG)},
            "data": {TOKEN_SECRET_KEY: base64.b64encode(b"tok").decode()},
        }
    )
    return await api.create(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"namespace": "default", "name": "vm"},
            "spec": {},
            "status": {
                "phase": "Running",
                "nodeName": node_name,
                "conditions": [{"type": "Ready", "status": "True"}],
                "migrationState": {
                    Field.MIGRATION_UID: MIG,
                    Field.SOURCE_NODE: SOURCE,
                    Field.TARGET_NODE: TARGET,
                    **POSTCOPY,
                    **(ms or {}),
                },
            },
        }
    )


def run(tmp_path: Path, body: Any) -> None:
    async def main() -> None:
        api = await StoreApi.open(tmp_path)
        try:
            await body(api)
        finally:
            await api.close()

    asyncio.run(main())


def assert_lost(vmi: Obj) -> None:
    status = vmi["status"]
    assert status["phase"] == "Failed" and status["reason"] == POSTCOPY_FAILED_REASON
    ready = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "False" and ready[0]["message"]


class SelfPagingHandle:
    """A guest whose driver moves its post-copy pages itself (QEMU): no post-copy
    bitmaps, so its status cannot say that post-copy is still running."""

    driver_name = "qemu-like"

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.pid = 4243
        self.incoming = False
        self.resumed = 0
        self.destroyed = 0

    def is_alive(self) -> bool:
        return True

    async def resume(self, device_state: bytes | None = None) -> None:
        self.resumed += 1

    async def destroy(self) -> None:
        self.destroyed += 1


def test_in_postcopy_needs_committed_and_post_copy() -> None:
    assert in_postcopy(dict(POSTCOPY))
    assert not in_postcopy({**POSTCOPY, Field.MODE: MigrationMode.PRE_COPY})
    assert not in_postcopy({**POSTCOPY, Field.SWITCHOVER: Switchover.ABORTED})


# -- source side ----------------------------------------------------------------------------


def test_restarted_source_readopts_its_paused_guest_and_never_destroys_it(
    tmp_path: Path,
) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api, node_name=TARGET)  # the target published nodeName already
        node = Node(api, tmp_path, SOURCE)
        guest = FakeGuest(tmp_path, "src")
        node.handles[vmi["metadata"]["uid"]] = guest
        assert await node.pass_()
        assert not guest.destroyed
        [engine] = node.started
        assert isinstance(engine, MemvmSourceMigration) and engine.readopted
        assert engine.committed and engine.postcopy_active and engine.paused
        assert engine.mode is MigrationMode.POST_COPY
        # The restart counts as an interruption; the recorded figures stay.
        status = engine._transfer_status()
        assert status["postCopyInterruptions"] == 2 and status["digestVerified"] is True
        assert status["wireBytes"] == 100
        assert node.handles[vmi["metadata"]["uid"]] is guest
        # While its engine runs, the keeper leaves it to the engine.
        node.running.add(vmi["metadata"]["uid"])
        assert not await node.pass_()
        assert len(node.started) == 1

    run(tmp_path, body)


def test_source_destroys_its_paused_guest_once_post_copy_failed(tmp_path: Path) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api, ms={Field.FAILED: True, Field.FAILURE_REASON: "gone"})
        node = Node(api, tmp_path, SOURCE)
        guest = FakeHandle("src")
        node.handles[vmi["metadata"]["uid"]] = guest
        assert await node.pass_()
        assert guest.destroyed == 1 and not node.handles and not node.started
        assert_lost(await node.vmi())

    run(tmp_path, body)


def test_source_outside_post_copy_is_left_to_the_vm_manager(tmp_path: Path) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api, ms={Field.MODE: MigrationMode.PRE_COPY})
        node = Node(api, tmp_path, SOURCE)
        node.handles[vmi["metadata"]["uid"]] = FakeHandle("src")
        assert not await node.pass_()
        assert not node.started

    run(tmp_path, body)


# -- target side ----------------------------------------------------------------------------


@pytest.mark.parametrize("published", [True, False])
def test_restarted_target_registers_its_guest_again_with_its_receiver(
    tmp_path: Path, published: bool
) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api, node_name=TARGET if published else SOURCE)
        uid = vmi["metadata"]["uid"]
        node = Node(api, tmp_path, TARGET)
        node.records.write(MIG, RestartRecord("g", b'{"s": 1}', postcopy=True))
        guest = FakeHandle(incoming_id(vmi, vmi["status"]["migrationState"]))
        guest.incoming = False
        node.keeper.adopted[uid] = guest
        assert await node.pass_()
        await node.settle()
        inc = node.registry.get(MIG)
        assert inc is not None and inc.state is TargetState.POSTCOPY_RUNNING
        assert inc.state.guest_runs_here and inc.token == "tok" and inc.source_node == SOURCE
        assert inc.handle is guest and node.handles[uid] is guest and not node.keeper.adopted
        assert inc.disconnected_since == node.clock()  # the recovery window runs from here
        assert guest.destroyed == 0 and guest.resumes == 0
        assert (await node.vmi())["status"]["nodeName"] == TARGET

    run(tmp_path, body)


@pytest.mark.parametrize("kind", ["memvm", "qemu"])
def test_target_committed_but_not_resumed_resumes_in_post_copy(tmp_path: Path, kind: str) -> None:
    """memvm resumes in post-copy from the record's device state; a QEMU guest (which
    moves its pages itself and carries its device state in its stream) is started."""

    async def body(api: StoreApi) -> None:
        vmi = await setup(api)
        node = Node(api, tmp_path, TARGET)
        node.records.write(MIG, RestartRecord("g", b'{"s": 2}', postcopy=True))
        vm_id = incoming_id(vmi, vmi["status"]["migrationState"])
        waiting = FakeHandle(vm_id) if kind == "memvm" else SelfPagingHandle(vm_id)
        node.orphans[waiting.vm_id] = waiting
        assert await node.pass_()
        await node.settle()
        if isinstance(waiting, FakeHandle):
            assert waiting.postcopy_resumed_with == [b'{"s": 2}'] and waiting.resumed_with == []
        else:
            assert waiting.resumed == 1
        assert not node.orphans and node.registry.get(MIG) is not None

    run(tmp_path, body)


def test_target_without_a_post_copy_record_registers_nothing(tmp_path: Path) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api)
        node = Node(api, tmp_path, TARGET)
        node.records.write(MIG, RestartRecord("g", b"{}", postcopy=False))
        node.keeper.adopted[vmi["metadata"]["uid"]] = FakeHandle("g")
        assert not await node.pass_()
        assert node.registry.get(MIG) is None

    run(tmp_path, body)


def registered(node: Node, vmi: Obj) -> tuple[IncomingMigration, FakeHandle]:
    guest = FakeHandle("g")
    inc = IncomingMigration.readopted_postcopy(
        "default", "vm", vmi["metadata"]["uid"], MIG, "tok", SOURCE, guest, b"{}", node.clock()
    )
    node.registry.expect(inc)
    node.handles[vmi["metadata"]["uid"]] = guest
    return inc, guest


def test_target_waits_out_the_recovery_window_then_declares_the_vm_lost(
    tmp_path: Path,
) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api, node_name=TARGET)
        node = Node(api, tmp_path, TARGET)
        inc, guest = registered(node, vmi)
        node.clock.advance(WINDOW + LOSS_GRACE - 1)
        assert not await node.pass_()
        assert guest.destroyed == 0 and node.registry.get(MIG) is inc
        inc.disconnected_since = None  # the source reconnected: no window runs
        node.clock.advance(100)
        assert not await node.pass_() and guest.destroyed == 0
        inc.disconnected_since = node.clock()
        node.clock.advance(WINDOW + LOSS_GRACE + 1)
        assert await node.pass_()
        assert guest.destroyed == 1 and node.registry.get(MIG) is None and not node.handles
        stored = await node.vmi()
        ms = stored["status"]["migrationState"]
        assert ms[Field.FAILED] and "postCopyRecoveryWindowSeconds" in ms[Field.FAILURE_REASON]
        assert ms[Field.END_TIMESTAMP]
        assert_lost(stored)

    run(tmp_path, body)


def test_target_stops_its_guest_when_the_source_failed_post_copy(tmp_path: Path) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(
            api, node_name=TARGET, ms={Field.FAILED: True, Field.FAILURE_REASON: "first"}
        )
        node = Node(api, tmp_path, TARGET)
        node.records.write(MIG, RestartRecord("g", b"{}", postcopy=True))
        _, guest = registered(node, vmi)
        assert await node.pass_()
        assert guest.destroyed == 1 and node.registry.get(MIG) is None
        assert node.records.read(MIG) is None
        stored = await node.vmi()
        assert stored["status"]["migrationState"][Field.FAILURE_REASON] == "first"
        assert_lost(stored)

    run(tmp_path, body)


def test_restarted_target_stops_an_adopted_guest_of_a_failed_post_copy(tmp_path: Path) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api, node_name=TARGET, ms={Field.FAILED: True})
        node = Node(api, tmp_path, TARGET)
        guest = FakeHandle("g")
        uid = vmi["metadata"]["uid"]
        node.keeper.adopted[uid] = guest
        node.handles[uid] = guest
        assert await node.pass_()
        assert guest.destroyed == 1 and not node.handles and not node.keeper.adopted
        assert_lost(await node.vmi())

    run(tmp_path, body)


def test_target_records_a_finished_post_copy_the_source_never_recorded(
    tmp_path: Path,
) -> None:
    async def body(api: StoreApi) -> None:
        vmi = await setup(api)  # nodeName still the source's: nothing was published
        node = Node(api, tmp_path, TARGET)
        guest = FakeHandle("g")
        guest.incoming = False
        node.handles[vmi["metadata"]["uid"]] = guest  # runs here, every page in
        assert not await node.pass_()
        node.clock.advance(COMPLETION_GRACE - 1)
        assert not await node.pass_()
        assert not (await node.vmi())["status"]["migrationState"].get(Field.COMPLETED)
        node.clock.advance(2)
        assert not await node.pass_()
        stored = await node.vmi()
        ms = stored["status"]["migrationState"]
        assert ms[Field.COMPLETED] and ms[Field.END_TIMESTAMP] and not ms.get(Field.FAILED)
        assert stored["status"]["nodeName"] == TARGET and guest.destroyed == 0

    run(tmp_path, body)


def test_source_whose_paused_guest_died_declares_the_vm_lost(tmp_path: Path) -> None:
    async def body(api: StoreApi) -> None:
        await setup(api, node_name=TARGET)
        node = Node(api, tmp_path, SOURCE)  # restarted: no guest was adopted
        assert await node.pass_()
        stored = await node.vmi()
        ms = stored["status"]["migrationState"]
        assert ms[Field.FAILED] and "source guest on node1 is gone" in ms[Field.FAILURE_REASON]
        assert not ms.get(Field.COMPLETED) and not node.started
        assert_lost(stored)

    run(tmp_path, body)


def test_a_self_paging_target_in_post_copy_is_registered_again_never_completed(
    tmp_path: Path,
) -> None:
    """A restarted target whose QEMU guest runs in post-copy: its restart record says
    post-copy, so it waits for the source's recovery stream instead of being taken for a
    finished post-copy (which would let the source destroy the pages it still lacks)."""

    async def body(api: StoreApi) -> None:
        vmi = await setup(api)
        uid = vmi["metadata"]["uid"]
        node = Node(api, tmp_path, TARGET)
        node.records.write(MIG, RestartRecord("g", b"", postcopy=True))
        guest = SelfPagingHandle("g")
        node.handles[uid] = guest  # adopted as a running guest
        assert await node.pass_()
        await node.settle()
        inc = node.registry.get(MIG)
        assert inc is not None and inc.state is TargetState.POSTCOPY_RUNNING
        assert inc.handle is guest and inc.disconnected_since == node.clock()
        node.clock.advance(COMPLETION_GRACE + 1)
        await node.pass_()
        assert not (await node.vmi())["status"]["migrationState"].get(Field.COMPLETED)
        assert guest.resumed == 0 and guest.destroyed == 0

    run(tmp_path, body)
