"""VirtualMachineInstance placement: a VMI without a node is bound to one.

Phase "" → Pending (recorded) → Scheduled with ``status.nodeName`` once a node fits
(``controller.scheduler.place``); the node's handler then starts the guest and moves
the VMI to Running. While no node fits, the VMI stays Pending with a
``PodScheduled=False/Unschedulable`` condition naming why, and placement is retried.
A VMI whose claim volumes are missing or not bound waits the same way with
``VolumesReady=False`` naming each volume; a local volume pins the VMI to its node.

A VMI in phase ``WaitingForSync`` (the receiving VMI of a decentralized migration) is
never placed here: the receiving sync controller chooses its target node, and the
target handler makes it Running there.
"""

from __future__ import annotations

import logging
from typing import Any

from controller import scheduler
from controller.events import controller_recorder
from controller.objects import set_phase, write_status
from controller.store import Store
from vmferry.errors import NotFound
from vmferry.events import EventRecorder, Reason
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.migration_state import VMIPhase
from vmferry.objects import conditions
from vmferry.volumes import (
    PVC_KIND,
    VOLUMES_READY,
    attach_problem,
    claim_volumes,
    required_node,
)

log = logging.getLogger(__name__)
Obj = dict[str, Any]

UNSCHEDULABLE_RETRY = 3.0  # s; placement is retried while the VMI waits in Pending


class VMIController:
    def __init__(
        self,
        store: Store,
        vmis: Informer,
        nodes: Informer,
        recorder: EventRecorder | None = None,
    ) -> None:
        self.store = store
        self.events = recorder or controller_recorder(store)
        self.vmis = vmis
        self.nodes = nodes
        self.queue = WorkQueue()
        vmis.add_handler(lambda key, old, new: self.queue.add(key))

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "vmi-controller")

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            vmi = await self.store.get("VirtualMachineInstance", ns, name)
        except NotFound:
            return
        status = vmi.setdefault("status", {})
        if vmi["metadata"].get("deletionTimestamp") or status.get("nodeName"):
            return
        if status.get("phase") == VMIPhase.WAITING_FOR_SYNC:
            return  # a receiving VMI: its migration places it (module docstring)
        if status.get("phase") not in (None, VMIPhase.UNSET, VMIPhase.PENDING):
            return
        nodes = self.store.index.nodes()  # and the memory in use: O(nodes), not O(VMIs)
        claim_objs, _ = await self.store.list(PVC_KIND, ns)
        claims = {c["metadata"]["name"]: c for c in claim_objs}
        spec = vmi.get("spec") or {}
        problems = [
            p
            for ref in claim_volumes(spec)
            if (p := attach_problem(ref, claims.get(ref.claim))) is not None
        ]
        if problems:
            await self._wait_for_volumes(key, vmi, "; ".join(problems))
            return
        local_node = required_node(spec, claims)
        if local_node is not None:  # a local volume pins the VMI to its node
            nodes = [n for n in nodes if n.name == local_node]
        placement = scheduler.place_with_usage(vmi, nodes, self.store.index.memory_used())
        if placement.node is None:
            changed = status.get("phase") != VMIPhase.PENDING
            set_phase(status, VMIPhase.PENDING)
            why = f"0/{len(nodes)} nodes are available: {placement.message()}"
            changed |= conditions.set_condition(status, "PodScheduled", False, "Unschedulable", why)
            if changed:
                log.info("vmi %s/%s: unschedulable: %s", ns, name, placement.message())
                await write_status(self.store, vmi)
                self.events.warning(vmi, Reason.FAILED_SCHEDULING, why)  # the scheduler's reason
            self.queue.add_after(key, UNSCHEDULABLE_RETRY)
            return
        if status.get("phase") != VMIPhase.PENDING:
            set_phase(status, VMIPhase.PENDING)
        status["nodeName"] = placement.node
        set_phase(status, VMIPhase.SCHEDULED)
        conditions.set_condition(status, "PodScheduled", True, "Scheduled", "")
        if claim_volumes(spec):
            conditions.set_condition(status, VOLUMES_READY, True, "ClaimsBound", "")
        log.info("vmi %s/%s: scheduled to %s", ns, name, placement.node)
        await write_status(self.store, vmi)
        # The scheduler's words ("Successfully assigned default/vm1 to node1").
        self.events.normal(
            vmi, Reason.SCHEDULED, f"Successfully assigned {ns}/{name} to {placement.node}"
        )

    async def _wait_for_volumes(self, key: Key, vmi: Obj, message: str) -> None:
        """Pending until every claim volume is bound (condition VolumesReady=False)."""
        status = vmi.setdefault("status", {})
        changed = status.get("phase") != VMIPhase.PENDING
        set_phase(status, VMIPhase.PENDING)
        changed |= conditions.set_condition(status, VOLUMES_READY, False, "ClaimNotReady", message)
        if changed:
            log.info("vmi %s/%s: waiting for volumes: %s", key[0], key[1], message)
            await write_status(self.store, vmi)
        self.queue.add_after(key, UNSCHEDULABLE_RETRY)
