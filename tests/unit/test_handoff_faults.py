"""Finishing a migration after the hand-off when a daemon died (issue 25), with fakes:
the restarted target publishes where the guest runs, the restarted source records the
completion it lost, the target address and the start are retried while the API is away,
and a failure never replaces an outcome already recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from handler import vm_incoming
from handler.migration import handoff
from handler.migration.handoff import HandoffRecord
from handler.migration.restart_record import RestartRecord, RestartRecords
from handler.migration.target_state import TargetState
from handler.vm_incoming import incoming_id
from tests.support.fake_api import StoreApi
from tests.support.fake_handle import FakeHandle
from tests.unit.test_vm_incoming import (
    MIG,
    SOURCE,
    TARGET,
    Obj,
    Target,
    manager,
    store_vmi,
    with_api,
)
from vmferry.errors import Unavailable
from vmferry.migration_state import Field, Switchover

pytestmark = pytest.mark.timeout(30)


async def stored(api: StoreApi) -> Obj:
    status: Obj = (await api.get("VirtualMachineInstance", "default", "vm"))["status"]
    return status


# -- the arbiter record ---------------------------------------------------------------------


@with_api
async def test_a_failure_never_replaces_the_first_reason(api: StoreApi, tmp_path: Path) -> None:
    await store_vmi(api, {Field.START_TIMESTAMP: "2026-01-01T00:00:00Z"})
    record = HandoffRecord(api, "default", "vm", MIG)  # type: ignore[arg-type]
    first = {Field.FAILED: True, Field.FAILURE_REASON: "the completion timeout passed"}
    assert await record.fail(first)
    later = {Field.FAILED: True, Field.FAILURE_REASON: "the source handler restarted"}
    assert not await record.fail(later)
    await record.patch_until_written(later)  # the engine's path goes through fail() too
    ms = (await stored(api))["migrationState"]
    assert ms[Field.FAILURE_REASON] == "the completion timeout passed"


@with_api
async def test_a_failure_never_replaces_a_completion(api: StoreApi, tmp_path: Path) -> None:
    await store_vmi(api, {Field.COMPLETED: True})
    record = HandoffRecord(api, "default", "vm", MIG)  # type: ignore[arg-type]
    assert not await record.fail({Field.FAILED: True, Field.FAILURE_REASON: "late"})
    ms = (await stored(api))["migrationState"]
    assert ms[Field.COMPLETED] is True and Field.FAILED not in ms


@with_api
async def test_mark_started_waits_out_a_controller_restart(
    api: StoreApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handoff, "RETRY", 0.01)
    await store_vmi(api, {})
    api.fail_next = [Unavailable("the controller is unavailable")] * 3
    record = HandoffRecord(api, "default", "vm", MIG)  # type: ignore[arg-type]
    assert await record.mark_started({})
    assert (await stored(api))["migrationState"][Field.START_TIMESTAMP]


# -- the target ----------------------------------------------------------------------------


@with_api
async def test_a_registered_guest_whose_address_never_landed_publishes_it(
    api: StoreApi, tmp_path: Path
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await store_vmi(api, {Field.TARGET_NODE_DOMAIN_DETECTED: True})
    target.register(TargetState.AWAITING_HELLO, vmi["metadata"]["uid"])
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    ms = (await stored(api))["migrationState"]
    assert ms[Field.TARGET_NODE_ADDRESS] == "10.0.0.2" and ms[Field.TARGET_NODE_PORT] == 7444


@with_api
async def test_a_guest_resumed_from_its_restart_record_is_published(
    api: StoreApi, tmp_path: Path
) -> None:
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.COMMITTED})
    vm = await manager(api, tmp_path, TARGET, vmi)
    orphan = FakeHandle(incoming_id(vmi, vmi["status"]["migrationState"]))
    vm.target.orphans[orphan.vm_id] = orphan
    vm.incoming.records.write(MIG, RestartRecord(orphan.vm_id, b'{"ticks": 7}'))
    await vm.reconcile(("default", "vm"))
    for task in list(vm._tasks):
        await task
    status = await stored(api)
    assert orphan.resumed_with == [b'{"ticks": 7}']
    assert status["nodeName"] == TARGET and status["launcher"]["vmId"] == orphan.vm_id
    assert status["migrationState"][Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP]


@with_api
async def test_a_guest_running_here_after_the_hand_off_corrects_the_node_name(
    api: StoreApi, tmp_path: Path
) -> None:
    """The target died after the resume, before it published nodeName: its restarted
    handler adopted the running guest; the audit publishes where it runs."""
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.COMMITTED})
    vm = await manager(api, tmp_path, TARGET, vmi)
    guest = FakeHandle(incoming_id(vmi, vmi["status"]["migrationState"]))
    guest.incoming = False
    vm.handles[vmi["metadata"]["uid"]] = guest
    await vm.reconcile(("default", "vm"))
    status = await stored(api)
    assert status["nodeName"] == TARGET and status["launcher"]["vmId"] == guest.vm_id
    assert guest.destroyed == 0


# -- the source ----------------------------------------------------------------------------


@pytest.mark.parametrize("published", [True, False])
@with_api
async def test_a_restarted_source_records_the_completion_it_lost(
    api: StoreApi, tmp_path: Path, published: bool
) -> None:
    """The source died after the hand-off; the target resumed the guest and (if
    ``published``) said so. The restarted source destroys its paused guest and records
    the completion only once the VM runs on the target."""
    ms: Obj = {Field.START_TIMESTAMP: "2026-01-01T00:00:00Z", Field.SWITCHOVER: "Committed"}
    if published:
        ms[Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP] = "2026-01-01T00:00:01Z"
    vmi = await store_vmi(api, ms, node=TARGET if published else SOURCE)
    vm = await manager(api, tmp_path, SOURCE, vmi)
    guest = FakeHandle("source-guest")
    vm.handles[vmi["metadata"]["uid"]] = guest
    await vm.reconcile(("default", "vm"))
    assert guest.destroyed == 1
    assert (await stored(api))["migrationState"][Field.COMPLETED] is True


@with_api
async def test_a_settle_on_a_stale_cache_keeps_the_engines_reason(
    api: StoreApi, tmp_path: Path
) -> None:
    """The engine failed (and resumed the guest) but the cache still shows the migration
    active with no engine running: the settle path must not replace the real reason."""
    ms: Obj = {Field.START_TIMESTAMP: "2026-01-01T00:00:00Z"}
    vmi = await store_vmi(api, ms)
    stale = {
        **vmi,
        "status": {**vmi["status"], "migrationState": dict(vmi["status"]["migrationState"])},
    }
    record = HandoffRecord(api, "default", "vm", MIG)  # type: ignore[arg-type]
    assert await record.claim(Switchover.ABORTED) == Switchover.ABORTED
    reason = "the migration did not complete within its completion timeout"
    assert await record.fail({Field.FAILED: True, Field.FAILURE_REASON: reason})
    vm = await manager(api, tmp_path, SOURCE, stale)
    vm.handles[vmi["metadata"]["uid"]] = FakeHandle("source-guest")
    await vm.reconcile(("default", "vm"))
    assert (await stored(api))["migrationState"][Field.FAILURE_REASON] == reason


@pytest.mark.parametrize("guest_here", [True, False])
@with_api
async def test_a_handed_off_vm_that_runs_nowhere_is_not_running(
    api: StoreApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest_here: bool
) -> None:
    """The source completed (its copy is gone) and the target's guest died while its
    handler was away: the VMI must not stay Running on the source."""
    monkeypatch.setattr(vm_incoming, "LOST_AFTER", 0.0)
    ms: Obj = {Field.SWITCHOVER: Switchover.COMMITTED, Field.COMPLETED: True}
    vmi = await store_vmi(api, ms)
    vm = await manager(api, tmp_path, TARGET, vmi)
    if guest_here:
        guest = FakeHandle("running-here")
        guest.incoming = False
        vm.handles[vmi["metadata"]["uid"]] = guest
    await vm.reconcile(("default", "vm"))
    status = await stored(api)
    assert status["nodeName"] == TARGET
    assert status["phase"] == ("Running" if guest_here else "Failed")
