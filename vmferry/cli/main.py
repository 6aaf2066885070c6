"""``vmferry``: the command-line client (``oc``/``virtctl`` for vmferry clusters)."""

from __future__ import annotations

import argparse
import sys

from vmferry.cli import (
    adm_cmd,
    config_cmd,
    console_cmd,
    join_cmd,
    lab_cmd,
    migrate_cmd,
    pki_cmd,
    resources,
)
from vmferry.cli.common import error, run_with_client
from vmferry.errors import ApiError


def cmd_whoami(args: argparse.Namespace) -> int:
    async def run(api, config):  # type: ignore[no-untyped-def]
        user, groups = await api.whoami()
        print(f"{user}" + (f" (groups: {', '.join(groups)})" if groups else ""))
        return 0

    return run_with_client(args, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmferry",
        description="Live-migrate running virtual machines between nodes (KubeVirt semantics).",
    )
    context_help = "the client configuration's context to use (default: its current-context)"
    # Global: before the verb (`vmferry --context cluster2 get vmi`) or after it; the
    # verb's copy only sets the value when given (SUPPRESS), not to overwrite the global one.
    parser.add_argument("--context", metavar="NAME", help=context_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="client configuration (default $VMFERRY_CONFIG or ~/.vmferry/config.yaml)"
    )
    common.add_argument("--context", metavar="NAME", default=argparse.SUPPRESS, help=context_help)
    common.add_argument(
        "-n", "--namespace", help="namespace (default: the config's, else 'default')"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    resources.add_parsers(sub, common)
    migrate_cmd.add_parsers(sub, common)
    p = sub.add_parser("whoami", parents=[common], help="show who the API thinks you are")
    p.set_defaults(func=cmd_whoami)
    adm_cmd.add_parser(sub, common)
    config_cmd.add_parser(sub)
    join_cmd.add_parsers(sub, common)
    pki_cmd.add_parser(sub)
    lab_cmd.add_parser(sub)
    console_cmd.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        code = args.func(args)
    except ApiError as e:
        code = error(e.message)
    except ValueError as e:
        code = error(str(e))
    sys.exit(code)


if __name__ == "__main__":
    main()
