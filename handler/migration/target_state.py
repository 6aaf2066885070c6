"""The receiving handler's state machine for one incoming migration.

The states are those named in the header of ``proto/vmferry/rpc/migration.proto``
(AwaitingHello -> Receiving -> Verifying -> Verified -> (Committed -> Resumed) | Aborted),
plus the two the header describes in prose: a digest that did not match (only an abort
follows) and the post-copy branch, where the guest resumes here before all of its memory
has arrived. The QEMU tunnel (``tunnel.proto``) walks the same machine: Open is the
Hello, its Tunnelling is Receiving, Completed starts Verifying.

``TRANSITIONS`` is the whole table; ``IncomingMigration.move`` is the only writer of a
migration's state and refuses anything not in it with :class:`IllegalTransition`. The
commit decision enters through ``IncomingMigration.decide`` whichever path brings it (the
Commit frame, the VMI watch event, the reconcile).
"""

from __future__ import annotations

from enum import StrEnum

from handler import stream
from handler.migration import tunnel


class TargetState(StrEnum):
    AWAITING_HELLO = "AwaitingHello"  # registered; no channel connected yet
    RECEIVING = "Receiving"  # channels connected; rounds (and DeviceState) arrive
    VERIFYING = "Verifying"  # the final state arrived; the digests are being compared
    VERIFIED = "Verified"  # the memory matches the source's; waiting for the decision
    MISMATCHED = "Mismatched"  # the digests differ: only an abort may follow
    COMMITTED = "Committed"  # the hand-off is decided here; the resume is under way
    RESUMED = "Resumed"  # the guest runs here with all of its memory
    ABORTED = "Aborted"  # discarded; the guest stays on the source
    # post-copy: the guest resumes before every page is here
    POSTCOPY_VERIFYING = "PostCopyVerifying"  # PostCopyStart: digest of the pages present
    POSTCOPY_VERIFIED = "PostCopyVerified"
    POSTCOPY_COMMITTED = "PostCopyCommitted"  # decided; resume_postcopy under way
    POSTCOPY_RUNNING = "PostCopyRunning"  # the guest runs here; missing pages arrive
    POSTCOPY_DONE = "PostCopyDone"  # every page is present

    @property
    def postcopy(self) -> bool:
        """The post-copy branch (from PostCopyStart on)."""
        return self in POSTCOPY_STATES

    @property
    def verified(self) -> bool:
        """The memory was verified (and nothing was aborted)."""
        return self in VERIFIED_STATES

    @property
    def committed(self) -> bool:
        """The hand-off is decided for this node: the VM is (or becomes) ours."""
        return self in COMMITTED_STATES

    @property
    def decided(self) -> bool:
        return self.committed or self is TargetState.ABORTED

    @property
    def guest_runs_here(self) -> bool:
        """Post-copy after the hand-off: the guest runs while pages still arrive (the
        source may reconnect, Hello.resume)."""
        return self in (TargetState.POSTCOPY_COMMITTED, TargetState.POSTCOPY_RUNNING)


S = TargetState
POSTCOPY_STATES = frozenset(
    {
        S.POSTCOPY_VERIFYING,
        S.POSTCOPY_VERIFIED,
        S.POSTCOPY_COMMITTED,
        S.POSTCOPY_RUNNING,
        S.POSTCOPY_DONE,
    }
)
COMMITTED_STATES = frozenset(
    {S.COMMITTED, S.RESUMED, S.POSTCOPY_COMMITTED, S.POSTCOPY_RUNNING, S.POSTCOPY_DONE}
)
VERIFIED_STATES = frozenset({S.VERIFIED, S.POSTCOPY_VERIFIED} | COMMITTED_STATES)

TRANSITIONS: dict[TargetState, frozenset[TargetState]] = {
    S.AWAITING_HELLO: frozenset({S.RECEIVING, S.ABORTED}),
    S.RECEIVING: frozenset({S.VERIFYING, S.POSTCOPY_VERIFYING, S.ABORTED}),
    S.VERIFYING: frozenset({S.VERIFIED, S.MISMATCHED, S.ABORTED}),
    S.VERIFIED: frozenset({S.COMMITTED, S.ABORTED}),
    S.MISMATCHED: frozenset({S.ABORTED}),
    S.COMMITTED: frozenset({S.RESUMED}),
    S.RESUMED: frozenset(),
    S.ABORTED: frozenset(),
    S.POSTCOPY_VERIFYING: frozenset({S.POSTCOPY_VERIFIED, S.MISMATCHED, S.ABORTED}),
    S.POSTCOPY_VERIFIED: frozenset({S.POSTCOPY_COMMITTED, S.ABORTED}),
    S.POSTCOPY_COMMITTED: frozenset({S.POSTCOPY_RUNNING}),
    S.POSTCOPY_RUNNING: frozenset({S.POSTCOPY_DONE}),
    S.POSTCOPY_DONE: frozenset(),
}
"""state -> the states it may move to. Aborted is reachable from every state before the
decision and from none after it: a committed guest is never discarded."""

# Where the commit decision leads from each state it may be taken in.
COMMIT_FROM: dict[TargetState, TargetState] = {
    S.VERIFIED: S.COMMITTED,
    S.POSTCOPY_VERIFIED: S.POSTCOPY_COMMITTED,
}
# Where a finished resume leads.
RESUMED_FROM: dict[TargetState, TargetState] = {
    S.COMMITTED: S.RESUMED,
    S.POSTCOPY_COMMITTED: S.POSTCOPY_RUNNING,
}


class IllegalTransition(stream.ProtocolError, tunnel.ProtocolError):
    """A frame or event that does not fit the migration's state. A protocol error of
    both protocols: either service fails the stream with it (INVALID_ARGUMENT)."""


def check(migration_uid: str, current: TargetState, to: TargetState, why: str) -> None:
    """Raise IllegalTransition unless ``current -> to`` is in the table."""
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"migration {migration_uid}: {why} is not allowed in state {current} "
            f"(it would move it to {to})"
        )
