"""QEMU post-copy through vmferry's tunnel (issue 22, part 4), with a real TCG guest.

One 512 MiB guest (memload: 384 MiB filled, dirtied at 32 MiB/s) boots once on node1;
``bandwidthPerMigration: 16Mi`` cannot keep up with it, and ``completionTimeoutPerGiB:
4`` (2 s for this guest) ends pre-copy: the source switches QEMU to post-copy
(``migrate-start-postcopy``) and the guest resumes on the target while QEMU brings the
rest at full speed (post-copy is not capped, as KubeVirt's); some 450 MiB are still on
the source, which keeps post-copy going for 1-2 s here: the tests that cut or kill in it
act on the source handler's hand-off log line (``wait_handed_off``). Then:

- node1 → node2: the migration Succeeds in mode PostCopy, exactly one QEMU is left (on
  node2) and its heartbeat goes on without a CORRUPT page or a panic;
- node2 → node3 through a relay: the migration network is cut in post-copy and restored
  3 s later; both QEMUs pause (postcopy-paused), the source resumes QEMU's migration
  (``migrate`` with ``resume``) on a new tunnel stream, the target runs
  ``migrate-recover``, and the migration Succeeds with one interruption; the guest runs on;
- node3 → node1: the source's handler is killed in post-copy and started again; its
  successor re-adopts QEMU's paused post-copy (vm_postcopy.py, ``QemuPostCopy.rejoin``)
  and recovers it the same way: the migration Succeeds, the guest runs on at node1.

(A restarted *target* handler is not tested here: whether it can take its QEMU up again
depends on timing -- when a vCPU faulted on a missing page holding QEMU's big lock during
the outage, the incoming QEMU's monitor starts no new session; see README.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_qemu_migration import (
    console,
    heartbeats,
    pytestmark,  # noqa: F401  (QEMU and the guest image are required)
    qemu_guests,
)
from tests.support.lab import LabHarness
from tests.support.relay import Relay, migration_relay

NAME = "qpc"
CONFIG: dict[str, Any] = {
    "allowPostCopy": True,
    "completionTimeoutPerGiB": 4,
    "bandwidthPerMigration": "16Mi",
    "progressTimeout": 150,
    "allowAutoConverge": False,
    "postCopyRecoveryWindowSeconds": 60,
}
CUT_SECONDS = 3.0
GAP = re.compile(r"^HB \d+ \d+ ([\d.]+) ", re.M)  # the guest's own gap between heartbeats


def vm_manifest() -> str:
    return json.dumps(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": NAME},
            "spec": {
                "runStrategy": "Always",
                "template": {
                    "spec": {
                        "evictionStrategy": "LiveMigrate",
                        "domain": {"memory": {"guest": "512Mi"}},
                        "qemu": {
                            "cmdline": "console=ttyS0 quiet panic=-1 memload.fill=384 "
                            "memload.rate=32 memload.tick=50",
                            "accelerator": "tcg",
                            "verify": "repair",
                        },
                    }
                },
            },
        }
    )


@pytest.fixture(scope="module")
def relay(lab: LabHarness) -> Iterator[Relay]:
    """node3's migration traffic goes through a relay the test can cut."""
    with migration_relay(lab) as r:
        yield r


@pytest.fixture(scope="module")
def guest(lab: LabHarness, relay: Relay) -> Iterator[str]:
    """The guest, booted on node1 and printing heartbeats; its VMI uid."""
    lab.set_live_migration_config(**CONFIG)
    for node in ("node2", "node3"):
        lab.cli("adm", "cordon", node)
    try:
        lab.apply(vm_manifest())
        uid: str = lab.wait_vmi_running(NAME, timeout=60)["metadata"]["uid"]
    finally:
        for node in ("node2", "node3"):
            lab.cli("adm", "uncordon", node)
    try:
        lab.wait_for(
            "the guest's heartbeats",
            lambda: any(len(heartbeats(r)) > 20 for _, r in qemu_guests(lab, uid)),
            timeout=120,
            interval=1,
        )
        yield uid
    finally:
        lab.cli("delete", "vm", NAME, check=False, timeout=90)
        for node in lab.lab.node_names():
            for vm_json in (lab.lab.runtime_dir(node) / "qemu").glob("*/vm.json"):
                try:
                    os.kill(int(json.loads(vm_json.read_text())["pid"]), signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass


def handoffs(lab: LabHarness, source: str, target: str) -> int:
    """How many post-copy hand-offs to ``target`` the source's handler has logged."""
    text = (lab.lab.log_dir / f"{source}.log").read_text(errors="replace")
    return text.count(f"post-copy: the guest runs on {target}")


def wait_handed_off(lab: LabHarness, source: str, target: str, before: int) -> None:
    """Until the source's handler logged the post-copy hand-off (the guest runs on the
    target, most of its pages still on the source). Read from the log, every 20 ms: post-copy
    lasts only 1-2 s here, so a test that cuts or kills in it acts within tens of ms of the
    hand-off, not a CLI poll later (which missed it in a full run)."""
    lab.wait_for(
        "the post-copy hand-off",
        lambda: handoffs(lab, source, target) > before,
        timeout=90,
        interval=0.02,
    )


def assert_runs_on(lab: LabHarness, vmim: str, uid: str, target: str) -> dict[str, Any]:
    """The migration Succeeded in post-copy; one QEMU left, on ``target``, whose guest's
    heartbeat goes on without a lost page; the transfer status."""
    final = lab.wait_vmim_final(vmim, timeout=150)
    vmi = lab.get("vmi", NAME)
    ms = vmi["status"]["migrationState"]
    assert final["status"]["phase"] == "Succeeded", ms.get("failureReason")
    assert ms["mode"] == "PostCopy"
    assert vmi["status"]["nodeName"] == target
    running = lab.wait_for(
        "the source QEMU to go",
        lambda: found if len(found := qemu_guests(lab, uid)) == 1 else None,
        timeout=30,
    )
    assert [n for n, _ in running] == [target], running
    record = running[0][1]
    first = lab.wait_for("heartbeats on the target", lambda: heartbeats(record), timeout=20)[-1]
    lab.wait_for(
        "the heartbeat to go on",
        lambda: heartbeats(record)[-1] - first >= 40,
        timeout=30,
        interval=0.5,
    )
    text = console(record)
    assert "Kernel panic" not in text and "CORRUPT" not in text, text[-2000:]
    transfer: dict[str, Any] = ms["transfer"]
    gaps = [float(g) for g in GAP.findall(text)]
    print(f"\n{vmim}: guest-seen gap {max(gaps):.0f} ms; {json.dumps(transfer)}")
    return transfer


@pytest.mark.timeout(240)
def test_not_converging_switches_to_post_copy_and_the_guest_runs_on(
    lab: LabHarness, guest: str
) -> None:
    vmim = lab.migrate_to(NAME, "node2")
    lab.wait_post_copy(NAME, timeout=90)
    transfer = assert_runs_on(lab, vmim, guest, "node2")
    assert not transfer.get("postCopyInterruptions")


@pytest.mark.timeout(240)
def test_a_cut_in_post_copy_recovers_on_a_new_tunnel_stream(
    lab: LabHarness, relay: Relay, guest: str
) -> None:
    assert lab.get("vmi", NAME)["status"]["nodeName"] == "node2"  # the first test's target
    before = handoffs(lab, "node2", "node3")
    vmim = lab.migrate_to(NAME, "node3")
    wait_handed_off(lab, "node2", "node3", before)
    relay.cut()
    try:
        time.sleep(CUT_SECONDS)  # the outage itself: nothing to wait for
        assert lab.get("vmim", vmim)["status"]["phase"] == "Running"
    finally:
        relay.restore()
    transfer = assert_runs_on(lab, vmim, guest, "node3")
    assert transfer.get("postCopyInterruptions", 0) >= 1, transfer


@pytest.mark.timeout(240)
def test_a_source_handler_restarted_in_post_copy_takes_it_up_again(
    lab: LabHarness, guest: str
) -> None:
    source, target = "node3", "node1"
    assert lab.get("vmi", NAME)["status"]["nodeName"] == source  # the previous test's target
    before = handoffs(lab, source, target)
    vmim = lab.migrate_to(NAME, target)
    wait_handed_off(lab, source, target, before)
    lab.lab.kill(source)  # SIGKILL
    try:
        time.sleep(1.0)
        assert lab.get("vmim", vmim)["status"]["phase"] == "Running"
    finally:
        lab.lab.start(source)
    transfer = assert_runs_on(lab, vmim, guest, target)
    assert transfer.get("postCopyInterruptions", 0) >= 1, transfer
