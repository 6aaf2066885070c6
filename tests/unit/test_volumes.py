"""VM disks: the claim contract and the RWX rule (vmferry.volumes), the schemas, image
files, the guest's disk records, the handler's resolver and the QEMU disk arguments
(the provisioner and admission: test_storage_controller.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from handler.drivers.qemu_handle import DiskSpec, QemuSpec
from handler.volumes import LocalReclaimer, VolumeResolver, VolumeUnavailable
from tests.support.guest_disk import BLOCK, MAGIC, read_records
from tests.support.volume_manifests import pvc, storage_class, vmi, vmi_spec
from vmferry.disk_image import ImageError, create_image
from vmferry.errors import Invalid, NotFound
from vmferry.objects import kinds
from vmferry.objects.schema import validate
from vmferry.volumes import (
    REASON_DISKS_NOT_LIVE_MIGRATABLE,
    live_migratable,
    not_shared_message,
)

Obj = dict[str, Any]
NS = "default"
GiB = 1 << 30


# -- the RWX rule ---------------------------------------------------------------------------


def test_rwx_rule_names_the_first_claim_that_is_not_shared() -> None:
    claims = {"a": pvc("a"), "b": pvc("b", "ReadWriteOnce")}
    ok, reason, message = live_migratable(vmi_spec("a", "b"), claims)
    assert (ok, reason) == (False, REASON_DISKS_NOT_LIVE_MIGRATABLE)
    assert message == (
        "cannot migrate VMI: PVC b is not shared, live migration requires that all PVCs "
        "must be shared (using ReadWriteMany access mode)"
    )
    assert live_migratable(vmi_spec("a"), claims)[0] is True
    assert live_migratable(vmi_spec(), {})[0] is True
    ok, _, message = live_migratable(vmi_spec("gone"), claims)
    assert not ok and "Unable to determine if PVC gone is shared" in message


# -- schemas --------------------------------------------------------------------------------


def invalid(obj: Obj) -> str:
    with pytest.raises(Invalid) as info:
        validate(obj)
    return str(info.value)


def test_schema_refuses_bad_claims_classes_and_volumes() -> None:
    bad = pvc("x")
    bad["spec"]["accessModes"] = ["ReadWriteSometimes"]
    assert 'spec.accessModes[0]: unsupported value "ReadWriteSometimes"' in invalid(bad)
    bad = pvc("x")
    del bad["spec"]["resources"]
    assert "spec.resources.requests.storage: required field is missing" in invalid(bad)
    bad = pvc("x", dataSource={"kind": "Snapshot", "name": "s"})
    assert 'spec.dataSource.kind: unsupported value "Snapshot"' in invalid(bad)
    bad = pvc("x", dataSource={"kind": "ImageFile", "apiGroup": "vmferry.io", "path": "rel.img"})
    assert "spec.dataSource.path: an absolute image file path is required" in invalid(bad)
    sc = storage_class("s", "example.com/nfs", Path("/srv"))
    assert 'provisioner: unsupported value "example.com/nfs"' in invalid(sc)
    v = vmi("vm", "a")
    v["spec"]["domain"]["devices"]["disks"][0]["name"] = "other"
    message = invalid(v)
    assert 'disk "other" names no volume in spec.volumes' in message
    assert 'volume "v0" has no disk in spec.domain.devices.disks' in message
    v = vmi("vm", "a", "b")
    v["spec"]["volumes"][1]["name"] = "v0"
    assert 'duplicate volume "v0"' in invalid(v)
    v = vmi("vm", "a")
    v["spec"]["volumes"][0]["persistentVolumeClaim"] = {}
    assert "persistentVolumeClaim.claimName: required field is missing" in invalid(v)
    vm = {
        "apiVersion": kinds.KUBEVIRT,
        "kind": "VirtualMachine",
        "metadata": {"name": "vm", "namespace": NS},
        "spec": {"updateVolumesStrategy": "Migration", "template": {"spec": vmi_spec("a")}},
    }
    validate(vm)  # storage live migration (controller/volume_migration.py)
    vm["spec"]["updateVolumesStrategy"] = "Replacement"
    validate(vm)
    vm["spec"]["updateVolumesStrategy"] = "Copy"
    assert "updateVolumesStrategy" in invalid(vm)
    validate(vmi("vm", "a"))  # and the good one passes
    validate(pvc("x", dataSource={"kind": "ImageFile", "apiGroup": "vmferry.io", "path": "/i.img"}))


# -- image files ----------------------------------------------------------------------------


def test_images_are_sparse_copied_and_never_overwritten(tmp_path: Path) -> None:
    blank = tmp_path / "ns" / "blank.img"
    assert create_image(blank, GiB)
    assert blank.stat().st_size == GiB and blank.stat().st_blocks * 512 < (1 << 20)
    with open(blank, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"hello")
    copy = tmp_path / "copy.img"
    assert create_image(copy, 2 * GiB, blank)
    assert copy.stat().st_size == 2 * GiB and copy.stat().st_blocks * 512 < (4 << 20)
    with open(copy, "rb") as f:
        f.seek(5 << 20)
        assert f.read(5) == b"hello"
    assert not create_image(copy, GiB)  # exists: left alone
    assert copy.stat().st_size == 2 * GiB
    with pytest.raises(ImageError, match="larger than the requested size"):
        create_image(tmp_path / "small.img", 1 << 20, blank)
    with pytest.raises(ImageError, match="cannot read the source image"):
        create_image(tmp_path / "x.img", GiB, tmp_path / "missing.img")
    assert not (tmp_path / "small.img").exists()


# -- the handler: resolving and attaching ----------------------------------------------------


class FakeApi:
    def __init__(self, *claims: Obj, classes: dict[str, Obj] | None = None) -> None:
        self.claims = list(claims)
        self.classes = classes or {}

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj:
        assert kind == "StorageClass" and namespace is None
        if name not in self.classes:
            raise NotFound(f"storageclass {name} not found")
        return self.classes[name]

    async def list(
        self, kind: str, namespace: str | None = None, label_selector: str = ""
    ) -> tuple[list[Obj], str]:
        assert kind == "PersistentVolumeClaim" and namespace == NS
        return self.claims, "1"


def bound(name: str, path: Path, mode: str = "ReadWriteMany", node: str = "", **spec: Any) -> Obj:
    obj = pvc(name, mode, **spec)
    obj["metadata"]["uid"] = f"uid-{name}"
    obj["status"] = {
        "phase": "Bound",
        "imagePath": str(path),
        **({"nodeName": node} if node else {}),
    }
    return obj


def test_resolver_creates_local_images_and_checks_shared_ones(tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "a.img"
    local = tmp_path / "local" / "b.img"
    api = FakeApi(bound("a", shared), bound("b", local, "ReadWriteOnce", node="node1"))

    async def main() -> None:
        resolver = VolumeResolver(api, "node1")
        with pytest.raises(
            VolumeUnavailable, match="is not on node node1: is the shared directory mounted here"
        ):
            await resolver.disks(vmi("vm", "a", "b"))
        create_image(shared, GiB)
        disks = await resolver.disks(vmi("vm", "a", "b"))
        assert [(d.name, d.path, d.shared) for d in disks] == [
            ("v0", str(shared), True),
            ("v1", str(local), False),
        ]
        assert local.stat().st_size == GiB
        with pytest.raises(VolumeUnavailable, match='"b" is local to node node1, not node2'):
            await VolumeResolver(api, "node2").disks(vmi("vm", "b"))
        ok, _, message = await resolver.live_migratable(vmi("vm", "a", "b"))
        assert not ok and message == not_shared_message("b")

    asyncio.run(main())


def test_local_images_of_deleted_claims_are_reclaimed_on_their_node(tmp_path: Path) -> None:
    mine, other, kept = tmp_path / "mine.img", tmp_path / "other.img", tmp_path / "kept.img"
    for path in (mine, other, kept):
        create_image(path, GiB)
    retain = storage_class("keep", "vmferry.io/local", tmp_path)
    retain["reclaimPolicy"] = "Retain"
    api = FakeApi(classes={"keep": retain})

    async def main() -> None:
        reclaimer = LocalReclaimer(api, "node1")
        deleted = [
            bound(
                "a",
                mine,
                "ReadWriteOnce",
                node="node1",
            ),
            bound("b", other, "ReadWriteOnce", node="node2"),
            bound("c", kept, "ReadWriteOnce", node="node1"),
        ]
        deleted[2]["spec"]["storageClassName"] = "keep"
        for obj in deleted:
            reclaimer.on_claim((NS, obj["metadata"]["name"]), obj, None)
        reclaimer.on_claim((NS, "a"), None, deleted[0])  # an add: nothing
        await asyncio.gather(*reclaimer._tasks)

    asyncio.run(main())
    assert not mine.exists() and other.exists() and kept.exists()


def test_qemu_disk_arguments_are_cache_none_and_round_trip() -> None:
    disk = DiskSpec(name="rootdisk", path="/srv/a,b.img", shared=True)
    args = disk.qemu_args(0)
    assert "driver=file,node-name=vf0,filename=/srv/a,,b.img,cache.direct=on,aio=native" in args
    assert "virtio-blk-pci,drive=vd0,serial=rootdisk" in args
    spec = QemuSpec(memory_bytes=64 << 20, kernel="/k", disks=(disk,))
    assert QemuSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError, match="disk bus sata is not supported by the qemu driver"):
        DiskSpec(name="d", path="/x", bus="sata")


def _record(seq: int) -> bytes:
    import struct

    words = []
    s = ((seq + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    for _ in range(4, BLOCK // 8):
        s ^= (s << 13) & ((1 << 64) - 1)
        s ^= s >> 7
        s ^= (s << 17) & ((1 << 64) - 1)
        words.append(s)
    total = sum(words) & ((1 << 64) - 1)
    return struct.pack(f"<4Q{len(words)}Q", MAGIC, seq, 0, total, *words)


def test_guest_disk_reader_finds_gaps_stale_and_torn_records(tmp_path: Path) -> None:
    def image(blocks: list[bytes]) -> Path:
        path = tmp_path / "d.img"
        path.write_bytes(bytes(BLOCK) + b"".join(blocks) + bytes(4 * BLOCK))
        return path

    good = [_record(i) for i in range(5)]
    assert (
        read_records(image(good)) == read_records(image(good))
        and read_records(image(good)).count == 5
    )
    assert read_records(image(good)).problems == ()
    gap = [*good[:2], bytes(BLOCK), *good[3:]]
    assert "a gap" in read_records(image(gap)).problems[0]
    stale = [*good[:2], _record(7), *good[3:]]
    assert read_records(image(stale)).problems == ("block 3: seq 7, expected 2",)
    torn = [*good[:2], good[2][:2048] + bytes(2048), *good[3:]]
    assert "bad checksum" in read_records(image(torn)).problems[0]
