"""Heavy workloads (issue 4): a guest dirtying about twice the capped bandwidth.
Without help it cannot converge; auto-converge throttles it; post-copy moves it and
survives a cut migration network."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.lab import LabHarness, migration_name, vm_manifest
from tests.support.relay import Relay, migration_relay

MEMORY = 128 << 20
CAP = "16Mi"  # the guest dirties 32 MiB/s: twice the cap
BASE: dict[str, Any] = {
    "bandwidthPerMigration": CAP,
    "completionTimeoutPerGiB": 150,
    "progressTimeout": 150,
    "allowAutoConverge": False,
    "allowPostCopy": False,
    "postCopyRecoveryWindowSeconds": 600,
}


@pytest.fixture(scope="module")
def relay(lab: LabHarness) -> Iterator[Relay]:
    """node3's migration traffic goes through a relay the tests can cut."""
    with migration_relay(lab) as r:
        yield r


@pytest.fixture(autouse=True)
def heavy_vm(lab: LabHarness) -> Iterator[dict[str, Any]]:
    for node in ("node2", "node3"):
        lab.cli("adm", "cordon", node)
    try:
        lab.apply(vm_manifest("heavy", "128Mi", "32Mi", hot_set="16Mi", content="random"))
        vmi = lab.wait_vmi_running("heavy")
    finally:
        for node in ("node2", "node3"):
            lab.cli("adm", "uncordon", node)
    assert vmi["status"]["nodeName"] == "node1"
    yield vmi
    lab.set_live_migration_config(**BASE | {"bandwidthPerMigration": "0"})
    lab.cli("delete", "vm", "heavy", timeout=60)


def migrate_to_node3(lab: LabHarness) -> str:
    out = lab.cli("migrate", "heavy", "--addedNodeSelector", "vmferry.io/lab-node=3")
    return migration_name(out.stdout)


def console(lab: LabHarness, vmi_uid: str, node: str) -> str:
    for n, guest in lab.guests(vmi_uid):
        if n == node:
            return Path(guest["dir"], "console.log").read_text()
    return ""


def report(name: str, vmi: dict[str, Any], vmim: dict[str, Any]) -> None:
    t = vmi["status"]["migrationState"]["transfer"]
    stamps = {
        p["phase"]: p["phaseTransitionTimestamp"]
        for p in vmim["status"]["phaseTransitionTimestamps"]
    }
    print(
        f"\n{name}: phase {vmim['status']['phase']} first={min(stamps.values())} last={max(stamps.values())} "
        f"downtime(guest)={t.get('guestDowntimeMilliseconds')} ms wire={t.get('wireBytes', 0) / 2**20:.1f} MiB "
        f"({t.get('wireBytes', 0) / MEMORY:.2f} x memory) rounds={t.get('rounds')} throttle={t.get('throttlePercent')} "
        f"stall={t.get('postCopyStallMilliseconds')} ms faults={t.get('postCopyFaults')} "
        f"interruptions={t.get('postCopyInterruptions')}"
    )


@pytest.mark.timeout(120)
def test_without_auto_converge_or_post_copy_the_migration_times_out(
    lab: LabHarness, heavy_vm: dict[str, Any]
) -> None:
    lab.set_live_migration_config(**BASE | {"completionTimeoutPerGiB": 48})  # 6 s for 128 MiB
    vmim = lab.wait_vmim_final(migrate_to_node3(lab), timeout=90)
    assert vmim["status"]["phase"] == "Failed"
    reason = vmim["status"]["migrationState"]["failureReason"]
    assert "not completed after" in reason, reason
    vmi = lab.get("vmi", "heavy")
    report("neither option", vmi, vmim)
    assert vmi["status"]["nodeName"] == "node1" and vmi["status"]["phase"] == "Running"
    assert [n for n, _ in lab.guests(heavy_vm["metadata"]["uid"])] == ["node1"]


@pytest.mark.timeout(180)
def test_auto_converge_throttles_the_guest_until_it_fits(
    lab: LabHarness, heavy_vm: dict[str, Any]
) -> None:
    lab.set_live_migration_config(
        **BASE | {"allowAutoConverge": True, "completionTimeoutPerGiB": 1200}
    )
    vmim = lab.wait_vmim_final(migrate_to_node3(lab), timeout=160)
    vmi = lab.get("vmi", "heavy")
    report("auto-converge", vmi, vmim)
    assert vmim["status"]["phase"] == "Succeeded", vmim["status"]["migrationState"].get(
        "failureReason"
    )
    t = vmi["status"]["migrationState"]["transfer"]
    assert t["throttlePercent"] >= 20 and t["digestVerified"] and t["digest"] == t["targetDigest"]
    assert vmi["status"]["nodeName"] == "node3"
    target_console = lab.wait_for(
        "the target guest", lambda: console(lab, heavy_vm["metadata"]["uid"], "node3")
    )
    assert "throttle" not in target_console, (
        "the throttle is gone once the guest runs on the target"
    )


@pytest.mark.timeout(180)
def test_post_copy_moves_a_guest_that_cannot_converge(
    lab: LabHarness, heavy_vm: dict[str, Any]
) -> None:
    lab.set_live_migration_config(
        **BASE | {"allowPostCopy": True, "completionTimeoutPerGiB": 40}
    )  # 5 s
    vmim = lab.wait_vmim_final(migrate_to_node3(lab), timeout=120)
    vmi = lab.get("vmi", "heavy")
    report("post-copy", vmi, vmim)
    assert vmim["status"]["phase"] == "Succeeded", vmim["status"]["migrationState"].get(
        "failureReason"
    )
    ms = vmi["status"]["migrationState"]
    t = ms["transfer"]
    assert ms["mode"] == "PostCopy" and vmi["status"]["nodeName"] == "node3"
    assert t["digestVerified"] and t["digest"] == t["targetDigest"]
    assert t["wireBytes"] <= 1.2 * MEMORY
    assert t["postCopyStallMilliseconds"] >= 0 and t["postCopyFaults"] >= 1
    log = console(lab, heavy_vm["metadata"]["uid"], "node3")
    during = log.split("resuming in post-copy")[1].split("post-copy complete")[0]
    assert "tick=" in during, "the guest ticked on the target while pages were still arriving"
    assert [n for n, _ in lab.guests(heavy_vm["metadata"]["uid"])] == ["node3"]


def wait_post_copy(lab: LabHarness) -> None:
    lab.wait_for(
        "post-copy to start",
        lambda: (
            (lab.get("vmi", "heavy")["status"].get("migrationState") or {}).get("mode")
            == "PostCopy"
        ),
        timeout=60,
        interval=0.1,
    )


@pytest.mark.timeout(180)
def test_post_copy_survives_a_cut_migration_network(
    lab: LabHarness, heavy_vm: dict[str, Any], relay: Relay
) -> None:
    # A slower cap keeps post-copy running long enough (~10 s) to cut it in the middle.
    lab.set_live_migration_config(
        **BASE
        | {"allowPostCopy": True, "completionTimeoutPerGiB": 40, "bandwidthPerMigration": "4Mi"}
    )
    name = migrate_to_node3(lab)
    wait_post_copy(lab)
    relay.cut()
    time.sleep(4)
    during = lab.get("vmim", name)["status"]
    assert during["phase"] == "Running", f"nothing is destroyed during the cut: {during}"
    relay.restore()
    vmim = lab.wait_vmim_final(name, timeout=120)
    vmi = lab.get("vmi", "heavy")
    report("post-copy, network cut 4 s", vmi, vmim)
    assert vmim["status"]["phase"] == "Succeeded", vmim["status"]["migrationState"].get(
        "failureReason"
    )
    t = vmi["status"]["migrationState"]["transfer"]
    assert t["postCopyInterruptions"] >= 1 and t["digestVerified"]
    assert vmi["status"]["nodeName"] == "node3"


@pytest.mark.timeout(180)
def test_post_copy_cut_beyond_the_recovery_window_fails_and_says_so(
    lab: LabHarness, heavy_vm: dict[str, Any], relay: Relay
) -> None:
    lab.set_live_migration_config(
        **BASE
        | {
            "allowPostCopy": True,
            "completionTimeoutPerGiB": 40,
            "bandwidthPerMigration": "4Mi",
            "postCopyRecoveryWindowSeconds": 3,
        }
    )
    name = migrate_to_node3(lab)
    wait_post_copy(lab)
    cancel = lab.cli("delete", "vmim", name, "--wait=false", check=False)
    assert (
        cancel.returncode == 1 and "post-copy" in cancel.stderr and "lose the VM" in cancel.stderr
    )
    relay.cut()
    try:
        vmim = lab.wait_vmim_final(name, timeout=60)
    finally:
        relay.restore()
    assert vmim["status"]["phase"] == "Failed"
    reason = vmim["status"]["migrationState"]["failureReason"]
    assert "recovery window" in reason and "postCopyRecoveryWindowSeconds" in reason, reason
    print(f"\npost-copy cut beyond the window: {reason}")
