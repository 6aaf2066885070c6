"""Every kind's schema, by ``kind``: :data:`SCHEMAS` of :class:`KindSchema`.

Adding a kind: declare it in :mod:`vmferry.objects.kinds`, write its top-level fields with
the DSL (:mod:`vmferry.objects.schema.dsl`) in the module of its API group
(:mod:`~vmferry.objects.schema.core`, :mod:`~vmferry.objects.schema.kubevirt`,
:mod:`~vmferry.objects.schema.cni` or :mod:`~vmferry.objects.schema.forklift`) and
register it here; ``tests/unit/test_schema.py`` fails while a kind in ``KINDS`` has none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vmferry.errors import ApiError
from vmferry.objects.names import (
    dns1123_label_problem,
    dns1123_subdomain_problem,
    rbac_name_problem,
)
from vmferry.objects.schema.cni import NAD_SPEC
from vmferry.objects.schema.core import (
    AGGREGATION_RULE,
    EVENT_FIELDS,
    METADATA,
    NAMESPACE_SPEC,
    NAMESPACE_STATUS,
    NODE_SPEC,
    NODE_STATUS,
    OBJECT_REFERENCE,
    POLICY_RULE,
    ROLE_REF,
    SUBJECT,
)
from vmferry.objects.schema.dsl import (
    AnyObject,
    Base64,
    Bool,
    Int,
    List,
    Map,
    Obj,
    Rule,
    Schema,
    Str,
    Timestamp,
)
from vmferry.objects.schema.forklift import (
    FORKLIFT_CONTROLLER_SPEC,
    FORKLIFT_CONTROLLER_STATUS,
    MIGRATION_SPEC,
    MIGRATION_STATUS,
    PLAN_SPEC,
    PLAN_STATUS,
    PROVIDER_SPEC,
    PROVIDER_STATUS,
)
from vmferry.objects.schema.kubevirt import (
    HYPERCONVERGED_SPEC,
    HYPERCONVERGED_STATUS,
    MIGRATION_POLICY_SPEC,
    VM_SPEC,
    VM_STATUS,
    VMI_SPEC,
    VMI_STATUS,
    VMIM_SPEC,
    VMIM_STATUS,
    rule_vm_restore_annotation,
)
from vmferry.objects.schema.storage import PVC_SPEC, PVC_STATUS, STORAGE_CLASS_FIELDS


@dataclass(frozen=True)
class KindSchema:
    """A kind's top-level fields besides ``apiVersion``, ``kind`` and ``metadata``.

    ``required`` lists top-level fields that must be present; ``name_problem`` says why a
    ``metadata.name`` is not acceptable for the kind (None when it is); ``rules`` check
    the whole object (fields that depend on metadata).
    """

    fields: Mapping[str, Schema]
    required: tuple[str, ...] = ()
    name_problem: Callable[[str], str | None] = dns1123_subdomain_problem
    rules: Sequence[Rule] = ()

    def top_level(self) -> Obj:
        return Obj(
            {"apiVersion": Str(), "kind": Str(), "metadata": METADATA, **self.fields},
            required=self.required,
            rules=self.rules,
        )


# coordination.k8s.io/v1 Lease (times are MicroTime: RFC 3339 with microseconds).
LEASE_SPEC = Obj(
    {
        "holderIdentity": Str(),
        "leaseDurationSeconds": Int(min=1),
        "acquireTime": Timestamp(),
        "renewTime": Timestamp(),
        "leaseTransitions": Int(min=0),
    }
)


# certificates.k8s.io/v1 CertificateSigningRequest. username, uid and groups are set by
# the API server from the requester (controller/csr_signer.stamp_requester); request and
# certificate are PEM, base64-encoded as Kubernetes' []byte fields.
CSR_SPEC = Obj(
    {
        "request": Base64(),
        "signerName": Str(),
        "usages": List(Str()),
        "expirationSeconds": Int(min=120),  # vmferry.pki.csr.MIN_SECONDS
        "username": Str(),
        "uid": Str(),
        "groups": List(Str()),
    },
    required=("request", "signerName"),
)
CSR_STATUS = Obj(
    {
        "conditions": List(
            Obj(
                {
                    "type": Str(),
                    "status": Str(),
                    "reason": Str(),
                    "message": Str(),
                    "lastUpdateTime": Timestamp(),
                    "lastTransitionTime": Timestamp(),
                },
                required=("type", "status"),
            )
        ),
        "certificate": Base64(),
    }
)


SCHEMAS: dict[str, KindSchema] = {
    "Namespace": KindSchema(
        {"spec": NAMESPACE_SPEC, "status": NAMESPACE_STATUS},
        name_problem=dns1123_label_problem,
    ),
    "Node": KindSchema({"spec": NODE_SPEC, "status": NODE_STATUS}),
    "VirtualMachine": KindSchema(
        {"spec": VM_SPEC, "status": VM_STATUS},
        required=("spec",),
        rules=(rule_vm_restore_annotation,),
    ),
    "VirtualMachineInstance": KindSchema(
        {"spec": VMI_SPEC, "status": VMI_STATUS}, required=("spec",)
    ),
    "VirtualMachineInstanceMigration": KindSchema(
        {"spec": VMIM_SPEC, "status": VMIM_STATUS}, required=("spec",)
    ),
    "HyperConverged": KindSchema({"spec": HYPERCONVERGED_SPEC, "status": HYPERCONVERGED_STATUS}),
    "MigrationPolicy": KindSchema({"spec": MIGRATION_POLICY_SPEC, "status": AnyObject()}),
    "NetworkAttachmentDefinition": KindSchema({"spec": NAD_SPEC}, required=("spec",)),
    "ForkliftController": KindSchema(
        {"spec": FORKLIFT_CONTROLLER_SPEC, "status": FORKLIFT_CONTROLLER_STATUS}
    ),
    "Provider": KindSchema({"spec": PROVIDER_SPEC, "status": PROVIDER_STATUS}, required=("spec",)),
    "Plan": KindSchema({"spec": PLAN_SPEC, "status": PLAN_STATUS}, required=("spec",)),
    "Migration": KindSchema(
        {"spec": MIGRATION_SPEC, "status": MIGRATION_STATUS}, required=("spec",)
    ),
    "ServiceAccount": KindSchema(
        {
            "secrets": List(OBJECT_REFERENCE),
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
    "Lease": KindSchema({"spec": LEASE_SPEC}),
    "Event": KindSchema(EVENT_FIELDS, required=("involvedObject",)),
    "CertificateSigningRequest": KindSchema(
        {"spec": CSR_SPEC, "status": CSR_STATUS}, required=("spec",)
    ),
    "PersistentVolumeClaim": KindSchema(
        {"spec": PVC_SPEC, "status": PVC_STATUS}, required=("spec",)
    ),
    "StorageClass": KindSchema(STORAGE_CLASS_FIELDS, required=("provisioner",)),
    # Never stored: the API synthesizes them (controller/pods.py) and refuses writes.
    "Pod": KindSchema({"spec": AnyObject(), "status": AnyObject()}),
}
"""Schema of every kind, by ``kind``. A kind listed in :data:`vmferry.objects.kinds.KINDS` needs one."""

_TOP_LEVEL: dict[str, Obj] = {}


def top_level(kind: str) -> Obj:
    """The whole-object schema of ``kind`` (built once); ApiError when it has none."""
    schema = _TOP_LEVEL.get(kind)
    if schema is None:
        kind_schema = SCHEMAS.get(kind)
        if kind_schema is None:
            raise ApiError(
                f'kind "{kind}" has no schema (add it to vmferry.objects.schema.registry.SCHEMAS)'
            )
        schema = _TOP_LEVEL[kind] = kind_schema.top_level()
    return schema
