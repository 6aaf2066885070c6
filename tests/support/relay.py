"""A TCP relay standing in for the migration network between two lab nodes, which a
test can cut (every connection closed, new ones refused) and restore."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.lab import LabHarness


class Relay:
    def __init__(self, listen_host: str, target_host: str, target_port: int) -> None:
        self.listen_host = listen_host
        self.target = (target_host, target_port)
        with socket.socket() as s:
            s.bind((listen_host, 0))
            self.port: int = s.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> Relay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.listen_host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def _call(self, fn: object) -> None:
        async def run() -> None:
            fn()  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def cut(self) -> None:
        """The network goes down: every connection is dropped, new ones are refused."""

        def cut() -> None:
            self._open = False
            for w in list(self._writers):
                if (transport := w.transport) is not None:
                    transport.abort()

        self._call(cut)

    def restore(self) -> None:
        def restore() -> None:
            self._open = True

        self._call(restore)

    def stop(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()

        self._call(stop)
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextlib.contextmanager
def migration_relay(
    lab: LabHarness, node: str = "node3", listen: str = "127.0.2.3"
) -> Iterator[Relay]:
    """Route ``node``'s incoming migration traffic through a Relay the test can cut: the
    handler is restarted advertising the relay's address as its migration endpoint."""
    conf = lab.lab.dir / "nodes" / node / "handler.toml"
    text = conf.read_text()
    address = re.search(r'migration_address = "([^"]+)"', text)
    port = re.search(r"migration_port = (\d+)", text)
    assert address and port
    relay = Relay(listen, address.group(1), int(port.group(1))).start()
    conf.write_text(
        text.replace("[labels]", f'migration_advertise = "{listen}:{relay.port}"\n[labels]')
    )
    lab.cli("lab", "kill", node, "--signal", "TERM")
    lab.wait_for(f"{node} to stop", lambda: lab.lab.pid(node) is None, timeout=15)
    lab.cli("lab", "start", node)
    lab.wait_for(
        f"{node} to advertise the relay",
        lambda: lab.get("no", node, "")["status"]["migrationEndpoint"]["address"] == listen or None,
        timeout=30,
    )
    try:
        yield relay
    finally:
        relay.stop()
