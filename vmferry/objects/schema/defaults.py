"""What the API server fills in (``apply_defaults``), and a VMI's guest memory.

Run defaulting after :func:`~vmferry.objects.schema.validation.validate`: it trusts the
types. The migration defaults are the contract's (``LIVE_MIGRATION_DEFAULTS`` in
:mod:`vmferry.migration_state`); none is spelled here.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Mapping
from typing import Any

from vmferry.decentralized import FEATURE_GATES
from vmferry.errors import Invalid
from vmferry.migration_state import LIVE_MIGRATION_DEFAULTS
from vmferry.objects.quantity import parse_quantity
from vmferry.objects.schema.dsl import expected_type, nested

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
    requested = nested(domain, "resources", "requests", "memory")
    if nested(domain, "memory", "guest") is None and requested is not None:
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
    spec = _child(obj, "spec")
    config = _child(spec, "liveMigrationConfig")
    for key, value in LIVE_MIGRATION_DEFAULTS.items():
        if config.get(key) is None:
            config[key] = value
    gates = _child(spec, "featureGates")
    for gate, enabled in FEATURE_GATES.items():
        if gates.get(gate) is None:
            gates[gate] = enabled


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
      :data:`LIVE_MIGRATION_DEFAULTS`; every missing ``spec.featureGates`` gate from
      :data:`vmferry.decentralized.FEATURE_GATES` (so a JSON-patch ``replace`` of a gate
      finds it).
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
    value = nested(vmi_spec, "domain", "memory", "guest")
    path = "spec.domain.memory.guest"
    if value is None:
        value = nested(vmi_spec, "domain", "resources", "requests", "memory")
        path = "spec.domain.resources.requests.memory"
    if value is None:
        raise Invalid(
            "spec.domain.memory.guest: required (or set spec.domain.resources.requests.memory)"
        )
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Invalid(f"{path}: {expected_type('quantity', value)}")
    try:
        return parse_quantity(value)
    except ValueError as exc:
        raise Invalid(f"{path}: {exc}") from None
