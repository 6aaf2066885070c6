"""Verified switchover for QEMU guests: per-page digests, compare, and repair.

At switchover both QEMUs are paused (the source in ``postmigrate``, the target after its
incoming migration completed, before ``cont``). Each handler maps its guest's RAM file
and computes one 128-bit digest per page; the target sends its digests to the source,
which compares them with its own and (``verify: repair``) re-sends exactly the pages that
differ. The target writes them, recomputes their digests and confirms.

The page digest is a keyed, vectorised hash (numpy, no per-page Python loop): every
64-bit word is mixed with a per-position key through a multiply/xor-shift bijection,
and two lanes are reduced per page (a wrapping sum and an xor of a second mix). It is
built to catch pages that a hypervisor failed to copy — any change of a page changes
its digest except with probability ~2^-64 — not to resist an adversary: the stream
that carries digests and pages is mTLS between two authenticated nodes.

Digests are computed in chunks of ``CHUNK_PAGES`` pages (1 MiB, cache-friendly) in the
handler's hashing pool (``drivers.base.hash_pool``); numpy releases the GIL, so both cores hash.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from handler.drivers.base import hash_pool

__all__ = [
    "DIGEST_BYTES",
    "PageDigests",
    "apply_pages",
    "compare",
    "digests_from_bytes",
    "gather_pages",
    "page_digests",
    "page_digests_async",
]

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8
CHUNK_PAGES = 256
DIGEST_BYTES = 16  # two little-endian uint64 lanes per page

PageDigests = npt.NDArray[np.uint64]  # shape (pages, 2)
PageArray = npt.NDArray[np.uint8]  # shape (pages, PAGE_SIZE)
IndexArray = npt.NDArray[np.int64]

# Fixed keys: both sides of a migration must use the same ones (any two handlers of the
# same version do). Odd, so that the multiplications are bijections.
_KEYS = np.random.default_rng(0x766D6665727279).integers(
    0, 2**63, size=WORDS, dtype=np.uint64
) | np.uint64(1)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S29 = np.uint64(29)


def _digest_chunk(pages: PageArray, out: PageDigests, start: int, stop: int) -> None:
    words = pages[start:stop].view(np.uint64)  # (n, WORDS)
    x = words ^ _KEYS
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S29
    out[start:stop, 0] = x.sum(axis=1, dtype=np.uint64)
    x *= _M2
    out[start:stop, 1] = np.bitwise_xor.reduce(x, axis=1)


def _as_pages(buf: memoryview | bytes | bytearray | PageArray) -> PageArray:
    if isinstance(buf, np.ndarray):
        arr = buf
    else:
        arr = np.frombuffer(buf, dtype=np.uint8)
    if arr.size % PAGE_SIZE:
        raise ValueError(f"RAM of {arr.size} bytes is not a whole number of {PAGE_SIZE}-byte pages")
    return arr.reshape(-1, PAGE_SIZE)


def page_digests(buf: memoryview | bytes | bytearray | PageArray) -> PageDigests:
    """One 128-bit digest per 4 KiB page of ``buf`` (blocking; threads inside)."""
    pages = _as_pages(buf)
    out = np.empty((len(pages), 2), dtype=np.uint64)
    starts = range(0, len(pages), CHUNK_PAGES)
    futures = [
        hash_pool().submit(_digest_chunk, pages, out, s, min(s + CHUNK_PAGES, len(pages)))
        for s in starts
    ]
    for f in futures:
        f.result()
    return out


async def page_digests_async(buf: memoryview | bytes | bytearray | PageArray) -> PageDigests:
    """page_digests() off the event loop."""
    return await asyncio.to_thread(page_digests, buf)


def digests_to_bytes(d: PageDigests) -> bytes:
    return d.astype("<u8").tobytes()


def digests_from_bytes(blob: bytes, pages: int | None = None) -> PageDigests:
    """Parse digests from the wire; ValueError when the length does not fit."""
    if len(blob) % DIGEST_BYTES:
        raise ValueError(f"digest blob of {len(blob)} bytes is not a multiple of {DIGEST_BYTES}")
    d = np.frombuffer(blob, dtype="<u8").astype(np.uint64).reshape(-1, 2)
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
    differing = np.nonzero((source != target).any(axis=1))[0].astype(np.int64)
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
    out = np.empty((indices.size, 2), dtype=np.uint64)
    if indices.size:
        _digest_chunk(np.ascontiguousarray(pages[indices]), out, 0, indices.size)
    return out
