"""Post-copy on the memvm source: the switch, the push of the missing pages (faulted ones
first), reconnecting after a broken stream, and the failure that loses the VM.

``PostCopy`` works on its migration's engine (``MemvmSourceMigration``): its channels,
sender, digest and record. It runs once pre-copy has not completed within
``completionTimeoutPerGiB`` and ``allowPostCopy`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from handler import stream
from handler.migration.channels import CONNECT_TIMEOUT
from handler.migration.handoff import MigrationFailed, first_leaf
from vmferry import failpoints
from vmferry.client import ApiClient
from vmferry.errors import ApiError, Conflict, Forbidden, NotFound
from vmferry.migration_state import Field, MigrationMode, VMIPhase
from vmferry.objects import conditions
from vmferry.rpc import migration_pb2 as pb

if TYPE_CHECKING:
    from handler.migration.memvm_source import MemvmSourceMigration
    from handler.migration.source import SourceEngine

log = logging.getLogger(__name__)

RECONNECT_DELAY = 0.5  # s, doubled up to RECONNECT_MAX_DELAY while post-copy recovers
RECONNECT_MAX_DELAY = 5.0
DONE_TIMEOUT = 60.0  # s for the target's PostCopyDone once every page is sent
STOP_SERVING = b"stop"  # sentinel on a channel's request queue (never a valid request)
POSTCOPY_FAILED_REASON = "PostCopyFailed"  # the VMI's status.reason when post-copy fails
LOST_RETRY = 1.0  # s between attempts to mark the VMI Failed while the API is away
Obj = dict[str, Any]


class CompletedElsewhere(Exception):
    """The target recorded the migration completed while this side reconnected."""


class PostCopy:
    def __init__(self, engine: MemvmSourceMigration) -> None:
        self.engine = engine

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Steps of the post-copy switch (pre-copy did not complete in time):
        1. pause; the pages dirty since their last copy, plus those a cut-short round did
           not send, are *missing*; page 0 (the guest's CPU state) is sent now;
        2. PostCopyStart: device state, the missing list, and the digest of RAM with the
           missing pages masked; the target verifies the pages it has the same way;
        3. the arbiter records Committed and mode PostCopy; Commit; the guest resumes on
           the target and from now on runs there;
        4. the missing pages flow, faulted ones first, surviving broken connections for
           postCopyRecoveryWindowSeconds; PostCopyEnd / PostCopyDone; the source is
           destroyed."""
        e = self.engine
        parts = e.stats.downtime_parts
        spec = e.handle.spec
        digest, meter = e.chunk_digest, e.meter
        assert digest is not None and meter is not None  # made by _precopy
        t0 = e.clock()
        e.switching = True
        e.paused = True
        await e.handle.pause()
        await e.unthrottle()
        t1 = e.clock()
        parts["pause"] = t1 - t0
        # Page 0 (the guest's CPU state) leaves the missing set and is sent now: its hash,
        # like every page written since the last harvest, must be made again (take()
        # invalidates what it harvests).
        missing = np.union1d(e.pending, meter.take())
        missing = missing[missing != 0]
        await e.sender.send_round(np.zeros(1, dtype=np.int64), e.stats.rounds, final=False)
        e.sender.keep_local()
        e.stats.rounds += 1
        t2 = e.clock()
        parts["final_pass"] = t2 - t1
        device_state = await e.handle.device_state()
        e.stats.digest = await digest.masked_digest_async(missing, spec.page_size)
        ch0 = e.ch0
        await ch0.write(
            pb.SourceFrame(
                postcopy_start=pb.PostCopyStart(
                    device_state=device_state,
                    missing_indices=stream.pack_indices(missing),
                    present_digest=e.stats.digest,
                )
            )
        )
        await e.verify_and_commit(ch0, t2, MigrationMode.POST_COPY)
        log.info(
            "migration %s: post-copy: the guest runs on %s; %d pages (%.1f MiB) to go",
            e.uid,
            e.target_node,
            len(missing),
            len(missing) * spec.page_size / 2**20,
        )
        e.stats.remaining_bytes = len(missing) * spec.page_size
        e._report(force=True)
        await self._push(tg, missing)
        await e.finish_success()

    async def resume(self, tg: asyncio.TaskGroup) -> None:
        """A source handler restarted in post-copy (the engine is ``readopted``): reach
        the target again within the recovery window, push what it reports missing, and
        finish the migration as an uninterrupted post-copy does."""
        e = self.engine
        window = float(e.config.post_copy_recovery_window_s)
        log.info(
            "migration %s: post-copy re-adopted after a restart: reconnecting to %s",
            e.uid,
            e.target_node,
        )
        try:
            missing = await self._reconnect(tg, window)
        except CompletedElsewhere:
            await e.finish_success()
            return
        e._report(force=True)
        await self._push(tg, missing)
        await e.finish_success()

    async def _push(self, tg: asyncio.TaskGroup, missing: stream.IndexArray) -> None:
        """Send ``missing`` (faulted pages first) until the target has every page;
        reconnect after a broken stream and go on from the target's own missing list."""
        e = self.engine
        window = float(e.config.post_copy_recovery_window_s)
        while True:
            try:
                await self._push_missing(missing)
                return
            except MigrationFailed as error:
                log.warning("migration %s: post-copy stream broken (%s): recovering", e.uid, error)
            e.stats.postcopy_interruptions += 1
            e._report(force=True)
            try:
                missing = await self._reconnect(tg, window)
            except CompletedElsewhere:
                return

    async def _push_missing(self, missing: stream.IndexArray) -> None:
        e = self.engine
        spec = e.handle.spec
        sent_mask = np.zeros(spec.page_count, dtype=np.bool_)
        round_no = e.stats.rounds
        ch0 = e.ch0
        pages = e.sender.pages()
        sent = [0]

        async def serve_faults() -> None:
            while True:
                blob = await ch0.requests.get()
                if blob is STOP_SERVING:
                    return
                ch0.check()
                wanted = stream.unpack_indices(blob, spec.page_count, "page_request")
                wanted = wanted[~sent_mask[wanted]]
                sent_mask[wanted] = True
                for off in range(0, len(wanted), stream.BATCH_PAGES):
                    chunk = wanted[off : off + stream.BATCH_PAGES]
                    await e.sender.send_batch(ch0, pages, chunk, round_no, False, 0, sent)

        try:
            async with asyncio.TaskGroup() as tg:
                server = tg.create_task(serve_faults())
                first = missing[~sent_mask[missing]][: stream.BATCH_PAGES]
                if first.size:  # one batch, then the failpoint; send_round does the rest
                    batch = await e.sender.send_batch(ch0, pages, first, round_no, False, 0, sent)
                    sent_mask[first[: batch.pages]] = True
                    failpoints.hit(failpoints.Step.SOURCE_POSTCOPY)
                # final=False: faulted pages may still follow on channel 0 until PostCopyEnd
                await e.sender.send_round(missing, round_no, final=False, sent_mask=sent_mask)
                ch0.requests.put_nowait(STOP_SERVING)  # let it finish what it has started
                await server
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
        except stream.ProtocolError as error:
            raise MigrationFailed(f"bad page request from the target: {error}") from None
        e.stats.rounds += 1
        await ch0.write(pb.SourceFrame(postcopy_end=pb.PostCopyEnd()))
        while True:
            frame = await ch0.next_control(DONE_TIMEOUT)
            if frame.WhichOneof("frame") == "postcopy_done":
                break
            if frame.WhichOneof("frame") is None:
                ch0.check()
        e.stats.postcopy_stall_ms = frame.postcopy_done.stall_seconds * 1000
        e.stats.postcopy_faults = int(frame.postcopy_done.faults)
        e.stats.remaining_bytes = 0
        log.info(
            "migration %s: post-copy done: guest stalled %.1f ms over %d faults",
            e.uid,
            e.stats.postcopy_stall_ms,
            e.stats.postcopy_faults,
        )

    async def _reconnect(self, tg: asyncio.TaskGroup, window: float) -> stream.IndexArray:
        """Reach the target again within ``window`` s; returns its missing pages."""
        e = self.engine
        deadline = e.clock() + window
        delay = RECONNECT_DELAY
        last = ""
        while e.clock() < deadline:
            try:
                await e.connect(tg, resume=True)
                frame = await e.ch0.next_control(CONNECT_TIMEOUT)
                if frame.WhichOneof("frame") != "postcopy_state":
                    raise MigrationFailed("the target did not report its missing pages")
                missing = stream.unpack_indices(
                    frame.postcopy_state.missing_indices, e.handle.page_count, "missing"
                )
                log.info("migration %s: post-copy resumed; %d pages missing", e.uid, len(missing))
                e.stats.remaining_bytes = len(missing) * e.handle.spec.page_size
                return missing
            except (MigrationFailed, TimeoutError, stream.ProtocolError) as error:
                last = (str(error).splitlines() or ["timeout"])[0][:200]
            if await self._completed_elsewhere():
                raise CompletedElsewhere
            await asyncio.sleep(min(delay, max(0.0, deadline - e.clock())))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
        log.warning("migration %s: post-copy recovery gave up; last error: %s", e.uid, last)
        raise MigrationFailed(
            f"post-copy: the target {e.target_node} was unreachable for longer than the "
            f"recovery window ({window:.0f}s, postCopyRecoveryWindowSeconds); the VM's memory "
            "was split between the two nodes, so it was stopped and must be started again"
        )

    async def _completed_elsewhere(self) -> bool:
        """The target recorded the completion (every page arrived there while this
        handler was away: vm_postcopy.py): nothing is left to send."""
        e = self.engine
        try:
            _, ms = await e.record.read()
        except Exception:  # the API away, or the record replaced: keep trying
            return False
        if ms.get(Field.COMPLETED):
            log.info("migration %s: the target recorded post-copy complete", e.uid)
            return True
        return False

    async def fail(self, reason: str) -> None:
        await fail_postcopy(self.engine, reason)


async def fail_postcopy(e: SourceEngine, reason: str) -> None:
    """Post-copy cannot finish (either driver): the VM is lost (its memory is split); say
    so, unless the target said so first (its own recovery window ended: the first reason
    stands)."""
    await e.handle.destroy()
    with contextlib.suppress(Exception):
        _, ms = await e.record.read()
        if ms.get(Field.FAILED) or ms.get(Field.COMPLETED):
            log.info("migration %s: already ended; its record stands", e.uid)
            return
    await e._sample_network()
    await e._patch_with_retry(
        {
            Field.FAILED: True,
            Field.FAILURE_REASON: reason,
            Field.END_TIMESTAMP: conditions.now_rfc3339(),
            Field.TRANSFER: e._transfer_status(),
        }
    )
    await mark_vmi_lost(e.api, e.vmi)


async def mark_vmi_lost(api: ApiClient, vmi: Obj) -> None:
    """The VMI is Failed (reason PostCopyFailed, Ready false): its guest runs nowhere
    (as KubeVirt fails a VMI whose post-copy migration failed). Retried while the API is
    away; a VMI that is gone or was replaced ends it."""
    meta = vmi["metadata"]
    while True:
        try:
            current = await api.get("VirtualMachineInstance", meta["namespace"], meta["name"])
            if current["metadata"]["uid"] != meta["uid"]:
                return
            status = current.setdefault("status", {})
            if (
                status.get("phase") == VMIPhase.FAILED
                and status.get("reason") == POSTCOPY_FAILED_REASON
                and not conditions.is_true(current, "Ready")
            ):
                return
            conditions.set_phase(status, VMIPhase.FAILED)
            status["reason"] = POSTCOPY_FAILED_REASON
            conditions.set_condition(
                status,
                "Ready",
                False,
                POSTCOPY_FAILED_REASON,
                "post-copy could not finish: the VM's memory is lost and it must be started again",
            )
            await api.update(current, subresource="status")
            return
        except Conflict:
            continue
        except NotFound:
            return
        except Forbidden as error:  # no longer bound to this node: its node marks it
            log.warning(
                "vmi %s/%s: not marking it failed: %s", meta["namespace"], meta["name"], error
            )
            return
        except ApiError as error:
            log.warning(
                "vmi %s/%s: cannot mark it failed yet (%s)", meta["namespace"], meta["name"], error
            )
            await asyncio.sleep(LOST_RETRY)
