"""``vmferry console-log VM``: the serial console of a QEMU guest.

The console is captured by QEMU into ``<runtime_dir>/qemu/<vm_id>/console.log`` on the
node that runs the guest. The command asks the API which node and which guest
(``status.nodeName``, ``status.launcher.vmId``), then reads the log from that node's
runtime directory: ``--runtime-dir`` when given, else the local lab's directory for that
node (``vmferry lab``; in a multi-cluster lab, the cluster of the context), else the handler's default ``/run/vmferry``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmferry.cli.common import error, namespace, run_with_client
from vmferry.client import ApiClient
from vmferry.config import ClientConfig, ConfigError
from vmferry.lab import Lab, default_dir
from vmferry.lab.multi import open_lab

DEFAULT_RUNTIME_DIR = Path("/run/vmferry")


def _lab_of(server: str) -> Lab | None:
    """The local lab cluster whose controller is ``server``: the lab itself, or in a
    multi-cluster lab (``lab up --clusters N``, node names repeating across clusters) the
    cluster the command's context talks to."""
    lab = open_lab(default_dir())
    if isinstance(lab, Lab):
        return lab
    for cluster in lab.clusters():
        one = lab.lab(cluster)
        try:
            if ClientConfig.load(one.client_config_path).server == server:
                return one
        except ConfigError:
            continue
    return None


def _candidates(node: str, runtime_dir: str | None, server: str) -> list[Path]:
    if runtime_dir:
        return [Path(runtime_dir)]
    lab = _lab_of(server)
    found = [lab.runtime_dir(node)] if lab is not None and node in lab.node_names() else []
    return [*found, DEFAULT_RUNTIME_DIR]


def cmd_console_log(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        ns = namespace(args, config)
        vmi = await api.get("VirtualMachineInstance", ns, args.vm)
        status = vmi.get("status") or {}
        launcher = status.get("launcher") or {}
        node = status.get("nodeName") or ""
        if launcher.get("driver") != "qemu" or not launcher.get("vmId") or not node:
            return error(
                f"VMI {ns}/{args.vm} has no QEMU guest running (driver "
                f"{launcher.get('driver') or 'none'}, phase {status.get('phase') or 'unknown'}); "
                "console logs exist for spec.qemu guests only"
            )
        tried = []
        for base in _candidates(node, args.runtime_dir, config.server):
            path = base / "qemu" / launcher["vmId"] / "console.log"
            tried.append(str(path))
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            lines = text.splitlines()
            if args.tail is not None:
                lines = lines[-args.tail :] if args.tail > 0 else []
            sys.stdout.write("\n".join(lines) + ("\n" if lines else ""))
            return 0
        return error(
            f"the console log of {ns}/{args.vm} is on node {node}, not readable here "
            f"(tried {', '.join(tried)}); run this on {node} or pass --runtime-dir"
        )

    return run_with_client(args, run)


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "console-log",
        parents=[common],
        help="print the serial console of a QEMU guest",
        description="Print the serial console log of a VMI's QEMU guest (driver qemu).",
    )
    p.add_argument("vm", help="the VirtualMachineInstance's name")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    p.add_argument(
        "--runtime-dir",
        help="the node handler's runtime directory (default: the lab's, else /run/vmferry)",
    )
    p.set_defaults(func=cmd_console_log)
