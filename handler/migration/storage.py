"""Storage live migration of QEMU guests (KubeVirt's volume migration), both ends.

A VMI whose volume now names another claim than the image its running QEMU has open
(``spec.volumes`` edited to a destination claim, ``status.migratedVolumes``; see
``controller/volume_migration.py``) migrates with its disk mirrored to the new image:

- Target: the incoming QEMU opens the destination images (created on this node for a
  local claim, ``handler.volumes``) and serves each non-shared one on an NBD server
  (``nbd-server-start`` + a writable ``block-export-add``; exporting activates the image)
  on a unix socket of its own (:func:`export_disks`). Tunnel streams whose Open has
  ``nbd`` set are connected to that socket (``qemu_target``).
- Source: an NBD client block node per mirrored disk on the source QEMU
  (``blockdev-add driver=nbd`` to a unix socket of the source handler; each connection
  becomes one Tunnel stream through the handlers' mTLS channel, admitted by the same
  token and peer checks as the memory stream), then ``blockdev-mirror sync=full``
  (:class:`DiskMirrors`). The memory migration starts once every mirror is ``ready``,
  with ``pause-before-switchover``: at QEMU's ``pre-switchover`` point the guest is
  paused, ``block-job-cancel`` of a ready mirror completes it with the destination a
  consistent copy, the NBD nodes are removed, then ``migrate-continue``.
- Verified switchover: after the RAM's page digests the target sends each mirrored
  disk's 4 KiB block digests (:func:`image_digests`, the same hash as RAM pages); the
  source compares them with its own image's and, by the ``verify`` setting, re-sends
  the differing blocks (``repair``) or fails the migration (``detect``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handler import qemu_verify
from handler.drivers.base import GuestError
from handler.drivers.qemu_handle import DiskSpec, QemuHandle
from handler.migration.handoff import MigrationFailed
from vmferry.volumes import Claim, claim_volumes

log = logging.getLogger(__name__)
Obj = dict[str, Any]

BLOCK_SIZE = qemu_verify.PAGE_SIZE  # a disk is compared in 4 KiB blocks
POLL_PERIOD = 0.2  # s between query-jobs polls
JOB_READY = "ready"
JOB_CONCLUDED = "concluded"
JOB_ENDED = ("concluded", "null", "aborting")


@dataclass(frozen=True)
class MirroredDisk:
    """One disk of the running source QEMU mirrored to a new image on the target."""

    index: int  # position in the QemuSpec's disks: its block node is vd<index>
    name: str  # the volume name: the NBD export's name on the target
    source_path: str
    target_claim: str

    @property
    def node(self) -> str:
        return f"vd{self.index}"

    @property
    def nbd_node(self) -> str:
        return f"nbd{self.index}"

    @property
    def job_id(self) -> str:
        return f"mirror{self.index}"


def mirrored_disks(
    running: tuple[DiskSpec, ...], vmi_spec: Mapping[str, Any], claims: Mapping[str, Obj]
) -> list[MirroredDisk]:
    """The running guest's disks whose volume's claim (the VMI's spec now) is another
    image: those a migration mirrors. MigrationFailed when a destination claim is not
    bound yet or a volume disappeared from the spec."""
    refs = {r.name: r for r in claim_volumes(vmi_spec)}
    out = []
    for index, disk in enumerate(running):
        ref = refs.get(disk.name)
        if ref is None:
            raise MigrationFailed(
                f'volume "{disk.name}" is attached to the guest but no longer in the VMI\'s '
                "spec.volumes: a volume cannot be removed by a migration"
            )
        obj = claims.get(ref.claim)
        claim = Claim.of(obj) if obj is not None else None
        if claim is None or not claim.image_path:
            raise MigrationFailed(
                f'volume "{disk.name}": the destination PersistentVolumeClaim "{ref.claim}" '
                "is missing or not bound"
            )
        if claim.image_path != disk.path:
            out.append(MirroredDisk(index, disk.name, disk.path, ref.claim))
    return out


def exported_disks(disks: tuple[DiskSpec, ...]) -> list[tuple[int, DiskSpec]]:
    """The disks an incoming QEMU serves over NBD: every non-shared one (a migration
    target can only open a non-shared claim that is local to it, that is a new image
    the source mirrors to; a shared image stays where it is)."""
    return [(i, d) for i, d in enumerate(disks) if not d.shared]


async def export_disks(handle: QemuHandle, socket: Path) -> int:
    """Serve the incoming QEMU's non-shared disks on an NBD server at ``socket``
    (writable exports named after the volumes). Returns how many were exported."""
    disks = exported_disks(handle.qspec.disks)
    if not disks:
        return 0
    fresh_socket(socket)
    addr = {"type": "unix", "data": {"path": str(socket)}}  # SocketAddressLegacy
    await handle.qmp("nbd-server-start", {"addr": addr})
    for index, disk in disks:
        await handle.qmp(
            "block-export-add",
            {
                "type": "nbd",
                "id": f"export{index}",
                "node-name": f"vd{index}",
                "name": disk.name,
                "writable": True,
            },
        )
    log.info("qemu %s: %d disk(s) exported for a storage migration", handle.vm_id, len(disks))
    return len(disks)


async def unexport_disks(handle: QemuHandle, socket: Path) -> None:
    """Stop serving the disks (before the target resumes: nothing else may write)."""
    for index, _ in exported_disks(handle.qspec.disks):
        with contextlib.suppress(GuestError):
            await handle.qmp("block-export-del", {"id": f"export{index}", "mode": "hard"})
    with contextlib.suppress(GuestError):
        await handle.qmp("nbd-server-stop")
    remove_socket(socket)


def fresh_socket(path: Path) -> None:
    """A unix socket path to listen on: its directory exists, no stale socket."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)


def remove_socket(path: Path) -> None:
    path.unlink(missing_ok=True)


# -- the source's mirror jobs ----------------------------------------------------------


@dataclass
class MirrorProgress:
    done: int = 0
    total: int = 0


class DiskMirrors:
    """The source QEMU's mirror jobs of one migration (each to an NBD node on ``socket``,
    the source handler's listener that tunnels the connection to the target)."""

    def __init__(self, handle: QemuHandle, disks: list[MirroredDisk], socket: Path) -> None:
        self.handle = handle
        self.disks = disks
        self.socket = socket
        self.progress = MirrorProgress()
        self._started: list[MirroredDisk] = []

    async def start(self) -> None:
        """An NBD client node per disk (connects now, through the tunnel), then its mirror."""
        h = self.handle
        for d in self.disks:
            await h.qmp(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": d.nbd_node,
                    "server": {"type": "unix", "path": str(self.socket)},
                    "export": d.name,
                },
            )
            await h.qmp(
                "blockdev-mirror",
                {
                    "job-id": d.job_id,
                    "device": d.node,
                    "target": d.nbd_node,
                    "sync": "full",
                    "auto-dismiss": False,  # a concluded job says whether it failed
                },
            )
            self._started.append(d)
        log.info("qemu %s: mirroring %d disk(s)", h.vm_id, len(self.disks))

    async def _jobs(self) -> dict[str, Obj]:
        return {j["id"]: j for j in await self.handle.qmp("query-jobs")}

    def _check(self, jobs: dict[str, Obj]) -> None:
        done = total = 0
        for d in self._started:
            job = jobs.get(d.job_id)
            if job is None:
                raise MigrationFailed(f'the mirror of volume "{d.name}" disappeared')
            if job.get("error"):
                raise MigrationFailed(f'the mirror of volume "{d.name}" failed: {job["error"]}')
            done += int(job.get("current-progress", 0))
            total += int(job.get("total-progress", 0))
        self.progress = MirrorProgress(done, total)

    async def ready(self) -> bool:
        """Every mirror caught up (``ready``: it now copies each new write as it comes);
        MigrationFailed when one failed."""
        jobs = await self._jobs()
        self._check(jobs)
        statuses = {jobs[d.job_id].get("status") for d in self._started}
        if statuses & set(JOB_ENDED):
            raise MigrationFailed(f"a disk mirror ended before it was ready ({statuses})")
        return statuses == {JOB_READY}

    async def complete(self, timeout: float) -> None:
        """At the pre-switchover pause: cancel the ready mirrors (the destinations are a
        consistent copy of the paused guest's disks), wait until they concluded, remove
        the NBD nodes (closing the tunnel streams)."""
        h = self.handle
        for d in self._started:
            await h.qmp("block-job-cancel", {"device": d.job_id})
        async with asyncio.timeout(timeout):
            while True:
                jobs = await self._jobs()
                self._check(jobs)
                if all(jobs[d.job_id].get("status") == JOB_CONCLUDED for d in self._started):
                    break
                await asyncio.sleep(0.02)
        await self.remove()

    async def remove(self, *, force: bool = False) -> None:
        """Cancel (``force``) and dismiss the jobs, delete the NBD nodes; the guest's own
        disks are untouched (failure cleanup too: a command that timed out may still
        have taken effect, so every disk's job and node is looked for)."""
        h = self.handle
        with contextlib.suppress(GuestError):
            for d in self.disks:
                if force:
                    with contextlib.suppress(GuestError):
                        await h.qmp("block-job-cancel", {"device": d.job_id, "force": True})
                for _ in range(100):
                    job = (await self._jobs()).get(d.job_id)
                    if job is None or job.get("status") == JOB_CONCLUDED:
                        break
                    await asyncio.sleep(0.05)
                if job is not None:
                    with contextlib.suppress(GuestError):
                        await h.qmp("job-dismiss", {"id": d.job_id})
            for d in self.disks:
                with contextlib.suppress(GuestError):
                    await h.qmp("blockdev-del", {"node-name": d.nbd_node})
        self._started.clear()


# -- block digests of an image ---------------------------------------------------------


def _map(path: str, writable: bool) -> mmap.mmap:
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0 or size % BLOCK_SIZE:
            raise MigrationFailed(f"the image {path} is {size} bytes, not whole 4 KiB blocks")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)


def _close(mm: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a numpy view still alive: GC closes it
        mm.close()


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of a sparse file that hold data (SEEK_DATA/SEEK_HOLE),
    block-aligned; the whole file where the file system cannot say."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            start -= start % BLOCK_SIZE
            end += -end % BLOCK_SIZE
            out.append((start, min(end, size)))
            pos = end
    except OSError:
        return [(0, size)]
    return out


_ZERO_DIGEST = qemu_verify.page_digests(bytes(BLOCK_SIZE))[0]


def _digest_image(path: str) -> qemu_verify.PageDigests:
    """Holes get the digest of a zero block without reading them: a mostly empty image
    hashes in the time its data takes."""
    mm = _map(path, False)
    try:
        blocks = len(mm) // BLOCK_SIZE
        out = np.empty((blocks, qemu_verify.DIGEST_BYTES), dtype=np.uint8)
        out[:] = _ZERO_DIGEST
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            extents = data_extents(fd, len(mm))
        finally:
            os.close(fd)
        with memoryview(mm) as view:
            for start, end in extents:
                out[start // BLOCK_SIZE : end // BLOCK_SIZE] = qemu_verify.page_digests(
                    view[start:end]
                )
        return out
    finally:
        _close(mm)


async def image_digests(path: str) -> qemu_verify.PageDigests:
    """Per-4 KiB-block digests of a raw image (the guest is paused on both sides; the
    page cache is coherent with QEMU's O_DIRECT writes)."""
    return await asyncio.to_thread(_digest_image, path)


def image_blocks(path: str) -> int:
    return os.stat(path).st_size // BLOCK_SIZE


def read_blocks(path: str, indices: qemu_verify.IndexArray) -> bytes:
    mm = _map(path, False)
    try:
        with memoryview(mm) as view:
            return qemu_verify.gather_pages(view, indices)
    finally:
        _close(mm)


def write_blocks(
    path: str, indices: qemu_verify.IndexArray, payload: bytes
) -> qemu_verify.PageDigests:
    """Write repaired blocks into the image (synced); their new digests. ValueError for
    an index out of bounds or a payload that does not fit."""
    mm = _map(path, True)
    try:
        with memoryview(mm) as view:
            digests = qemu_verify.apply_pages(view, indices, payload)
        mm.flush()
        return digests
    finally:
        _close(mm)
