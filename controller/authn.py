"""Authentication: who is calling (DESIGN §4).

Two credentials are accepted:

- **Client certificates** from the cluster CA (verified by TLS): the user is the subject
  CN, the groups its O attributes (``vmferry.pki``). Expired or foreign certificates never
  get past the handshake.
- **Service-account bearer tokens** (gRPC metadata ``authorization: Bearer <token>``):
  long-lived tokens the controller writes into Secrets of type
  ``kubernetes.io/service-account-token`` (see ``controller.rbac_controller``). A token is
  a JWT signed with HMAC-SHA256 by a key only the controller holds
  (``<data_dir>/sa-signing.key``), naming the namespace, the account and the Secret with
  their uids. It is accepted only while the signature verifies **and** the Secret still
  exists with that uid and still holds this very token **and** the ServiceAccount still
  exists with that uid: deleting either revokes it at once, a forged or edited token is
  refused. The identity is ``system:serviceaccount:<ns>:<name>`` in the groups
  ``system:serviceaccounts``, ``system:serviceaccounts:<ns>`` and ``system:authenticated``.

When a request carries a bearer token, the token is the identity (a bad token is refused
even over a valid client certificate); otherwise the client certificate is. Every
authenticated identity is in the group ``system:authenticated``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import grpc

from controller.store import Store
from vmferry import bootstrap_token, pki
from vmferry.errors import NotFound, Unauthorized

Obj = dict[str, Any]

SIGNING_KEY_FILE = "sa-signing.key"
TOKEN_ISSUER = "vmferry/serviceaccount"
SERVICE_ACCOUNT_TOKEN_TYPE = "kubernetes.io/service-account-token"
SA_NAME_ANNOTATION = "kubernetes.io/service-account.name"
SA_UID_ANNOTATION = "kubernetes.io/service-account.uid"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
AUTHENTICATED_GROUP = "system:authenticated"
_CLAIM_NS = "kubernetes.io/serviceaccount/namespace"
_CLAIM_SECRET = "kubernetes.io/serviceaccount/secret.name"
_CLAIM_SECRET_UID = "vmferry.io/secret.uid"
_CLAIM_SA = "kubernetes.io/serviceaccount/service-account.name"
_CLAIM_SA_UID = "kubernetes.io/serviceaccount/service-account.uid"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_signing_key(data_dir: Path) -> bytes:
    """Return the token signing key in ``data_dir``, creating it (mode 0600) if absent."""
    path = Path(data_dir) / SIGNING_KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class TokenSigner:
    """Makes and checks the signature of service-account tokens (JWT, HS256)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sign(self, signing_input: bytes) -> str:
        return _b64url(hmac.new(self._key, signing_input, hashlib.sha256).digest())

    def issue(self, namespace: str, secret: Obj, service_account: Obj) -> str:
        """A token for ``service_account`` stored in ``secret`` (both as stored, with uids)."""
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": f"system:serviceaccount:{namespace}:{service_account['metadata']['name']}",
            "iat": int(time.time()),
            _CLAIM_NS: namespace,
            _CLAIM_SECRET: secret["metadata"]["name"],
            _CLAIM_SECRET_UID: secret["metadata"]["uid"],
            _CLAIM_SA: service_account["metadata"]["name"],
            _CLAIM_SA_UID: service_account["metadata"]["uid"],
        }
        header = {"alg": "HS256", "typ": "JWT"}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        return f"{signing_input}.{self._sign(signing_input.encode())}"

    def claims(self, token: str) -> Obj:
        """The claims of a token whose signature verifies; Unauthorized otherwise."""
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthorized("invalid bearer token: not a service-account token")
        signing_input = f"{parts[0]}.{parts[1]}".encode()
        if not hmac.compare_digest(self._sign(signing_input), parts[2]):
            raise Unauthorized("invalid bearer token: the signature does not verify")
        try:
            header = json.loads(_unb64url(parts[0]))
            claims = json.loads(_unb64url(parts[1]))
        except (ValueError, binascii.Error):
            raise Unauthorized("invalid bearer token: malformed") from None
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            raise Unauthorized("invalid bearer token: unsupported algorithm")
        if not isinstance(claims, dict) or claims.get("iss") != TOKEN_ISSUER:
            raise Unauthorized("invalid bearer token: unknown issuer")
        return claims

    def valid_for(self, token: str, secret: Obj, service_account: Obj) -> bool:
        """True when ``token`` is a verified token of exactly this secret and account."""
        try:
            claims = self.claims(token)
        except Unauthorized:
            return False
        return claims.get(_CLAIM_SECRET_UID) == secret["metadata"].get("uid") and claims.get(
            _CLAIM_SA_UID
        ) == service_account["metadata"].get("uid")


def service_account_identity(namespace: str, name: str) -> pki.Identity:
    return pki.Identity(
        user=f"system:serviceaccount:{namespace}:{name}",
        groups=(
            SERVICE_ACCOUNTS_GROUP,
            f"{SERVICE_ACCOUNTS_GROUP}:{namespace}",
            AUTHENTICATED_GROUP,
        ),
    )


async def _bootstrap_secret(store: Store, token: str) -> Obj:
    name = bootstrap_token.SECRET_PREFIX + token.partition(".")[0]
    try:
        return await store.get("Secret", bootstrap_token.NAMESPACE, name)
    except NotFound:
        raise Unauthorized(
            f'invalid bootstrap token: secret "{bootstrap_token.NAMESPACE}/{name}" does not exist'
        ) from None


def _bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized('the authorization header must be "Bearer <token>"')
            return token.strip()
    return None


class Authenticator:
    """Turns a gRPC call into an Identity, or raises Unauthorized saying why not."""

    def __init__(self, store: Store, signer: TokenSigner) -> None:
        self.store = store
        self.signer = signer

    async def authenticate(self, context: grpc.aio.ServicerContext) -> pki.Identity:
        token = _bearer_token(context)
        if token is not None:
            return await self.authenticate_token(token)
        who = pki.peer_identity(context)
        if who is None:
            raise Unauthorized(
                "no credentials: present a client certificate from the cluster CA or a "
                "service-account bearer token"
            )
        groups = (
            who.groups if AUTHENTICATED_GROUP in who.groups else (*who.groups, AUTHENTICATED_GROUP)
        )
        return pki.Identity(user=who.user, groups=groups)

    async def authenticate_token(self, token: str) -> pki.Identity:
        if bootstrap_token.is_bootstrap_token(token):
            return await self.authenticate_bootstrap_token(token)
        claims = self.signer.claims(token)
        ns = str(claims.get(_CLAIM_NS, ""))
        secret_name = str(claims.get(_CLAIM_SECRET, ""))
        sa_name = str(claims.get(_CLAIM_SA, ""))
        try:
            secret = await self.store.get("Secret", ns, secret_name)
        except NotFound:
            raise Unauthorized(
                f'invalid bearer token: secret "{ns}/{secret_name}" holding it was deleted'
            ) from None
        stored = (secret.get("data") or {}).get("token", "")
        try:
            stored_token = base64.b64decode(stored).decode()
        except (ValueError, binascii.Error):
            stored_token = ""
        if (
            secret["metadata"].get("uid") != claims.get(_CLAIM_SECRET_UID)
            or secret["metadata"].get("deletionTimestamp")
            or not hmac.compare_digest(stored_token.encode(), token.encode())
        ):
            raise Unauthorized(
                f'invalid bearer token: it is no longer the token of secret "{ns}/{secret_name}"'
            )
        try:
            account = await self.store.get("ServiceAccount", ns, sa_name)
        except NotFound:
            raise Unauthorized(
                f'invalid bearer token: service account "{ns}/{sa_name}" was deleted'
            ) from None
        if account["metadata"].get("uid") != claims.get(_CLAIM_SA_UID) or account["metadata"].get(
            "deletionTimestamp"
        ):
            raise Unauthorized(
                f'invalid bearer token: service account "{ns}/{sa_name}" was deleted'
            )
        return service_account_identity(ns, sa_name)

    async def authenticate_bootstrap_token(self, token: str) -> pki.Identity:
        """A bootstrap token (vmferry.bootstrap_token): ``system:bootstrap:<id>`` in
        ``system:bootstrappers`` and the token's extra groups."""
        secret = await _bootstrap_secret(self.store, token)
        try:
            found = bootstrap_token.from_secret(token, secret)
        except bootstrap_token.TokenError as e:
            raise Unauthorized(str(e)) from None
        groups = (bootstrap_token.BOOTSTRAPPERS_GROUP, *found.groups, AUTHENTICATED_GROUP)
        return pki.Identity(user=found.user, groups=groups)
