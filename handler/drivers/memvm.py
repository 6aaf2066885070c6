"""The memvm driver, handler side: starts and re-adopts memvm guests (their handle, which
maps and controls one guest, is in ``memvm_handle.py``).

A memvm guest (``handler/drivers/memvm_guest.py``) is a process whose RAM is a
shared-memory file. This module owns the files; the guest only maps them:

- ``<ram_dir>/memvm-<tag>/<vm_id>.ram``   guest RAM (sparse, ftruncate'd to memory_bytes)
- ``<ram_dir>/memvm-<tag>/<vm_id>.dirty`` dirty log, one byte per page
- ``<runtime_dir>/<vm_id>/``              vm.json, control.sock, console.log, guest.log

``<tag>`` is derived from the runtime directory, so two handlers on one host (a migration
between "nodes" of a test lab) never share a RAM file even though the VM has the same
vm_id on both.

Lifecycle: 1. ``start()``/``prepare_incoming()`` create the files and launch the guest,
which daemonises (forks; the launcher prints the guest's pid and exits), so the guest is
never the handler's child and outlives a handler restart. 2. They wait until the guest
answers ``status`` in the expected state and return a :class:`MemVMHandle`.
3. ``adopt_all()`` after a restart maps the guests found in the runtime directory again.
4. ``destroy()`` kills the guest and deletes every file listed above.

A guest is identified by (pid, process start time) plus its command line, so a reused
pid is never mistaken for a guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handler.drivers.base import (
    DirtyLogHandle,
    Driver,
    DriverError,
    EngineContext,
    GuestError,
    GuestSpec,
    GuestStartError,
    PostCopyHandle,
    VMExistsError,
    VMHandle,
    dirty_log,
    ram_digest,
    ram_digest_async,
)
from handler.drivers.memvm_guest import (
    CONTROL_SOCKET_NAME,
    GUEST_LOG_NAME,
    GUEST_MODULE,
    VM_JSON_NAME,
    is_guest_process,
)
from handler.drivers.memvm_handle import (
    _VM_ID_RE,
    DEFAULT_RAM_DIR,
    DRIVER_NAME,
    POLL_INTERVAL_S,
    GuestControl,
    MemVMHandle,
    _create_sparse,
    check_vm_id,
)
from handler.drivers.scope import NO_SCOPES, GuestScopes
from vmferry.objects import schema
from vmferry.objects.quantity import parse_quantity

if TYPE_CHECKING:
    from handler.migration.source import SourceEngine

__all__ = [
    "DEFAULT_RAM_DIR",
    "GuestControl",
    "MemVMDriver",
    "MemVMHandle",
    "guest_spec",
    "ram_digest",
    "ram_digest_async",
]

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT_S = 30.0  # python start-up + fork; the boot fill comes after
BOOT_TIMEOUT_S = 30.0  # plus BOOT_FILL_BYTES_PER_S for the memory the guest fills
BOOT_FILL_BYTES_PER_S = 64 << 20  # pessimistic; a guest fills ~256 MiB/s on one core


def _read_vm_json(vm_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((vm_dir / VM_JSON_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _log_tail(vm_dir: Path, lines: int = 15) -> str:
    try:
        text = (vm_dir / GUEST_LOG_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no guest log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(guest log is empty)"


def _kill_now(pid: int, vm_id: str) -> None:
    """SIGKILL a guest and wait (synchronously, at most ~1 s) until it is gone; for the
    failure path of a start, which may run while being cancelled and so must not await."""
    if not is_guest_process(pid, None, vm_id):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while is_guest_process(pid, None, vm_id) and time.monotonic() < deadline:
        time.sleep(0.005)


def _guest_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # A guest is one "vCPU": no BLAS/OpenMP thread pools (it also forks after import).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


class MemVMDriver:
    """Runs memvm guests. ``runtime_dir`` holds one directory per VM; RAM files go to a
    subdirectory of ``ram_dir`` named after ``runtime_dir``.

    ``adopt_all()`` returns the live guests and deletes the leftovers of dead ones (their
    vm_ids are kept in ``dead_vm_ids`` for the caller to report)."""

    name = DRIVER_NAME

    def __init__(
        self, runtime_dir: Path, ram_dir: Path = DEFAULT_RAM_DIR, *, scopes: GuestScopes = NO_SCOPES
    ) -> None:
        self.scopes = scopes  # each guest in a systemd scope of its own (drivers/scope.py)
        self.runtime_dir = Path(runtime_dir).absolute()
        tag = hashlib.sha256(str(self.runtime_dir.resolve()).encode()).hexdigest()[:12]
        self.ram_dir = Path(ram_dir).absolute() / f"memvm-{tag}"
        self.dead_vm_ids: list[str] = []
        self._launching: set[str] = set()
        self._keep_warm = False
        self._warm: asyncio.Task[asyncio.subprocess.Process] | None = None

    # -- launchers ------------------------------------------------------------------------
    # A guest starts from a launcher: ``memvm_guest --launcher`` imports everything, then
    # takes one launch request on stdin (see memvm_guest). warm_up() keeps one started
    # ahead, so a guest starts in a fork instead of a Python start-up (~0.25 s here).

    def warm_up(self) -> None:
        """Keep a launcher ready from now on (the handler calls this; tests need not)."""
        self._keep_warm = True
        if self._warm is None:
            self._warm = asyncio.create_task(self._new_launcher())

    async def close(self) -> None:
        """Stop the warm launcher (it exits at the end of its input)."""
        self._keep_warm = False
        warm, self._warm = self._warm, None
        if warm is None:
            return
        with contextlib.suppress(Exception):
            proc = await warm
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.communicate(b""), LAUNCH_TIMEOUT_S)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def _new_launcher(self) -> asyncio.subprocess.Process:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            GUEST_MODULE,
            "--launcher",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            cwd=self.runtime_dir,
            env=_guest_env(),
        )

    async def _launcher(self, *, fresh: bool) -> asyncio.subprocess.Process:
        """The warm launcher (unless ``fresh`` or it is gone), else a new one; a
        replacement starts warming."""
        warm, self._warm = self._warm, None
        proc: asyncio.subprocess.Process | None = None
        if warm is not None:
            try:
                proc = await warm
            except OSError as e:
                log.warning("memvm: the warm guest launcher did not start: %s", e)
            if proc is not None and (fresh or proc.returncode is not None):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                proc = None
        if self._keep_warm:
            self._warm = asyncio.create_task(self._new_launcher())
        return proc if proc is not None else await self._new_launcher()

    def _paths(self, vm_id: str) -> tuple[Path, Path, Path]:
        return (
            self.runtime_dir / vm_id,
            self.ram_dir / f"{vm_id}.ram",
            self.ram_dir / f"{vm_id}.dirty",
        )

    # -- the Driver interface -------------------------------------------------------------

    def claims(self, vmi: dict[str, Any]) -> bool:
        """The default driver: a VMI without another driver's spec runs here."""
        return True

    async def start_vmi(self, vm_id: str, vmi: dict[str, Any]) -> MemVMHandle:
        return await self.start(vm_id, guest_spec(vmi))

    async def prepare_incoming_vmi(
        self, vm_id: str, vmi: dict[str, Any], *, postcopy: bool
    ) -> MemVMHandle:
        return await self.prepare_incoming(vm_id, guest_spec(vmi))

    def source_engine(
        self, context: EngineContext, vmi: dict[str, Any], handle: VMHandle
    ) -> SourceEngine:
        """The memvm engine: this handler copies the guest's memory, round by round."""
        from handler.migration.memvm_source import MemvmSourceMigration

        guest = dirty_log(handle, "a memvm migration")
        return MemvmSourceMigration(
            context.api,
            context.node,
            vmi,
            guest,
            context.tls,
            on_progress=context.on_progress,
            peers=context.peers,
            workers=context.workers,
        )

    async def start(self, vm_id: str, spec: GuestSpec) -> MemVMHandle:
        """Boot a fresh guest; returns once it runs (its RAM is filled by then).

        Raises VMExistsError if the vm_id runs already, GuestStartError if the guest dies
        or does not come up in time (its files are removed then)."""
        return await self._launch(vm_id, spec, incoming=False)

    async def prepare_incoming(self, vm_id: str, spec: GuestSpec) -> MemVMHandle:
        """Zero RAM and a guest waiting, in state "incoming", for resume(device_state)."""
        return await self._launch(vm_id, spec, incoming=True)

    async def _launch(self, vm_id: str, spec: GuestSpec, incoming: bool) -> MemVMHandle:
        check_vm_id(vm_id)
        if vm_id in self._launching:
            raise VMExistsError(f"VM {vm_id} is already being started")
        vm_dir, ram_path, dirty_path = self._paths(vm_id)
        record = _read_vm_json(vm_dir)
        if record is not None and is_guest_process(
            int(record.get("pid", 0)), record.get("pid_start_ticks"), vm_id
        ):
            raise VMExistsError(
                f"VM {vm_id} already runs here (pid {record['pid']}); destroy it first"
            )
        self._launching.add(vm_id)
        pid: int | None = None
        try:
            self._remove_files(vm_id, record)
            vm_dir.mkdir(parents=True, mode=0o700)
            self.ram_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _create_sparse(ram_path, spec.memory_bytes)
            _create_sparse(dirty_path, spec.page_count)
            pid = await self._spawn(vm_id, spec, incoming, vm_dir, ram_path, dirty_path)
            await self.scopes.place(vm_id, pid)
            control = await self._wait_ready(vm_id, spec, incoming, vm_dir, pid)
            try:
                return MemVMHandle(
                    vm_id, spec, pid, control.pid_start_ticks, vm_dir, ram_path, dirty_path, control
                )
            except BaseException:
                control.close()
                raise
        except BaseException:
            if pid is not None:
                _kill_now(pid, vm_id)
            self._remove_files(vm_id, None)
            raise
        finally:
            self._launching.discard(vm_id)

    async def _spawn(
        self,
        vm_id: str,
        spec: GuestSpec,
        incoming: bool,
        vm_dir: Path,
        ram_path: Path,
        dirty_path: Path,
    ) -> int:
        """Launch the guest; returns its pid (the launcher has exited by then)."""
        args = [
            "--vm-id",
            vm_id,
            "--vm-dir",
            str(vm_dir),
            "--ram",
            str(ram_path),
            "--dirty",
            str(dirty_path),
            "--spec",
            json.dumps(spec.to_json(), separators=(",", ":")),
        ]
        if incoming:
            args.append("--incoming")
        log_path = vm_dir / GUEST_LOG_NAME
        request = json.dumps({"argv": args, "log": str(log_path)}).encode() + b"\n"
        for attempt in range(2):
            launcher = await self._launcher(fresh=attempt > 0)
            try:
                async with asyncio.timeout(LAUNCH_TIMEOUT_S):
                    out, err = await launcher.communicate(request)
            except TimeoutError:
                launcher.kill()
                await launcher.wait()
                raise GuestStartError(
                    f"VM {vm_id}: guest launcher did not finish within {LAUNCH_TIMEOUT_S:.0f}s"
                ) from None
            try:
                return int(out.decode().strip())
            except ValueError:
                pass
            if attempt == 0 and not log_path.exists():  # the request never reached a
                continue  # working launcher (it died while warm): once more, fresh
            break
        detail = err.decode(errors="replace").strip()
        raise GuestStartError(
            f"VM {vm_id}: guest failed to start (launcher exit code {launcher.returncode}); "
            f"guest log:\n{_log_tail(vm_dir)}" + (f"\nlauncher: {detail}" if detail else "")
        )

    async def _wait_ready(
        self, vm_id: str, spec: GuestSpec, incoming: bool, vm_dir: Path, pid: int
    ) -> GuestControl:
        """Wait until the guest answers status in its first state; returns the control
        connection that got the answer (with the guest's start time)."""
        expected = "incoming" if incoming else "running"
        fill_bytes = 0 if incoming else (spec.touched_bytes or spec.memory_bytes)
        timeout = BOOT_TIMEOUT_S + fill_bytes / BOOT_FILL_BYTES_PER_S
        deadline = time.monotonic() + timeout
        while True:
            record = _read_vm_json(vm_dir)
            start_ticks = record.get("pid_start_ticks") if record else None
            if not is_guest_process(pid, start_ticks, vm_id):
                raise GuestStartError(
                    f"VM {vm_id}: guest process {pid} exited while booting; guest log:\n"
                    f"{_log_tail(vm_dir)}"
                )
            if record is not None and (vm_dir / CONTROL_SOCKET_NAME).exists():
                control = GuestControl(
                    vm_id, vm_dir, pid, int(start_ticks) if start_ticks is not None else None
                )
                with contextlib.suppress(GuestError):
                    response = await control.request("status")
                    if response.get("state") == expected:
                        return control
                control.close()
            if time.monotonic() >= deadline:
                raise GuestStartError(
                    f"VM {vm_id}: guest {pid} did not become {expected} within "
                    f"{timeout:.0f}s; guest log:\n{_log_tail(vm_dir)}"
                )
            await asyncio.sleep(POLL_INTERVAL_S * 2)

    async def adopt_all(self) -> list[MemVMHandle]:
        """Map again every live guest found in the runtime directory (after a handler
        restart) and delete the files of dead ones, whose vm_ids go to ``dead_vm_ids``.
        Directories that are not memvm VM directories are left alone."""
        handles: list[MemVMHandle] = []
        dead: list[str] = []
        if not self.runtime_dir.is_dir():
            self.dead_vm_ids = dead
            return handles
        for vm_dir in sorted(p for p in self.runtime_dir.iterdir() if p.is_dir()):
            vm_id = vm_dir.name
            if not _VM_ID_RE.fullmatch(vm_id) or vm_id in self._launching:
                continue
            record = _read_vm_json(vm_dir)
            if record is None:
                if (vm_dir / GUEST_LOG_NAME).exists():  # a start that never finished
                    self._remove_files(vm_id, None)
                    dead.append(vm_id)
                continue
            pid = int(record.get("pid", 0))
            start_ticks = record.get("pid_start_ticks")
            if is_guest_process(pid, start_ticks, vm_id):
                try:
                    handle = MemVMHandle(
                        vm_id,
                        GuestSpec.from_json(record["spec"]),
                        pid,
                        start_ticks,
                        vm_dir,
                        Path(record["ram_path"]),
                        Path(record["dirty_path"]),
                    )
                except (KeyError, TypeError, ValueError, OSError, DriverError) as e:
                    log.error("memvm %s: cannot adopt guest %d: %s", vm_id, pid, e)
                    continue
                log.info("memvm %s: adopted running guest %d", vm_id, pid)
                handles.append(handle)
            else:
                log.warning(
                    "memvm %s: guest %d is gone; removing its files. Guest log:\n%s",
                    vm_id,
                    pid,
                    _log_tail(vm_dir),
                )
                self._remove_files(vm_id, record)
                dead.append(vm_id)
        self.dead_vm_ids = dead
        return handles

    def _remove_files(self, vm_id: str, record: dict[str, Any] | None) -> None:
        """Delete a (dead) VM's RAM, dirty log and runtime directory. RAM paths recorded in
        vm.json are deleted only if they lie in our RAM directory."""
        vm_dir, ram_path, dirty_path = self._paths(vm_id)
        paths = {ram_path, dirty_path}
        if record is not None:
            for key in ("ram_path", "dirty_path"):
                recorded = record.get(key)
                if isinstance(recorded, str) and Path(recorded).parent == self.ram_dir:
                    paths.add(Path(recorded))
        for path in paths:
            path.unlink(missing_ok=True)
        shutil.rmtree(vm_dir, ignore_errors=True)


def guest_spec(vmi: dict[str, Any]) -> GuestSpec:
    """The memvm guest a VMI asks for (``spec.memvm.workload`` plus its memory)."""
    spec = vmi.get("spec") or {}
    workload = (spec.get("memvm") or {}).get("workload") or {}
    return GuestSpec(
        memory_bytes=schema.memory_bytes(spec),
        dirty_rate_bytes=parse_quantity(workload.get("dirtyRate", 0)),
        hot_set_bytes=parse_quantity(workload.get("hotSet", 0)),
        content=workload.get("content", "random"),
        touched_bytes=parse_quantity(workload.get("touched", 0)),
        tick_interval_s=int(workload.get("tickIntervalMilliseconds", 5)) / 1000,
    )


if TYPE_CHECKING:

    def _conforms(
        driver: MemVMDriver, handle: MemVMHandle
    ) -> tuple[Driver, DirtyLogHandle, PostCopyHandle]:
        return driver, handle, handle  # mypy checks both against the protocols
