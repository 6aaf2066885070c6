"""The fused per-batch pass (handler/pagebatch.py): the native library and the numpy
fallback give identical indices, bytes and hashes, on random, zero and mixed pages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from handler import pagebatch, pagehash, stream
from handler.digest import ChunkDigest

PAGE = 4096


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "native" and not pagebatch._set_native(True):
        pytest.skip(f"{pagehash.LIBRARY} not built (make venv builds it)")
    if request.param == "python":
        pagebatch._set_native(False)
    yield request.param
    pagebatch._set_native(True)


def memory(kind: str, pages: int = 300, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ram = rng.integers(0, 256, size=(pages, PAGE), dtype=np.uint8)
    if kind == "zero":
        ram[:] = 0
    elif kind == "mixed":
        ram[rng.random(pages) < 0.5] = 0
        ram[5] = 0
        ram[5, PAGE - 1] = 1  # data only in the last byte
        ram[6] = 0
        ram[6, 64] = 7  # only in the second 64-byte block
    return ram


def leaf(page: np.ndarray) -> bytes:
    return xxhash.xxh3_128_digest(page.tobytes())


def run_both(fn):  # type: ignore[no-untyped-def]
    """fn() on the native library and on the fallback."""
    results = []
    for native in (True, False):
        if pagebatch._set_native(native) != native:
            pytest.skip("the native library is not built")
        try:
            results.append(fn())
        finally:
            pagebatch._set_native(True)
    return results


@pytest.mark.parametrize("kind", ["random", "zero", "mixed"])
@pytest.mark.parametrize("max_nonzero", [0, 7, 1000])
def test_scan_and_gather_native_equals_fallback(kind: str, max_nonzero: int) -> None:
    ram = memory(kind)
    indices = np.concatenate((np.arange(0, 120), np.arange(200, 300, 3))).astype(np.int64)

    def once() -> tuple[int, bytes, bytes, bytes, bytes]:
        found = pagebatch.scan(ram, indices, max_nonzero)
        out = np.empty((len(found.nonzero), PAGE), dtype=np.uint8)
        table = np.zeros((len(ram), 16), dtype=np.uint8)
        pagebatch.gather(ram, found.nonzero, out, table)
        return (
            found.covered,
            found.nonzero.tobytes(),
            found.zero.tobytes(),
            out.tobytes(),
            table.tobytes(),
        )

    native, fallback = run_both(once)
    assert native == fallback
    covered, nz_blob, zero_blob, data, table_blob = native
    nz = np.frombuffer(nz_blob, dtype="<u4")
    zero = np.frombuffer(zero_blob, dtype="<u4")
    head = indices[:covered]
    is_data = ram[head].any(axis=1)
    assert nz.tolist() == head[is_data].tolist() and zero.tolist() == head[~is_data].tolist()
    assert len(nz) <= max_nonzero
    if covered < len(indices):  # stopped just before the data page one too many
        assert len(nz) == max_nonzero and ram[indices[covered]].any()
    assert data == ram[nz.astype(np.int64)].tobytes()
    table = np.frombuffer(table_blob, dtype=np.uint8).reshape(-1, 16)
    for page in nz.tolist():
        assert table[page].tobytes() == leaf(ram[page])


@pytest.mark.parametrize("kind", ["random", "mixed"])
def test_apply_native_equals_fallback_through_file_and_mapping(tmp_path: Path, kind: str) -> None:
    source = memory(kind, 200)
    nz = np.concatenate(
        ([3, 7], np.arange(20, 41), np.arange(100, 110), [150], np.arange(160, 200))
    )
    nz = nz.astype("<u4")
    payload = source[nz.astype(np.int64)].copy()

    def once() -> tuple[bytes, bytes, bytes]:
        path = tmp_path / "ram"
        path.write_bytes(b"\x11" * (200 * PAGE))
        fd = os.open(path, os.O_RDWR)
        try:
            import mmap

            with mmap.mmap(fd, 200 * PAGE) as mm:
                ram = np.frombuffer(mm, dtype=np.uint8).reshape(200, PAGE)
                table = np.zeros((200, 16), dtype=np.uint8)
                pagebatch.apply(ram, nz, payload, fd=fd, min_run=16, hashes=table)
                mapped = ram.tobytes()
                del ram
        finally:
            os.close(fd)
        return mapped, path.read_bytes(), table.tobytes()

    native, fallback = run_both(once)
    assert native == fallback
    mapped, on_disk, table_blob = native
    expected = np.full((200, PAGE), 0x11, dtype=np.uint8)
    expected[nz.astype(np.int64)] = source[nz.astype(np.int64)]
    assert mapped == on_disk == expected.tobytes()
    table = np.frombuffer(table_blob, dtype=np.uint8).reshape(-1, 16)
    for page in nz.tolist():
        assert table[page].tobytes() == leaf(expected[page])


def test_apply_reports_a_failed_write(tmp_path: Path, impl: str) -> None:
    ram = np.zeros((40, PAGE), dtype=np.uint8)
    path = tmp_path / "ram"
    path.write_bytes(bytes(40 * PAGE))
    fd = os.open(path, os.O_RDONLY)  # pwrite() fails: EBADF
    try:
        with pytest.raises(OSError):
            pagebatch.apply(
                ram, np.arange(20, dtype="<u4"), memory("random", 20), fd=fd, min_run=16
            )
    finally:
        os.close(fd)


def test_bad_input_is_refused_before_any_native_call(impl: str) -> None:
    ram = memory("random", 10)
    with pytest.raises(ValueError, match="out of bounds"):
        pagebatch.scan(ram, np.array([3, 10], dtype=np.int64), 5)
    with pytest.raises(ValueError, match="out of bounds"):
        pagebatch.gather(ram, np.array([11], dtype="<u4"), np.empty((1, PAGE), np.uint8))
    with pytest.raises(ValueError, match="must be a contiguous"):
        pagebatch.gather(ram, np.array([1], dtype="<u4"), np.empty((2, PAGE), np.uint8))
    with pytest.raises(ValueError, match="hashes must be"):
        pagebatch.gather(
            ram,
            np.array([1], dtype="<u4"),
            np.empty((1, PAGE), np.uint8),
            np.zeros((3, 16), np.uint8),
        )
    with pytest.raises(ValueError, match="payload has 2 pages for 1 indices"):
        pagebatch.apply(ram, np.array([1], dtype="<u4"), ram[:2], fd=None, min_run=16)
    with pytest.raises(ValueError, match="max_nonzero"):
        pagebatch.scan(ram, np.array([1], dtype=np.int64), -1)


def test_new_frame_is_prefix_then_the_written_tail() -> None:
    frame, tail = pagebatch.new_frame(b"head", 8)
    tail[:] = np.arange(8, dtype=np.uint8)
    assert isinstance(frame, bytes) and frame == b"head" + bytes(range(8))


@pytest.mark.parametrize("kind", ["random", "mixed"])
def test_batches_hash_into_the_digest_as_a_refresh_would(kind: str, impl: str) -> None:
    """Source: build_batch with the digest fills its rows (data and zero pages) and
    leaves them fresh; the digest equals one made by refreshing from RAM. Pages past the
    batch's prefix stay stale."""
    ram = memory(kind, 400)
    view = ram.reshape(-1).data
    sent = ChunkDigest(view, PAGE)
    indices = np.arange(0, 400, dtype=np.int64)
    batch = stream.build_batch(ram, indices, 0, compress=False, max_pages=100, digest=sent)
    covered = batch.pages
    assert not sent.stale[:covered].any() and sent.stale[covered:].all()
    reference = ChunkDigest(ram.copy().reshape(-1).data, PAGE)
    reference.refresh()
    assert (sent.hashes[:covered] == reference.hashes[:covered]).all()
    sent.refresh()  # the rest
    assert sent._digest() == reference._digest()


def test_target_batches_hash_what_they_write(tmp_path: Path, impl: str) -> None:
    source = memory("mixed", 300)
    target = np.zeros_like(source)
    digest = ChunkDigest(target.reshape(-1).data, PAGE, all_zero=True)
    for start in range(0, 300, 100):
        batch = stream.build_batch(
            source, np.arange(start, 300, dtype=np.int64), 1, compress=False, max_pages=70
        )
        stream.receive_batch(target, batch.frame, digest=digest)
    assert (target == source).all()
    reference = ChunkDigest(source.reshape(-1).copy().data, PAGE)
    assert digest._digest() == reference._digest()
