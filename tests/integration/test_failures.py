"""Failures mid-migration: nothing is lost, the VM runs on exactly one node."""

from __future__ import annotations

import time

import pytest

from tests.support.lab import LabHarness, migration_name, vm_manifest


def _start_slow_migration(lab: LabHarness, vm: str) -> tuple[str, str, str]:
    """Start a migration capped to 16 MiB/s (128 MiB: ~8 s); return (vmim, source, target)."""
    lab.set_live_migration_config(bandwidthPerMigration="16Mi")
    out = lab.cli("migrate", vm)
    name = migration_name(out.stdout)

    def running() -> dict | None:
        vmim = lab.get("vmim", name)
        ms = vmim["status"].get("migrationState") or {}
        done = (ms.get("transfer") or {}).get("dataProcessedBytes", 0)
        return vmim if vmim["status"]["phase"] == "Running" and done > (16 << 20) else None

    vmim = lab.wait_for("the migration to be running with data sent", running, timeout=60)
    ms = vmim["status"]["migrationState"]
    return name, ms["sourceNode"], ms["targetNode"]


@pytest.mark.timeout(180)
def test_target_handler_killed_mid_migration_leaves_vm_on_source(lab: LabHarness) -> None:
    lab.apply(vm_manifest("victim", memory="128Mi", dirty_rate="4Mi", content="random"))
    uid = lab.wait_vmi_running("victim")["metadata"]["uid"]
    try:
        name, source, target = _start_slow_migration(lab, "victim")
        lab.cli("lab", "kill", target)
        vmim = lab.wait_vmim_final(name, timeout=90)
        assert vmim["status"]["phase"] == "Failed"
        reason = vmim["status"]["migrationState"]["failureReason"]
        assert "target" in reason or "channel" in reason, reason
        vmi = lab.get("vmi", "victim")
        assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == source
        running = [g for g in lab.guests(uid) if g[0] == source]
        assert len(running) == 1, lab.guests(uid)
        ticks = lab.console_ticks(running[0][1]["dir"])
        time.sleep(1.5)
        assert lab.console_ticks(running[0][1]["dir"])[-1] > ticks[-1], "the guest still runs"
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
        if lab.lab.pid(target) is None:
            lab.cli("lab", "start", target)
    # The restarted target cleans up its half-received guest and is usable again.
    lab.wait_for(
        "the target's incoming guest to be cleaned up",
        lambda: [g for g in lab.guests(uid) if g[0] == target] == [],
        timeout=30,
    )
    out = lab.cli("migrate", "victim", "--wait", timeout=120)
    assert "succeeded" in out.stdout
    lab.cli("delete", "vm", "victim")


@pytest.mark.timeout(180)
def test_controller_killed_and_restarted_mid_migration(lab: LabHarness) -> None:
    lab.apply(vm_manifest("survivor", memory="128Mi", dirty_rate="4Mi"))
    uid = lab.wait_vmi_running("survivor")["metadata"]["uid"]
    name, source, target = _start_slow_migration(lab, "survivor")
    lab.cli("lab", "kill", "controller")
    time.sleep(2.0)
    lab.cli("lab", "start", "controller")
    vmim = lab.wait_vmim_final(name, timeout=120)
    phase = vmim["status"]["phase"]
    if phase == "Failed":
        assert vmim["status"]["migrationState"]["failureReason"]
    vmi = lab.get("vmi", "survivor")
    expected = target if phase == "Succeeded" else source
    assert vmi["status"]["nodeName"] == expected
    guests = lab.wait_for("exactly one guest", lambda: (g := lab.guests(uid)) and len(g) == 1 and g)
    assert guests[0][0] == expected
    lab.set_live_migration_config(bandwidthPerMigration="0")
    lab.cli("delete", "vm", "survivor")


@pytest.mark.timeout(120)
def test_controller_kill_9_keeps_every_object_and_resource_version(lab: LabHarness) -> None:
    lab.apply(vm_manifest("durable", memory="32Mi", dirty_rate="0"))
    lab.wait_vmi_running("durable")
    kinds = ["vm", "ns", "hyperconverged"]

    def snapshot() -> dict[str, list[tuple[str, str, str]]]:
        out = {}
        for kind in kinds:
            listing = lab.cli("get", kind, "-A", "-o", "json").stdout
            import json

            out[kind] = sorted(
                (
                    o["metadata"].get("namespace", ""),
                    o["metadata"]["name"],
                    o["metadata"]["resourceVersion"],
                )
                for o in json.loads(listing)["items"]
            )
        return out

    before = snapshot()
    lab.cli("lab", "kill", "controller")
    lab.cli("lab", "start", "controller")
    after = lab.wait_for("the controller to answer", lambda: snapshot(), timeout=30)
    assert after == before
    lab.cli("delete", "vm", "durable")


@pytest.mark.timeout(60)
def test_cancel_running_migration_keeps_vm_on_source(lab: LabHarness) -> None:
    lab.apply(vm_manifest("cancelme", memory="128Mi", dirty_rate="4Mi"))
    uid = lab.wait_vmi_running("cancelme")["metadata"]["uid"]
    try:
        name, source, _ = _start_slow_migration(lab, "cancelme")
        out = lab.cli("migrate-cancel", "cancelme")
        assert out.stdout == "VM cancelme was scheduled to migrate-cancel\n"  # virtctl's words
        lab.wait_for(
            "the VMIM to be deleted", lambda: lab.try_get("vmim", name) is None, timeout=30
        )
        vmi = lab.get("vmi", "cancelme")
        ms = vmi["status"]["migrationState"]
        assert ms["failed"] is True and ms["abortStatus"] == "Succeeded"
        assert vmi["status"]["nodeName"] == source
        guests = lab.wait_for("one guest", lambda: (g := lab.guests(uid)) and len(g) == 1 and g)
        assert guests[0][0] == source
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
    lab.cli("delete", "vm", "cancelme")


@pytest.mark.timeout(120)
def test_handler_restart_keeps_its_guests_running_and_readopts_them(lab: LabHarness) -> None:
    lab.apply(vm_manifest("steady", memory="64Mi", dirty_rate="2Mi"))
    vmi = lab.wait_vmi_running("steady")
    uid, node = vmi["metadata"]["uid"], vmi["status"]["nodeName"]
    [(_, guest)] = lab.guests(uid)
    lab.cli("lab", "kill", node)
    time.sleep(1.5)
    assert [g[1]["pid"] for g in lab.guests(uid)] == [guest["pid"]], (
        "the guest outlives its handler"
    )
    ticks = lab.console_ticks(guest["dir"])
    lab.cli("lab", "start", node)
    lab.wait_for(
        f"{node} Ready again",
        lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in lab.get("no", node, "")["status"]["conditions"]
        ),
    )
    time.sleep(2.5)  # a few reconcile passes of the restarted handler
    vmi = lab.get("vmi", "steady")
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == node
    assert [g[1]["pid"] for g in lab.guests(uid)] == [guest["pid"]], "re-adopted, not restarted"
    assert lab.console_ticks(guest["dir"])[-1] > ticks[-1]
    # The re-adopted guest migrates like any other.
    assert "succeeded" in lab.cli("migrate", "steady", "--wait", timeout=100).stdout
    lab.cli("delete", "vm", "steady")
