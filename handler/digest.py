"""The migration's memory digest, kept up to date chunk by chunk while pages move.

Digest = hex sha256 over the concatenated group hashes, where a group hash is the
XXH3-128 of up to GROUP_CHUNKS consecutive chunk hashes and a chunk hash is the XXH3-128
of CHUNK_PAGES consecutive pages of guest RAM (the last chunk and group may be shorter).

Chunk and group hashes are XXH3-128, not SHA-256: it hashes a page 4-5x faster (3.9
against 0.83 GiB/s a thread here, the largest CPU cost of a migration on both sides) and
a group 5x faster (400 groups of 1 KiB: 0.18 against 0.94 ms, re-hashed on both sides
while the guest is paused), and it changes with any change of its input except with
probability ~2^-128 -- what the digest is for: catching pages a migration failed to copy
or wrote wrong. It does not resist an adversary, and does not need to: the pages and
both digests travel over mTLS between the two nodes the hand-off names, and a source that
wanted to lie would simply send other memory and digest it honestly. (The QEMU path's
page digests, qemu_verify.py, are non-cryptographic for the same reason.)

Both sides keep the chunk and group hashes of their own RAM and re-hash only the chunks
that changed (and the groups holding them), so the switchover hashes just what the final
pass touched instead of all of memory:

- the target hashes every page it writes right after writing it (``hash_pages``; it is
  the only writer of its RAM before the guest resumes: exact);
- the source invalidates the chunks of every page the dirty log reports (the same log
  the migration relies on to send those pages).

A chunk is one page because a guest that writes all over its memory dirties a page here
and a page there: what is re-hashed at switchover is then exactly the dirty memory, where
256 KiB chunks made it most of RAM (measured: a 256 MiB guest dirtying 50 MiB/s re-hashed
~200 MiB on each side while paused; guest-seen downtime p50 367 -> 99 ms). The groups
keep the root small (1 GiB is 4096 group hashes, 128 KiB) and stay small themselves: the
same scattered dirty pages land in most groups, and each such group is re-hashed whole at
switchover (with 1024-chunk groups of SHA-256 hashes, 1000 dirty pages of a 1 GiB guest
re-hashed 8 MiB of chunk hashes on each side; with 64 of XXH3-128, ~1 MiB).

Clear-then-hash: ``refresh`` clears a chunk's stale flag *before* hashing it, and writers
mark stale *after* writing, so a write racing a hash always leaves the chunk stale for
the next refresh. ``digest()`` is exact once a refresh found nothing stale while the
memory was not changing (guest paused, all pages applied).

``begin_hashing`` / ``end_hashing`` bracket a worker that hashes pages itself while it
moves them (handler/pagebatch.py: the source's pre-copy batches, hashed as they are
gathered into the frame, so no refresh reads them again; the target's batches, hashed as
they are written). The source clears a page's stale flag before the pass reads it: a
write the pass misses is in the dirty log, whose harvest marks the page stale again (and
sends it again).

``hash_pages`` is for a worker that is the only one touching its pages while it runs:
the target's, right after applying a batch (the pages are in the CPU cache, and the
digest is ready as soon as the last page is applied, with no refresh to wait for), and
the source's during its stop-and-copy round, while those pages travel.

Group hashes are made by ``refresh`` (a round's end, a digest): hash_pages only marks the
groups it touched (re-hashing them after every batch re-hashed most groups a thousand
times over a migration).

Ownership: ``invalidate`` runs on the event loop; ``refresh`` in worker threads (one
refresh at a time per object: the lock), or on the loop when none runs (``digest_soon``);
``hash_pages`` in the worker that wrote the pages (each page written by one worker at a
time); ``group_hashes`` rows are written only under the digest's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from handler import pagehash

CHUNK_PAGES = 1  # pages per chunk hash; see above
GROUP_CHUNKS = 64  # chunk hashes per group hash (1 KiB of hashes)
LEAF_BYTES = pagehash.DIGEST_BYTES  # a chunk or group hash: XXH3-128, big-endian


def _leaf(data: bytes | memoryview) -> bytes:
    """A chunk's (or a group's) hash."""
    return xxhash.xxh3_128_digest(data)


def _group_hashes(hashes: npt.NDArray[np.uint8], groups: list[int]) -> npt.NDArray[np.uint8]:
    """The hashes of ``groups`` (each over up to GROUP_CHUNKS rows of ``hashes``)."""
    flat, span, leaf = hashes.data.cast("B"), GROUP_CHUNKS * LEAF_BYTES, _leaf
    out = b"".join([leaf(flat[g * span : (g + 1) * span]) for g in groups])
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, LEAF_BYTES)


class ChunkDigest:
    def __init__(
        self,
        ram: memoryview,
        page_size: int,
        chunk_pages: int = CHUNK_PAGES,
        *,
        all_zero: bool = False,
        zero_pages: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """``all_zero``: the memory is known to be all zeros now (a migration target's
        fresh RAM file), so no chunk needs reading until something is written.
        ``zero_pages``: the same per page (a source's never-written pages: file holes)."""
        self._ram = ram.cast("B") if ram.format != "B" else ram
        self.chunk_bytes = page_size * chunk_pages
        self.chunk_pages = chunk_pages
        chunks = -(-len(self._ram) // self.chunk_bytes)
        self.hashes: npt.NDArray[np.uint8] = np.zeros((chunks, LEAF_BYTES), dtype=np.uint8)
        self.stale: npt.NDArray[np.bool_] = np.full(chunks, not all_zero, dtype=np.bool_)
        groups = -(-chunks // GROUP_CHUNKS)
        self.group_hashes: npt.NDArray[np.uint8] = np.zeros((groups, LEAF_BYTES), dtype=np.uint8)
        self.group_stale: npt.NDArray[np.bool_] = np.ones(groups, dtype=np.bool_)
        # The hash of an all-zero chunk: what a zero chunk gets without being hashed.
        self._zero_hash = np.frombuffer(_leaf(bytes(self.chunk_bytes)), dtype=np.uint8)
        if all_zero and chunks:
            self.hashes[:] = self._zero_hash
            tail = len(self._ram) - (chunks - 1) * self.chunk_bytes
            self.hashes[-1] = np.frombuffer(_leaf(bytes(tail)), dtype=np.uint8)
        if zero_pages is not None and chunks and not all_zero:
            padded = np.zeros(chunks * chunk_pages, dtype=np.bool_)
            padded[: len(zero_pages)] = zero_pages
            known = np.asarray(padded.reshape(chunks, chunk_pages).all(axis=1), dtype=np.bool_)
            known[-1] &= len(self._ram) == chunks * self.chunk_bytes  # a short tail: hash it
            self.hashes[known] = self._zero_hash
            self.stale[known] = False
        self._lock = asyncio.Lock()
        self.hashed_bytes = 0  # work done, for the downtime breakdown and tests
        self._background: asyncio.Task[int] | None = None
        self._ram_released = False
        self._shared: tuple[mmap.mmap, Path | None] | None = None

    # -- tables shared with stream workers (handler/migration/stream_worker.py) ----------------

    def share(self, path: Path) -> None:
        """Move the tables that page movers write (the page hashes, their stale flags and
        the groups' stale flags) into a new shared-memory file at ``path``, for stream
        workers to ``attach``; ``release`` removes the file."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self._shared_size())
            mm = mmap.mmap(fd, self._shared_size())
        finally:
            os.close(fd)
        self._bind(mm, copy=True)
        self._shared = (mm, path)

    def attach(self, path: Path) -> None:
        """Use the tables another process shared at ``path`` (a stream worker)."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != self._shared_size():
                raise ValueError(f"{path} does not hold this memory's digest tables")
            mm = mmap.mmap(fd, self._shared_size())
        finally:
            os.close(fd)
        self._bind(mm, copy=False)
        self._shared = (mm, None)

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def _shared_size(self) -> int:
        return self.hashes.nbytes + self.stale.nbytes + self.group_stale.nbytes

    def _bind(self, mm: mmap.mmap, *, copy: bool) -> None:
        chunks, groups = len(self.stale), len(self.group_stale)
        hashes = np.frombuffer(mm, dtype=np.uint8, count=chunks * LEAF_BYTES)
        stale = np.frombuffer(mm, dtype=np.bool_, count=chunks, offset=chunks * LEAF_BYTES)
        group_stale = np.frombuffer(
            mm, dtype=np.bool_, count=groups, offset=chunks * (LEAF_BYTES + 1)
        )
        hashes = hashes.reshape(chunks, LEAF_BYTES)
        if copy:
            hashes[:] = self.hashes
            stale[:] = self.stale
            group_stale[:] = self.group_stale
        self.hashes, self.stale, self.group_stale = hashes, stale, group_stale

    def invalidate(self, pages: npt.NDArray[np.int64]) -> None:
        """The pages changed (or will be sent again): their chunks must be re-hashed."""
        if pages.size:
            self.stale[pages // self.chunk_pages] = True

    def _hash_chunks(self, chunks: list[int]) -> int:
        """Hash ``chunks`` (ascending) into their rows; returns the bytes that went
        through the hash (``handler/pagehash.py``: natively on every core, a chunk being
        its "page"). All-zero chunks get the known zero-chunk hash without hashing: the
        zero check runs at memory speed, several times the hash, and guest memory is
        mostly zeros."""
        if not chunks:
            return 0
        first, last = chunks[0], chunks[-1]
        zero = self._zero_hash.tobytes()
        if last - first == len(chunks) - 1:  # consecutive: hashed in place, rows written
            _, hashed = pagehash.digest_range(
                self._ram,
                self.chunk_bytes,
                first,
                len(chunks),
                zero=zero,
                out=self.hashes[first : last + 1],
            )
        else:  # scattered (dirty pages)
            ids = np.asarray(chunks, dtype=np.int64)
            _, hashed = pagehash.digest_indices(
                self._ram, self.chunk_bytes, ids, zero=zero, out=self.hashes, by_page=True
            )
        return hashed

    def refresh(self, skip: npt.NDArray[np.int64] | None = None) -> int:
        """Re-hash every stale chunk but those in ``skip`` (which stay stale); blocking,
        run in a worker. Returns the number of chunks hashed."""
        todo = np.flatnonzero(self.stale)
        if skip is not None and skip.size:
            todo = np.setdiff1d(todo, skip, assume_unique=True)
        if todo.size:
            self.stale[todo] = False  # clear, then hash
            self.hashed_bytes += self._hash_chunks(todo.tolist())
            self.group_stale[todo // GROUP_CHUNKS] = True
        self._refresh_groups()
        return int(todo.size)

    def hash_pages(self, pages: npt.NDArray[np.int64]) -> int:
        """Hash the chunks of ``pages`` now: the caller just wrote them and is their only
        writer. Blocking, run in that worker. Returns the bytes hashed."""
        if not pages.size:
            return 0
        chunks = np.unique(pages // self.chunk_pages)
        self.stale[chunks] = False
        hashed = self._hash_chunks(chunks.tolist())
        self.group_stale[chunks // GROUP_CHUNKS] = True  # after the rows: clear-then-hash
        return hashed

    def begin_hashing(self, pages: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8] | None:
        """Clear-then-hash for a worker that hashes ``pages`` itself next (the fused pass
        of handler/pagebatch.py, into the returned table: a row per page), before it reads
        them. None when a chunk spans several pages: that worker calls hash_pages instead."""
        if self.chunk_pages != 1:
            return None
        if pages.size:
            self.stale[pages] = False
        return self.hashes

    def end_hashing(
        self,
        zero: npt.NDArray[np.integer],
        hashed: npt.NDArray[np.integer],
        unread: npt.NDArray[np.integer] | None = None,
    ) -> None:
        """After begin_hashing: ``hashed`` rows are written; ``zero`` pages (found all
        zeros) get the zero-page hash; ``unread`` pages (cleared but not read after all)
        are stale again."""
        if zero.size:
            self.hashes[zero] = self._zero_hash
        for done in (hashed, zero):
            if done.size:
                self.group_stale[done // GROUP_CHUNKS] = True
        if unread is not None and unread.size:
            self.stale[unread] = True

    def _refresh_groups(self) -> None:
        """Re-hash the groups whose chunk hashes changed (clear, then hash)."""
        todo = np.flatnonzero(self.group_stale)
        if todo.size:
            self.group_stale[todo] = False
            self.group_hashes[todo] = _group_hashes(self.hashes, todo.tolist())

    def _digest(self) -> str:
        self.refresh()
        return hashlib.sha256(self.group_hashes.tobytes()).hexdigest()

    async def refresh_async(self, skip: npt.NDArray[np.int64] | None = None) -> int:
        """refresh() off the event loop; concurrent callers wait for each other."""
        async with self._lock:
            return await asyncio.to_thread(self.refresh, skip)

    def refresh_in_background(self) -> None:
        """Start a refresh unless one runs (its result is picked up by the next call)."""
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self.refresh_async())

    async def digest_async(self) -> str:
        """Refresh what is stale, then the digest. Call when the memory is quiescent."""
        async with self._lock:
            return await asyncio.to_thread(self._digest)

    def digest_soon(self) -> asyncio.Future[str]:
        """digest_async(), made here on the event loop when no refresh runs (a future
        that is done already): a switchover's remainder is ~0.3 ms of CPU, and a worker
        thread's hand-off and return took ~1.5 ms of the pause while both cores are busy
        (measured). Call when the memory is quiescent."""
        if self._lock.locked():  # a refresh runs in a worker: wait for it there
            return asyncio.ensure_future(self.digest_async())
        made: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        try:
            made.set_result(self._digest())
        except Exception as e:  # reported where the digest is awaited, like digest_async
            made.set_exception(e)
        return made

    async def hash_pages_and_digest_async(self, pages: npt.NDArray[np.int64]) -> str:
        """hash_pages(pages), then the digest, in one worker call: the source's
        stop-and-copy round, whose memory is still (one hand-off to a worker thread and
        back instead of two, in the downtime)."""

        def run() -> str:
            self.hash_pages(pages)
            return self._digest()

        async with self._lock:
            return await asyncio.to_thread(run)

    async def masked_digest_async(self, missing: npt.NDArray[np.int64], page_size: int) -> str:
        """The digest with the ``missing`` pages taken as zeros (post-copy: what the target
        already has). Chunks holding a missing page are hashed from a masked copy."""
        by_chunk: dict[int, list[int]] = {}
        for page in np.unique(missing).tolist():
            by_chunk.setdefault(page // self.chunk_pages, []).append(page % self.chunk_pages)
        # Chunks with a missing page are hashed below from a masked copy (or known to be
        # zeros): refreshing them first would be wasted work.
        await self.refresh_async(skip=np.array(sorted(by_chunk), dtype=np.int64))
        hashes = self.hashes.copy()

        def mask(items: list[tuple[int, list[int]]]) -> None:
            for c, pages in items:
                start = c * self.chunk_bytes
                if len(pages) == self.chunk_pages and start + self.chunk_bytes <= len(self._ram):
                    hashes[c] = self._zero_hash  # wholly missing: all zeros, nothing to copy
                    continue
                with self._ram[start : start + self.chunk_bytes] as piece:
                    copy = np.frombuffer(bytearray(piece), dtype=np.uint8).reshape(-1, page_size)
                copy[pages] = 0
                hashes[c] = np.frombuffer(_leaf(copy.data), dtype=np.uint8)

        await asyncio.to_thread(mask, list(by_chunk.items()))

        def root() -> str:
            self._refresh_groups()  # hash_pages may have marked some since the refresh
            groups = self.group_hashes.copy()
            masked = np.unique(np.fromiter(by_chunk, dtype=np.int64) // GROUP_CHUNKS).tolist()
            if masked:
                groups[masked] = _group_hashes(hashes, masked)
            return hashlib.sha256(groups.tobytes()).hexdigest()

        async with self._lock:
            return await asyncio.to_thread(root)

    def release(self) -> None:
        """Drop the view of guest RAM (the driver can unmap it). Safe to call twice."""
        if self._background is not None:
            self._background.cancel()
        if self.stale.size and not self._ram_released:
            self._ram_released = True
            self._ram.release()
        if self._shared is not None:
            mm, path = self._shared
            self._shared = None
            empty = np.zeros(0, dtype=np.bool_)
            self.hashes, self.stale, self.group_stale = (
                np.zeros((0, LEAF_BYTES), np.uint8),
                empty,
                empty,
            )
            with contextlib.suppress(BufferError):  # a view still held: unmapped when dropped
                mm.close()
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
