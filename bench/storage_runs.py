"""The storage scenario (``make bench BENCH_ARGS="--scenario storage"``): a QEMU guest's
1 GiB disk moved while the guest writes ~8 MiB/s (``memload.diskrate``), vmferry's storage
live migration next to QEMU's own mirror + migration without vmferry.

- vmferry: a 2-node lab, a TCG guest (128 MiB) on a local claim of node1, its VM
  (``updateVolumesStrategy: Migration``) edited to a local claim of node2
  (``controller/volume_migration.py``). Figures: the end-to-end time from the edit until
  the VMI runs on node2 with the new claim, the mirror's catch-up time
  (``diskMirrorMilliseconds``), the downtime (the source's switchover parts) and the
  guest-seen downtime (its heartbeat gap), and the disk throughput (the image's
  allocated bytes over the mirror time). Every run's disk starts as a copy of one 1 GiB
  image full of data (``spec.dataSource`` ImageFile), so the mirror copies a whole disk.
- QEMU alone: the same guest in two QEMU processes on this host; the target
  ``-incoming defer`` serves its blank image over NBD (unix socket); the source
  ``blockdev-mirror``s to it, migrates once the mirror is ready with
  ``pause-before-switchover``, cancels the (ready) mirror at that pause and continues;
  the target resumes. No tunnel, no TLS, no verification: the floor vmferry's figures
  compare to.

The guest image must have the disk modules and ``memload.diskrate`` (``make
guest-image``); ``VMFERRY_GUEST_IMAGE`` points at another image directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.lab_runs import NAMESPACE, LabBench
from bench.qemu import QEMU, Qmp
from bench.stats import summaries

Obj = dict[str, Any]
MiB = 1 << 20
DISK = "1Gi"
DISK_BYTES = 1 << 30
MEMORY = "128Mi"
DISK_RATE_MIB = 8
WRITE_FIRST_S = 10.0  # s the guest writes before the move
TIMEOUT = 300.0
CMDLINE = (
    "console=ttyS0 quiet panic=-1 memload.fill=16 memload.rate=4 memload.tick=100 "
    f"memload.diskrate={DISK_RATE_MIB} memload.diskspan=512"
)
HB = re.compile(r"^HB (\d+) (\d+) ([\d.]+) ", re.M)
KEYS = [
    "endToEndSeconds",
    "mirrorSeconds",
    "downtimeMilliseconds",
    "guestDowntimeMilliseconds",
    "diskThroughput",
]


def _summary(records: list[Obj]) -> Obj:
    return {k: (s.as_dict() if s else None) for k, s in summaries(records, KEYS).items()}


def guest_image() -> Path:
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("VMFERRY_GUEST_IMAGE") or root / "build" / "guest")


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _first_gap_ms(console: str) -> float | None:
    """The gap before the target's first heartbeat: the downtime the guest saw (its
    heartbeat sequence and clock came along; the target's console starts with it)."""
    beats = HB.findall(console)
    return float(beats[0][2]) if beats else None


# -- vmferry ---------------------------------------------------------------------------


def _vm(name: str, claim: str, image: Path) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "runStrategy": "Always",
            "updateVolumesStrategy": "Migration",
            "template": {
                "spec": {
                    "domain": {
                        "memory": {"guest": MEMORY},
                        "devices": {"disks": [{"name": "data", "disk": {"bus": "virtio"}}]},
                    },
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
                    "qemu": {
                        "kernel": str(image / "vmlinuz"),
                        "initrd": str(image / "initrd.img"),
                        "cmdline": CMDLINE,
                        "accelerator": "tcg",
                    },
                }
            },
        },
    }


def fill_image(path: Path) -> Path:
    """A 1 GiB raw image full of data (1 MiB of random bytes, repeated): the disk every
    run starts from, so the mirror copies a whole disk, not a sparse one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size != DISK_BYTES:
        chunk = os.urandom(MiB)
        with open(path, "wb") as f:
            for _ in range(DISK_BYTES // MiB):
                f.write(chunk)
    return path


def _claim(name: str, storage_class: str, source: Path | None = None) -> Obj:
    data_source = (
        {"dataSource": {"apiGroup": "vmferry.io", "kind": "ImageFile", "path": str(source)}}
        if source is not None
        else {}
    )
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": DISK}},
            **data_source,
        },
    }


async def _wait(what: str, fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await fn()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


async def vmferry_once(bench: LabBench, run: int, image: Path, filled: Path) -> Obj:
    name, src, dst = f"sbench{run}", f"sbench{run}-src", f"sbench{run}-dst"
    async with bench.api() as api:
        await api.create(_claim(src, "bench-local1", filled))
        await api.create(_claim(dst, "bench-local2"))
    vmi = await bench.create_vm(_vm(name, src, image))
    uid = vmi["metadata"]["uid"]
    await asyncio.sleep(WRITE_FIRST_S)
    async with bench.api() as api:
        source_image = Path(
            (await api.get("PersistentVolumeClaim", NAMESPACE, src))["status"]["imagePath"]
        )
        t0 = time.monotonic()
        await api.patch(
            "VirtualMachine",
            NAMESPACE,
            name,
            {
                "spec": {
                    "template": {
                        "spec": {
                            "volumes": [
                                {"name": "data", "persistentVolumeClaim": {"claimName": dst}}
                            ]
                        }
                    }
                }
            },
        )

        async def moved() -> Obj | None:
            status = (await api.get("VirtualMachineInstance", NAMESPACE, name)).get("status") or {}
            ms = status.get("migrationState") or {}
            if ms.get("failed"):
                raise RuntimeError(f"the storage migration failed: {ms.get('failureReason')}")
            done = ms.get("completed") and status.get("nodeName") == "node2"
            return status if done and not status.get("migratedVolumes") else None

        status = await _wait("the storage migration", moved)
        seconds = time.monotonic() - t0
    transfer = status["migrationState"]["transfer"]
    target_console = next((bench.lab.runtime_dir("node2") / "qemu").glob(f"{uid}*/console.log"))
    await asyncio.sleep(1.0)
    mirror_s = float(transfer.get("diskMirrorMilliseconds", 0)) / 1000
    allocated = _allocated(source_image)
    record = {
        "endToEndSeconds": seconds,
        "mirrorSeconds": mirror_s,
        "downtimeMilliseconds": transfer.get("downtimeMilliseconds"),
        "downtimePartsMilliseconds": transfer.get("downtimePartsMilliseconds"),
        "guestDowntimeMilliseconds": transfer.get("guestDowntimeMilliseconds"),
        "guestClockGapMilliseconds": _first_gap_ms(target_console.read_text()),
        "diskAllocatedBytes": allocated,
        "diskThroughput": allocated / mirror_s if mirror_s else None,
        "repairedDiskBlocks": transfer.get("repairedDiskBlocks"),
        "digestVerified": transfer.get("digestVerified"),
    }
    await bench.delete_vm(name, timeout=120)
    async with bench.api() as api:
        for claim in (src, dst):
            await api.delete("PersistentVolumeClaim", NAMESPACE, claim)
    return record


async def run_vmferry(
    runs: int, root: Path, image: Path, filled: Path, log: Callable[[str], None]
) -> Obj:
    bench = LabBench(root)
    log(f"storage: starting a 2-node lab in {root / 'lab'}")
    await asyncio.to_thread(bench.up)
    try:
        async with bench.api() as api:
            for n in (1, 2):
                await api.create(
                    {
                        "apiVersion": "storage.k8s.io/v1",
                        "kind": "StorageClass",
                        "metadata": {"name": f"bench-local{n}"},
                        "provisioner": "vmferry.io/local",
                        "parameters": {"path": str(root / f"node{n}-local"), "node": f"node{n}"},
                    }
                )
        records = []
        for run in range(runs):
            record = await vmferry_once(bench, run, image, filled)
            log(f"storage: vmferry run {run}: {record}")
            records.append(record)
    finally:
        await asyncio.to_thread(bench.down)
    return {"runs": records, "summary": _summary(records)}


# -- QEMU alone ------------------------------------------------------------------------


def _qemu_argv(image: Path, disk: Path, qmp: Path, console: Path, incoming: bool) -> list[str]:
    argv = [
        QEMU,
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        "tcg",
        "-m",
        MEMORY.removesuffix("Mi") + "M",
        "-kernel",
        str(image / "vmlinuz"),
        "-initrd",
        str(image / "initrd.img"),
        "-append",
        CMDLINE,
        "-chardev",
        f"file,id=c0,path={console}",
        "-serial",
        "chardev:c0",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-blockdev",
        f"driver=file,node-name=vf0,filename={disk},cache.direct=on,aio=native",
        "-blockdev",
        "driver=raw,node-name=vd0,file=vf0,cache.direct=on",
        "-device",
        "virtio-blk-pci,drive=vd0,serial=data",
    ]
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv


async def _query(qmp: Qmp, status: tuple[str, ...], timeout: float = TIMEOUT) -> Obj:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: Obj = await qmp.execute("query-migrate")
        if info.get("status") in status:
            return info
        if info.get("status") == "failed":
            raise RuntimeError(f"QEMU's migration failed: {info.get('error-desc')}")
        await asyncio.sleep(0.01)
    raise TimeoutError(f"QEMU's migration did not reach {status}")


def _start_qemus(
    root: Path, image: Path, filled: Path
) -> tuple[dict[str, Path], list[subprocess.Popen[bytes]]]:
    """The two QEMU processes (the target waiting, -incoming defer) and their files."""
    root.mkdir(parents=True, exist_ok=True)
    names = (
        "src.img",
        "dst.img",
        "src.qmp",
        "dst.qmp",
        "nbd.sock",
        "mig.sock",
        "src.log",
        "dst.log",
    )
    paths = {k: root / k for k in names}
    shutil.copyfile(filled, paths["src.img"])
    with open(paths["dst.img"], "wb") as f:
        f.truncate(DISK_BYTES)
    procs = [
        subprocess.Popen(
            _qemu_argv(
                image,
                paths[f"{side}.img"],
                paths[f"{side}.qmp"],
                paths[f"{side}.log"],
                side == "dst",
            ),
            stdin=subprocess.DEVNULL,
        )
        for side in ("src", "dst")
    ]
    return paths, procs


async def qemu_once(root: Path, image: Path, filled: Path) -> Obj:
    paths, procs = await asyncio.to_thread(_start_qemus, root, image, filled)
    try:
        src, dst = await Qmp.connect(paths["src.qmp"]), await Qmp.connect(paths["dst.qmp"])
        await _wait(
            "the guest to write",
            lambda: asyncio.to_thread(_booted, paths["src.log"]),
            timeout=120,
        )
        await asyncio.sleep(WRITE_FIRST_S)
        await dst.execute(
            "nbd-server-start", addr={"type": "unix", "data": {"path": str(paths["nbd.sock"])}}
        )
        await dst.execute(
            "block-export-add",
            **{"type": "nbd", "id": "e0", "node-name": "vd0", "name": "data", "writable": True},
        )
        await dst.execute("migrate-incoming", uri=f"unix:{paths['mig.sock']}")
        t0 = time.monotonic()
        await src.execute(
            "blockdev-add",
            **{
                "driver": "nbd",
                "node-name": "nbd0",
                "export": "data",
                "server": {"type": "unix", "path": str(paths["nbd.sock"])},
            },
        )
        await src.execute(
            "blockdev-mirror",
            **{
                "job-id": "m0",
                "device": "vd0",
                "target": "nbd0",
                "sync": "full",
                "auto-dismiss": False,
            },
        )

        async def ready() -> bool:
            jobs = await src.execute("query-jobs")
            return bool(jobs) and jobs[0]["status"] == "ready"

        await _wait("the mirror", ready)
        mirror_s = time.monotonic() - t0
        await src.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "pause-before-switchover", "state": True}],
        )
        await src.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        await src.execute("migrate", uri=f"unix:{paths['mig.sock']}")
        await _query(src, ("pre-switchover",))
        paused = time.monotonic()
        await src.execute("block-job-cancel", device="m0")

        async def concluded() -> bool:
            jobs = await src.execute("query-jobs")
            return bool(jobs) and jobs[0]["status"] == "concluded"

        await _wait("the mirror to complete", concluded)
        await src.execute("job-dismiss", id="m0")
        await src.execute("blockdev-del", **{"node-name": "nbd0"})
        await src.execute("migrate-continue", state="pre-switchover")
        info = await _query(src, ("completed",))
        await _query(dst, ("completed",))
        await dst.execute("block-export-del", id="e0")
        await dst.execute("nbd-server-stop")
        size = paths["dst.log"].stat().st_size
        await dst.execute("cont")
        resumed = time.monotonic()
        first_on_target = await asyncio.to_thread(_grown, paths["dst.log"], size)
        last_on_source = paths["src.log"].stat().st_mtime_ns / 1e9
        await asyncio.sleep(1.5)
        allocated = _allocated(paths["src.img"])
        return {
            "endToEndSeconds": resumed - t0,
            "mirrorSeconds": mirror_s,
            "downtimeMilliseconds": (resumed - paused) * 1000,
            "qemuDowntimeMilliseconds": info.get("downtime"),
            # like the handler measures it: the source console's last write to the
            # target's first (TCG's guest clock stops while paused: its own gap does not)
            "guestDowntimeMilliseconds": (first_on_target - last_on_source) * 1000,
            "diskAllocatedBytes": allocated,
            "diskThroughput": allocated / mirror_s if mirror_s else None,
        }
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


def _grown(console: Path, size: int, timeout: float = 10.0) -> float:
    """The time (epoch) ``console`` first grows past ``size`` bytes."""
    deadline = time.monotonic() + timeout
    while console.stat().st_size == size and time.monotonic() < deadline:
        time.sleep(0.002)
    return time.time()


def _booted(console: Path) -> bool:
    return console.exists() and "disk: " in console.read_text(errors="replace")


async def run_qemu(
    runs: int, root: Path, image: Path, filled: Path, log: Callable[[str], None]
) -> Obj:
    records = []
    for run in range(runs):
        record = await qemu_once(root / f"run{run}", image, filled)
        log(f"storage: QEMU run {run}: {record}")
        records.append(record)
    return {"runs": records, "summary": _summary(records)}


async def run_storage(
    quick: bool, runs: int | None, with_qemu: bool, root: Path, log: Callable[[str], None]
) -> Obj:
    image = guest_image()
    if not (image / "modules" / "virtio_blk.ko").is_file():
        return {"unavailable": f"the guest image in {image} has no disk support (make guest-image)"}
    n = runs or (1 if quick else 3)
    filled = await asyncio.to_thread(fill_image, root / "filled.img")
    result: Obj = {
        "title": f"a {DISK} disk moved while the guest writes {DISK_RATE_MIB} MiB/s (TCG, {MEMORY})",
        "vmferry": await run_vmferry(n, root / "vmferry", image, filled, log),
    }
    if with_qemu:
        result["qemu"] = await run_qemu(n, root / "qemu", image, filled, log)
    return result


def table_lines(result: Obj) -> list[str]:
    lines = ["", f"== storage: {result.get('title', 'storage live migration')} =="]
    if "unavailable" in result:
        lines.append(f"  storage unavailable: {result['unavailable']}")
        return lines
    for label in ("vmferry", "qemu"):
        s = (result.get(label) or {}).get("summary") or {}
        if not s:
            continue

        def med(key: str, scale: float = 1.0, fmt: str = "{:.1f}", s: Obj = s) -> str:
            v = s.get(key)
            return fmt.format(v["median"] / scale) if v else "n/a"

        lines.append(
            f"  {label:<8} end-to-end {med('endToEndSeconds')} s, mirror {med('mirrorSeconds', fmt='{:.2f}')} s "
            f"({med('diskThroughput', MiB, '{:.0f}')} MiB/s of data), downtime "
            f"{med('downtimeMilliseconds')} ms, guest-seen {med('guestDowntimeMilliseconds')} ms"
        )
    return lines
