"""Storage live migration: which disks are mirrored and exported, the block digests of
sparse images and their repair (handler.migration.storage), and the controller's part
over a real Store (controller.volume_migration, the admission's exemptions)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.admission import Admission
from controller.main import bootstrap
from controller.objects import write_status
from controller.store import Store
from controller.volume_migration import (
    CHANGE_ANNOTATION,
    MIGRATED_VOLUMES,
    VOLUME_MIGRATION_LABEL,
    MigratedVolume,
    VolumeChangeError,
    VolumeMigrator,
    changed_volumes,
    settle,
)
from handler import qemu_verify
from handler.drivers.qemu_handle import DiskSpec
from handler.migration import storage
from handler.migration.handoff import MigrationFailed
from tests.unit.test_storage_controller import pvc, vmi_spec
from vmferry.errors import Invalid
from vmferry.objects import kinds

Obj = dict[str, Any]
NS = "default"


def bound(name: str, image: str, mode: str = "ReadWriteOnce", node: str = "") -> Obj:
    obj = pvc(name, mode, "local")
    obj["metadata"]["uid"] = name
    obj["status"] = {"phase": "Bound", "imagePath": image, "nodeName": node}
    return obj


# -- handler: which disks --------------------------------------------------------------


def test_mirrored_disks_are_those_whose_claim_names_another_image() -> None:
    running = (DiskSpec("v0", "/a.img"), DiskSpec("v1", "/s.img", shared=True))
    claims = {"a": bound("a", "/a.img"), "b": bound("b", "/b.img"), "s": bound("s", "/s.img")}
    assert storage.mirrored_disks(running, vmi_spec("a", "s"), claims) == []
    (moved,) = storage.mirrored_disks(running, vmi_spec("b", "s"), claims)
    assert (moved.name, moved.source_path, moved.target_claim) == ("v0", "/a.img", "b")
    assert (moved.node, moved.nbd_node, moved.job_id) == ("vd0", "nbd0", "mirror0")
    with pytest.raises(MigrationFailed, match='destination PersistentVolumeClaim "gone"'):
        storage.mirrored_disks(running, vmi_spec("gone", "s"), claims)
    with pytest.raises(MigrationFailed, match='volume "v1" is attached'):
        storage.mirrored_disks(running, vmi_spec("b"), claims)


def test_a_target_exports_only_its_non_shared_disks() -> None:
    disks = (DiskSpec("v0", "/a.img", shared=True), DiskSpec("v1", "/b.img"))
    assert storage.exported_disks(disks) == [(1, disks[1])]


# -- handler: block digests and repair -------------------------------------------------


def test_sparse_image_digests_equal_a_full_read_and_repair_writes_blocks(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4096 * 5)
        f.write(os.urandom(4096 * 3))
        f.seek((6 << 20) + 100)  # unaligned data: its whole blocks are hashed
        f.write(b"x" * 5000)
    digests = asyncio.run(storage.image_digests(str(image)))
    full = qemu_verify.page_digests(image.read_bytes())
    assert digests.shape == (2048, qemu_verify.DIGEST_BYTES) and (digests == full).all()
    assert storage.data_extents(os.open(image, os.O_RDONLY), 8 << 20)[0][0] == 4096 * 5

    copy = tmp_path / "c.img"
    with open(copy, "wb") as f:
        f.truncate(8 << 20)
    differing = qemu_verify.compare(digests, asyncio.run(storage.image_digests(str(copy))))
    payload = storage.read_blocks(str(image), differing.differing)
    new = storage.write_blocks(str(copy), differing.differing, payload)
    assert (new == digests[differing.differing]).all()
    assert copy.read_bytes() == image.read_bytes()
    with pytest.raises(ValueError, match="out of bounds"):
        storage.write_blocks(str(copy), np.array([4096], dtype=np.int64), bytes(4096))


def test_an_image_of_partial_blocks_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "odd.img"
    image.write_bytes(b"x" * 5000)
    with pytest.raises(MigrationFailed, match="not whole 4 KiB blocks"):
        asyncio.run(storage.image_digests(str(image)))


# -- controller ------------------------------------------------------------------------


def test_changed_volumes_names_each_move_and_refuses_other_edits() -> None:
    assert changed_volumes(vmi_spec("a", "b"), vmi_spec("a", "b")) == []
    assert changed_volumes(vmi_spec("a", "c"), vmi_spec("a", "b")) == [
        MigratedVolume("v1", "b", "c")
    ]
    with pytest.raises(VolumeChangeError, match="the volume names must stay the same"):
        changed_volumes(vmi_spec("a", "b", "c"), vmi_spec("a", "b"))


def vm(*claims: str) -> Obj:
    return {
        "apiVersion": kinds.KUBEVIRT,
        "kind": "VirtualMachine",
        "metadata": {"name": "vm", "namespace": NS},
        "spec": {
            "runStrategy": "Always",
            "updateVolumesStrategy": "Migration",
            "template": {"spec": vmi_spec(*claims)},
        },
    }


def test_volume_migrator_starts_settles_and_does_not_retry_a_failed_change(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        try:
            await bootstrap(store)
            for name in ("src", "dst"):
                await store.create(pvc(name, "ReadWriteOnce", "local"))
            the_vm = await store.create(vm("dst"))
            vmi = await store.create(
                {
                    "apiVersion": kinds.KUBEVIRT,
                    "kind": "VirtualMachineInstance",
                    "metadata": {"name": "vm", "namespace": NS},
                    "spec": vmi_spec("src"),
                }
            )
            vmi["status"] = {"phase": "Running", "nodeName": "node1"}
            vmi = await write_status(store, vmi)
            migrator = VolumeMigrator(store)
            assert await migrator.reconcile(the_vm, vmi) is None
            vmi = await store.get("VirtualMachineInstance", NS, "vm")
            assert vmi["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dst"
            assert vmi["status"][MIGRATED_VOLUMES] == [
                MigratedVolume("v0", "src", "dst").to_status()
            ]
            (vmim,) = (await store.list("VirtualMachineInstanceMigration", NS))[0]
            assert vmim["metadata"]["labels"] == {VOLUME_MIGRATION_LABEL: "vm"}
            assert vmim["metadata"]["name"].startswith("vm-volume-migration-")

            # while it runs: the RWX rule spares the destination, the source stays in use
            admission = Admission(store)
            with pytest.raises(Invalid, match='in use by VirtualMachineInstance "vm"'):
                await admission.admit_delete(await store.get("PersistentVolumeClaim", NS, "src"))
            assert await migrator.reconcile(the_vm, vmi) is None  # one at a time
            assert len((await store.list("VirtualMachineInstanceMigration", NS))[0]) == 1

            # it failed: back on the source claim, and the same change is not retried
            vmi = await settle(store, vmi, succeeded=False)
            assert vmi["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "src"
            assert MIGRATED_VOLUMES not in vmi["status"]
            vmim["status"] = {
                "phase": "Failed",
                "migrationState": {"failed": True, "failureReason": "mirror failed"},
            }
            await write_status(store, vmim)
            problem = await migrator.reconcile(the_vm, vmi)
            assert problem is not None and "failed: mirror failed" in problem
            assert vmim["metadata"]["annotations"][CHANGE_ANNOTATION]

            # success keeps the new claim
            the_vm["spec"]["template"]["spec"] = vmi_spec("dst")
            vmi["spec"] = vmi_spec("dst")
            vmi = await store.update(vmi)
            vmi["status"][MIGRATED_VOLUMES] = [MigratedVolume("v0", "src", "dst").to_status()]
            vmi = await settle(store, await write_status(store, vmi), succeeded=True)
            assert vmi["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dst"
            assert MIGRATED_VOLUMES not in vmi["status"]
            bad = vm("dst")
            bad["spec"]["template"]["spec"] = vmi_spec("dst", "src")
            problem = await migrator.reconcile(bad, vmi)
            assert problem is not None and "volume names must stay the same" in problem
        finally:
            await store.close()

    asyncio.run(main())


# -- the bench's storage scenario ------------------------------------------------------


def test_storage_bench_reads_the_guest_gap_and_prints_both_sides() -> None:
    from bench import storage_runs

    console = "memload: disk\nHB 41 100 612.500 0 0\nHB 42 200 100.000 0 0\n"
    assert storage_runs._first_gap_ms(console) == 612.5
    assert storage_runs._first_gap_ms("no heartbeat") is None
    summary = {"median": 2.0, "min": 1.0, "max": 3.0}
    lines = storage_runs.table_lines(
        {"title": "t", "vmferry": {"summary": {"endToEndSeconds": summary}}, "qemu": {}}
    )
    assert lines[1] == "== storage: t ==" and "vmferry  end-to-end 2.0 s" in lines[2]
    assert "mirror n/a" in lines[2] and len(lines) == 3
    assert "storage unavailable: no disk" in storage_runs.table_lines({"unavailable": "no disk"})[2]
