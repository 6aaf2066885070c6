"""The memvm source's streams to the target: one ``Channel`` per Transfer stream.

A channel (a TargetStream, target_stream.py) owns its gRPC call and a reader task
(``read_loop``, run in the migration's TaskGroup) that routes the target's frames. When
the stream ends the reader records why (``error``) and wakes every waiter, who then
raises it: nobody waits on a dead stream.

``open_channels`` makes the connections (one TCP/TLS connection per stream) and does the
Hello/HelloAck exchange on each.

``Reconnect`` rides out a short drop of the migration network in pre-copy: it reopens
every channel (Hello.resume) with backoff until progress is due again (progressTimeout
from the last progress), then fails with a sentence that says how long the network to
the target was unreachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from handler import stream
from handler.migration.handoff import MigrationFailed
from handler.migration.source import is_network_failure, rpc_problem
from handler.migration.target_stream import StreamLost, TargetStream
from vmferry import grpc_options
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # s to reach the target and get HelloAck on every channel
LAST_ROUND = 2**32 - 1  # the acknowledgement a dead channel's waiters receive
RECONNECT_DELAY = 0.5  # s before the first reconnect after a drop, doubled each attempt
RECONNECT_MAX_DELAY = 2.0  # s, the longest wait between two reconnects


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

    def close(self) -> None:
        """End the stream (the reader records why)."""
        self.call.cancel()

    async def next_control(self, timeout: float) -> pb.TargetFrame:
        async with asyncio.timeout(timeout):
            frame = await self.control.get()
        self.check()
        return frame


def dial(
    address: str,
    target_node: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, int | str]],
) -> grpc.aio.Channel:
    """One connection to a hand-off's target, for both drivers. ``credentials`` come from
    ``peers.dial_credentials`` (which CA the source trusts: this cluster's, or only the
    peer cluster's across clusters; None: plain text, tests only). With TLS the target
    must prove it is the hand-off's target node: its certificate must name the node (the
    address may be a relay or an advertised address)."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(
        address, credentials, options=[*options, ("grpc.ssl_target_name_override", target_node)]
    )


def connect(
    address: str, target_node: str, credentials: grpc.ChannelCredentials | None, count: int
) -> list[grpc.aio.Channel]:
    """``count`` connections to the target (``dial``). One TCP/TLS connection per stream
    (a local subchannel pool keeps gRPC from sharing one): streams multiplexed on one
    HTTP/2 connection measured well below separate connections here."""
    options: list[tuple[str, int | str]] = [
        *grpc_options.channel_options(grpc_options.MIGRATION_KEEPALIVE_MS),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return [dial(address, target_node, credentials, options) for _ in range(count)]


def hello_for(hello: pb.Hello, channel_id: int) -> pb.Hello:
    """``hello`` as channel ``channel_id`` sends it."""
    mine = pb.Hello()
    mine.CopyFrom(hello)
    mine.channel_id = channel_id
    return mine


async def open_channels(
    connections: list[grpc.aio.Channel],
    tg: asyncio.TaskGroup,
    hello: pb.Hello,
    address: str,
    *,
    ids: list[int] | None = None,
    acks: list[pb.HelloAck] | None = None,
) -> list[Channel]:
    """A Transfer stream on each connection, Hello (``hello`` with each channel's id:
    ``ids``, by default 0, 1, ...) and HelloAck (appended to ``acks`` when given); each
    channel's reader runs in ``tg``. MigrationFailed when the target refuses or does not
    answer within CONNECT_TIMEOUT."""
    channels: list[Channel] = []
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            for cid, conn in zip(ids or range(len(connections)), connections, strict=True):
                ch = Channel(cid, stream.open_transfer(conn))
                channels.append(ch)
                mine = hello_for(hello, cid)
                await ch.call.write(pb.SourceFrame(hello=mine).SerializeToString())
                first = await ch.call.read()
                if first is grpc.aio.EOF or first.WhichOneof("frame") != "hello_ack":
                    raise MigrationFailed(f"target did not accept migration channel {cid}")
                if acks is not None:
                    acks.append(first.hello_ack)
                tg.create_task(ch.read_loop())
    except grpc.aio.AioRpcError as e:
        kind = StreamLost if is_network_failure(e) else MigrationFailed
        raise kind(f"cannot open the migration stream to {address}: {rpc_problem(e)}") from None
    except TimeoutError:
        raise StreamLost(
            f"the target {address} did not answer within {CONNECT_TIMEOUT:.0f}s"
        ) from None
    return channels


def unreachable_reason(target_node: str, seconds: float, limit: str) -> str:
    """The failureReason of a pre-copy drop that outlasted ``limit`` (the timeout that
    ended it: "progressTimeout 150 s")."""
    return (
        f"the migration network to {target_node} was unreachable for {seconds:.0f} s "
        f"({limit}); the VM keeps running on the source: check the network between the "
        "two nodes and the target's handler, then migrate again"
    )


def all_lost(error: BaseException) -> StreamLost | None:
    """The first StreamLost when every failure in ``error`` (a group, possibly nested) is
    a lost stream; None when anything else failed too (that one decides)."""
    if isinstance(error, BaseExceptionGroup):
        leaves = [all_lost(e) for e in error.exceptions]
        if any(leaf is None for leaf in leaves):
            return None
        return leaves[0]
    return error if isinstance(error, StreamLost) else None


@dataclass
class Reconnect:
    """Reopen every channel after a drop in pre-copy, with backoff, until ``deadline()``
    (the clock reading by which progress must resume: progressTimeout after the last
    progress). ``reopen`` closes what is left and opens every channel with Hello.resume
    (StreamLost while the network is still down). ``run`` returns once reconnected, or
    raises MigrationFailed (unreachable_reason) at the deadline."""

    reopen: Callable[[], Awaitable[None]]
    deadline: Callable[[], float]
    clock: Callable[[], float]
    target_node: str
    progress_timeout: float
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)
    attempts: int = 0

    async def run(self, since: float, uid: str) -> None:
        """``since``: the clock reading since which nothing got through (the last
        progress, or the drop if it was noticed earlier)."""
        delay = RECONNECT_DELAY
        while True:
            left = self.deadline() - self.clock()
            if left <= 0:
                raise MigrationFailed(
                    unreachable_reason(
                        self.target_node,
                        self.clock() - since,
                        f"progressTimeout {self.progress_timeout:.0f} s",
                    )
                )
            await self.sleep(min(delay, left))
            delay = min(2 * delay, RECONNECT_MAX_DELAY)
            left = self.deadline() - self.clock()
            if left <= 0:
                continue
            self.attempts += 1
            try:
                async with asyncio.timeout(left):
                    await self.reopen()
            except (StreamLost, TimeoutError) as e:
                log.info("migration %s: reconnect %d failed: %s", uid, self.attempts, e)
                continue
            log.info(
                "migration %s: reconnected to %s after %.1f s (%d attempts)",
                uid,
                self.target_node,
                self.clock() - since,
                self.attempts,
            )
            return
