"""A small HTTP/1.1 server on asyncio streams, for ``/metrics`` and the web console.

It runs in the daemon's event loop (no thread, no framework): a handler is an async
function from :class:`Request` to :class:`Response`. Requests are read with bounded
sizes and an idle timeout; connections are kept alive between requests unless a side
asks to close. A response may stream its body (server-sent events): the connection
closes when the stream ends or the client goes away.

With an ``ssl.SSLContext`` the server speaks HTTPS; the verified client certificate, if
the client sent one, is in :attr:`Request.peer_cert_der`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from vmferry.config import ConfigError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 << 10  # request line + headers
MAX_BODY_BYTES = 1 << 20  # the console's forms and JSON are tiny
IDLE_TIMEOUT = 30.0  # s a kept-alive connection may wait for its next request
READ_TIMEOUT = 10.0  # s to receive a whole request once it started


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    peer_cert_der: bytes | None = None
    peer: str = ""

    def cookie(self, name: str) -> str | None:
        jar: SimpleCookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            jar.load(self.headers.get("cookie", ""))
        morsel = jar.get(name)
        return morsel.value if morsel is not None else None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None  # body chunks, sent as they come

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status=status, body=text.encode())


Handler = Callable[[Request], Awaitable[Response]]


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


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader, timeout: float) -> Request | None:
    """One request, or None when the client closed the connection between requests."""
    async with asyncio.timeout(timeout):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial.strip():
                return None
            raise _BadRequest("truncated request") from None
        except asyncio.LimitOverrunError:
            raise _BadRequest("request headers too large") from None
    async with asyncio.timeout(READ_TIMEOUT):
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest("malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("malformed header")
            headers[name.strip().lower()] = value.strip()
        if version == "HTTP/1.0" and "connection" not in headers:
            headers["connection"] = "close"
        length = int(headers.get("content-length") or 0)
        if length < 0 or length > MAX_BODY_BYTES:
            raise _BadRequest("request body too large")
        body = await reader.readexactly(length) if length else b""
    url = urlsplit(target)
    return Request(
        method=method.upper(),
        path=url.path or "/",
        query=dict(parse_qsl(url.query)),
        headers=headers,
        body=body,
    )


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Status"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def _respond(writer: asyncio.StreamWriter, resp: Response, keep_alive: bool) -> bool:
    """Write ``resp``; returns whether the connection may carry another request."""
    headers = [("Content-Type", resp.content_type), *resp.headers]
    if resp.stream is not None:
        headers += [("Cache-Control", "no-store"), ("Connection", "close")]
        writer.write(_head(resp.status, headers))
        await writer.drain()
        try:
            async for chunk in resp.stream:
                writer.write(chunk)
                await writer.drain()
        finally:
            close = getattr(resp.stream, "aclose", None)
            if close is not None:
                await close()
        return False
    headers += [
        ("Content-Length", str(len(resp.body))),
        ("Connection", "keep-alive" if keep_alive else "close"),
    ]
    writer.write(_head(resp.status, headers) + resp.body)
    await writer.drain()
    return keep_alive


async def _serve_connection(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    peer = writer.get_extra_info("peername")
    try:
        while True:
            try:
                req = await _read_request(reader, IDLE_TIMEOUT)
            except (_BadRequest, ValueError, UnicodeDecodeError) as e:
                await _respond(writer, Response.text(400, f"bad request: {e}\n"), False)
                return
            if req is None:
                return
            req.peer_cert_der = cert or None
            req.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            try:
                resp = await handler(req)
            except Exception:
                log.exception("%s %s failed", req.method, req.path)
                resp = Response.text(500, "internal error (see the daemon's log)\n")
            keep = req.headers.get("connection", "").lower() != "close"
            if not await _respond(writer, resp, keep):
                return
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(
    handler: Handler, listen: str, *, ssl_context: ssl.SSLContext | None = None
) -> asyncio.Server:
    """Start serving ``handler`` on ``listen`` (HOST:PORT); returns the started server.

    Raises ValueError for a malformed address and OSError when the port is taken. Close
    the returned server (``close()`` then ``await wait_closed()``) to stop.
    """
    host, port = split_hostport(listen)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(handler, reader, writer)

    return await asyncio.start_server(
        on_connect, host, port, ssl=ssl_context, limit=MAX_HEADER_BYTES, reuse_address=True
    )


async def listening(what: str, listen: str, start: Awaitable[asyncio.Server]) -> asyncio.Server:
    """Await ``start`` (a serve() of ``what`` on ``listen``); a port that cannot be bound
    becomes the daemon's ConfigError naming both ("cannot serve metrics on HOST:PORT")."""
    try:
        return await start
    except OSError as e:
        raise ConfigError(f"cannot serve {what} on {listen}: {e.strerror or e}") from None


async def serve_metrics(registry: CollectorRegistry, listen: str) -> asyncio.Server:
    """Serve ``registry`` at ``GET /metrics`` over plain HTTP, in the format the scraper's
    ``Accept`` asks for (Prometheus text 0.0.4 by default, or OpenMetrics).

    Collection runs in the event loop, so collectors may read loop-owned state.
    """

    async def handle(req: Request) -> Response:
        if req.path != "/metrics":
            return Response.text(404, "only /metrics is served here\n")
        if req.method not in ("GET", "HEAD"):
            return Response.text(405, "use GET\n")
        encoder, content_type = choose_encoder(req.headers.get("accept", ""))  # as Prometheus asks
        return Response(body=encoder(registry), content_type=content_type)

    return await serve(handle, listen)
