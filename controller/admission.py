"""Admission: checks that need other objects, run by the API before the store writes.

Mirrors KubeVirt's admission webhooks for what vmferry serves today: a migration may
only be created for a VirtualMachineInstance that exists, runs, is live-migratable and
is not already migrating; neither a migration's nor a VMI's spec changes after creation. A
NetworkAttachmentDefinition's ``spec.config`` must be one vmferry can use
(:func:`vmferry.migration_network.parse_nad_config`, with the registered Nodes' main
addresses, which its range must not overlap), on create and on update.
"""

from __future__ import annotations

from typing import Any

from controller.network_controller import main_addresses
from controller.store import Store
from vmferry.errors import Forbidden, Invalid, NotFound
from vmferry.migration_network import NAD_KIND, NadError, parse_nad_config
from vmferry.migration_state import MigrationMode, MigrationPhase, MigrationState, VMIPhase
from vmferry.objects import conditions, schema
from vmferry.objects.limits import shorten

Obj = dict[str, Any]


def is_final(vmim: Obj) -> bool:
    return MigrationPhase.of(vmim).final


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

    async def admit_delete(self, current: Obj) -> None:
        if current["kind"] == "VirtualMachineInstanceMigration" and not is_final(current):
            await self._refuse_cancel_in_postcopy(current)

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

    async def _admit_migration(self, vmim: Obj) -> None:
        ns = vmim["metadata"]["namespace"]
        vmi_name = vmim["spec"]["vmiName"]
        prefix = f'VirtualMachineInstanceMigration for "{ns}/{vmi_name}"'
        try:
            vmi = await self.store.get("VirtualMachineInstance", ns, vmi_name)
        except NotFound:
            raise Invalid(
                f'{prefix}: spec.vmiName: VirtualMachineInstance "{vmi_name}" does not exist '
                f'in namespace "{ns}"'
            ) from None
        status = vmi.get("status") or {}
        if status.get("phase") != VMIPhase.RUNNING:
            raise Invalid(
                f"{prefix}: cannot migrate: the VMI is not running "
                f"(phase {status.get('phase') or VMIPhase.PENDING})"
            )
        migratable = conditions.get(vmi, "LiveMigratable")
        if migratable is not None and migratable.get("status") == "False":
            raise Invalid(
                f"{prefix}: cannot migrate: the VMI is not live-migratable: "
                f"{migratable.get('message') or migratable.get('reason')}"
            )
        others, _ = await self.store.list("VirtualMachineInstanceMigration", ns)
        for other in others:
            if other["spec"].get("vmiName") == vmi_name and not is_final(other):
                raise Invalid(
                    f"{prefix}: in-flight migration detected: "
                    f'"{other["metadata"]["name"]}" has not finished yet'
                )
