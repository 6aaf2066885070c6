"""The columns ``vmferry get`` prints for each kind (default and ``-o wide``), as
``oc``/``kubectl`` print them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vmferry.cli import events_view
from vmferry.cli.cells import (
    Obj,
    cell_text,
    condition,
    condition_status,
    field,
    format_age,
    resource_name,
)
from vmferry.migration_network import MIGRATION_IP
from vmferry.migration_state import Field
from vmferry.objects.kinds import Kind
from vmferry.objects.schema.forklift import VMPhase


@dataclass(frozen=True)
class _Column:
    header: str
    value: Callable[[Obj, datetime], str]
    wide: bool = False  # only with -o wide


def object_name(obj: Obj, now: datetime) -> str:
    """The NAME cell (and ``-o name``'s name)."""
    return cell_text(field(obj, "metadata", "name"))


def _age(obj: Obj, now: datetime) -> str:
    return format_age(field(obj, "metadata", "creationTimestamp"), now)


def _path(*path: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return cell_text(field(obj, *path))

    return value


def _namespace_status(obj: Obj, now: datetime) -> str:
    phase = field(obj, "status", "phase")
    if phase:
        return cell_text(phase)
    return "Terminating" if field(obj, "metadata", "deletionTimestamp") else "Active"


def _node_status(obj: Obj, now: datetime) -> str:
    ready = condition(obj, "Ready")
    if ready is None:
        status = ["Unknown"]
    else:
        status = ["Ready" if ready.get("status") == "True" else "NotReady"]
    if field(obj, "spec", "unschedulable"):
        status.append("SchedulingDisabled")
    return ",".join(status)


_ROLE_PREFIX = "node-role.kubernetes.io/"


def _node_roles(obj: Obj, now: datetime) -> str:
    roles = set()
    for key, value in (field(obj, "metadata", "labels") or {}).items():
        if key.startswith(_ROLE_PREFIX) and key[len(_ROLE_PREFIX) :]:
            roles.add(key[len(_ROLE_PREFIX) :])
        elif key == "kubernetes.io/role" and value:
            roles.add(str(value))
    return ",".join(sorted(roles)) or "<none>"


def _node_address(address_type: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        for address in field(obj, "status", "addresses") or []:
            if isinstance(address, dict) and address.get("type") == address_type:
                return cell_text(address.get("address")) or "<none>"
        return "<none>"

    return value


_CPU_MODEL_LABEL = "host-model-cpu.node.kubevirt.io/"


def _node_cpu_model(obj: Obj, now: datetime) -> str:
    for path in (("status", "nodeInfo", "cpuModel"), ("status", "cpuModel")):
        model = field(obj, *path)
        if model:
            return cell_text(model)
    for key in field(obj, "metadata", "labels") or {}:
        if key.startswith(_CPU_MODEL_LABEL):
            return key[len(_CPU_MODEL_LABEL) :]
    return "<none>"


def _node_memory(obj: Obj, now: datetime) -> str:
    return cell_text(field(obj, "status", "capacity", "memory")) or "<none>"


def _vm_ready(obj: Obj, now: datetime) -> str:
    ready = field(obj, "status", "ready")
    if isinstance(ready, bool):
        return "True" if ready else "False"
    return condition_status(obj, "Ready", "False")


def _vmi_ip(obj: Obj, now: datetime) -> str:
    interfaces = field(obj, "status", "interfaces")
    if isinstance(interfaces, list) and interfaces:
        return cell_text(field(interfaces[0], "ipAddress"))
    return ""


def _condition_column(condition_type: str, default: str = "") -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return condition_status(obj, condition_type, default)

    return value


def _first_number(mapping: Any, *keys: str) -> float | None:
    for key in keys:
        value = field(mapping, key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _migration_progress(obj: Obj, now: datetime) -> str:
    transfer = field(obj, "status", "migrationState", Field.TRANSFER)
    if not isinstance(transfer, dict):
        return ""
    processed = _first_number(transfer, "processed", "processedBytes", "dataProcessedBytes")
    total = _first_number(transfer, "total", "totalBytes", "dataTotalBytes")
    if total is None and processed is not None:
        remaining = _first_number(transfer, "remaining", "remainingBytes", "dataRemainingBytes")
        if remaining is not None:
            total = processed + remaining
    if processed is None or not total or total <= 0:
        return ""
    return f"{min(100, int(processed * 100 // total))}%"


def _data_count(obj: Obj, now: datetime) -> str:
    return str(sum(len(obj.get(key) or {}) for key in ("data", "binaryData")))


def _csr_condition(obj: Obj, now: datetime) -> str:
    """kubectl's CONDITION of a CertificateSigningRequest: Pending, Approved,Issued, ..."""
    types = [
        c.get("type", "")
        for c in field(obj, "status", "conditions") or []
        if c.get("status") == "True"
    ]
    if field(obj, "status", "certificate"):
        types.append("Issued")
    return ",".join(types) or "Pending"


def _service_account_secrets(obj: Obj, now: datetime) -> str:
    return str(len(obj.get("secrets") or []))


def _binding_role(obj: Obj, now: datetime) -> str:
    ref = obj.get("roleRef") or {}
    return f"{cell_text(ref.get('kind'))}/{cell_text(ref.get('name'))}"


def _binding_subjects(subject_kind: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        names = []
        for subject in obj.get("subjects") or []:
            if not isinstance(subject, dict) or subject.get("kind") != subject_kind:
                continue
            name = cell_text(subject.get("name"))
            if subject_kind == "ServiceAccount":
                name = f"{cell_text(subject.get('namespace'))}/{name}"
            names.append(name)
        return ", ".join(names)

    return value


def _container_statuses(obj: Obj) -> list[Obj]:
    statuses = field(obj, "status", "containerStatuses")
    return [s for s in statuses if isinstance(s, dict)] if isinstance(statuses, list) else []


def _pod_ready(obj: Obj, now: datetime) -> str:
    containers = field(obj, "spec", "containers")
    total = len(containers) if isinstance(containers, list) else 0
    ready = sum(1 for s in _container_statuses(obj) if s.get("ready") is True)
    return f"{ready}/{total}"


def _pod_status(obj: Obj, now: datetime) -> str:
    """As kubectl: the reason when there is one (NotReady, Evicted, ...), else the phase."""
    return cell_text(field(obj, "status", "reason") or field(obj, "status", "phase"))


def _pod_restarts(obj: Obj, now: datetime) -> str:
    counts = [s.get("restartCount") for s in _container_statuses(obj)]
    return str(sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool)))


def _or_none(*path: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return cell_text(field(obj, *path)) or "<none>"

    return value


def _plan_vms(obj: Obj, now: datetime) -> str:
    return str(len(field(obj, "spec", "vms") or []))


def _migration_vms(phase: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return str(sum(1 for vm in field(obj, "status", "vms") or [] if vm.get("phase") == phase))

    return value


_NAME = _Column("NAME", object_name)
_AGE = _Column("AGE", _age)
_BINDING_COLUMNS = [
    _NAME,
    _Column("ROLE", _binding_role),
    _AGE,
    _Column("USERS", _binding_subjects("User"), wide=True),
    _Column("GROUPS", _binding_subjects("Group"), wide=True),
    _Column("SERVICEACCOUNTS", _binding_subjects("ServiceAccount"), wide=True),
]

_ACCESS_MODE_SHORT = {"ReadWriteOnce": "RWO", "ReadWriteMany": "RWX", "ReadOnlyMany": "ROX"}


def _access_modes(obj: Obj, now: datetime) -> str:
    modes = field(obj, "status", "accessModes") or field(obj, "spec", "accessModes")
    if not isinstance(modes, list):
        return ""
    return ",".join(_ACCESS_MODE_SHORT.get(str(m), str(m)) for m in modes)


_COLUMNS: dict[str, list[_Column]] = {
    "Namespace": [_NAME, _Column("STATUS", _namespace_status), _AGE],
    "Node": [
        _NAME,
        _Column("STATUS", _node_status),
        _Column("ROLES", _node_roles),
        _AGE,
        _Column("VERSION", _path("status", "nodeInfo", "handlerVersion")),
        _Column("INTERNAL-IP", _node_address("InternalIP"), wide=True),
        _Column("MIGRATION-IP", _node_address(MIGRATION_IP), wide=True),
        _Column("CPU-MODEL", _node_cpu_model, wide=True),
        _Column("MEMORY", _node_memory, wide=True),
    ],
    "VirtualMachine": [
        _NAME,
        _AGE,
        _Column("STATUS", _path("status", "printableStatus")),
        _Column("READY", _vm_ready),
    ],
    "VirtualMachineInstance": [
        _NAME,
        _AGE,
        _Column("PHASE", _path("status", "phase")),
        _Column("IP", _vmi_ip),
        _Column("NODENAME", _path("status", "nodeName")),
        _Column("READY", _condition_column("Ready", "False")),
        _Column("LIVE-MIGRATABLE", _condition_column("LiveMigratable"), wide=True),
        _Column("PAUSED", _condition_column("Paused"), wide=True),
    ],
    "VirtualMachineInstanceMigration": [
        _NAME,
        _Column("PHASE", _path("status", "phase")),
        _Column("VMI", _path("spec", "vmiName")),
        _Column("SOURCE", _path("status", "migrationState", Field.SOURCE_NODE), wide=True),
        _Column("TARGET", _path("status", "migrationState", Field.TARGET_NODE), wide=True),
        _Column("PROGRESS", _migration_progress, wide=True),
    ],
    "Pod": [
        _NAME,
        _Column("READY", _pod_ready),
        _Column("STATUS", _pod_status),
        _Column("RESTARTS", _pod_restarts),
        _AGE,
        _Column("IP", _or_none("status", "podIP"), wide=True),
        _Column("NODE", _or_none("spec", "nodeName"), wide=True),
    ],
    "Lease": [_NAME, _Column("HOLDER", _path("spec", "holderIdentity")), _AGE],
    "CertificateSigningRequest": [
        _NAME,
        _AGE,
        _Column("SIGNERNAME", _path("spec", "signerName")),
        _Column("REQUESTOR", _path("spec", "username")),
        _Column("CONDITION", _csr_condition),
    ],
    # The MTV kinds (controller/forklift/), as `oc get providers,plans,migrations` shows them
    "Provider": [
        _NAME,
        _Column("TYPE", _path("spec", "type")),
        _Column("STATUS", _path("status", "phase")),
        _Column("READY", _condition_column("Ready")),
        _Column("URL", _path("spec", "url")),
        _AGE,
    ],
    "Plan": [
        _NAME,
        _Column("READY", _condition_column("Ready")),
        _Column("SOURCE", _path("spec", "provider", "source", "name")),
        _Column("TARGET", _path("spec", "provider", "destination", "name")),
        _Column("VMS", _plan_vms),
        _AGE,
    ],
    "Migration": [
        _NAME,
        _Column("PLAN", _path("spec", "plan", "name")),
        _Column("PHASE", _path("status", "phase")),
        _Column("SUCCEEDED", _migration_vms(VMPhase.SUCCEEDED)),
        _Column("FAILED", _migration_vms(VMPhase.FAILED)),
        _AGE,
        _Column("REASON", _path("status", "reason"), wide=True),
    ],
    # As kubectl prints them; IMAGE and NODE are vmferry's (the image file, a local node).
    "PersistentVolumeClaim": [
        _NAME,
        _Column("STATUS", _path("status", "phase")),
        _Column("CAPACITY", _path("status", "capacity", "storage")),
        _Column("ACCESS MODES", _access_modes),
        _Column("STORAGECLASS", _path("spec", "storageClassName")),
        _AGE,
        _Column("VOLUMEMODE", _path("spec", "volumeMode"), wide=True),
        _Column("NODE", _path("status", "nodeName"), wide=True),
        _Column("IMAGE", _path("status", "imagePath"), wide=True),
    ],
    "StorageClass": [
        _NAME,
        _Column("PROVISIONER", _path("provisioner")),
        _Column("RECLAIMPOLICY", _path("reclaimPolicy")),
        _Column("VOLUMEBINDINGMODE", _path("volumeBindingMode")),
        _AGE,
        _Column("PATH", _path("parameters", "path"), wide=True),
    ],
    "Secret": [_NAME, _Column("TYPE", _path("type")), _Column("DATA", _data_count), _AGE],
    "ConfigMap": [_NAME, _Column("DATA", _data_count), _AGE],
    "ServiceAccount": [_NAME, _Column("SECRETS", _service_account_secrets), _AGE],
    "ClusterRole": [_NAME, _Column("CREATED AT", _path("metadata", "creationTimestamp"))],
    # kubectl get events: LAST SEEN TYPE REASON OBJECT MESSAGE (wide: SOURCE ... NAME)
    "Event": [
        _Column("LAST SEEN", lambda o, now: format_age(events_view.last_seen(o), now)),
        _Column("TYPE", _path("type")),
        _Column("REASON", _path("reason")),
        _Column("OBJECT", lambda o, now: events_view.involved_object(o)),
        _Column("SOURCE", lambda o, now: events_view.source(o), wide=True),
        _Column("MESSAGE", _path("message")),
        _Column("FIRST SEEN", lambda o, now: format_age(o.get("firstTimestamp"), now), wide=True),
        _Column("COUNT", _path("count"), wide=True),
        _Column("NAME", object_name, wide=True),
    ],
    "RoleBinding": _BINDING_COLUMNS,
    "ClusterRoleBinding": _BINDING_COLUMNS,
}
_DEFAULT_COLUMNS = [_NAME, _AGE]  # HyperConverged, MigrationPolicy and every other kind


def _labels(obj: Obj, now: datetime) -> str:
    labels = field(obj, "metadata", "labels") or {}
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels)) or "<none>"


def columns_for(
    kind: Kind, *, wide: bool, all_namespaces: bool, show_labels: bool, name_prefix: bool
) -> list[_Column]:
    columns = [c for c in _COLUMNS.get(kind.kind, _DEFAULT_COLUMNS) if wide or not c.wide]
    if name_prefix:  # `get vm,vmi`: NAME is TYPE/NAME, as kubectl prints several types
        prefix = resource_name(kind)
        columns = [
            _Column("NAME", lambda o, now: f"{prefix}/{object_name(o, now)}") if c is _NAME else c
            for c in columns
        ]
    if all_namespaces and kind.namespaced:
        columns.insert(0, _Column("NAMESPACE", _path("metadata", "namespace")))
    if show_labels:
        columns.append(_Column("LABELS", _labels))
    return columns
