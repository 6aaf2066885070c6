"""Post-copy under faults (issue 25, items 3 and 4), on a real lab.

The repro of the issue: a 256 MiB text guest dirtying 8 MiB/s, 16 MiB/s of bandwidth and
``completionTimeoutPerGiB: 4`` (1 s), so the migration goes post-copy almost at once with
most of the memory still on the source. A handler killed (``kill -9``, by a failpoint
right after the first post-copy batch) and restarted 2 s later must resume post-copy: the
migration Succeeds, exactly one guest runs, on the node the VMI names, and every page of
its memory carries its own stamp (a page that never arrived is zeros). A migration network
cut beyond postCopyRecoveryWindowSeconds loses the VM: the VMIM and the VMI are Failed with
a reason and no guest is left anywhere.

The guest is a bare VMI (no VM): a Failed VMI stays as it ended, for the assertions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.lab import LabHarness, vm_manifest
from tests.support.relay import Relay, migration_relay
from vmferry.failpoints import Step

NAME = "pcf"
MEMORY = "256Mi"
REPETITIONS = int(os.environ.get("CHAOS_REPS", "1"))  # runs of each scenario; make chaos: 20
CONFIG: dict[str, Any] = {
    "allowPostCopy": True,
    "completionTimeoutPerGiB": 4,
    "bandwidthPerMigration": "16Mi",
    "progressTimeout": 150,
    "allowAutoConverge": False,
    "postCopyRecoveryWindowSeconds": 60,
}
RESTART_DELAY = 2.0  # s between the kill and the restart (the repro)
STAMP = np.dtype([("tick", "<u8"), ("index", "<u8")])


def vmi_manifest() -> str:
    vm = json.loads(vm_manifest(NAME, MEMORY, "8Mi", hot_set="32Mi", content="text"))
    template = vm["spec"]["template"]
    return json.dumps(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": NAME},
            "spec": template["spec"],
        }
    )


@pytest.fixture(scope="module")
def relay(lab: LabHarness) -> Iterator[Relay]:
    """node3's migration traffic goes through a relay the tests can cut."""
    with migration_relay(lab) as r:
        yield r


def restart(lab: LabHarness, node: str, failpoint: Step | None = None) -> None:
    """Stop ``node``'s handler (its guests stay) and start it, armed with ``failpoint``; it
    serves again before this returns."""
    lab.restart(node, failpoint.value if failpoint else "", signal="TERM")


@pytest.fixture
def guest(lab: LabHarness) -> Iterator[dict[str, Any]]:
    """The guest, running on node1."""
    lab.set_live_migration_config(**CONFIG)
    for node in ("node2", "node3"):
        lab.cli("adm", "cordon", node)
    try:
        lab.apply(vmi_manifest())
        vmi = lab.wait_vmi_running(NAME)
    finally:
        for node in ("node2", "node3"):
            lab.cli("adm", "uncordon", node)
    assert vmi["status"]["nodeName"] == "node1"
    yield vmi
    lab.cli("delete", "vmi", NAME, timeout=60, check=False)
    lab.wait_for("the VMI to go", lambda: lab.try_get("vmi", NAME) is None, timeout=60)


def check_memory(guest_json: dict[str, Any]) -> None:
    """Every page but page 0 (the CPU state) carries its own index in its stamp, with a
    tick the guest has reached: a page lost on the way would be zeros, a page landed
    at the wrong place would carry another index."""
    ram = np.fromfile(Path(guest_json["ram_path"]), dtype=np.uint8)
    page_size = int(guest_json["spec"].get("page_size", 4096))
    pages = ram.reshape(-1, page_size)
    stamps = pages[1:, :16].copy().view(STAMP).ravel()
    expected = np.arange(1, len(pages), dtype=np.uint64)
    wrong = np.flatnonzero(stamps["index"] != expected)
    assert not wrong.size, (
        f"{wrong.size} pages do not carry their own stamp (first: page {int(wrong[0]) + 1}, "
        f"stamp {stamps[wrong[0]]})"
    )
    assert int(stamps["tick"].max()) < 2**40, "a stamp with an impossible tick"


def assert_moved(lab: LabHarness, vmim_name: str, vmi_uid: str, target: str) -> None:
    vmim = lab.wait_vmim_final(vmim_name, timeout=150)
    vmi = lab.get("vmi", NAME)
    ms = vmi["status"]["migrationState"]
    assert vmim["status"]["phase"] == "Succeeded", ms.get("failureReason")
    assert ms["mode"] == "PostCopy"
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == target

    def one_guest() -> list[tuple[str, dict[str, Any]]] | None:
        found = lab.guests(vmi_uid)
        return found if len(found) == 1 else None

    guests = lab.wait_for("the source guest to go", one_guest, timeout=30)
    assert [n for n, _ in guests] == [target]
    check_memory(guests[0][1])
    print(
        f"\n{vmim_name}: post-copy interruptions "
        f"{ms['transfer'].get('postCopyInterruptions')}, faults {ms['transfer'].get('postCopyFaults')}"
    )


def kill_in_post_copy(lab: LabHarness, guest: dict[str, Any], victim: str, step: Step) -> None:
    restart(lab, victim, step)
    name = lab.migrate_to(NAME, "node2")
    lab.wait_for(
        f"the failpoint {step} to kill {victim}",
        lambda: lab.lab.pid(victim) is None,
        timeout=90,
        interval=0.1,
    )
    time.sleep(RESTART_DELAY)
    assert lab.get("vmim", name)["status"]["phase"] == "Running"
    lab.cli("lab", "start", victim)
    assert_moved(lab, name, guest["metadata"]["uid"], "node2")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", range(REPETITIONS))
def test_source_killed_in_post_copy_resumes_and_succeeds(
    lab: LabHarness, guest: dict[str, Any], run: int
) -> None:
    kill_in_post_copy(lab, guest, "node1", Step.SOURCE_POSTCOPY)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", range(REPETITIONS))
def test_target_killed_in_post_copy_resumes_and_succeeds(
    lab: LabHarness, guest: dict[str, Any], run: int
) -> None:
    kill_in_post_copy(lab, guest, "node2", Step.TARGET_POSTCOPY)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", range(REPETITIONS))
def test_cut_beyond_the_recovery_window_fails_the_vm_and_says_so(
    lab: LabHarness, relay: Relay, guest: dict[str, Any], run: int
) -> None:
    lab.set_live_migration_config(**CONFIG | {"postCopyRecoveryWindowSeconds": 3})
    name = lab.migrate_to(NAME, "node3")
    lab.wait_post_copy(NAME, timeout=60)
    relay.cut()
    try:
        vmim = lab.wait_vmim_final(name, timeout=90)
    finally:
        relay.restore()
    assert vmim["status"]["phase"] == "Failed"
    reason = vmim["status"]["migrationState"]["failureReason"]
    assert "recovery window" in reason and "postCopyRecoveryWindowSeconds" in reason, reason
    uid = guest["metadata"]["uid"]
    vmi = lab.wait_for(
        "the VMI to say it failed",
        lambda: v if (v := lab.get("vmi", NAME))["status"]["phase"] == "Failed" else None,
        timeout=30,
    )
    assert vmi["metadata"]["uid"] == uid
    assert vmi["status"]["reason"] == "PostCopyFailed"
    ready = [c for c in vmi["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "False"
    lab.wait_for("no guest left anywhere", lambda: lab.guests(uid) == [], timeout=30)
    print(f"\ncut beyond the window: {reason}")
