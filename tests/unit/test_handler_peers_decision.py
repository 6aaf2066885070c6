"""Who decides a cross-cluster hand-off, on the handlers (issue 18): the sending cluster's
record. The receiving target never claims (no ARBITER_WAIT abort, no switchover write),
keeps the guest paused while the decision is unknown (logged once, also for a guest
adopted after a restart), resumes on the Commit frame or the mirrored ``switchover:
Committed`` (the receiving VMI then Running here) and discards on a mirrored abort or
failure. Node names repeat across clusters: a hand-off's other end is never acted on by
a local node of the same name. The source never offers post-copy across clusters."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from handler import stream
from handler.drivers.base import GuestSpec
from handler.migration.incoming import IncomingRegistry
from handler.migration.memvm_target import MigrationService
from handler.migration.restart_record import RestartRecord, RestartRecords
from handler.migration.source import SourceEngine
from handler.migration.target_state import TargetState
from handler.migration.tunnel import PAGE_SIZE, TUNNEL_PROTOCOL_VERSION, ProtocolError
from handler.peers import PeerRegistry, holds_source, holds_target
from handler.vm_incoming import ARBITER_WAIT, incoming_id
from tests.support.fake_api import StoreApi
from tests.support.fake_handle import FakeHandle
from tests.unit.test_target_services import Tunnel
from tests.unit.test_vm_incoming import MIG, Target, manager, store_token, with_api
from vmferry.decentralized import VMI_PHASE_WAITING_FOR_SYNC, Role
from vmferry.migration_state import (
    ConfigKey,
    Field,
    Switchover,
    VMIPhase,
)
from vmferry.rpc import migration_pb2 as pb_memvm
from vmferry.rpc import tunnel_pb2 as pb_tunnel

Obj = dict[str, Any]
S = TargetState
pytestmark = pytest.mark.timeout(30)

# The receiving half on cluster2: its sourceNode is cluster1's node1.
RECEIVING: Obj = {
    Field.MIGRATION_UID: MIG,
    Field.SOURCE_NODE: "node1",
    Field.TARGET_NODE: "node2",
    Field.MIGRATION_ID: "m1",
    Field.PEER_CLUSTER: "cluster1",
    Field.ROLE: Role.RECEIVER,
}
# The sending half on cluster1: its targetNode is cluster2's node2.
SENDING: Obj = {**RECEIVING, Field.PEER_CLUSTER: "cluster2", Field.ROLE: Role.SENDER}


async def receiving_vmi(api: StoreApi, ms: Obj, *, node: str = "", phase: str = "") -> Obj:
    """The VMI with the half ``ms`` of a hand-off (the calls so far forgotten)."""
    try:
        return await api.create(
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {"namespace": "default", "name": "vm"},
                "spec": {},
                "status": {
                    "phase": phase or VMI_PHASE_WAITING_FOR_SYNC,
                    "nodeName": node,
                    "migrationState": {**RECEIVING, **ms},
                },
            }
        )
    finally:
        api.calls.clear()


def cross(target: Target, vmi: Obj, state: TargetState) -> Any:
    inc = target.register(state, vmi["metadata"]["uid"])
    inc.peer_cluster = "cluster1"
    return inc


async def stored(api: StoreApi) -> Obj:
    return await api.get("VirtualMachineInstance", "default", "vm")


@with_api
async def test_a_verified_cross_cluster_target_never_claims_and_stays_paused(
    api: StoreApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await receiving_vmi(api, {Field.TARGET_NODE_ADDRESS: "10.0.0.2"})
    inc = cross(target, vmi, S.VERIFIED)
    inc.verified_at = time.monotonic() - 10 * ARBITER_WAIT  # long past the in-cluster wait
    with caplog.at_level(logging.INFO, logger="handler.vm_incoming"):
        for _ in range(3):
            await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    handle = inc.handle
    assert handle.resumes == 0 and handle.destroyed == 0 and inc.decision is None
    assert Field.SWITCHOVER not in (await stored(api))["status"]["migrationState"]
    assert api.writes("VirtualMachineInstance") == []
    waiting = [r for r in caplog.records if "waiting for the decision" in r.getMessage()]
    assert len(waiting) == 1 and "cluster1" in waiting[0].getMessage()


@with_api
async def test_the_in_cluster_target_still_claims_after_the_wait(
    api: StoreApi, tmp_path: Path
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await receiving_vmi(
        api, {Field.PEER_CLUSTER: None, Field.ROLE: None, Field.TARGET_NODE_ADDRESS: "x"}
    )
    inc = target.register(S.VERIFIED, vmi["metadata"]["uid"])
    inc.verified_at = time.monotonic() - 10 * ARBITER_WAIT
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    assert (await stored(api))["status"]["migrationState"][Field.SWITCHOVER] == "Aborted"
    assert isinstance(inc.handle, FakeHandle) and inc.handle.destroyed == 1


@pytest.mark.parametrize("path", ["mirrored", "frame"])
@with_api
async def test_the_decision_resumes_and_the_receiving_vmi_runs_here(
    api: StoreApi, tmp_path: Path, path: str
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    mirrored: Obj = {Field.SWITCHOVER: Switchover.COMMITTED} if path == "mirrored" else {}
    vmi = await receiving_vmi(api, {Field.TARGET_NODE_ADDRESS: "10.0.0.2", **mirrored})
    inc = cross(target, vmi, S.VERIFIED)
    if path == "mirrored":
        await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    else:
        await target.registry.on_commit(inc)
    await target.settle()
    assert inc.handle.resumes == 1 and inc.state is S.RESUMED
    status = (await stored(api))["status"]
    assert status["nodeName"] == "node2" and status["phase"] == VMIPhase.RUNNING
    assert [s["phase"] for s in status["phaseTransitionTimestamps"]] == [VMIPhase.RUNNING]
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
    ms = status["migrationState"]
    assert ms[Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP]
    # The target wrote no decision of its own: the sending cluster's record decides.
    assert ms.get(Field.SWITCHOVER) == mirrored.get(Field.SWITCHOVER)


@pytest.mark.parametrize(
    "mirrored",
    [
        {Field.SWITCHOVER: Switchover.ABORTED},
        {Field.FAILED: True, Field.FAILURE_REASON: "the source gave up"},
    ],
)
@with_api
async def test_a_mirrored_abort_or_failure_discards(
    api: StoreApi, tmp_path: Path, mirrored: Obj
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await receiving_vmi(api, {Field.TARGET_NODE_ADDRESS: "10.0.0.2", **mirrored})
    inc = cross(target, vmi, S.VERIFIED)
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    assert inc.handle.destroyed == 1 and inc.handle.resumes == 0 and inc.state is S.ABORTED


@with_api
async def test_an_adopted_guest_waits_for_the_decision_then_resumes(
    api: StoreApi, tmp_path: Path
) -> None:
    vmi = await receiving_vmi(api, {Field.TARGET_NODE_ADDRESS: "10.0.0.2"})
    vm = await manager(api, tmp_path, "node2", vmi)
    orphan = FakeHandle(incoming_id(vmi, vmi["status"]["migrationState"]))
    vm.target.orphans[orphan.vm_id] = orphan
    vm.incoming.records.write(MIG, RestartRecord(orphan.vm_id, b'{"ticks": 7}'))
    for _ in range(2):  # the decision is not known: kept, paused
        await vm.reconcile(("default", "vm"))
        assert orphan.destroyed == 0 and orphan.resumes == 0
        assert vm.target.orphans == {orphan.vm_id: orphan}
    assert api.writes("VirtualMachineInstance") == []
    # The sync controller mirrors the sending cluster's Committed.
    vmi["status"]["migrationState"][Field.SWITCHOVER] = Switchover.COMMITTED
    vm.vmis.cache[("default", "vm")] = vmi
    await api.update(vmi, subresource="status")
    await vm.reconcile(("default", "vm"))
    for task in list(vm._tasks):
        await task
    assert orphan.resumed_with == [b'{"ticks": 7}'] and orphan.destroyed == 0
    assert (await stored(api))["status"]["phase"] == VMIPhase.RUNNING


@with_api
async def test_an_unregistered_peer_is_refused_before_preparing(
    api: StoreApi, tmp_path: Path
) -> None:
    await store_token(api)
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    target.guests.peers = PeerRegistry()
    vmi = await receiving_vmi(api, {})
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    assert target.driver.prepared == [] and target.registry.get(MIG) is None
    ms = (await stored(api))["status"]["migrationState"]
    assert ms[Field.FAILED] is True
    assert ms[Field.FAILURE_REASON] == (
        "peer cluster cluster1 is not registered in openshift-cnv/vmferry-peer-clusters"
    )


@with_api
async def test_a_cross_cluster_target_knows_its_peer(api: StoreApi, tmp_path: Path) -> None:
    await store_token(api)
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await receiving_vmi(api, {})
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    inc = target.registry.get(MIG)
    assert inc is not None and inc.peer_cluster == "cluster1" and inc.source_node == "node1"


# -- the same node names in both clusters ------------------------------------------------


def test_which_half_this_node_holds() -> None:
    assert holds_target(RECEIVING, "node2") and not holds_source(RECEIVING, "node1")
    assert holds_source(SENDING, "node1") and not holds_target(SENDING, "node2")
    in_cluster: Obj = {Field.SOURCE_NODE: "node1", Field.TARGET_NODE: "node2"}
    assert holds_source(in_cluster, "node1") and holds_target(in_cluster, "node2")


@with_api
async def test_the_local_node_named_like_the_source_leaves_the_receiving_vmi_alone(
    api: StoreApi, tmp_path: Path
) -> None:
    # Resumed on cluster2's node2, committed, not yet completed: cluster2's node1 (named
    # like the source in cluster1) must not record the completion as if it were it.
    vmi = await receiving_vmi(
        api,
        {
            Field.SWITCHOVER: Switchover.COMMITTED,
            Field.TARGET_NODE_ADDRESS: "10.0.0.2",
            Field.TARGET_NODE_PORT: 7444,
            Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP: "2026-12-04T22:00:00Z",
        },
        node="node2",
        phase=VMIPhase.RUNNING,
    )
    vm = await manager(api, tmp_path, "node1", vmi)
    await vm.reconcile(("default", "vm"))
    assert api.writes() == [] and not vm.sources


@with_api
async def test_a_guest_resumed_on_the_node_named_like_the_source_is_not_migrated_again(
    api: StoreApi, tmp_path: Path
) -> None:
    # cluster2's target was its node1: the receiving VMI runs there, sourceNode node1
    # (cluster1's). The handler there must not take itself for the source.
    vmi = await receiving_vmi(
        api,
        {
            Field.TARGET_NODE: "node1",
            Field.SWITCHOVER: Switchover.COMMITTED,
            Field.TARGET_NODE_ADDRESS: "10.0.0.1",
            Field.TARGET_NODE_PORT: 7444,
        },
        node="node1",
        phase=VMIPhase.RUNNING,
    )
    vm = await manager(api, tmp_path, "node1", vmi)
    vm.handles[vmi["metadata"]["uid"]] = FakeHandle("running-guest")
    await vm.reconcile(("default", "vm"))
    assert not vm.sources and api.writes() == []


@with_api
async def test_the_local_node_named_like_the_target_prepares_nothing(
    api: StoreApi, tmp_path: Path
) -> None:
    # cluster1's source VMI names cluster2's node2 as the target: cluster1's node2 must
    # not prepare an incoming guest nor publish an address into it.
    await store_token(api)
    vmi = await receiving_vmi(api, SENDING, node="node1", phase=VMIPhase.RUNNING)
    vm = await manager(api, tmp_path, "node2", vmi)
    await vm.reconcile(("default", "vm"))
    assert vm.incoming.get(MIG) is None and api.writes() == []


# -- the source: no post-copy across clusters ------------------------------------------


class Engine(SourceEngine):
    driver_name = "fake"

    def _memory_bytes(self) -> int:
        return 1 << 20

    async def _migrate(self) -> None:
        return None

    async def _abort_target(self, reason: str) -> None:
        return None

    async def _cleanup(self) -> None:
        return None


@pytest.mark.parametrize(("half", "post_copy"), [(SENDING, False), ({}, True)])
def test_the_source_ignores_allow_post_copy_across_clusters(half: Obj, post_copy: bool) -> None:
    ms = {
        Field.MIGRATION_UID: MIG,
        Field.SOURCE_NODE: "node1",
        Field.TARGET_NODE: "node2",
        **half,
        Field.MIGRATION_CONFIGURATION: {ConfigKey.ALLOW_POST_COPY: True},
    }
    vmi = {"metadata": {"namespace": "default", "name": "vm"}, "status": {"migrationState": ms}}
    handle = FakeHandle()
    handle.spec = GuestSpec(memory_bytes=1 << 20)
    engine = Engine(None, "node1", vmi, handle, None)  # type: ignore[arg-type]
    assert engine.config.allow_post_copy is post_copy
    assert engine.peer_cluster == half.get(Field.PEER_CLUSTER, "")


# -- the target: no post-copy across clusters either ------------------------------------


def test_the_targets_refuse_post_copy_across_clusters(tmp_path: Path) -> None:
    tunnel = Tunnel(tmp_path)
    tunnel.inc.peer_cluster = "cluster1"
    qemu_open = pb_tunnel.Open(
        protocol_version=TUNNEL_PROTOCOL_VERSION,
        migration_uid=tunnel.inc.migration_uid,
        token="right-token",
        channel_id=0,
        channel_count=1,
        memory_bytes=tunnel.handle.qspec.memory_bytes,
        page_size=PAGE_SIZE,
        verify=pb_tunnel.VERIFY_MODE_OFF,
        postcopy=True,
    )
    with pytest.raises(ProtocolError, match="post-copy is not offered across clusters"):
        tunnel.service._check_open(tunnel.inc, qemu_open)

    async def memvm() -> None:
        registry = IncomingRegistry(RestartRecords(tmp_path / "m"), require_peer_identity=False)
        inc = Target(None, RestartRecords(tmp_path / "t")).register(S.RECEIVING, "uid-1")  # type: ignore[arg-type]
        inc.peer_cluster = "cluster1"
        with pytest.raises(stream.ProtocolError, match="comes from peer cluster cluster1"):
            await MigrationService(registry)._start_postcopy(inc, pb_memvm.PostCopyStart())
        assert inc.state is S.RECEIVING

    asyncio.run(memvm())
