"""A pair of in-process :class:`sync_controller.peer.PeerLink` fakes: two clusters' sync
controllers wired to each other, for the reconcilers' unit tests.

Level-triggered like the real link: ``publish`` keeps the latest half per migration and
delivers it to the other end when the migration is connected (the sender called
``connect``) and the wire is up; ``set_up(True)`` re-delivers every latest half (a
reconnect). The other end's ``on_peer_update`` is called only when the half it holds
changes. ``connection_error`` says why the wire is down, as the real link would.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from controller.objects import StoreSource
from handler.migration.handoff import HandoffRecord
from sync_controller.receiver import ReceiverReconciler
from sync_controller.sender import SenderReconciler
from tests.support.fake_api import FakeClock, StoreApi
from vmferry.decentralized import (
    FEATURE_GATE,
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    VMI_PHASE_WAITING_FOR_SYNC,
    Role,
    SyncState,
)
from vmferry.errors import NotFound
from vmferry.migration_state import (
    AbortStatus,
    Field,
    MigrationMode,
    MigrationPhase,
    MigrationState,
    Switchover,
    VMIPhase,
    raw,
)
from vmferry.objects import conditions, kinds

Obj = dict[str, Any]


class _Wire:
    def __init__(self) -> None:
        self.up = True
        self.connected: set[str] = set()  # migration IDs a sender connected for
        self.urls: dict[str, str] = {}


class FakePeerLink:
    def __init__(self, cluster_name: str, wire: _Wire) -> None:
        self.cluster_name = cluster_name
        self.wire = wire
        self.peer: FakePeerLink | None = None
        self.on_peer_update: Callable[[SyncState], None] = lambda state: None
        self.published: dict[str, SyncState] = {}  # our latest half per migration ID
        self.received: dict[str, SyncState] = {}  # the peer's latest half delivered to us
        self.history: list[SyncState] = []  # every half published, in order
        self.connects: list[tuple[str, str]] = []
        self.forgotten: list[str] = []

    @classmethod
    def pair(cls, sending: str, receiving: str) -> tuple[FakePeerLink, FakePeerLink]:
        """(the sending cluster's link, the receiving cluster's link)."""
        wire = _Wire()
        a, b = cls(sending, wire), cls(receiving, wire)
        a.peer, b.peer = b, a
        return a, b

    # -- PeerLink -------------------------------------------------------------------------

    def connect(self, migration_id: str, connect_url: str) -> None:
        if (migration_id, connect_url) not in self.connects:
            self.connects.append((migration_id, connect_url))
        self.wire.urls[migration_id] = connect_url
        if migration_id not in self.wire.connected:
            self.wire.connected.add(migration_id)
        self._flush(migration_id)

    def publish(self, state: SyncState) -> None:
        if self.published.get(state.migration_id) != state:
            self.history.append(state)
        self.published[state.migration_id] = state
        self._deliver(state.migration_id)

    def latest(self, migration_id: str) -> SyncState | None:
        return self.received.get(migration_id)

    def peer_cluster(self, migration_id: str) -> str | None:
        if migration_id in self.wire.connected and self.peer is not None:
            return self.peer.cluster_name
        return None

    def connection_error(self, migration_id: str) -> str | None:
        if migration_id in self.wire.urls and not self.wire.up:
            return f"peer at {self.wire.urls[migration_id]} unreachable: connection refused"
        return None

    def forget(self, migration_id: str) -> None:
        self.forgotten.append(migration_id)
        self.published.pop(migration_id, None)
        self.received.pop(migration_id, None)

    # -- the test's controls --------------------------------------------------------------

    def set_up(self, up: bool) -> None:
        """Cut or restore the wire between the two ends (both directions)."""
        self.wire.up = up
        if up:
            for end in (self, self.peer):
                if end is not None:
                    for mid in list(end.published):
                        end._deliver(mid)

    def inject(self, state: SyncState) -> None:
        """Deliver ``state`` to this end as if the peer had sent it."""
        self.received[state.migration_id] = state
        self.on_peer_update(state)

    def _flush(self, migration_id: str) -> None:
        self._deliver(migration_id)
        if self.peer is not None:
            self.peer._deliver(migration_id)

    def _deliver(self, migration_id: str) -> None:
        state = self.published.get(migration_id)
        peer = self.peer
        if (
            state is None
            or peer is None
            or not self.wire.up
            or migration_id not in self.wire.connected
        ):
            return
        if peer.received.get(migration_id) != state:
            peer.received[migration_id] = state
            peer.on_peer_update(state)


# -- two clusters, their sync reconcilers and simulated handlers --------------------------

NS = "default"
NAME = "busy"
MIGRATION_ID = "m1"
CONNECT_URL = "198.51.100.2:7445"
TARGET_ADDRESS = "10.0.0.12"
TARGET_PORT = 7500
SENDER_VMIM = "send-busy"
RECEIVER_VMIM = "receive-busy"


def _node(name: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "capacity": {"memory": "4Gi"},
            "nodeInfo": {"cpuModel": "model-a"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


async def _cluster(api: StoreApi, gate: bool) -> None:
    await api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    await api.create(
        {
            "apiVersion": "hco.kubevirt.io/v1beta1",
            "kind": "HyperConverged",
            "metadata": {"name": kinds.HYPERCONVERGED_NAME, "namespace": kinds.SYSTEM_NAMESPACE},
            "spec": {"featureGates": {FEATURE_GATE: gate}, "liveMigrationConfig": {}},
        }
    )
    for name in ("node1", "node2"):
        await api.create(_node(name))


async def _vm(api: StoreApi, run_strategy: str, annotations: dict[str, str]) -> Obj:
    return await api.create(
        {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachine",
            "metadata": {"name": NAME, "namespace": NS, "annotations": annotations},
            "spec": {
                "runStrategy": run_strategy,
                "template": {"spec": {"domain": {"memory": {"guest": "64Mi"}}}},
            },
        }
    )


async def _vmi(api: StoreApi, vm: Obj, status: Obj) -> None:
    vmi = await api.create(
        {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachineInstance",
            "metadata": {
                "name": NAME,
                "namespace": NS,
                "ownerReferences": [
                    {
                        "apiVersion": kinds.KUBEVIRT,
                        "kind": "VirtualMachine",
                        "name": NAME,
                        "uid": vm["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {"domain": {"memory": {"guest": "64Mi"}}},
        }
    )
    vmi["status"] = status
    await api.update(vmi, subresource="status")


class CrossCluster:
    """cluster1 (sending: VM ``busy`` Running on node1, a sendTo VMIM) and cluster2
    (receiving: a WaitAsReceiver copy whose VMI waits, a receive VMIM), each a real Store
    behind a StoreApi with its own FakeClock and sync reconciler, wired by a FakePeerLink
    pair; the handlers are played by :meth:`source_handler` and :meth:`target_handler`,
    writing what the real ones write (through the real HandoffRecord)."""

    def __init__(self, c1: StoreApi, c2: StoreApi) -> None:
        self.c1, self.c2 = c1, c2
        self.clock1, self.clock2 = FakeClock(time.time()), FakeClock(time.time())
        self.link1, self.link2 = FakePeerLink.pair("cluster1", "cluster2")
        self.sender = SenderReconciler(
            c1, self.link1, self.clock1, cluster_name="cluster1", source=StoreSource(c1.store)
        )
        self.receiver = ReceiverReconciler(
            c2, self.link2, self.clock2, cluster_name="cluster2", source=StoreSource(c2.store)
        )
        # what the simulated handlers do
        self.target_prepares = True
        self.source_decides = True
        self.source_completes = True
        self.source_fails = ""  # a reason: the source fails once it has started
        self.discarded = False  # the target handler dropped its incoming guest
        self.switchovers: list[str] = []  # the receiving VMI's switchover, each change

    @classmethod
    async def open(
        cls, directory: Path, *, gate1: bool = True, gate2: bool = True, create_vmims: bool = True
    ) -> CrossCluster:
        (directory / "c1").mkdir()
        (directory / "c2").mkdir()
        pair = cls(await StoreApi.open(directory / "c1"), await StoreApi.open(directory / "c2"))
        await _cluster(pair.c1, gate1)
        await _cluster(pair.c2, gate2)
        vm1 = await _vm(pair.c1, "Always", {})
        await _vmi(pair.c1, vm1, {"phase": VMIPhase.RUNNING, "nodeName": "node1"})
        vm2 = await _vm(
            pair.c2, RUN_STRATEGY_WAIT_AS_RECEIVER, {RESTORE_RUN_STRATEGY_ANNOTATION: "Always"}
        )
        await _vmi(pair.c2, vm2, {"phase": VMI_PHASE_WAITING_FOR_SYNC})
        if create_vmims:
            await pair.create_receiving_vmim()
            await pair.create_sending_vmim()
        return pair

    async def create_sending_vmim(self) -> None:
        await self.c1.create(
            {
                "apiVersion": kinds.KUBEVIRT,
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": SENDER_VMIM, "namespace": NS},
                "spec": {
                    "vmiName": NAME,
                    "sendTo": {"migrationID": MIGRATION_ID, "connectURL": CONNECT_URL},
                },
            }
        )

    async def create_receiving_vmim(self) -> None:
        await self.c2.create(
            {
                "apiVersion": kinds.KUBEVIRT,
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": RECEIVER_VMIM, "namespace": NS},
                "spec": {"vmiName": NAME, "receive": {"migrationID": MIGRATION_ID}},
            }
        )

    async def close(self) -> None:
        await self.c1.close()
        await self.c2.close()

    # -- reading ---------------------------------------------------------------------------

    @staticmethod
    async def get(api: StoreApi, kind: str, name: str = NAME) -> Obj | None:
        try:
            return await api.get(kind, NS, name)
        except NotFound:
            return None

    async def sending(self) -> Obj | None:
        return await self.get(self.c1, "VirtualMachineInstanceMigration", SENDER_VMIM)

    async def receiving(self) -> Obj | None:
        return await self.get(self.c2, "VirtualMachineInstanceMigration", RECEIVER_VMIM)

    async def sending_phase(self) -> str:
        return MigrationPhase.of(await self.sending() or {})

    async def receiving_phase(self) -> str:
        return MigrationPhase.of(await self.receiving() or {})

    async def vmi(self, api: StoreApi) -> Obj:
        vmi = await self.get(api, "VirtualMachineInstance")
        assert vmi is not None
        return vmi

    async def vm(self, api: StoreApi) -> Obj:
        vm = await self.get(api, "VirtualMachine")
        assert vm is not None
        return vm

    # -- driving ---------------------------------------------------------------------------

    async def step(self) -> None:
        """One pass of everything: both reconcilers, then both handlers."""
        await self.sender.reconcile((NS, SENDER_VMIM))
        await self.receiver.reconcile((NS, RECEIVER_VMIM))
        await self.source_handler()
        await self.target_handler()
        ms = raw(await self.get(self.c2, "VirtualMachineInstance") or {})
        switchover = str(ms.get(Field.SWITCHOVER) or "")
        if not self.switchovers or self.switchovers[-1] != switchover:
            self.switchovers.append(switchover)

    async def pump(self, rounds: int = 60) -> None:
        """Steps until nothing changes any more (two quiet rounds) or ``rounds`` ran."""
        quiet = 0
        for _ in range(rounds):
            before = await self._fingerprint()
            await self.step()
            quiet = quiet + 1 if await self._fingerprint() == before else 0
            if quiet >= 2:
                return

    async def _fingerprint(self) -> tuple[int, int, int, int]:
        return (
            await self.c1.store.current_rv(),
            await self.c2.store.current_rv(),
            len(self.link1.history),
            len(self.link2.history),
        )

    async def pump_until(self, predicate: Callable[[], Awaitable[bool]], rounds: int = 60) -> None:
        for _ in range(rounds):
            if await predicate():
                return
            await self.step()
        assert await predicate(), "the condition never held"

    # -- the handlers, simulated -------------------------------------------------------------

    async def source_handler(self) -> None:
        vmi = await self.get(self.c1, "VirtualMachineInstance")
        if vmi is None:
            return
        ms = raw(vmi)
        uid = ms.get(Field.MIGRATION_UID)
        if not uid or ms.get(Field.ROLE) != Role.SENDER or MigrationState.of(vmi).ended:
            return
        record = HandoffRecord(cast(Any, self.c1), NS, NAME, uid)
        if not ms.get(Field.START_TIMESTAMP):
            if ms.get(Field.TARGET_NODE_ADDRESS):
                await record.mark_started({Field.MODE: MigrationMode.PRE_COPY})
            return
        if not ms.get(Field.SWITCHOVER) and (ms.get(Field.ABORT_REQUESTED) or self.source_fails):
            if await record.claim(Switchover.ABORTED) == Switchover.ABORTED:
                reason = (
                    "aborted on request" if ms.get(Field.ABORT_REQUESTED) else self.source_fails
                )
                fields: Obj = {
                    Field.FAILED: True,
                    Field.FAILURE_REASON: reason,
                    Field.END_TIMESTAMP: conditions.now_rfc3339(),
                }
                if ms.get(Field.ABORT_REQUESTED):
                    fields[Field.ABORT_STATUS] = AbortStatus.SUCCEEDED
                await record.fail(fields)
            return
        if not ms.get(Field.SWITCHOVER) and self.source_decides:
            await record.commit()
            return
        if ms.get(Field.SWITCHOVER) == Switchover.COMMITTED and self.source_completes:
            await record.patch_until_written(
                {Field.COMPLETED: True, Field.END_TIMESTAMP: conditions.now_rfc3339()}
            )

    async def target_handler(self) -> None:
        vmi = await self.get(self.c2, "VirtualMachineInstance")
        if vmi is None:
            return
        ms = raw(vmi)
        uid = ms.get(Field.MIGRATION_UID)
        if not uid or ms.get(Field.ROLE) != Role.RECEIVER:
            return
        record = HandoffRecord(cast(Any, self.c2), NS, NAME, uid)
        if ms.get(Field.FAILED) or ms.get(Field.SWITCHOVER) == Switchover.ABORTED:
            self.discarded = True
            return
        if not ms.get(Field.TARGET_NODE_ADDRESS):
            if self.target_prepares:
                await record.patch(
                    {
                        Field.TARGET_NODE_DOMAIN_DETECTED: True,
                        Field.TARGET_NODE_ADDRESS: TARGET_ADDRESS,
                        Field.TARGET_NODE_PORT: TARGET_PORT,
                    },
                    {"phase": VMIPhase.SCHEDULED},
                )
            return
        if ms.get(Field.SWITCHOVER) == Switchover.COMMITTED and not ms.get(
            Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP
        ):
            await record.patch(
                {Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP: conditions.now_rfc3339()},
                {"nodeName": ms[Field.TARGET_NODE]},
            )
