"""Live migration of QEMU guests through vmferry's mTLS tunnel, with verified switchover.

QEMU migrates its guest itself; vmferry carries the byte stream and decides the
hand-off (the sequence is in the header of ``proto/vmferry/rpc/tunnel.proto``):

Source (``QemuSourceMigration``, one per attempt):
 1. Record ``startTimestamp`` (resourceVersion precondition), set QEMU's capabilities
    and parameters from the effective migration configuration (``max-bandwidth``,
    ``downtime-limit``, ``auto-converge``, ``postcopy-ram``, ``multifd`` channels from
    ``parallelStreams``), listen on a local unix socket and ``migrate`` QEMU to it. Each
    connection QEMU opens becomes one Tunnel stream to the target handler.
 2. Monitor ``query-migrate`` (progress, dirty rate, remaining → VMI status and metrics)
    and enforce ``progressTimeout`` / ``completionTimeoutPerGiB`` (with
    ``allowPostCopy``: switch to post-copy instead of failing) and cancel
    (``abortRequested`` → ``migrate_cancel``). Any failure here leaves QEMU running.
 3. QEMU ``completed``: the source guest is paused (``postmigrate``). Verified
    switchover: both handlers compute per-page digests of their RAM file in parallel
    (handler/qemu_verify.py), the target sends its digests, the source compares;
    ``repair`` re-sends the differing pages, ``detect`` fails the migration, ``off``
    skips the comparison. The target confirms with Verified.
 4. The arbiter: ``switchover: Committed`` written with a resourceVersion precondition.
    Only then Commit; the target resumes (``cont``); the source QEMU is destroyed. A
    failure before the record resumes the guest on the source.

Target (``TunnelService``): the Tunnel servicer on the migration gRPC server. It shares
the registry of expected migrations with the memvm Transfer service (the VM manager
registers an ``IncomingMigration`` whose handle is a ``QemuHandle``), so the commit /
abort / arbiter logic of the VM manager applies unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from handler import qemu_verify
from handler.drivers.base import GuestError
from handler.drivers.qemu import QemuDriver, QemuHandle
from handler.migration.handoff import Aborted, HandoffRecord, MigrationFailed, first_leaf
from handler.migration.tunnel import (
    DATA_FRAME_BYTES,
    DIGEST_FRAME_PAGES,
    MAX_CHANNELS,
    PAGE_SIZE,
    REPAIR_FRAME_PAGES,
    TUNNEL_PROTOCOL_VERSION,
    VERIFY_MODES,
    ProtocolError,
)
from handler.migration_source import Stats
from handler.migration_target import IncomingMigration
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.errors import ApiError
from vmferry.objects import conditions
from vmferry.objects.quantity import parse_quantity
from vmferry.rpc import tunnel_pb2 as pb
from vmferry.rpc import tunnel_pb2_grpc

log = logging.getLogger(__name__)
Obj = dict[str, Any]

GiB = 1 << 30
CONNECT_TIMEOUT = 10.0
ACCEPT_TIMEOUT = 20.0  # s for QEMU to open all its connections once migrate started
POLL_PERIOD = 0.2  # s between query-migrate polls
PROGRESS_PERIOD = 0.5
COMPLETE_TIMEOUT = 60.0  # s for the target QEMU to finish loading after the source completed
VERIFY_TIMEOUT = 120.0
RESUMED_TIMEOUT = 30.0
UNLIMITED_BANDWIDTH = 64 * GiB  # QEMU's default max-bandwidth is 128 MiB/s: always set it
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class QemuPlan:
    """QEMU's migration settings, derived from the effective migration configuration."""

    bandwidth: int
    downtime_ms: int
    auto_converge: bool
    postcopy: bool
    multifd_channels: int  # 0 = no multifd
    progress_timeout: float
    completion_timeout_per_gib: float

    @classmethod
    def from_config(cls, config: Obj) -> QemuPlan:
        streams = int(config.get("parallelStreams", 2) or 1)
        postcopy = bool(config.get("allowPostCopy", False))
        # multifd and post-copy cannot be combined in QEMU 7.x; post-copy wins.
        multifd = 0 if postcopy or streams <= 1 else min(streams, MAX_CHANNELS - 1)
        return cls(
            bandwidth=parse_quantity(config.get("bandwidthPerMigration", 0) or 0)
            or UNLIMITED_BANDWIDTH,
            downtime_ms=int(config.get("downtimeBudgetMilliseconds", 300)),
            auto_converge=bool(config.get("allowAutoConverge", False)),
            postcopy=postcopy,
            multifd_channels=multifd,
            progress_timeout=float(config.get("progressTimeout", 150)),
            completion_timeout_per_gib=float(config.get("completionTimeoutPerGiB", 150)),
        )

    @property
    def channel_count(self) -> int:
        return 1 + self.multifd_channels

    def capabilities(self) -> list[Obj]:
        caps = {
            "auto-converge": self.auto_converge,
            "postcopy-ram": self.postcopy,
            "multifd": self.multifd_channels > 0,
        }
        return [{"capability": k, "state": v} for k, v in caps.items()]

    def parameters(self) -> Obj:
        params: Obj = {"max-bandwidth": self.bandwidth, "downtime-limit": self.downtime_ms}
        if self.multifd_channels:
            params["multifd-channels"] = self.multifd_channels
        return params


# ==========================================================================================
# Source
# ==========================================================================================


class TunnelChannel:
    """One QEMU connection on the source, tunnelled through one gRPC stream."""

    def __init__(self, channel_id: int, call: grpc.aio.StreamStreamCall) -> None:
        self.id = channel_id
        self.call = call
        self.control: asyncio.Queue[pb.TunnelTargetFrame | None] = asyncio.Queue()
        self.sent = 0
        self.received = 0
        self.upstream_done = asyncio.Event()  # QEMU closed its side; DataEnd sent
        self.error: BaseException | None = None
        self._write_lock = asyncio.Lock()

    async def write(self, frame: pb.TunnelSourceFrame) -> None:
        if self.error is not None:
            raise self.error
        try:
            async with self._write_lock:
                await self.call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            raise MigrationFailed(f"tunnel channel {self.id} to the target failed: {e}") from None

    async def upstream(self, reader: asyncio.StreamReader) -> None:
        """QEMU → target."""
        while True:
            data = await reader.read(DATA_FRAME_BYTES)
            if not data:
                break
            await self.write(pb.TunnelSourceFrame(data=pb.Data(data=data)))
            self.sent += len(data)
        await self.write(pb.TunnelSourceFrame(data_end=pb.DataEnd()))
        self.upstream_done.set()

    async def downstream(self, writer: asyncio.StreamWriter) -> None:
        """Target → QEMU (the return path); other frames go to ``control``."""
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    raise MigrationFailed(f"the target closed tunnel channel {self.id}")
                kind = frame.WhichOneof("frame")
                if kind == "data":
                    self.received += len(frame.data.data)
                    if not writer.is_closing():
                        writer.write(frame.data.data)
                        with contextlib.suppress(ConnectionError):
                            await writer.drain()
                elif kind == "data_end":
                    if writer.can_write_eof() and not writer.is_closing():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                elif kind == "failure":
                    raise MigrationFailed(f"the target failed: {frame.failure.reason}")
                else:
                    self.control.put_nowait(frame)
        except grpc.aio.AioRpcError as e:
            self.error = MigrationFailed(
                f"lost the target on tunnel channel {self.id}: {e.code().name}: {e.details()}"
            )
        except MigrationFailed as e:
            self.error = e
        finally:
            self.control.put_nowait(None)

    async def next_control(self, timeout: float, what: str) -> pb.TunnelTargetFrame:
        try:
            async with asyncio.timeout(timeout):
                frame = await self.control.get()
        except TimeoutError:
            raise MigrationFailed(f"the target sent no {what} within {timeout:.0f}s") from None
        if frame is None:
            self.control.put_nowait(None)
            raise self.error or MigrationFailed(f"tunnel channel {self.id} closed")
        return frame


class QemuSourceMigration:
    """The sending side of one QEMU migration; same interface as SourceMigration."""

    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        vmi: Obj,
        handle: QemuHandle,
        tls: pki.TlsFiles | None,
        driver: QemuDriver,
        *,
        on_progress: Callable[[Obj, Stats], None] | None = None,
    ) -> None:
        self.api = api
        self.node = node_name
        self.vmi = vmi
        self.handle = handle
        self.tls = tls
        self.driver = driver
        self.ns = vmi["metadata"]["namespace"]
        self.name = vmi["metadata"]["name"]
        ms = vmi["status"]["migrationState"]
        self.uid: str = ms["migrationUid"]
        self.record = HandoffRecord(api, self.ns, self.name, self.uid)
        self.token: str = ms.get("token", "")
        self.target_address = f"{ms['targetNodeAddress']}:{ms['targetNodePort']}"
        self.config: Obj = ms.get("migrationConfiguration") or {}
        self.plan = QemuPlan.from_config(self.config)
        self.verify = handle.qspec.verify
        self.abort_requested = asyncio.Event()
        self.stats = Stats(total_bytes=handle.qspec.memory_bytes)
        self.repaired_pages = 0
        self.mode = "PreCopy"
        self.completed_in_qemu = False  # source paused in postmigrate
        self.committed = False
        self.on_progress = on_progress
        self._channels: list[TunnelChannel] = []
        self._grpc: grpc.aio.Channel | None = None
        self._server: asyncio.Server | None = None
        self._sock = driver.sock_path(f"{handle.vm_id}.{self.uid[:8]}", "mig")
        self._last_report = 0.0
        self._publisher: asyncio.Task[None] | None = None
        self._channels_ready = asyncio.Event()
        self._accept_error: BaseException | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._writers: list[asyncio.StreamWriter] = []

    # -- entry point ----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if not await self._mark_started():
                return
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._start(tg)
                await self._monitor()
                await self._switchover()
                # End every tunnel stream (multifd channels idle after QEMU finished),
                # so the TaskGroup's pumps return.
                for ch in self._channels:
                    ch.call.cancel()
                for w in self._writers:
                    w.close()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            leaf = first_leaf(e)
            if isinstance(leaf, asyncio.CancelledError):
                raise
            if isinstance(leaf, MigrationFailed):
                reason = str(leaf)
            elif isinstance(leaf, GuestError):
                reason = f"QEMU on the source: {leaf}"
            elif isinstance(leaf, ApiError):
                reason = f"the API failed during migration: {leaf}"
            elif isinstance(leaf, grpc.aio.AioRpcError):
                reason = f"lost the target: {leaf.code().name}: {leaf.details()}"
            else:
                log.exception("migration %s: internal error", self.uid, exc_info=leaf)
                reason = f"internal error in the source handler: {leaf!r}"
            await self._fail(reason, aborted=isinstance(leaf, Aborted))
        finally:
            await self._close()

    async def _close(self) -> None:
        for ch in self._channels:
            ch.call.cancel()
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
        self._sock.unlink(missing_ok=True)
        if self._grpc is not None:
            await self._grpc.close()

    # -- status ---------------------------------------------------------------------------

    async def _mark_started(self) -> bool:
        started = await self.record.mark_started(
            {"mode": "PreCopy", "transfer": self._transfer_status()}
        )
        if started:
            log.info(
                "migration %s: QEMU guest %s/%s to %s (verify %s, %d channel(s))",
                self.uid,
                self.ns,
                self.name,
                self.target_address,
                self.verify,
                self.plan.channel_count,
            )
        return started

    def _transfer_status(self) -> Obj:
        out = self.stats.as_status()
        out["verifyMode"] = self.verify
        out["repairedPages"] = self.repaired_pages
        return out

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        self.stats.wire_bytes = sum(ch.sent + ch.received for ch in self._channels)
        if self.on_progress is not None:
            self.on_progress(self.vmi, self.stats)
        if (force or now - self._last_report > PROGRESS_PERIOD) and (
            self._publisher is None or self._publisher.done()
        ):
            self._last_report = now
            self._publisher = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        with contextlib.suppress(ApiError):
            await self.record.patch({"transfer": self._transfer_status(), "mode": self.mode})

    async def _patch_with_retry(self, fields: Obj) -> None:
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher
        await self.record.patch_until_written(fields)

    # -- start: tunnel + QEMU -------------------------------------------------------------

    async def _start(self, tg: asyncio.TaskGroup) -> None:
        if self.tls is None:
            self._grpc = grpc.aio.insecure_channel(self.target_address, options=CHANNEL_OPTIONS)
        else:
            self._grpc = grpc.aio.secure_channel(
                self.target_address, pki.channel_credentials(self.tls), options=CHANNEL_OPTIONS
            )
        self._sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sock.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self._sock))
        h = self.handle
        await h.qmp("migrate-set-capabilities", {"capabilities": self.plan.capabilities()})
        await h.qmp("migrate-set-parameters", self.plan.parameters())
        await h.qmp("migrate", {"uri": f"unix:{self._sock}"})
        self.stats.first_byte_at = time.monotonic()
        try:
            async with asyncio.timeout(ACCEPT_TIMEOUT):
                while not self._channels_ready.is_set():
                    if self._accept_error is not None:
                        raise self._accept_error
                    status = (await h.qmp("query-migrate")).get("status")
                    if status in ("failed", "cancelled"):
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One QEMU connection: open its Tunnel stream and pump both ways."""
        cid = len(self._channels)
        self._writers.append(writer)
        if cid >= self.plan.channel_count or self._grpc is None or self._tg is None:
            writer.close()
            return
        stub = tunnel_pb2_grpc.TunnelStub(self._grpc)
        ch = TunnelChannel(cid, stub.Migrate())
        self._channels.append(ch)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await ch.write(
                    pb.TunnelSourceFrame(
                        open=pb.Open(
                            protocol_version=TUNNEL_PROTOCOL_VERSION,
                            migration_uid=self.uid,
                            token=self.token,
                            channel_id=cid,
                            channel_count=self.plan.channel_count,
                            memory_bytes=self.handle.qspec.memory_bytes,
                            page_size=PAGE_SIZE,
                            verify=VERIFY_MODES[self.verify],
                            postcopy=self.plan.postcopy,
                        )
                    )
                )
                first = await ch.call.read()
            if first is grpc.aio.EOF or first.WhichOneof("frame") != "opened":
                raise MigrationFailed(f"the target did not open tunnel channel {cid}")
        except grpc.aio.AioRpcError as e:
            self._accept_error = MigrationFailed(
                f"cannot open the tunnel to {self.target_address}: {e.code().name}: {e.details()}"
            )
            self._channels_ready.set()
            writer.close()
            return
        except (TimeoutError, MigrationFailed) as e:
            self._accept_error = (
                e
                if isinstance(e, MigrationFailed)
                else MigrationFailed(f"the target {self.target_address} did not answer")
            )
            self._channels_ready.set()
            writer.close()
            return
        self._tg.create_task(ch.downstream(writer))
        self._tg.create_task(self._pump_up(ch, reader))
        if len(self._channels) == self.plan.channel_count:
            self._channels_ready.set()

    async def _pump_up(self, ch: TunnelChannel, reader: asyncio.StreamReader) -> None:
        try:
            await ch.upstream(reader)
        except MigrationFailed as e:
            if not self.completed_in_qemu:
                ch.error = ch.error or e
                log.info("migration %s: %s", self.uid, e)

    # -- monitor --------------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Poll query-migrate until QEMU completed; enforce timeouts and cancel."""
        h = self.handle
        gib = self.handle.qspec.memory_bytes / GiB
        completion_timeout = self.plan.completion_timeout_per_gib * gib
        started = time.monotonic()
        watermark = float("inf")
        last_progress = started
        while True:
            info = await h.qmp("query-migrate")
            status = info.get("status", "")
            self._absorb(info)
            self._report()
            if status == "completed":
                self.completed_in_qemu = True
                self.stats.last_byte_at = time.monotonic()
                if "downtime" in info:
                    self.stats.downtime_parts["qemu_stop_copy"] = info["downtime"] / 1000
                return
            if status in ("failed", "cancelled"):
                detail = info.get("error-desc", "no detail")
                for ch in self._channels:
                    if ch.error is not None:
                        raise ch.error
                raise MigrationFailed(f"QEMU's migration {status}: {detail}")
            for ch in self._channels:
                if ch.error is not None:
                    await self._cancel_qemu()
                    raise ch.error
            now = time.monotonic()
            if self.abort_requested.is_set():
                if self.mode == "PostCopy":
                    log.warning("migration %s: cancel refused: in post-copy", self.uid)
                else:
                    await self._cancel_qemu()
                    raise Aborted("migration canceled by the user")
            remaining = self.stats.remaining_bytes
            if status in ("active", "postcopy-active") and remaining < watermark:
                watermark, last_progress = remaining, now
            if self.mode == "PreCopy" and now - last_progress > self.plan.progress_timeout:
                await self._cancel_qemu()
                raise MigrationFailed(
                    f"Live migration stuck for {now - last_progress:.0f} sec and has been aborted "
                    f"(progressTimeout {self.plan.progress_timeout:.0f}): "
                    f"{remaining / 2**20:.1f} MiB remain"
                )
            if self.mode == "PreCopy" and now - started > completion_timeout:
                if self.plan.postcopy and status == "active":
                    log.info("migration %s: completion timeout: switching to post-copy", self.uid)
                    await h.qmp("migrate-start-postcopy")
                    self.mode = "PostCopy"
                    self._report(force=True)
                else:
                    await self._cancel_qemu()
                    raise MigrationFailed(
                        f"Live migration is not completed after {now - started:.0f} sec and has "
                        f"been aborted (completionTimeoutPerGiB "
                        f"{self.plan.completion_timeout_per_gib:.0f} x {gib:.2f} GiB = "
                        f"{completion_timeout:.0f} sec)"
                    )
            await asyncio.sleep(POLL_PERIOD)

    def _absorb(self, info: Obj) -> None:
        ram = info.get("ram") or {}
        if not ram:
            return
        page = int(ram.get("page-size", PAGE_SIZE)) or PAGE_SIZE
        self.stats.total_bytes = int(ram.get("total", self.stats.total_bytes))
        self.stats.processed_bytes = int(ram.get("transferred", 0))
        self.stats.remaining_bytes = int(ram.get("remaining", 0))
        self.stats.rounds = int(ram.get("dirty-sync-count", 0))
        self.stats.dirty_rate = float(ram.get("dirty-pages-rate", 0)) * page
        self.stats.transfer_rate = float(ram.get("mbps", 0)) * 1e6 / 8
        self.stats.last_byte_at = time.monotonic()

    async def _cancel_qemu(self) -> None:
        """migrate_cancel; QEMU goes back to running the guest here."""
        with contextlib.suppress(GuestError):
            await self.handle.qmp("migrate_cancel")
            for _ in range(100):
                status = (await self.handle.qmp("query-migrate")).get("status")
                if status in ("cancelled", "failed", "completed", None):
                    break
                await asyncio.sleep(0.05)

    # -- switchover -----------------------------------------------------------------------

    async def _switchover(self) -> None:
        parts = self.stats.downtime_parts
        t0 = time.monotonic()
        ch0 = self._channels[0]
        digest_task: asyncio.Future[qemu_verify.PageDigests] | None = None
        if self.verify != "off":  # both sides hash at once: start ours right away
            digest_task = asyncio.ensure_future(qemu_verify.page_digests_async(self.handle.ram()))
        try:
            for ch in self._channels:  # every byte QEMU wrote is on its way
                async with asyncio.timeout(COMPLETE_TIMEOUT):
                    await ch.upstream_done.wait()
            await ch0.write(
                pb.TunnelSourceFrame(
                    completed=pb.Completed(
                        qemu_downtime_ms=int(parts.get("qemu_stop_copy", 0) * 1000),
                        last_console_unix_ns=self.handle.console_mtime_ns(),
                    )
                )
            )
            t1 = time.monotonic()
            parts["drain"] = t1 - t0
            if digest_task is not None:
                await self._verify(ch0, digest_task)
            frame = await ch0.next_control(VERIFY_TIMEOUT, "Verified")
            if frame.WhichOneof("frame") != "verified":
                raise MigrationFailed(f"expected Verified, got {frame.WhichOneof('frame')}")
            parts["verify"] = time.monotonic() - t1
            if not frame.verified.match:
                raise MigrationFailed(
                    f"the target's memory is not verified: {frame.verified.detail}"
                )
            self.stats.digest_verified = self.verify != "off"
        finally:
            if digest_task is not None and not digest_task.done():
                digest_task.cancel()
        t2 = time.monotonic()
        await self.record.commit(self.mode)
        self.committed = True
        await ch0.write(pb.TunnelSourceFrame(commit=pb.Commit()))
        with contextlib.suppress(MigrationFailed):
            frame = await ch0.next_control(RESUMED_TIMEOUT, "Resumed")
            if frame.WhichOneof("frame") == "resumed":
                parts["resume"] = time.monotonic() - t2
                if frame.resumed.guest_gap_ms > 0:
                    self.stats.guest_downtime_ms = frame.resumed.guest_gap_ms
        await self._finish_success()

    async def _verify(
        self, ch0: TunnelChannel, digest_task: asyncio.Future[qemu_verify.PageDigests]
    ) -> None:
        pages = self.handle.qspec.memory_bytes // PAGE_SIZE
        chunks: list[bytes] = []
        received = 0
        while True:
            frame = await ch0.next_control(VERIFY_TIMEOUT, "page digests")
            if frame.WhichOneof("frame") != "digests":
                raise MigrationFailed(f"expected Digests, got {frame.WhichOneof('frame')}")
            if frame.digests.first_page != received:
                raise MigrationFailed("the target's digests arrived out of order")
            chunks.append(frame.digests.digests)
            received += len(frame.digests.digests) // qemu_verify.DIGEST_BYTES
            if frame.digests.last:
                break
        try:
            target = qemu_verify.digests_from_bytes(b"".join(chunks), pages)
        except ValueError as e:
            raise MigrationFailed(f"bad page digests from the target: {e}") from None
        source = await digest_task
        comparison = qemu_verify.compare(source, target)
        self.stats.digest = f"{pages} page digests"
        self.stats.target_digest = "match" if comparison.match else comparison.describe()
        if comparison.match:
            log.info("migration %s: verified: all %d pages match", self.uid, pages)
        else:
            log.warning(
                "migration %s: memory mismatch at switchover: %s",
                self.uid,
                comparison.describe(),
            )
        if not comparison.match and self.verify == "detect":
            raise MigrationFailed(
                f"memory mismatch at switchover (verify: detect): {comparison.describe()} "
                "between the paused source and the target; the guest resumes on the source"
            )
        diff = comparison.differing
        ram = self.handle.ram()
        for start in range(0, diff.size, REPAIR_FRAME_PAGES):
            idx = diff[start : start + REPAIR_FRAME_PAGES]
            payload = await asyncio.to_thread(qemu_verify.gather_pages, ram, idx)
            await ch0.write(
                pb.TunnelSourceFrame(
                    repair=pb.Repair(indices=idx.astype("<u4").tobytes(), payload=payload)
                )
            )
        await ch0.write(
            pb.TunnelSourceFrame(
                repair_end=pb.RepairEnd(
                    pages=int(diff.size),
                    digests=qemu_verify.digests_to_bytes(source[diff]),
                )
            )
        )
        self.repaired_pages = int(diff.size)

    async def _finish_success(self) -> None:
        await self.handle.destroy()
        self.stats.remaining_bytes = 0
        self._report()
        await self._patch_with_retry(
            {
                "completed": True,
                "endTimestamp": conditions.now_rfc3339(),
                "mode": self.mode,
                "transfer": self._transfer_status(),
            }
        )
        log.info(
            "migration %s: succeeded: %.1f MiB through the tunnel, %d page(s) repaired, "
            "downtime parts %s, guest-seen gap %s ms",
            self.uid,
            self.stats.wire_bytes / 2**20,
            self.repaired_pages,
            {k: round(v * 1000, 1) for k, v in self.stats.downtime_parts.items()},
            self.stats.guest_downtime_ms,
        )

    # -- failure --------------------------------------------------------------------------

    async def _fail(self, reason: str, aborted: bool = False) -> None:
        log.warning("migration %s: failed: %s", self.uid, reason)
        for ch in self._channels:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    ch.call.write(pb.TunnelSourceFrame(abort=pb.Abort(reason=reason))), 1
                )
        if self.committed:
            return
        with contextlib.suppress(GuestError):
            status = (await self.handle.qmp("query-migrate")).get("status")
            if status in ("active", "setup", "pre-switchover", "device"):
                await self._cancel_qemu()
        if self.completed_in_qemu or self.mode == "PostCopy":
            if not await self._claim_abort():
                await self.handle.destroy()  # the arbiter says Committed: the target owns it
                await self._patch_with_retry(
                    {
                        "completed": True,
                        "endTimestamp": conditions.now_rfc3339(),
                        "transfer": self._transfer_status(),
                    }
                )
                return
        await self._resume_here()
        fields: Obj = {
            "failed": True,
            "failureReason": reason,
            "endTimestamp": conditions.now_rfc3339(),
            "transfer": self._transfer_status(),
        }
        if aborted or self.abort_requested.is_set():
            fields["abortStatus"] = "Succeeded"
        await self._patch_with_retry(fields)

    async def _resume_here(self) -> None:
        try:
            if await self.handle.run_state() != "running":
                await self.handle.qmp("cont")
                log.info("migration %s: guest resumed on the source", self.uid)
        except GuestError as e:
            log.error("migration %s: cannot resume the guest on the source: %s", self.uid, e)

    async def _claim_abort(self) -> bool:
        return await self.record.claim("Aborted") == "Aborted"


# ==========================================================================================
# Target
# ==========================================================================================


@dataclass
class _TargetState:
    """The target's per-migration tunnel state (beside the shared IncomingMigration)."""

    inc: IncomingMigration
    handle: QemuHandle
    channel_count: int
    verify: int
    socket: Path
    connected: list[asyncio.Event] = field(default_factory=list)
    started: bool = False
    start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    repaired: list[qemu_verify.PageDigests] = field(default_factory=list)  # their new digests


class TunnelService(tunnel_pb2_grpc.TunnelServicer):
    """The Tunnel servicer. ``registry`` is the memvm MigrationService's registry of
    expected migrations (shared, so the VM manager's target logic applies unchanged)."""

    def __init__(
        self,
        registry: dict[str, IncomingMigration],
        driver: QemuDriver,
        *,
        on_commit: Callable[[IncomingMigration], Awaitable[None]],
        on_abort: Callable[[IncomingMigration, str], Awaitable[None]],
        record_dir: Path | None,
        require_peer_identity: bool = True,
    ) -> None:
        self.registry = registry
        self.driver = driver
        self.on_commit = on_commit
        self.on_abort = on_abort
        self.record_dir = record_dir
        self.require_peer_identity = require_peer_identity
        self.states: dict[str, _TargetState] = {}

    async def Migrate(
        self,
        request_iterator: AsyncIterator[pb.TunnelSourceFrame],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.TunnelTargetFrame]:
        frames = aiter(request_iterator)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return
        if first.WhichOneof("frame") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Open")
        hello = first.open
        inc = self.registry.get(hello.migration_uid)
        if inc is None or inc.decision or not isinstance(inc.handle, QemuHandle):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no QEMU migration {hello.migration_uid!r} is expected on this node",
            )
            return
        peer = pki.peer_identity(context)
        if self.require_peer_identity and (peer is None or peer.node_name != inc.source_node):
            who = peer.user if peer else "an unauthenticated peer"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} is not the source node {inc.source_node} of migration {inc.migration_uid}",
            )
        if not secrets.compare_digest(hello.token.encode(), inc.token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong migration token")
        try:
            state = self._check_open(inc, hello)
        except ProtocolError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        cid = hello.channel_id
        out: asyncio.Queue[pb.TunnelTargetFrame | None] = asyncio.Queue(maxsize=64)
        try:
            writer, reader = await self._connect(state, cid, hello.postcopy)
        except (OSError, GuestError, TimeoutError) as e:
            reason = f"the target QEMU did not accept tunnel channel {cid}: {e}"
            await self.on_abort(inc, reason)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
            return
        yield pb.TunnelTargetFrame(opened=pb.Opened(channel_id=cid))
        pump = asyncio.create_task(self._downstream(reader, out))
        handler = asyncio.create_task(self._handle_frames(state, cid, frames, writer, out))
        try:
            while True:
                reply = await out.get()
                if reply is None:
                    break
                yield reply
            await handler  # re-raises a ProtocolError
        except ProtocolError as e:
            log.warning("migration %s: tunnel channel %d: %s", inc.migration_uid, cid, e)
            await self.on_abort(inc, f"protocol error: {e}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            pump.cancel()
            handler.cancel()
            writer.close()
            if cid == 0 and inc.decision != "Committed":
                # the source went away before the hand-off: the arbiter settles it
                log.info("migration %s: tunnel channel 0 closed", inc.migration_uid)

    def _check_open(self, inc: IncomingMigration, hello: pb.Open) -> _TargetState:
        assert isinstance(inc.handle, QemuHandle)
        if hello.protocol_version != TUNNEL_PROTOCOL_VERSION:
            raise ProtocolError(
                f"tunnel protocol version {hello.protocol_version} is not supported "
                f"(this handler speaks {TUNNEL_PROTOCOL_VERSION})"
            )
        if hello.verify == pb.VERIFY_MODE_UNSPECIFIED or hello.verify not in VERIFY_MODES.values():
            raise ProtocolError("Open.verify is unspecified or unknown")
        if not 1 <= hello.channel_count <= MAX_CHANNELS:
            raise ProtocolError(f"channel_count {hello.channel_count} outside 1..{MAX_CHANNELS}")
        if hello.channel_id >= hello.channel_count:
            raise ProtocolError(f"channel_id {hello.channel_id} >= channel_count")
        if hello.memory_bytes != inc.handle.qspec.memory_bytes or hello.page_size != PAGE_SIZE:
            raise ProtocolError(
                f"geometry mismatch: source has {hello.memory_bytes} bytes in {hello.page_size}-"
                f"byte pages, target prepared {inc.handle.qspec.memory_bytes} bytes"
            )
        state = self.states.get(inc.migration_uid)
        if state is None:
            state = _TargetState(
                inc,
                inc.handle,
                hello.channel_count,
                hello.verify,
                self.driver.sock_path(inc.handle.vm_id, "in"),
                [asyncio.Event() for _ in range(hello.channel_count)],
            )
            self.states[inc.migration_uid] = state
        elif state.channel_count != hello.channel_count or state.verify != hello.verify:
            raise ProtocolError("channel_count/verify differ from the first channel's Open")
        if state.connected[hello.channel_id].is_set():
            raise ProtocolError(f"channel {hello.channel_id} is already connected")
        return state

    async def _connect(
        self, state: _TargetState, cid: int, postcopy: bool
    ) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
        """Start the incoming migration (once), then connect in channel order."""
        h = state.handle
        async with state.start_lock:
            if not state.started:
                multifd = state.channel_count - 1
                caps = [
                    {"capability": "multifd", "state": multifd > 0},
                    {"capability": "postcopy-ram", "state": postcopy},
                ]
                await h.qmp("migrate-set-capabilities", {"capabilities": caps})
                if multifd:
                    await h.qmp("migrate-set-parameters", {"multifd-channels": multifd})
                state.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                state.socket.unlink(missing_ok=True)
                await h.qmp("migrate-incoming", {"uri": f"unix:{state.socket}"})
                state.started = True
        async with asyncio.timeout(CONNECT_TIMEOUT):
            for earlier in state.connected[:cid]:
                await earlier.wait()
            reader, writer = await asyncio.open_unix_connection(str(state.socket))
        state.connected[cid].set()
        return writer, reader

    async def _downstream(
        self, reader: asyncio.StreamReader, out: asyncio.Queue[pb.TunnelTargetFrame | None]
    ) -> None:
        """Target QEMU → source (the return path)."""
        with contextlib.suppress(ConnectionError):
            while True:
                data = await reader.read(DATA_FRAME_BYTES)
                if not data:
                    break
                await out.put(pb.TunnelTargetFrame(data=pb.Data(data=data)))
        await out.put(pb.TunnelTargetFrame(data_end=pb.DataEnd()))

    async def _handle_frames(
        self,
        state: _TargetState,
        cid: int,
        frames: AsyncIterator[pb.TunnelSourceFrame],
        writer: asyncio.StreamWriter,
        out: asyncio.Queue[pb.TunnelTargetFrame | None],
    ) -> None:
        inc = state.inc
        try:
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "commit" and cid == 0 and inc.decision == "Committed":
                    await out.put(pb.TunnelTargetFrame(resumed=pb.Resumed()))
                    return
                if inc.decision:
                    raise ProtocolError(f"frame {kind} after the migration was {inc.decision}")
                if kind == "data":
                    writer.write(frame.data.data)
                    await writer.drain()
                    inc.bytes_received += len(frame.data.data)
                elif kind == "data_end":
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                elif kind == "completed" and cid == 0:
                    state.handle.source_last_console_ns = frame.completed.last_console_unix_ns
                    for digest_frame in await self._complete_and_digest(state):
                        await out.put(digest_frame)
                elif kind in ("repair", "repair_end") and cid == 0:
                    reply = await self._repair(state, frame)
                    if reply is not None:
                        await out.put(reply)
                elif kind == "commit" and cid == 0:
                    if not inc.verified:
                        raise ProtocolError("Commit before the memory was verified")
                    t0 = time.monotonic()
                    await self.on_commit(inc)
                    gap = state.handle.resume_gap_ms
                    await out.put(
                        pb.TunnelTargetFrame(
                            resumed=pb.Resumed(
                                resume_seconds=time.monotonic() - t0, guest_gap_ms=gap or 0.0
                            )
                        )
                    )
                    self.states.pop(inc.migration_uid, None)
                    return
                elif kind == "abort":
                    log.info(
                        "migration %s: source aborted: %s", inc.migration_uid, frame.abort.reason
                    )
                    self.states.pop(inc.migration_uid, None)
                    await self.on_abort(inc, frame.abort.reason)
                    return
                else:
                    raise ProtocolError(f"unexpected frame {kind!r} on tunnel channel {cid}")
        except (ConnectionError, OSError) as e:
            await out.put(pb.TunnelTargetFrame(failure=pb.Failure(reason=f"target QEMU: {e}")))
        except GuestError as e:
            await out.put(pb.TunnelTargetFrame(failure=pb.Failure(reason=str(e))))
        finally:
            await out.put(None)

    async def _complete_and_digest(self, state: _TargetState) -> list[pb.TunnelTargetFrame]:
        """Wait for the target QEMU to finish loading (it stays paused), then digests."""
        h = state.handle
        deadline = time.monotonic() + COMPLETE_TIMEOUT
        while True:
            info = await h.qmp("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise GuestError(
                    f"the target QEMU's incoming migration {status}: {info.get('error-desc', '')}"
                )
            if time.monotonic() > deadline:
                raise GuestError(f"the target QEMU did not finish loading ({status})")
            await asyncio.sleep(0.01)
        state.inc.verified_at = time.monotonic()
        if state.verify == pb.VERIFY_MODE_OFF:
            await self._mark_verified(state.inc)
            return [pb.TunnelTargetFrame(verified=pb.Verified(match=True, detail="verify: off"))]
        digests = await qemu_verify.page_digests_async(h.ram())
        replies = []
        blob = qemu_verify.digests_to_bytes(digests)
        step = DIGEST_FRAME_PAGES * qemu_verify.DIGEST_BYTES
        for first in range(0, len(blob), step):
            replies.append(
                pb.TunnelTargetFrame(
                    digests=pb.Digests(
                        first_page=first // qemu_verify.DIGEST_BYTES,
                        digests=blob[first : first + step],
                        last=first + step >= len(blob),
                    )
                )
            )
        return replies

    async def _repair(
        self, state: _TargetState, frame: pb.TunnelSourceFrame
    ) -> pb.TunnelTargetFrame | None:
        pages = state.handle.qspec.memory_bytes // PAGE_SIZE
        if frame.WhichOneof("frame") == "repair":
            if state.verify != pb.VERIFY_MODE_REPAIR:
                raise ProtocolError("Repair frames in a migration that does not repair")
            blob = frame.repair.indices
            if len(blob) % 4:
                raise ProtocolError("Repair.indices is not a multiple of 4 bytes")
            idx = np.frombuffer(blob, dtype="<u4").astype(np.int64)
            if idx.size and int(idx.max()) >= pages:
                raise ProtocolError(f"repair page {int(idx.max())} out of bounds ({pages} pages)")
            try:
                new = await asyncio.to_thread(
                    qemu_verify.apply_pages, state.handle.ram(), idx, frame.repair.payload
                )
            except ValueError as e:
                raise ProtocolError(str(e)) from None
            state.repaired.append(new)
            return None
        end = frame.repair_end
        got = (
            np.concatenate(state.repaired) if state.repaired else np.empty((0, 2), dtype=np.uint64)
        )
        try:
            expected = qemu_verify.digests_from_bytes(end.digests, int(end.pages))
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        if len(got) != end.pages:
            raise ProtocolError(f"RepairEnd announces {end.pages} pages, {len(got)} received")
        match = bool((got == expected).all())
        detail = (
            f"{end.pages} page(s) repaired"
            if match
            else "repaired pages still differ from the source"
        )
        if match:
            await self._mark_verified(state.inc)
        log.info("migration %s: %s", state.inc.migration_uid, detail)
        return pb.TunnelTargetFrame(
            verified=pb.Verified(
                match=match,
                repaired_pages=int(end.pages),
                detail=detail,
                verify_seconds=time.monotonic() - state.inc.verified_at,
            )
        )

    async def _mark_verified(self, inc: IncomingMigration) -> None:
        inc.verified = True
        inc.verified_at = time.monotonic()
        if self.record_dir is not None:
            await asyncio.to_thread(self._write_record, inc)

    def _write_record(self, inc: IncomingMigration) -> None:
        """The same record MigrationService writes: survives a restart before resume."""
        assert self.record_dir is not None
        path = self.record_dir / f"{inc.migration_uid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"vmId": inc.handle.vm_id, "deviceState": base64.b64encode(b"").decode()})
        )
        tmp.replace(path)
