"""VirtualMachine reconciler: keeps a VMI in existence according to ``spec.runStrategy``.

``Always`` (and legacy ``running: true``): a VMI named like the VM exists, built from
``spec.template`` (labels included, so migration policies can select it), owned by the
VM. A VMI that ended (Succeeded/Failed) is replaced. ``Halted``: the VMI is deleted.
``status.printableStatus``/``ready`` mirror the VMI.

``WaitAsReceiver`` (the receiving copy of a VM in a decentralized migration,
:mod:`vmferry.decentralized`): its VMI is created in phase ``WaitingForSync`` (never
scheduled: the migration places it) and the VM shows ``WaitingForReceiver``. Once the
VMI is Running (the target handler resumed the guest) the VM takes the run strategy of
its ``kubevirt.io/restore-run-strategy`` annotation (``Always`` without one) and loses
the annotation; a VMI that Failed first leaves the VM ``Failed`` (no retry, as KubeVirt).
On the sending side, a VMI that ended because its guest moved to the peer cluster
(``migrationState.role: sender``, switchover Committed) is never replaced: the guest runs
there now (the sync controller halts this VM).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from controller.events import controller_recorder
from controller.objects import set_phase, write_status
from controller.store import Store
from controller.volume_migration import VolumeMigrator, migrated_volumes
from vmferry.decentralized import (
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    Role,
)
from vmferry.errors import AlreadyExists, ApiError, Conflict, NotFound
from vmferry.events import EventRecorder, Reason
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.migration_state import (
    VMI_FINAL_PHASES,
    Field,
    MigrationPhase,
    MigrationState,
    Switchover,
    VMIPhase,
    raw,
)
from vmferry.objects import conditions, kinds

log = logging.getLogger(__name__)
Obj = dict[str, Any]

# What a receiving VM becomes once migrated when it has no restore annotation.
DEFAULT_RESTORED_RUN_STRATEGY = "Always"
# The VM condition saying why a change of its volumes was not carried out.
VOLUMES_CHANGE = "VolumesChange"
# KubeVirt's printableStatus of a VM waiting as the receiver of a migration.
WAITING_FOR_RECEIVER = "WaitingForReceiver"


class VMController:
    def __init__(
        self,
        store: Store,
        vms: Informer,
        vmis: Informer,
        vmims: Informer | None = None,
        recorder: EventRecorder | None = None,
    ) -> None:
        self.store = store
        self.events = recorder or controller_recorder(store)
        self.vms = vms
        self.vmis = vmis
        self.vmims = vmims
        self.queue = WorkQueue()
        self.volumes = VolumeMigrator(store)  # updateVolumesStrategy: Migration
        vms.add_handler(lambda key, old, new: self.queue.add(key))
        vmis.add_handler(lambda key, old, new: self.queue.add(key))
        if vmims is not None:  # a migration that ended may release a VMI to replace
            vmims.add_handler(self._on_vmim)

    def _on_vmim(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        vmim = new or old
        vmi_name = ((vmim or {}).get("spec") or {}).get("vmiName")
        if vmi_name:
            self.queue.add((key[0], vmi_name))

    def _migration_unrecorded(self, vmi: Obj) -> bool:
        """The VMI's migration ended with it, but its VMIM does not say so yet: replacing
        the VMI now would lose the failure reason (the migration controller reads it from
        the VMI). The VMIM's own update re-queues the VM."""
        ms = MigrationState.of(vmi)  # ended: the outcome the VMIM will copy
        if self.vmims is None or not ms.migration_uid or not ms.ended:
            return False
        ns = vmi["metadata"]["namespace"]
        for vmim in self.vmims.items():
            if vmim["metadata"].get("uid") == ms.migration_uid and (
                vmim["metadata"].get("namespace") == ns
            ):
                return not MigrationPhase.of(vmim).final
        return False

    @staticmethod
    def _moved_to_peer(vmi: Obj) -> bool:
        """The VMI's guest left for the peer cluster (module docstring)."""
        ms = MigrationState.of(vmi)
        return raw(vmi).get(Field.ROLE) == Role.SENDER and (
            ms.switchover == Switchover.COMMITTED or ms.completed
        )

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "vm-controller")

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            vm = await self.store.get("VirtualMachine", ns, name)
        except NotFound:
            await self._collect_orphan(ns, name)
            return
        vmi: Obj | None
        try:
            vmi = await self.store.get("VirtualMachineInstance", ns, name)
        except NotFound:
            vmi = None
        strategy = vm["spec"].get("runStrategy", "Halted")
        receiving = strategy == RUN_STRATEGY_WAIT_AS_RECEIVER
        want_running = strategy in (
            "Always",
            "RerunOnFailure",
            RUN_STRATEGY_WAIT_AS_RECEIVER,
        ) and not vm["metadata"].get("deletionTimestamp")
        phase = ((vmi or {}).get("status") or {}).get("phase", "")
        volumes_problem: str | None = None
        if receiving and vmi is not None and phase == VMIPhase.RUNNING:
            restored = await self._restore_run_strategy(vm)
            if restored is None:
                return  # conflict: re-queued
            vm = restored
            strategy = vm["spec"]["runStrategy"]
            receiving = False
        if vmi is not None and phase in VMI_FINAL_PHASES and strategy == "Always":
            if self._moved_to_peer(vmi):
                log.info(
                    "vm %s/%s: its guest moved to cluster %s: not restarting it here",
                    ns,
                    name,
                    raw(vmi).get(Field.PEER_CLUSTER, "?"),
                )
                await self._update_status(vm, vmi)
                return
            if self._migration_unrecorded(vmi):
                log.info(
                    "vm %s/%s: VMI ended (%s); replacing it once its migration "
                    "has recorded how it ended",
                    ns,
                    name,
                    phase,
                )
                await self._update_status(vm, vmi)
                return
            log.info("vm %s/%s: VMI ended (%s); replacing it", ns, name, phase)
            await self._delete(vmi)
            vmi = None
        if want_running and vmi is None:
            vmi = await self._create_vmi(vm, waiting=receiving)
        elif vmi is not None and want_running:
            await self._propagate_labels(vm, vmi)
            # the VMI's own update re-queues this VM (its status follows then)
            volumes_problem = await self.volumes.reconcile(vm, vmi)
        elif not want_running and vmi is not None and not vmi["metadata"].get("deletionTimestamp"):
            log.info("vm %s/%s: runStrategy %s: stopping its VMI", ns, name, strategy)
            await self._delete(vmi)
        await self._update_status(vm, vmi, volumes_problem)

    async def _propagate_labels(self, vm: Obj, vmi: Obj) -> None:
        """Template labels edited on a running VM reach its VMI (migration policies select
        VMIs by label, and ``vmferry edit vm`` is how the reference sets them)."""
        wanted = ((vm["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        labels = dict(vmi["metadata"].get("labels") or {})
        if all(labels.get(k) == v for k, v in wanted.items()):
            return
        labels.update(wanted)
        vmi["metadata"]["labels"] = labels
        try:
            await self.store.update(vmi)
            log.info(
                "vm %s/%s: template labels copied to the running VMI",
                vm["metadata"]["namespace"],
                vm["metadata"]["name"],
            )
        except (Conflict, NotFound):
            self.queue.add((vm["metadata"]["namespace"], vm["metadata"]["name"]))

    async def _restore_run_strategy(self, vm: Obj) -> Obj | None:
        """The receiving VM's guest runs: it becomes an ordinary VM (module docstring).
        None when the write conflicted (the VM is re-queued)."""
        meta = vm["metadata"]
        annotations = dict(meta.get("annotations") or {})
        strategy = annotations.pop(RESTORE_RUN_STRATEGY_ANNOTATION, DEFAULT_RESTORED_RUN_STRATEGY)
        updated = copy.deepcopy(vm)
        updated["metadata"]["annotations"] = annotations
        updated["spec"]["runStrategy"] = strategy
        try:
            written = await self.store.update(updated)
        except (Conflict, NotFound):
            self.queue.add((meta["namespace"], meta["name"]))
            return None
        log.info(
            "vm %s/%s: received (its VMI runs): runStrategy %s restored",
            meta["namespace"],
            meta["name"],
            strategy,
        )
        return written

    async def _collect_orphan(self, ns: str, name: str) -> None:
        """Garbage collection: the VMI of a deleted VM goes with it (background deletion)."""
        try:
            vmi = await self.store.get("VirtualMachineInstance", ns, name)
        except NotFound:
            return
        owners = vmi["metadata"].get("ownerReferences") or []
        if any(o.get("kind") == "VirtualMachine" and o.get("controller") for o in owners):
            if not vmi["metadata"].get("deletionTimestamp"):
                log.info("vm %s/%s deleted: deleting its VMI", ns, name)
                await self._delete(vmi)

    async def _create_vmi(self, vm: Obj, *, waiting: bool = False) -> Obj | None:
        """Create the VM's VMI from its template; ``waiting``: a receiving VMI, created
        in phase WaitingForSync so that nothing schedules it."""
        meta = vm["metadata"]
        template = vm["spec"].get("template") or {}
        tmeta = template.get("metadata") or {}
        vmi = {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachineInstance",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": {**(tmeta.get("labels") or {}), "vm.kubevirt.io/name": meta["name"]},
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": kinds.KUBEVIRT,
                        "kind": "VirtualMachine",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
        }
        if waiting:
            status: Obj = {}
            set_phase(status, VMIPhase.WAITING_FOR_SYNC)
            vmi["status"] = status
        try:
            created = await self.store.create(vmi)
            self.events.normal(
                vm,
                Reason.SUCCESSFUL_CREATE,  # KubeVirt's words
                f"Started the virtual machine by creating the new virtual machine instance {meta['name']}",
            )
            log.info(
                "vm %s/%s: created its VMI%s",
                meta["namespace"],
                meta["name"],
                " (waiting to receive a migration)" if waiting else "",
            )
            return created
        except AlreadyExists:
            return None
        except ApiError as e:
            self.events.warning(
                vm,
                Reason.FAILED_CREATE,
                f"Failed to create virtual machine instance {meta['name']}: {e.message}",
            )
            raise

    async def _delete(self, vmi: Obj) -> None:
        ns, name = vmi["metadata"]["namespace"], vmi["metadata"]["name"]
        try:
            await self.store.delete("VirtualMachineInstance", ns, name, uid=vmi["metadata"]["uid"])
        except NotFound:
            return
        vm = self.vms.get(ns, name)
        if vm is not None:
            self.events.normal(
                vm,
                Reason.SUCCESSFUL_DELETE,  # KubeVirt's words
                f"Stopped the virtual machine by deleting the virtual machine instance {vmi['metadata']['uid']}",
            )

    async def _update_status(
        self, vm: Obj, vmi: Obj | None, volumes_problem: str | None = None
    ) -> None:
        status = copy.deepcopy(vm.get("status") or {})
        moving = [m.to_status() for m in migrated_volumes(vmi or {})]
        if moving:  # a storage migration (controller.volume_migration)
            status["volumeUpdateState"] = {"volumeMigrationState": {"migratedVolumes": moving}}
        else:
            status.pop("volumeUpdateState", None)
        if volumes_problem is not None or conditions.get(vm, VOLUMES_CHANGE) is not None:
            conditions.set_condition(
                status,
                VOLUMES_CHANGE,
                volumes_problem is None,
                "VolumeMigrationFailed" if volumes_problem else "VolumesUpToDate",
                volumes_problem or "",
            )
        vmi_status = (vmi or {}).get("status") or {}
        phase = vmi_status.get("phase", "")
        migrating = MigrationState.of(vmi or {}).active
        receiving = vm["spec"].get("runStrategy") == RUN_STRATEGY_WAIT_AS_RECEIVER
        if receiving and phase == VMIPhase.FAILED:
            printable = "Failed"  # the migration failed: the copy stays, no retry
        elif receiving and vmi is not None and not vmi["metadata"].get("deletionTimestamp"):
            printable = WAITING_FOR_RECEIVER
        elif vmi is None:
            printable = "Stopped"
        elif vmi["metadata"].get("deletionTimestamp"):
            printable = "Stopping"
        elif phase == VMIPhase.RUNNING:
            printable = "Migrating" if migrating else "Running"
        elif phase in VMI_FINAL_PHASES:
            printable = "Stopped"
        else:
            printable = "Starting"
        status["printableStatus"] = printable
        status["created"] = vmi is not None
        status["ready"] = vmi is not None and conditions.is_true(vmi, "Ready")
        if status != (vm.get("status") or {}):
            vm["status"] = status
            await write_status(self.store, vm)
