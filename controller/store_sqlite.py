"""The SQLite backend of the store (the default): one file in WAL mode.

* One global, monotonic resourceVersion counter, persisted; every write is one SQLite
  transaction that bumps it by exactly one and appends exactly one event. An update that
  changes nothing is not a write (no new resourceVersion, no event), as in Kubernetes.
* Every event is persisted in the ``events`` table (the newest ``history`` are kept), so
  a watch can resume from a resourceVersion even after a controller restart.
* Threading: every sqlite3 call runs on ONE dedicated worker thread (a single-worker
  ``ThreadPoolExecutor``) that also creates the connection; the event loop never blocks
  on SQLite. Because that thread serialises all writes, a write's commit, its
  resourceVersion and its live notification (``loop.call_soon_threadsafe`` from the
  worker, right after COMMIT, so notifications arrive in commit order) are totally ordered.
* Durability: WAL with ``synchronous=NORMAL`` survives a crash (kill -9) of the process
  without losing a committed write; pass ``synchronous="FULL"`` to also survive power loss.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from controller import store_core as core
from controller.store_core import EventType, Obj, StoreEvent, StoreFeed
from vmferry.errors import AlreadyExists, Gone, Unavailable

_T = TypeVar("_T")
_EventList = list[StoreEvent]

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

REPLAY_PAGE = 500


def too_old(after: int, oldest: int) -> Gone:
    """The "too old resourceVersion" answer (410 Gone), the same for every backend."""
    return Gone(
        f"too old resource version: {after} (the oldest resourceVersion a watch can "
        f"start from is {oldest}); list again and watch from the list's resourceVersion"
    )


class _Database:
    """The SQLite side. Every method runs on the store's single worker thread only."""

    def __init__(
        self,
        path: Path,
        history: int,
        synchronous: str,
        notify: Callable[[list[StoreEvent]], None],
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

    def _write(self, body: Callable[[], tuple[_T, list[StoreEvent]]]) -> _T:
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
    ) -> tuple[str, StoreEvent]:
        """Stamp ``obj`` with a new resourceVersion, write the object row (unless
        DELETED) and the event row; return (object JSON, event)."""
        rv = self._bump()
        obj["metadata"]["resourceVersion"] = str(rv)
        labels = core.labels_of(obj["metadata"])
        data, labels_json = core.dumps(obj), core.dumps(labels)
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
                None if prev_labels is None else core.dumps(prev_labels),
                data,
            ),
        )
        self._prune()
        return data, StoreEvent(rv, type_, kind, namespace, name, labels, prev_labels, data)

    # --- verbs -----------------------------------------------------------------------

    def create(self, obj: Obj) -> Obj:
        kind, namespace, name, meta = core.identity(obj, need_name=False)
        generate = core.generate_name_of(meta, name)

        def body() -> tuple[Obj, list[StoreEvent]]:
            chosen = name
            if chosen:
                if self._load(kind, namespace, chosen) is not None:
                    raise AlreadyExists(f'{core.resource(kind)} "{chosen}" already exists')
            else:
                for _ in range(core.GENERATE_ATTEMPTS):
                    candidate = generate + core.random_suffix()
                    if self._load(kind, namespace, candidate) is None:
                        chosen = candidate
                        break
                else:
                    raise core.generate_exhausted(kind, generate)
            core.stamp_created(meta, chosen)
            _, event = self._record("ADDED", kind, namespace, chosen, obj)
            return obj, [event]

        return self._write(body)

    def update(self, obj: Obj, subresource: str | None) -> Obj:
        kind, namespace, name, meta = core.identity(obj)
        core.check_subresource(subresource)

        def body() -> tuple[Obj, list[StoreEvent]]:
            stored = self._load(kind, namespace, name)
            new, type_ = core.plan_update(obj, meta, subresource, stored, kind, name)
            if type_ is None or stored is None:
                return new, []
            prev_labels = core.labels_of(stored["metadata"])
            _, event = self._record(type_, kind, namespace, name, new, prev_labels)
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
        def body() -> tuple[Obj, list[StoreEvent]]:
            stored = self._load(kind, namespace, name)
            prev_labels = None if stored is None else core.labels_of(stored["metadata"])
            obj, type_ = core.plan_delete(stored, kind, name, resource_version, uid)
            if type_ is None:
                return obj, []
            _, event = self._record(type_, kind, namespace, name, obj, prev_labels)
            return obj, [event]

        return self._write(body)

    def events_after(
        self, after: int, kind: str | None, namespace: str | None, limit: int
    ) -> tuple[_EventList, int]:
        """Events with rv > ``after`` matching kind/namespace, oldest first, at most
        ``limit``; plus the rv up to which the event log was scanned. Raises Gone when
        events after ``after`` were already pruned."""
        if after < self.compacted:
            raise too_old(after, self.compacted)
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
            StoreEvent(
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


class SqliteBackend:
    """The store's SQLite backend: ``_Database`` on its own worker thread."""

    name = "sqlite"

    def __init__(self, path: Path, history: int, synchronous: str) -> None:
        self.path = path
        self.history = history
        self.synchronous = synchronous
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmferry-store")
        self._loop = asyncio.get_running_loop()
        self._db: _Database | None = None
        self._feed: StoreFeed | None = None
        self._closed = False

    async def open(self) -> None:
        """Open (creating if needed) the file; see ``Store.open`` for the errors."""
        try:
            self._db = await self._loop.run_in_executor(
                self.executor, _Database, self.path, self.history, self.synchronous, self._notify
            )
        except BaseException:
            self.executor.shutdown(wait=False)
            raise

    def _database(self) -> _Database:
        if self._closed or self._db is None:
            raise Unavailable("the object store is closed")
        return self._db

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread."""
        self._database()
        return await self._loop.run_in_executor(self.executor, functools.partial(fn, *args))

    def _notify(self, events: list[StoreEvent]) -> None:
        """Worker thread: hand committed events to the loop (FIFO, so in commit order)."""
        feed = self._feed
        if feed is None:
            return
        try:
            self._loop.call_soon_threadsafe(feed.publish, events)
        except RuntimeError:
            pass  # the loop is closed: nobody is watching any more

    async def snapshot(self) -> tuple[list[tuple[str, str, str, dict[str, str], str]], int]:
        return await self._run(self._database().snapshot)

    async def start(self, feed: StoreFeed) -> None:
        self._feed = feed

    async def create(self, obj: Obj) -> Obj:
        return await self._run(self._database().create, obj)

    async def update(self, obj: Obj, subresource: str | None) -> Obj:
        return await self._run(self._database().update, obj, subresource)

    async def delete(
        self, kind: str, namespace: str, name: str, resource_version: str | None, uid: str | None
    ) -> Obj:
        return await self._run(
            self._database().delete, kind, namespace, name, resource_version, uid
        )

    async def replay(
        self, after: int, kind: str | None, namespace: str | None, until: int
    ) -> AsyncIterator[tuple[list[StoreEvent], int]]:
        del until  # the events table is read up to its end: it covers ``until``
        cursor = after
        while True:
            events, scanned = await self._run(
                self._database().events_after, cursor, kind, namespace, REPLAY_PAGE
            )
            yield events, scanned
            if len(events) < REPLAY_PAGE:
                return
            cursor = max(events[-1].rv, scanned)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._db is not None:
            await self._loop.run_in_executor(self.executor, self._db.close)
        self.executor.shutdown(wait=True)
