"""Which Pending migration may start: the parallel limits and the priority order.

The queue is every Pending VMIM not being deleted, ordered by (priority, creation time,
name): evacuations (node drain, ``EVACUATION_ANNOTATION``) before user requests, then
oldest first. Walking it while simulating admissions, a VMIM starts only if it would get
one of the ``parallelMigrationsPerCluster`` slots left free by the active migrations
(``ACTIVE_PHASES``); a candidate whose source node already has
``parallelOutboundMigrationsPerNode`` migrations leaving is skipped (it waits) without
blocking the ones behind it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vmferry.migration_state import ConfigKey, MigrationPhase

Obj = dict[str, Any]

EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"  # value: the node being drained


def queue_order(vmim: Obj) -> tuple[int, str, str]:
    """Sort key of the Pending queue: evacuations first, then oldest first."""
    annotations = vmim["metadata"].get("annotations") or {}
    priority = 0 if EVACUATION_ANNOTATION in annotations else 1
    return priority, vmim["metadata"].get("creationTimestamp", ""), vmim["metadata"]["name"]


@dataclass(frozen=True)
class Admission:
    """Whether a Pending VMIM may move to Scheduling now; ``reason`` says why it waits."""

    start: bool
    reason: str = ""


def admit(
    vmim: Obj, vmims: Iterable[Obj], vmis: Iterable[Obj], config: Mapping[str, Any]
) -> Admission:
    """Decide for ``vmim`` given every VMIM and VMI of the cluster (read from the store,
    not a cache, so two passes in a row never both take the last slot) and the cluster's
    ``liveMigrationConfig`` (defaults filled in)."""
    node_of = {
        (v["metadata"]["namespace"], v["metadata"]["name"]): (v.get("status") or {}).get("nodeName")
        for v in vmis
    }

    def source(m: Obj) -> str | None:
        return node_of.get((m["metadata"]["namespace"], m["spec"]["vmiName"]))

    everything = list(vmims)
    active = [m for m in everything if MigrationPhase.of(m).active]
    outbound = Counter(source(m) for m in active)
    limit = int(config[ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER])
    per_node = int(config[ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE])
    free = limit - len(active)
    queue = sorted(
        (
            m
            for m in everything
            if MigrationPhase.of(m) == MigrationPhase.PENDING
            and not m["metadata"].get("deletionTimestamp")
        ),
        key=queue_order,
    )
    uid = vmim["metadata"]["uid"]
    for candidate in queue:
        if free <= 0:
            break
        src = source(candidate)
        if outbound[src] >= per_node:
            if candidate["metadata"]["uid"] == uid:
                return Admission(False, f"{outbound[src]} migrations already leave node {src}")
            continue
        if candidate["metadata"]["uid"] == uid:
            return Admission(True)
        free -= 1
        outbound[src] += 1
    return Admission(False, f"waiting in the queue ({len(active)} running, limit {limit})")
