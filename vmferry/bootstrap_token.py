"""Bootstrap tokens: short-lived bearer tokens that let a new node ask for its certificate
(Kubernetes' ``bootstrap.kubernetes.io/token`` Secrets, same names and fields).

A token is ``<id>.<secret>`` (6 and 16 characters of ``[a-z0-9]``) and lives in the
Secret ``kube-system/bootstrap-token-<id>`` of type ``bootstrap.kubernetes.io/token`` with
``data``: ``token-id``, ``token-secret``, ``expiration`` (RFC 3339),
``usage-bootstrap-authentication: "true"`` and ``auth-extra-groups`` (comma-separated
``system:bootstrappers:...`` groups). The controller authenticates it
(controller/authn.py) as user ``system:bootstrap:<id>`` in the group
``system:bootstrappers`` plus the extra groups; deleting the Secret or passing its
expiration revokes it. The group :data:`NODE_BOOTSTRAPPERS_GROUP` has its node
certificate requests approved automatically (controller/csr_signer.py).
"""

from __future__ import annotations

import base64
import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

NAMESPACE = "kube-system"
SECRET_PREFIX = "bootstrap-token-"
SECRET_TYPE = "bootstrap.kubernetes.io/token"
USER_PREFIX = "system:bootstrap:"
BOOTSTRAPPERS_GROUP = "system:bootstrappers"
NODE_BOOTSTRAPPERS_GROUP = "system:bootstrappers:vmferry:nodes"  # auto-approved node CSRs
TOKEN_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
DEFAULT_TTL = timedelta(hours=1)
_ALPHABET = string.ascii_lowercase + string.digits

Obj = dict[str, Any]


class TokenError(ValueError):
    """A bootstrap token that is malformed, unknown, expired or not for authentication."""


@dataclass(frozen=True)
class BootstrapToken:
    id: str
    secret: str
    expiration: datetime
    groups: tuple[str, ...]

    @property
    def token(self) -> str:
        return f"{self.id}.{self.secret}"

    @property
    def user(self) -> str:
        return USER_PREFIX + self.id

    @property
    def secret_name(self) -> str:
        return SECRET_PREFIX + self.id


def is_bootstrap_token(token: str) -> bool:
    return TOKEN_RE.match(token) is not None


def new_token(
    ttl: timedelta = DEFAULT_TTL, *, auto_approve: bool = True, now: datetime | None = None
) -> BootstrapToken:
    """A fresh random token valid for ``ttl``; ``auto_approve``: in the node bootstrappers
    group (its node CSRs are approved without an administrator)."""
    if ttl <= timedelta(0):
        raise ValueError("the token's lifetime must be positive")
    return BootstrapToken(
        id="".join(secrets.choice(_ALPHABET) for _ in range(6)),
        secret="".join(secrets.choice(_ALPHABET) for _ in range(16)),
        expiration=(now or datetime.now(UTC)) + ttl,
        groups=(NODE_BOOTSTRAPPERS_GROUP,) if auto_approve else (),
    )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def to_secret(token: BootstrapToken) -> Obj:
    """The Secret holding ``token``."""
    data = {
        "token-id": token.id,
        "token-secret": token.secret,
        "expiration": token.expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "usage-bootstrap-authentication": "true",
        "auth-extra-groups": ",".join(token.groups),
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": token.secret_name, "namespace": NAMESPACE},
        "type": SECRET_TYPE,
        "data": {k: _b64(v) for k, v in data.items()},
    }


def from_secret(token: str, secret: Obj, now: datetime | None = None) -> BootstrapToken:
    """The BootstrapToken ``token`` is, checked against its Secret: the secret part
    matches (constant time), it is for authentication and not expired. TokenError says
    what is wrong (never the stored secret)."""
    match = TOKEN_RE.match(token)
    if match is None:
        raise TokenError("invalid bootstrap token: expected <6 chars>.<16 chars> of [a-z0-9]")
    token_id, token_secret = match.groups()
    where = f'bootstrap token "{token_id}"'
    if secret.get("type") != SECRET_TYPE:
        raise TokenError(f"{where}: its Secret is not of type {SECRET_TYPE}")
    try:
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    except (ValueError, UnicodeDecodeError):
        raise TokenError(f"{where}: its Secret's data is not base64") from None
    if data.get("token-id") != token_id or not secrets.compare_digest(
        data.get("token-secret", "").encode(), token_secret.encode()
    ):
        raise TokenError(f"invalid bootstrap token: {where} does not match")
    if data.get("usage-bootstrap-authentication") != "true":
        raise TokenError(f"{where} is not for authentication")
    try:
        expiration = datetime.strptime(data.get("expiration", ""), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise TokenError(f"{where}: its expiration is not an RFC 3339 UTC time") from None
    expiration = expiration.replace(tzinfo=UTC)
    if (now or datetime.now(UTC)) >= expiration:
        raise TokenError(f"{where} expired at {data['expiration']}")
    groups = tuple(g for g in data.get("auth-extra-groups", "").split(",") if g)
    bad = [g for g in groups if not g.startswith(BOOTSTRAPPERS_GROUP + ":")]
    if bad:
        raise TokenError(
            f"{where}: extra groups must start with {BOOTSTRAPPERS_GROUP}: (got {bad})"
        )
    return BootstrapToken(token_id, token_secret, expiration, groups)
