"""The RBAC evaluator: rule matching, bindings, escalation, aggregation, built-ins, tokens."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

from controller import migration_token, rbac, rbac_builtin
from controller.api import NodeAuthorizer
from controller.authn import TokenSigner
from vmferry import pki
from vmferry.errors import Invalid, Unauthorized
from vmferry.migration_state import TOKEN_MIGRATION_LABEL, TOKEN_SECRET_NAMESPACE, token_secret_name
from vmferry.objects import kinds, schema

Obj = dict[str, Any]
G = rbac.RBAC_GROUP


def binding(
    name: str, role: str, *subjects: Obj, ns: str = "", role_kind: str = "ClusterRole"
) -> Obj:
    meta: Obj = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {
        "apiVersion": rbac.RBAC_API_VERSION,
        "kind": "RoleBinding" if ns else "ClusterRoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": G, "kind": role_kind, "name": role},
        "subjects": list(subjects),
    }


def user(name: str) -> Obj:
    return {"apiGroup": G, "kind": "User", "name": name}


def group(name: str) -> Obj:
    return {"apiGroup": G, "kind": "Group", "name": name}


def role(name: str, *rules: Obj, labels: dict[str, str] | None = None) -> Obj:
    return {
        "apiVersion": rbac.RBAC_API_VERSION,
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels or {}},
        "rules": list(rules),
    }


def builtins_aggregated() -> list[Obj]:
    """The built-in roles with aggregation applied until nothing changes."""
    roles = {r["metadata"]["name"]: copy.deepcopy(r) for r in rbac_builtin.BUILTIN_CLUSTER_ROLES}
    for _ in range(4):
        for r in roles.values():
            if r.get("aggregationRule"):
                r["rules"] = rbac.aggregated_rules(r, roles.values())
    return list(roles.values())


def req(
    who: str, verb: str, kind: str, ns: str = "", name: str = "", groups: tuple[str, ...] = ()
) -> rbac.Request:
    return rbac.request_for(who, groups, verb, kinds.by_kind(kind), ns, name)


VMIM = "VirtualMachineInstanceMigration"


def test_rule_matching_wildcards_subresources_and_names() -> None:
    r = rbac.Request("u", (), "update", "kubevirt.io", "virtualmachines", "migrate", "ns", "vm1")
    assert r.full_resource == "virtualmachines/migrate"
    assert rbac.rule_allows({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, r)
    assert rbac.rule_allows(
        {"apiGroups": ["kubevirt.io"], "resources": ["*/migrate"], "verbs": ["update"]}, r
    )
    assert not rbac.rule_allows(
        {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": ["update"]}, r
    ), "the resource does not grant its subresources"
    named = {
        "apiGroups": ["kubevirt.io"],
        "resources": ["virtualmachines/migrate"],
        "verbs": ["update"],
        "resourceNames": ["vm2"],
    }
    assert not rbac.rule_allows(named, r)
    named["resourceNames"] = ["vm1"]
    assert rbac.rule_allows(named, r)


def test_namespace_binding_grants_only_in_its_namespace() -> None:
    policy = rbac.Policy.of(
        [
            *builtins_aggregated(),
            binding("kvmigrate", "kubevirt.io:migrate", user("alice"), ns="ns1"),
        ]
    )
    assert policy.authorize(req("alice", "create", VMIM, "ns1")).allowed
    denied = policy.authorize(req("alice", "create", VMIM, "ns2"))
    assert not denied.allowed
    assert denied.reason == (
        'User "alice" cannot create resource "virtualmachineinstancemigrations" '
        'in API group "kubevirt.io" in the namespace "ns2"'
    )
    assert not policy.authorize(req("bob", "create", VMIM, "ns1")).allowed


def test_cluster_binding_group_and_masters() -> None:
    policy = rbac.Policy.of(
        [
            *builtins_aggregated(),
            *rbac_builtin.BUILTIN_CLUSTER_ROLE_BINDINGS,
            binding("kvmigrate", "kubevirt.io:migrate", group("migrators")),
        ]
    )
    allowed = policy.authorize(req("carol", "delete", VMIM, "any", groups=("migrators",)))
    assert allowed.allowed and 'ClusterRoleBinding "kvmigrate"' in allowed.reason
    assert policy.authorize(req("root", "create", "Node", groups=(rbac.MASTERS_GROUP,))).allowed
    node_denied = policy.authorize(req("carol", "create", "Node", groups=("migrators",)))
    assert "at the cluster scope" in node_denied.reason


def test_service_account_subject() -> None:
    sa = {"kind": "ServiceAccount", "name": "mtv", "namespace": "tools"}
    policy = rbac.Policy.of([*builtins_aggregated(), binding("mtv", "kubevirt.io:view", sa)])
    who = "system:serviceaccount:tools:mtv"
    assert policy.authorize(req(who, "list", "VirtualMachine", "ns1")).allowed
    assert not policy.authorize(
        req("system:serviceaccount:other:mtv", "list", "VirtualMachine", "ns1")
    ).allowed
    # In a RoleBinding, a ServiceAccount subject without a namespace is the binding's.
    rb = binding("local", "view", {"kind": "ServiceAccount", "name": "bot"}, ns="ns1")
    policy = rbac.Policy.of([*builtins_aggregated(), rb])
    assert policy.authorize(
        req("system:serviceaccount:ns1:bot", "get", "VirtualMachine", "ns1")
    ).allowed


def test_admin_does_not_include_migrate_until_aggregated() -> None:
    """OpenShift Virtualization 4.19+: admin reads migrations but cannot create them."""
    roles = builtins_aggregated()
    admin_binding = binding("owner", "admin", user("dana"), ns="ns1")
    policy = rbac.Policy.of([*roles, admin_binding])
    assert policy.authorize(req("dana", "create", "VirtualMachine", "ns1")).allowed
    assert policy.authorize(req("dana", "list", VMIM, "ns1")).allowed
    assert not policy.authorize(req("dana", "create", VMIM, "ns1")).allowed
    # 12.1.4: label kubevirt.io:migrate aggregate-to-admin=true
    for r in roles:
        if r["metadata"]["name"] == rbac_builtin.MIGRATE_ROLE:
            r["metadata"]["labels"][rbac.AGGREGATE_LABEL.format("admin")] = "true"
    for r in roles:
        if r.get("aggregationRule"):
            r["rules"] = rbac.aggregated_rules(r, roles)
    policy = rbac.Policy.of([*roles, admin_binding])
    assert policy.authorize(req("dana", "create", VMIM, "ns1")).allowed
    # edit is not affected by an aggregate-to-admin label
    policy = rbac.Policy.of([*roles, binding("e", "edit", user("erin"), ns="ns1")])
    assert not policy.authorize(req("erin", "create", VMIM, "ns1")).allowed


def test_aggregation_rule_with_match_expressions() -> None:
    agg = {
        **role("agg"),
        "aggregationRule": {
            "clusterRoleSelectors": [
                {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}
            ]
        },
    }
    a = role(
        "a",
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
        labels={"tier": "a"},
    )
    c = role(
        "c", {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}, labels={"tier": "c"}
    )
    dup = role(
        "a2",
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
        labels={"tier": "b"},
    )
    assert rbac.aggregated_rules(agg, [agg, a, c, dup]) == a["rules"]


def test_escalation_binding_needs_the_permissions_or_bind() -> None:
    roles = builtins_aggregated()
    ns_admin = binding("owner", "admin", user("dana"), ns="ns1")
    policy = rbac.Policy.of([*roles, ns_admin])
    # dana may bind view and edit in ns1 (she holds those permissions there) ...
    assert (
        rbac.escalation_problem(policy, "dana", (), binding("v", "view", user("x"), ns="ns1"))
        is None
    )
    # ... but not kubevirt.io:migrate, nor cluster-admin, nor anything cluster-wide.
    problem = rbac.escalation_problem(
        policy, "dana", (), binding("m", rbac_builtin.MIGRATE_ROLE, user("dana"), ns="ns1")
    )
    assert (
        problem
        and "not currently held" in problem
        and "virtualmachineinstancemigrations" in problem
    )
    assert rbac.escalation_problem(
        policy, "dana", (), binding("root", "cluster-admin", user("dana"))
    )
    # a role that does not exist needs "bind"
    missing = rbac.escalation_problem(
        policy, "dana", (), binding("x", "nope", user("dana"), ns="ns1")
    )
    assert missing and "not found" in missing
    # the bind verb on that very role is enough
    binder = role(
        "binder",
        {
            "apiGroups": [G],
            "resources": ["clusterroles"],
            "verbs": ["bind"],
            "resourceNames": [rbac_builtin.MIGRATE_ROLE],
        },
    )
    policy = rbac.Policy.of([*roles, ns_admin, binder, binding("b", "binder", user("dana"))])
    assert (
        rbac.escalation_problem(
            policy, "dana", (), binding("m", rbac_builtin.MIGRATE_ROLE, user("dana"), ns="ns1")
        )
        is None
    )


def test_escalation_roles_need_the_rules_or_escalate() -> None:
    roles = builtins_aggregated()
    policy = rbac.Policy.of([*roles, binding("e", "kubevirt.io:edit", user("erin"))])
    small = role(
        "vm-reader",
        {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": ["get"]},
    )
    assert rbac.escalation_problem(policy, "erin", (), small) is None
    big = role("everything", {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]})
    assert rbac.escalation_problem(policy, "erin", (), big)
    aggregated = {
        **small,
        "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"x": "y"}}]},
    }
    problem = rbac.escalation_problem(policy, "erin", (), aggregated)
    assert problem and "aggregationRule" in problem
    root = rbac.Policy.of([*roles, *rbac_builtin.BUILTIN_CLUSTER_ROLE_BINDINGS])
    assert rbac.escalation_problem(root, "admin", (rbac.MASTERS_GROUP,), big) is None
    assert rbac.escalation_problem(root, "admin", (rbac.MASTERS_GROUP,), aggregated) is None


def test_wildcards_are_covered_only_by_wildcards() -> None:
    owner = [
        {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": rbac.ALL_VERBS}
    ]
    star = [{"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": ["*"]}]
    assert rbac.uncovered(owner, star)
    assert not rbac.uncovered(star, owner)


def test_reconcile_builtin_keeps_administrator_changes() -> None:
    expected = next(
        r
        for r in rbac_builtin.BUILTIN_CLUSTER_ROLES
        if r["metadata"]["name"] == rbac_builtin.MIGRATE_ROLE
    )
    existing = {**expected, "metadata": {**expected["metadata"], "uid": "u1"}}
    existing["metadata"]["labels"] = {
        **expected["metadata"]["labels"],
        rbac.AGGREGATE_LABEL.format("admin"): "true",
    }
    assert rbac_builtin.reconcile_builtin(existing, expected) is None
    stripped = {**existing, "rules": existing["rules"][:1]}
    updated = rbac_builtin.reconcile_builtin(stripped, expected)
    assert updated is not None and len(updated["rules"]) == 2
    assert updated["metadata"]["labels"][rbac.AGGREGATE_LABEL.format("admin")] == "true"
    pinned = {
        **stripped,
        "metadata": {**stripped["metadata"], "annotations": {rbac.AUTOUPDATE_ANNOTATION: "false"}},
    }
    assert rbac_builtin.reconcile_builtin(pinned, expected) is None


def test_builtins_validate_and_rbac_names_allow_colons() -> None:
    for obj in [*rbac_builtin.BUILTIN_CLUSTER_ROLES, *rbac_builtin.BUILTIN_CLUSTER_ROLE_BINDINGS]:
        schema.validate(obj)
    with pytest.raises(Invalid, match=r"metadata\.name"):
        schema.validate(role("a/b"))
    with pytest.raises(Invalid, match=r"roleRef.kind"):
        schema.validate(
            {
                **binding("x", "y", user("u")),
                "roleRef": {"apiGroup": G, "kind": "Thing", "name": "y"},
            }
        )


def test_secret_string_data_becomes_data() -> None:
    secret = schema.apply_defaults(
        schema.validate(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s", "namespace": "d"},
                "stringData": {"a": "hi"},
            }
        )
    )
    assert secret["data"] == {"a": base64.b64encode(b"hi").decode()} and secret["type"] == "Opaque"
    with pytest.raises(Invalid, match=r"data\.a"):
        schema.validate(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s"},
                "data": {"a": "not base64!"},
            }
        )


def test_token_signature_and_binding_to_secret_and_account() -> None:
    signer = TokenSigner(b"k" * 32)
    secret = {"metadata": {"name": "tok", "uid": "s-uid"}}
    account = {"metadata": {"name": "mtv", "uid": "a-uid"}}
    token = signer.issue("tools", secret, account)
    claims = signer.claims(token)
    assert claims["sub"] == "system:serviceaccount:tools:mtv"
    assert signer.valid_for(token, secret, account)
    assert not signer.valid_for(token, {"metadata": {"uid": "other"}}, account)
    with pytest.raises(Unauthorized, match="signature"):
        TokenSigner(b"x" * 32).claims(token)
    head, _, sig = token.split(".")
    forged_body = (
        base64.urlsafe_b64encode(b'{"iss":"vmferry/serviceaccount","sub":"root"}')
        .decode()
        .rstrip("=")
    )
    with pytest.raises(Unauthorized):
        signer.claims(f"{head}.{forged_body}.{sig}")
    with pytest.raises(Unauthorized):
        signer.claims("garbage")


def test_cli_builds_bindings_like_kubectl() -> None:
    import argparse

    from vmferry.cli import rbac_cmd

    def args(*argv: str) -> argparse.Namespace:
        p = argparse.ArgumentParser()
        p.add_argument("-f", "--filename", action="append")
        p.add_argument("--dry-run", action="store_true")
        rbac_cmd.add_create_arguments(p)
        return p.parse_args(argv)

    rb = rbac_cmd.build_object(
        args(
            "rolebinding",
            "kvmigrate",
            "--clusterrole=kubevirt.io:migrate",
            "--user=a",
            "--user=b",
            "--group=g",
            "--serviceaccount=ns2:bot",
        ),
        "ns1",
    )
    assert rb["metadata"] == {"name": "kvmigrate", "namespace": "ns1"}
    assert [s["name"] for s in rb["subjects"]] == ["a", "b", "g", "bot"]
    assert rb["subjects"][3] == {"kind": "ServiceAccount", "name": "bot", "namespace": "ns2"}
    schema.validate(rb)
    crb = rbac_cmd.build_object(args("clusterrolebinding", "x", "--clusterrole=view"), "ns1")
    assert "namespace" not in crb["metadata"]
    with pytest.raises(rbac_cmd.UsageError, match="namespace>:<name"):
        rbac_cmd.build_object(
            args("clusterrolebinding", "x", "--clusterrole=v", "--serviceaccount=bot"), "d"
        )
    with pytest.raises(rbac_cmd.UsageError, match="exactly one"):
        rbac_cmd.build_object(args("rolebinding", "x"), "d")
    sa = rbac_cmd.build_object(args("sa", "mtv"), "tools")
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["namespace"] == "tools"


def test_view_and_edit_grant_no_secrets_outside_their_namespace() -> None:
    """The migration token Secret lives in the system namespace: a namespace's viewer
    reads no Secret at all, and its admin none outside that namespace."""
    roles = builtins_aggregated()
    policy = rbac.Policy.of(
        [
            *roles,
            binding("v", "view", user("vera"), ns="ns1"),
            binding("a", "admin", user("adam"), ns="ns1"),
        ]
    )
    secret_name = token_secret_name("some-uid")
    for verb in ("get", "list", "watch"):
        assert not policy.authorize(req("vera", verb, "Secret", "ns1")).allowed
        assert not policy.authorize(
            req("vera", verb, "Secret", TOKEN_SECRET_NAMESPACE, secret_name)
        ).allowed
        assert not policy.authorize(
            req("adam", verb, "Secret", TOKEN_SECRET_NAMESPACE, secret_name)
        ).allowed
    assert policy.authorize(req("adam", "get", "Secret", "ns1")).allowed  # their own
    assert policy.authorize(req("vera", "get", "VirtualMachineInstance", "ns1")).allowed


def node_identity(name: str) -> pki.Identity:
    return pki.Identity(f"{pki.NODE_USER_PREFIX}{name}", (pki.NODES_GROUP,))


def test_node_authorizer_lets_only_the_two_nodes_get_a_token_secret() -> None:
    authz = NodeAuthorizer()
    secret = migration_token.token_secret("uid-1", "node1", "node2", "t0k3n")
    name = secret["metadata"]["name"]

    in_flight = {
        "kind": "VirtualMachineInstance",
        "status": {"migrationState": {"migrationUid": "uid-1", "sourceNode": "node1"}},
    }

    def decide(
        node: str,
        verb: str,
        current: Obj | None,
        secret_name: str = name,
        migration: Obj = in_flight,
    ) -> bool:
        who = node_identity(node)
        request = rbac.request_for(
            who.user, who.groups, verb, kinds.by_kind("Secret"), TOKEN_SECRET_NAMESPACE, secret_name
        )
        return authz.check(who, request, current, migration=migration).allowed

    assert decide("node1", "get", secret) and decide("node2", "get", secret)
    assert not decide("node3", "get", secret)
    assert not decide("node1", "list", None, "") and not decide("node1", "watch", None, "")
    assert decide("node3", "get", None)  # gone (migration ended): the get says NotFound
    # A Secret that is not a migration token, even labelled so, stays closed.
    other = copy.deepcopy(secret)
    other["metadata"]["name"] = "cluster-credentials"
    assert not decide("node1", "get", other, "cluster-credentials")
    forged = copy.deepcopy(secret)
    forged["metadata"]["labels"][TOKEN_MIGRATION_LABEL] = "uid-2"  # names another Secret
    assert not decide("node1", "get", forged)
    for verb in ("update", "patch", "delete", "create"):
        assert not decide("node1", verb, secret)
