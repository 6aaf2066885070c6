"""The node authorizer (issue 26): a node may write only what is bound to it now.

Every kind and verb with a node identity; a VMI and its VMIM before, during and after a
migration node1 -> node2 (pre-copy completed, failed, aborted; post-copy failed); the
controller's Node annotation; the stream-token Secret while the migration is in flight.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller import migration_token, rbac
from controller.api import NodeAuthorizer, node_binding
from vmferry import pki
from vmferry.migration_network import ASSIGNMENT_ANNOTATION
from vmferry.migration_state import TOKEN_SECRET_NAMESPACE, Field, MigrationMode, Switchover
from vmferry.objects import kinds

Obj = dict[str, Any]
NODES = ("node1", "node2", "node3")
READ = ("get", "list", "watch")
WRITE = ("create", "update", "patch", "delete")
VMI = "VirtualMachineInstance"
VMIM = "VirtualMachineInstanceMigration"

authz = NodeAuthorizer()


def who(node: str) -> pki.Identity:
    return pki.Identity(f"{pki.NODE_USER_PREFIX}{node}", (pki.NODES_GROUP,))


def allowed(
    node: str,
    verb: str,
    kind: str,
    current: Obj | None,
    name: str = "x",
    ns: str = "default",
    new: Obj | None = None,
    migration: Obj | None = None,
    subresource: str = "",
) -> bool:
    identity = who(node)
    request = rbac.request_for(
        identity.user, identity.groups, verb, kinds.by_kind(kind), ns, name, subresource
    )
    return authz.check(identity, request, current, new, migration).allowed


def vmi(node_name: str = "node1", phase: str = "Running", **ms: Any) -> Obj:
    status: Obj = {"phase": phase, "nodeName": node_name}
    if ms:
        status["migrationState"] = ms
    return {"kind": VMI, "metadata": {"name": "vm-a", "namespace": "default"}, "status": status}


HANDOFF: Obj = {Field.MIGRATION_UID: "m1", Field.SOURCE_NODE: "node1", Field.TARGET_NODE: "node2"}


def writers(obj: Obj) -> set[str]:
    """The nodes that may update and patch ``obj`` (both verbs, and the status too)."""
    out = set()
    for node in NODES:
        verdicts = {
            allowed(node, verb, obj["kind"], obj, subresource=sub)
            for verb in ("update", "patch")
            for sub in ("", "status")
        }
        assert len(verdicts) == 1, (node, obj)
        if verdicts.pop():
            out.add(node)
        assert not allowed(node, "delete", obj["kind"], obj)
        assert not allowed(node, "create", obj["kind"], None)
    return out


@pytest.mark.timeout(10)
def test_every_kind_and_verb_with_a_node_identity() -> None:
    """Reads: everything but Secrets. Writes: only its own Node, the VMIs bound to it, and
    new certificate requests (its own renewal; the API refuses one for another name)."""
    for kind in kinds.KINDS:
        for verb in READ:
            assert allowed("node1", verb, kind.kind, None) == (kind.kind != "Secret"), (
                verb,
                kind.kind,
            )
        for verb in WRITE:
            current = vmi("node1") if kind.kind == VMI else {"kind": kind.kind, "metadata": {}}
            own = "node1" if kind.kind == "Node" else "x"
            expected = (
                (kind.kind == "Node" and verb != "delete")
                or (kind.kind == VMI and verb in ("update", "patch"))
                or (kind.kind == "CertificateSigningRequest" and verb == "create")
            )
            assert allowed("node1", verb, kind.kind, current, name=own) == expected, (
                verb,
                kind.kind,
            )
    assert not allowed("node1", "patch", "Node", {"kind": "Node"}, name="node2")
    assert not allowed("node1", "create", "Node", None, name="node2")


@pytest.mark.timeout(10)
def test_a_vmi_is_writable_only_by_the_nodes_bound_to_it_now() -> None:
    # Before: it runs on node1.
    assert writers(vmi("node1")) == {"node1"}
    # During: the hand-off names both nodes, through every step up to the record's end.
    assert writers(vmi("node1", **HANDOFF)) == {"node1", "node2"}
    started: Obj = {**HANDOFF, Field.START_TIMESTAMP: "t", Field.MODE: MigrationMode.PRE_COPY}
    assert writers(vmi("node1", **started)) == {"node1", "node2"}
    committed: Obj = {**started, Field.SWITCHOVER: Switchover.COMMITTED}
    assert writers(vmi("node1", **committed)) == {"node1", "node2"}
    # The target resumed and published nodeName; the source's completion is still to come.
    assert writers(vmi("node2", **committed)) == {"node1", "node2"}
    # After: completed. Only the node it runs on (issue 26's probe: node1 is refused).
    completed: Obj = {**committed, Field.COMPLETED: True, Field.END_TIMESTAMP: "t"}
    assert writers(vmi("node2", **completed)) == {"node2"}
    # Completed before the target published nodeName: the hand-off bound it to node2
    # (its late publication is allowed); the stored nodeName still names node1.
    assert writers(vmi("node1", **completed)) == {"node1", "node2"}
    # Failed before any commit: the VM stayed on node1, node2 has no business with it.
    failed: Obj = {**started, Field.FAILED: True, Field.FAILURE_REASON: "x"}
    assert writers(vmi("node1", **failed)) == {"node1"}
    aborted: Obj = {**failed, Field.SWITCHOVER: Switchover.ABORTED}
    assert writers(vmi("node1", **aborted)) == {"node1"}
    # Post-copy failed: the VM's memory is split; the source marks the VMI lost, until it is.
    lost: Obj = {**committed, Field.MODE: MigrationMode.POST_COPY, Field.FAILED: True}
    assert writers(vmi("node2", **lost)) == {"node1", "node2"}
    assert writers(vmi("node2", phase="Failed", **lost)) == {"node2"}
    # A later migration node2 -> node3 replaces the record: node1 is out for good.
    nxt: Obj = {Field.MIGRATION_UID: "m2", Field.SOURCE_NODE: "node2", Field.TARGET_NODE: "node3"}
    assert writers(vmi("node2", **nxt)) == {"node2", "node3"}
    assert node_binding(vmi("node2", **completed), "node1") is None


@pytest.mark.timeout(10)
def test_a_vmim_is_writable_only_while_its_migration_is_in_flight() -> None:
    def vmim(phase: str, **ms: Any) -> Obj:
        return {"kind": VMIM, "metadata": {}, "status": {"phase": phase, "migrationState": ms}}

    assert writers(vmim("Pending")) == set()
    assert writers(vmim("Running", **HANDOFF)) == {"node1", "node2"}
    assert writers(vmim("Running", **HANDOFF, completed=True)) == set()
    assert writers(vmim("Succeeded", **HANDOFF)) == set()
    assert writers(vmim("Failed", **HANDOFF, failed=True)) == set()


@pytest.mark.timeout(10)
def test_a_node_may_not_set_the_controllers_migration_network_annotation() -> None:
    plain: Obj = {"kind": "Node", "metadata": {"name": "node1", "labels": {"a": "b"}}}
    assigned = copy.deepcopy(plain)
    assigned["metadata"]["annotations"] = {ASSIGNMENT_ANNOTATION: '{"ip": "10.0.0.5"}'}
    relabelled = copy.deepcopy(assigned)
    relabelled["metadata"]["labels"] = {"a": "c"}
    forged = copy.deepcopy(assigned)
    forged["metadata"]["annotations"][ASSIGNMENT_ANNOTATION] = '{"ip": "10.0.0.99"}'

    def may(verb: str, current: Obj | None, new: Obj) -> bool:
        return allowed("node1", verb, "Node", current, name="node1", new=new)

    assert may("create", None, plain)
    assert not may("create", None, assigned)
    assert may("update", assigned, relabelled)  # its labels, the annotation as it was
    assert may("patch", plain, plain)
    assert not may("update", assigned, forged)
    assert not may("patch", plain, assigned)
    assert not may("update", assigned, plain)  # nor remove it
    identity = who("node1")
    request = rbac.request_for(
        identity.user, identity.groups, "patch", kinds.by_kind("Node"), "", "node1"
    )
    assert "migration-network" in authz.check(identity, request, assigned, forged).reason


@pytest.mark.timeout(10)
def test_the_stream_token_is_readable_only_while_the_migration_is_in_flight() -> None:
    secret = migration_token.token_secret("m1", "node1", "node2", "t0k3n")
    name = secret["metadata"]["name"]

    def may(node: str, migration: Obj | None) -> bool:
        return allowed(
            node, "get", "Secret", secret, name=name, ns=TOKEN_SECRET_NAMESPACE, migration=migration
        )

    during = vmi("node1", **HANDOFF)
    assert may("node1", during) and may("node2", during) and not may("node3", during)
    scheduled: Obj = {"kind": VMIM, "metadata": {}, "status": {"phase": "Scheduled"}}
    assert may("node2", scheduled)  # the VMI's record is not written yet
    for ended in (
        vmi("node2", **HANDOFF, completed=True),
        vmi("node1", **HANDOFF, failed=True),
        {"kind": VMIM, "metadata": {}, "status": {"phase": "Succeeded"}},
        None,  # no such migration any more
    ):
        assert not may("node1", ended) and not may("node2", ended), ended
