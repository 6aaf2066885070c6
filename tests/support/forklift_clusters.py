"""Clusters for the orchestrator's unit tests: a real API server (gRPC, TLS from its own
CA, bearer tokens, RBAC, admission) in-process, service-account tokens, and Provider
manifests as 12.6.1 and 12.6.1.1 produce them."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from controller.admission import Admission
from controller.api import ApiService
from controller.authn import (
    SA_NAME_ANNOTATION,
    SERVICE_ACCOUNT_TOKEN_TYPE,
    Authenticator,
    TokenSigner,
)
from controller.main import bootstrap
from controller.store import Store
from vmferry import grpc_options, pki
from vmferry.errors import AlreadyExists
from vmferry.objects import kinds
from vmferry.rpc import api_pb2_grpc

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
MTV_CLUSTERROLE = REPO / "deploy/examples/rbac/mtv-clusterrole.yaml"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@dataclass
class TokenCluster:
    store: Store
    signer: TokenSigner
    port: int
    ca_pem: bytes

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@asynccontextmanager
async def token_cluster(directory: Path, name: str) -> AsyncIterator[TokenCluster]:
    """A controller's API serving bearer-token clients (server-only TLS, its own CA)."""
    pki_dir = directory / name / "pki"
    pki.init_ca(pki_dir, name)
    server_tls = pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"])
    store = await Store.open(directory / name / "state.db")
    await bootstrap(store)
    signer = TokenSigner(b"k" * 32)
    server = grpc.aio.server(options=grpc_options.api_server_options())
    service = ApiService(store, Admission(store), authenticator=Authenticator(store, signer))
    api_pb2_grpc.add_ApiServicer_to_server(service, server)
    port = server.add_secure_port(
        "127.0.0.1:0", pki.server_credentials(server_tls, require_client_cert=False)
    )
    await server.start()
    try:
        yield TokenCluster(store, signer, port, (pki_dir / pki.CA_CERT_FILE).read_bytes())
    finally:
        await server.stop(None)
        await store.close()


async def service_account_token(
    store: Store, signer: TokenSigner, namespace: str, name: str, *, mtv_role: bool
) -> str:
    """12.6.1.1: a service account, its long-lived token Secret and, with ``mtv_role``,
    the reference's cluster role bound to it. Returns the decoded token."""
    try:
        await store.create(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )
    except AlreadyExists:
        pass
    account = await store.create(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }
    )
    secret = await store.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": SERVICE_ACCOUNT_TOKEN_TYPE,
            "metadata": {
                "name": f"{name}-token",
                "namespace": namespace,
                "annotations": {SA_NAME_ANNOTATION: name},
            },
        }
    )
    token = signer.issue(namespace, secret, account)
    secret["data"] = {"token": b64(token)}
    await store.update(secret)
    if mtv_role:
        role = yaml.safe_load(MTV_CLUSTERROLE.read_text())
        try:
            await store.create(role)
        except AlreadyExists:
            pass
        await store.create(
            {
                "apiVersion": kinds.RBAC,
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role["metadata"]["name"],
                },
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            }
        )
    return token


def provider_secret(name: str, namespace: str, token: str, ca_pem: bytes, **extra: str) -> Obj:
    data = {"token": b64(token), "cacert": b64(ca_pem), **{k: b64(v) for k, v in extra.items()}}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace},
        "data": data,
    }


def provider(name: str, namespace: str, url: str = "", secret: str = "") -> Obj:
    spec: Obj = {"type": "openshift"}
    if url:
        spec["url"] = url
        spec["secret"] = {"name": secret, "namespace": namespace}
    return {
        "apiVersion": kinds.FORKLIFT,
        "kind": "Provider",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
