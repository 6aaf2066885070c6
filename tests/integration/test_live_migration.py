"""A VM whose guest keeps writing memory migrates; every phase, the digest, the
guest's heartbeat and the one-node invariant are checked from outside."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.lab import MIGRATION_PHASES, LabHarness, migration_name, vm_manifest


@pytest.mark.timeout(180)
def test_vm_under_write_load_migrates_with_verified_memory(lab: LabHarness) -> None:
    lab.apply(vm_manifest("writer", memory="128Mi", dirty_rate="16Mi", hot_set="32Mi"))
    vmi = lab.wait_vmi_running("writer")
    uid, source = vmi["metadata"]["uid"], vmi["status"]["nodeName"]
    [(node, before)] = lab.guests(uid)
    assert node == source
    time.sleep(1.0)  # let the guest dirty memory for a while
    ticks_before = lab.console_ticks(before["dir"])
    assert ticks_before, "the guest prints a heartbeat"

    out = lab.cli("migrate", "writer", "--wait", timeout=150)
    assert "succeeded" in out.stdout
    name = migration_name(out.stdout)
    vmim = lab.get("vmim", name)
    status = vmim["status"]
    assert status["phase"] == "Succeeded"
    assert [p["phase"] for p in status["phaseTransitionTimestamps"]] == MIGRATION_PHASES
    stamps = [p["phaseTransitionTimestamp"] for p in status["phaseTransitionTimestamps"]]
    assert stamps == sorted(stamps)

    vmi = lab.get("vmi", "writer")
    ms = vmi["status"]["migrationState"]
    target = ms["targetNode"]
    assert ms["sourceNode"] == source and target != source
    assert vmi["status"]["nodeName"] == target
    assert ms["completed"] is True and not ms.get("failed")
    assert ms["mode"] == "PreCopy" and ms["switchover"] == "Committed"
    assert (
        ms["startTimestamp"]
        and ms["endTimestamp"]
        and ms["targetNodeAddress"].startswith("127.0.1.")
    )
    transfer = ms["transfer"]
    assert transfer["digestVerified"] is True
    assert transfer["digest"] == transfer["targetDigest"] and len(transfer["digest"]) == 64
    assert transfer["rounds"] >= 2  # the guest dirtied memory during round 0
    assert transfer["dataProcessedBytes"] >= 128 << 20
    assert transfer["guestDowntimeMilliseconds"] > 0
    assert vmim["status"]["migrationState"]["targetNode"] == target
    assert "token" not in vmim["status"]["migrationState"], (
        "the per-migration secret stays in the VMI"
    )

    # Exactly one guest: on the target, ticking on from where the source stopped.
    guests = lab.wait_for(
        "the source guest to be gone", lambda: (g := lab.guests(uid)) and len(g) == 1 and g
    )
    [(node, after)] = guests
    assert node == target
    assert not Path(before["dir"]).exists(), "the source guest was destroyed"
    time.sleep(1.5)
    source_last = ticks_before[-1]  # the source's runtime dir is gone now
    target_ticks = lab.console_ticks(after["dir"])
    assert target_ticks and target_ticks[0] > source_last, "the tick counter migrated with memory"
    assert target_ticks == sorted(target_ticks) and len(target_ticks) >= 2, (
        "the guest runs on the target"
    )
    lab.cli("delete", "vm", "writer")


@pytest.mark.timeout(120)
def test_migration_back_and_forth_keeps_one_guest(lab: LabHarness) -> None:
    lab.apply(vm_manifest("pingpong", memory="64Mi", dirty_rate="4Mi"))
    uid = lab.wait_vmi_running("pingpong")["metadata"]["uid"]
    nodes = []
    for _ in range(2):
        lab.cli("migrate", "pingpong", "--wait", timeout=100)
        vmi = lab.get("vmi", "pingpong")
        nodes.append(vmi["status"]["nodeName"])
        guests = lab.wait_for("one guest", lambda: (g := lab.guests(uid)) and len(g) == 1 and g)
        assert guests[0][0] == vmi["status"]["nodeName"]
    assert nodes[0] != nodes[1]
    migrations = lab.cli("get", "vmim", "-o", "jsonpath={.items[*].status.phase}").stdout.split()
    assert migrations.count("Succeeded") >= 2
    lab.cli("delete", "vm", "pingpong")
    lab.wait_for("the guest to be destroyed", lambda: not lab.guests(uid))


@pytest.mark.timeout(60)
def test_second_migration_of_the_same_vm_is_refused_while_one_runs(lab: LabHarness) -> None:
    lab.apply(vm_manifest("busy", memory="64Mi"))
    lab.wait_vmi_running("busy")
    lab.set_live_migration_config(bandwidthPerMigration="8Mi")
    try:
        lab.cli("migrate", "busy")
        second = lab.cli("migrate", "busy", check=False)
        assert second.returncode == 1
        assert "in-flight migration detected" in second.stderr
    finally:
        lab.cli("migrate-cancel", "busy", check=False)
        lab.set_live_migration_config(bandwidthPerMigration="0")
    lab.cli("delete", "vm", "busy")


@pytest.mark.timeout(60)
def test_migrating_a_missing_vm_is_an_error_naming_it(lab: LabHarness) -> None:
    out = lab.cli("migrate", "no-such-vm", check=False)
    assert out.returncode == 1
    assert 'VirtualMachineInstance "no-such-vm" does not exist' in out.stderr
