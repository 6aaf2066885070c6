"""The wire format: page batches round-trip, and malformed frames are refused before
they touch memory."""

from __future__ import annotations

import numpy as np
import pytest

from handler import stream
from vmferry.rpc import migration_pb2 as pb

PAGE = 4096


def ram(pages: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(pages, PAGE), dtype=np.uint8)
    data[::3] = 0  # every third page is all zeros
    data[1::3, : PAGE // 2] = ord("a")  # compressible halves
    return data


@pytest.mark.parametrize("compress", [False, True])
def test_batches_round_trip_and_zero_pages_travel_as_indices(compress: bool) -> None:
    source = ram(300)
    target = np.full_like(source, 0xEE)
    indices = np.arange(300, dtype=np.int64)
    for part in stream.split_by_channel(indices, 3):
        for off in range(0, len(part), stream.BATCH_PAGES):
            batch = stream.build_batch(
                source, part[off : off + stream.BATCH_PAGES], 0, compress=compress
            )
            written = stream.apply_batch(target, batch.frame)
            assert sorted(written.tolist()) == part[off : off + stream.BATCH_PAGES].tolist()
    assert np.array_equal(source, target)
    batch = stream.build_batch(source, indices, 0, compress=False)
    assert len(batch.frame.zero_indices) == 4 * 100
    assert len(batch.frame.payload) == 200 * PAGE
    compressed = stream.build_batch(source, indices, 0, compress=True)
    assert compressed.frame.codec == pb.CODEC_ZSTD and compressed.wire_bytes < batch.wire_bytes


def test_split_by_channel_keeps_a_page_on_one_channel() -> None:
    indices = np.arange(1000, dtype=np.int64)
    parts = stream.split_by_channel(indices, 4)
    assert sorted(np.concatenate(parts).tolist()) == indices.tolist()
    for c, part in enumerate(parts):
        assert all((i // stream.CHUNK_PAGES) % 4 == c for i in part.tolist())


def frame(**kw: object) -> pb.PageBatch:
    return pb.PageBatch(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            frame(
                indices=np.array([10], "<u4").tobytes(),
                payload=b"x" * PAGE,
                codec=pb.CODEC_RAW,
                raw_size=PAGE,
            ),
            "out of bounds",
        ),
        (frame(indices=b"\x01\x00\x00", payload=b"", codec=pb.CODEC_RAW), "not a multiple of 4"),
        (
            frame(
                indices=np.array([1], "<u4").tobytes(),
                payload=b"x" * 10,
                codec=pb.CODEC_RAW,
                raw_size=PAGE,
            ),
            "payload is 10 bytes",
        ),
        (
            frame(
                indices=np.array([1], "<u4").tobytes(),
                payload=b"x" * PAGE,
                codec=pb.CODEC_RAW,
                raw_size=7,
            ),
            "raw_size 7",
        ),
        (
            frame(indices=np.array([1], "<u4").tobytes(), payload=b"x" * PAGE, raw_size=PAGE),
            "unknown codec 0",
        ),
        (
            frame(
                indices=np.array([1], "<u4").tobytes(),
                payload=b"not zlib",
                codec=pb.CODEC_ZLIB,
                raw_size=PAGE,
            ),
            "corrupt zlib",
        ),
        (frame(zero_indices=np.array([99], "<u4").tobytes(), codec=pb.CODEC_RAW), "zero_indices"),
    ],
)
def test_malformed_batches_are_refused_and_memory_is_untouched(
    batch: pb.PageBatch, message: str
) -> None:
    target = np.zeros((8, PAGE), dtype=np.uint8)
    with pytest.raises(stream.ProtocolError, match=message):
        stream.apply_batch(target, batch)
    assert not target.any()


def test_zlib_bomb_is_refused() -> None:
    import zlib

    bomb = zlib.compress(b"\0" * (PAGE * 64))
    batch = frame(
        indices=np.array([1], "<u4").tobytes(), payload=bomb, codec=pb.CODEC_ZLIB, raw_size=PAGE
    )
    with pytest.raises(stream.ProtocolError, match="larger than raw_size"):
        stream.apply_batch(np.zeros((8, PAGE), dtype=np.uint8), batch)


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (
            pb.Hello(protocol_version=99, channel_count=1, memory_bytes=8 * PAGE, page_size=PAGE),
            "protocol version 99",
        ),
        (
            pb.Hello(protocol_version=1, channel_count=0, memory_bytes=8 * PAGE, page_size=PAGE),
            "channel_count 0",
        ),
        (
            pb.Hello(
                protocol_version=1,
                channel_count=2,
                channel_id=2,
                memory_bytes=8 * PAGE,
                page_size=PAGE,
            ),
            "channel_id 2",
        ),
        (
            pb.Hello(protocol_version=1, channel_count=1, memory_bytes=16 * PAGE, page_size=PAGE),
            "geometry mismatch",
        ),
    ],
)
def test_bad_hello_is_refused(hello: pb.Hello, message: str) -> None:
    with pytest.raises(stream.ProtocolError, match=message):
        stream.check_hello(hello, memory_bytes=8 * PAGE, page_size=PAGE)


def test_post_copy_never_overwrites_a_present_page() -> None:
    source = ram(16)
    target = np.zeros_like(source)
    present = np.zeros(16, dtype=np.uint8)
    present[[1, 2, 5]] = 1
    target[[1, 2, 5]] = 7  # the guest already wrote these on the target
    batch = stream.build_batch(source, np.arange(16, dtype=np.int64), 0, compress=False)
    written = stream.apply_batch(target, batch.frame, present)
    assert sorted(written.tolist()) == [i for i in range(16) if i not in (1, 2, 5)]
    assert (target[[1, 2, 5]] == 7).all()
    others = [i for i in range(16) if i not in (1, 2, 5)]
    assert np.array_equal(target[others], source[others])


def test_round_zero_into_fresh_memory_leaves_zero_pages_untouched() -> None:
    source = ram(9)  # pages 0, 3, 6 are zero
    target = np.zeros_like(source)
    batch = stream.build_batch(source, np.arange(9, dtype=np.int64), 0, compress=False)
    written = stream.apply_batch(target, batch.frame, fresh_zero=True)
    assert sorted(written.tolist()) == [1, 2, 4, 5, 7, 8]
    assert np.array_equal(target, source)


def test_zstd_payloads_are_bounds_checked() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"a" * (PAGE * 64))
    batch = frame(
        indices=np.array([1], "<u4").tobytes(), payload=bomb, codec=pb.CODEC_ZSTD, raw_size=PAGE
    )
    with pytest.raises(stream.ProtocolError):
        stream.apply_batch(np.zeros((8, PAGE), dtype=np.uint8), batch)
    junk = frame(
        indices=np.array([1], "<u4").tobytes(), payload=b"junk", codec=pb.CODEC_ZSTD, raw_size=PAGE
    )
    with pytest.raises(stream.ProtocolError, match="zstd"):
        stream.apply_batch(np.zeros((8, PAGE), dtype=np.uint8), junk)
