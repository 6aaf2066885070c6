"""Events (core/v1 ``Event``, as Kubernetes records them): the one recorder every daemon uses.

An :class:`EventRecorder` belongs to one component (``virt-controller``-like names:
``vmferry-controller``, ``vmferry-handler``, ``vmferry-sync-controller``) on one host. A
reconciler calls :meth:`EventRecorder.event` (a plain, non-async call): the event is queued
and written by a background task, so recording never blocks the caller and a failed
write (API down, refused) is logged, never raised into the caller's work — what
client-go's broadcaster does.

Deduplication is Kubernetes' correlator's: an event with the same involved object,
type, reason and message as one this recorder wrote before updates that Event —
``count`` + 1 and ``lastTimestamp`` — instead of creating another. The recorder keeps the
last :data:`CACHE_SIZE` such keys (least recently used out first). Old Events are deleted
by the controller (``controller.event_ttl``), ``--event-ttl`` of kube-apiserver.

Reasons are KubeVirt's where KubeVirt has one (:class:`Reason`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from vmferry.errors import ApiError, Conflict, NotFound
from vmferry.objects import kinds

log = logging.getLogger(__name__)

Obj = dict[str, Any]

EVENT_KIND = "Event"
CACHE_SIZE = 4096  # client-go's maxLruCacheEntries
QUEUE_SIZE = 1000  # client-go's maxQueuedEvents: beyond it, new events are dropped (logged)
MAX_MESSAGE_CHARS = 1024  # Kubernetes truncates an event's message at 1 KiB
# A cluster-scoped object's events live here (as Kubernetes records a Node's in "default").
CLUSTER_EVENTS_NAMESPACE = "default"


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


class Reason(StrEnum):
    """Event reasons. KubeVirt's own spelling where it has one (virt-controller's
    ``SuccessfulCreate``/``FailedCreate``/``SuccessfulMigration``/``FailedMigration``/
    ``SuccessfulAbortMigration``, virt-handler's ``Started``/``Stopped``/``Migrating``/
    ``Migrated``/``PreparingTarget``/``SyncFailed``); vmferry's otherwise."""

    SUCCESSFUL_CREATE = "SuccessfulCreate"
    FAILED_CREATE = "FailedCreate"
    SUCCESSFUL_DELETE = "SuccessfulDelete"
    STARTED = "Started"
    STOPPED = "Stopped"
    SYNC_FAILED = "SyncFailed"
    PAUSED = "Paused"
    RESUMED = "Resumed"
    MIGRATING = "Migrating"
    MIGRATED = "Migrated"
    PREPARING_TARGET = "PreparingTarget"
    SUCCESSFUL_MIGRATION = "SuccessfulMigration"
    FAILED_MIGRATION = "FailedMigration"
    SUCCESSFUL_ABORT_MIGRATION = "SuccessfulAbortMigration"
    # vmferry's: a migration waits for a parallel-migration slot (a throttle).
    MIGRATION_PENDING = "MigrationPending"
    MIGRATION_SCHEDULED = "MigrationScheduled"
    # vmferry's: a post-copy migration switched the guest over to the target.
    POST_COPY_SWITCH = "PostCopySwitch"
    # vmferry's: the controller corrected a record a handler left unfinished.
    MIGRATION_REPAIRED = "MigrationRepaired"
    # Kubernetes' scheduler's, for the VMI (vmferry places VMIs itself: no pods).
    SCHEDULED = "Scheduled"
    FAILED_SCHEDULING = "FailedScheduling"
    NODE_NOT_READY = "NodeNotReady"
    NODE_READY = "NodeReady"


class EventWriter(Protocol):
    """What the recorder writes through: ``vmferry.client.ApiClient`` (handlers, sync
    controllers) or the controller's store."""

    async def create(self, obj: Obj, /) -> Obj: ...

    async def update(self, obj: Obj, /) -> Obj: ...


@dataclass(frozen=True)
class InvolvedObject:
    kind: str
    namespace: str
    name: str
    uid: str
    api_version: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> InvolvedObject:
        meta = obj.get("metadata") or {}
        kind = str(obj.get("kind", ""))
        api_version = str(obj.get("apiVersion") or "")
        if not api_version and kind in kinds.BY_KIND:
            api_version = kinds.BY_KIND[kind].api_version
        return cls(
            kind,
            str(meta.get("namespace") or ""),
            str(meta.get("name") or ""),
            str(meta.get("uid") or ""),
            api_version,
        )

    def as_dict(self) -> Obj:
        ref: Obj = {"kind": self.kind, "name": self.name, "apiVersion": self.api_version}
        if self.namespace:
            ref["namespace"] = self.namespace
        if self.uid:
            ref["uid"] = self.uid
        return ref


@dataclass(frozen=True)
class _Key:
    involved: InvolvedObject
    type: EventType
    reason: str
    message: str


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_namespace(involved: InvolvedObject) -> str:
    return involved.namespace or CLUSTER_EVENTS_NAMESPACE


def new_event(
    involved: InvolvedObject,
    type_: EventType,
    reason: str,
    message: str,
    *,
    component: str,
    host: str,
    now: float,
    name_ns: int | None = None,
) -> Obj:
    """A fresh Event object (count 1), named ``<involved name>.<nanoseconds hex>`` as
    client-go names them (``name_ns``: those nanoseconds, default ``now``'s)."""
    stamp = timestamp(now)
    source: Obj = {"component": component}
    if host:
        source["host"] = host
    return {
        "apiVersion": "v1",
        "kind": EVENT_KIND,
        "metadata": {
            "name": f"{involved.name}.{name_ns if name_ns is not None else int(now * 1e9):x}",
            "namespace": event_namespace(involved),
        },
        "involvedObject": involved.as_dict(),
        "reason": reason,
        "message": message,
        "type": str(type_),
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": source,
        "reportingComponent": component,
        "reportingInstance": host,
    }


class EventRecorder:
    """Records Events for one component; see the module docstring."""

    def __init__(
        self,
        writer: EventWriter,
        component: str,
        host: str = "",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.component = component
        self.host = host
        self.clock = clock
        self._queue: asyncio.Queue[tuple[_Key, float]] = asyncio.Queue(QUEUE_SIZE)
        self._cache: OrderedDict[_Key, Obj] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._last_ns = 0  # names are unique per recorder even when the clock stands still
        self.dropped = 0  # events lost to a full queue
        self.failed = 0  # writes the API refused or could not take

    def event(self, obj: Mapping[str, Any], type_: EventType, reason: str, message: str) -> None:
        """Queue an event about ``obj`` (any stored object); returns at once. Outside a
        running event loop (a synchronous test) the event is dropped and logged."""
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        key = _Key(InvolvedObject.of(obj), type_, reason, message)
        try:
            self._queue.put_nowait((key, self.clock()))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("event dropped (queue full): %s %s: %s", type_, reason, message)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.warning("event dropped (no event loop): %s %s: %s", type_, reason, message)
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name=f"events-{self.component}")

    def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        self.event(obj, EventType.WARNING, reason, message)

    def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        self.event(obj, EventType.NORMAL, reason, message)

    async def flush(self) -> None:
        """Wait until every queued event was written (or its write failed)."""
        await self._queue.join()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _drain(self) -> None:
        while True:
            key, when = await self._queue.get()
            try:
                await self._write(key, when)
            except ApiError as e:
                self.failed += 1
                log.warning(
                    "could not record event %s %s on %s %s/%s: %s",
                    key.type,
                    key.reason,
                    key.involved.kind,
                    key.involved.namespace,
                    key.involved.name,
                    e.message,
                )
            except Exception:  # an event must never take the daemon down
                self.failed += 1
                log.exception("could not record event %s %s", key.type, key.reason)
            finally:
                self._queue.task_done()

    async def _write(self, key: _Key, when: float) -> None:
        previous = self._cache.get(key)
        if previous is not None:
            bumped = dict(previous)
            bumped["count"] = int(previous.get("count") or 1) + 1
            bumped["lastTimestamp"] = timestamp(when)
            try:
                self._remember(key, await self.writer.update(bumped))
                return
            except (NotFound, Conflict):
                # Expired (TTL) or changed elsewhere: start a new series, as the
                # correlator does when its patch fails.
                self._cache.pop(key, None)
        self._last_ns = max(int(when * 1e9), self._last_ns + 1)
        created = await self.writer.create(
            new_event(
                key.involved,
                key.type,
                key.reason,
                key.message,
                component=self.component,
                host=self.host,
                now=when,
                name_ns=self._last_ns,
            )
        )
        self._remember(key, created)

    def _remember(self, key: _Key, stored: Obj) -> None:
        self._cache[key] = stored
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


def involves(event: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    """``event`` is about ``obj`` (same kind, namespace and name; same uid when both have
    one: a VMI deleted and created again under its name has events of its own)."""
    ref = event.get("involvedObject") or {}
    mine = InvolvedObject.of(obj)
    if (ref.get("kind"), ref.get("namespace") or "", ref.get("name")) != (
        mine.kind,
        mine.namespace,
        mine.name,
    ):
        return False
    return not (ref.get("uid") and mine.uid and ref["uid"] != mine.uid)
