"""The controller's read/write helpers over the store: an informer source, status writes
that validate, and phase bookkeeping shared by the reconcilers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from controller.store import Store
from vmferry.objects import schema
from vmferry.objects.conditions import set_phase

__all__ = ["StoreSource", "memory_of", "set_phase", "write_status"]
from vmferry.objects.labels import parse_selector

Obj = dict[str, Any]


class StoreSource:
    """Lets an ``Informer`` read the store in-process, as handlers read the API."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def list(
        self, kind: str, namespace: str | None = None, label_selector: str = ""
    ) -> tuple[list[Obj], str]:
        selector = parse_selector(label_selector) if label_selector else None
        items, rv = await self.store.list(kind, namespace, selector)
        return items, str(rv)

    async def watch(
        self,
        kind: str = "",
        namespace: str | None = None,
        *,
        resource_version: str = "",
        label_selector: str = "",
        bookmark: bool = False,
    ) -> AsyncIterator[tuple[str, Obj]]:
        selector = parse_selector(label_selector) if label_selector else None
        since = int(resource_version or 0) or await self.store.current_rv()
        async for event in self.store.watch(kind or None, namespace, since, selector):
            yield event


async def write_status(store: Store, obj: Obj) -> Obj:
    """Validate and write ``obj.status`` with its resourceVersion as precondition."""
    checked = schema.validate(obj, server_managed=True)  # a normalized copy: obj untouched
    return await store.update(checked, subresource="status")


def memory_of(vmi: Obj) -> int:
    return schema.memory_bytes(vmi.get("spec") or {})
