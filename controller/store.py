"""The controller's state store: Kubernetes-shaped objects, in SQLite (the default) or
etcd (``store = "etcd"``, for replicated controllers).

Objects are plain JSON dicts (``apiVersion``, ``kind``, ``metadata``, ``spec``,
``status``). The store does not validate schemas (the API layer does) but owns the
metadata bookkeeping: ``uid``, ``creationTimestamp``, ``generation``,
``resourceVersion``, ``deletionTimestamp`` and finalizer-driven removal, with
Kubernetes semantics (``controller.store_core``, shared by both backends).

Key facts:

* ``Store`` is the front: the read cache, the watch fan-out and the verbs; a backend
  commits writes and replays history (``store_core.Backend``): ``store_sqlite`` (one
  file, WAL, a worker thread) or ``store_etcd`` (etcd v3: resourceVersion is the etcd
  revision, writes are transactions comparing mod_revision).
* One global, monotonic resourceVersion: every write bumps it by exactly one and makes
  exactly one event. An update that changes nothing is not a write.
* Reads (``get``, ``list``, ``current_rv``) are served on the event loop from an
  in-memory copy of the objects -- the watch cache of kube-apiserver -- loaded when the
  store opens and kept by the same committed events the watchers get, applied before
  them. A write returns only once its event is applied, so a read after a write sees it
  (a binding is in force once its create returns); a read costs no trip to the backend.
  The same step keeps ``Store.index`` (``controller.sched_index``): Nodes, memory in
  use per node and the migration queue, for placement and admission.
* A watch replays the backend's history after its resourceVersion, then follows the
  live events, without gap or duplicate; history no longer kept gives Gone ("too old
  resourceVersion": list again).
* Objects crossing the API are copies: callers may mutate what they pass in or get back.
  A ``Store`` belongs to the event loop that opened it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Literal

from controller.sched_index import SchedulingIndex
from controller.store_core import (
    Backend,
    EventType,
    JsonWatchEvent,
    Obj,
    StoreEvent,
    Subscriber,
    WatchEvent,
    clone,
    resource,
)
from controller.store_sqlite import SqliteBackend, too_old
from vmferry.errors import NotFound, Unavailable
from vmferry.objects.labels import Selector

__all__ = ["EventType", "JsonWatchEvent", "Store", "WatchEvent"]

_ObjList = list[Obj]
_LabelRows = list[tuple[str, str, dict[str, str]]]


class Store:
    """The object store. Open with ``await Store.open(path)`` (SQLite) or
    ``controller.store_etcd.open_etcd_store`` (etcd); close with ``close()``.

    All methods are coroutines except ``watch`` (an async generator: ``aclose()`` it, or
    leave its ``async for``, to unsubscribe). Raises
    ``vmferry.errors`` ApiErrors (NotFound, AlreadyExists, Conflict, Gone, Invalid,
    BadRequest, Unavailable once closed).
    """

    def __init__(self, backend: Backend, watch_queue_limit: int) -> None:
        """Internal: use ``Store.open`` / ``open_etcd_store``."""
        self.backend = backend
        self._watch_queue_limit = watch_queue_limit
        self._subscribers: set[Subscriber] = set()
        self._closed = False
        # The read cache: kind -> (namespace, name) -> (labels, object JSON), as of
        # resourceVersion _cache_rv. Changed only on the loop, by publish.
        self._objects: dict[str, dict[tuple[str, str], tuple[dict[str, str], str]]] = {}
        self._cache_rv = 0
        # Placement's and admission's view, kept with the read cache (sched_index).
        self.index = SchedulingIndex()
        self._rv_waiters: list[tuple[int, asyncio.Future[None]]] = []

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        history: int = 20000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        watch_queue_limit: int = 10000,
    ) -> Store:
        """Open (creating if needed) the SQLite store at ``path``.

        ``history`` is how many events are kept for watch replay; ``watch_queue_limit``
        bounds each live watcher's in-memory backlog (beyond it the watcher catches up
        from the backend). Raises RuntimeError if the file cannot be opened in WAL mode or
        has an unknown schema version, and sqlite3 errors for unreadable files.
        """
        if history < 0:
            raise ValueError(f"history must be >= 0, not {history}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f'synchronous must be "NORMAL" or "FULL", not {synchronous!r}')
        backend = SqliteBackend(Path(path), history, synchronous)
        await backend.open()
        return await cls.on(backend, watch_queue_limit=watch_queue_limit)

    @classmethod
    async def on(cls, backend: Backend, *, watch_queue_limit: int = 10000) -> Store:
        """The store over an opened ``backend``: load the cache, start the feed. Closes
        the backend when that fails."""
        store = cls(backend, watch_queue_limit)
        try:
            rows, store._cache_rv = await backend.snapshot()
            store._load(rows)
            await backend.start(store)
        except BaseException:
            await backend.close()
            raise
        return store

    @property
    def path(self) -> Path | None:
        """The SQLite file (None on etcd)."""
        return self.backend.path if isinstance(self.backend, SqliteBackend) else None

    async def close(self) -> None:
        """Close the backend; running watches end (after their pending events), later
        calls raise Unavailable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for subscriber in list(self._subscribers):
            subscriber.close()
        for _, waiter in self._rv_waiters:
            if not waiter.done():
                waiter.set_exception(Unavailable("the object store is closed"))
        self._rv_waiters.clear()
        await self.backend.close()

    # --- the feed (store_core.StoreFeed) ---------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the object store is closed")

    def cache_rv(self) -> int:
        return self._cache_rv

    def cached(self, kind: str, namespace: str, name: str) -> str | None:
        entry = self._objects.get(kind, {}).get((namespace, name))
        return None if entry is None else entry[1]

    def publish(self, events: list[StoreEvent]) -> None:
        """Event loop: apply committed events to the read cache, then fan them out to
        the live watchers and wake the writers waiting for them."""
        for event in events:
            objects = self._objects.setdefault(event.kind, {})
            if event.type == "DELETED":
                objects.pop((event.namespace, event.name), None)
                self.index.apply(event.kind, event.namespace, event.name, None)
            else:
                objects[(event.namespace, event.name)] = (event.labels, event.data)
                self.index.apply(event.kind, event.namespace, event.name, event.data)
            self._cache_rv = max(self._cache_rv, event.rv)
        for subscriber in list(self._subscribers):
            for event in events:
                subscriber.offer(event)
        if self._rv_waiters:
            waiting = []
            for rv, waiter in self._rv_waiters:
                if rv <= self._cache_rv:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    waiting.append((rv, waiter))
            self._rv_waiters = waiting

    def reset(self, rows: list[tuple[str, str, str, dict[str, str], str]], rv: int) -> None:
        """Event loop: replace the read cache by a fresh snapshot at ``rv`` (the backend
        lost history it cannot replay); every watcher is told to list again."""
        self._load(rows)
        self._cache_rv = rv
        self.expire_watchers()
        self.publish([])

    def _load(self, rows: list[tuple[str, str, str, dict[str, str], str]]) -> None:
        """Fill the read cache and the scheduling index from a snapshot."""
        self._objects = {}
        self.index = SchedulingIndex()
        for kind, namespace, name, labels, data in rows:
            self._objects.setdefault(kind, {})[(namespace, name)] = (labels, data)
            self.index.apply(kind, namespace, name, data)

    def expire_watchers(self) -> None:
        for subscriber in list(self._subscribers):
            subscriber.close(expired=True)

    async def wait_for_rv(self, rv: int) -> None:
        """Until the read cache has applied revision ``rv`` (read-your-writes)."""
        if rv <= self._cache_rv:
            return
        self._check_open()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rv_waiters.append((rv, waiter))
        await waiter

    # --- verbs -----------------------------------------------------------------------

    async def create(self, obj: Obj) -> Obj:
        """Create ``obj``; return the stored object (uid, creationTimestamp, generation=1,
        resourceVersion set; name generated from ``generateName`` if not given).

        Raises Invalid (no kind, no name/generateName), AlreadyExists, BadRequest (not JSON).
        """
        self._check_open()
        return await self.backend.create(clone(obj))

    async def get(self, kind: str, namespace: str, name: str) -> Obj:
        """Return the object; raise NotFound (``virtualmachineinstances "vm1" not found``)."""
        self._check_open()
        entry = self._objects.get(kind, {}).get((namespace, name))
        if entry is None:
            raise NotFound(f'{resource(kind)} "{name}" not found')
        obj: Obj = json.loads(entry[1])
        return obj

    async def list(
        self, kind: str, namespace: str | None = None, selector: Selector | None = None
    ) -> tuple[_ObjList, int]:
        """Return (objects sorted by namespace then name, current resourceVersion).

        ``namespace=None`` lists all namespaces; ``""`` lists cluster-scoped objects. The
        resourceVersion is consistent with the items: watch from it to see later changes.
        """
        self._check_open()
        objects = self._objects.get(kind, {})
        keys = sorted(
            objects if namespace is None else (key for key in objects if key[0] == namespace)
        )
        wanted = None if selector is None or selector.empty() else selector
        items = [
            json.loads(data)
            for labels, data in (objects[key] for key in keys)
            if wanted is None or wanted.matches(labels)
        ]
        return items, self._cache_rv

    def list_labels(self, kind: str, namespace: str | None = None) -> _LabelRows:
        """(namespace, name, labels) of every object of ``kind`` (``namespace`` as in
        ``list``), sorted, from the read cache without decoding any object: for a scan
        that needs only the labels. The label dicts are copies."""
        self._check_open()
        objects = self._objects.get(kind, {})
        keys = sorted(
            objects if namespace is None else (key for key in objects if key[0] == namespace)
        )
        return [(ns, name, dict(objects[(ns, name)][0])) for ns, name in keys]

    async def update(self, obj: Obj, *, subresource: str | None = None) -> Obj:
        """Replace an object; return the stored result.

        With ``metadata.resourceVersion`` set it must match (else Conflict); unset means
        last writer wins. uid/creationTimestamp/generation/deletionTimestamp are kept.
        ``subresource=None`` keeps the stored status and bumps generation when anything
        but metadata/status changed; ``"status"`` takes only ``status`` from ``obj``.
        An update that changes nothing returns the stored object without a write. An
        object being deleted whose finalizers become empty is removed (DELETED event).
        Raises NotFound, Conflict, Invalid, BadRequest (unknown subresource).
        """
        self._check_open()
        return await self.backend.update(clone(obj), subresource)

    async def delete(
        self,
        kind: str,
        namespace: str,
        name: str,
        *,
        resource_version: str | None = None,
        uid: str | None = None,
    ) -> Obj:
        """Delete an object; return its last state.

        With finalizers the object is only marked (deletionTimestamp set, generation
        bumped, MODIFIED) and stays until an update empties its finalizers. Raises
        NotFound, or Conflict when a ``resource_version``/``uid`` precondition fails.
        """
        self._check_open()
        return await self.backend.delete(kind, namespace, name, resource_version, uid)

    async def current_rv(self) -> int:
        """The resourceVersion of the latest committed write (0 for an empty store)."""
        self._check_open()
        return self._cache_rv

    async def watch(
        self,
        kind: str | None,
        namespace: str | None,
        since_rv: int,
        selector: Selector | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Yield ``(type, object)`` for every change with resourceVersion > ``since_rv``.

        ``kind``/``namespace`` None mean all. Replays history first, then follows live
        changes, without gap or duplicate; events arrive in resourceVersion order. With
        a selector, a MODIFIED object that starts (stops) matching is reported as ADDED
        (DELETED). Raises Gone when iteration starts (or while catching up) if events
        after ``since_rv`` are no longer kept, or when the store had to reload its cache
        (etcd compacted past a lost connection): list again. Ends when the store closes.
        Each yielded object is a fresh copy.
        """
        async with contextlib.aclosing(
            self.watch_json(kind, namespace, since_rv, selector)
        ) as events:
            async for event in events:
                yield event.type, json.loads(event.data)

    async def watch_json(
        self,
        kind: str | None,
        namespace: str | None,
        since_rv: int,
        selector: Selector | None = None,
    ) -> AsyncGenerator[JsonWatchEvent, None]:
        """``watch`` with each object as the stored JSON text, not parsed: what the API
        forwards to its watchers without decoding and encoding it again."""
        self._check_open()
        cursor = since_rv
        while True:
            subscriber = Subscriber(kind, namespace, self._watch_queue_limit)
            # Subscribe before reading history: anything committed after the read is in
            # the inbox, anything before it is in the read; duplicates are skipped by rv.
            self._subscribers.add(subscriber)
            try:
                if cursor < self._cache_rv:
                    pages = self.backend.replay(cursor, kind, namespace, self._cache_rv)
                    async with contextlib.aclosing(pages):  # type: ignore[type-var]
                        async for events, scanned in pages:
                            for event in events:
                                if event.rv <= cursor:
                                    continue
                                cursor = event.rv
                                seen = event.seen_as(selector)
                                if seen is not None:
                                    yield JsonWatchEvent(seen, event.kind, event.rv, event.data)
                            cursor = max(cursor, scanned)
                while not subscriber.overflowed:
                    if subscriber.pending:
                        event = subscriber.pending.popleft()
                        if event.rv <= cursor:
                            continue
                        cursor = event.rv
                        seen = event.seen_as(selector)
                        if seen is not None:
                            yield JsonWatchEvent(seen, event.kind, event.rv, event.data)
                    elif subscriber.expired:
                        raise too_old(cursor, self._cache_rv)
                    elif subscriber.closed:
                        return
                    else:
                        subscriber.wakeup.clear()
                        await subscriber.wakeup.wait()
                # Overflowed: too slow for the live feed; catch up from the backend.
            finally:
                self._subscribers.discard(subscriber)
