"""``vmferry lab up|down|status|start|kill``: the embedded local lab."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from vmferry.lab import Lab, LabError


def _lab(args: argparse.Namespace) -> Lab:
    return Lab(Path(args.dir) if args.dir else None)


def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args)
    try:
        config = lab.up(args.nodes, args.memory, set_default=not args.no_set_default)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"lab is up in {lab.dir}: controller on {config.server}, nodes {', '.join(lab.node_names())}"
    )
    print(f"client configuration: {lab.client_config_path}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = _lab(args)
    stopped = lab.down()
    print(
        f"lab in {lab.dir} is down"
        + (f" (stopped {', '.join(stopped)})" if stopped else " (nothing was running)")
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab(args)
    for comp in ["controller", *lab.node_names()]:
        pid = lab.pid(comp)
        print(f"{comp:<12} {'running, pid ' + str(pid) if pid else 'stopped'}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    try:
        pid = _lab(args).start(args.component)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.component} started (pid {pid})")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    sig = signal.Signals[f"SIG{args.signal.upper().removeprefix('SIG')}"]
    try:
        pid = _lab(args).kill(args.component, sig)
    except (LabError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.component} (pid {pid}) sent {sig.name}")
    return 0


def add_parser(sub: Any) -> None:
    lab = sub.add_parser("lab", help="a local multi-node lab on loopback (demos and tests)")
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    d = argparse.ArgumentParser(add_help=False)
    d.add_argument("--dir", help="lab directory (default $VMFERRY_LAB_DIR or ~/.vmferry/lab)")

    p = lsub.add_parser("up", parents=[d], help="start a controller and N handlers")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--memory", default="4Gi", help="memory each node offers (default 4Gi)")
    p.add_argument(
        "--no-set-default",
        action="store_true",
        help="do not write the client config to $VMFERRY_CONFIG / ~/.vmferry/config.yaml",
    )
    p.set_defaults(func=cmd_up)
    p = lsub.add_parser("down", parents=[d], help="stop the lab and every guest in it")
    p.set_defaults(func=cmd_down)
    p = lsub.add_parser("status", parents=[d], help="which lab processes run")
    p.set_defaults(func=cmd_status)
    p = lsub.add_parser("start", parents=[d], help="start one component (controller or a node)")
    p.add_argument("component")
    p.set_defaults(func=cmd_start)
    p = lsub.add_parser("kill", parents=[d], help="signal one component (default SIGKILL)")
    p.add_argument("component")
    p.add_argument("--signal", default="KILL")
    p.set_defaults(func=cmd_kill)
