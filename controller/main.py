"""``vmferry-controller``: the API server, the state store and the cluster reconcilers.

Configuration comes from a TOML file (``deploy/examples/controller.toml``); command-line
flags override it. The daemon serves the object API over mTLS only, unless
``--insecure-plaintext`` asks otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from controller.admission import Admission
from controller.api import ApiService
from controller.audit import AuditLog
from controller.authn import Authenticator, TokenSigner, load_signing_key
from controller.console import Console
from controller.forklift.cluster import bootstrap_forklift
from controller.forklift.run import run_forklift
from controller.metrics import ControllerMetrics
from controller.migration_controller import MigrationController
from controller.network_controller import NetworkController
from controller.node_monitor import NodeMonitor
from controller.objects import StoreSource
from controller.rbac_builtin import bootstrap_rbac
from controller.rbac_controller import run_rbac_reconcilers
from controller.storage_controller import StorageController
from controller.store import Store
from controller.vm_controller import VMController
from controller.vmi_controller import VMIController
from vmferry import grpc_options, httpserve, logs, pki
from vmferry.config import ConfigError, daemon_config
from vmferry.errors import AlreadyExists
from vmferry.informer import Informer
from vmferry.migration_network import NAD_KIND, NAD_NAMESPACE
from vmferry.objects import kinds, schema
from vmferry.rpc import api_pb2_grpc

log = logging.getLogger("vmferry.controller")

CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "listen": str,
    "data_dir": str,
    "ca": str,
    "cert": str,
    "key": str,
    "node_grace_seconds": (int, float),
    "log_level": str,
    "insecure_plaintext": bool,
    "audit_log": str,
    "token_listen": str,
    "metrics_listen": str,
    "console_listen": str,
}
DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:7443",
    "data_dir": "/var/lib/vmferry/controller",
    "node_grace_seconds": 10.0,
    "log_level": "info",
    "insecure_plaintext": False,
    "metrics_listen": "",  # host:port of /metrics (plain HTTP); empty: no metrics server
    "console_listen": "",  # host:port of the web console (HTTPS); empty: no console
}
BOOTSTRAP_NAMESPACES = ("default", kinds.SYSTEM_NAMESPACE, "kube-system")


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="vmferry-controller",
        description="vmferry controller: object API (gRPC, mTLS), store and reconcilers.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--listen", help=f"host:port of the API (default {DEFAULTS['listen']})")
    p.add_argument("--data-dir", help=f"state directory (default {DEFAULTS['data_dir']})")
    p.add_argument("--ca", help="cluster CA certificate")
    p.add_argument("--cert", help="server certificate (from 'vmferry pki issue server')")
    p.add_argument("--key", help="server private key")
    p.add_argument(
        "--node-grace-seconds",
        type=float,
        help="a node silent this long goes NotReady (default 10)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--metrics-listen", help="host:port for Prometheus /metrics (empty: off)")
    p.add_argument("--console-listen", help="host:port for the web console (empty: off)")
    p.add_argument(
        "--audit-log",
        help="file of the audit log, one JSON line per decision (default <data-dir>/audit.log)",
    )
    p.add_argument(
        "--token-listen",
        help="host:port of an extra TLS listener for bearer-token clients without a "
        "client certificate (default: none; tokens are always accepted on --listen too)",
    )
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="serve without TLS (tests only; never in production)",
    )
    args = p.parse_args(argv)
    return daemon_config(args, DEFAULTS, CONFIG_KEYS, tls_what="a server certificate")


async def bootstrap(store: Store) -> None:
    """Create the objects every cluster has: namespaces and the HyperConverged singleton."""
    for ns in BOOTSTRAP_NAMESPACES:
        with contextlib.suppress(AlreadyExists):
            await store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    hco = schema.apply_defaults(
        {
            "apiVersion": kinds.by_kind("HyperConverged").api_version,
            "kind": "HyperConverged",
            "metadata": {"name": kinds.HYPERCONVERGED_NAME, "namespace": kinds.SYSTEM_NAMESPACE},
            "spec": {},
        }
    )
    try:
        await store.create(hco)
    except AlreadyExists:  # a store from before: fill in what defaulting added since
        existing = await store.get(
            "HyperConverged", kinds.SYSTEM_NAMESPACE, hco["metadata"]["name"]
        )
        upgraded = schema.apply_defaults(existing)
        if upgraded != existing:
            await store.update(upgraded)
    await bootstrap_rbac(store)
    await bootstrap_forklift(store)  # openshift-mtv and ForkliftController/forklift-controller


async def serve(config: dict[str, Any]) -> None:
    data_dir = Path(config["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before serving
    store = await Store.open(data_dir / "state.db")
    try:
        await bootstrap(store)
        server = grpc.aio.server(options=grpc_options.api_server_options())
        signer = TokenSigner(load_signing_key(data_dir))
        audit = AuditLog(Path(config.get("audit_log") or data_dir / "audit.log"))
        api = ApiService(
            store, Admission(store), authenticator=Authenticator(store, signer), audit=audit
        )
        api_pb2_grpc.add_ApiServicer_to_server(api, server)
        if config["insecure_plaintext"]:
            log.warning(
                "serving the API WITHOUT TLS on %s (--insecure-plaintext)", config["listen"]
            )
            port = server.add_insecure_port(config["listen"])
            tls = None
        else:
            tls = pki.TlsFiles(Path(config["ca"]), Path(config["cert"]), Path(config["key"]))
            port = server.add_secure_port(config["listen"], pki.server_credentials(tls))
            if config.get("token_listen"):
                token_port = server.add_secure_port(
                    config["token_listen"], pki.server_credentials(tls, require_client_cert=False)
                )
                if token_port == 0:
                    raise ConfigError(f"cannot listen on {config['token_listen']}")
                log.info("bearer-token clients served on %s", config["token_listen"])
        if port == 0:
            raise ConfigError(f"cannot listen on {config['listen']}")
        await server.start()
        log.info("api serving on %s (data in %s)", config["listen"], data_dir)
        try:  # from here a failure (a port taken, say) stops the server: never a hang
            await _serve_started(config, store, signer, api, tls)
        finally:
            await server.stop(grace=2)
    finally:
        await store.close()


async def _serve_started(
    config: dict[str, Any],
    store: Store,
    signer: TokenSigner,
    api: ApiService,
    tls: pki.TlsFiles | None,
) -> None:
    """Everything that runs once the API server is up, until a stop signal."""
    source = StoreSource(store)
    vms = Informer(source, "VirtualMachine")
    vmis = Informer(source, "VirtualMachineInstance")
    vmims = Informer(source, "VirtualMachineInstanceMigration")
    nodes = Informer(source, "Node")
    hcos = Informer(source, "HyperConverged")
    nads = Informer(source, NAD_KIND, namespace=NAD_NAMESPACE)
    pvcs = Informer(source, "PersistentVolumeClaim")
    storage_classes = Informer(source, "StorageClass")
    metrics = ControllerMetrics(vmims, vmis)
    http_servers: list[asyncio.Server] = []
    try:  # the HTTP servers started so far stop with the daemon, however it ends
        if config["metrics_listen"]:
            listen = config["metrics_listen"]
            http_servers.append(
                await httpserve.listening(
                    "metrics", listen, httpserve.serve_metrics(metrics.registry, listen)
                )
            )
            log.info("metrics on http://%s/metrics", config["metrics_listen"])
        console = None
        if config["console_listen"]:
            console_tls = None if config["insecure_plaintext"] else tls
            console = Console(api, vmims=vmims, vmis=vmis, tls=console_tls)
            listen = config["console_listen"]
            http_servers.append(
                await httpserve.listening("the web console", listen, console.serve(listen))
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with asyncio.TaskGroup() as tg:
            informers = (vms, vmis, vmims, nodes, hcos, nads, pvcs, storage_classes)
            tasks = [tg.create_task(inf.run()) for inf in informers]
            for inf in informers:
                await inf.synced.wait()
            tasks += [
                tg.create_task(VMController(store, vms, vmis, vmims).run()),
                tg.create_task(VMIController(store, vmis, nodes).run()),
                tg.create_task(MigrationController(store, vmims, vmis, nodes, hcos).run()),
                tg.create_task(NetworkController(store, hcos, nads, nodes).run()),
                tg.create_task(StorageController(store, pvcs, storage_classes).run()),
                tg.create_task(
                    NodeMonitor(store, grace_seconds=float(config["node_grace_seconds"])).run()
                ),
                tg.create_task(run_rbac_reconcilers(store, signer, _ca_pem(config))),
                tg.create_task(run_forklift(store, Path(config["data_dir"]))),
            ]
            if console is not None:
                tasks.append(tg.create_task(console.run()))
            log.info("reconcilers running")
            await stop.wait()
            log.info("shutting down")
            for task in tasks:
                task.cancel()
    finally:
        for http_server in http_servers:
            http_server.close()


def _ca_pem(config: dict[str, Any]) -> bytes:
    """The cluster CA certificate published in every namespace (empty without TLS)."""
    return Path(config["ca"]).read_bytes() if config.get("ca") else b""


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"vmferry-controller: error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup("controller", config["log_level"])
    try:
        asyncio.run(serve(config))
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
