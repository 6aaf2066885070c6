"""A short drop of the migration network in pre-copy is ridden out; a long one fails
with a sentence that says so; failure reasons are readable sentences.

Engine tests: the memvm source in-process against the real Transfer service (the lab of
test_source_engine), its channels through a cuttable TCP relay (tests/support/relay.py).
Unit tests: ``channels.Reconnect`` with a fake clock, the classification of real gRPC
errors (``rpc_problem``/``failure_reason``), the target's admission of a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from handler import stream
from handler.migration import channels
from handler.migration.channels import Reconnect, all_lost, unreachable_reason
from handler.migration.handoff import MigrationFailed
from handler.migration.peer import accepts_hello
from handler.migration.source import failure_reason, is_network_failure, rpc_problem
from handler.migration.target_state import TargetState
from handler.migration.target_stream import StreamLost, stream_failure
from tests.support.fake_api import FakeClock
from tests.support.relay import Relay
from tests.unit.test_source_engine import TOKEN, UID, Lab, in_lab
from vmferry.migration_state import Switchover
from vmferry.rpc import migration_pb2 as pb

# -- engine: the drop ridden out, or failing with the time it lasted --------------------------


def _relay(lab: Lab) -> Relay:
    return Relay("127.0.0.1", "127.0.0.1", lab.target.port).start()


@pytest.mark.timeout(60)
def test_a_short_drop_in_precopy_is_ridden_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def body(lab: Lab) -> None:
        lab.source.hot = np.arange(8, 24, dtype=np.int64)
        snapshot: list[bytes] = []

        async def at_pause() -> None:
            snapshot.append(bytes(lab.source.ram()))

        lab.source.on_pause = at_pause
        relay = _relay(lab)
        try:
            # 2 MiB at 256 KiB/s: round 0 takes ~8 s, the cut comes in its middle.
            engine = await lab.engine(
                {
                    "bandwidthPerMigration": "256Ki",
                    "progressTimeout": 30,
                    "completionTimeoutPerGiB": 10**6,
                },
                targetNodePort=relay.port,
            )
            run = asyncio.create_task(engine.run())
            while engine.stats.processed_bytes < 512 * 1024:
                assert not run.done()
                await asyncio.sleep(0.02)
            relay.cut()
            await asyncio.sleep(1.5)
            assert not run.done(), "the migration waits for the network"
            relay.restore()
            await asyncio.wait_for(run, 40)
        finally:
            relay.stop()
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        assert state.switchover is Switchover.COMMITTED
        assert bytes(lab.target.guest.ram()) == snapshot[0]  # the memory at switchover
        assert lab.target.guest.state == "running" and lab.source.destroyed
        assert lab.target.aborts == []
        assert any("reconnected to node-b" in r.getMessage() for r in caplog.records)
        assert any("source reconnected channel" in r.getMessage() for r in caplog.records)

    in_lab(tmp_path, body)


@pytest.mark.timeout(60)
def test_a_drop_longer_than_progress_timeout_fails_and_keeps_the_vm_here(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        relay = _relay(lab)
        try:
            engine = await lab.engine(
                {
                    "bandwidthPerMigration": "256Ki",
                    "progressTimeout": 2,
                    "completionTimeoutPerGiB": 10**6,
                },
                targetNodePort=relay.port,
            )
            run = asyncio.create_task(engine.run())
            while engine.stats.processed_bytes < 256 * 1024:
                assert not run.done()
                await asyncio.sleep(0.02)
            relay.cut()
            await asyncio.wait_for(run, 30)
        finally:
            relay.stop()
        state = await lab.state()
        assert state.failed and not state.completed
        reason = state.failure_reason
        assert reason.startswith("the migration network to node-b was unreachable for "), reason
        assert "progressTimeout 2 s" in reason and "keeps running on the source" in reason
        seconds = int(reason.split("unreachable for ")[1].split(" s")[0])
        assert seconds >= 2, reason  # nothing got through for progressTimeout, at least
        assert "<" not in reason and "0x" not in reason
        assert lab.source.state == "running" and not lab.source.destroyed
        assert "pause" not in lab.source.calls

    in_lab(tmp_path, body)


# -- Reconnect with a fake clock ------------------------------------------------------------


class FakeNetwork:
    """reopen() fails (StreamLost) until the clock reaches ``up_at``."""

    def __init__(self, clock: FakeClock, up_at: float) -> None:
        self.clock = clock
        self.up_at = up_at
        self.calls: list[float] = []

    async def reopen(self) -> None:
        self.calls.append(self.clock())
        if self.clock() < self.up_at:
            raise StreamLost("cannot open the migration stream: the target could not be reached")

    async def sleep(self, seconds: float) -> None:
        self.clock.advance(seconds)


def _reconnect(clock: FakeClock, net: FakeNetwork, deadline: float) -> Reconnect:
    return Reconnect(
        reopen=net.reopen,
        deadline=lambda: deadline,
        clock=clock,
        target_node="node-b",
        progress_timeout=10,
        sleep=net.sleep,
    )


@pytest.mark.timeout(10)
def test_reconnect_backs_off_until_the_network_is_back() -> None:
    clock = FakeClock(100.0)
    net = FakeNetwork(clock, up_at=105.0)
    r = _reconnect(clock, net, deadline=110.0)
    asyncio.run(r.run(100.0, "m"))
    assert net.calls[-1] >= 105.0 and r.attempts == len(net.calls)
    gaps = np.diff([100.0, *net.calls])
    assert gaps[0] == channels.RECONNECT_DELAY
    assert bool(np.all(np.diff(gaps) >= 0))  # backoff
    assert max(gaps) <= channels.RECONNECT_MAX_DELAY


@pytest.mark.timeout(10)
def test_reconnect_gives_up_at_the_deadline_with_the_time_it_was_down() -> None:
    clock = FakeClock(100.0)
    net = FakeNetwork(clock, up_at=1e9)
    r = _reconnect(clock, net, deadline=108.0)
    with pytest.raises(MigrationFailed) as e:
        asyncio.run(r.run(100.0, "m"))
    assert not isinstance(e.value, StreamLost)
    assert str(e.value) == unreachable_reason("node-b", 8, "progressTimeout 10 s")
    assert str(e.value).startswith("the migration network to node-b was unreachable for 8 s")
    assert all(t <= 108.0 for t in net.calls)


@pytest.mark.timeout(10)
def test_reconnect_does_not_retry_a_refusal() -> None:
    clock = FakeClock(100.0)

    async def refuse() -> None:
        raise MigrationFailed("cannot open the migration stream: the target refused")

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    r = Reconnect(refuse, lambda: 200.0, clock, "node-b", 10, sleep=sleep)
    with pytest.raises(MigrationFailed, match="refused"):
        asyncio.run(r.run(100.0, "m"))
    assert r.attempts == 1


def test_all_lost_only_when_every_failure_is_the_network() -> None:
    lost = StreamLost("a")
    assert all_lost(lost) is lost
    assert all_lost(ExceptionGroup("g", [lost, StreamLost("b")])) is lost
    assert all_lost(ExceptionGroup("g", [lost, MigrationFailed("refused")])) is None
    assert all_lost(ExceptionGroup("g", [ExceptionGroup("h", [lost])])) is lost
    assert all_lost(MigrationFailed("x")) is None
    assert all_lost(asyncio.CancelledError()) is None


# -- readable reasons from real gRPC errors ---------------------------------------------------


def _rpc_error(code: grpc.StatusCode, details: str, debug: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string=debug
    )


CORE = _rpc_error(
    grpc.StatusCode.INTERNAL,
    "Internal error from Core",
    "<grpc._cython.cygrpc.SendMessageOperation object at 0x7fa5c0e1b2a0>",
)


def _readable(text: str) -> None:
    for raw in ("<", ">", "0x", "AioRpcError", "StatusCode", "debug_error_string", "Core"):
        assert raw not in text, (raw, text)
    assert "\n" not in text


@pytest.mark.parametrize(
    ("error", "network", "words"),
    [
        (CORE, True, "the connection to the target broke"),
        (
            _rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; ..."),
            True,
            "could not be reached over the migration network",
        ),
        (
            _rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"),
            True,
            "closed",
        ),
        (_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), True, "in time"),
        (
            _rpc_error(grpc.StatusCode.NOT_FOUND, "no migration 'm' is expected on this node"),
            False,
            "does not expect this migration",
        ),
        (
            _rpc_error(grpc.StatusCode.PERMISSION_DENIED, "wrong migration token"),
            False,
            "refused this node's identity or the migration's token: wrong migration token",
        ),
        (
            _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "frame pages after the migration was x"),
            False,
            "rejected what this node sent: frame pages after",
        ),
        (asyncio.InvalidStateError("RPC already finished"), True, "already closed"),
    ],
)
def test_grpc_failures_are_sentences(error: BaseException, network: bool, words: str) -> None:
    clause = rpc_problem(error)
    _readable(clause)
    assert words in clause, clause
    assert is_network_failure(error) is network
    reason = failure_reason(error, "m")
    _readable(reason)
    assert reason.startswith("lost the target: ")
    made = stream_failure("migration channel 1 to the target failed", error)
    assert isinstance(made, StreamLost) is network
    _readable(str(made))


def test_the_internal_error_from_core_is_not_dumped() -> None:
    """The dump the issue quotes, as a reason: one sentence, nothing of the object."""
    made = stream_failure("migration channel 1 to the target failed", CORE)
    assert str(made) == (
        "migration channel 1 to the target failed: the connection to the target broke"
    )


@pytest.mark.timeout(10)
def test_a_real_unreachable_target_is_a_network_failure() -> None:
    async def call() -> BaseException:
        async with grpc.aio.insecure_channel("127.0.0.1:1") as ch:
            try:
                await ch.unary_unary("/x.Y/Z")(b"", timeout=5)
            except grpc.aio.AioRpcError as e:
                return e
        raise AssertionError("the call succeeded")

    error = asyncio.run(call())
    assert is_network_failure(error)
    assert rpc_problem(error) == "the target could not be reached over the migration network"


def test_other_failures_are_sentences() -> None:
    assert failure_reason(MigrationFailed("as written"), "m") == "as written"
    assert failure_reason(TimeoutError(), "m") == "the target stopped answering (timeout)"
    internal = failure_reason(KeyError("x"), "m")
    assert internal.startswith("internal error in the source handler (KeyError)")


# -- the target takes a reconnect only where it can go on ---------------------------------------


def test_the_target_takes_a_reconnect_while_receiving_or_in_postcopy() -> None:
    assert accepts_hello(TargetState.RECEIVING, resume=True)
    assert accepts_hello(TargetState.POSTCOPY_RUNNING, resume=True)
    assert accepts_hello(TargetState.POSTCOPY_COMMITTED, resume=True)
    for state in (
        TargetState.AWAITING_HELLO,
        TargetState.VERIFYING,
        TargetState.VERIFIED,
        TargetState.COMMITTED,
        TargetState.ABORTED,
        TargetState.POSTCOPY_VERIFYING,
    ):
        assert not accepts_hello(state, resume=True), state
    assert accepts_hello(TargetState.AWAITING_HELLO, resume=False)
    assert accepts_hello(TargetState.VERIFIED, resume=False)
    assert not accepts_hello(TargetState.ABORTED, resume=False)


# -- the real Transfer service: a reconnect while receiving replaces the channel's stream ----


def _hello(lab: Lab, *, resume: bool) -> bytes:
    spec = lab.target.guest.spec
    hello = pb.Hello(
        protocol_version=stream.PROTOCOL_VERSION,
        migration_uid=UID,
        token=TOKEN,
        channel_id=0,
        channel_count=1,
        memory_bytes=spec.memory_bytes,
        page_size=spec.page_size,
        resume=resume,
    )
    return pb.SourceFrame(hello=hello).SerializeToString()


async def _accepted(call: grpc.aio.StreamStreamCall) -> None:
    first, second = await call.read(), await call.read()
    assert first.WhichOneof("frame") == "hello_ack"
    assert second.WhichOneof("frame") == "credit"


@pytest.mark.timeout(30)
def test_the_target_takes_a_reconnect_while_receiving_and_drops_the_old_stream(
    tmp_path: Path,
) -> None:
    round_end = pb.SourceFrame(round_end=pb.RoundEnd(round=0)).SerializeToString()

    async def body(lab: Lab) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{lab.target.port}") as conn:
            early = stream.open_transfer(conn)
            await early.write(_hello(lab, resume=True))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await early.read()  # nothing to resume before the first Hello
            assert refused.value.code() is grpc.StatusCode.NOT_FOUND

            old = stream.open_transfer(conn)
            await old.write(_hello(lab, resume=False))
            await _accepted(old)
            assert lab.target.inc.state is TargetState.RECEIVING
            again = stream.open_transfer(conn)
            await again.write(_hello(lab, resume=False))
            with pytest.raises(grpc.aio.AioRpcError) as twice:
                await again.read()
            assert twice.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "already connected" in (twice.value.details() or "")

            new = stream.open_transfer(conn)
            await new.write(_hello(lab, resume=True))
            await _accepted(new)
            await old.write(round_end)  # the replaced stream applies nothing more
            assert await old.read() is grpc.aio.EOF
            await new.write(round_end)
            ack = await new.read()
            assert ack.WhichOneof("frame") == "round_ack" and ack.round_ack.round == 0
            assert lab.target.aborts == []
            new.cancel()

    in_lab(tmp_path, body)
