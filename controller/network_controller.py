"""The migration network reconciler (reference 12.5.2; the contract is
:mod:`vmferry.migration_network`).

Level-triggered over three informers: the HyperConverged, the NetworkAttachmentDefinitions
of ``NAD_NAMESPACE`` and the Nodes. Every relevant event queues the one key (the
HyperConverged's); a pass reads the caches, computes what every Node's assignment
annotation and the HyperConverged's condition should be, and writes only what differs
(a Node's heartbeat changes none of it, so it writes nothing). One pass:

1. ``network`` = ``spec.liveMigrationConfig.network``. Unset: every Node's
   ``ASSIGNMENT_ANNOTATION`` is removed and so is the condition ``HCO_CONDITION``.
2. The NAD ``NAD_NAMESPACE/network`` (:func:`load_nad`): missing, or a config
   :func:`~vmferry.migration_network.parse_nad_config` refuses (given the Nodes'
   InternalIPs: a range overlapping the main network is refused here too, whichever
   object came first): the assignments are removed, the condition is False with reason
   ``NetworkAttachmentDefinitionNotFound`` / ``InvalidNetworkAttachmentDefinition``.
3. Each Node's assignment: the NIC (``master``) and range; with ``ipam.type:
   whereabouts`` an address from :func:`~vmferry.migration_network.allocate` (a node
   keeps the one it has); with ``static`` none (the NIC's own). When the range runs out,
   the nodes without an address get no assignment and are named on the condition.
4. The condition: True when every Ready node serves migrations on the network; else
   False, reason ``NodesNotReady``, naming each Ready node and what it lacks
   (:func:`node_problem`). Nodes that are not Ready are ignored.

:func:`load_nad` and :func:`node_problem` are also what the migration reconciler asks
before placing a migration, so a migration fails for exactly the reasons the condition
shows.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from controller.objects import rfc3339, write_status
from controller.store import Store
from vmferry.errors import Conflict, NotFound
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.migration_network import (
    ASSIGNMENT_ANNOTATION,
    HCO_CONDITION,
    NAD_KIND,
    NAD_NAMESPACE,
    STATUS_FIELD,
    IpamType,
    NadConfig,
    NadError,
    NetworkAssignment,
    NodeNetworkStatus,
    allocate,
    nad_key,
    not_ready_reason,
    parse_nad_config,
)
from vmferry.migration_state import ConfigKey
from vmferry.objects import conditions, kinds

log = logging.getLogger(__name__)
Obj = dict[str, Any]

INTERNAL_IP = "InternalIP"  # Node.status.addresses type of the main network's address
READY = "Ready"  # the Node condition the node monitor keeps
# Reasons of HCO_CONDITION.
REASON_READY = "AllNodesReady"
REASON_NAD_NOT_FOUND = "NetworkAttachmentDefinitionNotFound"
REASON_NAD_INVALID = "InvalidNetworkAttachmentDefinition"
REASON_NODES_NOT_READY = "NodesNotReady"
NODE_WRITE_RETRIES = 5  # a Node's status changes every heartbeat: re-read and retry
HCO_KEY: Key = (kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME)


class NetworkUnusable(Exception):
    """The configured migration network cannot be used at all (``reason`` is the
    condition's reason, the message names the NAD and what is wrong)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def configured_network(hco: Obj | None) -> str:
    """``spec.liveMigrationConfig.network`` of the HyperConverged ("" = main network)."""
    config = ((hco or {}).get("spec") or {}).get("liveMigrationConfig") or {}
    return str(config.get(ConfigKey.NETWORK) or "")


def main_addresses(nodes: Iterable[Obj]) -> list[str]:
    """The Nodes' main-network addresses (``InternalIP``), which a NAD's range must avoid."""
    return [
        str(a.get("address", ""))
        for n in nodes
        for a in (n.get("status") or {}).get("addresses") or []
        if a.get("type") == INTERNAL_IP and a.get("address")
    ]


def load_nad(network: str, nad: Obj | None, nodes: Iterable[Obj]) -> NadConfig:
    """The parsed NAD that ``liveMigrationConfig.network`` names (``nad`` is that object,
    None when it does not exist); raises NetworkUnusable."""
    key = nad_key(network)
    if nad is None:
        raise NetworkUnusable(
            REASON_NAD_NOT_FOUND,
            f"migration network {key}: no NetworkAttachmentDefinition of that name",
        )
    try:
        return parse_nad_config((nad.get("spec") or {}).get("config"), main_addresses(nodes))
    except NadError as e:
        raise NetworkUnusable(
            REASON_NAD_INVALID, f"migration network {key}: invalid {NAD_KIND}: {e}"
        ) from None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_interface(text).ip
    except ValueError:
        return None


def node_problem(network: str, nad: NadConfig, node: Obj) -> str | None:
    """Why ``node`` cannot take part in a migration over ``network`` now, or None: its
    handler's report (:func:`~vmferry.migration_network.not_ready_reason`), or a report
    that does not match the NAD or the node's assignment yet (being re-bound)."""
    name = node["metadata"]["name"]
    status = NodeNetworkStatus.of_node(node)
    reason = not_ready_reason(network, name, status)
    if reason is not None or status is None:
        return reason
    key = nad_key(network)
    served = _ip(status.address)
    if served is None or served not in nad.network:
        return (
            f"node {name} serves migrations on {status.address or 'no address'}, outside "
            f"the range {nad.network} of migration network {key} (not re-bound yet)"
        )
    assignment = NetworkAssignment.of_node(node)
    if assignment is not None and assignment.network == key and assignment.address:
        if _ip(assignment.address) != served:
            return (
                f"node {name} serves migrations on {status.address}, not yet on its "
                f"assigned address {assignment.address} of migration network {key}"
            )
    return None


@dataclass(frozen=True)
class Plan:
    """What one pass wants: each node's annotation value (None = no annotation) and the
    HyperConverged condition (None = no condition)."""

    annotations: dict[str, str | None]
    condition: tuple[bool, str, str] | None  # (status, reason, message)


def _assignments(nad: NadConfig, key: str, nodes: list[Obj]) -> tuple[dict[str, str], list[str]]:
    """node → address ("" with static IPAM), and the nodes the range has no room for."""
    names = sorted(n["metadata"]["name"] for n in nodes)
    if nad.ipam_type != IpamType.WHEREABOUTS:
        return dict.fromkeys(names, ""), []
    current: dict[str, str] = {}
    for node in nodes:
        held = NetworkAssignment.of_node(node)
        if held is not None and held.address:
            current[node["metadata"]["name"]] = held.address
    try:
        return allocate(nad, current, names), []
    except NadError:
        pass
    # Exhausted: the nodes holding an address keep it, the others in name order while
    # addresses remain.
    order = sorted(names, key=lambda n: (n not in current, n))
    fitted: dict[str, str] = {}
    left_out: list[str] = []
    for name in order:
        try:
            fitted = allocate(nad, current, [*fitted, name])
        except NadError:
            left_out.append(name)
    log.warning("migration network %s: range %s exhausted: %s", key, nad.network, left_out)
    return fitted, left_out


def plan(hco: Obj | None, nads: dict[str, Obj], nodes: list[Obj]) -> Plan:
    """The desired state of one pass (pure: the caches in, the writes to make out)."""
    network = configured_network(hco)
    if not network:
        return Plan(dict.fromkeys((n["metadata"]["name"] for n in nodes), None), None)
    key = nad_key(network)
    try:
        nad = load_nad(network, nads.get(network), nodes)
    except NetworkUnusable as e:
        return Plan(
            dict.fromkeys((n["metadata"]["name"] for n in nodes), None),
            (False, e.reason, e.message),
        )
    addresses, left_out = _assignments(nad, key, nodes)
    annotations: dict[str, str | None] = {}
    for node in nodes:
        name = node["metadata"]["name"]
        if name in addresses:
            annotations[name] = NetworkAssignment(
                key, nad.master, str(nad.network), addresses[name]
            ).to_json()
        else:
            annotations[name] = None
    problems: list[str] = []
    ready_nodes = sorted(
        (n for n in nodes if conditions.is_true(n, READY)), key=lambda n: n["metadata"]["name"]
    )
    for node in ready_nodes:
        name = node["metadata"]["name"]
        if name in left_out:
            problems.append(f"node {name}: no free address left in {nad.network} of {key}")
            continue
        # The report is compared with the assignment this pass writes, not an older one.
        meta = dict(node["metadata"])
        meta["annotations"] = {ASSIGNMENT_ANNOTATION: annotations[name] or ""}
        problem = node_problem(network, nad, {**node, "metadata": meta})
        if problem:
            problems.append(problem)
    if problems:
        return Plan(annotations, (False, REASON_NODES_NOT_READY, "; ".join(problems)))
    message = f"every Ready node serves migrations on {key} ({len(ready_nodes)} nodes)"
    return Plan(annotations, (True, REASON_READY, message))


def _node_view(node: Obj | None) -> str:
    """The parts of a Node this reconciler reads (a heartbeat changes none of them)."""
    if node is None:
        return ""
    status = node.get("status") or {}
    return json.dumps(
        [
            (node["metadata"].get("annotations") or {}).get(ASSIGNMENT_ANNOTATION),
            status.get(STATUS_FIELD),
            conditions.is_true(node, READY),
            main_addresses([node]),
        ],
        sort_keys=True,
    )


def _condition_of(hco: Obj | None) -> tuple[bool, str, str] | None:
    cond = conditions.get(hco or {}, HCO_CONDITION)
    if cond is None:
        return None
    return (cond.get("status") == "True", cond.get("reason", ""), cond.get("message", ""))


class NetworkController:
    """Keeps the Nodes' assignments and the HyperConverged condition (module docstring);
    ``clock`` (seconds since the epoch) stamps the condition's transitions."""

    def __init__(
        self,
        store: Store,
        hcos: Informer,
        nads: Informer,
        nodes: Informer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.hcos = hcos
        self.nads = nads
        self.nodes = nodes
        self.clock = clock
        self.queue = WorkQueue()
        hcos.add_handler(self._on_hco)
        nads.add_handler(self._on_nad)
        nodes.add_handler(self._on_node)

    def _on_hco(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        if key == HCO_KEY:
            self.queue.add(HCO_KEY)

    def _on_nad(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        if key[0] == NAD_NAMESPACE:
            self.queue.add(HCO_KEY)

    def _on_node(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        if old is None or new is None or _node_view(old) != _node_view(new):
            self.queue.add(HCO_KEY)

    async def run(self) -> None:
        self.queue.add(HCO_KEY)  # one pass even when nothing is cached to replay
        await self.queue.run(self.reconcile, "network-controller")

    async def reconcile(self, key: Key) -> None:
        hco = self.hcos.get(*HCO_KEY)
        nads = {
            obj["metadata"]["name"]: obj
            for obj in self.nads.items()
            if obj["metadata"].get("namespace") == NAD_NAMESPACE
        }
        nodes = self.nodes.items()
        wanted = plan(hco, nads, nodes)
        for node in nodes:
            name = node["metadata"]["name"]
            have = (node["metadata"].get("annotations") or {}).get(ASSIGNMENT_ANNOTATION)
            if have != wanted.annotations.get(name):
                await self._write_assignment(name, wanted.annotations.get(name))
        if hco is not None and _condition_of(hco) != wanted.condition:
            await self._write_condition(wanted.condition)

    async def _write_assignment(self, name: str, value: str | None) -> None:
        """Set (or, with None, remove) one Node's annotation on a fresh read; a Conflict
        (a heartbeat in between) re-reads."""
        for _ in range(NODE_WRITE_RETRIES):
            try:
                node = await self.store.get("Node", "", name)
            except NotFound:
                return
            annotations = node["metadata"].setdefault("annotations", {})
            if annotations.get(ASSIGNMENT_ANNOTATION) == value:
                return
            if value is None:
                annotations.pop(ASSIGNMENT_ANNOTATION, None)
            else:
                annotations[ASSIGNMENT_ANNOTATION] = value
            try:
                await self.store.update(node)
            except Conflict:
                continue
            log.info("node %s: migration network assignment %s", name, value or "removed")
            return
        raise Conflict(f"node {name}: the assignment write kept conflicting; retrying")

    async def _write_condition(self, wanted: tuple[bool, str, str] | None) -> None:
        try:
            hco = await self.store.get("HyperConverged", *HCO_KEY)
        except NotFound:
            return
        status = hco.setdefault("status", {})
        if wanted is None:
            kept = [c for c in status.get("conditions") or [] if c.get("type") != HCO_CONDITION]
            if len(kept) == len(status.get("conditions") or []):
                return
            status["conditions"] = kept
        else:
            value, reason, message = wanted
            before = conditions.get(hco, HCO_CONDITION)
            flipped = before is None or before.get("status") != ("True" if value else "False")
            if not conditions.set_condition(status, HCO_CONDITION, value, reason, message):
                return
            if flipped:
                cond = conditions.get(hco, HCO_CONDITION)
                assert cond is not None
                cond["lastTransitionTime"] = rfc3339(self.clock())
        await write_status(self.store, hco)
        log.info("hyperconverged: %s %s", HCO_CONDITION, wanted or "removed")
