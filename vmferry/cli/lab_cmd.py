"""``vmferry lab up|down|status|start|kill``: the embedded local lab."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from vmferry.cli.common import error
from vmferry.lab import Lab, LabError
from vmferry.lab.multi import MultiLab, open_lab, running_anywhere
from vmferry.lab.netns import LinkSpec, parse_link


def _lab(args: argparse.Namespace) -> Lab | MultiLab:
    """The lab in --dir: one cluster, or several (components named CLUSTER/COMPONENT)."""
    return open_lab(Path(args.dir) if args.dir else None)


def _link(option: str, text: str | None) -> LinkSpec | None:
    return parse_link(option, text) if text else None


def cmd_up(args: argparse.Namespace) -> int:
    try:
        main_link = _link("--main-link", args.main_link)
        migration_link = _link("--migration-link", args.migration_link)
    except ValueError as e:  # a bad flag value: kubectl's usage exit code
        return error(str(e))
    existing = _lab(args)
    if running := running_anywhere(existing):
        print(
            f"error: a lab is already running in {existing.dir} ({', '.join(running)}): run "
            "'vmferry lab down' first",
            file=sys.stderr,
        )
        return 1
    if args.clusters != 1:
        if args.ha:
            print("error: --ha is for a one-cluster lab (drop --clusters)", file=sys.stderr)
            return 2
        return _up_multi(args, main_link, migration_link)
    if isinstance(existing, MultiLab):  # a stopped two-cluster lab: its namespaces go too
        existing.down()
    lab = Lab(existing.dir)
    try:
        config = lab.up(
            args.nodes,
            args.memory,
            set_default=not args.no_set_default,
            netns_mode=args.netns,
            main_link=main_link,
            migration_link=migration_link,
            ha=args.ha,
            stream_workers=args.stream_workers,
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
    _print_namespaces(lab, "")
    print(f"client configuration: {lab.client_config_path}")
    return 0


def _print_namespaces(lab: Lab, label: str) -> None:
    if namespaces := {n: lab.netns_of(n) for n in lab.node_names() if lab.netns_of(n)}:
        main = (lab.info().get("netns") or {}).get("main", "")
        print(
            f"{label}network namespaces: "
            + ", ".join(f"{n} in {ns}" for n, ns in namespaces.items())
            + f" (eth0 main {main}, eth1 migration)"
        )


def _up_multi(
    args: argparse.Namespace, main_link: LinkSpec | None, migration_link: LinkSpec | None
) -> int:
    multi = MultiLab(_lab(args).dir)
    try:
        made = multi.up(
            args.clusters,
            args.nodes,
            args.memory,
            set_default=not args.no_set_default,
            netns_mode=args.netns,
            main_link=main_link,
            migration_link=migration_link,
        )
    except LabError as e:
        for warning in multi.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for warning in multi.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"lab is up in {multi.dir}: {len(made)} clusters")
    for c in made:
        sync = (c.lab.info().get("sync") or {}).get("advertise")
        peers = ", ".join(n.name for n in made if n.name != c.name)
        print(
            f"{c.name}: controller on {c.config.server}"
            + (f", sync controller on {sync}" if sync else ", no sync controller")
            + f", nodes {', '.join(c.lab.node_names())}; peers: {peers}"
        )
        _print_namespaces(c.lab, f"{c.name}: ")
        if links := multi.links.get(c.name):
            print(
                f"{c.name}: enabled {', '.join(links.gates)}; providers in openshift-mtv: "
                + ", ".join(f"{p} ({url})" for p, url in links.providers.items())
            )
    if bridge := multi.migration_bridge():
        print(
            f"shared migration network: {bridge['bridge']} in {bridge['namespace']} "
            "(NAD lab-migration-network in each cluster, disjoint ranges of 198.51.100.0/24)"
        )
    print(
        f"client configuration: {multi.client_config_path} (contexts "
        f"{', '.join(c.name for c in made)}; current {made[0].name})"
    )
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
    width = max((len(c) for c in lab.components()), default=0) + 2
    for comp in lab.components():
        pid = lab.pid(comp)
        print(f"{comp:<{max(12, width)}} {'running, pid ' + str(pid) if pid else 'stopped'}")
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
    p.add_argument("--nodes", type=int, default=3, help="nodes per cluster (default 3)")
    p.add_argument(
        "--clusters",
        type=int,
        default=1,
        help="2: two clusters (cluster1, cluster2) with their own CAs, controllers, sync "
        "controllers and handlers, each the other's peer; client contexts cluster1 and "
        "cluster2; components named CLUSTER/COMPONENT (default 1)",
    )
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
        "--ha",
        action="store_true",
        help="a replicated control plane: 3 etcd members (etcd-1..3) and 3 controller "
        "replicas on them (controller-1..3, one leads); loopback only, needs etcd",
    )
    p.add_argument(
        "--stream-workers",
        type=int,
        metavar="N",
        help="each handler's stream worker processes: a migration's channels 1.. on cores "
        "of their own; 0: none (vmferry-handler --stream-workers; one-cluster lab; "
        "default: the handler's, auto)",
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
    p = lsub.add_parser(
        "start",
        parents=[d],
        help="start one component (controller, sync or a node; CLUSTER/COMPONENT in a "
        "multi-cluster lab)",
    )
    p.add_argument("component")
    p.set_defaults(func=cmd_start)
    p = lsub.add_parser("kill", parents=[d], help="signal one component (default SIGKILL)")
    p.add_argument("component")
    p.add_argument("--signal", default="KILL")
    p.set_defaults(func=cmd_kill)
