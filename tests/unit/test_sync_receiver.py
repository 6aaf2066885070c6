"""The receiving half of a cross-cluster migration (sync_controller/receiver.py) with
fakes: two clusters (real Stores behind StoreApis) whose sync reconcilers talk through a
FakePeerLink pair, fake clocks, and simulated handlers (tests/support/fake_peer.py).

Covers what the receiver writes and relays (the placement, the token Secret with the
relayed token, the hand-off, the target's address only once the target published it),
cancel from this side before and after the target listens (then only the sender's
record decides, however long the link is down), the decision mirrored exactly once and
never contradicted, a receiving VMI that does not wait, no node to receive, a memory
mismatch, the gate, the order in which the two VMIMs appear, and one link shared by both
reconcilers of a sync controller.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sync_controller.common import RECEIVER_TRANSITIONS, PhaseError, advance, subscribe
from tests.support.fake_peer import (
    MIGRATION_ID,
    NAME,
    NS,
    RECEIVER_VMIM,
    TARGET_ADDRESS,
    TARGET_PORT,
    CrossCluster,
    FakePeerLink,
)
from vmferry.decentralized import Role, SyncState, gate_off_message
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    Field,
    MigrationPhase,
    Switchover,
    VMIPhase,
    raw,
    token_secret_name,
)

pytestmark = pytest.mark.timeout(60)
Obj = dict[str, Any]
VMIM = "VirtualMachineInstanceMigration"


def with_pair(
    tmp_path: Path, test: Callable[[CrossCluster], Awaitable[None]], **options: bool
) -> None:
    async def main() -> None:
        pair = await CrossCluster.open(tmp_path, **options)
        try:
            await test(pair)
        finally:
            await pair.close()

    asyncio.run(main())


async def receiving_is(pair: CrossCluster, phase: MigrationPhase) -> bool:
    return await pair.receiving_phase() == phase


async def sending_is(pair: CrossCluster, phase: MigrationPhase) -> bool:
    return await pair.sending_phase() == phase


def test_the_receiver_places_writes_the_token_and_relays_the_target(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        pair.target_prepares = False
        await pair.pump()
        receiving = await pair.receiving()
        assert MigrationPhase.of(receiving or {}) == MigrationPhase.SCHEDULED
        sending = await pair.sending()
        uid = (sending or {})["metadata"]["uid"]
        ms = raw(await pair.vmi(pair.c2))
        assert ms[Field.MIGRATION_UID] == uid
        assert ms[Field.TARGET_NODE] in ("node1", "node2")
        assert ms[Field.MIGRATION_ID] == MIGRATION_ID
        assert raw(receiving or {})[Field.MIGRATION_UID] == uid  # the VMIM mirrors it
        token = pair.link1.published[MIGRATION_ID].token
        assert token
        secret = await pair.c2.get("Secret", TOKEN_SECRET_NAMESPACE, token_secret_name(uid))
        labels = secret["metadata"]["labels"]
        assert labels["migration.vmferry.io/target-node"] == ms[Field.TARGET_NODE]
        assert labels["migration.vmferry.io/source-node"] == ""  # the source is the peer's
        assert base64.b64decode(secret["data"][TOKEN_SECRET_KEY]).decode() == token
        # the target does not listen yet: nothing of it is relayed, the sender waits
        assert not any(s.target_address or s.target_node for s in pair.link2.history)
        assert await pair.sending_phase() == MigrationPhase.SYNCHRONIZING
        assert not raw(await pair.vmi(pair.c1))
        pair.target_prepares = True
        await pair.pump_until(lambda: sending_is(pair, MigrationPhase.SUCCEEDED))
        relayed = [s for s in pair.link2.history if s.target_address]
        assert relayed[0].target_port == TARGET_PORT
        assert relayed[0].target_address == TARGET_ADDRESS
        assert relayed[0].target_node == ms[Field.TARGET_NODE]
        assert relayed[0].migration_uid == uid

    with_pair(tmp_path, test)


def test_cancel_on_the_receiving_side_before_the_target_listens(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        pair.target_prepares = False
        await pair.pump()
        assert await pair.receiving_phase() == MigrationPhase.SCHEDULED
        await pair.c2.delete(VMIM, NS, RECEIVER_VMIM)
        await pair.pump()
        assert await pair.receiving() is None
        vmi2 = await pair.vmi(pair.c2)
        assert vmi2["status"]["phase"] == VMIPhase.FAILED
        assert raw(vmi2)[Field.FAILED] is True
        assert raw(vmi2)[Field.FAILURE_REASON] == "canceled by the user"
        assert pair.discarded
        sending = await pair.sending()
        assert MigrationPhase.of(sending or {}) == MigrationPhase.FAILED
        assert (
            raw(sending or {})[Field.FAILURE_REASON]
            == ("the receiving cluster cluster2 failed: canceled by the user")
            or "canceled on the receiving cluster" in raw(sending or {})[Field.FAILURE_REASON]
        )
        vm1, vmi1 = await pair.vm(pair.c1), await pair.vmi(pair.c1)
        assert vm1["spec"]["runStrategy"] == "Always"
        assert vmi1["status"]["phase"] == VMIPhase.RUNNING

    with_pair(tmp_path, test)


def test_cancel_on_the_receiving_side_while_running_waits_for_the_senders_record(
    tmp_path: Path,
) -> None:
    async def test(pair: CrossCluster) -> None:
        pair.source_decides = False
        await pair.pump_until(lambda: sending_is(pair, MigrationPhase.RUNNING))
        pair.link1.set_up(False)
        await pair.c2.delete(VMIM, NS, RECEIVER_VMIM)
        await pair.pump()
        # the target listens and the source streams: only the sender's record may end it
        receiving = await pair.receiving()
        assert receiving is not None and receiving["metadata"].get("deletionTimestamp")
        assert not MigrationPhase.of(receiving).final
        assert not raw(await pair.vmi(pair.c2)).get(Field.FAILED)
        assert not pair.discarded
        assert pair.link2.published[MIGRATION_ID].cancelled
        pair.clock2.advance(3600)
        await pair.pump()
        assert await pair.receiving() is not None
        pair.link1.set_up(True)
        await pair.pump()
        assert await pair.receiving() is None
        vmi2 = await pair.vmi(pair.c2)
        assert vmi2["status"]["phase"] == VMIPhase.FAILED
        assert raw(vmi2)[Field.SWITCHOVER] == Switchover.ABORTED
        assert pair.discarded
        sending = await pair.sending()
        assert MigrationPhase.of(sending or {}) == MigrationPhase.FAILED
        vmi1 = await pair.vmi(pair.c1)
        assert vmi1["status"]["phase"] == VMIPhase.RUNNING
        assert raw(vmi1)[Field.ABORT_REQUESTED] is True
        assert (await pair.vm(pair.c1))["spec"]["runStrategy"] == "Always"
        assert pair.switchovers == ["", "Aborted"]

    with_pair(tmp_path, test)


def test_the_decision_is_mirrored_once_and_never_contradicted(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        pair.source_completes = False
        await pair.pump_until(lambda: receiving_is(pair, MigrationPhase.SUCCEEDED))
        vmi2 = await pair.vmi(pair.c2)
        assert raw(vmi2)[Field.SWITCHOVER] == Switchover.COMMITTED
        writes_before = len(pair.c2.writes("VirtualMachineInstance"))
        # the same decision again: nothing written
        committed = pair.link2.received[MIGRATION_ID]
        pair.link2.inject(dataclasses.replace(committed, phase="Running"))
        await pair.pump()
        assert len(pair.c2.writes("VirtualMachineInstance")) == writes_before
        # a contradicting half (a bug or a forgery): the recorded decision stands
        pair.link2.inject(
            dataclasses.replace(
                committed,
                switchover=Switchover.ABORTED,
                failed=True,
                failure_reason="aborted",
                phase="Failed",
            )
        )
        await pair.pump()
        ms = raw(await pair.vmi(pair.c2))
        assert ms[Field.SWITCHOVER] == Switchover.COMMITTED
        assert not ms.get(Field.FAILED)
        assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.RUNNING
        assert await pair.receiving_phase() == MigrationPhase.SUCCEEDED
        assert not pair.discarded
        assert pair.switchovers == ["", "Committed"]
        # the sender's completion, when it comes, is mirrored too
        pair.source_completes = True
        pair.link2.inject(committed)
        await pair.pump()
        assert raw(await pair.vmi(pair.c2))[Field.COMPLETED] is True

    with_pair(tmp_path, test)


def test_a_receiving_vmi_that_does_not_wait_fails_the_migration(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        vmi = await pair.vmi(pair.c2)
        vmi["status"] = {"phase": VMIPhase.RUNNING, "nodeName": "node2"}
        await pair.c2.update(vmi, subresource="status")
        await pair.pump()
        receiving = await pair.receiving()
        assert MigrationPhase.of(receiving or {}) == MigrationPhase.FAILED
        reason = raw(receiving or {})[Field.FAILURE_REASON]
        assert "is not waiting to receive a migration (phase Running" in reason
        assert "runStrategy WaitAsReceiver" in reason
        # the VM running here is not touched
        assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.RUNNING
        assert await pair.sending_phase() == MigrationPhase.FAILED
        assert (await pair.vmi(pair.c1))["status"]["phase"] == VMIPhase.RUNNING

    with_pair(tmp_path, test)


def test_no_node_can_receive_fails_after_the_unschedulable_timeout(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        for name in ("node1", "node2"):
            node = await pair.c2.get("Node", "", name)
            node["spec"]["unschedulable"] = True
            await pair.c2.update(node)
        await pair.pump()
        receiving = await pair.receiving()
        assert MigrationPhase.of(receiving or {}) == MigrationPhase.SCHEDULING
        condition = (receiving or {})["status"]["conditions"][0]
        assert "node1: unschedulable (cordoned)" in condition["message"]
        pair.clock2.advance(301)
        await pair.pump()
        receiving = await pair.receiving()
        assert MigrationPhase.of(receiving or {}) == MigrationPhase.FAILED
        assert raw(receiving or {})[Field.FAILURE_REASON].startswith("no node can receive the VMI")
        assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.FAILED
        sending = await pair.sending()
        assert MigrationPhase.of(sending or {}) == MigrationPhase.FAILED
        assert "no node can receive the VMI" in raw(sending or {})[Field.FAILURE_REASON]

    with_pair(tmp_path, test)


def test_memory_mismatch_fails(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        vmi1 = await pair.vmi(pair.c1)
        await pair.c1.delete("VirtualMachineInstance", NS, NAME)
        vmi1_spec: Obj = {"domain": {"memory": {"guest": "128Mi"}}}
        created = await pair.c1.create(
            {
                "apiVersion": vmi1["apiVersion"],
                "kind": "VirtualMachineInstance",
                "metadata": {"name": NAME, "namespace": NS},
                "spec": vmi1_spec,
            }
        )
        created["status"] = {"phase": VMIPhase.RUNNING, "nodeName": "node1"}
        await pair.c1.update(created, subresource="status")
        await pair.pump()
        receiving = await pair.receiving()
        assert MigrationPhase.of(receiving or {}) == MigrationPhase.FAILED
        assert raw(receiving or {})[Field.FAILURE_REASON] == (
            "the receiving VMI's memory (67108864 bytes) differs from the source's "
            "(134217728 bytes)"
        )

    with_pair(tmp_path, test)


def test_gate_off_on_the_receiving_cluster(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        await pair.pump()
        receiving = await pair.receiving()
        assert MigrationPhase.of(receiving or {}) == MigrationPhase.FAILED
        assert raw(receiving or {})[Field.FAILURE_REASON] == gate_off_message()
        assert await pair.sending_phase() == MigrationPhase.FAILED
        assert (await pair.vmi(pair.c1))["status"]["phase"] == VMIPhase.RUNNING

    with_pair(tmp_path, test, gate2=False)


def test_the_sending_vmim_first_then_the_receiving_one(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        await pair.create_sending_vmim()
        await pair.pump()
        assert await pair.sending_phase() == MigrationPhase.SYNCHRONIZING
        await pair.create_receiving_vmim()
        await pair.pump()
        assert await pair.sending_phase() == MigrationPhase.SUCCEEDED
        assert await pair.receiving_phase() == MigrationPhase.SUCCEEDED

    with_pair(tmp_path, test, create_vmims=False)


def test_a_receiving_vmim_whose_vmi_is_missing_waits(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        await pair.c2.delete("VirtualMachineInstance", NS, NAME)
        await pair.pump()
        receiving = await pair.receiving()
        assert MigrationPhase.of(receiving or {}) == MigrationPhase.WAITING_FOR_SYNC
        condition = (receiving or {})["status"]["conditions"][0]
        assert "waiting for VirtualMachineInstance" in condition["message"]

    with_pair(tmp_path, test)


def test_one_link_serves_both_reconcilers() -> None:
    link, _ = FakePeerLink.pair("cluster1", "cluster2")
    seen: list[tuple[str, Role]] = []
    subscribe(link, Role.RECEIVER, lambda s: seen.append(("sender", s.role)))
    subscribe(link, Role.SENDER, lambda s: seen.append(("receiver", s.role)))
    link.inject(SyncState(migration_id="a", role=Role.SENDER))
    link.inject(SyncState(migration_id="b", role=Role.RECEIVER))
    assert seen == [("receiver", Role.SENDER), ("sender", Role.RECEIVER)]


def test_the_receiver_phase_machine() -> None:
    status: Obj = {}
    advance(RECEIVER_TRANSITIONS, status, MigrationPhase.WAITING_FOR_SYNC, lambda: 0.0)
    with pytest.raises(PhaseError, match="no transition WaitingForSync -> Scheduled"):
        advance(RECEIVER_TRANSITIONS, status, MigrationPhase.SCHEDULED, lambda: 0.0)
    advance(RECEIVER_TRANSITIONS, status, MigrationPhase.FAILED, lambda: 0.0)
    with pytest.raises(PhaseError):
        advance(RECEIVER_TRANSITIONS, status, MigrationPhase.SUCCEEDED, lambda: 0.0)


def test_a_lost_vmim_write_after_the_handoff_resumes_without_the_link(tmp_path: Path) -> None:
    async def test(pair: CrossCluster) -> None:
        original = pair.receiver._scheduled

        async def lost(vmim: Obj, handoff: Obj) -> None:
            raise RuntimeError("the controller went away")

        pair.receiver._scheduled = lost  # type: ignore[method-assign]
        for _ in range(10):
            await pair.sender.reconcile((NS, "send-busy"))
            try:
                await pair.receiver.reconcile((NS, RECEIVER_VMIM))
            except RuntimeError:
                break
        pair.receiver._scheduled = original  # type: ignore[method-assign]
        assert await pair.receiving_phase() == MigrationPhase.SCHEDULING
        handoff = raw(await pair.vmi(pair.c2))
        assert handoff[Field.MIGRATION_UID]
        pair.link1.set_up(False)
        await pair.target_handler()  # the handler takes the VMI: phase Scheduled
        assert (await pair.vmi(pair.c2))["status"]["phase"] == VMIPhase.SCHEDULED
        await pair.receiver.reconcile((NS, RECEIVER_VMIM))
        assert await pair.receiving_phase() == MigrationPhase.SCHEDULED
        assert raw(await pair.vmi(pair.c2))[Field.MIGRATION_UID] == handoff[Field.MIGRATION_UID]
        pair.link1.set_up(True)
        await pair.pump()
        assert await pair.receiving_phase() == MigrationPhase.SUCCEEDED
        assert await pair.sending_phase() == MigrationPhase.SUCCEEDED

    with_pair(tmp_path, test)
