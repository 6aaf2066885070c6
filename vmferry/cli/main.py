"""``vmferry``: the command-line client (``oc``/``virtctl`` for vmferry clusters).

Its grammar is kubectl's (``vmferry.cli.args``): global flags anywhere, positional
arguments after flags, a bad flag reported with its verb's usage and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from vmferry.cli import (
    adm_cmd,
    config_cmd,
    console_cmd,
    get_cmd,
    join_cmd,
    lab_cmd,
    migrate_cmd,
    pki_cmd,
    resources,
    version_cmd,
    vm_cmd,
)
from vmferry.cli.args import Parser, parse
from vmferry.cli.common import error, run_with_client
from vmferry.errors import ApiError

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: how a shell reports kubectl ended by a closed pipe


def cmd_whoami(args: argparse.Namespace) -> int:
    async def run(api, config):  # type: ignore[no-untyped-def]
        user, groups = await api.whoami()
        print(f"{user}" + (f" (groups: {', '.join(groups)})" if groups else ""))
        return 0

    return run_with_client(args, run)


def build_parser() -> Parser:
    parser = Parser(
        prog="vmferry",
        description="Live-migrate running virtual machines between nodes (KubeVirt semantics).",
        epilog="Global flags (-n/--namespace, --context, --config) may be given anywhere.",
    )
    context_help = "the client configuration's context to use (default: its current-context)"
    # Global: before the verb (`vmferry --context cluster2 get vmi`) or after it; the
    # verb's copy only sets the value when given (SUPPRESS), not to overwrite the global one.
    parser.add_argument("--context", metavar="NAME", help=context_help)
    common = Parser(add_help=False)
    common.add_argument(
        "--config", help="client configuration (default $VMFERRY_CONFIG or ~/.vmferry/config.yaml)"
    )
    common.add_argument("--context", metavar="NAME", default=argparse.SUPPRESS, help=context_help)
    common.add_argument(
        "-n", "--namespace", help="namespace (default: the config's, else 'default')"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    get_cmd.add_parsers(sub, common)
    resources.add_parsers(sub, common)
    migrate_cmd.add_parsers(sub, common)
    vm_cmd.add_parsers(sub, common)
    p = sub.add_parser("whoami", parents=[common], help="show who the API thinks you are")
    p.set_defaults(func=cmd_whoami)
    adm_cmd.add_parser(sub, common)
    config_cmd.add_parser(sub)
    join_cmd.add_parsers(sub, common)
    pki_cmd.add_parser(sub)
    lab_cmd.add_parser(sub)
    console_cmd.add_parser(sub, common)
    version_cmd.add_parsers(sub, common, parser)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader went away (``vmferry get vmi | head -1``): end quietly, as a process
    killed by SIGPIPE. Python would complain once more when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return SIGPIPE_EXIT


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):  # `vmferry`, `vmferry adm`: that command's help
        (getattr(args, "_leaf", None) or parser).print_help()
        sys.exit(0)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        code = _quiet_broken_pipe()
    except ApiError as e:
        code = error(e.message)
    except ValueError as e:
        code = error(str(e))
    sys.exit(code)


if __name__ == "__main__":
    main()
