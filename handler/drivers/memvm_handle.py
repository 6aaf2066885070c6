"""The memvm guest's handle: the handler's view of one memvm guest process.

A memvm guest (``handler/drivers/memvm_guest.py``) is a process whose RAM is a
shared-memory file. The driver (``memvm.py``) owns the files; the guest only maps them:

- ``<ram_dir>/memvm-<tag>/<vm_id>.ram``   guest RAM (sparse, ftruncate'd to memory_bytes)
- ``<ram_dir>/memvm-<tag>/<vm_id>.dirty`` dirty log, one byte per page
- ``<runtime_dir>/<vm_id>/``              vm.json, control.sock, console.log, guest.log

:class:`MemVMHandle` maps RAM and the dirty log (a VMHandle, DirtyLogHandle and
PostCopyHandle); :class:`GuestControl` is its connection to the guest's control socket.
A guest is identified by (pid, process start time) plus its command line, so a reused
pid is never mistaken for a guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from handler.drivers.base import (
    DriverError,
    GuestError,
    GuestSpec,
    GuestStatus,
    PageIndices,
    PageMask,
    file_data_pages,
    unmap,
)
from handler.drivers.memvm_guest import (
    CONTROL_SOCKET_NAME,
    Header,
    is_guest_process,
    memory_fence,
)

__all__ = ["DEFAULT_RAM_DIR", "DRIVER_NAME", "GuestControl", "MemVMHandle", "check_vm_id"]


log = logging.getLogger(__name__)

DRIVER_NAME = "memvm"
DEFAULT_RAM_DIR = Path("/dev/shm/vmferry")
CONTROL_TIMEOUT_S = 10.0  # a guest answers between two ticks, i.e. within milliseconds
STOP_TIMEOUT_S = 10.0  # graceful stop, then SIGKILL
KILL_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.01
MAX_SOCKET_PATH = 100  # AF_UNIX sun_path is 108 bytes; longer paths go via /proc/self/fd
_VM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_vm_id(vm_id: str) -> str:
    if not _VM_ID_RE.fullmatch(vm_id):
        raise ValueError(
            f"vm_id {vm_id!r} is not filesystem-safe: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return vm_id


def _create_sparse(path: Path, size: int) -> None:
    """A zero-filled file of ``size`` bytes without allocating memory (ftruncate)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _map(path: Path, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise DriverError(f"{path} is {actual} bytes, expected {size}")
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class GuestControl:
    """Client of a guest's control socket. It keeps one connection and sends requests over
    it one at a time: pause, device state and resume are downtime, and a connect plus the
    guest's accept cost more than the request itself (0.50 against 0.16 ms a request,
    idle, here). A connection the guest closed (it stopped or was restarted) is replaced
    before the next request; a request cut short (timeout, cancel, a broken connection)
    drops its connection, since its answer may still arrive. Never sent twice."""

    def __init__(self, vm_id: str, vm_dir: Path, pid: int, pid_start_ticks: int | None) -> None:
        self.vm_id = vm_id
        self.vm_dir = vm_dir
        self.pid = pid
        self.pid_start_ticks = pid_start_ticks
        self.path = vm_dir / CONTROL_SOCKET_NAME
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop _conn and _turn use
        self._turn = asyncio.Lock()

    def close(self) -> None:
        """Close the kept connection (the next request opens one)."""
        conn, self._conn = self._conn, None
        if conn is not None and self._loop is not None and not self._loop.is_closed():
            conn[1].close()

    def _take_turn(self) -> asyncio.Lock:
        """The lock requests take turns with, on the running loop: a connection and a
        lock belong to the loop that made them (a test may use the same VM from several)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._conn = None  # the old loop's transport goes with that loop
            self._loop, self._turn = loop, asyncio.Lock()
        return self._turn

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is not None:
            reader, writer = self._conn
            if not reader.at_eof() and not writer.is_closing():
                return self._conn
            self.close()
        self._conn = await self._open()
        return self._conn

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = str(self.path)
        if len(path.encode()) <= MAX_SOCKET_PATH:
            return await asyncio.open_unix_connection(path, limit=1 << 20)
        dir_fd = os.open(self.vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return await asyncio.open_unix_connection(
                f"/proc/self/fd/{dir_fd}/{CONTROL_SOCKET_NAME}", limit=1 << 20
            )
        finally:
            os.close(dir_fd)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; returns the guest's response (whose ``ok`` is true).

        Raises GuestError if the guest refuses, does not answer within CONTROL_TIMEOUT_S
        or cannot be reached."""
        message = json.dumps({"op": op, **fields}).encode() + b"\n"
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT_S), self._take_turn():
                reader, writer = await self._connection()
                try:
                    writer.write(message)
                    await writer.drain()
                    line = await reader.readline()
                except BaseException:
                    self.close()
                    raise
                if not line:
                    self.close()
        except TimeoutError:
            raise GuestError(
                f"VM {self.vm_id}: guest (pid {self.pid}) did not answer {op!r} within "
                f"{CONTROL_TIMEOUT_S:.0f}s"
            ) from None
        except (OSError, ValueError) as e:
            alive = is_guest_process(self.pid, self.pid_start_ticks, self.vm_id)
            raise GuestError(
                f"VM {self.vm_id}: cannot reach the guest's control socket {self.path} ({e}); "
                f"the guest process {self.pid} is {'running' if alive else 'not running'}"
            ) from e
        if not line:
            raise GuestError(
                f"VM {self.vm_id}: guest closed the connection without answering {op!r}"
            )
        try:
            response = json.loads(line)
        except ValueError as e:
            raise GuestError(f"VM {self.vm_id}: guest answered {op!r} with non-JSON: {e}") from e
        if not isinstance(response, dict) or response.get("ok") is not True:
            error = response.get("error") if isinstance(response, dict) else response
            raise GuestError(f"VM {self.vm_id}: guest refused {op!r}: {error}")
        return response


class MemVMHandle:
    """The handler's view of one memvm guest: its RAM and dirty-log mappings and its
    control socket. The mappings belong to this handle: close() or destroy() unmap them
    (a mapping still exported through a memoryview from ram() is unmapped when the
    last view goes away)."""

    def __init__(
        self,
        vm_id: str,
        spec: GuestSpec,
        pid: int,
        pid_start_ticks: int | None,
        vm_dir: Path,
        ram_path: Path,
        dirty_path: Path,
        control: GuestControl | None = None,
    ) -> None:
        """``control``: the connection start-up already opened (the first request, often a
        migration target's resume, then needs no connect)."""
        self.vm_id = vm_id
        self.spec = spec
        self.pid = pid
        self.pid_start_ticks = pid_start_ticks
        self.vm_dir = vm_dir
        self.ram_path = ram_path
        self.dirty_path = dirty_path
        self._control = control or GuestControl(vm_id, vm_dir, pid, pid_start_ticks)
        self._ram_mm: mmap.mmap | None = _map(ram_path, spec.memory_bytes)
        try:
            self._dirty_mm: mmap.mmap | None = _map(dirty_path, spec.page_count)
        except BaseException:
            self._ram_mm.close()
            raise
        self._dirty: npt.NDArray[np.uint8] | None = np.frombuffer(self._dirty_mm, np.uint8)
        self._present_mm: mmap.mmap | None = None  # post-copy bitmaps (target side)
        self._requested_mm: mmap.mmap | None = None

    def __repr__(self) -> str:
        return f"MemVMHandle(vm_id={self.vm_id!r}, pid={self.pid})"

    @property
    def driver_name(self) -> str:
        return DRIVER_NAME

    @property
    def incoming(self) -> bool:
        """memvm keeps no record of it: an adopted guest is judged by its status."""
        return False

    @property
    def page_count(self) -> int:
        return self.spec.page_count

    # -- memory --

    def ram(self) -> memoryview:
        if self._ram_mm is None:
            raise DriverError(f"VM {self.vm_id}: memory is unmapped (handle closed)")
        return memoryview(self._ram_mm)

    def _dirty_log(self) -> npt.NDArray[np.uint8]:
        if self._dirty is None:
            raise DriverError(f"VM {self.vm_id}: dirty log is unmapped (handle closed)")
        return self._dirty

    def harvest_dirty(self) -> PageIndices:
        """Pages written since the last harvest, their bits already cleared (copy them
        after this returns). One harvester at a time: not safe to call concurrently."""
        dirty = self._dirty_log()
        # Scan a snapshot (``dirty != 0`` reads each byte once): the guest keeps setting
        # bytes meanwhile. Clearing only the snapshot's indices keeps clear-then-copy
        # exact: a byte set after the snapshot stays set for the next harvest. (The
        # comparison, then a bool scan: 0.07 ms for 1 GiB of pages, where flatnonzero
        # over the bytes themselves took 0.8 ms -- at every round's end and in the pause.)
        indices = np.flatnonzero(dirty != 0).astype(np.int64, copy=False)
        if len(indices):
            dirty[indices] = 0
            memory_fence()  # the clear is visible before the caller reads the pages
        return indices

    def mark_all_dirty(self) -> None:
        self._dirty_log().fill(1)

    def clear_dirty(self) -> None:
        self._dirty_log().fill(0)

    def data_pages(self) -> PageMask | None:
        return file_data_pages(self.ram_path, self.spec.page_size, self.spec.page_count)

    # -- control --

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one control request; see GuestControl.request()."""
        return await self._control.request(op, **fields)

    async def pause(self) -> None:
        await self.request("pause")

    async def resume(self, device_state: bytes | None = None) -> None:
        fields: dict[str, Any] = {}
        if device_state is not None:
            try:
                state = json.loads(device_state)
            except ValueError as e:
                raise DriverError(f"VM {self.vm_id}: device state is not JSON: {e}") from e
            if not isinstance(state, dict):
                raise DriverError(f"VM {self.vm_id}: device state must be a JSON object")
            fields["device_state"] = state
        await self.request("resume", **fields)

    async def set_throttle(self, percent: int) -> None:
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 99:
            raise ValueError(f"throttle percent must be an integer 0..99, got {percent!r}")
        await self.request("throttle", percent=percent)

    async def device_state(self) -> bytes:
        response = await self.request("state")
        return json.dumps(response["device_state"], sort_keys=True).encode()

    async def status(self) -> GuestStatus:
        """The guest's status. A guest that is gone reports state "stopped" with the
        tick counter found in its memory; a live guest that does not answer raises
        GuestError."""
        try:
            response = await self.request("status")
        except GuestError:
            if self.is_alive():
                raise
            header = Header.read(self._ram_mm) if self._ram_mm is not None else None
            return GuestStatus(
                state="stopped",
                ticks=header.ticks if header else 0,
                last_tick_ns=header.last_tick_ns if header else 0,
                throttle_percent=0,
                resume_gap_ms=None,
                pid=self.pid,
                dirty_rate_bytes=self.spec.dirty_rate_bytes,
                memory_bytes=self.spec.memory_bytes,
                pages_written=header.pages_written if header else 0,
            )
        return GuestStatus(
            state=str(response["state"]),
            ticks=int(response["ticks"]),
            last_tick_ns=int(response["last_tick_ns"]),
            throttle_percent=int(response["throttle_percent"]),
            resume_gap_ms=(
                None if response.get("resume_gap_ms") is None else float(response["resume_gap_ms"])
            ),
            pid=int(response["pid"]),
            dirty_rate_bytes=int(response.get("dirty_rate", 0)),
            memory_bytes=int(response.get("memory_bytes", 0)),
            pages_written=int(response.get("pages_written", 0)),
            postcopy=bool(response.get("postcopy", False)),
            stall_ms=float(response.get("stall_ms", 0.0)),
            faults=int(response.get("faults", 0)),
        )

    # -- post-copy (target side) --

    @property
    def _postcopy_paths(self) -> tuple[Path, Path]:
        return self.ram_path.with_suffix(".present"), self.ram_path.with_suffix(".requested")

    def prepare_postcopy(self, missing: PageIndices) -> None:
        """Create the present/requested bitmaps: every page present except ``missing``."""
        present_path, requested_path = self._postcopy_paths
        for path, fill in ((present_path, 1), (requested_path, 0)):
            if not path.exists():
                _create_sparse(path, self.spec.page_count)
            mapping = _map(path, self.spec.page_count)
            arr = np.frombuffer(mapping, np.uint8)
            arr[:] = fill
            if fill:
                arr[missing] = 0
            setattr(self, "_present_mm" if fill else "_requested_mm", mapping)
        memory_fence()

    def _bitmap(self, name: str) -> npt.NDArray[np.uint8]:
        mapping = getattr(self, name, None)
        if mapping is None:
            mapping = self._map_surviving_bitmap(name)
        if mapping is None:
            raise DriverError(f"VM {self.vm_id}: not in post-copy (no {name[1:-3]} bitmap)")
        return np.frombuffer(mapping, np.uint8)

    def _map_surviving_bitmap(self, name: str) -> mmap.mmap | None:
        """A guest re-adopted in post-copy (the handler restarted while pages still
        arrived): its bitmaps are files the guest maps too, and they outlive the handler;
        map them again as they are (never refilled: what is present stays present)."""
        present_path, requested_path = self._postcopy_paths
        path = present_path if name == "_present_mm" else requested_path
        if self._ram_mm is None or not path.exists():
            return None
        mapping = _map(path, self.spec.page_count)
        setattr(self, name, mapping)
        return mapping

    def present(self) -> npt.NDArray[np.uint8]:
        return self._bitmap("_present_mm")

    def mark_present(self, indices: PageIndices) -> None:
        memory_fence()  # the page contents are visible before their present bytes
        self.present()[indices] = 1

    def requested_pages(self) -> PageIndices:
        requested = np.flatnonzero(self._bitmap("_requested_mm") != 0).astype(np.int64)
        return requested[self.present()[requested] == 0]

    def missing_pages(self) -> PageIndices:
        return np.flatnonzero(self.present() == 0).astype(np.int64)

    async def resume_postcopy(self, device_state: bytes) -> None:
        present_path, requested_path = self._postcopy_paths
        state = json.loads(device_state)
        await self.request(
            "resume",
            device_state=state,
            postcopy={"present": str(present_path), "requested": str(requested_path)},
        )

    async def finish_postcopy(self) -> GuestStatus:
        """All pages arrived: the guest stops checking; the bitmaps are deleted."""
        await self.request("postcopy_done")
        self._drop_postcopy()
        return await self.status()

    def _unmap_postcopy(self) -> None:
        for name in ("_present_mm", "_requested_mm"):
            bitmap: mmap.mmap | None = getattr(self, name, None)
            setattr(self, name, None)
            unmap(bitmap, f"memvm {self.vm_id}: {name}")

    def _drop_postcopy(self) -> None:
        self._unmap_postcopy()
        for path in self._postcopy_paths:
            path.unlink(missing_ok=True)

    # -- process --

    def is_alive(self) -> bool:
        return is_guest_process(self.pid, self.pid_start_ticks, self.vm_id)

    def _signal(self, signum: signal.Signals) -> None:
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    async def _wait_gone(self, limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while self.is_alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_INTERVAL_S)
        return True

    async def stop(self) -> None:
        """Ask the guest to stop (SIGTERM if it cannot be asked), SIGKILL after
        STOP_TIMEOUT_S. Files stay until destroy()."""
        if not self.is_alive():
            return
        try:
            await self.request("stop")
        except GuestError as e:
            log.warning("memvm %s: stop request failed (%s); sending SIGTERM", self.vm_id, e)
            self._signal(signal.SIGTERM)
        if not await self._wait_gone(STOP_TIMEOUT_S):
            log.warning("memvm %s: guest %d ignored stop; killing it", self.vm_id, self.pid)
            await self._kill()

    async def _kill(self) -> None:
        self._signal(signal.SIGKILL)
        if not await self._wait_gone(KILL_TIMEOUT_S):
            log.error("memvm %s: guest %d survived SIGKILL", self.vm_id, self.pid)

    async def destroy(self) -> None:
        if self.is_alive():
            await self._kill()
        mappings = self._detach()
        self._drop_postcopy()
        # Unmapping a large guest's RAM and freeing its file's pages take a while (1 GiB:
        # tens of ms to unmap, ~230 ms to free the tmpfs pages here): not on the event loop.
        await asyncio.to_thread(self._unmap_and_delete, mappings)

    def _unmap_and_delete(self, mappings: dict[str, mmap.mmap | None]) -> None:
        self._unmap(mappings)
        for path in (self.ram_path, self.dirty_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.vm_dir, ignore_errors=True)

    def _detach(self) -> dict[str, mmap.mmap | None]:
        """Forget the guest's mappings (and its control connection); return them to unmap."""
        self._control.close()
        self._dirty = None
        self._unmap_postcopy()
        mappings = {"_ram_mm": self._ram_mm, "_dirty_mm": self._dirty_mm}
        self._ram_mm = self._dirty_mm = None
        return mappings

    def _unmap(self, mappings: dict[str, mmap.mmap | None]) -> None:
        for name, mapping in mappings.items():
            unmap(mapping, f"memvm {self.vm_id}: {name}")

    def close(self) -> None:
        self._unmap(self._detach())
