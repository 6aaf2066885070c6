"""The VM manager's post-copy keeper: a post-copy hand-off survives a handler restart.

In post-copy the guest runs on the target while the paused source guest still holds the
pages the target lacks; the VM needs both halves until every page has arrived. A handler
restarted in the middle must therefore resume post-copy, not end it:

- source side: the paused guest (adopted as an ordinary guest) is given a source engine
  again (``SourceEngine.readopt_postcopy``): memvm's reconnects to the target
  (Hello.resume) and pushes what the target reports missing; QEMU's recovers QEMU's
  paused post-copy on a new tunnel stream (``QemuPostCopy.rejoin``); both finish the
  migration as usual (PostCopyDone → completed → the source guest destroyed);
- target side: the guest found running with its post-copy bitmaps (``GuestStatus.postcopy``)
  is registered again in PostCopyRunning (``IncomingMigration.readopted_postcopy``) from
  its restart record, so the source's reconnect finds it; a guest that was committed but
  not yet resumed is resumed in post-copy from the record first. A QEMU guest moves its
  pages itself and has no bitmaps to show: its post-copy restart record says it (never
  taken for a finished post-copy), and the source's recovery stream (Open.resume) then
  runs ``migrate-recover`` on it as after a network break.

Only when the memory is really gone is the VM declared lost: the migration failed (the
source gave up after postCopyRecoveryWindowSeconds, or — the source host lost — no source
reconnected here within that window plus ``LOSS_GRACE``). Then the target's guest is
stopped (never left waiting on missing pages), the paused source guest is destroyed
wherever it survives, and the VMI is Failed with a reason (status never says Running for
a guest that runs nowhere).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from handler.drivers.base import (
    DriverError,
    Drivers,
    EngineContext,
    GuestError,
    PostCopyHandle,
    VMHandle,
    postcopy,
)
from handler.migration.handoff import HandoffRecord, read_token
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.postcopy_source import mark_vmi_lost
from handler.migration.source import ProgressCallback, SourceEngine
from handler.peers import holds_source, holds_target
from handler.vm_incoming import active, incoming_id, launcher
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.migration_state import (
    Field,
    MigrationConfig,
    MigrationMode,
    Switchover,
)
from vmferry.objects import conditions

log = logging.getLogger(__name__)
Obj = dict[str, Any]

LOSS_GRACE = 10.0  # s beyond the recovery window before the target declares the VM lost:
# the source, when it still lives, gives up first and says why
COMPLETION_GRACE = 15.0  # s the target waits for the source to record a finished post-copy


def in_postcopy(ms: Obj) -> bool:
    """The hand-off was committed in post-copy: the VM needs the memory of both nodes
    until the migration completes."""
    return ms.get(Field.SWITCHOVER) == Switchover.COMMITTED and ms.get(Field.MODE) == (
        MigrationMode.POST_COPY
    )


def lost_reason(window_s: float) -> str:
    return (
        f"post-copy: no source reconnected within the recovery window ({window_s:.0f}s, "
        "postCopyRecoveryWindowSeconds); the pages the guest still lacked are gone with "
        "the source node, so the VM was stopped and must be started again"
    )


class PostCopyKeeper:
    """Post-copy across handler restarts, for the VM manager's pass (``reconcile``).
    ``adopted``: VMI uid → a guest adopted at start-up that runs in post-copy here
    (target side), until it is registered again or stopped."""

    def __init__(
        self,
        api: ApiClient,
        node: str,
        drivers: Drivers,
        incoming: IncomingRegistry,
        handles: dict[str, VMHandle],
        orphans: dict[str, VMHandle],
        *,
        tls: pki.TlsFiles | None,
        on_progress: ProgressCallback,
        start_source: Callable[[SourceEngine], None],
        migrating: Callable[[str], bool],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.node = node
        self.drivers = drivers
        self.incoming = incoming
        self.handles = handles
        self.orphans = orphans
        self.tls = tls
        self.on_progress = on_progress
        self.start_source = start_source
        self.migrating = migrating
        self.spawn = spawn
        self.clock = clock
        self.adopted: dict[str, VMHandle] = {}
        self.done_since: dict[str, float] = {}  # migration uid -> post-copy done here, when

    async def reconcile(self, vmi: Obj, ms: Obj) -> bool:
        """One pass for a VMI. True: this pass is complete (the rest of the VM manager's
        pass must not act on this VMI now)."""
        uid = vmi["metadata"]["uid"]
        if not in_postcopy(ms):
            return False
        if holds_target(ms, self.node):
            return await self._target(vmi, ms, uid)
        if holds_source(ms, self.node):
            return await self._source(vmi, ms, uid)
        return False

    # -- source side --------------------------------------------------------------------------

    async def _source(self, vmi: Obj, ms: Obj, uid: str) -> bool:
        handle = self.handles.get(uid)
        if self.migrating(uid):
            return False
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        if handle is None:
            if not active(ms):
                return False
            # Adopted at start-up before any pass: no guest here means the paused source
            # guest died with the pages the target still lacked.
            reason = (
                f"post-copy: the source guest on {self.node} is gone with the pages the "
                "target still lacked; the VM cannot continue and must be started again"
            )
            log.error("migration %s: %s", mig_uid, reason)
            meta = vmi["metadata"]
            record = HandoffRecord(self.api, meta["namespace"], meta["name"], mig_uid)
            await record.patch_until_written(
                {
                    Field.FAILED: True,
                    Field.FAILURE_REASON: reason,
                    Field.END_TIMESTAMP: conditions.now_rfc3339(),
                }
            )
            await mark_vmi_lost(self.api, vmi)
            return True
        if active(ms):
            engine = self.drivers.by_name(handle.driver_name).source_engine(
                EngineContext(self.api, self.node, self.tls, self.on_progress),
                copy.deepcopy(vmi),
                handle,
            )
            if not engine.readopt_postcopy():
                return False
            log.info(
                "migration %s: post-copy re-adopted: the paused guest here serves the pages "
                "%s still lacks",
                mig_uid,
                ms.get(Field.TARGET_NODE),
            )
            self.start_source(engine)
            return True
        if ms.get(Field.FAILED):
            self.handles.pop(uid, None)
            await handle.destroy()
            log.info("migration %s: post-copy failed: the paused source guest destroyed", mig_uid)
            await mark_vmi_lost(self.api, vmi)
            return True
        return False

    # -- target side --------------------------------------------------------------------------

    async def _target(self, vmi: Obj, ms: Obj, uid: str) -> bool:
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        inc = self.incoming.get(mig_uid)
        if inc is None:
            handle = self.adopted.get(uid)
            waiting = self.orphans.get(incoming_id(vmi, ms)) if mig_uid else None
            if handle is None and waiting is None:
                handle = await self._self_paging_guest(ms, uid)
            if handle is None and waiting is None:
                await self._complete_if_unrecorded(vmi, ms, uid)
                return False
            if not active(ms):
                if ms.get(Field.FAILED):
                    await self._stop_lost(vmi, ms, uid, handle or waiting)
                    return True
                self.adopted.pop(uid, None)
                return False
            return await self._readopt(vmi, ms, uid, handle, waiting)
        if not inc.state.guest_runs_here:
            return False
        if ms.get(Field.FAILED):
            await self._stop_lost(vmi, ms, uid, inc.handle)
            return True
        window = float(
            MigrationConfig.from_dict(
                ms.get(Field.MIGRATION_CONFIGURATION)
            ).post_copy_recovery_window_s
        )
        since = inc.disconnected_since
        if since is not None and self.clock() - since > window + LOSS_GRACE:
            reason = lost_reason(window)
            log.error("migration %s: %s", mig_uid, reason)
            record = HandoffRecord(self.api, inc.namespace, inc.name, mig_uid)
            await record.patch_until_written(
                {
                    Field.FAILED: True,
                    Field.FAILURE_REASON: reason,
                    Field.END_TIMESTAMP: conditions.now_rfc3339(),
                }
            )
            await self._stop_lost(vmi, ms, uid, inc.handle)
            return True
        return False

    async def _self_paging_guest(self, ms: Obj, uid: str) -> VMHandle | None:
        """The guest running here after a restart whose driver moves its post-copy pages
        itself (QEMU: no bitmaps for ``GuestStatus.postcopy``), when its restart record
        says post-copy: its post-copy is not done, whatever the guest's status shows."""
        guest = self.handles.get(uid)
        if guest is None or isinstance(guest, PostCopyHandle) or not active(ms):
            return None
        record = await asyncio.to_thread(self.incoming.records.read, ms[Field.MIGRATION_UID])
        return guest if record is not None and record.postcopy else None

    async def _complete_if_unrecorded(self, vmi: Obj, ms: Obj, uid: str) -> None:
        """Every page arrived here (the guest runs without its post-copy bitmaps and no
        receiver is registered) but the migration is not completed: the source went away
        between PostCopyDone and its completion write. After COMPLETION_GRACE the target
        records it, from what is true (the VM runs here with all its memory); a source
        that comes back finds it completed and destroys its paused guest."""
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        handle = self.handles.get(uid)
        if not active(ms) or handle is None or not handle.is_alive():
            self.done_since.pop(mig_uid, None)
            return
        since = self.done_since.setdefault(mig_uid, self.clock())
        if self.clock() - since < COMPLETION_GRACE:
            return
        log.warning(
            "migration %s: post-copy finished here but the source never recorded it: "
            "recording the completion",
            mig_uid,
        )
        record = HandoffRecord(
            self.api, vmi["metadata"]["namespace"], vmi["metadata"]["name"], mig_uid
        )
        await record.patch_until_written(
            {Field.COMPLETED: True, Field.END_TIMESTAMP: conditions.now_rfc3339()},
            {"nodeName": self.node, "launcher": launcher(handle)},
        )
        self.done_since.pop(mig_uid, None)

    async def _readopt(
        self, vmi: Obj, ms: Obj, uid: str, handle: VMHandle | None, waiting: VMHandle | None
    ) -> bool:
        """Register a post-copy guest found after a restart again, in PostCopyRunning."""
        meta = vmi["metadata"]
        mig_uid = ms[Field.MIGRATION_UID]
        record = await asyncio.to_thread(self.incoming.records.read, mig_uid)
        if record is None or not record.postcopy:
            log.warning("migration %s: post-copy guest without its restart record", mig_uid)
            self.adopted.pop(uid, None)
            return False
        guest = handle or waiting
        assert guest is not None
        missing = "its QEMU knows how many"
        try:
            if isinstance(guest, PostCopyHandle):  # vmferry moves the pages
                pc = postcopy(guest, f"migration {mig_uid}")
                missing = str(len(pc.missing_pages()))
                if handle is None:  # committed, not yet resumed when the handler went away
                    self.orphans.pop(guest.vm_id, None)
                    await pc.resume_postcopy(record.device_state)
            elif handle is None:  # QEMU moves them itself: only its guest is started here
                self.orphans.pop(guest.vm_id, None)
                await guest.resume(record.device_state)
        except (DriverError, GuestError) as e:
            log.error("migration %s: cannot re-adopt the post-copy guest: %s", mig_uid, e)
            return False
        token = await read_token(self.api, mig_uid)
        inc = IncomingMigration.readopted_postcopy(
            namespace=meta["namespace"],
            name=meta["name"],
            vmi_uid=uid,
            migration_uid=mig_uid,
            token=token,
            source_node=ms.get(Field.SOURCE_NODE, ""),
            handle=guest,
            device_state=record.device_state,
            disconnected_since=self.clock(),
        )
        self.incoming.expect(inc)
        self.handles[uid] = guest
        self.adopted.pop(uid, None)
        self.done_since.pop(mig_uid, None)
        log.info(
            "migration %s: post-copy guest re-adopted with its receiver; pages missing: %s",
            mig_uid,
            missing,
        )
        if (vmi.get("status") or {}).get("nodeName") != self.node:
            record_ = HandoffRecord(self.api, meta["namespace"], meta["name"], mig_uid)
            self.spawn(
                record_.patch_until_written(
                    {Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP: conditions.now_rfc3339()},
                    {"nodeName": self.node, "launcher": launcher(guest)},
                ),
                f"migration {mig_uid}: publishing the re-adopted post-copy guest",
            )
        return True

    async def _stop_lost(self, vmi: Obj, ms: Obj, uid: str, handle: VMHandle | None) -> None:
        """The migration failed in post-copy: the guest here lacks memory that is gone;
        stop it (never leave it waiting on missing pages) and fail the VMI."""
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        self.incoming.forget(mig_uid)
        self.adopted.pop(uid, None)
        if handle is not None:
            self.orphans.pop(handle.vm_id, None)
            if self.handles.get(uid) is handle:
                self.handles.pop(uid)
            await handle.destroy()
        await asyncio.to_thread(self.incoming.records.remove, mig_uid)
        log.warning(
            "migration %s: post-copy failed (%s): the guest here was stopped",
            mig_uid,
            ms.get(Field.FAILURE_REASON) or "the VM's memory is gone",
        )
        await mark_vmi_lost(self.api, vmi)
