"""What every store backend shares: the object bookkeeping of Kubernetes (uid,
generation, resourceVersion preconditions, finalizers, no-op updates) as pure functions,
the committed-event record, a live watcher's inbox and the backend interface.

``controller.store.Store`` is the front (read cache, watch fan-out) over a backend:
SQLite (``controller.store``, the default) or etcd (``controller.store_etcd``). A backend
only commits writes and replays history; the rules of what a write does live here, once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol

from vmferry.errors import AlreadyExists, BadRequest, Conflict, Invalid, NotFound
from vmferry.objects.kinds import BY_KIND
from vmferry.objects.labels import Selector

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
WatchEvent = tuple[str, Obj]

NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generateName alphabet
GENERATE_ATTEMPTS = 16
MODIFIED_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
# Fields the caller cannot change through an update.
_KEPT_ON_UPDATE = (
    "uid",
    "creationTimestamp",
    "generation",
    "generateName",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


def now() -> str:
    """RFC 3339 UTC timestamp with second precision: ``2026-01-01T00:00:00Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix() -> str:
    """Five random characters for generateName (a module function so tests can pin it)."""
    return "".join(secrets.choice(NAME_ALPHABET) for _ in range(5))


def generate_exhausted(kind: str, generate: str) -> AlreadyExists:
    return AlreadyExists(
        f'{resource(kind)} "{generate}": {GENERATE_ATTEMPTS} generated names '
        f"were all taken; retry, or use a longer generateName"
    )


def check_subresource(subresource: str | None) -> None:
    if subresource not in (None, "status"):
        raise BadRequest(f'unknown subresource "{subresource}" (only "status" exists)')


def resource(kind: str) -> str:
    """The plural used in messages: ``virtualmachineinstances``, else ``kind.lower()``."""
    known = BY_KIND.get(kind)
    return known.plural if known is not None else kind.lower()


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def differ(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values would be stored differently. Unequal values always
    are (the store holds no NaN, the one value unequal to itself); equal ones may still
    differ in type (1, 1.0 and true compare equal): only those are serialized to tell.
    Most updates change something, and the two canonical encodings of a VMI cost
    ~0.1 ms of the store's thread."""
    return a != b or _canonical(a) != _canonical(b)


def clone(obj: Any, what: str = "object") -> Any:
    """Deep copy through JSON; raise BadRequest when ``obj`` is not JSON-serialisable."""
    try:
        return json.loads(dumps(obj))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"the {what} is not representable as JSON: {exc}") from None


def labels_of(meta: Obj) -> dict[str, str]:
    labels = meta.get("labels")
    return dict(labels) if isinstance(labels, dict) else {}


def _spec_part(obj: Obj) -> Obj:
    """Everything generation tracks: all top-level fields but metadata/status/kind/apiVersion."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def identity(obj: Any, *, need_name: bool = True) -> tuple[str, str, str, Obj]:
    """Validate the shape the store relies on; return (kind, namespace, name, metadata).

    Normalises the cluster-scoped namespace: ``""`` or absent → no ``namespace`` key.
    """
    if not isinstance(obj, dict):
        raise Invalid(f"an object must be a JSON object, not {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise Invalid("kind: Required value: the object has no kind")
    meta = obj.get("metadata")
    if meta is None:
        meta = obj["metadata"] = {}
    if not isinstance(meta, dict):
        raise Invalid("metadata: Invalid value: must be an object")
    namespace = meta.get("namespace") or ""
    if not isinstance(namespace, str):
        raise Invalid("metadata.namespace: Invalid value: must be a string")
    if not namespace:
        meta.pop("namespace", None)
    name = meta.get("name") or ""
    if not isinstance(name, str):
        raise Invalid("metadata.name: Invalid value: must be a string")
    if need_name and not name:
        raise Invalid("metadata.name: Required value: name is required")
    return kind, namespace, name, meta


def generate_name_of(meta: Obj, name: str) -> str:
    """The ``generateName`` prefix a create uses ("" when a name is given); raises
    Invalid when neither is usable."""
    generate = meta.get("generateName") or ""
    if not isinstance(generate, str):
        raise Invalid("metadata.generateName: Invalid value: must be a string")
    if not name and not generate:
        raise Invalid("metadata.name: Required value: name or generateName is required")
    return "" if name else generate


def stamp_created(meta: Obj, name: str) -> None:
    """The bookkeeping of a create: the chosen name, a new uid, now, generation 1."""
    meta["name"] = name
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now()
    meta["generation"] = 1
    meta.pop("deletionTimestamp", None)
    meta.pop("deletionGracePeriodSeconds", None)


def plan_update(
    obj: Obj, meta: Obj, subresource: str | None, stored: Obj | None, kind: str, name: str
) -> tuple[Obj, EventType | None]:
    """What an update of ``stored`` (None: missing) by ``obj`` writes: (the new object,
    MODIFIED / DELETED (finalizers emptied while terminating) / None for a no-op, which
    returns ``stored``). The new object keeps ``stored``'s resourceVersion; the backend
    stamps the new one. Raises NotFound, Conflict."""
    if stored is None:
        raise NotFound(f'{resource(kind)} "{name}" not found')
    stored_meta = stored["metadata"]
    wanted_rv = meta.get("resourceVersion")
    if wanted_rv not in (None, "") and str(wanted_rv) != stored_meta["resourceVersion"]:
        raise Conflict(
            f'Operation cannot be fulfilled on {resource(kind)} "{name}": {MODIFIED_MESSAGE}'
        )
    wanted_uid = meta.get("uid")
    if wanted_uid not in (None, "") and wanted_uid != stored_meta["uid"]:
        raise Conflict(
            f'Operation cannot be fulfilled on {resource(kind)} "{name}": '
            f"Precondition failed: UID in precondition: {wanted_uid}, "
            f"UID in object meta: {stored_meta['uid']}"
        )
    if subresource == "status":
        # A shallow copy: ``stored`` is private to the caller and, after the comparison
        # below, only returned unchanged by a no-op.
        new = {key: value for key, value in stored.items() if key != "status"}
        new["metadata"] = dict(stored_meta)
        if "status" in obj:
            new["status"] = obj["status"]
    else:
        new = obj
        if "status" in stored:
            new["status"] = stored["status"]
        else:
            new.pop("status", None)
        if "apiVersion" not in new and "apiVersion" in stored:
            new["apiVersion"] = stored["apiVersion"]
        for key in _KEPT_ON_UPDATE:
            if key in stored_meta:
                meta[key] = stored_meta[key]
            else:
                meta.pop(key, None)
        if differ(_spec_part(new), _spec_part(stored)):
            meta["generation"] = int(stored_meta.get("generation", 0)) + 1
    new_meta = new["metadata"]
    new_meta["resourceVersion"] = stored_meta["resourceVersion"]
    if not differ(new, stored):
        return stored, None  # a no-op update is not a write
    if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
        return new, "DELETED"
    return new, "MODIFIED"


def plan_delete(
    stored: Obj | None,
    kind: str,
    name: str,
    resource_version: str | None,
    uid: str | None,
) -> tuple[Obj, EventType | None]:
    """What a delete of ``stored`` writes: (the object, DELETED / MODIFIED (marked for
    deletion: finalizers pending) / None (already terminating)). Raises NotFound,
    Conflict for a failed precondition."""
    if stored is None:
        raise NotFound(f'{resource(kind)} "{name}" not found')
    meta = stored["metadata"]
    where = f'Operation cannot be fulfilled on {resource(kind)} "{name}"'
    if uid and uid != meta["uid"]:
        raise Conflict(
            f"{where}: Precondition failed: UID in precondition: {uid}, "
            f"UID in object meta: {meta['uid']}"
        )
    if resource_version and str(resource_version) != meta["resourceVersion"]:
        raise Conflict(
            f"{where}: Precondition failed: ResourceVersion in precondition: "
            f"{resource_version}, ResourceVersion in object meta: {meta['resourceVersion']}"
        )
    if meta.get("finalizers"):
        if meta.get("deletionTimestamp"):
            return stored, None  # already terminating, waiting for finalizers
        meta["deletionTimestamp"] = now()
        # Kubernetes bumps generation when graceful deletion starts.
        meta["generation"] = int(meta.get("generation", 0)) + 1
        return stored, "MODIFIED"
    return stored, "DELETED"


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """One committed change, as the watch cache and the watchers get it."""

    rv: int
    type: str
    kind: str
    namespace: str
    name: str
    labels: dict[str, str]
    prev_labels: dict[str, str] | None  # labels before a MODIFIED event, if they changed
    data: str  # the object's JSON after the change (DELETED: last state, new rv)

    def seen_as(self, selector: Selector | None) -> str | None:
        """The event's type as a watcher with ``selector`` sees it, or None if it sees
        nothing: a MODIFIED object that starts matching is ADDED, one that stops matching
        is DELETED, as in Kubernetes."""
        if selector is None or selector.empty():
            return self.type
        matches = selector.matches(self.labels)
        if self.type == "MODIFIED" and self.prev_labels is not None:
            matched = selector.matches(self.prev_labels)
            if matches and not matched:
                return "ADDED"
            if matched and not matches:
                return "DELETED"
        return self.type if matches else None


class JsonWatchEvent(NamedTuple):
    """One change as ``Store.watch_json`` yields it: the object still as stored JSON."""

    type: str
    kind: str
    resource_version: int
    data: str


class Subscriber:
    """A live watcher's inbox, fed in the event loop by ``Store.publish``.

    Bounded: when more than ``limit`` events are pending the inbox drops them and sets
    ``overflowed``; the watcher then catches up from the backend's history instead.
    ``expired``: the store lost the feed it cannot replay (etcd compacted past it while
    reconnecting); the watcher gets Gone and lists again.
    """

    def __init__(self, kind: str | None, namespace: str | None, limit: int) -> None:
        self.kind = kind
        self.namespace = namespace
        self.limit = limit
        self.pending: collections.deque[StoreEvent] = collections.deque()
        self.wakeup = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self.expired = False

    def offer(self, event: StoreEvent) -> None:
        if self.overflowed or self.closed:
            return
        if self.kind is not None and event.kind != self.kind:
            return
        if self.namespace is not None and event.namespace != self.namespace:
            return
        if len(self.pending) >= self.limit:
            self.overflowed = True
            self.pending.clear()
        else:
            self.pending.append(event)
        self.wakeup.set()

    def close(self, *, expired: bool = False) -> None:
        self.expired = self.expired or expired
        self.closed = True
        self.wakeup.set()


class StoreFeed(Protocol):
    """What a backend sees of the store front: where committed events go, and the
    latest revision the read cache has applied."""

    def publish(self, events: list[StoreEvent]) -> None: ...

    def expire_watchers(self) -> None: ...

    def cache_rv(self) -> int: ...

    def cached(self, kind: str, namespace: str, name: str) -> str | None:
        """The object's JSON in the read cache (None: not there)."""
        ...

    def reset(self, rows: list[tuple[str, str, str, dict[str, str], str]], rv: int) -> None: ...

    async def wait_for_rv(self, rv: int) -> None: ...


class Backend(Protocol):
    """A store backend: commits writes (each one resourceVersion, each one event, given
    to ``StoreFeed.publish`` in commit order before the write returns) and replays
    history. Raises ``vmferry.errors`` ApiErrors, as ``Store`` documents."""

    name: str

    async def snapshot(self) -> tuple[list[tuple[str, str, str, dict[str, str], str]], int]:
        """Every object as (kind, namespace, name, labels, JSON), and its revision."""
        ...

    async def start(self, feed: StoreFeed) -> None:
        """Begin delivering committed events to ``feed`` (after the snapshot)."""
        ...

    async def create(self, obj: Obj) -> Obj: ...

    async def update(self, obj: Obj, subresource: str | None) -> Obj: ...

    async def delete(
        self, kind: str, namespace: str, name: str, resource_version: str | None, uid: str | None
    ) -> Obj: ...

    def replay(
        self, after: int, kind: str | None, namespace: str | None, until: int
    ) -> AsyncIterator[tuple[list[StoreEvent], int]]:
        """Pages of (events with rv > ``after`` of that kind/namespace, oldest first; the
        rv up to which history was scanned), ending once ``until`` is covered. Raises
        Gone when events after ``after`` are no longer kept."""
        ...

    async def close(self) -> None: ...
