"""``vmferry adm drain`` (vmferry/cli/adm_cmd.py) against an in-process API: where a VMI
is is read again before it is evacuated, and a failed evacuation makes the exit status 1.

A small fake controller (a task) plays the migrations: it finishes each evacuation the
drain creates the way the test says."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_api import StoreApi
from vmferry.cli import adm_cmd
from vmferry.migration_state import MigrationPhase

Obj = dict[str, Any]
NS = "default"
VMIM = "VirtualMachineInstanceMigration"
VMI = "VirtualMachineInstance"


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class StaleListApi(StoreApi):
    """Lists of VMIs answer from a snapshot for the first ``stale`` calls: the drain's
    look at the node happened before a concurrent migration moved the VM."""

    stale = 0
    snapshot: list[Obj] = []

    async def list(
        self, kind: str, namespace: str | None = None, **kw: Any
    ) -> tuple[list[Obj], int]:
        if kind == VMI and self.stale > 0:
            self.stale -= 1
            return [dict(v) for v in self.snapshot], 0
        return await super().list(kind, namespace, **kw)


async def _open(tmp_path: Path, api_type: type[StoreApi]) -> StoreApi:
    base = await StoreApi.open(tmp_path)
    api = api_type(base.store)
    for name in ("node1", "node2", "node3"):
        await api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    return api


async def _vmi(api: StoreApi, name: str, node: str) -> Obj:
    await api.create(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": VMI,
            "metadata": {"name": name, "namespace": NS},
            "spec": {"domain": {"memory": {"guest": "32Mi"}}},
        }
    )
    return await api.patch(
        VMI, NS, name, {"status": {"phase": "Running", "nodeName": node}}, subresource="status"
    )


async def _finish(api: StoreApi, vmim: Obj, phase: MigrationPhase, reason: str = "") -> None:
    status: Obj = {"phase": str(phase)}
    if reason:
        status["migrationState"] = {"failed": True, "failureReason": reason}
    await api.patch(VMIM, NS, vmim["metadata"]["name"], {"status": status}, subresource="status")


Controller = Callable[[StoreApi, Obj], Awaitable[None]]


async def _run_drain(api: StoreApi, controller: Controller | None) -> tuple[int, list[Obj]]:
    """The drain of node1 while ``controller`` handles each new evacuation once."""
    seen: set[str] = set()

    async def control() -> None:
        while True:
            for m in (await api.list(VMIM))[0]:
                if m["metadata"]["name"] not in seen and controller is not None:
                    seen.add(m["metadata"]["name"])
                    await controller(api, m)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(control())
    try:
        code = await adm_cmd.drain(api, "node1", force=False, timeout=10, poll=0.02)  # type: ignore[arg-type]
    finally:
        task.cancel()
    evacuations = [
        m
        for m in (await api.list(VMIM))[0]
        if adm_cmd.EVACUATION_ANNOTATION in (m["metadata"].get("annotations") or {})
    ]
    return code, evacuations


@pytest.mark.timeout(30)
@run_async
async def test_a_vm_a_concurrent_migration_moved_off_is_not_evacuated(tmp_path: Path) -> None:
    api = await _open(tmp_path, StaleListApi)
    assert isinstance(api, StaleListApi)
    before = await _vmi(api, "moved", "node1")
    # A user's migration moved it to node2 after the drain's first look (the snapshot).
    user = await api.create(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": VMIM,
            "metadata": {"name": "user-move", "namespace": NS},
            "spec": {"vmiName": "moved"},
        }
    )
    await _finish(api, user, MigrationPhase.SUCCEEDED)
    await api.patch(VMI, NS, "moved", {"status": {"nodeName": "node2"}}, subresource="status")
    api.snapshot, api.stale = [before], 2  # the selection and the first loop's look
    code, evacuations = await _run_drain(api, None)
    assert evacuations == [], "no evacuation for a VM that is no longer on the node"
    assert code == 0
    assert (await api.get(VMI, NS, "moved"))["status"]["nodeName"] == "node2"


@pytest.mark.timeout(30)
@run_async
async def test_the_drain_exits_1_when_an_evacuation_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = await _open(tmp_path, StoreApi)
    await _vmi(api, "vm-a", "node1")

    async def moved_elsewhere_then_failed(api: StoreApi, vmim: Obj) -> None:
        # The VM leaves node1 by another way, and the evacuation itself fails.
        await api.patch(VMI, NS, "vm-a", {"status": {"nodeName": "node3"}}, subresource="status")
        await _finish(api, vmim, MigrationPhase.FAILED, "the target node node2 did not prepare")

    code, evacuations = await _run_drain(api, moved_elsewhere_then_failed)
    assert len(evacuations) == 1
    assert code == 1
    err = capsys.readouterr().err
    assert "evacuation failed for default/vm-a: the target node node2 did not prepare" in err


@pytest.mark.timeout(30)
@run_async
async def test_the_drain_exits_1_after_every_attempt_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = await _open(tmp_path, StoreApi)
    await _vmi(api, "vm-b", "node1")

    async def fail(api: StoreApi, vmim: Obj) -> None:
        await _finish(api, vmim, MigrationPhase.FAILED, "lost the target")

    code, evacuations = await _run_drain(api, fail)
    assert code == 1 and len(evacuations) == adm_cmd.EVACUATION_ATTEMPTS
    assert "could not evacuate default/vm-b after 3 attempts: lost the target" in (
        capsys.readouterr().err
    )


@pytest.mark.timeout(30)
@run_async
async def test_a_retried_evacuation_that_succeeds_drains_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = await _open(tmp_path, StoreApi)
    await _vmi(api, "vm-c", "node1")
    calls = [0]

    async def fail_once(api: StoreApi, vmim: Obj) -> None:
        calls[0] += 1
        if calls[0] == 1:
            await _finish(api, vmim, MigrationPhase.FAILED, "timeout")
            return
        await api.patch(VMI, NS, "vm-c", {"status": {"nodeName": "node2"}}, subresource="status")
        await _finish(api, vmim, MigrationPhase.SUCCEEDED)

    code, evacuations = await _run_drain(api, fail_once)
    assert code == 0 and len(evacuations) == 2
    assert "node/node1 drained (1 VMIs live-migrated)" in capsys.readouterr().out
