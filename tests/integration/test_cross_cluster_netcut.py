"""The migration network cut between the clusters during a cross-cluster live migration
(issue 18), in a two-cluster ``--netns`` lab (2 nodes each): both clusters' eth1 hang on
one bridge (:meth:`vmferry.lab.multi.MultiLab.migration_bridge`), and ``ip -n NS link set
BRIDGE down`` cuts every migration stream between them; the sync controllers run on the
host's loopback, so the sync link stays up.

Each case moves a busy memvm VM (64Mi, content random, dirtying) cluster1 → cluster2 with
the two VMIMs and checks the invariant of the cross-cluster fault suite
(:func:`tests.integration.test_cross_cluster_faults.run_case`: both VMIMs final as the
arbiter record -- cluster1's source VMI ``migrationState.switchover`` -- says, exactly one
guest across both clusters, in the cluster the record names, its memory correct and its
console ticking, never two guests ticking at once). The cuts, timed by the daemons' log
lines as that suite times its faults, each for ``CUT_SECONDS``, the bridge always
restored:

- ``cut-during-precopy``: the target prepared, the source started (its "starting to"
  line) and pre-copy's pages flowing (``PRECOPY_BYTES`` on its eth1; the lab's migration
  link shaped to ``MIGRATION_LINK`` so that the first round takes seconds): checked to land
  in pre-copy's first round (its "round 0 sent" line and any decision stamped after the
  cut). Either outcome, as the arbiter says.
- ``cut-after-decision-commit-lost``: the source armed with the failpoint
  ``source-committed`` (Committed recorded, the Commit frame never sent); the bridge cut on
  the source's line recording the decision, the source restarted while cut. cluster2 can
  learn the decision only through the sync controllers: it must, while the bridge is still
  down (its guest resumes there), and the VM ends in cluster2.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cross_cluster import CNV, DST, HCO, SRC, all_guests
from tests.integration.test_cross_cluster_faults import (
    DECIDED,
    DIE_WITHIN,
    EITHER,
    FINAL_WITHIN,
    SAMPLE_EVERY,
    SETTLED_WITHIN,
    Case,
    LogWatch,
    Run,
    log_of,
    run_case,
    runs_now,
)
from tests.support.lab import MultiLabHarness
from vmferry.failpoints import Step
from vmferry.lab import netns
from vmferry.lab.cluster import sync_unavailable_reason
from vmferry.migration_state import Switchover

CUT_SECONDS = 5.0  # how long the migration network between the clusters stays cut
STARTED = "starting to"  # the source handler's start line ("migration UID: NS/VM starting to")
IP_TIMEOUT = 10.0  # s for one `ip` command
# The migration network shaped so that pre-copy's first round (64Mi) takes ~3 s: a cut
# timed by the bytes on the wire lands in it (unshaped, the whole hand-off takes ~0.3 s).
MIGRATION_LINK = "200mbit"
PRECOPY_BYTES = 8 << 20  # cut once this much crossed the source's eth1 since the start
# The sending cluster's completionTimeoutPerGiB (its config governs the migration): the
# default 150 s/GiB gives a 64Mi VM 9 s in all, less than a shaped first round plus the
# cut, so pre-copy could never ride the cut out (vmferry scales by the exact GiB).
COMPLETION = "completionTimeoutPerGiB"
COMPLETION_TIMEOUT_PER_GIB = 600  # 37 s for 64Mi
ROUND0_SENT = ": round 0 sent "  # the source's line ending pre-copy's first round

NETNS_REASON = netns.unsupported_reason()
SYNC_REASON = sync_unavailable_reason()
pytestmark = [
    pytest.mark.skipif(NETNS_REASON is not None, reason=NETNS_REASON or ""),
    pytest.mark.skipif(SYNC_REASON is not None, reason=f"no sync controllers: {SYNC_REASON}"),
]


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiLabHarness]:
    harness = MultiLabHarness(Path(tmp_path_factory.mktemp("xnetcut")))
    try:
        harness.cli("lab", "up", "--clusters", "2", "--nodes", "2", "--memory", "1Gi",
                    "--netns", "--migration-link", MIGRATION_LINK, timeout=180)  # fmt: skip
        assert harness.multi.migration_bridge(), "the lab came up without network namespaces"
        patch = {"spec": {"liveMigrationConfig": {COMPLETION: COMPLETION_TIMEOUT_PER_GIB}}}
        harness.in_cluster(SRC, "patch", "hyperconverged", HCO, "-n", CNV, "--type", "merge",
                           "-p", json.dumps(patch))  # fmt: skip
        yield harness
    finally:
        harness.down()


# -- the cut ------------------------------------------------------------------------------------


def set_migration_bridge(labs: MultiLabHarness, up: bool) -> None:
    """``ip -n NS link set BRIDGE up|down`` on the bridge the clusters' eth1 share."""
    where = labs.multi.migration_bridge()
    state = "up" if up else "down"
    argv = ["ip", "-n", where["namespace"], "link", "set", where["bridge"], state]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"


class Cut:
    """The migration network between the clusters down for the ``with`` block; restored on
    the way out whatever happens. ``at`` is when it went down (epoch seconds)."""

    def __init__(self, labs: MultiLabHarness) -> None:
        self.labs = labs
        self.at = 0.0

    def __enter__(self) -> Cut:
        set_migration_bridge(self.labs, up=False)
        self.at = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        set_migration_bridge(self.labs, up=True)


def target_runs(run: Run) -> bool:
    now = time.time()
    return any(
        w.startswith(f"{DST}/") and runs_now(g["dir"], now)
        for w, g in all_guests(run.labs, run.uids)
    )


# -- the cases ----------------------------------------------------------------------------------


def migration_nic_bytes(run: Run) -> int:
    """Bytes (both ways) on the source node's eth1 so far."""
    ns = run.labs.cluster(SRC).netns_of(run.source_node)
    assert ns is not None, f"{run.source()} runs in no network namespace"
    return netns.nic_bytes(ns).get(netns.MIGRATION_NIC, 0)


def cut_during_precopy(run: Run) -> None:
    """Cut once pre-copy's pages flow (PRECOPY_BYTES on the source's eth1), in its first
    round, long before the switchover."""
    started = LogWatch([log_of(run, SRC, run.source_node)])
    before = migration_nic_bytes(run)
    run.start_sending()
    started.wait(f"default/{run.vm} {STARTED}", 45)
    run.wait(
        f"{PRECOPY_BYTES >> 20} MiB of pre-copy on {run.source()}'s {netns.MIGRATION_NIC}",
        lambda: migration_nic_bytes(run) - before > PRECOPY_BYTES,
        10,
        0.02,
    )
    with Cut(run.labs) as cut:
        time.sleep(CUT_SECONDS)
    round0 = started.stamp_of(ROUND0_SENT)
    assert round0 is None or round0 > cut.at, "pre-copy's first round ended before the cut"
    decided = started.stamp_of(*DECIDED)
    assert decided is None or decided > cut.at, "the decision came before the cut"


def cut_after_decision_commit_lost(run: Run) -> None:
    run.labs.restart(run.source(), Step.SOURCE_COMMITTED.value)
    decision = LogWatch([log_of(run, SRC, run.source_node)])
    run.start_sending()
    decision.wait(f"{DECIDED[0]}{Switchover.COMMITTED}{DECIDED[1]}", DIE_WITHIN)
    with Cut(run.labs) as cut:
        lab = run.labs.cluster(SRC)
        run.wait(f"{run.source()} to die at {Step.SOURCE_COMMITTED}",
                 lambda: lab.pid(run.source_node) is None, 10)  # fmt: skip
        assert run.switchover() == Switchover.COMMITTED
        decided = decision.stamp_of(*DECIDED)
        assert decided is not None and decided <= cut.at, "the cut came before the decision"
        run.wait(
            f"the target guest to run in {DST} on the decision the sync controllers mirror "
            "(the migration network cut)",
            lambda: target_runs(run),
            CUT_SECONDS,
            SAMPLE_EVERY,
        )
        run.labs.restart(run.source())  # the source returns, the migration network still cut
        time.sleep(max(0.0, cut.at + CUT_SECONDS - time.time()))


CASES = [
    Case("cut-during-precopy", EITHER, cut_during_precopy),
    Case("cut-after-decision-commit-lost", "Succeeded", cut_after_decision_commit_lost),
]


@pytest.mark.timeout(int(DIE_WITHIN + CUT_SECONDS + FINAL_WITHIN + SETTLED_WITHIN + 60))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_migration_network_cut(labs: MultiLabHarness, case: Case) -> None:
    try:
        run_case(labs, case, f"n{CASES.index(case)}")
    finally:
        set_migration_bridge(labs, up=True)  # whatever the case left
