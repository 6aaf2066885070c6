"""The VM controller replaces an ended VMI only once its migration has recorded the end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controller.store import Store
from controller.vm_controller import VMController
from vmferry.errors import NotFound
from vmferry.informer import Informer

pytestmark = pytest.mark.timeout(30)
Obj = dict[str, Any]


def vm() -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "v", "namespace": "default"},
        "spec": {
            "runStrategy": "Always",
            "template": {"spec": {"domain": {"memory": {"guest": "64Mi"}}}},
        },
    }


def vmim(uid_holder: dict[str, str], phase: str) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "m", "namespace": "default", "uid": uid_holder["uid"]},
        "spec": {"vmiName": "v"},
        "status": {"phase": phase},
    }


def test_a_failed_vmi_waits_for_its_migration_to_record_the_failure(tmp_path: Path) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        try:
            vmims = Informer(store, "VirtualMachineInstanceMigration")  # fed by hand below
            ctl = VMController(
                store,
                Informer(store, "VirtualMachine"),
                Informer(store, "VirtualMachineInstance"),
                vmims,
            )
            await store.create(vm())
            await ctl.reconcile(("default", "v"))
            vmi = await store.get("VirtualMachineInstance", "default", "v")
            uid = {"uid": "mig-1"}
            vmi.setdefault("status", {}).update(
                phase="Failed",
                migrationState={"migrationUid": "mig-1", "failed": True, "failureReason": "x"},
            )
            await store.update(vmi, subresource="status")
            vmims.apply_event("ADDED", vmim(uid, "Running"))
            await ctl.reconcile(("default", "v"))
            kept = await store.get("VirtualMachineInstance", "default", "v")
            assert kept["metadata"]["uid"] == vmi["metadata"]["uid"], "replaced too early"
            assert ("default", "v") in ctl.queue._queued  # the VMIM's events re-queue the VM
            vmims.apply_event("MODIFIED", vmim(uid, "Failed"))
            await ctl.reconcile(("default", "v"))
            try:
                now = await store.get("VirtualMachineInstance", "default", "v")
            except NotFound:
                now = None
            assert (
                now is None
                or now["metadata"]["uid"] != vmi["metadata"]["uid"]
                or (now["metadata"].get("deletionTimestamp"))
            ), "the ended VMI is replaced once its migration says how it ended"
        finally:
            await store.close()

    asyncio.run(main())
