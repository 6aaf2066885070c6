"""The receiving side of live migrations: the Transfer service on the migration network.

``IncomingMigration`` is the target's record of one expected migration (registered by
the VM manager when the hand-off names this node). ``MigrationService.Transfer`` serves
each channel of it and enforces, in order: the peer certificate names the hand-off's
source node; the Hello names a registered migration with the right token, protocol
version and geometry; frames arrive in the order of the state machine in
``proto/vmferry/rpc/migration.proto``. Violations end the stream with
INVALID_ARGUMENT / PERMISSION_DENIED / NOT_FOUND and a message that says which rule.

Each channel has a reader task (applies frames) and an outbound queue drained by the
servicer, so the target can also speak first: in post-copy, the request poller sends
PageRequest frames on channel 0 for the pages the guest is waiting for.

Ownership: the service writes guest RAM only through ``IncomingMigration.pages``;
before the hand-off nothing else touches it, and in post-copy a page is written only
while its present byte is 0 (the guest does not touch it then) and marked present
after. The VM manager owns the handle's lifecycle (resume on commit, destroy on abort)
through the callbacks.
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
import numpy.typing as npt

from handler import stream
from handler.digest import ChunkDigest
from handler.drivers.base import PostCopyHandle, VMHandle
from vmferry import pki
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)

FINAL_ROUND_TIMEOUT = 60.0  # s for every channel's final round once FinalState arrived
REQUEST_POLL = 0.001  # s between looks at the pages a post-copy guest is waiting for


@dataclass
class IncomingMigration:
    namespace: str
    name: str
    vmi_uid: str
    migration_uid: str
    token: str
    source_node: str
    handle: VMHandle
    channel_count: int = 0
    connected: set[int] = field(default_factory=set)
    final_channels: set[int] = field(default_factory=set)
    all_final: asyncio.Event = field(default_factory=asyncio.Event)
    device_state: bytes | None = None  # from DeviceState (or PostCopyStart)
    # The restart record's write, started when the device state arrives (see _verified).
    record_written: asyncio.Future[None] | None = None
    verified: bool = False
    decision: str = ""  # "", "Committed" or "Aborted"
    pages_applied: int = 0
    bytes_received: int = 0
    verified_at: float = 0.0  # time.monotonic() of the verification
    postcopy: bool = False  # the guest runs here while pages are still arriving
    postcopy_done: bool = False
    control_out: asyncio.Queue[pb.TargetFrame | None] | None = None  # channel 0's queue
    request_sent: npt.NDArray[np.bool_] | None = None  # pages already asked for
    stall_ms: float = 0.0
    faults: int = 0
    _pages: npt.NDArray[np.uint8] | None = None
    _digest: ChunkDigest | None = None
    # The digest of RAM, started once every channel's final round is in: it is made
    # while the source's FinalState (its digest) is on its way.
    final_digest: asyncio.Future[str] | None = None

    @property
    def chunk_digest(self) -> ChunkDigest:
        """Per-chunk hashes of the RAM received so far (invalidated by every write)."""
        if self._digest is None:
            # prepare_incoming() made a fresh, all-zero RAM file: only writes need hashing.
            self._digest = ChunkDigest(self.handle.ram(), self.handle.spec.page_size, all_zero=True)
        return self._digest

    @property
    def pages(self) -> npt.NDArray[np.uint8]:
        if self._pages is None:
            self._pages = stream.page_view(self.handle.ram(), self.handle.spec.page_size)
        return self._pages

    @property
    def postcopy_handle(self) -> PostCopyHandle:
        if not isinstance(self.handle, PostCopyHandle):
            raise stream.ProtocolError(f"driver of {self.handle.vm_id} cannot run post-copy")
        return self.handle

    def release(self) -> None:
        self._pages = None
        if self.final_digest is not None and not self.final_digest.done():
            self.final_digest.cancel()
        if self._digest is not None:
            self._digest.release()
            self._digest = None


Callback = Callable[[IncomingMigration], Awaitable[None]]


def _receive_and_hash(
    pages: npt.NDArray[np.uint8],
    raw: bytes,
    present: npt.NDArray[np.uint8] | None,
    digest: ChunkDigest | None,
    ram_file: Path | None,
) -> tuple[stream.IndexArray, int]:
    """Worker: apply one page batch (fresh RAM is zeros unless in post-copy; long runs
    through ``ram_file``), then hash the pages it wrote. Returns (pages written, payload
    bytes)."""
    written, _, payload_bytes = stream.receive_batch(
        pages, raw, present, fresh_zero=present is None, ram_file=ram_file
    )
    if digest is not None:
        digest.hash_pages(written)
    return written, payload_bytes


def _consume_failure(future: asyncio.Future[Any]) -> None:
    """A digest or record write nobody awaits (the source went away before its
    FinalState) must not be reported as a never-retrieved exception; the one awaited
    raises there."""
    if not future.cancelled():
        future.exception()


class _ChannelClosed(Exception):
    """The reader finished this channel normally (commit, abort, post-copy done)."""


class MigrationService:
    """The Transfer service (vmferry.v1.Migration); frames arrive as bytes, see
    ``stream.transfer_handler``."""

    def __init__(
        self,
        on_commit: Callback,
        on_abort: Callable[[IncomingMigration, str], Awaitable[None]],
        *,
        record_dir: Path | None = None,
        require_peer_identity: bool = True,
    ) -> None:
        self.registry: dict[str, IncomingMigration] = {}
        self.record_dir = record_dir
        self.on_commit = on_commit
        self.on_abort = on_abort
        self.on_postcopy_done: Callback | None = None
        self.require_peer_identity = require_peer_identity
        self._pollers: set[asyncio.Task[None]] = set()

    def register(self, server: grpc.aio.Server) -> None:
        """Serve Transfer on ``server``."""
        server.add_generic_rpc_handlers((stream.transfer_handler(self.Transfer),))

    def expect(self, inc: IncomingMigration) -> None:
        self.registry[inc.migration_uid] = inc

    def forget(self, migration_uid: str) -> IncomingMigration | None:
        inc = self.registry.pop(migration_uid, None)
        if inc is not None:
            inc.release()
            inc.control_out = None
        return inc

    # -- one channel ------------------------------------------------------------------------

    async def Transfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TargetFrame]:
        frames = aiter(request_iterator)
        try:
            first = stream.parse_frame(await anext(frames))
        except StopAsyncIteration:
            return
        except stream.ProtocolError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if first.WhichOneof("frame") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Hello")
        hello = first.hello
        inc = self.registry.get(hello.migration_uid)
        resumable = inc is not None and inc.postcopy and inc.decision == "Committed"
        if inc is None or (inc.decision and not (hello.resume and resumable)):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no migration {hello.migration_uid!r} is expected on this node",
            )
            return
        peer = pki.peer_identity(context)
        if self.require_peer_identity and (peer is None or peer.node_name != inc.source_node):
            who = peer.user if peer else "an unauthenticated peer"
            log.warning(
                "migration %s: refused stream from %s (expected node %s)",
                inc.migration_uid,
                who,
                inc.source_node,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} is not the source node {inc.source_node} of migration {inc.migration_uid}",
            )
        if not secrets.compare_digest(hello.token.encode(), inc.token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong migration token")
        try:
            stream.check_hello(
                hello,
                memory_bytes=inc.handle.spec.memory_bytes,
                page_size=inc.handle.spec.page_size,
            )
            if hello.resume and not resumable:
                raise stream.ProtocolError("resume is only possible during post-copy")
            if inc.channel_count and hello.channel_count != inc.channel_count:
                raise stream.ProtocolError(
                    f"channel_count {hello.channel_count} differs from the first channel's "
                    f"{inc.channel_count}"
                )
            if hello.channel_id in inc.connected and not hello.resume:
                raise stream.ProtocolError(f"channel {hello.channel_id} is already connected")
        except stream.ProtocolError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        inc.channel_count = hello.channel_count
        inc.connected.add(hello.channel_id)
        channel = hello.channel_id
        out: asyncio.Queue[pb.TargetFrame | None] = asyncio.Queue()
        out.put_nowait(pb.TargetFrame(hello_ack=pb.HelloAck(channel_id=channel)))
        out.put_nowait(pb.TargetFrame(credit=pb.Credit(bytes=stream.CREDIT_WINDOW)))
        if channel == 0:
            inc.control_out = out
            if hello.resume:
                missing = inc.postcopy_handle.missing_pages()
                log.info(
                    "migration %s: source reconnected in post-copy; %d pages missing",
                    inc.migration_uid,
                    len(missing),
                )
                inc.request_sent = None  # re-request whatever was in flight
                out.put_nowait(
                    pb.TargetFrame(
                        postcopy_state=pb.PostCopyState(
                            missing_indices=stream.pack_indices(missing)
                        )
                    )
                )
        error: list[BaseException] = []
        reader = asyncio.create_task(self._read(inc, channel, frames, out, error))
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if channel == 0 and inc.control_out is out:
                inc.control_out = None
        if error and isinstance(error[0], stream.ProtocolError):
            log.warning(
                "migration %s: protocol error on channel %d: %s",
                inc.migration_uid,
                channel,
                error[0],
            )
            if not inc.postcopy:
                await self.on_abort(inc, f"protocol error: {error[0]}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error[0]))

    async def _read(
        self,
        inc: IncomingMigration,
        channel: int,
        frames: AsyncIterator[bytes],
        out: asyncio.Queue[pb.TargetFrame | None],
        error: list[BaseException],
    ) -> None:
        try:
            async for raw in frames:
                await self._apply(inc, channel, raw, out)
        except (_ChannelClosed, StopAsyncIteration):
            pass
        except stream.ProtocolError as e:
            error.append(e)
        except Exception as e:
            log.info("migration %s: channel %d closed: %r", inc.migration_uid, channel, e)
        finally:
            out.put_nowait(None)

    async def _apply(
        self,
        inc: IncomingMigration,
        channel: int,
        raw: bytes,
        out: asyncio.Queue[pb.TargetFrame | None],
    ) -> None:
        # Page batches are parsed and applied in a worker thread, everything else here.
        frame = None if stream.is_pages_frame(raw) else stream.parse_frame(raw)
        kind = "pages" if frame is None else frame.WhichOneof("frame")
        if kind == "commit" and channel == 0 and inc.decision == "Committed" and not inc.postcopy:
            # The arbiter record reached this handler before the Commit frame.
            out.put_nowait(pb.TargetFrame(resumed=pb.Resumed(resume_seconds=0.0)))
            raise _ChannelClosed
        if inc.decision == "Aborted" or (inc.decision and not inc.postcopy and kind != "commit"):
            raise stream.ProtocolError(f"frame {kind} after the migration was {inc.decision}")
        if frame is None:
            if channel in inc.final_channels:
                raise stream.ProtocolError("pages after the final round")
            present = inc.postcopy_handle.present() if inc.postcopy else None
            # Before post-copy the pages are hashed where they were written, while hot in
            # the cache, so the digest is ready once the last batch is in (digest.py).
            digest = None if inc.postcopy else inc.chunk_digest
            ram_file = inc.handle.ram_path
            if stream.is_small_batch(raw, stream.INLINE_BATCH_PAGES, inc.handle.spec.page_size):
                written, payload_bytes = _receive_and_hash(
                    inc.pages, raw, present, digest, ram_file
                )
            else:
                written, payload_bytes = await asyncio.to_thread(
                    _receive_and_hash, inc.pages, raw, present, digest, ram_file
                )
            if inc.postcopy:
                inc.postcopy_handle.mark_present(written)
            inc.pages_applied += len(written)
            inc.bytes_received += payload_bytes
            out.put_nowait(pb.TargetFrame(credit=pb.Credit(bytes=payload_bytes)))
            return
        if kind == "round_end":
            if not inc.postcopy and not frame.round_end.final:
                inc.chunk_digest.refresh_in_background()  # the group hashes, between rounds
            if frame.round_end.final:
                inc.final_channels.add(channel)
                if len(inc.final_channels) == inc.channel_count:
                    inc.all_final.set()
                    # Every page is in and no more may come: the memory is still.
                    inc.final_digest = inc.chunk_digest.digest_soon()
                    inc.final_digest.add_done_callback(_consume_failure)
            out.put_nowait(
                pb.TargetFrame(
                    round_ack=pb.RoundAck(
                        round=frame.round_end.round, pages_applied=inc.pages_applied
                    )
                )
            )
        elif kind == "device_state" and channel == 0:
            if inc.device_state is not None or inc.postcopy or inc.verified:
                raise stream.ProtocolError("DeviceState sent twice or after the switchover")
            inc.device_state = frame.device_state.state
            inc.record_written = self._write_record_soon(inc)
        elif kind == "final_state" and channel == 0:
            out.put_nowait(await self._verify(inc, frame.final_state))
        elif kind == "postcopy_start" and channel == 0:
            out.put_nowait(await self._start_postcopy(inc, frame.postcopy_start))
        elif kind == "commit" and channel == 0:
            if not inc.verified:
                raise stream.ProtocolError("Commit before the memory was verified")
            t0 = time.monotonic()
            if inc.decision != "Committed":  # else the arbiter record got here first
                await self.on_commit(inc)
            out.put_nowait(pb.TargetFrame(resumed=pb.Resumed(resume_seconds=time.monotonic() - t0)))
            if inc.postcopy:
                self._start_poller(inc)
            else:
                raise _ChannelClosed
        elif kind == "postcopy_end" and channel == 0:
            if not inc.postcopy:
                raise stream.ProtocolError("PostCopyEnd outside post-copy")
            handle = inc.postcopy_handle
            missing = handle.missing_pages()
            if missing.size:
                raise stream.ProtocolError(f"PostCopyEnd with {missing.size} pages still missing")
            status = await handle.finish_postcopy()
            inc.postcopy_done = True
            inc.stall_ms, inc.faults = status.stall_ms, status.faults
            out.put_nowait(
                pb.TargetFrame(
                    postcopy_done=pb.PostCopyDone(
                        stall_seconds=status.stall_ms / 1000, faults=status.faults
                    )
                )
            )
            log.info(
                "migration %s: post-copy complete (guest stalled %.1f ms over %d faults)",
                inc.migration_uid,
                status.stall_ms,
                status.faults,
            )
            if self.on_postcopy_done is not None:
                await self.on_postcopy_done(inc)
            raise _ChannelClosed
        elif kind == "abort":
            if inc.postcopy and inc.decision == "Committed":
                raise stream.ProtocolError("Abort after the post-copy hand-off: the VM runs here")
            log.info("migration %s: source aborted: %s", inc.migration_uid, frame.abort.reason)
            await self.on_abort(inc, frame.abort.reason)
            raise _ChannelClosed
        else:
            raise stream.ProtocolError(f"unexpected frame {kind!r} on channel {channel}")

    # -- switchover -------------------------------------------------------------------------

    async def _verify(self, inc: IncomingMigration, final: pb.FinalState) -> pb.TargetFrame:
        if inc.verified:
            raise stream.ProtocolError("FinalState sent twice")
        if inc.device_state is None:
            raise stream.ProtocolError("FinalState before DeviceState")
        try:
            async with asyncio.timeout(FINAL_ROUND_TIMEOUT):
                await inc.all_final.wait()
        except TimeoutError:
            raise stream.ProtocolError(
                "FinalState before every channel finished its final round"
            ) from None
        t0 = time.monotonic()
        # Started with all_final, when the last final round came in (see _apply).
        assert inc.final_digest is not None
        return await self._verified(inc, inc.final_digest, final.digest, t0)

    async def _start_postcopy(
        self, inc: IncomingMigration, start: pb.PostCopyStart
    ) -> pb.TargetFrame:
        """The source paused and lacks convergence: verify what is here, mark the rest
        missing; the guest will resume here before it has all its memory."""
        if inc.verified or inc.device_state is not None:
            raise stream.ProtocolError(
                "PostCopyStart after the memory was verified or the switchover began"
            )
        handle = inc.postcopy_handle
        missing = stream.unpack_indices(start.missing_indices, handle.page_count, "missing_indices")
        t0 = time.monotonic()
        inc.device_state = start.device_state
        handle.prepare_postcopy(missing)
        inc.postcopy = True
        inc.record_written = self._write_record_soon(inc)
        inc.final_channels.clear()
        inc.all_final.clear()
        log.info("migration %s: post-copy start, %d pages missing", inc.migration_uid, len(missing))
        digest = inc.chunk_digest.masked_digest_async(missing, handle.spec.page_size)
        return await self._verified(inc, digest, start.present_digest, t0)

    async def _verified(
        self, inc: IncomingMigration, digest_made: Awaitable[str], expected: str, t0: float
    ) -> pb.TargetFrame:
        """Verified for the source once ``digest_made`` is compared with ``expected`` and
        the restart record is on disk.

        The record that lets a handler restarted after the hand-off resume the guest
        (vm_manager settles it) does not depend on the digest: its write starts when the
        device state arrives, and it is removed again when they differ (the source never
        commits)."""
        record = inc.record_written
        try:
            digest = await digest_made
        finally:
            if record is not None:
                await record
        inc.verified = secrets.compare_digest(digest, expected)
        inc.verified_at = time.monotonic()
        if not inc.verified and record is not None:
            self.record_path(inc.migration_uid).unlink(missing_ok=True)
        seconds = time.monotonic() - t0
        log.info(
            "migration %s: memory digest %s (%.0f ms)",
            inc.migration_uid,
            "verified" if inc.verified else "MISMATCH",
            seconds * 1000,
        )
        return pb.TargetFrame(
            verified=pb.Verified(match=inc.verified, digest=digest, verify_seconds=seconds)
        )

    # -- post-copy: demand faults -----------------------------------------------------------

    def _start_poller(self, inc: IncomingMigration) -> None:
        task = asyncio.create_task(self._poll_requests(inc))
        self._pollers.add(task)
        task.add_done_callback(self._pollers.discard)

    async def _poll_requests(self, inc: IncomingMigration) -> None:
        """Forward the guest's page faults to the source, each page once per connection."""
        handle = inc.postcopy_handle
        while inc.postcopy and not inc.postcopy_done and inc.decision == "Committed":
            if inc.control_out is not None:
                if inc.request_sent is None:
                    inc.request_sent = np.zeros(handle.page_count, dtype=np.bool_)
                try:
                    wanted = handle.requested_pages()
                except Exception:
                    return
                new = wanted[~inc.request_sent[wanted]]
                if new.size:
                    inc.request_sent[new] = True
                    inc.control_out.put_nowait(
                        pb.TargetFrame(
                            page_request=pb.PageRequest(indices=stream.pack_indices(new))
                        )
                    )
            await asyncio.sleep(REQUEST_POLL)

    # -- restart records --------------------------------------------------------------------

    def record_path(self, migration_uid: str) -> Path:
        assert self.record_dir is not None
        return self.record_dir / f"{migration_uid}.json"

    def _write_record_soon(self, inc: IncomingMigration) -> asyncio.Future[None] | None:
        """Start writing ``inc``'s restart record in a worker (None: no record dir)."""
        if self.record_dir is None:
            return None
        written = asyncio.ensure_future(asyncio.to_thread(self._write_record, inc))
        written.add_done_callback(_consume_failure)
        return written

    def _write_record(self, inc: IncomingMigration) -> None:
        path = self.record_path(inc.migration_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "vmId": inc.handle.vm_id,
                    "deviceState": base64.b64encode(inc.device_state or b"").decode(),
                    "postcopy": inc.postcopy,
                }
            )
        )
        tmp.replace(path)
