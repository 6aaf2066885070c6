"""What every CLI command shares: the client, namespaces, error printing."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmferry.client import ApiClient
from vmferry.config import ClientConfig, ConfigError
from vmferry.errors import ApiError

Obj = dict[str, Any]


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
