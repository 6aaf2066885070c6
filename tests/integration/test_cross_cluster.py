"""Cross-cluster live migration end to end (issue 18) in a two-cluster loopback lab
(``vmferry lab up --clusters 2 --nodes 2``: the lab enables both feature gates and makes
each cluster a Provider in the other):

- the two VMIMs by hand (reference 12.4-12.5): both Succeeded through Synchronizing /
  WaitingForSync, the guest runs on cluster2 with its memory intact and its console
  ticking, exactly one guest process of the VM across both clusters, the source VM
  Halted and marked, the receiving VM's runStrategy restored;
- ``vmferry migrate VM --to-cluster cluster2 --wait`` (the MTV path);
- refusals: a peer whose CA is not registered; deleting the receiving VMIM cancels both;
- the reference's 12.4.1 and 12.4.2 commands and checks as written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_chaos import check_memory
from tests.support.lab import MultiLabHarness, vm_manifest
from vmferry.decentralized import (
    MIGRATED_TO_ANNOTATION,
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
)
from vmferry.lab.cluster import sync_unavailable_reason

Obj = dict[str, Any]
CNV = "openshift-cnv"
MTV = "openshift-mtv"
HCO = "kubevirt-hyperconverged"
SRC, DST = "cluster1", "cluster2"
VMIM = "vmim"

pytestmark = pytest.mark.skipif(
    sync_unavailable_reason() is not None,
    reason=f"no sync controllers: {sync_unavailable_reason()}",
)


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiLabHarness]:
    harness = MultiLabHarness(Path(tmp_path_factory.mktemp("xcluster")))
    try:
        out = harness.up_clusters(2, nodes=2, memory="1Gi").stdout
        # the lab enabled the gates and registered the providers, and said so
        for cluster, peer in ((SRC, DST), (DST, SRC)):
            assert (
                f"{cluster}: enabled decentralizedLiveMigration, feature_ocp_live_migration; "
                f"providers in openshift-mtv: {peer} (https://127.0.0.1:" in out
            ), out
        yield harness
    finally:
        harness.down()


# -- helpers ----------------------------------------------------------------------------------


def busy_vm(name: str) -> Obj:
    """A memvm VM whose memory check_memory can verify (content random, small hot set)."""
    vm: Obj = json.loads(
        vm_manifest(name, memory="64Mi", dirty_rate="4Mi", hot_set="16Mi", content="random")
    )
    return vm


def receiving_copy(vm: Obj) -> Obj:
    copy: Obj = json.loads(json.dumps(vm))
    copy["spec"]["runStrategy"] = RUN_STRATEGY_WAIT_AS_RECEIVER
    copy["metadata"]["annotations"] = {RESTORE_RUN_STRATEGY_ANNOTATION: "Always"}
    return copy


def apply_in(labs: MultiLabHarness, cluster: str, obj: Obj) -> None:
    labs.in_cluster(cluster, "apply", "-f", "-", input=json.dumps(obj))


def vmim(name: str, vmi: str, *, receive: str = "", send: str = "", url: str = "") -> Obj:
    spec: Obj = {"vmiName": vmi}
    if receive:
        spec["receive"] = {"migrationID": receive}
    else:
        spec["sendTo"] = {"migrationID": send, "connectURL": url}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name},
        "spec": spec,
    }


def try_get_in(
    labs: MultiLabHarness, cluster: str, kind: str, name: str, ns: str = "default"
) -> Obj | None:
    proc = labs.in_cluster(cluster, "get", kind, name, "-n", ns, "-o", "json", check=False)
    found: Obj | None = json.loads(proc.stdout) if proc.returncode == 0 else None
    return found


def phase_of(obj: Obj | None) -> str:
    return str(((obj or {}).get("status") or {}).get("phase") or "")


def wait_phase(
    labs: MultiLabHarness, cluster: str, kind: str, name: str, phases: set[str], timeout: float
) -> Obj:
    def reached() -> Obj | None:
        obj = try_get_in(labs, cluster, kind, name)
        return obj if phase_of(obj) in phases else None

    found: Obj = labs.wait_for(f"{cluster} {kind} {name} in {sorted(phases)}", reached, timeout)
    return found


def phases_seen(obj: Obj) -> list[str]:
    return [p["phase"] for p in (obj.get("status") or {}).get("phaseTransitionTimestamps") or []]


def sync_address(labs: MultiLabHarness, cluster: str) -> str:
    hco = labs.get_in(cluster, "hyperconverged", HCO, CNV)
    addresses = (hco.get("status") or {}).get("synchronizationAddresses") or []
    assert addresses, f"{cluster} publishes no synchronizationAddresses: {hco.get('status')}"
    return str(addresses[0])


def start_vm(labs: MultiLabHarness, cluster: str, vm: Obj) -> Obj:
    apply_in(labs, cluster, vm)
    return wait_phase(labs, cluster, "vmi", vm["metadata"]["name"], {"Running"}, 60)


def all_guests(labs: MultiLabHarness, uids: set[str]) -> list[tuple[str, Obj]]:
    """(cluster/node, vm.json) of every live guest process of these VMIs, on every node of
    every cluster (the node names repeat across clusters: they are other machines)."""
    found = []
    for cluster in labs.multi.clusters():
        lab = labs.cluster(cluster)
        for node in lab.node_names():
            for vm_json in (lab.runtime_dir(node) / "guests").glob("*/vm.json"):
                if not any(vm_json.parent.name.startswith(uid) for uid in uids):
                    continue
                try:
                    record = json.loads(vm_json.read_text())
                    os.kill(int(record["pid"]), 0)
                    stat = Path(f"/proc/{record['pid']}/stat").read_text()
                except (OSError, ValueError, KeyError):
                    continue
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                found.append((f"{cluster}/{node}", {**record, "dir": str(vm_json.parent)}))
    return found


def failure_text(obj: Obj) -> str:
    status = obj.get("status") or {}
    state = status.get("migrationState") or {}
    conds = " ".join(str(c.get("message") or "") for c in status.get("conditions") or [])
    return f"{status.get('reason', '')} {state.get('failureReason', '')} {conds}"


# -- a. the two VMIMs by hand -------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_two_vmims_move_the_guest_to_cluster2(labs: MultiLabHarness) -> None:
    vm = busy_vm("xvm")
    source_vmi = start_vm(labs, SRC, vm)
    source_uid = source_vmi["metadata"]["uid"]
    apply_in(labs, DST, receiving_copy(vm))
    waiting = wait_phase(labs, DST, "vmi", "xvm", {"WaitingForSync"}, 30)
    receiving_uid = waiting["metadata"]["uid"]
    assert not waiting["status"].get("nodeName")
    apply_in(labs, DST, vmim("xvm-in", "xvm", receive="m-xvm"))
    wait_phase(labs, DST, VMIM, "xvm-in", {"WaitingForSync"}, 30)
    time.sleep(2)  # the guest writes for a while before it moves
    apply_in(labs, SRC, vmim("xvm-out", "xvm", send="m-xvm", url=sync_address(labs, DST)))

    final = {"Succeeded", "Failed"}
    sent = wait_phase(labs, SRC, VMIM, "xvm-out", final, 90)
    received = wait_phase(labs, DST, VMIM, "xvm-in", final, 30)
    assert phase_of(sent) == "Succeeded", (sent.get("status"), labs.log_tails())
    assert phase_of(received) == "Succeeded", (received.get("status"), labs.log_tails())
    assert "Synchronizing" in phases_seen(sent), phases_seen(sent)
    assert "WaitingForSync" in phases_seen(received), phases_seen(received)

    # the guest runs on a cluster2 node, the receiving VMI says so
    vmi = wait_phase(labs, DST, "vmi", "xvm", {"Running"}, 30)
    assert vmi["status"]["nodeName"] in labs.cluster(DST).node_names()
    assert vmi["status"]["migrationState"]["role"] == "receiver"
    # cluster1: the VM halted and marked; cluster2: the VM's runStrategy restored
    source_vm = labs.get_in(SRC, "vm", "xvm")
    assert source_vm["spec"]["runStrategy"] == "Halted"
    assert (source_vm["metadata"].get("annotations") or {})[MIGRATED_TO_ANNOTATION] == (
        f"{DST}/default/xvm"
    )

    def restored() -> Obj | None:
        dst_vm = labs.get_in(DST, "vm", "xvm")
        annotations = dst_vm["metadata"].get("annotations") or {}
        done = dst_vm["spec"].get("runStrategy") == "Always"
        return dst_vm if done and RESTORE_RUN_STRATEGY_ANNOTATION not in annotations else None

    labs.wait_for("the receiving VM's runStrategy restored", restored, 15)

    # exactly one guest process of the VM, in cluster2, on the node the VMI names
    def one_guest() -> list[tuple[str, Obj]] | None:
        guests = all_guests(labs, {source_uid, receiving_uid})
        return guests if len(guests) == 1 else None

    guests = labs.wait_for("exactly one guest across both clusters", one_guest, 20)
    where, guest = guests[0]
    assert where == f"{DST}/{vmi['status']['nodeName']}", guests
    check_memory(guest)
    ticks = labs.console_ticks(guest["dir"])
    labs.wait_for(
        "the console ticking on cluster2",
        lambda: max(labs.console_ticks(guest["dir"]) or [0]) > max(ticks or [0]),
        15,
    )


# -- b. the MTV path ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_migrate_to_cluster_moves_a_second_vm(labs: MultiLabHarness) -> None:
    start_vm(labs, SRC, busy_vm("yvm"))
    proc = labs.in_cluster(SRC, "migrate", "yvm", "--to-cluster", DST, "--wait", timeout=100)
    assert "succeeded: yvm runs on cluster2/default" in proc.stdout, proc.stdout
    migrations = json.loads(
        labs.in_cluster(SRC, "get", "migration", "-n", MTV, "-o", "json").stdout
    )
    mine = [m for m in migrations["items"] if m["metadata"]["name"].startswith("yvm-")]
    assert len(mine) == 1 and phase_of(mine[0]) == "Succeeded", mine
    vmi = wait_phase(labs, DST, "vmi", "yvm", {"Running"}, 30)
    assert vmi["status"]["nodeName"] in labs.cluster(DST).node_names()
    assert labs.get_in(SRC, "vm", "yvm")["spec"]["runStrategy"] == "Halted"


# -- c. refusals --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_unregistered_peer_ca_is_refused(labs: MultiLabHarness) -> None:
    ca = labs.cluster(DST).pki_dir / "ca.crt"
    labs.in_cluster(SRC, "adm", "peer", "remove", DST)
    labs.in_cluster(
        SRC, "patch", "hyperconverged", HCO, "-n", CNV, "--type", "merge",
        "-p", json.dumps({"spec": {"liveMigrationConfig": {"unschedulableTimeoutSeconds": 6}}}),
    )  # fmt: skip
    try:
        vm = busy_vm("zvm")
        start_vm(labs, SRC, vm)
        apply_in(labs, DST, receiving_copy(vm))
        apply_in(labs, DST, vmim("zvm-in", "zvm", receive="m-zvm"))
        apply_in(labs, SRC, vmim("zvm-out", "zvm", send="m-zvm", url=sync_address(labs, DST)))
        failed = wait_phase(labs, SRC, VMIM, "zvm-out", {"Failed", "Succeeded"}, 45)
        assert phase_of(failed) == "Failed", failed.get("status")
        text = failure_text(failed)
        assert "no registered peer CA" in text, text
        assert phase_of(labs.get_in(SRC, "vmi", "zvm")) == "Running"
        assert len(all_guests(labs, {labs.get_in(SRC, "vmi", "zvm")["metadata"]["uid"]})) == 1
    finally:
        labs.in_cluster(SRC, "adm", "peer", "add", DST, "--ca", str(ca))
        labs.in_cluster(
            SRC, "patch", "hyperconverged", HCO, "-n", CNV, "--type", "merge",
            "-p", json.dumps({"spec": {"liveMigrationConfig": {"unschedulableTimeoutSeconds": None}}}),
        )  # fmt: skip
        labs.in_cluster(DST, "delete", VMIM, "zvm-in", check=False)
        labs.in_cluster(DST, "delete", "vm", "zvm", check=False)


@pytest.mark.timeout(90)
def test_deleting_the_receiving_vmim_cancels_both(labs: MultiLabHarness) -> None:
    vm = busy_vm("cvm")
    source_uid = start_vm(labs, SRC, vm)["metadata"]["uid"]
    nodes = labs.cluster(DST).node_names()
    for node in nodes:  # cluster2 cannot place a target: the sender stays Synchronizing
        labs.in_cluster(DST, "adm", "cordon", node)
    try:
        apply_in(labs, DST, receiving_copy(vm))
        apply_in(labs, DST, vmim("cvm-in", "cvm", receive="m-cvm"))
        apply_in(labs, SRC, vmim("cvm-out", "cvm", send="m-cvm", url=sync_address(labs, DST)))
        wait_phase(labs, SRC, VMIM, "cvm-out", {"Synchronizing"}, 30)
        time.sleep(1)
        assert phase_of(try_get_in(labs, SRC, VMIM, "cvm-out")) == "Synchronizing"
        labs.in_cluster(DST, "delete", VMIM, "cvm-in")
        sent = wait_phase(labs, SRC, VMIM, "cvm-out", {"Failed", "Succeeded"}, 30)
        assert phase_of(sent) == "Failed", sent.get("status")
        assert "cancel" in failure_text(sent).lower(), failure_text(sent)
        labs.wait_for(
            "the receiving VMIM gone",
            lambda: try_get_in(labs, DST, VMIM, "cvm-in") is None,
            15,
        )
    finally:
        for node in nodes:
            labs.in_cluster(DST, "adm", "uncordon", node)
    vmi = labs.get_in(SRC, "vmi", "cvm")
    assert phase_of(vmi) == "Running"
    assert vmi["status"]["nodeName"] in labs.cluster(SRC).node_names()
    guests = all_guests(labs, {source_uid})
    assert [where for where, _ in guests] == [f"{SRC}/{vmi['status']['nodeName']}"]
    assert labs.get_in(SRC, "vm", "cvm")["spec"]["runStrategy"] == "Always"


# -- d. the reference's commands ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reference_12_4_commands_as_written(labs: MultiLabHarness) -> None:
    for cluster in (SRC, DST):
        # 12.4.1
        labs.in_cluster(
            cluster, "patch", "hyperconverged", HCO, "-n", CNV, "--type", "json",
            "-p", '[{"op":"replace", "path": "/spec/featureGates/decentralizedLiveMigration", '
            '"value": true}]',
        )  # fmt: skip
        gates = labs.get_in(cluster, "hyperconverged", HCO, CNV)["spec"]["featureGates"]
        assert gates["decentralizedLiveMigration"] is True
        pods = labs.in_cluster(cluster, "get", "-n", CNV, "pod").stdout
        rows = [line.split() for line in pods.splitlines() if "virt-synchronization" in line]
        assert rows and all(r[1:4] == ["1/1", "Running", "0"] for r in rows), pods
        # 12.4.2
        labs.in_cluster(
            cluster, "patch", "ForkliftController", "forklift-controller", "-n", MTV,
            "--type", "json",
            "-p", '[{"op": "add", "path": "/spec/feature_ocp_live_migration", "value": "true"}]',
        )  # fmt: skip
        out = labs.in_cluster(
            cluster, "get", "ForkliftController", "forklift-controller", "-n", MTV, "-o", "yaml"
        ).stdout
        assert "feature_ocp_live_migration: 'true'" in out or (
            'feature_ocp_live_migration: "true"' in out
        ), out
