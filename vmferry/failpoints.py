"""Fault injection at named steps of a migration, for the fault-injection suite.

A daemon started with ``VMFERRY_FAILPOINTS=step[,step…]`` in its environment kills itself
with SIGKILL the first time it reaches one of the named steps: ``kill -9`` at an exact
moment of the hand-off, which no signal sent from outside can time. The suite
(``tests/integration/test_chaos.py``) starts a daemon with a failpoint armed, runs a
migration into it, restarts the daemon without it and checks the invariant.

Nothing is armed unless the variable is set (never in a deployment): ``hit()`` is then a
lookup in an empty set. An unknown step name is an error at start-up, so a typo in a test
cannot pass for a fault that never fired.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from enum import StrEnum

log = logging.getLogger(__name__)

ENV = "VMFERRY_FAILPOINTS"


class Step(StrEnum):
    """The named steps; where each is hit is said beside it."""

    # source handler, switchover (pre-copy)
    SOURCE_PAUSED = "source-paused"  # the guest is paused, nothing of the final round sent
    SOURCE_FINAL_SENT = "source-final-sent"  # final pages + FinalState sent, no Verified yet
    SOURCE_VERIFIED = "source-verified"  # Verified received, the decision not yet recorded
    SOURCE_COMMITTED = "source-committed"  # Committed recorded by the arbiter, Commit unsent
    SOURCE_DESTROYED = "source-destroyed"  # completion recorded, the source guest destroyed
    # target handler
    TARGET_COMMITTED = "target-committed"  # the decision taken here, the guest not resumed
    TARGET_RESUMED = "target-resumed"  # the guest resumed here, nodeName not yet published
    TARGET_NBD = "target-nbd"  # a storage migration's NBD stream opened, no byte carried
    # post-copy: the guest runs on the target, pages still flow
    SOURCE_POSTCOPY = "source-postcopy"  # after the first post-copy batch was sent
    TARGET_POSTCOPY = "target-postcopy"  # after the first post-copy batch was applied
    # controller
    CONTROLLER_COMMITTED = "controller-committed"  # the store holds switchover=Committed
    # the leader's migration reconciler: the VMI holds the hand-off, the VMIM is not Scheduled
    CONTROLLER_HANDED_OFF = "controller-handed-off"
    # the leader's migration reconciler saw the completion; the VMIM is not yet Succeeded
    CONTROLLER_COMPLETING = "controller-completing"


def _armed_from(value: str) -> frozenset[Step]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    known = {step.value for step in Step}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"{ENV}: unknown failpoint(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return frozenset(Step(name) for name in names)


_ARMED: frozenset[Step] = _armed_from(os.environ.get(ENV, ""))


def armed() -> frozenset[Step]:
    return _ARMED


def hit(step: Step) -> None:
    """Kill this process with SIGKILL if ``step`` is armed; otherwise nothing."""
    if step in _ARMED:
        log.warning("failpoint %s: killing this process (SIGKILL)", step)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
