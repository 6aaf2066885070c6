"""The ``scale`` scenario: one real controller (SQLite, or etcd with a one-member etcd)
and a simulated fleet in the bench process -- lightweight fake handlers that register
their Node, heartbeat, move the VMIs placed on them to Running and answer migrations
(``migration_step``: the target prepares, the source starts, commits and completes,
without guests or memory) -- at several sizes. Per backend and size:

  list       ``get vmi -A``: time of one list of every VMI (median of 5)
  fanout     one VMI change seen by W watchers (each its own watch stream): latency
             from the write returning to each watcher's event, p50/p99/max
  schedule   K VMIMs created at once (parallel limits lifted): VMIMs admitted and placed
             (target node chosen, the hand-off recorded, phase Scheduled) per second, and
             the time until every one ended (the fleet answering them; how many Failed)
  handoff    the hand-off decision's kind of write, a status update with a
             resourceVersion precondition, 200 in a row: p50/p99 latency
  drain      the evacuation of D nodes: a VMIM for every VMI on them (what ``vmferry
             drain`` creates per node), from the first created to the last placed
  rss        the controller's resident memory at the end (MiB)

The watchers, the fleet and the controller share this machine's cores: the latencies
include the clients' own work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry import pki
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import AlreadyExists, ApiError, Conflict, Unavailable
from vmferry.lab.cluster import free_port
from vmferry.lab.etcd import EtcdCluster, etcd_binary, missing_reason
from vmferry.migration_state import AbortStatus, Field, MigrationMode, Switchover
from vmferry.objects import conditions, kinds

Obj = dict[str, Any]
NAMESPACE = "scale"
VMI = "VirtualMachineInstance"
VMIM = "VirtualMachineInstanceMigration"
HEARTBEAT_SECONDS = 20.0
# Nodes stay Ready through a controller busy for minutes (this is not a heartbeat test).
NODE_GRACE_SECONDS = 600
CONCURRENCY = 32


@dataclass(frozen=True)
class Size:
    nodes: int
    vmis: int
    watchers: int
    migrations: int
    drain_nodes: int

    @property
    def label(self) -> str:
        return f"{self.nodes} nodes / {self.vmis} VMIs"


SIZES = {
    "tiny": Size(10, 50, 20, 10, 2),  # a check of the scenario itself (--quick)
    "small": Size(100, 300, 1000, 100, 100),
    "medium": Size(100, 1000, 1000, 200, 100),
    "large": Size(1000, 10000, 1000, 1000, 100),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def node_object(name: str) -> Obj:
    status: Obj = {
        "capacity": {"memory": "1Ti", "cpu": "256"},
        "allocatable": {"memory": "1Ti", "cpu": "256"},
        "addresses": [{"type": "InternalIP", "address": "203.0.113.1"}],
        "nodeInfo": {"cpuModel": "vmferry-scale-cpu"},
        "migrationEndpoint": {"address": "203.0.113.1", "port": 1},
    }
    conditions.set_condition(
        status,
        "Ready",
        True,
        "HandlerReady",
        "simulated",
        lastHeartbeatTime=conditions.now_rfc3339(),
    )
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": status,
    }


def vmi_object(name: str) -> Obj:
    return {
        "apiVersion": kinds.by_kind(VMI).api_version,
        "kind": VMI,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"evictionStrategy": "LiveMigrate", "domain": {"memory": {"guest": "64Mi"}}},
    }


async def patient(call: Callable[[], Any]) -> Any:
    """``call()``, retried while the controller is too busy to answer (a retried create
    that had landed is AlreadyExists: done)."""
    for attempt in range(20):
        try:
            return await call()
        except AlreadyExists:
            return None
        except Unavailable:
            if attempt == 19:
                raise
            await asyncio.sleep(1)
    return None


async def bounded(items: list[Any], work: Callable[[Any], Any]) -> None:
    """Run ``work(item)`` for every item, CONCURRENCY at a time."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            await work(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


class Fleet:
    """Simulated handlers: Nodes that heartbeat, and VMIs placed on them made Running."""

    def __init__(self, api: ApiClient, nodes: int) -> None:
        self.api = api
        self.names = [f"sim-{i:04d}" for i in range(nodes)]
        self.running = 0

    async def register(self) -> None:
        async def one(name: str) -> None:
            with contextlib.suppress(AlreadyExists):
                await self.api.create(node_object(name))
            await self.heartbeat_one(name)

        await bounded(self.names, one)

    async def heartbeat_one(self, name: str) -> None:
        status = node_object(name)["status"]
        with contextlib.suppress(Unavailable):
            await self.api.patch("Node", None, name, {"status": status}, subresource="status")

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await bounded(self.names, self.heartbeat_one)

    async def run_vmis(self) -> None:
        """Scheduled VMIs on our nodes -> Running (a handler booting them) and migrations
        answered, CONCURRENCY writes at a time (every node's handler works at once; a
        write from a stale event fails its precondition, and the newer event is handled
        too); after a lost watch, from a fresh list."""
        slots = asyncio.Semaphore(CONCURRENCY)
        busy: set[asyncio.Task[None]] = set()

        async def handle(vmi: Obj) -> None:
            async with slots:
                await self._boot(vmi)

        async def dispatch(vmi: Obj) -> None:
            while len(busy) >= 4 * CONCURRENCY:  # bounded backlog: the watch waits
                await asyncio.wait(set(busy), return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(handle(vmi))
            busy.add(task)
            task.add_done_callback(busy.discard)

        try:
            while True:
                try:
                    items, rv = await self.api.list(VMI, NAMESPACE)
                    for vmi in items:
                        await dispatch(vmi)
                    async for _, vmi in self.api.watch(VMI, NAMESPACE, resource_version=rv):
                        await dispatch(vmi)
                except ApiError:
                    await asyncio.sleep(0.5)
        finally:
            for task in busy:
                task.cancel()

    async def _boot(self, vmi: Obj) -> None:
        status = vmi.get("status") or {}
        if status.get("nodeName") and status.get("phase") == "Scheduled":
            status["phase"] = "Running"
            with contextlib.suppress(Conflict):
                await self.api.update(vmi, subresource="status")
                self.running += 1
            return
        step = migration_step(vmi, conditions.now_rfc3339())
        if step is not None:
            with contextlib.suppress(Conflict):  # a newer state is on its way to the watch
                await self.api.update(step, subresource="status")


def migration_step(vmi: Obj, now: str) -> Obj | None:
    """The simulated handlers' next write for a VMI being migrated (None: nothing to
    do): the target prepares (domain detected, address), the source starts, then
    commits and completes in one write (the VMI names the target); an abort requested
    before the start ends it Aborted on the source. Every write carries the VMI's
    resourceVersion, as the real handlers' do."""
    status = vmi.get("status") or {}
    ms = status.get("migrationState") or {}
    if (
        status.get("phase") != "Running"
        or not ms.get(Field.MIGRATION_UID)
        or ms.get(Field.COMPLETED)
        or ms.get(Field.FAILED)
    ):
        return None
    if ms.get(Field.ABORT_REQUESTED) and ms.get(Field.SWITCHOVER) is None:
        ms[Field.SWITCHOVER] = Switchover.ABORTED
        ms[Field.FAILED] = True
        ms[Field.FAILURE_REASON] = "canceled by the user"
        ms[Field.ABORT_STATUS] = AbortStatus.SUCCEEDED
        ms[Field.END_TIMESTAMP] = now
    elif not ms.get(Field.TARGET_NODE_ADDRESS):
        ms[Field.TARGET_NODE_DOMAIN_DETECTED] = True
        ms[Field.TARGET_NODE_ADDRESS] = "203.0.113.1"
        ms[Field.TARGET_NODE_PORT] = 1
    elif not ms.get(Field.START_TIMESTAMP):
        ms[Field.START_TIMESTAMP] = now
        ms[Field.MODE] = MigrationMode.PRE_COPY
    else:
        ms[Field.SWITCHOVER] = Switchover.COMMITTED
        ms[Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP] = now
        ms[Field.COMPLETED] = True
        ms[Field.END_TIMESTAMP] = now
        status["nodeName"] = ms[Field.TARGET_NODE]
    return vmi


async def wait_until(
    what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"scale bench: {what} not reached within {timeout:.0f} s")
        await asyncio.sleep(interval)


# Between two checks that list every VMI or VMIM: a list of 10,000 costs the controller
# ~0.5 s of its one core, which polling every 0.2 s would take from what is measured.
LIST_POLL_SECONDS = 1.0


async def measure(api: ApiClient, size: Size, fleet: Fleet, log: Callable[[str], None]) -> Obj:
    result: Obj = {"size": size.__dict__}
    started = time.monotonic()
    await fleet.register()
    result["registerSeconds"] = time.monotonic() - started
    with contextlib.suppress(AlreadyExists):
        await api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    await api.patch(
        "HyperConverged",
        kinds.SYSTEM_NAMESPACE,
        kinds.HYPERCONVERGED_NAME,
        {
            "spec": {
                "liveMigrationConfig": {
                    "parallelMigrationsPerCluster": 1000000,
                    "parallelOutboundMigrationsPerNode": 1000000,
                }
            }
        },
    )
    started = time.monotonic()
    await bounded(
        [f"vm-{i:05d}" for i in range(size.vmis)],
        lambda n: patient(lambda: api.create(vmi_object(n))),
    )
    result["createPerSecond"] = size.vmis / (time.monotonic() - started)

    async def all_running() -> bool:
        if fleet.running < size.vmis:  # the fleet's own count: no list until it is there
            return False
        items, _ = await api.list(VMI, NAMESPACE)
        return sum((v.get("status") or {}).get("phase") == "Running" for v in items) >= size.vmis

    await wait_until("every VMI Running", all_running, 600)
    result["placedAndRunningSeconds"] = time.monotonic() - started
    log(f"scale: {size.label}: {size.vmis} VMIs running")

    times = []
    for _ in range(5):
        t = time.monotonic()
        items, _ = await api.list(VMI)
        times.append(time.monotonic() - t)
    result["listSeconds"] = statistics.median(times)
    result["listedItems"] = len(items)

    result["fanout"] = await fanout(api, size.watchers)
    result["handoff"] = await handoff(api)
    result["schedule"] = await schedule(api, items[: size.migrations], "sched")
    on_drained = {fleet.names[i] for i in range(min(size.drain_nodes, len(fleet.names)))}
    to_drain = [
        v for v in items[size.migrations :] if (v.get("status") or {}).get("nodeName") in on_drained
    ]
    result["drain"] = await schedule(api, to_drain, "drain")
    result["drain"]["nodes"] = len(on_drained)
    return result


async def fanout(api: ApiClient, watchers: int) -> Obj:
    """W watch streams; one write; the delay until each sees it."""
    _, rv = await api.list(VMI, NAMESPACE)
    seen: list[float] = []
    ready = 0
    all_seen = asyncio.Event()

    async def watcher() -> None:
        nonlocal ready
        stream = api.watch(VMI, NAMESPACE, resource_version=rv, bookmark=True)
        async for kind, _ in stream:
            if kind == "BOOKMARK":
                ready += 1
                continue
            seen.append(time.monotonic())
            if len(seen) == watchers:
                all_seen.set()
            return

    tasks = [asyncio.create_task(watcher()) for _ in range(watchers)]
    try:
        await wait_until("every watcher connected", lambda: _true(ready >= watchers), 120)
        target = await api.get(VMI, NAMESPACE, "vm-00000")
        target["metadata"].setdefault("labels", {})["fanout"] = "1"
        t0 = time.monotonic()
        await api.update(target)
        await asyncio.wait_for(all_seen.wait(), 120)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    delays = [(t - t0) * 1000 for t in seen]
    return {
        "watchers": watchers,
        "p50Ms": percentile(delays, 0.5),
        "p99Ms": percentile(delays, 0.99),
        "maxMs": max(delays),
    }


async def _true(value: bool) -> bool:
    return value


async def handoff(api: ApiClient, count: int = 200) -> Obj:
    """Status writes with a resourceVersion precondition, one after the other."""
    vmi = await api.get(VMI, NAMESPACE, "vm-00001")
    delays = []
    for i in range(count):
        status = vmi.setdefault("status", {})
        conditions.set_condition(status, "ScaleProbe", i % 2 == 0, "Probe", f"write {i}")
        t = time.monotonic()
        vmi = await api.update(vmi, subresource="status")
        delays.append((time.monotonic() - t) * 1000)
    return {"writes": count, "p50Ms": percentile(delays, 0.5), "p99Ms": percentile(delays, 0.99)}


async def schedule(api: ApiClient, vmis: list[Obj], prefix: str) -> Obj:
    """VMIMs for ``vmis`` created at once; until each has its target placed."""
    if not vmis:
        return {"migrations": 0}
    names = [f"{prefix}-{v['metadata']['name']}" for v in vmis]
    started = time.monotonic()

    async def create(pair: tuple[str, Obj]) -> None:
        name, vmi = pair
        vmim = {
            "apiVersion": kinds.by_kind(VMIM).api_version,
            "kind": VMIM,
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"vmiName": vmi["metadata"]["name"]},
        }
        await patient(lambda: api.create(vmim))

    await bounded(list(zip(names, vmis, strict=True)), create)
    created = time.monotonic() - started
    wanted = set(names)

    async def placed() -> bool:
        # Placed = the hand-off recorded and the VMIM Scheduled (then the fleet answers).
        items, _ = await api.list(VMIM, NAMESPACE)
        done = {
            m["metadata"]["name"]
            for m in items
            if any(
                stamp.get("phase") == "Scheduled"
                for stamp in (m.get("status") or {}).get("phaseTransitionTimestamps") or []
            )
        }
        return wanted <= done

    await wait_until(f"{len(names)} {prefix} migrations placed", placed, 600, LIST_POLL_SECONDS)
    took = time.monotonic() - started

    final: dict[str, int] = {}

    async def ended() -> bool:
        items, _ = await api.list(VMIM, NAMESPACE)
        phases = {m["metadata"]["name"]: (m.get("status") or {}).get("phase") for m in items}
        final.clear()
        final.update(collections.Counter(str(phases.get(name) or "") for name in names))
        return final.get("Succeeded", 0) + final.get("Failed", 0) == len(names)

    await wait_until(
        f"{len(names)} {prefix} migrations Succeeded or Failed", ended, 900, LIST_POLL_SECONDS
    )
    return {
        "migrations": len(names),
        "createSeconds": created,
        "placedSeconds": took,
        "perSecond": len(names) / took,
        "failed": final.get("Failed", 0),
        "endedSeconds": time.monotonic() - started,
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Controller:
    """A controller process of the bench (and its one-member etcd)."""

    proc: subprocess.Popen[bytes]
    config: ClientConfig
    etcd: EtcdCluster | None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.etcd is not None:
            self.etcd.stop()


def start_controller(backend: str, workdir: Path) -> Controller:
    """A controller with its own CA (an admin client identity) on ``backend``."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki_dir = workdir / "pki"
    pki.init_ca(pki_dir, "vmferry-scale")
    server = pki.issue_server(pki_dir, "vmferry-controller", ips=["127.0.0.1"])
    admin = pki.issue_user(pki_dir, "admin", groups=["system:masters"])
    port = free_port("127.0.0.1")
    argv = [
        sys.executable,
        "-m",
        "controller.main",
        f"--ca={server.ca}",
        f"--cert={server.cert}",
        f"--key={server.key}",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(workdir / "controller"),
        "--node-grace-seconds",
        str(NODE_GRACE_SECONDS),
        "--log-level",
        "warning",
    ]
    etcd = None
    if backend == "etcd":
        etcd = EtcdCluster.plan(workdir / "etcd", 1)
        etcd.start()
        argv += ["--store", "etcd", "--etcd-plaintext", "--etcd-endpoints", etcd.endpoints[0]]
    with open(workdir / "controller.log", "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    return Controller(proc, ClientConfig(server=f"127.0.0.1:{port}", tls=admin), etcd)


async def run_backend(backend: str, size: Size, workdir: Path, log: Callable[[str], None]) -> Obj:
    controller = await asyncio.to_thread(start_controller, backend, workdir)
    config = controller.config
    fleet_tasks: list[asyncio.Task[None]] = []
    try:
        async with ApiClient(config, timeout=120) as api:

            async def answers() -> bool:
                try:
                    await api.get(
                        "HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME
                    )
                except ApiError:
                    return False
                return True

            await wait_until("the controller answering", answers, 60)
            fleet = Fleet(api, size.nodes)
            fleet_tasks = [
                asyncio.create_task(fleet.run_vmis()),
                asyncio.create_task(fleet.heartbeat()),
            ]
            result = await measure(api, size, fleet, log)
            result["controllerRssMiB"] = await asyncio.to_thread(rss_mib, controller.proc.pid)
            result["loadAverage"] = os.getloadavg()[0]  # 1 min, at the end of the run
            return result
    finally:
        for task in fleet_tasks:
            task.cancel()
        await asyncio.gather(*fleet_tasks, return_exceptions=True)
        await asyncio.to_thread(controller.stop)


async def run_scale(
    sizes: list[str], log: Callable[[str], None], workdir: Path | None = None
) -> Obj:
    """Every size on both backends (etcd: skipped, saying why, without the binary)."""
    root = workdir or Path(tempfile.mkdtemp(prefix="vmferry-scale-"))
    results: Obj = {"runs": []}
    backends = ["sqlite", "etcd"]
    if etcd_binary() is None:
        results["etcdSkipped"] = missing_reason()
        backends = ["sqlite"]
    for key in sizes:
        size = SIZES[key]
        for backend in backends:
            log(f"scale: {backend}, {size.label}")
            run = await run_backend(backend, size, root / f"{backend}-{key}", log)
            results["runs"].append({"backend": backend, **run})
    return results


def table(results: Obj) -> str:
    header = (
        f"{'backend':<7} {'size':<22} {'VMIs up':>8} {'list':>8} {'fan-out p50/p99/max':>22} "
        f"{'sched/s':>8} {'sched done':>10} {'drain placed/done':>20} "
        f"{'hand-off p50/p99':>17} {'RSS':>8} {'load':>5}"
    )
    lines = ["== scale (simulated nodes) ==", header]
    for run in results.get("runs", []):
        size = Size(**run["size"])
        f, h, s, d = run["fanout"], run["handoff"], run["schedule"], run["drain"]
        drain = (
            f"{d['migrations']}: {d['placedSeconds']:.1f}/{d['endedSeconds']:.1f}s"
            + (f" ({d['failed']} failed)" if d.get("failed") else "")
            if d.get("migrations")
            else "-"
        )
        lines.append(
            f"{run['backend']:<7} {size.label:<22} {run['placedAndRunningSeconds']:>7.1f}s "
            f"{run['listSeconds'] * 1000:>6.0f}ms "
            + f"{f['p50Ms']:.0f}/{f['p99Ms']:.0f}/{f['maxMs']:.0f} ms".rjust(22)
            + f" {s['perSecond']:>8.1f} {s['endedSeconds']:>9.1f}s"
            + (f" ({s['failed']} failed)" if s.get("failed") else "")
            + f" {drain:>20}"
            f" {h['p50Ms']:>7.1f}/{h['p99Ms']:.1f} ms {run['controllerRssMiB']:>6.0f}MiB"
            f" {run.get('loadAverage', 0.0):>5.1f}"
        )
    if results.get("etcdSkipped"):
        lines.append(f"etcd skipped: {results['etcdSkipped']}")
    return "\n".join(lines)
