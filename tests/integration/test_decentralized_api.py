"""Issue 18 through the CLI in a one-cluster lab: the reference's 12.4.1 feature-gate
command and check, an unknown gate refused, a ``sendTo`` migration refused while the
gate is off, a ``WaitAsReceiver`` VM whose VMI waits, and ``get pod -n openshift-cnv``
listing the controller and the handlers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.lab import LabHarness, vm_manifest

NS = "default"
CNV = "openshift-cnv"
GATE_PATH = "/spec/featureGates/decentralizedLiveMigration"


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("lab")))
    harness.up(nodes=2, memory="1Gi")
    try:
        yield harness
    finally:
        harness.down()


def sending_vmim(name: str, vmi: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "vmiName": vmi,
                "sendTo": {"migrationID": "m1", "connectURL": "127.0.0.1:9443"},
            },
        }
    )


@pytest.mark.timeout(120)
def test_gate_receiver_and_pods_through_the_cli(small_lab: LabHarness) -> None:
    lab = small_lab
    gate = ["get", "hco", "kubevirt-hyperconverged", "-n", CNV, "-o"]
    jsonpath = "jsonpath={.spec.featureGates.decentralizedLiveMigration}"
    assert lab.cli(*gate, jsonpath).stdout.strip() == "false"

    # a sending migration of a running VM: refused while the gate is off
    lab.apply(vm_manifest("src", memory="64Mi", hot_set="8Mi"))
    lab.wait_vmi_running("src")
    refused = lab.cli("create", "-f", "-", input=sending_vmim("send", "src"), check=False)
    assert refused.returncode != 0
    assert "needs the feature gate decentralizedLiveMigration" in refused.stderr

    # 12.4.1 as written
    patch = json.dumps([{"op": "replace", "path": GATE_PATH, "value": True}])
    lab.cli(
        "patch",
        "hyperconverged",
        "kubevirt-hyperconverged",
        "-n",
        CNV,
        "--type",
        "json",
        "-p",
        patch,
    )
    assert lab.cli(*gate, jsonpath).stdout.strip() == "true"
    unknown = json.dumps({"spec": {"featureGates": {"noSuchGate": True}}})
    bad = lab.cli(
        "patch",
        "hco",
        "kubevirt-hyperconverged",
        "-n",
        CNV,
        "--type",
        "merge",
        "-p",
        unknown,
        check=False,
    )
    assert bad.returncode != 0
    assert 'unknown feature gate "noSuchGate"' in bad.stderr
    assert "decentralizedLiveMigration" in bad.stderr  # the known gates are listed

    # the receiving VM's VMI waits: never scheduled
    receiver = json.loads(vm_manifest("dst", memory="64Mi", hot_set="8Mi"))
    receiver["spec"]["runStrategy"] = "WaitAsReceiver"
    receiver["metadata"]["annotations"] = {"kubevirt.io/restore-run-strategy": "Always"}
    lab.apply(json.dumps(receiver))
    lab.wait_for(
        "the receiving VM waiting",
        lambda: (
            ((lab.try_get("vm", "dst") or {}).get("status") or {}).get("printableStatus")
            == "WaitingForReceiver"
        ),
        timeout=30,
    )
    vmi = lab.get("vmi", "dst")
    assert vmi["status"]["phase"] == "WaitingForSync"
    assert not vmi["status"].get("nodeName")
    assert "WaitingForSync" in lab.cli("get", "vmi", "dst").stdout

    # the daemons as pods (12.4.1's verification: `get -n openshift-cnv pod | grep
    # virt-synchronization`), with a sync controller's Lease written as one renews it
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "virt-synchronization-controller-t1", "namespace": CNV},
        "spec": {"holderIdentity": "t1", "leaseDurationSeconds": 60, "renewTime": now},
    }
    lab.apply(json.dumps(lease))
    table = lab.cli("get", "-n", CNV, "pod").stdout
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert any(name.startswith("virt-controller-") for name in rows)
    assert rows["virt-synchronization-controller-t1"][1:4] == ["1/1", "Running", "0"]
    nodes = json.loads(lab.cli("get", "nodes", "-o", "json").stdout)["items"]
    for node in nodes:
        row = rows[f"virt-handler-{node['metadata']['name']}"]
        assert row[1:4] == ["1/1", "Running", "0"]
    wide = lab.cli("get", "pod", "-A", "-o", "wide").stdout
    assert wide.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    denied = lab.cli("delete", "pod", next(iter(rows)), "-n", CNV, check=False)
    assert denied.returncode != 0
    assert "read-only views of its daemons" in denied.stderr
