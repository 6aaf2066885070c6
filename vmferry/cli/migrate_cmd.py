"""``vmferry migrate VM`` and ``vmferry migrate-cancel VM`` (virtctl's commands).

``vmferry migrate VM --to-cluster PROVIDER`` moves the VM to another cluster instead: it
creates a one-VM ``live`` Plan (source: this cluster's ``host`` provider, created if
missing; destination: the Provider PROVIDER in ``openshift-mtv``) and a Migration that
runs it (the orchestrator, ``controller/forklift/``, does the rest); ``--wait`` follows
the Migration to its end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from vmferry.cli.common import Obj, error, namespace, run_with_client
from vmferry.cli.progress import MigrationProgress
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError, NotFound
from vmferry.migration_state import MigrationPhase, MigrationState
from vmferry.objects import kinds
from vmferry.objects.schema.forklift import (
    MIGRATION_FINAL_PHASES,
    MigrationRunPhase,
    PlanType,
    ProviderType,
)

HOST_PROVIDER = "host"  # this cluster's provider (MTV's local provider: no url, no secret)
FOLLOW_INTERVAL = 1.0  # s between reads of a Migration with --wait


def _selector(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"--addedNodeSelector: {item!r} is not KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


async def wait_for_migration(
    api: ApiClient, ns: str, name: str, *, timeout: float, progress: MigrationProgress | None
) -> Obj:
    """Follow a VMIM until it is final; returns it. TimeoutError after ``timeout`` s."""
    vmim = await api.get("VirtualMachineInstanceMigration", ns, name)
    async with asyncio.timeout(timeout):
        while not MigrationPhase.of(vmim).final:
            if progress:
                progress.update(vmim)
            try:
                async for etype, obj in api.watch(
                    "VirtualMachineInstanceMigration",
                    ns,
                    resource_version=vmim["metadata"]["resourceVersion"],
                ):
                    if etype == "BOOKMARK" or obj["metadata"]["name"] != name:
                        continue
                    vmim = obj
                    if progress:
                        progress.update(vmim)
                    if MigrationPhase.of(vmim).final or etype == "DELETED":
                        return vmim
            except ApiError:
                await asyncio.sleep(0.5)  # the controller restarts: reread and watch again
                try:
                    vmim = await api.get("VirtualMachineInstanceMigration", ns, name)
                except NotFound:
                    return vmim
                except ApiError:
                    continue
    return vmim


def host_provider_manifest() -> Obj:
    return {
        "apiVersion": kinds.FORKLIFT,
        "kind": "Provider",
        "metadata": {"name": HOST_PROVIDER, "namespace": kinds.MTV_NAMESPACE},
        "spec": {"type": ProviderType.OPENSHIFT},
    }


def one_vm_plan(vm: str, namespace: str, provider: str, target_namespace: str) -> Obj:
    """The live Plan ``migrate --to-cluster`` creates (named by the API)."""
    return {
        "apiVersion": kinds.FORKLIFT,
        "kind": "Plan",
        "metadata": {"generateName": f"{vm}-to-{provider}-", "namespace": kinds.MTV_NAMESPACE},
        "spec": {
            "type": PlanType.LIVE,
            "provider": {
                "source": {"name": HOST_PROVIDER, "namespace": kinds.MTV_NAMESPACE},
                "destination": {"name": provider, "namespace": kinds.MTV_NAMESPACE},
            },
            "targetNamespace": target_namespace,
            "vms": [{"name": vm, "namespace": namespace}],
        },
    }


def plan_migration(plan: Obj) -> Obj:
    meta = plan["metadata"]
    return {
        "apiVersion": kinds.FORKLIFT,
        "kind": "Migration",
        "metadata": {"generateName": f"{meta['name']}-", "namespace": meta["namespace"]},
        "spec": {"plan": {"name": meta["name"], "namespace": meta["namespace"]}},
    }


async def follow_migration(
    api: Any, name: str, *, timeout: float, interval: float = FOLLOW_INTERVAL
) -> Obj:
    """Read the Migration until its phase is final, printing each VM's phase changes;
    TimeoutError after ``timeout`` s."""
    seen: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        while True:
            migration: Obj = await api.get("Migration", kinds.MTV_NAMESPACE, name)
            for vm in (migration.get("status") or {}).get("vms") or []:
                line = f"{vm.get('phase', '')}: {vm.get('reason', '')}".rstrip(": ")
                if seen.get(vm["name"]) != line:
                    seen[vm["name"]] = line
                    print(f"  {vm['namespace']}/{vm['name']}: {line}")
            if (migration.get("status") or {}).get("phase") in MIGRATION_FINAL_PHASES:
                return migration
            await asyncio.sleep(interval)


async def migrate_to_cluster(
    api: Any,
    vm: str,
    namespace: str,
    provider: str,
    *,
    target_namespace: str = "",
    wait: bool = False,
    timeout: float = 1800,
    dry_run: bool = False,
) -> int:
    """``migrate VM --to-cluster PROVIDER``: the Plan and its Migration (see the module)."""
    try:
        await api.get("VirtualMachine", namespace, vm)
    except NotFound:
        return error(
            f'virtualmachine "{vm}" not found in {namespace}: --to-cluster moves a VM '
            "(with its VirtualMachine) to another cluster"
        )
    try:
        destination = await api.get("Provider", kinds.MTV_NAMESPACE, provider)
    except NotFound:
        return error(
            f'no provider "{provider}" in {kinds.MTV_NAMESPACE}: create it with the '
            "cluster's url, token and CA first (reference 12.6)"
        )
    if not (destination.get("spec") or {}).get("url"):
        return error(f'provider "{provider}" is this cluster: --to-cluster needs another one')
    try:
        await api.get("Provider", kinds.MTV_NAMESPACE, HOST_PROVIDER)
    except NotFound:
        await api.create(host_provider_manifest(), dry_run=dry_run)
        print(f"provider.forklift.konveyor.io/{HOST_PROVIDER} created")
    plan = await api.create(
        one_vm_plan(vm, namespace, provider, target_namespace or namespace), dry_run=dry_run
    )
    print(f"plan.forklift.konveyor.io/{plan['metadata'].get('name', '')} created")
    if dry_run:
        return 0
    migration = await api.create(plan_migration(plan))
    name = migration["metadata"]["name"]
    print(f"migration.forklift.konveyor.io/{name} created")
    if not wait:
        return 0
    try:
        final = await follow_migration(api, name, timeout=timeout)
    except TimeoutError:
        return error(f"migration {name} did not finish within {timeout:.0f}s")
    status = final.get("status") or {}
    if status.get("phase") == MigrationRunPhase.SUCCEEDED:
        print(
            f"Migration {name} succeeded: {vm} runs on {provider}/{target_namespace or namespace}"
        )
        return 0
    print(
        f"Migration {name} {str(status.get('phase', '')).lower()}: {status.get('reason', '')}",
        file=sys.stderr,
    )
    return 1


def cmd_migrate(args: argparse.Namespace) -> int:
    try:
        added = _selector(args.addedNodeSelector)
    except ValueError as e:
        return error(str(e))
    if args.to_cluster is None and args.target_namespace:
        return error("--target-namespace goes with --to-cluster")
    if args.to_cluster is not None:
        if not args.to_cluster:
            return error(
                "--to-cluster needs the name of a Provider (vmferry get providers -n "
                f"{kinds.MTV_NAMESPACE})"
            )
        if added:
            return error(
                "--addedNodeSelector chooses a node in this cluster: it does not go "
                "with --to-cluster (the destination places the VM)"
            )

        async def across(api: ApiClient, config: ClientConfig) -> int:
            return await migrate_to_cluster(
                api,
                args.vm,
                namespace(args, config),
                args.to_cluster,
                target_namespace=args.target_namespace or "",
                wait=args.wait,
                timeout=args.timeout,
                dry_run=args.dry_run,
            )

        return run_with_client(args, across)

    async def run(api: ApiClient, config: ClientConfig) -> int:
        ns = namespace(args, config)
        vmim: Obj = {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"generateName": "kubevirt-migrate-vm-", "namespace": ns},
            "spec": {"vmiName": args.vm},
        }
        if added:
            vmim["spec"]["addedNodeSelector"] = added
        created = await api.create(vmim, dry_run=args.dry_run)
        name = created["metadata"].get("name", "")
        # virtctl's words, then the migration's name (virtctl leaves it to be looked up).
        print(f"VM {args.vm} was scheduled to migrate" + (f" ({name})" if name else ""))
        if not args.wait or args.dry_run:
            return 0
        progress = MigrationProgress()
        try:
            final = await wait_for_migration(api, ns, name, timeout=args.timeout, progress=progress)
        except TimeoutError:
            progress.close()
            return error(f"migration {name} did not finish within {args.timeout:.0f}s")
        progress.close()
        ms = MigrationState.of(final)
        if MigrationPhase.of(final) == MigrationPhase.SUCCEEDED:
            print(f"Migration {name} succeeded: {ms.source_node} -> {ms.target_node}")
            return 0
        print(f"Migration {name} failed: {ms.failure_reason or 'unknown reason'}", file=sys.stderr)
        return 1

    return run_with_client(args, run)


def cmd_migrate_cancel(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        ns = namespace(args, config)
        vmims, _ = await api.list("VirtualMachineInstanceMigration", ns)
        active = [
            v
            for v in vmims
            if v["spec"].get("vmiName") == args.vm
            and not MigrationPhase.of(v).final
            and not v["metadata"].get("deletionTimestamp")
        ]
        if not active:  # virtctl's words, exactly
            return error(f"Found no migration to cancel for {args.vm}")
        for vmim in active:
            name = vmim["metadata"]["name"]
            try:
                await api.delete("VirtualMachineInstanceMigration", ns, name, dry_run=args.dry_run)
            except ApiError as e:
                return error(
                    f"Error canceling migration {name} of a VirtualMachine {args.vm}: {e.message}"
                )
        print(f"VM {args.vm} was scheduled to migrate-cancel")
        return 0

    return run_with_client(args, run)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("migrate", parents=[common], help="live-migrate a VM to another node")
    p.add_argument("vm", help="name of the VM (its VMI)")
    p.add_argument(
        "--addedNodeSelector",
        "--added-node-selector",
        dest="addedNodeSelector",
        help="extra node labels the target must have: k=v,k2=v2 (this migration only)",
    )
    p.add_argument(
        "--to-cluster",
        metavar="PROVIDER",
        help="move the VM to another cluster: the Provider (in openshift-mtv) naming it; "
        "creates a one-VM live Plan and its Migration",
    )
    p.add_argument(
        "--target-namespace",
        help="with --to-cluster: the namespace on the destination (default: the VM's)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the end, showing progress")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to --wait (default 1800)")
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("migrate-cancel", parents=[common], help="cancel a VM's running migration")
    p.add_argument("vm")
    p.add_argument("--dry-run", action="store_true", help="validate only; cancel nothing")
    p.set_defaults(func=cmd_migrate_cancel)
