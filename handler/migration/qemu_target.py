"""The QEMU target: the Tunnel servicer (vmferry.tunnel.v1.Tunnel) on the migration network.

QEMU migrates its guest itself; the tunnel carries its byte stream from the source
handler to a local unix socket of the incoming QEMU (started ``-incoming defer -S``), and
the switchover is verified here (the sequence is in ``proto/vmferry/rpc/tunnel.proto``).
A stream is admitted through ``peer.PeerGate`` (registered migration whose guest is a
QEMU guest, source node's certificate, token); the migration walks the target state
machine of ``target_state`` (Open = Hello, Completed starts Verifying). The registry of
expected migrations, the restart records and the VM manager's callbacks are the ones the
memvm Transfer service uses (``incoming.IncomingRegistry``), so the commit / abort /
arbiter logic of the VM manager is the same for both drivers.

Per migration the service keeps a ``TunnelState`` (the incoming QEMU's socket, which
channels are connected, the repaired pages' digests) in ``states``; it ends with every
end of the migration: channel 0's stream closing (Commit, Abort, or a source that just
went away) and the registry forgetting the migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from handler import qemu_verify
from handler.drivers.base import GuestError
from handler.drivers.qemu import QemuDriver, QemuHandle
from handler.migration import qemu_postcopy, storage
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.peer import abort, accepts_hello
from handler.migration.restart_record import RestartRecord
from handler.migration.target_state import TargetState
from handler.migration.tunnel import (
    DATA_FRAME_BYTES,
    DIGEST_FRAME_PAGES,
    MAX_CHANNELS,
    PAGE_SIZE,
    TUNNEL_PROTOCOL_VERSION,
    TUNNEL_SERVICE,
    VERIFY_MODES,
    DataChunk,
    ProtocolError,
    SourceFrame,
    decode_source_frame,
    frame_kind,
    widen_writer,
)
from handler.peers import no_postcopy
from vmferry import failpoints
from vmferry.rpc import tunnel_pb2 as pb
from vmferry.rpc import tunnel_pb2_grpc

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # s for the incoming QEMU to accept a channel's connection
COMPLETE_TIMEOUT = 60.0  # s for the target QEMU to finish loading after the source completed


@dataclass
class TunnelState:
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
    # a storage migration: the repaired blocks' new digests, per mirrored disk
    disk_repaired: dict[str, list[qemu_verify.PageDigests]] = field(default_factory=dict)
    # post-copy: channel 0's current connection to the incoming QEMU (a recovery replaces
    # it), how many recoveries there were, and the commit's resume (not on the frame loop:
    # the guest's page requests flow on channel 0 meanwhile)
    ch0_writer: asyncio.StreamWriter | None = None
    recoveries: int = 0
    resume_task: asyncio.Task[None] | None = None
    postcopy_started_at: float = 0.0
    postcopy: bool = False  # Open.postcopy: postcopy-ram is on in both QEMUs


class TunnelService(tunnel_pb2_grpc.TunnelServicer):
    """The Tunnel servicer over the registry both target services share."""

    def __init__(self, incoming: IncomingRegistry, driver: QemuDriver) -> None:
        self.incoming = incoming
        self.driver = driver
        self.states: dict[str, TunnelState] = {}
        incoming.on_forget(self._end)

    def register(self, server: grpc.aio.Server) -> None:
        """Serve Tunnel on ``server``; Data frames arrive as DataChunks (decode_source_frame)."""
        migrate = grpc.stream_stream_rpc_method_handler(
            self.Migrate,
            request_deserializer=decode_source_frame,
            response_serializer=pb.TunnelTargetFrame.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(TUNNEL_SERVICE, {"Migrate": migrate}),)
        )

    def _end(self, migration_uid: str) -> None:
        """The migration's tunnel state ends (channel 0 closed, or the registry forgot it)."""
        self.states.pop(migration_uid, None)

    async def Migrate(
        self,
        request_iterator: AsyncIterator[SourceFrame],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.TunnelTargetFrame]:
        frames = aiter(request_iterator)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return
        if isinstance(first, DataChunk):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Open")
        resume = first.open.resume if first.WhichOneof("frame") == "open" else False
        inc, state = await self.incoming.gate.admit(
            context,
            first,
            "open",
            acceptable=lambda inc: (
                accepts_hello(inc.state, resume) and isinstance(inc.handle, QemuHandle)
            ),
            check=self._check_open,
            what="QEMU migration",
        )
        hello = first.open
        if state is None:  # an NBD connection of a storage migration
            async for nbd_reply in self._nbd_stream(inc, frames, context):
                yield nbd_reply
            return
        cid = hello.channel_id
        out: asyncio.Queue[pb.TunnelTargetFrame | None] = asyncio.Queue(maxsize=64)
        try:
            if hello.resume:
                writer, reader = await qemu_postcopy.recover_incoming(self.driver, state)
            else:
                writer, reader = await self._connect(state, cid, hello.postcopy)
        except (OSError, GuestError, TimeoutError) as e:
            reason = f"the target QEMU did not accept tunnel channel {cid}: {e}"
            if hello.resume:  # the guest runs here: the source tries again
                log.warning("migration %s: post-copy recovery: %s", inc.migration_uid, reason)
                await abort(context, grpc.StatusCode.UNAVAILABLE, reason)
            if cid == 0:
                self._end(inc.migration_uid)
            await self.incoming.on_abort(inc, reason)
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, reason)
        if cid == 0:
            state.ch0_writer = writer  # the current one (a post-copy recovery replaces it)
            state.postcopy = state.postcopy or hello.postcopy
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
            await self.incoming.on_abort(inc, f"protocol error: {e}")
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            pump.cancel()
            handler.cancel()
            writer.close()
            if cid == 0 and inc.state.guest_runs_here:
                # The tunnel broke in post-copy: the incoming QEMU pauses, the source
                # recovers it on a new stream, within the recovery window.
                if state.ch0_writer is writer:
                    inc.disconnected_since = time.monotonic()
                    log.warning(
                        "migration %s: tunnel channel 0 broke in post-copy", inc.migration_uid
                    )
            elif cid == 0:
                # Commit, Abort, or a source that went away (the arbiter settles that).
                self._end(inc.migration_uid)
                if not inc.state.decided:
                    log.info("migration %s: tunnel channel 0 closed", inc.migration_uid)

    def _check_open(self, inc: IncomingMigration, hello: pb.Open) -> TunnelState | None:
        """The migration's TunnelState for a migration channel; None for an NBD one."""
        assert isinstance(inc.handle, QemuHandle)
        if hello.protocol_version != TUNNEL_PROTOCOL_VERSION:
            raise ProtocolError(
                f"tunnel protocol version {hello.protocol_version} is not supported "
                f"(this handler speaks {TUNNEL_PROTOCOL_VERSION})"
            )
        if hello.nbd:
            if not storage.exported_disks(inc.handle.qspec.disks):
                raise ProtocolError(
                    "an NBD channel, but the target has no disk to receive (every volume "
                    "of the VMI is shared, or the VMI has none)"
                )
            if inc.state is TargetState.AWAITING_HELLO:
                inc.move(TargetState.RECEIVING, "Open (NBD)")
            return None
        if hello.postcopy and inc.peer_cluster:
            raise ProtocolError(no_postcopy(inc.migration_uid, inc.peer_cluster))
        if hello.resume:
            resumed = self.states.get(inc.migration_uid)
            if not inc.state.guest_runs_here:
                raise ProtocolError(f"Open.resume in state {inc.state} (not a running post-copy)")
            if hello.channel_id != 0:
                raise ProtocolError("Open.resume for a channel this migration does not have")
            if resumed is None:  # re-adopted after this handler's restart (vm_postcopy.py)
                resumed = self._new_state(inc, 1, hello.verify)
                resumed.started = resumed.postcopy = True
            return resumed
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
            state = self._new_state(inc, hello.channel_count, hello.verify)
        elif state.channel_count != hello.channel_count or state.verify != hello.verify:
            raise ProtocolError("channel_count/verify differ from the first channel's Open")
        if state.connected[hello.channel_id].is_set():
            raise ProtocolError(f"channel {hello.channel_id} is already connected")
        if inc.state is TargetState.AWAITING_HELLO:
            inc.move(TargetState.RECEIVING, "Open")
        return state

    def _new_state(self, inc: IncomingMigration, channel_count: int, verify: int) -> TunnelState:
        """The migration's tunnel state, registered."""
        assert isinstance(inc.handle, QemuHandle)
        state = TunnelState(
            inc,
            inc.handle,
            channel_count,
            verify,
            self.driver.sock_path(inc.handle.vm_id, "in"),
            [asyncio.Event() for _ in range(channel_count)],
        )
        self.states[inc.migration_uid] = state
        return state

    async def _nbd_stream(
        self,
        inc: IncomingMigration,
        frames: AsyncIterator[SourceFrame],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.TunnelTargetFrame]:
        """One NBD connection of the source QEMU's mirror, to the incoming QEMU's NBD
        server: bytes both ways until either side closes; Abort aborts the migration."""
        assert isinstance(inc.handle, QemuHandle)
        socket = self.driver.nbd_socket(inc.handle.vm_id)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(socket))
        except (OSError, TimeoutError) as e:
            reason = f"the target QEMU's NBD server did not accept the mirror: {e}"
            await self.incoming.on_abort(inc, reason)
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, reason)
        yield pb.TunnelTargetFrame(opened=pb.Opened())
        failpoints.hit(failpoints.Step.TARGET_NBD)
        out: asyncio.Queue[pb.TunnelTargetFrame | None] = asyncio.Queue(maxsize=64)

        async def upstream() -> None:
            try:
                async for frame in frames:
                    kind = frame_kind(frame)
                    if isinstance(frame, DataChunk):
                        writer.write(frame.payload)
                        await writer.drain()
                        inc.bytes_received += len(frame.payload)
                    elif kind == "data_end":
                        if writer.can_write_eof():
                            with contextlib.suppress(OSError):
                                writer.write_eof()
                    elif kind == "abort":
                        await self.incoming.on_abort(inc, frame.abort.reason)
                        return
                    else:
                        raise ProtocolError(f"unexpected frame {kind!r} on an NBD channel")
            except (ConnectionError, OSError) as e:
                await out.put(pb.TunnelTargetFrame(failure=pb.Failure(reason=f"NBD: {e}")))
            finally:
                await out.put(None)

        pump = asyncio.create_task(self._downstream(reader, out))
        handler = asyncio.create_task(upstream())
        try:
            while True:
                reply = await out.get()
                if reply is None:
                    break
                yield reply
            await handler
        except ProtocolError as e:
            await self.incoming.on_abort(inc, f"protocol error: {e}")
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            pump.cancel()
            handler.cancel()
            writer.close()

    async def _connect(
        self, state: TunnelState, cid: int, postcopy: bool
    ) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
        """Start the incoming migration (once), then connect in channel order."""
        h = state.handle
        async with state.start_lock:
            if not state.started:
                multifd = state.channel_count - 1
                caps = [
                    {"capability": "multifd", "state": multifd > 0},
                    {"capability": "postcopy-ram", "state": postcopy},
                    {"capability": "events", "state": True},  # wait_migration wakes on them
                ]
                if h.qspec.disks:
                    # A shared disk is taken over (write lock, caches) only when the target
                    # resumes after the hand-off, never at the end of the stream: a source
                    # that resumes instead (verify failed, hand-off lost) can re-activate it.
                    caps.append({"capability": "late-block-activate", "state": True})
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
        widen_writer(writer)  # the next frame comes off the stream while QEMU reads this one
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
        state: TunnelState,
        cid: int,
        frames: AsyncIterator[SourceFrame],
        writer: asyncio.StreamWriter,
        out: asyncio.Queue[pb.TunnelTargetFrame | None],
    ) -> None:
        inc = state.inc
        try:
            async for frame in frames:
                kind = frame_kind(frame)
                if kind == "commit" and cid == 0 and inc.state.committed:
                    await out.put(pb.TunnelTargetFrame(resumed=pb.Resumed()))
                    if inc.postcopy:
                        continue  # QEMU's pages still flow on this stream
                    return
                if inc.state.decided and not (
                    inc.postcopy and kind in ("data", "data_end", "postcopy_end")
                ):
                    raise ProtocolError(f"frame {kind} after the migration was {inc.decision}")
                if isinstance(frame, DataChunk):
                    writer.write(frame.payload)
                    await writer.drain()  # waits only past WRITE_HIGH_WATER
                    inc.bytes_received += len(frame.payload)
                elif kind == "data_end":
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                elif kind == "completed" and cid == 0:
                    inc.move(TargetState.VERIFYING, "Completed")
                    state.handle.source_last_console_ns = frame.completed.last_console_unix_ns
                    for digest_frame in await self._complete_and_digest(state):
                        await out.put(digest_frame)
                elif kind in ("repair", "repair_end") and cid == 0:
                    reply = await self._repair(state, frame)
                    if reply is not None:
                        await out.put(reply)
                elif kind == "postcopy_start" and cid == 0:
                    if not state.postcopy:
                        raise ProtocolError("PostCopyStart, but Open did not enable post-copy")
                    inc.move(TargetState.POSTCOPY_VERIFYING, "PostCopyStart")
                    state.handle.source_last_console_ns = frame.postcopy_start.last_console_unix_ns
                    state.postcopy_started_at = time.monotonic()
                    await self._mark_verified(inc, TargetState.POSTCOPY_VERIFIED)
                    await out.put(qemu_postcopy.HANDED_OFF)
                elif kind == "postcopy_end" and cid == 0:
                    await out.put(await qemu_postcopy.end_incoming(self.incoming, state))
                    return
                elif kind == "commit" and cid == 0 and inc.postcopy:
                    if not inc.verified:
                        raise ProtocolError("Commit before the post-copy hand-off")
                    state.resume_task = asyncio.create_task(
                        qemu_postcopy.resume_incoming(self.incoming, state, out)
                    )
                elif kind == "commit" and cid == 0:
                    if not inc.verified:
                        raise ProtocolError("Commit before the memory was verified")
                    t0 = time.monotonic()
                    await self.incoming.on_commit(inc)  # a no-op if another path decided
                    gap = state.handle.resume_gap_ms
                    await out.put(
                        pb.TunnelTargetFrame(
                            resumed=pb.Resumed(
                                resume_seconds=time.monotonic() - t0, guest_gap_ms=gap or 0.0
                            )
                        )
                    )
                    return
                elif kind == "abort":
                    log.info(
                        "migration %s: source aborted: %s", inc.migration_uid, frame.abort.reason
                    )
                    await self.incoming.on_abort(inc, frame.abort.reason)
                    return
                else:
                    raise ProtocolError(f"unexpected frame {kind!r} on tunnel channel {cid}")
        except (ConnectionError, OSError) as e:
            await out.put(pb.TunnelTargetFrame(failure=pb.Failure(reason=f"target QEMU: {e}")))
        except GuestError as e:
            await out.put(pb.TunnelTargetFrame(failure=pb.Failure(reason=str(e))))
        finally:
            await out.put(None)

    async def _complete_and_digest(self, state: TunnelState) -> list[pb.TunnelTargetFrame]:
        """Wait for the target QEMU to finish loading (it stays paused), then digests."""
        h = state.handle
        t0 = time.monotonic()
        # its MIGRATION event (capability "events") starts the digest the moment it is loaded
        info = await h.wait_migration(("completed", "failed", "cancelled"), COMPLETE_TIMEOUT)
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise GuestError(
                f"the target QEMU's incoming migration {status}: {info.get('error-desc', '')}"
            )
        if status != "completed":
            raise GuestError(f"the target QEMU did not finish loading ({status})")
        disks = storage.exported_disks(h.qspec.disks)
        if disks:  # the mirrors completed before the source continued: nothing writes now
            await storage.unexport_disks(h, self.driver.nbd_socket(h.vm_id))
        state.inc.verified_at = time.monotonic()
        if state.verify == pb.VERIFY_MODE_OFF:
            await self._mark_verified(state.inc)
            return [pb.TunnelTargetFrame(verified=pb.Verified(match=True, detail="verify: off"))]
        t1 = time.monotonic()
        replies = _digest_frames(await qemu_verify.page_digests_async(h.ram()), "")
        for _, disk in disks:
            replies += _digest_frames(await storage.image_digests(disk.path), disk.name)
        log.info(
            "migration %s: the target QEMU completed %.1f ms after the source; digests in %.1f ms",
            state.inc.migration_uid,
            (t1 - t0) * 1000,
            (time.monotonic() - t1) * 1000,
        )
        return replies

    async def _repair(
        self, state: TunnelState, frame: pb.TunnelSourceFrame
    ) -> pb.TunnelTargetFrame | None:
        pages = state.handle.qspec.memory_bytes // PAGE_SIZE
        if frame.WhichOneof("frame") == "repair":
            if state.verify != pb.VERIFY_MODE_REPAIR:
                raise ProtocolError("Repair frames in a migration that does not repair")
            blob = frame.repair.indices
            if len(blob) % 4:
                raise ProtocolError("Repair.indices is not a multiple of 4 bytes")
            idx = np.frombuffer(blob, dtype="<u4").astype(np.int64)
            if frame.repair.disk:
                await self._repair_disk(state, frame.repair.disk, idx, frame.repair.payload)
                return None
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
        got = np.concatenate(state.repaired) if state.repaired else qemu_verify.no_digests()
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
        for disk_end in end.disks:
            repaired = state.disk_repaired.get(disk_end.disk) or []
            got = np.concatenate(repaired) if repaired else qemu_verify.no_digests()
            try:
                expected = qemu_verify.digests_from_bytes(disk_end.digests, int(disk_end.blocks))
            except ValueError as e:
                raise ProtocolError(f"disk {disk_end.disk}: {e}") from None
            if len(got) != disk_end.blocks or not bool((got == expected).all()):
                match = False
                detail = f'the repaired blocks of disk "{disk_end.disk}" still differ'
            elif disk_end.blocks:
                detail += f', {disk_end.blocks} block(s) of disk "{disk_end.disk}" repaired'
        if match:
            await self._mark_verified(state.inc)
        else:
            state.inc.move(TargetState.MISMATCHED, "RepairEnd with differing pages")
        log.info("migration %s: %s", state.inc.migration_uid, detail)
        return pb.TunnelTargetFrame(
            verified=pb.Verified(
                match=match,
                repaired_pages=int(end.pages),
                detail=detail,
                verify_seconds=time.monotonic() - state.inc.verified_at,
            )
        )

    async def _repair_disk(
        self, state: TunnelState, name: str, idx: np.ndarray, payload: bytes
    ) -> None:
        disk = next(
            (d for _, d in storage.exported_disks(state.handle.qspec.disks) if d.name == name), None
        )
        if disk is None:
            raise ProtocolError(f'Repair of disk "{name}", which this migration does not mirror')
        try:
            new = await asyncio.to_thread(storage.write_blocks, disk.path, idx, payload)
        except ValueError as e:
            raise ProtocolError(f'disk "{name}": {e}') from None
        state.disk_repaired.setdefault(name, []).append(new)

    async def _mark_verified(
        self, inc: IncomingMigration, to: TargetState = TargetState.VERIFIED
    ) -> None:
        """Verified, once the restart record is on disk (the device state travels in
        QEMU's stream: the record holds none; ``postcopy``: a restarted handler takes the
        post-copy up again, vm_postcopy.py)."""
        postcopy = to is TargetState.POSTCOPY_VERIFIED
        written = self.incoming.records.write_soon(
            inc.migration_uid, RestartRecord(inc.handle.vm_id, b"", postcopy=postcopy)
        )
        if written is not None:
            await written
        inc.move(to, "a verified memory")
        inc.verified_at = time.monotonic()


def _digest_frames(digests: qemu_verify.PageDigests, disk: str) -> list[pb.TunnelTargetFrame]:
    """Digests frames of the RAM (``disk`` empty) or of a mirrored disk's blocks."""
    blob = qemu_verify.digests_to_bytes(digests)
    step = DIGEST_FRAME_PAGES * qemu_verify.DIGEST_BYTES
    return [
        pb.TunnelTargetFrame(
            digests=pb.Digests(
                first_page=first // qemu_verify.DIGEST_BYTES,
                digests=blob[first : first + step],
                last=first + step >= len(blob),
                disk=disk,
            )
        )
        for first in range(0, len(blob), step)
    ]
