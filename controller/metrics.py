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

- ``vmistats_collector.go``: ``kubevirt_vmi_non_evictable{node, namespace, name}`` (1 when
  the eviction strategy is LiveMigrate, the default, and the VMI is not, or not yet known
  to be, LiveMigratable: KubeVirt is conservative, an alert uses it) and
  ``kubevirt_vmi_info{node, namespace, name, phase, os, workload, flavor, instance_type,
  preference, guest_os_*, evictable, outdated, vmi_pod}`` (value 1; ``<none>`` where
  KubeVirt has no value).
- ``component_metrics.go``: ``kubevirt_virt_controller_leading_status{pod}`` and
  ``kubevirt_virt_controller_ready_status{pod}`` (1/0; ``pod`` is this controller's
  instance name).

With ``metrics_auth = "rbac"``, :func:`rbac_authorizer` decides who may read them.

Everything is read in the event loop (the HTTP server of :mod:`vmferry.httpserve` runs
there), so the caches are never read while they change.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.authn import AUTHENTICATED_GROUP
from controller.rbac import Policy
from vmferry import metrics_http, pki
from vmferry.errors import Unauthorized
from vmferry.informer import Informer, Key
from vmferry.migration_state import PROGRESS_PHASES, MigrationPhase, MigrationState, raw
from vmferry.objects import conditions
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


LIVE_MIGRATE = "LiveMigrate"  # the default eviction strategy of a VMI without one
OS_ANNOTATIONS = ("vm.kubevirt.io/os", "vm.kubevirt.io/workload", "vm.kubevirt.io/flavor")
INFO_LABELS = [
    "node",
    "namespace",
    "name",
    "phase",
    "os",
    "workload",
    "flavor",
    "instance_type",
    "preference",
    "guest_os_kernel_release",
    "guest_os_machine",
    "guest_os_arch",
    "guest_os_name",
    "guest_os_version_id",
    "evictable",
    "outdated",
    "vmi_pod",
]


def non_evictable(vmi: Obj) -> bool:
    """KubeVirt's eviction blocker: strategy LiveMigrate and LiveMigratable not True."""
    strategy = (vmi.get("spec") or {}).get("evictionStrategy") or LIVE_MIGRATE
    if strategy != LIVE_MIGRATE:
        return False
    migratable = conditions.get(vmi, "LiveMigratable")
    return migratable is None or migratable.get("status") != "True"


def vmi_stats(vmis: Iterable[Obj]) -> Iterator[Metric]:
    """``kubevirt_vmi_non_evictable`` and ``kubevirt_vmi_info`` for these VMIs."""
    blocked = GaugeMetricFamily(
        "kubevirt_vmi_non_evictable",
        "Indication for a VirtualMachine that its eviction strategy is set to Live "
        "Migration but is not migratable.",
        labels=["node", "namespace", "name"],
    )
    info = GaugeMetricFamily(
        "kubevirt_vmi_info", "Information about VirtualMachineInstances.", labels=INFO_LABELS
    )
    for vmi in vmis:
        meta = vmi.get("metadata") or {}
        status = vmi.get("status") or {}
        node, ns, name = status.get("nodeName", ""), meta.get("namespace", ""), meta["name"]
        stuck = non_evictable(vmi)
        blocked.add_metric([node, ns, name], 1.0 if stuck else 0.0)
        notes = meta.get("annotations") or {}
        guest = status.get("guestOSInfo") or {}
        info.add_metric(
            [
                node,
                ns,
                name,
                str(status.get("phase") or "").lower(),
                *(notes.get(a) or NONE for a in OS_ANNOTATIONS),
                NONE,  # instance_type: vmferry has no instance types
                NONE,  # preference
                guest.get("kernelRelease", ""),
                guest.get("machine", ""),
                guest.get("arch", ""),
                guest.get("name", ""),
                guest.get("versionId", ""),
                "false" if stuck else "true",
                "false",  # outdated: no launcher images to be outdated
                NONE,  # vmi_pod: guests run in the handler, not in pods
            ],
            1.0,
        )
    yield blocked
    yield info


class _CacheCollector(Collector):
    """Reads the informer caches at scrape time (KubeVirt's collector callbacks)."""

    def __init__(
        self,
        vmims: Informer,
        vmis: Informer,
        instance: str,
        leading: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        self.vmims = vmims
        self.vmis = vmis
        self.instance = instance
        self.leading = leading
        self.ready = ready

    def collect(self) -> Iterator[Metric]:
        vmims = list(self.vmims.cache.values())
        vmis = list(self.vmis.cache.values())
        yield from migration_stats(vmims)
        yield from migration_times(vmis, vmims)
        yield from vmi_stats(vmis)
        for what, value, doc in (
            ("leading", self.leading(), "Indication for an operating virt-controller."),
            (
                "ready",
                self.ready(),
                "Indication for a virt-controller that is ready to take the lead.",
            ),
        ):
            family = GaugeMetricFamily(
                f"kubevirt_virt_controller_{what}_status", doc, labels=["pod"]
            )
            family.add_metric([self.instance], 1.0 if value else 0.0)
            yield family


def rbac_authorizer(
    authenticate_token: Callable[[str], Awaitable[pki.Identity]],
    policy: Callable[[], Awaitable[Policy]],
) -> metrics_http.Authorizer:
    """``metrics_auth = "rbac"``: a client certificate or a bearer token, allowed when RBAC
    grants ``get`` on the non-resource URL ``/metrics`` (as kube-rbac-proxy asks with a
    SubjectAccessReview); the controller decides in-process."""

    async def authorize(cert_der: bytes | None, token: str | None) -> metrics_http.Decision:
        if token is not None:
            if not token:
                return metrics_http.Decision(
                    401, 'Unauthorized: the Authorization header must be "Bearer <token>"'
                )
            try:
                who = await authenticate_token(token)
            except Unauthorized as e:
                return metrics_http.Decision(401, f"Unauthorized: {e.message}")
        else:
            found = metrics_http.certificate_identity(cert_der)
            if found is None:
                return metrics_http.Decision(
                    401,
                    "Unauthorized: present a client certificate from the cluster CA or a "
                    "service-account bearer token",
                )
            who = found
        groups = tuple(dict.fromkeys((*who.groups, AUTHENTICATED_GROUP)))
        decision = (await policy()).authorize_non_resource(
            who.user, groups, "get", metrics_http.METRICS_PATH
        )
        if decision.allowed:
            return metrics_http.ALLOWED
        return metrics_http.Decision(403, f"Forbidden: {decision.reason}")

    return authorize


class ControllerMetrics:
    """The controller's registry; build it once the informers exist, before they run."""

    def __init__(
        self,
        vmims: Informer,
        vmis: Informer,
        *,
        instance: str,
        ready: Callable[[], bool],
        leading: Callable[[], bool] = lambda: True,  # one controller: always the leader
    ) -> None:
        disable_created_metrics()  # KubeVirt (Go client) exports no *_created series
        self.registry = metrics_http.daemon_registry()
        self.phase_transition = Histogram(
            "kubevirt_vmi_migration_phase_transition_time_from_creation_seconds",
            "Histogram of VM migration phase transitions duration from creation time in seconds.",
            ["phase"],
            buckets=PHASE_TRANSITION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_CacheCollector(vmims, vmis, instance, leading, ready))
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
