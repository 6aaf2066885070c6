"""The lab gateway (``python -m vmferry.lab.gateway --dir LABDIR``): in a netns lab, the one
process that joins the host's network stack and the lab's.

It runs in the host namespace and forwards TCP connections:

- handlers → API: it listens on 192.0.2.1:<apiPort> with a socket made inside the lab
  namespace (on br-main, which every node reaches over its eth0) and forwards each
  connection to the controller on 127.0.0.1:<apiPort>; TLS passes through untouched
  (the controller's certificate names 192.0.2.1);
- host → node metrics: it listens on 127.0.0.1:<metricsPorts[node]> in the host and
  forwards to the node's metrics server on 192.0.2.(10+I):<same port>, so a scrape from
  the host works as in loopback mode.

Sockets inside the lab namespace come from one worker thread that entered it (setns):
a socket belongs to the namespace it was created in, whichever thread uses it later.
When every listener is up, it writes ``run/gateway.ready``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from vmferry import logs
from vmferry.lab import netns

log = logging.getLogger("vmferry.lab.gateway")

CLONE_NEWNET = 0x40000000
CHUNK = 64 * 1024  # bytes read at a time per direction (flow control bounds the rest)
CONNECT_TIMEOUT = 10.0


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(netns.NETNS_RUN_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side (its peer may still answer)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class Gateway:
    def __init__(self, lab_ns: str) -> None:
        self.lab_ns = lab_ns
        # One thread inside the lab namespace: it makes every socket that must live there.
        self.in_lab = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=enter_netns, initargs=(lab_ns,)
        )
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()

    async def _lab_socket(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.in_lab, socket.socket)

    async def _connect(self, target: tuple[str, int], in_lab: bool) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = await self._lab_socket() if in_lab else socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, target), CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        _tune(sock)
        return sock

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: tuple[str, int],
        in_lab: bool,
    ) -> None:
        try:
            sock = await self._connect(target, in_lab)
        except (OSError, TimeoutError) as e:
            log.warning("cannot reach %s:%d: %s", *target, e)
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await w.wait_closed()

    async def listen(
        self, listen: tuple[str, int], target: tuple[str, int], *, listen_in_lab: bool
    ) -> None:
        """Forward ``listen`` (in the lab namespace or the host's) to ``target`` (in the
        other one)."""
        if listen_in_lab:
            sock = await self._lab_socket()
        else:
            sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(listen)
        sock.listen(128)
        sock.setblocking(False)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _tune(writer.get_extra_info("socket"))
            task = asyncio.current_task()
            assert task is not None
            self.connections.add(task)
            try:
                await self._forward(reader, writer, target, in_lab=not listen_in_lab)
            finally:
                self.connections.discard(task)

        server = await asyncio.start_server(handle, sock=sock, limit=CHUNK)
        self.servers.append(server)
        where = f"in {self.lab_ns}" if listen_in_lab else "in the host"
        log.info("forwarding %s:%d (%s) to %s:%d", *listen, where, *target)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        self.in_lab.shutdown(wait=False)


async def serve(lab_dir: Path) -> None:
    info = json.loads((lab_dir / "lab.json").read_text())
    net = info["netns"]
    gw = Gateway(net["lab"])
    try:
        api_port = int(info["apiPort"])
        await gw.listen((net["gateway"], api_port), ("127.0.0.1", api_port), listen_in_lab=True)
        for node, address in net["addresses"].items():
            port = int(info["metricsPorts"][node])
            await gw.listen(("127.0.0.1", port), (address, port), listen_in_lab=False)
        (lab_dir / "run" / netns.GATEWAY_READY_FILE).write_text(str(os.getpid()))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("gateway stopping")
    finally:
        await gw.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m vmferry.lab.gateway",
        description="the netns lab's gateway between the host's network stack and the lab's",
    )
    p.add_argument("--dir", required=True, type=Path, help="the lab directory")
    args = p.parse_args(argv)
    logs.setup("gateway", "info")
    try:
        asyncio.run(serve(args.dir.resolve()))
    except (OSError, KeyError, ValueError) as e:
        print(f"vmferry-lab-gateway: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
