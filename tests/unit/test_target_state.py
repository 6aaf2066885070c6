"""The target state machine: every transition of the table is taken, every other one is
refused with a message, and the decision (commit or abort) is taken once."""

from __future__ import annotations

import itertools

import pytest

from handler import stream
from handler.drivers.base import PostCopyHandle, VMHandle
from handler.migration import tunnel
from handler.migration.incoming import IncomingMigration
from handler.migration.target_state import (
    COMMITTED_STATES,
    TRANSITIONS,
    IllegalTransition,
    TargetState,
)
from tests.support.fake_handle import FakeHandle
from vmferry.migration_state import Switchover

S = TargetState


def incoming(state: TargetState = S.AWAITING_HELLO) -> IncomingMigration:
    inc = IncomingMigration(
        namespace="default",
        name="vm",
        vmi_uid="uid-1",
        migration_uid="mig-1",
        token="t",
        source_node="node1",
        handle=FakeHandle(),
    )
    inc._state = state  # the tests place it anywhere in the machine
    return inc


def test_the_fake_guest_is_a_vm_handle_with_post_copy() -> None:
    handle = FakeHandle()
    assert isinstance(handle, VMHandle) and isinstance(handle, PostCopyHandle)


def test_the_proto_states_are_in_the_table_and_every_state_has_a_row() -> None:
    named = ["AwaitingHello", "Receiving", "Verifying", "Verified", "Committed", "Resumed"]
    assert [str(TargetState(n)) for n in named] == named
    assert str(S.ABORTED) == "Aborted"
    assert set(TRANSITIONS) == set(TargetState)


@pytest.mark.parametrize(
    ("current", "to"), [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]
)
def test_every_legal_transition_moves(current: TargetState, to: TargetState) -> None:
    inc = incoming(current)
    inc.move(to, "a test")
    assert inc.state is to


@pytest.mark.parametrize(
    ("current", "to"),
    [(a, b) for a, b in itertools.product(TargetState, TargetState) if b not in TRANSITIONS[a]],
)
def test_every_illegal_transition_is_refused_with_a_message(
    current: TargetState, to: TargetState
) -> None:
    inc = incoming(current)
    with pytest.raises(IllegalTransition, match=f"in state {current}.*move it to {to}"):
        inc.move(to, "a test")
    assert inc.state is current


def test_an_illegal_transition_is_a_protocol_error_of_both_protocols() -> None:
    assert issubclass(IllegalTransition, stream.ProtocolError)
    assert issubclass(IllegalTransition, tunnel.ProtocolError)


def test_the_happy_paths_walk_the_machine() -> None:
    inc = incoming()
    for to in (S.RECEIVING, S.VERIFYING, S.VERIFIED):
        inc.move(to, "a frame")
    assert inc.verified and inc.decision is None
    assert inc.decide(Switchover.COMMITTED)
    assert inc.state is S.COMMITTED and inc.decision is Switchover.COMMITTED
    inc.resumed()
    assert inc.state is S.RESUMED and not inc.postcopy
    post = incoming(S.RECEIVING)
    post.move(S.POSTCOPY_VERIFYING, "PostCopyStart")
    post.move(S.POSTCOPY_VERIFIED, "digest")
    assert post.postcopy and not post.state.guest_runs_here
    assert post.decide(Switchover.COMMITTED)
    assert post.state is S.POSTCOPY_COMMITTED and post.state.guest_runs_here
    post.resumed()
    assert post.state is S.POSTCOPY_RUNNING
    post.move(S.POSTCOPY_DONE, "PostCopyEnd")
    assert post.postcopy_done and not post.state.guest_runs_here


@pytest.mark.parametrize(
    "state", [s for s in TargetState if s not in (S.VERIFIED, S.POSTCOPY_VERIFIED)]
)
def test_commit_is_refused_before_verification_and_ignored_after_a_decision(
    state: TargetState,
) -> None:
    inc = incoming(state)
    if state.decided:
        assert inc.decide(Switchover.COMMITTED) is False
        assert inc.state is state
    else:
        with pytest.raises(IllegalTransition, match="Commit before the memory was verified"):
            inc.decide(Switchover.COMMITTED)
        assert inc.state is state


@pytest.mark.parametrize("state", list(TargetState))
def test_abort_in_every_state(state: TargetState) -> None:
    """Before the decision an abort is taken (once); after a commit it is not: a
    committed guest is never discarded."""
    inc = incoming(state)
    taken = inc.decide(Switchover.ABORTED)
    if state in COMMITTED_STATES or state is S.ABORTED:
        assert taken is False and inc.state is state
    else:
        assert taken is True and inc.state is S.ABORTED
        assert inc.decision is Switchover.ABORTED
        assert inc.decide(Switchover.ABORTED) is False  # the second one finds it decided
        assert inc.decide(Switchover.COMMITTED) is False


def test_resumed_only_after_the_commit() -> None:
    inc = incoming(S.VERIFIED)
    with pytest.raises(IllegalTransition, match="resumed in state Verified"):
        inc.resumed()
