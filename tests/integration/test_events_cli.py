"""Issue 21 against a real lab: a failed VM start and a failed migration are explained by
``describe`` alone (Events and a condition), and the kubectl/virtctl habits quoted in the
issue work against the server (global flags, ``get vm,vmi``, ``-w``'s header,
``--dry-run=server``, ``version``, ``pause``/``unpause``, ``stop``/``start``,
``migrate-cancel``)."""

from __future__ import annotations

import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lab import LabHarness, migration_name, vm_manifest

BROKEN_VM = """\
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: broken
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        memory:
          guest: 64Mi
      qemu:
        kernel: /nonexistent/vmlinuz
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("lab")))
    harness.up(nodes=2, memory="2Gi")
    try:
        yield harness
    finally:
        harness.down()


def _describe(lab: LabHarness, *target: str) -> str:
    return lab.cli("describe", *target).stdout


def _event_rows(text: str) -> list[list[str]]:
    """The rows of describe's ``Events:`` table, split on runs of 2+ spaces."""
    rows = text.split("\nEvents:\n", 1)[1].splitlines()[2:]
    return [re.split(r"\s{2,}", row.strip()) for row in rows]


@pytest.mark.timeout(90)
def test_a_vm_that_cannot_start_is_explained_by_describe(lab: LabHarness) -> None:
    lab.apply(BROKEN_VM)
    why = "/nonexistent/vmlinuz does not exist on this node"

    def explained() -> str | None:
        text = _describe(lab, "vmi", "broken")
        return text if "Warning  SyncFailed" in text else None

    text = lab.wait_for("the start failure in describe", explained, timeout=60)
    # The condition, in the Status section...
    conditions = [
        line.split() for line in text.splitlines() if line.strip().startswith("Synchronized")
    ]
    assert conditions and conditions[0][:3] == ["Synchronized", "False", "SyncFailed"], text
    assert why in text.split("Events:")[0]
    # ...and the Warning with the cause, from the handler of the node.
    row = next(r for r in _event_rows(text) if r[1] == "SyncFailed")
    assert row[0] == "Warning" and row[3].startswith("vmferry-handler, node") and why in row[4]
    assert lab.get("vmi", "broken")["status"]["phase"] == "Scheduled"
    placed = next(r for r in _event_rows(text) if r[1] == "Scheduled")
    assert placed[3] == "vmferry-controller"
    assert placed[4].startswith("Successfully assigned default/broken to node")
    vm_text = _describe(lab, "vm", "broken")
    assert (
        "Started the virtual machine by creating the new virtual machine instance broken" in vm_text
    )
    listed = lab.cli("get", "events", "--field-selector", "involvedObject.name=broken,type=Warning")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert len(lines) == 2 and "virtualmachineinstance/broken" in lines[1]
    lab.cli("delete", "vm", "broken")


@pytest.mark.timeout(150)
def test_a_failed_migration_is_explained_by_describe(lab: LabHarness) -> None:
    lab.apply(vm_manifest("mover", memory="64Mi"))
    lab.wait_vmi_running("mover")
    lab.set_live_migration_config(network="no-such-network")
    try:
        out = lab.cli("migrate", "mover")
        assert out.stdout.startswith("VM mover was scheduled to migrate")
        name = migration_name(out.stdout)
        assert lab.wait_vmim_final(name, timeout=60)["status"]["phase"] == "Failed"
    finally:
        lab.set_live_migration_config(network=None)
    cause = "no NetworkAttachmentDefinition of that name"
    failed = next(r for r in _event_rows(_describe(lab, "vmim", name)) if r[1] == "FailedMigration")
    assert failed[0] == "Warning" and failed[3] == "vmferry-controller" and cause in failed[4]
    on_vmi = _event_rows(_describe(lab, "vmi", "mover"))
    assert any(r[1] == "FailedMigration" and cause in r[4] and name in r[4] for r in on_vmi)
    # The next attempt succeeds and says so where the failure was said.
    lab.cli("migrate", "mover", "--wait", timeout=120)
    reasons = [r[1] for r in _event_rows(_describe(lab, "vmi", "mover"))]
    assert reasons[-1] == "Migrated" and "FailedMigration" in reasons


@pytest.mark.timeout(150)
def test_kubectl_and_virtctl_habits_against_the_server(lab: LabHarness) -> None:
    lab.apply(vm_manifest("habits", memory="64Mi"))
    lab.wait_vmi_running("habits")
    for argv in (
        ("-n", "default", "get", "vmi"),
        ("get", "vmi", "-n", "default", "habits"),
        ("get", "vmi", "-o", "wide", "habits"),
    ):
        out = lab.cli(*argv)
        assert out.stdout.splitlines()[0].startswith("NAME "), argv
        assert "habits" in out.stdout, argv
    assert "Name:         habits" in lab.cli("describe", "vmi", "-n", "default", "habits").stdout
    both = lab.cli("get", "vm,vmi", "habits").stdout
    assert "virtualmachine.kubevirt.io/habits" in both
    assert "virtualmachineinstance.kubevirt.io/habits" in both

    # -w on an empty list: the header comes first.
    watch = subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", "get", "vmim", "-w", "-n", "kube-system"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=lab.env,
    )
    try:
        assert watch.stdout is not None
        ready, _, _ = select.select([watch.stdout], [], [], 30)
        assert ready, "no header within 30 s"
        assert watch.stdout.readline().split() == ["NAME", "PHASE", "VMI"]
    finally:
        watch.kill()
        watch.wait(timeout=10)

    manifest = vm_manifest("dry", memory="64Mi")
    out = lab.cli("create", "-f", "-", "--dry-run=server", input=manifest)
    assert out.stdout == "virtualmachine.kubevirt.io/dry created (server dry run)\n"
    gone = lab.cli("get", "vm", "dry", check=False)
    assert gone.returncode == 1
    assert gone.stderr.startswith("Error from server (NotFound): ")
    missing = lab.cli("create", "-f", "/nonexistent/vm.yaml", check=False)
    assert (missing.returncode, missing.stderr) == (
        1,
        'error: the path "/nonexistent/vm.yaml" does not exist\n',
    )

    version = lab.cli("version").stdout.splitlines()
    assert version[0].startswith("Client Version: v") and version[1].startswith("Server Version: v")

    # pause/unpause: the guest stops ticking while the condition says Paused.
    uid = lab.get("vmi", "habits")["metadata"]["uid"]
    assert lab.cli("pause", "vm", "habits").stdout == "VMI habits was scheduled to pause\n"
    lab.wait_for(
        "the Paused condition",
        lambda: any(
            c["type"] == "Paused" and c["status"] == "True" and c["reason"] == "PausedByUser"
            for c in lab.get("vmi", "habits")["status"]["conditions"]
        ),
        timeout=30,
    )
    guest_dir = lab.guests(uid)[0][1]["dir"]
    frozen = lab.console_ticks(guest_dir)
    time.sleep(0.5)
    assert lab.console_ticks(guest_dir) == frozen, "a paused guest does not tick"
    twice = lab.cli("pause", "vmi", "habits", check=False)
    assert twice.stderr == (
        "error: Error pausing VirtualMachineInstance habits: Operation cannot be fulfilled on "
        'virtualmachineinstance.kubevirt.io "habits": VMI is already paused\n'
    )
    assert lab.cli("unpause", "vmi", "habits").stdout == "VMI habits was scheduled to unpause\n"
    lab.wait_for(
        "the guest ticking again", lambda: len(lab.console_ticks(guest_dir)) > len(frozen), 30
    )
    assert "Paused" not in [c["type"] for c in lab.get("vmi", "habits")["status"]["conditions"]]

    cancel = lab.cli("migrate-cancel", "habits", check=False)
    assert (cancel.returncode, cancel.stderr) == (
        1,
        "error: Found no migration to cancel for habits\n",
    )
    assert lab.cli("stop", "habits").stdout == "VM habits was scheduled to stop\n"
    lab.wait_for("the VMI to go", lambda: lab.try_get("vmi", "habits") is None, timeout=60)
    again = lab.cli("stop", "habits", check=False)
    assert again.returncode == 1
    assert again.stderr == (
        "error: Error stopping VirtualMachine Operation cannot be fulfilled on "
        'virtualmachine.kubevirt.io "habits": VM is not running\n'
    )
    assert lab.cli("start", "habits").stdout == "VM habits was scheduled to start\n"
    lab.wait_vmi_running("habits")
    assert "SuccessfulDelete" in _describe(lab, "vm", "habits")
    lab.cli("delete", "vm", "habits")
