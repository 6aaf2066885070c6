"""The controller's Prometheus metrics, with KubeVirt's names, types and labels.

KubeVirt's virt-controller computes these from its informer caches; so do we (the
``vmims``/``vmis`` informers of ``controller.main``). Sources, in kubevirt/kubevirt
``pkg/monitoring/metrics/virt-controller/``:

- ``migrationstats_collector.go``: gauges ``kubevirt_vmi_migrations_in_{pending,
  scheduling,running,unset}_phase`` (no labels; "running" counts Scheduled,
  PreparingTarget, TargetReady and Running) and ``kubevirt_vmi_migration_succeeded`` /
  ``kubevirt_vmi_migration_failed`` (labels ``vmi, vmim, namespace``; value 1 per
  finished VMIM).
- ``migration_metrics.go``: histogram
  ``kubevirt_vmi_migration_phase_transition_time_from_creation_seconds{phase}``,
  observed when an informer update changes a VMIM's phase: seconds from the VMIM's
  creation to the recorded transition into that phase. Buckets: ``PhaseTransitionTimeBuckets``.
- ``vmistats_collector.go``: gauges ``kubevirt_vmi_migration_start_time_seconds{node,
  namespace, name, migration_name}`` and ``kubevirt_vmi_migration_end_time_seconds{node,
  namespace, name, migration_name, status}`` from ``vmi.status.migrationState``
  (``status`` is ``succeeded``/``failed``, empty while not completed, as there).

Everything is read in the event loop (the HTTP server of :mod:`vmferry.httpserve` runs
there), so the caches are never read while they change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmferry.informer import Informer, Key
from vmferry.migration_state import PROGRESS_PHASES, MigrationPhase, MigrationState, raw
from vmferry.objects.conditions import parse_time

log = logging.getLogger(__name__)
Obj = dict[str, Any]

# KubeVirt's PhaseTransitionTimeBuckets(): 0.5 s … 1 h.
PHASE_TRANSITION_BUCKETS = (
    0.5,
    1,
    2,
    5,
    10,
    20,
    30,
    40,
    50,
    60,
    90,
    120,
    180,
    300,
    600,
    1200,
    1800,
    3600,
)
RUNNING_PHASES = PROGRESS_PHASES  # KubeVirt counts them all as "running"
NONE = "<none>"  # KubeVirt's label value when the VMIM of a migrationUid is unknown


def _seconds(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return parse_time(stamp).timestamp()
    except ValueError:
        return None


def transition_seconds_from_creation(vmim: Obj) -> float | None:
    """Seconds from creation to the transition into the VMIM's current phase (≥ 0)."""
    status = vmim.get("status") or {}
    phase = status.get("phase")
    created = _seconds((vmim.get("metadata") or {}).get("creationTimestamp"))
    entered = None
    for item in status.get("phaseTransitionTimestamps") or []:
        if item.get("phase") == phase:
            entered = _seconds(item.get("phaseTransitionTimestamp"))
    if created is None or entered is None:
        return None
    return max(0.0, entered - created)


def migration_stats(vmims: Iterable[Obj]) -> Iterator[Metric]:
    """The ``migrationstats_collector`` families for these VMIMs."""
    counts = {"pending": 0, "scheduling": 0, "running": 0, "unset": 0}
    succeeded = GaugeMetricFamily(
        "kubevirt_vmi_migration_succeeded",
        "Indicates if the VMI migration succeeded.",
        labels=["vmi", "vmim", "namespace"],
    )
    failed = GaugeMetricFamily(
        "kubevirt_vmi_migration_failed",
        "Indicates if the VMI migration failed.",
        labels=["vmi", "vmim", "namespace"],
    )
    for vmim in vmims:
        phase = MigrationPhase.of(vmim)
        meta = vmim["metadata"]
        labels = [(vmim.get("spec") or {}).get("vmiName", ""), meta["name"], meta["namespace"]]
        if phase == MigrationPhase.PENDING:
            counts["pending"] += 1
        elif phase == MigrationPhase.SCHEDULING:
            counts["scheduling"] += 1
        elif phase == MigrationPhase.UNSET:
            counts["unset"] += 1
        elif phase in RUNNING_PHASES:
            counts["running"] += 1
        elif phase == MigrationPhase.SUCCEEDED:
            succeeded.add_metric(labels, 1)
        elif phase == MigrationPhase.FAILED:
            failed.add_metric(labels, 1)
    helps = {
        "pending": "Number of current pending migrations.",
        "scheduling": "Number of current scheduling migrations.",
        "running": "Number of current running migrations.",
        "unset": "Number of current unset migrations. These are pending items the "
        "virt-controller hasn't processed yet from the queue.",
    }
    for group, count in counts.items():
        yield GaugeMetricFamily(
            f"kubevirt_vmi_migrations_in_{group}_phase", helps[group], value=count
        )
    yield succeeded
    yield failed


def migration_times(vmis: Iterable[Obj], vmims: Iterable[Obj]) -> Iterator[Metric]:
    """The start/end time families of ``vmistats_collector`` for these VMIs."""
    names = {
        ((v.get("metadata") or {}).get("namespace"), (v.get("metadata") or {}).get("uid")): v[
            "metadata"
        ]["name"]
        for v in vmims
    }
    start = GaugeMetricFamily(
        "kubevirt_vmi_migration_start_time_seconds",
        "The time at which the migration started.",
        labels=["node", "namespace", "name", "migration_name"],
    )
    end = GaugeMetricFamily(
        "kubevirt_vmi_migration_end_time_seconds",
        "The time at which the migration ended.",
        labels=["node", "namespace", "name", "migration_name", "status"],
    )
    for vmi in vmis:
        status = vmi.get("status") or {}
        if not raw(vmi):
            continue
        ms = MigrationState.of(vmi)
        meta = vmi["metadata"]
        migration = names.get((meta.get("namespace"), ms.migration_uid), NONE)
        labels = [status.get("nodeName", ""), meta.get("namespace", ""), meta["name"], migration]
        started = _seconds(ms.start_timestamp)
        if started is not None:
            start.add_metric(labels, int(started))
        ended = _seconds(ms.end_timestamp)
        if ended is not None:
            outcome = ""
            if ms.failed:
                outcome = "failed"
            elif ms.completed:
                outcome = "succeeded"
            end.add_metric([*labels, outcome], int(ended))
    yield start
    yield end


class _CacheCollector(Collector):
    """Reads the informer caches at scrape time (KubeVirt's collector callbacks)."""

    def __init__(self, vmims: Informer, vmis: Informer) -> None:
        self.vmims = vmims
        self.vmis = vmis

    def collect(self) -> Iterator[Metric]:
        vmims = list(self.vmims.cache.values())
        yield from migration_stats(vmims)
        yield from migration_times(list(self.vmis.cache.values()), vmims)


class ControllerMetrics:
    """The controller's registry; build it once the informers exist, before they run."""

    def __init__(self, vmims: Informer, vmis: Informer) -> None:
        disable_created_metrics()  # KubeVirt (Go client) exports no *_created series
        self.registry = CollectorRegistry()
        self.phase_transition = Histogram(
            "kubevirt_vmi_migration_phase_transition_time_from_creation_seconds",
            "Histogram of VM migration phase transitions duration from creation time in seconds.",
            ["phase"],
            buckets=PHASE_TRANSITION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_CacheCollector(vmims, vmis))
        vmims.add_handler(self._on_vmim)

    def _on_vmim(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        """Observe a phase change (updates only: a relist's first sight is not one)."""
        if old is None or new is None:
            return
        phase = (new.get("status") or {}).get("phase")
        if not phase or phase == (old.get("status") or {}).get("phase"):
            return
        seconds = transition_seconds_from_creation(new)
        if seconds is None:
            log.debug("migration %s: no transition timestamp for phase %s", key, phase)
            return
        self.phase_transition.labels(phase).observe(seconds)
