"""List-and-watch caches and a de-duplicating work queue: the shape every reconciler has.

An ``Informer`` keeps a local cache of one kind, fed by a list followed by a watch from
the list's resourceVersion. When the watch breaks it reconnects from the last version it
saw; when that version has expired (``Gone``) it relists and synthesizes the events the
gap hid. Each change calls the registered handlers with the object's key, nothing more:
reconcilers read the cache and act (level-triggered). A handler registered after the
first list is first called for every cached object (as client-go's AddEventHandler
does): a reconciler started late -- a replica that just became the leader -- sees the
objects that already exist, not only the changes after it started.

``WorkQueue`` holds keys: a key queued twice is processed once; a key being processed
and queued again is processed again afterwards; failures are retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

from vmferry.errors import ApiError, Gone

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Obj = dict[str, Any]
Handler = Callable[[Key, Obj | None, Obj | None], None]

RECONNECT_DELAY = 0.5  # s; first retry after a broken watch, doubled up to the max
RECONNECT_MAX_DELAY = 5.0  # s; a restarted controller is picked up within this


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata", {})
    return meta.get("namespace", ""), meta["name"]


class Source(Protocol):
    """Where an informer reads from: the API client or, in the controller, the store."""

    async def list(
        self, kind: str, namespace: str | None = None, label_selector: str = ""
    ) -> tuple[list[Obj], str]: ...

    def watch(
        self,
        kind: str = "",
        namespace: str | None = None,
        *,
        resource_version: str = "",
        label_selector: str = "",
        bookmark: bool = False,
    ) -> AsyncIterator[tuple[str, Obj]]: ...


class Informer:
    """Cache of one kind; call ``run()`` in a task, await ``synced`` before reading."""

    def __init__(self, source: Source, kind: str, *, namespace: str | None = None) -> None:
        self.source = source
        self.kind = kind
        self.namespace = namespace
        self.cache: dict[Key, Obj] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self._handlers: list[Handler] = []

    def add_handler(self, fn: Handler, *, replay: bool = True) -> None:
        """``fn(key, old, new)``; called in the event loop for every change; must not block.
        With ``replay`` (the default), first called as ``fn(key, None, obj)`` for every
        object already cached; ``replay=False`` for a handler whose owner sweeps the
        cache itself at start."""
        self._handlers.append(fn)
        if replay:
            for key, obj in list(self.cache.items()):
                fn(key, None, obj)

    @contextlib.contextmanager
    def handler_scope(self) -> Iterator[None]:
        """Handlers added inside the block are removed when it ends (the reconcilers of
        a leadership term: a replica that stops leading stops feeding their queues)."""
        before = list(self._handlers)
        try:
            yield
        finally:
            self._handlers = [fn for fn in self._handlers if fn in before]

    def get(self, namespace: str, name: str) -> Obj | None:
        obj = self.cache.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def items(self) -> list[Obj]:
        return [copy.deepcopy(o) for o in self.cache.values()]

    def _notify(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        for fn in self._handlers:
            fn(key, old, new)

    async def _relist(self) -> None:
        items, rv = await self.source.list(self.kind, self.namespace)
        fresh = {key_of(o): o for o in items}
        old_cache, self.cache = self.cache, fresh
        self.resource_version = rv
        for key, obj in fresh.items():
            old = old_cache.get(key)
            if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get(
                "resourceVersion"
            ):
                self._notify(key, old, obj)
        for key in old_cache.keys() - fresh.keys():
            self._notify(key, old_cache[key], None)

    def apply_event(self, etype: str, obj: Obj) -> None:
        """Fold one watch event into the cache (public for tests)."""
        rv = obj.get("metadata", {}).get("resourceVersion", "")
        if rv:
            self.resource_version = rv
        if etype == "BOOKMARK":
            return
        key = key_of(obj)
        old = self.cache.get(key)
        if etype == "DELETED":
            self.cache.pop(key, None)
            self._notify(key, old, None)
        else:
            self.cache[key] = obj
            self._notify(key, old, obj)

    async def run(self) -> None:
        """List, then watch forever; reconnects on failure. Cancel the task to stop."""
        delay = RECONNECT_DELAY
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                    self.synced.set()
                async for etype, obj in self.source.watch(
                    self.kind, self.namespace, resource_version=self.resource_version
                ):
                    self.apply_event(etype, obj)
                    delay = RECONNECT_DELAY
            except Gone:
                log.info("watch %s expired at rv %s: relisting", self.kind, self.resource_version)
                need_list = True
                continue
            except ApiError as e:
                log.debug("watch %s broken (%s); reconnecting in %.1fs", self.kind, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)


class WorkQueue:
    """De-duplicating queue of keys with per-key exponential backoff on failure."""

    def __init__(self, *, base_delay: float = 0.2, max_delay: float = 10.0) -> None:
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._again: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._soon: dict[Key, asyncio.TimerHandle] = {}  # add_soon's, never postponed
        self.base_delay = base_delay
        self.max_delay = max_delay

    def add(self, key: Key) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Key, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds (an earlier pending timer is replaced)."""
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, self._timers, key)

    def add_soon(self, key: Key, within: float) -> None:
        """Queue ``key`` within ``within`` seconds: a burst of events coalesces into one
        pass, and a pass that can wait that long leaves the CPU to whatever caused the
        events. A pass due sooner (a timer of add_soon, or the key queued) stays; a later
        add_after never postpones this one."""
        if key in self._queued:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + within
        old = self._soon.get(key)
        if old is not None:
            if old.when() <= due:
                return
            old.cancel()
        self._soon[key] = loop.call_at(due, self._fire, self._soon, key)

    def _fire(self, timers: dict[Key, asyncio.TimerHandle], key: Key) -> None:
        timers.pop(key, None)
        self.add(key)

    async def run(self, reconcile: Callable[[Key], Awaitable[None]], name: str) -> None:
        """Process keys forever, one at a time; failures requeue the key with backoff."""
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await reconcile(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = min(self.base_delay * 2 ** (n - 1), self.max_delay)
                level = logging.INFO if isinstance(e, ApiError) else logging.ERROR
                log.log(
                    level,
                    "%s: reconcile %s failed (attempt %d, retry in %.1fs): %s",
                    name,
                    "/".join(k for k in key if k),
                    n,
                    delay,
                    e,
                    exc_info=level == logging.ERROR,
                )
                self.add_after(key, delay)
            finally:
                self._active.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)
