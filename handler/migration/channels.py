"""The memvm source's streams to the target: one ``Channel`` per Transfer stream.

A channel (a TargetStream, target_stream.py) owns its gRPC call and a reader task
(``read_loop``, run in the migration's TaskGroup) that routes the target's frames. When
the stream ends the reader records why (``error``) and wakes every waiter, who then
raises it: nobody waits on a dead stream.

``open_channels`` makes the connections (one TCP/TLS connection per stream) and does the
Hello/HelloAck exchange on each.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from handler import stream
from handler.migration.handoff import MigrationFailed
from handler.migration.source import rpc_problem
from handler.migration.target_stream import TargetStream
from vmferry import grpc_options, pki
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # s to reach the target and get HelloAck on every channel
LAST_ROUND = 2**32 - 1  # the acknowledgement a dead channel's waiters receive


class Channel(TargetStream):
    """One Transfer stream; its reader task (``read_loop``) routes the target's frames:
    credits to the flow-control counter, acknowledgements and control frames to their
    queues, post-copy page requests to ``requests``."""

    what = "migration channel"

    def __init__(self, channel_id: int, call: grpc.aio.StreamStreamCall) -> None:
        super().__init__(channel_id, call)
        self.credit = 0
        self.credit_changed = asyncio.Event()
        self.acks: asyncio.Queue[pb.RoundAck] = asyncio.Queue()
        self.control: asyncio.Queue[pb.TargetFrame] = asyncio.Queue()
        self.requests: asyncio.Queue[bytes] = asyncio.Queue()  # post-copy page faults

    async def read_loop(self) -> None:
        await self.read_frames(self._route)

    def _route(self, frame: pb.TargetFrame) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "credit":
            self.credit += frame.credit.bytes
            self.credit_changed.set()
        elif kind == "round_ack":
            self.acks.put_nowait(frame.round_ack)
        elif kind == "page_request":
            self.requests.put_nowait(frame.page_request.indices)
        else:
            self.control.put_nowait(frame)

    def _on_end(self) -> None:
        self.credit_changed.set()
        self.acks.put_nowait(pb.RoundAck(round=LAST_ROUND))
        self.control.put_nowait(pb.TargetFrame())
        self.requests.put_nowait(b"")

    async def write(self, frame: pb.SourceFrame | bytes) -> None:
        """Send a frame (or one build_batch serialized already). Post-copy: demand and
        background pages share channel 0 (write_lock)."""
        await self._write(frame if isinstance(frame, bytes) else frame.SerializeToString())

    async def wait_credit(self, needed: int) -> None:
        while self.credit < needed:
            self.check()
            self.credit_changed.clear()
            await self.credit_changed.wait()
        self.check()

    async def next_control(self, timeout: float) -> pb.TargetFrame:
        async with asyncio.timeout(timeout):
            frame = await self.control.get()
        self.check()
        return frame


def connect(
    address: str, target_node: str, tls: pki.TlsFiles | None, count: int
) -> list[grpc.aio.Channel]:
    """``count`` connections to the target. One TCP/TLS connection per stream (a local
    subchannel pool keeps gRPC from sharing one): streams multiplexed on one HTTP/2
    connection measured well below separate connections here. With TLS the target must
    prove it is the hand-off's target node: its certificate must name the node (the
    address may be a relay or an advertised address)."""
    options: list[tuple[str, int | str]] = [
        *grpc_options.channel_options(grpc_options.MIGRATION_KEEPALIVE_MS),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if tls is None:
        return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
    options.append(("grpc.ssl_target_name_override", target_node))
    return [
        grpc.aio.secure_channel(address, pki.channel_credentials(tls), options=options)
        for _ in range(count)
    ]


async def open_channels(
    connections: list[grpc.aio.Channel], tg: asyncio.TaskGroup, hello: pb.Hello, address: str
) -> list[Channel]:
    """A Transfer stream on each connection, Hello (``hello`` with each channel's id) and
    HelloAck; each channel's reader runs in ``tg``. MigrationFailed when the target
    refuses or does not answer within CONNECT_TIMEOUT."""
    channels: list[Channel] = []
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            for cid, conn in enumerate(connections):
                ch = Channel(cid, stream.open_transfer(conn))
                channels.append(ch)
                mine = pb.Hello()
                mine.CopyFrom(hello)
                mine.channel_id = cid
                await ch.call.write(pb.SourceFrame(hello=mine).SerializeToString())
                first = await ch.call.read()
                if first is grpc.aio.EOF or first.WhichOneof("frame") != "hello_ack":
                    raise MigrationFailed(f"target did not accept migration channel {cid}")
                tg.create_task(ch.read_loop())
    except grpc.aio.AioRpcError as e:
        raise MigrationFailed(
            f"cannot open the migration stream to {address}: {rpc_problem(e)}"
        ) from None
    except TimeoutError:
        raise MigrationFailed(
            f"the target {address} did not answer within {CONNECT_TIMEOUT:.0f}s"
        ) from None
    return channels
