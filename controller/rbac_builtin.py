"""The built-in ClusterRoles and ClusterRoleBindings, and their bootstrap.

Built-in roles (created at bootstrap and reconciled at every start, keeping what an
administrator added: extra labels, annotations and rules): ``cluster-admin``;
``admin``/``edit``/``view`` aggregated by the labels
``rbac.authorization.k8s.io/aggregate-to-admin|edit|view``; the base roles
``system:aggregate-to-*`` and ``kubevirt.io:admin|edit|view`` that feed them;
``kubevirt.io:migrate``. As in OpenShift Virtualization 4.19+, ``admin`` and ``edit``
may read migrations but not create, update, patch or delete them: that is
``kubevirt.io:migrate``, which no one holds until an administrator binds it (12.1.3) or
aggregates it into ``admin`` (12.1.4).

Secrets: a RoleBinding grants only inside its namespace, so a namespace's ``admin`` or
``edit`` reads that namespace's Secrets and no others; ``view`` reads none at all, as in
Kubernetes. Service-account tokens: writing a Secret of type
``kubernetes.io/service-account-token`` mints a token for the account it names, so the
API also requires ``create`` on ``serviceaccounts/token`` of that account (as Kubernetes'
TokenRequest); ``edit`` (hence ``admin``) holds it, as in Kubernetes' bootstrap policy
(``system:aggregate-to-edit``), so a namespace editor can act as any service account of
the namespace; a custom role with ``create secrets`` alone cannot mint. A migration's stream token lives in a Secret of the system namespace
(``controller.migration_token``): only cluster administrators and the migration's two
nodes (the node authorizer, ``controller.api``) read it.

Pods (``controller.pods``, read-only views of the daemons) are read with ``view``, as in
Kubernetes. ``vmferry:sync-controller`` is what a sync controller (user
``system:vmferry:sync-controller``, :data:`vmferry.decentralized.SYNC_IDENTITY`) does in
its cluster: read everything a decentralized migration involves; write VMs, VMIs and
VMIMs (and their status), the stream-token Secrets, its Lease and the HyperConverged
status (``synchronizationAddresses``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from controller.rbac import (
    AGGREGATE_LABEL,
    ALL_VERBS,
    AUTOUPDATE_ANNOTATION,
    BOOTSTRAP_LABEL,
    MASTERS_GROUP,
    RBAC_API_VERSION,
    RBAC_GROUP,
    READ_VERBS,
    uncovered,
)
from controller.store import Store
from vmferry.bootstrap_token import BOOTSTRAPPERS_GROUP
from vmferry.decentralized import SYNC_IDENTITY
from vmferry.errors import NotFound
from vmferry.migration_network import NAD_KIND
from vmferry.objects import kinds

Obj = dict[str, Any]


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> Obj:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


def _cluster_role(
    name: str,
    rules: list[Obj],
    labels: dict[str, str] | None = None,
    aggregate_to: Sequence[str] = (),
) -> Obj:
    meta: Obj = {
        "name": name,
        "labels": {BOOTSTRAP_LABEL: "rbac-defaults", **(labels or {})},
        "annotations": {AUTOUPDATE_ANNOTATION: "true"},
    }
    role: Obj = {"apiVersion": RBAC_API_VERSION, "kind": "ClusterRole", "metadata": meta}
    if aggregate_to:
        role["aggregationRule"] = {
            "clusterRoleSelectors": [
                {"matchLabels": {AGGREGATE_LABEL.format(target): "true"}} for target in aggregate_to
            ]
        }
        role["rules"] = []
    else:
        role["rules"] = rules
    return role


def _aggregate_to(*targets: str) -> dict[str, str]:
    return {AGGREGATE_LABEL.format(t): "true" for t in targets}


KUBEVIRT_GROUP = "kubevirt.io"
VMS = ["virtualmachines", "virtualmachineinstances"]
VMIMS = ["virtualmachineinstancemigrations"]

MIGRATE_ROLE = "kubevirt.io:migrate"
MONITORING_ROLE = MONITORING_GROUP = "system:monitoring"  # Kubernetes' names for both
SYNC_CONTROLLER_ROLE = "vmferry:sync-controller"


def _resource_of(kind: str) -> tuple[str, str]:
    """(API group, plural) of a kind."""
    k = kinds.by_kind(kind)
    return k.group, k.plural


_HCO_GROUP, _HCOS = _resource_of("HyperConverged")
_LEASE_GROUP, _LEASES = _resource_of("Lease")
_NAD_GROUP, _NADS = _resource_of(NAD_KIND)
_POLICY_GROUP, _POLICIES = _resource_of("MigrationPolicy")
_SYNC_WRITES = ["create", "update", "patch", "delete"]

# What a bootstrap token (vmferry.bootstrap_token) may do: ask for a node certificate and
# read the answer, as Kubernetes' system:node-bootstrapper.
NODE_BOOTSTRAPPER_ROLE = "system:node-bootstrapper"
_CSR_GROUP, _CSRS = _resource_of("CertificateSigningRequest")
# Every authenticated user may ask for a renewal of its own certificate and read the
# answer (`vmferry certificate renew`); the API refuses a request for another identity
# (controller/csr_signer.py) and an administrator approves a user's.
SELF_RENEWER_ROLE = "vmferry:certificate-self-renewer"

BUILTIN_CLUSTER_ROLES: list[Obj] = [
    _cluster_role(
        "cluster-admin", [_rule(["*"], ["*"], ["*"]), {"nonResourceURLs": ["*"], "verbs": ["*"]}]
    ),
    # Kubernetes' system:monitoring: scrape /metrics and read the health endpoints.
    _cluster_role(
        MONITORING_ROLE,
        [{"nonResourceURLs": ["/metrics", "/healthz", "/readyz", "/livez"], "verbs": ["get"]}],
    ),
    _cluster_role(NODE_BOOTSTRAPPER_ROLE, [_rule([_CSR_GROUP], [_CSRS], ["create", *READ_VERBS])]),
    _cluster_role(SELF_RENEWER_ROLE, [_rule([_CSR_GROUP], [_CSRS], ["create", "get"])]),
    _cluster_role("admin", [], aggregate_to=("admin",)),
    _cluster_role("edit", [], labels=_aggregate_to("admin"), aggregate_to=("edit",)),
    _cluster_role("view", [], labels=_aggregate_to("edit"), aggregate_to=("view",)),
    _cluster_role(
        "system:aggregate-to-admin",
        [
            _rule([RBAC_GROUP], ["rolebindings", "roles"], ALL_VERBS),
            _rule([""], ["secrets"], ALL_VERBS),
        ],
        labels=_aggregate_to("admin"),
    ),
    _cluster_role(
        "system:aggregate-to-edit",
        [
            _rule(
                [""],
                ["configmaps", "serviceaccounts", "secrets", "persistentvolumeclaims"],
                ALL_VERBS,
            ),
            # As Kubernetes' bootstrap policy: edit may request a service account's token.
            _rule([""], ["serviceaccounts/token"], ["create"]),
        ],
        labels=_aggregate_to("edit"),
    ),
    _cluster_role(
        "system:aggregate-to-view",
        [
            _rule([""], ["configmaps", "serviceaccounts", "persistentvolumeclaims"], READ_VERBS),
            _rule([""], ["namespaces"], READ_VERBS),
            _rule([""], ["pods"], READ_VERBS),
            _rule([""], ["events"], READ_VERBS),  # as Kubernetes' view: what happened
        ],
        labels=_aggregate_to("view"),
    ),
    # KubeVirt's roles. Since 4.19 admin/edit may read migrations but not make them.
    _cluster_role(
        "kubevirt.io:admin",
        [_rule([KUBEVIRT_GROUP], VMS, ALL_VERBS), _rule([KUBEVIRT_GROUP], VMIMS, READ_VERBS)],
        labels=_aggregate_to("admin"),
    ),
    _cluster_role(
        "kubevirt.io:edit",
        [_rule([KUBEVIRT_GROUP], VMS, ALL_VERBS), _rule([KUBEVIRT_GROUP], VMIMS, READ_VERBS)],
        labels=_aggregate_to("edit"),
    ),
    _cluster_role(
        "kubevirt.io:view",
        [_rule([KUBEVIRT_GROUP], [*VMS, *VMIMS], READ_VERBS)],
        labels=_aggregate_to("view"),
    ),
    _cluster_role(
        MIGRATE_ROLE,
        [
            _rule(
                [KUBEVIRT_GROUP],
                VMIMS,
                ["create", "delete", "update", "patch", "get", "list", "watch"],
            ),
            _rule(["subresources.kubevirt.io"], ["virtualmachines/migrate"], ["update"]),
        ],
    ),
    _cluster_role(
        SYNC_CONTROLLER_ROLE,
        [
            _rule(
                [KUBEVIRT_GROUP],
                [*VMS, *VMIMS, *(f"{r}/status" for r in (*VMS, *VMIMS))],
                [*READ_VERBS, *_SYNC_WRITES],
            ),
            _rule([""], ["nodes", "namespaces", "configmaps", "pods"], READ_VERBS),
            _rule([""], ["secrets"], [*READ_VERBS, *_SYNC_WRITES]),
            _rule([_LEASE_GROUP], [_LEASES], [*READ_VERBS, *_SYNC_WRITES]),
            _rule([""], ["events"], [*READ_VERBS, "create", "update", "patch"]),
            _rule([_HCO_GROUP], [_HCOS], READ_VERBS),
            # renewing its own certificate (vmferry/cert_request.py)
            _rule([_CSR_GROUP], [_CSRS], ["create", "get"]),
            _rule([_HCO_GROUP], [f"{_HCOS}/status"], ["get", "update", "patch"]),
            _rule([_NAD_GROUP], [_NADS], READ_VERBS),
            _rule([_POLICY_GROUP], [_POLICIES], READ_VERBS),
        ],
    ),
]

BUILTIN_CLUSTER_ROLE_BINDINGS: list[Obj] = [
    {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": MONITORING_ROLE,
            "labels": {BOOTSTRAP_LABEL: "rbac-defaults"},
            "annotations": {AUTOUPDATE_ANNOTATION: "true"},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": MONITORING_ROLE},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": MONITORING_GROUP}],
    },
    {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": "cluster-admin",
            "labels": {BOOTSTRAP_LABEL: "rbac-defaults"},
            "annotations": {AUTOUPDATE_ANNOTATION: "true"},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": MASTERS_GROUP}],
    },
    {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": SYNC_CONTROLLER_ROLE,
            "labels": {BOOTSTRAP_LABEL: "rbac-defaults"},
            "annotations": {AUTOUPDATE_ANNOTATION: "true"},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": SYNC_CONTROLLER_ROLE},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "User", "name": SYNC_IDENTITY}],
    },
    {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": NODE_BOOTSTRAPPER_ROLE,
            "labels": {BOOTSTRAP_LABEL: "rbac-defaults"},
            "annotations": {AUTOUPDATE_ANNOTATION: "true"},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": NODE_BOOTSTRAPPER_ROLE},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": BOOTSTRAPPERS_GROUP}],
    },
    {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": SELF_RENEWER_ROLE,
            "labels": {BOOTSTRAP_LABEL: "rbac-defaults"},
            "annotations": {AUTOUPDATE_ANNOTATION: "true"},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": SELF_RENEWER_ROLE},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": "system:authenticated"}],
    },
]


def reconcile_builtin(existing: Obj, expected: Obj) -> Obj | None:
    """The updated object for a built-in that already exists, or None when nothing changes.

    Like the API server's bootstrap reconciliation: unless annotated
    ``rbac.authorization.kubernetes.io/autoupdate: "false"``, missing labels, annotations,
    rules, selectors and subjects are added; whatever the administrator added is kept
    (their label values win, so ``label --overwrite`` sticks across restarts).
    """
    meta = existing["metadata"]
    if (meta.get("annotations") or {}).get(AUTOUPDATE_ANNOTATION) == "false":
        return None
    updated = copy.deepcopy(existing)
    umeta = updated["metadata"]
    for key in ("labels", "annotations"):
        merged = {**(expected["metadata"].get(key) or {}), **(meta.get(key) or {})}
        if merged:
            umeta[key] = merged
    if expected["kind"] == "ClusterRole":
        if "aggregationRule" in expected:
            have = (updated.get("aggregationRule") or {}).get("clusterRoleSelectors") or []
            for selector in expected["aggregationRule"]["clusterRoleSelectors"]:
                if selector not in have:
                    have.append(selector)
            updated["aggregationRule"] = {"clusterRoleSelectors": have}
        else:
            rules = list(updated.get("rules") or [])
            for rule in expected["rules"]:
                if uncovered(rules, [rule]):
                    rules.append(rule)
            updated["rules"] = rules
    else:
        subjects = list(updated.get("subjects") or [])
        for subject in expected["subjects"]:
            if subject not in subjects:
                subjects.append(subject)
        updated["subjects"] = subjects
        updated["roleRef"] = expected["roleRef"]
    return None if updated == existing else updated


async def bootstrap_rbac(store: Store) -> None:
    """Create or reconcile the built-in ClusterRoles and ClusterRoleBindings."""
    for expected in [*BUILTIN_CLUSTER_ROLES, *BUILTIN_CLUSTER_ROLE_BINDINGS]:
        name = expected["metadata"]["name"]
        try:
            existing = await store.get(expected["kind"], "", name)
        except NotFound:
            await store.create(copy.deepcopy(expected))
            continue
        updated = reconcile_builtin(existing, expected)
        if updated is not None:
            await store.update(updated)
