"""The VM driver interface: how the handler runs, inspects and migrates a guest.

A *driver* starts guests (each guest is its own OS process, in its own session, so that it
outlives a handler restart) and re-adopts the guests it finds in its runtime directory
when the handler starts again. It says which VMIs it runs (``claims``: by their spec;
``Drivers`` picks a VMI's driver once) and supplies the source engine that migrates its
guests (``source_engine``), so the VM manager never asks which driver it has.

A *VM handle* is the handler's view of one guest. Every driver's handle is a
:class:`VMHandle`: ``ram()`` maps guest RAM read/write (the target writes it before the
guest resumes), ``pause()`` / ``resume()`` are the switchover primitives,
``set_throttle()`` is auto-converge. Capabilities only some guests have are separate
protocols, asked for through :func:`dirty_log` and :func:`postcopy` (the one place
that checks them):

- :class:`DirtyLogHandle`: the handler migrates the guest's memory itself.
  ``harvest_dirty()`` returns the pages written since the previous harvest, with
  clear-then-copy semantics: the dirty bits are cleared *before* the caller copies the
  pages, so a write that races with the harvest leaves its bit set for the next round and
  no write is ever missed (the role KVM's dirty log plays); ``device_state()`` is the
  paused guest's non-RAM state;
- :class:`PostCopyHandle`: the guest can run before all of its memory has arrived.

``ram_digest()`` hashes a whole guest RAM in one go (comparing two memories), in
``hash_pool()``; the migration's own digest is kept incrementally by ``handler/digest.py``.

Errors: every driver failure is a :class:`DriverError`; a guest that refuses a request or
cannot be reached raises :class:`GuestError`; a guest that dies while booting raises
:class:`GuestStartError`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import mmap
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from handler.migration.source import ProgressCallback, SourceEngine
    from handler.migration.worker_pool import WorkerPool
    from handler.peers import PeerRegistry
    from vmferry.client import ApiClient
    from vmferry.pki import TlsFiles

__all__ = [
    "CONTENT_KINDS",
    "DIGEST_CHUNK_BYTES",
    "DirtyLogHandle",
    "Driver",
    "DriverError",
    "Drivers",
    "EngineContext",
    "GuestError",
    "GuestSpec",
    "GuestStartError",
    "GuestStatus",
    "PageIndices",
    "PageMask",
    "PostCopyHandle",
    "VMExistsError",
    "VMHandle",
    "dirty_log",
    "file_data_pages",
    "hash_pool",
    "postcopy",
    "ram_digest",
    "ram_digest_async",
    "unmap",
]

CONTENT_KINDS = ("random", "text", "zero", "mixed")
GUEST_STATES = ("running", "paused", "incoming", "stopped")

# Both sides of a migration must hash with the same chunk size, or the digests differ.
DIGEST_CHUNK_BYTES = 16 << 20
# One hashing thread per core this process may run on (at least 2): hashlib and the native
# page digests (handler/pagehash.py) release the GIL, so each hashes on its own core.
DIGEST_THREADS = max(2, len(os.sched_getaffinity(0)))

PageIndices = npt.NDArray[np.int64]
PageMask = npt.NDArray[np.bool_]  # one flag per page


log = logging.getLogger(__name__)


def unmap(mapping: mmap.mmap | None, what: str) -> None:
    """Close ``mapping`` (None: nothing to do). A mapping a memoryview or array still
    exports stays mapped until that is released; ``what`` names it in the debug line."""
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:
        log.debug("%s still exported; unmapped when released", what)


class DriverError(Exception):
    """Base class of every error a VM driver raises."""


class GuestError(DriverError):
    """The guest refused a request (its message says why) or could not be reached."""


class GuestStartError(DriverError):
    """The guest process died or did not become ready while booting."""


class VMExistsError(DriverError):
    """A live guest with this vm_id already runs under this driver."""


def _require_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"GuestSpec.{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"GuestSpec.{name}: must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class GuestSpec:
    """What guest to run: its memory geometry and the workload it runs.

    ``hot_set_bytes`` is the region (after header page 0) that the workload writes;
    0 means all of RAM. ``touched_bytes`` is how much of RAM is filled at boot; 0 means
    all of it (the rest stays sparse zeros).
    """

    memory_bytes: int
    dirty_rate_bytes: int = 0  # bytes/s the workload writes (unthrottled)
    hot_set_bytes: int = 0  # 0 = whole RAM
    content: str = "random"  # random|text|zero|mixed
    touched_bytes: int = 0  # 0 = all of RAM
    tick_interval_s: float = 0.005
    page_size: int = 4096

    def __post_init__(self) -> None:
        page_size = _require_int("page_size", self.page_size, 512)
        if page_size & (page_size - 1):
            raise ValueError(f"GuestSpec.page_size: must be a power of two, got {page_size}")
        memory = _require_int("memory_bytes", self.memory_bytes, 2 * page_size)
        if memory % page_size:
            raise ValueError(
                f"GuestSpec.memory_bytes: {memory} is not a multiple of the page size {page_size}"
            )
        _require_int("dirty_rate_bytes", self.dirty_rate_bytes, 0)
        for name in ("hot_set_bytes", "touched_bytes"):
            value = _require_int(name, getattr(self, name), 0)
            if value > memory:
                raise ValueError(
                    f"GuestSpec.{name}: {value} exceeds memory_bytes {memory}; use 0 for all of RAM"
                )
        if self.content not in CONTENT_KINDS:
            raise ValueError(
                f"GuestSpec.content: unknown kind {self.content!r}; "
                f"expected one of {', '.join(CONTENT_KINDS)}"
            )
        tick = self.tick_interval_s
        if isinstance(tick, bool) or not isinstance(tick, int | float) or not 0.0005 <= tick <= 1:
            raise ValueError(
                f"GuestSpec.tick_interval_s: must be a number of seconds in [0.0005, 1], "
                f"got {tick!r}"
            )

    @property
    def page_count(self) -> int:
        return self.memory_bytes // self.page_size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GuestSpec:
        """Build a spec from its JSON form; unknown fields and bad values raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"GuestSpec: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"GuestSpec: unknown field(s) {', '.join(unknown)}; "
                f"known fields are {', '.join(sorted(known))}"
            )
        if "memory_bytes" not in data:
            raise ValueError("GuestSpec.memory_bytes: required")
        return cls(**dict(data))


@dataclass
class GuestStatus:
    """A guest's state as it reports it (``state`` is one of running, paused, incoming,
    stopped). ``resume_gap_ms`` is the downtime as the guest saw it at its last resume:
    wall time of its first tick after the resume minus the last tick time found in its
    memory; None until the guest has been resumed."""

    state: str
    ticks: int
    last_tick_ns: int
    throttle_percent: int
    resume_gap_ms: float | None
    pid: int
    dirty_rate_bytes: int = 0
    memory_bytes: int = 0
    pages_written: int = 0
    postcopy: bool = False  # still waiting for pages of a post-copy migration
    stall_ms: float = 0.0  # post-copy: total time accesses waited for missing pages
    faults: int = 0  # post-copy: accesses that had to wait


@runtime_checkable
class VMHandle(Protocol):
    """The handler's view of one running (or incoming) guest, for every driver."""

    vm_id: str
    spec: GuestSpec
    pid: int
    ram_path: Path  # the (shared-memory) file ram() maps

    @property
    def driver_name(self) -> str:
        """The driver running the guest (``status.launcher.driver``)."""
        ...

    @property
    def incoming(self) -> bool:
        """Started for an incoming migration and not resumed yet, as the driver's own
        record says (False when the driver keeps no such record): how an adopted guest
        that does not answer is judged."""
        ...

    @property
    def page_count(self) -> int: ...

    def ram(self) -> memoryview:
        """A read/write mapping of guest RAM (``len == spec.memory_bytes``).

        Raises DriverError after close(). The caller must release the view (or drop it)
        before close() can unmap; until then the mapping stays alive."""
        ...

    async def pause(self) -> None:
        """Returns when the guest has finished its current write and writes nothing more."""
        ...

    async def resume(self, device_state: bytes | None = None) -> None:
        """Resume a paused guest, or start an incoming one from ``device_state`` (the
        bytes another guest's device_state() returned; None for a guest whose device
        state travels in its own migration stream) plus the memory copied into it."""
        ...

    async def set_throttle(self, percent: int) -> None: ...

    async def status(self) -> GuestStatus: ...

    def is_alive(self) -> bool: ...

    async def stop(self) -> None:
        """Stop the guest process gracefully (killing it if it does not stop in time)."""
        ...

    async def destroy(self) -> None:
        """Kill the guest if alive, unmap, delete its RAM and runtime files. Idempotent."""
        ...

    def close(self) -> None:
        """Unmap only: the handler goes away, the guest keeps running."""
        ...


@runtime_checkable
class DirtyLogHandle(VMHandle, Protocol):
    """A guest whose memory the handler migrates itself (the memvm engine)."""

    def harvest_dirty(self) -> PageIndices:
        """Indices (int64, ascending) of the pages written since the last harvest.

        Their dirty bits are already cleared when this returns: copy the pages *after*
        calling it, and a write racing with the copy shows up in the next harvest."""
        ...

    def mark_all_dirty(self) -> None: ...

    def clear_dirty(self) -> None: ...

    def data_pages(self) -> PageMask | None:
        """Per page: may hold data (False: never written, reads as zeros), or None when
        the driver cannot tell. Lets a migration skip untouched memory without reading
        it (reading a hole of a RAM file would also allocate it)."""
        ...

    async def device_state(self) -> bytes:
        """The guest's non-RAM state; only while paused."""
        ...


@runtime_checkable
class PostCopyHandle(VMHandle, Protocol):
    """A guest that can run before all of its memory has arrived (post-copy target).

    ``prepare_postcopy(missing)`` marks pages not present; ``resume_postcopy(state)``
    starts the guest, whose accesses to a missing page wait for it. The handler writes
    arriving pages through ``present()``-masked scatters, then ``mark_present()``;
    ``requested_pages()`` lists the pages the guest is waiting for."""

    def prepare_postcopy(self, missing: PageIndices) -> None: ...

    def present(self) -> npt.NDArray[np.uint8]: ...

    def mark_present(self, indices: PageIndices) -> None: ...

    def requested_pages(self) -> PageIndices: ...

    def missing_pages(self) -> PageIndices: ...

    async def resume_postcopy(self, device_state: bytes) -> None: ...

    async def finish_postcopy(self) -> GuestStatus: ...


def _lacks(handle: VMHandle, capability: str, what: str) -> DriverError:
    return DriverError(f"{what}: the {handle.driver_name} guest {handle.vm_id} has no {capability}")


def dirty_log(handle: VMHandle, what: str) -> DirtyLogHandle:
    """``handle`` as a DirtyLogHandle; DriverError (naming ``what`` needed it) when its
    driver migrates memory its own way."""
    if not isinstance(handle, DirtyLogHandle):
        raise _lacks(handle, "dirty log", what)
    return handle


def postcopy(handle: VMHandle, what: str) -> PostCopyHandle:
    """``handle`` as a PostCopyHandle; DriverError when its driver cannot run post-copy."""
    if not isinstance(handle, PostCopyHandle):
        raise _lacks(handle, "post-copy", what)
    return handle


@dataclass(frozen=True)
class EngineContext:
    """What every source engine gets from its handler, whatever the driver: the API
    client, this node's name, the migration network's client certificate (None: plain
    text, tests only), where progress goes (the metrics collector) and the registered
    peer clusters (a cross-cluster hand-off's target is trusted through its CA only)."""

    api: ApiClient
    node: str
    tls: TlsFiles | None
    on_progress: ProgressCallback
    peers: PeerRegistry | None = None
    workers: WorkerPool | None = None  # stream workers (None or empty: streams in-process)


@runtime_checkable
class Driver(Protocol):
    """Runs one kind of guest. ``claims(vmi)`` says whether a VMI's spec asks for this
    driver; ``start``/``prepare_incoming`` take the VMI itself (each driver reads its own
    part of the spec)."""

    name: str

    def claims(self, vmi: dict[str, Any]) -> bool: ...

    async def start_vmi(self, vm_id: str, vmi: dict[str, Any]) -> VMHandle:
        """Boot a fresh guest for the VMI; returns when it is running."""
        ...

    async def prepare_incoming_vmi(
        self, vm_id: str, vmi: dict[str, Any], *, postcopy: bool
    ) -> VMHandle:
        """Empty (zero) RAM and a guest process waiting, paused, for an incoming migration
        (``postcopy``: the migration may switch to post-copy)."""
        ...

    async def adopt_all(self) -> Sequence[VMHandle]:
        """Re-adopt the live guests found in the runtime directory (handler restart).

        (A Sequence, so that a driver may return a list of its own handle type.)"""
        ...

    def source_engine(
        self, context: EngineContext, vmi: dict[str, Any], handle: VMHandle
    ) -> SourceEngine:
        """The engine that migrates ``handle`` (a guest of this driver) away, for the
        hand-off in ``vmi``."""
        ...


class Drivers:
    """This handler's drivers: a VMI runs on the first one that claims it, else on the
    default (the first given)."""

    def __init__(self, default: Driver, *others: Driver) -> None:
        self.default = default
        self.all: tuple[Driver, ...] = (default, *others)

    def for_vmi(self, vmi: dict[str, Any]) -> Driver:
        return next((d for d in self.all[1:] if d.claims(vmi)), self.default)

    def by_name(self, name: str) -> Driver:
        """The driver of a handle (``handle.driver_name``)."""
        return next(d for d in self.all if d.name == name)


# -- the migration's memory digest ---------------------------------------------------------

_digest_pool: ThreadPoolExecutor | None = None
_digest_pool_lock = threading.Lock()


def hash_pool() -> ThreadPoolExecutor:
    """The process's memory-hashing threads (DIGEST_THREADS of them)."""
    global _digest_pool
    with _digest_pool_lock:
        if _digest_pool is None:
            _digest_pool = ThreadPoolExecutor(DIGEST_THREADS, thread_name_prefix="memory-hash")
        return _digest_pool


def ram_digest(buf: memoryview | bytes | bytearray, chunk: int = DIGEST_CHUNK_BYTES) -> str:
    """The memory digest: hex sha256 over the concatenated sha256 digests of consecutive
    ``chunk``-byte pieces of ``buf`` (the last piece may be shorter).

    Chunks hash in a pool of two threads. Blocking: call ram_digest_async() from the
    event loop."""
    if chunk <= 0:
        raise ValueError(f"ram_digest: chunk must be positive, got {chunk}")
    with memoryview(buf) as view, view.cast("B") as data:
        offsets = range(0, len(data), chunk)

        def hash_chunk(offset: int) -> bytes:
            with data[offset : offset + chunk] as piece:
                return hashlib.sha256(piece).digest()

        outer = hashlib.sha256()
        for piece_digest in hash_pool().map(hash_chunk, offsets):
            outer.update(piece_digest)
        return outer.hexdigest()


def file_data_pages(path: Path, page_size: int, page_count: int) -> PageMask | None:
    """Pages of a sparse file that hold data, from SEEK_DATA/SEEK_HOLE (tmpfs and most file
    systems report holes exactly); None if the file system cannot say."""
    mask = np.zeros(page_count, dtype=np.bool_)
    size = page_count * page_size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after offset
                    break
                return None
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            mask[start // page_size : -(-end // page_size)] = True
            offset = end
    finally:
        os.close(fd)
    return mask


async def ram_digest_async(
    buf: memoryview | bytes | bytearray, chunk: int = DIGEST_CHUNK_BYTES
) -> str:
    """ram_digest() off the event loop."""
    return await asyncio.to_thread(ram_digest, buf, chunk)
