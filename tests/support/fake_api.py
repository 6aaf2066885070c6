"""An in-process API for unit tests: ``ApiClient``'s verbs over a real Store.

Engines, reconcilers and the arbiter take their API client as a parameter; unit tests
hand them a ``StoreApi`` instead of a gRPC client. The store is the real one (SQLite in
a temporary directory), so resourceVersion preconditions, Conflict and NotFound behave as
in a lab. ``fail_next`` queues errors the next calls raise (an API that goes away), and
``calls`` records every verb, for assertions about what was written.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controller.store import Store
from vmferry.errors import ApiError, Conflict
from vmferry.objects.patch import apply_json_patch, apply_merge_patch

Obj = dict[str, Any]


class StoreApi:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.fail_next: list[ApiError] = []
        self.calls: list[tuple[str, str, str, str]] = []  # (verb, kind, namespace, name)

    @classmethod
    async def open(cls, directory: Path) -> StoreApi:
        return cls(await Store.open(directory / "store.db"))

    async def close(self) -> None:
        await self.store.close()

    def _enter(self, verb: str, kind: str, namespace: str | None, name: str) -> None:
        self.calls.append((verb, kind, namespace or "", name))
        if self.fail_next:
            raise self.fail_next.pop(0)

    def writes(self, kind: str | None = None) -> list[tuple[str, str, str, str]]:
        """The calls that changed something (optionally of one kind)."""
        return [
            c
            for c in self.calls
            if c[0] in ("create", "update", "patch", "delete") and kind in (None, c[1])
        ]

    async def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> Obj:
        meta = obj.get("metadata") or {}
        self._enter("create", str(obj.get("kind")), meta.get("namespace"), meta.get("name", ""))
        return await self.store.create(copy.deepcopy(dict(obj)))

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj:
        self._enter("get", kind, namespace, name)
        return await self.store.get(kind, namespace or "", name)

    async def list(
        self, kind: str, namespace: str | None = None, **_: Any
    ) -> tuple[list[Obj], int]:
        self._enter("list", kind, namespace, "")
        return await self.store.list(kind, namespace)

    async def update(self, obj: Mapping[str, Any], *, subresource: str = "") -> Obj:
        meta = obj.get("metadata") or {}
        self._enter("update", str(obj.get("kind")), meta.get("namespace"), meta.get("name", ""))
        return await self.store.update(copy.deepcopy(dict(obj)), subresource=subresource or None)

    async def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: str = "merge",
        subresource: str = "",
        resource_version: str = "",
    ) -> Obj:
        self._enter("patch", kind, namespace, name)
        while True:  # as the API server: a patch without a precondition never conflicts
            current = await self.store.get(kind, namespace or "", name)
            if patch_type == "merge":
                new = apply_merge_patch(current, copy.deepcopy(patch))
            else:
                new = apply_json_patch(current, copy.deepcopy(patch))
            new["metadata"]["resourceVersion"] = (
                resource_version or current["metadata"]["resourceVersion"]
            )
            try:
                return await self.store.update(new, subresource=subresource or None)
            except Conflict:
                if resource_version:
                    raise

    async def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        resource_version: str = "",
        uid: str = "",
    ) -> Obj:
        self._enter("delete", kind, namespace, name)
        return await self.store.delete(
            kind, namespace or "", name, resource_version=resource_version or None, uid=uid or None
        )


class FakeClock:
    """A monotonic clock tests move by hand: ``clock()`` reads it, ``advance(s)`` moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
