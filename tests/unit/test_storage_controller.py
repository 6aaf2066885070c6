"""The volume provisioner over a real Store in a temporary directory
(controller/storage_controller.py), the placement of VMIs with claims, and the admission
rules for claims and migrations; drain's and the console's view of the RWX rule."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from controller.admission import Admission
from controller.console_pages import vm_rows
from controller.main import bootstrap
from controller.objects import StoreSource
from controller.storage_controller import StorageController
from controller.store import Store
from controller.vmi_controller import VMIController
from tests.support.volume_manifests import pvc, storage_class, vmi, vmi_spec
from vmferry.cli.adm_cmd import _blocker, _stopped_instead
from vmferry.decentralized import FEATURE_GATE, RUN_STRATEGY_WAIT_AS_RECEIVER
from vmferry.errors import Invalid
from vmferry.informer import Informer
from vmferry.migration_state import VMIPhase
from vmferry.objects import conditions, kinds
from vmferry.volumes import (
    CONDITION_PROVISIONING,
    REASON_DISKS_NOT_LIVE_MIGRATABLE,
    SELECTED_NODE_ANNOTATION,
    VOLUMES_READY,
    ClaimPhase,
    not_shared_message,
)

Obj = dict[str, Any]
NS = "default"
GiB = 1 << 30


# -- the provisioner, placement and admission over a real store --------------------------


class Storage:
    def __init__(self, store: Store, tmp: Path) -> None:
        self.store = store
        self.tmp = tmp
        source = StoreSource(store)
        self.informers = {
            k: Informer(source, k)
            for k in ("PersistentVolumeClaim", "StorageClass", "VirtualMachineInstance", "Node")
        }
        self.ctl = StorageController(
            store, self.informers["PersistentVolumeClaim"], self.informers["StorageClass"]
        )
        self.vmis = VMIController(
            store, self.informers["VirtualMachineInstance"], self.informers["Node"]
        )

    async def refresh(self) -> None:
        for kind, informer in self.informers.items():
            items, _ = await self.store.list(kind)
            fresh = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in items}
            for obj in list(informer.cache.values()):
                if (obj["metadata"].get("namespace", ""), obj["metadata"]["name"]) not in fresh:
                    informer.apply_event("DELETED", obj)
            for obj in items:
                informer.apply_event("MODIFIED", obj)

    async def provision(self, name: str) -> Obj:
        await self.refresh()
        await self.ctl.reconcile((NS, name))
        return await self.store.get("PersistentVolumeClaim", NS, name)


def run(test: Callable[[Storage], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        try:
            await bootstrap(store)
            await store.create(storage_class("shared", "vmferry.io/shared", tmp_path / "nfs"))
            await store.create(storage_class("local", "vmferry.io/local", tmp_path / "local"))
            for n in ("node1", "node2"):
                await store.create(
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {"name": n, "labels": {"kubernetes.io/hostname": n}},
                        "spec": {},
                        "status": {
                            "capacity": {"memory": "4Gi"},
                            "conditions": [{"type": "Ready", "status": "True"}],
                        },
                    }
                )
            await test(Storage(store, tmp_path))
        finally:
            await store.close()

    asyncio.run(main())


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else -1


def head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def write_head(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)


def test_shared_claims_get_an_image_local_claims_a_node(tmp_path: Path) -> None:
    async def test(s: Storage) -> None:
        await s.store.create(pvc("golden"))
        bound = await s.provision("golden")
        status = bound["status"]
        assert status["phase"] == ClaimPhase.BOUND and status["accessModes"] == ["ReadWriteMany"]
        image = Path(status["imagePath"])
        assert image.parent == s.tmp / "nfs" / NS and size_of(image) == GiB
        assert "nodeName" not in status
        write_head(image, b"boot")
        await s.store.create(vmi("user", "golden"))
        await s.store.create(
            pvc("clone", dataSource={"kind": "PersistentVolumeClaim", "name": "golden"})
        )
        cond = conditions.get(await s.provision("clone"), CONDITION_PROVISIONING)
        assert cond is not None and cond["reason"] == "DataSourceInUse", cond
        assert 'in use by VirtualMachineInstance "user"' in cond["message"]
        await s.store.delete("VirtualMachineInstance", NS, "user")
        clone = Path((await s.provision("clone"))["status"]["imagePath"])
        assert head(clone, 4) == b"boot"

        await s.store.create(pvc("scratch", "ReadWriteOnce", "local"))
        pending = await s.provision("scratch")
        cond = conditions.get(pending, CONDITION_PROVISIONING)
        assert pending["status"]["phase"] == ClaimPhase.PENDING and cond is not None
        assert f"set the annotation {SELECTED_NODE_ANNOTATION} on the claim" in cond["message"]
        claim = await s.store.get("PersistentVolumeClaim", NS, "scratch")
        claim["metadata"]["annotations"] = {SELECTED_NODE_ANNOTATION: "node2"}
        await s.store.update(claim)
        local = (await s.provision("scratch"))["status"]
        assert local["phase"] == ClaimPhase.BOUND and local["nodeName"] == "node2"
        assert size_of(Path(local["imagePath"])) == -1  # node2's handler creates it

        await s.store.delete("PersistentVolumeClaim", NS, "clone")
        await s.refresh()
        await s.ctl.reconcile((NS, "clone"))
        assert size_of(clone) == -1 and size_of(image) == GiB

    run(test, tmp_path)


def test_claims_that_cannot_bind_say_why(tmp_path: Path) -> None:
    async def test(s: Storage) -> None:
        async def reason(name: str) -> tuple[str, str]:
            cond = conditions.get(await s.provision(name), CONDITION_PROVISIONING)
            assert cond is not None
            return cond["reason"], cond["message"]

        await s.store.create(pvc("nfs2", sc="fast"))
        assert await reason("nfs2") == (
            "StorageClassNotFound",
            'storageclass.storage.k8s.io "fast" not found',
        )
        await s.store.create(storage_class("fast", "vmferry.io/shared", s.tmp / "fast"))
        assert (await s.provision("nfs2"))["status"]["phase"] == ClaimPhase.BOUND
        await s.store.create(pvc("rwx-local", sc="local"))
        assert "ReadWriteMany is not supported" in (await reason("rwx-local"))[1]
        await s.store.create(
            pvc("orphan", dataSource={"kind": "PersistentVolumeClaim", "name": "nope"})
        )
        assert await reason("orphan") == (
            "DataSourceNotFound",
            'spec.dataSource: PersistentVolumeClaim "nope" does not exist',
        )
        nodefault = pvc("nodefault")
        del nodefault["spec"]["storageClassName"]
        await s.store.create(nodefault)
        assert (await reason("nodefault"))[0] == "NoStorageClass"

    run(test, tmp_path)


def test_placement_waits_for_claims_and_follows_a_local_one(tmp_path: Path) -> None:
    async def test(s: Storage) -> None:
        await s.store.create(vmi("vm", "data"))
        await s.refresh()
        await s.vmis.reconcile((NS, "vm"))
        waiting = await s.store.get("VirtualMachineInstance", NS, "vm")
        cond = conditions.get(waiting, VOLUMES_READY)
        assert (
            waiting["status"]["phase"] == VMIPhase.PENDING and "nodeName" not in waiting["status"]
        )
        assert cond is not None and 'PersistentVolumeClaim "data" does not exist' in cond["message"]
        claim = pvc("data", "ReadWriteOnce", "local")
        claim["metadata"]["annotations"] = {SELECTED_NODE_ANNOTATION: "node2"}
        await s.store.create(claim)
        await s.refresh()
        await s.vmis.reconcile((NS, "vm"))
        cond = conditions.get(await s.store.get("VirtualMachineInstance", NS, "vm"), VOLUMES_READY)
        assert cond is not None and 'PersistentVolumeClaim "data" is not bound' in cond["message"]
        await s.provision("data")
        await s.refresh()
        await s.vmis.reconcile((NS, "vm"))
        placed = await s.store.get("VirtualMachineInstance", NS, "vm")
        assert placed["status"]["nodeName"] == "node2"
        assert conditions.get(placed, VOLUMES_READY)["status"] == "True"  # type: ignore[index]

    run(test, tmp_path)


def test_migration_of_a_vmi_with_an_rwo_claim_is_refused(tmp_path: Path) -> None:
    async def test(s: Storage) -> None:
        await s.store.create(pvc("rootdisk", "ReadWriteOnce"))
        created = await s.store.create(vmi("vm", "rootdisk"))
        created["status"] = {"phase": VMIPhase.RUNNING, "nodeName": "node1"}
        await s.store.update(created, subresource="status")
        vmim = {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "m", "namespace": NS},
            "spec": {"vmiName": "vm"},
        }
        admission = Admission(s.store)
        with pytest.raises(Invalid) as info:
            await admission.admit_create(vmim)
        assert str(info.value).endswith(not_shared_message("rootdisk"))
        rootdisk = await s.store.get("PersistentVolumeClaim", NS, "rootdisk")
        with pytest.raises(Invalid, match='in use by VirtualMachineInstance "vm"'):
            await admission.admit_delete(rootdisk)
        changed = json.loads(json.dumps(rootdisk))
        changed["spec"]["accessModes"] = ["ReadWriteMany"]
        with pytest.raises(Invalid, match="spec: field is immutable after creation"):
            await admission.admit_update(rootdisk, changed, "")
        await admission.admit_update(rootdisk, rootdisk, "")
        await s.store.delete("VirtualMachineInstance", NS, "vm")
        await admission.admit_delete(rootdisk)

    run(test, tmp_path)


def test_cross_cluster_migration_of_a_vm_with_disks_is_refused(tmp_path: Path) -> None:
    async def test(s: Storage) -> None:
        hco = await s.store.get("HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME)
        hco["spec"]["featureGates"][FEATURE_GATE] = True
        await s.store.update(hco)
        await s.store.create(pvc("shared-disk"))  # shared, RWX: fine inside the cluster
        created = await s.store.create(vmi("vm", "shared-disk"))
        created["status"] = {"phase": VMIPhase.RUNNING, "nodeName": "node1"}
        await s.store.update(created, subresource="status")
        admission = Admission(s.store)

        def migration(name: str, **side: Obj) -> Obj:
            return {
                "apiVersion": kinds.KUBEVIRT,
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"vmiName": "vm", **side},
            }

        await admission.admit_create(migration("inside"))
        send = {"sendTo": {"migrationID": "m1", "connectURL": "10.0.0.2:9443"}}
        with pytest.raises(
            Invalid, match=r"cannot migrate to another cluster: .*v0 \(PVC shared-disk\)"
        ):
            await admission.admit_create(migration("out", **send))
        receiver = {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachine",
            "metadata": {"name": "incoming", "namespace": NS},
            "spec": {
                "runStrategy": RUN_STRATEGY_WAIT_AS_RECEIVER,
                "template": {"spec": vmi_spec("shared-disk")},
            },
        }
        await s.store.create(receiver)
        incoming = migration("in", receive={"migrationID": "m2"})
        incoming["spec"]["vmiName"] = "incoming"
        with pytest.raises(
            Invalid, match="needs storage live migration, which is not supported yet"
        ):
            await admission.admit_create(incoming)

    run(test, tmp_path)


def test_drain_treats_disks_not_live_migratable_by_eviction_strategy() -> None:
    v = vmi("vm", "rootdisk")
    status: Obj = {}
    conditions.set_condition(
        status,
        "LiveMigratable",
        False,
        REASON_DISKS_NOT_LIVE_MIGRATABLE,
        not_shared_message("rootdisk"),
    )
    v["status"] = status
    blocker = _blocker(v)
    assert blocker is not None and "PVC rootdisk is not shared" in blocker
    v["spec"]["evictionStrategy"] = "LiveMigrateIfPossible"
    assert _blocker(v) is None and _stopped_instead(v)  # KubeVirt evicts it: drain stops it
    v["status"] = {}
    assert not _stopped_instead(v)


def test_console_rows_say_why_a_vm_cannot_migrate() -> None:
    v = vmi("vm", "rootdisk")
    v["status"] = {"phase": "Running"}
    conditions.set_condition(
        v["status"],
        "LiveMigratable",
        False,
        REASON_DISKS_NOT_LIVE_MIGRATABLE,
        not_shared_message("rootdisk"),
    )
    (row,) = vm_rows([], [v], [])
    assert row["migratable"] is False and row["notMigratable"] == not_shared_message("rootdisk")
