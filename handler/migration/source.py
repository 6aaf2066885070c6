"""What every driver's source engine shares: one migration attempt's skeleton.

A ``SourceEngine`` is made by the VM manager when the hand-off names this node as the
source and the target has published its endpoint; ``run()`` drives the attempt to its end
and writes the outcome into ``vmi.status.migrationState`` (see FIELD_OWNERS):

 1. ``startTimestamp`` with a resourceVersion precondition (a migration the controller
    just failed or canceled never starts); the stream token from the migration's Secret;
 2. the driver's ``_migrate()`` (memvm_source.py, qemu_source.py), which ends with
    ``_finish_success()`` or raises;
 3. whatever it raised becomes one sentence a person can read (``failure_reason``; the
    technical detail goes to the log), then ``_fail``: abort the target, settle the guest
    (the arbiter decides whether it resumes here), record ``failed``;
 4. ``_cleanup()`` in ``finally`` (safe to run twice).

Cancellation (handler shutdown) propagates without a status write: a restarted handler
settles the migration through the arbiter.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import grpc

from handler.drivers.base import GuestError, VMHandle
from handler.migration.handoff import (
    Aborted,
    HandoffRecord,
    MigrationFailed,
    first_leaf,
    read_token,
)
from handler.migration.restart_record import consume_failure
from handler.migration.stats import Stats
from handler.net_counters import NetworkMeter
from handler.peers import PeerRegistry, dial_credentials, migration_config, peer_cluster
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.errors import ApiError
from vmferry.migration_state import (
    AbortStatus,
    Field,
    MigrationMode,
    MigrationState,
    Switchover,
    raw,
)
from vmferry.objects import conditions

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Clock = Callable[[], float]
ProgressCallback = Callable[[Obj, Stats], None]

PROGRESS_PERIOD = 0.5  # s between progress writes into the VMI status
# migrationState.transfer figures a re-adopted post-copy engine reports over the recorded
RESUMED_FIGURES = (
    "dataRemainingBytes",
    "postCopyStallMilliseconds",
    "postCopyFaults",
    "postCopyInterruptions",
)
ABORT_FRAME_TIMEOUT = 1.0  # s to tell each channel's target stream why we stop
CANCELED = "migration canceled by the user"


# What a gRPC status code says happened, in words (the clause after "the target ...").
_CODE_WORDS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "could not be reached over the migration network",
    grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer in time",
    grpc.StatusCode.CANCELLED: "closed the connection",
    grpc.StatusCode.NOT_FOUND: "does not expect this migration (its handler may have restarted)",
    grpc.StatusCode.PERMISSION_DENIED: "refused this node's identity or the migration's token",
    grpc.StatusCode.UNAUTHENTICATED: "refused this node's certificate",
    grpc.StatusCode.INVALID_ARGUMENT: "rejected what this node sent",
    grpc.StatusCode.FAILED_PRECONDITION: "rejected what this node sent",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ran out of resources",
    grpc.StatusCode.UNIMPLEMENTED: "does not serve this kind of migration (another version?)",
}
# Codes that mean the connection broke, not that the target refused: a pre-copy channel
# reconnects after these (the rest end the migration).
NETWORK_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# The target's own refusals carry a message written for people (peer.py, the state
# machine): it is quoted after the code's words.
_QUOTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


def is_network_failure(error: BaseException) -> bool:
    """The error says the connection broke (retrying may help), not that the target
    refused."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in NETWORK_CODES
    return isinstance(error, asyncio.InvalidStateError | ConnectionError)


def rpc_problem(error: BaseException) -> str:
    """A gRPC failure as a clause a person can read ("the target could not be reached
    over the migration network"), never the object's repr: the full error goes to the
    log."""
    log.info("gRPC failure: %r", error)
    if isinstance(error, grpc.aio.AioRpcError):
        code = error.code()
        words = _CODE_WORDS.get(code)
        if words is None:  # INTERNAL ("Internal error from Core"), UNKNOWN, ...
            return "the connection to the target broke"
        detail = _first_line(error.details())
        if code in _QUOTED_CODES and detail:
            return f"the target {words}: {detail}"
        return f"the target {words}"
    if isinstance(error, asyncio.InvalidStateError):
        return "the connection to the target was already closed"
    return "the connection to the target broke"


def _first_line(text: str | None) -> str:
    """The first line of a status message, without anything that looks like a repr."""
    lines = (text or "").strip().splitlines()
    line = lines[0].strip() if lines else ""
    return "" if "<" in line or " at 0x" in line else line.rstrip(".")


def failure_reason(error: BaseException, uid: str) -> str:
    """The failureReason for what ended a migration: one readable sentence (the error
    itself goes to the log)."""
    if isinstance(error, MigrationFailed):
        return str(error)
    log.warning("migration %s: ended by %r", uid, error)
    if isinstance(error, GuestError):
        return f"the guest on the source refused a request: {_first_line(str(error))}"
    if isinstance(error, ApiError):
        return f"the API server failed during the migration: {_first_line(str(error))}"
    if isinstance(error, grpc.aio.AioRpcError | asyncio.InvalidStateError):
        return f"lost the target: {rpc_problem(error)}"
    if isinstance(error, TimeoutError):
        return "the target stopped answering (timeout)"
    log.error("migration %s: internal error", uid, exc_info=error)
    return (
        f"internal error in the source handler ({type(error).__name__}); "
        "the handler's log has the details"
    )


class SourceEngine(abc.ABC):
    """The sending side of one migration attempt (one object per attempt)."""

    driver_name: ClassVar[str]

    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        vmi: Obj,
        handle: VMHandle,
        tls: pki.TlsFiles | None,
        *,
        on_progress: ProgressCallback | None = None,
        clock: Clock = time.monotonic,
        peers: PeerRegistry | None = None,
    ) -> None:
        self.api = api
        self.node = node_name
        self.vmi = vmi
        self.handle = handle
        self.tls = tls
        self.clock = clock
        self.on_progress = on_progress
        self.ns: str = vmi["metadata"]["namespace"]
        self.name: str = vmi["metadata"]["name"]
        ms = raw(vmi)
        state = MigrationState.from_dict(ms)
        self.uid = state.migration_uid
        self.target_node = state.target_node
        self.target_address = state.target_endpoint
        self.target_host = state.target_address
        self.config = migration_config(ms)
        # Cross-cluster: the target is a node of this peer cluster (trusted through its
        # registered CA only).
        self.peers = peers
        self.peer_cluster = peer_cluster(ms)
        self.record = HandoffRecord(api, self.ns, self.name, self.uid)
        self.token = ""  # read from the migration's Secret in run()
        self.abort_requested = asyncio.Event()
        self.stats = Stats(total_bytes=self._memory_bytes())
        self.mode = MigrationMode.PRE_COPY
        self.committed = False  # the arbiter recorded Committed: the target owns the VM
        self.readopted = False  # a restarted handler's engine, resuming post-copy
        # This handler's VMI watch showed Committed recorded for this migration (observe)
        self.decision_seen = False
        # While _commit waits: done once the decision is known (the answer, or observe)
        self._decision_known: asyncio.Future[None] | None = None
        # The commit's compare-and-set while its answer is still on its way (_commit)
        self._claim: asyncio.Future[None] | None = None
        self._last_report = 0.0
        self._publisher: asyncio.Task[None] | None = None
        # which interfaces carried the migration (transfer.networkInterface/networkBytes)
        self.network = NetworkMeter()

    def dial_credentials(self) -> grpc.ChannelCredentials | None:
        """How this attempt dials the target (peers.dial_credentials: the hand-off's
        trust); MigrationFailed when its peer cluster is not registered."""
        return dial_credentials(self.tls, self.peers, self.peer_cluster)

    # -- what a driver supplies -------------------------------------------------------------

    @abc.abstractmethod
    def _memory_bytes(self) -> int:
        """The guest's memory size."""

    @abc.abstractmethod
    async def _migrate(self) -> None:
        """Steps 2.. of the driver's migration, ending with _finish_success(); raises on
        failure (MigrationFailed and its Aborted carry the failureReason)."""

    @abc.abstractmethod
    async def _abort_target(self, reason: str) -> None:
        """Tell the target (every open stream) that the migration stops, and close."""

    def _arbiter_decides(self) -> bool:
        """The guest is paused for the hand-off (or may run on the target): a failure
        must claim Aborted before it resumes the guest here."""
        return False

    def _guest_may_be_paused(self) -> bool:
        """A failure must check whether the guest needs resuming here."""
        return self._arbiter_decides()

    async def _stop_transfer(self) -> None:
        """A failure before the hand-off: stop whatever still moves the guest's memory
        (default: nothing runs on its own once the engine stops sending)."""
        return None

    async def _fail_committed(self, reason: str) -> None:
        """A failure after the arbiter recorded Committed. Default: the target owns the
        VM and the migration stands; nothing to record here."""
        log.info("migration %s: %s (after the hand-off; the VM is the target's)", self.uid, reason)

    def readopt_postcopy(self) -> bool:
        """Make this engine the one of a migration found in post-copy after a handler
        restart (vm_postcopy.py): the hand-off was committed (the guest runs on the
        target), the paused guest here holds the pages the target lacks; ``run()`` then
        serves them to the end instead of starting a migration. False: this driver's
        engine cannot."""
        self.readopted = True
        self.committed = True
        self.mode = MigrationMode.POST_COPY
        before = raw(self.vmi).get(Field.TRANSFER) or {}
        self.stats.postcopy_interruptions = int(before.get("postCopyInterruptions", 0))
        return True

    def _transfer_status(self) -> Obj:
        """The ``transfer`` field (a driver may add to Stats.as_status(), then pass it
        through _with_recorded_figures)."""
        return self._with_recorded_figures(self.stats.as_status())

    def _with_recorded_figures(self, now: Obj) -> Obj:
        """A re-adopted engine knows only what it did itself: the figures of pre-copy
        and of the switch (digests, downtime, rounds) stay as recorded."""
        if not self.readopted:
            return now
        before = dict(raw(self.vmi).get(Field.TRANSFER) or {})
        for key in RESUMED_FIGURES:
            if key in now:
                before[key] = now[key]
        if "wireBytes" in now:
            before["wireBytes"] = int(before.get("wireBytes", 0)) + int(now["wireBytes"])
        return before

    def _refresh_stats(self) -> None:
        """Bring Stats up to date before it is reported (default: it is, batch by batch)."""
        return None

    def _holding_progress(self) -> bool:
        """Progress writes wait (the switchover's downtime: every watcher would process
        them while the guest is paused)."""
        return False

    @abc.abstractmethod
    async def _cleanup(self) -> None:
        """Close what the attempt opened; safe to run twice."""

    def _describe_start(self) -> str:
        """The driver's details for the start line of the log."""
        return self.driver_name

    # -- the skeleton -----------------------------------------------------------------------

    async def run(self) -> None:
        """Run the migration to its end; the outcome is written into the VMI status."""
        try:
            if not await self._mark_started():
                return
            self.token = await read_token(self.api, self.uid)
            self.network.begin(self.target_host)
            await self._migrate()
        except asyncio.CancelledError:
            raise  # handler shutdown: a restarted handler settles the migration
        except BaseException as e:
            leaf = first_leaf(e)
            if isinstance(leaf, asyncio.CancelledError):
                raise
            await self._fail(failure_reason(leaf, self.uid), aborted=isinstance(leaf, Aborted))
        finally:
            if self._claim is not None:
                self._claim.cancel()
            await self._cleanup()

    async def _mark_started(self) -> bool:
        """Record startTimestamp unless the migration was failed/canceled meanwhile."""
        if self.readopted:  # started by the previous incarnation of this handler
            return True
        started = await self.record.mark_started(
            {Field.MODE: self.mode, Field.TRANSFER: self._transfer_status()}
        )
        if started:  # bench/lab_runs.py reads "starting to" (the handler's start)
            log.info(
                "migration %s: %s/%s starting to %s (%s)",
                self.uid,
                self.ns,
                self.name,
                self.target_address,
                self._describe_start(),
            )
        return started

    def _check_abort(self) -> None:
        """Aborted if the user canceled (``abortRequested``)."""
        if self.abort_requested.is_set():
            raise Aborted(CANCELED)

    # -- progress ---------------------------------------------------------------------------

    def _report(self, force: bool = False) -> None:
        """Local progress (metrics) now; the VMI status at most every PROGRESS_PERIOD s
        (one write in flight at a time), not while _holding_progress()."""
        self._refresh_stats()
        if self.on_progress is not None:
            self.on_progress(self.vmi, self.stats)
        if self._holding_progress():
            return
        now = self.clock()
        if (force or now - self._last_report > PROGRESS_PERIOD) and (
            self._publisher is None or self._publisher.done()
        ):
            self._last_report = now
            self._publisher = asyncio.create_task(self._publish_progress())

    async def _sample_network(self) -> None:
        """Bring the interfaces' byte counts (Stats.network) up to date."""
        self.stats.network = await self.network.sample()

    async def _publish_progress(self) -> None:
        await self._sample_network()
        with contextlib.suppress(ApiError):
            await self.record.patch(
                {Field.TRANSFER: self._transfer_status(), Field.MODE: self.mode}
            )

    async def _patch_with_retry(self, fields: Obj, extra_status: Obj | None = None) -> None:
        """Status that must land (completion/failure), after any progress write in flight
        (an older progress write must never land after it)."""
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher
        await self.record.patch_until_written(fields, extra_status)

    def observe(self, vmi: Obj) -> None:
        """The VMI as this handler's watch delivered it (VMManager._on_vmi_event).
        ``switchover: Committed`` under this migration's uid is the arbiter's decision,
        whoever's answer is still on its way: the store publishes a write to its watchers
        only once it is committed, and a recorded decision never changes."""
        ms = raw(vmi)
        if ms.get(Field.MIGRATION_UID) == self.uid and ms.get(Field.SWITCHOVER) == (
            Switchover.COMMITTED
        ):
            self.decision_seen = True
            _settle(self._decision_known)

    async def _commit(self) -> None:
        """The hand-off: Committed (and the mode) recorded by the arbiter; MigrationFailed
        if Aborted stands. Returns as soon as the decision is known: the compare-and-set's
        answer, or this handler's watch showing the record (``observe``), whichever comes
        first. The API server sends a write's watch events before its answer, and under
        load that answer came 1-3 ms later: the time the target of a cross-cluster move
        (which learns the decision from the Commit frame sent next) waited longer than an
        in-cluster target (which learns it from its own watch). The compare-and-set goes
        on until answered (``_claim_settled``)."""
        # One future the first of the two settles: the wake-up costs one turn of the loop
        # (an Event and asyncio.wait took three, ~0.5 ms on a loaded node).
        known = self._decision_known = asyncio.get_running_loop().create_future()
        claim = self._claim = asyncio.ensure_future(self.record.commit(self.mode))
        claim.add_done_callback(consume_failure)  # retrieved here, or by nobody
        claim.add_done_callback(lambda _: _settle(known))
        if self.decision_seen:
            _settle(known)
        try:
            await known
        finally:
            self._decision_known = None
            if not claim.done() and not self.decision_seen:
                claim.cancel()  # cancelled ourselves: the arbiter settles it later
        if claim.done() and not self.decision_seen:
            claim.result()  # MigrationFailed when Aborted stands
        elif not claim.done():  # the log line the answer would write (the record is final)
            log.info(
                "migration %s: switchover %s recorded (seen on the watch before the answer)",
                self.uid,
                Switchover.COMMITTED,
            )
        self.committed = True

    async def _claim_settled(self) -> None:
        """Wait for the commit's compare-and-set to be answered, so that the record is
        written by one writer at a time. Its outcome no longer matters once the watch
        showed Committed; before that, _commit raised it."""
        claim, self._claim = self._claim, None
        if claim is not None and not claim.done():
            await asyncio.wait({claim})

    async def _record_success(self) -> None:
        """completed, endTimestamp, mode and the final figures."""
        await self._claim_settled()
        self.stats.remaining_bytes = 0
        await self._sample_network()
        await self._patch_with_retry(
            {
                Field.COMPLETED: True,
                Field.END_TIMESTAMP: conditions.now_rfc3339(),
                Field.MODE: self.mode,
                Field.TRANSFER: self._transfer_status(),
            }
        )

    def _log_success(self, detail: str) -> None:
        log.info(
            "migration %s: succeeded: %d rounds, %.1f MiB on the wire, downtime %s%s",
            self.uid,
            self.stats.rounds,
            self.stats.wire_bytes / 2**20,
            {k: round(v * 1000, 1) for k, v in self.stats.downtime_parts.items()},
            detail,
        )

    # -- failure ----------------------------------------------------------------------------

    async def _fail(self, reason: str, aborted: bool = False) -> None:
        """Settle a failed attempt: the target told, the guest kept (or left to the
        target when the arbiter says Committed), ``failed`` recorded."""
        log.warning("migration %s: failed: %s", self.uid, reason)
        await self._abort_target(reason)
        await self._claim_settled()
        if self.committed:
            await self._fail_committed(reason)
            return
        await self._stop_transfer()
        if self._arbiter_decides() and not await self._claim_abort():
            # The arbiter says Committed: the target owns the VM now.
            self.committed = True
            await self.handle.destroy()
            await self._record_success()
            return
        if self._guest_may_be_paused():
            try:
                await self._resume_here()
            except GuestError as e:
                log.error("migration %s: cannot resume the guest here: %s", self.uid, e)
                reason = f"{reason}; the guest could not be resumed on the source: {e}"
        await self._sample_network()
        fields: Obj = {
            Field.FAILED: True,
            Field.FAILURE_REASON: reason,
            Field.END_TIMESTAMP: conditions.now_rfc3339(),
            Field.TRANSFER: self._transfer_status(),
        }
        if aborted or self.abort_requested.is_set():
            fields[Field.ABORT_STATUS] = AbortStatus.SUCCEEDED
        await self._patch_with_retry(fields)

    async def _resume_here(self) -> None:
        """Resume the source guest after a failed switchover (it may not have paused)."""
        if (await self.handle.status()).state == "running":
            return
        await self.handle.resume()
        log.info("migration %s: guest resumed on the source", self.uid)

    async def _claim_abort(self) -> bool:
        """Write switchover=Aborted unless Committed is recorded already; True if aborted."""
        return await self.record.claim(Switchover.ABORTED) == Switchover.ABORTED

    @staticmethod
    async def _abort_streams(calls: list[grpc.aio.StreamStreamCall], frame: Any) -> None:
        """Write the Abort ``frame`` on each stream, each within ABORT_FRAME_TIMEOUT,
        ignoring a stream that is gone already."""
        for call in calls:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.write(frame), ABORT_FRAME_TIMEOUT)


def _settle(known: asyncio.Future[None] | None) -> None:
    """Mark the commit decision known (once; a finished wait ignores it)."""
    if known is not None and not known.done():
        known.set_result(None)
