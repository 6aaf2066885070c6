"""Node lifecycle: a node whose handler stops heartbeating goes NotReady.

Handlers refresh ``Ready.lastHeartbeatTime`` every few seconds; when the newest
heartbeat is older than the grace period the monitor sets Ready=False
(``NodeStatusUnknown``), which keeps new VMIs and migration targets off the node.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from datetime import UTC, datetime

from controller.events import controller_recorder
from controller.objects import write_status
from controller.store import Store
from vmferry.errors import Conflict, NotFound
from vmferry.events import EventRecorder, Reason
from vmferry.objects import conditions

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # s between sweeps


class NodeMonitor:
    def __init__(
        self, store: Store, *, grace_seconds: float, recorder: EventRecorder | None = None
    ) -> None:
        self.store = store
        self.grace = grace_seconds
        self.events = recorder or controller_recorder(store)

    async def run(self) -> None:
        while True:
            await self.sweep()
            await asyncio.sleep(CHECK_INTERVAL)

    async def sweep(self) -> None:
        now = datetime.now(UTC)
        # The store's parsed Nodes (not a list of copies: O(nodes) without decoding each).
        for facts in self.store.index.nodes():
            node = facts.obj
            ready = conditions.get(node, "Ready")
            if ready is None or ready.get("status") != "True":
                continue
            beat = ready.get("lastHeartbeatTime")
            age = (now - conditions.parse_time(beat)).total_seconds() if beat else self.grace + 1
            if age <= self.grace:
                continue
            node = copy.deepcopy(node)  # the index's own object is never changed
            name = node["metadata"]["name"]
            log.warning("node %s: no heartbeat for %.0fs: marking NotReady", name, age)
            conditions.set_condition(
                node["status"],
                "Ready",
                False,
                "NodeStatusUnknown",
                f"vmferry-handler stopped posting node status {age:.0f}s ago",
                lastHeartbeatTime=beat or "",
            )
            try:
                await write_status(self.store, node)
            except (Conflict, NotFound):
                continue  # the handler just wrote: it is alive, or the node is gone
            # The node lifecycle controller's words.
            self.events.normal(
                node, Reason.NODE_NOT_READY, f"Node {name} status is now: NodeNotReady"
            )
