"""Admission: checks that need other objects, run by the API before the store writes.

Mirrors KubeVirt's admission webhooks for what vmferry serves today: a migration may
only be created for a VirtualMachineInstance that exists, runs, is live-migratable and
is not already migrating; neither a migration's nor a VMI's spec changes after creation. A
NetworkAttachmentDefinition's ``spec.config`` must be one vmferry can use
(:func:`vmferry.migration_network.parse_nad_config`, with the registered Nodes' main
addresses, which its range must not overlap), on create and on update.

A decentralized (cross-cluster) migration (``spec.sendTo`` or ``spec.receive``,
:mod:`vmferry.decentralized`) needs the HyperConverged feature gate
``decentralizedLiveMigration``; its ``migrationID`` is not reused by another unfinished
migration of the same side; the receiving side's VMI waits (phase ``WaitingForSync``) or
is about to (its VirtualMachine has ``runStrategy: WaitAsReceiver``).
"""

from __future__ import annotations

from typing import Any

from controller import csr_signer
from controller.network_controller import main_addresses
from controller.store import Store
from controller.volume_migration import exempt_claims, migrated_volumes
from vmferry.decentralized import (
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    gate_enabled,
    gate_off_message,
)
from vmferry.errors import Forbidden, Invalid, NotFound
from vmferry.migration_network import NAD_KIND, NadError, parse_nad_config
from vmferry.migration_state import MigrationMode, MigrationPhase, MigrationState, VMIPhase
from vmferry.objects import conditions, kinds, schema
from vmferry.objects.limits import shorten
from vmferry.volumes import PVC_KIND, claim_volumes, migration_blocker

Obj = dict[str, Any]


def is_final(vmim: Obj) -> bool:
    return MigrationPhase.of(vmim).final


SEND_TO = "sendTo"  # spec of the sending side of a decentralized migration
RECEIVE = "receive"  # spec of the receiving side


def decentralized_side(vmim: Obj) -> str:
    """``sendTo`` or ``receive`` for a decentralized migration's VMIM; "" otherwise."""
    spec = vmim.get("spec") or {}
    for side in (SEND_TO, RECEIVE):
        if spec.get(side) is not None:
            return side
    return ""


def is_decentralized(vmim: Obj) -> bool:
    """The sync controller owns this VMIM (the migration controller leaves it alone)."""
    return bool(decentralized_side(vmim))


def first_difference(before: object, after: object, path: str) -> str | None:
    """The path of the first field that differs between ``before`` and ``after``."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in [*before, *(k for k in after if k not in before)]:
            found = first_difference(before.get(key), after.get(key), f"{path}.{shorten(key, 64)}")
            if found:
                return found
        return None
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (a, b) in enumerate(zip(before, after, strict=True)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if before == after else path


def _refuse_vmi_spec_change(current: Obj, new: Obj) -> None:
    """As KubeVirt's VMI update admitter: a VMI's spec is what its guest was started
    with (a migration target builds the same guest from it), so it never changes; labels
    and annotations (metadata) and status may. vmferry has no hot-plug fields."""
    # Defaulted as ``new`` was: a VMI the VM controller created holds only its template's spec.
    before = schema.apply_defaults(current).get("spec")
    field = first_difference(before, new.get("spec"), "spec")
    if field is None:
        return
    meta = current["metadata"]
    owner = next(
        (
            ref.get("name")
            for ref in meta.get("ownerReferences") or []
            if ref.get("kind") == "VirtualMachine"
        ),
        None,
    )
    if owner:
        ns = meta["namespace"]
        instead = (
            f"edit the VirtualMachine (vmferry edit vm {owner} -n {ns}) and restart it "
            f"(vmferry delete vmi {meta['name']} -n {ns}: the VM starts a new one from its "
            "template), or migrate"
        )
    else:
        instead = "delete the VMI and create it again with the new spec"
    raise Invalid(
        f'VirtualMachineInstance "{meta["name"]}": {field}: a VirtualMachineInstance\'s spec '
        f"cannot change once created; {instead}"
    )


class Admission:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def admit_create(self, obj: Obj) -> None:
        if obj["kind"] == "VirtualMachineInstanceMigration":
            await self._admit_migration(obj)
        elif obj["kind"] == NAD_KIND:
            await self._admit_nad(obj)

    async def admit_update(self, current: Obj, new: Obj, subresource: str) -> None:
        if new["kind"] == NAD_KIND and subresource != "status":
            await self._admit_nad(new)
        if (
            new["kind"] == "VirtualMachineInstanceMigration"
            and subresource != "status"
            and new.get("spec") != current.get("spec")
        ):
            raise Invalid(
                f'VirtualMachineInstanceMigration "{current["metadata"]["name"]}": spec: '
                "field is immutable: create a new migration instead"
            )
        if new["kind"] == "VirtualMachineInstance" and subresource != "status":
            _refuse_vmi_spec_change(current, new)
        if new["kind"] == csr_signer.KIND:
            csr_signer.admit_update(current, new, subresource)
        if new["kind"] == PVC_KIND and subresource != "status" and new["spec"] != current["spec"]:
            raise Invalid(
                f'PersistentVolumeClaim "{current["metadata"]["name"]}": spec: field is '
                "immutable after creation (its image and the RWX rule depend on it)"
            )

    async def admit_delete(self, current: Obj) -> None:
        if current["kind"] == "VirtualMachineInstanceMigration" and not is_final(current):
            await self._refuse_cancel_in_postcopy(current)
        if current["kind"] == PVC_KIND:
            await self._refuse_claim_in_use(current)

    async def _refuse_claim_in_use(self, claim: Obj) -> None:
        """A claim a VMI uses is not deleted under the guest (Kubernetes defers it with
        the pvc-protection finalizer; here the delete is refused, naming the VMI)."""
        ns, name = claim["metadata"]["namespace"], claim["metadata"]["name"]
        vmis, _ = await self.store.list("VirtualMachineInstance", ns)
        for vmi in vmis:
            moving = {m.source_claim for m in migrated_volumes(vmi)}  # storage migration
            if name in moving or any(
                ref.claim == name for ref in claim_volumes(vmi.get("spec") or {})
            ):
                raise Invalid(
                    f'PersistentVolumeClaim "{name}" is in use by VirtualMachineInstance '
                    f'"{vmi["metadata"]["name"]}": stop the VM first'
                )

    async def _admit_nad(self, nad: Obj) -> None:
        nodes, _ = await self.store.list("Node")
        try:
            parse_nad_config((nad.get("spec") or {}).get("config"), main_addresses(nodes))
        except NadError as e:
            raise Invalid(f'{NAD_KIND} "{nad["metadata"].get("name", "")}": {e}') from None

    async def _refuse_cancel_in_postcopy(self, vmim: Obj) -> None:
        """Cancelling a post-copy migration would lose the VM: the guest already runs on
        the target while part of its memory is still on the source."""
        ns = vmim["metadata"]["namespace"]
        try:
            vmi = await self.store.get("VirtualMachineInstance", ns, vmim["spec"]["vmiName"])
        except NotFound:
            return
        ms = MigrationState.of(vmi)
        if (
            ms.migration_uid == vmim["metadata"]["uid"]
            and ms.mode == MigrationMode.POST_COPY
            and not ms.ended
        ):
            raise Forbidden(
                f'VirtualMachineInstanceMigration "{vmim["metadata"]["name"]}" cannot be '
                "cancelled: it is in post-copy, the VM already runs on the target node "
                f"{ms.target_node} while part of its memory is still on "
                f"{ms.source_node}; aborting now would lose the VM. Wait for it to complete."
            )

    async def _admit_decentralized(self, vmim: Obj, side: str, prefix: str) -> None:
        try:
            hco = await self.store.get(
                "HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME
            )
        except NotFound:
            hco = {}
        if not gate_enabled(hco):
            raise Invalid(f"{prefix}: spec.{side}: {gate_off_message()}")
        migration_id = vmim["spec"][side]["migrationID"]
        others, _ = await self.store.list("VirtualMachineInstanceMigration")
        for other in others:
            if (
                decentralized_side(other) == side
                and other["spec"][side].get("migrationID") == migration_id
                and not is_final(other)
            ):
                meta = other["metadata"]
                raise Invalid(
                    f"{prefix}: spec.{side}.migrationID: {migration_id!r} is already used by "
                    f'the unfinished migration "{meta["namespace"]}/{meta["name"]}": '
                    "give each migration its own migrationID"
                )

    async def _admit_receiver_without_vmi(self, ns: str, vmi_name: str, prefix: str) -> None:
        """A receiving migration may come before its VMI: the VM controller creates the VMI
        of a VM that waits as a receiver."""
        try:
            vm = await self.store.get("VirtualMachine", ns, vmi_name)
        except NotFound:
            vm = None
        if vm is None or (vm.get("spec") or {}).get("runStrategy") != RUN_STRATEGY_WAIT_AS_RECEIVER:
            raise Invalid(
                f'{prefix}: spec.vmiName: VirtualMachineInstance "{vmi_name}" does not exist '
                f'in namespace "{ns}" and no VirtualMachine of that name has runStrategy '
                f"{RUN_STRATEGY_WAIT_AS_RECEIVER}: create the receiving VM first"
            )
        template = ((vm.get("spec") or {}).get("template") or {}).get("spec") or {}
        _refuse_disks_across_clusters(template, prefix)

    async def _admit_migration(self, vmim: Obj) -> None:
        ns = vmim["metadata"]["namespace"]
        vmi_name = vmim["spec"]["vmiName"]
        prefix = f'VirtualMachineInstanceMigration for "{ns}/{vmi_name}"'
        side = decentralized_side(vmim)
        if side:
            await self._admit_decentralized(vmim, side, prefix)
        try:
            vmi = await self.store.get("VirtualMachineInstance", ns, vmi_name)
        except NotFound:
            if side == RECEIVE:
                await self._admit_receiver_without_vmi(ns, vmi_name, prefix)
                await self._refuse_in_flight(ns, vmi_name, prefix)
                return
            raise Invalid(
                f'{prefix}: spec.vmiName: VirtualMachineInstance "{vmi_name}" does not exist '
                f'in namespace "{ns}"'
            ) from None
        status = vmi.get("status") or {}
        if side:
            _refuse_disks_across_clusters(vmi.get("spec") or {}, prefix)
        if side == RECEIVE:
            if status.get("phase") != VMIPhase.WAITING_FOR_SYNC:
                raise Invalid(
                    f"{prefix}: spec.receive: the VMI must be waiting to receive a migration "
                    f"(phase {VMIPhase.WAITING_FOR_SYNC}, its VirtualMachine's runStrategy "
                    f"{RUN_STRATEGY_WAIT_AS_RECEIVER}); it is "
                    f"{status.get('phase') or VMIPhase.PENDING}"
                )
            await self._refuse_in_flight(ns, vmi_name, prefix)
            return
        if status.get("phase") != VMIPhase.RUNNING:
            raise Invalid(
                f"{prefix}: cannot migrate: the VMI is not running "
                f"(phase {status.get('phase') or VMIPhase.PENDING})"
            )
        # The RWX rule, from the claims themselves (the condition may not be written yet);
        # the destination claims of a storage migration are exempt (volume_migration).
        claim_objs, _ = await self.store.list(PVC_KIND, ns)
        exempt = exempt_claims(vmi)
        blocker = migration_blocker(
            vmi.get("spec") or {},
            {c["metadata"]["name"]: c for c in claim_objs},
            exempt=exempt,
        )
        if blocker is not None:
            raise Invalid(f"{prefix}: {blocker}")
        migratable = conditions.get(vmi, "LiveMigratable")
        if migratable is not None and migratable.get("status") == "False" and not exempt:
            raise Invalid(
                f"{prefix}: cannot migrate: the VMI is not live-migratable: "
                f"{migratable.get('message') or migratable.get('reason')}"
            )
        await self._refuse_in_flight(ns, vmi_name, prefix)

    async def _refuse_in_flight(self, ns: str, vmi_name: str, prefix: str) -> None:
        # The VMI's own migrations, by the store's index (not a list of every VMIM).
        for name in self.store.index.queue.migrations_of(ns, vmi_name):
            try:
                other = await self.store.get("VirtualMachineInstanceMigration", ns, name)
            except NotFound:
                continue
            if not is_final(other):
                raise Invalid(
                    f"{prefix}: in-flight migration detected: "
                    f'"{other["metadata"]["name"]}" has not finished yet'
                )


def _refuse_disks_across_clusters(vmi_spec: Obj, prefix: str) -> None:
    """A cross-cluster (decentralized) migration of a VM with claim volumes is refused:
    the other cluster's claim of the same name is another image (its own storage, or
    another file of a shared directory), so the guest would resume on a disk that is not
    its own. Moving the disk needs storage live migration, which vmferry does not do yet."""
    refs = claim_volumes(vmi_spec)
    if refs:
        names = ", ".join(f"{r.name} (PVC {r.claim})" for r in refs)
        raise Invalid(
            f"{prefix}: cannot migrate to another cluster: the VM has persistent volumes "
            f"({names}); a cross-cluster move needs storage live migration, which is not "
            "supported yet: stop the VM and copy its disks, or remove them"
        )
