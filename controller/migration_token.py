"""The per-migration stream token, kept in a Secret only the migration's nodes may read.

The target handler accepts a migration stream only from the source node's certificate,
for the hand-off's ``migrationUid``, and with this token. It used to sit in
``vmi.status.migrationState``, readable by anyone with ``view`` on the VMI; now, as
Kubernetes keeps credentials out of status, it lives in the Secret
``token_secret_name(uid)`` in ``TOKEN_SECRET_NAMESPACE`` (the system namespace, where
no namespace's admin has rights), labelled with the source and target node so the node
authorizer lets exactly those two read it (``may_node_read``).

Lifecycle, all in the migration reconciler:

1. ``ensure_token_secret`` before the hand-off is written into the VMI. Idempotent: a
   Secret that already exists for this uid keeps its token (only its node labels follow
   a new placement), so a pass that failed half-way never mints a second token.
2. ``delete_token_secret`` before the VMIM's final phase is written (Succeeded, Failed,
   cancel) and when a finished VMIM is garbage-collected; a missing Secret is fine.
3. ``delete_orphans`` after each garbage collection: the Secrets of migrations that no
   longer exist or have finished (a VMIM whose finalizer an administrator removed).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from controller.store import Store
from vmferry.errors import AlreadyExists, NotFound
from vmferry.migration_state import (
    TOKEN_MIGRATION_LABEL,
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    TOKEN_SECRET_PREFIX,
    TOKEN_SOURCE_NODE_LABEL,
    TOKEN_TARGET_NODE_LABEL,
    token_secret_name,
)

log = logging.getLogger(__name__)
Obj = dict[str, Any]

TOKEN_BYTES = 24  # 192 random bits, URL-safe base64: unguessable, fits a gRPC field


def _labels(migration_uid: str, source_node: str, target_node: str) -> dict[str, str]:
    return {
        TOKEN_MIGRATION_LABEL: migration_uid,
        TOKEN_SOURCE_NODE_LABEL: source_node,
        TOKEN_TARGET_NODE_LABEL: target_node,
    }


def token_secret(migration_uid: str, source_node: str, target_node: str, token: str) -> Obj:
    """The Secret object holding ``token`` for one migration between two nodes."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": token_secret_name(migration_uid),
            "namespace": TOKEN_SECRET_NAMESPACE,
            "labels": _labels(migration_uid, source_node, target_node),
        },
        "data": {TOKEN_SECRET_KEY: base64.b64encode(token.encode()).decode()},
    }


async def ensure_token_secret(
    store: Store, migration_uid: str, source_node: str, target_node: str
) -> Obj:
    """The migration's token Secret: the existing one (labels updated to these nodes if
    they changed) or a new one with a fresh token. Never replaces an existing token."""
    name = token_secret_name(migration_uid)
    labels = _labels(migration_uid, source_node, target_node)
    try:
        existing = await store.get("Secret", TOKEN_SECRET_NAMESPACE, name)
    except NotFound:
        secret = token_secret(
            migration_uid, source_node, target_node, secrets.token_urlsafe(TOKEN_BYTES)
        )
        try:
            return await store.create(secret)
        except AlreadyExists:  # created since our read: use that one
            existing = await store.get("Secret", TOKEN_SECRET_NAMESPACE, name)
    if (existing["metadata"].get("labels") or {}) != labels:
        existing["metadata"]["labels"] = labels
        existing = await store.update(existing)
    return existing


async def delete_token_secret(store: Store, migration_uid: str) -> None:
    """Delete the migration's token Secret; nothing to do if it is already gone."""
    with contextlib.suppress(NotFound):
        await store.delete("Secret", TOKEN_SECRET_NAMESPACE, token_secret_name(migration_uid))
        log.info("migration %s: stream token deleted", migration_uid)


async def delete_orphans(
    store: Store, unfinished_uids: Collection[str], finished_uids: Collection[str] = ()
) -> list[str]:
    """Delete every token Secret whose migration is not among ``unfinished_uids`` (the
    uids of the VMIMs not yet Succeeded or Failed, read before this call: a Secret is only
    created for one of those, by the migration reconciler, whose passes run one at a time,
    so none appears between that read and this one -- except a cross-cluster migration's,
    which a sync controller writes: a Secret of no known VMIM that is younger than
    ORPHAN_MIN_AGE is kept; one of a VMIM in ``finished_uids`` goes at once). Returns the
    uids deleted."""
    deleted = []
    now = datetime.now(UTC)
    # The labels first, from the store's cache without decoding a Secret: most belong to
    # unfinished migrations (an O(Secrets) decode per finished migration was the bulk of
    # the reconciler's time with 1,000 migrations in flight).
    for _, name, labels in store.list_labels("Secret", TOKEN_SECRET_NAMESPACE):
        uid = labels.get(TOKEN_MIGRATION_LABEL, "")
        if not uid or uid in unfinished_uids:
            continue
        if not is_token_secret_name(TOKEN_SECRET_NAMESPACE, name):
            continue
        if uid not in finished_uids:
            try:
                secret = await store.get("Secret", TOKEN_SECRET_NAMESPACE, name)
            except NotFound:
                continue
            created = _parse_time(secret["metadata"].get("creationTimestamp"))
            if created is not None and (now - created).total_seconds() < ORPHAN_MIN_AGE:
                continue
        await delete_token_secret(store, uid)
        deleted.append(uid)
    return deleted


ORPHAN_MIN_AGE = 60.0  # s: a token Secret this young is never an orphan (see delete_orphans)


def _parse_time(value: Any) -> datetime | None:
    try:
        return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def is_token_secret_name(namespace: str, name: str) -> bool:
    """Whether ``namespace/name`` is where a migration token Secret would live."""
    return namespace == TOKEN_SECRET_NAMESPACE and name.startswith(TOKEN_SECRET_PREFIX)


def may_node_read(secret: Obj, node: str) -> bool:
    """Whether ``node`` is the source or the target of the migration token ``secret``."""
    meta = secret.get("metadata") or {}
    labels = meta.get("labels") or {}
    uid = labels.get(TOKEN_MIGRATION_LABEL, "")
    return (
        bool(node and uid)
        and meta.get("namespace") == TOKEN_SECRET_NAMESPACE
        and meta.get("name") == token_secret_name(uid)
        and node in (labels.get(TOKEN_SOURCE_NODE_LABEL), labels.get(TOKEN_TARGET_NODE_LABEL))
    )
