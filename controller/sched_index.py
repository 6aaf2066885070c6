"""The scheduling index: what placement and admission read, kept up to date with every
committed change instead of listed and summed per decision.

The store (``controller.store.Store``) feeds it from ``publish``, in the same step that
updates its read cache: the index is exactly as current as ``Store.get``/``list`` (a
decision right after a write sees it, as the admission walk requires), and a cache
reload (``Store.reset``) rebuilds it. It holds:

* every Node, parsed once per change, and its placement facts (``scheduler.NodeFacts``),
  sorted by name (read-only to callers);
* the memory each VMI holds per node (``scheduler.memory_claims``) and the sum per node;
* the migration queue (``migration_queue.MigrationQueue``: the active count, migrations
  leaving each node, the Pending queue per source node).

A placement then costs O(nodes) and an admission O(nodes x log(Pending)), whatever the
number of VMIs and VMIMs. A VMI whose memory does not parse (the API rejects one) holds
nothing here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from controller.migration_queue import Key, MigrationQueue
from controller.scheduler import NodeFacts, memory_claims
from vmferry.errors import Invalid

Obj = dict[str, Any]
NODE = "Node"
VMI = "VirtualMachineInstance"
VMIM = "VirtualMachineInstanceMigration"
KINDS = frozenset({NODE, VMI, VMIM})


class SchedulingIndex:
    def __init__(self) -> None:
        self.queue = MigrationQueue()
        self._nodes: dict[str, NodeFacts] = {}
        self._sorted_nodes: list[NodeFacts] | None = []
        self._claims: dict[Key, dict[str, int]] = {}
        self._used: dict[str, int] = {}

    def apply(self, kind: str, namespace: str, name: str, data: str | None) -> None:
        """The object ``kind`` ``namespace/name`` is now ``data`` (JSON; None: deleted).
        Other kinds are ignored."""
        if kind not in KINDS:
            return
        obj: Obj | None = None if data is None else json.loads(data)
        key = (namespace, name)
        if kind == NODE:
            self._set_node(name, obj)
        elif kind == VMI:
            self._set_vmi(key, obj)
        else:
            self.queue.set_vmim(key, obj)

    def _set_node(self, name: str, node: Obj | None) -> None:
        if node is None:
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = NodeFacts.of(node)
        self._sorted_nodes = None

    def _set_vmi(self, key: Key, vmi: Obj | None) -> None:
        for node, amount in self._claims.pop(key, {}).items():
            left = self._used[node] - amount
            if left:
                self._used[node] = left
            else:
                del self._used[node]
        if vmi is None:
            self.queue.set_vmi_node(key, None)
            return
        self.queue.set_vmi_node(key, (vmi.get("status") or {}).get("nodeName") or None)
        try:
            claims = memory_claims(vmi)
        except Invalid:
            claims = {}
        if claims:
            self._claims[key] = claims
            for node, amount in claims.items():
                self._used[node] = self._used.get(node, 0) + amount

    # -- reading ----------------------------------------------------------------------

    def nodes(self) -> list[NodeFacts]:
        """Every Node's facts, sorted by name (``.obj``: the index's own Node, not to be
        changed)."""
        if self._sorted_nodes is None:
            self._sorted_nodes = [self._nodes[name] for name in sorted(self._nodes)]
        return self._sorted_nodes

    def node(self, name: str) -> Obj | None:
        facts = self._nodes.get(name)
        return None if facts is None else facts.obj

    def memory_used(self) -> Mapping[str, int]:
        """Memory in use per node name (``scheduler.memory_usage`` of every VMI)."""
        return self._used
