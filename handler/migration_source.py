"""The sending side of one live migration (DESIGN §3), run by the source node's handler.

One ``SourceMigration`` per migration attempt; it owns a TaskGroup with one reader task
per channel, and everything it opens is closed in ``finally`` (safe to run twice).

Steps:
 1. Record ``startTimestamp`` with a resourceVersion precondition (so a migration the
    controller just failed or canceled never starts), then open ``parallelStreams``
    mTLS channels to the target's migration endpoint and exchange Hello/HelloAck.
 2. Pre-copy: round 0 clears the dirty log and sends all of RAM; each later round
    harvests the dirty log and sends those pages. After each round the measured
    bandwidth and dirty rate decide: when the remaining dirty memory can be sent within
    the downtime budget, go to switchover. No progress for ``progressTimeout`` s, or
    more than ``completionTimeoutPerGiB`` s per GiB in total, aborts.
 3. Switchover, timed in named parts: pause the guest (``pause``), send the last dirty
    pages (``final_pass``) while hashing RAM in threads and sending the device state
    as soon as the guest gives it, send the digest and collect the final acknowledgements
    (``state_transfer``), the target verifies the digest (``verify``).
 4. Hand-off: write ``switchover: Committed`` into the VMI status with a resourceVersion
    precondition — the arbiter. Only then is Commit sent; the target resumes
    (``resume``) and answers Resumed; the source guest is destroyed.
 Any failure before the arbiter records Committed resumes the guest here; a failure
 after it leaves the VM to the target (which also watches the arbiter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.ma  # np.unique imports it on first use (~15 ms here): not in a downtime
import numpy.typing as npt

from handler import stream
from handler.digest import ChunkDigest
from handler.drivers.base import GuestError, VMHandle
from handler.migration.handoff import Aborted, HandoffRecord, MigrationFailed, first_leaf
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.errors import ApiError
from vmferry.objects import conditions
from vmferry.objects.quantity import parse_quantity
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)
Obj = dict[str, Any]

GiB = 1 << 30
CONNECT_TIMEOUT = 10.0  # s to reach the target and get HelloAck on every channel
VERIFY_TIMEOUT = 60.0  # s for the target to hash and answer Verified
RESUMED_TIMEOUT = 30.0  # s; after that the target resumes from the arbiter record anyway
MIN_ROUND_SECONDS = 0.02  # a round shorter than this gives no useful rate sample
MAX_ROUNDS = 10_000  # a hard stop; the timeouts end a hopeless migration long before
AUTO_CONVERGE_INITIAL = 20  # % CPU throttle at the first non-converging round (QEMU's default)
AUTO_CONVERGE_STEP = 10  # % more at each further non-converging round
AUTO_CONVERGE_MAX = 99
NOT_CONVERGING = 0.5  # a round is not converging when the guest dirtied > 50% of what was sent
RECONNECT_DELAY = 0.5  # s, doubled up to RECONNECT_MAX_DELAY while post-copy recovers
RECONNECT_MAX_DELAY = 5.0
SHRINKING = 0.5  # a round left less than half of what it sent: another round pays
TIGHT_BUDGET = 0.02  # ... until the estimated pause is this fraction of the budget
MONITOR_PERIOD = 0.4  # s between timeout checks (KubeVirt's monitor period)
PACING_BURST = 0.05  # s of bandwidthPerMigration a paced stream may send ahead after a pause
PROGRESS_PERIOD = 0.5  # s between progress writes into the VMI status
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


STOP_SERVING = b"stop"  # sentinel on a channel's request queue (never a valid request)


@dataclass
class Stats:
    total_bytes: int = 0
    processed_bytes: int = 0
    remaining_bytes: int = 0
    wire_bytes: int = 0
    rounds: int = 0
    dirty_rate: float = 0.0
    transfer_rate: float = 0.0
    downtime_parts: dict[str, float] = field(default_factory=dict)
    guest_downtime_ms: float | None = None
    first_byte_at: float = 0.0  # time.monotonic() of the first and the latest batch sent
    last_byte_at: float = 0.0
    throttle_percent: int = 0  # the highest auto-converge throttle applied
    postcopy_stall_ms: float | None = None
    postcopy_faults: int = 0
    postcopy_interruptions: int = 0
    digest: str = ""
    target_digest: str = ""
    digest_verified: bool = False

    def as_status(self) -> Obj:
        out: Obj = {
            "dataTotalBytes": self.total_bytes,
            "dataProcessedBytes": self.processed_bytes,
            "dataRemainingBytes": self.remaining_bytes,
            "wireBytes": self.wire_bytes,
            "rounds": self.rounds,
            "dirtyRateBytes": int(self.dirty_rate),
            "transferRateBytes": int(self.transfer_rate),
        }
        if self.last_byte_at > self.first_byte_at:
            # The whole run's average on the wire: what bandwidthPerMigration caps.
            out["averageWireRateBytes"] = int(
                self.wire_bytes / (self.last_byte_at - self.first_byte_at)
            )
        if self.downtime_parts:
            out["downtimeMilliseconds"] = round(sum(self.downtime_parts.values()) * 1000, 3)
            out["downtimePartsMilliseconds"] = {
                part: round(seconds * 1000, 3) for part, seconds in self.downtime_parts.items()
            }
        if self.guest_downtime_ms is not None:
            out["guestDowntimeMilliseconds"] = round(self.guest_downtime_ms, 3)
        if self.throttle_percent:
            out["throttlePercent"] = self.throttle_percent
        if self.postcopy_stall_ms is not None:
            out["postCopyStallMilliseconds"] = round(self.postcopy_stall_ms, 3)
            out["postCopyFaults"] = self.postcopy_faults
        if self.postcopy_interruptions:
            out["postCopyInterruptions"] = self.postcopy_interruptions
        if self.digest:
            out["digest"] = self.digest
            out["targetDigest"] = self.target_digest
            out["digestVerified"] = self.digest_verified
        return out


class Channel:
    """One Transfer stream; its reader task routes the target's frames."""

    def __init__(self, channel_id: int, call: grpc.aio.StreamStreamCall) -> None:
        self.id = channel_id
        self.call = call
        self.credit = 0
        self.credit_changed = asyncio.Event()
        self.acks: asyncio.Queue[pb.RoundAck] = asyncio.Queue()
        self.control: asyncio.Queue[pb.TargetFrame] = asyncio.Queue()
        self.requests: asyncio.Queue[bytes] = asyncio.Queue()  # post-copy page faults
        self.write_lock = asyncio.Lock()  # post-copy: demand and background share channel 0
        self.error: BaseException | None = None

    async def read_loop(self) -> None:
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    raise MigrationFailed(f"target closed migration channel {self.id}")
                kind = frame.WhichOneof("frame")
                if kind == "credit":
                    self.credit += frame.credit.bytes
                    self.credit_changed.set()
                elif kind == "round_ack":
                    self.acks.put_nowait(frame.round_ack)
                elif kind == "page_request":
                    self.requests.put_nowait(frame.page_request.indices)
                else:
                    self.control.put_nowait(frame)
        except grpc.aio.AioRpcError as e:
            self.error = MigrationFailed(
                f"migration channel {self.id} to the target failed: {e.code().name}: {e.details()}"
            )
        except MigrationFailed as e:
            self.error = e
        finally:
            # Wake every waiter; they check self.error.
            self.credit_changed.set()
            self.acks.put_nowait(pb.RoundAck(round=2**32 - 1))
            self.control.put_nowait(pb.TargetFrame())
            self.requests.put_nowait(b"")

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    async def write(self, frame: pb.SourceFrame | bytes) -> None:
        """Send a frame (or one build_batch serialized already)."""
        self.check()
        data = frame if isinstance(frame, bytes) else frame.SerializeToString()
        try:
            async with self.write_lock:
                await self.call.write(data)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            self.check()
            raise MigrationFailed(f"migration channel {self.id}: write failed: {e}") from None

    async def wait_credit(self, needed: int) -> None:
        while self.credit < needed:
            self.check()
            self.credit_changed.clear()
            await self.credit_changed.wait()
        self.check()

    async def next_control(self, timeout: float) -> pb.TargetFrame:
        async with asyncio.timeout(timeout):
            frame = await self.control.get()
        self.check()
        return frame


class SourceMigration:
    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        vmi: Obj,
        handle: VMHandle,
        tls: pki.TlsFiles | None,
        *,
        on_progress: Callable[[Obj, Stats], None] | None = None,
    ) -> None:
        self.api = api
        self.node = node_name
        self.vmi = vmi
        self.handle = handle
        self.tls = tls
        self.ns = vmi["metadata"]["namespace"]
        self.name = vmi["metadata"]["name"]
        ms = vmi["status"]["migrationState"]
        self.uid: str = ms["migrationUid"]
        self.token: str = ms.get("token", "")
        self.target_address = f"{ms['targetNodeAddress']}:{ms['targetNodePort']}"
        self.target_node: str = ms["targetNode"]
        self.record = HandoffRecord(api, self.ns, self.name, self.uid)
        self.config: Obj = ms.get("migrationConfiguration") or {}
        self.abort_requested = asyncio.Event()
        self.stats = Stats(total_bytes=handle.spec.memory_bytes)
        self.paused = False
        self.switching = False
        self.committed = False
        self.postcopy_due = asyncio.Event()  # the completion timeout elapsed, post-copy allowed
        self.postcopy_active = False  # the guest runs on the target; pages still flow
        self._throttle = 0
        self._in_downtime = False  # the guest is paused and nowhere running: no pacing
        self.chunk_digest: ChunkDigest | None = None
        # zstd per batch, kept only where it pays; "None" in the configuration turns it off.
        self.compress = str(self.config.get("compression", "Zstd")) != "None"
        self.on_progress = on_progress
        self._connections: list[grpc.aio.Channel] = []  # one per stream
        self._channels: list[Channel] = []
        self._last_report = 0.0
        self._publisher: asyncio.Task[None] | None = None
        self._pending: stream.IndexArray = np.empty(0, dtype=np.int64)
        self.bandwidth_limit = parse_quantity(self.config.get("bandwidthPerMigration", 0) or 0)
        self._pace_next = 0.0  # time.monotonic() before which the paced stream may not send
        self._compressing = True  # the last batch sent compressed (see _send_batch)

    # -- entry point ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the migration to its end; the outcome is written into the VMI status."""
        try:
            if not await self._mark_started():
                return
            async with asyncio.TaskGroup() as tg:
                await self._connect(tg)
                tg.create_task(self._monitor())
                if await self._precopy():
                    await self._switchover()
                else:
                    await self._postcopy(tg)
                for ch in self._channels:
                    ch.call.cancel()
        except asyncio.CancelledError:
            raise  # handler shutdown: a restarted handler settles the migration
        except BaseException as e:
            leaf = first_leaf(e)
            if isinstance(leaf, asyncio.CancelledError):
                raise
            if isinstance(leaf, MigrationFailed):
                reason = str(leaf)
            elif isinstance(leaf, ApiError):
                reason = f"the API failed during migration: {leaf}"
            elif isinstance(leaf, grpc.aio.AioRpcError):
                reason = f"lost the target: {leaf.code().name}: {leaf.details()}"
            elif isinstance(leaf, TimeoutError):
                reason = "the target stopped answering (timeout)"
            else:
                log.exception("migration %s: internal error", self.uid, exc_info=leaf)
                reason = f"internal error in the source handler: {leaf!r}"
            await self._fail(reason, aborted=isinstance(leaf, Aborted))
        finally:
            if self.chunk_digest is not None:
                self.chunk_digest.release()
            await self._close_connections()

    # -- status writes ----------------------------------------------------------------------

    async def _mark_started(self) -> bool:
        """Record startTimestamp unless the migration was failed/canceled meanwhile."""
        started = await self.record.mark_started(
            {"mode": "PreCopy", "transfer": self.stats.as_status()}
        )
        if started:
            log.info(
                "migration %s: %s/%s starting to %s",
                self.uid,
                self.ns,
                self.name,
                self.target_address,
            )
        return started

    def _report(self, force: bool = False) -> None:
        """Local progress (metrics) now; the VMI status at most every PROGRESS_PERIOD s,
        and not while the switchover runs (paused, hand-off not recorded): every watcher of
        the VMI, both handlers included, would process that write during the downtime."""
        now = time.monotonic()
        if self.on_progress is not None:
            self.on_progress(self.vmi, self.stats)
        if self.paused and not self.committed:
            return
        if (force or now - self._last_report > PROGRESS_PERIOD) and (
            self._publisher is None or self._publisher.done()
        ):
            self._last_report = now
            self._publisher = asyncio.create_task(self._publish_progress())

    async def _publish_progress(self) -> None:
        with contextlib.suppress(ApiError):
            await self.record.patch({"transfer": self.stats.as_status()})

    # -- connection -------------------------------------------------------------------------

    async def _connect(self, tg: asyncio.TaskGroup, *, resume: bool = False) -> None:
        count = max(1, min(int(self.config.get("parallelStreams", 2)), stream.MAX_CHANNELS))
        await self._close_connections()
        self._channels = []
        # One TCP/TLS connection per stream (a local subchannel pool keeps gRPC from
        # sharing one connection): streams multiplexed on one HTTP/2 connection measured
        # well below separate connections here.
        options: list[tuple[str, int | str]] = [
            *CHANNEL_OPTIONS,
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.tls is not None:
            # The target proves it is the hand-off's target node: its certificate must
            # name the node (the address may be a relay or an advertised address).
            options.append(("grpc.ssl_target_name_override", self.target_node))
        for _ in range(count):
            if self.tls is None:
                conn = grpc.aio.insecure_channel(self.target_address, options=options)
            else:
                conn = grpc.aio.secure_channel(
                    self.target_address, pki.channel_credentials(self.tls), options=options
                )
            self._connections.append(conn)
        spec = self.handle.spec
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                for cid in range(count):
                    ch = Channel(cid, stream.open_transfer(self._connections[cid]))
                    self._channels.append(ch)
                    await ch.write(
                        pb.SourceFrame(
                            hello=pb.Hello(
                                protocol_version=stream.PROTOCOL_VERSION,
                                migration_uid=self.uid,
                                token=self.token,
                                channel_id=cid,
                                channel_count=count,
                                memory_bytes=spec.memory_bytes,
                                page_size=spec.page_size,
                                resume=resume,
                            )
                        )
                    )
                    first = await ch.call.read()
                    if first is grpc.aio.EOF or first.WhichOneof("frame") != "hello_ack":
                        raise MigrationFailed(f"target did not accept migration channel {cid}")
                    tg.create_task(ch.read_loop())
        except grpc.aio.AioRpcError as e:
            raise MigrationFailed(
                f"cannot open the migration stream to {self.target_address}: {e.code().name}: {e.details()}"
            ) from None
        except TimeoutError:
            raise MigrationFailed(
                f"the target {self.target_address} did not answer within {CONNECT_TIMEOUT:.0f}s"
            ) from None

    async def _close_connections(self) -> None:
        connections, self._connections = self._connections, []
        for conn in connections:
            await conn.close()

    # -- sending rounds ---------------------------------------------------------------------

    async def _send_round(
        self,
        indices: stream.IndexArray,
        round_no: int,
        final: bool,
        *,
        stop: asyncio.Event | None = None,
        sent_mask: npt.NDArray[np.bool_] | None = None,
        wait_acks: bool = True,
    ) -> tuple[int, float, stream.IndexArray]:
        """Send ``indices`` across the channels and wait until every channel's batches are
        in the target's RAM (``wait_acks=False``: only until they are written; the caller
        collects the acknowledgements with _round_acks). Returns (wire bytes, seconds,
        pages left unsent).

        ``stop`` (the switch to post-copy) ends the round at the next batch boundary:
        the pages not sent yet are returned. ``sent_mask`` (post-copy) skips pages already
        sent and marks the ones sent now."""
        pages = stream.page_view(self.handle.ram(), self.handle.spec.page_size)
        # Compression saves wire while the guest runs; in the stop-and-copy round the CPU
        # time it costs is downtime, and the link is rarely what limits that round.
        compress = self.compress and not self._in_downtime
        # The cap protects the network while the guest runs (pre-copy, post-copy); the
        # stop-and-copy round runs flat out, as QEMU's completion stage does.
        limit = 0 if self._in_downtime else self.bandwidth_limit
        parts = stream.split_by_channel(indices, len(self._channels))
        started = time.monotonic()
        sent = [0]
        unsent: list[stream.IndexArray] = []

        async def send_part(ch: Channel, part: stream.IndexArray) -> None:
            # A batch carries up to BATCH_PAGES non-zero pages; where memory is mostly zero
            # pages it covers a longer span (doubling up to MAX_SPAN), so zeros cost
            # neither copies nor per-batch round trips.
            offset, span = 0, stream.BATCH_PAGES
            while offset < len(part):
                if self.abort_requested.is_set() and not self.paused:
                    raise Aborted("migration canceled by the user")
                if stop is not None and stop.is_set():
                    unsent.append(part[offset:])
                    break
                chunk = part[offset : offset + span]
                if sent_mask is not None:  # post-copy: fixed spans, each page once
                    chunk = part[offset : offset + stream.BATCH_PAGES]
                    offset += len(chunk)
                    chunk = chunk[~sent_mask[chunk]]
                    sent_mask[chunk] = True
                    if chunk.size:
                        await self._send_batch(ch, pages, chunk, round_no, compress, limit, sent)
                    continue
                batch = await self._send_batch(ch, pages, chunk, round_no, compress, limit, sent)
                offset += batch.pages
                sparse = batch.nonzero < stream.BATCH_PAGES // 2
                span = min(2 * span, stream.MAX_SPAN) if sparse else stream.BATCH_PAGES
            await ch.write(pb.SourceFrame(round_end=pb.RoundEnd(round=round_no, final=final)))

        async with asyncio.TaskGroup() as tg:
            for ch, part in zip(self._channels, parts, strict=True):
                tg.create_task(send_part(ch, part))
        if wait_acks:
            await self._round_acks(round_no)
        left = np.concatenate(unsent) if unsent else np.empty(0, dtype=np.int64)
        return sent[0], time.monotonic() - started, left

    async def _round_acks(self, round_no: int) -> None:
        """Every channel acknowledged ``round_no``: its batches are in the target's RAM."""
        for ch in self._channels:
            ack = await ch.acks.get()
            ch.check()
            if ack.round != round_no:
                raise MigrationFailed(
                    f"channel {ch.id}: acknowledged round {ack.round}, expected {round_no}"
                )

    async def _send_batch(
        self,
        ch: Channel,
        pages: npt.NDArray[np.uint8],
        chunk: stream.IndexArray,
        round_no: int,
        compress: bool,
        limit: int,
        sent: list[int],
    ) -> stream.Batch:
        """Gather, flow-control, send and pace one batch (it may cover only a prefix of
        ``chunk``: Batch.pages); account for it in the stats. A small batch is gathered
        on the event loop unless the last batch compressed: zstd over up to 1 MiB would
        hold the loop for milliseconds (a sample that does not compress costs ~0.1 ms)."""
        page_size = pages.shape[1]
        if len(chunk) <= stream.INLINE_BATCH_PAGES and not (compress and self._compressing):
            batch = stream.build_batch(pages, chunk, round_no, compress=compress)
        else:
            batch = await asyncio.to_thread(
                stream.build_batch, pages, chunk, round_no, compress=compress
            )
        if compress and batch.nonzero:
            self._compressing = batch.payload_bytes < batch.nonzero * page_size
        await self._put_batch(ch, batch, page_size, limit, sent)
        return batch

    async def _put_batch(
        self, ch: Channel, batch: stream.Batch, page_size: int, limit: int, sent: list[int]
    ) -> None:
        """Flow-control, send and pace one gathered batch; account for it in the stats."""
        await ch.wait_credit(batch.payload_bytes)
        ch.credit -= batch.payload_bytes
        await ch.write(batch.frame)
        sent[0] += batch.wire_bytes
        self.stats.wire_bytes += batch.wire_bytes
        covered = batch.pages * page_size  # guest memory, zero pages included
        self.stats.processed_bytes += covered
        self.stats.remaining_bytes = max(0, self.stats.remaining_bytes - covered)
        now = time.monotonic()
        self.stats.first_byte_at = self.stats.first_byte_at or now
        self.stats.last_byte_at = now
        if limit > 0:  # bandwidthPerMigration paces the migration's whole stream
            self._pace_next = max(self._pace_next, now - PACING_BURST) + batch.wire_bytes / limit
            if self._pace_next > now:
                await asyncio.sleep(self._pace_next - now)
        self._report()

    async def _send_final(
        self, final: stream.IndexArray, round_no: int, rehash: stream.IndexArray
    ) -> str:
        """The stop-and-copy round, acknowledgements not awaited; returns the digest of
        RAM, made by a worker that hashes the ``rehash`` pages while the round travels
        (the memory is still). A small round -- what a converging guest dirtied during
        one short round, the usual case -- is gathered for every channel at once, then
        written: on the event loop up to INLINE_BATCH_PAGES a channel (the loop has
        nothing else to do while the guest is paused), else by one worker call (a worker
        per channel for a few hundred pages took longer handing the GIL and the two cores
        around than the gathering itself). A large one goes batch by batch like any
        round."""
        digest = self.chunk_digest
        assert digest is not None  # made by _precopy
        page_size = self.handle.spec.page_size
        pages = stream.page_view(self.handle.ram(), page_size)
        parts = stream.split_by_channel(final, len(self._channels))

        def gather() -> list[stream.Batch | None]:
            return [
                stream.build_batch(pages, p, round_no, compress=False) if p.size else None
                for p in parts
            ]

        async def put(ch: Channel, batch: stream.Batch | None) -> None:
            if batch is not None:
                await self._put_batch(ch, batch, page_size, 0, sent)
            await ch.write(pb.SourceFrame(round_end=pb.RoundEnd(round=round_no, final=True)))

        largest = max(len(p) for p in parts)
        if largest <= stream.INLINE_BATCH_PAGES:
            batches: list[stream.Batch | None] | None = gather()
        elif largest <= stream.BATCH_PAGES:
            batches = await asyncio.to_thread(gather)
        else:
            batches = None
        digest_made = asyncio.ensure_future(digest.hash_pages_and_digest_async(rehash))
        sent = [0]
        try:
            if batches is None:
                await self._send_round(final, round_no, final=True, wait_acks=False)
            else:
                async with asyncio.TaskGroup() as tg:
                    for ch, batch in zip(self._channels, batches, strict=True):
                        tg.create_task(put(ch, batch))
        finally:
            made = await digest_made
        return made

    async def _precopy(self) -> bool:
        """Pre-copy rounds. True: converged (switch over now); False: switch to post-copy
        (``self._pending`` then holds every page the target lacks)."""
        spec = self.handle.spec
        budget = float(self.config.get("downtimeBudgetMilliseconds", 300)) / 1000
        auto_converge = bool(self.config.get("allowAutoConverge", False))
        self.handle.clear_dirty()
        # Never-written pages (holes in the RAM file) are zeros: round 0 neither reads nor
        # sends them (the target's fresh RAM is zeros too). A write after this point is
        # in the dirty log, cleared just before.
        data = await asyncio.to_thread(self.handle.data_pages)  # an lseek per extent
        # Hash all of RAM once while round 0 travels; later rounds re-hash what got dirty.
        self.chunk_digest = ChunkDigest(
            self.handle.ram(), spec.page_size, zero_pages=None if data is None else ~data
        )
        self.chunk_digest.refresh_in_background()
        if data is None:
            indices = np.arange(spec.page_count, dtype=np.int64)
        else:
            indices = np.flatnonzero(data).astype(np.int64)
        untouched = (spec.page_count - len(indices)) * spec.page_size
        self.stats.processed_bytes += untouched
        self.stats.remaining_bytes = spec.memory_bytes - untouched
        try:
            for round_no in range(MAX_ROUNDS):
                _, seconds, unsent = await self._send_round(
                    indices, round_no, final=False, stop=self.postcopy_due
                )
                self.stats.rounds = round_no + 1
                sent_pages = len(indices) - len(unsent)
                if seconds >= MIN_ROUND_SECONDS or self.stats.transfer_rate == 0:
                    self.stats.transfer_rate = sent_pages * spec.page_size / max(seconds, 1e-3)
                indices = self.handle.harvest_dirty()
                self.chunk_digest.invalidate(indices)
                self.chunk_digest.refresh_in_background()
                if self.postcopy_due.is_set():
                    self._pending = np.union1d(indices, unsent)
                    return False
                remaining = len(indices) * spec.page_size
                # The guest's dirty rate, measured over this round.
                self.stats.dirty_rate = remaining / max(seconds, 1e-3)
                self.stats.remaining_bytes = remaining
                # A round's progress is written when it ends, but the short rounds that
                # lead to the switchover keep the usual pace (a write every ~20 ms loaded
                # the controller and both handlers just before the pause).
                self._report(force=seconds >= PROGRESS_PERIOD)
                log.info(
                    "migration %s: round %d sent %d pages in %.3fs (%.0f MiB/s); %d dirty "
                    "(%.1f MiB/s)%s",
                    self.uid,
                    round_no,
                    sent_pages,
                    seconds,
                    self.stats.transfer_rate / 2**20,
                    len(indices),
                    self.stats.dirty_rate / 2**20,
                    f"; throttle {self._throttle}%" if self._throttle else "",
                )
                if self.abort_requested.is_set():
                    raise Aborted("migration canceled by the user")
                if self._converged(remaining, sent_pages * spec.page_size, budget):
                    self._pending = indices
                    return True
                if (
                    auto_converge
                    and self.stats.dirty_rate > NOT_CONVERGING * self.stats.transfer_rate
                ):
                    await self._throttle_more()
            raise MigrationFailed(f"did not converge within {MAX_ROUNDS} rounds")
        except BaseException:
            await self._unthrottle()
            raise

    def _converged(self, remaining: int, sent: int, budget: float) -> bool:
        """Stop-and-copy now? When the remaining dirty memory fits the downtime budget at
        the measured rate -- unless the last round more than halved what is left, in
        which case one more round is cheap and cuts the pause (the budget is a ceiling,
        not a target), until the estimate is a tenth of the budget."""
        estimate = remaining / max(self.stats.transfer_rate, 1)
        if estimate > budget:
            return False
        shrinking = remaining < SHRINKING * sent
        return not shrinking or estimate <= budget * TIGHT_BUDGET

    async def _throttle_more(self) -> None:
        """Auto-converge: slow the guest's CPU down (20%, then +10% a round, up to 99%)."""
        if self._throttle == 0:
            self._throttle = AUTO_CONVERGE_INITIAL
        else:
            self._throttle = min(AUTO_CONVERGE_MAX, self._throttle + AUTO_CONVERGE_STEP)
        self.stats.throttle_percent = max(self.stats.throttle_percent, self._throttle)
        await self.handle.set_throttle(self._throttle)
        log.info("migration %s: auto-converge: guest throttled to %d%%", self.uid, self._throttle)

    async def _unthrottle(self) -> None:
        """The guest stays on the source: give it its CPU back."""
        if self._throttle:
            self._throttle = 0
            with contextlib.suppress(GuestError):
                await self.handle.set_throttle(0)

    async def _monitor(self) -> None:
        """KubeVirt's migration monitor: while pre-copy runs, every MONITOR_PERIOD s,
        abort when the remaining data has not gone below its lowest value for
        ``progressTimeout`` s, or when the migration has run longer than
        ``completionTimeoutPerGiB`` x guest memory in GiB. Ends when switchover starts."""
        per_gib = float(self.config.get("completionTimeoutPerGiB", 150))
        progress_timeout = float(self.config.get("progressTimeout", 150))
        gib = self.handle.spec.memory_bytes / GiB
        completion_timeout = per_gib * gib
        started = time.monotonic()
        watermark = float("inf")
        last_progress = started
        while not self.switching:
            now = time.monotonic()
            remaining = self.stats.remaining_bytes
            if remaining < watermark:
                watermark, last_progress = remaining, now
            if self.abort_requested.is_set():
                raise Aborted("migration canceled by the user")
            if now - last_progress > progress_timeout:
                raise MigrationFailed(
                    f"Live migration stuck for {now - last_progress:.0f} sec and has been aborted "
                    f"(progressTimeout {progress_timeout:.0f}): {remaining / 2**20:.1f} MiB remain, "
                    f"the guest dirties {self.stats.dirty_rate / 2**20:.1f} MiB/s and "
                    f"{self.stats.transfer_rate / 2**20:.1f} MiB/s are sent"
                )
            if now - started > completion_timeout and self.config.get("allowPostCopy"):
                log.info(
                    "migration %s: not completed after %.0f s: switching to post-copy",
                    self.uid,
                    now - started,
                )
                self.postcopy_due.set()
                return
            if now - started > completion_timeout:
                raise MigrationFailed(
                    f"Live migration is not completed after {now - started:.0f} sec and has been "
                    f"aborted (completionTimeoutPerGiB {per_gib:.0f} x {gib:.2f} GiB = "
                    f"{completion_timeout:.0f} sec)"
                )
            await asyncio.sleep(MONITOR_PERIOD)

    # -- switchover -------------------------------------------------------------------------

    async def _switchover(self) -> None:
        parts = self.stats.downtime_parts
        digest = self.chunk_digest
        assert digest is not None  # made by _precopy
        self.switching = True  # ends the monitor; from here only a failure ends switchover
        # The last round's dirty pages are hashed while the guest still runs: the refresh
        # started at its harvest would otherwise compete with the final pass (measured:
        # a 1-2 MiB refresh stretched a 2 MiB final pass from ~3 to 10-20 ms).
        await digest.refresh_async()
        t0 = time.monotonic()
        self.paused = True  # set before the call: a failure during pause still resumes
        await self.handle.pause()
        t1 = time.monotonic()
        parts["pause"] = t1 - t0
        # The pages written since the last harvest, hashed and the digest made while the
        # final pages travel (the memory is still; _send_final); the rest of the final
        # pages were hashed by the refresh above, after that harvest, and any write to
        # them since is in this one.
        written = self.handle.harvest_dirty()
        final = np.union1d(self._pending, written)
        digest.invalidate(written)
        ch0 = self._channels[0]

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
            self._in_downtime = True
            self.stats.digest = await self._send_final(final, self.stats.rounds, written)
            self._in_downtime = False
            self.stats.rounds += 1
            t2 = time.monotonic()
            parts["final_pass"] = t2 - t1
            await state_sent
        finally:
            if not state_sent.done():
                state_sent.cancel()
        await ch0.write(pb.SourceFrame(final_state=pb.FinalState(digest=self.stats.digest)))
        await self._round_acks(self.stats.rounds - 1)
        await self._verify_and_commit(ch0, t2, mode="PreCopy")
        await self._finish_success()

    # -- post-copy --------------------------------------------------------------------------

    async def _postcopy(self, tg: asyncio.TaskGroup) -> None:
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
        parts = self.stats.downtime_parts
        spec = self.handle.spec
        t0 = time.monotonic()
        self.switching = True
        self.paused = True
        await self.handle.pause()
        await self._unthrottle()
        t1 = time.monotonic()
        parts["pause"] = t1 - t0
        dirty = self.handle.harvest_dirty()
        assert self.chunk_digest is not None  # made by _precopy
        # Page 0 (the guest's CPU state) leaves the missing set and is sent now: its hash,
        # like every page written since the last harvest, must be made again.
        self.chunk_digest.invalidate(dirty)
        missing = np.union1d(self._pending, dirty)
        missing = missing[missing != 0]
        await self._send_round(np.zeros(1, dtype=np.int64), self.stats.rounds, final=False)
        self.stats.rounds += 1
        t2 = time.monotonic()
        parts["final_pass"] = t2 - t1
        device_state = await self.handle.device_state()
        self.stats.digest = await self.chunk_digest.masked_digest_async(missing, spec.page_size)
        ch0 = self._channels[0]
        await ch0.write(
            pb.SourceFrame(
                postcopy_start=pb.PostCopyStart(
                    device_state=device_state,
                    missing_indices=stream.pack_indices(missing),
                    present_digest=self.stats.digest,
                )
            )
        )
        await self._verify_and_commit(ch0, t2, mode="PostCopy")
        log.info(
            "migration %s: post-copy: the guest runs on %s; %d pages (%.1f MiB) to go",
            self.uid,
            self.target_node,
            len(missing),
            len(missing) * spec.page_size / 2**20,
        )
        self.stats.remaining_bytes = len(missing) * spec.page_size
        self._report(force=True)
        await self._postcopy_push(tg, missing)
        await self._finish_success()

    async def _postcopy_push(self, tg: asyncio.TaskGroup, missing: stream.IndexArray) -> None:
        """Send ``missing`` (faulted pages first) until the target has every page;
        reconnect after a broken stream and go on from the target's own missing list."""
        window = float(self.config.get("postCopyRecoveryWindowSeconds", 600))
        while True:
            try:
                await self._push_missing(missing)
                return
            except MigrationFailed as e:
                log.warning("migration %s: post-copy stream broken (%s): recovering", self.uid, e)
            self.stats.postcopy_interruptions += 1
            self._report(force=True)
            missing = await self._reconnect(tg, window)

    async def _push_missing(self, missing: stream.IndexArray) -> None:
        spec = self.handle.spec
        sent_mask = np.zeros(spec.page_count, dtype=np.bool_)
        round_no = self.stats.rounds
        ch0 = self._channels[0]
        pages = stream.page_view(self.handle.ram(), spec.page_size)
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
                    await self._send_batch(
                        ch0, pages, wanted[off : off + stream.BATCH_PAGES], round_no, False, 0, sent
                    )

        try:
            async with asyncio.TaskGroup() as tg:
                server = tg.create_task(serve_faults())
                # final=False: faulted pages may still follow on channel 0 until PostCopyEnd
                await self._send_round(missing, round_no, final=False, sent_mask=sent_mask)
                ch0.requests.put_nowait(STOP_SERVING)  # let it finish what it has started
                await server
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
        except stream.ProtocolError as e:
            raise MigrationFailed(f"bad page request from the target: {e}") from None
        self.stats.rounds += 1
        await ch0.write(pb.SourceFrame(postcopy_end=pb.PostCopyEnd()))
        while True:
            frame = await ch0.next_control(VERIFY_TIMEOUT)
            if frame.WhichOneof("frame") == "postcopy_done":
                break
            if frame.WhichOneof("frame") is None:
                ch0.check()
        self.stats.postcopy_stall_ms = frame.postcopy_done.stall_seconds * 1000
        self.stats.postcopy_faults = int(frame.postcopy_done.faults)
        self.stats.remaining_bytes = 0
        log.info(
            "migration %s: post-copy done: guest stalled %.1f ms over %d faults",
            self.uid,
            self.stats.postcopy_stall_ms,
            self.stats.postcopy_faults,
        )

    async def _reconnect(self, tg: asyncio.TaskGroup, window: float) -> stream.IndexArray:
        """Reach the target again within ``window`` s; returns its missing pages."""
        deadline = time.monotonic() + window
        delay = RECONNECT_DELAY
        last = ""
        while time.monotonic() < deadline:
            try:
                await self._connect(tg, resume=True)
                frame = await self._channels[0].next_control(CONNECT_TIMEOUT)
                if frame.WhichOneof("frame") != "postcopy_state":
                    raise MigrationFailed("the target did not report its missing pages")
                missing = stream.unpack_indices(
                    frame.postcopy_state.missing_indices, self.handle.page_count, "missing"
                )
                log.info(
                    "migration %s: post-copy resumed; %d pages still missing",
                    self.uid,
                    len(missing),
                )
                self.stats.remaining_bytes = len(missing) * self.handle.spec.page_size
                return missing
            except (MigrationFailed, TimeoutError, stream.ProtocolError) as e:
                last = (str(e).splitlines() or ["timeout"])[0][:200]
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
        raise MigrationFailed(
            f"post-copy: the target was unreachable for longer than the recovery window "
            f"({window:.0f}s, postCopyRecoveryWindowSeconds); last error: {last}. The VM's "
            "memory was split between the two nodes and it cannot continue"
        )

    async def _fail_postcopy(self, reason: str) -> None:
        """Post-copy cannot finish: the VM is lost (its memory is split); say so."""
        for ch in self._channels:
            ch.call.cancel()
        await self.handle.destroy()
        await self._patch_with_retry(
            {
                "failed": True,
                "failureReason": reason,
                "endTimestamp": conditions.now_rfc3339(),
                "transfer": self.stats.as_status(),
            },
            extra_status={"phase": "Failed", "reason": "PostCopyFailed"},
        )

    async def _verify_and_commit(self, ch0: Channel, t2: float, mode: str) -> None:
        """Steps shared by both switchovers, once the state is on its way (``t2``): the
        target's Verified, the arbiter record, Commit, and the target's Resumed."""
        parts = self.stats.downtime_parts
        t3 = time.monotonic()
        parts["state_transfer"] = t3 - t2
        frame = await ch0.next_control(VERIFY_TIMEOUT)
        if frame.WhichOneof("frame") != "verified":
            raise MigrationFailed(
                f"expected Verified from the target, got {frame.WhichOneof('frame')}"
            )
        t4 = time.monotonic()
        parts["verify"] = t4 - t3
        self.stats.target_digest = frame.verified.digest
        if not frame.verified.match:
            what = "at switchover" if mode == "PreCopy" else "of the pages already on the target"
            raise MigrationFailed(
                f"memory digest mismatch {what}: source {self.stats.digest[:16]}…, "
                f"target {frame.verified.digest[:16]}…"
            )
        self.stats.digest_verified = True
        await self.record.commit(mode)
        self.committed = True
        self.postcopy_active = mode == "PostCopy"
        await ch0.write(pb.SourceFrame(commit=pb.Commit()))
        # The target resumes on Commit or on the arbiter record, whichever comes first: a
        # lost Resumed changes nothing (and in post-copy, recovery handles a break).
        with contextlib.suppress(TimeoutError, MigrationFailed):
            frame = await ch0.next_control(RESUMED_TIMEOUT)
            if frame.WhichOneof("frame") == "resumed":
                parts["resume"] = time.monotonic() - t4

    async def _finish_success(self) -> None:
        """Record completion, then destroy the paused source guest (it never runs again:
        the arbiter says the target owns the VM), so Succeeded does not wait on teardown."""
        self.stats.remaining_bytes = 0
        fields: Obj = {
            "completed": True,
            "endTimestamp": conditions.now_rfc3339(),
            "transfer": self.stats.as_status(),
        }
        await self._patch_with_retry(fields)
        if self.chunk_digest is not None:
            self.chunk_digest.release()
        await self.handle.destroy()
        log.info(
            "migration %s: succeeded: %d rounds, %.1f MiB on the wire, downtime %s",
            self.uid,
            self.stats.rounds,
            self.stats.wire_bytes / 2**20,
            {k: round(v * 1000, 1) for k, v in self.stats.downtime_parts.items()},
        )

    async def _patch_with_retry(self, fields: Obj, extra_status: Obj | None = None) -> None:
        """Status that must land (completion/failure), after any progress write in flight
        (an older progress write must never land after it)."""
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher
        await self.record.patch_until_written(fields, extra_status)

    # -- failure ----------------------------------------------------------------------------

    async def _fail(self, reason: str, aborted: bool = False) -> None:
        log.warning("migration %s: failed: %s", self.uid, reason)
        if self.postcopy_active:
            await self._fail_postcopy(reason)
            return
        for ch in self._channels:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    ch.call.write(
                        pb.SourceFrame(abort=pb.Abort(reason=reason)).SerializeToString()
                    ),
                    1,
                )
            ch.call.cancel()
        if self.paused and not self.committed:
            if await self._claim_abort():
                await self._resume_here()
                self.paused = False
            else:
                # The arbiter says Committed: the target owns the VM now.
                await self.handle.destroy()
                await self._patch_with_retry(
                    {
                        "completed": True,
                        "endTimestamp": conditions.now_rfc3339(),
                        "transfer": self.stats.as_status(),
                    }
                )
                return
        elif self.committed:
            return
        fields: Obj = {
            "failed": True,
            "failureReason": reason,
            "endTimestamp": conditions.now_rfc3339(),
            "transfer": self.stats.as_status(),
        }
        if aborted or self.abort_requested.is_set():
            fields["abortStatus"] = "Succeeded"
        await self._patch_with_retry(fields)

    async def _resume_here(self) -> None:
        """Resume the source guest after a failed switchover (it may not have paused yet)."""
        try:
            await self.handle.resume()
            log.info("migration %s: guest resumed on the source", self.uid)
        except GuestError as e:
            status = await self.handle.status()
            if status.state != "running":
                raise MigrationFailed(f"cannot resume the guest on the source: {e}") from e

    async def _claim_abort(self) -> bool:
        """Write switchover=Aborted unless Committed is already recorded; True if aborted."""
        return await self.record.claim("Aborted") == "Aborted"
