"""The QEMU tunnel's data path without QEMU or gRPC: the hand-made Data frame encoding
(byte for byte what protobuf would write) and the source's upstream pump, which must
put every QEMU write that arrived while a frame was on its way into the next frame."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from handler.migration import tunnel
from handler.migration.qemu_channel import TunnelChannel
from vmferry.rpc import tunnel_pb2 as pb

KiB = 1 << 10
MiB = 1 << 20


@pytest.mark.parametrize("size", [1, 115, 116, 127, 128, 16379, 16380, 16384, MiB, 3 * MiB])
def test_encode_data_is_what_protobuf_serializes(size: int) -> None:
    payload = os.urandom(size)
    encoded = tunnel.encode_data(payload)
    assert encoded == pb.TunnelSourceFrame(data=pb.Data(data=payload)).SerializeToString()
    assert pb.TunnelSourceFrame.FromString(encoded).data.data == payload


def test_an_empty_payload_decodes_as_empty() -> None:
    assert pb.TunnelSourceFrame.FromString(tunnel.encode_data(b"")).WhichOneof("frame") == "data"


def test_encode_data_takes_memoryviews_and_bytearrays() -> None:
    payload = bytearray(b"x" * 300)
    assert tunnel.encode_data(memoryview(payload)[:200]) == tunnel.encode_data(b"x" * 200)
    assert tunnel.encode_data(payload) == tunnel.encode_data(bytes(payload))


def test_the_serializer_passes_encoded_frames_and_serializes_messages() -> None:
    raw = tunnel.encode_data(b"abc")
    assert tunnel.serialize_source_frame(raw) is raw
    frame = pb.TunnelSourceFrame(data_end=pb.DataEnd())
    assert tunnel.serialize_source_frame(frame) == frame.SerializeToString()


class FakeCall:
    """A Tunnel.Migrate call whose writes wait until the test opens it."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.opened = asyncio.Event()
        self.waiting = asyncio.Event()

    async def write(self, frame: Any) -> None:
        self.waiting.set()
        await self.opened.wait()
        self.written.append(frame)

    def frames(self) -> list[pb.TunnelSourceFrame]:
        return [
            pb.TunnelSourceFrame.FromString(tunnel.serialize_source_frame(f)) for f in self.written
        ]


async def _until(condition: Any) -> None:
    while not condition():  # noqa: ASYNC110 - polls a counter the pump task updates
        await asyncio.sleep(0)


async def _pump(writes: list[bytes], stalled_writes: int) -> tuple[FakeCall, TunnelChannel]:
    """QEMU writes ``writes[:stalled_writes]`` while the first frame is held; then the
    rest one at a time, each once the pump sent all before it."""
    call = FakeCall()
    ch = TunnelChannel(0, call)
    reader = asyncio.StreamReader(limit=tunnel.READ_LIMIT)
    reader.feed_data(writes[0])
    task = asyncio.create_task(ch.upstream(reader))
    await call.waiting.wait()  # the first frame is on its way
    for w in writes[1:stalled_writes]:
        reader.feed_data(w)
    call.opened.set()
    fed = sum(len(w) for w in writes[:stalled_writes])
    for w in writes[stalled_writes:]:
        await _until(lambda: ch.sent == fed)  # noqa: B023 - awaited right here
        reader.feed_data(w)
        fed += len(w)
    reader.feed_eof()
    await task
    return call, ch


def test_writes_that_arrive_while_a_frame_is_sent_travel_in_one_frame() -> None:
    writes = [os.urandom(64 * KiB) for _ in range(9)]

    async def main() -> tuple[FakeCall, TunnelChannel]:
        return await _pump(writes, stalled_writes=9)

    call, ch = asyncio.run(main())
    frames = call.frames()
    kinds = [f.WhichOneof("frame") for f in frames]
    assert kinds == ["data", "data", "data_end"]
    # the first write alone, then the eight that came meanwhile in one frame
    assert [len(f.data.data) for f in frames[:2]] == [64 * KiB, 8 * 64 * KiB]
    assert b"".join(f.data.data for f in frames[:2]) == b"".join(writes)
    assert ch.sent == 9 * 64 * KiB and ch.upstream_done.is_set()


def test_a_frame_never_exceeds_the_frame_size() -> None:
    writes = [os.urandom(256 * KiB) for _ in range(10)]

    async def main() -> tuple[FakeCall, TunnelChannel]:
        return await _pump(writes, stalled_writes=10)

    call, _ = asyncio.run(main())
    frames = [f for f in call.frames() if f.WhichOneof("frame") == "data"]
    assert max(len(f.data.data) for f in frames) == tunnel.DATA_FRAME_BYTES
    assert len(frames) == 1 + (9 * 256 * KiB + tunnel.DATA_FRAME_BYTES - 1) // (
        tunnel.DATA_FRAME_BYTES
    )
    assert b"".join(f.data.data for f in frames) == b"".join(writes)


def test_a_fast_pipe_sends_each_write_as_it_comes() -> None:
    writes = [os.urandom(100 * KiB) for _ in range(4)]

    async def main() -> tuple[FakeCall, TunnelChannel]:
        return await _pump(writes, stalled_writes=1)

    call, _ = asyncio.run(main())
    frames = [f for f in call.frames() if f.WhichOneof("frame") == "data"]
    assert [len(f.data.data) for f in frames] == [100 * KiB] * 4


@pytest.mark.parametrize("size", [1, 127, 128, 16384, MiB])
def test_the_target_reads_a_data_frame_in_place(size: int) -> None:
    payload = os.urandom(size)
    raw = tunnel.encode_data(payload)
    chunk = tunnel.decode_source_frame(raw)
    assert isinstance(chunk, tunnel.DataChunk)
    assert chunk.payload == payload and chunk.payload.obj is raw  # a view, not a copy
    assert tunnel.frame_kind(chunk) == "data"


def test_a_data_frame_in_another_layout_is_a_data_chunk_too() -> None:
    # protobuf writes an empty Data as an empty message; a field after the payload
    for message in (
        pb.TunnelSourceFrame(data=pb.Data()),
        pb.TunnelSourceFrame(data=pb.Data(data=b"abc")),
    ):
        raw = message.SerializeToString()
        for variant in (raw, raw[:1] + bytes([raw[1] + 2]) + raw[2:] + b"\x0a\x00"):
            chunk = tunnel.decode_source_frame(variant)
            assert isinstance(chunk, tunnel.DataChunk)
            assert bytes(chunk.payload) == message.data.data or variant != raw


def test_other_frames_decode_as_messages() -> None:
    frame = pb.TunnelSourceFrame(completed=pb.Completed(qemu_downtime_ms=7))
    decoded = tunnel.decode_source_frame(frame.SerializeToString())
    assert decoded == frame and tunnel.frame_kind(decoded) == "completed"


def test_a_cut_data_frame_is_a_decode_error() -> None:
    from google.protobuf.message import DecodeError

    raw = tunnel.encode_data(b"x" * 300)
    with pytest.raises(DecodeError):
        tunnel.decode_source_frame(raw[:-1])


def test_the_writer_toward_qemu_takes_whole_frames() -> None:
    async def main() -> tuple[int, int]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _, writer = await asyncio.open_unix_connection(sock=a)
        before = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        tunnel.widen_writer(writer)
        after = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        high = writer.transport.get_write_buffer_limits()[1]
        writer.close()
        b.close()
        assert after >= before
        return after, high

    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    sndbuf, high = asyncio.run(main())
    assert sndbuf >= min(tunnel.SOCKET_SEND_BUFFER, wmem_max)  # Linux doubles what is set
    assert high == tunnel.WRITE_HIGH_WATER
