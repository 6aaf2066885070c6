"""The memvm source engine in-process, against the real Transfer service on a local
(insecure) gRPC server, with fake guests on both sides, the real store behind the API
(StoreApi) and, where time matters, a fake clock.

Proves: a migration's memory arrives whole and the hand-off is recorded; abort in every
phase (before start, in pre-copy, at the pause before the decision, after Committed);
progressTimeout and completionTimeoutPerGiB; auto-converge's steps; live rates from the
first round; readable failure reasons.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from handler.drivers.base import GuestError
from handler.migration.channels import Channel
from handler.migration.handoff import HandoffRecord, read_token
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.memvm_source import MemvmSourceMigration
from handler.migration.memvm_target import MigrationService
from handler.migration.restart_record import RestartRecords
from handler.migration.source import CANCELED
from handler.migration.stats import Stats
from handler.migration.target_stream import StreamLost
from tests.support.fake_api import FakeClock, StoreApi
from tests.support.fake_guest import FakeGuest, MiB
from vmferry import grpc_options
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    AbortStatus,
    MigrationMode,
    MigrationState,
    Switchover,
    token_secret_name,
)
from vmferry.rpc import migration_pb2 as pb

UID = "mig-0001"
TOKEN = "s3cret-token"
Obj = dict[str, Any]


@dataclass
class Target:
    """The real target service with a fake incoming guest."""

    service: MigrationService
    guest: FakeGuest
    inc: IncomingMigration
    port: int
    aborts: list[str] = field(default_factory=list)
    commits: int = 0


@dataclass
class Lab:
    api: StoreApi
    source: FakeGuest
    target: Target
    tmp: Path

    async def vmi(self) -> Obj:
        return await self.api.get("VirtualMachineInstance", "default", "vm")

    async def state(self) -> MigrationState:
        return MigrationState.of(await self.vmi())

    async def engine(
        self, config: Obj | None = None, clock: Callable[[], float] | None = None, **ms: Any
    ) -> MemvmSourceMigration:
        """Write the hand-off (``config`` as its migrationConfiguration) and make the engine."""
        vmi = await self.vmi()
        vmi["status"]["migrationState"] = {
            "migrationUid": UID,
            "sourceNode": "node-a",
            "targetNode": "node-b",
            "targetNodeAddress": "127.0.0.1",
            "targetNodePort": self.target.port,
            "migrationConfiguration": {"parallelStreams": 2, **(config or {})},
            **ms,
        }
        vmi = await self.api.update(vmi, subresource="status")
        extra = {} if clock is None else {"clock": clock}
        return MemvmSourceMigration(self.api, "node-a", vmi, self.source, None, **extra)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def make_lab(tmp_path: Path) -> AsyncIterator[Lab]:
    api = await StoreApi.open(tmp_path)
    await api.create(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"namespace": "default", "name": "vm", "uid": "vmi-uid"},
            "spec": {},
            "status": {"phase": "Running", "nodeName": "node-a"},
        }
    )
    await api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": TOKEN_SECRET_NAMESPACE, "name": token_secret_name(UID)},
            "data": {TOKEN_SECRET_KEY: base64.b64encode(TOKEN.encode()).decode()},
        }
    )
    source = FakeGuest(tmp_path, "src", 2 * MiB)
    incoming = FakeGuest(tmp_path, "dst", 2 * MiB, incoming=True)
    target: Target

    async def on_commit(inc: IncomingMigration) -> None:
        assert inc.decide(Switchover.COMMITTED)
        target.commits += 1
        if inc.postcopy:
            await incoming.resume_postcopy(inc.device_state or b"")
        else:
            await inc.handle.resume(inc.device_state)
        inc.resumed()

    async def on_abort(inc: IncomingMigration, reason: str) -> None:
        target.aborts.append(reason)

    registry = IncomingRegistry(RestartRecords(tmp_path / "records"), require_peer_identity=False)
    registry.on_commit = on_commit
    registry.on_abort = on_abort
    service = MigrationService(registry)
    server = grpc.aio.server(options=grpc_options.server_options())
    service.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    inc = IncomingMigration("default", "vm", "vmi-uid", UID, TOKEN, "node-a", incoming)
    registry.expect(inc)
    target = Target(service, incoming, inc, port)
    try:
        yield Lab(api, source, target, tmp_path)
    finally:
        await server.stop(grace=None)
        registry.forget(UID)
        await api.close()


def in_lab(tmp_path: Path, body: Callable[[Lab], Awaitable[None]]) -> None:
    async def scenario() -> None:
        async with make_lab(tmp_path) as lab:
            await body(lab)

    asyncio.run(scenario())


async def advance_when(clock: FakeClock, ready: Callable[[], bool], seconds: float) -> None:
    """Move the fake clock by ``seconds`` once ``ready()`` holds (polled in real time)."""
    while True:
        if ready():
            break
        await asyncio.sleep(0.01)
    clock.advance(seconds)


def test_memory_arrives_whole_and_the_handoff_is_recorded(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        lab.source.hot = np.arange(8, 24, dtype=np.int64)  # a small hot set: it converges
        snapshot: list[bytes] = []

        async def at_pause() -> None:
            snapshot.append(bytes(lab.source.ram()))

        lab.source.on_pause = at_pause
        engine = await lab.engine()
        await asyncio.wait_for(engine.run(), 30)
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        assert state.switchover is Switchover.COMMITTED
        assert state.transfer["digestVerified"] is True
        assert engine.committed and lab.target.commits == 1
        assert bytes(lab.target.guest.ram()) == snapshot[0]  # the memory at switchover
        assert lab.target.guest.state == "running" and lab.source.destroyed
        assert set(state.transfer["downtimePartsMilliseconds"]) >= {"pause", "final_pass", "verify"}

    in_lab(tmp_path, body)


def test_a_migration_that_ended_before_it_started_starts_nothing(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        engine = await lab.engine(failed=True, abortStatus=AbortStatus.SUCCEEDED)
        lab.api.calls.clear()
        await asyncio.wait_for(engine.run(), 10)
        assert lab.api.writes() == []
        assert lab.source.calls == [] and lab.source.harvests == 0
        assert lab.target.inc.connected == set()

    in_lab(tmp_path, body)


def test_abort_in_precopy_leaves_the_vm_running_here(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        lab.source.hot = np.arange(lab.source.page_count, dtype=np.int64)  # never converges
        engine = await lab.engine({"downtimeBudgetMilliseconds": 0})

        def cancel_after_round_one() -> None:
            if lab.source.harvests >= 2:
                engine.abort_requested.set()

        lab.source.on_harvest = cancel_after_round_one
        await asyncio.wait_for(engine.run(), 30)
        state = await lab.state()
        assert state.failed and state.failure_reason == CANCELED
        assert state.abort_status is AbortStatus.SUCCEEDED
        assert state.switchover is None  # the guest never paused: nothing to arbitrate
        assert "pause" not in lab.source.calls and lab.source.state == "running"

    in_lab(tmp_path, body)


def test_abort_at_the_pause_resumes_the_guest_here_and_the_arbiter_says_aborted(
    tmp_path: Path,
) -> None:
    async def body(lab: Lab) -> None:
        lab.source.hot = np.arange(8, 12, dtype=np.int64)
        engine = await lab.engine()

        async def cancel_at_pause() -> None:
            # The cancel arrives while the guest pauses, and the other side records Aborted
            # first (the target gave up waiting): the source's commit must lose.
            engine.abort_requested.set()
            await HandoffRecord(lab.api, "default", "vm", UID).claim(Switchover.ABORTED)

        lab.source.on_pause = cancel_at_pause
        await asyncio.wait_for(engine.run(), 30)
        state = await lab.state()
        assert state.switchover is Switchover.ABORTED
        assert state.failed and state.abort_status is AbortStatus.SUCCEEDED
        assert "aborted" in state.failure_reason
        assert lab.source.calls[-2:] == ["pause", "resume"] and lab.source.state == "running"
        assert not engine.committed and lab.target.commits == 0

    in_lab(tmp_path, body)


def test_after_committed_the_source_never_resumes(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        lab.source.hot = np.arange(8, 12, dtype=np.int64)
        lab.source.fail_destroy = GuestError("the guest process is already gone")
        engine = await lab.engine()
        await asyncio.wait_for(engine.run(), 30)
        engine.abort_requested.set()  # too late: changes nothing
        state = await lab.state()
        assert state.switchover is Switchover.COMMITTED and engine.committed
        assert state.completed and not state.failed
        assert "resume" not in lab.source.calls
        assert lab.target.guest.state == "running"

    in_lab(tmp_path, body)


def test_progress_timeout_fails_and_keeps_the_vm_here(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        clock = FakeClock()
        lab.source.hot = np.arange(lab.source.page_count, dtype=np.int64)
        engine = await lab.engine(
            {
                "downtimeBudgetMilliseconds": 0,
                "progressTimeout": 5,
                "completionTimeoutPerGiB": 10**6,
            },
            clock=clock,
        )
        mover = asyncio.create_task(advance_when(clock, lambda: lab.source.harvests >= 3, 6))
        await asyncio.wait_for(engine.run(), 30)
        await mover
        state = await lab.state()
        assert state.failed and "progressTimeout 5" in state.failure_reason
        assert state.failure_reason.startswith("Live migration stuck for 6 sec")
        assert state.abort_status is None
        assert "pause" not in lab.source.calls and lab.source.state == "running"

    in_lab(tmp_path, body)


def test_completion_timeout_per_gib_fails_without_postcopy(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        clock = FakeClock()
        lab.source.hot = np.arange(lab.source.page_count, dtype=np.int64)
        engine = await lab.engine(
            {
                "downtimeBudgetMilliseconds": 0,
                "progressTimeout": 10**6,
                "completionTimeoutPerGiB": 512,
            },
            clock=clock,
        )
        # 2 MiB of guest memory at 512 s/GiB: 1 s.
        mover = asyncio.create_task(advance_when(clock, lambda: lab.source.harvests >= 2, 1.5))
        await asyncio.wait_for(engine.run(), 30)
        await mover
        state = await lab.state()
        assert state.failed
        assert "completionTimeoutPerGiB 512 x 0.00 GiB = 1 sec" in state.failure_reason
        assert lab.source.state == "running"

    in_lab(tmp_path, body)


def test_completion_timeout_switches_to_post_copy_when_allowed(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        clock = FakeClock()
        lab.source.hot = np.arange(lab.source.page_count, dtype=np.int64)
        engine = await lab.engine(
            {
                "downtimeBudgetMilliseconds": 0,
                "completionTimeoutPerGiB": 512,  # 2 MiB: 1 s
                "allowPostCopy": True,
            },
            clock=clock,
        )
        mover = asyncio.create_task(advance_when(clock, lambda: lab.source.harvests >= 2, 1.5))
        await asyncio.wait_for(engine.run(), 30)
        await mover
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        assert state.mode is MigrationMode.POST_COPY
        assert state.switchover is Switchover.COMMITTED
        assert lab.target.guest.calls[0] == "resume_postcopy"
        assert lab.target.guest.missing_pages().size == 0
        # every page arrived: the target's memory is the paused source's
        assert bytes(lab.target.guest.ram()) == bytes(lab.source.ram())
        assert state.transfer["postCopyFaults"] == 0 and lab.source.destroyed

    in_lab(tmp_path, body)


def test_auto_converge_throttles_20_then_10_more_up_to_99_and_gives_the_cpu_back(
    tmp_path: Path,
) -> None:
    async def body(lab: Lab) -> None:
        clock = FakeClock()
        lab.source.hot = np.arange(lab.source.page_count, dtype=np.int64)
        engine = await lab.engine(
            {"downtimeBudgetMilliseconds": 0, "allowAutoConverge": True, "progressTimeout": 5},
            clock=clock,
        )
        mover = asyncio.create_task(advance_when(clock, lambda: len(lab.source.throttles) >= 11, 6))
        await asyncio.wait_for(engine.run(), 60)
        await mover
        assert lab.source.throttles[:10] == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]
        assert lab.source.throttles[-1] == 0  # the migration failed: the guest gets its CPU back
        assert (await lab.state()).transfer["throttlePercent"] == 99

    in_lab(tmp_path, body)


def test_rates_are_live_during_the_first_round(tmp_path: Path) -> None:
    # a first round of ~2 s at the cap: the monitor (every 0.4 s) samples the dirty rate
    # within it even when a loaded machine delays its timers
    async def body(lab: Lab) -> None:
        big = FakeGuest(lab.tmp, "big", 16 * MiB)
        big.hot = np.arange(16, 80, dtype=np.int64)
        lab.source = big
        lab.target.guest = FakeGuest(lab.tmp, "big-in", 16 * MiB, incoming=True)
        lab.target.inc.handle = lab.target.guest
        cap = 8 * MiB
        engine = await lab.engine({"bandwidthPerMigration": "8Mi", "parallelStreams": 1})
        seen: list[tuple[int, float, float]] = []

        async def watch(stats: Stats) -> None:
            while True:
                seen.append((stats.rounds, stats.transfer_rate, stats.dirty_rate))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch(engine.stats))
        try:
            await asyncio.wait_for(engine.run(), 30)
        finally:
            watcher.cancel()
        assert (await lab.state()).completed
        first_round = [s for s in seen if s[0] == 0]
        assert any(rate > 0 for _, rate, _ in first_round), first_round
        assert all(rate <= 2 * cap for _, rate, _ in first_round)
        assert any(dirty > 0 for _, _, dirty in first_round), first_round

    in_lab(tmp_path, body)


def test_an_unreachable_target_is_a_readable_reason(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        engine = await lab.engine()
        engine.target_address = "127.0.0.1:1"  # nothing listens there
        await asyncio.wait_for(engine.run(), 30)
        state = await lab.state()
        assert state.failed
        assert state.failure_reason.startswith("cannot open the migration stream to 127.0.0.1:1: ")
        assert "object at 0x" not in state.failure_reason and "<" not in state.failure_reason
        assert lab.source.state == "running"

    in_lab(tmp_path, body)


def test_the_token_comes_from_the_secret(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        assert await read_token(lab.api, UID) == TOKEN
        with pytest.raises(Exception, match="is gone"):
            await read_token(lab.api, "another-migration")

    in_lab(tmp_path, body)


def test_a_commit_frame_that_cannot_be_sent_still_ends_the_source_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target learned the decision from the arbiter's record and died before the
    Commit frame could be written (seen in the chaos suite): the hand-off stands, so the
    source records the completion and destroys its paused guest (it used to fail the
    engine after the commit and leave that guest behind)."""
    original = Channel.write

    async def write(self: Channel, frame: pb.SourceFrame | bytes) -> None:
        if isinstance(frame, pb.SourceFrame) and frame.WhichOneof("frame") == "commit":
            raise StreamLost("migration channel 0 to the target failed: the connection broke")
        await original(self, frame)

    monkeypatch.setattr(Channel, "write", write)

    async def body(lab: Lab) -> None:
        engine = await lab.engine()
        await asyncio.wait_for(engine.run(), 30)
        state = await lab.state()
        assert state.switchover is Switchover.COMMITTED and engine.committed
        assert state.completed and not state.failed
        assert "destroy" in lab.source.calls and "resume" not in lab.source.calls

    in_lab(tmp_path, body)
