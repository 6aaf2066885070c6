"""The sending half of a cross-cluster migration (sync_controller/sender.py) with fakes:
two real Stores behind StoreApis ("clusters"), a FakePeerLink pair between the two sync
reconcilers, fake clocks, and the handlers played by writes into the VMIs' migrationState
through the real HandoffRecord (tests/support/fake_peer.py).

Covers the whole move to Succeeded on both sides with the final objects, the phases and
the hand-off the sender writes, failure, cancel from this side, the peer unreachable
before the hand-off (the link's reason after unschedulableTimeoutSeconds), the decision
standing when the link breaks after it, the gate, and run() with informers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from handler.migration.handoff import HandoffRecord
from sync_controller.common import SENDER_TRANSITIONS, PhaseError, advance, mirror_only
from sync_controller.sender import SenderReconciler
from tests.support.fake_peer import (
    CONNECT_URL,
    MIGRATION_ID,
    NAME,
    NS,
    SENDER_VMIM,
    TARGET_ADDRESS,
    TARGET_PORT,
    CrossCluster,
)
from vmferry.decentralized import (
    MIGRATED_TO_ANNOTATION,
    RESTORE_RUN_STRATEGY_ANNOTATION,
    Role,
    gate_off_message,
)
from vmferry.errors import NotFound
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    ConfigKey,
    Field,
    MigrationPhase,
    Switchover,
    VMIPhase,
    raw,
    token_secret_name,
)
from vmferry.objects import schema

pytestmark = pytest.mark.timeout(60)
Obj = dict[str, Any]
VMIM = "VirtualMachineInstanceMigration"


def with_pair(
    tmp_path: Path, test: Callable[[CrossCluster], Awaitable[None]], **options: bool
) -> None:
    """Run ``test`` on a fresh pair of clusters (see CrossCluster.open for ``options``)."""

    async def main() -> None:
        pair = await CrossCluster.open(tmp_path, **options)
        try:
            await test(pair)
        finally:
            await pair.close()

    asyncio.run(main())


def phases(vmim: Obj | None) -> list[str]:
    return [
        s["phase"] for s in ((vmim or {}).get("status") or {}).get("phaseTransitionTimestamps", [])
    ]


async def secret(api: Any, uid: str) -> Obj | None:
    try:
        result: Obj = await api.get("Secret", TOKEN_SECRET_NAMESPACE, token_secret_name(uid))
        return result
    except NotFound:
        return None


def test_happy_path_both_sides_succeed(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_happy_path_both_sides_succeed)


async def _test_happy_path_both_sides_succeed(pair: CrossCluster) -> None:
    pair.source_decides = False
    await pair.pump_until(lambda: _phase_is(pair, MigrationPhase.RUNNING))
    sending = await pair.sending()
    assert sending is not None
    uid = sending["metadata"]["uid"]
    # the hand-off the sender wrote, and what the receiver wrote, name each other
    source_ms = raw(await pair.vmi(pair.c1))
    assert source_ms[Field.MIGRATION_UID] == uid
    assert source_ms[Field.ROLE] == Role.SENDER
    assert source_ms[Field.PEER_CLUSTER] == "cluster2"
    assert source_ms[Field.MIGRATION_ID] == MIGRATION_ID
    assert source_ms[Field.SOURCE_NODE] == "node1"
    assert (source_ms[Field.TARGET_NODE_ADDRESS], source_ms[Field.TARGET_NODE_PORT]) == (
        TARGET_ADDRESS,
        TARGET_PORT,
    )
    assert source_ms[Field.MIGRATION_CONFIGURATION][ConfigKey.ALLOW_POST_COPY] is False
    target_ms = raw(await pair.vmi(pair.c2))
    assert target_ms[Field.MIGRATION_UID] == uid
    assert target_ms[Field.ROLE] == Role.RECEIVER
    assert target_ms[Field.PEER_CLUSTER] == "cluster1"
    assert target_ms[Field.SOURCE_NODE] == "node1"
    assert source_ms[Field.TARGET_NODE] == target_ms[Field.TARGET_NODE]
    assert target_ms[Field.MIGRATION_CONFIGURATION][ConfigKey.ALLOW_POST_COPY] is False
    assert pair.link1.connects == [(MIGRATION_ID, CONNECT_URL)]
    # one token, relayed: the sending cluster's Secret for the source node, the
    # receiving cluster's for the target node
    s1, s2 = await secret(pair.c1, uid), await secret(pair.c2, uid)
    assert s1 is not None and s2 is not None
    assert s1["data"][TOKEN_SECRET_KEY] == s2["data"][TOKEN_SECRET_KEY]
    assert base64.b64decode(s1["data"][TOKEN_SECRET_KEY])
    assert s1["metadata"]["labels"]["migration.vmferry.io/source-node"] == "node1"
    assert (
        s2["metadata"]["labels"]["migration.vmferry.io/target-node"] == target_ms[Field.TARGET_NODE]
    )
    assert all(state.token == "" for state in pair.link2.history)  # the receiver relays none

    pair.source_decides = True
    await pair.pump()
    sending, receiving = await pair.sending(), await pair.receiving()
    assert MigrationPhase.of(sending or {}) == MigrationPhase.SUCCEEDED
    assert MigrationPhase.of(receiving or {}) == MigrationPhase.SUCCEEDED
    assert phases(sending) == [
        "Pending",
        "Synchronizing",
        "Scheduled",
        "PreparingTarget",
        "TargetReady",
        "Running",
        "Succeeded",
    ]
    assert phases(receiving) == [
        "WaitingForSync",
        "Scheduling",
        "Scheduled",
        "PreparingTarget",
        "TargetReady",
        "Running",
        "Succeeded",
    ]
    # cluster1: the source VM halted and says where it went; its VMI Succeeded
    vm1, vmi1 = await pair.vm(pair.c1), await pair.vmi(pair.c1)
    assert vm1["spec"]["runStrategy"] == "Halted"
    assert vm1["metadata"]["annotations"][MIGRATED_TO_ANNOTATION] == f"cluster2/{NS}/{NAME}"
    assert vmi1["status"]["phase"] == VMIPhase.SUCCEEDED
    assert vmi1["status"]["reason"] == "migrated to cluster2"
    # cluster2: the VM runs on the target, its runStrategy restored
    vm2, vmi2 = await pair.vm(pair.c2), await pair.vmi(pair.c2)
    assert vm2["spec"]["runStrategy"] == "Always"
    assert RESTORE_RUN_STRATEGY_ANNOTATION not in (vm2["metadata"].get("annotations") or {})
    assert vmi2["status"]["phase"] == VMIPhase.RUNNING
    assert vmi2["status"]["nodeName"] == target_ms[Field.TARGET_NODE]
    # both VMIs and VMIMs show the migration state
    for obj in (vmi1, vmi2, sending, receiving):
        ms = raw(obj or {})
        assert ms[Field.MIGRATION_UID] == uid
        assert ms[Field.SWITCHOVER] == Switchover.COMMITTED
        assert ms[Field.COMPLETED] is True
        assert not ms.get(Field.FAILED)
    assert pair.switchovers == ["", "Committed"]  # mirrored once
    # everything written passes the API's validation (the store in these tests does not)
    for obj in (vmi1, sending, receiving, vmi2):
        schema.validate(obj, server_managed=True)
    assert await secret(pair.c1, uid) is None and await secret(pair.c2, uid) is None
    assert not pair.discarded
    # the receiver learned the resume; both sides forgot the migration once both ended
    assert any(s.target_resumed for s in pair.link2.history)
    assert MIGRATION_ID in pair.link1.forgotten and MIGRATION_ID in pair.link2.forgotten
    # each half records its outcome as an Event on its VMIM (issue 21)
    await pair.sender.events.recorder.flush()
    await pair.receiver.events.recorder.flush()
    for api in (pair.c1, pair.c2):
        events, _ = await api.store.list("Event", NS)
        assert [(e["reason"], e["source"]["component"]) for e in events] == [
            ("SuccessfulMigration", "vmferry-sync-controller")
        ]
        assert events[0]["involvedObject"]["kind"] == "VirtualMachineInstanceMigration"


async def _phase_is(pair: CrossCluster, phase: MigrationPhase) -> bool:
    return await pair.sending_phase() == phase


def test_source_failure_keeps_the_vm_on_the_source(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_source_failure_keeps_the_vm_on_the_source)


async def _test_source_failure_keeps_the_vm_on_the_source(pair: CrossCluster) -> None:
    pair.source_decides = False
    await pair.pump_until(lambda: _phase_is(pair, MigrationPhase.RUNNING))
    pair.source_fails = "the migration stream broke: connection reset"
    await pair.pump()
    assert await pair.sending_phase() == MigrationPhase.FAILED
    assert await pair.receiving_phase() == MigrationPhase.FAILED
    sending = await pair.sending()
    assert (
        raw(sending or {})[Field.FAILURE_REASON] == "the migration stream broke: connection reset"
    )
    vm1, vmi1 = await pair.vm(pair.c1), await pair.vmi(pair.c1)
    assert vm1["spec"]["runStrategy"] == "Always"
    assert MIGRATED_TO_ANNOTATION not in (vm1["metadata"].get("annotations") or {})
    assert vmi1["status"]["phase"] == VMIPhase.RUNNING
    assert vmi1["status"]["nodeName"] == "node1"
    vmi2 = await pair.vmi(pair.c2)
    assert vmi2["status"]["phase"] == VMIPhase.FAILED
    ms2 = raw(vmi2)
    assert ms2[Field.SWITCHOVER] == Switchover.ABORTED
    assert ms2[Field.FAILED] is True
    assert ms2[Field.FAILURE_REASON] == "the migration stream broke: connection reset"
    assert pair.discarded
    assert pair.switchovers == ["", "Aborted"]


def test_cancel_on_the_sending_side_before_the_handoff(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_cancel_on_the_sending_side_before_the_handoff)


async def _test_cancel_on_the_sending_side_before_the_handoff(pair: CrossCluster) -> None:
    pair.target_prepares = False
    await pair.pump()
    assert await pair.sending_phase() == MigrationPhase.SYNCHRONIZING
    assert await pair.receiving_phase() == MigrationPhase.SCHEDULED
    await pair.c1.delete(VMIM, NS, SENDER_VMIM)
    await pair.pump()
    assert await pair.sending() is None  # finalizer removed: gone
    assert any(s.cancelled for s in pair.link1.history)
    assert await pair.receiving_phase() == MigrationPhase.FAILED
    assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.FAILED
    vmi1 = await pair.vmi(pair.c1)
    assert vmi1["status"]["phase"] == VMIPhase.RUNNING
    assert not raw(vmi1)  # no hand-off was ever written on the source
    assert pair.discarded
    # both ended: the link forgets the migration on both sides (the sending VMIM is gone)
    assert MIGRATION_ID in pair.link1.forgotten and MIGRATION_ID in pair.link2.forgotten


def test_cancel_on_the_sending_side_while_running(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_cancel_on_the_sending_side_while_running)


async def _test_cancel_on_the_sending_side_while_running(pair: CrossCluster) -> None:
    pair.source_decides = False
    await pair.pump_until(lambda: _phase_is(pair, MigrationPhase.RUNNING))
    await pair.c1.delete(VMIM, NS, SENDER_VMIM)
    await pair.step()
    assert raw(await pair.vmi(pair.c1)).get(Field.ABORT_REQUESTED) is True
    await pair.pump()
    assert await pair.sending() is None
    assert await pair.receiving_phase() == MigrationPhase.FAILED
    vmi1 = await pair.vmi(pair.c1)
    assert vmi1["status"]["phase"] == VMIPhase.RUNNING
    assert raw(vmi1)[Field.SWITCHOVER] == Switchover.ABORTED
    assert (await pair.vm(pair.c1))["spec"]["runStrategy"] == "Always"
    assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.FAILED
    assert pair.switchovers == ["", "Aborted"]


def test_peer_unreachable_before_the_handoff_fails_after_the_timeout(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_peer_unreachable_before_the_handoff_fails_after_the_timeout)


async def _test_peer_unreachable_before_the_handoff_fails_after_the_timeout(
    pair: CrossCluster,
) -> None:
    pair.link1.set_up(False)
    await pair.pump()
    assert await pair.sending_phase() == MigrationPhase.SYNCHRONIZING
    assert await pair.receiving_phase() == MigrationPhase.WAITING_FOR_SYNC
    sending = await pair.sending()
    condition = (sending or {})["status"]["conditions"][0]
    assert "unreachable: connection refused" in condition["message"]
    pair.clock1.advance(299)
    await pair.pump()
    assert await pair.sending_phase() == MigrationPhase.SYNCHRONIZING
    pair.clock1.advance(2)
    await pair.pump()
    sending = await pair.sending()
    assert MigrationPhase.of(sending or {}) == MigrationPhase.FAILED
    reason = raw(sending or {})[Field.FAILURE_REASON]
    assert reason.startswith(f"peer at {CONNECT_URL} unreachable: connection refused (waited")
    assert (await pair.vmi(pair.c1))["status"]["phase"] == VMIPhase.RUNNING
    assert await secret(pair.c1, (sending or {})["metadata"]["uid"]) is None
    # the link comes back: the receiver learns the failure and fails too
    pair.link1.set_up(True)
    await pair.pump()
    assert await pair.receiving_phase() == MigrationPhase.FAILED
    assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.FAILED


def test_link_cut_after_the_decision_the_record_stands(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_link_cut_after_the_decision_the_record_stands)


async def _test_link_cut_after_the_decision_the_record_stands(pair: CrossCluster) -> None:
    pair.source_decides = False
    await pair.pump_until(lambda: _phase_is(pair, MigrationPhase.RUNNING))
    pair.link1.set_up(False)
    pair.source_decides = True
    await pair.pump()
    # cluster1 decided and finished by its own record
    assert await pair.sending_phase() == MigrationPhase.SUCCEEDED
    assert (await pair.vm(pair.c1))["spec"]["runStrategy"] == "Halted"
    # cluster2 cannot know: nothing changes there, the target waits (no guess)
    assert await pair.receiving_phase() == MigrationPhase.RUNNING
    ms2 = raw(await pair.vmi(pair.c2))
    assert not ms2.get(Field.SWITCHOVER) and not ms2.get(Field.FAILED)
    assert not pair.discarded
    pair.clock2.advance(3600)  # however long
    await pair.pump()
    assert await pair.receiving_phase() == MigrationPhase.RUNNING
    assert not raw(await pair.vmi(pair.c2)).get(Field.SWITCHOVER)
    pair.link1.set_up(True)
    await pair.pump()
    assert await pair.receiving_phase() == MigrationPhase.SUCCEEDED
    assert pair.switchovers == ["", "Committed"]
    assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.RUNNING


def test_gate_off_fails_the_sending_vmim(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_gate_off_fails_the_sending_vmim, gate1=False)


async def _test_gate_off_fails_the_sending_vmim(pair: CrossCluster) -> None:
    if True:
        await pair.pump()
        sending = await pair.sending()
        assert MigrationPhase.of(sending or {}) == MigrationPhase.FAILED
        assert raw(sending or {})[Field.FAILURE_REASON] == gate_off_message()
        assert (await pair.vmi(pair.c1))["status"]["phase"] == VMIPhase.RUNNING
        assert await pair.receiving_phase() == MigrationPhase.FAILED


def test_the_sender_phase_machine_refuses_a_skip() -> None:
    status: Obj = {}
    advance(SENDER_TRANSITIONS, status, MigrationPhase.PENDING, lambda: 0.0)
    with pytest.raises(PhaseError, match="no transition Pending -> Running"):
        advance(SENDER_TRANSITIONS, status, MigrationPhase.RUNNING, lambda: 0.0)


def test_run_with_informers_moves_the_vm(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_run_with_informers_moves_the_vm)


async def _test_run_with_informers_moves_the_vm(pair: CrossCluster) -> None:
    async def handlers() -> None:
        while True:
            await pair.source_handler()
            await pair.target_handler()
            await asyncio.sleep(0.02)

    tasks = [
        asyncio.create_task(pair.sender.run()),
        asyncio.create_task(pair.receiver.run()),
        asyncio.create_task(handlers()),
    ]
    try:
        async with asyncio.timeout(30):
            while True:
                done = (await pair.sending_phase(), await pair.receiving_phase())
                if done == (MigrationPhase.SUCCEEDED, MigrationPhase.SUCCEEDED):
                    break
                await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert (await pair.vm(pair.c1))["spec"]["runStrategy"] == "Halted"
    assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.RUNNING


def test_the_handoff_is_written_once_when_the_vmim_write_fails(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        for _ in range(20):  # until the receiver's target listens (relayed)
            await pair.receiver.reconcile((NS, "receive-busy"))
            await pair.target_handler()
            peer = pair.link1.latest(MIGRATION_ID)
            if peer is not None and peer.target_address:
                break
            await pair.sender.reconcile((NS, SENDER_VMIM))
        assert await pair.sending_phase() == MigrationPhase.SYNCHRONIZING
        original = pair.sender._scheduled

        async def lost(vmim: Obj, handoff: Obj) -> None:
            raise RuntimeError("the controller went away")

        pair.sender._scheduled = lost  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await pair.sender.reconcile((NS, SENDER_VMIM))
        pair.sender._scheduled = original  # type: ignore[method-assign]
        first = raw(await pair.vmi(pair.c1))
        assert first[Field.MIGRATION_UID] and await pair.sending_phase() == "Synchronizing"
        writes = len(pair.c1.writes("VirtualMachineInstance"))
        await pair.sender.reconcile((NS, SENDER_VMIM))
        assert await pair.sending_phase() == MigrationPhase.SCHEDULED
        assert len(pair.c1.writes("VirtualMachineInstance")) == writes  # not written again
        assert raw(await pair.vmi(pair.c1)) == first
        await pair.pump()
        assert await pair.sending_phase() == MigrationPhase.SUCCEEDED

    with_pair(tmp_path, test)


def test_a_restarted_sender_relays_the_same_token(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        pair.target_prepares = False
        await pair.pump()
        token = pair.link1.published[MIGRATION_ID].token
        assert token
        pair.link1.on_peer_update = lambda state: None
        pair.sender = SenderReconciler(
            pair.c1, pair.link1, pair.clock1, cluster_name="cluster1", source=None
        )
        pair.target_prepares = True
        await pair.pump()
        assert await pair.sending_phase() == MigrationPhase.SUCCEEDED
        assert {s.token for s in pair.link1.history if s.token} == {token}

    with_pair(tmp_path, test)


def test_a_connect_url_leading_to_this_cluster_fails(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        pair.link2.cluster_name = "cluster1"  # the peer's CA is registered under our name
        await pair.pump()
        sending = await pair.sending()
        assert MigrationPhase.of(sending or {}) == MigrationPhase.FAILED
        assert raw(sending or {})[Field.FAILURE_REASON] == (
            f"connectURL {CONNECT_URL} leads to this cluster (cluster1): a decentralized "
            "migration moves a VM to another cluster"
        )
        assert (await pair.vmi(pair.c1))["status"]["phase"] == VMIPhase.RUNNING

    with_pair(tmp_path, test)


def test_a_sender_restarted_after_the_handoff_relays_the_decision(tmp_path: Path) -> None:
    """A sending sync controller restarted past Synchronizing (its link never dialled in
    this life) still tells the receiver the decision: the receiving VMIM ends Succeeded."""

    async def test(pair: CrossCluster) -> None:
        pair.source_decides = False
        await pair.pump_until(lambda: _phase_is(pair, MigrationPhase.RUNNING))
        # the restart: a new reconciler, and a link that has dialled nothing yet
        pair.link1.wire.connected.discard(MIGRATION_ID)
        pair.link1.connects.clear()
        pair.sender = SenderReconciler(
            pair.c1, pair.link1, pair.clock1, cluster_name="cluster1", source=None
        )
        pair.source_decides = True
        await pair.pump()
        assert await pair.sending_phase() == MigrationPhase.SUCCEEDED
        assert pair.link1.connects == [(MIGRATION_ID, CONNECT_URL)]
        assert await pair.receiving_phase() == MigrationPhase.SUCCEEDED
        assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.RUNNING

    with_pair(tmp_path, test)


def test_a_deleted_succeeded_vmim_stays_until_the_peer_has_the_outcome(tmp_path: Path) -> None:
    """The decision was made while the link was down and the user deleted the Succeeded
    sending VMIM: the source VMI (the arbiter's record) is gone with the move, so the
    VMIM's finalizer keeps its final half until the receiver has it; then it goes."""

    async def test(pair: CrossCluster) -> None:
        pair.source_decides = False
        await pair.pump_until(lambda: _phase_is(pair, MigrationPhase.RUNNING))
        pair.link1.set_up(False)
        pair.source_decides = True
        await pair.pump()
        assert await pair.sending_phase() == MigrationPhase.SUCCEEDED
        await pair.c1.delete(VMIM, NS, SENDER_VMIM)
        await pair.pump()
        held = await pair.sending()
        assert held is not None and held["metadata"].get("deletionTimestamp")
        assert await pair.receiving_phase() == MigrationPhase.RUNNING  # still cut off
        pair.link1.set_up(True)
        await pair.pump()
        assert await pair.receiving_phase() == MigrationPhase.SUCCEEDED
        assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.RUNNING
        assert await pair.sending() is None

    with_pair(tmp_path, test)


def test_progress_while_running_costs_one_pass_and_one_write(tmp_path: Path) -> None:
    with_pair(tmp_path, _test_progress_while_running_costs_one_pass_and_one_write)


async def _test_progress_while_running_costs_one_pass_and_one_write(pair: CrossCluster) -> None:
    pair.source_decides = False
    await pair.pump_until(lambda: _phase_is(pair, MigrationPhase.RUNNING))
    await pair.pump()
    uid = raw(await pair.vmi(pair.c1))[Field.MIGRATION_UID]
    # the source handler's progress write (every PROGRESS_PERIOD while it runs)
    record = HandoffRecord(pair.c1, NS, NAME, uid)  # type: ignore[arg-type]
    await record.patch({Field.TRANSFER: {"dataProcessedBytes": 12345}})
    pair.c1.calls.clear()
    await pair.sender.reconcile((NS, SENDER_VMIM))
    sending = await pair.sending()
    assert sending is not None
    assert sending["status"]["migrationState"][Field.TRANSFER]["dataProcessedBytes"] == 12345
    # the VMIM, the VMI, the HyperConverged (the gate) read once; one write (the mirror);
    # the half is published from what the pass holds, not read again
    assert [c[:2] for c in pair.c1.calls if c[1] != "Secret"] == [
        ("get", VMIM),
        ("get", "VirtualMachineInstance"),
        ("get", "HyperConverged"),
        ("update", VMIM),
        ("get", VMIM),  # pair.sending() above
    ]


def test_a_vmim_update_of_its_mirror_only_needs_no_pass() -> None:
    vmim: Obj = {
        "kind": VMIM,
        "metadata": {"name": SENDER_VMIM, "namespace": NS, "resourceVersion": "7"},
        "spec": {"vmiName": NAME, "sendTo": {"migrationID": MIGRATION_ID}},
        "status": {"phase": "Running", "migrationState": {Field.TRANSFER: {"rounds": 1}}},
    }
    progressed = copy.deepcopy(vmim)
    progressed["metadata"]["resourceVersion"] = "8"
    progressed["status"]["migrationState"][Field.TRANSFER]["rounds"] = 2
    assert mirror_only(vmim, progressed)
    assert not mirror_only(None, progressed)  # a new VMIM
    moved = copy.deepcopy(progressed)
    moved["status"]["phase"] = "Succeeded"
    assert not mirror_only(vmim, moved)
    deleting = copy.deepcopy(progressed)
    deleting["metadata"]["deletionTimestamp"] = "2026-12-05T12:00:00Z"
    assert not mirror_only(vmim, deleting)  # a cancel
