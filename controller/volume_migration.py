"""Storage live migration, the controller's part (KubeVirt's volume migration).

A VirtualMachine with ``spec.updateVolumesStrategy: Migration`` whose template's
volumes are edited to other claims (same volume names, ``persistentVolumeClaim`` only)
while its VMI runs has its disks migrated to those claims without a restart, as KubeVirt
does it:

1. :meth:`VolumeMigrator.reconcile` (called by the VM controller): the VMI's
   ``spec.volumes`` take the new claims and ``status.migratedVolumes`` lists each change
   (``volumeName``, ``sourcePVCInfo.claimName``, ``destinationPVCInfo.claimName``); the
   VM's ``status.volumeUpdateState.volumeMigrationState`` shows the same list; then a
   ``VirtualMachineInstanceMigration`` (``<vm>-volume-migration-…``, label
   :data:`VOLUME_MIGRATION_LABEL`) is created.
2. The migration is placed on the node of a local destination claim (the migration
   controller, ``vmferry.volumes.required_node``); that node's handler creates the new
   image and serves it to the source's mirror (``handler.migration.storage``). The RWX
   rule does not apply to the destination claims (:func:`exempt_claims`).
3. Success: the VMI keeps the new claims, ``migratedVolumes`` is cleared
   (:func:`settle`). Failure: the VMI's volumes go back to the source claims (the guest
   still runs on them) and are not retried for the same change; edit the VM again (or
   revert its volumes) to retry. The source claims stay: delete them when done.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.objects import write_status
from controller.store import Store
from vmferry.errors import Conflict, NotFound
from vmferry.migration_state import MigrationPhase, MigrationState, VMIPhase
from vmferry.volumes import claim_volumes

log = logging.getLogger(__name__)
Obj = dict[str, Any]

STRATEGY_MIGRATION = "Migration"
MIGRATED_VOLUMES = "migratedVolumes"
VOLUME_MIGRATION_LABEL = "vmferry.io/volume-migration"  # the VM's name
CHANGE_ANNOTATION = "vmferry.io/migrated-volumes"  # the change a VMIM carries out (JSON)


@dataclass(frozen=True)
class MigratedVolume:
    volume: str
    source_claim: str
    destination_claim: str

    def to_status(self) -> Obj:
        return {
            "volumeName": self.volume,
            "sourcePVCInfo": {"claimName": self.source_claim},
            "destinationPVCInfo": {"claimName": self.destination_claim},
        }

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> MigratedVolume:
        return cls(
            str(obj.get("volumeName") or ""),
            str((obj.get("sourcePVCInfo") or {}).get("claimName") or ""),
            str((obj.get("destinationPVCInfo") or {}).get("claimName") or ""),
        )


class VolumeChangeError(ValueError):
    """The template's volumes changed in a way a storage migration cannot carry out."""


def changed_volumes(
    template_spec: Mapping[str, Any], vmi_spec: Mapping[str, Any]
) -> list[MigratedVolume]:
    """The claim volumes of the running VMI whose template entry names another claim.
    VolumeChangeError when volumes were added, removed or are not claims."""
    running = {r.name: r.claim for r in claim_volumes(vmi_spec)}
    wanted = {r.name: r.claim for r in claim_volumes(template_spec)}
    names = lambda spec: sorted(str(v.get("name")) for v in spec.get("volumes") or [])  # noqa: E731
    if names(template_spec) != names(vmi_spec) or set(running) != set(wanted):
        raise VolumeChangeError(
            "updateVolumesStrategy Migration moves a volume to another claim: the volume "
            f"names must stay the same (running {names(vmi_spec)}, template "
            f"{names(template_spec)}) and every moved volume must be a persistentVolumeClaim"
        )
    return [
        MigratedVolume(name, running[name], wanted[name])
        for name in sorted(running)
        if running[name] != wanted[name]
    ]


def migrated_volumes(vmi: Mapping[str, Any]) -> list[MigratedVolume]:
    return [MigratedVolume.of(m) for m in (vmi.get("status") or {}).get(MIGRATED_VOLUMES) or []]


def exempt_claims(vmi: Mapping[str, Any]) -> set[str]:
    """Claims the RWX rule does not apply to: the destinations of a storage migration."""
    return {m.destination_claim for m in migrated_volumes(vmi)}


def _with_claims(vmi_spec: Obj, claims: Mapping[str, str]) -> Obj:
    spec = copy.deepcopy(vmi_spec)
    for v in spec.get("volumes") or []:
        if v.get("name") in claims and isinstance(v.get("persistentVolumeClaim"), dict):
            v["persistentVolumeClaim"]["claimName"] = claims[v["name"]]
    return spec


def _change_key(changes: list[MigratedVolume]) -> str:
    return json.dumps([c.to_status() for c in changes], sort_keys=True)


class VolumeMigrator:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def reconcile(self, vm: Obj, vmi: Obj | None) -> str | None:
        """Start the storage migration the VM's template asks for; returns why not when
        it cannot (for the VM's status), None otherwise."""
        if vm["spec"].get("updateVolumesStrategy") != STRATEGY_MIGRATION or vmi is None:
            return None
        status = vmi.get("status") or {}
        if status.get("phase") != VMIPhase.RUNNING or vmi["metadata"].get("deletionTimestamp"):
            return None
        if MigrationState.of(vmi).active:
            return None  # the running migration settles first
        template = (vm["spec"].get("template") or {}).get("spec") or {}
        pending = migrated_volumes(vmi)  # written, but its migration not created yet
        try:
            changes = pending or changed_volumes(template, vmi.get("spec") or {})
        except VolumeChangeError as e:
            return str(e)
        if not changes:
            return None
        ns, name = vm["metadata"]["namespace"], vm["metadata"]["name"]
        key = _change_key(changes)
        vmims, _ = await self.store.list("VirtualMachineInstanceMigration", ns)
        for vmim in vmims:
            if (vmim["metadata"].get("labels") or {}).get(VOLUME_MIGRATION_LABEL) != name:
                continue
            phase = MigrationPhase.of(vmim)
            if not phase.final:
                return None  # one at a time
            same = (vmim["metadata"].get("annotations") or {}).get(CHANGE_ANNOTATION) == key
            if same and phase == MigrationPhase.FAILED:
                reason = (vmim["status"].get("migrationState") or {}).get("failureReason") or ""
                return f"the volume migration {vmim['metadata']['name']} failed: {reason}"
        if not pending:
            vmi["spec"] = _with_claims(
                vmi["spec"], {c.volume: c.destination_claim for c in changes}
            )
            try:
                vmi = await self.store.update(vmi)
                vmi.setdefault("status", {})[MIGRATED_VOLUMES] = [c.to_status() for c in changes]
                await write_status(self.store, vmi)
            except (Conflict, NotFound):
                return None  # the next pass sees the new VMI
        created = await self.store.create(
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {
                    "generateName": f"{name}-volume-migration-",
                    "namespace": ns,
                    "labels": {VOLUME_MIGRATION_LABEL: name},
                    "annotations": {CHANGE_ANNOTATION: key},
                },
                "spec": {"vmiName": name},
            }
        )
        log.info(
            "vm %s/%s: volume migration %s: %s",
            ns,
            name,
            created["metadata"]["name"],
            ", ".join(f"{c.volume}: {c.source_claim} -> {c.destination_claim}" for c in changes),
        )
        return None


async def settle(store: Store, vmi: Obj, succeeded: bool) -> Obj:
    """The end of a VMI's migration: a storage migration's ``migratedVolumes`` cleared;
    after a failure the VMI's volumes name the source claims again."""
    changes = migrated_volumes(vmi)
    if not changes:
        return vmi
    if not succeeded:
        vmi["spec"] = _with_claims(vmi["spec"], {c.volume: c.source_claim for c in changes})
        vmi = await store.update(vmi)
    vmi.setdefault("status", {}).pop(MIGRATED_VOLUMES, None)
    log.info(
        "vmi %s/%s: volume migration %s",
        vmi["metadata"]["namespace"],
        vmi["metadata"]["name"],
        "done" if succeeded else "failed: back on the source claims",
    )
    return await write_status(store, vmi)
