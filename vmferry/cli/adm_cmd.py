"""``vmferry adm cordon|uncordon|drain|drain-capacity`` (``oc adm`` for vmferry nodes).

``drain NODE`` cordons the node, then live-migrates every VMI on it whose
``evictionStrategy`` is ``LiveMigrate`` / ``LiveMigrateIfPossible`` (or unset: the
cluster default is LiveMigrate, as in OpenShift Virtualization) by creating evacuation
migrations, which the controller queues ahead of user requests and runs within the
parallel limits. A VMI that cannot be live-migrated blocks the drain, named in the
message, unless ``--force`` stops it. The command shows progress and waits until the
node is empty and every evacuation it created is final; a failed evacuation is retried.
Before each evacuation the VMI is read again: one a concurrent migration moved off the
node meanwhile is not evacuated. The exit status is 1 when the last evacuation of a VMI
failed, even if the node is empty.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from vmferry.cli import peer_cmd
from vmferry.cli.common import Obj, error, run_with_client
from vmferry.cli.progress import MultiMigrationProgress
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import NotFound
from vmferry.migration_state import VMI_FINAL_PHASES, MigrationPhase, MigrationState
from vmferry.objects import conditions, kinds, schema
from vmferry.objects.quantity import format_quantity, parse_quantity

EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"
MIGRATE_STRATEGIES = ("LiveMigrate", "LiveMigrateIfPossible")
EVACUATION_ATTEMPTS = 3  # per VMI; a failed evacuation migration is retried this often
POLL_INTERVAL = 0.5  # s


async def _set_unschedulable(api: ApiClient, node: str, value: bool) -> str:
    current = await api.get("Node", None, node)
    if bool((current.get("spec") or {}).get("unschedulable")) == value:
        return f"node/{node} already {'cordoned' if value else 'uncordoned'}"
    await api.patch("Node", None, node, {"spec": {"unschedulable": value}})
    return f"node/{node} {'cordoned' if value else 'uncordoned'}"


def cmd_cordon(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        print(await _set_unschedulable(api, args.node, True))
        return 0

    return run_with_client(args, run)


def cmd_uncordon(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        print(await _set_unschedulable(api, args.node, False))
        return 0

    return run_with_client(args, run)


def _strategy(vmi: Obj) -> str:
    return str((vmi.get("spec") or {}).get("evictionStrategy") or "LiveMigrate")


def _blocker(vmi: Obj) -> str | None:
    """Why this VMI cannot be live-migrated off its node, or None."""
    name = f"{vmi['metadata']['namespace']}/{vmi['metadata']['name']}"
    strategy = _strategy(vmi)
    if strategy not in MIGRATE_STRATEGIES:
        return f"{name} has evictionStrategy {strategy}"
    migratable = conditions.get(vmi, "LiveMigratable")
    if migratable is not None and migratable.get("status") == "False" and strategy == "LiveMigrate":
        return f"{name} is not live-migratable: {migratable.get('message') or migratable.get('reason')}"
    return None


def _stopped_instead(vmi: Obj) -> bool:
    """evictionStrategy LiveMigrateIfPossible on a VMI that cannot be live-migrated (a
    volume that is not shared, say): KubeVirt evicts it, so drain stops it."""
    migratable = conditions.get(vmi, "LiveMigratable")
    return (
        _strategy(vmi) == "LiveMigrateIfPossible"
        and migratable is not None
        and migratable.get("status") == "False"
    )


def _active_migration(vmims: list[Obj], vmi: Obj) -> Obj | None:
    for m in vmims:
        if (
            m["metadata"]["namespace"] == vmi["metadata"]["namespace"]
            and m["spec"].get("vmiName") == vmi["metadata"]["name"]
            and not MigrationPhase.of(m).final
        ):
            return m
    return None


def _last_failure(vmims: list[Obj], namespace: str, vmi_name: str) -> str:
    failed = [
        m
        for m in vmims
        if m["metadata"]["namespace"] == namespace
        and m["spec"].get("vmiName") == vmi_name
        and MigrationPhase.of(m) == MigrationPhase.FAILED
    ]
    return (MigrationState.of(failed[-1]).failure_reason if failed else "") or "unknown"


async def _still_on(api: ApiClient, vmi: Obj, node: str) -> bool:
    """Read again, just before an evacuation is created: the VMI still runs on ``node``
    and no migration of it is under way (a concurrent migration may have moved it off
    the node since the last look: an evacuation would then move it off a node nobody
    drains). The migrations are listed before the VMI is read: one that finished in
    between shows in the VMI's nodeName."""
    namespace, name = vmi["metadata"]["namespace"], vmi["metadata"]["name"]
    vmims, _ = await api.list("VirtualMachineInstanceMigration")
    if _active_migration(vmims, vmi):
        return False
    try:
        fresh = await api.get("VirtualMachineInstance", namespace, name)
    except NotFound:
        return False
    status = fresh.get("status") or {}
    return (
        fresh["metadata"].get("uid") == vmi["metadata"].get("uid")
        and status.get("nodeName") == node
        and status.get("phase") not in VMI_FINAL_PHASES
    )


async def drain(
    api: ApiClient, node: str, *, force: bool, timeout: float, poll: float = POLL_INTERVAL
) -> int:
    """``vmferry adm drain NODE``; the exit status: 0 once every live-migratable VMI left
    the node and the last evacuation of each succeeded, 1 otherwise."""
    await api.get("Node", None, node)
    print(await _set_unschedulable(api, node, True))
    vmis = [
        v
        for v in (await api.list("VirtualMachineInstance"))[0]
        if (v.get("status") or {}).get("nodeName") == node
        and (v.get("status") or {}).get("phase") not in VMI_FINAL_PHASES
    ]
    blockers = [b for v in vmis if (b := _blocker(v))]
    if blockers and not force:
        print(
            "error: cannot drain node "
            + node
            + ": these VMIs cannot be live-migrated:\n  "
            + "\n  ".join(blockers)
            + "\nset evictionStrategy: LiveMigrate (when migratable), stop them, or use --force "
            "to stop them; the node stays cordoned",
            file=sys.stderr,
        )
        return 1
    for vmi in vmis:
        if _blocker(vmi) or _stopped_instead(vmi):
            why = "--force" if _blocker(vmi) else "LiveMigrateIfPossible, not live-migratable"
            print(f"stopping {vmi['metadata']['namespace']}/{vmi['metadata']['name']} ({why})")
            await api.delete(
                "VirtualMachineInstance", vmi["metadata"]["namespace"], vmi["metadata"]["name"]
            )
    movable = [v for v in vmis if not _blocker(v) and not _stopped_instead(v)]
    drain_started = conditions.now_rfc3339()
    attempts: dict[str, int] = {}
    # (namespace, VMI name) -> the name of the last evacuation this drain created for it
    evacuations: dict[tuple[str, str], str] = {}
    progress = MultiMigrationProgress(title=f"draining {node}")
    movable_keys = {(v["metadata"]["namespace"], v["metadata"]["name"]) for v in movable}
    try:
        async with asyncio.timeout(timeout):
            while True:
                current = {
                    v["metadata"]["uid"]: v for v in (await api.list("VirtualMachineInstance"))[0]
                }
                remaining = [
                    current[v["metadata"]["uid"]]
                    for v in movable
                    if v["metadata"]["uid"] in current
                    and current[v["metadata"]["uid"]]["status"].get("nodeName") == node
                ]
                vmims, _ = await api.list("VirtualMachineInstanceMigration")
                by_name = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in vmims}
                for vmim in vmims:  # the migrations moving this node's VMIs
                    key = (vmim["metadata"]["namespace"], vmim["spec"].get("vmiName"))
                    tracked = vmim["metadata"]["name"] in progress.names()
                    if key in movable_keys and (
                        tracked or vmim["metadata"].get("creationTimestamp", "") >= drain_started
                    ):
                        progress.update(vmim)
                mine = {k: by_name.get((k[0], n)) for k, n in evacuations.items()}
                running = [m for m in mine.values() if m and not MigrationPhase.of(m).final]
                if not remaining and not running:
                    break
                for vmi in remaining:
                    if _active_migration(vmims, vmi):
                        continue
                    uid = vmi["metadata"]["uid"]
                    namespace, name = vmi["metadata"]["namespace"], vmi["metadata"]["name"]
                    if attempts.get(uid, 0) >= EVACUATION_ATTEMPTS:
                        progress.close()
                        return error(
                            f"could not evacuate {namespace}/{name} after "
                            f"{EVACUATION_ATTEMPTS} attempts: "
                            f"{_last_failure(vmims, namespace, name)}; the node stays cordoned"
                        )
                    if not await _still_on(api, vmi, node):
                        continue  # moved (or moving) already: looked at again next time
                    attempts[uid] = attempts.get(uid, 0) + 1
                    created = await api.create(
                        {
                            "apiVersion": kinds.KUBEVIRT,
                            "kind": "VirtualMachineInstanceMigration",
                            "metadata": {
                                "generateName": "kubevirt-evacuation-",
                                "namespace": namespace,
                                "annotations": {EVACUATION_ANNOTATION: node},
                            },
                            "spec": {"vmiName": name},
                        }
                    )
                    evacuations[(namespace, name)] = created["metadata"]["name"]
                await asyncio.sleep(poll)
    except TimeoutError:
        progress.close()
        return error(
            f"drain of {node} did not finish within {timeout:.0f}s; the node stays cordoned"
        )
    progress.close()
    failed = [
        f"{ns}/{name}: {MigrationState.of(m).failure_reason or 'unknown'}"
        for (ns, name), m in mine.items()
        if m is not None and MigrationPhase.of(m) == MigrationPhase.FAILED
    ]
    if failed:
        return error(
            f"drain of {node}: evacuation failed for "
            + "; ".join(failed)
            + "; the node stays cordoned"
        )
    print(f"node/{node} drained ({len(movable)} VMIs live-migrated)")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        return await drain(api, args.node, force=args.force, timeout=args.timeout)

    return run_with_client(args, run)


def capacity_report(nodes: list[Obj], vmis: list[Obj], parallel_drains: int) -> tuple[str, bool]:
    """The reference's spare-memory check (12.1.1): returns (report, enough)."""
    rows = []
    highest = 0
    spare = 0
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        status = node.get("status") or {}
        capacity = parse_quantity(
            ((status.get("allocatable") or status.get("capacity")) or {}).get("memory", 0)
        )
        used = sum(
            schema.memory_bytes(v.get("spec") or {})
            for v in vmis
            if (v.get("status") or {}).get("nodeName") == name
            and (v.get("status") or {}).get("phase") not in VMI_FINAL_PHASES
        )
        highest = max(highest, used)
        usable = conditions.is_true(node, "Ready") and not (node.get("spec") or {}).get(
            "unschedulable"
        )
        if usable:
            spare += max(0, capacity - used)
        rows.append(
            f"  {name:<16} capacity {format_quantity(capacity):>8}  VM memory {format_quantity(used):>8}"
            f"{'' if usable else '  (not schedulable: its spare does not count)'}"
        )
    required = parallel_drains * highest
    enough = spare >= required
    report = "\n".join(
        [
            "nodes:",
            *rows,
            f"highest total VM memory on one node: {format_quantity(highest)}",
            f"required spare memory = {parallel_drains} parallel drain(s) x {format_quantity(highest)} = {format_quantity(required)}",
            f"spare memory on schedulable nodes: {format_quantity(spare)}",
            "enough spare capacity"
            if enough
            else f"NOT enough: short by {format_quantity(required - spare)}",
        ]
    )
    return report, enough


def cmd_drain_capacity(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        nodes, _ = await api.list("Node")
        vmis, _ = await api.list("VirtualMachineInstance")
        report, enough = capacity_report(nodes, vmis, args.parallel_drains)
        print(report)
        return 0 if enough else 1

    if args.parallel_drains < 1:
        return error("--parallel-drains must be at least 1")
    return run_with_client(args, run)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    adm = sub.add_parser(
        "adm", help="administration: cordon, uncordon, drain, drain-capacity, peer clusters"
    )
    asub = adm.add_subparsers(dest="adm_command", required=True)
    peer_cmd.add_parser(asub, common)
    p = asub.add_parser("cordon", parents=[common], help="mark a node unschedulable")
    p.add_argument("node")
    p.set_defaults(func=cmd_cordon)
    p = asub.add_parser("uncordon", parents=[common], help="mark a node schedulable")
    p.add_argument("node")
    p.set_defaults(func=cmd_uncordon)
    p = asub.add_parser(
        "drain", parents=[common], help="cordon a node and live-migrate every VM off it, then wait"
    )
    p.add_argument("node")
    p.add_argument(
        "--force",
        action="store_true",
        help="stop VMIs that cannot be live-migrated instead of refusing",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    p.set_defaults(func=cmd_drain)
    p = asub.add_parser(
        "drain-capacity",
        parents=[common],
        help="spare memory needed for N parallel node drains vs what the cluster has",
    )
    p.add_argument("--parallel-drains", type=int, default=1, metavar="N")
    p.set_defaults(func=cmd_drain_capacity)
