"""One QEMU migration connection on the source, tunnelled through one gRPC stream.

QEMU connects to the source handler's unix socket once per migration channel (one, or
one plus the multifd channels); each connection becomes a ``TunnelChannel``: ``upstream``
pumps QEMU's bytes to the target as Data frames, ``downstream`` (the stream's reader)
writes the target QEMU's return path back to QEMU and queues every other frame on
``control`` (None once the stream ended; ``error`` says why).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from handler.migration.handoff import MigrationFailed
from handler.migration.target_stream import TargetStream
from handler.migration.tunnel import DATA_FRAME_BYTES, encode_data
from vmferry.rpc import tunnel_pb2 as pb


class TunnelChannel(TargetStream):
    what = "tunnel channel"

    def __init__(self, channel_id: int, call: grpc.aio.StreamStreamCall) -> None:
        super().__init__(channel_id, call)
        self.control: asyncio.Queue[pb.TunnelTargetFrame | None] = asyncio.Queue()
        self.sent = 0
        self.received = 0
        self.upstream_done = asyncio.Event()  # QEMU closed its side; DataEnd sent

    async def write(self, frame: pb.TunnelSourceFrame | bytes) -> None:
        """Write a frame (or an ``encode_data`` frame); the call must come from
        ``tunnel.open_call``."""
        await self._write(frame)

    async def upstream(self, reader: asyncio.StreamReader) -> None:
        """QEMU → target: each read takes all QEMU wrote meanwhile (up to a frame), so
        a slow stream carries fewer, larger frames (the reader's limit: READ_LIMIT)."""
        while True:
            data = await reader.read(DATA_FRAME_BYTES)
            if not data:
                break
            await self.write(encode_data(data))
            self.sent += len(data)
        await self.write(pb.TunnelSourceFrame(data_end=pb.DataEnd()))
        self.upstream_done.set()

    async def downstream(self, writer: asyncio.StreamWriter) -> None:
        """Target → QEMU (the return path); other frames go to ``control``."""

        async def route(frame: pb.TunnelTargetFrame) -> None:
            kind = frame.WhichOneof("frame")
            if kind == "data":
                data = frame.data.data  # every access makes a copy
                self.received += len(data)
                if not writer.is_closing():
                    writer.write(data)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
            elif kind == "data_end":
                if writer.can_write_eof() and not writer.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
            elif kind == "failure":
                raise MigrationFailed(f"the target failed: {frame.failure.reason}")
            else:
                self.control.put_nowait(frame)

        await self.read_frames(route)

    def _on_end(self) -> None:
        self.control.put_nowait(None)

    async def next_control(self, timeout: float, what: str) -> pb.TunnelTargetFrame:
        try:
            async with asyncio.timeout(timeout):
                frame = await self.control.get()
        except TimeoutError:
            raise MigrationFailed(f"the target sent no {what} within {timeout:.0f}s") from None
        if frame is None:
            self.control.put_nowait(None)
            raise self.error or MigrationFailed(f"tunnel channel {self.id} closed")
        return frame
