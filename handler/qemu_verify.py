"""Verified switchover for QEMU guests: per-page digests, compare, and repair.

At switchover both QEMUs are paused (the source in ``postmigrate``, the target after its
incoming migration completed, before ``cont``). Each handler maps its guest's RAM file
and computes one 128-bit digest per page; the target sends its digests to the source,
which compares them with its own and (``verify: repair``) re-sends exactly the pages that
differ. The target writes them, recomputes their digests and confirms.

The page digest is XXH3-128 of the page (``handler/pagehash.py``, the memvm engine's page
hash too): 16 bytes in xxhash's canonical big-endian form, computed natively on every core
at memory speed, zero pages recognised without hashing. It catches pages that a hypervisor
failed to copy -- any change of a page changes its digest except with probability ~2^-128
-- and does not resist an adversary, nor needs to: the stream that carries digests and
pages is mTLS between two authenticated nodes. Both sides of a migration run the same
handler version, so they hash alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from handler import pagehash

__all__ = [
    "DIGEST_BYTES",
    "PageDigests",
    "apply_pages",
    "compare",
    "digests_from_bytes",
    "digests_to_bytes",
    "gather_pages",
    "no_digests",
    "page_digests",
    "page_digests_async",
]

PAGE_SIZE = 4096
DIGEST_BYTES = pagehash.DIGEST_BYTES
_ZERO = pagehash.zero_digest(PAGE_SIZE)

PageDigests = pagehash.Digests  # shape (pages, DIGEST_BYTES), uint8
PageArray = npt.NDArray[np.uint8]  # shape (pages, PAGE_SIZE)
IndexArray = npt.NDArray[np.int64]


def _as_pages(buf: memoryview | bytes | bytearray | PageArray) -> PageArray:
    if isinstance(buf, np.ndarray):
        arr = buf
    else:
        arr = np.frombuffer(buf, dtype=np.uint8)
    if arr.size % PAGE_SIZE:
        raise ValueError(f"RAM of {arr.size} bytes is not a whole number of {PAGE_SIZE}-byte pages")
    return arr.reshape(-1, PAGE_SIZE)


def page_digests(buf: memoryview | bytes | bytearray | PageArray) -> PageDigests:
    """One XXH3-128 digest per 4 KiB page of ``buf`` (blocking; on every core)."""
    pages = _as_pages(buf)
    return pagehash.digest_range(pages, PAGE_SIZE, zero=_ZERO)[0]


async def page_digests_async(buf: memoryview | bytes | bytearray | PageArray) -> PageDigests:
    """page_digests() off the event loop."""
    return await asyncio.to_thread(page_digests, buf)


def no_digests() -> PageDigests:
    return np.empty((0, DIGEST_BYTES), dtype=np.uint8)


def digests_to_bytes(d: PageDigests) -> bytes:
    return d.tobytes()


def digests_from_bytes(blob: bytes, pages: int | None = None) -> PageDigests:
    """Parse digests from the wire; ValueError when the length does not fit."""
    if len(blob) % DIGEST_BYTES:
        raise ValueError(f"digest blob of {len(blob)} bytes is not a multiple of {DIGEST_BYTES}")
    d = np.frombuffer(blob, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    if pages is not None and len(d) != pages:
        raise ValueError(f"{len(d)} page digests received, the guest has {pages} pages")
    return d


@dataclass(frozen=True)
class Comparison:
    pages: int
    differing: IndexArray

    @property
    def match(self) -> bool:
        return self.differing.size == 0

    def describe(self, limit: int = 8) -> str:
        shown = ", ".join(str(int(i)) for i in self.differing[:limit])
        more = "" if self.differing.size <= limit else ", …"
        return f"{self.differing.size} of {self.pages} pages differ (pages {shown}{more})"


def compare(source: PageDigests, target: PageDigests) -> Comparison:
    """Indices (ascending) of the pages whose digests differ."""
    if source.shape != target.shape:
        raise ValueError(
            f"digest geometry differs: source {source.shape[0]} pages, target {target.shape[0]}"
        )
    # as two uint64 lanes per digest: one XOR and one OR a page (4x faster than bytes)
    x = np.ascontiguousarray(source).view(np.uint64) ^ np.ascontiguousarray(target).view(np.uint64)
    differing = np.flatnonzero(x[:, 0] | x[:, 1]).astype(np.int64)
    return Comparison(len(source), differing)


def gather_pages(buf: memoryview | PageArray, indices: IndexArray) -> bytes:
    """The contents of ``indices`` (concatenated), for a repair frame."""
    return _as_pages(buf)[indices].tobytes()


def apply_pages(buf: memoryview | PageArray, indices: IndexArray, payload: bytes) -> PageDigests:
    """Write ``payload`` (len(indices) pages) at ``indices``; returns their new digests.

    Bounds and sizes are checked before anything is written (ValueError)."""
    pages = _as_pages(buf)
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= len(pages)):
        raise ValueError(f"repair page index out of bounds ({len(pages)} pages)")
    if len(payload) != indices.size * PAGE_SIZE:
        raise ValueError(
            f"repair payload is {len(payload)} bytes for {indices.size} pages "
            f"({indices.size * PAGE_SIZE} expected)"
        )
    if indices.size:
        pages[indices] = np.frombuffer(payload, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return pagehash.digest_indices(pages, PAGE_SIZE, indices, zero=_ZERO)[0]
