"""kubectl's command-line grammar on top of argparse.

- Global flags (``-n/--namespace``, ``--context``, ``--config``) go anywhere: before the
  verb (``vmferry -n default get vmi``), between its arguments (``get vmi -n seed NAME``)
  or after them; the last one given wins. :func:`split_globals` takes them out of the
  argument list before argparse sees it.
- Positional arguments may follow flags (``get vmi -o wide NAME``): what argparse leaves
  over is appended to the verb's ``targets``.
- A bad flag or argument is reported by the verb it belongs to — its usage, then
  ``error: ...`` and ``See 'vmferry get --help' for usage.`` — and exits 1, as kubectl.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import NoReturn

USAGE_EXIT = 1  # kubectl exits 1 on a usage error too (argparse's default is 2)

# The global flags with a value: their spellings -> the attribute they set.
GLOBAL_FLAGS: dict[str, str] = {
    "-n": "namespace",
    "--namespace": "namespace",
    "--context": "context",
    "--config": "config",
}


class UsageError(Exception):
    """A flag that could not be read (its message is kubectl's)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports errors as kubectl does and remembers, in the
    namespace, the deepest (sub)command parser that parsed (``_leaf``)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        print(f"See '{self.prog} --help' for usage.", file=sys.stderr)
        sys.exit(USAGE_EXIT)

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if getattr(ns, "_leaf", None) is None:
            ns._leaf = self
        return ns, extras


@dataclass
class Globals:
    values: dict[str, str] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)


def split_globals(argv: list[str]) -> Globals:
    """Take the global flags out of ``argv`` (up to ``--``); raise UsageError for a flag
    without its value."""
    out = Globals()
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.rest += argv[i:]
            break
        name, eq, value = token.partition("=")
        if name in GLOBAL_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"flag needs an argument: {token}")
                value = argv[i + 1]
                i += 1
            out.values[GLOBAL_FLAGS[name]] = value
        elif token.startswith("-n") and not token.startswith("--") and len(token) > 2:
            out.values["namespace"] = token[2:]  # -nseed, as pflag reads it
        else:
            out.rest.append(token)
        i += 1
    return out


def parse(parser: Parser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with kubectl's grammar (module docstring)."""
    try:
        found = split_globals(argv)
    except UsageError as e:
        parser.error(str(e))
    args, extras = parser.parse_known_args(found.rest)
    leaf: Parser = getattr(args, "_leaf", None) or parser
    for token in extras:
        if token.startswith("-") and token != "-":
            leaf.error(f"unknown flag: {token}")
        if not isinstance(getattr(args, "targets", None), list):
            leaf.error(f'unexpected argument "{token}"')
        args.targets.append(token)
    for key, value in found.values.items():
        setattr(args, key, value)
    return args
