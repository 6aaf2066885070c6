"""The target's record of one expected migration, and the registry both services share.

``IncomingMigration`` is registered by the VM manager when a hand-off names this node
as the target; the memvm Transfer service (``memvm_target``) or the QEMU Tunnel service
(``qemu_target``) then serves its streams. Its state (``target_state.TargetState``)
changes only through :meth:`IncomingMigration.move`, which checks the transition table;
the decision (Committed or Aborted) only through :meth:`IncomingMigration.decide`.

``IncomingRegistry`` is what both services and the VM manager share: the expected
migrations, the restart records, the peer checks, and the VM manager's callbacks
(resume on commit, discard on abort, post-copy done).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from handler import stream
from handler.digest import ChunkDigest
from handler.drivers.base import DriverError, PostCopyHandle, VMHandle, postcopy
from handler.migration.peer import PeerGate
from handler.migration.restart_record import RestartRecords
from handler.migration.target_state import (
    COMMIT_FROM,
    RESUMED_FROM,
    IllegalTransition,
    TargetState,
    check,
)
from handler.peers import MigrationTrust
from vmferry.migration_state import Switchover
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class IncomingMigration:
    namespace: str
    name: str
    vmi_uid: str
    migration_uid: str
    token: str
    source_node: str
    handle: VMHandle
    # cross-cluster: the sending cluster (a registered peer), whose CA must have issued
    # the source's certificate; "" in-cluster
    peer_cluster: str = ""
    channel_count: int = 0
    connected: set[int] = field(default_factory=set)
    final_channels: set[int] = field(default_factory=set)
    all_final: asyncio.Event = field(default_factory=asyncio.Event)
    device_state: bytes | None = None  # from DeviceState (or PostCopyStart)
    # The restart record's write, started when the device state arrives.
    record_written: asyncio.Future[None] | None = None
    pages_applied: int = 0
    bytes_received: int = 0
    verified_at: float = 0.0  # time.monotonic() of the verification
    control_out: asyncio.Queue[pb.TargetFrame | None] | None = None  # channel 0's queue
    request_sent: npt.NDArray[np.bool_] | None = None  # pages already asked for
    stall_ms: float = 0.0
    faults: int = 0
    # The digest of RAM, started once every channel's final round is in: it is made
    # while the source's FinalState (its digest) is on its way.
    final_digest: asyncio.Future[str] | None = None
    # Post-copy: the request poller runs; since when no source stream is connected
    # (time.monotonic(); None while one is), for the recovery window (postcopy_keeper).
    polling: bool = False
    disconnected_since: float | None = None
    _state: TargetState = TargetState.AWAITING_HELLO
    _pages: npt.NDArray[np.uint8] | None = None
    _digest: ChunkDigest | None = None

    @classmethod
    def readopted_postcopy(
        cls,
        namespace: str,
        name: str,
        vmi_uid: str,
        migration_uid: str,
        token: str,
        source_node: str,
        handle: VMHandle,
        device_state: bytes,
        disconnected_since: float,
    ) -> IncomingMigration:
        """A post-copy guest found running after a handler restart (the hand-off was
        committed and the restart record says post-copy): registered again in
        PostCopyRunning, the state it was in, so the source's reconnect (Hello.resume)
        finds it. The only entry into the machine that does not start at AwaitingHello:
        the states before it were walked by the previous incarnation of this handler."""
        inc = cls(
            namespace=namespace,
            name=name,
            vmi_uid=vmi_uid,
            migration_uid=migration_uid,
            token=token,
            source_node=source_node,
            handle=handle,
            device_state=device_state,
            disconnected_since=disconnected_since,
        )
        inc._state = TargetState.POSTCOPY_RUNNING
        return inc

    # -- the state machine ------------------------------------------------------------------

    @property
    def state(self) -> TargetState:
        return self._state

    def move(self, to: TargetState, why: str) -> None:
        """The only writer of the state: IllegalTransition (a protocol error of both
        protocols) unless ``state -> to`` is in ``TRANSITIONS``; ``why`` names the frame
        or event in that message."""
        check(self.migration_uid, self._state, to, why)
        log.debug("migration %s: %s -> %s (%s)", self.migration_uid, self._state, to, why)
        self._state = to

    def decide(self, decision: Switchover) -> bool:
        """Take the hand-off decision here. True: this call took it, and the caller acts on
        it (resume, or discard). False: a decision stands already (Committed wins over a
        later Aborted: a committed guest is never discarded). Committing before the memory
        is verified raises IllegalTransition. Never awaits: of concurrent callers exactly
        one gets True."""
        if self._state.decided:
            return False
        if decision is Switchover.COMMITTED:
            to = COMMIT_FROM.get(self._state)
            if to is None:
                raise IllegalTransition(
                    f"migration {self.migration_uid}: Commit before the memory was verified "
                    f"(state {self._state})"
                )
            self.move(to, "the commit decision")
        else:
            self.move(TargetState.ABORTED, "the abort decision")
        return True

    def resumed(self) -> None:
        """The committed guest runs here (pre-copy: with all its memory)."""
        to = RESUMED_FROM.get(self._state)
        if to is None:
            raise IllegalTransition(
                f"migration {self.migration_uid}: resumed in state {self._state}"
            )
        self.move(to, "the resume")

    @property
    def decision(self) -> Switchover | None:
        if self._state.committed:
            return Switchover.COMMITTED
        if self._state is TargetState.ABORTED:
            return Switchover.ABORTED
        return None

    @property
    def verified(self) -> bool:
        return self._state.verified

    @property
    def postcopy(self) -> bool:
        return self._state.postcopy

    @property
    def postcopy_done(self) -> bool:
        return self._state is TargetState.POSTCOPY_DONE

    # -- guest memory (memvm) ---------------------------------------------------------------

    @property
    def chunk_digest(self) -> ChunkDigest:
        """Per-chunk hashes of the RAM received so far (invalidated by every write)."""
        if self._digest is None:
            # prepare_incoming() made a fresh, all-zero RAM file: only writes need hashing.
            self._digest = ChunkDigest(self.handle.ram(), self.handle.spec.page_size, all_zero=True)
        return self._digest

    @property
    def pages(self) -> npt.NDArray[np.uint8]:
        if self._pages is None:
            self._pages = stream.page_view(self.handle.ram(), self.handle.spec.page_size)
        return self._pages

    @property
    def postcopy_handle(self) -> PostCopyHandle:
        try:
            return postcopy(self.handle, f"migration {self.migration_uid}")
        except DriverError as e:
            raise stream.ProtocolError(str(e)) from None

    def release(self) -> None:
        self._pages = None
        if self.final_digest is not None and not self.final_digest.done():
            self.final_digest.cancel()
        if self._digest is not None:
            self._digest.release()
            self._digest = None


Callback = Callable[[IncomingMigration], Awaitable[None]]
AbortCallback = Callable[[IncomingMigration, str], Awaitable[None]]


async def _nothing(inc: IncomingMigration, *_: Any) -> None:
    return None


class IncomingRegistry:
    """The expected migrations of this node, shared by both target services and the VM
    manager. The VM manager sets the callbacks: ``on_commit`` (the Commit frame
    arrived: decide and resume), ``on_abort`` (the source aborted, or its stream broke
    the protocol: discard), ``on_postcopy_done`` (every page is in)."""

    def __init__(
        self,
        records: RestartRecords,
        *,
        require_peer_identity: bool = True,
        trust: MigrationTrust | None = None,
    ) -> None:
        self.registry: dict[str, IncomingMigration] = {}
        self.records = records
        self.gate = PeerGate(
            self.registry, require_peer_identity=require_peer_identity, trust=trust
        )
        self.on_commit: Callback = _nothing
        self.on_abort: AbortCallback = _nothing
        self.on_postcopy_done: Callback = _nothing
        self._forget_hooks: list[Callable[[str], object]] = []

    def get(self, migration_uid: str) -> IncomingMigration | None:
        return self.registry.get(migration_uid)

    def expect(self, inc: IncomingMigration) -> None:
        self.registry[inc.migration_uid] = inc

    def on_forget(self, hook: Callable[[str], object]) -> None:
        """Call ``hook(migration_uid)`` whenever a migration is forgotten (a service's
        own per-migration state ends with the registry entry)."""
        self._forget_hooks.append(hook)

    def forget(self, migration_uid: str) -> IncomingMigration | None:
        """Drop a migration (committed and resumed, discarded, or lost)."""
        inc = self.registry.pop(migration_uid, None)
        if inc is not None:
            inc.release()
            inc.control_out = None
        for hook in self._forget_hooks:
            hook(migration_uid)
        return inc
