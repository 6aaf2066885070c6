"""The daemons' HTTP server (aiohttp, vmferry.httpserve) on the wire, with raw sockets:
HEAD, keep-alive, chunked bodies, the request-smuggling probe, oversized headers and a
slowloris-style client. Each test serves a small app on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from vmferry import httpserve, metrics_http

pytestmark = pytest.mark.timeout(20)


class Served:
    def __init__(self, port: int) -> None:
        self.port = port
        self.posts: list[bytes] = []  # bodies of the POST /echo requests served
        self.gets = 0  # GET /metrics requests served


@asynccontextmanager
async def server(keepalive_timeout: float = httpserve.KEEPALIVE_TIMEOUT) -> AsyncIterator[Served]:
    registry = CollectorRegistry()
    gauge = Gauge("big_series", "A family large enough to matter.", ["i"], registry=registry)
    for i in range(200):
        gauge.labels(str(i)).set(i)
    app = metrics_http.metrics_app(registry, lambda: None, metrics_http.allow_anyone)
    served_state = Served(0)

    async def echo(request: web.Request) -> web.Response:
        body = await httpserve.read_body(request)
        served_state.posts.append(body)
        return web.Response(text=f"{len(body)}\n")

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/metrics" and request.method == "GET":
            served_state.gets += 1
        return await handler(request)

    app.middlewares.append(count)
    app.router.add_post("/echo", echo)
    served = await httpserve.serve(app, "127.0.0.1:0", keepalive_timeout=keepalive_timeout)
    served_state.port = served.port
    try:
        yield served_state
    finally:
        await served.close()


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body (by Content-Length)."""
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = b"" if head else await reader.readexactly(length)
    return status, headers, body


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_head_returns_the_headers_only_and_the_connection_stays_usable() -> None:
    async def main() -> None:
        async with server() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await read_response(reader, head=True)
            assert status == 200
            assert int(headers["content-length"]) > 5000  # what GET would send ...
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            # ... but no body: the next bytes on the wire are the next response.
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"ok\n")
            writer.close()

    run(main())


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def main() -> None:
        async with server() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            for _ in range(3):
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, body = await read_response(reader)
                assert status == 200 and b"big_series" in body
                assert headers.get("connection", "keep-alive").lower() != "close"
            assert s.gets == 3
            writer.close()

    run(main())


def test_a_chunked_post_is_one_request() -> None:
    async def main() -> None:
        async with server() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"11\n")
            assert s.posts == [b"hello world"]
            status, _, body = await read_response(reader)  # the next request, in order
            assert (status, body) == (200, b"ok\n")
            writer.close()

    run(main())


def test_the_smuggling_probe_gets_400_and_no_second_request_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with server() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            chunked = b"0\r\n\r\n" + smuggled
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {len(chunked)}\r\n".encode()
                + b"Transfer-Encoding: chunked\r\n\r\n"
                + chunked
            )
            status, _, _ = await read_response(reader)
            assert status == 400
            assert await reader.read() == b"", "the connection is closed after the 400"
            assert s.posts == [] and s.gets == 0, "neither request reached a handler"
            writer.close()

    with caplog.at_level(logging.WARNING, logger="aiohttp.server"):
        run(main())
    [record] = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.levelno == logging.WARNING and record.exc_info is None  # one line
    assert "Transfer-Encoding can't be present with Content-Length" in record.getMessage()


def test_oversized_headers_are_refused() -> None:
    async def main() -> None:
        async with server() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            big = "a" * (httpserve.MAX_FIELD_SIZE + 100)
            writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode())
            status, _, _ = await read_response(reader)
            assert status in (400, 431)
            many = "".join(f"X-H{i}: v\r\n" for i in range(httpserve.MAX_HEADERS + 10))
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
            status, _, _ = await read_response(reader)
            assert status in (400, 431)
            assert s.gets == 0
            writer.close()

    run(main())


def test_a_slowloris_client_times_out_without_blocking_others() -> None:
    async def main() -> None:
        async with server(keepalive_timeout=1.5) as s:
            slow_reader, slow = await asyncio.open_connection("127.0.0.1", s.port)
            started = time.monotonic()

            async def trickle() -> None:
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                    slow.write(bytes([byte]))
                    await asyncio.sleep(0.05)

            trickling = asyncio.create_task(trickle())
            # Meanwhile other clients are served at once, while the slow one is connected.
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
                t0 = time.monotonic()
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status, _, _ = await read_response(reader)
                assert status == 200 and time.monotonic() - t0 < 1.0
                writer.close()
                await asyncio.sleep(0.05)
            assert not slow_reader.at_eof(), "served while the slow client was connected"
            assert await asyncio.wait_for(slow_reader.read(), 8) == b""  # dropped
            closed_after = time.monotonic() - started
            assert 1.2 < closed_after < 6, closed_after
            assert not trickling.done(), "it was still sending when it was dropped"
            trickling.cancel()
            slow.close()

    run(main())


def test_readyz_says_why_until_ready() -> None:
    async def main() -> None:
        why: list[str | None] = ["informers not synced"]
        app = metrics_http.metrics_app(
            CollectorRegistry(), lambda: why[0], metrics_http.allow_anyone
        )
        served = await httpserve.serve(app, "127.0.0.1:0")
        try:
            for expected in ((503, b"not ready: informers not synced\n"), (200, b"ok\n")):
                reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, body = await read_response(reader)
                assert (status, body) == expected
                writer.close()
                why[0] = None
        finally:
            await served.close()

    run(main())


def test_a_taken_port_is_a_config_error_naming_it() -> None:
    from vmferry.config import ConfigError

    async def main() -> None:
        first = await httpserve.serve(web.Application(), "127.0.0.1:0")
        try:
            listen = f"127.0.0.1:{first.port}"
            with pytest.raises(ConfigError, match=f"cannot serve metrics on {listen}"):
                await httpserve.listening(
                    "metrics", listen, httpserve.serve(web.Application(), listen)
                )
        finally:
            await first.close()

    run(main())


def test_a_slow_body_gets_408_and_an_oversized_one_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserve, "BODY_TIMEOUT", 0.3)

    async def main() -> None:
        async with server() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
            t0 = time.monotonic()
            status, _, body = await read_response(reader)
            assert status == 408 and b"not received in time" in body
            assert time.monotonic() - t0 < 2
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            size = httpserve.MAX_BODY_BYTES + 1
            writer.write(
                f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
                + b"x" * size
            )
            status, _, _ = await read_response(reader)
            assert status == 413
            assert s.posts == []
            writer.close()

    run(main())
