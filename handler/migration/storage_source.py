"""The source's part of a storage live migration (``handler.migration.storage``): the NBD
listener whose connections become Tunnel streams, the mirror jobs, and the disks' part
of the verified switchover. ``qemu_source.QemuSourceMigration`` drives it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from handler import qemu_verify
from handler.drivers.qemu_handle import QemuHandle
from handler.migration import tunnel
from handler.migration.handoff import MigrationFailed
from handler.migration.qemu_channel import TunnelChannel
from handler.migration.storage import (
    POLL_PERIOD,
    DiskMirrors,
    MirroredDisk,
    fresh_socket,
    image_digests,
    read_blocks,
    remove_socket,
)
from vmferry.rpc import tunnel_pb2 as pb

log = logging.getLogger(__name__)

NBD_OPEN_TIMEOUT = 5.0  # s to open an NBD stream (QEMU's blockdev-add waits for it)
MIRROR_COMPLETE_TIMEOUT = 60.0  # s for the cancelled (ready) mirrors to conclude
VERIFY_TIMEOUT = 120.0
VERIFY_DETECT = "detect"

OpenTunnel = Callable[[int, bool], Awaitable[TunnelChannel]]
Spawn = Callable[[Coroutine[Any, Any, None]], object]


class StorageSource:
    """One migration's mirrored disks on the source."""

    def __init__(
        self,
        handle: QemuHandle,
        disks: list[MirroredDisk],
        socket: Path,
        open_tunnel: OpenTunnel,
        spawn: Spawn,
    ) -> None:
        self.handle = handle
        self.disks = disks
        self.socket = socket
        self.mirrors = DiskMirrors(handle, disks, socket)
        self.channels: list[TunnelChannel] = []
        self.error: BaseException | None = None
        self.completed = False  # the mirrors concluded at the pre-switchover pause
        self.repaired_blocks = 0
        self.mirror_seconds = 0.0
        self._open_tunnel = open_tunnel
        self._spawn = spawn
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._digests: dict[str, asyncio.Future[qemu_verify.PageDigests]] = {}

    # -- mirroring ------------------------------------------------------------------------

    async def start(self) -> None:
        fresh_socket(self.socket)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.socket))
        await self.mirrors.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One NBD connection of the source QEMU: one Tunnel stream (Open.nbd)."""
        self._writers.append(writer)
        try:  # within QMP's timeout: blockdev-add waits for this connection
            async with asyncio.timeout(NBD_OPEN_TIMEOUT):
                ch = await self._open_tunnel(1000 + len(self.channels), True)
        except (MigrationFailed, TimeoutError) as e:
            self.error = (
                e if isinstance(e, MigrationFailed) else MigrationFailed("the NBD tunnel timed out")
            )
            writer.close()
            return
        self.channels.append(ch)
        self._spawn(self._pump_down(ch, writer))
        self._spawn(self._pump_up(ch, reader, writer))

    async def _pump_down(self, ch: TunnelChannel, writer: asyncio.StreamWriter) -> None:
        try:
            await ch.downstream(writer)
        finally:  # the target's side ended: QEMU's NBD client must not wait on it
            writer.close()

    async def _pump_up(
        self, ch: TunnelChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await ch.upstream(reader)
        except MigrationFailed as e:
            writer.close()
            if not self.completed:
                ch.error = ch.error or e

    def check(self) -> None:
        """Raise the first failure of an NBD stream."""
        if self.error is not None:
            raise self.error
        for ch in self.channels:
            if ch.error is not None and not self.completed:
                raise ch.error

    async def wait_ready(
        self, tick: Callable[[], None], clock: Callable[[], float], progress_timeout: float
    ) -> None:
        """Until every mirror is ready. ``tick`` runs every poll (cancel, status);
        MigrationFailed when the mirrors made no progress for ``progress_timeout`` s."""
        t0 = last_change = clock()
        last_done = -1
        while not await self.mirrors.ready():
            self.check()
            tick()
            now = clock()
            if self.mirrors.progress.done != last_done:
                last_done, last_change = self.mirrors.progress.done, now
            elif now - last_change > progress_timeout:
                raise MigrationFailed(
                    f"the disk mirror made no progress for {progress_timeout:.0f}s "
                    f"({last_done} of {self.mirrors.progress.total} bytes copied)"
                )
            await asyncio.sleep(POLL_PERIOD)
        self.mirror_seconds = clock() - t0
        log.info(
            "qemu %s: %d disk mirror(s) ready after %.1fs (%d bytes)",
            self.handle.vm_id,
            len(self.disks),
            self.mirror_seconds,
            self.mirrors.progress.total,
        )

    async def complete(self) -> None:
        """At QEMU's pre-switchover pause: the mirrors complete (a consistent copy of the
        paused guest's disks); then the image digests start (the guest stays paused)."""
        self.check()
        await self.mirrors.complete(MIRROR_COMPLETE_TIMEOUT)
        self.completed = True
        for d in self.disks:
            self._digests[d.name] = asyncio.ensure_future(image_digests(d.source_path))

    async def close(self) -> None:
        """Cancel unfinished mirrors, remove the NBD nodes, end the streams; idempotent."""
        if not self.completed:
            await self.mirrors.remove(force=True)
        for fut in self._digests.values():
            fut.cancel()
        for ch in self.channels:
            ch.call.cancel()
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        remove_socket(self.socket)

    # -- the verified switchover ----------------------------------------------------------

    async def verify(self, ch0: TunnelChannel, mode: str) -> list[pb.DiskRepairEnd]:
        """Receive the target's block digests of each mirrored disk (after the RAM's),
        compare them with this image's; ``detect``: fail on a difference; ``repair``:
        send the differing blocks (Repair frames with ``disk``)."""
        received: dict[str, list[bytes]] = {}
        ended: set[str] = set()
        while len(ended) < len(self.disks):
            frame = await ch0.next_control(VERIFY_TIMEOUT, "disk digests")
            if frame.WhichOneof("frame") != "digests" or not frame.digests.disk:
                raise MigrationFailed(f"expected disk Digests, got {frame.WhichOneof('frame')}")
            name = frame.digests.disk
            if name not in self._digests or name in ended:
                raise MigrationFailed(f'unexpected digests of disk "{name}" from the target')
            received.setdefault(name, []).append(frame.digests.digests)
            if frame.digests.last:
                ended.add(name)
        ends = []
        for d in self.disks:
            source = await self._digests[d.name]
            try:
                target = qemu_verify.digests_from_bytes(b"".join(received[d.name]), len(source))
            except ValueError as e:
                raise MigrationFailed(f'bad digests of disk "{d.name}": {e}') from None
            comparison = qemu_verify.compare(source, target)
            what = comparison.describe().replace("pages", "blocks")
            if comparison.match:
                log.info(
                    'qemu %s: disk "%s" verified: %d blocks match',
                    self.handle.vm_id,
                    d.name,
                    len(source),
                )
            elif mode == VERIFY_DETECT:
                raise MigrationFailed(
                    f'disk "{d.name}" differs at switchover (verify: detect): {what} between '
                    "the paused source and the target; the guest resumes on the source"
                )
            else:
                log.warning(
                    'qemu %s: disk "%s" differs at switchover: %s', self.handle.vm_id, d.name, what
                )
            diff = comparison.differing
            for start in range(0, diff.size, tunnel.REPAIR_FRAME_PAGES):
                idx = diff[start : start + tunnel.REPAIR_FRAME_PAGES]
                payload = await asyncio.to_thread(read_blocks, d.source_path, idx)
                await ch0.write(
                    pb.TunnelSourceFrame(
                        repair=pb.Repair(
                            indices=idx.astype("<u4").tobytes(), payload=payload, disk=d.name
                        )
                    )
                )
            self.repaired_blocks += int(diff.size)
            ends.append(
                pb.DiskRepairEnd(
                    disk=d.name,
                    blocks=int(diff.size),
                    digests=qemu_verify.digests_to_bytes(source[diff]),
                )
            )
        return ends
