"""Schemas of the object model's shared pieces and of the Kubernetes core/v1 and RBAC kinds.

Shared by every kind: ``metadata`` (:data:`METADATA`), status conditions
(:data:`CONDITIONS`), phase transition timestamps, ports. Kinds: Namespace, Node, and the
RBAC shapes (ClusterRole/Role rules, bindings' subjects and roleRef); the small
ServiceAccount, Secret and ConfigMap bodies are declared where they are registered
(:mod:`vmferry.objects.schema.registry`). The KubeVirt kinds are in
:mod:`vmferry.objects.schema.kubevirt`.
"""

from __future__ import annotations

from typing import Any

from vmferry.migration_network import STATUS_FIELD
from vmferry.objects.schema.dsl import (
    Annotations,
    Bool,
    Errors,
    Int,
    Labels,
    List,
    Map,
    Obj,
    Quantity,
    Str,
    Timestamp,
    field_path,
)

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

# -- Namespace and Node ----------------------------------------------------------------

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
        # where the handler serves migrations on the configured migration network, or
        # why it cannot (vmferry.migration_network.NodeNetworkStatus)
        STATUS_FIELD: Obj(
            {
                "network": Str(),
                "interface": Str(),
                "address": Str(),
                "ready": Bool(),
                "message": Str(),
            }
        ),
        "daemonEndpoints": Obj({"handlerEndpoint": _ENDPOINT}),
        "allocatedMemory": Quantity(),
        "vmiCount": Int(min=0),
    }
)

# -- RBAC (rbac.authorization.k8s.io/v1; controller/rbac.py says what it means) ----------

RBAC_GROUP = "rbac.authorization.k8s.io"


def _rule_policy_rule(rule: dict[str, Any], path: str, errors: Errors) -> None:
    if not isinstance(rule.get("verbs"), list) or not rule.get("verbs"):
        errors.add(field_path(path, "verbs"), "required: at least one verb")
    has_resources = bool(rule.get("resources"))
    has_urls = bool(rule.get("nonResourceURLs"))
    if not has_resources and not has_urls:
        errors.add(path, "a rule needs resources (or nonResourceURLs)")
    if has_resources and rule.get("apiGroups") is None:
        errors.add(field_path(path, "apiGroups"), 'required with resources ("" is the core group)')


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
        errors.add(field_path(path, "apiGroup"), f'must be "{RBAC_GROUP}" for a {kind}')
    if kind == "ServiceAccount" and group not in (None, ""):
        errors.add(field_path(path, "apiGroup"), 'must be "" for a ServiceAccount')


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

OBJECT_REFERENCE = Obj(
    {
        "kind": Str(),
        "apiVersion": Str(),
        "name": Str(),
        "namespace": Str(),
        "uid": Str(),
    }
)


# core/v1 Event (vmferry.events): the fields Kubernetes' Event carries that vmferry fills.
EVENT_FIELDS: dict[str, Any] = {
    "involvedObject": OBJECT_REFERENCE,
    "reason": Str(),
    "message": Str(),
    "type": Str(enum=("Normal", "Warning")),
    "count": Int(min=1),
    "firstTimestamp": Timestamp(),
    "lastTimestamp": Timestamp(),
    "eventTime": Timestamp(),
    "source": Obj({"component": Str(), "host": Str()}),
    "reportingComponent": Str(),
    "reportingInstance": Str(),
    "action": Str(),
}
