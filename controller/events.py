"""The controller's side of Events: its recorder writes straight to the store (validated,
as the API would), and the expiry of old Events (kube-apiserver's ``--event-ttl``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from controller.store import Store
from vmferry.errors import Conflict, NotFound
from vmferry.events import EVENT_KIND, EventRecorder
from vmferry.objects import schema
from vmferry.objects.conditions import parse_time

log = logging.getLogger(__name__)

Obj = dict[str, Any]

COMPONENT = "vmferry-controller"
DEFAULT_EVENT_TTL = 3600.0  # s: kube-apiserver's --event-ttl default (1h)


class StoreEventWriter:
    """``EventWriter`` over the store: checks each Event against its schema first."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(self, obj: Obj, /) -> Obj:
        return await self.store.create(schema.validate(obj, server_managed=True))

    async def update(self, obj: Obj, /) -> Obj:
        return await self.store.update(schema.validate(obj, server_managed=True))


def controller_recorder(
    store: Store, host: str = "", *, clock: Callable[[], float] = time.time
) -> EventRecorder:
    return EventRecorder(StoreEventWriter(store), COMPONENT, host, clock=clock)


def expired(event: Obj, now: float, ttl: float) -> bool:
    """The Event was last seen more than ``ttl`` seconds before ``now``."""
    stamp = event.get("lastTimestamp") or event["metadata"].get("creationTimestamp")
    if not stamp:
        return False
    return now - parse_time(str(stamp)).timestamp() > ttl


class EventExpiry:
    """Deletes Events not seen for ``ttl`` seconds; checks every ``ttl / 10`` (at most a
    minute), so an Event outlives its TTL by at most that."""

    def __init__(
        self,
        store: Store,
        ttl: float = DEFAULT_EVENT_TTL,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"event TTL must be positive, not {ttl}")
        self.store = store
        self.ttl = ttl
        self.clock = clock

    @property
    def interval(self) -> float:
        return min(self.ttl / 10, 60.0)

    async def sweep(self) -> int:
        """Delete every expired Event now; return how many."""
        events, _ = await self.store.list(EVENT_KIND)
        now = self.clock()
        deleted = 0
        for event in events:
            if not expired(event, now, self.ttl):
                continue
            meta = event["metadata"]
            try:
                await self.store.delete(
                    EVENT_KIND,
                    meta["namespace"],
                    meta["name"],
                    resource_version=meta.get("resourceVersion"),
                )
                deleted += 1
            except NotFound:
                continue
            except Conflict:  # seen again since the list: not expired any more
                continue
        return deleted

    async def run(self) -> None:
        while True:
            try:
                deleted = await self.sweep()
                if deleted:
                    log.info("deleted %d expired events (ttl %.0fs)", deleted, self.ttl)
            except Exception:
                log.exception("event expiry pass failed")
            await asyncio.sleep(self.interval)
