"""When the source learns the commit decision (SourceEngine._commit / observe), with the
memvm engine against the real Transfer service and the real store (test_source_engine's
lab), and the VM manager's routing of VMI events to the engine it runs.

Proves: the Commit frame leaves as soon as this handler's watch shows ``switchover:
Committed`` for the migration, while the arbiter's answer is still on its way (the target
resumes before that answer), and the completion is written only after that answer;
``observe`` takes nothing but this migration's Committed; a cancelled commit leaves no
compare-and-set running; the VM manager hands a VMI event to the engine of the migration
it names.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handler.migration.memvm_source import MemvmSourceMigration
from tests.support.fake_api import StoreApi
from tests.unit.test_source_engine import UID, Lab, in_lab
from tests.unit.test_vm_incoming import MIG, SOURCE, manager, store_vmi, with_api
from vmferry.migration_state import Field, Switchover, raw

Obj = dict[str, Any]


def hold_the_commit_answer(lab: Lab, engine: MemvmSourceMigration) -> asyncio.Event:
    """The arbiter stores Committed and its watch event reaches the engine at once
    (``observe``, as VMManager._on_vmi_event does), but the answer to the
    compare-and-set waits until the returned event is set."""
    answer = asyncio.Event()
    update = lab.api.update

    async def held(obj: Obj, **kwargs: Any) -> Obj:
        written = await update(obj, **kwargs)
        if raw(written).get(Field.SWITCHOVER) == Switchover.COMMITTED:
            engine.observe(copy.deepcopy(written))
            await answer.wait()
        return written

    lab.api.update = held  # type: ignore[method-assign,assignment]
    return answer


def test_the_commit_frame_leaves_on_the_watch_before_the_arbiters_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="handler.migration.source")

    async def body(lab: Lab) -> None:
        lab.source.hot = np.arange(8, 24, dtype=np.int64)
        engine = await lab.engine()
        answer = hold_the_commit_answer(lab, engine)
        finishing = asyncio.Event()
        settle = engine._claim_settled

        async def settled() -> None:
            finishing.set()
            await settle()

        engine._claim_settled = settled  # type: ignore[method-assign]
        run = asyncio.create_task(engine.run())
        await asyncio.wait_for(finishing.wait(), 30)
        # The target resumed on the Commit frame and answered Resumed while the answer
        # is still held; the completion waits for it.
        assert "resume" in engine.stats.downtime_parts  # the target's Resumed came back
        assert lab.target.commits == 1 and lab.target.guest.state == "running"
        assert engine.committed and not answer.is_set()
        # the decision's log line (the fault tests time it) is written when it is known
        assert f"migration {UID}: switchover Committed recorded" in caplog.text
        state = await lab.state()
        assert state.switchover is Switchover.COMMITTED and not state.completed
        assert "destroy" not in lab.source.calls
        answer.set()
        await asyncio.wait_for(run, 30)
        state = await lab.state()
        assert state.completed and not state.failed, state.failure_reason
        assert "destroy" in lab.source.calls and "resume" not in lab.source.calls

    in_lab(tmp_path, body)


def test_observe_takes_only_this_migrations_committed(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        engine = await lab.engine()
        vmi = await lab.vmi()

        def seen(**ms: Any) -> bool:
            engine.observe({**vmi, "status": {"migrationState": ms}})
            return engine.decision_seen

        assert not seen(migrationUid=UID)  # no decision yet
        assert not seen(migrationUid=UID, switchover=Switchover.ABORTED)
        assert not seen(migrationUid="another-migration", switchover=Switchover.COMMITTED)
        assert not seen()  # no migration state at all
        assert seen(migrationUid=UID, switchover=Switchover.COMMITTED)

    in_lab(tmp_path, body)


def test_a_cancelled_commit_leaves_no_compare_and_set_running(tmp_path: Path) -> None:
    async def body(lab: Lab) -> None:
        engine = await lab.engine()
        stuck = asyncio.Event()

        async def never_answers(obj: Obj, **kwargs: Any) -> Obj:
            stuck.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        lab.api.update = never_answers  # type: ignore[method-assign,assignment]
        commit = asyncio.create_task(engine._commit())
        await asyncio.wait_for(stuck.wait(), 10)
        commit.cancel()
        await asyncio.gather(commit, return_exceptions=True)
        assert engine._claim is not None and engine._claim.cancelled()
        assert not engine.committed

    in_lab(tmp_path, body)


class Observer:
    def __init__(self) -> None:
        self.seen: list[Obj] = []

    def observe(self, vmi: Obj) -> None:
        self.seen.append(vmi)


@with_api
async def test_the_vm_manager_hands_vmi_events_to_the_engine_of_their_migration(
    api: StoreApi, tmp_path: Path
) -> None:
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.COMMITTED})
    vm = await manager(api, tmp_path, SOURCE, vmi)
    ours, other = Observer(), Observer()
    idle = asyncio.get_running_loop().create_future()
    vm.sources[MIG] = (ours, idle)  # type: ignore[assignment]
    vm.sources["another-migration"] = (other, idle)  # type: ignore[assignment]
    try:
        vm._on_vmi_event(("default", "vm"), None, vmi)
        vm._on_vmi_event(("default", "vm"), vmi, None)  # a deletion names no migration
        assert ours.seen == [vmi] and other.seen == []
    finally:
        idle.cancel()
