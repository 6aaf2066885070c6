"""``vmferry lab up|down|status|start|kill``: the embedded local lab."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from vmferry.lab import Lab, LabError
from vmferry.lab.netns import LinkSpec, parse_link


def _lab(args: argparse.Namespace) -> Lab:
    return Lab(Path(args.dir) if args.dir else None)


def _link(option: str, text: str | None) -> LinkSpec | None:
    return parse_link(option, text) if text else None


def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args)
    try:
        main_link = _link("--main-link", args.main_link)
        migration_link = _link("--migration-link", args.migration_link)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        config = lab.up(
            args.nodes,
            args.memory,
            set_default=not args.no_set_default,
            netns_mode=args.netns,
            main_link=main_link,
            migration_link=migration_link,
        )
    except LabError as e:
        for warning in lab.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for warning in lab.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"lab is up in {lab.dir}: controller on {config.server}, nodes {', '.join(lab.node_names())}"
    )
    if namespaces := {n: lab.netns_of(n) for n in lab.node_names() if lab.netns_of(n)}:
        print(
            "network namespaces: "
            + ", ".join(f"{n} in {ns}" for n, ns in namespaces.items())
            + " (eth0 main 192.0.2.0/24, eth1 migration)"
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
    for comp in lab.components():
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
    lab = sub.add_parser(
        "lab", help="a local multi-node lab on loopback or in network namespaces (demos, tests)"
    )
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    d = argparse.ArgumentParser(add_help=False)
    d.add_argument("--dir", help="lab directory (default $VMFERRY_LAB_DIR or ~/.vmferry/lab)")

    p = lsub.add_parser("up", parents=[d], help="start a controller and N handlers")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--memory", default="4Gi", help="memory each node offers (default 4Gi)")
    p.add_argument(
        "--netns",
        action="store_true",
        help="each node in its own network namespace with eth0 (main, 192.0.2.0/24) and eth1 "
        "(migration network) on bridges in a lab namespace (needs root; falls back to "
        "loopback and says why)",
    )
    p.add_argument(
        "--migration-link",
        metavar="RATE[,DELAY]",
        help="shape every node's eth1, e.g. 1gbit,2ms (tc; the delay once per direction)",
    )
    p.add_argument(
        "--main-link", metavar="RATE[,DELAY]", help="shape every node's eth0, e.g. 10gbit,0.2ms"
    )
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
