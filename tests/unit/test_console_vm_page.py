"""The console's VM page data (controller.console.Console.vm_detail) with a fake API: the
YAML of the VM and VMI, the VM's migrations, and its events, which are "none" on a server
without the Event kind."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controller.console import Console
from controller.console_pages import event_rows
from vmferry.errors import BadRequest, NotFound
from vmferry.informer import Informer

Obj = dict[str, Any]


def obj(kind: str, name: str, **extra: Any) -> Obj:
    return {"kind": kind, "metadata": {"namespace": "default", "name": name, "uid": name}, **extra}


def event(kind: str, name: str, reason: str, last: str, type_: str = "Normal") -> Obj:
    return {
        "kind": "Event",
        "metadata": {"namespace": "default", "name": f"{name}.{reason}"},
        "involvedObject": {"kind": kind, "namespace": "default", "name": name},
        "reason": reason,
        "message": f"{reason} happened",
        "type": type_,
        "count": 2,
        "firstTimestamp": "2026-01-01T00:00:00Z",
        "lastTimestamp": last,
        "source": {"component": "vmferry-controller"},
    }


class FakeApi:
    def __init__(self, objects: list[Obj], events: list[Obj] | None) -> None:
        self.objects = objects
        self.events = events  # None: the server has no Event kind

    async def get(self, kind: str, namespace: str, name: str) -> Obj:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise NotFound(f"{kind} {name} not found")

    async def list(self, kind: str, namespace: str = "") -> list[Obj]:
        if kind == "Event":
            if self.events is None:
                raise BadRequest('no kind "Event" is registered (known kinds: ...)')
            return self.events
        return [o for o in self.objects if o["kind"] == kind]


class _Source:
    async def list(self, kind: str, namespace: str | None) -> tuple[list[Any], str]:
        return [], "0"


def console() -> Console:
    inf = Informer(_Source(), "VirtualMachineInstanceMigration")  # type: ignore[arg-type]
    return Console(None, vmims=inf, vmis=inf, tls=None, clock=lambda: 0.0)  # type: ignore[arg-type]


OBJECTS = [
    obj("VirtualMachine", "web"),
    obj("VirtualMachineInstance", "web", status={"phase": "Running"}),
    obj(
        "VirtualMachineInstanceMigration",
        "m1",
        spec={"vmiName": "web"},
        status={"phase": "Failed"},
    ),
    obj("VirtualMachineInstanceMigration", "m2", spec={"vmiName": "other"}),
]


def test_vm_page_without_the_event_kind_has_no_events() -> None:
    page = asyncio.run(console().vm_detail(FakeApi(OBJECTS, None), "default", "web"))  # type: ignore[arg-type]
    assert page["events"] == []
    assert [m["name"] for m in page["migrations"]] == ["m1"]
    assert "kind: VirtualMachineInstance" in page["yaml"]["VirtualMachineInstance"]
    assert "kind: VirtualMachine\n" in page["yaml"]["VirtualMachine"]


def test_vm_page_lists_the_events_of_the_vm_and_its_vmi_newest_first() -> None:
    events = [
        event("VirtualMachine", "web", "Started", "2026-01-01T00:00:01Z"),
        event("VirtualMachineInstance", "web", "Migrated", "2026-01-01T00:00:09Z", "Warning"),
        event("VirtualMachineInstance", "other", "Migrated", "2026-01-01T00:00:05Z"),
        event("Node", "web", "NodeReady", "2026-01-01T00:00:05Z"),
    ]
    page = asyncio.run(console().vm_detail(FakeApi(OBJECTS, events), "default", "web"))  # type: ignore[arg-type]
    assert [(e["object"], e["reason"], e["type"]) for e in page["events"]] == [
        ("VirtualMachineInstance/web", "Migrated", "Warning"),
        ("VirtualMachine/web", "Started", "Normal"),
    ]
    assert page["events"][0]["count"] == 2
    assert page["events"][0]["source"] == "vmferry-controller"


def test_vm_page_of_an_unknown_vm_is_not_found_and_other_errors_pass() -> None:
    with pytest.raises(NotFound, match='no VirtualMachine or VirtualMachineInstance "default/x"'):
        asyncio.run(console().vm_detail(FakeApi(OBJECTS, []), "default", "x"))  # type: ignore[arg-type]

    class Refusing(FakeApi):
        async def list(self, kind: str, namespace: str = "") -> list[Obj]:
            raise BadRequest("field selector not supported")

    with pytest.raises(BadRequest, match="field selector"):
        asyncio.run(console().vm_detail(Refusing(OBJECTS, []), "default", "web"))  # type: ignore[arg-type]
    assert event_rows([], ("VirtualMachine",), "web") == []
