"""The incremental memory digest equals a full re-hash, and re-hashes only what changed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
import xxhash

from handler import pagehash
from handler.digest import CHUNK_PAGES, GROUP_CHUNKS, ChunkDigest

PAGE = 4096


@pytest.fixture(autouse=True, params=["native", "python"])
def page_hash(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test on the native page digests and on the Python fallback (same digests,
    same work figures)."""
    if request.param == "native" and not pagehash._set_native(True):
        pytest.skip(f"{pagehash.LIBRARY} not built (make venv builds it)")
    if request.param == "python":
        pagehash._set_native(False)
    yield
    pagehash._set_native(True)


def full(ram: bytearray, chunk_pages: int) -> str:
    """The digest's definition, computed from scratch: chunk hashes, group hashes, root."""
    size = PAGE * chunk_pages
    chunks = [xxhash.xxh3_128_digest(bytes(ram[o : o + size])) for o in range(0, len(ram), size)]
    groups = [
        xxhash.xxh3_128_digest(b"".join(chunks[g : g + GROUP_CHUNKS]))
        for g in range(0, len(chunks), GROUP_CHUNKS)
    ]
    return hashlib.sha256(b"".join(groups)).hexdigest()


def test_incremental_digest_tracks_writes_and_hashes_only_stale_chunks() -> None:
    pages = 1000  # not a multiple of the chunk: the last chunk is short
    ram = bytearray(
        np.random.default_rng(3).integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes()
    )
    d = ChunkDigest(memoryview(ram), PAGE, chunk_pages=64)
    assert asyncio.run(d.digest_async()) == full(ram, 64)
    first = d.hashed_bytes
    assert first == len(ram)
    for page in (0, 5, 999):
        ram[page * PAGE] ^= 0xFF
    d.invalidate(np.array([0, 5, 999], dtype=np.int64))
    assert asyncio.run(d.digest_async()) == full(ram, 64)
    assert d.hashed_bytes - first == 64 * PAGE + (1000 - 960) * PAGE  # chunks 0 and 15 only
    ram[500 * PAGE] ^= 0xFF  # a write nobody reported is not seen: the writer must invalidate
    assert asyncio.run(d.digest_async()) != full(ram, 64)
    d.release()


def test_masked_digest_ignores_exactly_the_missing_pages() -> None:
    rng = np.random.default_rng(4)
    a = bytearray(rng.integers(0, 256, 256 * PAGE, dtype=np.uint8).tobytes())
    b = bytearray(a)
    for page in (3, 200):  # pages the target has not received yet differ
        b[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    missing = np.array([3, 200], dtype=np.int64)
    da, db = ChunkDigest(memoryview(a), PAGE), ChunkDigest(memoryview(b), PAGE)
    assert asyncio.run(da.masked_digest_async(missing, PAGE)) == asyncio.run(
        db.masked_digest_async(missing, PAGE)
    )
    assert asyncio.run(da.masked_digest_async(missing[:1], PAGE)) != asyncio.run(
        db.masked_digest_async(missing[:1], PAGE)
    )
    assert asyncio.run(da.masked_digest_async(missing[:0], PAGE)) == asyncio.run(da.digest_async())
    da.release()
    db.release()


def test_a_wholly_missing_chunk_hashes_as_zeros() -> None:
    a = bytearray(np.random.default_rng(5).integers(0, 256, 256 * PAGE, dtype=np.uint8).tobytes())
    b = bytearray(a)
    b[64 * PAGE : 128 * PAGE] = bytes(64 * PAGE)
    whole = np.arange(64, 128, dtype=np.int64)
    da, db = ChunkDigest(memoryview(a), PAGE), ChunkDigest(memoryview(b), PAGE)
    assert asyncio.run(da.masked_digest_async(whole, PAGE)) == asyncio.run(db.digest_async())
    da.release()
    db.release()


def test_fresh_zero_memory_needs_no_reading_until_written() -> None:
    ram = bytearray(300 * PAGE)
    d = ChunkDigest(memoryview(ram), PAGE, all_zero=True)
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES) and d.hashed_bytes == 0
    ram[70 * PAGE] = 1
    d.invalidate(np.array([70], dtype=np.int64))
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    assert d.hashed_bytes == CHUNK_PAGES * PAGE
    d.release()


def test_many_groups_and_scattered_writes_rehash_only_their_chunks() -> None:
    """Default geometry (chunks in groups of GROUP_CHUNKS): scattered single-page writes
    cost one chunk each, not a fraction of RAM."""
    pages = CHUNK_PAGES * GROUP_CHUNKS * 2 + 7  # two full groups and a short third
    rng = np.random.default_rng(9)
    ram = bytearray(rng.integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes())
    d = ChunkDigest(memoryview(ram), PAGE)
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    before = d.hashed_bytes
    written = np.array([1, pages // 2, pages - 1], dtype=np.int64)  # three chunks
    for page in written.tolist():
        ram[page * PAGE + 17] ^= 0x5A
    d.invalidate(written)
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    last_chunk_pages = pages - (pages - 1) // CHUNK_PAGES * CHUNK_PAGES
    assert d.hashed_bytes - before == (2 * CHUNK_PAGES + last_chunk_pages) * PAGE
    d.release()


def test_zero_chunks_are_recognised_without_hashing() -> None:
    """Mostly-zero memory: only the chunks with data go through SHA-256, and the digest is
    still the definition's (zero chunks hash like any other)."""
    pages = 3000
    ram = bytearray(pages * PAGE)
    for page in (7, 1500, 2999):
        ram[page * PAGE + 100] = 1
    d = ChunkDigest(memoryview(ram), PAGE)
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    assert d.hashed_bytes == 3 * CHUNK_PAGES * PAGE
    ram[1500 * PAGE + 100] = 0  # a page becomes zero again; a scattered (gathered) check
    ram[20 * PAGE] = 9
    d.invalidate(np.array([20, 1500], dtype=np.int64))
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    d.release()


def test_pages_known_zero_are_not_read() -> None:
    """A source's never-written pages (file holes) get the zero hash without a read; the
    digest is the definition's, and a later write (reported by the dirty log) counts."""
    pages = 2000
    ram = bytearray(pages * PAGE)
    ram[10 * PAGE] = 3
    zero = np.ones(pages, dtype=np.bool_)
    zero[10] = False
    d = ChunkDigest(memoryview(ram), PAGE, zero_pages=zero)
    assert int(d.stale.sum()) == 1  # only page 10's chunk waits for hashing
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    ram[1999 * PAGE] = 4
    d.invalidate(np.array([1999], dtype=np.int64))
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    d.release()


def test_writers_hashing_their_own_pages_give_the_definitions_digest() -> None:
    """A target's apply workers (one per channel, concurrently, disjoint pages) hash what
    they write; nothing is left stale, and the digest is the definition's."""
    pages = CHUNK_PAGES * GROUP_CHUNKS * 3 + 5
    ram = bytearray(pages * PAGE)
    d = ChunkDigest(memoryview(ram), PAGE, all_zero=True)
    written = np.random.default_rng(4).choice(pages, size=pages // 3, replace=False)
    written = written.astype(np.int64)
    parts = [written[written % 2 == c] for c in range(2)]

    def apply(part: npt.NDArray[np.int64]) -> int:
        for page in part.tolist():
            ram[page * PAGE : (page + 1) * PAGE] = rng_bytes(page)
        return d.hash_pages(part)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        hashed = sum(pool.map(apply, parts))
    assert hashed == len(written) * PAGE
    assert not d.stale.any()
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    again = written[:10]
    for page in again.tolist():
        ram[page * PAGE] ^= 0xFF
    d.hash_pages(again)
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    d.release()


def rng_bytes(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE, dtype=np.uint8).tobytes()


def test_stop_and_copy_pages_hashed_with_the_digest_in_one_call() -> None:
    """The source's final round: the dirty pages (invalidated or not) are hashed and the
    digest made in one worker call; it is the definition's."""
    pages = CHUNK_PAGES * GROUP_CHUNKS * 4
    ram = bytearray(np.random.default_rng(5).integers(0, 256, pages * PAGE, np.uint8).tobytes())
    d = ChunkDigest(memoryview(ram), PAGE)
    assert asyncio.run(d.digest_async()) == full(ram, CHUNK_PAGES)
    before = d.hashed_bytes
    final = np.array([1, 70, 71, pages - 1], dtype=np.int64)
    for page in final.tolist():
        ram[page * PAGE + 7] ^= 0x5A
    d.invalidate(final[:2])  # as the pause harvest does; the other two were not
    assert asyncio.run(d.hash_pages_and_digest_async(final)) == full(ram, CHUNK_PAGES)
    assert not d.stale.any()
    assert d.hashed_bytes == before  # the refresh found nothing left: no page hashed twice
    d.release()


def test_digest_soon_is_made_on_the_loop_unless_a_refresh_runs() -> None:
    """The target's digest at the end of the final round: made at once (a future that is
    done already) when no refresh holds the digest; else it waits for that refresh in a
    worker, and both give the definition's digest."""
    pages = CHUNK_PAGES * GROUP_CHUNKS * 3
    ram = bytearray(np.random.default_rng(9).integers(0, 256, pages * PAGE, np.uint8).tobytes())
    d = ChunkDigest(memoryview(ram), PAGE)

    async def scenario() -> None:
        now = d.digest_soon()
        assert now.done() and now.result() == full(ram, CHUNK_PAGES)

        ram[5 * PAGE] ^= 0xFF
        d.invalidate(np.array([5], dtype=np.int64))
        async with d._lock:  # as a background refresh holds it
            later = d.digest_soon()
            await asyncio.sleep(0.01)
            assert not later.done()
        assert await later == full(ram, CHUNK_PAGES)

    asyncio.run(scenario())
    d.release()
