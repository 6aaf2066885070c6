"""The memvm guest: a process whose RAM is a shared-memory file, running a synthetic workload.

Run by the memvm driver (``handler/drivers/memvm.py``) as::

    python -m handler.drivers.memvm_guest --vm-id ID --vm-dir DIR --ram FILE --dirty FILE \
        --spec JSON [--incoming] [--foreground]

Unless ``--foreground`` is given the process daemonises: it forks, the parent prints the
child's pid on stdout and exits, and the child (the guest) continues in a session of its
own, so that it is never a child of the handler and outlives a handler restart.

``python -m handler.drivers.memvm_guest --launcher`` is the same program started ahead
of need: it imports everything (numpy and asyncio: ~0.25 s here) and then waits for one
line on stdin, ``{"argv": [...], "log": PATH}``, and goes on as if started with that
argv, its stderr the guest log. The driver keeps one launcher warm, so starting a guest
(a migration target above all) does not wait for Python to start. End of input: it exits.

Memory (both files are created, sized and eventually deleted by the driver):

- ``--ram``: guest RAM, ``memory_bytes`` long. Page 0 is the header (the guest's "CPU
  state", so that it migrates with memory; layout in :class:`Header`): magic, tick
  counter, wall-clock time of the last tick, the workload's RNG seed (the RNG position is
  the tick counter: tick N draws from ``PCG64([seed, N])``). The workload writes the hot
  set: ``hot_set_bytes`` after page 0, or all of RAM when that is 0.
- ``--dirty``: the dirty log, one byte per page. The guest sets byte i to 1 *after* it has
  finished writing page i; the handler harvests clear-then-copy, so no write is missed.

One tick (every ``tick_interval_s``, stretched by the throttle): 1. write the header into
page 0 and mark page 0 dirty; 2. write ``dirty_rate * elapsed run time`` bytes' worth of
hot-set pages (one vectorised assignment) and mark them dirty. Everything runs on one
thread, between awaits, so a control request is always handled between two ticks: when
``pause`` answers, no write is in progress and none follows.

Throttle (auto-converge) at p %: ticks come ``100 / (100 - p)`` times further apart and
the workload only accrues ``(100 - p) %`` of wall time, so it dirties that much less.

Control: ``control.sock`` in the vm dir, JSON lines, one request -> one response::

    {"op": "status"}                       -> {"ok": true, "state": ..., "ticks": ...}
    {"op": "pause"} / {"op": "resume", "device_state": {...}?} / {"op": "throttle",
    "percent": n} / {"op": "state"} (paused only) -> {"ok": true, "device_state": {...}}
    {"op": "stop"}
    anything wrong                         -> {"ok": false, "error": "..."}

Incoming mode (``--incoming``): the guest maps RAM, writes nothing and waits for
``resume``; then it reads the header the migration copied into page 0 (checked against
the device state when one is given) and continues the workload from it. The downtime as
the guest sees it, first tick after a resume minus the last tick recorded in page 0, is
reported as ``resume_gap_ms``.

Files in the vm dir: ``vm.json`` (pid, spec, paths; written at start, for re-adoption),
``control.sock`` (removed on exit), ``console.log`` (a heartbeat line about once a second,
like a serial console). SIGTERM or ``stop`` ends the process with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from handler.drivers.base import GuestSpec

GUEST_MODULE = "handler.drivers.memvm_guest"
CONTROL_SOCKET_NAME = "control.sock"
VM_JSON_NAME = "vm.json"
CONSOLE_LOG_NAME = "console.log"
GUEST_LOG_NAME = "guest.log"  # the guest's stdout/stderr (tracebacks), opened by the driver
VM_JSON_FORMAT = "memvm-vm/1"
DEVICE_STATE_FORMAT = "memvm-device-state/1"

HEADER_MAGIC = b"VMFMEMV1"
HEADER_LAYOUT_VERSION = 1

CONSOLE_INTERVAL_S = 1.0  # one heartbeat line a second, like a serial console
MAX_PAGES_PER_TICK = 4096  # 16 MiB: bounds how long one tick keeps control requests waiting
MAX_CATCH_UP_S = 0.1  # a late tick makes up at most this much run time (or two periods)
BOOT_CHUNK_PAGES = 4096  # 16 MiB of fresh content per step of the boot fill
MAX_REQUEST_BYTES = 1 << 20
TEXT_CORPUS_WORDS = 400_000  # ~2 MiB of text that zlib compresses to about a third
STAMP_BYTES = 16  # (tick, page index) at the start of every written page
FAULT_POLL_S = 0.0002  # post-copy: how often a faulting access looks for its page

Pages = npt.NDArray[np.uint8]
Indices = npt.NDArray[np.int64]

_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier (a locked instruction on x86), between the data and the
    dirty-log accesses of guest and handler. Without it the handler's clear of a dirty
    byte could become visible after its loads of the page (store-load reordering)."""
    with _fence_lock:
        pass


# -- process identity ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    state: str  # R, S, D, Z, ...
    start_ticks: int  # start time after boot, in clock ticks: (pid, start) names a process


def proc_info(pid: int) -> ProcInfo | None:
    """State and start time of a process from /proc, or None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = stat[stat.rindex(")") + 2 :].split()
    return ProcInfo(state=rest[0], start_ticks=int(rest[19]))


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_guest_process(pid: int, start_ticks: int | None, vm_id: str) -> bool:
    """True if ``pid`` is a live (not zombie) memvm guest for ``vm_id``, started at
    ``start_ticks`` when that is known (guards against pid reuse)."""
    info = proc_info(pid)
    if info is None or info.state in ("Z", "X", "x"):
        return False
    if start_ticks is not None and info.start_ticks != start_ticks:
        return False
    argv = proc_cmdline(pid)
    if GUEST_MODULE not in argv:
        return False
    if "--vm-id" in argv[:-1] and argv[argv.index("--vm-id") + 1] == vm_id:
        return True
    # Started from a launcher, the guest keeps the launcher's command line; it runs in its
    # VM directory (set before the fork), which is named after the VM. A directory deleted
    # under the running guest reads "<dir> (deleted)": still this guest (the start time
    # above guards against a reused pid).
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return Path(cwd.removesuffix(" (deleted)")).name == vm_id


# -- page 0 -------------------------------------------------------------------------------


_HEADER_STRUCT = struct.Struct("<8sIIQQQQQQQ")


@dataclass(frozen=True)
class Header:
    """The guest's CPU state, kept in RAM page 0 so that it migrates with memory."""

    page_size: int
    memory_bytes: int
    ticks: int
    last_tick_ns: int  # time.time_ns() of the last tick
    seed: int  # workload RNG: tick N draws from PCG64([seed, N])
    boot_ns: int
    pages_written: int
    resumes: int

    def write(self, ram: mmap.mmap) -> None:
        _HEADER_STRUCT.pack_into(
            ram,
            0,
            HEADER_MAGIC,
            HEADER_LAYOUT_VERSION,
            self.page_size,
            self.memory_bytes,
            self.ticks,
            self.last_tick_ns,
            self.seed,
            self.boot_ns,
            self.pages_written,
            self.resumes,
        )

    @classmethod
    def read(cls, ram: mmap.mmap | memoryview) -> Header | None:
        """The header in page 0, or None when page 0 holds no memvm header."""
        magic, version, *values = _HEADER_STRUCT.unpack_from(ram, 0)
        if magic != HEADER_MAGIC or version != HEADER_LAYOUT_VERSION:
            return None
        return cls(*values)


# -- content --------------------------------------------------------------------------------


def _text_corpus(size_words: int = TEXT_CORPUS_WORDS) -> npt.NDArray[np.uint8]:
    """Deterministic word salad: lines of words from a 256-word vocabulary."""
    rng = np.random.default_rng(0x7E47)
    syllables = np.array(
        "ka lo mi ne ru ta vo shi en an or the in at is er on re st ing al de co ma pe li "
        "so un".split()
    )
    vocab = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(256)]
    ids = rng.integers(0, len(vocab), size=size_words).tolist()
    lines = (" ".join(vocab[i] for i in ids[j : j + 12]) for j in range(0, len(ids), 12))
    return np.frombuffer("\n".join(lines).encode(), dtype=np.uint8)


class ContentGenerator:
    """New page contents of one kind, a batch at a time (no per-byte or per-page loops)."""

    def __init__(self, kind: str, page_size: int) -> None:
        self.kind = kind
        self.page_size = page_size
        self._text_windows: npt.NDArray[np.uint8] | None = None
        if kind in ("text", "mixed"):
            self._text_windows = sliding_window_view(_text_corpus(), page_size)

    def _random(self, rng: np.random.Generator, count: int) -> Pages:
        raw = rng.bit_generator.random_raw(count * self.page_size // 8)
        assert isinstance(raw, np.ndarray)
        return raw.view(np.uint8).reshape(count, self.page_size)

    def _text(self, rng: np.random.Generator, count: int) -> Pages:
        assert self._text_windows is not None
        offsets = rng.integers(0, len(self._text_windows), size=count)
        return self._text_windows[offsets]  # fancy indexing copies whole rows

    def kind_of(self, pages: Indices) -> npt.NDArray[np.int64]:
        """For "mixed": 0 random, 1 text, 2 zero, by page index (interleaved thirds)."""
        return pages % 3

    def pages(self, rng: np.random.Generator, indices: Indices, tick: int) -> Pages:
        """Fresh contents for ``indices``, each stamped with (tick, page index)."""
        count = len(indices)
        if self.kind == "random":
            out = self._random(rng, count)
        elif self.kind == "text":
            out = self._text(rng, count)
        else:
            out = np.zeros((count, self.page_size), dtype=np.uint8)
            if self.kind == "mixed":
                kinds = self.kind_of(indices)
                is_random, is_text = kinds == 0, kinds == 1
                out[is_random] = self._random(rng, int(is_random.sum()))
                out[is_text] = self._text(rng, int(is_text.sum()))
        stamps = np.empty((count, 2), dtype=np.uint64)
        stamps[:, 0] = tick
        stamps[:, 1] = indices
        out[:, :STAMP_BYTES] = stamps.view(np.uint8).reshape(count, STAMP_BYTES)
        return out


def tick_rng(seed: int, tick: int) -> np.random.Generator:
    """The workload RNG of one tick (tick 0 is the boot fill)."""
    return np.random.Generator(np.random.PCG64([seed, tick]))


# -- the guest ------------------------------------------------------------------------------


class RequestError(Exception):
    """A control request the guest refuses; the message goes back to the caller."""


class Guest:
    """One guest: its memory mappings, workload and control server. Single-threaded:
    every field is owned by the event loop thread."""

    def __init__(
        self,
        vm_id: str,
        vm_dir: Path,
        ram_path: Path,
        dirty_path: Path,
        spec: GuestSpec,
        incoming: bool,
    ) -> None:
        self.vm_id = vm_id
        self.vm_dir = vm_dir
        self.ram_path = ram_path
        self.dirty_path = dirty_path
        self.spec = spec
        self.incoming = incoming
        self.state = "incoming" if incoming else "booting"
        self.throttle_percent = 0
        self.resume_gap_ms: float | None = None
        # Post-copy (on a migration target): pages whose present byte is 0 have not
        # arrived yet; an access sets its requested byte and waits for the page.
        self._present_mm: mmap.mmap | None = None
        self._requested_mm: mmap.mmap | None = None
        self._present: Pages | None = None
        self._requested: Pages | None = None
        self.stall_s = 0.0  # total time accesses waited for missing pages
        self.faults = 0  # accesses (ticks) that had to wait
        self.fault_pages = 0

        self._ram_mm = _map_file(ram_path, spec.memory_bytes)
        self._dirty_mm = _map_file(dirty_path, spec.page_count)
        self._ram: Pages = np.frombuffer(self._ram_mm, dtype=np.uint8).reshape(
            spec.page_count, spec.page_size
        )
        self._dirty: Pages = np.frombuffer(self._dirty_mm, dtype=np.uint8)
        self._content = ContentGenerator(spec.content, spec.page_size)
        hot_pages = spec.page_count - 1
        if spec.hot_set_bytes:
            hot_pages = min(hot_pages, math.ceil(spec.hot_set_bytes / spec.page_size))
        self._hot_end = 1 + hot_pages  # the hot set is pages [1, hot_end)

        now = time.time_ns()
        self.header = Header(
            page_size=spec.page_size,
            memory_bytes=spec.memory_bytes,
            ticks=0,
            last_tick_ns=now,
            seed=int.from_bytes(os.urandom(8), "little") >> 1,
            boot_ns=now,
            pages_written=0,
            resumes=0,
        )
        self._started_ns = now
        self._owed_bytes = 0.0
        self._last_run_mono = time.monotonic()
        self._next_tick_mono = self._last_run_mono
        self._last_console_mono = 0.0
        self._gap_pending = False
        self._running = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._console: TextIO = open(  # closed when the guest stops
            vm_dir / CONSOLE_LOG_NAME, "a", encoding="utf-8", buffering=1
        )
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": self._op_status,
            "pause": self._op_pause,
            "resume": self._op_resume,
            "throttle": self._op_throttle,
            "state": self._op_state,
            "stop": self._op_stop,
            "postcopy_done": self._op_postcopy_done,
        }

    # -- lifecycle --

    def console(self, message: str) -> None:
        self._console.write(f"[{time.time():.6f}] {message}\n")

    def boot(self) -> None:
        """Fresh boot: fill RAM with the configured content and write the header."""
        spec = self.spec
        started = time.monotonic()
        touched_pages = spec.page_count
        if spec.touched_bytes:
            touched_pages = min(spec.page_count, math.ceil(spec.touched_bytes / spec.page_size))
        filled = 0
        if spec.content != "zero":
            rng = tick_rng(self.header.seed, 0)
            for start in range(1, touched_pages, BOOT_CHUNK_PAGES):
                indices = np.arange(
                    start, min(start + BOOT_CHUNK_PAGES, touched_pages), dtype=np.int64
                )
                if spec.content == "mixed":  # the zero third stays sparse
                    indices = indices[self._content.kind_of(indices) != 2]
                self._ram[indices] = self._content.pages(rng, indices, 0)
                filled += len(indices)
        self.header = replace(self.header, last_tick_ns=time.time_ns())
        self.header.write(self._ram_mm)
        self.state = "running"
        self._running.set()
        self.console(
            f"memvm guest {self.vm_id} booted: {spec.memory_bytes} bytes, {filled} pages of "
            f"{spec.content} content in {time.monotonic() - started:.3f}s, "
            f"dirty rate {spec.dirty_rate_bytes} B/s"
        )

    def write_vm_json(self) -> None:
        info = proc_info(os.getpid())
        record = {
            "format": VM_JSON_FORMAT,
            "driver": "memvm",
            "vm_id": self.vm_id,
            "pid": os.getpid(),
            "pid_start_ticks": info.start_ticks if info else None,
            "spec": self.spec.to_json(),
            "ram_path": str(self.ram_path),
            "dirty_path": str(self.dirty_path),
            "control_socket": str(self.vm_dir / CONTROL_SOCKET_NAME),
            "incoming": self.incoming,
            "started_ns": self._started_ns,
        }
        tmp = self.vm_dir / f".{VM_JSON_NAME}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.vm_dir / VM_JSON_NAME)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if not self.incoming:
            self.boot()
        self.write_vm_json()
        # Relative path: the vm dir is our cwd, and AF_UNIX paths are limited to 108 bytes.
        server = await asyncio.start_unix_server(
            self._serve_client, path=CONTROL_SOCKET_NAME, limit=MAX_REQUEST_BYTES
        )
        if self.incoming:
            self.console(f"memvm guest {self.vm_id} waiting for incoming migration")
        self._last_run_mono = self._next_tick_mono = time.monotonic()
        workload = asyncio.create_task(self._workload())
        try:
            await self._stop.wait()
        finally:
            self.state = "stopped"
            self._running.clear()
            workload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await workload
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(CONTROL_SOCKET_NAME)
            self.console(
                f"memvm guest {self.vm_id} stopped ({self._stop_reason}) at tick "
                f"{self.header.ticks}"
            )
            self._console.close()
        return 0

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop.set()
        self._wake.set()

    # -- workload --

    def _period(self) -> float:
        """Seconds from one tick to the next at the current throttle."""
        return self.spec.tick_interval_s * 100 / (100 - self.throttle_percent)

    async def _workload(self) -> None:
        while True:
            if not self._running.is_set():
                await self._running.wait()
            now = time.monotonic()
            if now >= self._next_tick_mono:  # else woken early: the resume made this tick
                await self._tick(now)
                period = self._period()
                self._next_tick_mono += period
                if self._next_tick_mono < now:  # late: skip, the owed bytes catch up instead
                    self._next_tick_mono = now + period
            delay = self._next_tick_mono - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()

    async def _fault_in(self, indices: Indices) -> None:
        """Post-copy: wait until every page in ``indices`` has arrived (a demand fault
        per missing page: its requested byte tells the handler to fetch it first)."""
        present, requested = self._present, self._requested
        if present is None or requested is None:
            return
        missing = np.unique(indices[present[indices] == 0])
        if not missing.size:
            return
        started = time.monotonic()
        requested[missing] = 1
        memory_fence()
        self.faults += 1
        self.fault_pages += int(missing.size)
        while missing.size and not self._stop.is_set():
            await asyncio.sleep(FAULT_POLL_S)
            memory_fence()
            missing = missing[present[missing] == 0]
        self.stall_s += time.monotonic() - started

    async def _tick(self, now_mono: float) -> None:
        """One tick: the heartbeat into page 0, then this tick's share of page writes.
        Nothing is written before every page the tick touches is present (post-copy), so
        a pause that arrives while the tick waits for pages still finds no write
        in progress; the tick is then skipped."""
        spec = self.spec
        if self._present is not None:
            tick = self.header.ticks + 1
            planned = min(
                int((self._owed_bytes + spec.dirty_rate_bytes * MAX_CATCH_UP_S) // spec.page_size),
                MAX_PAGES_PER_TICK,
            )
            rng = tick_rng(self.header.seed, tick)
            probe = rng.integers(1, self._hot_end, size=planned, dtype=np.int64)
            await self._fault_in(np.concatenate(([0], probe)))
            if not self._running.is_set():
                return
            self._sync_tick(time.monotonic(), fault_checked=probe)
            return
        self._sync_tick(now_mono, fault_checked=None)

    def _sync_tick(self, now_mono: float, fault_checked: Indices | None) -> None:
        spec = self.spec
        run_fraction = (100 - self.throttle_percent) / 100
        period = self._period()
        elapsed = min(now_mono - self._last_run_mono, max(MAX_CATCH_UP_S, 2 * period))
        self._last_run_mono = now_mono
        self._owed_bytes += spec.dirty_rate_bytes * elapsed * run_fraction
        count = min(int(self._owed_bytes // spec.page_size), MAX_PAGES_PER_TICK)
        self._owed_bytes = min(self._owed_bytes - count * spec.page_size, float(spec.page_size))

        now_ns = time.time_ns()
        resumes = self.header.resumes
        if self._gap_pending:
            self._gap_pending = False
            self.resume_gap_ms = (now_ns - self.header.last_tick_ns) / 1e6
            resumes += 1
            self.console(
                f"resumed at tick {self.header.ticks}: {self.resume_gap_ms:.3f} ms since "
                "the last tick"
            )
        tick = self.header.ticks + 1
        self.header = replace(
            self.header,
            ticks=tick,
            last_tick_ns=now_ns,
            pages_written=self.header.pages_written + count,
            resumes=resumes,
        )
        self.header.write(self._ram_mm)
        memory_fence()
        self._dirty[0] = 1

        if count:
            rng = tick_rng(self.header.seed, tick)
            indices = rng.integers(1, self._hot_end, size=count, dtype=np.int64)
            if fault_checked is not None and len(fault_checked) >= count:
                indices = fault_checked[:count]  # the pages faulted in for this tick
            elif self._present is not None:  # more than probed: only pages known present
                indices = indices[self._present[indices] == 1]
            self._ram[indices] = self._content.pages(rng, indices, tick)
            memory_fence()
            self._dirty[indices] = 1

        if now_mono - self._last_console_mono >= CONSOLE_INTERVAL_S:
            self._last_console_mono = now_mono
            self.console(f"tick={tick} t={now_ns / 1e9:.6f}")

    # -- control --

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while not self._stop.is_set():
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_REQUEST_BYTES
                    writer.write(_encode({"ok": False, "error": "request line too long"}))
                    break
                if not line:
                    break
                response, stop_after = self.handle_request(line)
                writer.write(_encode(response))
                await writer.drain()
                if stop_after:
                    self.request_stop("stop request")
        except ConnectionError:
            pass
        finally:
            writer.close()

    def handle_request(self, line: bytes) -> tuple[dict[str, Any], bool]:
        """One JSON request line -> (response, whether to stop after answering)."""
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"request is not JSON: {e}"}, False
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": 'request must be a JSON object with a string "op"'}, False
        op = request["op"]
        handler = self._ops.get(op)
        if handler is None:
            known = ", ".join(sorted(self._ops))
            return {"ok": False, "error": f"unknown op {op!r}; known ops: {known}"}, False
        try:
            result = handler(request)
        except RequestError as e:
            return {"ok": False, "error": str(e)}, False
        return {"ok": True, **result}, op == "stop"

    def status(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "state": self.state,
            "ticks": self.header.ticks,
            "last_tick_ns": self.header.last_tick_ns,
            "throttle_percent": self.throttle_percent,
            "resume_gap_ms": self.resume_gap_ms,
            "pid": os.getpid(),
            "dirty_rate": self.spec.dirty_rate_bytes,
            "effective_dirty_rate": self.spec.dirty_rate_bytes
            * (100 - self.throttle_percent)
            // 100,
            "memory_bytes": self.spec.memory_bytes,
            "pages_written": self.header.pages_written,
            "resumes": self.header.resumes,
            "postcopy": self._present is not None,
            "stall_ms": round(self.stall_s * 1000, 3),
            "faults": self.faults,
            "fault_pages": self.fault_pages,
        }

    def device_state(self) -> dict[str, Any]:
        h = self.header
        return {
            "format": DEVICE_STATE_FORMAT,
            "vm_id": self.vm_id,
            "ticks": h.ticks,
            "last_tick_ns": h.last_tick_ns,
            "seed": h.seed,
            "boot_ns": h.boot_ns,
            "pages_written": h.pages_written,
            "resumes": h.resumes,
            "memory_bytes": h.memory_bytes,
            "page_size": h.page_size,
            "content": self.spec.content,
            "throttle_percent": self.throttle_percent,
        }

    def _op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def _op_pause(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.state == "running":
            self.state = "paused"
            self._running.clear()
            self.console(f"paused at tick {self.header.ticks}")
        elif self.state != "paused":
            raise RequestError(f"cannot pause a guest that is {self.state}")
        return self.status()

    def _op_resume(self, request: dict[str, Any]) -> dict[str, Any]:
        device_state = request.get("device_state")
        if device_state is not None and not isinstance(device_state, dict):
            raise RequestError("device_state must be a JSON object")
        if self.state == "running":
            if device_state is not None:
                raise RequestError("guest is already running; device_state not applied")
            return self.status()
        if self.state == "incoming":
            header = Header.read(self._ram_mm)
            if header is None:
                raise RequestError(
                    "page 0 holds no memvm header: guest memory was not migrated into this "
                    "guest; copy the source's RAM before resuming"
                )
            if (header.page_size, header.memory_bytes) != (
                self.spec.page_size,
                self.spec.memory_bytes,
            ):
                raise RequestError(
                    f"migrated memory has geometry {header.memory_bytes} bytes / "
                    f"{header.page_size}-byte pages, this guest has {self.spec.memory_bytes} "
                    f"/ {self.spec.page_size}"
                )
        elif self.state == "paused":
            header = self.header
        else:
            raise RequestError(f"cannot resume a guest that is {self.state}")
        if device_state is not None:
            _check_device_state(device_state, header)
        postcopy = request.get("postcopy")
        if postcopy is not None:
            if self.state != "incoming" or not isinstance(postcopy, dict):
                raise RequestError("postcopy applies to an incoming guest: {present, requested}")
            try:
                self._present_mm = _map_file(Path(postcopy["present"]), self.spec.page_count)
                self._requested_mm = _map_file(Path(postcopy["requested"]), self.spec.page_count)
            except (KeyError, OSError, SystemExit) as e:
                raise RequestError(f"cannot map the post-copy bitmaps: {e}") from None
            self._present = np.frombuffer(self._present_mm, dtype=np.uint8)
            self._requested = np.frombuffer(self._requested_mm, dtype=np.uint8)
            self.console(
                f"resuming in post-copy: {int((self._present == 0).sum())} pages still missing"
            )
        self.header = header
        self.state = "running"
        if self.incoming:
            self.incoming = False
            # A re-adopting handler sees a regular guest now. Written once the answer and
            # the first tick are out: a file write is downtime otherwise.
            asyncio.get_running_loop().call_soon(self.write_vm_json)
        self._gap_pending = True
        self._owed_bytes = 0.0
        now = time.monotonic()
        self._last_run_mono = self._next_tick_mono = now
        if self._present is None:
            # The vCPU runs from the moment it is resumed: its first tick (the heartbeat
            # the downtime is measured by) is made here, not once the answer has gone out
            # and the loop has come round to the workload (1-2 ms later, measured).
            self._sync_tick(now, fault_checked=None)
            self._next_tick_mono = now + self._period()
        self._running.set()
        self._wake.set()
        return self.status()

    def _op_throttle(self, request: dict[str, Any]) -> dict[str, Any]:
        percent = request.get("percent")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 99:
            raise RequestError(f"throttle percent must be an integer 0..99, got {percent!r}")
        if percent != self.throttle_percent:
            self.console(f"throttle {self.throttle_percent}% -> {percent}%")
            self.throttle_percent = percent
            self._wake.set()
        return self.status()

    def _op_state(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.state != "paused":
            raise RequestError(
                f"device state is only available while the guest is paused (it is "
                f"{self.state}); pause it first"
            )
        return {"device_state": self.device_state()}

    def _op_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"state": "stopping"}

    def _op_postcopy_done(self, request: dict[str, Any]) -> dict[str, Any]:
        """Every page has arrived: stop checking the present bitmap."""
        if self._present is not None and not bool(self._present.all()):
            raise RequestError(f"{int((self._present == 0).sum())} pages are still missing")
        self._present = self._requested = None
        for name in ("_present_mm", "_requested_mm"):
            mapping = getattr(self, name)
            setattr(self, name, None)
            if mapping is not None:
                with contextlib.suppress(BufferError):
                    mapping.close()
        self.console(
            f"post-copy complete: {self.faults} faults ({self.fault_pages} pages) waited "
            f"{self.stall_s * 1000:.1f} ms in total"
        )
        return self.status()


def _check_device_state(device_state: dict[str, Any], header: Header) -> None:
    """The device state must describe the same moment as the memory's page 0."""
    if device_state.get("format") != DEVICE_STATE_FORMAT:
        raise RequestError(
            f"device_state format {device_state.get('format')!r} is not {DEVICE_STATE_FORMAT!r}"
        )
    for name in ("ticks", "seed", "last_tick_ns"):
        if device_state.get(name) != getattr(header, name):
            raise RequestError(
                f"device_state {name}={device_state.get(name)!r} does not match guest memory "
                f"({name}={getattr(header, name)!r}): the final memory copy is incomplete or "
                "the state belongs to another pause"
            )


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _map_file(path: Path, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise SystemExit(f"memvm guest: {path} is {actual} bytes, expected {size}")
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {GUEST_MODULE}", description=__doc__)
    parser.add_argument("--vm-id", required=True)
    parser.add_argument("--vm-dir", required=True, type=Path)
    parser.add_argument("--ram", required=True, type=Path, help="guest RAM file")
    parser.add_argument("--dirty", required=True, type=Path, help="dirty log file")
    parser.add_argument("--spec", required=True, help="GuestSpec as JSON")
    parser.add_argument("--incoming", action="store_true", help="wait for migrated memory")
    parser.add_argument("--foreground", action="store_true", help="do not daemonise")
    return parser.parse_args(argv)


def _await_launch() -> list[str] | None:
    """--launcher: one launch request from stdin; None at end of input (not needed)."""
    line = sys.stdin.readline()
    if not line.strip():
        return None
    request = json.loads(line)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 2)
    os.close(log)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the guest does not hold the driver's pipe
    os.close(devnull)
    argv: list[str] = request["argv"]
    return argv


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--launcher"]:
        argv = _await_launch()
        if argv is None:
            return 0
    args = parse_args(argv)
    try:
        spec = GuestSpec.from_json(json.loads(args.spec))
    except (ValueError, TypeError) as e:
        print(f"memvm guest: bad --spec: {e}", file=sys.stderr)
        return 2
    os.umask(0o077)
    vm_dir = args.vm_dir.resolve()
    os.chdir(vm_dir)  # before the fork: the guest is known by its directory (is_guest_process)
    if not args.foreground:
        child = os.fork()
        if child:
            sys.stdout.write(f"{child}\n")
            sys.stdout.flush()
            os._exit(0)
        with contextlib.suppress(OSError):
            os.setsid()
        os.dup2(2, 1)  # stdout joins stderr (the guest log) and lets go of the pid pipe
    guest = Guest(
        vm_id=args.vm_id,
        vm_dir=vm_dir,
        ram_path=args.ram.resolve(),
        dirty_path=args.dirty.resolve(),
        spec=spec,
        incoming=args.incoming,
    )
    return asyncio.run(guest.run())


if __name__ == "__main__":
    sys.exit(main())
