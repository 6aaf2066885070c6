"""The verified switchover of a QEMU migration, on the source (its engine's channels,
QEMU and record; the sequence is in the header of ``proto/vmferry/rpc/tunnel.proto``).

QEMU ``completed``: the source guest is paused (``postmigrate``). Both handlers compute
per-page digests of their RAM file in parallel (handler/qemu_verify.py) -- the source's
from the moment QEMU stopped the guest (``pause-before-switchover``: ``start_digest``),
the target's once its QEMU completed -- the target sends its digests, the source
compares; ``repair`` re-sends the differing pages, ``detect`` fails the migration,
``off`` skips the comparison. The target confirms with Verified. Then the arbiter
(``switchover: Committed``); only then Commit: the target resumes (``cont``), the source
QEMU is destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from handler import qemu_verify
from handler.migration import tunnel
from handler.migration.handoff import MigrationFailed
from handler.migration.qemu_channel import TunnelChannel
from vmferry.rpc import tunnel_pb2 as pb

if TYPE_CHECKING:
    from handler.migration.qemu_source import QemuSourceMigration

log = logging.getLogger(__name__)

COMPLETE_TIMEOUT = 60.0  # s for the target QEMU to finish loading after the source completed
VERIFY_TIMEOUT = 120.0
RESUMED_TIMEOUT = 30.0
VERIFY_OFF = "off"
VERIFY_DETECT = "detect"


class QemuSwitchover:
    """The source side of one QEMU migration's switchover."""

    def __init__(self, engine: QemuSourceMigration) -> None:
        self.engine = engine
        self.repaired_pages = 0
        # The source's page digests, started when QEMU stopped the guest (pre-switchover)
        self.source_digest: asyncio.Future[qemu_verify.PageDigests] | None = None

    def digests_at_stop(self) -> bool:
        """Hash the source's RAM from the moment QEMU stops the guest, while its last
        pass runs (not in post-copy: there the pause before switching is post-copy's)."""
        e = self.engine
        return e.verify != VERIFY_OFF and not e.plan.postcopy

    def start_digest(self) -> None:
        """QEMU stopped the guest before its last pass: its RAM here no longer changes."""
        if self.digests_at_stop() and self.source_digest is None:
            self.source_digest = asyncio.ensure_future(self._timed_digest())

    def cancel_digest(self) -> None:
        if self.source_digest is not None and not self.source_digest.done():
            self.source_digest.cancel()

    async def run(self) -> None:
        """QEMU completed: drain, verify (and repair), the arbiter's decision, Commit,
        the target's Resumed; the source QEMU destroyed, the success recorded."""
        e = self.engine
        parts = e.stats.downtime_parts
        t0 = e.clock()
        ch0 = e._channels[0]
        digest_task = self.source_digest  # started when QEMU stopped the guest
        if digest_task is None and e.verify != VERIFY_OFF:  # else: now
            digest_task = asyncio.ensure_future(self._timed_digest())
        try:
            for ch in e._channels:  # every byte QEMU wrote is on its way
                async with asyncio.timeout(COMPLETE_TIMEOUT):
                    await ch.upstream_done.wait()
            await ch0.write(
                pb.TunnelSourceFrame(
                    completed=pb.Completed(
                        qemu_downtime_ms=int(parts.get("qemu_stop_copy", 0) * 1000),
                        last_console_unix_ns=e.qemu.console_mtime_ns(),
                    )
                )
            )
            t1 = e.clock()
            parts["drain"] = t1 - t0
            repair_started = None
            if digest_task is not None:
                repair_started = await self._verify(ch0, digest_task)
            frame = await ch0.next_control(VERIFY_TIMEOUT, "Verified")
            if frame.WhichOneof("frame") != "verified":
                raise MigrationFailed(f"expected Verified, got {frame.WhichOneof('frame')}")
            parts["verify"] = e.clock() - t1
            if repair_started is not None:  # the target's Verified confirms the repair
                e.stats.switchover_steps["repair"] = e.clock() - repair_started
            if not frame.verified.match:
                raise MigrationFailed(
                    f"the target's memory is not verified: {frame.verified.detail}"
                )
            e.stats.digest_verified = e.verify != VERIFY_OFF
        finally:
            if digest_task is not None and not digest_task.done():
                digest_task.cancel()
        t2 = e.clock()
        await e._commit()
        await ch0.write(pb.TunnelSourceFrame(commit=pb.Commit()))
        with contextlib.suppress(MigrationFailed):
            frame = await ch0.next_control(RESUMED_TIMEOUT, "Resumed")
            if frame.WhichOneof("frame") == "resumed":
                parts["resume"] = e.clock() - t2
                if frame.resumed.guest_gap_ms > 0:
                    e.stats.guest_downtime_ms = frame.resumed.guest_gap_ms
        await e.finish_success(f", {self.repaired_pages} page(s) repaired")

    async def _timed_digest(self) -> qemu_verify.PageDigests:
        e = self.engine
        t0 = e.clock()
        # The mapping is taken in the worker thread too: never on the event loop
        digests = await asyncio.to_thread(lambda: qemu_verify.page_digests(e.qemu.ram()))
        e.stats.switchover_steps["source_digest"] = e.clock() - t0
        return digests

    async def _verify(
        self, ch0: TunnelChannel, digest_task: asyncio.Future[qemu_verify.PageDigests]
    ) -> float:
        """Receive the target's digests, compare, send the repair; returns the clock at
        which the repair began (the target's Verified ends it)."""
        e = self.engine
        steps = e.stats.switchover_steps
        t0 = e.clock()  # Completed was sent: the target waits for its QEMU, then hashes
        pages = e.qemu.qspec.memory_bytes // tunnel.PAGE_SIZE
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
        steps["target_digest"] = e.clock() - t0
        disk_ends = await e.storage.verify(ch0, e.verify) if e.storage else []
        try:
            target = qemu_verify.digests_from_bytes(b"".join(chunks), pages)
        except ValueError as error:
            raise MigrationFailed(f"bad page digests from the target: {error}") from None
        source = await digest_task
        t1 = e.clock()
        comparison = qemu_verify.compare(source, target)
        t2 = e.clock()
        steps["compare"] = t2 - t1
        e.stats.digest = f"{pages} page digests"
        e.stats.target_digest = "match" if comparison.match else comparison.describe()
        if comparison.match:
            log.info("migration %s: verified: all %d pages match", e.uid, pages)
        else:
            log.warning(
                "migration %s: memory mismatch at switchover: %s", e.uid, comparison.describe()
            )
        if not comparison.match and e.verify == VERIFY_DETECT:
            raise MigrationFailed(
                f"memory mismatch at switchover (verify: detect): {comparison.describe()} "
                "between the paused source and the target; the guest resumes on the source"
            )
        diff = comparison.differing
        ram = e.qemu.ram()
        for start in range(0, diff.size, tunnel.REPAIR_FRAME_PAGES):
            idx = diff[start : start + tunnel.REPAIR_FRAME_PAGES]
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
                    disks=disk_ends,
                )
            )
        )
        self.repaired_pages = int(diff.size)
        return t2
