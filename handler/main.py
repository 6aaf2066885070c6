"""``vmferry-handler``: the per-node daemon (virt-handler + virt-launcher + migration proxy).

It registers its Node and heartbeats, runs the guests scheduled to it (driver
``memvm``), serves the migration Transfer service on its migration-network address (the
configured ``migration_address``, or its address on the dedicated migration network the
controller assigns it: migration_network.py) and drives outgoing migrations. Guests run
in their own sessions: stopping or restarting the handler never stops them, and a
restarted handler re-adopts them. Cross-cluster migrations trust the peer clusters
registered in the ConfigMap vmferry-peer-clusters (their CAs; handler/peers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from handler import allocator, stream
from handler.cert_renewer import CertRenewer
from handler.drivers.base import Drivers
from handler.drivers.memvm import MemVMDriver
from handler.drivers.qemu import QemuDriver
from handler.drivers.scope import GuestScopes
from handler.endpoint import MigrationEndpoint
from handler.metrics import HandlerMetrics
from handler.migration.incoming import IncomingRegistry
from handler.migration.memvm_target import MigrationService
from handler.migration.qemu_target import TunnelService
from handler.migration.restart_record import RestartRecords
from handler.migration.worker_pool import WorkerPool
from handler.migration_network import ListenError, MigrationServer, NetworkAgent
from handler.node_agent import NodeAgent, NodeInfo, host_cpu_model, host_memory_bytes
from handler.peers import MigrationTrust, PeerRegistry
from handler.vm_manager import VMManager
from handler.volumes import LocalReclaimer, VolumeResolver
from vmferry import logs, metrics_http, pki, systemd
from vmferry.client import ApiClient
from vmferry.config import ClientConfig, ConfigError, daemon_config
from vmferry.decentralized import PEERS_NAMESPACE
from vmferry.informer import Informer
from vmferry.objects.quantity import parse_quantity

log = logging.getLogger("vmferry.handler")

MAX_AUTO_STREAM_WORKERS = 3  # "auto" never starts more (4 streams); more: set a count

CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "node_name": str,
    "api_server": str,
    "ca": str,
    "cert": str,
    "key": str,
    "main_address": str,
    "migration_address": str,
    "migration_port": int,
    "migration_advertise": str,
    "runtime_dir": str,
    "ram_dir": str,
    "memory": (str, int),
    "cpu_model": str,
    "labels": dict,
    "heartbeat_seconds": (int, float),
    "log_level": str,
    "insecure_plaintext": bool,
    "qemu_binary": str,
    "qemu_image_dir": str,
    "configure_migration_network": bool,
    "stream_workers": (int, str),
    **metrics_http.CONFIG_KEYS,
}
DEFAULTS: dict[str, Any] = {
    "api_server": "127.0.0.1:7443",
    "main_address": "127.0.0.1",
    "migration_address": "127.0.0.1",
    "migration_port": 7444,
    "runtime_dir": "/run/vmferry",
    "ram_dir": "/dev/shm/vmferry",
    "labels": {},
    "heartbeat_seconds": 2.0,
    "log_level": "info",
    "insecure_plaintext": False,
    "qemu_binary": "qemu-system-x86_64",
    # default kernel/initrd of qemu VMIs that name none (`make guest-image` builds it here)
    "qemu_image_dir": str(Path(__file__).resolve().parent.parent / "build" / "guest"),
    # the migration network's address (whereabouts) is added to the NIC by the handler;
    # false: never change the network stack (a lab whose handlers share the host's)
    "configure_migration_network": True,
    # processes that carry a migration's channels 1.. (parallelStreams) on their own
    # cores, on both sides (handler/migration/stream_worker.py); 0: every stream in the
    # handler's process; "auto": auto_stream_workers()
    "stream_workers": "auto",
    **metrics_http.DEFAULTS,
}
METRICS_AUTH_MODES = (metrics_http.MetricsAuth.NONE, metrics_http.MetricsAuth.ALLOWLIST)


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="vmferry-handler",
        description="vmferry node handler: runs this node's VMs and their live migrations.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--node-name", help="this node's name (must match its certificate)")
    p.add_argument(
        "--api-server", help="controller host:port (replicas: several, comma-separated IP:port)"
    )
    p.add_argument("--ca", help="cluster CA certificate")
    p.add_argument("--cert", help="node certificate ('vmferry pki issue node NAME')")
    p.add_argument("--key", help="node private key")
    p.add_argument("--main-address", help="this node's address on the main network")
    p.add_argument("--migration-address", help="address on the migration network (listens here)")
    p.add_argument(
        "--migration-port", type=int, help="port of the migration service (default 7444)"
    )
    p.add_argument(
        "--migration-advertise",
        metavar="HOST:PORT",
        help="address sources dial for migrations when it differs from the listen address "
        "(NAT, a relay); default: the migration address and port",
    )
    p.add_argument("--runtime-dir", help="per-guest runtime files (default /run/vmferry)")
    p.add_argument("--ram-dir", help="guest RAM files, on tmpfs (default /dev/shm/vmferry)")
    p.add_argument("--memory", help="memory offered to guests, a quantity (default: host memory)")
    p.add_argument("--cpu-model", help="CPU model reported (default: /proc/cpuinfo)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node label (repeatable)",
    )
    p.add_argument("--heartbeat-seconds", type=float, help="Ready heartbeat period (default 2)")
    p.add_argument(
        "--stream-workers",
        metavar="N|auto",
        help="processes carrying migration streams 1.. on their own cores, as source and "
        "as target; 0: every stream in the handler's process (default auto: half the cores "
        f"minus one, at most {MAX_AUTO_STREAM_WORKERS})",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    metrics_http.add_flags(p, METRICS_AUTH_MODES)
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="no TLS anywhere (tests only; never in production)",
    )
    args = p.parse_args(argv)
    config = daemon_config(
        args, DEFAULTS, CONFIG_KEYS, tls_what="the node certificate", flag_skip=("labels",)
    )
    labels = dict(config["labels"])
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--label {item!r}: expected KEY=VALUE")
        labels[k] = v
    config["labels"] = labels
    if not config.get("node_name"):
        raise ConfigError("node_name is required (--node-name or node_name in the config file)")
    try:
        config["memory_bytes"] = (
            parse_quantity(config["memory"]) if config.get("memory") else host_memory_bytes()
        )
    except ValueError as e:
        raise ConfigError(f"memory: {e}") from None
    config["metrics"] = metrics_http.settings(config, METRICS_AUTH_MODES)
    config["stream_workers"] = stream_workers_setting(config["stream_workers"])
    return config


def auto_stream_workers(cpus: int | None) -> int:
    """Workers where the host has cores to spare: half its cores (the other half runs the
    guests) minus the handler's own, at most MAX_AUTO_STREAM_WORKERS. None on a host of 2
    or 3 cores: there the default two streams moved memory about as fast in the handler
    (545 against 566 MiB/s), for ~0.2 CPU-s per GiB less at the target (README)."""
    return max(0, min(MAX_AUTO_STREAM_WORKERS, (cpus or 1) // 2 - 1))


def stream_workers_setting(value: object) -> int:
    """``stream_workers``: a count >= 0 or "auto"; ConfigError naming what is wrong."""
    if value == "auto":
        return auto_stream_workers(os.cpu_count())
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f'stream_workers: expected a count >= 0 or "auto", got {value!r}')
    if value > stream.MAX_CHANNELS - 1:
        raise ConfigError(
            f"stream_workers: {value} is more than a migration's {stream.MAX_CHANNELS - 1} "
            "streams beyond the first"
        )
    return value


def advertised_endpoint(config: dict[str, Any]) -> tuple[str, int] | None:
    """``migration_advertise``: where sources reach this node's migration service when it
    is not where it listens (NAT, a relay); it then overrides the published endpoint
    whatever address the service listens on. None when not configured."""
    advertise = config.get("migration_advertise")
    if not advertise:
        return None
    host, sep, port_text = advertise.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"migration_advertise {advertise!r}: expected HOST:PORT")
    return host, int(port_text)


async def serve(config: dict[str, Any], argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (guests keep running); SIGHUP re-reads the
    configuration (``argv``: the command line it came from) and applies ``log_level``
    and ``heartbeat_seconds`` live."""
    node = config["node_name"]
    sd = systemd.Notifier.from_env()
    sd.status("starting the migration service")
    tls = (
        None
        if config["insecure_plaintext"]
        else pki.TlsFiles(Path(config["ca"]), Path(config["cert"]), Path(config["key"]))
    )
    runtime_dir = Path(config["runtime_dir"])
    runtime_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before serving
    client_config = ClientConfig(
        server=config["api_server"], tls=tls, insecure_plaintext=config["insecure_plaintext"]
    )
    api = ApiClient(client_config, timeout=10.0)
    scopes = GuestScopes.detect()  # under systemd: each guest in a scope of its own
    driver = MemVMDriver(runtime_dir / "guests", Path(config["ram_dir"]), scopes=scopes)
    driver.warm_up()  # a guest (a migration target above all) starts without a Python start-up
    # The registered peer clusters (cross-cluster migrations: their CAs), kept current
    # from the ConfigMap by an informer; and this node's trust for migrations.
    peers = PeerRegistry()
    trust = None if tls is None else MigrationTrust(tls, peers)
    # Expected incoming migrations, shared by both target services and the VM manager.
    incoming = IncomingRegistry(
        RestartRecords(runtime_dir / "incoming"),
        require_peer_identity=tls is not None,
        trust=trust,
    )
    qemu = QemuDriver(
        runtime_dir / "qemu",
        Path(config["ram_dir"]),
        binary=config["qemu_binary"],
        image_dir=Path(config["qemu_image_dir"]),
        scopes=scopes,
        volumes=VolumeResolver(api, node),
    )
    # One instance of each target service, served by every listener (migration_network
    # moves the listener to the migration network's address and back).
    memvm_service = MigrationService(incoming)
    services = (memvm_service, TunnelService(incoming, qemu))  # memvm, QEMU

    def register(grpc_server: Any) -> None:
        for service in services:
            service.register(grpc_server)

    port = int(config["migration_port"])
    endpoint = MigrationEndpoint(
        config["migration_address"], port, advertise=advertised_endpoint(config)
    )
    server = MigrationServer(
        register,
        port,
        None if trust is None else trust.server_credentials,
        pending=lambda: tuple(incoming.registry),
    )
    try:
        await server.start(config["migration_address"])
    except ListenError as e:
        raise ConfigError(str(e)) from None
    metrics_server = None
    manager: VMManager | None = None
    workers = None
    try:  # from here a failure (a port taken, say) stops what started: never a hang
        agent = NodeAgent(
            api,
            NodeInfo(
                name=node,
                labels=config["labels"],
                memory_bytes=config["memory_bytes"],
                cpu_model=config.get("cpu_model") or host_cpu_model(),
                cpus=os.cpu_count() or 1,
                main_address=config["main_address"],
            ),
            endpoint,
            heartbeat_seconds=float(config["heartbeat_seconds"]),
        )
        if config["stream_workers"] > 0:
            workers = WorkerPool(
                config["stream_workers"],
                log_level=config["log_level"],
                name=f"handler/{node}/stream-worker",
            )
            await workers.start()
            if endpoint.advertise is None:  # a relay's port is the only one sources reach
                memvm_service.use_workers(workers, lambda: endpoint.address, tls)
        nodes = Informer(api, "Node")
        network = NetworkAgent(
            node,
            nodes,
            endpoint,
            server,
            main_address=config["migration_address"],
            on_change=agent.heartbeat,
            configure=bool(config["configure_migration_network"]),
        )
        vmis = Informer(api, "VirtualMachineInstance")
        configmaps = Informer(api, "ConfigMap", namespace=PEERS_NAMESPACE)
        configmaps.add_handler(peers.on_configmap)
        claims = Informer(api, "PersistentVolumeClaim")  # this node's local images
        claims.add_handler(LocalReclaimer(api, node).on_claim)
        manager = VMManager(
            api,
            node,
            Drivers(driver, qemu),
            vmis,
            incoming,
            tls=tls,
            migration_endpoint=endpoint,
            state_dir=runtime_dir,
            peers=peers,
            workers=workers,
        )
        sd.status("re-adopting running guests")
        await manager.adopt()
        started = asyncio.Event()  # registered, and the informers it works from listed

        def not_ready() -> str | None:
            if not started.is_set():
                return "not registered with the controller yet"
            pending = [i.kind for i in (nodes, vmis, configmaps) if not i.synced.is_set()]
            return f"{', '.join(pending)} not listed yet" if pending else None

        metrics = HandlerMetrics(manager, node, ready=lambda: not_ready() is None)
        if config["metrics"] is not None:
            metrics_server = await metrics_http.start(
                f"node {node}", config["metrics"], metrics.registry, tls=tls, ready=not_ready
            )
        stop = asyncio.Event()
        reloader = systemd.ConfigReloader(
            lambda: parse_args(argv),
            config,
            {
                "log_level": systemd.live_log_level,
                "heartbeat_seconds": lambda v: setattr(agent, "interval", float(v)),
            },
        )
        systemd.install_signals(asyncio.get_running_loop(), sd, stop, reloader)
        async with asyncio.TaskGroup() as tg:
            sd.status("registering the node")
            await agent.register()
            started.set()
            tasks = [
                tg.create_task(agent.run()),
                tg.create_task(nodes.run()),
                tg.create_task(network.run()),
                tg.create_task(vmis.run()),
                tg.create_task(configmaps.run()),
                tg.create_task(claims.run()),
                tg.create_task(run_after(configmaps.synced, manager.run())),
                tg.create_task(metrics.run()),
                tg.create_task(sd.run_watchdog(lambda: _status(node, endpoint, manager))),
            ]
            if tls is not None:  # the node certificate renews itself at 2/3 of its life
                tasks.append(tg.create_task(CertRenewer(api, node, tls).run()))
            sd.ready(_status(node, endpoint, manager))
            await stop.wait()
            log.info("node %s: shutting down (guests keep running)", node)
            for task in tasks:
                task.cancel()
    finally:
        if manager is not None:
            for handle in manager.handles.values():
                handle.close()
        await driver.close()
        if workers is not None:
            await workers.close()
        if metrics_server is not None:
            await metrics_server.close()
        await server.close(grace=1)
        await api.close()


def _status(node: str, endpoint: MigrationEndpoint, manager: VMManager) -> str:
    """The line ``systemctl status`` shows for a serving handler."""
    host, port = endpoint.published()
    return f"node {node}: {len(manager.handles)} guest(s); migrations on {host}:{port}"


async def run_after(ready: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """``work`` once ``ready`` is set: the VM manager starts once the peer registry is
    listed (a cross-cluster hand-off is never judged on a registry not read yet)."""
    await ready.wait()
    await work


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"vmferry-handler: error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(f"handler/{config['node_name']}", config["log_level"])
    allocator.tune_for_bulk_buffers()  # page batches recycle heap instead of fresh mmaps
    try:
        asyncio.run(serve(config, sys.argv[1:] if argv is None else argv))
    except (ConfigError, pki.CertificateExpired) as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
