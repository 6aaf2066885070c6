"""Placement: readiness, cordon, selectors, CPU model and memory, with reasons."""

from __future__ import annotations

from typing import Any

from controller.scheduler import place


def node(
    name: str,
    memory: str = "1Gi",
    ready: bool = True,
    labels: dict[str, str] | None = None,
    cpu: str = "model-a",
    unschedulable: bool = False,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"unschedulable": unschedulable},
        "status": {
            "capacity": {"memory": memory},
            "nodeInfo": {"cpuModel": cpu},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def vmi(
    memory: str = "256Mi",
    node_name: str | None = None,
    selector: dict[str, str] | None = None,
    model: str = "host-model",
) -> dict[str, Any]:
    return {
        "metadata": {"name": "v", "namespace": "default"},
        "spec": {
            "domain": {"memory": {"guest": memory}, "cpu": {"model": model}},
            "nodeSelector": selector or {},
        },
        "status": {"nodeName": node_name, "phase": "Running"} if node_name else {},
    }


def test_most_free_memory_wins_and_full_nodes_are_skipped_with_a_reason() -> None:
    nodes = [node("a", "1Gi"), node("b", "2Gi"), node("c", "512Mi")]
    running = [vmi("1Gi", "b"), vmi("512Mi", "a")]
    assert place(vmi("512Mi"), nodes, running).node == "b"  # 1Gi free beats 512Mi
    p = place(vmi("768Mi"), nodes, running)
    assert p.node == "b" and p.reasons == [
        "a: insufficient memory (536870912 bytes free, 805306368 needed)",
        "c: insufficient memory (536870912 bytes free, 805306368 needed)",
    ]
    p = place(vmi("1536Mi"), nodes, running)
    assert p.node is None and "b: insufficient memory" in p.message()


def test_not_ready_cordoned_and_selector_mismatch_are_named() -> None:
    nodes = [
        node("a", ready=False),
        node("b", unschedulable=True),
        node("c", labels={"disk": "hdd"}),
    ]
    p = place(vmi(selector={"disk": "ssd"}), nodes, [])
    assert p.node is None
    assert p.reasons == [
        "a: not Ready",
        "b: unschedulable (cordoned)",
        "c: does not match node selector disk=ssd",
    ]


def test_added_selector_is_anded_and_the_source_is_excluded() -> None:
    nodes = [node("a", labels={"zone": "1"}), node("b", labels={"zone": "1", "gpu": "yes"})]
    assert place(vmi(selector={"zone": "1"}), nodes, [], exclude="b").node == "a"
    assert place(vmi(selector={"zone": "1"}), nodes, [], added_selector={"gpu": "yes"}).node == "b"
    assert (
        place(
            vmi(selector={"zone": "1"}), nodes, [], exclude="b", added_selector={"gpu": "yes"}
        ).node
        is None
    )


def test_host_model_needs_the_source_cpu_model() -> None:
    nodes = [node("a", cpu="model-a"), node("b", cpu="model-b")]
    p = place(vmi(), nodes, [], exclude="a", source_cpu_model="model-a")
    assert p.node is None and "CPU model 'model-b' differs" in p.message()
    assert place(vmi(model="model-b"), nodes, []).node == "b"
