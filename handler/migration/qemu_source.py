"""The sending side of one QEMU live migration, through vmferry's mTLS tunnel.

QEMU migrates its guest itself; vmferry carries the byte stream and decides the
hand-off (the sequence is in the header of ``proto/vmferry/rpc/tunnel.proto``). On the
shared skeleton of source.py:

 1. (source.py) ``startTimestamp``, the token. Set QEMU's capabilities and parameters
    from the effective migration configuration (qemu_plan.py), listen on a local unix
    socket and ``migrate`` QEMU to it. Each connection QEMU opens becomes one Tunnel
    stream (``TunnelChannel``, qemu_channel.py) to the target handler.
 2. Monitor ``query-migrate`` (progress, dirty rate, remaining → VMI status and metrics)
    and enforce ``progressTimeout`` / ``completionTimeoutPerGiB`` (convergence.py's
    TimeoutWatch; with ``allowPostCopy``: switch to post-copy instead of failing) and
    cancel (``abortRequested`` → ``migrate_cancel``). Any failure here leaves QEMU running.
 3. QEMU ``completed``: the source guest is paused (``postmigrate``). The verified
    switchover and the hand-off (qemu_switchover.py); a failure before the arbiter's
    record resumes the guest on the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import grpc

from handler.drivers.base import DriverError, GuestError
from handler.drivers.qemu import QemuDriver, QemuHandle
from handler.migration import channels, tunnel
from handler.migration.convergence import TimeoutWatch, Verdict
from handler.migration.handoff import MigrationFailed
from handler.migration.qemu_channel import TunnelChannel
from handler.migration.qemu_plan import QemuPlan
from handler.migration.qemu_postcopy import QemuPostCopy
from handler.migration.qemu_switchover import VERIFY_OFF, QemuSwitchover
from handler.migration.source import Clock, ProgressCallback, SourceEngine, rpc_problem
from handler.migration.storage import mirrored_disks
from handler.migration.storage_source import StorageSource
from handler.peers import PeerRegistry
from vmferry import grpc_options, pki
from vmferry.client import ApiClient
from vmferry.migration_state import MigrationMode
from vmferry.rpc import tunnel_pb2 as pb

log = logging.getLogger(__name__)
Obj = dict[str, Any]

CONNECT_TIMEOUT = 10.0
ACCEPT_TIMEOUT = 20.0  # s for QEMU to open all its connections once migrate started
POLL_PERIOD = 0.2  # s between query-migrate polls
# QEMU's query-migrate statuses (QEMU's strings, not vmferry's)
QEMU_ACTIVE = "active"
QEMU_POSTCOPY_ACTIVE = "postcopy-active"
QEMU_COMPLETED = "completed"
QEMU_PRE_SWITCHOVER = "pre-switchover"  # pause-before-switchover: the guest is stopped
QEMU_ENDED = ("failed", "cancelled")
QEMU_MOVING = (QEMU_ACTIVE, "setup", "pre-switchover", "device")
POSTCOPY_BEFORE_HANDOFF = (QEMU_POSTCOPY_ACTIVE, "postcopy-paused", "postcopy-recover")


class QemuSourceMigration(SourceEngine):
    """The sending side of one QEMU migration."""

    driver_name = "qemu"

    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        vmi: Obj,
        handle: QemuHandle,
        tls: pki.TlsFiles | None,
        driver: QemuDriver,
        *,
        on_progress: ProgressCallback | None = None,
        clock: Clock = time.monotonic,
        peers: PeerRegistry | None = None,
    ) -> None:
        self.qemu = handle
        super().__init__(
            api, node_name, vmi, handle, tls, on_progress=on_progress, clock=clock, peers=peers
        )
        self.driver = driver
        self.verify = handle.qspec.verify
        self.plan = QemuPlan.from_config(
            self.config,
            memory_bytes=handle.qspec.memory_bytes,
            verify=self.verify != VERIFY_OFF,
        )
        self.completed_in_qemu = False  # source paused in postmigrate
        self._channels: list[TunnelChannel] = []
        self._grpc: grpc.aio.Channel | None = None
        self._multifd_conns: list[grpc.aio.Channel] = []  # multifd channel i on [i - 1]
        self._server: asyncio.Server | None = None
        self._sock = driver.sock_path(f"{handle.vm_id}.{self.uid[:8]}", "mig")
        self._channels_ready = asyncio.Event()
        self._accept_error: BaseException | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.storage: StorageSource | None = None  # a storage migration's mirrored disks
        self.postcopy = QemuPostCopy(self)
        self.switchover = QemuSwitchover(self)
        self._switchover_continued = False  # migrate-continue was sent
        self._downtime_limit = self.plan.downtime_at(1)  # QEMU's, as last set

    def _memory_bytes(self) -> int:
        return self.qemu.qspec.memory_bytes

    def _describe_start(self) -> str:
        return f"qemu, verify {self.verify}, {self.plan.channel_count} channel(s)"

    async def _migrate(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if self.readopted:  # a restarted handler: QEMU's post-copy goes on (rejoin)
                await self._listen()
                await self.postcopy.rejoin()
                self._close_streams()
                return
            await self._start()
            await self._monitor()
            if self.mode is MigrationMode.POST_COPY:
                await self.postcopy.run()
            else:
                await self.switchover.run()
            # End every tunnel stream (multifd channels idle after QEMU finished),
            # so the TaskGroup's pumps return.
            self._close_streams()

    def _close_streams(self) -> None:
        for ch in self._channels:
            ch.call.cancel()
        for w in self._writers:
            w.close()

    async def _cleanup(self) -> None:
        self.switchover.cancel_digest()
        if self.storage is not None:
            await self.storage.close()
        self._close_streams()
        if self._server is not None:
            self._server.close()
        self._sock.unlink(missing_ok=True)
        if self._grpc is not None:
            await self._grpc.close()
        for conn in self._multifd_conns:
            await conn.close()

    # -- status ---------------------------------------------------------------------------

    def _transfer_status(self) -> Obj:
        out = self.stats.as_status()
        out["verifyMode"] = self.verify
        out["repairedPages"] = self.switchover.repaired_pages
        if self.mode is MigrationMode.POST_COPY:  # QEMU's page requests (postcopy-requests)
            out["postCopyFaults"] = self.stats.postcopy_faults
        if self.storage is not None:
            out["mirroredDisks"] = [d.name for d in self.storage.disks]
            out["repairedDiskBlocks"] = self.storage.repaired_blocks
            out["diskMirrorMilliseconds"] = round(self.storage.mirror_seconds * 1000)
        return self._with_recorded_figures(out)

    def _refresh_stats(self) -> None:
        self.stats.wire_bytes = self.postcopy.retired_bytes + sum(
            ch.sent + ch.received for ch in self._channels
        )

    # -- start: tunnel + QEMU -------------------------------------------------------------

    async def _start(self) -> None:
        await self._listen()
        # every multifd channel on its own connection (channels.connect: streams on one
        # HTTP/2 connection share its flow control and its one TLS stream)
        self._multifd_conns = channels.connect(
            self.target_address,
            self.target_node,
            self.dial_credentials(),
            self.plan.multifd_channels,
        )
        h = self.qemu
        if self.verify != VERIFY_OFF:  # the digest at the pause: no page fault per page
            self._spawn(self._map_ram())
        capabilities = self.plan.capabilities()
        if await self._start_mirrors() or self.switchover.digests_at_stop():
            capabilities.append({"capability": "pause-before-switchover", "state": True})
        await h.qmp("migrate-set-capabilities", {"capabilities": capabilities})
        await h.qmp("migrate-set-parameters", self.plan.parameters())
        await h.qmp("migrate", {"uri": f"unix:{self._sock}"})
        self.stats.first_byte_at = self.clock()
        try:
            async with asyncio.timeout(ACCEPT_TIMEOUT):
                while not self._channels_ready.is_set():
                    if self._accept_error is not None:
                        raise self._accept_error
                    status = (await h.qmp("query-migrate")).get("status")
                    if status in QEMU_ENDED:
                        raise MigrationFailed(f"QEMU's migration {status} before it connected")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(POLL_PERIOD):
                            await self._channels_ready.wait()
        except TimeoutError:
            raise MigrationFailed(
                f"QEMU opened {len(self._channels)} of {self.plan.channel_count} migration "
                f"connections within {ACCEPT_TIMEOUT:.0f}s"
            ) from None
        if self._accept_error is not None:
            raise self._accept_error

    async def _listen(self) -> None:
        """The connection to the target and the unix socket QEMU's connections come to."""
        self._grpc = channels.dial(
            self.target_address,
            self.target_node,
            self.dial_credentials(),
            list(grpc_options.channel_options(grpc_options.MIGRATION_KEEPALIVE_MS)),
        )
        self._sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sock.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(self._sock), limit=tunnel.READ_LIMIT
        )

    async def _map_ram(self) -> None:
        """The RAM mapped here with its page tables filled, while pre-copy runs (a guest
        that never migrated has no mapping yet; QemuHandle.map_ram)."""
        try:
            await asyncio.to_thread(self.qemu.map_ram)
        except (OSError, DriverError) as e:  # the digest maps it then, page by page
            log.warning("migration %s: cannot map the guest's RAM ahead: %s", self.uid, e)

    async def _start_mirrors(self) -> bool:
        """A storage migration (``handler.migration.storage``): mirror the disks whose
        volume names another claim now, until every mirror is ready. False: none."""
        volumes = self.driver.volumes
        if volumes is None or not self.qemu.qspec.disks:
            return False
        disks = mirrored_disks(
            self.qemu.qspec.disks, self.vmi.get("spec") or {}, await volumes.claims(self.vmi)
        )
        if not disks:
            return False
        self.storage = StorageSource(
            self.qemu,
            disks,
            self.driver.sock_path(f"{self.qemu.vm_id}.{self.uid[:8]}", "nbd"),
            self._open_tunnel,
            self._spawn,
        )
        await self.storage.start()
        await self.storage.wait_ready(self._tick, self.clock, float(self.config.progress_timeout))
        return True

    def _tick(self) -> None:
        self._check_abort()
        self._report()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        assert self._tg is not None
        return self._tg.create_task(coro)

    async def _open_tunnel(self, cid: int, nbd: bool, resume: bool = False) -> TunnelChannel:
        """A new Tunnel stream to the target, opened; MigrationFailed."""
        if self._grpc is None:
            raise MigrationFailed("the migration is over")
        ch = TunnelChannel(cid, tunnel.open_call(self._grpc))
        await self._open(ch, nbd, resume)
        return ch

    async def _open(self, ch: TunnelChannel, nbd: bool, resume: bool = False) -> None:
        """Open → Opened on the stream; MigrationFailed."""
        cid = ch.id
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await ch.write(pb.TunnelSourceFrame(open=self._open_frame(cid, nbd, resume)))
                first = await ch.call.read()
            if first is grpc.aio.EOF or first.WhichOneof("frame") != "opened":
                raise MigrationFailed(f"the target did not open tunnel channel {cid}")
        except grpc.aio.AioRpcError as e:
            ch.call.cancel()
            raise MigrationFailed(
                f"cannot open the tunnel to {self.target_address}: {rpc_problem(e)}"
            ) from None
        except TimeoutError:
            ch.call.cancel()
            raise MigrationFailed(f"the target {self.target_address} did not answer") from None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One QEMU connection: open its Tunnel stream and pump both ways."""
        if self.postcopy.resuming is not None:
            await self._accept_resume(reader, writer)
            return
        cid = len(self._channels)
        self._writers.append(writer)
        if cid >= self.plan.channel_count or self._grpc is None or self._tg is None:
            writer.close()
            return
        ch = TunnelChannel(cid, tunnel.open_call(self._connection(cid)))
        self._channels.append(ch)
        try:
            await self._open(ch, False)
        except MigrationFailed as e:
            self._accept_error = e
            self._channels_ready.set()
            writer.close()
            return
        self._tg.create_task(self._pump_down(ch, writer))
        self._tg.create_task(self._pump_up(ch, reader, writer))
        if len(self._channels) == self.plan.channel_count:
            self._channels_ready.set()

    async def _accept_resume(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """QEMU's connection of a post-copy recovery (``migrate`` with ``resume``): it
        takes the stream the recovery opened (Open.resume) before it ran ``migrate``."""
        self._writers.append(writer)
        ch = self.postcopy.take_resumed_channel()
        if ch is None or self._tg is None:
            writer.close()
            return
        self._tg.create_task(self._pump_down(ch, writer))
        self._tg.create_task(self._pump_up(ch, reader, writer))

    async def _pump_down(self, ch: TunnelChannel, writer: asyncio.StreamWriter) -> None:
        await ch.downstream(writer)
        if ch.error is not None and self.mode is MigrationMode.POST_COPY:
            writer.close()  # the tunnel broke: QEMU notices, pauses post-copy, recovers

    def _connection(self, cid: int) -> grpc.aio.Channel:
        """The connection of migration channel ``cid``: the main one for channel 0."""
        assert self._grpc is not None
        return self._multifd_conns[cid - 1] if cid > 0 else self._grpc

    def _open_frame(self, cid: int, nbd: bool = False, resume: bool = False) -> pb.Open:
        return pb.Open(
            protocol_version=tunnel.TUNNEL_PROTOCOL_VERSION,
            migration_uid=self.uid,
            token=self.token,
            channel_id=cid,
            channel_count=self.plan.channel_count,
            memory_bytes=self.qemu.qspec.memory_bytes,
            page_size=tunnel.PAGE_SIZE,
            verify=tunnel.VERIFY_MODES[self.verify],
            postcopy=self.plan.postcopy,
            nbd=nbd,
            resume=resume,
        )

    async def _pump_up(
        self, ch: TunnelChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await ch.upstream(reader)
        except MigrationFailed as e:
            if not self.completed_in_qemu:
                ch.error = ch.error or e
                log.info("migration %s: %s", self.uid, e)
            if self.mode is MigrationMode.POST_COPY:
                writer.close()  # the tunnel broke: QEMU notices, pauses post-copy, recovers

    # -- monitor --------------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Poll query-migrate until QEMU completed, woken at once by its MIGRATION events
        (capability ``events``); enforce timeouts and cancel."""
        h = self.qemu
        watch = TimeoutWatch(
            self.config, self._memory_bytes(), self.clock(), allow_postcopy=self.plan.postcopy
        )
        async with h.migration_events() as wake:
            while True:
                info = await h.qmp("query-migrate")
                status = info.get("status", "")
                self._absorb(info)
                self._report()
                if status == QEMU_ACTIVE and self.mode is MigrationMode.PRE_COPY:
                    await self._ramp_downtime()
                if status == QEMU_PRE_SWITCHOVER and not self._switchover_continued:
                    await self._pre_switchover()
                    continue
                if status == QEMU_COMPLETED:
                    self.completed_in_qemu = True
                    self.stats.last_byte_at = self.clock()
                    if "downtime" in info:
                        self.stats.downtime_parts["qemu_stop_copy"] = info["downtime"] / 1000
                    return
                if status in QEMU_ENDED:
                    for ch in self._channels:
                        if ch.error is not None:
                            raise ch.error
                    raise MigrationFailed(
                        f"QEMU's migration {status}: {info.get('error-desc', 'no detail')}"
                    )
                for ch in self._channels:
                    if ch.error is not None:
                        await self._cancel_qemu()
                        raise ch.error
                if self.storage is not None:
                    self.storage.check()
                if self.abort_requested.is_set() and self.mode is MigrationMode.POST_COPY:
                    log.warning("migration %s: cancel refused: in post-copy", self.uid)
                elif self.abort_requested.is_set():
                    await self._cancel_qemu()
                    self._check_abort()
                if self.mode is MigrationMode.PRE_COPY:
                    await self._check_timeouts(watch, status)
                if self.mode is MigrationMode.POST_COPY:
                    return  # qemu_postcopy.py goes on
                # a MIGRATION event (QEMU completed) wakes the switchover at once
                await wake(POLL_PERIOD)

    async def _check_timeouts(self, watch: TimeoutWatch, status: str) -> None:
        now = self.clock()
        remaining = self.stats.remaining_bytes
        moving = status in (QEMU_ACTIVE, QEMU_POSTCOPY_ACTIVE)
        verdict = watch.check(now, remaining, counts=moving)
        if verdict is Verdict.POST_COPY and status == QEMU_ACTIVE:
            log.info("migration %s: completion timeout: switching to post-copy", self.uid)
            await self.qemu.qmp("migrate-start-postcopy")
            self.mode = MigrationMode.POST_COPY
            self._report(force=True)
        elif verdict is not Verdict.CONTINUE:
            await self._cancel_qemu()
            failing = Verdict.TOO_LONG if verdict is Verdict.POST_COPY else verdict
            raise MigrationFailed(watch.message(failing, now, remaining))

    async def _ramp_downtime(self) -> None:
        """QEMU's downtime-limit for the pass it is in (QemuPlan.downtime_at)."""
        limit = self.plan.downtime_at(self.stats.rounds)
        if limit != self._downtime_limit:
            await self.qemu.qmp("migrate-set-parameters", {"downtime-limit": limit})
            self._downtime_limit = limit

    async def _pre_switchover(self) -> None:
        """QEMU stopped the guest, drained and flushed its devices, and waits before its
        last pass (``pause-before-switchover``): nothing writes the guest's RAM here any
        more. The source's digest starts now, in the shadow of QEMU's stop-and-copy
        (which reads the same frozen RAM) instead of after it; a storage migration's
        mirrors complete; then QEMU goes on."""
        self.switchover.start_digest()
        if self.storage is not None and not self.storage.completed:
            t0 = self.clock()
            await self.storage.complete()  # the guest is paused: mirrors complete
            self.stats.downtime_parts["mirror_complete"] = self.clock() - t0
        await self.qemu.qmp("migrate-continue", {"state": QEMU_PRE_SWITCHOVER})
        self._switchover_continued = True

    def _absorb(self, info: Obj) -> None:
        """query-migrate's RAM figures into Stats (QEMU's own rates: ``mbps`` is live;
        ``dirty-pages-rate`` is measured at each dirty sync, so it reads 0 during the
        first pass, as libvirt reports it)."""
        ram = info.get("ram") or {}
        if not ram:
            return
        page = int(ram.get("page-size", tunnel.PAGE_SIZE)) or tunnel.PAGE_SIZE
        self.stats.total_bytes = int(ram.get("total", self.stats.total_bytes))
        self.stats.processed_bytes = int(ram.get("transferred", 0))
        self.stats.remaining_bytes = int(ram.get("remaining", 0))
        self.stats.rounds = int(ram.get("dirty-sync-count", 0))
        self.stats.dirty_rate = float(ram.get("dirty-pages-rate", 0)) * page
        self.stats.transfer_rate = float(ram.get("mbps", 0)) * 1e6 / 8
        self.stats.last_byte_at = self.clock()

    async def _cancel_qemu(self) -> None:
        """migrate_cancel; QEMU goes back to running the guest here."""
        with contextlib.suppress(GuestError):
            await self.qemu.qmp("migrate_cancel")
            for _ in range(100):
                status = (await self.qemu.qmp("query-migrate")).get("status")
                if status in (*QEMU_ENDED, QEMU_COMPLETED, None):
                    break
                await asyncio.sleep(0.05)

    async def finish_success(self, detail: str) -> None:
        """The target owns the VM: the source QEMU destroyed, the success recorded and
        logged (``detail`` first, then the gap the guest saw)."""
        await self.handle.destroy()
        self._report()
        await self._record_success()
        self._log_success(f"{detail}, guest-seen gap {self.stats.guest_downtime_ms} ms")

    # -- failure (the rest is SourceEngine._fail) ------------------------------------------

    async def _abort_target(self, reason: str) -> None:
        frame = pb.TunnelSourceFrame(abort=pb.Abort(reason=reason))
        await self._abort_streams([ch.call for ch in self._channels], frame)

    async def _stop_transfer(self) -> None:
        # Before the hand-off a post-copy is cancelled too: the target's guest never ran
        # (-S, no `cont` before Commit), and QEMU refuses `cont` until the migration ends
        # ("Migration is not finalized yet"); cancelled, the source resumes with `cont`.
        with contextlib.suppress(GuestError):
            status = (await self.qemu.qmp("query-migrate")).get("status")
            if status in QEMU_MOVING or status in POSTCOPY_BEFORE_HANDOFF:
                await self._cancel_qemu()

    async def _fail_committed(self, reason: str) -> None:
        if self.mode is MigrationMode.POST_COPY and not self.completed_in_qemu:
            await self.postcopy.fail(reason)  # the VM's memory is split: it is lost
        else:
            await super()._fail_committed(reason)

    def _arbiter_decides(self) -> bool:
        return self.completed_in_qemu or self.mode is MigrationMode.POST_COPY

    def _guest_may_be_paused(self) -> bool:
        return True  # QEMU pauses the guest itself (completion, post-copy)
