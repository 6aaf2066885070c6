"""Cross-cluster live migration, the rest of issue 18's "Done when": ``vmferry migrate VM
--to-cluster cluster2 --wait`` with

- a real QEMU guest (driver ``qemu``, the test guest image) in a two-cluster loopback lab:
  the Migration Succeeded, exactly one QEMU of the VM across both clusters (in cluster2),
  its serial console heartbeat goes on there, the verified switchover recorded in the
  sending VMIM's ``migrationState.transfer`` (verifyMode, repairedPages, digestVerified);
- a busy memvm VM in a two-cluster ``--netns`` lab (both clusters' eth1 on one bridge):
  the memory verified, and the migration's bytes took the shared migration network
  (``networkInterface`` eth1, >= 95 % of the source's NIC bytes on eth1, the target's
  address in 198.51.100.0/24).

Each test brings up its own lab (never two at once) and skips, saying why, when QEMU,
the guest image, the sync controllers or network namespaces are missing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_chaos import check_memory
from tests.integration.test_cross_cluster import all_guests
from tests.support.lab import MultiLabHarness, vm_manifest
from vmferry.decentralized import MIGRATED_TO_ANNOTATION
from vmferry.lab import netns
from vmferry.lab.cluster import sync_unavailable_reason
from vmferry.migration_state import Field

Obj = dict[str, Any]
MTV = "openshift-mtv"
SRC, DST = "cluster1", "cluster2"
ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "build" / "guest"
HB = re.compile(r"^HB (\d+) ", re.M)
MIGRATION_NETWORK = ipaddress.IPv4Network("198.51.100.0/24")

pytestmark = pytest.mark.skipif(
    sync_unavailable_reason() is not None,
    reason=f"no sync controllers: {sync_unavailable_reason()}",
)
needs_qemu = [
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed (make install-qemu, as root)",
    ),
    pytest.mark.skipif(
        not (IMAGE / "vmlinuz").is_file() or not (IMAGE / "initrd.img").is_file(),
        reason=f"no guest image in {IMAGE} (make guest-image)",
    ),
]
NETNS_REASON = netns.unsupported_reason()


def lab_of(tmp_path: Path, *, netns_mode: bool) -> Iterator[MultiLabHarness]:
    harness = MultiLabHarness(tmp_path / "xlab")
    try:
        harness.up_clusters(2, nodes=2, memory="2Gi", netns=netns_mode)
        yield harness
    finally:
        harness.down()


@pytest.fixture
def loopback_labs(tmp_path: Path) -> Iterator[MultiLabHarness]:
    yield from lab_of(tmp_path, netns_mode=False)


@pytest.fixture
def netns_labs(tmp_path: Path) -> Iterator[MultiLabHarness]:
    yield from lab_of(tmp_path, netns_mode=True)


# -- helpers ----------------------------------------------------------------------------------


def get_in(labs: MultiLabHarness, cluster: str, kind: str, name: str) -> Obj | None:
    proc = labs.in_cluster(cluster, "get", kind, name, "-o", "json", check=False)
    found: Obj | None = json.loads(proc.stdout) if proc.returncode == 0 else None
    return found


def status_of(obj: Obj | None) -> Obj:
    status: Obj = (obj or {}).get("status") or {}
    return status


def running_in(labs: MultiLabHarness, cluster: str, name: str, timeout: float) -> Obj:
    def running() -> Obj | None:
        vmi = get_in(labs, cluster, "vmi", name)
        return vmi if status_of(vmi).get("phase") == "Running" else None

    found: Obj = labs.wait_for(f"{cluster} VMI {name} Running", running, timeout)
    return found


def migrate_to_cluster2(labs: MultiLabHarness, name: str, timeout: float) -> Obj:
    """``vmferry --context cluster1 migrate NAME --to-cluster cluster2 --wait``: asserts it
    says so, its MTV Migration Succeeded and the source VM is Halted and marked; the sending
    VMIM (its migrationState: the source VMI is gone with its guest)."""
    proc = labs.in_cluster(
        SRC, "migrate", name, "--to-cluster", DST, "--wait", timeout=timeout, check=False
    )
    assert proc.returncode == 0 and f"succeeded: {name} runs on {DST}/default" in proc.stdout, (
        proc.stdout,
        proc.stderr,
        labs.log_tails(),
    )
    migrations = json.loads(
        labs.in_cluster(SRC, "get", "migration", "-n", MTV, "-o", "json").stdout
    )
    mine = [m for m in migrations["items"] if m["metadata"]["name"].startswith(f"{name}-")]
    assert len(mine) == 1 and status_of(mine[0]).get("phase") == "Succeeded", mine
    vmims = json.loads(labs.in_cluster(SRC, "get", "vmim", "-o", "json").stdout)["items"]
    sent = [m for m in vmims if m["spec"].get("vmiName") == name and m["spec"].get("sendTo")]
    assert len(sent) == 1 and status_of(sent[0]).get("phase") == "Succeeded", sent
    vm = labs.get_in(SRC, "vm", name)
    assert vm["spec"]["runStrategy"] == "Halted"
    assert (vm["metadata"].get("annotations") or {})[MIGRATED_TO_ANNOTATION] == (
        f"{DST}/default/{name}"
    )
    return sent[0]


def transfer_of(vmi: Obj) -> Obj:
    state: Obj = status_of(vmi).get("migrationState") or {}
    assert state.get(Field.PEER_CLUSTER) == DST, state
    transfer: Obj = state.get("transfer") or {}
    return transfer


# -- QEMU ---------------------------------------------------------------------------------------


def qemu_vm(name: str) -> Obj:
    return {
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
                        "verify": "repair",
                    },
                }
            },
        },
    }


def qemu_guests(labs: MultiLabHarness, uids: set[str]) -> list[tuple[str, Obj]]:
    """(cluster/node, vm.json) of each live QEMU of these VMIs, on every node of every
    cluster (the node names repeat across clusters: they are other machines)."""
    found = []
    for cluster in labs.multi.clusters():
        lab = labs.cluster(cluster)
        for node in lab.node_names():
            for vm_json in (lab.runtime_dir(node) / "qemu").glob("*/vm.json"):
                if not any(vm_json.parent.name.startswith(uid) for uid in uids):
                    continue
                try:
                    record = json.loads(vm_json.read_text())
                    cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes()
                except (OSError, ValueError, KeyError):
                    continue
                if f"guest={record['vm_id']}".encode() in cmdline:
                    found.append((f"{cluster}/{node}", record))
    return found


def heartbeats(record: Obj) -> list[int]:
    log = Path(record["dir"]) / "console.log"
    return [int(m) for m in HB.findall(log.read_text(errors="replace"))] if log.exists() else []


def kill_every_qemu(labs: MultiLabHarness) -> None:
    """The lab does not know QEMU guests: kill any left (after the VMs are deleted)."""
    for cluster in labs.multi.clusters():
        lab = labs.cluster(cluster)
        for node in lab.node_names():
            for vm_json in (lab.runtime_dir(node) / "qemu").glob("*/vm.json"):
                try:
                    os.kill(int(json.loads(vm_json.read_text())["pid"]), signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass


@pytest.mark.timeout(420)
@needs_qemu[0]
@needs_qemu[1]
def test_qemu_guest_moves_to_cluster2_with_verified_switchover(
    loopback_labs: MultiLabHarness,
) -> None:
    labs = loopback_labs
    name = "xqemu"
    try:
        labs.in_cluster(SRC, "apply", "-f", "-", input=json.dumps(qemu_vm(name)))
        source_uid = running_in(labs, SRC, name, 60)["metadata"]["uid"]
        labs.wait_for(
            "the guest's heartbeats on cluster1",
            lambda: any(len(heartbeats(r)) > 20 for _, r in qemu_guests(labs, {source_uid})),
            timeout=120,
            interval=1,
        )
        sent = migrate_to_cluster2(labs, name, timeout=300)

        # the verified switchover, as the QEMU engine records it (the sending VMIM)
        transfer = transfer_of(sent)
        print(f"{name}: transfer {transfer}")
        assert transfer["verifyMode"] == "repair", transfer
        assert transfer["repairedPages"] >= 0 and transfer["digestVerified"] is True, transfer

        # cluster2 runs it; exactly one QEMU of the VM across both clusters, there
        vmi = running_in(labs, DST, name, 30)
        node = vmi["status"]["nodeName"]
        assert node in labs.cluster(DST).node_names()
        uids = {source_uid, vmi["metadata"]["uid"]}

        def one_qemu() -> list[tuple[str, Obj]] | None:
            found = qemu_guests(labs, uids)
            return found if len(found) == 1 else None

        found = labs.wait_for("exactly one QEMU across both clusters", one_qemu, 30)
        where, record = found[0]
        assert where == f"{DST}/{node}", found
        # its serial console's heartbeat goes on in cluster2
        first = labs.wait_for("heartbeats on cluster2", lambda: heartbeats(record), 15)[0]
        time.sleep(10)
        beats = heartbeats(record)
        assert beats[-1] - first >= 150, f"heartbeat stalled on cluster2: {beats[:3]}…{beats[-3:]}"
        text = (Path(record["dir"]) / "console.log").read_text(errors="replace")
        assert "Kernel panic" not in text and "CORRUPT" not in text, text[-2000:]
        shown = labs.in_cluster(DST, "console-log", name, "--tail", "1").stdout
        assert shown.startswith("HB "), shown
        assert qemu_guests(labs, uids) == found  # and still one
    finally:
        for cluster in (DST, SRC):
            labs.in_cluster(cluster, "delete", "vm", name, check=False, timeout=90)
        kill_every_qemu(labs)


# -- memvm over the shared migration network ----------------------------------------------------


@pytest.mark.timeout(420)
@pytest.mark.skipif(NETNS_REASON is not None, reason=NETNS_REASON or "")
def test_busy_vm_moves_over_the_shared_migration_network(netns_labs: MultiLabHarness) -> None:
    labs = netns_labs
    name = "busy-vm"
    vm = vm_manifest(name, memory="128Mi", dirty_rate="8Mi", hot_set="32Mi", content="random")
    labs.in_cluster(SRC, "apply", "-f", "-", input=vm)
    source_uid = running_in(labs, SRC, name, 60)["metadata"]["uid"]
    time.sleep(2)  # the guest writes for a while before it moves
    sent = migrate_to_cluster2(labs, name, timeout=300)

    state = status_of(sent)["migrationState"]
    transfer = transfer_of(sent)
    print(
        f"{name}: {transfer['wireBytes'] >> 20} MiB on the wire, NIC bytes "
        f"{transfer.get('networkBytes')} in {transfer.get('networkSeconds')}s, "
        f"target {state.get(Field.TARGET_NODE_ADDRESS)}"
    )
    # the memory verified at switchover (the digests match)...
    assert transfer["digestVerified"] is True, transfer
    assert transfer["digest"] == transfer["targetDigest"], transfer
    # ... and it took the shared migration network
    assert ipaddress.IPv4Address(state[Field.TARGET_NODE_ADDRESS]) in MIGRATION_NETWORK, state
    assert transfer["networkInterface"] == "eth1", transfer
    counted = transfer["networkBytes"]
    share = counted.get("eth1", 0) / max(1, sum(counted.values()))
    assert share >= 0.95, counted

    # it runs in cluster2 only, its memory intact
    vmi = running_in(labs, DST, name, 30)
    uids = {source_uid, vmi["metadata"]["uid"]}

    def one_guest() -> list[tuple[str, Obj]] | None:
        found = all_guests(labs, uids)
        return found if len(found) == 1 else None

    guests = labs.wait_for("exactly one guest across both clusters", one_guest, 20)
    where, guest = guests[0]
    assert where == f"{DST}/{vmi['status']['nodeName']}", guests
    check_memory(guest)
