"""The ceiling of our transport here: bare gRPC mTLS streaming between two processes.

A server and a client, each its own process (as two handlers are), with the handlers'
channel/server options and node certificates from the project's PKI (EC P-256, mTLS).
The client streams pre-built ``message_bytes`` messages (the size of one PageBatch)
over ``streams`` bidirectional streams; the server acknowledges every message with a
small reply (as the target answers each batch with a Credit) and does nothing else with
the payload. No protobuf, no page gathering, no RAM writes: what is left is gRPC, HTTP/2
and TLS, i.e. what no engine built on them can beat. Each record also has the CPU-seconds
of the client (its own process time over the timed part) and of the server (its
/proc utime + stime across the client's run), and both per GiB sent.

``connections`` > 1 spreads the streams over that many TCP connections (separate
subchannels); the handler today multiplexes all of a migration's streams over one.

Run as ``python -m bench.grpc_baseline serve|client …`` (the bench starts both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.lab_runs import cpu_seconds
from bench.stats import per_gib
from handler import allocator
from vmferry import grpc_options, pki
from vmferry.lab import free_port

METHOD = "/vmferry.bench.Sink/Stream"
ACK = b"\x00" * 8


def server_options() -> list[tuple[str, Any]]:
    """The handlers' migration server options."""
    return grpc_options.server_options()


def channel_options() -> list[tuple[str, Any]]:
    """The handlers' migration channel options."""
    return grpc_options.channel_options(grpc_options.MIGRATION_KEEPALIVE_MS)


def _identity(b: bytes) -> bytes:
    return b


def make_certs(root: Path) -> tuple[pki.TlsFiles, pki.TlsFiles]:
    """(server, client) node certificates of a fresh CA, as a lab issues them."""
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, "vmferry-bench-grpc")
    server = pki.issue_node(pki_dir, "bench-target", ips=["127.0.0.1"], dns=["localhost"])
    client = pki.issue_node(pki_dir, "bench-source", ips=["127.0.0.1"], dns=["localhost"])
    return server, client


# -- server ---------------------------------------------------------------------------------


async def _sink(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield ACK


async def serve(port: int, tls: pki.TlsFiles) -> None:
    server = grpc.aio.server(options=server_options())
    handler = grpc.method_handlers_generic_handler(
        "vmferry.bench.Sink",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(
                _sink, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_secure_port(f"127.0.0.1:{port}", pki.server_credentials(tls))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# -- client ---------------------------------------------------------------------------------


async def _one_stream(channel: grpc.aio.Channel, payload: bytes, count: int) -> None:
    call = channel.stream_stream(
        METHOD, request_serializer=_identity, response_deserializer=_identity
    )()

    async def read_acks() -> None:
        for _ in range(count):
            if await call.read() is grpc.aio.EOF:
                raise RuntimeError("server closed the stream early")

    reader = asyncio.create_task(read_acks())
    for _ in range(count):
        await call.write(payload)
    await call.done_writing()
    await reader
    await call.code()


async def client(
    port: int,
    tls: pki.TlsFiles,
    *,
    total_bytes: int,
    message_bytes: int,
    streams: int,
    connections: int,
) -> dict[str, Any]:
    creds = pki.channel_credentials(tls)
    channels = []
    for i in range(connections):
        options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        if connections > 1:  # distinct channel args: distinct subchannels and TCP connections
            options.append(("vmferry.bench.connection", i))
        channels.append(grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options))
    try:
        for ch in channels:  # handshakes outside the timed part (the handler's Hello is too)
            await asyncio.wait_for(ch.channel_ready(), 10)
        payload = bytes(range(256)) * (message_bytes // 256)
        per_stream = max(1, total_bytes // message_bytes // streams)
        started, cpu_started = time.perf_counter(), time.process_time()
        async with asyncio.TaskGroup() as tg:
            for s in range(streams):
                tg.create_task(_one_stream(channels[s % connections], payload, per_stream))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started  # every thread of this process (gRPC's too)
    finally:
        for ch in channels:
            await ch.close()
    sent = per_stream * streams * len(payload)
    return {
        "bytes": sent,
        "seconds": seconds,
        "throughput": sent / seconds,
        "streams": streams,
        "connections": connections,
        "messageBytes": len(payload),
        "cpuClient": round(cpu, 3),
        "cpuPerGiBClient": per_gib(cpu, sent),
    }


# -- driver (used by bench.run) -----------------------------------------------------------


def _tls_args(tls: pki.TlsFiles) -> list[str]:
    return ["--ca", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]


def run_baseline(
    workdir: Path,
    *,
    total_bytes: int,
    message_bytes: int,
    variants: list[tuple[int, int]],
    runs: int,
) -> dict[str, list[dict[str, Any]]]:
    """Start a server process, run the client process ``runs`` times per (streams,
    connections) variant; {variant name: [records]}."""
    server_tls, client_tls = make_certs(workdir)
    port = free_port("127.0.0.1")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.grpc_baseline",
            "serve",
            "--port",
            str(port),
            *_tls_args(server_tls),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the gRPC baseline server did not start")
        for _ in range(runs):
            for streams, connections in variants:
                name = f"grpc-mtls-{streams}stream" + ("s" if streams > 1 else "")
                if connections > 1:
                    name += f"-{connections}conn"
                server_cpu = cpu_seconds(server.pid)
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.grpc_baseline",
                        "client",
                        "--port",
                        str(port),
                        *_tls_args(client_tls),
                        "--bytes",
                        str(total_bytes),
                        "--message-bytes",
                        str(message_bytes),
                        "--streams",
                        str(streams),
                        "--connections",
                        str(connections),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=300,
                )
                record = json.loads(out.stdout.strip().splitlines()[-1])
                after = cpu_seconds(server.pid)
                # the server process serves only this client meanwhile (its handshake included)
                spent = None if server_cpu is None or after is None else after - server_cpu
                record["cpuServer"] = None if spent is None else round(spent, 3)
                record["cpuPerGiBServer"] = per_gib(spent, record["bytes"])
                results.setdefault(name, []).append(record)
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_baseline")
    p.add_argument("role", choices=["serve", "client"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--bytes", type=int, default=1 << 30)
    p.add_argument("--message-bytes", type=int, default=1 << 20)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--connections", type=int, default=1)
    args = p.parse_args(argv)
    tls = pki.TlsFiles(args.ca, args.cert, args.key)
    allocator.tune_for_bulk_buffers()  # as the handlers do (handler/main.py)
    if args.role == "serve":
        asyncio.run(serve(args.port, tls))
        return 0
    result = asyncio.run(
        client(
            args.port,
            tls,
            total_bytes=args.bytes,
            message_bytes=args.message_bytes,
            streams=args.streams,
            connections=args.connections,
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
