"""QEMU post-copy on the source engine without QEMU (handler/migration/qemu_postcopy.py):
the fake QEMU, the stand-in Tunnel service and the fake clock of test_qemu_source.

- the hand-off: PostCopyStart → Verified, the arbiter's Committed (mode PostCopy),
  Commit → Resumed, QEMU completed → PostCopyEnd → PostCopyDone; the source QEMU is
  destroyed, never resumed;
- a paused post-copy (the tunnel broke): a new stream with Open.resume first, then
  ``migrate`` with ``resume`` (never the other way round); attempts while the target is
  unreachable are retried;
- beyond postCopyRecoveryWindowSeconds the VM is lost: the source destroyed, the
  migration and the VMI Failed with a reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from handler.migration.qemu_plan import QemuPlan
from tests.support.fake_api import FakeClock
from tests.unit.test_qemu_source import FakeTunnel, QemuLab, advance_when, in_lab, monitoring
from vmferry.migration_state import MigrationConfig, MigrationMode, Switchover, VMIPhase, raw

POSTCOPY = {"completionTimeoutPerGiB": 16, "allowPostCopy": True}  # 1 s for 64 MiB


async def until(ready: Callable[[], bool]) -> None:
    while True:
        if ready():
            break
        await asyncio.sleep(0.01)


def complete(lab: QemuLab) -> None:
    """The source QEMU completed: it closes its migration connections."""
    lab.qemu.migration = {"status": "completed"}
    for writer in lab.qemu.connections:
        writer.close()


def test_post_copy_hands_off_then_completes_and_destroys_the_source(tmp_path: Path) -> None:
    async def body(lab: QemuLab) -> None:
        clock = FakeClock()
        engine = await lab.engine(POSTCOPY, clock)
        mover = asyncio.create_task(advance_when(clock, monitoring(lab), 2))

        async def finish() -> None:
            await until(lambda: "commit" in lab.tunnel.control)
            complete(lab)

        finisher = asyncio.create_task(finish())
        await asyncio.wait_for(engine.run(), 20)
        await mover
        await finisher
        assert lab.tunnel.control == ["postcopy_start", "commit", "postcopy_end"]
        state = await lab.state()
        assert state.completed and not state.failed
        assert state.mode is MigrationMode.POST_COPY
        assert state.switchover is Switchover.COMMITTED
        assert "destroy" in lab.qemu.commands and "cont" not in lab.qemu.commands
        assert lab.qemu.resumes == []

    in_lab(tmp_path, body)


def test_a_paused_post_copy_resumes_on_a_new_stream_opened_first(tmp_path: Path) -> None:
    tunnel = FakeTunnel(refuse_resume=True)

    async def body(lab: QemuLab) -> None:
        clock = FakeClock()
        engine = await lab.engine(POSTCOPY, clock)
        mover = asyncio.create_task(advance_when(clock, monitoring(lab), 2))

        async def break_and_heal() -> None:
            await until(lambda: "commit" in lab.tunnel.control)
            lab.qemu.migration = {"status": "postcopy-paused"}
            # the first attempt meets an unreachable target: QEMU is not asked to resume
            await until(lambda: any(o.resume for o in lab.tunnel.opened))
            assert lab.qemu.resumes == []
            tunnel.refuse_resume = False
            await until(lambda: bool(lab.qemu.resumes))
            await asyncio.sleep(0.3)  # a poll or two in postcopy-active again
            complete(lab)

        healer = asyncio.create_task(break_and_heal())
        await asyncio.wait_for(engine.run(), 20)
        await mover
        await healer
        resumed = [o for o in lab.tunnel.opened if o.resume]
        assert len(resumed) >= 2 and all(o.channel_id == 0 for o in resumed)
        [arguments] = lab.qemu.resumes
        assert arguments["resume"] is True and arguments["uri"].startswith("unix:")
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        vmi = await lab.api.get("VirtualMachineInstance", "default", "vm")
        assert raw(vmi)["transfer"]["postCopyInterruptions"] == 1
        assert lab.tunnel.control[-1] == "postcopy_end"

    in_lab(tmp_path, body, tunnel)


def test_beyond_the_recovery_window_the_vm_is_lost_and_says_why(tmp_path: Path) -> None:
    tunnel = FakeTunnel(refuse_resume=True)

    async def body(lab: QemuLab) -> None:
        clock = FakeClock()
        engine = await lab.engine({**POSTCOPY, "postCopyRecoveryWindowSeconds": 5}, clock)
        mover = asyncio.create_task(advance_when(clock, monitoring(lab), 2))

        async def never_heal() -> None:
            await until(lambda: "commit" in lab.tunnel.control)
            lab.qemu.migration = {"status": "postcopy-paused"}
            await until(lambda: any(o.resume for o in lab.tunnel.opened))
            clock.advance(6)

        breaker = asyncio.create_task(never_heal())
        await asyncio.wait_for(engine.run(), 20)
        await mover
        await breaker
        state = await lab.state()
        assert state.failed and state.switchover is Switchover.COMMITTED
        assert "recovery window (5s, postCopyRecoveryWindowSeconds)" in state.failure_reason
        assert lab.qemu.commands[-1] != "cont" and "destroy" in lab.qemu.commands
        assert lab.qemu.resumes == []
        vmi = await lab.api.get("VirtualMachineInstance", "default", "vm")
        assert vmi["status"]["phase"] == VMIPhase.FAILED
        assert vmi["status"]["reason"] == "PostCopyFailed"

    in_lab(tmp_path, body, tunnel)


def test_bandwidth_per_migration_caps_pre_copy_only() -> None:
    plan = QemuPlan.from_config(
        MigrationConfig.from_dict({"allowPostCopy": True, "bandwidthPerMigration": "16Mi"})
    )
    params = plan.parameters()
    assert params["max-bandwidth"] == 16 << 20
    assert params["max-postcopy-bandwidth"] == 0  # unlimited, as KubeVirt's post-copy
    assert {c["capability"]: c["state"] for c in plan.capabilities()}["postcopy-ram"]
    pre = QemuPlan.from_config(MigrationConfig.from_dict({"bandwidthPerMigration": "16Mi"}))
    assert "max-postcopy-bandwidth" not in pre.parameters()
