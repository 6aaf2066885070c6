"""The cross-cluster scenario (``make bench``, scenario ``xcluster``): the same busy VM
migrated inside cluster1 and then to cluster2, in a two-cluster lab (``vmferry lab up
--clusters 2``, loopback), throughput and guest-seen downtime of both (issue 18: the
cross-cluster figures within 10% of the in-cluster ones).

Per run: a fresh busy memvm VM in cluster1 boots; ``vmferry migrate`` moves it to the
other node of cluster1 (the in-cluster record, :meth:`bench.lab_runs.LabBench.migrate`);
then it moves to cluster2 as the reference does it by hand (12.4): a receiving copy of
the VM in cluster2 (``runStrategy: WaitAsReceiver``, ``kubevirt.io/restore-run-strategy``),
a receiving VMIM (``spec.receive.migrationID``), and the sending VMIM in cluster1
(``spec.sendTo{migrationID, connectURL}``, connectURL = cluster2's synchronization
address). The cross-cluster record is read the same way as the in-cluster one (the
sending VMIM's phases, cluster1's source handler log, ``migrationState.transfer``); the
guest-seen downtime comes from the receiving VMI (the target measured it) when it is
there, else from the source VMI.

Guarded: when the lab has no sync controllers, the feature gate cannot be set, a VMIM is
refused, or the first cross-cluster migration does not finish, the result is
``{"unavailable": "<reason>"}`` and the table says "cross-cluster unavailable: <reason>".
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from pathlib import Path
from typing import Any

from bench.lab_runs import NAMESPACE, LabBench, vm_manifest
from bench.stats import summaries
from vmferry.cli.migrate_cmd import wait_for_migration
from vmferry.client import ApiClient
from vmferry.config import CONFIG_ENV
from vmferry.decentralized import (
    FEATURE_GATE,
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    SYNC_ADDRESSES_FIELD,
)
from vmferry.errors import ApiError, NotFound
from vmferry.lab import LAB_ENV
from vmferry.lab.multi import MultiLab
from vmferry.migration_state import MigrationPhase, MigrationState
from vmferry.objects.kinds import SYSTEM_NAMESPACE

Obj = dict[str, Any]
MiB = 1 << 20
SENDER, RECEIVER = "cluster1", "cluster2"
HCO = ("HyperConverged", SYSTEM_NAMESPACE, "kubevirt-hyperconverged")
VMIM = "VirtualMachineInstanceMigration"
# The switchover's last two steps tell the two apart: inside one cluster the target
# learns the hand-off from its own VMI watch; across clusters from the source's Commit
# frame, which leaves when the source's watch shows the decision (SourceEngine.observe):
# one hop later.
PARTS = ["downtime_decision", "downtime_resume"]
KEYS = ["throughput", "migrationSeconds", "endToEndSeconds", "guestDowntimeMilliseconds", *PARTS]
WITHIN = 0.10  # the bar: cross-cluster within 10% of in-cluster
CROSS_TIMEOUT = 180.0  # s for one cross-cluster migration to reach a final phase
GAP_WAIT = 3.0  # s for the guest-seen gap to land in the receiving VMI


class Unavailable(Exception):
    """The cross-cluster migration cannot run here; the message says why."""


def _bench_for(multi: MultiLab, cluster: str, root: Path) -> LabBench:
    """A LabBench bound to one cluster of the two-cluster lab (its client config, its
    logs and pids)."""
    bench = LabBench(root / f"bench-{cluster}")
    lab = multi.lab(cluster)
    bench.lab = lab
    bench.env[CONFIG_ENV] = str(lab.client_config_path)
    bench.env[LAB_ENV] = str(lab.dir)
    return bench


async def _enable_gate(api: ApiClient, cluster: str) -> None:
    try:
        await api.patch(*HCO, {"spec": {"featureGates": {FEATURE_GATE: True}}})
    except ApiError as e:
        raise Unavailable(
            f"{cluster}: cannot enable the feature gate {FEATURE_GATE}: {e}"
        ) from None


async def _sync_address(api: ApiClient, multi: MultiLab) -> str:
    """cluster2's synchronization address: the HyperConverged status (the product's
    way), else what the lab configured its sync controller to advertise."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        hco = await api.get(*HCO)
        addresses = (hco.get("status") or {}).get(SYNC_ADDRESSES_FIELD) or []
        if addresses:
            return str(addresses[0])
        await asyncio.sleep(0.5)
    sync = multi.lab(RECEIVER).info().get("sync") or {}
    if not sync.get("advertise"):
        raise Unavailable(f"{RECEIVER} has no sync controller address")
    return str(sync["advertise"])


def _receiver_copy(vm: Obj) -> Obj:
    spec = copy.deepcopy(vm["spec"])
    restore = spec.get("runStrategy") or "Always"
    spec["runStrategy"] = RUN_STRATEGY_WAIT_AS_RECEIVER
    meta = vm["metadata"]
    return {
        "apiVersion": vm["apiVersion"],
        "kind": "VirtualMachine",
        "metadata": {
            "name": meta["name"],
            "namespace": NAMESPACE,
            "labels": dict(meta.get("labels") or {}),
            "annotations": {RESTORE_RUN_STRATEGY_ANNOTATION: restore},
        },
        "spec": spec,
    }


def _vmim(name: str, vmi: str, how: Obj) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": VMIM,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"vmiName": vmi, **how},
    }


async def migrate_across(
    b1: LabBench,
    b2: LabBench,
    name: str,
    migration_id: str,
    connect_url: str,
    settle: float = 1.0,
) -> Obj:
    """Move ``name`` from cluster1 to cluster2 once; the record as LabBench keeps it
    (``settle``: as :meth:`LabBench.migrate`, for the source handler's last log lines:
    the sending VMIM can be Succeeded before the handler logs its own "succeeded")."""
    async with b1.api() as api1, b2.api() as api2:
        vm = await api1.get("VirtualMachine", NAMESPACE, name)
        try:
            await api2.create(_receiver_copy(vm))
            await api2.create(_vmim(f"{name}-in", name, {"receive": {"migrationID": migration_id}}))
            invoked = time.time()
            await api1.create(
                _vmim(
                    f"{name}-out",
                    name,
                    {"sendTo": {"migrationID": migration_id, "connectURL": connect_url}},
                )
            )
        except ApiError as e:
            raise Unavailable(f"a cross-cluster object was refused: {e}") from None
        # Followed by watches, as ``vmferry migrate --wait`` follows the in-cluster VMIM:
        # polling both API servers every 100 ms cost them ~0.1 CPU-s per migration on the
        # two cores the migration's handlers use (the across figures only).
        try:
            out, into = await asyncio.gather(
                wait_for_migration(
                    api1, NAMESPACE, f"{name}-out", timeout=CROSS_TIMEOUT, progress=None
                ),
                wait_for_migration(
                    api2, NAMESPACE, f"{name}-in", timeout=CROSS_TIMEOUT, progress=None
                ),
            )
        except TimeoutError:
            out = await api1.get(VMIM, NAMESPACE, f"{name}-out")
            into = await api2.get(VMIM, NAMESPACE, f"{name}-in")
            raise Unavailable(
                f"the migration did not finish within {CROSS_TIMEOUT:.0f}s (sending VMIM "
                f"{MigrationPhase.of(out) or 'no phase'}, receiving VMIM "
                f"{MigrationPhase.of(into) or 'no phase'})"
            ) from None
        try:
            source_vmi = await api1.get("VirtualMachineInstance", NAMESPACE, name)
        except NotFound:
            # the source VM is Halted once the VM runs in cluster2: its VMI may be gone
            # already; the sending VMIM keeps the same migrationState (its mirror)
            source_vmi = out
        received = await api2.get("VirtualMachineInstance", NAMESPACE, name)
        gap_deadline = time.monotonic() + GAP_WAIT
        while (
            MigrationPhase.of(out) == MigrationPhase.SUCCEEDED
            and MigrationState.of(received).transfer.get("guestDowntimeMilliseconds") is None
            and time.monotonic() < gap_deadline
        ):
            await asyncio.sleep(0.05)
            received = await api2.get("VirtualMachineInstance", NAMESPACE, name)
    await asyncio.sleep(settle)
    # cluster1's source handler log and the sending VMIM; no CPU figures (node names
    # repeat across the clusters) and no target RAM (it is in cluster2).
    rec = b1._record(name, out, source_vmi, invoked, invoked, {}, {})
    rec.pop("targetRamAllocatedBytes", None)
    rec["receivingPhase"] = MigrationPhase.of(into)
    gap = MigrationState.of(received).transfer.get("guestDowntimeMilliseconds")
    if gap is not None:
        rec["guestDowntimeMilliseconds"] = gap
    if rec.get("phase") != MigrationPhase.SUCCEEDED:
        raise Unavailable(
            f"the cross-cluster migration ended {rec.get('phase')}: "
            f"{rec.get('failureReason') or 'no reason given'}"
        )
    return rec


async def _delete(bench: LabBench, name: str) -> None:
    with contextlib.suppress(Exception):
        await bench.delete_vm(name, timeout=30)


async def run_xcluster(quick: bool, runs: int | None, root: Path, log: Any) -> Obj:
    """The whole scenario; ``{"unavailable": reason}`` when it cannot run."""
    memory = "256Mi" if quick else "1Gi"
    n = runs if runs is not None else (2 if quick else 5)
    result: Obj = {
        "title": f"busy guest ({memory}, dirtying 50Mi/s) inside cluster1 vs to cluster2",
        "memory": memory,
        "runs": n,
    }
    multi = MultiLab(root / "lab")
    log(f"xcluster: starting two clusters (2 nodes each) in {multi.dir}")
    try:
        made = await asyncio.to_thread(multi.up, 2, 2, "16Gi", set_default=False)
    except Exception as e:
        return {**result, "unavailable": f"the two-cluster lab did not come up: {e}"}
    inside: list[Obj] = []
    across: list[Obj] = []
    configs = {c.name: c.config for c in made}
    b1, b2 = (_bench_for(multi, c, root) for c in (SENDER, RECEIVER))
    b1.config, b2.config = configs[SENDER], configs[RECEIVER]
    reason: str | None = None  # why the cross-cluster half cannot run (the rest still does)
    connect_url = ""
    try:
        try:
            if not multi.lab(RECEIVER).info().get("sync"):
                raise Unavailable("the lab has no sync controllers (sync_controller.main missing)")
            async with b1.api() as api1, b2.api() as api2:
                await _enable_gate(api1, SENDER)
                await _enable_gate(api2, RECEIVER)
                connect_url = await _sync_address(api2, multi)
            result["connectURL"] = connect_url
        except Unavailable as e:
            reason = str(e)
        for i in range(n):
            name = f"xvm-{i + 1}"
            await b1.create_vm(vm_manifest(name, memory, "random", dirty_rate="50Mi"))
            try:
                await b1.wait_guest_booted(name)
                await asyncio.sleep(1.0)
                rec = await b1.migrate(name)
                inside.append(rec)
                log(f"  inside #{i + 1}: {_line(rec)}")
                if reason is None:
                    try:
                        rec = await migrate_across(b1, b2, name, f"bench-{name}", connect_url)
                    except Unavailable as e:
                        reason = str(e)
                    else:
                        across.append(rec)
                        log(f"  across #{i + 1}: {_line(rec)}")
            finally:
                await _delete(b2, name)
                await _delete(b1, name)
    finally:
        log("xcluster: stopping the two clusters")
        await asyncio.to_thread(multi.down)
    if reason is not None:
        log(f"xcluster: cross-cluster unavailable: {reason}")
        result["unavailable"] = reason
    result["inside"] = _side(inside)
    result["across"] = _side(across)
    if across:
        result["ratios"] = compare(result["inside"]["summary"], result["across"]["summary"])
    return result


def _side(records: list[Obj]) -> Obj:
    return {
        "records": records,
        "summary": {k: (s.as_dict() if s else None) for k, s in summaries(records, KEYS).items()},
    }


def compare(inside: Obj, across: Obj) -> Obj:
    """Medians across / inside: throughput (higher is better) and guest-seen downtime
    (lower is better), and whether each is within the 10% bar."""
    out: Obj = {}
    for key, better in (("throughput", "higher"), ("guestDowntimeMilliseconds", "lower")):
        a, b = inside.get(key), across.get(key)
        if not a or not b or not a["median"]:
            out[key] = None
            continue
        ratio = b["median"] / a["median"]
        ok = ratio >= 1 - WITHIN if better == "higher" else ratio <= 1 + WITHIN
        out[key] = {"acrossOverInside": ratio, "within10Percent": ok}
    return out


def _line(rec: Obj) -> str:
    thr = (rec.get("throughput") or 0) / MiB
    gap = rec.get("guestDowntimeMilliseconds")
    return f"{rec.get('phase')} {thr:.0f} MiB/s, guest downtime " + (
        f"{gap:.1f} ms" if gap is not None else "n/a"
    )


def table_lines(result: Obj) -> list[str]:
    lines = ["", f"== xcluster: {result.get('title', 'cross-cluster migration')} =="]
    if "unavailable" in result:
        lines.append(f"  cross-cluster unavailable: {result['unavailable']}")
    for label, side in (("inside cluster1", "inside"), ("cluster1 -> cluster2", "across")):
        summary = (result.get(side) or {}).get("summary") or {}
        thr, gap = summary.get("throughput"), summary.get("guestDowntimeMilliseconds")
        if not thr:
            continue
        lines.append(
            f"  {label:<22} {thr['median'] / MiB:.0f} MiB/s "
            f"[{thr['min'] / MiB:.0f}..{thr['max'] / MiB:.0f}], guest-seen downtime "
            + (f"p50 {gap['median']:.1f} ms, p99 {gap['p99']:.1f} ms" if gap else "n/a")
        )
        steps = [
            f"{key.removeprefix('downtime_')} {s['median']:.1f} ms"
            for key in PARTS
            if (s := summary.get(key))
        ]
        if steps:
            lines.append(f"  {'':<22} switchover steps (median): {', '.join(steps)}")
    for key, r in (result.get("ratios") or {}).items():
        if r:
            verdict = "within 10%" if r["within10Percent"] else "NOT within 10%"
            lines.append(f"  {key}: across/inside {r['acrossOverInside']:.2f} ({verdict})")
    return lines
