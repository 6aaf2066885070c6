"""memvm driver and guest, with real guest processes and real shared-memory files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from handler.drivers.base import (
    Driver,
    DriverError,
    GuestError,
    GuestSpec,
    VMExistsError,
    VMHandle,
    ram_digest,
    ram_digest_async,
)
from handler.drivers.memvm import MemVMDriver, MemVMHandle
from handler.drivers.memvm_guest import GUEST_MODULE, is_guest_process, proc_cmdline, proc_info

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def ram_dir() -> Iterator[Path]:
    path = Path(f"/dev/shm/vmferry-test-{uuid.uuid4().hex[:12]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "runtime"
    yield path
    # Safety net: no guest outlives its test, whatever the test did.
    for record_path in tmp_path.rglob("vm.json"):
        record = json.loads(record_path.read_text())
        if is_guest_process(record["pid"], record["pid_start_ticks"], record["vm_id"]):
            os.kill(record["pid"], signal.SIGKILL)


def files(root: Path, pattern: str) -> list[Path]:
    return list(root.rglob(pattern))


def pages_of(handle: MemVMHandle) -> np.ndarray:
    return np.frombuffer(handle.ram(), dtype=np.uint8).reshape(handle.page_count, PAGE)


async def wait_for_ticks(handle: VMHandle, beyond: int, limit_s: float = 5.0) -> int:
    deadline = time.monotonic() + limit_s
    while True:
        ticks = (await handle.status()).ticks
        if ticks > beyond:
            return ticks
        assert time.monotonic() < deadline, f"ticks stuck at {ticks}"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
def test_start_harvest_pause_resume(runtime_dir: Path, ram_dir: Path) -> None:
    async def scenario() -> None:
        driver = MemVMDriver(runtime_dir, ram_dir)
        assert isinstance(driver, Driver)
        handle = await driver.start(
            "ns_vm1_0123abcd", GuestSpec(64 * MiB, dirty_rate_bytes=20 * MiB)
        )
        try:
            assert isinstance(handle, VMHandle)
            status = await handle.status()
            assert status.state == "running"
            assert status.pid == handle.pid and handle.is_alive()
            assert status.memory_bytes == 64 * MiB and status.dirty_rate_bytes == 20 * MiB
            await wait_for_ticks(handle, status.ticks + 10)
            dirty = handle.harvest_dirty()
            assert dirty.dtype == np.int64 and len(dirty) > 10
            assert dirty[0] == 0  # the heartbeat page
            assert dirty.max() < handle.page_count

            with pytest.raises(GuestError, match="only available while the guest is paused"):
                await handle.device_state()
            with pytest.raises(GuestError, match="unknown op"):
                await handle.request("reboot")

            await handle.pause()
            paused_at = time.monotonic()
            handle.harvest_dirty()
            assert len(handle.harvest_dirty()) == 0
            with handle.ram() as ram:
                digest = await ram_digest_async(ram)
                paused = await handle.status()
                assert paused.state == "paused"
                await asyncio.sleep(0.2)
                assert len(handle.harvest_dirty()) == 0
                assert ram_digest(ram) == digest
            assert (await handle.status()).ticks == paused.ticks
            state = json.loads(await handle.device_state())
            assert state["ticks"] == paused.ticks

            resumed_at = time.monotonic()
            answer = await handle.request("resume")
            # The first tick after the pause -- the heartbeat the gap is measured by -- is
            # made as part of the resume, before its answer.
            assert answer["state"] == "running" and answer["ticks"] == paused.ticks + 1
            assert answer["resume_gap_ms"] >= (resumed_at - paused_at) * 1000
            assert handle.harvest_dirty().tolist()[:1] == [0]  # the heartbeat page
            await wait_for_ticks(handle, paused.ticks + 5)
            resumed = await handle.status()
            assert resumed.state == "running"
            assert resumed.resume_gap_ms is not None
            assert resumed.resume_gap_ms >= (resumed_at - paused_at) * 1000 >= 200
            assert len(handle.harvest_dirty()) > 0
        finally:
            await handle.destroy()
        assert not handle.is_alive()
        assert not handle.vm_dir.exists()
        assert not handle.ram_path.exists() and not handle.dirty_path.exists()
        with pytest.raises(DriverError):
            handle.ram()  # unmapped (by the worker that deleted the files)
        await handle.destroy()  # idempotent

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_dirty_log_misses_no_write(runtime_dir: Path, ram_dir: Path) -> None:
    """Pre-copy against the live guest: a full copy, then only harvested pages, then the
    final set after pause. The copy must equal guest RAM exactly."""

    async def scenario() -> None:
        driver = MemVMDriver(runtime_dir, ram_dir)
        # A small hot set rewrites the same pages over and over: many harvest/write races.
        spec = GuestSpec(32 * MiB, dirty_rate_bytes=60 * MiB, hot_set_bytes=2 * MiB)
        handle = await driver.start("ns_dirty_00000001", spec)
        try:
            source = pages_of(handle)
            target = bytearray(spec.memory_bytes)
            target_pages = np.frombuffer(target, dtype=np.uint8).reshape(handle.page_count, PAGE)
            handle.harvest_dirty()  # clear, then copy everything
            target_pages[:] = source
            copied_rounds = 0
            for _ in range(30):
                await asyncio.sleep(0.01)
                dirty = handle.harvest_dirty()
                target_pages[dirty] = source[dirty]
                copied_rounds += bool(len(dirty))
            assert copied_rounds >= 20
            await asyncio.sleep(0.05)
            await handle.pause()
            assert ram_digest(target) != ram_digest(handle.ram())  # the final set matters
            dirty = handle.harvest_dirty()
            assert len(dirty) > 0
            target_pages[dirty] = source[dirty]
            assert ram_digest(target) == ram_digest(handle.ram())
            assert (await handle.status()).pages_written > 1000
            del source
        finally:
            await handle.destroy()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_incoming_guest_continues_from_migrated_state(tmp_path: Path, ram_dir: Path) -> None:
    """Two "nodes" on one host (same ram_dir, same vm_id): A's memory and device state go
    to an incoming guest B, which continues A's tick counter and reports the downtime."""

    async def scenario() -> None:
        node_a = MemVMDriver(tmp_path / "node-a", ram_dir)
        # Long enough that the control socket path exceeds the AF_UNIX limit of 108 bytes.
        node_b = MemVMDriver(tmp_path / ("node-b-" + "x" * 100), ram_dir)
        vm_id = "default_migrating_1a2b3c4d"
        spec = GuestSpec(32 * MiB, dirty_rate_bytes=10 * MiB, content="mixed")
        a = await node_a.start(vm_id, spec)
        b = await node_b.prepare_incoming(vm_id, spec)
        try:
            assert a.ram_path != b.ram_path
            assert len(str(b.vm_dir / "control.sock")) > 108
            incoming = await b.status()
            assert incoming.state == "incoming" and incoming.resume_gap_ms is None
            with pytest.raises(GuestError, match="no memvm header"):
                await b.resume()
            await wait_for_ticks(a, 20)

            await a.pause()
            paused_ns = time.time_ns()
            device_state = await a.device_state()
            ticks_at_pause = json.loads(device_state)["ticks"]
            with b.ram() as dst, a.ram() as src:
                dst[:] = src
                assert await ram_digest_async(dst) == await ram_digest_async(src)
            await a.stop()
            assert not a.is_alive()
            assert (await a.status()).state == "stopped"

            stale = json.loads(device_state)
            stale["ticks"] -= 1
            with pytest.raises(GuestError, match="does not match guest memory"):
                await b.resume(json.dumps(stale).encode())
            assert (await b.status()).state == "incoming"

            await asyncio.sleep(0.1)
            resumed_ns = time.time_ns()
            answer = await b.request("resume", device_state=json.loads(device_state))
            assert answer["ticks"] == ticks_at_pause + 1  # its first tick came with the answer
            assert answer["resume_gap_ms"] >= (resumed_ns - paused_ns) / 1e6
            ticks = await wait_for_ticks(b, ticks_at_pause + 5)
            status = await b.status()
            assert status.state == "running" and ticks > ticks_at_pause
            assert status.resume_gap_ms is not None
            assert status.resume_gap_ms >= (resumed_ns - paused_ns) / 1e6
            assert status.resume_gap_ms < 5000
            assert len(b.harvest_dirty()) > 0
        finally:
            await a.destroy()
            await b.destroy()
        assert not files(ram_dir, "*.ram")

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_throttle_slows_the_dirty_rate(runtime_dir: Path, ram_dir: Path) -> None:
    async def pages_per_second(handle: MemVMHandle, window: float) -> float:
        before = await handle.status()
        await asyncio.sleep(window)
        after = await handle.status()
        return (after.pages_written - before.pages_written) / window

    async def scenario() -> None:
        driver = MemVMDriver(runtime_dir, ram_dir)
        handle = await driver.start(
            "ns_throttle_00000001", GuestSpec(64 * MiB, dirty_rate_bytes=40 * MiB)
        )
        try:
            full = await pages_per_second(handle, 0.5)
            handle.harvest_dirty()
            await asyncio.sleep(0.5)
            full_distinct = len(handle.harvest_dirty())

            await handle.set_throttle(90)
            assert (await handle.status()).throttle_percent == 90
            await asyncio.sleep(0.2)  # one throttled period passes
            throttled = await pages_per_second(handle, 0.5)
            handle.harvest_dirty()
            await asyncio.sleep(0.5)
            throttled_distinct = len(handle.harvest_dirty())

            assert full > 5000  # 40 MiB/s is 10240 pages/s
            assert throttled < full * 0.3
            assert throttled_distinct < full_distinct * 0.3
            with pytest.raises(ValueError, match=r"0\.\.99"):
                await handle.set_throttle(100)
            await handle.set_throttle(0)
            assert await pages_per_second(handle, 0.3) > full * 0.6
        finally:
            await handle.destroy()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_adopt_after_handler_restart(runtime_dir: Path, ram_dir: Path) -> None:
    spec = GuestSpec(16 * MiB, dirty_rate_bytes=5 * MiB, content="text")

    async def first_handler() -> tuple[int, int]:
        driver = MemVMDriver(runtime_dir, ram_dir)
        survivor = await driver.start("ns_survivor_00000001", spec)
        casualty = await driver.start("ns_casualty_00000002", spec)
        await casualty.stop()  # dies while the handler is away: only files are left
        casualty.close()
        status = await survivor.status()
        survivor.close()  # the handler goes away; the guest keeps running
        with pytest.raises(DriverError, match="unmapped"):
            survivor.ram()
        return survivor.pid, status.ticks

    pid, ticks = asyncio.run(first_handler())

    async def second_handler() -> None:
        driver = MemVMDriver(runtime_dir, ram_dir)
        handles = await driver.adopt_all()
        assert [h.vm_id for h in handles] == ["ns_survivor_00000001"]
        assert driver.dead_vm_ids == ["ns_casualty_00000002"]
        assert not (runtime_dir / "ns_casualty_00000002").exists()
        assert not files(ram_dir, "ns_casualty_00000002.*")
        (handle,) = handles
        try:
            assert handle.pid == pid and handle.is_alive()
            assert handle.spec == spec
            status = await handle.status()
            assert status.state == "running" and status.pid == pid
            await wait_for_ticks(handle, max(ticks, status.ticks) + 5)
            handle.harvest_dirty()
            await asyncio.sleep(0.05)
            assert len(handle.harvest_dirty()) > 0
            with pytest.raises(VMExistsError):
                await driver.start("ns_survivor_00000001", spec)
            deadline = time.monotonic() + 5
            console = handle.vm_dir / "console.log"
            while "tick=" not in console.read_text():
                assert time.monotonic() < deadline, "no heartbeat on the console"
                await asyncio.sleep(0.05)
        finally:
            await handle.destroy()
        assert not handle.is_alive()
        assert not runtime_dir.joinpath("ns_survivor_00000001").exists()
        assert not files(ram_dir, "*.ram") and not files(ram_dir, "*.dirty")
        assert await MemVMDriver(runtime_dir, ram_dir).adopt_all() == []

    asyncio.run(second_handler())


@pytest.mark.timeout(60)
def test_content_kinds(runtime_dir: Path, ram_dir: Path) -> None:
    async def scenario() -> None:
        driver = MemVMDriver(runtime_dir, ram_dir)
        zero, text, sparse, mixed = await asyncio.gather(
            driver.start("k_zero", GuestSpec(16 * MiB, dirty_rate_bytes=4 * MiB, content="zero")),
            driver.start("k_text", GuestSpec(16 * MiB, content="text")),
            driver.start("k_sparse", GuestSpec(64 * MiB, content="random", touched_bytes=8 * MiB)),
            driver.start("k_mixed", GuestSpec(12 * MiB, content="mixed")),
        )
        try:
            await wait_for_ticks(zero, 20)
            zero_pages = pages_of(zero)
            assert np.count_nonzero(zero_pages[1:]) < 0.01 * zero_pages[1:].size
            assert len(zero.harvest_dirty()) > 1  # it does write (stamps)

            text_bytes = pages_of(text)[1:].tobytes()
            assert np.count_nonzero(pages_of(text)[1:]) > 0.9 * len(text_bytes)
            assert len(zlib.compress(text_bytes, 1)) < 0.5 * len(text_bytes)

            touched = 8 * MiB // PAGE
            sparse_pages = pages_of(sparse)
            assert np.all(sparse_pages[1:touched].any(axis=1))
            assert not sparse_pages[touched:].any()
            random_bytes = sparse_pages[1:touched].tobytes()
            assert len(zlib.compress(random_bytes, 1)) > 0.95 * len(random_bytes)

            mixed_pages = pages_of(mixed)
            nonzero = np.count_nonzero(mixed_pages, axis=1) > 0
            index = np.arange(mixed.page_count)
            assert nonzero[1:][index[1:] % 3 != 2].all()
            assert not nonzero[index % 3 == 2].any()
            del zero_pages, sparse_pages, mixed_pages
        finally:
            await asyncio.gather(*(h.destroy() for h in (zero, text, sparse, mixed)))

    asyncio.run(scenario())


def test_guest_spec_validation_and_json() -> None:
    spec = GuestSpec(64 * MiB, dirty_rate_bytes=MiB, hot_set_bytes=8 * MiB, content="text")
    assert GuestSpec.from_json(spec.to_json()) == spec
    assert GuestSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.page_count == 64 * MiB // PAGE
    with pytest.raises(ValueError, match="memory_bytes"):
        GuestSpec(PAGE * 2 + 1)
    with pytest.raises(ValueError, match="content"):
        GuestSpec(MiB, content="lorem")
    with pytest.raises(ValueError, match="hot_set_bytes"):
        GuestSpec(MiB, hot_set_bytes=2 * MiB)
    with pytest.raises(ValueError, match="dirty_rate_bytes"):
        GuestSpec(MiB, dirty_rate_bytes=-1)
    with pytest.raises(ValueError, match="unknown field"):
        GuestSpec.from_json({"memory_bytes": MiB, "memory": 1})
    with pytest.raises(ValueError, match="required"):
        GuestSpec.from_json({})


def test_ram_digest_is_chunked_sha256() -> None:
    data = np.random.default_rng(1).integers(0, 256, size=5 * MiB + 123, dtype=np.uint8).tobytes()
    chunk = MiB
    expected = hashlib.sha256(
        b"".join(hashlib.sha256(data[o : o + chunk]).digest() for o in range(0, len(data), chunk))
    ).hexdigest()
    assert ram_digest(memoryview(data), chunk) == expected
    assert asyncio.run(ram_digest_async(bytearray(data), chunk)) == expected
    assert ram_digest(data) != ram_digest(data[:-1] + b"\x01")


def test_rejects_unsafe_vm_ids(runtime_dir: Path, ram_dir: Path) -> None:
    driver = MemVMDriver(runtime_dir, ram_dir)
    for vm_id in ("../escape", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="filesystem-safe"):
            asyncio.run(driver.start(vm_id, GuestSpec(MiB)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


@pytest.mark.timeout(60)
def test_warm_launcher_starts_guests_and_is_replaced(runtime_dir: Path, ram_dir: Path) -> None:
    """A guest starts from the launcher kept warm (not a fresh Python); each launch warms
    the next one; a dead warm launcher is replaced; close() ends the warm one."""

    async def scenario() -> None:
        driver = MemVMDriver(runtime_dir, ram_dir)
        driver.warm_up()
        assert driver._warm is not None
        first = await driver._warm
        handle = await driver.prepare_incoming("ns_vm1_0123abcd", GuestSpec(8 * MiB))
        assert (await handle.status()).state == "incoming"
        assert first.returncode == 0  # it launched the guest and exited
        assert driver._warm is not None
        second = await driver._warm
        assert second.pid != first.pid and second.returncode is None
        second.kill()  # the warm launcher dies unnoticed: the next start still works
        await second.wait()
        other = await driver.start("ns_vm2_0123abcd", GuestSpec(8 * MiB))
        assert (await other.status()).state == "running"
        assert driver._warm is not None
        third = await driver._warm
        await driver.close()
        assert third.returncode == 0 and driver._warm is None
        for h in (handle, other):
            await h.destroy()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_launcher_reports_a_guest_that_cannot_start(runtime_dir: Path, ram_dir: Path) -> None:
    async def scenario() -> None:
        driver = MemVMDriver(runtime_dir, ram_dir)
        driver.warm_up()
        bad = GuestSpec(8 * MiB)
        object.__setattr__(bad, "memory_bytes", 8 * MiB + 1)  # not whole pages: refused
        with pytest.raises(DriverError, match=r"guest failed to start(.|\n)*bad --spec"):
            await driver.start("ns_vm3_0123abcd", bad)
        good = await driver.start("ns_vm4_0123abcd", GuestSpec(8 * MiB))  # still serving
        await good.destroy()
        await driver.close()

    asyncio.run(scenario())


def test_file_holes_are_never_written_pages(tmp_path: Path) -> None:
    from handler.drivers.base import file_data_pages

    path = Path(f"/dev/shm/vmferry-test-holes-{uuid.uuid4().hex[:8]}")
    try:
        with open(path, "wb") as f:
            f.truncate(64 * PAGE)
            f.seek(5 * PAGE + 10)
            f.write(b"x")
            f.seek(40 * PAGE)
            f.write(b"y" * (PAGE + 1))  # pages 40 and 41
        mask = file_data_pages(path, PAGE, 64)
        assert mask is not None
        assert np.flatnonzero(mask).tolist() == [5, 40, 41]
        assert file_data_pages(tmp_path / "missing", PAGE, 64) is None
    finally:
        path.unlink(missing_ok=True)


def test_a_launched_guest_is_recognised_even_after_its_vm_dir_is_deleted(tmp_path: Path) -> None:
    """Guests started from the warm launcher carry the launcher's command line and are
    known by their working directory, which reads "<dir> (deleted)" once removed: such a
    guest is still found (and can be stopped), a process in another VM's dir is not."""
    vm_dir = tmp_path / "vm-7f3a"
    vm_dir.mkdir()
    sleeper = "import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", sleeper, GUEST_MODULE], cwd=vm_dir)
    try:
        # The parent may run again before the exec has set up the new command line.
        deadline = time.monotonic() + 10
        while GUEST_MODULE not in proc_cmdline(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        ticks = proc_info(proc.pid)
        assert ticks is not None
        assert is_guest_process(proc.pid, ticks.start_ticks, "vm-7f3a")
        assert not is_guest_process(proc.pid, ticks.start_ticks, "vm-other")
        assert not is_guest_process(proc.pid, ticks.start_ticks + 1, "vm-7f3a")  # pid reuse
        shutil.rmtree(vm_dir)
        assert os.readlink(f"/proc/{proc.pid}/cwd").endswith(" (deleted)")
        assert is_guest_process(proc.pid, ticks.start_ticks, "vm-7f3a")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert not is_guest_process(proc.pid, None, "vm-7f3a")
