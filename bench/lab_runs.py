"""Our side: migrations in a real lab (controller + 2 handlers, mTLS, loopback), observed
from outside only: the CLI, the API (VMI/VMIM status) and the handlers' logs.

Where each number comes from (one record per migration):

- ``cliReturned``: wall clock when ``vmferry migrate NAME`` (no ``--wait``) exited.
- phases: ``status.phaseTransitionTimestamps`` of the VMIM (microseconds).
- ``handlerStart``: the source handler's log line "starting to" (written right after it
  recorded ``startTimestamp``; logs have millisecond timestamps, ``startTimestamp`` and
  ``endTimestamp`` only seconds).
- ``firstByte``: the source's "round 0 sent … in S s" line minus S: the start of round 0,
  i.e. the first batch being gathered (one batch, a few ms, before its first byte is on
  the wire). No status field carries the first byte's time (see ``MISSING_FIELDS``).
- ``handlerSucceeded``: the source's "succeeded" line (after its final status write).
- transfer: ``vmi.status.migrationState.transfer`` (bytes, rounds, downtime parts,
  guest-seen downtime, digest).
- CPU: utime+stime of each handler (and the controller) from /proc, before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.stats import per_gib
from vmferry.client import ApiClient
from vmferry.config import CONFIG_ENV, ClientConfig
from vmferry.lab import LAB_ENV, Lab
from vmferry.lab.netns import parse_link
from vmferry.migration_state import MigrationPhase, MigrationState, VMIPhase
from vmferry.objects import conditions

Obj = dict[str, Any]
NAMESPACE = "default"
MIGRATION_TIMEOUT = 600.0
GAP_WAIT = 3.0  # s for the guest-seen gap to appear in the VMI status after Succeeded
CLK_TCK = os.sysconf("SC_CLK_TCK")

# What the bench would read from status if it were there (reported with the results).
MISSING_FIELDS = {
    "status.migrationState.transfer.firstByteTimestamp": (
        "microsecond wall-clock time of the first PageBatch written (Stats.first_byte_at "
        "exists, as monotonic time, but is not published); the bench approximates it from "
        "the round-0 log line"
    ),
    "status.migrationState.startTimestamp/endTimestamp with sub-second precision": (
        "both are written with conditions.now_rfc3339() (whole seconds); the bench uses "
        "the handler's log lines (milliseconds) instead"
    ),
}

_LOG_RE = re.compile(r'^ts=(\S+) level=\S+ component=\S+ logger=\S+ msg="(.*)"')
_ROUND_RE = re.compile(
    r"round (\d+) sent (\d+) pages in ([0-9.]+)s \((\d+) MiB/s\); (\d+) dirty \(([0-9.]+) MiB/s\)"
)


def vm_manifest(
    name: str,
    memory: str,
    content: str,
    dirty_rate: str = "0",
    hot_set: str = "0",
    touched: str = "0",
) -> Obj:
    workload: Obj = {"content": content, "dirtyRate": dirty_rate, "hotSet": hot_set}
    if touched != "0":
        workload["touched"] = touched
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "bench"}},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": {"app": "bench"}},
                "spec": {
                    "evictionStrategy": "LiveMigrate",
                    "domain": {"memory": {"guest": memory}},
                    "memvm": {"workload": workload},
                },
            },
        },
    }


def _ts(text: str) -> float:
    return conditions.parse_time(text).timestamp()


@dataclass(frozen=True)
class LogEvent:
    at: float  # epoch seconds
    msg: str


def read_log_events(path: Path, migration_uid: str) -> list[LogEvent]:
    """The log lines of one migration (``msg="migration <uid>: …"``), in order."""
    prefix = f"migration {migration_uid}: "
    events = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if prefix not in line:
            continue
        m = _LOG_RE.match(line)
        if m and m.group(2).startswith(prefix):
            events.append(LogEvent(_ts(m.group(1)), m.group(2)[len(prefix) :]))
    return events


def parse_source_log(events: list[LogEvent]) -> Obj:
    """handlerStart, firstByte, per-round lines, handOffCommitted, handlerSucceeded."""
    out: Obj = {"roundLog": []}
    for ev in events:
        if " starting to " in ev.msg:
            out["handlerStart"] = ev.at
        elif m := _ROUND_RE.search(ev.msg):
            rnd = {
                "round": int(m.group(1)),
                "pages": int(m.group(2)),
                "seconds": float(m.group(3)),
                "mibPerSecond": int(m.group(4)),
                "dirtyPages": int(m.group(5)),
                "dirtyMibPerSecond": float(m.group(6)),
                "endedAt": ev.at,
            }
            out["roundLog"].append(rnd)
            if rnd["round"] == 0:
                out["firstByte"] = ev.at - rnd["seconds"]
        elif ev.msg.startswith("switchover Committed recorded"):
            out["handOffCommitted"] = ev.at
        elif ev.msg.startswith("succeeded"):
            out["handlerSucceeded"] = ev.at
    return out


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads) and of its stream workers (the
    processes that carry a migration's channels 1..; not its guests), or None if it is
    gone."""
    if pid is None:
        return None
    own = _process_cpu(pid)
    if own is None:
        return None
    return own + workers_cpu_seconds(pid)


def workers_cpu_seconds(pid: int) -> float:
    """utime + stime of a handler's live stream workers."""
    return sum(_process_cpu(child) or 0.0 for child in stream_workers_of(pid))


def _process_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def stream_workers_of(pid: int) -> list[int]:
    """The live stream worker processes a handler started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != pid:
                continue
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"handler.migration.stream_worker" in cmdline:
            found.append(int(entry.name))
    return found


class LabBench:
    """One lab for the whole bench invocation: 2 nodes, so a VM migrates back and forth."""

    def __init__(
        self,
        root: Path,
        *,
        netns_link: str | None = None,
        ha: bool = False,
        stream_workers: int | None = None,
    ) -> None:
        """``netns_link``: a netns lab whose main and migration links both have this
        shape (``RATE[,DELAY]``), so a migration sees it whichever network it takes.
        ``ha``: the controllers replicated on etcd (``lab up --ha``); ``stream_workers``:
        each handler's stream worker processes (``lab up --stream-workers``; None: the
        handler's default)."""
        self.netns_link = netns_link
        self.ha = ha
        self.stream_workers = stream_workers
        self.lab = Lab(root / "lab")
        self.config: ClientConfig | None = None
        self.env = dict(os.environ)
        self.env[CONFIG_ENV] = str(self.lab.client_config_path)
        self.env[LAB_ENV] = str(self.lab.dir)

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self) -> None:
        if self.netns_link is None:
            self.config = self.lab.up(
                nodes=2,
                memory="16Gi",
                set_default=False,
                ha=self.ha,
                stream_workers=self.stream_workers,
            )
            return
        spec = parse_link("netns link", self.netns_link)
        self.config = self.lab.up(
            nodes=2,
            memory="16Gi",
            set_default=False,
            netns_mode=True,
            main_link=spec,
            migration_link=spec,
            stream_workers=self.stream_workers,
        )

    def down(self) -> None:
        self.lab.down()

    def api(self) -> ApiClient:
        assert self.config is not None, "lab is not up"
        return ApiClient(self.config, timeout=30)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "vmferry.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"vmferry {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    async def live_migration_config(self) -> Obj:
        async with self.api() as api:
            hco = await api.get("HyperConverged", "openshift-cnv", "kubevirt-hyperconverged")
        config: Obj = (hco.get("spec") or {}).get("liveMigrationConfig") or {}
        return config

    async def set_live_migration_config(self, fields: Obj) -> None:
        async with self.api() as api:
            await api.patch(
                "HyperConverged",
                "openshift-cnv",
                "kubevirt-hyperconverged",
                {"spec": {"liveMigrationConfig": fields}},
            )

    # -- VMs ----------------------------------------------------------------------------------

    async def create_vm(self, manifest: Obj, timeout: float = 180) -> Obj:
        name = manifest["metadata"]["name"]
        async with self.api() as api:
            await api.create(manifest)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    vmi = await api.get("VirtualMachineInstance", NAMESPACE, name)
                    if (vmi.get("status") or {}).get("phase") == VMIPhase.RUNNING:
                        return vmi
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"VMI {name} did not start within {timeout:.0f}s")
                await asyncio.sleep(0.25)

    async def wait_guest_booted(self, name: str, timeout: float = 120) -> None:
        """A memvm guest answers Running before its boot fill ends on big RAM; wait until
        its console says it booted (so round 0 does not race the fill)."""
        async with self.api() as api:
            vmi = await api.get("VirtualMachineInstance", NAMESPACE, name)
        uid, node = vmi["metadata"]["uid"], vmi["status"]["nodeName"]
        deadline = time.monotonic() + timeout
        guests = self.lab.runtime_dir(node) / "guests"
        while time.monotonic() < deadline:
            for log in guests.glob(f"{uid}*/console.log"):
                if "booted" in log.read_text(errors="replace"):
                    return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"guest of {name} did not boot within {timeout:.0f}s")

    async def delete_vm(self, name: str, timeout: float = 60) -> None:
        async with self.api() as api:
            await api.delete("VirtualMachine", NAMESPACE, name)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                vmis, _ = await api.list("VirtualMachineInstance", NAMESPACE)
                if not any(v["metadata"]["name"] == name for v in vmis):
                    return
                await asyncio.sleep(0.25)

    # -- one migration ------------------------------------------------------------------------

    def ram_allocated(self, node: str, vmi_uid: str) -> int | None:
        """Bytes of tmpfs actually allocated for the guest RAM file of ``vmi_uid`` on ``node``
        (the file is sparse: a 4 GiB guest with 256 MiB touched needs 256 MiB)."""
        if not node:
            return None
        for path in self.lab.ram_dir(node).glob(f"*/{vmi_uid}*.ram"):
            try:
                return path.stat().st_blocks * 512
            except OSError:
                continue
        return None

    def _pids(self) -> dict[str, int | None]:
        return {c: self.lab.pid(c) for c in ["controller", *self.lab.node_names()]}

    async def migrate(self, name: str, settle: float = 1.0) -> Obj:
        """Migrate ``name`` once (to the other node) and return its record."""
        pids = self._pids()
        cpu_before = {c: cpu_seconds(p) for c, p in pids.items()}
        nodes = {c: p for c, p in pids.items() if c != "controller" and p is not None}
        cpu_before |= {f"{c}/workers": workers_cpu_seconds(p) for c, p in nodes.items()}
        invoked = time.time()
        out = await asyncio.to_thread(self.cli, "migrate", name)
        cli_returned = time.time()
        m = re.search(r"\(([^)]+)\)", out.stdout)
        if not m:
            raise RuntimeError(f"cannot find the migration's name in {out.stdout!r}")
        vmim_name = m.group(1)
        async with self.api() as api:
            deadline = time.monotonic() + MIGRATION_TIMEOUT
            while True:
                vmim = await api.get("VirtualMachineInstanceMigration", NAMESPACE, vmim_name)
                phase = MigrationPhase.of(vmim)
                if phase.final:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"migration {vmim_name} did not finish")
                await asyncio.sleep(0.1)
            vmi = await api.get("VirtualMachineInstance", NAMESPACE, name)
            # The target records the gap its guest saw just after the hand-off, which
            # may land after the VMIM's Succeeded: wait for it (a short while).
            gap_deadline = time.monotonic() + GAP_WAIT
            while phase == MigrationPhase.SUCCEEDED and time.monotonic() < gap_deadline:
                if MigrationState.of(vmi).transfer.get("guestDowntimeMilliseconds") is not None:
                    break
                await asyncio.sleep(0.05)
                vmi = await api.get("VirtualMachineInstance", NAMESPACE, name)
        cpu_after = {c: cpu_seconds(p) for c, p in pids.items()}
        cpu_after |= {f"{c}/workers": workers_cpu_seconds(p) for c, p in nodes.items()}
        await asyncio.sleep(settle)  # the source guest's teardown, log flushes
        return self._record(name, vmim, vmi, invoked, cli_returned, cpu_before, cpu_after)

    def _record(
        self,
        name: str,
        vmim: Obj,
        vmi: Obj,
        invoked: float,
        cli_returned: float,
        cpu_before: dict[str, float | None],
        cpu_after: dict[str, float | None],
    ) -> Obj:
        status = vmim.get("status") or {}
        ms = MigrationState.of(vmi)
        phases = {
            p["phase"]: _ts(p["phaseTransitionTimestamp"])
            for p in status.get("phaseTransitionTimestamps") or []
        }
        created = _ts(vmim["metadata"]["creationTimestamp"])
        source, target = ms.source_node, ms.target_node
        uid = ms.migration_uid
        src_log = parse_source_log(read_log_events(self.lab.log_dir / f"{source}.log", uid))
        transfer: Obj = ms.transfer
        rec: Obj = {
            "vm": name,
            "migration": vmim["metadata"]["name"],
            "phase": status.get("phase"),
            "failureReason": ms.failure_reason or None,
            "source": source,
            "target": target,
            "memoryBytes": transfer.get("dataTotalBytes"),
            "transfer": transfer,
            "phases": {k: round(v - created, 6) for k, v in phases.items()},
            "roundLog": src_log["roundLog"],
        }
        succeeded = phases.get(MigrationPhase.SUCCEEDED)
        start = src_log.get("handlerStart")
        first = src_log.get("firstByte")
        done = src_log.get("handlerSucceeded")
        # creationTimestamp has whole seconds; the Pending phase (the controller's first
        # look at the VMIM, milliseconds later) has microseconds.
        begun = phases.get(MigrationPhase.PENDING, created)
        rec["endToEndSeconds"] = succeeded - begun if succeeded else None
        rec["cliSeconds"] = cli_returned - invoked
        if start and done:
            rec["migrationSeconds"] = done - start  # the source handler's whole migration
            mem = transfer.get("dataTotalBytes") or 0
            rec["throughput"] = mem / rec["migrationSeconds"] if mem else None
        if first:
            rec["cliToFirstByteSeconds"] = first - cli_returned
            if MigrationPhase.PENDING in phases:  # the controller saw the VMIM (whole s)
                rec["pendingToFirstByteSeconds"] = first - phases[MigrationPhase.PENDING]
            rec["handlerStartToFirstByteSeconds"] = first - start if start else None
        if start:
            rec["cliToHandlerStartSeconds"] = start - cli_returned
        if done and succeeded:
            rec["handlerToVmimSucceededSeconds"] = succeeded - done
        if succeeded and src_log.get("handOffCommitted"):
            rec["commitToVmimSucceededSeconds"] = succeeded - src_log["handOffCommitted"]
        rec["downtimeMilliseconds"] = transfer.get("downtimeMilliseconds")
        rec["guestDowntimeMilliseconds"] = transfer.get("guestDowntimeMilliseconds")
        rec["rounds"] = transfer.get("rounds")
        rec["wireBytes"] = transfer.get("wireBytes")
        rec["digestVerified"] = transfer.get("digestVerified")
        for part, value in (transfer.get("downtimePartsMilliseconds") or {}).items():
            rec[f"downtime_{part}"] = value
        rec["targetRamAllocatedBytes"] = self.ram_allocated(target, vmi["metadata"]["uid"])
        for comp in cpu_before:
            b, a = cpu_before[comp], cpu_after.get(comp)
            node, _, workers = comp.partition("/")
            role = "source" if node == source else "target" if node == target else node
            key = f"cpuWorkers_{role}" if workers else f"cpu_{role}"  # cpu_ includes them
            rec[key] = round(a - b, 3) if a is not None and b is not None else None
        for role in ("source", "target"):  # CPU-seconds per GiB of guest memory migrated
            value = per_gib(rec.get(f"cpu_{role}"), rec["memoryBytes"])
            rec[f"cpuPerGiB_{role}"] = None if value is None else round(value, 3)
        return rec


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).isoformat()
