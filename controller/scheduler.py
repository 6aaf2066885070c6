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


def memory_claims(vmi: Obj) -> dict[str, int]:
    """The memory (bytes) ``vmi`` holds on each node: its guest's on the node it runs
    on, and again on the target of its migration in progress; nothing once final."""
    status = vmi.get("status") or {}
    if status.get("phase") in VMI_FINAL_PHASES:
        return {}
    node = status.get("nodeName")
    target = MigrationState.of(vmi).target_node
    targeted = bool(target) and is_active_migration_target(vmi, target)
    if not node and not targeted:
        return {}
    need = memory_bytes(vmi.get("spec") or {})
    claims = {node: need} if node else {}
    if targeted:
        claims[target] = need
    return claims


def memory_usage(vmis: Iterable[Obj]) -> dict[str, int]:
    """Memory in use per node name (``memory_claims`` summed), in one pass over ``vmis``."""
    used: dict[str, int] = {}
    for vmi in vmis:
        for node, amount in memory_claims(vmi).items():
            used[node] = used.get(node, 0) + amount
    return used


def memory_in_use(node_name: str, vmis: Iterable[Obj]) -> int:
    return memory_usage(vmis).get(node_name, 0)


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What placement reads of a Node, parsed once per change of it (the controller's
    index keeps them: ``controller.sched_index``); ``obj`` is the Node itself."""

    name: str
    ready: bool
    unschedulable: bool
    labels: Mapping[str, str]
    cpu_model: str
    memory: int
    obj: Obj

    @classmethod
    def of(cls, node: Obj) -> NodeFacts:
        return cls(
            name=node["metadata"]["name"],
            ready=conditions.is_true(node, "Ready"),
            unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
            labels=dict(node["metadata"].get("labels") or {}),
            cpu_model=node_cpu_model(node),
            memory=node_memory(node),
            obj=node,
        )


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
    """``place_with_usage`` given every VMI (their memory summed per node first)."""
    return place_with_usage(
        vmi,
        [NodeFacts.of(node) for node in nodes],
        memory_usage(vmis),
        exclude=exclude,
        added_selector=added_selector,
        source_cpu_model=source_cpu_model,
        network=network,
        network_problem=network_problem,
    )


def place_with_usage(
    vmi: Obj,
    nodes: Iterable[NodeFacts],
    used: Mapping[str, int],
    *,
    exclude: str | None = None,
    added_selector: Mapping[str, str] | None = None,
    source_cpu_model: str | None = None,
    network: str = "",
    network_problem: Callable[[Obj], str | None] | None = None,
) -> Placement:
    """Pick a node for ``vmi``; ``Placement.reasons`` name why each other node did not fit.

    ``used`` is the memory in use per node name (``memory_usage``; the controller keeps
    it indexed: ``controller.sched_index``, with the nodes' facts), so one decision
    costs O(nodes).
    ``network_problem`` (a migration over the migration network ``network``, its NAD's
    ``namespace/name``) says why a node cannot serve it, or None when it can."""
    spec = vmi.get("spec") or {}
    need = memory_bytes(spec)
    selector = dict(spec.get("nodeSelector") or {})
    selector.update(added_selector or {})
    cpu_model = ((spec.get("domain") or {}).get("cpu") or {}).get("model", "host-model")
    best: tuple[int, str] | None = None
    reasons: list[str] = []
    for node in sorted(nodes, key=lambda n: n.name):
        name = node.name
        if name == exclude:
            continue
        if not node.ready:
            reasons.append(f"{name}: not Ready")
            continue
        if node.unschedulable:
            reasons.append(f"{name}: unschedulable (cordoned)")
            continue
        missing = [f"{k}={v}" for k, v in selector.items() if node.labels.get(k) != v]
        if missing:
            reasons.append(f"{name}: does not match node selector {', '.join(missing)}")
            continue
        model = node.cpu_model
        if cpu_model == "host-model" and source_cpu_model and model != source_cpu_model:
            reasons.append(
                f"{name}: CPU model {model!r} differs from the source's {source_cpu_model!r}"
            )
            continue
        if cpu_model not in ("host-model", "host-passthrough", "") and model != cpu_model:
            reasons.append(f"{name}: CPU model {model!r} is not {cpu_model!r}")
            continue
        free = node.memory - used.get(name, 0)
        if free < need:
            reasons.append(f"{name}: insufficient memory ({free} bytes free, {need} needed)")
            continue
        problem = network_problem(node.obj) if network_problem is not None else None
        if problem:
            reasons.append(f"{name}: not on migration network {network} ({problem})")
            continue
        if best is None or free > best[0]:
            best = (free, name)
    return Placement(best[1] if best else None, reasons)
