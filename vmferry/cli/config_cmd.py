"""``vmferry config get-contexts|use-context|current-context``: the contexts of the client
configuration (kubeconfig-style, see :mod:`vmferry.config`)."""

from __future__ import annotations

import argparse
from typing import Any

from vmferry.cli.common import config_path, error
from vmferry.config import CURRENT_CONTEXT, ClientConfigFile, ConfigError


def _file(args: argparse.Namespace) -> ClientConfigFile:
    return ClientConfigFile.load(config_path(args))


def cmd_get_contexts(args: argparse.Namespace) -> int:
    try:
        f = _file(args)
    except ConfigError as e:
        return error(str(e))
    if f.single is not None:
        print(f"{f.path} is a single-cluster configuration (server {f.single.server}): no contexts")
        return 0
    rows = [("CURRENT", "NAME", "CLUSTER", "SERVER", "AUTHINFO", "NAMESPACE")]
    for name, config in f.contexts.items():
        cluster, user = f.refs[name]
        star = "*" if name == f.current else ""
        rows.append((star, name, cluster, config.server, user, config.namespace))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_use_context(args: argparse.Namespace) -> int:
    try:
        f = _file(args)
        f.use(args.name)
    except ConfigError as e:
        return error(str(e))
    print(f'Switched to context "{args.name}".')
    return 0


def cmd_current_context(args: argparse.Namespace) -> int:
    try:
        f = _file(args)
    except ConfigError as e:
        return error(str(e))
    if f.single is not None:
        return error(f"{f.path} is a single-cluster configuration without contexts")
    if not f.current:
        return error(f"{f.path} has no {CURRENT_CONTEXT}")
    print(f.current)
    return 0


def add_parser(sub: Any) -> None:
    cfg = sub.add_parser("config", help="client configuration contexts (several clusters)")
    csub = cfg.add_subparsers(dest="config_command", required=True)
    d = argparse.ArgumentParser(add_help=False)
    d.add_argument(
        "--config", help="client configuration (default $VMFERRY_CONFIG or ~/.vmferry/config.yaml)"
    )
    p = csub.add_parser("get-contexts", parents=[d], help="list the contexts (* = current)")
    p.set_defaults(func=cmd_get_contexts)
    p = csub.add_parser("use-context", parents=[d], help="set the current context")
    p.add_argument("name")
    p.set_defaults(func=cmd_use_context)
    p = csub.add_parser("current-context", parents=[d], help="print the current context")
    p.set_defaults(func=cmd_current_context)
