"""Placement: which node runs a new VMI, and which node receives a migrating one.

A node fits when it is Ready, schedulable, matches every label of the VMI's
``nodeSelector`` (plus a migration's ``addedNodeSelector``: logical AND), has a CPU
model the VMI can run on (``host-model`` needs the same model as its current node) and
has enough memory left; a migration over a migration network also needs a target that
serves on it. Memory in use counts the VMIs that run on the node and those
migrating to it (a receiving VMI waiting in ``WaitingForSync`` has no node: it counts
on its target only once its migration names one). Among fitting nodes the one with the most free memory wins (ties: by
name), which spreads VMs like the default Kubernetes scheduler's least-allocated score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmferry.migration_state import VMI_FINAL_PHASES, MigrationState
from vmferry.objects import conditions
from vmferry.objects.quantity import parse_quantity
from vmferry.objects.schema import memory_bytes

Obj = dict[str, Any]


def node_memory(node: Obj) -> int:
    cap = (
        (node.get("status") or {}).get("allocatable")
        or (node.get("status") or {}).get("capacity")
        or {}
    )
    return parse_quantity(cap.get("memory", 0))


def node_cpu_model(node: Obj) -> str:
    return str(((node.get("status") or {}).get("nodeInfo") or {}).get("cpuModel", ""))


def is_active_migration_target(vmi: Obj, node_name: str) -> bool:
    ms = MigrationState.of(vmi)
    return (
        ms.target_node == node_name
        and not ms.ended
        and (vmi.get("status") or {}).get("nodeName") != node_name
    )


def memory_in_use(node_name: str, vmis: Iterable[Obj]) -> int:
    total = 0
    for vmi in vmis:
        status = vmi.get("status") or {}
        if status.get("phase") in VMI_FINAL_PHASES:
            continue
        if status.get("nodeName") == node_name or is_active_migration_target(vmi, node_name):
            total += memory_bytes(vmi.get("spec") or {})
    return total


@dataclass
class Placement:
    node: str | None
    reasons: list[str] = field(default_factory=list)

    def message(self) -> str:
        return "; ".join(self.reasons) or "no nodes are registered"


def place(
    vmi: Obj,
    nodes: Iterable[Obj],
    vmis: Iterable[Obj],
    *,
    exclude: str | None = None,
    added_selector: Mapping[str, str] | None = None,
    source_cpu_model: str | None = None,
    network: str = "",
    network_problem: Callable[[Obj], str | None] | None = None,
) -> Placement:
    """Pick a node for ``vmi``; ``Placement.reasons`` name why each other node did not fit.

    ``network_problem`` (a migration over the migration network ``network``, its NAD's
    ``namespace/name``) says why a node cannot serve it, or None when it can."""
    spec = vmi.get("spec") or {}
    need = memory_bytes(spec)
    selector = dict(spec.get("nodeSelector") or {})
    selector.update(added_selector or {})
    cpu_model = ((spec.get("domain") or {}).get("cpu") or {}).get("model", "host-model")
    vmi_list = list(vmis)
    best: tuple[int, str] | None = None
    reasons: list[str] = []
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        if name == exclude:
            continue
        labels = node["metadata"].get("labels") or {}
        if not conditions.is_true(node, "Ready"):
            reasons.append(f"{name}: not Ready")
            continue
        if (node.get("spec") or {}).get("unschedulable"):
            reasons.append(f"{name}: unschedulable (cordoned)")
            continue
        missing = [f"{k}={v}" for k, v in selector.items() if labels.get(k) != v]
        if missing:
            reasons.append(f"{name}: does not match node selector {', '.join(missing)}")
            continue
        model = node_cpu_model(node)
        if cpu_model == "host-model" and source_cpu_model and model != source_cpu_model:
            reasons.append(
                f"{name}: CPU model {model!r} differs from the source's {source_cpu_model!r}"
            )
            continue
        if cpu_model not in ("host-model", "host-passthrough", "") and model != cpu_model:
            reasons.append(f"{name}: CPU model {model!r} is not {cpu_model!r}")
            continue
        free = node_memory(node) - memory_in_use(name, vmi_list)
        if free < need:
            reasons.append(f"{name}: insufficient memory ({free} bytes free, {need} needed)")
            continue
        problem = network_problem(node) if network_problem is not None else None
        if problem:
            reasons.append(f"{name}: not on migration network {network} ({problem})")
            continue
        if best is None or free > best[0]:
            best = (free, name)
    return Placement(best[1] if best else None, reasons)
