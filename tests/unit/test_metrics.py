"""The metric collectors on fake caches: KubeVirt's counting rules, labels and the
handler's retention of a finished migration's figures; and the HTTP server's address parsing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from controller.metrics import ControllerMetrics, transition_seconds_from_creation
from handler.metrics import FINISHED_RETENTION, HandlerMetrics
from handler.migration.stats import Stats
from vmferry import httpserve
from vmferry.informer import Informer


def vmim(name: str, phase: str, uid: str = "", vmi: str = "vm") -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": name,
            "uid": uid or f"uid-{name}",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"vmiName": vmi},
        "status": {
            "phase": phase,
            "phaseTransitionTimestamps": [
                {"phase": "Pending", "phaseTransitionTimestamp": "2026-01-01T00:00:00.100000Z"},
                {"phase": phase, "phaseTransitionTimestamp": "2026-01-01T00:00:02.500000Z"},
            ],
        },
    }


def sample(registry: CollectorRegistry, metric: str, /, **labels: str) -> float | None:
    return registry.get_sample_value(metric, labels or None)


def test_controller_counts_phases_as_kubevirt_does() -> None:
    vmims = Informer(SimpleNamespace(), "VirtualMachineInstanceMigration")  # type: ignore[arg-type]
    vmis = Informer(SimpleNamespace(), "VirtualMachineInstance")  # type: ignore[arg-type]
    metrics = ControllerMetrics(vmims, vmis, instance="c1", ready=lambda: True)
    for i, phase in enumerate(
        ["", "Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running"]
    ):
        vmims.apply_event("ADDED", vmim(f"m{i}", phase))
    vmims.apply_event("ADDED", vmim("ok", "Succeeded", vmi="vm-ok"))
    vmims.apply_event("ADDED", vmim("bad", "Failed", vmi="vm-bad"))
    r = metrics.registry
    assert sample(r, "kubevirt_vmi_migrations_in_unset_phase") == 1
    assert sample(r, "kubevirt_vmi_migrations_in_pending_phase") == 1
    assert sample(r, "kubevirt_vmi_migrations_in_scheduling_phase") == 1
    assert sample(r, "kubevirt_vmi_migrations_in_running_phase") == 4
    ok = {"vmi": "vm-ok", "vmim": "ok", "namespace": "default"}
    assert sample(r, "kubevirt_vmi_migration_succeeded", **ok) == 1
    assert (
        sample(r, "kubevirt_vmi_migration_failed", vmi="vm-bad", vmim="bad", namespace="default")
        == 1
    )
    assert sample(r, "kubevirt_vmi_migration_failed", **ok) is None


def test_phase_histogram_observes_updates_that_change_the_phase() -> None:
    vmims = Informer(SimpleNamespace(), "VirtualMachineInstanceMigration")  # type: ignore[arg-type]
    vmis = Informer(SimpleNamespace(), "VirtualMachineInstance")  # type: ignore[arg-type]
    metrics = ControllerMetrics(vmims, vmis, instance="c1", ready=lambda: True)
    vmims.apply_event("ADDED", vmim("m", "Pending"))  # first sight: not a transition
    vmims.apply_event("MODIFIED", vmim("m", "Running"))
    vmims.apply_event("MODIFIED", vmim("m", "Running"))  # same phase: not again
    name = "kubevirt_vmi_migration_phase_transition_time_from_creation_seconds"
    assert sample(metrics.registry, f"{name}_count", phase="Running") == 1
    assert sample(metrics.registry, f"{name}_sum", phase="Running") == 2.5
    assert sample(metrics.registry, f"{name}_count", phase="Pending") is None
    assert transition_seconds_from_creation(vmim("m", "Running")) == 2.5


def test_start_and_end_times_carry_kubevirts_labels() -> None:
    vmims = Informer(SimpleNamespace(), "VirtualMachineInstanceMigration")  # type: ignore[arg-type]
    vmis = Informer(SimpleNamespace(), "VirtualMachineInstance")  # type: ignore[arg-type]
    metrics = ControllerMetrics(vmims, vmis, instance="c1", ready=lambda: True)
    vmims.apply_event("ADDED", vmim("mig", "Succeeded", uid="u1"))
    vmis.apply_event(
        "ADDED",
        {
            "metadata": {"namespace": "default", "name": "vm"},
            "status": {
                "nodeName": "node2",
                "migrationState": {
                    "migrationUid": "u1",
                    "startTimestamp": "2026-01-01T00:00:01Z",
                    "endTimestamp": "2026-01-01T00:00:05Z",
                    "completed": True,
                },
            },
        },
    )
    labels = {"node": "node2", "namespace": "default", "name": "vm", "migration_name": "mig"}
    start = sample(metrics.registry, "kubevirt_vmi_migration_start_time_seconds", **labels)
    end = sample(
        metrics.registry, "kubevirt_vmi_migration_end_time_seconds", **labels, status="succeeded"
    )
    assert start is not None and end == start + 4


class FakeManager:
    def __init__(self) -> None:
        self.progress: dict[str, tuple[dict[str, Any], Stats]] = {}
        self.sources: dict[str, tuple[Any, Any]] = {}


def test_handler_exports_progress_then_keeps_the_final_figures_for_a_while() -> None:
    now = [0.0]
    manager = FakeManager()
    metrics = HandlerMetrics(manager, "node1", clock=lambda: now[0])  # type: ignore[arg-type]
    vmi = {"metadata": {"namespace": "default", "name": "vm"}}
    stats = Stats(total_bytes=100, processed_bytes=40, remaining_bytes=60, wire_bytes=30)
    migration = SimpleNamespace(committed=False)
    manager.sources["u1"] = (migration, None)
    manager.progress["u1"] = (vmi, stats)
    r = metrics.registry
    labels = {"namespace": "default", "name": "vm", "node": "node1"}
    assert sample(r, "kubevirt_vmi_migration_data_processed_bytes", **labels) == 40
    assert sample(r, "kubevirt_vmi_migration_data_bytes_total", **labels) == 100
    assert sample(r, "kubevirt_vmi_migration_data_total_bytes", **labels) == 100
    assert sample(r, "vmferry_migration_wire_bytes", **labels) == 30

    stats.processed_bytes, stats.remaining_bytes = 120, 0
    stats.downtime_parts = {"pause": 0.01, "final_pass": 0.04}
    migration.committed = True
    del manager.sources["u1"]
    now[0] = 1.0
    metrics.refresh()
    assert sample(r, "kubevirt_vmi_migration_data_remaining_bytes", **labels) == 0
    assert sample(r, "kubevirt_vmi_migration_downtime_seconds_count", node="node1") == 1
    assert sample(r, "kubevirt_vmi_migration_last_downtime_seconds", **labels) == 0.05
    assert (
        sample(r, "vmferry_migration_downtime_part_seconds_sum", node="node1", part="pause") == 0.01
    )
    metrics.refresh()  # seen once: observed once
    assert sample(r, "vmferry_migration_downtime_seconds_count", node="node1") == 1

    now[0] = 2.0 + FINISHED_RETENTION
    assert sample(r, "kubevirt_vmi_migration_data_processed_bytes", **labels) is None


def test_split_hostport() -> None:
    assert httpserve.split_hostport("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert httpserve.split_hostport("[::1]:80") == ("::1", 80)
    for bad in ("9090", "host:", "host:99999"):
        try:
            httpserve.split_hostport(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
