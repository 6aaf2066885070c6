"""What every CLI command shares: the client, namespaces, error printing."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmferry.client import ApiClient
from vmferry.config import ClientConfig, ConfigError
from vmferry.errors import ApiError

Obj = dict[str, Any]


class DryRun(StrEnum):
    """kubectl's ``--dry-run``: ``client`` checks here and sends nothing, ``server`` has
    the API validate, authorize and admit the change and store nothing."""

    NONE = "none"
    CLIENT = "client"
    SERVER = "server"

    @property
    def suffix(self) -> str:
        """What kubectl appends to its result line (``created (server dry run)``)."""
        return {"none": "", "client": " (dry run)", "server": " (server dry run)"}[self]


def _dry_run(text: str) -> DryRun:
    try:
        return DryRun(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'Invalid dry-run value ({text}). Must be "none", "server", or "client".'
        ) from None


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        nargs="?",
        const=DryRun.CLIENT,
        default=DryRun.NONE,
        type=_dry_run,
        metavar="none|client|server",
        help="client: only check here; server: the API checks and admits, stores nothing",
    )


def config_path(args: argparse.Namespace) -> Path | None:
    """``--config``, if given (else the default locations apply)."""
    return Path(args.config) if getattr(args, "config", None) else None


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The connection to use: ``--config`` (or the default file), ``--context`` (or the
    file's current context)."""
    return ClientConfig.load(config_path(args), getattr(args, "context", None))


def namespace(args: argparse.Namespace, config: ClientConfig) -> str:
    return str(getattr(args, "namespace", None) or config.namespace or "default")


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def server_error(e: ApiError) -> int:
    """kubectl's prefixes: ``Error from server (Reason): ...`` for what the API answered,
    ``error: ...`` for what went wrong here (a file, a flag, the connection)."""
    if not e.from_server:
        return error(e.message)
    print(f"Error from server ({e.reason}): {e.message}", file=sys.stderr)
    return 1


def run_with_client(
    args: argparse.Namespace, fn: Callable[[ApiClient, ClientConfig], Awaitable[int]]
) -> int:
    """Load the client config, open a client, run ``fn``; map errors to messages + exit 1."""
    try:
        config = client_config(args)
    except ConfigError as e:
        return error(str(e))

    async def go() -> int:
        async with ApiClient(config) as api:
            return await fn(api, config)

    try:
        return asyncio.run(go())
    except ApiError as e:
        return server_error(e)
    except KeyboardInterrupt:
        return 130
