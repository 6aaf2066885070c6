"""The controller's read/write helpers over the store: an informer source, status writes
that validate, and phase bookkeeping shared by the reconcilers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from controller.store import Store
from vmferry.objects import schema
from vmferry.objects.labels import parse_selector

__all__ = ["StoreSource", "memory_of", "rfc3339", "set_phase", "write_status"]

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


def rfc3339(seconds: float, *, precise: bool = False) -> str:
    """A time (seconds since the epoch) as Kubernetes writes it: whole seconds, or with
    microseconds for phase transitions that happen in quick succession."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if precise else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.fromtimestamp(seconds, UTC).strftime(fmt)


def set_phase(status: Obj, phase: str, clock: Callable[[], float] = time.time) -> None:
    """Set ``status.phase`` and record the transition, at ``clock()``, in
    ``phaseTransitionTimestamps`` (once per phase: an attempt passes each phase once).
    A reconciler passes its own clock, so its timeouts and its records agree."""
    status["phase"] = phase
    stamps: list[Obj] = status.setdefault("phaseTransitionTimestamps", [])
    if not any(s.get("phase") == phase for s in stamps):
        stamps.append({"phase": phase, "phaseTransitionTimestamp": rfc3339(clock(), precise=True)})


def memory_of(vmi: Obj) -> int:
    return schema.memory_bytes(vmi.get("spec") or {})
