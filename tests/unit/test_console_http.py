"""The console's HTTP surface on aiohttp (no TLS, no API behind it): static files and
HEAD, JSON errors for unknown pages and missing credentials, the POST guards."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from controller.console import Console
from vmferry.informer import Informer


class _Source:
    async def list(self, kind: str, namespace: str | None) -> tuple[list[Any], str]:
        return [], "0"


def test_console_http_surface() -> None:
    async def main() -> None:
        inf = Informer(_Source(), "VirtualMachineInstanceMigration")  # type: ignore[arg-type]
        console = Console(None, vmims=inf, vmis=inf, tls=None)  # type: ignore[arg-type]
        async with TestClient(TestServer(console.app())) as client:
            page = await client.get("/")
            assert page.status == 200 and "uPlot.iife.min.js" in await page.text()
            assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
            head = await client.head("/static/uPlot.iife.min.js")
            assert head.status == 200 and int(head.headers["Content-Length"]) > 40_000
            assert await head.read() == b""
            missing = await client.get("/nope")
            assert missing.status == 404
            assert await missing.json() == {"error": "no such page: GET /nope"}
            anonymous = await client.get("/api/state")
            assert anonymous.status == 401
            assert "log in" in (await anonymous.json())["error"]
            cross = await client.post(
                "/api/migrate", json={"vm": "x"}, headers={"Origin": "https://evil.example"}
            )
            assert cross.status == 403
            form = await client.post("/api/login", data="token=x")
            assert form.status == 415
            empty = await client.post("/api/login", json={"token": ""})
            assert empty.status == 400 and "paste a bearer token" in (await empty.json())["error"]
            not_json = await client.post(
                "/api/login", data="{", headers={"Content-Type": "application/json"}
            )
            assert not_json.status == 400

    asyncio.run(main())
