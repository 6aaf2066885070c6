"""The memvm target: the Transfer service (vmferry.v1.Migration) on the migration network.

``MigrationService.Transfer`` serves each channel of an ``IncomingMigration`` and
enforces, in order: the peer checks of ``peer.PeerGate`` (registered migration, source
node's certificate, token); the Hello's protocol version and geometry; frames in the
order of the state machine in ``proto/vmferry/rpc/migration.proto`` (``target_state``).
Violations end the stream with INVALID_ARGUMENT / PERMISSION_DENIED / NOT_FOUND and a
message that says which rule.

Each channel has a reader task (applies frames) and an outbound queue drained by the
servicer, so the target can also speak first: in post-copy, the request poller sends
PageRequest frames on channel 0 for the pages the guest is waiting for.

Ownership: the service writes guest RAM only through ``IncomingMigration.pages``;
before the hand-off nothing else touches it, and in post-copy a page is written only
while its present byte is 0 (the guest does not touch it then) and marked present
after. The VM manager owns the handle's lifecycle (resume on commit, destroy on abort)
through the registry's callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from handler import stream
from handler.digest import ChunkDigest
from handler.migration.handoff import MigrationFailed
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.peer import abort, accepts_hello, accepts_resume
from handler.migration.restart_record import RestartRecord, consume_failure
from handler.migration.target_state import TargetState
from handler.migration.worker_link import Applied, TargetJob
from handler.migration.worker_pool import RemoteReceiver, WorkerPool, digest_path
from handler.peers import no_postcopy
from vmferry import failpoints, pki
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)

FINAL_ROUND_TIMEOUT = 60.0  # s for every channel's final round once FinalState arrived
REQUEST_POLL = 0.001  # s between looks at the pages a post-copy guest is waiting for


def _receive_and_hash(
    pages: npt.NDArray[np.uint8],
    raw: bytes,
    present: npt.NDArray[np.uint8] | None,
    digest: ChunkDigest | None,
    ram_file: Path | None,
) -> tuple[stream.IndexArray, int]:
    """Worker: apply one page batch (fresh RAM is zeros unless in post-copy; long runs
    through ``ram_file``), hashing the pages it writes as it writes them. Returns (pages
    written, payload bytes)."""
    written, _, payload_bytes = stream.receive_batch(
        pages, raw, present, fresh_zero=present is None, ram_file=ram_file, digest=digest
    )
    return written, payload_bytes


class _ChannelClosed(Exception):
    """The reader finished this channel normally (commit, abort, post-copy done)."""


class MigrationService:
    """The Transfer service; frames arrive as bytes, see ``stream.transfer_handler``."""

    def __init__(self, incoming: IncomingRegistry) -> None:
        self.incoming = incoming
        self._pollers: set[asyncio.Task[None]] = set()
        # (migration uid, channel) -> the out queue of that channel's current stream
        self._current: dict[tuple[str, int], asyncio.Queue[pb.TargetFrame | None]] = {}
        # stream workers (use_workers): migration uid -> its channels 1.. they serve
        self.workers: WorkerPool | None = None
        self._listen: Callable[[], str] = lambda: "127.0.0.1"
        self._tls: pki.TlsFiles | None = None
        self._receivers: dict[str, list[RemoteReceiver]] = {}
        incoming.on_forget(self._release)

    def use_workers(
        self, workers: WorkerPool, listen: Callable[[], str], tls: pki.TlsFiles | None
    ) -> None:
        """Serve channels 1.. of a migration whose source asks for it (Hello.stream_workers)
        in ``workers``, listening on ``listen()`` (the migration service's address now)."""
        self.workers, self._listen, self._tls = workers, listen, tls

    def register(self, server: grpc.aio.Server) -> None:
        """Serve Transfer on ``server``."""
        server.add_generic_rpc_handlers((stream.transfer_handler(self.Transfer),))

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
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        inc, hello = await self.incoming.gate.admit(
            context,
            first,
            "hello",
            acceptable=lambda inc: accepts_hello(inc.state, first.hello.resume),
            check=self._check_hello,
        )
        inc.channel_count = hello.channel_count
        inc.connected.add(hello.channel_id)
        channel = hello.channel_id
        ports: list[int] = []
        if channel == 0:
            self._release(inc.migration_uid)  # a reconnect: its channels start over
            if hello.stream_workers and not hello.resume:
                ports = await self._lend(inc, hello.channel_count - 1)
        out: asyncio.Queue[pb.TargetFrame | None] = asyncio.Queue()
        out.put_nowait(
            pb.TargetFrame(hello_ack=pb.HelloAck(channel_id=channel, worker_ports=ports))
        )
        out.put_nowait(pb.TargetFrame(credit=pb.Credit(bytes=stream.CREDIT_WINDOW)))
        # A reconnect replaces the channel's stream: the one it replaces, if its end has
        # not been noticed yet, applies nothing more (see _read).
        key = (inc.migration_uid, channel)
        self._current[key] = out
        if channel == 0:
            inc.control_out = out
            inc.disconnected_since = None
            if hello.resume and inc.state.guest_runs_here:
                self._resume_postcopy_stream(inc, out)
                if not inc.polling:  # re-adopted after a handler restart
                    self._start_poller(inc)
        if hello.resume and not inc.state.postcopy:
            log.info(
                "migration %s: source reconnected channel %d in pre-copy",
                inc.migration_uid,
                channel,
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
                if inc.state.guest_runs_here:  # the recovery window starts
                    inc.disconnected_since = time.monotonic()
            if self._current.get(key) is out:
                del self._current[key]
        if error and isinstance(error[0], stream.ProtocolError):
            log.warning(
                "migration %s: protocol error on channel %d: %s",
                inc.migration_uid,
                channel,
                error[0],
            )
            if not inc.postcopy:
                await self.incoming.on_abort(inc, f"protocol error: {error[0]}")
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error[0]))

    # -- channels 1.. in stream workers -----------------------------------------------------

    async def _lend(self, inc: IncomingMigration, count: int) -> list[int]:
        """Start ``count`` stream workers for channels 1..count of ``inc``; the ports they
        listen on, or [] (every channel then connects here) when this handler has too
        few idle, the hand-off crosses clusters, or one of them fails to start."""
        uid = inc.migration_uid
        pool = self.workers
        taken = None if pool is None or inc.peer_cluster else pool.take(count)
        if pool is None or taken is None:
            return []
        handle = inc.handle
        tables = digest_path(handle.ram_path, uid, "target")
        receivers = self._receivers[uid] = []
        ports = []
        try:
            digest = inc.chunk_digest
            if not digest.shared:
                digest.share(Path(tables))
            for cid, worker in enumerate(taken, start=1):
                receiver = RemoteReceiver(
                    worker,
                    cid,
                    on_applied=partial(self._applied, inc),
                    on_end=partial(self._receiver_ended, inc),
                )
                receivers.append(receiver)
                job = TargetJob(
                    address=self._listen(),
                    tls=self._tls,
                    migration_uid=uid,
                    token=inc.token,
                    source_node=inc.source_node,
                    channel_id=cid,
                    channel_count=count + 1,
                    memory_bytes=handle.spec.memory_bytes,
                    page_size=handle.spec.page_size,
                    ram_path=str(handle.ram_path),
                    digest_path=tables,
                )
                ports.append(await receiver.start(job))
        except (MigrationFailed, OSError, ValueError) as e:
            log.warning("migration %s: channels stay in the handler: %s", uid, e)
            self._release(uid)
            return []
        finally:
            for worker in taken:
                if worker.job is None:
                    pool.give_back(worker)
        log.info("migration %s: channels 1-%d served by stream workers", uid, count)
        return ports

    def _applied(self, inc: IncomingMigration, receiver: RemoteReceiver, done: Applied) -> None:
        """A worker's round on its channel is in RAM (and hashed)."""
        inc.pages_applied += done.pages
        inc.bytes_received += done.payload_bytes
        if receiver in self._receivers.get(inc.migration_uid, []):  # not a released one
            self._round_done(inc, receiver.id, done.final)

    def _receiver_ended(self, inc: IncomingMigration, receiver: RemoteReceiver) -> None:
        if receiver in self._receivers.get(inc.migration_uid, []):
            log.info(
                "migration %s: channel %d (stream worker) ended: %s",
                inc.migration_uid,
                receiver.id,
                receiver.error,
            )

    def _release(self, migration_uid: str) -> None:
        for receiver in self._receivers.pop(migration_uid, []):
            receiver.close()

    @staticmethod
    def _check_hello(inc: IncomingMigration, hello: pb.Hello) -> pb.Hello:
        """The Hello's version and geometry, and how it fits the channels so far; the first
        Hello moves the migration to Receiving."""
        stream.check_hello(
            hello,
            memory_bytes=inc.handle.spec.memory_bytes,
            page_size=inc.handle.spec.page_size,
        )
        if hello.resume and not accepts_resume(inc.state):
            raise stream.ProtocolError(
                f"a reconnect is only possible while pre-copy receives or during post-copy "
                f"(state {inc.state})"
            )
        if inc.channel_count and hello.channel_count != inc.channel_count:
            raise stream.ProtocolError(
                f"channel_count {hello.channel_count} differs from the first channel's "
                f"{inc.channel_count}"
            )
        if hello.channel_id in inc.connected and not hello.resume:
            raise stream.ProtocolError(f"channel {hello.channel_id} is already connected")
        if inc.state is TargetState.AWAITING_HELLO:
            inc.move(TargetState.RECEIVING, "Hello")
        return hello

    @staticmethod
    def _resume_postcopy_stream(
        inc: IncomingMigration, out: asyncio.Queue[pb.TargetFrame | None]
    ) -> None:
        """A post-copy source reconnected: tell it which pages are still missing."""
        missing = inc.postcopy_handle.missing_pages()
        log.info(
            "migration %s: source reconnected in post-copy; %d pages missing",
            inc.migration_uid,
            len(missing),
        )
        inc.request_sent = None  # re-request whatever was in flight
        out.put_nowait(
            pb.TargetFrame(
                postcopy_state=pb.PostCopyState(missing_indices=stream.pack_indices(missing))
            )
        )

    async def _read(
        self,
        inc: IncomingMigration,
        channel: int,
        frames: AsyncIterator[bytes],
        out: asyncio.Queue[pb.TargetFrame | None],
        error: list[BaseException],
    ) -> None:
        key = (inc.migration_uid, channel)
        try:
            async for raw in frames:
                if self._current.get(key) is not out:
                    raise _ChannelClosed  # replaced by a reconnect of the same channel
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
        state = inc.state
        if kind == "commit" and channel == 0 and state.committed and not state.postcopy:
            # The arbiter record reached this handler before the Commit frame.
            out.put_nowait(pb.TargetFrame(resumed=pb.Resumed(resume_seconds=0.0)))
            raise _ChannelClosed
        if state is TargetState.ABORTED or (
            state.committed and not state.postcopy and kind != "commit"
        ):
            raise stream.ProtocolError(f"frame {kind} after the migration was {inc.decision}")
        if frame is None:
            await self._apply_pages(inc, channel, raw, out)
        elif kind == "round_end":
            self._round_end(inc, channel, frame.round_end, out)
        elif kind == "device_state" and channel == 0:
            if inc.device_state is not None or state is not TargetState.RECEIVING:
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
            await self.incoming.on_commit(inc)  # a no-op when another path decided first
            out.put_nowait(pb.TargetFrame(resumed=pb.Resumed(resume_seconds=time.monotonic() - t0)))
            if not inc.postcopy:
                raise _ChannelClosed
            self._start_poller(inc)
        elif kind == "postcopy_end" and channel == 0:
            out.put_nowait(await self._finish_postcopy(inc))
            await self.incoming.on_postcopy_done(inc)
            raise _ChannelClosed
        elif kind == "abort":
            if state.committed:
                raise stream.ProtocolError("Abort after the post-copy hand-off: the VM runs here")
            log.info("migration %s: source aborted: %s", inc.migration_uid, frame.abort.reason)
            await self.incoming.on_abort(inc, frame.abort.reason)
            raise _ChannelClosed
        else:
            raise stream.ProtocolError(f"unexpected frame {kind!r} on channel {channel}")

    async def _apply_pages(
        self,
        inc: IncomingMigration,
        channel: int,
        raw: bytes,
        out: asyncio.Queue[pb.TargetFrame | None],
    ) -> None:
        if channel in inc.final_channels:
            raise stream.ProtocolError("pages after the final round")
        present = inc.postcopy_handle.present() if inc.postcopy else None
        # Before post-copy the pages are hashed where they were written, while hot in the
        # cache, so the digest is ready once the last batch is in (digest.py).
        digest = None if inc.postcopy else inc.chunk_digest
        ram_file = inc.handle.ram_path
        if stream.is_small_batch(raw, stream.INLINE_BATCH_PAGES, inc.handle.spec.page_size):
            written, payload_bytes = _receive_and_hash(inc.pages, raw, present, digest, ram_file)
        else:
            written, payload_bytes = await asyncio.to_thread(
                _receive_and_hash, inc.pages, raw, present, digest, ram_file
            )
        if inc.postcopy:
            inc.postcopy_handle.mark_present(written)
            if inc.state.guest_runs_here:
                failpoints.hit(failpoints.Step.TARGET_POSTCOPY)
        inc.pages_applied += len(written)
        inc.bytes_received += payload_bytes
        out.put_nowait(pb.TargetFrame(credit=pb.Credit(bytes=payload_bytes)))

    @classmethod
    def _round_end(
        cls,
        inc: IncomingMigration,
        channel: int,
        end: pb.RoundEnd,
        out: asyncio.Queue[pb.TargetFrame | None],
    ) -> None:
        cls._round_done(inc, channel, end.final)
        out.put_nowait(
            pb.TargetFrame(round_ack=pb.RoundAck(round=end.round, pages_applied=inc.pages_applied))
        )

    @staticmethod
    def _round_done(inc: IncomingMigration, channel: int, final: bool) -> None:
        """A round's pages on ``channel`` are all applied."""
        if not inc.postcopy and not final:
            inc.chunk_digest.refresh_in_background()  # the group hashes, between rounds
        if final:
            inc.final_channels.add(channel)
            if len(inc.final_channels) == inc.channel_count:
                inc.all_final.set()
                # Every page is in and no more may come: the memory is still.
                inc.final_digest = inc.chunk_digest.digest_soon()
                inc.final_digest.add_done_callback(consume_failure)

    # -- switchover -------------------------------------------------------------------------

    async def _verify(self, inc: IncomingMigration, final: pb.FinalState) -> pb.TargetFrame:
        if inc.state is TargetState.RECEIVING and inc.device_state is None:
            raise stream.ProtocolError("FinalState before DeviceState")
        inc.move(TargetState.VERIFYING, "FinalState")
        try:
            async with asyncio.timeout(FINAL_ROUND_TIMEOUT):
                await inc.all_final.wait()
        except TimeoutError:
            raise stream.ProtocolError(
                "FinalState before every channel finished its final round"
            ) from None
        t0 = time.monotonic()
        # Started with all_final, when the last final round came in (see _round_end).
        assert inc.final_digest is not None
        return await self._verified(inc, inc.final_digest, final.digest, t0)

    async def _start_postcopy(
        self, inc: IncomingMigration, start: pb.PostCopyStart
    ) -> pb.TargetFrame:
        """The source paused and lacks convergence: verify what is here, mark the rest
        missing; the guest will resume here before it has all its memory."""
        if inc.peer_cluster:
            raise stream.ProtocolError(no_postcopy(inc.migration_uid, inc.peer_cluster))
        if inc.device_state is not None:
            raise stream.ProtocolError("PostCopyStart after the switchover began")
        handle = inc.postcopy_handle
        missing = stream.unpack_indices(start.missing_indices, handle.page_count, "missing_indices")
        # No page may come through a worker from here on: it does not know which pages
        # the guest writes once it runs here (the source sent its last one before this).
        self._release(inc.migration_uid)
        inc.move(TargetState.POSTCOPY_VERIFYING, "PostCopyStart")
        t0 = time.monotonic()
        inc.device_state = start.device_state
        handle.prepare_postcopy(missing)
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
        match = secrets.compare_digest(digest, expected)
        if match:
            verified = TargetState.POSTCOPY_VERIFIED if inc.postcopy else TargetState.VERIFIED
            inc.move(verified, "a matching digest")
        else:
            inc.move(TargetState.MISMATCHED, "a differing digest")
            self.incoming.records.remove(inc.migration_uid)
        inc.verified_at = time.monotonic()
        seconds = time.monotonic() - t0
        log.info(
            "migration %s: memory digest %s (%.0f ms)",
            inc.migration_uid,
            "verified" if match else "MISMATCH",
            seconds * 1000,
        )
        return pb.TargetFrame(
            verified=pb.Verified(match=match, digest=digest, verify_seconds=seconds)
        )

    def _write_record_soon(self, inc: IncomingMigration) -> asyncio.Future[None] | None:
        return self.incoming.records.write_soon(
            inc.migration_uid,
            RestartRecord(inc.handle.vm_id, inc.device_state or b"", postcopy=inc.postcopy),
        )

    # -- post-copy: demand faults and the end -----------------------------------------------

    async def _finish_postcopy(self, inc: IncomingMigration) -> pb.TargetFrame:
        if not inc.postcopy:
            raise stream.ProtocolError("PostCopyEnd outside post-copy")
        handle = inc.postcopy_handle
        missing = handle.missing_pages()
        if missing.size:
            raise stream.ProtocolError(f"PostCopyEnd with {missing.size} pages still missing")
        status = await handle.finish_postcopy()
        inc.move(TargetState.POSTCOPY_DONE, "PostCopyEnd")
        inc.stall_ms, inc.faults = status.stall_ms, status.faults
        log.info(
            "migration %s: post-copy complete (guest stalled %.1f ms over %d faults)",
            inc.migration_uid,
            status.stall_ms,
            status.faults,
        )
        return pb.TargetFrame(
            postcopy_done=pb.PostCopyDone(
                stall_seconds=status.stall_ms / 1000, faults=status.faults
            )
        )

    def _start_poller(self, inc: IncomingMigration) -> None:
        task = asyncio.create_task(self._poll_requests(inc))
        inc.polling = True
        self._pollers.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._pollers.discard(task)
            inc.polling = False

        task.add_done_callback(done)

    async def _poll_requests(self, inc: IncomingMigration) -> None:
        """Forward the guest's page faults to the source, each page once per connection."""
        handle = inc.postcopy_handle
        while inc.state.guest_runs_here:
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
