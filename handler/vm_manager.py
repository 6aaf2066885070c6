"""The handler's VMI reconciler: runs this node's guests and both ends of migrations.

One pass per VMI key (level-triggered, safe to repeat):
  - deleted / deleting VMI on this node → destroy the guest, drop our finalizer;
  - Scheduled to this node and no guest → boot it, VMI → Running;
  - Running here but the guest is gone → VMI → Failed (the process died);
  - hand-off names this node as target → prepare an incoming guest, register it with
    the Transfer service, publish ``targetNodeAddress``/``targetNodePort``;
  - hand-off names this node as source and the target is ready → start a
    ``SourceMigration``; ``abortRequested`` → tell it to abort;
  - a migration that ended or was replaced → clean up what is left of it here;
  - after a handler restart, a migration with no task here is settled through the
    arbiter (``switchover``): Committed → the VM belongs to the target; otherwise the
    migration is failed and the guest resumes here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from handler.drivers.base import Driver, GuestSpec, VMHandle
from handler.drivers.qemu import QemuDriver, QemuHandle
from handler.migration.handoff import HandoffRecord
from handler.migration_source import SourceMigration, Stats
from handler.migration_target import IncomingMigration, MigrationService
from handler.qemu_migration import QemuSourceMigration
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.errors import ApiError, Conflict, NotFound
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.objects import conditions, schema
from vmferry.objects.quantity import parse_quantity

log = logging.getLogger(__name__)
Obj = dict[str, Any]

FINALIZER = "vmferry.io/handler"
INCOMING_SUFFIX = ".in-"
ARBITER_WAIT = 20.0  # s a verified target waits for the source's hand-off before claiming abort
RESUME_GAP_POLLS = 200  # x 10 ms: how long a resumed guest may take to report its gap
PROGRESS_RETENTION = 900.0  # s a finished migration's progress stays (metrics read it)
GUEST_CHECK_INTERVAL = 2.0  # s between liveness checks of local guests


def guest_spec(vmi: Obj) -> GuestSpec:
    """The memvm guest a VMI asks for (``spec.memvm.workload`` plus its memory)."""
    spec = vmi.get("spec") or {}
    workload = (spec.get("memvm") or {}).get("workload") or {}
    return GuestSpec(
        memory_bytes=schema.memory_bytes(spec),
        dirty_rate_bytes=parse_quantity(workload.get("dirtyRate", 0)),
        hot_set_bytes=parse_quantity(workload.get("hotSet", 0)),
        content=workload.get("content", "random"),
        touched_bytes=parse_quantity(workload.get("touched", 0)),
        tick_interval_s=int(workload.get("tickIntervalMilliseconds", 5)) / 1000,
    )


def _ms(vmi: Obj) -> Obj:
    return (vmi.get("status") or {}).get("migrationState") or {}


def _commit_awaits(inc: IncomingMigration, ms: Obj) -> bool:
    """The arbiter recorded the hand-off of this verified incoming guest, and nothing here
    has acted on it yet (resume, or discard)."""
    return (
        ms.get("switchover") == "Committed"
        and not ms.get("failed")
        and inc.verified
        and not inc.decision
    )


def _active(ms: Obj) -> bool:
    return bool(ms.get("migrationUid")) and not ms.get("completed") and not ms.get("failed")


class VMManager:
    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        driver: Driver,
        vmis: Informer,
        service: MigrationService,
        *,
        tls: pki.TlsFiles | None,
        migration_endpoint: tuple[str, int],
        state_dir: Path,
        qemu: QemuDriver | None = None,
    ) -> None:
        self.api = api
        self.node = node_name
        self.driver = driver
        self.qemu = qemu  # VMIs with spec.qemu run on this driver
        self.vmis = vmis
        self.service = service
        self.tls = tls
        self.endpoint = migration_endpoint
        self.state_dir = state_dir
        self.handles: dict[str, VMHandle] = {}  # VMI uid -> the guest running here
        self.orphans: dict[str, VMHandle] = {}  # vm_id -> adopted guest we do not place yet
        self.sources: dict[
            str, tuple[SourceMigration | QemuSourceMigration, asyncio.Task[None]]
        ] = {}
        self.progress: dict[str, tuple[Obj, Stats]] = {}  # migration uid -> last progress
        self.queue = WorkQueue()
        self._tasks: set[asyncio.Task[None]] = set()
        vmis.add_handler(self._on_vmi_event)
        service.on_commit = self._on_commit
        service.on_abort = self._on_abort
        service.on_postcopy_done = self._on_postcopy_done

    # -- start-up -------------------------------------------------------------------------

    async def adopt(self) -> None:
        """Re-adopt the guests that survived a handler restart."""
        qemu_handles = await self.qemu.adopt_all() if self.qemu is not None else []
        for handle in [*await self.driver.adopt_all(), *qemu_handles]:
            try:
                state = (await handle.status()).state
            except Exception as e:  # one unreachable guest must not stop the handler
                # Judge by its record (never by its name: a migrated guest keeps the
                # incoming id it was born with). A guest still waiting for an incoming
                # migration is settled (resumed or destroyed) through the arbiter.
                state = "incoming" if getattr(handle, "incoming", False) else "paused"
                log.warning(
                    "guest %s does not answer (%s): adopting it as %s", handle.vm_id, e, state
                )
            if state == "incoming":
                self.orphans[handle.vm_id] = handle
            else:
                self.handles[handle.vm_id.split(INCOMING_SUFFIX)[0]] = handle
            log.info("adopted guest %s (pid %d)", handle.vm_id, handle.pid)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.queue.run(self.reconcile, "vm-manager"))
            tg.create_task(self._watch_guests())

    async def _watch_guests(self) -> None:
        """Periodically requeue every VMI: catches guests that died on their own."""
        await self.vmis.synced.wait()
        while True:
            for key in list(self.vmis.cache):
                self.queue.add(key)
            await asyncio.sleep(GUEST_CHECK_INTERVAL)

    # -- the pass ------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        vmi = self.vmis.get(*key)
        if vmi is None:
            await self._forget_deleted(key)
            return
        uid = vmi["metadata"]["uid"]
        status = vmi.get("status") or {}
        ms = _ms(vmi)
        here = status.get("nodeName") == self.node

        if here and vmi["metadata"].get("deletionTimestamp"):
            await self._delete(vmi)
            return
        if ms.get("targetNode") == self.node and not here:
            await self._reconcile_target(vmi, ms)
        if not here:
            await self._drop_stale_source_guest(vmi, ms)
            return
        if ms.get("sourceNode") == self.node:
            await self._reconcile_source(vmi, ms)
        phase = status.get("phase")
        handle = self.handles.get(uid)
        if phase == "Scheduled" and handle is None:
            await self._boot(vmi)
        elif phase == "Running" and (handle is None or not handle.is_alive()):
            if self._migrating(uid) or ms.get("switchover") == "Committed":
                return  # handed off (or handing off): the target flips nodeName
            if ms.get("sourceNode") == self.node and _active(ms):
                return
            await self._guest_lost(vmi, handle)

    def _migrating(self, vmi_uid: str) -> bool:
        return any(m.vmi["metadata"]["uid"] == vmi_uid for m, _ in self.sources.values())

    # -- local guests ---------------------------------------------------------------------

    async def _boot(self, vmi: Obj) -> None:
        meta = vmi["metadata"]
        if FINALIZER not in meta.get("finalizers", []):
            meta.setdefault("finalizers", []).append(FINALIZER)
            vmi = await self.api.update(vmi)
        if self.qemu is not None and (vmi.get("spec") or {}).get("qemu") is not None:
            handle: VMHandle = await self.qemu.start(meta["uid"], self.qemu.spec_for(vmi))
        else:
            handle = await self.driver.start(meta["uid"], guest_spec(vmi))
        spec = handle.spec
        self.handles[meta["uid"]] = handle
        log.info(
            "vmi %s/%s: guest started (pid %d, %d MiB)",
            meta["namespace"],
            meta["name"],
            handle.pid,
            spec.memory_bytes >> 20,
        )
        await self._set_running(vmi, handle)

    async def _set_running(self, vmi: Obj, handle: VMHandle) -> None:
        while True:
            status = vmi.setdefault("status", {})
            status["nodeName"] = self.node
            conditions.set_phase(status, "Running")
            conditions.set_condition(status, "Ready", True, "GuestRunning", "")
            conditions.set_condition(
                status,
                "LiveMigratable",
                True,
                "Migratable",
                "memvm guests are live-migratable",
            )
            status["launcher"] = {
                "pid": handle.pid,
                "vmId": handle.vm_id,
                "driver": "qemu" if isinstance(handle, QemuHandle) else self.driver.name,
            }
            try:
                await self.api.update(vmi, subresource="status")
                return
            except Conflict:
                vmi = await self.api.get(
                    "VirtualMachineInstance", vmi["metadata"]["namespace"], vmi["metadata"]["name"]
                )

    async def _guest_lost(self, vmi: Obj, handle: VMHandle | None) -> None:
        uid = vmi["metadata"]["uid"]
        if handle is not None:
            await handle.destroy()
            self.handles.pop(uid, None)
        status = vmi.setdefault("status", {})
        log.warning(
            "vmi %s/%s: the guest process is gone",
            vmi["metadata"]["namespace"],
            vmi["metadata"]["name"],
        )
        conditions.set_phase(status, "Failed")
        status["reason"] = "GuestProcessExited"
        conditions.set_condition(
            status, "Ready", False, "GuestProcessExited", "the guest process exited or was killed"
        )
        await self.api.update(vmi, subresource="status")

    async def _delete(self, vmi: Obj) -> None:
        uid = vmi["metadata"]["uid"]
        if self._migrating(uid):
            for mig, _ in self.sources.values():
                if mig.vmi["metadata"]["uid"] == uid:
                    mig.abort_requested.set()
            return  # requeued when the migration ends
        handle = self.handles.pop(uid, None)
        if handle is not None:
            await handle.destroy()
            log.info(
                "vmi %s/%s: guest destroyed (VMI deleted)",
                vmi["metadata"]["namespace"],
                vmi["metadata"]["name"],
            )
        finalizers = vmi["metadata"].get("finalizers", [])
        if FINALIZER in finalizers:
            vmi["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]
            with contextlib.suppress(NotFound):
                await self.api.update(vmi)

    async def _forget_deleted(self, key: Key) -> None:
        """The VMI is gone from the API: nothing of it may keep running here."""
        live = {o["metadata"]["uid"] for o in self.vmis.cache.values()}
        for uid, handle in list(self.handles.items()):
            if uid not in live:
                self.handles.pop(uid)
                await handle.destroy()
                log.info("guest %s destroyed: its VMI %s no longer exists", uid, "/".join(key))

    # -- migration: source side -------------------------------------------------------------

    async def _reconcile_source(self, vmi: Obj, ms: Obj) -> None:
        mig_uid = ms.get("migrationUid", "")
        running = self.sources.get(mig_uid)
        if running is not None:
            if ms.get("abortRequested"):
                running[0].abort_requested.set()
            return
        if not _active(ms):
            return
        handle = self.handles.get(vmi["metadata"]["uid"])
        if ms.get("startTimestamp"):
            await self._settle_orphaned_source(vmi, ms, handle)
            return
        if ms.get("abortRequested") or handle is None:
            return
        if not ms.get("targetNodeAddress") or not ms.get("targetNodePort"):
            return  # the target is still preparing
        migration: SourceMigration | QemuSourceMigration
        if isinstance(handle, QemuHandle) and self.qemu is not None:
            migration = QemuSourceMigration(
                self.api,
                self.node,
                copy.deepcopy(vmi),
                handle,
                self.tls,
                self.qemu,
                on_progress=self._on_progress,
            )
        else:
            migration = SourceMigration(
                self.api,
                self.node,
                copy.deepcopy(vmi),
                handle,
                self.tls,
                on_progress=self._on_progress,
            )
        task = asyncio.create_task(self._run_source(migration))
        self.sources[mig_uid] = (migration, task)

    async def _run_source(self, migration: SourceMigration | QemuSourceMigration) -> None:
        key = (migration.ns, migration.name)
        try:
            await migration.run()
        except Exception:
            log.exception("migration %s crashed", migration.uid)
        finally:
            self.sources.pop(migration.uid, None)
            # Keep the final figures for the metrics collector a while, then let them go.
            asyncio.get_running_loop().call_later(
                PROGRESS_RETENTION, self.progress.pop, migration.uid, None
            )
            if migration.committed:
                self.handles.pop(migration.vmi["metadata"]["uid"], None)
            self.queue.add(key)

    def _on_progress(self, vmi: Obj, stats: Stats) -> None:
        self.progress[_ms(vmi).get("migrationUid", "")] = (vmi, stats)

    async def _settle_orphaned_source(self, vmi: Obj, ms: Obj, handle: VMHandle | None) -> None:
        """A migration started by a previous incarnation of this handler."""
        if ms.get("switchover") == "Committed":
            if handle is not None:
                await handle.destroy()
                self.handles.pop(vmi["metadata"]["uid"], None)
            await self._patch_ms(vmi, {"completed": True, "endTimestamp": conditions.now_rfc3339()})
            return
        claimed = await self._claim(vmi, "Aborted")
        if claimed != "Aborted":
            self.queue.add((vmi["metadata"]["namespace"], vmi["metadata"]["name"]))
            return
        if handle is not None:
            with contextlib.suppress(Exception):
                await handle.resume()
        await self._patch_ms(
            vmi,
            {
                "failed": True,
                "failureReason": "the source handler restarted during the migration",
                "endTimestamp": conditions.now_rfc3339(),
            },
        )

    async def _drop_stale_source_guest(self, vmi: Obj, ms: Obj) -> None:
        """A guest of a VMI that now runs elsewhere (handed off while we were away)."""
        if self._migrating(vmi["metadata"]["uid"]):
            return  # post-copy: the paused source still serves the pages the target lacks
        handle = self.handles.get(vmi["metadata"]["uid"])
        if (
            handle is not None
            and ms.get("switchover") == "Committed"
            and ms.get("sourceNode") == self.node
        ):
            log.info(
                "vmi %s/%s runs on %s now: destroying the old guest here",
                vmi["metadata"]["namespace"],
                vmi["metadata"]["name"],
                vmi["status"].get("nodeName"),
            )
            self.handles.pop(vmi["metadata"]["uid"])
            await handle.destroy()

    # -- migration: target side -------------------------------------------------------------

    def _incoming_id(self, vmi: Obj, ms: Obj) -> str:
        return f"{vmi['metadata']['uid']}{INCOMING_SUFFIX}{ms['migrationUid'][:8]}"

    async def _reconcile_target(self, vmi: Obj, ms: Obj) -> None:
        mig_uid = ms.get("migrationUid", "")
        inc = self.service.registry.get(mig_uid)
        # Clean up incoming guests of migrations that ended or were replaced.
        for other_uid, other in list(self.service.registry.items()):
            if other.vmi_uid == vmi["metadata"]["uid"] and other_uid != mig_uid:
                await self._discard(other, "replaced by another migration")
        if inc is None:
            orphan = self.orphans.pop(self._incoming_id(vmi, ms), None) if mig_uid else None
            if orphan is not None:
                await self._settle_orphaned_target(vmi, ms, orphan)
                return
            if _active(ms) and not ms.get("targetNodeAddress") and ms.get("switchover") is None:
                await self._prepare_target(vmi, ms)
            return
        if inc.decision == "Committed" and inc.postcopy and ms.get("failed"):
            # Post-copy could not finish (the source gave up): the VM is lost; the VMI's
            # Failed phase lets its VM controller start it again.
            self.service.forget(inc.migration_uid)
        elif ms.get("failed") or ms.get("switchover") == "Aborted":
            await self._discard(inc, ms.get("failureReason") or "migration aborted")
        elif _commit_awaits(inc, ms):
            await self._on_commit(inc)  # the Commit frame was lost; the arbiter decided
        elif inc.verified and not inc.decision and ms.get("switchover") is None:
            self.queue.add_after((vmi["metadata"]["namespace"], vmi["metadata"]["name"]), 1.0)
            if time.monotonic() - inc.verified_at > ARBITER_WAIT:
                if await self._claim(vmi, "Aborted") == "Aborted":
                    await self._discard(inc, "the source never recorded the hand-off")

    async def _prepare_target(self, vmi: Obj, ms: Obj) -> None:
        meta = vmi["metadata"]
        await self._patch_ms(vmi, {"targetNodeDomainDetected": True})
        if self.qemu is not None and (vmi.get("spec") or {}).get("qemu") is not None:
            handle: VMHandle = await self.qemu.prepare_incoming(
                self._incoming_id(vmi, ms), self.qemu.spec_for(vmi)
            )
        else:
            handle = await self.driver.prepare_incoming(self._incoming_id(vmi, ms), guest_spec(vmi))
        inc = IncomingMigration(
            namespace=meta["namespace"],
            name=meta["name"],
            vmi_uid=meta["uid"],
            migration_uid=ms["migrationUid"],
            token=ms.get("token", ""),
            source_node=ms["sourceNode"],
            handle=handle,
        )
        self.service.expect(inc)
        address, port = self.endpoint
        await self._patch_ms(vmi, {"targetNodeAddress": address, "targetNodePort": port})
        log.info(
            "migration %s: target prepared for %s/%s, listening on %s:%d",
            ms["migrationUid"],
            meta["namespace"],
            meta["name"],
            address,
            port,
        )

    def _on_vmi_event(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        """Informer handler: queue the VMI; and when it carries the hand-off of a guest
        waiting here, resume that guest now rather than when the queue's one worker
        gets to the key (the guest is paused meanwhile: ~1 ms more, measured, and more
        when the worker is busy with another VMI). The reconcile that follows finds the
        decision made: _on_commit decides before its first await, so one resume runs."""
        self.queue.add(key)
        ms = _ms(new) if new is not None else {}
        inc = self.service.registry.get(ms.get("migrationUid", ""))
        if inc is not None and _commit_awaits(inc, ms):
            self._spawn(self._on_commit(inc), "resuming a migrated guest")

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``work`` in the background, kept until it ends; a failure is logged."""
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and (e := task.exception()) is not None:
                log.error("%s failed: %s", what, e, exc_info=e)

        task.add_done_callback(done)

    async def _on_commit(self, inc: IncomingMigration) -> None:
        """Resume the incoming guest: the arbiter recorded the hand-off (steps 4-5)."""
        if inc.decision:
            return
        inc.decision = "Committed"
        if inc.postcopy:
            # The guest runs here from now on; its missing pages keep arriving, so the
            # incoming record stays registered (reconnects) until post-copy is done.
            await inc.postcopy_handle.resume_postcopy(inc.device_state or b"{}")
        else:
            inc.release()
            await inc.handle.resume(inc.device_state)
            self.service.forget(inc.migration_uid)
            self.service.record_path(inc.migration_uid).unlink(missing_ok=True)
        self.handles[inc.vmi_uid] = inc.handle
        log.info(
            "migration %s: guest resumed here%s",
            inc.migration_uid,
            " (post-copy: pages still arriving)" if inc.postcopy else "",
        )
        self._spawn(
            self._publish_resumed(inc), f"migration {inc.migration_uid}: publishing the resume"
        )

    async def _publish_resumed(self, inc: IncomingMigration) -> None:
        """Record that the VM runs here (nodeName first), then the gap the guest saw."""
        await self._update_status_retrying(inc, self._resumed_fields(inc))
        status = await inc.handle.status()
        for _ in range(RESUME_GAP_POLLS):  # the gap is known at the guest's first tick
            if status.resume_gap_ms is not None:
                break
            await asyncio.sleep(0.01)
            status = await inc.handle.status()
        gap = status.resume_gap_ms
        log.info("migration %s: the guest saw a %s ms gap", inc.migration_uid, gap)
        if gap is not None:

            def record_gap(st: Obj) -> None:
                st["guest"] = {"resumeGapMilliseconds": round(gap, 3)}
                transfer = st.setdefault("migrationState", {}).setdefault("transfer", {})
                transfer["guestDowntimeMilliseconds"] = round(gap, 3)

            await self._update_status_retrying(inc, record_gap)

    def _resumed_fields(self, inc: IncomingMigration) -> Callable[[Obj], None]:
        def apply(status: Obj) -> None:
            status["nodeName"] = self.node
            ms = status.setdefault("migrationState", {})
            ms["targetNodeDomainReadyTimestamp"] = conditions.now_rfc3339()
            status["launcher"] = {
                "pid": inc.handle.pid,
                "vmId": inc.handle.vm_id,
                "driver": "qemu" if isinstance(inc.handle, QemuHandle) else self.driver.name,
            }

        return apply

    async def _update_status_retrying(
        self, inc: IncomingMigration, change: Callable[[Obj], Any]
    ) -> None:
        """Read-modify-write the VMI status until it lands (the API may be restarting)."""
        while True:
            try:
                vmi = await self.api.get("VirtualMachineInstance", inc.namespace, inc.name)
                change(vmi.setdefault("status", {}))
                await self.api.update(vmi, subresource="status")
                return
            except Conflict:
                continue
            except NotFound:
                return
            except ApiError as e:
                log.warning("migration %s: cannot update the VMI yet: %s", inc.migration_uid, e)
                await asyncio.sleep(0.5)

    async def _on_postcopy_done(self, inc: IncomingMigration) -> None:
        self.service.forget(inc.migration_uid)
        self.service.record_path(inc.migration_uid).unlink(missing_ok=True)

    async def _on_abort(self, inc: IncomingMigration, reason: str) -> None:
        await self._discard(inc, reason)

    async def _discard(self, inc: IncomingMigration, reason: str) -> None:
        if inc.decision == "Committed":
            return
        inc.decision = "Aborted"
        self.service.forget(inc.migration_uid)
        await inc.handle.destroy()
        if inc.record_written is not None:  # the device state came: a record was written
            with contextlib.suppress(Exception):
                await inc.record_written
            self.service.record_path(inc.migration_uid).unlink(missing_ok=True)
        log.info("migration %s: incoming guest discarded: %s", inc.migration_uid, reason)

    async def _settle_orphaned_target(self, vmi: Obj, ms: Obj, handle: VMHandle) -> None:
        record = self.service.record_path(ms["migrationUid"])
        if ms.get("switchover") == "Committed" and record.exists():
            state = base64.b64decode(json.loads(record.read_text())["deviceState"])
            await handle.resume(state)
            self.handles[vmi["metadata"]["uid"]] = handle
        else:
            await handle.destroy()
        record.unlink(missing_ok=True)

    # -- API helpers ------------------------------------------------------------------------

    def _record(self, vmi: Obj) -> HandoffRecord:
        meta = vmi["metadata"]
        return HandoffRecord(
            self.api, meta["namespace"], meta["name"], _ms(vmi).get("migrationUid", "")
        )

    async def _patch_ms(self, vmi: Obj, fields: Obj) -> None:
        await self._record(vmi).patch(fields)

    async def _claim(self, vmi: Obj, decision: str) -> str:
        """Write ``switchover=decision`` unless one is recorded; return the recorded one."""
        return await self._record(vmi).claim(decision)
