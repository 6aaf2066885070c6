"""The daemons' HTTP/1.1 servers (the web console, its server-sent events, ``/metrics``,
``/healthz``, ``/readyz``) on aiohttp, in the daemon's event loop.

aiohttp's server does the protocol: its strict parser (llhttp) refuses a request with both
``Content-Length`` and ``Transfer-Encoding`` (the request-smuggling pattern) with a 400
and closes the connection, reads chunked bodies as one request, bounds the request line
and every header (``MAX_LINE_SIZE``, ``MAX_FIELD_SIZE``, ``MAX_HEADERS``), answers
``HEAD`` with the headers of ``GET`` and no body, and keeps connections alive. This module
fixes the limits every daemon uses and starts/stops a server (:func:`serve`).

Slow clients: a connection must deliver a complete request head within
``KEEPALIVE_TIMEOUT`` of opening (or of its previous response), else it is closed; the
timer does not restart on partial data, so a client that trickles a header byte at a
time (slowloris) is dropped while every other connection is served. A body is read
within ``BODY_TIMEOUT`` (:func:`read_body`).

With an ``ssl.SSLContext`` the server speaks HTTPS; :func:`peer_cert_der` gives the
verified client certificate of a request, if the client sent one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vmferry.config import ConfigError

log = logging.getLogger(__name__)


class _BadRequestsInOneLine(logging.Filter):
    """aiohttp logs every malformed request (a smuggling probe, oversized headers) with a
    traceback at ERROR: one WARNING line each instead, so a probe cannot flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            what = record.getMessage()
            why = (str(exc.message).strip().splitlines() or [type(exc).__name__])[0]
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "%s: %s", (what, why)
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("aiohttp.server").addFilter(_BadRequestsInOneLine())

MAX_LINE_SIZE = 8190  # bytes of the request line
MAX_FIELD_SIZE = 8190  # bytes of one header
MAX_HEADERS = 64  # headers in one request
MAX_BODY_BYTES = 1 << 20  # the console's forms and JSON are tiny
KEEPALIVE_TIMEOUT = 15.0  # s to receive a complete request head on an open connection
BODY_TIMEOUT = 10.0  # s to receive a request body once its head arrived


def split_hostport(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9090"`` / ``"[::1]:9090"`` / ``":9090"`` → (host, port).

    Raises ValueError naming what is wrong.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{listen!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"{listen!r}: port out of range")
    return host, number


def peer_cert_der(request: web.BaseRequest) -> bytes | None:
    """The DER of the client certificate TLS verified on this request's connection."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return bytes(der) if der else None


def peer_address(request: web.BaseRequest) -> str:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")


async def read_body(request: web.BaseRequest) -> bytes:
    """The request body (at most ``MAX_BODY_BYTES``, else 413), within ``BODY_TIMEOUT``
    (else 408): a client that trickles its body cannot hold a handler forever."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body not received in time\n") from None


@dataclass
class Served:
    """A started server: its bound port and :meth:`close`."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(
    app: web.Application,
    listen: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
) -> Served:
    """Start serving ``app`` on ``listen`` (HOST:PORT, port 0 picks one); returns the
    started server. Raises ValueError for a malformed address and OSError when the port is
    taken. ``await served.close()`` stops it."""
    host, port = split_hostport(listen)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=keepalive_timeout,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return Served(runner, int(bound))


def new_app() -> web.Application:
    """An application with the request body limit every daemon uses."""
    return web.Application(client_max_size=MAX_BODY_BYTES)


async def listening(what: str, listen: str, start: Awaitable[Served]) -> Served:
    """Await ``start`` (a serve() of ``what`` on ``listen``); a port that cannot be bound
    becomes the daemon's ConfigError naming both ("cannot serve metrics on HOST:PORT")."""
    try:
        return await start
    except OSError as e:
        raise ConfigError(f"cannot serve {what} on {listen}: {e.strerror or e}") from None
