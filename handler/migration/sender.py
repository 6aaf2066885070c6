"""Moving pages: rounds across the channels, batches, flow control, pacing, and the
dirty log measured while a round runs.

Ownership: a ``RoundSender`` belongs to one memvm source migration and runs on its event
loop. It reads guest RAM through the handle's mapping (``stream.page_view``) and writes
only to the channels; every batch sent is accounted in the migration's ``Stats``
(``Stats.record_batch``: the live transfer rate). ``DirtyMeter`` is the only harvester
of the guest's dirty log while the migration runs.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.ma  # np.unique imports it on first use (~15 ms here): not in a downtime
import numpy.typing as npt

from handler import stream
from handler.digest import ChunkDigest
from handler.drivers.base import DirtyLogHandle, GuestSpec
from handler.migration import worker_link
from handler.migration.channels import Channel
from handler.migration.compress_gate import CompressGate, Decision
from handler.migration.handoff import MigrationFailed
from handler.migration.stats import Stats
from handler.migration.worker_pool import RemoteChannel
from vmferry.rpc import migration_pb2 as pb

PACING_BURST = 0.05  # s of bandwidthPerMigration a paced stream may send ahead after a pause
MIN_DIRTY_SAMPLE_SECONDS = 0.1  # a dirty rate over less time than this is noise

Clock = Callable[[], float]


class DirtyMeter:
    """The guest's dirty log, harvested as often as wanted without losing a page: what
    ``sample()`` harvests accumulates until ``take()`` returns it (with what is dirty by
    then). Sampling during a round makes the dirty rate live -- distinct pages dirtied
    since the round began, per second -- where a harvest only at the round's end left it 0
    for the whole of round 0. ``on_harvest`` sees every harvest (the digest's invalidate:
    harvested pages will be sent again, and re-hashed)."""

    def __init__(
        self, handle: DirtyLogHandle, clock: Clock, on_harvest: Callable[[stream.IndexArray], None]
    ) -> None:
        self.handle = handle
        self.clock = clock
        self.on_harvest = on_harvest
        self.page_size = handle.spec.page_size
        self._dirty = np.zeros(handle.spec.page_count, dtype=np.bool_)
        self._count = 0
        self.since = clock()

    def restart(self) -> None:
        """Measure from now (the pages accumulated so far stay)."""
        self.since = self.clock()
        self._count = int(np.count_nonzero(self._dirty))

    def sample(self) -> float | None:
        """Harvest now; the dirty rate since restart()/take(), or None when that is too
        short a time to say."""
        indices = self.handle.harvest_dirty()
        if indices.size:
            self.on_harvest(indices)
            fresh = indices[~self._dirty[indices]]
            self._dirty[fresh] = True
            self._count += len(fresh)
        elapsed = self.clock() - self.since
        if elapsed < MIN_DIRTY_SAMPLE_SECONDS:
            return None
        return self._count * self.page_size / elapsed

    def take(self) -> stream.IndexArray:
        """Every page dirtied since the last take() (ascending); starts a new measure."""
        self.sample()
        indices = np.flatnonzero(self._dirty).astype(np.int64)
        self._dirty[indices] = False
        self._count = 0
        self.since = self.clock()
        return indices


class GuestMemory(Protocol):
    """What the sender reads: the guest's RAM and its geometry (a driver's handle, or a
    stream worker's own mapping)."""

    @property
    def spec(self) -> GuestSpec: ...

    def ram(self) -> memoryview: ...


@dataclass(frozen=True)
class RoundResult:
    wire_bytes: int
    seconds: float
    unsent: stream.IndexArray  # pages a stopped round did not send


class RoundSender:
    """Sends rounds of pages across ``channels`` (replaced on a reconnect, pre-copy or post-copy).

    ``in_downtime``: the guest is paused and runs nowhere: no compression (its CPU time
    is downtime, and the link rarely limits that round), no hashing into the digest
    (the switchover hashes what it sends in a worker of its own, send_final) and no pacing (the stop-and-copy
    round runs flat out, as QEMU's completion stage does). ``check_abort`` raises when a
    cancel must end the round; ``report`` runs after every batch."""

    def __init__(
        self,
        handle: GuestMemory,
        stats: Stats,
        *,
        compress: bool,
        bandwidth: int,
        clock: Clock,
        check_abort: Callable[[], None],
        report: Callable[[], None],
    ) -> None:
        self.handle = handle
        self.stats = stats
        self.compress = compress
        self.bandwidth = bandwidth
        self.clock = clock
        self.check_abort = check_abort
        self.report = report
        # Channel 0 is always local (the protocol's control frames travel there); the
        # others may run in stream workers (RemoteChannel, worker_pool.py).
        self.channels: list[Channel | RemoteChannel] = []
        self.in_downtime = False
        self._pace_next = 0.0  # clock() before which the paced stream may not send
        self.gate = CompressGate(enabled=compress, cap=bandwidth)
        # The source's pre-copy digest: pre-copy batches hash their pages into it as they
        # are gathered (stream.build_batch), so no refresh reads them again.
        self.digest: ChunkDigest | None = None

    def pages(self) -> npt.NDArray[np.uint8]:
        return stream.page_view(self.handle.ram(), self.handle.spec.page_size)

    async def send_round(
        self,
        indices: stream.IndexArray,
        round_no: int,
        final: bool,
        *,
        stop: asyncio.Event | None = None,
        sent_mask: npt.NDArray[np.bool_] | None = None,
        wait_acks: bool = True,
    ) -> RoundResult:
        """Send ``indices`` across the channels and wait until every channel's batches
        are in the target's RAM (``wait_acks=False``: only until they are written; the
        caller collects the acknowledgements with round_acks).

        ``stop`` (the switch to post-copy) ends the round at the next batch boundary:
        the pages not sent yet are returned. ``sent_mask`` (post-copy) skips pages
        already sent and marks the ones sent now."""
        pages = self.pages()
        compress = self.compress and not self.in_downtime
        limit = 0 if self.in_downtime else self.bandwidth
        digest = None if self.in_downtime else self.digest
        parts = stream.split_by_channel(indices, len(self.channels))
        if limit > 0 and self.in_workers:
            limit = max(1, limit // len(self.channels))  # each paces its share
        started = self.clock()
        sent = [0]
        unsent: list[stream.IndexArray] = []

        async def send_remote(ch: RemoteChannel, part: stream.IndexArray) -> None:
            request = worker_link.SendPart(
                round_no,
                part.astype(np.int64).tobytes(),
                final,
                compress,
                limit,
                digest is not None,
            )
            wire, left = await ch.send_part(request, stop)
            sent[0] += wire
            if left.size:
                unsent.append(left)

        async def send_part(ch: Channel, part: stream.IndexArray) -> None:
            # A batch carries up to BATCH_PAGES non-zero pages; where memory is mostly
            # zero pages it covers a longer span (doubling up to MAX_SPAN), so zeros cost
            # neither copies nor per-batch round trips.
            offset, span = 0, stream.BATCH_PAGES
            while offset < len(part):
                self.check_abort()
                if stop is not None and stop.is_set():
                    unsent.append(part[offset:])
                    break
                if sent_mask is not None:  # post-copy: fixed spans, each page once
                    chunk = part[offset : offset + stream.BATCH_PAGES]
                    offset += len(chunk)
                    chunk = chunk[~sent_mask[chunk]]
                    sent_mask[chunk] = True
                    if chunk.size:
                        await self.send_batch(ch, pages, chunk, round_no, compress, limit, sent)
                    continue
                chunk = part[offset : offset + span]
                batch = await self.send_batch(
                    ch, pages, chunk, round_no, compress, limit, sent, digest
                )
                offset += batch.pages
                sparse = batch.nonzero < stream.BATCH_PAGES // 2
                span = min(2 * span, stream.MAX_SPAN) if sparse else stream.BATCH_PAGES
            await ch.write(pb.SourceFrame(round_end=pb.RoundEnd(round=round_no, final=final)))

        async with asyncio.TaskGroup() as tg:
            for ch, part in zip(self.channels, parts, strict=True):
                if isinstance(ch, RemoteChannel):
                    tg.create_task(send_remote(ch, part))
                else:
                    tg.create_task(send_part(ch, part))
        if wait_acks:
            await self.round_acks(round_no)
        left = np.concatenate(unsent) if unsent else np.empty(0, dtype=np.int64)
        return RoundResult(sent[0], self.clock() - started, left)

    @property
    def in_workers(self) -> bool:
        """Some of the channels run in stream workers (each sends and paces its part)."""
        return any(isinstance(ch, RemoteChannel) for ch in self.channels)

    def keep_local(self) -> None:
        """From now on pages move on this process's channels only, and the stream
        workers are released: post-copy (a worker does not know which pages the guest
        has written on the target since it resumed there)."""
        for ch in self.channels:
            if isinstance(ch, RemoteChannel):
                ch.close()
        self.channels = [ch for ch in self.channels if isinstance(ch, Channel)]

    async def round_acks(self, round_no: int) -> None:
        """Every channel acknowledged ``round_no``: its batches are in the target's RAM."""
        for ch in self.channels:
            ack = await ch.acks.get()
            ch.check()
            if ack.round != round_no:
                raise MigrationFailed(
                    f"channel {ch.id}: acknowledged round {ack.round}, expected {round_no}"
                )

    async def send_batch(
        self,
        ch: Channel,
        pages: npt.NDArray[np.uint8],
        chunk: stream.IndexArray,
        round_no: int,
        compress: bool,
        limit: int,
        sent: list[int],
        digest: ChunkDigest | None = None,
    ) -> stream.Batch:
        """Gather, flow-control, send and pace one batch (it may cover only a prefix of
        ``chunk``: Batch.pages), hashing its pages into ``digest`` when given. Whether
        it is compressed is the gate's break-even decision (compress_gate.py). A small
        batch is gathered on the event loop unless it is to be compressed: zstd over up
        to 1 MiB would hold the loop for milliseconds (a probe costs ~0.1 ms)."""
        page_size = pages.shape[1]
        decision = self.gate.decide() if compress else Decision(False, False)
        build = functools.partial(
            stream.build_batch,
            pages,
            chunk,
            round_no,
            compress=decision.compress,
            probe=decision.probe,
            digest=digest,
        )
        if len(chunk) <= stream.INLINE_BATCH_PAGES and not decision.compress:
            batch = build()
        else:
            batch = await asyncio.to_thread(build)
        if batch.probe is not None:
            self.gate.observe_probe(batch.probe)
        await self.put_batch(ch, batch, page_size, limit, sent)
        return batch

    async def put_batch(
        self, ch: Channel, batch: stream.Batch, page_size: int, limit: int, sent: list[int]
    ) -> None:
        """Flow-control, send and pace one gathered batch; account for it in the stats."""
        before = self.clock()
        await ch.wait_credit(batch.payload_bytes)
        waited = self.clock() - before
        ch.credit -= batch.payload_bytes
        await ch.write(batch.frame)
        sent[0] += batch.wire_bytes
        now = self.clock()
        self.gate.observe_send(now, batch.wire_bytes, waited, batch.compressed)
        # guest memory covered, zero pages included
        self.stats.record_batch(now, batch.wire_bytes, batch.pages * page_size)
        if limit > 0:  # bandwidthPerMigration paces the migration's whole stream
            self._pace_next = max(self._pace_next, now - PACING_BURST) + batch.wire_bytes / limit
            if self._pace_next > now:
                await asyncio.sleep(self._pace_next - now)
        self.report()

    async def send_final(
        self,
        final: stream.IndexArray,
        round_no: int,
        rehash: stream.IndexArray,
        digest: ChunkDigest,
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
        page_size = self.handle.spec.page_size
        pages = self.pages()
        parts = stream.split_by_channel(final, len(self.channels))

        def gather() -> list[stream.Batch | None]:
            return [
                stream.build_batch(pages, p, round_no, compress=False) if p.size else None
                for p in parts
            ]

        async def put(ch: Channel | RemoteChannel, batch: stream.Batch | None) -> None:
            assert isinstance(ch, Channel)  # remote channels send their own (below)
            if batch is not None:
                await self.put_batch(ch, batch, page_size, 0, sent)
            await ch.write(pb.SourceFrame(round_end=pb.RoundEnd(round=round_no, final=True)))

        largest = max(len(p) for p in parts)
        batches: list[stream.Batch | None] | None
        if self.in_workers:
            batches = None  # each worker gathers its channel's part
        elif largest <= stream.INLINE_BATCH_PAGES:
            batches = gather()
        elif largest <= stream.BATCH_PAGES:
            batches = await asyncio.to_thread(gather)
        else:
            batches = None
        digest_made = asyncio.ensure_future(digest.hash_pages_and_digest_async(rehash))
        sent = [0]
        try:
            if batches is None:
                await self.send_round(final, round_no, final=True, wait_acks=False)
            else:
                async with asyncio.TaskGroup() as tg:
                    for ch, batch in zip(self.channels, batches, strict=True):
                        tg.create_task(put(ch, batch))
        finally:
            made = await digest_made
        return made
