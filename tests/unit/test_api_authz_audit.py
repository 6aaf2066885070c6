"""The API's authorization path and its audit log (issue 26), over a real Store.

The servicer runs as the controller runs it; only the transport is stood in for: a
call context that carries the caller's identity (what TLS would have verified) or a
bearer token, and a peer address. Covered: a node's write to a VMI it migrated away
(refused after the migration completed), one audit entry per request with the stage
that decided (validation, rbac, escalation, admission), authentication failures with the
reason and the peer, and minting a service-account token through a token Secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller import rbac, rbac_builtin
from controller.admission import Admission
from controller.api import ApiService
from controller.audit import AuditLog
from controller.authn import (
    SA_NAME_ANNOTATION,
    SA_UID_ANNOTATION,
    SERVICE_ACCOUNT_TOKEN_TYPE,
    Authenticator,
    TokenSigner,
)
from controller.store import Store
from vmferry import pki
from vmferry.migration_state import Field, MigrationMode, Switchover
from vmferry.rpc import api_pb2

Obj = dict[str, Any]
NS = "ns1"
PEER = "ipv4:10.9.8.7:41234"
G = rbac.RBAC_GROUP


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Call:
    """What the servicer reads of a gRPC call: metadata, peer, and (if set) who TLS
    verified."""

    def __init__(self, who: pki.Identity | None = None, token: str | None = None) -> None:
        self.who = who
        self.token = token

    def peer(self) -> str:
        return PEER

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    async def abort(self, code: grpc.StatusCode, message: str, **_: Any) -> None:
        raise Refused(code, message)


class CallAuthenticator(Authenticator):
    """The real authenticator, with the certificate's verified identity taken from Call."""

    async def authenticate(self, context: Any) -> pki.Identity:
        if isinstance(context, Call) and context.who is not None and not context.token:
            return context.who
        return await super().authenticate(context)


def user(name: str, *groups: str) -> Call:
    return Call(pki.Identity(name, (*groups, "system:authenticated")))


def node(name: str) -> Call:
    return Call(pki.Identity(f"{pki.NODE_USER_PREFIX}{name}", (pki.NODES_GROUP,)))


ADMIN = user("admin", rbac.MASTERS_GROUP)


class Env:
    def __init__(self, store: Store, api: ApiService, audit_path: Path, signer: TokenSigner):
        self.store = store
        self.api = api
        self.audit_path = audit_path
        self.signer = signer

    def entries(self) -> list[Obj]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    async def create(self, call: Call, obj: Obj) -> Obj:
        reply = await self.api.Create(
            api_pb2.CreateRequest(object_json=json.dumps(obj).encode()),
            call,
        )
        created: Obj = json.loads(reply.object_json)
        return created

    async def patch(
        self, call: Call, kind: str, ns: str, name: str, body: Obj, subresource: str = ""
    ) -> Obj:
        reply = await self.api.Patch(
            api_pb2.PatchRequest(
                ref=api_pb2.ObjectRef(kind=kind, namespace=ns, name=name),
                patch_json=json.dumps(body).encode(),
                type=api_pb2.PATCH_TYPE_MERGE,
                subresource=subresource,
            ),
            call,
        )
        patched: Obj = json.loads(reply.object_json)
        return patched

    async def get(self, call: Call, kind: str, ns: str, name: str) -> Obj:
        reply = await self.api.Get(
            api_pb2.GetRequest(ref=api_pb2.ObjectRef(kind=kind, namespace=ns, name=name)),
            call,
        )
        got: Obj = json.loads(reply.object_json)
        return got


async def open_env(tmp_path: Path) -> Env:
    store = await Store.open(tmp_path / "store.db")
    await rbac_builtin.bootstrap_rbac(store)
    for _ in range(3):  # what the aggregation controller does (transitively)
        roles, _ = await store.list("ClusterRole")
        for role in roles:
            if role.get("aggregationRule"):
                role["rules"] = rbac.aggregated_rules(role, roles)
                await store.update(role)
    await store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    signer = TokenSigner(b"k" * 32)
    audit = AuditLog(tmp_path / "audit.log")
    api = ApiService(
        store, Admission(store), authenticator=CallAuthenticator(store, signer), audit=audit
    )
    return Env(store, api, tmp_path / "audit.log", signer)


def run(tmp_path: Path, body: Callable[[Env], Awaitable[None]]) -> None:
    """Run ``body`` against a fresh API over a fresh store, in its own event loop."""

    async def go() -> None:
        env = await open_env(tmp_path)
        try:
            await body(env)
        finally:
            env.api.audit.close()
            await env.store.close()

    asyncio.run(go())


def rolebinding(name: str, role: str, who: str, kind: str = "ClusterRole") -> Obj:
    return {
        "apiVersion": rbac.RBAC_API_VERSION,
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": NS},
        "roleRef": {"apiGroup": G, "kind": kind, "name": role},
        "subjects": [{"apiGroup": G, "kind": "User", "name": who}],
    }


async def migrated_vmi(env: Env) -> None:
    """vm-a moved node1 -> node2 and the migration completed (issue 26's probe)."""
    await env.create(
        ADMIN,
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm-a", "namespace": NS, "labels": {"app": "a"}},
            "spec": {"domain": {"memory": {"guest": "32Mi"}}},
        },
    )
    ms = {
        Field.MIGRATION_UID: "m1",
        Field.SOURCE_NODE: "node1",
        Field.TARGET_NODE: "node2",
        Field.START_TIMESTAMP: "2026-12-04T00:00:00Z",
        Field.MODE: MigrationMode.PRE_COPY,
        Field.SWITCHOVER: Switchover.COMMITTED,
    }
    status = {"phase": "Running", "nodeName": "node1", "migrationState": ms}
    await env.patch(ADMIN, "VirtualMachineInstance", NS, "vm-a", {"status": status}, "status")


@pytest.mark.timeout(30)
def test_a_node_loses_write_access_to_a_vmi_once_its_migration_completed(tmp_path: Path) -> None:
    run(tmp_path, _test_a_node_loses_write_access_to_a_vmi_once_its_migration_completed)


async def _test_a_node_loses_write_access_to_a_vmi_once_its_migration_completed(env: Env) -> None:
    await migrated_vmi(env)
    vmi = "VirtualMachineInstance"
    # In flight: the target publishes nodeName, the source records the completion.
    await env.patch(node("node2"), vmi, NS, "vm-a", {"status": {"nodeName": "node2"}}, "status")
    done = {"status": {"migrationState": {"completed": True, "endTimestamp": "t"}}}
    await env.patch(node("node1"), vmi, NS, "vm-a", done, "status")
    # After: node1's certificate may not touch it any more.
    for body, sub in (
        ({"metadata": {"labels": {"owned": "by-node1"}}}, ""),
        ({"spec": {"domain": {"memory": {"guest": "128Mi"}}}}, ""),
        ({"status": {"phase": "Failed"}}, "status"),
    ):
        with pytest.raises(Refused) as refused:
            await env.patch(node("node1"), vmi, NS, "vm-a", body, sub)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert 'User "system:node:node1" cannot patch' in refused.value.message
    stored = await env.get(ADMIN, vmi, NS, "vm-a")
    assert stored["status"]["phase"] == "Running" and "owned" not in stored["metadata"]["labels"]
    # node2, where it runs now, may; node3 never could.
    await env.patch(node("node2"), vmi, NS, "vm-a", {"metadata": {"labels": {"n": "2"}}})
    with pytest.raises(Refused):
        await env.patch(node("node3"), vmi, NS, "vm-a", {"metadata": {"labels": {"n": "3"}}})
    denied = [e for e in env.entries() if e["user"] == "system:node:node1" and not e["allowed"]]
    assert len(denied) == 3 and {e["stage"] for e in denied} == {"rbac"}


@pytest.mark.timeout(30)
def test_a_refused_escalation_is_audited_as_denied_at_the_escalation_stage(tmp_path: Path) -> None:
    run(tmp_path, _test_a_refused_escalation_is_audited_as_denied_at_the_escalation_stage)


async def _test_a_refused_escalation_is_audited_as_denied_at_the_escalation_stage(env: Env) -> None:
    await env.create(ADMIN, rolebinding("nsadmin-admin", "admin", "nsadmin"))
    with pytest.raises(Refused) as refused:
        await env.create(user("nsadmin"), rolebinding("esc3", "cluster-admin", "nsadmin"))
    assert "attempting to grant RBAC permissions not currently held" in refused.value.message
    await env.create(user("nsadmin"), rolebinding("viewers", "view", "frank"))
    entries = {e["name"]: e for e in env.entries() if e["user"] == "nsadmin"}
    esc = entries["esc3"]
    assert esc["allowed"] is False and esc["stage"] == "escalation", esc
    assert "not currently held" in esc["reason"] and esc["peer"] == PEER
    assert esc["verb"] == "create" and esc["resource"] == "rolebindings"
    assert entries["viewers"]["allowed"] is True
    assert len([e for e in env.entries() if e["name"] == "esc3"]) == 1  # one entry per request


@pytest.mark.timeout(30)
def test_each_request_is_audited_once_with_the_stage_that_decided(tmp_path: Path) -> None:
    run(tmp_path, _test_each_request_is_audited_once_with_the_stage_that_decided)


async def _test_each_request_is_audited_once_with_the_stage_that_decided(env: Env) -> None:
    vmim: Obj = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "mig", "namespace": NS},
        "spec": {"vmiName": "vm-a"},
    }
    await migrated_vmi(env)
    await env.store.create({**vmim, "status": {"phase": "Running"}})
    # admission: a migration's spec is immutable
    with pytest.raises(Refused):
        await env.patch(
            ADMIN, "VirtualMachineInstanceMigration", NS, "mig", {"spec": {"vmiName": "x"}}
        )
    # validation: not an object / an unknown kind
    with pytest.raises(Refused):
        await env.api.Create(api_pb2.CreateRequest(object_json=b"[1]"), ADMIN)
    with pytest.raises(Refused):
        await env.create(ADMIN, {"kind": "Gadget", "metadata": {"name": "g", "namespace": NS}})
    # rbac: a user with no binding; on a missing object too (Forbidden, not NotFound)
    with pytest.raises(Refused):
        await env.get(user("mallory"), "VirtualMachineInstance", NS, "vm-a")
    with pytest.raises(Refused) as refused:
        await env.patch(user("mallory"), "VirtualMachineInstance", NS, "ghost", {"a": 1})
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    # a stale resourceVersion: allowed by every stage, then the store's Conflict
    with pytest.raises(Refused) as refused:
        await env.api.Patch(
            api_pb2.PatchRequest(
                ref=api_pb2.ObjectRef(kind="VirtualMachineInstance", namespace=NS, name="vm-a"),
                patch_json=b'{"status":{"phase":"Failed"}}',
                type=api_pb2.PATCH_TYPE_MERGE,
                subresource="status",
                resource_version="1",
            ),
            node("node2"),
        )
    assert refused.value.code == grpc.StatusCode.ABORTED, refused.value
    entries = env.entries()
    stale = [e for e in entries if e["user"] == "system:node:node2"]
    assert len(stale) == 1 and stale[0]["allowed"] and stale[0]["stage"] == "admission"
    ghost = [e for e in entries if e["name"] == "ghost"]
    assert len(ghost) == 1 and not ghost[0]["allowed"] and ghost[0]["stage"] == "rbac"
    by = {(e["verb"], e["name"] or e["resource"]): e for e in entries}
    assert by[("patch", "mig")]["stage"] == "admission"
    assert by[("patch", "mig")]["allowed"] is False
    assert "immutable" in by[("patch", "mig")]["reason"]
    assert by[("create", "g")]["stage"] == "validation" and not by[("create", "g")]["allowed"]
    invalid = [e for e in entries if e["stage"] == "validation"]
    assert len(invalid) == 2 and all(e["user"] == "admin" for e in invalid)
    assert by[("get", "vm-a")]["stage"] == "rbac" and not by[("get", "vm-a")]["allowed"]
    ok = by[("create", "vm-a")]
    assert ok["allowed"] and ok["stage"] == "admission"
    assert 'ClusterRoleBinding "cluster-admin"' in ok["reason"]


@pytest.mark.timeout(30)
def test_authentication_failures_are_audited_with_reason_and_peer(tmp_path: Path) -> None:
    run(tmp_path, _test_authentication_failures_are_audited_with_reason_and_peer)


async def _test_authentication_failures_are_audited_with_reason_and_peer(env: Env) -> None:
    account = await env.store.create(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bot", "namespace": NS}}
    )
    secret = await env.store.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": SERVICE_ACCOUNT_TOKEN_TYPE,
            "metadata": {
                "name": "bot-token",
                "namespace": NS,
                "annotations": {SA_NAME_ANNOTATION: "bot"},
            },
        }
    )
    token = env.signer.issue(NS, secret, account)
    secret["data"] = {"token": base64.b64encode(token.encode()).decode()}
    secret["metadata"]["annotations"][SA_UID_ANNOTATION] = account["metadata"]["uid"]
    await env.store.update(secret)
    with pytest.raises(Refused) as refused:  # a valid token: authenticated, RBAC decides
        await env.get(Call(token=token), "ServiceAccount", NS, "bot")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    await env.store.delete("Secret", NS, "bot-token")  # revoked
    for call in (Call(token=token), Call(token="not.a.token"), Call()):
        with pytest.raises(Refused) as refused:
            await env.get(call, "ServiceAccount", NS, "bot")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    failures = [e for e in env.entries() if e["stage"] == "authentication"]
    assert [e["allowed"] for e in failures] == [False, False, False]
    assert all(e["peer"] == PEER and e["user"] == "" for e in failures)
    assert 'secret "ns1/bot-token" holding it was deleted' in failures[0]["reason"]
    assert "the signature does not verify" in failures[1]["reason"]
    assert "no credentials" in failures[2]["reason"]


@pytest.mark.timeout(30)
def test_minting_a_token_secret_needs_create_on_serviceaccounts_token(tmp_path: Path) -> None:
    run(tmp_path, _test_minting_a_token_secret_needs_create_on_serviceaccounts_token)


async def _test_minting_a_token_secret_needs_create_on_serviceaccounts_token(env: Env) -> None:
    await env.store.create(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "root", "namespace": NS},
        }
    )
    secrets_only = {
        "apiVersion": rbac.RBAC_API_VERSION,
        "kind": "Role",
        "metadata": {"name": "secret-writer", "namespace": NS},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get"]}],
    }
    await env.create(ADMIN, secrets_only)
    await env.create(ADMIN, rolebinding("sw", "secret-writer", "sam", kind="Role"))
    await env.create(ADMIN, rolebinding("ed", "edit", "eddie"))

    def token_secret(name: str) -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": SERVICE_ACCOUNT_TOKEN_TYPE,
            "metadata": {
                "name": name,
                "namespace": NS,
                "annotations": {SA_NAME_ANNOTATION: "root"},
            },
        }

    with pytest.raises(Refused) as refused:
        await env.create(user("sam"), token_secret("sam-token"))
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert (
        'User "sam" cannot create resource "serviceaccounts/token" in API group "" '
        'in the namespace "ns1"' in refused.value.message
    )
    assert (await env.store.list("Secret", NS))[0] == []
    # A plain Secret needs no more than create secrets.
    await env.create(user("sam"), {**token_secret("plain"), "type": "Opaque"})
    # edit holds serviceaccounts/token create, as in Kubernetes: it may mint.
    await env.create(user("eddie"), token_secret("eddie-token"))
    sam = [e for e in env.entries() if e["user"] == "sam" and e["name"] == "sam-token"]
    assert len(sam) == 1 and sam[0]["allowed"] is False and sam[0]["stage"] == "rbac"
    assert "serviceaccounts/token" in sam[0]["reason"]
    # view reads no Secret at all (the migration stream tokens included).
    await env.create(ADMIN, rolebinding("v", "view", "vera"))
    with pytest.raises(Refused):
        await env.get(user("vera"), "Secret", NS, "plain")
