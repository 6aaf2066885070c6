"""What ``vmferry get`` and ``vmferry describe`` print, formatted as ``oc``/``kubectl`` do.

Every function returns the text to write to stdout, with kubectl's trailing newline
conventions (tables, YAML, JSON and names end with a newline; a JSONPath result does
not), so the caller writes it with ``sys.stdout.write``. The one exception is the "No
resources found" notice, which kubectl writes to stderr: ``print_objects`` returns it
for an empty table (see its docstring) and ``empty_message`` builds it on its own.

Output formats (``-o``): table (None), ``wide``, ``yaml``, ``json``, ``name``,
``jsonpath=<template>``, ``jsonpath-as-json=<template>``, ``jsonpath-file=<path>`` and
``custom-columns=<HEADER>:<path>,...``. ``validate_output`` checks one before any
request is made.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from vmferry.cli import events_view
from vmferry.migration_network import MIGRATION_IP
from vmferry.migration_state import Field
from vmferry.objects import jsonpath
from vmferry.objects.kinds import Kind
from vmferry.objects.schema.forklift import VMPhase

__all__ = [
    "OUTPUT_FORMATS",
    "OutputFormatError",
    "describe",
    "empty_message",
    "format_age",
    "format_table",
    "has_header",
    "header_line",
    "human_duration",
    "is_empty_notice",
    "print_objects",
    "relaxed_template",
    "resource_name",
    "smart_label",
    "to_json",
    "to_yaml",
    "validate_output",
]

Obj = dict[str, Any]

OUTPUT_FORMATS = (
    "custom-columns",
    "json",
    "jsonpath",
    "jsonpath-as-json",
    "jsonpath-file",
    "name",
    "wide",
    "yaml",
)


class OutputFormatError(ValueError):
    """An ``-o`` value that names no printer, or a template that is missing."""


# ---------------------------------------------------------------------------------------
# Serialisation


class _YamlDumper(yaml.SafeDumper):
    """Block style, no anchors/aliases, multi-line strings as ``|`` blocks and quoted
    strings in double quotes, as kubectl's YAML looks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def choose_scalar_style(self) -> str:
        style: str = super().choose_scalar_style()
        return '"' if style == "'" else style


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_YamlDumper.add_representer(str, _represent_str)


def to_yaml(obj: Any) -> str:
    """YAML in block style, keys in insertion order, never aliases; ends with a newline."""
    text: str = yaml.dump(
        obj,
        Dumper=_YamlDumper,
        default_flow_style=False,
        sort_keys=False,
        allow_unicode=True,
        width=1 << 30,
    )
    return text


def to_json(obj: Any) -> str:
    """JSON indented by 4 spaces (as kubectl), keys in insertion order; ends with a newline."""
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


def _as_list(objs: Sequence[Obj]) -> Obj:
    """The ``List`` kubectl wraps several objects in (keys in kubectl's order)."""
    return {
        "apiVersion": "v1",
        "items": list(objs),
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


# ---------------------------------------------------------------------------------------
# Small accessors


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _text(value: Any) -> str:
    """A table cell: None is empty, booleans as ``true``/``false`` (kubectl's columns)."""
    if value is None:
        return ""
    return jsonpath.format_value(value)


def _condition(obj: Obj, condition_type: str) -> Obj | None:
    for condition in _get(obj, "status", "conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == condition_type:
            return condition
    return None


def _condition_status(obj: Obj, condition_type: str, default: str = "") -> str:
    condition = _condition(obj, condition_type)
    if condition is None:
        return default
    return _text(condition.get("status"))


def resource_name(kind: Kind) -> str:
    """``-o name``'s prefix: ``virtualmachineinstancemigration.kubevirt.io``, ``node``."""
    return f"{kind.singular}.{kind.group}" if kind.group else kind.singular


# ---------------------------------------------------------------------------------------
# Age


def human_duration(seconds: float) -> str:
    """kubectl's ``duration.HumanDuration``: ``5s``, ``3m20s``, ``15m``, ``5h3m``, ``2d4h``,
    ``45d``, ``2y100d``."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        rest = whole % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{hours // 24 // 365}y"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def format_age(timestamp: Any, now: datetime) -> str:
    """The AGE column for an RFC 3339 ``timestamp``; ``<unknown>`` when there is none."""
    created = _parse_time(timestamp)
    if created is None:
        return "<unknown>"
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return human_duration((now - created).total_seconds())


# ---------------------------------------------------------------------------------------
# Tables


_TABLE_MIN_WIDTH = 6  # kubectl's tabwriter: minimal cell width, padding included
_TABLE_PADDING = 3


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Align cells as kubectl's tabwriter does: every column but the last is as wide as
    its widest cell plus 3 spaces (at least 6). Lines end with a newline, without
    trailing spaces."""
    if not rows:
        return ""
    columns = max(len(row) for row in rows)
    widths = [
        max(_TABLE_MIN_WIDTH, *(len(row[i]) + _TABLE_PADDING for row in rows if i < len(row)))
        for i in range(columns - 1)
    ]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(row)]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Column:
    header: str
    value: Callable[[Obj, datetime], str]
    wide: bool = False  # only with -o wide


def _name(obj: Obj, now: datetime) -> str:
    return _text(_get(obj, "metadata", "name"))


def _age(obj: Obj, now: datetime) -> str:
    return format_age(_get(obj, "metadata", "creationTimestamp"), now)


def _path(*path: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return _text(_get(obj, *path))

    return value


def _namespace_status(obj: Obj, now: datetime) -> str:
    phase = _get(obj, "status", "phase")
    if phase:
        return _text(phase)
    return "Terminating" if _get(obj, "metadata", "deletionTimestamp") else "Active"


def _node_status(obj: Obj, now: datetime) -> str:
    ready = _condition(obj, "Ready")
    if ready is None:
        status = ["Unknown"]
    else:
        status = ["Ready" if ready.get("status") == "True" else "NotReady"]
    if _get(obj, "spec", "unschedulable"):
        status.append("SchedulingDisabled")
    return ",".join(status)


_ROLE_PREFIX = "node-role.kubernetes.io/"


def _node_roles(obj: Obj, now: datetime) -> str:
    roles = set()
    for key, value in (_get(obj, "metadata", "labels") or {}).items():
        if key.startswith(_ROLE_PREFIX) and key[len(_ROLE_PREFIX) :]:
            roles.add(key[len(_ROLE_PREFIX) :])
        elif key == "kubernetes.io/role" and value:
            roles.add(str(value))
    return ",".join(sorted(roles)) or "<none>"


def _node_address(address_type: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        for address in _get(obj, "status", "addresses") or []:
            if isinstance(address, dict) and address.get("type") == address_type:
                return _text(address.get("address")) or "<none>"
        return "<none>"

    return value


_CPU_MODEL_LABEL = "host-model-cpu.node.kubevirt.io/"


def _node_cpu_model(obj: Obj, now: datetime) -> str:
    for path in (("status", "nodeInfo", "cpuModel"), ("status", "cpuModel")):
        model = _get(obj, *path)
        if model:
            return _text(model)
    for key in _get(obj, "metadata", "labels") or {}:
        if key.startswith(_CPU_MODEL_LABEL):
            return key[len(_CPU_MODEL_LABEL) :]
    return "<none>"


def _node_memory(obj: Obj, now: datetime) -> str:
    return _text(_get(obj, "status", "capacity", "memory")) or "<none>"


def _vm_ready(obj: Obj, now: datetime) -> str:
    ready = _get(obj, "status", "ready")
    if isinstance(ready, bool):
        return "True" if ready else "False"
    return _condition_status(obj, "Ready", "False")


def _vmi_ip(obj: Obj, now: datetime) -> str:
    interfaces = _get(obj, "status", "interfaces")
    if isinstance(interfaces, list) and interfaces:
        return _text(_get(interfaces[0], "ipAddress"))
    return ""


def _condition_column(condition_type: str, default: str = "") -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return _condition_status(obj, condition_type, default)

    return value


def _first_number(mapping: Any, *keys: str) -> float | None:
    for key in keys:
        value = _get(mapping, key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _migration_progress(obj: Obj, now: datetime) -> str:
    transfer = _get(obj, "status", "migrationState", Field.TRANSFER)
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
        for c in _get(obj, "status", "conditions") or []
        if c.get("status") == "True"
    ]
    if _get(obj, "status", "certificate"):
        types.append("Issued")
    return ",".join(types) or "Pending"


def _service_account_secrets(obj: Obj, now: datetime) -> str:
    return str(len(obj.get("secrets") or []))


def _binding_role(obj: Obj, now: datetime) -> str:
    ref = obj.get("roleRef") or {}
    return f"{_text(ref.get('kind'))}/{_text(ref.get('name'))}"


def _binding_subjects(subject_kind: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        names = []
        for subject in obj.get("subjects") or []:
            if not isinstance(subject, dict) or subject.get("kind") != subject_kind:
                continue
            name = _text(subject.get("name"))
            if subject_kind == "ServiceAccount":
                name = f"{_text(subject.get('namespace'))}/{name}"
            names.append(name)
        return ", ".join(names)

    return value


def _container_statuses(obj: Obj) -> list[Obj]:
    statuses = _get(obj, "status", "containerStatuses")
    return [s for s in statuses if isinstance(s, dict)] if isinstance(statuses, list) else []


def _pod_ready(obj: Obj, now: datetime) -> str:
    containers = _get(obj, "spec", "containers")
    total = len(containers) if isinstance(containers, list) else 0
    ready = sum(1 for s in _container_statuses(obj) if s.get("ready") is True)
    return f"{ready}/{total}"


def _pod_status(obj: Obj, now: datetime) -> str:
    """As kubectl: the reason when there is one (NotReady, Evicted, ...), else the phase."""
    return _text(_get(obj, "status", "reason") or _get(obj, "status", "phase"))


def _pod_restarts(obj: Obj, now: datetime) -> str:
    counts = [s.get("restartCount") for s in _container_statuses(obj)]
    return str(sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool)))


def _or_none(*path: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return _text(_get(obj, *path)) or "<none>"

    return value


def _plan_vms(obj: Obj, now: datetime) -> str:
    return str(len(_get(obj, "spec", "vms") or []))


def _migration_vms(phase: str) -> Callable[[Obj, datetime], str]:
    def value(obj: Obj, now: datetime) -> str:
        return str(sum(1 for vm in _get(obj, "status", "vms") or [] if vm.get("phase") == phase))

    return value


_NAME = _Column("NAME", _name)
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
    modes = _get(obj, "status", "accessModes") or _get(obj, "spec", "accessModes")
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
        _Column("NAME", _name, wide=True),
    ],
    "RoleBinding": _BINDING_COLUMNS,
    "ClusterRoleBinding": _BINDING_COLUMNS,
}
_DEFAULT_COLUMNS = [_NAME, _AGE]  # HyperConverged, MigrationPolicy and every other kind


def _labels(obj: Obj, now: datetime) -> str:
    labels = _get(obj, "metadata", "labels") or {}
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels)) or "<none>"


def _columns(
    kind: Kind, *, wide: bool, all_namespaces: bool, show_labels: bool, name_prefix: bool
) -> list[_Column]:
    columns = [c for c in _COLUMNS.get(kind.kind, _DEFAULT_COLUMNS) if wide or not c.wide]
    if name_prefix:  # `get vm,vmi`: NAME is TYPE/NAME, as kubectl prints several types
        prefix = resource_name(kind)
        columns = [
            _Column("NAME", lambda o, now: f"{prefix}/{_name(o, now)}") if c is _NAME else c
            for c in columns
        ]
    if all_namespaces and kind.namespaced:
        columns.insert(0, _Column("NAMESPACE", _path("metadata", "namespace")))
    if show_labels:
        columns.append(_Column("LABELS", _labels))
    return columns


def has_header(output: str | None) -> bool:
    """The format prints a table with a header line (default, wide, custom-columns)."""
    return _parse_format(output).name in ("table", "wide", "custom-columns")


def header_line(
    kind: Kind, output: str | None, all_namespaces: bool = False, show_labels: bool = False
) -> str:
    """The header ``get -w`` prints before the first change of an empty list."""
    fmt = _parse_format(output)
    if fmt.name == "custom-columns":
        return format_table([[header for header, _ in fmt.columns]])
    columns = _columns(
        kind,
        wide=fmt.name == "wide",
        all_namespaces=all_namespaces,
        show_labels=show_labels,
        name_prefix=False,
    )
    return format_table([[c.header for c in columns]])


def _table(
    objs: Sequence[Obj],
    kind: Kind,
    *,
    wide: bool,
    all_namespaces: bool,
    no_headers: bool,
    now: datetime,
    show_labels: bool = False,
    name_prefix: bool = False,
) -> str:
    columns = _columns(
        kind,
        wide=wide,
        all_namespaces=all_namespaces,
        show_labels=show_labels,
        name_prefix=name_prefix,
    )
    rows = [] if no_headers else [[c.header for c in columns]]
    rows.extend([c.value(obj, now) for c in columns] for obj in objs)
    return format_table(rows)


def empty_message(kind: Kind, namespace: str | None) -> str:
    """kubectl's notice for an empty list (no newline): ``No resources found in <ns>
    namespace.`` for a namespaced kind listed in one namespace, else ``No resources
    found``."""
    if kind.namespaced and namespace:
        return f"No resources found in {namespace} namespace."
    return "No resources found"


def is_empty_notice(text: str) -> bool:
    """Whether ``print_objects`` returned the "No resources found" notice (for stderr)."""
    return text.startswith("No resources found")


# ---------------------------------------------------------------------------------------
# Output formats


@dataclass(frozen=True)
class _Format:
    name: str  # "table", "wide", "yaml", "json", "name", "jsonpath", "custom-columns"
    template: jsonpath.Template | None = None
    as_json: bool = False
    columns: tuple[tuple[str, jsonpath.Template], ...] = ()


def _relaxed_path(path: str) -> str:
    """kubectl's RelaxedJSONPathExpression: ``a.b``, ``.a.b``, ``{a.b}``, ``{.a.b}``."""
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if not path or "{" in path or "}" in path:
        raise OutputFormatError(
            f"unexpected path string {path!r}, expected a 'name1.name2' or '.name1.name2' "
            "or '{name1.name2}' or '{.name1.name2}'"
        )
    return "{" + (path if path.startswith(".") else "." + path) + "}"


def relaxed_template(path: str) -> jsonpath.Template:
    """A kubectl relaxed JSONPath (``--sort-by``, custom columns) as a template."""
    return jsonpath.parse(_relaxed_path(path))


def _parse_format(output: str | None) -> _Format:
    if output is None or output == "":
        return _Format("table")
    if output in ("wide", "yaml", "json", "name"):
        return _Format(output)
    name, sep, argument = output.partition("=")
    if name in ("jsonpath", "jsonpath-as-json", "jsonpath-file"):
        if not sep or not argument:
            raise OutputFormatError(
                f"{name} format specified but no template given "
                f"(use -o {name}='{{.metadata.name}}')"
            )
        template = argument
        if name == "jsonpath-file":
            try:
                template = Path(argument).read_text()
            except OSError as e:
                raise OutputFormatError(f"error reading --template {argument}: {e}") from None
        return _Format(
            "jsonpath", template=jsonpath.parse(template), as_json=name == "jsonpath-as-json"
        )
    if name == "custom-columns":
        if not sep or not argument:
            raise OutputFormatError(
                "custom-columns format specified but no custom columns given "
                "(use -o custom-columns=NAME:.metadata.name,PHASE:.status.phase)"
            )
        columns = []
        for spec in argument.split(","):
            header, colon, path = spec.partition(":")
            if not colon or not header:
                raise OutputFormatError(
                    f"unexpected custom-columns spec: {spec}, expected <header>:<json-path-expr>"
                )
            columns.append((header, jsonpath.parse(_relaxed_path(path))))
        return _Format("custom-columns", columns=tuple(columns))
    raise OutputFormatError(
        f'unable to match a printer suitable for the output format "{output}", '
        f"allowed formats are: {','.join(OUTPUT_FORMATS)}"
    )


def validate_output(output: str | None) -> None:
    """Raise OutputFormatError (or jsonpath.JsonPathError, both ValueError) if ``output``
    is not a format ``print_objects`` accepts, before anything is fetched."""
    _parse_format(output)


def _custom_columns(
    docs: Sequence[Obj], columns: Sequence[tuple[str, jsonpath.Template]], no_headers: bool
) -> str:
    rows = [] if no_headers else [[header for header, _ in columns]]
    for obj in docs:
        row = []
        for _, template in columns:
            results = template.find_results(obj, allow_missing_keys=True)
            values = [_describe_value(v) for values in results for v in values]
            row.append(",".join(values) if values else "<none>")
        rows.append(row)
    return format_table(rows)


def print_objects(
    objs: Sequence[Obj],
    kind: Kind,
    output: str | None,
    *,
    single: bool = False,
    namespace: str | None = None,
    all_namespaces: bool = False,
    no_headers: bool = False,
    now: datetime | None = None,
    allow_missing_keys: bool = True,
    show_labels: bool = False,
    name_prefix: bool = False,
) -> str:
    """Format ``objs`` (all of ``kind``) for ``vmferry get -o <output>``.

    ``single`` means one object was asked for by name: YAML, JSON and JSONPath then see
    the object itself, otherwise a ``List`` of all of them (as kubectl). ``namespace``
    (the namespace listed) is only used for the empty-list notice; ``all_namespaces``
    adds the NAMESPACE column for namespaced kinds; ``now`` is the reference time for
    AGE (default: the current time). ``allow_missing_keys`` is kubectl's
    ``--allow-missing-template-keys`` (default true: a missing key prints nothing).
    ``show_labels`` adds the LABELS column; ``name_prefix`` prints NAME as ``TYPE/NAME``
    (several types in one ``get``).

    For an empty table (default or wide) this returns the notice of ``empty_message``
    plus a newline, which belongs on stderr (check with ``is_empty_notice``); ``-o name``
    of nothing is empty. Raises OutputFormatError for an unknown format and
    jsonpath.JsonPathError for a template that does not parse or fails on the data.
    """
    fmt = _parse_format(output)
    if now is None:
        now = datetime.now(UTC)
    if fmt.name in ("table", "wide", "custom-columns") and not objs:
        return empty_message(kind, None if all_namespaces else namespace) + "\n"
    if fmt.name in ("table", "wide"):
        return _table(
            objs,
            kind,
            wide=fmt.name == "wide",
            all_namespaces=all_namespaces,
            no_headers=no_headers,
            now=now,
            show_labels=show_labels,
            name_prefix=name_prefix,
        )
    if fmt.name == "custom-columns":
        return _custom_columns(objs, fmt.columns, no_headers)
    if fmt.name == "name":
        prefix = resource_name(kind)
        return "".join(f"{prefix}/{_name(obj, now)}\n" for obj in objs)
    document: Any = objs[0] if single and len(objs) == 1 else _as_list(objs)
    if fmt.name == "yaml":
        return to_yaml(document)
    if fmt.name == "json":
        return to_json(document)
    assert fmt.template is not None
    return fmt.template.execute(
        document, allow_missing_keys=allow_missing_keys, as_json=fmt.as_json
    )


# ---------------------------------------------------------------------------------------
# describe


_ACRONYMS = frozenset({"API", "URL", "UID", "OSB", "GUID"})


def _camel_split(text: str) -> list[str]:
    """fatih/camelcase.Split, which kubectl's describe uses."""
    runs: list[list[str]] = []
    last_class = 0
    for ch in text:
        if ch.islower():
            char_class = 1
        elif ch.isupper():
            char_class = 2
        elif ch.isdigit():
            char_class = 3
        else:
            char_class = 4
        if char_class == last_class:
            runs[-1].append(ch)
        else:
            runs.append([ch])
        last_class = char_class
    for i in range(len(runs) - 1):  # "PDFL", "oader" -> "PDF", "Loader"
        if runs[i] and runs[i][0].isupper() and runs[i + 1] and runs[i + 1][0].islower():
            runs[i + 1].insert(0, runs[i].pop())
    return ["".join(run) for run in runs if run]


def smart_label(field: str) -> str:
    """A field name as ``describe`` shows it: ``migrationState`` -> ``Migration State``,
    ``apiVersion`` -> ``API Version``, ``uid`` -> ``UID``; names with characters other
    than letters and ``-`` (label keys, ``ca.crt``) stay as they are."""
    if not field or any(not (ch.isalpha() or ch == "-") for ch in field):
        return field
    words = []
    for part in _camel_split(field):
        if part == "_":
            continue
        words.append(part.upper() if part.upper() in _ACRONYMS else part[:1].upper() + part[1:])
    return " ".join(words)


class _DescribeWriter:
    """Lines of ``Key:<tab>value`` as kubectl's tabwriter aligns them: consecutive
    key/value lines form a block whose values start 2 spaces after its longest key."""

    PADDING = 2

    def __init__(self) -> None:
        self.lines: list[tuple[str, str | None]] = []  # (cell, value) or (line, None)

    def pair(self, level: int, key: str, value: str) -> None:
        first, *rest = value.split("\n")
        self.lines.append(("  " * level + key, first))
        for line in rest:
            self.lines.append((line, None))

    def line(self, level: int, text: str) -> None:
        self.lines.append(("  " * level + text, None))

    def render(self) -> str:
        out: list[str] = []
        i = 0
        while i < len(self.lines):
            j = i
            while j < len(self.lines) and self.lines[j][1] is not None:
                j += 1
            if j == i:
                out.append(self.lines[i][0].rstrip())
                i += 1
                continue
            width = max(len(cell) for cell, _ in self.lines[i:j]) + self.PADDING
            for cell, value in self.lines[i:j]:
                out.append((cell.ljust(width) + (value or "")).rstrip())
            i = j
        return "".join(line + "\n" for line in out)


def _describe_value(value: Any) -> str:
    """Go's ``%v`` of an unstructured value."""
    if value is None:
        return "<nil>"
    if isinstance(value, list | dict):
        return jsonpath.to_compact_json(value)
    return jsonpath.format_value(value)


_CONDITION_COLUMNS = (
    ("Type", "type"),
    ("Status", "status"),
    ("Reason", "reason"),
    ("Message", "message"),
)


def _is_condition_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(c, dict) and "type" in c for c in value)
    )


def _describe_conditions(w: _DescribeWriter, level: int, conditions: list[Obj]) -> None:
    rows = [[header for header, _ in _CONDITION_COLUMNS]]
    rows.append(["-" * len(header) for header, _ in _CONDITION_COLUMNS])
    for condition in conditions:
        rows.append([_text(condition.get(key)) for _, key in _CONDITION_COLUMNS])
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(_CONDITION_COLUMNS) - 1)]
    for row in rows:
        text = "".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + row[-1]
        w.line(level, text.rstrip())


def _describe_content(w: _DescribeWriter, level: int, content: Obj, skip: frozenset[str]) -> None:
    for key in sorted(content, key=str):
        if key in skip:
            continue
        value = content[key]
        label = smart_label(str(key))
        if isinstance(value, dict):
            w.line(level, f"{label}:")
            _describe_content(w, level + 1, value, frozenset())
        elif key == "conditions" and _is_condition_list(value):
            w.line(level, f"{label}:")
            _describe_conditions(w, level + 1, value)
        elif isinstance(value, list):
            w.line(level, f"{label}:")
            for child in value:
                if isinstance(child, dict):
                    _describe_content(w, level + 1, child, frozenset())
                else:
                    w.line(level + 1, _describe_value(child))
        else:
            w.pair(level, f"{label}:", _describe_value(value))


_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _describe_map(w: _DescribeWriter, title: str, entries: list[str]) -> None:
    if not entries:
        w.pair(0, f"{title}:", "<none>")
        return
    w.pair(0, f"{title}:", entries[0])
    for entry in entries[1:]:
        w.pair(0, "", entry)


def describe(obj: Obj, kind: Kind, events: Sequence[Obj] = (), now: datetime | None = None) -> str:
    """``vmferry describe``: the object as ``oc describe`` shows a custom resource.

    Name, Namespace (namespaced kinds), Labels and Annotations first, then every other
    top-level field in sorted order (API Version, Kind, Metadata, Spec, Status, ...) as
    indented ``Key:  value`` blocks with kubectl's labels (``Migration State``), any
    ``conditions`` list as a Type/Status/Reason/Message table, and the ``events`` about
    it (``Events:  <none>`` without).
    """
    metadata = obj.get("metadata") or {}
    w = _DescribeWriter()
    w.pair(0, "Name:", _text(metadata.get("name")))
    if kind.namespaced:
        w.pair(0, "Namespace:", _text(metadata.get("namespace")))
    labels = metadata.get("labels") or {}
    _describe_map(w, "Labels", [f"{k}={_text(labels[k])}" for k in sorted(labels)])
    annotations = metadata.get("annotations") or {}
    _describe_map(
        w,
        "Annotations",
        [f"{k}: {_text(annotations[k])}" for k in sorted(annotations) if k != _LAST_APPLIED],
    )
    content = dict(obj)
    content["metadata"] = {
        k: v
        for k, v in metadata.items()
        if k not in ("name", "namespace", "labels", "annotations", "managedFields")
    }
    _describe_content(w, 0, content, frozenset())
    return w.render() + events_view.describe_section(events_view.for_object(events, obj), now)
