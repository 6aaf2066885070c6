"""The wire format: page batches round-trip, and malformed frames are refused before
they touch memory."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from handler import pagebatch, pagehash, stream
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
            written = stream.apply_batch(target, batch.page_batch())
            assert sorted(written.tolist()) == part[off : off + stream.BATCH_PAGES].tolist()
    assert np.array_equal(source, target)
    batch = stream.build_batch(source, indices, 0, compress=False)
    assert len(batch.page_batch().zero_indices) == 4 * 100
    assert len(batch.page_batch().payload) == 200 * PAGE
    compressed = stream.build_batch(source, indices, 0, compress=True)
    assert (
        compressed.page_batch().codec == pb.CODEC_ZSTD and compressed.wire_bytes < batch.wire_bytes
    )


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
    # The same frame as the target receives it, read in place.
    with pytest.raises(stream.ProtocolError, match=message):
        stream.receive_batch(target, pb.SourceFrame(pages=batch).SerializeToString())
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
            pb.Hello(
                protocol_version=stream.PROTOCOL_VERSION,
                channel_count=0,
                memory_bytes=8 * PAGE,
                page_size=PAGE,
            ),
            "channel_count 0",
        ),
        (
            pb.Hello(
                protocol_version=stream.PROTOCOL_VERSION,
                channel_count=2,
                channel_id=2,
                memory_bytes=8 * PAGE,
                page_size=PAGE,
            ),
            "channel_id 2",
        ),
        (
            pb.Hello(
                protocol_version=stream.PROTOCOL_VERSION,
                channel_count=1,
                memory_bytes=16 * PAGE,
                page_size=PAGE,
            ),
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
    written = stream.apply_batch(target, batch.page_batch(), present)
    assert sorted(written.tolist()) == [i for i in range(16) if i not in (1, 2, 5)]
    assert (target[[1, 2, 5]] == 7).all()
    others = [i for i in range(16) if i not in (1, 2, 5)]
    assert np.array_equal(target[others], source[others])


def test_round_zero_into_fresh_memory_leaves_zero_pages_untouched() -> None:
    source = ram(9)  # pages 0, 3, 6 are zero
    target = np.zeros_like(source)
    batch = stream.build_batch(source, np.arange(9, dtype=np.int64), 0, compress=False)
    written = stream.apply_batch(target, batch.page_batch(), fresh_zero=True)
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


def test_pre_serialized_frame_is_the_protobuf_message() -> None:
    """build_batch writes the SourceFrame bytes itself; protobuf must read the same fields."""
    source = ram(40)
    indices = np.arange(3, 40, dtype=np.int64)
    for round_no, compress in ((0, False), (7, True), (300, False)):
        batch = stream.build_batch(source, indices, round_no, compress=compress)
        assert stream.is_pages_frame(batch.frame)
        parsed = stream.parse_frame(batch.frame)
        assert parsed.WhichOneof("frame") == "pages"
        pages = parsed.pages
        nonzero = [i for i in indices.tolist() if source[i].any()]
        assert pages.round == round_no
        assert np.frombuffer(pages.indices, "<u4").tolist() == nonzero
        assert len(pages.zero_indices) == 4 * (len(indices) - len(nonzero))
        assert pages.raw_size == len(nonzero) * PAGE
        assert len(pages.payload) == batch.payload_bytes
        assert batch.wire_bytes == batch.payload_bytes + 4 * len(indices)
        # what protobuf itself writes for these fields parses to the same message
        assert pb.SourceFrame.FromString(pb.SourceFrame(pages=pages).SerializeToString()) == parsed


def test_all_zero_batch_has_no_payload() -> None:
    batch = stream.build_batch(np.zeros((8, PAGE), np.uint8), np.arange(8), 0, compress=True)
    parsed = batch.page_batch()
    assert parsed.payload == b"" and parsed.indices == b"" and parsed.raw_size == 0
    assert np.frombuffer(parsed.zero_indices, "<u4").tolist() == list(range(8))
    target = np.full((8, PAGE), 9, np.uint8)
    written, round_no, payload_bytes = stream.receive_batch(target, batch.frame)
    assert sorted(written.tolist()) == list(range(8)) and not target.any()
    assert (round_no, payload_bytes) == (0, 0)


def test_compression_is_tried_on_a_sample_and_kept_only_where_it_pays() -> None:
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, size=(64, PAGE), dtype=np.uint8)
    text = np.frombuffer((b"the quick brown fox " * (64 * PAGE // 20 + 1))[: 64 * PAGE], np.uint8)
    text = text.reshape(64, PAGE).copy()
    idx = np.arange(64, dtype=np.int64)
    assert stream.build_batch(noise, idx, 1, compress=True).page_batch().codec == pb.CODEC_RAW
    packed = stream.build_batch(text, idx, 1, compress=True)
    assert packed.page_batch().codec == pb.CODEC_ZSTD
    assert packed.payload_bytes < 0.1 * text.nbytes
    target = np.zeros_like(text)
    _, _, payload_bytes = stream.receive_batch(target, packed.frame)
    assert payload_bytes == packed.payload_bytes and np.array_equal(target, text)


@pytest.mark.parametrize("raw", [b"\x12\xff\xff\xff\xff\x0f", b"\x0a", b"\xff\xff\xff"])
def test_malformed_frame_bytes_are_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(stream.ProtocolError, match="malformed frame"):
        stream.parse_frame(raw)
    target = np.zeros((8, PAGE), dtype=np.uint8)
    if stream.is_pages_frame(raw):
        with pytest.raises(stream.ProtocolError, match="malformed frame"):
            stream.receive_batch(target, raw)
    assert not target.any()


def test_receive_batch_writes_zero_pages_unless_the_memory_is_fresh() -> None:
    source = ram(9)
    for round_no, fresh, dirty_kept in ((0, True, True), (1, True, False), (0, False, False)):
        target = np.full_like(source, 0xEE)
        batch = stream.build_batch(source, np.arange(9, dtype=np.int64), round_no, compress=False)
        stream.receive_batch(target, batch.frame, fresh_zero=fresh)
        assert (target[0] == 0xEE).all() == dirty_kept  # page 0 is a zero page
        assert np.array_equal(target[1], source[1])


def _fields(view: stream.PagesView) -> tuple[object, ...]:
    return (
        view.round,
        bytes(view.indices),
        bytes(view.payload),
        view.codec,
        bytes(view.zero_indices),
        view.raw_size,
    )


def _pb_fields(p: pb.PageBatch) -> tuple[object, ...]:
    return (p.round, p.indices, p.payload, p.codec, p.zero_indices, p.raw_size)


def test_pages_frames_are_read_in_place_as_protobuf_reads_them() -> None:
    source = ram(64)
    batch = stream.build_batch(source, np.arange(5, 64, dtype=np.int64), 3, compress=True)
    view = stream.read_pages_frame(batch.frame)
    assert isinstance(view.payload, memoryview) and view.payload.obj is batch.frame  # no copy
    assert _fields(view) == _pb_fields(batch.page_batch())
    # protobuf's own encoding (other field order) and unknown fields: protobuf's reading
    canonical = pb.SourceFrame(pages=batch.page_batch()).SerializeToString()
    assert _fields(stream.read_pages_frame(canonical)) == _pb_fields(batch.page_batch())
    inner = pb.SourceFrame.FromString(batch.frame).pages.SerializeToString() + b"\x38\x05"
    framed = b"\x12" + stream._varint(len(inner)) + inner  # field 7: unknown to PageBatch
    assert _fields(stream.read_pages_frame(framed)) == _pb_fields(batch.page_batch())


@pytest.mark.parametrize(
    "raw",
    [
        b"\x12\x10\x08\x01",  # length beyond the frame
        b"\x12\x03\x1a\x05\x00",  # payload beyond the batch
        b"\x12\x02\x08",  # truncated varint
        pb.SourceFrame(round_end=pb.RoundEnd(round=1)).SerializeToString(),
    ],
)
def test_malformed_or_foreign_frames_are_not_read_as_pages(raw: bytes) -> None:
    with pytest.raises(stream.ProtocolError):
        stream.receive_batch(np.zeros((8, PAGE), dtype=np.uint8), raw)


@pytest.mark.parametrize("lead", [0, 16])
def test_a_batch_covers_a_prefix_with_at_most_max_pages_of_data(lead: int) -> None:
    """Zero pages are not counted against the batch: a sparse span travels in one frame;
    a dense one stops after max_pages non-zero pages (``lead`` non-zero leading pages take
    the dense path). Zero checks in place and after a gather agree."""
    source = np.zeros((5000, PAGE), dtype=np.uint8)
    dense = [*range(lead), 3 + lead, 4 + lead, 5 + lead, 900, 901, 4000, 4999]
    source[dense, 7] = 1
    every = np.arange(5000, dtype=np.int64)
    batches = []
    offset = 0
    while offset < 5000:
        batch = stream.build_batch(source, every[offset:], 0, compress=False, max_pages=4)
        assert 0 < batch.nonzero <= 4 or batch.pages == 5000 - offset
        batches.append(batch)
        offset += batch.pages
    if not lead:
        assert batches[0].pages == 901 and batches[0].nonzero == 4  # pages 0..900
        parsed = batches[0].page_batch()
        assert np.frombuffer(parsed.indices, "<u4").tolist() == [3, 4, 5, 900]
        assert len(parsed.zero_indices) == 4 * (901 - 4)
    target = np.zeros_like(source)
    for b in batches:
        stream.receive_batch(target, b.frame)
    assert np.array_equal(source, target)
    scattered = every[::7]  # 715 runs: gathered, not checked in place
    expect = [i for i in scattered.tolist() if i in dense]
    assert int(pagehash.nonzero_pages(source, scattered).sum()) == len(expect)
    assert pagehash.nonzero_pages(source, every).nonzero()[0].tolist() == dense


@pytest.mark.parametrize("zero_every", [1, 2, 50])  # mostly zero pages, half, a few
def test_nonzero_rows_finds_data_anywhere_in_a_page(zero_every: int) -> None:
    """Only a page's first word is read when it holds data; a page whose data starts
    later (or ends in its last byte) still counts, an all-zero page does not."""
    pages = np.zeros((200, PAGE), dtype=np.uint8)
    rng = np.random.default_rng(zero_every)
    for i in range(200):
        if i % zero_every:
            continue
        kind = i % 3
        if kind == 0:
            pages[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        elif kind == 1:
            pages[i, PAGE - 1] = 7  # data only in the last byte
        # kind 2: stays all zero
    expected = pages.any(axis=1)
    assert (pagehash.nonzero_rows(pages.view(np.uint64)) == expected).all()
    idx = np.arange(0, 200, 3, dtype=np.int64)
    assert (pagehash.nonzero_pages(pages, idx) == expected[idx]).all()


def test_nonzero_rows_with_few_pages_to_look_into() -> None:
    """Memory full of data with a few pages whose first word is zero: only those are
    read whole (gathered), with the right answer for each."""
    pages = np.random.default_rng(3).integers(0, 256, (300, PAGE), dtype=np.uint8)
    pages[10] = 0  # all zero
    pages[20, :8] = 0  # the first word zero, data after it
    pages[30, : PAGE - 1] = 0  # only the last byte left
    pages[30, PAGE - 1] = 1
    got = pagehash.nonzero_rows(pages.view(np.uint64))
    assert got.tolist() == pages.any(axis=1).tolist()
    assert not got[10] and got[20] and got[30] and int(got.sum()) == 299


def test_round_zero_populates_only_the_pages_it_writes(tmp_path: Path) -> None:
    """Fresh target RAM (a sparse shared-memory file): long runs of a round-0 batch's data
    pages are allocated in one call each, zero pages are not, and the content is right."""
    path = Path("/dev/shm") / f"vmferry-test-{tmp_path.name}"
    pages_total = 4096
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, pages_total * PAGE)
        with mmap.mmap(fd, pages_total * PAGE, mmap.MAP_SHARED) as mm:
            target = np.frombuffer(mm, dtype=np.uint8).reshape(pages_total, PAGE)
            source = np.zeros((pages_total, PAGE), dtype=np.uint8)
            rng = np.random.default_rng(11)
            data = [*range(100, 400), *range(1000, 1010), 2000]  # a long run, a short, one
            source[data] = rng.integers(1, 256, (len(data), PAGE), dtype=np.uint8)
            indices = np.arange(64, 2100, dtype=np.int64)  # data pages among zero pages
            offset = 0
            while offset < len(indices):
                batch = stream.build_batch(source, indices[offset:], 0, compress=False)
                stream.receive_batch(target, batch.frame, fresh_zero=True)
                offset += batch.pages
            # Before reading it back: a read of a tmpfs hole through the mapping allocates.
            assert os.fstat(fd).st_blocks * 512 == len(data) * PAGE  # zero pages: none
            assert (target == source).all()
            del target
    finally:
        os.close(fd)
        path.unlink()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("fresh", [True, False])
def test_long_runs_go_through_the_ram_file_and_the_rest_through_the_mapping(
    tmp_path: Path, fresh: bool, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """receive_batch with the RAM file: runs of PWRITE_MIN_RUN consecutive pages are
    written with pwrite(), shorter ones through the mapping; both land in the file the
    mapping shows, and nothing else changes. (The native pass's pwrite() calls are not
    seen by the Python patch: its contents are checked.)"""
    if pagebatch._set_native(native) != native:
        pagebatch._set_native(True)
        pytest.skip("the native library is not built")
    try:
        _long_runs(tmp_path, fresh, native, monkeypatch)
    finally:
        pagebatch._set_native(True)


def _long_runs(tmp_path: Path, fresh: bool, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    count = 200
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(count * PAGE)
    source = np.random.default_rng(4).integers(1, 256, size=(count, PAGE), dtype=np.uint8)
    long_run = np.arange(20, 20 + stream.PWRITE_MIN_RUN + 5)
    short_run = np.arange(100, 100 + stream.PWRITE_MIN_RUN - 1)
    indices = np.concatenate(([3, 7], long_run, short_run, [150], np.arange(160, 200)))
    pwrites: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        pwrites.append((offset // PAGE, len(data) // PAGE))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, count * PAGE) as mm:
            target = np.frombuffer(mm, dtype=np.uint8).reshape(count, PAGE)
            if not fresh:
                target[:] = 0x11
            before = target.copy()
            batch = stream.build_batch(source, indices.astype(np.int64), 1, compress=False)
            written, _, _ = stream.receive_batch(target, batch.frame, ram_file=path)
            assert sorted(written.tolist()) == indices.tolist()
            expected = before
            expected[indices] = source[indices]
            same = np.array_equal(target, expected)
            del target
            assert same
            assert pwrites == ([] if native else [(20, len(long_run)), (160, 40)])
    finally:
        os.close(fd)
    on_disk = np.fromfile(path, dtype=np.uint8).reshape(count, PAGE)
    assert np.array_equal(on_disk, expected)


def test_small_batches_are_uncompressed_and_few_pages_zero_pages_included() -> None:
    """What the target applies on its event loop: no decompression, at most max_pages
    page copies (a batch of zero pages is indices only but still writes its pages)."""
    source = ram(600)
    text = np.full((600, PAGE), ord("a"), dtype=np.uint8)
    small = stream.build_batch(source, np.arange(1, 200, dtype=np.int64), 1, compress=False)
    assert stream.is_small_batch(small.frame, 256, PAGE)
    large = stream.build_batch(source, np.arange(0, 600, dtype=np.int64), 1, compress=False)
    assert not stream.is_small_batch(large.frame, 256, PAGE)
    packed = stream.build_batch(text, np.arange(0, 100, dtype=np.int64), 1, compress=True)
    assert packed.payload_bytes < 100 * PAGE  # compressed: not small, whatever its size
    assert not stream.is_small_batch(packed.frame, 256, PAGE)
    zeros = stream.build_batch(
        np.zeros_like(source), np.arange(600, dtype=np.int64), 1, compress=False
    )
    assert zeros.nonzero == 0 and not stream.is_small_batch(zeros.frame, 256, PAGE)
    assert not stream.is_small_batch(b"\x12\x05\x0a", 256, PAGE)  # malformed: not inline
