"""The controller's only state store: Kubernetes-shaped objects in SQLite (WAL).

Objects are plain JSON dicts (``apiVersion``, ``kind``, ``metadata``, ``spec``,
``status``). The store does not validate schemas (the API layer does) but owns the
metadata bookkeeping: ``uid``, ``creationTimestamp``, ``generation``,
``resourceVersion``, ``deletionTimestamp`` and finalizer-driven removal, with
Kubernetes semantics.

Key facts:

* One global, monotonic resourceVersion counter, persisted; every write is one SQLite
  transaction that bumps it by exactly one and appends exactly one event. An update that
  changes nothing is not a write (no new resourceVersion, no event), as in Kubernetes.
* Every event is persisted in the ``events`` table (the newest ``history`` are kept), so
  ``watch`` can resume from a resourceVersion even after a controller restart.
* Threading: every sqlite3 call runs on ONE dedicated worker thread (a single-worker
  ``ThreadPoolExecutor``) that also creates the connection; the event loop never blocks
  on SQLite. Because that thread serialises all writes, a write's commit, its
  resourceVersion and its live notification (``loop.call_soon_threadsafe`` from the
  worker, right after COMMIT, so notifications arrive in commit order) are totally ordered.
  A ``Store`` belongs to the event loop that opened it.
* Reads (``get``, ``list``, ``current_rv``) are served on the event loop from an
  in-memory copy of the objects table -- the watch cache of kube-apiserver -- loaded when
  the store opens and kept by the same committed events the watchers get, applied before
  them. A write's notification reaches the loop before its caller resumes, so a read
  after a write sees it (a binding is in force once its create returns); a read costs no
  trip to the worker thread, which the switchover's hand-off write and every
  authorization used to pay.
* Objects crossing the API are copies: callers may mutate what they pass in or get back.
* Durability: WAL with ``synchronous=NORMAL`` survives a crash (kill -9) of the process
  without losing a committed write; pass ``synchronous="FULL"`` to also survive power loss.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import secrets
import sqlite3
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from vmferry.errors import AlreadyExists, BadRequest, Conflict, Gone, Invalid, NotFound, Unavailable
from vmferry.objects.kinds import BY_KIND
from vmferry.objects.labels import Selector

__all__ = ["EventType", "JsonWatchEvent", "Store", "WatchEvent"]

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
WatchEvent = tuple[str, Obj]
_ObjList = list[Obj]
_T = TypeVar("_T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    rv INTEGER NOT NULL,
    labels TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    rv INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    prev_labels TEXT,
    data TEXT NOT NULL
);
"""
# meta keys: "rv" is the current resourceVersion; "compacted" the newest pruned event's rv
# (a watch from below it would miss events, so it gets Gone).

_REPLAY_PAGE = 500
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generateName alphabet
_GENERATE_ATTEMPTS = 16
_MODIFIED_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def _now() -> str:
    """RFC 3339 UTC timestamp with second precision: ``2026-01-01T00:00:00Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _random_suffix() -> str:
    """Five random characters for generateName (a module function so tests can pin it)."""
    return "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))


def _resource(kind: str) -> str:
    """The plural used in messages: ``virtualmachineinstances``, else ``kind.lower()``."""
    known = BY_KIND.get(kind)
    return known.plural if known is not None else kind.lower()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _differ(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values would be stored differently. Unequal values always
    are (the store holds no NaN, the one value unequal to itself); equal ones may still
    differ in type (1, 1.0 and true compare equal): only those are serialized to tell.
    Most updates change something, and the two canonical encodings of a VMI cost
    ~0.1 ms of the store's thread."""
    return a != b or _canonical(a) != _canonical(b)


def _clone(obj: Any, what: str = "object") -> Any:
    """Deep copy through JSON; raise BadRequest when ``obj`` is not JSON-serialisable."""
    try:
        return json.loads(_dumps(obj))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"the {what} is not representable as JSON: {exc}") from None


def _labels_of(meta: Obj) -> dict[str, str]:
    labels = meta.get("labels")
    return dict(labels) if isinstance(labels, dict) else {}


def _spec_part(obj: Obj) -> Obj:
    """Everything generation tracks: all top-level fields but metadata/status/kind/apiVersion."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _identity(obj: Any, *, need_name: bool = True) -> tuple[str, str, str, Obj]:
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


@dataclass(frozen=True, slots=True)
class _Event:
    """One committed change, as stored in the ``events`` table."""

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


_EventList = list[_Event]


class _Subscriber:
    """A live watcher's inbox, fed in the event loop by ``Store._publish``.

    Bounded: when more than ``limit`` events are pending the inbox drops them and sets
    ``overflowed``; the watcher then catches up from the persisted events instead.
    """

    def __init__(self, kind: str | None, namespace: str | None, limit: int) -> None:
        self.kind = kind
        self.namespace = namespace
        self.limit = limit
        self.pending: collections.deque[_Event] = collections.deque()
        self.wakeup = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, event: _Event) -> None:
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

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class _Database:
    """The SQLite side. Every method runs on the store's single worker thread only."""

    def __init__(
        self,
        path: Path,
        history: int,
        synchronous: str,
        notify: Callable[[list[_Event]], None],
    ) -> None:
        self.history = history
        self.notify = notify
        # Created on (and, with check_same_thread, confined to) the worker thread.
        self.conn = sqlite3.connect(path, isolation_level=None)
        try:
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{path}: SQLite refused WAL mode (journal_mode={mode})")
            self.conn.execute(f"PRAGMA synchronous={synchronous}")
            self.conn.execute("PRAGMA busy_timeout=5000")
            self.conn.execute("BEGIN IMMEDIATE")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(
                    f"{path}: store schema version {version} is not supported "
                    f"(this vmferry-controller knows version {SCHEMA_VERSION})"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('rv', 0), ('compacted', 0)")
            self.rv = self._meta("rv")
            self.compacted = self._meta("compacted")
            self._prune()
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def snapshot(self) -> tuple[list[tuple[str, str, str, dict[str, str], str]], int]:
        """Every object row as (kind, namespace, name, labels, JSON) and the current rv."""
        rows = self.conn.execute("SELECT kind, namespace, name, labels, data FROM objects")
        return [(k, ns, n, json.loads(lb), d) for k, ns, n, lb, d in rows], self.rv

    # --- helpers (inside a transaction) ----------------------------------------------

    def _meta(self, key: str) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _write(self, body: Callable[[], tuple[_T, list[_Event]]]) -> _T:
        """Run ``body`` in one IMMEDIATE transaction; notify its events after COMMIT."""
        rv, compacted = self.rv, self.compacted
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read the counters under the write lock: cheap, and it keeps the counter
            # monotonic even if something else wrote to the file.
            self.rv, self.compacted = self._meta("rv"), self._meta("compacted")
            result, events = body()
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.rv, self.compacted = rv, compacted
            raise
        if events:
            self.notify(events)
        return result

    def _load(self, kind: str, namespace: str, name: str) -> Obj | None:
        row = self.conn.execute(
            "SELECT data FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            (kind, namespace, name),
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def _bump(self) -> int:
        self.rv += 1
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'rv'", (self.rv,))
        return self.rv

    def _prune(self) -> None:
        horizon = self.rv - self.history
        if horizon > self.compacted:
            self.conn.execute("DELETE FROM events WHERE rv <= ?", (horizon,))
            self.compacted = horizon
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'compacted'", (horizon,))

    def _record(
        self,
        type_: EventType,
        kind: str,
        namespace: str,
        name: str,
        obj: Obj,
        prev_labels: dict[str, str] | None = None,
    ) -> tuple[str, _Event]:
        """Stamp ``obj`` with a new resourceVersion, write the object row (unless
        DELETED) and the event row; return (object JSON, event)."""
        rv = self._bump()
        obj["metadata"]["resourceVersion"] = str(rv)
        labels = _labels_of(obj["metadata"])
        data, labels_json = _dumps(obj), _dumps(labels)
        key = (kind, namespace, name)
        if type_ == "ADDED":
            self.conn.execute(
                "INSERT INTO objects (kind, namespace, name, rv, labels, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (*key, rv, labels_json, data),
            )
        elif type_ == "MODIFIED":
            self.conn.execute(
                "UPDATE objects SET rv = ?, labels = ?, data = ? "
                "WHERE kind = ? AND namespace = ? AND name = ?",
                (rv, labels_json, data, *key),
            )
        else:
            self.conn.execute(
                "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?", key
            )
        if prev_labels == labels:
            prev_labels = None
        self.conn.execute(
            "INSERT INTO events (rv, type, kind, namespace, name, labels, prev_labels, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rv,
                type_,
                *key,
                labels_json,
                None if prev_labels is None else _dumps(prev_labels),
                data,
            ),
        )
        self._prune()
        return data, _Event(rv, type_, kind, namespace, name, labels, prev_labels, data)

    # --- verbs -----------------------------------------------------------------------

    def create(self, obj: Obj) -> Obj:
        kind, namespace, name, meta = _identity(obj, need_name=False)
        generate = meta.get("generateName") or ""
        if not isinstance(generate, str):
            raise Invalid("metadata.generateName: Invalid value: must be a string")
        if not name and not generate:
            raise Invalid("metadata.name: Required value: name or generateName is required")

        def body() -> tuple[Obj, list[_Event]]:
            chosen = name
            if chosen:
                if self._load(kind, namespace, chosen) is not None:
                    raise AlreadyExists(f'{_resource(kind)} "{chosen}" already exists')
            else:
                for _ in range(_GENERATE_ATTEMPTS):
                    candidate = generate + _random_suffix()
                    if self._load(kind, namespace, candidate) is None:
                        chosen = candidate
                        break
                else:
                    raise AlreadyExists(
                        f'{_resource(kind)} "{generate}": {_GENERATE_ATTEMPTS} generated names '
                        f"were all taken; retry, or use a longer generateName"
                    )
            meta["name"] = chosen
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            meta.pop("deletionTimestamp", None)
            meta.pop("deletionGracePeriodSeconds", None)
            _, event = self._record("ADDED", kind, namespace, chosen, obj)
            return obj, [event]

        return self._write(body)

    def update(self, obj: Obj, subresource: str | None) -> Obj:
        kind, namespace, name, meta = _identity(obj)
        if subresource not in (None, "status"):
            raise BadRequest(f'unknown subresource "{subresource}" (only "status" exists)')

        def body() -> tuple[Obj, list[_Event]]:
            stored = self._load(kind, namespace, name)
            if stored is None:
                raise NotFound(f'{_resource(kind)} "{name}" not found')
            stored_meta = stored["metadata"]
            wanted_rv = meta.get("resourceVersion")
            if wanted_rv not in (None, "") and str(wanted_rv) != stored_meta["resourceVersion"]:
                raise Conflict(
                    f'Operation cannot be fulfilled on {_resource(kind)} "{name}": '
                    f"{_MODIFIED_MESSAGE}"
                )
            wanted_uid = meta.get("uid")
            if wanted_uid not in (None, "") and wanted_uid != stored_meta["uid"]:
                raise Conflict(
                    f'Operation cannot be fulfilled on {_resource(kind)} "{name}": '
                    f"Precondition failed: UID in precondition: {wanted_uid}, "
                    f"UID in object meta: {stored_meta['uid']}"
                )
            if subresource == "status":
                # A shallow copy: ``stored`` was just decoded (private) and, after the
                # comparison below, only returned unchanged by a no-op.
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
                # Fields the caller cannot change through an update.
                for key in (
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "generateName",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                ):
                    if key in stored_meta:
                        meta[key] = stored_meta[key]
                    else:
                        meta.pop(key, None)
                if _differ(_spec_part(new), _spec_part(stored)):
                    meta["generation"] = int(stored_meta.get("generation", 0)) + 1
            new_meta = new["metadata"]
            new_meta["resourceVersion"] = stored_meta["resourceVersion"]
            if not _differ(new, stored):
                return stored, []  # a no-op update is not a write
            prev_labels = _labels_of(stored_meta)
            if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
                _, event = self._record("DELETED", kind, namespace, name, new, prev_labels)
            else:
                _, event = self._record("MODIFIED", kind, namespace, name, new, prev_labels)
            return new, [event]

        return self._write(body)

    def delete(
        self,
        kind: str,
        namespace: str,
        name: str,
        resource_version: str | None,
        uid: str | None,
    ) -> Obj:
        def body() -> tuple[Obj, list[_Event]]:
            stored = self._load(kind, namespace, name)
            if stored is None:
                raise NotFound(f'{_resource(kind)} "{name}" not found')
            meta = stored["metadata"]
            where = f'Operation cannot be fulfilled on {_resource(kind)} "{name}"'
            if uid and uid != meta["uid"]:
                raise Conflict(
                    f"{where}: Precondition failed: UID in precondition: {uid}, "
                    f"UID in object meta: {meta['uid']}"
                )
            if resource_version and str(resource_version) != meta["resourceVersion"]:
                raise Conflict(
                    f"{where}: Precondition failed: ResourceVersion in precondition: "
                    f"{resource_version}, ResourceVersion in object meta: "
                    f"{meta['resourceVersion']}"
                )
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return stored, []  # already terminating, waiting for finalizers
                meta["deletionTimestamp"] = _now()
                # Kubernetes bumps generation when graceful deletion starts.
                meta["generation"] = int(meta.get("generation", 0)) + 1
                _, event = self._record("MODIFIED", kind, namespace, name, stored, _labels_of(meta))
                return stored, [event]
            _, event = self._record("DELETED", kind, namespace, name, stored, _labels_of(meta))
            return stored, [event]

        return self._write(body)

    def events_after(
        self, after: int, kind: str | None, namespace: str | None, limit: int
    ) -> tuple[_EventList, int]:
        """Events with rv > ``after`` matching kind/namespace, oldest first, at most
        ``limit``; plus the rv up to which the event log was scanned. Raises Gone when
        events after ``after`` were already pruned."""
        if after < self.compacted:
            raise Gone(
                f"too old resource version: {after} (the oldest resourceVersion a watch can "
                f"start from is {self.compacted}); list again and watch from the list's "
                f"resourceVersion"
            )
        sql = (
            "SELECT rv, type, kind, namespace, name, labels, prev_labels, data "
            "FROM events WHERE rv > ?"
        )
        params: list[Any] = [after]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        if namespace is not None:
            sql += " AND namespace = ?"
            params.append(namespace)
        sql += " ORDER BY rv LIMIT ?"
        params.append(limit)
        events = [
            _Event(
                rv,
                type_,
                kind_,
                ns,
                name,
                json.loads(labels),
                None if prev is None else json.loads(prev),
                data,
            )
            for rv, type_, kind_, ns, name, labels, prev, data in self.conn.execute(sql, params)
        ]
        scanned = events[-1].rv if len(events) >= limit else self.rv
        return events, max(scanned, after)


class Store:
    """The object store. Open with ``await Store.open(path)``; close with ``close()``.

    All methods are coroutines except ``watch`` (an async generator: ``aclose()`` it, or
    leave its ``async for``, to unsubscribe). Raises
    ``vmferry.errors`` ApiErrors (NotFound, AlreadyExists, Conflict, Gone, Invalid,
    BadRequest, Unavailable once closed).
    """

    def __init__(
        self,
        path: Path,
        history: int,
        loop: asyncio.AbstractEventLoop,
        executor: ThreadPoolExecutor,
        watch_queue_limit: int,
    ) -> None:
        """Internal: use ``Store.open``."""
        self.path = path
        self.history = history
        self._loop = loop
        self._executor = executor
        self._watch_queue_limit = watch_queue_limit
        self._subscribers: set[_Subscriber] = set()
        self._closed = False
        self._db: _Database | None = None
        # The read cache: kind -> (namespace, name) -> (labels, object JSON), as of
        # resourceVersion _cache_rv. Changed only on the loop, by _publish.
        self._objects: dict[str, dict[tuple[str, str], tuple[dict[str, str], str]]] = {}
        self._cache_rv = 0

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        history: int = 20000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        watch_queue_limit: int = 10000,
    ) -> Store:
        """Open (creating if needed) the store at ``path``.

        ``history`` is how many events are kept for watch replay; ``watch_queue_limit``
        bounds each live watcher's in-memory backlog (beyond it the watcher catches up
        from SQLite). Raises RuntimeError if the file cannot be opened in WAL mode or has
        an unknown schema version, and sqlite3 errors for unreadable files.
        """
        if history < 0:
            raise ValueError(f"history must be >= 0, not {history}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f'synchronous must be "NORMAL" or "FULL", not {synchronous!r}')
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmferry-store")
        store = cls(Path(path), history, loop, executor, watch_queue_limit)
        try:
            store._db = await loop.run_in_executor(
                executor, _Database, store.path, history, synchronous, store._notify
            )
            rows, store._cache_rv = await loop.run_in_executor(executor, store._db.snapshot)
        except BaseException:
            if store._db is not None:
                await loop.run_in_executor(executor, store._db.close)
            executor.shutdown(wait=False)
            raise
        for kind, namespace, name, labels, data in rows:
            store._objects.setdefault(kind, {})[(namespace, name)] = (labels, data)
        return store

    async def close(self) -> None:
        """Close the database; running watches end (after their pending events), later
        calls raise Unavailable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for subscriber in list(self._subscribers):
            subscriber.close()
        if self._db is not None:
            await self._loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)

    # --- plumbing --------------------------------------------------------------------

    def _database(self) -> _Database:
        if self._closed or self._db is None:
            raise Unavailable("the object store is closed")
        return self._db

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread."""
        self._database()
        return await self._loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _notify(self, events: list[_Event]) -> None:
        """Worker thread: hand committed events to the loop (FIFO, so in commit order)."""
        try:
            self._loop.call_soon_threadsafe(self._publish, events)
        except RuntimeError:
            pass  # the loop is closed: nobody is watching any more

    def _publish(self, events: Sequence[_Event]) -> None:
        """Event loop: apply committed events to the read cache, then fan them out to
        the live watchers."""
        for event in events:
            objects = self._objects.setdefault(event.kind, {})
            if event.type == "DELETED":
                objects.pop((event.namespace, event.name), None)
            else:
                objects[(event.namespace, event.name)] = (event.labels, event.data)
            self._cache_rv = event.rv
        for subscriber in list(self._subscribers):
            for event in events:
                subscriber.offer(event)

    # --- verbs -----------------------------------------------------------------------

    async def create(self, obj: Obj) -> Obj:
        """Create ``obj``; return the stored object (uid, creationTimestamp, generation=1,
        resourceVersion set; name generated from ``generateName`` if not given).

        Raises Invalid (no kind, no name/generateName), AlreadyExists, BadRequest (not JSON).
        """
        db = self._database()
        return await self._run(db.create, _clone(obj))

    async def get(self, kind: str, namespace: str, name: str) -> Obj:
        """Return the object; raise NotFound (``virtualmachineinstances "vm1" not found``)."""
        self._database()
        entry = self._objects.get(kind, {}).get((namespace, name))
        if entry is None:
            raise NotFound(f'{_resource(kind)} "{name}" not found')
        obj: Obj = json.loads(entry[1])
        return obj

    async def list(
        self, kind: str, namespace: str | None = None, selector: Selector | None = None
    ) -> tuple[_ObjList, int]:
        """Return (objects sorted by namespace then name, current resourceVersion).

        ``namespace=None`` lists all namespaces; ``""`` lists cluster-scoped objects. The
        resourceVersion is consistent with the items: watch from it to see later changes.
        """
        self._database()
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
        db = self._database()
        return await self._run(db.update, _clone(obj), subresource)

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
        db = self._database()
        return await self._run(db.delete, kind, namespace, name, resource_version, uid)

    async def current_rv(self) -> int:
        """The resourceVersion of the latest committed write (0 for an empty store)."""
        self._database()
        return self._cache_rv

    async def watch(
        self,
        kind: str | None,
        namespace: str | None,
        since_rv: int,
        selector: Selector | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Yield ``(type, object)`` for every change with resourceVersion > ``since_rv``.

        ``kind``/``namespace`` None mean all. Replays persisted history first, then
        follows live changes, without gap or duplicate; events arrive in resourceVersion
        order. With a selector, a MODIFIED object that starts (stops) matching is
        reported as ADDED (DELETED). Raises Gone when iteration starts (or while
        catching up) if events after ``since_rv`` were pruned: list again. Ends when the
        store closes. Each yielded object is a fresh copy.
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
        self._database()
        cursor = since_rv
        while True:
            subscriber = _Subscriber(kind, namespace, self._watch_queue_limit)
            # Subscribe before reading history: anything committed after the read is in
            # the inbox, anything before it is in the read; duplicates are skipped by rv.
            self._subscribers.add(subscriber)
            try:
                while True:
                    events, scanned = await self._run(
                        self._database().events_after, cursor, kind, namespace, _REPLAY_PAGE
                    )
                    for event in events:
                        cursor = event.rv
                        seen = event.seen_as(selector)
                        if seen is not None:
                            yield JsonWatchEvent(seen, event.kind, event.rv, event.data)
                    cursor = max(cursor, scanned)
                    if len(events) < _REPLAY_PAGE:
                        break
                while not subscriber.overflowed:
                    if subscriber.pending:
                        event = subscriber.pending.popleft()
                        if event.rv <= cursor:
                            continue
                        cursor = event.rv
                        seen = event.seen_as(selector)
                        if seen is not None:
                            yield JsonWatchEvent(seen, event.kind, event.rv, event.data)
                    elif subscriber.closed:
                        return
                    else:
                        subscriber.wakeup.clear()
                        await subscriber.wakeup.wait()
                # Overflowed: too slow for the live feed; catch up from SQLite.
            finally:
                self._subscribers.discard(subscriber)
