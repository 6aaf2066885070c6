"""Real QEMU guests (TCG) live-migrating through vmferry's tunnel, with verified switchover.

Two guests boot once for the whole module (TCG boots take 15-30 s here): ``qrep``
(verify: repair) and ``qdet`` (verify: detect). Known ground truth on these machines:
QEMU 7.2 under TCG loses a few dirty pages in live migration, and the destination
kernel panics when it resumes on them; repair must make the guest run on, detect must
fail the migration and keep the guest on the source. TCG does not lose pages every
time (five intact migrations in a row happened), so the detect test makes sure of a
difference: it keeps writing into one page of the target's RAM behind QEMU's back.
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

import pytest

from tests.support.lab import LabHarness, migration_name

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "build" / "guest"
HB = re.compile(r"^HB (\d+) ", re.M)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed (make install-qemu, as root)",
    ),
    pytest.mark.skipif(
        not (IMAGE / "vmlinuz").is_file() or not (IMAGE / "initrd.img").is_file(),
        reason=f"no guest image in {IMAGE} (make guest-image)",
    ),
]


def qemu_vm(name: str, verify: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {
                "runStrategy": "Always",
                "template": {
                    "spec": {
                        "evictionStrategy": "LiveMigrate",
                        "domain": {"memory": {"guest": "256Mi"}},
                        "qemu": {
                            "cmdline": "console=ttyS0 quiet panic=-1 memload.fill=128 "
                            "memload.rate=16 memload.tick=50",
                            "accelerator": "tcg",
                            "verify": verify,
                        },
                    }
                },
            },
        }
    )


def qemu_guests(lab: LabHarness, uid: str) -> list[tuple[str, dict]]:
    """(node, vm.json) of each live QEMU of this VMI, on any node."""
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


def heartbeats(record: dict) -> list[int]:
    log = Path(record["dir"]) / "console.log"
    return [int(m) for m in HB.findall(log.read_text(errors="replace"))] if log.exists() else []


def console(record: dict) -> str:
    log = Path(record["dir"]) / "console.log"
    return log.read_text(errors="replace") if log.exists() else ""


def vmim_name(out: str) -> str:
    return migration_name(out)


@pytest.fixture(scope="module")
def guests(lab: LabHarness) -> Iterator[dict[str, str]]:
    """Boot qrep and qdet; {name: vmi uid}. Deletes them and kills any QEMU left at the end."""
    lab.apply(qemu_vm("qrep", "repair"))
    lab.apply(qemu_vm("qdet", "detect"))
    uids = {n: lab.wait_vmi_running(n, timeout=60)["metadata"]["uid"] for n in ("qrep", "qdet")}
    try:
        for name, uid in uids.items():
            lab.wait_for(
                f"{name}'s guest to print heartbeats",
                lambda uid=uid: any(len(heartbeats(r)) > 20 for _, r in qemu_guests(lab, uid)),
                timeout=120,
                interval=1,
            )
        yield uids
    finally:
        # Delete the VMs first: a QEMU merely killed would be restarted by its VM
        # (runStrategy Always) and outlive the lab, which does not know QEMU guests.
        for name in uids:
            lab.cli("delete", "vm", name, check=False, timeout=90)
        for node in lab.lab.node_names():
            for vm_json in (lab.lab.runtime_dir(node) / "qemu").glob("*/vm.json"):
                try:
                    os.kill(int(json.loads(vm_json.read_text())["pid"]), signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass


def _source_runs_on(lab: LabHarness, uid: str, node: str) -> dict:
    running = qemu_guests(lab, uid)
    assert [n for n, _ in running] == [node], running
    record = running[0][1]
    before = heartbeats(record)[-1]
    time.sleep(1.5)
    assert heartbeats(record)[-1] > before, "the guest's heartbeat stopped on the source"
    return record


@pytest.mark.timeout(240)
def test_repair_switchover_guest_runs_on_without_panic(
    lab: LabHarness, guests: dict[str, str]
) -> None:
    uid = guests["qrep"]
    source = lab.get("vmi", "qrep")["status"]["nodeName"]
    out = lab.cli("migrate", "qrep", "--wait", timeout=180)
    assert "succeeded" in out.stdout, out.stdout
    vmi = lab.get("vmi", "qrep")
    target = vmi["status"]["nodeName"]
    assert target != source
    transfer = vmi["status"]["migrationState"]["transfer"]
    assert transfer["verifyMode"] == "repair"
    assert transfer["repairedPages"] >= 0 and transfer["digestVerified"] is True
    print(f"repaired pages: {transfer['repairedPages']}, transfer: {transfer}")
    running = qemu_guests(lab, uid)
    assert [n for n, _ in running] == [target], running  # exactly one QEMU, on the target
    record = running[0][1]
    first = lab.wait_for("heartbeats on the target", lambda: heartbeats(record), timeout=10)[0]
    time.sleep(10)
    beats = heartbeats(record)
    assert beats[-1] - first >= 150, f"heartbeat stalled on the target: {beats[:3]}…{beats[-3:]}"
    text = console(record)
    assert "Kernel panic" not in text and "CORRUPT" not in text, text[-2000:]
    shown = lab.cli("console-log", "qrep", "--tail", "1").stdout
    assert shown.startswith("HB "), shown
    # The migration's source side has fully ended: deleting the VM destroys its QEMU.
    lab.cli("delete", "vm", "qrep", timeout=90)
    lab.wait_for("qrep's QEMU to be destroyed", lambda: qemu_guests(lab, uid) == [], timeout=30)


def _keep_corrupting_target(
    lab: LabHarness, uid: str, source: str, stop: threading.Event, hit: list[str]
) -> None:
    """Stand-in for the pages TCG loses: once the incoming QEMU exists, write random bytes
    into one page of its RAM file every millisecond until ``stop`` -- after QEMU's own
    writes, so the target's memory differs from the source's when it is verified. Only
    the target's copy is touched: the guest never runs on it (detect discards it)."""
    while not stop.is_set():
        targets = [r for n, r in qemu_guests(lab, uid) if n != source]
        if targets:
            break
        time.sleep(0.01)
    else:
        return
    hit.append(targets[0]["ram_path"])
    with open(targets[0]["ram_path"], "r+b", buffering=0) as ram:
        while not stop.is_set():
            ram.seek(1000 * 4096)
            ram.write(os.urandom(4096))
            time.sleep(0.001)


@pytest.mark.timeout(240)
def test_detect_fails_on_mismatch_and_guest_stays_on_source(
    lab: LabHarness, guests: dict[str, str]
) -> None:
    uid = guests["qdet"]
    source = lab.get("vmi", "qdet")["status"]["nodeName"]
    stop, hit = threading.Event(), []
    writer = threading.Thread(
        target=_keep_corrupting_target, args=(lab, uid, source, stop, hit), daemon=True
    )
    writer.start()
    try:
        name = vmim_name(lab.cli("migrate", "qdet").stdout)
        vmim = lab.wait_vmim_final(name, timeout=150)
    finally:
        stop.set()
        writer.join(10)
    assert hit, "the target's QEMU never appeared"
    assert vmim["status"]["phase"] == "Failed", vmim["status"]
    ms = vmim["status"]["migrationState"]
    assert "memory mismatch" in ms["failureReason"] and "pages differ" in ms["failureReason"]
    vmi = lab.get("vmi", "qdet")
    assert vmi["status"]["nodeName"] == source and vmi["status"]["phase"] == "Running"
    lab.wait_for(
        "the target's QEMU to be discarded",
        lambda: [n for n, _ in qemu_guests(lab, uid)] == [source],
        timeout=30,
    )
    record = _source_runs_on(lab, uid, source)
    assert "Kernel panic" not in console(record)


def _start_slow(lab: LabHarness, vm: str) -> tuple[str, str, str]:
    lab.set_live_migration_config(bandwidthPerMigration="8Mi")
    name = vmim_name(lab.cli("migrate", vm).stdout)

    def running() -> dict | None:
        vmim = lab.get("vmim", name)
        done = ((vmim["status"].get("migrationState") or {}).get("transfer") or {}).get(
            "dataProcessedBytes", 0
        )
        return vmim if vmim["status"].get("phase") == "Running" and done > (8 << 20) else None

    ms = lab.wait_for("the migration to be running", running, timeout=60)["status"][
        "migrationState"
    ]
    return name, ms["sourceNode"], ms["targetNode"]


@pytest.mark.timeout(180)
def test_cancel_mid_migration_keeps_source_qemu_and_removes_target(
    lab: LabHarness, guests: dict[str, str]
) -> None:
    uid = guests["qdet"]
    try:
        _name, source, _target = _start_slow(lab, "qdet")
        lab.cli("migrate-cancel", "qdet")
        lab.wait_for(
            "only the source QEMU to remain",
            lambda: [n for n, _ in qemu_guests(lab, uid)] == [source],
            timeout=60,
        )
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
    vmi = lab.get("vmi", "qdet")
    assert vmi["status"]["nodeName"] == source
    _source_runs_on(lab, uid, source)


@pytest.mark.timeout(240)
def test_target_handler_killed_mid_migration_source_guest_keeps_running(
    lab: LabHarness, guests: dict[str, str]
) -> None:
    uid = guests["qdet"]
    try:
        name, source, target = _start_slow(lab, "qdet")
        lab.cli("lab", "kill", target)
        vmim = lab.wait_vmim_final(name, timeout=90)
        assert vmim["status"]["phase"] == "Failed"
        vmi = lab.get("vmi", "qdet")
        assert vmi["status"]["nodeName"] == source and vmi["status"]["phase"] == "Running"
        _source_runs_on_any = [n for n, _ in qemu_guests(lab, uid)]
        assert source in _source_runs_on_any
        record = next(r for n, r in qemu_guests(lab, uid) if n == source)
        before = heartbeats(record)[-1]
        time.sleep(1.5)
        assert heartbeats(record)[-1] > before, "the source guest stopped"
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
        if lab.lab.pid(target) is None:
            lab.cli("lab", "start", target)
    # The restarted target handler re-adopts and discards its half-received QEMU.
    lab.wait_for(
        "the target's incoming QEMU to be cleaned up",
        lambda: [n for n, _ in qemu_guests(lab, uid)] == [source],
        timeout=60,
    )
