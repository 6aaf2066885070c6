"""Validation and defaulting of manifests, for every kind in :data:`vmferry.kinds.KINDS`.

:func:`validate` checks a manifest against a small declarative schema and returns a
normalized deep copy; it raises :class:`~vmferry.errors.Invalid` listing *every* problem
it found, each prefixed by its field path, the way ``kubectl`` reports them::

    VirtualMachineInstance "vm1": spec.domain.memroy: unknown field "memroy" (did you mean
    "memory"?); spec.domain.cpu.cores: expected integer, got string "2"

:func:`apply_defaults` fills in what the API server fills in (run it after ``validate``);
:func:`memory_bytes` reads a VMI spec's guest memory.

Normalization (what the returned copy differs in):

- a field whose value is ``null`` is dropped, as if absent (timestamps keep their nulls);
- an integer given as an integral float (``2.0``) becomes an ``int``;
- a timestamp that YAML parsed into a ``datetime`` becomes an RFC 3339 string
  (``2024-05-01T10:00:00Z``), so ``get -o yaml`` output re-applies unchanged.

Strings are never coerced (``"2"`` is not an integer, ``true`` is not a string), and a
boolean is never an integer.

Adding a kind: write its top-level fields with the DSL below (:class:`Obj`, :class:`Str`,
:class:`Int`, :class:`Quantity`, ...) and register a :class:`KindSchema` in
:data:`SCHEMAS`; ``tests/unit/test_schema.py`` fails while a kind in ``KINDS`` has none.
"""

from __future__ import annotations

import abc
import base64
import copy
import datetime as dt
import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmferry.errors import ApiError, Invalid
from vmferry.kinds import by_kind
from vmferry.labels import validate_label_key, validate_label_value
from vmferry.migration_state import LIVE_MIGRATION_DEFAULTS
from vmferry.quantity import parse_quantity

__all__ = [
    "LIVE_MIGRATION_DEFAULTS",
    "SCHEMAS",
    "Annotations",
    "AnyObject",
    "Anything",
    "Bool",
    "Errors",
    "Int",
    "KindSchema",
    "Labels",
    "List",
    "Map",
    "Number",
    "Obj",
    "Quantity",
    "Rule",
    "Schema",
    "Str",
    "Timestamp",
    "apply_defaults",
    "dns1123_label_problem",
    "dns1123_subdomain_problem",
    "memory_bytes",
    "validate",
]

# --------------------------------------------------------------------------------------
# Error collection and message helpers
# --------------------------------------------------------------------------------------


class Errors:
    """Collects ``path: message`` lines; :func:`validate` reports them all at once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}" if path else message)

    def __bool__(self) -> bool:
        return bool(self.lines)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _field_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key_path(path: str, key: str) -> str:
    """Path of a map entry: ``a.b.key``, or ``a.b[kubevirt.io/env]`` for non-identifier keys."""
    if _IDENTIFIER.fullmatch(key):
        return _field_path(path, key)
    return f"{path}[{key}]"


def _quote(text: str, limit: int = 80) -> str:
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text)


def _describe(value: object) -> str:
    """``string "yes"``, ``integer 5``, ``boolean true``, ``null``, ``object``, ``list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dt.datetime | dt.date):
        return f"timestamp {value.isoformat()}"
    return type(value).__name__


def _expected(what: str, value: object) -> str:
    return f"expected {what}, got {_describe(value)}"


def _show(value: object) -> str:
    """A value as it appears in a message: strings quoted, numbers bare."""
    return _quote(value) if isinstance(value, str) else str(value)


def _range_message(minimum: float | None, maximum: float | None, value: object) -> str:
    if minimum is not None and maximum is not None:
        return f"must be between {minimum} and {maximum}, got {_show(value)}"
    if minimum is not None:
        return f"must be at least {minimum}, got {_show(value)}"
    return f"must be at most {maximum}, got {_show(value)}"


# --------------------------------------------------------------------------------------
# The schema DSL
# --------------------------------------------------------------------------------------


class Schema(abc.ABC):
    """A node of the schema: checks one value and returns its normalized copy.

    ``check`` reports problems into ``errors`` under ``path`` and never raises; after a
    problem it returns the value unchanged (the caller raises once everything is checked).
    ``nullable`` fields keep an explicit ``null`` in the normalized copy; any other field
    given as ``null`` is treated as absent.
    """

    nullable = False
    type_name = "a value"  # as in "expected <type_name>, got ..."

    @abc.abstractmethod
    def check(self, value: object, path: str, errors: Errors) -> object:
        """Report problems of ``value`` into ``errors``; return its normalized copy."""


Rule = Callable[[dict[str, Any], str, Errors], None]
"""A cross-field check on a normalized object: ``rule(obj, path, errors)``.

Rules run even when a field of ``obj`` had an error, so they must check types before use.
"""


class Obj(Schema):
    """A mapping with a fixed set of fields; any other field is an error."""

    type_name = "object"

    def __init__(
        self,
        fields: Mapping[str, Schema],
        *,
        required: Sequence[str] = (),
        rules: Sequence[Rule] = (),
    ) -> None:
        unknown = set(required) - set(fields)
        if unknown:
            raise ValueError(f"required fields not declared: {sorted(unknown)}")
        self.fields = dict(fields)
        self.required = tuple(required)
        self.rules = tuple(rules)

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, _expected("object", value))
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"field names must be strings, got {_describe(key)}")
                continue
            field_path = _field_path(path, key)
            schema = self.fields.get(key)
            if schema is None:
                errors.add(field_path, _unknown_field(key, self.fields))
                continue
            if item is None:
                if schema.nullable:
                    out[key] = None
                continue
            out[key] = schema.check(item, field_path, errors)
        for key in self.required:
            if out.get(key) is None:
                errors.add(_field_path(path, key), "required field is missing")
        for rule in self.rules:
            rule(out, path, errors)
        return out


def _unknown_field(key: str, known: Mapping[str, Schema]) -> str:
    message = f"unknown field {_quote(key)}"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    if not close:
        close = [name for name in known if name.lower() == key.lower()]
    if close:
        message += f' (did you mean "{close[0]}"?)'
    return message


class Str(Schema):
    """A string; optionally one of ``enum``, matching ``pattern``, or non-empty."""

    type_name = "string"

    def __init__(
        self,
        *,
        enum: Sequence[str] | None = None,
        pattern: str | None = None,
        nonempty: bool = False,
    ) -> None:
        self.enum = tuple(enum) if enum is not None else None
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.nonempty = nonempty

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, str):
            errors.add(path, _expected("string", value))
        elif self.nonempty and not value:
            errors.add(path, "must not be empty")
        elif self.enum is not None and value not in self.enum:
            supported = ", ".join(json.dumps(e) for e in self.enum)
            errors.add(path, f"unsupported value {_quote(value)}: supported values: {supported}")
        elif self.pattern is not None and not self.pattern.fullmatch(value):
            errors.add(
                path, f"invalid value {_quote(value)}: must match the regex {self.pattern.pattern}"
            )
        return value


class Number(Schema):
    """An integer or a finite float (not a boolean) in ``[min, max]``."""

    type_name = "number"

    def __init__(self, min: float | None = None, max: float | None = None) -> None:
        self.min = min
        self.max = max

    def _in_range(self, value: float, path: str, errors: Errors) -> None:
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            errors.add(path, _range_message(self.min, self.max, value))

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.add(path, _expected("number", value))
        elif not math.isfinite(value):
            errors.add(path, f"must be a finite number, got {value!r}")
        else:
            self._in_range(value, path, errors)
        return value


class Int(Number):
    """An integer (not a boolean) in ``[min, max]``; an integral float is accepted."""

    type_name = "integer"

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        super().__init__(min, max)

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            errors.add(path, _expected("integer", value))
        else:
            self._in_range(value, path, errors)
        return value


class Bool(Schema):
    """``true`` or ``false``; strings such as ``"yes"`` are rejected."""

    type_name = "boolean"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, bool):
            errors.add(path, _expected("boolean", value))
        return value


class Quantity(Schema):
    """A Kubernetes quantity (``"2Gi"``, ``"500M"``, ``1024``), never negative.

    ``positive`` also rejects zero. The normalized copy keeps the spelling the user wrote.
    """

    type_name = "quantity"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            errors.add(path, _expected('quantity (e.g. "2Gi" or 1024)', value))
            return value
        amount = _parse_quantity(value, path, errors)
        if amount is None:
            return value
        if self.positive and amount <= 0:
            errors.add(path, f"must be greater than zero, got {_show(value)}")
        return value


def _parse_quantity(value: str | int | float, path: str, errors: Errors) -> int | None:
    try:
        return parse_quantity(value)
    except ValueError as exc:
        errors.add(path, str(exc))  # names the quantity: 'invalid quantity "12Zi": ...'
        return None


class Timestamp(Schema):
    """An RFC 3339 timestamp string (or ``null``); a YAML-parsed ``datetime`` is converted."""

    nullable = True
    type_name = "timestamp"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, str):
            return value
        if isinstance(value, dt.datetime):
            return _rfc3339(value)
        if isinstance(value, dt.date):
            return f"{value.isoformat()}T00:00:00Z"
        errors.add(path, _expected('timestamp string (e.g. "2024-05-01T10:00:00Z")', value))
        return value


def _rfc3339(moment: dt.datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


class Map(Schema):
    """A mapping from string keys to values of ``value``."""

    type_name = "object"

    def __init__(self, value: Schema) -> None:
        self.value = value

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, _expected("object", value))
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"keys must be strings, got {_describe(key)}")
                continue
            if item is None and not self.value.nullable:
                errors.add(_key_path(path, key), _expected(self.value.type_name, item))
                continue
            out[key] = self.value.check(item, _key_path(path, key), errors)
        return out


class Labels(Schema):
    """Kubernetes labels (or a label selector's ``matchLabels``): valid keys and values."""

    type_name = "object"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, _expected("object", value))
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"keys must be strings, got {_describe(key)}")
                continue
            try:
                validate_label_key(key)
            except ValueError as exc:
                errors.add(path, str(exc))  # 'invalid label key "Foo Bar": ...'
            item_path = _key_path(path, key)
            if not isinstance(item, str):
                hint = " (quote it in YAML)" if isinstance(item, bool | int | float) else ""
                errors.add(item_path, _expected("string", item) + hint)
                continue
            try:
                validate_label_value(item)
            except ValueError as exc:
                errors.add(item_path, str(exc))
            out[key] = item
        return out


ANNOTATIONS_TOTAL_LIMIT = 256 * 1024  # bytes; Kubernetes' TotalAnnotationSizeLimitB


class Annotations(Schema):
    """Kubernetes annotations: keys are qualified names, values any strings (≤256 KiB total)."""

    type_name = "object"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, _expected("object", value))
            return value
        out: dict[str, Any] = {}
        total = 0
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"keys must be strings, got {_describe(key)}")
                continue
            try:
                validate_label_key(key)
            except ValueError as exc:
                errors.add(path, str(exc).replace("label key", "annotation key", 1))
            if not isinstance(item, str):
                hint = " (quote it in YAML)" if isinstance(item, bool | int | float) else ""
                errors.add(_key_path(path, key), _expected("string", item) + hint)
                continue
            total += len(key.encode()) + len(item.encode())
            out[key] = item
        if total > ANNOTATIONS_TOTAL_LIMIT:
            errors.add(
                path,
                f"annotations are {total} bytes, more than the {ANNOTATIONS_TOTAL_LIMIT} allowed",
            )
        return out


class List(Schema):
    """A list whose items all match ``item``; paths name the index (``conditions[0]``)."""

    type_name = "list"

    def __init__(self, item: Schema) -> None:
        self.item = item

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, list | tuple):
            errors.add(path, _expected("list", value))
            return value
        out: list[Any] = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if item is None and not self.item.nullable:
                errors.add(item_path, _expected(self.item.type_name, item))
                out.append(item)
                continue
            out.append(self.item.check(item, item_path, errors))
        return out


class AnyObject(Schema):
    """Any mapping, not looked into (e.g. ``spec.domain.devices``)."""

    type_name = "object"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, _expected("object", value))
            return value
        return copy.deepcopy(dict(value))


class Anything(Schema):
    """Any value, not looked into (e.g. ``spec.affinity``)."""

    nullable = True

    def check(self, value: object, path: str, errors: Errors) -> object:
        return copy.deepcopy(value)


# --------------------------------------------------------------------------------------
# Shared pieces of the object model
# --------------------------------------------------------------------------------------

OWNER_REFERENCE = Obj(
    {
        "apiVersion": Str(nonempty=True),
        "kind": Str(nonempty=True),
        "name": Str(nonempty=True),
        "uid": Str(nonempty=True),
        "controller": Bool(),
        "blockOwnerDeletion": Bool(),
    },
    required=("apiVersion", "kind", "name", "uid"),
)

METADATA = Obj(
    {
        "name": Str(),
        "generateName": Str(),
        "namespace": Str(),
        "uid": Str(),
        "resourceVersion": Str(),
        "generation": Int(min=0),
        "labels": Labels(),
        "annotations": Annotations(),
        "creationTimestamp": Timestamp(),
        "deletionTimestamp": Timestamp(),
        "finalizers": List(Str(nonempty=True)),
        "ownerReferences": List(OWNER_REFERENCE),
    }
)

CONDITIONS = List(
    Obj(
        {
            "type": Str(nonempty=True),
            "status": Str(enum=("True", "False", "Unknown")),
            "reason": Str(),
            "message": Str(),
            "lastProbeTime": Timestamp(),
            "lastTransitionTime": Timestamp(),
            "lastHeartbeatTime": Timestamp(),
        },
        required=("type",),
    )
)

PHASE_TRANSITION_TIMESTAMPS = List(
    Obj({"phase": Str(), "phaseTransitionTimestamp": Timestamp()}),
)

PORT = Int(min=1, max=65535)

# The cluster-wide migration settings (HyperConverged spec.liveMigrationConfig); the
# per-migration subset resolved by the scheduler reuses the same constraints.
_MIGRATION_TUNABLES: dict[str, Schema] = {
    "bandwidthPerMigration": Quantity(),
    "completionTimeoutPerGiB": Int(min=1),
    "progressTimeout": Int(min=1),
    "allowAutoConverge": Bool(),
    "allowPostCopy": Bool(),
    "network": Str(),
    "downtimeBudgetMilliseconds": Int(min=1),
    "parallelStreams": Int(min=1, max=16),
    "unschedulableTimeoutSeconds": Int(min=1),
    "postCopyRecoveryWindowSeconds": Int(min=1),
    "compression": Str(enum=("Zstd", "None")),
}

LIVE_MIGRATION_CONFIG = Obj(
    {
        **_MIGRATION_TUNABLES,
        "parallelMigrationsPerCluster": Int(min=1),
        "parallelOutboundMigrationsPerNode": Int(min=1),
    }
)

# The defaults live with the migration contract (vmferry/migration_state.py).

MIGRATION_CONFIGURATION = Obj(_MIGRATION_TUNABLES)

_NON_NEGATIVE = Number(min=0)

MIGRATION_TRANSFER = Obj(
    {
        "dataTotalBytes": _NON_NEGATIVE,
        "dataProcessedBytes": _NON_NEGATIVE,
        "dataRemainingBytes": _NON_NEGATIVE,
        "wireBytes": _NON_NEGATIVE,
        "rounds": _NON_NEGATIVE,
        "dirtyRateBytes": _NON_NEGATIVE,
        "transferRateBytes": _NON_NEGATIVE,
        "averageWireRateBytes": _NON_NEGATIVE,
        "downtimeMilliseconds": Number(),
        "guestDowntimeMilliseconds": Number(),
        # The source's switchover in named parts: pause, final_pass, state_transfer, verify, resume.
        "downtimePartsMilliseconds": Map(_NON_NEGATIVE),
        "digest": Str(),
        "targetDigest": Str(),
        "digestVerified": Bool(),
        "throttlePercent": Int(min=0, max=100),
        # QEMU guests' verified switchover: the mode and the pages re-sent to the target.
        "verifyMode": Str(enum=("off", "detect", "repair")),
        "repairedPages": _NON_NEGATIVE,
        "postCopyStallMilliseconds": _NON_NEGATIVE,
        "postCopyFaults": _NON_NEGATIVE,
        "postCopyInterruptions": _NON_NEGATIVE,
    }
)

MIGRATION_STATE = Obj(
    {
        "migrationUid": Str(),
        "sourceNode": Str(),
        "targetNode": Str(),
        "targetNodeAddress": Str(),
        "targetNodePort": PORT,
        "targetNodeDomainDetected": Bool(),
        "targetNodeDomainReadyTimestamp": Timestamp(),
        "startTimestamp": Timestamp(),
        "endTimestamp": Timestamp(),
        "completed": Bool(),
        "failed": Bool(),
        "abortRequested": Bool(),
        "abortStatus": Str(enum=("Succeeded", "Failed", "Aborting")),
        "failureReason": Str(),
        "mode": Str(enum=("PreCopy", "PostCopy")),
        "migrationPolicyName": Str(),
        "migrationConfiguration": MIGRATION_CONFIGURATION,
        "token": Str(),
        "switchover": Str(enum=("Committed", "Aborted")),
        "transfer": MIGRATION_TRANSFER,
    }
)

# --------------------------------------------------------------------------------------
# VirtualMachineInstance spec (also the VirtualMachine template)
# --------------------------------------------------------------------------------------


def _get(obj: object, *keys: str) -> object:
    """``obj[k1][k2]...`` or None when any step is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _quiet_quantity(value: object) -> int | None:
    """Parse a quantity that was already checked; None if absent or invalid."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        return parse_quantity(value)
    except ValueError:
        return None


def _rule_vmi_memory(spec: dict[str, Any], path: str, errors: Errors) -> None:
    guest = _get(spec, "domain", "memory", "guest")
    requested = _get(spec, "domain", "resources", "requests", "memory")
    if guest is None and requested is None:
        errors.add(
            _field_path(path, "domain.memory.guest"),
            f"required (or set {_field_path(path, 'domain.resources.requests.memory')})",
        )


def _rule_vmi_one_driver(spec: dict[str, Any], path: str, errors: Errors) -> None:
    if spec.get("memvm") is not None and spec.get("qemu") is not None:
        errors.add(path, "memvm and qemu are mutually exclusive: set one driver section")


def _rule_memvm_fits_guest(spec: dict[str, Any], path: str, errors: Errors) -> None:
    workload = _get(spec, "memvm", "workload")
    if not isinstance(workload, Mapping):
        return
    guest_value = _get(spec, "domain", "memory", "guest")
    if guest_value is None:
        guest_value = _get(spec, "domain", "resources", "requests", "memory")
    guest = _quiet_quantity(guest_value)
    if guest is None:
        return
    for name in ("hotSet", "touched"):
        amount = _quiet_quantity(workload.get(name))
        if amount is not None and amount > guest:
            errors.add(
                _field_path(path, f"memvm.workload.{name}"),
                f"{_show(workload[name])} is more than the guest memory ({_show(guest_value)})",
            )


VMI_SPEC = Obj(
    {
        "domain": Obj(
            {
                "cpu": Obj(
                    {
                        "cores": Int(min=1),
                        "sockets": Int(min=1),
                        "threads": Int(min=1),
                        "model": Str(nonempty=True),
                    }
                ),
                "memory": Obj({"guest": Quantity(positive=True)}),
                "resources": Obj({"requests": Map(Quantity()), "limits": Map(Quantity())}),
                "devices": AnyObject(),
                "machine": Obj({"type": Str()}),
                "firmware": AnyObject(),
            }
        ),
        "evictionStrategy": Str(enum=("LiveMigrate", "LiveMigrateIfPossible", "None", "External")),
        "nodeSelector": Labels(),
        "terminationGracePeriodSeconds": Int(min=0),
        "affinity": Anything(),
        "tolerations": List(Anything()),
        "networks": List(Anything()),
        "volumes": List(Anything()),
        "hostname": Str(),
        "subdomain": Str(),
        # The built-in memory-only driver: a synthetic guest whose workload dirties memory.
        "memvm": Obj(
            {
                "workload": Obj(
                    {
                        "dirtyRate": Quantity(),  # bytes/s
                        "hotSet": Quantity(),
                        "content": Str(enum=("random", "text", "zero", "mixed")),
                        "touched": Quantity(),
                        "tickIntervalMilliseconds": Int(min=1),
                    }
                )
            }
        ),
        "qemu": Obj(
            {
                "kernel": Str(),
                "initrd": Str(),
                "cmdline": Str(),
                "accelerator": Str(enum=("kvm", "tcg")),
                "vcpus": Int(min=1),
                "verify": Str(enum=("off", "detect", "repair")),
                "extraArgs": List(Str()),
            }
        ),
    },
    rules=(_rule_vmi_memory, _rule_vmi_one_driver, _rule_memvm_fits_guest),
)

VMI_PHASES = ("", "Pending", "Scheduling", "Scheduled", "Running", "Succeeded", "Failed", "Unknown")

VMI_STATUS = Obj(
    {
        "phase": Str(enum=VMI_PHASES),
        "nodeName": Str(),
        "reason": Str(),
        "conditions": CONDITIONS,
        "phaseTransitionTimestamps": PHASE_TRANSITION_TIMESTAMPS,
        "migrationMethod": Str(),
        "migrationState": MIGRATION_STATE,
        "launcher": Obj({"pid": Int(min=0), "vmId": Str(), "driver": Str()}),
        "guest": Obj({"ticks": Int(min=0), "resumeGapMilliseconds": Number()}),
    }
)

# --------------------------------------------------------------------------------------
# The other kinds
# --------------------------------------------------------------------------------------

NAMESPACE_SPEC = Obj({"finalizers": List(Str(nonempty=True))})
NAMESPACE_STATUS = Obj({"phase": Str()})

_ENDPOINT = Obj({"address": Str(), "port": PORT})

NODE_SPEC = Obj(
    {
        "unschedulable": Bool(),
        "taints": List(
            Obj(
                {
                    "key": Str(nonempty=True),
                    "value": Str(),
                    "effect": Str(enum=("NoSchedule", "PreferNoSchedule", "NoExecute")),
                },
                required=("key", "effect"),
            )
        ),
    }
)

NODE_STATUS = Obj(
    {
        "capacity": Map(Quantity()),
        "allocatable": Map(Quantity()),
        "addresses": List(
            Obj({"type": Str(nonempty=True), "address": Str()}, required=("type", "address"))
        ),
        "conditions": CONDITIONS,
        "nodeInfo": Obj(
            {
                "cpuModel": Str(),
                "hostname": Str(),
                "handlerVersion": Str(),
                "kernelVersion": Str(),
                "operatingSystem": Str(),
                "architecture": Str(),
            }
        ),
        "migrationEndpoint": _ENDPOINT,
        "daemonEndpoints": Obj({"handlerEndpoint": _ENDPOINT}),
        "allocatedMemory": Quantity(),
        "vmiCount": Int(min=0),
    }
)


def _rule_vm_run_strategy(spec: dict[str, Any], path: str, errors: Errors) -> None:
    if spec.get("running") is not None and spec.get("runStrategy") is not None:
        errors.add(
            path,
            "running and runStrategy are mutually exclusive: "
            "set only runStrategy (running is deprecated)",
        )


RUN_STRATEGIES = ("Always", "Halted", "Manual", "RerunOnFailure", "Once")

VM_SPEC = Obj(
    {
        "runStrategy": Str(enum=RUN_STRATEGIES),
        "running": Bool(),
        "template": Obj(
            {
                "metadata": Obj(
                    {
                        "labels": Labels(),
                        "annotations": Annotations(),
                        # `get -o yaml` of a real KubeVirt VM shows `creationTimestamp: null`.
                        "creationTimestamp": Timestamp(),
                    }
                ),
                "spec": VMI_SPEC,
            },
            required=("spec",),
        ),
    },
    required=("template",),
    rules=(_rule_vm_run_strategy,),
)

VM_STATUS = Obj(
    {
        "printableStatus": Str(),
        "ready": Bool(),
        "created": Bool(),
        "conditions": CONDITIONS,
    }
)


def _rule_vmim_one_side(spec: dict[str, Any], path: str, errors: Errors) -> None:
    if spec.get("sendTo") is not None and spec.get("receive") is not None:
        errors.add(
            path,
            "sendTo and receive are mutually exclusive: "
            "a migration object is either the sending or the receiving side",
        )


VMIM_SPEC = Obj(
    {
        "vmiName": Str(nonempty=True),
        "addedNodeSelector": Labels(),
        "sendTo": Obj(
            {"migrationID": Str(nonempty=True), "connectURL": Str(nonempty=True)},
            required=("migrationID", "connectURL"),
        ),
        "receive": Obj({"migrationID": Str(nonempty=True)}, required=("migrationID",)),
    },
    required=("vmiName",),
    rules=(_rule_vmim_one_side,),
)

VMIM_PHASES = (
    "",
    "Pending",
    "Scheduling",
    "Scheduled",
    "PreparingTarget",
    "TargetReady",
    "Running",
    "Succeeded",
    "Failed",
    "WaitingForSync",
    "Synchronizing",
)

VMIM_STATUS = Obj(
    {
        "phase": Str(enum=VMIM_PHASES),
        "phaseTransitionTimestamps": PHASE_TRANSITION_TIMESTAMPS,
        "migrationState": MIGRATION_STATE,
        "conditions": CONDITIONS,
    }
)

HYPERCONVERGED_SPEC = Obj(
    {
        "liveMigrationConfig": LIVE_MIGRATION_CONFIG,
        "featureGates": Map(Bool()),
    }
)

MIGRATION_POLICY_SPEC = Obj(
    {
        "selectors": Obj(
            {
                "namespaceSelector": Labels(),
                "virtualMachineInstanceSelector": Labels(),
            }
        ),
        "allowAutoConverge": Bool(),
        "bandwidthPerMigration": Quantity(),
        "completionTimeoutPerGiB": Int(min=1),
        "allowPostCopy": Bool(),
    }
)

# --------------------------------------------------------------------------------------
# RBAC, service accounts, secrets and config maps (the Kubernetes core/v1 and
# rbac.authorization.k8s.io/v1 shapes; see controller/rbac.py for their meaning)
# --------------------------------------------------------------------------------------

RBAC_GROUP = "rbac.authorization.k8s.io"
SERVICE_ACCOUNT_TOKEN_TYPE = "kubernetes.io/service-account-token"

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class Base64(Str):
    """A base64 string (a Secret's ``data`` value); padding and alphabet are checked."""

    type_name = "base64 string"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, str):
            errors.add(path, _expected("base64 string", value))
        elif len(value) % 4 or not _BASE64.fullmatch(value):
            errors.add(path, f"invalid base64 data {_quote(value, 20)}: encode it (base64 -w0)")
        return value


def _rule_policy_rule(rule: dict[str, Any], path: str, errors: Errors) -> None:
    if not isinstance(rule.get("verbs"), list) or not rule.get("verbs"):
        errors.add(_field_path(path, "verbs"), "required: at least one verb")
    has_resources = bool(rule.get("resources"))
    has_urls = bool(rule.get("nonResourceURLs"))
    if not has_resources and not has_urls:
        errors.add(path, "a rule needs resources (or nonResourceURLs)")
    if has_resources and rule.get("apiGroups") is None:
        errors.add(_field_path(path, "apiGroups"), 'required with resources ("" is the core group)')


POLICY_RULE = Obj(
    {
        "apiGroups": List(Str()),
        "resources": List(Str(nonempty=True)),
        "verbs": List(Str(nonempty=True)),
        "resourceNames": List(Str(nonempty=True)),
        "nonResourceURLs": List(Str(nonempty=True)),
    },
    rules=(_rule_policy_rule,),
)

_SELECTOR_REQUIREMENT = Obj(
    {
        "key": Str(nonempty=True),
        "operator": Str(enum=("In", "NotIn", "Exists", "DoesNotExist")),
        "values": List(Str()),
    },
    required=("key", "operator"),
)

LABEL_SELECTOR = Obj({"matchLabels": Labels(), "matchExpressions": List(_SELECTOR_REQUIREMENT)})

AGGREGATION_RULE = Obj({"clusterRoleSelectors": List(LABEL_SELECTOR)})


def _rule_subject(subject: dict[str, Any], path: str, errors: Errors) -> None:
    kind = subject.get("kind")
    group = subject.get("apiGroup")
    if kind in ("User", "Group") and group not in (None, "", RBAC_GROUP):
        errors.add(_field_path(path, "apiGroup"), f'must be "{RBAC_GROUP}" for a {kind}')
    if kind == "ServiceAccount" and group not in (None, ""):
        errors.add(_field_path(path, "apiGroup"), 'must be "" for a ServiceAccount')


SUBJECT = Obj(
    {
        "kind": Str(enum=("User", "Group", "ServiceAccount")),
        "name": Str(nonempty=True),
        "namespace": Str(),
        "apiGroup": Str(),
    },
    required=("kind", "name"),
    rules=(_rule_subject,),
)

ROLE_REF = Obj(
    {
        "apiGroup": Str(enum=(RBAC_GROUP,)),
        "kind": Str(enum=("ClusterRole", "Role")),
        "name": Str(nonempty=True),
    },
    required=("apiGroup", "kind", "name"),
)

_OBJECT_REFERENCE = Obj(
    {
        "kind": Str(),
        "apiVersion": Str(),
        "name": Str(),
        "namespace": Str(),
        "uid": Str(),
    }
)


def rbac_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid RBAC object name (a path segment: ``kubevirt.io:migrate``
    and ``system:masters`` are fine; ``/`` and ``%`` are not), or None."""
    if name in (".", ".."):
        return f"may not be {_quote(name)}"
    for bad in ("/", "%"):
        if bad in name:
            return f"may not contain {_quote(bad)}"
    return None


# --------------------------------------------------------------------------------------
# Kinds
# --------------------------------------------------------------------------------------

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")


def dns1123_subdomain_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS-1123 subdomain (a valid object name), or None."""
    if len(name) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(name):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
            "characters, '-' or '.', and must start and end with an alphanumeric character "
            "(e.g. 'example.com')"
        )
    return None


def dns1123_label_problem(name: str) -> str | None:
    """Why ``name`` is not a DNS-1123 label (a valid namespace name), or None."""
    if len(name) > 63:
        return "must be no more than 63 characters"
    if not re.fullmatch(_DNS1123_LABEL, name):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
            "or '-', and must start and end with an alphanumeric character (e.g. 'my-name')"
        )
    return None


@dataclass(frozen=True)
class KindSchema:
    """A kind's top-level fields besides ``apiVersion``, ``kind`` and ``metadata``.

    ``required`` lists top-level fields that must be present; ``name_problem`` says why a
    ``metadata.name`` is not acceptable for the kind (None when it is).
    """

    fields: Mapping[str, Schema]
    required: tuple[str, ...] = ()
    name_problem: Callable[[str], str | None] = dns1123_subdomain_problem

    def top_level(self) -> Obj:
        return Obj(
            {"apiVersion": Str(), "kind": Str(), "metadata": METADATA, **self.fields},
            required=self.required,
        )


SCHEMAS: dict[str, KindSchema] = {
    "Namespace": KindSchema(
        {"spec": NAMESPACE_SPEC, "status": NAMESPACE_STATUS},
        name_problem=dns1123_label_problem,
    ),
    "Node": KindSchema({"spec": NODE_SPEC, "status": NODE_STATUS}),
    "VirtualMachine": KindSchema({"spec": VM_SPEC, "status": VM_STATUS}, required=("spec",)),
    "VirtualMachineInstance": KindSchema(
        {"spec": VMI_SPEC, "status": VMI_STATUS}, required=("spec",)
    ),
    "VirtualMachineInstanceMigration": KindSchema(
        {"spec": VMIM_SPEC, "status": VMIM_STATUS}, required=("spec",)
    ),
    "HyperConverged": KindSchema({"spec": HYPERCONVERGED_SPEC, "status": AnyObject()}),
    "MigrationPolicy": KindSchema({"spec": MIGRATION_POLICY_SPEC, "status": AnyObject()}),
    "ServiceAccount": KindSchema(
        {
            "secrets": List(_OBJECT_REFERENCE),
            "imagePullSecrets": List(Obj({"name": Str()})),
            "automountServiceAccountToken": Bool(),
        }
    ),
    "Secret": KindSchema(
        {
            "type": Str(),
            "data": Map(Base64()),
            "stringData": Map(Str()),
            "immutable": Bool(),
        }
    ),
    "ConfigMap": KindSchema({"data": Map(Str()), "binaryData": Map(Base64()), "immutable": Bool()}),
    "ClusterRole": KindSchema(
        {"rules": List(POLICY_RULE), "aggregationRule": AGGREGATION_RULE},
        name_problem=rbac_name_problem,
    ),
    "Role": KindSchema({"rules": List(POLICY_RULE)}, name_problem=rbac_name_problem),
    "ClusterRoleBinding": KindSchema(
        {"subjects": List(SUBJECT), "roleRef": ROLE_REF},
        required=("roleRef",),
        name_problem=rbac_name_problem,
    ),
    "RoleBinding": KindSchema(
        {"subjects": List(SUBJECT), "roleRef": ROLE_REF},
        required=("roleRef",),
        name_problem=rbac_name_problem,
    ),
}
"""Schema of every kind, by ``kind``. A kind listed in ``vmferry.kinds.KINDS`` needs one."""

_TOP_LEVEL: dict[str, Obj] = {}


def _top_level(kind: str) -> Obj:
    schema = _TOP_LEVEL.get(kind)
    if schema is None:
        kind_schema = SCHEMAS.get(kind)
        if kind_schema is None:
            raise ApiError(f'kind "{kind}" has no schema (add it to vmferry.schema.SCHEMAS)')
        schema = _TOP_LEVEL[kind] = kind_schema.top_level()
    return schema


# --------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------


def validate(obj: object, *, server_managed: bool = False) -> dict[str, Any]:
    """Check a manifest of any registered kind; return a normalized deep copy.

    ``server_managed=False`` (a user's manifest): ``status`` may be present and is
    type-checked (the API ignores it later); ``metadata.name`` may be left to
    ``metadata.generateName``. ``server_managed=True`` (an object as the server stores
    it, e.g. a status update): ``metadata.name`` is required.

    Defaults are not applied; see :func:`apply_defaults`.

    Raises BadRequest when ``kind`` names no registered kind, and Invalid listing every
    problem (``Kind "name": path: problem; path: problem``) otherwise.
    """
    if not isinstance(obj, Mapping):
        raise Invalid(f"manifest: {_expected('object', obj)}")
    kind = obj.get("kind")
    if kind is None or kind == "":
        raise Invalid(
            'kind: required field is missing (every manifest names its kind, e.g. "kind: VirtualMachine")'
        )
    if not isinstance(kind, str):
        raise Invalid(f"kind: {_expected('string', kind)}")
    kind_info = by_kind(kind)
    schema = _top_level(kind)

    errors = Errors()
    out = schema.check(obj, "", errors)
    assert isinstance(out, dict)

    api_version = out.get("apiVersion")
    expected = kind_info.api_version
    if api_version is None:
        errors.add(
            "apiVersion", f'required field is missing (expected "{expected}" for kind {kind})'
        )
    elif isinstance(api_version, str) and api_version != expected:
        errors.add(
            "apiVersion", f'expected "{expected}" for kind {kind}, got {_quote(api_version)}'
        )

    metadata = out.get("metadata")
    if metadata is None:
        metadata = {}
    if isinstance(metadata, dict):
        _check_metadata(metadata, kind, kind_info.namespaced, server_managed, errors)

    if errors:
        # Identity problems (apiVersion, kind, metadata) first, then the body in order.
        head = ("apiVersion", "kind", "metadata")
        lines = sorted(errors.lines, key=lambda line: not line.startswith(head))
        raise Invalid(f"{_subject(kind, obj)}: " + "; ".join(lines))
    return out


def _check_metadata(
    metadata: dict[str, Any],
    kind: str,
    namespaced: bool,
    server_managed: bool,
    errors: Errors,
) -> None:
    name_problem = SCHEMAS[kind].name_problem
    name = metadata.get("name")
    generate_name = metadata.get("generateName")
    if isinstance(name, str) and name:
        problem = name_problem(name)
        if problem:
            errors.add("metadata.name", f"invalid value {_quote(name)}: {problem}")
    elif name is None or name == "":
        if server_managed:
            errors.add("metadata.name", "required field is missing")
        elif not generate_name:
            errors.add("metadata.name", "required field is missing (or set metadata.generateName)")
    if isinstance(generate_name, str) and generate_name:
        # As Kubernetes does: a trailing '-' is fine in a prefix.
        masked = generate_name[:-1] + "a" if generate_name.endswith("-") else generate_name
        problem = name_problem(masked)
        if problem:
            errors.add("metadata.generateName", f"invalid value {_quote(generate_name)}: {problem}")

    namespace = metadata.get("namespace")
    if namespace is not None:
        if not namespaced:
            errors.add(
                "metadata.namespace",
                f"not allowed: {kind} is cluster-scoped (remove metadata.namespace)",
            )
        elif isinstance(namespace, str):
            problem = dns1123_label_problem(namespace)
            if problem:
                errors.add("metadata.namespace", f"invalid value {_quote(namespace)}: {problem}")


def _subject(kind: str, obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping):
        name = metadata.get("name")
        if isinstance(name, str) and name:
            return f"{kind} {_quote(name)}"
        generate_name = metadata.get("generateName")
        if isinstance(generate_name, str) and generate_name:
            return f"{kind} (generateName {_quote(generate_name)})"
    return kind


# --------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------

DEFAULT_CPU_MODEL = "host-model"  # KubeVirt's cluster default: the source host's CPU model


def _child(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]``, created as ``{}`` when absent or null."""
    value = parent.get(key)
    if not isinstance(value, dict):
        value = parent[key] = {}
    return value


def _default_vmi_spec(spec: dict[str, Any]) -> None:
    domain = _child(spec, "domain")
    cpu = _child(domain, "cpu")
    if not cpu.get("model"):
        cpu["model"] = DEFAULT_CPU_MODEL
    requested = _get(domain, "resources", "requests", "memory")
    if _get(domain, "memory", "guest") is None and requested is not None:
        _child(domain, "memory")["guest"] = requested


def _default_vm(obj: dict[str, Any]) -> None:
    spec = _child(obj, "spec")
    running = spec.pop("running", None)
    if spec.get("runStrategy") is None:
        if running is None:
            spec["runStrategy"] = "Halted"
        else:
            spec["runStrategy"] = "Always" if running else "Halted"


def _default_vmi(obj: dict[str, Any]) -> None:
    _default_vmi_spec(_child(obj, "spec"))


def _default_hyperconverged(obj: dict[str, Any]) -> None:
    config = _child(_child(obj, "spec"), "liveMigrationConfig")
    for key, value in LIVE_MIGRATION_DEFAULTS.items():
        if config.get(key) is None:
            config[key] = value


def _default_secret(obj: dict[str, Any]) -> None:
    """As the API server does: ``stringData`` is merged into ``data`` (base64) and dropped;
    ``type`` defaults to ``Opaque``."""
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict) and string_data:
        data = _child(obj, "data")
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
    if not obj.get("type"):
        obj["type"] = "Opaque"


_DEFAULTERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "Secret": _default_secret,
    "VirtualMachine": _default_vm,
    "VirtualMachineInstance": _default_vmi,
    "HyperConverged": _default_hyperconverged,
}


def apply_defaults(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of a validated manifest with the server's defaults filled in.

    - HyperConverged: every missing ``spec.liveMigrationConfig`` field from
      :data:`LIVE_MIGRATION_DEFAULTS`.
    - VirtualMachineInstance: ``spec.domain.cpu.model`` = ``host-model``;
      ``spec.domain.memory.guest`` from ``spec.domain.resources.requests.memory``.
      ``evictionStrategy`` stays unset (the cluster default applies).
    - Secret: ``stringData`` merged into ``data`` (base64); ``type`` = ``Opaque``.
    - VirtualMachine: ``running`` becomes ``runStrategy`` (true → Always, false → Halted)
      and is removed; with neither, ``runStrategy`` = ``Halted``.

    Other kinds are copied unchanged. Defaulting is idempotent.
    """
    out = copy.deepcopy(dict(obj))
    fill_defaults(out)
    return out


def fill_defaults(obj: dict[str, Any]) -> None:
    """:func:`apply_defaults` in place: for an object that is already a private copy
    (what :func:`validate` returns), which saves copying it again."""
    defaulter = _DEFAULTERS.get(str(obj.get("kind")))
    if defaulter is not None:
        defaulter(obj)


def memory_bytes(vmi_spec: Mapping[str, Any]) -> int:
    """Guest memory of a VMI spec in bytes.

    Reads ``domain.memory.guest``, falling back to ``domain.resources.requests.memory``.
    Raises Invalid when neither is set or the quantity does not parse.
    """
    value = _get(vmi_spec, "domain", "memory", "guest")
    path = "spec.domain.memory.guest"
    if value is None:
        value = _get(vmi_spec, "domain", "resources", "requests", "memory")
        path = "spec.domain.resources.requests.memory"
    if value is None:
        raise Invalid(
            "spec.domain.memory.guest: required (or set spec.domain.resources.requests.memory)"
        )
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Invalid(f"{path}: {_expected('quantity', value)}")
    try:
        return parse_quantity(value)
    except ValueError as exc:
        raise Invalid(f"{path}: {exc}") from None
