"""Post-copy across a handler restart, in-process: the memvm source engine against the real
Transfer service (the harness of test_source_engine), with fake guests.

A failpoint stands for the kill: on the source it cancels the engine right after the first
post-copy batch (a killed handler writes nothing); on the target it ends the stream and the
registry forgets the migration (the handler's memory is gone, the guest and its bitmaps
stay). The restarted side then re-adopts as the VM manager's keeper does, and the
migration completes with the target's memory equal to the source's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handler import stream
from handler.migration import memvm_target, postcopy_source
from handler.migration.incoming import IncomingMigration
from handler.migration.memvm_source import MemvmSourceMigration
from handler.migration.target_state import TargetState
from tests.support.fake_api import FakeClock
from tests.unit.test_source_engine import TOKEN, UID, Lab, advance_when, in_lab
from vmferry import failpoints
from vmferry.migration_state import MigrationMode, Switchover

CONFIG = {
    "downtimeBudgetMilliseconds": 0,
    "completionTimeoutPerGiB": 512,  # 2 MiB: 1 s
    "allowPostCopy": True,
}


class _Killed(Exception):
    """The target handler 'died' while applying a post-copy batch."""


def arm(
    monkeypatch: pytest.MonkeyPatch, module: Any, step: failpoints.Step, act: Any
) -> asyncio.Event:
    """Replace ``module``'s failpoints.hit: ``act()`` the first time ``step`` is hit."""
    fired = asyncio.Event()
    # Small batches: the 2 MiB guest's missing pages take many, the kill lands between.
    monkeypatch.setattr(stream, "BATCH_PAGES", 32)

    class Points:
        Step = failpoints.Step

        @staticmethod
        def hit(at: failpoints.Step) -> None:
            if at is step and not fired.is_set():
                fired.set()
                act()

    monkeypatch.setattr(module, "failpoints", Points)
    return fired


async def to_post_copy(lab: Lab) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    """Start a migration that goes post-copy after 1 s (fake clock); (engine, clock mover)."""
    clock = FakeClock()
    lab.source.hot = np.arange(lab.source.page_count, dtype=np.int64)
    engine = await lab.engine(CONFIG, clock=clock)
    task = asyncio.create_task(engine.run())
    mover = asyncio.create_task(advance_when(clock, lambda: lab.source.harvests >= 2, 1.5))
    return task, mover


def test_a_restarted_source_resumes_post_copy_and_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def kill() -> None:
        raise asyncio.CancelledError  # the handler is gone: nothing more is written

    fired = arm(monkeypatch, postcopy_source, failpoints.Step.SOURCE_POSTCOPY, kill)

    async def body(lab: Lab) -> None:
        task, mover = await to_post_copy(lab)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await mover
        assert fired.is_set()
        state = await lab.state()
        assert state.switchover is Switchover.COMMITTED and state.mode is MigrationMode.POST_COPY
        assert not state.completed and not state.failed
        assert not lab.source.destroyed  # the paused guest holds what the target lacks
        missing_before = lab.target.guest.missing_pages().size
        assert missing_before > 0
        # The restarted handler: a re-adopted engine on the same paused guest.
        engine = MemvmSourceMigration(lab.api, "node-a", await lab.vmi(), lab.source, None)  # type: ignore[arg-type]
        engine.readopt_postcopy()
        await asyncio.wait_for(engine.run(), 30)
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        assert lab.target.guest.missing_pages().size == 0
        assert bytes(lab.target.guest.ram()) == bytes(lab.source.ram())
        assert lab.source.destroyed
        assert state.transfer["postCopyInterruptions"] >= 1 and state.transfer["digestVerified"]

    in_lab(tmp_path, body)


def test_a_restarted_target_is_found_by_the_source_reconnect_and_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def kill() -> None:
        raise _Killed("the target handler died")

    fired = arm(monkeypatch, memvm_target, failpoints.Step.TARGET_POSTCOPY, kill)

    async def body(lab: Lab) -> None:
        registry = lab.target.service.incoming
        old = lab.target.inc
        task, mover = await to_post_copy(lab)

        async def restart_target() -> IncomingMigration:
            await fired.wait()
            registry.forget(UID)  # the old handler's memory is gone with it
            old._state = TargetState.ABORTED  # its streams must not serve the new one
            await asyncio.sleep(0.3)  # the restart takes a while: the source retries
            inc = IncomingMigration.readopted_postcopy(
                "default", "vm", "vmi-uid", UID, TOKEN, "node-a", lab.target.guest, b"{}", 0.0
            )
            registry.expect(inc)
            return inc

        restarted = asyncio.create_task(restart_target())
        await asyncio.wait_for(task, 30)
        await mover
        inc = await restarted
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        assert state.mode is MigrationMode.POST_COPY
        assert inc.state is TargetState.POSTCOPY_DONE and inc.disconnected_since is None
        assert lab.target.guest.missing_pages().size == 0
        assert bytes(lab.target.guest.ram()) == bytes(lab.source.ram())
        assert state.transfer["postCopyInterruptions"] >= 1

    in_lab(tmp_path, body)


def test_a_restarted_source_finds_post_copy_completed_by_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def kill() -> None:
        raise asyncio.CancelledError

    arm(monkeypatch, postcopy_source, failpoints.Step.SOURCE_POSTCOPY, kill)

    async def body(lab: Lab) -> None:
        task, mover = await to_post_copy(lab)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await mover
        # Meanwhile every page arrived, the target forgot the migration and recorded it
        # completed (the source had gone between PostCopyDone and its own write).
        lab.target.service.incoming.forget(UID)
        await lab.api.patch(
            "VirtualMachineInstance",
            "default",
            "vm",
            {"status": {"migrationState": {"completed": True}}},
            subresource="status",
        )
        engine = MemvmSourceMigration(lab.api, "node-a", await lab.vmi(), lab.source, None)  # type: ignore[arg-type]
        engine.readopt_postcopy()
        await asyncio.wait_for(engine.run(), 30)
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        assert lab.source.destroyed

    in_lab(tmp_path, body)
