"""Schemas of the Migration Toolkit for Virtualization's kinds (``forklift.konveyor.io/v1beta1``):
ForkliftController, Provider, Plan and Migration (reference 12.4.2 and 12.6).

Only what vmferry's orchestrator (``controller/forklift/``) does is accepted: ``openshift``
providers, ``live`` plans (warm and cold migrations are refused: there is no disk to
copy), one source and one destination provider per plan. Unknown fields are refused as
everywhere. The names of fields, types and values shared with the orchestrator are the
constants below.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from vmferry.objects.schema.core import CONDITIONS
from vmferry.objects.schema.dsl import (
    Bool,
    Errors,
    Int,
    List,
    Name,
    Obj,
    Schema,
    Str,
    Timestamp,
    expected_type,
    field_path,
    quote,
)

# -- ForkliftController --------------------------------------------------------------------

# 12.4.2: ``oc patch ForkliftController forklift-controller -n openshift-mtv --type json -p
# '[{"op": "add", "path": "/spec/feature_ocp_live_migration", "value": "true"}]'``: the
# operator's settings are strings ("true"/"false"); a YAML boolean is accepted too.
FEATURE_OCP_LIVE_MIGRATION = "feature_ocp_live_migration"
_TRUE_STRINGS = ("true", "false")


class BoolString(Schema):
    """``"true"``/``"false"`` (how the MTV operator's settings are written) or a boolean."""

    type_name = 'string "true" or "false"'

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, bool):
            return value
        if not isinstance(value, str):
            errors.add(path, expected_type(self.type_name, value))
        elif value.lower() not in _TRUE_STRINGS:
            errors.add(path, f'unsupported value {quote(value)}: supported values: "true", "false"')
        return value


def truthy(value: object) -> bool:
    """A BoolString's meaning."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


FORKLIFT_CONTROLLER_SPEC = Obj({FEATURE_OCP_LIVE_MIGRATION: BoolString()})
FORKLIFT_CONTROLLER_STATUS = Obj({"conditions": CONDITIONS})

# -- Provider ---------------------------------------------------------------------------------


class ProviderType(StrEnum):
    OPENSHIFT = "openshift"


# The keys of a provider's Secret (12.6.1 and 12.6.1.1 produce them): the service account's
# bearer token and the cluster's root CA (kube-root-ca.crt's ca.crt). insecureSkipVerify is
# MTV's and refused here: a provider is always verified with its CA.
SECRET_TOKEN = "token"
SECRET_CACERT = "cacert"
SECRET_INSECURE = "insecureSkipVerify"
SECRET_URL = "url"

_OTHER_PROVIDER_TYPES = ("vsphere", "ovirt", "openstack", "ova")


def _rule_provider(spec: dict[str, Any], path: str, errors: Errors) -> None:
    kind = spec.get("type")
    if kind in _OTHER_PROVIDER_TYPES:
        errors.add(
            field_path(path, "type"),
            f'provider type "{kind}" is not supported: vmferry moves VMs between '
            'clusters only (type "openshift")',
        )
    elif isinstance(kind, str) and kind != ProviderType.OPENSHIFT:
        errors.add(
            field_path(path, "type"),
            f'unsupported value {quote(kind)}: supported values: "{ProviderType.OPENSHIFT}"',
        )
    url = spec.get("url")
    if isinstance(url, str) and url and not spec.get("secret"):
        errors.add(
            field_path(path, "secret"),
            "required with a url: a Secret holding the service account's token and the "
            "cluster's CA certificate (cacert)",
        )


class RequiredName(Name):
    """A reference by name that must be given (not empty)."""

    def check(self, value: object, path: str, errors: Errors) -> object:
        if value == "":
            errors.add(path, "must not be empty")
            return value
        return super().check(value, path, errors)


OBJECT_REF = Obj({"name": RequiredName(), "namespace": Name()}, required=("name",))

PROVIDER_SPEC = Obj(
    {
        "type": Str(nonempty=True),
        # Where the cluster's API serves bearer-token clients ("https://host:port" or
        # "host:port"); empty: this cluster (MTV's local "host" provider).
        "url": Str(),
        "secret": OBJECT_REF,
        "settings": Obj({}),
    },
    required=("type",),
    rules=(_rule_provider,),
)

PROVIDER_STATUS = Obj({"phase": Str(), "conditions": CONDITIONS, "observedGeneration": Int(min=0)})

# -- Plan ---------------------------------------------------------------------------------------


class PlanType(StrEnum):
    LIVE = "live"


_UNSUPPORTED_PLAN_TYPES = ("cold", "warm", "conversion")


def _rule_plan(spec: dict[str, Any], path: str, errors: Errors) -> None:
    kind = spec.get("type")
    if kind in _UNSUPPORTED_PLAN_TYPES:
        errors.add(
            field_path(path, "type"),
            f'"{kind}" migrations are not supported: vmferry moves running VMs only '
            f'(type "{PlanType.LIVE}", cross-cluster live migration)',
        )
    elif isinstance(kind, str) and kind != PlanType.LIVE:
        errors.add(
            field_path(path, "type"),
            f'unsupported value {quote(kind)}: supported values: "{PlanType.LIVE}"',
        )
    vms = spec.get("vms")
    if isinstance(vms, list) and not vms:
        errors.add(field_path(path, "vms"), "must name at least one VM")


PLAN_SPEC = Obj(
    {
        "type": Str(nonempty=True),
        "description": Str(),
        "provider": Obj(
            {"source": OBJECT_REF, "destination": OBJECT_REF},
            required=("source", "destination"),
        ),
        "targetNamespace": RequiredName(),
        "vms": List(Obj({"name": RequiredName(), "namespace": Name()}, required=("name",))),
        "archived": Bool(),
    },
    required=("type", "provider", "targetNamespace", "vms"),
    rules=(_rule_plan,),
)

PLAN_STATUS = Obj({"conditions": CONDITIONS})

# -- Migration ----------------------------------------------------------------------------------


class MigrationRunPhase(StrEnum):
    """``Migration.status.phase``."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"


MIGRATION_FINAL_PHASES = frozenset(
    {MigrationRunPhase.SUCCEEDED, MigrationRunPhase.FAILED, MigrationRunPhase.CANCELED}
)


class VMPhase(StrEnum):
    PENDING = "Pending"
    RECEIVING = "Receiving"  # the receiving VM and VMIM exist on the destination
    MIGRATING = "Migrating"  # the sending VMIM exists here
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"

    @property
    def final(self) -> bool:
        return self in (VMPhase.SUCCEEDED, VMPhase.FAILED, VMPhase.CANCELED)


MIGRATION_SPEC = Obj({"plan": OBJECT_REF}, required=("plan",))

VM_STATUS = Obj(
    {
        "name": Str(),
        "namespace": Str(),
        "phase": Str(enum=VMPhase),
        "reason": Str(),
        "migrationID": Str(),
        "sourceMigration": Str(),  # the sending VMIM's name (this cluster)
        "destinationMigration": Str(),  # the receiving VMIM's name (targetNamespace there)
        "started": Timestamp(),
        "completed": Timestamp(),
    }
)

MIGRATION_STATUS = Obj(
    {
        "phase": Str(enum=MigrationRunPhase),
        "reason": Str(),
        "started": Timestamp(),
        "completed": Timestamp(),
        "conditions": CONDITIONS,
        "vms": List(VM_STATUS),
    }
)
