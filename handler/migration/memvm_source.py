"""The sending side of one memvm live migration (DESIGN §3), run by the source handler.

One ``MemvmSourceMigration`` per attempt, on the shared skeleton of source.py; it owns a
TaskGroup with one reader task per channel (channels.py) and the timeout monitor.
Pages move through sender.py; what to do after each round, and when the timeouts end
pre-copy, is decided by convergence.py; post-copy is postcopy_source.py.

Steps:
 1. (source.py) ``startTimestamp``, the token; then ``parallelStreams`` mTLS channels to
    the target's migration endpoint, Hello/HelloAck.
 2. Pre-copy: round 0 clears the dirty log and sends all of RAM; each later round sends
    the pages dirtied meanwhile. After each round ``decide_after_round``: another round,
    throttle more (auto-converge), switch over (the remaining dirty memory fits the
    downtime budget at the measured rate), or post-copy. The monitor fails the migration
    on ``progressTimeout`` / ``completionTimeoutPerGiB`` (or asks for post-copy). A
    channel lost to the network (StreamLost) is ridden out: every channel is reopened
    (channels.Reconnect, until progressTimeout after the last progress) and the round
    is sent again; the switchover only starts on a complete set of connected channels.
 3. Switchover, timed in named parts: pause the guest (``pause``), send the last dirty
    pages (``final_pass``) while hashing RAM in threads and sending the device state as
    soon as the guest gives it, send the digest and collect the final acknowledgements
    (``state_transfer``), the target verifies the digest (``verify``).
 4. Hand-off: ``switchover: Committed`` recorded by the arbiter (resourceVersion
    precondition). Only then is Commit sent; the target resumes (``resume``) and answers
    Resumed; the source guest is destroyed.
 Any failure before the arbiter records Committed resumes the guest here; a failure
 after it leaves the VM to the target (which also watches the arbiter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import grpc
import numpy as np

from handler import stream
from handler.digest import ChunkDigest
from handler.drivers.base import DirtyLogHandle, GuestError, VMHandle, dirty_log
from handler.migration import channels, convergence
from handler.migration.channels import Channel
from handler.migration.convergence import Next, Round, TimeoutWatch, Verdict
from handler.migration.handoff import MigrationFailed
from handler.migration.postcopy_source import PostCopy
from handler.migration.sender import DirtyMeter, RoundResult, RoundSender
from handler.migration.source import PROGRESS_PERIOD, Clock, ProgressCallback, SourceEngine
from handler.migration.target_stream import StreamLost
from handler.migration.worker_link import BatchSent, SourceJob
from handler.migration.worker_pool import (
    RemoteChannel,
    WorkerPool,
    digest_path,
    open_with_workers,
)
from handler.peers import PeerRegistry
from vmferry import failpoints, pki
from vmferry.client import ApiClient
from vmferry.failpoints import Step
from vmferry.migration_state import Compression, MigrationMode
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)

VERIFY_TIMEOUT = 60.0  # s for the target to hash and answer Verified
RESUMED_TIMEOUT = 30.0  # s; after that the target resumes from the arbiter record anyway
MONITOR_PERIOD = 0.4  # s between timeout checks (KubeVirt's monitor period)


class MemvmSourceMigration(SourceEngine):
    driver_name = "memvm"
    handle: DirtyLogHandle  # the engine reads RAM and harvests the guest's dirty log

    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        vmi: dict[str, object],
        handle: VMHandle,
        tls: pki.TlsFiles | None,
        *,
        on_progress: ProgressCallback | None = None,
        clock: Clock = time.monotonic,
        peers: PeerRegistry | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        super().__init__(
            api,
            node_name,
            vmi,
            dirty_log(handle, "a memvm live migration"),
            tls,
            on_progress=on_progress,
            clock=clock,
            peers=peers,
        )
        self.paused = False  # set before pause(): a failure during pause still resumes
        self.switching = False  # the switchover began: the monitor stops
        self.postcopy_due = asyncio.Event()  # the completion timeout elapsed, post-copy allowed
        self.postcopy_active = False  # the guest runs on the target; pages still flow
        self.throttle = 0
        self.chunk_digest: ChunkDigest | None = None
        self.pending: stream.IndexArray = np.empty(0, dtype=np.int64)  # the target lacks these
        self.connections: list[grpc.aio.Channel] = []  # one per stream
        self.sender = RoundSender(
            self.handle,
            self.stats,
            # zstd per batch, kept only where it pays
            compress=self.config.compression != Compression.NONE,
            bandwidth=self.config.bandwidth_bytes,
            clock=clock,
            check_abort=self._check_abort_while_running,
            report=self._report,
        )
        self.meter: DirtyMeter | None = None
        self.postcopy = PostCopy(self)
        self.watch = TimeoutWatch(self.config, self.handle.spec.memory_bytes, clock())
        self.disconnected_since: float | None = None  # a pre-copy drop being ridden out
        self._tg: asyncio.TaskGroup | None = None  # the migration's (channel readers)
        self.workers = workers
        self.digest_path = Path(digest_path(self.handle.ram_path, self.uid, "source"))

    def readopt_postcopy(self) -> bool:
        """``run()`` reconnects and pushes the pages the target lacks (PostCopy.resume)
        instead of starting a migration."""
        super().readopt_postcopy()
        self.paused = self.switching = True
        self.postcopy_active = True
        self.stats.postcopy_interruptions += 1  # the restart is an interruption of post-copy
        return True

    @property
    def channels(self) -> list[Channel | RemoteChannel]:
        return self.sender.channels

    @property
    def ch0(self) -> Channel:
        """Channel 0: always this process's (the control frames travel on it)."""
        ch0 = self.channels[0]
        assert isinstance(ch0, Channel)
        return ch0

    def _memory_bytes(self) -> int:
        return self.handle.spec.memory_bytes

    def _check_abort_while_running(self) -> None:
        if not self.paused:
            self._check_abort()

    # -- the migration ----------------------------------------------------------------------

    async def _migrate(self) -> None:
        if self.readopted:
            async with asyncio.TaskGroup() as tg:
                await self.postcopy.resume(tg)
                self._close_channels()
            return
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self.connect(tg)
            self.watch = TimeoutWatch(self.config, self.handle.spec.memory_bytes, self.clock())
            tg.create_task(self._monitor())
            if await self._precopy():
                await self._switchover()
            else:
                await self.postcopy.run(tg)
            self._close_channels()

    def _close_channels(self) -> None:
        for ch in self.channels:
            ch.close()

    async def connect(self, tg: asyncio.TaskGroup, *, resume: bool = False) -> None:
        """Open (or, ``resume``: reopen after a drop, in pre-copy or post-copy) every
        channel to the target. Channels 1.. run in stream workers when this handler has
        them idle and the target answers channel 0's Hello with its own workers' ports
        (worker_pool.py); a reconnect, a cross-cluster hand-off or a target that answers
        without ports keeps every channel in this process."""
        count = max(1, min(self.config.parallel_streams, stream.MAX_CHANNELS))
        self._close_channels()
        await self._close_connections()
        self.sender.channels = []
        spec = self.handle.spec
        hello = pb.Hello(
            protocol_version=stream.PROTOCOL_VERSION,
            migration_uid=self.uid,
            token=self.token,
            channel_count=count,
            memory_bytes=spec.memory_bytes,
            page_size=spec.page_size,
            resume=resume,
        )
        workers = None
        if self.workers is not None and not resume and not self.peer_cluster:
            workers = self.workers.take(count - 1)
        if workers is None or self.workers is None:
            self.connections = channels.connect(
                self.target_address, self.target_node, self.dial_credentials(), count
            )
            self.sender.channels = list(
                await channels.open_channels(self.connections, tg, hello, self.target_address)
            )
            return
        spec = self.handle.spec
        job = SourceJob(
            address=self.target_address,  # each channel: its worker's port on this host
            target_node=self.target_node,
            tls=self.tls,
            hello=b"",  # each channel's own
            ram_path=str(self.handle.ram_path),
            page_size=spec.page_size,
            page_count=spec.page_count,
            digest_path=str(self.digest_path),
        )
        self.connections, self.sender.channels = [], []
        try:
            remote = await open_with_workers(
                tg,
                hello,
                workers,
                self.target_address,
                self.dial_credentials(),
                job,
                self._remote_batch,
                connections=self.connections,
                into=self.sender.channels,
            )
        finally:
            for worker in workers:  # those no channel took
                if worker.job is None:
                    self.workers.give_back(worker)
        if remote:
            log.info("migration %s: channels 1-%d run in stream workers", self.uid, count - 1)

    def _remote_batch(self, batch: BatchSent) -> None:
        """A stream worker sent a batch: the figures are this engine's."""
        self.stats.record_batch(self.clock(), batch.wire_bytes, batch.memory_bytes)
        self._report()

    async def _close_connections(self) -> None:
        connections, self.connections = self.connections, []
        for conn in connections:
            await conn.close()

    async def _cleanup(self) -> None:
        if self.chunk_digest is not None:
            self.chunk_digest.release()
        await self._close_connections()

    # -- pre-copy ---------------------------------------------------------------------------

    async def _precopy(self) -> bool:
        """Pre-copy rounds. True: converged (switch over now); False: switch to post-copy
        (``self.pending`` then holds every page the target lacks)."""
        spec = self.handle.spec
        self.handle.clear_dirty()
        # Never-written pages (holes in the RAM file) are zeros: round 0 neither reads nor
        # sends them (the target's fresh RAM is zeros too). A write after this point is
        # in the dirty log, cleared just before.
        data = await asyncio.to_thread(self.handle.data_pages)  # an lseek per extent
        # Every round's batches hash the pages they send into the digest as they gather
        # them (stream.build_batch): round 0 hashes all of RAM, later rounds what got
        # dirty; the switchover refreshes what is stale then (the last harvest).
        digest = self.chunk_digest = ChunkDigest(
            self.handle.ram(), spec.page_size, zero_pages=None if data is None else ~data
        )
        if any(isinstance(ch, RemoteChannel) for ch in self.channels):
            digest.share(self.digest_path)  # the workers hash what they send into it
        self.sender.digest = digest
        meter = self.meter = DirtyMeter(self.handle, self.clock, digest.invalidate)
        if data is None:
            indices = np.arange(spec.page_count, dtype=np.int64)
        else:
            indices = np.flatnonzero(data).astype(np.int64)
        untouched = (spec.page_count - len(indices)) * spec.page_size
        self.stats.processed_bytes += untouched
        self.stats.remaining_bytes = spec.memory_bytes - untouched
        rate = 0.0  # the transfer rate convergence estimates with
        try:
            for round_no in range(convergence.MAX_ROUNDS):
                meter.restart()
                result = await self._send_round(indices, round_no)
                self.stats.rounds = round_no + 1
                sent_pages = len(indices) - len(result.unsent)
                indices = meter.take()
                measured = Round(
                    round_no,
                    sent_pages * spec.page_size,
                    result.seconds,
                    len(indices) * spec.page_size,
                )
                rate = convergence.round_transfer_rate(rate, measured)
                decision = convergence.decide_after_round(
                    measured, rate, self.config, postcopy_due=self.postcopy_due.is_set()
                )
                if decision is Next.POST_COPY:
                    self.pending = np.union1d(indices, result.unsent)
                    return False
                self.stats.dirty_rate = measured.dirty_rate
                self.stats.remaining_bytes = measured.dirty_bytes
                # A round's progress is written when it ends, but the short rounds that
                # lead to the switchover keep the usual pace (a write every ~20 ms loaded
                # the controller and both handlers just before the pause).
                self._report(force=result.seconds >= PROGRESS_PERIOD)
                self._log_round(measured, rate)
                self._check_abort()
                if decision is Next.SWITCH_OVER:
                    self.pending = indices
                    await self.ensure_connected()
                    return True
                if decision is Next.GIVE_UP:
                    break
                if decision is Next.THROTTLE_MORE:
                    await self._throttle_more()
            raise MigrationFailed(f"did not converge within {convergence.MAX_ROUNDS} rounds")
        except BaseException:
            await self.unthrottle()
            raise

    async def _send_round(self, indices: stream.IndexArray, round_no: int) -> RoundResult:
        """One pre-copy round; a drop of the network is ridden out and the whole round
        sent again (the target's digest is made over what it finally holds: a page it
        receives twice is harmless)."""
        while True:
            try:
                return await self.sender.send_round(
                    indices, round_no, final=False, stop=self.postcopy_due
                )
            except BaseException as e:
                lost = channels.all_lost(e)
                if lost is None:
                    raise
            await self._ride_out(lost)

    async def ensure_connected(self) -> None:
        """Every channel is up (the switchover needs the complete set): a channel the
        network dropped since the last round is reopened first. The pages of every
        acknowledged round are in the target's RAM; the rest are pending."""
        for ch in self.channels:
            if isinstance(ch.error, StreamLost):
                await self._ride_out(ch.error)
                return
            ch.check()

    async def _ride_out(self, lost: StreamLost) -> None:
        """Reopen every channel within progressTimeout of the last progress, else fail
        with the time the network was unreachable."""
        assert self._tg is not None  # set by _migrate
        tg = self._tg
        since = self.disconnected_since = self.disconnected_since or self.clock()
        watch = self.watch
        log.warning(
            "migration %s: %s; reconnecting (for up to %.0f s)",
            self.uid,
            lost,
            watch.last_progress + watch.progress_timeout - since,
        )
        self._close_channels()
        reconnect = channels.Reconnect(
            reopen=lambda: self.connect(tg, resume=True),
            deadline=lambda: watch.last_progress + watch.progress_timeout,
            clock=self.clock,
            target_node=self.target_node,
            progress_timeout=watch.progress_timeout,
        )
        try:
            await reconnect.run(min(since, watch.last_progress), self.uid)
        finally:
            self.disconnected_since = None

    def _log_round(self, measured: Round, rate: float) -> None:
        log.info(
            "migration %s: round %d sent %d pages in %.3fs (%.0f MiB/s); %d dirty (%.1f MiB/s)%s",
            self.uid,
            measured.number,
            measured.sent_bytes // self.handle.spec.page_size,
            measured.seconds,
            rate / 2**20,
            measured.dirty_bytes // self.handle.spec.page_size,
            measured.dirty_rate / 2**20,
            f"; throttle {self.throttle}%" if self.throttle else "",
        )

    async def _throttle_more(self) -> None:
        """Auto-converge: slow the guest's CPU down one step."""
        self.throttle = convergence.next_throttle(self.throttle)
        self.stats.throttle_percent = max(self.stats.throttle_percent, self.throttle)
        await self.handle.set_throttle(self.throttle)
        log.info("migration %s: auto-converge: guest throttled to %d%%", self.uid, self.throttle)

    async def unthrottle(self) -> None:
        """The guest stays on the source (or pauses): give it its CPU back."""
        if self.throttle:
            self.throttle = 0
            with contextlib.suppress(GuestError):
                await self.handle.set_throttle(0)

    async def _monitor(self) -> None:
        """KubeVirt's migration monitor, every MONITOR_PERIOD s while pre-copy runs (see
        TimeoutWatch); also measures the guest's dirty rate within the running round.
        Ends when the switchover starts, or by asking for post-copy."""
        watch = self.watch
        while not self.switching:
            if self.meter is not None:
                live = self.meter.sample()
                if live is not None:
                    self.stats.dirty_rate = live
            now = self.clock()
            remaining = self.stats.remaining_bytes
            self._check_abort()
            verdict = watch.check(now, remaining)
            if verdict is Verdict.POST_COPY:
                log.info(
                    "migration %s: not completed after %.0f s: switching to post-copy",
                    self.uid,
                    now - watch.started,
                )
                self.postcopy_due.set()
                return
            if self.disconnected_since is None and any(
                isinstance(ch.error, StreamLost) for ch in self.channels
            ):
                # The network dropped a channel; the sender notices at its next write.
                self.disconnected_since = now
            stalled = verdict in (Verdict.STUCK, Verdict.TOO_LONG)
            if stalled and self.disconnected_since is not None:
                # Not the guest's doing: the target cannot be reached.
                limit = (
                    f"progressTimeout {watch.progress_timeout:.0f} s"
                    if verdict is Verdict.STUCK
                    else f"completion timeout {watch.completion_timeout:.0f} s"
                )
                raise MigrationFailed(
                    channels.unreachable_reason(
                        self.target_node,
                        now - min(self.disconnected_since, watch.last_progress),
                        limit,
                    )
                )
            if verdict is not Verdict.CONTINUE:
                raise MigrationFailed(
                    watch.message(
                        verdict,
                        now,
                        remaining,
                        f", the guest dirties {self.stats.dirty_rate / 2**20:.1f} MiB/s and "
                        f"{self.stats.transfer_rate / 2**20:.1f} MiB/s are sent",
                    )
                )
            await asyncio.sleep(MONITOR_PERIOD)

    # -- switchover -------------------------------------------------------------------------

    async def _switchover(self) -> None:
        parts = self.stats.downtime_parts
        digest, meter = self.chunk_digest, self.meter
        assert digest is not None and meter is not None  # made by _precopy
        self.switching = True  # ends the monitor; from here only a failure ends switchover
        # The last round's dirty pages are hashed while the guest still runs: the refresh
        # started at its harvest would otherwise compete with the final pass (measured:
        # a 1-2 MiB refresh stretched a 2 MiB final pass from ~3 to 10-20 ms).
        await digest.refresh_async()
        await self.ensure_connected()
        t0 = self.clock()
        self.paused = True  # set before the call: a failure during pause still resumes
        await self.handle.pause()
        failpoints.hit(Step.SOURCE_PAUSED)
        t1 = self.clock()
        parts["pause"] = t1 - t0
        # The pages written since the last harvest, hashed and the digest made while the
        # final pages travel (the memory is still; send_final); the rest of the final
        # pages were hashed by the refresh above, after that harvest, and any write to
        # them since is in this one.
        written = meter.take()
        final = np.union1d(self.pending, written)
        ch0 = self.ch0

        async def send_device_state() -> None:
            state = await self.handle.device_state()
            await ch0.write(pb.SourceFrame(device_state=pb.DeviceState(state=state)))

        # The device state goes out on channel 0 as soon as the guest has given it, so the
        # target writes its restart record while the final pages travel; FinalState
        # follows the final RoundEnds without waiting for their acknowledgements (the
        # target verifies only once every channel's final round is applied): one round
        # trip fewer.
        state_sent = asyncio.create_task(send_device_state())
        try:
            self.stats.remaining_bytes = len(final) * self.handle.spec.page_size
            self.sender.in_downtime = True
            self.stats.digest = await self.sender.send_final(
                final, self.stats.rounds, written, digest
            )
            self.sender.in_downtime = False
            self.stats.rounds += 1
            t2 = self.clock()
            parts["final_pass"] = t2 - t1
            await state_sent
        finally:
            if not state_sent.done():
                state_sent.cancel()
        await ch0.write(pb.SourceFrame(final_state=pb.FinalState(digest=self.stats.digest)))
        failpoints.hit(Step.SOURCE_FINAL_SENT)
        await self.sender.round_acks(self.stats.rounds - 1)
        await self.verify_and_commit(ch0, t2, MigrationMode.PRE_COPY)
        await self.finish_success()

    async def verify_and_commit(self, ch0: Channel, t2: float, mode: MigrationMode) -> None:
        """Steps shared by both switchovers, once the state is on its way (``t2``): the
        target's Verified, the arbiter record, Commit, and the target's Resumed."""
        parts = self.stats.downtime_parts
        t3 = self.clock()
        parts["state_transfer"] = t3 - t2
        frame = await ch0.next_control(VERIFY_TIMEOUT)
        if frame.WhichOneof("frame") != "verified":
            raise MigrationFailed(
                f"expected Verified from the target, got {frame.WhichOneof('frame')}"
            )
        t4 = self.clock()
        parts["verify"] = t4 - t3
        self.stats.target_digest = frame.verified.digest
        if not frame.verified.match:
            what = (
                "at switchover"
                if mode is MigrationMode.PRE_COPY
                else "of the pages already on the target"
            )
            raise MigrationFailed(
                f"memory digest mismatch {what}: source {self.stats.digest[:16]}…, "
                f"target {frame.verified.digest[:16]}…"
            )
        self.stats.digest_verified = True
        self.mode = mode
        failpoints.hit(Step.SOURCE_VERIFIED)
        await self._commit()
        t5 = self.clock()
        parts["decision"] = t5 - t4  # the arbiter record's compare-and-set
        failpoints.hit(Step.SOURCE_COMMITTED)
        self.postcopy_active = mode is MigrationMode.POST_COPY
        try:
            await ch0.write(pb.SourceFrame(commit=pb.Commit()))
        except MigrationFailed as e:
            if self.postcopy_active:
                raise  # post-copy's own recovery takes it from here
            # Pre-copy: the decision stands and the target resumes from the arbiter's
            # record (it may have learned it from its VMI watch and died since): this side
            # still records the completion and destroys its paused guest.
            log.warning(
                "migration %s: the Commit frame could not be sent (%s); the target resumes "
                "from the recorded hand-off",
                self.uid,
                e,
            )
            return
        # The target resumes on Commit or on the arbiter record, whichever comes first: a
        # lost Resumed changes nothing (and in post-copy, recovery handles a break).
        with contextlib.suppress(TimeoutError, MigrationFailed):
            frame = await ch0.next_control(RESUMED_TIMEOUT)
            if frame.WhichOneof("frame") == "resumed":
                parts["resume"] = self.clock() - t5

    async def finish_success(self) -> None:
        """Record completion, then destroy the paused source guest (it never runs again:
        the arbiter says the target owns the VM), so Succeeded does not wait on teardown."""
        await self._record_success()
        if self.chunk_digest is not None:
            self.chunk_digest.release()
        await self.handle.destroy()
        failpoints.hit(Step.SOURCE_DESTROYED)
        self._log_success("")

    # -- failure (the rest is SourceEngine._fail) --------------------------------------------

    def _arbiter_decides(self) -> bool:
        return self.paused

    def _holding_progress(self) -> bool:
        return self.paused and not self.committed

    async def _abort_target(self, reason: str) -> None:
        if self.postcopy_active:
            self._close_channels()
            return
        abort = pb.SourceFrame(abort=pb.Abort(reason=reason)).SerializeToString()
        local = [ch.call for ch in self.channels if isinstance(ch, Channel)]
        await self._abort_streams(local, abort)  # the target's handler releases its workers
        self._close_channels()

    async def _fail_committed(self, reason: str) -> None:
        if self.postcopy_active:
            await self.postcopy.fail(reason)
        else:
            await super()._fail_committed(reason)

    def _describe_start(self) -> str:
        return f"memvm, {self.config.parallel_streams} stream(s)"
