"""The handler's side of a user's pause (handler/vm_pause.py): the guest follows the
annotation, the condition and an Event say so, and a guest paused by anything else (a
migration's switchover) is never resumed here."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from handler.vm_pause import PauseKeeper
from vmferry.events import EventRecorder
from vmferry.objects import conditions
from vmferry.objects.kinds import PAUSE_ANNOTATION

Obj = dict[str, Any]


class Status:
    def __init__(self, state: str) -> None:
        self.state = state


class FakeHandle:
    def __init__(self, state: str = "running") -> None:
        self.state = state
        self.calls: list[str] = []

    async def status(self) -> Status:
        self.calls.append("status")
        return Status(self.state)

    async def pause(self) -> None:
        self.calls.append("pause")
        self.state = "paused"

    async def resume(self, device_state: bytes | None = None) -> None:
        self.calls.append("resume")
        self.state = "running"


class FakeApi:
    def __init__(self) -> None:
        self.written: list[Obj] = []
        self.events: list[Obj] = []

    async def update(self, obj: Obj, *, subresource: str = "") -> Obj:
        assert subresource == "status"
        self.written.append(obj)
        return obj

    async def create(self, obj: Obj) -> Obj:
        self.events.append(obj)
        return obj


def vmi(paused: bool | None, condition: bool = False) -> Obj:
    obj: Obj = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1", "namespace": "default", "uid": "u1", "annotations": {}},
        "status": {"phase": "Running", "conditions": []},
    }
    if paused is not None:
        obj["metadata"]["annotations"][PAUSE_ANNOTATION] = str(paused).lower()
    if condition:
        conditions.set_condition(
            obj["status"], "Paused", True, "PausedByUser", "VMI was paused by user"
        )
    return obj


def run(obj: Obj, handle: FakeHandle) -> FakeApi:
    async def go() -> FakeApi:
        api = FakeApi()
        events = EventRecorder(api, "vmferry-handler", "node1")  # type: ignore[arg-type]
        await PauseKeeper(api, events).reconcile(obj, handle)  # type: ignore[arg-type]
        await events.flush()
        return api

    return asyncio.run(go())


@pytest.mark.timeout(10)
def test_pause_then_unpause_follows_the_annotation() -> None:
    handle = FakeHandle()
    api = run(vmi(True), handle)
    assert handle.calls == ["status", "pause"]
    assert conditions.is_true(api.written[0], "Paused")
    assert [e["reason"] for e in api.events] == ["Paused"]
    api = run(vmi(False, condition=True), handle)
    assert handle.calls[-1] == "resume" and handle.state == "running"
    assert conditions.get(api.written[0], "Paused") is None  # removed, as KubeVirt does
    assert [e["reason"] for e in api.events] == ["Resumed"]


@pytest.mark.timeout(10)
def test_an_unpaused_vmi_costs_no_guest_call_and_foreign_pauses_are_left_alone() -> None:
    handle = FakeHandle("paused")  # paused by a migration's switchover, not by the user
    api = run(vmi(None), handle)
    assert handle.calls == [] and api.written == [] and api.events == []
    already = FakeHandle("paused")
    api = run(vmi(True, condition=True), already)
    assert already.calls == ["status"] and api.written == [] and api.events == []
