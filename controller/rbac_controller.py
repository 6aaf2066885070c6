"""Reconcilers behind RBAC and service accounts (kube-controller-manager's equivalents).

- **ClusterRole aggregation**: a ClusterRole with an ``aggregationRule`` gets as rules the
  union of the rules of every other ClusterRole its label selectors match (in name order,
  duplicates dropped). Any ClusterRole change re-aggregates every aggregated role, so a
  role labelled ``rbac.authorization.k8s.io/aggregate-to-admin=true`` flows into
  ``admin`` (and ``edit`` into ``admin``, ``view`` into ``edit``) within moments, and
  leaves it when the label or the role goes.
- **Service-account tokens**: a Secret of type ``kubernetes.io/service-account-token``
  annotated ``kubernetes.io/service-account.name: NAME`` gets, once that ServiceAccount
  exists in its namespace, ``data.token`` (a signed token, see ``controller.authn``),
  ``data.ca.crt`` and ``data.namespace`` and the annotation
  ``kubernetes.io/service-account.uid``. A token that no longer verifies for the
  secret and account (e.g. an edited one, or an account deleted and re-created) is
  replaced. When a ServiceAccount is deleted, its token Secrets are deleted too.
- **Root CA**: every namespace has ``ConfigMap/kube-root-ca.crt`` whose ``data.ca.crt``
  is the cluster CA certificate (12.6.1); a changed or deleted one is put back.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import logging
from typing import Any

from controller import rbac
from controller.authn import (
    SA_NAME_ANNOTATION,
    SA_UID_ANNOTATION,
    SERVICE_ACCOUNT_TOKEN_TYPE,
    TokenSigner,
)
from controller.objects import StoreSource
from controller.store import Store
from vmferry.errors import AlreadyExists, NotFound
from vmferry.informer import Informer, Key, WorkQueue

log = logging.getLogger(__name__)
Obj = dict[str, Any]

ROOT_CA_CONFIGMAP = "kube-root-ca.crt"
ROOT_CA_KEY = "ca.crt"
ROOT_CA_DESCRIPTION = (
    "Contains a CA bundle that can be used to verify the vmferry API server's certificate."
)


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class ClusterRoleAggregator:
    """Fills the rules of aggregated ClusterRoles from the roles their selectors match."""

    def __init__(self, store: Store, cluster_roles: Informer) -> None:
        self.store = store
        self.cluster_roles = cluster_roles
        self.queue = WorkQueue()
        cluster_roles.add_handler(self._changed)

    def _changed(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        for role in self.cluster_roles.cache.values():
            if role.get("aggregationRule"):
                self.queue.add(("", role["metadata"]["name"]))

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "clusterrole-aggregation")

    async def reconcile(self, key: Key) -> None:
        try:
            role = await self.store.get("ClusterRole", "", key[1])
        except NotFound:
            return
        if not role.get("aggregationRule"):
            return
        rules = rbac.aggregated_rules(role, self.cluster_roles.items())
        if rules != (role.get("rules") or []):
            role["rules"] = rules
            await self.store.update(role)  # a Conflict is retried by the queue
            log.info("clusterrole %s: aggregated %d rules", key[1], len(rules))


class ServiceAccountTokens:
    """Fills service-account token Secrets and removes those of deleted accounts."""

    def __init__(
        self,
        store: Store,
        signer: TokenSigner,
        secrets: Informer,
        accounts: Informer,
        ca_pem: bytes,
    ) -> None:
        self.store = store
        self.signer = signer
        self.secrets = secrets
        self.accounts = accounts
        self.ca_pem = ca_pem
        self.queue = WorkQueue()
        secrets.add_handler(lambda key, old, new: self.queue.add(key))
        accounts.add_handler(self._account_changed)

    def _account_changed(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        ns, name = key
        for secret in self.secrets.cache.values():
            meta = secret["metadata"]
            if (
                meta.get("namespace") == ns
                and (meta.get("annotations") or {}).get(SA_NAME_ANNOTATION) == name
            ):
                self.queue.add((ns, meta["name"]))

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "serviceaccount-tokens")

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            secret = await self.store.get("Secret", ns, name)
        except NotFound:
            return
        meta = secret["metadata"]
        account_name = (meta.get("annotations") or {}).get(SA_NAME_ANNOTATION)
        if secret.get("type") != SERVICE_ACCOUNT_TOKEN_TYPE or not account_name:
            return
        if meta.get("deletionTimestamp"):
            return
        try:
            account = await self.store.get("ServiceAccount", ns, account_name)
        except NotFound:
            account = None
        recorded_uid = (meta.get("annotations") or {}).get(SA_UID_ANNOTATION)
        if account is None or (recorded_uid and recorded_uid != account["metadata"]["uid"]):
            if recorded_uid:
                # The account it was made for is gone: the secret goes with it.
                log.info("secret %s/%s: service account %s deleted", ns, name, account_name)
                await self.store.delete("Secret", ns, name)
            return  # not filled until the account exists
        data = secret.get("data") or {}
        try:
            current = base64.b64decode(data.get("token", "")).decode()
        except ValueError:
            current = ""
        wanted = {
            "ca.crt": _b64(self.ca_pem) if self.ca_pem else None,
            "namespace": _b64(ns),
        }
        updated = copy.deepcopy(secret)
        udata = updated.setdefault("data", {})
        if not self.signer.valid_for(current, secret, account):
            udata["token"] = _b64(self.signer.issue(ns, secret, account))
        for k, v in wanted.items():
            if v is not None:
                udata[k] = v
        updated["metadata"].setdefault("annotations", {})[SA_UID_ANNOTATION] = account["metadata"][
            "uid"
        ]
        if updated != secret:
            await self.store.update(updated)
            log.info("secret %s/%s: token for service account %s written", ns, name, account_name)


class RootCAPublisher:
    """Keeps ``ConfigMap/kube-root-ca.crt`` with the cluster CA in every namespace."""

    def __init__(
        self, store: Store, namespaces: Informer, configmaps: Informer, ca_pem: bytes
    ) -> None:
        self.store = store
        self.ca_pem = ca_pem.decode()
        self.queue = WorkQueue()
        namespaces.add_handler(lambda key, old, new: self.queue.add(("", key[1])))
        configmaps.add_handler(self._configmap_changed)

    def _configmap_changed(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        if key[1] == ROOT_CA_CONFIGMAP:
            self.queue.add(("", key[0]))

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "root-ca-publisher")

    async def reconcile(self, key: Key) -> None:
        ns = key[1]
        try:
            namespace = await self.store.get("Namespace", "", ns)
        except NotFound:
            return
        if namespace["metadata"].get("deletionTimestamp"):
            return
        try:
            cm = await self.store.get("ConfigMap", ns, ROOT_CA_CONFIGMAP)
        except NotFound:
            cm = None
        if cm is None:
            try:
                await self.store.create(
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {
                            "name": ROOT_CA_CONFIGMAP,
                            "namespace": ns,
                            "annotations": {"kubernetes.io/description": ROOT_CA_DESCRIPTION},
                        },
                        "data": {ROOT_CA_KEY: self.ca_pem},
                    }
                )
                log.info("namespace %s: published %s", ns, ROOT_CA_CONFIGMAP)
            except AlreadyExists:
                self.queue.add(key)
            return
        if cm.get("data") != {ROOT_CA_KEY: self.ca_pem}:
            cm["data"] = {ROOT_CA_KEY: self.ca_pem}
            await self.store.update(cm)
            log.info("namespace %s: restored %s", ns, ROOT_CA_CONFIGMAP)


async def run_rbac_reconcilers(store: Store, signer: TokenSigner, ca_pem: bytes) -> None:
    """Run the aggregation, token and root-CA reconcilers with their informers until
    cancelled. ``ca_pem`` empty (a plain-text test controller) skips the root CA."""
    source = StoreSource(store)
    cluster_roles = Informer(source, "ClusterRole")
    secrets = Informer(source, "Secret")
    accounts = Informer(source, "ServiceAccount")
    namespaces = Informer(source, "Namespace")
    configmaps = Informer(source, "ConfigMap")
    informers = [cluster_roles, secrets, accounts, namespaces, configmaps]
    aggregator = ClusterRoleAggregator(store, cluster_roles)
    tokens = ServiceAccountTokens(store, signer, secrets, accounts, ca_pem)
    publisher = RootCAPublisher(store, namespaces, configmaps, ca_pem) if ca_pem else None
    async with asyncio.TaskGroup() as tg:
        for informer in informers:
            tg.create_task(informer.run())
        for informer in informers:
            await informer.synced.wait()
        tg.create_task(aggregator.run())
        tg.create_task(tokens.run())
        if publisher is not None:
            tg.create_task(publisher.run())
