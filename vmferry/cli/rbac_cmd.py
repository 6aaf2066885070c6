"""``vmferry create rolebinding|clusterrolebinding|serviceaccount``, as ``oc``/``kubectl``::

    vmferry create -n NS rolebinding kvmigrate --clusterrole=kubevirt.io:migrate \\
        --user=alice --user=bob --group=migrators
    vmferry create clusterrolebinding kvmigrate --clusterrole=kubevirt.io:migrate --user=alice
    vmferry create clusterrolebinding mtv --clusterrole=R --serviceaccount=NS:NAME
    vmferry create serviceaccount NAME -n NS

``create -f FILE`` (in ``vmferry.cli.resources``) hands over here when a type is given.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from vmferry.cli import printers
from vmferry.cli.common import DryRun, Obj, error, namespace, run_with_client
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.objects import kinds

RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_API_VERSION = f"{RBAC_GROUP}/v1"
TYPES = {
    "rolebinding": "RoleBinding",
    "rolebindings": "RoleBinding",
    "clusterrolebinding": "ClusterRoleBinding",
    "clusterrolebindings": "ClusterRoleBinding",
    "serviceaccount": "ServiceAccount",
    "serviceaccounts": "ServiceAccount",
    "sa": "ServiceAccount",
}


class UsageError(ValueError):
    """A wrong combination of flags; the message says what to pass instead."""


def add_create_arguments(p: argparse.ArgumentParser) -> None:
    """The typed-create arguments of ``vmferry create`` (next to ``-f``)."""
    p.add_argument(
        "subtype",
        nargs="?",
        metavar="TYPE",
        help="rolebinding, clusterrolebinding or serviceaccount (instead of -f)",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="name of the object to create")
    p.add_argument("--clusterrole", help="ClusterRole the binding grants")
    p.add_argument("--role", help="Role (of the binding's namespace) a rolebinding grants")
    p.add_argument("--user", action="append", default=[], help="user to bind (repeatable)")
    p.add_argument("--group", action="append", default=[], help="group to bind (repeatable)")
    p.add_argument(
        "--serviceaccount",
        action="append",
        default=[],
        metavar="NAMESPACE:NAME",
        help="service account to bind (repeatable)",
    )
    p.add_argument("-o", "--output", choices=["yaml", "json", "name"], help="print the object")


def _subjects(args: argparse.Namespace) -> list[Obj]:
    subjects: list[Obj] = []
    for user in args.user:
        subjects.append({"apiGroup": RBAC_GROUP, "kind": "User", "name": user})
    for group in args.group:
        subjects.append({"apiGroup": RBAC_GROUP, "kind": "Group", "name": group})
    for account in args.serviceaccount:
        ns, sep, name = account.partition(":")
        if not sep or not ns or not name or ":" in name:
            raise UsageError(f"serviceaccount must be <namespace>:<name>, got {account!r}")
        subjects.append({"kind": "ServiceAccount", "name": name, "namespace": ns})
    return subjects


def build_object(args: argparse.Namespace, ns: str) -> Obj:
    """The manifest a typed create stores; raises UsageError for wrong flags."""
    kind = TYPES.get(str(args.subtype).lower())
    if kind is None:
        raise UsageError(
            f'cannot create a "{args.subtype}" this way: use rolebinding, clusterrolebinding, '
            "serviceaccount, or -f FILE"
        )
    if not args.name:
        raise UsageError(f"NAME is required: vmferry create {args.subtype} NAME ...")
    binding_flags = args.clusterrole or args.role or args.user or args.group or args.serviceaccount
    if kind == "ServiceAccount":
        if binding_flags:
            raise UsageError("a serviceaccount takes no --clusterrole/--role/--user/--group")
        return {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": args.name, "namespace": ns},
        }
    if kind == "ClusterRoleBinding":
        if args.role:
            raise UsageError("a clusterrolebinding grants a --clusterrole, not a --role")
        if not args.clusterrole:
            raise UsageError("--clusterrole is required for a clusterrolebinding")
        ref = {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": args.clusterrole}
        meta: Obj = {"name": args.name}
    else:
        if bool(args.clusterrole) == bool(args.role):
            raise UsageError("exactly one of --clusterrole or --role must be specified")
        ref = {
            "apiGroup": RBAC_GROUP,
            "kind": "ClusterRole" if args.clusterrole else "Role",
            "name": args.clusterrole or args.role,
        }
        meta = {"name": args.name, "namespace": ns}
    obj: Obj = {"apiVersion": RBAC_API_VERSION, "kind": kind, "metadata": meta, "roleRef": ref}
    subjects = _subjects(args)
    if subjects:
        obj["subjects"] = subjects
    return obj


def cmd_create_typed(args: argparse.Namespace) -> int:
    """``vmferry create TYPE NAME ...``."""
    if args.filename:
        return error("give either -f FILE or a TYPE and NAME, not both")

    async def run(api: ApiClient, config: ClientConfig) -> int:
        try:
            obj = build_object(args, namespace(args, config))
        except UsageError as e:
            return error(str(e))
        created: dict[str, Any] = await api.create(obj, dry_run=args.dry_run != DryRun.NONE)
        ref = f"{printers.resource_name(kinds.by_kind(created['kind']))}/{created['metadata']['name']}"
        if args.output == "yaml":
            print(yaml.safe_dump(created, sort_keys=False), end="")
        elif args.output == "json":
            print(json.dumps(created, indent=4))
        elif args.output == "name":
            print(ref)
        else:
            print(f"{ref} created{args.dry_run.suffix}")
        return 0

    return run_with_client(args, run)
