"""Every switchover failpoint (``vmferry.failpoints.Step``) of a cross-cluster live
migration, as ``test_chaos.py`` runs them inside one cluster: the source handler killed at
each step of the hand-off (cluster1), the target handler killed after the decision
(cluster2), and each cluster's controller killed the moment its store holds the decision
(cluster1's: the arbiter's own record; cluster2's: the receiving sync controller's mirror
of it). Each case moves a busy VM from cluster1 to cluster2 and checks the invariant of
``test_cross_cluster_faults.py`` (its :func:`run_case`): both VMIMs final as the arbiter
says, exactly one guest, in the cluster the arbiter names, memory correct, console
ticking, never two guests running at once. A module of its own (and its own two-cluster
lab) so that ``make test``'s workers run it beside the sync-controller faults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_cross_cluster import DST, SRC
from tests.integration.test_cross_cluster_faults import (
    DIE_WITHIN,
    FINAL_WITHIN,
    SETTLED_WITHIN,
    Case,
    Run,
    arm_source,
    arm_targets,
    run_case,
)
from tests.support.lab import MultiLabHarness
from vmferry.failpoints import Step
from vmferry.lab.cluster import sync_unavailable_reason

pytestmark = pytest.mark.skipif(
    sync_unavailable_reason() is not None,
    reason=f"no sync controllers: {sync_unavailable_reason()}",
)


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiLabHarness]:
    harness = MultiLabHarness(Path(tmp_path_factory.mktemp("xfailpoints")))
    try:
        harness.up_clusters(2, nodes=2, memory="1Gi")
        yield harness
    finally:
        harness.down()


def arm_controller(cluster: str) -> Callable[[Run], None]:
    """``cluster``'s controller armed at ``controller-committed``: it dies right after its
    store took the Committed switchover (before it answers), and is started again."""

    def inject(run: Run) -> None:
        component = f"{cluster}/controller"
        lab = run.labs.cluster(cluster)
        run.labs.restart(component, Step.CONTROLLER_COMMITTED.value)
        run.start_sending()
        run.wait(f"{component} to die at the decision", lambda: lab.pid("controller") is None,
                 DIE_WITHIN)  # fmt: skip
        run.switchover()
        run.labs.restart(component)

    return inject


CASES = [
    # before the decision: the source's restarted handler records Aborted and resumes there
    Case(Step.SOURCE_PAUSED.value, "Failed", arm_source(Step.SOURCE_PAUSED)),
    Case(Step.SOURCE_FINAL_SENT.value, "Failed", arm_source(Step.SOURCE_FINAL_SENT)),
    Case(Step.SOURCE_VERIFIED.value, "Failed", arm_source(Step.SOURCE_VERIFIED)),
    # after it: the VM is cluster2's
    Case(Step.SOURCE_COMMITTED.value, "Succeeded", arm_source(Step.SOURCE_COMMITTED)),
    Case(Step.SOURCE_DESTROYED.value, "Succeeded", arm_source(Step.SOURCE_DESTROYED)),
    Case(Step.TARGET_COMMITTED.value, "Succeeded", arm_targets(Step.TARGET_COMMITTED)),
    Case(Step.TARGET_RESUMED.value, "Succeeded", arm_targets(Step.TARGET_RESUMED)),
    Case(f"{SRC}-{Step.CONTROLLER_COMMITTED.value}", "Succeeded", arm_controller(SRC)),
    Case(f"{DST}-{Step.CONTROLLER_COMMITTED.value}", "Succeeded", arm_controller(DST)),
]


@pytest.mark.timeout(int(DIE_WITHIN + FINAL_WITHIN + SETTLED_WITHIN + 90))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cross_cluster_failpoint(labs: MultiLabHarness, case: Case) -> None:
    run_case(labs, case, f"p{CASES.index(case)}")
