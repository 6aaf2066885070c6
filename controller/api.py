"""The controller's gRPC object API (DESIGN §1): authentication, validation, admission,
then the store.

Every request is authenticated (``controller.authn``: the mTLS client certificate, or a
service-account bearer token) and authorized before anything else happens:

- node identities (``system:node:<name>``) by the node authorizer: they may read
  everything but Secrets (except, with ``get``, the stream-token Secret of a migration
  whose source or target they are), and write only their own Node and the VMIs/VMIMs
  that involve their node;
- everyone else by RBAC (``controller.rbac``), reading the RBAC objects from the store,
  so a binding is in force as soon as its create returns. Writing a role or a binding
  also passes the escalation check.

Every decision, allowed or denied, is appended to the audit log (``controller.audit``);
a denial names the permission that was missing, as Kubernetes does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from controller import migration_token, pods, rbac
from controller.admission import Admission
from controller.audit import AuditLog
from controller.authn import Authenticator, TokenSigner
from controller.store import Store
from vmferry import failpoints, pki
from vmferry.client import REASON_KEY
from vmferry.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
)
from vmferry.failpoints import Step
from vmferry.migration_state import MigrationState, Switchover
from vmferry.objects import kinds, labels, limits, patch, schema
from vmferry.rpc import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

Obj = dict[str, Any]
PATCH_RETRIES = 10  # optimistic retries of a patch without a resourceVersion precondition
# Status of these kinds is owned by the system: a user's create keeps only spec.
STATUS_STRIPPED_ON_CREATE = {
    "VirtualMachine",
    "VirtualMachineInstance",
    "VirtualMachineInstanceMigration",
    "HyperConverged",
    "MigrationPolicy",
}


def _load(data: bytes, what: str) -> Obj:
    obj = limits.loads_json(data, what)
    if not isinstance(obj, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return obj


def _dump(obj: Obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _involves_node(obj: Obj, node: str) -> bool:
    """The object runs on ``node``, or ``node`` is the source or target of its migration."""
    ms = MigrationState.of(obj)
    return node in ((obj.get("status") or {}).get("nodeName"), ms.source_node, ms.target_node)


def _records_commit(before: Obj, after: Obj) -> bool:
    """This write recorded the hand-off (``switchover: Committed``) in a VMI."""
    return (
        after.get("kind") == "VirtualMachineInstance"
        and MigrationState.of(after).switchover == Switchover.COMMITTED
        and MigrationState.of(before).switchover != Switchover.COMMITTED
    )


RBAC_KINDS = frozenset({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
MIGRATION_HINT = (
    "; live migration needs the kubevirt.io:migrate cluster role: ask a cluster "
    "administrator to bind it (vmferry create rolebinding NAME "
    "--clusterrole=kubevirt.io:migrate --user=USER -n NAMESPACE)"
)


class NodeAuthorizer:
    """The node authorizer: what a handler's certificate may do.

    A node reads every kind but Secrets; of those it may ``get`` only the stream-token
    Secret of a migration whose source or target it is (``controller.migration_token``;
    ``current`` is that Secret, None when it does not exist). It writes only its own Node
    and the VMIs/VMIMs whose status names it (running there, or the source or target of
    their migration).
    """

    def check(self, who: pki.Identity, request: rbac.Request, current: Obj | None) -> rbac.Decision:
        node = who.node_name or ""
        kind = request.resource
        if request.verb in ("get", "list", "watch"):
            if kind == "secrets":
                return self._check_secret_read(node, request, current)
            return rbac.Decision(True, "Node: nodes may read")
        if (
            kind == "nodes"
            and request.name == node
            and request.verb in ("create", "update", "patch")
        ):
            return rbac.Decision(True, "Node: a node may change its own Node")
        if kind in ("virtualmachineinstances", "virtualmachineinstancemigrations") and (
            request.verb in ("update", "patch")
        ):
            if current is not None and _involves_node(current, node):
                return rbac.Decision(True, f"Node: the object involves node {node}")
        return rbac.Decision(
            False,
            f"{request.describe()}: a node may only change its own Node and the virtual "
            "machines running on or migrating to/from it",
        )

    @staticmethod
    def _check_secret_read(node: str, request: rbac.Request, current: Obj | None) -> rbac.Decision:
        if request.verb == "get" and migration_token.is_token_secret_name(
            request.namespace, request.name
        ):
            if current is None:  # the migration ended: let the get answer NotFound
                return rbac.Decision(True, "Node: a migration token Secret that does not exist")
            if migration_token.may_node_read(current, node):
                return rbac.Decision(
                    True, f"Node: the stream token of a migration that involves node {node}"
                )
            return rbac.Decision(
                False,
                f"{request.describe()}: node {node} is neither the source nor the target of "
                "this migration",
            )
        return rbac.Decision(
            False,
            f"{request.describe()}: nodes may not read secrets (only, with get, the stream "
            "token of a migration that involves them)",
        )


class ApiService(api_pb2_grpc.ApiServicer):
    """gRPC servicer; each method maps ApiError to a status with the reason attached."""

    def __init__(
        self,
        store: Store,
        admission: Admission,
        *,
        authenticator: Authenticator | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.admission = admission
        # Without a configured signer no bearer token verifies: certificates only.
        self.authenticator = authenticator or Authenticator(
            store, TokenSigner(secrets.token_bytes(32))
        )
        self.audit = audit or AuditLog(None)
        self.node_authz = NodeAuthorizer()
        self.pods = pods.PodView(store)  # Pods are views of the daemons, never stored

    # -- plumbing -----------------------------------------------------------------------

    async def _guard(
        self, context: grpc.aio.ServicerContext, fn: Callable[[pki.Identity], Awaitable[Any]]
    ) -> Any:
        try:
            who = await self.authenticator.authenticate(context)
            return await fn(who)
        except ApiError as e:
            message = limits.fit_message(e.message)
            await context.abort(e.grpc_code, message, trailing_metadata=((REASON_KEY, e.reason),))

    async def decide(
        self, who: pki.Identity, request: rbac.Request, current: Obj | None = None
    ) -> rbac.Decision:
        """Decide one request (node authorizer or RBAC) and write it to the audit log."""
        if who.is_node:
            decision = self.node_authz.check(who, request, current)
        else:
            policy = await rbac.load_policy(self.store, request.namespace)
            decision = policy.authorize(request)
        self.audit.record(request, decision.allowed, decision.reason)
        return decision

    async def _authorize(
        self,
        who: pki.Identity,
        verb: str,
        kind: kinds.Kind,
        ns: str,
        name: str,
        current: Obj | None = None,
        subresource: str = "",
    ) -> None:
        """Raise Forbidden, Kubernetes-style, unless ``who`` may ``verb`` this object."""
        request = rbac.request_for(who.user, who.groups, verb, kind, ns, name, subresource)
        decision = await self.decide(who, request, current)
        if not decision.allowed:
            target = f'{kind.resource} "{name}"' if name else kind.resource
            hint = ""
            if (
                kind.kind == "VirtualMachineInstanceMigration"
                and verb in ("create", "update", "patch", "delete")
                and not who.is_node
            ):
                hint = MIGRATION_HINT
            raise Forbidden(f"{target} is forbidden: {decision.reason}{hint}")

    async def _check_escalation(self, who: pki.Identity, obj: Obj) -> None:
        if obj.get("kind") in RBAC_KINDS:
            await rbac.check_escalation(self.store, who.user, who.groups, obj)

    @staticmethod
    def _scope(kind: kinds.Kind, namespace: str) -> str:
        if kind.namespaced:
            if not namespace:
                raise BadRequest(f"{kind.plural} are namespaced: a namespace is required")
            return namespace
        if namespace:
            raise BadRequest(f"{kind.plural} are cluster-scoped: do not give a namespace")
        return ""

    async def _ensure_namespace(self, kind: kinds.Kind, namespace: str) -> None:
        if kind.namespaced:
            try:
                await self.store.get("Namespace", "", namespace)
            except NotFound:
                raise NotFound(f'namespaces "{namespace}" not found') from None

    def _prepare(self, obj: Obj) -> tuple[kinds.Kind, Obj]:
        kind = kinds.by_kind(str(obj.get("kind", "")))
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise Invalid(f"{kind.kind}: metadata: expected an object")
        pods.refuse_write(kind, "create or update", str(meta.get("name") or ""))
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        obj = schema.validate(obj)  # a normalized copy: defaulted in place
        schema.fill_defaults(obj)
        return kind, obj

    # -- verbs ----------------------------------------------------------------------------

    async def Create(
        self, request: api_pb2.CreateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            kind, obj = self._prepare(_load(request.object_json, "object"))
            meta = obj["metadata"]
            ns = self._scope(kind, meta.get("namespace", ""))
            await self._authorize(
                who, "create", kind, ns, meta.get("name", meta.get("generateName", ""))
            )
            await self._ensure_namespace(kind, ns)
            await self._check_escalation(who, obj)
            if kind.kind in STATUS_STRIPPED_ON_CREATE:
                obj.pop("status", None)
            for key in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
            ):
                meta.pop(key, None)
            await self.admission.admit_create(obj)
            if request.dry_run:
                return api_pb2.ObjectReply(object_json=_dump(obj))
            created = await self.store.create(obj)
            return api_pb2.ObjectReply(object_json=_dump(created))

        result: api_pb2.ObjectReply = await self._guard(context, run)
        return result

    async def Get(
        self, request: api_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            kind = kinds.by_kind(request.ref.kind)
            ns = self._scope(kind, request.ref.namespace)
            current: Obj | None = None
            if who.is_node and kind.kind == "Secret":  # the node authorizer reads its labels
                with contextlib.suppress(NotFound):
                    current = await self.store.get(kind.kind, ns, request.ref.name)
            await self._authorize(who, "get", kind, ns, request.ref.name, current)
            if kind.kind == pods.POD_KIND:
                current = await self.pods.get(ns, request.ref.name)
            obj = current or await self.store.get(kind.kind, ns, request.ref.name)
            return api_pb2.ObjectReply(object_json=_dump(obj))

        result: api_pb2.ObjectReply = await self._guard(context, run)
        return result

    async def List(
        self, request: api_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListReply:
        async def run(who: pki.Identity) -> api_pb2.ListReply:
            kind = kinds.by_kind(request.kind)
            ns = request.namespace if kind.namespaced else ""
            if request.namespace and not kind.namespaced:
                raise BadRequest(f"{kind.plural} are cluster-scoped: do not give a namespace")
            selector = (
                labels.parse_selector(request.label_selector) if request.label_selector else None
            )
            await self._authorize(who, "list", kind, ns, "")
            items, rv = await self.store.list(kind.kind, ns or None, selector)
            if kind.kind == pods.POD_KIND:
                items = await self.pods.list(ns or None, selector)
            return api_pb2.ListReply(items_json=[_dump(o) for o in items], resource_version=str(rv))

        result: api_pb2.ListReply = await self._guard(context, run)
        return result

    async def _write(self, who: pki.Identity, obj: Obj, subresource: str, verb: str) -> Obj:
        if subresource not in ("", "status"):
            raise BadRequest(f'unknown subresource "{subresource}" (only "status" is served)')
        kind, obj = self._prepare(obj)
        meta = obj["metadata"]
        ns = self._scope(kind, meta.get("namespace", ""))
        name = meta.get("name", "")
        if not name:
            raise Invalid(f"{kind.kind}: metadata.name: required for {verb}")
        current = await self.store.get(kind.kind, ns, name)
        await self._authorize(who, verb, kind, ns, name, current, subresource)
        if not subresource:
            await self._check_escalation(who, obj)
        await self.admission.admit_update(current, obj, subresource)
        written = await self.store.update(obj, subresource=subresource or None)
        if _records_commit(current, written):
            failpoints.hit(Step.CONTROLLER_COMMITTED)
        return written

    async def Update(
        self, request: api_pb2.UpdateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            obj = await self._write(
                who, _load(request.object_json, "object"), request.subresource, "update"
            )
            return api_pb2.ObjectReply(object_json=_dump(obj))

        result: api_pb2.ObjectReply = await self._guard(context, run)
        return result

    async def Patch(
        self, request: api_pb2.PatchRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            kind = kinds.by_kind(request.ref.kind)
            pods.refuse_write(kind, "patch", request.ref.name)
            ns = self._scope(kind, request.ref.namespace)
            body = limits.loads_json(request.patch_json, "patch")
            if request.type == api_pb2.PATCH_TYPE_JSON:
                if not isinstance(body, list):
                    raise BadRequest("a json patch must be a list of operations")
            elif request.type == api_pb2.PATCH_TYPE_MERGE:
                if not isinstance(body, dict):
                    raise BadRequest("a merge patch must be a JSON object")
            else:
                raise BadRequest("patch type must be json or merge")
            for attempt in range(PATCH_RETRIES):
                current = await self.store.get(kind.kind, ns, request.ref.name)
                rv = current["metadata"]["resourceVersion"]
                if request.resource_version and request.resource_version != rv:
                    raise Conflict(
                        f'{kind.resource} "{request.ref.name}": the object has been modified; '
                        "please apply your changes to the latest version and try again"
                    )
                if request.type == api_pb2.PATCH_TYPE_JSON:
                    patched = patch.apply_json_patch(current, body)
                else:
                    patched = patch.apply_merge_patch(current, body)
                if not isinstance(patched.get("metadata"), dict):
                    raise Invalid(f"{kind.kind}: metadata: a patch may not remove it")
                for key in ("name", "namespace", "uid"):
                    if patched["metadata"].get(key) != current["metadata"].get(key):
                        raise Invalid(f"{kind.kind}: metadata.{key}: field is immutable")
                patched["metadata"]["resourceVersion"] = rv
                try:
                    obj = await self._write(who, patched, request.subresource, "patch")
                    return api_pb2.ObjectReply(object_json=_dump(obj))
                except Conflict:
                    if request.resource_version or attempt == PATCH_RETRIES - 1:
                        raise
                    await asyncio.sleep(0.01 * attempt)
            raise AssertionError("unreachable")

        result: api_pb2.ObjectReply = await self._guard(context, run)
        return result

    async def Delete(
        self, request: api_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            kind = kinds.by_kind(request.ref.kind)
            pods.refuse_write(kind, "delete", request.ref.name)
            ns = self._scope(kind, request.ref.namespace)
            current = await self.store.get(kind.kind, ns, request.ref.name)
            await self._authorize(who, "delete", kind, ns, request.ref.name, current)
            await self.admission.admit_delete(current)
            obj = await self.store.delete(
                kind.kind,
                ns,
                request.ref.name,
                resource_version=request.resource_version or None,
                uid=request.uid or None,
            )
            return api_pb2.ObjectReply(object_json=_dump(obj))

        result: api_pb2.ObjectReply = await self._guard(context, run)
        return result

    async def Watch(
        self, request: api_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.WatchEvent]:
        try:
            who = await self.authenticator.authenticate(context)
            kind = kinds.by_kind(request.kind) if request.kind else None
            ns = request.namespace if (kind is None or kind.namespaced) else ""
            selector = (
                labels.parse_selector(request.label_selector) if request.label_selector else None
            )
            hide_secrets = False
            if kind is not None:
                await self._authorize(who, "watch", kind, ns, "")
            elif who.is_node:
                hide_secrets = True  # a node may watch every kind but Secrets
            else:
                everything = rbac.Request(who.user, who.groups, "watch", "*", "*", "", ns, "")
                decision = await self.decide(who, everything)
                if not decision.allowed:
                    raise Forbidden(
                        f"watching every kind is forbidden: {decision.reason} "
                        "(name a kind to watch)"
                    )
            since = int(request.resource_version or 0) or await self.store.current_rv()
            if request.send_initial_bookmark:
                yield api_pb2.WatchEvent(
                    type="BOOKMARK",
                    object_json=_dump({"metadata": {"resourceVersion": str(since)}}),
                    resource_version=str(since),
                )
            # The stored JSON goes out as it is: no decoding and encoding per watcher.
            async for event in self.store.watch_json(
                kind.kind if kind else None, ns or None, since, selector
            ):
                if hide_secrets and event.kind == "Secret":
                    continue
                yield api_pb2.WatchEvent(
                    type=event.type,
                    object_json=event.data.encode(),
                    resource_version=str(event.resource_version),
                )
        except ValueError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "resourceVersion must be a number",
                trailing_metadata=((REASON_KEY, "BadRequest"),),
            )
        except ApiError as e:
            message = limits.fit_message(e.message)
            await context.abort(e.grpc_code, message, trailing_metadata=((REASON_KEY, e.reason),))

    async def WhoAmI(
        self, request: api_pb2.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.WhoAmIReply:
        async def run(who: pki.Identity) -> api_pb2.WhoAmIReply:
            return api_pb2.WhoAmIReply(user=who.user, groups=list(who.groups))

        result: api_pb2.WhoAmIReply = await self._guard(context, run)
        return result
