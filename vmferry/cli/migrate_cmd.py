"""``vmferry migrate VM`` and ``vmferry migrate-cancel VM`` (virtctl's commands)."""

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


def cmd_migrate(args: argparse.Namespace) -> int:
    try:
        added = _selector(args.addedNodeSelector)
    except ValueError as e:
        return error(str(e))

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
        if not active:
            return error(f"found no migration to cancel for {ns}/{args.vm}")
        for vmim in active:
            await api.delete("VirtualMachineInstanceMigration", ns, vmim["metadata"]["name"])
        print(f"VM {args.vm} was canceled")
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
    p.add_argument("--wait", action="store_true", help="wait for the end, showing progress")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to --wait (default 1800)")
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("migrate-cancel", parents=[common], help="cancel a VM's running migration")
    p.add_argument("vm")
    p.set_defaults(func=cmd_migrate_cancel)
