"""What every source-side stream to the target shares (memvm's Transfer channels, QEMU's
tunnel channels): the call, the error that ended it, the reader loop's shape, and
writes that fail with a readable reason.

Ownership: one reader task per stream runs ``read_frames`` (in its migration's
TaskGroup) and is the only reader of the call; writers share the call under
``write_lock``. When the stream ends, the reader records why in ``error`` and calls
``_on_end`` so that nobody waits on a dead stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import grpc

from handler.migration.handoff import MigrationFailed
from handler.migration.source import is_network_failure, rpc_problem


class StreamLost(MigrationFailed):
    """The connection under a stream broke (the network, not a refusal by the target):
    in pre-copy the source reconnects and goes on (channels.Reconnect)."""


def stream_failure(message: str, error: BaseException) -> MigrationFailed:
    """``message: <what happened>`` as StreamLost when the network broke it, else as
    MigrationFailed."""
    kind = StreamLost if is_network_failure(error) else MigrationFailed
    return kind(f"{message}: {rpc_problem(error)}")


class TargetStream:
    """One gRPC stream from the source handler to the target handler."""

    what: ClassVar[str] = "stream"  # how messages name it ("migration channel 0")

    def __init__(self, channel_id: int, call: grpc.aio.StreamStreamCall) -> None:
        self.id = channel_id
        self.call = call
        self.error: BaseException | None = None
        self.write_lock = asyncio.Lock()

    def check(self) -> None:
        """Raise what ended the stream, if it ended."""
        if self.error is not None:
            raise self.error

    async def _write(self, data: Any) -> None:
        """Write one frame; MigrationFailed (the stream's own error, if it has one)."""
        self.check()
        try:
            async with self.write_lock:
                await self.call.write(data)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            self.check()
            raise stream_failure(f"{self.what} {self.id} to the target failed", e) from None

    async def read_frames(self, route: Callable[[Any], Awaitable[None] | None]) -> None:
        """The reader task: ``route`` each frame the target sends until the stream ends,
        then record why (``error``) and wake every waiter (``_on_end``)."""
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    raise MigrationFailed(f"the target closed {self.what} {self.id}")
                routed = route(frame)
                if routed is not None:
                    await routed
        except grpc.aio.AioRpcError as e:
            self.error = stream_failure(f"lost the target on {self.what} {self.id}", e)
        except MigrationFailed as e:
            self.error = e
        finally:
            self._on_end()

    def _on_end(self) -> None:
        """Wake whoever waits on this stream (they call check())."""
        return None
