"""VM disks in a real lab: storage classes, claims, the RWX rule, and a QEMU guest whose
shared disk stays in place across a live migration (vmferry.volumes, guest/memload.c).

One lab (2 nodes) and one QEMU guest (TCG, 128 MiB, a 1 GiB sparse ReadWriteMany disk)
for the module; a memvm guest with a ReadWriteOnce claim for the RWX rule (no QEMU).
The guest writes one record per heartbeat to block seq+1 of its disk
(tests/support/guest_disk.py): after each move the records must run 0..n without a gap,
a stale block or a torn write.

The guest image must have disk support (``make guest-image``: the virtio block modules
in its initramfs); ``VMFERRY_GUEST_IMAGE`` points at another image directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.guest_disk import read_records
from tests.support.lab import LabHarness, migration_name, vm_manifest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = Path(os.environ.get("VMFERRY_GUEST_IMAGE") or ROOT / "build" / "guest")
QEMU_VM = "qdisk"
HB = re.compile(r"^HB (\d+) ", re.M)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed (make install-qemu, as root)",
    ),
    pytest.mark.skipif(
        not (IMAGE / "modules" / "virtio_blk.ko").is_file(),
        reason=f"the guest image in {IMAGE} has no disk support (make guest-image)",
    ),
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("lab")))
    harness.up(nodes=2)
    try:
        yield harness
    finally:
        harness.down()


def manifest(kind: str, name: str, **fields: Any) -> str:
    api = {"StorageClass": "storage.k8s.io/v1", "PersistentVolumeClaim": "v1"}[kind]
    return json.dumps({"apiVersion": api, "kind": kind, "metadata": {"name": name}, **fields})


def claim(name: str, mode: str, storage_class: str) -> str:
    spec = {
        "accessModes": [mode],
        "storageClassName": storage_class,
        "resources": {"requests": {"storage": "1Gi"}},
    }
    return manifest("PersistentVolumeClaim", name, spec=spec)


def with_disk(vm: dict[str, Any], claim_name: str) -> dict[str, Any]:
    spec = vm["spec"]["template"]["spec"]
    spec["domain"]["devices"] = {"disks": [{"name": "data", "disk": {"bus": "virtio"}}]}
    spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim_name}}]
    return vm


def qemu_vm(name: str = QEMU_VM, claim_name: str = "shared-data", **spec: Any) -> str:
    vm: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "spec": {
                    "evictionStrategy": "LiveMigrate",
                    "domain": {"memory": {"guest": "128Mi"}},
                    "qemu": {
                        "kernel": str(IMAGE / "vmlinuz"),
                        "initrd": str(IMAGE / "initrd.img"),
                        "cmdline": "console=ttyS0 quiet panic=-1 memload.fill=16 "
                        "memload.rate=4 memload.tick=100",
                        "accelerator": "tcg",
                        "verify": "repair",
                    },
                }
            },
        },
    }
    vm["spec"].update(spec)
    return json.dumps(with_disk(vm, claim_name))


def qemu_guests(lab: LabHarness, uid: str) -> list[tuple[str, dict[str, Any]]]:
    """(node, vm.json) of each live QEMU of this VMI."""
    found = []
    for node in lab.lab.node_names():
        for vm_json in (lab.lab.runtime_dir(node) / "qemu").glob(f"{uid}*/vm.json"):
            try:
                record = json.loads(vm_json.read_text())
                cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes()
            except (OSError, ValueError, KeyError):
                continue
            if f"guest={record['vm_id']}".encode() in cmdline:
                found.append((node, record))
    return found


def console(record: dict[str, Any]) -> str:
    log = Path(record["dir"]) / "console.log"
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture(scope="module")
def storage(lab: LabHarness) -> dict[str, Path]:
    """The lab's two classes: ``shared`` (one directory all nodes see) and ``local``."""
    shared, local = lab.root / "shared", lab.root / "node1-local"
    lab.apply(
        manifest(
            "StorageClass",
            "shared",
            provisioner="vmferry.io/shared",
            parameters={"path": str(shared)},
        )
    )
    lab.apply(
        manifest(
            "StorageClass",
            "local",
            provisioner="vmferry.io/local",
            parameters={"path": str(local), "node": "node1"},
        )
    )
    return {"shared": shared, "local": local}


@pytest.fixture(scope="module")
def guest(lab: LabHarness, storage: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """The QEMU guest with its shared disk, writing records; {uid, image}."""
    lab.apply(claim("shared-data", "ReadWriteMany", "shared"))
    lab.apply(qemu_vm())
    uid = lab.wait_vmi_running(QEMU_VM, timeout=90)["metadata"]["uid"]
    image = Path(lab.get("pvc", "shared-data")["status"]["imagePath"])
    try:
        lab.wait_for(
            "the guest to write disk records",
            lambda: read_records(image).count > 20,
            timeout=150,
            interval=1,
        )
        yield {"uid": uid, "image": image}
    finally:
        lab.cli("delete", "vm", QEMU_VM, check=False, timeout=90)
        for _, record in qemu_guests(lab, uid):
            try:
                os.kill(int(record["pid"]), signal.SIGKILL)
            except OSError:
                pass


def _follow_heartbeats(record: dict[str, Any], seen: list[int], stop: threading.Event) -> None:
    """Keep the last heartbeat seq of a console log until ``stop`` or the log is gone."""
    log = Path(record["dir"]) / "console.log"
    while not stop.is_set():
        try:
            beats = HB.findall(log.read_text(errors="replace"))
        except OSError:
            return
        if beats:
            seen.append(int(beats[-1]))
        time.sleep(0.02)


def _records_grow(image: Path, past: int, timeout: float = 30) -> int:
    def grown() -> int:
        records = read_records(image)
        assert not records.problems, records.problems
        return records.count if records.count > past + 20 else 0

    return LabHarness.wait_for("the guest to write on", grown, timeout=timeout, interval=0.5)


@pytest.mark.timeout(120)
def test_claims_bind_and_show(lab: LabHarness, storage: dict[str, Path]) -> None:
    lab.apply(claim("local-data", "ReadWriteOnce", "local"))
    bound = lab.wait_for(
        "the local claim to bind",
        lambda: (lab.get("pvc", "local-data").get("status") or {}).get("phase") == "Bound",
    )
    assert bound
    status = lab.get("pvc", "local-data")["status"]
    assert status["nodeName"] == "node1"
    assert status["imagePath"].startswith(str(storage["local"]))
    out = lab.cli("get", "pvc", "local-data", "-o", "wide").stdout
    assert out.split("\n")[1].split()[:5] == ["local-data", "Bound", "1Gi", "RWO", "local"], out
    lab.apply(claim("bad-local", "ReadWriteMany", "local"))
    message = lab.wait_for(
        "the RWX local claim to be refused",
        lambda: next(
            (
                c["message"]
                for c in (lab.get("pvc", "bad-local").get("status") or {}).get("conditions", [])
                if c["type"] == "Provisioning" and c["status"] == "False"
            ),
            None,
        ),
    )
    assert "ReadWriteMany is not supported" in message
    # node1's handler removes the image of its deleted local claim
    local_image = Path(status["imagePath"])
    local_image.parent.mkdir(parents=True, exist_ok=True)
    local_image.write_bytes(b"x")  # as if a guest had attached it
    lab.cli("delete", "pvc", "local-data")
    lab.wait_for("node1 to remove the local image", lambda: not local_image.exists(), timeout=30)


@pytest.mark.timeout(150)
def test_rwo_volume_is_not_live_migratable(lab: LabHarness, storage: dict[str, Path]) -> None:
    """The RWX rule on a memvm guest (no QEMU needed): condition, migrate, drain."""
    lab.apply(claim("rwo-data", "ReadWriteOnce", "shared"))
    vm = with_disk(json.loads(vm_manifest("rwo", "32Mi", "1Mi", "8Mi")), "rwo-data")
    lab.apply(json.dumps(vm))
    vmi = lab.wait_vmi_running("rwo", timeout=60)
    expected = (
        "cannot migrate VMI: PVC rwo-data is not shared, live migration requires that all "
        "PVCs must be shared (using ReadWriteMany access mode)"
    )
    cond = next(c for c in vmi["status"]["conditions"] if c["type"] == "LiveMigratable")
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "False",
        "DisksNotLiveMigratable",
        expected,
    )
    wide = lab.cli("get", "vmi", "rwo", "-o", "wide").stdout.split("\n")
    column = wide[0].index("LIVE-MIGRATABLE")  # columns are aligned; IP is empty here
    assert wide[1][column:].split()[0] == "False", wide
    out = lab.cli("migrate", "rwo", check=False)
    assert out.returncode != 0 and expected in out.stderr, out
    node = vmi["status"]["nodeName"]
    out = lab.cli("adm", "drain", node, check=False, timeout=60)
    assert out.returncode == 1 and f"default/rwo is not live-migratable: {expected}" in out.stderr
    lab.cli("adm", "uncordon", node)
    lab.cli("delete", "vm", "rwo", timeout=60)


@pytest.mark.timeout(300)
def test_shared_disk_stays_across_a_migration(lab: LabHarness, guest: dict[str, Any]) -> None:
    image, uid = guest["image"], guest["uid"]
    vmi = lab.get("vmi", QEMU_VM)
    cond = next(c for c in vmi["status"]["conditions"] if c["type"] == "LiveMigratable")
    assert cond["status"] == "True", cond
    source = vmi["status"]["nodeName"]
    before = read_records(image).count
    (source_record,) = [r for n, r in qemu_guests(lab, uid) if n == source]
    last_on_source: list[int] = []
    stop = threading.Event()
    tail = threading.Thread(
        target=_follow_heartbeats, args=(source_record, last_on_source, stop), daemon=True
    )
    tail.start()
    started = time.monotonic()
    try:
        out = lab.cli("migrate", QEMU_VM, "--wait", timeout=240)
    finally:
        stop.set()
        tail.join(5)
    assert "succeeded" in out.stdout, out.stdout
    print(f"migration with a shared disk: {time.monotonic() - started:.1f}s")
    moved = lab.get("vmi", QEMU_VM)["status"]
    target = moved["nodeName"]
    assert target != source
    transfer = moved["migrationState"]["transfer"]
    print(
        f"downtime {transfer.get('downtimeMilliseconds')} ms, guest-seen "
        f"{transfer.get('guestDowntimeMilliseconds')} ms, repaired pages "
        f"{transfer.get('repairedPages')}"
    )
    running = qemu_guests(lab, uid)
    assert [n for n, _ in running] == [target], running
    after = _records_grow(image, before)
    print(f"disk records: {before} before, {after} after the migration, no gap")
    text = console(running[0][1])
    assert "DISKERR" not in text and "CORRUPT" not in text, text[-2000:]
    # no repeat: the target's first heartbeat follows the last the source printed (the
    # source's log goes with its QEMU: the last line followed may be one short of it)
    first_on_target = int(HB.findall(text)[0])
    assert last_on_source and first_on_target > last_on_source[-1], (last_on_source, text[:300])
    assert first_on_target < after  # and its record is on the disk, in place
    print(f"heartbeats: source last seen {last_on_source[-1]}, target first {first_on_target}")
    assert image.stat().st_size == 1 << 30


@pytest.mark.timeout(300)
def test_source_handler_killed_mid_migration_disk_intact(
    lab: LabHarness, guest: dict[str, Any]
) -> None:
    """The source's handler dies while the memory streams: the migration fails, the guest
    runs on on the source (the target never took the disk over), the records run on."""
    image, uid = guest["image"], guest["uid"]
    source = lab.get("vmi", QEMU_VM)["status"]["nodeName"]
    lab.set_live_migration_config(bandwidthPerMigration="4Mi")  # a slow stream to cut
    try:
        out = lab.cli("migrate", QEMU_VM)
        name = migration_name(out.stdout)
        lab.wait_for(
            "the target QEMU to receive",
            lambda: (
                len(qemu_guests(lab, uid)) == 2
                and (lab.get("vmim", name).get("status") or {}).get("phase") == "Running"
            ),
            timeout=90,
        )
        lab.restart(source)
        vmim = lab.wait_vmim_final(name, timeout=150)
    finally:
        lab.set_live_migration_config(bandwidthPerMigration=None)
    vmi = lab.get("vmi", QEMU_VM)
    print(
        f"after the kill: migration {vmim['status']['phase']}, guest on {vmi['status']['nodeName']}"
    )
    assert vmim["status"]["phase"] == "Failed", vmim["status"]
    assert vmi["status"]["nodeName"] == source
    lab.wait_for(
        "one QEMU, on the source",
        lambda: [n for n, _ in qemu_guests(lab, uid)] == [source],
        timeout=60,
    )
    _records_grow(image, read_records(image).count)


@pytest.mark.timeout(120)
def test_missing_image_is_reported_and_claim_in_use_kept(
    lab: LabHarness, storage: dict[str, Path]
) -> None:
    """A shared image that is not there (the directory not mounted on the node): the guest
    is not started and the VMI says why; the claim cannot be deleted while in use."""
    lab.apply(claim("vanishing", "ReadWriteMany", "shared"))
    image = lab.wait_for(
        "the claim to bind",
        lambda: (lab.get("pvc", "vanishing").get("status") or {}).get("imagePath"),
    )
    Path(image).unlink()
    vm = json.loads(qemu_vm())
    vm["metadata"]["name"] = "nodisk"
    lab.apply(json.dumps(with_disk(vm, "vanishing")))

    def volumes_ready() -> dict[str, Any] | None:
        vmi = lab.try_get("vmi", "nodisk") or {}
        conds = (vmi.get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "VolumesReady"), None)

    cond = lab.wait_for("the VMI to say its volume is unavailable", volumes_ready, timeout=60)
    assert cond["status"] == "False" and cond["reason"] == "VolumeUnavailable", cond
    assert f"the image {image} of PersistentVolumeClaim" in cond["message"], cond
    assert "is the shared directory mounted here?" in cond["message"], cond
    out = lab.cli("delete", "pvc", "vanishing", check=False)
    assert out.returncode != 0 and 'in use by VirtualMachineInstance "nodisk"' in out.stderr, out
    lab.cli("delete", "vm", "nodisk", timeout=60)
    lab.wait_for("the VMI to go", lambda: lab.try_get("vmi", "nodisk") is None, timeout=60)
    lab.cli("delete", "pvc", "vanishing")


SMIG_VM = "smig"


@pytest.fixture(scope="module")
def smig(lab: LabHarness, storage: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """A QEMU guest with updateVolumesStrategy Migration on a local claim of node1, and
    two empty local claims on node2 to move it to; {uid, image}."""
    lab.apply(
        manifest(
            "StorageClass",
            "local2",
            provisioner="vmferry.io/local",
            parameters={"path": str(lab.root / "node2-local"), "node": "node2"},
        )
    )
    lab.apply(claim("smig-src", "ReadWriteOnce", "local"))
    for name in ("smig-a", "smig-b"):
        lab.apply(claim(name, "ReadWriteOnce", "local2"))
    lab.apply(qemu_vm(SMIG_VM, "smig-src", updateVolumesStrategy="Migration"))
    try:
        vmi = lab.wait_vmi_running(SMIG_VM, timeout=120)
        assert vmi["status"]["nodeName"] == "node1"
        image = Path(lab.get("pvc", "smig-src")["status"]["imagePath"])
        lab.wait_for(
            "the guest to write disk records",
            lambda: read_records(image).count > 20,
            timeout=150,
            interval=1,
        )
        yield {"uid": vmi["metadata"]["uid"], "image": image}
    finally:
        lab.cli("delete", "vm", SMIG_VM, check=False, timeout=90)
        lab.wait_for("the VMI to go", lambda: lab.try_get("vmi", SMIG_VM) is None, timeout=90)
        for name in ("smig-src", "smig-a", "smig-b"):
            lab.cli("delete", "pvc", name, check=False)


def _migration_uid(lab: LabHarness) -> str:
    ms = (lab.get("vmi", SMIG_VM).get("status") or {}).get("migrationState") or {}
    return str(ms.get("migrationUid") or "")


def _volume_migration_ended(lab: LabHarness, before: str) -> dict[str, Any] | None:
    """The VMI's status once a storage migration after ``before`` (a migration uid)
    failed, or succeeded and settled."""
    status: dict[str, Any] = lab.get("vmi", SMIG_VM).get("status") or {}
    ms = status.get("migrationState") or {}
    if ms.get("migrationUid", "") == before:
        return None
    done = ms.get("completed") and status.get("nodeName") == "node2"
    return status if ms.get("failed") or (done and not status.get("migratedVolumes")) else None


@pytest.mark.timeout(300)
def test_storage_migration_failure_keeps_the_guest_on_its_claim(
    lab: LabHarness, smig: dict[str, Any]
) -> None:
    """The target handler dies as the mirror's NBD stream opens: the migration fails, the
    mirror is cleaned up on the source, the VMI is back on its source claim, the same
    change is not retried (the VM says why), and the guest writes on, on the source."""
    lab.restart("node2", "target-nbd")
    before = _migration_uid(lab)
    try:
        lab.apply(qemu_vm(SMIG_VM, "smig-a", updateVolumesStrategy="Migration"))
        status = lab.wait_for(
            "the migration to fail", lambda: _volume_migration_ended(lab, before), timeout=150
        )
    finally:
        lab.restart("node2")
    assert status["migrationState"].get("failed"), status["migrationState"]
    print(f"failed as expected: {status['migrationState'].get('failureReason')}")
    vmi = lab.get("vmi", SMIG_VM)
    assert vmi["status"]["nodeName"] == "node1"
    assert vmi["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "smig-src"
    assert "migratedVolumes" not in vmi["status"]

    def volumes_change() -> dict[str, Any] | None:
        conds = (lab.get("vm", SMIG_VM).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "VolumesChange"), None)

    cond = lab.wait_for("the VM to say why", volumes_change, timeout=30)
    assert cond["status"] == "False" and "failed" in cond["message"], cond
    lab.wait_for(
        "one QEMU, on the source",
        lambda: [n for n, _ in qemu_guests(lab, smig["uid"])] == ["node1"],
        timeout=60,
    )
    _records_grow(smig["image"], read_records(smig["image"]).count)


@pytest.mark.timeout(300)
def test_storage_migration_to_a_local_claim_on_the_target(
    lab: LabHarness, smig: dict[str, Any]
) -> None:
    """updateVolumesStrategy: Migration (KubeVirt's volume migration): the VM's volume is
    edited to a new local claim on the other node; the disk is mirrored there while the
    guest writes, memory follows, the disk digests match at the switchover; the records
    run on, on the new image, without a gap or a repeat."""
    uid, source_image = smig["uid"], smig["image"]
    (source_record,) = [r for n, r in qemu_guests(lab, uid) if n == "node1"]
    last_on_source: list[int] = []
    stop = threading.Event()
    tail = threading.Thread(
        target=_follow_heartbeats, args=(source_record, last_on_source, stop), daemon=True
    )
    tail.start()
    started = time.monotonic()
    before = _migration_uid(lab)
    try:
        lab.apply(qemu_vm(SMIG_VM, "smig-b", updateVolumesStrategy="Migration"))
        status = lab.wait_for(
            "the storage migration", lambda: _volume_migration_ended(lab, before), timeout=240
        )
    finally:
        stop.set()
        tail.join(5)
    assert not status["migrationState"].get("failed"), status["migrationState"]
    transfer = status["migrationState"]["transfer"]
    print(
        f"storage migration: {time.monotonic() - started:.1f}s, mirror "
        f"{transfer.get('diskMirrorMilliseconds')} ms, downtime "
        f"{transfer.get('downtimeMilliseconds')} ms "
        f"{transfer.get('downtimePartsMilliseconds')}, repaired blocks "
        f"{transfer.get('repairedDiskBlocks')}, repaired pages "
        f"{transfer.get('repairedPages')}"
    )
    assert transfer["mirroredDisks"] == ["data"], transfer
    assert transfer["digestVerified"] is True, transfer
    vmi = lab.get("vmi", SMIG_VM)
    assert vmi["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "smig-b"
    vmims = json.loads(lab.cli("get", "vmim", "-o", "json").stdout)["items"]
    ours = [m for m in vmims if m["metadata"]["name"].startswith(f"{SMIG_VM}-volume-")]
    finals = [lab.wait_vmim_final(m["metadata"]["name"])["status"]["phase"] for m in ours]
    assert sorted(finals) == ["Failed", "Succeeded"], finals
    vm_status = lab.get("vm", SMIG_VM)["status"]
    assert "volumeUpdateState" not in vm_status, vm_status
    dest_image = Path(lab.get("pvc", "smig-b")["status"]["imagePath"])
    assert dest_image.parent.parent == lab.root / "node2-local"
    running = qemu_guests(lab, uid)
    assert [n for n, _ in running] == ["node2"], running
    assert [d["path"] for d in running[0][1]["spec"]["disks"]] == [str(dest_image)]
    copied = read_records(source_image).count  # the source image stopped at the switchover
    after = _records_grow(dest_image, copied)  # on the copy, in place, no gap
    text = console(running[0][1])
    assert "DISKERR" not in text and "CORRUPT" not in text, text[-2000:]
    first_on_target = int(HB.findall(text)[0])
    assert last_on_source and first_on_target > last_on_source[-1], (last_on_source, text[:300])
    assert copied < after, (copied, after)
    print(f"disk records: {copied} on the source image, {after} on the destination")
