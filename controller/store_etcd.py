"""The etcd backend of the store (``store = "etcd"``): the state of replicated
controllers, in an etcd v3 cluster.

Layout: one key per object, ``<prefix>/registry/<kind>/<namespace>/<name>`` (a
cluster-scoped object has an empty namespace: ``/vmferry/registry/Node//node-1``); the value is the object's
JSON (UTF-8) without ``metadata.resourceVersion``, which is the key's ``mod_revision``
and is set when the object is read. Nothing else is stored (no counter, no event log);
the leader election's key is ``<prefix>/leader/vmferry-controller``, outside the
registry.

* resourceVersion = etcd revision: an object's is its mod_revision; a list's is the
  revision the read cache is at. One write = one etcd transaction = one revision.
* Writes are transactions that compare the key: create ``create_revision == 0``,
  update/delete ``mod_revision ==`` the revision the change was computed from. The state
  is first taken from the read cache; a failed compare (another replica wrote) reads the
  key from etcd and computes again, so an update without resourceVersion is last writer
  wins and one with it gets Conflict, as on SQLite. A NotFound, Conflict or no-op found
  on cached state is confirmed against etcd before it is answered.
* The read cache follows one etcd watch of the whole prefix (with previous values, for
  DELETED objects and label transitions); a write returns once the cache has its
  revision. Lost and resumed across member failures; when etcd compacted past the point
  of loss the cache is reloaded and every watcher gets Gone (list again).
* A watch from an older resourceVersion than the cache's is an etcd watch of its own
  from that revision (history, then live changes); compacted history answers Gone
  ("too old resource version"). A watch from the cache's revision (what a list returns)
  is served from the cache's feed, without a stream to etcd.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from controller import store_core as core
from controller.etcd_client import Compacted, EtcdClient, EtcdConfig, prefix_end
from controller.store import Store
from controller.store_core import EventType, Obj, StoreEvent, StoreFeed
from controller.store_sqlite import too_old
from vmferry.errors import AlreadyExists, ApiError, Invalid, Unavailable
from vmferry.etcdpb import kv_pb2, rpc_pb2

log = logging.getLogger("vmferry.store.etcd")

DEFAULT_PREFIX = "/vmferry"
_PAGE = 1000  # objects per range request while loading the cache
_RESUME_DELAY = 0.5  # seconds before re-opening a broken cache watch
_WRITE_VISIBLE_WAIT = 10.0  # at most this long a committed write waits for the cache
_ATTEMPTS = 32  # compare-and-swap rounds before an update under contention gives up
Row = tuple[str, str, str, dict[str, str], str]


class EtcdBackend:
    """The store's etcd backend (see the module docstring)."""

    name = "etcd"

    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"etcd key prefix {prefix!r} must start and not end with '/'")
        self.client = client
        self.prefix = prefix
        self._root = (prefix + "/registry/").encode()
        self._feed: StoreFeed | None = None
        self._follower: asyncio.Task[None] | None = None
        self._next_rev = 0
        self._closed = False

    # --- keys and values -------------------------------------------------------------

    def key(self, kind: str, namespace: str, name: str) -> bytes:
        for what, part in (("kind", kind), ("metadata.namespace", namespace)):
            if "/" in part:
                raise Invalid(f"{what}: Invalid value: {part!r}: may not contain '/'")
        return self._root + f"{kind}/{namespace}/{name}".encode()

    def _range_of(self, kind: str | None, namespace: str | None) -> bytes:
        if kind is None:
            return self._root
        if namespace is None:
            return self._root + f"{kind}/".encode()
        return self._root + f"{kind}/{namespace}/".encode()

    def _parse(self, key: bytes) -> tuple[str, str, str]:
        kind, namespace, name = key[len(self._root) :].decode().split("/", 2)
        return kind, namespace, name

    @staticmethod
    def _encode(obj: Obj) -> bytes:
        meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
        return core.dumps(dict(obj, metadata=meta)).encode()

    @staticmethod
    def _decode(value: bytes, revision: int) -> Obj:
        obj: Obj = json.loads(value)
        obj["metadata"]["resourceVersion"] = str(revision)
        return obj

    def _event(self, event: kv_pb2.Event) -> StoreEvent:
        kind, namespace, name = self._parse(event.kv.key)
        rv = event.kv.mod_revision
        prev = event.prev_kv if event.HasField("prev_kv") else None
        type_: EventType
        if event.type == kv_pb2.Event.DELETE:
            type_ = "DELETED"
            if prev is not None and prev.value:
                obj = self._decode(prev.value, rv)
            else:  # its last state was compacted away: what the key tells
                meta: Obj = {"name": name, "resourceVersion": str(rv)}
                if namespace:
                    meta["namespace"] = namespace
                obj = {"kind": kind, "metadata": meta}
        else:
            type_ = "ADDED" if event.kv.create_revision == rv else "MODIFIED"
            obj = self._decode(event.kv.value, rv)
        labels = core.labels_of(obj["metadata"])
        prev_labels = None
        if type_ == "MODIFIED" and prev is not None and prev.value:
            before = core.labels_of(json.loads(prev.value)["metadata"])
            prev_labels = None if before == labels else before
        return StoreEvent(rv, type_, kind, namespace, name, labels, prev_labels, core.dumps(obj))

    # --- the cache feed --------------------------------------------------------------

    async def snapshot(self) -> tuple[list[Row], int]:
        end = prefix_end(self._root)
        response = await self.client.range(self._root, end, limit=_PAGE)
        revision = response.header.revision
        rows: list[Row] = []
        while True:
            for kv in response.kvs:
                kind, namespace, name = self._parse(kv.key)
                obj = self._decode(kv.value, kv.mod_revision)
                rows.append(
                    (kind, namespace, name, core.labels_of(obj["metadata"]), core.dumps(obj))
                )
            if not response.more or not response.kvs:
                break
            response = await self.client.range(
                response.kvs[-1].key + b"\0", end, revision=revision, limit=_PAGE
            )
        self._next_rev = revision + 1
        return rows, revision

    async def start(self, feed: StoreFeed) -> None:
        self._feed = feed
        self._follower = asyncio.create_task(self._follow(feed), name="etcd-store-cache")

    async def _follow(self, feed: StoreFeed) -> None:
        """Keep the read cache: one watch of the whole prefix, resumed when it breaks."""
        end = prefix_end(self._root)
        while not self._closed:
            try:
                async for response in self.client.watch(self._root, end, self._next_rev):
                    events = [self._event(event) for event in response.events]
                    if events:
                        self._next_rev = events[-1].rv + 1
                        feed.publish(events)
            except Compacted as exc:
                log.warning("etcd compacted past the cache (%s): reloading it", exc)
                try:
                    rows, revision = await self.snapshot()
                except Unavailable as reload_error:
                    log.warning("reloading the cache from etcd failed: %s", reload_error)
                    await asyncio.sleep(_RESUME_DELAY)
                    continue
                feed.reset(rows, revision)
            except Unavailable as exc:
                log.warning("the store's etcd watch broke (%s); resuming", exc)
                await asyncio.sleep(_RESUME_DELAY)

    async def _committed(self, revision: int) -> None:
        """Until the read cache shows the write of ``revision`` (bounded: the write is
        committed either way)."""
        assert self._feed is not None
        try:
            async with asyncio.timeout(_WRITE_VISIBLE_WAIT):
                await self._feed.wait_for_rv(revision)
        except TimeoutError:
            log.warning("write at revision %d not yet in the read cache", revision)

    # --- verbs -----------------------------------------------------------------------

    def _live(self) -> StoreFeed:
        if self._closed or self._feed is None:
            raise Unavailable("the object store is closed")
        return self._feed

    async def _read(self, key: bytes) -> tuple[Obj | None, int]:
        """The object at ``key`` in etcd now, and its mod_revision (0: absent)."""
        response = await self.client.range(key)
        if not response.kvs:
            return None, 0
        kv = response.kvs[0]
        return self._decode(kv.value, kv.mod_revision), kv.mod_revision

    def _from_cache(self, kind: str, namespace: str, name: str) -> tuple[Obj | None, int]:
        data = self._live().cached(kind, namespace, name)
        if data is None:
            return None, 0
        obj: Obj = json.loads(data)
        return obj, int(obj["metadata"]["resourceVersion"])

    async def create(self, obj: Obj) -> Obj:
        self._live()
        kind, namespace, name, meta = core.identity(obj, need_name=False)
        generate = core.generate_name_of(meta, name)
        for _ in range(core.GENERATE_ATTEMPTS if generate else 1):
            chosen = name or generate + core.random_suffix()
            core.stamp_created(meta, chosen)
            key = self.key(kind, namespace, chosen)
            absent = rpc_pb2.Compare(
                key=key,
                target=rpc_pb2.Compare.CREATE,
                result=rpc_pb2.Compare.EQUAL,
                create_revision=0,
            )
            put = rpc_pb2.RequestOp(
                request_put=rpc_pb2.PutRequest(key=key, value=self._encode(obj))
            )
            response = await self.client.txn([absent], [put])
            if response.succeeded:
                meta["resourceVersion"] = str(response.header.revision)
                await self._committed(response.header.revision)
                return obj
        if name:
            raise AlreadyExists(f'{core.resource(kind)} "{name}" already exists')
        raise core.generate_exhausted(kind, generate)

    async def _swap(self, key: bytes, revision: int, type_: EventType, new: Obj) -> int:
        """Write ``new`` (or delete the key) if it is still at ``revision``; the new
        revision, or 0 when someone wrote in between."""
        same = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=revision
        )
        if type_ == "DELETED":
            op = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))
        else:
            op = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=self._encode(new)))
        response = await self.client.txn([same], [op])
        return response.header.revision if response.succeeded else 0

    async def update(self, obj: Obj, subresource: str | None) -> Obj:
        self._live()
        kind, namespace, name, _ = core.identity(obj)
        core.check_subresource(subresource)
        key = self.key(kind, namespace, name)
        stored, revision = self._from_cache(kind, namespace, name)
        fresh = False
        for _ in range(_ATTEMPTS):
            attempt = core.clone(obj)
            try:
                new, type_ = core.plan_update(
                    attempt, attempt["metadata"], subresource, stored, kind, name
                )
            except ApiError:
                if fresh:
                    raise
                new, type_ = {}, None
            if type_ is None and fresh:
                return new  # a no-op on the current state
            if type_ is not None:
                written = await self._swap(key, revision, type_, new)
                if written:
                    new["metadata"]["resourceVersion"] = str(written)
                    await self._committed(written)
                    return new
            stored, revision = await self._read(key)
            fresh = True
        raise Unavailable(f"{core.resource(kind)} {name!r}: too many concurrent writers; retry")

    async def delete(
        self, kind: str, namespace: str, name: str, resource_version: str | None, uid: str | None
    ) -> Obj:
        self._live()
        key = self.key(kind, namespace, name)
        stored, revision = self._from_cache(kind, namespace, name)
        fresh = False
        for _ in range(_ATTEMPTS):
            try:
                obj, type_ = core.plan_delete(stored, kind, name, resource_version, uid)
            except ApiError:
                if fresh:
                    raise
                obj, type_ = {}, None
            if type_ is None and fresh:
                return obj  # already terminating
            if type_ is not None:
                written = await self._swap(key, revision, type_, obj)
                if written:
                    obj["metadata"]["resourceVersion"] = str(written)
                    await self._committed(written)
                    return obj
            stored, revision = await self._read(key)
            fresh = True
        raise Unavailable(f"{core.resource(kind)} {name!r}: too many concurrent writers; retry")

    async def replay(
        self, after: int, kind: str | None, namespace: str | None, until: int
    ) -> AsyncIterator[tuple[list[StoreEvent], int]]:
        """A watch of etcd itself from ``after``; it follows live changes too and ends
        only when the store closes (etcd 3.4 sends progress notifications before a
        replaying watch has caught up, so the end of history cannot be told apart)."""
        del until
        start = self._range_of(kind, namespace)
        next_rev = after + 1
        while not self._closed:
            try:
                async for response in self.client.watch(start, prefix_end(start), next_rev):
                    events = [self._event(event) for event in response.events]
                    if events:
                        next_rev = events[-1].rv + 1
                        yield events, events[-1].rv
            except Compacted as exc:
                raise too_old(next_rev - 1, exc.revision) from None
            except Unavailable as exc:
                if self._closed:
                    return
                log.warning("a replaying etcd watch broke (%s); resuming", exc)
                await asyncio.sleep(_RESUME_DELAY)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            self._follower.cancel()
            try:
                await self._follower
            except asyncio.CancelledError:
                pass
        await self.client.close()


async def open_etcd_store(
    config: EtcdConfig, *, prefix: str = DEFAULT_PREFIX, watch_queue_limit: int = 10000
) -> Store:
    """The store on etcd: connect, load the read cache, follow the prefix. Raises
    Unavailable when no member answers, EtcdConfigError for bad settings."""
    backend = EtcdBackend(EtcdClient.connect(config), prefix)
    return await Store.on(backend, watch_queue_limit=watch_queue_limit)
