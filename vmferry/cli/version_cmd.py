"""``vmferry version`` (client and server, as ``kubectl version``) and ``vmferry completion
bash|zsh`` (a shell completion script generated from the command tree)."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from vmferry.cli import printers
from vmferry.cli.common import error, run_with_client
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.objects import kinds
from vmferry.version import BuildInfo

# Verbs whose first argument is a resource type (completed from the kinds' names).
TYPE_VERBS = ("get", "describe", "delete", "edit", "label", "patch")


def _print_versions(client: BuildInfo, server: BuildInfo | None, output: str | None) -> None:
    if output in ("json", "yaml"):
        doc: dict[str, Any] = {"clientVersion": client.as_dict()}
        if server is not None:
            doc["serverVersion"] = server.as_dict()
        print(printers.to_json(doc) if output == "json" else printers.to_yaml(doc), end="")
        return
    print(f"Client Version: v{client.version}")
    if server is not None:
        print(f"Server Version: v{server.version}")


def cmd_version(args: argparse.Namespace) -> int:
    if args.output not in (None, "json", "yaml"):
        return error(f"--output must be 'yaml' or 'json', not {args.output!r}")
    client = BuildInfo.here()
    if args.client:
        _print_versions(client, None, args.output)
        return 0

    async def run(api: ApiClient, config: ClientConfig) -> int:
        server = await api.version()
        _print_versions(client, server, args.output)
        return 0

    code = run_with_client(args, run)
    if code != 0 and args.output is None:
        print(f"Client Version: v{client.version}")
    return code


# -- completion -----------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(
        s
        for a in parser._actions
        for s in a.option_strings
        if s.startswith("--") and a.help != argparse.SUPPRESS
    )


def _tree(parser: argparse.ArgumentParser, path: str, out: dict[str, list[str]]) -> None:
    subs = _subcommands(parser)
    words = list(subs) + _flags(parser)
    if path.rsplit(" ", 1)[-1] in TYPE_VERBS:
        words += sorted({s for k in kinds.KINDS for s in (k.plural, *k.short_names)})
    out[path] = words
    for name, sub in subs.items():
        _tree(sub, f"{path} {name}".strip(), out)


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash completion function for every command path of ``parser`` (zsh loads it
    through ``bashcompinit``)."""
    tree: dict[str, list[str]] = {}
    _tree(parser, "", tree)
    cases = "\n".join(
        f"        {shlex.quote(path or '__root__')}) words={shlex.quote(' '.join(words))} ;;"
        for path, words in sorted(tree.items())
    )
    known = " ".join(shlex.quote(p) for p in sorted(tree) if p)
    script = f"""# vmferry shell completion ({shell}); load with: source <(vmferry completion {shell})
_vmferry_complete() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" candidate words="" i w
    local -a known=({known})
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ "$w" == -* ]] && continue
        candidate="${{path:+$path }}$w"
        for k in "${{known[@]}}"; do
            if [[ "$k" == "$candidate" ]]; then path="$candidate"; break; fi
        done
    done
    case "${{path:-__root__}}" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _vmferry_complete vmferry
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def add_parsers(sub: Any, common: argparse.ArgumentParser, root: argparse.ArgumentParser) -> None:
    p = sub.add_parser("version", parents=[common], help="print the client and server versions")
    p.add_argument("--client", action="store_true", help="the client version only (no server)")
    p.add_argument("-o", "--output", help="yaml or json")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=["bash", "zsh"])

    def cmd_completion(args: argparse.Namespace) -> int:
        print(completion_script(root, args.shell), end="")
        return 0

    p.set_defaults(func=cmd_completion)
