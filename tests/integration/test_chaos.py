"""Fault injection at each step of the pre-copy switchover (issue 25).

For each failpoint of ``vmferry.failpoints`` on the pre-copy hand-off, the daemon that
owns the step is restarted with ``VMFERRY_FAILPOINTS=<step>`` (it kills itself with
SIGKILL the first time it gets there), a memvm guest is migrated through it, the daemon
is started again without the failpoint, and the invariant is checked from outside:

- the VMIM ends Succeeded or Failed (as the step implies) within ``FINAL_WITHIN``;
- exactly one guest of the VM runs, on the node ``vmi.status.nodeName`` names, and the
  VMI is Running;
- its memory is correct: every page carries the stamp of its own index and of a tick
  the guest reached, and every page still holding its boot content is byte-for-byte
  what the boot fill regenerates;
- the VM migrates again afterwards.

``CHAOS_REPS`` (default 1) repeats each step; ``make chaos`` runs 20.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from handler.drivers.memvm_guest import (
    BOOT_CHUNK_PAGES,
    STAMP_BYTES,
    ContentGenerator,
    Header,
    tick_rng,
)
from tests.support.lab import LabHarness, migration_name, vm_manifest
from vmferry.failpoints import Step

REPS = int(os.environ.get("CHAOS_REPS", "1"))
FINAL_WITHIN = 120.0  # s from the daemon's death to the VMIM's final phase
SETTLED_WITHIN = 30.0  # s more for the one-guest invariant (a stale guest's cleanup)
DIE_WITHIN = 60.0  # s for the armed daemon to reach its failpoint
PER_REP = FINAL_WITHIN + SETTLED_WITHIN + DIE_WITHIN + 60.0  # s, with start-up and checks
CONTROLLER = "controller"


class Where:
    SOURCE = "source"
    TARGET = "target"
    CONTROLLER = "controller"


@dataclass(frozen=True)
class Case:
    step: Step
    where: str  # which daemon is armed
    phase: str  # the VMIM's final phase this step implies
    on_target: bool  # the VM ends on the target


CASES = [
    # Before the decision: the restarted source claims Aborted and resumes the guest.
    Case(Step.SOURCE_PAUSED, Where.SOURCE, "Failed", on_target=False),
    Case(Step.SOURCE_FINAL_SENT, Where.SOURCE, "Failed", on_target=False),
    Case(Step.SOURCE_VERIFIED, Where.SOURCE, "Failed", on_target=False),
    # After it: the target owns the VM; whoever comes back first finishes the record.
    Case(Step.SOURCE_COMMITTED, Where.SOURCE, "Succeeded", on_target=True),
    Case(Step.SOURCE_DESTROYED, Where.SOURCE, "Succeeded", on_target=True),
    Case(Step.TARGET_COMMITTED, Where.TARGET, "Succeeded", on_target=True),
    Case(Step.TARGET_RESUMED, Where.TARGET, "Succeeded", on_target=True),
    Case(Step.CONTROLLER_COMMITTED, Where.CONTROLLER, "Succeeded", on_target=True),
]


def restart(lab: LabHarness, component: str, step: Step | None = None) -> None:
    """kill -9 ``component`` if it runs, then start it (with ``step`` armed, if given); it
    serves again before this returns (a failpoint is reached in a migration, never at
    start-up)."""
    lab.restart(component, step.value if step else "")


def check_memory(guest: dict) -> None:
    """Every page's stamp names its own index and a tick the guest reached; every page
    still at tick 0 is exactly its boot content (regenerated from the seed)."""
    ram = np.fromfile(guest["ram_path"], dtype=np.uint8)
    header = Header.read(memoryview(Path(guest["ram_path"]).read_bytes()[:4096]))
    assert header is not None, "page 0 holds no memvm header"
    pages = ram.reshape(-1, header.page_size)
    count = len(pages)
    assert count * header.page_size == header.memory_bytes
    stamps = pages[:, :STAMP_BYTES].copy().view(np.uint64).reshape(count, 2)
    index_ok = stamps[1:, 1] == np.arange(1, count, dtype=np.uint64)
    assert index_ok.all(), f"{int((~index_ok).sum())} page(s) carry another page's stamp"
    assert int(stamps[1:, 0].max()) <= header.ticks, "a page from a tick the guest never ran"
    boot = ContentGenerator("random", header.page_size)
    rng = tick_rng(header.seed, 0)
    checked = 0
    for start in range(1, count, BOOT_CHUNK_PAGES):
        indices = np.arange(start, min(start + BOOT_CHUNK_PAGES, count), dtype=np.int64)
        expected = boot.pages(rng, indices, 0)
        untouched = stamps[indices, 0] == 0
        bad = (pages[indices][untouched] != expected[untouched]).any(axis=1)
        assert not bad.any(), f"{int(bad.sum())} boot page(s) from {start} differ"
        checked += int(untouched.sum())
    assert checked > count // 2, f"only {checked} of {count} pages still at their boot content"


def the_one_guest(lab: LabHarness, name: str, uid: str) -> tuple[dict, dict] | None:
    """(VMI, guest) once exactly one guest runs, on the node the VMI names, Running."""
    vmi = lab.get("vmi", name)
    guests = lab.guests(uid)
    status = vmi.get("status") or {}
    if status.get("phase") != "Running" or len(guests) != 1:
        return None
    node, guest = guests[0]
    return (vmi, guest) if node == status.get("nodeName") else None


def run_once(lab: LabHarness, case: Case, vm: str, uid: str) -> None:
    source = lab.get("vmi", vm)["status"]["nodeName"]
    target = next(n for n in lab.lab.node_names() if n != source)
    armed = {Where.SOURCE: source, Where.TARGET: target, Where.CONTROLLER: CONTROLLER}
    victim = armed[case.where]
    restart(lab, victim, case.step)
    out = lab.cli("migrate", vm, "--addedNodeSelector", f"kubernetes.io/hostname={target}")
    vmim = migration_name(out.stdout)
    lab.wait_for(f"{victim} to die at {case.step}", lambda: lab.lab.pid(victim) is None, DIE_WITHIN)
    restart(lab, victim)
    final = lab.wait_vmim_final(vmim, timeout=FINAL_WITHIN)
    status = final["status"]
    reason = (status.get("migrationState") or {}).get("failureReason")
    assert status["phase"] == case.phase, f"{case.step}: {status['phase']} ({reason})"
    if case.phase == "Failed":  # one sentence a person can act on, naming the restart
        assert reason and "restarted during the migration" in reason and "<" not in reason, reason
    settled = lab.wait_for(
        "exactly one guest, on the node the VMI names",
        lambda: the_one_guest(lab, vm, uid),
        SETTLED_WITHIN,
    )
    vmi, guest = settled
    assert vmi["status"]["nodeName"] == (target if case.on_target else source), vmi["status"]
    check_memory(guest)
    ticks = lab.console_ticks(guest["dir"])
    lab.wait_for(
        "the guest to run (its console ticks)",
        lambda: lab.console_ticks(guest["dir"])[-1:] > ticks[-1:],
        10,
    )


@pytest.mark.timeout(int(PER_REP * REPS + 180))
@pytest.mark.parametrize("case", CASES, ids=[c.step.value for c in CASES])
def test_switchover_fault(lab: LabHarness, case: Case) -> None:
    vm = f"chaos-{CASES.index(case)}"
    lab.apply(vm_manifest(vm, memory="64Mi", dirty_rate="4Mi", hot_set="16Mi", content="random"))
    uid = lab.wait_vmi_running(vm)["metadata"]["uid"]
    failures: list[str] = []
    try:
        for rep in range(REPS):
            started = time.monotonic()
            try:
                run_once(lab, case, vm, uid)
            except AssertionError as e:
                failures.append(f"rep {rep + 1}: {e}\n{lab.log_tails()}")
                # The next repetition starts from a lab with every daemon up.
                for component in [CONTROLLER, *lab.lab.node_names()]:
                    if lab.lab.pid(component) is None:
                        restart(lab, component)
            elapsed = time.monotonic() - started
            print(f"chaos {case.step} rep {rep + 1}/{REPS}: {elapsed:.1f}s")
            assert elapsed < PER_REP, f"rep {rep + 1} took {elapsed:.0f}s"
        passed = REPS - len(failures)
        print(f"chaos {case.step}: {passed}/{REPS} passed")
        assert not failures, f"{len(failures)}/{REPS} failed:\n" + "\n".join(failures)
        # Migratable again, with every daemon healthy.
        out = lab.cli("migrate", vm, "--wait", timeout=120, check=False)
        assert "succeeded" in out.stdout, f"{out.stdout}{out.stderr}\n{lab.log_tails()}"
    finally:
        for component in [CONTROLLER, *lab.lab.node_names()]:
            if lab.lab.pid(component) is None:
                restart(lab, component)
        lab.cli("delete", "vm", vm, check=False)
