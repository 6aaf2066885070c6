"""QEMU post-copy through the tunnel: the source's hand-off, QEMU's own recovery after a
broken tunnel, and the end (the sequence is in the header of tunnel.proto).

QEMU moves the pages itself (``migrate-start-postcopy``: the source guest stops, the
device state travels, the target requests the pages its guest faults on over the return
path, the rest is pushed in the background); vmferry decides the hand-off and carries
the streams. The incoming QEMU runs with ``-S``, so its guest stays paused after the
device state until the target handler's ``cont`` -- which runs only once the arbiter
recorded Committed (mode PostCopy). Nothing is verified by digest in post-copy: the
pages the target lacks are still on the source, and the target's guest writes its own.

A tunnel that breaks in post-copy pauses both QEMUs (``postcopy-paused``; the guest runs
on, stalled on the pages it lacks). The source runs ``migrate`` with ``resume``; QEMU's
new connection becomes a new tunnel stream (Open.resume), on which the target runs
``migrate-recover`` and connects its QEMU; QEMU then re-syncs its page bitmaps and goes
on. Retried until postCopyRecoveryWindowSeconds; after that the VM is lost (its memory
is split between two nodes): the source is destroyed, the migration and the VMI Failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from handler.drivers.base import GuestError
from handler.migration.handoff import MigrationFailed
from handler.migration.postcopy_source import fail_postcopy
from handler.migration.qemu_channel import TunnelChannel
from handler.migration.target_state import TargetState
from handler.migration.tunnel import ProtocolError
from vmferry.rpc import tunnel_pb2 as pb

if TYPE_CHECKING:
    from handler.drivers.qemu import QemuDriver
    from handler.migration.incoming import IncomingRegistry
    from handler.migration.qemu_source import QemuSourceMigration
    from handler.migration.qemu_target import TunnelState

log = logging.getLogger(__name__)
Obj = dict[str, Any]

# QEMU's query-migrate statuses of post-copy (QEMU's strings)
QEMU_POSTCOPY_ACTIVE = "postcopy-active"
QEMU_POSTCOPY_PAUSED = "postcopy-paused"
QEMU_POSTCOPY_RECOVER = "postcopy-recover"
QEMU_COMPLETED = "completed"
QEMU_ENDED = ("failed", "cancelled")
POLL_PERIOD = 0.2  # s between query-migrate polls
START_TIMEOUT = 30.0  # s for QEMU to reach postcopy-active after migrate-start-postcopy
HANDOFF_TIMEOUT = 30.0  # s for the target's Verified / Resumed
DONE_TIMEOUT = 60.0  # s for the target's PostCopyDone once the source QEMU completed
RECOVER_DELAY = 0.5  # s between recovery attempts, doubled up to RECOVER_MAX_DELAY
RECOVER_MAX_DELAY = 2.0
RESUME_CONNECT_TIMEOUT = 15.0  # s for QEMU's resume connection to become a tunnel stream
PAUSED_TIMEOUT = 10.0  # s for the target QEMU to notice the broken stream (postcopy-paused)


class QemuPostCopy:
    """The source side of one QEMU post-copy, on its engine's channels and record."""

    def __init__(self, engine: QemuSourceMigration) -> None:
        self.engine = engine
        self.resuming: TunnelChannel | None = None  # a recovery's stream, for QEMU to take
        self._taken = asyncio.Event()
        self.retired_bytes = 0  # what the streams a recovery replaced carried

    async def run(self) -> None:
        """QEMU was told migrate-start-postcopy: hand the VM over once QEMU is in
        post-copy, keep QEMU's streams up (recovering them) until it completes, end."""
        e = self.engine
        parts = e.stats.downtime_parts
        t0 = e.clock()
        await self._wait_started()
        ch0 = e._channels[0]
        await ch0.write(
            pb.TunnelSourceFrame(
                postcopy_start=pb.PostCopyStart(last_console_unix_ns=e.qemu.console_mtime_ns())
            )
        )
        frame = await ch0.next_control(HANDOFF_TIMEOUT, "Verified")
        if frame.WhichOneof("frame") != "verified" or not frame.verified.match:
            detail = frame.verified.detail if frame.WhichOneof("frame") == "verified" else ""
            raise MigrationFailed(f"the target did not take the post-copy hand-off: {detail}")
        t1 = e.clock()
        parts["postcopy_start"] = t1 - t0
        await e._commit()
        await ch0.write(pb.TunnelSourceFrame(commit=pb.Commit()))
        with contextlib.suppress(MigrationFailed):  # a broken tunnel: recovered below
            frame = await ch0.next_control(HANDOFF_TIMEOUT, "Resumed")
            if frame.WhichOneof("frame") == "resumed":
                parts["resume"] = e.clock() - t1
                if frame.resumed.guest_gap_ms > 0:
                    e.stats.guest_downtime_ms = frame.resumed.guest_gap_ms
        log.info(
            "migration %s: post-copy: the guest runs on %s; %.1f MiB to go",
            e.uid,
            e.target_node,
            e.stats.remaining_bytes / 2**20,
        )
        e._report(force=True)
        await self._until_completed()
        await self._end(t0)

    async def rejoin(self) -> None:
        """The engine of a handler restarted in post-copy (``readopt_postcopy``): QEMU's
        connection died with the previous handler, so QEMU pauses its post-copy
        (``postcopy-paused``) if it had not completed; recover it on a new tunnel stream
        as after a network break (the target waits for that within the recovery window),
        then run to the end."""
        t0 = self.engine.clock()
        await self._until_completed()
        await self._end(t0)

    async def _wait_started(self) -> None:
        """Until the source QEMU is postcopy-active (its guest stopped)."""
        e = self.engine
        deadline = e.clock() + START_TIMEOUT
        while True:
            info = await e.qemu.qmp("query-migrate")
            status = info.get("status", "")
            e._absorb(info)
            if status in (QEMU_POSTCOPY_ACTIVE, QEMU_POSTCOPY_PAUSED, QEMU_COMPLETED):
                return
            if status in QEMU_ENDED:
                raise MigrationFailed(
                    f"QEMU's migration {status} when it switched to post-copy: "
                    f"{info.get('error-desc', 'no detail')}"
                )
            if e.clock() > deadline:
                raise MigrationFailed(
                    f"QEMU did not switch to post-copy within {START_TIMEOUT:.0f}s ({status})"
                )
            await asyncio.sleep(0.02)

    async def _until_completed(self) -> None:
        """Poll QEMU until it completed; recover a paused post-copy."""
        e = self.engine
        while True:
            info = await e.qemu.qmp("query-migrate")
            status = info.get("status", "")
            e._absorb(info)
            e.stats.postcopy_faults = int((info.get("ram") or {}).get("postcopy-requests", 0))
            e._report()
            if status == QEMU_COMPLETED:
                e.completed_in_qemu = True
                return
            if status == QEMU_POSTCOPY_PAUSED:
                await self._recover()
                continue
            if status in QEMU_ENDED:
                raise MigrationFailed(
                    f"QEMU's post-copy migration {status}: {info.get('error-desc', 'no detail')}"
                    "; the VM's memory was split between the two nodes, so it was stopped "
                    "and must be started again"
                )
            if e.abort_requested.is_set():
                log.warning("migration %s: cancel refused: in post-copy", e.uid)
                e.abort_requested.clear()
            await asyncio.sleep(POLL_PERIOD)

    async def _recover(self) -> None:
        """The tunnel broke (QEMU: postcopy-paused): ``migrate`` with ``resume`` until
        QEMU runs post-copy again, within the recovery window."""
        e = self.engine
        window = float(e.config.post_copy_recovery_window_s)
        deadline = e.clock() + window
        e.stats.postcopy_interruptions += 1
        e._report(force=True)
        log.warning("migration %s: post-copy paused (the tunnel broke): recovering", e.uid)
        delay = RECOVER_DELAY
        last = "no attempt"
        while True:
            status = (await e.qemu.qmp("query-migrate")).get("status", "")
            if status not in (QEMU_POSTCOPY_PAUSED, QEMU_POSTCOPY_RECOVER):
                log.info("migration %s: post-copy recovered (%s)", e.uid, status)
                return
            if e.clock() > deadline:
                log.warning(
                    "migration %s: post-copy recovery gave up (%s): %s", e.uid, status, last
                )
                raise MigrationFailed(
                    f"post-copy: the target {e.target_node} was unreachable for longer "
                    f"than the recovery window ({window:.0f}s, "
                    "postCopyRecoveryWindowSeconds); the VM's memory was split between "
                    "the two nodes, so it was stopped and must be started again"
                )
            if status == QEMU_POSTCOPY_PAUSED:
                try:
                    await self._resume_once()
                    delay = RECOVER_DELAY
                except MigrationFailed as error:
                    last = str(error)
                    log.info("migration %s: post-copy recovery attempt failed: %s", e.uid, last)
                    await asyncio.sleep(min(delay, max(0.0, deadline - e.clock())))
                    delay = min(delay * 2, RECOVER_MAX_DELAY)
                    continue
            await asyncio.sleep(POLL_PERIOD)

    async def _resume_once(self) -> None:
        """One recovery attempt: a new tunnel stream (Open.resume: the target runs
        ``migrate-recover`` and connects its QEMU), then ``migrate`` with ``resume``,
        whose connection takes that stream (``take_resumed_channel``). The stream is open
        before the source QEMU connects: QEMU 7.2's source stays in postcopy-recover for
        good when its connection breaks during the recovery's handshake, so the source
        QEMU must only connect once the path to the target QEMU exists. MigrationFailed
        if the stream could not be opened (the target still unreachable)."""
        e = self.engine
        ch = await e._open_tunnel(0, False, resume=True)
        self.resuming = ch
        self._taken.clear()
        try:
            await e.qemu.qmp("migrate", {"uri": f"unix:{e._sock}", "resume": True})
            async with asyncio.timeout(RESUME_CONNECT_TIMEOUT):
                await self._taken.wait()
        except GuestError as error:
            ch.call.cancel()
            raise MigrationFailed(f"QEMU refused to resume the migration: {error}") from None
        except TimeoutError:
            ch.call.cancel()
            raise MigrationFailed("QEMU did not connect to resume the migration") from None
        finally:
            self.resuming = None
        log.info("migration %s: post-copy resumes on a new tunnel stream", e.uid)
        if not e._channels:  # the first stream of a re-adopted engine (rejoin)
            e._channels.append(ch)
            return
        old, e._channels[0] = e._channels[0], ch
        self.retired_bytes += old.sent + old.received
        old.call.cancel()  # its pumps end (QEMU may have paused with the stream still up)

    def take_resumed_channel(self) -> TunnelChannel | None:
        """The stream a recovery opened, for QEMU's resume connection (once)."""
        ch, self.resuming = self.resuming, None
        self._taken.set()
        return ch

    async def _end(self, t0: float) -> None:
        """QEMU completed: tell the target, wait for its QEMU to complete too, destroy the
        source, record the success."""
        e = self.engine
        for ch in e._channels:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DONE_TIMEOUT):
                    await ch.upstream_done.wait()
        if e._channels:  # none: a re-adopted engine whose QEMU had completed already
            await self._tell_target_done(e._channels[0])
        e.stats.remaining_bytes = 0
        await e.finish_success(
            f", post-copy {e.clock() - t0:.1f}s, {e.stats.postcopy_faults} page request(s), "
            f"{e.stats.postcopy_interruptions} interruption(s)"
        )

    async def _tell_target_done(self, ch0: TunnelChannel) -> None:
        """PostCopyEnd, and the target's PostCopyDone. Without it nothing is lost: the
        source QEMU completed, so the target QEMU acknowledged every page on its return
        path already; the target's record ends with the migration's."""
        try:
            await ch0.write(pb.TunnelSourceFrame(postcopy_end=pb.PostCopyEnd()))
            frame = await ch0.next_control(DONE_TIMEOUT, "PostCopyDone")
            if frame.WhichOneof("frame") != "postcopy_done":
                raise MigrationFailed(f"expected PostCopyDone, got {frame.WhichOneof('frame')}")
        except MigrationFailed as error:
            log.warning("migration %s: no PostCopyDone from the target: %s", self.engine.uid, error)

    async def fail(self, reason: str) -> None:
        """Post-copy cannot finish after the hand-off: the VM is lost."""
        await fail_postcopy(self.engine, reason)


# -- target side --------------------------------------------------------------------------

# The target's answer to PostCopyStart: nothing to compare (see the module's header).
HANDED_OFF = pb.TunnelTargetFrame(
    verified=pb.Verified(match=True, detail="post-copy: QEMU moves the pages still missing")
)


async def recover_incoming(
    driver: QemuDriver, state: TunnelState
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
    """A post-copy recovery's channel 0 on the target: the old connection closed (the
    incoming QEMU pauses, if it has not noticed the break yet), ``migrate-recover`` on a
    new socket, connected. GuestError, OSError or TimeoutError.

    Only out-of-band QMP here: in a paused post-copy the incoming QEMU's main thread may
    be blocked on a page that cannot arrive (under TCG a vCPU can fault holding the big
    lock), and then every in-band command -- query-migrate too -- waits with it, while
    ``migrate-recover`` (``allow-oob``) runs in the monitor's thread and its listener
    accepts there too. Retried until QEMU has noticed the break (it refuses the command
    until it is postcopy-paused)."""
    h = state.handle
    if state.ch0_writer is not None:
        state.ch0_writer.close()
    state.recoveries += 1
    sock = driver.sock_path(h.vm_id, f"in{state.recoveries}")
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock.unlink(missing_ok=True)
    deadline = time.monotonic() + PAUSED_TIMEOUT
    while True:
        try:
            await h.qmp("migrate-recover", {"uri": f"unix:{sock}"}, oob=True)
            break
        except GuestError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    async with asyncio.timeout(RESUME_CONNECT_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(str(sock))
    state.inc.disconnected_since = None
    log.info(
        "migration %s: post-copy recovery %d: the incoming QEMU reconnected",
        state.inc.migration_uid,
        state.recoveries,
    )
    return writer, reader


async def resume_incoming(
    incoming: IncomingRegistry,
    state: TunnelState,
    out: asyncio.Queue[pb.TunnelTargetFrame | None],
) -> None:
    """The Commit of a post-copy: the VM manager resumes the guest (``cont``; QEMU runs
    it as soon as its device state is loaded), then Resumed."""
    t0 = time.monotonic()
    try:
        await incoming.on_commit(state.inc)
    except GuestError as e:
        await out.put(pb.TunnelTargetFrame(failure=pb.Failure(reason=str(e))))
        return
    gap = state.handle.resume_gap_ms
    await out.put(
        pb.TunnelTargetFrame(
            resumed=pb.Resumed(resume_seconds=time.monotonic() - t0, guest_gap_ms=gap or 0.0)
        )
    )


async def end_incoming(incoming: IncomingRegistry, state: TunnelState) -> pb.TunnelTargetFrame:
    """PostCopyEnd (the source QEMU completed): once the incoming QEMU completed too, the
    migration is done here (PostCopyDone). ProtocolError before the resume."""
    inc = state.inc
    if state.resume_task is not None:
        await state.resume_task
    if not inc.state.guest_runs_here:
        raise ProtocolError(f"PostCopyEnd in state {inc.state}")
    try:
        async with asyncio.timeout(DONE_TIMEOUT):
            while True:
                status = (await state.handle.qmp("query-migrate")).get("status")
                if status == QEMU_COMPLETED:
                    break
                if status in QEMU_ENDED:
                    raise GuestError(f"the incoming QEMU's post-copy {status}")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise GuestError(
            f"the incoming QEMU did not complete its post-copy within {DONE_TIMEOUT:.0f}s"
        ) from None
    inc.move(TargetState.POSTCOPY_DONE, "PostCopyEnd")
    await incoming.on_postcopy_done(inc)
    log.info(
        "migration %s: post-copy done here after %d recovery(ies)",
        inc.migration_uid,
        state.recoveries,
    )
    return pb.TunnelTargetFrame(
        postcopy_done=pb.PostCopyDone(seconds=time.monotonic() - state.postcopy_started_at)
    )
