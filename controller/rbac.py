"""Kubernetes RBAC for vmferry: rule matching, the authorizer, escalation checks and
aggregation (DESIGN §4, reference 12.1.2 to 12.1.4).

Semantics follow ``k8s.io/kubernetes/plugin/pkg/auth/authorizer/rbac``:

- A request (user, groups, verb, API group, resource[/subresource], namespace, name) is
  allowed when a rule of a role bound to the user allows it; nothing denies. Cluster-wide
  grants come from ClusterRoleBindings; a RoleBinding grants its ClusterRole (or Role)
  only inside its own namespace.
- A rule matches when its ``verbs``, ``apiGroups`` and ``resources`` contain the request's
  (or ``*``) and ``resourceNames`` is empty or names the object. ``resources`` name
  subresources as ``virtualmachines/migrate``; ``*`` matches every resource and every
  subresource, ``*/status`` one subresource of every resource.
- Escalation prevention: whoever creates or updates a role must already hold every
  permission it grants (or the ``escalate`` verb on it); whoever binds a role must hold
  its permissions (or the ``bind`` verb on it). An aggregated ClusterRole
  (``aggregationRule``) needs full authority (``*`` on ``*``) or ``escalate``.

Node identities are not decided here: ``controller.api`` keeps the node authorizer
(a node changes only its own Node and the VMIs/VMIMs its migrations involve, and reads
no Secret but the stream token of its own migrations).

The built-in roles and their bootstrap: ``controller.rbac_builtin``.

About ``virtualmachines/migrate``: KubeVirt's ``virtctl migrate`` calls that subresource
and virt-api creates the migration on the caller's behalf. vmferry serves no such
subresource: ``vmferry migrate`` creates the VirtualMachineInstanceMigration itself and is
authorized as ``create virtualmachineinstancemigrations``. Rules naming
``virtualmachines/migrate`` are accepted and stored (the built-in ``kubevirt.io:migrate``
carries the reference's rule) but grant nothing else in vmferry.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.store import Store
from vmferry.errors import Forbidden
from vmferry.objects import kinds
from vmferry.objects.labels import Selector

Obj = dict[str, Any]

RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_API_VERSION = f"{RBAC_GROUP}/v1"
AGGREGATE_LABEL = "rbac.authorization.k8s.io/aggregate-to-{}"
AUTOUPDATE_ANNOTATION = "rbac.authorization.kubernetes.io/autoupdate"
BOOTSTRAP_LABEL = "kubernetes.io/bootstrapping"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
MASTERS_GROUP = "system:masters"
AUTHENTICATED_GROUP = "system:authenticated"

READ_VERBS = ["get", "list", "watch"]
WRITE_VERBS = ["create", "update", "patch", "delete", "deletecollection"]
ALL_VERBS = [*READ_VERBS, *WRITE_VERBS]


# ---------------------------------------------------------------------------------------
# Requests and rule matching


@dataclass(frozen=True)
class Request:
    """The attributes RBAC decides on (Kubernetes' ``authorizer.Attributes``)."""

    user: str
    groups: tuple[str, ...]
    verb: str
    api_group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def full_resource(self) -> str:
        """``resource`` or ``resource/subresource``, as rules spell it."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def describe(self) -> str:
        """Kubernetes' denial text: ``User "alice" cannot create resource "x" in API group
        "kubevirt.io" in the namespace "ns1"`` (or ``at the cluster scope``)."""
        where = (
            f' in the namespace "{self.namespace}"' if self.namespace else " at the cluster scope"
        )
        return (
            f'User "{self.user}" cannot {self.verb} resource "{self.full_resource}" '
            f'in API group "{self.api_group}"{where}'
        )


def request_for(
    user: str,
    groups: Sequence[str],
    verb: str,
    kind: kinds.Kind,
    namespace: str = "",
    name: str = "",
    subresource: str = "",
) -> Request:
    """Build the Request of an API call on ``kind``."""
    return Request(
        user=user,
        groups=tuple(groups),
        verb=verb,
        api_group=kind.group,
        resource=kind.plural,
        subresource=subresource,
        namespace=namespace if kind.namespaced else "",
        name=name,
    )


def _has(values: Iterable[str] | None, wanted: str) -> bool:
    items = list(values or [])
    return "*" in items or wanted in items


def _resource_matches(resources: Iterable[str] | None, full: str) -> bool:
    """``*`` matches everything; ``*/sub`` matches ``anything/sub``; else exact."""
    sub = full.partition("/")[2]
    for resource in resources or []:
        if resource == "*" or resource == full:
            return True
        if sub and resource == f"*/{sub}":
            return True
    return False


def rule_allows(rule: Obj, request: Request) -> bool:
    """True when one policy rule allows the request (Kubernetes' ``RuleAllows``)."""
    if not _has(rule.get("verbs"), request.verb):
        return False
    if not _has(rule.get("apiGroups"), request.api_group):
        return False
    if not _resource_matches(rule.get("resources"), request.full_resource):
        return False
    names = rule.get("resourceNames") or []
    return not names or request.name in names


def url_matches(patterns: Iterable[str] | None, path: str) -> bool:
    """A rule's ``nonResourceURLs`` against a request path: ``*`` matches every path, a
    pattern ending in ``*`` a prefix, anything else itself (Kubernetes' NonResourceURLMatches)."""
    for pattern in patterns or []:
        if pattern == "*" or pattern == path:
            return True
        if pattern.endswith("*") and path.startswith(pattern[:-1]):
            return True
    return False


def non_resource_rule_allows(rule: Obj, verb: str, path: str) -> bool:
    """True when one policy rule allows ``verb`` on the non-resource URL ``path``."""
    return _has(rule.get("verbs"), verb) and url_matches(rule.get("nonResourceURLs"), path)


def subject_matches(subject: Obj, user: str, groups: Sequence[str], binding_ns: str) -> bool:
    """True when a binding's subject names this user, one of its groups or its account."""
    kind = subject.get("kind")
    name = subject.get("name", "")
    if kind == "User":
        return bool(name == user)
    if kind == "Group":
        return name in groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user == f"{SERVICE_ACCOUNT_PREFIX}{ns}:{name}"
    return False


# ---------------------------------------------------------------------------------------
# The policy: a snapshot of the RBAC objects one decision needs


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass
class Policy:
    """The RBAC objects in force: every ClusterRole and ClusterRoleBinding, and the Roles
    and RoleBindings of the namespaces loaded. Pure: decisions need no I/O."""

    cluster_roles: dict[str, Obj] = field(default_factory=dict)
    cluster_role_bindings: list[Obj] = field(default_factory=list)
    roles: dict[tuple[str, str], Obj] = field(default_factory=dict)
    role_bindings: list[Obj] = field(default_factory=list)

    @classmethod
    def of(cls, objects: Iterable[Obj]) -> Policy:
        """Build a policy from a mixed list of RBAC objects (tests, bootstrap)."""
        policy = cls()
        for obj in objects:
            meta = obj["metadata"]
            if obj["kind"] == "ClusterRole":
                policy.cluster_roles[meta["name"]] = obj
            elif obj["kind"] == "ClusterRoleBinding":
                policy.cluster_role_bindings.append(obj)
            elif obj["kind"] == "Role":
                policy.roles[(meta["namespace"], meta["name"])] = obj
            elif obj["kind"] == "RoleBinding":
                policy.role_bindings.append(obj)
        return policy

    def role_rules(self, role_ref: Obj, namespace: str) -> list[Obj] | None:
        """Rules of the role a binding refers to; None when the role does not exist."""
        if role_ref.get("kind") == "ClusterRole":
            role = self.cluster_roles.get(role_ref.get("name", ""))
        else:
            role = self.roles.get((namespace, role_ref.get("name", "")))
        if role is None:
            return None
        return list(role.get("rules") or [])

    def grants(self, user: str, groups: Sequence[str], namespace: str) -> Iterable[tuple[Obj, str]]:
        """Yield (rule, "how it was granted") for every rule the user holds in
        ``namespace`` ("" = cluster-wide grants only)."""
        for binding in self.cluster_role_bindings:
            if any(subject_matches(s, user, groups, "") for s in binding.get("subjects") or []):
                ref = binding["roleRef"]
                for rule in self.role_rules(ref, "") or []:
                    yield (
                        rule,
                        (
                            f'ClusterRoleBinding "{binding["metadata"]["name"]}" of '
                            f'ClusterRole "{ref.get("name")}"'
                        ),
                    )
        if not namespace:
            return
        for binding in self.role_bindings:
            bns = binding["metadata"].get("namespace", "")
            if bns != namespace:
                continue
            if any(subject_matches(s, user, groups, bns) for s in binding.get("subjects") or []):
                ref = binding["roleRef"]
                for rule in self.role_rules(ref, bns) or []:
                    yield (
                        rule,
                        (
                            f'RoleBinding "{binding["metadata"]["name"]}/{bns}" of '
                            f'{ref.get("kind")} "{ref.get("name")}"'
                        ),
                    )

    def rules_of(self, user: str, groups: Sequence[str], namespace: str) -> list[Obj]:
        return [rule for rule, _ in self.grants(user, groups, namespace)]

    def authorize(self, request: Request) -> Decision:
        """Allow when any granted rule allows; the reason names the grant or the lack."""
        for rule, how in self.grants(request.user, request.groups, request.namespace):
            if rule_allows(rule, request):
                return Decision(True, f"RBAC: allowed by {how} to {_who(request)}")
        return Decision(False, request.describe())

    def authorize_non_resource(
        self, user: str, groups: Sequence[str], verb: str, path: str
    ) -> Decision:
        """A request on a non-resource URL (``get /metrics``): only cluster-wide grants
        (ClusterRoleBindings) count, as in Kubernetes."""
        for rule, how in self.grants(user, groups, ""):
            if non_resource_rule_allows(rule, verb, path):
                return Decision(True, f'RBAC: allowed by {how} to User "{user}"')
        return Decision(False, f'User "{user}" cannot {verb} path "{path}"')


def _who(request: Request) -> str:
    if request.user.startswith(SERVICE_ACCOUNT_PREFIX):
        ns, _, name = request.user[len(SERVICE_ACCOUNT_PREFIX) :].partition(":")
        return f'ServiceAccount "{name}/{ns}"'
    return f'User "{request.user}"'


async def load_policy(store: Store, namespace: str = "") -> Policy:
    """Read the RBAC objects a decision in ``namespace`` needs, straight from the store
    (so a binding is in force as soon as its create returns)."""
    policy = Policy()
    roles, _ = await store.list("ClusterRole", "")
    policy.cluster_roles = {r["metadata"]["name"]: r for r in roles}
    policy.cluster_role_bindings, _ = await store.list("ClusterRoleBinding", "")
    if namespace:
        ns_roles, _ = await store.list("Role", namespace)
        policy.roles = {(namespace, r["metadata"]["name"]): r for r in ns_roles}
        policy.role_bindings, _ = await store.list("RoleBinding", namespace)
    return policy


# ---------------------------------------------------------------------------------------
# Escalation prevention


def _atomic(rules: Iterable[Obj]) -> list[Obj]:
    """Break rules into one (group, resource, verb, name) each (Kubernetes' BreakdownRule)."""
    out: list[Obj] = []
    for rule in rules:
        names = rule.get("resourceNames") or [""]
        for group in rule.get("apiGroups") or [""]:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    for name in names:
                        atom: Obj = {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
                        if name:
                            atom["resourceNames"] = [name]
                        out.append(atom)
        for url in rule.get("nonResourceURLs") or []:
            for verb in rule.get("verbs") or []:
                out.append({"nonResourceURLs": [url], "verbs": [verb]})
    return out


def _covers(owner: Obj, atom: Obj) -> bool:
    """True when the owner's rule holds the single permission ``atom``. A wildcard is
    covered only by a wildcard: ``*`` verbs need an owner rule with ``*`` verbs."""
    if "nonResourceURLs" in atom:
        return _has(owner.get("verbs"), atom["verbs"][0]) and url_matches(
            owner.get("nonResourceURLs"), atom["nonResourceURLs"][0]
        )
    verb, group, resource = atom["verbs"][0], atom["apiGroups"][0], atom["resources"][0]
    if not _has(owner.get("verbs"), verb) or not _has(owner.get("apiGroups"), group):
        return False
    if not _resource_matches(owner.get("resources"), resource):
        return False
    owner_names = owner.get("resourceNames") or []
    if not owner_names:
        return True
    names = atom.get("resourceNames") or []
    return bool(names) and names[0] in owner_names


def uncovered(owner_rules: Sequence[Obj], requested: Iterable[Obj]) -> list[Obj]:
    """The single permissions of ``requested`` that no rule of ``owner_rules`` holds."""
    return [atom for atom in _atomic(requested) if not any(_covers(o, atom) for o in owner_rules)]


def _format_rule(rule: Obj) -> str:
    if "nonResourceURLs" in rule and not rule.get("resources"):
        urls, verbs = json.dumps(rule["nonResourceURLs"]), json.dumps(rule["verbs"])
        return "{NonResourceURLs:" + urls + ", Verbs:" + verbs + "}"
    text = (
        f"APIGroups:{json.dumps(rule['apiGroups'])}, Resources:{json.dumps(rule['resources'])}, "
        f"Verbs:{json.dumps(rule['verbs'])}"
    )
    if rule.get("resourceNames"):
        text += f", ResourceNames:{json.dumps(rule['resourceNames'])}"
    return "{" + text + "}"


def _format_rules(rules: Sequence[Obj], limit: int = 10) -> str:
    shown = [_format_rule(r) for r in rules[:limit]]
    if len(rules) > limit:
        shown.append(f"... and {len(rules) - limit} more")
    return "\n".join(shown)


FULL_AUTHORITY = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]


def escalation_problem(policy: Policy, user: str, groups: Sequence[str], obj: Obj) -> str | None:
    """Why creating/updating the RBAC object ``obj`` would escalate the user's privileges,
    or None when it is allowed. ``policy`` must include ``obj``'s namespace."""
    kind = obj["kind"]
    meta = obj["metadata"]
    name = meta.get("name", "")
    ns = meta.get("namespace", "") if kind in ("Role", "RoleBinding") else ""
    resource = kinds.by_kind(kind).resource
    held = policy.rules_of(user, groups, ns)
    groups_text = " ".join(json.dumps(g) for g in groups)
    prefix = f'{resource} "{name}" is forbidden: user "{user}" (groups=[{groups_text}])'

    def may(verb: str, role_kind: str, role_name: str) -> bool:
        plural = "clusterroles" if role_kind == "ClusterRole" else "roles"
        request = Request(user, tuple(groups), verb, RBAC_GROUP, plural, "", ns, role_name)
        return any(rule_allows(rule, request) for rule in held)

    if kind in ("ClusterRole", "Role"):
        if may("escalate", kind, name):
            return None
        if kind == "ClusterRole" and obj.get("aggregationRule"):
            if uncovered(held, FULL_AUTHORITY):
                return (
                    f"{prefix} must have cluster-admin privileges to use the aggregationRule "
                    f'(or the "escalate" verb on clusterroles)'
                )
            return None
        missing = uncovered(held, obj.get("rules") or [])
        if missing:
            return (
                f"{prefix} is attempting to grant RBAC permissions not currently held:\n"
                f"{_format_rules(missing)}"
            )
        return None

    ref = obj.get("roleRef") or {}
    ref_kind, ref_name = ref.get("kind", ""), ref.get("name", "")
    if may("bind", ref_kind, ref_name):
        return None
    rules = policy.role_rules(ref, ns)
    if rules is None:
        return (
            f'{prefix}: {ref_kind.lower()}s "{ref_name}" not found '
            '(binding a role that does not exist needs the "bind" verb on it)'
        )
    missing = uncovered(held, rules)
    if missing:
        return (
            f"{prefix} is attempting to grant RBAC permissions not currently held:\n"
            f"{_format_rules(missing)}"
        )
    return None


async def check_escalation(store: Store, user: str, groups: Sequence[str], obj: Obj) -> None:
    """Raise Forbidden when writing the RBAC object ``obj`` would escalate privileges."""
    if obj.get("kind") not in ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"):
        return
    ns = obj["metadata"].get("namespace", "") if obj["kind"] in ("Role", "RoleBinding") else ""
    problem = escalation_problem(await load_policy(store, ns), user, groups, obj)
    if problem:
        raise Forbidden(problem)


# ---------------------------------------------------------------------------------------
# Aggregation


def aggregated_rules(role: Obj, cluster_roles: Iterable[Obj]) -> list[Obj]:
    """The rules of every other ClusterRole matched by ``role``'s aggregationRule, in name
    order, duplicates dropped (what kube-controller-manager's aggregator writes)."""
    selectors = [
        Selector.from_label_selector(s)
        for s in (role.get("aggregationRule") or {}).get("clusterRoleSelectors") or []
    ]
    own = role["metadata"]["name"]
    rules: list[Obj] = []
    seen: set[str] = set()
    for other in sorted(cluster_roles, key=lambda r: r["metadata"]["name"]):
        if other["metadata"]["name"] == own:
            continue
        labels = other["metadata"].get("labels") or {}
        if not any(sel.matches(labels) for sel in selectors):
            continue
        for rule in other.get("rules") or []:
            key = json.dumps(rule, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rules.append(copy.deepcopy(rule))
    return rules
