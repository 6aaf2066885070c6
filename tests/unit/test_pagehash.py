"""The native page digests equal xxhash's, and the Python fallback gives the same bytes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

from handler import pagehash

PAGE = 4096


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs on the native library and on the fallback."""
    if request.param == "native" and not pagehash._set_native(True):
        pytest.skip(f"{pagehash.LIBRARY} not built (make venv builds it)")
    if request.param == "python":
        pagehash._set_native(False)
    yield request.param
    pagehash._set_native(True)


def ram(pages: int, seed: int = 1, tail: int = 0) -> bytearray:
    """Random pages with zero pages here and there (runs and singles), plus a short tail."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, pages * PAGE + tail, dtype=np.uint8)
    for page in [0, 1, 2, 17, pages // 2, pages - 1]:
        data[page * PAGE : (page + 1) * PAGE] = 0
    return bytearray(data.tobytes())


def expected(buf: bytes | bytearray, page_size: int, pages: list[int]) -> bytes:
    return b"".join(
        xxhash.xxh3_128_digest(bytes(buf[p * page_size : (p + 1) * page_size])) for p in pages
    )


def test_ranges_equal_xxhash_with_zero_pages_and_a_short_tail(impl: str) -> None:
    pages = pagehash.STEP_PAGES * 3 + 5  # split across the pool's threads
    buf = ram(pages, tail=100)
    zero = pagehash.zero_digest(PAGE)
    every = list(range(pages + 1))  # the short tail is a page of its own
    out, hashed = pagehash.digest_range(memoryview(buf), PAGE, zero=zero)
    assert out.tobytes() == expected(buf, PAGE, every)
    assert hashed == (pages - 6) * PAGE + 100  # six zero pages skipped, the tail hashed
    part, _ = pagehash.digest_range(bytes(buf), PAGE, 16, 3)
    assert part.tobytes() == expected(buf, PAGE, [16, 17, 18])
    nozero, hashed = pagehash.digest_range(buf, PAGE)  # no zero check: every page hashed
    assert nozero.tobytes() == out.tobytes() and hashed == len(buf)


def test_a_short_zero_tail_is_hashed_not_taken_for_a_zero_page(impl: str) -> None:
    buf = bytearray(3 * PAGE + 8)
    out, hashed = pagehash.digest_range(buf, PAGE, zero=pagehash.zero_digest(PAGE))
    assert out.tobytes() == expected(buf, PAGE, [0, 1, 2, 3])
    assert hashed == 8
    assert out[3].tobytes() == xxhash.xxh3_128_digest(bytes(8)) != out[0].tobytes()


def test_scattered_indices_in_order_and_by_page(impl: str) -> None:
    pages = pagehash.STEP_PAGES * 2 + 1
    buf = ram(pages, seed=2, tail=1)
    idx = np.random.default_rng(3).choice(pages + 1, size=pagehash.STEP_PAGES * 2, replace=False)
    idx = np.concatenate([idx, [0, pages]]).astype(np.int64)  # a zero page, the tail
    zero = pagehash.zero_digest(PAGE)
    out, _ = pagehash.digest_indices(buf, PAGE, idx, zero=zero)
    assert out.tobytes() == expected(buf, PAGE, idx.tolist())
    table = np.zeros((pages + 1, pagehash.DIGEST_BYTES), dtype=np.uint8)
    pagehash.digest_indices(buf, PAGE, idx, zero=zero, out=table, by_page=True)
    assert table[idx].tobytes() == out.tobytes()
    untouched = np.setdiff1d(np.arange(pages + 1), idx)
    assert not table[untouched].any()


def test_any_page_size_and_the_output_in_place(impl: str) -> None:
    """The memvm digest's chunks may span several pages: a "page" is any size."""
    size = 3 * PAGE
    buf = ram(40, seed=4, tail=5)
    chunks = -(-len(buf) // size)
    table = np.zeros((chunks, 16), dtype=np.uint8)
    pagehash.digest_range(buf, size, 2, 5, zero=pagehash.zero_digest(size), out=table[2:7])
    assert table[2:7].tobytes() == expected(buf, size, [2, 3, 4, 5, 6])
    assert not table[:2].any() and not table[7:].any()
    out, _ = pagehash.digest_range(buf, 100)  # not a multiple of 8: no zero shortcut needed
    assert out.tobytes() == expected(buf, 100, list(range(-(-len(buf) // 100))))


def test_bad_arguments_are_refused_before_anything_is_hashed(impl: str) -> None:
    buf = bytearray(4 * PAGE)
    with pytest.raises(ValueError, match="outside the memory"):
        pagehash.digest_range(buf, PAGE, 3, 2)
    with pytest.raises(ValueError, match="out of bounds"):
        pagehash.digest_indices(buf, PAGE, np.array([4], dtype=np.int64))
    with pytest.raises(ValueError, match="out of bounds"):
        pagehash.digest_indices(buf, PAGE, np.array([-1], dtype=np.int64))
    with pytest.raises(ValueError, match="contiguous"):
        pagehash.digest_range(buf, PAGE, out=np.zeros((3, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="by_page"):
        pagehash.digest_indices(buf, PAGE, np.array([1], dtype=np.int64), by_page=True)
    with pytest.raises(ValueError, match="page size"):
        pagehash.digest_range(buf, 0)
    with pytest.raises(ValueError, match="16 bytes"):
        pagehash.digest_range(buf, PAGE, zero=bytes(8))
    assert pagehash.digest_range(buf, PAGE, 4, 0)[0].shape == (0, 16)


def test_a_missing_library_falls_back_and_says_why_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pagehash, "LIBRARY", pagehash.LIBRARY.with_name("absent.so"))
    pagehash._set_native(True)
    try:
        with caplog.at_level(logging.WARNING, logger=pagehash.__name__):
            buf = ram(8)
            for _ in range(3):
                out, _ = pagehash.digest_range(buf, PAGE, zero=pagehash.zero_digest(PAGE))
                assert out.tobytes() == expected(buf, PAGE, list(range(8)))
        warnings = [r for r in caplog.records if "absent.so" in r.getMessage()]
        assert len(warnings) == 1 and "Python" in warnings[0].getMessage()
        assert not pagehash.native_available()
    finally:
        monkeypatch.undo()
        pagehash._set_native(True)
