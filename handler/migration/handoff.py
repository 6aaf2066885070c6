"""The hand-off record: one migration's state in its VMI's status, and the arbiter.

Both handlers of a migration (and every driver's migration path) write the migration's
progress into ``vmi.status.migrationState`` and settle who owns the VM through one
field, ``switchover``: ``Committed`` (the target owns the VM) or ``Aborted`` (the source
keeps it). It is written with the VMI's resourceVersion as a precondition, so exactly
one decision is ever recorded: the target resumes only once Committed is recorded, the
source resumes only once Aborted is (or nothing was committed).

The node authorizer lets a node write the record only while the migration is in flight
(or the VMI runs on it, or the hand-off gave it the VM: ``controller.api.node_binding``).
A write refused (Forbidden) means the migration ended meanwhile and this node has no
business with the VMI any more: the write is dropped, never retried.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any

from vmferry.client import ApiClient
from vmferry.errors import ApiError, Conflict, Forbidden, NotFound
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    Field,
    MigrationMode,
    Switchover,
    raw,
    token_secret_name,
)
from vmferry.objects import conditions

log = logging.getLogger(__name__)
Obj = dict[str, Any]

RETRY = 0.5  # s between attempts while the API is away (a restarting controller)


class MigrationFailed(Exception):
    """The migration cannot go on; the message is the failureReason users see."""


class Aborted(MigrationFailed):
    """Cancelled on request (``abortRequested``)."""


def first_leaf(e: BaseException) -> BaseException:
    """The first non-group exception inside (possibly nested) exception groups."""
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


async def read_token(api: ApiClient, migration_uid: str) -> str:
    """The migration's stream token, from its Secret (``token_secret_name``), which only
    the migration's two nodes may read. MigrationFailed when the Secret is gone (the
    migration ended) or holds no token; other API errors propagate (retried by the
    caller's reconcile)."""
    name = token_secret_name(migration_uid)
    try:
        secret = await api.get("Secret", TOKEN_SECRET_NAMESPACE, name)
    except NotFound:
        raise MigrationFailed(
            f"the stream token of migration {migration_uid} is gone "
            f"(Secret {TOKEN_SECRET_NAMESPACE}/{name} not found): the migration ended"
        ) from None
    encoded = (secret.get("data") or {}).get(TOKEN_SECRET_KEY) or ""
    try:
        token = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        token = ""
    if not token:
        raise MigrationFailed(
            f"Secret {TOKEN_SECRET_NAMESPACE}/{name} holds no stream token "
            f"under {TOKEN_SECRET_KEY!r}"
        )
    return token


class HandoffRecord:
    """Reads and writes one migration's state in the VMI named ``namespace/name``."""

    def __init__(self, api: ApiClient, namespace: str, name: str, migration_uid: str) -> None:
        self.api = api
        self.ns = namespace
        self.name = name
        self.uid = migration_uid
        # The newest VMI this record read or wrote: claim() tries it first, and the
        # resourceVersion precondition makes a stale copy cost a Conflict, never a
        # lost decision. Saves the read in the common case (the hand-off is downtime).
        self._latest: Obj | None = None

    def _seen(self, vmi: Obj) -> Obj:
        self._latest = vmi
        return vmi

    async def read(self) -> tuple[Obj, Obj]:
        """(VMI, its migrationState); MigrationFailed if another migration replaced it."""
        vmi = self._seen(await self.api.get("VirtualMachineInstance", self.ns, self.name))
        ms = raw(vmi)
        if ms.get(Field.MIGRATION_UID) != self.uid:
            raise MigrationFailed("the VMI's migration state was replaced by another migration")
        return vmi, ms

    async def mark_started(self, fields: Obj) -> bool:
        """Record startTimestamp (plus ``fields``) unless the migration ended or started
        meanwhile; the precondition makes a cancel racing the start lose or win cleanly.
        Retried while the API is away: a controller restart delays a migration, never
        fails it. A deleted VMI: not started."""
        while True:
            try:
                vmi, ms = await self.read()
                if ms.get(Field.FAILED) or ms.get(Field.COMPLETED) or ms.get(Field.START_TIMESTAMP):
                    log.info("migration %s: not starting (already ended or started)", self.uid)
                    return False
                ms[Field.START_TIMESTAMP] = conditions.now_rfc3339()
                ms.update(fields)
                self._seen(await self.api.update(vmi, subresource="status"))
                return True
            except Conflict:
                continue
            except (NotFound, Forbidden):
                return False
            except ApiError as e:
                log.warning("migration %s: cannot record the start yet (%s); retrying", self.uid, e)
                await asyncio.sleep(RETRY)

    async def patch(self, fields: Obj, extra_status: Obj | None = None) -> bool:
        """Merge ``fields`` into migrationState (and ``extra_status`` into status) while
        the record is still this migration's: the patch carries the resourceVersion of a
        copy whose migrationUid was checked, so a late write of an ended migration (a
        stale informer copy, a retry after a restart) never lands in the state of the
        next migration of the same VMI; a stale copy costs a Conflict and one read.
        Returns False, writing nothing, when another migration's state is there."""
        vmi = self._latest
        while True:
            if vmi is None:
                vmi = self._seen(await self.api.get("VirtualMachineInstance", self.ns, self.name))
            if raw(vmi).get(Field.MIGRATION_UID) != self.uid:
                log.info(
                    "migration %s: not writing %s: the VMI's migration state is another "
                    "migration's now",
                    self.uid,
                    ", ".join(sorted(fields)),
                )
                return False
            try:
                self._seen(
                    await self.api.patch(
                        "VirtualMachineInstance",
                        self.ns,
                        self.name,
                        {"status": {**(extra_status or {}), "migrationState": fields}},
                        subresource="status",
                        resource_version=str(vmi["metadata"]["resourceVersion"]),
                    )
                )
                return True
            except Conflict:
                vmi = None

    async def patch_until_written(self, fields: Obj, extra_status: Obj | None = None) -> None:
        """patch() for what must land (completion, failure): retried while the API is
        away; a deleted VMI ends it. A failure (``fields`` with ``failed``) goes through
        :meth:`fail`: it never replaces a recorded outcome."""
        if fields.get(Field.FAILED):
            await self.fail(fields, extra_status)
            return
        while True:
            try:
                await self.patch(fields, extra_status)  # False: another migration's now
                return
            except NotFound:
                return
            except Forbidden as e:
                log.warning(
                    "migration %s: not writing %s: %s", self.uid, ", ".join(sorted(fields)), e
                )
                return
            except ApiError as e:
                log.warning("migration %s: status write failed (%s); retrying", self.uid, e)
                await asyncio.sleep(RETRY)

    async def fail(self, fields: Obj, extra_status: Obj | None = None) -> bool:
        """Record a failure (``fields``: failed, failureReason, …) unless the migration
        already ended: the first real reason stands, a later write never replaces it
        nor a completion. The resourceVersion precondition closes the race of two
        writers. Retried while the API is away; False if an outcome stood already (or
        the VMI is gone or belongs to another migration)."""
        while True:
            try:
                vmi = await self.api.get("VirtualMachineInstance", self.ns, self.name)
                ms = raw(vmi)
                if ms.get(Field.MIGRATION_UID) != self.uid:
                    return False
                if ms.get(Field.FAILED) or ms.get(Field.COMPLETED):
                    log.info(
                        "migration %s: not recording failure %r: the outcome is recorded "
                        "already (%s)",
                        self.uid,
                        fields.get(Field.FAILURE_REASON),
                        ms.get(Field.FAILURE_REASON) or "completed",
                    )
                    return False
                status = vmi.setdefault("status", {})
                status.update(extra_status or {})
                status["migrationState"] = {**ms, **fields}
                self._seen(await self.api.update(vmi, subresource="status"))
                # the one error line of a failed migration (journalctl -p err finds it)
                log.error(
                    "migration %s of %s/%s failed: %s",
                    self.uid,
                    self.ns,
                    self.name,
                    fields.get(Field.FAILURE_REASON) or "no reason given",
                )
                return True
            except Conflict:
                continue
            except NotFound:
                return False
            except Forbidden as e:
                log.warning("migration %s: not recording the failure: %s", self.uid, e)
                return False
            except ApiError as e:
                log.warning("migration %s: failure write failed (%s); retrying", self.uid, e)
                await asyncio.sleep(RETRY)

    async def claim(self, decision: Switchover, extra: Obj | None = None) -> Switchover:
        """Record ``switchover: decision`` (with ``extra`` fields) unless a decision is
        recorded already; returns the decision that stands. Retries while the API is away.
        A VMI that is gone or belongs to another migration counts as Aborted."""
        while True:
            try:
                vmi, self._latest = self._latest, None  # a cached copy is tried once
                if vmi is None:
                    vmi = self._seen(
                        await self.api.get("VirtualMachineInstance", self.ns, self.name)
                    )
                ms = raw(vmi)
                if ms.get(Field.MIGRATION_UID) != self.uid:
                    return Switchover.ABORTED
                if ms.get(Field.SWITCHOVER):
                    return Switchover(ms[Field.SWITCHOVER])
                # Copied along the changed path only (the hand-off is downtime).
                new_ms = {**ms, Field.SWITCHOVER: decision, **(extra or {})}
                new = {**vmi, "status": {**vmi["status"], "migrationState": new_ms}}
                self._seen(await self.api.update(new, subresource="status"))
                log.info("migration %s: switchover %s recorded", self.uid, decision)
                return decision
            except Conflict:
                continue
            except NotFound:
                return Switchover.ABORTED
            except Forbidden as e:  # the migration ended uncommitted (a commit binds the target)
                log.warning("migration %s: cannot record %s: %s", self.uid, decision, e)
                return Switchover.ABORTED
            except ApiError as e:
                log.warning(
                    "migration %s: cannot record %s yet (%s); retrying", self.uid, decision, e
                )
                await asyncio.sleep(RETRY)

    async def commit(self, mode: MigrationMode = MigrationMode.PRE_COPY) -> None:
        """The hand-off: Committed (and the mode); MigrationFailed if Aborted stands."""
        if await self.claim(Switchover.COMMITTED, {Field.MODE: mode}) != Switchover.COMMITTED:
            raise MigrationFailed(
                "the hand-off was aborted (the target gave up waiting, or the VMI went away)"
            )
