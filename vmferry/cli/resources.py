"""``create``, ``apply``, ``delete``, ``patch``, ``label``, ``edit`` (``get`` and ``describe``:
``vmferry.cli.get_cmd``)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from vmferry.cli import get_cmd, manifests, printers, rbac_cmd
from vmferry.cli.common import (
    DryRun,
    Obj,
    add_dry_run,
    error,
    namespace,
    run_with_client,
    server_error,
)
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import AlreadyExists, ApiError, BadRequest, Conflict, NotFound
from vmferry.objects import kinds, limits, schema
from vmferry.objects.patch import apply_json_patch, apply_merge_patch, parse_patch

DELETE_WAIT_TIMEOUT = 60.0  # s; like kubectl, delete waits for finalizers to finish


def _flag_value(text: str) -> bool:
    """kubectl-style boolean flag values: ``--wait=false``."""
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _split_targets(targets: list[str]) -> tuple[kinds.Kind, list[str]]:
    """``KIND NAME...`` or ``KIND/NAME...`` of one kind (``get_cmd.split_types``)."""
    types, names = get_cmd.split_types(targets)
    if len(types) > 1:
        raise BadRequest("give one resource type here (several are for get and describe)")
    return types[0], names


_scope_ns = get_cmd.scope_ns


def _ref(obj: Obj) -> str:
    kind = kinds.by_kind(obj["kind"])
    return f"{printers.resource_name(kind)}/{obj['metadata'].get('name', '')}"


# -- create / apply / delete ----------------------------------------------------------------


def _prepare(obj: Obj, ns: str, explicit_ns: bool) -> Obj:
    kind = kinds.by_kind(str(obj.get("kind")))
    meta = obj.setdefault("metadata", {})
    if kind.namespaced:
        if explicit_ns and meta.get("namespace") and meta["namespace"] != ns:
            raise BadRequest(
                f"the namespace from the provided object {meta['namespace']!r} does not match "
                f"the namespace {ns!r}. You must pass '--namespace={meta['namespace']}' to perform this operation."
            )
        meta.setdefault("namespace", ns)
    return obj


def cmd_create(args: argparse.Namespace) -> int:
    if getattr(args, "subtype", None):
        return rbac_cmd.cmd_create_typed(args)
    if not args.filename:
        return error(
            "must specify -f FILE, or a type: rolebinding, clusterrolebinding, serviceaccount"
        )

    async def run(api: ApiClient, config: ClientConfig) -> int:
        ns = namespace(args, config)
        failed = 0
        for obj in manifests.load(args.filename):
            try:
                prepared = _prepare(obj, ns, bool(args.namespace))
                if args.dry_run == DryRun.CLIENT:
                    created = schema.validate(prepared)
                else:
                    created = await api.create(prepared, dry_run=args.dry_run == DryRun.SERVER)
                print(f"{_ref(created)} created{args.dry_run.suffix}")
            except ApiError as e:
                failed = server_error(e)
        return failed

    return run_with_client(args, run)


def cmd_apply(args: argparse.Namespace) -> int:
    if not args.filename:
        return error("must specify -f")

    async def run(api: ApiClient, config: ClientConfig) -> int:
        ns = namespace(args, config)
        failed = 0
        for obj in manifests.load(args.filename):
            try:
                result = await _apply_one(
                    api, _prepare(obj, ns, bool(args.namespace)), args.dry_run
                )
                print(result + args.dry_run.suffix)
            except ApiError as e:
                failed = server_error(e)
        return failed

    return run_with_client(args, run)


async def _apply_one(api: ApiClient, obj: Obj, dry_run: DryRun = DryRun.NONE) -> str:
    kind = kinds.by_kind(obj["kind"])
    server_dry_run = dry_run == DryRun.SERVER
    meta = obj["metadata"]
    for _ in range(5):
        try:
            current = await api.get(
                kind.kind, meta.get("namespace") if kind.namespaced else None, meta.get("name", "")
            )
        except NotFound:
            try:
                if dry_run == DryRun.CLIENT:
                    return f"{_ref(schema.validate(obj))} created"
                return f"{_ref(await api.create(obj, dry_run=server_dry_run))} created"
            except AlreadyExists:
                continue
        desired = copy.deepcopy(current)
        for key, value in obj.items():
            if key not in ("metadata", "status", "apiVersion", "kind"):
                desired[key] = value
        for key in ("labels", "annotations"):
            if key in meta:
                desired["metadata"][key] = meta[key]
        if desired == current:
            return f"{_ref(current)} unchanged"
        if dry_run == DryRun.CLIENT:
            return f"{_ref(schema.validate(desired))} configured"
        try:
            return f"{_ref(await api.update(desired, dry_run=server_dry_run))} configured"
        except Conflict:
            continue
    raise Conflict(f"{_ref(obj)}: kept changing while applying; try again")


def cmd_delete(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        ns = namespace(args, config)
        targets: list[tuple[kinds.Kind, str | None, str]] = []
        if args.filename:
            for obj in manifests.load(args.filename):
                kind = kinds.by_kind(obj["kind"])
                obj_ns = (obj.get("metadata") or {}).get("namespace", ns)
                targets.append((kind, obj_ns if kind.namespaced else None, obj["metadata"]["name"]))
        else:
            kind, names = _split_targets(args.targets)
            if args.all:
                names = [
                    o["metadata"]["name"]
                    for o in (await api.list(kind.kind, _scope_ns(kind, ns)))[0]
                ]
            if not names:
                return error("resource(s) were provided, but no name was specified")
            targets = [(kind, _scope_ns(kind, ns), n) for n in names]
        failed = 0
        for kind, obj_ns, name in targets:
            try:
                if args.dry_run == DryRun.CLIENT:
                    await api.get(kind.kind, obj_ns, name)  # it exists: it would be deleted
                else:
                    await api.delete(kind.kind, obj_ns, name, dry_run=args.dry_run == DryRun.SERVER)
                    if args.wait and args.dry_run == DryRun.NONE:
                        await _wait_gone(api, kind, obj_ns, name)
                print(f'{printers.resource_name(kind)} "{name}" deleted{args.dry_run.suffix}')
            except ApiError as e:
                if isinstance(e, NotFound) and args.ignore_not_found:
                    continue
                failed = server_error(e)
        return failed

    return run_with_client(args, run)


async def _wait_gone(api: ApiClient, kind: kinds.Kind, ns: str | None, name: str) -> None:
    async with asyncio.timeout(DELETE_WAIT_TIMEOUT):
        while True:
            try:
                await api.get(kind.kind, ns, name)
            except NotFound:
                return
            await asyncio.sleep(0.2)


# -- patch / label / edit -------------------------------------------------------------------


def cmd_patch(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        kind, names = _split_targets(args.targets)
        if len(names) != 1:
            return error("patch takes exactly one resource name")
        patch = parse_patch(args.type, args.patch)
        ns = _scope_ns(kind, namespace(args, config))
        if args.dry_run == DryRun.CLIENT:
            current = await api.get(kind.kind, ns, names[0])
            if patch.type == "json":
                obj = schema.validate(apply_json_patch(current, patch.body))
            else:
                obj = schema.validate(apply_merge_patch(current, patch.body))
        else:
            obj = await api.patch(
                kind.kind,
                ns,
                names[0],
                patch.body,
                patch_type=patch.type,
                subresource=args.subresource or "",
                dry_run=args.dry_run == DryRun.SERVER,
            )
        print(f"{_ref(obj)} patched{args.dry_run.suffix}")
        return 0

    return run_with_client(args, run)


def cmd_label(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        kind_name, rest = args.targets[0], args.targets[1:]
        kind = kinds.resolve(kind_name.partition("/")[0])
        names = [kind_name.partition("/")[2]] if "/" in kind_name else []
        changes: dict[str, str | None] = {}
        for item in rest:
            if "=" in item:
                k, _, v = item.partition("=")
                changes[k] = v
            elif item.endswith("-"):
                changes[item[:-1]] = None
            else:
                names.append(item)
        if not names or not changes:
            return error("label needs a resource name and at least one KEY=VALUE or KEY-")
        ns = _scope_ns(kind, namespace(args, config))
        for name in names:
            current = await api.get(kind.kind, ns, name)
            existing = current["metadata"].get("labels") or {}
            for k, v in changes.items():
                if v is not None and k in existing and existing[k] != v and not args.overwrite:
                    return error(
                        f"'{k}' already has a value ({existing[k]}), and --overwrite is false"
                    )
            await api.patch(
                kind.kind,
                ns,
                name,
                {"metadata": {"labels": changes}},
                resource_version=current["metadata"]["resourceVersion"],
            )
            print(
                f"{_ref(current)} labeled"
                if any(v is not None for v in changes.values())
                else f"{_ref(current)} unlabeled"
            )
        return 0

    return run_with_client(args, run)


def cmd_edit(args: argparse.Namespace) -> int:
    """Open the object in $EDITOR (like ``oc edit``); invalid edits change nothing."""

    async def run(api: ApiClient, config: ClientConfig) -> int:
        kind, names = _split_targets(args.targets)
        if len(names) != 1:
            return error("edit takes exactly one resource name")
        ns = _scope_ns(kind, namespace(args, config))
        current = await api.get(kind.kind, ns, names[0])
        text = printers.to_yaml(current)
        editor = os.environ.get("VMFERRY_EDITOR") or os.environ.get("EDITOR") or "vi"
        while True:
            with tempfile.NamedTemporaryFile(
                "w", suffix=".yaml", prefix="vmferry-edit-", delete=False
            ) as f:
                f.write(text)
                path = f.name
            try:
                rc = await asyncio.to_thread(subprocess.call, [*shlex.split(editor), path])
                edited_text = await asyncio.to_thread(Path(path).read_text)
            finally:
                os.unlink(path)
            if rc != 0:
                return error(f"the editor {editor!r} exited with status {rc}; nothing changed")
            if edited_text.strip() == text.strip():
                print("Edit cancelled, no changes made.")
                return 0
            try:
                edited = yaml.load(edited_text, Loader=limits.YamlLoader)
                if not isinstance(edited, dict):
                    raise BadRequest("the edited document is not an object")
                edited = json.loads(json.dumps(edited, default=str))
                schema.validate(edited)
                updated = await api.update(edited)
                print(f"{_ref(updated)} edited")
                return 0
            except (ApiError, yaml.YAMLError) as e:
                message = e.message if isinstance(e, ApiError) else str(e)
                print(f"error: {message}\nnothing was changed", file=sys.stderr)
                return 1

    return run_with_client(args, run)


# -- parsers --------------------------------------------------------------------------------


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "create",
        parents=[common],
        help="create resources from files (-f), or a rolebinding/clusterrolebinding/serviceaccount",
    )
    p.add_argument("-f", "--filename", action="append", help="file, directory or - for stdin")
    add_dry_run(p)
    rbac_cmd.add_create_arguments(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("apply", parents=[common], help="create or update resources from files")
    p.add_argument("-f", "--filename", action="append", required=True)
    add_dry_run(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("delete", parents=[common], help="delete resources by name or file")
    p.add_argument("targets", nargs="*", metavar="TYPE [NAME...]")
    p.add_argument("-f", "--filename", action="append")
    p.add_argument("--all", action="store_true", help="every resource of the type in the namespace")
    p.add_argument("--ignore-not-found", action="store_true")
    add_dry_run(p)
    p.add_argument(
        "--wait",
        nargs="?",
        const=True,
        default=True,
        type=_flag_value,
        help="wait until the resources are gone (default: true; --wait=false returns at once)",
    )
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("patch", parents=[common], help="patch a resource (json or merge patch)")
    p.add_argument("targets", nargs="+", metavar="TYPE NAME")
    p.add_argument("-p", "--patch", required=True, help="the patch, JSON or YAML")
    p.add_argument("--type", default="strategic", choices=["json", "merge", "strategic"])
    p.add_argument("--subresource", choices=["status"])
    add_dry_run(p)
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("label", parents=[common], help="add, change or remove labels")
    p.add_argument("targets", nargs="+", metavar="TYPE NAME KEY=VALUE|KEY-")
    p.add_argument("--overwrite", action="store_true", help="allow changing existing labels")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("edit", parents=[common], help="edit a resource in $EDITOR")
    p.add_argument("targets", nargs="+", metavar="TYPE NAME")
    p.set_defaults(func=cmd_edit)
