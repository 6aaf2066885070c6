"""The receiving side of live migrations: the Transfer service on the migration network.

``IncomingMigration`` is the target's record of one expected migration (registered by
the VM manager when the hand-off names this node). ``MigrationService.Transfer`` serves
each channel of it and enforces, in order: the peer certificate names the hand-off's
source node; the Hello names a registered migration with the right token, protocol
version and geometry; frames arrive in the order of the state machine in
``proto/vmferry/rpc/migration.proto``. Violations end the stream with
INVALID_ARGUMENT / PERMISSION_DENIED / NOT_FOUND and a message that says which rule.

Ownership: the service writes guest RAM only through ``IncomingMigration.pages`` and
only before ``decided`` is set; the VM manager owns the handle's lifecycle (resume on
commit, destroy on abort) through the callbacks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from handler import stream
from handler.drivers.base import VMHandle, ram_digest_async
from vmferry import pki
from vmferry.rpc import migration_pb2 as pb
from vmferry.rpc import migration_pb2_grpc

log = logging.getLogger(__name__)

FINAL_ROUND_TIMEOUT = 60.0  # s for every channel's final round once FinalState arrived


@dataclass
class IncomingMigration:
    namespace: str
    name: str
    vmi_uid: str
    migration_uid: str
    token: str
    source_node: str
    handle: VMHandle
    channel_count: int = 0
    connected: set[int] = field(default_factory=set)
    final_channels: set[int] = field(default_factory=set)
    all_final: asyncio.Event = field(default_factory=asyncio.Event)
    device_state: bytes | None = None
    verified: bool = False
    decision: str = ""  # "", "Committed" or "Aborted"
    pages_applied: int = 0
    bytes_received: int = 0
    verified_at: float = 0.0  # time.monotonic() of the verification
    _pages: npt.NDArray[np.uint8] | None = None

    @property
    def pages(self) -> npt.NDArray[np.uint8]:
        if self._pages is None:
            self._pages = stream.page_view(self.handle.ram(), self.handle.spec.page_size)
        return self._pages

    def release(self) -> None:
        self._pages = None


Callback = Callable[[IncomingMigration], Awaitable[None]]


class MigrationService(migration_pb2_grpc.MigrationServicer):
    def __init__(
        self,
        on_commit: Callback,
        on_abort: Callable[[IncomingMigration, str], Awaitable[None]],
        *,
        record_dir: Path | None = None,
        require_peer_identity: bool = True,
    ) -> None:
        self.registry: dict[str, IncomingMigration] = {}
        self.record_dir = record_dir
        self.on_commit = on_commit
        self.on_abort = on_abort
        self.require_peer_identity = require_peer_identity

    def expect(self, inc: IncomingMigration) -> None:
        self.registry[inc.migration_uid] = inc

    def forget(self, migration_uid: str) -> IncomingMigration | None:
        inc = self.registry.pop(migration_uid, None)
        if inc is not None:
            inc.release()
        return inc

    async def Transfer(
        self, request_iterator: AsyncIterator[pb.SourceFrame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TargetFrame]:
        frames = aiter(request_iterator)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return
        if first.WhichOneof("frame") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Hello")
        hello = first.hello
        inc = self.registry.get(hello.migration_uid)
        if inc is None or inc.decision:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no migration {hello.migration_uid!r} is expected on this node",
            )
            return
        peer = pki.peer_identity(context)
        if self.require_peer_identity and (peer is None or peer.node_name != inc.source_node):
            who = peer.user if peer else "an unauthenticated peer"
            log.warning(
                "migration %s: refused stream from %s (expected node %s)",
                inc.migration_uid,
                who,
                inc.source_node,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} is not the source node {inc.source_node} of migration {inc.migration_uid}",
            )
        if not secrets.compare_digest(hello.token.encode(), inc.token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong migration token")
        try:
            stream.check_hello(
                hello,
                memory_bytes=inc.handle.spec.memory_bytes,
                page_size=inc.handle.spec.page_size,
            )
            if inc.channel_count and hello.channel_count != inc.channel_count:
                raise stream.ProtocolError(
                    f"channel_count {hello.channel_count} differs from the first channel's {inc.channel_count}"
                )
            if hello.channel_id in inc.connected:
                raise stream.ProtocolError(f"channel {hello.channel_id} is already connected")
        except stream.ProtocolError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        inc.channel_count = hello.channel_count
        inc.connected.add(hello.channel_id)
        channel = hello.channel_id
        yield pb.TargetFrame(hello_ack=pb.HelloAck(channel_id=channel))
        yield pb.TargetFrame(credit=pb.Credit(bytes=stream.CREDIT_WINDOW))
        try:
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "commit" and channel == 0 and inc.decision == "Committed":
                    # The arbiter record reached this handler before the Commit frame.
                    yield pb.TargetFrame(resumed=pb.Resumed(resume_seconds=0.0))
                    return
                if inc.decision:
                    raise stream.ProtocolError(
                        f"frame {kind} after the migration was {inc.decision}"
                    )
                if kind == "pages":
                    if channel in inc.final_channels:
                        raise stream.ProtocolError("pages after the final round")
                    n = await asyncio.to_thread(stream.apply_batch, inc.pages, frame.pages)
                    inc.pages_applied += n
                    inc.bytes_received += len(frame.pages.payload)
                    yield pb.TargetFrame(credit=pb.Credit(bytes=len(frame.pages.payload)))
                elif kind == "round_end":
                    if frame.round_end.final:
                        inc.final_channels.add(channel)
                        if len(inc.final_channels) == inc.channel_count:
                            inc.all_final.set()
                    yield pb.TargetFrame(
                        round_ack=pb.RoundAck(
                            round=frame.round_end.round, pages_applied=inc.pages_applied
                        )
                    )
                elif kind == "final_state" and channel == 0:
                    yield await self._verify(inc, frame.final_state)
                elif kind == "commit" and channel == 0:
                    if not inc.verified:
                        raise stream.ProtocolError("Commit before the memory was verified")
                    t0 = time.monotonic()
                    await self.on_commit(inc)
                    yield pb.TargetFrame(resumed=pb.Resumed(resume_seconds=time.monotonic() - t0))
                    return
                elif kind == "abort":
                    log.info(
                        "migration %s: source aborted: %s", inc.migration_uid, frame.abort.reason
                    )
                    await self.on_abort(inc, frame.abort.reason)
                    return
                else:
                    raise stream.ProtocolError(f"unexpected frame {kind!r} on channel {channel}")
        except stream.ProtocolError as e:
            log.warning(
                "migration %s: protocol error on channel %d: %s", inc.migration_uid, channel, e
            )
            await self.on_abort(inc, f"protocol error: {e}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def record_path(self, migration_uid: str) -> Path:
        assert self.record_dir is not None
        return self.record_dir / f"{migration_uid}.json"

    def _write_record(self, inc: IncomingMigration) -> None:
        path = self.record_path(inc.migration_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "vmId": inc.handle.vm_id,
                    "deviceState": base64.b64encode(inc.device_state or b"").decode(),
                }
            )
        )
        tmp.replace(path)

    async def _verify(self, inc: IncomingMigration, final: pb.FinalState) -> pb.TargetFrame:
        if inc.verified:
            raise stream.ProtocolError("FinalState sent twice")
        try:
            async with asyncio.timeout(FINAL_ROUND_TIMEOUT):
                await inc.all_final.wait()
        except TimeoutError:
            raise stream.ProtocolError(
                "FinalState before every channel finished its final round"
            ) from None
        t0 = time.monotonic()
        inc.device_state = final.device_state
        digest = await ram_digest_async(inc.handle.ram())
        inc.verified = secrets.compare_digest(digest, final.digest)
        inc.verified_at = time.monotonic()
        if inc.verified and self.record_dir is not None:
            # Survives a handler restart between here and the resume (vm_manager settles it).
            await asyncio.to_thread(self._write_record, inc)
        seconds = time.monotonic() - t0
        log.info(
            "migration %s: memory digest %s (%.0f ms)",
            inc.migration_uid,
            "verified" if inc.verified else "MISMATCH",
            seconds * 1000,
        )
        return pb.TargetFrame(
            verified=pb.Verified(match=inc.verified, digest=digest, verify_seconds=seconds)
        )
